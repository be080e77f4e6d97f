use cairn_core::{Position, StoreError};

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ProjectionError {
    /// The projection's own code refused an event; the projection stops there.
    #[error("projection '{projection}' failed on the event at position {position}: {reason}")]
    Handler { projection: String, position: Position, reason: String },

    #[error("read model of '{projection}': {source}")]
    Sqlite { projection: String, #[source] source: rusqlite::Error },

    #[error("I/O error on {path}: {source}")]
    Io { path: String, #[source] source: std::io::Error },

    #[error(transparent)]
    Store(#[from] StoreError),

    #[error("projection '{0}' was stopped")]
    Stopped(String),
}
