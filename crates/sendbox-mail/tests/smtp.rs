//! SMTP with XOAUTH2 against the real peers (smtp-server checking every
//! token at oidc-provider's introspection endpoint), and the file transport.

use sendbox_test_support::peers;
use sendbox_test_support::smtp_peer;

use std::sync::Arc;
use std::time::Duration;

use peers::Peers;
use sendbox_auth::TokenProvider;
use sendbox_mail::message::Prepared;
use sendbox_mail::smtp::{Security, SmtpTransport};
use sendbox_mail::{FailureKind, file::FileTransport};

const MAILBOX: &str = "alerts@example.com";

fn provider(p: &Peers, secret: &str) -> Arc<TokenProvider> {
    smtp_peer::provider(p, "alerts", secret)
}

fn transport(
    p: &Peers,
    port: u16,
    security: Security,
    tokens: Arc<TokenProvider>,
) -> SmtpTransport {
    SmtpTransport::new(smtp_peer::settings(p, port, security, MAILBOX), tokens).unwrap()
}

fn starttls(p: &Peers) -> (SmtpTransport, Arc<TokenProvider>) {
    smtp_peer::starttls(p, MAILBOX, &p.info.clients.secret.client_secret)
}

fn prepared(subject: &str) -> Prepared {
    smtp_peer::prepared(MAILBOX, subject)
}

#[tokio::test]
async fn sends_over_starttls_with_xoauth2() {
    let p = Peers::start();
    let (smtp, _) = starttls(&p);
    let msg = prepared("hello");
    let reply = smtp.send(msg.clone()).await.unwrap();
    assert!(reply.reply.starts_with("250"), "{reply:?}");
    let got = p.messages().await;
    assert_eq!(got.len(), 1);
    assert!(got[0].tls, "delivered over TLS");
    assert_eq!(got[0].user.as_deref(), Some(MAILBOX));
    assert_eq!(got[0].to, ["ops@example.com"]);
    assert!(
        got[0]
            .raw
            .contains(&format!("Message-ID: {}", msg.message_id))
    );
    assert!(got[0].raw.contains("Date: "));
}

#[tokio::test]
async fn sends_over_implicit_tls() {
    let p = Peers::start();
    let tokens = provider(&p, &p.info.clients.secret.client_secret);
    let smtp = transport(
        &p,
        p.info.smtp_implicit_tls_port,
        Security::ImplicitTls,
        tokens,
    );
    smtp.send(prepared("wrapped")).await.unwrap();
    assert!(p.messages().await[0].tls);
}

#[tokio::test]
async fn a_server_without_starttls_is_refused_before_authenticating() {
    let p = Peers::start();
    let tokens = provider(&p, &p.info.clients.secret.client_secret);
    let smtp = transport(&p, p.info.smtp_no_starttls_port, Security::StartTls, tokens);
    let err = smtp.send(prepared("plain")).await.unwrap_err();
    assert_eq!(err.kind(), FailureKind::Configuration, "{err}");
    assert!(err.to_string().contains("does not offer STARTTLS"), "{err}");
    assert!(err.pauses_account());
    assert!(p.messages().await.is_empty());
    assert_eq!(
        p.stats().await.auth_attempts,
        0,
        "the token was never shown"
    );
}

#[tokio::test]
async fn a_wrong_client_secret_sends_nothing_and_says_why() {
    let p = Peers::start();
    let tokens = provider(&p, "wrong-secret");
    let smtp = transport(&p, p.info.smtp_starttls_port, Security::StartTls, tokens);
    let err = smtp.send(prepared("nope")).await.unwrap_err();
    assert_eq!(err.kind(), FailureKind::Authentication, "{err}");
    assert!(err.to_string().contains("invalid_client"), "{err}");
    assert!(p.messages().await.is_empty());
}

async fn revoked_token_is_refreshed_once(style: &str) {
    let p = Peers::start();
    p.auth_style(style).await;
    let (smtp, tokens) = starttls(&p);
    smtp.send(prepared("first")).await.unwrap();
    p.revoke_last_token().await;
    // The pooled connection is already authenticated; a fresh connection
    // must present the revoked token and get refused.
    let smtp2 = SmtpTransport::new(smtp.settings().clone(), tokens.clone()).unwrap();
    smtp2.send(prepared("second")).await.unwrap();
    assert_eq!(
        tokens.refresh_count(),
        2,
        "exactly one refresh after the rejection"
    );
    let stats = p.stats().await;
    assert_eq!(stats.auth_attempts, 3, "ok, refused, ok");
    assert_eq!(p.messages().await.len(), 2);
}

#[tokio::test]
async fn a_revoked_token_gets_535_then_one_refresh_then_success() {
    revoked_token_is_refreshed_once("direct").await;
}

#[tokio::test]
async fn a_334_challenge_then_535_is_an_auth_failure_too() {
    revoked_token_is_refreshed_once("challenge").await;
}

#[tokio::test]
async fn a_token_expiring_mid_run_is_refreshed() {
    let p = Peers::start_with_ttl(3);
    let (smtp, tokens) = starttls(&p);
    smtp.send(prepared("one")).await.unwrap();
    tokio::time::sleep(Duration::from_millis(3200)).await;
    // The server closed the idle session meanwhile: the next login needs a
    // token, and the cached one has expired.
    smtp.close().await;
    smtp.send(prepared("two")).await.unwrap();
    assert_eq!(tokens.refresh_count(), 2);
    assert_eq!(p.messages().await.len(), 2);
    let seen = p.tokens().await;
    assert_eq!(seen.len(), 2);
    assert_ne!(seen[0], seen[1], "the second login used a fresh token");
}

#[tokio::test]
async fn replies_are_classified_with_their_codes() {
    let p = Peers::start();
    let (smtp, _) = starttls(&p);
    for (stage, code, text, kind) in [
        ("rcpt", 451, "4.3.0 Try again later", FailureKind::Transient),
        (
            "mail",
            421,
            "4.4.2 Service shutting down",
            FailureKind::Transient,
        ),
        (
            "data",
            550,
            "5.7.1 Message rejected as spam",
            FailureKind::Permanent,
        ),
        ("rcpt", 550, "5.1.1 User unknown", FailureKind::Permanent),
    ] {
        p.faults(
            serde_json::json!([{ "stage": stage, "code": code, "message": text, "count": 1 }]),
        )
        .await;
        // A fresh transport per case: a 421 closes the connection.
        let smtp = SmtpTransport::new(
            smtp.settings().clone(),
            provider(&p, &p.info.clients.secret.client_secret),
        )
        .unwrap();
        let err = smtp.send(prepared(stage)).await.unwrap_err();
        assert_eq!(err.kind(), kind, "{code}: {err}");
        assert_eq!(err.code, Some(code), "{err}");
        assert_eq!(err.enhanced.as_deref(), text.split(' ').next(), "{err}");
        assert!(
            err.message.contains(text.split_once(' ').unwrap().1),
            "{err}"
        );
    }
    assert!(p.messages().await.is_empty());
}

#[tokio::test]
async fn concurrent_sends_stay_within_the_connection_cap() {
    let p = Peers::start();
    let (smtp, _) = starttls(&p);
    let smtp = Arc::new(smtp);
    let tasks: Vec<_> = (0..30)
        .map(|i| {
            let smtp = smtp.clone();
            tokio::spawn(async move { smtp.send(prepared(&format!("n{i}"))).await })
        })
        .collect();
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    assert_eq!(p.messages().await.len(), 30);
    let max = p.stats().await.max_connections;
    assert!(max <= 3, "opened {max} connections at once, cap is 3");
}

#[tokio::test]
async fn file_transport_writes_whole_eml_files_named_by_message_id() {
    let dir = tempfile::tempdir().unwrap();
    let t = FileTransport::new(dir.path().join("outbox")).unwrap();
    let msg = prepared("to a file");
    let path = t.send(&msg).await.unwrap();
    let text = std::fs::read_to_string(&path).unwrap();
    assert!(text.contains(&format!("Message-ID: {}", msg.message_id)));
    assert!(text.contains("X-Envelope-To: ops@example.com"));
    assert!(text.contains("Subject: to a file"));
    // Sending the same message again rewrites the same file: no duplicate.
    assert_eq!(t.send(&msg).await.unwrap(), path);
    let names: Vec<_> = std::fs::read_dir(dir.path().join("outbox"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names.len(), 1, "no temp files left: {names:?}");
}

#[tokio::test]
async fn a_refused_recipient_fails_only_itself() {
    let p = Peers::start();
    let (smtp, _) = starttls(&p);
    p.faults(serde_json::json!([
        {"stage": "rcpt", "address": "gone@example.com", "code": 550, "message": "5.1.1 User unknown", "count": 1}
    ]))
    .await;
    let email = sendbox_types::Email {
        to: vec!["ops@example.com".into(), "gone@example.com".into()],
        cc: vec!["lead@example.com".into()],
        subject: "partly".into(),
        text: Some("body".into()),
        ..Default::default()
    };
    let msg = sendbox_mail::message::build(
        &email,
        &sendbox_mail::message::Envelope {
            account_mailbox: MAILBOX,
            allowed_from: &[],
            message_id: "<partly.1@example.com>",
            date: std::time::SystemTime::now(),
        },
    )
    .unwrap();
    let receipt = smtp.send(msg).await.unwrap();
    assert_eq!(receipt.refused.len(), 1, "{receipt:?}");
    assert_eq!(receipt.refused[0].address, "gone@example.com");
    assert_eq!(receipt.refused[0].error.code, Some(550));
    assert!(receipt.refused[0].error.is_permanent());
    let got = p.messages().await;
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].to, ["ops@example.com", "lead@example.com"]);
    // The connection stays usable for the next message.
    smtp.send(prepared("next")).await.unwrap();
    assert_eq!(p.messages().await.len(), 2);
}

#[tokio::test]
async fn a_lost_reply_after_data_is_not_resent_at_once() {
    let p = Peers::start();
    let tokens = provider(&p, &p.info.clients.secret.client_secret);
    let mut settings =
        smtp_peer::settings(&p, p.info.smtp_starttls_port, Security::StartTls, MAILBOX);
    settings.timeout = Duration::from_millis(800);
    let smtp = SmtpTransport::new(settings, tokens).unwrap();
    // A first message leaves a pooled connection: where the old code,
    // seeing it fail, tried again on a fresh one.
    smtp.send(prepared("first")).await.unwrap();
    p.faults(serde_json::json!([{"stage": "data", "hold_ms": 3000, "count": 1}]))
        .await;
    let msg = prepared("held");
    let err = smtp.send(msg.clone()).await.unwrap_err();
    assert!(err.may_have_been_delivered(), "{err}");
    assert!(err.is_transient(), "retried later, by the caller's backoff");
    tokio::time::sleep(Duration::from_millis(3500)).await;
    let held: Vec<_> = p
        .messages()
        .await
        .into_iter()
        .filter(|m| m.raw.contains(&msg.message_id))
        .collect();
    assert_eq!(
        held.len(),
        1,
        "the server got it once; sendbox did not resend"
    );
}

#[tokio::test]
async fn the_envelope_is_pipelined_where_the_server_offers_it_and_refusals_stay_in_step() {
    let p = Peers::start();
    let (smtp, _) = starttls(&p);
    smtp.send(prepared("first")).await.unwrap();
    // Every recipient refused: the pipelined DATA is answered, nothing is
    // sent, and the connection goes on.
    p.faults(serde_json::json!([
        {"stage": "rcpt", "code": 550, "message": "5.1.1 User unknown", "count": 1}
    ]))
    .await;
    let err = smtp.send(prepared("nobody")).await.unwrap_err();
    assert_eq!(err.code, Some(550), "{err}");
    // A refused MAIL FROM: its own reply is the answer, not the RCPT's or
    // DATA's that follow it.
    p.faults(serde_json::json!([
        {"stage": "mail", "code": 550, "message": "5.7.1 Sender not allowed", "count": 1}
    ]))
    .await;
    let err = smtp.send(prepared("refused sender")).await.unwrap_err();
    assert_eq!(err.code, Some(550), "{err}");
    assert!(err.message.contains("Sender not allowed"), "{err}");
    smtp.send(prepared("last")).await.unwrap();
    let stats = p.stats().await;
    assert_eq!(stats.mail_commands, 4);
    assert_eq!(
        stats.pipelined_transactions, 4,
        "MAIL FROM and RCPT TO went out in one write each time"
    );
    assert_eq!(stats.auth_attempts, 1, "one connection served all four");
    let subjects: Vec<bool> = p
        .messages()
        .await
        .iter()
        .map(|m| m.raw.contains("Subject: first") || m.raw.contains("Subject: last"))
        .collect();
    assert_eq!(subjects, [true, true], "only the two good messages arrived");

    // A server that does not offer PIPELINING gets one command at a time.
    p.offer_pipelining(false).await;
    let (plain, _) = starttls(&p);
    plain.send(prepared("one at a time")).await.unwrap();
    let stats = p.stats().await;
    assert_eq!(stats.mail_commands, 5);
    assert_eq!(stats.pipelined_transactions, 4, "nothing pipelined");
    assert_eq!(p.messages().await.len(), 3);
}

/// Sends `n` messages at once on `smtp`; each one's subject and result.
async fn send_at_once(smtp: &Arc<SmtpTransport>, n: usize) -> Vec<Outcome> {
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..n {
        let smtp = smtp.clone();
        tasks.spawn(async move {
            let subject = format!("queued {i}");
            let r = smtp.send(prepared(&subject)).await.map(|_| ());
            (subject, r)
        });
    }
    let mut all = Vec::new();
    while let Some(r) = tasks.join_next().await {
        all.push(r.unwrap());
    }
    all
}

/// A STARTTLS transport allowed one connection.
fn one_connection(p: &Peers) -> Arc<SmtpTransport> {
    let tokens = provider(p, &p.info.clients.secret.client_secret);
    let mut settings =
        smtp_peer::settings(p, p.info.smtp_starttls_port, Security::StartTls, MAILBOX);
    settings.max_connections = 1;
    Arc::new(SmtpTransport::new(settings, tokens).unwrap())
}

type Outcome = (String, Result<(), sendbox_mail::SendError>);

/// The failed sends with their errors, and the delivered subjects, sorted.
fn outcomes(results: &[Outcome]) -> (Vec<(&String, &sendbox_mail::SendError)>, Vec<String>) {
    let failed = results
        .iter()
        .filter_map(|(s, r)| r.as_ref().err().map(|e| (s, e)))
        .collect();
    let mut delivered: Vec<String> = results
        .iter()
        .filter(|(_, r)| r.is_ok())
        .map(|(s, _)| s.clone())
        .collect();
    delivered.sort();
    (failed, delivered)
}

fn subjects(got: &[peers::Received]) -> Vec<String> {
    let mut s: Vec<String> = got
        .iter()
        .filter_map(|m| {
            m.raw
                .lines()
                .find_map(|l| l.strip_prefix("Subject: "))
                .map(str::to_owned)
        })
        .collect();
    s.sort();
    s
}

#[tokio::test]
async fn a_waiting_message_rides_behind_the_content_and_a_refusal_fails_only_its_own() {
    let p = Peers::start();
    let smtp = one_connection(&p);
    // One refused recipient, one refused content, somewhere in the stream.
    p.faults(serde_json::json!([
        {"stage": "rcpt", "code": 550, "message": "5.1.1 User unknown", "count": 1},
        {"stage": "data", "code": 554, "message": "5.6.0 Content refused", "count": 1}
    ]))
    .await;
    let results = send_at_once(&smtp, 24).await;
    let (failed, delivered) = outcomes(&results);
    assert_eq!(failed.len(), 2, "{failed:?}");
    let mut codes: Vec<_> = failed.iter().map(|(_, e)| e.code).collect();
    codes.sort();
    assert_eq!(
        codes,
        [Some(550), Some(554)],
        "each refusal is its own message's answer"
    );
    assert!(failed.iter().all(|(_, e)| !e.may_have_been_delivered()));
    assert_eq!(
        subjects(&p.messages().await),
        delivered,
        "each accepted message arrived once"
    );
    let stats = p.stats().await;
    assert_eq!(stats.auth_attempts, 1, "one connection served all of them");
    assert_eq!(stats.mail_commands, 24);
    // All 24 wait before the first content goes out, so every envelope
    // but the first rides behind a content — save the one after a refused
    // envelope, which is reset first.
    assert!(
        stats.pipelined_after_content >= 20,
        "{} of 24 envelopes went out behind the previous content",
        stats.pipelined_after_content
    );
}

#[tokio::test]
async fn an_envelope_behind_a_content_whose_connection_is_cut_goes_again_on_a_new_one() {
    let p = Peers::start();
    let smtp = one_connection(&p);
    p.faults(serde_json::json!([{"stage": "data", "drop": true, "count": 1}]))
        .await;
    let results = send_at_once(&smtp, 8).await;
    let (failed, delivered) = outcomes(&results);
    assert_eq!(
        failed.len(),
        1,
        "only the message whose content was cut: {failed:?}"
    );
    assert!(
        failed[0].1.may_have_been_delivered(),
        "its outcome is unknown: {}",
        failed[0].1
    );
    assert_eq!(delivered.len(), 7);
    assert_eq!(subjects(&p.messages().await), delivered);
    let stats = p.stats().await;
    assert_eq!(stats.auth_attempts, 2, "a second connection took over");
    assert!(stats.pipelined_after_content >= 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_waits_for_the_send_in_flight_and_leaves_no_connection_open() {
    let p = Peers::start();
    let smtp = Arc::new(starttls(&p).0);
    smtp.send(prepared("warm")).await.unwrap();
    // The next content is answered only after 600 ms.
    p.faults(serde_json::json!([{"stage": "data", "hold_ms": 600, "count": 1}]))
        .await;
    let in_flight = tokio::spawn({
        let smtp = smtp.clone();
        async move { smtp.send(prepared("slow")).await }
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    smtp.close().await;
    assert!(
        in_flight.is_finished(),
        "close returned while a lane still held its connection"
    );
    in_flight.await.unwrap().unwrap();
    let mut open = u64::MAX;
    for _ in 0..100 {
        open = p.stats().await.active_connections;
        if open == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(open, 0, "a connection outlived close");
    assert_eq!(p.messages().await.len(), 2);
}

#[tokio::test]
async fn a_large_content_goes_alone_and_the_next_envelope_waits_for_its_reply() {
    let p = Peers::start();
    let smtp = one_connection(&p);
    let big = |subject: &str| {
        let mut m = prepared(subject);
        // 300 KB of body lines, past the size an envelope rides behind.
        let body = "x".repeat(998) + "\r\n";
        let at = m.raw.len() - 2;
        m.raw.splice(at..at, body.repeat(300).into_bytes());
        m
    };
    let (a, b, c) = tokio::join!(
        smtp.send(big("big 1")),
        smtp.send(big("big 2")),
        smtp.send(big("big 3"))
    );
    for r in [a, b, c] {
        r.unwrap();
    }
    assert_eq!(p.messages().await.len(), 3);
    let stats = p.stats().await;
    assert_eq!(stats.auth_attempts, 1);
    assert_eq!(
        stats.pipelined_after_content, 0,
        "no envelope behind a large content"
    );
}
