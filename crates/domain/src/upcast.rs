use std::collections::HashMap;
use std::fmt;

use serde_json::Value;

type Step = Box<dyn Fn(Value) -> Result<Value, String> + Send + Sync>;

/// Steps that bring a stored event's payload from one schema version to the
/// next (v1 → v2 → v3), and renames of event types. Applied on read, so the
/// domain only ever sees the newest shape; what is stored never changes.
#[derive(Default)]
pub struct Upcasters {
    steps: HashMap<(String, u32), Step>,
    renames: HashMap<String, String>,
}

/// Longest chain followed before giving up (guards against rename cycles).
const MAX_STEPS: usize = 64;

impl Upcasters {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds the step that turns `event_type` at `from_version` into `from_version + 1`.
    pub fn add(
        self,
        event_type: &str,
        from_version: u32,
        step: impl Fn(Value) -> Value + Send + Sync + 'static,
    ) -> Self {
        self.try_add(event_type, from_version, move |v| Ok(step(v)))
    }

    /// Like [`add`](Self::add) for a step that can refuse a payload it cannot convert.
    pub fn try_add(
        mut self,
        event_type: &str,
        from_version: u32,
        step: impl Fn(Value) -> Result<Value, String> + Send + Sync + 'static,
    ) -> Self {
        self.steps.insert((event_type.to_string(), from_version), Box::new(step));
        self
    }

    /// Events stored as `old` are read as `new`, keeping their schema version.
    pub fn rename(mut self, old: &str, new: &str) -> Self {
        self.renames.insert(old.to_string(), new.to_string());
        self
    }

    /// Whether an event stored as (`event_type`, `version`) can be decoded as is.
    pub(crate) fn is_current(&self, event_type: &str, version: u32, current: u32) -> bool {
        version == current && (self.renames.is_empty() || !self.renames.contains_key(event_type))
    }

    /// Runs the chain: returns the newest type name, version and payload.
    pub(crate) fn upcast(
        &self,
        event_type: &str,
        mut version: u32,
        current: impl Fn(&str) -> u32,
        mut data: Value,
    ) -> Result<(String, u32, Value), String> {
        let mut name = event_type.to_string();
        for _ in 0..MAX_STEPS {
            if let Some(new) = self.renames.get(&name) {
                name = new.clone();
                continue;
            }
            let target = current(&name);
            if version == target {
                return Ok((name, version, data));
            }
            if version > target {
                return Err(format!(
                    "it was written at schema version {version} but this code knows {name} only up to version {target}; deploy the newer code"
                ));
            }
            let Some(step) = self.steps.get(&(name.clone(), version)) else {
                return Err(format!(
                    "no upcaster from {name} v{version} to v{}; register one with Upcasters::add(\"{name}\", {version}, ...)",
                    version + 1
                ));
            };
            data = step(data).map_err(|e| {
                format!("upcaster {name} v{version} → v{} refused it: {e}", version + 1)
            })?;
            version += 1;
        }
        Err(format!(
            "more than {MAX_STEPS} upcasting steps from {event_type}; is there a rename cycle?"
        ))
    }
}

impl fmt::Debug for Upcasters {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut steps: Vec<_> =
            self.steps.keys().map(|(t, v)| format!("{t} v{v}→v{}", v + 1)).collect();
        steps.sort();
        f.debug_struct("Upcasters").field("steps", &steps).field("renames", &self.renames).finish()
    }
}
