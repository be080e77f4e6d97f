use cairn_core::{
    EventStore, Position, Query, ReadAllOptions, RecordedEvent, StoreError, SubscriptionTarget,
};

/// Which events a projection follows.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Source {
    /// Every user event (`$` streams are skipped).
    All,
    /// Events matching a tag/type/category query (served by the store's indexes).
    Query(Query),
}

impl Source {
    /// Events of these types, from any stream.
    pub fn types<I: IntoIterator<Item = S>, S: Into<String>>(types: I) -> Self {
        Source::Query(Query::types(types))
    }

    /// Events of every stream of `category` (`account` = `account-1`, `account-2`, …).
    pub fn category(category: impl Into<String>) -> Self {
        Source::Query(Query::category(category))
    }

    pub(crate) fn target(&self) -> SubscriptionTarget {
        match self {
            Source::All => SubscriptionTarget::All,
            Source::Query(q) => SubscriptionTarget::Query(q.clone()),
        }
    }

    /// Whether a delivered event is for the projection (subscriptions to `$all`
    /// also deliver the store's own bookkeeping events).
    pub(crate) fn wants(&self, event: &RecordedEvent) -> bool {
        !event.is_system()
    }

    /// Up to `limit` of the source's events after `after` (from the start for `None`),
    /// `$` events of `$all` included so that a checkpoint can pass them.
    pub(crate) async fn read(
        &self,
        store: &dyn EventStore,
        after: Option<Position>,
        limit: usize,
    ) -> Result<Vec<RecordedEvent>, StoreError> {
        let options = after
            .map_or(ReadAllOptions::forward(), |p| ReadAllOptions::forward().after(p))
            .limit(limit);
        match self {
            Source::All => store.read_all(options).await,
            Source::Query(q) => store.read_query(q, options).await,
        }
    }

    /// Position of the newest of the source's events at or before `position`
    /// (the store's newest event for `None`).
    pub(crate) async fn last_at(
        &self,
        store: &dyn EventStore,
        position: Option<Position>,
    ) -> Result<Option<Position>, StoreError> {
        let options = position
            .map_or(ReadAllOptions::backward(), |p| ReadAllOptions::backward().from(p))
            .limit(1);
        let newest = match self {
            Source::All => store.read_all(options).await?,
            Source::Query(q) => store.read_query(q, options).await?,
        };
        Ok(newest.first().map(|e| e.position))
    }
}
