//! `[listeners.NAME]`: an SMTP submission listener for devices and legacy
//! apps — where it listens, TLS, who may submit, caps and timeouts, and the
//! policy its mail goes through.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use sendbox_submission::{IpNet, Settings, Tls, Users};
use serde::Deserialize;
use toml::Spanned;

use super::*;

/// `[listeners.NAME]`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawListener {
    /// Address and port, e.g. `"0.0.0.0:587"` or `"127.0.0.1:2525"`.
    pub listen: Spanned<String>,
    /// The account the mail goes out through.
    pub account: Spanned<String>,
    /// `"starttls"` (the default with a certificate), `"implicit"` (TLS
    /// from the first byte, as on port 465) or `"none"` (the default
    /// without one).
    pub tls: Option<Spanned<String>>,
    /// PEM certificate chain, for `tls`.
    pub certificate: Option<Spanned<PathBuf>>,
    /// PEM private key of the certificate (keep it mode 0600).
    pub private_key: Option<Spanned<PathBuf>>,
    /// Refuse `MAIL FROM` on an unencrypted connection (loopback clients
    /// excepted). Default: true when TLS is configured.
    pub require_tls: Option<bool>,
    /// Users who may log in (AUTH PLAIN/LOGIN): a file of `name:hash`
    /// lines, hashes from `sendbox hash-password` (keep it mode 0600).
    pub users_file: Option<Spanned<PathBuf>>,
    /// Networks whose clients may submit without logging in, e.g.
    /// `["192.168.10.0/24", "127.0.0.1"]`.
    #[serde(default)]
    pub allow_networks: Vec<Spanned<String>>,
    /// The name in the greeting and the EHLO reply. Default `"sendbox"`.
    pub hostname: Option<String>,
    /// Connections at once. Default 64.
    pub max_connections: Option<usize>,
    /// Connections at once from one client address. Default 8.
    pub max_connections_per_client: Option<usize>,
    /// Seconds to wait for each command. Default 60.
    pub command_timeout_secs: Option<u64>,
    /// Seconds a message's DATA may take in all. Default 600.
    pub data_timeout_secs: Option<u64>,
    /// Seconds one connection may last in all. Default 600.
    pub session_timeout_secs: Option<u64>,
    /// Failed logins from one address before it is refused for
    /// `login_window_secs`. Default 5.
    pub max_failed_logins: Option<u32>,
    /// See `max_failed_logins`. Default 300.
    pub login_window_secs: Option<u64>,
    /// A plugin (world `relay-hook`, e.g. `plugins/device-screen`) that
    /// screens every message before the client's `250`: relays it, replaces
    /// it with other emails, or refuses it with an SMTP reply. Its mail is
    /// then the plugin's (its `allowed_from` decides the From rewriting;
    /// replacements go through its policy).
    pub plugin: Option<Spanned<String>>,
    /// What mail through this listener may do, as for plugins
    /// (`[listeners.NAME.policy]`): `allowed_from` (a From outside it and
    /// the account's mailbox is rewritten to the mailbox),
    /// `allowed_recipients` (others are refused at `RCPT TO`),
    /// `recipients_per_email`, `message_bytes` (announced as SIZE),
    /// `emails_per_hour`, `emails_per_day`.
    #[serde(default)]
    pub policy: sendbox_outbox::Policy,
}

/// A validated listener.
#[derive(Debug)]
pub struct ListenerConfig {
    /// Its name.
    pub name: String,
    /// Where it listens.
    pub listen: SocketAddr,
    /// The account its mail goes out through.
    pub account: String,
    /// Protocol settings: TLS, users, networks, caps and timeouts.
    pub settings: Settings,
    /// What its mail may do.
    pub policy: sendbox_outbox::Policy,
    /// The plugin that screens its mail, if any.
    pub plugin: Option<String>,
}

impl ListenerConfig {
    /// The outbox's name for mail from this listener (where a plugin's
    /// name would be): `listener:NAME`.
    pub fn source(&self) -> String {
        format!("listener:{}", self.name)
    }
}

pub(super) fn listener(
    cx: &mut Ctx<'_>,
    name: &str,
    raw: RawListener,
    accounts: &[&str],
    plugins: &[&str],
) -> Option<ListenerConfig> {
    let key = |k: &str| format!("listeners.{name}.{k}");
    let errors_before = cx.errors.len();
    let listen = match raw.listen.get_ref().parse::<SocketAddr>() {
        Ok(a) => Some(a),
        Err(e) => {
            cx.error(
                raw.listen.span().start,
                &key("listen"),
                format!("{e}; write an IP address and port, e.g. \"0.0.0.0:587\""),
            );
            None
        }
    };
    let account = raw.account.get_ref().clone();
    if !accounts.contains(&account.as_str()) {
        cx.error(
            raw.account.span().start,
            &key("account"),
            format!(
                "no account named {account:?}; define [accounts.{account}] or use one of: {}",
                accounts.join(", ")
            ),
        );
    }
    if let Some(p) = &raw.plugin
        && !plugins.contains(&p.get_ref().as_str())
    {
        cx.error(
            p.span().start,
            &key("plugin"),
            format!("no plugin named {:?}; define [plugins.{}] (a relay-hook component) or use one of: {}", p.get_ref(), p.get_ref(), plugins.join(", ")),
        );
    }
    let mode = raw.tls.as_ref().map(|t| t.get_ref().as_str());
    let tls = match mode {
        Some(m) if !matches!(m, "none" | "starttls" | "implicit") => {
            let at = raw.tls.as_ref().map_or(0, |t| t.span().start);
            cx.error(
                at,
                &key("tls"),
                format!("{m:?} is not a TLS mode; use \"starttls\", \"implicit\" or \"none\""),
            );
            None
        }
        Some("none") => Some(Tls::None),
        None if raw.certificate.is_none() && raw.private_key.is_none() => Some(Tls::None),
        _ => match (&raw.certificate, &raw.private_key) {
            (Some(cert), Some(private_key)) => {
                let (cert_path, key_path) = (
                    cx.resolve_path(cert.get_ref()),
                    cx.resolve_path(private_key.get_ref()),
                );
                match sendbox_submission::server_config(&cert_path, &key_path) {
                    Ok(config) if mode == Some("implicit") => Some(Tls::Implicit(config)),
                    Ok(config) => Some(Tls::StartTls(config)),
                    Err(e) => {
                        let at = if e.path == key_path {
                            private_key.span().start
                        } else {
                            cert.span().start
                        };
                        cx.error(
                            at,
                            &key(if e.path == key_path {
                                "private_key"
                            } else {
                                "certificate"
                            }),
                            e,
                        );
                        None
                    }
                }
            }
            _ => {
                let at = raw
                    .tls
                    .as_ref()
                    .map_or(raw.listen.span().start, |t| t.span().start);
                cx.error(at, &key("tls"), "TLS needs both `certificate` and `private_key` (PEM files); or set tls = \"none\"");
                None
            }
        },
    };
    let users = match &raw.users_file {
        None => None,
        Some(file) => {
            let path = cx.resolve_path(file.get_ref());
            let read = if cx.resolve_secrets {
                std::fs::read_to_string(&path)
            } else {
                Ok(String::new())
            };
            match read
                .map_err(|e| e.to_string())
                .and_then(|t| Users::parse(&t).map_err(|e| e.to_string()))
            {
                Ok(u) => {
                    if cx.resolve_secrets && u.is_empty() {
                        cx.error(file.span().start, &key("users_file"), format!("{} lists no users; add `name:hash` lines made with `sendbox hash-password`", path.display()));
                    }
                    warn_if_readable_by_others(cx, &path, &key("users_file"));
                    Some(Arc::new(u))
                }
                Err(e) => {
                    cx.error(
                        file.span().start,
                        &key("users_file"),
                        format!("{}: {e}", path.display()),
                    );
                    None
                }
            }
        }
    };
    let mut networks = Vec::new();
    for n in &raw.allow_networks {
        let text = n.get_ref().trim();
        let parsed = text
            .parse::<IpNet>()
            .or_else(|_| text.parse::<std::net::IpAddr>().map(IpNet::from));
        match parsed {
            Ok(net) if net.prefix_len() == 0 => cx.error(
                n.span().start,
                &key("allow_networks"),
                format!("{text} is every address: anyone on the network could send through your account; list your devices' networks"),
            ),
            Ok(net) => networks.push(net),
            Err(_) => cx.error(n.span().start, &key("allow_networks"), format!("{text:?} is not a network; write e.g. \"192.168.10.0/24\" or \"10.0.0.5\"")),
        }
    }
    if raw.users_file.is_none() && raw.allow_networks.is_empty() {
        cx.error(
            raw.listen.span().start,
            &key("users_file"),
            "nobody may submit: set `users_file` (devices log in) and/or `allow_networks` (devices on these networks need no login)",
        );
    }
    let loopback = listen.is_some_and(|a| a.ip().is_loopback());
    if raw.users_file.is_some() && matches!(tls, Some(Tls::None)) && !loopback {
        cx.error(
            raw.listen.span().start,
            &key("tls"),
            "logins would cross the network in clear text: give the listener a `certificate` and `private_key`, or listen on 127.0.0.1",
        );
    }
    if cx.errors.len() > errors_before {
        return None;
    }
    let (listen, tls) = (listen?, tls?);
    let secs = |v: Option<u64>, d: u64| Duration::from_secs(v.unwrap_or(d).max(1));
    let defaults = Settings::new(name);
    let settings = Settings {
        hostname: raw.hostname.unwrap_or(defaults.hostname),
        require_tls: raw.require_tls.unwrap_or(!matches!(tls, Tls::None)),
        tls,
        users,
        allow_networks: networks,
        allowed_recipients: raw.policy.allowed_recipients.clone(),
        max_message_bytes: usize::try_from(raw.policy.message_bytes).unwrap_or(usize::MAX),
        max_recipients: raw.policy.recipients_per_email as usize,
        max_connections: raw
            .max_connections
            .unwrap_or(defaults.max_connections)
            .max(1),
        max_connections_per_client: raw
            .max_connections_per_client
            .unwrap_or(defaults.max_connections_per_client)
            .max(1),
        command_timeout: secs(raw.command_timeout_secs, 60),
        data_timeout: secs(raw.data_timeout_secs, 600),
        session_timeout: secs(raw.session_timeout_secs, 600),
        max_failed_logins: raw
            .max_failed_logins
            .unwrap_or(defaults.max_failed_logins)
            .max(1),
        login_window: secs(raw.login_window_secs, 300),
        name: name.to_owned(),
    };
    Some(ListenerConfig {
        name: name.to_owned(),
        listen,
        account,
        settings,
        policy: raw.policy,
        plugin: raw.plugin.map(Spanned::into_inner),
    })
}

/// Warns when a file holding password hashes is readable by others.
fn warn_if_readable_by_others(cx: &mut Ctx<'_>, path: &std::path::Path, key: &str) {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        if let Ok(meta) = std::fs::metadata(path)
            && meta.permissions().mode() & 0o077 != 0
        {
            cx.warnings.push(format!(
                "`{key}`: {} is readable by other users (mode {:o}); `chmod 600` it",
                path.display(),
                meta.permissions().mode() & 0o777
            ));
        }
    }
}
