//! The KV-event subscriber: one tokio worker per endpoint, turning the engine's ZMQ PUB stream
//! into ordered [`Observation::KvBatch`]es, with replay of what it missed.
//!
//! The router's precise prefix index is only as good as the event stream is complete: one lost
//! `BlockRemoved` and it routes to blocks that are gone. So the worker numbers what it sees
//! and, on a gap, asks the engine's replay socket (a ZMQ ROUTER that keeps its recent batches)
//! for the missing ones before delivering anything newer, so the router always applies batches
//! in publisher order. The sequence rule itself (first batch, gaps, replays, restarts) is not
//! written here: the worker holds the core's [`KvSequence`], the one owner of that rule, which
//! the router applies too (see `kvgate_core::kv_seq`); the worker's instance follows the live
//! stream, the only place where connection drops and replay answers are seen. Messages
//! arriving meanwhile wait in the worker's queue, which keeps ordering trivial. If replay is not
//! configured or cannot supply every missing batch, the worker delivers what it could and
//! reports [`Observation::KvGap`]; the router then
//! falls back to approximate tracking for that pod. A batch that fails to decode is a lost
//! batch too (replaying the same bytes would fail the same way): counted, logged, reported as a
//! one-batch gap; it never stops the loop.
//!
//! **Joining a running engine.** vLLM publishes only when its cache changes, with no heartbeat,
//! so a router that starts after the engines were warmed would wait for the next change before
//! it learns anything. With a replay address the worker therefore asks for the whole replay
//! buffer at once when it starts (from sequence 0, accepting wherever the buffer begins), and
//! then follows the live stream.
//!
//! **Restarts.** On a live stream nothing arrives twice and TCP keeps order, so a sequence
//! number that goes *back* (below what was expected, and not a batch a replay already
//! delivered) means the publisher restarted or the router reconnected to a new process: the
//! worker reports [`Observation::KvPublisherRestarted`] (a new engine process has an empty
//! cache) and replays the new stream from 0. Disconnects reported by the transport make the
//! next lower number a restart as well.
//!
//! **Two ways in** (see [`crate::transport`] for who binds): [`spawn_kv_subscriber`] connects
//! one SUB socket to an engine that binds its PUB (`tcp://*:P` in vLLM's config), and
//! [`KvListener`] binds one SUB socket that every engine's PUB connects to, telling endpoints
//! apart by topic. The topic convention is llm-d's `kv@<host>:<port>@<model>`, where
//! `host:port` is the endpoint's address as the router knows it (its `--endpoint` URL); a topic
//! naming only a host (`kv@<host>@<model>`) matches the one endpoint on that host, if there is
//! exactly one. A message whose topic names no known endpoint is counted and logged (at most
//! every 10 s), never applied to another endpoint.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use kvgate_core::kv_seq::{KvSequence, SeqOutcome};
use kvgate_core::observe::KvEventBatch;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::clock::Clock;
use crate::kv_events::{KvDecodeError, decode_event_batch, decode_frames, decode_seq};
use crate::observation::{EndpointKey, Observation};
use crate::transport::{
    KvTransport, RawMessage, SocketHandle, SubEvent, TopicRoute, WorkerInbox, WorkerQueue,
    replay_blocking, worker_queue,
};

/// Default bound on one replay exchange (connect, request, all replies). vLLM answers from memory
/// in well under a millisecond per batch; one second covers thousands of buffered batches while
/// holding back live delivery for at most that long when the replay socket is unreachable.
pub const DEFAULT_REPLAY_TIMEOUT_MS: u64 = 1_000;

/// Messages queued per endpoint between the socket and its worker. A worker only falls behind
/// while it replays (≤ the replay timeout); 4,096 engine steps is far more than a second of them.
const WORKER_QUEUE: usize = 4_096;

/// Attempts of the start-up replay when the replay socket does not answer yet (an engine that
/// is still starting), one second apart; a stream that starts meanwhile makes them moot.
const STARTUP_REPLAY_ATTEMPTS: u32 = 3;

/// Least interval between two warnings of the same kind, so a misconfigured or hostile peer
/// cannot flood the log.
const WARN_INTERVAL: Duration = Duration::from_secs(10);

/// Where one endpoint's events come from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KvSubscribeConfig {
    /// The publisher's PUB endpoint to connect to (connect mode), e.g. `tcp://10.0.0.7:5557`;
    /// empty when the endpoint publishes to a [`KvListener`].
    pub pub_endpoint: String,
    /// The publisher's replay (ROUTER) endpoint, if it has one.
    pub replay_endpoint: Option<String>,
    /// ZMQ topic prefix to accept (`""` for all). Connect mode only: a listening socket
    /// demultiplexes by topic instead.
    pub topic_filter: String,
    /// Bound on one replay exchange, in milliseconds.
    pub replay_timeout_ms: u64,
}

impl KvSubscribeConfig {
    /// Subscribes to every topic of `pub_endpoint`, without replay, with default timeouts.
    pub fn new(pub_endpoint: impl Into<String>) -> Self {
        Self {
            pub_endpoint: pub_endpoint.into(),
            replay_endpoint: None,
            topic_filter: String::new(),
            replay_timeout_ms: DEFAULT_REPLAY_TIMEOUT_MS,
        }
    }
}

/// Counters of one subscriber, readable while it runs (for metrics and tests).
#[derive(Debug, Default)]
pub struct KvSubscriberStats {
    /// Batches delivered to the router (live and replayed).
    pub batches: AtomicU64,
    /// Messages that could not be decoded.
    pub decode_errors: AtomicU64,
    /// Stale or duplicate batches dropped.
    pub stale: AtomicU64,
    /// Gaps filled by replay.
    pub replays_ok: AtomicU64,
    /// Gaps reported to the router as lost.
    pub gaps_reported: AtomicU64,
    /// Publisher restarts detected.
    pub restarts: AtomicU64,
    /// Disconnects reported by the transport.
    pub socket_rebuilds: AtomicU64,
}

/// A running subscriber.
#[derive(Debug)]
pub struct KvSubscriber {
    /// The worker task; it ends when the router drops its receiver, or when aborted.
    pub handle: JoinHandle<()>,
    /// Live counters.
    pub stats: Arc<KvSubscriberStats>,
    /// Keeps the connect-mode socket (or the listener registration) alive.
    _socket: Option<SocketHandle>,
    _registration: Option<Registration>,
}

impl KvSubscriber {
    /// Stops the task (and closes its socket or registration).
    pub fn abort(&self) {
        self.handle.abort();
    }
}

/// Connects to `cfg.pub_endpoint` (an engine whose PUB binds) and sends what it learns about
/// `endpoint` on `tx`. Must be called within a tokio runtime.
pub fn spawn_kv_subscriber(
    transport: &KvTransport,
    cfg: KvSubscribeConfig,
    endpoint: EndpointKey,
    clock: Arc<dyn Clock>,
    tx: mpsc::Sender<Observation>,
) -> KvSubscriber {
    let (events_tx, events_rx) = worker_queue(WORKER_QUEUE);
    let socket = transport.connect(&cfg.pub_endpoint, &cfg.topic_filter, events_tx);
    let mut sub = spawn_worker(transport, cfg, endpoint, clock, tx, events_rx);
    sub._socket = Some(socket);
    sub
}

fn spawn_worker(
    transport: &KvTransport,
    cfg: KvSubscribeConfig,
    endpoint: EndpointKey,
    clock: Arc<dyn Clock>,
    tx: mpsc::Sender<Observation>,
    events: WorkerInbox,
) -> KvSubscriber {
    let stats = Arc::new(KvSubscriberStats::default());
    let worker = Worker {
        cfg,
        endpoint,
        clock,
        tx,
        stats: Arc::clone(&stats),
        position: KvSequence::new(),
        transport: transport.clone(),
        last_warn: None,
    };
    KvSubscriber {
        handle: tokio::spawn(worker.run(events)),
        stats,
        _socket: None,
        _registration: None,
    }
}

/// Counters of a [`KvListener`].
#[derive(Debug, Default)]
pub struct KvListenerStats {
    /// Messages whose topic named no registered endpoint (dropped).
    pub unknown_topic: AtomicU64,
    /// Messages with no readable topic frame (dropped).
    pub malformed: AtomicU64,
    /// Messages dropped because an endpoint's worker queue was full.
    pub dropped_full: AtomicU64,
}

struct Router {
    table: RwLock<HashMap<String, WorkerQueue>>,
    stats: Arc<KvListenerStats>,
    last_warn: std::sync::Mutex<Option<Instant>>,
    address: String,
}

/// The endpoint a topic names: `kv@<host>:<port>@<model>` → `host:port`, or `kv@<host>@…` →
/// `host` (matched when unambiguous). Anything else is taken whole.
pub fn topic_endpoint(topic: &str) -> &str {
    let mut parts = topic.splitn(3, '@');
    match (parts.next(), parts.next()) {
        (Some("kv"), Some(address)) => address,
        _ => topic,
    }
}

impl Router {
    fn lookup(&self, topic: &str) -> Option<WorkerQueue> {
        let name = topic_endpoint(topic);
        let table = self.table.read().unwrap_or_else(|p| p.into_inner());
        if let Some(tx) = table.get(name) {
            return Some(tx.clone());
        }
        if !name.contains(':') {
            let mut hits = table
                .iter()
                .filter(|(k, _)| k.rsplit_once(':').is_some_and(|(h, _)| h == name));
            if let (Some((_, tx)), None) = (hits.next(), hits.next()) {
                return Some(tx.clone());
            }
        }
        None
    }

    fn warn(&self, what: &str, topic: &str) {
        let mut last = self.last_warn.lock().unwrap_or_else(|p| p.into_inner());
        if last.is_none_or(|t| t.elapsed() >= WARN_INTERVAL) {
            *last = Some(Instant::now());
            let known: Vec<String> = self
                .table
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .keys()
                .cloned()
                .collect();
            tracing::warn!(
                listen = %self.address,
                topic,
                known_endpoints = ?known,
                unknown_topic_total = self.stats.unknown_topic.load(Ordering::Relaxed),
                "{what}: KV events dropped (topics must be kv@<host>:<port>@<model> with host:port as in --endpoint)"
            );
        }
    }
}

impl TopicRoute for Router {
    fn route(&self, message: RawMessage) {
        let Some(topic) = message.first().and_then(|t| std::str::from_utf8(t).ok()) else {
            self.stats.malformed.fetch_add(1, Ordering::Relaxed);
            self.warn("KV-event message without a UTF-8 topic", "");
            return;
        };
        let topic = topic.to_owned();
        match self.lookup(&topic) {
            Some(tx) => {
                if !tx.offer(message) {
                    self.stats.dropped_full.fetch_add(1, Ordering::Relaxed);
                }
            }
            None => {
                self.stats.unknown_topic.fetch_add(1, Ordering::Relaxed);
                self.warn("KV-event topic names no known endpoint", &topic);
            }
        }
    }
}

/// One SUB socket bound where engines' PUB sockets connect (vLLM's `kv_events_config.endpoint`
/// set to this concrete address), demultiplexed by topic. See the module docs.
#[derive(Clone)]
pub struct KvListener {
    router: Arc<Router>,
    transport: KvTransport,
    _socket: Arc<SocketHandle>,
}

impl std::fmt::Debug for KvListener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KvListener")
            .field("address", &self.router.address)
            .finish_non_exhaustive()
    }
}

/// Removes an endpoint from a listener's topic table when dropped.
struct Registration {
    router: Arc<Router>,
    key: String,
}

impl std::fmt::Debug for Registration {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registration")
            .field("key", &self.key)
            .finish()
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.router
            .table
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.key);
    }
}

impl KvListener {
    /// Binds `address` (e.g. `tcp://0.0.0.0:5557`).
    pub fn bind(transport: &KvTransport, address: &str) -> Result<Self, String> {
        let router = Arc::new(Router {
            table: RwLock::new(HashMap::new()),
            stats: Arc::new(KvListenerStats::default()),
            last_warn: std::sync::Mutex::new(None),
            address: address.to_owned(),
        });
        let socket = transport.bind(address, router.clone())?;
        Ok(Self {
            router,
            transport: transport.clone(),
            _socket: Arc::new(socket),
        })
    }

    /// Live counters.
    pub fn stats(&self) -> Arc<KvListenerStats> {
        Arc::clone(&self.router.stats)
    }

    /// Starts the worker of `endpoint` (its `host:port`), fed by messages whose topic names it;
    /// `replay_endpoint` is its replay socket, if any.
    pub fn subscribe(
        &self,
        endpoint: EndpointKey,
        replay_endpoint: Option<String>,
        replay_timeout_ms: u64,
        clock: Arc<dyn Clock>,
        tx: mpsc::Sender<Observation>,
    ) -> KvSubscriber {
        let (events_tx, events_rx) = worker_queue(WORKER_QUEUE);
        self.router
            .table
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(endpoint.clone(), events_tx);
        let cfg = KvSubscribeConfig {
            replay_endpoint,
            replay_timeout_ms,
            ..KvSubscribeConfig::new("")
        };
        let mut sub = spawn_worker(&self.transport, cfg, endpoint.clone(), clock, tx, events_rx);
        sub._registration = Some(Registration {
            router: Arc::clone(&self.router),
            key: endpoint,
        });
        sub
    }
}

/// The receiving side went away: stop the task.
struct Closed;

struct Worker {
    cfg: KvSubscribeConfig,
    endpoint: EndpointKey,
    clock: Arc<dyn Clock>,
    tx: mpsc::Sender<Observation>,
    stats: Arc<KvSubscriberStats>,
    /// Where the live stream stands, with what replays delivered ahead of it.
    position: KvSequence,
    transport: KvTransport,
    last_warn: Option<Instant>,
}

impl Worker {
    async fn run(mut self, mut events: WorkerInbox) {
        // First, so that the router forgets an earlier source of this endpoint after whatever
        // that source's worker still had queued.
        let hello = Observation::KvSubscribed {
            endpoint: self.endpoint.clone(),
        };
        if self.send(hello).await.is_err() {
            return;
        }
        if self.startup_replay(&mut events).await.is_err() {
            return;
        }
        loop {
            tokio::select! {
                event = events.recv() => match event {
                    Some(SubEvent::Message(frames)) => {
                        if self.on_message(frames).await.is_err() {
                            return;
                        }
                    }
                    Some(SubEvent::Disconnected) => {
                        self.stats.socket_rebuilds.fetch_add(1, Ordering::Relaxed);
                        tracing::info!(endpoint = %self.endpoint, "KV publisher disconnected");
                        self.position.note_reconnect();
                        let at_us = self.clock.now_us();
                        let lost = Observation::KvDisconnected {
                            endpoint: self.endpoint.clone(),
                            at_us,
                        };
                        if self.send(lost).await.is_err() {
                            return;
                        }
                    }
                    None => return,
                },
                () = self.tx.closed() => return,
            }
        }
    }

    /// Loads the engine's replay buffer before following the live stream (see the module docs).
    async fn startup_replay(&mut self, events: &mut WorkerInbox) -> Result<(), Closed> {
        let Some(endpoint) = self.cfg.replay_endpoint.clone() else {
            return Ok(());
        };
        for attempt in 1..=STARTUP_REPLAY_ATTEMPTS {
            match self.fetch(&endpoint, 0, u64::MAX, true).await {
                Ok(batches) => {
                    for (seq, batch) in batches {
                        self.position.replayed(seq);
                        let at = self.clock.now_us();
                        self.deliver(batch, at).await?;
                    }
                    // The router now has everything the engine still buffers; an empty buffer
                    // means the engine has cached nothing since it started.
                    self.stats.replays_ok.fetch_add(1, Ordering::Relaxed);
                    return self
                        .send(Observation::KvResynced {
                            endpoint: self.endpoint.clone(),
                        })
                        .await;
                }
                Err(error) => {
                    tracing::debug!(endpoint = %self.endpoint, %error, attempt, "start-up KV replay failed");
                }
            }
            // A live batch arriving means the stream is up; its own handling replays if needed.
            if !events.is_empty() {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        tracing::warn!(endpoint = %self.endpoint, replay = %endpoint, "KV replay socket did not answer at start-up; following the live stream only");
        Ok(())
    }

    async fn on_message(&mut self, frames: RawMessage) -> Result<(), Closed> {
        let received_at_us = self.clock.now_us();
        let refs: Vec<&[u8]> = frames.iter().map(Vec::as_slice).collect();
        match decode_frames(&refs) {
            Ok((_topic, seq, batch)) => self.on_batch(seq, batch, received_at_us).await,
            Err(error) => self.on_undecodable(&refs, error).await,
        }
    }

    async fn on_batch(
        &mut self,
        seq: u64,
        batch: KvEventBatch,
        received_at_us: u64,
    ) -> Result<(), Closed> {
        match self.position.observe_live(seq) {
            // Joining a running publisher: the replay buffer may still reach back.
            SeqOutcome::Start { got } if got > 0 => self.recover(0, got, true).await?,
            // (Replayed is a merged-stream outcome; the live stream never yields it.)
            SeqOutcome::Start { .. } | SeqOutcome::InOrder | SeqOutcome::Replayed => {}
            SeqOutcome::Stale { expected, got } => {
                self.stats.stale.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(endpoint = %self.endpoint, expected, got, "dropping duplicate KV batch");
                return Ok(());
            }
            SeqOutcome::Gap { expected, got } => self.recover(expected, got, false).await?,
            SeqOutcome::Restart { expected, got } => {
                self.announce_restart(expected, got).await?;
                if got > 0 {
                    self.recover(0, got, true).await?;
                }
            }
        }
        self.deliver(batch, received_at_us).await
    }

    async fn on_undecodable(
        &mut self,
        frames: &[&[u8]],
        error: KvDecodeError,
    ) -> Result<(), Closed> {
        let count = self.stats.decode_errors.fetch_add(1, Ordering::Relaxed) + 1;
        if self.may_warn() {
            tracing::warn!(endpoint = %self.endpoint, %error, decode_errors = count, "undecodable KV event message");
        }
        // Without a readable sequence number we cannot tell what was lost; the next good batch
        // will show a gap if anything was.
        if frames.len() != 3 {
            return Ok(());
        }
        let Ok(seq) = decode_seq(frames[1]) else {
            return Ok(());
        };
        match self.position.observe_live(seq) {
            SeqOutcome::Stale { .. } => return Ok(()),
            SeqOutcome::Restart { expected, got } => {
                self.announce_restart(expected, got).await?;
                if got > 0 {
                    self.recover(0, got, true).await?;
                }
            }
            SeqOutcome::Gap { expected, got } => self.recover(expected, got, false).await?,
            SeqOutcome::Start { .. } | SeqOutcome::InOrder | SeqOutcome::Replayed => {}
        }
        self.report_gap(seq, seq.saturating_add(1)).await
    }

    /// Whether a warning may be logged now (at most one per [`WARN_INTERVAL`] per endpoint).
    fn may_warn(&mut self) -> bool {
        let ok = self.last_warn.is_none_or(|t| t.elapsed() >= WARN_INTERVAL);
        if ok {
            self.last_warn = Some(Instant::now());
        }
        ok
    }

    async fn announce_restart(&mut self, expected: u64, got: u64) -> Result<(), Closed> {
        self.stats.restarts.fetch_add(1, Ordering::Relaxed);
        if self.may_warn() {
            tracing::warn!(endpoint = %self.endpoint, expected, got, "KV publisher restarted (sequence went back): forgetting its cache");
        }
        let at_us = self.clock.now_us();
        self.send(Observation::KvPublisherRestarted {
            endpoint: self.endpoint.clone(),
            at_us,
        })
        .await
    }

    /// Asks the replay socket for `from..to` on the blocking pool; decoded, in order.
    async fn fetch(
        &self,
        replay_endpoint: &str,
        from: u64,
        to: u64,
        from_any: bool,
    ) -> Result<Vec<(u64, KvEventBatch)>, String> {
        let ctx = self.transport.context().clone();
        let max = self.transport.max_message_bytes();
        let timeout = Duration::from_millis(self.cfg.replay_timeout_ms);
        let endpoint = replay_endpoint.to_owned();
        let raw = tokio::task::spawn_blocking(move || {
            replay_blocking(&ctx, &endpoint, from, to, from_any, timeout, max)
        })
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?;
        let mut out = Vec::with_capacity(raw.len());
        for r in raw {
            match decode_event_batch(r.seq, &r.payload) {
                Ok(b) => out.push((r.seq, b)),
                Err(error) => {
                    tracing::warn!(endpoint = %self.endpoint, seq = r.seq, %error, "replayed KV batch does not decode");
                    break;
                }
            }
        }
        Ok(out)
    }

    /// Batches `from..to` were missed: replay them if possible, else report the gap. With
    /// `from_any`, a replay buffer that starts after `from` is fine (the router knew nothing
    /// of the older batches).
    async fn recover(&mut self, from: u64, to: u64, from_any: bool) -> Result<(), Closed> {
        let Some(replay_endpoint) = self.cfg.replay_endpoint.clone() else {
            return self.report_gap(from, to).await;
        };
        let replayed = match self.fetch(&replay_endpoint, from, to, from_any).await {
            Ok(batches) => batches,
            Err(error) => {
                tracing::warn!(endpoint = %self.endpoint, %error, from, to, "KV replay failed");
                Vec::new()
            }
        };
        let delivered_up_to = replayed.last().map_or(from, |(s, _)| s + 1);
        // Joining (`from_any`), an empty answer loses nothing the router knew; otherwise the
        // run must reach `to` (it starts at `from` by construction when not `from_any`).
        let complete = delivered_up_to == to || (from_any && replayed.is_empty());
        for (seq, batch) in replayed {
            self.position.replayed(seq);
            let at_us = self.clock.now_us();
            self.deliver(batch, at_us).await?;
        }
        if complete {
            self.stats.replays_ok.fetch_add(1, Ordering::Relaxed);
            self.send(Observation::KvResynced {
                endpoint: self.endpoint.clone(),
            })
            .await
        } else {
            self.report_gap(delivered_up_to, to).await
        }
    }

    async fn report_gap(&mut self, expected: u64, got: u64) -> Result<(), Closed> {
        self.stats.gaps_reported.fetch_add(1, Ordering::Relaxed);
        if self.may_warn() {
            tracing::warn!(endpoint = %self.endpoint, expected, got, "KV events lost");
        }
        self.send(Observation::KvGap {
            endpoint: self.endpoint.clone(),
            expected,
            got,
        })
        .await
    }

    async fn deliver(&mut self, batch: KvEventBatch, received_at_us: u64) -> Result<(), Closed> {
        self.stats.batches.fetch_add(1, Ordering::Relaxed);
        self.send(Observation::KvBatch {
            endpoint: self.endpoint.clone(),
            received_at_us,
            batch,
        })
        .await
    }

    async fn send(&self, observation: Observation) -> Result<(), Closed> {
        self.tx.send(observation).await.map_err(|_| Closed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Regression: after a start-up replay, a restarted engine's batch 0 was taken for a
    /// duplicate of the replayed batch 0, so the dead process's blocks were never forgotten.
    /// (The rule is the core's `KvSequence`; this pins it as the worker drives it.)
    #[test]
    fn restart_after_a_startup_replay_is_a_restart() {
        let mut p = KvSequence::new();
        for seq in 0..5 {
            p.replayed(seq);
        }
        // Live copies of replayed batches (queued while the replay ran) are duplicates.
        assert!(matches!(p.observe_live(3), SeqOutcome::Stale { .. }));
        assert!(matches!(p.observe_live(4), SeqOutcome::Stale { .. }));
        assert_eq!(p.observe_live(5), SeqOutcome::InOrder);
        assert_eq!(p.observe_live(6), SeqOutcome::InOrder);
        // The engine restarts: its new stream starts at 0 again.
        assert_eq!(
            p.observe_live(0),
            SeqOutcome::Restart {
                expected: 7,
                got: 0
            }
        );
        // A wild number (2^63) followed by the real sequence recovers the same way.
        assert_eq!(p.observe_live(1), SeqOutcome::InOrder);
        assert!(matches!(p.observe_live(1 << 63), SeqOutcome::Gap { .. }));
        assert!(matches!(p.observe_live(2), SeqOutcome::Restart { .. }));
    }

    #[test]
    fn topics_name_endpoints_as_llm_d_does() {
        assert_eq!(
            topic_endpoint("kv@10.0.0.7:8000@meta-llama/Llama-3.1-8B"),
            "10.0.0.7:8000"
        );
        assert_eq!(topic_endpoint("kv@10.0.0.7@m"), "10.0.0.7");
        assert_eq!(topic_endpoint("kv@[::1]:8000@m"), "[::1]:8000");
        assert_eq!(topic_endpoint("plain"), "plain");
    }
}
