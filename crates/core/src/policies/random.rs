//! Uniformly random choice (GIE's `random-picker`, SGLang's `random` policy): the baseline every
//! load-aware policy must beat.

use rand::{Rng, RngCore};

use crate::error::RouteError;
use crate::policies::{Candidate, Pick, PickContext, Picker};
use crate::request::DecisionReason;

/// Uniformly random.
#[derive(Debug)]
pub struct RandomPicker;
impl Picker for RandomPicker {
    fn name(&self) -> &str {
        "random-picker"
    }
    fn pick(
        &self,
        _: &PickContext<'_>,
        cands: &[Candidate<'_>],
        _: &[f64],
        rng: &mut dyn RngCore,
    ) -> Result<Pick, RouteError> {
        Ok(Pick {
            index: rng.random_range(0..cands.len()),
            reason: DecisionReason::Random,
        })
    }
}
