//! `[listeners.NAME]`, the SMTP submission listener, end to end: the real
//! binary, real clients (Python's `smtplib`, `swaks`, `curl`), the real
//! OAuth2 and SMTP peers upstream (XOAUTH2 over STARTTLS).
//!
//! - a device logs in over STARTTLS; what arrives upstream has the body and
//!   MIME structure byte for byte as submitted, From rewritten to the
//!   account's mailbox, no Bcc header, the Message-ID kept;
//! - swaks (STARTTLS + AUTH LOGIN, and plain from an allowed network) and
//!   curl (implicit TLS + AUTH) submit too;
//! - open-relay checks: no login and no allowed network, a wrong password,
//!   a recipient outside the policy, AUTH in clear text from the network,
//!   commands smuggled after STARTTLS — nothing is relayed;
//! - failed logins lock the address out and never log the password;
//! - kill -9 after the `250`s: everything is delivered after a restart;
//! - 16 clients at once: every message exactly once; oversized messages
//!   from 16 clients at once are refused with memory bounded.

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::support::daemon::{self, Daemon};
use sendbox_test_support::peers::{self, Peers};

const PASSWORD: &str = "correct horse battery staple 7f3a";

fn client_script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/clients/submit.py")
}

/// `sendbox hash-password --user NAME`, the password on stdin.
fn users_file(dir: &Path, name: &str, password: &str) -> PathBuf {
    let mut child = Command::new(env!("CARGO_BIN_EXE_sendbox"))
        .args(["hash-password", "--user", name])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(format!("{password}\n").as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    let line = String::from_utf8(out.stdout).unwrap();
    assert!(
        line.starts_with(&format!("{name}:$pbkdf2-sha256$")),
        "{line}"
    );
    assert!(!line.contains(password));
    let path = dir.join("listener-users");
    std::fs::write(&path, line).unwrap();
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    path
}

/// A listener section: `extra` holds tls/users/networks/policy lines.
fn listener(name: &str, listen: &str, extra: &str) -> String {
    format!("\n[listeners.{name}]\nlisten = \"{listen}\"\naccount = \"app\"\n{extra}\n")
}

/// STARTTLS with the peers' localhost certificate, logins from `users`.
fn tls_lines(p: &Peers, users: &Path, mode: &str) -> String {
    format!(
        "tls = \"{mode}\"\ncertificate = \"{}\"\nprivate_key = \"{}\"\nusers_file = \"{}\"\n",
        p.info.leaf_cert_file.display(),
        p.info.leaf_key_file.display(),
        users.display()
    )
}

fn start(p: &Peers, dir: &Path, listeners: &str) -> Daemon {
    start_with_account(p, dir, &p.app_account(), listeners)
}

fn start_with_account(p: &Peers, dir: &Path, account: &str, listeners: &str) -> Daemon {
    let config = daemon::write_config(
        dir,
        &format!("shutdown_grace_secs = 30\n{account}{listeners}"),
    );
    let (var, secret) = p.app_env();
    Daemon::start(&config, &[(var, &secret)])
}

/// The Python client's arguments for user `scanner` over STARTTLS.
fn starttls_login(port: &str, ca: &str) -> Vec<String> {
    [
        "--port",
        port,
        "--starttls",
        "--cafile",
        ca,
        "--user",
        "scanner",
        "--password",
        PASSWORD,
    ]
    .map(String::from)
    .to_vec()
}

/// Runs the Python client; one JSON object per message.
fn submit<S: AsRef<std::ffi::OsStr>>(args: impl IntoIterator<Item = S>) -> Vec<serde_json::Value> {
    let out = Command::new("python3")
        .arg(client_script())
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("python3 is needed for these tests (apt install python3): {e}"));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// Waits until the SMTP peer has at least `n` messages whose subject
/// starts with `prefix`; returns them.
async fn wait_arrived(p: &Peers, prefix: &str, n: usize) -> Vec<peers::Received> {
    let start = Instant::now();
    loop {
        let got: Vec<_> = p
            .messages()
            .await
            .into_iter()
            .filter(|m| m.raw.contains(&format!("Subject: {prefix}")))
            .collect();
        if got.len() >= n {
            return got;
        }
        assert!(
            start.elapsed() < Duration::from_secs(90),
            "{} of {n} `{prefix}` messages arrived",
            got.len()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A line-by-line SMTP client on a plain socket: each command's reply
/// (all its lines).
struct Dialogue {
    reader: BufReader<TcpStream>,
    stream: TcpStream,
}

impl Dialogue {
    fn open(addr: SocketAddr) -> (Dialogue, String) {
        let stream = TcpStream::connect(addr).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let mut d = Dialogue {
            reader: BufReader::new(stream.try_clone().unwrap()),
            stream,
        };
        let greeting = d.reply();
        (d, greeting)
    }

    fn reply(&mut self) -> String {
        let mut all = String::new();
        loop {
            let mut line = String::new();
            if self.reader.read_line(&mut line).unwrap_or(0) == 0 {
                return all;
            }
            all.push_str(&line);
            if line.as_bytes().get(3) != Some(&b'-') {
                return all;
            }
        }
    }

    fn send(&mut self, command: &str) -> String {
        self.stream
            .write_all(format!("{command}\r\n").as_bytes())
            .unwrap();
        self.reply()
    }
}

fn b64(s: &str) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(s)
}

fn plain_auth(user: &str, password: &str) -> String {
    format!("AUTH PLAIN {}", b64(&format!("\0{user}\0{password}")))
}

/// The body (after the header's blank line) of a message.
fn body(raw: &[u8]) -> &[u8] {
    let at = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("a blank line");
    &raw[at + 4..]
}

fn header<'a>(raw: &'a str, name: &str) -> Vec<&'a str> {
    let head = raw.split("\r\n\r\n").next().unwrap_or("");
    head.split("\r\n")
        .filter(|l| {
            l.len() > name.len()
                && l[..name.len()].eq_ignore_ascii_case(name)
                && l.as_bytes()[name.len()] == b':'
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_logs_in_over_starttls_and_its_mail_arrives_through_xoauth2_as_sent() {
    let p = Peers::start();
    let dir = tempfile::tempdir().unwrap();
    let users = users_file(dir.path(), "scanner", PASSWORD);
    let d = start(
        &p,
        dir.path(),
        &listener("devices", "127.0.0.1:0", &tls_lines(&p, &users, "starttls")),
    );
    let addr = d.smtp("devices");
    let out = dir.path().join("sent");
    std::fs::create_dir(&out).unwrap();
    let port = addr.port().to_string();
    let ca = p.info.ca_file.display().to_string();
    let mut args = starttls_login(&port, &ca);
    args.extend(
        [
            "--to",
            "ops@example.com",
            "--bcc",
            "archive@example.com",
            "--count",
            "3",
            "--prefix",
            "scan",
            "--out",
        ]
        .map(String::from),
    );
    args.push(out.display().to_string());
    let results = submit(args);
    assert_eq!(results.len(), 3);
    assert!(results.iter().all(|r| r["ok"] == true), "{results:?}");

    let arrived = wait_arrived(&p, "scan-", 3).await;
    assert_eq!(arrived.len(), 3);
    for m in &arrived {
        let subject = header(&m.raw, "Subject")[0]
            .trim_start_matches("Subject: ")
            .to_owned();
        let sent = std::fs::read(out.join(format!("{subject}.eml"))).unwrap();
        let sent_text = String::from_utf8_lossy(&sent);
        // Through the account: XOAUTH2 as its mailbox, over TLS.
        assert_eq!(m.user.as_deref(), Some("alerts@example.com"));
        assert!(m.tls);
        assert_eq!(m.from.as_deref(), Some("alerts@example.com"));
        let mut to = m.to.clone();
        to.sort();
        assert_eq!(
            to,
            ["archive@example.com", "ops@example.com"],
            "Bcc stays in the envelope"
        );
        // The body and MIME structure exactly as submitted.
        assert_eq!(
            String::from_utf8_lossy(body(m.raw.as_bytes())),
            String::from_utf8_lossy(body(&sent)),
            "body of {subject}"
        );
        // Only what the account requires changed.
        assert_eq!(
            header(&m.raw, "From"),
            ["From: Scanner <alerts@example.com>"]
        );
        assert_eq!(
            header(&m.raw, "Reply-To"),
            ["Reply-To: scanner@office.example"]
        );
        assert!(header(&m.raw, "Bcc").is_empty(), "{}", m.raw);
        assert_eq!(
            header(&m.raw, "Message-ID"),
            header(&sent_text, "Message-ID")
        );
        assert_eq!(
            header(&m.raw, "Content-Type"),
            header(&sent_text, "Content-Type")
        );
    }
    // The outbox knows where they came from; the password is nowhere.
    let list = Command::new(env!("CARGO_BIN_EXE_sendbox"))
        .args(["outbox", "list", "--config"])
        .arg(dir.path().join("sendbox.toml"))
        .output()
        .unwrap();
    let list = String::from_utf8_lossy(&list.stdout);
    assert_eq!(list.matches("listener:devices").count(), 3, "{list}");
    assert!(!d.logs().contains(PASSWORD));
    assert!(
        d.logs().contains("login"),
        "the login is logged (without the password)"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn swaks_and_curl_submit_over_starttls_implicit_tls_and_from_an_allowed_network() {
    let p = Peers::start();
    let dir = tempfile::tempdir().unwrap();
    let users = users_file(dir.path(), "printer", PASSWORD);
    let listeners = format!(
        "{}{}{}",
        listener("office", "127.0.0.1:0", &tls_lines(&p, &users, "starttls")),
        listener("smtps", "127.0.0.1:0", &tls_lines(&p, &users, "implicit")),
        listener("lan", "127.0.0.1:0", "allow_networks = [\"127.0.0.1\"]\n"),
    );
    let d = start(&p, dir.path(), &listeners);
    let msg = |subject: &str| {
        format!(
            "From: printer@office.example\r\nTo: ops@example.com\r\nSubject: {subject}\r\n\r\nPage count 12.\r\n"
        )
    };

    // swaks: STARTTLS, AUTH LOGIN.
    let office = d.smtp("office");
    let swaks = |server: SocketAddr, extra: &[&str], subject: &str| {
        let data = msg(subject);
        let out = Command::new("swaks")
            .args([
                "--server",
                &server.ip().to_string(),
                "--port",
                &server.port().to_string(),
            ])
            .args([
                "--from",
                "printer@office.example",
                "--to",
                "ops@example.com",
                "--helo",
                "printer.office.example",
            ])
            .args(["--data", &data])
            .args(extra)
            .output()
            .unwrap_or_else(|e| panic!("swaks is needed for these tests (apt install swaks): {e}"));
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "swaks: {text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        text
    };
    let text = swaks(
        office,
        &[
            "--tls",
            "--auth",
            "LOGIN",
            "--auth-user",
            "printer",
            "--auth-password",
            PASSWORD,
        ],
        "via-swaks-tls",
    );
    assert!(text.contains("250 2.0.0 Queued as"), "{text}");
    // swaks, plain text, no login: the allowed network.
    let text = swaks(d.smtp("lan"), &[], "via-swaks-lan");
    assert!(text.contains("250 2.0.0 Queued as"), "{text}");

    // curl: implicit TLS (smtps://), AUTH, the certificate verified.
    let smtps = d.smtp("smtps");
    let mail = dir.path().join("curl.eml");
    std::fs::write(&mail, msg("via-curl-smtps")).unwrap();
    let out = Command::new("curl")
        .args(["--silent", "--show-error", "--cacert"])
        .arg(&p.info.ca_file)
        .args(["--url", &format!("smtps://localhost:{}", smtps.port())])
        .args(["--user", &format!("printer:{PASSWORD}")])
        .args([
            "--mail-from",
            "printer@office.example",
            "--mail-rcpt",
            "ops@example.com",
            "--upload-file",
        ])
        .arg(&mail)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "curl: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    for subject in ["via-swaks-tls", "via-swaks-lan", "via-curl-smtps"] {
        let got = wait_arrived(&p, subject, 1).await;
        assert!(got[0].raw.contains("Page count 12."), "{}", got[0].raw);
        assert_eq!(got[0].from.as_deref(), Some("alerts@example.com"));
    }
    assert!(!d.logs().contains(PASSWORD));
}

/// An address of this machine that is not loopback (clients from it count
/// as from the network).
fn non_loopback_ip() -> std::net::IpAddr {
    let s = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
    s.connect("192.0.2.1:9").unwrap();
    let ip = s.local_addr().unwrap().ip();
    assert!(
        !ip.is_loopback() && !ip.is_unspecified(),
        "this machine needs a non-loopback address for this test, got {ip}"
    );
    ip
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_client_can_never_relay() {
    let p = Peers::start();
    let dir = tempfile::tempdir().unwrap();
    let users = users_file(dir.path(), "scanner", PASSWORD);
    let extra = format!(
        "{}allow_networks = [\"192.0.2.0/24\"]\n[listeners.guarded.policy]\nallowed_recipients = [\"*@example.com\"]\n",
        tls_lines(&p, &users, "starttls")
    );
    let d = start(&p, dir.path(), &listener("guarded", "0.0.0.0:0", &extra));
    let port = d.smtp("guarded").port();
    let local = SocketAddr::from(([127, 0, 0, 1], port));

    // Not logged in, not in an allowed network: no transaction.
    let (mut c, greeting) = Dialogue::open(local);
    assert!(greeting.starts_with("220 "), "{greeting}");
    let ehlo = c.send("EHLO relay-test.example");
    assert!(
        ehlo.contains("AUTH PLAIN LOGIN") && ehlo.contains("STARTTLS"),
        "{ehlo}"
    );
    assert!(
        c.send("MAIL FROM:<spammer@evil.example>")
            .starts_with("530 5.7.0")
    );
    assert!(
        c.send("RCPT TO:<victim@elsewhere.example>")
            .starts_with("503")
    );
    // A wrong password changes nothing.
    assert!(
        c.send(&plain_auth("scanner", "wrong"))
            .starts_with("535 5.7.8")
    );
    assert!(
        c.send("MAIL FROM:<spammer@evil.example>")
            .starts_with("530 5.7.0")
    );
    // Logged in: recipients outside the policy are refused at RCPT,
    // classic relay tricks included.
    assert!(c.send(&plain_auth("scanner", PASSWORD)).starts_with("235"));
    assert!(
        c.send("MAIL FROM:<scanner@office.example>")
            .starts_with("250")
    );
    for trick in [
        "victim@elsewhere.example",
        "victim%elsewhere.example@example.com.evil",
        "@example.com:victim@elsewhere.example",
        "victim@elsewhere.example@example.com",
        "\"victim@elsewhere.example\"@example.com",
    ] {
        let r = c.send(&format!("RCPT TO:<{trick}>"));
        assert!(
            r.starts_with("550 5.7.1") || r.starts_with("553"),
            "{trick}: {r}"
        );
    }
    assert!(c.send("RCPT TO:<ops@example.com>").starts_with("250"));
    assert!(c.send("QUIT").starts_with("221"));

    // From the network (not loopback): no AUTH before TLS, no MAIL either.
    let (mut c, _) = Dialogue::open(SocketAddr::new(non_loopback_ip(), port));
    let ehlo = c.send("EHLO relay-test.example");
    assert!(
        ehlo.contains("STARTTLS") && !ehlo.contains("AUTH"),
        "{ehlo}"
    );
    assert!(
        c.send(&plain_auth("scanner", PASSWORD))
            .starts_with("538 5.7.11")
    );
    assert!(
        c.send("MAIL FROM:<scanner@office.example>")
            .starts_with("530 5.7.0 Must issue a STARTTLS")
    );
    // Commands smuggled behind STARTTLS are refused and the connection closed.
    c.stream
        .write_all(b"STARTTLS\r\nMAIL FROM:<x@evil.example>\r\n")
        .unwrap();
    let r = c.reply();
    assert!(r.starts_with("501"), "{r}");
    assert_eq!(c.reply(), "", "closed");

    // Nothing reached the outbox or the SMTP peer.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(p.messages().await.is_empty());
    let logs = d.logs();
    assert!(logs.contains("MAIL refused: not authenticated"), "{logs}");
    assert!(!logs.contains(PASSWORD));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_logins_lock_the_address_out_and_never_log_the_password() {
    let p = Peers::start();
    let dir = tempfile::tempdir().unwrap();
    let users = users_file(dir.path(), "scanner", PASSWORD);
    let extra = format!(
        "{}max_failed_logins = 3\n",
        tls_lines(&p, &users, "starttls")
    );
    let d = start(&p, dir.path(), &listener("devices", "127.0.0.1:0", &extra));
    let addr = d.smtp("devices");
    let (mut c, _) = Dialogue::open(addr);
    c.send("EHLO guesser.example");
    let guesses = ["hunter2-guess-a", "hunter2-guess-b", "hunter2-guess-c"];
    assert!(
        c.send(&plain_auth("scanner", guesses[0]))
            .starts_with("535")
    );
    // AUTH LOGIN counts too.
    assert!(c.send("AUTH LOGIN").starts_with("334"));
    assert!(c.send(&b64("scanner")).starts_with("334"));
    assert!(c.send(&b64(guesses[1])).starts_with("535"));
    let third = c.send(&plain_auth("scanner", guesses[2]));
    assert!(third.starts_with("421 4.7.0"), "{third}");
    assert_eq!(c.reply(), "", "closed");
    // The address is refused at connect now, even with the right password.
    let (_, greeting) = Dialogue::open(addr);
    assert!(
        greeting.starts_with("421 4.7.0 Too many failed logins"),
        "{greeting}"
    );

    d.wait_logged("login failed", 3);
    let logs = d.logs();
    for secret in guesses.iter().chain([&PASSWORD]) {
        assert!(!logs.contains(secret), "{secret} logged");
    }
    assert!(
        logs.lines()
            .filter(|l| l.contains("login failed"))
            .all(|l| l.contains("scanner"))
    );
}

/// `[accounts.app]` pointed at a port where nothing listens: messages stay
/// queued.
fn unreachable_account(p: &Peers) -> String {
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    p.app_account().replace(
        &format!("smtp_port = {}", p.info.smtp_starttls_port),
        &format!("smtp_port = {closed}"),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kill_9_after_the_250s_loses_nothing() {
    let p = Peers::start();
    let dir = tempfile::tempdir().unwrap();
    let users = users_file(dir.path(), "scanner", PASSWORD);
    let section = listener("devices", "127.0.0.1:0", &tls_lines(&p, &users, "starttls"));
    let mut d = start_with_account(&p, dir.path(), &unreachable_account(&p), &section);
    let port = d.smtp("devices").port().to_string();
    let ca = p.info.ca_file.display().to_string();
    let mut args = starttls_login(&port, &ca);
    args.extend(
        [
            "--to",
            "ops@example.com",
            "--count",
            "10",
            "--threads",
            "2",
            "--prefix",
            "durable",
        ]
        .map(String::from),
    );
    let results = submit(args);
    assert_eq!(
        results.iter().filter(|r| r["ok"] == true).count(),
        20,
        "{results:?}"
    );
    d.child.kill().unwrap(); // SIGKILL
    d.child.wait().unwrap();
    drop(d);
    assert!(p.messages().await.is_empty());

    let _d = start(&p, dir.path(), &section);
    let arrived = wait_arrived(&p, "durable-", 20).await;
    let mut subjects: Vec<String> = arrived
        .iter()
        .map(|m| header(&m.raw, "Subject")[0].to_owned())
        .collect();
    subjects.sort();
    subjects.dedup();
    assert_eq!(subjects.len(), 20, "each exactly once");
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(p.messages().await.len(), 20, "no duplicates");
}

/// The daemon's resident memory, in KiB.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixteen_clients_at_once_each_message_once_and_oversized_ones_refused_in_bounded_memory() {
    let p = Peers::start();
    let dir = tempfile::tempdir().unwrap();
    let extra = "allow_networks = [\"127.0.0.0/8\"]\nmax_connections_per_client = 32\n[listeners.lan.policy]\nmessage_bytes = 1048576\n";
    let d = start(&p, dir.path(), &listener("lan", "127.0.0.1:0", extra));
    let port = d.smtp("lan").port().to_string();
    let results = submit([
        "--port",
        &port,
        "--to",
        "ops@example.com",
        "--count",
        "4",
        "--threads",
        "16",
        "--prefix",
        "burst",
    ]);
    assert_eq!(
        results.iter().filter(|r| r["ok"] == true).count(),
        64,
        "{results:?}"
    );
    let arrived = wait_arrived(&p, "burst-", 64).await;
    let mut subjects: Vec<String> = arrived
        .iter()
        .map(|m| header(&m.raw, "Subject")[0].to_owned())
        .collect();
    subjects.sort();
    subjects.dedup();
    assert_eq!(subjects.len(), 64);

    // 16 clients each push 16 MiB at a 1 MiB limit.
    let before = rss_kib(d.child.id());
    let addr = d.smtp("lan");
    let pushers: Vec<_> = (0..16)
        .map(|_| {
            std::thread::spawn(move || {
                let (mut c, _) = Dialogue::open(addr);
                c.send("EHLO pusher.example");
                assert!(c.send("MAIL FROM:<a@example.com>").starts_with("250"));
                assert!(c.send("RCPT TO:<ops@example.com>").starts_with("250"));
                assert!(c.send("DATA").starts_with("354"));
                let line = format!("{}\r\n", "x".repeat(998));
                for _ in 0..(16 << 20) / line.len() {
                    c.stream.write_all(line.as_bytes()).unwrap();
                }
                c.send(".")
            })
        })
        .collect();
    for t in pushers {
        let r = t.join().unwrap();
        assert!(r.starts_with("552 5.3.4"), "{r}");
    }
    let after = rss_kib(d.child.id());
    eprintln!("daemon RSS before {before} KiB, after 16 x 16 MiB pushes {after} KiB");
    assert!(
        after < before + 64 * 1024,
        "RSS grew from {before} to {after} KiB"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        p.messages().await.len(),
        64,
        "nothing oversized was relayed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_screening_plugin_relays_replaces_drops_or_refuses_and_the_client_hears_it() {
    let p = Peers::start();
    let dir = tempfile::tempdir().unwrap();
    let plugin = format!(
        "\n[plugins.screen]\nwasm = \"{}\"\naccount = \"app\"\n[plugins.screen.config]\nrefuse_from = \"noisy@office.example\"\ndrop_subject = \"toner low\"\ntidy_to = \"scans@example.com\"\n",
        sendbox_test_support::wasm::example("device-screen").display()
    );
    let section = listener(
        "lan",
        "127.0.0.1:0",
        "allow_networks = [\"127.0.0.1\"]\nplugin = \"screen\"\n",
    );
    let d = start(&p, dir.path(), &format!("{plugin}{section}"));
    let addr = d.smtp("lan");
    let send = |from: &str, subject: &str| {
        let (mut c, _) = Dialogue::open(addr);
        c.send("EHLO device.example");
        assert!(c.send(&format!("MAIL FROM:<{from}>")).starts_with("250"));
        assert!(c.send("RCPT TO:<ops@example.com>").starts_with("250"));
        assert!(c.send("DATA").starts_with("354"));
        c.send(&format!(
            "From: {from}\r\nTo: ops@example.com\r\nSubject: {subject}\r\n\r\nhello\r\n."
        ))
    };
    // Refused: the plugin's code and text reach the client.
    let r = send("noisy@office.example", "anything");
    assert!(
        r.starts_with("550 5.7.1 noisy@office.example may not send through this relay"),
        "{r}"
    );
    // Dropped: accepted, nothing sent, its state write committed.
    let r = send("printer@office.example", "Toner low");
    assert!(
        r.starts_with("250 2.0.0 Accepted; the screening plugin sent nothing"),
        "{r}"
    );
    // Relayed as sent.
    let r = send("printer@office.example", "screened-relay");
    assert!(r.starts_with("250 2.0.0 Queued as"), "{r}");
    // Replaced: a scan with an attachment becomes a tidy notification.
    let port = addr.port().to_string();
    let results = submit([
        "--port",
        &port,
        "--to",
        "ops@example.com",
        "--prefix",
        "screened-scan",
    ]);
    assert!(results.iter().all(|r| r["ok"] == true), "{results:?}");

    let relayed = wait_arrived(&p, "screened-relay", 1).await;
    assert!(relayed[0].raw.contains("hello"));
    let tidy = wait_arrived(&p, "Scan from 127.0.0.1", 1).await;
    assert_eq!(tidy[0].to, ["scans@example.com"]);
    assert!(
        tidy[0].raw.contains("filename=\"screened-scan-0-0.pdf\""),
        "{}",
        tidy[0].raw
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        p.messages().await.len(),
        2,
        "the refused and the dropped messages went nowhere"
    );
    let outbox = sendbox_outbox::Outbox::open(&dir.path().join("var/sendbox.db")).unwrap();
    assert_eq!(
        outbox
            .plugin_state_get("screen", "dropped")
            .unwrap()
            .map(|(v, _)| v),
        Some(b"1".to_vec())
    );
}

/// `sendbox_delivery_attempts_total{account="app",result=RESULT}`.
async fn attempts(d: &Daemon, result: &str) -> u64 {
    let needle = format!("sendbox_delivery_attempts_total{{account=\"app\",result=\"{result}\"}} ");
    d.metrics()
        .await
        .lines()
        .find_map(|l| l.strip_prefix(&needle).and_then(|n| n.trim().parse().ok()))
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_account_ignores_new_mail_until_a_reload_says_try_now() {
    let p = Peers::start();
    let dir = tempfile::tempdir().unwrap();
    let config = daemon::write_config(
        dir.path(),
        &format!(
            "{}{}",
            p.app_account(),
            listener("lan", "127.0.0.1:0", "allow_networks = [\"127.0.0.1\"]\n")
        ),
    );
    // The wrong client secret: the first send pauses the account.
    let d = Daemon::start(&config, &[("SENDBOX_TEST_APP_SECRET", "not-the-secret")]);
    let port = d.smtp("lan").port().to_string();
    let submitted = submit([
        "--port",
        &port,
        "--to",
        "ops@example.com",
        "--prefix",
        "paused-first",
    ]);
    assert!(submitted.iter().all(|r| r["ok"] == true));
    let start = Instant::now();
    while attempts(&d, "account_refused").await == 0 {
        assert!(start.elapsed() < Duration::from_secs(30), "never paused");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let paused = attempts(&d, "account_refused").await;
    // 20 more messages over two seconds: all accepted, none tried.
    let more = submit([
        "--port",
        &port,
        "--to",
        "ops@example.com",
        "--count",
        "20",
        "--prefix",
        "paused-more",
    ]);
    assert_eq!(more.iter().filter(|r| r["ok"] == true).count(), 20);
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        attempts(&d, "account_refused").await,
        paused,
        "new mail does not end a pause"
    );
    // A reload does: the worker tries (and is refused) again at once.
    d.hangup();
    let start = Instant::now();
    while attempts(&d, "account_refused").await == paused {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "the reload did not resume the account"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(p.messages().await.is_empty());
}

/// Connects from another loopback address; the greeting.
async fn greeting_from(ip: [u8; 4], to: SocketAddr) -> (tokio::net::TcpStream, String) {
    use tokio::io::AsyncReadExt;
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind(SocketAddr::from((ip, 0))).unwrap();
    let mut stream = socket.connect(to).await.unwrap();
    let mut buf = vec![0u8; 512];
    let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf))
        .await
        .expect("a greeting within 5 s")
        .unwrap_or(0);
    (stream, String::from_utf8_lossy(&buf[..n]).into_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_caps_and_the_command_timeout_hold_under_a_flood() {
    let p = Peers::start();
    let dir = tempfile::tempdir().unwrap();
    let extra = "allow_networks = [\"127.0.0.0/8\"]\nmax_connections = 4\nmax_connections_per_client = 3\ncommand_timeout_secs = 1\n";
    let d = start(&p, dir.path(), &listener("lan", "127.0.0.1:0", extra));
    let addr = d.smtp("lan");

    // Three from one address are served; the fourth is refused at once.
    let held: Vec<_> = (0..3).map(|_| Dialogue::open(addr)).collect();
    assert!(held.iter().all(|(_, g)| g.starts_with("220 ")));
    let (_, fourth) = Dialogue::open(addr);
    assert!(
        fourth.starts_with("421 4.7.0 Too many connections from your address"),
        "{fourth}"
    );
    // The overall cap counts every address: from 127.0.0.2 the fourth is
    // served, from 127.0.0.3 the fifth is refused.
    let (_second_address, g) = greeting_from([127, 0, 0, 2], addr).await;
    assert!(g.starts_with("220 "), "{g}");
    let (_, g) = greeting_from([127, 0, 0, 3], addr).await;
    assert!(
        g.starts_with("421 4.7.0 Too many connections; try again later"),
        "{g}"
    );

    // An idle client is dropped after the command timeout, freeing its slot.
    let (mut idle, _) = held.into_iter().next().unwrap();
    let r = idle.reply();
    assert!(
        r.starts_with("421 4.4.2 Timeout waiting for a command"),
        "{r}"
    );
    assert_eq!(idle.reply(), "", "closed");

    // A flood of 500 connections kept open (the first three timed out by
    // now): exactly 3 are served, 497 refused, and the daemon holds none
    // of those.
    let mut flood = Vec::new();
    let before = rss_kib(d.child.id());
    let (mut served, mut refused) = (0, 0);
    for _ in 0..500 {
        let s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut line = String::new();
        let _ = BufReader::new(s.try_clone().unwrap()).read_line(&mut line);
        if line.starts_with("220 ") {
            served += 1;
        } else if line.starts_with("421 4.7.0 Too many connections") {
            refused += 1;
        }
        flood.push(s);
    }
    let after = rss_kib(d.child.id());
    eprintln!("daemon RSS before {before} KiB, after a flood of 500 connections {after} KiB");
    assert_eq!((served, refused), (3, 497));
    assert!(
        after < before + 16 * 1024,
        "RSS grew from {before} to {after} KiB"
    );
    drop(flood);
    // Every slot came back: a fresh client is served.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let (mut c, greeting) = Dialogue::open(addr);
    assert!(greeting.starts_with("220 "), "{greeting}");
    assert!(c.send("QUIT").starts_with("221"));
}
