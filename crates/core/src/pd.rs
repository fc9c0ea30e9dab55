//! Prefill/decode disaggregation: for each request, whether to compute its prompt on a prefill
//! pod and send the KV cache to a decode pod, or serve it whole on the decode pod, and on which
//! pods.
//!
//! **Why a decider.** Disaggregation pays when a prompt's prefill, computed on the decode pod,
//! would stall the sequences that pod is decoding (every running sequence waits out the
//! prefill's compute in its steps) by more than the detour costs: the prefill pod's queue, the
//! transfer of the blocks the decode pod lacks, and the decode pod's own queue. llm-d
//! disaggregates whenever more than a fixed number of the prompt's tokens are uncached on the
//! chosen decode pod ([`PdDecider::Threshold`]): blind to both queues, it sends a short prompt
//! through a saturated prefill pool while the decode pod sits idle, and keeps a long prompt on
//! a decode pod with two hundred sequences running when its prefix was cached. kvgate prices
//! both plans with its cost model ([`PdDecider::Cost`], the default) and takes the cheaper,
//! within a margin (below).
//!
//! **The two plans, in µs.** With `D` the decode pod and `P` the prefill pod, each chosen by
//! the phase's profile (prefix index and load estimate, so `D` is the pod whose cache and queue
//! make it best, and `P` likewise among prefill pods), and [`Router::price`] the cost model's
//! view of a pod:
//! - aggregated on `D`: `routing cost on D + interference_weight × (running + waiting on D) ×
//!   own prefill compute on D`, the second term the delay its prefill adds to every sequence
//!   `D` decodes now or will have started decoding while it computes (its queue, and decode
//!   legs waiting for their KV: counting only the running ones kept 5–18% of long prompts whole
//!   on idle-looking decode pods in the DES, each a ~144 ms stall for the legs that then
//!   arrived);
//! - disaggregated: `max(TTFT on P + transfer, queue wait on D) + one decode step on D`, plus
//!   what the plan costs others on `P` (the routing cost's externality and cliff terms there)
//!   and the cliff term on `D`. The transfer is `latency + tokens × kv_bytes_per_token /
//!   bandwidth` over the prompt tokens `D` does not hold, less the last one, which the decode
//!   pod computes itself to produce the first token (vLLM's NixlConnector loads all but the
//!   last prompt token).
//!
//! **The margin.** The split plan is the fleet's design: its operator bought prefill pods so
//! that decode pods decode. So kvgate splits unless serving whole is cheaper by more than
//! [`PdTuning::whole_margin_us`] (25 ms): an idle fleet splits a short prompt (the whole plan
//! is ~10 ms faster on an H100 and costs nothing now, but the decode pod's time is what the
//! next arrivals' decodes need, and the instantaneous cost cannot see them), while a prompt the
//! decode pod already holds, or one that would queue behind a saturated prefill pool, stays
//! whole (tens to hundreds of ms cheaper). With a margin of 0 the decider is the bare cost
//! comparison. With no prefill pod eligible the request is served whole, whatever the decider
//! ([`PdReason::NoPrefillEndpoint`]).
//!
//! **The stall bound (opt-in).** With [`PdTuning::max_decode_stall_us`] set, a request whose
//! prefill would stall the decode pod's sequences for longer (one engine step carrying it) is
//! split whatever the costs, unless the split's TTFT would pass
//! [`PdTuning::max_split_ttft_us`]: a cost in microseconds summed over sequences cannot see an
//! inter-token-latency objective, and an idle-looking decode pod gets the next decode legs
//! during the prefill. It is off by default because it costs capacity (figures on the knob).
//!
//! **One decode pod per request.** The decode pod is picked once, with the decode profile, and
//! both plans use it: its queue and cache decide where the request ends up either way, and
//! picking it twice under two views would let the comparison pick the pod instead of the plan.
//!
//! **Booking.** The decode leg is booked with the request's phase set to [`Phase::Decode`] and
//! computes one prompt token on `D`; it books the transferred blocks as KV there. It teaches
//! `D`'s cost model nothing (its first token waited on `P` and the transfer, and its engine
//! counts the transferred prompt as cached). The prefill leg ([`RoutingRequest::leg`]) books
//! and learns on `P` like any request.

use rand::RngCore;
use serde::{Deserialize, Serialize};

use crate::error::RouteError;
use crate::request::{Decision, OracleView, Phase, RoutingRequest};
use crate::router::{Price, Router};

/// How a disaggregated fleet decides, per request, to split it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PdDecider {
    /// Never split: every request is served whole on a decode (or aggregated) pod.
    Aggregated,
    /// Always split while a prefill pod is eligible.
    Always,
    /// llm-d's `pd-profile-handler`: split when more than [`PdTuning::threshold_tokens`] prompt
    /// tokens are uncached on the chosen decode pod.
    Threshold,
    /// kvgate: the cheaper of the two plans by the cost model (see the module docs).
    #[default]
    Cost,
}

impl PdDecider {
    /// The name used in configuration, metrics and reports.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Aggregated => "aggregated",
            Self::Always => "always",
            Self::Threshold => "threshold",
            Self::Cost => "cost",
        }
    }
}

/// Knobs of the decider and its transfer model. Every default is explained on its field.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PdTuning {
    /// Which decider runs. `cost`.
    pub decider: PdDecider,
    /// [`PdDecider::Threshold`]'s limit of uncached prompt tokens on the decode pod: split at
    /// this many or more, never with 0 (llm-d's `pd-profile-handler` `threshold`). 10, as in
    /// llm-d's published P/D configurations.
    pub threshold_tokens: u32,
    /// KV cache bytes per token moved by a transfer. 131,072: Llama-3.1-8B in bf16 (32 layers ×
    /// 8 KV heads × 128 dims × 2 (K and V) × 2 bytes).
    pub kv_bytes_per_token: u64,
    /// Link bandwidth between prefill and decode pods, bytes/s. 25 GB/s: one 200 Gb/s RDMA NIC,
    /// what NIXL runs over in llm-d's reference deployments.
    pub transfer_bandwidth_bytes_per_s: f64,
    /// Fixed cost of one transfer (handshake, notification, first byte), µs. 2 ms.
    pub transfer_latency_us: u64,
    /// Weight of the delay an aggregated prefill adds to each sequence the decode pod is
    /// decoding, against the request's own TTFT. 1: a microsecond of anyone's latency counts
    /// the same.
    pub interference_weight: f64,
    /// [`PdDecider::Cost`] serves a request whole only when that is cheaper than the split by
    /// more than this, µs (see the module docs). 25 ms: above the fixed price of a split on an
    /// idle H100 fleet (a transfer and a decode step, ~10 ms), far below what a held prefix or
    /// a queued prefill pool saves (tens of ms and up), and ~1% of a 2 s TTFT objective.
    pub whole_margin_us: u64,
    /// [`PdDecider::Cost`] splits a request whose prefill, computed whole on the decode pod,
    /// would stall that pod's decoding sequences longer than this, µs, whatever the costs say,
    /// as long as the split keeps its TTFT within [`PdTuning::max_split_ttft_us`]; 0 turns the
    /// bound off. Off by default, because it costs capacity: in the DES (8 H100s, 2 prefill + 6
    /// decode, 8k-token prompts), 50 ms brought the p99 of the longest inter-token gap from
    /// 144 ms to 5.8 ms at 4–12 req/s, but capacity at TTFT p90 ≤ 2 s and TPOT p99 ≤ 10 ms fell
    /// from 23.1 to 15.4 req/s (the two prefill pods queue). Set it (e.g. 50,000) for an
    /// inter-token-latency objective that TPOT percentiles do not capture.
    pub max_decode_stall_us: u64,
    /// The split's predicted TTFT above which the stall bound no longer forces a split, µs. 2 s:
    /// the TTFT objective kvgate's capacity figures use; past it, a saturated prefill pool costs
    /// more than the stall saves.
    pub max_split_ttft_us: u64,
}

impl Default for PdTuning {
    fn default() -> Self {
        Self {
            decider: PdDecider::Cost,
            threshold_tokens: 10,
            kv_bytes_per_token: 131_072,
            transfer_bandwidth_bytes_per_s: 25e9,
            transfer_latency_us: 2_000,
            interference_weight: 1.0,
            whole_margin_us: 25_000,
            max_decode_stall_us: 0,
            max_split_ttft_us: 2_000_000,
        }
    }
}

impl PdTuning {
    /// Time to move `tokens` tokens' KV from a prefill pod to a decode pod, µs.
    pub fn transfer_us(&self, tokens: u32) -> f64 {
        let bytes = f64::from(tokens) * self.kv_bytes_per_token as f64;
        self.transfer_latency_us as f64 + bytes / self.transfer_bandwidth_bytes_per_s.max(1.0) * 1e6
    }
}

/// Why a request was split or kept whole.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PdReason {
    /// No prefill pod was eligible: served whole on the decode pod.
    NoPrefillEndpoint,
    /// Only penalised or draining prefill pods were left, or the prefill pool was saturated
    /// for a sheddable request: served whole on the decode pod.
    PrefillUnavailable,
    /// The decider is [`PdDecider::Aggregated`].
    NeverSplit,
    /// The prefill profile chose the decode pod itself (an aggregated pod serves both legs).
    SamePod,
    /// The decider is [`PdDecider::Always`].
    AlwaysSplit,
    /// Few enough tokens uncached on the decode pod ([`PdDecider::Threshold`]).
    BelowThreshold,
    /// More tokens uncached on the decode pod than the threshold.
    AboveThreshold,
    /// The cost model found serving it whole cheaper by more than the margin.
    AggregatedCheaper,
    /// The cost model found the split cheaper.
    SplitCheaper,
    /// Serving it whole is cheaper, but by less than the margin: split, as the fleet is built.
    WithinMargin,
    /// Serving it whole would stall the decode pod's sequences past the bound: split.
    AvoidsStall,
}

impl PdReason {
    /// Label for metrics and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::NoPrefillEndpoint => "no_prefill_endpoint",
            Self::PrefillUnavailable => "prefill_unavailable",
            Self::NeverSplit => "never_split",
            Self::SamePod => "same_pod",
            Self::AlwaysSplit => "always_split",
            Self::BelowThreshold => "below_threshold",
            Self::AboveThreshold => "above_threshold",
            Self::AggregatedCheaper => "aggregated_cheaper",
            Self::SplitCheaper => "split_cheaper",
            Self::WithinMargin => "within_margin",
            Self::AvoidsStall => "avoids_stall",
        }
    }
}

/// What one plan is predicted to cost.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct PlanEstimate {
    /// Predicted time to first token, µs.
    pub ttft_us: f64,
    /// What the decider compares, µs (see the module docs).
    pub cost_us: f64,
}

/// The decider's answer for one request.
#[derive(Clone, Debug, PartialEq)]
pub struct PdDecision {
    /// The decode pod: where the request is served whole, or its decode leg when split. When
    /// split, its booking plan computes one prompt token and its `predicted_ttft_us` is the
    /// split plan's.
    pub decode: Decision,
    /// The prefill pod's decision when the request is split.
    pub prefill: Option<Decision>,
    /// Why.
    pub reason: PdReason,
    /// The whole-request plan on the decode pod.
    pub aggregated: PlanEstimate,
    /// The split plan, when a prefill pod was priced.
    pub split: Option<PlanEstimate>,
    /// Prompt tokens the split plan transfers (those the decode pod lacks, less the last).
    pub transfer_tokens: u32,
    /// Predicted transfer time of the split plan, µs.
    pub transfer_us: f64,
}

impl PdDecision {
    /// Whether the request is split.
    pub fn is_split(&self) -> bool {
        self.prefill.is_some()
    }
}

impl RoutingRequest {
    /// The same request as the leg `phase` under request id `id` (each leg is booked under its
    /// own id). A prefill leg generates one token, so it books (and is priced with) the KV of
    /// its prompt and that token only.
    pub fn leg(&self, phase: Phase, id: u64) -> Self {
        Self {
            id,
            phase,
            max_tokens: if phase == Phase::Prefill {
                Some(1)
            } else {
                self.max_tokens
            },
            ..self.clone()
        }
    }
}

impl Router {
    /// Decides where `req` goes in a fleet with prefill and decode pods (`req.phase` is
    /// ignored): the decode pod by the decode profile, then, unless the decider keeps it whole,
    /// a prefill pod by the prefill profile (see the module docs). No side effects: book the
    /// decode decision with `req.leg(Phase::Decode, ..)` when split (or `Phase::Aggregated`
    /// when not), and the prefill decision with a prefill leg under its own id.
    pub fn pick_pd(
        &self,
        now_us: u64,
        req: &RoutingRequest,
        rng: &mut dyn RngCore,
        oracle: Option<&dyn OracleView>,
    ) -> Result<PdDecision, RouteError> {
        let pd = self.tuning().pd;
        let decode_req = req.leg(Phase::Decode, req.id);
        let decode = self.pick(now_us, &decode_req, rng, oracle)?;
        let d = self
            .price(now_us, &decode_req, decode.primary)
            .ok_or_else(|| RouteError::NoEndpoints {
                model: req.model.clone(),
            })?;
        let aggregated = PlanEstimate {
            ttft_us: d.cost.queue_wait_us + d.cost.prefill_us,
            cost_us: d.cost.routing_cost_us
                + pd.interference_weight * f64::from(d.running + d.waiting) * d.interference_us,
        };
        let whole = |reason| PdDecision {
            decode: decode.clone(),
            prefill: None,
            reason,
            aggregated,
            split: None,
            transfer_tokens: 0,
            transfer_us: 0.0,
        };
        if pd.decider == PdDecider::Aggregated {
            return Ok(whole(PdReason::NeverSplit));
        }
        let prefill_req = req.leg(Phase::Prefill, req.id);
        let prefill = match self.pick(now_us, &prefill_req, rng, oracle) {
            Ok(p) => p,
            Err(RouteError::NoEndpoints { .. } | RouteError::UnknownModel { .. }) => {
                return Ok(whole(PdReason::NoPrefillEndpoint));
            }
            // A saturated prefill pool sheds nothing the decode pod can serve whole.
            Err(RouteError::Shed { .. }) => return Ok(whole(PdReason::PrefillUnavailable)),
            Err(e) => return Err(e),
        };
        // Only last resorts left (penalised, draining): every split would wait out a failure.
        if !self.is_available(prefill.primary, now_us) {
            return Ok(whole(PdReason::PrefillUnavailable));
        }
        if prefill.primary == decode.primary {
            // An aggregated pod chosen for both legs: a transfer to itself gains nothing.
            return Ok(whole(PdReason::SamePod));
        }
        let Some(p) = self.price(now_us, &prefill_req, prefill.primary) else {
            return Ok(whole(PdReason::NoPrefillEndpoint));
        };
        // Profiles that do not price (llm-d's, round-robin) leave no prediction; the prefill
        // leg's is the cost model's, which a data plane that cannot watch the leg times it by.
        let mut prefill = prefill;
        prefill
            .predicted_ttft_us
            .get_or_insert((p.cost.queue_wait_us + p.cost.prefill_us) as u64);
        let held = (d.matched_blocks.saturating_mul(req.keys.block_size)).min(req.prompt_tokens);
        let transfer_tokens = req.prompt_tokens.saturating_sub(held).saturating_sub(1);
        let transfer_us = pd.transfer_us(transfer_tokens);
        let split = split_plan(&p, &d, transfer_us);
        let (is_split, reason) = match pd.decider {
            PdDecider::Aggregated => unreachable!("returned above"),
            PdDecider::Always => (true, PdReason::AlwaysSplit),
            // llm-d: no split below the threshold, and none at all with a threshold of 0.
            PdDecider::Threshold
                if pd.threshold_tokens > 0
                    && d.uncached_tokens >= f64::from(pd.threshold_tokens) =>
            {
                (true, PdReason::AboveThreshold)
            }
            PdDecider::Threshold => (false, PdReason::BelowThreshold),
            PdDecider::Cost if split.cost_us < aggregated.cost_us => (true, PdReason::SplitCheaper),
            PdDecider::Cost
                if pd.max_decode_stall_us > 0
                    && d.stall_us > pd.max_decode_stall_us as f64
                    && split.ttft_us <= pd.max_split_ttft_us as f64 =>
            {
                (true, PdReason::AvoidsStall)
            }
            PdDecider::Cost if split.cost_us <= aggregated.cost_us + pd.whole_margin_us as f64 => {
                (true, PdReason::WithinMargin)
            }
            PdDecider::Cost => (false, PdReason::AggregatedCheaper),
        };
        let mut out = whole(reason);
        out.split = Some(split);
        out.transfer_tokens = transfer_tokens;
        out.transfer_us = transfer_us;
        if is_split {
            // The decode pod computes the last prompt token only; its KV holds the whole prompt.
            let last = 1f64.min(f64::from(req.prompt_tokens));
            out.decode.booking.uncached_tokens = last;
            out.decode.booking.attention_pairs =
                crate::cost::attention_pairs(f64::from(req.prompt_tokens) - last, last);
            out.decode.predicted_ttft_us = Some(split.ttft_us as u64);
            out.prefill = Some(prefill);
        }
        Ok(out)
    }
}

/// The split plan's prediction from the prefill pod's and the decode pod's prices.
fn split_plan(p: &Price, d: &Price, transfer_us: f64) -> PlanEstimate {
    let prefill_ttft = p.cost.queue_wait_us + p.cost.prefill_us;
    let ttft_us = (prefill_ttft + transfer_us).max(d.cost.queue_wait_us) + d.decode_step_us;
    // What the prefill costs others on P (externality, cliff, tie-break), and D's cliff.
    let on_prefill_pod = (p.cost.routing_cost_us - prefill_ttft).max(0.0);
    PlanEstimate {
        ttft_us,
        cost_us: ttft_us + on_prefill_pod + d.cost.cliff_penalty_us,
    }
}
