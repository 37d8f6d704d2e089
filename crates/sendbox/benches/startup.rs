//! Start-up time and idle memory of `sendbox run` on the quickstart: the
//! real `examples/quickstart.toml` (three example plugins, file transport,
//! SQLite outbox) with its paths moved into a temporary folder and a free
//! port. Side by side, in the same run, the same daemon with no plugins.
//!
//! - cold: the first start, compiling the plugins into an empty cache;
//! - warm: later starts, with the compiled code cached (the normal case);
//! - ready: from spawning the process to its "ready" line (the webhook
//!   port is bound, watches and schedules are running);
//! - idle RSS: resident memory one second after ready (`/proc/PID/status`).
//!
//! Full run:   cargo bench -p sendbox --bench startup
//! Smoke run:  cargo test -p sendbox --bench startup
//!
//! DESIGN.md's targets: ready ≤ 300 ms (precompiled), idle RSS ≤ 50 MB.

mod common;
use common::median;

use sendbox_test_support::wasm;

use std::path::{Path, PathBuf};
use std::time::Duration;

/// The quickstart config with its `../var/...` paths moved under `dir`.
fn quickstart(dir: &Path) -> String {
    let text = std::fs::read_to_string(wasm::repo_root().join("examples/quickstart.toml"))
        .expect("examples/quickstart.toml");
    let plugins = wasm::example("file-alert")
        .parent()
        .expect("a folder")
        .display()
        .to_string();
    let replaced = text
        .replace("\"../var/plugins/", &format!("\"{plugins}/"))
        .replace("\"../var/quickstart/", &format!("\"{}/", dir.display()))
        .replace("127.0.0.1:8025", "127.0.0.1:0");
    assert!(
        !replaced.contains("../var"),
        "quickstart.toml has a path this benchmark does not move"
    );
    replaced
}

/// The quickstart's `[daemon]` and account, without plugins.
fn no_plugins(dir: &Path) -> String {
    let q = quickstart(dir);
    q[..q.find("[plugins.").expect("the quickstart has plugins")].to_owned()
}

struct Run {
    ready: Duration,
    rss_kb: u64,
}

/// Starts the daemon, waits for ready, idles, reads RSS, stops it.
fn run(config: &Path, idle: Duration) -> Run {
    let d = common::start(config);
    std::thread::sleep(idle);
    let rss_kb = (common::memory_mb(d.child.id(), "VmRSS") * 1024.0) as u64;
    Run {
        ready: d.ready,
        rss_kb,
    }
}

fn max(v: &[f64]) -> f64 {
    v.iter().copied().fold(f64::MIN, f64::max)
}

fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    let (rounds, idle) = if full {
        (10, Duration::from_secs(1))
    } else {
        (2, Duration::from_millis(200))
    };
    let dir = tempfile::tempdir().expect("a temp dir");
    let write = |name: &str, text: String| -> PathBuf {
        let p = dir.path().join(name);
        std::fs::write(&p, text).expect("config written");
        p
    };
    let with = write("quickstart.toml", quickstart(dir.path()));
    let without = write("no-plugins.toml", no_plugins(dir.path()));

    let cold = run(&with, idle);
    let (mut ready, mut rss, mut base_ready, mut base_rss) = (vec![], vec![], vec![], vec![]);
    // Alternate, so machine load affects both alike.
    for _ in 0..rounds {
        let r = run(&with, idle);
        ready.push(r.ready.as_secs_f64() * 1e3);
        rss.push(r.rss_kb as f64 / 1024.0);
        let b = run(&without, idle);
        base_ready.push(b.ready.as_secs_f64() * 1e3);
        base_rss.push(b.rss_kb as f64 / 1024.0);
    }
    println!("sendbox run, spawn to ready line, {rounds} rounds (release build)");
    println!(
        "  quickstart, cold cache (compiles 3 plugins): {:8.1} ms, RSS {:.1} MB",
        cold.ready.as_secs_f64() * 1e3,
        cold.rss_kb as f64 / 1024.0
    );
    println!(
        "  quickstart, warm cache:   ready median {:6.1} ms  max {:6.1} ms   idle RSS median {:5.1} MB  max {:5.1} MB",
        median(ready.clone()),
        max(&ready),
        median(rss.clone()),
        max(&rss)
    );
    println!(
        "  baseline, no plugins:     ready median {:6.1} ms  max {:6.1} ms   idle RSS median {:5.1} MB  max {:5.1} MB",
        median(base_ready.clone()),
        max(&base_ready),
        median(base_rss.clone()),
        max(&base_rss)
    );
    println!("  targets: ready <= 300 ms, idle RSS <= 50 MB");
}
