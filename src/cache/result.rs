//! Exact-match result cache: the same model and inputs give the same answer.

use redis::aio::MultiplexedConnection;
use serde_json::{Value, json};

use super::codec;
use super::{CacheError, Connection, SharedStats, Stats, StatsSnapshot, Versions, entity};
use crate::keyspace::keys::Layer;

/// Results of one model, keyed by sha256 of canonical JSON of model + inputs.
#[derive(Clone)]
pub struct ResultCache<C = MultiplexedConnection> {
    conn: C,
    model: String,
    versions: Versions,
    ttl: Option<u64>,
    allow_nondeterministic: bool,
    stats: SharedStats,
}

/// The sampling temperature of a request, where it states one.
pub fn temperature(inputs: &Value) -> Option<f64> {
    inputs.get("temperature").and_then(Value::as_f64)
}

impl<C: Connection> ResultCache<C> {
    /// `ttl_seconds` from the policy's `ttlSeconds.result`; 0 stores without expiry.
    pub fn new(conn: C, model: &str, versions: Versions, ttl_seconds: i64) -> Self {
        ResultCache {
            conn,
            model: model.to_owned(),
            versions,
            ttl: super::ttl_seconds(ttl_seconds),
            allow_nondeterministic: false,
            stats: SharedStats::default(),
        }
    }

    /// Cache calls with a temperature above 0 too (their answers vary).
    pub fn allow_nondeterministic(mut self, allow: bool) -> Self {
        self.allow_nondeterministic = allow;
        self
    }

    /// Hits and misses so far.
    pub fn stats(&self) -> StatsSnapshot {
        self.stats.snapshot()
    }

    /// The live counters, to share with other caches' reports.
    pub fn stats_handle(&self) -> &Stats {
        &self.stats
    }

    /// The key of `inputs` under `version`, optionally personalized to an
    /// entity at a generation.
    pub fn key(&self, version: &str, inputs: &Value, personal: Option<(&str, u64)>) -> String {
        let mut subject = json!({"model": self.model, "inputs": inputs});
        if let Some((entity, generation)) = personal {
            subject["entity"] = json!(entity);
            subject["generation"] = json!(generation);
        }
        super::entry_key(&self.model, version, Layer::Result, &subject)
    }

    fn redis_error(&self, action: &'static str) -> impl FnOnce(redis::RedisError) -> CacheError {
        super::redis_error(&self.model, "result", action)
    }

    /// The cached answer for `inputs`, if any.
    pub async fn get(&self, inputs: &Value) -> Result<Option<Value>, CacheError> {
        self.lookup(inputs, None).await
    }

    /// Stores the answer for `inputs`. Non-deterministic calls are refused
    /// unless allowed.
    pub async fn put(&self, inputs: &Value, answer: &Value) -> Result<(), CacheError> {
        self.store(inputs, answer, None).await
    }

    /// Like [`get`](Self::get), for an answer personalized to `entity`: an
    /// entity event retires it at once.
    pub async fn get_personal(
        &self,
        entity: &str,
        inputs: &Value,
    ) -> Result<Option<Value>, CacheError> {
        self.lookup(inputs, Some(entity)).await
    }

    /// Stores an answer for one entity only (see [`Self::get_personal`]).
    pub async fn put_personal(
        &self,
        entity: &str,
        inputs: &Value,
        answer: &Value,
    ) -> Result<(), CacheError> {
        self.store(inputs, answer, Some(entity)).await
    }

    /// The entity and its current generation, for a personalized key.
    async fn personal<'e>(
        &self,
        conn: &mut C,
        version: &str,
        entity: Option<&'e str>,
    ) -> Result<Option<(&'e str, u64)>, CacheError> {
        let Some(e) = entity else { return Ok(None) };
        let generation = entity::generation(conn, &self.model, version, e)
            .await
            .map_err(self.redis_error("read the generation"))?;
        Ok(Some((e, generation)))
    }

    async fn lookup(
        &self,
        inputs: &Value,
        entity: Option<&str>,
    ) -> Result<Option<Value>, CacheError> {
        let version = self.versions.require(&self.model)?;
        let mut conn = self.conn.clone();
        let personal = self.personal(&mut conn, &version, entity).await?;
        let found: Option<Vec<u8>> = redis::cmd("GET")
            .arg(self.key(&version, inputs, personal))
            .query_async(&mut conn)
            .await
            .map_err(self.redis_error("read"))?;
        let decoded = found.as_deref().and_then(codec::decode);
        self.stats.count(&found, &decoded);
        Ok(decoded)
    }

    async fn store(
        &self,
        inputs: &Value,
        answer: &Value,
        entity: Option<&str>,
    ) -> Result<(), CacheError> {
        if let Some(t) = temperature(inputs).filter(|t| *t > 0.0)
            && !self.allow_nondeterministic
        {
            self.stats
                .refused
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            return Err(CacheError::NonDeterministic { temperature: t });
        }
        let version = self.versions.require(&self.model)?;
        let mut conn = self.conn.clone();
        let personal = self.personal(&mut conn, &version, entity).await?;
        let value = codec::encode(answer).map_err(CacheError::Encode)?;
        let mut cmd = redis::cmd("SET");
        cmd.arg(self.key(&version, inputs, personal)).arg(value);
        if let Some(ttl) = self.ttl {
            cmd.arg("EX").arg(ttl);
        }
        cmd.query_async::<()>(&mut conn)
            .await
            .map_err(self.redis_error("write"))
    }
}
