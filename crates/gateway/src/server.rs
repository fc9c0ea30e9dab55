//! Listeners: our own accept loop over hyper's HTTP/1.1 server, so that every connection gets
//! the timeouts that keep slow or malicious clients from holding resources. Connections come
//! from the runtime's [`Acceptor`], which backs off when accepting fails for want of file
//! descriptors instead of spinning (the Envoy picker's listeners use the same one).
//!
//! - **Header read timeout** (hyper's `header_read_timeout`, default
//!   [`kvgate_runtime::config::DEFAULT_HEADER_READ_TIMEOUT_MS`]): a client dribbling its request head
//!   (slowloris) is disconnected.
//! - **Body read timeout** (in the handler, default
//!   [`kvgate_runtime::config::DEFAULT_BODY_READ_TIMEOUT_MS`]): a body that does not arrive in time gets
//!   a 408 and the connection is released.
//! - **Idle timeout** (default [`kvgate_runtime::config::DEFAULT_IDLE_TIMEOUT_MS`]): a keep-alive
//!   connection with no request in flight for that long is closed. A request is in flight from
//!   its head until its response body is finished or dropped, so long generations (minutes
//!   without a byte for a non-streaming request) are never cut by it.
//!
//! HTTP/1.1 only: OpenAI clients and SDKs speak it, and it keeps one request per connection at a
//! time, which makes "client went away" exactly "connection closed".

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::body::Body;
use hyper::body::{Frame, SizeHint};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

use kvgate_runtime::accept::Acceptor;
use kvgate_runtime::config::Limits;

/// How often, as a fraction of the idle timeout, a connection checks whether it is idle: a
/// quarter bounds the overshoot to 25% of the timeout at one timer wake-up per quarter.
const IDLE_CHECKS_PER_TIMEOUT: u32 = 4;

#[derive(Debug)]
struct ConnActivity {
    origin: Instant,
    active: AtomicUsize,
    last_ms: AtomicU64,
}

impl ConnActivity {
    fn touch(&self) {
        let ms = u64::try_from(self.origin.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_ms.store(ms, Ordering::Relaxed);
    }

    fn idle_for(&self) -> Option<Duration> {
        if self.active.load(Ordering::Acquire) > 0 {
            return None;
        }
        let now = u64::try_from(self.origin.elapsed().as_millis()).unwrap_or(u64::MAX);
        Some(Duration::from_millis(
            now.saturating_sub(self.last_ms.load(Ordering::Relaxed)),
        ))
    }
}

/// Marks a request in flight on its connection until dropped.
struct ActiveGuard(Arc<ConnActivity>);

impl ActiveGuard {
    fn new(a: Arc<ConnActivity>) -> Self {
        a.active.fetch_add(1, Ordering::AcqRel);
        a.touch();
        Self(a)
    }
}

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.touch();
        self.0.active.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A response body that keeps its request marked in flight until it is finished or dropped.
struct TrackedBody {
    inner: Body,
    _guard: ActiveGuard,
}

impl hyper::body::Body for TrackedBody {
    type Data = bytes::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Serves `app` on `listener` until `stop` fires; then stops accepting and lets open
/// connections finish their current request.
pub async fn serve(
    listener: TcpListener,
    app: axum::Router,
    limits: Limits,
    stop: CancellationToken,
) {
    let mut conns = tokio::task::JoinSet::new();
    let mut acceptor = Acceptor::new(listener);
    loop {
        tokio::select! {
            biased;
            () = stop.cancelled() => break,
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
            (sock, _) = acceptor.accept() => {
                conns.spawn(serve_connection(sock, app.clone(), limits, stop.clone()));
            }
        }
    }
    drop(acceptor);
    while conns.join_next().await.is_some() {}
}

async fn serve_connection(
    sock: tokio::net::TcpStream,
    app: axum::Router,
    limits: Limits,
    stop: CancellationToken,
) {
    let activity = Arc::new(ConnActivity {
        origin: Instant::now(),
        active: AtomicUsize::new(0),
        last_ms: AtomicU64::new(0),
    });
    let svc_activity = activity.clone();
    let svc = hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
        let guard = ActiveGuard::new(svc_activity.clone());
        let app = app.clone();
        async move {
            let resp = app.oneshot(req.map(Body::new)).await?;
            Ok::<_, std::convert::Infallible>(resp.map(|inner| {
                Body::new(TrackedBody {
                    inner,
                    _guard: guard,
                })
            }))
        }
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(Duration::from_millis(limits.header_read_timeout_ms))
        .keep_alive(true);
    let conn = builder.serve_connection(TokioIo::new(sock), svc);
    tokio::pin!(conn);
    let idle = Duration::from_millis(limits.idle_timeout_ms);
    let mut check =
        tokio::time::interval((idle / IDLE_CHECKS_PER_TIMEOUT).max(Duration::from_millis(1)));
    let mut closing = false;
    loop {
        tokio::select! {
            _ = conn.as_mut() => break,
            () = stop.cancelled(), if !closing => {
                closing = true;
                conn.as_mut().graceful_shutdown();
            }
            _ = check.tick(), if !closing => {
                if activity.idle_for().is_some_and(|d| d >= idle) {
                    closing = true;
                    conn.as_mut().graceful_shutdown();
                }
            }
        }
    }
}
