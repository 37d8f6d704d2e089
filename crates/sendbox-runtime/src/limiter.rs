//! Memory and table limits of one instance, over all its core instances.

use crate::{MAX_CORE_INSTANCES, MAX_MEMORIES, MAX_TABLE_ELEMENTS, MAX_TABLES};

/// Refuses memory growth past the plugin's limit and remembers that it did,
/// so the resulting trap is reported as a memory limit, not a crash.
///
/// The limit covers all of an instance's linear memories together (a
/// component may hold several core instances, each with its own), and the
/// table limit all of its tables together.
pub(crate) struct MemoryLimiter {
    pub(crate) memory_bytes: u64,
    /// Bytes of every memory of this store so far.
    pub(crate) memory_used: u64,
    /// Elements of every table of this store so far.
    pub(crate) table_elements: u64,
    pub(crate) hit: bool,
}

impl MemoryLimiter {
    pub(crate) fn new(memory_bytes: u64) -> Self {
        MemoryLimiter {
            memory_bytes,
            memory_used: 0,
            table_elements: 0,
            hit: false,
        }
    }
}

/// Adds a growth from `current` to `desired` to `used` if the total stays
/// within `cap`; whether it did.
fn grow(used: &mut u64, current: usize, desired: usize, cap: u64) -> bool {
    let after = used.saturating_add(desired.saturating_sub(current) as u64);
    if after > cap {
        return false;
    }
    *used = after;
    true
}

impl wasmtime::ResourceLimiter for MemoryLimiter {
    fn memory_growing(
        &mut self,
        current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if !grow(&mut self.memory_used, current, desired, self.memory_bytes) {
            self.hit = true;
            return Err(wasmtime::format_err!(
                "memory limit of {} bytes reached",
                self.memory_bytes
            ));
        }
        Ok(true)
    }

    fn table_growing(
        &mut self,
        current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(grow(
            &mut self.table_elements,
            current,
            desired,
            MAX_TABLE_ELEMENTS,
        ))
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

#[cfg(test)]
mod limiter_tests {
    use super::*;
    use crate::{MAX_CORE_INSTANCES, MAX_MEMORIES};
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
