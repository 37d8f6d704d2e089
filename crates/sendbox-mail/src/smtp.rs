//! SMTP with XOAUTH2: STARTTLS on 587 (refusing to authenticate without it)
//! or implicit TLS on 465, a connection pool capped per account, and one
//! token refresh + retry when the server rejects the token.
//!
//! Where the server offers PIPELINING (RFC 2920; Microsoft 365 and Gmail
//! do), a message's `MAIL FROM`, `RCPT TO`s and `DATA` go out in one write
//! and their replies are read in order: two round trips per message instead
//! of three or more, which is what bounds a connection's rate when the
//! server is near.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use std::time::Instant;

use lettre::transport::smtp::authentication::{Credentials, Mechanism};
use lettre::transport::smtp::client::{AsyncSmtpConnection, Certificate, TlsParameters};
use lettre::transport::smtp::commands::{Data, Ehlo, Mail, Rcpt, Rset};
use lettre::transport::smtp::extension::{ClientId, Extension, MailBodyParameter, MailParameter};
use sendbox_auth::{AccessToken, AuthError, TokenProvider};
use tokio::sync::Semaphore;

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
    settings: SmtpSettings,
    tls: TlsParameters,
    hello: ClientId,
    tokens: Arc<TokenProvider>,
    /// Authenticated connections not in use, most recent last.
    idle: std::sync::Mutex<Vec<Idle>>,
    /// One permit per connection the provider lets us open.
    connections: Semaphore,
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
        let connections = Semaphore::new(settings.max_connections.max(1) as usize);
        Ok(SmtpTransport {
            settings,
            tls,
            hello: ClientId::default(),
            tokens,
            idle: std::sync::Mutex::new(Vec::new()),
            connections,
        })
    }

    /// The settings.
    pub fn settings(&self) -> &SmtpSettings {
        &self.settings
    }

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
                conn.abort().await;
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
                conn.abort().await;
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
            conn.abort().await;
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

    /// Sends a message over a pooled connection, or a new one.
    ///
    /// Only a failure *before* the message's data was handed over is tried
    /// again on a fresh connection: once the data is sent, a lost answer
    /// (timeout, dropped connection) may mean the server has the message,
    /// so the error says so ([`SendError::may_have_been_delivered`]) and the
    /// caller retries later with the same Message-ID rather than at once.
    pub async fn send(&self, message: &Prepared) -> Result<Receipt, SendError> {
        let _permit = self
            .connections
            .acquire()
            .await
            .map_err(|e| SendError::new(FailureKind::Transient, e.to_string()))?;
        if let Some(mut conn) = self.take_idle() {
            match self.transact(&mut conn, message).await {
                Err(e) if e.code.is_none() && !e.may_have_been_delivered() => {
                    // The idle connection had died (closed by the server)
                    // before the data went out: a fresh one.
                    tracing::debug!(error = %e, "pooled connection failed; opening a new one");
                }
                done => {
                    self.put_back(conn);
                    return done;
                }
            }
        }
        let mut conn = self.open().await?;
        let result = self.transact(&mut conn, message).await;
        self.put_back(conn);
        result
    }

    /// One mail transaction: MAIL, a RCPT per recipient (a refused recipient
    /// fails only itself), DATA, the message. A reply leaves the connection
    /// usable (reset when the transaction did not finish); anything else
    /// breaks it.
    async fn transact(&self, conn: &mut Conn, message: &Prepared) -> Result<Receipt, SendError> {
        let result = self.transaction(conn, message).await;
        if let Err(e) = &result {
            if e.code.is_some() {
                if self.bounded("RSET", conn.smtp.command(Rset)).await.is_err() {
                    conn.smtp.abort().await;
                }
            } else {
                conn.smtp.abort().await;
            }
        }
        result
    }

    async fn transaction(&self, conn: &mut Conn, message: &Prepared) -> Result<Receipt, SendError> {
        let envelope = &message.envelope;
        let smtp = &mut conn.smtp;
        let mut options = Vec::new();
        let non_ascii = envelope
            .from()
            .into_iter()
            .chain(envelope.to())
            .any(|a| !AsRef::<str>::as_ref(a).is_ascii());
        if non_ascii {
            if !smtp.server_info().supports_feature(Extension::SmtpUtfEight) {
                return Err(SendError::new(
                    FailureKind::Permanent,
                    "an address has non-ASCII characters and the server does not offer SMTPUTF8",
                ));
            }
            options.push(MailParameter::SmtpUtfEight);
        }
        if !message.raw.is_ascii() {
            if !smtp.server_info().supports_feature(Extension::EightBitMime) {
                return Err(SendError::new(
                    FailureKind::Permanent,
                    "the message has 8-bit content and the server does not offer 8BITMIME",
                ));
            }
            options.push(MailParameter::Body(MailBodyParameter::EightBitMime));
        }
        let mail = Mail::new(envelope.from().cloned(), options);
        let rcpts: Vec<Rcpt> = envelope
            .to()
            .iter()
            .map(|to| Rcpt::new(to.clone(), Vec::new()))
            .collect();
        // The envelope's replies, in order: MAIL, each RCPT, DATA.
        let (mail_reply, rcpt_replies, data_reply) = if conn.pipelining {
            // One write; then every reply is read, whatever each says, so
            // the connection stays in step for the RSET that follows a
            // refusal.
            let mut group = mail.to_string();
            for r in &rcpts {
                group.push_str(&r.to_string());
            }
            group.push_str(&Data.to_string());
            let mail_reply = self.bounded("MAIL FROM", smtp.command(group)).await;
            // A broken connection or a 421 (the server is closing it) ends
            // the reading; a refused MAIL stays the answer.
            let fatal = |r: &Result<_, SendError>| matches!(r, Err(e) if e.code.is_none() || e.code == Some(421));
            if let Some(e) = mail_reply.as_ref().err().filter(|_| fatal(&mail_reply)) {
                return Err(e.clone());
            }
            let mut rcpt_replies = Vec::with_capacity(rcpts.len());
            for _ in &rcpts {
                let reply = self.bounded("RCPT TO", smtp.read_response()).await;
                if let Some(e) = reply.as_ref().err().filter(|_| fatal(&reply)) {
                    return Err(mail_reply.err().unwrap_or_else(|| e.clone()));
                }
                rcpt_replies.push(reply);
            }
            let data_reply = self.bounded("DATA", smtp.read_response()).await;
            if let Some(e) = data_reply.as_ref().err().filter(|_| fatal(&data_reply)) {
                return Err(mail_reply.err().unwrap_or_else(|| e.clone()));
            }
            (mail_reply, rcpt_replies, Some(data_reply))
        } else {
            let mail_reply = self.bounded("MAIL FROM", smtp.command(mail)).await;
            if let Err(e) = mail_reply {
                return Err(e);
            }
            let mut rcpt_replies = Vec::with_capacity(rcpts.len());
            for r in rcpts {
                let reply = self.bounded("RCPT TO", smtp.command(r)).await;
                if let Err(e) = &reply
                    && e.code.is_none()
                {
                    return Err(e.clone());
                }
                rcpt_replies.push(reply);
            }
            (mail_reply, rcpt_replies, None)
        };
        if let Err(e) = mail_reply {
            self.end_unwanted_data(smtp, &data_reply).await;
            return Err(e);
        }
        let mut refused = Vec::new();
        for (to, reply) in envelope.to().iter().zip(rcpt_replies) {
            if let Err(error) = reply {
                refused.push(RefusedRecipient {
                    address: to.to_string(),
                    error,
                });
            }
        }
        if refused.len() == envelope.to().len() {
            self.end_unwanted_data(smtp, &data_reply).await;
            // Nobody to send to: the first refusal is the answer (all
            // permanent means the message is dead; any 4xx, try later).
            let mut all = refused;
            let transient = all.iter().position(|r| r.error.is_transient());
            let first = all.swap_remove(transient.unwrap_or(0));
            return Err(first.error.for_recipient(&first.address));
        }
        match data_reply {
            Some(reply) => reply.map(|_| ())?,
            None => self.bounded("DATA", smtp.command(Data)).await.map(|_| ())?,
        }
        // The connection ends the data with CRLF "." CRLF itself: a
        // message's own final line break would become an extra empty line.
        let data = message.raw.strip_suffix(b"\r\n").unwrap_or(&message.raw);
        match self.bounded("the message", smtp.message(data)).await {
            Ok(r) => Ok(Receipt {
                reply: format!("{} {}", r.code(), r.message().collect::<Vec<_>>().join(" ")),
                refused,
            }),
            Err(e) if e.code.is_some() => Err(e),
            Err(e) => Err(e.after_data()),
        }
    }

    /// A pipelined DATA the server accepted although the transaction is
    /// being given up (its MAIL or every RCPT refused) is ended at once,
    /// empty, so the RSET that follows is read as a command.
    async fn end_unwanted_data(
        &self,
        smtp: &mut AsyncSmtpConnection,
        data_reply: &Option<Result<lettre::transport::smtp::response::Response, SendError>>,
    ) {
        if let Some(Ok(_)) = data_reply {
            let _ = self.bounded("the end of data", smtp.message(b"")).await;
        }
    }

    /// Connects, upgrades to TLS, authenticates and quits without sending:
    /// what `sendbox check` runs per account.
    pub async fn check(&self) -> Result<(), SendError> {
        let _permit = self
            .connections
            .acquire()
            .await
            .map_err(|e| SendError::new(FailureKind::Transient, e.to_string()))?;
        let mut conn = self.open().await?;
        let _ = conn.smtp.quit().await;
        Ok(())
    }

    /// Closes idle connections politely.
    pub async fn close(&self) {
        let idle: Vec<Idle> = std::mem::take(
            &mut *self
                .idle
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        );
        for mut i in idle {
            let _ = i.conn.smtp.quit().await;
        }
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
