//! Counters for `/metrics`, in Prometheus text format: events by trigger,
//! plugin and result; plugin run time as a histogram; outbox depth by state;
//! delivery attempts by account and result; token refreshes by account;
//! reloads by result; bytes of outcomes awaiting their commit.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::{Arc, Mutex, PoisonError};

use sendbox_auth::TokenProvider;
use sendbox_delivery::WorkerStatus;
use sendbox_outbox::AnyStore;

use crate::daemon::OutcomeBudget;

/// Writes a metric family's `# HELP` and `# TYPE` lines.
fn family(out: &mut String, name: &str, help: &str, kind: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

/// Upper bounds of the plugin duration histogram, in seconds.
const BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
];

#[derive(Default)]
struct Histogram {
    counts: Vec<u64>,
    sum: f64,
    total: u64,
}

/// The daemon's counters.
#[derive(Default)]
pub struct Metrics {
    events: Mutex<BTreeMap<(String, String, String), u64>>,
    durations: Mutex<BTreeMap<String, Histogram>>,
    tokens: Mutex<BTreeMap<String, Arc<TokenProvider>>>,
    workers: Mutex<BTreeMap<String, Arc<WorkerStatus>>>,
    reloads: Mutex<BTreeMap<&'static str, u64>>,
    reruns: Mutex<BTreeMap<String, u64>>,
    outcomes: Mutex<Option<Arc<OutcomeBudget>>>,
}

impl Metrics {
    /// Counts one event's result (`committed`, `plugin_failed`, `refused`,
    /// `store_failed`).
    pub fn event(&self, trigger: &str, plugin: &str, result: &str) {
        let mut e = self.events.lock().unwrap_or_else(PoisonError::into_inner);
        *e.entry((trigger.into(), plugin.into(), result.into()))
            .or_default() += 1;
    }

    /// Records a plugin run's duration.
    pub fn duration(&self, plugin: &str, secs: f64) {
        let mut d = self
            .durations
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let h = d.entry(plugin.into()).or_insert_with(|| Histogram {
            counts: vec![0; BUCKETS.len()],
            ..Histogram::default()
        });
        for (i, b) in BUCKETS.iter().enumerate() {
            if secs <= *b {
                h.counts[i] += 1;
            }
        }
        h.sum += secs;
        h.total += 1;
    }

    /// Counts an event run again because the plugin state it read changed
    /// before its commit.
    pub fn rerun(&self, plugin: &str) {
        *self
            .reruns
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(plugin.into())
            .or_default() += 1;
    }

    /// Reports token refreshes for an account.
    pub fn token_provider(&self, account: &str, p: Arc<TokenProvider>) {
        self.tokens
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(account.into(), p);
    }

    /// Counts a reload: `applied` (everything in it took effect), `partial`
    /// (some plugin or account kept its previous version) or `refused` (the
    /// config did not validate; nothing changed).
    pub fn reload(&self, result: &'static str) {
        *self
            .reloads
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(result)
            .or_default() += 1;
    }

    /// Reports the bytes of outcomes waiting for their commit.
    pub fn outcome_budget(&self, budget: Arc<OutcomeBudget>) {
        *self.outcomes.lock().unwrap_or_else(PoisonError::into_inner) = Some(budget);
    }

    /// Reports an account's delivery attempts.
    pub fn worker(&self, account: &str, status: Arc<WorkerStatus>) {
        self.workers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(account.into(), status);
    }

    /// The text exposition.
    pub fn render(&self, outbox: &AnyStore) -> String {
        let mut out = String::new();
        if let AnyStore::Postgres(pg) = outbox {
            family(
                &mut out,
                "sendbox_node_info",
                "This node, among those sharing the PostgreSQL outbox.",
                "gauge",
            );
            let _ = writeln!(out, "sendbox_node_info{{node=\"{}\"}} 1", label(pg.node()));
        }
        family(
            &mut out,
            "sendbox_events_total",
            "Events handled, by trigger, plugin and result.",
            "counter",
        );
        for ((t, p, r), n) in self
            .events
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
        {
            let p = label(p);
            let _ = writeln!(
                out,
                "sendbox_events_total{{trigger=\"{t}\",plugin=\"{p}\",result=\"{r}\"}} {n}"
            );
        }
        family(
            &mut out,
            "sendbox_plugin_duration_seconds",
            "Plugin run time (fresh instance + handle).",
            "histogram",
        );
        for (p, h) in self
            .durations
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
        {
            let p = label(p);
            for (b, c) in BUCKETS.iter().zip(&h.counts) {
                let _ = writeln!(
                    out,
                    "sendbox_plugin_duration_seconds_bucket{{plugin=\"{p}\",le=\"{b}\"}} {c}"
                );
            }
            let _ = writeln!(
                out,
                "sendbox_plugin_duration_seconds_bucket{{plugin=\"{p}\",le=\"+Inf\"}} {}",
                h.total
            );
            let _ = writeln!(
                out,
                "sendbox_plugin_duration_seconds_sum{{plugin=\"{p}\"}} {}",
                h.sum
            );
            let _ = writeln!(
                out,
                "sendbox_plugin_duration_seconds_count{{plugin=\"{p}\"}} {}",
                h.total
            );
        }
        family(
            &mut out,
            "sendbox_state_conflicts_total",
            "Events run again because plugin state they read changed before their commit, by plugin.",
            "counter",
        );
        for (p, n) in self
            .reruns
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
        {
            let p = label(p);
            let _ = writeln!(out, "sendbox_state_conflicts_total{{plugin=\"{p}\"}} {n}");
        }
        let budget = self
            .outcomes
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        if let Some(b) = budget {
            family(
                &mut out,
                "sendbox_outcome_bytes_held",
                "Bytes of plugin outcomes held while they wait for their commit.",
                "gauge",
            );
            let _ = writeln!(out, "sendbox_outcome_bytes_held {}", b.held_bytes());
            family(
                &mut out,
                "sendbox_outcome_bytes_max",
                "Most bytes of plugin outcomes held at once ([daemon] max_held_outcome_bytes).",
                "gauge",
            );
            let _ = writeln!(out, "sendbox_outcome_bytes_max {}", b.max_bytes());
        }
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            family(
                &mut out,
                "sendbox_worker_threads",
                "Threads running triggers, plugins and delivery (one per core, or TOKIO_WORKER_THREADS).",
                "gauge",
            );
            let _ = writeln!(
                out,
                "sendbox_worker_threads {}",
                runtime.metrics().num_workers()
            );
        }
        family(
            &mut out,
            "sendbox_outbox_messages",
            "Messages in the outbox, by state (sent and dead are delivery results).",
            "gauge",
        );
        let depth = match outbox {
            AnyStore::Sqlite(o) => o.depth(),
            store => crate::daemon::wait_for(sendbox_outbox::Store::depth(store)),
        };
        if let Ok(depth) = depth {
            for (s, n) in depth {
                let _ = writeln!(
                    out,
                    "sendbox_outbox_messages{{state=\"{}\"}} {n}",
                    s.as_str()
                );
            }
        }
        family(
            &mut out,
            "sendbox_delivery_attempts_total",
            "Delivery attempts, by account and result (sent, retry, dead, account_refused).",
            "counter",
        );
        for (a, w) in self
            .workers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
        {
            let a = label(a);
            for (result, n) in w.attempts() {
                let _ = writeln!(
                    out,
                    "sendbox_delivery_attempts_total{{account=\"{a}\",result=\"{result}\"}} {n}"
                );
            }
        }
        family(
            &mut out,
            "sendbox_reloads_total",
            "Config and plugin reloads, by result (applied, partial, refused).",
            "counter",
        );
        let reloads = self
            .reloads
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        for result in ["applied", "partial", "refused"] {
            let n = reloads.get(result).copied().unwrap_or(0);
            let _ = writeln!(out, "sendbox_reloads_total{{result=\"{result}\"}} {n}");
        }
        family(
            &mut out,
            "sendbox_token_refreshes_total",
            "Access tokens fetched, by account.",
            "counter",
        );
        for (a, p) in self
            .tokens
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
        {
            let _ = writeln!(
                out,
                "sendbox_token_refreshes_total{{account=\"{}\"}} {}",
                label(a),
                p.refresh_count()
            );
        }
        out
    }
}

/// A label value as the text format wants it: `\`, `"` and line breaks
/// escaped (plugin, account and node names come from the operator's
/// config, and may hold any of them).
fn label(value: &str) -> std::borrow::Cow<'_, str> {
    if !value.contains(['\\', '"', '\n']) {
        return value.into();
    }
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
        .into()
}

#[cfg(test)]
mod label_tests {
    #[test]
    fn label_values_are_escaped() {
        assert_eq!(super::label("bridge"), "bridge");
        assert_eq!(super::label("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }
}
