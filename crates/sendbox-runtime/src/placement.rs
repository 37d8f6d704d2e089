//! Where an event's code runs, and how its CPU time is counted.
//!
//! Most events take tens of microseconds: handing each to a blocking
//! thread and back (two thread wake-ups) would cost more than the event.
//! So [`Plugin::run_async`](crate::Plugin::run_async) runs the call on the
//! async worker that awaits it, on a wasmtime fiber. An event still running
//! when the epoch next ticks is a long one (an interpreter, a loop): the
//! epoch callback yields, and [`drive`] moves the rest of the call off the
//! worker with `block_in_place`, so a slow plugin never holds a worker for
//! more than one epoch tick and the operating system shares the cores
//! between it and everything else, as it did before.
//!
//! A call can also wait (a bounded sleep) and resume on another worker
//! thread, so its CPU time is summed over the polls of its future, each on
//! the thread that ran it ([`Meter`]). Reading a thread's CPU clock is a
//! system call, which every event would pay at its start although almost
//! none runs until a check: so a poll's start is noted on the wall clock
//! (read without one), and its CPU clock is first read at its first check,
//! counting the time before as the wall time it took — an upper bound of
//! its CPU time, off by what the thread waited for a core in at most one
//! epoch tick. A poll that waits before any check is counted the same way.

use std::future::Future;
use std::pin::pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use crate::clock::thread_cpu_time;

/// Where a call runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Placement {
    /// On the async worker that awaits it, moved to a blocking thread if
    /// it runs past an epoch tick.
    Worker,
    /// On the calling thread, which may block (a blocking-pool thread or
    /// a thread outside any runtime).
    Blocking,
}

/// CPU time of one call's polls, and whether it asked to leave the worker.
#[derive(Debug)]
pub(crate) struct Meter {
    /// What the wall-clock readings count from.
    origin: Instant,
    /// CPU nanoseconds of the polls that have ended.
    used_ns: AtomicU64,
    /// When the current poll began, in nanoseconds since `origin`.
    poll_began_ns: AtomicU64,
    /// The running thread's CPU clock reading from which the current poll
    /// is counted, once its first check has read the clock ([`UNREAD`]
    /// until then).
    poll_cpu_from_ns: AtomicU64,
    /// The call is running on a worker and may still move off it.
    inline: AtomicBool,
    /// Set by the epoch callback: the call has run past a tick on the
    /// worker and yielded so it can move.
    wants_thread: AtomicBool,
}

/// `poll_cpu_from_ns` before the current poll's first check.
const UNREAD: u64 = u64::MAX;

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

impl Meter {
    pub(crate) fn new(placement: Placement) -> Self {
        Meter {
            origin: Instant::now(),
            used_ns: AtomicU64::new(0),
            poll_began_ns: AtomicU64::new(0),
            poll_cpu_from_ns: AtomicU64::new(UNREAD),
            inline: AtomicBool::new(placement == Placement::Worker),
            wants_thread: AtomicBool::new(false),
        }
    }

    /// Wall-clock nanoseconds since `origin`.
    fn wall_ns(&self) -> u64 {
        nanos(self.origin.elapsed())
    }

    /// CPU time used so far; called from inside a poll (the epoch
    /// callback), so the current poll's share is read off this thread.
    pub(crate) fn used(&self) -> Duration {
        let cpu_now = nanos(thread_cpu_time());
        let from = match self.poll_cpu_from_ns.load(Ordering::Relaxed) {
            // The poll's first check: what it ran before counts as the
            // wall time it took.
            UNREAD => {
                let ran = self
                    .wall_ns()
                    .saturating_sub(self.poll_began_ns.load(Ordering::Relaxed));
                let from = cpu_now.saturating_sub(ran);
                self.poll_cpu_from_ns.store(from, Ordering::Relaxed);
                from
            }
            from => from,
        };
        let current = cpu_now.saturating_sub(from);
        Duration::from_nanos(self.used_ns.load(Ordering::Relaxed).saturating_add(current))
    }

    /// Whether the call still runs on a worker (it should yield at the
    /// next check, to move).
    pub(crate) fn inline(&self) -> bool {
        self.inline.load(Ordering::Relaxed)
    }

    /// The epoch callback's request to leave the worker.
    pub(crate) fn ask_for_thread(&self) {
        self.wants_thread.store(true, Ordering::Relaxed);
    }

    fn poll_metered<F: Future>(
        &self,
        fut: std::pin::Pin<&mut F>,
        cx: &mut Context<'_>,
    ) -> Poll<F::Output> {
        self.poll_began_ns.store(self.wall_ns(), Ordering::Relaxed);
        self.poll_cpu_from_ns.store(UNREAD, Ordering::Relaxed);
        let polled = fut.poll(cx);
        if polled.is_pending() {
            // Only a call that waits is polled again, perhaps on another
            // thread: only then is this poll's share worth reading.
            let spent = match self.poll_cpu_from_ns.load(Ordering::Relaxed) {
                UNREAD => self
                    .wall_ns()
                    .saturating_sub(self.poll_began_ns.load(Ordering::Relaxed)),
                from => nanos(thread_cpu_time()).saturating_sub(from),
            };
            self.used_ns.fetch_add(spent, Ordering::Relaxed);
        }
        polled
    }
}

/// Runs `call` to completion as `placement` says, counting its CPU time
/// in `meter`.
pub(crate) async fn drive<F: Future>(meter: &Meter, call: F) -> F::Output {
    let mut call = pin!(call);
    let moved = std::future::poll_fn(|cx| match meter.poll_metered(call.as_mut(), cx) {
        Poll::Ready(out) => Poll::Ready(Some(out)),
        Poll::Pending if meter.wants_thread.load(Ordering::Relaxed) => Poll::Ready(None),
        Poll::Pending => Poll::Pending,
    })
    .await;
    if let Some(out) = moved {
        return out;
    }
    meter.inline.store(false, Ordering::Relaxed);
    let handle = tokio::runtime::Handle::current();
    let rest = std::future::poll_fn(|cx| meter.poll_metered(call.as_mut(), cx));
    if handle.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread {
        // This thread hands its worker role to another and finishes the
        // call as a blocking thread.
        tokio::task::block_in_place(|| handle.block_on(rest))
    } else {
        // A single-threaded runtime has no other worker to hand to: the
        // call goes on here.
        rest.await
    }
}

/// Drives `call` to completion from synchronous code: on a worker of a
/// multi-threaded runtime the worker's role is handed to another thread
/// first; elsewhere (a blocking thread, a thread outside any runtime) it
/// blocks the calling thread, on wasmtime-wasi's runtime when there is none.
pub(crate) fn block_on<F: Future>(call: F) -> F::Output {
    match tokio::runtime::Handle::try_current() {
        Ok(handle) if handle.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(|| handle.block_on(call))
        }
        _ => wasmtime_wasi::runtime::in_tokio(call),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::CPU_CLOCK_READS;

    /// Keeps this thread busy for `d` of wall time.
    fn spin(d: Duration) {
        let until = Instant::now() + d;
        while Instant::now() < until {
            std::hint::spin_loop();
        }
    }

    fn clock_reads() -> u64 {
        CPU_CLOCK_READS.with(|n| n.get())
    }

    #[test]
    fn a_poll_counts_from_its_start_and_reads_the_cpu_clock_only_when_checked() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("a runtime");
        let meter = Meter::new(Placement::Blocking);
        let before = clock_reads();
        rt.block_on(drive(&meter, async {
            // A poll that waits before any check: its wall time is counted,
            // and no clock is read for it.
            spin(Duration::from_millis(20));
            tokio::task::yield_now().await;
            assert_eq!(
                clock_reads(),
                before,
                "a poll without a check read the CPU clock"
            );
            // The next poll's first check counts what ran before it.
            spin(Duration::from_millis(30));
            let used = meter.used();
            assert!(
                used >= Duration::from_millis(50),
                "{used:?} counted after 50 ms of work"
            );
            assert_eq!(clock_reads(), before + 1, "a check reads the clock once");
            // From the first check on, the thread's CPU clock counts.
            let cpu = crate::clock::thread_cpu_time();
            spin(Duration::from_millis(20));
            let spent = crate::clock::thread_cpu_time().saturating_sub(cpu);
            let later = meter.used();
            assert!(
                later >= used + spent.saturating_sub(Duration::from_millis(1)),
                "{later:?} after {used:?} and {spent:?} more of CPU"
            );
        }));
    }
}
