//! SMTP with XOAUTH2: STARTTLS on 587 (refusing to authenticate without it)
//! or implicit TLS on 465, a connection pool capped per account, and one
//! token refresh + retry when the server rejects the token.
//!
//! Each open connection is driven by a lane ([`lane`]): a task that takes
//! the messages waiting for the account, one after another, while there
//! are any. Where the server offers PIPELINING (RFC 2920; Microsoft 365
//! and Gmail do), a message's `MAIL FROM`, `RCPT TO`s and `DATA` go out in
//! one write, and when another message is waiting its envelope follows the
//! previous message's data in the same write ([`transaction`]): one round
//! trip per message instead of three or more, which is what bounds a
//! connection's rate when the server is far (or near and busy).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use std::time::Instant;

use lettre::transport::smtp::authentication::{Credentials, Mechanism};
use lettre::transport::smtp::client::{AsyncSmtpConnection, Certificate, TlsParameters};
use lettre::transport::smtp::commands::Ehlo;
use lettre::transport::smtp::extension::ClientId;
use sendbox_auth::{AccessToken, AuthError, TokenProvider};
use tokio::sync::Semaphore;

mod lane;
mod transaction;

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
///
/// Connections are pooled here rather than in lettre: lettre's pool caps
/// only idle connections and returns a connection to the pool on a spawned
/// task, so a burst opens more connections than Exchange's 3 allows. Here a
/// semaphore caps connections in use and idle ones are reused in place.
pub struct SmtpTransport {
    inner: Arc<Inner>,
}

/// What the transport and its lanes share.
struct Inner {
    settings: SmtpSettings,
    tls: TlsParameters,
    hello: ClientId,
    tokens: Arc<TokenProvider>,
    /// Authenticated connections not in use, most recent last.
    idle: std::sync::Mutex<Vec<Idle>>,
    /// One permit per connection the provider lets us open: each lane,
    /// and [`SmtpTransport::check`], holds one.
    connections: Arc<Semaphore>,
    /// Messages waiting for a lane.
    queue: std::sync::Mutex<lane::Queue>,
}

struct Idle {
    conn: Conn,
    since: Instant,
}

/// An authenticated connection and what its server offers beyond what
/// lettre records.
struct Conn {
    smtp: AsyncSmtpConnection,
    /// The server offers PIPELINING (RFC 2920).
    pipelining: bool,
}

/// Idle connections older than this are closed rather than reused.
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);

impl std::fmt::Debug for SmtpTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SmtpTransport")
            .field("settings", &self.inner.settings)
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
    /// Recipients the server refused at `RCPT TO`; the message went to the
    /// others.
    pub refused: Vec<RefusedRecipient>,
}

/// One recipient the server would not take.
#[derive(Debug, Clone)]
pub struct RefusedRecipient {
    /// The address.
    pub address: String,
    /// The server's reply for it (permanent for 5xx, transient for 4xx).
    pub error: SendError,
}

impl SmtpTransport {
    /// Prepares the transport; nothing connects until the first send.
    pub fn new(settings: SmtpSettings, tokens: Arc<TokenProvider>) -> Result<Self, SendError> {
        let mut tls = TlsParameters::builder(settings.host.clone());
        if let Some(ca) = &settings.ca_file {
            let pem = std::fs::read(ca)
                .map_err(|e| config_error(format!("cannot read ca_file {}: {e}", ca.display())))?;
            let cert = Certificate::from_pem(&pem).map_err(|e| {
                config_error(format!(
                    "ca_file {} is not a PEM certificate: {e}",
                    ca.display()
                ))
            })?;
            tls = tls.add_root_certificate(cert);
        }
        let tls = tls
            .build_rustls()
            .map_err(|e| config_error(format!("TLS setup for {}: {e}", settings.host)))?;
        let connections = Arc::new(Semaphore::new(settings.max_connections.max(1) as usize));
        Ok(SmtpTransport {
            inner: Arc::new(Inner {
                settings,
                tls,
                hello: ClientId::default(),
                tokens,
                idle: std::sync::Mutex::new(Vec::new()),
                connections,
                queue: std::sync::Mutex::new(lane::Queue::default()),
            }),
        })
    }

    /// The settings.
    pub fn settings(&self) -> &SmtpSettings {
        &self.inner.settings
    }

    /// Sends a message over a pooled connection, or a new one.
    ///
    /// Only a failure *before* the message's data was handed over is tried
    /// again on a fresh connection: once the data is sent, a lost answer
    /// (timeout, dropped connection) may mean the server has the message,
    /// so the error says so ([`SendError::may_have_been_delivered`]) and the
    /// caller retries later with the same Message-ID rather than at once.
    /// A send given up by its caller before its turn came is never sent.
    pub async fn send(&self, message: Prepared) -> Result<Receipt, SendError> {
        lane::submit(&self.inner, message).await
    }

    /// Connects, upgrades to TLS, authenticates and quits without sending:
    /// what `sendbox check` runs per account.
    pub async fn check(&self) -> Result<(), SendError> {
        let permit = self
            .inner
            .connections
            .acquire()
            .await
            .map_err(|e| SendError::new(FailureKind::Transient, e.to_string()))?;
        let result = match self.inner.open().await {
            Ok(mut conn) => {
                let _ = self.inner.bounded("QUIT", conn.smtp.quit()).await;
                Ok(())
            }
            Err(e) => Err(e),
        };
        drop(permit);
        // A message queued while this held the last permit needs a lane.
        lane::start_if_needed(&self.inner);
        result
    }

    /// Closes the connections politely, after waiting (one command timeout
    /// at most) for the lanes still sending to finish and leave theirs
    /// idle: when this returns, no connection is open unless a send
    /// outlasted that wait. Messages queued meanwhile wait, then go on new
    /// connections.
    pub async fn close(&self) {
        let inner = &self.inner;
        let all = inner.settings.max_connections.max(1);
        let lanes_done =
            tokio::time::timeout(inner.settings.timeout, inner.connections.acquire_many(all)).await;
        let idle: Vec<Idle> = std::mem::take(
            &mut *inner
                .idle
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        );
        for mut i in idle {
            let _ = inner.bounded("QUIT", i.conn.smtp.quit()).await;
        }
        drop(lanes_done);
        lane::start_if_needed(inner);
    }
}

impl Inner {
    /// Connects, secures and authenticates one connection with `token`.
    async fn open_with(&self, token: &AccessToken) -> Result<Conn, SendError> {
        let mut conn = match self.settings.security {
            Security::ImplicitTls => AsyncSmtpConnection::connect_tokio1(
                (self.settings.host.as_str(), self.settings.port),
                Some(self.settings.timeout),
                &self.hello,
                Some(self.tls.clone()),
                None,
            )
            .await
            .map_err(|e| classify(&e))?,
            Security::StartTls => {
                // Our own socket, with Nagle off: SMTP is a ping-pong of
                // small writes, and Nagle plus delayed ACKs costs ~40 ms
                // per message otherwise.
                let addr = (self.settings.host.as_str(), self.settings.port);
                let tcp = tokio::time::timeout(
                    self.settings.timeout,
                    tokio::net::TcpStream::connect(addr),
                )
                .await
                .map_err(|_| {
                    SendError::new(
                        FailureKind::Transient,
                        format!(
                            "connecting to {}:{} timed out",
                            self.settings.host, self.settings.port
                        ),
                    )
                })?
                .map_err(|e| {
                    SendError::new(
                        FailureKind::Transient,
                        format!(
                            "cannot connect to {}:{}: {e}",
                            self.settings.host, self.settings.port
                        ),
                    )
                })?;
                let _ = tcp.set_nodelay(true);
                tokio::time::timeout(
                    self.settings.timeout,
                    AsyncSmtpConnection::connect_with_transport(Box::new(tcp), &self.hello),
                )
                .await
                .map_err(|_| SendError::new(FailureKind::Transient, "no SMTP greeting in time"))?
                .map_err(|e| classify(&e))?
            }
        };
        if self.settings.security == Security::StartTls {
            let upgraded = self
                .bounded("STARTTLS", conn.starttls(self.tls.clone(), &self.hello))
                .await;
            if let Err(e) = upgraded {
                self.abort(&mut conn).await;
                return Err(e);
            }
        }
        // lettre keeps only the EHLO keywords it knows; ask once more (on
        // the secured connection, before AUTH) to learn about PIPELINING.
        let pipelining = match self
            .bounded("EHLO", conn.command(Ehlo::new(self.hello.clone())))
            .await
        {
            Ok(reply) => offers_pipelining(reply.message()),
            Err(e) => {
                self.abort(&mut conn).await;
                return Err(e);
            }
        };
        let credentials = Credentials::new(
            self.settings.mailbox.clone(),
            token.secret().expose().to_owned(),
        );
        let authed = self
            .bounded("AUTH", conn.auth(&[Mechanism::Xoauth2], &credentials))
            .await;
        if let Err(e) = authed {
            self.abort(&mut conn).await;
            return Err(e);
        }
        Ok(Conn {
            smtp: conn,
            pipelining,
        })
    }

    /// Runs one SMTP exchange under the command timeout.
    async fn bounded<T>(
        &self,
        what: &str,
        fut: impl std::future::Future<Output = Result<T, lettre::transport::smtp::Error>>,
    ) -> Result<T, SendError> {
        match tokio::time::timeout(self.settings.timeout, fut).await {
            Ok(r) => r.map_err(|e| classify(&e)),
            Err(_) => Err(SendError::new(
                FailureKind::Transient,
                format!(
                    "{what} got no answer from {} within {:?}",
                    self.settings.host, self.settings.timeout
                ),
            )),
        }
    }

    /// A new authenticated connection. When the server rejects the token,
    /// the token is dropped, a new one fetched and the login tried once
    /// more.
    async fn open(&self) -> Result<Conn, SendError> {
        let token = self.tokens.token().await.map_err(auth_to_send)?;
        match self.open_with(&token).await {
            Err(err) if err.kind() == FailureKind::Authentication => {
                tracing::warn!(account = %self.tokens.account(), error = %err, "token rejected; refreshing once and retrying");
                self.tokens.invalidate(&token).await;
                let token = self.tokens.token().await.map_err(auth_to_send)?;
                self.open_with(&token).await
            }
            other => other,
        }
    }

    fn take_idle(&self) -> Option<Conn> {
        let mut idle = self
            .idle
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        while let Some(i) = idle.pop() {
            if i.since.elapsed() < IDLE_TIMEOUT && !i.conn.smtp.has_broken() {
                return Some(i.conn);
            }
            // Too old: let it drop (the server has likely closed it).
        }
        None
    }

    fn put_back(&self, conn: Conn) {
        if conn.smtp.has_broken() {
            return;
        }
        let mut idle = self
            .idle
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        idle.push(Idle {
            conn,
            since: Instant::now(),
        });
    }

    /// Ends a connection that is out of step or broken: QUIT if lettre
    /// still thinks it usable, bounded by the command timeout.
    async fn abort(&self, smtp: &mut AsyncSmtpConnection) {
        let _ = tokio::time::timeout(self.settings.timeout, smtp.abort()).await;
    }
}

/// Whether an EHLO reply's lines offer PIPELINING.
fn offers_pipelining<'a>(mut lines: impl Iterator<Item = &'a str>) -> bool {
    lines.any(|l| {
        l.split_whitespace()
            .next()
            .is_some_and(|k| k.eq_ignore_ascii_case("PIPELINING"))
    })
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
