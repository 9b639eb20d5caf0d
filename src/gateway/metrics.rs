//! The gateway's Prometheus metrics. Labels are bounded: the ModelCache's
//! model (the gateway's own setting, never the request's `model` field),
//! the layer and the outcome from fixed sets. Never a tenant, a prompt, a
//! key or an error string.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// What happened to a request (the `x-modelcache` header's value).
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum Outcome {
    /// Answered from the exact layer.
    Hit,
    /// Answered from the semantic layer.
    SemanticHit,
    /// Answered by the upstream, and stored where it could be.
    Miss,
    /// Answered by the upstream without the caches (sampling, `n` > 1, a
    /// body that is not a request, another endpoint).
    Bypass,
    /// Answered from another identical request's upstream call.
    Coalesced,
}

impl Outcome {
    /// The value of the `x-modelcache` header.
    pub fn header(self) -> &'static str {
        match self {
            Outcome::SemanticHit => "semantic-hit",
            other => other.label(),
        }
    }

    fn layer(self) -> Layer {
        match self {
            Outcome::SemanticHit => Layer::Semantic,
            Outcome::Bypass => Layer::None,
            _ => Layer::Exact,
        }
    }
}

/// The cache layer a request went through.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum Layer {
    /// The exact layer.
    Exact,
    /// The semantic layer.
    Semantic,
    /// None.
    None,
}

/// What failed when the cache could not help (the request was answered
/// from the upstream all the same).
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum CacheErrorKind {
    /// Redis refused or could not be reached.
    Unavailable,
    /// Redis took longer than the latency budget.
    Timeout,
    /// An entry was not in the gateway's format.
    Garbage,
    /// The registry names no active version yet.
    NoVersion,
}

/// Which cache operation failed.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum Operation {
    /// A lookup.
    Read,
    /// A store.
    Write,
}

/// Prompt or completion tokens.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum TokenKind {
    /// Input tokens.
    Prompt,
    /// Output tokens.
    Completion,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    model: String,
    layer: Layer,
    outcome: Outcome,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LayerLabels {
    model: String,
    layer: Layer,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ModelLabels {
    model: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TokenLabels {
    model: String,
    kind: TokenKind,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ErrorLabels {
    model: String,
    operation: Operation,
    kind: CacheErrorKind,
}

/// Labels in Prometheus's snake case, not the variants' names.
macro_rules! label_values {
    ($($ty:ident { $($variant:ident => $label:literal),+ $(,)? })+) => {$(
        impl $ty {
            /// The value as a metric label.
            pub fn label(self) -> &'static str {
                match self { $($ty::$variant => $label),+ }
            }
        }
        impl EncodeLabelValue for $ty {
            fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
                std::fmt::Write::write_str(encoder, self.label())
            }
        }
    )+};
}

label_values! {
    Outcome { Hit => "hit", SemanticHit => "semantic_hit", Miss => "miss", Bypass => "bypass", Coalesced => "coalesced" }
    Layer { Exact => "exact", Semantic => "semantic", None => "none" }
    CacheErrorKind { Unavailable => "unavailable", Timeout => "timeout", Garbage => "garbage", NoVersion => "no_version" }
    Operation { Read => "read", Write => "write" }
    TokenKind { Prompt => "prompt", Completion => "completion" }
}

type FloatCounter = Counter<f64, AtomicU64>;

/// Prices per 1,000 tokens, for the estimated cost saved.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Price {
    /// Per 1,000 prompt tokens.
    pub input_per_1k: f64,
    /// Per 1,000 completion tokens.
    pub output_per_1k: f64,
}

/// The metric names, as Prometheus sees them (for the dashboard's check).
pub const NAMES: [&str; 7] = [
    "modelcache_gateway_requests_total",
    "modelcache_gateway_hit_latency_seconds",
    "modelcache_gateway_upstream_latency_seconds",
    "modelcache_gateway_tokens_saved_total",
    "modelcache_gateway_cost_saved_total",
    "modelcache_gateway_coalesced_total",
    "modelcache_gateway_cache_errors_total",
];

/// Counts since the last report, which every gateway adds to the model's
/// counters in Redis for the controller's status.
#[derive(Debug, Default)]
struct Totals {
    requests: AtomicU64,
    hits: AtomicU64,
    tokens_saved: AtomicU64,
    cost_saved_micros: AtomicU64,
}

/// One report's counts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Report {
    /// Chat and completions requests through the caches (bypasses left out).
    pub requests: u64,
    /// Of them, answered without an upstream call.
    pub hits: u64,
    /// Prompt plus completion tokens saved.
    pub tokens_saved: u64,
    /// Estimated cost saved, in millionths.
    pub cost_saved_micros: u64,
}

impl Report {
    /// The hash fields and increments.
    pub fn fields(&self) -> [(&'static str, u64); 4] {
        [
            ("requests", self.requests),
            ("hits", self.hits),
            ("tokens_saved", self.tokens_saved),
            ("cost_saved_micros", self.cost_saved_micros),
        ]
    }

    /// Whether there is nothing to report.
    pub fn is_empty(&self) -> bool {
        self.fields().iter().all(|(_, n)| *n == 0)
    }
}

/// The gateway's metrics.
pub struct Metrics {
    totals: Totals,
    model: String,
    price: Price,
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    hit_latency: Family<LayerLabels, Histogram>,
    upstream_latency: Family<ModelLabels, Histogram>,
    tokens_saved: Family<TokenLabels, Counter>,
    cost_saved: Family<ModelLabels, FloatCounter>,
    coalesced: Family<ModelLabels, Counter>,
    errors: Family<ErrorLabels, Counter>,
}

fn latency_histogram() -> Histogram {
    Histogram::new([
        0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    ])
}

impl Metrics {
    /// Every series of `model` registered, at 0.
    pub fn new(model: &str, price: Price) -> Metrics {
        let mut registry = Registry::with_prefix("modelcache_gateway");
        let requests = Family::<RequestLabels, Counter>::default();
        let hit_latency =
            Family::<LayerLabels, Histogram>::new_with_constructor(latency_histogram as fn() -> _);
        let upstream_latency =
            Family::<ModelLabels, Histogram>::new_with_constructor(latency_histogram as fn() -> _);
        let tokens_saved = Family::<TokenLabels, Counter>::default();
        let cost_saved = Family::<ModelLabels, FloatCounter>::default();
        let coalesced = Family::<ModelLabels, Counter>::default();
        let errors = Family::<ErrorLabels, Counter>::default();
        registry.register(
            "requests",
            "Chat and completions requests, by layer and outcome",
            requests.clone(),
        );
        registry.register(
            "hit_latency_seconds",
            "Time to answer a request from the cache",
            hit_latency.clone(),
        );
        registry.register(
            "upstream_latency_seconds",
            "Time until the upstream's response head",
            upstream_latency.clone(),
        );
        registry.register(
            "tokens_saved",
            "Tokens the upstream did not process because the cache answered",
            tokens_saved.clone(),
        );
        registry.register(
            "cost_saved",
            "Estimated upstream cost saved, at the configured prices",
            cost_saved.clone(),
        );
        registry.register(
            "coalesced",
            "Requests answered from another identical request's upstream call",
            coalesced.clone(),
        );
        registry.register(
            "cache_errors",
            "Cache operations that failed (the request was answered from the upstream)",
            errors.clone(),
        );
        let metrics = Metrics {
            totals: Totals::default(),
            model: model.to_owned(),
            price,
            registry,
            requests,
            hit_latency,
            upstream_latency,
            tokens_saved,
            cost_saved,
            coalesced,
            errors,
        };
        metrics.zeroes();
        metrics
    }

    /// Every series exists from the start, so rate() and alerts work
    /// before the first event.
    fn zeroes(&self) {
        use Outcome::*;
        for outcome in [Hit, SemanticHit, Miss, Bypass, Coalesced] {
            let _ = self.requests.get_or_create(&self.request_labels(outcome));
        }
        for kind in [TokenKind::Prompt, TokenKind::Completion] {
            let _ = self.tokens_saved.get_or_create(&self.token_labels(kind));
        }
        let _ = self.cost_saved.get_or_create(&self.model_labels());
        let _ = self.coalesced.get_or_create(&self.model_labels());
        for operation in [Operation::Read, Operation::Write] {
            for kind in [
                CacheErrorKind::Unavailable,
                CacheErrorKind::Timeout,
                CacheErrorKind::Garbage,
                CacheErrorKind::NoVersion,
            ] {
                let _ = self
                    .errors
                    .get_or_create(&self.error_labels(operation, kind));
            }
        }
        let _ = self.upstream_latency.get_or_create(&self.model_labels());
        for layer in [Layer::Exact, Layer::Semantic] {
            let _ = self.hit_latency.get_or_create(&LayerLabels {
                model: self.model.clone(),
                layer,
            });
        }
    }

    fn request_labels(&self, outcome: Outcome) -> RequestLabels {
        RequestLabels {
            model: self.model.clone(),
            layer: outcome.layer(),
            outcome,
        }
    }

    fn model_labels(&self) -> ModelLabels {
        ModelLabels {
            model: self.model.clone(),
        }
    }

    fn token_labels(&self, kind: TokenKind) -> TokenLabels {
        TokenLabels {
            model: self.model.clone(),
            kind,
        }
    }

    fn error_labels(&self, operation: Operation, kind: CacheErrorKind) -> ErrorLabels {
        ErrorLabels {
            model: self.model.clone(),
            operation,
            kind,
        }
    }

    /// The counts since the last call (the report to send).
    pub fn take_report(&self) -> Report {
        let t = &self.totals;
        Report {
            requests: t.requests.swap(0, Ordering::Relaxed),
            hits: t.hits.swap(0, Ordering::Relaxed),
            tokens_saved: t.tokens_saved.swap(0, Ordering::Relaxed),
            cost_saved_micros: t.cost_saved_micros.swap(0, Ordering::Relaxed),
        }
    }

    /// Puts back a report that could not be sent, for the next one.
    pub fn restore_report(&self, r: Report) {
        let t = &self.totals;
        t.requests.fetch_add(r.requests, Ordering::Relaxed);
        t.hits.fetch_add(r.hits, Ordering::Relaxed);
        t.tokens_saved.fetch_add(r.tokens_saved, Ordering::Relaxed);
        t.cost_saved_micros
            .fetch_add(r.cost_saved_micros, Ordering::Relaxed);
    }

    /// Counts a request by outcome; a hit's latency too.
    pub fn request(&self, outcome: Outcome, hit_latency: Option<Duration>) {
        if outcome != Outcome::Bypass {
            self.totals.requests.fetch_add(1, Ordering::Relaxed);
        }
        if matches!(
            outcome,
            Outcome::Hit | Outcome::SemanticHit | Outcome::Coalesced
        ) {
            self.totals.hits.fetch_add(1, Ordering::Relaxed);
        }
        self.requests
            .get_or_create(&self.request_labels(outcome))
            .inc();
        if outcome == Outcome::Coalesced {
            self.coalesced.get_or_create(&self.model_labels()).inc();
        }
        if let Some(latency) = hit_latency {
            self.hit_latency
                .get_or_create(&LayerLabels {
                    model: self.model.clone(),
                    layer: outcome.layer(),
                })
                .observe(latency.as_secs_f64());
        }
    }

    /// Counts the time to an upstream's response head.
    pub fn upstream(&self, latency: Duration) {
        self.upstream_latency
            .get_or_create(&self.model_labels())
            .observe(latency.as_secs_f64());
    }

    /// Counts tokens the upstream did not process, and their price.
    pub fn saved(&self, usage: super::response::Usage) {
        self.tokens_saved
            .get_or_create(&self.token_labels(TokenKind::Prompt))
            .inc_by(usage.prompt);
        self.tokens_saved
            .get_or_create(&self.token_labels(TokenKind::Completion))
            .inc_by(usage.completion);
        let cost = usage.prompt as f64 / 1000.0 * self.price.input_per_1k
            + usage.completion as f64 / 1000.0 * self.price.output_per_1k;
        self.cost_saved
            .get_or_create(&self.model_labels())
            .inc_by(cost);
        self.totals
            .tokens_saved
            .fetch_add(usage.prompt + usage.completion, Ordering::Relaxed);
        self.totals
            .cost_saved_micros
            .fetch_add((cost * 1e6).round() as u64, Ordering::Relaxed);
    }

    /// Counts a failed cache operation.
    pub fn cache_error(&self, operation: Operation, kind: CacheErrorKind) {
        self.errors
            .get_or_create(&self.error_labels(operation, kind))
            .inc();
    }

    /// The text exposition format.
    pub fn encode(&self) -> String {
        crate::admin::exposition(&self.registry)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_series_is_there_from_the_start_with_bounded_labels() {
        let m = Metrics::new("smollm2", Price::default());
        let text = m.encode();
        for name in NAMES {
            assert!(text.contains(name), "{name} missing:\n{text}");
        }
        assert!(text.contains(
            r#"modelcache_gateway_requests_total{model="smollm2",layer="exact",outcome="hit"} 0"#
        ));
        m.request(Outcome::Hit, Some(Duration::from_micros(300)));
        m.saved(super::super::response::Usage {
            prompt: 1000,
            completion: 500,
        });
        let text = m.encode();
        assert!(text.contains(
            r#"modelcache_gateway_requests_total{model="smollm2",layer="exact",outcome="hit"} 1"#
        ));
        assert!(text.contains(
            r#"modelcache_gateway_tokens_saved_total{model="smollm2",kind="completion"} 500"#
        ));
    }

    #[test]
    fn cost_saved_at_the_configured_prices() {
        let m = Metrics::new(
            "gpt",
            Price {
                input_per_1k: 0.03,
                output_per_1k: 0.06,
            },
        );
        m.saved(super::super::response::Usage {
            prompt: 2000,
            completion: 1000,
        });
        let text = m.encode();
        let line = text
            .lines()
            .find(|l| l.starts_with("modelcache_gateway_cost_saved_total{"))
            .unwrap();
        let value: f64 = line.rsplit(' ').next().unwrap().parse().unwrap();
        assert!((value - 0.12).abs() < 1e-9, "{line}");
    }
}
