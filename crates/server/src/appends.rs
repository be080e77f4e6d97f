//! Several appends in one request (a gRPC `AppendStream` batch, an NDJSON
//! body): each checked against the caller's key, then all handed to the
//! store at once so that they share its group commits.

use std::time::Instant;

use cairn_core::{Append, AppendResult, StoreError};

use crate::auth::Principal;
use crate::App;

/// Most appends taken into one batch, and most appends in one NDJSON body.
pub const BATCH_MAX: usize = cairn_client::wire::APPENDS_MAX;

/// A gRPC batch stops taking messages past this many bytes, so that what
/// waits in memory stays bounded (a body of `POST /appends` is bounded by
/// the body limit).
pub const BATCH_BYTES_MAX: usize = 16 * 1024 * 1024;

/// Appends `appends` (those already refused stay refused) in order; the
/// answers in the same order.
pub async fn run(app: &App, who: &Principal, appends: Vec<Result<Append, StoreError>>) -> Vec<Result<AppendResult, StoreError>> {
    let mut out: Vec<Option<Result<AppendResult, StoreError>>> = Vec::with_capacity(appends.len());
    let mut taken = Vec::new();
    let mut sizes = Vec::new();
    for a in appends {
        let refused = a.and_then(|a| match who.denies_stream(&a.stream, true).or_else(|| a.condition.as_ref().and_then(|c| who.denies_condition(c))) {
            Some(reason) => Err(StoreError::AccessDenied { code: "forbidden".into(), reason }),
            None => Ok(a),
        });
        match refused {
            Ok(a) => {
                sizes.push((a.events.len(), a.events.iter().map(|e| e.data.len()).sum::<usize>()));
                taken.push(a);
                out.push(None);
            }
            Err(e) => out.push(Some(Err(e))),
        }
    }
    let started = Instant::now();
    let mut done = app.store.append_each(taken).await.into_iter().zip(sizes);
    let elapsed = started.elapsed();
    out.into_iter()
        .map(|slot| {
            let result = match slot {
                Some(refused) => refused,
                None => {
                    let (result, (count, bytes)) = done.next().expect("an answer for each append taken");
                    if result.is_ok() { app.metrics.append_ok(count, bytes, elapsed) }
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
