//! Where an account gets its tokens and how it proves itself: the token
//! endpoints of each provider, the credentials, and the HTTP client that
//! talks to them (no redirects, https except on loopback).

use std::path::PathBuf;
use std::time::Duration;

use crate::{AuthError, Secret, jwt};

/// Where to ask for tokens and what to ask for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoints {
    /// The token endpoint.
    pub token_url: String,
    /// The device authorization endpoint, for `sendbox login`.
    pub device_url: Option<String>,
    /// Scopes to request.
    pub scopes: Vec<String>,
}

impl Endpoints {
    /// Microsoft 365, app-only (client credentials): scope
    /// `https://outlook.office365.com/.default`.
    pub fn microsoft365_app_only(tenant: &str) -> Self {
        Endpoints {
            token_url: format!("https://login.microsoftonline.com/{tenant}/oauth2/v2.0/token"),
            device_url: None,
            scopes: vec!["https://outlook.office365.com/.default".into()],
        }
    }

    /// Microsoft 365, delegated (device code, then refresh tokens): scopes
    /// `https://outlook.office.com/SMTP.Send offline_access`.
    pub fn microsoft365_delegated(tenant: &str) -> Self {
        Endpoints {
            token_url: format!("https://login.microsoftonline.com/{tenant}/oauth2/v2.0/token"),
            device_url: Some(format!(
                "https://login.microsoftonline.com/{tenant}/oauth2/v2.0/devicecode"
            )),
            scopes: vec![
                "https://outlook.office.com/SMTP.Send".into(),
                "offline_access".into(),
            ],
        }
    }

    /// Gmail: scope `https://mail.google.com/`.
    pub fn google() -> Self {
        Endpoints {
            token_url: "https://oauth2.googleapis.com/token".into(),
            device_url: Some("https://oauth2.googleapis.com/device/code".into()),
            scopes: vec!["https://mail.google.com/".into()],
        }
    }
}

/// How the account proves itself to the token endpoint.
#[derive(Debug)]
pub enum Credentials {
    /// Client credentials grant with a client secret.
    ClientSecret(Secret),
    /// Client credentials grant with a JWT assertion signed by a
    /// certificate's key.
    Certificate(Box<jwt::CertificateKey>),
    /// Refresh-token grant; the refresh token lives in `token_file`, put
    /// there by `sendbox login` (device authorization grant). Public clients
    /// have no secret.
    RefreshToken {
        /// The token file.
        token_file: PathBuf,
        /// A client secret, for confidential clients.
        client_secret: Option<Secret>,
    },
}

pub(crate) fn check_url(what: &str, url: &str) -> Result<url::Url, AuthError> {
    let parsed = url::Url::parse(url).map_err(|e| AuthError::Config {
        message: format!("{what} {url:?} is not a URL: {e}"),
    })?;
    let loopback = match parsed.host() {
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
        Some(url::Host::Domain(d)) => d == "localhost",
        None => false,
    };
    match parsed.scheme() {
        "https" => Ok(parsed),
        "http" if loopback => Ok(parsed),
        _ => Err(AuthError::Config {
            message: format!(
                "{what} {url:?} must use https (plain http is allowed only on loopback)"
            ),
        }),
    }
}

/// The HTTP client for token requests: no redirects, bounded timeouts.
pub fn http_client() -> Result<reqwest::Client, AuthError> {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .connect_timeout(Duration::from_secs(10))
        .timeout(Duration::from_secs(30))
        .user_agent(concat!("sendbox/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(|e| AuthError::Config {
            message: format!("cannot build the HTTP client: {e}"),
        })
}
