//! `AUTH PLAIN` and `AUTH LOGIN`: challenges, decoding, the check against
//! the users, and failed logins counted per client address (logged with the
//! user name, never the password).

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;

use super::{Next, Session};
use crate::canonical;
use crate::io::Conn;

impl Session {
    pub(super) async fn auth(
        &mut self,
        conn: &mut Conn,
        arg: &str,
        tls: bool,
    ) -> std::io::Result<Next> {
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

fn decode(b64: &str) -> Option<Vec<u8>> {
    B64.decode(b64.trim()).ok()
}
