//! TLS to PostgreSQL against a real server of the test's own with TLS on
//! (a certificate signed by a CA made for the test): `sslmode=verify-full`
//! with `sslrootcert` connects encrypted, and a server whose certificate
//! the node cannot verify is refused with the reason.

use sendbox_test_support::postgres::{Throwaway, query};

use std::time::Duration;

use sendbox_outbox::{Call, PgOutbox, Policy, Store};
use sendbox_types::Email;

fn tls_url(server: &Throwaway, host: &str, root: Option<&std::path::Path>) -> String {
    let base = server.url().replace("127.0.0.1", host);
    match root {
        Some(ca) => format!("{base}?sslmode=verify-full&sslrootcert={}", ca.display()),
        None => format!("{base}?sslmode=verify-full"),
    }
}

#[tokio::test]
async fn a_node_reaches_the_database_over_verified_tls_or_not_at_all() {
    let server = Throwaway::start_with_tls();

    // Trusting the CA that signed the server's certificate, by name and by
    // address: connected, and every connection of ours is encrypted.
    let mut open = Vec::new();
    for host in ["localhost", "127.0.0.1"] {
        let url = tls_url(&server, host, Some(&server.ca_file()));
        let outbox = PgOutbox::connect(&url, None, "tls-node", 2, Duration::from_secs(30))
            .await
            .unwrap_or_else(|e| panic!("{url}: {e}"));
        let done = Store::commit(
            &outbox,
            Call {
                plugin: "tls".into(),
                trigger: "cli".into(),
                event_id: format!("over-tls-{host}"),
                account: "a".into(),
                account_mailbox: "a@example.com".into(),
                policy: Policy::default(),
                emails: vec![Email {
                    to: vec!["ops@example.com".into()],
                    subject: "over TLS".into(),
                    text: Some("x".into()),
                    ..Email::default()
                }],
                ..Default::default()
            },
        )
        .await
        .unwrap();
        assert_eq!(done.queued.len(), 1);
        open.push(outbox);
    }
    let seen = query(
        &server.url(),
        "SELECT s.ssl::text FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) \
         WHERE a.application_name = 'sendbox'",
    )
    .await;
    assert!(!seen.is_empty(), "sendbox's connections are listed");
    assert!(
        seen.iter().all(|s| s == "true"),
        "a connection of sendbox's without TLS: {seen:?}"
    );

    // The public roots do not know the test CA, and another CA did not
    // sign the certificate: refused, saying why, before any credential
    // is sent.
    for root in [None, Some(server.other_ca_file())] {
        let url = tls_url(&server, "localhost", root.as_deref());
        let err = PgOutbox::connect(&url, None, "tls-node", 2, Duration::from_secs(30))
            .await
            .err()
            .unwrap_or_else(|| panic!("{url}: connected to a server it cannot verify"))
            .to_string();
        eprintln!("refused as it should be: {err}");
        assert!(
            err.contains("TLS") && err.contains("certificate"),
            "{url}: {err}"
        );
    }

    // A CA file that is not there is named before anything connects.
    let missing = server.ca_file().with_file_name("absent.pem");
    let Err(err) = PgOutbox::connect(
        &tls_url(&server, "localhost", Some(&missing)),
        None,
        "tls-node",
        2,
        Duration::from_secs(30),
    )
    .await
    else {
        panic!("a missing sslrootcert is refused");
    };
    let err = err.to_string();
    assert!(
        err.contains("sslrootcert") && err.contains("absent.pem"),
        "{err}"
    );
}
