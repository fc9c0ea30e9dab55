//! Sequence tracking for one KV-event publisher.
//!
//! A vLLM publisher numbers its batches 0, 1, 2, … and ZMQ PUB/SUB drops messages silently
//! (slow joiners, high-water marks, reconnects), so the sequence number is the only way to know
//! that the router's view of a pod's cache has holes. On a live PUB stream from one publisher,
//! TCP keeps order and nothing is sent twice; a number *below* the expected one therefore has
//! two possible causes, and we tell them apart like this:
//! - the publisher restarted (new process, counter back at 0). A restarted engine also has an
//!   empty cache, so the router must drop what it knew. We call it a restart when the number
//!   is 0, or when the subscriber saw its connection drop since the previous batch (a restart
//!   always breaks the TCP connection, and after reconnecting a subscriber may miss the first
//!   few batches of the new process, so the first one it sees need not be 0);
//! - otherwise it is a duplicate or an old batch (for example one a replay already delivered),
//!   which is dropped.
//!
//! Known blind spot: if a restarted publisher has already numbered past the old expectation by
//! the time the subscriber reconnects, the stream looks like one publisher with a gap, and the
//! gap is filled (by replay) from the *new* incarnation. Nothing in the wire format tells the
//! two apart (batches carry no incarnation id). It needs an old publisher with few batches and
//! a new one that published more than that before the reconnect; with long-lived engines the
//! old number is large and the case does not arise in practice.
//!
//! The first batch after creation is accepted whatever its number: a router that starts after
//! the engine joins mid-stream. Whether the history before it can be recovered (from the replay
//! buffer) is the subscriber's business, not the tracker's.

/// What one incoming sequence number means.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SeqOutcome {
    /// The first batch seen from this publisher.
    First,
    /// Exactly the expected number.
    InOrder,
    /// Batches `expected..got` were lost.
    Gap {
        /// The first missing number.
        expected: u64,
        /// The number received.
        got: u64,
    },
    /// A duplicate or old batch: drop it.
    Stale {
        /// The number that was expected.
        expected: u64,
        /// The number received.
        got: u64,
    },
    /// The publisher restarted: everything known from it is void. If `got > 0`, batches
    /// `0..got` of the new incarnation were missed.
    Restart {
        /// The number that was expected from the old incarnation.
        expected: u64,
        /// The number received from the new one.
        got: u64,
    },
}

/// Tracks the sequence of one publisher (see the module docs for the rules).
#[derive(Clone, Debug, Default)]
pub struct SeqTracker {
    expected: Option<u64>,
    reconnected: bool,
}

impl SeqTracker {
    /// A tracker that has seen nothing yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// The next number expected, if any batch has been seen.
    pub fn expected(&self) -> Option<u64> {
        self.expected
    }

    /// Records that the connection to the publisher dropped; the next lower number is then
    /// read as a restart rather than a duplicate.
    pub fn note_reconnect(&mut self) {
        self.reconnected = true;
    }

    /// Forgets everything: the next batch is a [`SeqOutcome::First`].
    pub fn reset(&mut self) {
        *self = Self::default();
    }

    /// Classifies `got` and advances the expectation (except for stale numbers).
    pub fn observe(&mut self, got: u64) -> SeqOutcome {
        let reconnected = std::mem::take(&mut self.reconnected);
        let Some(expected) = self.expected else {
            self.expected = Some(got.saturating_add(1));
            return SeqOutcome::First;
        };
        let outcome = if got == expected {
            SeqOutcome::InOrder
        } else if got > expected {
            SeqOutcome::Gap { expected, got }
        } else if got == 0 || reconnected {
            SeqOutcome::Restart { expected, got }
        } else {
            return SeqOutcome::Stale { expected, got };
        };
        self.expected = Some(got.saturating_add(1));
        outcome
    }

    /// Accepts a batch delivered out of band (by replay) without classifying it: moves the
    /// expectation past `seq` if it is not already.
    pub fn advance_past(&mut self, seq: u64) {
        let next = seq.saturating_add(1);
        if self.expected.is_none_or(|e| e < next) {
            self.expected = Some(next);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_batch_is_accepted_at_any_number() {
        let mut t = SeqTracker::new();
        assert_eq!(t.observe(41), SeqOutcome::First);
        assert_eq!(t.observe(42), SeqOutcome::InOrder);
        assert_eq!(t.expected(), Some(43));
    }

    #[test]
    fn jump_forward_is_a_gap_and_resumes_after_it() {
        let mut t = SeqTracker::new();
        t.observe(0);
        assert_eq!(
            t.observe(5),
            SeqOutcome::Gap {
                expected: 1,
                got: 5
            }
        );
        assert_eq!(t.observe(6), SeqOutcome::InOrder);
    }

    #[test]
    fn lower_number_without_reconnect_is_stale_and_does_not_move_expectation() {
        let mut t = SeqTracker::new();
        for s in 0..10 {
            t.observe(s);
        }
        assert_eq!(
            t.observe(3),
            SeqOutcome::Stale {
                expected: 10,
                got: 3
            }
        );
        assert_eq!(t.observe(10), SeqOutcome::InOrder);
    }

    #[test]
    fn zero_after_progress_is_a_restart() {
        let mut t = SeqTracker::new();
        for s in 0..10 {
            t.observe(s);
        }
        assert_eq!(
            t.observe(0),
            SeqOutcome::Restart {
                expected: 10,
                got: 0
            }
        );
        assert_eq!(t.observe(1), SeqOutcome::InOrder);
    }

    #[test]
    fn lower_number_after_reconnect_is_a_restart() {
        let mut t = SeqTracker::new();
        for s in 0..10 {
            t.observe(s);
        }
        t.note_reconnect();
        assert_eq!(
            t.observe(2),
            SeqOutcome::Restart {
                expected: 10,
                got: 2
            }
        );
        // The reconnect mark is consumed by one observation.
        t.observe(3);
        assert!(matches!(t.observe(1), SeqOutcome::Stale { .. }));
    }

    #[test]
    fn reconnect_with_higher_number_is_still_a_gap() {
        let mut t = SeqTracker::new();
        t.observe(0);
        t.note_reconnect();
        assert_eq!(
            t.observe(4),
            SeqOutcome::Gap {
                expected: 1,
                got: 4
            }
        );
    }

    #[test]
    fn advance_past_never_moves_backwards() {
        let mut t = SeqTracker::new();
        t.observe(9);
        t.advance_past(3);
        assert_eq!(t.expected(), Some(10));
        t.advance_past(12);
        assert_eq!(t.expected(), Some(13));
    }

    #[test]
    fn max_sequence_does_not_overflow() {
        let mut t = SeqTracker::new();
        assert_eq!(t.observe(u64::MAX), SeqOutcome::First);
        assert_eq!(t.expected(), Some(u64::MAX));
    }

    proptest::proptest! {
        /// Whatever arrives, the expectation only moves past what was accepted, stale numbers
        /// leave it alone, and an in-order stream is never reported as anything else.
        #[test]
        fn expectation_follows_accepted_numbers(
            seqs in proptest::collection::vec(0u64..64, 1..64),
            reconnect_at in proptest::collection::vec(proptest::bool::ANY, 64),
        ) {
            let mut t = SeqTracker::new();
            for (i, &s) in seqs.iter().enumerate() {
                if reconnect_at[i] {
                    t.note_reconnect();
                }
                let before = t.expected();
                let outcome = t.observe(s);
                match outcome {
                    SeqOutcome::Stale { expected, got } => {
                        proptest::prop_assert_eq!(t.expected(), before);
                        proptest::prop_assert!(got < expected && got > 0);
                    }
                    _ => proptest::prop_assert_eq!(t.expected(), Some(s + 1)),
                }
                if before == Some(s) {
                    proptest::prop_assert_eq!(outcome, SeqOutcome::InOrder);
                }
            }
        }
    }
}
