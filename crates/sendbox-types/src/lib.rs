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
pub mod manifest;
mod smtp;

pub use event::*;
pub use smtp::{Submitted, Verdict};

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

/// What one call read from committed plugin state, so the commit can check
/// that nothing it relied on changed meanwhile (optimistic concurrency).
///
/// Versions are per key and never repeat: every committed write of a key
/// gives it a version higher than any it had before, and an absent key reads
/// as version 0. So "the version is still the one I read" means "the value is
/// still the one I read".
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReadSet {
    /// Keys read from the store, with the version seen (0: absent).
    pub keys: std::collections::BTreeMap<String, u64>,
    /// Prefixes listed from the store, with the keys the listing returned.
    pub prefixes: std::collections::BTreeMap<String, Vec<String>>,
}

impl ReadSet {
    /// Whether the call read nothing from the store.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty() && self.prefixes.is_empty()
    }
}

/// Longest state key, in bytes. Keys must also not contain NUL (a portable
/// store cannot hold it in text).
pub const MAX_STATE_KEY_BYTES: usize = 256;

/// Why a state key cannot be stored, or `None` when it can.
pub fn state_key_problem(key: &str) -> Option<String> {
    if key.is_empty() || key.len() > MAX_STATE_KEY_BYTES {
        return Some(format!(
            "state key must be 1 to {MAX_STATE_KEY_BYTES} bytes, got {}",
            key.len()
        ));
    }
    if key.contains('\0') {
        return Some("state key must not contain NUL".into());
    }
    None
}

/// Milliseconds since the Unix epoch (0 if the clock is before it).
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// The domain part of an address (`localhost` when there is none), for
/// Message-IDs.
pub fn domain_of(address: &str) -> &str {
    address
        .rsplit_once('@')
        .map(|(_, d)| d.trim_end_matches('>'))
        .filter(|d| !d.is_empty())
        .unwrap_or("localhost")
}

/// A new globally unique Message-ID for `domain`: `<ms.random@domain>`,
/// with 128 bits from the process's random hash keys and a counter, so
/// ids made at once by several threads or processes never collide.
pub fn new_message_id(domain: &str) -> String {
    use std::hash::{BuildHasher, Hasher};
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    // `getpid` is a system call each time; the id is this process's.
    static PID: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
    let pid = *PID.get_or_init(std::process::id);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let mut random = [0u64; 2];
    for (i, part) in random.iter_mut().enumerate() {
        // Keys from the OS's randomness, read once per thread and stepped
        // for each RandomState (no system call here).
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u64(n);
        h.write_usize(i);
        h.write_u32(pid);
        *part = h.finish();
    }
    format!(
        "<{}.{:016x}{:016x}@{domain}>",
        now_ms(),
        random[0],
        random[1]
    )
}

/// Cuts `text` to at most `max` bytes (plus a marker) on a character
/// boundary; returns how many bytes were cut. For anything a plugin or a
/// stranger wrote that reaches a log line or an answer.
pub fn truncate_text(text: &mut String, max: usize) -> usize {
    if text.len() <= max {
        return 0;
    }
    let mut cut = max;
    while !text.is_char_boundary(cut) {
        cut -= 1;
    }
    let dropped = text.len() - cut;
    text.truncate(cut);
    text.push_str(&format!("… ({dropped} bytes cut)"));
    dropped
}

/// Headers the host writes itself; a plugin sets them through the email's
/// fields or not at all. Lower-case.
pub const RESERVED_HEADERS: &[&str] = &[
    "bcc",
    "cc",
    "content-transfer-encoding",
    "content-type",
    "date",
    "from",
    "message-id",
    "mime-version",
    "reply-to",
    "return-path",
    "sender",
    "subject",
    "to",
];

/// The bare address of `Name <a@b.c>` or `a@b.c`, lower-cased.
pub fn bare_address(s: &str) -> String {
    let s = s.trim();
    let inner = match (s.rfind('<'), s.rfind('>')) {
        (Some(a), Some(b)) if a < b => &s[a + 1..b],
        _ => s,
    };
    inner.trim().to_ascii_lowercase()
}

/// Whether a bare address matches an operator's allow-list entry: an exact
/// address or `*@domain`, case-insensitively.
pub fn address_matches(address: &str, patterns: &[String]) -> bool {
    let address = address.to_ascii_lowercase();
    patterns.iter().any(|p| {
        let p = p.trim().to_ascii_lowercase();
        match p.strip_prefix("*@") {
            Some(domain) => address.rsplit_once('@').is_some_and(|(_, d)| d == domain),
            None => p == address,
        }
    })
}

#[cfg(test)]
mod address_tests {
    use super::*;

    #[test]
    fn bare_addresses_and_patterns() {
        assert_eq!(bare_address("Ops <OPS@Example.com>"), "ops@example.com");
        assert!(address_matches("a@x.org", &["*@X.org".into()]));
        assert!(!address_matches("a@evilx.org", &["*@x.org".into()]));
        assert!(address_matches("A@x.org", &["a@x.org".into()]));
    }
}
