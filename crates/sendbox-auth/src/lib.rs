//! OAuth2 token providers: one per account, holding the account's client
//! credentials and handing out short-lived access tokens.
//!
//! This crate owns the keys. It knows token endpoints, grants (client
//! credentials with a secret or a certificate, refresh tokens from a device
//! login), caching and rotation. It must not know about SMTP, plugins or the
//! outbox: a transport asks [`TokenProvider::token`] and, when the server
//! rejects a token, [`TokenProvider::invalidate`].
//!
//! Guarantees:
//! - tokens are cached and refreshed ahead of expiry; concurrent callers
//!   share one refresh;
//! - the HTTP client never follows redirects (a token request must not be
//!   replayed to another host) and refuses plain `http://` except on
//!   loopback;
//! - a rotated refresh token is written to the token file (atomically, mode
//!   0600) *before* the new access token is used;
//! - secrets and tokens never appear in `Debug` output or logs.
//!
//! ```no_run
//! # async fn demo() -> Result<(), sendbox_auth::AuthError> {
//! use sendbox_auth::{Credentials, Endpoints, SecretSource, TokenProvider};
//! let provider = TokenProvider::new(
//!     "alerts",
//!     Endpoints::microsoft365_app_only("contoso.onmicrosoft.com"),
//!     "00000000-0000-0000-0000-000000000000",
//!     Credentials::ClientSecret(SecretSource::Env("M365_CLIENT_SECRET".into()).resolve()?),
//! )?;
//! let token = provider.token().await?;
//! println!("valid for {:?}", token.expires_in());
//! # Ok(()) }
//! ```

#![deny(missing_docs)]

mod endpoints;
mod error;
pub mod jwt;
mod secret;
pub mod token_file;

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

use oauth2::basic::{BasicClient, BasicTokenResponse};
use oauth2::{
    AuthType, ClientId, ClientSecret, DeviceAuthorizationUrl, RefreshToken, RequestTokenError,
    Scope, StandardDeviceAuthorizationResponse, TokenResponse, TokenUrl,
};
use tokio::sync::Mutex;

use endpoints::check_url;
pub use endpoints::{Credentials, Endpoints, http_client};
pub use error::{AuthError, explain};
pub use secret::{Secret, SecretSource};

/// Refresh this long before a token expires.
pub const REFRESH_MARGIN: Duration = Duration::from_secs(300);

/// How long a refusal by the token endpoint (`invalid_client`,
/// `invalid_grant`...) is answered from memory: many senders waiting on a
/// wrong secret cause one request, not one each.
pub const REFUSAL_HOLD: Duration = Duration::from_secs(30);

/// An access token and when it expires.
#[derive(Clone)]
pub struct AccessToken {
    secret: Secret,
    expires_at: Instant,
    /// How long it was valid for when issued.
    lifetime: Duration,
    /// A counter that identifies this token among the provider's tokens.
    generation: u64,
}

impl std::fmt::Debug for AccessToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AccessToken")
            .field("secret", &"[redacted]")
            .field("expires_in", &self.expires_in())
            .field("generation", &self.generation)
            .finish()
    }
}

impl AccessToken {
    /// The bearer token, for the one place that sends it.
    pub fn secret(&self) -> &Secret {
        &self.secret
    }
    /// Time left before it expires.
    pub fn expires_in(&self) -> Duration {
        self.expires_at.saturating_duration_since(Instant::now())
    }
    /// Which refresh produced it (1 for the first).
    pub fn generation(&self) -> u64 {
        self.generation
    }
}

/// What the device login shows the operator.
#[derive(Debug, Clone)]
pub struct DevicePrompt {
    /// Where to go, e.g. `https://microsoft.com/devicelogin`.
    pub verification_uri: String,
    /// The code to enter there.
    pub user_code: String,
    /// A URL with the code filled in, when the provider gives one.
    pub verification_uri_complete: Option<String>,
    /// How long the code is valid.
    pub expires_in: Duration,
}

/// Hands out access tokens for one account.
pub struct TokenProvider {
    account: String,
    endpoints: Endpoints,
    client_id: String,
    credentials: Credentials,
    http: reqwest::Client,
    cache: Mutex<Cache>,
    refreshes: AtomicU64,
}

/// The token, or the token endpoint's last refusal.
#[derive(Default)]
struct Cache {
    token: Option<AccessToken>,
    refused: Option<(Instant, AuthError)>,
}

impl std::fmt::Debug for TokenProvider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenProvider")
            .field("account", &self.account)
            .field("endpoints", &self.endpoints)
            .field("client_id", &self.client_id)
            .field("credentials", &self.credentials)
            .finish_non_exhaustive()
    }
}

type TokenError = RequestTokenError<
    oauth2::HttpClientError<reqwest::Error>,
    oauth2::StandardErrorResponse<oauth2::basic::BasicErrorResponseType>,
>;

/// The token endpoint's refusal, with the fix explained.
fn refused<T: oauth2::ErrorResponseType + AsRef<str>>(
    r: &oauth2::StandardErrorResponse<T>,
) -> AuthError {
    let code = r.error().as_ref().to_owned();
    let description = r.error_description().cloned();
    AuthError::Refused {
        fix: explain(&code, description.as_deref()),
        code,
        description,
    }
}

fn map_token_error(e: TokenError) -> AuthError {
    match e {
        RequestTokenError::ServerResponse(r) => refused(&r),
        RequestTokenError::Request(e) => AuthError::Unavailable(e.to_string()),
        RequestTokenError::Parse(e, body) => AuthError::Unavailable(format!(
            "unexpected answer ({e}): {}",
            String::from_utf8_lossy(&body)
                .chars()
                .take(200)
                .collect::<String>()
        )),
        RequestTokenError::Other(s) => AuthError::Unavailable(s),
    }
}

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl TokenProvider {
    /// A provider for `account`. Checks the endpoints now so a bad URL is a
    /// config error, not a send failure.
    pub fn new(
        account: &str,
        endpoints: Endpoints,
        client_id: &str,
        credentials: Credentials,
    ) -> Result<Self, AuthError> {
        check_url("token_url", &endpoints.token_url)?;
        if let Some(d) = &endpoints.device_url {
            check_url("device_url", d)?;
        }
        Ok(TokenProvider {
            account: account.to_owned(),
            endpoints,
            client_id: client_id.to_owned(),
            credentials,
            http: http_client()?,
            cache: Mutex::new(Cache::default()),
            refreshes: AtomicU64::new(0),
        })
    }

    /// The account's name.
    pub fn account(&self) -> &str {
        &self.account
    }

    /// How many tokens this provider has fetched.
    pub fn refresh_count(&self) -> u64 {
        self.refreshes.load(Ordering::Relaxed)
    }

    /// A valid access token: the cached one, or a new one when the cache is
    /// empty or within [`REFRESH_MARGIN`] of expiry (or of half its life, for
    /// short-lived tokens). Concurrent callers wait for one refresh; a
    /// refusal is repeated from memory for [`REFUSAL_HOLD`].
    pub async fn token(&self) -> Result<AccessToken, AuthError> {
        let mut cache = self.cache.lock().await;
        if let Some(t) = cache.token.as_ref()
            && t.expires_at > Instant::now()
            && !self.due(t)
        {
            return Ok(t.clone());
        }
        if let Some((at, refused)) = &cache.refused
            && at.elapsed() < REFUSAL_HOLD
        {
            return Err(refused.clone());
        }
        match self.fetch().await {
            Ok(fresh) => {
                cache.token = Some(fresh.clone());
                cache.refused = None;
                Ok(fresh)
            }
            Err(e) => {
                if matches!(e, AuthError::Refused { .. }) {
                    cache.refused = Some((Instant::now(), e.clone()));
                }
                Err(e)
            }
        }
    }

    /// Due for refresh: within the margin of expiry, or past half its life
    /// for tokens that live less than twice the margin.
    fn due(&self, t: &AccessToken) -> bool {
        t.expires_in() <= REFRESH_MARGIN.min(t.lifetime / 2)
    }

    /// Drops `rejected` from the cache (the server refused it), so the next
    /// [`TokenProvider::token`] fetches a new one. A token that was already
    /// replaced is left alone, so many failing senders cause one refresh.
    pub async fn invalidate(&self, rejected: &AccessToken) {
        let mut cache = self.cache.lock().await;
        if cache
            .token
            .as_ref()
            .is_some_and(|t| t.generation == rejected.generation)
        {
            tracing::info!(account = %self.account, generation = rejected.generation, "dropping rejected access token");
            cache.token = None;
        }
    }

    async fn fetch(&self) -> Result<AccessToken, AuthError> {
        let started = Instant::now();
        let token_url =
            TokenUrl::new(self.endpoints.token_url.clone()).map_err(|e| AuthError::Config {
                message: format!("token_url: {e}"),
            })?;
        let scopes = self.endpoints.scopes.iter().cloned().map(Scope::new);
        let base = BasicClient::new(ClientId::new(self.client_id.clone()))
            .set_auth_type(AuthType::RequestBody)
            .set_token_uri(token_url);
        let response: BasicTokenResponse = match &self.credentials {
            Credentials::ClientSecret(secret) => base
                .set_client_secret(ClientSecret::new(secret.expose().to_owned()))
                .exchange_client_credentials()
                .add_scopes(scopes)
                .request_async(&self.http)
                .await
                .map_err(map_token_error)?,
            Credentials::Certificate(key) => {
                let assertion = key.assertion(&self.client_id, &self.endpoints.token_url)?;
                base.exchange_client_credentials()
                    .add_scopes(scopes)
                    .add_extra_param("client_assertion_type", jwt::ASSERTION_TYPE)
                    .add_extra_param("client_assertion", assertion)
                    .request_async(&self.http)
                    .await
                    .map_err(map_token_error)?
            }
            Credentials::RefreshToken {
                token_file,
                client_secret,
            } => {
                let stored = token_file::read(token_file, &self.account)?;
                let client = match client_secret {
                    Some(s) => base.set_client_secret(ClientSecret::new(s.expose().to_owned())),
                    None => base,
                };
                let rt = RefreshToken::new(stored.refresh_token.clone());
                let response = client
                    .exchange_refresh_token(&rt)
                    .add_scopes(scopes)
                    .request_async(&self.http)
                    .await
                    .map_err(map_token_error)?;
                // Rotation: persist the new refresh token before the new
                // access token is used, or a crash loses the account.
                if let Some(new_rt) = response.refresh_token()
                    && new_rt.secret() != &stored.refresh_token
                {
                    let updated = token_file::StoredToken {
                        refresh_token: new_rt.secret().clone(),
                        obtained_at_unix: now_unix(),
                        scopes: stored.scopes.clone(),
                    };
                    token_file::write(token_file, &updated).map_err(|e| AuthError::Config {
                        message: format!(
                            "cannot save the rotated refresh token to {}: {e}; the account will need `sendbox login` again if this persists",
                            token_file.display()
                        ),
                    })?;
                    tracing::info!(account = %self.account, "refresh token rotated and saved");
                }
                response
            }
        };
        let token = self.issue(&response);
        tracing::info!(
            account = %self.account,
            generation = token.generation,
            expires_in_secs = token.lifetime.as_secs(),
            elapsed_ms = started.elapsed().as_millis() as u64,
            "access token obtained"
        );
        Ok(token)
    }

    /// The access token in a token endpoint's answer, numbered as the next
    /// generation.
    fn issue(&self, response: &impl TokenResponse) -> AccessToken {
        let lifetime = response.expires_in().unwrap_or(Duration::from_secs(3600));
        AccessToken {
            secret: Secret::new(response.access_token().secret().clone()),
            expires_at: Instant::now() + lifetime,
            lifetime,
            generation: self.refreshes.fetch_add(1, Ordering::Relaxed) + 1,
        }
    }

    /// Starts a device login: asks the device authorization endpoint for a
    /// code. Show the returned prompt to the operator, then call
    /// [`TokenProvider::finish_device_login`].
    pub async fn start_device_login(
        &self,
    ) -> Result<(DevicePrompt, StandardDeviceAuthorizationResponse), AuthError> {
        let device_url = self.endpoints.device_url.clone().ok_or_else(|| AuthError::Config {
            message: format!(
                "account `{}` has no device authorization endpoint: set `device_url` or use a preset with delegated login",
                self.account
            ),
        })?;
        let client = self.device_client(&device_url)?;
        let details: StandardDeviceAuthorizationResponse = client
            .exchange_device_code()
            .add_scopes(self.endpoints.scopes.iter().cloned().map(Scope::new))
            .request_async(&self.http)
            .await
            .map_err(map_token_error)?;
        let prompt = DevicePrompt {
            verification_uri: details.verification_uri().to_string(),
            user_code: details.user_code().secret().clone(),
            verification_uri_complete: details
                .verification_uri_complete()
                .map(|u| u.secret().clone()),
            expires_in: details.expires_in(),
        };
        Ok((prompt, details))
    }

    /// Polls the token endpoint (honouring `interval`, `slow_down` and
    /// expiry) until the operator completes the login, then writes the
    /// refresh token to the account's token file.
    pub async fn finish_device_login(
        &self,
        details: &StandardDeviceAuthorizationResponse,
    ) -> Result<PathBuf, AuthError> {
        let Credentials::RefreshToken { token_file, .. } = &self.credentials else {
            return Err(AuthError::Config {
                message: format!(
                    "account `{}` uses app-only credentials; `sendbox login` is only for delegated accounts (`token_file`)",
                    self.account
                ),
            });
        };
        let device_url = self.endpoints.device_url.clone().unwrap_or_default();
        let client = self.device_client(&device_url)?;
        let response = client
            .exchange_device_access_token(details)
            .request_async(&self.http, tokio::time::sleep, None)
            .await
            .map_err(|e| match e {
                RequestTokenError::ServerResponse(r) => refused(&r),
                other => AuthError::Unavailable(other.to_string()),
            })?;
        let rt = response.refresh_token().ok_or_else(|| AuthError::Refused {
            code: "no_refresh_token".into(),
            description: None,
            fix: "the provider issued no refresh token: request the `offline_access` scope".into(),
        })?;
        let stored = token_file::StoredToken {
            refresh_token: rt.secret().clone(),
            obtained_at_unix: now_unix(),
            scopes: self.endpoints.scopes.clone(),
        };
        token_file::write(token_file, &stored).map_err(|e| AuthError::Config {
            message: format!("cannot write token file {}: {e}", token_file.display()),
        })?;
        // The access token from the login is good too.
        *self.cache.lock().await = Cache {
            token: Some(self.issue(&response)),
            refused: None,
        };
        Ok(token_file.clone())
    }

    fn device_client(
        &self,
        device_url: &str,
    ) -> Result<
        BasicClient<
            oauth2::EndpointNotSet,
            oauth2::EndpointSet,
            oauth2::EndpointNotSet,
            oauth2::EndpointNotSet,
            oauth2::EndpointSet,
        >,
        AuthError,
    > {
        let token_url =
            TokenUrl::new(self.endpoints.token_url.clone()).map_err(|e| AuthError::Config {
                message: format!("token_url: {e}"),
            })?;
        let device =
            DeviceAuthorizationUrl::new(device_url.to_owned()).map_err(|e| AuthError::Config {
                message: format!("device_url: {e}"),
            })?;
        let mut client = BasicClient::new(ClientId::new(self.client_id.clone()))
            .set_auth_type(AuthType::RequestBody)
            .set_token_uri(token_url)
            .set_device_authorization_url(device);
        if let Credentials::RefreshToken {
            client_secret: Some(s),
            ..
        } = &self.credentials
        {
            client = client.set_client_secret(ClientSecret::new(s.expose().to_owned()));
        }
        Ok(client)
    }
}
