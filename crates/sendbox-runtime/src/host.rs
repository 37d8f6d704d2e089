//! The per-event host state and the `host` interface a plugin imports:
//! its log lines (capped per line and per event, tagged with the plugin and
//! event ids) and its non-secret config values.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;
use wasmtime::component::ResourceTable;
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

use crate::instance::PluginInner;
use crate::limiter::MemoryLimiter;
use crate::{MAX_LOG_MESSAGE_BYTES, state, wit};
use sendbox_types::truncate_text;

/// Severity of a plugin log line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LogLevel {
    /// Trace.
    Trace,
    /// Debug.
    Debug,
    /// Info.
    Info,
    /// Warn.
    Warn,
    /// Error.
    Error,
}

/// Where a log line came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LogSource {
    /// The `host.log` import.
    Log,
    /// The guest's stdout.
    Stdout,
    /// The guest's stderr.
    Stderr,
}

/// One line a plugin logged while handling an event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LogLine {
    /// Severity.
    pub level: LogLevel,
    /// Where it came from.
    pub source: LogSource,
    /// The text.
    pub message: String,
}

/// The per-event store data: WASI's empty context, the limiter, and what
/// this call has logged and written.
pub(crate) struct HostState {
    pub(crate) wasi: WasiCtx,
    pub(crate) table: ResourceTable,
    pub(crate) limiter: MemoryLimiter,
    pub(crate) plugin: Arc<PluginInner>,
    pub(crate) overlay: state::Overlay,
    pub(crate) logs: Vec<LogLine>,
    pub(crate) log_bytes: u64,
    pub(crate) log_bytes_dropped: u64,
    /// Set when a state call failed or passed a cap; the call traps and
    /// reports it.
    pub(crate) state_error: Option<state::StateFailure>,
    /// When the event started, the origin of the plugin's monotonic clock.
    pub(crate) started: Instant,
    /// When its time budget ends; sleeps wake by then (see `clock`).
    pub(crate) deadline: Instant,
    /// A sleep was cut short at the deadline: the event timed out.
    pub(crate) slept_past_deadline: bool,
    /// Set by the epoch callback when it stopped the event: which limit,
    /// and the CPU time used by then.
    pub(crate) stopped: Option<(TimeLimit, Duration)>,
}

/// The time limit an event was stopped at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TimeLimit {
    /// `cpu_ms_per_event`.
    Cpu,
    /// `wall_ms_per_event`.
    Wall,
}

impl WasiView for HostState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

impl HostState {
    pub(crate) fn record_log(&mut self, level: LogLevel, source: LogSource, mut message: String) {
        let limit = self.plugin.settings.limits.log_bytes_per_event;
        if self.log_bytes >= limit {
            self.log_bytes_dropped += message.len() as u64;
            return;
        }
        self.log_bytes_dropped += truncate_text(&mut message, MAX_LOG_MESSAGE_BYTES) as u64;
        self.log_bytes += message.len() as u64;
        emit_log(&self.plugin.name, level, source, &message);
        self.logs.push(LogLine {
            level,
            source,
            message,
        });
    }

    pub(crate) fn state_failed(&mut self, e: state::StateFailure) -> wasmtime::Error {
        let msg = e.to_string();
        self.state_error = Some(e);
        wasmtime::format_err!("{msg}")
    }
}

fn emit_log(plugin: &str, level: LogLevel, source: LogSource, message: &str) {
    // The surrounding span carries plugin and event ids; `guest` marks the
    // line as the plugin's words, not the host's.
    let source = match source {
        LogSource::Log => "log",
        LogSource::Stdout => "stdout",
        LogSource::Stderr => "stderr",
    };
    match level {
        LogLevel::Trace => tracing::trace!(guest = plugin, source, "{message}"),
        LogLevel::Debug => tracing::debug!(guest = plugin, source, "{message}"),
        LogLevel::Info => tracing::info!(guest = plugin, source, "{message}"),
        LogLevel::Warn => tracing::warn!(guest = plugin, source, "{message}"),
        LogLevel::Error => tracing::error!(guest = plugin, source, "{message}"),
    }
}

impl wit::types::Host for HostState {}

impl wit::host::Host for HostState {
    fn log(&mut self, level: wit::host::Level, message: String) -> wasmtime::Result<()> {
        use wit::host::Level as L;
        let level = match level {
            L::Trace => LogLevel::Trace,
            L::Debug => LogLevel::Debug,
            L::Info => LogLevel::Info,
            L::Warn => LogLevel::Warn,
            L::Error => LogLevel::Error,
        };
        self.record_log(level, LogSource::Log, message);
        Ok(())
    }

    fn config(&mut self, key: String) -> wasmtime::Result<Option<String>> {
        Ok(self.plugin.settings.config.get(&key).cloned())
    }
}
