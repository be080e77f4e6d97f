//! A server over a store whose disk fails (the engine's `FaultyStorage`):
//! `/health` says unready while appends cannot be written and ready again
//! once the store has recovered by itself; an append caught by the fault is
//! answered `outcome_unknown` (503, retryable), and the HTTP and gRPC
//! clients resend it by themselves until it is written, once.

use std::sync::Arc;
use std::time::{Duration, Instant};

use cairn_client::HttpStore;
use cairn_core::{EventStore, ExpectedVersion, NewEvent, ReadStreamOptions};
use cairn_grpc::GrpcStore;
use cairn_log::{EmbeddedStore, FaultOp, FaultyStorage, Options};
use cairn_server::ServerConfig;

struct Faulty {
    running: cairn_server::Running,
    url: String,
    storage: Arc<FaultyStorage>,
    _dir: tempfile::TempDir,
}

fn faulty_server() -> Faulty {
    let dir = tempfile::tempdir().unwrap();
    let storage = FaultyStorage::new();
    let options = Options {
        storage: storage.clone(),
        recovery_backoff_max: Duration::from_millis(100),
        ..Options::default()
    };
    let store: Arc<dyn EventStore> =
        Arc::new(EmbeddedStore::open_with(dir.path(), options).unwrap());
    let config = ServerConfig { listen: "127.0.0.1:0".parse().unwrap(), ..ServerConfig::default() };
    let running = cairn_server::start(store, config).unwrap();
    let url = format!("http://{}", running.addr);
    Faulty { running, url, storage, _dir: dir }
}

async fn health(url: &str) -> (u16, serde_json::Value) {
    let r = reqwest::get(format!("{url}/health")).await.unwrap();
    (r.status().as_u16(), r.json().await.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_is_unready_while_the_disk_fails_and_ready_once_the_store_recovers() {
    let server = faulty_server();
    let url = &server.url;
    assert_eq!(health(url).await.0, 200);
    let http = reqwest::Client::new();
    let body = serde_json::json!({"events": [{"type": "MoneyDeposited", "data": {"amount": 1}}]});
    assert_eq!(
        http.post(format!("{url}/streams/acct-1")).json(&body).send().await.unwrap().status(),
        200
    );
    server.storage.fail_from(FaultOp::Write, 1, libc::ENOSPC);
    let r = http.post(format!("{url}/streams/acct-1")).json(&body).send().await.unwrap();
    assert_eq!(r.status(), 503);
    let err: serde_json::Value = r.json().await.unwrap();
    assert_eq!(err["error"], "outcome_unknown", "{err}");
    assert_eq!(err["retryable"], true);
    let (status, h) = health(url).await;
    assert_eq!((status, &h["ready"]), (503, &serde_json::json!(false)), "{h}");
    assert!(h["error"].as_str().unwrap().contains("failed"), "{h}");
    let r = http.post(format!("{url}/streams/acct-1")).json(&body).send().await.unwrap();
    assert_eq!(r.status(), 503, "appends are refused while the store cannot write");
    server.storage.clear();
    let deadline = Instant::now() + Duration::from_secs(20);
    while health(url).await.0 != 200 {
        assert!(Instant::now() < deadline, "never ready again");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        http.post(format!("{url}/streams/acct-1")).json(&body).send().await.unwrap().status(),
        200
    );
    server.running.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_clients_resend_an_append_caught_by_a_fault_and_it_is_written_once() {
    let server = faulty_server();
    let clients: [(&str, Arc<dyn EventStore>); 2] = [
        ("http", Arc::new(HttpStore::new(&server.url).unwrap())),
        ("grpc", Arc::new(GrpcStore::new(&server.url).unwrap())),
    ];
    for (name, client) in clients {
        let stream = format!("acct-{name}");
        client
            .append(&stream, ExpectedVersion::NoStream, vec![NewEvent::json_bytes("Opened", "{}")])
            .await
            .unwrap();
        // The sync fails (the bytes reached the page cache, then were discarded): the first answer is outcome_unknown.
        server.storage.fail_from(FaultOp::Sync, 1, libc::EIO);
        let storage = server.storage.clone();
        let clear = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(300)).await;
            storage.clear();
        });
        let event = NewEvent::json_bytes("MoneyDeposited", r#"{"amount": 7}"#);
        let done = client.append(&stream, ExpectedVersion::Exact(1), vec![event.clone()]).await;
        clear.await.unwrap();
        let done = done.unwrap_or_else(|e| {
            panic!("{name}: the client should have retried until the store recovered: {e}")
        });
        assert_eq!(done.next_version, 2, "{name}");
        assert!(server.storage.failures() > 0, "{name}: the fault was hit");
        let events = client.read_stream(&stream, ReadStreamOptions::forward()).await.unwrap();
        assert_eq!(
            events.iter().map(|e| e.id).collect::<Vec<_>>()[1..],
            [event.id],
            "{name}: written once"
        );
    }
    server.running.shutdown().await.unwrap();
}
