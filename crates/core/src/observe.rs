//! Observations: everything the router learns about endpoints arrives as one of these, stamped
//! with the time it describes. Adapters produce them from wire formats; the core never sees wire
//! types.

use crate::endpoint::Tier;

/// One scrape of an endpoint's metrics, normalised across engine kinds.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct MetricsSample {
    /// Requests in the running batch (`vllm:num_requests_running` and equivalents).
    pub running: u32,
    /// Requests queued (`vllm:num_requests_waiting` and equivalents).
    pub waiting: u32,
    /// KV-cache use in `[0, 1]`, if the engine reports it.
    pub kv_usage: Option<f64>,
    /// Tokens per KV block (`vllm:cache_config_info{block_size}`).
    pub block_size: Option<u32>,
    /// The engine's prefix-caching hash algorithm (`cache_config_info{prefix_caching_hash_algo}`):
    /// the router does not need it (it keys by its own chain), but a change means the engine
    /// was reconfigured under it.
    pub prefix_caching_hash_algo: Option<String>,
    /// KV capacity in blocks (`vllm:cache_config_info{num_gpu_blocks}`).
    pub kv_capacity_blocks: Option<u64>,
    /// LoRA adapters in the running batch (newest `vllm:lora_requests_info` series).
    pub running_lora_adapters: Vec<String>,
    /// LoRA adapters waiting to be loaded.
    pub waiting_lora_adapters: Vec<String>,
    /// Maximum adapters loaded at once (`max_lora`).
    pub max_lora: Option<u32>,
    /// Cumulative prefix-cache lookups, in tokens.
    pub prefix_cache_queries_tokens: Option<f64>,
    /// Cumulative prefix-cache hits, in tokens.
    pub prefix_cache_hits_tokens: Option<f64>,
    /// Cumulative requests that got their first token (the count of
    /// `vllm:time_to_first_token_seconds`): with the two prefix-cache counters, how many
    /// uncached tokens the engine computes per request, for every router and client.
    pub first_tokens_total: Option<f64>,
    /// Cumulative preemptions.
    pub preemptions_total: Option<f64>,
    /// Cumulative prompt tokens processed.
    pub prompt_tokens_total: Option<f64>,
    /// Cumulative generated tokens.
    pub generation_tokens_total: Option<f64>,
}

/// A single KV-cache event, as an engine reports it (vLLM's `BlockStored` & co.).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KvEvent {
    /// Blocks became cached, each chained to the previous one (the first to `parent`).
    BlockStored {
        /// 64-bit block keys, in chain order.
        block_hashes: Vec<u64>,
        /// Key of the block before the first one, if any.
        parent: Option<u64>,
        /// Token ids of the stored blocks, concatenated (may be empty if the engine omits them).
        token_ids: Vec<u32>,
        /// Tokens per block.
        block_size: u32,
        /// Adapter whose KV this is.
        lora_name: Option<String>,
        /// Per block, what the engine hashed besides the tokens (vLLM's `extra_keys`); may be
        /// shorter than `block_hashes` (missing entries have none).
        extra_keys: Vec<BlockExtra>,
        /// Where the blocks live.
        tier: Tier,
    },
    /// Blocks were evicted from `tier`.
    BlockRemoved {
        /// 64-bit block keys.
        block_hashes: Vec<u64>,
        /// Where they were evicted from.
        tier: Tier,
    },
    /// The engine dropped its whole cache (reset, restart).
    AllBlocksCleared,
}

/// What an engine folded into one block's hash besides its tokens, as the router needs it.
///
/// vLLM publishes these untagged (`extra_keys`), so the adapter decides what each value is: the
/// cache salt (only ever on a chain's first block) becomes [`BlockExtra::cache_salt`], and
/// anything else (multimodal input hashes, prompt-embedding digests) is folded into
/// [`BlockExtra::opaque`], which makes the block unmatchable by text requests, as it is in the
/// engine.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BlockExtra {
    /// The request's `cache_salt`, on the first block of a chain.
    pub cache_salt: Option<String>,
    /// Fingerprint of every other extra key; 0 when there is none.
    pub opaque: u64,
}

impl BlockExtra {
    /// Reads one block's untagged string extra keys as vLLM publishes them (adapter name, then
    /// the cache salt on a request's first block): the adapter name is dropped (it is in
    /// `lora_name`), a lone remaining string on the first block of a chain (`root_block`) is
    /// the salt, and anything else is opaque.
    pub fn from_untagged(values: &[String], root_block: bool, lora: Option<&str>) -> Self {
        let rest: Vec<&str> = values
            .iter()
            .map(String::as_str)
            .filter(|v| lora != Some(*v))
            .collect();
        match rest.as_slice() {
            [] => Self::default(),
            [salt] if root_block => Self {
                cache_salt: Some((*salt).to_owned()),
                opaque: 0,
            },
            other => Self {
                cache_salt: None,
                opaque: xxhash_rust::xxh3::xxh3_64(other.join("\u{0}").as_bytes()) | 1,
            },
        }
    }
}

/// One published batch of events with its sequence number (consecutive per publisher).
#[derive(Clone, Debug, PartialEq)]
pub struct KvEventBatch {
    /// Publisher sequence number; a jump means lost batches.
    pub seq: u64,
    /// Engine timestamp of the batch, seconds since the Unix epoch.
    pub ts: f64,
    /// The events, in order.
    pub events: Vec<KvEvent>,
    /// Data-parallel rank that produced the batch, if the engine is DP-sharded.
    pub data_parallel_rank: Option<u32>,
}
