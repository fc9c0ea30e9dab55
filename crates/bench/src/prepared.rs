//! Each request's prompt as the discrete-event run needs it — token ids, the engines' block
//! hashes and the router's block keys — computed once per workload and shared by every run of
//! it.
//!
//! Why: a demo or capacity search runs the same requests dozens of times (every policy, every
//! probed rate: the probes only rescale arrival times, see `cli::scale_arrivals`). Deriving the
//! prompt is the same work each time: a profile of `kvgate demo` put ~40% of its CPU in making
//! tokens from words, SHA-256/CBOR block hashes and the router's key chain. The cache lives in
//! the [`crate::workload::Workload`] (cloned with it, so rescaled copies share it) and fills
//! lazily, one slot per request, from whichever run reaches the request first; runs on other
//! threads wait for that slot instead of computing it again.
//!
//! Bounded: only workloads of at most [`CACHE_MAX_PROMPT_TOKENS`] prompt tokens in all are
//! cached (about 6.5 bytes per token: ids, 32-byte hashes per 16 tokens and 8-byte keys); a
//! larger trace (a full Mooncake replay is ~145M tokens) derives each prompt per run, as before,
//! and says so once. The slots are keyed by what the derivation depends on (the engines' block
//! size and hash settings, the router's block size): a run with other settings replaces them.

use std::sync::{Arc, Mutex, OnceLock};

use kvgate_core::PromptKeys;
use kvgate_tokens::{BlockHash, BlockHasher, ExtraKeys};

/// Largest workload (total prompt tokens) whose prompts are cached: ~310 MB of cache.
pub const CACHE_MAX_PROMPT_TOKENS: u64 = 48_000_000;

/// One request's prompt, derived.
#[derive(Debug)]
pub struct PreparedPrompt {
    /// Token ids of the built-in tokenizer.
    pub tokens: Arc<[u32]>,
    /// The engines' block hashes of `tokens`.
    pub hashes: Arc<[BlockHash]>,
    /// The router's block keys of `tokens`.
    pub keys: PromptKeys,
}

/// What a derivation depends on besides the prompt: the engines' hasher settings (block size,
/// algorithm, seed, secret) and the router's block size.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PrepareKey {
    /// Engine block size, tokens.
    pub engine_block_size: usize,
    /// Engine hash algorithm, seed and secret, as one comparable value.
    pub engine_hash: (String, String, Option<[u8; 32]>),
    /// Router block size, tokens.
    pub router_block_size: u32,
}

type Slots = Arc<Vec<OnceLock<Arc<PreparedPrompt>>>>;

/// The shared cache of a workload's prepared prompts (see the module docs). Clones share it.
#[derive(Clone, Default)]
pub struct PromptCache(Arc<Mutex<Option<(PrepareKey, Slots)>>>);

impl std::fmt::Debug for PromptCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PromptCache")
    }
}

/// Derived data never makes two workloads different.
impl PartialEq for PromptCache {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl PromptCache {
    /// The slots for `n` requests under `key`: the existing ones when they match, else fresh
    /// (empty) ones that replace them.
    pub fn slots(&self, key: &PrepareKey, n: usize) -> Slots {
        let mut g = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((k, slots)) = g.as_ref()
            && k == key
            && slots.len() == n
        {
            return Arc::clone(slots);
        }
        let slots: Slots = Arc::new((0..n).map(|_| OnceLock::new()).collect());
        *g = Some((key.clone(), Arc::clone(&slots)));
        slots
    }
}

/// Derives one prompt (what a run does for a request the cache does not hold).
pub fn prepare(tokens: Vec<u32>, hasher: &BlockHasher, router_block_size: u32) -> PreparedPrompt {
    let hashes: Arc<[BlockHash]> = hasher.hashes(&tokens, ExtraKeys::default()).into();
    let keys =
        PromptKeys::from_tokens(&tokens, router_block_size, kvgate_core::KeyScope::default());
    PreparedPrompt {
        tokens: tokens.into(),
        hashes,
        keys,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(router_block_size: u32) -> PrepareKey {
        PrepareKey {
            engine_block_size: 16,
            engine_hash: ("sha256".into(), "seed".into(), None),
            router_block_size,
        }
    }

    #[test]
    fn clones_share_slots_and_other_settings_replace_them() {
        let cache = PromptCache::default();
        let copy = cache.clone();
        let a = cache.slots(&key(16), 3);
        a[1].set(Arc::new(prepare(
            vec![1, 2, 3],
            &BlockHasher::new("s", 2),
            16,
        )))
        .unwrap();
        let b = copy.slots(&key(16), 3);
        assert!(Arc::ptr_eq(&a, &b), "a clone sees the same slots");
        assert!(b[1].get().is_some());
        let c = copy.slots(&key(32), 3);
        assert!(!Arc::ptr_eq(&a, &c), "other settings get fresh slots");
        assert!(c[1].get().is_none());
    }
}
