//! Two `kvgate serve` replicas in front of one simulated fleet (issue 11.2, live): each replica
//! subscribes to every engine's KV events and keeps its own bookings, a client spreads requests
//! over both as a Kubernetes Service would (alternating), and nothing is shared between the
//! replicas. Multi-turn conversations must stay on the engine that holds their history (a turn
//! sent to the other replica finds it through the engine's KV events), and the conversations
//! must spread over the fleet rather than herd onto whichever engine looked idle to both.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

#[path = "common/fleet.rs"]
mod common;

use common::{base_config, endpoints_of, start_gateway};
use kvgate_gateway::Gateway;
use kvgate_sim::Fleet;
use kvgate_testkit::{MODEL, client, fleet, get_text};
use serde_json::{Value, json};

const ENGINES: usize = 4;
/// With the fleet idle between arrivals (the engines run 50× faster than an H100) every idle
/// engine costs the same, so first turns are placed at random among them; the balance
/// assertions below must hold for that too. Under uniform random placement they fail (one
/// engine gets none, or more than twice its share) 6.4% of the time with 16 conversations,
/// which is what this test did with 16 (3 of 64 runs), and about 0.02% with 48; herding (both
/// replicas piling onto the engine that last looked idle) still fails them.
const CONVERSATIONS: usize = 48;
const TURNS: usize = 4;

async fn replica(f: &Fleet) -> Gateway {
    start_gateway(base_config(endpoints_of(f, true)), ENGINES).await
}

/// The messages of turn `turn` (0-based) of conversation `conv`: a long system prompt of its
/// own, then the earlier turns (answers fixed, so the history renders identically each turn).
fn messages(conv: usize, turn: usize) -> Vec<Value> {
    let system: String = (0..600)
        .map(|i| format!(" c{conv}w{}", (i * 7_919 + conv * 104_729) % 99_991))
        .collect();
    let mut m = vec![json!({"role": "system", "content": system})];
    for t in 0..=turn {
        m.push(json!({"role": "user", "content": format!("question {t} of conversation {conv}")}));
        if t < turn {
            m.push(json!({"role": "assistant", "content": format!("answer {t}")}));
        }
    }
    m
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_keep_conversations_on_their_holders_without_coordination() {
    let f = fleet(ENGINES, 50.0).await;
    let replicas = Arc::new([replica(&f).await, replica(&f).await]);
    let urls: Vec<String> = replicas
        .iter()
        .map(|gw| format!("http://{}/v1/chat/completions", gw.api_addr))
        .collect();
    let c = client();
    // Conversations start 20 ms apart and run concurrently; each turn goes to the replica the
    // previous one did not (a round-robin Service), after a short think time.
    let mut tasks = Vec::new();
    for conv in 0..CONVERSATIONS {
        let (c, urls) = (c.clone(), urls.clone());
        tasks.push(tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(20 * conv as u64)).await;
            let mut served = Vec::new();
            for turn in 0..TURNS {
                let body = json!({
                    "model": MODEL,
                    "messages": messages(conv, turn),
                    "max_tokens": 4,
                });
                let r = c
                    .post(&urls[(conv + turn) % 2])
                    .json(&body)
                    .send()
                    .await
                    .unwrap();
                assert_eq!(r.status(), 200, "conversation {conv} turn {turn}");
                let ep = r.headers()["x-kvgate-endpoint"]
                    .to_str()
                    .unwrap()
                    .to_owned();
                r.bytes().await.unwrap();
                served.push(ep);
                tokio::time::sleep(Duration::from_millis(150)).await;
            }
            served
        }));
    }
    let mut holders: BTreeMap<String, usize> = BTreeMap::new();
    let mut moved = 0;
    for (conv, t) in tasks.into_iter().enumerate() {
        let served = t.await.unwrap();
        eprintln!("conversation {conv}: {served:?}");
        *holders.entry(served[0].clone()).or_default() += 1;
        moved += served[1..].iter().filter(|e| **e != served[0]).count();
    }
    eprintln!("first turns per engine: {holders:?}; later turns moved off their holder: {moved}");
    // What each replica believed of each engine at the end (shown when an assertion fails).
    for (i, gw) in replicas.iter().enumerate() {
        let text = get_text(&c, &format!("http://{}/metrics", gw.admin_addr)).await;
        for line in text.lines().filter(|l| {
            !l.starts_with('#')
                && [
                    "speed_factor",
                    "signal_age_seconds",
                    "kvgate_gateway_decisions",
                ]
                .iter()
                .any(|m| l.contains(m))
        }) {
            eprintln!("replica {i}: {line}");
        }
    }
    // Later turns stay with the history: each is a cache hit of thousands of tokens on its
    // holder against a cold prefill anywhere else, and half of them reach a replica that never
    // saw the conversation before. (A few may move when the holder is busy, a legitimate
    // trade; without KV events about 20 of 48 later turns moved, measured with 16 conversations.)
    let later = CONVERSATIONS * (TURNS - 1);
    assert!(
        moved * 5 <= later,
        "{moved} of {later} later turns left the engine holding their history"
    );
    // No herding: every engine holds some conversations, none more than twice its share.
    let used: BTreeSet<_> = holders.keys().collect();
    assert_eq!(used.len(), ENGINES, "conversations per engine: {holders:?}");
    let most = holders.values().copied().max().unwrap_or(0);
    assert!(
        most <= 2 * CONVERSATIONS / ENGINES,
        "conversations herded: {holders:?}"
    );
    // Both replicas did route (the client spread the traffic), each with its own bookings.
    for gw in replicas.iter() {
        assert!(gw.control.with_router(|r| r.endpoints().count()) == ENGINES);
    }
}
