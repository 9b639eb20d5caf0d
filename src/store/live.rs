//! Live config and health of a running Redis: CONFIG GET, CONFIG SET only for
//! what differs, read back, and INFO.
//!
//! Config is checked on every reconcile, so a `CONFIG SET` made by hand (drift)
//! is found and undone, and a policy change reaches the running Redis without
//! a restart.

use std::collections::BTreeMap;
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig, MultiplexedConnection};
use redis::{AsyncConnectionConfig, IntoConnectionInfo, RedisError};

use super::info::{RedisInfo, parse_info};
use super::settings::config_drift;

/// Bounds every Redis round trip, so one hung Redis cannot stall reconciles.
const TIMEOUT: Duration = Duration::from_secs(5);
/// Connect and response timeout of a serving connection
/// ([`RedisTarget::connect_managed`]).
pub const SERVING_TIMEOUT: Duration = Duration::from_secs(1);

/// Why talking to a running Redis failed.
/// Each variant is documented by its message.
#[derive(Debug, thiserror::Error)]
#[allow(missing_docs)]
pub enum LiveError {
    #[error("failed to parse the Redis URL for {endpoint}")]
    Url {
        endpoint: String,
        #[source]
        source: RedisError,
    },
    #[error("failed to connect to Redis at {endpoint}")]
    Connect {
        endpoint: String,
        #[source]
        source: RedisError,
    },
    #[error(
        "failed to run CONFIG on {endpoint}: the server forbids it (managed services often rename \
         or disable CONFIG; a Redis that modelcache provisioned allows it only to the user \
         modelcache-admin, with the admin-password of its Secret), so maxmemory and the eviction \
         policy cannot be checked"
    )]
    ConfigForbidden {
        endpoint: String,
        #[source]
        source: RedisError,
    },
    #[error("failed to run {command} on {endpoint}")]
    Command {
        command: &'static str,
        endpoint: String,
        #[source]
        source: RedisError,
    },
}

impl LiveError {
    /// Whether retrying later may help (Redis starting, network), as opposed to
    /// a setup the user must change.
    pub fn is_temporary(&self) -> bool {
        matches!(self, LiveError::Connect { .. } | LiveError::Command { .. })
    }
}

/// How to reach one Redis. The password never appears in `Debug` or logs.
#[derive(Clone)]
pub struct RedisTarget {
    /// `redis://host:port[/db]` or `rediss://…`, without credentials.
    pub url: String,
    /// ACL user, if not `default`.
    pub username: Option<String>,
    /// The password.
    pub password: Option<String>,
}

impl std::fmt::Debug for RedisTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisTarget")
            .field("url", &self.url)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

impl RedisTarget {
    /// A target from a URL that may carry credentials (`redis://user:pw@host`,
    /// as users paste them): they move into `username` and `password` (an
    /// explicit `password` wins) and out of `url`, which is printed in
    /// reports, status and errors.
    pub fn from_url(url: &str, password: Option<String>) -> RedisTarget {
        let Ok(mut parsed) = url::Url::parse(url) else {
            return RedisTarget {
                url: url.to_owned(),
                username: None,
                password,
            };
        };
        let decode = |s: &str| {
            percent_encoding::percent_decode_str(s)
                .decode_utf8_lossy()
                .into_owned()
        };
        let username = Some(decode(parsed.username())).filter(|u| !u.is_empty());
        let from_url = parsed.password().map(decode);
        // Both succeed on a URL with a host, which any usable Redis URL has.
        let _ = parsed.set_username("");
        let _ = parsed.set_password(None);
        RedisTarget {
            url: parsed.to_string(),
            username,
            password: password.or(from_url),
        }
    }

    /// A client with the credentials set, for [`crate::keyspace::registry::Follower`]
    /// and other users that open their own connections.
    pub fn client(&self) -> Result<redis::Client, LiveError> {
        let url_error = |source| LiveError::Url {
            endpoint: self.url.clone(),
            source,
        };
        let info = self
            .url
            .as_str()
            .into_connection_info()
            .map_err(url_error)?;
        let mut settings = info.redis_settings().clone();
        if let Some(user) = &self.username {
            settings = settings.set_username(user);
        }
        if let Some(password) = &self.password {
            settings = settings.set_password(password);
        }
        redis::Client::open(info.set_redis_settings(settings)).map_err(url_error)
    }

    /// A multiplexed connection, with this project's timeouts.
    pub async fn connect(&self) -> Result<MultiplexedConnection, LiveError> {
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(TIMEOUT))
            .set_response_timeout(Some(TIMEOUT));
        self.client()?
            .get_multiplexed_async_connection_with_config(&config)
            .await
            .map_err(|source| LiveError::Connect {
                endpoint: self.url.clone(),
                source,
            })
    }
}

impl RedisTarget {
    /// A connection that reconnects by itself when Redis restarts: what a
    /// serving process hands the caches. A multiplexed connection stays dead
    /// once its server went away, so a cache on one would never serve again
    /// after a Redis pod restart. A request waits at most [`SERVING_TIMEOUT`]
    /// for an answer, and while Redis is away for one reconnection attempt
    /// of as long, then fails, so the caller answers from the source and
    /// counts it: a cache must cost a request little when it cannot help.
    pub async fn connect_managed(&self) -> Result<ConnectionManager, LiveError> {
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(SERVING_TIMEOUT))
            .set_response_timeout(Some(SERVING_TIMEOUT))
            .set_number_of_retries(1)
            .set_min_delay(Duration::from_millis(100))
            .set_max_delay(Duration::from_secs(2));
        ConnectionManager::new_with_config(self.client()?, config)
            .await
            .map_err(|source| LiveError::Connect {
                endpoint: self.url.clone(),
                source,
            })
    }
}

/// What one config pass found and did.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ConfigOutcome {
    /// The config asked for.
    pub desired: BTreeMap<String, String>,
    /// Values read before any change.
    pub before: BTreeMap<String, String>,
    /// Values read back after CONFIG SET.
    pub applied: BTreeMap<String, String>,
    /// Parameters that were set because they differed.
    pub changed: Vec<String>,
    /// Parameters that still differ after the set (Redis refused or rewrote them).
    pub still_differs: Vec<String>,
}

impl ConfigOutcome {
    /// Whether nothing still differs.
    pub fn converged(&self) -> bool {
        self.still_differs.is_empty()
    }
}

fn is_forbidden(e: &RedisError) -> bool {
    let code = e.code().unwrap_or_default();
    let text = e.to_string();
    code == "NOPERM" || text.contains("unknown command") || text.contains("NOPERM")
}

/// CONFIG GET of the given parameters.
pub async fn read_config(
    conn: &mut MultiplexedConnection,
    endpoint: &str,
    params: impl IntoIterator<Item = &String>,
) -> Result<BTreeMap<String, String>, LiveError> {
    let mut cmd = redis::cmd("CONFIG");
    cmd.arg("GET");
    for p in params {
        cmd.arg(p);
    }
    let values: std::collections::HashMap<String, String> =
        cmd.query_async(conn).await.map_err(|source| {
            if is_forbidden(&source) {
                LiveError::ConfigForbidden {
                    endpoint: endpoint.to_owned(),
                    source,
                }
            } else {
                LiveError::Command {
                    command: "CONFIG GET",
                    endpoint: endpoint.to_owned(),
                    source,
                }
            }
        })?;
    Ok(values.into_iter().collect())
}

/// Reads the desired parameters and, when `enforce` is set, CONFIG SETs those
/// that differ in one command (atomic on Redis 7) and reads them back.
/// Without `enforce` (an external Redis that we do not own) it only reports.
pub async fn reconcile_config(
    conn: &mut MultiplexedConnection,
    endpoint: &str,
    desired: &BTreeMap<String, String>,
    enforce: bool,
) -> Result<ConfigOutcome, LiveError> {
    let before = read_config(conn, endpoint, desired.keys()).await?;
    let changed = config_drift(desired, &before);
    let applied = if enforce && !changed.is_empty() {
        let mut cmd = redis::cmd("CONFIG");
        cmd.arg("SET");
        for key in &changed {
            cmd.arg(key).arg(&desired[key]);
        }
        cmd.query_async::<()>(conn)
            .await
            .map_err(|source| LiveError::Command {
                command: "CONFIG SET",
                endpoint: endpoint.to_owned(),
                source,
            })?;
        read_config(conn, endpoint, desired.keys()).await?
    } else {
        before.clone()
    };
    let still_differs = config_drift(desired, &applied);
    Ok(ConfigOutcome {
        desired: desired.clone(),
        before,
        applied,
        changed: if enforce { changed } else { Vec::new() },
        still_differs,
    })
}

/// INFO memory and stats, parsed.
pub async fn read_info(
    conn: &mut MultiplexedConnection,
    endpoint: &str,
) -> Result<RedisInfo, LiveError> {
    let text: String = redis::cmd("INFO")
        .arg("server")
        .arg("memory")
        .arg("stats")
        .query_async(conn)
        .await
        .map_err(|source| LiveError::Command {
            command: "INFO",
            endpoint: endpoint.to_owned(),
            source,
        })?;
    Ok(parse_info(&text))
}

/// The outcome of turning active defragmentation on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Defrag {
    /// It was already on.
    AlreadyOn,
    /// It is now on.
    TurnedOn,
    /// This build cannot defragment (it needs Redis's bundled jemalloc);
    /// the message is Redis's own.
    Unsupported(String),
}

/// Turns on active defragmentation at run time, instead of restarting a
/// fragmented Redis and losing its keys.
pub async fn enable_active_defrag(
    conn: &mut MultiplexedConnection,
    endpoint: &str,
) -> Result<Defrag, LiveError> {
    let key = "activedefrag".to_string();
    let current = read_config(conn, endpoint, [&key]).await?;
    if current.get("activedefrag").map(String::as_str) == Some("yes") {
        return Ok(Defrag::AlreadyOn);
    }
    match redis::cmd("CONFIG")
        .arg("SET")
        .arg("activedefrag")
        .arg("yes")
        .query_async::<()>(conn)
        .await
    {
        Ok(()) => Ok(Defrag::TurnedOn),
        Err(e) if e.to_string().contains("DISABLED") || e.to_string().contains("defrag") => {
            Ok(Defrag::Unsupported(e.to_string()))
        }
        Err(source) => Err(LiveError::Command {
            command: "CONFIG SET activedefrag",
            endpoint: endpoint.to_owned(),
            source,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_leave_the_url() {
        let t = RedisTarget::from_url("rediss://app:p%40ss%3Aword@cache.example:6380/2", None);
        assert_eq!(t.url, "rediss://cache.example:6380/2");
        assert_eq!(t.username.as_deref(), Some("app"));
        assert_eq!(t.password.as_deref(), Some("p@ss:word"));
        let t = RedisTarget::from_url("redis://:pw@127.0.0.1:6379", Some("given".into()));
        assert_eq!(
            (t.url.as_str(), t.username, t.password.as_deref()),
            ("redis://127.0.0.1:6379", None, Some("given"))
        );
        let t = RedisTarget::from_url("redis://127.0.0.1:6379", None);
        assert_eq!(
            (t.url.as_str(), t.password),
            ("redis://127.0.0.1:6379", None)
        );
    }
}
