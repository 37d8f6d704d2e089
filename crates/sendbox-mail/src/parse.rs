//! A submitted message taken apart for a plugin: header fields unfolded,
//! the Subject decoded, the first text/plain and text/html parts and the
//! other parts (files) decoded (base64, quoted-printable). Lenient: what
//! cannot be decoded is passed on as it is; never fails.

use base64::Engine as _;
use sendbox_types::{Attachment, Bytes};

/// What [`parse`] finds.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Parsed {
    /// Header fields in order, unfolded.
    pub headers: Vec<(String, String)>,
    /// The Subject, encoded words decoded.
    pub subject: String,
    /// The first text/plain part.
    pub text: Option<String>,
    /// The first text/html part.
    pub html: Option<String>,
    /// The other leaf parts.
    pub attachments: Vec<Attachment>,
}

/// Most nested multiparts followed.
const MAX_DEPTH: usize = 8;

/// Takes a message apart; see the module docs.
pub fn parse(raw: &[u8]) -> Parsed {
    let (headers, body) = split(raw);
    let mut parsed = Parsed {
        subject: headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case("Subject"))
            .map(|(_, v)| decode_words(v))
            .unwrap_or_default(),
        ..Parsed::default()
    };
    walk(&headers, body, 0, &mut parsed);
    parsed.headers = headers;
    parsed
}

/// Header fields (unfolded) and the body.
fn split(raw: &[u8]) -> (Vec<(String, String)>, &[u8]) {
    let (head, body) = match raw.windows(4).position(|w| w == b"\r\n\r\n") {
        Some(i) => (&raw[..i], &raw[i + 4..]),
        None => match raw.windows(2).position(|w| w == b"\n\n") {
            Some(i) => (&raw[..i], &raw[i + 2..]),
            None => (raw, &raw[raw.len()..]),
        },
    };
    let text = String::from_utf8_lossy(head);
    let mut fields: Vec<(String, String)> = Vec::new();
    for line in text.split('\n').map(|l| l.trim_end_matches('\r')) {
        if line.starts_with([' ', '\t']) {
            if let Some(last) = fields.last_mut() {
                last.1.push(' ');
                last.1.push_str(line.trim());
            }
        } else if let Some((name, value)) = line.split_once(':') {
            fields.push((name.trim().to_owned(), value.trim().to_owned()));
        }
    }
    (fields, body)
}

fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

/// A parameter of a structured header, e.g. `boundary` of Content-Type.
fn param(value: &str, name: &str) -> Option<String> {
    value.split(';').skip(1).find_map(|p| {
        let (k, v) = p.split_once('=')?;
        k.trim()
            .eq_ignore_ascii_case(name)
            .then(|| v.trim().trim_matches('"').to_owned())
    })
}

fn walk(headers: &[(String, String)], body: &[u8], depth: usize, out: &mut Parsed) {
    let content_type = header(headers, "Content-Type").unwrap_or("text/plain");
    let mime = content_type
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    if mime.starts_with("multipart/")
        && depth < MAX_DEPTH
        && let Some(boundary) = param(content_type, "boundary")
    {
        for part in parts(body, &boundary) {
            let (h, b) = split(part);
            walk(&h, b, depth + 1, out);
        }
        return;
    }
    let data = decode_body(header(headers, "Content-Transfer-Encoding"), body);
    let disposition = header(headers, "Content-Disposition").unwrap_or("");
    let attached = disposition
        .trim_start()
        .to_ascii_lowercase()
        .starts_with("attachment");
    match mime.as_str() {
        "text/plain" if !attached && out.text.is_none() => {
            out.text = Some(String::from_utf8_lossy(&data).into_owned());
        }
        "text/html" if !attached && out.html.is_none() => {
            out.html = Some(String::from_utf8_lossy(&data).into_owned());
        }
        _ => {
            let filename = param(disposition, "filename")
                .or_else(|| param(content_type, "name"))
                .map(|f| decode_words(&f))
                .unwrap_or_else(|| format!("part-{}", out.attachments.len() + 1));
            out.attachments.push(Attachment {
                filename,
                content_type: mime,
                data: Bytes(data),
            });
        }
    }
}

/// The parts between `--boundary` lines.
fn parts<'a>(body: &'a [u8], boundary: &str) -> Vec<&'a [u8]> {
    let delimiter = format!("--{boundary}");
    let mut parts = Vec::new();
    let mut start: Option<usize> = None;
    let mut at = 0;
    while at <= body.len() {
        let end = body[at..]
            .iter()
            .position(|&b| b == b'\n')
            .map_or(body.len(), |i| at + i + 1);
        let line = String::from_utf8_lossy(&body[at..end]);
        let line = line.trim_end();
        if line == delimiter || line == format!("{delimiter}--") {
            if let Some(s) = start {
                // The line break before the delimiter belongs to it.
                let mut e = at;
                if e > s && body[e - 1] == b'\n' {
                    e -= 1;
                }
                if e > s && body[e - 1] == b'\r' {
                    e -= 1;
                }
                parts.push(&body[s..e]);
            }
            if line.ends_with("--") {
                break;
            }
            start = Some(end);
        }
        if end == body.len() {
            break;
        }
        at = end;
    }
    parts
}

fn decode_body(encoding: Option<&str>, body: &[u8]) -> Vec<u8> {
    match encoding.map(|e| e.trim().to_ascii_lowercase()).as_deref() {
        Some("base64") => {
            let clean: Vec<u8> = body
                .iter()
                .copied()
                .filter(|b| !b.is_ascii_whitespace())
                .collect();
            base64::engine::general_purpose::STANDARD
                .decode(&clean)
                .unwrap_or_else(|_| body.to_vec())
        }
        Some("quoted-printable") => quoted_printable(body, false),
        _ => body.to_vec(),
    }
}

/// Quoted-printable (RFC 2045); with `underscore`, the Q encoding of
/// encoded words (RFC 2047), where `_` is a space.
fn quoted_printable(input: &[u8], underscore: bool) -> Vec<u8> {
    let mut out = Vec::with_capacity(input.len());
    let mut i = 0;
    while i < input.len() {
        match input[i] {
            b'=' if input.get(i + 1) == Some(&b'\r') && input.get(i + 2) == Some(&b'\n') => i += 3,
            b'=' if input.get(i + 1) == Some(&b'\n') => i += 2,
            b'=' => {
                let hex = input
                    .get(i + 1..i + 3)
                    .and_then(|h| std::str::from_utf8(h).ok());
                match hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                    Some(b) => {
                        out.push(b);
                        i += 3;
                    }
                    None => {
                        out.push(b'=');
                        i += 1;
                    }
                }
            }
            b'_' if underscore => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    out
}

/// Decodes RFC 2047 encoded words (`=?charset?B|Q?text?=`), as UTF-8.
fn decode_words(value: &str) -> String {
    let mut out = String::new();
    let mut rest = value;
    let mut last_was_word = false;
    while let Some(start) = rest.find("=?") {
        let (before, after) = rest.split_at(start);
        let word = after[2..].splitn(3, '?').collect::<Vec<_>>();
        let decoded = match word.as_slice() {
            [_charset, enc, tail] => tail.find("?=").and_then(|end| {
                let text = &tail[..end];
                let bytes = match enc.to_ascii_uppercase().as_str() {
                    "B" => base64::engine::general_purpose::STANDARD
                        .decode(text)
                        .ok()?,
                    "Q" => quoted_printable(text.as_bytes(), true),
                    _ => return None,
                };
                let consumed = 2 + word[0].len() + 1 + enc.len() + 1 + end + 2;
                Some((String::from_utf8_lossy(&bytes).into_owned(), consumed))
            }),
            _ => None,
        };
        match decoded {
            Some((text, consumed)) => {
                // Whitespace between two encoded words is dropped.
                if !(last_was_word && before.trim().is_empty()) {
                    out.push_str(before);
                }
                out.push_str(&text);
                rest = &after[consumed..];
                last_was_word = true;
            }
            None => {
                out.push_str(before);
                out.push_str("=?");
                rest = &after[2..];
                last_was_word = false;
            }
        }
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_multipart_message_is_taken_apart() {
        let raw = b"From: a@b.c\r\nSubject: =?utf-8?q?Scan_=C3=A9t=C3=A9?= =?utf-8?b?IDI=?=\r\nContent-Type: multipart/mixed;\r\n boundary=\"XX\"\r\n\r\n--XX\r\nContent-Type: multipart/alternative; boundary=YY\r\n\r\n--YY\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\nHello =C3=A9=\r\nt=C3=A9\r\n--YY\r\nContent-Type: text/html\r\n\r\n<p>Hi</p>\r\n--YY--\r\n--XX\r\nContent-Type: application/pdf; name=\"scan.pdf\"\r\nContent-Disposition: attachment; filename=\"scan.pdf\"\r\nContent-Transfer-Encoding: base64\r\n\r\nJVBE\r\nRi0x\r\n--XX--\r\n";
        let p = parse(raw);
        assert_eq!(p.subject, "Scan été 2");
        assert_eq!(p.text.as_deref(), Some("Hello été"));
        assert_eq!(p.html.as_deref(), Some("<p>Hi</p>"));
        assert_eq!(p.attachments.len(), 1);
        assert_eq!(p.attachments[0].filename, "scan.pdf");
        assert_eq!(p.attachments[0].content_type, "application/pdf");
        assert_eq!(p.attachments[0].data.0, b"%PDF-1");
        assert_eq!(p.headers[2].1, "multipart/mixed; boundary=\"XX\"");
    }

    #[test]
    fn anything_parses_to_something() {
        for raw in [
            &b""[..],
            b"no header",
            b"Content-Type: multipart/mixed\r\n\r\nno boundary",
            b"Subject: =?x?Z?bad?=\r\n\r\n",
        ] {
            let _ = parse(raw);
        }
        assert_eq!(
            parse(b"Subject: =?x?Z?bad?=\r\n\r\nbody").subject,
            "=?x?Z?bad?="
        );
        assert_eq!(
            parse(b"Subject: plain\r\n\r\nbody").text.as_deref(),
            Some("body")
        );
    }
}
