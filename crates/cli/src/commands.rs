//! The data verbs: each opens the embedded store in `--data`, does one thing, and prints.

use std::io::{BufRead, IsTerminal};
use std::path::PathBuf;

use anyhow::{Context as _, Result, bail};
use cairn_core::{
    EventStore, ExpectedVersion, Metadata, NewEvent, Position, Query, QueryItem, ReadAllOptions,
    ReadStreamOptions, StartFrom, StreamMetadata, SubscriptionTarget,
};
use cairn_log::EmbeddedStore;
use clap::Args;
use uuid::Uuid;

use crate::output;

#[derive(Clone)]
pub(crate) struct Context {
    pub data: PathBuf,
    /// `--data` was not given (so a config file may choose it).
    pub data_is_default: bool,
    pub json: bool,
    /// A running server to talk to instead of the data directory.
    pub url: Option<String>,
    pub api_key: Option<String>,
    pub ca: Option<PathBuf>,
    pub backend: Backend,
    /// The PostgreSQL database of `--backend postgres`, and the schema in it.
    pub database_url: Option<String>,
    pub pg_schema: String,
}

/// Where the data verbs, `serve` and `relay` keep events.
#[derive(Clone, Copy, PartialEq, Eq, Debug, clap::ValueEnum)]
pub(crate) enum Backend {
    /// The embedded engine in --data (nothing else to run).
    Embedded,
    /// A PostgreSQL database (--database-url), in the schema --pg-schema.
    Postgres,
}

impl Context {
    /// The store in `--data`, created if there is none yet.
    pub(crate) fn open(&self) -> Result<EmbeddedStore> {
        let store = EmbeddedStore::open(&self.data)?;
        let report = store.open_report();
        if let Some((file, offset)) = &report.truncated_at {
            eprintln!(
                "note: recovery cut a torn tail of {} bytes in {} at offset {offset} (an append that was never acknowledged)",
                report.truncated_bytes,
                file.display()
            );
        }
        match report.rebuilt_indexes.as_slice() {
            [] => {}
            [(file, why)] => eprintln!(
                "note: rebuilt index file {} from its segment ({why}); it is a cache, nothing was lost",
                file.display()
            ),
            [(_, why), ..] => eprintln!(
                "note: rebuilt {} index files from their segments (the first: {why}); they are caches, nothing was lost",
                report.rebuilt_indexes.len()
            ),
        }
        Ok(store)
    }

    /// The store the data verbs work on: the server at `--url`, or the data
    /// directory (`create`: make a store there if there is none).
    pub(crate) async fn store(&self, create: bool) -> Result<std::sync::Arc<dyn EventStore>> {
        if self.url.is_none() && self.backend == Backend::Postgres {
            return Ok(std::sync::Arc::new(self.postgres().await?));
        }
        Ok(match &self.url {
            Some(url) => {
                let root = match &self.ca {
                    Some(path) => Some(std::fs::read(path).with_context(|| {
                        format!("cannot read the CA certificate {}", path.display())
                    })?),
                    None => None,
                };
                let client = cairn_client::HttpStore::with_tls_root(url, root.as_deref())?;
                std::sync::Arc::new(match &self.api_key {
                    Some(key) => client.with_api_key(key),
                    None => client,
                })
            }
            None if create => std::sync::Arc::new(self.open()?),
            None => std::sync::Arc::new(self.open_existing()?),
        })
    }

    /// The PostgreSQL store of `--backend postgres` (its schema made or migrated).
    pub(crate) async fn postgres(&self) -> Result<cairn_postgres::PgStore> {
        let Some(url) = &self.database_url else {
            bail!(
                "--backend postgres needs --database-url (or CAIRN_DATABASE_URL), e.g. postgres://postgres@127.0.0.1:5432/test"
            );
        };
        let options = cairn_postgres::PgOptions::default().schema(&self.pg_schema);
        cairn_postgres::PgStore::connect_with(url, options).await.with_context(|| {
            format!("cannot open the event store in PostgreSQL (schema {})", self.pg_schema)
        })
    }

    /// Where `cairn bench` runs its workloads.
    pub(crate) fn bench_backend(&self) -> cairn_bench::Backend {
        match self.backend {
            Backend::Embedded => cairn_bench::Backend::Embedded,
            Backend::Postgres => {
                cairn_bench::Backend::Postgres { database_url: self.database_url.clone() }
            }
        }
    }

    /// For verbs that work on the files themselves.
    pub(crate) fn local_only(&self, verb: &str) -> Result<()> {
        if self.backend == Backend::Postgres && self.url.is_none() {
            bail!(
                "`cairn {verb}` works on an embedded data directory's files; PostgreSQL keeps its own (use its tools)"
            );
        }
        if self.url.is_some() {
            bail!(
                "`cairn {verb}` works on a data directory's files, not through a server; run it with --data on the server's machine (with the server stopped)"
            );
        }
        Ok(())
    }

    pub(crate) fn open_existing(&self) -> Result<EmbeddedStore> {
        if !self.data.join("log").is_dir() {
            bail!(
                "no Cairn data in {} — append something first, or pass --data DIR",
                self.data.display()
            );
        }
        self.open()
    }
}

/// `any`, `no-stream`, `exists` or a number.
fn parse_expected(s: &str) -> Result<ExpectedVersion, String> {
    match s {
        "any" => Ok(ExpectedVersion::Any),
        "no-stream" | "no_stream" => Ok(ExpectedVersion::NoStream),
        "exists" | "stream-exists" => Ok(ExpectedVersion::StreamExists),
        n => n
            .parse()
            .map(ExpectedVersion::Exact)
            .map_err(|_| format!("'{n}' is not any, no-stream, exists or a version number")),
    }
}

#[derive(Args)]
pub(crate) struct AppendArgs {
    pub stream: String,
    /// Event type; without it, events are read as JSON lines from stdin.
    #[arg(value_name = "TYPE")]
    pub event_type: Option<String>,
    /// JSON payload of the event (`'{}'` for one without data).
    #[arg(value_name = "JSON")]
    pub payload: Option<String>,
    /// any, no-stream, exists, or the stream's current version.
    #[arg(long, short = 'e', default_value = "any", value_parser = parse_expected)]
    pub expected_version: ExpectedVersion,
    /// Event id (UUID); retrying with the same id is idempotent.
    #[arg(long)]
    pub id: Option<Uuid>,
    /// A tag for the event, such as `course:cs101` (repeatable). With stdin,
    /// added to every event's own `tags`.
    #[arg(long = "tag", value_name = "TAG")]
    pub tags: Vec<String>,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct EventLine {
    #[serde(rename = "type")]
    event_type: String,
    #[serde(default)]
    data: serde_json::Value,
    id: Option<Uuid>,
    #[serde(default)]
    metadata: Metadata,
    schema_version: Option<u32>,
    #[serde(default)]
    tags: Vec<String>,
}

fn events_from_stdin() -> Result<Vec<NewEvent>> {
    let stdin = std::io::stdin();
    if stdin.is_terminal() {
        eprintln!(
            "reading events as JSON lines from stdin (Ctrl-D to finish); or pass TYPE and JSON as arguments"
        );
    }
    let mut events = Vec::new();
    for (n, line) in stdin.lock().lines().enumerate() {
        let line = line.context("cannot read stdin")?;
        if line.trim().is_empty() {
            continue;
        }
        let parsed: EventLine = serde_json::from_str(&line).with_context(|| {
            format!("line {}: expected {{\"type\": \"...\", \"data\": {{...}}}}", n + 1)
        })?;
        let mut e = NewEvent::json(parsed.event_type, &parsed.data)?
            .with_metadata(parsed.metadata)
            .with_tags(parsed.tags);
        if let Some(id) = parsed.id {
            e = e.with_id(id);
        }
        if let Some(v) = parsed.schema_version {
            e = e.with_schema_version(v);
        }
        events.push(e);
    }
    if events.is_empty() {
        bail!("no events on stdin; give one per line, or pass TYPE and JSON as arguments");
    }
    Ok(events)
}

pub(crate) async fn append(ctx: &Context, a: AppendArgs) -> Result<()> {
    let events = match &a.event_type {
        Some(t) => {
            let Some(payload) = &a.payload else {
                bail!(
                    "the event {t} needs its JSON payload after the type, such as: cairn append {} {t} '{{\"amount\": 125}}' (pass '{{}}' for an event without data)",
                    a.stream
                );
            };
            let data: serde_json::Value =
                serde_json::from_str(payload).context("the JSON payload is not valid JSON")?;
            let mut e = NewEvent::json(t.clone(), &data)?;
            if let Some(id) = a.id {
                e = e.with_id(id);
            }
            vec![e]
        }
        None => events_from_stdin()?,
    };
    let events: Vec<NewEvent> = events
        .into_iter()
        .map(|mut e| {
            for tag in &a.tags {
                if !e.tags.contains(tag) {
                    e.tags.push(tag.clone());
                }
            }
            e
        })
        .collect();
    let count = events.len();
    let store = ctx.store(true).await?;
    let r = store.append(&a.stream, a.expected_version, events).await?;
    if ctx.json {
        println!(
            "{}",
            serde_json::json!({"stream": a.stream, "next_version": r.next_version, "position": r.position.0})
        );
    } else {
        println!(
            "appended {count} event{} to {}: version {} at position {}",
            if count == 1 { "" } else { "s" },
            a.stream,
            r.next_version,
            r.position
        );
    }
    Ok(())
}

/// Which part of a stream or of $all to show.
#[derive(Args)]
pub(crate) struct Window {
    /// Where to start, inclusive: a version for a stream, an event's position for $all
    /// (default: the start, or the newest with --backward).
    #[arg(long)]
    pub from: Option<u64>,
    /// Most events to show.
    #[arg(long, short = 'n', default_value_t = 100)]
    pub limit: usize,
    /// Newest first.
    #[arg(long)]
    pub backward: bool,
}

#[derive(Args)]
pub(crate) struct ReadArgs {
    pub stream: String,
    #[command(flatten)]
    pub window: Window,
}

pub(crate) async fn read(ctx: &Context, a: ReadArgs) -> Result<()> {
    let store = ctx.store(false).await?;
    let w = a.window;
    let mut options =
        if w.backward { ReadStreamOptions::backward() } else { ReadStreamOptions::forward() };
    if let Some(v) = w.from {
        options = options.from_version(v);
    }
    let events = store.read_stream(&a.stream, options.limit(w.limit)).await?;
    output::print_events(&events, ctx.json);
    Ok(())
}

#[derive(Args)]
pub(crate) struct ReadAllArgs {
    #[command(flatten)]
    pub window: Window,
    /// Include system events ($metadata, deletions).
    #[arg(long)]
    pub system: bool,
}

pub(crate) async fn read_all(ctx: &Context, a: ReadAllArgs) -> Result<()> {
    let store = ctx.store(false).await?;
    let w = a.window;
    let mut options =
        if w.backward { ReadAllOptions::backward() } else { ReadAllOptions::forward() };
    if let Some(p) = w.from {
        options = options.from(Position(p));
    }
    let mut events = store.read_all(options.limit(w.limit)).await?;
    if !a.system {
        events.retain(|e| !e.is_system());
    }
    output::print_events(&events, ctx.json);
    Ok(())
}

#[derive(Args)]
pub(crate) struct QueryArgs {
    /// Only events of this type (repeatable: any of them); any type if omitted.
    #[arg(long = "type", value_name = "TYPE")]
    pub types: Vec<String>,
    /// Only events carrying this tag (repeatable: all of them).
    #[arg(long = "tag", value_name = "TAG")]
    pub tags: Vec<String>,
    #[command(flatten)]
    pub window: Window,
}

/// `cairn query`: the events matching one query item (types OR'ed, tags AND'ed)
/// in global order; events of `$` streams never match.
pub(crate) async fn query(ctx: &Context, a: QueryArgs) -> Result<()> {
    let store = ctx.store(false).await?;
    let q = Query::from(QueryItem::types(a.types).with_tags(a.tags));
    let w = a.window;
    let mut options =
        if w.backward { ReadAllOptions::backward() } else { ReadAllOptions::forward() };
    if let Some(p) = w.from {
        options = options.from(Position(p));
    }
    let events = store.read_query(&q, options.limit(w.limit)).await?;
    output::print_events(&events, ctx.json);
    Ok(())
}

#[derive(Args)]
pub(crate) struct TailArgs {
    /// Stream to follow; $all when omitted.
    pub stream: Option<String>,
    /// Deliver history first, from this version (stream) or position ($all)
    /// on, inclusive as for `read --from`; default: only new events.
    #[arg(long)]
    pub from: Option<u64>,
    /// Stop after this many events.
    #[arg(long, short = 'n')]
    pub count: Option<usize>,
}

pub(crate) async fn tail(ctx: &Context, a: TailArgs) -> Result<()> {
    let store = ctx.store(true).await?;
    let target = match &a.stream {
        Some(s) => SubscriptionTarget::Stream(s.clone()),
        None => SubscriptionTarget::All,
    };
    let from = match a.from {
        Some(0) => StartFrom::Start,
        Some(n) => StartFrom::After(n - 1),
        None => StartFrom::End,
    };
    let mut sub = store.subscribe(target, from).await?;
    if !ctx.json {
        eprintln!("following {} (Ctrl-C to stop)", a.stream.as_deref().unwrap_or("$all"));
    }
    let mut seen = 0;
    loop {
        tokio::select! {
            next = sub.next() => match next {
                Some(e) => {
                    output::print_event_line(&e?, ctx.json);
                    seen += 1;
                    if a.count.is_some_and(|c| seen >= c) { return Ok(()); }
                }
                None => return Ok(()),
            },
            _ = tokio::signal::ctrl_c() => return Ok(()),
        }
    }
}

#[derive(Args)]
pub(crate) struct StreamsArgs {
    /// Only streams whose name starts with this ('$$' for metadata streams).
    #[arg(long, default_value = "")]
    pub prefix: String,
    #[arg(long, short = 'n', default_value_t = 1000)]
    pub limit: usize,
}

pub(crate) async fn streams(ctx: &Context, a: StreamsArgs) -> Result<()> {
    let store = ctx.store(false).await?;
    output::print_streams(&store.list_streams(&a.prefix, a.limit).await?, ctx.json);
    Ok(())
}

#[derive(Args)]
pub(crate) struct MetadataArgs {
    pub stream: String,
    /// Hide events older than this: seconds, or a duration such as 90s, 12h, 7d, 2w.
    #[arg(long, value_name = "AGE", value_parser = parse_age)]
    pub max_age: Option<u64>,
    /// Show only the newest N events.
    #[arg(long)]
    pub max_count: Option<u64>,
    /// Hide events with a version below this.
    #[arg(long)]
    pub truncate_before: Option<u64>,
    /// Remove all settings.
    #[arg(long, conflicts_with_all = ["max_age", "max_count", "truncate_before"])]
    pub clear: bool,
}

/// An age in whole seconds: a bare number, or a duration (`7d`, `1h 30m`).
fn parse_age(s: &str) -> Result<u64, String> {
    if let Ok(secs) = s.parse::<u64>() {
        return Ok(secs);
    }
    humantime::parse_duration(s)
        .map(|d| d.as_secs())
        .map_err(|e| format!("{e}: give seconds, or a duration such as 90s, 12h, 7d or 2w"))
}

pub(crate) async fn metadata(ctx: &Context, a: MetadataArgs) -> Result<()> {
    let store = ctx.store(false).await?;
    let changing =
        a.clear || a.max_age.is_some() || a.max_count.is_some() || a.truncate_before.is_some();
    if changing {
        let m = StreamMetadata {
            max_age_secs: a.max_age,
            max_count: a.max_count,
            truncate_before: a.truncate_before,
        };
        store.set_stream_metadata(&a.stream, m).await?;
    }
    let info = store.stream_info(&a.stream).await?;
    if ctx.json {
        println!("{}", serde_json::to_string(&info)?);
    } else {
        output::print_streams(&[info], false);
    }
    Ok(())
}

#[derive(Args)]
pub(crate) struct DeleteArgs {
    pub stream: String,
    /// Tombstone the stream: its name can never be written again.
    #[arg(long)]
    pub hard: bool,
    #[arg(long, short = 'e', default_value = "any", value_parser = parse_expected)]
    pub expected_version: ExpectedVersion,
}

pub(crate) async fn delete(ctx: &Context, a: DeleteArgs) -> Result<()> {
    let store = ctx.store(false).await?;
    store.delete_stream(&a.stream, a.expected_version, a.hard).await?;
    println!("{} {}", if a.hard { "tombstoned" } else { "deleted" }, a.stream);
    Ok(())
}

fn progress_bar(len: u64, what: &str) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new(len);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} segments ({eta})")
            .unwrap()
            .progress_chars("=> "),
    );
    bar.set_message(what.to_string());
    bar
}

pub(crate) fn verify(ctx: &Context) -> Result<()> {
    ctx.local_only("verify")?;
    let mut bar: Option<indicatif::ProgressBar> = None;
    let report = cairn_log::verify(&ctx.data, |done, total| {
        bar.get_or_insert_with(|| progress_bar(total as u64, "verifying"))
            .set_position(done as u64);
    })?;
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    if ctx.json {
        println!(
            "{}",
            serde_json::json!({"ok": true, "segments": report.segments, "events": report.events, "bytes": report.bytes, "streams": report.streams, "durable_events": report.durable_events, "index_files": report.index_files, "stream_tables": report.stream_tables,
            "torn_tail": report.torn_tail.as_ref().map(|(f, o, n)| serde_json::json!({"file": f, "offset": o, "bytes": n}))})
        );
    } else {
        let plural = output::count;
        println!(
            "ok: {} in {}, {}, {} checked",
            plural(report.events, "event"),
            plural(report.streams as u64, "stream"),
            plural(report.segments as u64, "segment"),
            plural(report.bytes, "byte")
        );
        if report.index_files > 0 {
            println!(
                "ok: {} match their segments",
                plural(report.index_files as u64, "index file")
            );
        }
        if report.stream_tables > 0 {
            println!("ok: the stream tables ({}) match the log", report.stream_tables);
        }
        if let Some(n) = report.durable_events {
            println!("ok: every event the durable mark records as acknowledged ({n}) is there");
        }
        if let Some((file, offset, bytes)) = report.torn_tail {
            println!(
                "note: {} has a torn tail of {bytes} bytes at offset {offset} (an unacknowledged append); the next open cuts it",
                file.display()
            );
        }
    }
    Ok(())
}

pub(crate) fn reindex(ctx: &Context) -> Result<()> {
    ctx.local_only("reindex")?;
    if !ctx.data.join("log").is_dir() {
        bail!("no Cairn data in {} — pass --data DIR", ctx.data.display());
    }
    let started = std::time::Instant::now();
    let spinner =
        indicatif::ProgressBar::new_spinner().with_message("rebuilding the index from the log");
    spinner.enable_steady_tick(std::time::Duration::from_millis(120));
    let report = cairn_log::EmbeddedStore::reindex(&ctx.data);
    spinner.finish_and_clear();
    let report = report?;
    let plural = output::count;
    println!(
        "rebuilt the index from the log: {} in {}, {:.2} s",
        plural(report.events, "event"),
        plural(report.segments as u64, "segment"),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}
