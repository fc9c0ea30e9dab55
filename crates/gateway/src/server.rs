//! Listeners: our own accept loop over hyper's HTTP/1.1 server, so that every connection gets
//! the timeouts that keep slow or malicious clients from holding resources. Connections come
//! from the runtime's [`Acceptor`], which backs off when accepting fails for want of file
//! descriptors instead of spinning (the Envoy picker's listeners use the same one).
//!
//! - **Header read timeout** (default [`kvgate_runtime::config::DEFAULT_HEADER_READ_TIMEOUT_MS`]):
//!   a client dribbling its request head (slowloris), or a new connection that sends no request,
//!   is disconnected. The clock runs from the connection's start, then from the first byte of
//!   each later request head. It is ours, not hyper's `header_read_timeout`: hyper starts that
//!   timer whenever it waits for a head, idle keep-alive included, so every idle connection was
//!   closed after the header timeout (10 s) instead of the idle timeout (60 s).
//! - **Body read timeout** (in the handler, default
//!   [`kvgate_runtime::config::DEFAULT_BODY_READ_TIMEOUT_MS`]): a body that does not arrive in time gets
//!   a 408 and the connection is released.
//! - **Idle timeout** (default [`kvgate_runtime::config::DEFAULT_IDLE_TIMEOUT_MS`]): a keep-alive
//!   connection with no request in flight for that long is closed. A request is in flight from
//!   its head until its response body is finished or dropped, so long generations (minutes
//!   without a byte for a non-streaming request) are never cut by it.
//!
//! An HTTP/1.1 request without exactly one `Host` header, or any request with two, gets 400
//! (RFC 9112 §3.2), in the OpenAI error shape.
//!
//! A client that half-closes (shuts down its write side) while its request is in flight is, by
//! default, treated as gone: on TCP a half-close and a full close look the same to the server
//! until it writes, and a client that went away must cancel its generation at once (the
//! engine's work is the expensive part). Operators whose clients half-close on purpose turn on
//! `limits.client_half_close` (`--client-half-close`): hyper's `half_close` then keeps the
//! connection and answers, and a departed client is noticed when its response is written.
//!
//! HTTP/1.1 only: OpenAI clients and SDKs speak it, and it keeps one request per connection at a
//! time, which makes "client went away" exactly "connection closed". Timers run on tokio's
//! clock, so paused-time tests drive them.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use hyper::body::{Frame, SizeHint};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

use axum::response::IntoResponse;
use kvgate_runtime::accept::Acceptor;
use kvgate_runtime::config::Limits;
use kvgate_runtime::openai::ApiError;

/// How often, as a fraction of the shorter of the idle and header timeouts, a connection checks
/// its timers: a quarter bounds the overshoot to 25% of the timeout at one timer wake-up per
/// quarter.
const IDLE_CHECKS_PER_TIMEOUT: u32 = 4;

/// `head_since_ms` when no request head is being read.
const NO_HEAD: u64 = u64::MAX;

#[derive(Debug)]
struct ConnActivity {
    origin: Instant,
    active: AtomicUsize,
    last_ms: AtomicU64,
    /// Since when a request head is being read (ms since `origin`), or [`NO_HEAD`].
    head_since_ms: AtomicU64,
}

impl ConnActivity {
    fn now_ms(&self) -> u64 {
        u64::try_from(self.origin.elapsed().as_millis()).unwrap_or(u64::MAX - 1)
    }

    fn touch(&self) {
        self.last_ms.store(self.now_ms(), Ordering::Relaxed);
    }

    /// How long the connection has been idle: no request in flight and no head being read.
    fn idle_for(&self) -> Option<Duration> {
        if self.active.load(Ordering::Acquire) > 0
            || self.head_since_ms.load(Ordering::Relaxed) != NO_HEAD
        {
            return None;
        }
        Some(Duration::from_millis(
            self.now_ms()
                .saturating_sub(self.last_ms.load(Ordering::Relaxed)),
        ))
    }

    /// How long the current request head has been on its way, if one is.
    fn head_for(&self) -> Option<Duration> {
        let since = self.head_since_ms.load(Ordering::Relaxed);
        (since != NO_HEAD && self.active.load(Ordering::Acquire) == 0)
            .then(|| Duration::from_millis(self.now_ms().saturating_sub(since)))
    }

    /// Bytes arrived: if no request is in flight they start a head, and its clock.
    fn on_read(&self) {
        if self.active.load(Ordering::Acquire) == 0 {
            let _ = self.head_since_ms.compare_exchange(
                NO_HEAD,
                self.now_ms(),
                Ordering::Relaxed,
                Ordering::Relaxed,
            );
        }
    }
}

/// The client socket, telling the connection's [`ConnActivity`] when bytes arrive.
struct Watched {
    sock: TcpStream,
    activity: Arc<ConnActivity>,
}

impl AsyncRead for Watched {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.sock).poll_read(cx, buf);
        if matches!(r, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.activity.on_read();
        }
        r
    }
}

impl AsyncWrite for Watched {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.sock).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.sock).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.sock).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.sock).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.sock.is_write_vectored()
    }
}

/// RFC 9112 §3.2: an HTTP/1.1 request needs exactly one `Host`; no request may carry two.
fn bad_host(req: &hyper::Request<hyper::body::Incoming>) -> Option<&'static str> {
    let hosts = req.headers().get_all(hyper::header::HOST).iter().count();
    match hosts {
        0 if req.version() == hyper::Version::HTTP_11 => Some("the request has no Host header"),
        0 | 1 => None,
        _ => Some("the request has more than one Host header"),
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
        // A new connection must send its first request head in time too.
        head_since_ms: AtomicU64::new(0),
    });
    let svc_activity = activity.clone();
    let svc = hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
        let guard = ActiveGuard::new(svc_activity.clone());
        svc_activity.head_since_ms.store(NO_HEAD, Ordering::Relaxed);
        let app = app.clone();
        let host_error = bad_host(&req);
        async move {
            let resp = match host_error {
                Some(message) => {
                    ApiError::new(axum::http::StatusCode::BAD_REQUEST, message).into_response()
                }
                None => app.oneshot(req.map(Body::new)).await?,
            };
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
        // Ours (see the module docs): hyper's would also cut idle keep-alive connections.
        .header_read_timeout(None)
        .half_close(limits.client_half_close)
        .keep_alive(true);
    let io = Watched {
        sock,
        activity: activity.clone(),
    };
    let conn = builder.serve_connection(TokioIo::new(io), svc);
    tokio::pin!(conn);
    let idle = Duration::from_millis(limits.idle_timeout_ms);
    let header = Duration::from_millis(limits.header_read_timeout_ms);
    let mut check = tokio::time::interval(
        (idle.min(header) / IDLE_CHECKS_PER_TIMEOUT).max(Duration::from_millis(1)),
    );
    let mut closing = false;
    loop {
        tokio::select! {
            _ = conn.as_mut() => break,
            () = stop.cancelled(), if !closing => {
                closing = true;
                conn.as_mut().graceful_shutdown();
            }
            _ = check.tick() => {
                // A head that takes too long is cut outright (hyper would wait for the rest of
                // it even after a graceful shutdown).
                if activity.head_for().is_some_and(|d| d >= header) {
                    break;
                }
                if !closing && activity.idle_for().is_some_and(|d| d >= idle) {
                    closing = true;
                    conn.as_mut().graceful_shutdown();
                }
            }
        }
    }
}
