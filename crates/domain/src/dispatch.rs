//! The command side's front door: a [`Dispatcher`] routes typed commands to
//! the aggregates that handle them, through their repositories.
//!
//! Three kinds of failure stay apart, because callers answer them differently:
//! an **invalid** command (bad input, checked before anything is loaded: fix
//! the request), a **rejected** one (a business rule said no in the current
//! state: tell the user), and a **conflict** (someone else changed the
//! aggregate first, on every attempt: retry later).

use std::any::{Any, TypeId, type_name};
use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use cairn_core::{Position, StoreError};

use crate::{Aggregate, CommandContext, DecodeError, Repository, RepositoryError};

/// A command's own checks on its input, made before the aggregate is loaded
/// (amounts positive, names not empty). Business rules that depend on state
/// belong in [`Aggregate::decide`].
pub trait Validate {
    fn validate(&self) -> Result<(), Invalid> {
        Ok(())
    }
}

/// Why a command's input is not acceptable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {field}: {reason}")]
pub struct Invalid {
    /// The field (or argument) at fault.
    pub field: String,
    pub reason: String,
}

impl Invalid {
    pub fn new(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Invalid { field: field.into(), reason: reason.into() }
    }
}

/// Why a dispatched command did not take effect.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DispatchError {
    /// The command's input is wrong; nothing was loaded or written.
    #[error("{command} is invalid: {invalid}")]
    Invalid { command: &'static str, invalid: Invalid },

    /// The aggregate's rules refused it. `reason` is the aggregate's own error:
    /// `reason.downcast_ref::<MyError>()` gets it back typed.
    #[error("{command} was rejected by {stream}: {reason}")]
    Rejected {
        command: &'static str,
        stream: String,
        reason: Box<dyn std::error::Error + Send + Sync>,
    },

    /// Others kept changing the aggregate between load and append on every attempt.
    #[error(
        "{command} on {stream} lost to concurrent changes after {attempts} attempt(s): the stream moved from version {expected} to {actual_version}; retry it"
    )]
    Conflict {
        command: &'static str,
        stream: String,
        expected: u64,
        actual_version: u64,
        attempts: u32,
    },

    /// No aggregate was routed for this command type.
    #[error("no aggregate handles {command}; register one with Dispatcher::route")]
    NoRoute { command: &'static str },

    #[error(transparent)]
    Decode(#[from] DecodeError),

    #[error("{0}")]
    Encode(String),

    #[error(transparent)]
    Store(#[from] StoreError),
}

impl DispatchError {
    pub fn is_conflict(&self) -> bool {
        matches!(self, DispatchError::Conflict { .. })
    }
}

/// What a dispatched command did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dispatched {
    pub stream: String,
    /// Events appended (0: the command changed nothing).
    pub events: usize,
    /// The stream's version after the command.
    pub version: u64,
    /// Position of the last event appended.
    pub position: Option<Position>,
    pub attempts: u32,
}

/// A command type's name without its module path (`PlaceOrder`).
fn command_name<C>() -> &'static str {
    let full = type_name::<C>();
    full.rsplit("::").next().unwrap_or(full)
}

type Pending<'a> = Pin<Box<dyn Future<Output = Result<Dispatched, DispatchError>> + Send + 'a>>;

/// One route, erased to its command type.
trait Route<C>: Send + Sync {
    fn handle<'a>(&'a self, id: &'a str, command: &'a C, context: CommandContext) -> Pending<'a>;
}

impl<A: Aggregate> Route<A::Command> for Repository<A> {
    fn handle<'a>(
        &'a self,
        id: &'a str,
        command: &'a A::Command,
        context: CommandContext,
    ) -> Pending<'a> {
        Box::pin(async move {
            let name = command_name::<A::Command>();
            match self.execute_with(id, command, &context).await {
                Ok(done) => Ok(Dispatched {
                    stream: A::stream_name(id),
                    events: done.events.len(),
                    version: done.version,
                    position: done.position,
                    attempts: done.attempts,
                }),
                Err(RepositoryError::Rejected(reason)) => Err(DispatchError::Rejected {
                    command: name,
                    stream: A::stream_name(id),
                    reason: Box::new(reason),
                }),
                Err(RepositoryError::Conflict { stream, expected, actual_version, attempts }) => {
                    Err(DispatchError::Conflict {
                        command: name,
                        stream,
                        expected,
                        actual_version,
                        attempts,
                    })
                }
                Err(RepositoryError::Decode(e)) => Err(e.into()),
                Err(RepositoryError::Store(e)) => Err(e.into()),
                Err(other) => Err(DispatchError::Encode(other.to_string())),
            }
        })
    }
}

/// Routes each command type to the repository of the aggregate that handles it.
#[derive(Default, Clone)]
pub struct Dispatcher {
    routes: HashMap<TypeId, Arc<dyn Any + Send + Sync>>,
}

impl Dispatcher {
    pub fn new() -> Self {
        Self::default()
    }

    /// Sends `A::Command`s to `repository` (its snapshot, cache and retry settings apply).
    /// A later route for the same command type replaces the earlier one.
    pub fn route<A: Aggregate>(mut self, repository: Repository<A>) -> Self
    where
        A::Command: Validate + 'static,
    {
        let route: Arc<dyn Route<A::Command>> = Arc::new(repository);
        self.routes.insert(TypeId::of::<A::Command>(), Arc::new(route));
        self
    }

    /// Validates `command`, then executes it on aggregate `id`.
    pub async fn dispatch<C: Validate + 'static>(
        &self,
        id: &str,
        command: &C,
    ) -> Result<Dispatched, DispatchError> {
        self.dispatch_with(id, command, CommandContext::new()).await
    }

    /// [`Dispatcher::dispatch`] with ids, metadata and a retry policy for the events.
    pub async fn dispatch_with<C: Validate + 'static>(
        &self,
        id: &str,
        command: &C,
        context: CommandContext,
    ) -> Result<Dispatched, DispatchError> {
        let name = command_name::<C>();
        command.validate().map_err(|invalid| DispatchError::Invalid { command: name, invalid })?;
        let route = self
            .routes
            .get(&TypeId::of::<C>())
            .and_then(|r| r.downcast_ref::<Arc<dyn Route<C>>>())
            .ok_or(DispatchError::NoRoute { command: name })?;
        route.handle(id, command, context).await
    }
}
