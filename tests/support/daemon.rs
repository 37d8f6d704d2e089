//! Starts the real `sendbox run` binary on a config and watches its output:
//! the ready line on stdout (which carries the webhook address) and every
//! log line on stderr, kept so a test can wait for or grep what was logged.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A running daemon; killed when dropped.
pub struct Daemon {
    pub child: Child,
    /// `http://127.0.0.1:PORT`.
    pub base: String,
    /// The ready line.
    pub ready: String,
    logs: Arc<Mutex<String>>,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Daemon {
    /// Starts `sendbox run --config CONFIG` with `env` and waits for ready.
    pub fn start(config: &Path, env: &[(&str, &str)]) -> Daemon {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_sendbox"));
        cmd.args(["run", "--config"])
            .arg(config)
            .env("SENDBOX_LOG", "info");
        for (k, v) in env {
            cmd.env(k, v);
        }
        Daemon::spawn(cmd)
    }

    /// Starts a prepared `sendbox ... run` command and waits for ready.
    pub fn spawn(mut cmd: Command) -> Daemon {
        cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("sendbox starts");
        let logs = Arc::new(Mutex::new(String::new()));
        let stderr = child.stderr.take().expect("stderr piped");
        {
            let logs = logs.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                    eprintln!("[sendbox] {line}");
                    let mut l = logs.lock().unwrap();
                    l.push_str(&line);
                    l.push('\n');
                }
            });
        }
        let stdout = child.stdout.take().expect("stdout piped");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let line = rx
            .recv_timeout(Duration::from_secs(120))
            .expect("sendbox printed its ready line");
        let base = sendbox_test_support::webhook_base(&line);
        Daemon {
            child,
            base,
            ready: line,
            logs,
        }
    }

    /// Where SMTP listener `name` listens, from the ready line.
    pub fn smtp(&self, name: &str) -> std::net::SocketAddr {
        let marker = format!("smtp {name} on ");
        self.ready
            .split(", ")
            .find_map(|part| part.strip_prefix(&marker))
            .and_then(|a| a.trim().parse().ok())
            .unwrap_or_else(|| panic!("no listener {name} in {:?}", self.ready))
    }

    /// Everything logged so far.
    pub fn logs(&self) -> String {
        self.logs.lock().unwrap().clone()
    }

    /// How many log lines contain `needle`.
    pub fn count_logged(&self, needle: &str) -> usize {
        self.logs().lines().filter(|l| l.contains(needle)).count()
    }

    /// Waits until `needle` has been logged `n` times in all.
    pub fn wait_logged(&self, needle: &str, n: usize) {
        let start = Instant::now();
        while self.count_logged(needle) < n {
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "{needle:?} not logged {n} times; logs:\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    /// Waits for the `n`th (from 1) `reload done` line and returns it.
    pub fn reload_done(&self, n: usize) -> String {
        self.wait_logged("reload done", n);
        self.logs()
            .lines()
            .filter(|l| l.contains("reload done"))
            .nth(n - 1)
            .unwrap_or_default()
            .to_owned()
    }

    /// Sends SIGHUP: reload.
    pub fn hangup(&self) {
        let pid = self.child.id().to_string();
        let sent = Command::new("kill").args(["-HUP", &pid]).status();
        assert!(sent.is_ok_and(|s| s.success()), "kill -HUP {pid}");
    }

    /// Sends SIGTERM and waits (up to `limit`) for the exit.
    pub fn terminate(&mut self, limit: Duration) -> ExitStatus {
        self.signal("TERM", limit)
    }

    /// Sends SIGINT (Ctrl-C) and waits (up to `limit`) for the exit.
    pub fn interrupt(&mut self, limit: Duration) -> ExitStatus {
        self.signal("INT", limit)
    }

    fn signal(&mut self, name: &str, limit: Duration) -> ExitStatus {
        let pid = self.child.id().to_string();
        let sent = Command::new("kill")
            .args([&format!("-{name}"), &pid])
            .status();
        assert!(sent.is_ok_and(|s| s.success()), "kill -{name} {pid}");
        let start = Instant::now();
        loop {
            if let Some(s) = self.child.try_wait().expect("wait works") {
                return s;
            }
            assert!(start.elapsed() < limit, "sendbox did not stop in {limit:?}");
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    /// `GET /metrics`.
    pub async fn metrics(&self) -> String {
        reqwest::get(format!("{}/metrics", self.base))
            .await
            .expect("/metrics answers")
            .text()
            .await
            .expect("/metrics body")
    }

    /// POSTs `body` to `path`, signed the GitHub way with `secret` over
    /// `signed` (the body itself, unless a test forges one); returns the
    /// status and the JSON answer (`Null` when the answer is not JSON).
    pub async fn post_signed(
        &self,
        path: &str,
        secret: &str,
        signed: &[u8],
        body: Vec<u8>,
    ) -> (u16, serde_json::Value) {
        let r = reqwest::Client::new()
            .post(format!("{}{path}", self.base))
            .header("content-type", "application/json")
            .header("x-hub-signature-256", sign(secret, signed))
            .body(body)
            .send()
            .await
            .expect("the webhook answers");
        let status = r.status().as_u16();
        let text = r.text().await.unwrap_or_default();
        (
            status,
            serde_json::from_str(&text).unwrap_or(serde_json::Value::Null),
        )
    }

    /// POSTs `{}` to `path` with `Authorization: Bearer <token>`; returns
    /// the status.
    pub async fn post_bearer(&self, path: &str, token: &str) -> u16 {
        reqwest::Client::new()
            .post(format!("{}{path}", self.base))
            .bearer_auth(token)
            .body("{}")
            .send()
            .await
            .expect("the webhook answers")
            .status()
            .as_u16()
    }
}

/// Waits for an `.eml` file in `dir` containing `needle`; returns its text.
pub fn wait_for_mail(dir: &Path, needle: &str) -> String {
    let start = Instant::now();
    loop {
        if let Ok(entries) = std::fs::read_dir(dir) {
            for e in entries.flatten() {
                let p: PathBuf = e.path();
                if p.extension().is_some_and(|x| x == "eml")
                    && let Ok(text) = std::fs::read_to_string(&p)
                    && text.contains(needle)
                {
                    return text;
                }
            }
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "no mail containing {needle:?} in {}",
            dir.display()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Writes `contents` to `path` the way deploy tools do: a temporary file in
/// the same folder, then a rename over the old one.
pub fn replace_file(path: &Path, contents: &[u8]) {
    let tmp = path.with_extension("partial");
    std::fs::write(&tmp, contents).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// `[daemon]` for tests: a free port, the outbox in `var/`, and the
/// compiled-code cache shared by all tests.
pub fn daemon_section() -> String {
    format!(
        "[daemon]\nlisten = \"127.0.0.1:0\"\nstore = \"var/sendbox.db\"\ncache_dir = \"{}\"\n",
        sendbox_test_support::wasm::wasm_target_dir()
            .join("sendbox-cache")
            .display()
    )
}

/// An account named `local` that writes `.eml` files into `mail/`.
pub const FILE_ACCOUNT: &str = r#"
[accounts.local]
provider = "file"
mailbox = "sendbox@localhost"
dir = "mail"
"#;

/// The three example plugins on `account`, as the quickstart wires them:
/// file-alert watching `incoming/`, webhook-bridge on `/hooks/alerts`
/// (HMAC with the env var `SENDBOX_TEST_WEBHOOK_SECRET`), daily-digest on
/// `/hooks/digest` (that secret as bearer token) with a schedule every
/// second.
pub fn example_plugins(account: &str) -> String {
    let w = |n: &str| sendbox_test_support::wasm::example(n).display().to_string();
    format!(
        r#"
[plugins.file-alert]
wasm = "{fa}"
account = "{account}"
[plugins.file-alert.config]
to = "ops@example.com"
[[plugins.file-alert.watch]]
name = "incoming"
dir = "incoming"
exclude = ["*.tmp"]
debounce_ms = 200

[plugins.webhook-bridge]
wasm = "{wb}"
account = "{account}"
[plugins.webhook-bridge.config]
to = "oncall@example.com"
[plugins.webhook-bridge.webhook]
path = "/hooks/alerts"
secret = {{ env = "SENDBOX_TEST_WEBHOOK_SECRET" }}
concurrency = 64

[plugins.daily-digest]
wasm = "{dd}"
account = "{account}"
[plugins.daily-digest.config]
to = "team@example.com"
[plugins.daily-digest.webhook]
path = "/hooks/digest"
bearer_token = {{ env = "SENDBOX_TEST_WEBHOOK_SECRET" }}
[[plugins.daily-digest.schedule]]
name = "every-second"
cron = "* * * * * *"
"#,
        fa = w("file-alert"),
        wb = w("webhook-bridge"),
        dd = w("daily-digest"),
    )
}

/// Writes `sendbox.toml` into `dir`: [`daemon_section`] then `body`.
pub fn write_config(dir: &Path, body: &str) -> PathBuf {
    let path = dir.join("sendbox.toml");
    std::fs::write(&path, format!("{}{body}", daemon_section())).unwrap();
    path
}

/// Writes `sendbox.toml` into `dir`: the file account and the three
/// example plugins on it.
pub fn write_examples_config(dir: &Path) -> PathBuf {
    write_config(dir, &format!("{FILE_ACCOUNT}{}", example_plugins("local")))
}

/// `sha256=<hex>`: GitHub's `X-Hub-Signature-256` of `body` under `secret`.
pub fn sign(secret: &str, body: &[u8]) -> String {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret.as_bytes());
    format!(
        "sha256={}",
        hex::encode(ring::hmac::sign(&key, body).as_ref())
    )
}

/// The value of the sample `name{labels}` in Prometheus text, e.g.
/// `metric(&text, r#"sendbox_reloads_total{result="partial"}"#)`.
pub fn metric(text: &str, sample: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix(sample)?.strip_prefix(' ')?.parse().ok())
}
