//! `sendbox outbox` and `sendbox suppress` through the real binary, on a
//! real SQLite outbox named by the config's `[daemon] store`.

use std::path::Path;
use std::process::{Command, Output};

use sendbox_outbox::{Call, Outbox, Policy, State};
use sendbox_types::Email;

fn sendbox(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_sendbox"))
        .args(args)
        .output()
        .expect("sendbox runs")
}

fn stdout(o: &Output) -> String {
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn setup(dir: &Path) -> (String, Outbox) {
    let cfg = dir.join("sendbox.toml");
    std::fs::write(
        &cfg,
        "[daemon]\nstore = \"state/outbox.db\"\n\n[accounts.local]\nprovider = \"file\"\nmailbox = \"sendbox@localhost\"\ndir = \"mail\"\n",
    )
    .unwrap();
    let outbox = Outbox::open(&dir.join("state/outbox.db")).unwrap();
    (cfg.to_str().unwrap().to_owned(), outbox)
}

fn queue(outbox: &Outbox, subject: &str) -> i64 {
    outbox
        .commit(Call {
            plugin: "file-alert".into(),
            trigger: "file".into(),
            event_id: "evt-7".into(),
            account: "local".into(),
            account_mailbox: "sendbox@localhost".into(),
            policy: Policy::default(),
            emails: vec![Email {
                to: vec!["ops@example.com".into()],
                subject: subject.into(),
                ..Email::default()
            }],
            state_changes: vec![],
            ..Default::default()
        })
        .unwrap()
        .queued[0]
        .id
}

#[test]
fn list_show_retry_and_drop() {
    let dir = tempfile::tempdir().unwrap();
    let (cfg, outbox) = setup(dir.path());
    let a = queue(&outbox, "disk full");
    let b = queue(&outbox, "cpu hot");
    outbox.claim("local", 1).unwrap();
    outbox
        .mark(a, State::Dead, None, "550 5.1.1 User unknown")
        .unwrap();

    let list = stdout(&sendbox(&["outbox", "list", "--config", &cfg]));
    assert!(
        list.contains("dead") && list.contains("\"disk full\""),
        "{list}"
    );
    assert!(
        list.contains("queued") && list.contains("\"cpu hot\""),
        "{list}"
    );
    let dead = stdout(&sendbox(&[
        "outbox", "list", "--config", &cfg, "--state", "dead", "--json",
    ]));
    let rows: Vec<serde_json::Value> = dead
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0]["id"], a);
    assert_eq!(rows[0]["last_reply"], "550 5.1.1 User unknown");

    let show = stdout(&sendbox(&[
        "outbox",
        "show",
        "--config",
        &cfg,
        &a.to_string(),
    ]));
    assert!(show.contains("state:       dead (attempts: 1)"), "{show}");
    assert!(
        show.contains("plugin:      file-alert (file event evt-7)"),
        "{show}"
    );
    assert!(
        show.contains("sending -> dead  550 5.1.1 User unknown"),
        "{show}"
    );

    let retried = stdout(&sendbox(&["outbox", "retry", "--config", &cfg, "--dead"]));
    assert!(retried.contains("queued 1 message(s)"), "{retried}");
    drop(outbox);
    let outbox = Outbox::open(&dir.path().join("state/outbox.db")).unwrap();
    assert_eq!(outbox.get(a).unwrap().state, State::Queued);

    stdout(&sendbox(&[
        "outbox",
        "drop",
        "--config",
        &cfg,
        &b.to_string(),
    ]));
    let missing = sendbox(&["outbox", "show", "--config", &cfg, &b.to_string()]);
    assert_eq!(missing.status.code(), Some(65));
    assert!(String::from_utf8_lossy(&missing.stderr).contains(&format!("no message with id {b}")));
}

#[test]
fn suppress_add_list_remove_and_enqueue_honours_it() {
    let dir = tempfile::tempdir().unwrap();
    let (cfg, outbox) = setup(dir.path());
    stdout(&sendbox(&[
        "suppress",
        "add",
        "--config",
        &cfg,
        "Ops@Example.com",
        "--reason",
        "left the company",
    ]));
    let list = stdout(&sendbox(&["suppress", "list", "--config", &cfg]));
    assert_eq!(list.trim(), "ops@example.com  (left the company)");
    // The suppression is honoured at enqueue.
    let done = outbox
        .commit(Call {
            plugin: "p".into(),
            trigger: "cli".into(),
            event_id: "e".into(),
            account: "local".into(),
            account_mailbox: "sendbox@localhost".into(),
            policy: Policy::default(),
            emails: vec![Email {
                to: vec!["ops@example.com".into()],
                subject: "x".into(),
                ..Email::default()
            }],
            state_changes: vec![],
            ..Default::default()
        })
        .unwrap();
    assert!(done.queued.is_empty());
    assert_eq!(done.suppressed, ["ops@example.com"]);
    let removed = stdout(&sendbox(&[
        "suppress",
        "remove",
        "--config",
        &cfg,
        "ops@example.com",
    ]));
    assert!(removed.contains("removed"), "{removed}");
    assert!(
        stdout(&sendbox(&["suppress", "list", "--config", &cfg]))
            .trim()
            .is_empty()
    );
}

#[test]
fn check_reports_an_account_whose_delivery_is_paused() {
    let dir = tempfile::tempdir().unwrap();
    let (cfg, outbox) = setup(dir.path());
    let ok = sendbox(&["check", "--config", &cfg, "--no-environment"]);
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stdout)
    );
    outbox
        .set_account_paused(
            "local",
            Some("Authentication failure (535 5.7.3): token rejected"),
        )
        .unwrap();
    let out = sendbox(&["check", "--config", &cfg, "--no-environment"]);
    assert_eq!(out.status.code(), Some(78));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("x account local: delivery is paused: Authentication failure (535 5.7.3)"),
        "{text}"
    );
}

#[test]
fn text_a_plugin_or_server_wrote_cannot_drive_the_terminal() {
    let dir = tempfile::tempdir().unwrap();
    let (cfg, outbox) = setup(dir.path());
    let id = queue(&outbox, "\u{1b}[2J\u{1b}]0;owned\u{7}subject");
    outbox.claim("local", 1).unwrap();
    outbox
        .mark(id, State::Dead, None, "550 \u{1b}[31mred\u{1b}[0m")
        .unwrap();
    for args in [
        vec!["outbox", "show", "--config", &cfg, &id.to_string()],
        vec!["outbox", "list", "--config", &cfg],
    ] {
        let args: Vec<&str> = args.iter().map(|s| &**s).collect();
        let out = stdout(&sendbox(&args));
        assert!(!out.contains('\u{1b}') && !out.contains('\u{7}'), "{out:?}");
        assert!(out.contains("subject"), "{out}");
    }
}

#[test]
fn prune_keeps_what_is_within_its_retention() {
    let dir = tempfile::tempdir().unwrap();
    let (cfg, outbox) = setup(dir.path());
    let sent = queue(&outbox, "sent long ago");
    let waiting = queue(&outbox, "still queued");
    outbox.claim("local", 1).unwrap();
    outbox.mark(sent, State::Sent, None, "250 ok").unwrap();
    // Sent just now: within the default 30 days.
    let out = stdout(&sendbox(&["outbox", "prune", "--config", &cfg]));
    assert!(out.contains("pruned 0 message(s)"), "{out}");
    // With keep_sent_days = 0 it goes; the queued one stays.
    let text = std::fs::read_to_string(&cfg).unwrap();
    std::fs::write(
        &cfg,
        text.replace("[daemon]\n", "[daemon]\nkeep_sent_days = 0\n"),
    )
    .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(5));
    let out = stdout(&sendbox(&["outbox", "prune", "--config", &cfg]));
    assert!(out.contains("pruned 1 message(s)"), "{out}");
    assert!(outbox.get(sent).is_err());
    assert_eq!(outbox.get(waiting).unwrap().state, State::Queued);
}
