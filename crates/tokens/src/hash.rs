//! vLLM's prefix-caching block-hash chain, as vLLM 0.32 computes it
//! (`vllm/v1/core/kv_cache_utils.py`: `init_none_hash`, `generate_block_hash_extra_keys`,
//! `hash_block_tokens`; `vllm/utils/hashing.py`: `sha256_cbor`).
//!
//! With `--prefix-caching-hash-algo sha256_cbor`: `NONE = sha256(cbor(seed))`, and for each
//! *full* block `h_i = sha256(cbor_canonical([h_{i-1} as 32-byte bstr, [token ids], extra_keys
//! or null]))`. The seed is `PYTHONHASHSEED`, or [`BlockHasher::DEFAULT_SEED`]
//! (`DEFAULT_NONE_HASH_SEED`) when it is unset. The key used in KV events and in a router's index
//! is the low 64 bits of `h_i` (its last 8 bytes, big-endian: `maybe_convert_block_hash`).
//!
//! **Extra keys are tagged inside the hash** (vLLM 0.32): `("lora", lora_name, lora_path)` on
//! every block of a LoRA request, then `("cache_salt", salt)` on the block starting at token 0
//! (an empty salt adds nothing), so a block's extra keys are
//! `[["lora", name, path], ["cache_salt", salt]]` in CBOR, or null when it has none. Older vLLM
//! hashed the bare values (`[name, salt]`); [`BlockHasher::untagged`] keeps that form.
//! **The published `BlockStored.extra_keys` carries the untagged values** (`to_event_extra_keys`:
//! the LoRA *name* without its path, the bare salt), which is [`ExtraKeys::event_keys`]: so a
//! consumer cannot rebuild a tagged hash from an event's own fields.
//!
//! vLLM's *default* algorithm, `sha256`, hashes Python `pickle` bytes, which nothing outside a
//! Python process reproduces. [`BlockHasher::keyed_sha256`] stands in for it: the same chain with
//! every digest keyed by a secret (`sha256(secret ‖ cbor(...))`), so a simulator that draws the
//! secret at random is exactly as opaque to a router as a real engine on its default, while its
//! engines still agree with each other (as vLLM engines sharing the default seed do).
//!
//! The CBOR is written by `ciborium`, which always picks the shortest integer encoding, so the
//! bytes are the canonical form `cbor2.dumps(..., canonical=True)` produces for these shapes
//! (no maps or floats appear in the hashed tuple, so canonical ordering rules never apply).
//! Known-answer vectors from Python `hashlib` + `cbor2` pin all of this
//! (`tests/fixtures/gen_hash_fixtures.py`), and so do keys a real vLLM 0.32 published, plain and
//! salted (`tests/fixtures/vllm032_captured.json`).

use serde::ser::{Serialize, SerializeSeq, SerializeTuple, Serializer};
use sha2::{Digest, Sha256};

/// A full 32-byte block hash as vLLM computes it.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BlockHash(pub [u8; 32]);

impl BlockHash {
    /// The 64-bit key vLLM publishes in KV events: the last 8 bytes, big-endian.
    pub fn key(&self) -> u64 {
        let mut low = [0u8; 8];
        low.copy_from_slice(&self.0[24..]);
        u64::from_be_bytes(low)
    }
}

impl std::fmt::Debug for BlockHash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "BlockHash(")?;
        for b in &self.0 {
            write!(f, "{b:02x}")?;
        }
        write!(f, ")")
    }
}

/// Per-request inputs to the hash besides the tokens (what vLLM's `generate_block_hash_extra_keys`
/// reads from the request).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ExtraKeys<'a> {
    /// LoRA adapter name; hashed into every block.
    pub lora_name: Option<&'a str>,
    /// LoRA adapter path (vLLM's `LoRARequest.lora_path`, what `--lora-modules name=path`
    /// gives); vLLM 0.32 hashes it with the name so that re-pointing a name at another adapter
    /// does not reuse stale KV. `None` hashes as the empty string. Ignored without `lora_name`
    /// and by the [untagged](BlockHasher::untagged) form.
    pub lora_path: Option<&'a str>,
    /// Cache-isolation salt; hashed into the first block only. Empty means none (vLLM tests the
    /// salt's truthiness).
    pub cache_salt: Option<&'a str>,
}

impl<'a> ExtraKeys<'a> {
    fn salt_at(&self, block_index: usize) -> Option<&'a str> {
        self.cache_salt
            .filter(|s| block_index == 0 && !s.is_empty())
    }

    /// The untagged values vLLM publishes in `BlockStored.extra_keys` for block number
    /// `block_index` of the request (vLLM's `to_event_extra_keys`): the LoRA name, then the salt
    /// on block 0; `None` when the block has neither.
    pub fn event_keys(&self, block_index: usize) -> Option<Vec<&'a str>> {
        let keys: Vec<&'a str> = self
            .lora_name
            .into_iter()
            .chain(self.salt_at(block_index))
            .collect();
        (!keys.is_empty()).then_some(keys)
    }
}

/// The root of every `sha256_cbor` chain: `sha256(cbor(seed))`, where `seed` plays the role of
/// PYTHONHASHSEED.
pub fn none_hash(seed: &str) -> BlockHash {
    Digester::Plain.root(seed)
}

struct Bstr<'a>(&'a [u8; 32]);
impl Serialize for Bstr<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(self.0)
    }
}

struct Tokens<'a>(&'a [u32]);
impl Serialize for Tokens<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut seq = s.serialize_seq(Some(self.0.len()))?;
        for t in self.0 {
            seq.serialize_element(t)?;
        }
        seq.end()
    }
}

/// One block's extra keys as they enter the hash.
#[derive(Clone, Copy)]
enum Extra<'a> {
    /// Bare values, already in order (older vLLM; [`hash_block`]'s input).
    Untagged(&'a [&'a str]),
    /// vLLM 0.32: `("lora", name, path)` then `("cache_salt", salt)`, each when present.
    Tagged {
        lora: Option<(&'a str, &'a str)>,
        salt: Option<&'a str>,
    },
}

impl Extra<'_> {
    fn is_empty(&self) -> bool {
        match self {
            Extra::Untagged(keys) => keys.is_empty(),
            Extra::Tagged { lora, salt } => lora.is_none() && salt.is_none(),
        }
    }
}

impl Serialize for Extra<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Extra::Untagged(keys) => keys.serialize(s),
            Extra::Tagged { lora, salt } => {
                let n = usize::from(lora.is_some()) + usize::from(salt.is_some());
                let mut seq = s.serialize_seq(Some(n))?;
                if let Some((name, path)) = lora {
                    seq.serialize_element(&("lora", name, path))?;
                }
                if let Some(salt) = salt {
                    seq.serialize_element(&("cache_salt", salt))?;
                }
                seq.end()
            }
        }
    }
}

struct BlockInput<'a> {
    parent: &'a [u8; 32],
    tokens: &'a [u32],
    extra: Extra<'a>,
}
impl Serialize for BlockInput<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut t = s.serialize_tuple(3)?;
        t.serialize_element(&Bstr(self.parent))?;
        t.serialize_element(&Tokens(self.tokens))?;
        if self.extra.is_empty() {
            t.serialize_element(&Option::<()>::None)?;
        } else {
            t.serialize_element(&self.extra)?;
        }
        t.end()
    }
}

/// How serialized bytes become a digest.
#[derive(Clone, PartialEq, Eq)]
enum Digester {
    /// vLLM's `sha256_cbor`: `sha256(cbor(x))`.
    Plain,
    /// The stand-in for vLLM's pickle-based `sha256`: `sha256(secret ‖ cbor(x))`.
    Keyed(Box<[u8; 32]>),
}

impl Digester {
    fn digest<T: Serialize>(&self, value: &T, size_hint: usize) -> BlockHash {
        let mut buf = Vec::with_capacity(size_hint);
        ciborium::into_writer(value, &mut buf).expect("writing CBOR to a Vec cannot fail");
        let mut h = Sha256::new();
        if let Digester::Keyed(secret) = self {
            h.update(secret.as_slice());
        }
        h.update(&buf);
        BlockHash(h.finalize().into())
    }

    fn root(&self, seed: &str) -> BlockHash {
        self.digest(&seed, seed.len() + 9)
    }

    fn block(&self, parent: &BlockHash, tokens: &[u32], extra: Extra<'_>) -> BlockHash {
        self.digest(
            &BlockInput {
                parent: &parent.0,
                tokens,
                extra,
            },
            48 + tokens.len() * 5,
        )
    }
}

/// Hashes one `sha256_cbor` block given its parent, with `extra` the block's already-assembled,
/// **untagged** extra-keys list (the pre-0.32 form; see [`BlockHasher::hash_block`] for the
/// hasher's own form).
pub fn hash_block(parent: &BlockHash, tokens: &[u32], extra: &[&str]) -> BlockHash {
    Digester::Plain.block(parent, tokens, Extra::Untagged(extra))
}

/// Computes the chain of full-block hashes for a token sequence, with one algorithm, seed and
/// extra-key form.
#[derive(Clone)]
pub struct BlockHasher {
    root: BlockHash,
    block_size: usize,
    digester: Digester,
    tagged: bool,
}

impl std::fmt::Debug for BlockHasher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print a keyed hasher's secret.
        let algo = match self.digester {
            Digester::Plain => "sha256_cbor",
            Digester::Keyed(_) => "keyed_sha256",
        };
        f.debug_struct("BlockHasher")
            .field("algo", &algo)
            .field("block_size", &self.block_size)
            .field("tagged", &self.tagged)
            .field("root", &self.root)
            .finish()
    }
}

impl BlockHasher {
    /// The seed vLLM derives `NONE_HASH` from when `PYTHONHASHSEED` is unset and the algorithm is
    /// cryptographic (`kv_cache_utils.DEFAULT_NONE_HASH_SEED`).
    pub const DEFAULT_SEED: &'static str = "vllm-none-hash";

    /// vLLM 0.32's `sha256_cbor` chain for `seed` (the PYTHONHASHSEED equivalent) and
    /// `block_size` tokens per block, with tagged extra keys.
    ///
    /// # Panics
    /// If `block_size` is zero.
    pub fn new(seed: &str, block_size: usize) -> Self {
        Self::with_digester(Digester::Plain, seed, block_size)
    }

    /// The stand-in for vLLM's default, pickle-based `sha256`: the same chain with every digest
    /// keyed by `secret`. Whoever does not know the secret cannot compute or predict a hash.
    ///
    /// # Panics
    /// If `block_size` is zero.
    pub fn keyed_sha256(secret: &[u8; 32], seed: &str, block_size: usize) -> Self {
        Self::with_digester(Digester::Keyed(Box::new(*secret)), seed, block_size)
    }

    fn with_digester(digester: Digester, seed: &str, block_size: usize) -> Self {
        assert!(block_size > 0, "block_size must be positive");
        Self {
            root: digester.root(seed),
            block_size,
            digester,
            tagged: true,
        }
    }

    /// The same hasher with the pre-0.32 extra-key form: bare values (`[lora_name, salt]`), no
    /// tags and no LoRA path.
    pub fn untagged(mut self) -> Self {
        self.tagged = false;
        self
    }

    /// Whether extra keys enter the hash tagged (vLLM 0.32) rather than bare.
    pub fn is_tagged(&self) -> bool {
        self.tagged
    }

    /// Tokens per block.
    pub fn block_size(&self) -> usize {
        self.block_size
    }

    /// The chain root (`NONE_HASH`).
    pub fn root(&self) -> BlockHash {
        self.root
    }

    /// Hashes block number `block_index` of a request (whose tokens are `tokens`, exactly one
    /// block) under `parent`.
    pub fn hash_block(
        &self,
        parent: &BlockHash,
        block_index: usize,
        tokens: &[u32],
        extra: ExtraKeys<'_>,
    ) -> BlockHash {
        let salt = extra.salt_at(block_index);
        if self.tagged {
            let lora = extra
                .lora_name
                .map(|name| (name, extra.lora_path.unwrap_or("")));
            self.digester
                .block(parent, tokens, Extra::Tagged { lora, salt })
        } else {
            let mut keys: [&str; 2] = ["", ""];
            let mut n = 0;
            for k in extra.lora_name.into_iter().chain(salt) {
                keys[n] = k;
                n += 1;
            }
            self.digester
                .block(parent, tokens, Extra::Untagged(&keys[..n]))
        }
    }

    /// Full 32-byte hashes of every full block of `tokens`; a trailing partial block is not hashed.
    pub fn hashes(&self, tokens: &[u32], extra: ExtraKeys<'_>) -> Vec<BlockHash> {
        self.hashes_from(&self.root, 0, tokens, extra)
    }

    /// Continues a chain: hashes full blocks of `tokens`, the first of which is block number
    /// `first_block` of the request and whose parent is `parent`. Lets a caller extend a prefix
    /// already hashed (a growing decode, a cached prefix) without rehashing it.
    pub fn hashes_from(
        &self,
        parent: &BlockHash,
        first_block: usize,
        tokens: &[u32],
        extra: ExtraKeys<'_>,
    ) -> Vec<BlockHash> {
        let mut out = Vec::with_capacity(tokens.len() / self.block_size);
        let mut parent = *parent;
        for (i, block) in tokens.chunks_exact(self.block_size).enumerate() {
            parent = self.hash_block(&parent, first_block + i, block, extra);
            out.push(parent);
        }
        out
    }

    /// The 64-bit keys of [`Self::hashes`].
    pub fn keys(&self, tokens: &[u32], extra: ExtraKeys<'_>) -> Vec<u64> {
        self.hashes(tokens, extra)
            .iter()
            .map(BlockHash::key)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SALTED: ExtraKeys<'static> = ExtraKeys {
        lora_name: None,
        lora_path: None,
        cache_salt: Some("s"),
    };

    #[test]
    fn chain_depends_on_every_earlier_block() {
        let h = BlockHasher::new("0", 4);
        let a = h.keys(&[1, 2, 3, 4, 5, 6, 7, 8, 9], ExtraKeys::default());
        let b = h.keys(&[1, 2, 3, 5, 5, 6, 7, 8], ExtraKeys::default());
        assert_eq!(a.len(), 2, "the partial block is not hashed");
        assert_ne!(a[0], b[0]);
        assert_ne!(a[1], b[1], "same block content, different parent");
    }

    #[test]
    fn salt_touches_first_block_and_propagates() {
        for h in [
            BlockHasher::new("0", 2),
            BlockHasher::new("0", 2).untagged(),
        ] {
            let plain = h.hashes(&[1, 2, 3, 4], ExtraKeys::default());
            let salted = h.hashes(&[1, 2, 3, 4], SALTED);
            assert_ne!(plain[0], salted[0]);
            assert_ne!(plain[1], salted[1]);
            // Block 1 of the salted chain has no extra keys of its own: it equals an unsalted
            // hash of the same tokens under the salted parent.
            assert_eq!(salted[1], hash_block(&salted[0], &[3, 4], &[]));
        }
    }

    #[test]
    fn without_extra_keys_tagging_changes_nothing() {
        let toks: Vec<u32> = (0..10).collect();
        let tagged = BlockHasher::new("7", 4).hashes(&toks, ExtraKeys::default());
        let untagged = BlockHasher::new("7", 4)
            .untagged()
            .hashes(&toks, ExtraKeys::default());
        assert_eq!(tagged, untagged);
    }

    #[test]
    fn tags_separate_a_salt_from_an_adapter_of_the_same_name() {
        // The collision tagging exists to prevent: untagged, a LoRA named "x" and a salt "x"
        // hash the same first block.
        let lora = ExtraKeys {
            lora_name: Some("x"),
            ..Default::default()
        };
        let salt = ExtraKeys {
            cache_salt: Some("x"),
            ..Default::default()
        };
        let untagged = BlockHasher::new("0", 2).untagged();
        assert_eq!(untagged.keys(&[1, 2], lora), untagged.keys(&[1, 2], salt));
        let tagged = BlockHasher::new("0", 2);
        assert_ne!(tagged.keys(&[1, 2], lora), tagged.keys(&[1, 2], salt));
        let moved = ExtraKeys {
            lora_path: Some("/elsewhere"),
            ..lora
        };
        assert_ne!(
            tagged.keys(&[1, 2], lora),
            tagged.keys(&[1, 2], moved),
            "the adapter path is hashed"
        );
    }

    #[test]
    fn event_keys_are_untagged_per_block() {
        let both = ExtraKeys {
            lora_name: Some("a"),
            lora_path: Some("/p"),
            cache_salt: Some("s"),
        };
        assert_eq!(both.event_keys(0), Some(vec!["a", "s"]));
        assert_eq!(both.event_keys(1), Some(vec!["a"]));
        assert_eq!(SALTED.event_keys(0), Some(vec!["s"]));
        assert_eq!(SALTED.event_keys(1), None);
        let empty_salt = ExtraKeys {
            cache_salt: Some(""),
            ..Default::default()
        };
        assert_eq!(empty_salt.event_keys(0), None);
    }

    #[test]
    fn keyed_chain_differs_from_sha256_cbor_and_between_secrets() {
        let toks: Vec<u32> = (0..8).collect();
        let cbor = BlockHasher::new("0", 4).keys(&toks, ExtraKeys::default());
        let a = BlockHasher::keyed_sha256(&[1; 32], "0", 4);
        let b = BlockHasher::keyed_sha256(&[2; 32], "0", 4);
        assert_ne!(a.keys(&toks, ExtraKeys::default()), cbor);
        assert_ne!(
            a.keys(&toks, ExtraKeys::default()),
            b.keys(&toks, ExtraKeys::default())
        );
        assert_eq!(
            a.keys(&toks, ExtraKeys::default()),
            a.clone().keys(&toks, ExtraKeys::default()),
            "one secret, one chain"
        );
        let shown = format!("{a:?}");
        assert!(
            shown.contains("keyed_sha256") && !shown.contains("[1, 1"),
            "Debug names the algorithm and hides the secret: {shown}"
        );
    }

    #[test]
    fn continuing_a_chain_matches_hashing_at_once() {
        let h = BlockHasher::new("42", 3);
        let toks: Vec<u32> = (0..30).collect();
        let extra = ExtraKeys {
            lora_name: Some("a"),
            lora_path: Some("/adapters/a"),
            cache_salt: Some("x"),
        };
        let all = h.hashes(&toks, extra);
        let head = h.hashes(&toks[..9], extra);
        let tail = h.hashes_from(head.last().unwrap(), 3, &toks[9..], extra);
        assert_eq!([head, tail].concat(), all);
    }
}
