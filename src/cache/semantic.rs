//! Semantic cache: an answer is served for a question whose embedding is
//! similar enough (cosine at or above a calibrated threshold) to one asked
//! before, under the same model version.
//!
//! ```text
//! mc:<model>:<version>:semantic:<sha256(query)>   hash: v (f32 LE vector), q (query),
//!                                                 r (answer, codec JSON), m (metadata JSON),
//!                                                 o (per-entry mode: verified outcomes)
//! mc:~{<model>}:semantic-events                   stream: op (put|del), version, id
//! ```
//!
//! Redis holds the entries; every replica keeps an in-process index
//! ([`super::index::Index`]) of the current version's vectors. At start (and
//! when the active version changes) the index is rebuilt by scanning the
//! version's keys; after that a follower task applies the event stream, read
//! from the position noted *before* the scan, so an entry stored by any
//! replica is found by every replica and none is missed in between.
//!
//! Redis stays the truth: a candidate from the index is served only if its
//! hash is still in Redis. An entry that expired or was evicted there is
//! dropped from the index and never produces a hit. The index holds at most
//! `max_entries`: the replica that stores an entry beyond that deletes its
//! least recently used one (by its own hits) from Redis and announces it,
//! so every index and Redis agree on what is cached. Followers do not evict
//! on their own (they would delete different entries), unless the writer's
//! announcement is overdue by more than a tenth of the bound.
//! Values are JSON behind the codec's format tag; vectors are raw f32.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::{Mutex, RwLock};

use redis::aio::MultiplexedConnection;
use serde_json::Value;

use super::codec;
pub use super::guard::guard_allows;
use super::index::Index;
use super::per_entry::{self, Observation, Prior};
use super::{CacheError, Connection, Versions};
use crate::keyspace::keys::{self, Layer};

/// Events kept in the stream (approximately): replicas further behind than
/// this rebuild their index from a scan.
const EVENT_LOG_LENGTH: usize = 100_000;
/// Nearest entries checked against the threshold and Redis per lookup.
const CANDIDATES: usize = 4;

/// How the cache decides and how much it keeps.
#[derive(Debug, Clone)]
pub struct SemanticConfig {
    /// Cosine similarity at or above which an answer is served: from
    /// `modelcache calibrate` (the CachePolicy's `semantic.threshold`).
    /// With `per_entry`, the similarity from which a candidate is considered
    /// at all (served if its outcomes allow, else offered for verification).
    pub threshold: f32,
    /// Per-entry thresholds learned from verified outcomes, instead of one.
    pub per_entry: Option<PerEntryConfig>,
    /// Seconds an entry lives (`ttlSeconds.semantic`); 0 for none.
    pub ttl_seconds: i64,
    /// Entries one replica indexes, and the cache holds, at most.
    pub max_entries: usize,
}

impl SemanticConfig {
    /// The config a CachePolicy asks for. Its `semantic.threshold` must be
    /// set (from `modelcache calibrate`): a guessed default is how the
    /// reference design's 0.92 came to serve one wrong answer in six on
    /// Quora pairs.
    pub fn from_policy(
        policy: &crate::crd::CachePolicySpec,
        max_entries: usize,
    ) -> Result<SemanticConfig, String> {
        if policy.semantic.mode == crate::crd::cache_policy::SemanticMode::PerEntry {
            return Self::from_per_entry_policy(policy, max_entries);
        }
        let threshold = policy.semantic.threshold.ok_or_else(|| {
            format!(
                "the CachePolicy sets no semantic.threshold; run `modelcache calibrate` on labeled pairs for maxFalseHitRate {} and set the threshold it picks",
                policy.semantic.max_false_hit_rate
            )
        })?;
        Ok(SemanticConfig {
            threshold: threshold as f32,
            per_entry: None,
            ttl_seconds: policy.ttl_seconds.semantic,
            max_entries,
        })
    }

    fn from_per_entry_policy(
        policy: &crate::crd::CachePolicySpec,
        max_entries: usize,
    ) -> Result<SemanticConfig, String> {
        let p = policy.semantic.prior.as_ref().ok_or_else(|| {
            "the CachePolicy sets semantic.mode PerEntry but no semantic.prior; run `modelcache calibrate` on labeled pairs and copy the prior it prints (steepness, midpoint)".to_string()
        })?;
        let prior = Prior {
            steepness: p.steepness,
            midpoint: p.midpoint,
            spread: p.spread,
        };
        Ok(SemanticConfig {
            threshold: policy.semantic.threshold.unwrap_or(prior.explore_from()) as f32,
            per_entry: Some(PerEntryConfig {
                prior,
                max_false_hit_rate: policy.semantic.max_false_hit_rate,
            }),
            ttl_seconds: policy.ttl_seconds.semantic,
            max_entries,
        })
    }
}

/// Per-entry thresholds ([`super::per_entry`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PerEntryConfig {
    /// The prior each entry's threshold starts from.
    pub prior: Prior,
    /// The CachePolicy's `maxFalseHitRate`: an entry serves a query only
    /// when its answer is right with at least one minus this chance.
    pub max_false_hit_rate: f64,
}

/// A served answer.
#[derive(Debug, Clone, PartialEq)]
pub struct SemanticHit {
    /// The cached answer.
    pub answer: Value,
    /// The question the answer was stored for.
    pub query: String,
    /// How similar the question was to the cached one.
    pub similarity: f32,
    /// What the entry was stored with.
    pub metadata: Value,
}

/// What a lookup found.
#[derive(Debug, Clone, PartialEq)]
pub enum Lookup {
    /// A cached answer close enough to serve.
    Hit(SemanticHit),
    /// Per-entry mode: the nearest entry is not yet trusted at this
    /// similarity. Call the LLM, compare its answer with the candidate's,
    /// and report with [`SemanticCache::record`]: that is how the entry
    /// learns its threshold.
    Verify(Candidate),
    /// Nothing close enough: ask the source.
    Miss,
}

/// An entry offered for verification.
#[derive(Debug, Clone, PartialEq)]
pub struct Candidate {
    /// The entry's answer, question, similarity and metadata.
    pub entry: SemanticHit,
    /// The chance, given its outcomes so far, that its answer is right.
    pub p_correct: f64,
    version: String,
    id: String,
}

/// Counters of one cache.
#[derive(Debug, Default)]
pub struct SemanticStats {
    /// Lookups served.
    pub hits: AtomicU64,
    /// Lookups sent to the source.
    pub misses: AtomicU64,
    /// Index candidates whose entry was gone from Redis (expired, evicted).
    pub stale: AtomicU64,
    /// Entries evicted to keep within `max_entries`.
    pub evicted: AtomicU64,
    /// Candidates above the threshold refused by [`guard_allows`].
    pub guarded: AtomicU64,
    /// Lookups and stores made while the index was being rebuilt for a new
    /// version (lookups count as misses too).
    pub rebuilding: AtomicU64,
    /// Per-entry mode: candidates offered for verification (counted as
    /// misses too), and outcomes recorded.
    pub verify: AtomicU64,
    /// Outcomes recorded for per-entry thresholds.
    pub recorded: AtomicU64,
}

struct State {
    version: Option<String>,
    dim: usize,
    /// One index per partition: an entry only ever matches queries of its
    /// own partition (the gateway's scope: caller, system prompt, earlier
    /// turns, sampling). The unpartitioned API uses `""`.
    indexes: HashMap<String, Index>,
    /// Each indexed entry's partition.
    partition_of: HashMap<String, String>,
    /// Least recently used first: tick → id, and id → tick.
    by_tick: BTreeMap<u64, String>,
    ticks: HashMap<String, u64>,
    tick: u64,
    /// Stream position the index is current with.
    cursor: String,
}

impl State {
    fn new(dim: usize) -> State {
        State {
            version: None,
            dim,
            indexes: HashMap::new(),
            partition_of: HashMap::new(),
            by_tick: BTreeMap::new(),
            ticks: HashMap::new(),
            tick: 0,
            cursor: "0-0".into(),
        }
    }

    fn touch(&mut self, id: &str) {
        self.tick += 1;
        if let Some(old) = self.ticks.insert(id.to_owned(), self.tick) {
            self.by_tick.remove(&old);
        }
        self.by_tick.insert(self.tick, id.to_owned());
    }

    fn forget(&mut self, id: &str) {
        self.unindex(id);
        if let Some(t) = self.ticks.remove(id) {
            self.by_tick.remove(&t);
        }
    }

    fn unindex(&mut self, id: &str) {
        let Some(partition) = self.partition_of.remove(id) else {
            return;
        };
        if let Some(index) = self.indexes.get_mut(&partition) {
            index.remove(id);
            if index.is_empty() {
                self.indexes.remove(&partition);
            }
        }
    }

    fn insert(&mut self, partition: &str, id: &str, vector: &[f32]) {
        if self.partition_of.get(id).is_some_and(|p| p != partition) {
            self.unindex(id);
        }
        let dim = self.dim;
        self.indexes
            .entry(partition.to_owned())
            .or_insert_with(|| Index::new(dim))
            .insert(id, vector);
        self.partition_of
            .insert(id.to_owned(), partition.to_owned());
    }

    fn len(&self) -> usize {
        self.partition_of.len()
    }

    fn search(&self, partition: &str, vector: &[f32], k: usize) -> Vec<super::index::Neighbour> {
        self.indexes
            .get(partition)
            .map_or_else(Vec::new, |index| index.search(vector, k))
    }

    /// Drop the least recently used entry from the index and return its id.
    fn evict_lru(&mut self) -> Option<String> {
        let (_, id) = self.by_tick.pop_first()?;
        self.ticks.remove(&id);
        self.unindex(&id);
        Some(id)
    }
}

/// The semantic cache of one model. Clones share the index; the follower
/// stops when the last clone is dropped.
#[derive(Clone)]
pub struct SemanticCache<C = MultiplexedConnection> {
    core: Core<C>,
    follower: Arc<FollowerGuard>,
}

/// What the follower task shares with the handles.
#[derive(Clone)]
struct Core<C> {
    conn: C,
    model: String,
    versions: Versions,
    config: SemanticConfig,
    state: Arc<RwLock<State>>,
    /// Serializes rebuilds, so two lookups after a version change scan once.
    rebuild: Arc<tokio::sync::Mutex<()>>,
    stats: Arc<SemanticStats>,
}

struct FollowerGuard(Mutex<Option<tokio::task::JoinHandle<()>>>);

impl Drop for FollowerGuard {
    fn drop(&mut self) {
        if let Some(task) = self.0.get_mut().take() {
            task.abort();
        }
    }
}

fn vector_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// A stored vector, if it is one the index may use: `dim` finite numbers of
/// unit length. Entries are written by every replica (and whatever else can
/// reach Redis), so one that is not is left out of the index.
pub(crate) fn bytes_vector(b: &[u8], dim: usize) -> Option<Vec<f32>> {
    if b.len() != dim * 4 {
        return None;
    }
    let v: Vec<f32> = b
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    crate::vector::is_unit(&v, dim).then_some(v)
}

/// The entry id of a question: its sha256, so one question is one entry.
pub fn entry_id(query: &str) -> String {
    codec::sha256_hex(query.as_bytes())
}

/// The entry id of a question in a partition (one entry per question per
/// partition); [`entry_id`] for the unpartitioned `""`.
pub fn partitioned_entry_id(partition: &str, query: &str) -> String {
    if partition.is_empty() {
        return entry_id(query);
    }
    codec::sha256_hex(format!("{partition}\n{query}").as_bytes())
}

impl<C: Connection> SemanticCache<C> {
    /// A cache of vectors of `dim` dimensions. Call [`SemanticCache::start`]
    /// to build the index and follow other replicas.
    pub fn new(
        conn: C,
        model: &str,
        versions: Versions,
        dim: usize,
        config: SemanticConfig,
    ) -> SemanticCache<C> {
        SemanticCache {
            core: Core {
                conn,
                model: model.to_owned(),
                versions,
                config,
                state: Arc::new(RwLock::new(State::new(dim))),
                rebuild: Arc::new(tokio::sync::Mutex::new(())),
                stats: Arc::new(SemanticStats::default()),
            },
            follower: Arc::new(FollowerGuard(Mutex::new(None))),
        }
    }

    /// The counters.
    pub fn stats(&self) -> &SemanticStats {
        &self.core.stats
    }

    /// Entries in this replica's index.
    pub fn indexed(&self) -> usize {
        self.core.state.read().len()
    }

    /// Build the index for the current version and follow the event stream
    /// with a connection of its own from `client`.
    pub async fn start(&self, client: redis::Client) -> Result<(), CacheError> {
        self.core.ensure_version().await?;
        let core = self.core.clone();
        let task = tokio::spawn(async move {
            let what = format!("semantic cache follower of model {:?}", core.model);
            crate::keyspace::registry::reconnecting(
                &what,
                || core.follow(&client),
                // Events trimmed from the stream while away would be lost:
                // rebuild from Redis once connected again.
                || core.state.write().version = None,
            )
            .await
        });
        *self.follower.0.lock() = Some(task);
        Ok(())
    }

    /// The cached answer for `query`, whose embedding is `vector` (unit
    /// length, from the same model that stored the entries): the most
    /// similar entry at or above the threshold that the guard allows.
    pub async fn get(
        &self,
        query: &str,
        vector: &[f32],
    ) -> Result<Option<SemanticHit>, CacheError> {
        Ok(match self.core.lookup("", query, vector).await? {
            Lookup::Hit(hit) => Some(hit),
            Lookup::Verify(_) | Lookup::Miss => None,
        })
    }

    /// Like [`SemanticCache::get`], and in per-entry mode also the
    /// candidate to verify when the nearest entry is not trusted yet.
    pub async fn lookup(&self, query: &str, vector: &[f32]) -> Result<Lookup, CacheError> {
        self.core.lookup("", query, vector).await
    }

    /// Like [`SemanticCache::lookup`], among the entries of `partition`
    /// only: what must match exactly besides the question (a caller's scope,
    /// a system prompt, earlier turns) goes into the partition's name.
    pub async fn lookup_in(
        &self,
        partition: &str,
        query: &str,
        vector: &[f32],
    ) -> Result<Lookup, CacheError> {
        self.core.lookup(partition, query, vector).await
    }

    /// Like [`SemanticCache::put`], into `partition` (see
    /// [`SemanticCache::lookup_in`]).
    pub async fn put_in(
        &self,
        partition: &str,
        query: &str,
        vector: &[f32],
        answer: &Value,
        metadata: &Value,
    ) -> Result<(), CacheError> {
        self.core
            .put(partition, query, vector, answer, metadata)
            .await
    }

    /// Record whether `candidate`'s answer was right for the query it was
    /// offered for. The outcome is kept with the entry in Redis, so every
    /// replica decides with it; an entry gone meanwhile is left gone.
    pub async fn record(&self, candidate: &Candidate, correct: bool) -> Result<(), CacheError> {
        self.core.record(candidate, correct).await
    }

    /// Store `answer` for `query` (embedded as `vector`) under the current
    /// version, and announce it to the other replicas.
    pub async fn put(
        &self,
        query: &str,
        vector: &[f32],
        answer: &Value,
        metadata: &Value,
    ) -> Result<(), CacheError> {
        self.core.put("", query, vector, answer, metadata).await
    }
}

impl<C: Connection> Core<C> {
    fn redis_error(&self, action: &'static str) -> impl FnOnce(redis::RedisError) -> CacheError {
        super::redis_error(&self.model, "semantic", action)
    }

    fn key(&self, version: &str, id: &str) -> String {
        keys::entry(&self.model, version, Layer::Semantic, id)
    }

    /// Apply events from the stream until the connection fails.
    async fn follow(&self, client: &redis::Client) -> Result<(), CacheError> {
        let mut conn = client
            .get_multiplexed_async_connection_with_config(
                &redis::AsyncConnectionConfig::new().set_response_timeout(None),
            )
            .await
            .map_err(self.redis_error("connect the follower of"))?;
        loop {
            // A version change rebuilds (and moves the cursor).
            self.ensure_version().await?;
            let cursor = self.state.read().cursor.clone();
            let reply: Option<crate::keyspace::registry::StreamReply> = redis::cmd("XREAD")
                .arg("COUNT")
                .arg(1000)
                .arg("BLOCK")
                .arg(1000)
                .arg("STREAMS")
                .arg(keys::semantic_events(&self.model))
                .arg(&cursor)
                .query_async(&mut conn)
                .await
                .map_err(self.redis_error("read the events of"))?;
            let Some(streams) = reply else { continue };
            for (_, entries) in streams {
                for (id, fields) in entries {
                    self.apply_event(&fields).await?;
                    // A rebuild meanwhile may have moved past it already.
                    let mut state = self.state.write();
                    if stream_id_after(&id, &state.cursor) {
                        state.cursor = id;
                    }
                }
            }
        }
    }

    async fn apply_event(&self, fields: &[(String, String)]) -> Result<(), CacheError> {
        let field = |name: &str| {
            fields
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.as_str())
        };
        let (Some(op), Some(version), Some(id)) = (field("op"), field("version"), field("id"))
        else {
            return Ok(());
        };
        let current = self.state.read().version.clone();
        if current.as_deref() != Some(version) {
            return Ok(());
        }
        match op {
            "put" => {
                let mut conn = self.conn.clone();
                let (bytes, partition): (Option<Vec<u8>>, Option<String>) = redis::cmd("HMGET")
                    .arg(self.key(version, id))
                    .arg("v")
                    .arg("p")
                    .query_async(&mut conn)
                    .await
                    .map_err(self.redis_error("read an entry of"))?;
                let mut state = self.state.write();
                let dim = state.dim;
                if let Some(v) = bytes.and_then(|b| bytes_vector(&b, dim)) {
                    state.insert(partition.as_deref().unwrap_or_default(), id, &v);
                    state.touch(id);
                }
                // The replica that stored it evicts (from Redis, announced);
                // a follower evicting too would delete other entries as
                // well. Only when that announcement is long overdue does the
                // follower drop entries itself, from its index alone.
                let slack = self.config.max_entries + self.config.max_entries / 10 + 16;
                while state.len() > slack && state.evict_lru().is_some() {}
            }
            "del" => self.state.write().forget(id),
            _ => {}
        }
        Ok(())
    }

    /// Rebuild the index if the current version is not the indexed one.
    async fn ensure_version(&self) -> Result<String, CacheError> {
        let version = self.versions.require(&self.model)?;
        if self.state.read().version.as_deref() == Some(&version) {
            return Ok(version);
        }
        let _one = self.rebuild.lock().await;
        if self.state.read().version.as_deref() == Some(&version) {
            return Ok(version);
        }
        let mut conn = self.conn.clone();
        // The stream position first: events after it are applied on top of
        // the scan, so nothing stored during the scan is missed.
        let cursor = crate::keyspace::registry::last_stream_id(
            &mut conn,
            &keys::semantic_events(&self.model),
        )
        .await
        .map_err(self.redis_error("read the events of"))?;
        let pattern = format!(
            "{}*",
            keys::glob_escape(&keys::entry(&self.model, &version, Layer::Semantic, ""))
        );
        // Entries are hashes: any other key under the prefix (a stray SET)
        // would fail the whole HGET pipeline. The index holds max_entries
        // at most, so no more are read.
        let mut found: Vec<Vec<u8>> = Vec::new();
        let cap = self.config.max_entries;
        crate::keyspace::sweep::scan_while(&mut conn, &pattern, Some("hash"), 1000, |keys| {
            found.extend(keys);
            found.len() < cap
        })
        .await
        .map_err(self.redis_error("scan"))?;
        found.truncate(cap);
        let dim = self.state.read().dim;
        let mut indexed = State::new(dim);
        let mut ids = Vec::new();
        for chunk in found.chunks(512) {
            let mut pipe = redis::pipe();
            for key in chunk {
                pipe.cmd("HMGET").arg(key).arg("v").arg("p");
            }
            let vectors: Vec<(Option<Vec<u8>>, Option<String>)> = pipe
                .query_async(&mut conn)
                .await
                .map_err(self.redis_error("read the entries of"))?;
            for (key, (bytes, partition)) in chunk.iter().zip(vectors) {
                let id = String::from_utf8_lossy(key)
                    .rsplit(':')
                    .next()
                    .unwrap_or_default()
                    .to_string();
                if let Some(v) = bytes.and_then(|b| bytes_vector(&b, dim)) {
                    indexed.insert(partition.as_deref().unwrap_or_default(), &id, &v);
                    ids.push(id);
                }
            }
        }
        let mut state = self.state.write();
        state.indexes = indexed.indexes;
        state.partition_of = indexed.partition_of;
        state.by_tick.clear();
        state.ticks.clear();
        for id in &ids {
            state.touch(id);
        }
        state.version = Some(version.clone());
        state.cursor = cursor;
        tracing::info!(model = %self.model, version = %version, entries = ids.len(), "semantic index built");
        Ok(version)
    }

    /// The version the index is current for, when it is `version`;
    /// otherwise the index is rebuilt in the background and `None` returned,
    /// so that no request waits for a rebuild (tens of seconds at 100k).
    fn indexed_or_rebuild(&self, version: &str) -> bool {
        if self.state.read().version.as_deref() == Some(version) {
            return true;
        }
        if self.rebuild.try_lock().is_ok() {
            let core = self.clone();
            tokio::spawn(async move {
                if let Err(e) = core.ensure_version().await {
                    tracing::warn!(error = %crate::error::chain(&e), "semantic index rebuild failed");
                }
            });
        }
        self.stats.rebuilding.fetch_add(1, Ordering::Relaxed);
        false
    }

    async fn lookup(
        &self,
        partition: &str,
        text: &str,
        vector: &[f32],
    ) -> Result<Lookup, CacheError> {
        let version = self.versions.require(&self.model)?;
        if !self.indexed_or_rebuild(&version) {
            self.stats.misses.fetch_add(1, Ordering::Relaxed);
            return Ok(Lookup::Miss);
        }
        let dim = self.state.read().dim;
        if !crate::vector::is_unit(vector, dim) {
            // No similarity with it means anything: a miss, not an error.
            self.stats.misses.fetch_add(1, Ordering::Relaxed);
            return Ok(Lookup::Miss);
        }
        let candidates = self.state.read().search(partition, vector, CANDIDATES);
        let mut conn = self.conn.clone();
        for c in candidates {
            // A NaN similarity stops here too (it compares false).
            if c.similarity.is_nan() || c.similarity < self.config.threshold {
                break;
            }
            type Fields = (
                Option<String>,
                Option<Vec<u8>>,
                Option<String>,
                Option<Vec<u8>>,
            );
            let (query, answer, metadata, outcomes): Fields = redis::cmd("HMGET")
                .arg(self.key(&version, &c.id))
                .arg("q")
                .arg("r")
                .arg("m")
                .arg("o")
                .query_async(&mut conn)
                .await
                .map_err(self.redis_error("read"))?;
            let (Some(query), Some(answer)) = (query, answer.as_deref().and_then(codec::decode))
            else {
                // Expired or evicted in Redis: never a hit, and gone here too.
                self.stats.stale.fetch_add(1, Ordering::Relaxed);
                self.state.write().forget(&c.id);
                continue;
            };
            if !guard_allows(&query, text) {
                self.stats.guarded.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            let entry = SemanticHit {
                answer,
                query,
                similarity: c.similarity,
                metadata: metadata
                    .and_then(|m| serde_json::from_str(&m).ok())
                    .unwrap_or(Value::Null),
            };
            if let Some(learned) = &self.config.per_entry {
                let seen = per_entry::decode(outcomes.as_deref().unwrap_or_default());
                let p = per_entry::p_correct(&learned.prior, &seen, c.similarity);
                if p < 1.0 - learned.max_false_hit_rate {
                    // The nearest allowed entry decides: a farther one is
                    // not more likely right.
                    self.stats.verify.fetch_add(1, Ordering::Relaxed);
                    self.stats.misses.fetch_add(1, Ordering::Relaxed);
                    return Ok(Lookup::Verify(Candidate {
                        entry,
                        p_correct: p,
                        version,
                        id: c.id,
                    }));
                }
            }
            self.state.write().touch(&c.id);
            self.stats.hits.fetch_add(1, Ordering::Relaxed);
            return Ok(Lookup::Hit(entry));
        }
        self.stats.misses.fetch_add(1, Ordering::Relaxed);
        Ok(Lookup::Miss)
    }

    async fn record(&self, candidate: &Candidate, correct: bool) -> Result<(), CacheError> {
        // Appended in Redis in one step, so outcomes from replicas racing on
        // the same entry are all kept, and only while the entry exists: an
        // evicted entry is not brought back as a hash of outcomes alone.
        const APPEND: &str = r"
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
local o = (redis.call('HGET', KEYS[1], 'o') or '') .. ARGV[1]
local keep = tonumber(ARGV[2])
if #o > keep then o = string.sub(o, #o - keep + 1) end
redis.call('HSET', KEYS[1], 'o', o)
return 1";
        let bytes = per_entry::encode(Observation {
            similarity: candidate.entry.similarity,
            correct,
        });
        let mut conn = self.conn.clone();
        let _: i64 = redis::Script::new(APPEND)
            .key(self.key(&candidate.version, &candidate.id))
            .arg(&bytes[..])
            .arg(per_entry::MAX_OBSERVATIONS * bytes.len())
            .invoke_async(&mut conn)
            .await
            .map_err(self.redis_error("record an outcome in"))?;
        self.stats.recorded.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    async fn put(
        &self,
        partition: &str,
        query: &str,
        vector: &[f32],
        answer: &Value,
        metadata: &Value,
    ) -> Result<(), CacheError> {
        let version = self.versions.require(&self.model)?;
        let indexed = self.indexed_or_rebuild(&version);
        let dim = self.state.read().dim;
        if !crate::vector::is_unit(vector, dim) {
            return Err(CacheError::Vector {
                model: self.model.clone(),
                dim,
            });
        }
        let id = partitioned_entry_id(partition, query);
        let key = self.key(&version, &id);
        let value = codec::encode(answer).map_err(CacheError::Encode)?;
        let mut pipe = redis::pipe();
        pipe.atomic()
            .cmd("HSET")
            .arg(&key)
            .arg("v")
            .arg(vector_bytes(vector))
            .arg("q")
            .arg(query)
            .arg("r")
            .arg(value)
            .arg("m")
            .arg(metadata.to_string());
        if !partition.is_empty() {
            pipe.arg("p").arg(partition);
        }
        pipe.ignore();
        if let Some(ttl) = super::ttl_seconds(self.config.ttl_seconds) {
            pipe.cmd("EXPIRE").arg(&key).arg(ttl).ignore();
        }
        self.announce(&mut pipe, "put", &version, &id);
        let mut conn = self.conn.clone();
        pipe.query_async::<()>(&mut conn)
            .await
            .map_err(self.redis_error("write"))?;
        // While the index is rebuilt for this version, the rebuild's scan or
        // the event just announced brings the entry in.
        if !indexed {
            return Ok(());
        }
        let evicted = {
            let mut state = self.state.write();
            state.insert(partition, &id, vector);
            state.touch(&id);
            self.enforce_bound(state)
        };
        for id in evicted {
            self.delete(&version, &id).await?;
        }
        Ok(())
    }

    /// Drop least recently used entries beyond the bound from the index;
    /// returns them so that the caller deletes them from Redis too.
    fn enforce_bound(&self, mut state: parking_lot::RwLockWriteGuard<'_, State>) -> Vec<String> {
        let mut out = Vec::new();
        while state.len() > self.config.max_entries {
            let Some(id) = state.evict_lru() else {
                break;
            };
            self.stats.evicted.fetch_add(1, Ordering::Relaxed);
            out.push(id);
        }
        out
    }

    async fn delete(&self, version: &str, id: &str) -> Result<(), CacheError> {
        let mut pipe = redis::pipe();
        pipe.cmd("DEL").arg(self.key(version, id)).ignore();
        self.announce(&mut pipe, "del", version, id);
        let mut conn = self.conn.clone();
        pipe.query_async::<()>(&mut conn)
            .await
            .map_err(self.redis_error("evict"))
    }

    /// Append the event every replica's follower applies.
    fn announce(&self, pipe: &mut redis::Pipeline, op: &str, version: &str, id: &str) {
        pipe.cmd("XADD")
            .arg(keys::semantic_events(&self.model))
            .arg("MAXLEN")
            .arg("~")
            .arg(EVENT_LOG_LENGTH)
            .arg("*")
            .arg("op")
            .arg(op)
            .arg("version")
            .arg(version)
            .arg("id")
            .arg(id)
            .ignore();
    }
}

/// Whether stream id `a` comes after `b` (`<ms>-<seq>`).
fn stream_id_after(a: &str, b: &str) -> bool {
    let parse = |s: &str| {
        let (ms, seq) = s.split_once('-').unwrap_or((s, "0"));
        (
            ms.parse::<u64>().unwrap_or(0),
            seq.parse::<u64>().unwrap_or(0),
        )
    };
    parse(a) > parse(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vectors_round_trip_and_wrong_sizes_are_refused() {
        let v = vec![0.6f32, -0.8, 0.0];
        assert_eq!(bytes_vector(&vector_bytes(&v), 3), Some(v));
        assert_eq!(bytes_vector(&[0u8; 8], 3), None);
        // Not of unit length, or not finite: no use to the index.
        assert_eq!(bytes_vector(&vector_bytes(&[0.5, -1.25, 3.0]), 3), None);
        assert_eq!(bytes_vector(&vector_bytes(&[f32::NAN, 0.0, 1.0]), 3), None);
    }

    #[test]
    fn a_policy_without_a_threshold_is_refused_with_what_to_do() {
        let mut policy: crate::crd::CachePolicySpec =
            serde_json::from_value(serde_json::json!({})).unwrap();
        let err = SemanticConfig::from_policy(&policy, 10).unwrap_err();
        assert!(err.contains("modelcache calibrate"), "{err}");
        policy.semantic.threshold = Some(0.91);
        let config = SemanticConfig::from_policy(&policy, 10).unwrap();
        assert_eq!(config.threshold, 0.91);
        assert_eq!(config.ttl_seconds, policy.ttl_seconds.semantic);
        assert_eq!(config.per_entry, None);
    }

    #[test]
    fn a_per_entry_policy_needs_the_prior_calibrate_prints() {
        let mut policy: crate::crd::CachePolicySpec = serde_json::from_value(serde_json::json!({
            "semantic": {"mode": "PerEntry", "maxFalseHitRate": 0.05}
        }))
        .unwrap();
        let err = SemanticConfig::from_policy(&policy, 10).unwrap_err();
        assert!(
            err.contains("semantic.prior") && err.contains("calibrate"),
            "{err}"
        );
        policy.semantic.prior = serde_json::from_value(serde_json::json!({
            "steepness": 11.0, "midpoint": 0.81
        }))
        .unwrap();
        let config = SemanticConfig::from_policy(&policy, 10).unwrap();
        let learned = config.per_entry.unwrap();
        assert_eq!(learned.max_false_hit_rate, 0.05);
        assert_eq!(learned.prior.spread, 0.1);
        // Considered from where the prior gives one chance in ten: 0.81 - ln 9 / 11.
        assert!(
            (config.threshold - 0.6103).abs() < 1e-3,
            "{}",
            config.threshold
        );
    }

    #[test]
    fn stream_ids_compare_numerically() {
        assert!(stream_id_after("10-0", "9-5"));
        assert!(stream_id_after("9-10", "9-9"));
        assert!(!stream_id_after("9-9", "9-9"));
        assert!(stream_id_after("1-0", "0-0"));
    }
}
