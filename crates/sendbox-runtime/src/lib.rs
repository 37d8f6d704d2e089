//! The sandbox: loads plugin components and runs one event at a time in a
//! fresh, limited instance.
//!
//! This crate owns wasmtime. It knows the WIT contract (`wit/sendbox.wit`),
//! plugin limits and the shape of a valid outcome. It must not know about
//! tokens, accounts, SMTP, the outbox's storage or the triggers: a plugin's
//! state is read through the [`StateStore`] trait and its changes are handed
//! back in the [`RunReport`] for the caller to commit.
//!
//! # Layout
//!
//! As wasmtime's own WASI crate splits a host:
//!
//! - `engine`: [`Runtime`], what is built once — the engine with its pooling
//!   allocator, the linker and the epoch ticker that enforces CPU time.
//! - `load`: [`Runtime::load`] — compiled code from `cache` or the
//!   compiler, the import allow-list, the world check, pre-instantiation;
//!   and [`Runtime::inspect`].
//! - `instance`: [`Plugin::run`] / [`Plugin::run_async`] — a fresh `Store`
//!   per event with its limits (`limiter`: memory and tables over all core
//!   instances), the call, and failures classified into [`RunFailure`]
//!   (`error`).
//! - `placement`: where the call runs — on the async worker awaiting it,
//!   moved off it when it runs past an epoch tick — and its CPU time.
//! - host interfaces, one file per WIT interface: `host` (log, config),
//!   [`state`] (the plugin's key-value store as the call sees it), `convert`
//!   (the `types` interface to and from [`event`]), `clock` (WASI sleeps
//!   bounded by the time limit), `output` (bounded stdout/stderr).
//! - [`validate`]: the contract check applied to every outcome.
//! - [`Limits`]: what an operator can set per plugin.
//!
//! # Example
//!
//! ```no_run
//! use std::sync::Arc;
//! use sendbox_runtime::{Runtime, RuntimeOptions, PluginSettings, MemoryState, Event};
//!
//! let runtime = Runtime::new(RuntimeOptions::default())?;
//! let plugin = runtime.load_file("file-alert", "file_alert.wasm".as_ref(), PluginSettings::default())?;
//! let event: Event = serde_json::from_str(r#"{"schedule": {"schedule": "daily", "scheduled_at_ms": 0}}"#)?;
//! let report = plugin.run(&event, "evt-1", Arc::new(MemoryState::new()))?;
//! println!("{} emails", report.outcome.emails.len());
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

#![deny(missing_docs)]

#[doc(hidden)]
pub mod baseline;
mod cache;
mod clock;
mod convert;
mod engine;
mod error;
mod host;
mod instance;
mod limiter;
mod limits;
mod load;
mod output;
mod placement;
pub mod state;
pub mod validate;

use std::time::Duration;

pub use cache::{CompileSource, content_hash};
pub use engine::{Runtime, RuntimeError, RuntimeOptions, engine_config};
pub use error::{LoadError, RunError, RunFailure};
pub use host::{LogLevel, LogLine, LogSource};
pub use instance::{Plugin, PluginSettings, RunReport, ScreenReport};
pub use limits::{Limits, MAX_MEMORY_BYTES};
pub use load::{InspectedItem, Inspection, Linked, RELAY_WORLD, WORLD};
/// The event and outcome types (re-exported from `sendbox-types`).
pub use sendbox_types as event;
pub use sendbox_types::{
    Attachment, Bytes, Email, Event, FileChange, FileEvent, HttpRequest, HttpResponse, Outcome,
    Submitted, Tick, Verdict,
};
pub use state::{MemoryState, ReadSet, StateChange, StateError, StateStore, Versioned};

mod bindings {
    wasmtime::component::bindgen!({
        path: "../../wit",
        world: "hook",
        imports: { default: trappable },
        exports: { default: async },
    });
}

/// The `relay-hook` world: `hook` plus `screen`. Its imports are `hook`'s,
/// so one linker serves both; only the `smtp` types are new.
mod relay_bindings {
    wasmtime::component::bindgen!({
        path: "../../wit",
        world: "relay-hook",
        imports: { default: trappable },
        exports: { default: async },
        with: {
            "sendbox:plugin/types": super::bindings::sendbox::plugin::types,
            "sendbox:plugin/host": super::bindings::sendbox::plugin::host,
            "sendbox:plugin/state": super::bindings::sendbox::plugin::state,
        },
    });
}

use bindings::sendbox::plugin as wit;

/// How often the epoch advances; the resolution of `cpu_ms_per_event`.
pub const EPOCH_TICK: Duration = Duration::from_millis(10);

/// Longest single log message kept, in bytes; longer ones are cut.
const MAX_LOG_MESSAGE_BYTES: usize = 4096;

/// Longest error message a plugin may return, in bytes; longer ones are cut
/// before they reach a log or an HTTP answer.
pub const MAX_ERROR_BYTES: usize = 4096;

/// Most random bytes one `wasi:random` call may ask the host for.
const MAX_RANDOM_BYTES: u64 = 1 << 20;

/// Most host resources (streams, pollables) one instance may hold at once.
const MAX_RESOURCES_PER_INSTANCE: usize = 256;

/// Most table elements an instance may hold, over all its tables.
const MAX_TABLE_ELEMENTS: u64 = 100_000;

/// Most core instances, memories and tables one plugin instance may create.
const MAX_CORE_INSTANCES: usize = 64;
const MAX_MEMORIES: usize = 16;
const MAX_TABLES: usize = 32;
