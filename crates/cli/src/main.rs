//! `cairn`: the command-line tool. It parses arguments and calls the libraries.

mod census;
mod commands;
mod operate;
mod output;
mod relay;
mod sagas;
mod serve;
mod tour;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

// Events are many small allocations (names, types); mimalloc handles them
// markedly better than the system allocator on the read paths (W3, W4).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "cairn",
    version,
    about = "Cairn: an event store for systems where history matters"
)]
#[command(
    after_help = "Start with `cairn tour` for a five-minute walk through the patterns, or `cairn serve --demo` for the tour plus the server and its web UI."
)]
struct Cli {
    /// Data directory of the embedded store.
    #[arg(long, global = true, default_value = "./cairn-data", env = "CAIRN_DATA")]
    data: PathBuf,
    /// Work with the Cairn server at this URL (as `cairn serve` prints it) instead of --data.
    #[arg(long, global = true, env = "CAIRN_URL", value_name = "URL")]
    url: Option<String>,
    /// A CA certificate (PEM) to trust for an https --url signed by a private CA.
    #[arg(long, global = true, env = "CAIRN_CA", value_name = "PEM")]
    ca: Option<PathBuf>,
    /// API key for the server at --url.
    #[arg(long, global = true, env = "CAIRN_API_KEY", value_name = "KEY", hide_env_values = true)]
    api_key: Option<String>,
    /// Where events live: the embedded engine in --data, or PostgreSQL (--database-url).
    #[arg(long, global = true, value_enum, default_value = "embedded", env = "CAIRN_BACKEND")]
    backend: commands::Backend,
    /// PostgreSQL connection for --backend postgres: postgres://user@host:port/db or "host=… user=… dbname=…".
    #[arg(
        long,
        global = true,
        env = "CAIRN_DATABASE_URL",
        value_name = "URL",
        hide_env_values = true
    )]
    database_url: Option<String>,
    /// The PostgreSQL schema that holds Cairn's tables (created and migrated on first use).
    #[arg(
        long,
        global = true,
        env = "CAIRN_PG_SCHEMA",
        default_value = "cairn",
        value_name = "NAME"
    )]
    pg_schema: String,
    /// Print JSON (one object per line) instead of tables.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// A tour of Cairn on a fresh embedded store: events and streams, concurrency, subscriptions, then aggregates, snapshots, time travel, upcasting and tag conditions.
    Tour {
        /// Keep the tour's data in this directory instead of a temporary one.
        #[arg(long)]
        keep: Option<PathBuf>,
    },
    /// A narrated demo on a fresh store: `bank` (aggregates), `courses` (tags and conditions),
    /// `orders` (projections, consumers, read models; notification vs event-carried state)
    /// or `sagas` (the order saga: compensation, timeouts, crash recovery, deadlines).
    Demo {
        #[arg(value_enum, default_value = "bank")]
        which: Demo,
        /// Keep the demo's data in this new directory (orders and sagas), to look at it afterwards.
        #[arg(long, value_name = "DIR")]
        keep: Option<PathBuf>,
        /// Sagas only: run one order whose payment is charged (ok), declined, or hangs until the step times out.
        #[arg(long, value_enum)]
        payment: Option<cairn_example_sagas::Payment>,
    },
    /// Serve the store (--data, or PostgreSQL with --backend postgres) over HTTP and gRPC (default http://127.0.0.1:8720; the API at /openapi.json).
    Serve(serve::ServeArgs),
    /// Publish the store's events to NATS JetStream or RabbitMQ, in order, at least once (message id = event id), from a checkpoint in the store.
    Relay(relay::RelayArgs),
    /// API keys for the server: add (printed once), list, remove.
    Keys(serve::KeysArgs),
    /// Append events to a stream: one from TYPE and JSON, or JSON lines on stdin
    /// (`{"type": "...", "data": {...}, "id"?: "...", "metadata"?: {...}, "tags"?: [...]}`), all in one
    /// atomic append; --tag adds tags (`course:cs101`) to every event.
    Append(commands::AppendArgs),
    /// Read a stream's events.
    Read(commands::ReadArgs),
    /// Read all events in global order ($all).
    ReadAll(commands::ReadAllArgs),
    /// Read the events matching a query, in global order: any --type given, carrying every --tag given.
    Query(commands::QueryArgs),
    /// Follow a stream, or $all, live (history first with --from).
    Tail(commands::TailArgs),
    /// List streams with their versions.
    Streams(commands::StreamsArgs),
    /// Show or change a stream's metadata (max age, max count, truncate before).
    Metadata(commands::MetadataArgs),
    /// Delete a stream: soft (the name can be reused) or --hard (tombstone, for good).
    Delete(commands::DeleteArgs),
    /// Check every record's checksum, every stream's version sequence and every index file, and that no acknowledged event is missing.
    Verify,
    /// Count stored events per type and schema version (to know when an upcaster can go).
    Census,
    /// Rebuild the index files and stream summaries from the log (they are caches; no event changes).
    Reindex,
    /// Projections kept in SQLite read model files: status and lag as a table; pause, resume, reset.
    Projections(operate::ProjectionsArgs),
    /// Consumer groups in the store: status and lag, parked events, replay.
    Groups(operate::GroupsArgs),
    /// Sagas in the store: list them with their status, show one's steps and timeline, resume one that needs attention; the instances of process managers (processes, show).
    Sagas(sagas::SagasArgs),
    /// Run benchmark workloads (W1 W1c W2 W3 W4 W5 W6, see docs/WORKLOADS.md; D1 D2 tags and conditions, G1 consumer groups, W7 the server, W8 sagas, W9 the relay to NATS and RabbitMQ; S1 the engine at scale, `--events N`) on a fresh store; --backend postgres runs W1–W5, W8 and W9 in a fresh schema.
    Bench(cairn_bench::BenchArgs),
    /// Print a completion script for your shell: `cairn completions bash > ~/.local/share/bash-completion/completions/cairn`, or zsh, fish, elvish, powershell.
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum Demo {
    /// The bank account: replay, rules, snapshots, time travel, upcasting, conflicts, what-if.
    Bank,
    /// Course subscriptions: rules across entities with tags and conditional appends, raced.
    Courses,
    /// The order flow: independent consumers with checkpoints, lag, read models; the insurance quote.
    Orders,
    /// The order saga: CreateOrder/CancelOrder, ChargeCard/RefundCard, ReserveItems/ReleaseItems; a payment that fails or hangs; a restart; a deadline.
    Sagas,
}

fn main() -> ExitCode {
    let matches = <Cli as clap::CommandFactory>::command().get_matches();
    let data_is_default =
        matches.value_source("data") == Some(clap::parser::ValueSource::DefaultValue);
    let cli = match <Cli as clap::FromArgMatches>::from_arg_matches(&matches) {
        Ok(cli) => cli,
        Err(e) => e.exit(),
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let ctx = commands::Context {
        data: cli.data,
        data_is_default,
        json: cli.json,
        url: cli.url,
        api_key: cli.api_key,
        ca: cli.ca,
        backend: cli.backend,
        database_url: cli.database_url,
        pg_schema: cli.pg_schema,
    };
    let result = runtime.block_on(async move {
        match cli.command {
            Command::Tour { keep } => tour::run(keep).await,
            Command::Demo { which: Demo::Sagas, keep, payment } => cairn_example_sagas::run(keep, payment).await,
            Command::Demo { payment: Some(_), .. } => Err(anyhow::anyhow!("--payment belongs to `cairn demo sagas`; run the others without it")),
            Command::Demo { which: Demo::Orders, keep, .. } => cairn_example_orders::run(keep).await,
            Command::Demo { keep: Some(_), .. } => Err(anyhow::anyhow!("--keep works with `cairn demo orders` and `cairn demo sagas` only for now; run the others without it")),
            Command::Demo { which: Demo::Bank, .. } => cairn_example_bank::demo::run().await,
            Command::Demo { which: Demo::Courses, .. } => cairn_example_courses::demo::run().await,
            Command::Serve(a) => serve::run(&ctx, a).await,
            Command::Keys(a) => serve::keys(&ctx, a),
            Command::Relay(a) => relay::run(&ctx, a).await,
            Command::Census => census::run(&ctx).await,
            Command::Append(a) => commands::append(&ctx, a).await,
            Command::Read(a) => commands::read(&ctx, a).await,
            Command::ReadAll(a) => commands::read_all(&ctx, a).await,
            Command::Query(a) => commands::query(&ctx, a).await,
            Command::Tail(a) => commands::tail(&ctx, a).await,
            Command::Streams(a) => commands::streams(&ctx, a).await,
            Command::Metadata(a) => commands::metadata(&ctx, a).await,
            Command::Delete(a) => commands::delete(&ctx, a).await,
            Command::Verify => commands::verify(&ctx),
            Command::Reindex => commands::reindex(&ctx),
            Command::Projections(a) => operate::projections(&ctx, a).await,
            Command::Groups(a) => operate::groups(&ctx, a).await,
            Command::Sagas(a) => sagas::run(&ctx, a).await,
            Command::Bench(a) => cairn_bench::run(&ctx.bench_backend(), a).await,
            Command::Completions { shell } => {
                let mut command = <Cli as clap::CommandFactory>::command();
                clap_complete::generate(shell, &mut command, "cairn", &mut std::io::stdout());
                Ok(())
            }
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            match e.downcast_ref::<cairn_core::StoreError>() {
                // A store error says it all; its sources would repeat it.
                Some(store_error) => {
                    eprintln!("error: {store_error}");
                    if let Some(hint) = output::hint(store_error) {
                        eprintln!("hint: {hint}");
                    }
                }
                None => eprintln!("error: {e:#}"),
            }
            ExitCode::FAILURE
        }
    }
}
