//! Cairn's embedded storage engine, the default backend.
//!
//! One append-only log split into segment files of CRC-checked records, written
//! by a single group-committing writer thread; a stream index derived from the
//! log; recovery that cuts a torn tail and refuses to open a log damaged
//! anywhere else. The record layout, commit protocol and recovery rules are in
//! `docs/design.md`.

mod checkpoint;
mod idx;
mod index;
mod indexer;
mod merge;
mod options;
mod query;
mod read;
mod record;
mod recovery;
mod scrub;
mod segment;
mod shared;
mod snapshot;
mod stats;
mod storage;
mod store;
mod summaries;
mod table;
mod verify;
mod writer;

pub use merge::MergeOptions;
pub use options::Options;
pub use scrub::ScrubOptions;
pub use stats::{SYNC_BUCKETS_US, Stats};
pub use storage::{FaultyStorage, Op as FaultOp, OsStorage, Storage};
pub use store::{EmbeddedStore, OpenReport};
pub use verify::{VerifyReport, verify};
