//! An append whose connection the server ends mid-call may or may not have
//! committed: it is answered "outcome unknown" (retryable), and a retry
//! with the same ids writes it once.

use std::time::{Duration, Instant};

use cairn_core::{EventStore, ExpectedVersion, NewEvent, ReadStreamOptions, StoreError};
use cairn_postgres::{PgOptions, PgStore};

use crate::common::{Schema, URL, connect, reachable, schema_name};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_append_whose_connection_is_terminated_has_an_unknown_outcome_and_a_retry_writes_it_once()
 {
    if !reachable("127.0.0.1:5432", "PostgreSQL") {
        return;
    }
    let name = schema_name();
    let app = format!("cairn_outcome_{name}");
    let store = PgStore::connect_with(
        &format!("{URL} application_name={app}"),
        PgOptions::default().schema(&name),
    )
    .await
    .unwrap();
    let _guard = Schema(name.clone());
    store
        .append("acct-1", ExpectedVersion::NoStream, vec![NewEvent::json_bytes("Opened", "{}")])
        .await
        .unwrap();
    // Hold the stream's row so that the next append waits inside cairn_append.
    let mut holder = connect().await;
    let tx = holder.transaction().await.unwrap();
    tx.execute(
        &format!("SELECT 1 FROM {name}.cairn_streams WHERE name = 'acct-1' FOR UPDATE"),
        &[],
    )
    .await
    .unwrap();
    let event = NewEvent::json_bytes("MoneyDeposited", r#"{"amount": 5}"#);
    let append = {
        let (store, event) = (store.clone(), event.clone());
        tokio::spawn(async move { store.append("acct-1", ExpectedVersion::Any, vec![event]).await })
    };
    let killer = connect().await;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let killed = killer
            .query(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = $1 AND wait_event_type = 'Lock'",
                &[&app],
            )
            .await
            .unwrap();
        if !killed.is_empty() {
            break;
        }
        assert!(Instant::now() < deadline, "the append never waited on the row lock");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    match append.await.unwrap() {
        Err(e @ StoreError::OutcomeUnknown { .. }) => assert!(
            e.is_retryable() && e.to_string().contains("retry with the same event ids"),
            "{e}"
        ),
        other => panic!("expected an unknown outcome, got {other:?}"),
    }
    tx.rollback().await.unwrap();
    // The retry (a fresh pooled connection) writes it once; another retry is answered the same.
    let first = store.append("acct-1", ExpectedVersion::Any, vec![event.clone()]).await.unwrap();
    assert_eq!(
        store.append("acct-1", ExpectedVersion::Any, vec![event.clone()]).await.unwrap(),
        first
    );
    let events = store.read_stream("acct-1", ReadStreamOptions::forward()).await.unwrap();
    assert_eq!(
        events.iter().map(|e| e.event_type.as_str()).collect::<Vec<_>>(),
        ["Opened", "MoneyDeposited"]
    );
}
