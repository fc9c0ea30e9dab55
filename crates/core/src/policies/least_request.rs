//! Least-request (Envoy's `LEAST_REQUEST` with full scan, SGLang's `least_load` without token
//! weights): fewest requests, counted as estimated waiting + running (this router's own dispatches
//! plus the scraped sample), ties at random.

use rand::RngCore;

use crate::error::RouteError;
use crate::policies::{Candidate, Pick, PickContext, Picker, argmax_random_ties, load};
use crate::request::DecisionReason;

/// Fewest requests (estimated waiting + running), random ties.
#[derive(Debug)]
pub struct LeastRequestPicker;
impl Picker for LeastRequestPicker {
    fn name(&self) -> &str {
        "least-request-picker"
    }
    fn pick(
        &self,
        _: &PickContext<'_>,
        cands: &[Candidate<'_>],
        _: &[f64],
        rng: &mut dyn RngCore,
    ) -> Result<Pick, RouteError> {
        let index =
            argmax_random_ties(0..cands.len(), |i| -f64::from(load(&cands[i])), rng).unwrap_or(0);
        Ok(Pick {
            index,
            reason: DecisionReason::LeastRequest,
        })
    }
}
