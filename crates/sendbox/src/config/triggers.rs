//! `webhook`, `watch` and `schedule` of a plugin, checked and resolved
//! into the trigger crate's types.

use std::path::PathBuf;

use serde::Deserialize;
use toml::Spanned;

use super::secrets::secret_bytes;
use super::*;

/// `[plugins.NAME.webhook]`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawWebhook {
    /// The route, e.g. `"/hooks/alerts"`.
    pub path: Spanned<String>,
    /// HMAC-SHA256 secret, by reference (`{ env = "..." }` or `{ file = "..." }`).
    pub secret: Option<Spanned<RawSecretRef>>,
    /// How the secret signs requests: `github` (default: hex HMAC of the
    /// body in `signature_header`), `standard-webhooks` (`webhook-id`,
    /// `webhook-timestamp`, `webhook-signature`; secret `whsec_...`),
    /// `stripe` (`Stripe-Signature`) or `slack` (`X-Slack-Signature`).
    pub scheme: Option<Spanned<String>>,
    /// `github` scheme: header carrying the signature. Default
    /// `X-Hub-Signature-256`.
    pub signature_header: Option<String>,
    /// `github` scheme: prefix before the hex digest. Default `sha256=`.
    pub signature_prefix: Option<String>,
    /// Timestamped schemes: how far a request's timestamp may be from now,
    /// in seconds; a delivery seen within it is not run again. Default 300.
    pub tolerance_secs: Option<u64>,
    /// `github` scheme: a header with the sender's delivery id, e.g.
    /// `X-GitHub-Delivery`; a delivery id seen within `dedupe_secs` is not
    /// run again. Default: none (the body-only signature has no replay
    /// window).
    pub dedupe_header: Option<String>,
    /// How long a delivery id from `dedupe_header` is remembered, in
    /// seconds. Default 86400.
    pub dedupe_secs: Option<u64>,
    /// Bearer token, by reference, instead of a signature.
    pub bearer_token: Option<Spanned<RawSecretRef>>,
    /// Accept unauthenticated requests (only sensible on loopback).
    #[serde(default)]
    pub unauthenticated: bool,
    /// Largest body, in bytes. Default 1 MiB.
    pub max_body_bytes: Option<usize>,
    /// Requests handled at once. Default 16.
    pub concurrency: Option<usize>,
    /// How long a request beyond `concurrency` waits for a slot before it
    /// is answered `503` with `Retry-After`, in ms. Default 2000.
    pub queue_ms: Option<u64>,
}

/// `[[plugins.NAME.watch]]`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawWatch {
    /// The watch's name, passed to the plugin, e.g. `"incoming"`.
    pub name: String,
    /// The folder, relative to this file.
    pub dir: PathBuf,
    /// Watch subfolders too. Default false.
    #[serde(default)]
    pub recursive: bool,
    /// Only paths matching these globs, e.g. `["*.csv"]`. Default: all.
    pub include: Option<Spanned<Vec<String>>>,
    /// Never paths matching these globs, e.g. `["*.tmp", ".*"]`.
    pub exclude: Option<Spanned<Vec<String>>>,
    /// Quiet time after the last write before the event fires, ms. Default 500.
    pub debounce_ms: Option<u64>,
    /// Files up to this size are passed with their contents. Default 5 MiB.
    pub max_contents_bytes: Option<u64>,
    /// Emit `created` for files present at start. Default false.
    #[serde(default)]
    pub process_existing: bool,
}

/// `[[plugins.NAME.schedule]]`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSchedule {
    /// The schedule's name, passed to the plugin, e.g. `"daily"`.
    pub name: String,
    /// Cron expression: 5 fields (`"0 8 * * *"`) or 6 with seconds first.
    pub cron: Spanned<String>,
    /// IANA time zone. Default `"UTC"`.
    pub timezone: Option<Spanned<String>>,
    /// Runs missed while the daemon was down: `"skip"` them (default) or
    /// run the latest one `"once"` at start.
    pub catch_up: Option<Spanned<String>>,
}

pub(super) fn globs(
    cx: &mut Ctx<'_>,
    key: &str,
    pats: Option<&Spanned<Vec<String>>>,
) -> globset::GlobSet {
    let mut b = globset::GlobSetBuilder::new();
    let Some(pats) = pats else {
        return globset::GlobSet::empty();
    };
    let offset = pats.span().start;
    for p in pats.get_ref() {
        match globset::Glob::new(p) {
            Ok(g) => {
                b.add(g);
            }
            Err(e) => cx.error(offset, key, format!("bad glob {p:?}: {e}")),
        }
    }
    b.build().unwrap_or_else(|_| globset::GlobSet::empty())
}

/// A plugin's triggers, checked.
pub(super) struct Triggers {
    pub(super) webhook: Option<sendbox_triggers::webhook::Route>,
    pub(super) watches: Vec<sendbox_triggers::watch::Watch>,
    pub(super) schedules: Vec<sendbox_triggers::cron::Schedule>,
}

pub(super) fn triggers(cx: &mut Ctx<'_>, name: &str, p: &RawPlugin) -> Triggers {
    use sendbox_triggers::webhook::{Auth, Route};
    let webhook = p.webhook.as_ref().and_then(|w| {
        let offset = w.span().start;
        let w = w.get_ref();
        let key = format!("plugins.{name}.webhook");
        let path = w.path.get_ref();
        if !path.starts_with('/') || path == "/healthz" || path == "/metrics" {
            cx.error(w.path.span().start, &format!("{key}.path"), "must start with `/` and not be /healthz or /metrics, e.g. \"/hooks/alerts\"");
            return None;
        }
        let scheme = w.scheme.as_ref().map_or("github", |s| s.get_ref().as_str());
        if let Some(s) = &w.scheme
            && (w.secret.is_none() || !["github", "standard-webhooks", "stripe", "slack"].contains(&scheme))
        {
            cx.error(s.span().start, &format!("{key}.scheme"), "must be one of \"github\", \"standard-webhooks\", \"stripe\", \"slack\", and goes with `secret`");
            return None;
        }
        if scheme != "github" && (w.signature_header.is_some() || w.signature_prefix.is_some() || w.dedupe_header.is_some()) {
            cx.error(offset, &key, format!("`signature_header`, `signature_prefix` and `dedupe_header` belong to the `github` scheme; scheme {scheme:?} fixes its own headers and has its own replay window (`tolerance_secs`)"));
            return None;
        }
        let auth = match (&w.secret, &w.bearer_token, w.unauthenticated) {
            (Some(s), None, false) => {
                let secret = secret_bytes(cx, s.span().start, &format!("{key}.secret"), s.get_ref())?;
                match scheme {
                    "standard-webhooks" => {
                        use base64::Engine as _;
                        let text = String::from_utf8_lossy(&secret);
                        let b64 = text.trim().strip_prefix("whsec_").unwrap_or(text.trim());
                        match base64::engine::general_purpose::STANDARD.decode(b64) {
                            Ok(key) if !key.is_empty() => Auth::StandardWebhooks { secret: key },
                            _ => {
                                cx.error(s.span().start, &format!("{key}.secret"), "a Standard Webhooks secret is `whsec_` followed by base64, as the sender shows it");
                                return None;
                            }
                        }
                    }
                    "stripe" => Auth::Stripe { secret },
                    "slack" => Auth::Slack { secret },
                    _ => Auth::Hmac {
                        secret,
                        header: w.signature_header.clone().unwrap_or_else(|| "X-Hub-Signature-256".into()).to_ascii_lowercase(),
                        prefix: w.signature_prefix.clone().unwrap_or_else(|| "sha256=".into()),
                    },
                }
            }
            (None, Some(t), false) => Auth::Bearer {
                token: secret_bytes(cx, t.span().start, &format!("{key}.bearer_token"), t.get_ref())?,
            },
            (None, None, true) => Auth::None,
            _ => {
                cx.error(offset, &key, "choose one of `secret` (HMAC signature), `bearer_token`, or `unauthenticated = true`");
                return None;
            }
        };
        let max_body_bytes = w.max_body_bytes.unwrap_or(1 << 20);
        if max_body_bytes > cx.max_held_body_bytes {
            cx.error(offset, &format!("{key}.max_body_bytes"), format!("{max_body_bytes} bytes is more than `[daemon] webhook_max_held_body_bytes` ({}), so such a body could never be read: lower it, or raise that", cx.max_held_body_bytes));
            return None;
        }
        Some(Route {
            plugin: name.to_owned(),
            auth,
            replay: sendbox_triggers::webhook::Replay {
                tolerance: std::time::Duration::from_secs(w.tolerance_secs.unwrap_or(300)),
                dedupe_header: w.dedupe_header.as_ref().map(|h| h.to_ascii_lowercase()),
                dedupe_window: std::time::Duration::from_secs(w.dedupe_secs.unwrap_or(86_400)),
            },
            max_body_bytes,
            concurrency: w.concurrency.unwrap_or(16),
            queue_wait: std::time::Duration::from_millis(w.queue_ms.unwrap_or(2000)),
        })
    });
    let mut watches = Vec::new();
    for (i, w) in p.watch.iter().enumerate() {
        let w = w.get_ref();
        let key = format!("plugins.{name}.watch[{i}]");
        // Created and resolved when the watch starts, not while checking.
        let dir = cx.resolve_path(&w.dir);
        watches.push(sendbox_triggers::watch::Watch {
            plugin: name.to_owned(),
            name: w.name.clone(),
            dir,
            recursive: w.recursive,
            include: globs(cx, &format!("{key}.include"), w.include.as_ref()),
            exclude: globs(cx, &format!("{key}.exclude"), w.exclude.as_ref()),
            debounce: std::time::Duration::from_millis(w.debounce_ms.unwrap_or(500)),
            max_contents_bytes: w.max_contents_bytes.unwrap_or(5 << 20),
            process_existing: w.process_existing,
        });
    }
    let mut schedules = Vec::new();
    for (i, s) in p.schedule.iter().enumerate() {
        let s = s.get_ref();
        let key = format!("plugins.{name}.schedule[{i}]");
        let cron = match sendbox_triggers::cron::parse_expr(s.cron.get_ref()) {
            Ok(cron) => Some(cron),
            Err(e) => {
                cx.error(s.cron.span().start, &format!("{key}.cron"), e);
                None
            }
        };
        let tz = match &s.timezone {
            None => sendbox_triggers::cron::parse_zone("UTC").ok(),
            Some(tz) => match sendbox_triggers::cron::parse_zone(tz.get_ref()) {
                Ok(tz) => Some(tz),
                Err(e) => {
                    cx.error(tz.span().start, &format!("{key}.timezone"), e);
                    None
                }
            },
        };
        let catch_up = match &s.catch_up {
            None => Some(sendbox_triggers::cron::CatchUp::Skip),
            Some(c) => match c.get_ref().parse() {
                Ok(c) => Some(c),
                Err(e) => {
                    cx.error(c.span().start, &format!("{key}.catch_up"), e);
                    None
                }
            },
        };
        if let (Some(cron), Some(tz), Some(catch_up)) = (cron, tz, catch_up) {
            schedules.push(sendbox_triggers::cron::Schedule {
                plugin: name.to_owned(),
                name: s.name.clone(),
                cron,
                tz,
                catch_up,
            });
        }
    }
    Triggers {
        webhook,
        watches,
        schedules,
    }
}
