//! `cairn bench`: the workloads of docs/WORKLOADS.md on the embedded engine or
//! PostgreSQL (`--backend postgres`, in a fresh schema dropped afterwards).
//! Each prints one machine-readable line, e.g.
//! `bench W1 backend=embedded events=20000 secs=0.41 events_per_s=48780 p50_us=18 p99_us=95`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use cairn_core::{
    EventStore, ExpectedVersion, Metadata, NewEvent, ReadAllOptions, StartFrom, SubscriptionTarget,
};
use cairn_domain::{EventCodec, Repository, SnapshotPolicy};
use cairn_example_bank as bank;
use cairn_log::EmbeddedStore;
use clap::Args;
use uuid::Uuid;

const ALL: [&str; 7] = ["W1", "W1c", "W2", "W3", "W4", "W5", "W6"];

#[derive(Args)]
pub(crate) struct BenchArgs {
    /// Workloads to run, in order (default: W1 W1c W2 W3 W4 W5 W6; also D1 D2, G1 for consumer groups, W7 for the HTTP server, W8 sagas, W9 the relay; S1, alone, the engine filled with --events N). W4 reads what the others wrote.
    pub workloads: Vec<String>,
    /// Scale the event counts by this factor (1.0 = the sizes in docs/WORKLOADS.md).
    #[arg(long, default_value_t = 1.0)]
    pub scale: f64,
    /// Concurrent appenders for W2 (group commit shares each fsync among them).
    #[arg(long, default_value_t = 16)]
    pub w2_tasks: usize,
    /// W1/W1c: let the repository cache up to N aggregates (0 = off, the default),
    /// so that a load replays only events appended since the last one.
    #[arg(long, default_value_t = 0)]
    pub cache: usize,
    /// W9: the brokers to relay to, in order (nats, rabbitmq).
    #[arg(long = "sink", value_name = "SINK", default_values_t = ["nats".to_string(), "rabbitmq".to_string()])]
    pub sink: Vec<String>,
    /// Directory for the fresh data directory (default: the system temp dir).
    #[arg(long)]
    pub dir: Option<std::path::PathBuf>,
    /// S1: events to fill the store with [default: 100000000, ~17 GB of disk].
    #[arg(long, value_name = "N")]
    pub events: Option<u64>,
    /// S1: fill this directory and keep the store there afterwards; a store
    /// already there (filled by S1 with the same --events) is measured again
    /// without a new fill.
    #[arg(long, value_name = "DIR")]
    pub keep: Option<std::path::PathBuf>,
    /// S1: streams the fill spreads its events over [default: 10000]; the
    /// stream summaries are what grows with it.
    #[arg(long, value_name = "N")]
    pub streams: Option<u64>,
    /// W7: run the clients in a child process (as services in other
    /// processes are), at 1, 16 and 64 writers over gRPC and HTTP, a
    /// streaming producer and 16 readers; with the server's CPU per request.
    #[arg(long)]
    pub client_process: bool,
    /// (The W7 child's run: "API MODE TASKS SECONDS ADDR".)
    #[arg(long, hide = true)]
    pub client_spec: Option<String>,
}

/// A `MoneyDeposited` event of about 150 bytes with ordinary metadata.
pub(crate) fn deposit(amount: u64, correlation: Uuid) -> NewEvent {
    let data = serde_json::json!({"amount": amount, "currency": "EUR", "note": "salary for November, paid by ACME Widgets Ltd, ref 2026-11"});
    let metadata = Metadata {
        correlation_id: Some(correlation),
        causation_id: Some(Uuid::now_v7()),
        ..Default::default()
    };
    NewEvent::json("MoneyDeposited", &data).expect("serialisable").with_metadata(metadata)
}

pub(crate) fn percentile(sorted: &[Duration], p: f64) -> u128 {
    if sorted.is_empty() {
        return 0;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize].as_micros()
}

fn scaled(n: u64, scale: f64) -> u64 {
    ((n as f64 * scale) as u64).max(1)
}

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

/// The store under test. Engine counters (fsyncs, bytes) exist only for
/// the embedded engine.
#[derive(Clone)]
pub(crate) struct Target {
    pub store: Arc<dyn EventStore>,
    pub backend: &'static str,
    pub embedded: Option<EmbeddedStore>,
    /// PostgreSQL: a second store on the same schema with a pool (and
    /// LISTEN connection) of its own, as a second server process would have.
    pub second: Option<Arc<dyn EventStore>>,
}

impl Target {
    pub(crate) fn syncs(&self) -> Option<u64> {
        self.embedded.as_ref().map(|s| s.stats().syncs.load(std::sync::atomic::Ordering::Relaxed))
    }
}

/// Workloads that run on PostgreSQL too (the others use the embedded engine's own parts).
const ON_POSTGRES: [&str; 9] = ["W1", "W1c", "W2", "W3", "W4", "W5", "W7", "W8", "W9"];

fn spinner(what: &str) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new_spinner();
    bar.set_message(format!("running {what}"));
    bar.enable_steady_tick(Duration::from_millis(120));
    bar
}

pub(crate) async fn run(ctx: &crate::commands::Context, args: BenchArgs) -> Result<()> {
    use crate::bench_scale::{CHILD_APPEND, CHILD_OPEN};
    // S1 and its children manage their own stores.
    match args.workloads.iter().map(String::as_str).collect::<Vec<_>>()[..] {
        [CHILD_OPEN] | [CHILD_APPEND] => {
            let dir = args
                .keep
                .as_deref()
                .ok_or_else(|| anyhow::anyhow!("{} needs --keep DIR", args.workloads[0]))?;
            let line = if args.workloads[0] == CHILD_OPEN {
                crate::bench_scale::child_open(dir)?
            } else {
                crate::bench_scale::child_append(dir).await?
            };
            println!("{line}");
            return Ok(());
        }
        [crate::bench_outside::CHILD] => {
            let spec = args.client_spec.as_deref().ok_or_else(|| {
                anyhow::anyhow!("{} needs --client-spec", crate::bench_outside::CHILD)
            })?;
            println!("{}", crate::bench_outside::child(spec).await?);
            return Ok(());
        }
        ["S1"] => {
            if ctx.backend == crate::commands::Backend::Postgres {
                bail!("S1 measures the embedded engine at scale; it does not run on PostgreSQL");
            }
            let tmp = match &args.dir {
                Some(d) => tempfile::Builder::new().prefix("cairn-bench-").tempdir_in(d)?,
                None => tempfile::Builder::new().prefix("cairn-bench-").tempdir()?,
            };
            let events = args.events.unwrap_or(crate::bench_scale::DEFAULT_EVENTS);
            println!(
                "{}",
                crate::bench_scale::s1(
                    events,
                    args.streams.unwrap_or(crate::bench_scale::DEFAULT_STREAMS),
                    args.keep.as_deref(),
                    tmp.path()
                )
                .await?
            );
            return Ok(());
        }
        _ if args.workloads.iter().any(|w| w == "S1") => {
            bail!("S1 runs alone: `cairn bench S1 [--events N] [--streams N] [--keep DIR]`")
        }
        _ => {}
    }
    if args.client_process && !args.workloads.iter().any(|w| w == "W7") {
        bail!(
            "--client-process measures the server (W7) from another process: `cairn bench W7 --client-process`"
        );
    }
    let postgres = ctx.backend == crate::commands::Backend::Postgres;
    let workloads: Vec<String> = if args.workloads.is_empty() {
        if postgres {
            ON_POSTGRES[..5].iter().map(|s| s.to_string()).collect()
        } else {
            ALL.iter().map(|s| s.to_string()).collect()
        }
    } else {
        args.workloads.clone()
    };
    for w in &workloads {
        if !ALL.contains(&w.as_str())
            && !crate::bench_dcb::WORKLOADS.contains(&w.as_str())
            && !["G1", "W7", "W8", "W9"].contains(&w.as_str())
        {
            bail!(
                "unknown workload '{w}'; choose from {} {} G1 W7 W8 W9",
                ALL.join(" "),
                crate::bench_dcb::WORKLOADS.join(" ")
            );
        }
        if postgres && !ON_POSTGRES.contains(&w.as_str()) {
            bail!(
                "workload '{w}' runs on the embedded engine only for now; on PostgreSQL: {}",
                ON_POSTGRES.join(" ")
            );
        }
    }
    let tmp = match &args.dir {
        Some(d) => tempfile::Builder::new().prefix("cairn-bench-").tempdir_in(d)?,
        None => tempfile::Builder::new().prefix("cairn-bench-").tempdir()?,
    };
    let mut pg_schema = None;
    let target = if postgres {
        let schema = format!("cairn_bench_{}", &Uuid::new_v4().simple().to_string()[..12]);
        let ctx = crate::commands::Context { pg_schema: schema.clone(), ..ctx.clone() };
        let store = ctx.postgres().await?;
        let second = ctx.postgres().await?;
        pg_schema = Some((store.clone(), schema));
        Target {
            store: Arc::new(store),
            backend: "postgres",
            embedded: None,
            second: Some(Arc::new(second)),
        }
    } else {
        let store = EmbeddedStore::open(tmp.path())?;
        Target {
            store: Arc::new(store.clone()),
            backend: "embedded",
            embedded: Some(store),
            second: None,
        }
    };
    let result = run_workloads(&target, &workloads, &args, tmp.path()).await;
    if let Some((store, schema)) = pg_schema {
        // A fresh schema per run; it goes with the run.
        let client = store.pool().get().await?;
        client.batch_execute(&format!("DROP SCHEMA {schema} CASCADE")).await?;
    }
    result
}

async fn run_workloads(
    target: &Target,
    workloads: &[String],
    args: &BenchArgs,
    dir: &std::path::Path,
) -> Result<()> {
    let s = args.scale;
    for w in workloads {
        let bar = spinner(w);
        let line = match (w.as_str(), &target.embedded) {
            ("W1", _) => w1(target, "acct", 1, scaled(20_000, s), args.cache).await?,
            ("W1c", _) => w1(target, "acct-c", 16, scaled(20_000, s), args.cache).await?,
            ("W2", _) => w2(target, scaled(100_000, s), args.w2_tasks).await?,
            ("W3", _) => w3(target, scaled(10_000, s)).await?,
            ("W4", _) => w4(target, scaled(120_000, s)).await?,
            ("W5", Some(store)) => format!(
                "{}\n{}",
                w5(target, scaled(10, s)).await?,
                crate::bench_cqrs::w5_projection(store, scaled(10, s)).await?
            ),
            ("W5", None) => w5(target, scaled(10, s)).await?,
            ("W6", Some(store)) => crate::bench_cqrs::w6(store, scaled(1_000_000, s), dir).await?,
            ("G1", Some(store)) => crate::bench_cqrs::g1(store, scaled(100_000, s)).await?,
            ("W7", _) if args.client_process => crate::bench_outside::w7(target, 5.0 * s).await?,
            ("W7", _) => crate::bench_server::w7(target, 10.0 * s).await?,
            ("W8", _) => crate::bench_saga::w8(target, scaled(10_000, s)).await?,
            ("W9", _) => {
                crate::bench_relay::w9(
                    target,
                    scaled(100_000, s),
                    crate::bench_relay::live_events(s),
                    &args.sink,
                )
                .await?
            }
            ("D1" | "D2", Some(store)) => crate::bench_dcb::run(store, w, s).await?,
            _ => unreachable!("checked above"),
        };
        bar.finish_and_clear();
        println!("{line}");
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

/// ` fsyncs=N` where the engine counts them.
pub(crate) fn fsyncs(before: Option<u64>, after: Option<u64>) -> String {
    before.zip(after).map(|(b, a)| format!(" fsyncs={}", a - b)).unwrap_or_default()
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

async fn w4(t: &Target, minimum: u64) -> Result<String> {
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

async fn w5(t: &Target, seconds: u64) -> Result<String> {
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
