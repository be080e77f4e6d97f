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
///
/// ```
/// use cairn_domain::{Aggregate, DomainEvent};
/// use serde::{Deserialize, Serialize};
///
/// #[derive(Debug, Clone, Serialize, Deserialize)]
/// enum Event { Added { n: u32 } }
/// impl DomainEvent for Event {}
///
/// #[derive(Debug)]
/// struct TooMany;
/// impl std::fmt::Display for TooMany {
///     fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
///         f.write_str("a cart holds at most 10 items")
///     }
/// }
/// impl std::error::Error for TooMany {}
///
/// /// A cart that holds at most 10 items.
/// #[derive(Debug, Clone, Default, Serialize, Deserialize)]
/// struct Cart { items: u32 }
///
/// impl Aggregate for Cart {
///     const CATEGORY: &'static str = "cart";
///     type Command = u32; // items to add
///     type Event = Event;
///     type Error = TooMany;
///     fn decide(&self, n: &u32) -> Result<Vec<Event>, TooMany> {
///         if self.items + n > 10 { Err(TooMany) } else { Ok(vec![Event::Added { n: *n }]) }
///     }
///     fn evolve(self, Event::Added { n }: &Event) -> Self {
///         Cart { items: self.items + n }
///     }
/// }
///
/// let cart = Cart::default().evolve(&Event::Added { n: 7 });
/// assert!(cart.decide(&3).is_ok());
/// assert!(cart.decide(&4).is_err());
/// assert_eq!(Cart::stream_name("ada"), "cart-ada");
/// ```
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
