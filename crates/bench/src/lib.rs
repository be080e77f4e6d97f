//! `cairn bench`: the workloads of docs/WORKLOADS.md on the embedded engine or
//! PostgreSQL (`--backend postgres`, in a fresh schema dropped afterwards).
//! Each prints one machine-readable line, e.g.
//! `bench W1 backend=embedded events=20000 secs=0.41 events_per_s=48780 p50_us=18 p99_us=95`.

//!
//! The library is what `cairn bench` runs: [`BenchArgs`] are its arguments
//! and [`run`] the whole command. Each workload lives in its own module and
//! shares only `measure`'s parts, so no module reaches back up here.

mod cqrs;
mod dcb;
mod engine;
mod measure;
mod outside;
mod relay;
mod saga;
mod scale;
mod server;

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use cairn_log::EmbeddedStore;
use clap::Args;
use uuid::Uuid;

use crate::engine::{w1, w2, w3, w4, w5};
use crate::measure::{Target, scaled};

/// Where the workloads run.
#[derive(Clone, Debug)]
pub enum Backend {
    /// A fresh embedded store in a temporary directory.
    Embedded,
    /// A fresh schema in this PostgreSQL database, dropped afterwards.
    Postgres {
        /// e.g. `postgres://postgres@127.0.0.1:5432/test` (`None`: not given,
        /// which is an error once a workload needs it).
        database_url: Option<String>,
    },
}

const ALL: [&str; 7] = ["W1", "W1c", "W2", "W3", "W4", "W5", "W6"];

#[derive(Args)]
pub struct BenchArgs {
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

/// Workloads that run on PostgreSQL too (the others use the embedded engine's own parts).
const ON_POSTGRES: [&str; 9] = ["W1", "W1c", "W2", "W3", "W4", "W5", "W7", "W8", "W9"];

fn spinner(what: &str) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new_spinner();
    bar.set_message(format!("running {what}"));
    bar.enable_steady_tick(Duration::from_millis(120));
    bar
}

/// Runs `cairn bench` with these arguments, printing one line per workload.
pub async fn run(backend: &Backend, args: BenchArgs) -> Result<()> {
    use crate::scale::{CHILD_APPEND, CHILD_OPEN};
    // S1 and its children manage their own stores.
    match args.workloads.iter().map(String::as_str).collect::<Vec<_>>()[..] {
        [CHILD_OPEN] | [CHILD_APPEND] => {
            let dir = args
                .keep
                .as_deref()
                .ok_or_else(|| anyhow::anyhow!("{} needs --keep DIR", args.workloads[0]))?;
            let line = if args.workloads[0] == CHILD_OPEN {
                crate::scale::child_open(dir)?
            } else {
                crate::scale::child_append(dir).await?
            };
            println!("{line}");
            return Ok(());
        }
        [crate::outside::CHILD] => {
            let spec = args
                .client_spec
                .as_deref()
                .ok_or_else(|| anyhow::anyhow!("{} needs --client-spec", crate::outside::CHILD))?;
            println!("{}", crate::outside::child(spec).await?);
            return Ok(());
        }
        ["S1"] => {
            if matches!(backend, Backend::Postgres { .. }) {
                bail!("S1 measures the embedded engine at scale; it does not run on PostgreSQL");
            }
            let tmp = match &args.dir {
                Some(d) => tempfile::Builder::new().prefix("cairn-bench-").tempdir_in(d)?,
                None => tempfile::Builder::new().prefix("cairn-bench-").tempdir()?,
            };
            let events = args.events.unwrap_or(crate::scale::DEFAULT_EVENTS);
            println!(
                "{}",
                crate::scale::s1(
                    events,
                    args.streams.unwrap_or(crate::scale::DEFAULT_STREAMS),
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
    let postgres = matches!(backend, Backend::Postgres { .. });
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
            && !crate::dcb::WORKLOADS.contains(&w.as_str())
            && !["G1", "W7", "W8", "W9"].contains(&w.as_str())
        {
            bail!(
                "unknown workload '{w}'; choose from {} {} G1 W7 W8 W9",
                ALL.join(" "),
                crate::dcb::WORKLOADS.join(" ")
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
    let target = if let Backend::Postgres { database_url } = backend {
        let Some(database_url) = database_url else {
            bail!(
                "--backend postgres needs --database-url (or CAIRN_DATABASE_URL), e.g. postgres://postgres@127.0.0.1:5432/test"
            );
        };
        let schema = format!("cairn_bench_{}", &Uuid::new_v4().simple().to_string()[..12]);
        let connect = || async {
            let options = cairn_postgres::PgOptions::default().schema(&schema);
            cairn_postgres::PgStore::connect_with(database_url, options).await.with_context(|| {
                format!("cannot open the event store in PostgreSQL (schema {schema})")
            })
        };
        let store = connect().await?;
        let second = connect().await?;
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
                crate::cqrs::w5_projection(store, scaled(10, s)).await?
            ),
            ("W5", None) => w5(target, scaled(10, s)).await?,
            ("W6", Some(store)) => crate::cqrs::w6(store, scaled(1_000_000, s), dir).await?,
            ("G1", Some(store)) => crate::cqrs::g1(store, scaled(100_000, s)).await?,
            ("W7", _) if args.client_process => crate::outside::w7(target, 5.0 * s).await?,
            ("W7", _) => crate::server::w7(target, 10.0 * s).await?,
            ("W8", _) => crate::saga::w8(target, scaled(10_000, s)).await?,
            ("W9", _) => {
                crate::relay::w9(
                    target,
                    scaled(100_000, s),
                    crate::relay::live_events(s),
                    &args.sink,
                )
                .await?
            }
            ("D1" | "D2", Some(store)) => crate::dcb::run(store, w, s).await?,
            _ => unreachable!("checked above"),
        };
        bar.finish_and_clear();
        println!("{line}");
    }
    Ok(())
}
