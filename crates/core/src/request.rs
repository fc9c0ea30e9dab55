//! What a routing call is about: the request as the router sees it, its prefix keys, the decision
//! returned, and what the caller reports back afterwards.

use xxhash_rust::xxh3::xxh3_64_with_seed;

use crate::endpoint::EndpointId;
use crate::keys::{KeyScope, chain_keys};

/// Bytes per approximate block when only text is known. 64: the Gateway API Inference Extension's
/// prefix plugin hashes 64-character chunks, which at ~4 bytes per token is one 16-token vLLM
/// block, so approximate and precise matches count in comparable units.
pub const APPROX_CHUNK_BYTES: usize = 64;

/// Bytes per token assumed when converting text chunks into token blocks. 4 is the usual figure
/// for English under BPE tokenizers of the Llama/GPT families.
pub const APPROX_BYTES_PER_TOKEN: usize = 4;

/// Which phase of a (possibly disaggregated) request this routing call is for.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Phase {
    /// The whole request on one aggregated engine.
    #[default]
    Aggregated,
    /// The prefill leg of a disaggregated request.
    Prefill,
    /// The decode leg of a disaggregated request.
    Decode,
}

/// A prompt's block keys: what the prefix index is queried with.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PromptKeys {
    /// Tokens per block of `keys` (approximately, for a chain over text).
    pub block_size: u32,
    /// The chain of block keys: the router's own chain over the request's token ids
    /// ([`crate::keys`]), or over its text when no tokens are known.
    pub keys: Vec<u64>,
    /// Whether `keys` is over the engines' token ids, so the keys learnt from KV events can
    /// match it; a chain over text matches the router's own past decisions only.
    pub precise: bool,
}

impl PromptKeys {
    /// Keys from the engines' token ids: the router's chain of `block_size`-token blocks in
    /// `scope`, matched against event-learnt entries and the router's own bookings alike.
    pub fn from_tokens(tokens: &[u32], block_size: u32, scope: KeyScope<'_>) -> Self {
        Self {
            block_size,
            keys: chain_keys(tokens, block_size, scope),
            precise: true,
        }
    }

    /// Keys from raw prompt bytes (no tokenizer): chained xxh3 over [`APPROX_CHUNK_BYTES`]-byte
    /// chunks, rooted at `scope` (model and adapter name, so different models never share
    /// entries). Only full chunks are hashed, as engines only cache full blocks. Such a chain
    /// matches the router's own bookings only.
    pub fn approximate(bytes: &[u8], scope: &str) -> Self {
        let mut parent = xxh3_64_with_seed(scope.as_bytes(), 0);
        let keys = bytes
            .chunks_exact(APPROX_CHUNK_BYTES)
            .map(|chunk| {
                parent = xxh3_64_with_seed(chunk, parent);
                parent
            })
            .collect();
        Self {
            block_size: (APPROX_CHUNK_BYTES / APPROX_BYTES_PER_TOKEN) as u32,
            keys,
            precise: false,
        }
    }

    /// Number of full blocks in the prompt.
    pub fn num_blocks(&self) -> usize {
        self.keys.len()
    }
}

/// One request to route.
#[derive(Clone, Debug, PartialEq)]
pub struct RoutingRequest {
    /// Caller's request id; the same id is used in `book`, `on_first_token`, `on_finish`.
    pub id: u64,
    /// Base model name.
    pub model: String,
    /// LoRA adapter, if the request addresses one.
    pub lora: Option<String>,
    /// Prompt length in tokens (estimated if no tokenizer ran).
    pub prompt_tokens: u32,
    /// Prefix keys.
    pub keys: PromptKeys,
    /// Output limit, if given.
    pub max_tokens: Option<u32>,
    /// Priority; `< 0` is sheddable.
    pub priority: i32,
    /// Session (conversation) id, if the client sent one.
    pub session_id: Option<String>,
    /// Restrict the choice to these endpoints (Envoy's subset hint).
    pub subset: Option<Vec<EndpointId>>,
    /// Which leg of the request this is.
    pub phase: Phase,
    /// Ask the pick to explain itself: [`Decision::candidates`] is filled only then, so picks
    /// nobody records cost nothing extra.
    pub explain: bool,
}

impl RoutingRequest {
    /// An aggregated, priority-0 request for `model` with no adapter, session or subset.
    pub fn new(id: u64, model: impl Into<String>, prompt_tokens: u32, keys: PromptKeys) -> Self {
        Self {
            id,
            model: model.into(),
            lora: None,
            prompt_tokens,
            keys,
            max_tokens: None,
            priority: 0,
            session_id: None,
            subset: None,
            phase: Phase::Aggregated,
            explain: false,
        }
    }
}

/// Why the primary endpoint was chosen.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DecisionReason {
    /// The best cost was driven by a cached prefix on the chosen endpoint.
    PrefixHit,
    /// Lowest predicted cost without a prefix hit.
    LeastCost,
    /// The hot-prefix rule sent this request to a non-holder to grow the set of holders.
    HotPrefixSpill,
    /// Highest weighted score (GIE max-score picker).
    MaxScore,
    /// Weighted random draw over scores.
    WeightedRandom,
    /// Uniformly random.
    Random,
    /// Next in rotation.
    RoundRobin,
    /// Fewest requests in flight.
    LeastRequest,
    /// Better of two random candidates.
    PowerOfTwo,
    /// SGLang cache_aware: prefix match above the cache threshold.
    CacheAffinity,
    /// SGLang cache_aware: load imbalanced, shortest queue chosen.
    Balance,
    /// SGLang cache_aware: no good match, endpoint with the smallest approximate tree chosen.
    SmallestCache,
    /// Oracle: lowest true predicted TTFT.
    Oracle,
    /// Only one candidate was eligible.
    OnlyCandidate,
    /// Every eligible endpoint was draining; one of them got the request as a last resort.
    DrainingOnly,
}

impl DecisionReason {
    /// Every reason, for metrics that pre-register their label values.
    pub const ALL: [DecisionReason; 15] = [
        Self::PrefixHit,
        Self::LeastCost,
        Self::HotPrefixSpill,
        Self::MaxScore,
        Self::WeightedRandom,
        Self::Random,
        Self::RoundRobin,
        Self::LeastRequest,
        Self::PowerOfTwo,
        Self::CacheAffinity,
        Self::Balance,
        Self::SmallestCache,
        Self::Oracle,
        Self::OnlyCandidate,
        Self::DrainingOnly,
    ];

    /// Its label in metrics and logs (`snake_case`).
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::PrefixHit => "prefix_hit",
            Self::LeastCost => "least_cost",
            Self::HotPrefixSpill => "hot_prefix_spill",
            Self::MaxScore => "max_score",
            Self::WeightedRandom => "weighted_random",
            Self::Random => "random",
            Self::RoundRobin => "round_robin",
            Self::LeastRequest => "least_request",
            Self::PowerOfTwo => "power_of_two",
            Self::CacheAffinity => "cache_affinity",
            Self::Balance => "balance",
            Self::SmallestCache => "smallest_cache",
            Self::Oracle => "oracle",
            Self::OnlyCandidate => "only_candidate",
            Self::DrainingOnly => "draining_only",
        }
    }
}

impl std::fmt::Display for DecisionReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The answer to [`crate::Router::pick`].
#[derive(Clone, Debug, PartialEq)]
pub struct Decision {
    /// Where to send the request.
    pub primary: EndpointId,
    /// Where to retry, in order, if the primary fails before the first byte.
    pub fallbacks: Vec<EndpointId>,
    /// Why.
    pub reason: DecisionReason,
    /// Prefix blocks the index believes `primary` holds for this request.
    pub matched_blocks: u32,
    /// Of those, the blocks `primary`'s KV events alone account for (whatever its trust), when
    /// the request has a precise chain: the shadow prediction the cache contract checks.
    pub precise_matched_blocks: Option<u32>,
    /// The cost model's predicted time to first token on `primary`, when computed: queue wait
    /// plus own prefill on its learnt coefficients and speed factor, without the KV cliff's
    /// avoidance penalty or tie-breaks (what the prediction-error metric holds against the
    /// measured TTFT).
    pub predicted_ttft_us: Option<u64>,
    /// What booking the request on `primary` adds to the router's accounting, computed by the
    /// pick so that [`crate::Router::book`] neither walks the index nor prices again.
    pub booking: BookingPlan,
    /// Every candidate the pick considered, as it saw them, in address order: filled only when
    /// the request asked ([`RoutingRequest::explain`]), for route receipts.
    pub candidates: Vec<CandidateReport>,
}

/// One candidate of an explained pick: what the router knew of it at the decision instant, each
/// signal with its age, and what it predicted. Prefix matches and the cost are computed for the
/// receipt even when the policy does not use them (a round-robin receipt still shows the prefix
/// it ignored); the cost is kvgate's cost model's, whatever the policy.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct CandidateReport {
    /// The endpoint.
    pub endpoint: EndpointId,
    /// Prefix blocks matched, from the best source the endpoint's index mode allows.
    pub matched_blocks: u32,
    /// Which prefix tracking that match came from (KV events or the router's own bookings).
    pub index_mode: crate::router::IndexMode,
    /// Estimated requests waiting (scraped, plus this router's own dispatches since).
    pub waiting: u32,
    /// Estimated requests running.
    pub running: u32,
    /// Estimated prefill tokens queued ahead of a new request.
    pub queued_prefill_tokens: u64,
    /// Estimated KV-cache use, `[0, ∞)`.
    pub kv_usage: f64,
    /// Age of the scraped metrics sample, µs; `None` if never scraped.
    pub sample_age_us: Option<u64>,
    /// Age of the latest KV event batch, µs; `None` if none arrived.
    pub kv_event_age_us: Option<u64>,
    /// Predicted time to first token there (queue wait plus own prefill, as
    /// [`Decision::predicted_ttft_us`]), µs; the cliff's penalty is in `cost_us`.
    pub predicted_ttft_us: u64,
    /// What kvgate's cost model minimises there, µs.
    pub cost_us: f64,
    /// The policy's weighted score; `None` when a filter dropped the candidate before scoring.
    pub score: Option<f64>,
}

/// What one booking adds to an endpoint's estimate (as Dynamo's selection result carries the
/// blocks a request needs and has cached, for its bookkeeping).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BookingPlan {
    /// The endpoint the plan was made for (the decision's `primary` when the router made it).
    pub endpoint: EndpointId,
    /// Prompt tokens the endpoint will prefill: the prompt minus the prefix it holds (an
    /// offloaded prefix counted at its transfer cost).
    pub uncached_tokens: f64,
    /// Attention pairs of computing them after the prefix the endpoint holds
    /// ([`crate::cost::attention_pairs`]).
    pub attention_pairs: f64,
    /// KV blocks the request takes there: its uncached prompt plus its expected output.
    pub new_kv_blocks: u64,
    /// Prefill tokens the prediction assumed queued ahead of the request there.
    pub queued_prefill_tokens: f64,
    /// Their attention pairs.
    pub queued_prefill_pairs: f64,
    /// Running sequences the prediction assumed there (riding along in every step). With the
    /// queue, what the online fit ([`crate::learn`]) learns from when the request finishes.
    pub running: f64,
}

/// What the caller learnt when a request finished.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Outcome {
    /// Tokens generated.
    pub output_tokens: u32,
    /// Prompt tokens the engine reported (`usage.prompt_tokens`), if it reported usage.
    pub prompt_tokens: Option<u32>,
    /// Prompt tokens served from the engine's prefix cache (`usage.prompt_tokens_details`).
    pub cached_tokens: Option<u32>,
    /// Mean time per output token, µs, if measured.
    pub tpot_us: Option<u64>,
}

/// How a request failed, which decides how long its endpoint is penalised.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FailureKind {
    /// Could not connect.
    Connect,
    /// No response in time.
    Timeout,
    /// The endpoint said it is overloaded (429/503).
    Overloaded,
    /// Any other server-side error (5xx, broken stream).
    ServerError,
    /// The client went away: not the endpoint's fault, no penalty.
    Cancelled,
}

/// True engine state, as only a simulator can know it.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct TrueLoad {
    /// Prefill tokens queued or in progress ahead of a new request.
    pub queued_prefill_tokens: u64,
    /// Their attention pairs: `n·c + n²/2` over what each has left to compute, `c` tokens of
    /// its sequence already in KV ([`crate::cost::attention_pairs`]).
    pub queued_prefill_pairs: u64,
    /// Requests running.
    pub running: u32,
    /// Requests waiting.
    pub waiting: u32,
    /// KV-cache use in `[0, 1]`.
    pub kv_usage: f64,
    /// Tokens of this request's prompt the engine holds in its prefix cache right now.
    pub cached_prefix_tokens: u32,
}

/// Read access to true engine state for the oracle policy (simulation only).
pub trait OracleView {
    /// True state of endpoint `id` as it concerns `req`.
    fn true_load(&self, id: EndpointId, req: &RoutingRequest) -> TrueLoad;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reason_labels_are_distinct_snake_case() {
        let labels: std::collections::BTreeSet<&str> =
            DecisionReason::ALL.iter().map(|r| r.as_str()).collect();
        assert_eq!(labels.len(), DecisionReason::ALL.len());
        assert!(
            labels
                .iter()
                .all(|l| l.chars().all(|c| c.is_ascii_lowercase() || c == '_'))
        );
        assert_eq!(DecisionReason::PrefixHit.to_string(), "prefix_hit");
    }

    #[test]
    fn approximate_keys_chain_and_skip_partial_chunk() {
        let text = vec![b'a'; APPROX_CHUNK_BYTES * 3 + 10];
        let k = PromptKeys::approximate(&text, "m");
        assert_eq!(k.keys.len(), 3);
        assert!(!k.precise);
        assert_ne!(k.keys[0], k.keys[1], "same chunk, different parent");
        let other_scope = PromptKeys::approximate(&text, "m2");
        assert_ne!(k.keys[0], other_scope.keys[0]);
        assert_eq!(k.block_size, 16);
    }

    #[test]
    fn token_keys_are_the_router_chain() {
        let toks: Vec<u32> = (0..10).collect();
        let k = PromptKeys::from_tokens(&toks, 4, KeyScope::default());
        assert_eq!(k.keys, chain_keys(&toks, 4, KeyScope::default()));
        assert!(k.precise);
        assert_eq!(k.num_blocks(), 2);
    }

    #[test]
    fn token_keys_depend_on_prefix() {
        let a = PromptKeys::from_tokens(&[1, 2, 3, 4], 2, KeyScope::default());
        let b = PromptKeys::from_tokens(&[9, 2, 3, 4], 2, KeyScope::default());
        assert_eq!(a.keys.len(), 2);
        assert_ne!(a.keys[1], b.keys[1]);
        assert!(
            PromptKeys::from_tokens(&[1, 2], 0, KeyScope::default())
                .keys
                .is_empty()
        );
    }
}
