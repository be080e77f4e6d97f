//! `cairn bench W6` and the projection half of W5: the read-side figures of
//! the CQRS issue.
//!
//! - **W6** rebuilds a balance-per-account read model from 1,000,000 deposits
//!   (the W1 payload, over 10,000 accounts), committing a checkpoint with
//!   every batch: once into memory, once into a SQLite file. Targets:
//!   memory ≥ 3,000,000 events/s, SQLite ≥ 300,000 events/s.
//! - **G1** (Cairn's own; see docs/WORKLOADS.md): 100,000 deposits through a
//!   consumer group of 4 workers that ack each one; acks are durable, so the
//!   figure is how well the group shares its state writes among acks.
//! - **W5 (projection)**: a live in-memory projection while a writer appends
//!   1,000 events/s; from the append call to the event applied in the read
//!   model. Target: p99 ≤ 5 ms.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use cairn_core::{EventStore, ExpectedVersion, Position, RecordedEvent};
use cairn_cqrs::{
    Group, GroupConfig, MemoryModel, MemoryProjection, Runner, Sink, Source, SqliteModel,
    SqliteProjection, rebuild,
};
use cairn_log::EmbeddedStore;
use rusqlite::{Transaction, params};
use serde::Deserialize;
use uuid::Uuid;

const ACCOUNTS: u64 = 10_000;
/// Events per read and per read-model transaction in W6.
const REBUILD_BATCH: usize = 10_000;

#[derive(Deserialize)]
struct Deposit {
    amount: i64,
}

type Failure = Box<dyn std::error::Error + Send + Sync>;

fn amount(e: &RecordedEvent) -> Result<Option<i64>, Failure> {
    if e.event_type != "MoneyDeposited" {
        return Ok(None);
    }
    Ok(Some(serde_json::from_slice::<Deposit>(&e.data)?.amount))
}

/// Balance per account, in memory.
struct Balances;

impl MemoryProjection for Balances {
    type State = HashMap<String, i64>;
    fn name(&self) -> &str {
        "balances"
    }
    fn apply(&self, state: &mut Self::State, e: &RecordedEvent) -> Result<(), Failure> {
        if let Some(a) = amount(e)? {
            match state.get_mut(e.stream.as_str()) {
                Some(balance) => *balance += a,
                None => {
                    state.insert(e.stream.clone(), a);
                }
            }
        }
        Ok(())
    }
}

/// Balance per account, in a SQLite table.
struct SqlBalances;

impl SqliteProjection for SqlBalances {
    fn name(&self) -> &str {
        "balances"
    }
    fn setup(&self, tx: &Transaction) -> rusqlite::Result<()> {
        tx.execute_batch("CREATE TABLE IF NOT EXISTS balances (account TEXT PRIMARY KEY, balance INTEGER NOT NULL)")
    }
    fn apply(&self, tx: &Transaction, e: &RecordedEvent) -> Result<(), Failure> {
        if let Some(a) = amount(e)? {
            tx.prepare_cached(
                "INSERT INTO balances (account, balance) VALUES (?1, ?2)
                 ON CONFLICT (account) DO UPDATE SET balance = balance + ?2",
            )?
            .execute(params![e.stream, a])?;
        }
        Ok(())
    }
}

/// Appends `events` W1 deposits over [`ACCOUNTS`] accounts, 100 per append (not timed).
async fn fill(store: &EmbeddedStore, category: &'static str, events: u64) -> Result<()> {
    let per_task = events.div_ceil(16);
    let mut handles = Vec::new();
    for t in 0..16 {
        let store = store.clone();
        handles.push(tokio::spawn(async move {
            let mut i = t * per_task;
            let end = ((t + 1) * per_task).min(events);
            while i < end {
                let n = (end - i).min(100);
                let batch = (0..n)
                    .map(|k| crate::measure::deposit(100 + (i + k) % 900, Uuid::now_v7()))
                    .collect();
                store
                    .append(
                        &format!("{category}-{}", (i / 100) % ACCOUNTS),
                        ExpectedVersion::Any,
                        batch,
                    )
                    .await?;
                i += n;
            }
            anyhow::Ok(())
        }));
    }
    for h in handles {
        h.await??;
    }
    Ok(())
}

fn rebuild_bar(model: &str, target: Position) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new(target.0.max(1));
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "rebuilding into {msg} [{bar:30}] {percent}% ETA {eta}",
        )
        .expect("valid template")
        .progress_chars("=> "),
    );
    bar.set_message(model.to_string());
    bar
}

/// Rebuilds `sink` from the start; returns the line for `model`.
async fn timed_rebuild(
    store: &EmbeddedStore,
    sink: &mut dyn Sink,
    model: &str,
) -> Result<(String, u64)> {
    let shared: Arc<dyn EventStore> = Arc::new(store.clone());
    let target = store.last_position().await?.unwrap_or(Position::START);
    let bar = rebuild_bar(model, target);
    let done =
        rebuild(shared, &Source::All, sink, REBUILD_BATCH, |p| bar.set_position(p.position.0))
            .await?;
    bar.finish_and_clear();
    let line = format!(
        "bench W6 backend=embedded model={model} events={} batch={REBUILD_BATCH} secs={:.3} events_per_s={:.0}",
        done.events,
        done.elapsed.as_secs_f64(),
        done.events_per_s()
    );
    Ok((line, done.events))
}

pub(crate) async fn w6(
    store: &EmbeddedStore,
    events: u64,
    dir: &std::path::Path,
) -> Result<String> {
    fill(store, "w6acct", events).await?;
    let expected: i64 = (0..events).map(|i| (100 + i % 900) as i64).sum();

    let mut memory = MemoryModel::new(Balances);
    let (memory_line, applied) = timed_rebuild(store, &mut memory, "memory").await?;
    let total: i64 = memory.read(|b| b.values().sum());
    if applied < events || total < expected {
        bail!(
            "W6: the memory model holds {total} over {applied} events; expected at least {expected} over {events}"
        );
    }

    let path = dir.join("w6-balances.db");
    let mut sqlite = SqliteModel::open(&path, SqlBalances)?;
    let (sqlite_line, _) = timed_rebuild(store, &mut sqlite, "sqlite").await?;
    let total: i64 =
        sqlite
            .reader()?
            .query_row("SELECT COALESCE(SUM(balance), 0) FROM balances", [], |r| r.get(0))?;
    if total < expected {
        bail!("W6: the SQLite model holds {total}; expected at least {expected}");
    }
    Ok(format!("{memory_line}\n{sqlite_line}"))
}

/// W5's second line: append call → event applied by a live in-memory projection.
pub(crate) async fn w5_projection(store: &EmbeddedStore, seconds: u64) -> Result<String> {
    let shared: Arc<dyn EventStore> = Arc::new(store.clone());
    let model = MemoryModel::new(Balances);
    let runner = Runner::new(shared, Source::category("w5proj"), model.clone()).spawn();
    let total = seconds * 1000;
    let mut tick = tokio::time::interval(Duration::from_millis(1));
    let mut latencies = Vec::with_capacity(total as usize);
    for i in 0..total {
        tick.tick().await;
        let t0 = Instant::now();
        let done = store
            .append(
                "w5proj-1",
                ExpectedVersion::Any,
                vec![crate::measure::deposit(i, Uuid::now_v7())],
            )
            .await?;
        runner.wait_for(done.position).await?;
        latencies.push(t0.elapsed());
    }
    let (_, result) = runner.stop().await;
    result?;
    latencies.sort();
    Ok(format!(
        "bench W5 backend=embedded target=projection model=memory events={total} rate_per_s=1000 p50_us={} p99_us={}",
        crate::measure::percentile(&latencies, 0.5),
        crate::measure::percentile(&latencies, 0.99)
    ))
}

/// G1: every event through a 4-worker consumer group, each acked durably.
pub(crate) async fn g1(store: &EmbeddedStore, events: u64) -> Result<String> {
    fill(store, "g1acct", events).await?;
    let shared: Arc<dyn EventStore> = Arc::new(store.clone());
    let started = Instant::now();
    let group = Group::start(
        shared,
        GroupConfig::new("g1", Source::category("g1acct")).max_in_flight(10_000),
    )
    .await?;
    let mut workers = Vec::new();
    for _ in 0..4 {
        let worker = group.worker();
        workers.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            let mut handled = 0u64;
            while let Some(delivery) = worker.next().await {
                amount(delivery.event()).map_err(|e| anyhow::anyhow!("{e}"))?;
                let t0 = Instant::now();
                delivery.ack().await?;
                latencies.push(t0.elapsed());
                handled += 1;
            }
            anyhow::Ok((handled, latencies))
        }));
    }
    while group.status().acked < events {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let elapsed = started.elapsed();
    group.stop().await?;
    let mut latencies = Vec::new();
    for w in workers {
        latencies.extend(w.await??.1);
    }
    latencies.sort();
    Ok(format!(
        "bench G1 backend=embedded workers=4 events={events} events_per_s={:.0} ack_p50_us={} ack_p99_us={}",
        events as f64 / elapsed.as_secs_f64(),
        crate::measure::percentile(&latencies, 0.50),
        crate::measure::percentile(&latencies, 0.99),
    ))
}
