//! Several appends in one request (a gRPC `AppendStream` batch, an NDJSON
//! body): each checked against the caller's key, then all handed to the
//! store at once so that they share its group commits.

use std::time::Instant;

use cairn_core::{Append, AppendResult, StoreError};

use crate::App;
use crate::auth::Principal;

/// Most appends taken into one batch, and most appends in one NDJSON body.
pub(crate) const BATCH_MAX: usize = cairn_wire::APPENDS_MAX;

/// A gRPC batch stops taking messages past this many bytes, so that what
/// waits in memory stays bounded (a body of `POST /appends` is bounded by
/// the body limit).
pub(crate) const BATCH_BYTES_MAX: usize = 16 * 1024 * 1024;

/// Appends `appends` (those already refused stay refused) in order; the
/// answers in the same order.
pub(crate) async fn run(
    app: &App,
    who: &Principal,
    appends: Vec<Result<Append, StoreError>>,
) -> Vec<Result<AppendResult, StoreError>> {
    let (checked, taken) = Checked::new(who, appends);
    let started = Instant::now();
    let done = app.store.append_each(taken).await;
    checked.finish(app, done, started.elapsed())
}

/// A batch checked against the caller's key: where the refused ones go
/// among the answers, and what the taken ones weigh (for the metrics).
pub(crate) struct Checked {
    refused: Vec<Option<StoreError>>,
    sizes: Vec<(usize, usize)>,
}

impl Checked {
    /// The check, and the appends to hand to the store.
    pub(crate) fn new(
        who: &Principal,
        appends: Vec<Result<Append, StoreError>>,
    ) -> (Checked, Vec<Append>) {
        let mut checked = Checked { refused: Vec::with_capacity(appends.len()), sizes: Vec::new() };
        let mut taken = Vec::new();
        for a in appends {
            let refused = a.and_then(|a| {
                match who
                    .denies_stream(&a.stream, true)
                    .or_else(|| a.condition.as_ref().and_then(|c| who.denies_condition(c)))
                {
                    Some(reason) => {
                        Err(StoreError::AccessDenied { code: "forbidden".into(), reason })
                    }
                    None => Ok(a),
                }
            });
            match refused {
                Ok(a) => {
                    checked.sizes.push((
                        a.events.len(),
                        a.events.iter().map(|e| e.data.len()).sum::<usize>(),
                    ));
                    taken.push(a);
                    checked.refused.push(None);
                }
                Err(e) => checked.refused.push(Some(e)),
            }
        }
        (checked, taken)
    }

    /// All the answers in order: the store's `done` (one per taken append)
    /// with the refusals put back in their places; counted in the metrics.
    pub(crate) fn finish(
        self,
        app: &App,
        done: Vec<Result<AppendResult, StoreError>>,
        elapsed: std::time::Duration,
    ) -> Vec<Result<AppendResult, StoreError>> {
        let mut done = done.into_iter().zip(self.sizes);
        self.refused
            .into_iter()
            .map(|slot| {
                let result = match slot {
                    Some(refused) => Err(refused),
                    None => {
                        let (result, (count, bytes)) =
                            done.next().expect("an answer for each append taken");
                        if result.is_ok() {
                            app.metrics.append_ok(count, bytes, elapsed)
                        }
                        result
                    }
                };
                if result.is_err() {
                    app.metrics.append_failed();
                }
                result
            })
            .collect()
    }
}
