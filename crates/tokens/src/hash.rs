//! vLLM's `sha256_cbor` prefix-caching hash chain.
//!
//! `NONE = sha256(cbor(seed))`, and for each *full* block
//! `h_i = sha256(cbor_canonical([h_{i-1} as 32-byte bstr, [token ids], extra_keys or null]))`.
//! Extra keys are assembled in vLLM's fixed order: the LoRA adapter name on every block, then the
//! cache salt on the first block only. The key used in KV events and in the router's index is the
//! low 64 bits of `h_i` (its last 8 bytes, big-endian).
//!
//! The CBOR is written by `ciborium`, which always picks the shortest integer encoding, so the
//! bytes are the canonical form `cbor2.dumps(..., canonical=True)` produces for these shapes
//! (no maps or floats appear in the hashed tuple, so canonical ordering rules never apply).

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

/// Per-request inputs to the hash besides the tokens (vLLM's `extra_keys`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ExtraKeys<'a> {
    /// LoRA adapter name; hashed into every block.
    pub lora_name: Option<&'a str>,
    /// Cache-isolation salt; hashed into the first block only.
    pub cache_salt: Option<&'a str>,
}

/// The root of every chain: `sha256(cbor(seed))`, where `seed` plays the role of PYTHONHASHSEED.
pub fn none_hash(seed: &str) -> BlockHash {
    let mut buf = Vec::with_capacity(seed.len() + 9);
    ciborium::into_writer(seed, &mut buf).expect("writing CBOR to a Vec cannot fail");
    BlockHash(Sha256::digest(&buf).into())
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

struct BlockInput<'a> {
    parent: &'a [u8; 32],
    tokens: &'a [u32],
    extra: &'a [&'a str],
}
impl Serialize for BlockInput<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut t = s.serialize_tuple(3)?;
        t.serialize_element(&Bstr(self.parent))?;
        t.serialize_element(&Tokens(self.tokens))?;
        if self.extra.is_empty() {
            t.serialize_element(&Option::<()>::None)?;
        } else {
            t.serialize_element(self.extra)?;
        }
        t.end()
    }
}

/// Hashes one block given its parent; `extra` is the already-assembled extra-keys list.
pub fn hash_block(parent: &BlockHash, tokens: &[u32], extra: &[&str]) -> BlockHash {
    let mut buf = Vec::with_capacity(48 + tokens.len() * 5);
    ciborium::into_writer(
        &BlockInput {
            parent: &parent.0,
            tokens,
            extra,
        },
        &mut buf,
    )
    .expect("writing CBOR to a Vec cannot fail");
    BlockHash(Sha256::digest(&buf).into())
}

/// Computes the chain of full-block hashes for a token sequence.
#[derive(Clone, Debug)]
pub struct BlockHasher {
    root: BlockHash,
    block_size: usize,
}

impl BlockHasher {
    /// A hasher for `seed` (the PYTHONHASHSEED equivalent) and `block_size` tokens per block.
    ///
    /// # Panics
    /// If `block_size` is zero.
    pub fn new(seed: &str, block_size: usize) -> Self {
        assert!(block_size > 0, "block_size must be positive");
        Self {
            root: none_hash(seed),
            block_size,
        }
    }

    /// Tokens per block.
    pub fn block_size(&self) -> usize {
        self.block_size
    }

    /// The chain root (`NONE_HASH`).
    pub fn root(&self) -> BlockHash {
        self.root
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
        let mut keys: Vec<&str> = Vec::with_capacity(2);
        for (i, block) in tokens.chunks_exact(self.block_size).enumerate() {
            keys.clear();
            if let Some(l) = extra.lora_name {
                keys.push(l);
            }
            if first_block + i == 0
                && let Some(s) = extra.cache_salt.filter(|s| !s.is_empty())
            {
                keys.push(s);
            }
            parent = hash_block(&parent, block, &keys);
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
        let h = BlockHasher::new("0", 2);
        let plain = h.hashes(&[1, 2, 3, 4], ExtraKeys::default());
        let salted = h.hashes(
            &[1, 2, 3, 4],
            ExtraKeys {
                cache_salt: Some("s"),
                ..Default::default()
            },
        );
        assert_ne!(plain[0], salted[0]);
        assert_ne!(plain[1], salted[1]);
        // Block 1 of the salted chain has no extra keys of its own: it equals an unsalted hash
        // of the same tokens under the salted parent.
        assert_eq!(salted[1], hash_block(&salted[0], &[3, 4], &[]));
    }

    #[test]
    fn continuing_a_chain_matches_hashing_at_once() {
        let h = BlockHasher::new("42", 3);
        let toks: Vec<u32> = (0..30).collect();
        let extra = ExtraKeys {
            lora_name: Some("a"),
            cache_salt: Some("x"),
        };
        let all = h.hashes(&toks, extra);
        let head = h.hashes(&toks[..9], extra);
        let tail = h.hashes_from(head.last().unwrap(), 3, &toks[9..], extra);
        assert_eq!([head, tail].concat(), all);
    }
}
