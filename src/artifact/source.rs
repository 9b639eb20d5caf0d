//! Where versions live, and byte ranges of their files: S3 (aws-sdk-s3, the
//! default credential chain), HTTP(S) origins and CDNs (reqwest, with headers
//! and CloudFront signing), or a local directory. Layout everywhere:
//! `<location>/<model>/<version>/<path>` plus `manifest.json` beside the files.

use std::ops::Range;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use aws_sdk_s3::error::{DisplayErrorContext, ProvideErrorMetadata as _, SdkError};
use bytes::Bytes;
use futures::stream::{BoxStream, StreamExt as _};

use super::cloudfront::{self, Signed, Signer};

/// A version's base location, parsed from `--source`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Location {
    /// `s3://bucket/prefix`.
    S3 {
        /// The bucket.
        bucket: String,
        /// The key prefix, without slashes at either end.
        prefix: String,
    },
    /// `https://host/prefix` (or `http://` for tests).
    Http {
        /// The URL every model is under.
        base: url::Url,
    },
    /// `file:///dir`.
    File {
        /// The directory every model is under.
        dir: PathBuf,
    },
}

#[derive(Debug, thiserror::Error)]
#[error(
    "source {value:?} is not valid: {why}; expected s3://bucket[/prefix], https://host[/prefix] or file:///absolute/dir"
)]
/// A source URI that cannot be used.
pub struct LocationError {
    /// The URI given.
    pub value: String,
    /// Why it is refused.
    pub why: &'static str,
}

impl std::str::FromStr for Location {
    type Err = LocationError;

    fn from_str(value: &str) -> Result<Self, LocationError> {
        let bad = |why| LocationError {
            value: cloudfront::redact(value),
            why,
        };
        if let Some(rest) = value.strip_prefix("s3://") {
            let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
            if bucket.is_empty() {
                return Err(bad("the bucket is empty"));
            }
            return Ok(Location::S3 {
                bucket: bucket.into(),
                prefix: prefix.trim_matches('/').into(),
            });
        }
        if let Some(rest) = value.strip_prefix("file://") {
            if !rest.starts_with('/') {
                return Err(bad("a file:// location must be an absolute path"));
            }
            return Ok(Location::File { dir: rest.into() });
        }
        let url = url::Url::parse(value).map_err(|_| bad("it is not a URL"))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(bad("the scheme is not s3, https, http or file"));
        }
        if url.query().is_some() || url.fragment().is_some() {
            return Err(bad(
                "it has a query or fragment; pass headers or CloudFront signing options instead",
            ));
        }
        if url.host_str().is_none() {
            return Err(bad("it has no host"));
        }
        Ok(Location::Http { base: url })
    }
}

impl std::fmt::Display for Location {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Location::S3 { bucket, prefix } if prefix.is_empty() => write!(f, "s3://{bucket}"),
            Location::S3 { bucket, prefix } => write!(f, "s3://{bucket}/{prefix}"),
            Location::Http { base } => f.write_str(&cloudfront::redact(base.as_str())),
            Location::File { dir } => write!(f, "file://{}", dir.display()),
        }
    }
}

/// Object key (S3), URL path or file path of `rel` inside a version, below
/// `prefix`.
pub fn version_key(prefix: &str, model: &str, version: &str, rel: &str) -> String {
    let mut key = String::new();
    for part in [prefix.trim_matches('/'), model, version, rel] {
        if part.is_empty() {
            continue;
        }
        if !key.is_empty() {
            key.push('/');
        }
        key.push_str(part);
    }
    key
}

/// How a failure should be handled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// 5xx, 429, timeouts, resets, truncated bodies: retry with backoff.
    Transient,
    /// 404: the version or file is not there.
    NotFound,
    /// 401/403: credentials, signature or policy.
    Denied,
    /// The object is shorter than its manifest entry says: it is not the
    /// file the manifest describes, and retrying cannot change that.
    Mismatch,
    /// Anything else that retrying will not change.
    Permanent,
}

/// The object ends before the range asked for (taken from its manifest
/// entry): whatever the origin serves, it is not that file.
fn shorter(url: &str, total: u64, range: &Range<u64>) -> SourceError {
    let detail = format!(
        "the object has {total} bytes, but its manifest entry needs at least {}: it is not \
         the file the manifest describes; publish the version again (as a new version) or \
         repair the object",
        range.end
    );
    failed(url, Failure::Mismatch, detail)
}

/// The total size in a `Content-Range: bytes a-b/total` value.
fn content_range_total(value: &str) -> Option<u64> {
    value.rsplit_once('/')?.1.trim().parse().ok()
}

#[derive(Debug, thiserror::Error)]
#[error("failed to get {url}: {detail}")]
/// A failed request, classified for retries and exit codes.
pub struct SourceError {
    /// What kind of failure it was.
    pub failure: Failure,
    /// Never carries a signature or credentials.
    pub url: String,
    /// What the origin said, without credentials or signatures.
    pub detail: String,
}

/// Classify an HTTP status.
pub fn status_failure(status: u16) -> Failure {
    match status {
        401 | 403 => Failure::Denied,
        404 | 410 => Failure::NotFound,
        408 | 429 | 500..=599 => Failure::Transient,
        _ => Failure::Permanent,
    }
}

/// Settings shared by every source.
#[derive(Clone, Default)]
pub struct SourceConfig {
    /// S3-compatible endpoint, e.g. `http://127.0.0.1:9000`.
    pub endpoint: Option<String>,
    /// S3 region.
    pub region: Option<String>,
    /// Bucket in the path rather than the host name (most S3-compatible stores).
    pub path_style: bool,
    /// Extra request headers for HTTP origins.
    pub headers: Vec<(String, String)>,
    /// CloudFront signing for HTTP origins.
    pub signer: Option<Arc<Signer>>,
    /// A response that sends nothing for this long is retried.
    pub idle_timeout: Option<Duration>,
    /// Connections kept per host: the fetch concurrency.
    pub connections: usize,
    /// S3 keys to sign with instead of the default chain (environment, web
    /// identity, profile): the controller's reads of a ModelCache's source
    /// with the keys of its Secret.
    pub credentials: Option<S3Credentials>,
}

/// An S3 access key, its secret and an optional session token.
#[derive(Clone)]
pub struct S3Credentials {
    /// `AWS_ACCESS_KEY_ID`.
    pub access_key_id: String,
    /// `AWS_SECRET_ACCESS_KEY`.
    pub secret_access_key: String,
    /// `AWS_SESSION_TOKEN`, for temporary credentials.
    pub session_token: Option<String>,
}

impl std::fmt::Debug for SourceConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Header values can be credentials: only their names are shown.
        let header_names: Vec<&str> = self.headers.iter().map(|(k, _)| k.as_str()).collect();
        f.debug_struct("SourceConfig")
            .field("endpoint", &self.endpoint)
            .field("region", &self.region)
            .field("path_style", &self.path_style)
            .field("header_names", &header_names)
            .field("signer", &self.signer)
            .field("idle_timeout", &self.idle_timeout)
            .field("connections", &self.connections)
            // Never the keys themselves.
            .field("credentials", &self.credentials.as_ref().map(|_| "static"))
            .finish()
    }
}

/// A stream of body chunks.
pub type Body = BoxStream<'static, Result<Bytes, SourceError>>;

/// A connected source of versions.
pub enum Source {
    /// An S3 bucket, through the AWS SDK.
    S3 {
        /// The S3 client.
        client: aws_sdk_s3::Client,
        /// The bucket.
        bucket: String,
        /// The key prefix of every model.
        prefix: String,
    },
    /// An HTTP origin or CDN.
    Http {
        /// The HTTP client.
        client: reqwest::Client,
        /// The URL every model is under.
        base: url::Url,
        /// Headers sent with every request.
        headers: reqwest::header::HeaderMap,
        /// CloudFront signing, if configured.
        signer: Option<Arc<Signer>>,
    },
    /// A local directory.
    File {
        /// The directory every model is under.
        dir: PathBuf,
    },
}

/// Why a source could not be set up.
/// Each variant is documented by its message.
#[derive(Debug, thiserror::Error)]
#[allow(missing_docs)]
pub enum ConnectError {
    #[error("failed to use header {name:?}: expected a valid HTTP header name and value")]
    Header { name: String },
    #[error("failed to build the HTTP client")]
    Client(#[source] reqwest::Error),
}

impl Source {
    /// Connects to `location` (clients built once, reused by every request).
    pub async fn connect(location: &Location, cfg: &SourceConfig) -> Result<Source, ConnectError> {
        let idle = cfg.idle_timeout.unwrap_or(Duration::from_secs(30));
        Ok(match location {
            Location::S3 { bucket, prefix } => Source::S3 {
                client: s3_client(cfg, idle, false).await,
                bucket: bucket.clone(),
                prefix: prefix.clone(),
            },
            Location::Http { base } => {
                let mut headers = reqwest::header::HeaderMap::new();
                for (name, value) in &cfg.headers {
                    let bad = || ConnectError::Header { name: name.clone() };
                    headers.insert(
                        reqwest::header::HeaderName::from_bytes(name.as_bytes())
                            .map_err(|_| bad())?,
                        reqwest::header::HeaderValue::from_str(value).map_err(|_| bad())?,
                    );
                }
                let client = reqwest::Client::builder()
                    .connect_timeout(Duration::from_secs(10))
                    .read_timeout(idle)
                    .pool_max_idle_per_host(cfg.connections.max(1))
                    // Signed URLs must not be followed to another host with
                    // their signature; origins that redirect are misconfigured.
                    .redirect(reqwest::redirect::Policy::none())
                    .build()
                    .map_err(ConnectError::Client)?;
                let mut base = base.clone();
                if !base.path().ends_with('/') {
                    base.set_path(&format!("{}/", base.path()));
                }
                Source::Http {
                    client,
                    base,
                    headers,
                    signer: cfg.signer.clone(),
                }
            }
            Location::File { dir } => Source::File { dir: dir.clone() },
        })
    }

    /// The URL of `rel` for messages: never signed.
    pub fn url(&self, model: &str, version: &str, rel: &str) -> String {
        match self {
            Source::S3 { bucket, prefix, .. } => {
                format!("s3://{bucket}/{}", version_key(prefix, model, version, rel))
            }
            Source::Http { base, .. } => {
                cloudfront::redact(http_url(base, model, version, rel).as_str())
            }
            Source::File { dir } => format!(
                "file://{}",
                dir.join(version_key("", model, version, rel)).display()
            ),
        }
    }

    /// `range` of `rel` (all of it when `None`).
    pub async fn get(
        &self,
        model: &str,
        version: &str,
        rel: &str,
        range: Option<Range<u64>>,
    ) -> Result<Body, SourceError> {
        if matches!(&range, Some(r) if r.is_empty()) {
            return Ok(futures::stream::empty().boxed());
        }
        let url = self.url(model, version, rel);
        match self {
            Source::S3 {
                client,
                bucket,
                prefix,
            } => {
                let key = version_key(prefix, model, version, rel);
                get_s3(client, bucket, &key, range, url).await
            }
            Source::Http {
                client,
                base,
                headers,
                signer,
            } => {
                let target = http_url(base, model, version, rel);
                let resource = format!("{}*", http_url(base, model, version, "").as_str());
                let request = HttpGet {
                    client,
                    headers,
                    signer: signer.as_deref(),
                };
                request.send(target, &resource, range, url).await
            }
            Source::File { dir } => {
                get_file(&dir.join(version_key("", model, version, rel)), range, url)
            }
        }
    }

    /// All of `rel`, up to `limit` bytes (the manifest).
    pub async fn get_all(
        &self,
        model: &str,
        version: &str,
        rel: &str,
        limit: usize,
    ) -> Result<Vec<u8>, SourceError> {
        let mut body = self.get(model, version, rel, None).await?;
        let mut out = Vec::new();
        while let Some(chunk) = body.next().await {
            out.extend_from_slice(&chunk?);
            if out.len() > limit {
                break;
            }
        }
        Ok(out)
    }
}

fn http_url(base: &url::Url, model: &str, version: &str, rel: &str) -> url::Url {
    let mut url = base.clone();
    {
        let mut segments = url.path_segments_mut().expect("http URLs have paths");
        segments.pop_if_empty();
        segments.push(model).push(version);
        if rel.is_empty() {
            segments.push("");
        } else {
            segments.extend(rel.split('/'));
        }
    }
    url
}

/// A client for S3 or an S3-compatible store: the default credential chain
/// (environment, profile, web identity / IRSA, container and instance
/// metadata). The fetcher turns the SDK's retries off (`sdk_retries`), because
/// its own retries resume ranges and keep one deadline; publish keeps them.
pub async fn s3_client(
    cfg: &SourceConfig,
    idle: Duration,
    sdk_retries: bool,
) -> aws_sdk_s3::Client {
    use aws_config::meta::region::RegionProviderChain;
    use aws_sdk_s3::config::Region;
    // S3-compatible stores rarely care about the region; asking instance
    // metadata for one there only costs a timeout.
    let env_region = ["AWS_REGION", "AWS_DEFAULT_REGION"]
        .iter()
        .find_map(|k| std::env::var(k).ok().filter(|v| !v.is_empty()));
    let region = match (&cfg.region, &cfg.endpoint, env_region) {
        (Some(r), _, _) => RegionProviderChain::first_try(Region::new(r.clone())),
        (None, Some(_), None) => RegionProviderChain::first_try(Region::new("us-east-1")),
        _ => RegionProviderChain::default_provider().or_else("us-east-1"),
    };
    let shared = aws_config::defaults(aws_config::BehaviorVersion::latest())
        .region(region)
        .load()
        .await;
    let mut builder = aws_sdk_s3::config::Builder::from(&shared)
        .force_path_style(cfg.path_style)
        .retry_config(if sdk_retries {
            aws_sdk_s3::config::retry::RetryConfig::standard().with_max_attempts(5)
        } else {
            aws_sdk_s3::config::retry::RetryConfig::disabled()
        })
        .timeout_config(
            aws_sdk_s3::config::timeout::TimeoutConfig::builder()
                .connect_timeout(Duration::from_secs(10))
                .read_timeout(idle)
                .build(),
        );
    if let Some(endpoint) = &cfg.endpoint {
        builder = builder.endpoint_url(endpoint);
    }
    if let Some(c) = &cfg.credentials {
        builder = builder.credentials_provider(aws_sdk_s3::config::Credentials::new(
            &c.access_key_id,
            &c.secret_access_key,
            c.session_token.clone(),
            None,
            "modelcache-secret",
        ));
    }
    aws_sdk_s3::Client::from_conf(builder.build())
}

/// Classify an SDK error and describe it with S3's error code.
pub fn s3_failure<E: aws_sdk_s3::error::ProvideErrorMetadata + std::error::Error + 'static>(
    e: &SdkError<E, aws_sdk_s3::config::http::HttpResponse>,
) -> (Failure, String) {
    match e {
        SdkError::ServiceError(service) => {
            let status = service.raw().status().as_u16();
            let code = e.code().unwrap_or("no error code");
            let message = e.message().map(|m| format!(" ({m})")).unwrap_or_default();
            let hint = match (status_failure(status), code) {
                (Failure::Denied, "InvalidAccessKeyId" | "SignatureDoesNotMatch") => {
                    "; check the credentials (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, the profile, or the pod's IAM role)"
                }
                (Failure::Denied, _) => "; check the bucket policy and the role's s3:GetObject permission",
                (Failure::NotFound, _) => "; is the version published there?",
                _ => "",
            };
            (
                status_failure(status),
                format!("S3 answered {status} {code}{message}{hint}"),
            )
        }
        SdkError::TimeoutError(_) | SdkError::ResponseError(_) => {
            (Failure::Transient, DisplayErrorContext(e).to_string())
        }
        SdkError::DispatchFailure(_)
            if DisplayErrorContext(e).to_string().contains("loading credentials") =>
        {
            (
                Failure::Denied,
                "no AWS credentials could be loaded (environment, profile, web identity, container or instance metadata); set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, a profile, or give the pod an IAM role".into(),
            )
        }
        SdkError::DispatchFailure(d) if d.is_io() || d.is_timeout() => {
            (Failure::Transient, DisplayErrorContext(e).to_string())
        }
        _ => (Failure::Permanent, DisplayErrorContext(e).to_string()),
    }
}

/// A failed request to `url`.
fn failed(url: &str, failure: Failure, detail: String) -> SourceError {
    SourceError {
        failure,
        url: url.to_owned(),
        detail,
    }
}

/// A GetObject, its body as a stream.
async fn get_s3(
    client: &aws_sdk_s3::Client,
    bucket: &str,
    key: &str,
    range: Option<Range<u64>>,
    url: String,
) -> Result<Body, SourceError> {
    let mut request = client.get_object().bucket(bucket).key(key);
    if let Some(r) = &range {
        request = request.range(format!("bytes={}-{}", r.start, r.end - 1));
    }
    let response = request.send().await.map_err(|e| {
        if let (Some(r), SdkError::ServiceError(service)) = (&range, &e) {
            let raw = service.raw();
            let total = raw
                .headers()
                .get("content-range")
                .and_then(content_range_total);
            if let (416, Some(total)) = (raw.status().as_u16(), total) {
                return shorter(&url, total, r);
            }
        }
        let (failure, detail) = s3_failure(&e);
        failed(&url, failure, detail)
    })?;
    if let (Some(r), Some(total)) = (
        &range,
        response.content_range().and_then(content_range_total),
    ) && total < r.end
    {
        return Err(shorter(&url, total, r));
    }
    let body = response.body;
    Ok(
        futures::stream::unfold((body, url), |(mut body, url)| async move {
            match body.next().await? {
                Ok(chunk) => Some((Ok(chunk), (body, url))),
                Err(e) => {
                    let detail = format!("the body broke off: {}", DisplayErrorContext(&e));
                    let e = failed(&url, Failure::Transient, detail);
                    Some((Err(e), (body, url)))
                }
            }
        })
        .boxed(),
    )
}

/// What an HTTP GET to the origin carries.
struct HttpGet<'a> {
    client: &'a reqwest::Client,
    headers: &'a reqwest::header::HeaderMap,
    signer: Option<&'a Signer>,
}

impl HttpGet<'_> {
    /// GETs `target` (signed for `resource` when a signer is set); only a
    /// 2xx answer, and 206 to a Range request, is a body.
    async fn send(
        &self,
        mut target: url::Url,
        resource: &str,
        range: Option<Range<u64>>,
        url: String,
    ) -> Result<Body, SourceError> {
        let mut request = self
            .client
            .get(target.clone())
            .headers(self.headers.clone());
        if let Some(signer) = self.signer {
            match signer.sign(target.as_str(), resource) {
                Signed::Query(q) => {
                    target.set_query(Some(&q));
                    request = self.client.get(target).headers(self.headers.clone());
                }
                Signed::Cookie(c) => request = request.header(reqwest::header::COOKIE, c),
            }
        }
        if let Some(r) = &range {
            let bytes = format!("bytes={}-{}", r.start, r.end - 1);
            request = request.header(reqwest::header::RANGE, bytes);
        }
        let response = request.send().await.map_err(|e| {
            // reqwest's message can quote the URL, signature included.
            let detail = format!(
                "the request failed: {}",
                crate::error::chain(&e.without_url())
            );
            failed(&url, Failure::Transient, detail)
        })?;
        let status = response.status().as_u16();
        let total = response
            .headers()
            .get(reqwest::header::CONTENT_RANGE)
            .and_then(|v| v.to_str().ok())
            .and_then(content_range_total);
        if let Some(r) = &range {
            match (status, total) {
                (416, Some(total)) => return Err(shorter(&url, total, r)),
                (206, Some(total)) if total < r.end => return Err(shorter(&url, total, r)),
                _ => {}
            }
        }
        if !(200..300).contains(&status) {
            let hint = match status_failure(status) {
                Failure::Denied => "; check the headers, the CloudFront key pair and the key group",
                Failure::NotFound => "; is the version published there?",
                _ => "",
            };
            let detail = format!("the origin answered {status}{hint}");
            return Err(failed(&url, status_failure(status), detail));
        }
        if range.is_some() && status != 206 {
            let detail = format!(
                "the origin answered {status} to a Range request, not 206; serve the files from an origin that supports Range"
            );
            return Err(failed(&url, Failure::Permanent, detail));
        }
        Ok(response
            .bytes_stream()
            .map(move |chunk| {
                chunk.map_err(|e| {
                    let why = crate::error::chain(&e.without_url());
                    failed(
                        &url,
                        Failure::Transient,
                        format!("the body broke off: {why}"),
                    )
                })
            })
            .boxed())
    }
}

/// `range` of a local file, read in 1 MiB chunks off the async threads.
fn get_file(
    path: &std::path::Path,
    range: Option<Range<u64>>,
    url: String,
) -> Result<Body, SourceError> {
    let file = std::fs::File::open(path).map_err(|e| {
        let failure = match e.kind() {
            std::io::ErrorKind::NotFound => Failure::NotFound,
            std::io::ErrorKind::PermissionDenied => Failure::Denied,
            _ => Failure::Permanent,
        };
        failed(&url, failure, e.to_string())
    })?;
    let len = file
        .metadata()
        .map_err(|e| failed(&url, Failure::Permanent, e.to_string()))?
        .len();
    if let Some(r) = &range
        && len < r.end
    {
        return Err(shorter(&url, len, r));
    }
    let range = range.unwrap_or(0..len);
    let file = Arc::new(file);
    Ok(futures::stream::unfold(range.start, move |at| {
        let file = file.clone();
        let url = url.clone();
        let end = range.end;
        async move {
            if at >= end {
                return None;
            }
            let want = (end - at).min(1 << 20) as usize;
            let read = tokio::task::spawn_blocking(move || {
                use std::os::unix::fs::FileExt as _;
                let mut buf = vec![0u8; want];
                let n = file.read_at(&mut buf, at)?;
                buf.truncate(n);
                Ok::<_, std::io::Error>(buf)
            })
            .await
            .expect("file read task panicked");
            match read {
                Ok(buf) if buf.is_empty() => None,
                Ok(buf) => {
                    let n = buf.len() as u64;
                    Some((Ok(Bytes::from(buf)), at + n))
                }
                Err(e) => Some((Err(failed(&url, Failure::Transient, e.to_string())), end)),
            }
        }
    })
    .boxed())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locations_parse_and_refuse_what_they_cannot_use() {
        assert_eq!(
            "s3://models/prod/".parse::<Location>().unwrap(),
            Location::S3 {
                bucket: "models".into(),
                prefix: "prod".into()
            }
        );
        assert_eq!(
            "file:///srv/models".parse::<Location>().unwrap(),
            Location::File {
                dir: "/srv/models".into()
            }
        );
        assert!(matches!(
            "https://cdn.example/models".parse::<Location>().unwrap(),
            Location::Http { .. }
        ));
        for bad in [
            "s3://",
            "ftp://x/y",
            "file://relative",
            "https://cdn.example/m?Signature=secret",
            "models",
        ] {
            let err = bad.parse::<Location>().unwrap_err().to_string();
            assert!(err.contains("expected s3://"), "{err}");
            assert!(
                !err.contains("secret"),
                "signatures never reach messages: {err}"
            );
        }
    }

    #[test]
    fn keys_and_urls_place_files_under_model_and_version() {
        assert_eq!(version_key("p/", "m", "v1", "a/b.bin"), "p/m/v1/a/b.bin");
        assert_eq!(
            version_key("", "m", "v1", "manifest.json"),
            "m/v1/manifest.json"
        );
        let base = url::Url::parse("https://cdn.example/models/").unwrap();
        assert_eq!(
            http_url(&base, "m", "v1", "dir/a b.bin").as_str(),
            "https://cdn.example/models/m/v1/dir/a%20b.bin"
        );
        assert_eq!(
            http_url(&base, "m", "v1", "").as_str(),
            "https://cdn.example/models/m/v1/"
        );
    }

    #[test]
    fn debug_output_never_shows_header_values() {
        let cfg = SourceConfig {
            headers: vec![("Authorization".into(), "Bearer secret-token".into())],
            ..Default::default()
        };
        let shown = format!("{cfg:?}");
        assert!(
            shown.contains("Authorization") && !shown.contains("secret-token"),
            "{shown}"
        );
    }

    #[test]
    fn statuses_are_classified() {
        assert_eq!(status_failure(503), Failure::Transient);
        assert_eq!(status_failure(429), Failure::Transient);
        assert_eq!(status_failure(403), Failure::Denied);
        assert_eq!(status_failure(404), Failure::NotFound);
        assert_eq!(status_failure(416), Failure::Permanent);
    }
}
