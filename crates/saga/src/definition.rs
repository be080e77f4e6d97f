//! What a saga is: named steps, each an action and how to undo it.

use std::collections::BTreeMap;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use cairn_core::Metadata;
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;
use uuid::Uuid;

use crate::history::derived_id;

/// How long a step's action (or one attempt at its compensation) may take
/// before the saga gives up on it.
pub const DEFAULT_STEP_TIMEOUT: Duration = Duration::from_secs(30);

/// Why a step's action or compensation did not succeed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StepError(pub String);

impl StepError {
    pub fn new(message: impl fmt::Display) -> Self {
        StepError(message.to_string())
    }
}

impl fmt::Display for StepError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for StepError {}

impl From<&str> for StepError {
    fn from(s: &str) -> Self {
        StepError(s.to_string())
    }
}
impl From<String> for StepError {
    fn from(s: String) -> Self {
        StepError(s)
    }
}
impl From<cairn_core::StoreError> for StepError {
    fn from(e: cairn_core::StoreError) -> Self {
        StepError(e.to_string())
    }
}
impl From<serde_json::Error> for StepError {
    fn from(e: serde_json::Error) -> Self {
        StepError(format!("bad JSON: {e}"))
    }
}

pub type StepResult = Result<Value, StepError>;
pub(crate) type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;
pub(crate) type StepFn = Arc<dyn Fn(StepContext) -> BoxFuture<StepResult> + Send + Sync>;

/// What an action or compensation is given. Its `key` is the same every
/// time the same step of the same saga runs (after a crash, or a retried
/// compensation): pass it on to the service (or use [`StepContext::event_id`]
/// as the id of the event it appends) so that running it twice has the effect
/// of running it once.
#[derive(Clone)]
pub struct StepContext {
    pub saga: String,
    pub saga_id: String,
    pub step: String,
    /// `$saga-<saga>-<id>/<step>`, with `/undo` appended for the compensation.
    pub key: String,
    /// 1 for the first attempt; compensations count up as they are retried.
    pub attempt: u32,
    pub(crate) input: Arc<Value>,
    pub(crate) outputs: Arc<BTreeMap<String, Value>>,
    pub(crate) correlation: Uuid,
}

impl StepContext {
    /// The saga's input, as given to `start`.
    pub fn input<T: DeserializeOwned>(&self) -> Result<T, StepError> {
        T::deserialize(self.input.as_ref())
            .map_err(|e| StepError(format!("the saga's input does not fit: {e}")))
    }

    /// What an earlier (completed) step returned.
    pub fn output<T: DeserializeOwned>(&self, step: &str) -> Result<T, StepError> {
        let value = self
            .outputs
            .get(step)
            .ok_or_else(|| StepError(format!("step {step} has no output (not completed)")))?;
        T::deserialize(value)
            .map_err(|e| StepError(format!("the output of {step} does not fit: {e}")))
    }

    /// An event id derived from the key: appending the step's event with it
    /// makes a repeated run a no-op in the store.
    pub fn event_id(&self) -> Uuid {
        derived_id(&self.key)
    }

    /// Metadata for what the step writes: the saga's correlation id, caused by this step.
    pub fn metadata(&self) -> Metadata {
        Metadata {
            correlation_id: Some(self.correlation),
            causation_id: Some(self.event_id()),
            ..Metadata::default()
        }
    }
}

/// How a step is undone.
#[derive(Clone)]
pub(crate) enum Undo {
    Compensate(StepFn),
    /// Declared impossible to undo (an email sent): skipped in compensation.
    Never,
    /// Nothing said: refused when the saga is registered.
    Undeclared,
}

/// One step of a saga.
#[derive(Clone)]
pub struct Step {
    pub(crate) name: String,
    pub(crate) action: StepFn,
    pub(crate) undo: Undo,
    pub(crate) timeout: Duration,
    /// Attempts after the first when the action fails or times out, and the
    /// wait before the first of them (doubling, up to 30 s).
    pub(crate) retries: u32,
    pub(crate) retry_backoff: Duration,
}

fn boxed<F, Fut, T>(f: F) -> StepFn
where
    F: Fn(StepContext) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<T, StepError>> + Send + 'static,
    T: Serialize,
{
    Arc::new(move |ctx| {
        let fut = f(ctx);
        Box::pin(async move { serde_json::to_value(fut.await?).map_err(StepError::from) })
    })
}

impl Step {
    /// A step whose action is `action`; its output (any serialisable value)
    /// is kept in the saga's stream for later steps and compensations.
    pub fn new<F, Fut, T>(name: impl Into<String>, action: F) -> Step
    where
        F: Fn(StepContext) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<T, StepError>> + Send + 'static,
        T: Serialize,
    {
        Step {
            name: name.into(),
            action: boxed(action),
            undo: Undo::Undeclared,
            timeout: DEFAULT_STEP_TIMEOUT,
            retries: 0,
            retry_backoff: Duration::from_millis(200),
        }
    }

    /// How to undo the step. Compensations are retried until they succeed
    /// (or the saga is parked), so they must be safe to run more than once,
    /// and after a timed-out action that may or may not have taken effect.
    pub fn compensate<F, Fut, T>(mut self, compensation: F) -> Step
    where
        F: Fn(StepContext) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<T, StepError>> + Send + 'static,
        T: Serialize,
    {
        self.undo = Undo::Compensate(boxed(compensation));
        self
    }

    /// Declares that the step cannot be undone: compensation skips it (and
    /// says so in the saga's history). Put such steps last where you can.
    pub fn cannot_be_undone(mut self) -> Step {
        self.undo = Undo::Never;
        self
    }

    /// How long the action, and each attempt at the compensation, may take
    /// (default 30 s).
    pub fn timeout(mut self, timeout: Duration) -> Step {
        self.timeout = timeout;
        self
    }

    /// Runs the action up to `retries` more times when it fails or times out
    /// (a passing outage of the service), waiting `backoff`, doubled after
    /// each attempt (at most 30 s), before compensation starts. Each attempt
    /// has the same key, and is recorded in the saga's history. Default: no retry.
    pub fn retry(mut self, retries: u32, backoff: Duration) -> Step {
        self.retries = retries;
        self.retry_backoff = backoff;
        self
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The wait after failed attempt number `attempt` (1-based).
    pub(crate) fn retry_delay(&self, attempt: u32) -> Duration {
        RetryPolicy {
            attempts: 0,
            backoff: self.retry_backoff,
            max_backoff: Duration::from_secs(30),
        }
        .delay(attempt)
    }
}

/// How failing compensations are retried before the saga is parked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Attempts per compensation before the saga needs attention.
    pub attempts: u32,
    /// Wait after the first failure; doubled after each, up to `max_backoff`.
    pub backoff: Duration,
    pub max_backoff: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            attempts: 8,
            backoff: Duration::from_millis(200),
            max_backoff: Duration::from_secs(30),
        }
    }
}

impl RetryPolicy {
    /// The wait after failed attempt number `attempt` (1-based). Without
    /// jitter: the runner computes it again from the saga's history, and
    /// must find the same time.
    pub fn delay(&self, attempt: u32) -> Duration {
        cairn_core::Backoff::new(self.backoff, self.max_backoff).base(attempt.saturating_sub(1))
    }
}

/// A saga of two steps whose second fails: the first is undone.
///
/// ```
/// use std::sync::Arc;
/// use cairn_core::EventStore;
/// use cairn_saga::{Saga, SagaRunner, Status, Step, StepContext, StepError};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let dir = tempfile::tempdir()?;
/// let store: Arc<dyn EventStore> = Arc::new(cairn_log::EmbeddedStore::open(dir.path())?);
/// let order = Saga::new("order")
///     .step(Step::new("charge-card", |_: StepContext| async { Ok::<_, StepError>(42) })
///         .compensate(|_| async { Ok(()) })) // refund
///     .step(Step::new("reserve-items", |_: StepContext| async {
///         Err::<(), _>(StepError::new("out of stock"))
///     })
///     .compensate(|_| async { Ok(()) })); // every step says how it is undone
/// let runner = SagaRunner::builder(store, "shop").saga(order).run().await?;
/// runner.start("order", "7", &serde_json::json!({"items": 3})).await?;
/// let ended = runner.wait("order", "7").await?;
/// assert_eq!(ended.status, Status::Compensated);
/// assert_eq!(ended.undone, ["charge-card"]);
/// runner.shutdown().await;
/// # Ok(())
/// # }
/// ```
/// A saga: a name (its type, the `order` in `$saga-order-42`) and steps.
#[derive(Clone)]
pub struct Saga {
    pub(crate) name: String,
    pub(crate) steps: Vec<Step>,
    pub(crate) retry: RetryPolicy,
}

impl Saga {
    pub fn new(name: impl Into<String>) -> Saga {
        Saga { name: name.into(), steps: Vec::new(), retry: RetryPolicy::default() }
    }

    pub fn step(mut self, step: Step) -> Saga {
        self.steps.push(step);
        self
    }

    pub fn retry(mut self, policy: RetryPolicy) -> Saga {
        self.retry = policy;
        self
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub(crate) fn find(&self, step: &str) -> Option<&Step> {
        self.steps.iter().find(|s| s.name == step)
    }

    /// Refuses a saga that could not run or be undone as written.
    pub(crate) fn check(&self) -> Result<(), String> {
        cairn_core::validate_category(&self.name)
            .map_err(|e| format!("saga name {:?}: {e}", self.name))?;
        if self.steps.is_empty() {
            return Err(format!("saga {} has no steps", self.name));
        }
        let mut seen = std::collections::HashSet::new();
        for step in &self.steps {
            if step.name.is_empty() || step.name.contains('/') {
                return Err(format!(
                    "saga {}: step name {:?} must be non-empty and without '/'",
                    self.name, step.name
                ));
            }
            if !seen.insert(step.name.as_str()) {
                return Err(format!("saga {}: two steps are named {}", self.name, step.name));
            }
            if matches!(step.undo, Undo::Undeclared) {
                return Err(format!(
                    "saga {}: step {} says neither how to undo it (.compensate) nor that it cannot be undone (.cannot_be_undone)",
                    self.name, step.name
                ));
            }
            if step.timeout.is_zero() {
                return Err(format!("saga {}: step {} has a zero timeout", self.name, step.name));
            }
        }
        if self.retry.attempts == 0 {
            return Err(format!("saga {}: a retry policy needs at least one attempt", self.name));
        }
        Ok(())
    }
}
