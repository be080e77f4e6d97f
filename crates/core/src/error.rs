use crate::store::{ExpectedVersion, Position};

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// Everything an event store operation can fail with. Each variant carries what
/// the caller needs to act: the actual version on a conflict, the file and offset
/// of corruption, the limit that was exceeded.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    #[error(
        "wrong expected version for stream '{stream}': expected {expected}, actual version is {actual_version}"
    )]
    WrongExpectedVersion { stream: String, expected: ExpectedVersion, actual_version: u64 },

    #[error("append condition failed: an event matching the condition's query was appended at position {first_conflict}, after {}; read the matching events again and decide again", after.map(|p| format!("position {p}")).unwrap_or_else(|| "the start (the condition allowed no matching event at all)".into()))]
    AppendConditionFailed { first_conflict: Position, after: Option<Position> },

    #[error(
        "stream '{stream}' was deleted for good (tombstoned); its name cannot be written again"
    )]
    StreamDeleted { stream: String },

    #[error("stream '{stream}' does not exist")]
    StreamNotFound { stream: String },

    #[error("event {index} of the batch is {size_bytes} bytes; the limit is {limit_bytes} bytes")]
    EventTooLarge { index: usize, size_bytes: usize, limit_bytes: usize },

    #[error("the append is {size_bytes} bytes; the limit for one append is {limit_bytes} bytes")]
    AppendTooLarge { size_bytes: usize, limit_bytes: usize },

    #[error("invalid stream name {name:?}: {reason}")]
    InvalidStreamName { name: String, reason: String },

    #[error("invalid event: {0}")]
    InvalidEvent(String),

    #[error("invalid argument: {0}")]
    InvalidArgument(String),

    #[error(
        "event id {id} was already written {detail}; a retried append must resend exactly the same batch to the same stream"
    )]
    IdempotencyConflict { id: uuid::Uuid, detail: String },

    #[error("position {0} is not the position of an event")]
    InvalidPosition(Position),

    #[error("the store is busy: {0}; retry later")]
    Busy(String),

    #[error("the store is closed{}; nothing was written, retry later", reason.as_deref().map(|r| format!(": {r}")).unwrap_or_default())]
    Closed { reason: Option<String> },

    /// The append reached the store but its outcome is not known (the write
    /// or its sync failed, or the connection to the backend broke before it
    /// answered): it may be durable. Retrying with the same event ids is safe,
    /// since a retry of a written append is recognised and written once.
    #[error(
        "the outcome of the append is unknown ({reason}); it may have been written: retry with the same event ids"
    )]
    OutcomeUnknown { reason: String },

    #[error("data corruption in {file} at offset {offset}: {reason}")]
    Corrupt { file: String, offset: u64, reason: String },

    #[error("the data directory {dir} is in use by another process (lock file {dir}/LOCK)")]
    Locked { dir: String },

    /// A server refused the request: no or wrong credentials (`unauthorized`),
    /// or credentials that do not allow this (`forbidden`).
    #[error("access denied ({code}): {reason}")]
    AccessDenied { code: String, reason: String },

    #[error("I/O error on {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

impl StoreError {
    pub fn io(path: impl AsRef<std::path::Path>, source: std::io::Error) -> Self {
        StoreError::Io { path: path.as_ref().display().to_string(), source }
    }

    /// Whether resending the same request (with the same event ids) later may
    /// succeed: the store was busy, closed or unreachable, or the outcome is unknown.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            StoreError::Busy(_) | StoreError::Closed { .. } | StoreError::OutcomeUnknown { .. }
        )
    }

    /// True for errors that say "your request is wrong", as opposed to "the store failed".
    pub fn is_client_error(&self) -> bool {
        matches!(
            self,
            StoreError::WrongExpectedVersion { .. }
                | StoreError::AppendConditionFailed { .. }
                | StoreError::StreamDeleted { .. }
                | StoreError::StreamNotFound { .. }
                | StoreError::EventTooLarge { .. }
                | StoreError::AppendTooLarge { .. }
                | StoreError::InvalidStreamName { .. }
                | StoreError::AccessDenied { .. }
                | StoreError::InvalidEvent(_)
                | StoreError::InvalidArgument(_)
                | StoreError::IdempotencyConflict { .. }
                | StoreError::InvalidPosition(_)
        )
    }
}
