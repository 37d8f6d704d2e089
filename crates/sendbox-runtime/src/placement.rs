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
//! the thread that ran it ([`Meter`]).

use std::future::Future;
use std::pin::pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

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
#[derive(Debug, Default)]
pub(crate) struct Meter {
    /// CPU nanoseconds of the polls that have ended.
    used_ns: AtomicU64,
    /// The running thread's CPU clock when the current poll began.
    poll_began_ns: AtomicU64,
    /// The call is running on a worker and may still move off it.
    inline: AtomicBool,
    /// Set by the epoch callback: the call has run past a tick on the
    /// worker and yielded so it can move.
    wants_thread: AtomicBool,
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

impl Meter {
    pub(crate) fn new(placement: Placement) -> Self {
        let meter = Meter::default();
        meter
            .inline
            .store(placement == Placement::Worker, Ordering::Relaxed);
        meter
    }

    /// CPU time used so far; called from inside a poll (the epoch
    /// callback), so the current poll's share is read off this thread.
    pub(crate) fn used(&self) -> Duration {
        let now = nanos(thread_cpu_time());
        let current = now.saturating_sub(self.poll_began_ns.load(Ordering::Relaxed));
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
        self.poll_began_ns
            .store(nanos(thread_cpu_time()), Ordering::Relaxed);
        let polled = fut.poll(cx);
        if polled.is_pending() {
            // Only a call that waits is polled again, perhaps on another
            // thread: only then is this poll's share worth reading.
            let spent =
                nanos(thread_cpu_time()).saturating_sub(self.poll_began_ns.load(Ordering::Relaxed));
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
