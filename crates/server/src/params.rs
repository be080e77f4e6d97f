//! Query-string parameters, checked by name so that a typo is an error
//! ("unknown parameter 'frm'") rather than a silently ignored setting.

use std::collections::HashMap;

use cairn_core::Direction;

pub(crate) struct Params {
    map: HashMap<String, String>,
}

impl Params {
    /// The parameters, or why not: one this endpoint does not take.
    pub(crate) fn new(map: HashMap<String, String>, allowed: &[&str]) -> Result<Params, String> {
        if let Some(bad) = map.keys().find(|k| !allowed.contains(&k.as_str())) {
            return Err(format!(
                "unknown parameter '{bad}'; this endpoint takes: {}",
                allowed.join(", ")
            ));
        }
        Ok(Params { map })
    }

    pub(crate) fn str(&self, name: &str) -> Option<&str> {
        self.map.get(name).map(String::as_str)
    }

    pub(crate) fn u64(&self, name: &str) -> Result<Option<u64>, String> {
        self.map
            .get(name)
            .map(|v| {
                v.parse().map_err(|_| {
                    format!("{name}: {v:?} is not a whole number from 0 to {}", u64::MAX)
                })
            })
            .transpose()
    }

    /// `limit`, or `default`; a whole number too large for a `usize` is
    /// the largest (the caller lowers it to its page size anyway).
    pub(crate) fn limit(&self, default: usize) -> Result<usize, String> {
        match self.map.get("limit") {
            None => Ok(default),
            Some(v) if !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()) => {
                Ok(v.parse().unwrap_or(usize::MAX))
            }
            Some(v) => Err(format!("limit: {v:?} is not a whole number from 0")),
        }
    }

    /// Only `true` or `false`: a bare `?hard` or `?hard=` is refused, since
    /// guessing "true" there would tombstone a stream for good.
    pub(crate) fn bool(&self, name: &str) -> Result<bool, String> {
        match self.map.get(name).map(String::as_str) {
            None | Some("false") => Ok(false),
            Some("true") => Ok(true),
            Some(v) => Err(format!("{name}: {v:?} is not true or false")),
        }
    }

    pub(crate) fn direction(&self) -> Result<Direction, String> {
        match self.map.get("direction").map(String::as_str) {
            None | Some("forward") => Ok(Direction::Forward),
            Some("backward") => Ok(Direction::Backward),
            Some(v) => Err(format!("direction: {v:?} is not forward or backward")),
        }
    }
}
