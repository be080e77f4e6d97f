//! Sagas for Cairn: business transactions across services, as steps that each
//! have an action and a compensation, run by a [`SagaRunner`] whose state is
//! event-sourced in the store itself (`$saga-<saga>-<id>`), so it never forgets
//! where a saga was.
//!
//! - A step's action runs with a timeout (default 30 s). When an action fails
//!   or times out, the completed steps are undone newest first; a timed-out
//!   step is undone too, since its effect is unknown. Steps declared
//!   [`Step::cannot_be_undone`] are skipped, and the history says so.
//! - A compensation that fails is retried with backoff ([`RetryPolicy`]); when
//!   the attempts run out the saga is parked as *needs attention* until an
//!   operator resumes it ([`resume`], `cairn sagas resume`).
//! - Every transition is appended to the saga's stream, checked against the
//!   version it was decided from, before the next step runs. After a crash the
//!   next runner resumes each unfinished saga from its stream: a completed
//!   step never runs again. A step that was running when the process died
//!   runs again with the same [`StepContext::key`]: actions and compensations
//!   run at least once, and take effect once where the service honours the key.
//!
//! Two smaller tools live alongside: durable timers ([`Scheduler`], timers
//! kept in `$timer-<name>` and armed again after a restart: "cancel the order
//! if it is unpaid in 15 minutes"), and process managers ([`ProcessManager`]),
//! choreography rather than orchestration: a [`Process`] follows events of
//! several streams, grouped by correlation id, and reacts with commands and
//! deadlines; each instance's state is event-sourced in `$saga-<process>-<id>`.

mod definition;
mod history;
pub mod inspect;

/// Waits between attempts at the store (a subscription that broke, an
/// append that failed for a passing reason), jittered so that runners that
/// lost the same server do not come back together.
pub(crate) const STORE_RETRY: cairn_core::Backoff = cairn_core::Backoff::new(
    std::time::Duration::from_millis(100),
    std::time::Duration::from_secs(5),
)
.with_jitter(0.3);
mod process;
mod runner;
mod timer;

pub use definition::{
    DEFAULT_STEP_TIMEOUT, RetryPolicy, Saga, Step, StepContext, StepError, StepResult,
};
pub use history::{SagaEvent, SagaState, Status, derived_id, saga_stream};
pub use process::{
    Command, DEFAULT_COMMAND_ATTEMPTS, DEFAULT_COMMAND_TIMEOUT, Effect, Instance, Message, Parked,
    PendingDeadline, Process, ProcessError, ProcessManager, ProcessManagerBuilder, Reaction,
    parked_stream, process_checkpoint_stream, resume_process,
};
pub use runner::{
    SagaError, SagaRunner, SagaRunnerBuilder, Started, list, load, read_history, resume,
};
pub use timer::{
    DEFAULT_SNAPSHOT_EVERY, Due, FiredTimer, Recovery, Scheduler, SchedulerBuilder, Timer,
    TimerAction, TimerError, TimerEvent, timer_stream,
};
