//! The transactional outbox: business rows and events in one transaction
//! that the application controls.

use std::time::Duration;

use cairn_core::{
    EventStore, ExpectedVersion, NewEvent, ReadAllOptions, StartFrom, StoreError,
    SubscriptionTarget,
};

use crate::common::{connect, store};

async fn orders_table(client: &tokio_postgres::Client, schema: &str) -> String {
    let table = format!("{schema}.orders");
    client
        .batch_execute(&format!("CREATE TABLE {table} (id text PRIMARY KEY, total int NOT NULL)"))
        .await
        .unwrap();
    table
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn business_rows_and_events_commit_or_roll_back_together() {
    let Some((store, schema)) = store().await else { return };
    let mut client = connect().await;
    let orders = orders_table(&client, &schema.0).await;
    let start = store.head_position().await.unwrap();
    let mut sub = store
        .subscribe(SubscriptionTarget::category("order"), StartFrom::After(start.0 - 1))
        .await
        .unwrap();

    // Committed: the row and the event.
    let tx = client.transaction().await.unwrap();
    tx.execute(&format!("INSERT INTO {orders} VALUES ('order-1', 12)"), &[]).await.unwrap();
    let placed = NewEvent::json("OrderPlaced", &serde_json::json!({"total": 12})).unwrap();
    store.append_in(&tx, "order-1", ExpectedVersion::NoStream, vec![placed.clone()]).await.unwrap();
    assert!(
        matches!(store.stream_info("order-1").await, Err(StoreError::StreamNotFound { .. })),
        "invisible before the commit"
    );
    tx.commit().await.unwrap();
    let e = tokio::time::timeout(Duration::from_secs(5), sub.next())
        .await
        .expect("woken at commit")
        .unwrap()
        .unwrap();
    assert_eq!((e.stream.as_str(), e.id), ("order-1", placed.id));

    // Rolled back: neither.
    let tx = client.transaction().await.unwrap();
    tx.execute(&format!("INSERT INTO {orders} VALUES ('order-2', 30)"), &[]).await.unwrap();
    store
        .append_in(
            &tx,
            "order-2",
            ExpectedVersion::NoStream,
            vec![NewEvent::json("OrderPlaced", &serde_json::json!({"total": 30})).unwrap()],
        )
        .await
        .unwrap();
    tx.rollback().await.unwrap();
    let rows: i64 =
        client.query_one(&format!("SELECT count(*) FROM {orders}"), &[]).await.unwrap().get(0);
    assert_eq!(rows, 1);
    assert!(matches!(store.stream_info("order-2").await, Err(StoreError::StreamNotFound { .. })));
    let all = store.read_all(ReadAllOptions::forward().from(start)).await.unwrap();
    assert_eq!(
        all.iter().filter(|e| !e.is_system()).map(|e| e.stream.as_str()).collect::<Vec<_>>(),
        vec!["order-1"]
    );
    assert!(
        tokio::time::timeout(Duration::from_millis(500), sub.next()).await.is_err(),
        "a rolled-back event is never delivered"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_append_leaves_the_transaction_usable() {
    let Some((store, schema)) = store().await else { return };
    let mut client = connect().await;
    let orders = orders_table(&client, &schema.0).await;
    store
        .append(
            "order-7",
            ExpectedVersion::NoStream,
            vec![NewEvent::json("OrderPlaced", &serde_json::json!({})).unwrap()],
        )
        .await
        .unwrap();

    let tx = client.transaction().await.unwrap();
    tx.execute(&format!("INSERT INTO {orders} VALUES ('order-7', 5)"), &[]).await.unwrap();
    let again = NewEvent::json("OrderPlaced", &serde_json::json!({})).unwrap();
    match store.append_in(&tx, "order-7", ExpectedVersion::NoStream, vec![again]).await {
        Err(StoreError::WrongExpectedVersion { actual_version: 1, .. }) => {}
        other => panic!("expected a conflict, got {other:?}"),
    }
    // The application decides: here it keeps its row and records a different event.
    let noted = NewEvent::json("OrderNoted", &serde_json::json!({})).unwrap();
    store.append_in(&tx, "order-7", ExpectedVersion::Exact(1), vec![noted]).await.unwrap();
    tx.commit().await.unwrap();
    let events =
        store.read_stream("order-7", cairn_core::ReadStreamOptions::forward()).await.unwrap();
    assert_eq!(
        events.iter().map(|e| e.event_type.as_str()).collect::<Vec<_>>(),
        vec!["OrderPlaced", "OrderNoted"]
    );
    let rows: i64 =
        client.query_one(&format!("SELECT count(*) FROM {orders}"), &[]).await.unwrap().get(0);
    assert_eq!(rows, 1);
}

/// Without event sourcing: a plain table is the state, and the events are
/// only the outbox (what other services hear about).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plain_table_with_an_outbox() {
    let Some((store, schema)) = store().await else { return };
    let mut client = connect().await;
    let orders = orders_table(&client, &schema.0).await;
    for (id, total) in [("order-a", 10), ("order-b", 20), ("order-c", 30)] {
        let tx = client.transaction().await.unwrap();
        tx.execute(&format!("INSERT INTO {orders} VALUES ($1, $2)"), &[&id, &total]).await.unwrap();
        let event =
            NewEvent::json("OrderCreated", &serde_json::json!({"id": id, "total": total})).unwrap();
        store.append_in(&tx, "outbox-orders", ExpectedVersion::Any, vec![event]).await.unwrap();
        if total == 20 {
            tx.rollback().await.unwrap();
        } else {
            tx.commit().await.unwrap();
        }
    }
    let outbox =
        store.read_stream("outbox-orders", cairn_core::ReadStreamOptions::forward()).await.unwrap();
    let ids: Vec<String> = outbox
        .iter()
        .map(|e| e.json::<serde_json::Value>().unwrap()["id"].as_str().unwrap().to_string())
        .collect();
    let rows: Vec<String> = client
        .query(&format!("SELECT id FROM {orders} ORDER BY id"), &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(ids, rows, "the outbox holds exactly the committed orders");
    assert_eq!(ids, vec!["order-a", "order-c"]);
}
