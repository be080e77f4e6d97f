//! Time travel: the state as of a version, position or time; the history as
//! (event, state after it) pairs; and what-if branches kept in memory.

use cairn_core::{Position, RecordedEvent, Timestamp};
use serde_json::Value;

use crate::{Aggregate, Loaded, Repository, RepositoryError};

/// A point in an aggregate's past.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum At {
    /// After the event with this stream version (0: before any event).
    Version(u64),
    /// After every event at or before this global position.
    Position(Position),
    /// After every event stored at or before this time.
    Time(Timestamp),
}

impl At {
    pub(crate) fn admits(&self, event: &RecordedEvent) -> bool {
        match *self {
            At::Version(v) => event.version <= v,
            At::Position(p) => event.position <= p,
            At::Time(t) => event.timestamp <= t,
        }
    }

    /// Whether a snapshot covering `version` may lie within the bound (for
    /// positions and times the covered event itself is checked as well).
    pub(crate) fn admits_version(&self, version: u64) -> bool {
        match *self {
            At::Version(v) => version <= v,
            At::Position(_) | At::Time(_) => true,
        }
    }
}

/// One step of an aggregate's history.
#[derive(Debug, Clone)]
pub struct HistoryEntry<A: Aggregate> {
    pub version: u64,
    pub position: Position,
    pub timestamp: Timestamp,
    /// The type and schema version as stored (before upcasting).
    pub stored_type: String,
    pub stored_schema_version: u32,
    /// The event as the domain sees it (after upcasting).
    pub event: A::Event,
    /// The state right after this event.
    pub state: A,
}

/// An in-memory fork of an aggregate's history: commands run against it
/// change nothing in the store.
#[derive(Debug, Clone)]
pub struct Branch<A: Aggregate> {
    /// The aggregate as it was at the fork.
    pub base: Loaded<A>,
    state: A,
    events: Vec<A::Event>,
}

impl<A: Aggregate> Branch<A> {
    /// Decides `command` against the branch's state and applies the events in memory.
    pub fn execute(&mut self, command: &A::Command) -> Result<&[A::Event], A::Error> {
        let events = self.state.decide(command)?;
        let start = self.events.len();
        for e in events {
            self.state = std::mem::take(&mut self.state).evolve(&e);
            self.events.push(e);
        }
        Ok(&self.events[start..])
    }

    pub fn state(&self) -> &A {
        &self.state
    }

    /// The version the branch would be at: the fork's plus its hypothetical events.
    pub fn version(&self) -> u64 {
        self.base.version + self.events.len() as u64
    }

    /// The hypothetical events, in order.
    pub fn events(&self) -> &[A::Event] {
        &self.events
    }
}

/// A branch's state next to the real current state.
#[derive(Debug, Clone)]
pub struct Comparison<A> {
    pub real: Loaded<A>,
    pub branch: A,
    pub branch_version: u64,
    /// Where the two states differ (JSON pointer paths), empty if they agree.
    pub differences: Vec<Difference>,
}

/// One field whose value differs between the real state and a branch.
#[derive(Debug, Clone, PartialEq)]
pub struct Difference {
    /// JSON pointer to the field, e.g. `/balance`.
    pub path: String,
    /// `None` where the field is absent on that side.
    pub real: Option<Value>,
    pub branch: Option<Value>,
}

impl<A: Aggregate> Repository<A> {
    /// The aggregate as it was at `at`: at a stream version, a global position
    /// or a point in time ("the balance at 10:00 yesterday").
    pub async fn load_at(&self, id: &str, at: At) -> Result<Loaded<A>, RepositoryError<A::Error>> {
        self.load_bounded(&A::stream_name(id), Some(at)).await
    }

    /// Every event of the aggregate with the state right after it, oldest first,
    /// to find the event at which the state went wrong.
    pub async fn history(
        &self,
        id: &str,
    ) -> Result<Vec<HistoryEntry<A>>, RepositoryError<A::Error>> {
        let stream = A::stream_name(id);
        let mut entries = Vec::new();
        let mut state = A::default();
        let mut from = 1;
        loop {
            let page = self.read_page(&stream, from, 4096).await?;
            let Some(last) = page.last() else { break };
            from = last.version + 1;
            for stored in page {
                let event = self.codec.decode(&stored)?;
                state = state.evolve(&event);
                entries.push(HistoryEntry {
                    version: stored.version,
                    position: stored.position,
                    timestamp: stored.timestamp,
                    stored_type: stored.event_type,
                    stored_schema_version: stored.schema_version,
                    event,
                    state: state.clone(),
                });
            }
        }
        Ok(entries)
    }

    /// Forks the aggregate's history at `at` into an in-memory branch.
    pub async fn branch(&self, id: &str, at: At) -> Result<Branch<A>, RepositoryError<A::Error>> {
        let base = self.load_at(id, at).await?;
        Ok(Branch { state: base.state.clone(), base, events: Vec::new() })
    }

    /// The branch's state next to the aggregate's real current state.
    pub async fn compare(
        &self,
        id: &str,
        branch: &Branch<A>,
    ) -> Result<Comparison<A>, RepositoryError<A::Error>> {
        let real = self.load(id).await?;
        let as_json = |s: &A| serde_json::to_value(s).unwrap_or(Value::Null);
        let mut differences = Vec::new();
        diff("", Some(&as_json(&real.state)), Some(&as_json(branch.state())), &mut differences);
        Ok(Comparison {
            real,
            branch: branch.state().clone(),
            branch_version: branch.version(),
            differences,
        })
    }
}

/// Collects the leaves where `a` and `b` differ, descending into objects.
fn diff(path: &str, a: Option<&Value>, b: Option<&Value>, out: &mut Vec<Difference>) {
    match (a, b) {
        (Some(Value::Object(x)), Some(Value::Object(y))) => {
            let mut keys: Vec<&String> = x.keys().chain(y.keys()).collect();
            keys.sort();
            keys.dedup();
            for k in keys {
                let escaped = k.replace('~', "~0").replace('/', "~1");
                diff(&format!("{path}/{escaped}"), x.get(k), y.get(k), out);
            }
        }
        (a, b) if a == b => {}
        (a, b) => out.push(Difference {
            path: if path.is_empty() { "/".into() } else { path.into() },
            real: a.cloned(),
            branch: b.cloned(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn diff_finds_changed_added_and_removed_fields() {
        let mut out = Vec::new();
        let real = json!({"balance": 100, "owner": "ada", "limits": {"daily": 5, "a/b": 1}});
        let branch = json!({"balance": 40, "owner": "ada", "limits": {"daily": 5}, "closed": true});
        diff("", Some(&real), Some(&branch), &mut out);
        let paths: Vec<_> = out.iter().map(|d| d.path.as_str()).collect();
        assert_eq!(paths, ["/balance", "/closed", "/limits/a~1b"]);
        assert_eq!(out[0].real, Some(json!(100)));
        assert_eq!(out[1].real, None);
        assert_eq!(out[2].branch, None);
    }
}
