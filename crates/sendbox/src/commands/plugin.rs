//! `sendbox plugin run` and `sendbox plugin inspect`: work with a component
//! on its own, without a config file, an outbox or a transport.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::Args;
use sendbox_runtime::{
    Bytes, Event, Limits, LogLine, MemoryState, PluginSettings, RunReport, Runtime, RuntimeOptions,
    StateChange,
};
use serde::Serialize;

use crate::exit::{self, coded};

/// `sendbox plugin run <file.wasm> --event <event.json>`
#[derive(Debug, Args)]
pub struct RunArgs {
    /// The plugin component (`.wasm`).
    pub wasm: PathBuf,
    /// The event as JSON (see README, "Event JSON"); `-` reads stdin.
    #[arg(long, short)]
    pub event: PathBuf,
    /// A plugin config value, as `key=value`; repeatable.
    #[arg(long = "config", short = 'c', value_name = "KEY=VALUE")]
    pub config: Vec<String>,
    /// A limit, as `name=value` (e.g. `cpu_ms_per_event=200`); repeatable.
    #[arg(long = "limit", value_name = "NAME=VALUE")]
    pub limits: Vec<String>,
    /// The plugin's state before the event: a JSON object of key to value
    /// (string, or `{"base64": ...}`).
    #[arg(long)]
    pub state: Option<PathBuf>,
    /// After a successful run, write the changed state back to `--state`.
    #[arg(long, requires = "state")]
    pub write_state: bool,
    /// The plugin name used in logs and state (default: the file stem).
    #[arg(long)]
    pub name: Option<String>,
    /// Compiled-code cache folder.
    #[arg(long, env = "SENDBOX_CACHE_DIR")]
    pub cache_dir: Option<PathBuf>,
    /// Compile without reading or writing the cache.
    #[arg(long)]
    pub no_cache: bool,
}

/// What `plugin run` prints.
#[derive(Debug, Serialize)]
struct RunOutput {
    plugin: String,
    ok: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<ErrorOutput>,
    #[serde(skip_serializing_if = "Option::is_none")]
    outcome: Option<sendbox_runtime::Outcome>,
    state_changes: Vec<StateChange>,
    logs: Vec<LogLine>,
    #[serde(skip_serializing_if = "Option::is_none")]
    duration_us: Option<u64>,
}

#[derive(Debug, Serialize)]
struct ErrorOutput {
    kind: &'static str,
    message: String,
}

fn read_input(path: &Path) -> anyhow::Result<String> {
    if path == Path::new("-") {
        let mut s = String::new();
        std::io::stdin()
            .read_to_string(&mut s)
            .context("reading the event from stdin")?;
        return Ok(s);
    }
    std::fs::read_to_string(path).map_err(|e| {
        coded(
            exit::EX_NOINPUT,
            format!("cannot read {}: {e}", path.display()),
        )
    })
}

pub(crate) fn parse_pairs(
    pairs: &[String],
    flag: &str,
) -> anyhow::Result<BTreeMap<String, String>> {
    pairs
        .iter()
        .map(|p| {
            p.split_once('=')
                .map(|(k, v)| (k.trim().to_owned(), v.to_owned()))
                .ok_or_else(|| {
                    coded(
                        exit::EX_CONFIG,
                        format!("{flag} {p:?} is not KEY=VALUE (e.g. {flag} to=ops@example.com)"),
                    )
                })
        })
        .collect()
}

fn parse_limits(pairs: &[String]) -> anyhow::Result<Limits> {
    let map = parse_pairs(pairs, "--limit")?;
    let mut table = toml::Table::new();
    for (k, v) in map {
        let n: i64 = v.parse().map_err(|_| {
            coded(
                exit::EX_CONFIG,
                format!("--limit {k}={v}: the value must be a whole number"),
            )
        })?;
        table.insert(k, toml::Value::Integer(n));
    }
    let limits: Limits = toml::Value::Table(table)
        .try_into()
        .map_err(|e| coded(exit::EX_CONFIG, format!("--limit: {e}")))?;
    limits
        .validate()
        .map_err(|e| coded(exit::EX_CONFIG, format!("--limit: {e}")))?;
    Ok(limits)
}

pub(crate) fn runtime(cache_dir: Option<PathBuf>, no_cache: bool) -> anyhow::Result<Runtime> {
    let cache_dir = if no_cache {
        None
    } else {
        cache_dir.or_else(crate::cli::default_cache_dir)
    };
    Runtime::new(RuntimeOptions {
        cache_dir,
        max_concurrent_instances: 4,
    })
    .map_err(|e| coded(exit::EX_SOFTWARE, e.to_string()))
}

impl RunArgs {
    /// Runs the event and prints the outcome.
    pub fn run(self) -> anyhow::Result<ExitCode> {
        let name = self.name.clone().unwrap_or_else(|| {
            self.wasm
                .file_stem()
                .map(|s| s.to_string_lossy().replace('_', "-"))
                .unwrap_or_else(|| "plugin".into())
        });
        let event_text = read_input(&self.event)?;
        let event: Event = serde_json::from_str(&event_text).map_err(|e| {
            coded(
                exit::EX_DATAERR,
                format!(
                    "{}: not a valid event: {e} (expected {{\"file\": ...}}, {{\"webhook\": ...}} or {{\"schedule\": ...}}; see README \"Event JSON\")",
                    self.event.display()
                ),
            )
        })?;
        let settings = PluginSettings {
            config: parse_pairs(&self.config, "--config")?,
            limits: parse_limits(&self.limits)?,
        };
        let store = Arc::new(MemoryState::new());
        if let Some(path) = &self.state {
            let initial = load_state(path)?;
            let changes: Vec<StateChange> = initial
                .into_iter()
                .map(|(key, value)| StateChange::Set { key, value })
                .collect();
            store.apply(&name, &changes);
        }

        let rt = runtime(self.cache_dir.clone(), self.no_cache)?;
        let plugin = rt
            .load_file(&name, &self.wasm, settings)
            .map_err(|e| coded(exit::EX_DATAERR, e.to_string()))?;
        let result = plugin.run(&event, "dry-run", store.clone());
        let (output, code) = match result {
            Ok(RunReport {
                outcome,
                state_changes,
                logs,
                duration_us,
                ..
            }) => {
                if self.write_state
                    && let Some(path) = &self.state
                {
                    store.apply(&name, &state_changes);
                    save_state(path, &store.entries(&name))?;
                }
                (
                    RunOutput {
                        plugin: name,
                        ok: true,
                        error: None,
                        outcome: Some(outcome),
                        state_changes,
                        logs,
                        duration_us: Some(duration_us),
                    },
                    exit::OK,
                )
            }
            Err(err) => (
                RunOutput {
                    plugin: name,
                    ok: false,
                    error: Some(ErrorOutput {
                        kind: err.cause.kind(),
                        message: err.to_string(),
                    }),
                    outcome: None,
                    state_changes: Vec::new(),
                    logs: err.logs,
                    duration_us: None,
                },
                exit::PLUGIN_FAILED,
            ),
        };
        let mut out = std::io::stdout().lock();
        serde_json::to_writer_pretty(&mut out, &output)?;
        writeln!(out)?;
        Ok(ExitCode::from(code))
    }
}

fn load_state(path: &Path) -> anyhow::Result<BTreeMap<String, Bytes>> {
    if !path.exists() {
        return Ok(BTreeMap::new());
    }
    let text = read_input(path)?;
    serde_json::from_str(&text).map_err(|e| {
        coded(
            exit::EX_DATAERR,
            format!(
                "{}: not a state file: {e} (expected a JSON object of key to string or {{\"base64\": ...}})",
                path.display()
            ),
        )
    })
}

fn save_state(path: &Path, entries: &BTreeMap<String, Vec<u8>>) -> anyhow::Result<()> {
    let map: BTreeMap<&String, Bytes> =
        entries.iter().map(|(k, v)| (k, Bytes(v.clone()))).collect();
    let json = serde_json::to_vec_pretty(&map)?;
    std::fs::write(path, json).with_context(|| format!("writing {}", path.display()))
}

/// `sendbox plugin inspect <file.wasm>`
#[derive(Debug, Args)]
pub struct InspectArgs {
    /// The plugin component (`.wasm`).
    pub wasm: PathBuf,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
    /// Compiled-code cache folder.
    #[arg(long, env = "SENDBOX_CACHE_DIR")]
    pub cache_dir: Option<PathBuf>,
    /// Compile without reading or writing the cache.
    #[arg(long)]
    pub no_cache: bool,
}

impl InspectArgs {
    /// Prints the inspection.
    pub fn run(self) -> anyhow::Result<ExitCode> {
        let bytes = std::fs::read(&self.wasm).map_err(|e| {
            coded(
                exit::EX_NOINPUT,
                format!("cannot read {}: {e}", self.wasm.display()),
            )
        })?;
        let rt = runtime(self.cache_dir, self.no_cache)?;
        let name = self
            .wasm
            .file_stem()
            .map(|s| s.to_string_lossy().replace('_', "-"))
            .unwrap_or_else(|| "plugin".into());
        let inspection = rt
            .inspect(&name, &bytes)
            .map_err(|e| coded(exit::EX_DATAERR, e.to_string()))?;
        let mut out = std::io::stdout().lock();
        if self.json {
            serde_json::to_writer_pretty(&mut out, &inspection)?;
            writeln!(out)?;
        } else {
            writeln!(out, "file:     {}", self.wasm.display())?;
            writeln!(out, "sha256:   {}", inspection.sha256)?;
            writeln!(
                out,
                "world:    {} ({})",
                inspection.world,
                if inspection.implements_world {
                    "implemented"
                } else {
                    "NOT implemented"
                }
            )?;
            if let Some(p) = &inspection.problem {
                writeln!(out, "problem:  {p}")?;
            }
            match &inspection.manifest {
                Some(m) => {
                    writeln!(out, "plugin:   {} {}", m.name, m.version)?;
                    if let Some(d) = &m.description {
                        writeln!(out, "about:    {d}")?;
                    }
                    writeln!(out, "config:")?;
                    if m.config.is_empty() {
                        writeln!(out, "  (reads no config keys)")?;
                    }
                    for (key, k) in &m.config {
                        let how = match (&k.default, k.required) {
                            (_, true) => "required".to_owned(),
                            (Some(d), false) => format!("default {d:?}"),
                            (None, false) => "optional".to_owned(),
                        };
                        writeln!(out, "  {key} ({how}): {}", k.description)?;
                    }
                }
                None => writeln!(
                    out,
                    "plugin:   (no self-description: build it with `sendbox plugin build` to carry its name, version and config keys)"
                )?,
            }
            writeln!(out, "exports:")?;
            for e in &inspection.exports {
                writeln!(out, "  {e}")?;
            }
            writeln!(out, "imports:")?;
            for i in &inspection.imports {
                writeln!(
                    out,
                    "  {} {}",
                    match i.linked {
                        sendbox_runtime::Linked::Offered => "ok     ",
                        sendbox_runtime::Linked::Denied => "denied ",
                        sendbox_runtime::Linked::Refused => "REFUSED",
                    },
                    i.name
                )?;
            }
        }
        Ok(ExitCode::from(if inspection.implements_world {
            exit::OK
        } else {
            exit::EX_DATAERR
        }))
    }
}
