//! What the router knows about an endpoint independent of its load.

use serde::{Deserialize, Serialize};

/// Dense handle of an endpoint inside one router; never reused after removal.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct EndpointId(pub u32);

/// What phases of a request an endpoint serves (prefill/decode disaggregation).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Prefill only (a disaggregated prefill pod).
    Prefill,
    /// Decode legs, and whole requests the decider keeps aggregated (a disaggregated decode
    /// pod, which computes a prompt itself when no transfer is asked of it).
    Decode,
    /// Both phases: an ordinary aggregated engine.
    #[default]
    Both,
}

/// Lifecycle of an endpoint as membership sees it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EndpointState {
    /// Takes new requests.
    #[default]
    Ready,
    /// Finishing in-flight work; gets new requests only when nothing else can serve.
    Draining,
    /// Removed; kept only until its bookkeeping is released.
    Gone,
}

/// The kind of model server, which decides metric names and event formats at the edge.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum EngineKind {
    /// vLLM (and vLLM-compatible servers such as `kvgate sim`).
    #[default]
    Vllm,
    /// SGLang.
    Sglang,
    /// TensorRT-LLM's `trtllm-serve`.
    TrtLlm,
    /// llama.cpp's `llama-server`.
    LlamaCpp,
}

/// Storage tier of a cached KV block.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Tier {
    /// GPU memory: a hit costs nothing.
    #[default]
    Gpu,
    /// Host memory (offloaded): a hit costs a transfer.
    Cpu,
    /// Local disk or remote store: a hit costs a slower transfer.
    Disk,
}

/// Static description of an endpoint, given by membership (config file, Kubernetes).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EndpointSpec {
    /// `host:port` of the model server; what the data planes connect to.
    pub address: String,
    /// Base model names served.
    pub models: Vec<String>,
    /// LoRA adapters this endpoint can serve (loaded or loadable).
    pub lora_adapters: Vec<String>,
    /// Phases served.
    pub role: Role,
    /// Server kind.
    pub engine: EngineKind,
    /// Free-form hardware class ("h100", "a100"): endpoints of one class share calibration priors.
    pub hardware_class: String,
    /// Relative cost of a unit of work here (1.0 = reference); a tie-breaker for cheaper pods.
    pub relative_cost: f64,
}

impl EndpointSpec {
    /// An aggregated vLLM endpoint serving `model` at `address`, with defaults for the rest.
    pub fn new(address: impl Into<String>, model: impl Into<String>) -> Self {
        Self {
            address: address.into(),
            models: vec![model.into()],
            lora_adapters: Vec::new(),
            role: Role::Both,
            engine: EngineKind::Vllm,
            hardware_class: String::new(),
            relative_cost: 1.0,
        }
    }
}
