//! Starting, killing and stopping simulated engines.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto::Builder;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use kvgate_engine::{Engine, EngineStats, HashAlgo};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio::task::{JoinHandle, JoinSet};
use tokio_util::sync::CancellationToken;

use crate::SimError;
use crate::actor::{Actor, SimClock};
use crate::config::{EngineSpec, FleetConfig, port_for};
use crate::http::{self, EngineShared};
use crate::kv::{KvSockets, LoraIds, Publisher, SocketRole};

/// Pause after a failed `accept` (e.g. out of file descriptors): long enough not to spin a
/// core, short enough that a recovered process serves again at once.
const ACCEPT_ERROR_BACKOFF: Duration = Duration::from_millis(10);

/// Where one running engine can be reached.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct EngineInfo {
    /// Its OpenAI-compatible HTTP server.
    pub http_addr: SocketAddr,
    /// ZMQ endpoint of its KV events: where its PUB socket is bound (subscribers connect to it)
    /// or, with [`Self::kv_pub_role`] `Connect`, the address it connects to (a subscriber must
    /// bind it).
    pub kv_pub_endpoint: String,
    /// Whether the PUB socket bound or connected [`Self::kv_pub_endpoint`].
    pub kv_pub_role: SocketRole,
    /// ZMQ ROUTER endpoint answering replay requests (always bound by the engine).
    pub kv_replay_endpoint: String,
    /// The KV-event topic, by default `kv@<http host>:<http port>@<model>` (llm-d's convention).
    pub kv_topic: String,
    /// Base model name served.
    pub model: String,
    /// Its part in prefill/decode disaggregation.
    pub role: crate::Role,
    /// Its KV side channel (NIXL reads, SGLang bootstrap rooms), on prefill and both-role
    /// engines: for a prefill engine, the `bootstrap_port` an SGLang router sends.
    pub kv_side_channel: Option<SocketAddr>,
}

struct EngineHandle {
    stop: CancellationToken,
    /// Cancelled to stop accepting and let connections finish (a graceful stop).
    close: CancellationToken,
    /// Cancelled by the HTTP server once its listener and every connection are gone.
    http_closed: CancellationToken,
    shared: Arc<EngineShared>,
    tasks: tokio::sync::Mutex<Vec<JoinHandle<()>>>,
    /// The KV-event socket threads; they end within `kv::STOP_POLL` of `stop`.
    threads: std::sync::Mutex<Vec<std::thread::JoinHandle<()>>>,
}

/// A running fleet of simulated engines. Dropping it stops every engine.
pub struct Fleet {
    /// Addresses of each engine, in index order.
    pub engines: Vec<EngineInfo>,
    handles: Vec<EngineHandle>,
}

impl Drop for Fleet {
    fn drop(&mut self) {
        for h in &self.handles {
            h.stop.cancel();
        }
    }
}

impl Fleet {
    fn handle(&self, i: usize) -> Result<&EngineHandle, SimError> {
        self.handles.get(i).ok_or(SimError::NoSuchEngine {
            index: i,
            engines: self.handles.len(),
        })
    }

    /// Stops engine `i` abruptly, like a crashed pod: its listener and every in-flight
    /// connection are dropped, its engine state is lost and its ZMQ sockets close. Returns once
    /// all of that has happened. Killing a dead engine is a no-op.
    pub async fn kill(&self, i: usize) -> Result<(), SimError> {
        let h = self.handle(i)?;
        h.stop.cancel();
        let tasks: Vec<_> = h.tasks.lock().await.drain(..).collect();
        for t in tasks {
            let _ = t.await;
        }
        let threads: Vec<_> = h
            .threads
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .drain(..)
            .collect();
        if !threads.is_empty() {
            let _ = tokio::task::spawn_blocking(move || {
                for t in threads {
                    let _ = t.join();
                }
            })
            .await;
        }
        Ok(())
    }

    /// Whether engine `i` is still running (not killed, not crashed by a fault).
    pub fn is_alive(&self, i: usize) -> bool {
        self.handles.get(i).is_some_and(|h| !h.stop.is_cancelled())
    }

    /// The true statistics of engine `i`, read from its engine model.
    pub async fn stats(&self, i: usize) -> Result<EngineStats, SimError> {
        let h = self.handle(i)?;
        h.shared
            .snapshot()
            .await
            .map(|s| s.stats)
            .ok_or(SimError::EngineDown { index: i })
    }

    /// How many `GET /metrics` requests engine `i` has had.
    pub fn metrics_requests(&self, i: usize) -> Result<u64, SimError> {
        Ok(self
            .handle(i)?
            .shared
            .metrics_requests
            .load(std::sync::atomic::Ordering::Relaxed))
    }

    /// Every engine's addresses as one JSON object (what `kvgate sim --print-json` prints):
    /// `{"engines": [{"index", "http", "kv_pub", "kv_pub_mode", "kv_replay", "kv_topic",
    /// "model", "role", "kv_side_channel"}, ...]}`, `kv_pub_mode` being `"bind"` or
    /// `"connect"`, `kv_side_channel` null on decode-role engines.
    pub fn addresses_json(&self) -> serde_json::Value {
        let engines: Vec<serde_json::Value> = self
            .engines
            .iter()
            .enumerate()
            .map(|(i, e)| {
                serde_json::json!({
                    "index": i,
                    "http": e.http_addr.to_string(),
                    "kv_pub": e.kv_pub_endpoint,
                    "kv_pub_mode": e.kv_pub_role.as_str(),
                    "kv_replay": e.kv_replay_endpoint,
                    "kv_topic": e.kv_topic,
                    "model": e.model,
                    "role": e.role.as_str(),
                    "kv_side_channel": e.kv_side_channel.map(|a| a.to_string()),
                })
            })
            .collect();
        serde_json::json!({ "engines": engines })
    }

    /// Stops every engine gracefully, as a pod being terminated: `/health` answers 503 at
    /// once, listeners keep accepting for `accept_grace`, then close, and requests in flight
    /// get up to `drain_timeout` to finish before whatever is left is cut. Returns whether
    /// every connection finished in time.
    pub async fn drain(self, accept_grace: Duration, drain_timeout: Duration) -> bool {
        for h in &self.handles {
            h.shared.draining.store(true, Ordering::Relaxed);
        }
        tokio::time::sleep(accept_grace).await;
        for h in &self.handles {
            h.close.cancel();
        }
        let closed = futures::future::join_all(
            self.handles
                .iter()
                .map(|h| h.http_closed.clone().cancelled_owned()),
        );
        let drained = tokio::time::timeout(drain_timeout, closed).await.is_ok();
        self.shutdown().await;
        drained
    }

    /// Stops every engine and waits until all their sockets are closed.
    pub async fn shutdown(self) {
        for i in 0..self.handles.len() {
            let _ = self.kill(i).await;
        }
    }
}

/// The key of every `sha256` engine chain in this process, drawn once: engines of one fleet
/// (and of fleets started by one test binary) agree with each other, as vLLM engines sharing a
/// seed do, while nothing outside the process can compute their hashes.
fn process_sha256_secret() -> [u8; 32] {
    static SECRET: OnceLock<[u8; 32]> = OnceLock::new();
    *SECRET.get_or_init(rand::random)
}

/// A random version-4 UUID, vLLM's default `engine_id`.
fn engine_uuid() -> String {
    let b: [u8; 16] = rand::random();
    let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-4{}-{:x}{}-{}",
        &h[0..8],
        &h[8..12],
        &h[13..16],
        8 | (b[8] & 0x3),
        &h[17..20],
        &h[20..32]
    )
}

/// Starts every engine of `cfg`; returns once all sockets are bound.
pub async fn start_fleet(cfg: FleetConfig) -> Result<Fleet, SimError> {
    cfg.validate()?;
    let words: Arc<HashMap<u32, String>> = Arc::new(
        kvgate_engine::default_output_vocab()
            .iter()
            .copied()
            .zip(kvgate_engine::default_output_words())
            .collect(),
    );
    let n = cfg.engines.len();
    let mut fleet = Fleet {
        engines: Vec::with_capacity(n),
        handles: Vec::with_capacity(n),
    };
    for (i, spec) in cfg.engines.iter().enumerate() {
        let (info, handle) = start_engine(&cfg, i, spec, words.clone()).await?;
        fleet.engines.push(info);
        fleet.handles.push(handle);
    }
    Ok(fleet)
}

async fn start_engine(
    cfg: &FleetConfig,
    i: usize,
    spec: &EngineSpec,
    words: Arc<HashMap<u32, String>>,
) -> Result<(EngineInfo, EngineHandle), SimError> {
    let mut engine_cfg = spec.engine.clone();
    if engine_cfg.prefix_caching_hash_algo == HashAlgo::Sha256 && engine_cfg.sha256_secret.is_none()
    {
        engine_cfg.sha256_secret = Some(process_sha256_secret());
    }
    engine_cfg.lora_paths.extend(
        cfg.lora_paths
            .iter()
            .map(|(name, path)| (name.clone(), path.clone())),
    );
    let engine = Engine::new(engine_cfg.clone())
        .map_err(|source| SimError::InvalidEngineConfig { index: i, source })?;

    let http_bind = SocketAddr::new(cfg.host, port_for(cfg.http_port, i));
    let listener = TcpListener::bind(http_bind)
        .await
        .map_err(|source| SimError::Bind {
            addr: http_bind.to_string(),
            source,
        })?;
    let http_addr = listener.local_addr().map_err(|source| SimError::Bind {
        addr: http_bind.to_string(),
        source,
    })?;

    // The KV side channel: a prefill engine's at the SGLang bootstrap port (+ i), a both-role
    // engine's anywhere (it is found through the `remote_port` it hands out).
    let side_listener = if spec.role.serves_kv() {
        let port = if spec.role == crate::Role::Prefill {
            port_for(cfg.bootstrap_port, i)
        } else {
            0
        };
        let bind = SocketAddr::new(cfg.host, port);
        let l = TcpListener::bind(bind)
            .await
            .map_err(|source| SimError::Bind {
                addr: bind.to_string(),
                source,
            })?;
        let addr = l.local_addr().map_err(|source| SimError::Bind {
            addr: bind.to_string(),
            source,
        })?;
        Some((l, addr))
    } else {
        None
    };
    let side_channel = side_listener.as_ref().map(|(_, a)| *a);

    let (pub_want, force_bind) = cfg.pub_plan(i);
    let sockets = KvSockets::open(&pub_want, force_bind, &cfg.replay_bind(i))?;
    let kv_pub_endpoint = sockets.pub_endpoint.clone();
    let kv_pub_role = sockets.pub_role;
    let kv_replay_endpoint = sockets.replay_endpoint.clone();
    let kv_topic = cfg.topic(i, http_addr);

    let stop = CancellationToken::new();
    let (cmd_tx, cmd_rx) = mpsc::unbounded_channel();
    let (kv_tx, kv_rx) = std::sync::mpsc::channel();
    let shared = Arc::new(EngineShared {
        index: i,
        model: cfg.model.clone(),
        adapters: cfg.lora_adapters.clone(),
        tokenizer: cfg.tokenizer.clone(),
        config: engine_cfg,
        prompt_tokens_details: cfg.enable_prompt_tokens_details,
        faults: spec.faults.clone(),
        fault_seed: cfg.fault_seed,
        cmd: cmd_tx,
        next_id: AtomicU64::new(0),
        requests_seen: AtomicU64::new(0),
        metrics_requests: AtomicU64::new(0),
        started: Instant::now(),
        created_unix_s: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
        crash: stop.clone(),
        draining: AtomicBool::new(false),
        words,
        role: spec.role,
        engine_id: engine_uuid(),
        time_scale: cfg.time_scale,
        side_channel,
        transfers_served: AtomicU64::new(0),
        nixl: std::sync::Mutex::new(crate::pd::NixlStats::default()),
        client: reqwest::Client::new(),
        rooms: crate::pd::Rooms::default(),
    });

    let mut tasks = Vec::with_capacity(4);
    let actor = Actor {
        engine,
        clock: SimClock::new(cfg.time_scale),
        kv: kv_tx,
    };
    tasks.push(tokio::spawn(actor.run(cmd_rx, stop.clone())));
    let publisher = Publisher {
        sockets,
        topic: Bytes::from(kv_topic.clone()),
        encoding: cfg.kv_encoding,
        replay_format: cfg.replay_format,
        loras: LoraIds(cfg.lora_adapters.clone()),
        buffer_batches: cfg.replay_buffer_batches,
        drop_rate: spec.faults.kv_drop_rate,
        fault_seed: cfg.fault_seed,
        engine_index: i,
    };
    let threads = match publisher.spawn(kv_rx, stop.clone()) {
        Ok(t) => t,
        Err(source) => {
            stop.cancel();
            return Err(SimError::SpawnThread { source });
        }
    };
    if let Some((l, _)) = side_listener {
        // Dies with the engine (a crash refuses and cuts transfers); a graceful stop leaves
        // it to the end, so decode engines can still read what was prefilled.
        tasks.push(tokio::spawn(serve_http(
            l,
            crate::pd::side_channel(shared.clone()),
            stop.clone(),
            CancellationToken::new(),
            CancellationToken::new(),
        )));
    }
    let close = CancellationToken::new();
    let http_closed = CancellationToken::new();
    tasks.push(tokio::spawn(serve_http(
        listener,
        http::router(shared.clone()),
        stop.clone(),
        close.clone(),
        http_closed.clone(),
    )));
    if let Some(t) = spec
        .faults
        .crash_at_s
        .and_then(|t| Duration::try_from_secs_f64(t).ok())
    {
        let stop = stop.clone();
        tasks.push(tokio::spawn(async move {
            tokio::select! {
                () = stop.cancelled() => {}
                () = tokio::time::sleep(t) => stop.cancel(),
            }
        }));
    }
    let info = EngineInfo {
        http_addr,
        kv_pub_endpoint,
        kv_pub_role,
        kv_replay_endpoint,
        kv_topic,
        model: cfg.model.clone(),
        role: spec.role,
        kv_side_channel: side_channel,
    };
    let handle = EngineHandle {
        stop,
        close,
        http_closed,
        shared,
        tasks: tokio::sync::Mutex::new(tasks),
        threads: std::sync::Mutex::new(threads),
    };
    Ok((info, handle))
}

/// Accepts connections until `stop` or `close` fires. On `stop` it drops the listener and every
/// connection task, cutting in-flight responses as a crashed process would. On `close` it drops
/// the listener and lets each connection finish the response in flight (keep-alive connections
/// close after it) until they are all done or `stop` fires. Cancels `closed` when it returns.
async fn serve_http(
    listener: TcpListener,
    app: axum::Router,
    stop: CancellationToken,
    close: CancellationToken,
    closed: CancellationToken,
) {
    let _closed = closed.drop_guard();
    let graceful = GracefulShutdown::new();
    let mut conns = JoinSet::new();
    let graceful_stop = loop {
        tokio::select! {
            biased;
            () = stop.cancelled() => break false,
            () = close.cancelled() => break true,
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
            accepted = listener.accept() => {
                let Ok((sock, _)) = accepted else {
                    // Out of file descriptors or similar: back off instead of spinning.
                    tokio::time::sleep(ACCEPT_ERROR_BACKOFF).await;
                    continue;
                };
                let _ = sock.set_nodelay(true);
                let svc = TowerToHyperService::new(app.clone());
                let watcher = graceful.watcher();
                conns.spawn(async move {
                    let builder = Builder::new(TokioExecutor::new());
                    let conn = builder.serve_connection(TokioIo::new(sock), svc);
                    let _ = watcher.watch(conn).await;
                });
            }
        }
    };
    drop(listener);
    if graceful_stop {
        tokio::select! {
            () = graceful.shutdown() => {}
            () = stop.cancelled() => {}
        }
    }
    conns.shutdown().await;
}
