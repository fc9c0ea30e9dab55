//! Both ends of prefill/decode disaggregation (see the crate docs for the protocol): holding a
//! finished prefill's blocks for the decode engine, and loading a decode request's KV.

use super::{Admit, Engine, Remote, Req};
use crate::{
    EngineError, EngineRequest, FinishReason, KvHold, KvLoad, KvLoadFailurePolicy, Output,
    RequestId,
};

impl Engine {
    /// Admits a prefill-only request (`kv_transfer_params.do_remote_decode`): served like
    /// [`Self::add_request`], but when it finishes by length its blocks are held for the decode
    /// engine ([`Self::kv_hold`]) instead of freed. Same errors as [`Self::add_request`].
    pub fn add_remote_decode(
        &mut self,
        now_us: u64,
        req: EngineRequest,
    ) -> Result<(), EngineError> {
        self.add(now_us, req, Remote::Decode)
    }

    /// Admits a decode-side request whose prompt KV comes from a prefill engine
    /// (`kv_transfer_params.do_remote_prefill`). Once the scheduler allocates its blocks a
    /// [`KvLoad`] appears in [`Self::take_kv_loads`]; the request then waits for
    /// [`Self::remote_kv_ready`] or [`Self::remote_kv_failed`]. Same errors as
    /// [`Self::add_request`].
    pub fn add_remote_prefill(
        &mut self,
        now_us: u64,
        req: EngineRequest,
    ) -> Result<(), EngineError> {
        self.add(now_us, req, Remote::PrefillPending)
    }

    /// Loads started since the last call, in allocation order. Call it after every
    /// [`Self::add_remote_prefill`], [`Self::advance`] and other entry point that may schedule.
    pub fn take_kv_loads(&mut self) -> Vec<KvLoad> {
        std::mem::take(&mut self.kv_loads)
    }

    /// Blocks held for the decode engine of the finished remote-decode request `id`, if still
    /// held (not yet released, not expired).
    pub fn kv_hold(&self, id: RequestId) -> Option<&KvHold> {
        self.holds.get(&id)
    }

    /// Frees the blocks held for `id` (the decode engine has read them). Returns false when
    /// nothing is held for `id` (never held, already released, or expired).
    pub fn release_kv_hold(&mut self, now_us: u64, id: RequestId) -> bool {
        self.complete_due_steps(now_us);
        let Some(hold) = self.holds.remove(&id) else {
            return false;
        };
        self.hold_deadlines.remove(&(hold.expires_at_us, id));
        self.pool.free_reversed(&hold.block_ids);
        self.kick(now_us);
        true
    }

    /// Remote-prefill requests whose KV is being loaded.
    pub fn num_loading(&self) -> usize {
        self.loading.len()
    }

    /// The KV of the loading request `id` has arrived: its prompt blocks are cached (published
    /// as `BlockStored` with the next step's events) and it is queued to compute its last prompt
    /// token. Returns false if `id` is not loading.
    pub fn remote_kv_ready(&mut self, now_us: u64, id: RequestId) -> bool {
        self.complete_due_steps(now_us);
        let Some(i) = self.loading.iter().position(|&r| r == id) else {
            return false;
        };
        self.loading.remove(i);
        let r = self.requests.get_mut(&id).expect("loading request is live");
        // Stays one token of queued prefill through the transition (see `prefill_remaining`).
        r.remote = Remote::PrefillLoaded;
        let prompt_len = r.prompt_len;
        Self::cache_blocks(
            &self.cfg,
            &mut self.pool,
            &mut self.step_events,
            self.kv_events_enabled,
            r,
            prompt_len,
        );
        r.num_computed = prompt_len - 1;
        r.cached_tokens = Some((prompt_len - 1) as u32);
        // Loaded requests keep FCFS order among themselves, ahead of everything else.
        let at = self
            .waiting
            .iter()
            .take_while(|w| self.requests[w].remote == Remote::PrefillLoaded)
            .count();
        self.waiting.insert(at, id);
        self.kick(now_us);
        true
    }

    /// Loading the KV of `id` failed (the prefill engine is gone, its blocks were freed, the
    /// transfer broke). The destination blocks are freed unpublished; then, by
    /// `kv_transfer.kv_load_failure_policy`, the request finishes with
    /// [`FinishReason::Error`] (reported on the next [`Self::advance`]) or is prefilled locally
    /// from scratch. Returns false if `id` is not loading.
    pub fn remote_kv_failed(&mut self, now_us: u64, id: RequestId) -> bool {
        self.complete_due_steps(now_us);
        let Some(i) = self.loading.iter().position(|&r| r == id) else {
            return false;
        };
        self.loading.remove(i);
        match self.cfg.kv_transfer.kv_load_failure_policy {
            KvLoadFailurePolicy::Fail => {
                let r = self.requests.remove(&id).expect("loading request is live");
                self.pool.free_reversed(&r.blocks);
                self.queued_prefill -= r.prefill_remaining();
                self.queued_pairs_x2 -= r.prefill_pairs_x2();
                self.finished_error += 1;
                self.pending.push(Output::Finished {
                    id,
                    at_us: now_us,
                    reason: FinishReason::Error,
                    usage: r.usage(),
                });
            }
            KvLoadFailurePolicy::Recompute => {
                let r = self.requests.get_mut(&id).expect("loading request is live");
                self.queued_prefill -= r.prefill_remaining();
                self.queued_pairs_x2 -= r.prefill_pairs_x2();
                self.pool.free_reversed(&r.blocks);
                r.blocks.clear();
                r.num_computed = 0;
                r.num_cached_blocks = 0;
                r.external_tokens = 0;
                r.cached_tokens = None;
                r.remote = Remote::Local;
                r.prefill_end = r.tokens.len();
                self.queued_prefill += r.prefill_remaining();
                self.queued_pairs_x2 += r.prefill_pairs_x2();
                self.push_waiting_front(id);
            }
        }
        self.kick(now_us);
        true
    }

    /// Admits the remote-prefill request `id` at the head of the waiting queue: takes its local
    /// prefix hit and allocates blocks for the rest of the prompt, which are registered in the
    /// prefix cache only once the KV has arrived (vLLM's `delay_cache_blocks`).
    pub(super) fn admit_remote_prefill(&mut self, id: RequestId, now_us: u64) -> Admit {
        let bs = self.cfg.block_size;
        let prompt_len = self.requests[&id].prompt_len;
        self.lookup_prefix(id, (prompt_len - 1) / bs);
        let hit_blocks = self.hit_buf.len();
        let hit_tokens = hit_blocks * bs;
        if !self.take_blocks(id, prompt_len.div_ceil(bs) - hit_blocks) {
            return Admit::Blocked;
        }
        let r = self.requests.get_mut(&id).expect("waiting request is live");
        let load_tokens = prompt_len - hit_tokens;
        r.num_computed = hit_tokens;
        r.num_cached_blocks = hit_blocks;
        r.external_tokens = load_tokens as u32;
        r.remote = Remote::PrefillLoading;
        if self.cfg.enable_prefix_caching {
            self.prefix_queries += prompt_len as u64;
            self.prefix_hits += hit_tokens as u64;
        }
        self.external_queries += prompt_len as u64;
        self.external_hits += load_tokens as u64;
        self.kv_loads.push(KvLoad {
            id,
            at_us: now_us,
            local_cached_tokens: hit_tokens as u32,
            load_tokens: load_tokens as u32,
            block_ids: r.blocks[hit_blocks..].to_vec(),
        });
        Admit::Loading
    }

    /// Keeps a finished remote-decode request's blocks referenced for the decode engine.
    pub(super) fn hold_blocks(&mut self, id: RequestId, at_us: u64, r: &mut Req) {
        let expires_at_us = at_us.saturating_add(self.cfg.kv_transfer.abort_request_timeout_us);
        self.hold_deadlines.insert((expires_at_us, id));
        self.holds.insert(
            id,
            KvHold {
                id,
                block_ids: std::mem::take(&mut r.blocks),
                num_tokens: u32::try_from(r.prompt_len).unwrap_or(u32::MAX),
                expires_at_us,
            },
        );
    }

    /// Frees the hold with the earliest deadline (the caller checked that it is due).
    pub(super) fn expire_first_hold(&mut self) {
        let (at_us, id) = self
            .hold_deadlines
            .pop_first()
            .expect("a hold deadline is due");
        let hold = self.holds.remove(&id).expect("every deadline has its hold");
        self.pool.free_reversed(&hold.block_ids);
        self.holds_expired += 1;
        self.kick(at_us);
    }
}
