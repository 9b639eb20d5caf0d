//! `modelcache publish`: release a local directory as a version. The files go
//! first and the manifest last, so a version without a manifest is one whose
//! publish did not finish, and fetchers refuse it. Versions are immutable: a
//! second publish with the same bytes does nothing, with different bytes it
//! is refused.

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
            PublishError::Exists { .. } => 3,
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
            target.put_manifest(&opts, &verified.bytes).await?;
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
                    client
                        .put_object()
                        .bucket(bucket)
                        .key(&key)
                        .body(body)
                        .send()
                        .await
                        .map_err(|e| self.upload_error(opts, &f.path, s3_failure(&e).1))?;
                    return Ok(());
                }
                self.multipart(opts, client, bucket, &key, &local, f).await
            }
            Target::Dir(_) => {
                let target = PathBuf::from(self.url(opts, &f.path));
                copy_atomic(&local, &target)
                    .map_err(|e| self.upload_error(opts, &f.path, e.to_string()))
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
        let parts = match result {
            Ok(parts) => parts,
            Err(e) => {
                let _ = client
                    .abort_multipart_upload()
                    .bucket(bucket)
                    .key(key)
                    .upload_id(&upload_id)
                    .send()
                    .await;
                return Err(e);
            }
        };
        let completed = client
            .complete_multipart_upload()
            .bucket(bucket)
            .key(key)
            .upload_id(&upload_id)
            .multipart_upload(
                CompletedMultipartUpload::builder()
                    .set_parts(Some(parts))
                    .build(),
            )
            .send()
            .await;
        match completed {
            Ok(_) => Ok(()),
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

    async fn put_manifest(&self, opts: &PublishOptions, bytes: &[u8]) -> Result<(), PublishError> {
        match self {
            Target::S3 {
                client,
                bucket,
                prefix,
            } => {
                client
                    .put_object()
                    .bucket(bucket)
                    .key(version_key(
                        prefix,
                        &opts.model,
                        &opts.version,
                        MANIFEST_NAME,
                    ))
                    .content_type("application/json")
                    .body(ByteStream::from(bytes.to_vec()))
                    .send()
                    .await
                    .map_err(|e| self.upload_error(opts, MANIFEST_NAME, s3_failure(&e).1))?;
                Ok(())
            }
            Target::Dir(_) => {
                let target = PathBuf::from(self.url(opts, MANIFEST_NAME));
                if let Some(parent) = target.parent() {
                    std::fs::create_dir_all(parent)
                        .map_err(|e| self.upload_error(opts, MANIFEST_NAME, e.to_string()))?;
                }
                super::disk::write_atomic(&target, bytes)
                    .map_err(|e| self.upload_error(opts, MANIFEST_NAME, e.to_string()))
            }
        }
    }
}

fn copy_atomic(from: &Path, to: &Path) -> std::io::Result<()> {
    if let Some(parent) = to.parent() {
        std::fs::create_dir_all(parent)?;
    }
    let tmp = to.with_extension(format!("publishing{}", std::process::id()));
    std::fs::copy(from, &tmp)?;
    std::fs::rename(&tmp, to)
}
