//! Typed errors for loading plugins and running events.

use std::path::PathBuf;

/// Why a plugin could not be loaded. Nothing was started for it.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The file could not be read.
    #[error("plugin `{plugin}`: cannot read {path}: {source}")]
    Read {
        /// The plugin's name.
        plugin: String,
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The bytes are not a WebAssembly component (a core module, a corrupt
    /// file, or a component for another engine).
    #[error("plugin `{plugin}`: not a valid WebAssembly component: {reason}")]
    NotAComponent {
        /// The plugin's name.
        plugin: String,
        /// What the compiler said.
        reason: String,
    },
    /// The component imports something the host does not offer.
    #[error(
        "plugin `{plugin}` imports `{import}`, which sendbox does not offer; plugins may import \
         only sendbox:plugin/host, sendbox:plugin/state, sendbox:plugin/smtp (types) and WASI 0.2 (rebuild it against wit/sendbox.wit)"
    )]
    UnsupportedImport {
        /// The plugin's name.
        plugin: String,
        /// The import's full name, e.g. `wasi:http/outgoing-handler@0.2.0`.
        import: String,
    },
    /// The component does not implement the `hook` world (missing or
    /// mistyped `handle` export, or mistyped imports).
    #[error("plugin `{plugin}` does not implement sendbox:plugin/hook@0.1.0: {reason}")]
    WrongWorld {
        /// The plugin's name.
        plugin: String,
        /// What did not match.
        reason: String,
    },
    /// The limits in the config cannot be honoured.
    #[error("plugin `{plugin}`: bad limits: {reason}")]
    BadLimits {
        /// The plugin's name.
        plugin: String,
        /// What is wrong and how to fix it.
        reason: String,
    },
    /// The config lacks a key the plugin's manifest says it requires.
    #[error(
        "plugin `{plugin}` requires config key `{key}` ({description}): set it under [plugins.{plugin}.config] (in a drop-in {plugin}.toml: under [config]), e.g. `{key} = \"...\"`"
    )]
    MissingConfig {
        /// The plugin's name.
        plugin: String,
        /// The key.
        key: String,
        /// What the plugin says the key means.
        description: String,
    },
    /// The component's self-description cannot be read.
    #[error("plugin `{plugin}`: {reason} (rebuild it with `sendbox plugin build`)")]
    BadManifest {
        /// The plugin's name.
        plugin: String,
        /// What is wrong.
        reason: String,
    },
    /// The compiled-artifact cache could not be used.
    #[error("plugin `{plugin}`: compiled-code cache at {path}: {source}")]
    Cache {
        /// The plugin's name.
        plugin: String,
        /// The cache file or folder.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
}

/// Why one event failed. Nothing of the call was kept: no email, no state
/// change.
#[derive(Debug, thiserror::Error)]
#[error("plugin `{plugin}` failed on event {event_id}: {cause}")]
pub struct RunError {
    /// The plugin's name.
    pub plugin: String,
    /// The event's id, as in the logs.
    pub event_id: String,
    /// What went wrong.
    pub cause: RunFailure,
    /// Log lines the plugin wrote before it failed (useful in dry runs).
    pub logs: Vec<crate::LogLine>,
}

/// The cause of a failed event.
#[derive(Debug, thiserror::Error)]
pub enum RunFailure {
    /// The plugin ran past its CPU time.
    #[error("ran longer than its CPU limit of {limit_ms} ms and was stopped")]
    Timeout {
        /// The limit.
        limit_ms: u64,
    },
    /// The event outlasted its wall-clock limit, computing or waiting.
    #[error(
        "took longer than its wall-clock limit of {limit_ms} ms and was stopped (it used {cpu_used_ms} ms of its CPU limit of {cpu_ms} ms: the host was too busy to run it)"
    )]
    WallTimeout {
        /// The wall-clock limit.
        limit_ms: u64,
        /// The CPU limit.
        cpu_ms: u64,
        /// CPU time the event had used when it was stopped.
        cpu_used_ms: u64,
    },
    /// The plugin tried to grow its memory past its limit.
    #[error("tried to grow its memory past its limit of {limit_bytes} bytes and was stopped")]
    MemoryLimit {
        /// The limit.
        limit_bytes: u64,
    },
    /// A limit on data the host accepts from the plugin was hit.
    #[error("exceeded limit `{limit}`: {detail}")]
    Limit {
        /// The limit's config name, e.g. `outcome_bytes`.
        limit: &'static str,
        /// What was seen.
        detail: String,
    },
    /// The plugin trapped (panic, stack overflow, bad memory access...).
    #[error("trapped: {message}")]
    Trap {
        /// The trap and, when known, the guest backtrace and panic message.
        message: String,
    },
    /// The plugin returned `err`.
    #[error("returned an error: {0}")]
    Plugin(String),
    /// The plugin returned an outcome that breaks the contract, e.g. a
    /// subject with a line break.
    #[error("returned an invalid outcome: {0}")]
    InvalidOutcome(String),
    /// The host could not set up the instance (e.g. the instance pool is
    /// exhausted) or read the plugin's state.
    #[error("host error: {0}")]
    Host(String),
}

impl RunFailure {
    /// A short stable label for metrics and logs: `timeout`, `memory`,
    /// `limit`, `trap`, `plugin_error`, `invalid_outcome`, `host`.
    pub fn kind(&self) -> &'static str {
        match self {
            RunFailure::Timeout { .. } | RunFailure::WallTimeout { .. } => "timeout",
            RunFailure::MemoryLimit { .. } => "memory",
            RunFailure::Limit { .. } => "limit",
            RunFailure::Trap { .. } => "trap",
            RunFailure::Plugin(_) => "plugin_error",
            RunFailure::InvalidOutcome(_) => "invalid_outcome",
            RunFailure::Host(_) => "host",
        }
    }
}
