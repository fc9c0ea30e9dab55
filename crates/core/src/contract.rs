//! The cache contract that checks itself: what the precise index predicted an engine would find
//! cached, against the `cached_tokens` the engine reported for the same request.
//!
//! The precise index is only as right as the router's keys are the engine's: the same tokens
//! (tokenizer, chat template), the same block size, the events of the right engine (topic), none
//! lost. Any of these can break silently, and a broken precise view is worse than none if it
//! is trusted. So every finished request whose engine reported `cached_tokens` is compared with
//! the precise-only prediction made at decision time for the endpoint that served it (a shadow
//! prediction, computed whether or not the endpoint is currently trusted):
//!
//! * **shortfall**: the engine found at least one block less than predicted: the index claims
//!   blocks the engine does not have (lost removals, another engine's events, wrong keys);
//! * **excess**: the engine found at least two blocks more than predicted: the router's keys do
//!   not name the engine's blocks (typically a tokenizer or chat template that differs), so the
//!   precise index is blind. Races legitimately cause some excess (a same-prefix request
//!   dispatched within the event lag), hence the higher bar below.
//!
//! Over the last [`WINDOW`] comparable outcomes (one where either side is non-zero), at least
//! [`SHORTFALLS_TO_MISMATCH`] shortfalls or [`EXCESSES_TO_MISMATCH`] excesses declare a
//! *mismatch*: the endpoint is matched on approximate entries only until the shadow predictions
//! agree again for a full window (at most [`SHORTFALLS_TO_RECOVER`] shortfalls and
//! [`EXCESSES_TO_RECOVER`] excesses). Pure state, no time: it advances per outcome.
//!
//! The prediction follows vLLM's rule that a full-prompt hit still recomputes the last token:
//! at most `⌊(prompt − 1) / block⌋` blocks can be reported cached.

/// Comparable outcomes the verdict looks at. 16: enough that a burst of same-prefix races
/// (typically 2-4 requests within one event lag) cannot flip it, few enough that a broken view
/// is detected within seconds of traffic.
pub const WINDOW: u32 = 16;

/// Shortfalls in the window that declare a mismatch. Half the window: an honest index almost
/// never over-predicts (only a block evicted between decision and admission does).
pub const SHORTFALLS_TO_MISMATCH: u32 = 8;

/// Excesses in the window that declare a mismatch: three quarters, since races add some.
pub const EXCESSES_TO_MISMATCH: u32 = 12;

/// At most this many shortfalls in a full window to leave the mismatch state.
pub const SHORTFALLS_TO_RECOVER: u32 = 1;

/// At most this many excesses in a full window to leave the mismatch state.
pub const EXCESSES_TO_RECOVER: u32 = 3;

/// How one outcome compared.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Within a block of the prediction (or both zero).
    Agree,
    /// The engine found less than predicted.
    Shortfall,
    /// The engine found more than predicted.
    Excess,
}

/// A change of an endpoint's contract state, for the data plane to log.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ContractChange {
    /// Predictions and reports disagree persistently: the endpoint is on approximate tracking.
    Mismatch {
        /// Shortfalls in the window.
        shortfalls: u32,
        /// Excesses in the window.
        excesses: u32,
        /// The latest prediction, tokens.
        predicted_tokens: u32,
        /// The latest report, tokens.
        reported_tokens: u32,
    },
    /// Predictions agree again: the endpoint is back on precise tracking.
    Recovered,
}

/// One endpoint's contract state.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CacheContract {
    shortfall_bits: u32,
    excess_bits: u32,
    filled: u32,
    since_change: u32,
    mismatch: bool,
}

/// Compares one prediction with one report, in tokens, for `block_size`-token blocks.
pub fn verdict(predicted_tokens: u32, reported_tokens: u32, block_size: u32) -> Verdict {
    let bs = block_size.max(1);
    if reported_tokens.saturating_add(bs) <= predicted_tokens {
        Verdict::Shortfall
    } else if reported_tokens >= predicted_tokens.saturating_add(2 * bs) {
        Verdict::Excess
    } else {
        Verdict::Agree
    }
}

/// The tokens an engine can report cached when `blocks` prefix blocks of a `prompt_tokens`
/// prompt are in its cache (vLLM recomputes the last prompt token even on a full hit).
pub fn cacheable_tokens(blocks: u32, block_size: u32, prompt_tokens: u32) -> u32 {
    let bs = block_size.max(1);
    let max_blocks = prompt_tokens.saturating_sub(1) / bs;
    blocks.min(max_blocks) * bs
}

impl CacheContract {
    /// Whether the endpoint is in the mismatch state (approximate tracking).
    pub fn is_mismatch(&self) -> bool {
        self.mismatch
    }

    /// Forgets the history (the engine restarted: old disagreements say nothing about it).
    pub fn reset(&mut self) {
        *self = Self::default();
    }

    /// Records one outcome; returns a change of state, if any.
    pub fn record(
        &mut self,
        predicted_tokens: u32,
        reported_tokens: u32,
        block_size: u32,
    ) -> Option<ContractChange> {
        if predicted_tokens == 0 && reported_tokens == 0 {
            return None;
        }
        let v = verdict(predicted_tokens, reported_tokens, block_size);
        let mask = (1u32 << WINDOW) - 1;
        self.shortfall_bits =
            ((self.shortfall_bits << 1) | u32::from(v == Verdict::Shortfall)) & mask;
        self.excess_bits = ((self.excess_bits << 1) | u32::from(v == Verdict::Excess)) & mask;
        self.filled = (self.filled + 1).min(WINDOW);
        self.since_change = self.since_change.saturating_add(1);
        let shortfalls = self.shortfall_bits.count_ones();
        let excesses = self.excess_bits.count_ones();
        if !self.mismatch
            && (shortfalls >= SHORTFALLS_TO_MISMATCH || excesses >= EXCESSES_TO_MISMATCH)
        {
            self.mismatch = true;
            self.since_change = 0;
            return Some(ContractChange::Mismatch {
                shortfalls,
                excesses,
                predicted_tokens,
                reported_tokens,
            });
        }
        if self.mismatch
            && self.since_change >= WINDOW
            && shortfalls <= SHORTFALLS_TO_RECOVER
            && excesses <= EXCESSES_TO_RECOVER
        {
            self.mismatch = false;
            self.since_change = 0;
            return Some(ContractChange::Recovered);
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vllm_never_reports_the_last_token_cached() {
        assert_eq!(cacheable_tokens(4, 16, 64), 48);
        assert_eq!(cacheable_tokens(4, 16, 65), 64);
        assert_eq!(cacheable_tokens(2, 16, 65), 32);
        assert_eq!(cacheable_tokens(1, 128, 100), 0);
    }

    #[test]
    fn persistent_shortfall_flips_and_agreement_recovers() {
        let mut c = CacheContract::default();
        for i in 0..7 {
            assert_eq!(c.record(256, 0, 128), None, "outcome {i}");
        }
        assert!(matches!(
            c.record(256, 0, 128),
            Some(ContractChange::Mismatch { shortfalls: 8, .. })
        ));
        assert!(c.is_mismatch());
        let mut recovered = None;
        for i in 0..WINDOW {
            if let Some(ch) = c.record(256, 256, 128) {
                recovered = Some((i, ch));
            }
        }
        assert_eq!(recovered, Some((WINDOW - 1, ContractChange::Recovered)));
        assert!(!c.is_mismatch());
    }

    #[test]
    fn occasional_races_and_empty_outcomes_do_not_flip() {
        let mut c = CacheContract::default();
        for i in 0..200u32 {
            // One excess race in four, one eviction race in eight, and many short prompts.
            let reported = match i % 8 {
                0 => 512,
                3 => 0,
                _ => 256,
            };
            assert_eq!(c.record(256, reported, 128), None);
            assert_eq!(c.record(0, 0, 128), None);
        }
    }

    #[test]
    fn blind_keys_are_an_excess_mismatch() {
        let mut c = CacheContract::default();
        let changes: Vec<_> = (0..12).filter_map(|_| c.record(0, 1024, 128)).collect();
        assert!(matches!(
            changes.as_slice(),
            [ContractChange::Mismatch { excesses: 12, .. }]
        ));
    }
}
