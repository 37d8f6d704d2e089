//! The webhook trigger: an HTTP server with one route per plugin.
//!
//! Per route: a body limit (413 beyond it), authentication by the host before
//! the plugin runs — an HMAC-SHA256 signature over the body (GitHub's
//! `X-Hub-Signature-256: sha256=<hex>` style, header and prefix
//! configurable) or a bearer token, both compared in constant time — with
//! 401 and no plugin call on failure, and a concurrency limit (503 when
//! saturated). The answer comes after the commit: `202` with the queued ids
//! (and the ids of earlier messages it duplicated) as JSON, or the plugin's
//! own response; `503` when the outbox cannot commit. `/healthz` answers
//! `ok`.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, Request, StatusCode};
use axum::response::{IntoResponse, Response};
use sendbox_types::{Bytes, Event, HttpRequest};
use tokio::sync::Semaphore;

use crate::{Dispatch, Dispatched, Job, new_event_id};

/// The trigger's name in config, logs and metrics.
pub const TYPE: &str = "webhook";

/// How a route authenticates callers.
#[derive(Clone, PartialEq, Eq)]
pub enum Auth {
    /// No authentication (only sensible on loopback).
    None,
    /// HMAC-SHA256 of the body with `secret`, hex, in `header` after
    /// `prefix` (e.g. `X-Hub-Signature-256: sha256=...`).
    Hmac {
        /// The shared secret.
        secret: Vec<u8>,
        /// Header name, lower-case.
        header: String,
        /// Prefix before the hex digest, e.g. `sha256=`.
        prefix: String,
    },
    /// `Authorization: Bearer <token>`.
    Bearer {
        /// The expected token.
        token: Vec<u8>,
    },
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Auth::None => f.write_str("None"),
            Auth::Hmac { header, prefix, .. } => write!(
                f,
                "Hmac {{ header: {header}, prefix: {prefix}, secret: [redacted] }}"
            ),
            Auth::Bearer { .. } => f.write_str("Bearer { token: [redacted] }"),
        }
    }
}

/// One plugin's route.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    /// The plugin.
    pub plugin: String,
    /// Authentication.
    pub auth: Auth,
    /// Largest body accepted.
    pub max_body_bytes: usize,
    /// Requests handled at once.
    pub concurrency: usize,
    /// How long a request beyond `concurrency` waits for a free slot
    /// before it is answered 503.
    pub queue_wait: Duration,
}

struct RouteState {
    route: Route,
    permits: Semaphore,
}

/// Renders `/metrics` (Prometheus text format).
pub type MetricsFn = Arc<dyn Fn() -> String + Send + Sync>;

/// The routes a server answers, keyed by path; replaced while it runs
/// (hot reload). Cheap to clone; clones share the table.
#[derive(Clone, Default)]
pub struct RouteTable(Arc<RwLock<Arc<Routes>>>);

type Routes = HashMap<String, Arc<RouteState>>;

impl RouteTable {
    /// A table with these routes.
    pub fn new(routes: HashMap<String, Route>) -> Self {
        let table = RouteTable::default();
        table.replace(routes);
        table
    }

    /// Replaces every route. A route that did not change keeps its
    /// concurrency permits, so requests in flight still count against it;
    /// a changed route starts afresh while its in-flight requests finish
    /// on the old one.
    pub fn replace(&self, routes: HashMap<String, Route>) {
        let old = self.snapshot();
        let new = routes
            .into_iter()
            .map(|(path, route)| {
                let state = match old.get(&path) {
                    Some(rs) if rs.route == route => rs.clone(),
                    _ => Arc::new(RouteState {
                        permits: Semaphore::new(route.concurrency.max(1)),
                        route,
                    }),
                };
                (path, state)
            })
            .collect();
        *self.0.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(new);
    }

    fn snapshot(&self) -> Arc<Routes> {
        self.0.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn get(&self, path: &str) -> Option<Arc<RouteState>> {
        self.snapshot().get(path).cloned()
    }
}

struct App {
    routes: RouteTable,
    dispatch: Dispatch,
    metrics: Option<MetricsFn>,
}

fn json(status: StatusCode, value: serde_json::Value) -> Response {
    (
        status,
        [("content-type", "application/json")],
        value.to_string(),
    )
        .into_response()
}

fn verify(auth: &Auth, headers: &HeaderMap, body: &[u8]) -> Result<(), &'static str> {
    match auth {
        Auth::None => Ok(()),
        Auth::Hmac {
            secret,
            header,
            prefix,
        } => {
            let given = headers
                .get(header.as_str())
                .and_then(|v| v.to_str().ok())
                .ok_or("missing signature header")?;
            let hex_sig = given
                .strip_prefix(prefix.as_str())
                .ok_or("malformed signature")?;
            let sig = hex::decode(hex_sig.trim()).map_err(|_| "malformed signature")?;
            let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret);
            // Constant-time comparison inside ring.
            ring::hmac::verify(&key, body, &sig).map_err(|_| "bad signature")
        }
        Auth::Bearer { token } => {
            let given = headers
                .get("authorization")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.strip_prefix("Bearer "))
                .ok_or("missing bearer token")?;
            // Constant time: compare HMACs of both under a random key.
            let rng = ring::rand::SystemRandom::new();
            let key = ring::hmac::Key::generate(ring::hmac::HMAC_SHA256, &rng)
                .map_err(|_| "no randomness")?;
            let expected = ring::hmac::sign(&key, token);
            ring::hmac::verify(&key, given.as_bytes(), expected.as_ref())
                .map_err(|_| "bad bearer token")
        }
    }
}

async fn handle(State(app): State<Arc<App>>, req: Request<Body>) -> Response {
    let path = req.uri().path().to_owned();
    if path == "/healthz" {
        return (StatusCode::OK, "ok\n").into_response();
    }
    if path == "/metrics"
        && let Some(m) = &app.metrics
    {
        let m = m.clone();
        let text = tokio::task::spawn_blocking(move || m())
            .await
            .unwrap_or_default();
        return (
            StatusCode::OK,
            [("content-type", "text/plain; version=0.0.4")],
            text,
        )
            .into_response();
    }
    let Some(rs) = app.routes.get(&path) else {
        return json(
            StatusCode::NOT_FOUND,
            serde_json::json!({"error": format!("no webhook at {path}")}),
        );
    };
    let Ok(Ok(_permit)) = tokio::time::timeout(rs.route.queue_wait, rs.permits.acquire()).await
    else {
        tracing::warn!(plugin = %rs.route.plugin, %path, concurrency = rs.route.concurrency, "webhook refused: route saturated");
        let mut resp = json(
            StatusCode::SERVICE_UNAVAILABLE,
            serde_json::json!({"error": "too many requests in flight for this route; retry later"}),
        );
        resp.headers_mut()
            .insert("retry-after", axum::http::HeaderValue::from_static("1"));
        return resp;
    };
    let (parts, body) = req.into_parts();
    let method = parts.method.to_string();
    let query = parts.uri.query().unwrap_or_default().to_owned();
    let headers = parts.headers;
    let body = match read_limited(body, rs.route.max_body_bytes).await {
        Ok(b) => b,
        Err(()) => {
            return json(
                StatusCode::PAYLOAD_TOO_LARGE,
                serde_json::json!({"error": format!("body over {} bytes", rs.route.max_body_bytes)}),
            );
        }
    };
    if let Err(why) = verify(&rs.route.auth, &headers, &body) {
        tracing::warn!(plugin = %rs.route.plugin, %path, reason = why, "webhook refused: authentication failed");
        return json(StatusCode::UNAUTHORIZED, serde_json::json!({"error": why}));
    }
    let drop_header = match &rs.route.auth {
        Auth::Hmac { header, .. } => Some(header.clone()),
        _ => None,
    };
    let headers: Vec<(String, String)> = headers
        .iter()
        .filter(|(n, _)| {
            n.as_str() != "authorization" && Some(n.as_str()) != drop_header.as_deref()
        })
        .map(|(n, v)| {
            (
                n.as_str().to_owned(),
                String::from_utf8_lossy(v.as_bytes()).into_owned(),
            )
        })
        .collect();
    let event_id = new_event_id(TYPE);
    let job = Job {
        plugin: rs.route.plugin.clone(),
        event: Event::Webhook(HttpRequest {
            method,
            path,
            query,
            headers,
            body: Bytes(body.to_vec()),
        }),
        event_id: event_id.clone(),
    };
    match (app.dispatch)(job).await {
        Dispatched::Committed {
            response: Some(r), ..
        } => {
            let mut resp = Response::builder().status(r.status);
            for (n, v) in &r.headers {
                resp = resp.header(n.as_str(), v.as_str());
            }
            resp.body(Body::from(r.body.0))
                .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
        }
        Dispatched::Committed {
            queued,
            duplicates,
            response: None,
        } => json(
            StatusCode::ACCEPTED,
            serde_json::json!({"event_id": event_id, "queued": queued, "duplicates": duplicates}),
        ),
        Dispatched::PluginFailed(e) => json(
            StatusCode::INTERNAL_SERVER_ERROR,
            serde_json::json!({"event_id": event_id, "error": e}),
        ),
        Dispatched::Refused(e) => json(
            StatusCode::UNPROCESSABLE_ENTITY,
            serde_json::json!({"event_id": event_id, "error": e}),
        ),
        Dispatched::StoreFailed(e) => json(
            StatusCode::SERVICE_UNAVAILABLE,
            serde_json::json!({"event_id": event_id, "error": e}),
        ),
        Dispatched::NoPlugin => json(
            StatusCode::NOT_FOUND,
            serde_json::json!({"error": "plugin not loaded"}),
        ),
    }
}

/// Most bytes read (and dropped) from an oversized body before answering
/// 413, so the client is done sending and sees the answer.
const DRAIN_BYTES: usize = 16 << 20;

/// Reads the body if it is at most `limit` bytes; otherwise drains up to
/// [`DRAIN_BYTES`] and fails.
async fn read_limited(body: Body, limit: usize) -> Result<Vec<u8>, ()> {
    use http_body_util::BodyExt;
    let mut body = body;
    let mut buf = Vec::new();
    let mut seen = 0usize;
    while let Some(frame) = body.frame().await {
        let Ok(frame) = frame else { return Err(()) };
        if let Ok(data) = frame.into_data() {
            seen += data.len();
            if seen <= limit {
                buf.extend_from_slice(&data);
            } else if seen > DRAIN_BYTES {
                return Err(());
            }
        }
    }
    if seen > limit { Err(()) } else { Ok(buf) }
}

/// Serves the routes in `routes` on `listener` until `shutdown`; the table
/// may be replaced while it serves.
pub async fn serve(
    listener: tokio::net::TcpListener,
    routes: RouteTable,
    dispatch: Dispatch,
    metrics: Option<MetricsFn>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let app = Arc::new(App {
        routes,
        dispatch,
        metrics,
    });
    let router = axum::Router::new().fallback(handle).with_state(app);
    axum::serve(listener, router.into_make_service())
        .with_graceful_shutdown(shutdown)
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hmac_signatures_are_checked() {
        let secret = b"s3cret".to_vec();
        let auth = Auth::Hmac {
            secret: secret.clone(),
            header: "x-hub-signature-256".into(),
            prefix: "sha256=".into(),
        };
        let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &secret);
        let sig = hex::encode(ring::hmac::sign(&key, b"body").as_ref());
        let mut h = HeaderMap::new();
        h.insert(
            "x-hub-signature-256",
            format!("sha256={sig}").parse().unwrap(),
        );
        assert!(verify(&auth, &h, b"body").is_ok());
        assert_eq!(verify(&auth, &h, b"other"), Err("bad signature"));
        assert_eq!(
            verify(&auth, &HeaderMap::new(), b"body"),
            Err("missing signature header")
        );
        let bearer = Auth::Bearer {
            token: b"tok".to_vec(),
        };
        let mut h = HeaderMap::new();
        h.insert("authorization", "Bearer tok".parse().unwrap());
        assert!(verify(&bearer, &h, b"").is_ok());
        h.insert("authorization", "Bearer nope".parse().unwrap());
        assert!(verify(&bearer, &h, b"").is_err());
    }
}
