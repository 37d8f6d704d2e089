//! The outbox on real SQLite files: the behaviour every backend shares
//! (`sendbox_outbox::behaviour`), then what is SQLite's own: durability
//! across a reopen, a full disk, an unusable path, the delivery lock file.

use std::sync::Arc;

use sendbox_outbox::behaviour::{call, email, moves, set};
use sendbox_outbox::{Outbox, OutboxError, State};

/// A fresh outbox in a temporary folder (the guard).
async fn fresh_sqlite() -> (tempfile::TempDir, Arc<Outbox>) {
    let dir = tempfile::tempdir().unwrap();
    let outbox = Outbox::open(&dir.path().join("var/sendbox.db")).unwrap();
    (dir, Arc::new(outbox))
}

sendbox_outbox::store_behaviour_tests!(fresh_sqlite);

fn value(outbox: &Outbox, key: &str) -> Option<Vec<u8>> {
    outbox.plugin_state_get("p", key).unwrap().map(|(v, _)| v)
}

fn open() -> (tempfile::TempDir, Outbox) {
    let dir = tempfile::tempdir().unwrap();
    let outbox = Outbox::open(&dir.path().join("var/sendbox.db")).unwrap();
    (dir, outbox)
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
    assert_eq!(
        moves(&trail),
        [
            (None, "queued"),
            (Some("queued"), "sending"),
            (Some("sending"), "queued"),
            (Some("queued"), "sending"),
        ],
        "the attempt the crash cut short is on record: {trail:?}"
    );
    assert!(
        trail[2]
            .detail
            .as_deref()
            .is_some_and(|d| d.contains("recovered after restart"))
    );
    assert!(trail.windows(2).all(|w| w[0].at_ms <= w[1].at_ms));
}

/// Schema v9: a claim writes no audit row, and each result one, which
/// keeps when its message went `sending`; the trail shows both entries.
#[test]
fn a_delivery_attempt_is_one_audit_row_and_its_trail_still_shows_it_going_sending() {
    let (dir, outbox) = open();
    let done = outbox
        .commit(call(
            vec![email("a@x.org", "one"), email("b@x.org", "two")],
            vec![],
        ))
        .unwrap();
    let db = rusqlite::Connection::open(dir.path().join("var/sendbox.db")).unwrap();
    let rows = |db: &rusqlite::Connection| -> Vec<(i64, String, String, Option<i64>)> {
        db.prepare("SELECT message, from_state, to_state, started_ms FROM audit ORDER BY id")
            .unwrap()
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap()
    };
    let claimed = outbox.claim("alerts", 10).unwrap();
    assert_eq!(claimed.len(), 2);
    assert!(rows(&db).is_empty(), "a claim writes no audit row");
    let went_sending: Vec<i64> = claimed
        .iter()
        .map(|m| {
            db.query_row(
                "SELECT updated_ms FROM messages WHERE id = ?1",
                [m.id],
                |r| r.get(0),
            )
            .unwrap()
        })
        .collect();
    let trail = outbox.audit_trail(claimed[0].id).unwrap();
    assert_eq!(
        (
            trail[1].from.as_deref(),
            trail[1].to.as_str(),
            trail[1].at_ms
        ),
        (Some("queued"), "sending", went_sending[0]),
        "while sending, the entry comes from the message's row: {trail:?}"
    );
    let answers = outbox
        .mark_many(
            claimed
                .iter()
                .map(|m| sendbox_outbox::Mark {
                    id: m.id,
                    to: State::Sent,
                    next_attempt_ms: None,
                    detail: format!("250 OK {}", m.id),
                    attempted: true,
                })
                .collect(),
        )
        .unwrap();
    assert!(answers.iter().all(Result::is_ok));
    let ids: Vec<i64> = done.queued.iter().map(|q| q.id).collect();
    assert_eq!(
        rows(&db),
        vec![
            (
                ids[0],
                "sending".into(),
                "sent".into(),
                Some(went_sending[0])
            ),
            (
                ids[1],
                "sending".into(),
                "sent".into(),
                Some(went_sending[1])
            ),
        ],
        "one row per result, keeping when the message went sending"
    );
    for (id, at) in ids.iter().zip(&went_sending) {
        let trail = outbox.audit_trail(*id).unwrap();
        let moves: Vec<(Option<&str>, &str, Option<&str>)> = trail
            .iter()
            .map(|e| (e.from.as_deref(), e.to.as_str(), e.detail.as_deref()))
            .collect();
        let reply = format!("250 OK {id}");
        assert_eq!(
            moves[1..],
            [
                (Some("queued"), "sending", None),
                (Some("sending"), "sent", Some(reply.as_str())),
            ]
        );
        assert_eq!(trail[1].at_ms, *at);
    }
    // A stale result (the message is no longer `sending`) writes nothing.
    assert!(matches!(
        outbox.mark(ids[0], State::Dead, None, "stale"),
        Err(OutboxError::WrongState { .. })
    ));
    assert_eq!(rows(&db).len(), 2);
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
fn an_unreadable_message_goes_dead_and_claims_and_commits_go_on() {
    let (dir, outbox) = open();
    let emails = vec![email("a@x.org", "poison"), email("a@x.org", "fine")];
    let ids: Vec<i64> = outbox
        .commit(call(emails, vec![]))
        .unwrap()
        .queued
        .iter()
        .map(|q| q.id)
        .collect();
    // Damaged on disk (or written by a newer sendbox).
    rusqlite::Connection::open(dir.path().join("var/sendbox.db"))
        .unwrap()
        .execute(
            "UPDATE message_bodies SET email_json = 'not json' WHERE message = ?1",
            [ids[0]],
        )
        .unwrap();
    let outbox = Arc::new(outbox);
    let claimer = {
        let outbox = outbox.clone();
        std::thread::spawn(move || outbox.claim("alerts", 10).unwrap())
    };
    // Meanwhile 8 threads commit: some share a transaction with the claim.
    let committers: Vec<_> = (0..8)
        .map(|t| {
            let outbox = outbox.clone();
            std::thread::spawn(move || {
                for i in 0..25 {
                    let mut c = call(vec![email("b@x.org", &format!("{t}-{i}"))], vec![]);
                    c.account = "other".into();
                    outbox.commit(c).unwrap();
                }
            })
        })
        .collect();
    for c in committers {
        c.join().unwrap();
    }
    let claimed = claimer.join().unwrap();
    assert_eq!(claimed.len(), 1, "the readable one is claimed");
    assert_eq!(claimed[0].id, ids[1]);
    let poison = outbox.get(ids[0]);
    assert!(
        poison.is_err(),
        "its email cannot be read, so neither can the message"
    );
    let trail = outbox.audit_trail(ids[0]).unwrap();
    let last = trail.last().unwrap();
    assert_eq!(last.to, "dead");
    assert!(
        last.detail.as_deref().unwrap().contains("cannot be read"),
        "{trail:?}"
    );
    let depth = outbox.depth().unwrap();
    for expected in [(State::Queued, 200), (State::Sending, 1), (State::Dead, 1)] {
        assert!(depth.contains(&expected), "{depth:?}");
    }
    assert!(
        outbox.claim("alerts", 10).unwrap().is_empty(),
        "nothing left to block"
    );
}

/// The child half of the next test: opens the outbox, commits 300 calls a
/// millisecond apart (each acknowledged after its fsync; the WAL starts
/// over several times meanwhile, leaving older frames behind the new ones),
/// says so and waits to be killed.
fn commit_then_wait_to_be_killed(path: &std::path::Path) {
    let outbox = Outbox::open(path).unwrap();
    for i in 0..300 {
        let mut c = call(vec![email("a@x.org", &format!("m{i}"))], vec![]);
        c.event_id = format!("evt-{i}");
        outbox.commit(c).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    println!("COMMITTED 300");
    std::thread::sleep(std::time::Duration::from_secs(600));
}

#[test]
fn a_process_killed_while_its_wal_starts_over_recovers_every_commit() {
    const CHILD: &str = "SENDBOX_OUTBOX_TEST_CHILD_DB";
    if let Some(path) = std::env::var_os(CHILD) {
        return commit_then_wait_to_be_killed(std::path::Path::new(&path));
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sendbox.db");
    // This same test, run as a child process that commits and is killed.
    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "a_process_killed_while_its_wal_starts_over_recovers_every_commit",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD, &path)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    loop {
        line.clear();
        let n = std::io::BufRead::read_line(&mut out, &mut line).unwrap();
        assert!(n > 0, "the child ended before committing");
        if line.contains("COMMITTED 300") {
            break;
        }
    }
    child.kill().unwrap(); // SIGKILL: no close, no final checkpoint
    child.wait().unwrap();
    let mut wal = path.as_os_str().to_owned();
    wal.push("-wal");
    assert!(
        std::fs::metadata(&wal).unwrap().len() > 0,
        "the killed process left its WAL behind"
    );
    let outbox = Outbox::open(&path).unwrap();
    let queued = outbox.list(Some(State::Queued), 1000).unwrap();
    assert_eq!(queued.len(), 300, "every acknowledged commit is there");
    let mut subjects: Vec<String> = queued.iter().map(|m| m.email.subject.clone()).collect();
    subjects.sort();
    subjects.dedup();
    assert_eq!(subjects.len(), 300);
}

/// Commits are made durable with fdatasync(2), not fsync(2), which would
/// also write the WAL's inode (its timestamps) on every group commit: one
/// more synchronous write each (`.cargo/config.toml` builds SQLite so).
/// Seen from outside with strace: this same test, run as a child, commits
/// three calls. Also seen there: each commit's WAL frames go out in one
/// `pwrite` (`sqlite::wal_writes`), not two per frame.
#[test]
fn a_commit_is_made_durable_with_fdatasync() {
    const CHILD: &str = "SENDBOX_OUTBOX_TEST_SYNC_DB";
    if let Some(path) = std::env::var_os(CHILD) {
        let outbox = Outbox::open(std::path::Path::new(&path)).unwrap();
        for i in 0..3 {
            let mut c = call(vec![email("a@x.org", &format!("m{i}"))], vec![]);
            c.event_id = format!("evt-{i}");
            outbox.commit(c).unwrap();
        }
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let dir_path = std::fs::canonicalize(dir.path()).unwrap();
    let path = dir_path.join("sendbox.db");
    let log = dir_path.join("strace.log");
    let status = std::process::Command::new("strace")
        .args([
            "-f",
            "-qq",
            "-y",
            "-e",
            "trace=fsync,fdatasync,pwrite64",
            "-o",
        ])
        .arg(&log)
        .arg(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "a_commit_is_made_durable_with_fdatasync",
            "--test-threads=1",
        ])
        .env(CHILD, &path)
        .stdout(std::process::Stdio::null())
        .status()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run strace ({e}): install Debian's strace package (./scripts/test.sh does)"
            )
        });
    assert!(status.success(), "the committing child failed under strace");
    let text = std::fs::read_to_string(&log).unwrap();
    let wal = format!("{}-wal>", path.display());
    let on_wal = |call: &str| {
        text.lines()
            .filter(|l| l.contains(&format!(" {call}(")) && l.contains(&wal))
            .count()
    };
    assert!(
        on_wal("fdatasync") >= 3,
        "each of the 3 commits syncs the WAL with fdatasync; strace saw:\n{text}"
    );
    assert_eq!(
        on_wal("fsync"),
        0,
        "no commit syncs the WAL with fsync; strace saw:\n{text}"
    );
    // Each commit's frames (two writes each, header and page, as SQLite
    // makes them) reach the WAL in one write before its sync.
    let mut writes_before_sync = Vec::new();
    let mut writes = 0;
    for line in text.lines().filter(|l| l.contains(&wal)) {
        if line.contains(" pwrite64(") {
            writes += 1;
        } else if line.contains(" fdatasync(") {
            writes_before_sync.push(writes);
            writes = 0;
        }
    }
    assert!(
        writes_before_sync.iter().filter(|&&n| n > 0).count() >= 3,
        "the 3 commits wrote the WAL; strace saw:\n{text}"
    );
    assert!(
        writes_before_sync.iter().all(|&n| n <= 1),
        "WAL writes before each sync: {writes_before_sync:?}; strace saw:\n{text}"
    );
}

/// A commit of plugin `p` with one email and `emails_per_hour = limit`.
fn limited(limit: u32) -> sendbox_outbox::Call {
    let mut c = call(vec![email("a@x.org", "limited")], vec![]);
    c.policy.emails_per_hour = Some(limit);
    c.policy.idempotency_hours = 0;
    c
}

fn refused_for_rate(r: Result<sendbox_outbox::Committed, OutboxError>) -> bool {
    matches!(&r, Err(e) if e.to_string().contains("emails_per_hour"))
}

/// The writer keeps each rate window's count instead of counting the
/// window at every commit: the count must stay what a full count says as
/// the window moves past old rows, as the writer queues rows itself, and
/// when rows change behind its back — dropped by the operator, or
/// changed by another connection.
#[test]
fn a_rate_limit_counts_exactly_as_its_window_moves_and_rows_change() {
    let (dir, outbox) = open();
    let path = dir.path().join("var/sendbox.db");
    let other = rusqlite::Connection::open(&path).unwrap();
    other
        .busy_timeout(std::time::Duration::from_secs(5))
        .unwrap();
    // Five emails queued without a limit, then moved (by another
    // connection) to leave the hour's window 1.5 s from now.
    for _ in 0..5 {
        outbox
            .commit(call(vec![email("a@x.org", "old")], vec![]))
            .unwrap();
    }
    let leaves_at = sendbox_outbox::now_ms() - 3_600_000 + 1_500;
    other
        .execute("UPDATE messages SET created_ms = ?1", [leaves_at])
        .unwrap();
    // In the window: 5 + 1 fits a limit of 6, and then nothing more.
    outbox.commit(limited(6)).unwrap();
    assert!(
        refused_for_rate(outbox.commit(limited(6))),
        "7 > 6 in the hour"
    );
    // Once the five have left the window, only the writer's own one counts.
    std::thread::sleep(std::time::Duration::from_millis(2_000));
    for n in 2..=6 {
        outbox
            .commit(limited(6))
            .unwrap_or_else(|e| panic!("email {n} of 6 in the hour refused: {e}"));
    }
    assert!(refused_for_rate(outbox.commit(limited(6))), "7 > 6 again");
    // The operator drops one: there is room for one more.
    let dropped = outbox.list(None, 1).unwrap()[0].id;
    outbox.drop_message(dropped).unwrap();
    outbox.commit(limited(6)).unwrap();
    assert!(refused_for_rate(outbox.commit(limited(6))));
    // Another connection moves every row out of the window: all room again.
    other
        .execute("UPDATE messages SET created_ms = ?1", [leaves_at - 10_000])
        .unwrap();
    for n in 1..=6 {
        outbox
            .commit(limited(6))
            .unwrap_or_else(|e| panic!("email {n} of 6 refused after the rows left: {e}"));
    }
    assert!(refused_for_rate(outbox.commit(limited(6))));
}

/// 16 callers at once against one hourly limit: exactly the limit is
/// queued, every other email refused for it, across the writer's groups.
#[test]
fn concurrent_callers_queue_exactly_a_rate_limit() {
    let (_dir, outbox) = open();
    let outbox = Arc::new(outbox);
    let callers: Vec<_> = (0..16)
        .map(|_| {
            let outbox = outbox.clone();
            std::thread::spawn(move || {
                let (mut queued, mut refused) = (0, 0);
                for _ in 0..10 {
                    match outbox.commit(limited(100)) {
                        Ok(done) => queued += done.queued.len(),
                        Err(e) if e.to_string().contains("emails_per_hour") => refused += 1,
                        Err(e) => panic!("{e}"),
                    }
                }
                (queued, refused)
            })
        })
        .collect();
    let (queued, refused) = callers
        .into_iter()
        .map(|c| c.join().unwrap())
        .fold((0, 0), |a, b| (a.0 + b.0, a.1 + b.1));
    assert_eq!((queued, refused), (100, 60));
    assert_eq!(outbox.list(None, 1_000).unwrap().len(), 100);
}
