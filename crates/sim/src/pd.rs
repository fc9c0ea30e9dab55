//! Prefill/decode disaggregation: what a request's transfer fields ask of an engine, the KV side
//! channel a prefill engine serves, and the pull a decode engine makes.
//!
//! **What each role does** (`--role`, or `role:` per engine; see [`Role`]):
//!
//! | fields in the request | prefill | decode | both |
//! |---|---|---|---|
//! | `kv_transfer_params.do_remote_decode` (vLLM NixlConnector, prefill leg) | hold the KV, answer `kv_transfer_params` | serve whole | hold, answer |
//! | `kv_transfer_params.do_remote_prefill` + `remote_*` (decode leg) | serve whole | pull the KV, generate | pull, generate |
//! | `bootstrap_host`/`bootstrap_port`/`bootstrap_room` (SGLang) | compute the prompt, one token, publish the room | wait for the room, pull, generate | serve whole |
//! | none | serve whole | serve whole | serve whole |
//!
//! "Serve whole" is what vLLM and SGLang do with a request that carries no usable transfer
//! fields: prefill and decode in place, `kv_transfer_params: null` in the answer. A vLLM prefill
//! leg is expected non-streaming (proxies send it so); streamed, its blocks are still held but
//! the stream carries no `kv_transfer_params`.
//!
//! **vLLM's flow, as modelled** (facts from `vllm/distributed/kv_transfer/kv_connector/v1/nixl/
//! scheduler.py` and `vllm/v1/core/sched/scheduler.py`): the prefill leg is served like any
//! request; when it finishes by length its blocks stay held ([`kvgate_engine::Engine::kv_hold`])
//! and the answer carries `kv_transfer_params` shaped like `NixlConnectorScheduler.
//! request_finished`'s: `{do_remote_prefill: true, do_remote_decode: false, remote_block_ids:
//! [[ids]] (one list per KV-cache group), remote_engine_id, remote_request_id, remote_host,
//! remote_port, tp_size}`. The decode leg is parked until its blocks are allocated, then pulls
//! the non-cached part of the prompt from `remote_host:remote_port`, and generates.
//!
//! **The side channel is the simulator's stand-in for NIXL** (RDMA reads plus vLLM's ZMQ
//! handshake) and for SGLang's bootstrap server plus its transfer engine. It is a small HTTP
//! server per prefill-capable engine, not a real wire format of either project:
//! - `POST /nixl/read` `{remote_engine_id, remote_request_id, remote_block_ids, num_tokens}`:
//!   the read of `num_tokens` tokens of KV. It answers after the transfer time
//!   ([`kvgate_engine::KvTransferConfig::transfer_us`], divided by the time scale), and only
//!   then frees the prefill engine's blocks, as NIXL's completion notification does. 404: not
//!   this engine or no such request; 409: other blocks than the ones held; 410: the blocks were
//!   already released or timed out; 500: an injected transfer failure (the blocks stay held
//!   until their timeout, as no notification came).
//! - `POST /nixl/release` `{remote_engine_id, remote_request_id}`: a decode request that ended
//!   before reading frees the blocks at once (vLLM sends the same notification with no blocks).
//! - `POST /bootstrap/room/{room}` `{num_tokens}`: SGLang's flow. It waits until the prefill
//!   request of that room has finished (the decode leg often arrives first: both legs are sent
//!   at once), then transfers as `/nixl/read` does. 410 if the prefill request failed, 504 if it
//!   never came within the hold timeout.
//!
//! Transfer times are simulated time divided by the serving (prefill) engine's time scale; run
//! both sides at one scale. Differences from SGLang kept on purpose: SGLang's prefill engine
//! pushes the KV and the first token, so its decode engine does not recompute the last prompt
//! token; here both protocols recompute it, as vLLM does.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use kvgate_engine::{KvHold, KvLoad, RequestId};
use serde_json::{Value, json};
use tokio::sync::{oneshot, watch};

use crate::actor::Command;
use crate::config::Role;
use crate::fault::{DrawKind, uniform};
use crate::http::EngineShared;

/// Longest a decode engine waits for a side channel to answer a transfer: far above any
/// simulated transfer, so only a wedged peer hits it.
const PULL_TIMEOUT: Duration = Duration::from_secs(300);

/// Bucket bounds of `vllm:nixl_xfer_time_seconds` (`NixlPromMetrics`).
pub(crate) const NIXL_XFER_TIME_BUCKETS_S: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 5.0,
];

/// Bucket bounds of `vllm:nixl_bytes_transferred`: 2 KiB to 8 GiB in factors of 4
/// (`2 ** (10 + i)` for odd `i` below 25).
pub(crate) const NIXL_BYTES_BUCKETS: &[f64] = &[
    2048.0,
    8192.0,
    32768.0,
    131072.0,
    524288.0,
    2097152.0,
    8388608.0,
    33554432.0,
    134217728.0,
    536870912.0,
    2147483648.0,
    8589934592.0,
];

/// vLLM's NIXL transfer metrics of the loads a decode engine made.
#[derive(Debug)]
pub(crate) struct NixlStats {
    /// `vllm:nixl_xfer_time_seconds`, simulated seconds.
    pub xfer_time: kvgate_engine::Histogram,
    /// `vllm:nixl_bytes_transferred` (the histogram's `sum_s` holds bytes).
    pub bytes: kvgate_engine::Histogram,
    /// `vllm:nixl_num_failed_transfers`.
    pub failed: u64,
}

impl Default for NixlStats {
    fn default() -> Self {
        Self {
            xfer_time: kvgate_engine::Histogram::new(NIXL_XFER_TIME_BUCKETS_S),
            bytes: kvgate_engine::Histogram::new(NIXL_BYTES_BUCKETS),
            failed: 0,
        }
    }
}

/// Records a raw value (not microseconds) in a histogram.
fn observe(h: &mut kvgate_engine::Histogram, v: f64) {
    let i = h.bounds_s.partition_point(|&b| b < v);
    h.counts[i] += 1;
    h.sum_s += v;
    h.count += 1;
}

/// Where a decode request's KV comes from (vLLM's `kv_transfer_params` of the prefill answer).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct NixlSource {
    pub engine_id: String,
    pub request_id: String,
    pub block_ids: Vec<u32>,
    pub host: String,
    pub port: u16,
}

/// What a request's transfer fields ask of this engine.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Plan {
    /// Prefill and decode here.
    Whole,
    /// vLLM prefill leg: hold the KV and answer with `kv_transfer_params`.
    NixlPrefill,
    /// vLLM decode leg: pull from the prefill engine.
    NixlDecode(NixlSource),
    /// SGLang prefill leg: one token, then publish the room's KV.
    BootstrapPrefill { room: u64 },
    /// SGLang decode leg: pull the room's KV from the prefill engine's bootstrap server.
    BootstrapDecode { host: String, port: u16, room: u64 },
}

/// SGLang's request fields.
#[derive(Clone, Debug, Default, serde::Deserialize)]
pub(crate) struct Bootstrap {
    #[serde(default)]
    pub bootstrap_host: Option<String>,
    #[serde(default)]
    pub bootstrap_port: Option<u16>,
    #[serde(default)]
    pub bootstrap_room: Option<u64>,
}

fn block_ids(v: &Value) -> Option<Vec<u32>> {
    let list = v.as_array()?;
    // vLLM 0.32 sends one list per KV-cache group; older vLLM a flat list.
    let flat = match list.first() {
        Some(Value::Array(_)) => list.first()?.as_array()?,
        _ => list,
    };
    flat.iter()
        .map(|b| b.as_u64().and_then(|b| u32::try_from(b).ok()))
        .collect()
}

/// Reads `kv_transfer_params` and SGLang's fields as an engine of `role` would.
pub(crate) fn plan(role: Role, kv: Option<&Value>, bootstrap: &Bootstrap) -> Plan {
    let flag = |k: &str| kv.and_then(|v| v.get(k)).and_then(Value::as_bool) == Some(true);
    let text = |k: &str| kv.and_then(|v| v.get(k)).and_then(Value::as_str);
    if flag("do_remote_decode") && role.serves_kv() {
        return Plan::NixlPrefill;
    }
    if flag("do_remote_prefill") && role != Role::Prefill {
        // vLLM uses the params only with every remote field present; otherwise it warns and
        // computes the prompt itself.
        let source = (|| {
            Some(NixlSource {
                engine_id: text("remote_engine_id")?.to_owned(),
                request_id: text("remote_request_id")?.to_owned(),
                block_ids: block_ids(kv?.get("remote_block_ids")?)?,
                host: text("remote_host")?.to_owned(),
                port: u16::try_from(kv?.get("remote_port")?.as_u64()?).ok()?,
            })
        })();
        if let Some(source) = source {
            return Plan::NixlDecode(source);
        }
    }
    match (role, bootstrap) {
        (
            Role::Prefill,
            Bootstrap {
                bootstrap_room: Some(room),
                ..
            },
        ) => Plan::BootstrapPrefill { room: *room },
        (
            Role::Decode,
            Bootstrap {
                bootstrap_host: Some(host),
                bootstrap_port: Some(port),
                bootstrap_room: Some(room),
            },
        ) => Plan::BootstrapDecode {
            host: host.clone(),
            port: *port,
            room: *room,
        },
        _ => Plan::Whole,
    }
}

/// The engine request id inside a response id (`chatcmpl-<engine>-<hex id>`), which is what
/// the prefill engine hands out as `remote_request_id`.
pub(crate) fn request_id_of(response_id: &str) -> Option<RequestId> {
    let (_, hex) = response_id.rsplit_once('-')?;
    RequestId::from_str_radix(hex, 16).ok()
}

/// The `kv_transfer_params` a prefill answer carries (`NixlConnectorScheduler.request_finished`).
pub(crate) fn transfer_params(s: &EngineShared, response_id: &str, hold: &KvHold) -> Value {
    let side = s
        .side_channel
        .expect("a prefill-capable engine has a side channel");
    let host = if side.ip().is_unspecified() {
        "localhost".to_owned()
    } else {
        side.ip().to_string()
    };
    json!({
        "do_remote_prefill": true,
        "do_remote_decode": false,
        "remote_block_ids": [hold.block_ids],
        "remote_engine_id": s.engine_id,
        "remote_request_id": response_id,
        "remote_host": host,
        "remote_port": side.port(),
        "tp_size": 1,
    })
}

/// SGLang's bootstrap rooms of one prefill engine.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Room {
    /// The prefill request has not finished yet (or not arrived).
    Pending,
    /// Its KV is held under this request id.
    Ready(RequestId),
    /// It failed or was aborted: there is nothing to transfer.
    Failed,
}

/// Rooms by number, each with the time it was opened (to drop rooms nobody collects).
#[derive(Default)]
pub(crate) struct Rooms(std::sync::Mutex<HashMap<u64, (Instant, watch::Sender<Room>)>>);

impl Rooms {
    fn get(&self, room: u64, max_age: Duration) -> watch::Sender<Room> {
        let mut map = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let now = Instant::now();
        map.retain(|_, (opened, _)| now.duration_since(*opened) < max_age);
        map.entry(room)
            .or_insert_with(|| (now, watch::channel(Room::Pending).0))
            .1
            .clone()
    }

    fn remove(&self, room: u64) {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(&room);
    }
}

fn hold_timeout_wall(s: &EngineShared) -> Duration {
    Duration::from_secs_f64(
        s.config.kv_transfer.abort_request_timeout_us as f64 / 1e6 / s.time_scale,
    )
}

/// Publishes the room once the prefill request's blocks are held (or marks it failed if the
/// request ends otherwise).
pub(crate) fn publish_room(s: &Arc<EngineShared>, room: u64, hold: oneshot::Receiver<KvHold>) {
    let tx = s.rooms.get(room, hold_timeout_wall(s));
    tokio::spawn(async move {
        let state = match hold.await {
            Ok(h) => Room::Ready(h.id),
            Err(_) => Room::Failed,
        };
        tx.send_replace(state);
    });
}

/// Starts the decode side's pull: waits for the engine to allocate the blocks, asks the
/// prefill engine's side channel for the KV, and reports the outcome to the engine. If the
/// request ends before its blocks are allocated, a vLLM prefill engine is told to free its
/// blocks.
pub(crate) fn spawn_pull(
    s: &Arc<EngineShared>,
    id: RequestId,
    plan: Plan,
    load: oneshot::Receiver<KvLoad>,
) {
    let s = s.clone();
    tokio::spawn(async move {
        let Ok(load) = load.await else {
            if let Plan::NixlDecode(src) = &plan {
                let url = format!("http://{}:{}/nixl/release", src.host, src.port);
                let body = json!({
                    "remote_engine_id": src.engine_id,
                    "remote_request_id": src.request_id,
                });
                let _ = s
                    .client
                    .post(url)
                    .json(&body)
                    .timeout(PULL_TIMEOUT)
                    .send()
                    .await;
            }
            return;
        };
        let (url, body) = match &plan {
            Plan::NixlDecode(src) => (
                format!("http://{}:{}/nixl/read", src.host, src.port),
                json!({
                    "remote_engine_id": src.engine_id,
                    "remote_request_id": src.request_id,
                    "remote_block_ids": [src.block_ids],
                    "num_tokens": load.load_tokens,
                }),
            ),
            Plan::BootstrapDecode { host, port, room } => (
                format!("http://{host}:{port}/bootstrap/room/{room}"),
                json!({ "num_tokens": load.load_tokens }),
            ),
            _ => return,
        };
        let sent = s
            .client
            .post(&url)
            .json(&body)
            .timeout(PULL_TIMEOUT)
            .send()
            .await;
        match &sent {
            Ok(r) if r.status().is_success() => {}
            Ok(r) => tracing::debug!(%url, status = %r.status(), "KV transfer refused"),
            Err(e) => tracing::debug!(%url, error = %e, "KV transfer failed"),
        }
        let transfer_us = match sent {
            Ok(r) if r.status().is_success() => r
                .json::<Value>()
                .await
                .ok()
                .and_then(|v| v.get("transfer_us").and_then(Value::as_u64)),
            _ => None,
        };
        {
            let mut st = s
                .nixl
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            match transfer_us {
                Some(us) => {
                    st.xfer_time.observe_us(us);
                    let bytes = s
                        .config
                        .kv_transfer
                        .transfer_bytes(u64::from(load.load_tokens));
                    observe(&mut st.bytes, bytes as f64);
                }
                None => st.failed += 1,
            }
        }
        let _ = s.cmd.send(Command::RemoteKv {
            id,
            ok: transfer_us.is_some(),
        });
    });
}

/// The side channel of one prefill-capable engine.
pub(crate) fn side_channel(s: Arc<EngineShared>) -> Router {
    Router::new()
        .route("/nixl/read", post(nixl_read))
        .route("/nixl/release", post(nixl_release))
        .route("/bootstrap/room/{room}", post(bootstrap_room))
        .with_state(s)
}

fn refuse(status: StatusCode, why: &str) -> Response {
    (status, axum::Json(json!({ "ok": false, "error": why }))).into_response()
}

/// The held request a side-channel call names, or why it is refused.
fn named_request(s: &EngineShared, body: &Value) -> Result<RequestId, (StatusCode, &'static str)> {
    if body.get("remote_engine_id").and_then(Value::as_str) != Some(s.engine_id.as_str()) {
        return Err((StatusCode::NOT_FOUND, "not this engine"));
    }
    body.get("remote_request_id")
        .and_then(Value::as_str)
        .and_then(request_id_of)
        .ok_or((StatusCode::NOT_FOUND, "no such request"))
}

async fn get_hold(s: &EngineShared, id: RequestId) -> Option<KvHold> {
    let (tx, rx) = oneshot::channel();
    s.cmd.send(Command::GetHold { id, reply: tx }).ok()?;
    rx.await.ok().flatten()
}

async fn release(s: &EngineShared, id: RequestId) -> bool {
    let (tx, rx) = oneshot::channel();
    if s.cmd.send(Command::ReleaseHold { id, reply: tx }).is_err() {
        return false;
    }
    rx.await.unwrap_or(false)
}

/// Moves `num_tokens` tokens of the held request `id`: waits the transfer time, draws the
/// injected failure, then frees the blocks.
async fn transfer(s: &EngineShared, id: RequestId, num_tokens: u64) -> Response {
    let n = s.transfers_served.fetch_add(1, Ordering::Relaxed);
    let sim_us = s.config.kv_transfer.transfer_us(num_tokens);
    tokio::time::sleep(Duration::from_secs_f64(sim_us as f64 / 1e6 / s.time_scale)).await;
    if s.faults.transfer_failure_rate > 0.0
        && uniform(s.fault_seed, s.index, DrawKind::Transfer, n) < s.faults.transfer_failure_rate
    {
        return refuse(
            StatusCode::INTERNAL_SERVER_ERROR,
            "injected transfer failure",
        );
    }
    if !release(s, id).await {
        return refuse(
            StatusCode::GONE,
            "blocks released or timed out mid-transfer",
        );
    }
    axum::Json(json!({ "ok": true, "num_tokens": num_tokens, "transfer_us": sim_us }))
        .into_response()
}

fn num_tokens(body: &Value) -> Option<u64> {
    body.get("num_tokens").and_then(Value::as_u64)
}

async fn nixl_read(State(s): State<Arc<EngineShared>>, body: Bytes) -> Response {
    let Ok(body) = serde_json::from_slice::<Value>(&body) else {
        return refuse(StatusCode::BAD_REQUEST, "invalid JSON");
    };
    let id = match named_request(&s, &body) {
        Ok(id) => id,
        Err((status, why)) => return refuse(status, why),
    };
    let (Some(n), Some(blocks)) = (
        num_tokens(&body),
        body.get("remote_block_ids").and_then(block_ids),
    ) else {
        return refuse(
            StatusCode::BAD_REQUEST,
            "num_tokens and remote_block_ids required",
        );
    };
    let Some(hold) = get_hold(&s, id).await else {
        return refuse(StatusCode::GONE, "blocks released or timed out");
    };
    if hold.block_ids != blocks || n > u64::from(hold.num_tokens) {
        return refuse(StatusCode::CONFLICT, "not the blocks held for this request");
    }
    transfer(&s, id, n).await
}

async fn nixl_release(State(s): State<Arc<EngineShared>>, body: Bytes) -> Response {
    let Ok(body) = serde_json::from_slice::<Value>(&body) else {
        return refuse(StatusCode::BAD_REQUEST, "invalid JSON");
    };
    let id = match named_request(&s, &body) {
        Ok(id) => id,
        Err((status, why)) => return refuse(status, why),
    };
    if release(&s, id).await {
        axum::Json(json!({ "ok": true })).into_response()
    } else {
        refuse(StatusCode::GONE, "blocks released or timed out")
    }
}

async fn bootstrap_room(
    State(s): State<Arc<EngineShared>>,
    Path(room): Path<u64>,
    body: Bytes,
) -> Response {
    let Some(n) = serde_json::from_slice::<Value>(&body)
        .ok()
        .as_ref()
        .and_then(num_tokens)
    else {
        return refuse(StatusCode::BAD_REQUEST, "num_tokens required");
    };
    let wait = hold_timeout_wall(&s);
    let mut rx = s.rooms.get(room, wait).subscribe();
    // The watch's read guard must not live across the awaits below.
    let state = match tokio::time::timeout(wait, rx.wait_for(|r| *r != Room::Pending)).await {
        Ok(Ok(r)) => Some(*r),
        Ok(Err(_)) => Some(Room::Failed),
        Err(_) => None,
    };
    let Some(state) = state else {
        s.rooms.remove(room);
        return refuse(
            StatusCode::GATEWAY_TIMEOUT,
            "the room's prefill never finished",
        );
    };
    s.rooms.remove(room);
    let Room::Ready(id) = state else {
        return refuse(StatusCode::GONE, "the room's prefill failed");
    };
    if get_hold(&s, id).await.is_none() {
        return refuse(StatusCode::GONE, "blocks released or timed out");
    }
    transfer(&s, id, n).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nixl(v: Value) -> Plan {
        plan(Role::Both, Some(&v), &Bootstrap::default())
    }

    #[test]
    fn each_role_reads_the_fields_it_can_act_on() {
        let prefill = json!({"do_remote_decode": true, "do_remote_prefill": false,
            "remote_engine_id": null, "remote_block_ids": null, "remote_host": null,
            "remote_port": null});
        let decode = json!({"do_remote_prefill": true, "do_remote_decode": false,
            "remote_block_ids": [[3, 4]], "remote_engine_id": "e", "remote_request_id":
            "chatcmpl-0-000000000000000a", "remote_host": "127.0.0.1", "remote_port": 5600,
            "tp_size": 1});
        assert_eq!(nixl(prefill.clone()), Plan::NixlPrefill);
        assert_eq!(
            plan(Role::Decode, Some(&prefill), &Bootstrap::default()),
            Plan::Whole,
            "a decode engine computes a prefill leg itself"
        );
        let src = NixlSource {
            engine_id: "e".into(),
            request_id: "chatcmpl-0-000000000000000a".into(),
            block_ids: vec![3, 4],
            host: "127.0.0.1".into(),
            port: 5600,
        };
        assert_eq!(nixl(decode.clone()), Plan::NixlDecode(src.clone()));
        assert_eq!(
            plan(Role::Prefill, Some(&decode), &Bootstrap::default()),
            Plan::Whole
        );
        let mut flat = decode.clone();
        flat["remote_block_ids"] = json!([3, 4]);
        assert_eq!(nixl(flat), Plan::NixlDecode(src), "older vLLM's flat list");
        let mut partial = decode;
        partial.as_object_mut().unwrap().remove("remote_host");
        assert_eq!(nixl(partial), Plan::Whole, "incomplete params are ignored");
        assert_eq!(
            plan(Role::Prefill, None, &Bootstrap::default()),
            Plan::Whole
        );
        let b = Bootstrap {
            bootstrap_host: Some("10.0.0.1".into()),
            bootstrap_port: Some(8998),
            bootstrap_room: Some(7),
        };
        assert_eq!(
            plan(Role::Prefill, None, &b),
            Plan::BootstrapPrefill { room: 7 }
        );
        assert_eq!(
            plan(Role::Decode, None, &b),
            Plan::BootstrapDecode {
                host: "10.0.0.1".into(),
                port: 8998,
                room: 7
            }
        );
        assert_eq!(plan(Role::Both, None, &b), Plan::Whole);
        assert_eq!(request_id_of("chatcmpl-3-00000000000000ff"), Some(255));
        assert_eq!(request_id_of("nonsense"), None);
    }
}
