//! `[plugins.NAME]`: a component, its account, config, limits and policy.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::Deserialize;
use toml::Spanned;

use super::*;
use sendbox_runtime::Limits;

/// `[plugins.NAME]`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPlugin {
    /// The component file, e.g. `"plugins/file_alert.wasm"`.
    pub wasm: Spanned<PathBuf>,
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
