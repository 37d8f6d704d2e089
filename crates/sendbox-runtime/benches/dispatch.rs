//! Event dispatch: one event through `file-alert` with sendbox's runtime
//! (fresh instance, limits, log capture, state overlay, validation) against
//! bare wasmtime instantiate+call of the same component on the same engine,
//! side by side in one run.
//!
//! Full run:   cargo bench -p sendbox-runtime --bench dispatch
//! Smoke run:  cargo test -p sendbox-runtime --bench dispatch (few iterations)
//!
//! Prints median and p99 of both and the ratio of medians. DESIGN.md's
//! target: ratio ≤ 1.5.

use sendbox_test_support::wasm;

use std::sync::Arc;
use std::time::{Duration, Instant};

use sendbox_runtime::baseline::BareHook;
use sendbox_runtime::{Event, MemoryState, PluginSettings, Runtime, RuntimeOptions};

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx]
}

fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    let (rounds, per_round) = if full { (40, 250) } else { (2, 10) };

    let path = wasm::example("file-alert");
    let bytes = std::fs::read(&path).expect("file-alert built");
    let event: Event = serde_json::from_str(
        &std::fs::read_to_string(wasm::repo_root().join("plugins/file-alert/sample-event.json"))
            .unwrap(),
    )
    .unwrap();

    let rt = Runtime::new(RuntimeOptions::default()).unwrap();
    let mut settings = PluginSettings::default();
    settings
        .config
        .insert("to".into(), "ops@example.com".into());
    let bare = BareHook::new(rt.engine(), &bytes, settings.config.clone()).unwrap();
    let plugin = rt.load("file-alert", &bytes, settings).unwrap();
    let state: Arc<MemoryState> = Arc::new(MemoryState::new());

    // Warm up both paths (page in code, fill the pool's free lists).
    for _ in 0..50 {
        plugin.run(&event, "warm", state.clone()).unwrap();
        bare.call(&event).unwrap();
    }

    let mut ours = Vec::with_capacity(rounds * per_round);
    let mut base = Vec::with_capacity(rounds * per_round);
    // Alternate in rounds so drift in machine load hits both alike.
    for _ in 0..rounds {
        for _ in 0..per_round {
            let t = Instant::now();
            let n = bare.call(&event).unwrap();
            base.push(t.elapsed());
            assert_eq!(n, 1);
        }
        for _ in 0..per_round {
            let t = Instant::now();
            let r = plugin.run(&event, "bench", state.clone()).unwrap();
            ours.push(t.elapsed());
            assert_eq!(r.outcome.emails.len(), 1);
        }
    }
    ours.sort();
    base.sort();
    let (om, op) = (percentile(&ours, 0.5), percentile(&ours, 0.99));
    let (bm, bp) = (percentile(&base, 0.5), percentile(&base, 0.99));
    println!("event dispatch, file-alert, {} samples each", ours.len());
    println!(
        "  bare wasmtime instantiate+call   median {:>9.1?}  p99 {:>9.1?}",
        bm, bp
    );
    println!(
        "  sendbox Plugin::run              median {:>9.1?}  p99 {:>9.1?}",
        om, op
    );
    println!(
        "  ratio (sendbox / bare)           median {:>9.2}x  p99 {:>8.2}x   target ≤ 1.50x",
        om.as_secs_f64() / bm.as_secs_f64(),
        op.as_secs_f64() / bp.as_secs_f64()
    );
}
