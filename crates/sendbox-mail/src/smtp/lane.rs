//! Lanes: each open connection is driven by a task of its own that takes
//! the account's waiting messages one after another while there are any,
//! so the next message's envelope can ride behind the previous message's
//! content ([`super::transaction`]), then leaves its connection idle for
//! the next lane and ends.
//!
//! A lane is started only when more messages wait than there are lanes
//! that will look at the queue again, and only with a connection permit:
//! never more connections than `max_connections`, nor (on a store several
//! nodes share) than messages the caller has in flight at once.

use std::collections::VecDeque;
use std::sync::{Arc, MutexGuard, PoisonError};

use tokio::sync::{OwnedSemaphorePermit, oneshot};
use tracing::Instrument;

use super::transaction::{self, Envelope, Written};
use super::{Conn, Inner, Receipt};
use crate::error::{FailureKind, SendError};
use crate::message::Prepared;

/// A message waiting for a lane, and where its result goes.
pub(super) struct Job {
    message: Prepared,
    reply: oneshot::Sender<Result<Receipt, SendError>>,
    /// The caller's span, so what the lane logs about the message can be
    /// found with it.
    span: tracing::Span,
}

/// Messages waiting for a lane.
#[derive(Default)]
pub(super) struct Queue {
    jobs: VecDeque<Job>,
    /// Lanes that will look at `jobs` again before they end.
    available: usize,
}

/// Queues `message` and awaits its result, starting a lane if none will
/// take it.
pub(super) async fn submit(inner: &Arc<Inner>, message: Prepared) -> Result<Receipt, SendError> {
    let (reply, result) = oneshot::channel();
    inner.lock_queue().jobs.push_back(Job {
        message,
        reply,
        span: tracing::Span::current(),
    });
    start_if_needed(inner);
    result.await.unwrap_or_else(|_| {
        Err(SendError::new(
            FailureKind::Transient,
            "the connection's task ended before the message was sent",
        ))
    })
}

/// Starts a lane when more messages wait than lanes will look for them,
/// and a connection permit is free. Called when a message is queued and
/// when a permit held elsewhere ([`super::SmtpTransport::check`]) is given
/// back.
pub(super) fn start_if_needed(inner: &Arc<Inner>) {
    let mut queue = inner.lock_queue();
    if queue.jobs.len() > queue.available
        && let Ok(permit) = inner.connections.clone().try_acquire_owned()
    {
        queue.available += 1;
        tokio::spawn(run(inner.clone(), permit));
    }
}

/// A message a lane has taken.
struct InHand {
    job: Job,
    /// Its envelope's commands, when already written on this connection.
    envelope: Option<Envelope>,
    written: Written,
    /// Tried (or to be tried) on a connection opened for it: a failure
    /// there is final.
    fresh: bool,
}

impl InHand {
    fn new(job: Job) -> Self {
        InHand {
            job,
            envelope: None,
            written: Written::No,
            fresh: false,
        }
    }
}

impl Inner {
    pub(super) fn lock_queue(&self) -> MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The next waiting message whose caller still waits.
    fn next_job(queue: &mut Queue) -> Option<Job> {
        while let Some(job) = queue.jobs.pop_front() {
            if !job.reply.is_closed() {
                return Some(job);
            }
        }
        None
    }

    /// Answers a finished message. A lane with nothing more in hand says
    /// first that it will look at the queue again, so a caller that sends
    /// its next message on this answer finds it there rather than starting
    /// a lane (and a connection) of its own.
    fn answer(&self, job: Job, result: Result<Receipt, SendError>, next: &Option<InHand>) {
        if next.is_none() {
            self.lock_queue().available += 1;
        }
        let _ = job.reply.send(result);
    }
}

/// One lane: takes messages until none waits, then leaves its connection
/// idle and gives its permit back (both while the queue is locked, so a
/// message queued meanwhile starts a new lane).
async fn run(inner: Arc<Inner>, permit: OwnedSemaphorePermit) {
    let _ended = Ended(inner.clone());
    let mut permit = Some(permit);
    let mut conn: Option<Conn> = None;
    let mut in_hand: Option<InHand> = None;
    loop {
        let work = match in_hand.take() {
            Some(work) => work,
            None => {
                let mut queue = inner.lock_queue();
                queue.available = queue.available.saturating_sub(1);
                match Inner::next_job(&mut queue) {
                    Some(job) => InHand::new(job),
                    None => {
                        if let Some(c) = conn.take() {
                            inner.put_back(c);
                        }
                        drop(permit.take());
                        return;
                    }
                }
            }
        };
        let span = work.job.span.clone();
        in_hand = step(&inner, &mut conn, work).instrument(span).await;
    }
}

/// Should a lane end by a panic, its permit is given back first (declared
/// after this), and a message still queued gets a new lane.
struct Ended(Arc<Inner>);

impl Drop for Ended {
    fn drop(&mut self) {
        if std::thread::panicking() {
            start_if_needed(&self.0);
        }
    }
}

/// Sends the message in hand on the lane's connection (opening one if
/// needed); returns the message to go on with, if one was taken and its
/// envelope written behind this one's content, or one to try again.
async fn step(inner: &Inner, conn: &mut Option<Conn>, mut work: InHand) -> Option<InHand> {
    if conn.is_none() && !work.fresh {
        *conn = inner.take_idle();
    }
    if conn.is_none() {
        match inner.open().await {
            Ok(c) => {
                work.fresh = true;
                *conn = Some(c);
            }
            Err(e) => {
                inner.answer(work.job, Err(e), &None);
                return None;
            }
        }
    }
    let c = conn.as_mut()?;
    let envelope = match work.envelope.take() {
        Some(e) => e,
        None => match Envelope::of(&c.smtp, &work.job.message) {
            Ok(e) => e,
            Err(e) => {
                inner.answer(work.job, Err(e), &None);
                return None;
            }
        },
    };
    let refused = match inner
        .envelope(c, &work.job.message, &envelope, work.written)
        .await
    {
        Ok(refused) => refused,
        Err(e) => {
            if c.smtp.has_broken() {
                *conn = None;
            }
            if e.code.is_none() && !work.fresh {
                *conn = None;
                // The connection had died (closed by the server while
                // idle, or with the previous message) before this one's
                // data went out: again, on a new one.
                tracing::debug!(error = %e, "connection failed before the data; opening a new one");
                return Some(InHand {
                    fresh: true,
                    ..InHand::new(work.job)
                });
            }
            inner.answer(work.job, Err(e), &None);
            return None;
        }
    };
    // The next message, if one waits, goes out behind this one's content.
    let next = match transaction::can_carry_next(c, &work.job.message) {
        true => next_envelope(inner, c),
        false => None,
    };
    let (result, next_written) = inner
        .content(c, &work.job.message, refused, next.as_ref().map(|n| &n.1))
        .await;
    if c.smtp.has_broken() {
        *conn = None;
    }
    let following = next.map(|(job, envelope)| match conn {
        Some(_) if next_written => InHand {
            job,
            envelope: Some(envelope),
            written: Written::AfterContent,
            fresh: false,
        },
        // Its envelope went out on a connection that broke, or was not
        // written: nothing of it was sent.
        _ => InHand::new(job),
    });
    inner.answer(work.job, result, &following);
    following
}

/// Takes the next waiting message to write behind the current content,
/// with its envelope's commands; one the server cannot take is answered at
/// once and not written.
fn next_envelope(inner: &Inner, c: &Conn) -> Option<(Job, Envelope)> {
    let job = Inner::next_job(&mut inner.lock_queue())?;
    match Envelope::of(&c.smtp, &job.message) {
        Ok(envelope) => Some((job, envelope)),
        Err(e) => {
            let _ = job.reply.send(Err(e));
            None
        }
    }
}
