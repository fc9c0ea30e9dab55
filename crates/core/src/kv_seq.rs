//! The sequence rule of one KV-event publisher, written once: [`KvSequence`].
//!
//! A vLLM publisher numbers its batches 0, 1, 2, … and ZMQ PUB/SUB drops messages silently
//! (slow joiners, high-water marks, reconnects), so the sequence number is the only way to know
//! that a view of a pod's cache has holes. Two places follow a publisher's numbers: the KV-event
//! subscriber in `kvgate-signals`, which sees the raw live stream, the connection drops and the
//! replay answers (so it is the one that asks for replays and announces restarts), and the
//! [`crate::Router`], which applies what the subscriber forwards (or what the discrete-event
//! benchmark feeds it) and decides whether an endpoint's events are trusted. They used to keep
//! two trackers with different rules for a first batch. **This type is the one owner of the
//! rule**: both hold a `KvSequence` and nothing else classifies sequence numbers. The
//! subscriber's instance follows the live stream ([`KvSequence::observe_live`]); the router's
//! follows the merged stream it applies ([`KvSequence::observe`]). They see the same numbers in
//! the same order (the subscriber forwards replayed batches before newer ones and announces a
//! restart before the batch that shows it), so they agree.
//!
//! The rule:
//! - **A stream's first batch** (nothing expected yet) is accepted at any number when the
//!   receiver holds nothing from this publisher ([`SeqOutcome::Start`]): a router that joins a
//!   running engine sees every fact from there on, and a batch lost before it knew anything
//!   cannot have removed a block it holds. Older batches are still welcome by replay (the range
//!   below the first number is recorded as missing). When the receiver already holds facts (its
//!   stream was lost and resumes mid-sequence), the same batch is a gap from 0: a removal may
//!   have been missed.
//! - **In order**: exactly the expected number.
//! - **Gap**: a jump forward; the missing range is recorded (merged with an earlier one) and the
//!   expectation moves past the batch, whose facts are still true.
//! - **Replayed**: a number inside the recorded missing range (the engine's replay filling it)
//!   on the merged stream; applied, the expectation stays.
//! - **Going back**, outside the missing range, is a **restart** (a new engine process with an
//!   empty cache, numbering from 0 again) when the number is 0 or a disconnect was noted since
//!   the previous batch (after reconnecting, the first batches of a new process may be missed);
//!   otherwise it is a **stale** duplicate and dropped. On a live PUB stream nothing arrives
//!   twice and TCP keeps order, so there any number going back that no replay delivered is a
//!   restart (issue 10.8: one wild number, say 2^63, must not make the rest of the stream
//!   stale until the engine restarts).
//!
//! Known blind spot: if a restarted publisher has already numbered past the old expectation by
//! the time the subscriber reconnects, the stream looks like one publisher with a gap, and the
//! gap is filled (by replay) from the *new* incarnation. Nothing in the wire format tells the
//! two apart (batches carry no incarnation id). It needs an old publisher with few batches and
//! a new one that published more than that before the reconnect; with long-lived engines the
//! old number is large and the case does not arise in practice.

/// What one sequence number means.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SeqOutcome {
    /// The first batch of a stream, accepted at any number; batches `0..got` (if any) may still
    /// come by replay.
    Start {
        /// The number received.
        got: u64,
    },
    /// Exactly the expected number.
    InOrder,
    /// Batches `expected..got` were lost.
    Gap {
        /// The first missing number.
        expected: u64,
        /// The number received.
        got: u64,
    },
    /// A batch inside the recorded missing range, delivered by replay.
    Replayed,
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

/// The sequence state of one publisher (see the module docs for the rule).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KvSequence {
    expected: Option<u64>,
    /// Numbers known to be missing, `from..to`, that a replay may still deliver.
    missing: Option<(u64, u64)>,
    /// Highest number a replay delivered while the live stream had not reached it: live copies
    /// at or below it are duplicates. Cleared once a live batch passes it.
    replay_high: Option<u64>,
    /// A disconnect was noted since the previous batch.
    reconnected: bool,
}

impl KvSequence {
    /// A publisher nothing has been seen from.
    pub fn new() -> Self {
        Self::default()
    }

    /// The next number expected, if any batch has been seen.
    pub fn expected(&self) -> Option<u64> {
        self.expected
    }

    /// Numbers known to be missing, `from..to`, if any.
    pub fn missing(&self) -> Option<(u64, u64)> {
        self.missing
    }

    /// The connection to the publisher dropped: the next number going back is a restart rather
    /// than a duplicate.
    pub fn note_reconnect(&mut self) {
        self.reconnected = true;
    }

    /// Forgets everything: the next batch starts a stream.
    pub fn reset(&mut self) {
        *self = Self::default();
    }

    /// A replay filled every missing number.
    pub fn resynced(&mut self) {
        self.missing = None;
    }

    /// The numbers before `seq` are given up (lost for good, and the facts learnt before them
    /// dropped): the stream continues at `seq`, with nothing missing.
    pub fn resume_at(&mut self, seq: u64) {
        *self = Self {
            expected: Some(seq),
            ..Self::default()
        };
    }

    /// A replay delivered batch `seq` ahead of the live stream: the expectation moves past it
    /// (never back), and a live copy of it is a duplicate.
    pub fn replayed(&mut self, seq: u64) {
        let next = seq.saturating_add(1);
        if self.expected.is_none_or(|e| e < next) {
            self.expected = Some(next);
        }
        self.replay_high = Some(self.replay_high.map_or(seq, |h| h.max(seq)));
    }

    /// Classifies `seq` on the merged stream a router applies (duplicates possible) and advances
    /// the expectation, except for replayed and stale numbers. `holds_facts`: the receiver
    /// holds entries learnt from this publisher (decides the first batch; see the module docs).
    pub fn observe(&mut self, seq: u64, holds_facts: bool) -> SeqOutcome {
        self.classify(seq, holds_facts, false)
    }

    /// Classifies `seq` as it arrives on the live PUB stream, where nothing arrives twice: a
    /// number going back that no replay delivered is a restart.
    pub fn observe_live(&mut self, seq: u64) -> SeqOutcome {
        self.classify(seq, false, true)
    }

    fn classify(&mut self, seq: u64, holds_facts: bool, live: bool) -> SeqOutcome {
        let reconnected = std::mem::take(&mut self.reconnected);
        let next = seq.saturating_add(1);
        let Some(expected) = self.expected else {
            self.expected = Some(next);
            self.missing = (seq > 0).then_some((0, seq));
            return if seq == 0 || !holds_facts {
                SeqOutcome::Start { got: seq }
            } else {
                SeqOutcome::Gap {
                    expected: 0,
                    got: seq,
                }
            };
        };
        if live && self.replay_high.is_some_and(|h| seq > h) {
            self.replay_high = None;
        }
        if seq == expected {
            self.expected = Some(next);
            return SeqOutcome::InOrder;
        }
        if seq > expected {
            self.missing = Some(match self.missing {
                Some((from, _)) => (from.min(expected), seq),
                None => (expected, seq),
            });
            self.expected = Some(next);
            return SeqOutcome::Gap { expected, got: seq };
        }
        let restart = if live {
            // A live copy of a batch the replay delivered is a duplicate, unless the connection
            // dropped since: a publisher never sends a number twice, so after a reconnect a
            // number going back is a new process (an idle engine may restart long before its
            // live numbers pass what the start-up replay delivered).
            if !reconnected && self.replay_high.is_some_and(|h| seq <= h) {
                return SeqOutcome::Stale { expected, got: seq };
            }
            true
        } else {
            if self
                .missing
                .is_some_and(|(from, to)| seq >= from && seq < to)
            {
                return SeqOutcome::Replayed;
            }
            seq == 0 || reconnected
        };
        if !restart {
            return SeqOutcome::Stale { expected, got: seq };
        }
        self.expected = Some(next);
        self.missing = (seq > 0).then_some((0, seq));
        self.replay_high = None;
        SeqOutcome::Restart { expected, got: seq }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// After a start-up replay, live copies of replayed batches are duplicates, but once the
    /// connection has dropped a number going back is a new process, even before the live
    /// stream passed what the replay delivered (an idle engine that restarts).
    #[test]
    fn a_reconnect_makes_a_replayed_number_a_restart() {
        let mut s = KvSequence::new();
        for seq in 0..5 {
            s.replayed(seq);
        }
        assert!(matches!(s.observe_live(2), SeqOutcome::Stale { .. }));
        s.note_reconnect();
        assert_eq!(
            s.observe_live(0),
            SeqOutcome::Restart {
                expected: 5,
                got: 0
            }
        );
        assert_eq!(s.observe_live(1), SeqOutcome::InOrder);
    }

    #[test]
    fn resuming_after_a_loss_expects_the_next_batch_with_nothing_missing() {
        let mut s = KvSequence::new();
        s.observe(0, false);
        s.observe(5, true);
        assert_eq!(s.missing(), Some((1, 5)));
        s.resume_at(9);
        assert_eq!((s.expected(), s.missing()), (Some(9), None));
        assert_eq!(s.observe(9, true), SeqOutcome::InOrder);
        assert!(matches!(s.observe(3, true), SeqOutcome::Stale { .. }));
    }

    #[test]
    fn first_batch_starts_a_stream_unless_facts_may_have_been_missed() {
        let mut s = KvSequence::new();
        assert_eq!(s.observe(41, false), SeqOutcome::Start { got: 41 });
        assert_eq!(
            s.missing(),
            Some((0, 41)),
            "older batches welcome by replay"
        );
        assert_eq!(s.observe(42, false), SeqOutcome::InOrder);
        assert_eq!(s.observe(3, true), SeqOutcome::Replayed);
        assert_eq!(s.expected(), Some(43));
        let mut resumed = KvSequence::new();
        assert_eq!(
            resumed.observe(20, true),
            SeqOutcome::Gap {
                expected: 0,
                got: 20
            }
        );
        assert_eq!(
            KvSequence::new().observe(0, true),
            SeqOutcome::Start { got: 0 }
        );
        assert_eq!(
            KvSequence::new().observe_live(41),
            SeqOutcome::Start { got: 41 }
        );
    }

    #[test]
    fn jump_forward_is_a_gap_and_resumes_after_it() {
        let mut s = KvSequence::new();
        s.observe_live(0);
        assert_eq!(
            s.observe_live(5),
            SeqOutcome::Gap {
                expected: 1,
                got: 5
            }
        );
        assert_eq!(s.observe_live(6), SeqOutcome::InOrder);
    }

    #[test]
    fn merged_stream_applies_replays_and_drops_duplicates() {
        let mut s = KvSequence::new();
        for seq in 0..2 {
            s.observe(seq, true);
        }
        assert_eq!(
            s.observe(4, true),
            SeqOutcome::Gap {
                expected: 2,
                got: 4
            }
        );
        assert_eq!(s.observe(2, true), SeqOutcome::Replayed);
        assert_eq!(
            s.observe(1, true),
            SeqOutcome::Stale {
                expected: 5,
                got: 1
            }
        );
        assert_eq!(s.observe(5, true), SeqOutcome::InOrder);
        s.resynced();
        assert!(matches!(s.observe(3, true), SeqOutcome::Stale { .. }));
    }

    #[test]
    fn zero_or_going_back_after_a_reconnect_is_a_restart() {
        let mut s = KvSequence::new();
        for seq in 0..10 {
            s.observe(seq, true);
        }
        assert_eq!(
            s.observe(0, true),
            SeqOutcome::Restart {
                expected: 10,
                got: 0
            }
        );
        assert_eq!(s.observe(1, true), SeqOutcome::InOrder);
        for seq in 2..10 {
            s.observe(seq, true);
        }
        s.note_reconnect();
        assert_eq!(
            s.observe(2, true),
            SeqOutcome::Restart {
                expected: 10,
                got: 2
            }
        );
        // The new incarnation's batches 0..2 were missed: a replay may still deliver them.
        assert_eq!(s.missing(), Some((0, 2)));
        s.observe(3, true);
        assert_eq!(s.observe(1, true), SeqOutcome::Replayed);
        // The mark is consumed by one observation: once the gap is filled, going back is stale.
        s.resynced();
        assert!(matches!(s.observe(1, true), SeqOutcome::Stale { .. }));
    }

    #[test]
    fn lower_number_without_reconnect_is_stale_and_keeps_the_expectation() {
        let mut s = KvSequence::new();
        for seq in 0..10 {
            s.observe(seq, true);
        }
        assert_eq!(
            s.observe(3, true),
            SeqOutcome::Stale {
                expected: 10,
                got: 3
            }
        );
        assert_eq!(s.observe(10, true), SeqOutcome::InOrder);
    }

    #[test]
    fn reconnect_with_higher_number_is_still_a_gap() {
        let mut s = KvSequence::new();
        s.observe_live(0);
        s.note_reconnect();
        assert_eq!(
            s.observe_live(4),
            SeqOutcome::Gap {
                expected: 1,
                got: 4
            }
        );
    }

    #[test]
    fn live_stream_going_back_is_a_restart_unless_a_replay_delivered_it() {
        let mut s = KvSequence::new();
        for seq in 0..10 {
            s.observe_live(seq);
        }
        assert_eq!(
            s.observe_live(3),
            SeqOutcome::Restart {
                expected: 10,
                got: 3
            }
        );
        let mut r = KvSequence::new();
        for seq in 0..5 {
            r.replayed(seq);
        }
        assert!(matches!(r.observe_live(4), SeqOutcome::Stale { .. }));
        assert_eq!(r.observe_live(5), SeqOutcome::InOrder);
        assert!(matches!(r.observe_live(2), SeqOutcome::Restart { .. }));
    }

    #[test]
    fn replayed_never_moves_the_expectation_back_and_max_does_not_overflow() {
        let mut s = KvSequence::new();
        s.observe_live(9);
        s.replayed(3);
        assert_eq!(s.expected(), Some(10));
        s.replayed(12);
        assert_eq!(s.expected(), Some(13));
        let mut m = KvSequence::new();
        assert_eq!(
            m.observe_live(u64::MAX),
            SeqOutcome::Start { got: u64::MAX }
        );
        assert_eq!(m.expected(), Some(u64::MAX));
    }

    proptest::proptest! {
        /// Whatever arrives, the expectation only moves past accepted numbers, stale, replayed
        /// numbers leave it alone, and an in-order stream is never reported as anything else.
        #[test]
        fn expectation_follows_accepted_numbers(
            seqs in proptest::collection::vec(0u64..64, 1..64),
            reconnect_at in proptest::collection::vec(proptest::bool::ANY, 64),
            live in proptest::bool::ANY,
        ) {
            let mut s = KvSequence::new();
            for (i, &seq) in seqs.iter().enumerate() {
                if reconnect_at[i] {
                    s.note_reconnect();
                }
                let before = s.expected();
                let outcome = if live { s.observe_live(seq) } else { s.observe(seq, true) };
                match outcome {
                    SeqOutcome::Stale { expected, got } => {
                        proptest::prop_assert_eq!(s.expected(), before);
                        proptest::prop_assert!(got < expected);
                    }
                    SeqOutcome::Replayed => proptest::prop_assert_eq!(s.expected(), before),
                    _ => proptest::prop_assert_eq!(s.expected(), Some(seq + 1)),
                }
                if before == Some(seq) {
                    proptest::prop_assert_eq!(outcome, SeqOutcome::InOrder);
                }
            }
        }
    }
}
