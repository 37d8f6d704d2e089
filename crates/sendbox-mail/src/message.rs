//! Turning a plugin's [`Email`] into an RFC 5322 message.
//!
//! Message-ID and Date are always set; From is the account's mailbox unless
//! the email asks for another address the operator allowed; addresses are
//! parsed; extra headers are checked again (no CR/LF, no header the host
//! writes); text and html become multipart/alternative; attachments get
//! their content types.

use std::time::SystemTime;

use lettre::message::header::ContentTransferEncoding;
use lettre::message::header::{ContentType, HeaderName, HeaderValue};
use lettre::message::{Attachment, Body, Mailbox, MultiPart, SinglePart};
use sendbox_types::{Email, RESERVED_HEADERS};

/// A message ready for any transport: its envelope, its id and its bytes.
#[derive(Clone)]
pub struct Prepared {
    /// `<...@domain>`, also the file name stem for the file transport.
    pub message_id: String,
    /// SMTP envelope: MAIL FROM and RCPT TO (bcc included).
    pub envelope: lettre::address::Envelope,
    /// The formatted message (bcc not included).
    pub raw: Vec<u8>,
    /// The envelope recipients that are in To or Cc, for transports that
    /// write the envelope down (Bcc recipients never appear in a header).
    pub visible_recipients: Vec<String>,
}

impl std::fmt::Debug for Prepared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Prepared")
            .field("message_id", &self.message_id)
            .field("bytes", &self.raw.len())
            .finish()
    }
}

/// Why an email cannot be turned into a message. Permanent: the same email
/// will fail the same way.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("cannot build the message: {0}")]
pub struct BuildError(pub String);

/// What the host decides, not the plugin.
#[derive(Debug, Clone)]
pub struct Envelope<'a> {
    /// The account's mailbox, the default From.
    pub account_mailbox: &'a str,
    /// Other From addresses the operator allows for this plugin: exact
    /// addresses or `*@domain`.
    pub allowed_from: &'a [String],
    /// The Message-ID to use, e.g. from [`new_message_id`].
    pub message_id: &'a str,
    /// The Date header.
    pub date: SystemTime,
}

/// Whether `address` matches an allow-list entry (`a@b.c` or `*@b.c`),
/// case-insensitively.
pub use sendbox_types::address_matches as address_allowed;

fn mailbox(what: &str, s: &str) -> Result<Mailbox, BuildError> {
    s.parse::<Mailbox>()
        .map_err(|e| BuildError(format!("{what} {s:?} is not a valid address: {e}")))
}

pub use sendbox_types::{domain_of, new_message_id};

/// Builds the message.
pub fn build(email: &Email, env: &Envelope<'_>) -> Result<Prepared, BuildError> {
    if let Some(raw) = &email.raw {
        return crate::relay::relay(&raw.0, &email.to, env);
    }
    let from = match &email.sender {
        None => mailbox("account mailbox", env.account_mailbox)?,
        Some(s) => {
            let m = mailbox("sender", s)?;
            let addr = m.email.to_string();
            if !addr.eq_ignore_ascii_case(env.account_mailbox.trim())
                && !address_allowed(&addr, env.allowed_from)
            {
                return Err(BuildError(format!(
                    "From {addr} is not allowed for this plugin: add it to the plugin's `allowed_from` (exact address or `*@domain`), or leave `sender` empty to use {}",
                    env.account_mailbox
                )));
            }
            m
        }
    };
    if email.subject.contains(['\r', '\n']) {
        return Err(BuildError("subject contains a line break".into()));
    }
    let mut b = lettre::Message::builder()
        .message_id(Some(env.message_id.to_owned()))
        .date(env.date)
        .from(from)
        .subject(email.subject.clone());
    for a in &email.to {
        b = b.to(mailbox("to", a)?);
    }
    for a in &email.cc {
        b = b.cc(mailbox("cc", a)?);
    }
    for a in &email.bcc {
        b = b.bcc(mailbox("bcc", a)?);
    }
    if let Some(r) = &email.reply_to {
        b = b.reply_to(mailbox("reply_to", r)?);
    }
    for (name, value) in &email.headers {
        if RESERVED_HEADERS.contains(&name.to_ascii_lowercase().as_str()) {
            return Err(BuildError(format!("header {name} is set by the host")));
        }
        if value.contains(['\r', '\n']) {
            return Err(BuildError(format!("header {name} contains a line break")));
        }
        // RFC 5322 field names: printable ASCII but the colon.
        if name.is_empty() || !name.bytes().all(|c| (33..=126).contains(&c) && c != b':') {
            return Err(BuildError(format!("{name:?} is not a valid header name")));
        }
        let hn = HeaderName::new_from_ascii(name.clone())
            .map_err(|_| BuildError(format!("{name:?} is not a valid header name")))?;
        b = b.raw_header(HeaderValue::new(hn, value.clone()));
    }

    let body = match (&email.text, &email.html) {
        (Some(t), Some(h)) => Some(
            MultiPart::alternative()
                .singlepart(text_part(t, ContentType::TEXT_PLAIN))
                .singlepart(text_part(h, ContentType::TEXT_HTML)),
        ),
        _ => None,
    };
    let single = match (&email.text, &email.html) {
        (Some(_), Some(_)) => None,
        (None, Some(h)) => Some(text_part(h, ContentType::TEXT_HTML)),
        (Some(t), None) => Some(text_part(t, ContentType::TEXT_PLAIN)),
        (None, None) => Some(SinglePart::plain(String::new())),
    };
    let message = if email.attachments.is_empty() {
        match (body, single) {
            (Some(m), _) => b.multipart(m),
            (None, Some(s)) => b.singlepart(s),
            (None, None) => b.body(String::new()),
        }
    } else {
        let mut mixed = match (body, single) {
            (Some(m), _) => MultiPart::mixed().multipart(m),
            (None, Some(s)) => MultiPart::mixed().singlepart(s),
            (None, None) => MultiPart::mixed().singlepart(SinglePart::plain(String::new())),
        };
        for a in &email.attachments {
            let ct = ContentType::parse(&a.content_type).map_err(|e| {
                BuildError(format!(
                    "attachment {} has an invalid content type {:?}: {e}",
                    a.filename, a.content_type
                ))
            })?;
            mixed = mixed.singlepart(
                Attachment::new(a.filename.clone()).body(attachment_body(&a.data.0), ct),
            );
        }
        b.multipart(mixed)
    }
    .map_err(|e| BuildError(e.to_string()))?;
    let visible: Vec<String> = email
        .to
        .iter()
        .chain(&email.cc)
        .map(|a| sendbox_types::bare_address(a))
        .collect();
    let envelope = message.envelope().clone();
    let visible_recipients = envelope
        .to()
        .iter()
        .map(ToString::to_string)
        .filter(|r| visible.contains(&r.to_ascii_lowercase()))
        .collect();
    Ok(Prepared {
        message_id: env.message_id.to_owned(),
        envelope,
        raw: message.formatted(),
        visible_recipients,
    })
}

/// A text or HTML body, always valid RFC 5322: every line break (CRLF, a
/// lone LF or a lone CR) becomes CRLF, and a body with NUL or other bytes
/// no 7-bit or quoted-printable line may carry is base64-encoded.
fn text_part(text: &str, content_type: ContentType) -> SinglePart {
    let normalized = text.replace("\r\n", "\n").replace('\r', "\n");
    let body = if normalized.contains('\0') {
        Body::new_with_encoding(normalized, ContentTransferEncoding::Base64)
            .unwrap_or_else(Body::new)
    } else {
        Body::new(normalized)
    };
    SinglePart::builder().header(content_type).body(body)
}

/// An attachment's body, always valid RFC 5322: sent as it is only when it
/// is 7-bit text whose lines end in CRLF and fit in 998 bytes; anything
/// else (bare LF or CR, 8-bit bytes, NUL, long lines) is base64-encoded, so
/// no server that refuses bare line feeds sees one and the bytes arrive
/// unchanged.
fn attachment_body(data: &[u8]) -> Body {
    if is_7bit_crlf_text(data) {
        return Body::new(data.to_vec());
    }
    Body::new_with_encoding(data.to_vec(), ContentTransferEncoding::Base64)
        .unwrap_or_else(Body::new)
}

fn is_7bit_crlf_text(data: &[u8]) -> bool {
    let mut line = 0usize;
    for (i, &b) in data.iter().enumerate() {
        match b {
            0 | 128..=255 => return false,
            b'\r' if data.get(i + 1) != Some(&b'\n') => return false,
            b'\n' if i == 0 || data[i - 1] != b'\r' => return false,
            b'\n' => line = 0,
            _ => {
                line += 1;
                if line > 998 {
                    return false;
                }
            }
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use sendbox_types::{Attachment as Att, Bytes};

    fn env<'a>(allowed: &'a [String]) -> Envelope<'a> {
        Envelope {
            account_mailbox: "alerts@example.com",
            allowed_from: allowed,
            message_id: "<1.abc@example.com>",
            date: SystemTime::UNIX_EPOCH,
        }
    }

    fn email() -> Email {
        Email {
            to: vec!["Ops <ops@example.com>".into()],
            bcc: vec!["audit@example.com".into()],
            subject: "Disk full".into(),
            text: Some("plain".into()),
            html: Some("<p>html</p>".into()),
            attachments: vec![Att {
                filename: "a.csv".into(),
                content_type: "text/csv".into(),
                data: Bytes(b"x,y\n".to_vec()),
            }],
            headers: vec![("X-Alert".into(), "disk".into())],
            ..Email::default()
        }
    }

    #[test]
    fn builds_alternative_with_attachment_and_required_headers() {
        let p = build(&email(), &env(&[])).unwrap();
        let raw = String::from_utf8(p.raw).unwrap();
        assert!(raw.contains("Message-ID: <1.abc@example.com>"), "{raw}");
        assert!(raw.contains("Date: Thu, 01 Jan 1970"), "{raw}");
        assert!(raw.contains("From: alerts@example.com"), "{raw}");
        assert!(raw.contains("multipart/alternative"), "{raw}");
        assert!(raw.contains("multipart/mixed"), "{raw}");
        assert!(raw.contains("filename=\"a.csv\""), "{raw}");
        assert!(raw.contains("X-Alert: disk"), "{raw}");
        assert!(
            !raw.contains("audit@example.com"),
            "bcc must not be in headers"
        );
        let rcpts: Vec<String> = p.envelope.to().iter().map(|a| a.to_string()).collect();
        assert_eq!(rcpts, ["ops@example.com", "audit@example.com"]);
    }

    /// RFC 5322 2.3: CR and LF only together, lines of at most 998 bytes.
    fn strictly_valid(raw: &[u8]) -> Result<(), String> {
        let mut line = 0;
        for (i, &b) in raw.iter().enumerate() {
            match b {
                b'\n' if i == 0 || raw[i - 1] != b'\r' => return Err(format!("bare LF at {i}")),
                b'\r' if raw.get(i + 1) != Some(&b'\n') => return Err(format!("bare CR at {i}")),
                b'\n' => line = 0,
                b'\r' => {}
                _ => {
                    line += 1;
                    if line > 998 {
                        return Err(format!("line over 998 bytes at {i}"));
                    }
                }
            }
        }
        Ok(())
    }

    #[test]
    fn attachments_and_bodies_are_valid_rfc5322_whatever_their_line_ends() {
        let csv = b"host,disk\nweb1,91%\nweb2,95%\n".to_vec();
        let cases: Vec<(&str, Vec<u8>)> = vec![
            ("bare LF", csv.clone()),
            ("bare CR", b"a\rb\r".to_vec()),
            ("8-bit", "caf\u{e9}\r\n".as_bytes().to_vec()),
            ("long line", vec![b'x'; 2000]),
            ("binary", vec![0, 1, 2, 255, b'\n']),
        ];
        for (what, data) in cases {
            let mut e = email();
            e.text = Some("line one\nline two\n".into());
            e.attachments[0].data = Bytes(data.clone());
            let p = build(&e, &env(&[])).unwrap();
            strictly_valid(&p.raw).unwrap_or_else(|err| panic!("{what}: {err}"));
            let raw = String::from_utf8_lossy(&p.raw);
            assert!(
                raw.contains("Content-Transfer-Encoding: base64"),
                "{what}: {raw}"
            );
            // The bytes arrive unchanged: the base64 part decodes to them.
            use base64::Engine as _;
            let part = raw.split("filename=\"a.csv\"").nth(1).unwrap();
            let body: String = part
                .split("\r\n\r\n")
                .nth(1)
                .unwrap()
                .split("\r\n--")
                .next()
                .unwrap()
                .split("\r\n")
                .collect();
            let decoded = base64::engine::general_purpose::STANDARD
                .decode(body)
                .unwrap();
            assert_eq!(decoded, data, "{what}");
        }
        // 7-bit text with CRLF already is sent as it is.
        let mut e = email();
        e.attachments[0].data = Bytes(b"host,disk\r\nweb1,91%\r\n".to_vec());
        let p = build(&e, &env(&[])).unwrap();
        strictly_valid(&p.raw).unwrap();
        assert!(String::from_utf8_lossy(&p.raw).contains("web1,91%\r\n"));
    }

    #[test]
    fn bodies_with_bare_cr_or_nul_are_valid_rfc5322() {
        for text in ["\0\0\r\n\rP", "a\rb", "caf\u{e9}\r", "x\r\n\r"] {
            for html in [false, true] {
                let mut e = email();
                e.attachments.clear();
                if html {
                    e.html = Some(text.into());
                    e.text = None;
                } else {
                    e.text = Some(text.into());
                    e.html = None;
                }
                let p = build(&e, &env(&[])).unwrap();
                strictly_valid(&p.raw).unwrap_or_else(|err| {
                    panic!("{text:?}: {err}\n{}", String::from_utf8_lossy(&p.raw))
                });
            }
        }
    }

    #[test]
    fn bcc_is_in_the_envelope_only() {
        let p = build(&email(), &env(&[])).unwrap();
        assert_eq!(p.visible_recipients, ["ops@example.com"]);
        assert_eq!(p.envelope.to().len(), 2);
    }

    #[test]
    fn other_from_needs_the_operators_allowance() {
        let mut e = email();
        e.sender = Some("ceo@example.com".into());
        let err = build(&e, &env(&[])).unwrap_err();
        assert!(err.0.contains("not allowed"), "{err}");
        let allowed = vec!["*@example.com".to_string()];
        let p = build(&e, &env(&allowed)).unwrap();
        assert!(
            String::from_utf8(p.raw)
                .unwrap()
                .contains("From: ceo@example.com")
        );
    }

    #[test]
    fn bad_addresses_and_injected_headers_are_refused() {
        let mut e = email();
        e.to = vec!["not an address".into()];
        assert!(
            build(&e, &env(&[]))
                .unwrap_err()
                .0
                .contains("not a valid address")
        );
        let mut e = email();
        e.headers = vec![("X-A".into(), "a\r\nBcc: x@y.z".into())];
        assert!(build(&e, &env(&[])).unwrap_err().0.contains("line break"));
        let mut e = email();
        e.headers = vec![("X-A\nBcc".into(), "x".into())];
        assert!(
            build(&e, &env(&[]))
                .unwrap_err()
                .0
                .contains("not a valid header name")
        );
        let mut e = email();
        e.headers = vec![("Subject".into(), "x".into())];
        assert!(
            build(&e, &env(&[]))
                .unwrap_err()
                .0
                .contains("set by the host")
        );
    }

    #[test]
    fn allow_list_matches_exact_and_domain_wildcards() {
        let allowed = vec!["noreply@a.com".to_string(), "*@b.com".to_string()];
        assert!(address_allowed("NoReply@A.com", &allowed));
        assert!(address_allowed("x@b.com", &allowed));
        assert!(!address_allowed("x@evil-b.com", &allowed));
        assert!(!address_allowed("x@a.com", &allowed));
    }
}
