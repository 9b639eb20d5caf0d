//! Entity-level invalidation in O(1) per event.
//!
//! Every key derived from an entity (its features, its personalized results)
//! has the entity's generation number in its digest. An event increments the
//! generation (one INCR per live version), which retires every derived entry
//! at once: they are never read again and expire or are evicted. No keyspace
//! scan, unlike the reference design's `SCAN *user_id*` per event.
//!
//! Events arrive on a Redis Stream read by a consumer group, so an event
//! published while a consumer is down is applied when it comes back.

use std::time::Duration;

use redis::RedisError;
use redis::aio::MultiplexedConnection;

use super::Connection;
use crate::keyspace::keys;
use crate::keyspace::registry;

/// Consumer group of the modelcache invalidation consumers.
pub const GROUP: &str = "modelcache";
/// Events kept in the stream.
const EVENT_LOG_LENGTH: u64 = 100_000;

/// Why an entity's cached entries could not be invalidated.
/// Each variant is documented by its message.
#[derive(Debug, thiserror::Error)]
#[allow(missing_docs)]
pub enum EntityError {
    #[error("failed to {action} entity events of model {model:?}")]
    Redis {
        action: &'static str,
        model: String,
        #[source]
        source: RedisError,
    },
    #[error("failed to read the live versions of model {model:?}")]
    Registry {
        model: String,
        #[source]
        source: registry::RegistryError,
    },
}

/// The current generation of an entity under a version (0 before any event).
pub async fn generation(
    conn: &mut impl Connection,
    model: &str,
    version: &str,
    entity: &str,
) -> Result<u64, RedisError> {
    let g: Option<u64> = redis::cmd("GET")
        .arg(keys::generation(model, version, entity))
        .query_async(conn)
        .await?;
    Ok(g.unwrap_or(0))
}

/// Generations of several entities in one MGET.
pub async fn generations(
    conn: &mut impl Connection,
    model: &str,
    version: &str,
    entities: &[&str],
) -> Result<Vec<u64>, RedisError> {
    if entities.is_empty() {
        return Ok(Vec::new());
    }
    let keys: Vec<String> = entities
        .iter()
        .map(|e| keys::generation(model, version, e))
        .collect();
    let found: Vec<Option<u64>> = redis::cmd("MGET").arg(keys).query_async(conn).await?;
    Ok(found.into_iter().map(|g| g.unwrap_or(0)).collect())
}

/// Producer side: announces that `entity` acted (its derived entries are stale).
pub async fn publish(
    conn: &mut impl Connection,
    model: &str,
    entity: &str,
) -> Result<String, EntityError> {
    redis::cmd("XADD")
        .arg(keys::entity_events(model))
        .arg("MAXLEN")
        .arg("~")
        .arg(EVENT_LOG_LENGTH)
        .arg("*")
        .arg("entity")
        .arg(entity)
        .query_async(conn)
        .await
        .map_err(|source| EntityError::Redis {
            action: "publish",
            model: model.to_owned(),
            source,
        })
}

/// One consumer of a model's entity events, in the shared consumer group.
pub struct EntityConsumer<C = MultiplexedConnection> {
    conn: C,
    model: String,
    name: String,
    claim_after: Duration,
}

/// How long an event may sit read but unacknowledged by another consumer
/// (a pod that died and never came back under its name) before this one
/// takes it over: without that, its invalidations would never be applied.
pub const CLAIM_AFTER: Duration = Duration::from_secs(60);

impl<C: Connection> EntityConsumer<C> {
    /// Joins the group (creating it, from the start of the stream, if needed).
    /// `name` identifies this consumer across restarts (the pod name), so its
    /// unacknowledged events are handed back to it.
    pub async fn join(mut conn: C, model: &str, name: &str) -> Result<Self, EntityError> {
        let created: Result<(), RedisError> = redis::cmd("XGROUP")
            .arg("CREATE")
            .arg(keys::entity_events(model))
            .arg(GROUP)
            .arg("0")
            .arg("MKSTREAM")
            .query_async(&mut conn)
            .await;
        match created {
            Ok(()) => {}
            Err(e) if e.code() == Some("BUSYGROUP") => {}
            Err(source) => {
                return Err(EntityError::Redis {
                    action: "create the consumer group for",
                    model: model.to_owned(),
                    source,
                });
            }
        }
        Ok(EntityConsumer {
            conn,
            model: model.to_owned(),
            name: name.to_owned(),
            claim_after: CLAIM_AFTER,
        })
    }

    /// Takes over other consumers' events unacknowledged for `idle` (by
    /// default [`CLAIM_AFTER`]).
    pub fn claim_after(mut self, idle: Duration) -> Self {
        self.claim_after = idle;
        self
    }

    fn err(&self, action: &'static str) -> impl FnOnce(RedisError) -> EntityError {
        let model = self.model.clone();
        move |source| EntityError::Redis {
            action,
            model,
            source,
        }
    }

    /// Applies what is pending for this consumer (events it read but did not
    /// acknowledge before a crash), then new events, waiting up to `block`
    /// for them. Returns the entities invalidated.
    pub async fn apply_once(&mut self, block: Duration) -> Result<Vec<String>, EntityError> {
        let mut applied = self.read_and_apply("0", None).await?;
        if applied.is_empty() && self.claim_abandoned().await? {
            applied = self.read_and_apply("0", None).await?;
        }
        if applied.is_empty() {
            applied = self.read_and_apply(">", Some(block)).await?;
        }
        Ok(applied)
    }

    /// Makes events that another consumer read and left unacknowledged for
    /// `claim_after` pending for this one; whether any were.
    async fn claim_abandoned(&mut self) -> Result<bool, EntityError> {
        let idle = u64::try_from(self.claim_after.as_millis()).unwrap_or(u64::MAX);
        // Reply: next cursor, the claimed entries, the ids deleted meanwhile.
        let (_, claimed, _): (String, Vec<redis::Value>, Vec<redis::Value>) =
            redis::cmd("XAUTOCLAIM")
                .arg(keys::entity_events(&self.model))
                .arg(GROUP)
                .arg(&self.name)
                .arg(idle)
                .arg("0-0")
                .arg("COUNT")
                .arg(500)
                .arg("JUSTID")
                .query_async(&mut self.conn)
                .await
                .map_err(self.err("claim the abandoned events of"))?;
        Ok(!claimed.is_empty())
    }

    async fn read_and_apply(
        &mut self,
        from: &str,
        block: Option<Duration>,
    ) -> Result<Vec<String>, EntityError> {
        let mut cmd = redis::cmd("XREADGROUP");
        cmd.arg("GROUP")
            .arg(GROUP)
            .arg(&self.name)
            .arg("COUNT")
            .arg(500);
        if let Some(block) = block {
            cmd.arg("BLOCK").arg(block.as_millis() as u64);
        }
        cmd.arg("STREAMS")
            .arg(keys::entity_events(&self.model))
            .arg(from);
        let reply: Option<registry::StreamReply> = cmd
            .query_async(&mut self.conn)
            .await
            .map_err(self.err("read"))?;
        let entries: Vec<(String, Vec<(String, String)>)> = reply
            .unwrap_or_default()
            .into_iter()
            .flat_map(|(_, entries)| entries)
            .collect();
        if entries.is_empty() {
            return Ok(Vec::new());
        }
        // Every version that may still be served: the active one and the live ones.
        let state = registry::read(&mut self.conn, &self.model)
            .await
            .map_err(|source| EntityError::Registry {
                model: self.model.clone(),
                source,
            })?;
        let mut versions = state.live.clone();
        versions.extend(state.active.clone());
        let mut pipe = redis::pipe();
        let mut entities = Vec::new();
        for (_, fields) in &entries {
            if let Some((_, entity)) = fields.iter().find(|(k, _)| k == "entity") {
                for version in &versions {
                    pipe.cmd("INCR")
                        .arg(keys::generation(&self.model, version, entity))
                        .ignore();
                }
                entities.push(entity.clone());
            }
        }
        // Acknowledged in the same round trip as the increments: an event is
        // applied at least once; applying it twice only retires entries twice.
        let ids: Vec<&str> = entries.iter().map(|(id, _)| id.as_str()).collect();
        pipe.cmd("XACK")
            .arg(keys::entity_events(&self.model))
            .arg(GROUP)
            .arg(&ids)
            .ignore();
        pipe.query_async::<()>(&mut self.conn)
            .await
            .map_err(self.err("apply"))?;
        Ok(entities)
    }
}
