//! What the outbox benches commit: one call of plugin `plugin` with one
//! email (500 bytes of text) and one state write (one of 100 keys).

use sendbox_outbox::{Call, Policy};
use sendbox_types::{Bytes, Email, StateChange};

pub fn call(i: usize, plugin: String) -> Call {
    Call {
        plugin,
        trigger: "webhook".into(),
        event_id: format!("evt-{i}"),
        account: "alerts".into(),
        account_mailbox: "alerts@example.com".into(),
        policy: Policy::default(),
        emails: vec![Email {
            to: vec!["ops@example.com".into()],
            subject: format!("alert {i}"),
            text: Some("x".repeat(500)),
            ..Email::default()
        }],
        state_changes: vec![StateChange::Set {
            key: format!("k{}", i % 100),
            value: Bytes(vec![1; 32]),
        }],
        ..Default::default()
    }
}
