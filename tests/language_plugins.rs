//! Python and JavaScript plugins (built from `plugins/webhook-bridge-py`
//! and `plugins/file-alert-js` by the test) in the running daemon, against
//! the real peers:
//!
//! - a signed webhook to the Python bridge is answered `202` and its email
//!   arrives at the SMTP server over STARTTLS with XOAUTH2; a payload it
//!   does not understand gets its `400`;
//! - a file dropped into the JavaScript file-alert's folder arrives as an
//!   email with the file attached;
//! - every misbehaviour a Python or JavaScript plugin can express (endless
//!   loop, memory growth, a huge outcome, an exception, a socket) is
//!   answered `500` with its reason while the other plugins keep serving,
//!   and the daemon's memory stays within the limits and returns after.

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

/// Resident memory of a process: anonymous (`RssAnon`: what it allocated,
/// not the compiled code it maps from files, whose pages are shared and
/// counted once per mapping) and at its peak (`VmHWM`), in bytes.
fn rss(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kb = |key: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .map(|kb| kb * 1024)
            .unwrap_or_else(|| panic!("{key} in /proc/{pid}/status"))
    };
    (kb("RssAnon:"), kb("VmHWM:"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_python_and_javascript_plugins_are_contained_by_the_daemon() {
    // A port the socket attack aims at: nothing may ever connect to it.
    let bait = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    bait.set_nonblocking(true).unwrap();
    let bait_addr = bait.local_addr().unwrap().to_string();
    let attacks: &[(&str, &str, &str)] = &[
        ("py", "loop", "CPU limit"),
        ("py", "memory", "memory"),
        ("py", "huge", "outcome_bytes"),
        ("py", "raise", "the plugin gave up on purpose"),
        (
            "py",
            "socket",
            "PermissionError: [Errno 2] Permission denied",
        ),
        ("js", "loop", "CPU limit"),
        ("js", "memory", "memory"),
        // Building 20 MiB of string in JavaScript outlasts the CPU limit
        // before the outcome limit is reached: stopped either way.
        ("js", "huge", "limit"),
        ("js", "throw", "the plugin gave up on purpose"),
    ];
    let py = wasm::python("tests/plugins/hostile-py");
    let js = wasm::javascript("tests/plugins/hostile-js");
    let dir = tempfile::tempdir().unwrap();
    let mut body = daemon::FILE_ACCOUNT.to_owned();
    let mut route = |name: &str, wasm: &std::path::Path, mode: &str| {
        body.push_str(&format!(
            r#"
[plugins.{name}]
wasm = "{wasm}"
account = "local"
[plugins.{name}.config]
mode = "{mode}"
addr = "{bait_addr}"
[plugins.{name}.webhook]
path = "/hooks/{name}"
unauthenticated = true
concurrency = 1
queue_ms = 30000
"#,
            wasm = wasm.display()
        ));
    };
    route("py-ok", &py, "ok");
    route("js-ok", &js, "ok");
    for (lang, mode, _) in attacks {
        route(
            &format!("{lang}-{mode}"),
            if *lang == "py" { &py } else { &js },
            mode,
        );
    }
    let config = daemon::write_config(dir.path(), &body);
    let d = Daemon::start(&config, &[]);
    let http = reqwest::Client::new();
    let post = |name: String| {
        let (http, base) = (http.clone(), d.base.clone());
        async move {
            let r = http
                .post(format!("{base}/hooks/{name}"))
                .body("{}")
                .send()
                .await
                .expect("the daemon answers");
            (r.status().as_u16(), r.text().await.unwrap_or_default())
        }
    };
    // A baseline: both interpreters have served one event.
    for ok in ["py-ok", "js-ok"] {
        assert_eq!(post(ok.into()).await.0, 202);
    }
    let (baseline, _) = rss(d.child.id());

    // Three of each attack at once (one runs per route, the rest wait),
    // while the well-behaved plugins keep being served.
    let pid = d.child.id();
    let sampler = std::thread::spawn(move || {
        let mut peak = 0;
        for _ in 0..400 {
            let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else {
                break;
            };
            if let Some(now) = status
                .lines()
                .find_map(|l| l.strip_prefix("RssAnon:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            {
                peak = peak.max(now * 1024);
            }
            std::thread::sleep(std::time::Duration::from_millis(25));
        }
        peak
    });
    let mut attacking = tokio::task::JoinSet::new();
    for _ in 0..3 {
        for (lang, mode, _) in attacks {
            let (name, answer) = (format!("{lang}-{mode}"), post(format!("{lang}-{mode}")));
            attacking.spawn(async move { (name, answer.await) });
        }
    }
    let mut served = 0;
    for _ in 0..5 {
        for ok in ["py-ok", "js-ok"] {
            let (status, text) = post(ok.into()).await;
            assert_eq!(status, 202, "{ok} during the attacks: {text}");
            served += 1;
        }
    }
    let mut answers = Vec::new();
    while let Some(done) = attacking.join_next().await {
        answers.push(done.unwrap());
    }
    let sampled_peak = sampler.join().unwrap();
    assert_eq!(answers.len(), 3 * attacks.len());
    for (name, (status, text)) in &answers {
        let (_, _, reason) = attacks
            .iter()
            .find(|(l, m, _)| format!("{l}-{m}") == *name)
            .unwrap();
        assert_eq!(*status, 500, "{name}: {text}");
        assert!(text.contains(reason), "{name}: {text}");
        assert!(
            text.len() < 10_000,
            "{name}: an answer of {} bytes",
            text.len()
        );
    }
    assert!(
        bait.accept().is_err(),
        "a Python plugin reached a socket on the host"
    );
    // Still serving, and holding no more than before the attacks (give
    // or take the allocator's slack).
    for ok in ["py-ok", "js-ok"] {
        assert_eq!(post(ok.into()).await.0, 202);
    }
    let (after, peak) = rss(d.child.id());
    eprintln!(
        "daemon anonymous RSS: {} MB before the attacks, {} MB peak while sampled (all RSS: {} MB peak since start, compiling included), {} MB after; {served} good events served during them",
        baseline >> 20,
        sampled_peak >> 20,
        peak >> 20,
        after >> 20
    );
    // At most one instance per attacked route at a time, each within its
    // 64 MiB memory limit.
    let bound = baseline + (attacks.len() as u64) * (64 << 20) + (64 << 20);
    assert!(
        sampled_peak < bound,
        "peak RSS {} MB over the bound {} MB",
        sampled_peak >> 20,
        bound >> 20
    );
    assert!(
        after < baseline + (128 << 20),
        "RSS {} MB after vs {} MB before: memory kept",
        after >> 20,
        baseline >> 20
    );
}
