//! Event → plugin → commit → answer: runs a job's plugin in a fresh
//! instance, counts its outcome against the [`OutcomeBudget`] and lets go
//! of the trigger's run slot, commits the outcome (re-running the plugin on
//! fresh state when the state it read changed meanwhile), wakes the
//! account's worker, and says what became of it.

use std::sync::Arc;

use sendbox_outbox::{AnyStore, Call, Outbox, OutboxError, Store};
use sendbox_runtime::{RunReport, StateError, StateStore, Versioned};
use sendbox_triggers::{Dispatch, Dispatched, Job};
use tokio::sync::{Semaphore, SemaphorePermit};

use super::registry::{Registry, Wakers};

/// The bytes of plugin outcomes held while they wait for their commit,
/// over every plugin (`[daemon] max_held_outcome_bytes`). A run's outcome
/// is counted before its trigger's run slot is let go, waiting (with the
/// slot) while the budget is spent, so outcomes awaiting the writer cannot
/// pile up past it however many requests wait. Counted in KiB; an outcome
/// larger than the whole budget takes all of it.
pub struct OutcomeBudget {
    kib: Semaphore,
    total_kib: u32,
}

impl OutcomeBudget {
    /// A budget of `max_bytes` (at least 1 KiB, at most 4 TiB).
    pub fn new(max_bytes: u64) -> OutcomeBudget {
        let total_kib = u32::try_from(max_bytes / 1024).unwrap_or(u32::MAX).max(1);
        OutcomeBudget {
            kib: Semaphore::new(total_kib as usize),
            total_kib,
        }
    }

    /// Waits until `bytes` more fit, and holds them until the permit drops.
    async fn hold(&self, bytes: u64) -> Option<SemaphorePermit<'_>> {
        let kib = u32::try_from(bytes.div_ceil(1024))
            .unwrap_or(u32::MAX)
            .clamp(1, self.total_kib);
        // The semaphore is never closed.
        self.kib.acquire_many(kib).await.ok()
    }

    /// Bytes held now.
    pub fn held_bytes(&self) -> u64 {
        let free = u32::try_from(self.kib.available_permits()).unwrap_or(self.total_kib);
        u64::from(self.total_kib.saturating_sub(free)) * 1024
    }

    /// The budget, in bytes.
    pub fn max_bytes(&self) -> u64 {
        u64::from(self.total_kib) * 1024
    }
}

/// What an outcome holds in memory until its commit, about: its content,
/// its webhook answer and its state writes, and a little for each email's
/// addresses and headers and each write's bookkeeping.
fn outcome_bytes(report: &RunReport) -> u64 {
    const PER_EMAIL: u64 = 512;
    const PER_STATE_CHANGE: u64 = 64;
    let emails: u64 = report
        .outcome
        .emails
        .iter()
        .map(|e| {
            let addresses: usize =
                e.to.iter()
                    .chain(&e.cc)
                    .chain(&e.bcc)
                    .map(String::len)
                    .sum();
            let headers: usize = e.headers.iter().map(|(n, v)| n.len() + v.len()).sum();
            e.content_bytes() + (addresses + headers) as u64 + PER_EMAIL
        })
        .sum();
    let response = report
        .outcome
        .response
        .as_ref()
        .map_or(0, |r| r.body.0.len() as u64);
    let state: u64 = report
        .state_changes
        .iter()
        .map(|c| match c {
            sendbox_types::StateChange::Set { key, value } => key.len() + value.0.len(),
            sendbox_types::StateChange::Delete { key } => key.len(),
        } as u64 + PER_STATE_CHANGE)
        .sum();
    emails + response + state
}

/// Plugin state, read from the outbox's database.
pub struct OutboxState(pub AnyStore);

/// Runs an async store call from synchronous code: a plugin's state read
/// (on a worker or a blocking thread) or the `/metrics` page; a worker hands
/// its other tasks to another worker meanwhile.
pub fn wait_for<F: std::future::Future>(f: F) -> F::Output {
    let handle = tokio::runtime::Handle::current();
    tokio::task::block_in_place(|| handle.block_on(f))
}

fn state_err(e: OutboxError) -> StateError {
    StateError(e.to_string())
}

impl StateStore for OutboxState {
    fn get(&self, plugin: &str, key: &str) -> Result<Option<Versioned>, StateError> {
        // SQLite is read directly (a WAL read never waits for the writer),
        // PostgreSQL through the runtime.
        let got = match &self.0 {
            AnyStore::Sqlite(o) => Outbox::plugin_state_get(o, plugin, key),
            store => wait_for(store.plugin_state_get(plugin, key)),
        };
        Ok(got
            .map_err(state_err)?
            .map(|(value, version)| Versioned { value, version }))
    }
    fn keys(&self, plugin: &str, prefix: &str, limit: usize) -> Result<Vec<String>, StateError> {
        match &self.0 {
            AnyStore::Sqlite(o) => Outbox::plugin_state_keys(o, plugin, prefix, limit),
            store => wait_for(store.plugin_state_keys(plugin, prefix, limit)),
        }
        .map_err(state_err)
    }
    fn usage_bytes(&self, plugin: &str) -> Result<u64, StateError> {
        match &self.0 {
            AnyStore::Sqlite(o) => Outbox::plugin_state_usage(o, plugin),
            store => wait_for(store.plugin_state_usage(plugin)),
        }
        .map_err(state_err)
    }
}

/// Runs a job: plugin, then one outbox commit, then a nudge to the
/// account's delivery worker.
pub fn dispatcher(
    plugins: Arc<Registry>,
    outbox: AnyStore,
    wakers: Arc<Wakers>,
    metrics: Arc<crate::metrics::Metrics>,
    budget: Arc<OutcomeBudget>,
) -> Dispatch {
    Arc::new(move |job: Job| {
        let plugins = plugins.clone();
        let outbox = outbox.clone();
        let wakers = wakers.clone();
        let metrics = metrics.clone();
        let budget = budget.clone();
        Box::pin(async move {
            let trigger = job.event.kind();
            let plugin_name = job.plugin.clone();
            let tick = match &job.event {
                sendbox_types::Event::Schedule(t) => Some(t.clone()),
                _ => None,
            };
            // Several nodes on one store: each tick runs on the first node
            // that takes it.
            if let Some(tick) = &tick {
                match outbox
                    .claim_schedule_tick(&plugin_name, &tick.schedule, tick.scheduled_at_ms)
                    .await
                {
                    Ok(true) => {
                        tracing::info!(plugin = %plugin_name, schedule = %tick.schedule, scheduled_at_ms = tick.scheduled_at_ms, "schedule tick taken by this node");
                    }
                    Ok(false) => {
                        tracing::debug!(plugin = %plugin_name, schedule = %tick.schedule, "tick taken by another node");
                        metrics.event(trigger, &plugin_name, "run_elsewhere");
                        return Dispatched::Committed {
                            queued: Vec::new(),
                            duplicates: Vec::new(),
                            response: None,
                        };
                    }
                    Err(e) => {
                        tracing::warn!(plugin = %plugin_name, error = %e, "cannot take the schedule's tick");
                        metrics.event(trigger, &plugin_name, "store_failed");
                        return Dispatched::StoreFailed(e.to_string());
                    }
                }
            }
            let result = run_job(job, &plugins, &outbox, &wakers, &metrics, &budget).await;
            if let Some(tick) = tick {
                // Remembered so a restart can catch up on runs it missed.
                let saved = outbox
                    .set_schedule_run(&plugin_name, &tick.schedule, tick.scheduled_at_ms)
                    .await;
                if let Err(e) = saved {
                    tracing::warn!(plugin = %plugin_name, error = %e, "cannot record the schedule's run");
                }
            }
            let label = match &result {
                Dispatched::Committed { .. } => "committed",
                Dispatched::PluginFailed(_) => "plugin_failed",
                Dispatched::Refused(_) => "refused",
                Dispatched::StoreFailed(_) => "store_failed",
                Dispatched::NoPlugin => "no_plugin",
            };
            metrics.event(trigger, &plugin_name, label);
            result
        })
    })
}

/// Attempts that run in parallel with the plugin's other events before an
/// event whose state keeps changing under it runs alone.
const OPTIMISTIC_ATTEMPTS: u32 = 2;
/// Attempts in all. Running alone cannot conflict with the plugin's own
/// events, only with an older version still finishing after a reload, so
/// this is never reached in practice; if it is, the event is refused
/// (not acknowledged), never half-done.
const MAX_ATTEMPTS: u32 = 8;

/// A plugin event's hold on its plugin's serial lock.
enum Turn<'a> {
    Shared(#[allow(dead_code)] tokio::sync::RwLockReadGuard<'a, ()>),
    Alone(#[allow(dead_code)] tokio::sync::RwLockWriteGuard<'a, ()>),
}

async fn run_job(
    job: Job,
    plugins: &Registry,
    outbox: &AnyStore,
    wakers: &Wakers,
    metrics: &crate::metrics::Metrics,
    budget: &OutcomeBudget,
) -> Dispatched {
    let Job {
        plugin: name,
        event,
        event_id,
        mut slot,
    } = job;
    // This version serves the event to the end, even if a reload
    // replaces it meanwhile.
    let Some(loaded) = plugins.get(&name) else {
        return Dispatched::NoPlugin;
    };
    let state: Arc<dyn StateStore> = Arc::new(OutboxState(outbox.clone()));
    let trigger = event.kind().to_owned();
    let event = Arc::new(event);
    // Optimistic first: events of one plugin run in parallel and each
    // commit checks that the state it read is unchanged. On a conflict the
    // event runs again on fresh state; after OPTIMISTIC_ATTEMPTS it runs
    // alone (no other event of the plugin runs or commits meanwhile), so it
    // cannot conflict again and an event is never dropped for contention.
    let mut attempt = 0;
    let (committed, response) = loop {
        attempt += 1;
        // A run again after a conflict waits for a slot like a new one.
        if let Some(slot) = slot.as_mut() {
            slot.retake().await;
        }
        let _turn = if attempt <= OPTIMISTIC_ATTEMPTS {
            Turn::Shared(loaded.serial.read().await)
        } else {
            Turn::Alone(loaded.serial.write().await)
        };
        // Several nodes on one PostgreSQL outbox: alone means alone across
        // the nodes too, from before the run reads its state to its commit.
        let mut alone = match outbox {
            AnyStore::Postgres(pg) if attempt > OPTIMISTIC_ATTEMPTS => {
                match pg.plugin_alone(&name).await {
                    Ok(a) => Some(a),
                    Err(e) => return Dispatched::StoreFailed(e.to_string()),
                }
            }
            _ => None,
        };
        // On this worker; an event that runs long moves off it by itself.
        let ran = loaded
            .plugin
            .run_async(&event, &event_id, state.clone())
            .await;
        let report = match ran {
            Ok(r) => {
                metrics.duration(&name, r.duration_us as f64 / 1e6);
                r
            }
            Err(e) => return Dispatched::PluginFailed(e.to_string()),
        };
        // The outcome is counted, then the slot let go: waiting for the
        // writer holds memory, not one of the trigger's runs.
        let _held = budget.hold(outcome_bytes(&report)).await;
        if let Some(slot) = slot.as_mut() {
            slot.release();
        }
        let call = Call {
            plugin: name.clone(),
            trigger: trigger.clone(),
            event_id: event_id.clone(),
            account: loaded.account.clone(),
            account_mailbox: loaded.mailbox.clone(),
            policy: loaded.policy.clone(),
            emails: report.outcome.emails,
            state_changes: report.state_changes,
            reads: report.reads,
            state_quota_bytes: Some(loaded.plugin.settings().limits.state_bytes),
        };
        let committed = match alone.as_mut() {
            Some(a) => a.commit(call).await,
            None => outbox.commit(call).await,
        };
        drop(alone);
        match committed {
            Err(OutboxError::Conflict(why)) if attempt < MAX_ATTEMPTS => {
                tracing::debug!(plugin = %name, event_id = %event_id, attempt, %why, "state changed meanwhile: running the event again");
                metrics.rerun(&name);
                continue;
            }
            other => break (other, report.outcome.response),
        }
    };
    match committed {
        Ok(done) => {
            if !done.queued.is_empty()
                && let Some(w) = wakers.get(&loaded.account)
            {
                w.notify_one();
            }
            tracing::info!(plugin = %name, event_id = %event_id, queued = done.queued.len(), duplicates = done.duplicates.len(), suppressed = done.suppressed.len(), "event committed");
            Dispatched::Committed {
                queued: done.queued.iter().map(|q| q.id).collect(),
                duplicates: done.duplicates.iter().map(|q| q.id).collect(),
                response,
            }
        }
        Err(OutboxError::Policy(mut reason)) => {
            sendbox_types::truncate_text(&mut reason, sendbox_runtime::MAX_ERROR_BYTES);
            tracing::warn!(plugin = %name, event_id = %event_id, %reason, "outcome refused by policy; nothing queued");
            Dispatched::Refused(reason)
        }
        Err(e) => {
            tracing::error!(plugin = %name, event_id = %event_id, error = %e, "outbox commit failed; nothing queued");
            Dispatched::StoreFailed(e.to_string())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::OutcomeBudget;
    use std::time::Duration;

    #[tokio::test]
    async fn an_outcome_larger_than_the_budget_takes_all_of_it_and_the_next_waits() {
        let budget = OutcomeBudget::new(4096);
        assert_eq!(budget.max_bytes(), 4096);
        let big = budget.hold(1 << 20).await;
        assert!(big.is_some());
        assert_eq!(budget.held_bytes(), 4096, "clamped to the whole budget");
        let waiting = tokio::time::timeout(Duration::from_millis(50), budget.hold(1)).await;
        assert!(waiting.is_err(), "nothing fits while it is held");
        drop(big);
        assert_eq!(budget.held_bytes(), 0);
        let small = budget.hold(1025).await;
        assert!(small.is_some());
        assert_eq!(budget.held_bytes(), 2048, "counted in whole KiB");
    }
}
