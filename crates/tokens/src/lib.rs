//! Token-level facts shared by the engines and the router: how a request becomes the token ids
//! an engine computes, and how token ids become vLLM's chained prefix-cache block hashes.
//!
//! Both the simulated engines and the routing core must agree bit for bit on these, or
//! cache-aware routing silently degrades to random. Keeping them in one small crate gives every
//! user a single definition:
//! - block hashes ([`BlockHasher`]), checked against known-answer vectors produced by Python's
//!   `hashlib` + `cbor2` (see `tests/fixtures`); pure, no I/O;
//! - the built-in tokenizer and chat template ([`BuiltinTokenizer`], [`render_chat`]): fast,
//!   vocabulary-free and documented, for the simulator and synthetic benchmarks;
//! - with the `hf` feature, a real model's tokenizer and Jinja chat template
//!   ([`ModelTokenizer`]): a chat request renders and tokenises exactly as vLLM 0.32 does, so
//!   the router's prefix keys match the engine's cache (checked against transformers and vLLM
//!   in `tests/fixtures`). The feature is off by default because the `tokenizers` crate brings
//!   a thread pool that the pure routing core, which only hashes blocks, must not carry.
#![deny(missing_docs)]

mod chat;
mod hash;
#[cfg(feature = "hf")]
mod model;
mod tokenizer;

pub use chat::{ChatMessage, render_chat};
pub use hash::{BlockHash, BlockHasher, ExtraKeys, hash_block, none_hash};
#[cfg(feature = "hf")]
pub use model::{ChatInput, ContentFormat, ModelTokenizer, SEGMENT_CACHE_TOKENS, python_repr};
#[cfg(feature = "hf")]
pub use tokenizer::HfTokenizer;
pub use tokenizer::{BuiltinTokenizer, Tokenizer, TokenizerError, piece_id};
