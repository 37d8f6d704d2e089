//! SMTP with XOAUTH2: STARTTLS on 587 (refusing to authenticate without it)
//! or implicit TLS on 465, a connection pool capped per account, and one
//! token refresh + retry when the server rejects the token.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use lettre::transport::smtp::authentication::{Credentials, Mechanism};
use lettre::transport::smtp::client::{Certificate, Tls, TlsParameters};
use lettre::transport::smtp::PoolConfig;
use lettre::{AsyncSmtpTransport, AsyncTransport, Tokio1Executor};
use sendbox_auth::{AccessToken, AuthError, TokenProvider};
use tokio::sync::Mutex;

use crate::error::{FailureKind, SendError};
use crate::message::Prepared;

/// How the connection is secured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Security {
    /// Plain connect, then STARTTLS; authentication is refused if the server
    /// does not offer STARTTLS. Port 587.
    StartTls,
    /// TLS from the first byte. Port 465.
    ImplicitTls,
}

/// Where and how to connect.
#[derive(Debug, Clone)]
pub struct SmtpSettings {
    /// Server host name, e.g. `smtp.office365.com`.
    pub host: String,
    /// Port, e.g. 587.
    pub port: u16,
    /// STARTTLS or implicit TLS.
    pub security: Security,
    /// The mailbox to authenticate as (the XOAUTH2 `user=`).
    pub mailbox: String,
    /// Most connections open at once (Exchange allows 3 per mailbox).
    pub max_connections: u32,
    /// Timeout for connecting and for each command.
    pub timeout: Duration,
    /// Extra CA certificates (PEM) to trust, for private relays.
    pub ca_file: Option<PathBuf>,
}

/// Microsoft 365's limit of concurrent SMTP connections per mailbox.
pub const MICROSOFT365_MAX_CONNECTIONS: u32 = 3;

/// An SMTP transport for one account.
pub struct SmtpTransport {
    settings: SmtpSettings,
    tls: TlsParameters,
    tokens: Arc<TokenProvider>,
    /// lettre fixes credentials when a transport is built, so a new token
    /// means a new transport (and pool); keyed by the token's generation.
    current: Mutex<Option<(u64, AsyncSmtpTransport<Tokio1Executor>)>>,
}

impl std::fmt::Debug for SmtpTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SmtpTransport")
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

fn config_error(message: String) -> SendError {
    SendError::new(FailureKind::Configuration, message)
}

/// What a successful send returns.
#[derive(Debug, Clone)]
pub struct Receipt {
    /// The server's final reply, e.g. `250 2.0.0 OK <id>`.
    pub reply: String,
}

impl SmtpTransport {
    /// Prepares the transport; nothing connects until the first send.
    pub fn new(settings: SmtpSettings, tokens: Arc<TokenProvider>) -> Result<Self, SendError> {
        let mut tls = TlsParameters::builder(settings.host.clone());
        if let Some(ca) = &settings.ca_file {
            let pem = std::fs::read(ca).map_err(|e| {
                config_error(format!("cannot read ca_file {}: {e}", ca.display()))
            })?;
            let cert = Certificate::from_pem(&pem).map_err(|e| {
                config_error(format!("ca_file {} is not a PEM certificate: {e}", ca.display()))
            })?;
            tls = tls.add_root_certificate(cert);
        }
        let tls = tls
            .build_rustls()
            .map_err(|e| config_error(format!("TLS setup for {}: {e}", settings.host)))?;
        Ok(SmtpTransport {
            settings,
            tls,
            tokens,
            current: Mutex::new(None),
        })
    }

    /// The settings.
    pub fn settings(&self) -> &SmtpSettings {
        &self.settings
    }

    async fn transport(
        &self,
    ) -> Result<(AccessToken, AsyncSmtpTransport<Tokio1Executor>), SendError> {
        let token = self.tokens.token().await.map_err(auth_to_send)?;
        let mut current = self.current.lock().await;
        if let Some((generation, t)) = current.as_ref()
            && *generation == token.generation()
        {
            return Ok((token, t.clone()));
        }
        let tls = match self.settings.security {
            Security::StartTls => Tls::Required(self.tls.clone()),
            Security::ImplicitTls => Tls::Wrapper(self.tls.clone()),
        };
        let t = AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(self.settings.host.clone())
            .port(self.settings.port)
            .tls(tls)
            .timeout(Some(self.settings.timeout))
            .authentication(vec![Mechanism::Xoauth2])
            .credentials(Credentials::new(
                self.settings.mailbox.clone(),
                token.secret().expose().to_owned(),
            ))
            .pool_config(
                PoolConfig::new()
                    .max_size(self.settings.max_connections.max(1))
                    .idle_timeout(Duration::from_secs(60)),
            )
            .build();
        *current = Some((token.generation(), t.clone()));
        Ok((token, t))
    }

    /// Sends a message. On an authentication failure the token is dropped,
    /// a new one fetched, and the send tried once more.
    pub async fn send(&self, message: &Prepared) -> Result<Receipt, SendError> {
        let (token, transport) = self.transport().await?;
        match transport.send_raw(&message.envelope, &message.raw).await {
            Ok(r) => Ok(receipt(&r)),
            Err(e) => {
                let err = classify(&e);
                if err.kind() != FailureKind::Authentication {
                    return Err(err);
                }
                tracing::warn!(account = %self.tokens.account(), message_id = %message.message_id, error = %err, "token rejected; refreshing once and retrying");
                self.tokens.invalidate(&token).await;
                let (_, transport) = self.transport().await?;
                transport
                    .send_raw(&message.envelope, &message.raw)
                    .await
                    .map(|r| receipt(&r))
                    .map_err(|e| classify(&e))
            }
        }
    }

    /// Connects, upgrades to TLS, authenticates and quits without sending:
    /// what `sendbox check` runs per account.
    pub async fn check(&self) -> Result<(), SendError> {
        let (token, transport) = self.transport().await?;
        match transport.test_connection().await {
            Ok(true) => Ok(()),
            Ok(false) => Err(SendError::new(
                FailureKind::Transient,
                "the server did not answer NOOP",
            )),
            Err(e) => {
                let err = classify(&e);
                if err.kind() == FailureKind::Authentication {
                    self.tokens.invalidate(&token).await;
                }
                Err(err)
            }
        }
    }
}

fn receipt(r: &lettre::transport::smtp::response::Response) -> Receipt {
    Receipt {
        reply: format!("{} {}", r.code(), r.message().collect::<Vec<_>>().join(" ")),
    }
}

/// Token problems as send failures: an unreachable token endpoint is worth
/// retrying; a refused client is the operator's to fix.
pub fn auth_to_send(e: AuthError) -> SendError {
    let kind = if e.is_transient() {
        FailureKind::Transient
    } else {
        FailureKind::Authentication
    };
    SendError::new(kind, format!("cannot get an access token: {e}"))
}

/// Classifies a lettre error.
pub fn classify(e: &lettre::transport::smtp::Error) -> SendError {
    let text = std::error::Error::source(e)
        .map(|s| s.to_string())
        .unwrap_or_default();
    if let Some(code) = e.status().and_then(|c| c.to_string().parse::<u16>().ok()) {
        return SendError::from_reply(code, &text);
    }
    if e.is_client() && text.contains("does not expect a challenge") {
        // The server answered our XOAUTH2 response with a 334 challenge
        // (Gmail's style of saying the token is bad).
        return SendError::new(
            FailureKind::Authentication,
            "the server rejected the access token (334 challenge during XOAUTH2)",
        );
    }
    if text.contains("STARTTLS is not supported") {
        return SendError::new(
            FailureKind::Configuration,
            "the server does not offer STARTTLS, so sendbox will not authenticate on it",
        )
        .with_fix("use the provider's submission port 587 with STARTTLS, or `security = \"implicit_tls\"` on port 465");
    }
    if e.is_tls() {
        return SendError::new(FailureKind::Configuration, format!("TLS failed: {text}"))
            .with_fix("check the host name and, for a private relay, `ca_file`");
    }
    SendError::new(FailureKind::Transient, e.to_string())
}
