//! Dynamo's KV router as it is deployed with several frontends: the same cost as [`super::dynamo`]
//! (`overlap_weight · prefill blocks + decode blocks`, overlap weight 1) with softmax sampling
//! at `--router-temperature` 0.5 instead of the deterministic argmin.
//!
//! Sources: ai-dynamo `lib/kv-router` `DefaultWorkerSelector` / `softmax_sample` (logits
//! min–max normalised to `[0, 1]`, then `softmax(−x / T)`; all equal → uniform), implemented
//! by [`super::DynamoPicker`]; the router README's Kubernetes example runs the frontend with
//! `--router-temperature 0.5`, and its docs give temperature > 0 as the remedy for several
//! routers saturating the same worker. The temperature is fixed: unlike kvgate it does not
//! follow signal age. Replica state sync over NATS (`--router-replica-sync`) is not modelled:
//! each replica keeps its own bookings, as with the flag off (Dynamo's default).

/// `--router-temperature` of this preset.
pub const DEPLOYED_ROUTER_TEMPERATURE: f64 = 0.5;
