//! Reads, and the rule that keeps `$all` gap-free for readers.
//!
//! Positions come from a sequence when an append runs, but appends commit in
//! any order: position 7 can become visible while 6 is still in a running
//! transaction (or in one that will roll back). A forward reader must not
//! pass 6 until it is final. Every append takes its transaction id before
//! its positions, so the transaction holding 6 either ended before the
//! reader's snapshot (then 6 is visible, or was rolled back and never will
//! be) or was still running then, which puts its id in the in-progress list
//! of any later snapshot. So at a gap the reader takes a snapshot, waits
//! until each transaction listed in it as in progress has ended, and reads
//! again: everything up to the newest position it saw is then final. The
//! store remembers the highest such position (`horizon`), so old gaps left
//! by rolled-back transactions cost nothing the second time.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use bytes::Bytes;
use cairn_core::{
    ContentType, Direction, Metadata, Position, Query, ReadAllOptions, ReadStreamOptions,
    RecordedEvent, Result, STREAM_NAME_BYTES_MAX, StoreError, StreamInfo, StreamMetadata,
    StreamState, Timestamp,
};
use futures_util::TryStreamExt;
use tokio_postgres::Row;
use tokio_postgres::types::ToSql;

type Client = deadpool_postgres::Client;

use crate::query::QuerySql;
use crate::{Inner, clamp, db_error};

/// The columns of an event, in the order [`event`] decodes them.
const COLS: &str = "e.position, e.id, e.stream, e.version, e.event_type, e.data, e.is_binary, e.schema_version, e.tags, e.created_at, e.correlation_id, e.causation_id, e.metadata_extra";

/// The schema's SQL, qualified with its name once.
pub(crate) struct Sql {
    pub schema: String,
    pub append: String,
    pub append_notify: String,
    all_forward: String,
    all_backward: String,
    stream_forward: String,
    stream_backward: String,
    stream_info: String,
    list: String,
    head: String,
    pub stream_page: String,
}

const APPEND_ARGS: &str = "$1::text, $2::int, $3::text, $4::bigint, $5::text, $6::uuid[], $7::text[], $8::bytea[], $9::boolean[], \
    $10::uuid[], $11::uuid[], $12::text[], $13::int[], $14::text[], $15::int[], $16::int[], $17::text, $18::text[], $19::text[], \
    $20::text[], $21::bigint, $22::bigint, $23::bigint, $24::bigint, $25::boolean";

impl Sql {
    pub(crate) fn new(s: &str) -> Sql {
        let stream_read = |order: &str, bound: &str| {
            format!(
                "SELECT s.state, s.version, {COLS} FROM {s}.cairn_streams s LEFT JOIN LATERAL (
                     SELECT * FROM {s}.cairn_events e
                     WHERE e.stream = s.name AND e.incarnation = s.incarnation AND {bound}
                       AND e.version >= greatest(coalesce(s.truncate_before, 1), s.version - coalesce(s.max_count, s.version) + 1)
                       AND (s.max_age_secs IS NULL
                            OR e.created_at >= extract(epoch FROM clock_timestamp()) * 1000000 - s.max_age_secs::numeric * 1000000)
                     ORDER BY e.version {order} LIMIT $3) e ON true
                 WHERE s.name = $1"
            )
        };
        Sql {
            schema: s.to_string(),
            append: format!("SELECT o_code, o_version, o_position, o_id, o_detail FROM {s}.cairn_append({APPEND_ARGS})"),
            append_notify: format!(
                "SELECT o_code, o_version, o_position, o_id, o_detail, pg_notify($26::text, '') FROM {s}.cairn_append({APPEND_ARGS})"
            ),
            all_forward: format!("SELECT {COLS} FROM {s}.cairn_events e WHERE e.position > $1 ORDER BY e.position LIMIT $2"),
            all_backward: format!("SELECT {COLS} FROM {s}.cairn_events e WHERE e.position < $1 ORDER BY e.position DESC LIMIT $2"),
            stream_forward: stream_read("ASC", "e.version >= $2"),
            stream_backward: stream_read("DESC", "e.version <= $2"),
            stream_info: format!(
                "SELECT name, version, state, max_age_secs, max_count, truncate_before, last_position FROM {s}.cairn_streams WHERE name = $1"
            ),
            list: format!(
                "SELECT name, version, state, max_age_secs, max_count, truncate_before, last_position FROM {s}.cairn_streams
                 WHERE name >= $1 AND starts_with(name, $1) AND NOT (state = 0 AND version = 0) AND ($2 OR left(name, 1) <> '$')
                 ORDER BY name LIMIT $3"
            ),
            stream_page: format!(
                "SELECT {COLS} FROM {s}.cairn_events e JOIN {s}.cairn_streams s ON s.name = e.stream AND s.incarnation = e.incarnation
                 WHERE e.stream = $1 AND e.version > $2 ORDER BY e.version LIMIT $3"
            ),
            head: format!(
                "SELECT (SELECT coalesce(max(position), 0) FROM {s}.cairn_events),
                        ARRAY(SELECT pg_snapshot_xip(pg_current_snapshot())::text)"
            ),
        }
    }
}

/// Names as reads accept them: system streams (`$$x`) included.
pub(crate) fn check_read_name(stream: &str) -> Result<()> {
    if stream.is_empty() || stream.len() > STREAM_NAME_BYTES_MAX + 2 {
        return Err(StoreError::InvalidStreamName {
            name: stream.to_string(),
            reason: "empty or too long".into(),
        });
    }
    Ok(())
}

fn limit(n: usize) -> i64 {
    n.min(i64::MAX as usize) as i64
}

/// Decodes an event from [`COLS`] starting at column `at`.
pub(crate) fn event(row: &Row, at: usize) -> Result<RecordedEvent> {
    let extra: Option<&str> = row.get(at + 12);
    let extra = match extra {
        Some(json) => serde_json::from_str(json).map_err(|e| StoreError::Corrupt {
            file: "cairn_events.metadata_extra".into(),
            offset: row.get::<_, i64>(at) as u64,
            reason: e.to_string(),
        })?,
        None => Default::default(),
    };
    Ok(RecordedEvent {
        position: Position(row.get::<_, i64>(at) as u64),
        id: row.get(at + 1),
        stream: row.get(at + 2),
        version: row.get::<_, i64>(at + 3) as u64,
        event_type: row.get(at + 4),
        data: Bytes::copy_from_slice(row.get::<_, &[u8]>(at + 5)),
        content_type: if row.get(at + 6) { ContentType::Binary } else { ContentType::Json },
        metadata: Metadata {
            correlation_id: row.get(at + 10),
            causation_id: row.get(at + 11),
            extra,
        },
        schema_version: row.get::<_, i32>(at + 7) as u32,
        tags: row.get(at + 8),
        timestamp: Timestamp(row.get(at + 9)),
    })
}

/// Runs `sql` and decodes each row's event (from column `at`) as it
/// arrives, rather than holding every row first.
pub(crate) async fn query_events(
    inner: &Inner,
    client: &Client,
    sql: &str,
    params: &[&(dyn ToSql + Sync)],
    at: usize,
) -> Result<Vec<RecordedEvent>> {
    let statement = client.prepare_cached(sql).await.map_err(|e| db_error(&inner.place, e))?;
    let stream = client
        .query_raw(&statement, params.iter().copied())
        .await
        .map_err(|e| db_error(&inner.place, e))?;
    let mut stream = std::pin::pin!(stream);
    let mut out = Vec::new();
    while let Some(row) = stream.try_next().await.map_err(|e| db_error(&inner.place, e))? {
        out.push(event(&row, at)?);
    }
    Ok(out)
}

fn events(rows: &[Row]) -> Result<Vec<RecordedEvent>> {
    rows.iter().map(|r| event(r, 0)).collect()
}

async fn client(inner: &Inner) -> Result<Client> {
    inner.pool.get().await.map_err(|e| db_error(&inner.place, e))
}

/// Runs `sql` as a statement prepared once per connection.
pub(crate) async fn rows(
    inner: &Inner,
    client: &Client,
    sql: &str,
    params: &[&(dyn ToSql + Sync)],
) -> Result<Vec<Row>> {
    let statement = client.prepare_cached(sql).await.map_err(|e| db_error(&inner.place, e))?;
    client.query(&statement, params).await.map_err(|e| db_error(&inner.place, e))
}

/// Waits until every transaction in progress now has ended (see the module
/// docs). Returns at once when none is. Holds a pooled connection only
/// while it asks, so waiting readers cannot starve the writers they wait for.
async fn wait_for_running(inner: &Inner, running: Vec<String>) -> Result<()> {
    if running.is_empty() {
        return Ok(());
    }
    let started = Instant::now();
    // Polls for the open transactions to end, more slowly the longer they take.
    let pause = cairn_core::Backoff::new(Duration::from_micros(200), Duration::from_millis(20));
    let mut polls = 0u32;
    let mut running = running;
    loop {
        let client = client(inner).await?;
        let rows = rows(
            inner,
            &client,
            "SELECT x FROM unnest($1::text[]) x WHERE pg_xact_status(x::xid8) = 'in progress'",
            &[&running],
        )
        .await?;
        drop(client);
        running = rows.iter().map(|r| r.get(0)).collect();
        if running.is_empty() {
            return Ok(());
        }
        if started.elapsed() > inner.options.gap_timeout {
            return Err(StoreError::Busy(format!(
                "readers of $all wait for transaction(s) {} to end, which have been open for over {:?} (an append in a long transaction?)",
                running.join(", "),
                inner.options.gap_timeout
            )));
        }
        tokio::time::sleep(pause.delay(polls)).await;
        polls = polls.saturating_add(1);
    }
}

/// Waits for the transactions in progress now; afterwards every position up
/// to `seen` (a position that was visible before this call) is final.
async fn settle(inner: &Inner, seen: u64) -> Result<()> {
    let client = client(inner).await?;
    let row = rows(
        inner,
        &client,
        "SELECT ARRAY(SELECT pg_snapshot_xip(pg_current_snapshot())::text)",
        &[],
    )
    .await?
    .remove(0);
    drop(client);
    wait_for_running(inner, row.get(0)).await?;
    inner.horizon.fetch_max(seen, Ordering::AcqRel);
    Ok(())
}

/// The newest position at or below which every position is final (0 when
/// the store is empty).
pub(crate) async fn final_head(inner: &Inner) -> Result<u64> {
    let client = client(inner).await?;
    let row = rows(inner, &client, &inner.sql.head, &[]).await?.remove(0);
    drop(client);
    let max = row.get::<_, i64>(0) as u64;
    if inner.horizon.load(Ordering::Acquire) < max {
        wait_for_running(inner, row.get(1)).await?;
        inner.horizon.fetch_max(max, Ordering::AcqRel);
    }
    Ok(max)
}

/// The lowest position a forward read includes, minus one.
fn forward_floor(options: &ReadAllOptions) -> Option<u64> {
    if options.from == Position::END {
        return None;
    }
    Some(if options.exclusive { options.from.0 } else { options.from.0.saturating_sub(1) })
}

pub(crate) async fn read_all(inner: &Inner, options: ReadAllOptions) -> Result<Vec<RecordedEvent>> {
    if options.limit == 0 {
        return Ok(Vec::new());
    }
    match options.direction {
        Direction::Forward => {
            let Some(floor) = forward_floor(&options) else { return Ok(Vec::new()) };
            read_all_forward(inner, floor, options.limit).await
        }
        Direction::Backward => {
            let head = final_head(inner).await?;
            let below = match options.from {
                Position::END => head + 1,
                p if options.exclusive => p.0.min(head + 1),
                p => p.0.saturating_add(1).min(head + 1),
            };
            let client = self::client(inner).await?;
            query_events(
                inner,
                &client,
                &inner.sql.all_backward,
                &[&clamp(below), &limit(options.limit)],
                0,
            )
            .await
        }
    }
}

/// Up to `n` events after `floor`, none past a position that is not final.
pub(crate) async fn read_all_forward(
    inner: &Inner,
    floor: u64,
    n: usize,
) -> Result<Vec<RecordedEvent>> {
    loop {
        let client = client(inner).await?;
        let events =
            query_events(inner, &client, &inner.sql.all_forward, &[&clamp(floor), &limit(n)], 0)
                .await?;
        drop(client);
        let horizon = inner.horizon.load(Ordering::Acquire);
        let mut previous = floor;
        let mut gap = false;
        for e in &events {
            let p = e.position.0;
            // Fine if nothing can be missing between the previous event and this one.
            if p != previous + 1 && p - 1 > horizon {
                gap = true;
                break;
            }
            previous = p;
        }
        if !gap {
            if floor <= horizon {
                inner.horizon.fetch_max(previous, Ordering::AcqRel);
            }
            return Ok(events);
        }
        let newest = events.last().map_or(floor, |e| e.position.0);
        settle(inner, newest).await?;
    }
}

pub(crate) async fn read_query(
    inner: &Inner,
    query: &Query,
    options: ReadAllOptions,
) -> Result<Vec<RecordedEvent>> {
    if options.limit == 0 {
        return Ok(Vec::new());
    }
    let q = QuerySql::new(query, 1);
    match options.direction {
        Direction::Forward => {
            let Some(floor) = forward_floor(&options) else { return Ok(Vec::new()) };
            read_query_forward(inner, &q, floor, options.limit).await
        }
        Direction::Backward => {
            let head = final_head(inner).await?;
            let client = client(inner).await?;
            let below = match options.from {
                Position::END => head + 1,
                p if options.exclusive => p.0.min(head + 1),
                p => p.0.saturating_add(1).min(head + 1),
            };
            let sql = format!(
                "SELECT {COLS} FROM {s}.cairn_events e WHERE e.position < $4 AND {c} ORDER BY e.position DESC LIMIT $5",
                s = inner.sql.schema,
                c = q.condition
            );
            query_events(
                inner,
                &client,
                &sql,
                &[&q.types, &q.tags, &q.categories, &clamp(below), &limit(options.limit)],
                0,
            )
            .await
        }
    }
}

/// Up to `n` matching events after `floor`, none past a position that is
/// not final. The count of all events in the range, taken in the same
/// snapshot as the matches, tells whether anything could be missing.
pub(crate) async fn read_query_forward(
    inner: &Inner,
    q: &QuerySql,
    floor: u64,
    n: usize,
) -> Result<Vec<RecordedEvent>> {
    let sql = format!(
        "WITH m AS (SELECT {COLS} FROM {s}.cairn_events e WHERE e.position > $4 AND {c} ORDER BY e.position LIMIT $5)
         SELECT m.*, (SELECT count(*) FROM {s}.cairn_events x WHERE x.position > $6 AND x.position <= (SELECT max(position) FROM m)) FROM m",
        s = inner.sql.schema,
        c = q.condition
    );
    loop {
        let horizon = inner.horizon.load(Ordering::Acquire);
        let check_from = floor.max(horizon);
        let client = client(inner).await?;
        let rows = rows(
            inner,
            &client,
            &sql,
            &[&q.types, &q.tags, &q.categories, &clamp(floor), &limit(n), &clamp(check_from)],
        )
        .await?;
        drop(client);
        let Some(last) = rows.last() else { return Ok(Vec::new()) };
        let newest = last.get::<_, i64>(0) as u64;
        let present = last.get::<_, i64>(13) as u64;
        if newest <= horizon || present == newest - check_from {
            if check_from == horizon {
                inner.horizon.fetch_max(newest, Ordering::AcqRel);
            }
            return events(&rows);
        }
        settle(inner, newest).await?;
    }
}

fn state(code: i16) -> StreamState {
    match code {
        1 => StreamState::Deleted,
        2 => StreamState::Tombstoned,
        _ => StreamState::Live,
    }
}

pub(crate) async fn read_stream(
    inner: &Inner,
    stream: &str,
    options: ReadStreamOptions,
) -> Result<Vec<RecordedEvent>> {
    let client = client(inner).await?;
    let (sql, from) = match options.direction {
        Direction::Forward => (&inner.sql.stream_forward, options.from_version.max(1)),
        Direction::Backward => (&inner.sql.stream_backward, options.from_version),
    };
    let rows = rows(inner, &client, sql, &[&stream, &clamp(from), &limit(options.limit)]).await?;
    let not_found = || StoreError::StreamNotFound { stream: stream.to_string() };
    let first = rows.first().ok_or_else(not_found)?;
    match state(first.get(0)) {
        StreamState::Tombstoned => {
            return Err(StoreError::StreamDeleted { stream: stream.to_string() });
        }
        StreamState::Deleted => return Err(not_found()),
        StreamState::Live => {}
    }
    if first.get::<_, i64>(1) == 0 {
        return Err(not_found());
    }
    if first.get::<_, Option<i64>>(2).is_none() {
        return Ok(Vec::new());
    }
    rows.iter().map(|r| event(r, 2)).collect()
}

fn info(row: &Row) -> StreamInfo {
    let u = |i: usize| row.get::<_, Option<i64>>(i).map(|v| v as u64);
    StreamInfo {
        stream: row.get(0),
        version: row.get::<_, i64>(1) as u64,
        state: state(row.get(2)),
        metadata: StreamMetadata { max_age_secs: u(3), max_count: u(4), truncate_before: u(5) },
        last_position: u(6).map(Position),
    }
}

/// A stream's row, unless it is only a name (version 0, live).
pub(crate) async fn stream_info(inner: &Inner, stream: &str) -> Result<Option<StreamInfo>> {
    let client = client(inner).await?;
    let row = rows(inner, &client, &inner.sql.stream_info, &[&stream]).await?.into_iter().next();
    Ok(row.map(|r| info(&r)).filter(|i| !(i.state == StreamState::Live && i.version == 0)))
}

pub(crate) async fn list_streams(inner: &Inner, prefix: &str, n: usize) -> Result<Vec<StreamInfo>> {
    let client = client(inner).await?;
    let system = prefix.starts_with('$');
    let rows = rows(inner, &client, &inner.sql.list, &[&prefix, &system, &limit(n)]).await?;
    Ok(rows.iter().map(info).collect())
}
