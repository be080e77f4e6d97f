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
    /// Deepest nesting of arrays and objects in a JSON payload. Readers
    /// parse payloads inside a response (a few levels more), and serde_json
    /// stops at 128 levels, so keep this well under that.
    pub json_depth_max: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            event_bytes_max: 16 * 1024 * 1024,
            append_bytes_max: 64 * 1024 * 1024,
            append_events_max: 10_000,
            event_type_bytes_max: 256,
            event_tags_max: 32,
            json_depth_max: 64,
        }
    }
}

impl Limits {
    /// Checks a batch to append to `stream`: not empty, within the count,
    /// type, tag and size limits, ids unique and not nil, JSON payloads
    /// valid (see `check_json`), `$` types only in `$$` streams. `size` gives an event's stored
    /// size in the backend's own encoding; returns the batch's total.
    pub fn check_batch(
        &self,
        stream: &str,
        events: &[NewEvent],
        size: impl Fn(&NewEvent) -> usize,
    ) -> Result<usize, StoreError> {
        if events.is_empty() {
            return Err(StoreError::InvalidEvent("an append needs at least one event".into()));
        }
        if events.len() > self.append_events_max {
            return Err(StoreError::InvalidEvent(format!(
                "{} events in one append; the limit is {}",
                events.len(),
                self.append_events_max
            )));
        }
        let mut total = 0;
        let mut seen = std::collections::HashSet::with_capacity(events.len());
        for (i, e) in events.iter().enumerate() {
            let bad = |what: String| Err(StoreError::InvalidEvent(format!("event {i}: {what}")));
            if e.event_type.is_empty() {
                return bad("the event type is empty".into());
            }
            if e.event_type.len() > self.event_type_bytes_max {
                return bad(format!(
                    "the event type is {} bytes; the limit is {}",
                    e.event_type.len(),
                    self.event_type_bytes_max
                ));
            }
            if let Err(reason) = check_chars(&e.event_type) {
                return bad(format!("the event type {:?} is invalid: {reason}", e.event_type));
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
            if e.content_type == ContentType::Json
                && let Err(reason) = check_json(&e.data, self.json_depth_max)
            {
                return bad(format!("the payload is marked as JSON but {reason}"));
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
                return Err(StoreError::EventTooLarge {
                    index: i,
                    size_bytes: size,
                    limit_bytes: self.event_bytes_max,
                });
            }
            total += size;
        }
        if total > self.append_bytes_max {
            return Err(StoreError::AppendTooLarge {
                size_bytes: total,
                limit_bytes: self.append_bytes_max,
            });
        }
        Ok(total)
    }

    /// Checks the tags of event `index` of a batch: each valid
    /// ([`validate_tag`]), none twice, at most `event_tags_max` of them.
    pub fn check_tags(&self, index: usize, tags: &[String]) -> Result<(), StoreError> {
        let bad = |what: String| Err(StoreError::InvalidEvent(format!("event {index}: {what}")));
        if tags.len() > self.event_tags_max {
            return bad(format!(
                "it has {} tags; the limit is {}",
                tags.len(),
                self.event_tags_max
            ));
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
            return bad(
                "it has no items, so it could match nothing; use Query::all() to match every event"
                    .into(),
            );
        }
        if query.items.len() > QUERY_ITEMS_MAX {
            return bad(format!(
                "it has {} items; the limit is {QUERY_ITEMS_MAX}",
                query.items.len()
            ));
        }
        for (i, item) in query.items.iter().enumerate() {
            if item.types.len().max(item.tags.len()).max(item.categories.len())
                > QUERY_ITEM_TERMS_MAX
            {
                return bad(format!(
                    "item {i} has {} types, {} tags and {} categories; the limit is {QUERY_ITEM_TERMS_MAX} of each",
                    item.types.len(),
                    item.tags.len(),
                    item.categories.len()
                ));
            }
            for t in &item.types {
                if t.is_empty() || t.len() > self.event_type_bytes_max {
                    return bad(format!(
                        "item {i}: {t:?} is not a valid event type (1 to {} bytes)",
                        self.event_type_bytes_max
                    ));
                }
                if let Err(reason) = check_chars(t) {
                    return bad(format!("item {i}: {t:?} is not a valid event type: {reason}"));
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

/// Checks one tag: not empty, at most [`TAG_BYTES_MAX`] bytes, no control,
/// invisible or bidi-control characters. Returns why not.
pub fn validate_tag(tag: &str) -> Result<(), String> {
    if tag.is_empty() {
        Err("a tag cannot be empty".into())
    } else if tag.len() > TAG_BYTES_MAX {
        Err(format!("it is {} bytes; the limit is {TAG_BYTES_MAX}", tag.len()))
    } else {
        check_chars(tag)
    }
}

/// Whether `c` is invisible or reorders text (Unicode category Cf, plus the
/// line and paragraph separators): a name holding one can look exactly like
/// another name, or like a different one.
pub(crate) fn is_invisible_char(c: char) -> bool {
    matches!(c,
        '\u{00AD}' | '\u{0600}'..='\u{0605}' | '\u{061C}' | '\u{06DD}' | '\u{070F}' | '\u{0890}'..='\u{0891}' | '\u{08E2}'
        | '\u{180E}' | '\u{200B}'..='\u{200F}' | '\u{2028}'..='\u{202E}' | '\u{2060}'..='\u{2064}' | '\u{2066}'..='\u{206F}'
        | '\u{FEFF}' | '\u{FFF9}'..='\u{FFFB}' | '\u{110BD}' | '\u{110CD}' | '\u{13430}'..='\u{1343F}' | '\u{1BCA0}'..='\u{1BCA3}'
        | '\u{1D173}'..='\u{1D17A}' | '\u{E0001}' | '\u{E0020}'..='\u{E007F}')
}

/// Checks the characters of a name (stream, event type, tag, category): no
/// control characters, which queries and terminals mangle, and none that
/// `is_invisible_char` finds. Returns why not, naming the character.
pub(crate) fn check_chars(name: &str) -> Result<(), String> {
    match name.chars().find(|&c| c.is_control() || is_invisible_char(c)) {
        None => Ok(()),
        Some(c) if c.is_control() => {
            Err(format!("it contains a control character (U+{:04X})", c as u32))
        }
        Some(c) => {
            Err(format!("it contains U+{:04X}, an invisible or bidi-control character", c as u32))
        }
    }
}

/// Checks a JSON payload as readers will parse it: valid UTF-8 JSON, at most
/// `depth_max` levels of arrays and objects, no lone surrogate escapes
/// (`"\ud800"`), which serde_json and other strict parsers refuse. One pass,
/// no tree built. Returns why not (serde_json's message, with the place).
pub(crate) fn check_json(data: &[u8], depth_max: usize) -> Result<(), String> {
    use serde::de::DeserializeSeed;
    let mut de = serde_json::Deserializer::from_slice(data);
    let checked =
        JsonCheck { depth: 0, max: depth_max }.deserialize(&mut de).and_then(|()| de.end());
    checked.map_err(|e| {
        let text = e.to_string();
        // serde_json's two words for a lone surrogate say little by themselves.
        if text.starts_with("lone leading surrogate") || text.starts_with("unexpected end of hex escape") {
            format!("holds a lone surrogate escape (\\uD800 to \\uDFFF without its pair), which strict JSON parsers refuse, at line {} column {}", e.line(), e.column())
        } else if e.classify() == serde_json::error::Category::Data {
            text
        } else {
            format!("is not valid JSON: {text}")
        }
    })
}

/// A value at `depth` (the number of arrays and objects around it).
#[derive(Clone, Copy)]
struct JsonCheck {
    depth: usize,
    max: usize,
}

impl JsonCheck {
    fn inside<E: serde::de::Error>(self) -> Result<JsonCheck, E> {
        if self.depth >= self.max {
            return Err(E::custom(format_args!(
                "nests arrays and objects deeper than {} levels (json_depth_max)",
                self.max
            )));
        }
        Ok(JsonCheck { depth: self.depth + 1, max: self.max })
    }
}

impl<'de> serde::de::DeserializeSeed<'de> for JsonCheck {
    type Value = ();
    fn deserialize<D: serde::Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> serde::de::Visitor<'de> for JsonCheck {
    type Value = ();
    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_bool<E>(self, _: bool) -> Result<(), E> {
        Ok(())
    }
    fn visit_i64<E>(self, _: i64) -> Result<(), E> {
        Ok(())
    }
    fn visit_u64<E>(self, _: u64) -> Result<(), E> {
        Ok(())
    }
    fn visit_f64<E>(self, _: f64) -> Result<(), E> {
        Ok(())
    }
    fn visit_unit<E>(self) -> Result<(), E> {
        Ok(())
    }
    // Asking for the string is what makes serde_json decode its escapes
    // (and refuse lone surrogates); IgnoredAny skips them unchecked.
    fn visit_str<E>(self, _: &str) -> Result<(), E> {
        Ok(())
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let inner = self.inside()?;
        while seq.next_element_seed(inner)?.is_some() {}
        Ok(())
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let inner = self.inside()?;
        while map.next_key_seed(inner)?.is_some() {
            map.next_value_seed(inner)?;
        }
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
        Err(format!(
            "it is {} bytes; stream names have at most {STREAM_NAME_BYTES_MAX}",
            category.len()
        ))
    } else {
        check_chars(category)
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
pub const WRITABLE_SYSTEM_PREFIXES: [&str; 6] = [
    SNAPSHOT_STREAM_PREFIX,
    GROUP_STREAM_PREFIX,
    PARKED_STREAM_PREFIX,
    RELAY_STREAM_PREFIX,
    SAGA_STREAM_PREFIX,
    TIMER_STREAM_PREFIX,
];

/// Name of the stream that holds the snapshots of `stream`.
pub fn snapshot_stream_name(stream: &str) -> String {
    format!("{SNAPSHOT_STREAM_PREFIX}{stream}")
}

/// Checks a user stream name: not empty, at most 256 bytes, no leading `$`
/// (reserved for system streams) except for the [`WRITABLE_SYSTEM_PREFIXES`]
/// families, no control, invisible or bidi-control characters.
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
    } else {
        check_chars(name).err()
    };
    match reason {
        Some(reason) => Err(StoreError::InvalidStreamName { name: name.to_string(), reason }),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_checks_say_what_is_wrong() {
        let deep = |n: usize| format!("{}{}", "[".repeat(n), "]".repeat(n));
        assert_eq!(check_json(deep(64).as_bytes(), 64), Ok(()));
        assert!(check_json(deep(65).as_bytes(), 64).unwrap_err().contains("deeper than 64 levels"));
        assert!(
            check_json(deep(500).as_bytes(), 64).unwrap_err().contains("deeper than 64 levels")
        );
        assert!(check_json(br#"{"k":{"k":1}}"#, 1).unwrap_err().contains("deeper than 1 levels"));
        assert_eq!(
            check_json(br#"{"k":[1, 2.5, -3, true, null, "\u0000\ud83d\ude00"]}"#, 2),
            Ok(())
        );
        for lone in [r#""\ud800""#, r#""\udfff""#, r#"{"\udbff":1}"#, r#"["\ud800\u0041"]"#] {
            assert!(
                check_json(lone.as_bytes(), 64).unwrap_err().contains("lone surrogate escape"),
                "{lone}: {:?}",
                check_json(lone.as_bytes(), 64)
            );
        }
        assert!(check_json(b"\"\xff\"", 64).unwrap_err().starts_with("is not valid JSON"));
        assert!(check_json(b"{} {}", 64).unwrap_err().contains("trailing"));
    }

    #[test]
    fn names_with_invisible_characters_are_refused_by_code_point() {
        assert_eq!(check_chars("Überweisung-名前-42"), Ok(()));
        assert_eq!(
            check_chars("a\u{202E}b").unwrap_err(),
            "it contains U+202E, an invisible or bidi-control character"
        );
        assert_eq!(check_chars("a\nb").unwrap_err(), "it contains a control character (U+000A)");
        for c in [
            '\u{AD}',
            '\u{61C}',
            '\u{180E}',
            '\u{200B}',
            '\u{200F}',
            '\u{2028}',
            '\u{2029}',
            '\u{202A}',
            '\u{2060}',
            '\u{2064}',
            '\u{2066}',
            '\u{206F}',
            '\u{FEFF}',
            '\u{FFF9}',
            '\u{FFFB}',
            '\u{E0001}',
        ] {
            assert!(is_invisible_char(c), "U+{:04X}", c as u32);
        }
        for c in ['a', ' ', '\u{2065}', '\u{FFFC}', '\u{200A}', 'é'] {
            assert!(!is_invisible_char(c), "U+{:04X}", c as u32);
        }
        assert!(validate_stream_name("order\u{200B}-1").is_err());
        assert!(validate_category("acc\u{2069}").is_err());
        assert!(validate_tag("t\u{FEFF}").is_err());
    }
}
