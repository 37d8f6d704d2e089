//! The SMTP listeners (`[listeners.NAME]`): each finished message becomes
//! one outbox commit under the listener's policy, and the client hears
//! `250` only once it is durable.
//!
//! The message travels raw (see `sendbox_mail::relay`); its envelope
//! recipients are the email's recipients; its Message-ID, when it has one,
//! is its idempotency key, so a client that resends after a lost `250`
//! does not send twice.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;

use sendbox_outbox::{Call, Outbox, OutboxError, Store};
use sendbox_submission::{Handler, Reply, Submission};
use sendbox_types::{Bytes, Email};
use tokio::sync::watch;
use tokio::task::JoinSet;

use super::registry::Wakers;
use crate::config::ListenerConfig;
use crate::exit::{self, coded};

/// The running listeners.
pub struct Listeners {
    stop: watch::Sender<bool>,
    tasks: JoinSet<()>,
    /// Where each listens, by name.
    pub addresses: Vec<(String, SocketAddr)>,
}

impl Listeners {
    /// Binds and starts every listener; a port that cannot be bound is a
    /// config error (exit 78).
    pub async fn start(
        listeners: BTreeMap<String, ListenerConfig>,
        mailboxes: &HashMap<String, String>,
        outbox: &Arc<Outbox>,
        wakers: &Arc<Wakers>,
    ) -> anyhow::Result<Listeners> {
        let (stop, stopped) = watch::channel(false);
        let mut tasks = JoinSet::new();
        let mut addresses = Vec::new();
        for (name, l) in listeners {
            let socket = tokio::net::TcpListener::bind(l.listen).await.map_err(|e| {
                coded(
                    exit::EX_CONFIG,
                    format!("listener `{name}`: cannot listen on {}: {e} (set [listeners.{name}] listen)", l.listen),
                )
            })?;
            addresses.push((name.clone(), socket.local_addr()?));
            let mailbox = mailboxes.get(&l.account).cloned().unwrap_or_default();
            let handler = handler(&l, mailbox, outbox.clone(), wakers.clone());
            let mut stopped = stopped.clone();
            let until = async move {
                let _ = stopped.wait_for(|s| *s).await;
            };
            tasks.spawn(async move {
                if let Err(e) = sendbox_submission::serve(socket, l.settings, handler, until).await
                {
                    tracing::error!(listener = %name, error = %e, "listener stopped");
                }
            });
        }
        Ok(Listeners {
            stop,
            tasks,
            addresses,
        })
    }

    /// Stops accepting; messages being received are committed and
    /// answered; idle clients are told `421`.
    pub async fn stop(mut self) {
        let _ = self.stop.send(true);
        while self.tasks.join_next().await.is_some() {}
    }
}

/// What happens to a listener's messages: one commit each, then the
/// account's worker is woken.
fn handler(
    l: &ListenerConfig,
    mailbox: String,
    outbox: Arc<Outbox>,
    wakers: Arc<Wakers>,
) -> Handler {
    let (source, account, policy) = (l.source(), l.account.clone(), l.policy.clone());
    Arc::new(move |s: Submission| {
        let call = call(&s, &source, &account, &mailbox, &policy);
        let (outbox, wakers, account) = (outbox.clone(), wakers.clone(), account.clone());
        let span = tracing::info_span!("smtp_message", listener = %s.listener, event = %call.event_id, client = %s.client);
        Box::pin(tracing::Instrument::instrument(
            async move {
                let reply = answer(outbox.commit(call).await);
                if reply.is_positive()
                    && let Some(w) = wakers.get(&account)
                {
                    w.notify_one();
                }
                tracing::info!(code = reply.code, text = %reply.text, recipients = s.recipients.len(), bytes = s.raw.len(), user = ?s.user, "message answered");
                reply
            },
            span,
        ))
    })
}

/// The outbox call for a submitted message.
fn call(
    s: &Submission,
    source: &str,
    account: &str,
    mailbox: &str,
    policy: &sendbox_outbox::Policy,
) -> Call {
    let header = |name| sendbox_mail::relay::header(&s.raw, name);
    let subject: String = header("Subject")
        .unwrap_or_default()
        .chars()
        .take(200)
        .collect();
    let message_id = header("Message-ID").filter(|m| m.len() <= 250);
    Call {
        plugin: source.to_owned(),
        trigger: "smtp".into(),
        event_id: sendbox_triggers::new_event_id("smtp"),
        account: account.to_owned(),
        account_mailbox: mailbox.to_owned(),
        policy: policy.clone(),
        emails: vec![Email {
            to: s.recipients.clone(),
            subject: subject.replace(['\r', '\n'], " "),
            idempotency_key: message_id.map(|m| format!("message-id:{m}")),
            raw: Some(Bytes(s.raw.clone())),
            ..Email::default()
        }],
        ..Call::default()
    }
}

/// The client's answer to a commit.
fn answer(result: Result<sendbox_outbox::Committed, OutboxError>) -> Reply {
    match result {
        Ok(c) => match (c.queued.first(), c.duplicates.first()) {
            (Some(q), _) => Reply::new(
                250,
                "2.0.0",
                format!("Queued as {} (outbox id {})", q.message_id, q.id),
            ),
            (None, Some(d)) => Reply::new(
                250,
                "2.0.0",
                format!("Already queued as {} (outbox id {})", d.message_id, d.id),
            ),
            (None, None) => Reply::new(550, "5.1.1", "Every recipient is on the suppression list"),
        },
        Err(OutboxError::Policy(why)) => Reply::new(550, "5.7.1", why),
        Err(e) => {
            tracing::error!(error = %e, "cannot store a submitted message");
            Reply::new(
                451,
                "4.3.0",
                "Cannot store the message right now; try again later",
            )
        }
    }
}
