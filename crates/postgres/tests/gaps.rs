//! Invariant 4 on PostgreSQL: a subscriber on `$all` never skips an event
//! whose transaction commits after a later-numbered one is already visible.

use std::sync::Arc;
use std::time::Duration;

use cairn_core::{
    EventStore, ExpectedVersion, NewEvent, Position, ReadAllOptions, StartFrom, StoreError,
    SubscriptionTarget,
};
use cairn_postgres::{PgOptions, PgStore};

use crate::common::{URL, connect, store};

fn event(n: u64) -> NewEvent {
    NewEvent::json("Numbered", &serde_json::json!({ "n": n })).unwrap()
}

async fn next(sub: &mut cairn_core::Subscription) -> cairn_core::RecordedEvent {
    tokio::time::timeout(Duration::from_secs(10), sub.next())
        .await
        .expect("an event within 10 s")
        .unwrap()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_waits_for_a_transaction_that_commits_late() {
    let Some((store, schema)) = store().await else { return };
    let start = store.head_position().await.unwrap();
    let mut sub =
        store.subscribe(SubscriptionTarget::All, StartFrom::After(start.0 - 1)).await.unwrap();

    // Position p1 is taken by a transaction that stays open...
    let mut held = connect().await;
    let tx = held.transaction().await.unwrap();
    let late =
        store.append_in(&tx, "late-1", ExpectedVersion::NoStream, vec![event(1)]).await.unwrap();
    // ...while three later positions commit.
    let mut after = Vec::new();
    for n in 2..=4 {
        after.push(
            store
                .append(&format!("early-{n}"), ExpectedVersion::NoStream, vec![event(n)])
                .await
                .unwrap()
                .position,
        );
    }
    assert!(
        after.iter().all(|p| *p > late.position),
        "the held transaction took the lower position"
    );
    assert!(
        tokio::time::timeout(Duration::from_millis(700), sub.next()).await.is_err(),
        "nothing may be delivered past the open transaction's position"
    );
    // A reader that will not wait long says why, rather than skipping.
    let impatient = PgStore::connect_with(
        URL,
        PgOptions {
            gap_timeout: Duration::from_millis(200),
            ..PgOptions::default().schema(&schema.0)
        },
    )
    .await
    .unwrap();
    match impatient.read_all(ReadAllOptions::forward().from(start)).await {
        Err(StoreError::Busy(why)) => assert!(why.contains("transaction"), "{why}"),
        other => panic!("expected Busy while the transaction is open, got {other:?}"),
    }

    tx.commit().await.unwrap();
    let got: Vec<Position> =
        [next(&mut sub).await, next(&mut sub).await, next(&mut sub).await, next(&mut sub).await]
            .iter()
            .map(|e| e.position)
            .collect();
    assert_eq!(
        got,
        [vec![late.position], after.clone()].concat(),
        "the late event first, then the rest, in position order"
    );

    // A transaction that rolls back leaves a gap for good: the reader passes it.
    let tx = held.transaction().await.unwrap();
    let lost =
        store.append_in(&tx, "lost-1", ExpectedVersion::NoStream, vec![event(5)]).await.unwrap();
    let kept = store.append("kept-1", ExpectedVersion::NoStream, vec![event(6)]).await.unwrap();
    tx.rollback().await.unwrap();
    let e = next(&mut sub).await;
    assert_eq!(e.position, kept.position);
    assert!(e.position > lost.position);
    let all = store.read_all(ReadAllOptions::forward().from(start)).await.unwrap();
    assert!(all.iter().all(|e| e.stream != "lost-1"), "a rolled-back append never appears");
}

/// Writers append concurrently, some inside transactions that linger or
/// roll back; a subscriber from the start must see exactly the committed
/// events, each once, in position order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_writers_and_slow_transactions_never_make_a_subscriber_skip() {
    let Some((store, _schema)) = store().await else { return };
    let store = Arc::new(store);
    let mut sub = store.subscribe(SubscriptionTarget::All, StartFrom::Start).await.unwrap();
    let mut tasks = Vec::new();
    for w in 0..6u64 {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            let mut client = connect().await;
            let mut committed = 0u64;
            for i in 0..40u64 {
                let n = w * 1000 + i;
                if i % 3 == 0 {
                    // In a transaction that holds its position a while, and sometimes rolls back.
                    let tx = client.transaction().await.unwrap();
                    store
                        .append_in(
                            &tx,
                            &format!("w{w}-{i}"),
                            ExpectedVersion::NoStream,
                            vec![event(n)],
                        )
                        .await
                        .unwrap();
                    tokio::time::sleep(Duration::from_millis(n % 7 * 3)).await;
                    if i % 9 == 0 {
                        tx.rollback().await.unwrap();
                        continue;
                    }
                    tx.commit().await.unwrap();
                } else {
                    store
                        .append(&format!("w{w}-{i}"), ExpectedVersion::NoStream, vec![event(n)])
                        .await
                        .unwrap();
                }
                committed += 1;
            }
            committed
        }));
    }
    let mut total = 0;
    for t in tasks {
        total += t.await.unwrap();
    }
    let mut seen = Vec::new();
    while seen.len() < total as usize {
        seen.push(next(&mut sub).await);
    }
    assert!(seen.windows(2).all(|w| w[0].position < w[1].position), "positions strictly increase");
    let all = store.read_all(ReadAllOptions::forward()).await.unwrap();
    assert_eq!(
        seen.iter().map(|e| e.id).collect::<Vec<_>>(),
        all.iter().map(|e| e.id).collect::<Vec<_>>(),
        "the subscriber saw every committed event, once"
    );
    assert_eq!(all.len() as u64, total);
    assert!(
        tokio::time::timeout(Duration::from_millis(300), sub.next()).await.is_err(),
        "and nothing more"
    );
}

/// Readers waiting at a gap hold no pooled connection while they wait, so
/// a small pool still serves appends (and the transaction can end).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readers_waiting_at_a_gap_leave_the_pool_to_writers() {
    let Some((_, schema)) = store().await else { return };
    let options = PgOptions { pool_size: 2, ..PgOptions::default().schema(&schema.0) };
    let store = Arc::new(PgStore::connect_with(URL, options).await.unwrap());
    let start = store.head_position().await.unwrap();
    let mut held = connect().await;
    let tx = held.transaction().await.unwrap();
    store.append_in(&tx, "held-1", ExpectedVersion::NoStream, vec![event(1)]).await.unwrap();
    store.append("after-1", ExpectedVersion::NoStream, vec![event(2)]).await.unwrap();
    let mut readers = Vec::new();
    for _ in 0..4 {
        let store = store.clone();
        readers.push(tokio::spawn(async move {
            store.read_all(ReadAllOptions::forward().from(start)).await.unwrap().len()
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let appended = tokio::time::timeout(
        Duration::from_secs(5),
        store.append("after-2", ExpectedVersion::NoStream, vec![event(3)]),
    )
    .await;
    assert!(
        matches!(appended, Ok(Ok(_))),
        "an append got through while 4 readers waited on a pool of 2: {appended:?}"
    );
    tx.commit().await.unwrap();
    for r in readers {
        assert!(r.await.unwrap() >= 2, "each reader got the held event and the one after it");
    }
}
