//! The version registry of a model, in the model's Redis: the active version,
//! the set of live versions, an epoch that changes on every transition, and an
//! append-only event log (a Redis Stream, also announced on pub/sub).
//!
//! The registry's state, not its events, is the truth: a [`Follower`] reads it
//! whole on every (re)connect and again after each event, so a consumer that
//! was away when a transition happened still ends up on the new version. This
//! is what the reference design's pub/sub-only invalidation misses.

use std::collections::BTreeSet;
use std::time::Duration;

use redis::{AsyncConnectionConfig, RedisError, Script};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::keyspace::keys;

/// Events kept in the stream; older ones are trimmed (the state is the truth).
const EVENT_LOG_LENGTH: u64 = 10_000;
/// How long one XREAD waits for an event before it asks again.
const BLOCK: Duration = Duration::from_secs(5);

/// Why the version registry could not be read or changed.
/// Each variant is documented by its message.
#[derive(Debug, thiserror::Error)]
#[allow(missing_docs)]
pub enum RegistryError {
    #[error("failed to {action} the version registry of model {model:?}")]
    Redis {
        action: &'static str,
        model: String,
        #[source]
        source: RedisError,
    },
    #[error(
        "failed to retire version {version:?} of model {model:?}: it is the active version; activate another first"
    )]
    RetireActive { model: String, version: String },
}

/// The registry of one model.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RegistryState {
    /// The version new entries are written for.
    pub active: Option<String>,
    /// Versions still served during a rollout, besides the active one.
    pub live: BTreeSet<String>,
    /// Changes on every transition; 0 before the first.
    pub epoch: u64,
}

/// A registry change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transition {
    /// The version becomes active (and live).
    Activate,
    /// The version is served (during a rollout) without being active.
    Live,
    /// No pod serves the version any more; its keys may be swept.
    Retire,
}

impl Transition {
    fn as_str(self) -> &'static str {
        match self {
            Transition::Activate => "activate",
            Transition::Live => "live",
            Transition::Retire => "retire",
        }
    }
}

// One script, so a transition, its epoch, its log entry and its
// announcement are atomic. The three keys share the model's hash tag.
const TRANSITION_SCRIPT: &str = r"
if ARGV[1] == 'activate' then
  redis.call('HSET', KEYS[1], 'active', ARGV[2])
  redis.call('SADD', KEYS[2], ARGV[2])
elseif ARGV[1] == 'live' then
  redis.call('SADD', KEYS[2], ARGV[2])
elseif ARGV[1] == 'retire' then
  if redis.call('HGET', KEYS[1], 'active') == ARGV[2] then
    return redis.error_reply('ACTIVEVERSION cannot retire the active version')
  end
  redis.call('SREM', KEYS[2], ARGV[2])
end
local epoch = redis.call('HINCRBY', KEYS[1], 'epoch', 1)
redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[3], '*',
  'transition', ARGV[1], 'version', ARGV[2], 'epoch', epoch)
redis.call('PUBLISH', KEYS[3], epoch)
return epoch
";

/// Records a transition; returns the new epoch.
pub async fn transition(
    conn: &mut (impl redis::aio::ConnectionLike + Send),
    model: &str,
    version: &str,
    transition: Transition,
) -> Result<u64, RegistryError> {
    Script::new(TRANSITION_SCRIPT)
        .key(keys::registry(model))
        .key(keys::live_versions(model))
        .key(keys::events(model))
        .arg(transition.as_str())
        .arg(version)
        .arg(EVENT_LOG_LENGTH)
        .invoke_async(conn)
        .await
        .map_err(|source| {
            if source.code() == Some("ACTIVEVERSION") {
                RegistryError::RetireActive {
                    model: model.to_owned(),
                    version: version.to_owned(),
                }
            } else {
                RegistryError::Redis {
                    action: "update",
                    model: model.to_owned(),
                    source,
                }
            }
        })
}

/// Reads the whole registry in one atomic round trip.
pub async fn read(
    conn: &mut (impl redis::aio::ConnectionLike + Send),
    model: &str,
) -> Result<RegistryState, RegistryError> {
    let (active, epoch, live): (Option<String>, Option<u64>, BTreeSet<String>) = redis::pipe()
        .atomic()
        .hget(keys::registry(model), "active")
        .hget(keys::registry(model), "epoch")
        .smembers(keys::live_versions(model))
        .query_async(conn)
        .await
        .map_err(|source| RegistryError::Redis {
            action: "read",
            model: model.to_owned(),
            source,
        })?;
    Ok(RegistryState {
        active,
        live,
        epoch: epoch.unwrap_or(0),
    })
}

/// Stream entries as XREAD and XREADGROUP return them: per stream, its entries
/// of id and field-value pairs.
pub type StreamReply = Vec<(String, Vec<(String, Vec<(String, String)>)>)>;

/// The id of the newest entry of a stream (`0-0` when it is empty): read it
/// before a snapshot, then follow from it, and nothing in between is missed.
pub(crate) async fn last_stream_id(
    conn: &mut (impl redis::aio::ConnectionLike + Send),
    stream: &str,
) -> Result<String, redis::RedisError> {
    let last: Vec<(String, Vec<(String, String)>)> = redis::cmd("XREVRANGE")
        .arg(stream)
        .arg("+")
        .arg("-")
        .arg("COUNT")
        .arg(1)
        .query_async(conn)
        .await?;
    Ok(last
        .first()
        .map(|(id, _)| id.clone())
        .unwrap_or_else(|| "0-0".into()))
}

/// Run `attempt` until it returns `Ok`, after each failure logging it,
/// calling `on_error`, and waiting with exponential backoff (100 ms to 5 s):
/// the loop of every background follower of a Redis stream.
pub(crate) async fn reconnecting<E, F>(
    what: &str,
    mut attempt: impl FnMut() -> F,
    mut on_error: impl FnMut(),
) where
    E: std::error::Error,
    F: std::future::Future<Output = Result<(), E>>,
{
    let mut delay = Duration::from_millis(100);
    while let Err(e) = attempt().await {
        tracing::warn!(error = %crate::error::chain(&e), "{what} reconnecting");
        on_error();
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_secs(5));
    }
}

/// Follows a model's registry in the background.
pub struct Follower {
    rx: watch::Receiver<RegistryState>,
    task: JoinHandle<()>,
}

impl Follower {
    /// Starts following. The state is empty until the first read succeeds;
    /// [`Follower::wait_for`] waits for it.
    pub fn start(client: redis::Client, model: &str) -> Follower {
        let (tx, rx) = watch::channel(RegistryState::default());
        let model = model.to_owned();
        let task = tokio::spawn(async move {
            let what = format!("registry follower of model {model:?}");
            reconnecting(&what, || follow_once(&client, &model, &tx), || {}).await
        });
        Follower { rx, task }
    }

    /// The latest state read.
    pub fn current(&self) -> RegistryState {
        self.rx.borrow().clone()
    }

    /// A receiver that sees every new state.
    pub fn subscribe(&self) -> watch::Receiver<RegistryState> {
        self.rx.clone()
    }

    /// Waits until the state satisfies `f` (or `timeout` passes).
    pub async fn wait_for(
        &self,
        timeout: Duration,
        f: impl Fn(&RegistryState) -> bool,
    ) -> Option<RegistryState> {
        let mut rx = self.rx.clone();
        tokio::time::timeout(timeout, rx.wait_for(|s| f(s)))
            .await
            .ok()
            .and_then(|r| r.ok())
            .map(|s| s.clone())
    }
}

impl Drop for Follower {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// One connection's life: read the state, then re-read it after each event.
/// Returns `Ok` only when nobody listens any more.
async fn follow_once(
    client: &redis::Client,
    model: &str,
    tx: &watch::Sender<RegistryState>,
) -> Result<(), RegistryError> {
    let err = |action: &'static str| {
        let model = model.to_owned();
        move |source| RegistryError::Redis {
            action,
            model,
            source,
        }
    };
    let config = AsyncConnectionConfig::new()
        .set_connection_timeout(Some(Duration::from_secs(5)))
        .set_response_timeout(Some(BLOCK + Duration::from_secs(5)));
    let mut conn = client
        .get_multiplexed_async_connection_with_config(&config)
        .await
        .map_err(err("connect to"))?;
    // The last event id before the read: any transition after it is seen by
    // XREAD, any before it is in the state we read.
    let mut last_id = last_stream_id(&mut conn, &keys::events(model))
        .await
        .map_err(err("read the event log of"))?;
    tx.send_replace(read(&mut conn, model).await?);
    loop {
        if tx.is_closed() {
            return Ok(());
        }
        let reply: Option<StreamReply> = redis::cmd("XREAD")
            .arg("COUNT")
            .arg(100)
            .arg("BLOCK")
            .arg(BLOCK.as_millis() as u64)
            .arg("STREAMS")
            .arg(keys::events(model))
            .arg(&last_id)
            .query_async(&mut conn)
            .await
            .map_err(err("wait for events of"))?;
        let Some(streams) = reply else { continue };
        if let Some(id) = streams
            .iter()
            .flat_map(|(_, entries)| entries)
            .map(|(id, _)| id)
            .next_back()
        {
            last_id = id.clone();
            tx.send_replace(read(&mut conn, model).await?);
        }
    }
}
