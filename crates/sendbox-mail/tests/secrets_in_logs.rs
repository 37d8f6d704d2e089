//! Secrets and tokens never reach the logs or `Debug` output, even across a
//! rejected token and a refresh. In its own test binary: tracing's
//! per-callsite caching makes a thread-local capture unreliable while other
//! tests run in parallel in the same process.

use sendbox_test_support::capture;
use sendbox_test_support::peers;
use sendbox_test_support::smtp_peer;

use peers::Peers;
use sendbox_mail::smtp::SmtpTransport;
use smtp_peer::prepared;

const MAILBOX: &str = "alerts@example.com";

#[tokio::test]
async fn secrets_and_tokens_never_reach_the_logs() {
    let capture = capture::Capture::default();
    let _guard = tracing::subscriber::set_default(capture.subscriber(tracing::Level::TRACE));

    let p = Peers::start();
    p.auth_style("direct").await;
    let (smtp, tokens) = smtp_peer::starttls(&p, MAILBOX, &p.info.clients.secret.client_secret);
    smtp.send(prepared(MAILBOX, "logged")).await.unwrap();
    p.revoke_last_token().await;
    let smtp2 = SmtpTransport::new(smtp.settings().clone(), tokens.clone()).unwrap();
    smtp2.send(prepared(MAILBOX, "logged again")).await.unwrap();
    let debug = format!("{tokens:?} {smtp:?} {:?}", tokens.token().await.unwrap());

    let logs = capture.text();
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
