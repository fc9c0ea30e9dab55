//! What a KV-event publisher's numbers may make the router allocate. A `BlockStored` names its
//! block size; 21 bytes on the wire claiming blocks of 2³² tokens once made the router reserve
//! 16 GiB for one block's bytes before reading a token (an abort where memory is not
//! overcommitted). This binary's allocator (`cap`: its own, so this is a test file of its own)
//! refuses any allocation past 1 GiB of live heap, which aborts the test binary ("memory
//! allocation of … bytes failed"), and what each batch leaves on the heap is held to what it
//! carried.

use cap::Cap;
use kvgate_core::{EndpointSpec, KvEvent, KvEventBatch, Router, RouterConfig, Tier};

#[global_allocator]
static ALLOCATOR: Cap<std::alloc::System> = Cap::new(std::alloc::System, 1 << 30);

fn stored(seq: u64, hashes: Vec<u64>, token_ids: Vec<u32>, block_size: u32) -> KvEventBatch {
    KvEventBatch {
        seq,
        ts: 0.0,
        events: vec![KvEvent::BlockStored {
            block_hashes: hashes,
            parent: None,
            token_ids,
            block_size,
            lora_name: None,
            extra_keys: Vec::new(),
            tier: Tier::Gpu,
        }],
        data_parallel_rank: None,
    }
}

/// One test only: the allocator's record is process-wide.
#[test]
fn a_claimed_block_size_allocates_nothing_the_event_did_not_carry() {
    let mut r = Router::new(RouterConfig::for_policy("kvgate").unwrap()).unwrap();
    let e = r.add_endpoint(0, EndpointSpec::new("e0", "m"));
    // An ordinary event first, so the router's scratch space exists.
    r.observe_kv_batch(e, 1, &stored(0, vec![1], (0..16).collect(), 16));
    let batches = [
        // No block at all, the largest block size.
        stored(1, Vec::new(), Vec::new(), u32::MAX),
        // A block with far fewer tokens than the claimed size: skipped as unplaceable.
        stored(2, vec![2], vec![5; 3], u32::MAX),
        // Just the tokens of one block of a large size the event carries.
        stored(3, vec![3], vec![5; 4096], 4096),
    ];
    for (i, batch) in batches.iter().enumerate() {
        let base = ALLOCATOR.allocated();
        r.observe_kv_batch(e, 2 + i as u64, batch);
        let grown = ALLOCATOR.allocated().saturating_sub(base);
        assert!(
            grown <= 1 << 20,
            "batch {i}: the heap grew by {grown} bytes"
        );
    }
    // The unplaceable block is counted, the carried one stored.
    assert_eq!(r.engine_key_stats(e), Some((2, 1)));
}
