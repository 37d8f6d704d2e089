//! Any bytes as a message a stranger submitted to an SMTP listener: taken
//! apart for a plugin (never a panic), and prepared for relaying — refused
//! with a reason, or with no Bcc header left and the body after the first
//! blank line passed on byte for byte.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sendbox_mail::message::Envelope;

fuzz_target!(|raw: &[u8]| {
    let _ = sendbox_mail::parse::parse(raw);
    let env = Envelope {
        account_mailbox: "alerts@example.com",
        allowed_from: &["*@office.example".to_string()],
        message_id: "<fuzz@example.com>",
        date: std::time::UNIX_EPOCH,
    };
    let Ok(p) = sendbox_mail::relay::relay(raw, &["ops@example.com".to_string()], &env) else {
        return;
    };
    let out = &p.raw;
    let head_end = out.windows(4).position(|w| w == b"\r\n\r\n").expect("a blank line after the headers");
    let head = String::from_utf8_lossy(&out[..head_end]).to_ascii_lowercase();
    assert!(!head.starts_with("bcc:") && !head.contains("\nbcc:"), "a Bcc header survived");
    if let Some(i) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
        assert!(out.ends_with(&raw[i + 4..]), "the body changed");
    }
});
