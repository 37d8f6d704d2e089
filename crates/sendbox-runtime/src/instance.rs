//! One event in a fresh instance: the store with its limits, the call, and
//! the classification of whatever went wrong.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;
use tracing::Instrument;
use wasmtime::component::ResourceTable;
use wasmtime::{Engine, Store, Trap, UpdateDeadline};
use wasmtime_wasi::WasiCtx;

use crate::convert::{from_wit_outcome, from_wit_verdict, to_wit_event, to_wit_submitted};
use crate::host::{HostState, LogLevel, LogLine, LogSource, TimeLimit};
use crate::limiter::MemoryLimiter;
use crate::placement::{self, Meter, Placement};
use crate::{
    CompileSource, EPOCH_TICK, Event, Limits, MAX_ERROR_BYTES, MAX_RANDOM_BYTES,
    MAX_RESOURCES_PER_INSTANCE, Outcome, ReadSet, RunError, RunFailure, StateChange, StateStore,
    bindings, clock, output, state, validate,
};
use sendbox_types::{Submitted, Verdict, truncate_text};

/// The operator's settings for one plugin.
#[derive(Debug, Clone, Default)]
pub struct PluginSettings {
    /// Values the plugin reads with `host.config(key)`. Never secrets.
    pub config: BTreeMap<String, String>,
    /// Resource limits.
    pub limits: Limits,
}

pub(crate) struct PluginInner {
    pub(crate) name: String,
    pub(crate) hash: String,
    pub(crate) source: CompileSource,
    pub(crate) pre: bindings::HookPre<HostState>,
    /// For plugins that export `screen` (world `relay-hook`).
    pub(crate) screen: Option<crate::relay_bindings::RelayHookPre<HostState>>,
    pub(crate) engine: Engine,
    pub(crate) settings: PluginSettings,
    /// What the component says about itself, if it carries a manifest.
    pub(crate) manifest: Option<sendbox_types::manifest::Manifest>,
    /// Keeps the runtime's shared entry for these bytes alive while this
    /// plugin is loaded.
    pub(crate) _component: Arc<wasmtime::component::Component>,
}

/// A loaded plugin, ready to run events. Cheap to clone; clones share the
/// compiled code.
#[derive(Clone)]
pub struct Plugin {
    pub(crate) inner: Arc<PluginInner>,
}

impl std::fmt::Debug for Plugin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Plugin")
            .field("name", &self.inner.name)
            .field("sha256", &self.inner.hash)
            .finish_non_exhaustive()
    }
}

/// The result of a successful call.
#[derive(Debug, Clone, Serialize)]
pub struct RunReport {
    /// What the plugin returned, already validated.
    pub outcome: Outcome,
    /// State writes to commit together with the outcome.
    pub state_changes: Vec<StateChange>,
    /// What the call read from committed state; the commit must check that
    /// none of it changed meanwhile, or run the event again.
    pub reads: ReadSet,
    /// What the plugin logged.
    pub logs: Vec<LogLine>,
    /// Log bytes dropped because of `log_bytes_per_event`.
    pub log_bytes_dropped: u64,
    /// Wall time of instantiate + handle, in microseconds.
    pub duration_us: u64,
}

impl Plugin {
    /// The plugin's name from the config.
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// SHA-256 of the component.
    pub fn sha256(&self) -> &str {
        &self.inner.hash
    }

    /// Whether the compiled code came from the cache.
    pub fn compile_source(&self) -> CompileSource {
        self.inner.source
    }

    /// The plugin's settings.
    pub fn settings(&self) -> &PluginSettings {
        &self.inner.settings
    }

    /// What the component says about itself (name, version, description,
    /// the config keys it reads), if it carries a manifest.
    pub fn manifest(&self) -> Option<&sendbox_types::manifest::Manifest> {
        self.inner.manifest.as_ref()
    }

    /// Config keys the operator set that the plugin's manifest does not
    /// declare (likely typos); none when it carries no manifest.
    pub fn undeclared_config_keys(&self) -> Vec<String> {
        self.manifest().map_or_else(Vec::new, |m| {
            let set = &self.inner.settings.config;
            m.undeclared(set).into_iter().map(str::to_owned).collect()
        })
    }

    /// Whether it also screens SMTP submissions (exports `screen`, world
    /// `relay-hook`).
    pub fn screens(&self) -> bool {
        self.inner.screen.is_some()
    }

    /// Runs one event in a fresh instance, blocking the calling thread for
    /// at most about `wall_ms_per_event`: for tools, tests and blocking
    /// threads (on a worker of a multi-threaded Tokio runtime it hands the
    /// worker's role on first; a current-thread runtime cannot). In async
    /// code use [`Plugin::run_async`].
    ///
    /// On success the outcome is validated and the state changes are
    /// returned, not applied. On failure nothing of the call is kept.
    pub fn run(
        &self,
        event: &Event,
        event_id: &str,
        state: Arc<dyn StateStore>,
    ) -> Result<RunReport, RunError> {
        placement::block_on(self.run_in(event, event_id, state, Placement::Blocking))
    }

    /// Runs one event in a fresh instance, as [`Plugin::run`] does, on the
    /// async worker that awaits it: a short event costs no thread hand-off;
    /// one still running at the next epoch tick moves off the worker (see
    /// `placement`). Needs a Tokio runtime; on a multi-threaded one a long
    /// event never holds a worker for more than a tick.
    pub async fn run_async(
        &self,
        event: &Event,
        event_id: &str,
        state: Arc<dyn StateStore>,
    ) -> Result<RunReport, RunError> {
        self.run_in(event, event_id, state, Placement::Worker).await
    }

    async fn run_in(
        &self,
        event: &Event,
        event_id: &str,
        state: Arc<dyn StateStore>,
        placement: Placement,
    ) -> Result<RunReport, RunError> {
        let span = tracing::info_span!("plugin_run", plugin = %self.inner.name, event_id, trigger = event.kind());
        async move {
            let mut call = self.begin(state, placement);
            let mut instantiating = true;
            let meter = call.meter.clone();
            let result = placement::drive(&meter, async {
                let hook = self.inner.pre.instantiate_async(&mut call.store).await?;
                instantiating = false;
                Ok(hook
                    .call_handle(&mut call.store, &to_wit_event(event))
                    .await?
                    .map(from_wit_outcome))
            })
            .await;
            let done = self.end(event_id, call, result, instantiating)?;
            self.checked(event_id, done.value, done.store, done.started, |o| {
                o.emails.len()
            })
            .map(|(outcome, parts)| RunReport {
                outcome,
                state_changes: parts.state_changes,
                reads: parts.reads,
                logs: parts.logs,
                log_bytes_dropped: parts.log_bytes_dropped,
                duration_us: parts.duration_us,
            })
        }
        .instrument(span)
        .await
    }

    /// Screens one message submitted to an SMTP listener, in a fresh
    /// instance, as [`Plugin::run`] runs an event, blocking the calling
    /// thread. In async code use [`Plugin::screen_async`].
    pub fn screen(
        &self,
        message: &Submitted,
        event_id: &str,
        state: Arc<dyn StateStore>,
    ) -> Result<ScreenReport, RunError> {
        placement::block_on(self.screen_in(message, event_id, state, Placement::Blocking))
    }

    /// Screens one message as [`Plugin::run_async`] runs an event. A plugin
    /// that does not export `screen` fails with [`RunFailure::Host`].
    pub async fn screen_async(
        &self,
        message: &Submitted,
        event_id: &str,
        state: Arc<dyn StateStore>,
    ) -> Result<ScreenReport, RunError> {
        self.screen_in(message, event_id, state, Placement::Worker)
            .await
    }

    async fn screen_in(
        &self,
        message: &Submitted,
        event_id: &str,
        state: Arc<dyn StateStore>,
        placement: Placement,
    ) -> Result<ScreenReport, RunError> {
        let span = tracing::info_span!("plugin_screen", plugin = %self.inner.name, event_id, listener = %message.listener);
        let Some(pre) = &self.inner.screen else {
            let _enter = span.enter();
            return Err(RunError {
                plugin: self.inner.name.clone(),
                event_id: event_id.to_owned(),
                cause: RunFailure::Host(
                    "the plugin does not export `screen` (world relay-hook)".into(),
                ),
                logs: Vec::new(),
            });
        };
        async move {
            let raw_limit = self.inner.settings.limits.memory_bytes / 4;
            let mut call = self.begin(state, placement);
            let mut instantiating = true;
            let meter = call.meter.clone();
            let result = placement::drive(&meter, async {
                let hook = pre.instantiate_async(&mut call.store).await?;
                instantiating = false;
                Ok(hook
                    .call_screen(&mut call.store, &to_wit_submitted(message, raw_limit))
                    .await?
                    .map(from_wit_verdict))
            })
            .await;
            let done = self.end(event_id, call, result, instantiating)?;
            let emails = |v: &Verdict| match v {
                Verdict::Replace(e) => e.len(),
                _ => 0,
            };
            self.checked(event_id, done.value, done.store, done.started, emails)
                .map(|(verdict, parts)| ScreenReport {
                    verdict,
                    state_changes: parts.state_changes,
                    reads: parts.reads,
                    logs: parts.logs,
                    log_bytes_dropped: parts.log_bytes_dropped,
                    duration_us: parts.duration_us,
                })
        }
        .instrument(span)
        .await
    }

    /// Validates what a call returned (its emails against the limits) and
    /// takes the state changes, reads and logs from its store.
    fn checked<T: Validated>(
        &self,
        event_id: &str,
        value: T,
        mut store: Store<HostState>,
        started: Instant,
        emails: impl Fn(&T) -> usize,
    ) -> Result<(T, Parts), RunError> {
        if let Err(cause) = value.validate(&self.inner.settings.limits) {
            let logs = std::mem::take(&mut store.data_mut().logs);
            tracing::warn!(kind = cause.kind(), error = %cause, "plugin outcome refused");
            return Err(RunError {
                plugin: self.inner.name.clone(),
                event_id: event_id.to_owned(),
                cause,
                logs,
            });
        }
        let data = store.into_data();
        let duration_us = started.elapsed().as_micros() as u64;
        tracing::debug!(emails = emails(&value), duration_us, "plugin run ok");
        let (state_changes, reads) = data.overlay.finish();
        Ok((
            value,
            Parts {
                state_changes,
                reads,
                logs: data.logs,
                log_bytes_dropped: data.log_bytes_dropped,
                duration_us,
            },
        ))
    }

    /// A fresh store with the plugin's limits, its output pipes, and the
    /// time limits armed.
    fn begin(&self, state: Arc<dyn StateStore>, placement: Placement) -> Call {
        let started = Instant::now();
        let limits = &self.inner.settings.limits;
        let stdout = output::BoundedPipe::new(limits.log_bytes_per_event as usize);
        let stderr = output::BoundedPipe::new(limits.log_bytes_per_event as usize);
        // An empty context: no env, args, preopens, stdin or network.
        let wasi = WasiCtx::builder()
            .monotonic_clock(clock::EventClock::new(started))
            .stdout(stdout.clone())
            .stderr(stderr.clone())
            .allow_tcp(false)
            .allow_udp(false)
            .allow_ip_name_lookup(false)
            .max_random_size(MAX_RANDOM_BYTES)
            .build();
        let mut table = ResourceTable::new();
        table.set_max_capacity(MAX_RESOURCES_PER_INSTANCE);
        let mut store = Store::new(
            &self.inner.engine,
            HostState {
                wasi,
                table,
                limiter: MemoryLimiter::new(limits.memory_bytes),
                plugin: self.inner.clone(),
                overlay: state::Overlay::new(state, self.inner.name.clone(), limits.state_bytes),
                logs: Vec::new(),
                log_bytes: 0,
                log_bytes_dropped: 0,
                state_error: None,
                started,
                deadline: started + Duration::from_millis(limits.cpu_ms_per_event),
                slept_past_deadline: false,
                stopped: None,
            },
        );
        store.limiter(|s| &mut s.limiter);
        // The epoch ticks on the wall; CPU time can only be less, so the
        // first check comes when the CPU limit could first be reached, and
        // each check looks at what the call really used. On a worker the
        // first check comes at the next tick, to move the call off it.
        let meter = Arc::new(Meter::new(placement));
        let cpu_limit = Duration::from_millis(limits.cpu_ms_per_event);
        let wall_deadline = started + Duration::from_millis(limits.wall_ms());
        store.set_epoch_deadline(match placement {
            Placement::Worker => 1,
            Placement::Blocking => ticks(cpu_limit),
        });
        let metered = meter.clone();
        store.epoch_deadline_callback(move |mut ctx| {
            let used = metered.used();
            let now = Instant::now();
            let stop = if used >= cpu_limit {
                Some(TimeLimit::Cpu)
            } else if now >= wall_deadline {
                Some(TimeLimit::Wall)
            } else {
                None
            };
            if let Some(limit) = stop {
                ctx.data_mut().stopped = Some((limit, used));
                return Ok(UpdateDeadline::Interrupt);
            }
            let left = ticks((cpu_limit - used).min(wall_deadline - now));
            if metered.inline() {
                metered.ask_for_thread();
                return Ok(UpdateDeadline::Yield(left));
            }
            Ok(UpdateDeadline::Continue(left))
        });
        store.set_hostcall_fuel(usize::try_from(limits.outcome_bytes).unwrap_or(usize::MAX));
        Call {
            store,
            stdout,
            stderr,
            started,
            meter,
        }
    }

    /// Collects what the guest printed and classifies whatever went wrong.
    fn end<T>(
        &self,
        event_id: &str,
        call: Call,
        result: wasmtime::Result<Result<T, String>>,
        instantiating: bool,
    ) -> Result<Executed<T>, RunError> {
        let Call {
            mut store,
            stdout,
            stderr,
            started,
            meter: _,
        } = call;
        let limits = &self.inner.settings.limits;
        let fail = |cause: RunFailure, logs: Vec<LogLine>| RunError {
            plugin: self.inner.name.clone(),
            event_id: event_id.to_owned(),
            cause,
            logs,
        };
        // Collect what the guest printed, whatever the result.
        for (pipe, source, level) in [
            (&stdout, LogSource::Stdout, LogLevel::Info),
            (&stderr, LogSource::Stderr, LogLevel::Warn),
        ] {
            let (bytes, dropped) = pipe.take();
            let data = store.data_mut();
            data.log_bytes_dropped += dropped;
            for line in String::from_utf8_lossy(&bytes).lines() {
                if !line.trim().is_empty() {
                    data.record_log(level, source, line.to_owned());
                }
            }
        }

        let value = match result {
            Ok(_) if store.data().slept_past_deadline => {
                let logs = std::mem::take(&mut store.data_mut().logs);
                let cause = RunFailure::Timeout {
                    limit_ms: limits.cpu_ms_per_event,
                };
                tracing::warn!(kind = cause.kind(), error = %cause, "plugin slept past its time limit");
                return Err(fail(cause, logs));
            }
            Ok(Ok(value)) => value,
            Ok(Err(mut message)) => {
                truncate_text(&mut message, MAX_ERROR_BYTES);
                let logs = std::mem::take(&mut store.data_mut().logs);
                tracing::warn!(error = %message, "plugin returned an error");
                return Err(fail(RunFailure::Plugin(message), logs));
            }
            Err(e) => {
                let cause = classify(&e, instantiating, &mut store, limits);
                let logs = std::mem::take(&mut store.data_mut().logs);
                tracing::warn!(kind = cause.kind(), error = %cause, "plugin run failed");
                return Err(fail(cause, logs));
            }
        };
        Ok(Executed {
            value,
            store,
            started,
        })
    }
}

/// A store made for one call, with what it needs after the call.
struct Call {
    store: Store<HostState>,
    stdout: output::BoundedPipe,
    stderr: output::BoundedPipe,
    started: Instant,
    meter: Arc<Meter>,
}

/// A call that returned: its value and its store.
struct Executed<T> {
    value: T,
    store: Store<HostState>,
    started: Instant,
}

/// What every successful call hands back besides its value.
struct Parts {
    state_changes: Vec<StateChange>,
    reads: ReadSet,
    logs: Vec<LogLine>,
    log_bytes_dropped: u64,
    duration_us: u64,
}

/// What a call returns that must be checked against the limits.
trait Validated {
    fn validate(&self, limits: &Limits) -> Result<(), RunFailure>;
}

impl Validated for Outcome {
    fn validate(&self, limits: &Limits) -> Result<(), RunFailure> {
        validate::outcome(self, limits)
    }
}

impl Validated for Verdict {
    fn validate(&self, limits: &Limits) -> Result<(), RunFailure> {
        match self {
            Verdict::Relay => Ok(()),
            Verdict::Replace(emails) => validate::outcome(
                &Outcome {
                    emails: emails.clone(),
                    response: None,
                },
                limits,
            ),
            Verdict::Refuse { .. } => Ok(()),
        }
    }
}

/// The result of a successful `screen`.
#[derive(Debug, Clone)]
pub struct ScreenReport {
    /// What the plugin decided, already validated.
    pub verdict: Verdict,
    /// State writes to commit together with the verdict.
    pub state_changes: Vec<StateChange>,
    /// What the call read from committed state.
    pub reads: ReadSet,
    /// What the plugin logged.
    pub logs: Vec<LogLine>,
    /// Log bytes dropped because of `log_bytes_per_event`.
    pub log_bytes_dropped: u64,
    /// Wall time of instantiate + screen, in microseconds.
    pub duration_us: u64,
}

/// Turns a wasmtime error into the reason an operator can act on.
fn classify(
    e: &wasmtime::Error,
    instantiating: bool,
    store: &mut Store<HostState>,
    limits: &Limits,
) -> RunFailure {
    let data = store.data_mut();
    if data.limiter.hit {
        return RunFailure::MemoryLimit {
            limit_bytes: limits.memory_bytes,
        };
    }
    match data.state_error.take() {
        Some(state::StateFailure::Limit { limit, detail }) => {
            return RunFailure::Limit { limit, detail };
        }
        Some(err @ state::StateFailure::Store(_)) => return RunFailure::Host(err.to_string()),
        None => {}
    }
    // By type where wasmtime exposes one.
    if e.downcast_ref::<Trap>() == Some(&Trap::Interrupt) {
        return match data.stopped {
            Some((TimeLimit::Wall, used)) => RunFailure::WallTimeout {
                limit_ms: limits.wall_ms(),
                cpu_ms: limits.cpu_ms_per_event,
                cpu_used_ms: used.as_millis() as u64,
            },
            _ => RunFailure::Timeout {
                limit_ms: limits.cpu_ms_per_event,
            },
        };
    }
    let table_full = matches!(
        e.downcast_ref::<wasmtime::component::ResourceTableError>(),
        Some(wasmtime::component::ResourceTableError::Full)
    ) || format!("{e:#}").contains("resource table has no free");
    if table_full {
        return RunFailure::Limit {
            limit: "resources",
            detail: format!("more than {MAX_RESOURCES_PER_INSTANCE} open host resources"),
        };
    }
    // By text where its type is private to wasmtime (hostcall fuel) or
    // wasmtime-wasi (the random-bytes cap). The causes' text only: `{:?}`
    // would also print (and so resolve) a native backtrace when
    // RUST_BACKTRACE is set, which maps the whole binary's debug info:
    // hundreds of MB per failed event.
    let text = format!("{e:#}");
    if text.contains("fuel allocated for hostcalls has been exhausted") {
        return RunFailure::Limit {
            limit: "outcome_bytes",
            detail: format!(
                "the plugin tried to hand the host more than {} bytes in one call",
                limits.outcome_bytes
            ),
        };
    }
    if text.contains("resource table has no free capacity") {
        return RunFailure::Limit {
            limit: "resources",
            detail: format!("more than {MAX_RESOURCES_PER_INSTANCE} open host resources"),
        };
    }
    if text.contains("requested len") && text.contains("exceeds limit") {
        return RunFailure::Limit {
            limit: "random_bytes",
            detail: format!("asked wasi:random for more than {MAX_RANDOM_BYTES} bytes at once"),
        };
    }
    if instantiating && e.downcast_ref::<Trap>().is_none() {
        return RunFailure::Host(format!("cannot create an instance: {e:#}"));
    }
    // A panic prints "thread .. panicked at FILE:LINE:COL:" and then its
    // message on stderr before trapping: quote both.
    let stderr: Vec<&str> = data
        .logs
        .iter()
        .filter(|l| l.source == LogSource::Stderr)
        .map(|l| l.message.as_str())
        .collect();
    let panic = stderr
        .iter()
        .rposition(|l| l.contains("panicked at"))
        .map(|i| {
            let end = (i + 3).min(stderr.len());
            stderr[i..end]
                .iter()
                .filter(|l| !l.starts_with("note: run with `RUST_BACKTRACE"))
                .copied()
                .collect::<Vec<_>>()
                .join(" ")
        });
    let mut message = match e.downcast_ref::<Trap>() {
        Some(trap) => trap.to_string(),
        None => format!("{e:#}"),
    };
    if let Some(p) = panic {
        message = format!("{message} ({p})");
    }
    RunFailure::Trap { message }
}

/// Epoch ticks covering `time`, at least one.
fn ticks(time: Duration) -> u64 {
    (time.as_millis() as u64)
        .div_ceil(EPOCH_TICK.as_millis() as u64)
        .max(1)
}
