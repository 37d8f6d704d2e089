//! The sandbox against real components built from `plugins/` and
//! `tests/plugins/`.
//!
//! - example plugins: each handles its sample event as documented;
//! - hostile plugins: each attack is stopped or refused with a clear error,
//!   and the same runtime handles a normal event right after;
//! - loading: unsupported imports are refused by name, corrupt bytes are
//!   refused, and the compiled-code cache is used on the second load.
//!
//! Over 500 lines on purpose: one test binary for every component the
//! runtime loads, so they compile once and share one engine.

use sendbox_test_support::capture;
use sendbox_test_support::wasm;

use std::collections::BTreeMap;
use std::sync::{Arc, OnceLock};

use sendbox_runtime::{
    CompileSource, Event, LoadError, MemoryState, Plugin, PluginSettings, RunFailure, Runtime,
    RuntimeOptions, StateChange, StateStore,
};

fn runtime() -> &'static Runtime {
    static RT: OnceLock<Runtime> = OnceLock::new();
    RT.get_or_init(|| Runtime::new(RuntimeOptions::default()).expect("runtime starts"))
}

fn settings(pairs: &[(&str, &str)]) -> PluginSettings {
    PluginSettings {
        config: pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect::<BTreeMap<_, _>>(),
        ..PluginSettings::default()
    }
}

fn example(name: &str, pairs: &[(&str, &str)]) -> Plugin {
    runtime()
        .load_file(name, &wasm::example(name), settings(pairs))
        .expect("example plugin loads")
}

fn sample(plugin: &str) -> Event {
    let path = wasm::repo_root()
        .join("plugins")
        .join(plugin)
        .join("sample-event.json");
    let text = std::fs::read_to_string(&path).expect("sample event exists");
    serde_json::from_str(&text).expect("sample event parses")
}

fn webhook(body: &str) -> Event {
    serde_json::from_value(serde_json::json!({"webhook": {"path": "/hooks/t", "body": body}}))
        .unwrap()
}

fn hostile(mode: &str) -> Plugin {
    runtime()
        .load_file(
            &format!("hostile-{mode}"),
            &wasm::hostile("hostile"),
            settings(&[("mode", mode)]),
        )
        .expect("hostile plugin loads")
}

/// After every attack the same runtime must still serve a normal event.
fn assert_runtime_still_serves() {
    let ok = hostile("ok");
    let report = ok
        .run(&webhook("{}"), "after", Arc::new(MemoryState::new()))
        .expect("a normal event succeeds after the attack");
    assert_eq!(report.outcome.emails.len(), 1);
    assert_eq!(report.outcome.emails[0].subject, "ok");
}

fn run_hostile(mode: &str) -> sendbox_runtime::RunError {
    let err = hostile(mode)
        .run(
            &webhook("{}"),
            &format!("evt-{mode}"),
            Arc::new(MemoryState::new()),
        )
        .expect_err("the attack must fail");
    assert_eq!(err.plugin, format!("hostile-{mode}"));
    assert_eq!(err.event_id, format!("evt-{mode}"));
    assert_runtime_still_serves();
    err
}

// ---- example plugins -------------------------------------------------------

#[test]
fn file_alert_attaches_the_file_and_renders_the_subject() {
    let plugin = example(
        "file-alert",
        &[
            ("to", "ops@example.com"),
            ("subject", "New {change}: {path} ({size} B)"),
        ],
    );
    let report = plugin
        .run(&sample("file-alert"), "e1", Arc::new(MemoryState::new()))
        .unwrap();
    let email = &report.outcome.emails[0];
    assert_eq!(email.to, ["ops@example.com"]);
    assert_eq!(email.subject, "New created: reports/2026-11-27.csv (36 B)");
    assert_eq!(email.attachments.len(), 1);
    assert_eq!(email.attachments[0].filename, "2026-11-27.csv");
    assert_eq!(email.attachments[0].content_type, "text/csv");
    assert!(email.attachments[0].data.0.starts_with(b"region,orders"));
}

#[test]
fn file_alert_describes_instead_of_attaching_over_its_size_cap() {
    let plugin = example(
        "file-alert",
        &[("to", "ops@example.com"), ("max_attachment_bytes", "10")],
    );
    let report = plugin
        .run(&sample("file-alert"), "e1", Arc::new(MemoryState::new()))
        .unwrap();
    let email = &report.outcome.emails[0];
    assert!(email.attachments.is_empty());
    assert!(
        email
            .text
            .as_deref()
            .unwrap()
            .contains("over the 10-byte limit")
    );
}

#[test]
fn file_alert_without_recipient_fails_with_the_fix() {
    let plugin = example("file-alert", &[]);
    let err = plugin
        .run(&sample("file-alert"), "e1", Arc::new(MemoryState::new()))
        .unwrap_err();
    assert!(err.to_string().contains("config `to` is missing"), "{err}");
}

fn bridge() -> Plugin {
    example(
        "webhook-bridge",
        &[("to", "oncall@example.com, lead@example.com")],
    )
}

#[test]
fn webhook_bridge_turns_an_alert_list_into_text_and_html() {
    let report = bridge()
        .run(
            &sample("webhook-bridge"),
            "e1",
            Arc::new(MemoryState::new()),
        )
        .unwrap();
    let email = &report.outcome.emails[0];
    assert_eq!(email.to, ["oncall@example.com", "lead@example.com"]);
    assert_eq!(
        email.subject,
        "[webhook] FIRING: DiskFull (1 alert, 1 firing)"
    );
    assert!(
        email
            .text
            .as_deref()
            .unwrap()
            .contains("Disk /var is 97% full")
    );
    assert!(
        email
            .html
            .as_deref()
            .unwrap()
            .contains("<b>[firing] DiskFull</b>")
    );
    assert!(
        email
            .idempotency_key
            .as_deref()
            .unwrap()
            .starts_with("alerts:")
    );
    assert!(report.outcome.response.is_none());
}

#[test]
fn webhook_bridge_escapes_html_in_a_push() {
    let path = wasm::repo_root().join("plugins/webhook-bridge/samples/push.json");
    let event: Event = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let report = bridge()
        .run(&event, "e1", Arc::new(MemoryState::new()))
        .unwrap();
    let email = &report.outcome.emails[0];
    assert_eq!(
        email.subject,
        "[webhook] dana pushed 2 commits to acme/api:main"
    );
    let html = email.html.as_deref().unwrap();
    assert!(html.contains("Fix &lt;script&gt; escaping"), "{html}");
    assert!(!html.contains("<script>"));
}

#[test]
fn webhook_bridge_answers_400_with_the_reason_and_sends_nothing() {
    let report = bridge()
        .run(
            &webhook("this is not json"),
            "e1",
            Arc::new(MemoryState::new()),
        )
        .unwrap();
    assert!(report.outcome.emails.is_empty());
    let resp = report.outcome.response.unwrap();
    assert_eq!(resp.status, 400);
    let body: serde_json::Value = serde_json::from_slice(&resp.body.0).unwrap();
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("not the expected JSON"),
        "{body}"
    );

    let unknown = bridge()
        .run(
            &webhook(r#"{"hello": 1}"#),
            "e2",
            Arc::new(MemoryState::new()),
        )
        .unwrap();
    assert_eq!(unknown.outcome.response.unwrap().status, 400);
    assert!(unknown.outcome.emails.is_empty());

    // An alert list that does not read as one, and an array that would
    // read as an alert list's fields in order: each refused with its reason.
    for (body, reason) in [
        (
            r#"{"status": "firing", "alerts": [{"labels": {"severity": 3}}]}"#,
            "not a valid alert list",
        ),
        (r#"["firing", "alerts", []]"#, "unrecognised payload"),
    ] {
        let refused = bridge()
            .run(&webhook(body), "e3", Arc::new(MemoryState::new()))
            .unwrap();
        assert!(refused.outcome.emails.is_empty(), "{body}");
        let resp = refused.outcome.response.unwrap();
        assert_eq!(resp.status, 400);
        let answer = String::from_utf8_lossy(&resp.body.0).into_owned();
        assert!(answer.contains(reason), "{body}: {answer}");
    }
}

#[test]
fn daily_digest_records_events_then_sends_one_digest_and_clears() {
    let plugin = example("daily-digest", &[("to", "team@example.com")]);
    let store = Arc::new(MemoryState::new());
    let tick = sample("daily-digest");

    // Nothing recorded: nothing sent.
    let empty = plugin.run(&tick, "t0", store.clone()).unwrap();
    assert!(empty.outcome.emails.is_empty());

    for (i, ev) in [sample("file-alert"), webhook("{}")].iter().enumerate() {
        let r = plugin.run(ev, &format!("e{i}"), store.clone()).unwrap();
        assert!(r.outcome.emails.is_empty());
        store.apply("daily-digest", &r.state_changes);
    }
    assert_eq!(store.keys("daily-digest", "entry/", 100).unwrap().len(), 2);

    let digest = plugin.run(&tick, "t1", store.clone()).unwrap();
    assert_eq!(digest.outcome.emails.len(), 1);
    let email = &digest.outcome.emails[0];
    assert_eq!(email.subject, "Digest: 2 events");
    let text = email.text.as_deref().unwrap();
    assert!(
        text.contains("file created in incoming: reports/2026-11-27.csv"),
        "{text}"
    );
    assert!(text.contains("webhook POST /hooks/t"), "{text}");
    store.apply("daily-digest", &digest.state_changes);
    assert!(
        store.entries("daily-digest").is_empty(),
        "digest clears the state"
    );

    let again = plugin.run(&tick, "t2", store).unwrap();
    assert!(again.outcome.emails.is_empty());
}

// ---- hostile plugins -------------------------------------------------------

#[test]
fn nothing_an_event_leaves_in_memory_reaches_the_next() {
    // Instance memory is reset in place rather than unmapped (see
    // `engine_config`); every event must still start from the image.
    let p = hostile("leftovers");
    for _ in 0..5 {
        let report = p
            .run(&webhook("{}"), "evt", Arc::new(MemoryState::new()))
            .unwrap();
        assert_eq!(report.outcome.emails[0].subject, "events=1 low=0 high=0");
    }
}

#[test]
fn an_hour_long_sleep_is_stopped_at_the_time_limit() {
    // Sleeping is not computing, so epochs alone would let the plugin hold
    // its thread for the whole hour.
    let p = runtime()
        .load_file(
            "hostile-sleep",
            &wasm::hostile("hostile"),
            settings(&[("mode", "slow"), ("sleep_ms", "3600000")]),
        )
        .unwrap();
    let started = std::time::Instant::now();
    let err = p
        .run(&webhook("{}"), "evt-sleep", Arc::new(MemoryState::new()))
        .expect_err("an hour's sleep must not finish");
    assert_eq!(err.cause.kind(), "timeout", "{err}");
    // The default limit is 1 s; an hour would be 3,600.
    assert!(
        started.elapsed() < std::time::Duration::from_secs(60),
        "{:?}",
        started.elapsed()
    );
    // A short sleep inside the budget still works.
    let ok = runtime()
        .load_file(
            "hostile-nap",
            &wasm::hostile("hostile"),
            settings(&[("mode", "slow"), ("sleep_ms", "20"), ("label", "rested")]),
        )
        .unwrap()
        .run(&webhook("{}"), "evt-nap", Arc::new(MemoryState::new()))
        .unwrap();
    assert_eq!(ok.outcome.emails[0].subject, "rested");
    assert_runtime_still_serves();
}

#[test]
fn infinite_loop_is_stopped_at_the_cpu_limit() {
    let err = run_hostile("loop");
    assert!(
        matches!(err.cause, RunFailure::Timeout { limit_ms: 1000 }),
        "{err}"
    );
    assert!(err.to_string().contains("CPU limit of 1000 ms"), "{err}");
}

/// Runs `f` on this thread while three busy threads share its core, so it
/// gets about a quarter of that core.
fn on_a_crowded_core<R>(f: impl FnOnce() -> R) -> R {
    // SAFETY: plain libc calls on a local, zeroed cpu_set_t.
    let pin = |cpu: usize| unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        assert_eq!(
            libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set),
            0,
            "pinning a thread to CPU {cpu}"
        );
    };
    let cpu = usize::try_from(unsafe { libc::sched_getcpu() }).expect("sched_getcpu");
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let spinners: Vec<_> = (0..3)
        .map(|_| {
            let stop = stop.clone();
            std::thread::spawn(move || {
                pin(cpu);
                let mut n = 0u64;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    n = std::hint::black_box(n.wrapping_add(1));
                }
            })
        })
        .collect();
    pin(cpu);
    let result = f();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for s in spinners {
        s.join().unwrap();
    }
    result
}

fn looping(limits: &[(&str, u64)]) -> Plugin {
    let table: serde_json::Map<String, serde_json::Value> = limits
        .iter()
        .map(|(k, v)| (k.to_string(), (*v).into()))
        .collect();
    let mut s = settings(&[("mode", "loop")]);
    s.limits = serde_json::from_value(table.into()).unwrap();
    runtime()
        .load_file("hostile-crowded", &wasm::hostile("hostile"), s)
        .unwrap()
}

#[test]
fn the_cpu_limit_counts_cpu_time_not_time_spent_waiting_for_a_core() {
    // A plugin given a quarter of a core is not failed for the host being
    // busy: it is stopped when it has computed for 200 ms, which takes
    // about 800 ms of wall time here. A wall-clock "CPU limit" would stop
    // it at 200.
    let p = looping(&[("cpu_ms_per_event", 200), ("wall_ms_per_event", 30_000)]);
    let (err, took) = std::thread::spawn(move || {
        on_a_crowded_core(|| {
            let started = std::time::Instant::now();
            let err = p
                .run(&webhook("{}"), "evt-crowded", Arc::new(MemoryState::new()))
                .expect_err("an endless loop fails");
            (err, started.elapsed())
        })
    })
    .join()
    .unwrap();
    assert!(
        matches!(err.cause, RunFailure::Timeout { limit_ms: 200 }),
        "{err}"
    );
    assert!(
        took >= std::time::Duration::from_millis(400),
        "stopped after {took:?} of wall time with three threads on its core: the CPU limit counted waiting"
    );
}

#[test]
fn the_wall_clock_limit_stops_an_event_the_host_is_too_busy_to_finish() {
    let p = looping(&[("cpu_ms_per_event", 1000), ("wall_ms_per_event", 1000)]);
    let err = std::thread::spawn(move || {
        on_a_crowded_core(|| {
            p.run(&webhook("{}"), "evt-starved", Arc::new(MemoryState::new()))
                .expect_err("an endless loop fails")
        })
    })
    .join()
    .unwrap();
    let RunFailure::WallTimeout {
        limit_ms,
        cpu_ms,
        cpu_used_ms,
    } = err.cause
    else {
        panic!("expected the wall-clock limit: {err}");
    };
    assert_eq!((limit_ms, cpu_ms), (1000, 1000));
    assert!(cpu_used_ms < 1000, "{cpu_used_ms} ms of CPU");
    assert_eq!(err.cause.kind(), "timeout");
    assert!(
        err.to_string().contains("wall-clock limit of 1000 ms"),
        "{err}"
    );
    // A wall limit below the CPU limit is refused with the fix.
    let mut s = settings(&[("mode", "loop")]);
    s.limits =
        serde_json::from_str(r#"{"cpu_ms_per_event": 500, "wall_ms_per_event": 100}"#).unwrap();
    let refused = runtime()
        .load_file("hostile-bad-wall", &wasm::hostile("hostile"), s)
        .expect_err("a wall limit below the CPU limit is refused");
    assert!(
        refused
            .to_string()
            .contains("wall_ms_per_event = 100 is below cpu_ms_per_event = 500"),
        "{refused}"
    );
}

// ---- on an async worker (Plugin::run_async) --------------------------------

/// A Tokio runtime with a single worker: whatever holds it holds every task.
fn one_worker() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("a Tokio runtime")
}

#[test]
fn an_event_on_a_worker_gives_what_it_gives_on_a_thread() {
    let p = bridge();
    let event = sample("webhook-bridge");
    let on_thread = p
        .run(&event, "e1", Arc::new(MemoryState::new()))
        .expect("runs on this thread");
    let on_worker = one_worker()
        .block_on(p.run_async(&event, "e1", Arc::new(MemoryState::new())))
        .expect("runs on the worker");
    assert_eq!(
        serde_json::to_value(&on_worker.outcome).unwrap(),
        serde_json::to_value(&on_thread.outcome).unwrap()
    );
    assert_eq!(on_worker.outcome.emails.len(), 1);
}

#[test]
fn the_blocking_run_may_be_called_from_a_worker_too() {
    // Tools and tests call `run` from async code as well; it hands the
    // worker's role on rather than blocking (or panicking on) the worker.
    let p = bridge();
    let event = sample("webhook-bridge");
    let report = one_worker()
        .block_on(async move {
            tokio::spawn(async move { p.run(&event, "e1", Arc::new(MemoryState::new())) }).await
        })
        .unwrap()
        .expect("runs from the worker");
    assert_eq!(report.outcome.emails.len(), 1);
}

#[test]
fn a_long_event_hands_its_worker_to_the_other_tasks() {
    // An endless loop started on the only worker: at the next epoch tick it
    // leaves the worker role to another thread and computes on as a
    // blocking thread, so a task beside it keeps running — elsewhere.
    let p = looping(&[("cpu_ms_per_event", 300), ("wall_ms_per_event", 30_000)]);
    let (err, ticks, ticked_elsewhere) = one_worker().block_on(async move {
        let worker = tokio::spawn(async { std::thread::current().id() })
            .await
            .unwrap();
        let running = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let ticker = tokio::spawn({
            let running = running.clone();
            async move {
                let (mut ticks, mut elsewhere) = (0u32, false);
                while running.load(std::sync::atomic::Ordering::Relaxed) {
                    tokio::time::sleep(std::time::Duration::from_millis(1)).await;
                    ticks += 1;
                    elsewhere |= std::thread::current().id() != worker;
                }
                (ticks, elsewhere)
            }
        });
        let err = tokio::spawn(async move {
            p.run_async(&webhook("{}"), "evt-long", Arc::new(MemoryState::new()))
                .await
        })
        .await
        .unwrap()
        .expect_err("an endless loop fails");
        running.store(false, std::sync::atomic::Ordering::Relaxed);
        let (ticks, elsewhere) = ticker.await.unwrap();
        (err, ticks, elsewhere)
    });
    assert!(
        matches!(err.cause, RunFailure::Timeout { limit_ms: 300 }),
        "{err}"
    );
    assert!(
        ticked_elsewhere,
        "the other task only ever ran on the first worker thread: the loop kept it"
    );
    assert!(ticks >= 10, "the other task ran {ticks} times meanwhile");
}

#[test]
fn cpu_time_is_counted_across_a_wait_wherever_the_event_resumes() {
    // 100 ms asleep (the worker is free meanwhile, and the event may resume
    // on another worker), then a loop: stopped at 300 ms of CPU, so after
    // at least 400 ms in all. Counting the sleep would stop it at 300.
    let mut s = settings(&[("mode", "nap-then-loop"), ("sleep_ms", "100")]);
    s.limits =
        serde_json::from_str(r#"{"cpu_ms_per_event": 300, "wall_ms_per_event": 30000}"#).unwrap();
    let p = runtime()
        .load_file("hostile-nap-loop", &wasm::hostile("hostile"), s)
        .unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let started = std::time::Instant::now();
    let err = rt
        .block_on(async move {
            tokio::spawn(async move {
                p.run_async(&webhook("{}"), "evt-nap-loop", Arc::new(MemoryState::new()))
                    .await
            })
            .await
        })
        .unwrap()
        .expect_err("the loop fails");
    let took = started.elapsed();
    assert!(
        matches!(err.cause, RunFailure::Timeout { limit_ms: 300 }),
        "{err}"
    );
    assert!(
        took >= std::time::Duration::from_millis(390),
        "stopped after {took:?}: the sleep was counted as CPU time"
    );
}

#[test]
fn endless_allocation_is_stopped_at_the_memory_limit() {
    let err = run_hostile("memory");
    assert!(
        matches!(err.cause, RunFailure::MemoryLimit { limit_bytes } if limit_bytes == 64 << 20),
        "{err}"
    );
}

#[test]
fn unbounded_recursion_traps() {
    let err = run_hostile("recursion");
    assert!(matches!(err.cause, RunFailure::Trap { .. }), "{err}");
}

#[test]
fn environment_is_empty_inside_the_sandbox() {
    // SAFETY: set before any thread of this test reads the environment.
    unsafe { std::env::set_var("SENDBOX_TEST_SECRET", "hunter2-must-not-leak") };
    let report = hostile("env")
        .run(&webhook("{}"), "e1", Arc::new(MemoryState::new()))
        .unwrap();
    let body = report.outcome.emails[0].text.clone().unwrap();
    assert!(!body.contains("hunter2"), "{body}");
    assert!(body.contains("vars=[]"), "{body}");
    assert!(body.contains("args=[]"), "{body}");
}

#[test]
fn host_files_are_unreachable() {
    let err = run_hostile("passwd");
    match &err.cause {
        RunFailure::Plugin(msg) => {
            assert!(msg.starts_with("cannot read /etc/passwd"), "{msg}");
            assert!(!msg.contains("root:"), "{msg}");
        }
        other => panic!("expected the read to fail inside the plugin, got {other}"),
    }
}

#[test]
fn a_hundred_thousand_emails_are_refused() {
    let err = run_hostile("emails");
    assert!(matches!(err.cause, RunFailure::Limit { .. }), "{err}");
}

#[test]
fn a_fifty_megabyte_string_is_refused() {
    let err = run_hostile("big-string");
    assert!(
        matches!(
            err.cause,
            RunFailure::Limit {
                limit: "outcome_bytes",
                ..
            }
        ),
        "{err}"
    );
}

#[test]
fn line_breaks_in_subject_or_header_are_refused() {
    let err = run_hostile("crlf-subject");
    assert!(matches!(err.cause, RunFailure::InvalidOutcome(_)), "{err}");
    assert!(
        err.to_string()
            .contains("subject contains a carriage return"),
        "{err}"
    );
    let err = run_hostile("crlf-header");
    assert!(
        err.to_string()
            .contains("(X-Note) value contains a carriage return"),
        "{err}"
    );
}

#[test]
fn a_panic_is_a_trap_quoting_the_panic_message() {
    let err = run_hostile("panic");
    assert!(matches!(err.cause, RunFailure::Trap { .. }), "{err}");
    assert!(
        err.to_string()
            .contains("hostile plugin panicked on purpose"),
        "{err}"
    );
}

#[test]
fn state_writes_of_a_failed_call_are_discarded() {
    for mode in ["state-then-fail", "state-then-trap"] {
        let store = Arc::new(MemoryState::new());
        let err = hostile(mode)
            .run(&webhook("{}"), "e1", store.clone())
            .unwrap_err();
        assert!(!err.to_string().is_empty());
        assert_eq!(store.get(&format!("hostile-{mode}"), "leak").unwrap(), None);
    }
}

#[test]
fn the_state_quota_refuses_the_write() {
    let err = run_hostile("state-hog");
    assert!(err.to_string().contains("state quota exceeded"), "{err}");
}

#[test]
fn log_floods_are_capped_and_the_event_still_succeeds() {
    let report = hostile("log-flood")
        .run(&webhook("{}"), "e1", Arc::new(MemoryState::new()))
        .unwrap();
    let kept: usize = report.logs.iter().map(|l| l.message.len()).sum();
    assert!(kept <= 2 * (64 << 10) + 4096, "kept {kept} bytes of logs");
    assert!(
        report.log_bytes_dropped > 10_000_000,
        "dropped {}",
        report.log_bytes_dropped
    );
}

#[test]
fn a_tcp_client_loads_but_every_socket_it_asks_for_is_refused() {
    // A real listener the plugin is told to reach: nothing may arrive.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let plugin = runtime()
        .load_file(
            "hostile-tcp",
            &wasm::hostile("hostile-tcp"),
            settings(&[("addr", &addr)]),
        )
        .expect("the sockets a toolchain imports are linked, denied");
    let err = plugin
        .run(&webhook("{}"), "e1", Arc::new(MemoryState::new()))
        .unwrap_err();
    let text = err.to_string();
    assert!(text.contains(&format!("connect {addr}")), "{text}");
    std::thread::sleep(std::time::Duration::from_millis(100));
    assert!(
        matches!(listener.accept(), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock),
        "the plugin reached the listener"
    );
    // inspect names them as linked and denied.
    let bytes = std::fs::read(wasm::hostile("hostile-tcp")).unwrap();
    let inspection = runtime().inspect("hostile-tcp", &bytes).unwrap();
    assert!(inspection.implements_world, "{:?}", inspection.problem);
    let sockets: Vec<_> = inspection
        .imports
        .iter()
        .filter(|i| i.name.starts_with("wasi:sockets/"))
        .collect();
    assert!(!sockets.is_empty());
    assert!(
        sockets
            .iter()
            .all(|i| i.linked == sendbox_runtime::Linked::Denied),
        "{sockets:?}"
    );
    assert_runtime_still_serves();
}

#[test]
fn an_unoffered_import_is_refused_by_name() {
    let err = runtime()
        .load_file(
            "hostile-import",
            &wasm::hostile("hostile-import"),
            settings(&[]),
        )
        .unwrap_err();
    let text = err.to_string();
    assert!(text.contains("imports `evil:plugin/exfil`"), "{text}");
    assert_runtime_still_serves();
}

#[test]
fn corrupt_bytes_are_refused() {
    let err = runtime()
        .load("corrupt", b"\0asm not really a component", settings(&[]))
        .unwrap_err();
    assert!(matches!(err, LoadError::NotAComponent { .. }), "{err}");
}

#[test]
fn state_changes_come_back_for_the_caller_to_commit() {
    let plugin = example("daily-digest", &[("to", "team@example.com")]);
    let store = Arc::new(MemoryState::new());
    let r = plugin.run(&webhook("{}"), "e1", store.clone()).unwrap();
    assert!(
        r.state_changes
            .iter()
            .any(|c| matches!(c, StateChange::Set { key, .. } if key == "entry/000000000000"))
    );
    assert!(
        store.entries("daily-digest").is_empty(),
        "the runtime never writes"
    );
}

#[test]
fn second_load_comes_from_the_compiled_cache() {
    let dir = tempfile::tempdir().unwrap();
    let rt = Runtime::new(RuntimeOptions {
        cache_dir: Some(dir.path().to_owned()),
        ..RuntimeOptions::default()
    })
    .unwrap();
    let path = wasm::example("file-alert");
    let first = rt.load_file("a", &path, settings(&[])).unwrap();
    assert_eq!(first.compile_source(), CompileSource::Compiled);
    // While `first` is loaded, the same bytes share its code.
    let twin = rt.load_file("b", &path, settings(&[])).unwrap();
    assert_eq!(twin.compile_source(), CompileSource::Shared);
    drop((first, twin));
    let second = rt.load_file("a", &path, settings(&[])).unwrap();
    assert_eq!(second.compile_source(), CompileSource::Cache);

    // A fresh runtime (a restart) also finds it.
    let restarted = Runtime::new(RuntimeOptions {
        cache_dir: Some(dir.path().to_owned()),
        ..RuntimeOptions::default()
    })
    .unwrap();
    let third = restarted.load_file("a", &path, settings(&[])).unwrap();
    assert_eq!(third.compile_source(), CompileSource::Cache);
}

#[test]
fn guest_output_becomes_tracing_events_tagged_with_plugin_and_event() {
    let capture = capture::Capture::default();
    let subscriber = capture.subscriber(tracing::Level::INFO);
    let plugin = hostile("panic");
    tracing::subscriber::with_default(subscriber, || {
        plugin
            .run(&webhook("{}"), "evt-traced", Arc::new(MemoryState::new()))
            .unwrap_err();
    });
    let text = capture.text();
    let line = text
        .lines()
        .find(|l| {
            l.contains("hostile plugin panicked on purpose") && l.contains("source=\"stderr\"")
        })
        .unwrap_or_else(|| panic!("no stderr event in:\n{text}"));
    assert!(line.contains("plugin=hostile-panic"), "{line}");
    assert!(line.contains("event_id=\"evt-traced\""), "{line}");
}

#[test]
fn a_huge_error_message_is_cut() {
    let err = run_hostile("big-error");
    match &err.cause {
        RunFailure::Plugin(m) => {
            assert!(m.len() < 4200, "{} bytes kept", m.len());
            assert!(m.contains("bytes cut"), "the cut is marked");
        }
        other => panic!("expected the plugin's error, got {other}"),
    }
}

#[test]
fn randomness_is_handed_out_in_bounded_amounts() {
    let err = run_hostile("random-64m");
    assert!(
        matches!(
            err.cause,
            RunFailure::Limit {
                limit: "random_bytes",
                ..
            }
        ),
        "{}",
        err.cause
    );
}

#[test]
fn state_keys_that_cannot_be_stored_are_refused_or_ignored() {
    // NUL keys are refused to the plugin, one by one; nothing is kept.
    let report = hostile("nul-keys")
        .run(&webhook("{}"), "e1", Arc::new(MemoryState::new()))
        .expect("the plugin handles the refusals");
    assert_eq!(report.outcome.emails[0].subject, "refused=4000");
    assert!(report.state_changes.is_empty());
    // 15 MiB keys on get/delete/keys and 200,000 deletes of absent keys:
    // no change or read recorded for any of them.
    for mode in ["huge-keys", "delete-flood"] {
        let report = hostile(mode)
            .run(&webhook("{}"), "e1", Arc::new(MemoryState::new()))
            .expect("the plugin runs to the end");
        assert!(report.state_changes.is_empty(), "{mode}");
        assert!(
            report.reads.keys.len() <= 1,
            "{mode}: {:?}",
            report.reads.keys.len()
        );
    }
}

#[cfg(unix)]
#[test]
fn a_cache_others_could_write_is_not_trusted() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    let rt = Runtime::new(RuntimeOptions {
        cache_dir: Some(cache.clone()),
        ..RuntimeOptions::default()
    })
    .unwrap();
    let path = wasm::example("file-alert");
    rt.load_file("a", &path, settings(&[])).unwrap();
    assert_eq!(
        rt.load_file("a", &path, settings(&[]))
            .unwrap()
            .compile_source(),
        CompileSource::Cache
    );
    let artifact = std::fs::read_dir(&cache)
        .unwrap()
        .flatten()
        .flat_map(|d| std::fs::read_dir(d.path()).unwrap().flatten())
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|x| x == "cwasm"))
        .expect("an artifact was cached");

    // Writable by others: compiled instead (and the plugin still loads).
    std::fs::set_permissions(&artifact, std::fs::Permissions::from_mode(0o666)).unwrap();
    // Each load is dropped at once: nothing shares its code.
    assert_eq!(load_once(rt.clone(), &path), CompileSource::Compiled);
    std::fs::set_permissions(&artifact, std::fs::Permissions::from_mode(0o600)).unwrap();
    std::fs::set_permissions(&cache, std::fs::Permissions::from_mode(0o777)).unwrap();
    assert_eq!(load_once(rt.clone(), &path), CompileSource::Compiled);
    std::fs::set_permissions(&cache, std::fs::Permissions::from_mode(0o700)).unwrap();

    // Owned by someone else (as root, the test can make it so).
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc_geteuid() } == 0 {
        std::os::unix::fs::chown(&artifact, Some(65534), Some(65534)).unwrap();
        assert_eq!(load_once(rt.clone(), &path), CompileSource::Compiled);
        std::os::unix::fs::chown(&artifact, Some(0), Some(0)).unwrap();
    }
    // Private and ours again: used again.
    assert_eq!(load_once(rt.clone(), &path), CompileSource::Cache);
}

/// How a load of `path` got its code, the plugin dropped at once.
fn load_once(rt: Runtime, path: &std::path::Path) -> CompileSource {
    rt.load_file("a", path, settings(&[]))
        .unwrap()
        .compile_source()
}

unsafe extern "C" {
    #[link_name = "geteuid"]
    fn libc_geteuid() -> u32;
}

/// webhook-bridge carrying a manifest: `to` required, `subject_prefix`
/// defaulting to `[described]` (the code's own default is `[webhook]`).
fn described_bridge() -> (Vec<u8>, sendbox_runtime::event::manifest::Manifest) {
    use sendbox_runtime::event::manifest::{ConfigKey, Manifest};
    let mut m = Manifest::named("webhook-bridge", "1.2.3");
    m.description = Some("Webhooks become emails.".into());
    m.config
        .insert("to".into(), ConfigKey::required("Where the emails go."));
    m.config.insert(
        "subject_prefix".into(),
        ConfigKey::with_default("Put before every subject.", "[described]"),
    );
    let bytes = std::fs::read(wasm::example("webhook-bridge")).unwrap();
    (m.embed_in(&bytes).unwrap(), m)
}

#[test]
fn a_described_plugin_needs_its_required_keys_and_gets_its_defaults() {
    let (bytes, manifest) = described_bridge();
    let err = runtime().load("bridge", &bytes, settings(&[])).unwrap_err();
    assert!(
        matches!(&err, LoadError::MissingConfig { key, .. } if key == "to"),
        "{err}"
    );
    assert!(
        err.to_string()
            .contains("plugin `bridge` requires config key `to` (Where the emails go.)"),
        "{err}"
    );

    let plugin = runtime()
        .load(
            "bridge",
            &bytes,
            settings(&[("to", "ops@example.com"), ("subjct_prefix", "typo")]),
        )
        .unwrap();
    assert_eq!(plugin.manifest(), Some(&manifest));
    assert_eq!(plugin.undeclared_config_keys(), ["subjct_prefix"]);
    let alert = std::fs::read_to_string(
        wasm::repo_root().join("plugins/webhook-bridge/samples/alert.json"),
    )
    .unwrap();
    let report = plugin
        .run(&webhook(&alert), "e1", Arc::new(MemoryState::new()))
        .unwrap();
    let subject = &report.outcome.emails[0].subject;
    assert!(subject.starts_with("[described] "), "{subject}");

    let inspection = runtime().inspect("bridge", &bytes).unwrap();
    assert_eq!(inspection.manifest, Some(manifest));
    // Without one: as before.
    let plain = std::fs::read(wasm::example("webhook-bridge")).unwrap();
    assert_eq!(runtime().inspect("bridge", &plain).unwrap().manifest, None);
}

#[test]
fn a_manifest_that_is_not_valid_is_refused_with_the_reason() {
    let mut bytes = std::fs::read(wasm::example("webhook-bridge")).unwrap();
    let name = b"sendbox-manifest";
    let payload = br#"{"name": "x", "version": "1", "config": {"to": {"required": "yes"}}}"#;
    let len = 1 + name.len() + payload.len();
    assert!(len < 128, "one-byte sizes");
    bytes.extend_from_slice(&[0, len as u8, name.len() as u8]);
    bytes.extend_from_slice(name);
    bytes.extend_from_slice(payload);
    let err = runtime()
        .load("bad", &bytes, settings(&[("to", "a@b.c")]))
        .unwrap_err();
    assert!(matches!(err, LoadError::BadManifest { .. }), "{err}");
    assert!(
        err.to_string().contains("sendbox-manifest")
            && err.to_string().contains("sendbox plugin build"),
        "{err}"
    );
}

#[test]
fn plugins_made_of_the_same_bytes_share_code_but_not_config_or_state() {
    let rt = Runtime::new(RuntimeOptions::default()).unwrap();
    let path = wasm::example("webhook-bridge");
    let ops = rt
        .load_file(
            "ops",
            &path,
            settings(&[("to", "ops@example.com"), ("subject_prefix", "[ops]")]),
        )
        .unwrap();
    let dev = rt
        .load_file(
            "dev",
            &path,
            settings(&[("to", "dev@example.com"), ("subject_prefix", "[dev]")]),
        )
        .unwrap();
    assert_eq!(ops.compile_source(), CompileSource::Compiled);
    assert_eq!(dev.compile_source(), CompileSource::Shared);
    let alert = std::fs::read_to_string(
        wasm::repo_root().join("plugins/webhook-bridge/samples/alert.json"),
    )
    .unwrap();
    for (plugin, prefix, to) in [
        (&ops, "[ops] ", "ops@example.com"),
        (&dev, "[dev] ", "dev@example.com"),
    ] {
        let r = plugin
            .run(&webhook(&alert), "e1", Arc::new(MemoryState::new()))
            .unwrap();
        assert!(r.outcome.emails[0].subject.starts_with(prefix));
        assert_eq!(r.outcome.emails[0].to, [to]);
    }
}
