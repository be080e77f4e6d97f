use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use cairn_idempotency::{IdempotencyError, Outcome, RedisKeys};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::reachable;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Receipt {
    payment: String,
    cents: u64,
}

async fn keys() -> RedisKeys {
    RedisKeys::connect("redis://127.0.0.1:6379", format!("cairn-test-{}:", Uuid::new_v4().simple()))
        .await
        .expect("connect to Redis")
}

#[tokio::test]
async fn the_same_key_twice_returns_the_first_result() {
    if !reachable("127.0.0.1:6379", "Redis") {
        return;
    }
    let keys = keys().await;
    let charged = AtomicU32::new(0);
    let charge = |cents: u64| {
        let n = charged.fetch_add(1, Ordering::SeqCst);
        async move { Ok::<_, String>(Receipt { payment: format!("pay-{n}"), cents }) }
    };
    let first = keys.run("order-7", || charge(1250)).await.unwrap();
    let again = keys.run("order-7", || charge(9999)).await.unwrap();
    assert_eq!(first, Outcome::Ran(Receipt { payment: "pay-0".into(), cents: 1250 }));
    assert_eq!(
        again,
        Outcome::Cached(Receipt { payment: "pay-0".into(), cents: 1250 }),
        "the first result, not a second charge"
    );
    assert_eq!(charged.load(Ordering::SeqCst), 1);
    let other = keys.run("order-8", || charge(300)).await.unwrap();
    assert_eq!(other.into_inner().payment, "pay-1", "another key runs its own work");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_calls_run_the_work_once() {
    if !reachable("127.0.0.1:6379", "Redis") {
        return;
    }
    let keys = keys().await;
    let runs = Arc::new(AtomicU32::new(0));
    // The work holds on until the other seven calls have had their answer
    // (a call that came after it finished would rightly get the result).
    let answered = Arc::new(AtomicU32::new(0));
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let (keys, runs, answered) = (keys.clone(), runs.clone(), answered.clone());
        tasks.push(tokio::spawn(async move {
            let seen = answered.clone();
            let result = keys
                .run("order-race", || async move {
                    runs.fetch_add(1, Ordering::SeqCst);
                    let deadline = std::time::Instant::now() + Duration::from_secs(10);
                    while seen.load(Ordering::SeqCst) < 7 && std::time::Instant::now() < deadline {
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                    Ok::<_, String>(Receipt { payment: "pay-race".into(), cents: 1 })
                })
                .await;
            answered.fetch_add(1, Ordering::SeqCst);
            result
        }));
    }
    let results: Vec<_> =
        futures_util::future::join_all(tasks).await.into_iter().map(|r| r.unwrap()).collect();
    assert_eq!(runs.load(Ordering::SeqCst), 1, "the work ran once");
    let ran = results.iter().filter(|r| matches!(r, Ok(Outcome::Ran(_)))).count();
    let busy = results.iter().filter(|r| matches!(r, Err(IdempotencyError::InProgress(_)))).count();
    assert_eq!((ran, busy), (1, 7), "the others were told to retry later");
    let later = keys
        .run("order-race", || async {
            Ok::<_, String>(Receipt { payment: "never".into(), cents: 0 })
        })
        .await
        .unwrap();
    assert_eq!(later, Outcome::Cached(Receipt { payment: "pay-race".into(), cents: 1 }));
}

#[tokio::test]
async fn a_failure_releases_the_key_and_the_result_expires_after_its_ttl() {
    if !reachable("127.0.0.1:6379", "Redis") {
        return;
    }
    let keys = keys().await.ttl(Duration::from_millis(1500));
    let failed = keys.run("order-9", || async { Err::<Receipt, _>("card declined") }).await;
    assert!(matches!(failed, Err(IdempotencyError::Work("card declined"))));
    let retried = keys
        .run("order-9", || async { Ok::<_, String>(Receipt { payment: "pay-9".into(), cents: 9 }) })
        .await
        .unwrap();
    assert!(matches!(retried, Outcome::Ran(_)), "a failed attempt does not block the retry");
    assert!(matches!(
        keys.run("order-9", || async {
            Ok::<_, String>(Receipt { payment: "x".into(), cents: 0 })
        })
        .await
        .unwrap(),
        Outcome::Cached(_)
    ));
    tokio::time::sleep(Duration::from_millis(1800)).await;
    let expired = keys
        .run("order-9", || async {
            Ok::<_, String>(Receipt { payment: "pay-9b".into(), cents: 9 })
        })
        .await
        .unwrap();
    assert_eq!(
        expired.into_inner().payment,
        "pay-9b",
        "after the time to live the key is free again"
    );
}
