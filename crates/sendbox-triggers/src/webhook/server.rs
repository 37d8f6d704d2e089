//! The HTTP server under the routes: accepts connections up to a cap and
//! gives every stranger a deadline.
//!
//! `axum::serve` has neither a connection cap nor a header timeout, so the
//! accept loop is ours: a connection is accepted only while fewer than
//! `max_connections` are open (the rest wait in the kernel's backlog), and
//! hyper closes one that does not finish its request headers within
//! `header_timeout` — an idle keep-alive connection included. Body reads
//! are bounded by `body_timeout` in the handler.

use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::sync::Semaphore;

use super::{App, MetricsFn, RouteTable, handle};
use crate::Dispatch;

/// What the server lets any one client hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerLimits {
    /// Most connections open at once. Default 1024.
    pub max_connections: usize,
    /// Time to receive a request's headers (and the wait for the next
    /// request on a kept-alive connection). Default 10 s.
    pub header_timeout: Duration,
    /// Time to receive a request's body. Default 30 s.
    pub body_timeout: Duration,
    /// Most bytes of request-body buffers held at once, over every connection:
    /// a body is read before its signature can be checked, so without
    /// this `max_connections` strangers could each make the daemon hold
    /// a route's `max_body_bytes`. A request whose body would go past it
    /// is answered `503` with `Retry-After`. Default 64 MiB.
    pub max_held_body_bytes: usize,
}

impl Default for ServerLimits {
    fn default() -> Self {
        ServerLimits {
            max_connections: 1024,
            header_timeout: Duration::from_secs(10),
            body_timeout: Duration::from_secs(30),
            max_held_body_bytes: 64 << 20,
        }
    }
}

/// Most request header bytes, the request line included.
const MAX_HEADER_BYTES: usize = 64 << 10;

/// Serves the routes in `routes` on `listener` until `shutdown`; the table
/// may be replaced while it serves. After `shutdown`, requests in flight
/// finish and idle connections close.
pub async fn serve(
    listener: tokio::net::TcpListener,
    routes: RouteTable,
    dispatch: Dispatch,
    metrics: Option<MetricsFn>,
    limits: ServerLimits,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let slots = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let header_timeout = limits.header_timeout;
    let app = Arc::new(App::new(routes, dispatch, metrics, limits));
    let router = axum::Router::new().fallback(handle).with_state(app);
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    tokio::pin!(shutdown);
    loop {
        let slot = tokio::select! {
            _ = &mut shutdown => break,
            slot = slots.clone().acquire_owned() => match slot {
                Ok(s) => s,
                Err(_) => break,
            },
        };
        let (stream, _peer) = tokio::select! {
            _ = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors and the like: wait, retry.
                    tracing::warn!(error = %e, "webhook server cannot accept a connection");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let service = TowerToHyperService::new(router.clone());
        let conn = hyper::server::conn::http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(header_timeout)
            .max_buf_size(MAX_HEADER_BYTES.max(8192))
            .serve_connection(TokioIo::new(stream), service);
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            let _ = conn.await;
            drop(slot);
        });
    }
    drop(listener);
    graceful.shutdown().await;
    Ok(())
}
