//! The router's own block keys: a chained hash over token ids, independent of every engine.
//!
//! Engines name their cached blocks with hashes the router cannot reproduce in general: vLLM's
//! default algorithm is SHA-256 over a pickle with a per-process seed, its `sha256_cbor` depends
//! on `PYTHONHASHSEED`, cache salt and LoRA are hashed *tagged* while the events carry them
//! untagged, and SGLang hashes differently again. So the prefix index is keyed by this chain,
//! which the router computes the same way from a request's tokens and from a `BlockStored`
//! event's `token_ids`; an engine's hash is only an alias learnt from its `BlockStored` (see
//! [`crate::engine_keys`]). Nothing here needs a hash seed or an engine's algorithm.
//!
//! `root = xxh3(domain ‖ block_size ‖ lora ‖ salt)`, then for each full block
//! `key_i = xxh3_seeded(little-endian token bytes of block i, seed = key_{i-1})`. LoRA and cache
//! salt are folded into the root, so they separate every block of the chain, as they do in the
//! engine (vLLM hashes the adapter into every block and the salt into the first, which the
//! parent chain then carries on). The block size is in the root so that chains of engines with
//! different block sizes never collide. Only full blocks are keyed, as engines only cache full
//! blocks.
//!
//! xxh3 rather than SHA-256: the chain is the router's private naming, not a security boundary
//! (a tenant who could collide keys only misroutes its own requests), and xxh3 hashes a
//! 32k-token prompt in microseconds.

use xxhash_rust::xxh3::{xxh3_64, xxh3_64_with_seed};

/// Domain separator of the chain's root, versioned so a change of the scheme never aliases old
/// keys (keys are never persisted, but a mixed fleet of router versions shares nothing anyway).
const DOMAIN: &[u8] = b"kvgate-chain-v1";

/// Which cache namespace a chain lives in: what the engine keeps apart besides the tokens.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct KeyScope<'a> {
    /// LoRA adapter name (the engine never shares blocks across adapters).
    pub lora: Option<&'a str>,
    /// vLLM `cache_salt` (tenant isolation: blocks are shared only within one salt).
    pub cache_salt: Option<&'a str>,
}

/// The root of every chain of `block_size`-token blocks in `scope`.
pub fn chain_root(block_size: u32, scope: KeyScope<'_>) -> u64 {
    let mut buf = Vec::with_capacity(64);
    buf.extend_from_slice(DOMAIN);
    buf.extend_from_slice(&block_size.to_le_bytes());
    // Length-prefixed, with a presence tag, so `lora = "ab", salt = None` and
    // `lora = "a", salt = "b"` (and absent vs empty) differ.
    for part in [scope.lora, scope.cache_salt.filter(|s| !s.is_empty())] {
        match part {
            None => buf.push(0),
            Some(s) => {
                buf.push(1);
                buf.extend_from_slice(&(s.len() as u64).to_le_bytes());
                buf.extend_from_slice(s.as_bytes());
            }
        }
    }
    xxh3_64(&buf)
}

/// The key of the block `tokens` whose parent's key is `parent`.
pub fn chain_next(parent: u64, tokens: &[u32], buf: &mut Vec<u8>) -> u64 {
    buf.clear();
    for t in tokens {
        buf.extend_from_slice(&t.to_le_bytes());
    }
    xxh3_64_with_seed(buf, parent)
}

/// Mixes an opaque extra key (e.g. a multimodal input hash an engine folds into a block) into a
/// block key, so such blocks never match a text-only request's chain.
pub fn chain_mix(key: u64, opaque: u64) -> u64 {
    xxh3_64_with_seed(&opaque.to_le_bytes(), key)
}

/// Keys of every full `block_size`-token block of `tokens` in `scope`; empty for a zero
/// block size.
pub fn chain_keys(tokens: &[u32], block_size: u32, scope: KeyScope<'_>) -> Vec<u64> {
    if block_size == 0 {
        return Vec::new();
    }
    let bs = block_size as usize;
    let mut out = Vec::with_capacity(tokens.len() / bs);
    let mut parent = chain_root(block_size, scope);
    let mut buf = Vec::with_capacity(bs * 4);
    for block in tokens.chunks_exact(bs) {
        parent = chain_next(parent, block, &mut buf);
        out.push(parent);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chain_is_a_prefix_function_of_tokens() {
        let toks: Vec<u32> = (0..40).collect();
        let a = chain_keys(&toks, 8, KeyScope::default());
        let b = chain_keys(&toks[..20], 8, KeyScope::default());
        assert_eq!(a.len(), 5);
        assert_eq!(b.len(), 2, "the partial block is not keyed");
        assert_eq!(&a[..2], &b[..]);
        let mut other = toks.clone();
        other[3] = 99;
        let c = chain_keys(&other, 8, KeyScope::default());
        assert!(
            a.iter().zip(&c).all(|(x, y)| x != y),
            "a changed block changes every later key"
        );
    }

    #[test]
    fn scope_and_block_size_separate_chains() {
        let toks: Vec<u32> = (0..32).collect();
        let plain = chain_keys(&toks, 16, KeyScope::default());
        let salted = chain_keys(
            &toks,
            16,
            KeyScope {
                cache_salt: Some("tenant-a"),
                ..Default::default()
            },
        );
        let lora = chain_keys(
            &toks,
            16,
            KeyScope {
                lora: Some("tenant-a"),
                ..Default::default()
            },
        );
        let empty_salt = chain_keys(
            &toks,
            16,
            KeyScope {
                cache_salt: Some(""),
                ..Default::default()
            },
        );
        assert_ne!(plain[0], salted[0]);
        assert_ne!(
            salted[0], lora[0],
            "salt and adapter of the same name differ"
        );
        assert_eq!(plain, empty_salt, "an empty salt is no salt, as in vLLM");
        assert_ne!(chain_keys(&toks, 8, KeyScope::default())[0], plain[0]);
    }
}
