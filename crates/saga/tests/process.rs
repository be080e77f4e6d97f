//! Process managers on the embedded store: an order fulfilment process
//! follows `order-*` and `payment-*` events correlated by correlation id,
//! ships when both arrived (in either order), and cancels an order whose
//! payment missed its deadline. Restarts do not send commands twice and
//! resume from the checkpoint; a crash between a command and its record sends
//! it again with the same key. A command that keeps failing (or hangs) parks
//! its instance while the others go on, and a resume replays what the
//! instance held back, in order.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cairn_core::{
    EventStore, ExpectedVersion, Metadata, NewEvent, Position, Query, QueryItem, ReadStreamOptions,
    RecordedEvent, StoreError,
};
use cairn_log::EmbeddedStore;
use cairn_saga::{Command, Effect, Message, Process, ProcessManager, TimerEvent, timer_stream};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use uuid::Uuid;

fn store_in(dir: &Path) -> Arc<dyn EventStore> {
    Arc::new(EmbeddedStore::open(dir).expect("open store"))
}

async fn eventually(what: &str, timeout: Duration, mut check: impl AsyncFnMut() -> bool) {
    let start = Instant::now();
    while !check().await {
        assert!(start.elapsed() < timeout, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Fulfilment {
    order: Option<String>,
    paid: bool,
}

struct OrderFulfilment {
    payment_window: Duration,
}

impl Process for OrderFulfilment {
    type State = Fulfilment;

    fn name(&self) -> &str {
        "fulfilment"
    }

    fn query(&self) -> Query {
        Query::new([
            QueryItem::types(["OrderPlaced"]).with_categories(["order"]),
            QueryItem::types(["PaymentReceived"]).with_categories(["payment"]),
        ])
    }

    fn react(&self, state: &mut Fulfilment, message: Message) -> Vec<Effect> {
        match message {
            Message::Event(e) if e.event_type == "OrderPlaced" => {
                state.order = Some(e.stream.clone());
                if state.paid {
                    ship(state)
                } else {
                    vec![Effect::deadline("payment", self.payment_window)]
                }
            }
            Message::Event(e) if e.event_type == "PaymentReceived" => {
                state.paid = true;
                if state.order.is_some() { ship(state) } else { Vec::new() }
            }
            Message::Deadline { name } if name == "payment" && !state.paid => {
                vec![Effect::command("CancelOrder", json!({ "order": state.order })), Effect::End]
            }
            _ => Vec::new(),
        }
    }
}

fn ship(state: &Fulfilment) -> Vec<Effect> {
    vec![Effect::command("ShipOrder", json!({ "order": state.order })), Effect::End]
}

/// Commands received, in order: (name, order, key).
type Sent = Arc<Mutex<Vec<(String, String, String)>>>;

async fn start(
    store: &Arc<dyn EventStore>,
    sent: &Sent,
    window: Duration,
    checkpoint_every: Duration,
) -> ProcessManager<OrderFulfilment> {
    let sent = sent.clone();
    ProcessManager::builder(
        store.clone(),
        OrderFulfilment { payment_window: window },
        move |command: Command| {
            sent.lock().unwrap().push((
                command.name,
                command.payload["order"].as_str().unwrap_or_default().to_string(),
                command.key,
            ));
            async { Ok::<(), String>(()) }
        },
    )
    .checkpoint_every(checkpoint_every)
    .start()
    .await
    .unwrap()
}

async fn emit(
    store: &dyn EventStore,
    stream: &str,
    event_type: &str,
    correlation: Uuid,
) -> Position {
    let metadata = Metadata { correlation_id: Some(correlation), ..Metadata::default() };
    let event = NewEvent::json(event_type, &json!({})).unwrap().with_metadata(metadata);
    store.append(stream, ExpectedVersion::Any, vec![event]).await.unwrap().position
}

fn commands(sent: &Sent, name: &str) -> Vec<String> {
    let mut orders: Vec<String> =
        sent.lock().unwrap().iter().filter(|c| c.0 == name).map(|c| c.1.clone()).collect();
    orders.sort();
    orders
}

fn each_key_once(sent: &Sent) {
    let mut keys: HashMap<String, usize> = HashMap::new();
    for (_, _, key) in sent.lock().unwrap().iter() {
        *keys.entry(key.clone()).or_default() += 1;
    }
    assert!(keys.values().all(|n| *n == 1), "a command was sent twice: {keys:?}");
}

async fn read(store: &dyn EventStore, stream: &str) -> Vec<RecordedEvent> {
    match store.read_stream(stream, ReadStreamOptions::forward()).await {
        Ok(events) => events,
        Err(StoreError::StreamNotFound { .. }) => Vec::new(),
        Err(e) => panic!("{e}"),
    }
}

#[tokio::test]
async fn ships_paid_orders_and_cancels_unpaid_ones_at_the_deadline() {
    let dir = tempfile::tempdir().unwrap();
    let store = store_in(dir.path());
    let sent = Sent::default();
    // A window long enough that the shipments are seen before it ends, even on a slow machine.
    let window = Duration::from_secs(3);
    let manager = start(&store, &sent, window, Duration::from_secs(1)).await;
    let (paid, unpaid, paid_first) = (Uuid::now_v7(), Uuid::now_v7(), Uuid::now_v7());
    let placed_at = Instant::now();
    emit(store.as_ref(), "order-1", "OrderPlaced", paid).await;
    emit(store.as_ref(), "order-2", "OrderPlaced", unpaid).await;
    emit(store.as_ref(), "payment-1", "PaymentReceived", paid).await;
    emit(store.as_ref(), "payment-3", "PaymentReceived", paid_first).await;
    emit(store.as_ref(), "order-3", "OrderPlaced", paid_first).await;
    // Not correlated, or not followed: ignored.
    store
        .append(
            "order-9",
            ExpectedVersion::Any,
            vec![NewEvent::json("OrderPlaced", &json!({})).unwrap()],
        )
        .await
        .unwrap();
    emit(store.as_ref(), "order-1", "OrderNoted", paid).await;

    eventually("two shipments", Duration::from_secs(5), async || {
        commands(&sent, "ShipOrder").len() == 2
    })
    .await;
    assert_eq!(
        commands(&sent, "ShipOrder"),
        ["order-1", "order-3"],
        "paid before or after the order was placed"
    );
    assert!(commands(&sent, "CancelOrder").is_empty(), "order-2's deadline is not due yet");
    eventually("the cancellation", Duration::from_secs(10), async || {
        !commands(&sent, "CancelOrder").is_empty()
    })
    .await;
    assert!(placed_at.elapsed() >= window);
    assert_eq!(commands(&sent, "CancelOrder"), ["order-2"]);

    // A payment after the cancellation: the instance is over.
    emit(store.as_ref(), "payment-2", "PaymentReceived", unpaid).await;
    let last = emit(store.as_ref(), "payment-1", "PaymentReceived", paid).await;
    eventually("the last event handled", Duration::from_secs(5), async || {
        manager.position() == Some(last)
    })
    .await;
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(
        sent.lock().unwrap().len(),
        3,
        "order-1's and order-3's deadlines were cancelled: {:?}",
        sent.lock().unwrap()
    );
    each_key_once(&sent);

    let instance = manager.instance(&unpaid.to_string()).await.unwrap().unwrap();
    assert!(instance.ended && !instance.state.paid && instance.deadlines.is_empty());
    assert_eq!(instance.version, 2, "placed, then the deadline");
    let instance = manager.instance(&paid.to_string()).await.unwrap().unwrap();
    assert!(instance.ended && instance.state.paid);
    assert!(manager.instance(&Uuid::now_v7().to_string()).await.unwrap().is_none());
    let stream = read(store.as_ref(), &format!("$saga-fulfilment-{paid}")).await;
    assert_eq!(
        stream.iter().map(|e| e.event_type.as_str()).collect::<Vec<_>>(),
        ["ProcessReacted", "ProcessEnded"]
    );

    let timers: Vec<_> = read(store.as_ref(), &timer_stream("fulfilment-deadlines"))
        .await
        .iter()
        .filter_map(TimerEvent::from_recorded)
        .collect();
    let count = |t: &str| timers.iter().filter(|e| e.type_name() == t).count();
    assert_eq!(
        (count("TimerScheduled"), count("TimerCancelled"), count("TimerFired")),
        (2, 1, 1),
        "{timers:?}"
    );
    assert!(manager.last_error().is_none(), "{:?}", manager.last_error());
}

#[tokio::test]
async fn a_restart_sends_nothing_twice_and_resumes_from_the_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let store = store_in(dir.path());
    let sent = Sent::default();
    let orders: Vec<Uuid> = (0..6).map(|_| Uuid::now_v7()).collect();
    let manager = start(&store, &sent, Duration::from_secs(3600), Duration::from_millis(50)).await;
    for (i, id) in orders.iter().enumerate() {
        emit(store.as_ref(), &format!("order-{i}"), "OrderPlaced", *id).await;
    }
    let mut last = Position::START;
    for (i, id) in orders.iter().enumerate().take(3) {
        last = emit(store.as_ref(), &format!("payment-{i}"), "PaymentReceived", *id).await;
    }
    eventually("three shipments", Duration::from_secs(5), async || {
        commands(&sent, "ShipOrder").len() == 3
    })
    .await;
    let checkpoint = async || {
        read(store.as_ref(), "$saga-fulfilment-$checkpoint")
            .await
            .last()
            .and_then(|e| e.json::<Position>().ok())
    };
    eventually("the checkpoint", Duration::from_secs(5), async || checkpoint().await == Some(last))
        .await;
    drop(manager);

    // Restarted: from the checkpoint, so nothing is handled again; the
    // other orders are still waiting for their payment.
    let manager = start(&store, &sent, Duration::from_secs(3600), Duration::from_secs(3600)).await;
    assert_eq!(manager.started_from(), Some(last));
    for (i, id) in orders.iter().enumerate().skip(3).take(2) {
        last = emit(store.as_ref(), &format!("payment-{i}"), "PaymentReceived", *id).await;
    }
    eventually("five shipments", Duration::from_secs(5), async || {
        commands(&sent, "ShipOrder").len() == 5
    })
    .await;
    eventually("the last payment handled", Duration::from_secs(5), async || {
        manager.position() == Some(last)
    })
    .await;
    drop(manager);

    // Its checkpoint was not written again (once an hour): the next one gets
    // the last two payments again, and its instances say they were handled.
    let manager = start(&store, &sent, Duration::from_secs(3600), Duration::from_millis(50)).await;
    assert!(manager.started_from() < Some(last));
    eventually("the redelivered payments", Duration::from_secs(5), async || {
        manager.position() == Some(last)
    })
    .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        commands(&sent, "ShipOrder"),
        ["order-0", "order-1", "order-2", "order-3", "order-4"]
    );
    each_key_once(&sent);
    manager.shutdown().await;
    assert_eq!(checkpoint().await, Some(last), "shutdown writes the checkpoint");
    let unpaid = ProcessManager::builder(
        store.clone(),
        OrderFulfilment { payment_window: Duration::ZERO },
        |_| async { Ok::<(), String>(()) },
    )
    .start()
    .await
    .unwrap()
    .instance(&orders[5].to_string())
    .await
    .unwrap()
    .unwrap();
    assert!(
        !unpaid.ended && unpaid.deadlines.len() == 1,
        "order-5 still waits for its payment: {unpaid:?}"
    );
}

#[tokio::test]
async fn a_deadline_set_before_a_restart_fires_once_after_it() {
    let dir = tempfile::tempdir().unwrap();
    let store = store_in(dir.path());
    let sent = Sent::default();
    // Due 1.5 s after the order: the manager is shut down before that, and none runs when it comes due.
    let window = Duration::from_millis(1500);
    let manager = start(&store, &sent, window, Duration::from_millis(50)).await;
    let order = Uuid::now_v7();
    let placed_at = Instant::now();
    let placed = emit(store.as_ref(), "order-1", "OrderPlaced", order).await;
    eventually("the order handled", Duration::from_secs(5), async || {
        manager.position() == Some(placed)
    })
    .await;
    manager.shutdown().await;
    drop(manager);
    assert!(sent.lock().unwrap().is_empty(), "shut down before the deadline");
    tokio::time::sleep((window + Duration::from_millis(200)).saturating_sub(placed_at.elapsed()))
        .await;
    assert!(sent.lock().unwrap().is_empty(), "no manager ran when it came due");

    let manager = start(&store, &sent, Duration::from_millis(400), Duration::from_millis(50)).await;
    eventually("the cancellation", Duration::from_secs(5), async || {
        commands(&sent, "CancelOrder").len() == 1
    })
    .await;
    // Dropped here it could be cut between sending and recording (then the
    // command goes again, with its key); shutdown lets the reaction finish.
    manager.shutdown().await;
    let manager = start(&store, &sent, Duration::from_millis(400), Duration::from_millis(50)).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(sent.lock().unwrap().len(), 1, "{:?}", sent.lock().unwrap());
    assert!(manager.instance(&order.to_string()).await.unwrap().unwrap().ended);
}

#[tokio::test]
async fn a_crash_before_the_record_sends_the_same_command_again_with_the_same_key() {
    let dir = tempfile::tempdir().unwrap();
    let store = store_in(dir.path());
    let sent = Sent::default();
    let hang = Arc::new(AtomicBool::new(true));
    let handler = {
        let (sent, hang) = (sent.clone(), hang.clone());
        move |command: Command| {
            sent.lock().unwrap().push((command.name.clone(), String::new(), command.key.clone()));
            let hang = hang.swap(false, Ordering::AcqRel);
            async move {
                if hang {
                    // The process dies while the command is on its way.
                    std::future::pending::<()>().await;
                }
                Ok::<(), String>(())
            }
        }
    };
    let process = || OrderFulfilment { payment_window: Duration::from_secs(3600) };
    let manager =
        ProcessManager::builder(store.clone(), process(), handler.clone()).start().await.unwrap();
    let order = Uuid::now_v7();
    emit(store.as_ref(), "order-1", "OrderPlaced", order).await;
    emit(store.as_ref(), "payment-1", "PaymentReceived", order).await;
    eventually("the command", Duration::from_secs(5), async || sent.lock().unwrap().len() == 1)
        .await;
    drop(manager);
    let instance_stream = format!("$saga-fulfilment-{order}");
    assert_eq!(
        read(store.as_ref(), &instance_stream).await.len(),
        1,
        "only the order was recorded"
    );

    let manager = ProcessManager::builder(store.clone(), process(), handler).start().await.unwrap();
    eventually("the command again", Duration::from_secs(5), async || {
        sent.lock().unwrap().len() == 2
    })
    .await;
    eventually("the record", Duration::from_secs(5), async || {
        read(store.as_ref(), &instance_stream).await.len() == 2
    })
    .await;
    let sent = sent.lock().unwrap().clone();
    assert_eq!(sent[0], sent[1], "the same command with the same key");
    let record: Value = read(store.as_ref(), &instance_stream).await[1].json().unwrap();
    assert_eq!(record["commands"], json!([sent[0].2]));
    assert!(manager.instance(&order.to_string()).await.unwrap().unwrap().ended);
}

// Parking: a command that keeps failing parks its instance, the others go on,
// and a resume replays what the instance skipped, in order.

/// Keeps a running list per correlation: each `Noted` event (data `{"n": n}`)
/// sends `Record n`.
struct Ledger;

impl Process for Ledger {
    type State = Vec<u64>;

    fn name(&self) -> &str {
        "ledger"
    }

    fn query(&self) -> Query {
        Query::new([QueryItem::types(["Noted"]).with_categories(["note"])])
    }

    fn react(&self, state: &mut Vec<u64>, message: Message) -> Vec<Effect> {
        let Message::Event(e) = message else { return Vec::new() };
        let n = e.json::<Value>().unwrap()["n"].as_u64().unwrap();
        state.push(n);
        vec![Effect::command("Record", json!({ "n": n }))]
    }
}

/// What the handler accepted, in order: (correlation, n, key).
type Recorded = Arc<Mutex<Vec<(String, u64, String)>>>;

/// A ledger manager whose handler refuses `Record` for (correlation, n) in
/// `refuse` (3 attempts, 50 ms apart at first) and hangs for `hang`.
async fn ledger(
    store: &Arc<dyn EventStore>,
    recorded: &Recorded,
    refuse: &Arc<Mutex<Vec<(String, u64)>>>,
    hang: Option<(String, u64)>,
) -> ProcessManager<Ledger> {
    let (recorded, refuse) = (recorded.clone(), refuse.clone());
    ProcessManager::builder(store.clone(), Ledger, move |command: Command| {
        let n = command.payload["n"].as_u64().unwrap();
        let this = (command.correlation.clone(), n);
        let refused = refuse.lock().unwrap().contains(&this);
        let hangs = hang.as_ref() == Some(&this);
        let recorded = recorded.clone();
        async move {
            if hangs {
                std::future::pending::<()>().await;
            }
            if refused {
                return Err(format!("the ledger refuses {n}"));
            }
            recorded.lock().unwrap().push((command.correlation, n, command.key));
            Ok(())
        }
    })
    .command_attempts(3)
    .command_timeout(Duration::from_millis(300))
    .start()
    .await
    .unwrap()
}

async fn note(store: &dyn EventStore, correlation: Uuid, n: u64) -> Position {
    let metadata = Metadata { correlation_id: Some(correlation), ..Metadata::default() };
    let event = NewEvent::json("Noted", &json!({ "n": n })).unwrap().with_metadata(metadata);
    store
        .append(&format!("note-{correlation}"), ExpectedVersion::Any, vec![event])
        .await
        .unwrap()
        .position
}

fn recorded_for(recorded: &Recorded, correlation: Uuid) -> Vec<u64> {
    recorded
        .lock()
        .unwrap()
        .iter()
        .filter(|r| r.0 == correlation.to_string())
        .map(|r| r.1)
        .collect()
}

async fn parked_set(store: &dyn EventStore) -> Vec<String> {
    let events = read(store, &cairn_saga::parked_stream("ledger")).await;
    events
        .last()
        .map(|e| {
            serde_json::from_value(e.json::<Value>().unwrap()["correlations"].clone()).unwrap()
        })
        .unwrap_or_default()
}

#[tokio::test]
async fn a_failing_command_parks_its_instance_the_others_go_on_and_a_resume_replays_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let store = store_in(dir.path());
    let (recorded, refuse) = (Recorded::default(), Arc::new(Mutex::new(Vec::new())));
    let (a, b) = (Uuid::now_v7(), Uuid::now_v7());
    refuse.lock().unwrap().push((a.to_string(), 2));
    let manager = ledger(&store, &recorded, &refuse, None).await;

    note(store.as_ref(), a, 1).await;
    note(store.as_ref(), a, 2).await;
    note(store.as_ref(), b, 1).await;
    note(store.as_ref(), a, 3).await;
    let last = note(store.as_ref(), b, 2).await;
    eventually("b handled past a's park", Duration::from_secs(10), async || {
        manager.position() == Some(last)
    })
    .await;
    assert_eq!(recorded_for(&recorded, b), [1, 2], "b goes on while a is parked");
    assert_eq!(recorded_for(&recorded, a), [1], "a stopped at 2, and 3 waits behind it");
    let instance = manager.instance(&a.to_string()).await.unwrap().unwrap();
    let parked = instance.parked.expect("a is parked");
    assert_eq!(
        (parked.command.as_str(), parked.attempts, parked.error.as_str()),
        ("Record", 3, "the ledger refuses 2")
    );
    assert!(parked.handled.starts_with("Noted in note-"), "{}", parked.handled);
    assert_eq!(instance.state, [1], "the state is the last recorded reaction's");
    assert_eq!(parked_set(store.as_ref()).await, [a.to_string()]);

    // Not parked: refused, nothing written.
    let version = read(store.as_ref(), &format!("$saga-ledger-{b}")).await.len();
    assert!(matches!(
        cairn_saga::resume_process(store.as_ref(), "ledger", &b.to_string(), "ops").await,
        Err(cairn_saga::ProcessError::NotParked(_))
    ));
    assert!(matches!(
        cairn_saga::resume_process(store.as_ref(), "ledger", "nobody", "ops").await,
        Err(cairn_saga::ProcessError::NotFound(_))
    ));
    assert_eq!(read(store.as_ref(), &format!("$saga-ledger-{b}")).await.len(), version);

    // Fixed, resumed: 2 goes again (same key as the refused attempts), then 3; a new 4 after them.
    refuse.lock().unwrap().clear();
    let resumed =
        cairn_saga::resume_process(store.as_ref(), "ledger", &a.to_string(), "ops").await.unwrap();
    assert_eq!(resumed, parked);
    note(store.as_ref(), a, 4).await;
    eventually("a replayed", Duration::from_secs(10), async || {
        recorded_for(&recorded, a).len() == 4
    })
    .await;
    assert_eq!(recorded_for(&recorded, a), [1, 2, 3, 4], "in order");
    let instance = manager.instance(&a.to_string()).await.unwrap().unwrap();
    assert!(instance.parked.is_none() && instance.resumed.is_none());
    assert_eq!(instance.state, [1, 2, 3, 4]);
    eventually("the parked set emptied", Duration::from_secs(5), async || {
        parked_set(store.as_ref()).await.is_empty()
    })
    .await;
    let keys: Vec<String> = recorded.lock().unwrap().iter().map(|r| r.2.clone()).collect();
    assert_eq!(
        keys.len(),
        keys.iter().collect::<std::collections::HashSet<_>>().len(),
        "each command accepted once"
    );
    manager.shutdown().await;
}

#[tokio::test]
async fn a_parked_instance_is_resumed_by_the_next_manager_and_a_hanging_command_counts_as_failed() {
    let dir = tempfile::tempdir().unwrap();
    let store = store_in(dir.path());
    let (recorded, refuse) = (Recorded::default(), Arc::new(Mutex::new(Vec::new())));
    let a = Uuid::now_v7();
    let manager = ledger(&store, &recorded, &refuse, Some((a.to_string(), 1))).await;
    note(store.as_ref(), a, 1).await;
    let last = note(store.as_ref(), a, 2).await;
    eventually("a parked", Duration::from_secs(10), async || manager.position() == Some(last))
        .await;
    let parked = manager.instance(&a.to_string()).await.unwrap().unwrap().parked.expect("parked");
    assert_eq!(parked.error, "no answer within 300 ms");
    manager.shutdown().await;
    drop(manager);

    // A later manager knows it is parked (from `$saga-ledger-$parked`), and replays it once resumed.
    cairn_saga::resume_process(store.as_ref(), "ledger", &a.to_string(), "ops").await.unwrap();
    let manager = ledger(&store, &recorded, &refuse, None).await;
    eventually("a replayed by the new manager", Duration::from_secs(10), async || {
        recorded_for(&recorded, a) == [1, 2]
    })
    .await;
    assert_eq!(manager.instance(&a.to_string()).await.unwrap().unwrap().state, [1, 2]);
    manager.shutdown().await;
}

#[tokio::test]
async fn a_deadline_whose_command_keeps_failing_parks_and_runs_again_on_resume() {
    let dir = tempfile::tempdir().unwrap();
    let store = store_in(dir.path());
    let sent = Sent::default();
    let refusing = Arc::new(AtomicBool::new(true));
    let (log, refuse) = (sent.clone(), refusing.clone());
    let manager = ProcessManager::builder(
        store.clone(),
        OrderFulfilment { payment_window: Duration::from_millis(100) },
        move |command: Command| {
            let (log, refuse) = (log.clone(), refuse.load(Ordering::SeqCst));
            async move {
                if refuse {
                    return Err("orders service down".to_string());
                }
                log.lock().unwrap().push((
                    command.name,
                    command.payload["order"].as_str().unwrap_or_default().to_string(),
                    command.key,
                ));
                Ok(())
            }
        },
    )
    .command_attempts(2)
    .start()
    .await
    .unwrap();
    let order = Uuid::now_v7();
    emit(store.as_ref(), "order-1", "OrderPlaced", order).await;
    let instance = async || manager.instance(&order.to_string()).await.unwrap();
    eventually("the deadline parked", Duration::from_secs(10), async || {
        instance().await.is_some_and(|i| i.parked.is_some())
    })
    .await;
    let parked = instance().await.unwrap().parked.unwrap();
    assert_eq!(
        (parked.handled.as_str(), parked.command.as_str()),
        ("deadline payment", "CancelOrder")
    );
    assert!(parked.deadline.is_some());

    refusing.store(false, Ordering::SeqCst);
    cairn_saga::resume_process(store.as_ref(), "fulfilment", &order.to_string(), "ops")
        .await
        .unwrap();
    eventually("the cancellation", Duration::from_secs(10), async || {
        commands(&sent, "CancelOrder").len() == 1
    })
    .await;
    eventually("the instance ended", Duration::from_secs(5), async || {
        instance().await.is_some_and(|i| i.ended)
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(sent.lock().unwrap().len(), 1, "{:?}", sent.lock().unwrap());
    manager.shutdown().await;
}

#[tokio::test]
async fn a_resumed_instance_is_replayed_in_order_even_if_the_parked_list_lost_it() {
    let dir = tempfile::tempdir().unwrap();
    let store = store_in(dir.path());
    let (recorded, refuse) = (Recorded::default(), Arc::new(Mutex::new(Vec::new())));
    let a = Uuid::now_v7();
    refuse.lock().unwrap().push((a.to_string(), 1));
    let manager = ledger(&store, &recorded, &refuse, None).await;
    note(store.as_ref(), a, 1).await;
    let last = note(store.as_ref(), a, 2).await;
    eventually("a parked, 2 skipped", Duration::from_secs(10), async || {
        manager.position() == Some(last)
    })
    .await;
    assert!(manager.instance(&a.to_string()).await.unwrap().unwrap().parked.is_some());
    manager.shutdown().await;
    drop(manager);
    // The list of parked instances loses it (as if its write had failed).
    let empty = NewEvent::json("ProcessesParked", &json!({ "correlations": [] })).unwrap();
    store
        .append(&cairn_saga::parked_stream("ledger"), ExpectedVersion::Any, vec![empty])
        .await
        .unwrap();
    assert!(parked_set(store.as_ref()).await.is_empty());

    refuse.lock().unwrap().clear();
    cairn_saga::resume_process(store.as_ref(), "ledger", &a.to_string(), "ops").await.unwrap();
    let manager = ledger(&store, &recorded, &refuse, None).await;
    // The next event finds the instance resumed in its own stream: it waits for the replay.
    note(store.as_ref(), a, 3).await;
    eventually("a replayed", Duration::from_secs(10), async || {
        recorded_for(&recorded, a).len() == 3
    })
    .await;
    assert_eq!(
        recorded_for(&recorded, a),
        [1, 2, 3],
        "the parked event, the skipped one, then the new one"
    );
    assert_eq!(manager.instance(&a.to_string()).await.unwrap().unwrap().state, [1, 2, 3]);
    manager.shutdown().await;
}
