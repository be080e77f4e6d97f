use cairn_core::{Position, StoreError};

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ProjectionError {
    /// The projection's own code refused an event; the projection stops there.
    #[error("projection '{projection}' failed on the event at position {position}: {reason}")]
    Handler { projection: String, position: Position, reason: String },

    #[cfg(feature = "sqlite")]
    #[error("read model of '{projection}': {source}")]
    Sqlite {
        projection: String,
        #[source]
        source: rusqlite::Error,
    },

    #[cfg(feature = "postgres")]
    #[error("PostgreSQL read model of '{projection}': {source}")]
    Postgres {
        projection: String,
        #[source]
        source: tokio_postgres::Error,
    },

    /// Another model of the same projection moved the stored checkpoint
    /// (two runners at once); this batch was rolled back.
    #[error(
        "read model of '{projection}': the stored checkpoint is no longer {expected:?}; another runner of this projection moved it"
    )]
    CheckpointMoved { projection: String, expected: Option<Position> },

    /// The read model cannot work where it was called.
    #[error("read model of '{projection}': {reason}")]
    Runtime { projection: String, reason: String },

    #[error("I/O error on {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },

    #[error(transparent)]
    Store(#[from] StoreError),

    #[error("projection '{0}' was stopped")]
    Stopped(String),
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum GroupError {
    /// The group's settings cannot work (an empty name, zero attempts, …).
    #[error("consumer group settings: {0}")]
    Invalid(String),

    /// The group's stored progress cannot be read back.
    #[error("consumer group '{group}': its stored state in {stream} is unreadable: {reason}")]
    Corrupt { group: String, stream: String, reason: String },

    #[error(transparent)]
    Store(#[from] StoreError),

    /// The group was stopped before the acknowledgement became durable; the
    /// event will be delivered again when the group next starts.
    #[error("consumer group '{0}' was stopped")]
    Stopped(String),
}
