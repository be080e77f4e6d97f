//! `cairn bench D1 D2`: the Dynamic Consistency Boundary figures of issue 8.
//!
//! - **D1** conditional single-event appends: 16 concurrent clients, each
//!   appending one tagged event at a time with a condition on its own tag,
//!   `after` = the position of its previous event. Measured in the same run
//!   as the same appends without a condition (W1c-style raw appends, same
//!   events and tags); each is run twice, alternating, and the best of each
//!   kept. Target: conditional ≥ 90% of unconditional.
//! - **D2** query read: the 100 events of one tag among 1,000,000 events
//!   (10,000 tags of 100 events each); the median of 21 reads of different
//!   tags, each returning the full events. Target: ≤ 1 ms.

use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use cairn_core::{
    AppendCondition, EventStore, ExpectedVersion, Metadata, NewEvent, Position, Query,
};
use cairn_log::EmbeddedStore;
use uuid::Uuid;

pub(crate) const WORKLOADS: [&str; 2] = ["D1", "D2"];

const CLIENTS: u64 = 16;

pub(crate) async fn run(store: &EmbeddedStore, workload: &str, scale: f64) -> Result<String> {
    let scaled = |n: u64| ((n as f64 * scale) as u64).max(1);
    match workload {
        "D1" => d1(store, scaled(20_000)).await,
        "D2" => d2(store, scaled(1_000_000)).await,
        other => bail!("unknown DCB workload '{other}'"),
    }
}

/// The W1 payload (a ~150-byte `MoneyDeposited` with ordinary metadata), tagged.
fn tagged_deposit(amount: u64, tag: &str) -> NewEvent {
    let data = serde_json::json!({"amount": amount, "currency": "EUR", "note": "salary for November, paid by ACME Widgets Ltd, ref 2026-11"});
    let metadata = Metadata {
        correlation_id: Some(Uuid::now_v7()),
        causation_id: Some(Uuid::now_v7()),
        ..Default::default()
    };
    NewEvent::json("MoneyDeposited", &data)
        .expect("serialisable")
        .with_metadata(metadata)
        .with_tags([tag])
}

fn percentile_us(sorted: &[Duration], p: f64) -> u128 {
    if sorted.is_empty() {
        return 0;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize].as_micros()
}

struct Round {
    events: u64,
    secs: f64,
    latencies: Vec<Duration>,
}

impl Round {
    fn events_per_s(&self) -> f64 {
        self.events as f64 / self.secs
    }
}

/// 16 clients append `events` single events in all, each to its own stream
/// and tag; with `conditional`, each append fails if an event with the
/// client's tag was appended after the client's previous one.
async fn d1_round(store: &EmbeddedStore, events: u64, conditional: bool) -> Result<Round> {
    let run = Uuid::now_v7().simple().to_string();
    let per_client = events / CLIENTS;
    let started = Instant::now();
    let mut handles = Vec::new();
    for c in 0..CLIENTS {
        let store = store.clone();
        let (stream, tag) = (format!("dcb-{run}-{c}"), format!("client:{run}-{c}"));
        handles.push(tokio::spawn(async move {
            let query = Query::tags([tag.as_str()]);
            let mut last_seen: Option<Position> = None;
            let mut latencies = Vec::with_capacity(per_client as usize);
            for i in 0..per_client {
                let event = tagged_deposit(i, &tag);
                let t0 = Instant::now();
                let r = if conditional {
                    let condition = AppendCondition::new(query.clone(), last_seen);
                    store.append_if(&stream, ExpectedVersion::Any, vec![event], condition).await?
                } else {
                    store.append(&stream, ExpectedVersion::Any, vec![event]).await?
                };
                latencies.push(t0.elapsed());
                last_seen = Some(r.position);
            }
            anyhow::Ok(latencies)
        }));
    }
    let mut latencies = Vec::new();
    for h in handles {
        latencies.extend(h.await??);
    }
    let secs = started.elapsed().as_secs_f64();
    latencies.sort();
    Ok(Round { events: latencies.len() as u64, secs, latencies })
}

async fn d1(store: &EmbeddedStore, events: u64) -> Result<String> {
    let mut best: [Option<Round>; 2] = [None, None];
    for _ in 0..2 {
        for conditional in [false, true] {
            let round = d1_round(store, events, conditional).await?;
            let slot = &mut best[conditional as usize];
            if slot.as_ref().is_none_or(|b| round.events_per_s() > b.events_per_s()) {
                *slot = Some(round);
            }
        }
    }
    let [Some(plain), Some(cond)] = best else { unreachable!("both ran") };
    let line = |r: &Round, condition: &str| {
        format!(
            "bench D1 backend=embedded condition={condition} events={} tasks={CLIENTS} secs={:.2} events_per_s={:.0} p50_us={} p99_us={}",
            r.events,
            r.secs,
            r.events_per_s(),
            percentile_us(&r.latencies, 0.5),
            percentile_us(&r.latencies, 0.99)
        )
    };
    Ok(format!(
        "{}\n{} ratio_vs_unconditional={:.3}",
        line(&plain, "none"),
        line(&cond, "own_tag"),
        cond.events_per_s() / plain.events_per_s()
    ))
}

async fn d2(store: &EmbeddedStore, events: u64) -> Result<String> {
    const PER_TAG: u64 = 100;
    const BATCH: u64 = 100;
    let run = Uuid::now_v7().simple().to_string();
    let tags = (events / PER_TAG).max(1);
    let tag = {
        let run = run.clone();
        move |n: u64| format!("account:{run}-{n}")
    };
    // Fill (not timed): appends of 100 events, event i tagged with tag i mod `tags`.
    let mut handles = Vec::new();
    for c in 0..CLIENTS {
        let (store, tag, run) = (store.clone(), tag.clone(), run.clone());
        handles.push(tokio::spawn(async move {
            let mut b = c;
            while b * BATCH < events {
                let batch = (b * BATCH..((b + 1) * BATCH).min(events))
                    .map(|i| tagged_deposit(i, &tag(i % tags)))
                    .collect();
                store
                    .append(&format!("d2-{run}-{}", b % 1000), ExpectedVersion::Any, batch)
                    .await?;
                b += CLIENTS;
            }
            anyhow::Ok(())
        }));
    }
    for h in handles {
        h.await??;
    }
    let mut times = Vec::new();
    let mut matches = 0;
    for k in 0..21 {
        let q = Query::tags([tag((k * 7919) % tags)]);
        let t0 = Instant::now();
        let found = store.read_query(&q, cairn_core::ReadAllOptions::forward()).await?;
        times.push(t0.elapsed());
        matches = found.len();
        if found.len() as u64 != PER_TAG.min(events) {
            bail!("D2 read {} events of a tag, expected {PER_TAG}", found.len());
        }
    }
    times.sort();
    let total = store.stats().events_written.load(std::sync::atomic::Ordering::Relaxed);
    Ok(format!(
        "bench D2 backend=embedded events={total} matches={matches} runs={} ms={:.3} max_ms={:.3}",
        times.len(),
        times[times.len() / 2].as_secs_f64() * 1e3,
        times[times.len() - 1].as_secs_f64() * 1e3
    ))
}
