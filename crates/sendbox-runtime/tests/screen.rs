//! World `relay-hook`: a plugin screening SMTP submissions (the example
//! `device-screen`, built from `plugins/`), and a plugin built against the
//! WIT before `relay-hook` existed still loading and running unchanged.

use std::sync::{Arc, OnceLock};

use sendbox_runtime::{
    Attachment, Bytes, Event, MemoryState, PluginSettings, RunFailure, Runtime, RuntimeOptions,
    StateChange, Submitted, Verdict,
};
use sendbox_test_support::wasm;

fn runtime() -> &'static Runtime {
    static RT: OnceLock<Runtime> = OnceLock::new();
    RT.get_or_init(|| Runtime::new(RuntimeOptions::default()).expect("runtime starts"))
}

fn screen_plugin() -> sendbox_runtime::Plugin {
    let config = [
        ("refuse_from", "noisy@office.example"),
        ("drop_subject", "toner low"),
        ("tidy_to", "scans@example.com"),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    runtime()
        .load_file(
            "device-screen",
            &wasm::example("device-screen"),
            PluginSettings {
                config,
                ..PluginSettings::default()
            },
        )
        .expect("device-screen loads")
}

fn message(from: &str, subject: &str, attachments: Vec<Attachment>) -> Submitted {
    Submitted {
        listener: "office".into(),
        client: "192.0.2.7:40000".into(),
        user: Some("scanner".into()),
        mail_from: from.into(),
        recipients: vec!["ops@example.com".into()],
        subject: subject.into(),
        text: Some("body".into()),
        attachments,
        raw: Some(Bytes(b"Subject: x\r\n\r\nbody\r\n".to_vec())),
        size: 20,
        ..Submitted::default()
    }
}

#[test]
fn a_screening_plugin_relays_refuses_drops_or_replaces() {
    let p = screen_plugin();
    assert!(p.screens());
    let state = Arc::new(MemoryState::new());
    let run = |m: &Submitted| p.screen(m, "smtp-1", state.clone()).expect("screen runs");

    let r = run(&message("printer@office.example", "Page count", vec![]));
    assert_eq!(r.verdict, Verdict::Relay);

    let r = run(&message("noisy@office.example", "hello", vec![]));
    match r.verdict {
        Verdict::Refuse { code, text } => {
            assert_eq!(code, 550);
            assert!(text.contains("noisy@office.example may not send"), "{text}");
        }
        other => panic!("expected a refusal, got {other:?}"),
    }

    let r = run(&message(
        "printer@office.example",
        "Toner LOW on floor 2",
        vec![],
    ));
    assert_eq!(r.verdict, Verdict::Replace(vec![]));
    assert!(
        matches!(&r.state_changes[..], [StateChange::Set { key, .. }] if key == "dropped"),
        "{:?}",
        r.state_changes
    );

    let pdf = Attachment {
        filename: "scan.pdf".into(),
        content_type: "application/pdf".into(),
        data: Bytes(b"%PDF-1.7".to_vec()),
    };
    let r = run(&message(
        "scanner@office.example",
        "Scan",
        vec![pdf.clone()],
    ));
    let Verdict::Replace(emails) = r.verdict else {
        panic!("expected a replacement")
    };
    assert_eq!(emails.len(), 1);
    assert_eq!(emails[0].to, ["scans@example.com"]);
    assert_eq!(emails[0].subject, "Scan from scanner: 1 file(s)");
    assert_eq!(emails[0].attachments, [pdf]);

    // It handles ordinary events too (its `handle`: nothing to send).
    let tick: Event = serde_json::from_value(
        serde_json::json!({"schedule": {"schedule": "s", "scheduled_at_ms": 0}}),
    )
    .unwrap();
    let out = p.run(&tick, "cr-1", Arc::new(MemoryState::new())).unwrap();
    assert!(out.outcome.emails.is_empty());
}

#[test]
fn a_plugin_built_before_relay_hook_loads_and_runs_unchanged() {
    let old = wasm::repo_root().join("tests/fixtures/wit-0.1.0/webhook_bridge.wasm");
    let settings = PluginSettings {
        config: [("to".to_string(), "ops@example.com".to_string())].into(),
        ..PluginSettings::default()
    };
    let p = runtime()
        .load_file("old-bridge", &old, settings)
        .expect("an old 0.1.0 component loads");
    assert!(!p.screens());
    let inspected = runtime()
        .inspect("old-bridge", &std::fs::read(&old).unwrap())
        .unwrap();
    assert!(inspected.implements_world, "{:?}", inspected.problem);
    assert_eq!(inspected.world, "sendbox:plugin/hook@0.1.0");

    let body = std::fs::read_to_string(
        wasm::repo_root().join("plugins/webhook-bridge/samples/alert.json"),
    )
    .unwrap();
    let event: Event = serde_json::from_value(
        serde_json::json!({"webhook": {"path": "/hooks/alerts", "body": body}}),
    )
    .unwrap();
    let out = p
        .run(&event, "wh-1", Arc::new(MemoryState::new()))
        .expect("it runs");
    assert_eq!(out.outcome.emails.len(), 1);
    assert_eq!(out.outcome.emails[0].to, ["ops@example.com"]);

    // Asked to screen, it is refused with the reason, not a trap.
    let err = p
        .screen(
            &message("a@b.c", "x", vec![]),
            "smtp-1",
            Arc::new(MemoryState::new()),
        )
        .unwrap_err();
    assert!(
        matches!(&err.cause, RunFailure::Host(m) if m.contains("does not export `screen`")),
        "{err}"
    );
}
