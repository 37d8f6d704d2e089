//! Messages and transports: builds an RFC 5322 message from an email, and
//! delivers it through SMTP with XOAUTH2 or into a folder of `.eml` files.
//!
//! This crate owns the wire: message format, SMTP sessions, TLS, and the
//! classification of every failure as transient, permanent, authentication
//! or configuration ([`SendError`]). It gets tokens from `sendbox-auth` and
//! must not know about plugins, triggers or the outbox's storage; the outbox
//! decides retries only from [`SendError::is_transient`] and friends.
//!
//! # Layout
//! - [`message`]: [`message::build`] and Message-IDs.
//! - [`smtp`]: [`smtp::SmtpTransport`], STARTTLS/implicit TLS + XOAUTH2.
//! - [`file`]: [`file::FileTransport`], atomic `.eml` files.
//! - [`error`]: [`SendError`] and its classification.

#![deny(missing_docs)]

pub mod error;
pub mod file;
pub mod message;
pub mod parse;
pub mod relay;
pub mod smtp;

pub use error::{FailureKind, SendError};
pub use message::{BuildError, Prepared};
pub use smtp::{Receipt, RefusedRecipient};

/// Any transport an account can use.
#[derive(Debug)]
pub enum Transport {
    /// SMTP with XOAUTH2.
    Smtp(Box<smtp::SmtpTransport>),
    /// `.eml` files in a folder.
    File(file::FileTransport),
}

impl Transport {
    /// Delivers one message; returns the server's reply (or the file
    /// path) and the recipients the server refused.
    pub async fn send(&self, message: Prepared) -> Result<Receipt, SendError> {
        match self {
            Transport::Smtp(t) => t.send(message).await,
            Transport::File(t) => t.send(&message).await.map(|p| Receipt {
                reply: format!("written to {}", p.display()),
                refused: Vec::new(),
            }),
        }
    }

    /// Closes the connections kept open between sends (SMTP's idle ones);
    /// the next send opens a new one.
    pub async fn close(&self) {
        if let Transport::Smtp(t) = self {
            t.close().await;
        }
    }
}
