//! W8: three-step order sagas (create the order, charge the card, reserve the
//! items), none failing, each step appending its service's event keyed by the
//! step (the idempotent way the order demo does it), driven by a `SagaRunner`
//! whose every transition is an event in the saga's own stream.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Result;
use cairn_core::{EventStore, ExpectedVersion, NewEvent};
use cairn_saga::{Saga, SagaRunner, Status, Step, StepContext, StepError};

use crate::measure::{Target, fsyncs, percentile};

/// Sagas in flight at once (each task starts one and waits for its end).
const TASKS: usize = 256;

/// A step that appends `event_type` to `<category>-<saga id>`, once per key.
fn service_step(
    store: &Arc<dyn EventStore>,
    name: &'static str,
    category: &'static str,
    event_type: &'static str,
) -> Step {
    let store = store.clone();
    Step::new(name, move |ctx: StepContext| {
        let store = store.clone();
        async move {
            let event = NewEvent::json(
                event_type,
                &serde_json::json!({ "order": ctx.saga_id, "amount_cents": 4200 }),
            )?
            .with_id(ctx.event_id())
            .with_metadata(ctx.metadata());
            let written = store
                .append(&format!("{category}-{}", ctx.saga_id), ExpectedVersion::Any, vec![event])
                .await?;
            Ok::<_, StepError>(written.next_version)
        }
    })
    .compensate(|_| async { Ok(()) })
}

pub(crate) fn order_saga(store: &Arc<dyn EventStore>) -> Saga {
    Saga::new("order")
        .step(service_step(store, "create-order", "order", "OrderCreated"))
        .step(service_step(store, "charge-card", "payment", "CardCharged"))
        .step(service_step(store, "reserve-items", "inventory", "ItemsReserved"))
}

pub(crate) async fn w8(t: &Target, sagas: u64) -> Result<String> {
    let runner = SagaRunner::builder(t.store.clone(), "bench")
        .saga(order_saga(&t.store))
        .max_running(TASKS * 2)
        .run()
        .await?;
    let syncs_before = t.syncs();
    let started = Instant::now();
    let mut handles = Vec::new();
    for task in 0..TASKS as u64 {
        let runner = runner.clone();
        handles.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            for n in (task..sagas).step_by(TASKS) {
                let id = format!("w8-{n}");
                let t0 = Instant::now();
                runner
                    .start("order", &id, &serde_json::json!({ "customer": n % 997, "items": 3 }))
                    .await?;
                let state = runner.wait("order", &id).await?;
                anyhow::ensure!(
                    state.status == Status::Completed,
                    "saga {id} ended {}",
                    state.status.as_str()
                );
                latencies.push(t0.elapsed());
            }
            anyhow::Ok(latencies)
        }));
    }
    let mut latencies: Vec<Duration> = Vec::new();
    for h in handles {
        latencies.extend(h.await??);
    }
    let secs = started.elapsed().as_secs_f64();
    let syncs = fsyncs(syncs_before, t.syncs());
    runner.shutdown().await;
    latencies.sort();
    let n = latencies.len();
    Ok(format!(
        "bench W8 backend={} sagas={n} steps=3 in_flight={TASKS} secs={secs:.2} sagas_per_s={:.0} p50_ms={:.2} p99_ms={:.2}{syncs}",
        t.backend,
        n as f64 / secs,
        percentile(&latencies, 0.5) as f64 / 1000.0,
        percentile(&latencies, 0.99) as f64 / 1000.0
    ))
}
