//! The prefix index's block table: an open-addressing map from a 64-bit block key to a nonzero
//! 32-bit value in 12-byte slots, sized to the live set.
//!
//! Hand-written rather than `std`'s (hashbrown) map because of what heavy store/remove churn
//! does to a power-of-two table: hashbrown grows to the next power of two and, under churn,
//! leaves tombstones that make it double again once the live set passes half its capacity, so a
//! steady live set sits at 22–44% of its buckets (measured: 118.5 bytes per entry with 33-byte
//! slots). Even with a 12-byte slot, a power-of-two table spans a 2× range of loads, which leaves
//! no room for hysteresis under a 32-byte budget. This table takes any capacity, so it keeps the
//! load inside [[`SHRINK_BELOW`], [`MAX_LOAD`]] with wide hysteresis, and it deletes by backward
//! shift (Robin Hood linear probing), so churn leaves no tombstones and never grows it.
//!
//! Robin Hood ordering keeps probe sequences short at that load (a lookup stops as soon as it
//! meets an entry closer to its home than the key would be), and linear probing over 12-byte
//! slots reads one or two cache lines per lookup, as many as a SwissTable's control group plus
//! slot.

use super::KeyHasher;
use std::hash::Hasher;

/// Grow when an insert would push the load above this: Robin Hood linear probing reads
/// (1 + 1/(1 − α)) / 2 ≈ 3.8 slots per successful lookup at 0.85, within one or two cache
/// lines of 12-byte slots.
const MAX_LOAD: (usize, usize) = (17, 20);
/// Load right after growing: 12 B / 0.55 ≈ 22 bytes per entry, and the next growth is ≥ 30% of
/// the live set away, so growing costs under three moves per insert, amortised.
const GROW_TO: (usize, usize) = (11, 20);
/// Shrink when removals take the load below this: 12 B / 0.4 = 30 bytes per entry at worst,
/// under the index's 32-byte budget.
const SHRINK_BELOW: (usize, usize) = (2, 5);
/// Load right after shrinking: ≥ 1/3 of the live set away from both the next shrink and the
/// next growth, so a live set oscillating around a threshold cannot make it thrash.
const SHRINK_TO: (usize, usize) = (3, 5);
/// Smallest non-empty table: below this, memory per entry is irrelevant and resizing is churn.
const MIN_CAPACITY: usize = 16;

/// `value == 0` marks an empty slot (values are never 0).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Slot {
    key: [u32; 2],
    value: u32,
}

impl Slot {
    fn key(&self) -> u64 {
        u64::from(self.key[0]) | (u64::from(self.key[1]) << 32)
    }
    fn new(key: u64, value: u32) -> Self {
        Self {
            key: [key as u32, (key >> 32) as u32],
            value,
        }
    }
}

/// Map from block key to a nonzero `u32`. See the module docs.
#[derive(Clone, Debug, Default)]
pub(crate) struct BlockTable {
    slots: Vec<Slot>,
    len: usize,
}

/// Bytes of one slot (key + value).
pub(crate) const SLOT_BYTES: usize = std::mem::size_of::<Slot>();

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

    /// Heap bytes (the slot array; nothing else is allocated).
    pub(crate) fn heap_bytes(&self) -> usize {
        self.slots.capacity() * SLOT_BYTES
    }

    fn home(&self, key: u64) -> usize {
        // Multiply-shift range reduction: any capacity, no modulo.
        ((u128::from(mix(key)) * self.slots.len() as u128) >> 64) as usize
    }

    /// Probe distance of the entry at `i` from its home slot.
    fn dist(&self, i: usize) -> usize {
        let home = self.home(self.slots[i].key());
        if i >= home {
            i - home
        } else {
            i + self.slots.len() - home
        }
    }

    fn next(&self, i: usize) -> usize {
        if i + 1 == self.slots.len() { 0 } else { i + 1 }
    }

    fn find(&self, key: u64) -> Option<usize> {
        if self.len == 0 {
            return None;
        }
        let mut i = self.home(key);
        let mut d = 0;
        loop {
            let s = self.slots[i];
            if s.value == 0 {
                return None;
            }
            if s.key() == key {
                return Some(i);
            }
            // Robin Hood invariant: had `key` been inserted, it would sit before any entry
            // closer to its own home than `key` is to its.
            if self.dist(i) < d {
                return None;
            }
            i = self.next(i);
            d += 1;
        }
    }

    /// The value of `key`.
    pub(crate) fn get(&self, key: u64) -> Option<u32> {
        self.find(key).map(|i| self.slots[i].value)
    }

    /// The value of `key`, to change in place (it must stay nonzero).
    pub(crate) fn get_mut(&mut self, key: u64) -> Option<&mut u32> {
        self.find(key).map(|i| &mut self.slots[i].value)
    }

    /// Sets `key` to `value` (nonzero), inserting it if absent.
    pub(crate) fn insert(&mut self, key: u64, value: u32) {
        debug_assert_ne!(value, 0, "0 marks an empty slot");
        if let Some(i) = self.find(key) {
            self.slots[i].value = value;
            return;
        }
        if (self.len + 1) * MAX_LOAD.1 > self.slots.len() * MAX_LOAD.0 {
            self.resize(((self.len + 1) * GROW_TO.1).div_ceil(GROW_TO.0));
        }
        self.insert_new(Slot::new(key, value));
        self.len += 1;
    }

    /// Places an entry known to be absent, with room for it.
    fn insert_new(&mut self, mut cur: Slot) {
        let mut i = self.home(cur.key());
        let mut d = 0;
        loop {
            if self.slots[i].value == 0 {
                self.slots[i] = cur;
                return;
            }
            let sd = self.dist(i);
            if sd < d {
                std::mem::swap(&mut self.slots[i], &mut cur);
                d = sd;
            }
            i = self.next(i);
            d += 1;
        }
    }

    /// Removes `key`; returns its value.
    pub(crate) fn remove(&mut self, key: u64) -> Option<u32> {
        let mut i = self.find(key)?;
        let value = self.slots[i].value;
        // Backward shift: pull each following displaced entry one slot closer to its home.
        loop {
            let j = self.next(i);
            if self.slots[j].value == 0 || self.dist(j) == 0 {
                self.slots[i] = Slot::default();
                break;
            }
            self.slots[i] = self.slots[j];
            i = j;
        }
        self.len -= 1;
        if self.len * SHRINK_BELOW.1 < self.slots.len() * SHRINK_BELOW.0 {
            self.shrink();
        }
        Some(value)
    }

    fn shrink(&mut self) {
        if self.len == 0 {
            *self = Self::default();
            return;
        }
        let cap = (self.len * SHRINK_TO.1).div_ceil(SHRINK_TO.0);
        if cap.max(MIN_CAPACITY) < self.slots.len() {
            self.resize(cap);
        }
    }

    fn resize(&mut self, capacity: usize) {
        let capacity = capacity.max(MIN_CAPACITY).max(self.len + 1);
        let old = std::mem::replace(&mut self.slots, vec![Slot::default(); capacity]);
        for s in old {
            if s.value != 0 {
                self.insert_new(s);
            }
        }
    }

    /// Every entry as `(key, value)`, in slot order.
    pub(crate) fn iter(&self) -> impl Iterator<Item = (u64, u32)> + '_ {
        self.slots
            .iter()
            .filter(|s| s.value != 0)
            .map(|s| (s.key(), s.value))
    }

    /// Keeps the entries for which `f` returns a nonzero value, set to that value. A full
    /// rebuild when anything is dropped: it serves only whole-index scans (an endpoint's reset
    /// or removal), which are O(entries) anyway.
    pub(crate) fn retain(&mut self, mut f: impl FnMut(u64, u32) -> u32) {
        let mut dropped = false;
        for s in &mut self.slots {
            if s.value != 0 {
                s.value = f(s.key(), s.value);
                if s.value == 0 {
                    dropped = true;
                    self.len -= 1;
                }
            }
        }
        if dropped {
            let old = std::mem::take(&mut self.slots);
            let live: Vec<Slot> = old.into_iter().filter(|s| s.value != 0).collect();
            if live.is_empty() {
                return;
            }
            self.slots = vec![Slot::default(); (live.len() * GROW_TO.1).div_ceil(GROW_TO.0)];
            self.slots
                .resize(self.slots.len().max(MIN_CAPACITY), Slot::default());
            for s in live {
                self.insert_new(s);
            }
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
                if t.slots.len() > MIN_CAPACITY {
                    prop_assert!(t.len * SHRINK_BELOW.1 >= t.slots.len() * SHRINK_BELOW.0);
                }
                prop_assert!(t.len * MAX_LOAD.1 <= t.slots.len() * MAX_LOAD.0 || t.len == 0);
            }
            for (k, v) in &m {
                prop_assert_eq!(t.get(*k), Some(*v));
            }
            let mut all: Vec<(u64, u32)> = t.iter().collect();
            all.sort_unstable();
            let mut want: Vec<(u64, u32)> = m.into_iter().collect();
            want.sort_unstable();
            prop_assert_eq!(all, want);
        }
    }

    #[test]
    fn churn_does_not_grow_the_table() {
        let mut t = BlockTable::default();
        for k in 0..10_000u64 {
            t.insert(k, 1);
        }
        let cap = t.slots.len();
        for k in 10_000..1_000_000u64 {
            t.remove(k - 10_000);
            t.insert(k, 1);
        }
        assert_eq!(t.len(), 10_000);
        assert_eq!(t.slots.len(), cap, "a steady live set keeps its table");
    }
}
