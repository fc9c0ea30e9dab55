//! Power of two choices (Mitzenmacher, "The Power of Two Choices in Randomized Load Balancing";
//! SGLang's `power_of_two` policy): two distinct random candidates, the one with fewer requests
//! (estimated waiting + running) wins.

use rand::{Rng, RngCore};

use crate::error::RouteError;
use crate::policies::{Candidate, Pick, PickContext, Picker, load};
use crate::request::DecisionReason;

/// Power of two choices on estimated load.
#[derive(Debug)]
pub struct PowerOfTwoPicker;
impl Picker for PowerOfTwoPicker {
    fn name(&self) -> &str {
        "power-of-two-picker"
    }
    fn pick(
        &self,
        _: &PickContext<'_>,
        cands: &[Candidate<'_>],
        _: &[f64],
        rng: &mut dyn RngCore,
    ) -> Result<Pick, RouteError> {
        let n = cands.len();
        let index = if n == 1 {
            0
        } else {
            let a = rng.random_range(0..n);
            let mut b = rng.random_range(0..n - 1);
            if b >= a {
                b += 1;
            }
            if load(&cands[b]) < load(&cands[a]) {
                b
            } else {
                a
            }
        };
        Ok(Pick {
            index,
            reason: DecisionReason::PowerOfTwo,
        })
    }
}
