//! The webhook trigger: an HTTP server with one route per plugin.
//!
//! Per route: authentication by the host before the plugin runs (see
//! [`Auth`]: GitHub-style, Standard Webhooks, Stripe and Slack signatures,
//! or a bearer token), with 401 and no plugin call on failure; replay
//! protection ([`Replay`]); a body limit (413 beyond it); a limit on the
//! route's plugin runs at once (503 with `Retry-After` when saturated past
//! `queue_wait`). The answer comes after the commit: `202` with the queued
//! ids (and the ids of earlier messages it duplicated) as JSON, or the
//! plugin's own response; `503` when the outbox cannot commit. `/healthz`
//! answers `ok`.
//!
//! Nothing a stranger sends is held without a cap and a timeout (see
//! [`ServerLimits`]): a connection cap, a header-read timeout, a body-read
//! timeout, the body read only up to the route's limit, and a cap on the
//! bytes of every body held at once (a body is read before its signature
//! can be checked). A route's
//! concurrency permit is taken only once the request is authenticated, so
//! idle or slow strangers cannot make an authenticated caller wait.

mod auth;
mod server;

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use axum::body::Body;
use axum::extract::State;
use axum::http::{Request, StatusCode};
use axum::response::{IntoResponse, Response};
use sendbox_types::{Bytes, Event, HttpRequest};
use tokio::sync::Semaphore;

use crate::{Dispatch, Dispatched, Job, RunSlot, new_event_id};

pub use auth::{Auth, Replay};
use auth::{Seen, SeenIds};
pub use server::{ServerLimits, serve};

/// The trigger's name in config, logs and metrics.
pub const TYPE: &str = "webhook";

/// One plugin's route.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    /// The plugin.
    pub plugin: String,
    /// Authentication.
    pub auth: Auth,
    /// Replay protection.
    pub replay: Replay,
    /// Largest body accepted.
    pub max_body_bytes: usize,
    /// The route's plugin runs at once. A request's slot is let go once
    /// its plugin has run: requests waiting for their commit do not count.
    pub concurrency: usize,
    /// How long a request beyond `concurrency` waits for a free slot
    /// before it is answered 503.
    pub queue_wait: Duration,
}

struct RouteState {
    route: Route,
    /// The route's slots for plugin runs (`concurrency`).
    permits: Arc<Semaphore>,
    seen: SeenIds,
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
                        permits: Arc::new(Semaphore::new(route.concurrency.max(1))),
                        seen: SeenIds::default(),
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

    /// The plugin a path is routed to now, if any.
    pub fn plugin_at(&self, path: &str) -> Option<String> {
        self.get(path).map(|rs| rs.route.plugin.clone())
    }

    fn get(&self, path: &str) -> Option<Arc<RouteState>> {
        self.snapshot().get(path).cloned()
    }
}

struct App {
    routes: RouteTable,
    dispatch: Dispatch,
    metrics: Option<MetricsFn>,
    limits: ServerLimits,
    /// One permit per byte of request bodies held
    /// ([`ServerLimits::max_held_body_bytes`]).
    held_bytes: Semaphore,
}

impl App {
    fn new(
        routes: RouteTable,
        dispatch: Dispatch,
        metrics: Option<MetricsFn>,
        limits: ServerLimits,
    ) -> App {
        let held_bytes = Semaphore::new(limits.max_held_body_bytes.min(Semaphore::MAX_PERMITS));
        App {
            routes,
            dispatch,
            metrics,
            limits,
            held_bytes,
        }
    }
}

/// Longest error text put in an answer, in bytes.
const MAX_ERROR_ANSWER_BYTES: usize = 4096;

/// A delivery id being handled: accepted when the event commits, forgotten
/// otherwise (on every other path, a dropped connection included), so the
/// sender may retry a delivery that failed.
struct InFlight<'a> {
    seen: &'a SeenIds,
    id: String,
    accepted: bool,
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        if self.accepted {
            self.seen.accept(&self.id);
        } else {
            self.seen.forget(&self.id);
        }
    }
}

fn unauthorized(route: &Route, path: &str, why: auth::Refusal) -> Response {
    tracing::warn!(plugin = %route.plugin, %path, reason = why, "webhook refused: authentication failed");
    json(StatusCode::UNAUTHORIZED, serde_json::json!({"error": why}))
}

fn retry_later(status: StatusCode, why: &str) -> Response {
    let mut resp = json(status, serde_json::json!({"error": why}));
    resp.headers_mut()
        .insert("retry-after", axum::http::HeaderValue::from_static("1"));
    resp
}

fn json(status: StatusCode, value: serde_json::Value) -> Response {
    (
        status,
        [("content-type", "application/json")],
        value.to_string(),
    )
        .into_response()
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
    let route = &rs.route;
    // Credentials first, from the headers alone: a stranger is refused
    // before any of its body is read.
    if let Err(why) = auth::precheck(&route.auth, &route.replay, req.headers()) {
        return unauthorized(route, &path, why);
    }
    let (parts, body) = req.into_parts();
    let read = tokio::time::timeout(
        app.limits.body_timeout,
        read_limited(body, route.max_body_bytes, &app.held_bytes),
    );
    // The body's bytes stay counted against `max_held_body_bytes` until
    // the answer is sent (the event holds the body meanwhile).
    let (body, _held) = match read.await {
        Ok(Ok(read)) => read,
        Ok(Err(Unread::TooLarge)) => {
            return json(
                StatusCode::PAYLOAD_TOO_LARGE,
                serde_json::json!({"error": format!("body over {} bytes", route.max_body_bytes)}),
            );
        }
        Ok(Err(Unread::Busy)) => {
            tracing::warn!(plugin = %route.plugin, %path, max_held_body_bytes = app.limits.max_held_body_bytes, "webhook refused: too many request bodies held at once");
            return retry_later(
                StatusCode::SERVICE_UNAVAILABLE,
                "too many request bodies held at once; retry later",
            );
        }
        Err(_) => {
            tracing::warn!(plugin = %route.plugin, %path, "webhook refused: body not received in time");
            return json(
                StatusCode::REQUEST_TIMEOUT,
                serde_json::json!({"error": format!("body not received within {} ms", app.limits.body_timeout.as_millis())}),
            );
        }
    };
    let delivery = match auth::verify(&route.auth, &route.replay, &parts.headers, &body) {
        Ok(d) => d,
        Err(why) => return unauthorized(route, &path, why),
    };
    // Replays: a delivery seen within its window is not run again.
    let mut in_flight = None;
    if let Some((id, keep)) = delivery {
        match rs.seen.begin(&id, keep) {
            Seen::New => {
                in_flight = Some(InFlight {
                    seen: &rs.seen,
                    id,
                    accepted: false,
                })
            }
            Seen::Accepted => {
                tracing::info!(plugin = %route.plugin, %path, delivery = %id, "webhook delivery seen before: not run again");
                return json(
                    StatusCode::OK,
                    serde_json::json!({"duplicate_delivery": id}),
                );
            }
            Seen::InFlight => {
                tracing::warn!(plugin = %route.plugin, %path, delivery = %id, "webhook refused: delivery already in flight");
                return retry_later(
                    StatusCode::CONFLICT,
                    "this delivery is being handled; retry later",
                );
            }
            Seen::Full => {
                return retry_later(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "too many deliveries in the replay window; retry later",
                );
            }
        }
    }
    // Only now, authenticated and with its body, does the request wait for
    // one of the route's slots.
    let Some(slot) = RunSlot::take(&rs.permits, route.queue_wait).await else {
        tracing::warn!(plugin = %route.plugin, %path, concurrency = route.concurrency, "webhook refused: route saturated");
        return retry_later(
            StatusCode::SERVICE_UNAVAILABLE,
            "too many requests in flight for this route; retry later",
        );
    };
    let method = parts.method.to_string();
    let query = parts.uri.query().unwrap_or_default().to_owned();
    let hidden = route.auth.hidden_header();
    let headers: Vec<(String, String)> = parts
        .headers
        .iter()
        .filter(|(n, _)| n.as_str() != "authorization" && Some(n.as_str()) != hidden)
        .map(|(n, v)| {
            (
                n.as_str().to_owned(),
                String::from_utf8_lossy(v.as_bytes()).into_owned(),
            )
        })
        .collect();
    let event_id = new_event_id(TYPE);
    let job = Job {
        plugin: route.plugin.clone(),
        event: Event::Webhook(HttpRequest {
            method,
            path,
            query,
            headers,
            body: Bytes(body),
        }),
        event_id: event_id.clone(),
        // Held while the plugin runs; the dispatcher lets go of it before
        // the commit.
        slot: Some(slot),
    };
    let dispatched = (app.dispatch)(job).await;
    if let (Some(f), Dispatched::Committed { .. }) = (in_flight.as_mut(), &dispatched) {
        f.accepted = true;
    }
    match dispatched {
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
        Dispatched::PluginFailed(mut e) => {
            sendbox_types::truncate_text(&mut e, MAX_ERROR_ANSWER_BYTES);
            json(
                StatusCode::INTERNAL_SERVER_ERROR,
                serde_json::json!({"event_id": event_id, "error": e}),
            )
        }
        Dispatched::Refused(mut e) => {
            sendbox_types::truncate_text(&mut e, MAX_ERROR_ANSWER_BYTES);
            json(
                StatusCode::UNPROCESSABLE_ENTITY,
                serde_json::json!({"event_id": event_id, "error": e}),
            )
        }
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

/// Why a body was not read.
enum Unread {
    /// Over the route's limit, or the connection failed mid-body.
    TooLarge,
    /// Holding it would go past the server's `max_held_body_bytes`.
    Busy,
}

/// Reads the body if it is at most `limit` bytes, holding one of `held`'s
/// permits per byte of the buffer it allocates (taken before the buffer
/// grows); otherwise (over the limit, or no permits left) lets go of what
/// it held, drains up to [`DRAIN_BYTES`] so the client is done sending and
/// sees the answer, and fails.
async fn read_limited(
    body: Body,
    limit: usize,
    held: &Semaphore,
) -> Result<(Vec<u8>, Option<tokio::sync::SemaphorePermit<'_>>), Unread> {
    use http_body_util::BodyExt;
    let mut body = body;
    let mut buf = Vec::new();
    let mut permit: Option<tokio::sync::SemaphorePermit<'_>> = None;
    let mut refused = None;
    let mut seen = 0usize;
    // Bytes of `buf` the permit covers.
    let mut accounted = 0usize;
    while let Some(frame) = body.frame().await {
        let Ok(frame) = frame else {
            return Err(Unread::TooLarge);
        };
        let Ok(data) = frame.into_data() else {
            continue;
        };
        seen += data.len();
        if refused.is_none() && seen > limit {
            refused = Some(Unread::TooLarge);
        }
        if refused.is_none() && seen > accounted {
            // The buffer doubles, never past the route's limit; the
            // permits for its new bytes are taken before they are
            // allocated.
            let grown = (accounted * 2).max(seen).min(limit);
            let more = u32::try_from(grown - accounted)
                .ok()
                .and_then(|n| held.try_acquire_many(n).ok());
            match (more, permit.as_mut()) {
                (Some(more), Some(p)) => p.merge(more),
                (Some(more), None) => permit = Some(more),
                (None, _) => refused = Some(Unread::Busy),
            }
            if refused.is_none() {
                accounted = grown;
                buf.reserve_exact(grown - buf.len());
            }
        }
        match refused {
            None => buf.extend_from_slice(&data),
            Some(_) => {
                // Nothing more is kept: what was read goes now.
                buf = Vec::new();
                permit = None;
                if seen > DRAIN_BYTES {
                    break;
                }
            }
        }
    }
    match refused {
        Some(why) => Err(why),
        None => Ok((buf, permit)),
    }
}

/// The request path for fuzzing: one raw request through the real handler,
/// on routes with every authentication scheme and a plugin that always
/// commits. Not for production use.
#[doc(hidden)]
pub mod fuzzing {
    use super::*;

    /// The secret every fuzzing route signs with.
    pub const SECRET: &[u8] = b"fuzzing-secret";

    fn app() -> Arc<App> {
        let route = |auth: Auth| Route {
            plugin: "p".into(),
            auth,
            replay: Replay {
                dedupe_header: Some("x-delivery".into()),
                ..Replay::default()
            },
            max_body_bytes: 4096,
            concurrency: 4,
            queue_wait: Duration::from_millis(10),
        };
        let secret = SECRET.to_vec();
        let routes = HashMap::from([
            ("/none".to_string(), route(Auth::None)),
            (
                "/hmac".to_string(),
                route(Auth::Hmac {
                    secret: secret.clone(),
                    header: "x-hub-signature-256".into(),
                    prefix: "sha256=".into(),
                }),
            ),
            (
                "/standard".to_string(),
                route(Auth::StandardWebhooks {
                    secret: secret.clone(),
                }),
            ),
            (
                "/stripe".to_string(),
                route(Auth::Stripe {
                    secret: secret.clone(),
                }),
            ),
            (
                "/slack".to_string(),
                route(Auth::Slack {
                    secret: secret.clone(),
                }),
            ),
            ("/bearer".to_string(), route(Auth::Bearer { token: secret })),
        ]);
        let dispatch: Dispatch = Arc::new(|job: Job| {
            Box::pin(async move {
                // The plugin's answer echoes a header, as a plugin may.
                let echoed = match &job.event {
                    Event::Webhook(r) => r.headers.first().map(|(_, v)| v.clone()),
                    _ => None,
                };
                Dispatched::Committed {
                    queued: vec![1],
                    duplicates: vec![],
                    response: echoed.map(|v| sendbox_types::HttpResponse {
                        status: 200,
                        headers: vec![("x-echo".into(), v)],
                        body: Bytes(Vec::new()),
                    }),
                }
            })
        });
        Arc::new(App::new(
            RouteTable::new(routes),
            dispatch,
            None,
            ServerLimits::default(),
        ))
    }

    /// Parses `raw` as `METHOD PATH\nName: value\n...\n\nbody` (lines
    /// that do not parse are skipped) and answers it; returns the status.
    pub fn request(raw: &[u8]) -> u16 {
        thread_local! {
            static RT: tokio::runtime::Runtime = tokio::runtime::Builder::new_current_thread()
                .enable_time()
                .build()
                .expect("a runtime");
            static APP: Arc<App> = app();
        }
        let split = raw
            .windows(2)
            .position(|w| w == b"\n\n")
            .map_or((raw, &b""[..]), |i| (&raw[..i], &raw[i + 2..]));
        let (head, body) = split;
        let head = String::from_utf8_lossy(head);
        let mut lines = head.lines();
        let first = lines.next().unwrap_or_default();
        let mut parts = first.splitn(2, ' ');
        let method = parts.next().unwrap_or("POST");
        let path = parts.next().unwrap_or("/none");
        let mut builder = Request::builder().method(
            axum::http::Method::from_bytes(method.as_bytes()).unwrap_or(axum::http::Method::POST),
        );
        builder = builder.uri(
            path.parse::<axum::http::Uri>()
                .unwrap_or_else(|_| axum::http::Uri::from_static("/none")),
        );
        for line in lines {
            if let Some((n, v)) = line.split_once(':')
                && let (Ok(n), Ok(v)) = (
                    axum::http::HeaderName::from_bytes(n.trim().as_bytes()),
                    axum::http::HeaderValue::from_str(v.trim()),
                )
            {
                builder = builder.header(n, v);
            }
        }
        let Ok(req) = builder.body(Body::from(body.to_vec())) else {
            return 0;
        };
        let app = APP.with(Arc::clone);
        RT.with(|rt| rt.block_on(handle(State(app), req)).status().as_u16())
    }
}
