//! Engine mode: prime an OpenAI-compatible engine's prefix cache.
//!
//! Each prompt is sent once with `max_tokens: 1` (its latency is the cold
//! time to first token); right after, the same prompt with a short suffix
//! measures the warmed TTFT. Then the warmer checks how many prefixes the
//! engine still holds, probing from the most recently warmed back (for an LRU
//! cache that counts exactly what it retains without evicting anything
//! unprobed). Some engines keep very few: llama.cpp's server (and
//! llama-cpp-python's) keeps only the last prompt's state by default. When
//! prefixes were lost the warmer says so and warms again in reverse order, so
//! that the first prompt, the most important, is the one held. Engines that
//! expose prefix-cache counters on `/metrics` (vLLM, SGLang) have them
//! reported before and after.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures::StreamExt as _;
use serde::Serialize;

/// Why warming an engine failed.
/// Each variant is documented by its message.
#[derive(Debug, thiserror::Error)]
#[allow(missing_docs)]
pub enum WarmError {
    #[error(
        "failed to reach the engine at {url} within {seconds} s; is it starting? check --engine-url and the engine's logs"
    )]
    Unreachable { url: String, seconds: u64 },
    #[error("failed to warm: the engine at {url} answered {status} to a completion: {body}")]
    Refused {
        url: String,
        status: u16,
        body: String,
    },
    #[error("failed to warm: the request to {url} failed")]
    Request {
        url: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("failed to serve readiness on {addr}")]
    Serve {
        addr: std::net::SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("failed to install the SIGTERM handler")]
    Signal(#[source] std::io::Error),
    #[error("failed to build the HTTP client")]
    Client(#[source] reqwest::Error),
}

impl WarmError {
    /// The process exit code for this error.
    pub fn exit_code(&self) -> u8 {
        match self {
            WarmError::Unreachable { .. } => 3,
            WarmError::Refused { .. } | WarmError::Request { .. } => 4,
            WarmError::Serve { .. } | WarmError::Signal(_) | WarmError::Client(_) => 1,
        }
    }
}

/// What one prefix cost cold and warm.
#[derive(Debug, Clone, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PrefixReport {
    /// The prefix's position in the prompts file.
    pub index: usize,
    /// Its length in characters.
    pub chars: usize,
    /// Time to first token before warming.
    pub cold_ms: f64,
    /// Time to first token of a request sharing the prefix, once warm.
    pub warm_ms: f64,
    /// Still warm when all prompts had been sent.
    pub retained: bool,
}

/// One warm-up.
#[derive(Debug, Clone, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct WarmReport {
    /// The engine's base URL.
    pub engine: String,
    /// Each prefix's figures.
    pub prefixes: Vec<PrefixReport>,
    /// Prefixes the engine kept in its cache (warm clearly faster than cold).
    pub retained: usize,
    /// Set when the engine keeps fewer prefixes than were warmed.
    pub warning: Option<String>,
    /// Prefix-cache counters from the engine's `/metrics`, before and after.
    pub engine_metrics: Vec<(String, f64, f64)>,
    /// Wall time.
    pub seconds: f64,
}

/// The prefix-cache series of a Prometheus exposition: vLLM's
/// `vllm:prefix_cache_queries_total` and `vllm:prefix_cache_hits_total`,
/// SGLang's `sglang:cache_hit_rate`. A sample is `name{labels} value
/// [timestamp]`; label values may hold spaces.
pub fn prefix_cache_counters(text: &str) -> Vec<(String, f64)> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let split = match l.rfind('}') {
                Some(end) => end + 1,
                None => l.find(' ')?,
            };
            let (name, rest) = l.split_at(split);
            let value = rest.split_whitespace().next()?.parse().ok()?;
            let base = name.split('{').next().unwrap_or(name);
            (base.contains("prefix_cache") || base.contains("cache_hit"))
                .then(|| (name.trim().to_string(), value))
        })
        .collect()
}

/// A probe counts as warm below this share of the cold time.
const WARM_SHARE: f64 = 0.5;

/// Warms an OpenAI-compatible engine's prefix cache.
pub struct EngineWarmer {
    client: reqwest::Client,
    base: String,
    model: Option<String>,
    prompts: Vec<String>,
    concurrency: usize,
}

impl EngineWarmer {
    /// A warmer of `engine_url` with these prompts.
    pub fn new(
        engine_url: &str,
        model: Option<String>,
        prompts: Vec<String>,
        concurrency: usize,
    ) -> Result<Self, WarmError> {
        let client = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(600))
            .build()
            .map_err(WarmError::Client)?;
        Ok(EngineWarmer {
            client,
            base: engine_url.trim_end_matches('/').to_string(),
            model,
            prompts,
            concurrency: concurrency.max(1),
        })
    }

    /// Whether the engine answers `GET /v1/models`.
    pub async fn is_up(&self) -> bool {
        matches!(
            self.client
                .get(format!("{}/v1/models", self.base))
                .timeout(Duration::from_secs(5))
                .send()
                .await,
            Ok(r) if r.status().is_success()
        )
    }

    /// Wait for the engine, with backoff, up to `max_wait`.
    pub async fn wait_for_engine(&self, max_wait: Duration) -> Result<(), WarmError> {
        let deadline = Instant::now() + max_wait;
        let mut delay = Duration::from_millis(100);
        loop {
            if self.is_up().await {
                return Ok(());
            }
            if Instant::now() + delay > deadline {
                return Err(WarmError::Unreachable {
                    url: self.base.clone(),
                    seconds: max_wait.as_secs(),
                });
            }
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_secs(2));
        }
    }

    /// Latency of a one-token completion of `prompt`, in ms: with one token,
    /// the time to first token plus one step.
    async fn completion_ms(&self, prompt: &str) -> Result<f64, WarmError> {
        let url = format!("{}/v1/completions", self.base);
        let mut body = serde_json::json!({"prompt": prompt, "max_tokens": 1, "temperature": 0});
        if let Some(model) = &self.model {
            body["model"] = serde_json::Value::String(model.clone());
        }
        let started = Instant::now();
        let response = self
            .client
            .post(&url)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(body.to_string())
            .send()
            .await
            .map_err(|source| WarmError::Request {
                url: url.clone(),
                source,
            })?;
        let status = response.status();
        let text = response.text().await.unwrap_or_default();
        if !status.is_success() {
            return Err(WarmError::Refused {
                url,
                status: status.as_u16(),
                body: text.chars().take(300).collect(),
            });
        }
        Ok(started.elapsed().as_secs_f64() * 1000.0)
    }

    async fn prefix_metrics(&self) -> Vec<(String, f64)> {
        let Ok(r) = self
            .client
            .get(format!("{}/metrics", self.base))
            .send()
            .await
        else {
            return Vec::new();
        };
        prefix_cache_counters(&r.text().await.unwrap_or_default())
    }

    /// Warm every prompt, measure, check retention, and re-warm in priority
    /// order when the engine lost prefixes.
    pub async fn warm(&self) -> Result<WarmReport, WarmError> {
        let started = Instant::now();
        let before = self.prefix_metrics().await;
        // An engine's first request pays one-time costs (allocations, kernel
        // selection) that would pass for prefill and make a later miss look
        // like a hit.
        self.completion_ms("Hello").await?;
        // Cold then warm for each prompt, `concurrency` prompts at a time.
        let measured: Vec<Result<(usize, f64, f64), WarmError>> =
            futures::stream::iter(self.prompts.iter().enumerate())
                .map(|(i, p)| async move {
                    let cold = self.completion_ms(p).await?;
                    let warm = self.completion_ms(&format!("{p} ?")).await?;
                    Ok((i, cold, warm))
                })
                .buffered(self.concurrency)
                .collect()
                .await;
        let mut prefixes = Vec::with_capacity(measured.len());
        for m in measured {
            let (index, cold_ms, warm_ms) = m?;
            prefixes.push(PrefixReport {
                index,
                chars: self.prompts[index].chars().count(),
                cold_ms: round(cold_ms),
                warm_ms: round(warm_ms),
                retained: false,
            });
        }
        // Retention, most recently warmed first.
        for p in prefixes.iter_mut().rev() {
            let probe = self
                .completion_ms(&format!("{} ?", self.prompts[p.index]))
                .await?;
            p.retained = probe < WARM_SHARE * p.cold_ms;
            if !p.retained {
                break;
            }
        }
        let retained = prefixes.iter().filter(|p| p.retained).count();
        let mut warning = None;
        if retained < prefixes.len() {
            let message = format!(
                "the engine kept {retained} of {} warmed prefixes; its prefix cache is smaller than the prompts (llama.cpp's server keeps only the last prompt unless its prompt cache is enabled, e.g. llama-cpp-python's --cache true); warming again so that the first prompts are the ones held",
                prefixes.len()
            );
            tracing::warn!("{message}");
            warning = Some(message);
            for p in self.prompts.iter().rev() {
                self.completion_ms(p).await?;
            }
        }
        let after = self.prefix_metrics().await;
        let engine_metrics = after
            .into_iter()
            .map(|(name, a)| {
                let b = before
                    .iter()
                    .find(|(n, _)| *n == name)
                    .map_or(0.0, |(_, v)| *v);
                (name, b, a)
            })
            .collect();
        Ok(WarmReport {
            engine: self.base.clone(),
            prefixes,
            retained,
            warning,
            engine_metrics,
            seconds: (started.elapsed().as_secs_f64() * 1000.0).round() / 1000.0,
        })
    }
}

fn round(ms: f64) -> f64 {
    (ms * 10.0).round() / 10.0
}

/// What the sidecar's endpoints show.
#[derive(Default)]
pub struct SidecarState {
    /// Whether the engine is warm.
    pub ready: AtomicBool,
    /// Warm-ups completed.
    pub warmups: AtomicU64,
    /// The last warm-up's report.
    pub last: parking_lot::Mutex<Option<WarmReport>>,
}

/// Run as a sidecar: wait for the engine, warm, turn ready; when the engine
/// stops answering, turn unready, and warm again once it is back.
pub async fn run_sidecar(
    warmer: EngineWarmer,
    state: Arc<SidecarState>,
    check_interval: Duration,
) -> Result<(), WarmError> {
    loop {
        warmer
            .wait_for_engine(Duration::from_secs(u64::MAX / 4))
            .await?;
        let report = warmer.warm().await;
        match report {
            Ok(report) => {
                tracing::info!(
                    retained = report.retained,
                    prefixes = report.prefixes.len(),
                    "warm: {}",
                    serde_json::to_string(&report).unwrap_or_default()
                );
                *state.last.lock() = Some(report);
                state.warmups.fetch_add(1, Ordering::Relaxed);
                state.ready.store(true, Ordering::Release);
            }
            Err(e) => {
                tracing::warn!("warm-up failed, retrying: {e}");
                tokio::time::sleep(check_interval).await;
                continue;
            }
        }
        // Watch the engine; a restart loses its cache.
        loop {
            tokio::time::sleep(check_interval).await;
            if !warmer.is_up().await {
                tracing::warn!("the engine stopped answering; unready until it is back and warm");
                state.ready.store(false, Ordering::Release);
                break;
            }
        }
    }
}

/// The native sidecar: serves `/readyz` on `addr` while [`run_sidecar`]
/// keeps the engine warm, until SIGTERM or Ctrl-C (a clean exit: the pod is
/// going away).
pub async fn serve_sidecar(
    warmer: EngineWarmer,
    addr: std::net::SocketAddr,
    check_interval: Duration,
) -> Result<(), WarmError> {
    let serve_error = |source| WarmError::Serve { addr, source };
    let state = Arc::new(SidecarState::default());
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(serve_error)?;
    let server = axum::serve(listener, router(state.clone()));
    let sidecar = run_sidecar(warmer, state, check_interval);
    let stop = crate::signal::shutdown().map_err(WarmError::Signal)?;
    tokio::select! {
        r = server => r.map_err(serve_error),
        r = sidecar => r,
        _ = stop => Ok(()),
    }
}

/// `/readyz` (200 once warm, 503 before and while re-warming), `/healthz`,
/// and `/report` (the last warm-up as JSON).
pub fn router(state: Arc<SidecarState>) -> axum::Router {
    use axum::http::StatusCode;
    use axum::routing::get;
    let ready = state.clone();
    let report = state.clone();
    axum::Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route(
            "/readyz",
            get(move || {
                let ready = ready.clone();
                async move {
                    if ready.ready.load(Ordering::Acquire) {
                        (StatusCode::OK, "warm")
                    } else {
                        (StatusCode::SERVICE_UNAVAILABLE, "warming")
                    }
                }
            }),
        )
        .route(
            "/report",
            get(move || {
                let report = report.clone();
                async move {
                    let body = serde_json::json!({
                        "warmups": report.warmups.load(Ordering::Relaxed),
                        "ready": report.ready.load(Ordering::Acquire),
                        "last": *report.last.lock(),
                    });
                    (
                        [(axum::http::header::CONTENT_TYPE, "application/json")],
                        body.to_string(),
                    )
                }
            }),
        )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vllm_and_sglang_prefix_cache_series_are_read() {
        let text = r#"# HELP vllm:prefix_cache_queries_total Prefix cache queries, in terms of number of queried tokens.
# TYPE vllm:prefix_cache_queries_total counter
vllm:prefix_cache_queries_total{engine="0",model_name="meta-llama/Llama-3.1-8B-Instruct"} 1024.0
vllm:prefix_cache_hits_total{engine="0",model_name="meta-llama/Llama-3.1-8B-Instruct"} 768.0
vllm:num_requests_running{engine="0",model_name="m"} 1.0
sglang:cache_hit_rate{model_name="a model with spaces"} 0.5 1732780800000
sglang:num_running_reqs{model_name="m"} 0.0
"#;
        let got = prefix_cache_counters(text);
        assert_eq!(got.len(), 3, "{got:?}");
        assert_eq!(got[0].1, 1024.0);
        assert!(got[1].0.starts_with("vllm:prefix_cache_hits_total{"));
        assert_eq!(
            got[2],
            (
                r#"sglang:cache_hit_rate{model_name="a model with spaces"}"#.to_string(),
                0.5
            )
        );
    }
}
