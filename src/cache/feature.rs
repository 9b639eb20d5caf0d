//! Feature cache: vectors per entity and feature name, read and written in
//! batches.

use std::collections::BTreeMap;

use redis::aio::MultiplexedConnection;
use serde_json::{Value, json};

use super::codec;
use super::{CacheError, Connection, SharedStats, StatsSnapshot, Versions, entity};
use crate::keyspace::keys::Layer;

/// Features of one model's entities.
///
/// A batch of any size costs two round trips: one MGET of the entities'
/// generation numbers (which make an entity event retire its features at
/// once), one MGET (or one pipeline of SETs) for the features themselves.
#[derive(Clone)]
pub struct FeatureCache<C = MultiplexedConnection> {
    conn: C,
    model: String,
    versions: Versions,
    ttl: Option<u64>,
    stats: SharedStats,
}

impl<C: Connection> FeatureCache<C> {
    /// `ttl_seconds` from the policy's `ttlSeconds.feature`; 0 stores without expiry.
    pub fn new(conn: C, model: &str, versions: Versions, ttl_seconds: i64) -> Self {
        FeatureCache {
            conn,
            model: model.to_owned(),
            versions,
            ttl: super::ttl_seconds(ttl_seconds),
            stats: SharedStats::default(),
        }
    }

    /// Hits and misses so far.
    pub fn stats(&self) -> StatsSnapshot {
        self.stats.snapshot()
    }

    fn key(&self, version: &str, entity: &str, generation: u64, feature: &str) -> String {
        let subject = json!([entity, generation, feature]);
        super::entry_key(&self.model, version, Layer::Feature, &subject)
    }

    fn redis_error(&self, action: &'static str) -> impl FnOnce(redis::RedisError) -> CacheError {
        super::redis_error(&self.model, "feature", action)
    }

    async fn keys_for<'a>(
        &self,
        conn: &mut C,
        version: &str,
        items: impl Iterator<Item = (&'a str, &'a str)> + Clone,
    ) -> Result<Vec<String>, CacheError> {
        let entities: Vec<&str> = {
            let mut e: Vec<&str> = items.clone().map(|(e, _)| e).collect();
            e.sort_unstable();
            e.dedup();
            e
        };
        let generations: BTreeMap<&str, u64> = entities
            .iter()
            .copied()
            .zip(
                entity::generations(conn, &self.model, version, &entities)
                    .await
                    .map_err(self.redis_error("read generations"))?,
            )
            .collect();
        Ok(items
            .map(|(e, f)| self.key(version, e, generations[e], f))
            .collect())
    }

    /// The cached features, in the order asked; `None` where missing.
    pub async fn get_many(
        &self,
        wanted: &[(&str, &str)],
    ) -> Result<Vec<Option<Value>>, CacheError> {
        if wanted.is_empty() {
            return Ok(Vec::new());
        }
        let version = self.versions.require(&self.model)?;
        let mut conn = self.conn.clone();
        let keys = self
            .keys_for(&mut conn, &version, wanted.iter().map(|(e, f)| (*e, *f)))
            .await?;
        let found: Vec<Option<Vec<u8>>> = redis::cmd("MGET")
            .arg(&keys)
            .query_async(&mut conn)
            .await
            .map_err(self.redis_error("read"))?;
        Ok(found
            .into_iter()
            .map(|raw| {
                let decoded = raw.as_deref().and_then(codec::decode);
                self.stats.count(&raw, &decoded);
                decoded
            })
            .collect())
    }

    /// Stores features with the policy's TTL, in one pipeline.
    pub async fn put_many(&self, items: &[(&str, &str, Value)]) -> Result<(), CacheError> {
        if items.is_empty() {
            return Ok(());
        }
        let version = self.versions.require(&self.model)?;
        let mut conn = self.conn.clone();
        let keys = self
            .keys_for(&mut conn, &version, items.iter().map(|(e, f, _)| (*e, *f)))
            .await?;
        let mut pipe = redis::pipe();
        for (key, (_, _, value)) in keys.iter().zip(items) {
            let bytes = codec::encode(value).map_err(CacheError::Encode)?;
            match self.ttl {
                Some(ttl) => pipe
                    .cmd("SET")
                    .arg(key)
                    .arg(bytes)
                    .arg("EX")
                    .arg(ttl)
                    .ignore(),
                None => pipe.cmd("SET").arg(key).arg(bytes).ignore(),
            };
        }
        pipe.query_async::<()>(&mut conn)
            .await
            .map_err(self.redis_error("write"))
    }
}
