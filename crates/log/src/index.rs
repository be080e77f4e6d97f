//! The index: derived from the log, never the source of truth. It maps each
//! stream to its events' positions, each event id to its position, and, for
//! queries, each tag, each event type and each stream category to the
//! positions of the user events that carry it. Recovery rebuilds it by applying every record in order; the
//! writer applies each durable group with the same [`Index::apply`], so both
//! paths agree.

use std::collections::HashMap;

use cairn_core::{stream_category, StreamMetadata, StreamState};

use crate::record::RecordView;

pub const METADATA_EVENT: &str = "$metadata";
pub const DELETED_EVENT: &str = "$deleted";
pub const TOMBSTONE_EVENT: &str = "$tombstone";

#[derive(Debug, Clone)]
pub struct StreamEntry {
    /// Position of each event of the current incarnation: version v at [v-1].
    pub positions: Vec<u64>,
    /// Timestamp (µs) of each event, for max-age and time lookups.
    pub timestamps: Vec<i64>,
    pub state: StreamState,
    pub metadata: StreamMetadata,
}

impl Default for StreamEntry {
    fn default() -> Self {
        StreamEntry { positions: Vec::new(), timestamps: Vec::new(), state: StreamState::Live, metadata: StreamMetadata::default() }
    }
}

impl StreamEntry {
    pub fn version(&self) -> u64 {
        self.positions.len() as u64
    }

    /// First version reads may return, given the metadata and the time `now_us`.
    pub fn first_visible_version(&self, now_us: i64) -> u64 {
        let version = self.version();
        let mut first = self.metadata.truncate_before.unwrap_or(1).max(1);
        if let Some(max_count) = self.metadata.max_count {
            first = first.max(version.saturating_sub(max_count) + 1);
        }
        if let Some(max_age) = self.metadata.max_age_secs {
            // A max age past i64 microseconds (about 292,000 years) hides nothing.
            let max_age_us = i64::try_from(max_age).unwrap_or(i64::MAX).saturating_mul(1_000_000);
            let oldest_us = now_us.saturating_sub(max_age_us);
            // Timestamps never decrease within the log, so a binary search works.
            let older = self.timestamps.partition_point(|t| *t < oldest_us) as u64;
            first = first.max(older + 1);
        }
        first
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_huge_max_age_hides_nothing() {
        let mut entry = StreamEntry { positions: vec![10, 20, 30], timestamps: vec![1, 2, 3], ..Default::default() };
        for max_age in [1u64 << 62, 1 << 63, u64::MAX] {
            entry.metadata.max_age_secs = Some(max_age);
            assert_eq!(entry.first_visible_version(1_000_000_000), 1, "max_age_secs {max_age}");
        }
        entry.metadata.max_age_secs = Some(1);
        assert_eq!(entry.first_visible_version(10_000_000), 4, "a short max age still hides old events");
    }
}

pub type FastMap<K, V> = HashMap<K, V, foldhash::fast::RandomState>;

#[derive(Default)]
pub struct Index {
    pub streams: FastMap<String, StreamEntry>,
    /// Event id → global position, for idempotent retries and unique ids.
    pub ids: FastMap<u128, u64>,
    /// Tag → positions of the events of user streams that carry it, ascending.
    pub tags: FastMap<String, Vec<u64>>,
    /// Event type → positions of the events of user streams of that type, ascending.
    pub types: FastMap<String, Vec<u64>>,
    /// Stream category → positions of the events of its streams, ascending.
    pub categories: FastMap<String, Vec<u64>>,
    pub events: u64,
}

/// Appends `position` to the list of `key`, creating it if needed. Positions
/// arrive in log order, so lists stay sorted; a tag written twice on one
/// event (possible in logs older than the tag checks) is indexed once.
fn push_position(map: &mut FastMap<String, Vec<u64>>, key: &str, position: u64) {
    match map.get_mut(key) {
        Some(list) => {
            debug_assert!(list.last().is_none_or(|p| *p <= position), "positions strictly increase");
            if list.last() != Some(&position) {
                list.push(position);
            }
        }
        None => {
            map.insert(key.to_string(), vec![position]);
        }
    }
}

/// An index update that does not fit the log: a bug or undetected corruption.
#[derive(Debug)]
pub struct IndexError(pub String);

impl Index {
    /// Version and state a new append to `stream` sees.
    pub fn current(&self, stream: &str) -> (u64, StreamState) {
        match self.streams.get(stream) {
            Some(e) => (e.version(), e.state),
            None => (0, StreamState::Live),
        }
    }

    pub fn apply(&mut self, r: &RecordView<'_>, position: u64) -> Result<(), IndexError> {
        if !self.streams.contains_key(r.stream) {
            self.streams.insert(r.stream.to_string(), StreamEntry::default());
        }
        let entry = self.streams.get_mut(r.stream).expect("inserted above");
        let expected = entry.version() + 1;
        if r.version != expected {
            return Err(IndexError(format!(
                "event at position {position} has version {} in stream '{}', expected {expected}",
                r.version, r.stream
            )));
        }
        entry.positions.push(position);
        entry.timestamps.push(r.timestamp.0);
        entry.state = StreamState::Live;
        if self.ids.insert(r.id.as_u128(), position).is_some() {
            return Err(IndexError(format!("event id {} at position {position} was already used", r.id)));
        }
        self.events += 1;
        if let Some(target) = r.stream.strip_prefix("$$") {
            self.apply_system(target, r, position)?;
        }
        // Queries match the events of user streams only.
        if !r.stream.starts_with('$') {
            push_position(&mut self.types, r.event_type, position);
            if let Some(category) = stream_category(r.stream) {
                push_position(&mut self.categories, category, position);
            }
            for tag in r.tags() {
                push_position(&mut self.tags, tag, position);
            }
        }
        Ok(())
    }

    fn apply_system(&mut self, target: &str, r: &RecordView<'_>, position: u64) -> Result<(), IndexError> {
        let entry = self.streams.entry(target.to_string()).or_default();
        match r.event_type {
            METADATA_EVENT => {
                entry.metadata = serde_json::from_slice(r.data)
                    .map_err(|e| IndexError(format!("stream metadata at position {position} does not parse: {e}")))?;
            }
            DELETED_EVENT | TOMBSTONE_EVENT => {
                entry.positions = Vec::new();
                entry.timestamps = Vec::new();
                entry.metadata = StreamMetadata::default();
                entry.state = if r.event_type == DELETED_EVENT { StreamState::Deleted } else { StreamState::Tombstoned };
            }
            _ => {}
        }
        Ok(())
    }
}
