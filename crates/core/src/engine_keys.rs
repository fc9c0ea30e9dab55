//! Per-endpoint translation from an engine's block hashes to the router's own keys.
//!
//! The prefix index is keyed by the router's chain over token ids ([`crate::keys`]). An engine
//! names blocks by its own hash, which the router cannot recompute (see the `keys` module), so
//! every `BlockStored` is translated: its parent's engine hash is looked up here (or, with no
//! parent, the chain starts at the root of the event's block size, adapter and cache salt), each
//! block's own key is chained from the event's `token_ids`, and the engine hash → own key alias
//! is recorded. `BlockRemoved` and stores in other tiers (which may omit the tokens) resolve
//! through the alias. The alias lives as long as the engine holds the block in some tier, so the
//! map is bounded by the engine's own capacity, and it is dropped whole on `AllBlocksCleared`,
//! a publisher restart or a broken view.
//!
//! A block whose parent is unknown (its parent was stored before the router subscribed and the
//! replay buffer no longer has it, or a batch was lost) cannot be placed in the chain: it is
//! counted as an orphan and skipped, and so are its descendants in that event. That costs
//! matches, never correctness: the router's approximate entries still cover the prefix.
//!
//! One owner: the [`crate::Router`] keeps one `EngineKeys` per endpoint and is the only writer.

use std::collections::HashMap;

use crate::index::KeyHasherBuilder;
use crate::keys::{KeyScope, chain_mix, chain_next, chain_root};
use crate::observe::BlockExtra;

/// The aliases of one endpoint: engine hash → (own key, tiers holding it, copies per tier).
///
/// Copies: vLLM's block pool does not de-duplicate (`BlockHashToBlockMap` keeps every block
/// computed with the same hash, as when two requests compute the same content at once, or a
/// full-prompt hit recomputes its last block); each copy is stored and, when evicted, removed
/// with its own event. The block stays cached while one copy does, so a `BlockRemoved` drops
/// the router's entry only with the tier's last copy (counts saturate at 255).
#[derive(Clone, Debug, Default)]
pub struct EngineKeys {
    map: HashMap<u64, Alias, KeyHasherBuilder>,
    orphans: u64,
}

/// One engine hash's alias (16 bytes, the size `(u64, u8)` had with its padding).
#[derive(Clone, Copy, Debug)]
struct Alias {
    key: u64,
    tiers: u8,
    /// Copies per tier (GPU, CPU, disk: the tier bit's position).
    copies: [u8; 3],
}

impl Alias {
    fn new(key: u64, tier_bit: u8) -> Self {
        let mut a = Self {
            key,
            tiers: 0,
            copies: [0; 3],
        };
        a.add(tier_bit);
        a
    }

    fn add(&mut self, tier_bit: u8) {
        self.tiers |= tier_bit;
        let c = &mut self.copies[tier_bit.trailing_zeros() as usize % 3];
        *c = c.saturating_add(1);
    }

    /// One copy of `tier_bit` removed; whether it was the tier's last.
    fn remove(&mut self, tier_bit: u8) -> bool {
        let c = &mut self.copies[tier_bit.trailing_zeros() as usize % 3];
        *c = c.saturating_sub(1);
        if *c == 0 {
            self.tiers &= !tier_bit;
            true
        } else {
            false
        }
    }
}

impl EngineKeys {
    /// Aliases currently held.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Whether no alias is held.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Blocks skipped since creation because their parent was unknown.
    pub fn orphans(&self) -> u64 {
        self.orphans
    }

    /// Heap bytes of the alias table (same accounting as [`crate::index::PrefixIndex::memory`]).
    pub fn heap_bytes(&self) -> usize {
        crate::index::table_bytes(self.map.capacity(), std::mem::size_of::<(u64, Alias)>())
    }

    /// Forgets every alias (the engine's cache is empty or the view is void).
    pub fn clear(&mut self) {
        self.map = HashMap::default();
    }

    /// Translates a `BlockStored` of `engine_hashes` (chain order) with parent `parent`, whose
    /// concatenated tokens are `token_ids` (`block_size` per block; may be empty when the engine
    /// omits them for a block it already published in another tier), stored in tier bit
    /// `tier_bit`. Returns the own keys of the blocks it could place, in order; stops at the
    /// first block it cannot place.
    #[allow(clippy::too_many_arguments)]
    pub fn store(
        &mut self,
        engine_hashes: &[u64],
        parent: Option<u64>,
        token_ids: &[u32],
        block_size: u32,
        lora: Option<&str>,
        extra: &[BlockExtra],
        tier_bit: u8,
        out: &mut Vec<u64>,
    ) {
        out.clear();
        let bs = block_size as usize;
        let have_tokens = bs > 0 && token_ids.len() >= engine_hashes.len() * bs;
        let mut prev: Option<u64> = match parent {
            None => None,
            Some(p) => self.map.get(&p).map(|a| a.key),
        };
        // Sized from the tokens received, never from the event's `block_size` alone: that is
        // the publisher's word, and a 21-byte event naming a block of 2³² tokens would
        // otherwise reserve 16 GiB here before any token is read.
        let mut buf = Vec::with_capacity(bs.min(token_ids.len()) * 4);
        for (i, &h) in engine_hashes.iter().enumerate() {
            // Already known (a store in another tier, or a re-publication): reuse the alias.
            if let Some(entry) = self.map.get_mut(&h) {
                entry.add(tier_bit);
                prev = Some(entry.key);
                out.push(entry.key);
                continue;
            }
            if !have_tokens {
                self.orphans += (engine_hashes.len() - i) as u64;
                return;
            }
            let ex = extra.get(i).cloned().unwrap_or_default();
            let parent_key = match (prev, i, parent) {
                (Some(k), _, _) => k,
                (None, 0, None) => chain_root(
                    block_size,
                    KeyScope {
                        lora,
                        cache_salt: ex.cache_salt.as_deref(),
                    },
                ),
                _ => {
                    self.orphans += (engine_hashes.len() - i) as u64;
                    return;
                }
            };
            let mut key = chain_next(parent_key, &token_ids[i * bs..(i + 1) * bs], &mut buf);
            if ex.opaque != 0 {
                key = chain_mix(key, ex.opaque);
            }
            self.map.insert(h, Alias::new(key, tier_bit));
            prev = Some(key);
            out.push(key);
        }
    }

    /// Resolves a `BlockRemoved` from tier bit `tier_bit`: the own keys of the known hashes
    /// whose last copy in that tier it removes (unknown ones are ignored; see [`EngineKeys`] on
    /// copies). An alias no tier holds any more is forgotten.
    pub fn remove(&mut self, engine_hashes: &[u64], tier_bit: u8, out: &mut Vec<u64>) {
        out.clear();
        for h in engine_hashes {
            let Some(entry) = self.map.get_mut(h) else {
                continue;
            };
            if entry.remove(tier_bit) {
                out.push(entry.key);
            }
            if entry.tiers == 0 {
                self.map.remove(h);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::chain_keys;

    fn extra_none(n: usize) -> Vec<BlockExtra> {
        vec![BlockExtra::default(); n]
    }

    #[test]
    fn stored_chain_matches_the_request_chain_whatever_the_engine_hashes() {
        let toks: Vec<u32> = (100..164).collect();
        let want = chain_keys(&toks, 16, KeyScope::default());
        let mut ek = EngineKeys::default();
        let mut out = Vec::new();
        // Two events: blocks 0-1, then 2-3 chained to block 1's engine hash.
        ek.store(
            &[7, 8],
            None,
            &toks[..32],
            16,
            None,
            &extra_none(2),
            1,
            &mut out,
        );
        assert_eq!(out, want[..2]);
        ek.store(
            &[9, 10],
            Some(8),
            &toks[32..],
            16,
            None,
            &extra_none(2),
            1,
            &mut out,
        );
        assert_eq!(out, want[2..]);
        // Removal resolves through the alias, and forgets it.
        ek.remove(&[10, 11], 1, &mut out);
        assert_eq!(out, vec![want[3]]);
        assert_eq!(ek.len(), 3);
    }

    #[test]
    fn salt_from_the_first_block_and_lora_scope_the_chain() {
        let toks: Vec<u32> = (0..32).collect();
        let scope = KeyScope {
            lora: Some("sql"),
            cache_salt: Some("s1"),
        };
        let want = chain_keys(&toks, 16, scope);
        let mut ek = EngineKeys::default();
        let mut out = Vec::new();
        let extra = vec![
            BlockExtra {
                cache_salt: Some("s1".into()),
                opaque: 0,
            },
            BlockExtra::default(),
        ];
        ek.store(&[1, 2], None, &toks, 16, Some("sql"), &extra, 1, &mut out);
        assert_eq!(out, want);
    }

    #[test]
    fn unknown_parent_is_an_orphan_and_other_tiers_reuse_the_alias() {
        let toks: Vec<u32> = (0..32).collect();
        let mut ek = EngineKeys::default();
        let mut out = Vec::new();
        ek.store(
            &[5],
            Some(404),
            &toks[..16],
            16,
            None,
            &extra_none(1),
            1,
            &mut out,
        );
        assert!(out.is_empty());
        assert_eq!(ek.orphans(), 1);
        ek.store(
            &[1],
            None,
            &toks[..16],
            16,
            None,
            &extra_none(1),
            1,
            &mut out,
        );
        let k = out[0];
        // The CPU tier stores the same block without tokens.
        ek.store(&[1], None, &[], 16, None, &[], 2, &mut out);
        assert_eq!(out, vec![k]);
        ek.remove(&[1], 1, &mut out);
        assert_eq!(ek.len(), 1, "still held on CPU");
        ek.remove(&[1], 2, &mut out);
        assert!(ek.is_empty());
    }

    /// vLLM stores and removes each copy of a block computed twice (its pool does not
    /// de-duplicate): the block stays while a copy does.
    #[test]
    fn a_block_stays_until_its_last_copy_is_removed() {
        let toks: Vec<u32> = (0..16).collect();
        let mut ek = EngineKeys::default();
        let mut out = Vec::new();
        for _ in 0..2 {
            ek.store(&[3], None, &toks, 16, None, &extra_none(1), 1, &mut out);
        }
        let k = out[0];
        ek.remove(&[3], 1, &mut out);
        assert!(out.is_empty(), "a copy is still cached");
        assert_eq!(ek.len(), 1);
        ek.remove(&[3], 1, &mut out);
        assert_eq!(out, vec![k]);
        assert!(ek.is_empty());
        // A removal of an unknown hash, or one too many, changes nothing.
        ek.remove(&[3], 1, &mut out);
        assert!(out.is_empty());
    }
}
