use std::fmt;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// Event type of the snapshots stored in `$snapshots-<stream>`.
pub(crate) const SNAPSHOT_EVENT_TYPE: &str = "Snapshot";

/// When the repository stores a snapshot of an aggregate after a command.
///
/// Snapshots are derived data: each records the state and the version (and
/// event id) it covers. Loading starts from the newest valid one and replays
/// only later events; deleting them all changes nothing but speed.
/// The predicate of [`SnapshotPolicy::When`]: the new state and the
/// stream's versions before and after the command.
pub(crate) type SnapshotWhen<A> = dyn Fn(&A, u64, u64) -> bool + Send + Sync;

pub enum SnapshotPolicy<A> {
    Never,
    /// Whenever the stream's version crosses a multiple of N.
    Every(u64),
    /// When the predicate, given the new state and the versions before and
    /// after the command, says so.
    When(Arc<SnapshotWhen<A>>),
}

impl<A> SnapshotPolicy<A> {
    pub fn every(events: u64) -> Self {
        SnapshotPolicy::Every(events.max(1))
    }

    pub fn when(predicate: impl Fn(&A, u64, u64) -> bool + Send + Sync + 'static) -> Self {
        SnapshotPolicy::When(Arc::new(predicate))
    }

    pub(crate) fn enabled(&self) -> bool {
        !matches!(self, SnapshotPolicy::Never)
    }

    /// Whether a command that took the stream from `before` to `after` should leave a snapshot.
    pub(crate) fn wants(&self, state: &A, before: u64, after: u64) -> bool {
        match self {
            SnapshotPolicy::Never => false,
            SnapshotPolicy::Every(n) => after / n > before / n,
            SnapshotPolicy::When(p) => p(state, before, after),
        }
    }
}

/// The default: a snapshot every 100 events.
impl<A> Default for SnapshotPolicy<A> {
    fn default() -> Self {
        SnapshotPolicy::Every(100)
    }
}

impl<A> Clone for SnapshotPolicy<A> {
    fn clone(&self) -> Self {
        match self {
            SnapshotPolicy::Never => SnapshotPolicy::Never,
            SnapshotPolicy::Every(n) => SnapshotPolicy::Every(*n),
            SnapshotPolicy::When(p) => SnapshotPolicy::When(p.clone()),
        }
    }
}

impl<A> fmt::Debug for SnapshotPolicy<A> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SnapshotPolicy::Never => f.write_str("Never"),
            SnapshotPolicy::Every(n) => write!(f, "Every({n})"),
            SnapshotPolicy::When(_) => f.write_str("When(..)"),
        }
    }
}

/// The payload of a snapshot event. The event's schema version is the
/// aggregate's `SNAPSHOT_VERSION`.
#[derive(Serialize, Deserialize)]
pub(crate) struct SnapshotBody<S> {
    /// The stream version whose state this is.
    pub covers_version: u64,
    /// The id of the event at that version: if the stream was deleted and
    /// started over, the ids differ and the snapshot is not trusted.
    pub covers_event: Uuid,
    pub state: S,
}
