//! Event → plugin → commit → answer: runs a job's plugin in a fresh
//! instance, commits its outcome (re-running it on fresh state when the
//! state it read changed meanwhile), wakes the account's worker, and says
//! what became of it.

use std::sync::Arc;

use sendbox_outbox::{AnyStore, Call, Outbox, OutboxError, Store};
use sendbox_runtime::{StateError, StateStore, Versioned};
use sendbox_triggers::{Dispatch, Dispatched, Job};

use super::registry::{Registry, Wakers};

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
) -> Dispatch {
    Arc::new(move |job: Job| {
        let plugins = plugins.clone();
        let outbox = outbox.clone();
        let wakers = wakers.clone();
        let metrics = metrics.clone();
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
            let result = run_job(job, &plugins, &outbox, &wakers, &metrics).await;
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
) -> Dispatched {
    let Job {
        plugin: name,
        event,
        event_id,
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
