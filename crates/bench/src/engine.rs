//! W1–W5: the engine's own workloads (commands through the repository,
//! batches, long streams, catching up, live subscriptions).

use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use cairn_core::{ExpectedVersion, NewEvent, ReadAllOptions, StartFrom, SubscriptionTarget};
use cairn_domain::{EventCodec, Repository, SnapshotPolicy};
use cairn_example_bank as bank;
use uuid::Uuid;

use crate::measure::{Target, deposit, fsyncs, percentile};

/// A payer reference that brings the stored payload to the ~150 bytes docs/WORKLOADS.md asks for.
const NOTE: &str =
    "salary for November, paid by ACME Widgets Ltd, ref 2026-11, invoice 4711-0042, thank you";

/// The W1 command: a deposit through the repository (load, decide, append one
/// event with the exact expected version).
fn deposit_command(amount: u64) -> bank::Command {
    bank::Command::Deposit { amount, currency: "EUR".into(), note: Some(NOTE.into()) }
}

/// Opens `accounts` accounts named `{prefix}-{n}` through the repository (not timed).
async fn open_accounts(
    repo: &Repository<bank::Account>,
    prefix: &str,
    accounts: u64,
) -> Result<()> {
    let mut handles = Vec::new();
    for t in 0..16 {
        let repo = repo.clone();
        let prefix = prefix.to_string();
        handles.push(tokio::spawn(async move {
            for n in (t..accounts).step_by(16) {
                repo.execute(
                    &format!("{prefix}-{n}"),
                    &bank::Command::Open { owner: format!("owner {n}"), currency: "EUR".into() },
                )
                .await?;
            }
            anyhow::Ok(())
        }));
    }
    for h in handles {
        h.await??;
    }
    Ok(())
}

pub(crate) async fn w1(
    t: &Target,
    prefix: &str,
    tasks: usize,
    commands: u64,
    cache: usize,
) -> Result<String> {
    let accounts = 1000u64;
    let repo = Repository::<bank::Account>::new(t.store.clone()).with_cache(cache);
    open_accounts(&repo, prefix, accounts).await?;
    let per_task = commands / tasks as u64;
    // Each task owns the accounts ≡ t (mod tasks), so no two tasks ever race.
    let per_task_accounts = accounts / tasks as u64;
    let syncs_before = t.syncs();
    let started = Instant::now();
    let mut handles = Vec::new();
    for task in 0..tasks as u64 {
        let repo = repo.clone();
        let prefix = prefix.to_string();
        handles.push(tokio::spawn(async move {
            let mut latencies = Vec::with_capacity(per_task as usize);
            for i in 0..per_task {
                let account = format!("{prefix}-{}", task + tasks as u64 * (i % per_task_accounts));
                let t0 = Instant::now();
                repo.execute(&account, &deposit_command(125)).await?;
                latencies.push(t0.elapsed());
            }
            anyhow::Ok(latencies)
        }));
    }
    let mut latencies = Vec::new();
    for h in handles {
        latencies.extend(h.await??);
    }
    let secs = started.elapsed().as_secs_f64();
    let syncs = fsyncs(syncs_before, t.syncs());
    latencies.sort();
    let n = latencies.len();
    let name = if tasks == 1 { "W1" } else { "W1c" };
    Ok(format!(
        "bench {name} backend={} via=repository cache={cache} events={n} tasks={tasks} secs={secs:.2} events_per_s={:.0} p50_us={} p99_us={}{syncs}",
        t.backend,
        n as f64 / secs,
        percentile(&latencies, 0.5),
        percentile(&latencies, 0.99)
    ))
}

pub(crate) async fn w2(t: &Target, events: u64, tasks: usize) -> Result<String> {
    let batches = events / 100;
    let syncs_before = t.syncs();
    // Build the batches first: the figure is the store's, not serde's.
    let mut work: Vec<Vec<(String, Vec<NewEvent>)>> = (0..tasks).map(|_| Vec::new()).collect();
    for b in 0..batches {
        let batch = (0..100).map(|i| deposit(b * 100 + i, Uuid::now_v7())).collect();
        work[(b as usize) % tasks].push((format!("batch-{}", b % 1000), batch));
    }
    // Bytes as the engine writes them where it counts them, else the payloads and metadata.
    let payload: usize = work
        .iter()
        .flatten()
        .flat_map(|(_, b)| b)
        .map(|e| e.data.len() + e.event_type.len() + 64)
        .sum();
    let bytes_before = t
        .embedded
        .as_ref()
        .map(|s| s.stats().bytes_written.load(std::sync::atomic::Ordering::Relaxed));
    let started = Instant::now();
    let mut handles = Vec::new();
    for mine in work {
        let store = t.store.clone();
        handles.push(tokio::spawn(async move {
            for (stream, batch) in mine {
                store.append(&stream, ExpectedVersion::Any, batch).await?;
            }
            anyhow::Ok(())
        }));
    }
    for h in handles {
        h.await??;
    }
    let secs = started.elapsed().as_secs_f64();
    let bytes = match (&t.embedded, bytes_before) {
        (Some(s), Some(before)) => {
            s.stats().bytes_written.load(std::sync::atomic::Ordering::Relaxed) - before
        }
        _ => payload as u64,
    };
    let syncs = fsyncs(syncs_before, t.syncs());
    let n = batches * 100;
    Ok(format!(
        "bench W2 backend={} events={n} batch=100 tasks={tasks} secs={secs:.3} events_per_s={:.0} mb_per_s={:.1}{syncs}",
        t.backend,
        n as f64 / secs,
        bytes as f64 / secs / 1e6
    ))
}

/// Median time of five loads of account `id`, and what the last one replayed.
async fn median_load(
    repo: &Repository<bank::Account>,
    id: &str,
    events: u64,
) -> Result<(f64, usize)> {
    let mut times = Vec::new();
    let mut replayed = 0;
    for _ in 0..5 {
        let t0 = Instant::now();
        let loaded = repo.load(id).await?;
        times.push(t0.elapsed());
        if loaded.version != events || loaded.state.balance == 0 {
            bail!("W3 loaded version {}, expected {events}", loaded.version);
        }
        replayed = loaded.replayed;
    }
    times.sort();
    Ok((times[2].as_secs_f64(), replayed))
}

pub(crate) async fn w3(t: &Target, events: u64) -> Result<String> {
    let store = &t.store;
    let id = format!("big-{}", Uuid::now_v7().simple());
    let stream = format!("account-{id}");
    let plain =
        Repository::<bank::Account>::new(store.clone()).with_snapshots(SnapshotPolicy::Never);
    let snapshots =
        Repository::<bank::Account>::new(store.clone()).with_snapshots(SnapshotPolicy::every(100));
    plain.execute(&id, &bank::Command::Open { owner: "W3".into(), currency: "EUR".into() }).await?;
    // Written in batches of 100 deposits, with a snapshot after each: what
    // `SnapshotPolicy::every(100)` leaves behind, built faster.
    let codec = EventCodec::<bank::Event>::new();
    let mut written = 1;
    while written < events {
        let n = (events - written).min(100);
        let batch = (0..n)
            .map(|i| {
                codec
                    .encode(&bank::Event::MoneyDeposited {
                        amount: 100 + i,
                        currency: "EUR".into(),
                        note: Some(NOTE.into()),
                    })
                    .map_err(anyhow::Error::msg)
            })
            .collect::<Result<Vec<_>>>()?;
        store.append(&stream, ExpectedVersion::Exact(written), batch).await?;
        written += n;
        if written % 100 == 0 || written == events {
            snapshots.snapshot(&id).await?;
        }
    }
    let (full, replayed_full) = median_load(&plain, &id, events).await?;
    let (snap, replayed_snap) = median_load(&snapshots, &id, events).await?;
    // The engine's share: reading the events without decoding them.
    let mut reads = Vec::new();
    for _ in 0..5 {
        let t0 = Instant::now();
        std::hint::black_box(
            store.read_stream(&stream, cairn_core::ReadStreamOptions::forward()).await?,
        );
        reads.push(t0.elapsed());
    }
    reads.sort();
    Ok(format!(
        "bench W3 backend={b} via=repository events={events} snapshots=none median_ms={:.3} read_ms={:.3} replayed={replayed_full} events_per_s={:.0}\n\
        bench W3 backend={b} via=repository events={events} snapshots=every_100 median_ms={:.3} replayed={replayed_snap}",
        full * 1e3,
        reads[2].as_secs_f64() * 1e3,
        events as f64 / full,
        snap * 1e3,
        b = t.backend
    ))
}

pub(crate) async fn w4(t: &Target, minimum: u64) -> Result<String> {
    let store = &t.store;
    let written = match &t.embedded {
        Some(s) => s.stats().events_written.load(std::sync::atomic::Ordering::Relaxed),
        // Positions there count events (a rolled-back append leaves a hole, not here).
        None => store.head_position().await?.0 - 1,
    };
    if written < minimum {
        // Run alone (or after little): fill the store first, as W1 + W2 would.
        w2(t, (minimum - written).div_ceil(100) * 100, 16).await?;
    }
    let mut best = f64::MAX;
    let mut count = 0;
    for _ in 0..3 {
        let t0 = Instant::now();
        let mut page = store.read_all(ReadAllOptions::forward().limit(10_000)).await?;
        count = 0u64;
        while let Some(last) = page.last().map(|e| e.position) {
            count += page.len() as u64;
            page = store.read_all(ReadAllOptions::forward().after(last).limit(10_000)).await?;
        }
        best = best.min(t0.elapsed().as_secs_f64());
    }
    Ok(format!(
        "bench W4 backend={} events={count} secs={best:.3} events_per_s={:.0}",
        t.backend,
        count as f64 / best
    ))
}

pub(crate) async fn w5(t: &Target, seconds: u64) -> Result<String> {
    let store = &t.store;
    let total = seconds * 1000;
    let mut sub = store.subscribe(SubscriptionTarget::All, StartFrom::End).await?;
    let receiver = tokio::spawn(async move {
        let mut got = Vec::with_capacity(total as usize);
        while (got.len() as u64) < total {
            match sub.next().await {
                Some(Ok(e)) => got.push((e.id, Instant::now())),
                Some(Err(e)) => return Err(anyhow::Error::from(e)),
                None => bail!("subscription ended"),
            }
        }
        Ok(got)
    });
    let store2 = store.clone();
    let writer = tokio::spawn(async move {
        let mut sent = Vec::with_capacity(total as usize);
        let mut tick = tokio::time::interval(Duration::from_millis(1));
        for i in 0..total {
            tick.tick().await;
            let e = deposit(i, Uuid::now_v7());
            let id = e.id;
            let t0 = Instant::now();
            store2.append("latency", ExpectedVersion::Any, vec![e]).await?;
            sent.push((id, t0, Instant::now()));
        }
        anyhow::Ok(sent)
    });
    let sent = writer.await??;
    let got: std::collections::HashMap<Uuid, Instant> = receiver.await??.into_iter().collect();
    let mut from_call = Vec::new();
    let mut from_ack = Vec::new();
    for (id, t0, acked) in sent {
        let Some(at) = got.get(&id) else { bail!("event {id} was never delivered") };
        from_call.push(at.saturating_duration_since(t0));
        from_ack.push(at.saturating_duration_since(acked));
    }
    from_call.sort();
    from_ack.sort();
    Ok(format!(
        "bench W5 backend={} events={total} rate_per_s=1000 p50_us={} p99_us={} after_ack_p50_us={} after_ack_p99_us={}",
        t.backend,
        percentile(&from_call, 0.5),
        percentile(&from_call, 0.99),
        percentile(&from_ack, 0.5),
        percentile(&from_ack, 0.99)
    ))
}
