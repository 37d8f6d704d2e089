//! The same plugins in Rust, Python and JavaScript (`webhook-bridge` and
//! `plugins/webhook-bridge-py`; `file-alert` and `plugins/file-alert-js`:
//! an interpreter inside a 12–18 MB component), side by side in one run:
//!
//! - compile: loading into an empty compiled-code cache (cold) against
//!   loading from it (what a daemon restart does);
//! - per event: the sample alert through a fresh instance each time
//!   (instantiate + handle) — each plugin's own sample event — median and
//!   p99;
//! - memory: this process's resident memory before and after loading each.
//!
//! Full run:   cargo bench -p sendbox-runtime --bench languages
//! Smoke run:  cargo test -p sendbox-runtime --bench languages
//!
//! Issue 14's targets: an interpreter plugin's event under 5 ms median, a
//! cached load under 100 ms.

use sendbox_test_support::wasm;

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use sendbox_runtime::{Event, MemoryState, PluginSettings, Runtime, RuntimeOptions};

fn runtime(cache: &Path) -> Runtime {
    Runtime::new(RuntimeOptions {
        cache_dir: Some(cache.to_owned()),
        ..RuntimeOptions::default()
    })
    .expect("runtime starts")
}

fn settings() -> PluginSettings {
    let mut s = PluginSettings::default();
    s.config.insert("to".into(), "oncall@example.com".into());
    s
}

/// This process's resident memory, in MB.
fn rss_mb() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
        .unwrap_or(0.0)
        / 1024.0
}

fn quantile(sorted: &[Duration], q: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * q) as usize]
}

struct Measured {
    cold: Duration,
    cached: Duration,
    median: Duration,
    p99: Duration,
    rss_added_mb: f64,
}

fn measure(name: &str, path: &Path, event: &Event, events: usize) -> Measured {
    let cache = tempfile::tempdir().unwrap();
    let started = Instant::now();
    runtime(cache.path())
        .load_file(name, path, settings())
        .expect("loads");
    let cold = started.elapsed();
    let rt = runtime(cache.path());
    let before = rss_mb();
    let mut loads = Vec::new();
    let mut plugin = None;
    for _ in 0..5 {
        let started = Instant::now();
        plugin = Some(rt.load_file(name, path, settings()).expect("loads"));
        loads.push(started.elapsed());
    }
    loads.sort();
    let plugin = plugin.expect("loaded");
    let mut times = Vec::with_capacity(events);
    for i in 0..events {
        let started = Instant::now();
        let report = plugin
            .run(event, &format!("e{i}"), Arc::new(MemoryState::new()))
            .expect("the sample runs");
        times.push(started.elapsed());
        assert_eq!(report.outcome.emails.len(), 1);
    }
    times.sort();
    Measured {
        cold,
        cached: loads[loads.len() / 2],
        median: quantile(&times, 0.5),
        p99: quantile(&times, 0.99),
        rss_added_mb: rss_mb() - before,
    }
}

fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    let events = if full { 500 } else { 5 };
    let sample = |plugin: &str| -> Event {
        let path = wasm::repo_root()
            .join("plugins")
            .join(plugin)
            .join("sample-event.json");
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
    };
    let (bridge, alert) = (sample("webhook-bridge"), sample("file-alert"));
    let rows = [
        (
            "webhook-bridge",
            "Rust",
            measure("rs", &wasm::example("webhook-bridge"), &bridge, events),
        ),
        (
            "webhook-bridge",
            "Python",
            measure(
                "py",
                &wasm::python("plugins/webhook-bridge-py"),
                &bridge,
                events,
            ),
        ),
        (
            "file-alert",
            "Rust",
            measure("rs", &wasm::example("file-alert"), &alert, events),
        ),
        (
            "file-alert",
            "JavaScript",
            measure(
                "js",
                &wasm::javascript("plugins/file-alert-js"),
                &alert,
                events,
            ),
        ),
    ];
    println!(
        "the same plugins in Rust, Python and JavaScript: compile, load, {events} events each"
    );
    for (plugin, lang, m) in &rows {
        println!(
            "  {plugin:<15} {lang:<10} cold compile {:>9.2?}  cached load {:>9.2?}  event p50 {:>9.2?}  p99 {:>9.2?}  +{:.0} MB resident",
            m.cold, m.cached, m.median, m.p99, m.rss_added_mb
        );
    }
    for pair in rows.chunks(2) {
        let (rust, other) = (&pair[0].2, &pair[1].2);
        println!(
            "  {} / Rust ({}): event p50 {:.1}x, cached load {:.1}x",
            pair[1].1,
            pair[0].0,
            other.median.as_secs_f64() / rust.median.as_secs_f64(),
            other.cached.as_secs_f64() / rust.cached.as_secs_f64()
        );
    }
    println!("  targets: an interpreter plugin's event p50 < 5 ms, a cached load < 100 ms");
}
