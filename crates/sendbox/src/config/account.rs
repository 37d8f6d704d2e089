//! `[accounts.NAME]`: a mailbox, its provider and credentials, resolved
//! into what the auth and mail crates need.

use std::path::{Path, PathBuf};

use serde::Deserialize;
use toml::Spanned;

use super::secrets::secret_ref;
use super::*;
use sendbox_auth::{Credentials, Endpoints, Secret, SecretSource};

/// `[accounts.NAME]`: one mailbox and how to get its tokens.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAccount {
    /// `microsoft365`, `google`, `generic` (explicit endpoints) or `file`
    /// (write `.eml` files; no OAuth, no SMTP).
    pub provider: Spanned<String>,
    /// The mailbox to send as, e.g. `"alerts@contoso.com"`: the XOAUTH2
    /// user and the default From.
    pub mailbox: Spanned<String>,
    /// Microsoft 365: the tenant, e.g. `"contoso.onmicrosoft.com"` or the
    /// directory id.
    pub tenant: Option<Spanned<String>>,
    /// The app registration's client id.
    pub client_id: Option<Spanned<String>>,
    /// The client secret, by reference: `{ file = "/etc/sendbox/alerts.secret" }`
    /// or `{ env = "ALERTS_CLIENT_SECRET" }`.
    pub client_secret: Option<Spanned<RawSecret>>,
    /// Certificate credentials: the RSA private key (PEM) ...
    pub private_key_file: Option<Spanned<PathBuf>>,
    /// ... and the certificate uploaded to the app registration (PEM).
    pub certificate_file: Option<Spanned<PathBuf>>,
    /// Delegated credentials: where `sendbox login` keeps the refresh token,
    /// e.g. `"var/alerts.token.json"` (written with mode 0600).
    pub token_file: Option<Spanned<PathBuf>>,
    /// `generic`: the token endpoint.
    pub token_url: Option<Spanned<String>>,
    /// `generic`: the device authorization endpoint, for `sendbox login`.
    pub device_url: Option<Spanned<String>>,
    /// Scopes to request; presets fill this in.
    pub scopes: Option<Vec<String>>,
    /// SMTP server; presets fill this in (`smtp.office365.com`,
    /// `smtp.gmail.com`).
    pub smtp_host: Option<String>,
    /// SMTP port. Default 587 (465 with `security = "implicit_tls"`).
    pub smtp_port: Option<u16>,
    /// `starttls` (default) or `implicit_tls`.
    pub security: Option<Spanned<String>>,
    /// Extra CA certificate (PEM) to trust, for a private relay.
    pub ca_file: Option<PathBuf>,
    /// Most SMTP connections at once. Default 3 for `microsoft365`, else 5.
    pub max_connections: Option<u32>,
    /// Connect and command timeout in seconds. Default 30.
    pub timeout_secs: Option<u64>,
    /// `file`: the folder `.eml` files go to, e.g. `"var/mail"`.
    pub dir: Option<PathBuf>,
    /// Most messages per minute through this account. Default 30 for
    /// `microsoft365` (Exchange's limit), none otherwise.
    pub rate_per_minute: Option<u32>,
    /// A message still failing this many hours after it was queued goes
    /// dead. Default 24.
    pub max_age_hours: Option<u32>,
    /// Accept `client_secret = "..."` written inline (warned about).
    #[serde(default)]
    pub allow_inline_secret: bool,
}

/// A validated account.
#[derive(Debug)]
pub struct AccountConfig {
    /// Its name in the config.
    pub name: String,
    /// The mailbox.
    pub mailbox: String,
    /// Messages per minute, if limited.
    pub rate_per_minute: Option<u32>,
    /// Hours before a failing message goes dead.
    pub max_age_hours: u32,
    /// How it sends.
    pub kind: AccountKind,
    /// Hash of its section and of the secrets it resolved: a reload
    /// restarts the account's worker when this changes.
    pub fingerprint: SecretHash,
}

/// A hash that covers secret material: compared, never shown (`Debug`
/// prints no digits).
#[derive(Clone, Default, PartialEq, Eq)]
pub struct SecretHash(pub(super) String);

impl std::fmt::Debug for SecretHash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SecretHash([redacted])")
    }
}

/// How an account sends.
#[derive(Debug)]
pub enum AccountKind {
    /// Into a folder of `.eml` files.
    File {
        /// The folder.
        dir: PathBuf,
    },
    /// SMTP with XOAUTH2.
    Smtp(Box<SmtpAccount>),
}

/// The OAuth and SMTP side of an account.
#[derive(Debug)]
pub struct SmtpAccount {
    /// The preset, for messages.
    pub provider: String,
    /// Where tokens come from.
    pub endpoints: Endpoints,
    /// The client id.
    pub client_id: String,
    /// How the client proves itself.
    pub credentials: Credentials,
    /// SMTP settings.
    pub smtp: sendbox_mail::smtp::SmtpSettings,
}

pub(super) fn required<T: Clone>(
    cx: &mut Ctx<'_>,
    v: &Option<Spanned<T>>,
    offset: usize,
    key: &str,
    fix: &str,
) -> Option<T> {
    match v {
        Some(s) => Some(s.get_ref().clone()),
        None => {
            cx.error(offset, key, format!("is required: {fix}"));
            None
        }
    }
}

pub(super) fn account(
    cx: &mut Ctx<'_>,
    name: &str,
    a: RawAccount,
    offset: usize,
) -> Option<AccountConfig> {
    let key = |k: &str| format!("accounts.{name}.{k}");
    let mailbox = a.mailbox.get_ref().clone();
    if !mailbox.contains('@') {
        cx.error(
            a.mailbox.span().start,
            &key("mailbox"),
            "is not an email address, e.g. \"alerts@contoso.com\"",
        );
    }
    let provider = a.provider.get_ref().as_str();
    if provider == "file" {
        let Some(dir) = a.dir.as_ref() else {
            cx.error(offset, &key("dir"), "is required for provider = \"file\": the folder .eml files go to, e.g. dir = \"var/mail\"");
            return None;
        };
        return Some(AccountConfig {
            name: name.to_owned(),
            mailbox,
            rate_per_minute: a.rate_per_minute,
            max_age_hours: a.max_age_hours.unwrap_or(24),
            kind: AccountKind::File {
                dir: cx.resolve_path(dir),
            },
            fingerprint: SecretHash::default(),
        });
    }
    let client_id = required(
        cx,
        &a.client_id,
        offset,
        &key("client_id"),
        "the app registration's client (application) id",
    )?;

    // Credentials: exactly one kind.
    let secret = match &a.client_secret {
        None => None,
        Some(s) => {
            let at = s.span().start;
            match s.get_ref() {
                RawSecret::Inline(v) if a.allow_inline_secret => {
                    cx.warnings.push(format!(
                        "{}: `{}` is written inline in the config; move it to a file (client_secret = {{ file = \"...\" }}) or an environment variable",
                        cx.at(at),
                        key("client_secret")
                    ));
                    Some(SecretSource::Inline(Secret::new(v.clone())))
                }
                RawSecret::Inline(_) => {
                    cx.error(at, &key("client_secret"), "secrets are not written into the config: use client_secret = { file = \"/etc/sendbox/NAME.secret\" } or { env = \"VAR\" } (or set allow_inline_secret = true to accept it, with a warning)");
                    return None;
                }
                RawSecret::Reference(r) => Some(secret_ref(cx, at, &key("client_secret"), r)?),
            }
        }
    };
    let cert = match (&a.private_key_file, &a.certificate_file) {
        (Some(k), Some(c)) => Some((
            cx.resolve_path(k.get_ref()),
            cx.resolve_path(c.get_ref()),
            k.span().start,
        )),
        (Some(k), None) => {
            cx.error(k.span().start, &key("certificate_file"), "is required with private_key_file: the certificate uploaded to the app registration");
            return None;
        }
        (None, Some(c)) => {
            cx.error(
                c.span().start,
                &key("private_key_file"),
                "is required with certificate_file",
            );
            return None;
        }
        (None, None) => None,
    };
    let token_file = a.token_file.as_ref().map(|t| cx.resolve_path(t.get_ref()));
    let resolve_secret = |cx: &mut Ctx<'_>, s: &SecretSource| match s.resolve() {
        _ if !cx.resolve_secrets => Some(Secret::new(String::new())),
        Ok(v) => Some(v),
        Err(e) => {
            let at = a.client_secret.as_ref().map_or(offset, |s| s.span().start);
            cx.error(at, &format!("accounts.{name}.client_secret"), e);
            None
        }
    };
    let (credentials, delegated) = match (&secret, &cert, &token_file) {
        (_, Some(_), Some(_)) | (_, Some(_), _) if secret.is_some() => {
            cx.error(
                offset,
                &key("client_secret"),
                "give either client_secret or private_key_file/certificate_file, not both",
            );
            return None;
        }
        (_, Some((k, c, at)), None) => {
            let read = |p: &Path| {
                std::fs::read_to_string(p).map_err(|e| format!("cannot read {}: {e}", p.display()))
            };
            match read(k).and_then(|kp| read(c).map(|cp| (kp, cp))) {
                Ok((kp, cp)) => match sendbox_auth::jwt::CertificateKey::from_pem(&kp, &cp) {
                    Ok(key_pair) => (Credentials::Certificate(Box::new(key_pair)), false),
                    Err(e) => {
                        cx.error(*at, &key("private_key_file"), e);
                        return None;
                    }
                },
                Err(e) => {
                    cx.error(*at, &key("private_key_file"), e);
                    return None;
                }
            }
        }
        (s, None, Some(tf)) => {
            let client_secret = match s {
                Some(s) => Some(resolve_secret(cx, s)?),
                None => None,
            };
            (
                Credentials::RefreshToken {
                    token_file: tf.clone(),
                    client_secret,
                },
                true,
            )
        }
        (Some(s), None, None) => (Credentials::ClientSecret(resolve_secret(cx, s)?), false),
        (None, None, None) => {
            cx.error(offset, &key("client_secret"), "no credentials: give client_secret (app-only), private_key_file + certificate_file (app-only with a certificate), or token_file (delegated, filled by `sendbox login`)");
            return None;
        }
        _ => {
            cx.error(offset, &key("client_secret"), "conflicting credentials");
            return None;
        }
    };

    let (endpoints, host, default_conns) = match provider {
        "microsoft365" => {
            let tenant = required(
                cx,
                &a.tenant,
                offset,
                &key("tenant"),
                "the tenant, e.g. \"contoso.onmicrosoft.com\"",
            )?;
            let e = if delegated {
                Endpoints::microsoft365_delegated(&tenant)
            } else {
                Endpoints::microsoft365_app_only(&tenant)
            };
            (
                e,
                "smtp.office365.com".to_string(),
                sendbox_mail::smtp::MICROSOFT365_MAX_CONNECTIONS,
            )
        }
        "google" => (Endpoints::google(), "smtp.gmail.com".to_string(), 5),
        "generic" => {
            let token_url = required(
                cx,
                &a.token_url,
                offset,
                &key("token_url"),
                "the token endpoint URL",
            )?;
            let Some(host) = a.smtp_host.clone() else {
                cx.error(
                    offset,
                    &key("smtp_host"),
                    "is required for provider = \"generic\"",
                );
                return None;
            };
            (
                Endpoints {
                    token_url,
                    device_url: a.device_url.as_ref().map(|d| d.get_ref().clone()),
                    scopes: a.scopes.clone().unwrap_or_default(),
                },
                host,
                5,
            )
        }
        other => {
            cx.error(
                a.provider.span().start,
                &key("provider"),
                format!("unknown provider {other:?}: use microsoft365, google, generic or file"),
            );
            return None;
        }
    };
    let mut endpoints = endpoints;
    if let Some(scopes) = &a.scopes {
        endpoints.scopes = scopes.clone();
    }
    if let Some(d) = &a.device_url {
        endpoints.device_url = Some(d.get_ref().clone());
    }
    if let Some(t) = &a.token_url {
        endpoints.token_url = t.get_ref().clone();
    }
    let security = match a.security.as_ref().map(|s| s.get_ref().as_str()) {
        None | Some("starttls") => sendbox_mail::smtp::Security::StartTls,
        Some("implicit_tls") => sendbox_mail::smtp::Security::ImplicitTls,
        Some(other) => {
            let at = a.security.as_ref().map_or(offset, |s| s.span().start);
            cx.error(at, &key("security"), format!("unknown value {other:?}: use \"starttls\" (port 587) or \"implicit_tls\" (port 465)"));
            return None;
        }
    };
    let port = a.smtp_port.unwrap_or(match security {
        sendbox_mail::smtp::Security::StartTls => 587,
        sendbox_mail::smtp::Security::ImplicitTls => 465,
    });
    Some(AccountConfig {
        name: name.to_owned(),
        mailbox: mailbox.clone(),
        rate_per_minute: a
            .rate_per_minute
            .or((provider == "microsoft365").then_some(30)),
        max_age_hours: a.max_age_hours.unwrap_or(24),
        kind: AccountKind::Smtp(Box::new(SmtpAccount {
            provider: provider.to_owned(),
            endpoints,
            client_id,
            credentials,
            smtp: sendbox_mail::smtp::SmtpSettings {
                host: a.smtp_host.clone().unwrap_or(host),
                port,
                security,
                mailbox,
                max_connections: a.max_connections.unwrap_or(default_conns),
                timeout: std::time::Duration::from_secs(a.timeout_secs.unwrap_or(30)),
                ca_file: a.ca_file.as_ref().map(|c| cx.resolve_path(c)),
            },
        })),
        fingerprint: SecretHash::default(),
    })
}

/// What an account's credentials resolved to, for its fingerprint only
/// (hashed, never kept or shown).
pub(super) fn secret_material(kind: &AccountKind) -> String {
    use sendbox_auth::Credentials;
    match kind {
        AccountKind::File { .. } => String::new(),
        AccountKind::Smtp(a) => match &a.credentials {
            Credentials::ClientSecret(s) => s.expose().to_owned(),
            Credentials::Certificate(k) => k.thumbprint_s256().to_owned(),
            Credentials::RefreshToken { client_secret, .. } => client_secret
                .as_ref()
                .map(|s| s.expose().to_owned())
                .unwrap_or_default(),
        },
    }
}
