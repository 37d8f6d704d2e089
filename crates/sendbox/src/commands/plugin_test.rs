//! `sendbox plugin test [DIR]`: runs every case of a plugin folder against
//! its built component and compares what it gives with what is expected —
//! the emails, the webhook answer and the state writes — printing a
//! line-by-line diff of the JSON when they differ; `--bless` writes what it
//! gives as the new expectation.
//!
//! A case is an event and its expectation: `sample-event.json` with
//! `expected-outcome.json` (what `sendbox plugin new` writes), and each
//! `tests/NAME.event.json` with `tests/NAME.expected.json`.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use clap::Args;
use sendbox_runtime::{Event, MemoryState, PluginSettings};

use crate::commands::plugin::{parse_pairs, runtime};
use crate::exit::{self, coded};

/// `sendbox plugin test`
#[derive(Debug, Args)]
pub struct TestArgs {
    /// The plugin's folder.
    #[arg(default_value = ".")]
    pub dir: PathBuf,
    /// The component. Default `<DIR>/<folder name>.wasm` (what `sendbox
    /// plugin build` writes).
    #[arg(long)]
    pub wasm: Option<PathBuf>,
    /// A plugin config value, as `key=value`; repeatable.
    #[arg(short, long = "config", value_name = "KEY=VALUE")]
    pub config: Vec<String>,
    /// Write what each case gives as its expectation.
    #[arg(long)]
    pub bless: bool,
}

/// The cases of `dir`: (name, event file, expectation file).
fn cases(dir: &Path) -> Vec<(String, PathBuf, PathBuf)> {
    let mut found = Vec::new();
    if dir.join("sample-event.json").is_file() {
        found.push((
            "sample".to_owned(),
            dir.join("sample-event.json"),
            dir.join("expected-outcome.json"),
        ));
    }
    let mut more: Vec<PathBuf> = std::fs::read_dir(dir.join("tests"))
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.to_string_lossy().ends_with(".event.json"))
        .collect();
    more.sort();
    for event in more {
        let file = event
            .file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .into_owned();
        let name = file.trim_end_matches(".event.json").to_owned();
        let expected = event.with_file_name(format!("{name}.expected.json"));
        found.push((name, event, expected));
    }
    found
}

/// What a case gave: the outcome, with `state_changes` when it wrote any,
/// or `{"error": ...}` when the plugin failed.
fn gave(plugin: &sendbox_runtime::Plugin, event: &Event) -> serde_json::Value {
    match plugin.run(event, "test", Arc::new(MemoryState::new())) {
        Ok(report) => {
            let mut v = serde_json::to_value(&report.outcome).unwrap_or_default();
            if !report.state_changes.is_empty()
                && let Some(map) = v.as_object_mut()
            {
                map.insert(
                    "state_changes".into(),
                    serde_json::to_value(&report.state_changes).unwrap_or_default(),
                );
            }
            v
        }
        Err(e) => serde_json::json!({ "error": e.cause.to_string() }),
    }
}

/// Lines of `a` and `b` as a diff: `-` only in the expectation, `+` only in
/// what the plugin gave, ` ` in both (longest common subsequence).
fn diff(expected: &str, actual: &str) -> String {
    let (a, b): (Vec<&str>, Vec<&str>) = (expected.lines().collect(), actual.lines().collect());
    let mut lcs = vec![vec![0usize; b.len() + 1]; a.len() + 1];
    for i in (0..a.len()).rev() {
        for j in (0..b.len()).rev() {
            lcs[i][j] = if a[i] == b[j] {
                lcs[i + 1][j + 1] + 1
            } else {
                lcs[i + 1][j].max(lcs[i][j + 1])
            };
        }
    }
    let (mut i, mut j, mut out) = (0, 0, String::new());
    while i < a.len() || j < b.len() {
        if i < a.len() && j < b.len() && a[i] == b[j] {
            out.push_str(&format!("   {}\n", a[i]));
            (i, j) = (i + 1, j + 1);
        } else if j < b.len() && (i == a.len() || lcs[i][j + 1] >= lcs[i + 1][j]) {
            out.push_str(&format!(" + {}\n", b[j]));
            j += 1;
        } else {
            out.push_str(&format!(" - {}\n", a[i]));
            i += 1;
        }
    }
    out
}

impl TestArgs {
    /// Runs the cases; exit 0 when every one gives what is expected, 1
    /// otherwise.
    pub fn run(self) -> anyhow::Result<ExitCode> {
        let dir = self
            .dir
            .canonicalize()
            .map_err(|e| coded(exit::EX_NOINPUT, format!("{}: {e}", self.dir.display())))?;
        let name = dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "plugin".into());
        let wasm = self
            .wasm
            .unwrap_or_else(|| dir.join(format!("{name}.wasm")));
        if !wasm.is_file() {
            return Err(coded(
                exit::EX_NOINPUT,
                format!(
                    "{}: no component: run `sendbox plugin build` first",
                    wasm.display()
                ),
            ));
        }
        let cases = cases(&dir);
        if cases.is_empty() {
            return Err(coded(
                exit::EX_NOINPUT,
                format!(
                    "{}: no cases: add sample-event.json (with expected-outcome.json) or tests/NAME.event.json",
                    dir.display()
                ),
            ));
        }
        let settings = PluginSettings {
            config: parse_pairs(&self.config, "--config")?,
            ..PluginSettings::default()
        };
        let plugin = runtime(None, false)?
            .load_file(&name, &wasm, settings)
            .map_err(|e| coded(exit::EX_DATAERR, e.to_string()))?;
        let mut failed = 0;
        for (case, event_file, expected_file) in &cases {
            let text = std::fs::read_to_string(event_file)?;
            let event: Event = serde_json::from_str(&text).map_err(|e| {
                coded(
                    exit::EX_DATAERR,
                    format!("{}: not a valid event: {e}", event_file.display()),
                )
            })?;
            let actual = serde_json::to_string_pretty(&gave(&plugin, &event))?;
            if self.bless {
                std::fs::write(expected_file, format!("{actual}\n"))?;
                println!("blessed {case}: {}", expected_file.display());
                continue;
            }
            let expected = match std::fs::read_to_string(expected_file) {
                Ok(text) => serde_json::from_str::<serde_json::Value>(&text)
                    .map(|v| serde_json::to_string_pretty(&v).unwrap_or_default())
                    .map_err(|e| {
                        coded(
                            exit::EX_DATAERR,
                            format!("{}: not JSON: {e}", expected_file.display()),
                        )
                    })?,
                Err(_) => String::new(),
            };
            if expected == actual {
                println!("ok     {case}");
            } else {
                failed += 1;
                println!(
                    "FAILED {case}: {} (- expected, + given; `--bless` to accept)\n{}",
                    expected_file.display(),
                    diff(&expected, &actual)
                );
            }
        }
        if !self.bless {
            println!("{} case(s), {failed} failed", cases.len());
        }
        Ok(ExitCode::from(if failed == 0 {
            exit::OK
        } else {
            exit::PLUGIN_FAILED
        }))
    }
}
