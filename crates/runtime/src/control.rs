//! The shared routing state of a data plane: the core [`Router`] behind one lock, the endpoint
//! membership with each endpoint's signal tasks, the task that applies signal observations, and
//! the conversion of an OpenAI request into a [`RoutingRequest`].
//!
//! Reused by the Envoy endpoint picker, so nothing here knows about HTTP proxying.
//!
//! **Locking.** The router is a plain `std::sync::Mutex<Router>` (with the RNG it picks with),
//! never held across an `.await`. Every core call is synchronous and takes microseconds (the
//! prefix lookup is a hash walk over the prompt's blocks; scoring is a loop over endpoints), so a
//! mutex is cheaper than any lock-free scheme would be worth, and it gives what routing needs:
//! `pick` and `book` run under one acquisition, so two concurrent requests always see each
//! other's bookings (the anti-herding rule "count each decision at once"). Tokenising and block
//! hashing, the only per-request work that grows with prompt length, run before the lock is
//! taken. The observation task drains every queued observation under a single acquisition, so a
//! burst of KV events costs one lock round-trip, not one per batch. Membership (address → id,
//! config, signal tasks) lives in a separate `RwLock`, read on every request and written only
//! when endpoints join or leave. In-flight counts and signal ages have one owner, the router
//! (its bookings, its last sample and KV batch per endpoint): gauges, draining and shutdown
//! read them from it rather than from counters kept beside it.
//!
//! **Signals.** Each endpoint gets a `kvgate-signals` metrics scraper and, when configured, a
//! KV-event subscriber (with replay); both send [`Observation`]s to one channel. An endpoint
//! whose signals stop is not removed: the core ages its view (confidence decays with signal
//! age) and failed scrapes are reported to it. Block size and KV capacity come from the engines'
//! `vllm:cache_config_info` (discovery, then every scrape). Prompt keys are the router's own
//! chain over token ids (`kvgate_core::keys`), so no engine hash seed or algorithm is needed.
//! KV events arrive either through a SUB socket the gateway connects per endpoint (engines whose
//! publisher binds) or through one listening SUB socket (`kv_events.listen`) that engines
//! connect to, demultiplexed by topic; both run on one libzmq reactor thread
//! (`kvgate_signals::transport`).
//!
//! **Block size.** Prompt keys are computed for one block size, the engines' (the first size an
//! engine reports; a fleet mixing sizes is warned about, and its other endpoints are matched by
//! the router's own bookings only, since their event keys are chained over different blocks).
//!
//! **Cache contract.** Every finished request's reported `cached_tokens` is checked against the
//! precise prediction (`kvgate_core::contract`); a change of an endpoint's contract state is
//! logged at WARN with the word "mismatch", and counted in metrics.
//!
//! **Membership.** Endpoints are added at once with what the config says, then discovered in the
//! background (`/v1/models`, `/metrics`), retried with backoff until the engine answers; the
//! discovered models and adapters update the endpoint. Removed endpoints are drained (no new
//! requests unless nothing else can serve) and released once their last in-flight request ends.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use crate::tokenize::{ProbeResult, PromptTokenizer};
use kvgate_core::endpoint::{EndpointId, EndpointSpec};
use kvgate_core::request::{Decision, FailureKind, Outcome, PromptKeys, RoutingRequest};
use kvgate_core::{ContractChange, KeyScope, Phase, RouteError, Router, RouterConfig, SeqCheck};
use kvgate_signals::clock::{Clock, MonotonicClock};
use kvgate_signals::discover::{DISCOVER_TIMEOUT_MS, DiscoverError, EndpointFacts, discover};
use kvgate_signals::observation::Observation;
use kvgate_signals::scrape::{ScrapeConfig, ScrapeError, ScrapePace, spawn_paced_scraper};
use kvgate_signals::subscribe::{
    DEFAULT_REPLAY_TIMEOUT_MS, KvListener, KvSubscribeConfig, KvSubscriber, spawn_kv_subscriber,
};
use kvgate_signals::transport::{DEFAULT_MAX_MESSAGE_BYTES, KvTransport};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use tokio::sync::mpsc;
use tokio::task::AbortHandle;

use crate::RuntimeError;
use crate::booking::{Booking, PdBooking};
use crate::config::{DataPlaneConfig, EndpointConfig, PdProtocol, PolicyChoice};
use crate::metrics::{
    DataPlaneMetrics, EndpointLabels, IndexLabels, ModeLabels, ProbeLabels, SignalLabels,
    SpeedLabels, StepTermLabels,
};
use crate::openai::{ApiError, ParsedRequest, Prompt};
use axum::http::StatusCode;

/// Capacity of the observation channel. At a 100 ms scrape interval and a KV batch per engine
/// step (~5-50 ms), 100 engines produce a few thousand observations per second; 8,192 absorbs a
/// stall of the applying task of a second or more before the signal loops block (they then
/// simply wait: observations are never dropped here).
pub const OBSERVATION_CHANNEL_CAPACITY: usize = 8_192;

/// Most observations applied under one lock acquisition, so a flood of events cannot hold the
/// router lock long enough to delay picks (each applies in microseconds: 256 ≈ well under 1 ms).
pub const MAX_OBSERVATIONS_PER_LOCK: usize = 256;

/// First and last delay between discovery attempts of an endpoint that does not answer yet, ms.
/// Doubling from 200 ms finds a starting engine within a fraction of a second of it coming up;
/// the 5 s ceiling bounds the cost of a dead address to one small request per 5 s.
const DISCOVERY_BACKOFF_MIN_MS: u64 = 200;
const DISCOVERY_BACKOFF_MAX_MS: u64 = 5_000;

/// How often each endpoint's tokenizer is probed again after its first probe, ms: ten
/// minutes catches a redeployed engine long before an operator would, for one small request.
const TOKENIZER_PROBE_INTERVAL_MS: u64 = 600_000;

/// How often each discovered endpoint's `/v1/models` is read again, ms: adapters are loaded
/// and unloaded at run time (`/v1/load_lora_adapter`, a LoRA syncer), and an address can come
/// back serving another model; one small request per endpoint every ten seconds.
const MODEL_REFRESH_INTERVAL_MS: u64 = 10_000;

/// How often drained endpoints are checked for their last in-flight request to finish, ms.
const DRAIN_REAP_INTERVAL_MS: u64 = 500;

/// Models and adapters from `/v1/models` alone (entries with a `parent` other than themselves
/// are adapters, as vLLM lists them).
async fn models_only(address: &str) -> Option<EndpointFacts> {
    use http_body_util::{BodyExt, Empty, Limited};
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<Empty<bytes::Bytes>>();
    let uri: hyper::Uri = format!("http://{address}/v1/models").parse().ok()?;
    let fetch = async {
        let resp = client.get(uri).await.ok()?;
        if !resp.status().is_success() {
            return None;
        }
        Limited::new(resp.into_body(), MODELS_BODY_LIMIT_BYTES)
            .collect()
            .await
            .ok()
    };
    let body = tokio::time::timeout(Duration::from_millis(DISCOVER_TIMEOUT_MS), fetch)
        .await
        .ok()??
        .to_bytes();
    let v: serde_json::Value = serde_json::from_slice(&body).ok()?;
    let mut facts = EndpointFacts::default();
    for entry in v.get("data")?.as_array()? {
        let Some(id) = entry.get("id").and_then(serde_json::Value::as_str) else {
            continue;
        };
        match entry.get("parent").and_then(serde_json::Value::as_str) {
            Some(parent) if parent != id => facts.lora_adapters.push(id.to_owned()),
            _ => facts.models.push(id.to_owned()),
        }
    }
    (!facts.models.is_empty()).then_some(facts)
}

/// Names shown in a log line that summarises a model list.
const LOG_LIST_NAMES: usize = 8;

/// The first [`LOG_LIST_NAMES`] names, then how many more (for log lines of bounded size).
fn summarize<'a>(names: impl Iterator<Item = &'a String>) -> String {
    let mut shown = Vec::new();
    let mut rest = 0usize;
    for n in names {
        if shown.len() < LOG_LIST_NAMES {
            shown.push(n.as_str());
        } else {
            rest += 1;
        }
    }
    let mut out = shown.join(", ");
    if rest > 0 {
        out.push_str(&format!(" and {rest} more"));
    }
    out
}

/// Largest `/v1/models` body read: a list with hundreds of adapters is tens of KiB.
const MODELS_BODY_LIMIT_BYTES: usize = 1024 * 1024;

/// One endpoint as the data plane tracks it.
#[derive(Debug)]
pub struct Member {
    /// Router handle: the core assigns it and owns the address ↔ id mapping.
    pub id: EndpointId,
    /// `host:port` (the configured address, shared with every [`Target`] handed out).
    pub address: Arc<str>,
    /// Configuration it was added with.
    pub config: EndpointConfig,
    /// What discovery learnt, once it has.
    pub facts: Option<EndpointFacts>,
    /// Whether it was removed from the config and is finishing in-flight work.
    pub draining: bool,
    tasks: Vec<AbortHandle>,
    /// How often its scraper runs: slowed while its samples hold only this gateway's requests
    /// ([`Router::sample_accounted`]), set in [`Control::apply`].
    scrape_pace: ScrapePace,
    /// Its KV-event subscriber (owns the socket or the listener registration).
    kv: Option<KvSubscriber>,
    /// Block size and hash algorithm its `cache_config_info` last reported (a change is
    /// logged: the engine was reconfigured under the gateway).
    cache_config: Mutex<Option<(Option<u32>, Option<String>)>>,
    /// Whether the missing `prompt_tokens_details` of its responses was already logged.
    warned_no_cached_tokens: std::sync::atomic::AtomicBool,
    /// Whether its last scrape got an answer ([`Reachability`] as a `u8`).
    reachability: std::sync::atomic::AtomicU8,
}

/// What the last scrape of an endpoint says about reaching it. Readiness and the answer to a
/// request nobody reachable can serve are built on it (see [`Control::is_ready`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Reachability {
    /// Not scraped yet.
    Unknown = 0,
    /// The last scrape got an HTTP answer (even an error status: the server is up).
    Reachable = 1,
    /// The last scrape could not connect, or got no answer within its timeout.
    Unreachable = 2,
}

impl Reachability {
    fn from_u8(v: u8) -> Self {
        match v {
            1 => Self::Reachable,
            2 => Self::Unreachable,
            _ => Self::Unknown,
        }
    }
}

impl Member {
    /// What its last scrape said.
    pub fn reachability(&self) -> Reachability {
        Reachability::from_u8(self.reachability.load(Ordering::Relaxed))
    }

    /// Records a scrape result; logs a change to or from unreachable (WARN when lost, so an
    /// operator sees a dead address at once, INFO when back).
    fn note_reachability(&self, now: Reachability, error: Option<&dyn std::fmt::Display>) {
        let before = Reachability::from_u8(self.reachability.swap(now as u8, Ordering::Relaxed));
        match (before, now) {
            (b, Reachability::Unreachable) if b != Reachability::Unreachable => {
                tracing::warn!(
                    endpoint = %self.config.address,
                    error = %error.map(ToString::to_string).unwrap_or_default(),
                    "endpoint unreachable: its /metrics cannot be fetched (requests go to the \
                     others; /ready is 503 while no endpoint is reachable)"
                );
            }
            (Reachability::Unreachable, Reachability::Reachable) => {
                tracing::info!(endpoint = %self.config.address, "endpoint reachable again");
            }
            _ => {}
        }
    }
}

impl Member {
    /// Every base model and adapter it serves (configured and discovered).
    fn spec(&self) -> EndpointSpec {
        let mut models = self.config.models.clone();
        let mut adapters = self.config.lora_adapters.clone();
        if let Some(f) = &self.facts {
            models.extend(f.models.iter().cloned());
            adapters.extend(f.lora_adapters.iter().cloned());
        }
        models.sort();
        models.dedup();
        adapters.sort();
        adapters.dedup();
        EndpointSpec {
            address: self.config.address.clone(),
            models,
            lora_adapters: adapters,
            role: self.config.role,
            // A configured kind wins; else the kind detected from the endpoint's /metrics.
            engine: self
                .config
                .engine
                .or(self.facts.as_ref().and_then(|f| f.engine))
                .unwrap_or_default(),
            hardware_class: self.config.hardware_class.clone(),
            relative_cost: self.config.relative_cost,
        }
    }
}

impl Member {
    /// The next scrape interval after a sample the router did (`accounted`) or did not account
    /// for, or a failed scrape; a change is logged at debug.
    fn pace_scrapes(&self, accounted: bool) {
        if let Some(ms) = self.scrape_pace.after_sample(accounted) {
            tracing::debug!(
                endpoint = %self.address,
                interval_ms = ms,
                accounted,
                "scrape interval changed"
            );
        }
    }

    /// Logs a change of the engine's reported block size or hash algorithm.
    fn note_cache_config(&self, sample: &kvgate_core::MetricsSample) {
        let address = &*self.address;
        if sample.block_size.is_none() && sample.prefix_caching_hash_algo.is_none() {
            return;
        }
        let now = (sample.block_size, sample.prefix_caching_hash_algo.clone());
        let mut seen = self.cache_config.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(before) = seen.as_ref()
            && *before != now
        {
            tracing::warn!(
                endpoint = %address,
                block_size_before = ?before.0,
                block_size = ?now.0,
                hash_algo_before = ?before.1,
                hash_algo = ?now.1,
                "the engine's KV cache configuration changed (vllm:cache_config_info); \
                 prefix keys follow the new block size"
            );
        }
        *seen = Some(now);
    }
}

impl Drop for Member {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
        if let Some(kv) = &self.kv {
            kv.abort();
        }
    }
}

/// The data plane's side of each endpoint (tasks, discovery facts, reachability), keyed by the
/// id the core assigned. The core's router is the one owner of endpoint identity: an address is
/// turned into an id only by [`Router::endpoint_id`], never by a second map here.
#[derive(Debug, Default)]
struct Members {
    by_id: HashMap<EndpointId, Member>,
    /// Every servable `model` value → `None` for a base model, `Some(base)` for an adapter;
    /// rebuilt on membership changes so the request path does one hash lookup.
    served: HashMap<String, Option<String>>,
}

impl Members {
    fn rebuild_served(&mut self) {
        let mut served = HashMap::new();
        for m in self.by_id.values() {
            let spec = m.spec();
            for model in &spec.models {
                served.insert(model.clone(), None);
            }
            if let Some(base) = spec.models.first() {
                for a in &spec.lora_adapters {
                    served
                        .entry(a.clone())
                        .or_insert_with(|| Some(base.clone()));
                }
            }
        }
        self.served = served;
    }
}

struct RouterState {
    router: Router,
    rng: ChaCha8Rng,
}

/// Where to send one attempt of a request.
#[derive(Clone, Debug)]
pub struct Target {
    /// Router handle.
    pub id: EndpointId,
    /// `host:port`.
    pub address: Arc<str>,
}

/// The shared routing state (see the module docs).
pub struct Control {
    state: Mutex<RouterState>,
    members: RwLock<Members>,
    clock: Arc<MonotonicClock>,
    tokenizer: Arc<PromptTokenizer>,
    /// Tokens per block of prompt keys: the engines' (see the module docs).
    block_size: std::sync::atomic::AtomicU32,
    /// Whether an engine has reported its block size yet.
    block_size_learnt: std::sync::atomic::AtomicBool,
    /// Whether engines with different block sizes were warned about.
    block_size_mixed: std::sync::atomic::AtomicBool,
    kv_transport: KvTransport,
    kv_listener: Option<KvListener>,
    objectives: BTreeMap<String, i32>,
    scrape_interval_ms: u64,
    scrape_max_interval_ms: u64,
    scrape_timeout_ms: u64,
    obs_tx: mpsc::Sender<Observation>,
    next_request_id: AtomicU64,
    /// Pooled connections to the engines' `/tokenize` (`--tokenizer engine`).
    tokenize_client: crate::tokenize::TokenizeClient,
    /// Set by [`Control::begin_shutdown`].
    shutting_down: std::sync::atomic::AtomicBool,
    /// The gateway's metrics.
    pub metrics: Arc<DataPlaneMetrics>,
}

impl std::fmt::Debug for Control {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Control").finish_non_exhaustive()
    }
}

/// The host of `host:port` (an IPv6 host in brackets), or the whole text when it has no port
/// (a bare IPv4 or IPv6 address, or a name).
fn host_of(address: &str) -> &str {
    let a = address.trim();
    if let Some(rest) = a.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    match a.rsplit_once(':') {
        Some((host, port)) if !host.contains(':') && port.parse::<u16>().is_ok() => host,
        _ => a,
    }
}

/// [`Control::subset_addresses`] over the endpoints at `known`.
fn expand_subset(hint: &[String], known: &[String]) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for h in hint {
        let h = h.trim();
        if known.iter().any(|k| k == h) {
            out.push(h.to_owned());
            continue;
        }
        let host = host_of(h);
        out.extend(known.iter().filter(|k| host_of(k) == host).cloned());
    }
    out.sort();
    out.dedup();
    out
}

/// Prompt text from which tokenising leaves the runtime's worker ([`Control::tokenize`]): ~8k
/// tokens, a few milliseconds; below it handing the worker's tasks over costs more than it saves.
const OFF_WORKER_TOKENIZE_BYTES: usize = 32 * 1024;

fn router_config(policy: &PolicyChoice) -> Result<RouterConfig, RuntimeError> {
    match policy {
        PolicyChoice::Preset(p) => RouterConfig::for_preset(*p),
        PolicyChoice::Yaml(text) => RouterConfig::from_yaml(text),
    }
    .map_err(RuntimeError::Router)
}

impl Control {
    /// Builds the control state and starts the observation task; endpoints are added with
    /// [`Control::set_endpoints`]. Must be called within a tokio runtime.
    pub fn start(
        cfg: &DataPlaneConfig,
        metrics: Arc<DataPlaneMetrics>,
    ) -> Result<Arc<Self>, RuntimeError> {
        let mut router_cfg = router_config(&cfg.policy)?;
        if let Some(decider) = cfg.pd_decider {
            router_cfg.tuning.pd.decider = decider;
        }
        let router = Router::new(router_cfg).map_err(RuntimeError::Router)?;
        let tokenizer = Arc::new(PromptTokenizer::from_config(cfg)?);
        let (obs_tx, obs_rx) = mpsc::channel(OBSERVATION_CHANNEL_CAPACITY);
        let kv_transport = KvTransport::start(DEFAULT_MAX_MESSAGE_BYTES);
        let kv_listener = match &cfg.kv_events_listen {
            None => None,
            Some(address) => {
                let l = KvListener::bind(&kv_transport, address).map_err(|reason| {
                    RuntimeError::InvalidConfig {
                        field: "kv_events.listen",
                        reason,
                    }
                })?;
                tracing::info!(%address, "listening for KV events (topic kv@<host>:<port>@<model>)");
                Some(l)
            }
        };
        let control = Arc::new(Self {
            state: Mutex::new(RouterState {
                router,
                // Seeded from the OS: replicas of the gateway must not make identical random
                // choices (that would be herding by construction).
                rng: ChaCha8Rng::from_os_rng(),
            }),
            members: RwLock::new(Members::default()),
            clock: Arc::new(MonotonicClock::new()),
            tokenizer,
            block_size: std::sync::atomic::AtomicU32::new(cfg.block_size),
            block_size_learnt: std::sync::atomic::AtomicBool::new(false),
            block_size_mixed: std::sync::atomic::AtomicBool::new(false),
            kv_transport,
            kv_listener,
            objectives: cfg.objectives.clone(),
            scrape_interval_ms: cfg.scrape_interval_ms,
            scrape_max_interval_ms: cfg.scrape_max_interval_ms,
            scrape_timeout_ms: cfg.scrape_timeout_ms,
            obs_tx,
            next_request_id: AtomicU64::new(1),
            tokenize_client: crate::tokenize::tokenize_client(),
            shutting_down: std::sync::atomic::AtomicBool::new(false),
            metrics,
        });
        tokio::spawn(Self::apply_observations(Arc::downgrade(&control), obs_rx));
        tokio::spawn(Self::reap_drained(Arc::downgrade(&control)));
        Ok(control)
    }

    /// Microseconds on the clock shared with the signal loops.
    pub fn now_us(&self) -> u64 {
        self.clock.now_us()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, RouterState> {
        // A panic while holding the lock would be a bug in the core; the state is still the
        // best we have, so keep serving rather than poisoning every later request.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn members_read(&self) -> std::sync::RwLockReadGuard<'_, Members> {
        self.members.read().unwrap_or_else(|p| p.into_inner())
    }

    fn members_write(&self) -> std::sync::RwLockWriteGuard<'_, Members> {
        self.members.write().unwrap_or_else(|p| p.into_inner())
    }

    /// A fresh request id for the core's bookkeeping.
    pub fn next_request_id(&self) -> u64 {
        self.next_request_id.fetch_add(1, Ordering::Relaxed)
    }

    /// Makes the endpoint set equal to `wanted`: new addresses join (and start discovery and
    /// signal tasks), changed ones are updated, missing ones are drained.
    pub fn set_endpoints(self: &Arc<Self>, wanted: &[EndpointConfig]) {
        let now = self.now_us();
        let mut m = self.members_write();
        let mut st = self.lock();
        for cfg in wanted {
            // The router knows every member's address (draining ones too, until reaped).
            let known = st.router.endpoint_id(&cfg.address);
            if let Some(member) = known.and_then(|id| m.by_id.get_mut(&id)) {
                let signals_changed = member.config.kv_events != cfg.kv_events
                    || member.config.kv_replay != cfg.kv_replay
                    || member.config.engine != cfg.engine;
                if member.draining {
                    // Back in the config before it was released: ready again, same id.
                    member.draining = false;
                    member.config = cfg.clone();
                    st.router.add_endpoint(now, member.spec());
                    tracing::info!(endpoint = %cfg.address, "endpoint rejoined");
                } else if member.config != *cfg {
                    member.config = cfg.clone();
                    if let Err(e) = st.router.update_endpoint(member.id, member.spec()) {
                        tracing::warn!(endpoint = %cfg.address, error = %e, "cannot update endpoint");
                    }
                }
                if signals_changed {
                    // The discovery task (last) may still be running; keep it, restart the rest.
                    let discovery = member.tasks.pop();
                    for t in member.tasks.drain(..) {
                        t.abort();
                    }
                    member.scrape_pace = self.scrape_pace();
                    member.tasks = self.spawn_signals(cfg, &member.scrape_pace);
                    member.tasks.extend(discovery);
                    if let Some(old) = member.kv.take() {
                        old.abort();
                    }
                    // Another event source (or engine): the new subscriber's first message
                    // (`KvSubscribed`) makes the router drop what the old one taught and forget
                    // its sequence, after anything the old one still had queued.
                    member.kv = self.spawn_kv(cfg);
                }
                continue;
            }
            let mut member = Member {
                id: EndpointId(0),
                address: Arc::from(cfg.address.as_str()),
                config: cfg.clone(),
                facts: None,
                draining: false,
                tasks: Vec::new(),
                scrape_pace: self.scrape_pace(),
                kv: None,
                cache_config: Mutex::new(None),
                warned_no_cached_tokens: std::sync::atomic::AtomicBool::new(false),
                reachability: std::sync::atomic::AtomicU8::new(Reachability::Unknown as u8),
            };
            member.id = st.router.add_endpoint(now, member.spec());
            member.tasks = self.spawn_signals(cfg, &member.scrape_pace);
            member.kv = self.spawn_kv(cfg);
            member.tasks.push(
                tokio::spawn(Self::discover_loop(
                    Arc::downgrade(self),
                    member.id,
                    cfg.address.clone(),
                ))
                .abort_handle(),
            );
            tracing::info!(endpoint = %cfg.address, id = member.id.0, "endpoint joined");
            m.by_id.insert(member.id, member);
        }
        for member in m.by_id.values_mut() {
            if member.draining || wanted.iter().any(|w| w.address == *member.address) {
                continue;
            }
            member.draining = true;
            if let Err(e) = st.router.drain_endpoint(now, member.id) {
                tracing::warn!(endpoint = %member.address, error = %e, "cannot drain endpoint");
            }
            tracing::info!(endpoint = %member.address, "endpoint draining");
        }
        m.rebuild_served();
    }

    fn scrape_pace(&self) -> ScrapePace {
        ScrapePace::new(self.scrape_interval_ms, self.scrape_max_interval_ms)
    }

    fn spawn_signals(&self, cfg: &EndpointConfig, pace: &ScrapePace) -> Vec<AbortHandle> {
        let clock: Arc<dyn Clock> = self.clock.clone();
        let mut scrape = ScrapeConfig::new(format!("{}/metrics", cfg.base_url()), cfg.engine);
        scrape.timeout_ms = self.scrape_timeout_ms;
        let tasks = vec![
            spawn_paced_scraper(
                scrape,
                pace,
                cfg.address.clone(),
                clock.clone(),
                self.obs_tx.clone(),
            )
            .abort_handle(),
        ];
        tasks
    }

    /// The KV-event subscriber of an endpoint: connected to its own PUB socket, or registered
    /// with the listening socket by its address (the topic names it).
    fn spawn_kv(&self, cfg: &EndpointConfig) -> Option<KvSubscriber> {
        let clock: Arc<dyn Clock> = self.clock.clone();
        match (&cfg.kv_events, &self.kv_listener) {
            (Some(pub_endpoint), _) => {
                let mut kv = KvSubscribeConfig::new(pub_endpoint.clone());
                kv.replay_endpoint = cfg.kv_replay.clone();
                Some(spawn_kv_subscriber(
                    &self.kv_transport,
                    kv,
                    cfg.address.clone(),
                    clock,
                    self.obs_tx.clone(),
                ))
            }
            (None, Some(listener)) => Some(listener.subscribe(
                cfg.address.clone(),
                cfg.kv_replay.clone(),
                DEFAULT_REPLAY_TIMEOUT_MS,
                clock,
                self.obs_tx.clone(),
            )),
            (None, None) => None,
        }
    }

    async fn discover_loop(weak: std::sync::Weak<Self>, id: EndpointId, address: String) {
        let mut delay_ms = DISCOVERY_BACKOFF_MIN_MS;
        loop {
            let result = discover(&format!("http://{address}")).await;
            let Some(control) = weak.upgrade() else {
                return;
            };
            match result {
                Ok(facts) => {
                    let model = control.adopt_facts(id, facts);
                    let tokenizer = Arc::clone(&control.tokenizer);
                    let metrics = Arc::clone(&control.metrics);
                    drop(control);
                    let Some(mut model) = model else { return };
                    // The tokenizer at join, then periodically: an engine can be redeployed
                    // with another model revision under the same address. The model list more
                    // often (see MODEL_REFRESH_INTERVAL_MS). This task ends with the member.
                    let mut first = true;
                    let mut probed_at = tokio::time::Instant::now();
                    loop {
                        if first
                            || probed_at.elapsed()
                                >= Duration::from_millis(TOKENIZER_PROBE_INTERVAL_MS)
                        {
                            Self::probe_tokenizer(&tokenizer, &metrics, &address, &model, first)
                                .await;
                            probed_at = tokio::time::Instant::now();
                            first = false;
                        }
                        tokio::time::sleep(Duration::from_millis(MODEL_REFRESH_INTERVAL_MS)).await;
                        let fresh = models_only(&address).await;
                        let Some(control) = weak.upgrade() else {
                            return;
                        };
                        if let Some(fresh) = fresh
                            && let Some(m) = control.refresh_models(id, fresh)
                        {
                            model = m;
                        }
                    }
                }
                Err(e) => {
                    // An engine whose `/metrics` is broken still serves: take its models from
                    // `/v1/models` alone (block size and capacity then come from later scrapes,
                    // or stay at the defaults) and keep routing to it by signal age.
                    let metrics_broken = matches!(
                        &e,
                        DiscoverError::Metrics(_)
                            | DiscoverError::Fetch {
                                path: "/metrics",
                                ..
                            }
                    );
                    let fallback = if metrics_broken {
                        models_only(&address).await
                    } else {
                        None
                    };
                    if let Some(facts) = fallback {
                        tracing::warn!(endpoint = %address, error = %e, "metrics unavailable; endpoint discovered from /v1/models only");
                        control.adopt_facts(id, facts);
                        return;
                    }
                    tracing::debug!(endpoint = %address, error = %e, "discovery failed; will retry");
                }
            }
            drop(control);
            tokio::time::sleep(Duration::from_millis(delay_ms)).await;
            delay_ms = (delay_ms * 2).min(DISCOVERY_BACKOFF_MAX_MS);
        }
    }

    /// Records what discovery learnt of an endpoint; returns its first model (what the
    /// tokenizer probe asks the engine about).
    fn adopt_facts(&self, id: EndpointId, facts: EndpointFacts) -> Option<String> {
        self.learn_block_size(facts.block_size);
        let mut m = self.members_write();
        let member = m.by_id.get_mut(&id)?;
        member.facts = Some(facts);
        let spec = member.spec();
        let address = Arc::clone(&member.address);
        m.rebuild_served();
        // A summary at INFO: an engine can list thousands of adapters (a 20k-model list made one
        // 1.3 MB line); the full lists are at DEBUG.
        tracing::info!(
            endpoint = %address,
            models = spec.models.len(),
            adapters = spec.lora_adapters.len(),
            listed = %summarize(spec.models.iter().chain(&spec.lora_adapters)),
            "endpoint discovered"
        );
        tracing::debug!(endpoint = %address, models = ?spec.models, adapters = ?spec.lora_adapters, "endpoint's full model list");
        let model = spec.models.first().cloned();
        if let Err(e) = self.lock().router.update_endpoint(id, spec) {
            tracing::warn!(endpoint = %address, error = %e, "cannot update endpoint");
        }
        model
    }

    /// Adopts `fresh`'s models and adapters (a later `/v1/models`) for `id` when they differ
    /// from what it was known to serve; returns its first model then.
    fn refresh_models(&self, id: EndpointId, fresh: EndpointFacts) -> Option<String> {
        let mut m = self.members_write();
        let member = m.by_id.get_mut(&id)?;
        let facts = member.facts.as_mut()?;
        if fresh.models.is_empty()
            || (facts.models == fresh.models && facts.lora_adapters == fresh.lora_adapters)
        {
            return None;
        }
        let (models_before, adapters_before) = (facts.models.len(), facts.lora_adapters.len());
        facts.models = fresh.models;
        facts.lora_adapters = fresh.lora_adapters;
        let spec = member.spec();
        let address = Arc::clone(&member.address);
        m.rebuild_served();
        drop(m);
        tracing::info!(
            endpoint = %address,
            models = spec.models.len(),
            adapters = spec.lora_adapters.len(),
            models_before,
            adapters_before,
            listed = %summarize(spec.models.iter().chain(&spec.lora_adapters)),
            "endpoint's models changed"
        );
        let model = spec.models.first().cloned();
        if let Err(e) = self.lock().router.update_endpoint(id, spec) {
            tracing::warn!(endpoint = %address, error = %e, "cannot update endpoint");
        }
        model
    }

    async fn reap_drained(control: std::sync::Weak<Self>) {
        let mut tick = tokio::time::interval(Duration::from_millis(DRAIN_REAP_INTERVAL_MS));
        loop {
            tick.tick().await;
            let Some(control) = control.upgrade() else {
                return;
            };
            // In-flight counts are the router's (its bookings), not a copy kept here.
            let busy: std::collections::HashSet<EndpointId> = control.with_router(|r| {
                r.endpoints()
                    .filter(|v| v.estimate.own_in_flight > 0)
                    .map(|v| v.id)
                    .collect()
            });
            let mut m = control.members_write();
            let done: Vec<EndpointId> = m
                .by_id
                .values()
                .filter(|mb| mb.draining && !busy.contains(&mb.id))
                .map(|mb| mb.id)
                .collect();
            if done.is_empty() {
                // Nothing left: the model map is as it was (rebuilding it holds every request
                // out for as long, twice a second, with thousands of adapters).
                continue;
            }
            for id in done {
                if let Some(member) = m.by_id.remove(&id) {
                    if let Err(e) = control.lock().router.remove_endpoint(id) {
                        tracing::warn!(endpoint = %member.address, error = %e, "cannot remove endpoint");
                    }
                    control.metrics.forget_endpoint(member.address.as_ref());
                    tracing::info!(endpoint = %member.address, "endpoint removed");
                }
            }
            m.rebuild_served();
        }
    }

    /// Compares the gateway's tokens with the engine's own `/tokenize` (see
    /// [`crate::tokenize`]) and logs the verdict.
    async fn probe_tokenizer(
        tokenizer: &Arc<PromptTokenizer>,
        metrics: &DataPlaneMetrics,
        address: &str,
        model: &str,
        first: bool,
    ) {
        let result = crate::tokenize::probe(tokenizer, address, model).await;
        if let Some(r) = &result {
            let agree = matches!(r, ProbeResult::Agree { .. });
            for (label, on) in [("agree", agree), ("mismatch", !agree)] {
                metrics
                    .tokenizer_probe
                    .get_or_create(&ProbeLabels {
                        endpoint: address.to_owned(),
                        result: label,
                    })
                    .set(i64::from(on));
            }
        }
        match result {
            Some(ProbeResult::Agree { tokens }) if first => {
                tracing::info!(endpoint = %address, tokens, "tokenizer probe: the engine's tokens match the gateway's");
            }
            Some(ProbeResult::Agree { .. }) => {}
            Some(ProbeResult::Mismatch {
                position,
                ours,
                engine,
            }) => tracing::warn!(
                endpoint = %address,
                position,
                gateway_tokens = %ours,
                engine_tokens = %engine,
                ?tokenizer,
                "tokenizer mismatch: the engine tokenises the probe conversation differently from \
                 the gateway, so prefix keys will not match its cache (start the gateway with \
                 --tokenizer <the model's HuggingFace directory>); its conversations stay on \
                 their holders through the gateway's own bookings"
            ),
            None => {
                tracing::debug!(endpoint = %address, "no usable /tokenize; tokenizer not probed")
            }
        }
    }

    /// Adopts the first engine-reported block size for prompt keys (see the module docs); an
    /// engine reporting another one is warned about once.
    fn learn_block_size(&self, block_size: Option<u32>) {
        let Some(bs) = block_size.filter(|b| *b > 0) else {
            return;
        };
        if !self.block_size_learnt.swap(true, Ordering::Relaxed) {
            let configured = self.block_size.swap(bs, Ordering::Relaxed);
            tracing::info!(
                block_size = bs,
                configured,
                "using the engines' KV block size for prompt keys"
            );
        } else if self.block_size.load(Ordering::Relaxed) != bs
            && !self.block_size_mixed.swap(true, Ordering::Relaxed)
        {
            tracing::warn!(
                block_size = bs,
                keyed_with = self.block_size.load(Ordering::Relaxed),
                "engines report different KV block sizes; prompts are keyed with the first, so \
                 engines with another size are tracked from the gateway's own bookings only"
            );
        }
    }

    async fn apply_observations(
        control: std::sync::Weak<Self>,
        mut rx: mpsc::Receiver<Observation>,
    ) {
        let mut batch = Vec::with_capacity(MAX_OBSERVATIONS_PER_LOCK);
        while rx.recv_many(&mut batch, MAX_OBSERVATIONS_PER_LOCK).await > 0 {
            let Some(control) = control.upgrade() else {
                return;
            };
            control.apply(&batch);
            batch.clear();
        }
    }

    /// Applies observations to the router (one lock acquisition for all of them), then notes
    /// what they say about each member (cache configuration, reachability). Observations name
    /// their endpoint by address; the router resolves it (the one owner of endpoint identity),
    /// and those of addresses that are no longer members are dropped.
    pub fn apply(&self, observations: &[Observation]) {
        let now = self.now_us();
        for o in observations {
            if let Observation::Metrics { sample, .. } = o {
                self.learn_block_size(sample.block_size);
            }
        }
        // Each with, for a sample, whether the router accounted for all of it.
        let mut resolved: Vec<(EndpointId, &Observation, bool)> =
            Vec::with_capacity(observations.len());
        let mut st = self.lock();
        for o in observations {
            let Some(id) = st.router.endpoint_id(o.endpoint()) else {
                continue;
            };
            let mut accounted = false;
            match o {
                Observation::Metrics {
                    taken_at_us,
                    sample,
                    ..
                } => {
                    st.router.observe_metrics(id, *taken_at_us, sample);
                    accounted = st.router.sample_accounted(id);
                }
                Observation::ScrapeFailed { at_us, .. } => {
                    st.router.observe_scrape_failure(id, *at_us)
                }
                Observation::KvBatch {
                    received_at_us,
                    batch,
                    ..
                } => {
                    if let SeqCheck::Gap { expected, got } =
                        st.router.observe_kv_batch(id, *received_at_us, batch)
                    {
                        tracing::debug!(endpoint = ?id, expected, got, "KV events lost; approximate until resync");
                    }
                }
                // Lost for good: the core drops the endpoint's precise view and follows the
                // stream afresh from the next batch.
                Observation::KvGap { expected, got, .. } => {
                    tracing::info!(endpoint = ?id, expected, got, "KV events lost for good; the endpoint's precise view is dropped and rebuilt from the next batch");
                    st.router.kv_events_lost(id, now, *got);
                }
                Observation::KvResynced { .. } => st.router.kv_resynced(id, now),
                // A (new) subscriber starts: an earlier source's facts and numbers are void.
                Observation::KvSubscribed { .. } => st.router.kv_publisher_restarted(id, now),
                Observation::KvDisconnected { at_us, .. } => st.router.kv_disconnected(id, *at_us),
                // The engine restarted with an empty cache: the core forgets its blocks and
                // restarts the sequence at 0.
                Observation::KvPublisherRestarted { at_us, .. } => {
                    st.router.kv_publisher_restarted(id, *at_us)
                }
            }
            resolved.push((id, o, accounted));
        }
        // Lock order is members → router: the router lock is released before members are read.
        drop(st);
        let m = self.members_read();
        for (id, o, accounted) in resolved {
            let Some(member) = m.by_id.get(&id) else {
                continue;
            };
            match o {
                Observation::Metrics {
                    sample, body_bytes, ..
                } => {
                    member.note_cache_config(sample);
                    member.note_reachability(Reachability::Reachable, None);
                    member.pace_scrapes(accounted);
                    self.metrics
                        .scrape_body_bytes
                        .get_or_create(&EndpointLabels {
                            endpoint: member.address.to_string(),
                        })
                        .set(i64::try_from(*body_bytes).unwrap_or(i64::MAX));
                }
                Observation::ScrapeFailed { error, .. } => {
                    member.pace_scrapes(false);
                    // Refused, reset or silent: unreachable. Any HTTP answer (an error status, a
                    // page we cannot parse) means the server is up.
                    let silent = matches!(
                        error,
                        ScrapeError::Timeout { .. } | ScrapeError::Transport { .. }
                    );
                    let now = if silent {
                        Reachability::Unreachable
                    } else {
                        Reachability::Reachable
                    };
                    member.note_reachability(now, Some(error));
                }
                _ => {}
            }
        }
    }

    /// Refreshes the per-endpoint gauges (signal ages, in-flight, index sizes) before
    /// `/metrics` renders. All of them are read from the router, which owns them.
    pub fn refresh_gauges(&self) {
        let now = self.now_us();
        struct Gauges {
            endpoint: String,
            metrics_at: Option<u64>,
            kv_at: Option<u64>,
            in_flight: u32,
            mode: Option<&'static str>,
            precise: usize,
            approx: usize,
            step: kvgate_core::cost::HardwarePrior,
            step_observations: u64,
            speed: [f64; 2],
        }
        let views: Vec<Gauges> = self.with_router(|r| {
            r.endpoints()
                .map(|v| Gauges {
                    endpoint: v.address.to_owned(),
                    metrics_at: v.sample_taken_at_us,
                    kv_at: v.last_kv_event_at_us,
                    in_flight: v.estimate.own_in_flight,
                    mode: r.kv_index_mode(v.id).map(|m| m.as_str()),
                    precise: v.precise_blocks,
                    approx: v.approx_blocks,
                    step: v.step_coefficients,
                    step_observations: v.step_observations,
                    speed: [v.prefill_speed, v.decode_speed],
                })
                .collect()
        });
        let mut index = Vec::with_capacity(views.len());
        for g in views {
            for (signal, at) in [("metrics", g.metrics_at), ("kv_events", g.kv_at)] {
                let Some(at) = at else { continue };
                self.metrics
                    .signal_age_seconds
                    .get_or_create(&SignalLabels {
                        endpoint: g.endpoint.clone(),
                        signal,
                    })
                    .set(now.saturating_sub(at) as f64 / 1e6);
            }
            self.metrics
                .in_flight
                .get_or_create(&EndpointLabels {
                    endpoint: g.endpoint.clone(),
                })
                .set(i64::from(g.in_flight));
            for (term, us) in [
                ("step_base", g.step.step_base_us),
                ("prefill_token", g.step.prefill_us_per_token),
                ("decode_sequence", g.step.decode_us_per_token),
                ("attention_pair", g.step.attention_us_per_pair),
            ] {
                self.metrics
                    .step_coefficient_seconds
                    .get_or_create(&StepTermLabels {
                        endpoint: g.endpoint.clone(),
                        term,
                    })
                    .set(us / 1e6);
            }
            self.metrics
                .step_model_observations
                .get_or_create(&EndpointLabels {
                    endpoint: g.endpoint.clone(),
                })
                .set(i64::try_from(g.step_observations).unwrap_or(i64::MAX));
            for (phase, factor) in [("prefill", g.speed[0]), ("decode", g.speed[1])] {
                self.metrics
                    .speed_factor
                    .get_or_create(&SpeedLabels {
                        endpoint: g.endpoint.clone(),
                        phase,
                    })
                    .set(factor);
            }
            if let Some(mode) = g.mode {
                index.push((g.endpoint, mode, g.precise, g.approx));
            }
        }
        for member in self.members_read().by_id.values() {
            self.metrics
                .scrape_interval_seconds
                .get_or_create(&EndpointLabels {
                    endpoint: member.address.to_string(),
                })
                .set(member.scrape_pace.interval_ms() as f64 / 1e3);
        }
        for (endpoint, mode, precise, approx) in index {
            for (source, n) in [("precise", precise), ("approximate", approx)] {
                self.metrics
                    .kv_index_blocks
                    .get_or_create(&IndexLabels {
                        endpoint: endpoint.clone(),
                        source,
                    })
                    .set(i64::try_from(n).unwrap_or(i64::MAX));
            }
            for candidate in ["precise", "approximate"] {
                self.metrics
                    .kv_index_mode
                    .get_or_create(&ModeLabels {
                        endpoint: endpoint.clone(),
                        mode: candidate,
                    })
                    .set(i64::from(candidate == mode));
            }
        }
    }

    /// Whether a request can be routed now (what `/ready` and the picker's gRPC health say):
    /// not shutting down, and some endpoint knows its models, is not draining, and answered
    /// its last scrape. Configured models alone do not make an endpoint ready: an address that
    /// cannot be reached serves nobody.
    pub fn is_ready(&self) -> bool {
        !self.shutting_down.load(Ordering::Acquire) && self.reachable_endpoints() > 0
    }

    /// Marks the data plane as shutting down: [`Control::is_ready`] is false from now on, so
    /// load balancers stop sending new work while in-flight requests finish.
    pub fn begin_shutdown(&self) {
        self.shutting_down.store(true, Ordering::Release);
    }

    /// Requests in flight through this data plane, over every endpoint.
    pub fn in_flight(&self) -> u64 {
        self.with_router(|r| r.in_flight() as u64)
    }

    /// Whether [`Control::begin_shutdown`] was called.
    pub fn is_shutting_down(&self) -> bool {
        self.shutting_down.load(Ordering::Acquire)
    }

    /// Number of endpoints that know their models and are not draining (whether or not they
    /// can be reached: see [`Control::reachable_endpoints`]).
    pub fn ready_endpoints(&self) -> usize {
        self.members_read()
            .by_id
            .values()
            .filter(|m| !m.draining && !m.spec().models.is_empty())
            .count()
    }

    /// Number of endpoints that know their models, are not draining and answered their last
    /// scrape.
    pub fn reachable_endpoints(&self) -> usize {
        self.members_read()
            .by_id
            .values()
            .filter(|m| {
                !m.draining
                    && m.reachability() == Reachability::Reachable
                    && !m.spec().models.is_empty()
            })
            .count()
    }

    /// Addresses of the endpoints (not draining) whose last scrape got no answer, sorted.
    pub fn unreachable_endpoints(&self) -> Vec<String> {
        let mut v: Vec<String> = self
            .members_read()
            .by_id
            .values()
            .filter(|m| !m.draining && m.reachability() == Reachability::Unreachable)
            .map(|m| m.config.address.clone())
            .collect();
        v.sort();
        v
    }

    /// Where a request that is not routed by its prompt goes (no body, or a path that is no
    /// inference API): the endpoints not draining that know their models and answered their
    /// last scrape; if there are none, every endpoint not draining.
    pub fn passthrough_addresses(&self) -> Vec<String> {
        let m = self.members_read();
        let live: Vec<String> = m
            .by_id
            .values()
            .filter(|m| {
                !m.draining
                    && m.reachability() != Reachability::Unreachable
                    && !m.spec().models.is_empty()
            })
            .map(|m| m.config.address.clone())
            .collect();
        if !live.is_empty() {
            return live;
        }
        m.by_id
            .values()
            .filter(|m| !m.draining)
            .map(|m| m.config.address.clone())
            .collect()
    }

    /// The endpoint addresses a subset hint names (`x-gateway-destination-endpoint-subset`):
    /// an entry naming an endpoint's `host:port` names that endpoint; any other entry (a bare
    /// IP, or another port) names every endpoint on its host, as the reference picker matches
    /// pods by IP alone.
    pub fn subset_addresses(&self, hint: &[String]) -> Vec<String> {
        let known: Vec<String> = self
            .members_read()
            .by_id
            .values()
            .map(|m| m.config.address.clone())
            .collect();
        expand_subset(hint, &known)
    }

    /// Base URLs of every endpoint not draining (for `/v1/models` aggregation).
    pub fn endpoint_addresses(&self) -> Vec<String> {
        self.members_read()
            .by_id
            .values()
            .filter(|m| !m.draining)
            .map(|m| m.config.address.clone())
            .collect()
    }

    /// Resolves `model` as sent by a client: `(base model, adapter)`, or `None` if no endpoint
    /// serves it.
    pub fn resolve_model(&self, model: &str) -> Option<(String, Option<String>)> {
        match self.members_read().served.get(model)? {
            None => Some((model.to_owned(), None)),
            Some(base) => Some((base.clone(), Some(model.to_owned()))),
        }
    }

    /// Runs `f` with the router locked (introspection: endpoint views, signal ages).
    pub fn with_router<R>(&self, f: impl FnOnce(&Router) -> R) -> R {
        f(&self.lock().router)
    }

    /// Priority from the objective header value: an integer, or a configured objective name
    /// (unknown names get the default priority 0).
    pub fn priority_of(&self, objective: Option<&str>) -> i32 {
        let Some(o) = objective.map(str::trim).filter(|o| !o.is_empty()) else {
            return 0;
        };
        o.parse::<i32>()
            .ok()
            .or_else(|| self.objectives.get(o).copied())
            .unwrap_or(0)
    }

    /// Token ids of a request's prompt as the engines will see them (see [`crate::tokenize`]);
    /// `None` if they cannot be computed.
    pub fn tokenize(&self, parsed: &ParsedRequest) -> Option<Vec<u32>> {
        // A long prompt takes milliseconds to render and tokenise (tens for an unseen 220 KB
        // one), which on a runtime worker would stall every connection that worker serves
        // (Envoy's health checks of the picker included). The worker hands its other tasks to
        // the runtime for that time (on the multi-thread runtime both binaries run).
        let text_bytes = match &parsed.prompt {
            Prompt::Text(t) => t.len(),
            Prompt::Messages(m) => m.iter().map(|m| m.content.len()).sum(),
            Prompt::Tokens(_) => 0,
        };
        let multi_thread = tokio::runtime::Handle::try_current()
            .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread);
        if text_bytes >= OFF_WORKER_TOKENIZE_BYTES && multi_thread {
            return tokio::task::block_in_place(|| self.tokenizer.tokenize(parsed));
        }
        self.tokenizer.tokenize(parsed)
    }

    /// Whether prompts are tokenised by the engines (`--tokenizer engine`): the data plane
    /// then calls [`Control::engine_tokens`] before [`Control::routing_request`].
    pub fn tokenizes_remotely(&self) -> bool {
        matches!(*self.tokenizer, PromptTokenizer::Engine)
    }

    /// Asks an engine serving the request's model (the members serving it in turn) for the
    /// prompt's tokens; `None` if none answers (the request is then keyed by its text).
    pub async fn engine_tokens(&self, parsed: &ParsedRequest) -> Option<Vec<u32>> {
        if let Prompt::Tokens(t) = &parsed.prompt {
            return Some(t.clone());
        }
        let (model, _) = self.resolve_model(&parsed.model)?;
        let body = crate::tokenize::tokenize_body(parsed, &parsed.model)?;
        // Endpoints whose last scrape got an answer first (one that does not answer would
        // cost every request it is asked for a timeout), the rest only if none did.
        let (mut candidates, unreachable): (Vec<(String, bool)>, Vec<_>) = {
            let m = self.members_read();
            m.by_id
                .values()
                .filter(|mb| !mb.draining && mb.spec().models.contains(&model))
                .map(|mb| {
                    let reachable = mb.reachability() != Reachability::Unreachable;
                    (mb.config.address.clone(), reachable)
                })
                .partition(|(_, reachable)| *reachable)
        };
        if candidates.is_empty() {
            candidates = unreachable;
        }
        if candidates.is_empty() {
            return None;
        }
        let start = self.next_request_id() as usize % candidates.len();
        for i in 0..candidates.len() {
            let (address, _) = &candidates[(start + i) % candidates.len()];
            let tokens =
                crate::tokenize::prompt_tokens(&self.tokenize_client, address, &body).await;
            if tokens.is_some() {
                return tokens;
            }
        }
        None
    }

    /// The answer to a request for a model no endpoint has listed, as both data planes give
    /// it: 503 naming the endpoints that cannot be reached or have not told their models yet
    /// (the model may be one of theirs), else 404 in the OpenAI shape.
    pub fn unknown_model(&self, model: &str) -> ApiError {
        let unknown: Vec<String> = {
            let m = self.members_read();
            let mut v: Vec<String> = m
                .by_id
                .values()
                .filter(|mb| {
                    !mb.draining
                        && (mb.reachability() == Reachability::Unreachable
                            || mb.spec().models.is_empty())
                })
                .map(|mb| mb.config.address.clone())
                .collect();
            v.sort();
            v
        };
        if !unknown.is_empty() {
            return ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                format!(
                    "no reachable endpoint serves the model `{model}`; not reachable or not \
                     discovered yet: {}",
                    unknown.join(", ")
                ),
            );
        }
        if self.ready_endpoints() == 0 {
            return ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "no ready endpoint");
        }
        ApiError {
            status: StatusCode::NOT_FOUND,
            message: format!("The model `{model}` does not exist."),
            param: Some("model"),
        }
    }

    /// Turns a parsed OpenAI request into a routing request: resolves model/adapter, tokenises,
    /// hashes the prompt into vLLM block keys. A model no endpoint serves is answered with
    /// [`Control::unknown_model`].
    pub fn routing_request(
        &self,
        parsed: &ParsedRequest,
        engine_tokens: Option<Vec<u32>>,
        objective: Option<&str>,
        session_id: Option<&str>,
    ) -> Result<RoutingRequest, ApiError> {
        let (model, lora) = self
            .resolve_model(&parsed.model)
            .ok_or_else(|| self.unknown_model(&parsed.model))?;
        let scope = KeyScope {
            lora: lora.as_deref(),
            cache_salt: parsed.cache_salt.as_deref(),
        };
        let (prompt_tokens, keys) = match engine_tokens.or_else(|| self.tokenize(parsed)) {
            Some(tokens) => {
                let bs = self.block_size.load(Ordering::Relaxed);
                (tokens.len(), PromptKeys::from_tokens(&tokens, bs, scope))
            }
            None => {
                let text = match &parsed.prompt {
                    Prompt::Text(t) => t.clone(),
                    Prompt::Messages(m) => m.iter().map(|m| m.content.as_str()).collect(),
                    Prompt::Tokens(_) => String::new(),
                };
                let scope = format!("{model}/{}", lora.as_deref().unwrap_or(""));
                (
                    text.len() / kvgate_core::request::APPROX_BYTES_PER_TOKEN,
                    PromptKeys::approximate(text.as_bytes(), &scope),
                )
            }
        };
        let mut req = RoutingRequest::new(
            self.next_request_id(),
            model,
            u32::try_from(prompt_tokens).unwrap_or(u32::MAX),
            keys,
        );
        req.lora = lora;
        req.max_tokens = parsed.max_tokens;
        req.priority = self.priority_of(objective);
        req.session_id = session_id.map(str::to_owned);
        Ok(req)
    }

    /// The `host:port` of endpoint `id`, if it is still a member (for data planes that answer
    /// with addresses, e.g. the primary and fallbacks of a decision).
    pub fn address_of(&self, id: EndpointId) -> Option<Arc<str>> {
        self.members_read()
            .by_id
            .get(&id)
            .map(|m| Arc::clone(&m.address))
    }

    /// The protocol the gateway speaks to the member at `address` (`h2c://` endpoints:
    /// HTTP/2); HTTP/1.1 for an address that is not a member.
    pub fn upstream_protocol(&self, address: &str) -> crate::config::UpstreamProtocol {
        // Two hash lookups (the router owns address -> id), not a scan of every member: this
        // runs for every upstream request. The router lock is released before members are read.
        let Some(id) = self.with_router(|r| r.endpoint_id(address)) else {
            return Default::default();
        };
        self.members_read()
            .by_id
            .get(&id)
            .map_or_else(Default::default, |m| m.config.protocol)
    }

    /// Router ids of the endpoints at `addresses` (`host:port`); unknown addresses are skipped
    /// (for subset hints, which name endpoints by address).
    pub fn endpoint_ids<'a>(
        &self,
        addresses: impl IntoIterator<Item = &'a str>,
    ) -> Vec<EndpointId> {
        self.with_router(|r| {
            addresses
                .into_iter()
                .filter_map(|a| r.endpoint_id(a))
                .collect()
        })
    }

    fn target(&self, id: EndpointId) -> Option<Target> {
        let address = self.address_of(id)?;
        Some(Target { id, address })
    }

    /// Picks and books at once (one lock acquisition); the returned [`Booking`] reports the
    /// request's life to the core and the metrics. `started` is when the data plane had the
    /// request (TTFT runs from it).
    pub fn pick(
        self: &Arc<Self>,
        req: RoutingRequest,
        started: tokio::time::Instant,
    ) -> Result<Booking, RouteError> {
        let now = self.now_us();
        let decision = {
            let mut st = self.lock();
            let RouterState { router, rng } = &mut *st;
            let d = router.pick(now, &req, rng, None)?;
            router.book(now, &req, &d);
            d
        };
        match self.target(decision.primary) {
            Some(t) => Ok(Booking::new(self.clone(), req, decision, t, started)),
            // Removed between pick and lookup: release the booking and report no endpoint.
            None => {
                self.on_failure(req.id, FailureKind::Cancelled);
                Err(RouteError::NoEndpoints {
                    model: req.model.clone(),
                })
            }
        }
    }

    /// Whether any member is a prefill pod: the data planes then route through
    /// [`Control::pick_pd`].
    pub fn disaggregated(&self) -> bool {
        self.members_read()
            .by_id
            .values()
            .any(|m| !m.draining && m.config.role == kvgate_core::Role::Prefill)
    }

    /// How the member `id` moves a disaggregated request's KV cache, and its bootstrap port
    /// (SGLang prefill pods).
    pub fn pd_protocol_of(&self, id: EndpointId) -> Option<(PdProtocol, Option<u16>)> {
        self.members_read()
            .by_id
            .get(&id)
            .map(|m| (m.config.pd_protocol, m.config.bootstrap_port))
    }

    /// Picks the plan of a request in a disaggregated fleet and books its legs at once (see
    /// [`kvgate_core::pd`]): the decode pod (serving it whole, or its decode leg) and, when
    /// split, the prefill pod under a fresh request id.
    pub fn pick_pd(
        self: &Arc<Self>,
        req: RoutingRequest,
        started: tokio::time::Instant,
    ) -> Result<PdBooking, RouteError> {
        let now = self.now_us();
        let prefill_id = self.next_request_id();
        let (decision, decode_req, prefill_req) = {
            let mut st = self.lock();
            let RouterState { router, rng } = &mut *st;
            let d = router.pick_pd(now, &req, rng, None)?;
            let (decode_req, prefill_req) = if d.is_split() {
                (
                    req.leg(Phase::Decode, req.id),
                    Some(req.leg(Phase::Prefill, prefill_id)),
                )
            } else {
                (req.leg(Phase::Aggregated, req.id), None)
            };
            router.book(now, &decode_req, &d.decode);
            if let (Some(p), Some(pr)) = (&d.prefill, &prefill_req) {
                router.book(now, pr, p);
            }
            (d, decode_req, prefill_req)
        };
        let gone = |this: &Arc<Self>| {
            this.on_failure(decode_req.id, FailureKind::Cancelled);
            if let Some(pr) = &prefill_req {
                this.on_failure(pr.id, FailureKind::Cancelled);
            }
            RouteError::NoEndpoints {
                model: decode_req.model.clone(),
            }
        };
        let Some(decode_target) = self.target(decision.decode.primary) else {
            return Err(gone(self));
        };
        let prefill = match (&decision.prefill, prefill_req.clone()) {
            (Some(p), Some(pr)) => match self.target(p.primary) {
                Some(t) => Some(Booking::new(self.clone(), pr, p.clone(), t, started)),
                None => return Err(gone(self)),
            },
            _ => None,
        };
        let decode = Booking::new(
            self.clone(),
            decode_req,
            decision.decode.clone(),
            decode_target,
            started,
        );
        Ok(PdBooking {
            decode,
            prefill,
            reason: decision.reason,
        })
    }

    /// Books `req` on `endpoint` with the plan the core makes for it there: a fallback after an
    /// earlier attempt failed (under a fresh id), or the same request planned afresh (a decode
    /// leg served whole after its prefill failed).
    pub(crate) fn book_fallback(
        &self,
        req: &RoutingRequest,
        prior: &Decision,
        endpoint: EndpointId,
    ) -> Option<Target> {
        let target = self.target(endpoint)?;
        let now = self.now_us();
        let mut st = self.lock();
        // The fallback's own matches and booking plan, priced by the core (not the primary's).
        let mut d = st.router.decision_for(now, req, endpoint, prior.reason)?;
        if req.phase == kvgate_core::Phase::Decode {
            // A split request's decode leg computes its last prompt token only.
            d.booking.uncached_tokens = 1f64.min(f64::from(req.prompt_tokens));
        }
        st.router.book(now, req, &d);
        Some(target)
    }

    /// Reports the first streamed token of request `req_id`.
    pub(crate) fn on_first_token(&self, req_id: u64) {
        let now = self.now_us();
        self.lock().router.on_first_token(req_id, now);
    }

    /// Reports a finished request, and checks the cache contract with its reported cached
    /// tokens (see the module docs).
    pub(crate) fn on_finish(&self, req_id: u64, outcome: &Outcome) {
        let now = self.now_us();
        let report = self.lock().router.on_finish(req_id, now, outcome);
        let Some(id) = report.endpoint else {
            return;
        };
        let Some(address) = self.address_of(id) else {
            return;
        };
        if report.decode_leg {
            // Its cached tokens include the transferred prompt: no evidence about the index.
            return;
        }
        if outcome.prompt_tokens.is_some()
            && report.reported_cached_tokens.is_none()
            && let Some(member) = self.members_read().by_id.get(&id)
            && !member.warned_no_cached_tokens.swap(true, Ordering::Relaxed)
        {
            tracing::warn!(
                endpoint = %address,
                "the engine's usage has no prompt_tokens_details.cached_tokens (start vLLM with \
                 --enable-prompt-tokens-details): the KV-cache mismatch check cannot run for it"
            );
        }
        if let Some(reported) = report.reported_cached_tokens {
            let labels = EndpointLabels {
                endpoint: address.to_string(),
            };
            self.metrics
                .cached_tokens_predicted
                .get_or_create(&labels)
                .inc_by(u64::from(report.predicted_cached_tokens));
            self.metrics
                .cached_tokens_reported
                .get_or_create(&labels)
                .inc_by(u64::from(reported));
        }
        match report.contract_change {
            Some(ContractChange::Mismatch {
                shortfalls,
                excesses,
                predicted_tokens,
                reported_tokens,
            }) => tracing::warn!(
                endpoint = %address,
                shortfalls,
                excesses,
                window = kvgate_core::contract::WINDOW,
                predicted_tokens,
                reported_tokens,
                "KV cache mismatch: the engine's reported cached tokens disagree with the KV-event \
                 index (different tokenizer or chat template, block size, or another engine's \
                 events?); approximate prefix tracking for this endpoint until they agree"
            ),
            Some(ContractChange::Recovered) => tracing::warn!(
                endpoint = %address,
                "KV cache predictions agree with the engine again; precise prefix tracking resumed"
            ),
            None => {}
        }
    }

    /// Reports a failed attempt (the core penalises the endpoint by `kind`).
    /// Releases request `req_id` with nothing learnt and no fault found (see
    /// [`Router::forget`]).
    pub(crate) fn forget(&self, req_id: u64) {
        let now = self.now_us();
        self.lock().router.forget(req_id, now);
    }

    pub(crate) fn on_failure(&self, req_id: u64, kind: FailureKind) {
        let now = self.now_us();
        self.lock().router.on_failure(req_id, now, kind);
    }
}

#[cfg(test)]
mod log_tests {
    use super::*;

    /// An endpoint that left takes its state gauges with it: frozen, they kept alerts firing
    /// for an address that no longer exists.
    #[tokio::test]
    async fn a_removed_endpoint_leaves_no_state_series() {
        let cfg = DataPlaneConfig::from_yaml(
            "policy: round-robin\nendpoints:\n  - {url: 'http://127.0.0.1:9', models: [m]}\n  - {url: 'http://127.0.0.1:10', models: [m]}\n",
        )
        .unwrap();
        let control =
            Control::start(&cfg, Arc::new(crate::metrics::DataPlaneMetrics::new())).unwrap();
        control.set_endpoints(&cfg.endpoints);
        control.refresh_gauges();
        let page = control.metrics.encode();
        assert!(
            page.contains("in_flight{endpoint=\"127.0.0.1:10\"}"),
            "{page}"
        );
        control.set_endpoints(&cfg.endpoints[..1]);
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            control.refresh_gauges();
            let page = control.metrics.encode();
            if !page.contains("endpoint=\"127.0.0.1:10\"") || std::time::Instant::now() > deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let page = control.metrics.encode();
        for line in page
            .lines()
            .filter(|l| l.contains("endpoint=\"127.0.0.1:10\""))
        {
            assert!(
                ["_total", "_bucket", "_sum", "_count"].iter().any(|s| line
                    .split('{')
                    .next()
                    .unwrap_or("")
                    .ends_with(s)),
                "a state series of the removed endpoint is left: {line}"
            );
        }
        assert!(
            page.contains("in_flight{endpoint=\"127.0.0.1:9\"}"),
            "{page}"
        );
    }

    /// Tokenising a long prompt lets the runtime's other tasks run meanwhile: with one worker
    /// thread, a ticking task advances while a 4 MB prompt is tokenised (it could not before:
    /// the tokenising task held the only worker until it was done).
    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn long_prompts_are_tokenised_off_the_worker() {
        let cfg = DataPlaneConfig::from_yaml(
            "policy: round-robin\nendpoints:\n  - {url: 'http://127.0.0.1:9', models: [m]}\n",
        )
        .unwrap();
        let control =
            Control::start(&cfg, Arc::new(crate::metrics::DataPlaneMetrics::new())).unwrap();
        let ticks = Arc::new(AtomicU64::new(0));
        let t = ticks.clone();
        let ticker = tokio::spawn(async move {
            loop {
                t.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        let words: String = (0..600_000).map(|i| format!("w{} ", i % 9973)).collect();
        let body = serde_json::json!({"model": "m", "prompt": words}).to_string();
        let parsed =
            crate::openai::parse_request(crate::openai::ApiKind::Completions, body.as_bytes())
                .unwrap();
        // On the worker, as a data plane's request task runs (the test's own body does not).
        let t = ticks.clone();
        let (tokens, during) = tokio::spawn(async move {
            let before = t.load(Ordering::Relaxed);
            let tokens = control.tokenize(&parsed).expect("tokens");
            (tokens, t.load(Ordering::Relaxed) - before)
        })
        .await
        .unwrap();
        ticker.abort();
        assert!(tokens.len() > 100_000);
        assert!(
            during > 0,
            "nothing else ran while the prompt was tokenised"
        );
    }

    /// Subset hints name endpoints by `host:port`, or by IP alone as the reference picker
    /// matches them (a bare IP, or a port other than the endpoint's).
    #[test]
    fn subset_hints_match_by_address_else_by_host() {
        let known: Vec<String> = [
            "10.0.0.1:8000",
            "10.0.0.2:8000",
            "127.0.0.1:9",
            "127.0.0.1:10",
            "[::1]:8000",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let v = |hint: &[&str]| {
            let hint: Vec<String> = hint.iter().map(|s| s.to_string()).collect();
            expand_subset(&hint, &known)
        };
        assert_eq!(v(&["127.0.0.1:9"]), ["127.0.0.1:9"]);
        assert_eq!(v(&["10.0.0.2"]), ["10.0.0.2:8000"]);
        assert_eq!(
            v(&["10.0.0.1:9999", " 10.0.0.2:8000"]),
            ["10.0.0.1:8000", "10.0.0.2:8000"]
        );
        assert_eq!(v(&["127.0.0.1"]), ["127.0.0.1:10", "127.0.0.1:9"]);
        assert_eq!(v(&["::1"]), ["[::1]:8000"]);
        assert_eq!(v(&["[::1]:1"]), ["[::1]:8000"]);
        assert!(v(&["10.9.9.9"]).is_empty());
        assert_eq!(host_of("[::1]:8000"), "::1");
        assert_eq!(host_of("pod.ns.svc:8000"), "pod.ns.svc");
        assert_eq!(host_of("10.0.0.7"), "10.0.0.7");
    }

    #[test]
    fn a_20k_model_list_made_a_1_3_mb_info_line() {
        let names: Vec<String> = (0..20_000).map(|i| format!("org/adapter-{i:05}")).collect();
        let line = summarize(names.iter());
        assert!(line.len() < 300, "{} bytes", line.len());
        assert!(line.starts_with("org/adapter-00000, org/adapter-00001"));
        assert!(line.ends_with(" and 19992 more"), "{line}");
        let few: Vec<String> = vec!["a".into(), "b".into()];
        assert_eq!(summarize(few.iter()), "a, b");
    }
}
