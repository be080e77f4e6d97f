//! The `cairn` binary on PostgreSQL: two servers sharing one schema, and
//! `cairn relay` killed with SIGKILL again and again while the application
//! appends through the outbox (every committed event reaches NATS, none that
//! rolled back does, a repeat carries the same id, and a consumer that
//! records message ids with its effect applies each event once).

use std::collections::{HashMap, HashSet};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cairn_core::conformance::reachable;
use cairn_core::{EventStore, ExpectedVersion, NewEvent, ReadAllOptions};
use cairn_idempotency::{Handled, PgInbox};
use cairn_postgres::{PgOptions, PgStore};
use futures_util::StreamExt;

const URL: &str = "postgres://postgres@127.0.0.1:5432/test";

fn relay(schema: &str, prefix: &str, jetstream: &str) -> Child {
    Command::new(env!("CARGO_BIN_EXE_cairn"))
        .args(["--backend", "postgres", "--database-url", URL, "--pg-schema", schema])
        .args([
            "relay",
            "--sink",
            "nats",
            "--subject-prefix",
            prefix,
            "--jetstream",
            jetstream,
            "--status-every",
            "0",
            "--batch",
            "5",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("run cairn relay")
}

/// Appends `n` orders through the outbox; every fifth transaction rolls
/// back. Returns the ids of the committed events.
async fn place_orders(
    store: &PgStore,
    client: &mut tokio_postgres::Client,
    table: &str,
    from: u64,
    n: u64,
) -> Vec<uuid::Uuid> {
    let mut committed = Vec::new();
    for i in from..from + n {
        let tx = client.transaction().await.unwrap();
        tx.execute(&format!("INSERT INTO {table} VALUES ($1)"), &[&(i as i64)]).await.unwrap();
        let event = NewEvent::json("OrderPlaced", &serde_json::json!({"order": i})).unwrap();
        let id = event.id;
        store
            .append_in(&tx, &format!("order-{}", i % 7), ExpectedVersion::Any, vec![event])
            .await
            .unwrap();
        if i % 5 == 4 {
            tx.rollback().await.unwrap();
        } else {
            tx.commit().await.unwrap();
            committed.push(id);
        }
    }
    committed
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_killed_again_and_again_loses_nothing_and_consumers_apply_each_event_once() {
    if !reachable("127.0.0.1:5432", "PostgreSQL") || !reachable("127.0.0.1:4222", "NATS") {
        return;
    }
    let tag = uuid::Uuid::new_v4().simple().to_string()[..12].to_string();
    let schema = format!("cairn_relay_{tag}");
    let (prefix, jetstream) = (format!("relaytest{tag}"), format!("CAIRN_RELAY_{tag}"));
    let store = PgStore::connect_with(URL, PgOptions::default().schema(&schema)).await.unwrap();
    let (mut client, conn) = tokio_postgres::connect(URL, tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(conn);
    let orders = format!("{schema}.orders");
    client.batch_execute(&format!("CREATE TABLE {orders} (id bigint PRIMARY KEY)")).await.unwrap();
    PgInbox::setup(&client).await.unwrap();

    // Every publish, repeats included (JetStream drops repeats from its
    // stream, but a plain subscriber sees each publish), feeds a consumer
    // that records message ids in the same transaction as its effect.
    let nats = async_nats::connect("127.0.0.1:4222").await.unwrap();
    let mut sub = nats.subscribe(format!("{prefix}.>")).await.unwrap();
    let deliveries: Arc<Mutex<HashMap<uuid::Uuid, u32>>> = Arc::default();
    let applied_table = format!("{schema}.applied");
    client
        .batch_execute(&format!("CREATE TABLE {applied_table} (id uuid NOT NULL)"))
        .await
        .unwrap();
    let consumer = {
        let (deliveries, table) = (deliveries.clone(), applied_table.clone());
        let inbox = PgInbox::new(format!("shipping-{tag}"));
        tokio::spawn(async move {
            let (mut client, conn) =
                tokio_postgres::connect(URL, tokio_postgres::NoTls).await.unwrap();
            tokio::spawn(conn);
            while let Some(m) = sub.next().await {
                let id: uuid::Uuid = m
                    .headers
                    .as_ref()
                    .unwrap()
                    .get("Nats-Msg-Id")
                    .unwrap()
                    .as_str()
                    .parse()
                    .unwrap();
                *deliveries.lock().unwrap().entry(id).or_default() += 1;
                let sql = format!("INSERT INTO {table} VALUES ($1)");
                let done: Result<Handled<()>, tokio_postgres::Error> = inbox
                    .handle(&mut client, id, async |tx| tx.execute(&sql, &[&id]).await.map(drop))
                    .await;
                done.unwrap();
            }
        })
    };

    // Rounds: a backlog through the outbox, then a relay killed while it
    // works through it, until some kill has landed between a publish and
    // its checkpoint (seen as a repeated delivery), and at least 6 rounds.
    let mut committed = Vec::new();
    let mut next = 0;
    let mut rounds = 0u64;
    let repeated = |d: &Mutex<HashMap<uuid::Uuid, u32>>| d.lock().unwrap().values().any(|n| *n > 1);
    while rounds < 6 || (!repeated(&deliveries) && rounds < 30) {
        committed.extend(place_orders(&store, &mut client, &orders, next, 60).await);
        next += 60;
        // And a backlog big enough that the relay is still at work when killed.
        for b in 0..3 {
            let batch: Vec<NewEvent> = (0..100)
                .map(|i| NewEvent::json("ItemPicked", &serde_json::json!({"i": i})).unwrap())
                .collect();
            committed.extend(batch.iter().map(|e| e.id));
            store
                .append(&format!("pick-{}", (rounds * 3 + b) % 5), ExpectedVersion::Any, batch)
                .await
                .unwrap();
        }
        // Kill it while it publishes: once this round's first publish is
        // seen (however slowly the child started), then 0–19 ms later.
        let published =
            |d: &Mutex<HashMap<uuid::Uuid, u32>>| d.lock().unwrap().values().sum::<u32>();
        let before = published(&deliveries);
        let mut child = relay(&schema, &prefix, &jetstream);
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while published(&deliveries) == before {
            assert!(
                std::time::Instant::now() < deadline,
                "round {rounds}: the relay published nothing within 30 s"
            );
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        tokio::time::sleep(Duration::from_millis((rounds * 7) % 20)).await;
        child.kill().unwrap();
        child.wait().unwrap();
        rounds += 1;
    }
    // A last run that is left to finish.
    let mut child = relay(&schema, &prefix, &jetstream);
    // The newest order (the relay's own checkpoints come after it).
    let last = store
        .read_query(&cairn_core::Query::all(), ReadAllOptions::backward().limit(1))
        .await
        .unwrap()[0]
        .position;
    let mut caught_up = false;
    for _ in 0..600 {
        if cairn_relay::stored_checkpoint(&store, "nats").await.unwrap() >= Some(last) {
            caught_up = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(caught_up, "the relay did not catch up within 30 s");
    let wanted: HashSet<uuid::Uuid> = committed.iter().copied().collect();
    assert_eq!(
        wanted.len() as u64,
        rounds * (48 + 300),
        "rounds of 60 orders (every fifth rolled back) and 300 picks"
    );

    // The consumer has applied each committed event exactly once.
    let mut applied = HashSet::new();
    for _ in 0..600 {
        let rows = client.query(&format!("SELECT id FROM {applied_table}"), &[]).await.unwrap();
        let ids: Vec<uuid::Uuid> = rows.iter().map(|r| r.get(0)).collect();
        applied = ids.iter().copied().collect();
        assert_eq!(applied.len(), ids.len(), "an event was applied twice");
        if applied == wanted {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    consumer.abort();
    assert_eq!(applied, wanted, "exactly the committed events were applied, none that rolled back");
    let deliveries = deliveries.lock().unwrap().clone();
    assert!(deliveries.keys().all(|id| wanted.contains(id)), "a rolled-back event was published");
    let repeats: u32 = deliveries.values().map(|n| n - 1).sum();
    assert!(repeats > 0, "no kill in {rounds} rounds landed between a publish and its checkpoint");
    eprintln!("{repeats} repeated deliveries after {rounds} kills, each applied once");

    // JetStream holds each event once, each stream in order.
    let js = async_nats::jetstream::new(nats);
    let mut stream = js.get_stream(&jetstream).await.unwrap();
    let count = stream.info().await.unwrap().state.messages;
    assert_eq!(count, rounds * (48 + 300), "JetStream dropped the repeats by Nats-Msg-Id");
    let mut versions: HashMap<String, Vec<u64>> = HashMap::new();
    for seq in 1..=count {
        let m = stream.get_raw_message(seq).await.unwrap();
        let h = |k: &str| m.headers.get(k).unwrap().to_string();
        versions.entry(h("Cairn-Stream")).or_default().push(h("Cairn-Version").parse().unwrap());
    }
    for (s, v) in &versions {
        assert!(v.windows(2).all(|w| w[0] < w[1]), "{s} arrived out of order: {v:?}");
    }
    js.delete_stream(&jetstream).await.unwrap();
    drop(store);
    client.batch_execute(&format!("DROP SCHEMA {schema} CASCADE")).await.unwrap();
}

/// A `cairn serve --backend postgres` process on a free port; its URL, and
/// its stdout, which must stay open while it runs.
fn serve(schema: &str) -> (Child, String, impl Sized) {
    use std::io::{BufRead, BufReader};
    let mut server = Command::new(env!("CARGO_BIN_EXE_cairn"))
        .args([
            "--backend",
            "postgres",
            "--database-url",
            URL,
            "--pg-schema",
            schema,
            "serve",
            "--listen",
            "127.0.0.1:0",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("run cairn serve");
    let mut line = String::new();
    let mut out = BufReader::new(server.stdout.take().unwrap());
    out.read_line(&mut line).unwrap();
    assert!(line.contains(&format!("PostgreSQL schema {schema}")), "{line}");
    let url = line
        .split_whitespace()
        .find(|w| w.starts_with("http://"))
        .expect("the server prints its URL")
        .to_string();
    (server, url, out)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_servers_on_one_schema_share_the_store_and_its_live_events() {
    if !reachable("127.0.0.1:5432", "PostgreSQL") {
        return;
    }
    let schema = format!("cairn_serve_{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
    let ((mut a, url_a, _out_a), (mut b, url_b, _out_b)) = (serve(&schema), serve(&schema));
    let a_store = cairn_client::HttpStore::new(&url_a).unwrap();
    let b_store = cairn_client::HttpStore::new(&url_b).unwrap();
    let mut live = b_store
        .subscribe(cairn_core::SubscriptionTarget::category("order"), cairn_core::StartFrom::Start)
        .await
        .unwrap();
    a_store
        .append(
            "order-1",
            ExpectedVersion::NoStream,
            vec![NewEvent::json("OrderPlaced", &serde_json::json!({"total": 12})).unwrap()],
        )
        .await
        .unwrap();
    let e = tokio::time::timeout(Duration::from_secs(10), live.next())
        .await
        .expect("B delivers A's append")
        .unwrap()
        .unwrap();
    assert_eq!((e.stream.as_str(), e.version), ("order-1", 1));
    // Optimistic concurrency holds across the two servers.
    match b_store
        .append(
            "order-1",
            ExpectedVersion::NoStream,
            vec![NewEvent::json("OrderPlaced", &serde_json::json!({})).unwrap()],
        )
        .await
    {
        Err(cairn_core::StoreError::WrongExpectedVersion { actual_version: 1, .. }) => {}
        other => panic!("expected a conflict through B, got {other:?}"),
    }
    // The CLI reads the same store directly.
    let out = Command::new(env!("CARGO_BIN_EXE_cairn"))
        .args([
            "--backend",
            "postgres",
            "--database-url",
            URL,
            "--pg-schema",
            &schema,
            "--json",
            "read",
            "order-1",
        ])
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("OrderPlaced"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for server in [&mut a, &mut b] {
        Command::new("kill").args(["-TERM", &server.id().to_string()]).status().unwrap();
        assert!(server.wait().unwrap().success(), "a graceful stop exits 0");
    }
    let (client, conn) = tokio_postgres::connect(URL, tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(conn);
    client.batch_execute(&format!("DROP SCHEMA {schema} CASCADE")).await.unwrap();
}
