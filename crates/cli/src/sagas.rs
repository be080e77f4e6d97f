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

use std::fmt::Write as _;
use std::io::Write as _;
use std::time::Duration;

use anyhow::{Result, bail};
use cairn_core::{EventStore, StoreError, Timestamp};
use cairn_saga::inspect::{
    self, Found, InspectError, InstanceFilter, Instances, Kind, NEEDS_ATTENTION, ProcessHistory,
    ProcessView, SagaList, current_step, elapsed, find, kind_of, now_line, park_line, pipeline,
    problem, progress, saga_detail_json, saga_json, shorten, status_rank, stream_prefix,
    timeline_line, timeline_mark,
};
use cairn_saga::{PendingDeadline, ProcessError, SagaError, SagaEvent, Status};
use clap::{Args, Subcommand, ValueEnum};
use comfy_table::{Table, presets::UTF8_FULL_CONDENSED};
use serde_json::json;

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

async fn list(
    ctx: &Context,
    out: &mut String,
    store: &dyn EventStore,
    status: Option<Status>,
    saga: Option<String>,
    limit: usize,
) -> Result<()> {
    let SagaList { sagas, looked_at } =
        inspect::sagas(store, saga.as_deref(), status, limit).await?;
    if ctx.json {
        for s in &sagas {
            say!(out, "{}", saga_json(s));
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
    by_status.sort_by_key(|(st, _)| status_rank(*st));
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
    let (state, events) = match find(store, saga, id).await.map_err(with_hint)? {
        Found::Saga(state, events) => (*state, events),
        Found::Process(history) => return show_process(ctx, out, store, *history).await,
    };
    let start = state.started_at.unwrap_or(Timestamp(0));
    if ctx.json {
        say!(out, "{}", saga_detail_json(&state, &events));
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
    if let Some((label, text)) = now_line(&state) {
        field(out, label, text);
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
    let state = match find(store, saga, id).await.map_err(with_hint)? {
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
        say!(out, "{}", saga_json(&resumed));
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

async fn processes(
    ctx: &Context,
    out: &mut String,
    store: &dyn EventStore,
    process: Option<String>,
    only: Option<InstanceFilter>,
    limit: usize,
) -> Result<()> {
    let Instances { rows, looked_at, candidates } =
        inspect::instances(store, process.as_deref(), only, limit).await?;
    if ctx.json {
        for r in &rows {
            say!(out, "{}", r.to_json());
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
        table.add_row([
            r.process.clone(),
            r.correlation.clone(),
            r.status().to_string(),
            r.reactions.to_string(),
            shorten(&r.line(), 60),
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

async fn show_process(
    ctx: &Context,
    out: &mut String,
    store: &dyn EventStore,
    history: ProcessHistory,
) -> Result<()> {
    let view = inspect::process_view(store, history).await.map_err(with_hint)?;
    if ctx.json {
        say!(out, "{}", view.to_json());
        return Ok(());
    }
    let ProcessView { history, now, status, started, checkpoint, .. } = &view;
    let ProcessHistory { stream, process, correlation, reactions, parked, .. } = history;
    say!(out, "process {process} {correlation} — {status}");
    let field = |out: &mut String, name: &str, value: String| say!(out, "  {name:<11}{value}");
    field(
        out,
        "stream",
        format!(
            "{stream} (version {}, {})",
            view.version,
            count(reactions.len() as u64, "reaction")
        ),
    );
    let took = if now.ended {
        format!("took {}", duration(view.took()))
    } else {
        format!("last change {} later", duration(view.took()))
    };
    field(out, "started", format!("{} UTC, {took}", time(*started)));
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
    if let Some((checkpoint_stream, position, at)) = checkpoint {
        field(
            out,
            "checkpoint",
            format!(
                "the {process} manager had read up to position {position} (written {} UTC, in {checkpoint_stream})",
                time(*at)
            ),
        );
    }
    if let Some(p) = parked {
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
    for (_, at, line) in view.timeline() {
        let offset = Duration::from_micros((at.0 - started.0).max(0) as u64);
        say!(out, "  {:>10}  {line}", format!("+{}", duration(offset)));
    }
    Ok(())
}

/// A failed look-up, with what to run next.
fn with_hint(e: InspectError) -> anyhow::Error {
    let hint = match &e {
        InspectError::Store(_) => return e.into(),
        InspectError::NoSuchName { .. } => {
            "`cairn sagas list` shows the sagas there are, `cairn sagas processes` the process instances".to_string()
        }
        InspectError::NoSuchInstance { process, .. } => {
            format!("`cairn sagas processes --process {process}` shows the instances there are")
        }
        InspectError::NoSuchSaga { saga, .. } => {
            format!("`cairn sagas list --saga {saga}` shows the ids there are")
        }
        InspectError::Neither { stream, .. } | InspectError::Unreadable { stream } => {
            format!("`cairn read {stream}` shows what it holds")
        }
    };
    anyhow::anyhow!("{e}; {hint}")
}
