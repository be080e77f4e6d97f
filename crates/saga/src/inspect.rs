//! What the sagas and process instances in a store look like, read from
//! their streams: the views `cairn sagas` prints and the server serves as
//! JSON (`/sagas`, `/processes`), computed once, here.
//!
//! A saga's stream is `$saga-<saga>-<id>`; a process instance's is
//! `$saga-<process>-<correlation>` (a `ProcessReacted` or `ProcessEnded` event
//! per reaction, `ProcessParked`/`ProcessResumed` when a command kept
//! failing). Everything here only reads, so it works the same on every
//! backend and through a server.

use std::collections::HashMap;
use std::time::Duration;

use cairn_core::{
    EventStore, ReadStreamOptions, RecordedEvent, SAGA_STREAM_PREFIX, StoreError, Timestamp,
};
use serde_json::{Value, json};

use crate::{
    Parked, PendingDeadline, Reaction, SagaEvent, SagaState, Status, process_checkpoint_stream,
    read_history, saga_stream,
};

/// Why a saga or process instance could not be shown.
#[derive(Debug, thiserror::Error)]
pub enum InspectError {
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Neither a saga type nor a process of this name has a stream.
    #[error("no saga of type '{name}' and no process named '{name}' in this store (no {stream})")]
    NoSuchName { name: String, stream: String },
    #[error(
        "no instance of process '{process}' with correlation id '{id}' in this store (no {stream})"
    )]
    NoSuchInstance { process: String, id: String, stream: String },
    #[error("no saga '{saga}' with id '{id}' in this store (no {stream})")]
    NoSuchSaga { saga: String, id: String, stream: String },
    /// The stream exists but holds something else.
    #[error(
        "{stream} holds neither a saga nor a process instance (its first event is a {first_type})"
    )]
    Neither { stream: String, first_type: String },
    /// An instance stream without a reaction this version can read.
    #[error("{stream} holds no reactions this version of cairn can read")]
    Unreadable { stream: String },
}

/// "1 attempt", "3 attempts".
fn plural(n: u64, what: &str) -> String {
    format!("{n} {what}{}", if n == 1 { "" } else { "s" })
}

/// A saga's events and state; `None` if the stream does not exist or is not a saga.
pub async fn load(
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
pub enum Found {
    Saga(Box<SagaState>, Vec<RecordedEvent>),
    Process(Box<ProcessHistory>),
}

/// A process-manager instance's reactions, oldest first, and its parks and
/// resumes (`ProcessParked`, `ProcessResumed`).
pub struct ProcessHistory {
    pub stream: String,
    pub process: String,
    pub correlation: String,
    pub reactions: Vec<(RecordedEvent, Reaction)>,
    pub interventions: Vec<RecordedEvent>,
    /// The park in effect: nothing recorded after it.
    pub parked: Option<Parked>,
}

pub const PARKED: &str = "ProcessParked";
pub const RESUMED: &str = "ProcessResumed";

/// The park in effect, from an instance's events newest first: a park with no
/// reaction nor resume after it.
pub fn park_in_effect<'a>(
    newest_first: impl IntoIterator<Item = &'a RecordedEvent>,
) -> Option<Parked> {
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
pub fn is_instance_event(e: &RecordedEvent) -> bool {
    Reaction::from_recorded(e).is_some() || e.event_type == PARKED || e.event_type == RESUMED
}

/// The saga or process instance, or an error that says what there is instead.
pub async fn find(store: &dyn EventStore, name: &str, id: &str) -> Result<Found, InspectError> {
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
        return Err(InspectError::Neither { stream, first_type: first.event_type.clone() });
    }
    let name = name.to_string();
    Err(match kind_of(store, &name).await? {
        None => InspectError::NoSuchName { name, stream },
        Some(Kind::Process) => {
            InspectError::NoSuchInstance { process: name, id: id.to_string(), stream }
        }
        Some(Kind::Saga) => InspectError::NoSuchSaga { saga: name, id: id.to_string(), stream },
    })
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Saga,
    Process,
}

/// Whether `name` is a saga type or a process, by its streams; `None`: neither is in the store.
pub async fn kind_of(store: &dyn EventStore, name: &str) -> Result<Option<Kind>, StoreError> {
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
pub async fn newest(
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
pub fn stream_prefix(name: Option<&str>) -> String {
    name.map_or_else(
        || SAGA_STREAM_PREFIX.to_string(),
        |name| format!("{SAGA_STREAM_PREFIX}{name}-"),
    )
}

/// Where a status sorts in the summary: those to act on first.
pub fn status_rank(status: Status) -> u8 {
    match status {
        Status::NeedsAttention => 0,
        Status::Compensating => 1,
        Status::Running => 2,
        Status::Compensated => 3,
        Status::Completed => 4,
    }
}

/// The step a saga is at (running, undoing), or the last one it did.
pub fn current_step(s: &SagaState) -> String {
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
pub fn pending_undo(s: &SagaState) -> Option<&str> {
    matches!(s.status, Status::Compensating | Status::NeedsAttention)
        .then(|| s.undo.get(s.undone.len()).map(String::as_str))
        .flatten()
}

/// "2/3", and "2/3, 1/2 undone" once compensating.
pub fn progress(s: &SagaState) -> String {
    let done = format!("{}/{}", s.completed.len(), s.steps.len());
    if s.status == Status::Running || s.status == Status::Completed || s.undo.is_empty() {
        done
    } else {
        format!("{done}, {}/{} undone", s.undone.len(), s.undo.len())
    }
}

/// Why it failed, and what keeps its compensation from finishing.
pub fn problem(s: &SagaState) -> String {
    let mut text = s.reason.clone().unwrap_or_default();
    let undo_trouble = match s.status {
        Status::NeedsAttention => s.last_error.as_ref().map(|e| format!("undo: {e}")),
        Status::Compensating if s.attempts > 0 => s
            .last_error
            .as_ref()
            .map(|e| format!("undo: {e} ({})", plural(s.attempts as u64, "attempt"))),
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
pub fn elapsed(s: &SagaState) -> Duration {
    match (s.status, s.started_at) {
        (Status::Running | Status::Compensating, Some(start)) => {
            Duration::from_micros((Timestamp::now().0 - start.0).max(0) as u64)
        }
        _ => s.elapsed(),
    }
}

pub fn shorten(text: &str, max: usize) -> String {
    if text.chars().count() > max {
        format!("{}…", text.chars().take(max - 1).collect::<String>())
    } else {
        text.to_string()
    }
}

/// Each step with what happened to it: `✓` done, `✗` failed or timed out,
/// `↩` undone (`↩✗` its undo failing, `↩…` its undo next), `kept` done but
/// declared impossible to undo, `…` running now, `·` not run.
pub fn pipeline(state: &SagaState, events: &[RecordedEvent]) -> Vec<(String, String)> {
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

pub fn timeline_mark(event: &SagaEvent) -> &'static str {
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
pub fn timeline_line(event: &SagaEvent) -> String {
    let line = event.describe();
    match event {
        SagaEvent::StepCompleted { output, .. } if !output.is_null() => {
            format!("{line}: {}", shorten(&output.to_string(), 80))
        }
        _ => line,
    }
}

pub fn saga_json(s: &SagaState) -> Value {
    json!({
        "stream": s.stream, "saga": s.saga, "id": s.id, "status": s.status, "step": current_step(s),
        "steps": s.steps, "completed": s.completed.iter().map(|(step, _)| step).collect::<Vec<_>>(),
        "outputs": s.completed.iter().cloned().collect::<serde_json::Map<String, Value>>(),
        "undo": s.undo, "undone": s.undone, "reason": s.reason, "last_error": s.last_error, "attempts": s.attempts,
        "input": s.input, "version": s.version,
        "started_at": s.started_at.map(Timestamp::to_rfc3339), "updated_at": s.updated_at.map(Timestamp::to_rfc3339),
        "elapsed_ms": elapsed(s).as_secs_f64() * 1000.0,
        "progress": progress(s), "problem": problem(s),
    })
}

/// What a saga that is not over is doing, as (label, text): `now` running a
/// step or undoing one, or the `problem` of a parked saga.
pub fn now_line(s: &SagaState) -> Option<(&'static str, String)> {
    match s.status {
        Status::Running => s.next_step().map(|step| ("now", format!("running {step}"))),
        Status::Compensating => s.next_undo().map(|step| {
            let retry = match (&s.last_error, s.attempts) {
                (Some(error), n) if n > 0 => {
                    format!(" ({} failed, last: {error})", plural(n as u64, "attempt"))
                }
                _ => String::new(),
            };
            ("now", format!("undoing {step}{retry}"))
        }),
        Status::NeedsAttention => Some((
            "problem",
            format!(
                "undoing {} failed: {}",
                pending_undo(s).unwrap_or("?"),
                s.last_error.as_deref().unwrap_or("?")
            ),
        )),
        Status::Completed | Status::Compensated => None,
    }
}

/// `$saga-<process>-<correlation>` split in two, for a stream that may hold a
/// process instance: not a runner's checkpoint (`$saga-<runner>`, no second
/// `-`) nor a process's (`$saga-<process>-$checkpoint`). A process name has
/// no `-`, so the first one ends it.
pub fn instance_name(stream: &str) -> Option<(&str, &str)> {
    let (process, correlation) = stream.strip_prefix(SAGA_STREAM_PREFIX)?.split_once('-')?;
    (!process.is_empty() && !correlation.is_empty() && !correlation.starts_with('$'))
        .then_some((process, correlation))
}

/// One row of `cairn sagas processes`: an instance's newest reaction, and the
/// one before it (to tell which deadlines the newest set or cancelled).
pub struct InstanceRow {
    pub stream: String,
    pub process: String,
    pub correlation: String,
    /// Its newest event (a reaction, a park or a resume).
    pub last: RecordedEvent,
    /// Its newest reaction (an empty one if it parked at its first event).
    pub reaction: Reaction,
    pub before: Option<Reaction>,
    pub parked: Option<Parked>,
    /// How many reactions it has: exact when its stream is no longer than
    /// the events read for the row, else its version less the parks and
    /// resumes among those (older ones are not read).
    pub reactions: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InstanceFilter {
    Running,
    Parked,
    Ended,
}

pub const NEEDS_ATTENTION: &str = "needs attention";

pub fn instance_status(reaction: Option<&Reaction>, parked: Option<&Parked>) -> &'static str {
    if parked.is_some() {
        NEEDS_ATTENTION
    } else if reaction.is_some_and(|r| r.ended) {
        "ended"
    } else {
        "running"
    }
}

/// "parked: Record failed 3 times: the ledger refuses 2".
pub fn park_line(parked: &Parked) -> String {
    format!(
        "parked at {}: {} failed {}: {}",
        parked.handled,
        parked.command,
        plural(parked.attempts as u64, "time"),
        parked.error
    )
}

/// What stands for the reaction of an instance parked at its first event
/// (it has none yet: its state is the default).
pub fn no_reaction_yet() -> Reaction {
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

/// What one reaction did, from its record and the one before: the commands
/// it sent, the deadlines it set and cancelled, the deadline that fired.
pub struct ReactionEffects {
    /// (name, key); the name is the key in records that did not keep names.
    pub commands: Vec<(String, String)>,
    pub set: Vec<String>,
    pub cancelled: Vec<String>,
    pub fired: Option<String>,
    pub ended: bool,
}

impl ReactionEffects {
    pub fn of(before: Option<&Reaction>, reaction: &Reaction) -> ReactionEffects {
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
    pub fn mark(&self, first: bool) -> &'static str {
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
    pub fn line(&self, reaction: &Reaction) -> String {
        match self.did() {
            None => format!("{} (state only)", reaction.handled),
            Some(did) => format!("{}: {did}", reaction.handled),
        }
    }

    /// "sent Ship; set deadline payment"; `None` when it only changed state.
    pub fn did(&self) -> Option<String> {
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
        (!parts.is_empty()).then(|| parts.join("; "))
    }
}

/// The sagas of `cairn sagas list`, newest first, and how many streams were
/// looked at (at most `limit`, by name).
pub struct SagaList {
    pub sagas: Vec<SagaState>,
    pub looked_at: usize,
}

/// The sagas (of type `saga`, in `status`) among the first `limit` `$saga-` streams.
pub async fn sagas(
    store: &dyn EventStore,
    saga: Option<&str>,
    status: Option<Status>,
    limit: usize,
) -> Result<SagaList, StoreError> {
    use futures_util::{StreamExt, TryStreamExt};
    let streams = store.list_streams(&stream_prefix(saga), limit).await?;
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
            saga.is_none_or(|name| s.saga == name) && status.is_none_or(|st| s.status == st)
        })
        .collect();
    sagas.sort_by(|a, b| b.started_at.cmp(&a.started_at).then_with(|| a.stream.cmp(&b.stream)));
    Ok(SagaList { sagas, looked_at })
}

/// One saga with its steps' marks and its timeline, as `cairn sagas show --json` prints it.
pub fn saga_detail_json(state: &SagaState, events: &[RecordedEvent]) -> Value {
    let start = state.started_at.unwrap_or(Timestamp(0));
    let mut whole = saga_json(state);
    whole["kind"] = json!("saga");
    if let Some((label, text)) = now_line(state) {
        whole["now"] = json!({"label": label, "text": text});
    }
    whole["pipeline"] = json!(
        pipeline(state, events)
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
    whole
}

/// The process instances of `cairn sagas processes`, latest change first.
pub struct Instances {
    pub rows: Vec<InstanceRow>,
    /// `$saga-` streams looked at (at most the limit, by name, sagas included).
    pub looked_at: usize,
    /// Of those, the streams named like an instance.
    pub candidates: usize,
}

/// The instances (of `process`, passing `only`) among the first `limit` `$saga-` streams.
pub async fn instances(
    store: &dyn EventStore,
    process: Option<&str>,
    only: Option<InstanceFilter>,
    limit: usize,
) -> Result<Instances, StoreError> {
    use futures_util::{StreamExt, TryStreamExt};
    let streams = store.list_streams(&stream_prefix(process), limit).await?;
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
            let interventions =
                events.iter().filter(|e| Reaction::from_recorded(e).is_none()).count();
            let count = last.version.saturating_sub(interventions as u64);
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
                reactions: count,
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
    Ok(Instances { rows, looked_at, candidates })
}

impl InstanceRow {
    /// Its status: running, needs attention or ended.
    pub fn status(&self) -> &'static str {
        instance_status(Some(&self.reaction), self.parked.as_ref())
    }

    /// What its newest reaction did, or why it is parked.
    pub fn line(&self) -> String {
        self.parked.as_ref().map_or_else(
            || ReactionEffects::of(self.before.as_ref(), &self.reaction).line(&self.reaction),
            park_line,
        )
    }

    /// As `cairn sagas processes --json` prints it.
    pub fn to_json(&self) -> Value {
        json!({
            "kind": "process", "stream": self.stream, "process": self.process, "correlation": self.correlation, "status": self.status(),
            "parked": self.parked,
            "reactions": self.reactions, "last_reaction": self.line(), "handled": self.reaction.handled,
            "deadlines": self.reaction.deadlines.iter().map(|d| &d.name).collect::<Vec<_>>(),
            "position": self.reaction.position.0, "state": self.reaction.state, "updated_at": self.last.timestamp.to_rfc3339(),
        })
    }
}

/// One process instance as `cairn sagas show` tells it.
pub struct ProcessView {
    pub history: ProcessHistory,
    /// Its newest reaction (an empty one if it parked at its first event).
    pub now: Reaction,
    pub status: &'static str,
    /// The times of its first and newest events, and its newest version.
    pub started: Timestamp,
    pub updated: Timestamp,
    pub version: u64,
    /// Where the process's manager had read to: (stream, position, written at).
    pub checkpoint: Option<(String, u64, Timestamp)>,
    /// What each reaction did, in the order of `history.reactions`.
    pub effects: Vec<ReactionEffects>,
}

impl ProcessView {
    /// From its first event to its newest.
    pub fn took(&self) -> Duration {
        Duration::from_micros((self.updated.0 - self.started.0).max(0) as u64)
    }

    /// The timeline: (version, time, mark and line) of each reaction, park and resume.
    pub fn timeline(&self) -> Vec<(u64, Timestamp, String)> {
        let mut lines: Vec<(u64, Timestamp, String)> = self
            .history
            .reactions
            .iter()
            .zip(&self.effects)
            .enumerate()
            .map(|(i, ((e, r), fx))| {
                (e.version, e.timestamp, format!("{} {}", fx.mark(i == 0), fx.line(r)))
            })
            .collect();
        lines.extend(self.history.interventions.iter().map(|e| {
            let (mark, line) = intervention(e);
            (e.version, e.timestamp, format!("{mark} {line}"))
        }));
        lines.sort_by_key(|(version, ..)| *version);
        lines
    }

    /// As `cairn sagas show --json` prints it.
    pub fn to_json(&self) -> Value {
        let h = &self.history;
        let start = self.started;
        let timeline: Vec<Value> = h
            .reactions
            .iter()
            .zip(&self.effects)
            .enumerate()
            .map(|(i, ((e, r), fx))| {
                json!({
                    "version": e.version, "position": e.position.0, "time": e.timestamp.to_rfc3339(),
                    "offset_ms": (e.timestamp.0 - start.0) as f64 / 1000.0, "type": e.event_type,
                    "handled": r.handled, "commands": fx.commands.iter().map(|(name, key)| json!({"name": name, "key": key})).collect::<Vec<_>>(),
                    "deadlines_set": fx.set, "deadlines_cancelled": fx.cancelled, "deadline_fired": fx.fired, "ended": r.ended,
                    "state": r.state, "mark": fx.mark(i == 0), "line": fx.line(r), "did": fx.did(),
                })
            })
            .collect();
        let interventions: Vec<Value> = h
            .interventions
            .iter()
            .map(|e| {
                let (mark, line) = intervention(e);
                json!({ "version": e.version, "time": e.timestamp.to_rfc3339(), "offset_ms": (e.timestamp.0 - start.0) as f64 / 1000.0, "type": e.event_type, "mark": mark, "line": line, "data": e.json::<Value>().ok() })
            })
            .collect();
        json!({
            "kind": "process", "stream": h.stream, "process": h.process, "correlation": h.correlation, "status": self.status, "parked": h.parked,
            "interventions": interventions,
            "version": self.version, "reactions": h.reactions.len(), "state": self.now.state, "deadlines": self.now.deadlines, "position": self.now.position.0,
            "checkpoint": self.checkpoint.as_ref().map(|(stream, p, at)| json!({"stream": stream, "position": p, "time": at.to_rfc3339()})),
            "started_at": start.to_rfc3339(), "updated_at": self.updated.to_rfc3339(), "elapsed_ms": self.took().as_secs_f64() * 1000.0,
            "timeline": timeline,
        })
    }
}

/// A park (`✋`) or a resume (`↻`), as a timeline mark and line.
fn intervention(e: &RecordedEvent) -> (&'static str, String) {
    match Parked::from_recorded(e) {
        Some(p) => ("✋", park_line(&p)),
        None => (
            "↻",
            format!(
                "resumed by {}",
                e.json::<Value>()
                    .ok()
                    .and_then(|v| v["by"].as_str().map(str::to_string))
                    .unwrap_or_else(|| "?".into())
            ),
        ),
    }
}

/// Everything `cairn sagas show` tells of a process instance (it reads the
/// manager's checkpoint too).
pub async fn process_view(
    store: &dyn EventStore,
    history: ProcessHistory,
) -> Result<ProcessView, InspectError> {
    let events = || history.reactions.iter().map(|(e, _)| e).chain(&history.interventions);
    let (Some(first), Some(last)) =
        (events().min_by_key(|e| e.version), events().max_by_key(|e| e.version))
    else {
        return Err(InspectError::Unreadable { stream: history.stream.clone() });
    };
    let (started, updated, version) = (first.timestamp, last.timestamp, last.version);
    let checkpoint_stream = process_checkpoint_stream(&history.process);
    let checkpoint = newest(store, &checkpoint_stream, 1)
        .await?
        .into_iter()
        .next()
        .and_then(|e| e.json::<u64>().ok().map(|p| (checkpoint_stream, p, e.timestamp)));
    let reactions = &history.reactions;
    let effects = reactions
        .iter()
        .enumerate()
        .map(|(i, (_, r))| ReactionEffects::of(i.checked_sub(1).map(|j| &reactions[j].1), r))
        .collect();
    let now = reactions.last().map_or_else(no_reaction_yet, |(_, r)| r.clone());
    let status = instance_status(Some(&now), history.parked.as_ref());
    Ok(ProcessView { history, now, status, started, updated, version, checkpoint, effects })
}
