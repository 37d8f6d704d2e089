//! The outbox on a real PostgreSQL server: the behaviour every backend
//! shares (`sendbox_outbox::behaviour`), then what is PostgreSQL's own:
//! several nodes on one database (claims that never overlap, results fenced
//! by the lease, a dead node's messages freed when its lease expires),
//! migrations run once by nodes starting together.
//!
//! The server is `DATABASE_URL` (a `postgres://` URL), else
//! `postgres://postgres@localhost:5432/postgres`; `./scripts/test.sh`
//! starts a throwaway one when none is running. Each test gets a database
//! of its own, dropped afterwards. No server: the tests fail, loudly.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use sendbox_outbox::behaviour::{call, email};
use sendbox_outbox::{Mark, OutboxError, PgOutbox, State, Store};
use sendbox_test_support::postgres::Database;

/// Node `node` of the outbox in `db`.
async fn node(db: &Database, node: &str, lease: Duration) -> Arc<PgOutbox> {
    PgOutbox::connect(&db.url, None, node, 4, lease)
        .await
        .unwrap()
}

async fn fresh_postgres() -> (Database, Arc<PgOutbox>) {
    let db = Database::create().await;
    let store = node(&db, "node-a", sendbox_outbox::DEFAULT_LEASE).await;
    (db, store)
}

sendbox_outbox::store_behaviour_tests!(fresh_postgres);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_claiming_at_once_never_take_the_same_message() {
    let db = Database::create().await;
    let nodes = [
        node(&db, "a", Duration::from_secs(60)).await,
        node(&db, "b", Duration::from_secs(60)).await,
        node(&db, "c", Duration::from_secs(60)).await,
    ];
    let emails = (0..300)
        .map(|i| email("a@x.org", &format!("m{i}")))
        .collect();
    nodes[0].commit(call(emails, vec![])).await.unwrap();
    let mut tasks = tokio::task::JoinSet::new();
    for (k, node) in nodes.iter().enumerate() {
        for _ in 0..4 {
            let node = node.clone();
            tasks.spawn(async move {
                let mut mine = Vec::new();
                loop {
                    let got = node.claim("alerts", 7).await.unwrap();
                    if got.is_empty() {
                        return (k, mine);
                    }
                    mine.extend(got.into_iter().map(|m| m.id));
                }
            });
        }
    }
    let mut seen = HashSet::new();
    let mut per_node = [0usize; 3];
    for (k, ids) in tasks.join_all().await {
        per_node[k] += ids.len();
        for id in ids {
            assert!(seen.insert(id), "message {id} claimed twice");
        }
    }
    assert_eq!(seen.len(), 300, "every message claimed once");
    assert_eq!(per_node.iter().sum::<usize>(), 300);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_lease_holder_records_a_result() {
    let db = Database::create().await;
    let a = node(&db, "a", Duration::from_secs(60)).await;
    let b = node(&db, "b", Duration::from_secs(60)).await;
    let id = a
        .commit(call(vec![email("a@x.org", "x")], vec![]))
        .await
        .unwrap()
        .queued[0]
        .id;
    assert_eq!(a.claim("alerts", 10).await.unwrap().len(), 1);
    let refused = b.mark(id, State::Sent, None, "250 ok").await;
    match refused {
        Err(OutboxError::WrongState { state, .. }) => {
            assert!(state.contains("node a"), "{state}")
        }
        other => panic!("node b recorded a result for a's message: {other:?}"),
    }
    assert_eq!(a.get(id).await.unwrap().state, State::Sending);
    a.mark(id, State::Sent, None, "250 ok").await.unwrap();
    assert_eq!(b.get(id).await.unwrap().state, State::Sent);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_nodes_messages_go_out_again_with_their_message_id_when_its_lease_expires() {
    let db = Database::create().await;
    // Node a claims with a short lease, then "dies": its keeper stops
    // renewing when it is dropped.
    let a = node(&db, "a", Duration::from_millis(900)).await;
    let queued = a
        .commit(call(
            vec![email("a@x.org", "x"), email("b@x.org", "y")],
            vec![],
        ))
        .await
        .unwrap()
        .queued;
    assert_eq!(a.claim("alerts", 10).await.unwrap().len(), 2);
    drop(a);
    let b = node(&db, "b", Duration::from_secs(60)).await;
    assert!(
        b.claim("alerts", 10).await.unwrap().is_empty(),
        "a live lease is never taken"
    );
    // b's keeper frees expired leases every third of b's lease; recover()
    // does the same at once.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert_eq!(Store::recover(&b).await.unwrap(), 2);
    let again = b.claim("alerts", 10).await.unwrap();
    let mut ids: Vec<(i64, String)> = again.iter().map(|m| (m.id, m.message_id.clone())).collect();
    ids.sort();
    let mut expected: Vec<(i64, String)> = queued
        .iter()
        .map(|q| (q.id, q.message_id.clone()))
        .collect();
    expected.sort();
    assert_eq!(ids, expected, "the same messages, the same Message-IDs");
    assert!(again.iter().all(|m| m.attempts == 2));
    let trail = b.audit_trail(queued[0].id).await.unwrap();
    assert!(
        trail.iter().any(|e| e
            .detail
            .as_deref()
            .is_some_and(|d| d.contains("node a") && d.contains("expired"))),
        "{trail:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_live_nodes_leases_are_renewed_while_it_sends() {
    let db = Database::create().await;
    let a = node(&db, "a", Duration::from_millis(600)).await;
    a.commit(call(vec![email("a@x.org", "x")], vec![]))
        .await
        .unwrap();
    let claimed = a.claim("alerts", 10).await.unwrap();
    let b = node(&db, "b", Duration::from_secs(60)).await;
    // Three lease periods later, a (alive, renewing) still holds it.
    tokio::time::sleep(Duration::from_millis(1800)).await;
    assert_eq!(Store::recover(&b).await.unwrap(), 0);
    assert!(b.claim("alerts", 10).await.unwrap().is_empty());
    let answers = a
        .mark_many(vec![Mark {
            id: claimed[0].id,
            to: State::Sent,
            next_attempt_ms: None,
            detail: "250 ok".into(),
            attempted: true,
        }])
        .await
        .unwrap();
    assert!(answers[0].is_ok(), "{answers:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_starting_together_migrate_once() {
    let db = Database::create().await;
    let url = db.url.clone();
    let mut tasks = tokio::task::JoinSet::new();
    for k in 0..6 {
        let url = url.clone();
        tasks.spawn(async move {
            PgOutbox::connect(&url, None, &format!("n{k}"), 1, Duration::from_secs(60))
                .await
                .map(|_| ())
        });
    }
    for r in tasks.join_all().await {
        r.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_server_is_a_clear_error_without_the_password() {
    let err = PgOutbox::connect(
        "postgres://sendbox:s3cret-pw@127.0.0.1:1/sendbox",
        Some("an0ther-pw"),
        "a",
        1,
        Duration::from_secs(60),
    )
    .await
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("cannot reach the database at postgres://127.0.0.1:1/sendbox"),
        "{err}"
    );
    assert!(
        !err.contains("s3cret-pw") && !err.contains("an0ther-pw"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn looking_at_a_database_changes_nothing_and_says_what_is_missing() {
    let db = Database::create().await;
    let err = PgOutbox::connect_as_tool(&db.url, None)
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("no sendbox tables yet"), "{err}");
    assert_eq!(
        db.query("SELECT COUNT(*) FROM pg_tables WHERE tablename = 'messages'")
            .await,
        ["0"],
        "looking created nothing"
    );
    let _node = node(&db, "a", Duration::from_secs(60)).await;
    let looked = PgOutbox::connect_as_tool(&db.url, None).await.unwrap();
    assert!(looked.paused_accounts().await.unwrap().is_empty());
}

/// `n` calls of plugin `plugin` committed at once, each of one email with
/// idempotency key `{plugin}{i}`, then changed by `shape(i, call)`: the
/// number of emails queued, and the errors of the calls refused.
async fn commit_at_once(
    store: &Arc<PgOutbox>,
    plugin: &str,
    n: usize,
    shape: fn(usize, &mut sendbox_outbox::Call),
) -> (usize, Vec<OutboxError>) {
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..n {
        let (store, plugin) = (store.clone(), plugin.to_owned());
        tasks.spawn(async move {
            let mut e = email("a@x.org", &format!("{plugin} {i}"));
            e.idempotency_key = Some(format!("{plugin}{i}"));
            let mut c = call(vec![e], vec![]);
            c.plugin = plugin;
            shape(i, &mut c);
            store.commit(c).await
        });
    }
    let mut stored = 0;
    let mut errors = Vec::new();
    for r in tasks.join_all().await {
        match r {
            Ok(done) => stored += done.queued.len(),
            Err(e) => errors.push(e),
        }
    }
    (stored, errors)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_committed_at_once_share_transactions_and_each_is_stored_once() {
    let (_db, store) = fresh_postgres().await;
    let (stored, errors) = commit_at_once(&store, "p", 64, |_, _| {}).await;
    assert!(errors.is_empty(), "{errors:?}");
    assert_eq!(stored, 64);
    assert_eq!(store.list(None, 100).await.unwrap().len(), 64);
    let (groups, calls) = store.commit_groups();
    assert_eq!(calls, 64, "every call counted once");
    assert!(
        groups < calls / 2,
        "calls waiting together share a transaction: {groups} for {calls}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_the_server_refuses_fail_alone_and_their_groups_are_stored() {
    let (_db, store) = fresh_postgres().await;
    // A text column cannot hold a NUL byte. Every fourth call's event id
    // has one: the server refuses its row inside its group's transaction.
    // Every other fourth call's idempotency key has one: a lock the group
    // cannot try with the others.
    let (stored, errors) = commit_at_once(&store, "p", 64, |i, c| match i % 4 {
        0 => c.event_id = format!("evt\0{i}"),
        2 => c.emails[0].idempotency_key = Some(format!("bad\0{i}")),
        _ => {}
    })
    .await;
    assert_eq!(errors.len(), 32, "{errors:?}");
    assert!(
        errors
            .iter()
            .all(|e| matches!(e, OutboxError::Storage(_)) && e.to_string().contains("22021")),
        "{errors:?}"
    );
    assert_eq!(
        stored, 32,
        "the calls grouped with a refused one are stored"
    );
    assert_eq!(store.list(None, 100).await.unwrap().len(), 32);
    let (groups, calls) = store.commit_groups();
    assert_eq!(calls, 32);
    assert!(groups < calls / 2, "{groups} groups for {calls} calls");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lock_held_elsewhere_holds_up_only_the_call_that_needs_it() {
    let db = Database::create().await;
    // A pool of two: one runner of groups.
    let a = PgOutbox::connect(&db.url, None, "a", 2, sendbox_outbox::DEFAULT_LEASE)
        .await
        .unwrap();
    let b = node(&db, "b", sendbox_outbox::DEFAULT_LEASE).await;
    // Node b runs plugin `p` alone: its lock is held until `alone` drops.
    let alone = b.plugin_alone("p").await.unwrap();
    let writer = a.clone();
    let needs_lock = tokio::spawn(async move {
        writer
            .commit(call(
                vec![email("a@x.org", "p waits")],
                vec![sendbox_outbox::behaviour::set("k", "v")],
            ))
            .await
    });
    // Calls of plugin `q` committed meanwhile, some in the same groups as
    // `p`'s: none waits for `p`'s lock.
    for round in 0..3 {
        let (stored, errors) = tokio::time::timeout(
            Duration::from_secs(20),
            commit_at_once(&a, "q", 16, |_, _| {}),
        )
        .await
        .unwrap_or_else(|_| panic!("round {round}: q's calls waited for p's lock"));
        assert!(errors.is_empty(), "{errors:?}");
        // The same keys each round: queued the first time, duplicates after.
        assert_eq!(stored, if round == 0 { 16 } else { 0 });
    }
    assert!(!needs_lock.is_finished(), "p's call waits for its lock");
    drop(alone);
    let done = tokio::time::timeout(Duration::from_secs(20), needs_lock)
        .await
        .expect("p's call is committed once the lock is free")
        .unwrap()
        .unwrap();
    assert_eq!(done.queued.len(), 1);
    let (value, _) = a.plugin_state_get("p", "k").await.unwrap().unwrap();
    assert_eq!(value, b"v");
    assert_eq!(a.list(None, 100).await.unwrap().len(), 17);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_waiting_on_locks_wait_together_and_leave_the_pool_to_the_others() {
    let db = Database::create().await;
    // A pool of four: two runners of groups, the pool shared in turn.
    let a = node(&db, "a", sendbox_outbox::DEFAULT_LEASE).await;
    let b = node(&db, "b", sendbox_outbox::DEFAULT_LEASE).await;
    // Node b runs six plugins alone: their locks are held until dropped.
    let mut held = Vec::new();
    for p in 0..6 {
        held.push(b.plugin_alone(&format!("p{p}")).await.unwrap());
    }
    // Six calls of each that change its state: each needs its plugin's
    // lock. Waiting one by one on a connection each, or each plugin's on
    // one, they would hold every connection of the pool.
    let mut waiting = tokio::task::JoinSet::new();
    for i in 0..36 {
        let a = a.clone();
        waiting.spawn(async move {
            let mut c = call(
                vec![email("a@x.org", &format!("waits {i}"))],
                vec![sendbox_outbox::behaviour::set(&format!("k{i}"), "v")],
            );
            c.plugin = format!("p{}", i % 6);
            a.commit(c).await
        });
    }
    for round in 0..3 {
        let (stored, errors) = tokio::time::timeout(
            Duration::from_secs(20),
            commit_at_once(&a, "q", 16, |_, _| {}),
        )
        .await
        .unwrap_or_else(|_| panic!("round {round}: q's calls found no connection"));
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(stored, if round == 0 { 16 } else { 0 });
    }
    // Claims, results and reads find a connection too.
    let listed = tokio::time::timeout(Duration::from_secs(20), a.list(None, 100))
        .await
        .expect("a read found a connection")
        .unwrap();
    assert_eq!(listed.len(), 16);
    assert_eq!(waiting.len(), 36);
    assert!(
        tokio::time::timeout(Duration::from_millis(200), waiting.join_next())
            .await
            .is_err(),
        "the calls wait for their plugins' locks"
    );
    let q_only = a.commit_groups();
    drop(held);
    let done = tokio::time::timeout(Duration::from_secs(20), waiting.join_all())
        .await
        .expect("the calls are committed once the locks are free");
    for r in done {
        assert_eq!(r.unwrap().queued.len(), 1);
    }
    for i in 0..36 {
        let (value, _) = a
            .plugin_state_get(&format!("p{}", i % 6), &format!("k{i}"))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(value, b"v");
    }
    // Calls of one plugin that waited together were committed together.
    let (groups, calls) = a.commit_groups();
    assert_eq!(calls - q_only.1, 36, "every call counted once");
    assert!(
        groups - q_only.0 < 36,
        "36 calls waiting on six locks took {} transactions",
        groups - q_only.0
    );
}
