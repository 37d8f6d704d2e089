//! Per-plugin resource limits and their defaults.

use serde::{Deserialize, Serialize};

/// What one plugin may use while handling one event.
///
/// Every field has a default (see the `default_*` functions), so an operator
/// only writes the ones they change:
///
/// ```toml
/// [plugins.file-alert.limits]
/// memory_bytes = 33554432
/// cpu_ms_per_event = 500
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    /// Largest linear memory the plugin may grow to, in bytes. Growing past it
    /// traps. Default 64 MiB.
    #[serde(default = "default_memory_bytes")]
    pub memory_bytes: u64,
    /// CPU time one event may take, in milliseconds: the time its thread
    /// spends computing, checked at each epoch tick (10 ms resolution), so
    /// a busy host that gives the plugin less of a core does not fail it. A
    /// sleep counts as computing: it wakes this long after the event began.
    /// Default 1000.
    #[serde(default = "default_cpu_ms_per_event")]
    pub cpu_ms_per_event: u64,
    /// Wall-clock time one event may take, in milliseconds, whatever it was
    /// doing (computing, waiting for a core, sleeping): how long an event
    /// can hold its thread and its route's slot on a host too busy to give
    /// it the CPU time it may use. Default 5 × `cpu_ms_per_event`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wall_ms_per_event: Option<u64>,
    /// Most bytes the host copies out of the guest in one call, the returned
    /// outcome included (attachments, bodies). Default 16 MiB.
    #[serde(default = "default_outcome_bytes")]
    pub outcome_bytes: u64,
    /// Most emails one outcome may carry. Default 100.
    #[serde(default = "default_emails_per_outcome")]
    pub emails_per_outcome: u32,
    /// Total size of keys and values the plugin may keep in its state, in
    /// bytes. Default 1 MiB.
    #[serde(default = "default_state_bytes")]
    pub state_bytes: u64,
    /// Most bytes of log output (the `log` import, stdout and stderr
    /// together) kept per event; the rest is dropped and counted. Default
    /// 64 KiB.
    #[serde(default = "default_log_bytes_per_event")]
    pub log_bytes_per_event: u64,
}

/// 64 MiB.
pub fn default_memory_bytes() -> u64 {
    64 << 20
}
/// One second.
pub fn default_cpu_ms_per_event() -> u64 {
    1000
}
/// 16 MiB.
pub fn default_outcome_bytes() -> u64 {
    16 << 20
}
/// 100 emails.
pub fn default_emails_per_outcome() -> u32 {
    100
}
/// 1 MiB.
pub fn default_state_bytes() -> u64 {
    1 << 20
}
/// 64 KiB.
pub fn default_log_bytes_per_event() -> u64 {
    64 << 10
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            memory_bytes: default_memory_bytes(),
            cpu_ms_per_event: default_cpu_ms_per_event(),
            wall_ms_per_event: None,
            outcome_bytes: default_outcome_bytes(),
            emails_per_outcome: default_emails_per_outcome(),
            state_bytes: default_state_bytes(),
            log_bytes_per_event: default_log_bytes_per_event(),
        }
    }
}

/// The largest memory any plugin may be given, whatever its config says: the
/// pooling allocator reserves slots of this size.
pub const MAX_MEMORY_BYTES: u64 = 1 << 30;

impl Limits {
    /// The wall-clock limit in force: `wall_ms_per_event`, or five times
    /// the CPU limit.
    pub fn wall_ms(&self) -> u64 {
        self.wall_ms_per_event
            .unwrap_or_else(|| self.cpu_ms_per_event.saturating_mul(5))
    }

    /// Checks the limits for values the runtime cannot honour, naming the
    /// field and the fix.
    pub fn validate(&self) -> Result<(), String> {
        if self.memory_bytes == 0 || self.memory_bytes > MAX_MEMORY_BYTES {
            return Err(format!(
                "memory_bytes = {} is out of range: use 1 to {MAX_MEMORY_BYTES} (1 GiB)",
                self.memory_bytes
            ));
        }
        if self.cpu_ms_per_event < 10 {
            return Err(format!(
                "cpu_ms_per_event = {} is below the 10 ms resolution of the CPU clock: use 10 or more",
                self.cpu_ms_per_event
            ));
        }
        if self.wall_ms() < self.cpu_ms_per_event {
            return Err(format!(
                "wall_ms_per_event = {} is below cpu_ms_per_event = {}: an event could never use its CPU time; use {} or more, or leave it out (default 5 × cpu_ms_per_event)",
                self.wall_ms(),
                self.cpu_ms_per_event,
                self.cpu_ms_per_event
            ));
        }
        if self.outcome_bytes == 0 {
            return Err("outcome_bytes = 0 would refuse every outcome: use at least 65536".into());
        }
        Ok(())
    }
}
