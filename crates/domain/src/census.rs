use std::collections::BTreeMap;

use cairn_core::{EventStore, Position, ReadAllOptions, StoreError};

/// How many stored events there are of each type at each schema version.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Census {
    /// event type → schema version → count. System events are not counted.
    pub types: BTreeMap<String, BTreeMap<u32, u64>>,
    /// Events counted.
    pub events: u64,
}

impl Census {
    /// The share (0.0–1.0) of `event_type`'s events stored at `version`.
    pub fn share(&self, event_type: &str, version: u32) -> f64 {
        let Some(versions) = self.types.get(event_type) else { return 0.0 };
        let total: u64 = versions.values().sum();
        if total == 0 { 0.0 } else { *versions.get(&version).unwrap_or(&0) as f64 / total as f64 }
    }
}

/// Scans the whole log; `progress` is told the events scanned so far and the
/// position reached after every page.
pub async fn census(
    store: &dyn EventStore,
    mut progress: impl FnMut(u64, Position),
) -> Result<Census, StoreError> {
    let mut census = Census::default();
    let mut options = ReadAllOptions::forward().limit(10_000);
    let mut scanned = 0;
    loop {
        let page = store.read_all(options).await?;
        let Some(last) = page.last().map(|e| e.position) else { break };
        scanned += page.len() as u64;
        for e in page.iter().filter(|e| !e.is_system()) {
            *census
                .types
                .entry(e.event_type.clone())
                .or_default()
                .entry(e.schema_version)
                .or_default() += 1;
            census.events += 1;
        }
        progress(scanned, last);
        options = ReadAllOptions::forward().after(last).limit(10_000);
    }
    Ok(census)
}
