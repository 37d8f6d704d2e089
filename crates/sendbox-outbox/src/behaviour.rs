//! The outbox's behaviour, written once against [`Store`] so every backend
//! runs the same suite: a backend's tests call
//! [`store_behaviour_tests!`](crate::store_behaviour_tests) with an async
//! function returning a fresh, empty store (and whatever must live as long
//! as it, such as a temporary folder), which expands to one `#[tokio::test]`
//! per scenario below.
//!
//! Every scenario commits as plugin `p` to account `alerts`
//! (`alerts@example.com`) and asserts what a user of the outbox relies on.
//!
//! Over 500 lines on purpose: the whole contract in one file, so whoever
//! writes a backend reads it top to bottom.

use std::sync::Arc;

use sendbox_types::{Bytes, Email, StateChange};

use crate::store::Store;
use crate::{Call, Mark, OutboxError, Policy, PruneBefore, Pruned, State, now_ms};

/// Expands to one `#[tokio::test]` per behaviour scenario, each on a store
/// from `$fresh().await`, which returns `(guard, store)`.
#[macro_export]
macro_rules! store_behaviour_tests {
    ($fresh:path) => {
        $crate::store_behaviour_tests!(@each $fresh;
            a_call_commits_its_emails_and_state_together,
            a_policy_violation_queues_nothing_and_says_why,
            a_refused_call_does_not_disturb_the_others_committed_with_it,
            one_call_may_repeat_a_key_of_its_own,
            an_idempotency_key_seen_again_is_not_queued_twice,
            one_key_committed_sixteen_times_at_once_is_queued_once,
            suppressed_recipients_are_removed_at_enqueue,
            an_hourly_rate_limit_refuses_the_excess,
            a_message_left_sending_is_queued_again_with_its_message_id,
            states_move_with_their_replies_on_record,
            results_recorded_together_are_answered_one_by_one,
            a_message_handed_back_unattempted_gets_its_attempt_back,
            a_claim_stops_at_its_byte_budget,
            concurrent_commits_are_all_stored,
            a_call_whose_reads_changed_commits_nothing,
            usage_is_counted_in_bytes_and_the_quota_holds_at_commit,
            finished_messages_and_old_keys_are_pruned_and_counts_stay_exact,
            paused_accounts_and_schedule_runs_are_remembered,
        );
    };
    (@each $fresh:path; $($name:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                let (_guard, store) = $fresh().await;
                $crate::behaviour::$name(store).await;
            }
        )*
    };
}

/// A plain-text email to one recipient.
pub fn email(to: &str, subject: &str) -> Email {
    Email {
        to: vec![to.into()],
        subject: subject.into(),
        text: Some("body".into()),
        ..Email::default()
    }
}

/// A call of plugin `p` (event `evt-1`) for account `alerts`.
pub fn call(emails: Vec<Email>, state: Vec<StateChange>) -> Call {
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

/// A trail as its moves, (from, to), oldest first.
pub fn moves(trail: &[crate::AuditEntry]) -> Vec<(Option<&str>, &str)> {
    trail
        .iter()
        .map(|e| (e.from.as_deref(), e.to.as_str()))
        .collect()
}

/// A plugin state write.
pub fn set(key: &str, value: &str) -> StateChange {
    StateChange::Set {
        key: key.into(),
        value: Bytes(value.as_bytes().to_vec()),
    }
}

async fn value(store: &impl Store, key: &str) -> Option<Vec<u8>> {
    store
        .plugin_state_get("p", key)
        .await
        .unwrap()
        .map(|(v, _)| v)
}

async fn version(store: &impl Store, key: &str) -> u64 {
    store
        .plugin_state_get("p", key)
        .await
        .unwrap()
        .map_or(0, |(_, v)| v)
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

async fn depth(store: &impl Store) -> Vec<(State, u64)> {
    let mut d = store.depth().await.unwrap();
    d.retain(|(_, n)| *n > 0);
    d.sort_by_key(|(s, _)| s.as_str());
    d
}

/// The counts by state (`depth`, kept at every change) are those of the
/// messages themselves.
async fn counts_are_exact(store: &impl Store) {
    let mut counted: Vec<(State, u64)> = Vec::new();
    for m in store.list(None, 100_000).await.unwrap() {
        match counted.iter_mut().find(|(s, _)| *s == m.state) {
            Some((_, n)) => *n += 1,
            None => counted.push((m.state, 1)),
        }
    }
    counted.sort_by_key(|(s, _)| s.as_str());
    assert_eq!(depth(store).await, counted, "counts by state");
}

/// Emails and state writes of one call are stored together, with distinct
/// Message-IDs in the account's domain and the event on record.
pub async fn a_call_commits_its_emails_and_state_together(store: impl Store) {
    let done = store
        .commit(call(
            vec![email("a@x.org", "one"), email("b@x.org", "two")],
            vec![set("seen", "1")],
        ))
        .await
        .unwrap();
    assert_eq!(done.queued.len(), 2);
    assert_ne!(done.queued[0].message_id, done.queued[1].message_id);
    assert!(done.queued[0].message_id.ends_with("@example.com>"));
    assert_eq!(store.list(Some(State::Queued), 10).await.unwrap().len(), 2);
    assert_eq!(value(&store, "seen").await, Some(b"1".to_vec()));
    let trail = store.audit_trail(done.queued[0].id).await.unwrap();
    assert_eq!(trail[0].to, "queued");
    assert!(trail[0].detail.as_deref().unwrap_or("").contains("evt-1"));
}

/// A call breaking policy stores nothing (no email, no state) and says
/// which rule.
pub async fn a_policy_violation_queues_nothing_and_says_why(store: impl Store) {
    let mut c = call(
        vec![
            email("ok@x.org", "fine"),
            email("ceo@competitor.com", "leak"),
        ],
        vec![set("k", "v")],
    );
    c.policy.allowed_recipients = vec!["*@x.org".into()];
    match store.commit(c).await {
        Err(OutboxError::Policy(m)) => {
            assert!(
                m.contains("ceo@competitor.com is not in allowed_recipients"),
                "{m}"
            )
        }
        other => panic!("expected a policy error, got {other:?}"),
    }
    assert!(
        store.list(None, 10).await.unwrap().is_empty(),
        "nothing partial"
    );
    assert_eq!(value(&store, "k").await, None, "state not written");

    let mut c = call(vec![email("ok@x.org", "x")], vec![]);
    c.emails[0].sender = Some("ceo@example.com".into());
    let err = store.commit(c).await.unwrap_err();
    assert!(
        err.to_string()
            .contains("From ceo@example.com is not allowed"),
        "{err}"
    );
}

/// Of 40 concurrent calls, the 20 refused ones — by their emails' shape, or
/// by their state quota, which is checked after their emails — leave the 20
/// others stored, and nothing of their own: no message, no state.
pub async fn a_refused_call_does_not_disturb_the_others_committed_with_it(store: impl Store) {
    let store = Arc::new(store);
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..40 {
        let store = store.clone();
        tasks.spawn(async move {
            let mut c = call(
                vec![email("a@x.org", &format!("n{i}"))],
                vec![set(&format!("k{i}"), "v")],
            );
            match i % 4 {
                0 => c.policy.recipients_per_email = 0,
                2 => c.state_quota_bytes = Some(0),
                _ => {}
            }
            store.commit(c).await.is_ok()
        });
    }
    let ok = tasks.join_all().await.into_iter().filter(|&b| b).count();
    assert_eq!(ok, 20);
    let listed = store.list(None, 100).await.unwrap();
    assert_eq!(listed.len(), 20);
    let mut usage = 0;
    for i in 0..40 {
        let key = format!("k{i}");
        let kept = value(&*store, &key).await;
        if i % 2 == 1 {
            assert_eq!(kept.as_deref(), Some(&b"v"[..]), "{key}");
            usage += key.len() as u64 + 1;
        } else {
            assert_eq!(kept, None, "{key} of a refused call");
        }
    }
    assert_eq!(store.plugin_state_usage("p").await.unwrap(), usage);
}

/// One call may name an idempotency key twice (the second email is a
/// duplicate of the first) and write one key several times (its usage is
/// that of the last write).
pub async fn one_call_may_repeat_a_key_of_its_own(store: impl Store) {
    let mut e = email("a@x.org", "alert");
    e.idempotency_key = Some("k-once".into());
    let mut c = call(
        vec![e.clone(), e],
        vec![
            set("k", "aaaa"),
            set("k", "bb"),
            set("j", "x"),
            StateChange::Delete { key: "j".into() },
        ],
    );
    c.state_quota_bytes = Some(3);
    let done = store.commit(c).await.unwrap();
    assert_eq!(done.queued.len(), 1);
    assert_eq!(done.duplicates, done.queued);
    assert_eq!(store.list(None, 100).await.unwrap().len(), 1);
    assert_eq!(value(&store, "k").await.as_deref(), Some(&b"bb"[..]));
    assert_eq!(value(&store, "j").await, None);
    assert_eq!(store.plugin_state_usage("p").await.unwrap(), 3);
}

/// An idempotency key is per plugin: seen again, the earlier message is
/// named and nothing is queued.
pub async fn an_idempotency_key_seen_again_is_not_queued_twice(store: impl Store) {
    let mut e = email("a@x.org", "alert");
    e.idempotency_key = Some("alert-42-firing".into());
    let first = store.commit(call(vec![e.clone()], vec![])).await.unwrap();
    let second = store.commit(call(vec![e.clone()], vec![])).await.unwrap();
    assert!(second.queued.is_empty());
    assert_eq!(second.duplicates, first.queued);
    let mut other = call(vec![e], vec![]);
    other.plugin = "q".into();
    assert_eq!(store.commit(other).await.unwrap().queued.len(), 1);
}

/// Sixteen commits of one idempotency key at once (sixteen deliveries of
/// one webhook): one queues it, fifteen name it as their duplicate; other
/// keys committed meanwhile are each queued.
pub async fn one_key_committed_sixteen_times_at_once_is_queued_once(store: impl Store) {
    let store = Arc::new(store);
    let mut tasks = tokio::task::JoinSet::new();
    for t in 0..16 {
        let store = store.clone();
        tasks.spawn(async move {
            let mut same = email("a@x.org", "alert");
            same.idempotency_key = Some("alert-7-firing".into());
            let mut own = email("a@x.org", &format!("own {t}"));
            own.idempotency_key = Some(format!("own-{t}"));
            let a = store.commit(call(vec![same], vec![])).await.unwrap();
            let b = store.commit(call(vec![own], vec![])).await.unwrap();
            (a, b)
        });
    }
    let done = tasks.join_all().await;
    let queued: Vec<_> = done.iter().flat_map(|(a, _)| a.queued.clone()).collect();
    assert_eq!(queued.len(), 1, "queued once");
    let duplicates: Vec<_> = done
        .iter()
        .flat_map(|(a, _)| a.duplicates.clone())
        .collect();
    assert_eq!(duplicates.len(), 15);
    assert!(duplicates.iter().all(|d| *d == queued[0]), "{duplicates:?}");
    assert!(done.iter().all(|(_, b)| b.queued.len() == 1));
    assert_eq!(store.list(None, 100).await.unwrap().len(), 17);
}

/// Suppressed addresses (any case, with display names) are dropped at
/// enqueue; an email left without recipients is skipped.
pub async fn suppressed_recipients_are_removed_at_enqueue(store: impl Store) {
    store
        .suppress("Bounced@X.org", Some("hard bounce"))
        .await
        .unwrap();
    let mut e = email("bounced@x.org", "hi");
    e.cc = vec!["ok@x.org".into()];
    let done = store
        .commit(call(
            vec![e, email("Bounced <bounced@x.org>", "only")],
            vec![],
        ))
        .await
        .unwrap();
    assert_eq!(
        done.queued.len(),
        1,
        "the email left without recipients is skipped"
    );
    assert_eq!(done.suppressed, ["bounced@x.org", "bounced@x.org"]);
    let stored = store.get(done.queued[0].id).await.unwrap();
    assert_eq!(stored.recipients, "ok@x.org");
    // What will be sent is the email without them, not the plugin's.
    assert!(stored.email.to.is_empty(), "{:?}", stored.email.to);
    assert_eq!(stored.email.cc, ["ok@x.org"]);
    // An email with no suppressed recipient is stored as the plugin made it.
    let mut kept = email("a@x.org", "kept");
    kept.cc = vec!["Ok <ok@x.org>".into()];
    let done = store
        .commit(call(vec![kept.clone()], vec![]))
        .await
        .unwrap();
    assert_eq!(store.get(done.queued[0].id).await.unwrap().email, kept);
    assert_eq!(
        store.suppressions().await.unwrap(),
        [("bounced@x.org".to_string(), Some("hard bounce".to_string()))]
    );
    assert!(store.unsuppress("bounced@x.org").await.unwrap());
    assert!(!store.unsuppress("bounced@x.org").await.unwrap());
    assert!(store.suppressions().await.unwrap().is_empty());
    // Unsuppressed, the address is a recipient again; a large email is
    // stored as made too.
    let mut large = email("Bounced <bounced@x.org>", "large");
    large.text = Some("x".repeat(200 << 10));
    let done = store
        .commit(call(vec![large.clone()], vec![]))
        .await
        .unwrap();
    assert!(done.suppressed.is_empty());
    let stored = store.get(done.queued[0].id).await.unwrap();
    assert_eq!(stored.recipients, "bounced@x.org");
    assert_eq!(stored.email, large);
}

/// `emails_per_hour` counts what is already queued.
pub async fn an_hourly_rate_limit_refuses_the_excess(store: impl Store) {
    let mut c = call(vec![email("a@x.org", "1"), email("a@x.org", "2")], vec![]);
    c.policy.emails_per_hour = Some(3);
    store.commit(c.clone()).await.unwrap();
    let err = store.commit(c).await.unwrap_err();
    assert!(err.to_string().contains("emails_per_hour = 3"), "{err}");
    assert_eq!(store.list(None, 10).await.unwrap().len(), 2);
}

/// What a holder left in `sending` is queued again by the next holder,
/// keeping its Message-ID, and says so in its history.
pub async fn a_message_left_sending_is_queued_again_with_its_message_id(store: impl Store) {
    let done = store
        .commit(call(vec![email("a@x.org", "x")], vec![]))
        .await
        .unwrap();
    let queued = done.queued[0].clone();
    let claimed = store.claim("alerts", 10).await.unwrap();
    assert_eq!(claimed.len(), 1);
    assert_eq!(claimed[0].state, State::Sending);
    store.lock_for_delivery("test").await.unwrap();
    assert_eq!(store.recover().await.unwrap(), 1);
    let m = store.get(queued.id).await.unwrap();
    assert_eq!(m.state, State::Queued);
    assert_eq!(m.message_id, queued.message_id);
    counts_are_exact(&store).await;
    let again = store.claim("alerts", 10).await.unwrap();
    assert_eq!(again[0].message_id, queued.message_id);
    assert_eq!(again[0].attempts, 2);
    let trail = store.audit_trail(queued.id).await.unwrap();
    assert!(trail.iter().any(|a| {
        a.detail
            .as_deref()
            .is_some_and(|d| d.contains("recovered after restart"))
    }));
}

/// Claims, results, operator retries and drops move a message through its
/// states, each on record; a stale result and a retry of a message being
/// sent are refused.
pub async fn states_move_with_their_replies_on_record(store: impl Store) {
    let done = store
        .commit(call(
            vec![email("a@x.org", "x"), email("b@x.org", "y")],
            vec![],
        ))
        .await
        .unwrap();
    assert_eq!(store.claim("alerts", 10).await.unwrap().len(), 2);
    assert!(
        store.claim("alerts", 10).await.unwrap().is_empty(),
        "claimed once"
    );
    assert!(
        store.claim("other", 10).await.unwrap().is_empty(),
        "per account"
    );
    let (a, b) = (done.queued[0].id, done.queued[1].id);
    store
        .mark(a, State::Sent, None, "250 2.0.0 OK")
        .await
        .unwrap();
    store
        .mark(b, State::Retry, Some(now_ms() + 60_000), "451 4.3.0 later")
        .await
        .unwrap();
    counts_are_exact(&store).await;
    assert!(
        store.claim("alerts", 10).await.unwrap().is_empty(),
        "retry not due yet"
    );
    assert!(matches!(
        store.mark(b, State::Dead, None, "stale").await,
        Err(OutboxError::WrongState { .. })
    ));
    store.retry_now(b).await.unwrap();
    counts_are_exact(&store).await;
    assert_eq!(store.claim("alerts", 10).await.unwrap()[0].id, b);
    assert!(matches!(
        store.retry_now(b).await,
        Err(OutboxError::WrongState { .. })
    ));
    counts_are_exact(&store).await;
    store
        .mark(b, State::Dead, None, "550 5.1.1 User unknown")
        .await
        .unwrap();
    let m = store.get(b).await.unwrap();
    assert_eq!(m.state, State::Dead);
    assert_eq!(m.last_reply.as_deref(), Some("550 5.1.1 User unknown"));
    store.retry_now(b).await.unwrap();
    assert_eq!(store.claim("alerts", 10).await.unwrap()[0].id, b);
    let trail = store.audit_trail(b).await.unwrap();
    assert_eq!(
        moves(&trail),
        [
            (None, "queued"),
            (Some("queued"), "sending"),
            (Some("sending"), "retry"),
            (Some("retry"), "queued"),
            (Some("queued"), "sending"),
            (Some("sending"), "dead"),
            (Some("dead"), "queued"),
            (Some("queued"), "sending"),
        ]
    );
    assert!(
        trail.windows(2).all(|w| w[0].at_ms <= w[1].at_ms),
        "oldest first: {trail:?}"
    );
    // Leaving `sending` says why.
    for (i, e) in trail.iter().enumerate() {
        if e.from.as_deref() == Some("sending") {
            assert!(e.detail.is_some(), "entry {i}: {e:?}");
        }
    }
    // A sent message put back in the queue by the operator.
    store.retry_now(a).await.unwrap();
    counts_are_exact(&store).await;
    store.drop_message(a).await.unwrap();
    counts_are_exact(&store).await;
    assert!(matches!(store.get(a).await, Err(OutboxError::NotFound(_))));
    assert!(matches!(
        store.drop_message(a).await,
        Err(OutboxError::NotFound(_))
    ));
}

/// Queues `n` emails ("m0", "m1", …) in one call; their ids in order.
async fn queue(store: &impl Store, n: usize) -> Vec<i64> {
    let emails = (0..n).map(|i| email("a@x.org", &format!("m{i}"))).collect();
    let committed = store.commit(call(emails, vec![])).await.unwrap();
    committed.queued.iter().map(|q| q.id).collect()
}

/// Many delivery results recorded in one step: each lands with its reply
/// and its audit row, and a result for a message no longer `sending` is
/// refused alone without holding back the others.
pub async fn results_recorded_together_are_answered_one_by_one(store: impl Store) {
    let ids = queue(&store, 5).await;
    assert_eq!(store.claim("alerts", 4).await.unwrap().len(), 4);
    let mark = |id, to, next, detail: &str| Mark {
        id,
        to,
        next_attempt_ms: next,
        detail: detail.into(),
        attempted: true,
    };
    let later = now_ms() + 60_000;
    let answers = store
        .mark_many(vec![
            mark(ids[0], State::Sent, None, "250 one"),
            mark(ids[1], State::Retry, Some(later), "451 two"),
            // Not claimed: still queued.
            mark(ids[4], State::Sent, None, "250 stale"),
            mark(ids[2], State::Dead, None, "550 three"),
            mark(ids[3], State::Queued, Some(now_ms()), "released"),
            mark(i64::MAX, State::Sent, None, "250 nobody"),
        ])
        .await
        .unwrap();
    assert_eq!(answers.len(), 6);
    // Refused results moved nothing.
    counts_are_exact(&store).await;
    assert!(answers[0].is_ok() && answers[1].is_ok() && answers[3].is_ok() && answers[4].is_ok());
    assert!(
        matches!(answers[2], Err(OutboxError::WrongState { .. })),
        "{answers:?}"
    );
    assert!(
        matches!(answers[5], Err(OutboxError::NotFound(_))),
        "{answers:?}"
    );
    let expect = [
        (State::Sent, "250 one"),
        (State::Retry, "451 two"),
        (State::Dead, "550 three"),
        (State::Queued, "released"),
    ];
    for (id, (state, reply)) in ids.iter().zip(expect) {
        let m = store.get(*id).await.unwrap();
        assert_eq!((m.state, m.last_reply.as_deref()), (state, Some(reply)));
        let trail = store.audit_trail(*id).await.unwrap();
        assert_eq!(trail.last().unwrap().to, state.as_str());
        assert_eq!(trail.last().unwrap().detail.as_deref(), Some(reply));
    }
    assert_eq!(store.get(ids[1]).await.unwrap().next_attempt_ms, later);
    let untouched = store.get(ids[4]).await.unwrap();
    assert_eq!(
        (untouched.state, untouched.last_reply),
        (State::Queued, None)
    );
    // The released one and the stale one are claimable again; the retry
    // is not due.
    let mut again: Vec<i64> = store
        .claim("alerts", 10)
        .await
        .unwrap()
        .iter()
        .map(|m| m.id)
        .collect();
    again.sort();
    assert_eq!(again, [ids[3], ids[4]]);
    counts_are_exact(&store).await;
    assert!(store.mark_many(vec![]).await.unwrap().is_empty());
}

/// A claimed message handed back before its turn (the account paused
/// meanwhile) was not attempted: the attempt its claim counted is taken
/// back, however often that happens; an attempt that reached the account
/// stays counted, and a stale hand-back takes nothing.
pub async fn a_message_handed_back_unattempted_gets_its_attempt_back(store: impl Store) {
    let ids = queue(&store, 3).await;
    let back = |id, attempted| Mark {
        id,
        to: State::Queued,
        next_attempt_ms: Some(now_ms()),
        detail: "not attempted: the account is paused".into(),
        attempted,
    };
    for round in 1..=3 {
        let claimed = store.claim("alerts", 10).await.unwrap();
        assert_eq!(claimed.len(), 3, "round {round}");
        let answers = store
            .mark_many(vec![
                back(ids[0], true),
                back(ids[1], false),
                back(ids[2], false),
            ])
            .await
            .unwrap();
        assert!(answers.iter().all(Result::is_ok), "{answers:?}");
        let mut now = Vec::new();
        for id in &ids {
            now.push(store.get(*id).await.unwrap().attempts);
        }
        // The first went to the account each round; the others never did.
        assert_eq!(now, [round, 0, 0], "round {round}");
    }
    // Not `sending` any more: refused, and nothing taken back.
    let stale = store.mark_many(vec![back(ids[0], false)]).await.unwrap();
    assert!(
        matches!(stale[0], Err(OutboxError::WrongState { .. })),
        "{stale:?}"
    );
    assert_eq!(store.get(ids[0]).await.unwrap().attempts, 3);
    counts_are_exact(&store).await;
}

/// A claim with a byte budget takes due messages in order until the next
/// would pass it, and always at least one (however large).
pub async fn a_claim_stops_at_its_byte_budget(store: impl Store) {
    let big = |subject: &str| Email {
        text: Some("x".repeat(1000)),
        ..email("a@x.org", subject)
    };
    let emails = vec![big("m0"), big("m1"), big("m2"), big("m3"), big("m4")];
    let each = emails[0].content_bytes();
    store.commit(call(emails, vec![])).await.unwrap();
    let subjects = |claimed: Vec<crate::Message>| -> Vec<String> {
        claimed.into_iter().map(|m| m.email.subject).collect()
    };
    let one = store.claim_within("alerts", 10, 1).await.unwrap();
    assert_eq!(subjects(one), ["m0"], "the first always, whatever its size");
    let two = store
        .claim_within("alerts", 10, 2 * each + each / 2)
        .await
        .unwrap();
    assert_eq!(subjects(two), ["m1", "m2"]);
    assert_eq!(
        depth(&store).await,
        [(State::Queued, 2), (State::Sending, 3)],
        "only what was returned was claimed"
    );
    let capped = store.claim_within("alerts", 1, u64::MAX).await.unwrap();
    assert_eq!(subjects(capped), ["m3"], "the count still limits");
    let rest = store.claim_within("alerts", 10, 2 * each).await.unwrap();
    assert_eq!(subjects(rest), ["m4"]);
}

/// 8 tasks × 100 commits, with delivery results recorded meanwhile: all
/// 800 stored, each task's last write wins, all 50 results on record.
pub async fn concurrent_commits_are_all_stored(store: impl Store) {
    let store = Arc::new(store);
    // 50 messages being delivered, their results recorded in groups of 10
    // while the commits go on.
    let emails = (0..50)
        .map(|i| email("b@x.org", &format!("d{i}")))
        .collect();
    store.commit(call(emails, vec![])).await.unwrap();
    let claimed = store.claim("alerts", 50).await.unwrap();
    let mut tasks = tokio::task::JoinSet::new();
    for t in 0..8 {
        let store = store.clone();
        tasks.spawn(async move {
            for i in 0..100 {
                store
                    .commit(call(
                        vec![email("a@x.org", &format!("{t}-{i}"))],
                        vec![set(&format!("k{t}"), &i.to_string())],
                    ))
                    .await
                    .unwrap();
            }
        });
    }
    for group in claimed.chunks(10) {
        let marks = group
            .iter()
            .map(|m| Mark {
                id: m.id,
                to: State::Sent,
                next_attempt_ms: None,
                detail: "250 ok".into(),
                attempted: true,
            })
            .collect();
        let answers = store.mark_many(marks).await.unwrap();
        assert!(answers.iter().all(Result::is_ok), "{answers:?}");
    }
    tasks.join_all().await;
    assert_eq!(store.list(None, 10_000).await.unwrap().len(), 850);
    assert_eq!(value(&*store, "k3").await, Some(b"99".to_vec()));
    assert_eq!(
        depth(&*store).await,
        [(State::Queued, 800), (State::Sent, 50)]
    );
}

/// Optimistic state: a call whose reads (keys, absences, listings) changed
/// before its commit stores nothing.
pub async fn a_call_whose_reads_changed_commits_nothing(store: impl Store) {
    store
        .commit(call(vec![], vec![set("n", "1")]))
        .await
        .unwrap();
    let seen = version(&store, "n").await;
    assert!(seen > 0);
    let first = with_reads(call(vec![], vec![set("n", "2")]), &[("n", seen)], &[]);
    store.commit(first).await.unwrap();
    let second = with_reads(
        call(vec![email("a@x.org", "stale")], vec![set("n", "2")]),
        &[("n", seen)],
        &[],
    );
    assert!(matches!(
        store.commit(second).await,
        Err(OutboxError::Conflict(_))
    ));
    assert!(
        store.list(None, 10).await.unwrap().is_empty(),
        "no email stored"
    );
    assert!(version(&store, "n").await > seen);

    // Absent when read, present at commit.
    store
        .commit(call(vec![], vec![set("late", "x")]))
        .await
        .unwrap();
    let absent = with_reads(call(vec![], vec![]), &[("late", 0)], &[]);
    assert!(matches!(
        store.commit(absent).await,
        Err(OutboxError::Conflict(_))
    ));
    // Deleted and written again: a new version, never the old one.
    let v = version(&store, "late").await;
    store
        .commit(call(
            vec![],
            vec![StateChange::Delete { key: "late".into() }],
        ))
        .await
        .unwrap();
    assert_eq!(value(&store, "late").await, None);
    store
        .commit(call(vec![], vec![set("late", "x")]))
        .await
        .unwrap();
    assert!(version(&store, "late").await > v);

    // A key added under a listed prefix is a conflict; one outside is not.
    store
        .commit(call(vec![], vec![set("e/1", "a")]))
        .await
        .unwrap();
    assert_eq!(
        store.plugin_state_keys("p", "e/", 10).await.unwrap(),
        ["e/1"]
    );
    let listed = with_reads(call(vec![], vec![]), &[], &[("e/", &["e/1"])]);
    store.commit(listed.clone()).await.unwrap();
    store
        .commit(call(vec![], vec![set("e/2", "b")]))
        .await
        .unwrap();
    assert!(matches!(
        store.commit(listed).await,
        Err(OutboxError::Conflict(_))
    ));
    let listed = with_reads(call(vec![], vec![]), &[], &[("e/", &["e/1", "e/2"])]);
    store
        .commit(call(vec![], vec![set("f", "c")]))
        .await
        .unwrap();
    store.commit(listed).await.unwrap();
    assert_eq!(
        store.plugin_state_keys("p", "e/", 1).await.unwrap(),
        ["e/1"],
        "limit holds"
    );
}

/// State usage counts key and value bytes; the quota is checked at commit
/// and shrinking is always allowed.
pub async fn usage_is_counted_in_bytes_and_the_quota_holds_at_commit(store: impl Store) {
    // Three two-byte characters and a value of four bytes: 10 bytes.
    store
        .commit(call(vec![], vec![set("ééé", "abcd")]))
        .await
        .unwrap();
    assert_eq!(store.plugin_state_usage("p").await.unwrap(), 10);
    let mut c = call(vec![], vec![set("k", "0123456789")]);
    c.state_quota_bytes = Some(20);
    assert!(matches!(
        store.commit(c.clone()).await,
        Err(OutboxError::Conflict(_))
    ));
    assert_eq!(store.plugin_state_usage("p").await.unwrap(), 10);
    c.state_changes = vec![set("k", "012345678")];
    store.commit(c).await.unwrap();
    assert_eq!(store.plugin_state_usage("p").await.unwrap(), 20);
    let mut c = call(
        vec![],
        vec![StateChange::Delete {
            key: "ééé".into()
        }],
    );
    c.state_quota_bytes = Some(1);
    store.commit(c).await.unwrap();
    assert_eq!(store.plugin_state_usage("p").await.unwrap(), 10);
}

/// Retention removes sent and dead messages with their history and old
/// idempotency keys, never queued ones; the counts stay exact.
pub async fn finished_messages_and_old_keys_are_pruned_and_counts_stay_exact(store: impl Store) {
    let mut keyed = email("a@x.org", "keyed");
    keyed.idempotency_key = Some("k1".into());
    let done = store
        .commit(call(
            vec![keyed, email("b@x.org", "2"), email("c@x.org", "3")],
            vec![],
        ))
        .await
        .unwrap();
    let ids: Vec<i64> = done.queued.iter().map(|q| q.id).collect();
    store.claim("alerts", 2).await.unwrap();
    store
        .mark(ids[0], State::Sent, None, "250 ok")
        .await
        .unwrap();
    store
        .mark(ids[1], State::Dead, None, "550 no")
        .await
        .unwrap();
    assert_eq!(
        depth(&store).await,
        [(State::Dead, 1), (State::Queued, 1), (State::Sent, 1)]
    );

    let cutoff = |offset_ms: i64| {
        let at = now_ms() + offset_ms;
        PruneBefore {
            sent_ms: at,
            dead_ms: at,
            idempotency_ms: at,
        }
    };
    assert_eq!(
        store.prune(cutoff(-3_600_000)).await.unwrap(),
        Pruned::default()
    );
    let pruned = store.prune(cutoff(3_600_000)).await.unwrap();
    assert_eq!(pruned.messages, 2);
    assert_eq!(pruned.idempotency_keys, 1);
    assert!(store.audit_trail(ids[0]).await.unwrap().is_empty());
    assert_eq!(store.get(ids[2]).await.unwrap().state, State::Queued);
    assert_eq!(depth(&store).await, [(State::Queued, 1)]);
    let mut again = email("a@x.org", "keyed again");
    again.idempotency_key = Some("k1".into());
    assert_eq!(
        store
            .commit(call(vec![again], vec![]))
            .await
            .unwrap()
            .queued
            .len(),
        1
    );
    assert_eq!(depth(&store).await, [(State::Queued, 2)]);
}

/// A paused account is listed with its reason until resumed; a schedule's
/// last run never moves backwards.
pub async fn paused_accounts_and_schedule_runs_are_remembered(store: impl Store) {
    assert!(store.paused_accounts().await.unwrap().is_empty());
    store
        .set_account_paused("alerts", Some("invalid_client"))
        .await
        .unwrap();
    let paused = store.paused_accounts().await.unwrap();
    assert_eq!(paused.len(), 1);
    assert_eq!(
        (paused[0].0.as_str(), paused[0].2.as_str()),
        ("alerts", "invalid_client")
    );
    store.set_account_paused("alerts", None).await.unwrap();
    assert!(store.paused_accounts().await.unwrap().is_empty());

    assert_eq!(store.schedule_run("p", "daily").await.unwrap(), None);
    store.set_schedule_run("p", "daily", 2_000).await.unwrap();
    store.set_schedule_run("p", "daily", 1_000).await.unwrap();
    assert_eq!(store.schedule_run("p", "daily").await.unwrap(), Some(2_000));
    assert_eq!(store.schedule_run("p", "hourly").await.unwrap(), None);
}
