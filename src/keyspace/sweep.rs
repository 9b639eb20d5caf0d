//! Sweeping a retired model version: every key of that version, and nothing
//! else, with SCAN (an escaped MATCH per version) and UNLINK in batches, paced
//! to protect live traffic, checkpointed so a killed sweep resumes.
//!
//! SCAN guarantees that every key present for the whole iteration is
//! returned, and its cursor stays valid across connections, so the checkpoint
//! is just the cursor. Re-scanning from an older cursor after a crash only
//! revisits keys, and UNLINK of a missing key is a no-op: the sweep is
//! idempotent and its count of deleted keys (UNLINK's own count) exact.
//!
//! The pace is set by the latency the sweep causes ([`pace`]): a probe on a
//! connection of its own samples Redis's round trip at its own cadence, as
//! readers do, and the sweep slows down whenever the probe's round trips grow
//! past their speed before the sweep by more than the allowed headroom.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use redis::aio::MultiplexedConnection;
use redis::{RedisError, Value};

use crate::keyspace::keys;

pub mod pace;

pub use pace::Pace;
use pace::{Pacer, Schedule};

/// Why a sweep of a version's keys failed.
/// Each variant is documented by its message.
#[derive(Debug, thiserror::Error)]
#[allow(missing_docs)]
pub enum SweepError {
    #[error("failed to {action} while sweeping version {version:?} of model {model:?}")]
    Redis {
        action: &'static str,
        model: String,
        version: String,
        #[source]
        source: RedisError,
    },
    #[error(
        "failed to flush: this Redis holds keys of other models or applications (found {key:?}); \
         Flush is only for a Redis that serves this model alone: use VersionKeyed"
    )]
    NotDedicated { key: String },
    #[error("failed to reach cluster node {address}: {message}")]
    Node { address: String, message: String },
    #[error("failed to read the keys of model {model:?}")]
    Discover {
        model: String,
        #[source]
        source: RedisError,
    },
}

/// What one sweep did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SweepReport {
    /// Keys deleted by this run (UNLINK's count).
    pub deleted: u64,
    /// Keys deleted by earlier, interrupted runs of the same sweep.
    pub deleted_before: u64,
    /// SCAN calls made.
    pub scans: u64,
    /// Whether this run continued an interrupted sweep.
    pub resumed: bool,
    /// Wall time of this run.
    pub elapsed: Duration,
    /// Latency pacing: the probe's typical round trip before the sweep.
    pub baseline_probe: Option<Duration>,
    /// Latency pacing: windows of probes over the headroom, each of which
    /// halved the rate.
    pub slowdowns: u64,
}

/// Deletes every key of `version` of `model`, resuming an interrupted sweep.
///
/// `probe` is a connection of its own to the same Redis (not a clone of
/// `conn`, which shares its socket) for a latency pace to time. Without one,
/// a latency pace probes on `conn` between batches: it then sees how busy
/// Redis is, but not the wait its own batches cause.
pub async fn sweep_version(
    conn: &mut MultiplexedConnection,
    probe: Option<&mut MultiplexedConnection>,
    model: &str,
    version: &str,
    pace: Pace,
) -> Result<SweepReport, SweepError> {
    let checkpoint = keys::sweep_checkpoint(model, version);
    let node = Node {
        checkpoint: &checkpoint,
        cluster: false,
    };
    sweep_node(conn, probe, model, version, pace, node).await
}

/// The node a sweep runs on.
#[derive(Clone, Copy)]
struct Node<'a> {
    /// The checkpoint key, one that this node owns.
    checkpoint: &'a str,
    /// A Redis Cluster node: one UNLINK per slot, as a multi-key command may
    /// not span slots there.
    cluster: bool,
}

/// The sweep of one Redis node: its pages, and beside them, for a latency
/// pace, the probe.
async fn sweep_node(
    conn: &mut MultiplexedConnection,
    probe: Option<&mut MultiplexedConnection>,
    model: &str,
    version: &str,
    pace: Pace,
    node: Node<'_>,
) -> Result<SweepReport, SweepError> {
    let err = |action| redis_error(action, model, version);
    let Some(headroom) = pace.headroom_percent else {
        let (never, mut probes) = tokio::sync::mpsc::unbounded_channel();
        drop(never);
        let pacer = Pacer::fixed(pace.keys_per_second);
        return sweep_pages(conn, model, version, pace, node, pacer, &mut probes).await;
    };
    // Without a connection of its own, the probe shares the sweep's socket:
    // it then waits behind each batch, as a reader's command on a busy
    // connection would.
    let mut shared;
    let probe = match probe {
        Some(p) => p,
        None => {
            shared = conn.clone();
            &mut shared
        }
    };
    let mut baseline = Vec::with_capacity(pace::BASELINE_PROBES);
    for _ in 0..pace::BASELINE_PROBES {
        tokio::time::sleep(pace::PROBE_SPACING).await;
        baseline.push(time_probe(probe).await.map_err(err("probe"))?);
    }
    let pacer = Pacer::latency(pace.keys_per_second, &baseline, headroom);
    // The probe keeps its own cadence, never in step with the batches, so
    // that it samples Redis as readers do: it lands in a batch as often as
    // the sweep keeps Redis busy, and the rate is what decides how often.
    let (sender, mut probes) = tokio::sync::mpsc::unbounded_channel();
    let probing = async {
        loop {
            tokio::time::sleep(pace::PROBE_SPACING).await;
            match time_probe(probe).await {
                Ok(rtt) => {
                    let _ = sender.send(rtt);
                }
                Err(e) => return err("probe")(e),
            }
        }
    };
    tokio::select! {
        swept = sweep_pages(conn, model, version, pace, node, pacer, &mut probes) => swept,
        failed = probing => Err(failed),
    }
}

/// The sweep loop of one Redis node, paced by `pacer`, which hears the
/// probe's round trips from `probes`.
async fn sweep_pages(
    conn: &mut MultiplexedConnection,
    model: &str,
    version: &str,
    pace: Pace,
    node: Node<'_>,
    mut pacer: Pacer,
    probes: &mut tokio::sync::mpsc::UnboundedReceiver<Duration>,
) -> Result<SweepReport, SweepError> {
    let err = |action| redis_error(action, model, version);
    let checkpoint = node.checkpoint;
    let pattern = keys::version_pattern(model, version);
    let (cursor, deleted_before): (Option<u64>, Option<u64>) = redis::pipe()
        .hget(checkpoint, "cursor")
        .hget(checkpoint, "deleted")
        .query_async(conn)
        .await
        .map_err(err("read the checkpoint"))?;
    let mut report = SweepReport {
        resumed: cursor.is_some(),
        deleted_before: deleted_before.unwrap_or(0),
        baseline_probe: pacer.baseline,
        ..Default::default()
    };
    let batch = pace.batch.max(1);
    let scan = |cursor: u64| {
        let mut cmd = redis::cmd("SCAN");
        cmd.arg(cursor)
            .arg("MATCH")
            .arg(&pattern)
            .arg("COUNT")
            .arg(batch);
        cmd
    };
    let started = Instant::now();
    let mut schedule = Schedule::start();
    let mut budget = ScanBudget::start(conn, batch)
        .await
        .map_err(err("count keys"))?;
    let mut page: (u64, Vec<Vec<u8>>) = scan(cursor.unwrap_or(0))
        .query_async(conn)
        .await
        .map_err(err("scan"))?;
    // Per slot once a node refuses a multi-key UNLINK (a cluster node taken
    // for a single Redis).
    let mut per_slot = node.cluster;
    // Deleted keys not yet added to the checkpoint's count; they go with the
    // next round trip, so a crash can only under-report the earlier count.
    let mut unrecorded = 0u64;
    loop {
        let (next, found) = std::mem::take(&mut page);
        report.scans += 1;
        if next != 0 {
            budget.spend(conn).await.map_err(err("scan"))?;
        }
        // The pattern is exact by construction; checking the prefix again
        // means no pattern bug can ever widen a sweep.
        let doomed: Vec<Vec<u8>> = found
            .into_iter()
            .filter(|k| keys::belongs_to(k, model, version))
            .collect();
        // One round trip per page: its deletes, the checkpoint that covers
        // them, and the SCAN of the next page.
        let (counts, scanned) = loop {
            let groups = unlink_groups(&doomed, per_slot);
            let mut pipe = redis::pipe();
            for group in &groups {
                pipe.cmd("UNLINK").arg(group.as_slice());
            }
            if next != 0 {
                pipe.hset(checkpoint, "cursor", next).ignore();
                pipe.hincr(checkpoint, "deleted", unrecorded).ignore();
                pipe.add_command(scan(next));
            }
            if groups.is_empty() && next == 0 {
                break (0, None);
            }
            match pipe.query_async::<Vec<Value>>(conn).await {
                Ok(values) => {
                    break split_answer(values, groups.len(), next != 0)
                        .map_err(err("read the sweep's answer"))?;
                }
                Err(e) if !per_slot && is_cross_slot(&e) => per_slot = true,
                Err(e) => return Err(err("unlink keys")(e)),
            }
        };
        unrecorded = counts;
        report.deleted += counts;
        let Some(scanned) = scanned else {
            break;
        };
        page = scanned;
        while let Ok(rtt) = probes.try_recv() {
            pacer.observe(rtt);
        }
        // A SCAN call counts as one key, so a peer that answers pages
        // without keys is paced too.
        let pause = schedule.next(counts + 1, pacer.rate(), started.elapsed());
        if !pause.is_zero() {
            tokio::time::sleep(pause).await;
        }
    }
    let _: () = redis::cmd("DEL")
        .arg(checkpoint)
        .query_async(conn)
        .await
        .map_err(err("remove the checkpoint"))?;
    report.elapsed = started.elapsed();
    report.slowdowns = pacer.slowdowns;
    Ok(report)
}

/// The keys of one page, as the key lists of its UNLINK commands: one
/// command for the page (one command to parse and answer, not one per key),
/// or one per cluster slot.
fn unlink_groups(doomed: &[Vec<u8>], per_slot: bool) -> Vec<Vec<&[u8]>> {
    if doomed.is_empty() {
        return Vec::new();
    }
    if !per_slot {
        return vec![doomed.iter().map(Vec::as_slice).collect()];
    }
    let mut slots: std::collections::BTreeMap<u16, Vec<&[u8]>> = Default::default();
    for key in doomed {
        slots.entry(key_slot(key)).or_default().push(key);
    }
    slots.into_values().collect()
}

/// A page's answer: the keys its UNLINKs deleted, and the next page when
/// one was asked for.
type PageAnswer = (u64, Option<(u64, Vec<Vec<u8>>)>);

fn split_answer(
    values: Vec<Value>,
    unlinks: usize,
    scanned: bool,
) -> Result<PageAnswer, RedisError> {
    let mut values = values.into_iter();
    let mut deleted = 0u64;
    for value in values.by_ref().take(unlinks) {
        deleted += redis::from_redis_value::<u64>(value)?;
    }
    let page = match (scanned, values.next()) {
        (true, Some(value)) => Some(redis::from_redis_value(value)?),
        (true, None) => {
            return Err(
                redis::ParsingError::from("the pipeline's answer lacks the SCAN reply").into(),
            );
        }
        (false, _) => None,
    };
    Ok((deleted, page))
}

fn is_cross_slot(e: &RedisError) -> bool {
    e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::CrossSlot)
}

/// One probe's round trip.
async fn time_probe(conn: &mut MultiplexedConnection) -> Result<Duration, RedisError> {
    let sent = Instant::now();
    redis::cmd("PING").query_async::<()>(conn).await?;
    Ok(sent.elapsed())
}

/// SCAN every key matching `pattern`, `batch` at a time, handing each batch
/// to `each`.
pub(crate) async fn scan_all(
    conn: &mut MultiplexedConnection,
    pattern: &str,
    batch: u64,
    mut each: impl FnMut(Vec<Vec<u8>>),
) -> Result<(), redis::RedisError> {
    scan_while(conn, pattern, None, batch, |found| {
        each(found);
        true
    })
    .await
}

/// SCAN the keys matching `pattern` (of Redis type `kind` only, when given),
/// handing each batch to `each` until it returns false.
pub(crate) async fn scan_while(
    conn: &mut (impl redis::aio::ConnectionLike + Send),
    pattern: &str,
    kind: Option<&str>,
    batch: u64,
    mut each: impl FnMut(Vec<Vec<u8>>) -> bool,
) -> Result<(), redis::RedisError> {
    let mut cursor = 0u64;
    let batch = batch.max(1);
    let mut budget = ScanBudget::start(conn, batch).await?;
    loop {
        let mut scan = redis::cmd("SCAN");
        scan.arg(cursor)
            .arg("MATCH")
            .arg(pattern)
            .arg("COUNT")
            .arg(batch);
        if let Some(kind) = kind {
            scan.arg("TYPE").arg(kind);
        }
        let (next, found): (u64, Vec<Vec<u8>>) = scan.query_async(conn).await?;
        if !each(found) {
            return Ok(());
        }
        cursor = next;
        if cursor == 0 {
            return Ok(());
        }
        budget.spend(conn).await?;
    }
}

/// The most SCAN calls one iteration may take, so that a peer whose cursor
/// never returns to 0 (not a Redis, or a broken one) ends in an error instead
/// of a loop that never ends.
///
/// A Redis SCAN call returns `COUNT` keys or visits `10 * COUNT` buckets, and
/// its table holds at most about twice as many buckets as keys, so a full
/// iteration takes about `2 * keys / COUNT` calls. The budget allows twice
/// that, plus room for small databases; when it runs out, DBSIZE is read
/// again, since writers may have grown the keyspace, and only a keyspace
/// that did not grow with the calls is an error. A sweep that ends so
/// resumes from its checkpoint on the next try.
struct ScanBudget {
    batch: u64,
    calls: u64,
    /// DBSIZE when last read.
    keys: u64,
}

impl ScanBudget {
    /// A Redis holds at most 2^32 keys; a DBSIZE above that is not believed.
    const MOST_KEYS: u64 = 1 << 32;
    /// Calls allowed on top of the key-count bound, for small databases.
    const SLACK: u64 = 1024;

    async fn start(
        conn: &mut (impl redis::aio::ConnectionLike + Send),
        batch: u64,
    ) -> Result<Self, RedisError> {
        Ok(ScanBudget {
            batch: batch.max(1),
            calls: 0,
            keys: db_size(conn).await?,
        })
    }

    fn allowed(&self) -> u64 {
        4 * (self.keys / self.batch + 1) + Self::SLACK
    }

    /// Counts one call whose cursor was not 0.
    async fn spend(
        &mut self,
        conn: &mut (impl redis::aio::ConnectionLike + Send),
    ) -> Result<(), RedisError> {
        self.calls += 1;
        if self.calls <= self.allowed() {
            return Ok(());
        }
        self.keys = db_size(conn).await?;
        if self.calls <= self.allowed() {
            return Ok(());
        }
        Err(RedisError::from((
            redis::ErrorKind::Parse,
            "SCAN cursor did not return to 0",
            format!(
                "after {} calls of COUNT {} in a database of {} keys; the peer is not iterating \
                 its keyspace",
                self.calls, self.batch, self.keys
            ),
        )))
    }
}

async fn db_size(conn: &mut (impl redis::aio::ConnectionLike + Send)) -> Result<u64, RedisError> {
    let keys: u64 = redis::cmd("DBSIZE").query_async(conn).await?;
    Ok(keys.min(ScanBudget::MOST_KEYS))
}

/// Counts a version's keys without deleting them (for `--dry-run`).
pub async fn count_version(
    conn: &mut MultiplexedConnection,
    model: &str,
    version: &str,
    batch: u64,
) -> Result<u64, SweepError> {
    let mut count = 0;
    scan_all(
        conn,
        &keys::version_pattern(model, version),
        batch,
        |found| {
            count += found
                .iter()
                .filter(|k| keys::belongs_to(k, model, version))
                .count() as u64;
        },
    )
    .await
    .map_err(|source| SweepError::Redis {
        action: "scan",
        model: model.to_owned(),
        version: version.to_owned(),
        source,
    })?;
    Ok(count)
}

/// The versions of `model` that have keys, found by one SCAN of the model's
/// prefix. For `modelcache invalidate`, which runs without the registry.
pub async fn versions_with_keys(
    conn: &mut MultiplexedConnection,
    model: &str,
    batch: u64,
) -> Result<BTreeSet<String>, SweepError> {
    let pattern = format!("{}*", keys::glob_escape(&keys::model_prefix(model)));
    let mut versions = BTreeSet::new();
    scan_all(conn, &pattern, batch, |found| {
        versions.extend(found.iter().filter_map(|key| keys::version_of(key, model)));
    })
    .await
    .map_err(|source| SweepError::Discover {
        model: model.to_owned(),
        source,
    })?;
    Ok(versions)
}

/// `FLUSHDB ASYNC`, for a Redis that serves this model alone. It refuses when
/// a sample of keys shows anything else in the database.
pub async fn flush_model_db(
    conn: &mut MultiplexedConnection,
    model: &str,
) -> Result<(), SweepError> {
    let err = |action: &'static str| {
        let model = model.to_owned();
        move |source| SweepError::Redis {
            action,
            model,
            version: "*".into(),
            source,
        }
    };
    let ours = |k: &str| {
        k.starts_with(&keys::model_prefix(model)) || k.starts_with(&keys::model_meta(model))
    };
    for _ in 0..100 {
        let key: Option<String> = redis::cmd("RANDOMKEY")
            .query_async(conn)
            .await
            .map_err(err("sample keys"))?;
        match key {
            None => break,
            Some(k) if !ours(&k) => return Err(SweepError::NotDedicated { key: k }),
            Some(_) => {}
        }
    }
    redis::cmd("FLUSHDB")
        .arg("ASYNC")
        .query_async::<()>(conn)
        .await
        .map_err(err("flush"))
}

/// What `modelcache invalidate` found and did for one version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VersionOutcome {
    /// The version.
    pub version: String,
    /// Keys found (dry run) or deleted.
    pub keys: u64,
    /// What the sweep did; `None` on a dry run.
    pub report: Option<SweepReport>,
}

/// Why `modelcache invalidate` failed or refused.
/// Each variant is documented by its message.
#[derive(Debug, thiserror::Error)]
#[allow(missing_docs)]
pub enum InvalidateError {
    #[error(transparent)]
    Sweep(#[from] SweepError),
    #[error(
        "refused to sweep version {version:?} of model {model:?}: it is the active version in the \
         registry; add it to --keep, or activate another version first"
    )]
    ActiveVersion { model: String, version: String },
    #[error("failed to read the registry of model {model:?}")]
    Registry {
        model: String,
        #[source]
        source: crate::keyspace::registry::RegistryError,
    },
    #[error("failed to connect to Redis")]
    Connect(#[source] crate::store::live::LiveError),
}

impl VersionOutcome {
    /// One line for the command's output.
    pub fn describe(&self) -> String {
        let (keys, version) = (self.keys, &self.version);
        match &self.report {
            None => format!("would delete {keys} keys of version {version:?}"),
            Some(r) => {
                let resumed = if r.resumed {
                    format!(" (resumed; {} deleted before)", r.deleted_before)
                } else {
                    String::new()
                };
                let seconds = r.elapsed.as_secs_f64();
                format!("deleted {keys} keys of version {version:?} in {seconds:.2}s{resumed}")
            }
        }
    }
}

/// [`invalidate`] on one Redis, or [`invalidate_cluster`] on every primary
/// of the cluster `target` belongs to.
pub async fn invalidate_target(
    target: &crate::store::RedisTarget,
    model: &str,
    keep: &BTreeSet<String>,
    dry_run: bool,
    pace: Pace,
    cluster: bool,
) -> Result<Vec<VersionOutcome>, InvalidateError> {
    if cluster {
        return invalidate_cluster(target, model, keep, dry_run, pace).await;
    }
    let mut conn = target.connect().await.map_err(InvalidateError::Connect)?;
    let probe = target.connect().await.map_err(InvalidateError::Connect)?;
    invalidate(&mut conn, Some(probe), model, keep, dry_run, pace).await
}

/// Sweeps every version of `model` that has keys and is not in `keep`. With
/// `dry_run` it only counts. It never sweeps the registry's active version.
/// `probe` is as for [`sweep_version`].
pub async fn invalidate(
    conn: &mut MultiplexedConnection,
    mut probe: Option<MultiplexedConnection>,
    model: &str,
    keep: &BTreeSet<String>,
    dry_run: bool,
    pace: Pace,
) -> Result<Vec<VersionOutcome>, InvalidateError> {
    let mut sweeper = conn.clone();
    let sweep = async |version: &str| {
        sweep_version(&mut sweeper, probe.as_mut(), model, version, pace).await
    };
    invalidate_on(
        conn.clone(),
        vec![conn.clone()],
        model,
        keep,
        dry_run,
        pace,
        sweep,
    )
    .await
}

/// What single-node and cluster invalidation share: `registry` is a
/// connection to the node holding the model's registry, `nodes` one to every
/// node holding cache keys, and `sweep` deletes one version everywhere.
async fn invalidate_on(
    mut registry: MultiplexedConnection,
    mut nodes: Vec<MultiplexedConnection>,
    model: &str,
    keep: &BTreeSet<String>,
    dry_run: bool,
    pace: Pace,
    mut sweep: impl AsyncFnMut(&str) -> Result<SweepReport, SweepError>,
) -> Result<Vec<VersionOutcome>, InvalidateError> {
    let state = crate::keyspace::registry::read(&mut registry, model)
        .await
        .map_err(|source| InvalidateError::Registry {
            model: model.to_owned(),
            source,
        })?;
    let mut found = BTreeSet::new();
    for conn in &mut nodes {
        found.extend(versions_with_keys(conn, model, pace.batch).await?);
    }
    let retired: Vec<String> = found.into_iter().filter(|v| !keep.contains(v)).collect();
    if let Some(active) = state.active.as_ref().filter(|a| retired.contains(a)) {
        return Err(InvalidateError::ActiveVersion {
            model: model.to_owned(),
            version: active.clone(),
        });
    }
    let mut outcomes = Vec::new();
    for version in retired {
        if dry_run {
            let mut keys = 0;
            for conn in &mut nodes {
                keys += count_version(conn, model, &version, pace.batch).await?;
            }
            outcomes.push(VersionOutcome {
                version,
                keys,
                report: None,
            });
            continue;
        }
        let report = sweep(&version).await?;
        if state.live.contains(&version) {
            // Best effort: the sweep itself is what matters.
            let _ = crate::keyspace::registry::transition(
                &mut registry,
                model,
                &version,
                crate::keyspace::registry::Transition::Retire,
            )
            .await;
        }
        outcomes.push(VersionOutcome {
            version,
            keys: report.deleted,
            report: Some(report),
        });
    }
    Ok(outcomes)
}

fn redis_error(
    action: &'static str,
    model: &str,
    version: &str,
) -> impl FnOnce(RedisError) -> SweepError {
    let (model, version) = (model.to_owned(), version.to_owned());
    move |source| SweepError::Redis {
        action,
        model,
        version,
        source,
    }
}

async fn connect_node(
    target: &crate::store::RedisTarget,
) -> Result<MultiplexedConnection, SweepError> {
    target.connect().await.map_err(|e| SweepError::Node {
        address: target.url.clone(),
        message: crate::error::chain(&e),
    })
}

/// The primaries of the cluster that `seed` belongs to.
pub async fn cluster_primaries(
    seed: &crate::store::RedisTarget,
) -> Result<Vec<Primary>, SweepError> {
    let mut conn = connect_node(seed).await?;
    let nodes: String = redis::cmd("CLUSTER")
        .arg("NODES")
        .query_async(&mut conn)
        .await
        .map_err(|source| SweepError::Node {
            address: seed.url.clone(),
            message: format!("CLUSTER NODES failed: {source}"),
        })?;
    Ok(parse_cluster_nodes(&nodes))
}

/// The same credentials, pointed at one primary.
pub fn node_target(
    seed: &crate::store::RedisTarget,
    primary: &Primary,
) -> crate::store::RedisTarget {
    let scheme = if seed.url.starts_with("rediss://") {
        "rediss"
    } else {
        "redis"
    };
    crate::store::RedisTarget {
        url: format!("{scheme}://{}", primary.address),
        ..seed.clone()
    }
}

/// The primary that owns `key`'s slot, for commands on the model's own keys.
pub fn owner<'a>(primaries: &'a [Primary], key: &str) -> Option<&'a Primary> {
    let slot = key_slot(key.as_bytes());
    primaries
        .iter()
        .find(|p| p.slots.iter().any(|(a, b)| (*a..=*b).contains(&slot)))
}

/// `modelcache invalidate` on a Redis Cluster: versions are found, counted and
/// swept on every primary, and the registry is read on the node that owns it.
pub async fn invalidate_cluster(
    seed: &crate::store::RedisTarget,
    model: &str,
    keep: &BTreeSet<String>,
    dry_run: bool,
    pace: Pace,
) -> Result<Vec<VersionOutcome>, InvalidateError> {
    let primaries = cluster_primaries(seed).await?;
    let registry_node =
        owner(&primaries, &keys::registry(model)).ok_or_else(|| SweepError::Node {
            address: seed.url.clone(),
            message: "no primary owns the registry's slot".into(),
        })?;
    let registry = connect_node(&node_target(seed, registry_node)).await?;
    let mut nodes = Vec::new();
    for p in &primaries {
        nodes.push(connect_node(&node_target(seed, p)).await?);
    }
    let sweep = async |version: &str| {
        Ok(sweep_cluster_version(seed, model, version, pace)
            .await?
            .total())
    };
    invalidate_on(registry, nodes, model, keep, dry_run, pace, sweep).await
}

/// A primary of a Redis Cluster, from `CLUSTER NODES`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Primary {
    /// The node's id.
    pub id: String,
    /// `host:port`
    pub address: String,
    /// Inclusive slot ranges.
    pub slots: Vec<(u16, u16)>,
}

/// The primaries in `CLUSTER NODES` output (failed ones left out).
pub fn parse_cluster_nodes(text: &str) -> Vec<Primary> {
    text.lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            if fields.len() < 8 {
                return None;
            }
            let flags = fields[2];
            if !flags.split(',').any(|f| f == "master") || flags.contains("fail") {
                return None;
            }
            let address = fields[1].split('@').next()?.to_string();
            let slots = fields[8..]
                .iter()
                .filter(|s| !s.starts_with('['))
                .filter_map(|s| match s.split_once('-') {
                    Some((a, b)) => Some((a.parse().ok()?, b.parse().ok()?)),
                    None => s.parse().ok().map(|n| (n, n)),
                })
                .collect();
            Some(Primary {
                id: fields[0].to_string(),
                address,
                slots,
            })
        })
        .collect()
}

/// CRC16-CCITT (XMODEM), as Redis Cluster uses to place keys.
fn crc16(data: &[u8]) -> u16 {
    let mut crc: u16 = 0;
    for &b in data {
        crc ^= u16::from(b) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc
}

/// The cluster slot of a key (its hash tag, if it has one).
pub fn key_slot(key: &[u8]) -> u16 {
    let hashed = key
        .iter()
        .position(|b| *b == b'{')
        .and_then(|open| {
            let close = key[open + 1..].iter().position(|b| *b == b'}')?;
            (close > 0).then(|| &key[open + 1..open + 1 + close])
        })
        .unwrap_or(key);
    crc16(hashed) % 16384
}

/// A checkpoint key that `primary` owns, so the node's own sweep can write it.
/// Its hash tag (the first braces) is chosen to land in one of the node's
/// slots; `~` in the tag keeps it apart from every model's `{<model>}` tag,
/// since an escaped model never contains `~`. `None` if the node owns no slot.
fn node_checkpoint(model: &str, version: &str, primary: &Primary) -> Option<String> {
    (0u32..65_536).find_map(|i| {
        let tag = format!("~n{i}");
        let slot = crc16(tag.as_bytes()) % 16384;
        primary
            .slots
            .iter()
            .any(|(a, b)| (*a..=*b).contains(&slot))
            .then(|| {
                format!(
                    "{}:~{{{tag}}}:sweep:{}:{}:{}",
                    keys::ROOT,
                    keys::escape(model),
                    keys::escape(version),
                    primary.id
                )
            })
    })
}

/// What a sweep of a Redis Cluster did on each primary.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClusterSweepReport {
    /// Per primary address.
    pub primaries: Vec<(String, SweepReport)>,
}

impl ClusterSweepReport {
    /// Keys deleted on every primary.
    pub fn deleted(&self) -> u64 {
        self.primaries.iter().map(|(_, r)| r.deleted).sum()
    }

    /// The sweep of the whole cluster as one report.
    pub fn total(&self) -> SweepReport {
        let sum = |f: fn(&SweepReport) -> u64| self.primaries.iter().map(|(_, r)| f(r)).sum();
        SweepReport {
            deleted: sum(|r| r.deleted),
            deleted_before: sum(|r| r.deleted_before),
            scans: sum(|r| r.scans),
            resumed: self.primaries.iter().any(|(_, r)| r.resumed),
            elapsed: self.primaries.iter().map(|(_, r)| r.elapsed).sum(),
            // Each node has its own; the slowest speaks for the cluster.
            baseline_probe: self
                .primaries
                .iter()
                .filter_map(|(_, r)| r.baseline_probe)
                .max(),
            slowdowns: sum(|r| r.slowdowns),
        }
    }
}

/// Sweeps a version on every primary of a Redis Cluster. Cache entries carry
/// no hash tag, so a version's keys are on every primary; SCAN only sees the
/// node it runs on, so each primary is swept in turn, with its own checkpoint
/// (a key that node owns) so that a killed sweep resumes on every node.
pub async fn sweep_cluster_version(
    seed: &crate::store::RedisTarget,
    model: &str,
    version: &str,
    pace: Pace,
) -> Result<ClusterSweepReport, SweepError> {
    let mut report = ClusterSweepReport::default();
    for primary in cluster_primaries(seed).await? {
        let mut conn = connect_node(&node_target(seed, &primary)).await?;
        let Some(checkpoint) = node_checkpoint(model, version, &primary) else {
            continue; // a primary without slots holds no keys
        };
        // The probe times this node, the one the sweep slows down.
        let mut probe = connect_node(&node_target(seed, &primary)).await?;
        let node = Node {
            checkpoint: &checkpoint,
            cluster: true,
        };
        let r = sweep_node(&mut conn, Some(&mut probe), model, version, pace, node).await?;
        report.primaries.push((primary.address, r));
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_slots_match_redis() {
        // Known answers from CLUSTER KEYSLOT.
        assert_eq!(key_slot(b"foo"), 12182);
        assert_eq!(key_slot(b"123456789"), 12739);
        assert_eq!(
            key_slot(b"{user1000}.following"),
            key_slot(b"{user1000}.followers")
        );
        assert_eq!(key_slot(b"foo{}{bar}"), key_slot(b"foo{}{bar}"));
        assert_eq!(
            key_slot(b"{}foo"),
            crc16(b"{}foo") % 16384,
            "an empty tag hashes the whole key"
        );
    }

    #[test]
    fn cluster_nodes_are_parsed() {
        let text = "07c3 127.0.0.1:30004@31004 slave e7d1 0 1426238317239 4 connected\n\
                    67ed 127.0.0.1:30002@31002 master - 0 1426238316232 2 connected 5461-10922\n\
                    e7d1 127.0.0.1:30001@31001 myself,master - 0 0 1 connected 0-5460 [5461->-67ed]\n\
                    dead 127.0.0.1:30009@31009 master,fail - 0 0 1 disconnected 10923-16383\n";
        let primaries = parse_cluster_nodes(text);
        assert_eq!(primaries.len(), 2);
        assert_eq!(primaries[0].address, "127.0.0.1:30002");
        assert_eq!(primaries[0].slots, vec![(5461, 10922)]);
        assert_eq!(primaries[1].slots, vec![(0, 5460)]);
        let checkpoint = node_checkpoint("m", "v1", &primaries[1]).unwrap();
        assert!(key_slot(checkpoint.as_bytes()) <= 5460, "{checkpoint}");
        assert!(
            checkpoint.starts_with("mc:~{~n"),
            "never under a version or a model's tag: {checkpoint}"
        );
        let none = Primary {
            id: "x".into(),
            address: "a:1".into(),
            slots: vec![],
        };
        assert_eq!(node_checkpoint("m", "v1", &none), None);
    }
}
