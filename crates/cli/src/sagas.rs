//! `cairn sagas`: the sagas in a store, read from their own streams
//! (`$saga-<saga>-<id>`, see cairn-saga): a table of them, one saga's steps
//! and timeline, and resuming one that is parked as needing attention.
//! Everything here reads the store only (resume appends one event), so it
//! works the same on the embedded store, PostgreSQL and through a server.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::io::Write as _;
use std::time::Duration;

use anyhow::{bail, Result};
use cairn_core::{EventStore, ReadStreamOptions, RecordedEvent, StoreError, Timestamp, SAGA_STREAM_PREFIX};
use cairn_saga::{saga_stream, SagaError, SagaEvent, SagaState, Status};
use clap::{Args, Subcommand, ValueEnum};
use comfy_table::{presets::UTF8_FULL_CONDENSED, Table};
use futures_util::{StreamExt, TryStreamExt};
use serde_json::{json, Value};

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
pub struct SagasArgs {
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
    /// One saga: its state, its steps, and the timeline of its transitions.
    Show {
        /// The saga's type, e.g. `order`.
        saga: String,
        /// The saga's id, e.g. `42` for the stream `$saga-order-42`.
        id: String,
    },
    /// Ask a saga parked as needing attention to try its compensations again; the runner that has its definition picks it up.
    Resume {
        saga: String,
        id: String,
        /// Who resumes it, recorded in the saga's history [default: $USER].
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

pub async fn run(ctx: &Context, args: SagasArgs) -> Result<()> {
    let store = ctx.store(false).await?;
    let store = store.as_ref();
    let mut out = String::new();
    match args.action {
        SagasAction::List { status, saga, limit } => list(ctx, &mut out, store, status.map(StatusFilter::status), saga, limit).await?,
        SagasAction::Show { saga, id } => show(ctx, &mut out, store, &saga, &id).await?,
        SagasAction::Resume { saga, id, by } => resume(ctx, &mut out, store, &saga, &id, by).await?,
    }
    emit(out);
    Ok(())
}

/// Every event of a stream, in pages (a server answers at most 1,000 at a time).
async fn read_stream(store: &dyn EventStore, stream: &str) -> Result<Vec<RecordedEvent>, StoreError> {
    const PAGE: usize = 1000;
    let mut events = Vec::new();
    loop {
        let from = events.last().map_or(1, |e: &RecordedEvent| e.version + 1);
        let page = store.read_stream(stream, ReadStreamOptions::forward().from_version(from).limit(PAGE)).await?;
        let done = page.len() < PAGE;
        events.extend(page);
        if done {
            return Ok(events);
        }
    }
}

/// A saga's events and state; `None` if the stream does not exist or is not a saga.
async fn load(store: &dyn EventStore, stream: &str) -> Result<Option<(SagaState, Vec<RecordedEvent>)>, StoreError> {
    match read_stream(store, stream).await {
        Ok(events) => Ok(SagaState::fold(stream, &events).map(|state| (state, events))),
        Err(StoreError::StreamNotFound { .. } | StoreError::StreamDeleted { .. }) => Ok(None),
        Err(e) => Err(e),
    }
}

/// The saga, or an error that says what there is instead.
async fn find(store: &dyn EventStore, saga: &str, id: &str) -> Result<(SagaState, Vec<RecordedEvent>)> {
    let stream = saga_stream(saga, id);
    if let Some(found) = load(store, &stream).await? {
        return Ok(found);
    }
    let others = store.list_streams(&format!("{SAGA_STREAM_PREFIX}{saga}-"), 1).await?;
    if others.is_empty() {
        bail!("no saga of type '{saga}' in this store (no {stream}); `cairn sagas list` shows the sagas there are");
    }
    bail!("no saga '{saga}' with id '{id}' in this store (no {stream}); `cairn sagas list --saga {saga}` shows the ids there are");
}

async fn list(ctx: &Context, out: &mut String, store: &dyn EventStore, status: Option<Status>, saga: Option<String>, limit: usize) -> Result<()> {
    let prefix = match &saga {
        Some(name) => format!("{SAGA_STREAM_PREFIX}{name}-"),
        None => SAGA_STREAM_PREFIX.to_string(),
    };
    let streams = store.list_streams(&prefix, limit).await?;
    let looked_at = streams.len();
    // `$saga-<runner>` (no second '-') is a runner's checkpoint, not a saga.
    let names = streams.into_iter().map(|s| s.stream).filter(|s| s[SAGA_STREAM_PREFIX.len()..].contains('-'));
    let loaded: Vec<Option<(SagaState, Vec<RecordedEvent>)>> =
        futures_util::stream::iter(names.map(|stream| async move { load(store, &stream).await })).buffered(8).try_collect().await?;
    let mut sagas: Vec<SagaState> = loaded
        .into_iter()
        .flatten()
        .map(|(state, _)| state)
        .filter(|s| saga.as_ref().is_none_or(|name| &s.saga == name) && status.is_none_or(|st| s.status == st))
        .collect();
    sagas.sort_by(|a, b| b.started_at.cmp(&a.started_at).then_with(|| a.stream.cmp(&b.stream)));

    if ctx.json {
        for s in &sagas {
            say!(out, "{}", state_json(s));
        }
        return Ok(());
    }
    let mut table = Table::new();
    table.load_preset(UTF8_FULL_CONDENSED).set_header(["id", "saga", "status", "step", "done", "reason", "started (UTC)", "elapsed"]);
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
    let tally: Vec<String> = by_status.iter().map(|(st, n)| format!("{n} {}", st.as_str())).collect();
    match (sagas.len(), status) {
        (0, None) => say!(out, "no sagas{of_type} in this store"),
        (0, Some(st)) => say!(out, "no sagas{of_type} {} in this store", st.as_str()),
        (n, None) => say!(out, "{}{of_type}: {}", count(n as u64, "saga"), tally.join(", ")),
        (n, Some(st)) => say!(out, "{}{of_type} {}", count(n as u64, "saga"), st.as_str()),
    }
    if looked_at >= limit {
        say!(out, "note: looked at the first {} (by name); pass --limit to look at more", count(looked_at as u64, "saga stream"));
    }
    if let Some(parked) = sagas.iter().find(|s| s.status == Status::NeedsAttention) {
        say!(out, 
            "`cairn sagas show {} {}` tells why a saga needs attention; `cairn sagas resume {} {}` retries its compensations once the cause is fixed",
            parked.saga, parked.id, parked.saga, parked.id
        );
    }
    Ok(())
}

async fn show(ctx: &Context, out: &mut String, store: &dyn EventStore, saga: &str, id: &str) -> Result<()> {
    let (state, events) = find(store, saga, id).await?;
    let start = state.started_at.unwrap_or(Timestamp(0));
    if ctx.json {
        let mut whole = state_json(&state);
        whole["pipeline"] = json!(pipeline(&state, &events).into_iter().map(|(step, mark)| json!({"step": step, "mark": mark})).collect::<Vec<_>>());
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
        let took = if state.status.is_final() { format!("took {}", duration(state.elapsed())) } else { format!("last change {} later", duration(state.elapsed())) };
        field(out, "started", format!("{} UTC, {took}", time(at)));
    }
    field(out, "input", shorten(&state.input.to_string(), 100));
    let steps = pipeline(&state, &events);
    let line = steps.iter().map(|(step, mark)| format!("{step} {mark}")).collect::<Vec<_>>().join(" → ");
    field(out, "steps", line);
    let used: String = steps.iter().map(|(_, m)| m.as_str()).collect();
    // A mark's meaning when it is used ("↩✗" and "↩…" before their parts are looked for).
    let mut rest = used;
    let mut legend = Vec::new();
    for (mark, text) in [("↩✗", "↩✗ undo failing"), ("↩…", "↩… undo next"), ("✓", "✓ done"), ("✗", "✗ failed"), ("↩", "↩ undone"), ("kept", "kept: cannot be undone"), ("…", "… now"), ("·", "· not run")] {
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
                    (Some(error), n) if n > 0 => format!(" ({} failed, last: {error})", count(n as u64, "attempt")),
                    _ => String::new(),
                };
                field(out, "now", format!("undoing {step}{retry}"));
            }
        }
        Status::NeedsAttention => {
            let step = pending_undo(&state).unwrap_or("?");
            field(out, "problem", format!("undoing {step} failed: {}", state.last_error.as_deref().unwrap_or("?")));
        }
        Status::Completed | Status::Compensated => {}
    }

    say!(out);
    say!(out, "timeline");
    for e in &events {
        let (mark, line) = match SagaEvent::from_recorded(e) {
            Some(event) => (timeline_mark(&event), timeline_line(&event)),
            None => ("?", format!("(an event this version of cairn does not know: {})", e.event_type)),
        };
        say!(out, "  {:>10}  {mark} {line}", format!("+{}", duration(Duration::from_micros((e.timestamp.0 - start.0).max(0) as u64))));
    }
    if state.status == Status::NeedsAttention {
        say!(out);
        say!(out, "once the cause is fixed, `cairn sagas resume {} {}` retries the compensations", state.saga, state.id);
    }
    Ok(())
}

async fn resume(ctx: &Context, out: &mut String, store: &dyn EventStore, saga: &str, id: &str, by: Option<String>) -> Result<()> {
    let (state, _) = find(store, saga, id).await?;
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
    let by = by.or_else(|| std::env::var("USER").ok().filter(|u| !u.is_empty())).unwrap_or_else(|| "cairn sagas resume".into());
    let resumed = match cairn_saga::resume(store, saga, id, &by).await {
        Ok(state) => state,
        Err(SagaError::Store(StoreError::WrongExpectedVersion { .. })) => {
            bail!("saga {saga} {id} changed while it was being resumed (someone else resumed it?); nothing was written; look again with `cairn sagas show {saga} {id}`")
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
    say!(out, "a runner with the '{saga}' saga picks it up now, or when it next starts; `cairn sagas show {saga} {id}` follows it");
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
        Status::Compensating | Status::NeedsAttention => pending_undo(s).map_or("-".into(), |step| format!("undo {step}")),
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
    matches!(s.status, Status::Compensating | Status::NeedsAttention).then(|| s.undo.get(s.undone.len()).map(String::as_str)).flatten()
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
        Status::Compensating if s.attempts > 0 => s.last_error.as_ref().map(|e| format!("undo: {e} ({})", count(s.attempts as u64, "attempt"))),
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
        (Status::Running | Status::Compensating, Some(start)) => Duration::from_micros((Timestamp::now().0 - start.0).max(0) as u64),
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
    if text.chars().count() > max { format!("{}…", text.chars().take(max - 1).collect::<String>()) } else { text.to_string() }
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
            SagaEvent::StepFailed { step, .. } | SagaEvent::StepTimedOut { step, .. } => marks.entry(step).or_default().failed = true,
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
            SagaEvent::CompensationFailed { step, .. } => marks.entry(step).or_default().undo_failed = true,
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
                mark.push_str(if m.undo_failed && state.status == Status::NeedsAttention { "↩✗" } else { "↩…" });
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
        SagaEvent::StepFailed { .. } | SagaEvent::StepTimedOut { .. } | SagaEvent::CompensationFailed { .. } => "✗",
        SagaEvent::Compensating { .. } | SagaEvent::StepCompensated { .. } | SagaEvent::SagaCompensated {} => "↩",
        SagaEvent::SagaParked { .. } => "!",
        SagaEvent::SagaResumed { .. } => "▶",
    }
}

/// The event's own line, with a completed step's output when it has one.
fn timeline_line(event: &SagaEvent) -> String {
    let line = event.describe();
    match event {
        SagaEvent::StepCompleted { output, .. } if !output.is_null() => format!("{line}: {}", shorten(&output.to_string(), 80)),
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
