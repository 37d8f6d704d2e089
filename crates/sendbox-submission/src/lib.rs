//! The SMTP submission listener: scanners, printers and legacy apps hand
//! mail to sendbox over SMTP (RFC 5321, with STARTTLS per RFC 3207 or
//! implicit TLS, AUTH PLAIN/LOGIN per RFC 4954, SIZE, PIPELINING,
//! 8BITMIME, ENHANCEDSTATUSCODES).
//!
//! This crate owns the protocol and everything a client can make the host
//! hold: connections (a cap overall and per client address), lines
//! (1,000 bytes for commands), messages (`max_message_bytes`), recipients,
//! time (per command, per message, per session) and failed logins (limited
//! per client address, logged without the password). It decides who may
//! submit: an authenticated user, or a client in an allowed network;
//! nobody else gets past `MAIL FROM`.
//!
//! It must not know the outbox, plugins or accounts: a finished message
//! ([`Submission`]) goes to the [`Handler`], whose [`Reply`] is what the
//! client hears — so a `250` means whatever the handler made of it (the
//! daemon answers only after its outbox commit).

mod address;
mod auth;
mod io;
mod session;
mod tls;

use std::collections::HashMap;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

pub use auth::{LoginLimiter, PasswordHash, Users, UsersError};
pub use ipnet::IpNet;
pub use tls::{TlsError, server_config};

/// How a listener uses TLS.
#[derive(Clone)]
pub enum Tls {
    /// Plain text only (then AUTH is offered to loopback clients only).
    None,
    /// Plain text first; `STARTTLS` upgrades.
    StartTls(Arc<rustls::ServerConfig>),
    /// TLS from the first byte (port 465 style).
    Implicit(Arc<rustls::ServerConfig>),
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Tls::None => "None",
            Tls::StartTls(_) => "StartTls",
            Tls::Implicit(_) => "Implicit",
        })
    }
}

/// A listener's settings: who may submit, and every cap and timeout.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The listener's name, in logs and on each [`Submission`].
    pub name: String,
    /// The name in the greeting and the EHLO reply.
    pub hostname: String,
    /// TLS.
    pub tls: Tls,
    /// Refuse `MAIL FROM` on a connection that is not encrypted (loopback
    /// clients excepted).
    pub require_tls: bool,
    /// Local users who may submit after AUTH; `None`: AUTH is not offered.
    pub users: Option<Arc<Users>>,
    /// Clients in these networks may submit without AUTH.
    pub allow_networks: Vec<IpNet>,
    /// Recipients this listener accepts (`a@b.c` or `*@b.c`); empty: any.
    /// Others are refused at `RCPT TO`.
    pub allowed_recipients: Vec<String>,
    /// The largest message, in bytes (announced with SIZE).
    pub max_message_bytes: usize,
    /// Recipients per message.
    pub max_recipients: usize,
    /// Connections at once, in all.
    pub max_connections: usize,
    /// Connections at once from one client address.
    pub max_connections_per_client: usize,
    /// How long the listener waits for a command line (or an AUTH answer).
    pub command_timeout: Duration,
    /// How long a message's DATA may take to arrive, in all.
    pub data_timeout: Duration,
    /// How long one connection may last, in all.
    pub session_timeout: Duration,
    /// Failed logins from one client address within `login_window`
    /// before it is refused for that long.
    pub max_failed_logins: u32,
    /// See `max_failed_logins`.
    pub login_window: Duration,
}

impl Settings {
    /// Settings with the defaults an operator would expect: 25 MiB, 100
    /// recipients, 64 connections (8 per client), 60 s per command, 10 min
    /// per message and per session, 5 failed logins per 5 minutes.
    pub fn new(name: &str) -> Settings {
        Settings {
            name: name.to_owned(),
            hostname: "sendbox".into(),
            tls: Tls::None,
            require_tls: false,
            users: None,
            allow_networks: Vec::new(),
            allowed_recipients: Vec::new(),
            max_message_bytes: 25 << 20,
            max_recipients: 100,
            max_connections: 64,
            max_connections_per_client: 8,
            command_timeout: Duration::from_secs(60),
            data_timeout: Duration::from_secs(600),
            session_timeout: Duration::from_secs(600),
            max_failed_logins: 5,
            login_window: Duration::from_secs(300),
        }
    }
}

/// A message a client finished sending.
#[derive(Clone)]
pub struct Submission {
    /// The listener it came through.
    pub listener: String,
    /// The client's address.
    pub client: SocketAddr,
    /// The authenticated user, if any.
    pub user: Option<String>,
    /// The name the client gave in EHLO/HELO.
    pub helo: String,
    /// Whether the connection was encrypted.
    pub tls: bool,
    /// `MAIL FROM` (may be empty: a bounce).
    pub mail_from: String,
    /// `RCPT TO`, in order, without duplicates.
    pub recipients: Vec<String>,
    /// The message as sent (dot-unstuffed, lines ending in CRLF).
    pub raw: Vec<u8>,
}

impl std::fmt::Debug for Submission {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Submission")
            .field("listener", &self.listener)
            .field("client", &self.client)
            .field("user", &self.user)
            .field("mail_from", &self.mail_from)
            .field("recipients", &self.recipients)
            .field("bytes", &self.raw.len())
            .finish()
    }
}

/// An SMTP reply: code, enhanced status code and text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    /// 250, 451, 550...
    pub code: u16,
    /// `2.0.0`...
    pub status: String,
    /// One line of text (CR and LF are replaced).
    pub text: String,
}

impl Reply {
    /// A reply; `text` is cut to one line.
    pub fn new(code: u16, status: &str, text: impl Into<String>) -> Reply {
        let text: String = text.into();
        Reply {
            code,
            status: status.to_owned(),
            text: text.replace(['\r', '\n'], " ").chars().take(400).collect(),
        }
    }

    /// Whether it accepts (2xx).
    pub fn is_positive(&self) -> bool {
        (200..300).contains(&self.code)
    }
}

/// What becomes of a finished message: the handler's reply is the client's.
pub type Handler =
    Arc<dyn Fn(Submission) -> Pin<Box<dyn Future<Output = Reply> + Send>> + Send + Sync>;

/// Connections per client address, for `max_connections_per_client`.
#[derive(Default)]
struct PerClient(Mutex<HashMap<IpAddr, usize>>);

/// One connection counted in [`PerClient`] until dropped.
struct ClientSlot {
    map: Arc<PerClient>,
    ip: IpAddr,
}

impl PerClient {
    fn take(self: &Arc<Self>, ip: IpAddr, cap: usize) -> Option<ClientSlot> {
        let mut map = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        let n = map.entry(ip).or_insert(0);
        if *n >= cap {
            return None;
        }
        *n += 1;
        Some(ClientSlot {
            map: self.clone(),
            ip,
        })
    }
}

impl Drop for ClientSlot {
    fn drop(&mut self) {
        let mut map = self.map.0.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(n) = map.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                map.remove(&self.ip);
            }
        }
    }
}

/// The client address as IPv4 when it is IPv4-mapped IPv6.
pub(crate) fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// Serves SMTP on `listener` until `stop` resolves: stops accepting, tells
/// idle clients `421` and waits for messages being received to be handled.
pub async fn serve(
    listener: tokio::net::TcpListener,
    settings: Settings,
    handler: Handler,
    stop: impl Future<Output = ()> + Send,
) -> std::io::Result<()> {
    let settings = Arc::new(settings);
    let connections = Arc::new(tokio::sync::Semaphore::new(settings.max_connections));
    let per_client = Arc::new(PerClient::default());
    let logins = Arc::new(LoginLimiter::new(
        settings.max_failed_logins,
        settings.login_window,
    ));
    let (stopping_tx, stopping) = tokio::sync::watch::channel(false);
    let mut sessions = tokio::task::JoinSet::new();
    tokio::pin!(stop);
    loop {
        let (stream, peer) = tokio::select! {
            _ = &mut stop => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors and the like: wait, go on.
                    tracing::warn!(listener = %settings.name, error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        while sessions.try_join_next().is_some() {}
        let _ = stream.set_nodelay(true);
        let ip = canonical(peer.ip());
        let permit = connections.clone().try_acquire_owned().ok();
        let slot = per_client.take(ip, settings.max_connections_per_client);
        let refusal = if logins.locked(ip) {
            Some("421 4.7.0 Too many failed logins from your address; try again later\r\n")
        } else if permit.is_none() {
            Some("421 4.7.0 Too many connections; try again later\r\n")
        } else if slot.is_none() {
            Some("421 4.7.0 Too many connections from your address; try again later\r\n")
        } else {
            None
        };
        if let Some(text) = refusal {
            // Refused in place: one non-blocking write into the fresh
            // socket's empty buffer, then closed. No task, nothing held.
            tracing::warn!(listener = %settings.name, client = %peer, reason = text.trim_end(), "connection refused");
            let _ = stream.try_write(text.as_bytes());
            continue;
        }
        let (settings, handler, logins, stopping) = (
            settings.clone(),
            handler.clone(),
            logins.clone(),
            stopping.clone(),
        );
        sessions.spawn(async move {
            let _held = (permit, slot);
            session::run(stream, peer, settings, handler, logins, stopping).await;
        });
    }
    drop(listener);
    let _ = stopping_tx.send(true);
    while sessions.join_next().await.is_some() {}
    Ok(())
}
