//! Token providers against a real OAuth2 server (oidc-provider, started by
//! tests/support/peers.rs): client secret, certificate assertion, device
//! login with rotating refresh tokens, caching and shared refreshes.

use sendbox_test_support::peers;

use std::sync::Arc;
use std::time::Duration;

use peers::Peers;
use sendbox_auth::jwt::CertificateKey;
use sendbox_auth::{AuthError, Credentials, Endpoints, Secret, TokenProvider};

fn endpoints(p: &Peers, scopes: &[&str]) -> Endpoints {
    Endpoints {
        token_url: p.info.token_endpoint.clone(),
        device_url: Some(p.info.device_endpoint.clone()),
        scopes: scopes.iter().map(|s| s.to_string()).collect(),
    }
}

fn secret_provider(p: &Peers, secret: &str) -> TokenProvider {
    TokenProvider::new(
        "app",
        endpoints(p, &["smtp"]),
        &p.info.clients.secret.client_id,
        Credentials::ClientSecret(Secret::new(secret)),
    )
    .unwrap()
}

#[tokio::test]
async fn client_secret_token_is_fetched_once_and_cached() {
    let p = Peers::start();
    let provider = secret_provider(&p, &p.info.clients.secret.client_secret);
    let a = provider.token().await.unwrap();
    let b = provider.token().await.unwrap();
    assert_eq!(a.secret(), b.secret());
    assert!(a.expires_in() > Duration::from_secs(3000));
    assert_eq!(provider.refresh_count(), 1);
    assert_eq!(p.stats().await.token_requests, 1);
}

#[tokio::test]
async fn a_wrong_client_secret_is_a_clear_refusal() {
    let p = Peers::start();
    let provider = secret_provider(&p, "not-the-secret");
    let err = provider.token().await.unwrap_err();
    match &err {
        AuthError::Refused { code, fix, .. } => {
            assert_eq!(code, "invalid_client");
            assert!(fix.contains("client id or client secret"), "{fix}");
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    assert!(!err.is_transient());
    assert!(!format!("{err} {err:?}").contains("not-the-secret"));

    // Every sender retrying on the wrong secret: answered from memory, not
    // with a request each (the token endpoint saw only the first).
    for _ in 0..20 {
        assert!(matches!(
            provider.token().await,
            Err(AuthError::Refused { .. })
        ));
    }
    assert_eq!(
        p.stats().await.token_requests,
        1,
        "the refusal was remembered"
    );
}

#[tokio::test]
async fn a_certificate_assertion_gets_a_token() {
    let p = Peers::start();
    let key = CertificateKey::from_pem(
        &std::fs::read_to_string(&p.info.client_key_file).unwrap(),
        &std::fs::read_to_string(&p.info.client_cert_file).unwrap(),
    )
    .unwrap();
    assert!(!key.thumbprint_s256().is_empty());
    let provider = TokenProvider::new(
        "cert",
        endpoints(&p, &["smtp"]),
        &p.info.clients.cert.client_id,
        Credentials::Certificate(Box::new(key)),
    )
    .unwrap();
    let token = provider.token().await.unwrap();
    assert!(!token.secret().expose().is_empty());
}

#[tokio::test]
async fn a_hundred_concurrent_callers_share_one_refresh() {
    let p = Peers::start();
    let provider = Arc::new(secret_provider(&p, &p.info.clients.secret.client_secret));
    let tasks: Vec<_> = (0..100)
        .map(|_| {
            let provider = provider.clone();
            tokio::spawn(async move { provider.token().await.map(|t| t.generation()) })
        })
        .collect();
    for t in tasks {
        assert_eq!(t.await.unwrap().unwrap(), 1);
    }
    assert_eq!(p.stats().await.token_requests, 1);
}

#[tokio::test]
async fn a_short_lived_token_is_refreshed_before_it_expires() {
    let p = Peers::start_with_ttl(4);
    let provider = secret_provider(&p, &p.info.clients.secret.client_secret);
    let first = provider.token().await.unwrap();
    // Past half its life (2 s) but before expiry (4 s): due for refresh.
    tokio::time::sleep(Duration::from_millis(2300)).await;
    let second = provider.token().await.unwrap();
    assert_eq!(second.generation(), first.generation() + 1);
    assert_ne!(first.secret(), second.secret());
}

#[tokio::test]
async fn invalidating_a_rejected_token_fetches_a_new_one_once() {
    let p = Peers::start();
    let provider = secret_provider(&p, &p.info.clients.secret.client_secret);
    let first = provider.token().await.unwrap();
    provider.invalidate(&first).await;
    provider.invalidate(&first).await; // a second sender with the same bad token
    let second = provider.token().await.unwrap();
    provider.invalidate(&first).await; // stale: must not drop the new token
    let third = provider.token().await.unwrap();
    assert_eq!(second.generation(), 2);
    assert_eq!(third.generation(), 2);
    assert_eq!(p.stats().await.token_requests, 2);
}

#[tokio::test]
async fn device_login_then_rotating_refresh_tokens_are_persisted() {
    let p = Peers::start();
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("delegated.token.json");
    let provider = TokenProvider::new(
        "delegated",
        endpoints(&p, &["openid", "offline_access", "smtp"]),
        &p.info.clients.device.client_id,
        Credentials::RefreshToken {
            token_file: token_file.clone(),
            client_secret: None,
        },
    )
    .unwrap();

    // Before login: a clear instruction.
    let err = provider.token().await.unwrap_err();
    assert!(err.to_string().contains("sendbox login"), "{err}");

    let (prompt, details) = provider.start_device_login().await.unwrap();
    assert!(prompt.verification_uri.starts_with(&p.info.issuer));
    let approve = p.approve_device(&prompt.user_code);
    let (approved, saved) = tokio::join!(approve, provider.finish_device_login(&details));
    let _: () = approved;
    assert_eq!(saved.unwrap(), token_file);

    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&token_file).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
    }
    let rt1 = sendbox_auth::token_file::read(&token_file, "delegated").unwrap();

    // Drop the login's access token: the next one comes from the refresh
    // grant, which rotates the refresh token.
    let login_token = provider.token().await.unwrap();
    provider.invalidate(&login_token).await;
    let refreshed = provider.token().await.unwrap();
    assert_ne!(refreshed.secret(), login_token.secret());
    let rt2 = sendbox_auth::token_file::read(&token_file, "delegated").unwrap();
    assert_ne!(rt1.refresh_token, rt2.refresh_token, "rotated token saved");

    // And again: each rotation is saved, so the chain never breaks.
    provider.invalidate(&refreshed).await;
    provider.token().await.unwrap();
    let rt3 = sendbox_auth::token_file::read(&token_file, "delegated").unwrap();
    assert_ne!(rt2.refresh_token, rt3.refresh_token);
}

#[tokio::test]
async fn the_http_client_never_follows_a_redirect() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // The "other host" a redirect would send the secret to.
    let other = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let other_addr = other.local_addr().unwrap();
    let hits = Arc::new(std::sync::atomic::AtomicU32::new(0));
    let h = hits.clone();
    tokio::spawn(async move {
        while let Ok((_s, _)) = other.accept().await {
            h.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
    });
    let redirector = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = redirector.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = redirector.accept().await {
            let mut buf = vec![0u8; 4096];
            let _ = s.read(&mut buf).await;
            let resp = format!(
                "HTTP/1.1 307 Temporary Redirect\r\nLocation: http://{other_addr}/token\r\nContent-Length: 0\r\n\r\n"
            );
            let _ = s.write_all(resp.as_bytes()).await;
        }
    });
    let provider = TokenProvider::new(
        "redirected",
        Endpoints {
            token_url: format!("http://{addr}/token"),
            device_url: None,
            scopes: vec!["smtp".into()],
        },
        "id",
        Credentials::ClientSecret(Secret::new("s3cret")),
    )
    .unwrap();
    assert!(provider.token().await.is_err());
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(hits.load(std::sync::atomic::Ordering::SeqCst), 0);
}

#[test]
fn plain_http_is_refused_off_loopback_and_debug_hides_secrets() {
    let err = TokenProvider::new(
        "x",
        Endpoints {
            token_url: "http://login.example.com/token".into(),
            device_url: None,
            scopes: vec![],
        },
        "id",
        Credentials::ClientSecret(Secret::new("topsecret")),
    )
    .unwrap_err();
    assert!(err.to_string().contains("must use https"), "{err}");

    let provider = TokenProvider::new(
        "x",
        Endpoints::microsoft365_app_only("contoso.onmicrosoft.com"),
        "id",
        Credentials::ClientSecret(Secret::new("topsecret")),
    )
    .unwrap();
    let debug = format!("{provider:?}");
    assert!(!debug.contains("topsecret"), "{debug}");
    assert!(
        debug.contains("login.microsoftonline.com/contoso.onmicrosoft.com"),
        "{debug}"
    );
}
