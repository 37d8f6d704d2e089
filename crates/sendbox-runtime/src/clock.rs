//! Sleeping inside a plugin is bounded by its time budget.
//!
//! Epoch interruption stops a plugin that *computes* past
//! `cpu_ms_per_event`, but it cannot interrupt the host while a guest sleeps
//! (`std::thread::sleep` becomes `wasi:clocks` `subscribe-duration` plus a
//! blocking `poll`): a plugin asking for an hour's sleep would hold its
//! thread, and a webhook's concurrency slot, for an hour. So WASI's
//! `subscribe-duration` and `subscribe-instant` are replaced with versions
//! that wake no later than the event's deadline. A sleep cut short that way
//! fails the event with the usual timeout, even if the plugin would finish
//! before the next epoch check.
//!
//! The CPU limit itself is measured on the thread's own CPU clock
//! ([`thread_cpu_time`]), not on the wall: the epoch ticker only says when
//! to look.

use std::future::Future;
use std::pin::Pin;
use std::time::{Duration, Instant};

use wasmtime::component::{Linker, Resource};
use wasmtime_wasi::HostMonotonicClock;
use wasmtime_wasi::p2::{DynPollable, Pollable, subscribe};

use crate::host::HostState;

/// The `wasi:clocks/monotonic-clock` version `add_to_linker_async` defines.
const MONOTONIC_CLOCK: &str = "wasi:clocks/monotonic-clock@0.2.12";

/// CPU time the calling thread has used since it started
/// (`CLOCK_THREAD_CPUTIME_ID`); zero if the clock cannot be read.
pub(crate) fn thread_cpu_time() -> Duration {
    #[cfg(test)]
    CPU_CLOCK_READS.with(|n| n.set(n.get() + 1));
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `now` is a valid, writable timespec for the call's duration.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut now) };
    if rc != 0 {
        return Duration::ZERO;
    }
    Duration::new(
        u64::try_from(now.tv_sec).unwrap_or(0),
        u32::try_from(now.tv_nsec).unwrap_or(0),
    )
}

#[cfg(test)]
thread_local! {
    /// How often this thread has read its CPU clock (a system call each).
    pub(crate) static CPU_CLOCK_READS: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

/// A plugin's monotonic clock: nanoseconds since its instance started.
pub(crate) struct EventClock {
    start: Instant,
}

impl EventClock {
    pub(crate) fn new(start: Instant) -> Self {
        EventClock { start }
    }
}

impl HostMonotonicClock for EventClock {
    fn resolution(&self) -> u64 {
        1
    }
    fn now(&self) -> u64 {
        u64::try_from(self.start.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }
}

/// A sleep ending at `until`.
struct Sleep {
    until: Instant,
}

impl Pollable for Sleep {
    fn ready<'a, 'b>(&'a mut self) -> Pin<Box<dyn Future<Output = ()> + Send + 'b>>
    where
        'a: 'b,
        Self: 'b,
    {
        let until = tokio::time::Instant::from_std(self.until);
        Box::pin(tokio::time::sleep_until(until))
    }
}

/// When a sleep of `requested` from now ends: on time, or at the deadline
/// (`true`: cut short).
fn bounded(requested: Duration, deadline: Instant) -> (Instant, bool) {
    let now = Instant::now();
    let left = deadline.saturating_duration_since(now);
    (now + requested.min(left), requested > left)
}

fn sleep(state: &mut HostState, requested: Duration) -> wasmtime::Result<Resource<DynPollable>> {
    let (until, cut) = bounded(requested, state.deadline);
    state.slept_past_deadline |= cut;
    let sleep = state.table.push(Sleep { until })?;
    subscribe(&mut state.table, sleep)
}

/// Replaces the clock subscriptions `add_to_linker_async` defined.
pub(crate) fn bound_sleeps(linker: &mut Linker<HostState>) -> wasmtime::Result<()> {
    linker.allow_shadowing(true);
    let mut clock = linker.instance(MONOTONIC_CLOCK)?;
    clock.func_wrap(
        "subscribe-duration",
        |mut cx: wasmtime::StoreContextMut<'_, HostState>, (nanos,): (u64,)| {
            Ok((sleep(cx.data_mut(), Duration::from_nanos(nanos))?,))
        },
    )?;
    clock.func_wrap(
        "subscribe-instant",
        |mut cx: wasmtime::StoreContextMut<'_, HostState>, (when,): (u64,)| {
            let state = cx.data_mut();
            let now = EventClock::new(state.started).now();
            sleep(state, Duration::from_nanos(when.saturating_sub(now))).map(|r| (r,))
        },
    )?;
    linker.allow_shadowing(false);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sleep_ends_by_the_deadline() {
        let deadline = Instant::now() + Duration::from_millis(100);
        let (until, cut) = bounded(Duration::from_secs(3600), deadline);
        assert!(until <= deadline && cut);
        let (short, cut) = bounded(Duration::from_millis(1), deadline);
        assert!(short < deadline && !cut);
    }
}
