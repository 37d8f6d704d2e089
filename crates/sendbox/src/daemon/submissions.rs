//! The SMTP listeners (`[listeners.NAME]`): each finished message becomes
//! one outbox commit under the listener's policy, and the client hears
//! `250` only once it is durable.
//!
//! The message travels raw (see `sendbox_mail::relay`); its envelope
//! recipients are the email's recipients; its Message-ID, when it has one,
//! is its idempotency key, so a client that resends after a lost `250`
//! does not send twice.
//!
//! A listener that names a plugin has it screen each message first (its
//! `screen` export, one event at a time for that plugin): relay it, replace
//! it (its emails and state writes committed together), or refuse it with
//! the plugin's reply. A plugin that fails answers `451`: the client tries
//! again later, nothing is lost.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;

use sendbox_outbox::{AnyStore, Call, OutboxError, Store};
use sendbox_submission::{Handler, Reply, Submission};
use sendbox_types::{Bytes, Email, Submitted, Verdict};
use tokio::sync::watch;
use tokio::task::JoinSet;

use super::dispatch::OutboxState;
use super::registry::{Registry, Wakers};
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
        outbox: &AnyStore,
        wakers: &Arc<Wakers>,
        registry: &Arc<Registry>,
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
            let handler = handler(
                &l,
                mailbox,
                outbox.clone(),
                wakers.clone(),
                registry.clone(),
            );
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

/// What happens to a listener's messages: screened by its plugin if it
/// has one, then one commit each, then the account's worker is woken.
fn handler(
    l: &ListenerConfig,
    mailbox: String,
    outbox: AnyStore,
    wakers: Arc<Wakers>,
    registry: Arc<Registry>,
) -> Handler {
    let listener = Arc::new(Listener {
        source: l.source(),
        account: l.account.clone(),
        policy: l.policy.clone(),
        plugin: l.plugin.clone(),
        mailbox,
    });
    Arc::new(move |s: Submission| {
        let (listener, outbox, wakers, registry) = (
            listener.clone(),
            outbox.clone(),
            wakers.clone(),
            registry.clone(),
        );
        let event_id = sendbox_triggers::new_event_id("smtp");
        let span = tracing::info_span!("smtp_message", listener = %s.listener, event = %event_id, client = %s.client);
        Box::pin(tracing::Instrument::instrument(
            async move {
                let call = match &listener.plugin {
                    None => Ok(call(
                        &s,
                        &listener,
                        &listener.source,
                        &listener.policy,
                        &event_id,
                    )),
                    Some(plugin) => {
                        screened(&s, &listener, plugin, &event_id, &outbox, &registry).await
                    }
                };
                let reply = match call {
                    Ok(call) => answer(outbox.commit(call).await),
                    Err(reply) => reply,
                };
                if reply.is_positive()
                    && let Some(w) = wakers.get(&listener.account)
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

/// A listener's settings for its handler.
struct Listener {
    source: String,
    account: String,
    policy: sendbox_outbox::Policy,
    plugin: Option<String>,
    mailbox: String,
}

/// Has `plugin` screen the message; the call to commit, or the client's
/// reply when there is nothing to commit.
async fn screened(
    s: &Submission,
    listener: &Listener,
    plugin: &str,
    event_id: &str,
    outbox: &AnyStore,
    registry: &Arc<Registry>,
) -> Result<Call, Reply> {
    let try_later = |why: &str| {
        tracing::error!(
            plugin,
            reason = why,
            "message not screened; the client will try again"
        );
        Reply::new(
            451,
            "4.3.0",
            "Cannot screen the message right now; try again later",
        )
    };
    let Some(loaded) = registry.get(plugin) else {
        return Err(try_later("the plugin is not loaded"));
    };
    if !loaded.plugin.screens() {
        return Err(try_later(
            "the plugin does not export `screen` (build it against world relay-hook)",
        ));
    }
    let parsed = sendbox_mail::parse::parse(&s.raw);
    let submitted = Submitted {
        listener: s.listener.clone(),
        client: s.client.to_string(),
        user: s.user.clone(),
        mail_from: s.mail_from.clone(),
        recipients: s.recipients.clone(),
        headers: parsed.headers,
        subject: parsed.subject,
        text: parsed.text,
        html: parsed.html,
        attachments: parsed.attachments,
        raw: Some(Bytes(s.raw.clone())),
        size: s.raw.len() as u64,
    };
    // One message at a time per plugin: its state reads stay valid until
    // its commit.
    let _alone = loaded.serial.write().await;
    let state: Arc<dyn sendbox_runtime::StateStore> = Arc::new(OutboxState(outbox.clone()));
    let report = match loaded
        .plugin
        .screen_async(&submitted, event_id, state)
        .await
    {
        Ok(r) => r,
        Err(e) => return Err(try_later(&e.to_string())),
    };
    let mut call = match report.verdict {
        Verdict::Relay => call(s, listener, plugin, &listener.policy, event_id),
        Verdict::Replace(emails) => Call {
            plugin: plugin.to_owned(),
            trigger: "smtp".into(),
            event_id: event_id.to_owned(),
            account: listener.account.clone(),
            account_mailbox: listener.mailbox.clone(),
            policy: loaded.policy.clone(),
            emails,
            ..Call::default()
        },
        Verdict::Refuse { code, text } => {
            tracing::info!(plugin, code, "message refused by the plugin");
            return Err(plugin_reply(code, &text));
        }
    };
    call.state_changes = report.state_changes;
    call.reads = report.reads;
    call.state_quota_bytes = Some(loaded.plugin.settings().limits.state_bytes);
    Ok(call)
}

/// A plugin's refusal as an SMTP reply: a 421-599 code (else 451), and an
/// enhanced status code taken from the text or made from the code.
fn plugin_reply(code: u16, text: &str) -> Reply {
    let code = if (421..=599).contains(&code) {
        code
    } else {
        451
    };
    let text = text.trim();
    let (status, rest) = match text.split_once(' ') {
        Some((st, rest))
            if st.split('.').count() == 3
                && st
                    .split('.')
                    .all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit())) =>
        {
            (st.to_owned(), rest)
        }
        _ => (format!("{}.0.0", code / 100), text),
    };
    Reply::new(
        code,
        &status,
        if rest.is_empty() { "Refused" } else { rest },
    )
}

/// The outbox call relaying a submitted message as `source` (the
/// listener, or its plugin).
fn call(
    s: &Submission,
    listener: &Listener,
    source: &str,
    policy: &sendbox_outbox::Policy,
    event_id: &str,
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
        event_id: event_id.to_owned(),
        account: listener.account.clone(),
        account_mailbox: listener.mailbox.clone(),
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
            (None, None) if c.suppressed.is_empty() => {
                Reply::new(250, "2.0.0", "Accepted; the screening plugin sent nothing")
            }
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
