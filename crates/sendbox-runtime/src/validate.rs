//! Checks that an outcome keeps the contract before anything else sees it.
//!
//! This is the shape check only: line breaks, header syntax, counts and
//! sizes. Whether a sender or recipient is *allowed* is policy, checked by the
//! outbox against the operator's config.

use crate::error::RunFailure;
use crate::event::{Email, HttpResponse, Outcome};
use crate::limits::Limits;
use sendbox_types::RESERVED_HEADERS;

/// Longest idempotency key, in bytes.
pub const MAX_IDEMPOTENCY_KEY_BYTES: usize = 200;

fn invalid(msg: String) -> RunFailure {
    RunFailure::InvalidOutcome(msg)
}

fn single_line(what: &str, value: &str) -> Result<(), RunFailure> {
    if let Some(c) = value.chars().find(|c| matches!(c, '\r' | '\n' | '\0')) {
        return Err(invalid(format!(
            "{what} contains {} (header injection is refused): {:?}",
            match c {
                '\r' => "a carriage return",
                '\n' => "a line feed",
                _ => "a NUL byte",
            },
            truncate(value, 80)
        )));
    }
    Ok(())
}

fn truncate(s: &str, max: usize) -> &str {
    match s.char_indices().nth(max) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

/// An RFC 5322 field name: printable ASCII except `:`.
fn header_name(what: &str, name: &str) -> Result<(), RunFailure> {
    if name.is_empty() || !name.bytes().all(|b| (33..=126).contains(&b) && b != b':') {
        return Err(invalid(format!(
            "{what} name {:?} is not a valid header name (printable ASCII, no spaces or `:`)",
            truncate(name, 80)
        )));
    }
    Ok(())
}

fn address(what: &str, addr: &str) -> Result<(), RunFailure> {
    single_line(what, addr)?;
    if !addr.contains('@') {
        return Err(invalid(format!(
            "{what} {:?} is not an email address",
            truncate(addr, 80)
        )));
    }
    Ok(())
}

fn email(i: usize, e: &Email) -> Result<(), RunFailure> {
    let at = |field: &str| format!("emails[{i}].{field}");
    if e.to.is_empty() && e.cc.is_empty() && e.bcc.is_empty() {
        return Err(invalid(format!("emails[{i}] has no recipients")));
    }
    for (field, list) in [("to", &e.to), ("cc", &e.cc), ("bcc", &e.bcc)] {
        for (j, a) in list.iter().enumerate() {
            address(&format!("emails[{i}].{field}[{j}]"), a)?;
        }
    }
    if let Some(s) = &e.sender {
        address(&at("sender"), s)?;
    }
    if let Some(r) = &e.reply_to {
        address(&at("reply_to"), r)?;
    }
    single_line(&at("subject"), &e.subject)?;
    for (j, (name, value)) in e.headers.iter().enumerate() {
        let what = format!("emails[{i}].headers[{j}]");
        header_name(&what, name)?;
        single_line(&format!("{what} ({name}) value"), value)?;
        if RESERVED_HEADERS.contains(&name.to_ascii_lowercase().as_str()) {
            return Err(invalid(format!(
                "{what} sets `{name}`, which the host writes itself; use the email's fields instead"
            )));
        }
    }
    for (j, a) in e.attachments.iter().enumerate() {
        let what = format!("emails[{i}].attachments[{j}]");
        single_line(&format!("{what}.filename"), &a.filename)?;
        single_line(&format!("{what}.content_type"), &a.content_type)?;
        if a.filename.is_empty() {
            return Err(invalid(format!("{what}.filename is empty")));
        }
        if !a.content_type.contains('/') {
            return Err(invalid(format!(
                "{what}.content_type {:?} is not a MIME type like `text/csv`",
                truncate(&a.content_type, 80)
            )));
        }
    }
    if let Some(k) = &e.idempotency_key
        && (k.is_empty() || k.len() > MAX_IDEMPOTENCY_KEY_BYTES)
    {
        return Err(invalid(format!(
            "{} must be 1 to {MAX_IDEMPOTENCY_KEY_BYTES} bytes, got {}",
            at("idempotency_key"),
            k.len()
        )));
    }
    // A PostgreSQL outbox cannot store one (text holds no NUL), and the
    // commit would fail with a storage error instead of this reason.
    if e.idempotency_key
        .as_deref()
        .is_some_and(|k| k.contains('\0'))
    {
        return Err(invalid(format!(
            "{} contains a NUL byte",
            at("idempotency_key")
        )));
    }
    Ok(())
}

fn response(r: &HttpResponse) -> Result<(), RunFailure> {
    if !(100..=599).contains(&r.status) {
        return Err(invalid(format!(
            "response.status {} is not an HTTP status (100 to 599)",
            r.status
        )));
    }
    for (j, (name, value)) in r.headers.iter().enumerate() {
        let what = format!("response.headers[{j}]");
        header_name(&what, name)?;
        single_line(&format!("{what} ({name}) value"), value)?;
    }
    Ok(())
}

/// Checks an outcome against the contract and the plugin's limits.
pub fn outcome(o: &Outcome, limits: &Limits) -> Result<(), RunFailure> {
    if o.emails.len() > limits.emails_per_outcome as usize {
        return Err(RunFailure::Limit {
            limit: "emails_per_outcome",
            detail: format!(
                "returned {} emails, the limit is {}",
                o.emails.len(),
                limits.emails_per_outcome
            ),
        });
    }
    let total: u64 = o.emails.iter().map(Email::content_bytes).sum::<u64>()
        + o.response.as_ref().map_or(0, |r| r.body.0.len() as u64);
    if total > limits.outcome_bytes {
        return Err(RunFailure::Limit {
            limit: "outcome_bytes",
            detail: format!(
                "returned {total} bytes of content, the limit is {}",
                limits.outcome_bytes
            ),
        });
    }
    for (i, e) in o.emails.iter().enumerate() {
        email(i, e)?;
    }
    if let Some(r) = &o.response {
        response(r)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok_email() -> Email {
        Email {
            to: vec!["ops@example.com".into()],
            subject: "hi".into(),
            text: Some("body".into()),
            ..Email::default()
        }
    }

    fn check(e: Email) -> Result<(), RunFailure> {
        outcome(
            &Outcome {
                emails: vec![e],
                response: None,
            },
            &Limits::default(),
        )
    }

    #[test]
    fn accepts_a_plain_email() {
        check(ok_email()).unwrap();
    }

    #[test]
    fn refuses_a_nul_byte_in_an_idempotency_key() {
        let mut e = ok_email();
        e.idempotency_key = Some("alert\0firing".into());
        let err = check(e).unwrap_err().to_string();
        assert!(
            err.contains("emails[0].idempotency_key contains a NUL byte"),
            "{err}"
        );
        let mut e = ok_email();
        e.idempotency_key = Some("alert firing".into());
        check(e).unwrap();
    }

    #[test]
    fn refuses_line_breaks_in_subject_and_headers() {
        let mut e = ok_email();
        e.subject = "hi\r\nBcc: victim@example.com".into();
        let err = check(e).unwrap_err().to_string();
        assert!(
            err.contains("emails[0].subject contains a carriage return"),
            "{err}"
        );

        let mut e = ok_email();
        e.headers = vec![("X-Tag".into(), "a\nb".into())];
        let err = check(e).unwrap_err().to_string();
        assert!(
            err.contains("headers[0] (X-Tag) value contains a line feed"),
            "{err}"
        );
    }

    #[test]
    fn refuses_reserved_and_malformed_header_names() {
        let mut e = ok_email();
        e.headers = vec![("From".into(), "ceo@example.com".into())];
        assert!(check(e).unwrap_err().to_string().contains("writes itself"));
        let mut e = ok_email();
        e.headers = vec![("X Bad".into(), "v".into())];
        assert!(
            check(e)
                .unwrap_err()
                .to_string()
                .contains("not a valid header name")
        );
    }

    #[test]
    fn refuses_too_many_emails_naming_the_limit() {
        let o = Outcome {
            emails: vec![ok_email(); 101],
            response: None,
        };
        let err = outcome(&o, &Limits::default()).unwrap_err();
        assert!(
            matches!(
                err,
                RunFailure::Limit {
                    limit: "emails_per_outcome",
                    ..
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn refuses_an_email_without_recipients() {
        let mut e = ok_email();
        e.to.clear();
        assert!(check(e).unwrap_err().to_string().contains("no recipients"));
    }
}
