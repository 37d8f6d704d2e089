//! The same plugin in Rust and in Python (`webhook-bridge` and
//! `plugins/webhook-bridge-py`, an interpreter inside an 18 MB component),
//! side by side in one run:
//!
//! - compile: loading into an empty compiled-code cache (cold) against
//!   loading from it (what a daemon restart does);
//! - per event: the sample alert through a fresh instance each time
//!   (instantiate + handle), median and p99;
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
    let sample = wasm::repo_root().join("plugins/webhook-bridge/sample-event.json");
    let event: Event = serde_json::from_str(&std::fs::read_to_string(sample).unwrap()).unwrap();
    let rust = measure("rust", &wasm::example("webhook-bridge"), &event, events);
    let python = measure(
        "python",
        &wasm::python("plugins/webhook-bridge-py"),
        &event,
        events,
    );
    println!("webhook-bridge in Rust and in Python: compile, load, {events} events each");
    for (lang, m) in [("Rust", &rust), ("Python", &python)] {
        println!(
            "  {lang:<7} cold compile {:>9.2?}  cached load {:>9.2?}  event p50 {:>9.2?}  p99 {:>9.2?}  +{:.0} MB resident",
            m.cold, m.cached, m.median, m.p99, m.rss_added_mb
        );
    }
    println!(
        "  Python / Rust: event p50 {:.1}x, cached load {:.1}x  (targets: Python event p50 < 5 ms, cached load < 100 ms)",
        python.median.as_secs_f64() / rust.median.as_secs_f64(),
        python.cached.as_secs_f64() / rust.cached.as_secs_f64()
    );
}
