//! Queries and append conditions: the Dynamic Consistency Boundary model
//! (dcb.events). Events carry tags (`student:42`, `course:cs101`); a decision
//! reads the events matching a [`Query`] and appends with an
//! [`AppendCondition`] that fails if any event matching that query was
//! appended after the position the decision saw. This makes rules that span
//! entities ("a course has at most 30 students") as safe as a stream's
//! expected version, without a stream per rule.
//!
//! What a query can match: the events of user streams, in the global order
//! (`$all`). Events of `$` streams (stream metadata, deletions, snapshots)
//! never match, not even `Query::all()`. Like `$all`, queries read the log:
//! events of soft-deleted or truncated streams still match (stream metadata
//! applies to stream reads only).
//!
//! Beyond the DCB model, an item can also name stream **categories**
//! ([`stream_category`]), so "every event of an `account-…` stream" is a query
//! too: it reads, subscribes and conditions appends like any other.

use serde::{Deserialize, Serialize};

use crate::Position;

/// The category of a stream: the part of its name before the first `-`
/// (`account-42` and `account-42-x` → `account`), as in EventStoreDB. A name
/// without a `-`, or starting with one, has no category, and neither has a
/// `$` stream (the store's bookkeeping, like `$snapshots-account-42`).
pub fn stream_category(stream: &str) -> Option<&str> {
    if stream.starts_with('$') {
        return None;
    }
    match stream.find('-') {
        Some(end) if end > 0 => Some(&stream[..end]),
        _ => None,
    }
}

/// One part of a query: events whose type is one of `types` (any type if
/// empty), which carry every tag in `tags` (no tag constraint if empty), and
/// whose stream is in one of `categories` (any stream if empty). An item with
/// none of them matches every event.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
pub struct QueryItem {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub types: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tags: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub categories: Vec<String>,
}

impl QueryItem {
    /// Matches every event.
    pub fn any() -> Self {
        QueryItem::default()
    }

    /// Events of one of these types.
    pub fn types<I: IntoIterator<Item = S>, S: Into<String>>(types: I) -> Self {
        QueryItem::any().with_types(types)
    }

    /// Events carrying all of these tags.
    pub fn tags<I: IntoIterator<Item = S>, S: Into<String>>(tags: I) -> Self {
        QueryItem::any().with_tags(tags)
    }

    /// Events of the streams of one of these categories.
    pub fn categories<I: IntoIterator<Item = S>, S: Into<String>>(categories: I) -> Self {
        QueryItem::any().with_categories(categories)
    }

    pub fn with_types<I: IntoIterator<Item = S>, S: Into<String>>(mut self, types: I) -> Self {
        self.types = types.into_iter().map(Into::into).collect();
        self
    }

    pub fn with_tags<I: IntoIterator<Item = S>, S: Into<String>>(mut self, tags: I) -> Self {
        self.tags = tags.into_iter().map(Into::into).collect();
        self
    }

    pub fn with_categories<I: IntoIterator<Item = S>, S: Into<String>>(
        mut self,
        categories: I,
    ) -> Self {
        self.categories = categories.into_iter().map(Into::into).collect();
        self
    }

    /// Whether an event of `stream` of `event_type` carrying `tags` matches
    /// this item (never for a `$` stream).
    pub fn matches(&self, stream: &str, event_type: &str, tags: &[String]) -> bool {
        !stream.starts_with('$')
            && (self.types.is_empty() || self.types.iter().any(|t| t == event_type))
            && self.tags.iter().all(|t| tags.contains(t))
            && (self.categories.is_empty()
                || stream_category(stream).is_some_and(|c| self.categories.iter().any(|k| k == c)))
    }

    /// Whether the item constrains nothing.
    pub fn is_any(&self) -> bool {
        self.types.is_empty() && self.tags.is_empty() && self.categories.is_empty()
    }
}

/// Which events a decision depends on: the events matching any of its items
/// (an OR of [`QueryItem`]s). A query needs at least one item; `Query::all()`
/// is one empty item and matches every event of a user stream.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Query {
    pub items: Vec<QueryItem>,
}

impl Query {
    /// Every event of every user stream.
    pub fn all() -> Self {
        Query { items: vec![QueryItem::any()] }
    }

    pub fn new(items: impl IntoIterator<Item = QueryItem>) -> Self {
        Query { items: items.into_iter().collect() }
    }

    /// One item: events carrying all of `tags`.
    pub fn tags<I: IntoIterator<Item = S>, S: Into<String>>(tags: I) -> Self {
        QueryItem::tags(tags).into()
    }

    /// One item: events of one of `types`.
    pub fn types<I: IntoIterator<Item = S>, S: Into<String>>(types: I) -> Self {
        QueryItem::types(types).into()
    }

    /// One item: events of the streams of `category` (`account` for
    /// `account-42`; see [`stream_category`]).
    pub fn category(category: impl Into<String>) -> Self {
        QueryItem::categories([category.into()]).into()
    }

    /// This query OR `item`.
    pub fn or(mut self, item: QueryItem) -> Self {
        self.items.push(item);
        self
    }

    /// Whether an event of `stream` of `event_type` carrying `tags` matches:
    /// never for events of `$` streams.
    pub fn matches(&self, stream: &str, event_type: &str, tags: &[String]) -> bool {
        self.items.iter().any(|item| item.matches(stream, event_type, tags))
    }

    /// Whether a stored event matches: never for events of `$` streams.
    pub fn matches_event(&self, event: &crate::RecordedEvent) -> bool {
        self.matches(&event.stream, &event.event_type, &event.tags)
    }

    /// Whether some item has no constraint, so the query matches every event
    /// of a user stream.
    pub fn matches_everything(&self) -> bool {
        self.items.iter().any(QueryItem::is_any)
    }
}

impl From<QueryItem> for Query {
    fn from(item: QueryItem) -> Self {
        Query { items: vec![item] }
    }
}

/// The condition of a conditional append ([`crate::EventStore::append_if`]):
/// the append fails with [`crate::StoreError::AppendConditionFailed`] if any
/// event matching `fail_if_events_match` has a position strictly greater than
/// `after`, or, when `after` is `None`, if any matching event exists at all.
///
/// `after` is the position of the newest event the decision took into
/// account: take [`crate::EventStore::last_position`] *before* reading the
/// query, and use the greater of it and the last matching event's position
/// (`None` if the store was empty and nothing matched). It must be an event's
/// position, not the head: [`crate::EventStore::head_position`] is where the
/// *next* event goes, so an event appended there would not count as "after" it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct AppendCondition {
    pub fail_if_events_match: Query,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub after: Option<Position>,
}

impl AppendCondition {
    pub fn new(fail_if_events_match: Query, after: Option<Position>) -> Self {
        AppendCondition { fail_if_events_match, after }
    }

    /// Fails if any event matching `query` exists (until [`AppendCondition::after`] is set).
    pub fn fail_if_events_match(query: Query) -> Self {
        AppendCondition { fail_if_events_match: query, after: None }
    }

    /// Only events after `position` count.
    pub fn after(mut self, position: Position) -> Self {
        self.after = Some(position);
        self
    }

    /// The condition for a decision that read `matched` with `query` after
    /// taking `last_before` ([`crate::EventStore::last_position`]) first:
    /// `after` is the greater of `last_before` and the newest matched event.
    pub fn after_read(
        query: Query,
        last_before: Option<Position>,
        matched: &[crate::RecordedEvent],
    ) -> Self {
        let newest_matched = matched.iter().map(|e| e.position).max();
        AppendCondition { fail_if_events_match: query, after: last_before.max(newest_matched) }
    }

    /// Whether a matching event at `position` breaks the condition.
    pub fn conflicts_at(&self, position: Position) -> bool {
        self.after.is_none_or(|after| position > after)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tags(t: &[&str]) -> Vec<String> {
        t.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn items_and_their_union() {
        let item =
            QueryItem::types(["Subscribed", "Unsubscribed"]).with_tags(["course:1", "student:2"]);
        assert!(item.matches("s", "Subscribed", &tags(&["student:2", "x", "course:1"])));
        assert!(!item.matches("s", "Subscribed", &tags(&["course:1"])), "every tag is needed");
        assert!(
            !item.matches("s", "Renamed", &tags(&["course:1", "student:2"])),
            "the type must be listed"
        );
        assert!(QueryItem::tags(["a"]).matches("s", "Anything", &tags(&["a"])));
        assert!(QueryItem::types(["T"]).matches("s", "T", &[]));
        assert!(QueryItem::any().matches("s", "T", &[]));
        assert!(!QueryItem::any().matches("$$s", "T", &[]), "never an event of a $ stream");
        let q = Query::tags(["course:1"]).or(QueryItem::types(["CourseDefined"]));
        assert!(q.matches("s", "CourseDefined", &[]));
        assert!(q.matches("s", "Subscribed", &tags(&["course:1"])));
        assert!(!q.matches("s", "Subscribed", &tags(&["course:2"])));
        assert!(Query::all().matches_everything());
        assert!(!q.matches_everything());
        assert!(!Query::category("a").matches_everything());
        assert!(
            !Query { items: vec![] }.matches("s", "T", &[]),
            "a query without items matches nothing (and stores reject it)"
        );
    }

    #[test]
    fn categories() {
        assert_eq!(stream_category("account-42"), Some("account"));
        assert_eq!(stream_category("account-42-x"), Some("account"), "the first dash");
        assert_eq!(stream_category("account-"), Some("account"));
        assert_eq!(stream_category("account"), None, "no dash, no category");
        assert_eq!(stream_category("-42"), None);
        assert_eq!(stream_category("$snapshots-account-42"), None, "$ streams have none");
        assert_eq!(stream_category("$$account-42"), None);
        let q = Query::category("account");
        assert!(q.matches("account-1", "T", &[]));
        assert!(!q.matches("accounts-1", "T", &[]));
        assert!(!q.matches("account2-1", "T", &[]));
        assert!(!q.matches("account", "T", &[]));
        assert!(!q.matches("$snapshots-account-1", "T", &[]));
        let item = QueryItem::categories(["a", "b"]).with_types(["T"]).with_tags(["x"]);
        assert!(item.matches("b-1", "T", &tags(&["x"])));
        assert!(!item.matches("c-1", "T", &tags(&["x"])));
        assert!(!item.matches("a-1", "U", &tags(&["x"])));
        assert!(!item.matches("a-1", "T", &[]));
    }

    #[test]
    fn condition_counts_only_later_events() {
        let c = AppendCondition::fail_if_events_match(Query::all());
        assert!(c.conflicts_at(Position(1)));
        let c = c.after(Position(100));
        assert!(!c.conflicts_at(Position(100)));
        assert!(c.conflicts_at(Position(101)));
    }

    #[test]
    fn serde_shape() {
        let c = AppendCondition::fail_if_events_match(
            Query::tags(["course:1"]).or(QueryItem::types(["A"])),
        )
        .after(Position(7));
        let json = serde_json::to_value(&c).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"fail_if_events_match": {"items": [{"tags": ["course:1"]}, {"types": ["A"]}]}, "after": 7})
        );
        assert_eq!(serde_json::from_value::<AppendCondition>(json).unwrap(), c);
        let item = QueryItem::categories(["account"]);
        assert_eq!(
            serde_json::to_value(&item).unwrap(),
            serde_json::json!({"categories": ["account"]})
        );
    }
}
