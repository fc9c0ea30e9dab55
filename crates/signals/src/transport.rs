//! The ZeroMQ transport of KV events: one reactor thread that owns every SUB socket, and the
//! blocking replay exchange.
//!
//! **Why libzmq.** KV-event sockets face the network: in listen mode anyone who can reach the
//! port can connect and send. libzmq (the `zmq` crate, built from source by `zmq-sys`, so no
//! system package is needed) refuses a message larger than `ZMQ_MAXMSGSIZE` from its frame
//! header, *before* allocating, and drops that peer; the pure-Rust `zeromq` crate allocates
//! whatever a header announces (2^40 bytes aborted the process). libzmq also reconnects on its
//! own with a bounded backoff (`ZMQ_RECONNECT_IVL` / `_MAX`). The regression tests in
//! `tests/zmtp_hostile_peer.rs` speak ZMTP by hand to pin both.
//!
//! **Why a connect-mode socket is rebuilt after a disconnect.** libzmq reconnects by itself
//! after a network error, but after a *protocol* error (and a message over `ZMQ_MAXMSGSIZE` is
//! one) it terminates that connection's session for good: one oversized batch from an engine
//! would end its KV events until kvgate restarts (the hostile-peer test showed no reconnect).
//! So when a connect-mode socket reports a disconnect and has not handshaken again within the
//! backoff delay, the reactor replaces it with a fresh socket to the same address. The delay
//! starts at [`RECONNECT_IVL_MS`] and doubles up to [`RECONNECT_IVL_MAX_MS`] while no message
//! arrives in between, so a peer that keeps sending oversized frames costs one connection per
//! two seconds, not a busy loop.
//!
//! **Why every socket is monitored.** A dropped connection is news for the router (an engine
//! restarting, or a peer refused for an oversized frame), so each socket has a libzmq monitor:
//! connect-mode sockets report [`SubEvent::Disconnected`] to their consumer, and every socket
//! counts completed handshakes and disconnects in [`TransportStats`].
//!
//! **Why one thread.** libzmq sockets are blocking and not `Sync`. One reactor thread polls all
//! of them (`zmq_poll`, 100 ms timeout, so commands and shutdown are seen promptly) and hands
//! each message, as raw frames, to the per-endpoint worker over a queue bounded in messages
//! and in bytes ([`WorkerQueue`]), without waiting: a slow worker loses messages (its sequence numbers then show the gap, and replay
//! refills it) but can never stall the other endpoints or the socket. Replay exchanges are
//! short-lived DEALER sockets run on tokio's blocking pool by the workers.
//!
//! **Who binds.** vLLM's publisher *connects* to a concrete `endpoint` address and binds only
//! for wildcards (`tcp://*:P`): so the router either binds one SUB socket that many engines
//! connect to (listen mode, endpoints told apart by topic) or connects one SUB per engine that
//! binds (connect mode).

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

/// Default largest KV-event message accepted, bytes. A `BlockStored` of a 128k-token prompt is
/// about 0.7 MB of msgpack; a batch of a busy engine step carries a few of them. 64 MiB is two
/// orders of magnitude above anything legitimate and still bounds what one peer can make the
/// router hold.
pub const DEFAULT_MAX_MESSAGE_BYTES: i64 = 64 * 1024 * 1024;

/// First delay of libzmq's reconnect backoff, ms: a brief blip (an engine's PUB socket
/// re-created) costs a tenth of a second.
pub const RECONNECT_IVL_MS: i32 = 100;
/// Last delay of the backoff, ms: while an engine restarts (tens of seconds for a real model
/// load) the retries settle at one every 2 s, so its events flow again at most 2 s after it
/// binds, at the cost of one refused TCP connect per 2 s per engine while it is down.
pub const RECONNECT_IVL_MAX_MS: i32 = 2_000;

/// Messages queued in libzmq per SUB socket before it drops (ZMQ_RCVHWM). vLLM publishes at
/// most one batch per engine step; 100k covers many seconds of a stalled reader.
const RCV_HWM: i32 = 100_000;

/// How long the reactor waits in one poll, ms: the latency of commands and shutdown.
const POLL_TIMEOUT_MS: i64 = 100;

/// Messages read from one socket per poll round, so one busy socket cannot starve the rest.
const MAX_MESSAGES_PER_ROUND: usize = 256;

/// One received ZeroMQ message, as frames.
pub type RawMessage = Vec<Vec<u8>>;

/// Bytes of messages queued for one endpoint's worker, besides the queue's bound in messages:
/// thousands of messages of up to the message limit each would otherwise let one peer make the
/// router hold hundreds of GiB while its worker is busy (a replay).
pub const WORKER_QUEUE_BYTES: usize = 64 * 1024 * 1024;

/// The sending half of one endpoint worker's queue, bounded in messages (the channel) and in
/// bytes ([`WORKER_QUEUE_BYTES`]). A full queue drops (the sequence numbers show the loss,
/// and replay refills it): a slow worker can never stall the socket or other endpoints.
#[derive(Clone, Debug)]
pub struct WorkerQueue {
    tx: mpsc::Sender<SubEvent>,
    queued: Arc<AtomicUsize>,
}

/// The receiving half of a [`WorkerQueue`].
#[derive(Debug)]
pub struct WorkerInbox {
    rx: mpsc::Receiver<SubEvent>,
    queued: Arc<AtomicUsize>,
}

/// A worker's queue of at most `messages` messages and [`WORKER_QUEUE_BYTES`] bytes.
pub fn worker_queue(messages: usize) -> (WorkerQueue, WorkerInbox) {
    let (tx, rx) = mpsc::channel(messages);
    let queued = Arc::new(AtomicUsize::new(0));
    (
        WorkerQueue {
            tx,
            queued: Arc::clone(&queued),
        },
        WorkerInbox { rx, queued },
    )
}

fn message_bytes(m: &RawMessage) -> usize {
    m.iter().map(Vec::len).sum()
}

impl WorkerQueue {
    /// Queues `message`; false when it was dropped because the queue is full (in messages, or
    /// in bytes unless the queue is empty: one message of up to the message limit always fits).
    pub fn offer(&self, message: RawMessage) -> bool {
        let size = message_bytes(&message);
        let before = self.queued.fetch_add(size, Ordering::AcqRel);
        if before > 0 && before + size > WORKER_QUEUE_BYTES {
            self.queued.fetch_sub(size, Ordering::AcqRel);
            return false;
        }
        if self.tx.try_send(SubEvent::Message(message)).is_err() {
            self.queued.fetch_sub(size, Ordering::AcqRel);
            return false;
        }
        true
    }

    /// Tells the worker its publisher's connection dropped (dropped itself if the queue is full:
    /// the next batch's number then shows what was missed).
    pub fn disconnected(&self) {
        let _ = self.tx.try_send(SubEvent::Disconnected);
    }
}

impl WorkerInbox {
    /// The next event; `None` once every sender is gone.
    pub async fn recv(&mut self) -> Option<SubEvent> {
        let event = self.rx.recv().await;
        if let Some(SubEvent::Message(m)) = &event {
            self.queued.fetch_sub(message_bytes(m), Ordering::AcqRel);
        }
        event
    }

    /// Whether nothing is queued.
    pub fn is_empty(&self) -> bool {
        self.rx.is_empty()
    }
}

/// Something a SUB socket reports to its consumer.
#[derive(Debug)]
pub enum SubEvent {
    /// A message arrived.
    Message(RawMessage),
    /// The (connect-mode) connection to the publisher dropped; libzmq reconnects by itself.
    Disconnected,
}

/// Routes messages of a listen-mode socket to consumers by topic.
pub trait TopicRoute: Send + Sync {
    /// Delivers one message whose first frame is its topic.
    fn route(&self, message: RawMessage);
}

enum Cmd {
    Connect {
        id: u64,
        address: String,
        topic_filter: String,
        tx: WorkerQueue,
    },
    Bind {
        id: u64,
        address: String,
        route: Arc<dyn TopicRoute>,
        done: std::sync::mpsc::Sender<Result<String, String>>,
    },
    Close {
        id: u64,
    },
}

/// Counters of the transport (for metrics and tests).
#[derive(Debug, Default)]
pub struct TransportStats {
    /// Messages received on any socket.
    pub messages: AtomicU64,
    /// Messages dropped because a consumer's queue was full.
    pub dropped_full: AtomicU64,
    /// ZMTP handshakes completed with a peer, on any socket.
    pub handshakes: AtomicU64,
    /// Connections to a peer that ended, on any socket: a publisher going away, or libzmq
    /// dropping a peer that broke the protocol or announced a message over the size limit.
    pub peer_disconnects: AtomicU64,
}

/// Handle to the reactor thread. Dropping every clone stops it.
#[derive(Clone)]
pub struct KvTransport {
    inner: Arc<Inner>,
}

struct Inner {
    ctx: zmq::Context,
    cmds: Mutex<std::sync::mpsc::Sender<Cmd>>,
    next_id: AtomicU64,
    stop: Arc<AtomicBool>,
    max_message_bytes: i64,
    stats: Arc<TransportStats>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

impl std::fmt::Debug for KvTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KvTransport")
            .field("max_message_bytes", &self.inner.max_message_bytes)
            .finish_non_exhaustive()
    }
}

/// A socket owned by the reactor; closing happens when this is dropped.
#[derive(Debug)]
pub struct SocketHandle {
    id: u64,
    transport: KvTransport,
    endpoint: String,
}

impl SocketHandle {
    /// The address bound (with the port libzmq chose for `tcp://host:*`) or connected to.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }
}

impl Drop for SocketHandle {
    fn drop(&mut self) {
        self.transport.send(Cmd::Close { id: self.id });
    }
}

impl KvTransport {
    /// Starts the reactor thread; messages over `max_message_bytes` are refused by libzmq.
    pub fn start(max_message_bytes: i64) -> Self {
        let (tx, rx) = std::sync::mpsc::channel();
        let stop = Arc::new(AtomicBool::new(false));
        let stats = Arc::new(TransportStats::default());
        let ctx = zmq::Context::new();
        let reactor = Reactor {
            ctx: ctx.clone(),
            rx,
            stop: Arc::clone(&stop),
            max_message_bytes,
            stats: Arc::clone(&stats),
            sockets: Vec::new(),
        };
        std::thread::Builder::new()
            .name("kvgate-zmq".into())
            .spawn(move || reactor.run())
            .expect("spawning the ZeroMQ reactor thread");
        Self {
            inner: Arc::new(Inner {
                ctx,
                cmds: Mutex::new(tx),
                next_id: AtomicU64::new(1),
                stop,
                max_message_bytes,
                stats,
            }),
        }
    }

    /// The libzmq context (for replay sockets).
    pub fn context(&self) -> &zmq::Context {
        &self.inner.ctx
    }

    /// The largest message accepted.
    pub fn max_message_bytes(&self) -> i64 {
        self.inner.max_message_bytes
    }

    /// Live counters.
    pub fn stats(&self) -> &Arc<TransportStats> {
        &self.inner.stats
    }

    fn send(&self, cmd: Cmd) {
        let _ = self
            .inner
            .cmds
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .send(cmd);
    }

    fn id(&self) -> u64 {
        self.inner.next_id.fetch_add(1, Ordering::Relaxed)
    }

    /// Connects a SUB socket to a publisher that binds, subscribed to topics starting with
    /// `topic_filter` (`""`: all); its messages and disconnects go to `tx`.
    pub fn connect(&self, address: &str, topic_filter: &str, tx: WorkerQueue) -> SocketHandle {
        let id = self.id();
        self.send(Cmd::Connect {
            id,
            address: address.to_owned(),
            topic_filter: topic_filter.to_owned(),
            tx,
        });
        SocketHandle {
            id,
            transport: self.clone(),
            endpoint: address.to_owned(),
        }
    }

    /// Binds a SUB socket (all topics) that publishers connect to; its messages go to `route`.
    /// Waits for the bind so that an unusable address is an error here; `tcp://host:*` binds
    /// an ephemeral port, which [`SocketHandle::endpoint`] then names.
    pub fn bind(&self, address: &str, route: Arc<dyn TopicRoute>) -> Result<SocketHandle, String> {
        let id = self.id();
        let (done, wait) = std::sync::mpsc::channel();
        self.send(Cmd::Bind {
            id,
            address: address.to_owned(),
            route,
            done,
        });
        let endpoint = wait
            .recv_timeout(Duration::from_secs(10))
            .map_err(|_| "the ZeroMQ reactor did not answer".to_owned())??;
        Ok(SocketHandle {
            id,
            transport: self.clone(),
            endpoint,
        })
    }
}

enum Consumer {
    Connected(WorkerQueue),
    Bound(Arc<dyn TopicRoute>),
}

struct Owned {
    id: u64,
    socket: zmq::Socket,
    monitor: Option<zmq::Socket>,
    consumer: Consumer,
    /// Connect mode: what to rebuild the socket with.
    redial: Option<Redial>,
}

/// How and when a connect-mode socket is replaced after a disconnect (see the module docs).
struct Redial {
    address: String,
    topic_filter: String,
    /// When to replace the socket, unless it handshakes again before.
    due: Option<Instant>,
    /// The next delay; doubles per disconnect, back to the first when a message arrives.
    backoff: Duration,
    /// Sockets built so far (names each socket's monitor uniquely).
    generation: u64,
}

struct Reactor {
    ctx: zmq::Context,
    rx: std::sync::mpsc::Receiver<Cmd>,
    stop: Arc<AtomicBool>,
    max_message_bytes: i64,
    stats: Arc<TransportStats>,
    sockets: Vec<Owned>,
}

/// `ZMQ_EVENT_DISCONNECTED`.
const EVENT_DISCONNECTED: u16 = 0x0200;
/// `ZMQ_EVENT_HANDSHAKE_SUCCEEDED`.
const EVENT_HANDSHAKE_SUCCEEDED: u16 = 0x1000;
/// The monitor events the reactor reads.
const MONITORED_EVENTS: i32 = (EVENT_DISCONNECTED | EVENT_HANDSHAKE_SUCCEEDED) as i32;

impl Reactor {
    /// Attaches a monitor (an inproc PAIR the reactor polls) to `s`; `name` must be unique.
    fn monitor(&self, s: &zmq::Socket, name: &str) -> Result<zmq::Socket, zmq::Error> {
        let monitor_addr = format!("inproc://kvgate-monitor-{name}");
        s.monitor(&monitor_addr, MONITORED_EVENTS)?;
        let m = self.ctx.socket(zmq::PAIR)?;
        m.connect(&monitor_addr)?;
        Ok(m)
    }

    fn sub_socket(&self, topic_filter: &str) -> Result<zmq::Socket, zmq::Error> {
        let s = self.ctx.socket(zmq::SUB)?;
        // IPv6 as well as IPv4: without it libzmq cannot resolve `tcp://[fd00::5]:5557` (what
        // discovery builds for an IPv6 pod), and retries such a connect forever, silently.
        s.set_ipv6(true)?;
        s.set_maxmsgsize(self.max_message_bytes)?;
        s.set_rcvhwm(RCV_HWM)?;
        s.set_linger(0)?;
        s.set_reconnect_ivl(RECONNECT_IVL_MS)?;
        s.set_reconnect_ivl_max(RECONNECT_IVL_MAX_MS)?;
        s.set_tcp_keepalive(1)?;
        s.set_subscribe(topic_filter.as_bytes())?;
        Ok(s)
    }

    fn open(&mut self, cmd: Cmd) {
        match cmd {
            Cmd::Connect {
                id,
                address,
                topic_filter,
                tx,
            } => match self.dial(id, 0, &address, &topic_filter) {
                Ok((socket, monitor)) => self.sockets.push(Owned {
                    id,
                    socket,
                    monitor: Some(monitor),
                    consumer: Consumer::Connected(tx),
                    redial: Some(Redial {
                        address,
                        topic_filter,
                        due: None,
                        backoff: Duration::from_millis(RECONNECT_IVL_MS as u64),
                        generation: 0,
                    }),
                }),
                Err(error) => {
                    tracing::warn!(%address, %error, "cannot open KV-event SUB socket");
                }
            },
            Cmd::Bind {
                id,
                address,
                route,
                done,
            } => {
                let opened = (|| {
                    let s = self.sub_socket("")?;
                    let m = self.monitor(&s, &id.to_string())?;
                    s.bind(&address)?;
                    let bound = s.get_last_endpoint()?.unwrap_or_else(|_| address.clone());
                    Ok::<_, zmq::Error>((s, m, bound))
                })();
                match opened {
                    Ok((socket, monitor, bound)) => {
                        self.sockets.push(Owned {
                            id,
                            socket,
                            monitor: Some(monitor),
                            consumer: Consumer::Bound(route),
                            redial: None,
                        });
                        let _ = done.send(Ok(bound));
                    }
                    Err(error) => {
                        let _ = done.send(Err(format!("cannot bind {address}: {error}")));
                    }
                }
            }
            Cmd::Close { id } => self.sockets.retain(|s| s.id != id),
        }
    }

    /// A monitored SUB socket connected to `address`.
    fn dial(
        &self,
        id: u64,
        generation: u64,
        address: &str,
        topic_filter: &str,
    ) -> Result<(zmq::Socket, zmq::Socket), zmq::Error> {
        let s = self.sub_socket(topic_filter)?;
        let m = self.monitor(&s, &format!("{id}-{generation}"))?;
        s.connect(address)?;
        Ok((s, m))
    }

    /// Replaces connect-mode sockets whose rebuild is due (see the module docs).
    fn redial_due(&mut self) {
        let now = Instant::now();
        for i in 0..self.sockets.len() {
            let owned = &self.sockets[i];
            let Some(r) = &owned.redial else { continue };
            if r.due.is_none_or(|due| due > now) {
                continue;
            }
            let (id, generation) = (owned.id, r.generation + 1);
            let (address, topic_filter) = (r.address.clone(), r.topic_filter.clone());
            let dialled = self.dial(id, generation, &address, &topic_filter);
            let owned = &mut self.sockets[i];
            let Some(r) = owned.redial.as_mut() else {
                continue;
            };
            match dialled {
                Ok((socket, monitor)) => {
                    tracing::debug!(%address, "KV-event SUB socket rebuilt after a disconnect");
                    owned.socket = socket;
                    owned.monitor = Some(monitor);
                    r.generation = generation;
                    r.due = None;
                }
                Err(error) => {
                    tracing::warn!(%address, %error, "cannot rebuild KV-event SUB socket");
                    r.due = Some(now + r.backoff);
                }
            }
        }
    }

    fn run(mut self) {
        let mut last_full_warning: Option<Instant> = None;
        while !self.stop.load(Ordering::Relaxed) {
            loop {
                match self.rx.try_recv() {
                    Ok(cmd) => self.open(cmd),
                    Err(std::sync::mpsc::TryRecvError::Empty) => break,
                    Err(std::sync::mpsc::TryRecvError::Disconnected) => return,
                }
            }
            self.redial_due();
            if self.sockets.is_empty() {
                match self
                    .rx
                    .recv_timeout(Duration::from_millis(POLL_TIMEOUT_MS as u64))
                {
                    Ok(cmd) => self.open(cmd),
                    Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
                    Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => return,
                }
                continue;
            }
            let mut items = Vec::with_capacity(self.sockets.len() * 2);
            for s in &self.sockets {
                items.push(s.socket.as_poll_item(zmq::POLLIN));
                if let Some(m) = &s.monitor {
                    items.push(m.as_poll_item(zmq::POLLIN));
                }
            }
            if let Err(error) = zmq::poll(&mut items, POLL_TIMEOUT_MS) {
                tracing::warn!(%error, "zmq_poll failed");
                std::thread::sleep(Duration::from_millis(POLL_TIMEOUT_MS as u64));
                continue;
            }
            let ready: Vec<(bool, bool)> = {
                let mut it = items.iter();
                self.sockets
                    .iter()
                    .map(|s| {
                        let sock = it.next().is_some_and(zmq::PollItem::is_readable);
                        let mon = s.monitor.is_some()
                            && it.next().is_some_and(zmq::PollItem::is_readable);
                        (sock, mon)
                    })
                    .collect()
            };
            drop(items);
            for (s, (sock_ready, mon_ready)) in self.sockets.iter_mut().zip(ready) {
                if mon_ready && let Some(m) = &s.monitor {
                    while let Ok(frames) = m.recv_multipart(zmq::DONTWAIT) {
                        let event = frames
                            .first()
                            .filter(|f| f.len() >= 2)
                            .map(|f| u16::from_le_bytes([f[0], f[1]]));
                        match event {
                            Some(EVENT_HANDSHAKE_SUCCEEDED) => {
                                self.stats.handshakes.fetch_add(1, Ordering::Relaxed);
                                if let Some(r) = s.redial.as_mut() {
                                    r.due = None;
                                }
                            }
                            Some(EVENT_DISCONNECTED) => {
                                self.stats.peer_disconnects.fetch_add(1, Ordering::Relaxed);
                                if let Consumer::Connected(tx) = &s.consumer {
                                    tx.disconnected();
                                }
                                if let Some(r) = s.redial.as_mut() {
                                    r.due = Some(Instant::now() + r.backoff);
                                    r.backoff = (r.backoff * 2)
                                        .min(Duration::from_millis(RECONNECT_IVL_MAX_MS as u64));
                                }
                            }
                            _ => {}
                        }
                    }
                }
                if !sock_ready {
                    continue;
                }
                for _ in 0..MAX_MESSAGES_PER_ROUND {
                    let frames = match s.socket.recv_multipart(zmq::DONTWAIT) {
                        Ok(f) => f,
                        Err(zmq::Error::EAGAIN) => break,
                        Err(error) => {
                            tracing::warn!(%error, "KV-event SUB receive failed");
                            break;
                        }
                    };
                    self.stats.messages.fetch_add(1, Ordering::Relaxed);
                    if let Some(r) = s.redial.as_mut() {
                        r.backoff = Duration::from_millis(RECONNECT_IVL_MS as u64);
                    }
                    match &s.consumer {
                        Consumer::Connected(tx) => {
                            if !tx.offer(frames) {
                                let n = self.stats.dropped_full.fetch_add(1, Ordering::Relaxed) + 1;
                                if last_full_warning
                                    .is_none_or(|t| t.elapsed() > Duration::from_secs(10))
                                {
                                    last_full_warning = Some(Instant::now());
                                    tracing::warn!(
                                        dropped_total = n,
                                        "KV-event consumer queue full; dropping (replay will refill)"
                                    );
                                }
                            }
                        }
                        Consumer::Bound(route) => route.route(frames),
                    }
                }
            }
        }
    }
}

/// Why a replay exchange failed.
#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    /// No complete answer in time.
    #[error("replay did not finish within {timeout_ms} ms")]
    Timeout {
        /// The bound.
        timeout_ms: u128,
    },
    /// The socket failed.
    #[error("replay socket: {0}")]
    Zmq(#[from] zmq::Error),
    /// A reply had an unexpected shape.
    #[error(
        "replay reply has {frames} frames, expected [\"\", topic, seq, payload] or [\"\", seq, payload]"
    )]
    BadReply {
        /// Frames in the reply.
        frames: usize,
    },
    /// A sequence frame was malformed.
    #[error("replay reply: {0}")]
    Decode(#[from] crate::kv_events::KvDecodeError),
}

/// One replayed batch, undecoded.
#[derive(Debug)]
pub struct Replayed {
    /// Its sequence number.
    pub seq: u64,
    /// Its msgpack payload.
    pub payload: Vec<u8>,
}

/// Asks a vLLM replay ROUTER for the batches from `from` on (blocking; run it on a blocking
/// pool). Returns the contiguous run the server supplied, starting at the first sequence number
/// it sent at or after `from` when `from_any` (joining a running engine whose buffer no longer
/// reaches back to `from`), else exactly at `from`; it stops before `to`, at a hole or at the
/// end marker. Request: `["", from (8 bytes BE)]`. Replies: vLLM 0.32 sends
/// `["", topic, seq, payload]` per buffered batch and ends with `["", "", 0xFF×8, ""]`; older
/// engines send `["", seq, payload]` and `["", 0xFF×8, ""]`. Both are accepted.
pub fn replay_blocking(
    ctx: &zmq::Context,
    endpoint: &str,
    from: u64,
    to: u64,
    from_any: bool,
    timeout: Duration,
    max_message_bytes: i64,
) -> Result<Vec<Replayed>, ReplayError> {
    let deadline = Instant::now() + timeout;
    let dealer = ctx.socket(zmq::DEALER)?;
    dealer.set_ipv6(true)?;
    dealer.set_linger(0)?;
    dealer.set_maxmsgsize(max_message_bytes)?;
    dealer.connect(endpoint)?;
    dealer.send_multipart([&b""[..], &from.to_be_bytes()[..]], 0)?;
    let mut out: Vec<Replayed> = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() || dealer.poll(zmq::POLLIN, left.as_millis().max(1) as i64)? == 0 {
            return Err(ReplayError::Timeout {
                timeout_ms: timeout.as_millis(),
            });
        }
        let mut frames = dealer.recv_multipart(0)?;
        let (seq_frame, payload) = match frames.len() {
            4 if frames[0].is_empty() => {
                let payload = frames.pop().unwrap_or_default();
                (frames.swap_remove(2), payload)
            }
            3 if frames[0].is_empty() => {
                let payload = frames.pop().unwrap_or_default();
                (frames.swap_remove(1), payload)
            }
            n => return Err(ReplayError::BadReply { frames: n }),
        };
        let seq = crate::kv_events::decode_seq(&seq_frame)?;
        if seq == crate::kv_events::REPLAY_END_SEQ || seq >= to {
            return Ok(out);
        }
        let next = match out.last() {
            Some(last) => last.seq + 1,
            None if from_any => seq.max(from),
            None => from,
        };
        // Replies come in ascending order: a hole means nothing more is useful. Returning
        // drops the socket; the server's remaining sends are discarded by ZeroMQ.
        if seq > next {
            return Ok(out);
        }
        if seq < next {
            continue;
        }
        out.push(Replayed { seq, payload });
    }
}

#[cfg(test)]
mod queue_tests {
    use super::*;

    /// The queue holds what its worker has not read up to its byte bound (one message of any
    /// size when it is empty), and takes more once the worker has read.
    #[tokio::test]
    async fn a_worker_queue_is_bounded_in_bytes() {
        let (q, mut inbox) = worker_queue(4_096);
        let big = || vec![vec![0u8; 30 << 20]];
        assert!(q.offer(big()));
        assert!(q.offer(big()));
        assert!(!q.offer(big()), "a third 30 MiB message exceeds 64 MiB");
        assert!(q.offer(vec![vec![0u8; 1 << 20]]), "a small one still fits");
        assert!(matches!(inbox.recv().await, Some(SubEvent::Message(_))));
        assert!(q.offer(big()));
        while !inbox.is_empty() {
            inbox.recv().await;
        }
        assert!(
            q.offer(vec![vec![0u8; 80 << 20]]),
            "an empty queue takes any one message"
        );
    }
}
