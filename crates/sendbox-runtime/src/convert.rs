//! The host-side event and outcome types (`sendbox-types`) to and from the
//! WIT `types` interface.

use crate::{
    Attachment, Bytes, Email, Event, FileChange, HttpResponse, Outcome, Submitted, Verdict, wit,
};

pub(crate) fn to_wit_event(e: &Event) -> wit::types::Event {
    use wit::types as t;
    match e {
        Event::File(f) => t::Event::File(t::FileEvent {
            watch: f.watch.clone(),
            path: f.path.clone(),
            change: match f.change {
                FileChange::Created => t::FileChange::Created,
                FileChange::Modified => t::FileChange::Modified,
                FileChange::Removed => t::FileChange::Removed,
            },
            size: f.size,
            contents: f.contents.as_ref().map(|b| b.0.clone()),
        }),
        Event::Webhook(r) => t::Event::Webhook(t::HttpRequest {
            method: r.method.clone(),
            path: r.path.clone(),
            query: r.query.clone(),
            headers: r.headers.clone(),
            body: r.body.0.clone(),
        }),
        Event::Schedule(s) => t::Event::Schedule(t::Tick {
            schedule: s.schedule.clone(),
            scheduled_at_ms: s.scheduled_at_ms,
        }),
    }
}

pub(crate) fn from_wit_outcome(o: wit::types::Outcome) -> Outcome {
    Outcome {
        emails: o
            .emails
            .into_iter()
            .map(|e| Email {
                to: e.to,
                cc: e.cc,
                bcc: e.bcc,
                sender: e.sender,
                reply_to: e.reply_to,
                subject: e.subject,
                text: e.text,
                html: e.html,
                attachments: e
                    .attachments
                    .into_iter()
                    .map(|a| Attachment {
                        filename: a.filename,
                        content_type: a.content_type,
                        data: Bytes(a.data),
                    })
                    .collect(),
                headers: e.headers,
                idempotency_key: e.idempotency_key,
                // Plugins never hand over a raw message.
                raw: None,
            })
            .collect(),
        response: o.response.map(|r| HttpResponse {
            status: r.status,
            headers: r.headers,
            body: Bytes(r.body),
        }),
    }
}

pub(crate) fn to_wit_submitted(
    m: &Submitted,
    raw_limit: u64,
) -> crate::relay_bindings::sendbox::plugin::smtp::Submitted {
    crate::relay_bindings::sendbox::plugin::smtp::Submitted {
        listener: m.listener.clone(),
        client: m.client.clone(),
        user: m.user.clone(),
        mail_from: m.mail_from.clone(),
        recipients: m.recipients.clone(),
        headers: m.headers.clone(),
        subject: m.subject.clone(),
        text: m.text.clone(),
        html: m.html.clone(),
        attachments: m
            .attachments
            .iter()
            .map(|a| wit::types::Attachment {
                filename: a.filename.clone(),
                content_type: a.content_type.clone(),
                data: a.data.0.clone(),
            })
            .collect(),
        raw: m
            .raw
            .as_ref()
            .filter(|r| r.0.len() as u64 <= raw_limit)
            .map(|r| r.0.clone()),
        size: m.size,
    }
}

pub(crate) fn from_wit_verdict(
    v: crate::relay_bindings::sendbox::plugin::smtp::Verdict,
) -> Verdict {
    use crate::relay_bindings::sendbox::plugin::smtp::Verdict as V;
    match v {
        V::Relay => Verdict::Relay,
        V::Replace(emails) => Verdict::Replace(
            from_wit_outcome(wit::types::Outcome {
                emails,
                response: None,
            })
            .emails,
        ),
        V::Refuse(r) => Verdict::Refuse {
            code: r.code,
            text: r.text,
        },
    }
}
