use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::Upcasters;

/// The events of one aggregate, as a serde enum in serde's default (externally
/// tagged) form: each variant's name is the stable event type stored with the
/// event, its fields are the payload. Rename a variant with `#[serde(rename)]`
/// to keep the stored name when the Rust name changes.
pub trait DomainEvent: Serialize + DeserializeOwned + Send + Sync + 'static {
    /// The schema version code writes for `event_type`: 1 until the payload's
    /// shape changes, then 2 with an upcaster from 1, and so on.
    fn schema_version(event_type: &str) -> u32 {
        let _ = event_type;
        1
    }

    /// The upcasters that bring stored older versions up to `schema_version`.
    fn upcasters() -> Upcasters {
        Upcasters::new()
    }

    /// Tags stored with the event (for queries across streams).
    fn tags(&self) -> Vec<String> {
        Vec::new()
    }
}

/// A consistency boundary whose state is rebuilt from its events.
///
/// The aggregate type is its state. `decide` holds the business rules and never
/// changes anything; `evolve` applies one event that already happened and so
/// cannot fail. Streams are named `{CATEGORY}-{id}`.
pub trait Aggregate:
    Default + Clone + Serialize + DeserializeOwned + Send + Sync + 'static
{
    /// The stream category, e.g. `account` for streams `account-42`.
    const CATEGORY: &'static str;

    /// Version of the state's serialised shape. Bump it when the state changes
    /// shape: snapshots written with another version are ignored and rebuilt.
    const SNAPSHOT_VERSION: u32 = 1;

    type Command: Send + Sync;
    type Event: DomainEvent;
    type Error: std::error::Error + Send + Sync + 'static;

    /// The events `command` produces in this state, or why it is refused.
    fn decide(&self, command: &Self::Command) -> Result<Vec<Self::Event>, Self::Error>;

    /// The state after `event`.
    fn evolve(self, event: &Self::Event) -> Self;

    /// The stream that holds the aggregate `id`.
    fn stream_name(id: &str) -> String {
        format!("{}-{id}", Self::CATEGORY)
    }
}
