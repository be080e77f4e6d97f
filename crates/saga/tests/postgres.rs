//! The saga runner and the scheduler on PostgreSQL: the same outcomes as on
//! the embedded engine, and recovery from the runner's checkpoint, in a
//! schema of their own (dropped afterwards); a parked process instance
//! replayed in order after its resume.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use cairn_core::conformance::reachable;
use cairn_core::{EventStore, ReadStreamOptions};
use cairn_postgres::{PgOptions, PgStore};
use cairn_saga::{Saga, SagaRunner, Scheduler, Status, Step, StepError, TimerAction, load};
use serde_json::json;

const URL: &str = "postgres://postgres@127.0.0.1:5432/test";

async fn store() -> Option<(PgStore, String)> {
    if !reachable("127.0.0.1:5432", "PostgreSQL") {
        return None;
    }
    let schema = format!("cairn_t_saga_{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
    let store = PgStore::connect_with(URL, PgOptions::default().schema(&schema))
        .await
        .expect("connect to PostgreSQL");
    Some((store, schema))
}

async fn drop_schema(store: &PgStore, schema: &str) {
    store
        .pool()
        .get()
        .await
        .unwrap()
        .batch_execute(&format!("DROP SCHEMA {schema} CASCADE"))
        .await
        .unwrap();
}

type Log = Arc<Mutex<Vec<String>>>;

/// Waits (10 s at most) until saga `order`/`id` has recorded its first step.
async fn until_created(store: &dyn EventStore, id: &str) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while load(store, "order", id).await.unwrap().is_none_or(|s| s.completed.is_empty()) {
        assert!(std::time::Instant::now() < deadline, "saga {id} never recorded create");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Steps that log what they do; `gate` holds `charge` until released.
fn saga(log: &Log, gate: Option<Arc<tokio::sync::Semaphore>>) -> Saga {
    let mut saga = Saga::new("order");
    for name in ["create", "charge", "reserve"] {
        let (l1, l2, gate) = (log.clone(), log.clone(), gate.clone());
        saga = saga.step(
            Step::new(name, move |ctx| {
                let (log, gate) = (l1.clone(), gate.clone());
                async move {
                    if let (Some(gate), "charge") = (gate, name) {
                        let _ = gate.acquire().await.map_err(|_| StepError::new("closed"))?;
                    }
                    if ctx.input::<serde_json::Value>()?["fail"] == name {
                        return Err(StepError::new("refused"));
                    }
                    log.lock().unwrap().push(format!("{}:do:{name}", ctx.saga_id));
                    Ok(())
                }
            })
            .compensate(move |ctx| {
                let log = l2.clone();
                async move {
                    log.lock().unwrap().push(format!("{}:undo:{name}", ctx.saga_id));
                    Ok(())
                }
            }),
        );
    }
    saga
}

#[tokio::test]
async fn sagas_compensate_in_reverse_and_resume_on_postgres() {
    let Some((pg, schema)) = store().await else { return };
    let store: Arc<dyn EventStore> = Arc::new(pg.clone());
    let log = Log::default();
    let runner =
        SagaRunner::builder(store.clone(), "shop").saga(saga(&log, None)).run().await.unwrap();
    let fails = [None, Some("create"), Some("charge"), Some("reserve")];
    for (i, fail) in fails.iter().enumerate() {
        runner.start("order", &i.to_string(), &json!({ "fail": fail })).await.unwrap();
    }
    for (i, fail) in fails.iter().enumerate() {
        let state = runner.wait("order", &i.to_string()).await.unwrap();
        assert_eq!(
            state.status,
            if fail.is_some() { Status::Compensated } else { Status::Completed },
            "saga {i}"
        );
    }
    let of = |id: usize| {
        log.lock()
            .unwrap()
            .iter()
            .filter(|l| l.starts_with(&format!("{id}:")))
            .map(|l| l[2..].to_string())
            .collect::<Vec<_>>()
    };
    assert_eq!(of(0), ["do:create", "do:charge", "do:reserve"]);
    assert_eq!(of(1), Vec::<String>::new());
    assert_eq!(of(2), ["do:create", "undo:create"]);
    assert_eq!(of(3), ["do:create", "do:charge", "undo:charge", "undo:create"]);
    runner.shutdown().await;

    // A runner stopped while sagas wait at `charge`; the next one finds them.
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let held = Log::default();
    let first = SagaRunner::builder(store.clone(), "shop")
        .saga(saga(&held, Some(gate)))
        .run()
        .await
        .unwrap();
    for id in 10..15 {
        first.start("order", &id.to_string(), &json!({})).await.unwrap();
    }
    // Stop once each has recorded `create` (a fixed sleep could cut one
    // between running `create` and recording it, and `create` would rightly run again).
    for id in 10..15 {
        until_created(store.as_ref(), &id.to_string()).await;
    }
    first.shutdown().await;
    assert_eq!(held.lock().unwrap().len(), 5);
    let second =
        SagaRunner::builder(store.clone(), "shop").saga(saga(&held, None)).run().await.unwrap();
    assert_eq!(second.recovered(), 5);
    for id in 10..15 {
        assert_eq!(second.wait("order", &id.to_string()).await.unwrap().status, Status::Completed);
    }
    assert_eq!(
        held.lock().unwrap().iter().filter(|l| l.ends_with("do:create")).count(),
        5,
        "create never ran twice"
    );
    second.shutdown().await;
    drop_schema(&pg, &schema).await;
}

#[tokio::test]
async fn a_deadline_fires_once_across_a_scheduler_restart_on_postgres() {
    let Some((pg, schema)) = store().await else { return };
    let store: Arc<dyn EventStore> = Arc::new(pg.clone());
    let scheduler = Scheduler::builder(store.clone(), "orders").start().await.unwrap();
    let cancel = TimerAction::append("order-9", "OrderCancelled", json!({ "reason": "unpaid" }));
    assert!(
        scheduler.schedule("cancel-9", Duration::from_millis(400), cancel.clone()).await.unwrap()
    );
    scheduler.shutdown().await;
    let scheduler = Scheduler::builder(store.clone(), "orders").start().await.unwrap();
    assert_eq!(scheduler.pending().await.len(), 1);
    assert!(
        !scheduler.schedule("cancel-9", Duration::from_millis(400), cancel).await.unwrap(),
        "scheduling it again is a no-op"
    );
    tokio::time::timeout(Duration::from_secs(10), async {
        while store.read_stream("order-9", ReadStreamOptions::forward()).await.is_err() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the deadline fires");
    scheduler.shutdown().await;
    let again = Scheduler::builder(store.clone(), "orders").start().await.unwrap();
    assert!(again.pending().await.is_empty());
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        store.read_stream("order-9", ReadStreamOptions::forward()).await.unwrap().len(),
        1,
        "fired once"
    );
    again.shutdown().await;
    drop_schema(&pg, &schema).await;
}

/// Counts per correlation: each `Counted` event sends `Count n`.
struct Counter;

impl cairn_saga::Process for Counter {
    type State = Vec<u64>;

    fn name(&self) -> &str {
        "counter"
    }

    fn query(&self) -> cairn_core::Query {
        cairn_core::Query::new([
            cairn_core::QueryItem::types(["Counted"]).with_categories(["tally"])
        ])
    }

    fn react(&self, state: &mut Vec<u64>, message: cairn_saga::Message) -> Vec<cairn_saga::Effect> {
        let cairn_saga::Message::Event(e) = message else { return Vec::new() };
        let n = e.json::<serde_json::Value>().unwrap()["n"].as_u64().unwrap();
        state.push(n);
        vec![cairn_saga::Effect::command("Count", json!({ "n": n }))]
    }
}

#[tokio::test]
async fn a_parked_process_instance_is_replayed_in_order_on_postgres() {
    let Some((pg, schema)) = store().await else { return };
    let store: Arc<dyn EventStore> = Arc::new(pg.clone());
    let refusing = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let counted: Arc<Mutex<Vec<(String, u64)>>> = Arc::default();
    let (refuse, log) = (refusing.clone(), counted.clone());
    let manager = cairn_saga::ProcessManager::builder(
        store.clone(),
        Counter,
        move |command: cairn_saga::Command| {
            let n = command.payload["n"].as_u64().unwrap();
            let refused = n == 2 && refuse.load(std::sync::atomic::Ordering::SeqCst);
            if !refused {
                log.lock().unwrap().push((command.correlation.clone(), n));
            }
            async move { if refused { Err("refused".to_string()) } else { Ok(()) } }
        },
    )
    .command_attempts(2)
    .start()
    .await
    .unwrap();
    let (a, b) = (uuid::Uuid::now_v7(), uuid::Uuid::now_v7());
    let count = async |c: uuid::Uuid, n: u64| {
        let metadata = cairn_core::Metadata { correlation_id: Some(c), ..Default::default() };
        let event = cairn_core::NewEvent::json("Counted", &json!({ "n": n }))
            .unwrap()
            .with_metadata(metadata);
        store
            .append(&format!("tally-{c}"), cairn_core::ExpectedVersion::Any, vec![event])
            .await
            .unwrap()
            .position
    };
    for (c, n) in [(a, 1), (a, 2), (b, 1), (a, 3), (b, 3)] {
        count(c, n).await;
    }
    let of = |c: uuid::Uuid| {
        counted
            .lock()
            .unwrap()
            .iter()
            .filter(|r| r.0 == c.to_string())
            .map(|r| r.1)
            .collect::<Vec<_>>()
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while of(b) != [1, 3]
        || manager.instance(&a.to_string()).await.unwrap().is_none_or(|i| i.parked.is_none())
    {
        assert!(
            std::time::Instant::now() < deadline,
            "b counted and a parked: {:?} {:?}",
            counted.lock().unwrap(),
            manager.last_error()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(of(a), [1]);
    refusing.store(false, std::sync::atomic::Ordering::SeqCst);
    cairn_saga::resume_process(store.as_ref(), "counter", &a.to_string(), "ops").await.unwrap();
    count(a, 4).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while of(a).len() < 4 {
        assert!(
            std::time::Instant::now() < deadline,
            "a replayed: {:?} {:?}",
            of(a),
            manager.last_error()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(of(a), [1, 2, 3, 4], "in order");
    manager.shutdown().await;
    drop_schema(&pg, &schema).await;
}
