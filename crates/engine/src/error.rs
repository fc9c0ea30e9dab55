//! The engine's typed errors.

use crate::RequestId;

/// Why the engine refused a configuration or a request.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EngineError {
    /// A configuration field is out of range.
    #[error("invalid engine config: {field} {reason}")]
    InvalidConfig {
        /// The offending field.
        field: &'static str,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A hash-algorithm name that vLLM does not offer (or the engine does not model).
    #[error("unknown prefix-caching hash algorithm {name:?} (expected sha256 or sha256_cbor)")]
    UnknownHashAlgo {
        /// The name given.
        name: String,
    },
    /// A KV-load failure policy that vLLM does not offer.
    #[error("unknown kv_load_failure_policy {name:?} (expected fail or recompute)")]
    UnknownLoadFailurePolicy {
        /// The name given.
        name: String,
    },
    /// A request with this id is already waiting, running, loading remote KV, or holding
    /// blocks for a decode engine.
    #[error("request {id} already exists")]
    DuplicateRequest {
        /// The id.
        id: RequestId,
    },
    /// The prompt has no tokens.
    #[error("request {id} has an empty prompt")]
    EmptyPrompt {
        /// The id.
        id: RequestId,
    },
    /// `max_tokens` is zero (vLLM requires at least one output token).
    #[error("request {id} asks for zero output tokens")]
    ZeroMaxTokens {
        /// The id.
        id: RequestId,
    },
    /// Prompt plus output exceed the model's context.
    #[error(
        "request {id}: prompt ({prompt_tokens}) + max_tokens ({max_tokens}) exceeds max_model_len ({max_model_len})"
    )]
    TooLong {
        /// The id.
        id: RequestId,
        /// Prompt length, tokens.
        prompt_tokens: usize,
        /// Requested output tokens.
        max_tokens: u32,
        /// The engine's limit.
        max_model_len: usize,
    },
    /// The request could never fit: at full length it needs more KV blocks than the whole cache,
    /// so it would preempt itself forever.
    #[error("request {id} needs {needed_blocks} KV blocks but the cache has {capacity_blocks}")]
    TooManyBlocks {
        /// The id.
        id: RequestId,
        /// Blocks it needs at its longest.
        needed_blocks: usize,
        /// Usable blocks in the cache.
        capacity_blocks: usize,
    },
    /// The caller's precomputed block hashes do not cover exactly the prompt's full blocks.
    #[error(
        "request {id}: {got} precomputed block hashes given, the prompt has {expected} full blocks"
    )]
    BlockHashCountMismatch {
        /// The id.
        id: RequestId,
        /// Full blocks in the prompt.
        expected: usize,
        /// Hashes given.
        got: usize,
    },
}

impl EngineError {
    /// Whether retrying the same request later (or on another engine) could succeed. Only a
    /// duplicate id is transient (the earlier request will finish); everything else is a property
    /// of the request or config.
    pub fn is_retryable(&self) -> bool {
        matches!(self, Self::DuplicateRequest { .. })
    }
}
