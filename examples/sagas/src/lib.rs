//! The order saga — CreateOrder/CancelOrder,
//! ChargeCard/RefundCard, ReserveItems/ReleaseItems — run by a `SagaRunner`
//! on a fresh store: all goes well; the card is declined; the items are out
//! of stock; the payment service hangs and the step times out; the runner
//! stops mid-saga and a new one resumes it; an unpaid order is cancelled by
//! a durable deadline; a process manager ships paid orders, parks the one
//! whose warehouse is offline and ships it once resumed. `--payment
//! decline|hang` runs one order with that payment behaviour instead.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Result;
use cairn_core::{
    EventStore, ExpectedVersion, Metadata, NewEvent, Query, QueryItem, ReadStreamOptions,
};
use cairn_log::EmbeddedStore;
use cairn_saga::{
    Command, Effect, Message, Process, ProcessManager, Saga, SagaEvent, SagaRunner, Scheduler,
    Step, StepContext, StepError, TimerAction,
};
use serde::{Deserialize, Serialize};
use serde_json::json;

/// A numbered step's title, set apart from what the step prints.
fn step(title: &str) {
    println!("\n▸ {title}");
}

/// How the payment service behaves for an order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum Payment {
    /// The card is charged.
    Ok,
    /// The card is declined: the order is cancelled.
    Decline,
    /// The payment service never answers: the step times out, the charge is refunded (it may have gone through) and the order cancelled.
    Hang,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct OrderInput {
    customer: String,
    sku: String,
    quantity: u32,
    cents: u64,
    payment: Payment,
}

/// The charge step waits this long here (30 s by default) so the demo does not.
const CHARGE_TIMEOUT: Duration = Duration::from_secs(2);
/// What the warehouse has.
const STOCK: u32 = 5;

/// Appends one event for a step, with the step's key as its id: a step that
/// runs again after a crash writes nothing new.
async fn record(
    store: &dyn EventStore,
    ctx: &StepContext,
    stream: String,
    event_type: &str,
    data: serde_json::Value,
) -> Result<(), StepError> {
    let event =
        NewEvent::json(event_type, &data)?.with_id(ctx.event_id()).with_metadata(ctx.metadata());
    store.append(&stream, ExpectedVersion::Any, vec![event]).await?;
    Ok(())
}

async fn has(store: &dyn EventStore, stream: &str, event_type: &str) -> Result<bool, StepError> {
    let events = store.read_stream_or_empty(stream, ReadStreamOptions::forward()).await?;
    Ok(events.iter().any(|e| e.event_type == event_type))
}

/// The three services as saga steps, each with its compensation.
pub fn order_saga(store: Arc<dyn EventStore>) -> Saga {
    let s = store.clone();
    let create = Step::new("create-order", move |ctx: StepContext| {
        let store = s.clone();
        async move {
            let o: OrderInput = ctx.input()?;
            let data = json!({ "customer": o.customer, "sku": o.sku, "quantity": o.quantity, "cents": o.cents });
            record(store.as_ref(), &ctx, format!("order-{}", ctx.saga_id), "OrderCreated", data)
                .await
        }
    });
    let s = store.clone();
    let create = create.compensate(move |ctx: StepContext| {
        let store = s.clone();
        async move {
            record(
                store.as_ref(),
                &ctx,
                format!("order-{}", ctx.saga_id),
                "OrderCancelled",
                json!({ "reason": "saga compensated" }),
            )
            .await
        }
    });

    let s = store.clone();
    let charge = Step::new("charge-card", move |ctx: StepContext| {
        let store = s.clone();
        async move {
            let o: OrderInput = ctx.input()?;
            match o.payment {
                Payment::Decline => Err(StepError::new("card declined by the issuer")),
                Payment::Hang => std::future::pending().await,
                Payment::Ok => {
                    let charge = format!("ch_{}", &ctx.event_id().simple().to_string()[..10]);
                    record(
                        store.as_ref(),
                        &ctx,
                        format!("payment-{}", ctx.saga_id),
                        "CardCharged",
                        json!({ "charge": charge, "cents": o.cents }),
                    )
                    .await?;
                    Ok(charge)
                }
            }
        }
    })
    .timeout(CHARGE_TIMEOUT);
    let s = store.clone();
    let charge = charge.compensate(move |ctx: StepContext| {
        let store = s.clone();
        async move {
            // After a timeout the charge may or may not exist: refund only what was charged.
            let stream = format!("payment-{}", ctx.saga_id);
            if has(store.as_ref(), &stream, "CardCharged").await? {
                record(store.as_ref(), &ctx, stream, "CardRefunded", json!({})).await?;
                Ok("refunded")
            } else {
                Ok("nothing was charged")
            }
        }
    });

    let s = store.clone();
    let reserve = Step::new("reserve-items", move |ctx: StepContext| {
        let store = s.clone();
        async move {
            let o: OrderInput = ctx.input()?;
            if o.quantity > STOCK {
                return Err(StepError::new(format!(
                    "only {STOCK} of {} in stock, {} wanted",
                    o.sku, o.quantity
                )));
            }
            record(
                store.as_ref(),
                &ctx,
                format!("inventory-{}", ctx.saga_id),
                "ItemsReserved",
                json!({ "sku": o.sku, "quantity": o.quantity }),
            )
            .await
        }
    });
    let s = store;
    let reserve = reserve.compensate(move |ctx: StepContext| {
        let store = s.clone();
        async move {
            record(
                store.as_ref(),
                &ctx,
                format!("inventory-{}", ctx.saga_id),
                "ItemsReleased",
                json!({}),
            )
            .await
        }
    });

    Saga::new("order").step(create).step(charge).step(reserve)
}

fn order(id: u32, quantity: u32, payment: Payment) -> OrderInput {
    OrderInput {
        customer: format!("customer-{id}"),
        sku: "tea-pot".into(),
        quantity,
        cents: 2_900 * quantity as u64,
        payment,
    }
}

/// Prints a saga's history as a timeline, and what the services hold.
async fn show(store: &dyn EventStore, id: &str) -> Result<()> {
    let events =
        store.read_stream(&format!("$saga-order-{id}"), ReadStreamOptions::forward()).await?;
    let start = events.first().map(|e| e.timestamp.as_micros()).unwrap_or(0);
    for e in &events {
        let Some(event) = SagaEvent::from_recorded(e) else { continue };
        let ms = (e.timestamp.as_micros() - start) as f64 / 1000.0;
        println!("  {ms:>8.1} ms  {}", event.describe());
    }
    let mut services = Vec::new();
    for category in ["order", "payment", "inventory"] {
        if let Ok(events) =
            store.read_stream(&format!("{category}-{id}"), ReadStreamOptions::forward()).await
        {
            services.push(format!(
                "{category}-{id}: {}",
                events.iter().map(|e| e.event_type.as_str()).collect::<Vec<_>>().join(", ")
            ));
        }
    }
    println!(
        "  services: {}",
        if services.is_empty() { "nothing written".into() } else { services.join(" | ") }
    );
    Ok(())
}

async fn run_one(
    runner: &SagaRunner,
    store: &dyn EventStore,
    id: u32,
    input: OrderInput,
) -> Result<()> {
    let id = id.to_string();
    runner.start("order", &id, &input).await?;
    let state = runner.wait("order", &id).await?;
    show(store, &id).await?;
    println!("  → {}", state.status.as_str());
    Ok(())
}

/// The seven scenarios on `store`, steps numbered from `first` (the tour runs them too).
pub async fn walk(store: Arc<dyn EventStore>, first: usize) -> Result<()> {
    let runner =
        SagaRunner::builder(store.clone(), "shop").saga(order_saga(store.clone())).run().await?;
    step(&format!("{first}. All goes well: CreateOrder → ChargeCard → ReserveItems"));
    println!(
        "  Each transition is an event in the saga's own stream ($saga-order-1), appended before the next step runs."
    );
    run_one(&runner, store.as_ref(), 1, order(1, 2, Payment::Ok)).await?;

    step(&format!("{}. The card is declined: the order is cancelled (CancelOrder)", first + 1));
    run_one(&runner, store.as_ref(), 2, order(2, 2, Payment::Decline)).await?;

    step(&format!(
        "{}. Out of stock after payment: RefundCard, then CancelOrder — the completed steps undone newest first",
        first + 2
    ));
    run_one(&runner, store.as_ref(), 3, order(3, 9, Payment::Ok)).await?;

    step(&format!(
        "{}. The payment service hangs: the step times out after {} s (30 s by default)",
        first + 3,
        CHARGE_TIMEOUT.as_secs()
    ));
    println!(
        "  The charge may have gone through after we stopped waiting, so it is compensated too (the refund finds nothing to refund)."
    );
    run_one(&runner, store.as_ref(), 4, order(4, 1, Payment::Hang)).await?;

    step(&format!(
        "{}. The runner stops mid-saga; a new runner resumes it from the saga's stream",
        first + 4
    ));
    runner.start("order", "5", &order(5, 1, Payment::Hang)).await?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    runner.shutdown().await;
    println!("  Stopped while charge-card was in flight. A new runner starts:");
    let runner =
        SagaRunner::builder(store.clone(), "shop").saga(order_saga(store.clone())).run().await?;
    println!(
        "  it found {} unfinished saga(s) in the store and resumed them: create-order does not run again;",
        runner.recovered()
    );
    println!(
        "  charge-card, in flight when the runner stopped, runs again with the same idempotency key (and still hangs)."
    );
    let state = runner.wait("order", "5").await?;
    show(store.as_ref(), "5").await?;
    println!("  → {}", state.status.as_str());
    runner.shutdown().await;

    step(&format!(
        "{}. A deadline: cancel an order unpaid after 15 minutes (2 s here), surviving a restart",
        first + 5
    ));
    store
        .append(
            "order-6",
            ExpectedVersion::NoStream,
            vec![NewEvent::json("OrderCreated", &json!({ "customer": "customer-6" }))?],
        )
        .await?;
    let scheduler = Scheduler::builder(store.clone(), "orders").start().await?;
    let cancel =
        TimerAction::append("order-6", "OrderCancelled", json!({ "reason": "not paid in time" }));
    scheduler.schedule("cancel-unpaid-order-6", Duration::from_secs(2), cancel).await?;
    println!("  Scheduled in $timer-orders. The scheduler stops before it is due…");
    scheduler.shutdown().await;
    let scheduler = Scheduler::builder(store.clone(), "orders").start().await?;
    println!(
        "  …and a new one re-arms {} pending timer(s) from the stream.",
        scheduler.pending().await.len()
    );
    let fired = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let events = store.read_stream("order-6", ReadStreamOptions::forward()).await?;
            if events.iter().any(|e| e.event_type == "OrderCancelled") {
                return anyhow::Ok(events);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await??;
    println!(
        "  order-6: {}",
        fired.iter().map(|e| e.event_type.as_str()).collect::<Vec<_>>().join(", ")
    );
    scheduler.shutdown().await;

    step(&format!(
        "{}. Choreography: a process manager ships each paid order; one warehouse is offline",
        first + 6
    ));
    shipping(store).await
}

/// Ships an order when it is paid (`OrderPaid` in `checkout-*`, grouped by correlation id).
struct Shipping;

impl Process for Shipping {
    type State = ();

    fn name(&self) -> &str {
        "shipping"
    }

    fn query(&self) -> Query {
        Query::new([QueryItem::types(["OrderPaid"]).with_categories(["checkout"])])
    }

    fn react(&self, _state: &mut (), message: Message) -> Vec<Effect> {
        match message {
            Message::Event(e) => {
                vec![Effect::command("ShipOrder", json!({ "order": e.stream })), Effect::End]
            }
            Message::Deadline { .. } => Vec::new(),
        }
    }
}

/// A test on the four shipping instances (`None`: nothing recorded yet).
type Done = dyn Fn(&[Option<cairn_saga::Instance<()>>]) -> bool;

/// Four paid orders; the warehouse of the third is offline: its instance
/// parks after 3 attempts while the others ship, and ships once resumed.
async fn shipping(store: Arc<dyn EventStore>) -> Result<()> {
    let offline = Arc::new(AtomicBool::new(true));
    let shipped: Arc<Mutex<Vec<String>>> = Arc::default();
    let (down, log) = (offline.clone(), shipped.clone());
    let manager = ProcessManager::builder(store.clone(), Shipping, move |command: Command| {
        let order = command.payload["order"].as_str().unwrap_or_default().to_string();
        let refused = order == "checkout-13" && down.load(Ordering::SeqCst);
        if !refused {
            log.lock().unwrap().push(format!("{order} (key {})", command.key));
        }
        async move {
            if refused { Err("the bulky-goods warehouse is offline".to_string()) } else { Ok(()) }
        }
    })
    .command_attempts(3)
    .start()
    .await?;
    let mut correlations = Vec::new();
    for n in 11..15 {
        let correlation = uuid::Uuid::now_v7();
        let metadata = Metadata { correlation_id: Some(correlation), ..Metadata::default() };
        let paid = NewEvent::json("OrderPaid", &json!({ "cents": 12_00 }))?.with_metadata(metadata);
        store.append(&format!("checkout-{n}"), ExpectedVersion::NoStream, vec![paid]).await?;
        correlations.push(correlation.to_string());
    }
    let parked = &correlations[2];
    let until = async |what: &str, done: &Done| -> Result<()> {
        let start = std::time::Instant::now();
        loop {
            let mut instances = Vec::new();
            for c in &correlations {
                instances.push(manager.instance(c).await?);
            }
            if done(&instances) {
                return Ok(());
            }
            anyhow::ensure!(
                start.elapsed() < Duration::from_secs(20),
                "the shipping process did not get to {what}: {:?}",
                manager.last_error()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    until("three shipped and one parked", &|i| {
        i.iter().filter(|i| i.as_ref().is_some_and(|i| i.ended)).count() == 3
            && i[2].as_ref().is_some_and(|i| i.parked.is_some())
    })
    .await?;
    println!(
        "  Shipped: {}",
        shipped
            .lock()
            .unwrap()
            .iter()
            .map(|s| s.split(' ').next().unwrap_or_default())
            .collect::<Vec<_>>()
            .join(", ")
    );
    let park = manager.instance(parked).await?.and_then(|i| i.parked).expect("parked");
    println!(
        "  checkout-13 needs attention: {} failed {} times ({}); the other instances went on.",
        park.command, park.attempts, park.error
    );
    println!(
        "  `cairn sagas processes --parked` lists it; the warehouse comes back, and `cairn sagas resume shipping {parked}`:"
    );
    offline.store(false, Ordering::SeqCst);
    cairn_saga::resume_process(store.as_ref(), "shipping", parked, "the demo").await?;
    until("ship the resumed order", &|i| i.iter().all(|i| i.as_ref().is_some_and(|i| i.ended)))
        .await?;
    let last = shipped.lock().unwrap().last().cloned().unwrap_or_default();
    println!("  the manager sent ShipOrder again with the same key and went on: shipped {last}");
    manager.shutdown().await;
    Ok(())
}

pub async fn run(keep: Option<PathBuf>, payment: Option<Payment>) -> Result<()> {
    let temp = tempfile::Builder::new().prefix("cairn-demo-").tempdir()?;
    let dir = match &keep {
        Some(dir) if dir.join("log").exists() => {
            anyhow::bail!(
                "{} already holds a Cairn store; the demo needs a fresh one: pass another --keep directory",
                dir.display()
            )
        }
        Some(dir) => dir.clone(),
        None => temp.path().to_path_buf(),
    };
    println!(
        "Cairn demo: the order saga, with compensation, timeouts, crash recovery and a deadline, and a process manager (store in {})",
        dir.display()
    );
    let store: Arc<dyn EventStore> = Arc::new(EmbeddedStore::open(&dir)?);
    if let Some(payment) = payment {
        let runner = SagaRunner::builder(store.clone(), "shop")
            .saga(order_saga(store.clone()))
            .run()
            .await?;
        step(&format!(
            "An order whose payment is set to {}",
            format!("{payment:?}").to_lowercase()
        ));
        run_one(&runner, store.as_ref(), 1, order(1, 2, payment)).await?;
        runner.shutdown().await;
    } else {
        walk(store, 1).await?;
    }
    println!(
        "\nThe code: examples/sagas/src/lib.rs; the library: crates/saga (SagaRunner, Scheduler, ProcessManager)."
    );
    match keep {
        Some(dir) => println!(
            "The data stays in {0}: try `cairn --data {0} sagas list`, `cairn --data {0} sagas show order 3` and `cairn --data {0} sagas processes`.",
            dir.display()
        ),
        None => println!(
            "Run with --keep DIR to look at the sagas afterwards with `cairn --data DIR sagas list`."
        ),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use cairn_saga::{SagaState, Status, saga_stream};

    use super::*;

    #[tokio::test]
    async fn every_order_of_the_walk_ends_as_told() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn EventStore> = Arc::new(EmbeddedStore::open(dir.path()).unwrap());
        walk(store.clone(), 1).await.unwrap();
        let mut ended = Vec::new();
        for id in 1..=5 {
            let stream = saga_stream("order", &id.to_string());
            let events = store.read_stream(&stream, ReadStreamOptions::forward()).await.unwrap();
            ended.push(SagaState::fold(&stream, &events).map(|s| s.status));
        }
        assert_eq!(ended[0], Some(Status::Completed));
        // Declined, out of stock, timed out, and timed out again after a new
        // runner took it over: every step done is undone.
        assert_eq!(ended[1..], [Some(Status::Compensated); 4]);
        // The deadline fired although its scheduler stopped before it was due.
        let six = store.read_stream("order-6", ReadStreamOptions::forward()).await.unwrap();
        assert_eq!(six.last().unwrap().event_type, "OrderCancelled");
    }
}
