//! Starts the real protocol peers (`tests/peers/peers.mjs`): an OAuth2
//! server (oidc-provider) and SMTP servers (smtp-server) with STARTTLS,
//! implicit TLS and no TLS, all on loopback with fresh ports, plus a control
//! API. Each `Peers` is its own process, killed on drop.
//!
//! A missing Node.js or `npm ci` fails the test loudly with the fix.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde::Deserialize;

/// The addresses and credentials the peers print when ready.
#[derive(Debug, Clone, Deserialize)]
pub struct Info {
    pub issuer: String,
    pub token_endpoint: String,
    pub device_endpoint: String,
    pub smtp_starttls_port: u16,
    pub smtp_implicit_tls_port: u16,
    pub smtp_no_starttls_port: u16,
    pub control: String,
    pub ca_file: PathBuf,
    pub client_key_file: PathBuf,
    pub client_cert_file: PathBuf,
    /// A certificate for localhost and 127.0.0.1 signed by `ca_file`, and
    /// its key: for a sendbox listener under test.
    pub leaf_cert_file: PathBuf,
    pub leaf_key_file: PathBuf,
    pub clients: Clients,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Clients {
    pub secret: SecretClient,
    pub cert: PublicClient,
    pub device: PublicClient,
}

#[derive(Debug, Clone, Deserialize)]
pub struct SecretClient {
    pub client_id: String,
    pub client_secret: String,
}

#[derive(Debug, Clone, Deserialize)]
pub struct PublicClient {
    pub client_id: String,
}

/// A message the SMTP peer accepted.
#[derive(Debug, Clone, Deserialize)]
pub struct Received {
    pub id: u64,
    pub user: Option<String>,
    pub from: Option<String>,
    pub to: Vec<String>,
    pub raw: String,
    pub tls: bool,
    /// When the peer accepted it (ms since the epoch, the peer's clock).
    pub at_ms: i64,
}

/// Counters from the peers.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Stats {
    pub auth_attempts: u64,
    pub token_requests: u64,
    pub max_connections: u64,
    pub active_connections: u64,
    /// Most authenticated connections open at once, per mailbox.
    pub max_connections_by_user: std::collections::HashMap<String, u64>,
    /// Messages the SMTP peer has received since the last reset.
    pub messages: u64,
    /// Mail transactions begun (MAIL FROM commands) since the last reset.
    pub mail_commands: u64,
    /// Of those, the ones whose MAIL FROM arrived in one read with a
    /// RCPT TO: the client pipelined them.
    pub pipelined_transactions: u64,
    /// Of those, the ones whose MAIL FROM arrived in one read right after
    /// the end of the previous message's content: the client wrote the
    /// next envelope behind the content.
    pub pipelined_after_content: u64,
}

pub struct Peers {
    child: Child,
    pub info: Info,
    http: reqwest::Client,
}

impl Drop for Peers {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn peers_dir() -> PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/peers")
}

impl Peers {
    /// Starts the peers with access tokens living `ttl_secs`.
    pub fn start_with_ttl(ttl_secs: u64) -> Peers {
        let dir = peers_dir();
        if !dir.join("node_modules/smtp-server").exists()
            || !dir.join("node_modules/oidc-provider").exists()
        {
            panic!(
                "the test peers are not installed: run `npm ci --prefix tests/peers` \
                 (scripts/test.sh does this)"
            );
        }
        let mut child = Command::new("node")
            .arg(dir.join("peers.mjs"))
            .env("ACCESS_TOKEN_TTL", ttl_secs.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start node (is Node.js 20+ installed?): {e}"));
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut reader = BufReader::new(stdout);
            let mut line = String::new();
            let _ = reader.read_line(&mut line);
            let _ = tx.send(line);
            // Keep draining so a stray write never fails with EPIPE.
            let _ = std::io::copy(&mut reader, &mut std::io::sink());
        });
        let line = rx
            .recv_timeout(Duration::from_secs(60))
            .unwrap_or_else(|_| panic!("the test peers did not start within 60 s"));
        let info: Info = serde_json::from_str(&line)
            .unwrap_or_else(|e| panic!("the test peers printed {line:?}: {e}"));
        Peers {
            child,
            info,
            http: reqwest::Client::new(),
        }
    }

    /// `[accounts.app]`: the client-secret client sending as
    /// `alerts@example.com` through the STARTTLS server (at most 3
    /// connections), its secret read from the env var
    /// `SENDBOX_TEST_APP_SECRET` (see [`Peers::app_env`]).
    pub fn app_account(&self) -> String {
        format!(
            r#"
[accounts.app]
provider = "generic"
mailbox = "alerts@example.com"
client_id = "{id}"
client_secret = {{ env = "SENDBOX_TEST_APP_SECRET" }}
token_url = "{token}"
scopes = ["smtp"]
smtp_host = "localhost"
smtp_port = {port}
ca_file = "{ca}"
max_connections = 3
"#,
            id = self.info.clients.secret.client_id,
            token = self.info.token_endpoint,
            port = self.info.smtp_starttls_port,
            ca = self.info.ca_file.display(),
        )
    }

    /// The env var [`Peers::app_account`] reads its secret from.
    pub fn app_env(&self) -> (&'static str, String) {
        (
            "SENDBOX_TEST_APP_SECRET",
            self.info.clients.secret.client_secret.clone(),
        )
    }

    /// Starts the peers with hour-long tokens.
    pub fn start() -> Peers {
        Self::start_with_ttl(3600)
    }

    async fn get<T: serde::de::DeserializeOwned>(&self, path: &str) -> T {
        let text = self
            .http
            .get(format!("{}{path}", self.info.control))
            .send()
            .await
            .expect("control API answers")
            .text()
            .await
            .expect("control API body");
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("control {path}: {e}: {text}"))
    }

    async fn post(&self, path: &str, body: serde_json::Value) -> serde_json::Value {
        let res = self
            .http
            .post(format!("{}{path}", self.info.control))
            .body(body.to_string())
            .send()
            .await
            .expect("control API answers");
        let status = res.status();
        let text = res.text().await.expect("control API body");
        assert!(status.is_success(), "control {path}: {status} {text}");
        serde_json::from_str(&text).unwrap_or(serde_json::Value::Null)
    }

    /// Messages the SMTP peer accepted so far.
    pub async fn messages(&self) -> Vec<Received> {
        self.get("/messages").await
    }

    /// Counters.
    pub async fn stats(&self) -> Stats {
        self.get("/stats").await
    }

    /// Every access token the SMTP peer was shown.
    pub async fn tokens(&self) -> Vec<String> {
        self.get("/tokens").await
    }

    /// Scripted replies: `[{"stage": "rcpt", "code": 451, "message": "4.3.0 later", "count": 2}]`.
    pub async fn faults(&self, faults: serde_json::Value) {
        self.post("/faults", serde_json::json!({ "faults": faults }))
            .await;
    }

    /// How a bad token is refused: `challenge` (334 then 535, Gmail) or
    /// `direct` (535 5.7.3, Microsoft).
    pub async fn auth_style(&self, style: &str) {
        self.post("/auth-style", serde_json::json!({ "style": style }))
            .await;
    }

    /// Whether the SMTP servers offer PIPELINING to the next EHLO (they
    /// do until told otherwise, and again after a reset).
    pub async fn offer_pipelining(&self, offer: bool) {
        self.post("/pipelining", serde_json::json!({ "offer": offer }))
            .await;
    }

    /// Makes the OAuth server answer 503 (or come back).
    pub async fn oauth_down(&self, down: bool) {
        self.post("/oauth-down", serde_json::json!({ "down": down }))
            .await;
    }

    /// Revokes the last access token the SMTP peer saw.
    pub async fn revoke_last_token(&self) {
        self.post("/revoke-last-token", serde_json::json!({})).await;
    }

    /// Approves a device login through the provider's pages.
    pub async fn approve_device(&self, user_code: &str) {
        let r = self
            .post(
                "/approve-device",
                serde_json::json!({ "user_code": user_code }),
            )
            .await;
        assert_eq!(r["ok"], true, "{r}");
    }

    /// Clears messages, faults and counters.
    pub async fn reset(&self) {
        self.post("/reset", serde_json::json!({})).await;
    }
}
