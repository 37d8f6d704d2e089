//! `sendbox plugin run` and `sendbox plugin inspect`, through the real
//! binary, on components built from `plugins/` and `tests/plugins/`.

use sendbox_test_support::wasm;

use std::path::Path;
use std::process::{Command, Output};

fn sendbox(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_sendbox"))
        .args(args)
        .env(
            "SENDBOX_CACHE_DIR",
            wasm::wasm_target_dir().join("sendbox-cache"),
        )
        .output()
        .expect("sendbox starts")
}

fn json(out: &Output) -> serde_json::Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "stdout is not JSON ({e}):\n{}\nstderr:\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

fn path(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn every_example_plugin_runs_its_sample_event() {
    let root = wasm::repo_root();
    for name in ["file-alert", "webhook-bridge", "daily-digest"] {
        let wasm = wasm::example(name);
        let event = root.join("plugins").join(name).join("sample-event.json");
        let out = sendbox(&[
            "plugin",
            "run",
            path(&wasm),
            "--event",
            path(&event),
            "--config",
            "to=ops@example.com",
        ]);
        assert!(
            out.status.success(),
            "{name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v = json(&out);
        assert_eq!(v["ok"], true, "{name}: {v}");
        assert_eq!(v["plugin"], name);
    }
}

#[test]
fn run_prints_the_outcome_with_the_attachment() {
    let event = wasm::repo_root().join("plugins/file-alert/sample-event.json");
    let out = sendbox(&[
        "plugin",
        "run",
        path(&wasm::example("file-alert")),
        "--event",
        path(&event),
        "-c",
        "to=ops@example.com",
    ]);
    let v = json(&out);
    let email = &v["outcome"]["emails"][0];
    assert_eq!(email["to"][0], "ops@example.com");
    assert_eq!(email["attachments"][0]["filename"], "2026-11-27.csv");
    assert_eq!(
        email["attachments"][0]["data"],
        "region,orders\nnorth,1204\nsouth,987\n\n"
    );
}

#[test]
fn a_bad_event_file_names_the_file_and_exits_65() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.json");
    std::fs::write(&bad, r#"{"email": {}}"#).unwrap();
    let out = sendbox(&[
        "plugin",
        "run",
        path(&wasm::example("file-alert")),
        "--event",
        path(&bad),
    ]);
    assert_eq!(out.status.code(), Some(65));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("bad.json: not a valid event"), "{err}");
}

#[test]
fn a_runaway_plugin_exits_1_with_the_reason_as_json() {
    let event = wasm::repo_root().join("plugins/webhook-bridge/samples/bad.json");
    let out = sendbox(&[
        "plugin",
        "run",
        path(&wasm::hostile("hostile")),
        "--event",
        path(&event),
        "-c",
        "mode=loop",
        "--limit",
        "cpu_ms_per_event=100",
    ]);
    assert_eq!(out.status.code(), Some(1));
    let v = json(&out);
    assert_eq!(v["ok"], false);
    assert_eq!(v["error"]["kind"], "timeout");
    assert!(v["error"]["message"].as_str().unwrap().contains("100 ms"));
}

#[test]
fn a_bad_limit_is_a_config_error() {
    let event = wasm::repo_root().join("plugins/file-alert/sample-event.json");
    let out = sendbox(&[
        "plugin",
        "run",
        path(&wasm::example("file-alert")),
        "--event",
        path(&event),
        "--limit",
        "cpu_seconds=3",
    ]);
    assert_eq!(out.status.code(), Some(78));
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown field `cpu_seconds`"));
}

#[test]
fn state_file_carries_the_digest_across_dry_runs() {
    let root = wasm::repo_root();
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state.json");
    let digest = wasm::example("daily-digest");
    let run = |event: &Path| {
        sendbox(&[
            "plugin",
            "run",
            path(&digest),
            "--event",
            path(event),
            "-c",
            "to=team@example.com",
            "--state",
            path(&state),
            "--write-state",
        ])
    };
    let first = json(&run(&root.join("plugins/file-alert/sample-event.json")));
    assert_eq!(first["ok"], true);
    assert!(first["outcome"]["emails"].as_array().unwrap().is_empty());
    let saved: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&state).unwrap()).unwrap();
    assert!(saved.get("entry/000000000000").is_some(), "{saved}");

    let tick = json(&run(&root.join("plugins/daily-digest/sample-event.json")));
    let email = &tick["outcome"]["emails"][0];
    assert_eq!(email["subject"], "Digest: 1 events");
    assert!(
        email["text"]
            .as_str()
            .unwrap()
            .contains("reports/2026-11-27.csv")
    );
    let saved: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&state).unwrap()).unwrap();
    assert_eq!(saved, serde_json::json!({}));
}

#[test]
fn inspect_lists_imports_and_flags_the_refused_one() {
    let ok = sendbox(&["plugin", "inspect", path(&wasm::example("webhook-bridge"))]);
    assert!(ok.status.success());
    let text = String::from_utf8_lossy(&ok.stdout);
    assert!(
        text.contains("sendbox:plugin/hook@0.1.0 (implemented)"),
        "{text}"
    );
    assert!(text.contains("ok      sendbox:plugin/host@0.1.0"), "{text}");

    let bad = sendbox(&[
        "plugin",
        "inspect",
        "--json",
        path(&wasm::hostile("hostile-import")),
    ]);
    assert_eq!(bad.status.code(), Some(65));
    let v = json(&bad);
    assert_eq!(v["implements_world"], false);
    let refused: Vec<&str> = v["imports"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|i| i["offered"] == false)
        .map(|i| i["name"].as_str().unwrap())
        .collect();
    assert_eq!(refused, ["evil:plugin/exfil"]);
}
