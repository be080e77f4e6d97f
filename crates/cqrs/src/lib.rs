//! The read side: projections that turn events into read models.
//!
//! A projection is a named handler of events. Its read model and its
//! checkpoint (the position of the last event applied) are written together,
//! in one transaction, so a crash at any point resumes without missing or
//! double-applying an event. Read models live in memory ([`MemoryModel`]) or
//! in a SQLite file whose schema the projection controls ([`SqliteModel`]) or
//! in PostgreSQL tables the application owns ([`PgModel`]).
//! A [`Runner`] follows the store (catch-up, then live), reports its status
//! and lag, and can be paused, resumed and reset; [`rebuild`] replays a
//! projection from the start into a fresh model. A [`Group`] shares one
//! subscription among competing workers, with acks, retries and a dead-letter stream.
//!
//! Features (both on by default): `sqlite` for [`SqliteModel`] (bundled
//! SQLite, which compiles C), `postgres` for [`PgModel`]. Without them the
//! in-memory model, runners, rebuilds and consumer groups are all there.

mod error;
mod group;
mod memory;
#[cfg(feature = "postgres")]
mod postgres;
mod runner;
mod sink;
mod source;
#[cfg(feature = "sqlite")]
mod sqlite;

pub use error::{GroupError, ProjectionError};
pub use group::{
    Delivery, Group, GroupConfig, GroupStatus, Nacked, Parked, StoredGroup, Worker,
    group_stream_name, parked_stream_name, read_parked, request_replay, stored_groups,
};
pub use memory::{MemoryModel, MemoryProjection};
#[cfg(feature = "postgres")]
pub use postgres::{PgModel, PgProjection, pg_request, pg_stored_checkpoints};
pub use runner::{Lag, Progress, Runner, RunnerHandle, State, Status, lag, rebuild};
pub use sink::{Requested, Sink, StoredCheckpoint, blocking};
pub use source::Source;
#[cfg(feature = "sqlite")]
pub use sqlite::{SqliteModel, SqliteProjection, request, stored_checkpoints};

/// Where SQLite read model files go in a data directory, by convention:
/// `cairn projections` looks there unless told otherwise.
pub fn read_models_dir(data: &std::path::Path) -> std::path::PathBuf {
    data.join("read-models")
}
