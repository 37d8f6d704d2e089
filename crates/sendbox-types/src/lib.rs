//! The data that flows through sendbox, shared by every step: the events
//! triggers produce, the outcomes plugins return, the emails the outbox
//! stores and the transports send, and the state changes committed with
//! them.
//!
//! This crate owns only plain data and its JSON form. It must not know about
//! wasmtime, SQLite, SMTP or tokens, so every crate can depend on it without
//! pulling any of those in.
//!
//! ```
//! let ev: sendbox_types::Event = serde_json::from_str(
//!     r#"{"schedule": {"schedule": "daily", "scheduled_at_ms": 0}}"#,
//! ).unwrap();
//! assert_eq!(ev.kind(), "schedule");
//! ```

#![deny(missing_docs)]

mod event;

pub use event::*;

use serde::{Deserialize, Serialize};

/// One change a call made.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "op")]
pub enum StateChange {
    /// Set `key` to `value`.
    Set {
        /// The key.
        key: String,
        /// The new value.
        value: Bytes,
    },
    /// Remove `key`.
    Delete {
        /// The key.
        key: String,
    },
}
