//! The outbox on real SQLite files: one transaction per call, policy,
//! idempotency, suppression, crash recovery, group commit, a full disk.

use std::sync::Arc;

use sendbox_outbox::{Call, Outbox, OutboxError, Policy, State};
use sendbox_types::{Bytes, Email, StateChange};

fn email(to: &str, subject: &str) -> Email {
    Email {
        to: vec![to.into()],
        subject: subject.into(),
        text: Some("body".into()),
        ..Email::default()
    }
}

fn call(emails: Vec<Email>, state: Vec<StateChange>) -> Call {
    Call {
        plugin: "p".into(),
        trigger: "webhook".into(),
        event_id: "evt-1".into(),
        account: "alerts".into(),
        account_mailbox: "alerts@example.com".into(),
        policy: Policy::default(),
        emails,
        state_changes: state,
    }
}

fn set(key: &str, value: &str) -> StateChange {
    StateChange::Set {
        key: key.into(),
        value: Bytes(value.as_bytes().to_vec()),
    }
}

fn open() -> (tempfile::TempDir, Outbox) {
    let dir = tempfile::tempdir().unwrap();
    let outbox = Outbox::open(&dir.path().join("var/sendbox.db")).unwrap();
    (dir, outbox)
}

#[test]
fn a_call_commits_its_emails_and_state_together() {
    let (_d, outbox) = open();
    let done = outbox
        .commit(call(
            vec![email("a@x.org", "one"), email("b@x.org", "two")],
            vec![set("seen", "1")],
        ))
        .unwrap();
    assert_eq!(done.queued.len(), 2);
    assert_ne!(done.queued[0].message_id, done.queued[1].message_id);
    assert!(done.queued[0].message_id.ends_with("@example.com>"));
    let listed = outbox.list(Some(State::Queued), 10).unwrap();
    assert_eq!(listed.len(), 2);
    assert_eq!(outbox.state_get("p", "seen").unwrap(), Some(b"1".to_vec()));
    let trail = outbox.audit_trail(done.queued[0].id).unwrap();
    assert_eq!(trail[0].to, "queued");
    assert!(trail[0].detail.as_deref().unwrap().contains("evt-1"));
}

#[test]
fn a_policy_violation_queues_nothing_and_says_why() {
    let (_d, outbox) = open();
    let mut c = call(
        vec![
            email("ok@x.org", "fine"),
            email("ceo@competitor.com", "leak"),
        ],
        vec![set("k", "v")],
    );
    c.policy.allowed_recipients = vec!["*@x.org".into()];
    let err = outbox.commit(c).unwrap_err();
    match &err {
        OutboxError::Policy(m) => {
            assert!(
                m.contains("ceo@competitor.com is not in allowed_recipients"),
                "{m}"
            )
        }
        other => panic!("expected a policy error, got {other}"),
    }
    assert!(outbox.list(None, 10).unwrap().is_empty(), "nothing partial");
    assert_eq!(
        outbox.state_get("p", "k").unwrap(),
        None,
        "state not written"
    );

    let mut c = call(vec![email("ok@x.org", "x")], vec![]);
    c.emails[0].sender = Some("ceo@example.com".into());
    assert!(
        outbox
            .commit(c)
            .unwrap_err()
            .to_string()
            .contains("From ceo@example.com is not allowed")
    );
}

#[test]
fn a_refused_call_does_not_disturb_the_others_in_its_group() {
    let (_d, outbox) = open();
    let outbox = Arc::new(outbox);
    let handles: Vec<_> = (0..40)
        .map(|i| {
            let outbox = outbox.clone();
            std::thread::spawn(move || {
                let mut c = call(vec![email("a@x.org", &format!("n{i}"))], vec![]);
                if i % 4 == 0 {
                    c.policy.recipients_per_email = 0;
                }
                outbox.commit(c).is_ok()
            })
        })
        .collect();
    let ok = handles
        .into_iter()
        .map(|h| h.join().unwrap())
        .filter(|&b| b)
        .count();
    assert_eq!(ok, 30);
    assert_eq!(outbox.list(None, 100).unwrap().len(), 30);
}

#[test]
fn an_idempotency_key_seen_again_is_not_queued_twice() {
    let (_d, outbox) = open();
    let mut e = email("a@x.org", "alert");
    e.idempotency_key = Some("alert-42-firing".into());
    let first = outbox.commit(call(vec![e.clone()], vec![])).unwrap();
    let second = outbox.commit(call(vec![e.clone()], vec![])).unwrap();
    assert!(second.queued.is_empty());
    assert_eq!(second.duplicates, first.queued);
    // Another plugin may use the same key.
    let mut other = call(vec![e], vec![]);
    other.plugin = "q".into();
    assert_eq!(outbox.commit(other).unwrap().queued.len(), 1);
}

#[test]
fn suppressed_recipients_are_removed_at_enqueue() {
    let (_d, outbox) = open();
    outbox
        .suppress("Bounced@X.org", Some("hard bounce"))
        .unwrap();
    let mut e = email("bounced@x.org", "hi");
    e.cc = vec!["ok@x.org".into()];
    let done = outbox
        .commit(call(
            vec![e, email("Bounced <bounced@x.org>", "only")],
            vec![],
        ))
        .unwrap();
    assert_eq!(
        done.queued.len(),
        1,
        "the email left without recipients is skipped"
    );
    assert_eq!(done.suppressed, ["bounced@x.org", "bounced@x.org"]);
    let m = outbox.get(done.queued[0].id).unwrap();
    assert_eq!(m.recipients, "ok@x.org");
    assert!(outbox.unsuppress("bounced@x.org").unwrap());
    assert!(outbox.suppressions().unwrap().is_empty());
}

#[test]
fn an_hourly_rate_limit_refuses_the_excess() {
    let (_d, outbox) = open();
    let mut c = call(vec![email("a@x.org", "1"), email("a@x.org", "2")], vec![]);
    c.policy.emails_per_hour = Some(3);
    outbox.commit(c.clone()).unwrap();
    let err = outbox.commit(c).unwrap_err();
    assert!(err.to_string().contains("emails_per_hour = 3"), "{err}");
    assert_eq!(outbox.list(None, 10).unwrap().len(), 2);
}

#[test]
fn a_message_left_sending_by_a_crash_is_queued_again_with_its_message_id() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sendbox.db");
    let queued = {
        let outbox = Outbox::open(&path).unwrap();
        let done = outbox
            .commit(call(vec![email("a@x.org", "x")], vec![]))
            .unwrap();
        let claimed = outbox.claim("alerts", 10).unwrap();
        assert_eq!(claimed.len(), 1);
        assert_eq!(claimed[0].state, State::Sending);
        done.queued[0].clone()
        // Dropped here without marking: what a crash leaves behind.
    };
    let outbox = Outbox::open(&path).unwrap();
    assert_eq!(outbox.get(queued.id).unwrap().state, State::Sending);
    assert_eq!(outbox.recover().unwrap(), 1);
    let m = outbox.get(queued.id).unwrap();
    assert_eq!(m.state, State::Queued);
    assert_eq!(m.message_id, queued.message_id);
    let again = outbox.claim("alerts", 10).unwrap();
    assert_eq!(again[0].message_id, queued.message_id);
    assert_eq!(again[0].attempts, 2);
    let trail = outbox.audit_trail(queued.id).unwrap();
    assert!(trail.iter().any(|a| {
        a.detail
            .as_deref()
            .is_some_and(|d| d.contains("recovered after restart"))
    }));
}

#[test]
fn states_move_with_their_replies_on_record() {
    let (_d, outbox) = open();
    let done = outbox
        .commit(call(
            vec![email("a@x.org", "x"), email("b@x.org", "y")],
            vec![],
        ))
        .unwrap();
    let claimed = outbox.claim("alerts", 10).unwrap();
    assert_eq!(claimed.len(), 2);
    assert!(
        outbox.claim("alerts", 10).unwrap().is_empty(),
        "claimed once"
    );
    let (a, b) = (done.queued[0].id, done.queued[1].id);
    outbox.mark(a, State::Sent, None, "250 2.0.0 OK").unwrap();
    outbox
        .mark(
            b,
            State::Retry,
            Some(sendbox_outbox::now_ms() + 60_000),
            "451 4.3.0 later",
        )
        .unwrap();
    assert!(
        outbox.claim("alerts", 10).unwrap().is_empty(),
        "retry not due yet"
    );
    outbox
        .mark(b, State::Dead, None, "550 5.1.1 User unknown")
        .unwrap();
    let m = outbox.get(b).unwrap();
    assert_eq!(m.state, State::Dead);
    assert_eq!(m.last_reply.as_deref(), Some("550 5.1.1 User unknown"));
    outbox.retry_now(b).unwrap();
    assert_eq!(outbox.claim("alerts", 10).unwrap()[0].id, b);
    let trail: Vec<String> = outbox
        .audit_trail(b)
        .unwrap()
        .into_iter()
        .map(|e| e.to)
        .collect();
    assert_eq!(
        trail,
        ["queued", "sending", "retry", "dead", "queued", "sending"]
    );
    outbox.drop_message(a).unwrap();
    assert!(matches!(outbox.get(a), Err(OutboxError::NotFound(_))));
}

#[test]
fn concurrent_commits_are_all_stored() {
    let (_d, outbox) = open();
    let outbox = Arc::new(outbox);
    let threads: Vec<_> = (0..8)
        .map(|t| {
            let outbox = outbox.clone();
            std::thread::spawn(move || {
                for i in 0..100 {
                    outbox
                        .commit(call(
                            vec![email("a@x.org", &format!("{t}-{i}"))],
                            vec![set(&format!("k{t}"), &i.to_string())],
                        ))
                        .unwrap();
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    assert_eq!(outbox.list(None, 10_000).unwrap().len(), 800);
    assert_eq!(outbox.state_get("p", "k3").unwrap(), Some(b"99".to_vec()));
}

#[test]
fn a_full_disk_is_a_clear_error_and_nothing_unstored_is_acknowledged() {
    let (_d, outbox) = open();
    outbox
        .commit(call(vec![email("a@x.org", "fits")], vec![]))
        .unwrap();
    outbox.limit_pages_for_tests(1).unwrap();
    let mut big = email("a@x.org", "too big");
    big.text = Some("x".repeat(1 << 20));
    let err = outbox
        .commit(call(vec![big], vec![set("k", "v")]))
        .unwrap_err();
    assert!(matches!(err, OutboxError::Storage(_)), "{err}");
    assert!(err.to_string().contains("full"), "{err}");
    assert_eq!(outbox.list(None, 10).unwrap().len(), 1);
    assert_eq!(outbox.state_get("p", "k").unwrap(), None);
}

#[test]
fn an_unusable_path_names_the_file_and_the_fix() {
    let dir = tempfile::tempdir().unwrap();
    let blocker = dir.path().join("not-a-dir");
    std::fs::write(&blocker, "").unwrap();
    let err = Outbox::open(&blocker.join("sendbox.db")).unwrap_err();
    let text = err.to_string();
    assert!(text.contains("not-a-dir"), "{text}");
    assert!(text.contains("cannot create the folder"), "{text}");
}
