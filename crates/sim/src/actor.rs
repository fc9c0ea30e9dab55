//! The engine actor: one task per simulated engine owns its [`Engine`] and drives it in real
//! time.
//!
//! Everything that touches the engine goes through the actor's command channel, so the engine
//! needs no lock and steps happen in one place. The actor sleeps until the engine's next step
//! ends (`next_wakeup_us`, converted to wall-clock time through the time scale), completes the
//! due steps one at a time, routes each step's token outputs to the request's channel, and hands
//! each step's KV events to the publisher as one batch, as vLLM publishes one batch per step.

use std::collections::{BTreeMap, HashMap};
use std::sync::mpsc::Sender;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use kvgate_engine::{
    Engine, EngineError, EngineRequest, EngineStats, KvHold, KvLoad, Output, RequestId,
};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::kv::Batch;

/// Maps simulated engine time to wall-clock time: simulated µs = real elapsed µs × scale.
#[derive(Clone, Copy, Debug)]
pub(crate) struct SimClock {
    start: Instant,
    scale: f64,
}

impl SimClock {
    pub fn new(scale: f64) -> Self {
        Self {
            start: Instant::now(),
            scale,
        }
    }

    /// Simulated microseconds since start.
    pub fn now_us(&self) -> u64 {
        (self.start.elapsed().as_secs_f64() * 1e6 * self.scale) as u64
    }

    /// The wall-clock instant at which simulated time reaches `sim_us`; `None` if that lies
    /// beyond what an `Instant` can represent (a tiny scale and a far wake-up).
    pub fn instant_at(&self, sim_us: u64) -> Option<Instant> {
        Duration::try_from_secs_f64(sim_us as f64 / 1e6 / self.scale)
            .ok()
            .and_then(|d| self.start.checked_add(d))
    }
}

/// Per-adapter request counts, for `vllm:lora_requests_info`.
#[derive(Clone, Debug, Default)]
pub(crate) struct LoraCounts {
    pub running: BTreeMap<String, u32>,
    pub waiting: BTreeMap<String, u32>,
}

/// What `/metrics` and [`crate::Fleet::stats`] read.
#[derive(Clone, Debug)]
pub(crate) struct Snapshot {
    pub stats: EngineStats,
    pub lora: LoraCounts,
}

/// How a submitted request takes part in prefill/decode disaggregation.
pub(crate) enum SubmitMode {
    /// Served here from end to end.
    Local,
    /// Prefill side: when it finishes by length its held blocks are sent to `hold`, before its
    /// `Finished` output.
    RemoteDecode { hold: oneshot::Sender<KvHold> },
    /// Decode side: its block allocation is sent to `load` (dropped unsent if the request ends
    /// first).
    RemotePrefill { load: oneshot::Sender<KvLoad> },
}

pub(crate) enum Command {
    Submit {
        req: EngineRequest,
        mode: SubmitMode,
        outputs: mpsc::UnboundedSender<Output>,
        admitted: oneshot::Sender<Result<(), EngineError>>,
    },
    /// The blocks held for a decode engine, if still held.
    GetHold {
        id: RequestId,
        reply: oneshot::Sender<Option<KvHold>>,
    },
    /// The decode engine has read the held blocks; replies whether they were still held.
    ReleaseHold {
        id: RequestId,
        reply: oneshot::Sender<bool>,
    },
    /// A remote KV load ended.
    RemoteKv {
        id: RequestId,
        ok: bool,
    },
    Abort {
        id: RequestId,
    },
    Snapshot {
        reply: oneshot::Sender<Snapshot>,
    },
    /// vLLM's `/reset_prefix_cache`; replies whether the cache was reset.
    ResetPrefixCache {
        reset_running_requests: bool,
        reply: oneshot::Sender<bool>,
    },
}

struct Live {
    outputs: mpsc::UnboundedSender<Output>,
    lora: Option<String>,
    started: bool,
    hold: Option<oneshot::Sender<KvHold>>,
    load: Option<oneshot::Sender<KvLoad>>,
}

pub(crate) struct Actor {
    pub engine: Engine,
    pub clock: SimClock,
    /// Feeds the KV-event PUB thread (a std channel: its receiver lives on a blocking thread).
    pub kv: Sender<Batch>,
}

fn unix_now_s() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

impl Actor {
    /// Runs until `stop` fires or every command sender is gone.
    pub async fn run(mut self, mut rx: mpsc::UnboundedReceiver<Command>, stop: CancellationToken) {
        let mut live: HashMap<RequestId, Live> = HashMap::new();
        let mut outs: Vec<Output> = Vec::new();
        loop {
            self.step_due(&mut live, &mut outs);
            let wake = self
                .engine
                .next_wakeup_us()
                .and_then(|w| self.clock.instant_at(w))
                .map(tokio::time::Instant::from_std);
            tokio::select! {
                biased;
                () = stop.cancelled() => return,
                cmd = rx.recv() => {
                    let Some(cmd) = cmd else { return };
                    self.handle(cmd, &mut live);
                }
                () = async {
                    match wake {
                        Some(at) => tokio::time::sleep_until(at).await,
                        None => std::future::pending().await,
                    }
                } => {}
            }
        }
    }

    fn handle(&mut self, cmd: Command, live: &mut HashMap<RequestId, Live>) {
        let now = self.clock.now_us();
        match cmd {
            Command::Submit {
                req,
                mode,
                outputs,
                admitted,
            } => {
                let id = req.id;
                let lora = req.lora_name.clone();
                let (res, hold, load) = match mode {
                    SubmitMode::Local => (self.engine.add_request(now, req), None, None),
                    SubmitMode::RemoteDecode { hold } => {
                        (self.engine.add_remote_decode(now, req), Some(hold), None)
                    }
                    SubmitMode::RemotePrefill { load } => {
                        (self.engine.add_remote_prefill(now, req), None, Some(load))
                    }
                };
                if res.is_ok() {
                    live.insert(
                        id,
                        Live {
                            outputs,
                            lora,
                            started: false,
                            hold,
                            load,
                        },
                    );
                }
                let _ = admitted.send(res);
            }
            Command::GetHold { id, reply } => {
                let _ = reply.send(self.engine.kv_hold(id).cloned());
            }
            Command::ReleaseHold { id, reply } => {
                let _ = reply.send(self.engine.release_kv_hold(now, id));
            }
            Command::RemoteKv { id, ok } => {
                if ok {
                    self.engine.remote_kv_ready(now, id);
                } else {
                    self.engine.remote_kv_failed(now, id);
                }
            }
            Command::Abort { id } => {
                self.engine.abort(now, id);
            }
            Command::Snapshot { reply } => {
                let mut lora = LoraCounts::default();
                for l in live.values() {
                    if let Some(name) = &l.lora {
                        let map = if l.started {
                            &mut lora.running
                        } else {
                            &mut lora.waiting
                        };
                        *map.entry(name.clone()).or_default() += 1;
                    }
                }
                let _ = reply.send(Snapshot {
                    stats: self.engine.stats(),
                    lora,
                });
            }
            Command::ResetPrefixCache {
                reset_running_requests,
                reply,
            } => {
                let ok = self.engine.reset_prefix_cache(now, reset_running_requests);
                let _ = reply.send(ok);
            }
        }
        self.flush_kv();
        self.route_loads(live);
    }

    /// Hands every block allocation for a remote load to the request that waits for it.
    fn route_loads(&mut self, live: &mut HashMap<RequestId, Live>) {
        for load in self.engine.take_kv_loads() {
            if let Some(tx) = live.get_mut(&load.id).and_then(|l| l.load.take()) {
                let _ = tx.send(load);
            }
        }
    }

    /// Completes every step that has ended by now, one step at a time so each step's KV events
    /// form one batch.
    fn step_due(&mut self, live: &mut HashMap<RequestId, Live>, outs: &mut Vec<Output>) {
        let now = self.clock.now_us();
        // A step's KV events go out before its tokens, as vLLM's `Scheduler.update_from_output`
        // publishes the batch before the step's outputs reach the API server.
        while let Some(w) = self.engine.next_wakeup_us().filter(|&w| w <= now) {
            self.engine.advance(w, outs);
            self.flush_kv();
            self.route(live, outs);
        }
        // Aborts complete without a step: their Finished output arrives on any advance.
        self.engine.advance(now, outs);
        self.flush_kv();
        self.route(live, outs);
        self.route_loads(live);
    }

    fn route(&mut self, live: &mut HashMap<RequestId, Live>, outs: &mut Vec<Output>) {
        for o in outs.drain(..) {
            match &o {
                Output::Token { id, .. } => {
                    if let Some(l) = live.get_mut(id) {
                        l.started = true;
                        let _ = l.outputs.send(o);
                    }
                }
                Output::Finished { id, .. } => {
                    if let Some(l) = live.remove(id) {
                        if let (Some(tx), Some(h)) = (l.hold, self.engine.kv_hold(*id)) {
                            let _ = tx.send(h.clone());
                        }
                        let _ = l.outputs.send(o);
                    }
                }
            }
        }
    }

    fn flush_kv(&mut self) {
        let events = self.engine.take_kv_events();
        if !events.is_empty() {
            let _ = self.kv.send(Batch {
                ts: unix_now_s(),
                events,
            });
        }
    }
}
