//! Prefill/decode disaggregation types: the transfer-time model, the load-failure policy and the
//! records the engine hands its caller when blocks are held for, or loaded from, another engine.
//!
//! They follow vLLM's NixlConnector (`vllm/distributed/kv_transfer/kv_connector/v1/nixl/`): the
//! prefill engine keeps a finished request's blocks until the decode engine has read them or
//! `VLLM_NIXL_ABORT_REQUEST_TIMEOUT` passes; the decode engine allocates blocks for the remote
//! part of the prompt and parks the request until the read completes. Moving bytes is the
//! caller's business (a socket in the simulator, a scheduled event in the benchmark); the engine
//! only says how long it takes ([`KvTransferConfig::transfer_us`]) and what to move.

use std::str::FromStr;

use crate::{EngineError, RequestId};

/// What a decode engine does when loading a request's KV from the prefill engine fails
/// (vLLM `--kv-transfer-config '{"kv_load_failure_policy": ...}'`, `vllm/config/kv_transfer.py`).
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "snake_case")]
pub enum KvLoadFailurePolicy {
    /// vLLM's default: the request finishes at once with [`crate::FinishReason::Error`].
    #[default]
    Fail,
    /// The loaded blocks are dropped and the request is prefilled locally (from its local cache
    /// hit, if any), as a request that never had remote KV.
    Recompute,
}

impl KvLoadFailurePolicy {
    /// Every policy, in declaration order.
    pub const ALL: [KvLoadFailurePolicy; 2] =
        [KvLoadFailurePolicy::Fail, KvLoadFailurePolicy::Recompute];

    /// vLLM's name for it.
    pub fn as_str(self) -> &'static str {
        match self {
            KvLoadFailurePolicy::Fail => "fail",
            KvLoadFailurePolicy::Recompute => "recompute",
        }
    }
}

impl std::fmt::Display for KvLoadFailurePolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for KvLoadFailurePolicy {
    type Err = EngineError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|p| p.as_str() == s)
            .ok_or_else(|| EngineError::UnknownLoadFailurePolicy { name: s.to_owned() })
    }
}

/// KV bytes per token of Llama-3.1-8B in bf16: 32 layers × 8 KV heads × 128 dims × 2 (K and V)
/// × 2 bytes = 128 KiB.
pub const LLAMA31_8B_KV_BYTES_PER_TOKEN: u64 = 131_072;

/// Default link bandwidth, bytes per second: one 400 Gb/s RDMA NIC per GPU (a DGX H100 has a
/// ConnectX-7 per GPU), 50 GB/s at line rate. NIXL reads whole blocks (2 MiB each for Llama-3.1-8B
/// at 16 tokens), large enough to run near line rate. An assumption, not a measurement: set it
/// from your fabric.
pub const DEFAULT_LINK_BANDWIDTH_BYTES_PER_S: f64 = 50e9;

/// Default fixed cost of one transfer, microseconds: posting the RDMA reads, waiting for their
/// completion and the notification that lets the prefill engine free its blocks. Round trips on
/// such fabrics are a few microseconds; the engine loops that post and poll add the rest. An
/// assumption, not a measurement.
pub const DEFAULT_LINK_LATENCY_US: u64 = 200;

/// vLLM's `VLLM_NIXL_ABORT_REQUEST_TIMEOUT` default (480 s): how long a prefill engine keeps a
/// finished request's blocks for a decode engine that never reads them.
pub const DEFAULT_ABORT_REQUEST_TIMEOUT_US: u64 = 480_000_000;

/// How KV moves between a prefill and a decode engine.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct KvTransferConfig {
    /// KV-cache bytes of one token (all layers, K and V).
    pub kv_bytes_per_token: u64,
    /// Link bandwidth between the two engines, bytes per second.
    pub link_bandwidth_bytes_per_s: f64,
    /// Fixed cost of one transfer, microseconds.
    pub link_latency_us: u64,
    /// How long a prefill engine holds blocks nobody reads, microseconds.
    pub abort_request_timeout_us: u64,
    /// What the decode engine does when a load fails.
    pub kv_load_failure_policy: KvLoadFailurePolicy,
}

impl Default for KvTransferConfig {
    fn default() -> Self {
        Self {
            kv_bytes_per_token: LLAMA31_8B_KV_BYTES_PER_TOKEN,
            link_bandwidth_bytes_per_s: DEFAULT_LINK_BANDWIDTH_BYTES_PER_S,
            link_latency_us: DEFAULT_LINK_LATENCY_US,
            abort_request_timeout_us: DEFAULT_ABORT_REQUEST_TIMEOUT_US,
            kv_load_failure_policy: KvLoadFailurePolicy::Fail,
        }
    }
}

impl KvTransferConfig {
    /// Bytes of KV for `tokens` tokens.
    pub fn transfer_bytes(&self, tokens: u64) -> u64 {
        tokens.saturating_mul(self.kv_bytes_per_token)
    }

    /// Time to move the KV of `tokens` tokens: latency plus bytes over bandwidth, rounded up to
    /// whole microseconds.
    pub fn transfer_us(&self, tokens: u64) -> u64 {
        let wire_us = self.transfer_bytes(tokens) as f64 * 1e6 / self.link_bandwidth_bytes_per_s;
        // `as` saturates; validate() keeps the bandwidth positive and finite.
        self.link_latency_us.saturating_add(wire_us.ceil() as u64)
    }

    pub(crate) fn validate(&self) -> Result<(), EngineError> {
        let bw = self.link_bandwidth_bytes_per_s;
        if !bw.is_finite() || bw <= 0.0 {
            return Err(EngineError::InvalidConfig {
                field: "kv_transfer.link_bandwidth_bytes_per_s",
                reason: "must be finite and positive",
            });
        }
        Ok(())
    }
}

/// A finished remote-decode request's blocks, held on the prefill engine for the decode engine
/// to read (what vLLM's `request_finished` returns as `remote_block_ids`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KvHold {
    /// The prefill-side request.
    pub id: RequestId,
    /// The request's blocks in this engine, in token order (the last may be partial).
    pub block_ids: Vec<u32>,
    /// Tokens whose KV the blocks hold (the prompt).
    pub num_tokens: u32,
    /// When the engine frees them unread.
    pub expires_at_us: u64,
}

/// A remote-prefill request whose blocks were just allocated on the decode engine: the caller
/// pulls `load_tokens` tokens of KV now and reports [`crate::Engine::remote_kv_ready`] or
/// [`crate::Engine::remote_kv_failed`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KvLoad {
    /// The decode-side request.
    pub id: RequestId,
    /// When the blocks were allocated (the transfer can start then).
    pub at_us: u64,
    /// Leading prompt tokens found in this engine's own prefix cache (not transferred).
    pub local_cached_tokens: u32,
    /// Prompt tokens to transfer (all the rest of the prompt).
    pub load_tokens: u32,
    /// Local blocks the transferred KV lands in, in token order.
    pub block_ids: Vec<u32>,
}
