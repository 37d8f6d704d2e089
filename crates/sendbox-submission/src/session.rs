//! One SMTP connection: greeting, EHLO, STARTTLS, AUTH, one or more
//! transactions (MAIL, RCPT, DATA), QUIT — with a timeout on every wait.

use std::net::SocketAddr;
use std::sync::Arc;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use tokio::net::TcpStream;

use crate::io::{Conn, ReadError, Stream};
use crate::{Handler, LoginLimiter, Reply, Settings, Submission, Tls, canonical};

/// Protocol errors tolerated before the connection is closed.
const MAX_ERRORS: u32 = 10;

/// Commands per connection, so an idle chatterer cannot hold a slot for
/// ever within the session timeout.
const MAX_COMMANDS: u32 = 10_000;

/// Tells a client it is refused, then closes.
pub(crate) async fn refuse(mut stream: TcpStream, text: &str) {
    use tokio::io::AsyncWriteExt;
    let _ = tokio::time::timeout(
        std::time::Duration::from_secs(5),
        stream.write_all(text.as_bytes()),
    )
    .await;
    let _ = stream.shutdown().await;
}

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

    async fn auth(&mut self, conn: &mut Conn, arg: &str, tls: bool) -> std::io::Result<Next> {
        if self.helo.is_none() {
            return self.reply(conn, 503, "5.5.1", "Say EHLO first").await;
        }
        if self.user.is_some() {
            return self
                .reply(conn, 503, "5.5.1", "Already authenticated")
                .await;
        }
        if self.mail_from.is_some() {
            return self
                .reply(
                    conn,
                    503,
                    "5.5.1",
                    "AUTH is not allowed during a transaction",
                )
                .await;
        }
        let Some(users) = self.settings.users.clone() else {
            return self.reply(conn, 502, "5.5.1", "AUTH not available").await;
        };
        if !self.offers_auth(tls) {
            return self
                .reply(
                    conn,
                    538,
                    "5.7.11",
                    "Encryption required for requested authentication mechanism",
                )
                .await;
        }
        let (mechanism, initial) = match arg.split_once(' ') {
            Some((m, i)) => (m.to_ascii_uppercase(), Some(i.trim().to_owned())),
            None => (arg.to_ascii_uppercase(), None),
        };
        let credentials = match mechanism.as_str() {
            "PLAIN" => {
                let answer = match initial {
                    Some(i) => i,
                    None => match self.challenge(conn, "").await? {
                        Some(a) => a,
                        None => {
                            return self
                                .reply(conn, 501, "5.7.0", "Authentication cancelled")
                                .await;
                        }
                    },
                };
                decode(&answer).and_then(|b| {
                    let mut parts = b.split(|&c| c == 0);
                    let (_authz, user, pass) = (parts.next()?, parts.next()?, parts.next()?);
                    Some((
                        String::from_utf8(user.to_vec()).ok()?,
                        String::from_utf8(pass.to_vec()).ok()?,
                    ))
                })
            }
            "LOGIN" => {
                let user = match initial {
                    Some(i) => Some(i),
                    None => self.challenge(conn, "VXNlcm5hbWU6").await?,
                };
                let Some(user) = user else {
                    return self
                        .reply(conn, 501, "5.7.0", "Authentication cancelled")
                        .await;
                };
                let Some(pass) = self.challenge(conn, "UGFzc3dvcmQ6").await? else {
                    return self
                        .reply(conn, 501, "5.7.0", "Authentication cancelled")
                        .await;
                };
                decode(&user)
                    .and_then(|u| String::from_utf8(u).ok())
                    .zip(decode(&pass).and_then(|p| String::from_utf8(p).ok()))
            }
            _ => {
                return self
                    .reply(conn, 504, "5.5.4", "Unrecognised authentication mechanism")
                    .await;
            }
        };
        let Some((user, password)) = credentials else {
            return self
                .reply(conn, 501, "5.5.2", "Cannot decode the credentials")
                .await;
        };
        let ip = canonical(self.peer.ip());
        if users.check(&user, &password).await {
            self.logins.succeeded(ip);
            tracing::info!(user = %user, "login");
            self.user = Some(user);
            return self
                .reply(conn, 235, "2.7.0", "Authentication successful")
                .await;
        }
        let locked = self.logins.failed(ip);
        // The user name is logged (an operator needs it), never the password.
        tracing::warn!(user = %user.chars().take(64).collect::<String>(), locked, "login failed");
        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
        if locked {
            conn.write("421 4.7.0 Too many failed logins; closing\r\n")
                .await?;
            return Ok(Next::Close);
        }
        self.reply(conn, 535, "5.7.8", "Authentication credentials invalid")
            .await
    }

    /// Sends `334 challenge` and reads the answer; `None` if the client
    /// cancelled with `*`.
    async fn challenge(
        &mut self,
        conn: &mut Conn,
        challenge: &str,
    ) -> std::io::Result<Option<String>> {
        conn.write(&format!("334 {challenge}\r\n")).await?;
        match conn.read_line(self.settings.command_timeout).await {
            Ok(line) if line == b"*" => Ok(None),
            Ok(line) => Ok(Some(String::from_utf8_lossy(&line).trim().to_owned())),
            Err(_) => Err(std::io::Error::other("no answer to the AUTH challenge")),
        }
    }
}

/// Resolves once the listener is stopping.
async fn stopped(stopping: &mut tokio::sync::watch::Receiver<bool>) {
    let _ = stopping.wait_for(|s| *s).await;
}

fn decode(b64: &str) -> Option<Vec<u8>> {
    B64.decode(b64.trim()).ok()
}

/// `FROM:<addr> PARAMS` → (`addr`, `PARAMS`); the keyword case-insensitive,
/// a space after the colon tolerated.
fn path_arg<'a>(arg: &'a str, keyword: &str) -> Option<(&'a str, &'a str)> {
    let head = arg.get(..keyword.len())?;
    if !head.eq_ignore_ascii_case(keyword) {
        return None;
    }
    let rest = arg[keyword.len()..].trim_start();
    let rest = rest.strip_prefix('<')?;
    let end = rest.find('>')?;
    Some((&rest[..end], rest[end + 1..].trim()))
}

/// A mailbox `local@domain`: no spaces, brackets, quotes or control
/// characters, at most 254 bytes, one `@` with both sides non-empty.
fn valid_address(addr: &str) -> bool {
    addr.len() <= 254
        && !addr
            .chars()
            .any(|c| c.is_control() || c.is_whitespace() || "<>\"(),;:\\[]".contains(c))
        && addr.rsplit_once('@').is_some_and(|(l, d)| {
            !l.is_empty() && !l.contains('@') && (d.contains('.') || d == "localhost")
        })
}

/// `a@b.c` or `*@b.c`, case-insensitively.
fn matches_pattern(addr: &str, pattern: &str) -> bool {
    match pattern.strip_prefix("*@") {
        Some(domain) => addr
            .rsplit_once('@')
            .is_some_and(|(_, d)| d.eq_ignore_ascii_case(domain)),
        None => addr.eq_ignore_ascii_case(pattern),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_and_addresses() {
        assert_eq!(
            path_arg("FROM:<a@b.c> SIZE=10", "FROM:"),
            Some(("a@b.c", "SIZE=10"))
        );
        assert_eq!(path_arg("from: <>", "FROM:"), Some(("", "")));
        assert_eq!(path_arg("TO:a@b.c", "TO:"), None);
        assert!(valid_address("scanner@example.com"));
        assert!(valid_address("root@localhost"));
        assert!(!valid_address("a b@example.com"));
        assert!(!valid_address("a@b@example.com"));
        assert!(!valid_address("@example.com"));
        assert!(!valid_address("@localhost"));
        assert!(!valid_address("user@[10.0.0.1]"));
        assert!(!valid_address("a@example.com\r\nRCPT TO:<x@y.z>"));
        assert!(matches_pattern("Ops@Example.com", "*@example.com"));
        assert!(!matches_pattern("ops@example.com.evil", "*@example.com"));
    }
}
