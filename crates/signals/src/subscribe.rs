//! The KV-event subscriber: one tokio task per publisher, turning a vLLM-style ZMQ PUB stream
//! into ordered [`Observation::KvBatch`]es, with replay of lost batches.
//!
//! The router's precise prefix index is only as good as the event stream is complete: one lost
//! `BlockRemoved` and it routes to blocks that are gone. So the subscriber numbers what it sees
//! ([`SeqTracker`]) and, on a gap, asks the publisher's replay socket (a ZMQ ROUTER that keeps
//! its recent batches) for the missing ones before delivering anything newer, so the router
//! always applies batches in publisher order. Replay is done inline, bounded by a timeout:
//! batches arriving meanwhile wait in the SUB socket's queue, which keeps ordering trivial. If
//! replay is not configured or cannot supply every missing batch, the subscriber delivers what
//! it could and reports [`Observation::KvGap`]; the router then falls back to approximate
//! tracking for that pod. A batch that fails to decode is also a lost batch (replaying the same
//! bytes would fail the same way), so it is counted, logged and reported as a one-batch gap;
//! it never stops the loop.
//!
//! Publisher restarts are detected as described in [`crate::seq`] and reported with
//! [`Observation::KvPublisherRestarted`] (the new engine process starts with an empty cache).
//! The ZMQ SUB socket reconnects on its own when the publisher comes back; its disconnect
//! notifications feed the restart detection. If the socket itself keeps failing, it is rebuilt.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use kvgate_core::observe::KvEventBatch;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use zeromq::{
    DealerSocket, Socket, SocketEvent, SocketOptions, SocketRecv, SocketSend, SubSocket, ZmqMessage,
};

use crate::clock::Clock;
use crate::kv_events::{
    KvDecodeError, REPLAY_END_SEQ, decode_event_batch, decode_frames, decode_seq,
};
use crate::observation::{EndpointKey, Observation};
use crate::seq::{SeqOutcome, SeqTracker};

/// Default bound on one replay exchange (connect, request, all replies). vLLM answers from memory
/// in well under a millisecond per batch; one second covers thousands of buffered batches while
/// holding back live delivery for at most that long when the replay socket is unreachable.
pub const DEFAULT_REPLAY_TIMEOUT_MS: u64 = 1_000;

/// Default bound on establishing the SUB connection before the attempt is retried from a fresh
/// socket. Short, because the retry loop (with backoff) is ours and logs each failure.
pub const DEFAULT_CONNECT_TIMEOUT_MS: u64 = 2_000;

/// First delay before rebuilding a failed SUB socket; doubled per consecutive failure up to
/// [`RECONNECT_BACKOFF_MAX_MS`], so a dead publisher costs a handful of attempts per minute.
const RECONNECT_BACKOFF_MIN_MS: u64 = 100;

/// Ceiling of the reconnect backoff: a restarted engine is picked up within this long.
const RECONNECT_BACKOFF_MAX_MS: u64 = 5_000;

/// Receive errors in a row after which the SUB socket is rebuilt instead of retried. One error
/// is usually a peer hanging up (the socket reconnects by itself); several mean the socket is
/// wedged.
const MAX_CONSECUTIVE_RECV_ERRORS: u32 = 3;

/// Where to subscribe.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KvSubscribeConfig {
    /// The publisher's PUB endpoint, e.g. `tcp://10.0.0.7:5557`.
    pub pub_endpoint: String,
    /// The publisher's replay (ROUTER) endpoint, if it has one.
    pub replay_endpoint: Option<String>,
    /// ZMQ topic prefix to subscribe to (`""` for all).
    pub topic_filter: String,
    /// Bound on one replay exchange, in milliseconds.
    pub replay_timeout_ms: u64,
    /// Bound on connecting the SUB socket, in milliseconds.
    pub connect_timeout_ms: u64,
}

impl KvSubscribeConfig {
    /// Subscribes to every topic of `pub_endpoint`, without replay, with default timeouts.
    pub fn new(pub_endpoint: impl Into<String>) -> Self {
        Self {
            pub_endpoint: pub_endpoint.into(),
            replay_endpoint: None,
            topic_filter: String::new(),
            replay_timeout_ms: DEFAULT_REPLAY_TIMEOUT_MS,
            connect_timeout_ms: DEFAULT_CONNECT_TIMEOUT_MS,
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
    /// Times the SUB socket was (re)built after the first.
    pub socket_rebuilds: AtomicU64,
}

/// A running subscriber.
#[derive(Debug)]
pub struct KvSubscriber {
    /// The task; it ends when the router drops its receiver, or when aborted.
    pub handle: JoinHandle<()>,
    /// Live counters.
    pub stats: Arc<KvSubscriberStats>,
}

impl KvSubscriber {
    /// Stops the task.
    pub fn abort(&self) {
        self.handle.abort();
    }
}

/// Subscribes to `cfg.pub_endpoint` and sends what it learns about `endpoint` on `tx`.
///
/// Must be called within a tokio runtime.
pub fn spawn_kv_subscriber(
    cfg: KvSubscribeConfig,
    endpoint: EndpointKey,
    clock: Arc<dyn Clock>,
    tx: mpsc::Sender<Observation>,
) -> KvSubscriber {
    let stats = Arc::new(KvSubscriberStats::default());
    let worker = Worker {
        cfg,
        endpoint,
        clock,
        tx,
        stats: Arc::clone(&stats),
        tracker: SeqTracker::new(),
    };
    KvSubscriber {
        handle: tokio::spawn(worker.run()),
        stats,
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
    tracker: SeqTracker,
}

impl Worker {
    async fn run(mut self) {
        let mut backoff_ms = RECONNECT_BACKOFF_MIN_MS;
        let mut first = true;
        loop {
            if !first {
                self.stats.socket_rebuilds.fetch_add(1, Ordering::Relaxed);
                self.tracker.note_reconnect();
            }
            first = false;
            let mut options = SocketOptions::default();
            options.connect_timeout(Duration::from_millis(self.cfg.connect_timeout_ms));
            let mut socket = SubSocket::with_options(options);
            let mut monitor = socket.monitor();
            let connected = async {
                socket.subscribe(&self.cfg.topic_filter).await?;
                socket.connect(&self.cfg.pub_endpoint).await
            }
            .await;
            if let Err(error) = connected {
                tracing::warn!(endpoint = %self.endpoint, %error, backoff_ms, "KV publisher connect failed");
                tokio::time::sleep(Duration::from_millis(backoff_ms)).await;
                backoff_ms = (backoff_ms * 2).min(RECONNECT_BACKOFF_MAX_MS);
                if self.tx.is_closed() {
                    return;
                }
                continue;
            }
            backoff_ms = RECONNECT_BACKOFF_MIN_MS;
            let mut monitor_open = true;
            let mut recv_errors = 0u32;
            loop {
                tokio::select! {
                    event = monitor.next(), if monitor_open => match event {
                        Some(SocketEvent::Disconnected(_)) => {
                            tracing::info!(endpoint = %self.endpoint, "KV publisher disconnected");
                            self.tracker.note_reconnect();
                        }
                        Some(_) => {}
                        None => monitor_open = false,
                    },
                    message = socket.recv() => match message {
                        Ok(message) => {
                            recv_errors = 0;
                            if self.on_message(message).await.is_err() {
                                return;
                            }
                        }
                        Err(error) => {
                            recv_errors += 1;
                            self.tracker.note_reconnect();
                            tracing::warn!(endpoint = %self.endpoint, %error, recv_errors, "KV SUB receive failed");
                            if recv_errors >= MAX_CONSECUTIVE_RECV_ERRORS {
                                break;
                            }
                            tokio::time::sleep(Duration::from_millis(RECONNECT_BACKOFF_MIN_MS)).await;
                        }
                    },
                    () = self.tx.closed() => return,
                }
            }
        }
    }

    async fn on_message(&mut self, message: ZmqMessage) -> Result<(), Closed> {
        let received_at_us = self.clock.now_us();
        let frames = message.into_vec();
        let refs: Vec<&[u8]> = frames.iter().map(Bytes::as_ref).collect();
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
        match self.tracker.observe(seq) {
            // Joining a running publisher: everything before `seq` is unknown to the router.
            // The replay buffer may still reach back to 0, which gives a complete view.
            SeqOutcome::First if seq > 0 => self.recover(0, seq).await?,
            SeqOutcome::First | SeqOutcome::InOrder => {}
            SeqOutcome::Stale { expected, got } => {
                self.stats.stale.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(endpoint = %self.endpoint, expected, got, "dropping stale KV batch");
                return Ok(());
            }
            SeqOutcome::Gap { expected, got } => self.recover(expected, got).await?,
            SeqOutcome::Restart { expected, got } => {
                self.announce_restart(expected, got).await?;
                if got > 0 {
                    self.recover(0, got).await?;
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
        tracing::warn!(endpoint = %self.endpoint, %error, decode_errors = count, "undecodable KV event message");
        // Without a readable sequence number we cannot tell what was lost; the next good batch
        // will show a gap if anything was.
        let Some(seq) = frames.get(1).and_then(|f| decode_seq(f).ok()) else {
            return Ok(());
        };
        if frames.len() != 3 {
            return Ok(());
        }
        match self.tracker.observe(seq) {
            SeqOutcome::Stale { .. } => return Ok(()),
            SeqOutcome::Restart { expected, got } => {
                self.announce_restart(expected, got).await?;
                if got > 0 {
                    self.recover(0, got).await?;
                }
            }
            SeqOutcome::Gap { expected, got } => self.recover(expected, got).await?,
            SeqOutcome::First | SeqOutcome::InOrder => {}
        }
        self.report_gap(seq, seq.saturating_add(1)).await
    }

    async fn announce_restart(&mut self, expected: u64, got: u64) -> Result<(), Closed> {
        self.stats.restarts.fetch_add(1, Ordering::Relaxed);
        tracing::info!(endpoint = %self.endpoint, expected, got, "KV publisher restarted");
        let at_us = self.clock.now_us();
        self.send(Observation::KvPublisherRestarted {
            endpoint: self.endpoint.clone(),
            at_us,
        })
        .await
    }

    /// Batches `from..to` were missed: replay them if possible, else report the gap.
    async fn recover(&mut self, from: u64, to: u64) -> Result<(), Closed> {
        let Some(replay_endpoint) = self.cfg.replay_endpoint.clone() else {
            return self.report_gap(from, to).await;
        };
        let timeout = Duration::from_millis(self.cfg.replay_timeout_ms);
        let replayed = match replay(&replay_endpoint, from, to, timeout).await {
            Ok(batches) => batches,
            Err(error) => {
                tracing::warn!(endpoint = %self.endpoint, %error, from, to, "KV replay failed");
                Vec::new()
            }
        };
        let complete = replayed.len() as u64 == to - from;
        let delivered_up_to = from + replayed.len() as u64;
        for batch in replayed {
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
        tracing::warn!(endpoint = %self.endpoint, expected, got, "KV events lost");
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

/// Why a replay exchange failed.
#[derive(Debug, thiserror::Error)]
enum ReplayError {
    #[error("replay did not finish within {timeout_ms} ms")]
    Timeout { timeout_ms: u128 },
    #[error("replay socket: {0}")]
    Zmq(#[from] zeromq::ZmqError),
    #[error("replay reply has {frames} frames, expected [\"\", seq, payload]")]
    BadReply { frames: usize },
    #[error("replay reply: {0}")]
    Decode(#[from] KvDecodeError),
}

/// Asks a vLLM replay ROUTER for batches `from..to`, returning the contiguous run starting at
/// `from` that it supplied (shorter than `to - from` if its buffer no longer reaches back, or a
/// batch did not decode). Protocol: send `["", from (8 bytes BE)]`; receive `["", seq, payload]`
/// per buffered batch with `seq >= from`, then `["", 0xFF×8, ""]`.
async fn replay(
    endpoint: &str,
    from: u64,
    to: u64,
    timeout: Duration,
) -> Result<Vec<KvEventBatch>, ReplayError> {
    let exchange = async {
        let mut options = SocketOptions::default();
        options.connect_timeout(timeout);
        let mut dealer = DealerSocket::with_options(options);
        dealer.connect(endpoint).await?;
        let request = ZmqMessage::try_from(vec![
            Bytes::new(),
            Bytes::copy_from_slice(&from.to_be_bytes()),
        ])
        .map_err(|_| ReplayError::BadReply { frames: 0 })?;
        dealer.send(request).await?;
        let mut batches = Vec::new();
        loop {
            let frames = dealer.recv().await?.into_vec();
            let (seq_frame, payload) = match frames.as_slice() {
                [empty, seq, payload] if empty.is_empty() => (seq, payload),
                // Tolerate a server that omits the delimiter.
                [seq, payload] => (seq, payload),
                other => {
                    return Err(ReplayError::BadReply {
                        frames: other.len(),
                    });
                }
            };
            let seq = decode_seq(seq_frame)?;
            let next = from + batches.len() as u64;
            // Replies come in ascending order: the end marker, anything at or past `to` (which
            // the live stream carries) or a hole means nothing more is useful. Returning at once
            // drops the socket; the server's remaining sends to it are discarded by ZMQ, which
            // matters when joining a long-running publisher whose buffer starts far past `from`.
            if seq == REPLAY_END_SEQ || seq >= to || seq > next {
                return Ok(batches);
            }
            if seq < next {
                continue;
            }
            match decode_event_batch(seq, payload) {
                Ok(batch) => batches.push(batch),
                Err(error) => {
                    tracing::warn!(seq, %error, "replayed KV batch does not decode");
                    return Ok(batches);
                }
            }
        }
    };
    tokio::time::timeout(timeout, exchange)
        .await
        .map_err(|_| ReplayError::Timeout {
            timeout_ms: timeout.as_millis(),
        })?
}
