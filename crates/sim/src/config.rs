//! Fleet configuration: command-line flags and the optional YAML file, parsed raw, then validated
//! into a typed [`FleetConfig`] (ripgrep's low-args/high-args split).
//!
//! Precedence: flags set the fleet-wide defaults; entry `i` of the YAML file's `engines:` list
//! overrides them for engine `i` only (GPU preset, step coefficients, KV size, faults). An
//! entry's `faults:` map replaces the flag-given faults of that engine as a whole (fields it
//! omits are off), so a per-engine fault profile never inherits surprises from the flags.

use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;
use std::sync::Arc;

use kvgate_engine::{EngineConfig, StepModel};
use kvgate_tokens::{HfTokenizer, Tokenizer};
use serde::Deserialize;

use crate::SimError;
use crate::fault::FaultConfig;

/// Model name served when none is given: the model the default step coefficients were fitted on.
pub const DEFAULT_MODEL: &str = "meta-llama/Llama-3.1-8B-Instruct";

/// Batches each engine keeps for ZMQ replay. vLLM keeps 10,000 steps; a simulated fleet runs up
/// to dozens of engines in one process, and a batch with a long prompt's `BlockStored` is several
/// KiB, so 2,048 (about 10 s of back-to-back steps at H100 speed) bounds memory at a few MiB per
/// engine while still covering any realistic subscriber reconnect.
pub const DEFAULT_REPLAY_BUFFER_BATCHES: usize = 2_048;

/// GPU preset for an engine's step-time coefficients and KV-cache size.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum GpuPreset {
    /// H100 80GB, Llama-3.1-8B, TP1.
    H100,
    /// A100 80GB, Llama-3.1-8B, TP1.
    A100,
}

impl GpuPreset {
    /// The engine configuration of this preset.
    pub fn engine_config(self) -> EngineConfig {
        match self {
            GpuPreset::H100 => EngineConfig::h100(),
            GpuPreset::A100 => EngineConfig::a100(),
        }
    }
}

/// Which msgpack shape KV-event batches are written in (both exist in deployed vLLM versions).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum KvEncoding {
    /// `[ts, [events], dp_rank]` with events `["BlockStored", field, ...]` (older vLLM, SGLang).
    #[default]
    Array,
    /// `{ts, events, data_parallel_rank}` with events `{"type": "BlockStored", ...}` (newer vLLM).
    Map,
}

/// One simulated engine: its engine-model configuration and injected faults.
#[derive(Clone, Debug, Default)]
pub struct EngineSpec {
    /// Engine model configuration (block size, KV size, batching limits, step model, hash seed).
    pub engine: EngineConfig,
    /// Faults this engine injects.
    pub faults: FaultConfig,
}

/// A whole simulated fleet; buildable in code (tests, the benchmark) or from [`SimArgs`].
#[derive(Clone, Debug)]
pub struct FleetConfig {
    /// One entry per engine.
    pub engines: Vec<EngineSpec>,
    /// Base model name served by every engine.
    pub model: String,
    /// LoRA adapter names every engine serves besides the base model.
    pub lora_adapters: Vec<String>,
    /// Address every socket binds to.
    pub host: IpAddr,
    /// First HTTP port (engine `i` uses `http_port + i`); 0 = ephemeral ports for all.
    pub http_port: u16,
    /// First ZMQ PUB port (engine `i` uses `zmq_port + i`, its replay ROUTER
    /// `zmq_port + n + i`); 0 = ephemeral ports for all.
    pub zmq_port: u16,
    /// Simulated time runs this many times faster than real time.
    pub time_scale: f64,
    /// KV-event msgpack encoding.
    pub kv_encoding: KvEncoding,
    /// Batches kept per engine for replay.
    pub replay_buffer_batches: usize,
    /// Tokenizer shared by all engines (built-in by default).
    pub tokenizer: Arc<Tokenizer>,
    /// Seed of the fault-injection draws (error rate, KV drop rate).
    pub fault_seed: u64,
}

impl Default for FleetConfig {
    fn default() -> Self {
        Self {
            engines: vec![EngineSpec::default()],
            model: DEFAULT_MODEL.to_owned(),
            lora_adapters: Vec::new(),
            host: IpAddr::V4(Ipv4Addr::LOCALHOST),
            http_port: 0,
            zmq_port: 0,
            time_scale: 1.0,
            kv_encoding: KvEncoding::Array,
            replay_buffer_batches: DEFAULT_REPLAY_BUFFER_BATCHES,
            tokenizer: Arc::new(Tokenizer::default()),
            fault_seed: 0,
        }
    }
}

impl FleetConfig {
    /// `n` identical engines with `engine` configuration and no faults, on ephemeral ports.
    pub fn homogeneous(n: usize, engine: EngineConfig) -> Self {
        Self {
            engines: vec![
                EngineSpec {
                    engine,
                    faults: FaultConfig::default(),
                };
                n
            ],
            ..Self::default()
        }
    }

    /// Checks everything that would otherwise fail later, inside a running fleet.
    pub fn validate(&self) -> Result<(), SimError> {
        if self.engines.is_empty() {
            return Err(SimError::InvalidConfig {
                field: "engines",
                reason: "at least one engine is required".into(),
            });
        }
        if !(self.time_scale.is_finite() && self.time_scale > 0.0) {
            return Err(SimError::InvalidConfig {
                field: "time_scale",
                reason: format!("must be a positive finite number, got {}", self.time_scale),
            });
        }
        if self.replay_buffer_batches == 0 {
            return Err(SimError::InvalidConfig {
                field: "replay_buffer_batches",
                reason: "must be positive".into(),
            });
        }
        if self.model.is_empty() {
            return Err(SimError::InvalidConfig {
                field: "model",
                reason: "must not be empty".into(),
            });
        }
        if let Some(a) = self
            .lora_adapters
            .iter()
            .find(|a| a.is_empty() || **a == self.model)
        {
            return Err(SimError::InvalidConfig {
                field: "lora_adapters",
                reason: format!("adapter name {a:?} is empty or equals the base model"),
            });
        }
        let n = self.engines.len();
        for (base, what) in [(self.http_port, "http_port"), (self.zmq_port, "zmq_port")] {
            let span = if what == "zmq_port" { 2 * n } else { n };
            if base != 0 && usize::from(base) + span - 1 > usize::from(u16::MAX) {
                return Err(SimError::InvalidConfig {
                    field: what,
                    reason: format!("{base} + {span} ports runs past 65535"),
                });
            }
        }
        for (i, e) in self.engines.iter().enumerate() {
            e.engine
                .validate()
                .map_err(|source| SimError::InvalidEngineConfig { index: i, source })?;
            e.faults
                .validate()
                .map_err(|reason| SimError::InvalidConfig {
                    field: "faults",
                    reason: format!("engine {i}: {reason}"),
                })?;
        }
        Ok(())
    }
}

/// Flags of `kvgate sim`.
#[derive(Clone, Debug, clap::Args)]
pub struct SimArgs {
    /// Number of engines to run in this process.
    #[arg(long, default_value_t = 1)]
    pub engines: usize,
    /// First HTTP port: engine i serves on 127.0.0.1:(port+i). 0 = ephemeral ports.
    #[arg(long, default_value_t = 8000)]
    pub port: u16,
    /// First ZMQ port: engine i publishes KV events on tcp://127.0.0.1:(zmq-port+i) and answers
    /// replay requests on tcp://127.0.0.1:(zmq-port+engines+i). 0 = ephemeral ports.
    #[arg(long, default_value_t = 5557)]
    pub zmq_port: u16,
    /// Served model name (also the KV-event topic suffix).
    #[arg(long, default_value = DEFAULT_MODEL)]
    pub model: String,
    /// PYTHONHASHSEED equivalent: the seed string of the block-hash chain.
    #[arg(long, default_value = "0")]
    pub hash_seed: String,
    /// Tokens per KV block.
    #[arg(long)]
    pub block_size: Option<usize>,
    /// GPU preset for step-time coefficients and KV size.
    #[arg(long, value_enum, default_value_t = GpuPreset::H100)]
    pub gpu: GpuPreset,
    /// KV blocks per engine (overrides the GPU preset).
    #[arg(long)]
    pub num_gpu_blocks: Option<usize>,
    /// Maximum concurrently running sequences per engine.
    #[arg(long)]
    pub max_num_seqs: Option<usize>,
    /// Token budget of one engine step.
    #[arg(long)]
    pub max_num_batched_tokens: Option<usize>,
    /// Longest prompt + completion, in tokens.
    #[arg(long)]
    pub max_model_len: Option<usize>,
    /// Simulated time runs this many times faster than real time.
    #[arg(long, default_value_t = 1.0)]
    pub time_scale: f64,
    /// KV-event msgpack encoding.
    #[arg(long, value_enum, default_value_t = KvEncoding::Array)]
    pub kv_encoding: KvEncoding,
    /// Batches kept per engine for ZMQ replay.
    #[arg(long, default_value_t = DEFAULT_REPLAY_BUFFER_BATCHES)]
    pub kv_replay_buffer_batches: usize,
    /// Comma-separated LoRA adapter names served besides the base model.
    #[arg(long, value_delimiter = ',')]
    pub lora_adapters: Vec<String>,
    /// HuggingFace tokenizer.json to use instead of the built-in tokenizer.
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// YAML file with per-engine overrides (see the crate docs).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Print one JSON line with every engine's addresses instead of human-readable lines.
    #[arg(long)]
    pub print_json: bool,
    /// Seed of the fault-injection draws.
    #[arg(long, default_value_t = 0)]
    pub fault_seed: u64,
    /// Fraction of requests (all engines) answered with `--error-status` before any byte.
    #[arg(long, default_value_t = 0.0)]
    pub error_rate: f64,
    /// Status of injected errors: 500 or 429.
    #[arg(long, default_value_t = 500)]
    pub error_status: u16,
    /// Extra delay before the first byte of every response, in milliseconds.
    #[arg(long, default_value_t = 0)]
    pub added_latency_ms: u64,
    /// Each engine crashes when request number N+1 arrives.
    #[arg(long)]
    pub crash_after_requests: Option<u64>,
    /// Each engine crashes this many (wall-clock) seconds after start.
    #[arg(long)]
    pub crash_at_s: Option<f64>,
    /// `/metrics` answers 500.
    #[arg(long)]
    pub metrics_unavailable: bool,
    /// Delay before `/metrics` answers, in milliseconds.
    #[arg(long, default_value_t = 0)]
    pub metrics_delay_ms: u64,
    /// Fraction of KV-event batches not published (sequence numbers still advance).
    #[arg(long, default_value_t = 0.0)]
    pub kv_drop_rate: f64,
    /// Seconds after start during which `/health` and requests answer 503.
    #[arg(long, default_value_t = 0.0)]
    pub slow_start_s: f64,
}

/// The YAML file: per-engine overrides.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    #[serde(default)]
    engines: Vec<RawEngine>,
}

/// Per-engine overrides; every field optional.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEngine {
    gpu: Option<GpuPreset>,
    /// `[beta0_us, beta1_us_per_prefill_token, beta2_us_per_decode_token]`.
    betas: Option<[f64; 3]>,
    num_gpu_blocks: Option<usize>,
    block_size: Option<usize>,
    max_num_seqs: Option<usize>,
    max_num_batched_tokens: Option<usize>,
    max_model_len: Option<usize>,
    faults: Option<FaultConfig>,
}

impl SimArgs {
    /// Fault settings the flags give every engine.
    fn faults(&self) -> FaultConfig {
        FaultConfig {
            error_rate: self.error_rate,
            error_status: self.error_status,
            added_latency_ms: self.added_latency_ms,
            crash_after_requests: self.crash_after_requests,
            crash_at_s: self.crash_at_s,
            metrics_unavailable: self.metrics_unavailable,
            metrics_delay_ms: self.metrics_delay_ms,
            kv_drop_rate: self.kv_drop_rate,
            slow_start_s: self.slow_start_s,
        }
    }

    fn engine_config(&self, gpu: GpuPreset, raw: &RawEngine) -> EngineConfig {
        let mut c = raw.gpu.unwrap_or(gpu).engine_config();
        c.hash_seed = self.hash_seed.clone();
        let pick = |file: Option<usize>, flag: Option<usize>, preset: usize| {
            file.or(flag).unwrap_or(preset)
        };
        c.block_size = pick(raw.block_size, self.block_size, c.block_size);
        c.num_gpu_blocks = pick(raw.num_gpu_blocks, self.num_gpu_blocks, c.num_gpu_blocks);
        c.max_num_seqs = pick(raw.max_num_seqs, self.max_num_seqs, c.max_num_seqs);
        c.max_num_batched_tokens = pick(
            raw.max_num_batched_tokens,
            self.max_num_batched_tokens,
            c.max_num_batched_tokens,
        );
        c.max_model_len = pick(raw.max_model_len, self.max_model_len, c.max_model_len);
        if let Some([b0, b1, b2]) = raw.betas {
            c.step = StepModel {
                beta0_us: b0,
                beta1_us_per_prefill_token: b1,
                beta2_us_per_decode_token: b2,
            };
        }
        c
    }

    /// Reads the files the flags name and builds the validated fleet configuration.
    pub fn to_fleet_config(&self) -> Result<FleetConfig, SimError> {
        let file = match &self.config {
            None => RawFile::default(),
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|source| SimError::ReadFile {
                    path: path.clone(),
                    source,
                })?;
                serde_norway::from_str(&text).map_err(|source| SimError::ParseConfig {
                    path: path.clone(),
                    source,
                })?
            }
        };
        if file.engines.len() > self.engines {
            return Err(SimError::InvalidConfig {
                field: "engines",
                reason: format!(
                    "the config file describes {} engines but --engines is {}",
                    file.engines.len(),
                    self.engines
                ),
            });
        }
        let tokenizer = match &self.tokenizer {
            None => Tokenizer::default(),
            Some(path) => {
                let bytes = std::fs::read(path).map_err(|source| SimError::ReadFile {
                    path: path.clone(),
                    source,
                })?;
                Tokenizer::Hf(Box::new(HfTokenizer::from_bytes(&bytes)?))
            }
        };
        let none = RawEngine::default();
        let engines = (0..self.engines)
            .map(|i| {
                let raw = file.engines.get(i).unwrap_or(&none);
                EngineSpec {
                    engine: self.engine_config(self.gpu, raw),
                    faults: raw.faults.clone().unwrap_or_else(|| self.faults()),
                }
            })
            .collect();
        let cfg = FleetConfig {
            engines,
            model: self.model.clone(),
            lora_adapters: self
                .lora_adapters
                .iter()
                .map(|s| s.trim().to_owned())
                .filter(|s| !s.is_empty())
                .collect(),
            host: IpAddr::V4(Ipv4Addr::LOCALHOST),
            http_port: self.port,
            zmq_port: self.zmq_port,
            time_scale: self.time_scale,
            kv_encoding: self.kv_encoding,
            replay_buffer_batches: self.kv_replay_buffer_batches,
            tokenizer: Arc::new(tokenizer),
            fault_seed: self.fault_seed,
        };
        cfg.validate()?;
        Ok(cfg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        sim: SimArgs,
    }

    fn args(extra: &[&str]) -> SimArgs {
        Cli::try_parse_from(["kvgate-sim"].iter().chain(extra))
            .expect("flags parse")
            .sim
    }

    #[test]
    fn flags_set_fleet_defaults_and_the_file_overrides_per_engine() {
        let dir = std::env::temp_dir().join(format!("kvgate-sim-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("sim.yaml");
        std::fs::write(
            &file,
            "engines:\n  - {}\n  - gpu: a100\n    betas: [1.0, 2.0, 3.0]\n    num_gpu_blocks: 64\n    faults: { error_rate: 0.5, error_status: 429 }\n",
        )
        .unwrap();
        let a = args(&[
            "--engines",
            "3",
            "--port",
            "0",
            "--zmq-port",
            "0",
            "--hash-seed",
            "42",
            "--max-num-seqs",
            "8",
            "--lora-adapters",
            "a,b",
            "--kv-encoding",
            "map",
            "--error-rate",
            "0.1",
            "--config",
            file.to_str().unwrap(),
        ]);
        let cfg = a.to_fleet_config().unwrap();
        assert_eq!(cfg.engines.len(), 3);
        assert_eq!(cfg.lora_adapters, ["a", "b"]);
        assert_eq!(cfg.kv_encoding, KvEncoding::Map);
        assert!(cfg.engines.iter().all(|e| e.engine.hash_seed == "42"));
        assert!(cfg.engines.iter().all(|e| e.engine.max_num_seqs == 8));
        assert_eq!(cfg.engines[0].engine.step, StepModel::H100_LLAMA31_8B);
        assert_eq!(cfg.engines[0].faults.error_rate, 0.1);
        assert_eq!(cfg.engines[1].engine.num_gpu_blocks, 64);
        assert_eq!(cfg.engines[1].engine.step.beta1_us_per_prefill_token, 2.0);
        assert_eq!(cfg.engines[1].faults.error_status, 429);
        assert_eq!(cfg.engines[1].faults.error_rate, 0.5);
        assert_eq!(cfg.engines[2].faults.error_rate, 0.1);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn bad_settings_are_typed_errors() {
        let bad = |extra: &[&str]| args(extra).to_fleet_config().unwrap_err();
        assert!(matches!(
            bad(&["--time-scale", "0"]),
            SimError::InvalidConfig {
                field: "time_scale",
                ..
            }
        ));
        assert!(matches!(
            bad(&["--error-status", "418"]),
            SimError::InvalidConfig {
                field: "faults",
                ..
            }
        ));
        assert!(matches!(
            bad(&["--engines", "10", "--port", "65530"]),
            SimError::InvalidConfig {
                field: "http_port",
                ..
            }
        ));
        assert!(matches!(
            bad(&["--config", "/nonexistent/sim.yaml"]),
            SimError::ReadFile { .. }
        ));
        assert!(matches!(
            bad(&["--block-size", "0"]),
            SimError::InvalidEngineConfig { index: 0, .. }
        ));
    }
}
