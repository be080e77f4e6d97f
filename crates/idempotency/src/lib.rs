//! Idempotent consumers: handling a message twice must have the effect of
//! handling it once, because brokers and relays deliver at least once.
//!
//! - [`PgInbox`] records each processed message id **in the same PostgreSQL
//!   transaction** as the handler's effect: either both commit or neither,
//!   so a redelivered message is seen as done and skipped (exactly-once effect).
//! - [`RedisKeys`] guards a unit of work, such as a payment request that a
//!   client may retry, with an idempotency key in Redis: the first call runs
//!   the work and caches its result for a time to live (default 24 h); later
//!   calls with the same key get the cached result without running it again.
//!
//! Features (both on by default): `postgres` for [`PgInbox`], `redis` for
//! [`RedisKeys`].

#[cfg(feature = "postgres")]
mod postgres;
#[cfg(feature = "redis")]
mod redis_keys;

#[cfg(feature = "postgres")]
pub use postgres::{Handled, INBOX_TABLE, PgInbox};
#[cfg(feature = "redis")]
pub use redis_keys::{IdempotencyError, Outcome, RedisKeys};
