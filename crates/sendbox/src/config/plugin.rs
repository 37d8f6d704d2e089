//! `[plugins.NAME]`: a component, its account, config, limits and policy.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use toml::Spanned;

use super::*;
use sendbox_runtime::Limits;

/// `[plugins.NAME]`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPlugin {
    /// The component file, e.g. `"plugins/file_alert.wasm"`. Required in
    /// the config file; in a drop-in `NAME.toml` it defaults to `NAME.wasm`
    /// beside it.
    pub wasm: Option<Spanned<PathBuf>>,
    /// The account its emails go out through.
    pub account: Spanned<String>,
    /// Non-secret values the plugin reads with `config::get`.
    #[serde(default)]
    pub config: BTreeMap<String, String>,
    /// Resource limits; see `sendbox_runtime::Limits`.
    #[serde(default)]
    pub limits: Limits,
    /// What the plugin may send: allowed From addresses and recipients,
    /// sizes and rates, checked at enqueue (`[plugins.NAME.policy]`).
    #[serde(default)]
    pub policy: sendbox_outbox::Policy,
    /// A webhook route for this plugin.
    pub webhook: Option<Spanned<RawWebhook>>,
    /// Folders to watch: `[[plugins.NAME.watch]]`.
    #[serde(default)]
    pub watch: Vec<Spanned<RawWatch>>,
    /// Schedules: `[[plugins.NAME.schedule]]`.
    #[serde(default)]
    pub schedule: Vec<Spanned<RawSchedule>>,
}

/// A validated plugin.
#[derive(Debug)]
pub struct PluginConfig {
    /// Its name.
    pub name: String,
    /// The file its section is in: the config file, or its drop-in
    /// `NAME.toml`.
    pub defined_in: PathBuf,
    /// The component file, resolved against the config's folder.
    pub wasm: PathBuf,
    /// The account.
    pub account: String,
    /// Runtime settings.
    pub settings: sendbox_runtime::PluginSettings,
    /// What it may send.
    pub policy: sendbox_outbox::Policy,
    /// Its webhook route.
    pub webhook: Option<sendbox_triggers::webhook::Route>,
    /// The webhook path.
    pub webhook_path: Option<String>,
    /// Its watched folders.
    pub watches: Vec<sendbox_triggers::watch::Watch>,
    /// Its schedules.
    pub schedules: Vec<sendbox_triggers::cron::Schedule>,
    /// What a reload compares to tell whether this plugin changed: hashes
    /// of its section without the triggers, and of the triggers.
    pub fingerprint: Fingerprint,
}

/// SHA-256 of a config section's canonical text, for telling what a
/// reload changed (a hash, so an inline secret never shows in `Debug`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Fingerprint {
    /// Everything but the triggers (wasm path, account, config, limits, policy).
    pub plugin: String,
    /// `webhook`, `watch` and `schedule`.
    pub triggers: String,
}

/// Validates one plugin's section (from the config file or a drop-in);
/// errors go to `cx`, whose file the section is in.
pub(super) fn plugin(
    cx: &mut Ctx<'_>,
    name: &str,
    p: RawPlugin,
    offset: usize,
    default_wasm: Option<PathBuf>,
    accounts: &BTreeMap<String, AccountConfig>,
    fingerprint: Fingerprint,
) -> Option<PluginConfig> {
    let account_name = p.account.get_ref().clone();
    if !accounts.contains_key(&account_name) {
        let known: Vec<&str> = accounts.keys().map(String::as_str).collect();
        cx.error(
            p.account.span().start,
            &format!("plugins.{name}.account"),
            format!(
                "no account named {account_name:?}; define [accounts.{account_name}] or use one of: {}",
                if known.is_empty() { "(none defined)".into() } else { known.join(", ") }
            ),
        );
    }
    if let Err(e) = p.limits.validate() {
        cx.error(offset, &format!("plugins.{name}.limits"), e);
    }
    let wasm = match (&p.wasm, default_wasm) {
        (Some(w), _) => cx.resolve_path(w.get_ref()),
        (None, Some(beside)) => beside,
        (None, None) => {
            cx.error(
                offset,
                &format!("plugins.{name}.wasm"),
                format!(
                    "missing: name the plugin's component, e.g. `wasm = \"plugins/{name}.wasm\"`"
                ),
            );
            return None;
        }
    };
    let triggers = super::triggers::triggers(cx, name, &p);
    Some(PluginConfig {
        name: name.to_owned(),
        defined_in: cx.path.to_owned(),
        wasm,
        account: account_name,
        settings: sendbox_runtime::PluginSettings {
            config: p.config,
            limits: p.limits,
        },
        policy: p.policy,
        webhook_path: p
            .webhook
            .as_ref()
            .map(|w| w.get_ref().path.get_ref().clone()),
        webhook: triggers.webhook,
        watches: triggers.watches,
        schedules: triggers.schedules,
        fingerprint,
    })
}

/// The drop-in plugins of `dir`: every `NAME.toml` (not hidden) with
/// `NAME.wasm` beside it, each validated in its own file's terms and added
/// to `plugins`. A name the config file defines too is an error; a
/// `.wasm` without a `.toml`, or a folder not there yet, is a warning.
pub(super) fn drop_ins(
    cx: &mut Ctx<'_>,
    dir: &Path,
    accounts: &BTreeMap<String, AccountConfig>,
    plugins: &mut BTreeMap<String, PluginConfig>,
) {
    if !dir.exists() {
        cx.warnings.push(format!(
            "{}: `daemon.plugins_dir`: the folder {} does not exist yet, so no plugin comes from it; `sendbox run` creates it",
            cx.path.display(),
            dir.display()
        ));
        return;
    }
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) => {
            cx.errors.push(format!(
                "{}: `daemon.plugins_dir`: cannot read the folder {}: {e}; make it a folder sendbox can read, or remove the key",
                cx.path.display(),
                dir.display()
            ));
            return;
        }
    };
    let mut files: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| !n.to_string_lossy().starts_with('.'))
        })
        .collect();
    files.sort();
    for file in files
        .iter()
        .filter(|f| f.extension().is_some_and(|x| x == "wasm"))
    {
        if !file.with_extension("toml").is_file() {
            cx.warnings.push(format!(
                "{}: no {} beside it, so it is not loaded; add one with the plugin's `account` and triggers",
                file.display(),
                file.with_extension("toml")
                    .file_name()
                    .unwrap_or_default()
                    .to_string_lossy()
            ));
        }
    }
    for file in files
        .iter()
        .filter(|f| f.extension().is_some_and(|x| x == "toml"))
    {
        let Some(name) = file.file_stem().map(|s| s.to_string_lossy().into_owned()) else {
            continue;
        };
        // The name shows in logs, routes' answers and metric labels.
        if !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            cx.errors.push(format!(
                "{}: {name:?} is not a plugin name: rename the file (and its .wasm) with letters, digits, `-` and `_` only",
                file.display()
            ));
            continue;
        }
        let source = match std::fs::read_to_string(file) {
            Ok(s) => s,
            Err(e) => {
                cx.errors
                    .push(format!("{}: cannot read: {e}", file.display()));
                continue;
            }
        };
        if let Some(other) = plugins.get(&name) {
            cx.errors.push(format!(
                "{}: plugin `{name}` is also defined in {}; rename one of them",
                file.display(),
                other.defined_in.display()
            ));
            continue;
        }
        let mut sub = Ctx {
            path: file,
            resolve_secrets: cx.resolve_secrets,
            resolve_store_secret: cx.resolve_store_secret,
            source: &source,
            errors: Vec::new(),
            warnings: Vec::new(),
            max_held_body_bytes: cx.max_held_body_bytes,
        };
        match toml::from_str::<RawPlugin>(&source) {
            Ok(raw) => {
                let table: toml::Table = toml::from_str(&source).unwrap_or_default();
                let fingerprint = super::fingerprint::plugin_fingerprint(table);
                if let Some(p) = plugin(
                    &mut sub,
                    &name,
                    raw,
                    0,
                    Some(file.with_extension("wasm")),
                    accounts,
                    fingerprint,
                ) {
                    plugins.insert(name, p);
                }
            }
            Err(e) => {
                let at = e
                    .span()
                    .map(|s| sub.at(s.start))
                    .unwrap_or_else(|| file.display().to_string());
                sub.errors.push(format!("{at}: {}", e.message()));
            }
        }
        cx.errors.append(&mut sub.errors);
        cx.warnings.append(&mut sub.warnings);
    }
}
