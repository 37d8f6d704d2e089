//! `sendbox check`, `sendbox send-test` and `sendbox login` through the real
//! binary, against the real OAuth2 and SMTP peers (tests/support/peers.rs).

use sendbox_test_support::peers;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use peers::Peers;

fn config(p: &Peers, dir: &Path, secret: &str) -> (PathBuf, Vec<(String, String)>) {
    let path = dir.join("sendbox.toml");
    let text = format!(
        r#"# accounts against the test peers
{app_account}
[accounts.cert]
provider = "generic"
mailbox = "reports@example.com"
client_id = "{cert}"
private_key_file = "{key}"
certificate_file = "{crt}"
token_url = "{token}"
scopes = ["smtp"]
smtp_host = "localhost"
smtp_port = {port}
ca_file = "{ca}"

[accounts.local]
provider = "file"
mailbox = "sendbox@localhost"
dir = "mail"
"#,
        app_account = p.app_account(),
        cert = p.info.clients.cert.client_id,
        token = p.info.token_endpoint,
        port = p.info.smtp_starttls_port,
        ca = p.info.ca_file.display(),
        key = p.info.client_key_file.display(),
        crt = p.info.client_cert_file.display(),
    );
    std::fs::write(&path, text).unwrap();
    // The app account reads its secret from this variable.
    (path, vec![(p.app_env().0.to_string(), secret.to_string())])
}

fn delegated_config(p: &Peers, dir: &Path) -> PathBuf {
    let path = dir.join("delegated.toml");
    let text = format!(
        r#"[accounts.delegated]
provider = "generic"
mailbox = "operator@example.com"
client_id = "{device}"
token_file = "state/delegated.token.json"
token_url = "{token}"
device_url = "{device_url}"
scopes = ["openid", "offline_access", "smtp"]
smtp_host = "localhost"
smtp_port = {port}
ca_file = "{ca}"
"#,
        device = p.info.clients.device.client_id,
        token = p.info.token_endpoint,
        device_url = p.info.device_endpoint,
        port = p.info.smtp_starttls_port,
        ca = p.info.ca_file.display(),
    );
    std::fs::write(&path, text).unwrap();
    path
}

fn sendbox(args: &[&str], env: &[(String, String)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_sendbox"));
    cmd.args(args).env("SENDBOX_LOG", "debug");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("sendbox runs")
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[tokio::test]
async fn check_logs_in_every_account_and_never_prints_a_secret() {
    let p = Peers::start();
    let dir = tempfile::tempdir().unwrap();
    let (cfg, env) = config(&p, dir.path(), &p.info.clients.secret.client_secret);
    let out = sendbox(&["check", "--config", cfg.to_str().unwrap()], &env);
    let all = text(&out);
    assert!(out.status.success(), "{all}");
    assert!(all.contains("√ config"), "{all}");
    for account in ["app (alerts@example.com)", "cert (reports@example.com)"] {
        assert!(
            all.contains(&format!(
                "√ account {account}: token obtained, expires in 59 min"
            )),
            "{all}"
        );
        assert!(
            all.contains(&format!(
                "√ account {account}: SMTP localhost:{} TLS and XOAUTH2 login accepted",
                p.info.smtp_starttls_port
            )),
            "{all}"
        );
    }
    assert!(
        all.contains("√ account local (sendbox@localhost): writes .eml files"),
        "{all}"
    );
    assert!(p.messages().await.is_empty(), "check sends nothing");
    let tokens = p.tokens().await;
    assert_eq!(tokens.len(), 2);
    for secret in tokens.iter().chain([&p.info.clients.secret.client_secret]) {
        assert!(!all.contains(secret.as_str()), "a secret was printed");
    }
}

#[tokio::test]
async fn check_with_a_wrong_secret_fails_that_account_with_the_fix() {
    let p = Peers::start();
    let dir = tempfile::tempdir().unwrap();
    let (cfg, env) = config(&p, dir.path(), "wrong-secret");
    let out = sendbox(&["check", "--config", cfg.to_str().unwrap()], &env);
    let all = text(&out);
    assert_eq!(out.status.code(), Some(78), "{all}");
    assert!(all.contains("x account app (alerts@example.com): token: token endpoint refused the request: invalid_client"), "{all}");
    assert!(
        all.contains("check them against the provider's app registration"),
        "{all}"
    );
    assert!(
        all.contains("√ account cert"),
        "other accounts are still checked: {all}"
    );
    assert!(!all.contains("wrong-secret"));
}

#[tokio::test]
async fn send_test_delivers_through_smtp_and_into_files() {
    let p = Peers::start();
    let dir = tempfile::tempdir().unwrap();
    let (cfg, env) = config(&p, dir.path(), &p.info.clients.secret.client_secret);
    let cfg = cfg.to_str().unwrap();
    let out = sendbox(
        &[
            "send-test",
            "--config",
            cfg,
            "--account",
            "app",
            "--to",
            "ops@example.com",
        ],
        &env,
    );
    assert!(out.status.success(), "{}", text(&out));
    let got = p.messages().await;
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].to, ["ops@example.com"]);
    assert!(
        got[0]
            .raw
            .contains("Subject: sendbox test message from account app")
    );

    let out = sendbox(
        &[
            "send-test",
            "--config",
            cfg,
            "--account",
            "local",
            "--to",
            "ops@example.com",
        ],
        &env,
    );
    assert!(out.status.success(), "{}", text(&out));
    let files: Vec<_> = std::fs::read_dir(dir.path().join("mail"))
        .unwrap()
        .collect();
    assert_eq!(files.len(), 1);

    let out = sendbox(
        &[
            "send-test",
            "--config",
            cfg,
            "--account",
            "nope",
            "--to",
            "x@y.z",
        ],
        &env,
    );
    assert_eq!(out.status.code(), Some(78));
    assert!(text(&out).contains("no account named \"nope\""));
}

#[tokio::test]
async fn login_runs_the_device_flow_then_the_account_sends() {
    let p = Peers::start();
    let dir = tempfile::tempdir().unwrap();
    let cfg = delegated_config(&p, dir.path());
    let cfg_s = cfg.to_str().unwrap().to_owned();

    // Before login, check says what to do.
    let out = sendbox(&["check", "--config", &cfg_s], &[]);
    assert_eq!(out.status.code(), Some(78));
    assert!(
        text(&out).contains("run `sendbox login --config <file> delegated` once"),
        "{}",
        text(&out)
    );

    let mut child = Command::new(env!("CARGO_BIN_EXE_sendbox"))
        .args(["login", "--config", &cfg_s, "delegated"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            let _ = tx.send(line);
        }
    });
    let mut code = None;
    let mut shown = Vec::new();
    while code.is_none() {
        let line = rx
            .recv_timeout(std::time::Duration::from_secs(30))
            .unwrap_or_else(|_| panic!("login printed no code: {shown:?}"));
        if let Some(c) = line.strip_prefix("and enter the code: ") {
            code = Some(c.trim().to_owned());
        }
        shown.push(line);
    }
    assert!(
        shown[0].contains(&format!("open {}/device", p.info.issuer)),
        "{shown:?}"
    );
    p.approve_device(code.as_deref().unwrap()).await;
    let status = tokio::task::spawn_blocking(move || child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success());

    let token_file = dir.path().join("state/delegated.token.json");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&token_file).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
    }
    let before = std::fs::read_to_string(&token_file).unwrap();

    let out = sendbox(
        &[
            "send-test",
            "--config",
            &cfg_s,
            "--account",
            "delegated",
            "--to",
            "ops@example.com",
        ],
        &[],
    );
    assert!(out.status.success(), "{}", text(&out));
    let got = p.messages().await;
    assert_eq!(got[0].user.as_deref(), Some("operator@example.com"));
    // The send refreshed the token, and the rotated refresh token was saved.
    let after = std::fs::read_to_string(&token_file).unwrap();
    assert_ne!(before, after);
    assert!(
        !text(&out).contains(
            &serde_json::from_str::<serde_json::Value>(&after).unwrap()["refresh_token"]
                .as_str()
                .unwrap()
                .to_owned()
        )
    );
}

#[test]
fn config_errors_name_file_line_column_and_fix() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("bad.toml");
    std::fs::write(
        &cfg,
        "[accounts.m]\nprovider = \"microsoft365\"\nmailbox = \"a@contoso.com\"\ntenant = \"t\"\nclient_id = \"id\"\nclient_secret = \"hunter2\"\n",
    )
    .unwrap();
    let out = sendbox(
        &[
            "check",
            "--config",
            cfg.to_str().unwrap(),
            "--no-environment",
        ],
        &[],
    );
    assert_eq!(out.status.code(), Some(78));
    let all = text(&out);
    assert!(
        all.contains(
            "bad.toml:6:17: `accounts.m.client_secret`: secrets are not written into the config"
        ),
        "{all}"
    );
    assert!(!all.contains("hunter2"));
}
