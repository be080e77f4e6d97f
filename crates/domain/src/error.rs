use cairn_core::StoreError;

/// A stored event the code cannot turn into its domain type.
#[derive(Debug, Clone, thiserror::Error)]
#[error("cannot decode event {stream}@{version} ({event_type} v{schema_version}): {reason}")]
pub struct DecodeError {
    pub stream: String,
    pub version: u64,
    pub event_type: String,
    pub schema_version: u32,
    pub reason: String,
}

/// Why a repository operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RepositoryError<E: std::error::Error + 'static> {
    /// The aggregate refused the command: a business rule, not a failure.
    #[error("command rejected: {0}")]
    Rejected(#[source] E),

    /// Someone else appended to the stream between load and append, on every attempt.
    #[error(
        "concurrency conflict on '{stream}': decided at version {expected} but the stream is now at version {actual_version} \
         (after {attempts} attempt{}); load again and retry, or give the repository a retry policy",
        if *attempts == 1 { "" } else { "s" }
    )]
    Conflict { stream: String, expected: u64, actual_version: u64, attempts: u32 },

    /// Events matching what a decision read were appended before its own, on every attempt.
    #[error(
        "the decision's condition failed: an event it depends on was appended at position {first_conflict} \
         (after {attempts} attempt{}); decide again on fresh state, or give the decider a retry policy",
        if *attempts == 1 { "" } else { "s" }
    )]
    ConditionFailed { first_conflict: cairn_core::Position, attempts: u32 },

    #[error(transparent)]
    Decode(#[from] DecodeError),

    #[error("cannot encode an event of '{stream}': {reason}")]
    Encode { stream: String, reason: String },

    #[error(transparent)]
    Store(#[from] StoreError),
}

impl<E: std::error::Error + 'static> RepositoryError<E> {
    /// The business error, if the command was rejected.
    pub fn rejection(&self) -> Option<&E> {
        match self {
            RepositoryError::Rejected(e) => Some(e),
            _ => None,
        }
    }

    /// A concurrency conflict: a stream's expected version or a decision's condition.
    pub fn is_conflict(&self) -> bool {
        matches!(self, RepositoryError::Conflict { .. } | RepositoryError::ConditionFailed { .. })
    }
}
