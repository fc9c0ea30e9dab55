//! Listeners: our own accept loop over hyper's HTTP/1.1 and HTTP/2 servers, so that every connection gets
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
//! HTTP/1.1 and h2c on the same port (see [`crate::h2`]): a connection that opens with the
//! HTTP/2 preface, or that upgrades with `Upgrade: h2c`, is served as HTTP/2. On HTTP/2 the
//! header read timeout applies only until the preface has arrived (a stream's head comes in
//! one frame, and an idle connection's PINGs and window updates are not a head being read);
//! the idle timeout counts from the end of the last stream, and "client went away" is the
//! stream's reset as much as the connection's close: either drops the request. Every response
//! is stamped with the request's `x-request-id` (and `Retry-After` on 429, see
//! [`crate::stamp`]). Timers run on tokio's clock, so paused-time tests drive them.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use hyper::body::{Frame, SizeHint};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
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
    /// The connection speaks HTTP/2: no head clock (module docs).
    h2: AtomicBool,
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
        if self.h2.load(Ordering::Relaxed) {
            return None;
        }
        let since = self.head_since_ms.load(Ordering::Relaxed);
        (since != NO_HEAD && self.active.load(Ordering::Acquire) == 0)
            .then(|| Duration::from_millis(self.now_ms().saturating_sub(since)))
    }

    /// The connection turned out to be HTTP/2: its idle clock starts now, with no head clock.
    fn mark_h2(&self) {
        self.h2.store(true, Ordering::Relaxed);
        self.touch();
        self.head_since_ms.store(NO_HEAD, Ordering::Relaxed);
    }

    /// Bytes arrived: if no request is in flight they start a head, and its clock.
    fn on_read(&self) {
        if self.active.load(Ordering::Acquire) == 0 && !self.h2.load(Ordering::Relaxed) {
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
    /// Bytes of the HTTP/2 preface seen so far at the start of the connection, or
    /// [`PREFACE_DECIDED`] once it is known whether it opened with one.
    preface_seen: usize,
}

/// `Watched::preface_seen` once the first bytes have decided the protocol.
const PREFACE_DECIDED: usize = usize::MAX;

impl Watched {
    fn sniff(&mut self, data: &[u8]) {
        if self.preface_seen == PREFACE_DECIDED {
            return;
        }
        let want = &crate::h2::PREFACE[self.preface_seen..];
        let n = want.len().min(data.len());
        if data[..n] != want[..n] {
            self.preface_seen = PREFACE_DECIDED;
        } else if n == want.len() {
            self.preface_seen = PREFACE_DECIDED;
            self.activity.mark_h2();
        } else {
            self.preface_seen += n;
        }
    }
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
            let this = &mut *self;
            this.sniff(&buf.filled()[before..]);
            this.activity.on_read();
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

/// Runs one connection future until it ends, cutting it when a request head takes too long and
/// shutting it down gracefully when it idles too long or `stop` fires. Returns whether the
/// connection was cut (a head timeout), so an upgrade does not follow a cut connection.
macro_rules! drive {
    ($conn:expr, $activity:expr, $limits:expr, $stop:expr) => {{
        let conn = $conn;
        tokio::pin!(conn);
        let idle = Duration::from_millis($limits.idle_timeout_ms);
        let header = Duration::from_millis($limits.header_read_timeout_ms);
        let mut check = tokio::time::interval(
            (idle.min(header) / IDLE_CHECKS_PER_TIMEOUT).max(Duration::from_millis(1)),
        );
        let mut closing = false;
        loop {
            tokio::select! {
                _ = conn.as_mut() => break false,
                () = $stop.cancelled(), if !closing => {
                    closing = true;
                    conn.as_mut().graceful_shutdown();
                }
                _ = check.tick() => {
                    // A head that takes too long is cut outright (hyper would wait for the
                    // rest of it even after a graceful shutdown).
                    if $activity.head_for().is_some_and(|d| d >= header) {
                        break true;
                    }
                    if !closing && $activity.idle_for().is_some_and(|d| d >= idle) {
                        closing = true;
                        conn.as_mut().graceful_shutdown();
                    }
                }
            }
        }
    }};
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
        h2: AtomicBool::new(false),
    });
    // An `Upgrade: h2c` request leaves its switch here for the connection to carry out.
    let upgrade: Arc<std::sync::Mutex<Option<crate::h2::PendingUpgrade>>> = Arc::default();
    let svc_activity = activity.clone();
    let svc_upgrade = upgrade.clone();
    let svc = hyper::service::service_fn(move |mut req: hyper::Request<hyper::body::Incoming>| {
        let guard = ActiveGuard::new(svc_activity.clone());
        svc_activity.head_since_ms.store(NO_HEAD, Ordering::Relaxed);
        let app = app.clone();
        let upgrade = svc_upgrade.clone();
        let host_error = bad_host(&req);
        let request_id = crate::stamp::ensure_request_id(req.headers_mut());
        async move {
            let mut resp = match host_error {
                Some(message) => {
                    ApiError::new(axum::http::StatusCode::BAD_REQUEST, message).into_response()
                }
                None if crate::h2::wants_upgrade(&req) => {
                    match crate::h2::accept(req, &limits).await {
                        crate::h2::Upgrade::Switch(pending, resp) => {
                            *upgrade.lock().unwrap_or_else(|p| p.into_inner()) = Some(pending);
                            resp
                        }
                        crate::h2::Upgrade::Http1(req) => app.oneshot(req).await?,
                        crate::h2::Upgrade::Refused(resp) => resp,
                    }
                }
                None => app.oneshot(req.map(Body::new)).await?,
            };
            crate::stamp::stamp_response(resp.status(), resp.headers_mut(), request_id);
            Ok::<_, std::convert::Infallible>(resp.map(|inner| {
                Body::new(TrackedBody {
                    inner,
                    _guard: guard,
                })
            }))
        }
    });
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        // Ours (see the module docs): hyper's would also cut idle keep-alive connections.
        .header_read_timeout(None)
        .half_close(limits.client_half_close)
        .keep_alive(true);
    builder.http2().timer(TokioTimer::new());
    let io = Watched {
        sock,
        activity: activity.clone(),
        preface_seen: 0,
    };
    let cut = drive!(
        builder.serve_connection_with_upgrades(TokioIo::new(io), svc.clone()),
        activity,
        limits,
        stop
    );
    let pending = upgrade.lock().unwrap_or_else(|p| p.into_inner()).take();
    let Some(pending) = pending.filter(|_| !cut) else {
        return;
    };
    let Ok(upgraded) = pending.on_upgrade.await else {
        return;
    };
    // The client owes the HTTP/2 preface now: the head clock runs until it is in (a client that
    // goes quiet after the 101 is cut after the header timeout, as one that never finishes a
    // request head is), then the connection is HTTP/2 (idle clock only).
    activity
        .head_since_ms
        .store(activity.now_ms(), Ordering::Relaxed);
    let on_preface = {
        let activity = activity.clone();
        Box::new(move || activity.mark_h2())
    };
    let io = crate::h2::Injected::new(TokioIo::new(upgraded), pending.stream_one, on_preface);
    let mut h2 = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
    h2.timer(TokioTimer::new());
    drive!(
        h2.serve_connection(TokioIo::new(io), svc),
        activity,
        limits,
        stop
    );
}
