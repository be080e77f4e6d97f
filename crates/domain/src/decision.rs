//! Decisions across entities (Dynamic Consistency Boundaries): a decision
//! model declares the events it needs as a tag [`Query`] and folds them into a
//! state; a [`Decider`] reads the combined query of one or more models, lets a
//! function decide on their states, and appends with the condition that no
//! event matching that query was appended since it read.

use std::convert::Infallible;
use std::sync::Arc;

use cairn_core::{
    AppendCondition, EventStore, ExpectedVersion, Position, Query, ReadAllOptions, StoreError,
};

use crate::{CommandContext, DomainEvent, EventCodec, RepositoryError, RetryPolicy};

/// Events read per call while folding.
const PAGE: usize = 4096;

/// The state one rule needs, built from the events matching its query, such
/// as "how many students course cs101 has" (query: `StudentSubscribed` tagged
/// `course:cs101`).
pub trait DecisionModel<E>: Send + Sync {
    type State: Send;
    /// The events this model depends on. Every matching event must decode as `E`.
    fn query(&self) -> Query;
    fn initial_state(&self) -> Self::State;
    fn evolve(&self, state: Self::State, event: &E) -> Self::State;
}

/// Models decided on together: tuples of one to four [`DecisionModel`]s.
/// Each model sees only the events matching its own query.
pub trait DecisionModels<E>: Send + Sync {
    type States: Send;
    /// One query per model, in order.
    fn queries(&self) -> Vec<Query>;
    fn initial_states(&self) -> Self::States;
    /// Applies `event` to the models whose query matched it (`matched[i]`).
    fn evolve(&self, states: Self::States, matched: &[bool], event: &E) -> Self::States;
}

macro_rules! tuple_models {
    ($($m:ident $i:tt),+) => {
        impl<E, $($m: DecisionModel<E>),+> DecisionModels<E> for ($($m,)+) {
            type States = ($($m::State,)+);
            fn queries(&self) -> Vec<Query> {
                vec![$(self.$i.query()),+]
            }
            fn initial_states(&self) -> Self::States {
                ($(self.$i.initial_state(),)+)
            }
            fn evolve(&self, states: Self::States, matched: &[bool], event: &E) -> Self::States {
                ($(if matched[$i] { self.$i.evolve(states.$i, event) } else { states.$i },)+)
            }
        }
    };
}

tuple_models!(A 0);
tuple_models!(A 0, B 1);
tuple_models!(A 0, B 1, C 2);
tuple_models!(A 0, B 1, C 2, D 3);

/// The models' states and what the append condition needs.
#[derive(Debug, Clone)]
pub struct Decided<S> {
    pub states: S,
    /// The union of the models' queries.
    pub query: Query,
    /// The newest position the decision took into account.
    pub after: Option<Position>,
    /// Events folded.
    pub events_read: usize,
}

impl<S> Decided<S> {
    /// "Fail if anything this decision read has changed since."
    pub fn condition(&self) -> AppendCondition {
        AppendCondition::new(self.query.clone(), self.after)
    }
}

/// What a successful [`Decider::execute`] did.
#[derive(Debug, Clone)]
pub struct DecisionOutcome<E> {
    pub events: Vec<E>,
    /// Position of the last event appended (none if the decision produced no event).
    pub position: Option<Position>,
    pub attempts: u32,
}

/// Runs decisions over tag queries, for the events of domain type `E`.
///
/// A rule across streams: a course takes at most two students, whoever
/// subscribes them. Every decision reads the course's events by tag and
/// appends on the condition that none was added meanwhile.
///
/// ```
/// use std::sync::Arc;
/// use cairn_core::{Query, QueryItem};
/// use cairn_domain::{CommandContext, DecisionModel, Decider, DomainEvent, RepositoryError};
/// use serde::{Deserialize, Serialize};
///
/// #[derive(Debug, Clone, Serialize, Deserialize)]
/// enum Event { Subscribed { student: String, course: String } }
/// impl DomainEvent for Event {
///     fn tags(&self) -> Vec<String> {
///         let Event::Subscribed { course, .. } = self;
///         vec![format!("course:{course}")]
///     }
/// }
///
/// /// How many students a course has.
/// struct Taken(&'static str);
/// impl DecisionModel<Event> for Taken {
///     type State = u32;
///     fn query(&self) -> Query {
///         QueryItem::types(["Subscribed"]).with_tags([format!("course:{}", self.0)]).into()
///     }
///     fn initial_state(&self) -> u32 { 0 }
///     fn evolve(&self, taken: u32, _: &Event) -> u32 { taken + 1 }
/// }
///
/// #[derive(Debug)]
/// struct Full;
/// impl std::fmt::Display for Full {
///     fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result { f.write_str("full") }
/// }
/// impl std::error::Error for Full {}
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let dir = tempfile::tempdir()?;
/// let decider = Decider::<Event>::new(Arc::new(cairn_log::EmbeddedStore::open(dir.path())?));
/// let mut refused = 0;
/// for student in ["ada", "alan", "grace"] {
///     let subscribe = |(taken,): &(u32,)| match *taken {
///         0 | 1 => Ok(vec![Event::Subscribed { student: student.into(), course: "cs101".into() }]),
///         _ => Err(Full),
///     };
///     let ctx = CommandContext::new();
///     match decider.execute(&(Taken("cs101"),), &format!("student-{student}"), &ctx, subscribe).await {
///         Ok(_) => {}
///         Err(RepositoryError::Rejected(Full)) => refused += 1,
///         Err(e) => return Err(e.into()),
///     }
/// }
/// assert_eq!(refused, 1);
/// # Ok(())
/// # }
/// ```
pub struct Decider<E: DomainEvent> {
    store: Arc<dyn EventStore>,
    codec: Arc<EventCodec<E>>,
    retry: RetryPolicy,
}

impl<E: DomainEvent> Clone for Decider<E> {
    fn clone(&self) -> Self {
        Decider { store: self.store.clone(), codec: self.codec.clone(), retry: self.retry }
    }
}

impl<E: DomainEvent> Decider<E> {
    /// A decider on `store` that does not retry a failed condition.
    pub fn new(store: Arc<dyn EventStore>) -> Self {
        Decider { store, codec: Arc::new(EventCodec::new()), retry: RetryPolicy::none() }
    }

    /// Decide again, on fresh states, when the condition fails.
    pub fn with_retry(mut self, retry: RetryPolicy) -> Self {
        self.retry = retry;
        self
    }

    pub fn store(&self) -> &Arc<dyn EventStore> {
        &self.store
    }

    /// Reads the events matching the models' combined query and folds each
    /// into the models whose own query it matches.
    pub async fn load<M: DecisionModels<E>>(
        &self,
        models: &M,
    ) -> Result<Decided<M::States>, RepositoryError<Infallible>> {
        self.fold(models).await
    }

    async fn fold<M: DecisionModels<E>, Err: std::error::Error + 'static>(
        &self,
        models: &M,
    ) -> Result<Decided<M::States>, RepositoryError<Err>> {
        let queries = models.queries();
        let query = Query::new(queries.iter().flat_map(|q| q.items.iter().cloned()));
        // Taken first: an event appended while we read lies after it.
        let last_before = self.store.last_position().await?;
        let mut states = models.initial_states();
        let mut newest = None;
        let mut events_read = 0;
        let mut options = ReadAllOptions::forward().limit(PAGE);
        let mut matched = vec![false; queries.len()];
        loop {
            let page = self.store.read_query(&query, options).await?;
            for stored in &page {
                for (m, q) in matched.iter_mut().zip(&queries) {
                    *m = q.matches_event(stored);
                }
                let event = self.codec.decode(stored)?;
                states = models.evolve(states, &matched, &event);
                newest = Some(stored.position);
                events_read += 1;
            }
            match page.last() {
                Some(last) if page.len() == PAGE => {
                    options = ReadAllOptions::forward().after(last.position).limit(PAGE)
                }
                _ => break,
            }
        }
        Ok(Decided { states, query, after: last_before.max(newest), events_read })
    }

    /// Loads the models, calls `decide` with their states, and appends the
    /// events it returns to `stream` on the condition that nothing the models
    /// read has changed. On a failed condition, runs again while the retry
    /// policy allows, else returns [`RepositoryError::ConditionFailed`].
    pub async fn execute<M, F, Err>(
        &self,
        models: &M,
        stream: &str,
        context: &CommandContext,
        decide: F,
    ) -> Result<DecisionOutcome<E>, RepositoryError<Err>>
    where
        M: DecisionModels<E>,
        F: Fn(&M::States) -> Result<Vec<E>, Err>,
        Err: std::error::Error + 'static,
    {
        let retry = context.retry.unwrap_or(self.retry);
        let mut attempt = 0;
        loop {
            attempt += 1;
            let decided = self.fold(models).await?;
            let events = decide(&decided.states).map_err(RepositoryError::Rejected)?;
            if events.is_empty() {
                return Ok(DecisionOutcome { events, position: None, attempts: attempt });
            }
            let metadata = context.metadata();
            let mut batch = Vec::with_capacity(events.len());
            for event in &events {
                let new = self.codec.encode(event).map_err(|reason| RepositoryError::Encode {
                    stream: stream.to_string(),
                    reason,
                })?;
                batch.push(new.with_metadata(metadata.clone()));
            }
            match self
                .store
                .append_if(stream, ExpectedVersion::Any, batch, decided.condition())
                .await
            {
                Ok(result) => {
                    return Ok(DecisionOutcome {
                        events,
                        position: Some(result.position),
                        attempts: attempt,
                    });
                }
                Err(StoreError::AppendConditionFailed { first_conflict, .. }) => {
                    if attempt >= retry.attempts {
                        return Err(RepositoryError::ConditionFailed {
                            first_conflict,
                            attempts: attempt,
                        });
                    }
                    retry.wait(attempt).await;
                }
                Err(e) => return Err(e.into()),
            }
        }
    }
}
