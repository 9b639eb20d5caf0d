//! `modelcache publish`: release a local directory as a version. The files go
//! first and the manifest last, so a version without a manifest is one whose
//! publish did not finish, and fetchers refuse it. Versions are immutable: a
//! second publish with the same bytes does nothing, with different bytes it
//! is refused.
//!
//! Immutability holds under concurrent publishes too: every object is written
//! only where none is (S3 `If-None-Match: *`; a hard link for directories), so
//! the first writer of each object wins and a publish that finds another's
//! object there checks it byte for byte (sha256) before going on. A check of
//! the manifest before the upload alone would let two publishes that both
//! found none overwrite each other's files and manifest.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use aws_sdk_s3::primitives::ByteStream;
use futures::{StreamExt as _, TryStreamExt as _};
use serde::Serialize;

use super::manifest::{self, BuildError, MANIFEST_NAME, ManifestFile};
use super::source::{Location, SourceConfig, s3_client, s3_failure, version_key};

/// Files above this go up in parts.
const MULTIPART_THRESHOLD: u64 = 64 << 20;

#[derive(Debug, Clone)]
/// Everything `modelcache publish` takes.
pub struct PublishOptions {
    /// The directory to release.
    pub dir: PathBuf,
    /// Where versions are published.
    pub location: Location,
    /// How to reach the store.
    pub source: SourceConfig,
    /// The model's name.
    pub model: String,
    /// The version to release.
    pub version: String,
    /// Uploads in flight at once.
    pub concurrency: usize,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
/// The JSON printed at the end.
pub struct PublishSummary {
    /// The model.
    pub model: String,
    /// The version.
    pub version: String,
    /// The sha256 of the manifest uploaded.
    pub manifest_digest: String,
    /// Where it was published.
    pub location: String,
    /// Files of the version.
    pub files: usize,
    /// Bytes of the version.
    pub bytes: u64,
    /// True when the very same version was already there: nothing uploaded.
    pub already_published: bool,
    /// Wall time.
    pub seconds: f64,
}

/// Why a publish failed or was refused.
/// Each variant is documented by its message.
#[derive(Debug, thiserror::Error)]
#[allow(missing_docs)]
pub enum PublishError {
    #[error("failed to publish: {0}")]
    Name(#[from] super::NameError),
    #[error("failed to build the manifest of {dir}")]
    Build {
        dir: PathBuf,
        #[source]
        source: BuildError,
    },
    #[error(
        "failed to publish {model}/{version}: {url} already holds a different manifest (digest {existing}, this directory's is {new}); versions are immutable, so publish under a new version"
    )]
    Exists {
        model: String,
        version: String,
        url: String,
        existing: String,
        new: String,
    },
    #[error(
        "failed to publish {model}/{version}: {url} already holds other bytes for {file} (sha256 {existing}, this directory's is {new}); another publish of this version ran at the same time or earlier, and versions are immutable, so publish under a new version"
    )]
    FileExists {
        model: String,
        version: String,
        file: String,
        url: String,
        existing: String,
        new: String,
    },
    #[error("failed to upload {file} to {url}: {detail}")]
    Upload {
        file: String,
        url: String,
        detail: String,
    },
    #[error(
        "failed to publish to {location}: publishing goes to s3:// or file:// locations; serve those through the CDN"
    )]
    Unsupported { location: String },
}

impl PublishError {
    /// 2 bad input, 3 the version exists with other content, 4 the store refused.
    pub fn exit_code(&self) -> u8 {
        match self {
            PublishError::Name(_)
            | PublishError::Build { .. }
            | PublishError::Unsupported { .. } => 2,
            PublishError::Exists { .. } | PublishError::FileExists { .. } => 3,
            PublishError::Upload { .. } => 4,
        }
    }
}

/// Publishes a directory as an immutable version: files first, the manifest last.
pub async fn publish(opts: PublishOptions) -> Result<PublishSummary, PublishError> {
    let started = Instant::now();
    super::check_names(&opts.model, &opts.version)?;
    let dir = opts.dir.clone();
    let (model, version) = (opts.model.clone(), opts.version.clone());
    let built = tokio::task::spawn_blocking(move || manifest::build(&dir, &model, &version))
        .await
        .expect("manifest task panicked")
        .map_err(|source| PublishError::Build {
            dir: opts.dir.clone(),
            source,
        })?;
    let bytes = built.to_bytes();
    let verified =
        manifest::parse("the new manifest", bytes, None).map_err(|e| PublishError::Build {
            dir: opts.dir.clone(),
            source: BuildError::Manifest(e),
        })?;
    let mut summary = PublishSummary {
        model: opts.model.clone(),
        version: opts.version.clone(),
        manifest_digest: verified.digest.clone(),
        location: opts.location.to_string(),
        files: verified.manifest.files.len(),
        bytes: verified.total_bytes(),
        already_published: false,
        seconds: 0.0,
    };
    let target = Target::new(&opts).await?;
    match target.existing_manifest(&opts).await? {
        Some(existing) if existing == verified.bytes => summary.already_published = true,
        Some(existing) => {
            return Err(PublishError::Exists {
                model: opts.model.clone(),
                version: opts.version.clone(),
                url: target.url(&opts, MANIFEST_NAME),
                existing: crate::digest::sha256_hex(&existing),
                new: verified.digest.clone(),
            });
        }
        None => {
            futures::stream::iter(
                verified
                    .manifest
                    .files
                    .iter()
                    .map(|f| target.upload(&opts, f)),
            )
            .buffer_unordered(opts.concurrency.clamp(1, 16))
            .try_collect::<Vec<()>>()
            .await?;
            if !target.put_manifest(&opts, &verified.bytes).await? {
                // Another publish put its manifest between our check and ours.
                match target.existing_manifest(&opts).await? {
                    Some(existing) if existing == verified.bytes => {
                        summary.already_published = true
                    }
                    existing => {
                        return Err(PublishError::Exists {
                            model: opts.model.clone(),
                            version: opts.version.clone(),
                            url: target.url(&opts, MANIFEST_NAME),
                            existing: crate::digest::sha256_hex(&existing.unwrap_or_default()),
                            new: verified.digest.clone(),
                        });
                    }
                }
            }
        }
    }
    summary.seconds = (started.elapsed().as_secs_f64() * 1000.0).round() / 1000.0;
    Ok(summary)
}

enum Target {
    S3 {
        client: aws_sdk_s3::Client,
        bucket: String,
        prefix: String,
    },
    Dir(PathBuf),
}

impl Target {
    async fn new(opts: &PublishOptions) -> Result<Target, PublishError> {
        match &opts.location {
            Location::S3 { bucket, prefix } => Ok(Target::S3 {
                client: s3_client(&opts.source, Duration::from_secs(60), true).await,
                bucket: bucket.clone(),
                prefix: prefix.clone(),
            }),
            Location::File { dir } => Ok(Target::Dir(dir.clone())),
            Location::Http { .. } => Err(PublishError::Unsupported {
                location: opts.location.to_string(),
            }),
        }
    }

    fn url(&self, opts: &PublishOptions, rel: &str) -> String {
        match self {
            Target::S3 { bucket, prefix, .. } => {
                format!(
                    "s3://{bucket}/{}",
                    version_key(prefix, &opts.model, &opts.version, rel)
                )
            }
            Target::Dir(dir) => dir
                .join(version_key("", &opts.model, &opts.version, rel))
                .display()
                .to_string(),
        }
    }

    fn upload_error(&self, opts: &PublishOptions, file: &str, detail: String) -> PublishError {
        PublishError::Upload {
            file: file.into(),
            url: self.url(opts, file),
            detail,
        }
    }

    async fn existing_manifest(
        &self,
        opts: &PublishOptions,
    ) -> Result<Option<Vec<u8>>, PublishError> {
        match self {
            Target::S3 {
                client,
                bucket,
                prefix,
            } => {
                let key = version_key(prefix, &opts.model, &opts.version, MANIFEST_NAME);
                match client.get_object().bucket(bucket).key(key).send().await {
                    Ok(out) => {
                        let bytes = out.body.collect().await.map_err(|e| {
                            self.upload_error(
                                opts,
                                MANIFEST_NAME,
                                format!("reading the existing manifest: {e}"),
                            )
                        })?;
                        Ok(Some(bytes.to_vec()))
                    }
                    Err(e) if e.as_service_error().is_some_and(|s| s.is_no_such_key()) => Ok(None),
                    Err(e) => Err(self.upload_error(opts, MANIFEST_NAME, s3_failure(&e).1)),
                }
            }
            Target::Dir(dir) => {
                let path = dir.join(version_key("", &opts.model, &opts.version, MANIFEST_NAME));
                match std::fs::read(&path) {
                    Ok(bytes) => Ok(Some(bytes)),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
                    Err(e) => Err(self.upload_error(opts, MANIFEST_NAME, e.to_string())),
                }
            }
        }
    }

    async fn upload(&self, opts: &PublishOptions, f: &ManifestFile) -> Result<(), PublishError> {
        let local = opts.dir.join(&f.path);
        match self {
            Target::S3 {
                client,
                bucket,
                prefix,
            } => {
                let key = version_key(prefix, &opts.model, &opts.version, &f.path);
                if f.size <= MULTIPART_THRESHOLD {
                    let body = ByteStream::from_path(&local)
                        .await
                        .map_err(|e| self.upload_error(opts, &f.path, e.to_string()))?;
                    let put = client
                        .put_object()
                        .bucket(bucket)
                        .key(&key)
                        .if_none_match("*")
                        .body(body)
                        .send()
                        .await;
                    return match put {
                        Ok(_) => Ok(()),
                        Err(e) if precondition_failed(&e) => self.same_bytes(opts, f).await,
                        Err(e) => Err(self.upload_error(opts, &f.path, s3_failure(&e).1)),
                    };
                }
                self.multipart(opts, client, bucket, &key, &local, f).await
            }
            Target::Dir(_) => {
                let target = PathBuf::from(self.url(opts, &f.path));
                match copy_new(&local, &target) {
                    Ok(()) => Ok(()),
                    Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                        self.same_bytes(opts, f).await
                    }
                    Err(e) => Err(self.upload_error(opts, &f.path, e.to_string())),
                }
            }
        }
    }

    async fn multipart(
        &self,
        opts: &PublishOptions,
        client: &aws_sdk_s3::Client,
        bucket: &str,
        key: &str,
        local: &Path,
        f: &ManifestFile,
    ) -> Result<(), PublishError> {
        use aws_sdk_s3::types::{CompletedMultipartUpload, CompletedPart};
        let err = |detail: String| self.upload_error(opts, &f.path, detail);
        let created = client
            .create_multipart_upload()
            .bucket(bucket)
            .key(key)
            .send()
            .await
            .map_err(|e| err(s3_failure(&e).1))?;
        let upload_id = created.upload_id().unwrap_or_default().to_string();
        // S3 allows 10,000 parts of at least 5 MiB.
        let part = (16u64 << 20).max(f.size.div_ceil(10_000));
        let count = f.size.div_ceil(part);
        let uploads = (0..count).map(|i| {
            let upload_id = upload_id.clone();
            async move {
                let offset = i * part;
                let length = part.min(f.size - offset);
                let body = ByteStream::read_from()
                    .path(local)
                    .offset(offset)
                    .length(aws_sdk_s3::primitives::Length::Exact(length))
                    .build()
                    .await
                    .map_err(|e| err(e.to_string()))?;
                let out = client
                    .upload_part()
                    .bucket(bucket)
                    .key(key)
                    .upload_id(&upload_id)
                    .part_number(i as i32 + 1)
                    .body(body)
                    .send()
                    .await
                    .map_err(|e| err(s3_failure(&e).1))?;
                Ok::<_, PublishError>(
                    CompletedPart::builder()
                        .part_number(i as i32 + 1)
                        .set_e_tag(out.e_tag().map(str::to_string))
                        .set_checksum_crc32(out.checksum_crc32().map(str::to_string))
                        .build(),
                )
            }
        });
        let result = futures::stream::iter(uploads)
            .buffered(4)
            .try_collect::<Vec<_>>()
            .await;
        // Parts of an upload that will not complete cost storage until
        // aborted; an abort that fails leaves that to the bucket's lifecycle.
        let abort = async || {
            let _ = client
                .abort_multipart_upload()
                .bucket(bucket)
                .key(key)
                .upload_id(&upload_id)
                .send()
                .await;
        };
        let parts = match result {
            Ok(parts) => parts,
            Err(e) => {
                abort().await;
                return Err(e);
            }
        };
        let completed = client
            .complete_multipart_upload()
            .bucket(bucket)
            .key(key)
            .upload_id(&upload_id)
            .if_none_match("*")
            .multipart_upload(
                CompletedMultipartUpload::builder()
                    .set_parts(Some(parts))
                    .build(),
            )
            .send()
            .await;
        match completed {
            Ok(_) => Ok(()),
            Err(e) if precondition_failed(&e) => {
                abort().await;
                self.same_bytes(opts, f).await
            }
            // moto answers 200 with a `CompleteMultipartUploadResponse` root
            // that the SDK refuses to decode; the object is complete when its
            // size says so.
            Err(e) if e.raw_response().is_some_and(|r| r.status().as_u16() == 200) => {
                let head = client
                    .head_object()
                    .bucket(bucket)
                    .key(key)
                    .send()
                    .await
                    .map_err(|e| err(s3_failure(&e).1))?;
                if head.content_length() == Some(f.size as i64) {
                    Ok(())
                } else {
                    Err(err(s3_failure(&e).1))
                }
            }
            Err(e) => Err(err(s3_failure(&e).1)),
        }
    }

    /// Puts the manifest where none is; `false` when another publish's
    /// manifest got there first.
    async fn put_manifest(
        &self,
        opts: &PublishOptions,
        bytes: &[u8],
    ) -> Result<bool, PublishError> {
        let err = |detail: String| self.upload_error(opts, MANIFEST_NAME, detail);
        match self {
            Target::S3 {
                client,
                bucket,
                prefix,
            } => {
                let put = client
                    .put_object()
                    .bucket(bucket)
                    .key(version_key(
                        prefix,
                        &opts.model,
                        &opts.version,
                        MANIFEST_NAME,
                    ))
                    .content_type("application/json")
                    .if_none_match("*")
                    .body(ByteStream::from(bytes.to_vec()))
                    .send()
                    .await;
                match put {
                    Ok(_) => Ok(true),
                    Err(e) if precondition_failed(&e) => Ok(false),
                    Err(e) => Err(err(s3_failure(&e).1)),
                }
            }
            Target::Dir(_) => {
                let target = PathBuf::from(self.url(opts, MANIFEST_NAME));
                if let Some(parent) = target.parent() {
                    std::fs::create_dir_all(parent).map_err(|e| err(e.to_string()))?;
                }
                let tmp = target.with_extension(format!(
                    "publishing{}-{:x}",
                    std::process::id(),
                    fastrand::u64(..)
                ));
                let placed = write_synced(&tmp, bytes).and_then(|()| place_new(&tmp, &target));
                match placed {
                    Ok(()) => Ok(true),
                    Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(false),
                    Err(e) => Err(err(e.to_string())),
                }
            }
        }
    }

    /// For an object another publish wrote first: going on is right only if
    /// it holds the very bytes this one would have written.
    async fn same_bytes(
        &self,
        opts: &PublishOptions,
        f: &ManifestFile,
    ) -> Result<(), PublishError> {
        let err = |detail: String| self.upload_error(opts, &f.path, detail);
        let existing = match self {
            Target::S3 {
                client,
                bucket,
                prefix,
            } => {
                let key = version_key(prefix, &opts.model, &opts.version, &f.path);
                let out = client
                    .get_object()
                    .bucket(bucket)
                    .key(key)
                    .send()
                    .await
                    .map_err(|e| err(s3_failure(&e).1))?;
                let mut body = out.body;
                let mut hasher = crate::digest::Sha256::default();
                while let Some(chunk) = body
                    .try_next()
                    .await
                    .map_err(|e| err(format!("reading the existing object: {e}")))?
                {
                    hasher.update(&chunk);
                }
                hasher.finish_hex()
            }
            Target::Dir(_) => {
                let path = PathBuf::from(self.url(opts, &f.path));
                let hashed = tokio::task::spawn_blocking(move || {
                    crate::digest::hash_reader(std::fs::File::open(path)?)
                })
                .await
                .map_err(|e| err(e.to_string()))?;
                let (_, existing) =
                    hashed.map_err(|e| err(format!("reading the existing file: {e}")))?;
                existing
            }
        };
        if existing == f.sha256 {
            return Ok(());
        }
        Err(PublishError::FileExists {
            model: opts.model.clone(),
            version: opts.version.clone(),
            file: f.path.clone(),
            url: self.url(opts, &f.path),
            existing,
            new: f.sha256.clone(),
        })
    }
}

/// S3's answer to a conditional write whose condition failed: an object is
/// already at the key.
fn precondition_failed<E>(
    e: &aws_sdk_s3::error::SdkError<E, aws_sdk_s3::config::http::HttpResponse>,
) -> bool {
    e.raw_response().is_some_and(|r| r.status().as_u16() == 412)
}

/// Copies `from` to `to` only if nothing is at `to` (AlreadyExists
/// otherwise): through a temporary file, then a hard link, which unlike a
/// rename never replaces what is there.
fn copy_new(from: &Path, to: &Path) -> std::io::Result<()> {
    if let Some(parent) = to.parent() {
        std::fs::create_dir_all(parent)?;
    }
    let tmp = to.with_extension(format!(
        "publishing{}-{:x}",
        std::process::id(),
        fastrand::u64(..)
    ));
    std::fs::copy(from, &tmp)?;
    place_new(&tmp, to)
}

/// Writes a new file, on disk before it is linked into place.
fn write_synced(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let mut file = std::fs::File::create(path)?;
    std::io::Write::write_all(&mut file, bytes)?;
    file.sync_data()
}

/// Moves `tmp` to `to` unless something is there.
fn place_new(tmp: &Path, to: &Path) -> std::io::Result<()> {
    let linked = std::fs::hard_link(tmp, to);
    let _ = std::fs::remove_file(tmp);
    linked
}
