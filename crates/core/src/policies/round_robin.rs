//! Round-robin, textbook (as in every L7 proxy and SGLang's `round_robin` policy): the next
//! candidate in address order, advanced by every booking.

use rand::RngCore;

use crate::error::RouteError;
use crate::policies::{Candidate, Pick, PickContext, Picker};
use crate::request::DecisionReason;

/// Rotation in address order.
#[derive(Debug)]
pub struct RoundRobinPicker;
impl Picker for RoundRobinPicker {
    fn name(&self) -> &str {
        "round-robin-picker"
    }
    fn pick(
        &self,
        ctx: &PickContext<'_>,
        cands: &[Candidate<'_>],
        _: &[f64],
        _: &mut dyn RngCore,
    ) -> Result<Pick, RouteError> {
        Ok(Pick {
            index: (ctx.rotation % cands.len() as u64) as usize,
            reason: DecisionReason::RoundRobin,
        })
    }
}
