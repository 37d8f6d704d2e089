//! Secrets and tokens never reach the logs or `Debug` output, even across a
//! rejected token and a refresh. In its own test binary: tracing's
//! per-callsite caching makes a thread-local capture unreliable while other
//! tests run in parallel in the same process.

#[path = "../../../tests/support/peers.rs"]
mod peers;

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use peers::Peers;
use sendbox_auth::{Credentials, Endpoints, Secret, TokenProvider};
use sendbox_mail::message::{self, Envelope, Prepared};
use sendbox_mail::smtp::{Security, SmtpSettings, SmtpTransport};
use sendbox_types::Email;

fn starttls(p: &Peers) -> (SmtpTransport, Arc<TokenProvider>) {
    let tokens = Arc::new(
        TokenProvider::new(
            "alerts",
            Endpoints {
                token_url: p.info.token_endpoint.clone(),
                device_url: None,
                scopes: vec!["smtp".into()],
            },
            &p.info.clients.secret.client_id,
            Credentials::ClientSecret(Secret::new(p.info.clients.secret.client_secret.clone())),
        )
        .unwrap(),
    );
    let smtp = SmtpTransport::new(
        SmtpSettings {
            host: "localhost".into(),
            port: p.info.smtp_starttls_port,
            security: Security::StartTls,
            mailbox: "alerts@example.com".into(),
            max_connections: 3,
            timeout: Duration::from_secs(10),
            ca_file: Some(p.info.ca_file.clone()),
        },
        tokens.clone(),
    )
    .unwrap();
    (smtp, tokens)
}

fn prepared(subject: &str) -> Prepared {
    let email = Email {
        to: vec!["ops@example.com".into()],
        subject: subject.into(),
        text: Some("body".into()),
        ..Email::default()
    };
    let id = message::new_message_id("example.com");
    message::build(
        &email,
        &Envelope {
            account_mailbox: "alerts@example.com",
            allowed_from: &[],
            message_id: &id,
            date: SystemTime::now(),
        },
    )
    .unwrap()
}

#[tokio::test]
async fn secrets_and_tokens_never_reach_the_logs() {
    #[derive(Clone, Default)]
    struct Capture(Arc<std::sync::Mutex<Vec<u8>>>);
    impl std::io::Write for Capture {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let capture = Capture::default();
    let writer = capture.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(move || writer.clone())
        .with_max_level(tracing::Level::TRACE)
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);

    let p = Peers::start();
    p.auth_style("direct").await;
    let (smtp, tokens) = starttls(&p);
    smtp.send(&prepared("logged")).await.unwrap();
    p.revoke_last_token().await;
    let smtp2 = SmtpTransport::new(smtp.settings().clone(), tokens.clone()).unwrap();
    smtp2.send(&prepared("logged again")).await.unwrap();
    let debug = format!("{tokens:?} {smtp:?} {:?}", tokens.token().await.unwrap());

    let logs = String::from_utf8(capture.0.lock().unwrap().clone()).unwrap();
    assert!(
        logs.contains("access token obtained"),
        "logging works: {logs}"
    );
    let seen = p.tokens().await;
    assert_eq!(seen.len(), 3);
    for secret in seen.iter().chain([&p.info.clients.secret.client_secret]) {
        assert!(
            !logs.contains(secret.as_str()),
            "a secret leaked into the logs"
        );
        assert!(
            !debug.contains(secret.as_str()),
            "a secret leaked into Debug output"
        );
    }
}
