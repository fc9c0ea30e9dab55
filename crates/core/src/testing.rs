//! Support for tests and benchmarks of the core and its users: prompts built from block
//! *labels* (each label stands for one block of identical tokens), their router keys, and the
//! `BlockStored` events an engine would publish for them, with engine hashes unrelated to the
//! router's keys (as real engines' are).
//!
//! A chain of labels `[a, b, c]` is the prompt whose block 0 is `block_size` tokens `a`, block 1
//! tokens `b`, and so on; two label chains share a prefix exactly when their label lists do.

use crate::endpoint::Tier;
use crate::keys::{KeyScope, chain_keys};
use crate::observe::KvEvent;
use crate::request::PromptKeys;

/// What the fake engine XORs into the router's key to name a block: any bijection works, the
/// point is that engine hashes are not the router's keys.
const ENGINE_HASH_MASK: u64 = 0x5EED_0FE4_614E_0000;

/// The prompt tokens of a label chain.
pub fn label_tokens(labels: &[u64], block_size: u32) -> Vec<u32> {
    labels
        .iter()
        .flat_map(|&l| std::iter::repeat_n(l as u32, block_size as usize))
        .collect()
}

/// The router keys of a label chain.
pub fn label_keys(labels: &[u64], block_size: u32) -> PromptKeys {
    PromptKeys::from_tokens(
        &label_tokens(labels, block_size),
        block_size,
        KeyScope::default(),
    )
}

/// The engine hashes the fake engine gives the blocks of a label chain.
pub fn label_engine_hashes(labels: &[u64], block_size: u32) -> Vec<u64> {
    chain_keys(
        &label_tokens(labels, block_size),
        block_size,
        KeyScope::default(),
    )
    .into_iter()
    .map(|k| k ^ ENGINE_HASH_MASK)
    .collect()
}

/// A `BlockStored` of a whole label chain from its root, as the fake engine publishes it.
pub fn label_stored(labels: &[u64], block_size: u32, tier: Tier) -> KvEvent {
    KvEvent::BlockStored {
        block_hashes: label_engine_hashes(labels, block_size),
        parent: None,
        token_ids: label_tokens(labels, block_size),
        block_size,
        lora_name: None,
        extra_keys: Vec::new(),
        tier,
    }
}

/// A `BlockStored` of the blocks `labels` continuing the already published chain `prefix`
/// (its parent is the engine hash of `prefix`'s last block).
pub fn label_stored_after(prefix: &[u64], labels: &[u64], block_size: u32, tier: Tier) -> KvEvent {
    let all: Vec<u64> = prefix.iter().chain(labels).copied().collect();
    let hashes = label_engine_hashes(&all, block_size);
    KvEvent::BlockStored {
        block_hashes: hashes[prefix.len()..].to_vec(),
        parent: prefix.len().checked_sub(1).map(|i| hashes[i]),
        token_ids: label_tokens(labels, block_size),
        block_size,
        lora_name: None,
        extra_keys: Vec::new(),
        tier,
    }
}

/// A `BlockRemoved` of the last `n` blocks of a label chain.
pub fn label_removed(labels: &[u64], n: usize, block_size: u32, tier: Tier) -> KvEvent {
    let hashes = label_engine_hashes(labels, block_size);
    KvEvent::BlockRemoved {
        block_hashes: hashes[hashes.len().saturating_sub(n)..].to_vec(),
        tier,
    }
}
