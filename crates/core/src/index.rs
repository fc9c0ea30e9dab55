//! The prefix index: which endpoints hold which prompt blocks, from two sources.
//!
//! * **Precise** entries come from the engines' KV events (`BlockStored` / `BlockRemoved` /
//!   `AllBlocksCleared`), one bit per tier (GPU, CPU, disk).
//! * **Approximate** entries come from the router's own decisions: booking a request onto an
//!   endpoint records the request's keys there with a timestamp. They expire after a TTL and are
//!   capped per endpoint with least-recently-touched eviction.
//!
//! Keys are the router's own chain over token ids ([`crate::keys`]); the router translates the
//! engines' hashes before calling [`PrefixIndex::store`] / [`PrefixIndex::remove`].
//!
//! Per endpoint the index knows whether its events can be trusted (flowing, gap-free, and the
//! engine's reported cached tokens agreeing with the predictions). A trusted endpoint is matched
//! on its precise entries *and* its live approximate entries; an untrusted one on approximate
//! entries only. Approximate entries of a trusted endpoint are not shadowed by a short grace
//! window but kept until their TTL, because an engine's `BlockRemoved` for a key also removes
//! the router's approximate entry for it (the engine said the block is gone): with working keys
//! the two sources then agree, and approximate entries only outlive the engine's for blocks the
//! engine never published under the router's key — requests not yet stored (the dispatch →
//! `BlockStored` lag, so a burst of same-prefix requests keeps co-locating), or every block
//! when the router's tokens differ from the engine's (a wrong tokenizer). In that last case the
//! precise entries never match and the endpoint is matched exactly as approximate tracking
//! would match it: a broken precise view is never worse than no events at all.
//!
//! ## Layout and why
//! One table from block key to its holders, each holder `(endpoint, tier bits, approximate
//! timestamp)`. Most keys have one holder that only the engine's events put there (precise, no
//! timestamp to keep): it is packed into the table's 4-byte value (`endpoint << 3 | tiers`), so
//! the common case is one 12-byte slot and no allocation. Other keys spill into an arena that
//! the value indexes: a block cached on several engines as their packed values (4 bytes per
//! holder, sorted by endpoint), and a key with an approximate entry as 16-byte records that
//! keep its stamp. Each holder set has exactly one form, so equal sets compare equal, which the
//! walk's run skipping relies on. A query walks the request's key chain once: at block `i` only
//! endpoints that matched blocks `0..i` can advance, so the walk stops at the first block no
//! remaining endpoint holds, and costs `O(Σ holders of the matched blocks)` table probes. Keys
//! are already uniformly distributed hashes, so the table uses a cheap fixed multiply-fold hash
//! (deterministic, no SipHash cost).
//!
//! ## Memory per entry
//! Counted from the capacities of every container ([`PrefixIndex::memory`]; rerun with
//! `cargo run --release -p kvgate-core --example index_memory`). The block table
//! (`index/table.rs`) is sized to the live set rather than to a power of two, and deletes
//! without tombstones, so its load stays within [0.42, 0.8] whatever the churn: a private
//! precise entry costs 12.8 B / load, 16–30.5 bytes. The arena and the eviction logs grow by a
//! quarter rather than doubling, for the same reason. Measured, bytes per (block, endpoint)
//! entry, freshly built → after every endpoint turned its cache over 20 times (256 random
//! evictions and stores per round):
//!
//! | shape | now | hashbrown map of 32-byte slots (before) |
//! |---|---|---|
//! | 10 endpoints × 29,205 private blocks (a full H100 cache each) | 16.1 → 16.1 | 59.2 → 118.5 |
//! | worst of 16 live sizes, 40k–190k entries | 23.1 → 23.1 | 72.1 → 133.1 |
//! | blocks on 2 engines | 26.0 → 26.0 | 51.0 → 78.1 |
//! | blocks on 10 engines | 9.2 → 9.2 | 24.6 → 30.0 |
//! | approximate entries at capacity, eviction log included | 65.4 | 127.5 |
//!
//! The old map doubled under churn (tombstones) and never shrank. A unit test holds the
//! churned figures for blocks on 1, 2 and 3 engines to ≤ 32 bytes. Approximate entries stay
//! dearer (a 16-byte record for the stamp in a 24-byte arena slot, and a 16-byte log record
//! for LRU order), but they are bounded by `approx_capacity_blocks` per endpoint.
//!
//! ## Memory bound and eviction
//! * Approximate entries: at most `approx_capacity_blocks` per endpoint. Eviction is least
//!   recently *touched* (a booking re-touches every block of its prompt), implemented as an
//!   append-only log of `(key, stamp)` popped from the front; a popped record only evicts if the
//!   holder still carries that stamp (otherwise it was re-touched later). The log is compacted
//!   when it grows past twice the live entries. LRU because the engines evict LRU among
//!   unreferenced blocks, so the router's guess ages the way the engine's cache does; the TTL
//!   additionally forgets entries the engine has most likely evicted under other routers' load.
//! * Precise entries: the engine's own evictions (`BlockRemoved`) keep them at the engine's
//!   capacity. `precise_capacity_blocks` per endpoint is only a guard against lost removals: if
//!   it is exceeded the endpoint's view is evidently wrong, so its precise entries are dropped
//!   and it is marked untrusted until a resync (rather than evicting arbitrary blocks and
//!   silently keeping a wrong view).

use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasher, Hasher};

use crate::endpoint::{EndpointId, Tier};

mod table;

use table::BlockTable;

const GPU: u8 = 1;
const CPU: u8 = 2;
const DISK: u8 = 4;
const TIERS: u8 = GPU | CPU | DISK;
const APPROX: u8 = 8;

pub(crate) fn tier_bit(t: Tier) -> u8 {
    match t {
        Tier::Gpu => GPU,
        Tier::Cpu => CPU,
        Tier::Disk => DISK,
    }
}

/// Multiply-fold hasher for keys that are already uniform 64-bit hashes.
#[derive(Clone, Copy, Default)]
pub(crate) struct KeyHasher(u64);

impl Hasher for KeyHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.write_u64(u64::from(*b));
        }
    }
    fn write_u64(&mut self, k: u64) {
        // Folded 128-bit multiply by an odd constant: mixes high and low bits into both halves.
        let m = u128::from(k ^ self.0) * 0x9E37_79B9_7F4A_7C15_u128;
        self.0 = (m as u64) ^ ((m >> 64) as u64);
    }
    fn write_u32(&mut self, k: u32) {
        self.write_u64(u64::from(k));
    }
}

/// Builds [`KeyHasher`]s.
#[derive(Clone, Copy, Default)]
pub(crate) struct KeyHasherBuilder;

impl BuildHasher for KeyHasherBuilder {
    type Hasher = KeyHasher;
    fn build_hasher(&self) -> KeyHasher {
        KeyHasher::default()
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Holder {
    approx_stamp_us: u64,
    ep: u32,
    flags: u8,
}

/// The holders of one block key, in the form mutations work on ([`Arena::encode`] stores it
/// in its compact form afterwards). `Many` keeps a header record at index 0 (endpoint
/// [`HEADER_EP`], never a real id) whose `approx_stamp_us` field holds an order-independent
/// fingerprint of the real holders after it; the walk compares fingerprints to detect runs of
/// blocks with identical holders in O(1). Every mutation ends in [`Holders::prune`] (or `push`),
/// which refreshes the fingerprint.
#[derive(Clone, Debug)]
enum Holders {
    One(Holder),
    Many(Vec<Holder>),
}

/// Endpoint field of the `Many` header record. Endpoint ids are allocated densely from 0, so
/// this value is never a real endpoint.
const HEADER_EP: u32 = u32::MAX;

fn holder_fingerprint(hs: &[Holder]) -> u64 {
    hs.iter().fold(0u64, |acc, h| {
        let x = ((u64::from(h.ep) << 8) | u64::from(h.flags)) ^ h.approx_stamp_us.rotate_left(32);
        let m = u128::from(x ^ 0x243F_6A88_85A3_08D3) * 0x9E37_79B9_7F4A_7C15_u128;
        acc ^ ((m as u64) ^ ((m >> 64) as u64))
    })
}

impl Holders {
    fn find_mut(&mut self, ep: u32) -> Option<&mut Holder> {
        match self {
            Self::One(h) => (h.ep == ep).then_some(h),
            Self::Many(v) => v[1..].iter_mut().find(|h| h.ep == ep),
        }
    }
    /// The holder of `fresh.ep`, pushed as `fresh` first if absent.
    fn find_or_push(&mut self, fresh: Holder) -> &mut Holder {
        if self.find_mut(fresh.ep).is_none() {
            self.push(fresh);
        }
        self.find_mut(fresh.ep).expect("just pushed")
    }
    fn push(&mut self, h: Holder) {
        match self {
            Self::One(first) => *self = Self::Many(vec![HEADER, *first, h]),
            Self::Many(v) => v.push(h),
        }
        self.refresh();
    }
    fn refresh(&mut self) {
        if let Self::Many(v) = self {
            v[0].approx_stamp_us = holder_fingerprint(&v[1..]);
        }
    }
    /// Drops holders with no flags left and refreshes the fingerprint; returns whether any
    /// holder remains.
    fn prune(&mut self) -> bool {
        match self {
            Self::One(h) => h.flags != 0,
            Self::Many(v) => {
                v.retain(|h| h.ep == HEADER_EP || h.flags != 0);
                match v.len() {
                    1 => false,
                    2 => {
                        *self = Self::One(v[1]);
                        true
                    }
                    _ => {
                        v[0].approx_stamp_us = holder_fingerprint(&v[1..]);
                        true
                    }
                }
            }
        }
    }
}

/// A block's holders as read from the table, without copying a spilled set.
#[derive(Clone, Copy)]
enum View<'a> {
    /// An inline holder, or a spilled single one, by value.
    One(Holder),
    /// A spilled [`Holders::Many`] (header record first).
    Many(&'a [Holder]),
    /// A spilled [`Spilled::Packed`] set, fingerprint words included.
    Packed(&'a [u32]),
}

/// Packed sets larger than this carry a 64-bit fingerprint in two leading words, so the walk's
/// run skipping compares them in O(1) (a chain held by 100 engines would otherwise cost 100
/// compares per block); smaller ones are compared whole, which is as cheap and costs no memory.
/// A packed set has at least 2 holders, so a slice longer than this has the fingerprint (a
/// fingerprinted set is at least `PACKED_EXACT + 3` words long).
const PACKED_EXACT: usize = 4;

/// The holders of a packed set, without its fingerprint words.
#[inline]
fn packed_holders(p: &[u32]) -> &[u32] {
    if p.len() > PACKED_EXACT { &p[2..] } else { p }
}

/// The packed form of precise-only `holders` (inline values sorted by endpoint), with the
/// fingerprint words when it has more than [`PACKED_EXACT`] holders.
fn pack(mut holders: Vec<u32>) -> Box<[u32]> {
    holders.sort_unstable();
    if holders.len() <= PACKED_EXACT {
        return holders.into_boxed_slice();
    }
    let fp = holders.iter().fold(0u64, |acc, &v| {
        let m = u128::from(u64::from(v) ^ 0x243F_6A88_85A3_08D3) * 0x9E37_79B9_7F4A_7C15_u128;
        acc.rotate_left(5) ^ ((m as u64) ^ ((m >> 64) as u64))
    });
    let mut out = Vec::with_capacity(holders.len() + 2);
    out.extend([fp as u32, (fp >> 32) as u32]);
    out.extend(holders);
    out.into_boxed_slice()
}

/// The holders of a [`View`], by value.
enum ViewIter<'a> {
    Records(std::slice::Iter<'a, Holder>),
    Packed(std::slice::Iter<'a, u32>),
}

impl Iterator for ViewIter<'_> {
    type Item = Holder;
    #[inline]
    fn next(&mut self) -> Option<Holder> {
        match self {
            Self::Records(it) => it.next().copied(),
            Self::Packed(it) => it.next().map(|&v| decode_inline(v)),
        }
    }
}

impl View<'_> {
    #[inline]
    fn iter(&self) -> ViewIter<'_> {
        match self {
            Self::One(h) => ViewIter::Records(std::slice::from_ref(h).iter()),
            Self::Many(v) => ViewIter::Records(v[1..].iter()),
            Self::Packed(p) => ViewIter::Packed(packed_holders(p).iter()),
        }
    }
    fn len(&self) -> usize {
        match self {
            Self::One(_) => 1,
            Self::Many(v) => v.len() - 1,
            Self::Packed(p) => packed_holders(p).len(),
        }
    }
    #[inline]
    fn find(&self, ep: u32) -> Option<Holder> {
        match self {
            Self::Packed(p) => {
                let p = packed_holders(p);
                p.binary_search_by_key(&ep, |&v| v >> INLINE_TIER_BITS)
                    .ok()
                    .map(|i| decode_inline(p[i]))
            }
            _ => self.iter().find(|h| h.ep == ep),
        }
    }
    /// Whether both hold the same records. Each set has one form (see [`Arena::encode`]), so
    /// sets of different forms differ. Exact for single holders and small packed sets (sorted,
    /// so equal sets are equal slices); by fingerprint for `Many` and large packed sets (equal
    /// sets have equal fingerprints; unequal ones collide with probability 2⁻⁶⁴).
    #[inline]
    fn same_holders(&self, other: &Self) -> bool {
        match (self, other) {
            (Self::One(a), Self::One(b)) => a == b,
            (Self::Many(a), Self::Many(b)) => {
                a.len() == b.len() && a[0].approx_stamp_us == b[0].approx_stamp_us
            }
            // Large sets: by fingerprint. Small ones: whole, branch-free and inline (`==` on
            // slices calls `memcmp`, which was the walk's largest cost).
            (Self::Packed(a), Self::Packed(b)) if a.len() > PACKED_EXACT => {
                a.len() == b.len() && a[0] == b[0] && a[1] == b[1]
            }
            (Self::Packed(a), Self::Packed(b)) => {
                a.len() == b.len() && a.iter().zip(*b).fold(0, |acc, (x, y)| acc | (x ^ y)) == 0
            }
            _ => false,
        }
    }
}

/// Table value of a spilled holder set: this bit plus its arena index.
const SPILLED: u32 = 1 << 31;
/// Bits of the tier flags in an inline table value (endpoint id above them).
const INLINE_TIER_BITS: u32 = 3;

/// `h` as a 4-byte inline value, if it is precise only (no approximate stamp to keep) and its
/// endpoint id is below 2²⁸. Never 0 (an inline holder has a tier bit set).
fn encode_holder(h: &Holder) -> Option<u32> {
    (h.flags & APPROX == 0 && h.flags & TIERS != 0 && h.ep < (SPILLED >> INLINE_TIER_BITS))
        .then(|| (h.ep << INLINE_TIER_BITS) | u32::from(h.flags))
}

#[inline]
fn decode_inline(v: u32) -> Holder {
    Holder {
        approx_stamp_us: 0,
        ep: v >> INLINE_TIER_BITS,
        flags: (v & ((1 << INLINE_TIER_BITS) - 1)) as u8,
    }
}

/// A holder set as the arena stores it.
#[derive(Clone, Debug)]
enum Spilled {
    /// One holder that cannot be inline (it has an approximate stamp).
    One(Holder),
    /// Several holders, some approximate: [`Holders::Many`]'s layout, exact capacity.
    Many(Vec<Holder>),
    /// Several precise-only holders as inline values sorted by endpoint, 4 bytes each (after
    /// two fingerprint words when there are more than [`PACKED_EXACT`]): the form of a block
    /// cached on several engines. Built by [`pack`].
    Packed(Box<[u32]>),
}

/// The spilled holder sets, indexed from the table, with a free list so churn reuses arena
/// slots instead of growing the arena.
///
/// Packed sets with a fingerprint (more than [`PACKED_EXACT`] holders: a block cached on many
/// engines, such as a system prompt's) are shared: every block with the same holders has the
/// same table value, counted in `shared`. So a prefix cached on a hundred engines stores its
/// holders once instead of once per block, and the walk tells that the next block has the same
/// holders by comparing two table values, without reading the set. Smaller sets are not shared:
/// their exact compare is as cheap, and a set of two holders shared by nobody would pay its
/// map entry (~20 bytes) out of an 8-byte saving, over the index's 32-byte budget per entry.
/// Two different sets with the same fingerprint (probability 2⁻⁶⁴ per pair) are both kept,
/// the second unshared.
#[derive(Clone, Debug, Default)]
struct Arena {
    sets: Vec<Spilled>,
    free: Vec<u32>,
    /// Shared packed sets: fingerprint → (slot, table values pointing at it).
    shared: HashMap<u64, (u32, u32), KeyHasherBuilder>,
}

/// The fingerprint a shared packed set is found by (its two leading words); `None` for sets
/// too small to carry one.
#[inline]
fn packed_fingerprint(p: &[u32]) -> Option<u64> {
    (p.len() > PACKED_EXACT).then(|| u64::from(p[0]) | (u64::from(p[1]) << 32))
}

impl Arena {
    fn alloc(&mut self, set: Spilled) -> u32 {
        if let Some(i) = self.free.pop() {
            self.sets[i as usize] = set;
            return i;
        }
        let i = u32::try_from(self.sets.len())
            .ok()
            .filter(|i| i & SPILLED == 0)
            .expect("fewer than 2^31 spilled holder sets");
        if self.sets.len() == self.sets.capacity() {
            // Grow by a quarter, not double: the arena's spare capacity counts in the
            // per-entry budget. Still geometric, so pushes stay amortised O(1).
            self.sets.reserve_exact((self.sets.len() / 4).max(64));
        }
        self.sets.push(set);
        i
    }
    /// Takes the holders a table value stands for, as a working [`Holders`] (leaving an arena
    /// slot to refill or release).
    ///
    /// A packed set is copied out and its slot left alone (it may be shared): the
    /// [`Self::encode`] that follows releases this key's reference to it.
    fn decode(&mut self, v: u32) -> Holders {
        if v & SPILLED == 0 {
            return Holders::One(decode_inline(v));
        }
        match &mut self.sets[(v & !SPILLED) as usize] {
            Spilled::One(h) => Holders::One(*h),
            Spilled::Many(v) => Holders::Many(std::mem::take(v)),
            Spilled::Packed(p) => {
                let mut v = Vec::with_capacity(p.len() + 2);
                v.push(HEADER);
                v.extend(packed_holders(p).iter().map(|&x| decode_inline(x)));
                Holders::Many(v)
            }
        }
    }

    /// Drops one table value's reference to the packed set in slot `i`, freeing the slot with
    /// the last.
    fn release_packed(&mut self, i: u32) {
        if let Spilled::Packed(p) = &self.sets[i as usize]
            && let Some(fp) = packed_fingerprint(p)
            && let Some((slot, refs)) = self.shared.get_mut(&fp)
            && *slot == i
        {
            *refs -= 1;
            if *refs > 0 {
                return;
            }
            self.shared.remove(&fp);
        }
        self.sets[i as usize] = Spilled::One(EMPTY_HOLDER);
        self.free.push(i);
    }

    /// The table value of packed set `p`: the shared slot of an equal set if there is one,
    /// else `reuse` (a slot this key's old set left free) or a new slot.
    fn store_packed(&mut self, p: Box<[u32]>, reuse: Option<u32>) -> u32 {
        let fp = packed_fingerprint(&p);
        if let Some(fp) = fp
            && let Some((slot, refs)) = self.shared.get_mut(&fp)
            && matches!(&self.sets[*slot as usize], Spilled::Packed(q) if *q == p)
        {
            *refs += 1;
            let slot = *slot;
            if let Some(i) = reuse {
                self.free.push(i);
            }
            return slot | SPILLED;
        }
        let i = match reuse {
            Some(i) => {
                self.sets[i as usize] = Spilled::Packed(p);
                i
            }
            None => self.alloc(Spilled::Packed(p)),
        };
        if let Some(fp) = fp {
            self.shared.entry(fp).or_insert((i, 1));
        }
        i | SPILLED
    }
    /// The table value for `hs` (0 when no holder is left) in its one canonical form, given
    /// the key's previous value: reuses its arena slot when `hs` still spills, releases it
    /// when not.
    fn encode(&mut self, old: Option<u32>, hs: Holders) -> u32 {
        let spilled = old.filter(|v| v & SPILLED != 0).map(|v| v & !SPILLED);
        // An old packed set stays in its slot (see `decode`): this key's reference to it is
        // released once the new value holds its own, so an unchanged set keeps its slot.
        let packed = spilled.filter(|&i| matches!(self.sets[i as usize], Spilled::Packed(_)));
        let v = self.encode_into(if packed.is_some() { None } else { spilled }, hs);
        if let Some(i) = packed {
            self.release_packed(i);
        }
        v
    }

    /// [`Self::encode`] with `spilled` the arena slot the key's old set left free, if any.
    fn encode_into(&mut self, spilled: Option<u32>, mut hs: Holders) -> u32 {
        if !hs.prune() {
            if let Some(i) = spilled {
                self.free.push(i);
            }
            return 0;
        }
        let set = match hs {
            Holders::One(h) => match encode_holder(&h) {
                Some(v) => {
                    if let Some(i) = spilled {
                        self.free.push(i);
                    }
                    return v;
                }
                None => Spilled::One(h),
            },
            Holders::Many(mut v) => {
                match v[1..]
                    .iter()
                    .map(encode_holder)
                    .collect::<Option<Vec<u32>>>()
                {
                    Some(packed) => return self.store_packed(pack(packed), spilled),
                    None => {
                        v.shrink_to_fit();
                        Spilled::Many(v)
                    }
                }
            }
        };
        match spilled {
            Some(i) => {
                self.sets[i as usize] = set;
                i | SPILLED
            }
            None => self.alloc(set) | SPILLED,
        }
    }
    #[inline]
    fn view(&self, v: u32) -> View<'_> {
        if v & SPILLED == 0 {
            return View::One(decode_inline(v));
        }
        match &self.sets[(v & !SPILLED) as usize] {
            Spilled::One(h) => View::One(*h),
            Spilled::Many(v) => View::Many(v),
            Spilled::Packed(p) => View::Packed(p),
        }
    }
    fn heap_bytes(&self) -> usize {
        // hashbrown: a bucket per 7/8 of capacity, each an entry and a control byte.
        let shared_buckets = self.shared.capacity() * 8 / 7;
        let mut n = self.sets.capacity() * std::mem::size_of::<Spilled>()
            + self.free.capacity() * std::mem::size_of::<u32>()
            + shared_buckets * (std::mem::size_of::<(u64, (u32, u32))>() + 1);
        for set in &self.sets {
            n += match set {
                Spilled::One(_) => 0,
                Spilled::Many(v) => v.capacity() * std::mem::size_of::<Holder>(),
                Spilled::Packed(p) => std::mem::size_of_val::<[u32]>(p),
            };
        }
        n
    }
}

const EMPTY_HOLDER: Holder = Holder {
    approx_stamp_us: 0,
    ep: 0,
    flags: 0,
};

/// The header record of [`Holders::Many`] (its fingerprint set by `refresh` / `prune`).
const HEADER: Holder = Holder {
    approx_stamp_us: 0,
    ep: HEADER_EP,
    flags: 0,
};

#[derive(Clone, Debug, Default)]
struct EpIndex {
    precise_entries: usize,
    approx_live: usize,
    approx_log: VecDeque<(u64, u64)>,
    last_stamp_us: u64,
}

/// Which entries a query may use.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PrefixSource {
    /// Precise entries for trusted endpoints, approximate for the rest (kvgate, Dynamo).
    Best,
    /// Approximate entries only, for every endpoint (GIE's and SGLang's own trees).
    ApproxOnly,
}

/// A prefix query.
#[derive(Clone, Copy, Debug)]
pub struct PrefixQuery<'a> {
    /// The request's chain of block keys.
    pub chain: &'a [u64],
    /// Whether the chain is over the engines' token ids, so entries learnt from KV events can
    /// match it (else only the router's own approximate entries can).
    pub precise: bool,
    /// Query time.
    pub now_us: u64,
    /// Which entries to use.
    pub source: PrefixSource,
}

/// Longest matched prefix per endpoint, indexed by `EndpointId.0`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PrefixMatches {
    /// Consecutive matched blocks from the start of the prompt, any tier.
    pub blocks: Vec<u32>,
    /// Consecutive matched blocks from the start that are on GPU (approximate entries count as
    /// GPU: they describe work just dispatched there).
    pub gpu_blocks: Vec<u32>,
}

impl PrefixMatches {
    /// Matched blocks for `id` (0 if unknown).
    pub fn blocks(&self, id: EndpointId) -> u32 {
        self.blocks.get(id.0 as usize).copied().unwrap_or(0)
    }
    /// Matched GPU blocks for `id` (0 if unknown).
    pub fn gpu_blocks(&self, id: EndpointId) -> u32 {
        self.gpu_blocks.get(id.0 as usize).copied().unwrap_or(0)
    }
    /// The endpoints with a match and their matched blocks, in id order.
    pub fn holders(&self) -> impl Iterator<Item = (EndpointId, u32)> + '_ {
        self.blocks
            .iter()
            .enumerate()
            .filter(|(_, b)| **b > 0)
            .map(|(i, b)| (EndpointId(i as u32), *b))
    }
}

/// Per endpoint, the run of precise blocks a [`PrefixIndex::longest_prefixes_with_precise`]
/// walk followed; read through [`PrefixIndex::precise_prefix_with`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PreciseRuns {
    runs: Vec<u32>,
}

/// Tuning of the index.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct IndexConfig {
    /// Approximate entries per endpoint before LRU eviction.
    pub approx_capacity_blocks: usize,
    /// Approximate entries older than this are ignored and purged; `None`: never expire.
    pub approx_ttl_us: Option<u64>,
    /// Precise entries per endpoint above which the endpoint's event view is declared broken.
    pub precise_capacity_blocks: usize,
}

/// Memory accounting of the index (see [`PrefixIndex::memory`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IndexMemory {
    /// Distinct block keys.
    pub keys: usize,
    /// (block, endpoint) holder entries.
    pub entries: usize,
    /// Heap bytes of the index's containers, from their capacities and element layouts.
    pub heap_bytes: usize,
}

/// Result of applying an endpoint's precise events.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ApplyOutcome {
    /// Applied.
    Applied,
    /// The endpoint exceeded `precise_capacity_blocks`: its precise entries were dropped and it
    /// is now untrusted.
    Overflowed,
}

/// Heap bytes of a hashbrown table with room for `capacity` entries of `entry` bytes:
/// `buckets × (entry + 1 control byte) + 16`, `buckets` the next power of two ≥ `capacity × 8 / 7`.
pub(crate) fn table_bytes(capacity: usize, entry: usize) -> usize {
    if capacity == 0 {
        return 0;
    }
    let buckets = if capacity < 8 {
        if capacity < 4 { 4 } else { 8 }
    } else {
        (capacity * 8 / 7).next_power_of_two()
    };
    buckets * (entry + 1) + 16
}

/// Gives back an eviction log's spare capacity once it exceeds the records held (plus a
/// constant, so a small log is not reallocated on every pop): evictions and expiry pop records
/// without shrinking the buffer. O(len) only after Ω(len) pops, so amortised O(1).
fn trim_log(log: &mut VecDeque<(u64, u64)>) {
    if log.capacity() > 2 * log.len() + 1024 {
        log.shrink_to(log.len() + log.len() / 4);
    }
}

/// The prefix index. See the module docs.
#[derive(Clone)]
pub struct PrefixIndex {
    cfg: IndexConfig,
    /// Block key → holders: one precise holder inline, else an [`Arena`] index.
    blocks: BlockTable,
    arena: Arena,
    eps: Vec<Option<EpIndex>>,
    /// Trust per endpoint, dense (the walk reads it per holder; keeping it out of `EpIndex`
    /// keeps those reads in one cache line per 64 endpoints).
    trust: Vec<bool>,
}

impl std::fmt::Debug for PrefixIndex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PrefixIndex")
            .field("cfg", &self.cfg)
            .field("keys", &self.blocks.len())
            .finish_non_exhaustive()
    }
}

impl PrefixIndex {
    /// An empty index.
    pub fn new(cfg: IndexConfig) -> Self {
        Self {
            cfg,
            blocks: BlockTable::default(),
            arena: Arena::default(),
            eps: Vec::new(),
            trust: Vec::new(),
        }
    }

    /// The index's tuning.
    pub fn config(&self) -> &IndexConfig {
        &self.cfg
    }

    fn ep_mut(&mut self, id: EndpointId) -> &mut EpIndex {
        let i = id.0 as usize;
        if self.eps.len() <= i {
            self.eps.resize_with(i + 1, || None);
        }
        self.eps[i].get_or_insert_with(EpIndex::default)
    }

    fn ep(&self, id: u32) -> Option<&EpIndex> {
        self.eps.get(id as usize).and_then(Option::as_ref)
    }

    #[inline]
    fn view(&self, key: u64) -> Option<View<'_>> {
        self.blocks.get(key).map(|v| self.arena.view(v))
    }

    /// Runs `f` on the holders of `key` (starting from `init` when the key is absent; `None`:
    /// leave absent keys alone), then stores them back in the most compact form, dropping the
    /// key when no holder is left. `f`'s changes are pruned and fingerprinted here.
    fn update<R>(
        &mut self,
        key: u64,
        init: Option<Holder>,
        f: impl FnOnce(&mut Holders) -> R,
    ) -> Option<R> {
        let Self { blocks, arena, .. } = self;
        if let Some(slot) = blocks.get_mut(key) {
            let old = *slot;
            let mut hs = arena.decode(old);
            let r = f(&mut hs);
            match arena.encode(Some(old), hs) {
                0 => {
                    blocks.remove(key);
                }
                v => *slot = v,
            }
            return Some(r);
        }
        let mut hs = Holders::One(init?);
        let r = f(&mut hs);
        match arena.encode(None, hs) {
            0 => {}
            v => blocks.insert(key, v),
        }
        Some(r)
    }

    /// Applies `f` to every key's holders (a whole-index scan), dropping keys left empty.
    fn update_all(&mut self, mut f: impl FnMut(&mut Holders)) {
        let Self { blocks, arena, .. } = self;
        blocks.retain(|_, old| {
            let mut hs = arena.decode(old);
            f(&mut hs);
            arena.encode(Some(old), hs)
        });
    }

    /// Whether `id`'s events are trusted.
    pub fn is_trusted(&self, id: EndpointId) -> bool {
        self.trust.get(id.0 as usize).copied().unwrap_or(false)
    }

    /// Marks `id`'s events trusted or not.
    pub fn set_trusted(&mut self, id: EndpointId, trusted: bool) {
        self.ep_mut(id);
        let i = id.0 as usize;
        if self.trust.len() <= i {
            self.trust.resize(i + 1, false);
        }
        self.trust[i] = trusted;
    }

    /// Live approximate entries of `id` (SGLang's "tree size" of a tenant, in blocks).
    pub fn approx_entries(&self, id: EndpointId) -> usize {
        self.ep(id.0).map_or(0, |e| e.approx_live)
    }

    /// Live precise entries of `id`.
    pub fn precise_entries(&self, id: EndpointId) -> usize {
        self.ep(id.0).map_or(0, |e| e.precise_entries)
    }

    /// Records that `id` holds `keys` in `tier` (a `BlockStored`).
    pub fn store(&mut self, id: EndpointId, keys: &[u64], tier: Tier) -> ApplyOutcome {
        let bit = tier_bit(tier);
        let mut added = 0usize;
        let fresh = Holder {
            approx_stamp_us: 0,
            ep: id.0,
            flags: 0,
        };
        for &key in keys {
            let new = self.update(key, Some(fresh), |hs| {
                let h = hs.find_or_push(fresh);
                let new = h.flags & TIERS == 0;
                h.flags |= bit;
                new
            });
            added += usize::from(new == Some(true));
        }
        let cap = self.cfg.precise_capacity_blocks;
        let ep = self.ep_mut(id);
        ep.precise_entries += added;
        if ep.precise_entries > cap {
            self.drop_precise_view(id);
            return ApplyOutcome::Overflowed;
        }
        ApplyOutcome::Applied
    }

    /// Precise entries per endpoint above which its event view is declared broken.
    pub fn precise_capacity_blocks(&self) -> usize {
        self.cfg.precise_capacity_blocks
    }

    /// Declares `id`'s event view broken: its precise entries are dropped and it is untrusted
    /// until a resync (what an overflow of [`IndexConfig::precise_capacity_blocks`] does).
    pub fn drop_precise_view(&mut self, id: EndpointId) {
        self.clear_precise(id);
        self.set_trusted(id, false);
    }

    /// Records that `id` evicted `keys` from `tier` (a `BlockRemoved`).
    pub fn remove(&mut self, id: EndpointId, keys: &[u64], tier: Tier) {
        let bit = tier_bit(tier);
        let mut removed = 0usize;
        let mut approx_dropped = 0usize;
        for &key in keys {
            self.update(key, None, |hs| {
                let Some(h) = hs.find_mut(id.0) else {
                    return;
                };
                let had = h.flags & TIERS != 0;
                h.flags &= !bit;
                if had && h.flags & TIERS == 0 {
                    removed += 1;
                    // The engine evicted the block: the router's guess that it is there is void
                    // too.
                    if h.flags & APPROX != 0 {
                        h.flags &= !APPROX;
                        h.approx_stamp_us = 0;
                        approx_dropped += 1;
                    }
                }
            });
        }
        let ep = self.ep_mut(id);
        ep.precise_entries = ep.precise_entries.saturating_sub(removed);
        ep.approx_live = ep.approx_live.saturating_sub(approx_dropped);
    }

    /// Drops every precise entry of `id` (an `AllBlocksCleared`, or a broken view). A full scan:
    /// clears are rare (engine reset), and a per-endpoint key list would double the memory.
    pub fn clear_precise(&mut self, id: EndpointId) {
        // Nothing to drop (the count is exact): no scan. A publisher can send thousands of
        // clears in one batch; only the first of them costs a scan.
        if self.ep(id.0).is_none_or(|e| e.precise_entries == 0) {
            return;
        }
        self.update_all(|hs| {
            if let Some(h) = hs.find_mut(id.0) {
                h.flags &= !TIERS;
            }
        });
        self.ep_mut(id).precise_entries = 0;
    }

    /// Drops every entry of `id`, precise and approximate (its engine's cache is empty: an
    /// `AllBlocksCleared` or a restart), keeping its trust. A full scan, as [`Self::clear_precise`].
    pub fn clear_endpoint(&mut self, id: EndpointId) {
        // As in `clear_precise`: with no entry of either kind (both counts are exact) there is
        // nothing for the scan to find.
        let holds = self
            .ep(id.0)
            .is_some_and(|e| e.precise_entries > 0 || e.approx_live > 0);
        if holds {
            self.update_all(|hs| {
                if let Some(h) = hs.find_mut(id.0) {
                    h.flags = 0;
                }
            });
        }
        let ep = self.ep_mut(id);
        ep.precise_entries = 0;
        ep.approx_live = 0;
        ep.approx_log = VecDeque::new();
    }

    /// Records the router's own decision: `id` will hold `keys` from `now_us` on.
    pub fn touch_approx(&mut self, id: EndpointId, keys: &[u64], now_us: u64) {
        if keys.is_empty() {
            return;
        }
        let ep = self.ep_mut(id);
        // Strictly increasing per endpoint, so a log record identifies one touch exactly.
        let stamp = now_us.max(ep.last_stamp_us + 1);
        ep.last_stamp_us = stamp;
        let mut added = 0usize;
        let fresh = Holder {
            approx_stamp_us: stamp,
            ep: id.0,
            flags: 0,
        };
        for &key in keys {
            let new = self.update(key, Some(fresh), |hs| {
                let h = hs.find_or_push(fresh);
                let new = h.flags & APPROX == 0;
                h.flags |= APPROX;
                h.approx_stamp_us = stamp;
                new
            });
            added += usize::from(new == Some(true));
        }
        let ep = self.ep_mut(id);
        ep.approx_live += added;
        let log = &mut ep.approx_log;
        if log.len() + keys.len() > log.capacity() {
            // A quarter more, not double: the log's spare capacity counts against the memory
            // per entry. Still geometric, so appends stay amortised O(1).
            log.reserve_exact(keys.len().max(log.len() / 4));
        }
        log.extend(keys.iter().map(|&k| (k, stamp)));
        let cap = self.cfg.approx_capacity_blocks;
        while self.ep_mut(id).approx_live > cap {
            let Some((key, s)) = self.ep_mut(id).approx_log.pop_front() else {
                break;
            };
            self.evict_approx(id, key, s);
        }
        self.maybe_compact(id);
    }

    /// Evicts the approximate entry `(key, id)` if it still carries `stamp`.
    fn evict_approx(&mut self, id: EndpointId, key: u64, stamp: u64) {
        let evicted = self.update(key, None, |hs| match hs.find_mut(id.0) {
            Some(h) if h.flags & APPROX != 0 && h.approx_stamp_us == stamp => {
                h.flags &= !APPROX;
                h.approx_stamp_us = 0;
                true
            }
            _ => false,
        });
        if evicted == Some(true) {
            let ep = self.ep_mut(id);
            ep.approx_live = ep.approx_live.saturating_sub(1);
        }
    }

    fn maybe_compact(&mut self, id: EndpointId) {
        let ep = self.ep_mut(id);
        if ep.approx_log.len() <= 2 * ep.approx_live + 1024 {
            trim_log(&mut ep.approx_log);
            return;
        }
        let log = std::mem::take(&mut ep.approx_log);
        let kept: VecDeque<(u64, u64)> = log
            .into_iter()
            .filter(|&(key, s)| {
                self.view(key)
                    .and_then(|hs| hs.find(id.0))
                    .is_some_and(|h| h.flags & APPROX != 0 && h.approx_stamp_us == s)
            })
            .collect();
        self.ep_mut(id).approx_log = kept;
        trim_log(&mut self.ep_mut(id).approx_log);
    }

    /// Purges approximate entries of `id` older than the TTL at `now_us`.
    pub fn expire_approx(&mut self, id: EndpointId, now_us: u64) {
        let Some(ttl) = self.cfg.approx_ttl_us else {
            return;
        };
        loop {
            let ep = self.ep_mut(id);
            match ep.approx_log.front() {
                Some(&(key, s)) if now_us.saturating_sub(s) > ttl => {
                    ep.approx_log.pop_front();
                    self.evict_approx(id, key, s);
                }
                _ => break,
            }
        }
        trim_log(&mut self.ep_mut(id).approx_log);
    }

    /// Forgets `id` entirely.
    pub fn remove_endpoint(&mut self, id: EndpointId) {
        self.update_all(|hs| {
            if let Some(h) = hs.find_mut(id.0) {
                h.flags = 0;
            }
        });
        if let Some(slot) = self.eps.get_mut(id.0 as usize) {
            *slot = None;
        }
        if let Some(t) = self.trust.get_mut(id.0 as usize) {
            *t = false;
        }
    }

    fn approx_fresh(&self, h: &Holder, now_us: u64, max_age_us: Option<u64>) -> bool {
        h.flags & APPROX != 0
            && max_age_us.is_none_or(|a| now_us.saturating_sub(h.approx_stamp_us) <= a)
    }

    /// Walks `chain`, advancing endpoints for which `accept` says the holder counts (and whether
    /// it counts as GPU).
    ///
    /// Run skipping: a long shared prefix usually has the very same holder records (same
    /// endpoints, tiers and stamp) on every block. When a block's holders equal the previous
    /// block's (fingerprint compare) and every holder advanced there, every holder advances here
    /// too, so the walk only counts the run and applies it once when the holders change: O(1)
    /// per block instead of one visit per holder per block.
    fn walk<const PRECISE: bool>(
        &self,
        chain: &[u64],
        blocks: &mut [u32],
        gpu: &mut [u32],
        precise: &mut [u32],
        accept: impl Fn(&Holder) -> Option<bool>,
    ) {
        // With `PRECISE`, `precise` (one per endpoint) counts, like `gpu`, the run from the
        // start of blocks accepted as precise entries; without, the walk is the plain one.
        let flush = |run: &mut Option<(View<'_>, u32)>,
                     blocks: &mut [u32],
                     gpu: &mut [u32],
                     precise: &mut [u32]| {
            if let Some((prev, pending)) = run.take()
                && pending > 0
            {
                for h in prev.iter() {
                    let e = h.ep as usize;
                    if let Some(on_gpu) = accept(&h) {
                        let kept = gpu[e] == blocks[e];
                        if PRECISE
                            && let Some(p) = precise.get_mut(e)
                            && *p == blocks[e]
                            && h.flags & TIERS != 0
                        {
                            *p += pending;
                        }
                        blocks[e] += pending;
                        if on_gpu && kept {
                            gpu[e] += pending;
                        }
                    }
                }
            }
        };
        let mut run: Option<(View<'_>, u32)> = None;
        // The table value of the run's first block: an equal value is the same holders (an
        // inline value is the holder itself; a spilled one, the same set), so such a run
        // extends without decoding its blocks' holders (a conversation's history is mostly
        // held by one endpoint, as one inline value). Table values are never 0.
        let mut run_value = 0u32;
        for (i, &key) in chain.iter().enumerate() {
            let i = i as u32;
            let Some(v) = self.blocks.get(key) else {
                break;
            };
            if v == run_value
                && let Some((_, pending)) = &mut run
            {
                *pending += 1;
                continue;
            }
            let hs = self.arena.view(v);
            if let Some((prev, pending)) = &mut run
                && prev.same_holders(&hs)
            {
                *pending += 1;
                continue;
            }
            flush(&mut run, blocks, gpu, precise);
            run_value = 0;
            let mut advanced = 0usize;
            for h in hs.iter() {
                let e = h.ep as usize;
                if e >= blocks.len() || blocks[e] != i {
                    continue;
                }
                if let Some(on_gpu) = accept(&h) {
                    blocks[e] = i + 1;
                    if on_gpu && gpu[e] == i {
                        gpu[e] = i + 1;
                    }
                    if PRECISE
                        && let Some(p) = precise.get_mut(e)
                        && *p == i
                        && h.flags & TIERS != 0
                    {
                        *p = i + 1;
                    }
                    advanced += 1;
                }
            }
            if advanced == 0 {
                break;
            }
            if advanced == hs.len() {
                run = Some((hs, 0));
                run_value = v;
            }
        }
        flush(&mut run, blocks, gpu, precise);
    }

    /// Consecutive blocks of `chain`, from the start, that `id` holds as precise entries in any
    /// tier, whatever its trust: what its KV events alone predict the engine will find cached
    /// (the self-check compares this with the engine's reported `cached_tokens`).
    pub fn precise_prefix(&self, id: EndpointId, chain: &[u64]) -> u32 {
        let mut n = 0;
        for key in chain {
            match self.view(*key).and_then(|hs| hs.find(id.0)) {
                Some(h) if h.flags & TIERS != 0 => n += 1,
                _ => break,
            }
        }
        n
    }

    /// Longest consecutive matched prefix of one endpoint: `(blocks, gpu_blocks)`, exactly
    /// [`PrefixIndex::longest_prefixes`]'s entry for `id`, at the cost of one holder lookup per
    /// matched block. For what booking needs when the policy did not ask for every endpoint's
    /// match (a round-robin pick still books the prefix it sends).
    pub fn longest_prefix_of(&self, id: EndpointId, q: &PrefixQuery<'_>) -> (u32, u32) {
        let ttl = self.cfg.approx_ttl_us;
        let precise = q.source == PrefixSource::Best && q.precise && self.is_trusted(id);
        let (mut blocks, mut gpu) = (0u32, 0u32);
        for key in q.chain {
            let Some(h) = self.view(*key).and_then(|hs| hs.find(id.0)) else {
                break;
            };
            let on_gpu = if precise && h.flags & TIERS != 0 {
                h.flags & GPU != 0
            } else if self.approx_fresh(&h, q.now_us, ttl) {
                true
            } else {
                break;
            };
            if on_gpu && gpu == blocks {
                gpu += 1;
            }
            blocks += 1;
        }
        (blocks, gpu)
    }

    /// Longest consecutive matched prefix per endpoint.
    pub fn longest_prefixes(&self, q: &PrefixQuery<'_>) -> PrefixMatches {
        let n = self.eps.len();
        let mut out = PrefixMatches {
            blocks: vec![0; n],
            gpu_blocks: vec![0; n],
        };
        let now = q.now_us;
        let ttl = self.cfg.approx_ttl_us;
        let trust = &self.trust;
        let trusted = |ep: u32| trust.get(ep as usize).copied().unwrap_or(false);
        let approx_any = |h: &Holder| self.approx_fresh(h, now, ttl).then_some(true);
        if q.source == PrefixSource::ApproxOnly || !q.precise {
            self.walk::<false>(
                q.chain,
                &mut out.blocks,
                &mut out.gpu_blocks,
                &mut [],
                approx_any,
            );
            return out;
        }
        self.walk::<false>(
            q.chain,
            &mut out.blocks,
            &mut out.gpu_blocks,
            &mut [],
            |h| {
                if trusted(h.ep) && h.flags & TIERS != 0 {
                    Some(h.flags & GPU != 0)
                } else {
                    approx_any(h)
                }
            },
        );
        out
    }

    /// [`PrefixIndex::longest_prefixes`], and from the same walk what
    /// [`PrefixIndex::precise_prefix`] answers for the endpoints trusted now: a pick needs both
    /// for its chosen endpoint, and for a long shared prefix the second walk cost as much as
    /// the first. A trusted endpoint's precise entries are always accepted by a `Best` query
    /// over a precise chain, so its run of precise blocks from the start is followed to its
    /// end; read it through [`PrefixIndex::precise_prefix_with`], which walks afresh for
    /// the endpoints (untrusted) or queries (approximate) where it is not.
    pub fn longest_prefixes_with_precise(
        &self,
        q: &PrefixQuery<'_>,
    ) -> (PrefixMatches, PreciseRuns) {
        if q.source != PrefixSource::Best || !q.precise {
            return (self.longest_prefixes(q), PreciseRuns::default());
        }
        let n = self.eps.len();
        let mut out = PrefixMatches {
            blocks: vec![0; n],
            gpu_blocks: vec![0; n],
        };
        let mut runs = vec![0; n];
        let now = q.now_us;
        let ttl = self.cfg.approx_ttl_us;
        let trust = &self.trust;
        let trusted = |ep: u32| trust.get(ep as usize).copied().unwrap_or(false);
        self.walk::<true>(
            q.chain,
            &mut out.blocks,
            &mut out.gpu_blocks,
            &mut runs,
            |h| {
                if trusted(h.ep) && h.flags & TIERS != 0 {
                    Some(h.flags & GPU != 0)
                } else {
                    self.approx_fresh(h, now, ttl).then_some(true)
                }
            },
        );
        (out, PreciseRuns { runs })
    }

    /// [`PrefixIndex::precise_prefix`] of `id` over `chain`, taken from `runs` (of a
    /// [`PrefixIndex::longest_prefixes_with_precise`] query of `chain` on this index, unchanged
    /// since) when `id` is trusted, walked afresh otherwise.
    pub fn precise_prefix_with(&self, runs: &PreciseRuns, id: EndpointId, chain: &[u64]) -> u32 {
        #[cfg(test)]
        if crate::router::reference() {
            return self.precise_prefix(id, chain);
        }
        match runs.runs.get(id.0 as usize) {
            Some(&n) if self.is_trusted(id) => n,
            _ => self.precise_prefix(id, chain),
        }
    }

    /// Counts keys, holder entries and heap bytes. Heap bytes are the capacities of every
    /// container the index owns, times their element sizes: the block table's slot array, the
    /// arena of spilled holder sets with its free list and each set's `Vec`, the per-endpoint
    /// records with their eviction logs, and the trust flags.
    pub fn memory(&self) -> IndexMemory {
        let mut m = IndexMemory {
            keys: self.blocks.len(),
            entries: 0,
            heap_bytes: self.blocks.heap_bytes() + self.arena.heap_bytes(),
        };
        for (_, v) in self.blocks.iter() {
            m.entries += self.arena.view(v).len();
        }
        m.heap_bytes += self.eps.capacity() * std::mem::size_of::<Option<EpIndex>>();
        for ep in self.eps.iter().flatten() {
            m.heap_bytes += ep.approx_log.capacity() * std::mem::size_of::<(u64, u64)>();
        }
        m.heap_bytes += self.trust.capacity() * std::mem::size_of::<bool>();
        m
    }

    /// Size in bytes of one holder record and of one block-table slot (key + a single precise
    /// holder inline, or an arena index).
    pub fn layout_sizes() -> (usize, usize) {
        (std::mem::size_of::<Holder>(), table::SLOT_BYTES)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};

    use proptest::prelude::*;

    use super::*;

    fn cfg() -> IndexConfig {
        IndexConfig {
            approx_capacity_blocks: 1_000_000,
            approx_ttl_us: Some(1_000),
            precise_capacity_blocks: 1_000_000,
        }
    }

    /// Brute-force model: sets of facts, matched by scanning.
    #[derive(Default)]
    struct Reference {
        precise: BTreeSet<(u64, u32, u8)>,
        approx: BTreeMap<(u64, u32), u64>,
        trusted: BTreeSet<u32>,
        last_stamp: BTreeMap<u32, u64>,
    }

    impl Reference {
        fn holds(&self, key: u64, ep: u32, now: u64, c: &IndexConfig) -> Option<bool> {
            let tiers: Vec<u8> = [GPU, CPU, DISK]
                .into_iter()
                .filter(|t| self.precise.contains(&(key, ep, *t)))
                .collect();
            let approx_age = self.approx.get(&(key, ep)).map(|s| now.saturating_sub(*s));
            if self.trusted.contains(&ep) && !tiers.is_empty() {
                return Some(tiers.contains(&GPU));
            }
            approx_age
                .filter(|a| c.approx_ttl_us.is_none_or(|t| *a <= t))
                .map(|_| true)
        }

        fn matches(&self, chain: &[u64], eps: u32, now: u64, c: &IndexConfig) -> Vec<(u32, u32)> {
            (0..eps)
                .map(|ep| {
                    let mut blocks = 0;
                    let mut gpu = 0;
                    let mut gpu_run = true;
                    for &k in chain {
                        match self.holds(k, ep, now, c) {
                            Some(g) => {
                                blocks += 1;
                                gpu_run &= g;
                                if gpu_run {
                                    gpu += 1;
                                }
                            }
                            None => break,
                        }
                    }
                    (blocks, gpu)
                })
                .collect()
        }
    }

    #[derive(Clone, Debug)]
    enum Op {
        Store(u32, Vec<u64>, u8),
        Remove(u32, Vec<u64>, u8),
        Clear(u32),
        ClearAll(u32),
        Touch(u32, Vec<u64>),
        Trust(u32, bool),
        Advance(u64),
    }

    fn tier_of(t: u8) -> Tier {
        match t {
            0 => Tier::Gpu,
            1 => Tier::Cpu,
            _ => Tier::Disk,
        }
    }

    /// Endpoints of the brute-force comparison: more than [`PACKED_EXACT`] + 1, so blocks get
    /// fingerprinted packed sets, which the arena shares between blocks.
    const EPS: u32 = 7;

    /// Operations on keys from `0..alphabet` in the first `tiers` tiers, with approximate
    /// touches weighted `touches` (a tiny alphabet, so chains overlap often; a tinier one,
    /// fewer tiers and touches, so many endpoints hold the same keys precisely in the same
    /// tiers).
    fn op(alphabet: u64, tiers: u8, touches: u32) -> impl Strategy<Value = Op> {
        let keys = prop::collection::vec(0u64..alphabet, 1..6);
        prop_oneof![
            4 => (0u32..EPS, keys.clone(), 0u8..tiers).prop_map(|(e, k, t)| Op::Store(e, k, t)),
            2 => (0u32..EPS, keys.clone(), 0u8..tiers).prop_map(|(e, k, t)| Op::Remove(e, k, t)),
            1 => (0u32..EPS).prop_map(Op::Clear),
            1 => (0u32..EPS).prop_map(Op::ClearAll),
            touches => (0u32..EPS, keys).prop_map(|(e, k)| Op::Touch(e, k)),
            1 => (0u32..EPS, any::<bool>()).prop_map(|(e, t)| Op::Trust(e, t)),
            2 => (0u64..400).prop_map(Op::Advance),
        ]
    }

    proptest! {
        #[test]
        fn index_matches_brute_force(ops in prop::collection::vec(op(12, 3, 3), 1..60),
                                     chain in prop::collection::vec(0u64..12, 0..8),
                                     precise in any::<bool>()) {
            check_against_brute_force(ops, &chain, precise)?;
        }

        /// The same on three keys with more operations: blocks held by five or more
        /// endpoints in the same tiers, whose sets the arena shares, come and go.
        #[test]
        fn index_with_shared_sets_matches_brute_force(
            ops in prop::collection::vec(op(3, 2, 1), 1..120),
            chain in prop::collection::vec(0u64..3, 0..8),
            precise in any::<bool>(),
        ) {
            check_against_brute_force(ops, &chain, precise)?;
        }
    }

    fn check_against_brute_force(
        ops: Vec<Op>,
        chain: &[u64],
        precise: bool,
    ) -> Result<(), proptest::test_runner::TestCaseError> {
        let c = cfg();
        let mut idx = PrefixIndex::new(c);
        let mut r = Reference::default();
        let mut now = 0u64;
        for e in 0..EPS {
            idx.set_trusted(EndpointId(e), false);
        }
        for op in ops {
            match op {
                Op::Store(e, k, t) => {
                    idx.store(EndpointId(e), &k, tier_of(t));
                    for key in k {
                        r.precise.insert((key, e, 1 << t));
                    }
                }
                Op::Remove(e, k, t) => {
                    idx.remove(EndpointId(e), &k, tier_of(t));
                    for key in k {
                        let had = [1u8, 2, 4]
                            .iter()
                            .any(|b| r.precise.contains(&(key, e, *b)));
                        r.precise.remove(&(key, e, 1 << t));
                        let has = [1u8, 2, 4]
                            .iter()
                            .any(|b| r.precise.contains(&(key, e, *b)));
                        // The engine evicted it: the approximate guess goes too.
                        if had && !has {
                            r.approx.remove(&(key, e));
                        }
                    }
                }
                Op::Clear(e) => {
                    idx.clear_precise(EndpointId(e));
                    r.precise.retain(|x| x.1 != e);
                }
                Op::ClearAll(e) => {
                    idx.clear_endpoint(EndpointId(e));
                    r.precise.retain(|x| x.1 != e);
                    r.approx.retain(|&(_, ep), _| ep != e);
                }
                Op::Touch(e, k) => {
                    idx.touch_approx(EndpointId(e), &k, now);
                    // Stamps are strictly increasing per endpoint (same rule as the index).
                    let last = r.last_stamp.entry(e).or_insert(0);
                    let stamp = now.max(*last + 1);
                    *last = stamp;
                    for key in k {
                        r.approx.insert((key, e), stamp);
                    }
                }
                Op::Trust(e, t) => {
                    idx.set_trusted(EndpointId(e), t);
                    if t {
                        r.trusted.insert(e);
                    } else {
                        r.trusted.remove(&e);
                    }
                }
                Op::Advance(d) => {
                    now += d;
                    for e in 0..EPS {
                        idx.expire_approx(EndpointId(e), now);
                    }
                }
            }
        }
        let got = idx.longest_prefixes(&PrefixQuery {
            chain,
            precise,
            now_us: now,
            source: PrefixSource::Best,
        });
        // A chain not over the engines' tokens matches the router's own entries only.
        let ar = Reference {
            approx: r.approx.clone(),
            ..Default::default()
        };
        for ep in 0..EPS {
            let want = if precise {
                r.matches(chain, EPS, now, &c)[ep as usize]
            } else {
                ar.matches(chain, EPS, now, &c)[ep as usize]
            };
            prop_assert_eq!(
                (got.blocks(EndpointId(ep)), got.gpu_blocks(EndpointId(ep))),
                want,
                "endpoint {}",
                ep
            );
        }
        // For every source: the one-endpoint query agrees with the all-endpoint walk, and the
        // walk that also follows precise runs matches as the plain one and answers
        // `precise_prefix` for every endpoint.
        for source in [PrefixSource::Best, PrefixSource::ApproxOnly] {
            let q = PrefixQuery {
                chain,
                precise,
                now_us: now,
                source,
            };
            let all = idx.longest_prefixes(&q);
            for ep in 0..EPS {
                let id = EndpointId(ep);
                prop_assert_eq!(
                    idx.longest_prefix_of(id, &q),
                    (all.blocks(id), all.gpu_blocks(id))
                );
            }
            let (with_runs, runs) = idx.longest_prefixes_with_precise(&q);
            prop_assert_eq!(&with_runs, &all);
            for ep in 0..EPS {
                let id = EndpointId(ep);
                prop_assert_eq!(
                    idx.precise_prefix_with(&runs, id, chain),
                    idx.precise_prefix(id, chain),
                    "endpoint {}",
                    ep
                );
            }
        }
        // Approx-only source ignores precise entries and trust.
        let got = idx.longest_prefixes(&PrefixQuery {
            chain,
            precise: true,
            now_us: now,
            source: PrefixSource::ApproxOnly,
        });
        for ep in 0..EPS {
            prop_assert_eq!(
                got.blocks(EndpointId(ep)),
                ar.matches(chain, EPS, now, &c)[ep as usize].0
            );
        }
        // Precise-entry counts agree with the reference.
        for ep in 0..EPS {
            let want = r
                .precise
                .iter()
                .filter(|x| x.1 == ep)
                .map(|x| x.0)
                .collect::<BTreeSet<_>>()
                .len();
            prop_assert_eq!(idx.precise_entries(EndpointId(ep)), want);
        }
        Ok(())
    }

    /// Holder sets above `PACKED_EXACT` are compared by fingerprint in the walk's run
    /// skipping: the walk must still see where one engine's copy of a long chain has a hole
    /// that leaves as many holders as its neighbours.
    #[test]
    fn run_skipping_over_fingerprinted_sets_sees_a_hole() {
        let mut idx = PrefixIndex::new(cfg());
        let chain: Vec<u64> = (100..140).collect();
        for e in 0..9 {
            idx.set_trusted(EndpointId(e), true);
            idx.store(
                EndpointId(e),
                &chain,
                if e == 8 { Tier::Cpu } else { Tier::Gpu },
            );
        }
        // Block 120: endpoint 7 gone and endpoint 9 there instead, so as many holders as its
        // neighbours and only the fingerprint tells them apart.
        idx.remove(EndpointId(7), &[120], Tier::Gpu);
        idx.set_trusted(EndpointId(9), true);
        idx.store(EndpointId(9), &[120], Tier::Gpu);
        idx.store(EndpointId(3), &[130], Tier::Cpu);
        let q = PrefixQuery {
            chain: &chain,
            precise: true,
            now_us: 0,
            source: PrefixSource::Best,
        };
        let all = idx.longest_prefixes(&q);
        for e in 0..10 {
            let id = EndpointId(e);
            assert_eq!(
                (all.blocks(id), all.gpu_blocks(id)),
                idx.longest_prefix_of(id, &q),
                "endpoint {e}"
            );
        }
        assert_eq!(all.blocks(EndpointId(7)), 20);
        assert_eq!(all.blocks(EndpointId(0)), 40);
        assert_eq!(all.gpu_blocks(EndpointId(8)), 0);
        assert_eq!(all.blocks(EndpointId(8)), 40);
        assert_eq!(all.blocks(EndpointId(9)), 0);
    }

    /// Blocks with the same fingerprinted holders share one arena slot (one table value), a
    /// changed block leaves it for a slot of its own and comes back to it when its holders do,
    /// and the last block to leave frees it.
    #[test]
    fn blocks_with_the_same_many_holders_share_one_set() {
        let mut idx = PrefixIndex::new(cfg());
        let chain: Vec<u64> = (100..140).collect();
        for e in 0..6 {
            idx.set_trusted(EndpointId(e), true);
            idx.store(EndpointId(e), &chain, Tier::Gpu);
        }
        let value = |idx: &PrefixIndex, k: u64| idx.blocks.get(k).unwrap();
        let shared = value(&idx, 100);
        assert!(chain.iter().all(|&k| value(&idx, k) == shared));
        assert_eq!(
            idx.arena.shared.get(&{
                let Spilled::Packed(p) = &idx.arena.sets[(shared & !SPILLED) as usize] else {
                    panic!("a packed set")
                };
                packed_fingerprint(p).unwrap()
            }),
            Some(&(shared & !SPILLED, 40))
        );
        // Endpoint 5 evicts block 120 and stores it again: a set of its own, then back.
        idx.remove(EndpointId(5), &[120], Tier::Gpu);
        assert_ne!(value(&idx, 120), shared);
        assert_eq!(value(&idx, 121), shared);
        let q = PrefixQuery {
            chain: &chain,
            precise: true,
            now_us: 0,
            source: PrefixSource::Best,
        };
        assert_eq!(idx.longest_prefixes(&q).blocks(EndpointId(5)), 20);
        assert_eq!(idx.longest_prefixes(&q).blocks(EndpointId(4)), 40);
        idx.store(EndpointId(5), &[120], Tier::Gpu);
        assert_eq!(value(&idx, 120), shared);
        assert_eq!(idx.longest_prefixes(&q).blocks(EndpointId(5)), 40);
        // A tier change is a different set.
        idx.store(EndpointId(0), &[130], Tier::Cpu);
        assert_ne!(value(&idx, 130), shared);
        // Everyone leaves: nothing is left shared, every slot is free.
        for e in 0..6 {
            idx.clear_endpoint(EndpointId(e));
        }
        assert!(idx.arena.shared.is_empty());
        assert_eq!(idx.blocks.len(), 0);
        assert_eq!(idx.arena.free.len(), idx.arena.sets.len());
    }

    #[test]
    fn approx_capacity_evicts_least_recently_touched() {
        let mut idx = PrefixIndex::new(IndexConfig {
            approx_capacity_blocks: 3,
            approx_ttl_us: None,
            ..cfg()
        });
        let e = EndpointId(0);
        idx.touch_approx(e, &[1, 2], 10);
        idx.touch_approx(e, &[3], 20);
        idx.touch_approx(e, &[1], 30); // 1 refreshed: 2 is now the oldest
        idx.touch_approx(e, &[4], 40);
        assert_eq!(idx.approx_entries(e), 3);
        let q = |chain: &[u64]| {
            idx.longest_prefixes(&PrefixQuery {
                chain,
                precise: false,
                now_us: 50,
                source: PrefixSource::ApproxOnly,
            })
            .blocks(e)
        };
        assert_eq!(q(&[1]), 1);
        assert_eq!(q(&[2]), 0, "2 was least recently touched");
        assert_eq!(q(&[3]), 1);
        assert_eq!(q(&[4]), 1);
    }

    #[test]
    fn approx_ttl_expires_on_read_and_on_purge() {
        let mut idx = PrefixIndex::new(cfg());
        let e = EndpointId(1);
        idx.touch_approx(e, &[7, 8], 0);
        let q = |idx: &PrefixIndex, now| {
            idx.longest_prefixes(&PrefixQuery {
                chain: &[7, 8],
                precise: false,
                now_us: now,
                source: PrefixSource::ApproxOnly,
            })
            .blocks(e)
        };
        assert_eq!(q(&idx, 1_000), 2);
        assert_eq!(q(&idx, 1_002), 0, "older than the TTL");
        idx.expire_approx(e, 1_002);
        assert_eq!(idx.approx_entries(e), 0);
        assert_eq!(idx.memory().keys, 0, "expired keys are freed");
    }

    #[test]
    fn precise_overflow_drops_view_and_untrusts() {
        let mut idx = PrefixIndex::new(IndexConfig {
            precise_capacity_blocks: 4,
            ..cfg()
        });
        let e = EndpointId(0);
        idx.set_trusted(e, true);
        assert_eq!(idx.store(e, &[1, 2, 3], Tier::Gpu), ApplyOutcome::Applied);
        assert_eq!(
            idx.store(e, &[1, 2, 3], Tier::Cpu),
            ApplyOutcome::Applied,
            "same blocks, new tier"
        );
        assert_eq!(idx.store(e, &[4, 5], Tier::Gpu), ApplyOutcome::Overflowed);
        assert!(!idx.is_trusted(e));
        assert_eq!(idx.precise_entries(e), 0);
        assert_eq!(idx.memory().keys, 0);
    }

    #[test]
    fn compaction_keeps_log_bounded() {
        let mut idx = PrefixIndex::new(cfg());
        let e = EndpointId(0);
        for t in 0..10_000u64 {
            idx.touch_approx(e, &[1, 2, 3], t);
        }
        assert_eq!(idx.approx_entries(e), 3);
        assert!(idx.eps[0].as_ref().unwrap().approx_log.len() <= 2 * 3 + 1024 + 3);
    }

    #[test]
    fn memory_per_entry_is_reported() {
        let mut idx = PrefixIndex::new(cfg());
        for e in 0..4u32 {
            let keys: Vec<u64> = (0..10_000u64)
                .map(|k| k * 7919 + u64::from(e) * 1_000_003)
                .collect();
            idx.store(EndpointId(e), &keys, Tier::Gpu);
        }
        let m = idx.memory();
        assert_eq!(m.entries, 40_000);
        let per = m.heap_bytes as f64 / m.entries as f64;
        let (holder, slot) = PrefixIndex::layout_sizes();
        println!(
            "index memory: {per:.1} bytes per (block, endpoint) entry (holder {holder} B, slot {slot} B)"
        );
        assert!(per > slot as f64 && per < 4.0 * slot as f64, "{per}");
    }

    /// Bytes per entry of an index of `groups × holders` endpoints where each group of
    /// `holders` endpoints holds the same `blocks` precise blocks, freshly built and after
    /// `rounds` rounds in which every group evicts 256 random blocks and stores 256 new ones.
    fn churned_bytes_per_entry(
        groups: u32,
        holders: u32,
        blocks: usize,
        rounds: usize,
    ) -> (f64, f64) {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(15);
        let mut idx = PrefixIndex::new(cfg());
        let mut live: Vec<Vec<u64>> = (0..groups)
            .map(|_| (0..blocks).map(|_| rng.random()).collect())
            .collect();
        let eps = |g: usize| (0..holders).map(move |h| EndpointId(g as u32 * holders + h));
        for (g, keys) in live.iter().enumerate() {
            for id in eps(g) {
                idx.store(id, keys, Tier::Gpu);
            }
        }
        let per = |idx: &PrefixIndex| {
            let m = idx.memory();
            assert_eq!(m.entries, (groups * holders) as usize * blocks);
            m.heap_bytes as f64 / m.entries as f64
        };
        let fresh = per(&idx);
        for _ in 0..rounds {
            for (g, keys) in live.iter_mut().enumerate() {
                let (mut out, mut new) = (Vec::new(), Vec::new());
                for i in rand::seq::index::sample(&mut rng, keys.len(), 256) {
                    new.push(rng.random());
                    out.push(std::mem::replace(&mut keys[i], *new.last().unwrap()));
                }
                for id in eps(g) {
                    idx.remove(id, &out, Tier::Gpu);
                    idx.store(id, &new, Tier::Gpu);
                }
            }
        }
        (fresh, per(&idx))
    }

    /// Issue 15: a hashbrown table doubles under store/remove churn and never shrinks, which
    /// took the index from 43 to 118.5 bytes per entry; the budget is 32, fresh and churned.
    #[test]
    fn memory_per_entry_stays_within_32_bytes_under_churn() {
        // 4 × 12,000 private entries: just past a power of two (hashbrown's worst case); then
        // blocks cached on 2 and on 3 engines. Each turned over five times.
        for (groups, holders, blocks) in [(4, 1, 12_000), (4, 2, 6_000), (2, 3, 8_000)] {
            let (fresh, churned) =
                churned_bytes_per_entry(groups, holders, blocks, 5 * blocks / 256);
            println!(
                "{holders} holder(s) per block: {fresh:.1} bytes per entry fresh, {churned:.1} after churn"
            );
            assert!(fresh <= 32.0, "{holders} holders, fresh: {fresh:.1}");
            assert!(
                churned <= 32.0,
                "{holders} holders, after churn: {churned:.1}"
            );
        }
    }
}
