//! The engine state machine: request lifecycle, the per-step scheduler and step completion.

use std::collections::{BTreeSet, VecDeque};
use std::sync::Arc;

use kvgate_tokens::{BlockHash, BlockHasher};

use crate::kv::{BlockPool, FoldMap, push_removed};
use crate::stats::{E2E_BUCKETS_S, ITL_BUCKETS_S, TTFT_BUCKETS_S};
use crate::{
    EngineConfig, EngineError, EngineRequest, EngineStats, FinishReason, Histogram, KvEvent,
    KvHold, KvLoad, Output, RequestId, Usage,
};

mod pd;

/// A request's part in prefill/decode disaggregation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Remote {
    /// Served here from end to end.
    Local,
    /// Prefill side (`do_remote_decode`): hold the blocks when it finishes by length.
    Decode,
    /// Decode side (`do_remote_prefill`), waiting for the scheduler to allocate its blocks.
    PrefillPending,
    /// Decode side, blocks allocated, KV being loaded (vLLM `WAITING_FOR_REMOTE_KVS`).
    PrefillLoading,
    /// Decode side, KV loaded: at the head of the waiting queue with all but the last prompt
    /// token computed.
    PrefillLoaded,
}

/// Outcome of trying to admit the head of the waiting queue.
enum Admit {
    /// Scheduled this many tokens; it joins the running batch.
    Scheduled(usize),
    /// A remote-prefill request got its blocks and now waits for its KV (no slot, no budget).
    Loading,
    /// Not enough free blocks; FCFS stops here.
    Blocked,
}

/// One live (waiting or running) request.
#[derive(Debug)]
struct Req {
    /// Instance number, so a step in flight never credits a same-id request added after an abort.
    seq: u64,
    /// Prompt followed by the tokens generated so far.
    tokens: Vec<u32>,
    prompt_len: usize,
    max_tokens: u32,
    lora_name: Option<String>,
    cache_salt: Option<String>,
    /// Hashes of the prompt's full blocks (empty with prefix caching off).
    prompt_hashes: Arc<[BlockHash]>,
    /// Hashes of later full blocks (prompt tail + generated tokens).
    gen_hashes: Vec<BlockHash>,
    /// Block table.
    blocks: Vec<u32>,
    /// Tokens whose KV is computed (or scheduled in the step in flight, see `Step`).
    num_computed: usize,
    /// Leading blocks already registered in the prefix index (or hit from it).
    num_cached_blocks: usize,
    /// Tokens to prefill before decoding: the prompt, or prompt + outputs after a preemption.
    prefill_end: usize,
    generated: u32,
    arrival_us: u64,
    /// The step in flight when it arrived, `(start, end)` µs: it can be admitted at that
    /// step's end at the earliest.
    step_at_arrival_us: Option<(u64, u64)>,
    first_token_us: Option<u64>,
    last_token_us: u64,
    cached_tokens: Option<u32>,
    remote: Remote,
    /// Prompt tokens loaded from a prefill engine (vLLM `num_external_computed_tokens`).
    external_tokens: u32,
}

impl Req {
    #[inline]
    fn hash(&self, i: usize) -> &BlockHash {
        let p = self.prompt_hashes.len();
        if i < p {
            &self.prompt_hashes[i]
        } else {
            &self.gen_hashes[i - p]
        }
    }

    /// Prompt tokens this engine still has to compute: a remote-prefill request computes only
    /// its last prompt token, whatever state its load is in.
    fn prefill_remaining(&self) -> u64 {
        match self.remote {
            Remote::PrefillPending | Remote::PrefillLoading => 1,
            _ => self.prefill_end.saturating_sub(self.num_computed) as u64,
        }
    }

    /// Twice the attention pairs of the prefill left ([`crate::attention_pairs`] of
    /// [`Self::prefill_remaining`] tokens after what is computed), an integer so the engine's
    /// running sum stays exact. A remote-prefill request computes its last prompt token after
    /// the rest of the prompt.
    fn prefill_pairs_x2(&self) -> u64 {
        let (c, n) = match self.remote {
            Remote::PrefillPending | Remote::PrefillLoading => (self.prompt_len as u64 - 1, 1),
            _ => (
                self.num_computed as u64,
                self.prefill_end.saturating_sub(self.num_computed) as u64,
            ),
        };
        n * (2 * c + n)
    }

    fn usage(&self) -> Usage {
        Usage {
            prompt_tokens: u32::try_from(self.prompt_len).unwrap_or(u32::MAX),
            completion_tokens: self.generated,
            cached_tokens: self.cached_tokens.unwrap_or(0),
        }
    }
}

/// Work of one request in the step in flight.
#[derive(Clone, Copy, Debug)]
struct Sched {
    id: RequestId,
    seq: u64,
    tokens: usize,
    prefill: bool,
}

#[derive(Debug)]
struct Step {
    start_us: u64,
    end_us: u64,
    sched: Vec<Sched>,
}

/// A simulated engine. See the crate docs for the rules it follows.
#[derive(Debug)]
pub struct Engine {
    cfg: EngineConfig,
    hasher: BlockHasher,
    pool: BlockPool,
    requests: FoldMap<RequestId, Req>,
    waiting: VecDeque<RequestId>,
    running: Vec<RequestId>,
    /// Remote-prefill requests whose KV is being loaded, in allocation order.
    loading: Vec<RequestId>,
    /// Blocks of finished remote-decode requests, held for the decode engine.
    holds: FoldMap<RequestId, KvHold>,
    /// Hold expiries, earliest first.
    hold_deadlines: BTreeSet<(u64, RequestId)>,
    /// Loads started since the last `take_kv_loads`.
    kv_loads: Vec<KvLoad>,
    inflight: Option<Step>,
    /// Reused allocation for the next step's schedule.
    sched_buf: Vec<Sched>,
    /// Outputs produced outside `advance` (aborts, steps completed by `add_request`/`abort`).
    pending: Vec<Output>,
    /// Events of the step in flight, published when it ends (vLLM batches per step).
    step_events: Vec<KvEvent>,
    kv_events: Vec<KvEvent>,
    kv_events_enabled: bool,
    evicted_buf: Vec<u64>,
    hit_buf: Vec<u32>,
    next_seq: u64,
    queued_prefill: u64,
    /// Twice the attention pairs of the queued prefill (see `Req::prefill_pairs_x2`).
    queued_pairs_x2: u64,
    prefix_queries: u64,
    prefix_hits: u64,
    prompt_tokens_total: u64,
    generation_tokens_total: u64,
    preemptions_total: u64,
    finished_length: u64,
    finished_abort: u64,
    finished_error: u64,
    by_source: PromptSources,
    external_queries: u64,
    external_hits: u64,
    holds_expired: u64,
    ttft: Histogram,
    itl: Histogram,
    e2e: Histogram,
}

/// vLLM's `PromptTokenStats` counters (`vllm/v1/metrics/stats.py`).
#[derive(Clone, Copy, Debug, Default)]
struct PromptSources {
    computed: u64,
    local_cache_hit: u64,
    external_kv_transfer: u64,
    cached: u64,
    recomputed: u64,
}

impl PromptSources {
    /// vLLM's `PromptTokenStats.update_from_output`, at a request's first token: a full-prompt
    /// hit recomputes its last token, which counts as both cached and computed.
    fn record(&mut self, prompt_len: u64, cached: u64, external: u64) {
        let recomputed = u64::from(cached + 1 == prompt_len);
        self.computed += prompt_len - cached;
        self.external_kv_transfer += external;
        self.local_cache_hit += (cached + recomputed).saturating_sub(external);
        self.cached += cached;
        self.recomputed += recomputed;
    }
}

/// SplitMix64 finaliser: a bijective avalanche, so nearby (id, index) pairs give unrelated picks.
#[inline]
fn mix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

fn output_token(cfg: &EngineConfig, id: RequestId, index: u32) -> u32 {
    let h = mix64(cfg.output_seed ^ mix64(id ^ mix64(u64::from(index))));
    cfg.output_vocab[(h % cfg.output_vocab.len() as u64) as usize]
}

impl Engine {
    /// A fresh, idle engine with an empty cache.
    pub fn new(cfg: EngineConfig) -> Result<Self, EngineError> {
        cfg.validate()?;
        Ok(Self {
            hasher: cfg.block_hasher(),
            pool: BlockPool::new(cfg.num_gpu_blocks),
            requests: FoldMap::default(),
            waiting: VecDeque::new(),
            running: Vec::with_capacity(cfg.max_num_seqs),
            loading: Vec::new(),
            holds: FoldMap::default(),
            hold_deadlines: BTreeSet::new(),
            kv_loads: Vec::new(),
            inflight: None,
            sched_buf: Vec::with_capacity(cfg.max_num_seqs),
            pending: Vec::new(),
            step_events: Vec::new(),
            kv_events: Vec::new(),
            kv_events_enabled: true,
            evicted_buf: Vec::new(),
            hit_buf: Vec::new(),
            next_seq: 0,
            queued_prefill: 0,
            queued_pairs_x2: 0,
            prefix_queries: 0,
            prefix_hits: 0,
            prompt_tokens_total: 0,
            generation_tokens_total: 0,
            preemptions_total: 0,
            finished_length: 0,
            finished_abort: 0,
            finished_error: 0,
            by_source: PromptSources::default(),
            external_queries: 0,
            external_hits: 0,
            holds_expired: 0,
            ttft: Histogram::new(TTFT_BUCKETS_S),
            itl: Histogram::new(ITL_BUCKETS_S),
            e2e: Histogram::new(E2E_BUCKETS_S),
            cfg,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &EngineConfig {
        &self.cfg
    }

    /// Turns KV-event recording on (default) or off. A caller that never calls
    /// [`Self::take_kv_events`] should turn it off, or events accumulate without bound.
    pub fn set_kv_events_enabled(&mut self, enabled: bool) {
        self.kv_events_enabled = enabled;
        if !enabled {
            self.step_events.clear();
            self.kv_events.clear();
        }
    }

    fn usable_blocks(&self) -> usize {
        self.cfg.num_gpu_blocks - 1
    }

    fn blocks_for(&self, tokens: usize) -> usize {
        tokens.div_ceil(self.cfg.block_size)
    }

    /// Enqueue; if no step is in flight, a step starts at now_us. Errors: duplicate id, empty
    /// prompt, zero max_tokens, prompt + max_tokens > max_model_len, a request needing more
    /// blocks than the whole cache, precomputed hashes of the wrong length.
    pub fn add_request(&mut self, now_us: u64, req: EngineRequest) -> Result<(), EngineError> {
        self.add(now_us, req, Remote::Local)
    }

    fn add(&mut self, now_us: u64, req: EngineRequest, remote: Remote) -> Result<(), EngineError> {
        // Bring the engine up to now first: a request finished by a step that already ended is
        // no longer a duplicate, and a new request can never join a step that started before it
        // arrived.
        self.complete_due_steps(now_us);
        let id = req.id;
        if self.requests.contains_key(&id) || self.holds.contains_key(&id) {
            return Err(EngineError::DuplicateRequest { id });
        }
        let prompt_len = req.prompt_tokens.len();
        if prompt_len == 0 {
            return Err(EngineError::EmptyPrompt { id });
        }
        if req.max_tokens == 0 {
            return Err(EngineError::ZeroMaxTokens { id });
        }
        if prompt_len.saturating_add(req.max_tokens as usize) > self.cfg.max_model_len {
            return Err(EngineError::TooLong {
                id,
                prompt_tokens: prompt_len,
                max_tokens: req.max_tokens,
                max_model_len: self.cfg.max_model_len,
            });
        }
        // The last output token is never fed back, so the KV at full length is
        // prompt + max_tokens - 1 tokens.
        let needed_blocks = self.blocks_for(prompt_len + req.max_tokens as usize - 1);
        if needed_blocks > self.usable_blocks() {
            return Err(EngineError::TooManyBlocks {
                id,
                needed_blocks,
                capacity_blocks: self.usable_blocks(),
            });
        }
        let full_blocks = prompt_len / self.cfg.block_size;
        let prompt_hashes: Arc<[BlockHash]> = if !self.cfg.enable_prefix_caching {
            Arc::from(Vec::new())
        } else if let Some(h) = req.block_hashes {
            if h.len() != full_blocks {
                return Err(EngineError::BlockHashCountMismatch {
                    id,
                    expected: full_blocks,
                    got: h.len(),
                });
            }
            h
        } else {
            let extra = self
                .cfg
                .extra_keys(req.lora_name.as_deref(), req.cache_salt.as_deref());
            Arc::from(self.hasher.hashes(&req.prompt_tokens, extra))
        };

        let mut tokens = req.prompt_tokens;
        tokens.reserve_exact(req.max_tokens as usize);
        let seq = self.next_seq;
        self.next_seq += 1;
        self.requests.insert(
            id,
            Req {
                seq,
                tokens,
                prompt_len,
                max_tokens: req.max_tokens,
                lora_name: req.lora_name,
                cache_salt: req.cache_salt,
                prompt_hashes,
                gen_hashes: Vec::new(),
                blocks: Vec::with_capacity(needed_blocks),
                num_computed: 0,
                num_cached_blocks: 0,
                prefill_end: prompt_len,
                generated: 0,
                arrival_us: now_us,
                step_at_arrival_us: self.inflight.as_ref().map(|s| (s.start_us, s.end_us)),
                first_token_us: None,
                last_token_us: now_us,
                cached_tokens: None,
                remote,
                external_tokens: 0,
            },
        );
        self.waiting.push_back(id);
        self.queued_prefill += self.requests[&id].prefill_remaining();
        self.queued_pairs_x2 += self.requests[&id].prefill_pairs_x2();
        self.kick(now_us);
        Ok(())
    }

    /// Abort a waiting or running request (client disconnect); frees its blocks; emits
    /// Finished{Abort} on the next advance. Returns false if unknown/finished.
    pub fn abort(&mut self, now_us: u64, id: RequestId) -> bool {
        self.complete_due_steps(now_us);
        let Some(req) = self.requests.remove(&id) else {
            return false;
        };
        self.pool.free_reversed(&req.blocks);
        self.queued_prefill -= req.prefill_remaining();
        self.queued_pairs_x2 -= req.prefill_pairs_x2();
        if let Some(i) = self.running.iter().position(|&r| r == id) {
            self.running.remove(i);
        } else if let Some(i) = self.waiting.iter().position(|&r| r == id) {
            self.waiting.remove(i);
        } else if let Some(i) = self.loading.iter().position(|&r| r == id) {
            self.loading.remove(i);
        }
        self.finished_abort += 1;
        self.pending.push(Output::Finished {
            id,
            at_us: now_us,
            reason: FinishReason::Abort,
            usage: req.usage(),
        });
        // Freed blocks may unblock the waiting queue of an idle engine.
        self.kick(now_us);
        true
    }

    /// Starts a step at `at_us` if none is in flight and there is work that can run.
    fn kick(&mut self, at_us: u64) {
        if self.inflight.is_none() {
            self.start_step(at_us);
        }
    }

    /// When the engine next changes on its own: the end of the step in flight or the expiry of
    /// a block hold, whichever is first; None when neither is pending.
    pub fn next_wakeup_us(&self) -> Option<u64> {
        let step = self.inflight.as_ref().map(|s| s.end_us);
        let hold = self.hold_deadlines.first().map(|&(t, _)| t);
        match (step, hold) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Where in the engine's step cycle live request `id` arrived: `(wait, step)` µs, the time
    /// from its arrival to the end of the step then in flight (it cannot be admitted sooner:
    /// requests join steps only at their start) and that step's length; `(0, 0)` if the
    /// engine was idle. `None` for an unknown or finished request.
    ///
    /// No router can know the wait: engines do not publish when their steps start. Given the
    /// step's length, a request arriving at a random moment waits a uniform share of it, which
    /// bounds how well any router can predict TTFT (the benchmark's `ttft_mape_floor`).
    pub fn arrival_phase_us(&self, id: RequestId) -> Option<(u64, u64)> {
        let r = self.requests.get(&id)?;
        Some(r.step_at_arrival_us.map_or((0, 0), |(start, end)| {
            (end.saturating_sub(r.arrival_us), end.saturating_sub(start))
        }))
    }

    /// Whether outputs produced outside `advance` (aborts) are waiting to be collected by the
    /// next [`Self::advance`], whatever its time.
    pub fn has_pending_outputs(&self) -> bool {
        !self.pending.is_empty()
    }

    /// Complete every step that ends at or before now_us (starting the next step back to back at
    /// the previous step's end), appending outputs in time order.
    pub fn advance(&mut self, now_us: u64, out: &mut Vec<Output>) {
        self.complete_due_steps(now_us);
        out.append(&mut self.pending);
    }

    /// Completes every step and expires every hold due at or before `now_us`, in time order (a
    /// step ending at the same instant as an expiry goes first).
    fn complete_due_steps(&mut self, now_us: u64) {
        loop {
            let step_end = self.inflight.as_ref().map(|s| s.end_us);
            let expiry = self.hold_deadlines.first().map(|&(t, _)| t);
            match (step_end, expiry) {
                (Some(end), e) if end <= now_us && e.is_none_or(|e| end <= e) => {
                    let step = self.inflight.take().expect("step in flight");
                    self.complete_step(step);
                    self.start_step(end);
                }
                (_, Some(at)) if at <= now_us => self.expire_first_hold(),
                _ => break,
            }
        }
    }

    /// KV events produced since the last call, in order (as vLLM batches them per step).
    pub fn take_kv_events(&mut self) -> Vec<KvEvent> {
        std::mem::take(&mut self.kv_events)
    }

    /// A snapshot of gauges, counters and histograms.
    pub fn stats(&self) -> EngineStats {
        EngineStats {
            running: self.running.len() as u32,
            waiting: self.num_waiting() as u32,
            kv_usage: self.pool.usage(),
            num_gpu_blocks: self.cfg.num_gpu_blocks as u64,
            block_size: self.cfg.block_size as u32,
            prefix_cache_queries_tokens: self.prefix_queries,
            prefix_cache_hits_tokens: self.prefix_hits,
            prompt_tokens_total: self.prompt_tokens_total,
            generation_tokens_total: self.generation_tokens_total,
            preemptions_total: self.preemptions_total,
            finished_length: self.finished_length,
            finished_abort: self.finished_abort,
            finished_error: self.finished_error,
            prompt_tokens_local_compute: self.by_source.computed,
            prompt_tokens_local_cache_hit: self.by_source.local_cache_hit,
            prompt_tokens_external_kv_transfer: self.by_source.external_kv_transfer,
            prompt_tokens_cached: self.by_source.cached,
            prompt_tokens_recomputed: self.by_source.recomputed,
            external_prefix_cache_queries_tokens: self.external_queries,
            external_prefix_cache_hits_tokens: self.external_hits,
            waiting_for_remote_kv: self.loading.len() as u32,
            kv_holds: self.holds.len() as u32,
            kv_hold_blocks: self.holds.values().map(|h| h.block_ids.len() as u64).sum(),
            kv_holds_expired: self.holds_expired,
            ttft: self.ttft.clone(),
            itl: self.itl.clone(),
            e2e: self.e2e.clone(),
        }
    }

    /// vLLM's `reset_prefix_cache`: drops every cached block hash and returns true, or returns
    /// false and changes nothing while a request still holds blocks. With
    /// `reset_running_requests` every running request is first preempted (back to the front of
    /// the waiting queue, in order; the step in flight completes without crediting it), so the
    /// reset always succeeds. `AllBlocksCleared` is published with the events of the next step
    /// to end.
    pub fn reset_prefix_cache(&mut self, now_us: u64, reset_running_requests: bool) -> bool {
        self.complete_due_steps(now_us);
        if reset_running_requests {
            // Newest first, so pushing each to the front keeps the admission order.
            while let Some(id) = self.running.pop() {
                self.preempt(id);
                // A new instance number makes the step in flight skip the request's work.
                let r = self
                    .requests
                    .get_mut(&id)
                    .expect("preempted request is live");
                r.seq = self.next_seq;
                self.next_seq += 1;
            }
        }
        if self.pool.num_free() != self.usable_blocks() {
            return false;
        }
        self.pool.clear_index();
        if self.kv_events_enabled {
            self.step_events.push(KvEvent::AllBlocksCleared);
        }
        true
    }

    /// Requests in the running batch.
    pub fn num_running(&self) -> usize {
        self.running.len()
    }

    /// Requests waiting for admission (including preempted ones and remote-prefill requests
    /// waiting for their KV, as vLLM counts them).
    pub fn num_waiting(&self) -> usize {
        self.waiting.len() + self.loading.len()
    }

    /// Prompt tokens still to prefill across waiting + running (a preempted request counts its
    /// whole recompute).
    pub fn queued_prefill_tokens(&self) -> u64 {
        self.queued_prefill
    }

    /// Attention pairs of the prefill still to do across waiting + running ([`crate::attention_pairs`]
    /// of each request's remaining prompt after what it has computed, rounded down): what that
    /// prefill costs above its per-token price at `beta3`. A waiting request counts from zero
    /// until admission finds its prefix hit, as [`Self::queued_prefill_tokens`] counts it whole;
    /// a preempted one counts its recompute from where it restarts.
    pub fn queued_prefill_pairs(&self) -> u64 {
        self.queued_pairs_x2 / 2
    }

    /// Longest cached prefix of a chain of block keys, in tokens.
    pub fn cached_prefix_tokens(&self, prompt_block_keys: &[u64]) -> usize {
        if !self.cfg.enable_prefix_caching {
            return 0;
        }
        prompt_block_keys
            .iter()
            .take_while(|&&k| self.pool.lookup(k).is_some())
            .count()
            * self.cfg.block_size
    }

    /// Blocks in the free queue (never used, or cached and unreferenced).
    pub fn free_blocks(&self) -> usize {
        self.pool.num_free()
    }

    /// Distinct LoRA adapters of the running and of the waiting requests, each sorted (the
    /// `running_lora_adapters` / `waiting_lora_adapters` labels of `vllm:lora_requests_info`).
    pub fn lora_adapters(&self) -> (Vec<String>, Vec<String>) {
        let collect = |ids: &mut dyn Iterator<Item = &RequestId>| {
            let mut names: Vec<String> = ids
                .filter_map(|id| self.requests[id].lora_name.clone())
                .collect();
            names.sort_unstable();
            names.dedup();
            names
        };
        (
            collect(&mut self.running.iter()),
            collect(&mut self.waiting.iter().chain(&self.loading)),
        )
    }

    /// Blocks currently registered in the prefix index.
    pub fn cached_blocks(&self) -> usize {
        self.pool.num_cached()
    }

    /// Plans the next step at `start_us` (or goes idle when there is no work).
    fn start_step(&mut self, start_us: u64) {
        if self.running.is_empty() && self.waiting.is_empty() {
            return;
        }
        let mut sched = std::mem::take(&mut self.sched_buf);
        sched.clear();
        let mut budget = self.cfg.max_num_batched_tokens;
        let mut prefill_tokens = 0u64;
        let mut decode_tokens = 0u64;
        let mut prefill_pairs = 0f64;
        let mut preempted = false;

        // Running requests first, in order.
        let mut i = 0;
        while i < self.running.len() && budget > 0 {
            let id = self.running[i];
            let (n, total_blocks) = {
                let r = &self.requests[&id];
                let n = (r.tokens.len() - r.num_computed).min(budget);
                (n, self.blocks_for(r.num_computed + n))
            };
            let mut scheduled = false;
            loop {
                let have = self.requests[&id].blocks.len();
                let need = total_blocks.saturating_sub(have);
                if need <= self.pool.num_free() {
                    let r = self.requests.get_mut(&id).expect("running request is live");
                    self.pool
                        .allocate(need, &mut r.blocks, &mut self.evicted_buf);
                    if self.kv_events_enabled {
                        push_removed(&mut self.step_events, &mut self.evicted_buf);
                    } else {
                        self.evicted_buf.clear();
                    }
                    scheduled = true;
                    break;
                }
                let victim = self.running.pop().expect("the request itself is running");
                self.preempt(victim);
                preempted = true;
                if victim == id {
                    break;
                }
            }
            if !scheduled {
                break;
            }
            let r = self.requests.get_mut(&id).expect("running request is live");
            let prefill = r.num_computed < r.prefill_end;
            Self::cache_blocks(
                &self.cfg,
                &mut self.pool,
                &mut self.step_events,
                self.kv_events_enabled,
                r,
                r.num_computed + n,
            );
            sched.push(Sched {
                id,
                seq: r.seq,
                tokens: n,
                prefill,
            });
            if prefill {
                prefill_tokens += n as u64;
                prefill_pairs += crate::attention_pairs(r.num_computed as u64, n as u64);
            } else {
                decode_tokens += n as u64;
            }
            budget -= n;
            i += 1;
        }

        // Then admit waiting requests, FCFS, unless memory just ran short.
        if !preempted {
            while budget > 0 && self.running.len() < self.cfg.max_num_seqs {
                let Some(&id) = self.waiting.front() else {
                    break;
                };
                let n = match self.try_admit(id, budget, start_us) {
                    Admit::Scheduled(n) => n,
                    Admit::Loading => {
                        self.waiting.pop_front();
                        self.loading.push(id);
                        continue;
                    }
                    Admit::Blocked => break,
                };
                self.waiting.pop_front();
                self.running.push(id);
                let r = &self.requests[&id];
                sched.push(Sched {
                    id,
                    seq: r.seq,
                    tokens: n,
                    prefill: true,
                });
                prefill_tokens += n as u64;
                // After admission `num_computed` is the prefix hit (or the loaded KV).
                prefill_pairs += crate::attention_pairs(r.num_computed as u64, n as u64);
                budget -= n;
            }
        }

        if sched.is_empty() && !preempted {
            // Nothing can run (the queue head waits for blocks that remote loads or holds keep):
            // go idle; whatever frees blocks kicks the scheduler again. After a preemption the
            // empty step is kept, so admission is retried once memory has settled.
            self.sched_buf = sched;
            return;
        }
        let end_us = start_us.saturating_add(self.cfg.step.step_us(
            prefill_tokens,
            decode_tokens,
            prefill_pairs,
        ));
        self.inflight = Some(Step {
            start_us,
            end_us,
            sched,
        });
    }

    /// Fills `hit_buf` with the cached blocks of `id`'s first `max_blocks` prompt blocks, up to
    /// the first miss (none with prefix caching off).
    pub(super) fn lookup_prefix(&mut self, id: RequestId, max_blocks: usize) {
        self.hit_buf.clear();
        if !self.cfg.enable_prefix_caching {
            return;
        }
        let r = &self.requests[&id];
        for i in 0..max_blocks {
            match self.pool.lookup(r.hash(i).key()) {
                Some(b) => self.hit_buf.push(b),
                None => break,
            }
        }
    }

    /// Gives `id` the hit blocks in `hit_buf` and `new_blocks` fresh ones (evictions published
    /// as KV events); false, changing nothing, when the pool cannot.
    pub(super) fn take_blocks(&mut self, id: RequestId, new_blocks: usize) -> bool {
        // Hits on unreferenced blocks also consume free-queue entries.
        let evictable_hits = self
            .hit_buf
            .iter()
            .filter(|&&b| self.pool.ref_cnt(b) == 0)
            .count();
        if new_blocks + evictable_hits > self.pool.num_free() {
            return false;
        }
        for &b in &self.hit_buf {
            self.pool.touch(b);
        }
        let r = self.requests.get_mut(&id).expect("waiting request is live");
        r.blocks.extend_from_slice(&self.hit_buf);
        self.pool
            .allocate(new_blocks, &mut r.blocks, &mut self.evicted_buf);
        if self.kv_events_enabled {
            push_removed(&mut self.step_events, &mut self.evicted_buf);
        } else {
            self.evicted_buf.clear();
        }
        true
    }

    /// Tries to admit the waiting request `id` with up to `budget` new tokens: looks up its cached
    /// prefix, takes references on the hit blocks and allocates the rest. Nothing changes when
    /// the blocks are not available. A remote-prefill request gets blocks for its whole prompt
    /// and starts loading; one whose KV is loaded already holds its blocks and computes its last
    /// prompt token.
    fn try_admit(&mut self, id: RequestId, budget: usize, now_us: u64) -> Admit {
        match self.requests[&id].remote {
            Remote::PrefillPending => return self.admit_remote_prefill(id, now_us),
            Remote::PrefillLoaded => {
                let r = self.requests.get_mut(&id).expect("waiting request is live");
                r.remote = Remote::Local;
                return Admit::Scheduled(r.tokens.len() - r.num_computed);
            }
            Remote::Local | Remote::Decode | Remote::PrefillLoading => {}
        }
        let bs = self.cfg.block_size;
        let r = &self.requests[&id];
        debug_assert_eq!(r.num_computed, 0);
        debug_assert!(r.blocks.is_empty());
        let num_tokens = r.tokens.len();
        // Never the whole prompt: the last token must be computed to sample from it.
        self.lookup_prefix(id, (num_tokens - 1) / bs);
        let hit_blocks = self.hit_buf.len();
        let hit_tokens = hit_blocks * bs;
        let n = (num_tokens - hit_tokens).min(budget);
        if !self.take_blocks(id, (hit_tokens + n).div_ceil(bs) - hit_blocks) {
            return Admit::Blocked;
        }
        let r = self.requests.get_mut(&id).expect("waiting request is live");
        self.queued_pairs_x2 -= r.prefill_pairs_x2();
        r.num_computed = hit_tokens;
        r.num_cached_blocks = hit_blocks;
        // A re-admission after a preemption is recorded apart by vLLM (`PrefixCacheStats`'s
        // `preempted_*`, not exported): the `prefix_cache_*` counters count first admissions.
        let first_admission = r.cached_tokens.is_none();
        r.cached_tokens.get_or_insert(hit_tokens as u32);
        self.queued_prefill -= hit_tokens as u64;
        self.queued_pairs_x2 += r.prefill_pairs_x2();
        if self.cfg.enable_prefix_caching && first_admission {
            self.prefix_queries += num_tokens as u64;
            self.prefix_hits += hit_tokens as u64;
        }
        Self::cache_blocks(
            &self.cfg,
            &mut self.pool,
            &mut self.step_events,
            self.kv_events_enabled,
            r,
            hit_tokens + n,
        );
        Admit::Scheduled(n)
    }

    /// Registers the request's blocks that are full once its first `num_tokens` tokens are
    /// computed, and records one `BlockStored` chain for them.
    fn cache_blocks(
        cfg: &EngineConfig,
        pool: &mut BlockPool,
        events: &mut Vec<KvEvent>,
        events_enabled: bool,
        r: &mut Req,
        num_tokens: usize,
    ) {
        if !cfg.enable_prefix_caching {
            return;
        }
        let bs = cfg.block_size;
        let full = num_tokens.min(r.tokens.len()) / bs;
        let first = r.num_cached_blocks;
        if full <= first {
            return;
        }
        for i in first..full {
            pool.cache(r.blocks[i], r.hash(i).key());
        }
        r.num_cached_blocks = full;
        if events_enabled {
            let extra = cfg.extra_keys(r.lora_name.as_deref(), r.cache_salt.as_deref());
            events.push(KvEvent::BlockStored {
                block_hashes: (first..full).map(|i| r.hash(i).key()).collect(),
                parent_block_hash: first.checked_sub(1).map(|p| r.hash(p).key()),
                token_ids: r.tokens[first * bs..full * bs].to_vec(),
                block_size: bs as u32,
                lora_name: r.lora_name.clone(),
                extra_keys: (first..full)
                    .map(|i| {
                        extra
                            .event_keys(i)
                            .map(|k| k.into_iter().map(str::to_owned).collect())
                    })
                    .collect(),
            });
        }
    }

    /// Preempts `id` by recompute: frees its blocks, resets its progress and puts it at the front
    /// of the waiting queue. The caller has removed it from `running`.
    fn preempt(&mut self, id: RequestId) {
        let r = self
            .requests
            .get_mut(&id)
            .expect("preempted request is live");
        self.pool.free_reversed(&r.blocks);
        r.blocks.clear();
        self.queued_prefill -= r.prefill_remaining();
        self.queued_pairs_x2 -= r.prefill_pairs_x2();
        r.num_computed = 0;
        r.num_cached_blocks = 0;
        r.prefill_end = r.tokens.len();
        self.queued_prefill += r.prefill_end as u64;
        self.queued_pairs_x2 += r.prefill_pairs_x2();
        self.push_waiting_front(id);
        self.preemptions_total += 1;
    }

    /// Puts `id` at the head of the waiting queue, behind any loaded remote-prefill requests:
    /// those hold their blocks already and need only a slot, so keeping them first means a
    /// request waiting for blocks can never block the requests that would free them.
    fn push_waiting_front(&mut self, id: RequestId) {
        let loaded = self
            .waiting
            .iter()
            .take_while(|w| self.requests[w].remote == Remote::PrefillLoaded)
            .count();
        self.waiting.insert(loaded, id);
    }

    /// Applies the results of a finished step at its end time.
    fn complete_step(&mut self, mut step: Step) {
        let at_us = step.end_us;
        let bs = self.cfg.block_size;
        let mut any_finished = false;
        for s in step.sched.drain(..) {
            let Some(r) = self.requests.get_mut(&s.id) else {
                continue; // aborted mid-step
            };
            if r.seq != s.seq {
                continue; // aborted and re-added under the same id
            }
            if s.prefill {
                self.queued_pairs_x2 -= r.prefill_pairs_x2();
            }
            r.num_computed += s.tokens;
            if s.prefill {
                self.queued_prefill -= s.tokens as u64;
                self.queued_pairs_x2 += r.prefill_pairs_x2();
            }
            if r.num_computed < r.tokens.len() {
                continue; // a prefill chunk that did not reach the end
            }
            let index = r.generated;
            let token = output_token(&self.cfg, s.id, index);
            self.pending.push(Output::Token {
                id: s.id,
                at_us,
                token,
                index,
            });
            self.generation_tokens_total += 1;
            if r.first_token_us.is_none() {
                r.first_token_us = Some(at_us);
                self.ttft.observe_us(at_us.saturating_sub(r.arrival_us));
                self.prompt_tokens_total += r.prompt_len as u64;
                self.by_source.record(
                    r.prompt_len as u64,
                    u64::from(r.cached_tokens.unwrap_or(0)),
                    u64::from(r.external_tokens),
                );
            } else {
                self.itl.observe_us(at_us.saturating_sub(r.last_token_us));
            }
            r.last_token_us = at_us;
            r.generated += 1;
            if r.generated >= r.max_tokens {
                let mut r = self.requests.remove(&s.id).expect("just looked up");
                if r.remote == Remote::Decode {
                    self.hold_blocks(s.id, at_us, &mut r);
                } else {
                    self.pool.free_reversed(&r.blocks);
                }
                self.finished_length += 1;
                self.e2e.observe_us(at_us.saturating_sub(r.arrival_us));
                self.pending.push(Output::Finished {
                    id: s.id,
                    at_us,
                    reason: FinishReason::Length,
                    usage: r.usage(),
                });
                any_finished = true;
                continue;
            }
            r.tokens.push(token);
            if self.cfg.enable_prefix_caching && r.tokens.len().is_multiple_of(bs) {
                let i = r.tokens.len() / bs - 1;
                let parent = if i == 0 {
                    self.hasher.root()
                } else {
                    *r.hash(i - 1)
                };
                let extra = self
                    .cfg
                    .extra_keys(r.lora_name.as_deref(), r.cache_salt.as_deref());
                let h = self
                    .hasher
                    .hashes_from(&parent, i, &r.tokens[i * bs..], extra);
                r.gen_hashes.extend_from_slice(&h);
            }
        }
        self.sched_buf = step.sched;
        if any_finished {
            let requests = &self.requests;
            self.running.retain(|id| requests.contains_key(id));
        }
        if self.kv_events_enabled {
            self.kv_events.append(&mut self.step_events);
        }
    }

    /// End of the step in flight, holds aside (tests drive holds explicitly).
    #[cfg(test)]
    pub(crate) fn inflight_end(&self) -> Option<u64> {
        self.inflight.as_ref().map(|s| s.end_us)
    }

    /// Checks internal invariants (tests only).
    #[cfg(test)]
    pub(crate) fn check_invariants(&self) -> Result<(), String> {
        self.pool.check()?;
        let mut refs = vec![0u32; self.pool.num_blocks()];
        let mut prefill = 0u64;
        let mut pairs_x2 = 0u64;
        for (id, r) in &self.requests {
            for &b in &r.blocks {
                refs[b as usize] += 1;
            }
            prefill += r.prefill_remaining();
            pairs_x2 += r.prefill_pairs_x2();
            let in_running = self.running.contains(id);
            let in_waiting = self.waiting.contains(id);
            let in_loading = self.loading.contains(id);
            if usize::from(in_running) + usize::from(in_waiting) + usize::from(in_loading) != 1 {
                return Err(format!(
                    "request {id} running={in_running} waiting={in_waiting} loading={in_loading}"
                ));
            }
            let loaded = r.remote == Remote::PrefillLoaded;
            if in_waiting && !loaded && (r.num_computed != 0 || !r.blocks.is_empty()) {
                return Err(format!("waiting request {id} holds state"));
            }
            if loaded && !in_waiting {
                return Err(format!("loaded request {id} is not waiting"));
            }
            if in_loading != (r.remote == Remote::PrefillLoading) {
                return Err(format!(
                    "request {id} loading={in_loading} but {:?}",
                    r.remote
                ));
            }
            if in_running && matches!(r.remote, Remote::PrefillPending | Remote::PrefillLoading) {
                return Err(format!("request {id} runs before its KV arrived"));
            }
        }
        for h in self.holds.values() {
            for &b in &h.block_ids {
                refs[b as usize] += 1;
            }
            if !self.hold_deadlines.contains(&(h.expires_at_us, h.id)) {
                return Err(format!("hold {} has no deadline", h.id));
            }
        }
        if self.hold_deadlines.len() != self.holds.len() {
            return Err("hold deadlines disagree with the holds".into());
        }
        let leading_loaded = self
            .waiting
            .iter()
            .take_while(|w| self.requests[w].remote == Remote::PrefillLoaded)
            .count();
        let all_loaded = self
            .waiting
            .iter()
            .filter(|w| self.requests[w].remote == Remote::PrefillLoaded)
            .count();
        if leading_loaded != all_loaded {
            return Err("a loaded remote-prefill request is queued behind another request".into());
        }
        for (b, &n) in refs.iter().enumerate().skip(1) {
            if self.pool.ref_cnt(b as u32) != n {
                return Err(format!(
                    "block {b}: ref {} but {n} holders",
                    self.pool.ref_cnt(b as u32)
                ));
            }
        }
        if prefill != self.queued_prefill {
            return Err(format!(
                "queued_prefill {} vs {prefill}",
                self.queued_prefill
            ));
        }
        if pairs_x2 != self.queued_pairs_x2 {
            return Err(format!(
                "queued_pairs_x2 {} vs {pairs_x2}",
                self.queued_pairs_x2
            ));
        }
        if self.running.len() + self.waiting.len() + self.loading.len() != self.requests.len() {
            return Err("queue sizes disagree with the request table".into());
        }
        Ok(())
    }
}
