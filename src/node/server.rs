//! The agent's HTTP API, on the node's address. It serves the origin's
//! layout, `/v1/<model>/<version>/<path>` and `manifest.json` beside the
//! files, for the origin named in the `x-modelcache-source` header, to pods
//! that prove who they are with a bearer token. Ranges are served (206), so
//! `modelcache fetch` uses it as it uses any HTTP origin, resumes included.
//!
//! A blob in the node cache is served from disk. A blob still downloading
//! is streamed as its bytes arrive: each response as far as the bytes from
//! its offset on are written, wherever the download's ranges are. Its last
//! byte is held until the agent's own digest matched, so a download that
//! turns out wrong ends every response early instead of completing it.

use std::ops::Range;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use bytes::Bytes;
use futures::Stream;

use super::authorize::{Authorizer, Claim};
use super::fills::{Fill, Fills};
use super::metrics::{Metrics, Served};
use super::prefetch::Prefetcher;
use crate::artifact::fetch::SOURCE_HEADER;
use crate::artifact::manifest::{MANIFEST_NAME, ManifestFile, VerifiedManifest};
use crate::artifact::node_cache::NodeCache;
use crate::artifact::source::Location;
use crate::artifact::transfer::Transfer;

/// Bytes per read and per body chunk.
const CHUNK: usize = 1 << 20;

/// How often a reader of a download in progress looks for new bytes.
const FOLLOW_EVERY: Duration = Duration::from_millis(10);

/// What the handlers share.
pub struct Agent {
    /// Decides who may read.
    pub authorizer: Authorizer,
    /// The node cache.
    pub cache: NodeCache,
    /// The downloads running.
    pub fills: Arc<Fills>,
    /// The metrics.
    pub metrics: Arc<Metrics>,
}

/// The pods' router.
pub fn router(agent: Arc<Agent>) -> Router {
    Router::new()
        .route("/v1/{model}/{version}/{*path}", get(file))
        .with_state(agent)
}

/// `/healthz`, `/readyz`, `/metrics`, and `/v1/prefetch`: where each
/// version this node prefetches stands (JSON).
pub fn admin_router(metrics: Arc<Metrics>, prefetcher: Arc<Prefetcher>) -> Router {
    crate::admin::router(move || metrics.encode()).route(
        "/v1/prefetch",
        get(move || async move {
            // Plain structs of strings and numbers: serializing cannot fail.
            let body = serde_json::to_vec(&prefetcher.report()).unwrap_or_default();
            ([(header::CONTENT_TYPE, "application/json")], body)
        }),
    )
}

fn refuse(status: StatusCode, message: impl std::fmt::Display) -> Response {
    (status, format!("{message}\n")).into_response()
}

async fn file(
    State(agent): State<Arc<Agent>>,
    Path((model, version, path)): Path<(String, String, String)>,
    headers: HeaderMap,
) -> Response {
    let token = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .filter(|t| !t.is_empty());
    let Some(token) = token else {
        let refusal = super::authorize::Refusal::NoToken;
        agent.metrics.refused(refusal.reason());
        return refuse(StatusCode::UNAUTHORIZED, refusal);
    };
    let source_uri = headers.get(SOURCE_HEADER).and_then(|v| v.to_str().ok());
    let Some(location) = source_uri.and_then(|s| s.parse::<Location>().ok()) else {
        return refuse(
            StatusCode::BAD_REQUEST,
            format_args!(
                "the {SOURCE_HEADER} header must name the origin, e.g. s3://bucket/prefix"
            ),
        );
    };
    if let Err(e) = crate::artifact::check_names(&model, &version) {
        return refuse(StatusCode::BAD_REQUEST, e);
    }
    let (source, pod) = match agent
        .authorizer
        .decide(token, &location.to_string(), &model)
        .await
    {
        Ok(Ok(admitted)) => admitted,
        Ok(Err(refusal)) => {
            agent.metrics.refused(refusal.reason());
            tracing::info!(reason = refusal.reason(), "refused a request: {refusal}");
            let status = StatusCode::from_u16(refusal.status()).unwrap_or(StatusCode::FORBIDDEN);
            return refuse(status, refusal);
        }
        Err(e) => {
            let why = crate::error::chain(&e);
            tracing::warn!("could not authorize a request: {why}");
            return refuse(StatusCode::SERVICE_UNAVAILABLE, why);
        }
    };
    let join = || agent.fills.join(&location, &source, &model, &version);
    let id = NodeCache::version_id(&location.to_string(), &model, &version);
    pin(&agent.cache, &id, &pod).await;
    let (manifest, mut fill) = match lookup(&agent.cache, &id).await {
        Some(m) => (m, None),
        None => {
            let fill = join();
            match fill.manifest().await {
                Ok(m) => (m, Some(fill)),
                Err(why) => return refuse(StatusCode::BAD_GATEWAY, why),
            }
        }
    };
    if path == MANIFEST_NAME {
        return (StatusCode::OK, manifest.bytes.clone()).into_response();
    }
    let Some(f) = manifest
        .manifest
        .files
        .iter()
        .find(|f| f.path == path)
        .cloned()
    else {
        return refuse(
            StatusCode::NOT_FOUND,
            format_args!("{path} is not in {model}/{version}"),
        );
    };
    let Ok(range) = requested(&headers, f.size) else {
        return (
            StatusCode::RANGE_NOT_SATISFIABLE,
            [(header::CONTENT_RANGE, format!("bytes */{}", f.size))],
        )
            .into_response();
    };
    if has_blob(&agent.cache, &f).await {
        return from_cache(&agent, &f, range);
    }
    // Missing (evicted, or found changed): the version's download restores it.
    let fill = fill.take().unwrap_or_else(join);
    match fill.transfer(&f.sha256).await {
        Ok(Some(t)) => {
            let span = range_of(range.clone(), f.size);
            respond(&f, range, follow(t, fill, span, agent.metrics.clone()))
        }
        Ok(None) if has_blob(&agent.cache, &f).await => from_cache(&agent, &f, range),
        Ok(None) => refuse(
            StatusCode::SERVICE_UNAVAILABLE,
            format_args!("{path} is not in the node cache yet"),
        ),
        Err(why) => refuse(StatusCode::BAD_GATEWAY, why),
    }
}

/// The version stays in the node cache while the pod it was served to
/// runs: the pod got a copy, not a link, so nothing else pins it.
/// [`super::prefetch`] removes the pin once the pod is gone.
async fn pin(cache: &NodeCache, id: &str, pod: &Claim) {
    let (cache, id, pod) = (cache.clone(), id.to_owned(), pod.clone());
    let pinned = tokio::task::spawn_blocking(move || {
        let about = format!("{}/{}", pod.namespace, pod.pod);
        cache.pin(&id, &pod.uid, &about)
    })
    .await;
    if let Ok(Err(e)) = pinned {
        tracing::warn!(
            "failed to pin a version for its pod: {}",
            crate::error::chain(&e)
        );
    }
}

async fn lookup(cache: &NodeCache, id: &str) -> Option<VerifiedManifest> {
    let (cache, id) = (cache.clone(), id.to_owned());
    let found = tokio::task::spawn_blocking(move || cache.lookup(&id))
        .await
        .ok()?;
    found.map(|(_, m)| m)
}

async fn has_blob(cache: &NodeCache, f: &ManifestFile) -> bool {
    let (cache, f) = (cache.clone(), f.clone());
    tokio::task::spawn_blocking(move || cache.has_blob(&f.sha256, f.size))
        .await
        .unwrap_or(false)
}

/// The single range a `Range: bytes=a-b` (or `a-`) header asks for; `None`
/// without one. `Err` for a range outside the file, or several ranges.
fn requested(headers: &HeaderMap, size: u64) -> Result<Option<Range<u64>>, ()> {
    let Some(value) = headers.get(header::RANGE) else {
        return Ok(None);
    };
    let spec = value
        .to_str()
        .map_err(|_| ())?
        .strip_prefix("bytes=")
        .ok_or(())?;
    let (a, b) = spec.split_once('-').ok_or(())?;
    let start: u64 = a.trim().parse().map_err(|_| ())?;
    let end = match b.trim() {
        "" => size,
        b => b
            .parse::<u64>()
            .map_err(|_| ())?
            .saturating_add(1)
            .min(size),
    };
    if start >= end {
        return Err(());
    }
    Ok(Some(start..end))
}

fn range_of(range: Option<Range<u64>>, size: u64) -> Range<u64> {
    range.unwrap_or(0..size)
}

fn from_cache(agent: &Agent, f: &ManifestFile, range: Option<Range<u64>>) -> Response {
    let file = match std::fs::File::open(agent.cache.blob_path(&f.sha256)) {
        Ok(file) => Arc::new(file),
        Err(e) => {
            return refuse(
                StatusCode::SERVICE_UNAVAILABLE,
                format_args!("failed to open the blob: {e}"),
            );
        }
    };
    let metrics = agent.metrics.clone();
    let span = range_of(range.clone(), f.size);
    let chunks = futures::stream::unfold(span.start, move |at| {
        let (file, metrics) = (file.clone(), metrics.clone());
        let end = span.end;
        async move {
            if at >= end {
                return None;
            }
            let n = ((end - at) as usize).min(CHUNK);
            let read = tokio::task::spawn_blocking(move || read_own(&file, n, at)).await;
            match read {
                Ok(Ok(bytes)) => {
                    metrics.served(Served::Cache, bytes.len() as u64);
                    Some((Ok(bytes), at + n as u64))
                }
                Ok(Err(e)) => Some((Err(e), end)),
                Err(e) => Some((Err(std::io::Error::other(e)), end)),
            }
        }
    });
    respond(f, range, chunks)
}

/// `n` bytes at `at` of a file that only this response reads (its own
/// handle, one read at a time), into a buffer that is not zeroed first: in
/// a profile of a warm pod, zeroing every chunk was 17% of the agent's CPU
/// samples, and the agent took about a tenth less CPU without it.
fn read_own(file: &std::fs::File, n: usize, at: u64) -> std::io::Result<Bytes> {
    use std::io::{Read as _, Seek as _, SeekFrom};
    let mut handle = file;
    handle.seek(SeekFrom::Start(at))?;
    let mut buf = Vec::with_capacity(n);
    handle.take(n as u64).read_to_end(&mut buf)?;
    if buf.len() < n {
        return Err(std::io::ErrorKind::UnexpectedEof.into());
    }
    Ok(buf.into())
}

fn read_exact(file: &std::fs::File, n: usize, at: u64) -> std::io::Result<Bytes> {
    use std::os::unix::fs::FileExt as _;
    let mut buf = vec![0u8; n];
    file.read_exact_at(&mut buf, at)?;
    Ok(buf.into())
}

/// The bytes of a download in progress, as they are written; the last one
/// only once the agent's digest matched.
fn follow(
    t: Arc<Transfer>,
    fill: Arc<Fill>,
    span: Range<u64>,
    metrics: Arc<Metrics>,
) -> impl Stream<Item = std::io::Result<Bytes>> + Send + 'static {
    futures::stream::unfold(span.start, move |at| {
        let (t, fill, metrics) = (t.clone(), fill.clone(), metrics.clone());
        let end = span.end;
        async move {
            loop {
                if at >= end {
                    return None;
                }
                let verified = t.verified();
                if verified == Some(false) {
                    let e = std::io::Error::other("the origin's bytes did not match the manifest");
                    return Some((Err(e), end));
                }
                let written = t.written_from(at);
                let last = t.file.size;
                let limit = match verified {
                    Some(true) => end,
                    _ if end == last => written.min(end - 1),
                    _ => written.min(end),
                };
                if limit > at {
                    let n = ((limit - at) as usize).min(CHUNK);
                    let reader = t.clone();
                    let read =
                        tokio::task::spawn_blocking(move || read_exact(reader.data(), n, at)).await;
                    return match read {
                        Ok(Ok(bytes)) => {
                            metrics.served(Served::Origin, bytes.len() as u64);
                            Some((Ok(bytes), at + n as u64))
                        }
                        Ok(Err(e)) => Some((Err(e), end)),
                        Err(e) => Some((Err(std::io::Error::other(e)), end)),
                    };
                }
                if let Some(why) = fill.failure() {
                    return Some((Err(std::io::Error::other(why)), end));
                }
                if fill.succeeded() && verified != Some(true) {
                    let e = std::io::Error::other("the download ended without this file");
                    return Some((Err(e), end));
                }
                tokio::time::sleep(FOLLOW_EVERY).await;
            }
        }
    })
}

fn respond(
    f: &ManifestFile,
    range: Option<Range<u64>>,
    body: impl Stream<Item = std::io::Result<Bytes>> + Send + 'static,
) -> Response {
    let span = range_of(range.clone(), f.size);
    let mut response = Response::builder()
        .header(header::CONTENT_LENGTH, span.end - span.start)
        .header(header::ACCEPT_RANGES, "bytes");
    response = match range {
        Some(r) => response.status(StatusCode::PARTIAL_CONTENT).header(
            header::CONTENT_RANGE,
            format!("bytes {}-{}/{}", r.start, r.end - 1, f.size),
        ),
        None => response.status(StatusCode::OK),
    };
    response
        .body(Body::from_stream(body))
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn range(value: &str, size: u64) -> Result<Option<Range<u64>>, ()> {
        let mut h = HeaderMap::new();
        h.insert(header::RANGE, value.parse().unwrap());
        requested(&h, size)
    }

    #[test]
    fn single_byte_ranges_are_understood_and_others_refused() {
        assert_eq!(requested(&HeaderMap::new(), 10), Ok(None));
        assert_eq!(range("bytes=0-9", 10), Ok(Some(0..10)));
        assert_eq!(range("bytes=4-", 10), Ok(Some(4..10)));
        assert_eq!(range("bytes=4-100", 10), Ok(Some(4..10)));
        for bad in [
            "bytes=10-",
            "bytes=5-4",
            "bytes=a-b",
            "items=0-1",
            "bytes=-5",
        ] {
            assert_eq!(range(bad, 10), Err(()), "{bad}");
        }
    }
}
