use crate::{ContentType, NewEvent, Query, StoreError};

/// Longest stream name accepted, in bytes of UTF-8.
pub const STREAM_NAME_BYTES_MAX: usize = 256;

/// Longest tag accepted, in bytes of UTF-8.
pub const TAG_BYTES_MAX: usize = 256;

/// Most items in one query (each item costs a walk of the index).
pub const QUERY_ITEMS_MAX: usize = 64;

/// Most types, most tags, and most categories in one query item.
pub const QUERY_ITEM_TERMS_MAX: usize = 64;

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
    /// Most tags on one event (each is an index entry).
    pub event_tags_max: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            event_bytes_max: 16 * 1024 * 1024,
            append_bytes_max: 64 * 1024 * 1024,
            append_events_max: 10_000,
            event_type_bytes_max: 256,
            event_tags_max: 32,
        }
    }
}

impl Limits {
    /// Checks a batch to append to `stream`: not empty, within the count,
    /// type, tag and size limits, ids unique and not nil, JSON payloads
    /// valid, `$` types only in `$$` streams. `size` gives an event's stored
    /// size in the backend's own encoding; returns the batch's total.
    pub fn check_batch(&self, stream: &str, events: &[NewEvent], size: impl Fn(&NewEvent) -> usize) -> Result<usize, StoreError> {
        if events.is_empty() {
            return Err(StoreError::InvalidEvent("an append needs at least one event".into()));
        }
        if events.len() > self.append_events_max {
            return Err(StoreError::InvalidEvent(format!("{} events in one append; the limit is {}", events.len(), self.append_events_max)));
        }
        let mut total = 0;
        let mut seen = std::collections::HashSet::with_capacity(events.len());
        for (i, e) in events.iter().enumerate() {
            let bad = |what: String| Err(StoreError::InvalidEvent(format!("event {i}: {what}")));
            if e.event_type.is_empty() {
                return bad("the event type is empty".into());
            }
            if e.event_type.len() > self.event_type_bytes_max {
                return bad(format!("the event type is {} bytes; the limit is {}", e.event_type.len(), self.event_type_bytes_max));
            }
            if e.event_type.starts_with('$') && !stream.starts_with("$$") {
                return bad("event types starting with '$' are reserved for the store".into());
            }
            if e.id.is_nil() {
                return bad("the event id is the nil UUID".into());
            }
            if !seen.insert(e.id) {
                return bad(format!("event id {} appears twice in the batch", e.id));
            }
            if e.content_type == ContentType::Json && serde_json::from_slice::<serde::de::IgnoredAny>(&e.data).is_err() {
                return bad("the payload is marked as JSON but is not valid JSON".into());
            }
            self.check_tags(i, &e.tags)?;
            if e.metadata.extra.len() > u16::MAX as usize {
                return bad("too many metadata entries".into());
            }
            if e.metadata.extra.keys().any(|s| s.len() > u16::MAX as usize) {
                return bad("a metadata key is longer than 65535 bytes".into());
            }
            let size = size(e);
            if size > self.event_bytes_max {
                return Err(StoreError::EventTooLarge { index: i, size_bytes: size, limit_bytes: self.event_bytes_max });
            }
            total += size;
        }
        if total > self.append_bytes_max {
            return Err(StoreError::AppendTooLarge { size_bytes: total, limit_bytes: self.append_bytes_max });
        }
        Ok(total)
    }

    /// Checks the tags of event `index` of a batch: each valid
    /// ([`validate_tag`]), none twice, at most `event_tags_max` of them.
    pub fn check_tags(&self, index: usize, tags: &[String]) -> Result<(), StoreError> {
        let bad = |what: String| Err(StoreError::InvalidEvent(format!("event {index}: {what}")));
        if tags.len() > self.event_tags_max {
            return bad(format!("it has {} tags; the limit is {}", tags.len(), self.event_tags_max));
        }
        for (i, tag) in tags.iter().enumerate() {
            if let Err(reason) = validate_tag(tag) {
                return bad(format!("invalid tag {tag:?}: {reason}"));
            }
            if tags[..i].contains(tag) {
                return bad(format!("tag {tag:?} appears twice"));
            }
        }
        Ok(())
    }

    /// Checks a query: at least one item, at most [`QUERY_ITEMS_MAX`], each
    /// with at most [`QUERY_ITEM_TERMS_MAX`] types, tags and categories, every
    /// type a possible event type, every tag a valid tag and every category
    /// a possible one ([`validate_category`]).
    pub fn check_query(&self, query: &Query) -> Result<(), StoreError> {
        let bad = |what: String| Err(StoreError::InvalidArgument(format!("invalid query: {what}")));
        if query.items.is_empty() {
            return bad("it has no items, so it could match nothing; use Query::all() to match every event".into());
        }
        if query.items.len() > QUERY_ITEMS_MAX {
            return bad(format!("it has {} items; the limit is {QUERY_ITEMS_MAX}", query.items.len()));
        }
        for (i, item) in query.items.iter().enumerate() {
            if item.types.len().max(item.tags.len()).max(item.categories.len()) > QUERY_ITEM_TERMS_MAX {
                return bad(format!(
                    "item {i} has {} types, {} tags and {} categories; the limit is {QUERY_ITEM_TERMS_MAX} of each",
                    item.types.len(), item.tags.len(), item.categories.len()
                ));
            }
            for t in &item.types {
                if t.is_empty() || t.len() > self.event_type_bytes_max || t.chars().any(char::is_control) {
                    return bad(format!("item {i}: {t:?} is not a valid event type (1 to {} bytes, no control characters)", self.event_type_bytes_max));
                }
            }
            for tag in &item.tags {
                if let Err(reason) = validate_tag(tag) {
                    return bad(format!("item {i}: invalid tag {tag:?}: {reason}"));
                }
            }
            for category in &item.categories {
                if let Err(reason) = validate_category(category) {
                    return bad(format!("item {i}: invalid category {category:?}: {reason}"));
                }
            }
        }
        Ok(())
    }
}

/// Checks one tag: not empty, at most [`TAG_BYTES_MAX`] bytes, no control
/// characters. Returns why not.
pub fn validate_tag(tag: &str) -> Result<(), String> {
    if tag.is_empty() {
        Err("a tag cannot be empty".into())
    } else if tag.len() > TAG_BYTES_MAX {
        Err(format!("it is {} bytes; the limit is {TAG_BYTES_MAX}", tag.len()))
    } else if tag.chars().any(char::is_control) {
        Err("it contains a control character".into())
    } else {
        Ok(())
    }
}

/// Checks a category in a query: a name some user stream could have as its
/// category ([`crate::stream_category`]), so one that could match nothing is
/// an error rather than an empty result. Returns why not.
pub fn validate_category(category: &str) -> Result<(), String> {
    if category.is_empty() {
        Err("a category cannot be empty".into())
    } else if category.contains('-') {
        Err("a category is the part of a stream name before the first '-', so it has no '-'".into())
    } else if category.starts_with('$') {
        Err("streams starting with '$' belong to no category".into())
    } else if category.len() >= STREAM_NAME_BYTES_MAX {
        Err(format!("it is {} bytes; stream names have at most {STREAM_NAME_BYTES_MAX}", category.len()))
    } else if category.chars().any(char::is_control) {
        Err("it contains a control character".into())
    } else {
        Ok(())
    }
}

/// Prefix of the streams that hold an aggregate's snapshots. They are derived
/// data, so they live among the system (`$`) streams that projections skip.
pub const SNAPSHOT_STREAM_PREFIX: &str = "$snapshots-";

/// Prefix of the stream that holds a consumer group's acknowledged progress.
pub const GROUP_STREAM_PREFIX: &str = "$group-";

/// Prefix of a consumer group's dead-letter stream: the events it parked.
pub const PARKED_STREAM_PREFIX: &str = "$parked-";

/// Prefix of the stream that holds a relay's checkpoint (what it has published).
pub const RELAY_STREAM_PREFIX: &str = "$relay-";

/// Prefix of a saga's or process manager's own state stream (and of a saga
/// runner's checkpoint stream): `$saga-order-42`.
pub const SAGA_STREAM_PREFIX: &str = "$saga-";

/// Prefix of a scheduler's stream of timers (scheduled, fired, cancelled).
pub const TIMER_STREAM_PREFIX: &str = "$timer-";

/// The system stream families applications may write, each followed by the
/// name of what it belongs to (a stream, a group), which must be a valid name.
pub const WRITABLE_SYSTEM_PREFIXES: [&str; 6] =
    [SNAPSHOT_STREAM_PREFIX, GROUP_STREAM_PREFIX, PARKED_STREAM_PREFIX, RELAY_STREAM_PREFIX, SAGA_STREAM_PREFIX, TIMER_STREAM_PREFIX];

/// Name of the stream that holds the snapshots of `stream`.
pub fn snapshot_stream_name(stream: &str) -> String {
    format!("{SNAPSHOT_STREAM_PREFIX}{stream}")
}

/// Checks a user stream name: not empty, at most 256 bytes, no leading `$`
/// (reserved for system streams) except for the [`WRITABLE_SYSTEM_PREFIXES`]
/// families, no control characters.
pub fn validate_stream_name(name: &str) -> Result<(), StoreError> {
    for prefix in WRITABLE_SYSTEM_PREFIXES {
        if let Some(owner) = name.strip_prefix(prefix) {
            return validate_stream_name(owner).map_err(|e| match e {
                StoreError::InvalidStreamName { reason, .. } => StoreError::InvalidStreamName {
                    name: name.to_string(),
                    reason: format!("the name after '{prefix}' is invalid: {reason}"),
                },
                other => other,
            });
        }
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
