//! What is built once: the engine with its pooling allocator, the linker
//! (our imports, WASI with an empty context, bounded sleeps) and the epoch
//! ticker that enforces CPU time.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use wasmtime::Engine;
use wasmtime::component::{HasSelf, Linker};

use crate::host::HostState;
use crate::{EPOCH_TICK, MAX_MEMORY_BYTES, bindings, clock};

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
    pub(crate) engine: Engine,
    pub(crate) linker: Arc<Linker<HostState>>,
    pub(crate) cache_dir: Option<PathBuf>,
    /// Components loaded now, by content hash: plugins made from the same
    /// bytes (one component under several names and configs) share one
    /// copy of its code. Entries die with the last plugin holding them.
    pub(crate) loaded: Arc<
        std::sync::Mutex<
            std::collections::HashMap<String, std::sync::Weak<wasmtime::component::Component>>,
        >,
    >,
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
        // with memset, and batch the remaining decommits where there are
        // any: with PAGEMAP_SCAN an instance that touched less than
        // `KEEP_RESIDENT` leaves none, and a batch of such empty ranges
        // would still cost a `process_madvise` call every few events.
        .linear_memory_keep_resident(KEEP_RESIDENT)
        .table_keep_resident(KEEP_RESIDENT / 8)
        .pagemap_scan(wasmtime::Enabled::Auto)
        .decommit_batch_size(if kernel_has_pagemap_scan() { 1 } else { 8 })
        // A call runs on a fiber whose stack comes from the pool; one per
        // instance that can be alive.
        .total_stacks(n);
    let mut config = wasmtime::Config::new();
    config
        .allocation_strategy(wasmtime::InstanceAllocationStrategy::Pooling(pool))
        .epoch_interruption(true)
        .memory_init_cow(true);
    config
}

/// Whether memory can be reset page by page here (`PAGEMAP_SCAN`, Linux
/// 6.7 and later, on `/proc/self/pagemap`, which a container may hide);
/// wasmtime probes the ioctl itself and falls back to memset and `madvise`
/// without it. Read once, when the engine is built.
fn kernel_has_pagemap_scan() -> bool {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .is_ok_and(|release| linux_release_at_least(&release, (6, 7)))
        && std::fs::File::open("/proc/self/pagemap").is_ok()
}

/// Whether a kernel release such as `6.18.0-1-amd64` is at least
/// `major.minor`; `false` for anything that does not read as one.
fn linux_release_at_least(release: &str, at_least: (u32, u32)) -> bool {
    let mut numbers = release
        .trim()
        .split(|c: char| !c.is_ascii_digit())
        .map(str::parse::<u32>);
    match (numbers.next(), numbers.next()) {
        (Some(Ok(major)), Some(Ok(minor))) => (major, minor) >= at_least,
        _ => false,
    }
}

impl Runtime {
    /// Builds the engine, the linker (our imports plus WASI 0.2 with an empty
    /// context) and starts the epoch ticker.
    pub fn new(options: RuntimeOptions) -> Result<Self, RuntimeError> {
        let config = engine_config(options.max_concurrent_instances);
        let engine = Engine::new(&config).map_err(|e| RuntimeError(format!("{e:#}")))?;
        let mut linker = Linker::<HostState>::new(&engine);
        wasmtime_wasi::p2::add_to_linker_async(&mut linker)
            .map_err(|e| RuntimeError(format!("{e:#}")))?;
        bindings::Hook::add_to_linker::<_, HasSelf<_>>(&mut linker, |s| s)
            .map_err(|e| RuntimeError(format!("{e:#}")))?;
        // `relay-hook` plugins import the `smtp` interface for its types
        // only: an instance with no functions.
        linker
            .instance("sendbox:plugin/smtp@0.1.0")
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
            loaded: Arc::default(),
            _ticker: Arc::new(TickerGuard { stop }),
        })
    }

    /// The wasmtime engine (for benchmarks and tools).
    pub fn engine(&self) -> &Engine {
        &self.engine
    }
}

#[cfg(test)]
mod tests {
    use super::linux_release_at_least;

    #[test]
    fn a_kernel_release_is_compared_by_major_and_minor() {
        assert!(linux_release_at_least("6.18.0-1-amd64\n", (6, 7)));
        assert!(linux_release_at_least("6.7", (6, 7)));
        assert!(linux_release_at_least("7.0.0", (6, 7)));
        assert!(!linux_release_at_least("6.1.0-28-cloud-amd64", (6, 7)));
        assert!(!linux_release_at_least("5.15.0", (6, 7)));
        assert!(!linux_release_at_least("6", (6, 7)));
        assert!(!linux_release_at_least("", (6, 7)));
        assert!(!linux_release_at_least("Darwin", (6, 7)));
    }
}
