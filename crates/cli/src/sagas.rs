//! `cairn sagas`: the sagas in a store, read from their own streams
//! (`$saga-<saga>-<id>`, see cairn-saga): a table of them, one saga's steps
//! and timeline, and resuming one that is parked as needing attention. The
//! instances of process managers live in the same namespace
//! (`$saga-<process>-<correlation>`, a `ProcessReacted`/`ProcessEnded` event
//! per reaction, `ProcessParked`/`ProcessResumed` when a command kept
//! failing): `processes` tables them, `show` tells one's reactions, and
//! `resume` lets a parked one go on.
//! Everything here reads the store only (resume appends one event), so it
//! works the same on the embedded store, PostgreSQL and through a server.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::io::Write as _;
use std::time::Duration;

use anyhow::{Result, bail};
use cairn_core::{
    EventStore, ReadStreamOptions, RecordedEvent, SAGA_STREAM_PREFIX, StoreError, Timestamp,
};
use cairn_saga::{
    Parked, PendingDeadline, ProcessError, Reaction, SagaError, SagaEvent, SagaState, Status,
    process_checkpoint_stream, read_history, saga_stream,
};
use clap::{Args, Subcommand, ValueEnum};
use comfy_table::{Table, presets::UTF8_FULL_CONDENSED};
use futures_util::{StreamExt, TryStreamExt};
use serde_json::{Value, json};

use crate::commands::Context;
use crate::output::count;

/// A line of output, collected to be written at once by [`emit`].
macro_rules! say {
    ($out:expr) => {{ $out.push('\n'); }};
    ($out:expr, $($arg:tt)*) => {{ let _ = writeln!($out, $($arg)*); }};
}

/// Writes the output; a reader that went away (`| head`) is no error.
fn emit(out: String) {
    let _ = std::io::stdout().lock().write_all(out.as_bytes());
}

#[derive(Args)]
pub(crate) struct SagasArgs {
    #[command(subcommand)]
    action: SagasAction,
}

#[derive(Subcommand)]
enum SagasAction {
    /// A table of the sagas in the store, newest first: status, the step it is at, why it failed, how long it ran.
    List {
        /// Only sagas in this state.
        #[arg(long, value_enum)]
        status: Option<StatusFilter>,
        /// Only sagas of this type (the name of its definition, e.g. `order`).
        #[arg(long, value_name = "NAME")]
        saga: Option<String>,
        /// Most saga streams to look at (in name order).
        #[arg(long, short = 'n', default_value_t = 1000)]
        limit: usize,
    },
    /// A table of the process-manager instances in the store, latest change first: status, reactions, the last one, pending deadlines.
    Processes {
        /// Only instances of this process (its name, e.g. `fulfilment`).
        #[arg(long, value_name = "NAME")]
        process: Option<String>,
        /// Only instances that have ended.
        #[arg(long, conflicts_with = "running")]
        ended: bool,
        /// Only instances still running (parked ones included).
        #[arg(long, conflicts_with = "parked")]
        running: bool,
        /// Only instances parked after a command kept failing (they wait for `cairn sagas resume`).
        #[arg(long, conflicts_with = "ended")]
        parked: bool,
        /// Most `$saga-` streams to look at (in name order; sagas count too).
        #[arg(long, short = 'n', default_value_t = 1000)]
        limit: usize,
    },
    /// One saga: its state, its steps, and the timeline of its transitions; or one process-manager instance: its state, deadlines and reactions.
    Show {
        /// The saga's type, e.g. `order`, or the process's name.
        saga: String,
        /// The saga's id, e.g. `42` for the stream `$saga-order-42`, or the instance's correlation id.
        id: String,
    },
    /// Ask a saga parked as needing attention to try its compensations again (the runner that has its definition picks it up), or a parked process instance to send its failed command again and go on (its manager picks it up).
    Resume {
        /// The saga's type, or the process's name.
        saga: String,
        /// The saga's id, or the instance's correlation id.
        #[arg(required_unless_present = "all_parked")]
        id: Option<String>,
        /// Resume every parked saga of this type, or every parked instance of this process (after an outage, say).
        #[arg(long, conflicts_with = "id")]
        all_parked: bool,
        /// With --all-parked: most `$saga-<name>-` streams to look at (in name order).
        #[arg(long, short = 'n', default_value_t = 10_000, requires = "all_parked")]
        limit: usize,
        /// Who resumes it, recorded in its history [default: $USER].
        #[arg(long, value_name = "WHO")]
        by: Option<String>,
    },
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum StatusFilter {
    Running,
    Compensating,
    Completed,
    Compensated,
    /// Parked: a compensation kept failing.
    #[value(alias = "parked", alias = "needs_attention")]
    NeedsAttention,
}

impl StatusFilter {
    fn status(self) -> Status {
        match self {
            StatusFilter::Running => Status::Running,
            StatusFilter::Compensating => Status::Compensating,
            StatusFilter::Completed => Status::Completed,
            StatusFilter::Compensated => Status::Compensated,
            StatusFilter::NeedsAttention => Status::NeedsAttention,
        }
    }
}

pub(crate) async fn run(ctx: &Context, args: SagasArgs) -> Result<()> {
    let store = ctx.store(false).await?;
    let store = store.as_ref();
    let mut out = String::new();
    match args.action {
        SagasAction::List { status, saga, limit } => {
            list(ctx, &mut out, store, status.map(StatusFilter::status), saga, limit).await?
        }
        SagasAction::Processes { process, ended, running, parked, limit } => {
            let only = if ended {
                Some(InstanceFilter::Ended)
            } else if running {
                Some(InstanceFilter::Running)
            } else if parked {
                Some(InstanceFilter::Parked)
            } else {
                None
            };
            processes(ctx, &mut out, store, process, only, limit).await?
        }
        SagasAction::Show { saga, id } => show(ctx, &mut out, store, &saga, &id).await?,
        SagasAction::Resume { saga, id: Some(id), by, .. } => {
            resume(ctx, &mut out, store, &saga, &id, by).await?
        }
        SagasAction::Resume { saga, id: None, by, limit, .. } => {
            resume_all(ctx, &mut out, store, &saga, by, limit).await?
        }
    }
    emit(out);
    Ok(())
}

/// A saga's events and state; `None` if the stream does not exist or is not a saga.
async fn load(
    store: &dyn EventStore,
    stream: &str,
) -> Result<Option<(SagaState, Vec<RecordedEvent>)>, StoreError> {
    match read_history(store, stream).await {
        Ok(events) => Ok(SagaState::fold(stream, &events).map(|state| (state, events))),
        Err(StoreError::StreamNotFound { .. } | StoreError::StreamDeleted { .. }) => Ok(None),
        Err(e) => Err(e),
    }
}

/// What a `$saga-<name>-<id>` stream holds.
enum Found {
    Saga(Box<SagaState>, Vec<RecordedEvent>),
    Process(Box<ProcessHistory>),
}

/// A process-manager instance's reactions, oldest first, and its parks and
/// resumes (`ProcessParked`, `ProcessResumed`).
struct ProcessHistory {
    stream: String,
    process: String,
    correlation: String,
    reactions: Vec<(RecordedEvent, Reaction)>,
    interventions: Vec<RecordedEvent>,
    /// The park in effect: nothing recorded after it.
    parked: Option<Parked>,
}

const PARKED: &str = "ProcessParked";
const RESUMED: &str = "ProcessResumed";

/// The park in effect, from an instance's events newest first: a park with no
/// reaction nor resume after it.
fn park_in_effect<'a>(newest_first: impl IntoIterator<Item = &'a RecordedEvent>) -> Option<Parked> {
    newest_first
        .into_iter()
        .find(|e| {
            e.event_type == PARKED
                || e.event_type == RESUMED
                || Reaction::from_recorded(e).is_some()
        })
        .and_then(Parked::from_recorded)
}

/// Whether an event is one of a process instance's.
fn is_instance_event(e: &RecordedEvent) -> bool {
    Reaction::from_recorded(e).is_some() || e.event_type == PARKED || e.event_type == RESUMED
}

/// The saga or process instance, or an error that says what there is instead.
async fn find(store: &dyn EventStore, name: &str, id: &str) -> Result<Found> {
    let stream = saga_stream(name, id);
    let events = match read_history(store, &stream).await {
        Ok(events) => events,
        Err(StoreError::StreamNotFound { .. } | StoreError::StreamDeleted { .. }) => Vec::new(),
        Err(e) => return Err(e.into()),
    };
    if let Some(first) = events.first() {
        if is_instance_event(first) {
            let parked = park_in_effect(events.iter().rev());
            let (mut reactions, mut interventions) = (Vec::new(), Vec::new());
            for e in events {
                match Reaction::from_recorded(&e) {
                    Some(r) => reactions.push((e, r)),
                    None => interventions.push(e),
                }
            }
            return Ok(Found::Process(Box::new(ProcessHistory {
                stream,
                process: name.to_string(),
                correlation: id.to_string(),
                reactions,
                interventions,
                parked,
            })));
        }
        if let Some(state) = SagaState::fold(&stream, &events) {
            return Ok(Found::Saga(Box::new(state), events));
        }
        bail!(
            "{stream} holds neither a saga nor a process instance (its first event is a {}); `cairn read {stream}` shows what it holds",
            first.event_type
        );
    }
    match kind_of(store, name).await? {
        None => bail!(
            "no saga of type '{name}' and no process named '{name}' in this store (no {stream}); `cairn sagas list` shows the sagas there are, `cairn sagas processes` the process instances"
        ),
        Some(Kind::Process) => bail!(
            "no instance of process '{name}' with correlation id '{id}' in this store (no {stream}); `cairn sagas processes --process {name}` shows the instances there are"
        ),
        Some(Kind::Saga) => bail!(
            "no saga '{name}' with id '{id}' in this store (no {stream}); `cairn sagas list --saga {name}` shows the ids there are"
        ),
    }
}

#[derive(PartialEq)]
enum Kind {
    Saga,
    Process,
}

/// Whether `name` is a saga type or a process, by its streams; `None`: neither is in the store.
async fn kind_of(store: &dyn EventStore, name: &str) -> Result<Option<Kind>, StoreError> {
    let streams = store.list_streams(&format!("{SAGA_STREAM_PREFIX}{name}-"), 2).await?;
    let checkpoint = process_checkpoint_stream(name);
    if streams.iter().any(|s| s.stream == checkpoint) {
        return Ok(Some(Kind::Process));
    }
    let Some(first) = streams.first() else { return Ok(None) };
    let newest = newest(store, &first.stream, 1).await?;
    Ok(Some(if newest.first().is_some_and(is_instance_event) { Kind::Process } else { Kind::Saga }))
}

/// A stream's newest `n` events, newest first (none if it does not exist).
async fn newest(
    store: &dyn EventStore,
    stream: &str,
    n: usize,
) -> Result<Vec<RecordedEvent>, StoreError> {
    match store.read_stream(stream, ReadStreamOptions::backward().limit(n)).await {
        Ok(events) => Ok(events),
        Err(StoreError::StreamNotFound { .. } | StoreError::StreamDeleted { .. }) => Ok(Vec::new()),
        Err(e) => Err(e),
    }
}

/// The streams of one saga type or process (`$saga-<name>-`), or of all.
fn stream_prefix(name: Option<&str>) -> String {
    name.map_or_else(
        || SAGA_STREAM_PREFIX.to_string(),
        |name| format!("{SAGA_STREAM_PREFIX}{name}-"),
    )
}

async fn list(
    ctx: &Context,
    out: &mut String,
    store: &dyn EventStore,
    status: Option<Status>,
    saga: Option<String>,
    limit: usize,
) -> Result<()> {
    let prefix = stream_prefix(saga.as_deref());
    let streams = store.list_streams(&prefix, limit).await?;
    let looked_at = streams.len();
    // `$saga-<runner>` (no second '-') is a runner's checkpoint, not a saga.
    let names = streams
        .into_iter()
        .map(|s| s.stream)
        .filter(|s| s[SAGA_STREAM_PREFIX.len()..].contains('-'));
    let loaded: Vec<Option<(SagaState, Vec<RecordedEvent>)>> =
        futures_util::stream::iter(names.map(|stream| async move { load(store, &stream).await }))
            .buffered(8)
            .try_collect()
            .await?;
    let mut sagas: Vec<SagaState> = loaded
        .into_iter()
        .flatten()
        .map(|(state, _)| state)
        .filter(|s| {
            saga.as_ref().is_none_or(|name| &s.saga == name)
                && status.is_none_or(|st| s.status == st)
        })
        .collect();
    sagas.sort_by(|a, b| b.started_at.cmp(&a.started_at).then_with(|| a.stream.cmp(&b.stream)));

    if ctx.json {
        for s in &sagas {
            say!(out, "{}", state_json(s));
        }
        return Ok(());
    }
    let mut table = Table::new();
    table.load_preset(UTF8_FULL_CONDENSED).set_header([
        "id",
        "saga",
        "status",
        "step",
        "done",
        "reason",
        "started (UTC)",
        "elapsed",
    ]);
    for s in &sagas {
        table.add_row([
            s.id.clone(),
            s.saga.clone(),
            s.status.as_str().to_string(),
            current_step(s),
            progress(s),
            shorten(&problem(s), 80),
            s.started_at.map(time).unwrap_or_default(),
            duration(elapsed(s)),
        ]);
    }
    if !sagas.is_empty() {
        say!(out, "{table}");
    }
    let mut by_status: Vec<(Status, usize)> = Vec::new();
    for s in &sagas {
        match by_status.iter_mut().find(|(st, _)| *st == s.status) {
            Some((_, n)) => *n += 1,
            None => by_status.push((s.status, 1)),
        }
    }
    by_status.sort_by_key(|(st, _)| order(*st));
    let of_type = saga.as_ref().map_or(String::new(), |name| format!(" of type '{name}'"));
    let tally: Vec<String> =
        by_status.iter().map(|(st, n)| format!("{n} {}", st.as_str())).collect();
    match (sagas.len(), status) {
        (0, None) => say!(out, "no sagas{of_type} in this store"),
        (0, Some(st)) => say!(out, "no sagas{of_type} {} in this store", st.as_str()),
        (n, None) => say!(out, "{}{of_type}: {}", count(n as u64, "saga"), tally.join(", ")),
        (n, Some(st)) => say!(out, "{}{of_type} {}", count(n as u64, "saga"), st.as_str()),
    }
    if looked_at >= limit {
        say!(
            out,
            "note: looked at the first {} (by name); pass --limit to look at more",
            count(looked_at as u64, "saga stream")
        );
    }
    if let Some(parked) = sagas.iter().find(|s| s.status == Status::NeedsAttention) {
        say!(
            out,
            "`cairn sagas show {} {}` tells why a saga needs attention; `cairn sagas resume {} {}` retries its compensations once the cause is fixed",
            parked.saga,
            parked.id,
            parked.saga,
            parked.id
        );
    }
    Ok(())
}

async fn show(
    ctx: &Context,
    out: &mut String,
    store: &dyn EventStore,
    saga: &str,
    id: &str,
) -> Result<()> {
    let (state, events) = match find(store, saga, id).await? {
        Found::Saga(state, events) => (*state, events),
        Found::Process(history) => return show_process(ctx, out, store, *history).await,
    };
    let start = state.started_at.unwrap_or(Timestamp(0));
    if ctx.json {
        let mut whole = state_json(&state);
        whole["pipeline"] = json!(
            pipeline(&state, &events)
                .into_iter()
                .map(|(step, mark)| json!({"step": step, "mark": mark}))
                .collect::<Vec<_>>()
        );
        whole["timeline"] = events
            .iter()
            .map(|e| {
                let parsed = SagaEvent::from_recorded(e);
                json!({
                    "version": e.version, "position": e.position.0, "time": e.timestamp.to_rfc3339(),
                    "offset_ms": (e.timestamp.0 - start.0) as f64 / 1000.0, "type": e.event_type,
                    "data": e.json::<Value>().unwrap_or(Value::Null),
                    "mark": parsed.as_ref().map_or("?", timeline_mark),
                    "line": parsed.as_ref().map_or_else(|| format!("(unknown event {})", e.event_type), timeline_line),
                })
            })
            .collect();
        say!(out, "{whole}");
        return Ok(());
    }

    say!(out, "saga {} {} — {}", state.saga, state.id, state.status.as_str());
    let field = |out: &mut String, name: &str, value: String| say!(out, "  {name:<9}{value}");
    field(out, "stream", format!("{} (version {})", state.stream, state.version));
    if let Some(at) = state.started_at {
        let took = if state.status.is_final() {
            format!("took {}", duration(state.elapsed()))
        } else {
            format!("last change {} later", duration(state.elapsed()))
        };
        field(out, "started", format!("{} UTC, {took}", time(at)));
    }
    field(out, "input", shorten(&state.input.to_string(), 100));
    let steps = pipeline(&state, &events);
    let line =
        steps.iter().map(|(step, mark)| format!("{step} {mark}")).collect::<Vec<_>>().join(" → ");
    field(out, "steps", line);
    let used: String = steps.iter().map(|(_, m)| m.as_str()).collect();
    // A mark's meaning when it is used ("↩✗" and "↩…" before their parts are looked for).
    let mut rest = used;
    let mut legend = Vec::new();
    for (mark, text) in [
        ("↩✗", "↩✗ undo failing"),
        ("↩…", "↩… undo next"),
        ("✓", "✓ done"),
        ("✗", "✗ failed"),
        ("↩", "↩ undone"),
        ("kept", "kept: cannot be undone"),
        ("…", "… now"),
        ("·", "· not run"),
    ] {
        if rest.contains(mark) {
            legend.push(text);
            rest = rest.replace(mark, " ");
        }
    }
    field(out, "", format!("({})", legend.join(", ")));
    if let Some(reason) = &state.reason {
        field(out, "reason", reason.clone());
    }
    match state.status {
        Status::Running => {
            if let Some(step) = state.next_step() {
                field(out, "now", format!("running {step}"));
            }
        }
        Status::Compensating => {
            if let Some(step) = state.next_undo() {
                let retry = match (&state.last_error, state.attempts) {
                    (Some(error), n) if n > 0 => {
                        format!(" ({} failed, last: {error})", count(n as u64, "attempt"))
                    }
                    _ => String::new(),
                };
                field(out, "now", format!("undoing {step}{retry}"));
            }
        }
        Status::NeedsAttention => {
            let step = pending_undo(&state).unwrap_or("?");
            field(
                out,
                "problem",
                format!("undoing {step} failed: {}", state.last_error.as_deref().unwrap_or("?")),
            );
        }
        Status::Completed | Status::Compensated => {}
    }

    say!(out);
    say!(out, "timeline");
    for e in &events {
        let (mark, line) = match SagaEvent::from_recorded(e) {
            Some(event) => (timeline_mark(&event), timeline_line(&event)),
            None => {
                ("?", format!("(an event this version of cairn does not know: {})", e.event_type))
            }
        };
        say!(
            out,
            "  {:>10}  {mark} {line}",
            format!(
                "+{}",
                duration(Duration::from_micros((e.timestamp.0 - start.0).max(0) as u64))
            )
        );
    }
    if state.status == Status::NeedsAttention {
        say!(out);
        say!(
            out,
            "once the cause is fixed, `cairn sagas resume {} {}` retries the compensations",
            state.saga,
            state.id
        );
    }
    Ok(())
}

/// Who resumes: `--by`, else $USER.
fn resumer(by: Option<String>) -> String {
    by.or_else(|| std::env::var("USER").ok().filter(|u| !u.is_empty()))
        .unwrap_or_else(|| "cairn sagas resume".into())
}

/// `resume NAME --all-parked`: every parked saga of type NAME, or parked
/// instance of process NAME, in name order; one that changed meanwhile is
/// counted and left alone.
async fn resume_all(
    ctx: &Context,
    out: &mut String,
    store: &dyn EventStore,
    name: &str,
    by: Option<String>,
    limit: usize,
) -> Result<()> {
    let by = resumer(by);
    let streams = store.list_streams(&stream_prefix(Some(name)), limit).await?;
    let looked_at = streams.len();
    let (mut resumed, mut changed, mut kind) = (Vec::new(), 0, None);
    for stream in streams.into_iter().map(|s| s.stream) {
        let Some(id) =
            stream.strip_prefix(&stream_prefix(Some(name))).filter(|id| !id.starts_with('$'))
        else {
            continue;
        };
        let outcome = match find(store, name, id).await {
            Ok(Found::Saga(state, _)) if state.status == Status::NeedsAttention => {
                kind = Some("saga");
                cairn_saga::resume(store, name, id, &by).await.map(drop).map_err(|e| {
                    matches!(e, SagaError::Store(StoreError::WrongExpectedVersion { .. }))
                })
            }
            Ok(Found::Process(history)) if history.parked.is_some() => {
                kind = Some("process");
                cairn_saga::resume_process(store, name, id, &by).await.map(drop).map_err(|e| {
                    matches!(e, ProcessError::Store(StoreError::WrongExpectedVersion { .. }))
                })
            }
            _ => continue,
        };
        match outcome {
            Ok(()) => resumed.push(id.to_string()),
            Err(true) => changed += 1,
            Err(false) => bail!(
                "resuming {stream} failed; {} resumed before it; run the command again to go on",
                resumed.len()
            ),
        }
    }
    if ctx.json {
        say!(
            out,
            "{}",
            json!({ "name": name, "kind": kind, "resumed": resumed, "changed_meanwhile": changed, "resumed_by": by })
        );
        return Ok(());
    }
    let (one, many) = match kind {
        Some("process") => (
            format!("parked instance of process '{name}'"),
            format!("parked instances of process '{name}'"),
        ),
        Some(_) => {
            (format!("parked saga of type '{name}'"), format!("parked sagas of type '{name}'"))
        }
        None => (String::new(), format!("parked saga or process instance named '{name}'")),
    };
    if resumed.is_empty() && changed == 0 {
        say!(out, "no {many} in this store: nothing to resume");
    } else {
        say!(
            out,
            "resumed {} {} (by {by}): {}",
            resumed.len(),
            if resumed.len() == 1 { &one } else { &many },
            resumed.join(", ")
        );
    }
    if changed > 0 {
        say!(
            out,
            "{} changed while being resumed and were left alone; `cairn sagas list` / `cairn sagas processes` show where they are",
            changed
        );
    }
    if looked_at >= limit {
        say!(
            out,
            "note: looked at the first {}; pass --limit to look at more",
            count(looked_at as u64, "$saga- stream")
        );
    }
    Ok(())
}

async fn resume(
    ctx: &Context,
    out: &mut String,
    store: &dyn EventStore,
    saga: &str,
    id: &str,
    by: Option<String>,
) -> Result<()> {
    let by = resumer(by);
    let state = match find(store, saga, id).await? {
        Found::Saga(state, _) => *state,
        Found::Process(history) => return resume_process(ctx, out, store, *history, &by).await,
    };
    if state.status != Status::NeedsAttention {
        let why = match state.status {
            Status::Completed | Status::Compensated => "it is over",
            _ => "its runner is still driving it",
        };
        bail!(
            "saga {saga} {id} is {}, not waiting for attention: nothing to resume ({why}; only a saga parked after its compensations kept failing can be resumed, see `cairn sagas list --status needs-attention`)",
            state.status.as_str()
        );
    }
    let resumed = match cairn_saga::resume(store, saga, id, &by).await {
        Ok(state) => state,
        Err(SagaError::Store(StoreError::WrongExpectedVersion { .. })) => {
            bail!(
                "saga {saga} {id} changed while it was being resumed (someone else resumed it?); nothing was written; look again with `cairn sagas show {saga} {id}`"
            )
        }
        Err(e) => return Err(e.into()),
    };
    if ctx.json {
        say!(out, "{}", state_json(&resumed));
        return Ok(());
    }
    let next = resumed.next_undo().unwrap_or("?");
    let rest = resumed.undo.iter().skip(resumed.undone.len() + 1).cloned().collect::<Vec<_>>();
    let then = if rest.is_empty() { String::new() } else { format!(", then {}", rest.join(", ")) };
    say!(out, "resumed saga {saga} {id} (by {by}): its runner retries undoing {next}{then}");
    say!(
        out,
        "a runner with the '{saga}' saga picks it up now, or when it next starts; `cairn sagas show {saga} {id}` follows it"
    );
    Ok(())
}

async fn resume_process(
    ctx: &Context,
    out: &mut String,
    store: &dyn EventStore,
    history: ProcessHistory,
    by: &str,
) -> Result<()> {
    let ProcessHistory { process, correlation, reactions, .. } = history;
    if history.parked.is_none() {
        let status =
            if reactions.last().is_some_and(|(_, r)| r.ended) { "ended" } else { "running" };
        bail!(
            "process {process} {correlation} is {status}, not parked: nothing to resume (only an instance parked after a command kept failing can be resumed, see `cairn sagas processes --parked`)"
        );
    }
    let parked = match cairn_saga::resume_process(store, &process, &correlation, by).await {
        Ok(parked) => parked,
        Err(ProcessError::Store(StoreError::WrongExpectedVersion { .. })) => bail!(
            "process {process} {correlation} changed while it was being resumed (someone else resumed it?); nothing was written; look again with `cairn sagas show {process} {correlation}`"
        ),
        Err(e) => return Err(e.into()),
    };
    if ctx.json {
        say!(
            out,
            "{}",
            json!({ "kind": "process", "process": process, "correlation": correlation, "resumed_by": by, "parked": parked })
        );
        return Ok(());
    }
    say!(
        out,
        "resumed process {process} {correlation} (by {by}): its manager sends {} again ({}), then handles the events it held back",
        parked.command,
        parked.handled
    );
    say!(
        out,
        "the running '{process}' manager picks it up within a second, or when it next starts; `cairn sagas show {process} {correlation}` follows it"
    );
    Ok(())
}

/// Where a status sorts in the summary: those to act on first.
fn order(status: Status) -> u8 {
    match status {
        Status::NeedsAttention => 0,
        Status::Compensating => 1,
        Status::Running => 2,
        Status::Compensated => 3,
        Status::Completed => 4,
    }
}

/// The step a saga is at (running, undoing), or the last one it did.
fn current_step(s: &SagaState) -> String {
    match s.status {
        Status::Running => s.next_step().unwrap_or("-").to_string(),
        Status::Compensating | Status::NeedsAttention => {
            pending_undo(s).map_or("-".into(), |step| format!("undo {step}"))
        }
        Status::Completed => s.completed.last().map_or("-".into(), |(step, _)| step.clone()),
        Status::Compensated => match (s.undone.last(), s.completed.last()) {
            (Some(step), _) => format!("undo {step}"),
            (None, Some((step, _))) => step.clone(),
            (None, None) => "-".into(),
        },
    }
}

/// The compensation that runs next, or that a parked saga is stuck on.
fn pending_undo(s: &SagaState) -> Option<&str> {
    matches!(s.status, Status::Compensating | Status::NeedsAttention)
        .then(|| s.undo.get(s.undone.len()).map(String::as_str))
        .flatten()
}

/// "2/3", and "2/3, 1/2 undone" once compensating.
fn progress(s: &SagaState) -> String {
    let done = format!("{}/{}", s.completed.len(), s.steps.len());
    if s.status == Status::Running || s.status == Status::Completed || s.undo.is_empty() {
        done
    } else {
        format!("{done}, {}/{} undone", s.undone.len(), s.undo.len())
    }
}

/// Why it failed, and what keeps its compensation from finishing.
fn problem(s: &SagaState) -> String {
    let mut text = s.reason.clone().unwrap_or_default();
    let undo_trouble = match s.status {
        Status::NeedsAttention => s.last_error.as_ref().map(|e| format!("undo: {e}")),
        Status::Compensating if s.attempts > 0 => s
            .last_error
            .as_ref()
            .map(|e| format!("undo: {e} ({})", count(s.attempts as u64, "attempt"))),
        _ => None,
    };
    if let Some(trouble) = undo_trouble {
        if !text.is_empty() {
            text.push_str("; ");
        }
        text.push_str(&trouble);
    }
    text
}

/// How long it ran: to its last transition once over or parked, to now while it runs.
fn elapsed(s: &SagaState) -> Duration {
    match (s.status, s.started_at) {
        (Status::Running | Status::Compensating, Some(start)) => {
            Duration::from_micros((Timestamp::now().0 - start.0).max(0) as u64)
        }
        _ => s.elapsed(),
    }
}

fn time(t: Timestamp) -> String {
    t.to_rfc3339()[..19].replace('T', " ")
}

/// "12 ms", "1.204 s", "3m 4s".
fn duration(d: Duration) -> String {
    if d < Duration::from_secs(1) {
        format!("{} ms", d.as_millis())
    } else if d < Duration::from_secs(60) {
        format!("{:.3} s", d.as_secs_f64())
    } else {
        humantime::format_duration(Duration::from_secs(d.as_secs())).to_string()
    }
}

fn shorten(text: &str, max: usize) -> String {
    if text.chars().count() > max {
        format!("{}…", text.chars().take(max - 1).collect::<String>())
    } else {
        text.to_string()
    }
}

/// Each step with what happened to it: `✓` done, `✗` failed or timed out,
/// `↩` undone (`↩✗` its undo failing, `↩…` its undo next), `kept` done but
/// declared impossible to undo, `…` running now, `·` not run.
fn pipeline(state: &SagaState, events: &[RecordedEvent]) -> Vec<(String, String)> {
    #[derive(Default)]
    struct Marks {
        done: bool,
        failed: bool,
        undone: bool,
        undo_failed: bool,
        kept: bool,
    }
    let mut marks: HashMap<&str, Marks> = HashMap::new();
    let parsed: Vec<SagaEvent> = events.iter().filter_map(SagaEvent::from_recorded).collect();
    for event in &parsed {
        match event {
            SagaEvent::StepCompleted { step, .. } => marks.entry(step).or_default().done = true,
            SagaEvent::StepFailed { step, .. } | SagaEvent::StepTimedOut { step, .. } => {
                marks.entry(step).or_default().failed = true
            }
            SagaEvent::Compensating { not_undoable, .. } => {
                for step in not_undoable {
                    marks.entry(step).or_default().kept = true;
                }
            }
            SagaEvent::StepCompensated { step } => {
                let m = marks.entry(step).or_default();
                m.undone = true;
                m.undo_failed = false;
            }
            SagaEvent::CompensationFailed { step, .. } => {
                marks.entry(step).or_default().undo_failed = true
            }
            _ => {}
        }
    }
    let next_step = state.next_step();
    let next_undo = pending_undo(state);
    state
        .steps
        .iter()
        .map(|step| {
            let m = marks.remove(step.as_str()).unwrap_or_default();
            let mut mark = if m.done {
                "✓".to_string()
            } else if m.failed {
                "✗".to_string()
            } else if next_step == Some(step.as_str()) {
                "…".to_string()
            } else {
                "·".to_string()
            };
            if m.undone {
                mark.push('↩');
            } else if next_undo == Some(step.as_str()) {
                mark.push_str(if m.undo_failed && state.status == Status::NeedsAttention {
                    "↩✗"
                } else {
                    "↩…"
                });
            } else if m.kept && m.done {
                mark.push_str(" kept");
            }
            (step.clone(), mark)
        })
        .collect()
}

fn timeline_mark(event: &SagaEvent) -> &'static str {
    match event {
        SagaEvent::SagaStarted { .. } => "▶",
        SagaEvent::StepCompleted { .. } | SagaEvent::SagaCompleted {} => "✓",
        SagaEvent::StepFailed { .. }
        | SagaEvent::StepTimedOut { .. }
        | SagaEvent::CompensationFailed { .. } => "✗",
        SagaEvent::StepAttemptFailed { .. } => "↻",
        SagaEvent::Compensating { .. }
        | SagaEvent::StepCompensated { .. }
        | SagaEvent::SagaCompensated {} => "↩",
        SagaEvent::SagaParked { .. } => "!",
        SagaEvent::SagaResumed { .. } => "▶",
    }
}

/// The event's own line, with a completed step's output when it has one.
fn timeline_line(event: &SagaEvent) -> String {
    let line = event.describe();
    match event {
        SagaEvent::StepCompleted { output, .. } if !output.is_null() => {
            format!("{line}: {}", shorten(&output.to_string(), 80))
        }
        _ => line,
    }
}

fn state_json(s: &SagaState) -> Value {
    json!({
        "stream": s.stream, "saga": s.saga, "id": s.id, "status": s.status, "step": current_step(s),
        "steps": s.steps, "completed": s.completed.iter().map(|(step, _)| step).collect::<Vec<_>>(),
        "outputs": s.completed.iter().cloned().collect::<serde_json::Map<String, Value>>(),
        "undo": s.undo, "undone": s.undone, "reason": s.reason, "last_error": s.last_error, "attempts": s.attempts,
        "input": s.input, "version": s.version,
        "started_at": s.started_at.map(Timestamp::to_rfc3339), "updated_at": s.updated_at.map(Timestamp::to_rfc3339),
        "elapsed_ms": elapsed(s).as_secs_f64() * 1000.0,
    })
}

// Process managers: their instances share the `$saga-` namespace with sagas.

/// `$saga-<process>-<correlation>` split in two, for a stream that may hold a
/// process instance: not a runner's checkpoint (`$saga-<runner>`, no second
/// `-`) nor a process's (`$saga-<process>-$checkpoint`). A process name has
/// no `-`, so the first one ends it.
fn instance_name(stream: &str) -> Option<(&str, &str)> {
    let (process, correlation) = stream.strip_prefix(SAGA_STREAM_PREFIX)?.split_once('-')?;
    (!process.is_empty() && !correlation.is_empty() && !correlation.starts_with('$'))
        .then_some((process, correlation))
}

/// One row of `cairn sagas processes`: an instance's newest reaction, and the
/// one before it (to tell which deadlines the newest set or cancelled).
struct InstanceRow {
    stream: String,
    process: String,
    correlation: String,
    /// Its newest event (a reaction, a park or a resume).
    last: RecordedEvent,
    /// Its newest reaction (an empty one if it parked at its first event).
    reaction: Reaction,
    before: Option<Reaction>,
    parked: Option<Parked>,
}

#[derive(Clone, Copy, PartialEq)]
enum InstanceFilter {
    Running,
    Parked,
    Ended,
}

const NEEDS_ATTENTION: &str = "needs attention";

fn instance_status(reaction: Option<&Reaction>, parked: Option<&Parked>) -> &'static str {
    if parked.is_some() {
        NEEDS_ATTENTION
    } else if reaction.is_some_and(|r| r.ended) {
        "ended"
    } else {
        "running"
    }
}

/// "parked: Record failed 3 times: the ledger refuses 2".
fn park_line(parked: &Parked) -> String {
    format!(
        "parked at {}: {} failed {}: {}",
        parked.handled,
        parked.command,
        count(parked.attempts as u64, "time"),
        parked.error
    )
}

/// What stands for the reaction of an instance parked at its first event
/// (it has none yet: its state is the default).
fn no_reaction_yet() -> Reaction {
    Reaction {
        state: Value::Null,
        position: cairn_core::Position::START,
        handled: "nothing yet".into(),
        commands: Vec::new(),
        command_names: Vec::new(),
        deadlines: Vec::new(),
        ended: false,
    }
}

/// How many of an instance's newest events `processes` reads to find its
/// newest reactions past parks and resumes.
const NEWEST_READ: usize = 16;

async fn processes(
    ctx: &Context,
    out: &mut String,
    store: &dyn EventStore,
    process: Option<String>,
    only: Option<InstanceFilter>,
    limit: usize,
) -> Result<()> {
    let prefix = stream_prefix(process.as_deref());
    let streams = store.list_streams(&prefix, limit).await?;
    let looked_at = streams.len();
    let names: Vec<String> =
        streams.into_iter().map(|s| s.stream).filter(|s| instance_name(s).is_some()).collect();
    let candidates = names.len();
    let loaded: Vec<Option<InstanceRow>> =
        futures_util::stream::iter(names.into_iter().map(|stream| async move {
            let events = newest(store, &stream, NEWEST_READ).await?;
            let Some(last) = events.first().filter(|e| is_instance_event(e)).cloned() else {
                return Ok(None);
            };
            let parked = park_in_effect(&events);
            let mut reactions = events.iter().filter_map(Reaction::from_recorded);
            let reaction = reactions.next().unwrap_or_else(no_reaction_yet);
            let before = reactions.next();
            let (process, correlation) = instance_name(&stream).expect("filtered above");
            let (process, correlation) = (process.to_string(), correlation.to_string());
            Ok::<_, StoreError>(Some(InstanceRow {
                stream,
                process,
                correlation,
                last,
                reaction,
                before,
                parked,
            }))
        }))
        .buffered(8)
        .try_collect()
        .await?;
    let keep = |r: &InstanceRow| match only {
        None => true,
        Some(InstanceFilter::Ended) => r.reaction.ended,
        Some(InstanceFilter::Running) => !r.reaction.ended,
        Some(InstanceFilter::Parked) => r.parked.is_some(),
    };
    let mut rows: Vec<InstanceRow> = loaded.into_iter().flatten().filter(keep).collect();
    rows.sort_by(|a, b| {
        b.last.timestamp.cmp(&a.last.timestamp).then_with(|| a.stream.cmp(&b.stream))
    });

    if ctx.json {
        for r in &rows {
            let line = r.parked.as_ref().map_or_else(
                || ReactionEffects::of(r.before.as_ref(), &r.reaction).line(&r.reaction),
                park_line,
            );
            say!(
                out,
                "{}",
                json!({
                    "kind": "process", "stream": r.stream, "process": r.process, "correlation": r.correlation, "status": instance_status(Some(&r.reaction), r.parked.as_ref()),
                    "parked": r.parked,
                    "reactions": r.last.version, "last_reaction": line, "handled": r.reaction.handled,
                    "deadlines": r.reaction.deadlines.iter().map(|d| &d.name).collect::<Vec<_>>(),
                    "position": r.reaction.position.0, "state": r.reaction.state, "updated_at": r.last.timestamp.to_rfc3339(),
                })
            );
        }
        return Ok(());
    }
    let mut table = Table::new();
    table.load_preset(UTF8_FULL_CONDENSED).set_header([
        "process",
        "correlation",
        "status",
        "reactions",
        "last reaction",
        "deadlines",
        "changed (UTC)",
    ]);
    for r in &rows {
        let line = r.parked.as_ref().map_or_else(
            || ReactionEffects::of(r.before.as_ref(), &r.reaction).line(&r.reaction),
            park_line,
        );
        table.add_row([
            r.process.clone(),
            r.correlation.clone(),
            instance_status(Some(&r.reaction), r.parked.as_ref()).to_string(),
            r.last.version.to_string(),
            shorten(&line, 60),
            deadline_names(&r.reaction.deadlines),
            time(r.last.timestamp),
        ]);
    }
    if !rows.is_empty() {
        say!(out, "{table}");
    }
    let of = process.as_ref().map_or(String::new(), |name| format!(" of process '{name}'"));
    let parked = rows.iter().filter(|r| r.parked.is_some()).count();
    let running = rows.iter().filter(|r| !r.reaction.ended).count() - parked;
    let tally: Vec<String> =
        [(running, "running"), (parked, NEEDS_ATTENTION), (rows.len() - running - parked, "ended")]
            .iter()
            .filter(|(n, _)| *n > 0)
            .map(|(n, st)| format!("{n} {st}"))
            .collect();
    let filter = only.map(|f| match f {
        InstanceFilter::Ended => "ended",
        InstanceFilter::Running => "running",
        InstanceFilter::Parked => "parked",
    });
    match (rows.len(), filter) {
        (0, None) => say!(out, "no process instances{of} in this store"),
        (0, Some(st)) => say!(out, "no process instances{of} {st} in this store"),
        (n, None) => say!(out, "{}{of}: {}", count(n as u64, "process instance"), tally.join(", ")),
        (n, Some(st)) => say!(out, "{}{of} {st}", count(n as u64, "process instance")),
    }
    if looked_at >= limit {
        say!(
            out,
            "note: looked at the first {} (by name, sagas included); pass --limit to look at more",
            count(looked_at as u64, "$saga- stream")
        );
    }
    if let Some(name) = &process
        && rows.is_empty()
        && candidates > 0
        && only.is_none()
        && kind_of(store, name).await? == Some(Kind::Saga)
    {
        say!(
            out,
            "'{name}' is a saga type, not a process: `cairn sagas list --saga {name}` shows its sagas"
        );
    }
    if let Some(r) = rows.iter().find(|r| r.parked.is_some()) {
        say!(
            out,
            "once the cause is fixed, `cairn sagas resume {} {}` has its manager send the command again and go on",
            r.process,
            r.correlation
        );
    }
    if let Some(r) = rows.iter().find(|r| !r.reaction.ended).or(rows.first()) {
        say!(
            out,
            "`cairn sagas show {} {}` shows an instance's state, deadlines and reactions",
            r.process,
            r.correlation
        );
    }
    Ok(())
}

fn deadline_names(deadlines: &[PendingDeadline]) -> String {
    deadlines.iter().map(|d| d.name.as_str()).collect::<Vec<_>>().join(", ")
}

/// What one reaction did, from its record and the one before: the commands
/// it sent, the deadlines it set and cancelled, the deadline that fired.
struct ReactionEffects {
    /// (name, key); the name is the key in records that did not keep names.
    commands: Vec<(String, String)>,
    set: Vec<String>,
    cancelled: Vec<String>,
    fired: Option<String>,
    ended: bool,
}

impl ReactionEffects {
    fn of(before: Option<&Reaction>, reaction: &Reaction) -> ReactionEffects {
        let earlier: &[PendingDeadline] = before.map_or(&[], |b| &b.deadlines);
        let set = reaction
            .deadlines
            .iter()
            .filter(|d| !earlier.iter().any(|e| e.timer == d.timer))
            .map(|d| d.name.clone())
            .collect();
        let mut gone: Vec<&PendingDeadline> = earlier
            .iter()
            .filter(|e| !reaction.deadlines.iter().any(|d| d.timer == e.timer))
            .collect();
        // The deadline handled left the pending ones by firing, not by a cancel.
        let fired = reaction.handled.strip_prefix("deadline ").map(str::to_string);
        if let Some(i) = fired.as_ref().and_then(|name| gone.iter().position(|d| &d.name == name)) {
            gone.remove(i);
        }
        let commands = reaction
            .commands
            .iter()
            .enumerate()
            .map(|(i, key)| {
                (
                    reaction
                        .command_names
                        .get(i)
                        .cloned()
                        .unwrap_or_else(|| format!("command {key}")),
                    key.clone(),
                )
            })
            .collect();
        ReactionEffects {
            commands,
            set,
            cancelled: gone.into_iter().map(|d| d.name.clone()).collect(),
            fired,
            ended: reaction.ended,
        }
    }

    /// `▶` the first reaction, `•` an event, `⧖` a deadline, `■` the end.
    fn mark(&self, first: bool) -> &'static str {
        if self.ended {
            "■"
        } else if self.fired.is_some() {
            "⧖"
        } else if first {
            "▶"
        } else {
            "•"
        }
    }

    /// "OrderPlaced in order-1 at 312: set deadline payment".
    fn line(&self, reaction: &Reaction) -> String {
        let mut parts = Vec::new();
        if !self.commands.is_empty() {
            parts.push(format!(
                "sent {}",
                self.commands.iter().map(|(name, _)| name.as_str()).collect::<Vec<_>>().join(", ")
            ));
        }
        if !self.set.is_empty() {
            parts.push(format!(
                "set {} {}",
                if self.set.len() == 1 { "deadline" } else { "deadlines" },
                self.set.join(", ")
            ));
        }
        if !self.cancelled.is_empty() {
            parts.push(format!(
                "cancelled {} {}",
                if self.cancelled.len() == 1 { "deadline" } else { "deadlines" },
                self.cancelled.join(", ")
            ));
        }
        if self.ended {
            parts.push("ended".to_string());
        }
        if parts.is_empty() {
            format!("{} (state only)", reaction.handled)
        } else {
            format!("{}: {}", reaction.handled, parts.join("; "))
        }
    }
}

async fn show_process(
    ctx: &Context,
    out: &mut String,
    store: &dyn EventStore,
    history: ProcessHistory,
) -> Result<()> {
    let ProcessHistory { stream, process, correlation, reactions, interventions, parked } = history;
    let none_yet = no_reaction_yet();
    let now = reactions.last().map_or(&none_yet, |(_, r)| r);
    let (Some(first), Some(last)) = (
        reactions.iter().map(|(e, _)| e).chain(&interventions).min_by_key(|e| e.version),
        reactions.iter().map(|(e, _)| e).chain(&interventions).max_by_key(|e| e.version),
    ) else {
        bail!(
            "{stream} holds no reactions this version of cairn can read; `cairn read {stream}` shows what it holds"
        );
    };
    let start = first.timestamp;
    let took = Duration::from_micros((last.timestamp.0 - start.0).max(0) as u64);
    let checkpoint_stream = process_checkpoint_stream(&process);
    let checkpoint = newest(store, &checkpoint_stream, 1)
        .await?
        .into_iter()
        .next()
        .and_then(|e| e.json::<u64>().ok().map(|p| (p, e.timestamp)));
    let effects: Vec<ReactionEffects> = reactions
        .iter()
        .enumerate()
        .map(|(i, (_, r))| ReactionEffects::of(i.checked_sub(1).map(|j| &reactions[j].1), r))
        .collect();
    let status = instance_status(Some(now), parked.as_ref());
    // Parks and resumes, as timeline lines.
    let intervention_line = |e: &RecordedEvent| match Parked::from_recorded(e) {
        Some(p) => format!("✋ {}", park_line(&p)),
        None => format!(
            "↻ resumed by {}",
            e.json::<Value>()
                .ok()
                .and_then(|v| v["by"].as_str().map(str::to_string))
                .unwrap_or_else(|| "?".into())
        ),
    };

    if ctx.json {
        let timeline: Vec<Value> = reactions
            .iter()
            .zip(&effects)
            .enumerate()
            .map(|(i, ((e, r), fx))| {
                json!({
                    "version": e.version, "position": e.position.0, "time": e.timestamp.to_rfc3339(),
                    "offset_ms": (e.timestamp.0 - start.0) as f64 / 1000.0, "type": e.event_type,
                    "handled": r.handled, "commands": fx.commands.iter().map(|(name, key)| json!({"name": name, "key": key})).collect::<Vec<_>>(),
                    "deadlines_set": fx.set, "deadlines_cancelled": fx.cancelled, "deadline_fired": fx.fired, "ended": r.ended,
                    "state": r.state, "mark": fx.mark(i == 0), "line": fx.line(r),
                })
            })
            .collect();
        let interventions: Vec<Value> = interventions
            .iter()
            .map(|e| json!({ "version": e.version, "time": e.timestamp.to_rfc3339(), "type": e.event_type, "line": intervention_line(e), "data": e.json::<Value>().ok() }))
            .collect();
        say!(
            out,
            "{}",
            json!({
                "kind": "process", "stream": stream, "process": process, "correlation": correlation, "status": status, "parked": parked,
                "interventions": interventions,
                "version": last.version, "reactions": reactions.len(), "state": now.state, "deadlines": now.deadlines, "position": now.position.0,
                "checkpoint": checkpoint.map(|(p, at)| json!({"stream": checkpoint_stream, "position": p, "time": at.to_rfc3339()})),
                "started_at": start.to_rfc3339(), "updated_at": last.timestamp.to_rfc3339(), "elapsed_ms": took.as_secs_f64() * 1000.0,
                "timeline": timeline,
            })
        );
        return Ok(());
    }

    say!(out, "process {process} {correlation} — {status}");
    let field = |out: &mut String, name: &str, value: String| say!(out, "  {name:<11}{value}");
    field(
        out,
        "stream",
        format!(
            "{stream} (version {}, {})",
            last.version,
            count(reactions.len() as u64, "reaction")
        ),
    );
    let took = if now.ended {
        format!("took {}", duration(took))
    } else {
        format!("last change {} later", duration(took))
    };
    field(out, "started", format!("{} UTC, {took}", time(start)));
    field(out, "state", shorten(&now.state.to_string(), 300));
    let pending = if now.deadlines.is_empty() {
        if now.ended { "none (ended)".to_string() } else { "none".to_string() }
    } else {
        now.deadlines
            .iter()
            .map(|d| format!("{} (timer {})", d.name, d.timer))
            .collect::<Vec<_>>()
            .join(", ")
    };
    field(out, "deadlines", pending);
    field(out, "handled", format!("events up to position {}", now.position.0));
    if let Some((position, at)) = checkpoint {
        field(
            out,
            "checkpoint",
            format!(
                "the {process} manager had read up to position {position} (written {} UTC, in {checkpoint_stream})",
                time(at)
            ),
        );
    }
    if let Some(p) = &parked {
        field(out, "parked", format!("{} (key {})", park_line(p), p.key));
        field(
            out,
            "now",
            format!(
                "waiting for a person: once the cause is fixed, `cairn sagas resume {process} {correlation}` has its manager send {} again and then handle the events held back",
                p.command
            ),
        );
    } else if !now.ended {
        let waits = if now.deadlines.is_empty() {
            String::new()
        } else {
            format!(
                " or its {} {}",
                if now.deadlines.len() == 1 { "deadline" } else { "deadlines" },
                deadline_names(&now.deadlines)
            )
        };
        field(out, "now", format!("waiting for its next event{waits}"));
    }

    say!(out);
    say!(out, "timeline");
    let offset = |e: &RecordedEvent| {
        format!("+{}", duration(Duration::from_micros((e.timestamp.0 - start.0).max(0) as u64)))
    };
    let mut lines: Vec<(u64, String)> = reactions
        .iter()
        .zip(&effects)
        .enumerate()
        .map(|(i, ((e, r), fx))| {
            (e.version, format!("  {:>10}  {} {}", offset(e), fx.mark(i == 0), fx.line(r)))
        })
        .collect();
    lines.extend(
        interventions
            .iter()
            .map(|e| (e.version, format!("  {:>10}  {}", offset(e), intervention_line(e)))),
    );
    lines.sort_by_key(|(version, _)| *version);
    for (_, line) in lines {
        say!(out, "{line}");
    }
    Ok(())
}
