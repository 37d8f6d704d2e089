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
        ..Default::default()
    }
}

fn set(key: &str, value: &str) -> StateChange {
    StateChange::Set {
        key: key.into(),
        value: Bytes(value.as_bytes().to_vec()),
    }
}

fn value(outbox: &Outbox, key: &str) -> Option<Vec<u8>> {
    outbox.state_get("p", key).unwrap().map(|(v, _)| v)
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
    assert_eq!(value(&outbox, "seen"), Some(b"1".to_vec()));
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
    assert_eq!(value(&outbox, "k"), None, "state not written");

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
    outbox.lock_for_delivery("test").unwrap();
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
    // A result for a message no longer being sent is refused.
    assert!(matches!(
        outbox.mark(b, State::Dead, None, "stale"),
        Err(OutboxError::WrongState { .. })
    ));
    outbox.retry_now(b).unwrap();
    assert_eq!(outbox.claim("alerts", 10).unwrap()[0].id, b);
    // The operator cannot yank a message out of a worker's hands.
    assert!(matches!(
        outbox.retry_now(b),
        Err(OutboxError::WrongState { .. })
    ));
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
        [
            "queued", "sending", "retry", "queued", "sending", "dead", "queued", "sending"
        ]
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
    assert_eq!(value(&outbox, "k3"), Some(b"99".to_vec()));
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
    assert_eq!(value(&outbox, "k"), None);
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

fn with_reads(mut c: Call, keys: &[(&str, u64)], prefixes: &[(&str, &[&str])]) -> Call {
    for (k, v) in keys {
        c.reads.keys.insert(k.to_string(), *v);
    }
    for (p, listed) in prefixes {
        c.reads.prefixes.insert(
            p.to_string(),
            listed.iter().map(|s| s.to_string()).collect(),
        );
    }
    c
}

fn version(outbox: &Outbox, key: &str) -> u64 {
    outbox.state_get("p", key).unwrap().map_or(0, |(_, v)| v)
}

#[test]
fn a_call_whose_reads_changed_commits_nothing() {
    let (_d, outbox) = open();
    outbox.commit(call(vec![], vec![set("n", "1")])).unwrap();
    let seen = version(&outbox, "n");
    assert!(seen > 0);
    // Two calls both read n at `seen` and write n + 1: the first commits,
    // the second's read is stale and nothing of it is stored.
    let first = with_reads(call(vec![], vec![set("n", "2")]), &[("n", seen)], &[]);
    outbox.commit(first).unwrap();
    let second = with_reads(
        call(vec![email("a@x.org", "stale")], vec![set("n", "2")]),
        &[("n", seen)],
        &[],
    );
    assert!(matches!(
        outbox.commit(second),
        Err(OutboxError::Conflict(_))
    ));
    assert!(outbox.list(None, 10).unwrap().is_empty(), "no email stored");
    assert!(version(&outbox, "n") > seen);

    // Absent when read, present at commit: a conflict too.
    outbox.commit(call(vec![], vec![set("late", "x")])).unwrap();
    let absent = with_reads(call(vec![], vec![]), &[("late", 0)], &[]);
    assert!(matches!(
        outbox.commit(absent),
        Err(OutboxError::Conflict(_))
    ));
    // A key deleted and written again gets a new version: never the old.
    let v = version(&outbox, "late");
    outbox
        .commit(call(
            vec![],
            vec![StateChange::Delete { key: "late".into() }],
        ))
        .unwrap();
    outbox.commit(call(vec![], vec![set("late", "x")])).unwrap();
    assert!(version(&outbox, "late") > v);

    // Listings: a key added under a listed prefix is a conflict.
    outbox.commit(call(vec![], vec![set("e/1", "a")])).unwrap();
    let listed = with_reads(call(vec![], vec![]), &[], &[("e/", &["e/1"])]);
    outbox.commit(listed.clone()).unwrap();
    outbox.commit(call(vec![], vec![set("e/2", "b")])).unwrap();
    assert!(matches!(
        outbox.commit(listed),
        Err(OutboxError::Conflict(_))
    ));
    // A key outside the prefix does not disturb it.
    let listed = with_reads(call(vec![], vec![]), &[], &[("e/", &["e/1", "e/2"])]);
    outbox.commit(call(vec![], vec![set("f", "c")])).unwrap();
    outbox.commit(listed).unwrap();
}

#[test]
fn usage_is_counted_in_bytes_and_the_quota_holds_at_commit() {
    let (_d, outbox) = open();
    // Three two-byte characters and a value of four bytes: 10 bytes.
    outbox
        .commit(call(vec![], vec![set("ééé", "abcd")]))
        .unwrap();
    assert_eq!(outbox.state_usage("p").unwrap(), 10);
    let mut c = call(vec![], vec![set("k", "0123456789")]);
    c.state_quota_bytes = Some(20);
    // 10 + 11 = 21 bytes: over the quota, whatever the plugin saw.
    assert!(matches!(
        outbox.commit(c.clone()),
        Err(OutboxError::Conflict(_))
    ));
    assert_eq!(outbox.state_usage("p").unwrap(), 10);
    c.state_changes = vec![set("k", "012345678")];
    outbox.commit(c).unwrap();
    assert_eq!(outbox.state_usage("p").unwrap(), 20);
    // Shrinking is always allowed, and counted.
    let mut c = call(
        vec![],
        vec![StateChange::Delete {
            key: "ééé".into()
        }],
    );
    c.state_quota_bytes = Some(1);
    outbox.commit(c).unwrap();
    assert_eq!(outbox.state_usage("p").unwrap(), 10);
}

#[test]
fn one_process_delivers_from_a_database_and_is_named_to_the_next() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("outbox.db");
    let first = Outbox::open(&path).unwrap();
    let second = Outbox::open(&path).unwrap();
    // Without the lock, nobody may requeue another's messages.
    assert!(second.recover().is_err());
    first.lock_for_delivery("sendbox run").unwrap();
    match second.lock_for_delivery("sendbox deliver") {
        Err(OutboxError::Locked { holder, .. }) => {
            assert!(holder.contains("sendbox run"), "{holder}");
            assert!(
                holder.contains(&format!("pid {}", std::process::id())),
                "{holder}"
            );
        }
        other => panic!("expected Locked, got {other:?}"),
    }
    drop(first);
    second.lock_for_delivery("sendbox deliver").unwrap();
    assert_eq!(second.recover().unwrap(), 0);
}

#[test]
fn finished_messages_and_old_keys_are_pruned_and_counts_stay_exact() {
    let (_d, outbox) = open();
    let mut keyed = email("a@x.org", "keyed");
    keyed.idempotency_key = Some("k1".into());
    let done = outbox
        .commit(call(
            vec![keyed, email("b@x.org", "2"), email("c@x.org", "3")],
            vec![],
        ))
        .unwrap();
    let ids: Vec<i64> = done.queued.iter().map(|q| q.id).collect();
    outbox.claim("alerts", 2).unwrap();
    outbox.mark(ids[0], State::Sent, None, "250 ok").unwrap();
    outbox.mark(ids[1], State::Dead, None, "550 no").unwrap();
    let depth = |o: &Outbox| {
        let mut d = o.depth().unwrap();
        d.sort_by_key(|(s, _)| s.as_str());
        d
    };
    assert_eq!(
        depth(&outbox),
        [(State::Dead, 1), (State::Queued, 1), (State::Sent, 1)]
    );

    let prune_before = |offset_ms: i64| {
        let at = sendbox_outbox::now_ms() + offset_ms;
        outbox
            .prune(sendbox_outbox::PruneBefore {
                sent_ms: at,
                dead_ms: at,
                idempotency_ms: at,
            })
            .unwrap()
    };
    // Cutoffs in the past: nothing is old enough.
    assert_eq!(prune_before(-3_600_000), sendbox_outbox::Pruned::default());
    // Cutoffs ahead: sent and dead go with their history; queued stays.
    let pruned = prune_before(3_600_000);
    assert_eq!(pruned.messages, 2);
    assert_eq!(pruned.idempotency_keys, 1);
    assert!(outbox.audit_trail(ids[0]).unwrap().is_empty());
    assert_eq!(outbox.get(ids[2]).unwrap().state, State::Queued);
    assert_eq!(depth(&outbox), [(State::Queued, 1)]);
    // The key is gone: the same key queues again.
    let mut again = email("a@x.org", "keyed again");
    again.idempotency_key = Some("k1".into());
    assert_eq!(
        outbox
            .commit(call(vec![again], vec![]))
            .unwrap()
            .queued
            .len(),
        1
    );
    assert_eq!(depth(&outbox), [(State::Queued, 2)]);
}
