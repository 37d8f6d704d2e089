//! Python plugins (componentize-py, an interpreter inside an 18 MB
//! component) in the same sandbox as Rust ones, built from source by the
//! test: the example writes the same emails as its Rust twin, and every
//! attack a Python plugin can express is contained as it is for Rust —
//! a socket is refused (the sockets the interpreter imports are linked and
//! denied), an endless loop stops at the CPU limit, a memory hog at the
//! memory limit, a huge outcome at its limit, an exception is reported.

use sendbox_test_support::wasm;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use sendbox_runtime::{
    Event, MemoryState, Plugin, PluginSettings, RunFailure, Runtime, RuntimeOptions,
};

/// One runtime for the file, with the compiled-code cache the daemon tests
/// use: the interpreter is compiled once, then loaded from the cache.
fn runtime() -> &'static Runtime {
    static RT: OnceLock<Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        Runtime::new(RuntimeOptions {
            cache_dir: Some(wasm::wasm_target_dir().join("sendbox-cache")),
            ..RuntimeOptions::default()
        })
        .expect("runtime starts")
    })
}

/// The components, built (and compiled into the cache) once for the file.
fn component(dir: &str) -> PathBuf {
    static BUILT: std::sync::Mutex<BTreeMap<String, PathBuf>> =
        std::sync::Mutex::new(BTreeMap::new());
    let mut built = BUILT
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    built
        .entry(dir.to_owned())
        .or_insert_with(|| {
            let path = wasm::python(dir);
            // Compiles it into the cache while the lock is held, so tests
            // running at once do not compile it side by side.
            runtime()
                .load_file("warm-up", &path, PluginSettings::default())
                .expect("the Python component loads");
            path
        })
        .clone()
}

fn settings(config: &[(&str, &str)]) -> PluginSettings {
    PluginSettings {
        config: config
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        ..PluginSettings::default()
    }
}

fn load(dir: &str, name: &str, config: &[(&str, &str)]) -> Plugin {
    runtime()
        .load_file(name, &component(dir), settings(config))
        .expect("the Python plugin loads")
}

fn hostile(mode: &str) -> Plugin {
    load(
        "tests/plugins/hostile-py",
        &format!("py-{mode}"),
        &[("mode", mode)],
    )
}

fn webhook(body: &str) -> Event {
    serde_json::from_value(serde_json::json!({"webhook": {"path": "/hooks/t", "body": body}}))
        .unwrap()
}

fn run_hostile(mode: &str) -> RunFailure {
    let err = hostile(mode)
        .run(&webhook("{}"), "e1", Arc::new(MemoryState::new()))
        .expect_err("the attack must fail");
    assert_still_serves();
    err.cause
}

/// After every attack the same runtime still serves a normal event.
fn assert_still_serves() {
    let report = hostile("ok")
        .run(&webhook("{}"), "after", Arc::new(MemoryState::new()))
        .expect("a normal event succeeds after the attack");
    assert_eq!(report.outcome.emails[0].subject, "ok");
}

#[test]
fn the_python_webhook_bridge_writes_the_same_emails_as_the_rust_one() {
    let config = [("to", "oncall@example.com, lead@example.com")];
    let python = load("plugins/webhook-bridge-py", "bridge-py", &config);
    let rust = runtime()
        .load_file(
            "bridge-rs",
            &wasm::example("webhook-bridge"),
            settings(&config),
        )
        .unwrap();
    let root = wasm::repo_root();
    let read = |p: &str| std::fs::read_to_string(root.join(p)).unwrap();
    let events: Vec<Event> = vec![
        serde_json::from_str(&read("plugins/webhook-bridge-py/sample-event.json")).unwrap(),
        serde_json::from_str(&read("plugins/webhook-bridge/samples/push.json")).unwrap(),
        webhook(&read("plugins/webhook-bridge/samples/alert.json")),
        webhook(r#"{"something": "else"}"#),
    ];
    for event in &events {
        let state = Arc::new(MemoryState::new());
        let from_rust = rust.run(event, "e1", state.clone()).unwrap().outcome;
        let from_python = python.run(event, "e1", state).unwrap().outcome;
        assert_eq!(
            serde_json::to_value(&from_python).unwrap(),
            serde_json::to_value(&from_rust).unwrap()
        );
    }
}

#[test]
fn a_python_plugin_cannot_open_a_socket() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let err = load(
        "tests/plugins/hostile-py",
        "py-socket",
        &[("mode", "socket"), ("addr", &addr)],
    )
    .run(&webhook("{}"), "e1", Arc::new(MemoryState::new()))
    .expect_err("no socket");
    match &err.cause {
        RunFailure::Plugin(m) => assert!(m.contains("Error"), "{m}"),
        other => panic!("expected the plugin's exception, got {other}"),
    }
    std::thread::sleep(std::time::Duration::from_millis(100));
    assert!(
        matches!(listener.accept(), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock),
        "the plugin reached the listener"
    );
    assert_still_serves();
}

#[test]
fn a_python_endless_loop_is_stopped_at_the_cpu_limit() {
    let cause = run_hostile("loop");
    assert!(
        matches!(cause, RunFailure::Timeout { limit_ms: 1000 }),
        "{cause}"
    );
}

#[test]
fn a_python_memory_hog_is_stopped_at_the_memory_limit() {
    let cause = run_hostile("memory");
    assert!(
        matches!(cause, RunFailure::MemoryLimit { limit_bytes } if limit_bytes == 64 << 20),
        "{cause}"
    );
}

#[test]
fn a_huge_python_outcome_is_refused() {
    let cause = run_hostile("huge");
    assert!(
        matches!(
            &cause,
            RunFailure::Limit {
                limit: "outcome_bytes",
                ..
            }
        ),
        "{cause}"
    );
}

#[test]
fn a_python_exception_commits_nothing_and_says_why() {
    let cause = run_hostile("raise");
    match &cause {
        RunFailure::Plugin(m) => {
            assert_eq!(m, "RuntimeError: the plugin gave up on purpose")
        }
        other => panic!("expected the plugin's exception, got {other}"),
    }
}
