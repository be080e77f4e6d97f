//! A saga's own stream: the events that record its transitions, and the state
//! they fold into. The runner decides what to do next from this state only, so
//! a runner that starts after a crash continues exactly where the last one was.

use std::time::Duration;

use cairn_core::{NewEvent, RecordedEvent, SAGA_STREAM_PREFIX, Timestamp};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use uuid::Uuid;

/// One transition of a saga, as stored in `$saga-<type>-<id>`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", content = "data")]
pub enum SagaEvent {
    /// The saga exists and will run; `steps` are its step names in order.
    SagaStarted {
        saga: String,
        input: Value,
        steps: Vec<String>,
    },
    StepCompleted {
        step: String,
        output: Value,
    },
    /// One failed (or timed-out) attempt at an action that has retries left.
    StepAttemptFailed {
        step: String,
        attempt: u32,
        error: String,
    },
    StepFailed {
        step: String,
        error: String,
    },
    StepTimedOut {
        step: String,
        after_ms: u64,
    },
    /// Compensation begins: `undo` lists the steps whose compensations run, in
    /// that order (newest first); `not_undoable` the completed steps declared
    /// as impossible to undo, which are skipped.
    Compensating {
        reason: String,
        undo: Vec<String>,
        not_undoable: Vec<String>,
    },
    StepCompensated {
        step: String,
    },
    /// One failed attempt at a compensation; it is retried with backoff.
    CompensationFailed {
        step: String,
        attempt: u32,
        error: String,
    },
    SagaCompleted {},
    SagaCompensated {},
    /// A compensation kept failing: the saga stops and needs an operator.
    SagaParked {
        step: String,
        attempts: u32,
        error: String,
    },
    /// An operator asked a parked saga to try its compensations again.
    SagaResumed {
        by: String,
    },
}

impl SagaEvent {
    pub fn type_name(&self) -> &'static str {
        match self {
            SagaEvent::SagaStarted { .. } => "SagaStarted",
            SagaEvent::StepCompleted { .. } => "StepCompleted",
            SagaEvent::StepAttemptFailed { .. } => "StepAttemptFailed",
            SagaEvent::StepFailed { .. } => "StepFailed",
            SagaEvent::StepTimedOut { .. } => "StepTimedOut",
            SagaEvent::Compensating { .. } => "Compensating",
            SagaEvent::StepCompensated { .. } => "StepCompensated",
            SagaEvent::CompensationFailed { .. } => "CompensationFailed",
            SagaEvent::SagaCompleted {} => "SagaCompleted",
            SagaEvent::SagaCompensated {} => "SagaCompensated",
            SagaEvent::SagaParked { .. } => "SagaParked",
            SagaEvent::SagaResumed { .. } => "SagaResumed",
        }
    }

    /// The event to append as version `version` of `stream`. Its id is
    /// derived from those and its content, so re-sending the same transition
    /// after a lost reply is recognised by the store as a retry, while a
    /// different transition at the same version (another runner's) conflicts.
    pub fn to_new_event(&self, stream: &str, version: u64) -> NewEvent {
        let event = self.to_event();
        let id = derived_id(&format!(
            "{stream}@{version}:{}:{}",
            self.type_name(),
            String::from_utf8_lossy(&event.data)
        ));
        event.with_id(id)
    }

    /// The event to append, with a fresh id.
    pub fn to_event(&self) -> NewEvent {
        let body = serde_json::to_value(self).expect("saga events serialise");
        let data = body.get("data").cloned().unwrap_or(Value::Null);
        NewEvent::json_bytes(self.type_name(), data.to_string())
    }

    /// Reads one stored event back; `None` for an event type this version does not know.
    pub fn from_recorded(event: &RecordedEvent) -> Option<SagaEvent> {
        let data: Value = event.json().ok()?;
        serde_json::from_value(serde_json::json!({ "type": event.event_type, "data": data })).ok()
    }

    /// A line for a timeline.
    pub fn describe(&self) -> String {
        match self {
            SagaEvent::SagaStarted { saga, steps, .. } => {
                format!("started {saga}: {}", steps.join(" → "))
            }
            SagaEvent::StepCompleted { step, .. } => format!("{step} done"),
            SagaEvent::StepAttemptFailed { step, attempt, error } => {
                format!("{step} failed (attempt {attempt}), will retry: {error}")
            }
            SagaEvent::StepFailed { step, error } => format!("{step} failed: {error}"),
            SagaEvent::StepTimedOut { step, after_ms } => {
                format!("{step} timed out after {}", human_ms(*after_ms))
            }
            SagaEvent::Compensating { undo, not_undoable, .. } => {
                let mut line = format!(
                    "compensating: {}",
                    if undo.is_empty() { "nothing to undo".into() } else { undo.join(", ") }
                );
                if !not_undoable.is_empty() {
                    line.push_str(&format!(
                        " (cannot be undone, skipped: {})",
                        not_undoable.join(", ")
                    ));
                }
                line
            }
            SagaEvent::StepCompensated { step } => format!("{step} undone"),
            SagaEvent::CompensationFailed { step, attempt, error } => {
                format!("undoing {step} failed (attempt {attempt}): {error}")
            }
            SagaEvent::SagaCompleted {} => "completed".into(),
            SagaEvent::SagaCompensated {} => "compensated".into(),
            SagaEvent::SagaParked { step, attempts, error } => {
                format!("needs attention: undoing {step} failed {attempts} times: {error}")
            }
            SagaEvent::SagaResumed { by } => format!("resumed by {by}"),
        }
    }
}

fn human_ms(ms: u64) -> String {
    if ms >= 1000 && ms.is_multiple_of(1000) {
        format!("{} s", ms / 1000)
    } else {
        format!("{ms} ms")
    }
}

/// A uuid that is always the same for the same text (UUID v5): idempotency
/// keys become event ids this way.
pub fn derived_id(text: &str) -> Uuid {
    const NAMESPACE: Uuid = Uuid::from_u128(0x6361_6972_6e2d_7361_6761_2d6b_6579_7321);
    Uuid::new_v5(&NAMESPACE, text.as_bytes())
}

/// Where a saga stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    Running,
    Compensating,
    /// Every step done.
    Completed,
    /// Failed or timed out, and every completed step undone (or declared not undoable).
    Compensated,
    /// A compensation failed too often: needs an operator (`cairn sagas resume`).
    NeedsAttention,
}

impl Status {
    /// Completed and compensated sagas never change again.
    pub fn is_final(self) -> bool {
        matches!(self, Status::Completed | Status::Compensated)
    }
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Running => "running",
            Status::Compensating => "compensating",
            Status::Completed => "completed",
            Status::Compensated => "compensated",
            Status::NeedsAttention => "needs attention",
        }
    }
}

/// What a saga's stream says about it.
#[derive(Debug, Clone, PartialEq)]
pub struct SagaState {
    pub stream: String,
    pub saga: String,
    pub id: String,
    pub input: Value,
    pub steps: Vec<String>,
    /// Completed steps with their outputs, in the order they completed.
    pub completed: Vec<(String, Value)>,
    pub status: Status,
    /// Why it is compensating (or compensated): the failure or timeout.
    pub reason: Option<String>,
    /// The compensations to run, newest step first, and those done so far.
    pub undo: Vec<String>,
    pub undone: Vec<String>,
    /// Failed attempts at the current action, or at the current compensation
    /// since the last success or resume.
    pub attempts: u32,
    pub last_error: Option<String>,
    /// The stream's version: the next transition is appended expecting it.
    pub version: u64,
    pub started_at: Option<Timestamp>,
    pub updated_at: Option<Timestamp>,
}

impl SagaState {
    /// Folds a saga's stream; `None` if it does not start with `SagaStarted`.
    pub fn fold(stream: &str, events: &[RecordedEvent]) -> Option<SagaState> {
        let first = events.first()?;
        let SagaEvent::SagaStarted { saga, input, steps } = SagaEvent::from_recorded(first)? else {
            return None;
        };
        let mut state = SagaState::started(stream, saga, input, steps, first.timestamp)?;
        state.version = first.version;
        for event in &events[1..] {
            if let Some(e) = SagaEvent::from_recorded(event) {
                state.apply(&e);
            }
            state.version = event.version;
            state.updated_at = Some(event.timestamp);
        }
        Some(state)
    }

    /// The state of a saga just started (version 1), without reading it back.
    pub fn fold_new(stream: &str, started: SagaEvent) -> SagaState {
        let SagaEvent::SagaStarted { saga, input, steps } = started else {
            panic!("fold_new takes a SagaStarted")
        };
        SagaState::started(stream, saga, input, steps, Timestamp::now())
            .expect("the stream is the saga's")
    }

    /// Version 1: started at `at`, nothing done yet. `None` if `stream` is
    /// not `$saga-<saga>-<id>`.
    fn started(
        stream: &str,
        saga: String,
        input: Value,
        steps: Vec<String>,
        at: Timestamp,
    ) -> Option<SagaState> {
        let id = stream
            .strip_prefix(SAGA_STREAM_PREFIX)?
            .strip_prefix(saga.as_str())?
            .strip_prefix('-')?
            .to_string();
        Some(SagaState {
            stream: stream.to_string(),
            saga,
            id,
            input,
            steps,
            completed: Vec::new(),
            status: Status::Running,
            reason: None,
            undo: Vec::new(),
            undone: Vec::new(),
            attempts: 0,
            last_error: None,
            version: 1,
            started_at: Some(at),
            updated_at: Some(at),
        })
    }

    /// Moves the state past one transition (the version is the caller's).
    pub fn apply(&mut self, event: &SagaEvent) {
        match event {
            SagaEvent::SagaStarted { .. } => {}
            SagaEvent::StepCompleted { step, output } => {
                self.completed.push((step.clone(), output.clone()));
                self.attempts = 0;
            }
            SagaEvent::StepAttemptFailed { attempt, error, .. } => {
                self.attempts = *attempt;
                self.last_error = Some(error.clone());
            }
            SagaEvent::StepFailed { step, error } => {
                self.reason = Some(format!("{step} failed: {error}"))
            }
            SagaEvent::StepTimedOut { step, after_ms } => {
                self.reason = Some(format!("{step} timed out after {}", human_ms(*after_ms)))
            }
            SagaEvent::Compensating { undo, .. } => {
                self.status = Status::Compensating;
                self.undo = undo.clone();
                self.attempts = 0;
            }
            SagaEvent::StepCompensated { step } => {
                self.undone.push(step.clone());
                self.attempts = 0;
            }
            SagaEvent::CompensationFailed { attempt, error, .. } => {
                self.attempts = *attempt;
                self.last_error = Some(error.clone());
            }
            SagaEvent::SagaCompleted {} => self.status = Status::Completed,
            SagaEvent::SagaCompensated {} => self.status = Status::Compensated,
            SagaEvent::SagaParked { error, .. } => {
                self.status = Status::NeedsAttention;
                self.last_error = Some(error.clone());
            }
            SagaEvent::SagaResumed { .. } => {
                self.status = Status::Compensating;
                self.attempts = 0;
            }
        }
    }

    /// The step whose action runs next, while running.
    pub fn next_step(&self) -> Option<&str> {
        (self.status == Status::Running)
            .then(|| self.steps.get(self.completed.len()).map(String::as_str))
            .flatten()
    }

    /// The compensation that runs next, while compensating.
    pub fn next_undo(&self) -> Option<&str> {
        (self.status == Status::Compensating)
            .then(|| self.undo.get(self.undone.len()).map(String::as_str))
            .flatten()
    }

    pub fn output(&self, step: &str) -> Option<&Value> {
        self.completed.iter().find(|(s, _)| s == step).map(|(_, v)| v)
    }

    /// How long it has run (to its last transition).
    pub fn elapsed(&self) -> Duration {
        match (self.started_at, self.updated_at) {
            (Some(a), Some(b)) if b.0 >= a.0 => Duration::from_micros((b.0 - a.0) as u64),
            _ => Duration::ZERO,
        }
    }
}

/// `$saga-<saga>-<id>`.
pub fn saga_stream(saga: &str, id: &str) -> String {
    format!("{SAGA_STREAM_PREFIX}{saga}-{id}")
}
