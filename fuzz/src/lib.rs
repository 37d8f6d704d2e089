//! What the fuzz targets share: an arbitrary email as a plugin could return
//! it, and the checks every built message must pass.

use libfuzzer_sys::arbitrary::{self, Arbitrary};
use sendbox_types::{Attachment, Bytes, Email};

/// An email with every field the plugin controls.
#[derive(Debug, Arbitrary)]
pub struct FuzzEmail {
    to: Vec<String>,
    cc: Vec<String>,
    bcc: Vec<String>,
    sender: Option<String>,
    reply_to: Option<String>,
    subject: String,
    text: Option<String>,
    html: Option<String>,
    attachments: Vec<(String, String, Vec<u8>)>,
    headers: Vec<(String, String)>,
    idempotency_key: Option<String>,
}

impl From<FuzzEmail> for Email {
    fn from(e: FuzzEmail) -> Email {
        Email {
            to: e.to,
            cc: e.cc,
            bcc: e.bcc,
            sender: e.sender,
            reply_to: e.reply_to,
            subject: e.subject,
            text: e.text,
            html: e.html,
            attachments: e
                .attachments
                .into_iter()
                .map(|(filename, content_type, data)| Attachment {
                    filename,
                    content_type,
                    data: Bytes(data),
                })
                .collect(),
            headers: e.headers,
            idempotency_key: e.idempotency_key,
            // Plugins never hand over a raw message.
            raw: None,
        }
    }
}

/// Builds `email` as the delivery worker would; when it builds, checks
/// that every line ends in CRLF (RFC 5322: no bare CR or LF anywhere) and
/// that no Bcc header was written.
pub fn build_and_check(email: &Email) {
    let built = sendbox_mail::message::build(
        email,
        &sendbox_mail::message::Envelope {
            account_mailbox: "alerts@example.com",
            allowed_from: &["*@example.com".to_string()],
            message_id: "<1.fuzz@example.com>",
            date: std::time::SystemTime::UNIX_EPOCH,
        },
    );
    let Ok(p) = built else { return };
    for (i, &b) in p.raw.iter().enumerate() {
        if b == b'\n' {
            assert!(i > 0 && p.raw[i - 1] == b'\r', "bare LF at {i}");
        }
        if b == b'\r' {
            assert_eq!(p.raw.get(i + 1), Some(&b'\n'), "bare CR at {i}");
        }
    }
    let head_end = p
        .raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or(p.raw.len());
    let head = String::from_utf8_lossy(&p.raw[..head_end]).to_ascii_lowercase();
    assert!(
        !head.starts_with("bcc:") && !head.contains("\r\nbcc:"),
        "a Bcc header was written"
    );
}
