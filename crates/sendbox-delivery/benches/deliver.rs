//! Outbox → SMTP against the transport alone, in the same run: messages per
//! second to the loopback SMTP peer (STARTTLS + XOAUTH2) through at most 3
//! connections.
//!
//! - `transport`: the same messages built and handed to the SMTP transport,
//!   3 at a time, with no storage at all — the ceiling.
//! - `outbox`: one account worker delivering a filled outbox, every claim
//!   and result committed to SQLite, the clock stopped when every message
//!   is recorded `sent`.
//!
//! Each run starts warm (a new transport whose token is fetched and whose 3
//! connections are open, as in a running daemon); runs alternate, and the
//! ratio of the medians and the run-by-run ratios are printed. Issue 12's target: outbox ≥ 0.8×
//! transport.
//!
//! Full run:   cargo bench -p sendbox-delivery --bench deliver
//! Smoke run:  cargo test -p sendbox-delivery --bench deliver
//! One side:   cargo bench -p sendbox-delivery --bench deliver -- --only outbox
//!             (or `transport`: its runs alone, a line each with the CPU per
//!             message of sendbox, of the outbox's writer thread and of the
//!             SMTP peer; the load a profiler attaches to)

/// The daemon's allocator (`crates/sendbox/src/lib.rs`), so this measures
/// what the daemon runs.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use sendbox_test_support::cpu;
use sendbox_test_support::peers;
use sendbox_test_support::smtp_peer;

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use sendbox_delivery::{AccountWorker, DeliverySettings};
use sendbox_mail::Transport;
use sendbox_mail::message::{self, Envelope};
use sendbox_mail::smtp::SmtpTransport;
use sendbox_outbox::{Call, Outbox, Policy, State};
use sendbox_types::Email;

const MAILBOX: &str = "bench@example.com";

fn email(subject: String) -> Email {
    Email {
        to: vec!["ops@example.com".into()],
        subject,
        text: Some("x".repeat(2000)),
        ..Email::default()
    }
}

/// A transport with its token fetched and its 3 connections open: each
/// run starts warm, as a running daemon is.
async fn warm_transport(p: &peers::Peers) -> sendbox_mail::smtp::SmtpTransport {
    let smtp = smtp_peer::starttls(p, MAILBOX, &p.info.clients.secret.client_secret).0;
    let m: Vec<_> = (0..3)
        .map(|i| smtp_peer::prepared(MAILBOX, &format!("warm-up {i}")))
        .collect();
    let sent = tokio::join!(
        smtp.send(m[0].clone()),
        smtp.send(m[1].clone()),
        smtp.send(m[2].clone())
    );
    for r in [sent.0, sent.1, sent.2] {
        r.unwrap();
    }
    smtp
}

/// The transport alone: `total` messages built from the same `Email`s the
/// outbox holds and sent, at most 12 waiting for the transport's 3
/// connections. Building is inside the clock because the worker builds
/// too: the difference is what storage costs.
async fn transport_only(smtp: SmtpTransport, total: usize, run: usize) -> (SystemTime, Duration) {
    let smtp = Arc::new(smtp);
    let emails: Vec<Email> = (0..total).map(|i| email(format!("t{i}"))).collect();
    let (started, start) = (SystemTime::now(), Instant::now());
    let mut tasks = tokio::task::JoinSet::new();
    for (i, email) in emails.into_iter().enumerate() {
        let smtp = smtp.clone();
        tasks.spawn(async move {
            let id = format!("<t{run}.{i}@example.com>");
            let msg = message::build(
                &email,
                &Envelope {
                    account_mailbox: MAILBOX,
                    allowed_from: &[],
                    message_id: &id,
                    date: SystemTime::now(),
                },
            )
            .unwrap();
            smtp.send(msg).await
        });
        while tasks.len() >= 12 {
            tasks.join_next().await.unwrap().unwrap().unwrap();
        }
    }
    while let Some(r) = tasks.join_next().await {
        r.unwrap().unwrap();
    }
    (started, start.elapsed())
}

/// What one outbox run measured besides its clock: the CPU time of the
/// whole process and of the outbox's writer thread while it delivered.
struct OutboxCpu {
    process: Duration,
    writer: Duration,
}

/// One worker delivering a filled outbox until every message is `sent`.
async fn from_outbox(smtp: SmtpTransport, total: usize) -> (OutboxCpu, SystemTime, Duration) {
    let dir = tempfile::tempdir().unwrap();
    let outbox = Arc::new(Outbox::open(&dir.path().join("bench.db")).unwrap());
    for chunk in 0..total / 10 {
        Outbox::commit(
            &outbox,
            Call {
                plugin: "bench".into(),
                trigger: "cli".into(),
                event_id: format!("e{chunk}"),
                account: "a".into(),
                account_mailbox: MAILBOX.into(),
                policy: Policy::default(),
                emails: (0..10).map(|i| email(format!("n{chunk}-{i}"))).collect(),
                ..Default::default()
            },
        )
        .unwrap();
    }
    let settings = DeliverySettings {
        rate_per_minute: None,
        concurrency: 3,
        poll_interval: Duration::from_millis(20),
        ..DeliverySettings::default()
    };
    let worker = AccountWorker::new(
        "a",
        MAILBOX,
        Transport::Smtp(Box::new(smtp)),
        outbox.clone(),
        settings,
    );
    let stop = Arc::new(tokio::sync::Notify::new());
    let s = stop.clone();
    let (started, start, cpu) = (SystemTime::now(), Instant::now(), cpu::process());
    let writer = cpu::threads_named("outbox-writer");
    let handle = tokio::spawn(worker.run(async move { s.notified().await }));
    loop {
        // Read on this thread: through the store's async API each look
        // would wake a blocking-pool thread, a thousand times a second,
        // which the transport-only side is not charged.
        let depth = Outbox::depth(&outbox).unwrap();
        if depth
            .iter()
            .any(|(s, n)| *s == State::Sent && *n == total as u64)
        {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(300),
            "stuck: {depth:?}"
        );
        // The clock stops within a millisecond of the last result.
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let (elapsed, cpu) = (start.elapsed(), cpu::process() - cpu);
    let writer = cpu::threads_named("outbox-writer") - writer;
    stop.notify_one();
    handle.await.unwrap();
    (
        OutboxCpu {
            process: cpu,
            writer,
        },
        started,
        elapsed,
    )
}

fn rate(total: usize, d: Duration) -> f64 {
    total as f64 / d.as_secs_f64()
}

fn summary(rates: &mut [f64]) -> (f64, f64, f64) {
    rates.sort_by(f64::total_cmp);
    (rates[0], rates[rates.len() / 2], rates[rates.len() - 1])
}

#[tokio::main]
async fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    // 10,000 messages: a run of a few thousand lasts under half a second,
    // which this machine's scheduling swings by a factor of two or three.
    let (total, runs) = if full { (10_000, 9) } else { (30, 1) };
    let args: Vec<String> = std::env::args().collect();
    let only = args
        .iter()
        .position(|a| a == "--only")
        .map(|i| args.get(i + 1).map(String::as_str).unwrap_or_default());
    if let Some(side) = only {
        assert!(
            side == "outbox" || side == "transport",
            "--only takes `outbox` or `transport`, not {side:?}"
        );
        return one_side(side == "outbox", total, runs).await;
    }
    let p = peers::Peers::start();
    let (mut bare, mut ours) = (Vec::new(), Vec::new());
    let mut max_connections = 0;
    let (mut bare_cpu, mut ours_cpu) = (Duration::ZERO, Duration::ZERO);
    // Per mode: envelopes written behind the previous content, and the
    // longest stretch in which no message arrived at the peer.
    let (mut behind, mut gaps) = ([0u64; 2], [Vec::new(), Vec::new()]);
    let mut peer_cpus = [Duration::ZERO; 2];
    // Per mode: ms from the start to the first arrival and from the last
    // arrival to the end, and the rate between the first and the last.
    let (mut edges, mut steady) = ([Vec::new(), Vec::new()], [Vec::new(), Vec::new()]);
    for run in 0..runs {
        // Alternate which goes first, so neither always gets the warmer
        // machine.
        for first in [run % 2 == 0, run % 2 == 1] {
            let smtp = warm_transport(&p).await;
            p.reset().await;
            let peer_cpu = cpu::processes_named("node");
            let (started, elapsed) = if first {
                let cpu = cpu::process();
                let (started, elapsed) = transport_only(smtp, total, run).await;
                bare.push(rate(total, elapsed));
                bare_cpu += cpu::process() - cpu;
                (started, elapsed)
            } else {
                let (cpu, started, elapsed) = from_outbox(smtp, total).await;
                ours.push(rate(total, elapsed));
                ours_cpu += cpu.process;
                (started, elapsed)
            };
            let stats = p.stats().await;
            assert_eq!(stats.messages, total as u64, "every message arrived, once");
            let mode = usize::from(!first);
            peer_cpus[mode] += cpu::processes_named("node") - peer_cpu;
            behind[mode] += stats.pipelined_after_content;
            let mut at: Vec<i64> = p.messages().await.iter().map(|m| m.at_ms).collect();
            at.sort_unstable();
            gaps[mode].push(at.windows(2).map(|w| w[1] - w[0]).max().unwrap_or(0));
            let ms = |t: SystemTime| {
                t.duration_since(SystemTime::UNIX_EPOCH)
                    .map_or(0, |d| d.as_millis() as i64)
            };
            let (first_at, last_at) = (at[0], at[at.len() - 1]);
            edges[mode].push((first_at - ms(started), ms(started + elapsed) - last_at));
            steady[mode].push(1000.0 * (total - 1) as f64 / (last_at - first_at).max(1) as f64);
            max_connections = max_connections.max(stats.max_connections);
        }
    }
    // Each run's two halves ran back to back: their ratio is less exposed
    // to the machine's drift than a ratio of medians.
    let mut paired: Vec<f64> = ours.iter().zip(&bare).map(|(o, b)| o / b).collect();
    let (b, o) = (summary(&mut bare), summary(&mut ours));
    let pairs = summary(&mut paired);
    println!(
        "outbox -> SMTP vs the transport alone: {total} messages of 2 KB, 3 connections max, {runs} alternated runs"
    );
    println!(
        "  transport only   min {:>6.0}  median {:>6.0}  max {:>6.0} messages/s",
        b.0, b.1, b.2
    );
    println!(
        "  outbox -> SMTP   min {:>6.0}  median {:>6.0}  max {:>6.0} messages/s   (every claim and result recorded)",
        o.0, o.1, o.2
    );
    let per_message = |cpu: Duration, n: usize| cpu.as_micros() as f64 / (total * n).max(1) as f64;
    println!(
        "  CPU per message: sendbox {:.0} µs and the SMTP peer {:.0} µs with the transport only, {:.0} µs and {:.0} µs with the outbox",
        per_message(bare_cpu, bare.len()),
        per_message(peer_cpus[0], bare.len()),
        per_message(ours_cpu, ours.len()),
        per_message(peer_cpus[1], ours.len())
    );
    println!(
        "  ratio (medians)  {:.2};  run by run min {:.2} median {:.2} max {:.2}   target ≥ 0.80;  max {max_connections} connections (cap 3)",
        o.1 / b.1,
        pairs.0,
        pairs.1,
        pairs.2
    );
    let share = |n: u64, runs: usize| 100.0 * n as f64 / (total * runs.max(1)) as f64;
    let longest = |g: &mut Vec<i64>| {
        g.sort_unstable();
        g.get(g.len() / 2).copied().unwrap_or(0)
    };
    println!(
        "  envelopes behind the previous content: transport only {:.0}%, outbox -> SMTP {:.0}%;  longest pause between arrivals (median): {} ms, {} ms",
        share(behind[0], bare.len()),
        share(behind[1], ours.len()),
        longest(&mut gaps[0]),
        longest(&mut gaps[1])
    );
    let edge = |e: &mut Vec<(i64, i64)>| {
        e.sort_unstable_by_key(|(a, b)| a + b);
        e.get(e.len() / 2).copied().unwrap_or_default()
    };
    let (te, oe) = (edge(&mut edges[0]), edge(&mut edges[1]));
    let (ts, os) = (summary(&mut steady[0]), summary(&mut steady[1]));
    println!(
        "  between the first and the last arrival (median): transport only {:.0}, outbox -> SMTP {:.0} messages/s ({:.2});  before the first and after the last: {} + {} ms, {} + {} ms",
        ts.1,
        os.1,
        os.1 / ts.1,
        te.0,
        te.1,
        oe.0,
        oe.1
    );
    assert!(max_connections <= 3, "the connection cap held");
}

/// `--only`: one side's runs, a line each: messages/s and the CPU per
/// message of sendbox, of the outbox's writer (outbox runs) and of the peer.
async fn one_side(outbox: bool, total: usize, runs: usize) {
    let p = peers::Peers::start();
    let side = if outbox {
        "outbox -> SMTP"
    } else {
        "transport only"
    };
    println!("{side}: {total} messages of 2 KB, 3 connections max, {runs} runs");
    let us = |d: Duration| d.as_secs_f64() * 1e6 / total as f64;
    for run in 0..runs {
        let smtp = warm_transport(&p).await;
        p.reset().await;
        let peer = cpu::processes_named("node");
        let (per_second, sendbox, writer) = if outbox {
            let (cpu, _, elapsed) = from_outbox(smtp, total).await;
            (rate(total, elapsed), cpu.process, Some(cpu.writer))
        } else {
            let cpu = cpu::process();
            let (_, elapsed) = transport_only(smtp, total, run).await;
            (rate(total, elapsed), cpu::process() - cpu, None)
        };
        let peer = cpu::processes_named("node") - peer;
        assert_eq!(
            p.stats().await.messages,
            total as u64,
            "every message arrived, once"
        );
        let writer = writer.map_or(String::new(), |w| {
            format!(" (outbox writer {:>4.1})", us(w))
        });
        println!(
            "  {side}  {per_second:>6.0} messages/s  CPU per message: sendbox {:>4.1} µs{writer}, SMTP peer {:>4.1} µs",
            us(sendbox),
            us(peer)
        );
    }
}
