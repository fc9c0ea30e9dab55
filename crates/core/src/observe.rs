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
