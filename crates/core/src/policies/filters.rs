//! The host's filters, shared by every profile that names them: role (llm-d's
//! `prefill-filter`/`decode-filter`), LoRA affinity (GIE's `lora-affinity-filter`: adapter
//! loaded or waiting, else room to load it), draining (last resort) and Envoy's subset hint
//! (`x-gateway-destination-endpoint-subset`, see DESIGN.md "endpoint-picker protocol").

use crate::endpoint::EndpointState;
use crate::policies::{
    Candidate, Filter, PickContext, adapter_active, adapter_room, adapter_waiting, role_serves,
};

/// Keeps endpoints whose role serves the request's phase.
#[derive(Debug)]
pub struct RoleFilter;
impl Filter for RoleFilter {
    fn name(&self) -> &str {
        "role-filter"
    }
    fn filter(&self, ctx: &PickContext<'_>, cands: &[Candidate<'_>], keep: &mut [bool]) {
        for (c, k) in cands.iter().zip(keep) {
            *k &= role_serves(c.spec.role, ctx.req.phase);
        }
    }
}

/// Prefers endpoints with the adapter active or waiting, then ones with room to load it.
#[derive(Debug)]
pub struct LoraAffinityFilter;
impl Filter for LoraAffinityFilter {
    fn name(&self) -> &str {
        "lora-affinity-filter"
    }
    fn filter(&self, ctx: &PickContext<'_>, cands: &[Candidate<'_>], keep: &mut [bool]) {
        let Some(lora) = ctx.req.lora.as_deref() else {
            return;
        };
        let tiers: [&dyn Fn(&Candidate<'_>) -> bool; 2] = [
            &|c| adapter_active(c, lora) || adapter_waiting(c, lora),
            &|c| adapter_room(c),
        ];
        for pred in tiers {
            if cands.iter().zip(keep.iter()).any(|(c, k)| *k && pred(c)) {
                for (c, k) in cands.iter().zip(keep.iter_mut()) {
                    *k &= pred(c);
                }
                return;
            }
        }
    }
}

/// Keeps draining endpoints only when nothing else is left.
#[derive(Debug)]
pub struct DrainingFilter;
impl Filter for DrainingFilter {
    fn name(&self) -> &str {
        "draining-filter"
    }
    fn filter(&self, _: &PickContext<'_>, cands: &[Candidate<'_>], keep: &mut [bool]) {
        let ready = |c: &Candidate<'_>| c.state == EndpointState::Ready;
        if cands.iter().zip(keep.iter()).any(|(c, k)| *k && ready(c)) {
            for (c, k) in cands.iter().zip(keep.iter_mut()) {
                *k &= ready(c);
            }
        }
    }
}

/// Keeps only the request's subset.
#[derive(Debug)]
pub struct SubsetFilter;
impl Filter for SubsetFilter {
    fn name(&self) -> &str {
        "subset-filter"
    }
    fn filter(&self, ctx: &PickContext<'_>, cands: &[Candidate<'_>], keep: &mut [bool]) {
        if let Some(subset) = &ctx.req.subset {
            for (c, k) in cands.iter().zip(keep) {
                *k &= subset.contains(&c.id);
            }
        }
    }
}
