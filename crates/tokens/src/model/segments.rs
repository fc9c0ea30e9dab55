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
//! **Bound.** Pieces are keyed by a 128-bit hash of their text and kept in two generations:
//! lookups promote from the old one, inserts go to the current one, and when the current one
//! holds half of [`SEGMENT_CACHE_TOKENS`] it becomes the old one (the previous old one is
//! dropped). That is an approximate LRU in O(1) per piece with at most the budget held; hand
//! written because none of the chosen crates provides a bounded cache, and it is 40 lines.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use aho_corasick::{AhoCorasick, MatchKind};
use xxhash_rust::xxh3::xxh3_128;

/// Token ids held by the piece cache of one model, at most (4 bytes each: 8 MiB). Two million
/// tokens are the histories of ~60 live 32k-token conversations, or ~500 of 4k.
pub const SEGMENT_CACHE_TOKENS: usize = 2_000_000;

/// Pieces this short are tokenised directly: a lookup costs about as much.
const MIN_CACHED_BYTES: usize = 32;

/// Where a rendered chat is cut, and the ids of the tokens it is cut at.
pub(crate) struct Segmenter {
    matcher: AhoCorasick,
    ids: Vec<u32>,
    cache: Mutex<Generations>,
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
        self.insert(key, t.clone());
        Some(t)
    }

    fn insert(&mut self, key: u128, tokens: Arc<[u32]>) {
        if self.current_tokens + tokens.len() > SEGMENT_CACHE_TOKENS / 2 {
            self.previous = std::mem::take(&mut self.current);
            self.current_tokens = 0;
        }
        self.current_tokens += tokens.len();
        self.current.insert(key, tokens);
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
            let key = xxh3_128(s.as_bytes());
            let hit = self.lock().get(key);
            match hit {
                Some(t) => out.extend_from_slice(&t),
                None => {
                    let t: Arc<[u32]> = encode(s)?.into();
                    out.extend_from_slice(&t);
                    self.lock().insert(key, t);
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

    #[test]
    fn generations_stay_within_the_budget_and_promote_what_is_used() {
        let mut g = Generations::default();
        let piece: Arc<[u32]> = vec![7; 1000].into();
        g.insert(0, piece.clone());
        for k in 1..5_000u128 {
            g.insert(k, piece.clone());
            // Key 0 is used all along: it survives every turnover.
            assert!(g.get(0).is_some(), "after {k} inserts");
        }
        let held = g.current_tokens + g.previous.values().map(|t| t.len()).sum::<usize>();
        assert!(held <= SEGMENT_CACHE_TOKENS + 1000, "{held}");
        assert!(g.get(1).is_none(), "an old, unused piece was dropped");
    }
}
