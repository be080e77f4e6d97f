use crate::StoreError;

/// Longest stream name accepted, in bytes of UTF-8.
pub const STREAM_NAME_BYTES_MAX: usize = 256;

/// Limits a store enforces on input. Every limit is named and configurable.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Largest encoded event (payload, type, metadata, tags) accepted.
    pub event_bytes_max: usize,
    /// Largest total size of one append call.
    pub append_bytes_max: usize,
    /// Most events in one append call.
    pub append_events_max: usize,
    /// Longest event type name, in bytes.
    pub event_type_bytes_max: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            event_bytes_max: 16 * 1024 * 1024,
            append_bytes_max: 64 * 1024 * 1024,
            append_events_max: 10_000,
            event_type_bytes_max: 256,
        }
    }
}

/// Prefix of the streams that hold an aggregate's snapshots. They are derived
/// data, so they live among the system (`$`) streams that projections skip.
pub const SNAPSHOT_STREAM_PREFIX: &str = "$snapshots-";

/// Name of the stream that holds the snapshots of `stream`.
pub fn snapshot_stream_name(stream: &str) -> String {
    format!("{SNAPSHOT_STREAM_PREFIX}{stream}")
}

/// Checks a user stream name: not empty, at most 256 bytes, no leading `$`
/// (reserved for system streams) except for snapshot streams, no control characters.
pub fn validate_stream_name(name: &str) -> Result<(), StoreError> {
    let owner = name.strip_prefix(SNAPSHOT_STREAM_PREFIX);
    if let Some(owner) = owner {
        return validate_stream_name(owner).map_err(|e| match e {
            StoreError::InvalidStreamName { reason, .. } => {
                StoreError::InvalidStreamName { name: name.to_string(), reason: format!("the snapshot stream's owner is invalid: {reason}") }
            }
            other => other,
        });
    }
    let reason = if name.is_empty() {
        Some("a stream name cannot be empty".to_string())
    } else if name.len() > STREAM_NAME_BYTES_MAX {
        Some(format!("it is {} bytes; the limit is {STREAM_NAME_BYTES_MAX}", name.len()))
    } else if name.starts_with('$') {
        Some("names starting with '$' are reserved for system streams".to_string())
    } else if name.chars().any(char::is_control) {
        Some("it contains a control character".to_string())
    } else {
        None
    };
    match reason {
        Some(reason) => Err(StoreError::InvalidStreamName { name: name.to_string(), reason }),
        None => Ok(()),
    }
}
