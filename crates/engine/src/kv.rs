//! The paged KV-cache block pool: ref-counted blocks, an O(1) LRU free queue and the prefix-cache
//! index from block-hash key to block.
//!
//! Mirrors vLLM V1's `BlockPool`: a block whose refcount drops to zero keeps its hash and joins the
//! tail of the free queue, so it can still be hit until it reaches the head and is reused for
//! other content (evicted). The queue is a doubly linked list threaded through per-block
//! `prev`/`next` indices, so touching a cached free block (removing it from the middle), freeing
//! and allocating are all O(1) with no allocation.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

use crate::KvEvent;

/// "No block" in the free-queue links.
const NIL: u32 = u32::MAX;

/// Hasher for keys that are already well mixed (low 64 bits of SHA-256) or small integers
/// (request ids): one folded 64×64→128-bit multiply. SipHash (std's default) defends against
/// HashDoS, which cannot happen here (the engine is a simulator fed by our own benchmark), and
/// costs several times more on the hot path of prefix lookups. The multiply still spreads
/// sequential keys (test ids 1, 2, 3…) over all bits, which an identity hash would not.
#[derive(Clone, Copy, Default)]
pub(crate) struct FoldHasher(u64);

/// Odd 64-bit constant (2^64 / golden ratio), the usual multiplicative-hashing factor.
const FOLD_MUL: u64 = 0x9e37_79b9_7f4a_7c15;

#[inline]
fn fold(x: u64) -> u64 {
    let m = u128::from(x) * u128::from(FOLD_MUL);
    (m as u64) ^ ((m >> 64) as u64)
}

impl Hasher for FoldHasher {
    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut b = [0u8; 8];
            b[..chunk.len()].copy_from_slice(chunk);
            self.0 = fold(self.0 ^ u64::from_le_bytes(b));
        }
    }
    #[inline]
    fn write_u64(&mut self, x: u64) {
        self.0 = fold(self.0 ^ x);
    }
    #[inline]
    fn finish(&self) -> u64 {
        self.0
    }
}

/// `HashMap` with [`FoldHasher`].
pub(crate) type FoldMap<K, V> = HashMap<K, V, BuildHasherDefault<FoldHasher>>;

#[derive(Clone, Copy, Debug)]
struct Block {
    ref_cnt: u32,
    /// Prefix-cache key while the block is registered in the index.
    hash: Option<u64>,
    prev: u32,
    next: u32,
}

/// The block pool. Block 0 is vLLM's reserved null block: never allocated, never freed, and left
/// out of the usage (an idle engine reports 0, as vLLM does).
#[derive(Debug)]
pub(crate) struct BlockPool {
    blocks: Vec<Block>,
    head: u32,
    tail: u32,
    num_free: usize,
    index: FoldMap<u64, u32>,
    /// Further blocks holding a key `index` maps to another block: vLLM's block pool does not
    /// de-duplicate (two requests computing the same content at once, a full-prompt hit
    /// recomputing its last block), so each copy is cached, hit through the index's one, and
    /// removed with its own `BlockRemoved` when evicted (rare, so kept apart).
    dups: FoldMap<u64, Vec<u32>>,
    /// Reused by `free_reversed`.
    scratch: Vec<u32>,
}

impl BlockPool {
    pub(crate) fn new(num_blocks: usize) -> Self {
        let n = num_blocks as u32;
        let mut blocks: Vec<Block> = (0..n)
            .map(|i| Block {
                ref_cnt: 0,
                hash: None,
                prev: if i == 0 { NIL } else { i - 1 },
                next: if i + 1 == n { NIL } else { i + 1 },
            })
            .collect();
        // Pin the null block outside the queue.
        blocks[0].ref_cnt = 1;
        blocks[0].next = NIL;
        let (head, tail) = if n > 1 { (1, n - 1) } else { (NIL, NIL) };
        if n > 1 {
            blocks[1].prev = NIL;
        }
        Self {
            blocks,
            head,
            tail,
            num_free: num_blocks - 1,
            index: FoldMap::with_capacity_and_hasher(num_blocks, Default::default()),
            dups: FoldMap::default(),
            scratch: Vec::new(),
        }
    }

    /// Blocks in the free queue (never-used, and cached-but-unreferenced).
    pub(crate) fn num_free(&self) -> usize {
        self.num_free
    }

    /// All blocks including the null block.
    #[cfg(test)]
    pub(crate) fn num_blocks(&self) -> usize {
        self.blocks.len()
    }

    /// Fraction of blocks referenced by some request, the null block left out of both counts
    /// (vLLM's `get_usage`: an idle engine reports 0).
    pub(crate) fn usage(&self) -> f64 {
        let usable = self.blocks.len().saturating_sub(1);
        if usable == 0 {
            return 0.0;
        }
        1.0 - self.num_free as f64 / usable as f64
    }

    /// The cached block holding `key`, if any.
    #[inline]
    pub(crate) fn lookup(&self, key: u64) -> Option<u32> {
        self.index.get(&key).copied()
    }

    /// Number of cached blocks (copies of a key included).
    pub(crate) fn num_cached(&self) -> usize {
        self.index.len() + self.dups.values().map(Vec::len).sum::<usize>()
    }

    pub(crate) fn ref_cnt(&self, block: u32) -> u32 {
        self.blocks[block as usize].ref_cnt
    }

    fn unlink(&mut self, b: u32) {
        let Block { prev, next, .. } = self.blocks[b as usize];
        if prev == NIL {
            self.head = next;
        } else {
            self.blocks[prev as usize].next = next;
        }
        if next == NIL {
            self.tail = prev;
        } else {
            self.blocks[next as usize].prev = prev;
        }
        self.blocks[b as usize].prev = NIL;
        self.blocks[b as usize].next = NIL;
        self.num_free -= 1;
    }

    fn push_head(&mut self, b: u32) {
        self.blocks[b as usize].prev = NIL;
        self.blocks[b as usize].next = self.head;
        if self.head == NIL {
            self.tail = b;
        } else {
            self.blocks[self.head as usize].prev = b;
        }
        self.head = b;
        self.num_free += 1;
    }

    fn push_tail(&mut self, b: u32) {
        self.blocks[b as usize].prev = self.tail;
        self.blocks[b as usize].next = NIL;
        if self.tail == NIL {
            self.head = b;
        } else {
            self.blocks[self.tail as usize].next = b;
        }
        self.tail = b;
        self.num_free += 1;
    }

    /// Takes a reference on a cache-hit block, pulling it out of the free queue if it was there.
    pub(crate) fn touch(&mut self, b: u32) {
        if self.blocks[b as usize].ref_cnt == 0 {
            self.unlink(b);
        }
        self.blocks[b as usize].ref_cnt += 1;
    }

    /// Pops `n` blocks from the head of the free queue (least recently freed first) onto `out`,
    /// evicting any cached content they still hold. Evicted keys are appended to `evicted`.
    /// The caller has checked `n <= num_free()`.
    pub(crate) fn allocate(&mut self, n: usize, out: &mut Vec<u32>, evicted: &mut Vec<u64>) {
        debug_assert!(n <= self.num_free);
        for _ in 0..n {
            let b = self.head;
            debug_assert_ne!(b, NIL);
            self.unlink(b);
            let blk = &mut self.blocks[b as usize];
            blk.ref_cnt = 1;
            if let Some(key) = blk.hash.take() {
                self.unindex(b, key);
                evicted.push(key);
            }
            out.push(b);
        }
    }

    /// Drops one reference from each block, in reverse order so a request's tail blocks (the
    /// least likely to be shared) reach the free queue first and are evicted first. As vLLM
    /// 0.32's `BlockPool.free_blocks` (PR #42656): a freed block with a hash joins the tail
    /// (LRU among cached blocks), one without (a partial last block, nothing a request can
    /// hit) the front, in that same order, to be reused before any cached block is evicted.
    /// Appending those too evicted cached prefixes a request earlier than the engine does (a
    /// real vLLM's capture, `crates/signals/tests/fixtures/vllm032`, evicts first at filler 15;
    /// appending, at filler 14).
    pub(crate) fn free_reversed(&mut self, blocks: &[u32]) {
        let mut unhashed = std::mem::take(&mut self.scratch);
        for &b in blocks.iter().rev() {
            let blk = &mut self.blocks[b as usize];
            debug_assert!(blk.ref_cnt > 0);
            blk.ref_cnt -= 1;
            if blk.ref_cnt == 0 {
                if blk.hash.is_some() {
                    self.push_tail(b);
                } else {
                    unhashed.push(b);
                }
            }
        }
        // The first of them ends up at the head.
        for &b in unhashed.iter().rev() {
            self.push_head(b);
        }
        unhashed.clear();
        self.scratch = unhashed;
    }

    /// Registers a full, computed block under `key`; a copy when another block already holds
    /// the key (see `dups`). Every registered block is published stored, and removed when
    /// evicted, as vLLM's pool does.
    pub(crate) fn cache(&mut self, b: u32, key: u64) {
        match self.index.entry(key) {
            std::collections::hash_map::Entry::Occupied(_) => {
                self.dups.entry(key).or_default().push(b);
            }
            std::collections::hash_map::Entry::Vacant(v) => {
                v.insert(b);
            }
        }
        self.blocks[b as usize].hash = Some(key);
    }

    /// Block `b`, holding `key`, is evicted: another copy, if any, becomes the one hits use.
    fn unindex(&mut self, b: u32, key: u64) {
        if self.index.get(&key) == Some(&b) {
            match self.dups.get_mut(&key).and_then(Vec::pop) {
                Some(other) => {
                    self.index.insert(key, other);
                }
                None => {
                    self.index.remove(&key);
                }
            }
        } else if let Some(copies) = self.dups.get_mut(&key)
            && let Some(at) = copies.iter().position(|&c| c == b)
        {
            copies.swap_remove(at);
        }
        if self.dups.get(&key).is_some_and(Vec::is_empty) {
            self.dups.remove(&key);
        }
    }

    /// Forgets every cached hash (used and free blocks alike).
    pub(crate) fn clear_index(&mut self) {
        for (_, copies) in self.dups.drain() {
            for b in copies {
                self.blocks[b as usize].hash = None;
            }
        }
        for (_, b) in self.index.drain() {
            self.blocks[b as usize].hash = None;
        }
    }

    /// Checks the pool's invariants (tests only): the free queue is a consistent list of exactly
    /// the unreferenced blocks, and the index and block hashes agree.
    #[cfg(test)]
    pub(crate) fn check(&self) -> Result<(), String> {
        let mut seen = 0usize;
        let mut prev = NIL;
        let mut cur = self.head;
        while cur != NIL {
            let blk = &self.blocks[cur as usize];
            if blk.ref_cnt != 0 {
                return Err(format!(
                    "block {cur} in free queue with ref {}",
                    blk.ref_cnt
                ));
            }
            if blk.prev != prev {
                return Err(format!("block {cur} has a broken prev link"));
            }
            prev = cur;
            cur = blk.next;
            seen += 1;
            if seen > self.blocks.len() {
                return Err("free queue has a cycle".into());
            }
        }
        if prev != self.tail {
            return Err("tail mismatch".into());
        }
        let zero = self.blocks.iter().filter(|b| b.ref_cnt == 0).count();
        if seen != self.num_free || zero != self.num_free {
            return Err(format!(
                "num_free {} queue {seen} unreferenced {zero}",
                self.num_free
            ));
        }
        for (&k, &b) in &self.index {
            if self.blocks[b as usize].hash != Some(k) {
                return Err(format!("index {k} -> {b} but block hash differs"));
            }
        }
        for (&k, copies) in &self.dups {
            if !self.index.contains_key(&k) || copies.is_empty() {
                return Err(format!("copies of {k} without an indexed block"));
            }
            if copies
                .iter()
                .any(|&b| self.blocks[b as usize].hash != Some(k))
            {
                return Err(format!("a copy of {k} holds another hash"));
            }
        }
        let hashed = self.blocks.iter().filter(|b| b.hash.is_some()).count();
        if hashed != self.num_cached() {
            return Err(format!(
                "{hashed} hashed blocks, {} cached",
                self.num_cached()
            ));
        }
        Ok(())
    }
}

/// Appends one `BlockRemoved` for the keys evicted by an allocation, if any.
pub(crate) fn push_removed(events: &mut Vec<KvEvent>, evicted: &mut Vec<u64>) {
    if !evicted.is_empty() {
        events.push(KvEvent::BlockRemoved {
            block_hashes: std::mem::take(evicted),
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lru_order_and_eviction() {
        let mut p = BlockPool::new(5); // 4 usable
        assert_eq!(p.num_free(), 4);
        let (mut a, mut ev) = (Vec::new(), Vec::new());
        p.allocate(3, &mut a, &mut ev);
        assert_eq!(a, vec![1, 2, 3]);
        for (b, k) in [(1, 11), (2, 22), (3, 33)] {
            p.cache(b, k);
        }
        // Freed in reverse: 3, 2, 1 join the tail after never-used block 4.
        p.free_reversed(&a);
        p.check().unwrap();
        let mut b = Vec::new();
        p.allocate(2, &mut b, &mut ev);
        assert_eq!(
            b,
            vec![4, 3],
            "never-used block first, then the request's tail block"
        );
        assert_eq!(ev, vec![33]);
        assert_eq!(p.lookup(33), None);
        assert_eq!(p.lookup(11), Some(1));
        // A hit on a free cached block pulls it out of the queue.
        p.touch(1);
        assert_eq!(p.ref_cnt(1), 1);
        assert_eq!(p.num_free(), 1);
        p.check().unwrap();
    }

    /// vLLM 0.32's `free_blocks`: freed blocks without a hash (a request's partial last
    /// block) go to the front of the queue, in eviction order, and are reused before any
    /// cached block is evicted; hashed ones join the tail.
    #[test]
    fn unhashed_blocks_are_reused_before_cached_ones_are_evicted() {
        let mut p = BlockPool::new(6); // 5 usable
        let (mut a, mut ev) = (Vec::new(), Vec::new());
        p.allocate(4, &mut a, &mut ev);
        assert_eq!(a, vec![1, 2, 3, 4]);
        // Blocks 1 and 2 full and cached; 3 and 4 (the partial tail) never hashed.
        p.cache(1, 11);
        p.cache(2, 22);
        p.free_reversed(&a);
        p.check().unwrap();
        let mut b = Vec::new();
        p.allocate(3, &mut b, &mut ev);
        assert_eq!(
            b,
            vec![4, 3, 5],
            "the unhashed tail first, then the never-used block"
        );
        assert!(ev.is_empty(), "nothing cached evicted");
        assert_eq!((p.lookup(11), p.lookup(22)), (Some(1), Some(2)));
        b.clear();
        p.allocate(1, &mut b, &mut ev);
        assert_eq!(
            (b, ev),
            (vec![2], vec![22]),
            "then the LRU cached block, the tail's first"
        );
        p.check().unwrap();
    }

    /// Two blocks computed with the same key are both cached (vLLM's pool does not
    /// de-duplicate), each evicted with its own removal, and the key stays hit while a copy
    /// does.
    #[test]
    fn copies_of_a_key_are_cached_and_evicted_each() {
        let mut p = BlockPool::new(3);
        let (mut a, mut ev) = (Vec::new(), Vec::new());
        p.allocate(2, &mut a, &mut ev);
        p.cache(1, 7);
        p.cache(2, 7);
        assert_eq!(p.num_cached(), 2);
        p.check().unwrap();
        p.free_reversed(&a);
        // Freed in reverse: block 2 first in the queue, so evicted first; 1 still hits.
        let mut b = Vec::new();
        p.allocate(1, &mut b, &mut ev);
        assert_eq!((b.clone(), ev.clone()), (vec![2], vec![7]));
        assert_eq!(p.lookup(7), Some(1));
        p.check().unwrap();
        p.allocate(1, &mut b, &mut ev);
        assert_eq!(ev, vec![7, 7], "one removal per copy");
        assert_eq!(p.lookup(7), None);
        p.check().unwrap();
        p.cache(1, 9);
        p.cache(2, 9);
        p.clear_index();
        assert_eq!(p.num_cached(), 0);
        p.check().unwrap();
    }
}
