//! Durable timers on the embedded store: they fire once and not before they
//! are due, can be cancelled, retry a failing callback with backoff, recover
//! from their newest snapshot, and fire once after the process holding them
//! was SIGKILLed (`timers_fire_once_after_a_kill` runs this binary again as a
//! child that executes only `child_scheduler`).

use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use cairn_core::conformance::spawn_ready_child;
use cairn_core::{EventStore, NewEvent, ReadStreamOptions, RecordedEvent, StoreError};
use cairn_log::EmbeddedStore;
use cairn_saga::{
    FiredTimer, Scheduler, TimerAction, TimerError, TimerEvent, derived_id, timer_stream,
};
use serde_json::json;

fn store_in(dir: &Path) -> Arc<dyn EventStore> {
    Arc::new(EmbeddedStore::open(dir).expect("open store"))
}

async fn events(store: &dyn EventStore, stream: &str) -> Vec<RecordedEvent> {
    match store.read_stream(stream, ReadStreamOptions::forward()).await {
        Ok(events) => events,
        Err(StoreError::StreamNotFound { .. }) => Vec::new(),
        Err(e) => panic!("read {stream}: {e}"),
    }
}

async fn history(store: &dyn EventStore, scheduler: &str) -> Vec<TimerEvent> {
    events(store, &timer_stream(scheduler))
        .await
        .iter()
        .map(|e| TimerEvent::from_recorded(e).expect("a timer event"))
        .collect()
}

fn fired_ids(history: &[TimerEvent]) -> Vec<String> {
    history
        .iter()
        .filter_map(
            |e| if let TimerEvent::TimerFired { id, .. } = e { Some(id.clone()) } else { None },
        )
        .collect()
}

async fn eventually(what: &str, timeout: Duration, mut check: impl AsyncFnMut() -> bool) {
    let start = Instant::now();
    while !check().await {
        assert!(start.elapsed() < timeout, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

type Calls = Arc<Mutex<Vec<(String, u32, Instant)>>>;

/// A scheduler whose "cancel-order" callback records its calls.
async fn recording(store: &Arc<dyn EventStore>, name: &str) -> (Scheduler, Calls) {
    let calls: Calls = Arc::default();
    let seen = calls.clone();
    let scheduler = Scheduler::builder(store.clone(), name)
        .on("cancel-order", move |timer: FiredTimer| {
            seen.lock().unwrap().push((timer.id, timer.attempt, Instant::now()));
            async { Ok::<(), String>(()) }
        })
        .start()
        .await
        .unwrap();
    (scheduler, calls)
}

#[tokio::test]
async fn due_timers_fire_once_and_not_before() {
    let dir = tempfile::tempdir().unwrap();
    let store = store_in(dir.path());
    let (scheduler, calls) = recording(&store, "orders").await;
    // Due well after the checks below, even on a slow machine.
    let due = Duration::from_millis(1500);
    let start = Instant::now();
    let unpaid = TimerAction::callback("cancel-order", json!({ "order": "order-1" }));
    assert!(scheduler.schedule("order-1/unpaid", due, unpaid.clone()).await.unwrap());
    assert!(
        !scheduler
            .schedule("order-1/unpaid", Duration::from_millis(50), unpaid.clone())
            .await
            .unwrap(),
        "the same timer again: a no-op"
    );
    let remind =
        TimerAction::append("order-2", "PaymentReminderDue", json!({ "order": "order-2" }));
    assert!(scheduler.schedule("order-2/remind", SystemTime::now() + due, remind).await.unwrap());
    let late = TimerAction::callback("cancel-order", json!({}));
    assert!(
        scheduler
            .schedule("order-0/unpaid", SystemTime::now() - Duration::from_secs(5), late)
            .await
            .unwrap()
    );
    assert!(matches!(
        scheduler
            .schedule("x", Duration::ZERO, TimerAction::callback("no-such-kind", json!({})))
            .await,
        Err(TimerError::UnknownKind(_))
    ));

    eventually("the past-due timer", Duration::from_secs(5), async || {
        calls.lock().unwrap().len() == 1
    })
    .await;
    tokio::time::sleep(Duration::from_millis(150).saturating_sub(start.elapsed())).await;
    assert_eq!(calls.lock().unwrap().len(), 1, "the others are not due yet");
    assert!(events(store.as_ref(), "order-2").await.is_empty());
    assert!(start.elapsed() < due, "checked before they were due");

    eventually("both due timers", Duration::from_secs(10), async || {
        calls.lock().unwrap().len() == 2 && !events(store.as_ref(), "order-2").await.is_empty()
    })
    .await;
    let (id, attempt, at) = calls.lock().unwrap()[1].clone();
    assert_eq!((id.as_str(), attempt), ("order-1/unpaid", 1));
    assert!(
        at.duration_since(start) >= due,
        "fired after {:?}, due after {due:?}",
        at.duration_since(start)
    );
    let appended = events(store.as_ref(), "order-2").await;
    assert_eq!(appended[0].event_type, "PaymentReminderDue");
    assert_eq!(
        appended[0].id,
        derived_id("$timer-orders/order-2/remind"),
        "the event id comes from the timer id"
    );

    // Once: not again, not when scheduled again after firing.
    assert!(!scheduler.schedule("order-1/unpaid", Duration::ZERO, unpaid).await.unwrap());
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(calls.lock().unwrap().len(), 2);
    assert_eq!(events(store.as_ref(), "order-2").await.len(), 1);
    assert!(scheduler.pending().await.is_empty());
    let history = history(store.as_ref(), "orders").await;
    let types: Vec<_> = history.iter().map(TimerEvent::type_name).collect();
    assert_eq!(types.iter().filter(|t| **t == "TimerScheduled").count(), 3);
    let mut fired = fired_ids(&history);
    fired.sort();
    assert_eq!(fired, ["order-0/unpaid", "order-1/unpaid", "order-2/remind"]);
    assert_eq!(types.len(), 6, "{types:?}");
}

#[tokio::test]
async fn cancelled_timers_do_not_fire() {
    let dir = tempfile::tempdir().unwrap();
    let store = store_in(dir.path());
    let (scheduler, calls) = recording(&store, "orders").await;
    let action = TimerAction::callback("cancel-order", json!({ "order": "order-7" }));
    // Due in 2 s: cancelled well before, even on a slow machine.
    scheduler.schedule("order-7/unpaid", Duration::from_secs(2), action.clone()).await.unwrap();
    scheduler.schedule("order-8/unpaid", Duration::from_secs(2), action).await.unwrap();
    assert!(scheduler.cancel("order-7/unpaid").await.unwrap(), "paid in time");
    assert!(!scheduler.cancel("order-7/unpaid").await.unwrap(), "cancelled already");
    assert!(!scheduler.cancel("never-scheduled").await.unwrap());
    eventually("the other timer", Duration::from_secs(10), async || {
        calls.lock().unwrap().len() == 1
    })
    .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(calls.lock().unwrap()[0].0, "order-8/unpaid");
    assert_eq!(calls.lock().unwrap().len(), 1);
    assert!(!scheduler.cancel("order-8/unpaid").await.unwrap(), "it fired");
    let history = history(store.as_ref(), "orders").await;
    assert!(history.contains(&TimerEvent::TimerCancelled { id: "order-7/unpaid".into() }));
    assert_eq!(fired_ids(&history), ["order-8/unpaid"]);
    scheduler.shutdown().await;

    let (again, calls) = recording(&store, "orders").await;
    assert_eq!(again.recovery().pending, 0);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(calls.lock().unwrap().is_empty());
}

#[tokio::test]
async fn a_failing_callback_is_retried_with_backoff() {
    let dir = tempfile::tempdir().unwrap();
    let store = store_in(dir.path());
    let calls: Calls = Arc::default();
    let seen = calls.clone();
    let scheduler =
        Scheduler::builder(store.clone(), "payments")
            .backoff(Duration::from_millis(100), Duration::from_secs(1))
            .on("charge", move |timer: FiredTimer| {
                seen.lock().unwrap().push((timer.id, timer.attempt, Instant::now()));
                async move {
                    if timer.attempt < 3 { Err("payment service unavailable") } else { Ok(()) }
                }
            })
            .start()
            .await
            .unwrap();
    scheduler
        .schedule("charge-1", Duration::ZERO, TimerAction::callback("charge", json!({})))
        .await
        .unwrap();
    eventually("the third attempt", Duration::from_secs(5), async || {
        fired_ids(&history(store.as_ref(), "payments").await).len() == 1
    })
    .await;
    let calls = calls.lock().unwrap().clone();
    assert_eq!(calls.iter().map(|c| c.1).collect::<Vec<_>>(), [1, 2, 3]);
    assert!(calls[1].2 - calls[0].2 >= Duration::from_millis(100), "first backoff");
    assert!(calls[2].2 - calls[1].2 >= Duration::from_millis(200), "doubled");
    let history = history(store.as_ref(), "payments").await;
    let failures: Vec<_> = history
        .iter()
        .filter_map(|e| {
            if let TimerEvent::TimerFailed { attempt, error, .. } = e {
                Some((*attempt, error.as_str()))
            } else {
                None
            }
        })
        .collect();
    assert_eq!(failures, [(1, "payment service unavailable"), (2, "payment service unavailable")]);
    assert_eq!(history.last(), Some(&TimerEvent::TimerFired { id: "charge-1".into(), attempt: 3 }));
}

#[tokio::test]
async fn recovery_starts_at_the_newest_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    let store = store_in(dir.path());
    let start = |store: Arc<dyn EventStore>, calls: Calls| async move {
        Scheduler::builder(store, "orders")
            .snapshot_every(10)
            .on("cancel-order", move |timer: FiredTimer| {
                calls.lock().unwrap().push((timer.id, timer.attempt, Instant::now()));
                async { Ok::<(), String>(()) }
            })
            .start()
            .await
            .unwrap()
    };
    let calls: Calls = Arc::default();
    let scheduler = start(store.clone(), calls.clone()).await;
    let action = TimerAction::callback("cancel-order", json!({}));
    for i in 0..40 {
        scheduler
            .schedule(&format!("later-{i}"), Duration::from_secs(3600), action.clone())
            .await
            .unwrap();
    }
    for i in 0..15 {
        scheduler.cancel(&format!("later-{i}")).await.unwrap();
    }
    scheduler.schedule("soon", Duration::from_millis(300), action).await.unwrap();
    scheduler.shutdown().await;
    drop(scheduler);
    let snapshots = history(store.as_ref(), "orders")
        .await
        .iter()
        .filter(|e| e.type_name() == "TimersPending")
        .count();
    assert_eq!(snapshots, 5, "56 timer events, a snapshot after every 10");

    let again = start(store.clone(), calls.clone()).await;
    let recovery = again.recovery();
    assert!(recovery.from_snapshot);
    assert!(recovery.events_read < 10, "{recovery:?}");
    assert_eq!(recovery.pending, 26, "25 later, 1 soon");
    eventually("the timer due soon", Duration::from_secs(5), async || {
        calls.lock().unwrap().len() == 1
    })
    .await;
    let pending = again.pending().await;
    assert_eq!(pending.len(), 25);
    assert_eq!(pending[0].id, "later-15", "{:?}", pending[0]);
}

const DIR_VAR: &str = "CAIRN_SAGA_TIMER_DIR";
const CYCLE_VAR: &str = "CAIRN_SAGA_TIMER_CYCLE";
const TIMERS: usize = 24;

fn timer_ids(cycle: usize) -> Vec<String> {
    (0..TIMERS).map(|i| format!("c{cycle}-t{i}")).collect()
}

/// Where a firing leaves its trace: the appended event for even timers, an
/// event with a fresh random id per callback call for odd ones.
fn trace_stream(id: &str) -> String {
    let i: usize = id.rsplit('t').next().unwrap().parse().unwrap();
    if i.is_multiple_of(2) { format!("appended-{id}") } else { format!("called-{id}") }
}

async fn start_ticking(store: Arc<dyn EventStore>) -> Scheduler {
    let target = store.clone();
    Scheduler::builder(store, "ticks")
        .on("tick", move |timer: FiredTimer| {
            let store = target.clone();
            async move {
                let event = NewEvent::json(
                    "Called",
                    &json!({ "timer": timer.id, "attempt": timer.attempt }),
                )
                .unwrap();
                store
                    .append(&trace_stream(&timer.id), cairn_core::ExpectedVersion::Any, vec![event])
                    .await
                    .map(|_| ())
            }
        })
        .start()
        .await
        .unwrap()
}

#[test]
#[ignore = "runs only as the child process of timers_fire_once_after_a_kill"]
fn child_scheduler() {
    let Some(dir) = std::env::var_os(DIR_VAR) else { return };
    let cycle: usize = std::env::var(CYCLE_VAR).unwrap().parse().unwrap();
    let rt =
        tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    rt.block_on(async move {
        let store = store_in(Path::new(&dir));
        let scheduler = start_ticking(store).await;
        for (i, id) in timer_ids(cycle).iter().enumerate() {
            let action = if i.is_multiple_of(2) {
                TimerAction::append(trace_stream(id), "Appended", json!({ "timer": id }))
            } else {
                TimerAction::callback("tick", json!({}))
            };
            scheduler
                .schedule(id, Duration::from_millis(100 + 25 * i as u64), action)
                .await
                .unwrap();
        }
        println!("\nready");
        std::future::pending::<()>().await;
    });
}

/// Per timer: (trace events, whether `TimerFired` is in the history).
async fn traces(store: &dyn EventStore, cycle: usize) -> Vec<(usize, bool)> {
    let fired = fired_ids(&history(store, "ticks").await);
    let mut out = Vec::new();
    for id in timer_ids(cycle) {
        out.push((events(store, &trace_stream(&id)).await.len(), fired.contains(&id)));
    }
    out
}

#[test]
fn timers_fire_once_after_a_kill() {
    let dir = tempfile::tempdir().unwrap();
    let mut seed =
        SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap().as_nanos() as u64 | 1;
    eprintln!("timers_fire_once_after_a_kill: seed {seed}");
    let mut in_flight = 0;
    for cycle in 0..3 {
        let mut child = spawn_ready_child(
            "child_scheduler",
            &[(DIR_VAR, dir.path().display().to_string()), (CYCLE_VAR, cycle.to_string())],
        );
        // Timers are due 100..700 ms after they were scheduled: kill while some have fired and some not.
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        std::thread::sleep(Duration::from_millis(150 + seed % 400));
        child.kill().unwrap(); // SIGKILL
        assert_eq!(child.wait().unwrap().signal(), Some(9));

        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let store = store_in(dir.path());
            let before = traces(store.as_ref(), cycle).await;
            let scheduler = start_ticking(store.clone()).await;
            eventually("every timer of the cycle", Duration::from_secs(10), async || traces(store.as_ref(), cycle).await.iter().all(|t| t.1)).await;
            tokio::time::sleep(Duration::from_millis(100)).await;
            let after = traces(store.as_ref(), cycle).await;
            for (i, (b, a)) in before.iter().zip(&after).enumerate() {
                let id = &timer_ids(cycle)[i];
                if b.1 {
                    assert_eq!((b.0, a.0), (1, 1), "{id} fired before the kill: nothing more");
                } else if i.is_multiple_of(2) {
                    assert_eq!(a.0, 1, "{id}: the appended event is in the store once");
                } else if b.0 == 1 {
                    // Killed between the callback and `TimerFired`: at least once means twice here.
                    assert_eq!(a.0, 2, "{id}");
                    in_flight += 1;
                } else {
                    assert_eq!((b.0, a.0), (0, 1), "{id} fires once after the restart");
                }
            }
            let fired_before = before.iter().filter(|t| t.1).count();
            eprintln!("cycle {cycle}: {fired_before} of {TIMERS} timers fired before the kill, the rest after the restart");
            scheduler.shutdown().await;
        });
        drop(rt);
    }
    eprintln!("callbacks caught between their effect and TimerFired: {in_flight}");

    // Started again later: nothing is pending, nothing fires.
    let rt =
        tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    rt.block_on(async {
        let store = store_in(dir.path());
        let before: Vec<_> = all_traces(store.as_ref()).await;
        let history_len = history(store.as_ref(), "ticks").await.len();
        let scheduler = start_ticking(store.clone()).await;
        assert_eq!(scheduler.recovery().pending, 0);
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(all_traces(store.as_ref()).await, before);
        assert_eq!(history(store.as_ref(), "ticks").await.len(), history_len);
        let fired = fired_ids(&history(store.as_ref(), "ticks").await);
        assert_eq!(fired.len(), 3 * TIMERS, "each timer has one TimerFired");
    });
}

async fn all_traces(store: &dyn EventStore) -> Vec<Vec<(usize, bool)>> {
    let mut all = Vec::new();
    for cycle in 0..3 {
        all.push(traces(store, cycle).await);
    }
    all
}

/// A running action is let finish by `shutdown` and recorded, so the next
/// scheduler does not run it again; `stop` abandons it (at least once).
#[tokio::test]
async fn shutdown_lets_a_running_action_finish_and_records_it() {
    for graceful in [true, false] {
        let dir = tempfile::tempdir().unwrap();
        let store = store_in(dir.path());
        let started = Arc::new(tokio::sync::Notify::new());
        let finished: Calls = Arc::default();
        let (tell, done) = (started.clone(), finished.clone());
        let scheduler = Scheduler::builder(store.clone(), "orders")
            .on("slow", move |timer: FiredTimer| {
                let (tell, done) = (tell.clone(), done.clone());
                async move {
                    tell.notify_one();
                    tokio::time::sleep(Duration::from_millis(300)).await;
                    done.lock().unwrap().push((timer.id, timer.attempt, Instant::now()));
                    Ok::<(), String>(())
                }
            })
            .start()
            .await
            .unwrap();
        scheduler
            .schedule("t", Duration::from_millis(50), TimerAction::callback("slow", json!({})))
            .await
            .unwrap();
        started.notified().await;
        if graceful {
            scheduler.shutdown().await;
            assert_eq!(finished.lock().unwrap().len(), 1, "shutdown waited for the action");
            assert_eq!(fired_ids(&history(store.as_ref(), "orders").await), ["t"]);
        } else {
            scheduler.stop();
            tokio::time::sleep(Duration::from_millis(400)).await;
            assert!(finished.lock().unwrap().is_empty(), "stop aborted the action");
            assert!(fired_ids(&history(store.as_ref(), "orders").await).is_empty());
        }
        let (again, _) = recording(&store, "orders").await;
        assert_eq!(again.recovery().pending, usize::from(!graceful));
        again.stop();
    }
}
