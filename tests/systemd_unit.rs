//! `examples/sendbox.service`, checked the way systemd would use it:
//!
//! - `systemd-analyze verify` accepts it without a warning (paths moved to
//!   the built binary and a test config);
//! - its `ExecStartPre` passes, its `ExecStart` (JSON logs) reaches ready
//!   with a secret from its `EnvironmentFile`, and every log line is JSON;
//! - its `ExecReload` makes the daemon reload;
//! - its `KillSignal` drains and exits 0 well within `TimeoutStopSec`, which
//!   leaves room for the default drain deadline.

use crate::support::daemon;
use sendbox_test_support::wasm;

use std::collections::HashMap;
use std::process::Command;
use std::time::Duration;

use daemon::Daemon;

const SECRET: &str = "secret-from-the-environment-file";

/// `[Service]` keys (a key given twice keeps every value).
fn service(unit: &str) -> HashMap<String, Vec<String>> {
    let mut keys: HashMap<String, Vec<String>> = HashMap::new();
    let mut in_service = false;
    for line in unit.lines().map(str::trim) {
        if line.starts_with('[') {
            in_service = line == "[Service]";
        } else if in_service
            && !line.starts_with('#')
            && let Some((k, v)) = line.split_once('=')
        {
            keys.entry(k.into()).or_default().push(v.into());
        }
    }
    keys
}

fn one<'a>(keys: &'a HashMap<String, Vec<String>>, key: &str) -> &'a str {
    match keys.get(key).map(Vec::as_slice) {
        Some([v]) => v,
        other => panic!("the unit should set {key} once, has {other:?}"),
    }
}

/// A command line from the unit, split on spaces (the unit uses no quoting).
fn command(line: &str, env: &HashMap<String, String>) -> Command {
    let mut words = line.split_whitespace();
    let mut cmd = Command::new(words.next().expect("a command"));
    cmd.args(words).env_clear().envs(env);
    cmd
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_systemd_unit_verifies_starts_reloads_and_drains() {
    let dir = tempfile::tempdir().unwrap();
    let config = daemon::write_examples_config(dir.path());
    let secrets = dir.path().join("secrets.env");
    std::fs::write(
        &secrets,
        format!("# root-only\nSENDBOX_TEST_WEBHOOK_SECRET={SECRET}\n"),
    )
    .unwrap();
    let bin = env!("CARGO_BIN_EXE_sendbox");
    let unit = std::fs::read_to_string(wasm::repo_root().join("examples/sendbox.service"))
        .unwrap()
        .replace("/usr/local/bin/sendbox", bin)
        .replace("/etc/sendbox/sendbox.toml", config.to_str().unwrap())
        .replace("/etc/sendbox/secrets.env", secrets.to_str().unwrap());
    let unit_path = dir.path().join("sendbox.service");
    std::fs::write(&unit_path, &unit).unwrap();

    // systemd's own check of the file.
    let verify = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&unit_path)
        .output()
        .unwrap_or_else(|e| {
            panic!("systemd-analyze is needed for this test (apt-get install systemd): {e}")
        });
    let said = String::from_utf8_lossy(&verify.stderr);
    assert!(verify.status.success(), "systemd-analyze verify: {said}");
    assert!(
        !said.contains(unit_path.to_str().unwrap()),
        "systemd-analyze warned about the unit: {said}"
    );

    // The environment systemd would give: Environment= plus EnvironmentFile=.
    let keys = service(&unit);
    let mut env: HashMap<String, String> = HashMap::new();
    env.insert("PATH".into(), std::env::var("PATH").unwrap_or_default());
    for e in keys.get("Environment").into_iter().flatten() {
        let (k, v) = e.split_once('=').expect("Environment=KEY=VALUE");
        env.insert(k.into(), v.into());
    }
    let env_file = one(&keys, "EnvironmentFile").trim_start_matches('-');
    for line in std::fs::read_to_string(env_file).unwrap().lines() {
        if let Some((k, v)) = line.split_once('=')
            && !k.starts_with('#')
        {
            env.insert(k.into(), v.into());
        }
    }

    // ExecStartPre: the config check passes.
    let pre = command(one(&keys, "ExecStartPre"), &env).output().unwrap();
    assert!(
        pre.status.success(),
        "ExecStartPre failed: {}{}",
        String::from_utf8_lossy(&pre.stdout),
        String::from_utf8_lossy(&pre.stderr)
    );

    // ExecStart: ready, logging JSON.
    let mut d = Daemon::spawn(command(one(&keys, "ExecStart"), &env));
    assert_eq!(
        d.post_bearer("/hooks/digest", SECRET).await,
        202,
        "the secret from EnvironmentFile authenticates"
    );

    // ExecReload: a reload, with nothing changed.
    let reload = one(&keys, "ExecReload").replace("$MAINPID", &d.child.id().to_string());
    assert!(command(&reload, &env).status().unwrap().success());
    d.wait_logged("reload done", 1);

    // KillSignal: a drain and exit 0 within TimeoutStopSec.
    assert_eq!(one(&keys, "KillSignal"), "SIGTERM");
    let stop: u64 = one(&keys, "TimeoutStopSec").parse().unwrap();
    assert!(
        stop > 10,
        "TimeoutStopSec={stop} must exceed the default drain deadline (shutdown_grace_secs = 10)"
    );
    let status = d.terminate(Duration::from_secs(stop));
    assert!(status.success(), "{status:?}");

    let logs = d.logs();
    assert!(!logs.is_empty());
    for line in logs.lines() {
        let v: serde_json::Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("--log-format json wrote a non-JSON line {line:?}: {e}"));
        assert!(
            v["level"].is_string() && v["fields"]["message"].is_string(),
            "{line}"
        );
    }
    assert!(logs.contains("stopped cleanly"), "{logs}");
    assert!(!logs.contains(SECRET), "the secret was logged");
}
