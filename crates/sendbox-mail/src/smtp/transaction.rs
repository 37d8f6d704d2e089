//! One mail transaction on a connection, in two halves a lane can overlap
//! with its neighbours: the envelope (`MAIL FROM`, a `RCPT TO` per
//! recipient, `DATA`) and the content. With PIPELINING the envelope goes
//! out in one write, and the next message's envelope may follow this
//! message's content in the same write (RFC 2920 lets message content
//! open a group): its replies are then read after this message's final
//! reply.

use lettre::transport::smtp::client::AsyncSmtpConnection;
use lettre::transport::smtp::commands::{Data, Mail, Rcpt, Rset};
use lettre::transport::smtp::extension::{Extension, MailBodyParameter, MailParameter};
use lettre::transport::smtp::response::Response;

use super::{Conn, Inner, Receipt, RefusedRecipient};
use crate::error::{FailureKind, SendError};
use crate::message::Prepared;

/// A message's envelope as commands, checked against what the server
/// offers.
pub(super) struct Envelope {
    mail: Mail,
    rcpts: Vec<Rcpt>,
}

impl Envelope {
    /// The commands for `message` on `smtp`: refused before anything is
    /// written when it needs an extension the server does not offer.
    pub(super) fn of(smtp: &AsyncSmtpConnection, message: &Prepared) -> Result<Self, SendError> {
        let envelope = &message.envelope;
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
        Ok(Envelope {
            mail: Mail::new(envelope.from().cloned(), options),
            rcpts: envelope
                .to()
                .iter()
                .map(|to| Rcpt::new(to.clone(), Vec::new()))
                .collect(),
        })
    }

    /// `MAIL FROM`, the `RCPT TO`s and `DATA` as one group of lines.
    fn group(&self) -> String {
        let mut group = self.mail.to_string();
        for r in &self.rcpts {
            group.push_str(&r.to_string());
        }
        group.push_str(&Data.to_string());
        group
    }
}

/// Where a message's envelope stands when its lane turns to it.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Written {
    /// Nothing written yet.
    No,
    /// Written behind the previous message's content; every reply unread.
    AfterContent,
}

/// A broken connection or a 421 (the server is closing it): reading
/// replies ends there.
fn fatal<T>(r: &Result<T, SendError>) -> bool {
    matches!(r, Err(e) if e.code.is_none() || e.code == Some(421))
}

impl Inner {
    /// The envelope's half: its replies read (and, when `written` is
    /// [`Written::No`], the commands written first). `Ok` with the refused
    /// recipients once `DATA` is accepted. On a refusal with a reply code
    /// the connection is reset and usable; on any other error it is broken
    /// (and has been aborted).
    pub(super) async fn envelope(
        &self,
        conn: &mut Conn,
        message: &Prepared,
        commands: &Envelope,
        written: Written,
    ) -> Result<Vec<RefusedRecipient>, SendError> {
        let result = self
            .envelope_replies(conn, message, commands, written)
            .await;
        if let Err(e) = &result {
            if e.code.is_some() {
                if self.bounded("RSET", conn.smtp.command(Rset)).await.is_err() {
                    self.abort(&mut conn.smtp).await;
                }
            } else {
                self.abort(&mut conn.smtp).await;
            }
        }
        result
    }

    async fn envelope_replies(
        &self,
        conn: &mut Conn,
        message: &Prepared,
        commands: &Envelope,
        written: Written,
    ) -> Result<Vec<RefusedRecipient>, SendError> {
        let smtp = &mut conn.smtp;
        // The envelope's replies, in order: MAIL, each RCPT, DATA.
        let (mail_reply, rcpt_replies, data_reply) = if conn.pipelining {
            // Every reply is read, whatever each says, so the connection
            // stays in step for the RSET that follows a refusal.
            let mail_reply = match written {
                Written::No => {
                    self.bounded("MAIL FROM", smtp.command(commands.group()))
                        .await
                }
                Written::AfterContent => self.bounded("MAIL FROM", smtp.read_response()).await,
            };
            // A refused MAIL stays the answer.
            if let Some(e) = mail_reply.as_ref().err().filter(|_| fatal(&mail_reply)) {
                return Err(e.clone());
            }
            let mut rcpt_replies = Vec::with_capacity(commands.rcpts.len());
            for _ in &commands.rcpts {
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
            let mail_reply = self
                .bounded("MAIL FROM", smtp.command(&commands.mail))
                .await?;
            let mut rcpt_replies = Vec::with_capacity(commands.rcpts.len());
            for r in &commands.rcpts {
                let reply = self.bounded("RCPT TO", smtp.command(r)).await;
                if let Err(e) = &reply
                    && e.code.is_none()
                {
                    return Err(e.clone());
                }
                rcpt_replies.push(reply);
            }
            (Ok(mail_reply), rcpt_replies, None)
        };
        if let Err(e) = mail_reply {
            self.end_unwanted_data(smtp, &data_reply).await;
            return Err(e);
        }
        let envelope = &message.envelope;
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
        Ok(refused)
    }

    /// A pipelined DATA the server accepted although the transaction is
    /// being given up (its MAIL or every RCPT refused) is ended at once,
    /// empty, so the RSET that follows is read as a command.
    async fn end_unwanted_data(
        &self,
        smtp: &mut AsyncSmtpConnection,
        data_reply: &Option<Result<Response, SendError>>,
    ) {
        if let Some(Ok(_)) = data_reply {
            let _ = self.bounded("the end of data", smtp.message(b"")).await;
        }
    }

    /// The content's half, after the envelope's: the message, then
    /// `next`'s envelope in the same write when there is one and the
    /// content is text (the second value says whether it was written), and
    /// this message's final reply. The transaction is over either way
    /// (nothing to reset); an error without a reply code means the
    /// connection is broken (and has been aborted) and the server may have
    /// the message.
    pub(super) async fn content(
        &self,
        conn: &mut Conn,
        message: &Prepared,
        refused: Vec<RefusedRecipient>,
        next: Option<&Envelope>,
    ) -> (Result<Receipt, SendError>, bool) {
        // The connection ends the data with CRLF "." CRLF itself: a
        // message's own final line break would become an extra empty line.
        let data = message.raw.strip_suffix(b"\r\n").unwrap_or(&message.raw);
        let together = next.and_then(|n| content_then(data, &n.group()));
        let next_written = together.is_some();
        let reply = match together {
            Some(write) => self.bounded("the message", conn.smtp.command(write)).await,
            None => self.bounded("the message", conn.smtp.message(data)).await,
        };
        let result = match reply {
            Ok(r) => Ok(Receipt {
                reply: format!("{} {}", r.code(), r.message().collect::<Vec<_>>().join(" ")),
                refused,
            }),
            Err(e) if e.code.is_some() => Err(e),
            Err(e) => {
                self.abort(&mut conn.smtp).await;
                Err(e.after_data())
            }
        };
        (result, next_written)
    }
}

/// Largest content the next envelope is written behind. Writing them
/// together copies the content once more (lettre takes the write as
/// text); past this size the round trip saved is small beside the
/// transfer, and the copy is not made.
const CARRY_NEXT_UP_TO: usize = 256 * 1024;

/// Whether the next message's envelope may go out behind `message`'s
/// content on `conn`: the server pipelines and the content is small.
pub(super) fn can_carry_next(conn: &Conn, message: &Prepared) -> bool {
    conn.pipelining && message.raw.len() <= CARRY_NEXT_UP_TO
}

/// `data` as sent after DATA — a line starting with "." gets another
/// (RFC 5321 §4.5.2), then CRLF "." CRLF, as lettre writes it — followed
/// by `next`: one write for the end of one transaction and the start of
/// the next. `None` when `data` is not UTF-8 text.
fn content_then(data: &[u8], next: &str) -> Option<String> {
    let mut rest = std::str::from_utf8(data).ok()?;
    let mut out = String::with_capacity(rest.len() + next.len() + 64);
    if rest.starts_with('.') {
        out.push('.');
    }
    while let Some(i) = rest.find("\r\n.") {
        out.push_str(&rest[..i + 2]);
        out.push('.');
        rest = &rest[i + 2..];
    }
    out.push_str(rest);
    out.push_str("\r\n.\r\n");
    out.push_str(next);
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::content_then;

    #[test]
    fn content_is_dot_stuffed_and_ended_before_what_follows() {
        let got = content_then(b".a\r\n.b\r\nc.d\r\n..e\r\nf\n.g", "MAIL FROM:<x>\r\n").unwrap();
        assert_eq!(
            got,
            "..a\r\n..b\r\nc.d\r\n...e\r\nf\n.g\r\n.\r\nMAIL FROM:<x>\r\n"
        );
        assert_eq!(content_then(b"", "N").unwrap(), "\r\n.\r\nN");
        assert_eq!(content_then(b"\r\n.", "").unwrap(), "\r\n..\r\n.\r\n");
        assert!(
            content_then(b"\xff", "").is_none(),
            "not text: lettre sends it"
        );
    }
}
