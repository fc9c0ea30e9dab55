//! The one accept loop of every kvgate listener (the gateway's API and admin ports, the
//! picker's gRPC, health and metrics ports): accepting never fails, it waits.
//!
//! Why: `accept` fails for two kinds of reasons. Some concern one connection only (the peer
//! reset it while it waited in the backlog): the next `accept` may succeed at once, so retry at
//! once. The others concern the process or the machine — no file descriptors left (`EMFILE`,
//! `ENFILE`), no socket buffers or memory (`ENOBUFS`, `ENOMEM`) — and retrying at once fails
//! again at once: a loop that does so spins a core (0.7 of one was measured, 41k failed
//! `accept4` calls in 3 s) while the requests in flight, which are what would free descriptors,
//! starve. So after such an error the loop sleeps, from [`ACCEPT_BACKOFF_MIN_MS`] doubling to
//! [`ACCEPT_BACKOFF_MAX_MS`], and resets on the first success; the connections waiting in the
//! kernel's backlog are accepted as soon as descriptors are back. Each episode is logged at WARN,
//! at most once per [`ACCEPT_WARN_INTERVAL_MS`] with the number of failures in between, so an
//! operator sees it without a flood of identical lines.
//!
//! The sleeps use tokio's clock, so a paused-time test drives them without waiting.

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use futures::Stream;
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;

/// First pause after a resource error, ms: short enough that a brief spike costs a client
/// little latency, long enough that a persistent shortage costs no CPU.
pub const ACCEPT_BACKOFF_MIN_MS: u64 = 5;

/// Longest pause between accept attempts while the shortage lasts, ms: descriptors usually come
/// back as in-flight requests end (seconds), so retrying once a second loses at most a second.
pub const ACCEPT_BACKOFF_MAX_MS: u64 = 1_000;

/// Least time between two WARN lines about failing accepts, ms.
pub const ACCEPT_WARN_INTERVAL_MS: u64 = 10_000;

/// Whether an accept error concerns one connection only (retry at once) rather than the process.
fn is_connection_error(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::Interrupted
    )
}

/// A listener whose [`Acceptor::accept`] never returns an error (see the module docs).
#[derive(Debug)]
pub struct Acceptor {
    listener: TcpListener,
    backoff: Duration,
    last_warn: Option<Instant>,
    failures_since_warn: u64,
    /// Accept errors seen so far (resource and connection errors alike).
    errors: u64,
}

impl Acceptor {
    /// Accepts on `listener`.
    pub fn new(listener: TcpListener) -> Self {
        Self {
            listener,
            backoff: Duration::from_millis(ACCEPT_BACKOFF_MIN_MS),
            last_warn: None,
            failures_since_warn: 0,
            errors: 0,
        }
    }

    /// The address it listens on.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Accept errors seen so far.
    pub fn errors(&self) -> u64 {
        self.errors
    }

    /// The next connection, with `TCP_NODELAY` set (responses are small frames that must not
    /// wait for Nagle's algorithm); waits out errors as the module docs say.
    pub async fn accept(&mut self) -> (TcpStream, SocketAddr) {
        loop {
            match self.listener.accept().await {
                Ok((sock, peer)) => {
                    self.backoff = Duration::from_millis(ACCEPT_BACKOFF_MIN_MS);
                    let _ = sock.set_nodelay(true);
                    return (sock, peer);
                }
                Err(e) => {
                    self.errors += 1;
                    if is_connection_error(&e) {
                        continue;
                    }
                    self.warn(&e);
                    tokio::time::sleep(self.backoff).await;
                    self.backoff =
                        (self.backoff * 2).min(Duration::from_millis(ACCEPT_BACKOFF_MAX_MS));
                }
            }
        }
    }

    fn warn(&mut self, e: &io::Error) {
        self.failures_since_warn += 1;
        let now = Instant::now();
        let due = self.last_warn.is_none_or(|at| {
            now.duration_since(at) >= Duration::from_millis(ACCEPT_WARN_INTERVAL_MS)
        });
        if due {
            let addr = self.listener.local_addr().ok();
            tracing::warn!(
                listener = ?addr,
                error = %e,
                failures = self.failures_since_warn,
                retry_in_ms = self.backoff.as_millis() as u64,
                "cannot accept connections (out of file descriptors or memory?); backing off"
            );
            self.last_warn = Some(now);
            self.failures_since_warn = 0;
        }
    }

    /// The connections as a stream that never yields an error (for tonic's
    /// `serve_with_incoming`).
    pub fn into_stream(self) -> impl Stream<Item = io::Result<TcpStream>> + Send + 'static {
        futures::stream::unfold(self, |mut acceptor| async move {
            let (sock, _) = acceptor.accept().await;
            Some((Ok(sock), acceptor))
        })
    }
}

impl axum::serve::Listener for Acceptor {
    type Io = TcpStream;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        Acceptor::accept(self).await
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        Acceptor::local_addr(self)
    }
}
