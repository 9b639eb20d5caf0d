//! The gateway's HTTP server: chat and completions requests through the
//! exact layer, everything else passed to the upstream unchanged, and the
//! probes and metrics on a port of their own.
//!
//! The cache never fails a request. A lookup that errs, returns garbage or
//! takes longer than the latency budget is a miss (counted); a store
//! happens after the answer and off its path; with no Redis at all the
//! gateway is a plain proxy. An upstream error reaches the client unchanged
//! and is never stored.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::{Bytes, BytesMut};
use futures::StreamExt;
use serde_json::{Value, json};
use tokio::sync::watch;

use super::control::Controls;
use super::flight::{End, Flight, Flights, Head, Join, Reader};
use super::metrics::{CacheErrorKind, Metrics, Operation, Outcome};
use super::request::{self, Endpoint, Scope};
use super::response::{self, Form, Stored};
use super::sse;
use crate::cache::semantic::{Lookup, SemanticCache, SemanticConfig};
use crate::cache::{Connection, Versions, codec};
use crate::keyspace::keys::{self, Layer};

/// The headers the gateway adds to its answers.
pub mod headers {
    /// What happened: `hit`, `semantic-hit`, `miss`, `bypass`, `coalesced`.
    pub const OUTCOME: &str = "x-modelcache";
    /// On hits: the prompt plus completion tokens the upstream did not
    /// process (the body's `usage` is the stored one, so budgets that sum
    /// `usage` see what the answer cost once).
    pub const TOKENS_SAVED: &str = "x-modelcache-tokens-saved";
    /// On semantic hits: the similarity of the stored question.
    pub const SIMILARITY: &str = "x-modelcache-similarity";
}

/// Who may use the gateway's cache, and with whom they share it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sharing {
    /// Each credential has its own entries; callers without one share the
    /// anonymous scope.
    PerCredential,
    /// Like `PerCredential`, but a request without a credential is refused
    /// (401).
    CredentialRequired,
    /// Every caller shares one scope (an explicit opt-in).
    Shared,
}

/// How the gateway runs.
#[derive(Clone)]
pub struct Config {
    /// The model of the ModelCache: its keys' model, the metrics' label.
    pub model: String,
    /// The upstream's base URL (`http://127.0.0.1:8000`); the request's path
    /// and query are appended.
    pub upstream: url::Url,
    /// The key the gateway sends upstream instead of the caller's
    /// `Authorization` (an external API); `None` passes the caller's.
    pub upstream_key: Option<String>,
    /// The gateway's own secret: scopes are HMACs under it.
    pub secret: Vec<u8>,
    /// Scopes.
    pub sharing: Sharing,
    /// Cache sampled requests (temperature > 0) and `n` > 1 too.
    pub allow_sampling: bool,
    /// Entries expire after this long; `None` keeps them until evicted or
    /// swept.
    pub ttl: Option<Duration>,
    /// A lookup slower than this is a miss.
    pub latency_budget: Duration,
    /// A store slower than this is given up (counted).
    pub store_timeout: Duration,
    /// The largest request body read (413 above).
    pub max_request_bytes: usize,
    /// Answers larger than this are relayed but not stored.
    pub max_entry_bytes: usize,
    /// Ask a streaming upstream for the usage chunk even when the client did
    /// not (it is dropped from what the client sees), so that streamed
    /// answers carry their token counts too.
    pub upstream_usage: bool,
    /// Which version's entries are read and written.
    pub versions: Versions,
    /// The semantic layer, where one is configured.
    pub semantic: Option<SemanticLayer>,
}

/// The semantic layer's model and decision.
#[derive(Clone)]
pub struct SemanticLayer {
    /// The embedding model (all-MiniLM-L6-v2 or another BERT).
    pub embedder: Arc<crate::model::bert::SentenceEmbedder>,
    /// The threshold (from the CachePolicy, calibrated), TTL and bound.
    pub config: SemanticConfig,
}

/// The exact layer's connection, once Redis has been reached.
pub fn connection<C: Clone>(backend: &watch::Receiver<Option<Backend<C>>>) -> Option<C> {
    backend.borrow().as_ref().map(|b| b.conn.clone())
}

/// What the gateway reaches Redis through, once it can.
#[derive(Clone)]
pub struct Backend<C> {
    /// The exact layer's connection.
    pub conn: C,
    /// The semantic layer's cache, once its index is built.
    pub semantic: Option<SemanticCache<C>>,
}

impl Config {
    /// A gateway for `model` in front of `upstream`, at the defaults: per
    /// credential, deterministic requests only, no expiry, a 20 ms budget.
    pub fn new(model: &str, upstream: url::Url, secret: Vec<u8>, versions: Versions) -> Config {
        Config {
            model: model.to_owned(),
            upstream,
            upstream_key: None,
            secret,
            sharing: Sharing::PerCredential,
            allow_sampling: false,
            ttl: None,
            latency_budget: Duration::from_millis(20),
            store_timeout: Duration::from_secs(1),
            max_request_bytes: 4 << 20,
            max_entry_bytes: 4 << 20,
            upstream_usage: true,
            versions,
            semantic: None,
        }
    }
}

/// A running gateway's shared state.
pub struct Gateway<C> {
    config: Config,
    redis: watch::Receiver<Option<Backend<C>>>,
    http: reqwest::Client,
    flights: Arc<Flights>,
    metrics: Arc<Metrics>,
}

/// Why the gateway cannot start.
#[derive(Debug, thiserror::Error)]
#[allow(missing_docs)]
pub enum GatewayError {
    #[error("failed to build the upstream HTTP client")]
    Client(#[source] reqwest::Error),
    #[error("failed to listen on {addr}")]
    Listen {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("failed to serve on {addr}")]
    Serve {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

impl<C: Connection> Gateway<C> {
    /// A gateway whose Redis connection arrives through `redis` (`None`
    /// until connected: a gateway without Redis is a plain proxy).
    pub fn new(
        config: Config,
        redis: watch::Receiver<Option<Backend<C>>>,
        metrics: Arc<Metrics>,
    ) -> Result<Arc<Gateway<C>>, GatewayError> {
        let http = reqwest::Client::builder()
            .pool_max_idle_per_host(1024)
            .tcp_nodelay(true)
            .build()
            .map_err(GatewayError::Client)?;
        Ok(Arc::new(Gateway {
            config,
            redis,
            http,
            flights: Arc::default(),
            metrics,
        }))
    }

    /// The serving router: chat and completions through the caches,
    /// anything else passed through.
    pub fn router(self: &Arc<Self>) -> Router {
        Router::new()
            .fallback(handle::<C>)
            .with_state(Arc::clone(self))
    }
}

/// `/healthz`, `/readyz` and `/metrics`.
pub fn admin_router(metrics: Arc<Metrics>) -> Router {
    crate::admin::router(move || metrics.encode())
}

/// Listens on `addr`.
pub async fn bind(addr: SocketAddr) -> Result<tokio::net::TcpListener, GatewayError> {
    tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| GatewayError::Listen { addr, source })
}

/// Serves `router` on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: tokio::net::TcpListener,
    router: Router,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), GatewayError> {
    use axum::serve::ListenerExt;
    let addr = listener
        .local_addr()
        .unwrap_or(SocketAddr::from(([0, 0, 0, 0], 0)));
    // Small writes (an SSE event, the end of a body) go out at once instead
    // of waiting for the client's acknowledgement of the one before.
    let listener = listener.tap_io(|tcp| {
        let _ = tcp.set_nodelay(true);
    });
    axum::serve(listener, router)
        .with_graceful_shutdown(shutdown)
        .await
        .map_err(|source| GatewayError::Serve { addr, source })
}

async fn handle<C: Connection>(State(gw): State<Arc<Gateway<C>>>, req: Request) -> Response {
    let endpoint = Endpoint::of_path(req.uri().path()).filter(|_| req.method() == Method::POST);
    let Some(endpoint) = endpoint else {
        return gw.forward(req).await;
    };
    let (parts, body) = req.into_parts();
    let body = match axum::body::to_bytes(body, gw.config.max_request_bytes).await {
        Ok(body) => body,
        Err(_) => {
            return error_response(
                StatusCode::PAYLOAD_TOO_LARGE,
                &format!(
                    "the request body is larger than {} bytes (or was cut off); send a smaller \
                     request",
                    gw.config.max_request_bytes
                ),
            );
        }
    };
    gw.cached(endpoint, parts, body).await
}

/// A JSON error in OpenAI's shape.
fn error_response(status: StatusCode, message: &str) -> Response {
    let body =
        json!({"error": {"message": message, "type": "modelcache_error", "code": status.as_u16()}});
    (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response()
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Headers that belong to one connection, not to the message.
fn hop_by_hop(name: &HeaderName) -> bool {
    matches!(
        name.as_str(),
        "connection"
            | "keep-alive"
            | "proxy-authenticate"
            | "proxy-authorization"
            | "proxy-connection"
            | "te"
            | "trailer"
            | "transfer-encoding"
            | "upgrade"
            | "host"
            | "content-length"
    )
}

fn set_header(headers: &mut HeaderMap, name: &'static str, value: impl ToString) {
    if let Ok(v) = HeaderValue::from_str(&value.to_string()) {
        headers.insert(HeaderName::from_static(name), v);
    }
}

impl<C: Connection> Gateway<C> {
    /// The client's request (`parts`) as the gateway sends it upstream: the
    /// same method, path, query and headers, less those of the connection.
    fn upstream_request(&self, parts: &Parts, body: reqwest::Body) -> reqwest::RequestBuilder {
        let mut url = self.config.upstream.clone();
        let base = url.path().trim_end_matches('/').to_owned();
        url.set_path(&format!("{base}{}", parts.uri.path()));
        url.set_query(parts.uri.query());
        let mut headers = HeaderMap::new();
        copy_headers(&parts.headers, &mut headers);
        if let Some(key) = &self.config.upstream_key
            && let Ok(v) = HeaderValue::from_str(&format!("Bearer {key}"))
        {
            headers.insert(header::AUTHORIZATION, v);
        }
        self.http
            .request(parts.method.clone(), url)
            .headers(headers)
            .body(body)
    }

    /// Passes a request to the upstream and its answer back, both streamed.
    async fn forward(&self, req: Request) -> Response {
        let (parts, body) = req.into_parts();
        let body = reqwest::Body::wrap_stream(body.into_data_stream());
        self.relay(self.upstream_request(&parts, body)).await
    }

    async fn relay(&self, request: reqwest::RequestBuilder) -> Response {
        let started = Instant::now();
        match request.send().await {
            Ok(resp) => {
                self.metrics.upstream(started.elapsed());
                let mut out = Response::builder().status(resp.status());
                if let Some(headers) = out.headers_mut() {
                    copy_headers(resp.headers(), headers);
                }
                out.body(Body::from_stream(resp.bytes_stream()))
                    .unwrap_or_else(|_| StatusCode::BAD_GATEWAY.into_response())
            }
            Err(e) => upstream_unreachable(&e),
        }
    }

    async fn cached(&self, endpoint: Endpoint, parts: Parts, body: Bytes) -> Response {
        let started = Instant::now();
        let Ok(value) = serde_json::from_slice::<Value>(&body) else {
            return self.bypass(&parts, body).await;
        };
        let authorization = parts
            .headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok());
        let scope = match self.config.sharing {
            Sharing::Shared => Scope::Shared,
            _ => request::scope(authorization, &self.config.secret),
        };
        if scope == Scope::Anonymous && self.config.sharing == Sharing::CredentialRequired {
            return error_response(
                StatusCode::UNAUTHORIZED,
                "this gateway requires an Authorization header: send your API key",
            );
        }
        if request::bypass(&value, self.config.allow_sampling).is_some() {
            return self.bypass(&parts, body).await;
        }
        let Some(version) = self.config.versions.current() else {
            self.metrics
                .cache_error(Operation::Read, CacheErrorKind::NoVersion);
            return self.bypass(&parts, body).await;
        };
        let Some(digest) = request::key_digest(endpoint, &value) else {
            return self.bypass(&parts, body).await;
        };
        let key = keys::entry(
            &self.config.model,
            &version,
            Layer::Response,
            &crate::digest::sha256_hex(format!("{}\n{digest}", scope.tag()).as_bytes()),
        );
        let controls = Controls::parse(
            parts
                .headers
                .get_all(header::CACHE_CONTROL)
                .iter()
                .filter_map(|v| v.to_str().ok()),
        );
        let delivery = Delivery::of(endpoint, &value);
        if !controls.no_cache
            && let Some(stored) = self.lookup(&key).await
            && controls.accepts(stored.age(now()))
        {
            return self.answer_hit(stored, delivery, started, Outcome::Hit);
        }
        let mut semantic = None;
        if !controls.no_cache
            && let Some((found, asked)) = self.semantic_lookup(endpoint, &value, &scope).await
        {
            match found {
                Some((stored, similarity)) if controls.accepts(stored.age(now())) => {
                    return self.semantic_hit(stored, similarity, delivery, started);
                }
                _ => semantic = Some(asked),
            }
        }
        let (flight, outcome) = if controls.no_cache {
            (Flight::alone(), Outcome::Miss)
        } else {
            match self.flights.join(&key) {
                Join::Leader(f) => (f, Outcome::Miss),
                Join::Follower(f) => (f, Outcome::Coalesced),
            }
        };
        let reader = flight.reader();
        if outcome == Outcome::Miss {
            let upstream_body = self.upstream_body(&value, delivery, body);
            let request = self.upstream_request(&parts, reqwest::Body::from(upstream_body));
            let driver = Driver {
                flight,
                store: (!controls.no_store).then(|| key.clone()),
                key,
                semantic: semantic.filter(|_| !controls.no_store),
            };
            tokio::spawn(driver.run(self.driver_context(), request));
        }
        self.metrics.request(outcome, None);
        answer_from_flight(reader, delivery, outcome).await
    }

    /// The body sent upstream: the client's, with the usage chunk asked
    /// for on streams when [`Config::upstream_usage`] says so.
    fn upstream_body(&self, value: &Value, delivery: Delivery, body: Bytes) -> Bytes {
        if !delivery.stream || delivery.include_usage || !self.config.upstream_usage {
            return body;
        }
        let mut value = value.clone();
        value["stream_options"] = json!({"include_usage": true});
        Bytes::from(value.to_string())
    }

    async fn bypass(&self, parts: &Parts, body: Bytes) -> Response {
        self.metrics.request(Outcome::Bypass, None);
        let mut resp = self
            .relay(self.upstream_request(parts, reqwest::Body::from(body)))
            .await;
        set_header(
            resp.headers_mut(),
            headers::OUTCOME,
            Outcome::Bypass.header(),
        );
        resp
    }

    /// The stored answer under `key`; `None` on a miss and on any failure
    /// (counted), so the request goes upstream.
    async fn lookup(&self, key: &str) -> Option<Stored> {
        let Some(mut conn) = connection(&self.redis) else {
            self.metrics
                .cache_error(Operation::Read, CacheErrorKind::Unavailable);
            return None;
        };
        let mut cmd = redis::cmd("GET");
        let get = cmd.arg(key).query_async::<Option<Vec<u8>>>(&mut conn);
        let found = match tokio::time::timeout(self.config.latency_budget, get).await {
            Ok(Ok(found)) => found?,
            Ok(Err(_)) => {
                self.metrics
                    .cache_error(Operation::Read, CacheErrorKind::Unavailable);
                return None;
            }
            Err(_) => {
                self.metrics
                    .cache_error(Operation::Read, CacheErrorKind::Timeout);
                return None;
            }
        };
        let stored = codec::decode(&found).and_then(|v| Stored::from_json(&v));
        if stored.is_none() {
            self.metrics
                .cache_error(Operation::Read, CacheErrorKind::Garbage);
        }
        stored
    }

    fn semantic_hit(
        &self,
        stored: Stored,
        similarity: f32,
        delivery: Delivery,
        started: Instant,
    ) -> Response {
        let mut resp = self.answer_hit(stored, delivery, started, Outcome::SemanticHit);
        set_header(
            resp.headers_mut(),
            headers::SIMILARITY,
            format!("{similarity:.4}"),
        );
        resp
    }

    fn answer_hit(
        &self,
        stored: Stored,
        delivery: Delivery,
        started: Instant,
        outcome: Outcome,
    ) -> Response {
        let usage = stored.form.usage();
        let mut resp = delivery.render(&stored.form, StatusCode::OK);
        let headers = resp.headers_mut();
        set_header(headers, headers::OUTCOME, outcome.header());
        set_header(headers, "age", stored.age(now()));
        if let Some(usage) = usage {
            set_header(
                headers,
                headers::TOKENS_SAVED,
                usage.prompt + usage.completion,
            );
            self.metrics.saved(usage);
        }
        self.metrics.request(outcome, Some(started.elapsed()));
        resp
    }

    /// The semantic layer's lookup: `None` when it does not apply (not
    /// configured, no question, no cache yet, the embedding failed);
    /// otherwise the answer found, if any, and what to store the upstream's
    /// answer under.
    async fn semantic_lookup(
        &self,
        endpoint: Endpoint,
        value: &Value,
        scope: &Scope,
    ) -> Option<(Option<(Stored, f32)>, SemanticStore<C>)> {
        let layer = self.config.semantic.as_ref()?;
        let question = super::semantic::in_space(
            layer.embedder.fingerprint(),
            super::semantic::question(endpoint, value, scope)?,
        );
        let Some(cache) = self
            .redis
            .borrow()
            .as_ref()
            .and_then(|b| b.semantic.clone())
        else {
            self.metrics
                .cache_error(Operation::Read, CacheErrorKind::Unavailable);
            return None;
        };
        let embedder = Arc::clone(&layer.embedder);
        let text = question.text.clone();
        // Embedding is CPU work of milliseconds: off the async workers.
        let vector = tokio::task::spawn_blocking(move || embedder.embed(&[text]))
            .await
            .ok()?
            .ok()?
            .pop()?;
        let lookup = cache.lookup_in(&question.partition, &question.text, &vector);
        let found = match tokio::time::timeout(self.config.latency_budget, lookup).await {
            Ok(Ok(Lookup::Hit(hit))) => match Stored::from_json(&hit.answer) {
                Some(stored) => Some((stored, hit.similarity)),
                None => {
                    self.metrics
                        .cache_error(Operation::Read, CacheErrorKind::Garbage);
                    None
                }
            },
            // Per-entry verification is for library callers that can judge
            // an answer; the gateway treats it as a miss.
            Ok(Ok(Lookup::Verify(_) | Lookup::Miss)) => None,
            Ok(Err(crate::cache::CacheError::NoVersion { .. })) => {
                self.metrics
                    .cache_error(Operation::Read, CacheErrorKind::NoVersion);
                None
            }
            Ok(Err(_)) => {
                self.metrics
                    .cache_error(Operation::Read, CacheErrorKind::Unavailable);
                None
            }
            Err(_) => {
                self.metrics
                    .cache_error(Operation::Read, CacheErrorKind::Timeout);
                None
            }
        };
        let store = SemanticStore {
            cache,
            partition: question.partition,
            text: question.text,
            vector,
        };
        Some((found, store))
    }

    fn driver_context(&self) -> DriverContext<C> {
        DriverContext {
            redis: self.redis.clone(),
            metrics: Arc::clone(&self.metrics),
            flights: Arc::clone(&self.flights),
            ttl: self.config.ttl,
            store_timeout: self.config.store_timeout,
            max_entry_bytes: self.config.max_entry_bytes,
        }
    }
}

/// What a flight's driver needs of the gateway; it outlives the request
/// that started it.
struct DriverContext<C> {
    redis: watch::Receiver<Option<Backend<C>>>,
    metrics: Arc<Metrics>,
    flights: Arc<Flights>,
    ttl: Option<Duration>,
    store_timeout: Duration,
    max_entry_bytes: usize,
}

/// Where a semantic-layer miss stores the upstream's answer.
struct SemanticStore<C> {
    cache: SemanticCache<C>,
    partition: String,
    text: String,
    vector: Vec<f32>,
}

/// The task that makes a flight's upstream call, feeds its readers, and
/// stores a complete answer.
struct Driver<C> {
    flight: Arc<Flight>,
    /// The entry's key; `None` with `no-store`.
    store: Option<String>,
    key: String,
    /// The semantic layer's entry too, where the request had one.
    semantic: Option<SemanticStore<C>>,
}

/// What a driver keeps of an answer to store it: its payloads or its body,
/// up to the size limit.
struct Kept {
    limit: usize,
    size: usize,
    over: bool,
    chunks: Vec<String>,
    body: BytesMut,
    done: bool,
}

impl Kept {
    fn new(limit: usize) -> Kept {
        Kept {
            limit,
            size: 0,
            over: false,
            chunks: Vec::new(),
            body: BytesMut::new(),
            done: false,
        }
    }

    fn fits(&mut self, n: usize) -> bool {
        self.size += n;
        self.over |= self.size > self.limit;
        !self.over
    }

    fn body(&mut self, bytes: &[u8]) {
        if self.fits(bytes.len()) {
            self.body.extend_from_slice(bytes);
        }
    }

    fn event(&mut self, event: &sse::Event) {
        match event.data.as_deref() {
            Some(sse::DONE) => self.done = true,
            Some(data) if self.fits(data.len()) => self.chunks.push(data.to_owned()),
            _ => {}
        }
    }

    /// The answer, if it is complete and may be stored.
    fn form(self, events: bool) -> Option<Form> {
        if self.over {
            return None;
        }
        if events {
            response::check_chunks(&self.chunks, self.done).ok()?;
            return Some(Form::Chunks(self.chunks));
        }
        let body: Value = serde_json::from_slice(&self.body).ok()?;
        response::check_body(200, &body).ok()?;
        Some(Form::Body(body))
    }
}

impl<C: Connection> Driver<C> {
    async fn run(self, ctx: DriverContext<C>, request: reqwest::RequestBuilder) {
        let _guard = self.flight.guard();
        let form = self.call(&ctx, request).await;
        if let (Some(form), Some(key)) = (&form, &self.store) {
            let stored = Stored {
                created: now(),
                form: form.clone(),
            };
            store(&ctx, key, &stored).await;
            if let Some(semantic) = &self.semantic {
                store_semantic(&ctx, semantic, &stored).await;
            }
        }
        ctx.flights.land(&self.key, &self.flight);
        // Every reader but the first was spared an upstream call.
        let spared = self.flight.readers().saturating_sub(1) as u64;
        if let Some(usage) = form.as_ref().and_then(Form::usage)
            && spared > 0
        {
            ctx.metrics.saved(response::Usage {
                prompt: usage.prompt * spared,
                completion: usage.completion * spared,
            });
        }
    }

    /// Makes the call and relays it into the flight; the answer if it may
    /// be stored.
    async fn call(&self, ctx: &DriverContext<C>, request: reqwest::RequestBuilder) -> Option<Form> {
        let started = Instant::now();
        let resp = match request.send().await {
            Ok(resp) => resp,
            Err(e) => {
                let answer = upstream_unreachable(&e);
                let (parts, body) = answer.into_parts();
                self.flight.start(Head {
                    status: parts.status,
                    headers: parts.headers,
                    events: false,
                });
                if let Ok(bytes) = axum::body::to_bytes(body, 1 << 16).await {
                    self.flight.push(sse::Event {
                        raw: bytes,
                        data: None,
                    });
                }
                self.flight.end(End::Complete);
                return None;
            }
        };
        ctx.metrics.upstream(started.elapsed());
        let status = resp.status();
        let events = status == StatusCode::OK
            && resp
                .headers()
                .get(header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .is_some_and(|t| t.starts_with("text/event-stream"));
        let mut headers = HeaderMap::new();
        copy_headers(resp.headers(), &mut headers);
        self.flight.start(Head {
            status,
            headers,
            events,
        });
        let mut kept = Kept::new(ctx.max_entry_bytes);
        let mut parser = sse::Parser::new(ctx.max_entry_bytes);
        let mut body = resp.bytes_stream();
        let mut broken = false;
        while let Some(chunk) = body.next().await {
            let Ok(bytes) = chunk else {
                broken = true;
                break;
            };
            if !events {
                kept.body(&bytes);
                self.flight.push(sse::Event {
                    raw: bytes,
                    data: None,
                });
                continue;
            }
            // An event larger than the limit cannot be relayed event by
            // event: the stream is cut there, as if it broke.
            let Ok(parsed) = parser.push(&bytes) else {
                broken = true;
                break;
            };
            for event in parsed {
                kept.event(&event);
                self.flight.push(event);
            }
        }
        if events && !broken {
            match parser.finish() {
                Ok(parsed) => {
                    for event in parsed {
                        kept.event(&event);
                        self.flight.push(event);
                    }
                }
                Err(_) => broken = true,
            }
            broken |= parser.pending();
        }
        self.flight
            .end(if broken { End::Broken } else { End::Complete });
        if broken || status != StatusCode::OK {
            return None;
        }
        kept.form(events)
    }
}

/// Stores a complete answer in the semantic layer too; a failure is
/// counted, never returned.
async fn store_semantic<C: Connection>(
    ctx: &DriverContext<C>,
    semantic: &SemanticStore<C>,
    stored: &Stored,
) {
    let answer = stored.to_json();
    let put = semantic.cache.put_in(
        &semantic.partition,
        &semantic.text,
        &semantic.vector,
        &answer,
        &Value::Null,
    );
    write_within(ctx, put).await;
}

/// Awaits a store for at most the store timeout, counting a failure.
async fn write_within<C, E>(
    ctx: &DriverContext<C>,
    write: impl std::future::Future<Output = Result<(), E>>,
) {
    let kind = match tokio::time::timeout(ctx.store_timeout, write).await {
        Ok(Ok(())) => return,
        Ok(Err(_)) => CacheErrorKind::Unavailable,
        Err(_) => CacheErrorKind::Timeout,
    };
    ctx.metrics.cache_error(Operation::Write, kind);
}

/// Stores a complete answer under `key`, off the request's path; a failure
/// is counted, never returned.
async fn store<C: Connection>(ctx: &DriverContext<C>, key: &str, stored: &Stored) {
    let Some(mut conn) = connection(&ctx.redis) else {
        ctx.metrics
            .cache_error(Operation::Write, CacheErrorKind::Unavailable);
        return;
    };
    let Ok(value) = codec::encode(&stored.to_json()) else {
        return;
    };
    let mut cmd = redis::cmd("SET");
    cmd.arg(key).arg(value);
    if let Some(ttl) = ctx.ttl {
        cmd.arg("EX").arg(ttl.as_secs().max(1));
    }
    write_within(ctx, cmd.query_async::<()>(&mut conn)).await;
}

/// How a client wants its answer.
#[derive(Debug, Clone, Copy)]
struct Delivery {
    endpoint: Endpoint,
    stream: bool,
    include_usage: bool,
}

impl Delivery {
    fn of(endpoint: Endpoint, value: &Value) -> Delivery {
        Delivery {
            endpoint,
            stream: value.get("stream") == Some(&Value::Bool(true)),
            include_usage: value
                .pointer("/stream_options/include_usage")
                .is_some_and(|v| v == &Value::Bool(true)),
        }
    }

    /// The response for an answer, in the form the client asked for.
    fn render(&self, form: &Form, status: StatusCode) -> Response {
        if self.stream {
            let events = form.events(self.endpoint, self.include_usage);
            let mut body = BytesMut::new();
            for e in events {
                body.extend_from_slice(&e);
            }
            (
                status,
                [
                    (header::CONTENT_TYPE, "text/event-stream"),
                    (header::CACHE_CONTROL, "no-cache"),
                ],
                body.freeze(),
            )
                .into_response()
        } else {
            (
                status,
                [(header::CONTENT_TYPE, "application/json")],
                form.body(self.endpoint).to_string(),
            )
                .into_response()
        }
    }
}

fn copy_headers(from: &HeaderMap, to: &mut HeaderMap) {
    for (name, value) in from {
        if !hop_by_hop(name) {
            to.append(name.clone(), value.clone());
        }
    }
}

fn upstream_unreachable(e: &reqwest::Error) -> Response {
    // The error's text may hold the upstream URL; it is the operator's own
    // setting, never a credential, and helps them find a wrong one.
    let what = if e.is_timeout() {
        "timed out"
    } else if e.is_connect() {
        "could not connect"
    } else {
        "failed"
    };
    error_response(
        StatusCode::BAD_GATEWAY,
        &format!("failed to reach the upstream: the request {what}; check that the engine runs"),
    )
}

/// Answers from a flight whose upstream sent a plain body: as it is (an
/// error, or a client that asked for a plain answer), or split into a
/// stream for a client that asked for one.
async fn answer_plain(
    mut reader: Reader,
    head: Head,
    delivery: Delivery,
    outcome: Outcome,
) -> Response {
    let (pieces, end) = reader.rest().await;
    let mut body = BytesMut::new();
    for p in &pieces {
        body.extend_from_slice(&p.raw);
    }
    if end == End::Broken {
        return error_response(
            StatusCode::BAD_GATEWAY,
            "failed to read the upstream's answer: it broke off",
        );
    }
    let mut resp = if head.status == StatusCode::OK && delivery.stream {
        match serde_json::from_slice(&body) {
            Ok(value) => delivery.render(&Form::Body(value), StatusCode::OK),
            Err(_) => {
                return error_response(
                    StatusCode::BAD_GATEWAY,
                    "failed to read the upstream's answer: it is not JSON",
                );
            }
        }
    } else {
        let mut resp = Response::new(Body::from(body.freeze()));
        *resp.status_mut() = head.status;
        *resp.headers_mut() = head.headers;
        resp
    };
    set_header(resp.headers_mut(), headers::OUTCOME, outcome.header());
    resp
}

/// Answers one request from a flight: a stream relayed as it arrives to a
/// client that asked for one, or assembled once it has ended; a plain body
/// answered once whole, split for a client that asked for a stream.
async fn answer_from_flight(mut reader: Reader, delivery: Delivery, outcome: Outcome) -> Response {
    let Some(head) = reader.head().await else {
        return error_response(
            StatusCode::BAD_GATEWAY,
            "failed to reach the upstream: the call ended without an answer",
        );
    };
    if !head.events {
        // A plain body is of no use to the client before it is whole:
        // answered in one piece, with its length, once it has arrived.
        return answer_plain(reader, head, delivery, outcome).await;
    }
    // An event stream (only ever a 200): relayed event by event to a client
    // that asked for a stream.
    if delivery.stream {
        let include_usage = delivery.include_usage;
        let pieces = futures::stream::unfold(reader, move |mut reader| async move {
            loop {
                match reader.next().await {
                    Ok(piece) => {
                        let usage_only = !include_usage
                            && piece.data.as_deref().is_some_and(response::chunk_is_usage);
                        if !usage_only {
                            return Some((Ok::<Bytes, std::io::Error>(piece.raw), reader));
                        }
                    }
                    Err(End::Complete) => return None,
                    Err(End::Broken) => {
                        return Some((
                            Err(std::io::Error::other("the upstream's answer broke off")),
                            reader,
                        ));
                    }
                }
            }
        })
        // After an error item the stream ends: the client sees the cut.
        .scan(false, |failed, item| {
            let out = if *failed { None } else { Some(item) };
            *failed = out.as_ref().is_some_and(Result::is_err);
            futures::future::ready(out)
        });
        let mut resp = Response::builder().status(head.status);
        if let Some(headers) = resp.headers_mut() {
            *headers = head.headers;
            set_header(headers, headers::OUTCOME, outcome.header());
        }
        return resp
            .body(Body::from_stream(pieces))
            .unwrap_or_else(|_| StatusCode::BAD_GATEWAY.into_response());
    }
    let (pieces, end) = reader.rest().await;
    // A stream for a client that asked for a plain answer: assembled once
    // it has ended.
    if end == End::Broken {
        return error_response(
            StatusCode::BAD_GATEWAY,
            "failed to read the upstream's answer: it broke off",
        );
    }
    let form = Form::Chunks(
        pieces
            .into_iter()
            .filter_map(|p| p.data)
            .filter(|d| d != sse::DONE)
            .collect(),
    );
    let mut resp = delivery.render(&form, StatusCode::OK);
    set_header(resp.headers_mut(), headers::OUTCOME, outcome.header());
    resp
}
