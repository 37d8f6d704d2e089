//! Python and JavaScript plugins (built from `plugins/webhook-bridge-py`
//! and `plugins/file-alert-js` by the test) in the running daemon, against
//! the real peers:
//!
//! - a signed webhook to the Python bridge is answered `202` and its email
//!   arrives at the SMTP server over STARTTLS with XOAUTH2; a payload it
//!   does not understand gets its `400`;
//! - a file dropped into the JavaScript file-alert's folder arrives as an
//!   email with the file attached.

use crate::daemon_peers::wait_received;
use crate::support::daemon;
use sendbox_test_support::peers;
use sendbox_test_support::wasm;

use daemon::Daemon;
use peers::Peers;

const SECRET: &str = "webhook-secret-for-python-tests";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_python_plugin_turns_a_webhook_into_an_email_at_the_smtp_server() {
    let p = Peers::start();
    let dir = tempfile::tempdir().unwrap();
    let body = format!(
        r#"{account}
[plugins.bridge-py]
wasm = "{wasm}"
account = "app"
[plugins.bridge-py.config]
to = "oncall@example.com"
subject_prefix = "[py]"
[plugins.bridge-py.webhook]
path = "/hooks/py"
secret = {{ env = "SENDBOX_TEST_WEBHOOK_SECRET" }}
"#,
        account = p.app_account(),
        wasm = wasm::python("plugins/webhook-bridge-py").display(),
    );
    let config = daemon::write_config(dir.path(), &body);
    let (var, secret) = p.app_env();
    let d = Daemon::start(
        &config,
        &[(var, &secret), ("SENDBOX_TEST_WEBHOOK_SECRET", SECRET)],
    );
    let alert =
        std::fs::read(wasm::repo_root().join("plugins/webhook-bridge/samples/alert.json")).unwrap();
    let (status, _) = d
        .post_signed("/hooks/py", SECRET, &alert, alert.clone())
        .await;
    assert_eq!(status, 202);
    let m = wait_received(&p, "[py] FIRING: DiskFull").await;
    assert!(m.tls);
    assert_eq!(m.user.as_deref(), Some("alerts@example.com"));
    assert_eq!(m.to, ["oncall@example.com"]);
    assert!(m.raw.contains("Disk /var is 97% full"), "{}", m.raw);

    let junk = br#"{"something": "else"}"#.to_vec();
    let (status, answer) = d
        .post_signed("/hooks/py", SECRET, &junk, junk.clone())
        .await;
    assert_eq!(status, 400);
    assert!(
        answer["error"]
            .as_str()
            .is_some_and(|e| e.starts_with("unrecognised payload")),
        "{answer}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_javascript_plugin_turns_a_new_file_into_an_email_at_the_smtp_server() {
    let p = Peers::start();
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("drop")).unwrap();
    let body = format!(
        r#"{account}
[plugins.alert-js]
wasm = "{wasm}"
account = "app"
[plugins.alert-js.config]
to = "ops@example.com"
subject = "js saw {{path}}"
[[plugins.alert-js.watch]]
name = "drop"
dir = "drop"
debounce_ms = 100
"#,
        account = p.app_account(),
        wasm = wasm::javascript("plugins/file-alert-js").display(),
    );
    let config = daemon::write_config(dir.path(), &body);
    let (var, secret) = p.app_env();
    let _d = Daemon::start(&config, &[(var, &secret)]);
    std::fs::write(dir.path().join("drop/q3.csv"), "region,orders\nnorth,7\n").unwrap();
    let m = wait_received(&p, "js saw q3.csv").await;
    assert!(m.tls);
    assert_eq!(m.to, ["ops@example.com"]);
    assert!(m.raw.contains("filename=\"q3.csv\""), "{}", m.raw);
}
