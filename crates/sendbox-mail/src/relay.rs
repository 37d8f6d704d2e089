//! A message submitted over SMTP, relayed as sent: headers and MIME body
//! byte for byte, except what the account requires.
//!
//! - `From` stays when its one address is the account's mailbox or allowed
//!   (`allowed_from`); otherwise it becomes the account's mailbox (keeping
//!   a plain display name) and the original address goes to `Reply-To`
//!   when there is none, so replies still reach the sender.
//! - `Sender` stays when allowed, else is removed.
//! - `Bcc` and `Return-Path` are removed (Bcc recipients are in the
//!   envelope only).
//! - `Message-ID` and `Date` stay; when missing, the outbox's Message-ID
//!   and the time it was queued are added.
//!
//! The envelope is the account's mailbox and the recipients given at
//! `RCPT TO`.

use lettre::message::header::{Date, Headers};
use lettre::message::{Mailbox, Mailboxes};

use crate::message::{BuildError, Envelope, Prepared, address_allowed};

/// One header field: its name and its whole text (name, colon, value and
/// folded lines, with the final CRLF).
struct Field<'a> {
    name: &'a str,
    text: &'a [u8],
}

impl Field<'_> {
    /// The value, unfolded and trimmed.
    fn value(&self) -> String {
        let text = String::from_utf8_lossy(self.text);
        let value = text.split_once(':').map_or("", |(_, v)| v);
        value
            .replace("\r\n", "")
            .replace('\n', "")
            .trim()
            .to_owned()
    }

    fn is(&self, name: &str) -> bool {
        self.name.eq_ignore_ascii_case(name)
    }
}

/// Splits a message into its header fields and its body (after the blank
/// line; empty if there is none).
fn split(raw: &[u8]) -> (Vec<Field<'_>>, &[u8]) {
    let mut fields: Vec<Field<'_>> = Vec::new();
    let mut at = 0;
    while at < raw.len() {
        let end = raw[at..]
            .iter()
            .position(|&b| b == b'\n')
            .map_or(raw.len(), |i| at + i + 1);
        let line = &raw[at..end];
        if line == b"\r\n" || line == b"\n" {
            return (fields, &raw[end..]);
        }
        let continuation = matches!(line.first(), Some(b' ' | b'\t'));
        match fields.last_mut() {
            Some(last) if continuation => {
                let start = last.text.as_ptr() as usize - raw.as_ptr() as usize;
                last.text = &raw[start..end];
            }
            _ => {
                let name = line
                    .iter()
                    .position(|&b| b == b':')
                    .and_then(|i| std::str::from_utf8(&line[..i]).ok())
                    .unwrap_or("")
                    .trim();
                fields.push(Field { name, text: line });
            }
        }
        at = end;
    }
    (fields, &raw[raw.len()..])
}

/// The unfolded value of the first header `name` of a raw message.
pub fn header(raw: &[u8], name: &str) -> Option<String> {
    split(raw)
        .0
        .into_iter()
        .find(|f| f.is(name))
        .map(|f| f.value())
}

/// Prepares a submitted message for the account: see the module docs.
pub fn relay(
    raw: &[u8],
    recipients: &[String],
    env: &Envelope<'_>,
) -> Result<Prepared, BuildError> {
    let account: Mailbox = env
        .account_mailbox
        .parse()
        .map_err(|e| BuildError(format!("account mailbox {:?}: {e}", env.account_mailbox)))?;
    let allowed = |addr: &str| {
        addr.eq_ignore_ascii_case(env.account_mailbox.trim())
            || address_allowed(addr, env.allowed_from)
    };
    let (fields, body) = split(raw);
    let has_reply_to = fields.iter().any(|f| f.is("Reply-To"));
    let mut head: Vec<u8> = Vec::with_capacity(raw.len().min(64 * 1024) + 256);
    let (mut from_seen, mut id_seen, mut date_seen) = (false, false, false);
    let mut visible: Vec<String> = Vec::new();
    for field in &fields {
        if field.is("Bcc") || field.is("Return-Path") {
            continue;
        }
        if field.is("To") || field.is("Cc") {
            let value = field.value().to_ascii_lowercase();
            visible.extend(
                recipients
                    .iter()
                    .filter(|r| value.contains(&r.to_ascii_lowercase()))
                    .cloned(),
            );
        }
        if field.is("Message-ID") {
            id_seen = true;
        }
        if field.is("Date") {
            date_seen = true;
        }
        if field.is("Sender") {
            let keep = field
                .value()
                .parse::<Mailbox>()
                .is_ok_and(|m| allowed(m.email.as_ref()));
            if keep {
                head.extend_from_slice(field.text);
            }
            continue;
        }
        if field.is("From") {
            if from_seen {
                continue;
            }
            from_seen = true;
            let mailboxes: Vec<Mailbox> = field
                .value()
                .parse::<Mailboxes>()
                .map(|m| m.into_iter().collect())
                .unwrap_or_default();
            if let [only] = mailboxes.as_slice()
                && allowed(only.email.as_ref())
            {
                head.extend_from_slice(field.text);
                continue;
            }
            let name = mailboxes
                .first()
                .and_then(|m| m.name.clone())
                .filter(|n| plain(n));
            let rewritten = Mailbox::new(name, account.email.clone());
            head.extend_from_slice(format!("From: {rewritten}\r\n").as_bytes());
            if !has_reply_to && let Some(original) = mailboxes.first() {
                head.extend_from_slice(format!("Reply-To: {}\r\n", original.email).as_bytes());
            }
            continue;
        }
        head.extend_from_slice(field.text);
        if !field.text.ends_with(b"\n") {
            head.extend_from_slice(b"\r\n");
        }
    }
    if !from_seen {
        head.extend_from_slice(format!("From: {account}\r\n").as_bytes());
    }
    if !id_seen {
        head.extend_from_slice(format!("Message-ID: {}\r\n", env.message_id).as_bytes());
    }
    if !date_seen {
        let mut h = Headers::new();
        h.set(Date::new(env.date));
        if let Some(d) = h.get_raw("Date") {
            head.extend_from_slice(format!("Date: {d}\r\n").as_bytes());
        }
    }
    let mut to = Vec::with_capacity(recipients.len());
    for r in recipients {
        to.push(
            r.parse()
                .map_err(|e| BuildError(format!("recipient {r:?}: {e}")))?,
        );
    }
    let envelope = lettre::address::Envelope::new(Some(account.email.clone()), to)
        .map_err(|e| BuildError(format!("envelope: {e}")))?;
    head.extend_from_slice(b"\r\n");
    head.extend_from_slice(body);
    visible.dedup();
    Ok(Prepared {
        message_id: env.message_id.to_owned(),
        envelope,
        raw: head,
        visible_recipients: visible,
    })
}

/// A display name safe to keep as is: printable ASCII without quotes or
/// backslashes.
fn plain(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 128
        && name.chars().all(|c| c.is_ascii_graphic() || c == ' ')
        && !name.contains(['"', '\\'])
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::SystemTime;

    const RAW: &[u8] = b"From: Scanner <scanner@office.local>\r\nTo: ops@example.com\r\nBcc: boss@example.com\r\nSubject: Scan\r\n =?utf-8?q?folded?=\r\nMessage-ID: <scan-1@office.local>\r\nDate: Tue, 1 Dec 2026 10:00:00 +0000\r\nMIME-Version: 1.0\r\nContent-Type: text/plain\r\n\r\nbody line\r\n.leading dot kept\r\n";

    fn env<'a>(allowed: &'a [String]) -> Envelope<'a> {
        Envelope {
            account_mailbox: "alerts@example.com",
            allowed_from: allowed,
            message_id: "<outbox-1@example.com>",
            date: SystemTime::UNIX_EPOCH,
        }
    }

    #[test]
    fn a_foreign_from_is_rewritten_bcc_dropped_and_the_rest_kept_byte_for_byte() {
        let rcpts = vec![
            "ops@example.com".to_string(),
            "boss@example.com".to_string(),
        ];
        let p = relay(RAW, &rcpts, &env(&[])).unwrap();
        let text = String::from_utf8(p.raw.clone()).unwrap();
        assert!(
            text.starts_with(
                "From: Scanner <alerts@example.com>\r\nReply-To: scanner@office.local\r\n"
            ),
            "{text}"
        );
        assert!(!text.contains("Bcc"), "{text}");
        assert!(
            text.contains("Subject: Scan\r\n =?utf-8?q?folded?=\r\n"),
            "{text}"
        );
        assert!(
            text.contains("Message-ID: <scan-1@office.local>\r\n"),
            "kept: {text}"
        );
        assert!(!text.contains("outbox-1"), "{text}");
        assert!(
            text.ends_with("\r\n\r\nbody line\r\n.leading dot kept\r\n"),
            "{text}"
        );
        assert_eq!(
            p.envelope.from().map(|a| a.to_string()).as_deref(),
            Some("alerts@example.com")
        );
        assert_eq!(p.envelope.to().len(), 2);
        assert_eq!(p.visible_recipients, ["ops@example.com"]);
        assert_eq!(
            header(RAW, "subject").as_deref(),
            Some("Scan =?utf-8?q?folded?=")
        );
    }

    #[test]
    fn an_allowed_from_stays_and_missing_ids_and_dates_are_added() {
        let raw = b"From: scanner@office.local\r\nTo: ops@example.com\r\n\r\nhi\r\n";
        let p = relay(
            raw,
            &["ops@example.com".into()],
            &env(&["*@office.local".into()]),
        )
        .unwrap();
        let text = String::from_utf8(p.raw).unwrap();
        assert!(text.starts_with("From: scanner@office.local\r\nTo: ops@example.com\r\nMessage-ID: <outbox-1@example.com>\r\nDate: Thu, 01 Jan 1970"), "{text}");
        assert!(!text.contains("Reply-To"), "{text}");
        assert!(text.ends_with("\r\n\r\nhi\r\n"));
    }
}
