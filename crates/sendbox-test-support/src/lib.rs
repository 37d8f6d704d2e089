//! What sendbox's tests and benchmarks share, so none of them copies it:
//!
//! - [`peers`]: the real protocol peers (`tests/peers/peers.mjs`): an OAuth2
//!   server (oidc-provider) and SMTP servers (smtp-server), on loopback;
//! - [`smtp_peer`]: token providers, SMTP settings and messages for them;
//! - [`wasm`]: the example and hostile plugins, built from source;
//! - [`capture`]: tracing output kept in memory, to grep for secrets;
//! - [`postgres`]: a PostgreSQL database of its own per test;
//! - [`webhook_base`]: where a started `sendbox run` serves webhooks.
//!
//! It must not be a dependency of anything but tests and benchmarks.

pub mod capture;
pub mod cpu;
pub mod peers;
pub mod postgres;
pub mod smtp_peer;
pub mod wasm;

/// `http://127.0.0.1:PORT` from the line `sendbox run` prints when ready
/// (`sendbox ready: webhooks on http://..., ...`).
pub fn webhook_base(ready_line: &str) -> String {
    ready_line
        .split("webhooks on ")
        .nth(1)
        .and_then(|rest| rest.split(',').next())
        .unwrap_or_else(|| panic!("unexpected ready line {ready_line:?}"))
        .trim()
        .to_owned()
}
