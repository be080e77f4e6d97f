//! Orchestrated sagas on the embedded engine: what runs, what is undone and in
//! which order, timeouts, retries and parking, bad definitions.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use cairn_core::{EventStore, ReadStreamOptions};
use cairn_log::EmbeddedStore;
use cairn_saga::{
    RetryPolicy, Saga, SagaError, SagaEvent, SagaRunner, SagaState, Status, Step, StepError, load,
    resume,
};
use serde_json::json;

type Log = Arc<Mutex<Vec<String>>>;

fn store(dir: &tempfile::TempDir) -> Arc<dyn EventStore> {
    Arc::new(EmbeddedStore::open(dir.path()).expect("open store"))
}

/// A step that logs `do:<name>` (failing when the input names it) and
/// `undo:<name>` when compensated.
fn step(name: &'static str, log: &Log) -> Step {
    let (l1, l2) = (log.clone(), log.clone());
    Step::new(name, move |ctx| {
        let log = l1.clone();
        async move {
            let input: serde_json::Value = ctx.input()?;
            if input["fail"] == name {
                log.lock().unwrap().push(format!("fail:{name}"));
                return Err(StepError::new(format!("{name} refused")));
            }
            if input["hang"] == name {
                log.lock().unwrap().push(format!("hang:{name}"));
                std::future::pending::<()>().await;
            }
            log.lock().unwrap().push(format!("do:{name}"));
            Ok(json!({ "done": name, "key": ctx.key }))
        }
    })
    .compensate(move |ctx| {
        let log = l2.clone();
        async move {
            log.lock().unwrap().push(format!("undo:{name}"));
            assert!(ctx.key.ends_with(&format!("/{name}/undo")));
            Ok(())
        }
    })
}

/// Waits (10 s at most) until the stored state of saga `order`/`id` satisfies `done`.
async fn until_stored(store: &dyn EventStore, id: &str, done: impl Fn(&SagaState) -> bool) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !load(store, "order", id).await.unwrap().is_some_and(|s| done(&s)) {
        assert!(std::time::Instant::now() < deadline, "saga {id} never got there");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn order_saga(log: &Log) -> Saga {
    Saga::new("order")
        .step(step("create", log))
        .step(step("charge", log))
        .step(step("reserve", log))
}

fn history(events: &[cairn_core::RecordedEvent]) -> Vec<String> {
    events.iter().map(|e| e.event_type.clone()).collect()
}

#[tokio::test]
async fn all_steps_complete_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let store = store(&dir);
    let log = Log::default();
    let runner =
        SagaRunner::builder(store.clone(), "shop").saga(order_saga(&log)).run().await.unwrap();
    let started = runner.start("order", "1", &json!({})).await.unwrap();
    assert!(!started.existed);
    let state = runner.wait("order", "1").await.unwrap();
    assert_eq!(state.status, Status::Completed);
    assert_eq!(*log.lock().unwrap(), ["do:create", "do:charge", "do:reserve"]);
    // Later steps see earlier outputs; the history is in the saga's own stream.
    assert_eq!(state.output("charge").unwrap()["key"], "$saga-order-1/charge");
    let events = store.read_stream("$saga-order-1", ReadStreamOptions::forward()).await.unwrap();
    assert_eq!(
        history(&events),
        ["SagaStarted", "StepCompleted", "StepCompleted", "StepCompleted", "SagaCompleted"]
    );
    // What the runner knew equals what the stream says (up to the clock).
    let mut stored = load(store.as_ref(), "order", "1").await.unwrap().unwrap();
    (stored.started_at, stored.updated_at) = (state.started_at, state.updated_at);
    assert_eq!(stored, state);
}

#[tokio::test]
async fn a_failure_at_each_step_undoes_exactly_the_completed_steps_in_reverse() {
    let names = ["create", "charge", "reserve"];
    for (at, failing) in names.iter().enumerate() {
        let dir = tempfile::tempdir().unwrap();
        let store = store(&dir);
        let log = Log::default();
        let runner =
            SagaRunner::builder(store.clone(), "shop").saga(order_saga(&log)).run().await.unwrap();
        runner.start("order", "7", &json!({ "fail": failing })).await.unwrap();
        let state = runner.wait("order", "7").await.unwrap();
        assert_eq!(state.status, Status::Compensated, "failing at {failing}");
        let mut expected: Vec<String> = names[..at].iter().map(|n| format!("do:{n}")).collect();
        expected.push(format!("fail:{failing}"));
        expected.extend(names[..at].iter().rev().map(|n| format!("undo:{n}")));
        assert_eq!(*log.lock().unwrap(), expected, "failing at {failing}");
        assert_eq!(
            state.reason.as_deref(),
            Some(format!("{failing} failed: {failing} refused").as_str())
        );
        let events =
            store.read_stream("$saga-order-7", ReadStreamOptions::forward()).await.unwrap();
        let kinds = history(&events);
        assert_eq!(kinds.iter().filter(|k| *k == "StepCompensated").count(), at);
        assert_eq!(kinds.last().unwrap(), "SagaCompensated");
        runner.shutdown().await;
    }
}

#[tokio::test]
async fn a_hanging_step_times_out_and_is_undone_with_the_completed_ones() {
    let dir = tempfile::tempdir().unwrap();
    let store = store(&dir);
    let log = Log::default();
    let saga = Saga::new("order")
        .step(step("create", &log))
        .step(step("charge", &log).timeout(Duration::from_millis(300)))
        .step(step("reserve", &log));
    let runner = SagaRunner::builder(store.clone(), "shop").saga(saga).run().await.unwrap();
    let began = std::time::Instant::now();
    runner.start("order", "h", &json!({ "hang": "charge" })).await.unwrap();
    let state = runner.wait("order", "h").await.unwrap();
    assert!(began.elapsed() >= Duration::from_millis(300));
    assert_eq!(state.status, Status::Compensated);
    // The charge may have gone through after we stopped waiting: it is refunded too.
    assert_eq!(*log.lock().unwrap(), ["do:create", "hang:charge", "undo:charge", "undo:create"]);
    let events = store.read_stream("$saga-order-h", ReadStreamOptions::forward()).await.unwrap();
    let timed_out = events.iter().find_map(|e| match SagaEvent::from_recorded(e) {
        Some(SagaEvent::StepTimedOut { step, after_ms }) => Some((step, after_ms)),
        _ => None,
    });
    assert_eq!(timed_out, Some(("charge".to_string(), 300)));
}

#[tokio::test]
async fn steps_that_cannot_be_undone_are_skipped_and_named() {
    let dir = tempfile::tempdir().unwrap();
    let store = store(&dir);
    let log = Log::default();
    let l = log.clone();
    let email = Step::new("email", move |_| {
        let log = l.clone();
        async move {
            log.lock().unwrap().push("do:email".into());
            Ok(())
        }
    })
    .cannot_be_undone();
    let saga = Saga::new("order").step(step("create", &log)).step(email).step(step("charge", &log));
    let runner = SagaRunner::builder(store.clone(), "shop").saga(saga).run().await.unwrap();
    runner.start("order", "e", &json!({ "fail": "charge" })).await.unwrap();
    let state = runner.wait("order", "e").await.unwrap();
    assert_eq!(state.status, Status::Compensated);
    assert_eq!(*log.lock().unwrap(), ["do:create", "do:email", "fail:charge", "undo:create"]);
    let events = store.read_stream("$saga-order-e", ReadStreamOptions::forward()).await.unwrap();
    let plan = events.iter().find_map(|e| match SagaEvent::from_recorded(e) {
        Some(SagaEvent::Compensating { undo, not_undoable, .. }) => Some((undo, not_undoable)),
        _ => None,
    });
    assert_eq!(plan, Some((vec!["create".to_string()], vec!["email".to_string()])));
}

#[tokio::test]
async fn a_failing_compensation_is_retried_then_parked_until_resumed() {
    let dir = tempfile::tempdir().unwrap();
    let store = store(&dir);
    let log = Log::default();
    // The refund fails until `healed` is set.
    let healed = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let attempts = Arc::new(std::sync::atomic::AtomicU32::new(0));
    let (h, a) = (healed.clone(), attempts.clone());
    let charge = Step::new("charge", |_| async { Ok("ch_1") }).compensate(move |ctx| {
        let (healed, attempts) = (h.clone(), a.clone());
        async move {
            attempts.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            assert_eq!(ctx.output::<String>("charge")?, "ch_1");
            if healed.load(std::sync::atomic::Ordering::SeqCst) {
                Ok(())
            } else {
                Err(StepError::new("payment service unavailable"))
            }
        }
    });
    let saga = Saga::new("order")
        .step(step("create", &log))
        .step(charge)
        .step(step("reserve", &log))
        .retry(RetryPolicy {
            attempts: 3,
            backoff: Duration::from_millis(20),
            max_backoff: Duration::from_millis(50),
        });
    let runner = SagaRunner::builder(store.clone(), "shop").saga(saga).run().await.unwrap();
    runner.start("order", "p", &json!({ "fail": "reserve" })).await.unwrap();
    let state = runner.wait("order", "p").await.unwrap();
    assert_eq!(state.status, Status::NeedsAttention);
    assert_eq!(attempts.load(std::sync::atomic::Ordering::SeqCst), 3);
    assert_eq!(state.last_error.as_deref(), Some("payment service unavailable"));
    // Not yet undone: create waits behind the refund.
    assert_eq!(*log.lock().unwrap(), ["do:create", "fail:reserve"]);

    // Resuming a running or finished saga is refused, and writes nothing.
    let version = state.version;
    healed.store(true, std::sync::atomic::Ordering::SeqCst);
    resume(store.as_ref(), "order", "p", "ops").await.unwrap();
    let state = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            let s = load(store.as_ref(), "order", "p").await.unwrap().unwrap();
            if s.status.is_final() {
                return s;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("the resumed saga finishes");
    assert_eq!(state.status, Status::Compensated);
    assert!(state.version > version);
    assert_eq!(*log.lock().unwrap(), ["do:create", "fail:reserve", "undo:create"]);
    let err = resume(store.as_ref(), "order", "p", "ops").await.unwrap_err();
    assert!(err.to_string().contains("compensated, not waiting for attention"), "{err}");
    assert_eq!(load(store.as_ref(), "order", "p").await.unwrap().unwrap().version, state.version);
}

#[tokio::test]
async fn starting_an_existing_saga_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let store = store(&dir);
    let log = Log::default();
    let runner =
        SagaRunner::builder(store.clone(), "shop").saga(order_saga(&log)).run().await.unwrap();
    runner.start("order", "1", &json!({})).await.unwrap();
    runner.wait("order", "1").await.unwrap();
    let again = runner.start("order", "1", &json!({ "fail": "create" })).await.unwrap();
    assert!(again.existed);
    assert_eq!(runner.wait("order", "1").await.unwrap().status, Status::Completed);
    assert_eq!(log.lock().unwrap().len(), 3);
}

#[tokio::test]
async fn bad_definitions_and_arguments_are_refused_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let store = store(&dir);
    let undeclared = Saga::new("order").step(Step::new("charge", |_| async { Ok(()) }));
    let err =
        SagaRunner::builder(store.clone(), "shop").saga(undeclared).run().await.err().unwrap();
    assert!(err.to_string().contains("neither how to undo it"), "{err}");
    let twice = Saga::new("order")
        .step(Step::new("a", |_| async { Ok(()) }).cannot_be_undone())
        .step(Step::new("a", |_| async { Ok(()) }).cannot_be_undone());
    let err = SagaRunner::builder(store.clone(), "shop").saga(twice).run().await.err().unwrap();
    assert!(err.to_string().contains("two steps are named a"), "{err}");
    let dashed =
        Saga::new("my-order").step(Step::new("a", |_| async { Ok(()) }).cannot_be_undone());
    assert!(matches!(
        SagaRunner::builder(store.clone(), "shop").saga(dashed).run().await,
        Err(SagaError::Definition(_))
    ));

    let log = Log::default();
    let runner =
        SagaRunner::builder(store.clone(), "shop").saga(order_saga(&log)).run().await.unwrap();
    assert!(matches!(
        runner.start("refund", "1", &json!({})).await,
        Err(SagaError::UnknownSaga(_))
    ));
    assert!(matches!(runner.start("order", "", &json!({})).await, Err(SagaError::InvalidId(..))));
    assert!(matches!(
        runner.start("order", "bad\nid", &json!({})).await,
        Err(SagaError::InvalidId(..))
    ));
    assert!(matches!(runner.wait("order", "nope").await, Err(SagaError::NotFound(_))));
    let unkeyed: std::collections::HashMap<(u8, u8), u8> = [((1, 2), 3)].into();
    assert!(matches!(runner.start("order", "k", &unkeyed).await, Err(SagaError::InvalidInput(_))));
    let huge = "x".repeat(20 << 20);
    let err = runner.start("order", "huge", &json!({ "note": huge })).await.unwrap_err();
    assert!(err.to_string().contains("too large") || err.to_string().contains("limit"), "{err}");
    assert_eq!(runner.open(), 0, "a refused start leaves nothing open");
    assert!(store.list_streams("$saga-order", 10).await.unwrap().is_empty(), "nothing was written");
}

#[tokio::test]
async fn a_new_runner_resumes_what_the_last_one_left() {
    let dir = tempfile::tempdir().unwrap();
    let store = store(&dir);
    let log = Log::default();
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let g = gate.clone();
    let slow = Saga::new("order")
        .step(step("create", &log))
        .step(
            Step::new("charge", move |_| {
                let gate = g.clone();
                async move {
                    let _ = gate.acquire().await.map_err(|_| StepError::new("closed"))?;
                    Ok(())
                }
            })
            .cannot_be_undone(),
        )
        .step(step("reserve", &log));
    let first = SagaRunner::builder(store.clone(), "shop")
        .saga(slow)
        .checkpoint_every(Duration::from_millis(20))
        .run()
        .await
        .unwrap();
    for id in 0..5 {
        first.start("order", &id.to_string(), &json!({})).await.unwrap();
    }
    for id in 0..5 {
        until_stored(store.as_ref(), &id.to_string(), |s| !s.completed.is_empty()).await;
    }
    let waiting = tokio::spawn({
        let first = first.clone();
        async move { first.wait("order", "0").await }
    });
    tokio::time::sleep(Duration::from_millis(20)).await;
    first.shutdown().await;
    assert!(
        matches!(waiting.await.unwrap(), Err(SagaError::Stopped)),
        "a waiter is told the runner stopped"
    );
    assert_eq!(
        first.wait("order", "1").await.unwrap().status,
        Status::Running,
        "after the stop: what the stream says"
    );
    assert_eq!(log.lock().unwrap().len(), 5, "every saga did create, then stopped at charge");

    let second =
        SagaRunner::builder(store.clone(), "shop").saga(order_saga(&log)).run().await.unwrap();
    assert_eq!(second.recovered(), 5);
    for id in 0..5 {
        assert_eq!(second.wait("order", &id.to_string()).await.unwrap().status, Status::Completed);
    }
    let count = |what: &str| log.lock().unwrap().iter().filter(|l| *l == what).count();
    assert_eq!(count("do:create"), 5, "create never ran again");
    assert_eq!(count("do:charge"), 5);
    // A third runner finds nothing left to do.
    second.shutdown().await;
    let third = SagaRunner::builder(store.clone(), "shop")
        .saga(order_saga(&Log::default()))
        .run()
        .await
        .unwrap();
    assert_eq!(third.recovered(), 0);
}

/// A charge that fails (or hangs) its first `bad` attempts, then succeeds.
fn flaky_charge(bad: u32, hang: bool, calls: Arc<std::sync::atomic::AtomicU32>) -> Step {
    Step::new("charge", move |ctx| {
        let calls = calls.clone();
        async move {
            let n = calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
            assert_eq!(ctx.attempt, n, "the context counts the attempts");
            assert_eq!(ctx.key, "$saga-order-r/charge", "every attempt has the same key");
            if n <= bad {
                if hang {
                    std::future::pending::<()>().await;
                }
                return Err(StepError::new(format!("gateway busy ({n})")));
            }
            Ok(n)
        }
    })
    .compensate(|_| async { Ok(()) })
    .timeout(Duration::from_millis(100))
}

#[tokio::test]
async fn a_step_with_retries_gets_them_before_compensation_starts() {
    for (bad, retries, hang, expected) in [
        (2, 2, false, Status::Completed),
        (2, 1, false, Status::Compensated),
        (1, 1, true, Status::Completed),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let store = store(&dir);
        let log = Log::default();
        let calls = Arc::new(std::sync::atomic::AtomicU32::new(0));
        let saga = Saga::new("order")
            .step(step("create", &log))
            .step(flaky_charge(bad, hang, calls.clone()).retry(retries, Duration::from_millis(10)))
            .step(step("reserve", &log));
        let runner = SagaRunner::builder(store.clone(), "shop").saga(saga).run().await.unwrap();
        runner.start("order", "r", &json!({})).await.unwrap();
        let state = runner.wait("order", "r").await.unwrap();
        let case = format!("{bad} bad attempts, {retries} retries, hang {hang}");
        assert_eq!(state.status, expected, "{case}");
        assert_eq!(
            calls.load(std::sync::atomic::Ordering::SeqCst),
            (retries + 1).min(bad + 1),
            "{case}"
        );
        let events =
            store.read_stream("$saga-order-r", ReadStreamOptions::forward()).await.unwrap();
        let retried: Vec<u32> = events
            .iter()
            .filter_map(|e| match SagaEvent::from_recorded(e) {
                Some(SagaEvent::StepAttemptFailed { attempt, .. }) => Some(attempt),
                _ => None,
            })
            .collect();
        assert_eq!(retried, (1..=retries.min(bad)).collect::<Vec<_>>(), "{case}");
        if expected == Status::Completed {
            assert_eq!(state.output("charge").unwrap(), &json!(bad + 1), "{case}");
            assert_eq!(*log.lock().unwrap(), ["do:create", "do:reserve"], "{case}");
        } else {
            assert_eq!(state.reason.as_deref(), Some("charge failed: gateway busy (2)"), "{case}");
            assert_eq!(*log.lock().unwrap(), ["do:create", "undo:create"], "{case}");
        }
    }
}

#[tokio::test]
async fn the_attempts_already_made_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let store = store(&dir);
    let log = Log::default();
    let calls = Arc::new(std::sync::atomic::AtomicU32::new(0));
    // Two failures, then a long wait before the third attempt: stop the runner there.
    let saga = |calls| {
        Saga::new("order")
            .step(step("create", &log))
            .step(flaky_charge(5, false, calls).retry(2, Duration::from_secs(60)))
    };
    let first =
        SagaRunner::builder(store.clone(), "shop").saga(saga(calls.clone())).run().await.unwrap();
    first.start("order", "r", &json!({})).await.unwrap();
    until_stored(store.as_ref(), "r", |s| s.attempts == 1).await;
    first.shutdown().await;
    assert_eq!(calls.load(std::sync::atomic::Ordering::SeqCst), 1);
    assert_eq!(load(store.as_ref(), "order", "r").await.unwrap().unwrap().attempts, 1);
    // The next runner makes attempt 2 (of 3) after its backoff... here at once: a
    // new definition with a short backoff, as after a deploy.
    let calls2 = Arc::new(std::sync::atomic::AtomicU32::new(1));
    let quick = Saga::new("order")
        .step(step("create", &log))
        .step(flaky_charge(5, false, calls2.clone()).retry(2, Duration::from_millis(5)));
    let second = SagaRunner::builder(store.clone(), "shop").saga(quick).run().await.unwrap();
    let state = second.wait("order", "r").await.unwrap();
    assert_eq!(state.status, Status::Compensated);
    assert_eq!(
        calls2.load(std::sync::atomic::Ordering::SeqCst),
        3,
        "attempts 2 and 3 only: the first was not made again"
    );
}
