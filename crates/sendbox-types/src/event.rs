//! The host-side event and outcome types, with their JSON form.
//!
//! These mirror the WIT records in `wit/sendbox.wit`. They exist apart from
//! the generated bindings so the rest of sendbox (triggers, outbox, CLI) can
//! use them without touching wasmtime, and so events and outcomes have a
//! readable JSON form: byte fields are written as a UTF-8 string when they
//! are text, and as `{"base64": "..."}` otherwise. When reading JSON, a body
//! may also be given as `{"json": <any JSON value>}`.

use base64::Engine as _;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Bytes that serialize as text when they are UTF-8, base64 otherwise.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Bytes(pub Vec<u8>);

impl std::fmt::Debug for Bytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match std::str::from_utf8(&self.0) {
            Ok(s) if s.len() <= 64 => write!(f, "{s:?}"),
            _ => write!(f, "<{} bytes>", self.0.len()),
        }
    }
}

impl From<Vec<u8>> for Bytes {
    fn from(v: Vec<u8>) -> Self {
        Bytes(v)
    }
}

impl From<&str> for Bytes {
    fn from(v: &str) -> Self {
        Bytes(v.as_bytes().to_vec())
    }
}

impl Serialize for Bytes {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match std::str::from_utf8(&self.0) {
            Ok(text) => s.serialize_str(text),
            Err(_) => {
                use serde::ser::SerializeMap;
                let mut m = s.serialize_map(Some(1))?;
                m.serialize_entry(
                    "base64",
                    &base64::engine::general_purpose::STANDARD.encode(&self.0),
                )?;
                m.end()
            }
        }
    }
}

impl<'de> Deserialize<'de> for Bytes {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Repr {
            Text(String),
            Tagged(Tagged),
        }
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields, rename_all = "lowercase")]
        enum Tagged {
            Base64(String),
            Json(serde_json::Value),
        }
        match Repr::deserialize(d).map_err(|_| {
            serde::de::Error::custom(
                "expected bytes as a string, {\"base64\": \"...\"} or {\"json\": ...}",
            )
        })? {
            Repr::Text(s) => Ok(Bytes(s.into_bytes())),
            Repr::Tagged(Tagged::Base64(b)) => base64::engine::general_purpose::STANDARD
                .decode(b.trim())
                .map(Bytes)
                .map_err(|e| serde::de::Error::custom(format!("bad base64: {e}"))),
            Repr::Tagged(Tagged::Json(v)) => serde_json::to_vec(&v)
                .map(Bytes)
                .map_err(serde::de::Error::custom),
        }
    }
}

/// One thing that happened, handed to a plugin.
///
/// JSON: `{"file": {...}}`, `{"webhook": {...}}` or `{"schedule": {...}}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Event {
    /// A watched file changed.
    File(FileEvent),
    /// A webhook request arrived.
    Webhook(HttpRequest),
    /// A schedule fired.
    Schedule(Tick),
}

impl Event {
    /// The trigger kind: `file`, `webhook` or `schedule`.
    pub fn kind(&self) -> &'static str {
        match self {
            Event::File(_) => "file",
            Event::Webhook(_) => "webhook",
            Event::Schedule(_) => "schedule",
        }
    }
}

/// What happened to a watched file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FileChange {
    /// The file appeared.
    Created,
    /// The file changed and settled.
    Modified,
    /// The file was removed.
    Removed,
}

/// A change in a watched folder.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileEvent {
    /// The watch's name in the config.
    pub watch: String,
    /// Path relative to the watch root, `/`-separated.
    pub path: String,
    /// What happened.
    pub change: FileChange,
    /// Size in bytes, when the file exists.
    #[serde(default)]
    pub size: Option<u64>,
    /// Contents, when read by the host.
    #[serde(default)]
    pub contents: Option<Bytes>,
}

/// A webhook request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpRequest {
    /// HTTP method; defaults to `POST` in JSON.
    #[serde(default = "default_method")]
    pub method: String,
    /// Request path.
    pub path: String,
    /// Raw query string without `?`.
    #[serde(default)]
    pub query: String,
    /// Headers with lower-case names.
    #[serde(default)]
    pub headers: Vec<(String, String)>,
    /// The body.
    #[serde(default)]
    pub body: Bytes,
}

fn default_method() -> String {
    "POST".into()
}

/// A schedule firing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Tick {
    /// The schedule's name in the config.
    pub schedule: String,
    /// When the run was due, ms since the Unix epoch.
    pub scheduled_at_ms: i64,
}

/// What a plugin returned.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Outcome {
    /// Emails to queue.
    pub emails: Vec<Email>,
    /// The webhook answer, if the plugin chose one.
    pub response: Option<HttpResponse>,
}

/// One email a plugin wants sent.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Email {
    /// Recipients.
    pub to: Vec<String>,
    /// Carbon-copy recipients.
    #[serde(default)]
    pub cc: Vec<String>,
    /// Blind carbon-copy recipients.
    #[serde(default)]
    pub bcc: Vec<String>,
    /// The From address, if not the account's mailbox.
    #[serde(default)]
    pub sender: Option<String>,
    /// Reply-To.
    #[serde(default)]
    pub reply_to: Option<String>,
    /// Subject.
    pub subject: String,
    /// Plain-text body.
    #[serde(default)]
    pub text: Option<String>,
    /// HTML body.
    #[serde(default)]
    pub html: Option<String>,
    /// Attachments.
    #[serde(default)]
    pub attachments: Vec<Attachment>,
    /// Extra headers.
    #[serde(default)]
    pub headers: Vec<(String, String)>,
    /// Deduplication key.
    #[serde(default)]
    pub idempotency_key: Option<String>,
    /// A whole message as a client submitted it over SMTP (headers and
    /// MIME body, lines ending in CRLF). When set it is relayed as sent,
    /// with only what the account requires changed (see
    /// `sendbox_mail::relay`), and `to` holds the envelope recipients
    /// (`cc`, `bcc`, `text`, `html`, `attachments` and `headers` unused).
    /// Never set by plugins built against `sendbox:plugin@0.1.0`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub raw: Option<Bytes>,
}

impl Email {
    /// Every recipient: to, cc and bcc.
    pub fn recipients(&self) -> impl Iterator<Item = &str> {
        self.to
            .iter()
            .chain(&self.cc)
            .chain(&self.bcc)
            .map(String::as_str)
    }

    /// Bytes of content this email carries (bodies and attachments), a lower
    /// bound of its encoded size.
    pub fn content_bytes(&self) -> u64 {
        let text = self.text.as_deref().map_or(0, str::len);
        let html = self.html.as_deref().map_or(0, str::len);
        let att: usize = self.attachments.iter().map(|a| a.data.0.len()).sum();
        let raw = self.raw.as_ref().map_or(0, |r| r.0.len());
        (self.subject.len() + text + html + att + raw) as u64
    }
}

/// A file attached to an email.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Attachment {
    /// File name.
    pub filename: String,
    /// MIME type.
    pub content_type: String,
    /// Contents.
    pub data: Bytes,
}

/// An HTTP response chosen by the plugin.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpResponse {
    /// Status code.
    pub status: u16,
    /// Headers.
    #[serde(default)]
    pub headers: Vec<(String, String)>,
    /// Body.
    #[serde(default)]
    pub body: Bytes,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_round_trip_as_text_or_base64() {
        let text = Bytes::from("hello");
        assert_eq!(serde_json::to_string(&text).unwrap(), "\"hello\"");
        let bin = Bytes(vec![0xff, 0x00, 0x01]);
        let json = serde_json::to_string(&bin).unwrap();
        assert_eq!(json, r#"{"base64":"/wAB"}"#);
        let back: Bytes = serde_json::from_str(&json).unwrap();
        assert_eq!(back, bin);
    }

    #[test]
    fn body_may_be_given_as_json_value() {
        let ev: Event = serde_json::from_str(
            r#"{"webhook": {"path": "/hooks/a", "body": {"json": {"a": [1, 2]}}}}"#,
        )
        .unwrap();
        let Event::Webhook(req) = ev else {
            panic!("not a webhook")
        };
        assert_eq!(req.method, "POST");
        assert_eq!(req.body.0, br#"{"a":[1,2]}"#);
    }

    #[test]
    fn unknown_event_fields_are_refused() {
        let err = serde_json::from_str::<Event>(
            r#"{"schedule": {"schedule": "d", "scheduled_at_ms": 1, "extra": 1}}"#,
        )
        .unwrap_err();
        assert!(err.to_string().contains("unknown field `extra`"), "{err}");
    }
}
