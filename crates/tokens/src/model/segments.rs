//! Reusing the tokenisation of a conversation's unchanged history.
//!
//! A rendered chat is text between special tokens (`<|im_start|>`, `<|eot_id|>`, …). A
//! HuggingFace tokenizer cuts its input at added tokens before it normalises or pre-tokenises
//! anything (`AddedVocabulary::extract_and_normalize`), so the text between two special tokens
//! is tokenised on its own; tokenising each piece separately and concatenating gives the same
//! ids. Turn N+1 of a conversation repeats turns 1..N byte for byte, so their pieces are looked
//! up instead of tokenised again: measured with SmolLM2's tokenizer on this machine, encoding a
//! 32k-token conversation took ~35 ms against ~0.4 ms for rendering it.
//!
//! **Safety.** The equivalence holds for the tokenizers vLLM's models ship (byte-level BPE
//! with a split-first pre-tokenizer), but not for every tokenizer: a SentencePiece-style
//! `Metaspace` with `prepend_scheme: first` prepends only to the input's first piece, which a
//! piece tokenised alone would get wrong. So it is never assumed: at load, probe texts (a
//! rendered probe conversation when the template renders one, and synthetic text around every
//! special token) are tokenised both ways, and any difference turns the cache off for that
//! model (logged by the caller). Only special tokens that HuggingFace matches on the raw text
//! exactly (`normalized: false`, no `lstrip`/`rstrip`/`single_word`) are cut at.
//!
//! **Bound.** Pieces are keyed by a 128-bit hash of their text (seeded per process, so no
//! client can aim a collision at another's piece) and kept in two generations: lookups promote
//! from the old one, inserts go to the current one, and when the current one holds half of
//! [`SEGMENT_CACHE_TOKENS`] it becomes the old one (the previous old one is dropped, outside
//! the lock). Each entry is charged its tokens plus [`ENTRY_OVERHEAD_TOKENS`] (its map slot and
//! allocation), so pieces that tokenise to nothing still fill the budget; pieces over a tenth
//! of the budget are not cached. That is an approximate LRU in O(1) per piece; hand written
//! because none of the chosen crates provides a bounded cache, and it is 40 lines.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use aho_corasick::{AhoCorasick, MatchKind};
use xxhash_rust::xxh3::xxh3_128_with_seed;

/// Token ids (with each entry's overhead in token units) held by the piece cache of one model,
/// at most: ~8 MiB of ids plus up to as much again in entry overhead for short pieces. Two
/// million tokens are the histories of ~60 live 32k-token conversations, or ~500 of 4k.
pub const SEGMENT_CACHE_TOKENS: usize = 2_000_000;

/// What a cache entry costs besides its ids (hash-map slot, `Arc` header, key), in 4-byte
/// token units.
const ENTRY_OVERHEAD_TOKENS: usize = 16;

/// Pieces this short are tokenised directly: a lookup costs about as much.
const MIN_CACHED_BYTES: usize = 32;

/// Where a rendered chat is cut, and the ids of the tokens it is cut at.
pub(crate) struct Segmenter {
    matcher: AhoCorasick,
    ids: Vec<u32>,
    cache: Mutex<Generations>,
    seed: u64,
}

#[derive(Default)]
struct Generations {
    current: HashMap<u128, Arc<[u32]>>,
    current_tokens: usize,
    previous: HashMap<u128, Arc<[u32]>>,
}

impl Generations {
    fn get(&mut self, key: u128) -> Option<Arc<[u32]>> {
        if let Some(t) = self.current.get(&key) {
            return Some(t.clone());
        }
        let t = self.previous.remove(&key)?;
        // A promotion retires a generation rarely; dropping it here is the caller's lock time.
        drop(self.insert(key, t.clone()));
        Some(t)
    }

    /// Inserts; returns the generation that was retired, for the caller to drop after
    /// unlocking.
    fn insert(&mut self, key: u128, tokens: Arc<[u32]>) -> Option<HashMap<u128, Arc<[u32]>>> {
        let charge = tokens.len() + ENTRY_OVERHEAD_TOKENS;
        let mut retired = None;
        if self.current_tokens + charge > SEGMENT_CACHE_TOKENS / 2 {
            retired = Some(std::mem::replace(
                &mut self.previous,
                std::mem::take(&mut self.current),
            ));
            self.current_tokens = 0;
        }
        self.current_tokens += charge;
        self.current.insert(key, tokens);
        retired
    }
}

impl Segmenter {
    /// The special tokens of `tokenizer` a piece boundary may be placed at; `None` if it has
    /// none.
    pub(crate) fn new(tokenizer: &tokenizers::Tokenizer) -> Option<Self> {
        let mut tokens: Vec<(u32, String)> = tokenizer
            .get_added_tokens_decoder()
            .into_iter()
            .filter(|(_, t)| {
                t.special
                    && !t.normalized
                    && !t.lstrip
                    && !t.rstrip
                    && !t.single_word
                    && !t.content.is_empty()
            })
            .map(|(id, t)| (id, t.content))
            .collect();
        if tokens.is_empty() {
            return None;
        }
        tokens.sort();
        let matcher = AhoCorasick::builder()
            .match_kind(MatchKind::LeftmostLongest)
            .build(tokens.iter().map(|(_, c)| c.as_str()))
            .ok()?;
        Some(Self {
            matcher,
            ids: tokens.iter().map(|(id, _)| *id).collect(),
            cache: Mutex::new(Generations::default()),
            // A per-process random seed (std's hasher keys are drawn from the OS).
            seed: std::hash::BuildHasher::hash_one(
                &std::collections::hash_map::RandomState::new(),
                0u64,
            ),
        })
    }

    /// The special tokens cut at, as text (for probes).
    pub(crate) fn token_texts(&self, tokenizer: &tokenizers::Tokenizer) -> Vec<String> {
        self.ids
            .iter()
            .filter_map(|&id| tokenizer.id_to_token(id))
            .collect()
    }

    /// `text` tokenised piece by piece with `encode` (no special tokens added), pieces seen
    /// before taken from the cache.
    pub(crate) fn encode<E>(
        &self,
        text: &str,
        mut encode: impl FnMut(&str) -> Result<Vec<u32>, E>,
    ) -> Result<Vec<u32>, E> {
        let mut out = Vec::with_capacity(text.len() / 3);
        let mut piece = |s: &str, out: &mut Vec<u32>| -> Result<(), E> {
            if s.is_empty() {
                return Ok(());
            }
            if s.len() < MIN_CACHED_BYTES {
                out.extend(encode(s)?);
                return Ok(());
            }
            let key = xxh3_128_with_seed(s.as_bytes(), self.seed);
            let hit = self.lock().get(key);
            match hit {
                Some(t) => out.extend_from_slice(&t),
                None => {
                    let t: Arc<[u32]> = encode(s)?.into();
                    out.extend_from_slice(&t);
                    if t.len() + ENTRY_OVERHEAD_TOKENS <= SEGMENT_CACHE_TOKENS / 10 {
                        let retired = self.lock().insert(key, t);
                        drop(retired);
                    }
                }
            }
            Ok(())
        };
        let mut last = 0;
        for m in self.matcher.find_iter(text) {
            piece(&text[last..m.start()], &mut out)?;
            out.push(self.ids[m.pattern().as_usize()]);
            last = m.end();
        }
        piece(&text[last..], &mut out)?;
        Ok(out)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Generations> {
        self.cache.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Tokens held by the cache now.
    pub(crate) fn cached_tokens(&self) -> usize {
        let g = self.lock();
        g.current_tokens + g.previous.values().map(|t| t.len()).sum::<usize>()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Pieces that tokenise to nothing (characters a vocabulary drops) still cost their entry:
    /// a client sending endless distinct such pieces cannot grow the cache without bound.
    #[test]
    fn empty_pieces_are_charged_their_entry() {
        let mut g = Generations::default();
        let empty: Arc<[u32]> = Vec::new().into();
        for k in 0..1_000_000u128 {
            drop(g.insert(k, empty.clone()));
        }
        assert!(
            g.current.len() + g.previous.len()
                <= 2 * SEGMENT_CACHE_TOKENS / ENTRY_OVERHEAD_TOKENS / 2 + 1,
            "{} entries",
            g.current.len() + g.previous.len()
        );
    }

    #[test]
    fn generations_stay_within_the_budget_and_promote_what_is_used() {
        let mut g = Generations::default();
        let piece: Arc<[u32]> = vec![7; 1000].into();
        g.insert(0, piece.clone());
        for k in 1..5_000u128 {
            drop(g.insert(k, piece.clone()));
            // Key 0 is used all along: it survives every turnover.
            assert!(g.get(0).is_some(), "after {k} inserts");
        }
        let held = g.current_tokens
            + g.previous
                .values()
                .map(|t| t.len() + ENTRY_OVERHEAD_TOKENS)
                .sum::<usize>();
        assert!(held <= SEGMENT_CACHE_TOKENS + 1000, "{held}");
        assert!(g.get(1).is_none(), "an old, unused piece was dropped");
    }
}
