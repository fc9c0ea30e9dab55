//! The KV-event decoder on bytes a publisher controls: a whole ZMQ message split into frames
//! (`[topic, seq, payload]`, as the subscriber hands it over) and the msgpack payload alone.
//! Any input must give a batch or a typed error, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // The payload alone, as replay delivers it.
    let _ = kvgate_signals::decode_event_batch(0, data);
    // As frames: the first byte chooses where the topic and sequence frames end.
    if let Some((&cut, rest)) = data.split_first() {
        let a = usize::from(cut & 0x0F).min(rest.len());
        let b = (a + usize::from(cut >> 4)).min(rest.len());
        let frames = [&rest[..a], &rest[a..b], &rest[b..]];
        let _ = kvgate_signals::decode_frames(&frames);
        let _ = kvgate_signals::decode_frames(&frames[..2]);
    }
});
