use serde::{Deserialize, Serialize};

/// Per-stream settings that reads honour. Stored as an event of type
/// `$metadata` in the stream `$$<stream>`, so they are part of the log too.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamMetadata {
    /// Events older than this many seconds are no longer returned by reads.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_age_secs: Option<u64>,
    /// Only the newest this-many events are returned by reads.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_count: Option<u64>,
    /// Events with a version below this are no longer returned by reads.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub truncate_before: Option<u64>,
}

/// Whether a stream can be read and written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StreamState {
    Live,
    /// Soft-deleted: reads as if it never existed; a new append starts it over at version 1.
    Deleted,
    /// Hard-deleted: the name is retired for good.
    Tombstoned,
}

/// Name of the system stream that holds a stream's metadata and deletion events.
pub fn metadata_stream_name(stream: &str) -> String {
    format!("$${stream}")
}
