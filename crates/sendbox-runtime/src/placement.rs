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
//! none runs until a check. On a worker the first check comes at the next
//! epoch tick, so a call's first poll there is timed on the wall clock
//! (read without one) until that check reads the CPU clock: what ran
//! before it counts as the wall time it took, an upper bound of its CPU
//! time, high by at most what the thread waited for a core within one
//! tick. Every later poll, and every poll of a call that starts off the
//! workers (whose first check may be far away), reads the CPU clock when
//! it begins.

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
    /// is counted ([`UNREAD`] in a first poll on a worker until its first
    /// check).
    poll_cpu_from_ns: AtomicU64,
    /// The next poll is the call's first, on a worker: timed on the wall
    /// clock until its first check.
    first_poll_on_worker: AtomicBool,
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
            first_poll_on_worker: AtomicBool::new(placement == Placement::Worker),
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
            // The first check of a first poll on a worker (at most a tick
            // after it began): what ran before counts as its wall time, or
            // as all the thread's CPU time if that is less (a thread that
            // waited for a core early in its life); both bound the call's.
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
        if self.first_poll_on_worker.swap(false, Ordering::Relaxed) {
            self.poll_began_ns.store(self.wall_ns(), Ordering::Relaxed);
            self.poll_cpu_from_ns.store(UNREAD, Ordering::Relaxed);
        } else {
            self.poll_cpu_from_ns
                .store(nanos(thread_cpu_time()), Ordering::Relaxed);
        }
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

    /// A runtime that polls on the test's own thread, whose clock reads
    /// `clock_reads` counts.
    fn one_thread() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("a runtime")
    }

    fn clock_reads() -> u64 {
        CPU_CLOCK_READS.with(|n| n.get())
    }

    #[test]
    fn a_first_poll_on_a_worker_reads_the_cpu_clock_only_when_checked() {
        let rt = one_thread();
        // A call that ends before its first check reads no clock at all.
        let meter = Meter::new(Placement::Worker);
        let before = clock_reads();
        rt.block_on(drive(&meter, async { spin(Duration::from_millis(5)) }));
        assert_eq!(
            clock_reads(),
            before,
            "a call no check saw read the CPU clock"
        );
        // One that is checked: what ran before the check is counted.
        let meter = Meter::new(Placement::Worker);
        rt.block_on(drive(&meter, async {
            spin(Duration::from_millis(30));
            let reads = clock_reads();
            let used = meter.used();
            assert_eq!(clock_reads(), reads + 1, "a check reads the clock once");
            // The wall time of the work, unless the thread has had less
            // CPU than that in all (it waited for a core while spinning):
            // then all of the thread's, read just before `used` was.
            let thread_cpu = crate::clock::thread_cpu_time();
            let bound = Duration::from_millis(30).min(thread_cpu);
            assert!(
                used + Duration::from_millis(1) >= bound,
                "{used:?} counted after 30 ms of work (the thread's CPU time {thread_cpu:?})"
            );
            // From the check on, the thread's CPU clock counts.
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

    #[test]
    fn a_first_poll_that_waits_counts_its_wall_time_and_later_polls_read_the_cpu_clock() {
        let rt = one_thread();
        let meter = Meter::new(Placement::Worker);
        let before = clock_reads();
        rt.block_on(drive(&meter, async {
            spin(Duration::from_millis(20));
            tokio::task::yield_now().await;
            // The first poll was counted without the clock; this second
            // one read it as it began.
            assert_eq!(clock_reads(), before + 1);
            let used = meter.used();
            assert!(
                used >= Duration::from_millis(20),
                "{used:?} counted after 20 ms of work before the wait"
            );
        }));
        // Off the workers the first check may be a long way off: the clock
        // is read as the first poll begins.
        let meter = Meter::new(Placement::Blocking);
        let before = clock_reads();
        rt.block_on(drive(&meter, async {
            assert_eq!(clock_reads(), before + 1, "read as the poll began");
        }));
    }
}
