//! One round of delivery: claims, sends and records overlap, so every
//! allowed connection stays busy and results reach the outbox in groups.
//!
//! The round is one loop over one `select!`: each turn it starts what may
//! start (sends up to the concurrency and the rate, a claim when the queue
//! runs low, a group write when results wait and none is being written),
//! then waits for whichever finishes first. Everything it holds is capped:
//! claimed messages not yet started or in flight never exceed `ahead`, and
//! no claim is made while [`MAX_UNRECORDED`] results wait to be written.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use sendbox_mail::message::{self, Envelope};
use sendbox_outbox::{Mark, Message, OutboxError, Store};
use tokio::task::{JoinError, JoinHandle, JoinSet};
use tokio::time::Instant;
use tracing::Instrument;

use crate::AccountWorker;
use crate::outcome::{self, Attempt};

/// How a round ended.
pub(crate) enum RoundEnd {
    /// Shutdown was requested; everything claimed was sent and recorded.
    Shutdown,
    /// The account was refused; everything claimed is recorded or released.
    Paused(String),
}

/// The account's rate: when the next send may start. On a store several
/// nodes share, each send's turn is asked of the store (one at a time), so
/// the rate holds across the nodes together.
pub(crate) struct Pace {
    step: Option<Duration>,
    next: Instant,
    /// Turns come from the store ([`Store::take_send_turn`]).
    shared: bool,
    /// Shared: whether `next` is a turn the store gave and not yet used.
    granted: bool,
    asking: Option<JoinHandle<Result<Duration, OutboxError>>>,
    /// Shared: after the store could not answer, when to ask again.
    ask_again_at: Option<Instant>,
}

impl Pace {
    pub(crate) fn new(rate_per_minute: Option<u32>, shared: bool) -> Self {
        Pace {
            step: rate_per_minute
                .filter(|r| *r > 0)
                .map(|r| Duration::from_secs(60) / r),
            next: Instant::now(),
            shared,
            granted: false,
            asking: None,
            ask_again_at: None,
        }
    }

    fn limited(&self) -> bool {
        self.step.is_some()
    }

    /// When a send may start (now, or later under a rate); `None` while a
    /// shared rate's turn is not held yet.
    fn ready_at(&self) -> Option<Instant> {
        match self.step {
            None => Some(Instant::now()),
            Some(_) if self.shared => self.granted.then_some(self.next),
            Some(_) => Some(self.next),
        }
    }

    /// Takes the slot for a send starting now.
    fn take(&mut self) {
        if let Some(step) = self.step {
            if self.shared {
                self.granted = false;
            } else {
                self.next = self.next.max(Instant::now()) + step;
            }
        }
    }

    /// Shared: asks the store for the next turn, unless one is held or
    /// being asked for.
    fn ask(&mut self, outbox: &sendbox_outbox::AnyStore, account: &str) {
        let Some(step) = self.step else { return };
        if !self.shared
            || self.granted
            || self.asking.is_some()
            || self.ask_again_at.is_some_and(|t| t > Instant::now())
        {
            return;
        }
        let (outbox, account) = (outbox.clone(), account.to_owned());
        self.asking = Some(tokio::spawn(async move {
            outbox.take_send_turn(&account, step).await
        }));
    }

    /// The store's answer to [`Pace::ask`].
    fn answered(
        &mut self,
        answer: Result<Result<Duration, OutboxError>, JoinError>,
        account: &str,
    ) {
        self.asking = None;
        match answer {
            Ok(Ok(wait)) => {
                self.next = Instant::now() + wait;
                self.granted = true;
                self.ask_again_at = None;
            }
            Ok(Err(e)) => {
                tracing::error!(%account, error = %e, "cannot take a turn under the account's rate; trying again");
                self.ask_again_at = Some(Instant::now() + ASK_AGAIN);
            }
            Err(e) => {
                tracing::error!(%account, error = %e, "the rate's turn task failed; trying again");
                self.ask_again_at = Some(Instant::now() + ASK_AGAIN);
            }
        }
    }
}

/// After the store could not give a turn or connection slots, the next
/// try waits this long.
const ASK_AGAIN: Duration = Duration::from_secs(1);

/// A send in flight: its message, span and result.
type Sent = (Message, tracing::Span, Attempt);

/// Awaits the task in `slot`, or forever when there is none.
async fn finished<T>(slot: &mut Option<JoinHandle<T>>) -> Result<T, JoinError> {
    match slot {
        Some(handle) => handle.await,
        None => std::future::pending().await,
    }
}

/// Sends started per allowed connection, without a rate: one on the
/// connection, the others built and waiting for it.
const READY_PER_CONNECTION: usize = 4;
/// Messages claimed ahead per allowed connection, without a rate.
const CLAIM_ROUNDS_AHEAD: usize = 64;
/// Results wait (while sends go on) until this many are ready or the
/// oldest has waited [`LINGER`], so a busy worker writes a few large groups
/// instead of one small transaction per send. An idle worker writes at
/// once. This is the window in which a crash can forget that a message was
/// sent (it is then sent again, with the same Message-ID).
const GROUP_TARGET: usize = 128;
/// See [`GROUP_TARGET`].
const LINGER: Duration = Duration::from_millis(20);
/// Most results written in one group.
const MAX_GROUP: usize = 512;
/// No more claims while this many results wait to be written.
const MAX_UNRECORDED: usize = 1024;

impl AccountWorker {
    /// Delivers until `shutdown` resolves or the account is refused.
    pub(crate) async fn round<F: Future>(
        &self,
        mut shutdown: Pin<&mut F>,
        pace: &mut Pace,
    ) -> RoundEnd {
        let concurrency = self.settings.concurrency.max(1);
        // Claimed and not yet finished (queued + sending) never exceed
        // this many messages, nor `claim_ahead_bytes` of content (plus one
        // message: a claim always takes the first due one).
        let budget = self.settings.claim_ahead_bytes;
        let mut held_bytes = 0u64;
        let mut asked_bytes = 0u64;
        let ahead = if pace.limited() {
            concurrency
        } else {
            concurrency * CLAIM_ROUNDS_AHEAD
        };
        let mut queue: VecDeque<Message> = VecDeque::new();
        let mut sending: JoinSet<Sent> = JoinSet::new();
        let mut results: Vec<Mark> = Vec::new();
        // When the oldest result in `results` arrived.
        let mut oldest_result: Option<Instant> = None;
        let mut recording: Option<JoinHandle<Vec<Mark>>> = None;
        // After a group could not be written (the store away), the next
        // try waits until then.
        let mut record_again_at: Option<Instant> = None;
        let mut recording_n = 0usize;
        let mut claiming: Option<JoinHandle<Result<Vec<Message>, OutboxError>>> = None;
        let mut asked = 0usize;
        // Set when the last claim found less than it asked for: the next
        // waits for a wake or the poll interval.
        let mut idle_until: Option<Instant> = None;
        // The first message goes alone until the account has answered.
        let mut probing = true;
        let mut ending: Option<RoundEnd> = None;
        // The account refused us: nothing more is sent this round, even at
        // shutdown (which otherwise sends what was claimed).
        let mut refused = false;
        // On a store several nodes share, this node sends on at most the
        // connection slots it holds there (taken when it has mail, given
        // back with its connections closed when it has none); on a store
        // of its own, on all of them.
        let shared = self.outbox.shared();
        let mut slots = if shared { 0 } else { concurrency };
        let mut holding: Option<JoinHandle<Result<u32, OutboxError>>> = None;
        let mut hold_again_at: Option<Instant> = None;
        let mut releasing: Option<JoinHandle<()>> = None;
        let mut pause_cleared = false;

        loop {
            let running = ending.is_none();
            // Sending goes on at shutdown (the claimed messages), not once
            // the account refused (they were released).
            let sending_allowed = !refused;
            // Shared store: no more sends than slots, so the transport
            // never opens more connections than this node holds.
            let cap = if probing {
                slots.min(1)
            } else if pace.limited() || shared {
                slots
            } else {
                slots * READY_PER_CONNECTION
            };
            while sending_allowed
                && sending.len() < cap
                && pace.ready_at().is_some_and(|t| t <= Instant::now())
            {
                let Some(m) = queue.pop_front() else { break };
                pace.take();
                self.start(m, &mut sending);
            }
            // A turn is asked for even while every connection is busy: a
            // turn that comes due then says this node needs another one.
            if sending_allowed && !queue.is_empty() {
                pace.ask(&self.outbox, &self.account);
            }
            let flush_at = oldest_result.map(|t| t + LINGER).max(record_again_at);
            let waiting_to_retry = record_again_at.is_some_and(|t| t > Instant::now());
            let flush = !waiting_to_retry
                && (results.len() >= GROUP_TARGET
                    || flush_at.is_some_and(|t| t <= Instant::now())
                    || sending.is_empty()
                    || ending.is_some());
            // Once refused, the round hands back what it holds: not while
            // one of its claims is under way, which could take the
            // handed-back messages again (a claim and a group sent together
            // may be written in either order).
            let claim_under_way = refused && claiming.is_some();
            if recording.is_none() && !results.is_empty() && flush && !claim_under_way {
                let group: Vec<Mark> = results.drain(..results.len().min(MAX_GROUP)).collect();
                oldest_result = (!results.is_empty()).then(Instant::now);
                recording_n = group.len();
                recording = Some(tokio::spawn(record(self.outbox.clone(), group)));
            }
            let held = queue.len() + sending.len();
            let unrecorded = results.len() + recording_n;
            // Without a rate, claim again while half the claimed are still
            // waiting, so a claim (queued behind a group write) never
            // leaves a connection idle.
            let low = if pace.limited() {
                queue.is_empty()
            } else {
                queue.len() < ahead / 2
            };
            // A round ending for a pause claims nothing more: what it would
            // claim it could only release again.
            if running
                && sending_allowed
                && slots > 0
                && claiming.is_none()
                && idle_until.is_none()
                && low
                && held < ahead
                && held_bytes < budget
                && unrecorded < MAX_UNRECORDED
            {
                asked = ahead - held;
                asked_bytes = budget - held_bytes;
                let (outbox, account) = (self.outbox.clone(), self.account.clone());
                claiming = Some(tokio::spawn(async move {
                    outbox.claim_within(&account, asked, asked_bytes).await
                }));
            }
            // Shared store: a slot when there may be mail; one more when a
            // message could start now (its turn under the rate has come)
            // but every held connection is busy — under a rate one
            // connection usually keeps up, and the slots stay free for the
            // other nodes; none kept while idle.
            let held_up = !probing
                && !queue.is_empty()
                && sending.len() >= slots
                && pace.ready_at().is_some_and(|t| t <= Instant::now());
            if shared
                && running
                && sending_allowed
                && holding.is_none()
                && releasing.is_none()
                && slots < concurrency
                && idle_until.is_none()
                && (slots == 0 || held_up)
                && hold_again_at.is_none_or(|t| t <= Instant::now())
            {
                let (outbox, account) = (self.outbox.clone(), self.account.clone());
                let max = u32::try_from(concurrency).unwrap_or(u32::MAX);
                let want = u32::try_from(slots + 1).unwrap_or(max);
                holding = Some(tokio::spawn(async move {
                    outbox.hold_connections(&account, want, max).await
                }));
            }
            if shared
                && slots > 0
                && idle_until.is_some()
                && queue.is_empty()
                && sending.is_empty()
                && holding.is_none()
                && releasing.is_none()
            {
                slots = 0;
                releasing = Some(tokio::spawn(self.give_back_connections()));
            }
            let settled = queue.is_empty() && sending.is_empty() && results.is_empty();
            if let Some(end) = ending.take_if(|_| {
                settled && claiming.is_none() && recording.is_none() && holding.is_none()
            }) {
                if let Some(r) = releasing.take() {
                    let _ = r.await;
                }
                if shared && slots > 0 {
                    self.give_back_connections().await;
                }
                return end;
            }
            let waiting_for_slot = sending_allowed && !queue.is_empty() && sending.len() < cap;
            let ready_at = pace.ready_at();
            tokio::select! {
                _ = &mut shutdown, if running => {
                    // No more claims; what is claimed is still sent.
                    ending = Some(RoundEnd::Shutdown);
                }
                Some(done) = sending.join_next(), if !sending.is_empty() => {
                    let Ok((m, span, attempt)) = done else {
                        // A send task panicked: its message stays `sending`
                        // until the next start recovers it.
                        tracing::error!(account = %self.account, "a send task failed");
                        continue;
                    };
                    if attempt.reached_the_account() {
                        probing = false;
                        // The account answers: a pause another node (or
                        // this one) recorded is over, for every node.
                        if shared && !pause_cleared {
                            pause_cleared = true;
                            let (outbox, account) = (self.outbox.clone(), self.account.clone());
                            tokio::spawn(async move {
                                if let Err(e) = outbox.set_account_paused(&account, None).await {
                                    tracing::warn!(%account, error = %e, "cannot record that the account's pause is over");
                                }
                            });
                        }
                    }
                    held_bytes = held_bytes.saturating_sub(size(&m));
                    let (mark, pause) = span.in_scope(|| outcome::settle(&self.settings, &self.status, &m, attempt));
                    results.push(mark);
                    oldest_result.get_or_insert_with(Instant::now);
                    if let Some(reason) = pause && !refused {
                        refused = true;
                        if ending.is_none() {
                            ending = Some(RoundEnd::Paused(reason));
                        }
                        release(&mut queue, &mut held_bytes, &mut results, "not attempted: the account is paused");
                    }
                }
                claimed = finished(&mut claiming) => {
                    claiming = None;
                    match claimed {
                        Ok(Ok(batch)) => {
                            let got: u64 = batch.iter().map(size).sum();
                            // Fewer than asked, and not for the byte budget
                            // (a batch cut by it holds most of it): nothing
                            // more is due.
                            if batch.len() < asked && got <= asked_bytes / 2 {
                                idle_until = Some(Instant::now() + self.settings.poll_interval);
                            }
                            held_bytes += got;
                            queue.extend(batch);
                            if !sending_allowed {
                                release(&mut queue, &mut held_bytes, &mut results, "not attempted: the account is paused");
                            }
                        }
                        Ok(Err(e)) => {
                            tracing::error!(account = %self.account, error = %e, "cannot claim messages");
                            idle_until = Some(Instant::now() + self.settings.poll_interval);
                        }
                        Err(e) => {
                            tracing::error!(account = %self.account, error = %e, "the claim task failed");
                            idle_until = Some(Instant::now() + self.settings.poll_interval);
                        }
                    }
                }
                _ = sleep_until(flush_at), if recording.is_none() && !results.is_empty() && !claim_under_way => {}
                written = finished(&mut recording) => {
                    recording = None;
                    recording_n = 0;
                    // Not written: kept, first in line, and tried again in
                    // a moment (what is held stays capped: sending stops
                    // while MAX_UNRECORDED results wait).
                    if let Ok(back) = written
                        && !back.is_empty()
                    {
                        results.splice(0..0, back);
                        oldest_result.get_or_insert_with(Instant::now);
                        record_again_at = Some(Instant::now() + RECORD_RETRY);
                    } else {
                        record_again_at = None;
                    }
                }
                _ = sleep_until(idle_until), if running && idle_until.is_some() => {
                    idle_until = None;
                }
                _ = self.wake.notified(), if running && idle_until.is_some() => {
                    idle_until = None;
                }
                _ = sleep_until(ready_at), if waiting_for_slot => {}
                answer = finished(&mut pace.asking) => pace.answered(answer, &self.account),
                _ = sleep_until(pace.ask_again_at), if pace.ask_again_at.is_some() => {
                    pace.ask_again_at = None;
                }
                held = finished(&mut holding) => {
                    holding = None;
                    match held {
                        Ok(Ok(n)) => {
                            let before = slots;
                            slots = (n as usize).min(concurrency);
                            if slots <= before {
                                // None free: other nodes hold them.
                                hold_again_at = Some(Instant::now() + ASK_AGAIN);
                            }
                        }
                        Ok(Err(e)) => {
                            tracing::error!(account = %self.account, error = %e, "cannot take the account's connection slots; trying again");
                            hold_again_at = Some(Instant::now() + ASK_AGAIN);
                        }
                        Err(e) => {
                            tracing::error!(account = %self.account, error = %e, "the connection slot task failed; trying again");
                            hold_again_at = Some(Instant::now() + ASK_AGAIN);
                        }
                    }
                }
                _ = sleep_until(hold_again_at), if hold_again_at.is_some() && holding.is_none() => {
                    hold_again_at = None;
                }
                _ = finished(&mut releasing) => releasing = None,
            }
        }
    }

    /// Closes the account's idle connections, then gives their slots
    /// back to the store for other nodes.
    fn give_back_connections(&self) -> impl Future<Output = ()> + Send + 'static {
        let (transport, outbox, account) = (
            self.transport.clone(),
            self.outbox.clone(),
            self.account.clone(),
        );
        async move {
            transport.close().await;
            if let Err(e) = outbox.release_connections(&account).await {
                tracing::warn!(%account, error = %e, "cannot give back the account's connection slots; they stay this node's");
            }
        }
    }

    /// Starts sending `m` on its own task.
    fn start(&self, m: Message, sending: &mut JoinSet<Sent>) {
        let span = tracing::info_span!("deliver", account = %self.account, plugin = %m.plugin, event_id = %m.event_id, message_id = %m.message_id, id = m.id, attempt = m.attempts);
        let transport = self.transport.clone();
        let allowed = self.settings.allowed_from.of(&m.plugin);
        let mailbox = self.mailbox.clone();
        let task_span = span.clone();
        sending.spawn(
            async move {
                let prepared = message::build(
                    &m.email,
                    &Envelope {
                        account_mailbox: &mailbox,
                        allowed_from: &allowed,
                        message_id: &m.message_id,
                        date: std::time::UNIX_EPOCH
                            + Duration::from_millis(m.created_ms.max(0) as u64),
                    },
                );
                let attempt = match prepared {
                    Ok(p) => match transport.send(p).await {
                        Ok(receipt) => Attempt::Sent(receipt),
                        Err(e) => Attempt::Failed(e),
                    },
                    Err(e) => Attempt::Unbuildable(e.to_string()),
                };
                (m, span, attempt)
            }
            .instrument(task_span),
        );
    }
}

/// Moves every claimed message not yet started to the results, as going
/// back to the queue now.
fn release(
    queue: &mut VecDeque<Message>,
    held_bytes: &mut u64,
    results: &mut Vec<Mark>,
    why: &str,
) {
    for m in queue.drain(..) {
        *held_bytes = held_bytes.saturating_sub(size(&m));
        results.push(outcome::released(&m, why));
    }
}

/// What a claimed message weighs against the byte budget.
fn size(m: &Message) -> u64 {
    m.email.content_bytes()
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// How long a group of results that could not be written waits before
/// it is tried again.
const RECORD_RETRY: Duration = Duration::from_secs(1);

/// Writes one group of results; returns it if the store could not take it
/// (to be tried again), nothing otherwise. A result the store refuses on
/// its own (the message was retried or dropped meanwhile) is logged.
async fn record(outbox: sendbox_outbox::AnyStore, group: Vec<Mark>) -> Vec<Mark> {
    let ids: Vec<i64> = group.iter().map(|m| m.id).collect();
    match outbox.mark_many(group.clone()).await {
        Ok(answers) => {
            for (id, answer) in ids.iter().zip(answers) {
                if let Err(e) = answer {
                    tracing::warn!(id, error = %e, "delivery result not recorded");
                }
            }
            Vec::new()
        }
        Err(e) => {
            tracing::error!(
                messages = ids.len(),
                error = %e,
                "cannot record delivery results; trying again"
            );
            group
        }
    }
}
