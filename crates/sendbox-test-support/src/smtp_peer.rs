//! An SMTP transport logged in to the real peers (see `peers.rs`) with the
//! client-secret OAuth client. Include beside `mod peers;`.

use std::sync::Arc;
use std::time::Duration;

use sendbox_auth::{Credentials, Endpoints, Secret, TokenProvider};
use sendbox_mail::smtp::{Security, SmtpSettings, SmtpTransport};

use crate::peers::Peers;

/// A token provider for the peers' client-secret client.
pub fn provider(p: &Peers, account: &str, secret: &str) -> Arc<TokenProvider> {
    Arc::new(
        TokenProvider::new(
            account,
            Endpoints {
                token_url: p.info.token_endpoint.clone(),
                device_url: None,
                scopes: vec!["smtp".into()],
            },
            &p.info.clients.secret.client_id,
            Credentials::ClientSecret(Secret::new(secret)),
        )
        .unwrap(),
    )
}

/// Settings for one of the peers' SMTP ports, trusting their CA, 3
/// connections at most.
pub fn settings(p: &Peers, port: u16, security: Security, mailbox: &str) -> SmtpSettings {
    SmtpSettings {
        host: "localhost".into(),
        port,
        security,
        mailbox: mailbox.into(),
        max_connections: 3,
        timeout: Duration::from_secs(30),
        ca_file: Some(p.info.ca_file.clone()),
    }
}

/// A STARTTLS transport for `mailbox`, authenticating with `secret`.
pub fn starttls(p: &Peers, mailbox: &str, secret: &str) -> (SmtpTransport, Arc<TokenProvider>) {
    let tokens = provider(p, "alerts", secret);
    let smtp = SmtpTransport::new(
        settings(p, p.info.smtp_starttls_port, Security::StartTls, mailbox),
        tokens.clone(),
    )
    .unwrap();
    (smtp, tokens)
}

/// A one-line message to ops@example.com from `mailbox`, with a fresh
/// Message-ID.
pub fn prepared(mailbox: &str, subject: &str) -> sendbox_mail::Prepared {
    use sendbox_mail::message::{self, Envelope};
    let email = sendbox_types::Email {
        to: vec!["ops@example.com".into()],
        subject: subject.into(),
        text: Some("body".into()),
        ..sendbox_types::Email::default()
    };
    let id = message::new_message_id(message::domain_of(mailbox));
    message::build(
        &email,
        &Envelope {
            account_mailbox: mailbox,
            allowed_from: &[],
            message_id: &id,
            date: std::time::SystemTime::now(),
        },
    )
    .unwrap()
}
