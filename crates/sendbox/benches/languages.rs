//! Plugins in Rust, Python and JavaScript in the real daemon (`sendbox
//! run`, file transport, SQLite outbox, fsync on), side by side in one run:
//!
//! - idle RSS with no plugin, with the Rust pair, the Python plugin, the
//!   JavaScript plugin, and all of them loaded (compiled code cached, as
//!   after any restart), and the time from spawn to ready;
//! - each webhook route under load at 16 connections: requests/s, p50, p99,
//!   the mean plugin time the daemon measured (`/metrics`), and the
//!   daemon's peak RSS after all the load.
//!
//! Pairs do the same work: `webhook-bridge` (Rust) and `webhook-bridge-py`
//! (Python) turn an Alertmanager alert into the same email; the hostile
//! plugins' `ok` mode (Rust and JavaScript) sends one short email.
//!
//! Full run:   cargo bench -p sendbox --bench languages
//! Smoke run:  cargo test -p sendbox --bench languages
//!
//! Issue 14's baseline: a JavaScript plugin served ~890 events/s at 16
//! connections, mean plugin time 7.8 ms, peak RSS 109 MB.

mod common;

use sendbox_test_support::wasm;

use common::{median, start};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

struct Plugin {
    name: &'static str,
    lang: &'static str,
    wasm: PathBuf,
    mode: Option<&'static str>,
    body: Vec<u8>,
}

fn section(p: &Plugin) -> String {
    let mut s = format!(
        "[plugins.{n}]\nwasm = \"{w}\"\naccount = \"local\"\n[plugins.{n}.config]\nto = \"oncall@example.com\"\n",
        n = p.name,
        w = p.wasm.display()
    );
    if let Some(m) = p.mode {
        s.push_str(&format!("mode = \"{m}\"\n"));
    }
    s.push_str(&format!(
        "[plugins.{n}.policy]\nidempotency_hours = 0\n[plugins.{n}.webhook]\npath = \"/hooks/{n}\"\nunauthenticated = true\nconcurrency = 64\n",
        n = p.name
    ));
    s
}

fn config(dir: &Path, name: &str, plugins: &[&Plugin]) -> PathBuf {
    let mut text = format!(
        "[daemon]\nlisten = \"127.0.0.1:0\"\nstore = \"{name}/sendbox.db\"\ncache_dir = \"{}\"\n\
         [accounts.local]\nprovider = \"file\"\nmailbox = \"sendbox@localhost\"\ndir = \"{name}/mail\"\n",
        wasm::wasm_target_dir().join("sendbox-cache").display()
    );
    for p in plugins {
        text.push_str(&section(p));
    }
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(&path, text).expect("config written");
    path
}

/// (resident, peak resident, anonymous resident) in MB.
fn rss(pid: u32) -> (f64, f64, f64) {
    (
        common::memory_mb(pid, "VmRSS"),
        common::memory_mb(pid, "VmHWM"),
        common::memory_mb(pid, "RssAnon"),
    )
}

/// `conns` connections POSTing `body` for `secs`: requests/s, p50, p99,
/// errors.
async fn load(
    url: String,
    body: Vec<u8>,
    conns: usize,
    secs: f64,
) -> (f64, Duration, Duration, usize) {
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(conns)
        .build()
        .expect("a client");
    let deadline = Instant::now() + Duration::from_secs_f64(secs);
    let start = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    let body = Arc::new(body);
    for _ in 0..conns {
        let (client, url, body) = (client.clone(), url.clone(), body.clone());
        tasks.spawn(async move {
            let (mut lat, mut bad) = (Vec::new(), 0usize);
            while Instant::now() < deadline {
                let t = Instant::now();
                match client.post(&url).body(body.to_vec()).send().await {
                    Ok(r) if r.status() == 202 => {
                        let _ = r.bytes().await;
                        lat.push(t.elapsed());
                    }
                    _ => bad += 1,
                }
            }
            (lat, bad)
        });
    }
    let (mut all, mut bad) = (Vec::new(), 0);
    while let Some(r) = tasks.join_next().await {
        let (l, b) = r.expect("a load task");
        all.extend(l);
        bad += b;
    }
    let elapsed = start.elapsed();
    all.sort();
    let p = |q: f64| {
        all.get(((all.len().max(1) - 1) as f64 * q) as usize)
            .copied()
            .unwrap_or_default()
    };
    (
        all.len() as f64 / elapsed.as_secs_f64(),
        p(0.5),
        p(0.99),
        bad,
    )
}

/// Mean plugin run time the daemon measured for `plugin`, in ms.
async fn mean_plugin_ms(base: &str, plugin: &str) -> f64 {
    let text = reqwest::get(format!("{base}/metrics"))
        .await
        .expect("metrics")
        .text()
        .await
        .expect("metrics text");
    let value = |family: &str| {
        let key = format!("{family}{{plugin=\"{plugin}\"}} ");
        text.lines()
            .find_map(|l| l.strip_prefix(&key))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    let count = value("sendbox_plugin_duration_seconds_count");
    value("sendbox_plugin_duration_seconds_sum") / count.max(1.0) * 1e3
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    let (rounds, secs, idle) = if full {
        (5, 5.0, Duration::from_secs(1))
    } else {
        (1, 0.5, Duration::from_millis(200))
    };
    let alert = std::fs::read(wasm::repo_root().join("plugins/webhook-bridge/samples/alert.json"))
        .expect("the sample alert");
    let plugins = [
        Plugin {
            name: "bridge-rust",
            lang: "Rust",
            wasm: wasm::example("webhook-bridge"),
            mode: None,
            body: alert.clone(),
        },
        Plugin {
            name: "bridge-python",
            lang: "Python",
            wasm: wasm::python("plugins/webhook-bridge-py"),
            mode: None,
            body: alert,
        },
        Plugin {
            name: "ok-rust",
            lang: "Rust",
            wasm: wasm::hostile("hostile"),
            mode: Some("ok"),
            body: b"{}".to_vec(),
        },
        Plugin {
            name: "ok-js",
            lang: "JavaScript",
            wasm: wasm::javascript("tests/plugins/hostile-js"),
            mode: Some("ok"),
            body: b"{}".to_vec(),
        },
    ];
    let dir = tempfile::tempdir().expect("a temp dir");
    let sets: [(&str, Vec<&Plugin>); 5] = [
        ("no plugin", vec![]),
        ("Rust (2 plugins)", vec![&plugins[0], &plugins[2]]),
        ("Python (1)", vec![&plugins[1]]),
        ("JavaScript (1)", vec![&plugins[3]]),
        ("all 4", plugins.iter().collect()),
    ];
    let configs: Vec<PathBuf> = sets
        .iter()
        .enumerate()
        .map(|(i, (_, ps))| config(dir.path(), &format!("set{i}"), ps))
        .collect();
    // Fill the compiled-code cache first: every start below is warm.
    drop(start(&configs[4]));

    println!(
        "sendbox run with plugins of each language, idle RSS 'idle' after ready, compiled code cached; {rounds} rounds alternated"
    );
    let mut idle_rss = vec![Vec::new(); sets.len()];
    let mut ready = vec![Vec::new(); sets.len()];
    for _ in 0..rounds {
        for (i, c) in configs.iter().enumerate() {
            let d = start(c);
            std::thread::sleep(idle);
            idle_rss[i].push(rss(d.child.id()).0);
            ready[i].push(d.ready.as_secs_f64() * 1e3);
        }
    }
    let none = median(idle_rss[0].clone());
    for (i, (label, _)) in sets.iter().enumerate() {
        let m = median(idle_rss[i].clone());
        println!(
            "  {label:<18} idle RSS median {m:6.1} MB  (+{:5.1} MB over no plugin)  ready median {:6.1} ms",
            m - none,
            median(ready[i].clone())
        );
    }

    println!(
        "each route at 16 connections, all 4 plugins in one daemon, {secs} s each, alternated twice"
    );
    let d = start(&configs[4]);
    let before = rss(d.child.id()).0;
    let mut results: Vec<Vec<(f64, Duration, Duration, usize)>> = vec![Vec::new(); plugins.len()];
    for _ in 0..2 {
        for (i, p) in plugins.iter().enumerate() {
            let r = load(
                format!("{}/hooks/{}", d.base, p.name),
                p.body.clone(),
                16,
                secs,
            )
            .await;
            results[i].push(r);
        }
    }
    let mut rate = Vec::new();
    for (i, p) in plugins.iter().enumerate() {
        let rs = &results[i];
        let best = rs
            .iter()
            .max_by(|a, b| a.0.total_cmp(&b.0))
            .expect("two runs");
        let errors: usize = rs.iter().map(|r| r.3).sum();
        let plugin_ms = mean_plugin_ms(&d.base, p.name).await;
        rate.push(best.0);
        println!(
            "  {:<14} {:<10} {:>6.0} req/s  p50 {:>8.2?}  p99 {:>8.2?}  plugin mean {plugin_ms:5.2} ms  errors {errors}",
            p.name, p.lang, best.0, best.1, best.2
        );
        assert!(best.0 > 0.0, "{} served nothing", p.name);
    }
    let (now, peak, anon) = rss(d.child.id());
    println!(
        "  Python / Rust (same emails): {:.2} of the requests/s;  JavaScript / Rust (one short email): {:.2}",
        rate[1] / rate[0],
        rate[3] / rate[2]
    );
    println!(
        "  daemon RSS: {before:.1} MB before the load, {now:.1} MB after ({anon:.1} MB of it anonymous, the rest mapped compiled code), peak {peak:.1} MB (compiling excluded: the cache was warm)"
    );
}
