//! `kvgate serve` in front of engines that are not `kvgate sim`: small HTTP servers on loopback
//! that answer the way a real engine (or a hostile or broken one) does, and count what they
//! were sent. Each test is named after the defect it pins (issue 10).

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use kvgate_core::endpoint::EngineKind;
use kvgate_gateway::Gateway;
use kvgate_runtime::config::{DataPlaneConfig, Overrides};
use serde_json::{Value, json};

const MODEL: &str = "m";

/// Polls `f` until it returns true; fails the test after `within`.
async fn eventually<F, Fut>(what: &str, within: Duration, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + within;
    loop {
        if f().await {
            return;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// What a fake engine answers to one request: status, content type, body.
type Answer = (StatusCode, Vec<(&'static str, String)>, String);
type Handler = Arc<dyn Fn(&str, &str) -> Option<Answer> + Send + Sync>;

/// A fake engine: answers with `handler(method, path)` (`None` = never answer), and counts
/// requests per path and the connections that carried a chat request and are still open.
struct FakeEngine {
    address: String,
    hits: Arc<Mutex<HashMap<String, usize>>>,
    open_chat_connections: Arc<AtomicUsize>,
    open_connections: Arc<AtomicUsize>,
    _task: tokio::task::JoinHandle<()>,
}

impl FakeEngine {
    async fn start(handler: Handler) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap().to_string();
        let hits = Arc::new(Mutex::new(HashMap::<String, usize>::new()));
        let open_chat = Arc::new(AtomicUsize::new(0));
        let open = Arc::new(AtomicUsize::new(0));
        let (h, oc, o) = (hits.clone(), open_chat.clone(), open.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((sock, _)) = listener.accept().await else {
                    continue;
                };
                let (handler, hits, open_chat, open) =
                    (handler.clone(), h.clone(), oc.clone(), o.clone());
                tokio::spawn(async move {
                    open.fetch_add(1, Ordering::SeqCst);
                    let carried_chat = Arc::new(std::sync::atomic::AtomicBool::new(false));
                    let cc = carried_chat.clone();
                    let oc2 = open_chat.clone();
                    let svc =
                        hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                            let (handler, hits, cc, oc2) =
                                (handler.clone(), hits.clone(), cc.clone(), oc2.clone());
                            async move {
                                let path = req.uri().path().to_owned();
                                *hits.lock().unwrap().entry(path.clone()).or_default() += 1;
                                if path == "/v1/chat/completions"
                                    && !cc.swap(true, Ordering::SeqCst)
                                {
                                    oc2.fetch_add(1, Ordering::SeqCst);
                                }
                                let method = req.method().to_string();
                                let _ = req.into_body().collect().await;
                                let Some((status, headers, body)) = handler(&method, &path) else {
                                    std::future::pending::<()>().await;
                                    unreachable!()
                                };
                                let mut resp = Response::builder().status(status);
                                for (k, v) in headers {
                                    resp = resp.header(k, v);
                                }
                                Ok::<_, Infallible>(
                                    resp.body(Full::new(Bytes::from(body))).unwrap(),
                                )
                            }
                        });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(sock), svc)
                        .await;
                    if carried_chat.load(Ordering::SeqCst) {
                        open_chat.fetch_sub(1, Ordering::SeqCst);
                    }
                    open.fetch_sub(1, Ordering::SeqCst);
                });
            }
        });
        Self {
            address,
            hits,
            open_chat_connections: open_chat,
            open_connections: open,
            _task: task,
        }
    }

    fn hits(&self, path: &str) -> usize {
        self.hits.lock().unwrap().get(path).copied().unwrap_or(0)
    }
}

fn json_answer(v: Value) -> Option<Answer> {
    Some((
        StatusCode::OK,
        vec![("content-type", "application/json".to_owned())],
        v.to_string(),
    ))
}

fn models_list() -> Value {
    json!({"object": "list", "data": [{"id": MODEL, "object": "model", "owned_by": "llamacpp"}]})
}

fn chat_completion() -> Value {
    json!({
        "id": "x", "object": "chat.completion", "model": MODEL,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4},
    })
}

/// An engine that serves models, `metrics` as its `/metrics`, and answers chats at once.
fn engine_handler(metrics: &'static str) -> Handler {
    Arc::new(move |_, path| match path {
        "/v1/models" => json_answer(models_list()),
        "/metrics" => Some((
            StatusCode::OK,
            vec![("content-type", "text/plain; version=0.0.4".to_owned())],
            metrics.to_owned(),
        )),
        "/v1/chat/completions" => json_answer(chat_completion()),
        _ => Some((StatusCode::NOT_FOUND, vec![], String::new())),
    })
}

const VLLM_METRICS: &str = "# TYPE vllm:num_requests_running gauge\n\
vllm:num_requests_running{model_name=\"m\"} 0\n\
# TYPE vllm:num_requests_waiting gauge\n\
vllm:num_requests_waiting{model_name=\"m\"} 0\n\
# TYPE vllm:kv_cache_usage_perc gauge\n\
vllm:kv_cache_usage_perc{model_name=\"m\"} 0.0\n";

const LLAMACPP_METRICS: &str = include_str!(concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../signals/tests/fixtures/llamacpp_server.txt"
));

/// A gateway configured the way the command line configures it: `--endpoint` flags only.
async fn gateway_for(endpoints: &[&str], tweak: impl FnOnce(&mut DataPlaneConfig)) -> Gateway {
    let flags = Overrides {
        host: Some("127.0.0.1".into()),
        port: Some(0),
        admin_port: Some(0),
        endpoints: endpoints.iter().map(|e| (*e).to_owned()).collect(),
        scrape_interval_ms: Some(50),
        ..Overrides::default()
    };
    let mut cfg = DataPlaneConfig::load(None, &flags).expect("flags are valid");
    tweak(&mut cfg);
    Gateway::start(cfg, flags).await.expect("gateway starts")
}

fn client() -> reqwest::Client {
    reqwest::Client::builder().no_proxy().build().unwrap()
}

async fn chat(gw: &Gateway) -> reqwest::Response {
    client()
        .post(format!("http://{}/v1/chat/completions", gw.api_addr))
        .json(&json!({"model": MODEL, "messages": [{"role": "user", "content": "hello"}]}))
        .send()
        .await
        .unwrap()
}

#[tokio::test]
async fn llama_cpp_endpoints_given_alone_are_scraped_as_llama_cpp() {
    let a = FakeEngine::start(engine_handler(LLAMACPP_METRICS)).await;
    let b = FakeEngine::start(engine_handler(LLAMACPP_METRICS)).await;
    let gw = gateway_for(&[&a.address, &b.address], |_| {}).await;
    let control = gw.control.clone();
    eventually(
        "both endpoints known as llama.cpp, with fresh load samples",
        Duration::from_secs(10),
        || {
            let c = control.clone();
            async move {
                c.with_router(|r| {
                    let views: Vec<_> = r.endpoints().collect();
                    views.len() == 2
                        && views.iter().all(|v| {
                            v.spec.engine == EngineKind::LlamaCpp
                                && v.sample_taken_at_us.is_some()
                                && v.scrape_failures == 0
                        })
                })
            }
        },
    )
    .await;
    let r = chat(&gw).await;
    assert_eq!(r.status(), 200);
}

#[tokio::test]
async fn configured_engine_kind_wins_over_detection() {
    let a = FakeEngine::start(engine_handler(VLLM_METRICS)).await;
    let gw = gateway_for(&[&a.address], |cfg| {
        cfg.endpoints[0].engine = Some(EngineKind::Sglang);
        cfg.endpoints[0].models = vec![MODEL.into()];
    })
    .await;
    let control = gw.control.clone();
    eventually("discovered", Duration::from_secs(10), || {
        let (c, scraped) = (control.clone(), a.hits("/metrics") > 0);
        async move { c.ready_endpoints() == 1 && scraped }
    })
    .await;
    control.with_router(|r| {
        assert!(r.endpoints().all(|v| v.spec.engine == EngineKind::Sglang));
    });
}

#[tokio::test]
async fn upstream_connections_are_counted_by_the_fake_engine() {
    // The fake engine's own bookkeeping, which the pool test below relies on.
    let a = FakeEngine::start(engine_handler(VLLM_METRICS)).await;
    let mut sock = tokio::net::TcpStream::connect(&a.address).await.unwrap();
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    sock.write_all(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\ncontent-length: 2\r\n\r\n{}")
        .await
        .unwrap();
    let mut buf = [0u8; 4096];
    let n = sock.read(&mut buf).await.unwrap();
    assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
    assert_eq!(a.open_chat_connections.load(Ordering::SeqCst), 1);
    assert!(a.open_connections.load(Ordering::SeqCst) >= 1);
    drop(sock);
    eventually("connection closed", Duration::from_secs(5), || {
        let n = a.open_chat_connections.load(Ordering::SeqCst);
        async move { n == 0 }
    })
    .await;
}

/// An address nothing listens on (connections are refused).
async fn dead_address() -> String {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    l.local_addr().unwrap().to_string()
}

async fn status_and_message(resp: reqwest::Response) -> (u16, String) {
    let status = resp.status().as_u16();
    let v: Value = resp.json().await.unwrap_or(Value::Null);
    (
        status,
        v["error"]["message"].as_str().unwrap_or("").to_owned(),
    )
}

async fn ready_status(gw: &Gateway) -> u16 {
    client()
        .get(format!("http://{}/ready", gw.admin_addr))
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

#[tokio::test]
async fn readiness_lies_with_model_given_and_every_endpoint_unreachable() {
    let dead = dead_address().await;
    let gw = gateway_for(&[&dead], |cfg| cfg.endpoints[0].models = vec![MODEL.into()]).await;
    let control = gw.control.clone();
    eventually(
        "the endpoint is known unreachable",
        Duration::from_secs(10),
        || {
            let c = control.clone();
            async move { !c.unreachable_endpoints().is_empty() }
        },
    )
    .await;
    assert_eq!(
        ready_status(&gw).await,
        503,
        "/ready means: can route a request now"
    );
}

#[tokio::test]
async fn unreachable_endpoints_make_an_unlisted_model_503_not_404() {
    let live = FakeEngine::start(engine_handler(VLLM_METRICS)).await;
    let dead = dead_address().await;
    let gw = gateway_for(&[&live.address, &dead], |_| {}).await;
    let control = gw.control.clone();
    eventually(
        "one reachable, one unreachable",
        Duration::from_secs(10),
        || {
            let c = control.clone();
            async move { c.reachable_endpoints() == 1 && c.unreachable_endpoints().len() == 1 }
        },
    )
    .await;
    assert_eq!(ready_status(&gw).await, 200, "one endpoint can serve");
    assert_eq!(chat(&gw).await.status(), 200, "the listed model is served");
    let r = client()
        .post(format!("http://{}/v1/chat/completions", gw.api_addr))
        .json(&json!({"model": "other", "messages": [{"role": "user", "content": "x"}]}))
        .send()
        .await
        .unwrap();
    let (status, message) = status_and_message(r).await;
    assert_eq!(
        status, 503,
        "the unreachable endpoint may serve it: {message}"
    );
    assert!(message.contains(&dead), "{message}");

    // With every configured endpoint reachable and none listing it, the model does not exist.
    let gw2 = gateway_for(&[&live.address], |_| {}).await;
    let control = gw2.control.clone();
    eventually("reachable", Duration::from_secs(10), || {
        let c = control.clone();
        async move { c.reachable_endpoints() == 1 }
    })
    .await;
    let r = client()
        .post(format!("http://{}/v1/chat/completions", gw2.api_addr))
        .json(&json!({"model": "other", "messages": [{"role": "user", "content": "x"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
}

#[tokio::test]
async fn every_endpoint_unreachable_answered_502_not_503_with_model_given() {
    let dead = dead_address().await;
    let gw = gateway_for(&[&dead], |cfg| cfg.endpoints[0].models = vec![MODEL.into()]).await;
    let control = gw.control.clone();
    eventually("known unreachable", Duration::from_secs(10), || {
        let c = control.clone();
        async move { !c.unreachable_endpoints().is_empty() }
    })
    .await;
    let (status, message) = status_and_message(chat(&gw).await).await;
    assert_eq!(status, 503, "{message}");
    assert!(
        message.contains(&dead),
        "names the unreachable endpoint: {message}"
    );
}

#[tokio::test]
async fn upstream_pool_kept_idle_connections_forever() {
    let a = FakeEngine::start(engine_handler(VLLM_METRICS)).await;
    let gw = gateway_for(&[&a.address], |cfg| {
        cfg.endpoints[0].models = vec![MODEL.into()];
        cfg.limits.upstream_idle_timeout_ms = 300;
    })
    .await;
    let burst: Vec<_> = (0..16).map(|_| chat(&gw)).collect();
    for r in futures::future::join_all(burst).await {
        assert_eq!(r.status(), 200);
    }
    let after_burst = a.open_chat_connections.load(Ordering::SeqCst);
    assert!(after_burst > 0, "the burst left pooled connections");
    // The pool closes them on its own once idle; the engine sees them go.
    eventually(
        "no pooled connection left at the engine",
        Duration::from_secs(10),
        || {
            let n = a.open_chat_connections.load(Ordering::SeqCst);
            async move { n == 0 }
        },
    )
    .await;
}

#[tokio::test]
async fn an_engine_that_hangs_forever_stranded_its_requests() {
    let hung: Handler = Arc::new(|_, path| match path {
        "/v1/chat/completions" => None,
        _ => engine_handler(VLLM_METRICS)("GET", path),
    });
    let hanging = FakeEngine::start(hung).await;
    let healthy = FakeEngine::start(engine_handler(VLLM_METRICS)).await;
    let gw = gateway_for(&[&hanging.address, &healthy.address], |cfg| {
        cfg.policy = kvgate_runtime::config::PolicyChoice::Preset(kvgate_core::Policy::RoundRobin);
        cfg.limits.first_byte_timeout_ms = Some(300);
        for e in &mut cfg.endpoints {
            e.models = vec![MODEL.into()];
        }
    })
    .await;
    for i in 0..4 {
        let started = Instant::now();
        let r = tokio::time::timeout(Duration::from_secs(10), chat(&gw))
            .await
            .expect("answered, not stranded");
        assert_eq!(r.status(), 200, "request {i} retried on the healthy engine");
        assert!(started.elapsed() < Duration::from_secs(5));
    }
    assert!(
        hanging.hits("/v1/chat/completions") >= 1,
        "the hanging engine was tried"
    );
    assert_eq!(healthy.hits("/v1/chat/completions"), 4);
}

#[tokio::test]
async fn redirects_from_engines_were_followed() {
    let trap = FakeEngine::start(engine_handler(VLLM_METRICS)).await;
    let to = format!("http://{}/trap", trap.address);
    let redirecting: Handler = Arc::new(move |_, _| {
        Some((
            StatusCode::TEMPORARY_REDIRECT,
            vec![("location", to.clone())],
            String::new(),
        ))
    });
    let engine = FakeEngine::start(redirecting).await;
    let gw = gateway_for(&[&engine.address], |cfg| {
        cfg.endpoints[0].models = vec![MODEL.into()];
        // Engine-side tokenization: every prompt is sent to the engine's /tokenize first.
        cfg.model_dir = Some("engine".into());
    })
    .await;
    let r = chat(&gw).await;
    assert_eq!(
        r.status(),
        307,
        "the engine's answer is relayed, not followed"
    );
    let models = client()
        .get(format!("http://{}/v1/models", gw.api_addr))
        .send()
        .await
        .unwrap();
    assert_ne!(models.status(), 200);
    eventually(
        "scrapes, discovery, the tokenize probe, /v1/models and a chat went to the engine",
        Duration::from_secs(10),
        || {
            let done = engine.hits("/metrics") >= 3
                && engine.hits("/v1/models") >= 2
                && engine.hits("/v1/chat/completions") >= 1
                && engine.hits("/tokenize") >= 1;
            async move { done }
        },
    )
    .await;
    assert_eq!(
        trap.hits.lock().unwrap().values().sum::<usize>(),
        0,
        "a redirect target was fetched: {:?}",
        trap.hits.lock().unwrap()
    );
}

#[tokio::test]
async fn method_not_allowed_had_an_empty_body() {
    let a = FakeEngine::start(engine_handler(VLLM_METRICS)).await;
    let gw = gateway_for(&[&a.address], |_| {}).await;
    for (method, path) in [
        (reqwest::Method::GET, "/v1/chat/completions"),
        (reqwest::Method::POST, "/v1/models"),
    ] {
        let r = client()
            .request(method.clone(), format!("http://{}{path}", gw.api_addr))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 405, "{method} {path}");
        let v: Value = r.json().await.expect("an OpenAI error body");
        assert_eq!(v["error"]["code"], 405, "{v}");
        assert!(
            v["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty())
        );
    }
}

/// An engine whose stream breaks in the middle of an event (the connection closes short of
/// its response's `content-length`): the client gets the whole events before it, then the
/// error event on a boundary of its own, never the half event glued to it, which no client
/// can parse.
#[tokio::test]
async fn a_stream_broken_mid_event_ends_with_a_parseable_error_event() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    const WHOLE: &str =
        "data: {\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\"}}]}\n\n";
    const HALF: &str = "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Hel";
    // A raw HTTP/1.1 server: hyper will not send a body shorter than its content-length.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap().to_string();
    tokio::spawn(async move {
        loop {
            let Ok((mut sock, _)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") {
                    if sock.read(&mut byte).await.unwrap_or(0) == 0 {
                        return;
                    }
                    head.push(byte[0]);
                }
                let head = String::from_utf8_lossy(&head).to_lowercase();
                let length = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .and_then(|v| v.trim().parse::<usize>().ok())
                    .unwrap_or(0);
                let mut body = vec![0u8; length];
                let _ = sock.read_exact(&mut body).await;
                let answer = if head.starts_with("post /v1/chat/completions") {
                    format!(
                        "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncontent-length: 100000\r\n\r\n{WHOLE}{HALF}"
                    )
                } else {
                    "HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
                        .to_owned()
                };
                let _ = sock.write_all(answer.as_bytes()).await;
                let _ = sock.shutdown().await;
            });
        }
    });
    let gw = gateway_for(&[&address], |cfg| {
        cfg.endpoints[0].models = vec![MODEL.into()];
    })
    .await;
    let r = client()
        .post(format!("http://{}/v1/chat/completions", gw.api_addr))
        // The client asks for usage itself, so nothing is stripped: the stream was relayed
        // frame by frame as it came.
        .json(
            &json!({"model": MODEL, "stream": true, "stream_options": {"include_usage": true},
                      "messages": [{"role": "user", "content": "hello"}]}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let text = String::from_utf8(r.bytes().await.unwrap().to_vec()).unwrap();
    assert!(text.starts_with(WHOLE), "{text}");
    assert!(!text.contains("Hel"), "the half event was relayed: {text}");
    let events: Vec<&str> = text.split("\n\n").filter(|e| !e.is_empty()).collect();
    for e in &events {
        let data = e.strip_prefix("data: ").expect("a data event");
        if data != "[DONE]" {
            serde_json::from_str::<Value>(data).expect("every event parses");
        }
    }
    assert!(events.iter().any(|e| e.contains("\"error\"")), "{text}");
    assert_eq!(events.last(), Some(&"data: [DONE]"));
}

/// An adapter loaded after the engine was discovered (vLLM's `/v1/load_lora_adapter`, a LoRA
/// syncer) is served once `/v1/models` lists it, and one unloaded stops being routed: the
/// model list was read once, at discovery, so such an adapter was answered 404 until restart.
#[tokio::test]
async fn adapters_loaded_later_are_served() {
    let loaded = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let l = loaded.clone();
    let handler: Handler = Arc::new(move |_, path| match path {
        "/v1/models" => {
            let mut data = vec![json!({"id": MODEL, "object": "model", "parent": null})];
            if l.load(Ordering::SeqCst) {
                data.push(json!({"id": "late-adapter", "object": "model", "parent": MODEL}));
            }
            json_answer(json!({"object": "list", "data": data}))
        }
        "/metrics" => Some((StatusCode::OK, vec![], VLLM_METRICS.to_owned())),
        "/v1/chat/completions" => json_answer(chat_completion()),
        _ => Some((StatusCode::NOT_FOUND, vec![], String::new())),
    });
    let engine = FakeEngine::start(handler).await;
    let gw = gateway_for(&[&engine.address], |_| {}).await;
    let ask = |model: &'static str| {
        let api = gw.api_addr;
        async move {
            client()
                .post(format!("http://{api}/v1/chat/completions"))
                .json(&json!({"model": model, "messages": [{"role": "user", "content": "hi"}]}))
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        }
    };
    eventually("the engine discovered", Duration::from_secs(10), || async {
        ask(MODEL).await == 200
    })
    .await;
    assert_eq!(ask("late-adapter").await, 404);
    loaded.store(true, Ordering::SeqCst);
    eventually("the adapter served", Duration::from_secs(30), || async {
        ask("late-adapter").await == 200
    })
    .await;
    loaded.store(false, Ordering::SeqCst);
    eventually("the adapter gone", Duration::from_secs(30), || async {
        ask("late-adapter").await == 404
    })
    .await;
}
