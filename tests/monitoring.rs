//! The shipped monitoring (deploy/grafana/*.json, deploy/prometheus/kvgate-alerts.yml) against
//! real data: real `kvgate sim` engines (one of them failing half its requests with 500), a real
//! `kvgate serve`, a real `kvgate epp` behind a real Envoy, a real Prometheus scraping both every
//! second, and traffic through both data planes. Every query of every dashboard panel and every
//! alert rule's signal must return data, so a renamed metric or a typo in a query fails here
//! instead of in an operator's empty panel or silent alert.
//!
//! Alert rules are written `SIGNAL OP THRESHOLD` (see the rules file's header); the test evaluates
//! SIGNAL (the expression with its trailing comparison removed), which must return at least one
//! finite sample, and the whole expression, which must be valid PromQL against the live server.
//! The injected 500s must also make the 5xx-ratio alert's whole expression name the failing
//! engine, so at least one alert is shown to detect the incident it is written for.
//!
//! Prometheus, promtool and Envoy must be installed (scripts/setup-monitoring-deps.sh,
//! scripts/setup-envoy.sh); the test fails, naming the script, when they are missing.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use kvgate_testkit::envoy::{Envoy, EnvoyOptions};
use kvgate_testkit::process::{
    Proc, SimEngine, TempDir, field, free_port, kvgate, kvgate_serve, spawn_sim,
};
use serde_json::{Value, json};

const BIN: &str = env!("CARGO_BIN_EXE_kvgate");
const MODEL: &str = "meta-llama/Llama-3.1-8B-Instruct";

/// A LoRA adapter only the failing engine serves (see the test).
const FAULTY_ADAPTER: &str = "faulty-lora";
const MONITORING_HINT: &str = "run scripts/setup-monitoring-deps.sh (installs the Debian package prometheus: prometheus and promtool)";
/// What `$__rate_interval` becomes: Grafana's value for a 1 s scrape interval and a short time
/// range is 4 s; 15 s keeps enough samples that every rate window holds traffic.
const RATE_INTERVAL: &str = "15s";
/// Every query must have returned data within this long after traffic started.
const DATA_WITHIN: Duration = Duration::from_secs(45);

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// `kvgate sim` at time scale 10 with `extra` flags; returns the process and its engines.
fn sim(engines: usize, extra: &[&str]) -> (Proc, Vec<SimEngine>) {
    let mut args = vec!["--time-scale", "10", "--enable-prompt-tokens-details"];
    args.extend(extra);
    spawn_sim(BIN, engines, &args)
}

fn endpoint_flags(engines: &[&SimEngine], cmd: &mut Command) {
    for e in engines {
        cmd.args(e.flags());
    }
}

/// Starts Prometheus scraping `targets` (job name → address) every second with the shipped
/// rules loaded, on a free loopback port (Prometheus cannot listen on port 0, so a port is taken
/// and released first; a lost race is retried with another).
async fn prometheus(
    client: &reqwest::Client,
    targets: &[(&str, SocketAddr)],
    rules: &Path,
) -> (Proc, String) {
    for _ in 0..3 {
        let dir = TempDir::new("monitoring-prometheus");
        let mut cfg = format!(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 900ms\n  evaluation_interval: 1s\nrule_files:\n  - {}\nscrape_configs:\n",
            rules.display()
        );
        for (job, addr) in targets {
            cfg.push_str(&format!(
                "  - job_name: {job}\n    static_configs:\n      - targets: [\"{addr}\"]\n"
            ));
        }
        std::fs::write(dir.path().join("prometheus.yml"), cfg).expect("prometheus config");
        let port = free_port();
        let mut cmd = Command::new("prometheus");
        cmd.arg(format!(
            "--config.file={}",
            dir.path().join("prometheus.yml").display()
        ))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.path().join("data").display()
        ))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .arg("--log.level=warn");
        let mut p = Proc::spawn("prometheus", cmd).owning(dir);
        let base = format!("http://127.0.0.1:{port}");
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if p.try_wait().is_some() {
                break; // most likely the port was taken meanwhile: try another
            }
            assert!(
                Instant::now() < deadline,
                "prometheus not ready in 30 s\n{}",
                p.tail()
            );
            if let Ok(r) = client.get(format!("{base}/-/ready")).send().await
                && r.status().is_success()
            {
                return (p, base);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        eprintln!("prometheus exited at start, retrying\n{}", p.tail());
    }
    panic!("prometheus did not start in 3 tries");
}

/// Percent-encodes a form value (RFC 3986 unreserved characters stay).
fn form_encode(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Runs an instant query; `Err` says why it is not usable (error status or bad JSON).
async fn query(client: &reqwest::Client, base: &str, expr: &str) -> Result<Vec<Value>, String> {
    let resp = client
        .post(format!("{base}/api/v1/query"))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(format!("query={}", form_encode(expr)))
        .send()
        .await
        .map_err(|e| format!("request: {e}"))?;
    let body: Value = resp.json().await.map_err(|e| format!("body: {e}"))?;
    if body["status"] != "success" {
        return Err(format!("{}: {}", body["errorType"], body["error"]));
    }
    Ok(body["data"]["result"]
        .as_array()
        .cloned()
        .unwrap_or_default())
}

/// Whether some sample of an instant vector is a finite number.
fn has_finite(result: &[Value]) -> bool {
    result.iter().any(|s| {
        s["value"][1]
            .as_str()
            .and_then(|v| v.parse::<f64>().ok())
            .is_some_and(f64::is_finite)
    })
}

/// Splits `SIGNAL OP NUMBER` at its trailing comparison.
fn split_threshold(expr: &str) -> Option<(&str, &str, f64)> {
    let expr = expr.trim_end();
    let num_start = expr
        .rfind(|c: char| !(c.is_ascii_digit() || c == '.' || c == 'e' || c == '-' || c == '+'))
        .map(|i| i + 1)?;
    let threshold: f64 = expr[num_start..].parse().ok()?;
    let rest = expr[..num_start].trim_end();
    for op in [">=", "<=", "==", "!=", ">", "<"] {
        if let Some(signal) = rest.strip_suffix(op) {
            return Some((signal.trim_end(), op, threshold));
        }
    }
    None
}

/// Every panel target of every dashboard, with Grafana's variables replaced: `$job` and
/// `$endpoint` by "all" (as the dashboards' `allValue` does), `$__rate_interval` by
/// [`RATE_INTERVAL`]. Keyed by "file: panel / refId".
fn dashboard_queries() -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let dir = repo().join("deploy/grafana");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .expect("deploy/grafana")
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no dashboard in {}", dir.display());
    for f in files {
        let dash: Value =
            serde_json::from_str(&std::fs::read_to_string(&f).unwrap()).expect("dashboard JSON");
        let vars: Vec<(String, String)> = dash["templating"]["list"]
            .as_array()
            .expect("templating.list")
            .iter()
            .filter(|v| v["type"] == "query")
            .map(|v| {
                let all = v["allValue"]
                    .as_str()
                    .expect("query variables have an allValue");
                (v["name"].as_str().unwrap().to_owned(), all.to_owned())
            })
            .collect();
        let mut panels: Vec<&Value> = Vec::new();
        for p in dash["panels"].as_array().expect("panels") {
            panels.push(p);
            if let Some(inner) = p["panels"].as_array() {
                panels.extend(inner);
            }
        }
        let name = f.file_name().unwrap().to_string_lossy().into_owned();
        for p in panels {
            for t in p["targets"].as_array().into_iter().flatten() {
                let mut expr = t["expr"].as_str().expect("prometheus target").to_owned();
                expr = expr.replace("$__rate_interval", RATE_INTERVAL);
                for (var, all) in &vars {
                    expr = expr
                        .replace(&format!("${{{var}}}"), all)
                        .replace(&format!("${var}"), all);
                }
                assert!(!expr.contains('$'), "unsubstituted variable in {expr}");
                out.insert(
                    format!("{name}: {} / {}", p["title"].as_str().unwrap(), t["refId"]),
                    expr,
                );
            }
        }
    }
    out
}

/// The alert rules: name → whole expression.
fn alert_rules() -> BTreeMap<String, String> {
    let path = repo().join("deploy/prometheus/kvgate-alerts.yml");
    let doc: serde_norway::Value =
        serde_norway::from_str(&std::fs::read_to_string(&path).unwrap()).expect("rules YAML");
    let mut out = BTreeMap::new();
    for g in doc["groups"].as_sequence().expect("groups") {
        for r in g["rules"].as_sequence().expect("rules") {
            if let Some(name) = r["alert"].as_str() {
                out.insert(name.to_owned(), r["expr"].as_str().unwrap().to_owned());
            }
        }
    }
    assert!(!out.is_empty(), "no alert rules");
    out
}

fn chat(system: &str, user: &str, stream: bool) -> Value {
    let mut body = json!({
        "model": MODEL,
        "messages": [{"role": "system", "content": system}, {"role": "user", "content": user}],
        "max_tokens": 12,
        "stream": stream,
    });
    if stream {
        body["stream_options"] = json!({"include_usage": true});
    }
    body
}

/// Sends conversations over three shared system prompts (so prefixes repeat and the caches hit)
/// to both data planes until `stop`, plus requests the data planes answer themselves (bad JSON,
/// unknown model). Pacing leaves the two CPUs to the processes under test.
async fn traffic(client: reqwest::Client, bases: Vec<String>, stop: Arc<AtomicBool>) -> u64 {
    let systems: Vec<String> = (0..3)
        .map(|i| {
            format!(
                "You are assistant number {i}. Answer questions about the weather, the sea and \
                 the mountains in long, careful sentences, citing the instruments you would use, \
                 the units they measure in and the errors they make, for every single reply."
            )
        })
        .collect();
    let mut sent = 0u64;
    let mut n = 0usize;
    while !stop.load(Ordering::Relaxed) {
        for base in &bases {
            let url = format!("{base}/v1/chat/completions");
            let body = chat(
                &systems[n % 3],
                &format!("question {n}"),
                !n.is_multiple_of(4),
            );
            if let Ok(r) = client.post(&url).json(&body).send().await {
                let _ = r.bytes().await;
                sent += 1;
            }
            if n.is_multiple_of(5) {
                let mut body = chat(&systems[n % 3], &format!("question {n}"), false);
                body["model"] = json!(FAULTY_ADAPTER);
                if let Ok(r) = client.post(&url).json(&body).send().await {
                    let _ = r.bytes().await;
                    sent += 1;
                }
            }
            if n.is_multiple_of(10) {
                for bad in [
                    r#"{"model": "#.to_owned(),
                    json!({"model": "no-such-model", "prompt": "hi"}).to_string(),
                ] {
                    let _ = client
                        .post(&url)
                        .header("content-type", "application/json")
                        .body(bad)
                        .send()
                        .await;
                }
            }
        }
        n += 1;
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    sent
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_dashboard_query_and_alert_signal_returns_data_from_real_kvgate() {
    for (tool, args) in [
        ("promtool", vec!["--version"]),
        ("prometheus", vec!["--version"]),
    ] {
        let ok = Command::new(tool)
            .args(&args)
            .output()
            .is_ok_and(|o| o.status.success());
        assert!(ok, "{tool} not found: {MONITORING_HINT}");
    }
    let rules_file = repo().join("deploy/prometheus/kvgate-alerts.yml");
    let check = Command::new("promtool")
        .args(["check", "rules"])
        .arg(&rules_file)
        .output()
        .expect("promtool runs");
    assert!(
        check.status.success(),
        "promtool check rules failed:\n{}{}",
        String::from_utf8_lossy(&check.stdout),
        String::from_utf8_lossy(&check.stderr)
    );
    let check = Command::new("promtool")
        .args(["check", "config"])
        .arg(repo().join("deploy/prometheus/prometheus.yml"))
        .output()
        .expect("promtool runs");
    assert!(
        check.status.success(),
        "promtool check config failed:\n{}{}",
        String::from_utf8_lossy(&check.stdout),
        String::from_utf8_lossy(&check.stderr)
    );

    let panels = dashboard_queries();
    let alerts = alert_rules();
    let mut signals = BTreeMap::new();
    for (name, expr) in &alerts {
        let (signal, _, _) = split_threshold(expr).unwrap_or_else(|| {
            panic!(
                "alert {name} is not `SIGNAL OP THRESHOLD` (the rules file's convention): {expr}"
            )
        });
        signals.insert(name.clone(), signal.to_owned());
    }

    let client = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let (_sim, healthy) = sim(2, &[]);
    // One engine fails half of its requests with 500 before any byte: upstream errors, retries
    // and client-visible 5xx are real series, and the 5xx alert has something to detect. It
    // alone serves the adapter `traffic` asks for now and then, so some requests have no other
    // engine to be retried on or routed to: client-visible 5xx through both the gateway and
    // the picker whichever engines the picker's policy keeps the base model's prompts on (it
    // kept them off the failing engine for all 45 s in a CI run).
    let (_faulty_sim, faulty) = sim(
        1,
        &[
            "--error-rate",
            "0.5",
            "--error-status",
            "500",
            "--lora-adapters",
            FAULTY_ADAPTER,
        ],
    );
    let fleet: Vec<&SimEngine> = healthy.iter().chain(faulty.iter()).collect();
    let faulty_endpoint = faulty[0].http.clone();

    let mut cmd = kvgate_serve(BIN);
    cmd.args(["--scrape-interval-ms", "100"])
        // Round-robin, so the failing engine is certain to get a third of serve's requests (and
        // the 5xx, retry and upstream-error series exist). Under kvgate's policy this sequential
        // traffic of three system prompts stays on whichever engines first cached them, which
        // left the failing engine without a single request in about a third of runs. The picker
        // keeps kvgate's default policy, so its series cover that one.
        .args(["--policy", "round-robin"]);
    endpoint_flags(&fleet, &mut cmd);
    let mut serve = Proc::spawn("kvgate serve", cmd);
    let (serve_api, serve_admin) = serve.wait_gateway_addrs(Duration::from_secs(20));

    let mut cmd = kvgate(BIN);
    cmd.args(["epp", "--host", "127.0.0.1", "--grpc-port", "0"])
        .args(["--grpc-health-port", "0", "--metrics-port", "0"])
        .args(["--scrape-interval-ms", "100"]);
    endpoint_flags(&fleet, &mut cmd);
    let mut epp = Proc::spawn("kvgate epp", cmd);
    let line = epp.wait_line("kvgate endpoint picker listening", Duration::from_secs(20));
    let (grpc, health, epp_metrics): (SocketAddr, SocketAddr, SocketAddr) = (
        field(&line, "grpc_addr"),
        field(&line, "health_addr"),
        field(&line, "metrics_addr"),
    );
    // Serving once every endpoint's models are known.
    serve.wait_line("endpoint discovered", Duration::from_secs(20));
    // Envoy as the reference deployment configures it; one listener and one worker leave the
    // two CPUs to the processes under test.
    let envoy = Envoy::launch(
        grpc,
        health,
        EnvoyOptions {
            direct_listener: false,
            concurrency: 1,
            ..EnvoyOptions::default()
        },
    )
    .await;
    let envoy_addr = envoy.picked;
    let (prom, prom_base) = prometheus(
        &client,
        &[("kvgate-serve", serve_admin), ("kvgate-epp", epp_metrics)],
        &rules_file,
    )
    .await;

    let stop = Arc::new(AtomicBool::new(false));
    let load = tokio::spawn(traffic(
        client.clone(),
        vec![
            format!("http://{serve_api}"),
            format!("http://{envoy_addr}"),
        ],
        stop.clone(),
    ));

    // Eventually every query has data; each round re-evaluates what is still missing.
    let started = Instant::now();
    let mut missing: BTreeMap<String, String> = BTreeMap::new();
    loop {
        missing.clear();
        for (what, expr) in panels.iter().map(|(k, e)| (format!("panel {k}"), e)).chain(
            signals
                .iter()
                .map(|(k, e)| (format!("alert {k} (signal)"), e)),
        ) {
            match query(&client, &prom_base, expr).await {
                Ok(r) if has_finite(&r) => {}
                Ok(r) => {
                    missing.insert(what, format!("{expr}\n    -> {}", Value::Array(r)));
                }
                Err(e) => {
                    missing.insert(what, format!("{expr}\n    -> error {e}"));
                }
            }
        }
        // Both data planes must be in the data, not just one of them.
        for job in ["kvgate-serve", "kvgate-epp"] {
            let expr =
                format!("sum(rate(kvgate_gateway_decisions_total{{job=\"{job}\"}}[1m])) > 0");
            if !matches!(query(&client, &prom_base, &expr).await, Ok(r) if has_finite(&r)) {
                missing.insert(format!("decisions from {job}"), expr);
            }
        }
        // The injected 500s must make the 5xx alert's whole expression name the faulty engine.
        let expr = &alerts["KvgateUpstream5xxRatioHigh"];
        match query(&client, &prom_base, expr).await {
            Ok(r)
                if r.iter()
                    .any(|s| s["metric"]["endpoint"] == faulty_endpoint.as_str()) => {}
            other => {
                missing.insert(
                    format!("KvgateUpstream5xxRatioHigh detecting {faulty_endpoint}"),
                    format!("{expr}\n    -> {other:?}"),
                );
            }
        }
        if missing.is_empty() || started.elapsed() > DATA_WITHIN {
            break;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }

    // Whole alert expressions are valid PromQL against the live server, and Prometheus itself
    // loaded and evaluated every rule without error.
    for (name, expr) in &alerts {
        if let Err(e) = query(&client, &prom_base, expr).await {
            missing.insert(format!("alert {name} (whole expression)"), e);
        }
    }
    let rules: Value = client
        .get(format!("{prom_base}/api/v1/rules"))
        .send()
        .await
        .expect("rules API")
        .json()
        .await
        .expect("rules JSON");
    let loaded: Vec<&Value> = rules["data"]["groups"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|g| g["rules"].as_array().into_iter().flatten())
        .collect();
    assert_eq!(
        loaded.len(),
        alerts.len(),
        "rules Prometheus loaded: {rules}"
    );
    for r in loaded {
        if r["health"] != "ok" {
            missing.insert(format!("rule {} health", r["name"]), r.to_string());
        }
    }

    stop.store(true, Ordering::Relaxed);
    let sent = load.await.expect("traffic task");
    if !missing.is_empty() {
        let report: Vec<String> = missing
            .iter()
            .map(|(k, v)| format!("{k}:\n    {v}"))
            .collect();
        panic!(
            "{} of {} queries returned no data after {:?} ({sent} requests sent):\n{}\n{}\n{}\n{}\n{}",
            missing.len(),
            panels.len() + signals.len(),
            started.elapsed(),
            report.join("\n"),
            serve.tail(),
            epp.tail(),
            envoy.tail(),
            prom.tail()
        );
    }
    eprintln!(
        "{} panel queries and {} alert signals returned data after {:?} ({sent} requests)",
        panels.len(),
        signals.len(),
        started.elapsed()
    );
}

#[test]
fn split_threshold_takes_the_trailing_comparison_only() {
    assert_eq!(
        split_threshold("max by (job) (x{mode=\"a\"}) == 1\n"),
        Some(("max by (job) (x{mode=\"a\"})", "==", 1.0))
    );
    assert_eq!(
        split_threshold("(a > 0 and on (j) b)\n> 120"),
        Some(("(a > 0 and on (j) b)", ">", 120.0))
    );
    assert_eq!(
        split_threshold("rate(x[5m]) >= 0.05"),
        Some(("rate(x[5m])", ">=", 0.05))
    );
    assert_eq!(split_threshold("rate(x[5m])"), None);
}
