//! Tokenizers: a fast deterministic built-in one, and (feature `hf`) HuggingFace
//! `tokenizer.json` files.
//!
//! The built-in tokenizer splits text into pieces and maps each piece to an id by hashing it, so
//! ids are stable across processes, versions and machines with no vocabulary file:
//! - a run of alphanumeric characters, together with one ASCII space directly before it, is one
//!   piece (like GPT-2's `Ġword`), cut every [`MAX_PIECE_CHARS`] characters;
//! - every other character (punctuation, newline, a space not followed by a word) is one piece.
//!
//! Pieces never span a boundary that depends on text further right, except a word that is still
//! being typed, so equal text prefixes give equal token prefixes, and concatenating texts that
//! each start with a space-led word concatenates their token sequences: the property the
//! benchmark relies on to turn shared trace blocks into shared token prefixes.
//! id = `FIRST_PIECE_ID + piece_hash(piece) mod (VOCAB_SIZE - FIRST_PIECE_ID)`.

use thiserror::Error;

/// Ids below this are reserved (special tokens of real vocabularies live there).
pub const FIRST_PIECE_ID: u32 = 1_000;
/// Size of the built-in id space; the size of Llama 3's vocabulary, so ids look realistic.
pub const VOCAB_SIZE: u32 = 128_256;
/// Longest piece, in characters: long alphanumeric runs (hashes, base64) become several tokens,
/// as they do in BPE vocabularies.
pub const MAX_PIECE_CHARS: usize = 16;

/// Errors loading a tokenizer or tokenising a request.
#[derive(Debug, Error)]
pub enum TokenizerError {
    /// The HuggingFace `tokenizer.json` could not be parsed.
    #[error("invalid tokenizer.json: {message}")]
    InvalidHfTokenizer {
        /// What the `tokenizers` crate reported.
        message: String,
    },
    /// The HuggingFace tokenizer failed on an input.
    #[error("tokenizer failed: {message}")]
    EncodeFailed {
        /// What the `tokenizers` crate reported.
        message: String,
    },
    /// A file of the model directory could not be read.
    #[cfg(feature = "hf")]
    #[error("cannot read {path}")]
    ReadFile {
        /// The file.
        path: std::path::PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A JSON file of the model directory does not parse.
    #[cfg(feature = "hf")]
    #[error("{path} is not valid JSON")]
    InvalidJson {
        /// The file.
        path: std::path::PathBuf,
        /// The parser's error.
        #[source]
        source: serde_json::Error,
    },
    /// `tokenizer.json` parses as JSON but not as a HuggingFace tokenizer.
    #[cfg(feature = "hf")]
    #[error("{path} is not a HuggingFace tokenizer")]
    InvalidTokenizerFile {
        /// The file.
        path: std::path::PathBuf,
        /// What the `tokenizers` crate reported.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// A field of a configuration file has the wrong shape.
    #[cfg(feature = "hf")]
    #[error("{path}: `{field}` {reason}")]
    InvalidConfigField {
        /// The file.
        path: std::path::PathBuf,
        /// The field (empty for the whole file).
        field: String,
        /// What is wrong.
        reason: &'static str,
    },
    /// A chat template does not compile.
    #[cfg(feature = "hf")]
    #[error("{path}: chat template `{name}` does not compile")]
    InvalidChatTemplate {
        /// The file it came from.
        path: std::path::PathBuf,
        /// Its name (`default`, `tool_use`, ...).
        name: String,
        /// The template engine's error, with the line.
        #[source]
        source: minijinja::Error,
    },
    /// The model directory has no chat template, so chat requests cannot be rendered.
    #[cfg(feature = "hf")]
    #[error(
        "{dir} has no chat template (chat_template.jinja or tokenizer_config.json `chat_template`)"
    )]
    NoChatTemplate {
        /// The model directory.
        dir: std::path::PathBuf,
    },
    /// The model has several named chat templates and none applies to the request.
    #[cfg(feature = "hf")]
    #[error("no chat template named \"default\" among {names:?}")]
    NoDefaultChatTemplate {
        /// The names it has.
        names: Vec<String>,
    },
    /// A chat message is malformed.
    #[cfg(feature = "hf")]
    #[error("message {index}: {reason}")]
    InvalidMessage {
        /// Index in `messages`.
        index: usize,
        /// What is wrong.
        reason: &'static str,
    },
    /// A content part kvgate cannot render (multimodal parts: kvgate renders text only).
    #[cfg(feature = "hf")]
    #[error("message {index}: content part type `{part_type}` is not supported")]
    UnsupportedContentPart {
        /// Index in `messages`.
        index: usize,
        /// The part's type.
        part_type: String,
    },
    /// A tool definition is malformed.
    #[cfg(feature = "hf")]
    #[error("tool {index}: {reason}")]
    InvalidTool {
        /// Index in `tools`.
        index: usize,
        /// What is wrong.
        reason: &'static str,
    },
    /// `documents` is not a list of objects.
    #[cfg(feature = "hf")]
    #[error("`documents` must be a list of objects")]
    InvalidDocuments,
    /// The request has no messages.
    #[cfg(feature = "hf")]
    #[error("cannot render an empty conversation")]
    EmptyConversation,
    /// `continue_final_message` cannot be honoured.
    #[cfg(feature = "hf")]
    #[error("continue_final_message: {reason}")]
    ContinueFinalMessage {
        /// Why.
        reason: &'static str,
    },
    /// A `chat_template_kwargs` key collides with a variable the renderer sets itself.
    #[cfg(feature = "hf")]
    #[error("chat_template_kwargs may not set `{key}`")]
    TemplateKwargConflict {
        /// The key.
        key: String,
    },
    /// The chat template failed, including a template's own `raise_exception`.
    #[cfg(feature = "hf")]
    #[error("rendering the chat template failed")]
    TemplateRender {
        /// The template engine's error (the template's message for `raise_exception`).
        #[source]
        source: minijinja::Error,
    },
}

impl TokenizerError {
    /// Whether the request itself is at fault (vLLM answers these with 400), as opposed to
    /// the model directory or the tokenizer.
    pub fn is_request_error(&self) -> bool {
        match self {
            TokenizerError::InvalidHfTokenizer { .. } | TokenizerError::EncodeFailed { .. } => {
                false
            }
            #[cfg(feature = "hf")]
            TokenizerError::InvalidMessage { .. }
            | TokenizerError::UnsupportedContentPart { .. }
            | TokenizerError::InvalidTool { .. }
            | TokenizerError::InvalidDocuments
            | TokenizerError::EmptyConversation
            | TokenizerError::ContinueFinalMessage { .. }
            | TokenizerError::TemplateKwargConflict { .. }
            | TokenizerError::TemplateRender { .. } => true,
            #[cfg(feature = "hf")]
            _ => false,
        }
    }
}

/// The deterministic built-in tokenizer described in the module docs.
#[derive(Clone, Copy, Debug, Default)]
pub struct BuiltinTokenizer;

/// The id the built-in tokenizer gives `piece` when `piece` is a single piece (see module docs).
/// Lets generators produce token ids for text they build word by word without re-splitting it.
pub fn piece_id(piece: &str) -> u32 {
    let h = piece_hash(piece.as_bytes());
    FIRST_PIECE_ID + (h % u64::from(VOCAB_SIZE - FIRST_PIECE_ID)) as u32
}

/// A small FNV-1a–style 64-bit mix. Hand-written rather than pulling a hash crate into every
/// user of this crate: ids must never change, so the function is pinned here with test vectors.
fn piece_hash(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    // Final avalanche (splitmix64) so nearby pieces spread over the id space.
    h ^= h >> 30;
    h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h ^= h >> 27;
    h = h.wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

impl BuiltinTokenizer {
    /// Splits `text` into pieces (see module docs) and calls `f` on each.
    pub fn for_each_piece<'t>(text: &'t str, mut f: impl FnMut(&'t str)) {
        let mut it = text.char_indices().peekable();
        while let Some((start, c)) = it.next() {
            let word_follows = |it: &mut std::iter::Peekable<std::str::CharIndices<'_>>| {
                it.peek().is_some_and(|&(_, n)| n.is_alphanumeric())
            };
            if c.is_alphanumeric() || (c == ' ' && word_follows(&mut it)) {
                let mut chars = 1;
                let mut end = start + c.len_utf8();
                while let Some(&(i, n)) = it.peek() {
                    if !n.is_alphanumeric() || chars == MAX_PIECE_CHARS {
                        break;
                    }
                    chars += 1;
                    end = i + n.len_utf8();
                    it.next();
                }
                f(&text[start..end]);
            } else {
                f(&text[start..start + c.len_utf8()]);
            }
        }
    }

    /// Token ids of `text`.
    pub fn encode(&self, text: &str) -> Vec<u32> {
        let mut out = Vec::with_capacity(text.len() / 4 + 1);
        Self::for_each_piece(text, |p| out.push(piece_id(p)));
        out
    }

    /// Number of tokens in `text`, without allocating.
    pub fn count(&self, text: &str) -> usize {
        let mut n = 0;
        Self::for_each_piece(text, |_| n += 1);
        n
    }
}

/// A HuggingFace tokenizer loaded from the bytes of a `tokenizer.json`.
#[cfg(feature = "hf")]
pub struct HfTokenizer {
    inner: tokenizers::Tokenizer,
}

#[cfg(feature = "hf")]
impl std::fmt::Debug for HfTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HfTokenizer").finish_non_exhaustive()
    }
}

#[cfg(feature = "hf")]
impl HfTokenizer {
    /// Parses a `tokenizer.json` (the caller reads the file: this crate does no I/O).
    pub fn from_bytes(json: &[u8]) -> Result<Self, TokenizerError> {
        tokenizers::Tokenizer::from_bytes(json)
            .map(|mut inner| {
                // As transformers does on every call unless asked: no truncation, no padding.
                inner.with_padding(None);
                let _ = inner.with_truncation(None);
                Self { inner }
            })
            .map_err(|e| TokenizerError::InvalidHfTokenizer {
                message: e.to_string(),
            })
    }

    /// Token ids of `text`, with the tokenizer's special tokens (BOS) added as vLLM does.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, TokenizerError> {
        self.inner
            .encode(text, true)
            .map(|e| e.get_ids().to_vec())
            .map_err(|e| TokenizerError::EncodeFailed {
                message: e.to_string(),
            })
    }
}

/// Either tokenizer, chosen by configuration.
#[derive(Debug)]
pub enum Tokenizer {
    /// The built-in deterministic tokenizer.
    Builtin(BuiltinTokenizer),
    /// A HuggingFace tokenizer.
    #[cfg(feature = "hf")]
    Hf(Box<HfTokenizer>),
}

impl Default for Tokenizer {
    fn default() -> Self {
        Tokenizer::Builtin(BuiltinTokenizer)
    }
}

impl Tokenizer {
    /// Token ids of `text`.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, TokenizerError> {
        match self {
            Tokenizer::Builtin(t) => Ok(t.encode(text)),
            #[cfg(feature = "hf")]
            Tokenizer::Hf(t) => t.encode(text),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn pieces_follow_the_documented_rules() {
        let mut pieces = vec![];
        BuiltinTokenizer::for_each_piece("Hello, world!\n  two", |p| pieces.push(p));
        assert_eq!(pieces, ["Hello", ",", " world", "!", "\n", " ", " two"]);
        let mut long = vec![];
        BuiltinTokenizer::for_each_piece(&"a".repeat(40), |p| long.push(p.len()));
        assert_eq!(long, [16, 16, 8]);
    }

    #[test]
    fn ids_are_pinned() {
        // Changing these breaks every stored trace and cache key: the ids are part of the format.
        let t = BuiltinTokenizer;
        assert_eq!(t.encode("Hello world"), t.encode("Hello world"));
        assert_eq!(t.encode("Hello world"), [120602, 113574]);
    }

    proptest! {
        #[test]
        fn space_led_texts_concatenate(a in "( [a-z0-9]{1,20}){1,20}", b in "( [a-z0-9]{1,20}){1,20}") {
            let t = BuiltinTokenizer;
            let joined = t.encode(&format!("{a}{b}"));
            prop_assert_eq!(joined, [t.encode(&a), t.encode(&b)].concat());
        }

        #[test]
        fn count_matches_encode(s in "\\PC{0,200}") {
            let t = BuiltinTokenizer;
            prop_assert_eq!(t.count(&s), t.encode(&s).len());
            prop_assert!(t.encode(&s).iter().all(|&id| (FIRST_PIECE_ID..VOCAB_SIZE).contains(&id)));
        }
    }
}
