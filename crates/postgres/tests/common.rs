use std::sync::Arc;

use cairn_core::EventStore;
use cairn_postgres::{PgOptions, PgStore};

pub(crate) use cairn_core::conformance::reachable;

pub(crate) const URL: &str = "host=127.0.0.1 port=5432 user=postgres dbname=test";

/// Drops its schema when the test ends.
pub(crate) struct Schema(pub String);

impl Drop for Schema {
    fn drop(&mut self) {
        let name = self.0.clone();
        // Drop runs inside the test's runtime: use a thread with its own.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(async {
                if let Ok((client, conn)) =
                    tokio_postgres::connect(URL, tokio_postgres::NoTls).await
                {
                    tokio::spawn(conn);
                    let _ = client
                        .batch_execute(&format!("DROP SCHEMA IF EXISTS {name} CASCADE"))
                        .await;
                }
            });
        })
        .join();
    }
}

pub(crate) fn schema_name() -> String {
    format!("cairn_t_{}", &uuid::Uuid::new_v4().simple().to_string()[..16])
}

/// A store in a fresh schema, or `None` (skipped) when PostgreSQL is down.
pub(crate) async fn store() -> Option<(PgStore, Schema)> {
    if !reachable("127.0.0.1:5432", "PostgreSQL") {
        return None;
    }
    let name = schema_name();
    let store = PgStore::connect_with(URL, PgOptions::default().schema(&name))
        .await
        .expect("connect to PostgreSQL");
    Some((store, Schema(name)))
}

/// A plain connection, for the tests' own transactions.
pub(crate) async fn connect() -> tokio_postgres::Client {
    let (client, conn) = tokio_postgres::connect(URL, tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(conn);
    client
}

pub(crate) async fn dyn_store() -> Option<(Arc<dyn EventStore>, Schema)> {
    store().await.map(|(s, g)| (Arc::new(s) as Arc<dyn EventStore>, g))
}
