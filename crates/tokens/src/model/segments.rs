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
//!
//! ## Long pieces are cut at words
//! One long message (a 220 KB document with a question after it, llm-d's long-prompt case)
//! is a single piece, and a new question makes it a new piece: cached whole, it would never be
//! hit again. Pieces of at least twice [`CHUNK_MIN_BYTES`] are therefore cut further, at *word
//! cuts*: an ASCII space with an ASCII letter on both sides (`…word| next…`). Tokens never
//! cross a word cut in the byte-level BPE tokenizers vLLM's models ship: their pre-tokenizer
//! regexes (GPT-2's, Llama-3's, Qwen's) have no look-behind, end a letter run at the space,
//! and begin the next match with ` next`; normalisers such as NFC never compose across an
//! ASCII space. Which word cuts are used depends only on the text around them (a hash of
//! the [`WINDOW`] bytes before the cut selects about one in [`CHUNK_SELECT`], at least
//! [`CHUNK_MIN_BYTES`] after the previous cut), so the same document yields the same chunks
//! after any prefix or before any question, and each chunk is cached like a piece. As with
//! special tokens nothing is assumed: at load, a vocabulary with a token spanning a word cut,
//! or an added token that could (one the cache does not cut at that strips spaces or holds
//! one), keeps long pieces whole, and so does a tokenizer that tokenises varied text cut at
//! *every* word cut differently from the whole. A
//! wrong cut could only cost prefix-cache hits (the keys would not match the engine's), never
//! a wrong answer: the engine tokenises the request itself.

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

/// Pieces and chunks at least this long are cut at selected word cuts (see the module docs):
/// shorter chunks would cost more in lookups and entries than their tokenisation.
pub(crate) const CHUNK_MIN_BYTES: usize = 512;

/// About one word cut in this many (past [`CHUNK_MIN_BYTES`]) ends a chunk: with English's
/// ~6 bytes per word, chunks of ~1.3 KB (~300 tokens).
const CHUNK_SELECT: u64 = 128;

/// The word cuts of `text`: byte offsets of an ASCII space with an ASCII letter on both sides.
pub(crate) fn word_cuts(text: &str) -> impl Iterator<Item = usize> + '_ {
    let b = text.as_bytes();
    (1..b.len().saturating_sub(1)).filter(move |&i| {
        b[i] == b' ' && b[i - 1].is_ascii_alphabetic() && b[i + 1].is_ascii_alphabetic()
    })
}

/// Bytes before a word cut that decide whether it ends a chunk: about four words, so even a
/// text of a few distinct words has enough distinct windows for cuts to be selected.
const WINDOW: usize = 24;

/// Whether the word cut at `at` ends a chunk: a hash of the [`WINDOW`] bytes before it (so the
/// choice depends on the text, not on where the piece starts) selects one in [`CHUNK_SELECT`].
fn selected(b: &[u8], at: usize) -> bool {
    let Some(w) = at.checked_sub(WINDOW).and_then(|s| b.get(s..at)) else {
        return false;
    };
    let word = |i: usize| {
        let mut x = [0u8; 8];
        x.copy_from_slice(&w[i * 8..i * 8 + 8]);
        u64::from_le_bytes(x)
    };
    // Multiply-xor folding (Fibonacci hashing): the top bits of each product mix every byte.
    const K: u64 = 0x9E37_79B9_7F4A_7C15;
    let h = ((word(0).wrapping_mul(K) ^ word(1)).wrapping_mul(K) ^ word(2)).wrapping_mul(K);
    (h >> 40) % CHUNK_SELECT == 0
}

/// A chunk is cut at the first word cut past this length when no selected one came first
/// (text of one repeated word, say): such cuts depend on where the piece starts, so they are
/// only a bound on what one changed byte costs.
const CHUNK_MAX_BYTES: usize = 16 * 1024;

/// `piece` cut into chunks at selected word cuts, each at least [`CHUNK_MIN_BYTES`] long
/// (except a short last one).
fn chunks(piece: &str) -> impl Iterator<Item = &str> {
    let b = piece.as_bytes();
    let mut start = 0;
    let mut done = false;
    std::iter::from_fn(move || {
        if done {
            return None;
        }
        let mut i = start + CHUNK_MIN_BYTES;
        while i + 1 < b.len() {
            // Scan for spaces only; the other conditions are checked at each.
            match b[i..b.len() - 1].iter().position(|&c| c == b' ') {
                None => break,
                Some(off) => i += off,
            }
            if b[i - 1].is_ascii_alphabetic()
                && b[i + 1].is_ascii_alphabetic()
                && (selected(b, i) || i - start >= CHUNK_MAX_BYTES)
            {
                let chunk = &piece[start..i];
                start = i;
                return Some(chunk);
            }
            i += 1;
        }
        done = true;
        Some(&piece[start..])
    })
}

/// Where a rendered chat is cut, and the ids of the tokens it is cut at.
pub(crate) struct Segmenter {
    matcher: AhoCorasick,
    ids: Vec<u32>,
    /// Whether long pieces are cut at word cuts (the load-time probe found it exact).
    pub(crate) cut_words: bool,
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
            cut_words: false,
            cache: Mutex::new(Generations::default()),
            // A per-process random seed (std's hasher keys are drawn from the OS).
            seed: std::hash::BuildHasher::hash_one(
                &std::collections::hash_map::RandomState::new(),
                0u64,
            ),
        })
    }

    /// The ids of the special tokens cut at.
    pub(crate) fn token_ids(&self) -> &[u32] {
        &self.ids
    }

    /// The special tokens cut at, as text (for probes).
    pub(crate) fn token_texts(&self, tokenizer: &tokenizers::Tokenizer) -> Vec<String> {
        self.ids
            .iter()
            .filter_map(|&id| tokenizer.id_to_token(id))
            .collect()
    }

    /// `text` tokenised piece by piece with `encode` (no special tokens added; long pieces
    /// chunk by chunk when [`Segmenter::cut_words`]), pieces seen before taken from the cache.
    pub(crate) fn encode<E>(
        &self,
        text: &str,
        mut encode: impl FnMut(&str) -> Result<Vec<u32>, E>,
    ) -> Result<Vec<u32>, E> {
        let mut out = Vec::with_capacity(text.len() / 3);
        let mut chunk = |s: &str, out: &mut Vec<u32>| -> Result<(), E> {
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
        let cut_words = self.cut_words;
        let mut piece = |s: &str, out: &mut Vec<u32>| -> Result<(), E> {
            if cut_words && s.len() >= 2 * CHUNK_MIN_BYTES {
                chunks(s).try_for_each(|c| chunk(c, out))
            } else {
                chunk(s, out)
            }
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

    fn text(seed: u64, words: usize) -> String {
        const WORDS: [&str; 6] = ["tea", "kettle", "boils", "water", "slowly", "today,"];
        let mut x = seed;
        (0..words)
            .map(|_| {
                x = x
                    .wrapping_mul(6_364_136_223_846_793_005)
                    .wrapping_add(1_442_695_040_888_963_407);
                WORDS[(x >> 33) as usize % WORDS.len()]
            })
            .collect::<Vec<_>>()
            .join(" ")
    }

    /// Chunks put back together are the piece; each but the last is at least the minimum, and
    /// every cut is a word cut.
    #[test]
    fn chunks_cover_the_piece_at_word_cuts() {
        let piece = text(1, 20_000);
        let parts: Vec<&str> = chunks(&piece).collect();
        assert!(parts.len() > 20, "{} chunks", parts.len());
        assert_eq!(parts.concat(), piece);
        let cuts: std::collections::HashSet<usize> = word_cuts(&piece).collect();
        let mut at = 0;
        for p in &parts[..parts.len() - 1] {
            assert!(p.len() >= CHUNK_MIN_BYTES, "{}", p.len());
            assert!(p.len() <= CHUNK_MAX_BYTES + 64, "{}", p.len());
            at += p.len();
            assert!(cuts.contains(&at), "cut at {at} is not a word cut");
        }
    }

    /// The same text after different prefixes is cut at the same places once the first
    /// selected cut is past both prefixes: chunks are found in the cache whatever comes before.
    #[test]
    fn chunks_depend_on_the_text_not_where_it_starts() {
        let doc = text(2, 10_000);
        let a = format!("Read this first, please.\n{doc}");
        let b = format!("Q:\n{doc} and one more question?");
        let ca: Vec<&str> = chunks(&a).collect();
        let cb: Vec<&str> = chunks(&b).collect();
        let shared = ca.iter().filter(|c| cb.contains(c)).count();
        assert!(
            shared + 3 >= ca.len(),
            "{shared} of {} chunks shared",
            ca.len()
        );
    }

    /// Only an ASCII space between two ASCII letters is a word cut.
    #[test]
    fn word_cuts_are_spaces_between_letters() {
        let t = "ab cd  ef 1 g h. i é j\tk l";
        let cuts: Vec<usize> = word_cuts(t).collect();
        let expect: Vec<usize> = vec![2, 13, 25];
        assert_eq!(
            cuts,
            expect,
            "{:?}",
            cuts.iter().map(|&c| &t[..c]).collect::<Vec<_>>()
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
