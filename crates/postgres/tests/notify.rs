//! Live subscriptions across processes: two stores on one schema (as two
//! `cairn serve` processes would be), polling turned off, so only
//! LISTEN/NOTIFY can wake the subscriber.

use std::time::Duration;

use cairn_core::{EventStore, ExpectedVersion, NewEvent, StartFrom, SubscriptionTarget};
use cairn_postgres::{PgOptions, PgStore};

use crate::common::{URL, connect, store};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_store_on_the_same_schema_is_woken_by_notify() {
    let Some((writer, schema)) = store().await else { return };
    let options = PgOptions {
        poll_interval: Duration::from_secs(3600),
        ..PgOptions::default().schema(&schema.0)
    };
    let reader = PgStore::connect_with(URL, options).await.unwrap();
    let mut sub = reader.subscribe(SubscriptionTarget::All, StartFrom::End).await.unwrap();
    let mut stream_sub = reader
        .subscribe(SubscriptionTarget::Stream("order-9".into()), StartFrom::Start)
        .await
        .unwrap();
    // Give the reader's LISTEN connection a moment to be in place.
    tokio::time::sleep(Duration::from_millis(300)).await;

    let placed = NewEvent::json("OrderPlaced", &serde_json::json!({})).unwrap();
    writer.append("order-9", ExpectedVersion::NoStream, vec![placed.clone()]).await.unwrap();
    let e = tokio::time::timeout(Duration::from_secs(5), sub.next())
        .await
        .expect("woken by NOTIFY, not by polling")
        .unwrap()
        .unwrap();
    assert_eq!(e.id, placed.id);
    let e = tokio::time::timeout(Duration::from_secs(5), stream_sub.next())
        .await
        .expect("stream subscriptions too")
        .unwrap()
        .unwrap();
    assert_eq!(e.id, placed.id);

    // The outbox path notifies at the caller's commit.
    let mut client = connect().await;
    let tx = client.transaction().await.unwrap();
    let paid = NewEvent::json("OrderPaid", &serde_json::json!({})).unwrap();
    writer.append_in(&tx, "order-9", ExpectedVersion::Exact(1), vec![paid.clone()]).await.unwrap();
    tx.commit().await.unwrap();
    let e = tokio::time::timeout(Duration::from_secs(5), sub.next())
        .await
        .expect("woken at the outbox commit")
        .unwrap()
        .unwrap();
    assert_eq!(e.id, paid.id);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscriptions_end_when_the_store_is_dropped() {
    let Some((store, _schema)) = store().await else { return };
    let mut sub = store.subscribe(SubscriptionTarget::All, StartFrom::Start).await.unwrap();
    drop(store);
    let end = tokio::time::timeout(Duration::from_secs(5), sub.next())
        .await
        .expect("the subscription ends");
    assert!(end.is_none());
}
