//! Event sourcing for application code.
//!
//! Write the domain as plain Rust types: an [`Aggregate`] decides which events a
//! command produces and evolves its state one event at a time. A [`Repository`]
//! loads aggregates by replaying their stream (from a snapshot when there is one),
//! executes commands with optimistic concurrency and an optional retry policy, and
//! answers temporal questions: the state at a version, position or time, the full
//! history as (event, state after) pairs, and what-if branches kept in memory.
//!
//! A [`Dispatcher`] routes typed commands to their aggregates, keeping invalid
//! input, rejected commands and concurrency conflicts apart.
//!
//! Rules that span entities use a [`Decider`]: [`DecisionModel`]s declare the
//! tag query they need and a fold; the decider appends on the condition that
//! nothing matching their combined query changed since it read.
//!
//! Stored events keep the schema version they were written with; [`Upcasters`]
//! bring old versions up to date on read, and [`census`] counts what is stored at
//! each version.

mod aggregate;
mod census;
mod codec;
mod decision;
mod dispatch;
mod error;
mod repository;
mod snapshot;
mod travel;
mod upcast;

pub use aggregate::{Aggregate, DomainEvent};
pub use census::{Census, census};
pub use codec::{EventCodec, Upcasted};
pub use decision::{Decided, Decider, DecisionModel, DecisionModels, DecisionOutcome};
pub use dispatch::{DispatchError, Dispatched, Dispatcher, Invalid, Validate};
pub use error::{DecodeError, RepositoryError};
pub use repository::{CommandContext, Executed, Loaded, Repository, RetryPolicy};
pub use snapshot::SnapshotPolicy;
pub use travel::{At, Branch, Comparison, Difference, HistoryEntry};
pub use upcast::Upcasters;
