//! The prefix index's block table: an open-addressing map from a 64-bit block key to a nonzero
//! 32-bit value, in cache-line chunks of 5 slots, sized to the live set.
//!
//! Hand-written rather than `std`'s (hashbrown) map because of what heavy store/remove churn
//! does to a power-of-two table: hashbrown grows to the next power of two and, under churn,
//! leaves tombstones that make it double again once the live set passes half its capacity, so a
//! steady live set sits at 22–44% of its buckets (measured: 118.5 bytes per entry with 33-byte
//! buckets). Even with 13-byte buckets, a power-of-two table spans a 2× range of loads, which
//! leaves no room for hysteresis under a 32-byte budget. This table takes any number of chunks,
//! so it keeps the load within [[`SHRINK_BELOW`], [`MAX_LOAD`]] with wide hysteresis.
//!
//! The layout follows Folly's F14 (its "chunk" with an outbound-overflow count): a key lives in
//! its home chunk or, if that was full, in one of the following chunks, and every chunk counts
//! the keys that probed past it. A lookup scans one 64-byte chunk with a branch-free compare and
//! stops at the first chunk whose count is zero; a removal decrements the counts along the key's
//! path, so churn leaves no tombstones and never grows the table. (A Robin Hood linear-probing
//! table with 12-byte slots was tried first: 2–2.5× slower per lookup than hashbrown, its
//! data-dependent probe loop defeating the overlap of cache misses across lookups.)

use std::hash::Hasher;

use super::KeyHasher;

/// Slots per chunk: 5 × (8-byte key + 4-byte value) + a 4-byte overflow count = 64 bytes.
const CHUNK: usize = 5;

/// Grow when an insert would push the load above this. At 0.8 a chunk's home count is
/// Poisson(4): about 1 key in 11 has to live past its home chunk (one more cache line).
const MAX_LOAD: (usize, usize) = (4, 5);
/// Load right after growing: 12.8 B / 0.55 ≈ 23 bytes per entry, and the next growth is ≥ 45%
/// of the live set away, so growing costs about two moves per insert, amortised.
const GROW_TO: (usize, usize) = (11, 20);
/// Shrink when removals take the load below this: 12.8 B / 0.42 ≈ 30.5 bytes per entry at
/// worst, under the index's 32-byte budget.
const SHRINK_BELOW: (usize, usize) = (21, 50);
/// Load right after shrinking: ≥ 30% of the live set away from both the next shrink and the
/// next growth, so a live set oscillating around a threshold cannot make it thrash.
const SHRINK_TO: (usize, usize) = (3, 5);
/// Fewest chunks of a non-empty table: below this, memory per entry is irrelevant and resizing
/// is churn.
const MIN_CHUNKS: usize = 4;

/// Five slots and the count of keys whose probe passed this chunk. `values[j] == 0` marks slot
/// `j` empty (values are never 0; keys may be anything).
#[derive(Clone, Copy, Debug, Default)]
#[repr(C, align(64))]
struct Chunk {
    keys: [u64; CHUNK],
    values: [u32; CHUNK],
    overflow: u32,
}

impl Chunk {
    /// Bit `j` set iff slot `j` holds `key`.
    #[inline]
    fn matches(&self, key: u64) -> u32 {
        let mut m = 0u32;
        for j in 0..CHUNK {
            m |= u32::from((self.keys[j] == key) & (self.values[j] != 0)) << j;
        }
        m
    }
    #[inline]
    fn free_slot(&self) -> Option<usize> {
        self.values.iter().position(|&v| v == 0)
    }
}

/// Map from block key to a nonzero `u32`. See the module docs.
#[derive(Clone, Debug, Default)]
pub(crate) struct BlockTable {
    chunks: Vec<Chunk>,
    len: usize,
}

/// Bytes of one slot (key + value); a chunk adds a 4-byte overflow count to every 5 slots.
pub(crate) const SLOT_BYTES: usize = std::mem::size_of::<u64>() + std::mem::size_of::<u32>();

#[inline]
fn mix(key: u64) -> u64 {
    let mut h = KeyHasher::default();
    h.write_u64(key);
    h.finish()
}

impl BlockTable {
    /// Live entries.
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// Heap bytes (the chunk array; nothing else is allocated).
    pub(crate) fn heap_bytes(&self) -> usize {
        self.chunks.capacity() * std::mem::size_of::<Chunk>()
    }

    fn slots(&self) -> usize {
        self.chunks.len() * CHUNK
    }

    #[inline]
    fn home(&self, key: u64) -> usize {
        // Multiply-shift range reduction: any number of chunks, no modulo.
        ((u128::from(mix(key)) * self.chunks.len() as u128) >> 64) as usize
    }

    #[inline]
    fn next(&self, c: usize) -> usize {
        if c + 1 == self.chunks.len() { 0 } else { c + 1 }
    }

    /// `(chunk, slot)` of `key`.
    #[inline]
    fn find(&self, key: u64) -> Option<(usize, usize)> {
        if self.len == 0 {
            return None;
        }
        let mut c = self.home(key);
        for _ in 0..self.chunks.len() {
            let chunk = &self.chunks[c];
            let m = chunk.matches(key);
            if m != 0 {
                return Some((c, m.trailing_zeros() as usize));
            }
            if chunk.overflow == 0 {
                return None;
            }
            c = self.next(c);
        }
        None
    }

    /// The value of `key`.
    #[inline]
    pub(crate) fn get(&self, key: u64) -> Option<u32> {
        self.find(key).map(|(c, j)| self.chunks[c].values[j])
    }

    /// The value of `key`, to change in place (it must stay nonzero).
    #[inline]
    pub(crate) fn get_mut(&mut self, key: u64) -> Option<&mut u32> {
        self.find(key).map(|(c, j)| &mut self.chunks[c].values[j])
    }

    /// Sets `key` to `value` (nonzero), inserting it if absent.
    pub(crate) fn insert(&mut self, key: u64, value: u32) {
        debug_assert_ne!(value, 0, "0 marks an empty slot");
        if let Some((c, j)) = self.find(key) {
            self.chunks[c].values[j] = value;
            return;
        }
        if (self.len + 1) * MAX_LOAD.1 > self.slots() * MAX_LOAD.0 {
            self.resize(((self.len + 1) * GROW_TO.1).div_ceil(GROW_TO.0));
        }
        self.insert_new(key, value);
        self.len += 1;
    }

    /// Places a key known to be absent, with room for it (the load is below 1).
    fn insert_new(&mut self, key: u64, value: u32) {
        let mut c = self.home(key);
        loop {
            let chunk = &mut self.chunks[c];
            if let Some(j) = chunk.free_slot() {
                chunk.keys[j] = key;
                chunk.values[j] = value;
                return;
            }
            chunk.overflow += 1;
            c = self.next(c);
        }
    }

    /// Removes `key`; returns its value.
    pub(crate) fn remove(&mut self, key: u64) -> Option<u32> {
        let (found, j) = self.find(key)?;
        let value = std::mem::take(&mut self.chunks[found].values[j]);
        // The chunks this key's insert probed past no longer hold it back.
        let mut c = self.home(key);
        while c != found {
            self.chunks[c].overflow -= 1;
            c = self.next(c);
        }
        self.len -= 1;
        if self.len * SHRINK_BELOW.1 < self.slots() * SHRINK_BELOW.0 {
            self.shrink();
        }
        Some(value)
    }

    fn shrink(&mut self) {
        if self.len == 0 {
            *self = Self::default();
            return;
        }
        let slots = (self.len * SHRINK_TO.1).div_ceil(SHRINK_TO.0);
        if slots.div_ceil(CHUNK).max(MIN_CHUNKS) < self.chunks.len() {
            self.resize(slots);
        }
    }

    /// Rebuilds with room for `slots` entries (at least the live ones plus one).
    fn resize(&mut self, slots: usize) {
        let chunks = slots.max(self.len + 1).div_ceil(CHUNK).max(MIN_CHUNKS);
        let old = std::mem::replace(&mut self.chunks, vec![Chunk::default(); chunks]);
        for chunk in old {
            for j in 0..CHUNK {
                if chunk.values[j] != 0 {
                    self.insert_new(chunk.keys[j], chunk.values[j]);
                }
            }
        }
    }

    /// Every entry as `(key, value)`, in slot order.
    pub(crate) fn iter(&self) -> impl Iterator<Item = (u64, u32)> + '_ {
        self.chunks.iter().flat_map(|c| {
            (0..CHUNK)
                .filter(|&j| c.values[j] != 0)
                .map(|j| (c.keys[j], c.values[j]))
        })
    }

    /// Keeps the entries for which `f` returns a nonzero value, set to that value. A full
    /// rebuild when anything is dropped: it serves only whole-index scans (an endpoint's reset
    /// or removal), which are O(entries) anyway.
    pub(crate) fn retain(&mut self, mut f: impl FnMut(u64, u32) -> u32) {
        let mut dropped = false;
        for chunk in &mut self.chunks {
            for j in 0..CHUNK {
                if chunk.values[j] != 0 {
                    chunk.values[j] = f(chunk.keys[j], chunk.values[j]);
                    if chunk.values[j] == 0 {
                        dropped = true;
                        self.len -= 1;
                    }
                }
            }
        }
        if dropped {
            if self.len == 0 {
                *self = Self::default();
                return;
            }
            self.resize((self.len * GROW_TO.1).div_ceil(GROW_TO.0));
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use proptest::prelude::*;

    use super::*;

    proptest! {
        /// The table agrees with `HashMap` under any sequence of inserts, removes and retains,
        /// and keeps its load inside its bounds.
        #[test]
        fn table_matches_hashmap(ops in prop::collection::vec((0u8..4, 0u64..300, 1u32..1000), 1..3000)) {
            let mut t = BlockTable::default();
            let mut m: HashMap<u64, u32> = HashMap::new();
            for (op, key, value) in ops {
                // Spread some keys over the whole u64 range, keep others tiny (0 included).
                let key = if key % 2 == 0 { key } else { key.wrapping_mul(0x9E37_79B9_7F4A_7C15) };
                match op {
                    0 | 1 => { t.insert(key, value); m.insert(key, value); }
                    2 => prop_assert_eq!(t.remove(key), m.remove(&key)),
                    _ => {
                        if key % 17 == 0 {
                            t.retain(|k, v| if k % 3 == 0 { 0 } else { v + 1 });
                            m.retain(|k, _| k % 3 != 0);
                            m.values_mut().for_each(|v| *v += 1);
                        }
                    }
                }
                prop_assert_eq!(t.len(), m.len());
                if t.chunks.len() > MIN_CHUNKS {
                    prop_assert!(t.len * SHRINK_BELOW.1 >= t.slots() * SHRINK_BELOW.0);
                }
                prop_assert!(t.len * MAX_LOAD.1 <= t.slots() * MAX_LOAD.0 || t.len == 0);
            }
            for (k, v) in &m {
                prop_assert_eq!(t.get(*k), Some(*v));
            }
            let mut all: Vec<(u64, u32)> = t.iter().collect();
            all.sort_unstable();
            let mut want: Vec<(u64, u32)> = m.into_iter().collect();
            want.sort_unstable();
            prop_assert_eq!(all, want);
            // Every overflow count is exactly the number of keys that probed past its chunk.
            let mut want_overflow = vec![0u32; t.chunks.len()];
            for (key, _) in t.iter() {
                let (found, _) = t.find(key).unwrap();
                let mut c = t.home(key);
                while c != found {
                    want_overflow[c] += 1;
                    c = t.next(c);
                }
            }
            let got: Vec<u32> = t.chunks.iter().map(|c| c.overflow).collect();
            prop_assert_eq!(got, want_overflow);
        }
    }

    #[test]
    fn chunk_is_one_cache_line() {
        assert_eq!(std::mem::size_of::<Chunk>(), 64);
    }

    #[test]
    fn churn_does_not_grow_the_table() {
        let mut t = BlockTable::default();
        for k in 0..10_000u64 {
            t.insert(k, 1);
        }
        let chunks = t.chunks.len();
        for k in 10_000..1_000_000u64 {
            t.remove(k - 10_000);
            t.insert(k, 1);
        }
        assert_eq!(t.len(), 10_000);
        assert_eq!(t.chunks.len(), chunks, "a steady live set keeps its table");
        for k in 990_000..1_000_000u64 {
            assert_eq!(t.get(k), Some(1));
        }
    }
}
