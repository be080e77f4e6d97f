use std::future::Future;
use std::time::Duration;

use redis::Script;
use redis::aio::ConnectionManager;
use serde::Serialize;
use serde::de::DeserializeOwned;
use uuid::Uuid;

/// Why a guarded call did not give a result.
#[derive(Debug, thiserror::Error)]
pub enum IdempotencyError<E> {
    /// Another call with the same key is running now; retry later.
    #[error("a request with idempotency key '{0}' is in progress; retry later")]
    InProgress(String),
    /// The work itself failed; the key was released so a retry runs it again.
    #[error("the work failed: {0}")]
    Work(E),
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("the cached result for '{key}' cannot be read back: {reason}")]
    Cache { key: String, reason: String },
}

/// A result and whether it was computed now or served from the cache.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome<T> {
    /// The work ran in this call.
    Ran(T),
    /// An earlier call with the same key ran it; this is its result.
    Cached(T),
}

impl<T> Outcome<T> {
    pub fn into_inner(self) -> T {
        match self {
            Outcome::Ran(t) | Outcome::Cached(t) => t,
        }
    }
}

const RUNNING: &str = "running:";
const DONE: &str = "done:";

/// Idempotency keys in Redis: `<prefix><key>` holds `running:<token>` while
/// the work runs (with a lease, so a crashed worker does not block the key
/// for good), then `done:<result JSON>` for the time to live.
#[derive(Clone)]
pub struct RedisKeys {
    redis: ConnectionManager,
    prefix: String,
    ttl: Duration,
    lease: Duration,
}

impl RedisKeys {
    /// Keys under `prefix` on the server at `url` (`redis://127.0.0.1:6379`).
    pub async fn connect(url: &str, prefix: impl Into<String>) -> Result<Self, redis::RedisError> {
        let client = redis::Client::open(url)?;
        let redis = ConnectionManager::new(client).await?;
        Ok(RedisKeys {
            redis,
            prefix: prefix.into(),
            ttl: Duration::from_secs(24 * 3600),
            lease: Duration::from_secs(30),
        })
    }

    /// How long a result stays cached (default 24 h).
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.ttl = ttl;
        self
    }

    /// How long a running call holds its key before another may take over
    /// (default 30 s); make it longer than the work takes.
    pub fn lease(mut self, lease: Duration) -> Self {
        self.lease = lease;
        self
    }

    /// Runs `work` once per `key` within the time to live: the first call
    /// runs it and caches its result; later calls get that result.
    pub async fn run<T, E, F>(
        &self,
        key: &str,
        work: impl FnOnce() -> F,
    ) -> Result<Outcome<T>, IdempotencyError<E>>
    where
        T: Serialize + DeserializeOwned,
        F: Future<Output = Result<T, E>>,
    {
        let full = format!("{}{key}", self.prefix);
        let token = format!("{RUNNING}{}", Uuid::new_v4());
        let mut redis = self.redis.clone();
        let claimed: Option<String> = redis::cmd("SET")
            .arg(&full)
            .arg(&token)
            .arg("NX")
            .arg("PX")
            .arg(self.lease.as_millis() as u64)
            .query_async(&mut redis)
            .await?;
        if claimed.is_none() {
            let held: Option<String> = redis::cmd("GET").arg(&full).query_async(&mut redis).await?;
            return match held {
                Some(value) if value.starts_with(DONE) => {
                    let cached = serde_json::from_str(&value[DONE.len()..]).map_err(|e| {
                        IdempotencyError::Cache { key: key.to_string(), reason: e.to_string() }
                    })?;
                    Ok(Outcome::Cached(cached))
                }
                // Running elsewhere, or its lease ran out just now.
                _ => Err(IdempotencyError::InProgress(key.to_string())),
            };
        }
        match work().await {
            Ok(result) => {
                let json = serde_json::to_string(&result).map_err(|e| IdempotencyError::Cache {
                    key: key.to_string(),
                    reason: e.to_string(),
                })?;
                // Store the result only if the key is still ours.
                let finish = Script::new(
                    "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3]) else return false end",
                );
                let _: Option<String> = finish
                    .key(&full)
                    .arg(&token)
                    .arg(format!("{DONE}{json}"))
                    .arg(self.ttl.as_millis() as u64)
                    .invoke_async(&mut redis)
                    .await?;
                Ok(Outcome::Ran(result))
            }
            Err(e) => {
                let release = Script::new(
                    "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) else return 0 end",
                );
                let _: i64 = release.key(&full).arg(&token).invoke_async(&mut redis).await?;
                Err(IdempotencyError::Work(e))
            }
        }
    }
}
