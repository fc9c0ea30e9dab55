//! Token-level facts shared by the engine model and the router: how text becomes token ids and
//! how token ids become vLLM's chained prefix-cache block hashes.
//!
//! Both the simulated engines and the routing core must agree bit for bit on these, or cache-aware
//! routing silently degrades to random. Keeping them in one small pure crate (no I/O, no async)
//! gives both users a single definition; the hash chain is checked against known-answer vectors
//! produced by Python's `hashlib` + `cbor2` (see `tests/fixtures`).
#![deny(missing_docs)]

mod chat;
mod hash;
mod tokenizer;

pub use chat::{ChatMessage, render_chat};
pub use hash::{BlockHash, BlockHasher, ExtraKeys, hash_block, none_hash};
pub use tokenizer::{BuiltinTokenizer, HfTokenizer, Tokenizer, TokenizerError, piece_id};
