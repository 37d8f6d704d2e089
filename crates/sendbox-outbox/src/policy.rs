//! What an operator allows a plugin to send, and the checks of a call
//! against it that need no store.

use serde::{Deserialize, Serialize};

use sendbox_types::{address_matches as matches, bare_address};

use crate::{Call, OutboxError};

/// What an operator allows one plugin to send. A violation rejects the
/// whole outcome; nothing partial is queued.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Policy {
    /// From addresses allowed besides the account's mailbox: exact
    /// addresses or `*@domain`. Default: none.
    #[serde(default)]
    pub allowed_from: Vec<String>,
    /// Recipients allowed: exact addresses or `*@domain`. Empty allows any.
    #[serde(default)]
    pub allowed_recipients: Vec<String>,
    /// Most recipients (to + cc + bcc) per email. Default 100 (Exchange
    /// allows 500).
    #[serde(default = "default_recipients_per_email")]
    pub recipients_per_email: u32,
    /// Largest email (bodies and attachments) in bytes. Default 20 MiB.
    #[serde(default = "default_message_bytes")]
    pub message_bytes: u64,
    /// Most emails this plugin may queue per rolling hour. Default none.
    #[serde(default)]
    pub emails_per_hour: Option<u32>,
    /// Most emails this plugin may queue per rolling day. Default none.
    #[serde(default)]
    pub emails_per_day: Option<u32>,
    /// How long an idempotency key is remembered, in hours. Default 168
    /// (a week).
    #[serde(default = "default_idempotency_hours")]
    pub idempotency_hours: u32,
}

/// 100.
pub fn default_recipients_per_email() -> u32 {
    100
}
/// 20 MiB.
pub fn default_message_bytes() -> u64 {
    20 << 20
}
/// A week.
pub fn default_idempotency_hours() -> u32 {
    168
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            allowed_from: Vec::new(),
            allowed_recipients: Vec::new(),
            recipients_per_email: default_recipients_per_email(),
            message_bytes: default_message_bytes(),
            emails_per_hour: None,
            emails_per_day: None,
            idempotency_hours: default_idempotency_hours(),
        }
    }
}

/// The rate limits of a policy, each with its window in ms and the words
/// a refusal uses: (limit, window, key, span).
pub(crate) fn rates(p: &Policy) -> [(Option<u32>, i64, &'static str, &'static str); 2] {
    [
        (p.emails_per_hour, 3_600_000, "emails_per_hour", "hour"),
        (p.emails_per_day, 86_400_000, "emails_per_day", "day"),
    ]
}

/// The refusal when `new` more emails after `used` in the window would
/// pass `limit`; `None` when they fit.
pub(crate) fn over_rate(
    plugin: &str,
    (used, new): (u64, u64),
    (limit, key, span): (u32, &str, &str),
) -> Option<OutboxError> {
    (used + new > u64::from(limit)).then(|| {
        OutboxError::Policy(format!(
            "plugin `{plugin}` queued {used} emails in the last {span}; {new} more would pass {key} = {limit}"
        ))
    })
}

/// The refusal of a state change that grows a plugin's state past its
/// quota (checked against state that changed since the plugin looked, so a
/// conflict: the event runs again). Shrinking is always allowed.
pub(crate) fn over_quota(delta: i64, after: i64, quota: Option<u64>) -> Option<OutboxError> {
    match quota {
        Some(quota) if delta > 0 && after > quota as i64 => Some(OutboxError::Conflict(format!(
            "state would grow to {after} bytes, over the quota of {quota}"
        ))),
        _ => None,
    }
}

/// The refusal of a state change from `state` when only `from_any` may
/// move.
pub(crate) fn wrong_state(id: i64, state: String, from_any: &[crate::State]) -> OutboxError {
    let expected: Vec<&str> = from_any.iter().map(|s| s.as_str()).collect();
    OutboxError::WrongState {
        id,
        state,
        expected: expected.join(" or "),
    }
}

/// Checks the shape of a call against its policy: allowed senders and
/// recipients, recipients per email, sizes. Pure: no store is read, so
/// every backend applies the same rules. (Rates, suppression and
/// idempotency need the store; the backend checks them in the same
/// transaction as the commit.)
pub(crate) fn check(call: &Call) -> Result<(), OutboxError> {
    let p = &call.policy;
    let mailbox = bare_address(&call.account_mailbox);
    for (i, e) in call.emails.iter().enumerate() {
        if let Some(from) = &e.sender {
            let from = bare_address(from);
            if from != mailbox && !matches(&from, &p.allowed_from) {
                return Err(OutboxError::Policy(format!(
                    "emails[{i}]: From {from} is not allowed for plugin `{}` (allowed: {mailbox}{}{})",
                    call.plugin,
                    if p.allowed_from.is_empty() { "" } else { ", " },
                    p.allowed_from.join(", ")
                )));
            }
        }
        let n = e.to.len() + e.cc.len() + e.bcc.len();
        if n as u64 > u64::from(p.recipients_per_email) {
            return Err(OutboxError::Policy(format!(
                "emails[{i}] has {n} recipients, over recipients_per_email = {}",
                p.recipients_per_email
            )));
        }
        if !p.allowed_recipients.is_empty() {
            for r in e.recipients() {
                let r = bare_address(r);
                if !matches(&r, &p.allowed_recipients) {
                    return Err(OutboxError::Policy(format!(
                        "emails[{i}]: recipient {r} is not in allowed_recipients for plugin `{}`",
                        call.plugin
                    )));
                }
            }
        }
        if e.content_bytes() > p.message_bytes {
            return Err(OutboxError::Policy(format!(
                "emails[{i}] is {} bytes, over message_bytes = {}",
                e.content_bytes(),
                p.message_bytes
            )));
        }
    }
    Ok(())
}
