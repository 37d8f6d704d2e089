//! One SMTP connection: greeting, EHLO, STARTTLS, AUTH, one or more
//! transactions (MAIL, RCPT, DATA), QUIT — with a timeout on every wait.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpStream;

use crate::address::{matches_pattern, path_arg, valid_address};
use crate::io::{Conn, ReadError, Stream};
use crate::{Handler, LoginLimiter, Reply, Settings, Submission, Tls, canonical};

mod login;

/// Protocol errors tolerated before the connection is closed.
const MAX_ERRORS: u32 = 10;

/// Commands per connection, so an idle chatterer cannot hold a slot for
/// ever within the session timeout.
const MAX_COMMANDS: u32 = 10_000;

struct Session {
    settings: Arc<Settings>,
    handler: Handler,
    logins: Arc<LoginLimiter>,
    peer: SocketAddr,
    loopback: bool,
    helo: Option<String>,
    user: Option<String>,
    mail_from: Option<String>,
    recipients: Vec<String>,
    errors: u32,
}

/// What the loop does after a command.
enum Next {
    Continue,
    Close,
    StartTls,
}

/// Runs a connection to its end (QUIT, a timeout, too many errors, the
/// session timeout, or the listener stopping).
pub(crate) async fn run(
    stream: TcpStream,
    peer: SocketAddr,
    settings: Arc<Settings>,
    handler: Handler,
    logins: Arc<LoginLimiter>,
    stopping: tokio::sync::watch::Receiver<bool>,
) {
    let span = tracing::info_span!("smtp", listener = %settings.name, client = %peer);
    let _enter = span.enter();
    let session_timeout = settings.session_timeout;
    let mut session = Session {
        loopback: canonical(peer.ip()).is_loopback(),
        settings,
        handler,
        logins,
        peer,
        helo: None,
        user: None,
        mail_from: None,
        recipients: Vec::new(),
        errors: 0,
    };
    drop(_enter);
    let conn = match &session.settings.tls {
        Tls::Implicit(config) => {
            let acceptor = tokio_rustls::TlsAcceptor::from(config.clone());
            match tokio::time::timeout(session.settings.command_timeout, acceptor.accept(stream))
                .await
            {
                Ok(Ok(tls)) => Conn::new(Stream::Tls(Box::new(tls))),
                Ok(Err(e)) => {
                    tracing::info!(parent: &span, error = %e, "TLS handshake failed");
                    return;
                }
                Err(_) => return,
            }
        }
        _ => Conn::new(Stream::Plain(stream)),
    };
    let mut conn = Some(conn);
    let work = session.serve(&mut conn, stopping);
    if tokio::time::timeout(
        session_timeout,
        tracing::Instrument::instrument(work, span.clone()),
    )
    .await
    .is_err()
    {
        tracing::info!(parent: &span, "session timeout");
        if let Some(c) = conn.as_mut() {
            let _ = c
                .write("421 4.4.2 Session time limit reached; closing\r\n")
                .await;
        }
    }
    if let Some(mut c) = conn {
        c.shutdown().await;
    }
}

impl Session {
    async fn serve(
        &mut self,
        slot: &mut Option<Conn>,
        mut stopping: tokio::sync::watch::Receiver<bool>,
    ) {
        let greeting = format!("220 {} ESMTP sendbox\r\n", self.settings.hostname);
        let Some(conn) = slot.as_mut() else { return };
        if conn.write(&greeting).await.is_err() {
            return;
        }
        let mut commands = 0u32;
        loop {
            let Some(conn) = slot.as_mut() else { return };
            let line = tokio::select! {
                line = conn.read_line(self.settings.command_timeout) => line,
                _ = stopped(&mut stopping) => {
                    let _ = conn.write("421 4.3.2 Service shutting down; try again later\r\n").await;
                    return;
                }
            };
            let line = match line {
                Ok(l) => l,
                Err(ReadError::TooLong) => {
                    let _ = conn.write("500 5.5.2 Line too long; closing\r\n").await;
                    return;
                }
                Err(ReadError::Timeout) => {
                    let _ = conn
                        .write("421 4.4.2 Timeout waiting for a command; closing\r\n")
                        .await;
                    return;
                }
                Err(ReadError::Closed) => return,
                Err(ReadError::Io(e)) => {
                    tracing::debug!(error = %e, "connection lost");
                    return;
                }
            };
            commands += 1;
            if commands > MAX_COMMANDS {
                let _ = conn.write("421 4.7.0 Too many commands; closing\r\n").await;
                return;
            }
            match self.command(conn, &line).await {
                Ok(Next::Continue) => {}
                Ok(Next::Close) | Err(_) => return,
                Ok(Next::StartTls) => {
                    let Some(plain) = slot.take() else { return };
                    let Tls::StartTls(config) = &self.settings.tls else {
                        return;
                    };
                    let Some(tcp) = plain.into_tcp() else { return };
                    let acceptor = tokio_rustls::TlsAcceptor::from(config.clone());
                    match tokio::time::timeout(self.settings.command_timeout, acceptor.accept(tcp))
                        .await
                    {
                        Ok(Ok(tls)) => {
                            *slot = Some(Conn::new(Stream::Tls(Box::new(tls))));
                            // RFC 3207: start over, knowing nothing.
                            self.helo = None;
                            self.user = None;
                            self.reset();
                        }
                        Ok(Err(e)) => {
                            tracing::info!(error = %e, "STARTTLS handshake failed");
                            return;
                        }
                        Err(_) => return,
                    }
                }
            }
        }
    }

    fn reset(&mut self) {
        self.mail_from = None;
        self.recipients.clear();
    }

    /// A reply line.
    async fn reply(
        &mut self,
        conn: &mut Conn,
        code: u16,
        status: &str,
        text: &str,
    ) -> std::io::Result<Next> {
        conn.write(&format!("{code} {status} {text}\r\n")).await?;
        if code >= 500 && code != 535 && code != 550 && code != 552 {
            self.errors += 1;
            if self.errors >= MAX_ERRORS {
                conn.write("421 4.7.0 Too many errors; closing\r\n").await?;
                return Ok(Next::Close);
            }
        }
        Ok(Next::Continue)
    }

    /// `552`: over `max_message_bytes`.
    async fn too_big(&mut self, conn: &mut Conn) -> std::io::Result<Next> {
        let text = format!(
            "Message size exceeds the limit of {} bytes",
            self.settings.max_message_bytes
        );
        self.reply(conn, 552, "5.3.4", &text).await
    }

    fn offers_auth(&self, tls: bool) -> bool {
        self.settings.users.is_some() && (tls || self.loopback)
    }

    /// Whether this client may start a transaction.
    fn may_submit(&self) -> bool {
        let ip = canonical(self.peer.ip());
        self.user.is_some() || self.settings.allow_networks.iter().any(|n| n.contains(&ip))
    }

    async fn command(&mut self, conn: &mut Conn, line: &[u8]) -> std::io::Result<Next> {
        let Ok(line) = std::str::from_utf8(line) else {
            return self
                .reply(conn, 500, "5.5.2", "Command is not valid UTF-8")
                .await;
        };
        let (verb, arg) = match line.split_once(' ') {
            Some((v, a)) => (v.to_ascii_uppercase(), a.trim()),
            None => (line.trim().to_ascii_uppercase(), ""),
        };
        let tls = conn.is_tls();
        match verb.as_str() {
            "EHLO" | "HELO" => {
                if arg.is_empty() || arg.len() > 255 {
                    return self
                        .reply(conn, 501, "5.5.4", "Syntax: EHLO hostname")
                        .await;
                }
                self.helo = Some(arg.to_owned());
                self.reset();
                if verb == "HELO" {
                    conn.write(&format!("250 {}\r\n", self.settings.hostname))
                        .await?;
                    return Ok(Next::Continue);
                }
                let mut lines = vec![
                    self.settings.hostname.clone(),
                    "PIPELINING".into(),
                    format!("SIZE {}", self.settings.max_message_bytes),
                    "8BITMIME".into(),
                    "ENHANCEDSTATUSCODES".into(),
                ];
                if matches!(self.settings.tls, Tls::StartTls(_)) && !tls {
                    lines.push("STARTTLS".into());
                }
                if self.offers_auth(tls) && self.user.is_none() {
                    lines.push("AUTH PLAIN LOGIN".into());
                }
                let n = lines.len();
                let text: String = lines
                    .iter()
                    .enumerate()
                    .map(|(i, l)| format!("250{}{l}\r\n", if i + 1 == n { ' ' } else { '-' }))
                    .collect();
                conn.write(&text).await?;
                Ok(Next::Continue)
            }
            "STARTTLS" => {
                if !matches!(self.settings.tls, Tls::StartTls(_)) || tls {
                    return self.reply(conn, 503, "5.5.1", "TLS not available").await;
                }
                if conn.has_buffered() {
                    // Commands sent along with STARTTLS would be read as if
                    // they came after it (a command injection).
                    tracing::warn!("commands pipelined after STARTTLS; closing");
                    conn.write(
                        "501 5.5.4 Nothing may follow STARTTLS before the handshake; closing\r\n",
                    )
                    .await?;
                    return Ok(Next::Close);
                }
                conn.write("220 2.0.0 Ready to start TLS\r\n").await?;
                Ok(Next::StartTls)
            }
            "AUTH" => self.auth(conn, arg, tls).await,
            "MAIL" => {
                if self.helo.is_none() {
                    return self.reply(conn, 503, "5.5.1", "Say EHLO first").await;
                }
                if self.mail_from.is_some() {
                    return self.reply(conn, 503, "5.5.1", "Sender already given").await;
                }
                if self.settings.require_tls && !tls && !self.loopback {
                    return self
                        .reply(conn, 530, "5.7.0", "Must issue a STARTTLS command first")
                        .await;
                }
                if !self.may_submit() {
                    tracing::info!("MAIL refused: not authenticated and not in an allowed network");
                    return self
                        .reply(conn, 530, "5.7.0", "Authentication required")
                        .await;
                }
                let Some((addr, params)) = path_arg(arg, "FROM:") else {
                    return self
                        .reply(conn, 501, "5.5.4", "Syntax: MAIL FROM:<address>")
                        .await;
                };
                if !addr.is_empty() && !valid_address(addr) {
                    return self
                        .reply(conn, 553, "5.1.7", "Bad sender address syntax")
                        .await;
                }
                for p in params.split_whitespace() {
                    if let Some(size) = p.to_ascii_uppercase().strip_prefix("SIZE=") {
                        match size.parse::<u64>() {
                            Ok(n) if n > self.settings.max_message_bytes as u64 => {
                                return self.too_big(conn).await;
                            }
                            Ok(_) => {}
                            Err(_) => return self.reply(conn, 501, "5.5.4", "Bad SIZE").await,
                        }
                    }
                }
                self.mail_from = Some(addr.to_owned());
                self.reply(conn, 250, "2.1.0", "Sender OK").await
            }
            "RCPT" => {
                if self.mail_from.is_none() {
                    return self.reply(conn, 503, "5.5.1", "Need MAIL first").await;
                }
                let Some((addr, _)) = path_arg(arg, "TO:") else {
                    return self
                        .reply(conn, 501, "5.5.4", "Syntax: RCPT TO:<address>")
                        .await;
                };
                if !valid_address(addr) {
                    return self
                        .reply(conn, 553, "5.1.3", "Bad recipient address syntax")
                        .await;
                }
                if self.recipients.len() >= self.settings.max_recipients {
                    return self.reply(conn, 452, "4.5.3", "Too many recipients").await;
                }
                let allowed = &self.settings.allowed_recipients;
                if !allowed.is_empty() && !allowed.iter().any(|p| matches_pattern(addr, p)) {
                    tracing::info!(recipient = addr, "RCPT refused: not an allowed recipient");
                    return self
                        .reply(
                            conn,
                            550,
                            "5.7.1",
                            &format!("Relaying denied: {addr} is not an allowed recipient"),
                        )
                        .await;
                }
                if !self.recipients.iter().any(|r| r.eq_ignore_ascii_case(addr)) {
                    self.recipients.push(addr.to_owned());
                }
                self.reply(conn, 250, "2.1.5", "Recipient OK").await
            }
            "DATA" => {
                if self.mail_from.is_none() {
                    return self.reply(conn, 503, "5.5.1", "Need MAIL first").await;
                }
                if self.recipients.is_empty() {
                    return self.reply(conn, 554, "5.5.1", "No valid recipients").await;
                }
                conn.write("354 End data with <CR><LF>.<CR><LF>\r\n")
                    .await?;
                let data = match conn
                    .read_data(self.settings.max_message_bytes, self.settings.data_timeout)
                    .await
                {
                    Ok(d) => d,
                    Err(ReadError::Timeout) => {
                        conn.write("421 4.4.2 Timeout receiving the message; closing\r\n")
                            .await?;
                        return Ok(Next::Close);
                    }
                    Err(_) => return Ok(Next::Close),
                };
                if data.too_big {
                    self.reset();
                    return self.too_big(conn).await;
                }
                let submission = Submission {
                    listener: self.settings.name.clone(),
                    client: self.peer,
                    user: self.user.clone(),
                    helo: self.helo.clone().unwrap_or_default(),
                    tls,
                    mail_from: self.mail_from.take().unwrap_or_default(),
                    recipients: std::mem::take(&mut self.recipients),
                    raw: data.bytes,
                };
                let reply: Reply = (self.handler)(submission).await;
                self.reset();
                self.reply(conn, reply.code, &reply.status, &reply.text)
                    .await
            }
            "RSET" => {
                self.reset();
                self.reply(conn, 250, "2.0.0", "OK").await
            }
            "NOOP" => self.reply(conn, 250, "2.0.0", "OK").await,
            "VRFY" => {
                self.reply(conn, 252, "2.5.0", "Cannot verify; send some mail")
                    .await
            }
            "HELP" => self.reply(conn, 214, "2.0.0", "See RFC 5321").await,
            "QUIT" => {
                conn.write("221 2.0.0 Bye\r\n").await?;
                Ok(Next::Close)
            }
            _ => {
                self.reply(conn, 500, "5.5.2", "Command not recognised")
                    .await
            }
        }
    }
}

/// Resolves once the listener is stopping.
async fn stopped(stopping: &mut tokio::sync::watch::Receiver<bool>) {
    let _ = stopping.wait_for(|s| *s).await;
}
