//! A message submitted to an SMTP listener, as a plugin sees it, and the
//! plugin's verdict on it (WIT interface `smtp`).

use crate::{Attachment, Bytes, Email};

/// A submitted message, parsed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Submitted {
    /// The listener's name.
    pub listener: String,
    /// The client's address and port.
    pub client: String,
    /// The user it logged in as.
    pub user: Option<String>,
    /// `MAIL FROM`.
    pub mail_from: String,
    /// `RCPT TO`.
    pub recipients: Vec<String>,
    /// Header fields in order, unfolded.
    pub headers: Vec<(String, String)>,
    /// The Subject, decoded.
    pub subject: String,
    /// The first text/plain part.
    pub text: Option<String>,
    /// The first text/html part.
    pub html: Option<String>,
    /// The other parts.
    pub attachments: Vec<Attachment>,
    /// The message as submitted, when small enough for the plugin.
    pub raw: Option<Bytes>,
    /// Its size in bytes.
    pub size: u64,
}

/// What a plugin decided about a submitted message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Deliver it as submitted.
    Relay,
    /// Send these instead (none: drop it).
    Replace(Vec<Email>),
    /// Refuse it with this SMTP reply.
    Refuse {
        /// The reply code.
        code: u16,
        /// Its text.
        text: String,
    },
}
