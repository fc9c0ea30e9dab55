//! Starting, killing and stopping simulated engines.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto::Builder;
use hyper_util::service::TowerToHyperService;
use kvgate_engine::{Engine, EngineStats};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio::task::{JoinHandle, JoinSet};
use tokio_util::sync::CancellationToken;
use zeromq::{PubSocket, RouterSocket, Socket};

use crate::SimError;
use crate::actor::{Actor, SimClock};
use crate::config::{EngineSpec, FleetConfig};
use crate::http::{self, EngineShared};
use crate::kv::{LoraIds, Publisher};

/// Pause after a failed `accept` (e.g. out of file descriptors): long enough not to spin a
/// core, short enough that a recovered process serves again at once.
const ACCEPT_ERROR_BACKOFF: Duration = Duration::from_millis(10);

/// Where one running engine can be reached.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct EngineInfo {
    /// Its OpenAI-compatible HTTP server.
    pub http_addr: SocketAddr,
    /// ZMQ PUB endpoint of its KV events, `tcp://127.0.0.1:port`.
    pub kv_pub_endpoint: String,
    /// ZMQ ROUTER endpoint answering replay requests.
    pub kv_replay_endpoint: String,
    /// The KV-event topic, `kv@<http host:port>@<model>` (vLLM's documented convention).
    pub kv_topic: String,
    /// Base model name served.
    pub model: String,
}

struct EngineHandle {
    stop: CancellationToken,
    shared: Arc<EngineShared>,
    tasks: tokio::sync::Mutex<Vec<JoinHandle<()>>>,
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

    /// Every engine's addresses as one JSON object (what `kvgate sim --print-json` prints):
    /// `{"engines": [{"index", "http", "kv_pub", "kv_replay", "kv_topic", "model"}, ...]}`.
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
                    "kv_replay": e.kv_replay_endpoint,
                    "kv_topic": e.kv_topic,
                    "model": e.model,
                })
            })
            .collect();
        serde_json::json!({ "engines": engines })
    }

    /// Stops every engine and waits until all their sockets are closed.
    pub async fn shutdown(self) {
        for i in 0..self.handles.len() {
            let _ = self.kill(i).await;
        }
    }
}

fn port_for(base: u16, offset: usize) -> u16 {
    if base == 0 {
        0
    } else {
        // FleetConfig::validate guarantees the sum fits.
        base.saturating_add(u16::try_from(offset).unwrap_or(u16::MAX))
    }
}

fn endpoint_port(ep: &zeromq::Endpoint) -> Option<u16> {
    match ep {
        zeromq::Endpoint::Tcp(_, port) => Some(*port),
        _ => None,
    }
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
    let n = cfg.engines.len();
    let engine = Engine::new(spec.engine.clone())
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

    let zmq_bind = |port: u16| format!("tcp://{}:{port}", cfg.host);
    let mut publ = PubSocket::new();
    let pub_want = zmq_bind(port_for(cfg.zmq_port, i));
    let pub_ep = publ
        .bind(&pub_want)
        .await
        .map_err(|source| SimError::ZmqBind {
            endpoint: pub_want.clone(),
            source,
        })?;
    let mut replay = RouterSocket::new();
    let replay_want = zmq_bind(port_for(cfg.zmq_port, n + i));
    let replay_ep = replay
        .bind(&replay_want)
        .await
        .map_err(|source| SimError::ZmqBind {
            endpoint: replay_want.clone(),
            source,
        })?;
    let kv_pub_endpoint = zmq_bind(endpoint_port(&pub_ep).unwrap_or(0));
    let kv_replay_endpoint = zmq_bind(endpoint_port(&replay_ep).unwrap_or(0));
    let kv_topic = format!("kv@{http_addr}@{}", cfg.model);

    let stop = CancellationToken::new();
    let (cmd_tx, cmd_rx) = mpsc::unbounded_channel();
    let (kv_tx, kv_rx) = mpsc::unbounded_channel();
    let shared = Arc::new(EngineShared {
        index: i,
        model: cfg.model.clone(),
        adapters: cfg.lora_adapters.clone(),
        tokenizer: cfg.tokenizer.clone(),
        config: spec.engine.clone(),
        faults: spec.faults.clone(),
        fault_seed: cfg.fault_seed,
        cmd: cmd_tx,
        next_id: AtomicU64::new(0),
        requests_seen: AtomicU64::new(0),
        started: Instant::now(),
        created_unix_s: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
        crash: stop.clone(),
        words,
    });

    let mut tasks = Vec::with_capacity(4);
    let actor = Actor {
        engine,
        clock: SimClock::new(cfg.time_scale),
        kv: kv_tx,
    };
    tasks.push(tokio::spawn(actor.run(cmd_rx, stop.clone())));
    let publisher = Publisher {
        publ,
        replay,
        topic: Bytes::from(kv_topic.clone()),
        encoding: cfg.kv_encoding,
        loras: LoraIds(cfg.lora_adapters.clone()),
        buffer_batches: cfg.replay_buffer_batches,
        drop_rate: spec.faults.kv_drop_rate,
        fault_seed: cfg.fault_seed,
        engine_index: i,
    };
    tasks.push(tokio::spawn(publisher.run(kv_rx, stop.clone())));
    tasks.push(tokio::spawn(serve_http(
        listener,
        http::router(shared.clone()),
        stop.clone(),
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
        kv_replay_endpoint,
        kv_topic,
        model: cfg.model.clone(),
    };
    let handle = EngineHandle {
        stop,
        shared,
        tasks: tokio::sync::Mutex::new(tasks),
    };
    Ok((info, handle))
}

/// Accepts connections until `stop` fires, then drops the listener and every connection task,
/// cutting in-flight responses as a crashed process would.
async fn serve_http(listener: TcpListener, app: axum::Router, stop: CancellationToken) {
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            biased;
            () = stop.cancelled() => break,
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
            accepted = listener.accept() => {
                let Ok((sock, _)) = accepted else {
                    // Out of file descriptors or similar: back off instead of spinning.
                    tokio::time::sleep(ACCEPT_ERROR_BACKOFF).await;
                    continue;
                };
                let _ = sock.set_nodelay(true);
                let svc = TowerToHyperService::new(app.clone());
                conns.spawn(async move {
                    let _ = Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(sock), svc)
                        .await;
                });
            }
        }
    }
    drop(listener);
    conns.shutdown().await;
}
