//! Python and JavaScript plugins (componentize-py, componentize-js: an
//! interpreter inside a 12–18 MB component) in the same sandbox as Rust
//! ones, built from source by the test:
//!
//! - each example writes the same outcome as its Rust twin
//!   (`webhook-bridge-py`, `file-alert-js`);
//! - every attack a Python or JavaScript plugin can express is contained as
//!   for Rust: a socket is refused (the sockets the Python runtime imports
//!   are linked and denied), an endless loop stops at the CPU limit, a
//!   memory hog at the memory limit, a huge outcome at its limit, an
//!   exception is reported as the plugin's error.

use sendbox_test_support::wasm;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use sendbox_runtime::{
    Event, MemoryState, Plugin, PluginSettings, RunFailure, Runtime, RuntimeOptions,
};

/// One runtime for the file, with the compiled-code cache the daemon tests
/// use: each interpreter is compiled once, then loaded from the cache.
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

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Lang {
    Python,
    JavaScript,
}

/// The components, built (and compiled into the cache) once for the file.
fn component(lang: Lang, dir: &str) -> PathBuf {
    static BUILT: std::sync::Mutex<BTreeMap<(Lang, String), PathBuf>> =
        std::sync::Mutex::new(BTreeMap::new());
    let mut built = BUILT
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    built
        .entry((lang, dir.to_owned()))
        .or_insert_with(|| {
            let path = match lang {
                Lang::Python => wasm::python(dir),
                Lang::JavaScript => wasm::javascript(dir),
            };
            // Compiled into the cache while the lock is held, so tests
            // running at once do not compile it side by side.
            runtime()
                .load_file("warm-up", &path, PluginSettings::default())
                .expect("the component loads");
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

fn load(lang: Lang, dir: &str, name: &str, config: &[(&str, &str)]) -> Plugin {
    runtime()
        .load_file(name, &component(lang, dir), settings(config))
        .expect("the plugin loads")
}

fn hostile(lang: Lang, mode: &str) -> Plugin {
    let dir = match lang {
        Lang::Python => "tests/plugins/hostile-py",
        Lang::JavaScript => "tests/plugins/hostile-js",
    };
    load(lang, dir, &format!("hostile-{mode}"), &[("mode", mode)])
}

fn webhook(body: &str) -> Event {
    serde_json::from_value(serde_json::json!({"webhook": {"path": "/hooks/t", "body": body}}))
        .unwrap()
}

/// Runs the attack; after it, the same runtime still serves a normal event.
fn run_hostile(lang: Lang, mode: &str) -> RunFailure {
    let err = hostile(lang, mode)
        .run(&webhook("{}"), "e1", Arc::new(MemoryState::new()))
        .expect_err("the attack must fail");
    let report = hostile(lang, "ok")
        .run(&webhook("{}"), "after", Arc::new(MemoryState::new()))
        .expect("a normal event succeeds after the attack");
    assert_eq!(report.outcome.emails[0].subject, "ok");
    err.cause
}

/// The outcomes of `ours` and of the Rust example `rust` on `events` are
/// the same, field by field.
fn same_outcomes(ours: &Plugin, rust: &str, config: &[(&str, &str)], events: &[Event]) {
    let rust = runtime()
        .load_file("rust", &wasm::example(rust), settings(config))
        .unwrap();
    for event in events {
        let state = Arc::new(MemoryState::new());
        let theirs = rust.run(event, "e1", state.clone()).unwrap().outcome;
        let mine = ours.run(event, "e1", state).unwrap().outcome;
        assert_eq!(
            serde_json::to_value(&mine).unwrap(),
            serde_json::to_value(&theirs).unwrap()
        );
    }
}

fn read(path: &str) -> String {
    std::fs::read_to_string(wasm::repo_root().join(path)).unwrap()
}

#[test]
fn the_python_webhook_bridge_writes_the_same_emails_as_the_rust_one() {
    let config = [("to", "oncall@example.com, lead@example.com")];
    let python = load(
        Lang::Python,
        "plugins/webhook-bridge-py",
        "bridge-py",
        &config,
    );
    let events = [
        serde_json::from_str(&read("plugins/webhook-bridge-py/sample-event.json")).unwrap(),
        serde_json::from_str(&read("plugins/webhook-bridge/samples/push.json")).unwrap(),
        webhook(&read("plugins/webhook-bridge/samples/alert.json")),
        webhook(r#"{"something": "else"}"#),
    ];
    same_outcomes(&python, "webhook-bridge", &config, &events);
}

#[test]
fn the_javascript_file_alert_writes_the_same_emails_as_the_rust_one() {
    let file = |change: &str, size: Option<u64>, contents: Option<&str>| -> Event {
        serde_json::from_value(serde_json::json!({"file": {
            "watch": "incoming", "path": "reports/q3 summary.PDF", "change": change,
            "size": size, "contents": contents,
        }}))
        .unwrap()
    };
    let events = [
        serde_json::from_str(&read("plugins/file-alert-js/sample-event.json")).unwrap(),
        file(
            "modified",
            Some(40),
            Some("forty bytes of a report, more or less.."),
        ),
        file("created", Some(9_000_000), None),
        file("removed", None, None),
    ];
    for config in [
        vec![("to", "ops@example.com")],
        vec![
            ("to", "ops@example.com, audit@example.com"),
            ("subject", "{change}: {path} ({size} bytes) in {watch}"),
            ("max_attachment_bytes", "10"),
            ("notify_removed", "true"),
        ],
    ] {
        let js = load(
            Lang::JavaScript,
            "plugins/file-alert-js",
            "alert-js",
            &config,
        );
        same_outcomes(&js, "file-alert", &config, &events);
    }
}

#[test]
fn a_python_plugin_cannot_open_a_socket() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let err = load(
        Lang::Python,
        "tests/plugins/hostile-py",
        "py-socket",
        &[("mode", "socket"), ("addr", &addr)],
    )
    .run(&webhook("{}"), "e1", Arc::new(MemoryState::new()))
    .expect_err("no socket");
    match &err.cause {
        // The host's refusal, as Python reports it (not a failure of the
        // plugin's own before it asked for a socket).
        RunFailure::Plugin(m) => assert!(
            m.starts_with("PermissionError") && m.contains("Permission denied"),
            "{m}"
        ),
        other => panic!("expected the plugin's exception, got {other}"),
    }
    std::thread::sleep(std::time::Duration::from_millis(100));
    assert!(
        matches!(listener.accept(), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock),
        "the plugin reached the listener"
    );
}

#[test]
fn endless_loops_are_stopped_at_the_cpu_limit() {
    for lang in [Lang::Python, Lang::JavaScript] {
        let cause = run_hostile(lang, "loop");
        assert!(
            matches!(cause, RunFailure::Timeout { limit_ms: 1000 }),
            "{cause}"
        );
    }
}

#[test]
fn memory_hogs_are_stopped_at_the_memory_limit() {
    for lang in [Lang::Python, Lang::JavaScript] {
        let cause = run_hostile(lang, "memory");
        assert!(
            matches!(cause, RunFailure::MemoryLimit { limit_bytes } if limit_bytes == 64 << 20),
            "{cause}"
        );
    }
}

#[test]
fn huge_outcomes_are_refused() {
    let cause = run_hostile(Lang::Python, "huge");
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
    // JavaScript's bindings turn the 20 MiB string into UTF-8 a character
    // at a time: the CPU limit stops it before the host sees the outcome.
    let cause = run_hostile(Lang::JavaScript, "huge");
    assert!(
        matches!(
            &cause,
            RunFailure::Limit {
                limit: "outcome_bytes",
                ..
            } | RunFailure::Timeout { .. }
        ),
        "{cause}"
    );
}

#[test]
fn exceptions_commit_nothing_and_say_why() {
    for (lang, mode, expected) in [
        (
            Lang::Python,
            "raise",
            "RuntimeError: the plugin gave up on purpose",
        ),
        (
            Lang::JavaScript,
            "throw",
            "Error: the plugin gave up on purpose",
        ),
    ] {
        match run_hostile(lang, mode) {
            RunFailure::Plugin(m) => assert_eq!(m, expected),
            other => panic!("expected the plugin's exception, got {other}"),
        }
    }
}
