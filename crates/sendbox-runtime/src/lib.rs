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
//! - [`Runtime`]: what is built once — the engine with its pooling allocator,
//!   the epoch ticker that enforces CPU time, the linker and the compiled-code
//!   cache. [`Runtime::load`] checks a component's imports and world and
//!   returns a [`Plugin`].
//! - [`Plugin`]: a pre-instantiated component plus its name, config and
//!   [`Limits`]. [`Plugin::run`] makes a fresh `Store` per event.
//! - [`event`]: the host-side mirror of the WIT types, with a JSON form
//!   (the `sendbox-types` crate).
//! - [`state`]: the read view of plugin state and the changes a call makes.
//! - [`validate`]: the contract check applied to every outcome.
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

mod cache;
mod clock;
mod error;
mod limits;
mod output;
pub mod state;
pub mod validate;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde::Serialize;
use wasmtime::component::{Component, HasSelf, Linker, ResourceTable};
use wasmtime::{Engine, Store, Trap};
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

pub use cache::{CompileSource, content_hash};
pub use error::{LoadError, RunError, RunFailure};
pub use limits::{Limits, MAX_MEMORY_BYTES};
/// The event and outcome types (re-exported from `sendbox-types`).
pub use sendbox_types as event;
use sendbox_types::truncate_text;
pub use sendbox_types::{
    Attachment, Bytes, Email, Event, FileChange, FileEvent, HttpRequest, HttpResponse, Outcome,
    Tick,
};
pub use state::{MemoryState, ReadSet, StateChange, StateError, StateStore, Versioned};

mod bindings {
    wasmtime::component::bindgen!({
        path: "../../wit",
        world: "hook",
        imports: { default: trappable },
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

/// Settings for the shared [`Runtime`].
#[derive(Debug, Clone)]
pub struct RuntimeOptions {
    /// Where compiled artifacts are kept. `None` compiles on every load.
    /// Default: none.
    pub cache_dir: Option<PathBuf>,
    /// Most plugin instances alive at once across all plugins; sizes the
    /// pooling allocator. Default 64.
    pub max_concurrent_instances: u32,
}

impl Default for RuntimeOptions {
    fn default() -> Self {
        RuntimeOptions {
            cache_dir: None,
            max_concurrent_instances: 64,
        }
    }
}

/// Why the runtime itself could not start.
#[derive(Debug, thiserror::Error)]
#[error("cannot start the plugin runtime: {0}")]
pub struct RuntimeError(String);

/// Stops the epoch ticker thread when the last [`Runtime`] clone is dropped.
struct TickerGuard {
    stop: Arc<AtomicBool>,
}

impl Drop for TickerGuard {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// What is built once and shared by every plugin: engine, linker, cache.
///
/// Cheap to clone.
#[derive(Clone)]
pub struct Runtime {
    engine: Engine,
    linker: Arc<Linker<HostState>>,
    cache_dir: Option<PathBuf>,
    _ticker: Arc<TickerGuard>,
}

impl std::fmt::Debug for Runtime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Runtime")
            .field("cache_dir", &self.cache_dir)
            .finish_non_exhaustive()
    }
}

/// Bytes of each instance's linear memory reset in place (not decommitted)
/// when the instance ends.
const KEEP_RESIDENT: usize = 512 << 10;

/// The engine configuration shared by [`Runtime`] and the benchmarks' bare
/// baseline, so both measure the same compiled code.
pub fn engine_config(max_concurrent_instances: u32) -> wasmtime::Config {
    let mut pool = wasmtime::PoolingAllocationConfig::new();
    let n = max_concurrent_instances.max(1);
    pool.total_component_instances(n)
        // Interpreters built with componentize-py/js hold many core instances.
        .total_core_instances(n.saturating_mul(40))
        .max_core_instances_per_component(64)
        .total_memories(n.saturating_mul(4))
        .max_memories_per_component(16)
        .total_tables(n.saturating_mul(8))
        .max_tables_per_component(32)
        .max_memory_size(MAX_MEMORY_BYTES as usize)
        // Every event ends an instance. Resetting its memory with `madvise`
        // shoots down TLB entries on every core (IPIs), which dominated
        // profiles under load; instead reset the pages actually touched
        // (PAGEMAP_SCAN, Linux 6.7+) or the first `KEEP_RESIDENT` bytes
        // with memset, and batch the remaining decommits.
        .linear_memory_keep_resident(KEEP_RESIDENT)
        .table_keep_resident(KEEP_RESIDENT / 8)
        .pagemap_scan(wasmtime::Enabled::Auto)
        .decommit_batch_size(8);
    let mut config = wasmtime::Config::new();
    config
        .allocation_strategy(wasmtime::InstanceAllocationStrategy::Pooling(pool))
        .epoch_interruption(true)
        .memory_init_cow(true);
    config
}

impl Runtime {
    /// Builds the engine, the linker (our imports plus WASI 0.2 with an empty
    /// context) and starts the epoch ticker.
    pub fn new(options: RuntimeOptions) -> Result<Self, RuntimeError> {
        let config = engine_config(options.max_concurrent_instances);
        let engine = Engine::new(&config).map_err(|e| RuntimeError(format!("{e:#}")))?;
        let mut linker = Linker::<HostState>::new(&engine);
        wasmtime_wasi::p2::add_to_linker_sync(&mut linker)
            .map_err(|e| RuntimeError(format!("{e:#}")))?;
        bindings::Hook::add_to_linker::<_, HasSelf<_>>(&mut linker, |s| s)
            .map_err(|e| RuntimeError(format!("{e:#}")))?;
        clock::bound_sleeps(&mut linker).map_err(|e| RuntimeError(format!("{e:#}")))?;

        let stop = Arc::new(AtomicBool::new(false));
        let weak = engine.weak();
        let stop_flag = stop.clone();
        std::thread::Builder::new()
            .name("sendbox-epoch".into())
            .spawn(move || {
                while !stop_flag.load(Ordering::Relaxed) {
                    std::thread::sleep(EPOCH_TICK);
                    match weak.upgrade() {
                        Some(engine) => engine.increment_epoch(),
                        None => break,
                    }
                }
            })
            .map_err(|e| RuntimeError(format!("epoch thread: {e}")))?;

        Ok(Runtime {
            engine,
            linker: Arc::new(linker),
            cache_dir: options.cache_dir,
            _ticker: Arc::new(TickerGuard { stop }),
        })
    }

    /// The wasmtime engine (for benchmarks and tools).
    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// Reads and loads a component file. See [`Runtime::load`].
    pub fn load_file(
        &self,
        name: &str,
        path: &Path,
        settings: PluginSettings,
    ) -> Result<Plugin, LoadError> {
        let bytes = std::fs::read(path).map_err(|source| LoadError::Read {
            plugin: name.to_owned(),
            path: path.to_owned(),
            source,
        })?;
        self.load(name, &bytes, settings)
    }

    /// Compiles (or loads from cache) a component, checks that every import
    /// is one we offer and that it implements the `hook` world, and
    /// pre-instantiates it.
    pub fn load(
        &self,
        name: &str,
        bytes: &[u8],
        settings: PluginSettings,
    ) -> Result<Plugin, LoadError> {
        settings
            .limits
            .validate()
            .map_err(|reason| LoadError::BadLimits {
                plugin: name.to_owned(),
                reason,
            })?;
        let started = Instant::now();
        let hash = content_hash(bytes);
        let (component, source) = self.compile(name, bytes, &hash)?;
        let plugin = self.prepare(name, &component, hash, source, settings)?;
        tracing::debug!(plugin = name, ?source, hash = %plugin.inner.hash, elapsed_ms = started.elapsed().as_millis() as u64, "plugin loaded");
        Ok(plugin)
    }

    /// Checks a compiled component's imports and world, and
    /// pre-instantiates it.
    fn prepare(
        &self,
        name: &str,
        component: &Component,
        hash: String,
        source: CompileSource,
        settings: PluginSettings,
    ) -> Result<Plugin, LoadError> {
        check_imports(&self.engine, name, component)?;
        let pre = self
            .linker
            .instantiate_pre(component)
            .map_err(|e| LoadError::WrongWorld {
                plugin: name.to_owned(),
                reason: format!("{e:#}"),
            })?;
        let pre = bindings::HookPre::new(pre).map_err(|e| LoadError::WrongWorld {
            plugin: name.to_owned(),
            reason: format!("{e:#}"),
        })?;
        Ok(Plugin {
            inner: Arc::new(PluginInner {
                name: name.to_owned(),
                hash,
                source,
                pre,
                engine: self.engine.clone(),
                settings,
            }),
        })
    }
}

impl Runtime {
    /// Loads compiled code from the cache or compiles it.
    fn compile(
        &self,
        name: &str,
        bytes: &[u8],
        hash: &str,
    ) -> Result<(Component, CompileSource), LoadError> {
        cache::load(&self.engine, self.cache_dir.as_deref(), bytes, hash).map_err(|e| match e {
            cache::CacheError::Compile(e) => LoadError::NotAComponent {
                plugin: name.to_owned(),
                reason: format!("{e:#}"),
            },
            cache::CacheError::Io(path, source) => LoadError::Cache {
                plugin: name.to_owned(),
                path,
                source,
            },
        })
    }
}

/// WASI 0.2 interfaces a plugin may import. They are linked with an empty
/// context: no env, args, preopened directories, sockets or stdin; clocks
/// and randomness work; stdout and stderr go to bounded buffers.
const OFFERED_WASI: &[&str] = &[
    "wasi:cli/environment",
    "wasi:cli/exit",
    "wasi:cli/stdin",
    "wasi:cli/stdout",
    "wasi:cli/stderr",
    "wasi:cli/terminal-input",
    "wasi:cli/terminal-output",
    "wasi:cli/terminal-stdin",
    "wasi:cli/terminal-stdout",
    "wasi:cli/terminal-stderr",
    "wasi:clocks/monotonic-clock",
    "wasi:clocks/wall-clock",
    "wasi:filesystem/types",
    "wasi:filesystem/preopens",
    "wasi:io/error",
    "wasi:io/poll",
    "wasi:io/streams",
    "wasi:random/random",
    "wasi:random/insecure",
    "wasi:random/insecure-seed",
];

/// Our own interfaces.
const OFFERED_SENDBOX: &[&str] = &[
    "sendbox:plugin/types",
    "sendbox:plugin/host",
    "sendbox:plugin/state",
];

fn is_offered(import: &str) -> bool {
    let (iface, version) = import.split_once('@').unwrap_or((import, ""));
    if OFFERED_SENDBOX.contains(&iface) {
        return version.starts_with("0.1.");
    }
    OFFERED_WASI.contains(&iface) && version.starts_with("0.2.")
}

fn check_imports(engine: &Engine, plugin: &str, component: &Component) -> Result<(), LoadError> {
    for (import, _) in component.component_type().imports(engine) {
        if !is_offered(import) {
            return Err(LoadError::UnsupportedImport {
                plugin: plugin.to_owned(),
                import: import.to_owned(),
            });
        }
    }
    Ok(())
}

/// What a component imports and exports, for `sendbox plugin inspect`.
#[derive(Debug, Clone, Serialize)]
pub struct Inspection {
    /// The world it was checked against.
    pub world: &'static str,
    /// Whether it implements that world with only offered imports.
    pub implements_world: bool,
    /// Why not, when it does not.
    pub problem: Option<String>,
    /// Every import, with whether the host offers it.
    pub imports: Vec<InspectedItem>,
    /// Every export.
    pub exports: Vec<String>,
    /// SHA-256 of the bytes.
    pub sha256: String,
}

/// One import of an inspected component.
#[derive(Debug, Clone, Serialize)]
pub struct InspectedItem {
    /// Full name, e.g. `wasi:cli/stdout@0.2.6`.
    pub name: String,
    /// Whether sendbox offers it.
    pub offered: bool,
}

/// The world plugins implement.
pub const WORLD: &str = "sendbox:plugin/hook@0.1.0";

impl Runtime {
    /// Describes a component without running it.
    pub fn inspect(&self, name: &str, bytes: &[u8]) -> Result<Inspection, LoadError> {
        let hash = content_hash(bytes);
        let (component, source) = self.compile(name, bytes, &hash)?;
        let ty = component.component_type();
        let imports = ty
            .imports(&self.engine)
            .map(|(name, _)| InspectedItem {
                name: name.to_owned(),
                offered: is_offered(name),
            })
            .collect();
        let exports = ty
            .exports(&self.engine)
            .map(|(n, _)| n.to_owned())
            .collect();
        // The same compiled component: inspecting never compiles twice.
        let problem = self
            .prepare(
                name,
                &component,
                hash.clone(),
                source,
                PluginSettings::default(),
            )
            .err()
            .map(|e| e.to_string());
        Ok(Inspection {
            world: WORLD,
            implements_world: problem.is_none(),
            problem,
            imports,
            exports,
            sha256: hash,
        })
    }
}

/// The operator's settings for one plugin.
#[derive(Debug, Clone, Default)]
pub struct PluginSettings {
    /// Values the plugin reads with `host.config(key)`. Never secrets.
    pub config: BTreeMap<String, String>,
    /// Resource limits.
    pub limits: Limits,
}

struct PluginInner {
    name: String,
    hash: String,
    source: CompileSource,
    pre: bindings::HookPre<HostState>,
    engine: Engine,
    settings: PluginSettings,
}

/// A loaded plugin, ready to run events. Cheap to clone; clones share the
/// compiled code.
#[derive(Clone)]
pub struct Plugin {
    inner: Arc<PluginInner>,
}

impl std::fmt::Debug for Plugin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Plugin")
            .field("name", &self.inner.name)
            .field("sha256", &self.inner.hash)
            .finish_non_exhaustive()
    }
}

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

/// The result of a successful call.
#[derive(Debug, Clone, Serialize)]
pub struct RunReport {
    /// What the plugin returned, already validated.
    pub outcome: Outcome,
    /// State writes to commit together with the outcome.
    pub state_changes: Vec<StateChange>,
    /// What the call read from committed state; the commit must check that
    /// none of it changed meanwhile, or run the event again.
    pub reads: ReadSet,
    /// What the plugin logged.
    pub logs: Vec<LogLine>,
    /// Log bytes dropped because of `log_bytes_per_event`.
    pub log_bytes_dropped: u64,
    /// Wall time of instantiate + handle, in microseconds.
    pub duration_us: u64,
}

/// The per-event store data: WASI's empty context, the limiter, and what
/// this call has logged and written.
struct HostState {
    wasi: WasiCtx,
    table: ResourceTable,
    limiter: MemoryLimiter,
    plugin: Arc<PluginInner>,
    overlay: state::Overlay,
    logs: Vec<LogLine>,
    log_bytes: u64,
    log_bytes_dropped: u64,
    /// Set when a state call failed or passed a cap; the call traps and
    /// reports it.
    state_error: Option<state::StateFailure>,
    /// When the event started, the origin of the plugin's monotonic clock.
    started: Instant,
    /// When its time budget ends; sleeps wake by then (see `clock`).
    deadline: Instant,
    /// A sleep was cut short at the deadline: the event timed out.
    slept_past_deadline: bool,
}

impl WasiView for HostState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

/// Refuses memory growth past the plugin's limit and remembers that it did,
/// so the resulting trap is reported as a memory limit, not a crash.
///
/// The limit covers all of an instance's linear memories together (a
/// component may hold several core instances, each with its own), and the
/// table limit all of its tables together.
struct MemoryLimiter {
    memory_bytes: u64,
    /// Bytes of every memory of this store so far.
    memory_used: u64,
    /// Elements of every table of this store so far.
    table_elements: u64,
    hit: bool,
}

impl MemoryLimiter {
    fn new(memory_bytes: u64) -> Self {
        MemoryLimiter {
            memory_bytes,
            memory_used: 0,
            table_elements: 0,
            hit: false,
        }
    }
}

/// Most table elements an instance may hold, over all its tables.
const MAX_TABLE_ELEMENTS: u64 = 100_000;

/// Most core instances, memories and tables one plugin instance may create.
const MAX_CORE_INSTANCES: usize = 64;
const MAX_MEMORIES: usize = 16;
const MAX_TABLES: usize = 32;

impl wasmtime::ResourceLimiter for MemoryLimiter {
    fn memory_growing(
        &mut self,
        current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        let after = self
            .memory_used
            .saturating_add(desired.saturating_sub(current) as u64);
        if after > self.memory_bytes {
            self.hit = true;
            return Err(wasmtime::format_err!(
                "memory limit of {} bytes reached",
                self.memory_bytes
            ));
        }
        self.memory_used = after;
        Ok(true)
    }

    fn table_growing(
        &mut self,
        current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        let after = self
            .table_elements
            .saturating_add(desired.saturating_sub(current) as u64);
        if after > MAX_TABLE_ELEMENTS {
            return Ok(false);
        }
        self.table_elements = after;
        Ok(true)
    }

    fn instances(&self) -> usize {
        MAX_CORE_INSTANCES
    }

    fn memories(&self) -> usize {
        MAX_MEMORIES
    }

    fn tables(&self) -> usize {
        MAX_TABLES
    }
}

impl HostState {
    fn record_log(&mut self, level: LogLevel, source: LogSource, mut message: String) {
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

    fn state_failed(&mut self, e: state::StateFailure) -> wasmtime::Error {
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

impl wit::state::Host for HostState {
    fn get(&mut self, key: String) -> wasmtime::Result<Option<Vec<u8>>> {
        let got = self.overlay.get(&key);
        got.map_err(|e| self.state_failed(e))
    }

    fn set(&mut self, key: String, value: Vec<u8>) -> wasmtime::Result<Result<(), String>> {
        self.overlay
            .set(key, value)
            .map_err(|e| self.state_failed(e))
    }

    fn delete(&mut self, key: String) -> wasmtime::Result<()> {
        self.overlay.delete(key).map_err(|e| self.state_failed(e))
    }

    fn keys(&mut self, prefix: String) -> wasmtime::Result<Vec<String>> {
        let listed = self.overlay.keys(&prefix);
        listed.map_err(|e| self.state_failed(e))
    }
}

impl Plugin {
    /// The plugin's name from the config.
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// SHA-256 of the component.
    pub fn sha256(&self) -> &str {
        &self.inner.hash
    }

    /// Whether the compiled code came from the cache.
    pub fn compile_source(&self) -> CompileSource {
        self.inner.source
    }

    /// The plugin's settings.
    pub fn settings(&self) -> &PluginSettings {
        &self.inner.settings
    }

    /// Runs one event in a fresh instance.
    ///
    /// Blocks the calling thread for at most about `cpu_ms_per_event`; call
    /// it from a blocking-capable thread (e.g. `tokio::task::spawn_blocking`).
    /// On success the outcome is validated and the state changes are
    /// returned, not applied. On failure nothing of the call is kept.
    pub fn run(
        &self,
        event: &Event,
        event_id: &str,
        state: Arc<dyn StateStore>,
    ) -> Result<RunReport, RunError> {
        let span = tracing::info_span!("plugin_run", plugin = %self.inner.name, event_id, trigger = event.kind());
        let _enter = span.enter();
        let started = Instant::now();
        let limits = &self.inner.settings.limits;
        let fail = |cause: RunFailure, logs: Vec<LogLine>| RunError {
            plugin: self.inner.name.clone(),
            event_id: event_id.to_owned(),
            cause,
            logs,
        };

        let stdout = output::BoundedPipe::new(limits.log_bytes_per_event as usize);
        let stderr = output::BoundedPipe::new(limits.log_bytes_per_event as usize);
        // An empty context: no env, args, preopens, stdin or network.
        let wasi = WasiCtx::builder()
            .monotonic_clock(clock::EventClock::new(started))
            .stdout(stdout.clone())
            .stderr(stderr.clone())
            .allow_tcp(false)
            .allow_udp(false)
            .allow_ip_name_lookup(false)
            .max_random_size(MAX_RANDOM_BYTES)
            .build();
        let mut table = ResourceTable::new();
        table.set_max_capacity(MAX_RESOURCES_PER_INSTANCE);
        let mut store = Store::new(
            &self.inner.engine,
            HostState {
                wasi,
                table,
                limiter: MemoryLimiter::new(limits.memory_bytes),
                plugin: self.inner.clone(),
                overlay: state::Overlay::new(state, self.inner.name.clone(), limits.state_bytes),
                logs: Vec::new(),
                log_bytes: 0,
                log_bytes_dropped: 0,
                state_error: None,
                started,
                deadline: started + Duration::from_millis(limits.cpu_ms_per_event),
                slept_past_deadline: false,
            },
        );
        store.limiter(|s| &mut s.limiter);
        store.set_epoch_deadline(
            limits
                .cpu_ms_per_event
                .div_ceil(EPOCH_TICK.as_millis() as u64),
        );
        store.epoch_deadline_trap();
        store.set_hostcall_fuel(usize::try_from(limits.outcome_bytes).unwrap_or(usize::MAX));

        let mut instantiating = true;
        let result = self.inner.pre.instantiate(&mut store).and_then(|hook| {
            instantiating = false;
            hook.call_handle(&mut store, &to_wit_event(event))
        });

        // Collect what the guest printed, whatever the result.
        for (pipe, source, level) in [
            (&stdout, LogSource::Stdout, LogLevel::Info),
            (&stderr, LogSource::Stderr, LogLevel::Warn),
        ] {
            let (bytes, dropped) = pipe.take();
            let data = store.data_mut();
            data.log_bytes_dropped += dropped;
            for line in String::from_utf8_lossy(&bytes).lines() {
                if !line.trim().is_empty() {
                    data.record_log(level, source, line.to_owned());
                }
            }
        }

        let outcome = match result {
            Ok(_) if store.data().slept_past_deadline => {
                let logs = std::mem::take(&mut store.data_mut().logs);
                let cause = RunFailure::Timeout {
                    limit_ms: limits.cpu_ms_per_event,
                };
                tracing::warn!(kind = cause.kind(), error = %cause, "plugin slept past its time limit");
                return Err(fail(cause, logs));
            }
            Ok(Ok(outcome)) => from_wit_outcome(outcome),
            Ok(Err(mut message)) => {
                truncate_text(&mut message, MAX_ERROR_BYTES);
                let logs = std::mem::take(&mut store.data_mut().logs);
                tracing::warn!(error = %message, "plugin returned an error");
                return Err(fail(RunFailure::Plugin(message), logs));
            }
            Err(e) => {
                let cause = classify(&e, instantiating, &mut store, limits);
                let logs = std::mem::take(&mut store.data_mut().logs);
                tracing::warn!(kind = cause.kind(), error = %cause, "plugin run failed");
                return Err(fail(cause, logs));
            }
        };
        if let Err(cause) = validate::outcome(&outcome, limits) {
            let logs = std::mem::take(&mut store.data_mut().logs);
            tracing::warn!(kind = cause.kind(), error = %cause, "plugin outcome refused");
            return Err(fail(cause, logs));
        }
        let data = store.into_data();
        let duration_us = started.elapsed().as_micros() as u64;
        tracing::debug!(emails = outcome.emails.len(), duration_us, "plugin run ok");
        let (state_changes, reads) = data.overlay.finish();
        Ok(RunReport {
            outcome,
            state_changes,
            reads,
            logs: data.logs,
            log_bytes_dropped: data.log_bytes_dropped,
            duration_us,
        })
    }
}

/// Turns a wasmtime error into the reason an operator can act on.
fn classify(
    e: &wasmtime::Error,
    instantiating: bool,
    store: &mut Store<HostState>,
    limits: &Limits,
) -> RunFailure {
    let data = store.data_mut();
    if data.limiter.hit {
        return RunFailure::MemoryLimit {
            limit_bytes: limits.memory_bytes,
        };
    }
    match data.state_error.take() {
        Some(state::StateFailure::Limit { limit, detail }) => {
            return RunFailure::Limit { limit, detail };
        }
        Some(err @ state::StateFailure::Store(_)) => return RunFailure::Host(err.to_string()),
        None => {}
    }
    // The causes' text only: `{:?}` would also print (and so resolve) a
    // native backtrace when RUST_BACKTRACE is set, which maps the whole
    // binary's debug info: hundreds of MB per failed event.
    let text = format!("{e:#}");
    if e.downcast_ref::<Trap>() == Some(&Trap::Interrupt) {
        return RunFailure::Timeout {
            limit_ms: limits.cpu_ms_per_event,
        };
    }
    if text.contains("fuel allocated for hostcalls has been exhausted") {
        return RunFailure::Limit {
            limit: "outcome_bytes",
            detail: format!(
                "the plugin tried to hand the host more than {} bytes in one call",
                limits.outcome_bytes
            ),
        };
    }
    if text.contains("resource table has no free capacity") {
        return RunFailure::Limit {
            limit: "resources",
            detail: format!("more than {MAX_RESOURCES_PER_INSTANCE} open host resources"),
        };
    }
    if text.contains("requested len") && text.contains("exceeds limit") {
        return RunFailure::Limit {
            limit: "random_bytes",
            detail: format!("asked wasi:random for more than {MAX_RANDOM_BYTES} bytes at once"),
        };
    }
    if instantiating && e.downcast_ref::<Trap>().is_none() {
        return RunFailure::Host(format!("cannot create an instance: {e:#}"));
    }
    // A panic prints "thread .. panicked at FILE:LINE:COL:" and then its
    // message on stderr before trapping: quote both.
    let stderr: Vec<&str> = data
        .logs
        .iter()
        .filter(|l| l.source == LogSource::Stderr)
        .map(|l| l.message.as_str())
        .collect();
    let panic = stderr
        .iter()
        .rposition(|l| l.contains("panicked at"))
        .map(|i| {
            let end = (i + 3).min(stderr.len());
            stderr[i..end]
                .iter()
                .filter(|l| !l.starts_with("note: run with `RUST_BACKTRACE"))
                .copied()
                .collect::<Vec<_>>()
                .join(" ")
        });
    let mut message = match e.downcast_ref::<Trap>() {
        Some(trap) => trap.to_string(),
        None => format!("{e:#}"),
    };
    if let Some(p) = panic {
        message = format!("{message} ({p})");
    }
    RunFailure::Trap { message }
}

fn to_wit_event(e: &Event) -> wit::types::Event {
    use wit::types as t;
    match e {
        Event::File(f) => t::Event::File(t::FileEvent {
            watch: f.watch.clone(),
            path: f.path.clone(),
            change: match f.change {
                FileChange::Created => t::FileChange::Created,
                FileChange::Modified => t::FileChange::Modified,
                FileChange::Removed => t::FileChange::Removed,
            },
            size: f.size,
            contents: f.contents.as_ref().map(|b| b.0.clone()),
        }),
        Event::Webhook(r) => t::Event::Webhook(t::HttpRequest {
            method: r.method.clone(),
            path: r.path.clone(),
            query: r.query.clone(),
            headers: r.headers.clone(),
            body: r.body.0.clone(),
        }),
        Event::Schedule(s) => t::Event::Schedule(t::Tick {
            schedule: s.schedule.clone(),
            scheduled_at_ms: s.scheduled_at_ms,
        }),
    }
}

fn from_wit_outcome(o: wit::types::Outcome) -> Outcome {
    Outcome {
        emails: o
            .emails
            .into_iter()
            .map(|e| Email {
                to: e.to,
                cc: e.cc,
                bcc: e.bcc,
                sender: e.sender,
                reply_to: e.reply_to,
                subject: e.subject,
                text: e.text,
                html: e.html,
                attachments: e
                    .attachments
                    .into_iter()
                    .map(|a| Attachment {
                        filename: a.filename,
                        content_type: a.content_type,
                        data: Bytes(a.data),
                    })
                    .collect(),
                headers: e.headers,
                idempotency_key: e.idempotency_key,
            })
            .collect(),
        response: o.response.map(|r| HttpResponse {
            status: r.status,
            headers: r.headers,
            body: Bytes(r.body),
        }),
    }
}

/// The benchmarks' baseline: the least a wasmtime embedder must do to run a
/// plugin's `handle` once — a store with a default WASI context and no-op
/// imports, instantiate from a pre-instantiated handle, call. No limits, no
/// log capture, no state overlay, no validation. Not for production use.
#[doc(hidden)]
pub mod baseline {
    use super::*;

    /// Store data for the baseline.
    pub struct Bare {
        wasi: WasiCtx,
        table: ResourceTable,
        config: Arc<BTreeMap<String, String>>,
    }

    impl WasiView for Bare {
        fn ctx(&mut self) -> WasiCtxView<'_> {
            WasiCtxView {
                ctx: &mut self.wasi,
                table: &mut self.table,
            }
        }
    }

    impl wit::types::Host for Bare {}
    impl wit::host::Host for Bare {
        fn log(&mut self, _: wit::host::Level, _: String) -> wasmtime::Result<()> {
            Ok(())
        }
        fn config(&mut self, key: String) -> wasmtime::Result<Option<String>> {
            Ok(self.config.get(&key).cloned())
        }
    }
    impl wit::state::Host for Bare {
        fn get(&mut self, _: String) -> wasmtime::Result<Option<Vec<u8>>> {
            Ok(None)
        }
        fn set(&mut self, _: String, _: Vec<u8>) -> wasmtime::Result<Result<(), String>> {
            Ok(Ok(()))
        }
        fn delete(&mut self, _: String) -> wasmtime::Result<()> {
            Ok(())
        }
        fn keys(&mut self, _: String) -> wasmtime::Result<Vec<String>> {
            Ok(Vec::new())
        }
    }

    /// A pre-instantiated component on a plain linker.
    pub struct BareHook {
        engine: Engine,
        pre: bindings::HookPre<Bare>,
        config: Arc<BTreeMap<String, String>>,
    }

    impl BareHook {
        /// Compiles `bytes` on `engine` and pre-instantiates it; `config`
        /// answers the plugin's `config` calls.
        pub fn new(
            engine: &Engine,
            bytes: &[u8],
            config: BTreeMap<String, String>,
        ) -> wasmtime::Result<Self> {
            let component = Component::new(engine, bytes)?;
            let mut linker = Linker::<Bare>::new(engine);
            wasmtime_wasi::p2::add_to_linker_sync(&mut linker)?;
            bindings::Hook::add_to_linker::<_, HasSelf<_>>(&mut linker, |s| s)?;
            let pre = bindings::HookPre::new(linker.instantiate_pre(&component)?)?;
            Ok(BareHook {
                engine: engine.clone(),
                pre,
                config: Arc::new(config),
            })
        }

        /// One fresh instance and one `handle` call; returns the number of
        /// emails so the work cannot be optimised away.
        pub fn call(&self, event: &Event) -> wasmtime::Result<usize> {
            let mut store = Store::new(
                &self.engine,
                Bare {
                    wasi: WasiCtx::builder().build(),
                    table: ResourceTable::new(),
                    config: self.config.clone(),
                },
            );
            // The engine has epoch interruption on; a bare embedder must
            // still give the store a deadline.
            store.set_epoch_deadline(u64::MAX / 2);
            let hook = self.pre.instantiate(&mut store)?;
            let out = hook.call_handle(&mut store, &to_wit_event(event))?;
            Ok(out.map(|o| o.emails.len()).unwrap_or(0))
        }
    }
}

#[cfg(test)]
mod limiter_tests {
    use super::*;
    use wasmtime::ResourceLimiter;

    #[test]
    fn the_memory_limit_covers_every_memory_together() {
        let mut l = MemoryLimiter::new(64 << 20);
        // Two core memories of 40 MiB each: the second passes the limit.
        assert!(l.memory_growing(0, 40 << 20, None).unwrap());
        assert!(l.memory_growing(0, 40 << 20, None).is_err());
        assert!(l.hit);
        // Growing the first by 20 MiB still fits.
        assert!(l.memory_growing(40 << 20, 60 << 20, None).unwrap());
        assert!(l.memory_growing(60 << 20, (64 << 20) + 1, None).is_err());
    }

    #[test]
    fn table_elements_are_counted_over_all_tables() {
        let mut l = MemoryLimiter::new(1 << 20);
        assert!(l.table_growing(0, 60_000, None).unwrap());
        assert!(!l.table_growing(0, 60_000, None).unwrap());
        assert_eq!(l.memories(), MAX_MEMORIES);
        assert_eq!(l.instances(), MAX_CORE_INSTANCES);
    }
}
