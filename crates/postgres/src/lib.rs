//! Cairn's [`EventStore`] on PostgreSQL.
//!
//! - **One round trip per append**: `cairn_append`, a PL/pgSQL function made
//!   by the migrations, checks the expected version, the idempotent retry
//!   and the DCB condition under the stream's row lock, then writes.
//! - **Gap-free `$all` for readers**: positions come from a sequence, and
//!   concurrent transactions commit out of position order. A forward reader
//!   never passes a missing position until the transactions that were
//!   running when it saw the gap have ended (see `read`), so a catch-up
//!   subscriber cannot skip an event that commits late.
//! - **The transactional outbox**: [`PgStore::append_in`] appends inside the
//!   caller's own transaction, next to its business rows; both commit or
//!   neither does, and a relay following `$all` publishes what committed.
//! - **Live subscriptions** are woken by LISTEN/NOTIFY, with polling as the
//!   fallback.

mod listen;
mod query;
mod read;
pub mod schema;

use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use async_trait::async_trait;
use cairn_core::{
    AppendCondition, AppendResult, EventStore, ExpectedVersion, Limits, NewEvent, Position, Query,
    ReadAllOptions, ReadStreamOptions, RecordedEvent, Result, StartFrom, StoreError, StreamInfo,
    StreamMetadata, Subscription, SubscriptionTarget, metadata_stream_name, stream_category,
    validate_stream_name,
};
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use tokio::sync::{Notify, watch};
use tokio_postgres::types::ToSql;
use tokio_postgres::{GenericClient, NoTls};
use uuid::Uuid;

pub use schema::SCHEMA_VERSION;
/// PostgreSQL's own client, for [`PgStore::append_in`] transactions.
pub use tokio_postgres;

/// How a [`PgStore`] connects and behaves.
#[derive(Debug, Clone)]
pub struct PgOptions {
    /// The PostgreSQL schema that holds Cairn's tables (created if missing).
    /// Letters, digits and `_` only.
    pub schema: String,
    /// Most pooled connections.
    pub pool_size: usize,
    /// How often an idle subscription looks for new events even without a
    /// notification (LISTEN/NOTIFY normally wakes it at once).
    pub poll_interval: Duration,
    /// How long a reader waits, at a gap in `$all`, for the transaction that
    /// holds the missing position before giving up with `Busy`.
    pub gap_timeout: Duration,
    pub limits: Limits,
}

impl Default for PgOptions {
    fn default() -> Self {
        PgOptions {
            schema: "cairn".into(),
            pool_size: 16,
            poll_interval: Duration::from_millis(500),
            gap_timeout: Duration::from_secs(30),
            limits: Limits::default(),
        }
    }
}

impl PgOptions {
    pub fn schema(mut self, schema: impl Into<String>) -> Self {
        self.schema = schema.into();
        self
    }
}

/// An event store in a PostgreSQL database. Cheap to clone; clones share
/// the pool. Dropping the last clone ends its subscriptions.
///
/// ```no_run
/// use cairn_core::{EventStore, ExpectedVersion, NewEvent};
/// use cairn_postgres::{PgOptions, PgStore};
///
/// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
/// // Creates (or migrates) the schema `shop` and its tables on first use.
/// let store = PgStore::connect_with(
///     "postgres://postgres@127.0.0.1:5432/test",
///     PgOptions::default().schema("shop"),
/// )
/// .await?;
/// let placed = NewEvent::json("OrderPlaced", &serde_json::json!({"total_cents": 4200}))?;
/// store.append("order-1", ExpectedVersion::NoStream, vec![placed]).await?;
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct PgStore {
    inner: Arc<Inner>,
    _closer: Arc<Closer>,
}

struct Inner {
    pool: Pool,
    /// Where errors say the database is (host, port, database; no password).
    place: String,
    schema: String,
    sql: read::Sql,
    options: PgOptions,
    /// Every position at or below this is final: no transaction can still
    /// commit an event there. Only grows.
    horizon: AtomicU64,
    /// Bumped when events may have arrived (an append here, or a NOTIFY).
    wake: watch::Sender<u64>,
    /// Asks the notifier task to NOTIFY other processes.
    notify: Notify,
    closed: watch::Sender<bool>,
}

struct Closer(watch::Sender<bool>);

impl Drop for Closer {
    fn drop(&mut self) {
        let _ = self.0.send(true);
    }
}

/// A count or position as PostgreSQL's bigint (values past i64::MAX mean "no bound").
pub(crate) fn clamp(v: u64) -> i64 {
    v.min(i64::MAX as u64) as i64
}

/// The advisory lock key of a schema's appends (shared by plain appends,
/// exclusive for conditional ones).
fn lock_key(schema: &str) -> i64 {
    // FNV-1a: stable across builds and processes, unlike std's hasher.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in format!("cairn-append:{schema}").bytes() {
        h = (h ^ b as u64).wrapping_mul(0x0100_0000_01b3);
    }
    h as i64
}

pub(crate) fn db_error(place: &str, e: impl DbErrorDetail) -> StoreError {
    StoreError::Io {
        path: format!("PostgreSQL at {place}"),
        source: std::io::Error::other(e.detail()),
    }
}

/// Whether an append that failed with `e` may still have committed: the
/// connection broke (no answer from the database at all), or the server
/// ended the session (class 57, operator intervention; class 08, connection).
fn outcome_unknown(e: &tokio_postgres::Error) -> bool {
    match e.as_db_error() {
        None => {
            e.is_closed() || std::error::Error::source(e).is_some_and(|s| s.is::<std::io::Error>())
        }
        Some(db) => matches!(&db.code().code()[..2], "57" | "08"),
    }
}

/// The text of an error that names what the database said, not just "db error".
pub(crate) trait DbErrorDetail {
    fn detail(&self) -> String;
}

impl DbErrorDetail for tokio_postgres::Error {
    fn detail(&self) -> String {
        match self.as_db_error() {
            Some(db) => format!("{} ({})", db.message(), db.code().code()),
            None => match std::error::Error::source(self) {
                Some(source) => format!("{self}: {source}"),
                None => self.to_string(),
            },
        }
    }
}

/// Cairn's own words about what the database did.
impl DbErrorDetail for String {
    fn detail(&self) -> String {
        self.clone()
    }
}

impl DbErrorDetail for deadpool_postgres::PoolError {
    fn detail(&self) -> String {
        match self {
            deadpool_postgres::PoolError::Backend(e) => format!("cannot connect: {}", e.detail()),
            other => format!("cannot get a connection: {other}"),
        }
    }
}

impl PgStore {
    /// Connects to `url` (`postgres://user@host:port/db` or `host=… user=…
    /// dbname=…`), creates or migrates the schema, and starts listening for
    /// other processes' appends.
    pub async fn connect(url: &str) -> Result<PgStore> {
        PgStore::connect_with(url, PgOptions::default()).await
    }

    pub async fn connect_with(url: &str, options: PgOptions) -> Result<PgStore> {
        if options.schema.is_empty()
            || !options.schema.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
            || options.schema.len() > 40
        {
            return Err(StoreError::InvalidArgument(format!(
                "schema {:?}: use 1 to 40 letters, digits and '_'",
                options.schema
            )));
        }
        let config: tokio_postgres::Config = url
            .parse()
            .map_err(|e| StoreError::InvalidArgument(format!("database URL {url:?}: {e}")))?;
        let place = describe(&config);
        let manager = Manager::from_config(
            config.clone(),
            NoTls,
            ManagerConfig { recycling_method: RecyclingMethod::Fast },
        );
        let pool = Pool::builder(manager)
            .max_size(options.pool_size.max(2))
            .build()
            .map_err(|e| StoreError::InvalidArgument(format!("connection pool: {e}")))?;
        let key = lock_key(&options.schema);
        {
            let mut client = pool.get().await.map_err(|e| db_error(&place, e))?;
            if let Some(v) = schema::applied_version(&client, &options.schema)
                .await
                .map_err(|e| db_error(&place, e))?
                && v > SCHEMA_VERSION
            {
                return Err(StoreError::InvalidArgument(format!(
                    "schema {} is at version {v}, newer than this Cairn knows ({SCHEMA_VERSION}); upgrade Cairn",
                    options.schema
                )));
            }
            let client: &mut tokio_postgres::Client = &mut client;
            schema::migrate(client, &options.schema, key).await.map_err(|e| db_error(&place, e))?;
        }
        let (closed, _) = watch::channel(false);
        let inner = Arc::new(Inner {
            pool,
            place,
            sql: read::Sql::new(&schema::ident(&options.schema)),
            schema: options.schema.clone(),
            options,
            horizon: AtomicU64::new(0),
            wake: watch::channel(0).0,
            notify: Notify::new(),
            closed: closed.clone(),
        });
        listen::spawn(Arc::downgrade(&inner), config);
        Ok(PgStore { inner, _closer: Arc::new(Closer(closed)) })
    }

    /// The schema this store lives in.
    pub fn schema(&self) -> &str {
        &self.inner.schema
    }

    /// The pool, for applications that want a connection to the same
    /// database (for [`PgStore::append_in`] transactions, say).
    pub fn pool(&self) -> &Pool {
        &self.inner.pool
    }

    /// The transactional outbox: appends `events` inside the caller's open
    /// transaction (`tx`, on any connection to this database), next to the
    /// caller's own rows. Nothing is visible until the caller commits; if
    /// it rolls back, the events never existed and no relay publishes them.
    /// Subscribers (here and in other processes) are notified at commit.
    /// Readers of `$all` wait at this transaction's positions while it is
    /// open, so keep it short, and do not read `$all` from inside it.
    /// On a failed check (a `WrongExpectedVersion`, say) nothing was written
    /// and `tx` is still usable.
    pub async fn append_in<C: GenericClient + Sync>(
        &self,
        tx: &C,
        stream: &str,
        expected: ExpectedVersion,
        events: Vec<NewEvent>,
    ) -> Result<AppendResult> {
        self.append_in_if(tx, stream, expected, events, None).await
    }

    /// [`PgStore::append_in`] with a DCB condition, as [`EventStore::append_if`].
    pub async fn append_in_if<C: GenericClient + Sync>(
        &self,
        tx: &C,
        stream: &str,
        expected: ExpectedVersion,
        events: Vec<NewEvent>,
        condition: Option<AppendCondition>,
    ) -> Result<AppendResult> {
        validate_stream_name(stream)?;
        let mut write = self.inner.check(stream, Kind::User, expected, events, condition)?;
        // An error would abort the caller's transaction: look for retries up front.
        write.check_first = true;
        let sql = &self.inner.sql.append_notify;
        let statement = tx.prepare(sql).await.map_err(|e| db_error(&self.inner.place, e))?;
        let channel = self.inner.listen_channel();
        let params = write.params(&channel);
        let rows = tx.query(&statement, &params).await;
        write.result(&self.inner.place, rows)
    }
}

fn describe(config: &tokio_postgres::Config) -> String {
    let host = match config.get_hosts().first() {
        Some(tokio_postgres::config::Host::Tcp(h)) => h.clone(),
        #[cfg(unix)]
        Some(tokio_postgres::config::Host::Unix(p)) => p.display().to_string(),
        None => "localhost".into(),
    };
    let port = config.get_ports().first().copied().unwrap_or(5432);
    format!("{host}:{port}/{}", config.get_dbname().unwrap_or("?"))
}

#[derive(Clone, Copy)]
enum Kind {
    User = 0,
    Metadata = 1,
    Delete = 2,
}

/// One checked append, as `cairn_append`'s parameters.
struct Write {
    stream: String,
    kind: Kind,
    kind_code: i32,
    target: Option<String>,
    expected: ExpectedVersion,
    expected_code: i64,
    category: Option<String>,
    ids: Vec<Uuid>,
    types: Vec<String>,
    data: Vec<Vec<u8>>,
    binary: Vec<bool>,
    correlation: Vec<Option<Uuid>>,
    causation: Vec<Option<Uuid>>,
    extra: Vec<Option<String>>,
    schema: Vec<i32>,
    tags: Vec<String>,
    tag_lo: Vec<i32>,
    tag_hi: Vec<i32>,
    cond: Option<String>,
    cond_types: Vec<String>,
    cond_tags: Vec<String>,
    cond_cats: Vec<String>,
    cond_after: Option<i64>,
    max_age: Option<i64>,
    max_count: Option<i64>,
    truncate: Option<i64>,
    /// Look for an earlier write of the batch before writing (see `cairn_append`).
    check_first: bool,
}

/// An event's size as PostgreSQL stores it, near enough for the limits.
fn stored_size(stream: &str, e: &NewEvent) -> usize {
    let metadata = if e.metadata.is_empty() {
        0
    } else {
        80 + e.metadata.extra.iter().map(|(k, v)| k.len() + v.len() + 8).sum::<usize>()
    };
    96 + stream.len()
        + e.event_type.len()
        + e.data.len()
        + e.tags.iter().map(|t| t.len() + 4).sum::<usize>()
        + metadata
}

impl Inner {
    fn check(
        &self,
        stream: &str,
        kind: Kind,
        expected: ExpectedVersion,
        events: Vec<NewEvent>,
        condition: Option<AppendCondition>,
    ) -> Result<Write> {
        self.options.limits.check_batch(stream, &events, |e| stored_size(stream, e))?;
        let mut w = Write {
            stream: stream.to_string(),
            kind,
            kind_code: kind as i32,
            target: None,
            expected,
            expected_code: match expected {
                ExpectedVersion::Any => -1,
                ExpectedVersion::StreamExists => -2,
                ExpectedVersion::NoStream => 0,
                ExpectedVersion::Exact(v) => clamp(v),
            },
            category: stream_category(stream).map(String::from),
            ids: Vec::with_capacity(events.len()),
            types: Vec::with_capacity(events.len()),
            data: Vec::with_capacity(events.len()),
            binary: Vec::with_capacity(events.len()),
            correlation: Vec::with_capacity(events.len()),
            causation: Vec::with_capacity(events.len()),
            extra: Vec::with_capacity(events.len()),
            schema: Vec::with_capacity(events.len()),
            tags: Vec::new(),
            tag_lo: Vec::with_capacity(events.len()),
            tag_hi: Vec::with_capacity(events.len()),
            cond: None,
            cond_types: Vec::new(),
            cond_tags: Vec::new(),
            cond_cats: Vec::new(),
            cond_after: None,
            max_age: None,
            max_count: None,
            truncate: None,
            check_first: false,
        };
        if let Some(c) = condition {
            self.options.limits.check_query(&c.fail_if_events_match)?;
            let sql = query::condition_sql(&c.fail_if_events_match);
            w.cond = Some(sql.condition);
            (w.cond_types, w.cond_tags, w.cond_cats) = (sql.types, sql.tags, sql.categories);
            w.cond_after = c.after.map(|p| clamp(p.0));
        }
        for e in events {
            w.ids.push(e.id);
            w.correlation.push(e.metadata.correlation_id);
            w.causation.push(e.metadata.causation_id);
            w.extra.push(
                (!e.metadata.extra.is_empty()).then(|| {
                    serde_json::to_string(&e.metadata.extra).expect("metadata serialises")
                }),
            );
            w.tag_lo.push(w.tags.len() as i32 + 1);
            w.tags.extend(e.tags);
            w.tag_hi.push(w.tags.len() as i32);
            w.types.push(e.event_type);
            w.binary.push(e.content_type == cairn_core::ContentType::Binary);
            w.data.push(e.data.to_vec());
            w.schema.push(e.schema_version as i32);
        }
        Ok(w)
    }

    fn listen_channel(&self) -> String {
        format!("cairn_{}", self.schema)
    }

    /// Runs a checked append on a pooled connection (its own transaction).
    async fn write(&self, mut w: Write) -> Result<AppendResult> {
        let client = self.pool.get().await.map_err(|e| db_error(&self.place, e))?;
        let statement =
            client.prepare_cached(&self.sql.append).await.map_err(|e| db_error(&self.place, e))?;
        let mut rows = client.query(&statement, &w.params_plain()).await;
        if matches!(&rows, Err(e) if e.code().is_some_and(|c| c.code() == "CA410")) {
            // An id of the batch exists: a retry, or a conflict. Ask again, looking first.
            w.check_first = true;
            rows = client.query(&statement, &w.params_plain()).await;
        }
        // A connection that broke must not go back to the pool for the next append.
        let broken = matches!(&rows, Err(e) if outcome_unknown(e));
        let result = w.result(&self.place, rows);
        if broken {
            drop(deadpool_postgres::Object::take(client));
        }
        if result.is_ok() {
            self.wake.send_modify(|n| *n += 1);
            self.notify.notify_one();
        }
        result
    }
}

impl Write {
    /// Sets what a metadata change writes into the stream's row.
    fn with_metadata(mut self, target: &str, metadata: &StreamMetadata) -> Write {
        self.target = Some(target.to_string());
        (self.max_age, self.max_count, self.truncate) = (
            metadata.max_age_secs.map(clamp),
            metadata.max_count.map(clamp),
            metadata.truncate_before.map(clamp),
        );
        self
    }

    fn params_plain(&self) -> Vec<&(dyn ToSql + Sync)> {
        vec![
            &self.stream,
            &self.kind_code,
            &self.target,
            &self.expected_code,
            &self.category,
            &self.ids,
            &self.types,
            &self.data,
            &self.binary,
            &self.correlation,
            &self.causation,
            &self.extra,
            &self.schema,
            &self.tags,
            &self.tag_lo,
            &self.tag_hi,
            &self.cond,
            &self.cond_types,
            &self.cond_tags,
            &self.cond_cats,
            &self.cond_after,
            &self.max_age,
            &self.max_count,
            &self.truncate,
            &self.check_first,
        ]
    }

    fn params<'a>(&'a self, channel: &'a String) -> Vec<&'a (dyn ToSql + Sync)> {
        let mut p = self.params_plain();
        p.push(channel);
        p
    }

    fn result(
        &self,
        place: &str,
        rows: std::result::Result<Vec<tokio_postgres::Row>, tokio_postgres::Error>,
    ) -> Result<AppendResult> {
        let rows = match rows {
            Ok(rows) => rows,
            Err(e) if e.code().is_some_and(|c| c.code() == "CA409") => {
                return Err(StoreError::IdempotencyConflict {
                    id: self.ids[0],
                    detail: "by a concurrent append".into(),
                });
            }
            Err(e) if outcome_unknown(&e) => {
                return Err(StoreError::OutcomeUnknown {
                    reason: format!(
                        "the connection to PostgreSQL at {place} broke during the append ({})",
                        e.detail()
                    ),
                });
            }
            Err(e) => return Err(db_error(place, e)),
        };
        let row = rows
            .first()
            .ok_or_else(|| db_error(place, "cairn_append returned no row".to_string()))?;
        let (code, version, position): (i32, i64, i64) = (row.get(0), row.get(1), row.get(2));
        let named = |d: Option<String>| d.unwrap_or_else(|| self.stream.clone());
        match code {
            0 => Ok(AppendResult {
                next_version: version as u64,
                position: Position(position as u64),
            }),
            1 => Err(StoreError::WrongExpectedVersion {
                stream: match self.kind {
                    Kind::Delete => self.target.clone().unwrap_or_default(),
                    _ => self.stream.clone(),
                },
                expected: self.expected,
                actual_version: version as u64,
            }),
            2 => Err(StoreError::StreamDeleted { stream: named(row.get(4)) }),
            3 => Err(StoreError::StreamNotFound { stream: named(row.get(4)) }),
            4 => Err(StoreError::IdempotencyConflict {
                id: row.get::<_, Option<Uuid>>(3).unwrap_or(self.ids[0]),
                detail: row.get::<_, Option<String>>(4).unwrap_or_default(),
            }),
            5 => Err(StoreError::AppendConditionFailed {
                first_conflict: Position(position as u64),
                after: self.cond_after.map(|p| Position(p as u64)),
            }),
            other => Err(db_error(
                place,
                format!(
                    "cairn_append returned unknown code {other}; is the schema newer than this Cairn?"
                ),
            )),
        }
    }
}

#[async_trait]
impl EventStore for PgStore {
    async fn append(
        &self,
        stream: &str,
        expected: ExpectedVersion,
        events: Vec<NewEvent>,
    ) -> Result<AppendResult> {
        validate_stream_name(stream)?;
        let w = self.inner.check(stream, Kind::User, expected, events, None)?;
        self.inner.write(w).await
    }

    async fn append_if(
        &self,
        stream: &str,
        expected: ExpectedVersion,
        events: Vec<NewEvent>,
        condition: AppendCondition,
    ) -> Result<AppendResult> {
        validate_stream_name(stream)?;
        let w = self.inner.check(stream, Kind::User, expected, events, Some(condition))?;
        self.inner.write(w).await
    }

    async fn read_query(
        &self,
        query: &Query,
        options: ReadAllOptions,
    ) -> Result<Vec<RecordedEvent>> {
        self.inner.options.limits.check_query(query)?;
        read::read_query(&self.inner, query, options).await
    }

    async fn read_stream(
        &self,
        stream: &str,
        options: ReadStreamOptions,
    ) -> Result<Vec<RecordedEvent>> {
        read::check_read_name(stream)?;
        read::read_stream(&self.inner, stream, options).await
    }

    async fn read_all(&self, options: ReadAllOptions) -> Result<Vec<RecordedEvent>> {
        read::read_all(&self.inner, options).await
    }

    async fn stream_info(&self, stream: &str) -> Result<StreamInfo> {
        read::check_read_name(stream)?;
        read::stream_info(&self.inner, stream)
            .await?
            .ok_or_else(|| StoreError::StreamNotFound { stream: stream.to_string() })
    }

    async fn list_streams(&self, prefix: &str, limit: usize) -> Result<Vec<StreamInfo>> {
        read::list_streams(&self.inner, prefix, limit).await
    }

    async fn set_stream_metadata(
        &self,
        stream: &str,
        metadata: StreamMetadata,
    ) -> Result<AppendResult> {
        validate_stream_name(stream)?;
        if metadata.max_count == Some(0) {
            return Err(StoreError::InvalidArgument(
                "max_count must be at least 1 (delete the stream to hide all of it)".into(),
            ));
        }
        let event = NewEvent::json("$metadata", &metadata)
            .map_err(|e| StoreError::InvalidArgument(e.to_string()))?;
        let w = self.inner.check(
            &metadata_stream_name(stream),
            Kind::Metadata,
            ExpectedVersion::Any,
            vec![event],
            None,
        )?;
        self.inner.write(w.with_metadata(stream, &metadata)).await
    }

    async fn delete_stream(
        &self,
        stream: &str,
        expected: ExpectedVersion,
        hard: bool,
    ) -> Result<AppendResult> {
        validate_stream_name(stream)?;
        let event = NewEvent::json_bytes(if hard { "$tombstone" } else { "$deleted" }, "{}");
        let mut w = self.inner.check(
            &metadata_stream_name(stream),
            Kind::Delete,
            expected,
            vec![event],
            None,
        )?;
        w.target = Some(stream.to_string());
        self.inner.write(w).await
    }

    async fn subscribe(&self, target: SubscriptionTarget, from: StartFrom) -> Result<Subscription> {
        listen::subscribe(self.inner.clone(), target, from).await
    }

    async fn head_position(&self) -> Result<Position> {
        Ok(Position(read::final_head(&self.inner).await? + 1))
    }

    async fn last_position(&self) -> Result<Option<Position>> {
        let head = read::final_head(&self.inner).await?;
        Ok((head > 0).then_some(Position(head)))
    }
}
