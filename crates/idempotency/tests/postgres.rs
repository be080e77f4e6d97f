use std::sync::Arc;

use cairn_idempotency::{Handled, PgInbox};
use tokio_postgres::{Client, NoTls};
use uuid::Uuid;

use crate::reachable;

async fn connect() -> Client {
    let (client, connection) =
        tokio_postgres::connect("host=127.0.0.1 port=5432 user=postgres dbname=test", NoTls)
            .await
            .expect("connect to PostgreSQL");
    tokio::spawn(connection);
    client
}

/// A fresh effect table (a balance per account) for one test.
async fn ledger(client: &Client) -> String {
    let table = format!("ledger_{}", Uuid::new_v4().simple());
    client
        .batch_execute(&format!(
            "CREATE TABLE {table} (account TEXT PRIMARY KEY, cents BIGINT NOT NULL)"
        ))
        .await
        .unwrap();
    table
}

async fn balance(client: &Client, table: &str, account: &str) -> i64 {
    client
        .query_opt(&format!("SELECT cents FROM {table} WHERE account = $1"), &[&account])
        .await
        .unwrap()
        .map_or(0, |r| r.get(0))
}

async fn deposit(
    tx: &tokio_postgres::Transaction<'_>,
    table: &str,
    account: &str,
    cents: i64,
) -> Result<u64, tokio_postgres::Error> {
    tx.execute(&format!("INSERT INTO {table} VALUES ($1, $2) ON CONFLICT (account) DO UPDATE SET cents = {table}.cents + $2"), &[&account, &cents]).await
}

#[tokio::test]
async fn a_redelivered_message_is_applied_once() {
    if !reachable("127.0.0.1:5432", "PostgreSQL") {
        return;
    }
    let mut client = connect().await;
    PgInbox::setup(&client).await.unwrap();
    let table = ledger(&client).await;
    let inbox = PgInbox::new(format!("billing-{}", Uuid::new_v4()));
    let message = Uuid::now_v7();
    let mut outcomes = Vec::new();
    for _ in 0..3 {
        let t = table.clone();
        outcomes.push(
            inbox
                .handle(&mut client, message, async |tx| deposit(tx, &t, "ada", 125).await)
                .await
                .unwrap(),
        );
    }
    assert_eq!(outcomes, vec![Handled::Applied(1), Handled::Duplicate, Handled::Duplicate]);
    assert_eq!(balance(&client, &table, "ada").await, 125);
    assert!(inbox.seen(&client, message).await.unwrap());
    // Another consumer of the same message has its own record.
    let other = PgInbox::new(format!("audit-{}", Uuid::new_v4()));
    assert!(!other.seen(&client, message).await.unwrap());
    client.batch_execute(&format!("DROP TABLE {table}")).await.unwrap();
}

#[tokio::test]
async fn a_failing_handler_commits_nothing_and_a_retry_applies() {
    if !reachable("127.0.0.1:5432", "PostgreSQL") {
        return;
    }
    let mut client = connect().await;
    PgInbox::setup(&client).await.unwrap();
    let table = ledger(&client).await;
    let inbox = PgInbox::new(format!("billing-{}", Uuid::new_v4()));
    let message = Uuid::now_v7();
    #[derive(Debug)]
    enum Failure {
        Db(#[allow(dead_code)] tokio_postgres::Error),
        Downstream,
    }
    impl From<tokio_postgres::Error> for Failure {
        fn from(e: tokio_postgres::Error) -> Self {
            Failure::Db(e)
        }
    }
    let t = table.clone();
    let failed = inbox
        .handle(&mut client, message, async |tx| {
            deposit(tx, &t, "grace", 500).await?;
            Err::<(), _>(Failure::Downstream)
        })
        .await;
    assert!(matches!(failed, Err(Failure::Downstream)));
    assert_eq!(
        balance(&client, &table, "grace").await,
        0,
        "the effect rolled back with the failure"
    );
    assert!(!inbox.seen(&client, message).await.unwrap(), "so did the record of the message");
    let t = table.clone();
    let retried = inbox
        .handle(&mut client, message, async |tx| {
            deposit(tx, &t, "grace", 500).await.map_err(Failure::from)
        })
        .await
        .unwrap();
    assert_eq!(retried, Handled::Applied(1));
    assert_eq!(balance(&client, &table, "grace").await, 500);
    client.batch_execute(&format!("DROP TABLE {table}")).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_deliveries_of_the_same_messages_apply_each_once() {
    if !reachable("127.0.0.1:5432", "PostgreSQL") {
        return;
    }
    let setup = connect().await;
    PgInbox::setup(&setup).await.unwrap();
    let table = Arc::new(ledger(&setup).await);
    let inbox = PgInbox::new(format!("billing-{}", Uuid::new_v4()));
    let messages: Arc<Vec<Uuid>> = Arc::new((0..20).map(|_| Uuid::now_v7()).collect());
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let (inbox, table, messages) = (inbox.clone(), table.clone(), messages.clone());
        tasks.push(tokio::spawn(async move {
            let mut client = connect().await;
            let mut applied = 0;
            for m in messages.iter() {
                let t = table.clone();
                if let Handled::Applied(_) = inbox
                    .handle(&mut client, *m, async |tx| deposit(tx, &t, "alan", 10).await)
                    .await
                    .unwrap()
                {
                    applied += 1;
                }
            }
            applied
        }));
    }
    let applied: u32 =
        futures_util::future::join_all(tasks).await.into_iter().map(|r| r.unwrap()).sum();
    assert_eq!(applied, 20, "each message applied by exactly one of the 8 racers");
    assert_eq!(balance(&setup, &table, "alan").await, 200);
    setup.batch_execute(&format!("DROP TABLE {table}")).await.unwrap();
}
