use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cairn_core::{EventStore, ExpectedVersion, NewEvent, Position, ReadAllOptions};
use cairn_log::EmbeddedStore;
use cairn_relay::{NatsSink, Relay, RelayConfig, RelayHandle};
use uuid::Uuid;

use crate::reachable;

/// `n` events over `streams` streams of one category; returns the user events.
async fn write(store: &dyn EventStore, category: &str, streams: u64, from: u64, n: u64) {
    for i in from..from + n {
        let e = NewEvent::json("ItemShipped", &serde_json::json!({"i": i})).unwrap();
        store.append(&format!("{category}-{}", i % streams), ExpectedVersion::Any, vec![e]).await.unwrap();
    }
}

async fn user_events(store: &dyn EventStore) -> Vec<cairn_core::RecordedEvent> {
    store.read_all(ReadAllOptions::forward()).await.unwrap().into_iter().filter(|e| !e.is_system()).collect()
}

async fn wait_until_relayed(relay: &RelayHandle, last: Position) {
    for _ in 0..1500 {
        if relay.status().checkpoint >= Some(last) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("the relay did not reach position {last} within 15 s: {:?}", relay.status());
}

/// Every message of a JetStream stream, as (stream, version, event id) from its headers.
async fn messages(client: &async_nats::Client, stream: &str) -> Vec<(String, u64, String)> {
    let js = async_nats::jetstream::new(client.clone());
    let mut s = js.get_stream(stream).await.unwrap();
    let count = s.info().await.unwrap().state.messages;
    let mut out = Vec::new();
    for seq in 1..=count {
        let m = s.get_raw_message(seq).await.unwrap();
        let h = |k: &str| m.headers.get(k).map(|v| v.to_string()).unwrap_or_default();
        out.push((h("Cairn-Stream"), h("Cairn-Version").parse().unwrap(), h("Nats-Msg-Id")));
    }
    out
}

/// Per stream, the versions in the order the broker holds them.
fn by_stream(messages: &[(String, u64, String)]) -> HashMap<String, Vec<u64>> {
    let mut out: HashMap<String, Vec<u64>> = HashMap::new();
    for (stream, version, _) in messages {
        out.entry(stream.clone()).or_default().push(*version);
    }
    out
}

fn in_order(streams: &HashMap<String, Vec<u64>>, per_stream: u64) {
    for (stream, versions) in streams {
        assert_eq!(versions, &(1..=per_stream).collect::<Vec<_>>(), "{stream} arrived out of order or with gaps");
    }
}

/// A fresh store, and names no other test uses: a category, a subject prefix
/// and a JetStream stream.
struct Fixture {
    store: Arc<dyn EventStore>,
    id: String,
    category: String,
    prefix: String,
    js_stream: String,
    _dir: tempfile::TempDir,
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn EventStore> = Arc::new(EmbeddedStore::open(dir.path()).unwrap());
    let id = Uuid::new_v4().simple().to_string();
    Fixture { store, category: format!("shop{}", &id[..8]), prefix: format!("t{id}"), js_stream: format!("CAIRN_T_{id}"), id, _dir: dir }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_event_arrives_once_in_stream_order_and_a_replay_is_deduplicated() {
    if !reachable("127.0.0.1:4222", "NATS") {
        return;
    }
    let Fixture { store, id, category, prefix, js_stream, _dir } = fixture();
    write(store.as_ref(), &category, 6, 0, 300).await;
    let client = async_nats::connect("127.0.0.1:4222").await.unwrap();
    let sink = NatsSink::new(client.clone(), &prefix);
    sink.ensure_stream(&js_stream).await.unwrap();
    let relay = Relay::new(store.clone(), RelayConfig::new(format!("nats-{id}")), sink).spawn();
    let events = user_events(store.as_ref()).await;
    wait_until_relayed(&relay, events.last().unwrap().position).await;
    assert_eq!(relay.pending().await.unwrap().0, 0);
    let status = relay.status();
    relay.stop().await.unwrap();
    assert_eq!(status.published, 300);
    let got = messages(&client, &js_stream).await;
    assert_eq!(got.len(), 300);
    in_order(&by_stream(&got), 50);
    let ids: Vec<String> = events.iter().map(|e| e.id.to_string()).collect();
    assert_eq!(got.iter().map(|m| m.2.clone()).collect::<Vec<_>>(), ids, "the message id is the event id, in global order");

    // The checkpoint is lost back to event 100 (as if the relay died before
    // recording what it had published): the rest goes out again, same ids.
    cairn_relay::store_checkpoint(store.as_ref(), &format!("nats-{id}"), events[99].position).await.unwrap();
    let sink = NatsSink::new(client.clone(), &prefix);
    let relay = Relay::new(store.clone(), RelayConfig::new(format!("nats-{id}")), sink).spawn();
    wait_until_relayed(&relay, events.last().unwrap().position).await;
    assert_eq!(relay.status().published, 200, "published again after the lost checkpoint");
    relay.stop().await.unwrap();
    assert_eq!(messages(&client, &js_stream).await.len(), 300, "JetStream dropped the repeats by message id");
    async_nats::jetstream::new(client).delete_stream(&js_stream).await.unwrap();
}

/// A TCP proxy that can cut every connection and refuse new ones, to take
/// the broker away from the relay and give it back.
struct Proxy {
    port: u16,
    open: Arc<AtomicBool>,
    conns: Arc<Mutex<Vec<tokio::task::JoinHandle<()>>>>,
}

impl Proxy {
    async fn start(target: &'static str) -> Proxy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let open = Arc::new(AtomicBool::new(true));
        let conns: Arc<Mutex<Vec<tokio::task::JoinHandle<()>>>> = Arc::default();
        let (o, c) = (open.clone(), conns.clone());
        tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                if !o.load(Ordering::SeqCst) {
                    continue; // dropped: refused
                }
                c.lock().unwrap().push(tokio::spawn(async move {
                    if let Ok(mut outbound) = tokio::net::TcpStream::connect(target).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                }));
            }
        });
        Proxy { port, open, conns }
    }

    fn cut(&self) {
        self.open.store(false, Ordering::SeqCst);
        for c in self.conns.lock().unwrap().drain(..) {
            c.abort();
        }
    }

    fn restore(&self) {
        self.open.store(true, Ordering::SeqCst);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_relay_waits_out_a_broker_outage_and_loses_nothing() {
    if !reachable("127.0.0.1:4222", "NATS") {
        return;
    }
    let Fixture { store, id, category, prefix, js_stream, _dir } = fixture();
    let direct = async_nats::connect("127.0.0.1:4222").await.unwrap();
    NatsSink::new(direct.clone(), &prefix).ensure_stream(&js_stream).await.unwrap();

    let proxy = Proxy::start("127.0.0.1:4222").await;
    let options = async_nats::ConnectOptions::new().retry_on_initial_connect().request_timeout(Some(Duration::from_millis(500)));
    let through_proxy = options.connect(format!("127.0.0.1:{}", proxy.port)).await.unwrap();
    let config = RelayConfig::new(format!("nats-{id}")).backoff(Duration::from_millis(20), Duration::from_millis(200));
    let sink = NatsSink::new(through_proxy, &prefix).ack_timeout(Duration::from_millis(300));
    let relay = Relay::new(store.clone(), config, sink).spawn();

    write(store.as_ref(), &category, 4, 0, 100).await;
    wait_until_relayed(&relay, user_events(store.as_ref()).await.last().unwrap().position).await;
    proxy.cut();
    write(store.as_ref(), &category, 4, 100, 100).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let (pending, oldest) = relay.pending().await.unwrap();
    assert_eq!(pending, 100, "nothing gets through while the broker is away");
    assert!(oldest >= Duration::from_millis(1000), "the oldest unpublished event's age grows: {oldest:?}");
    assert!(relay.status().error.is_some() && relay.status().retries > 0, "{:?}", relay.status());
    proxy.restore();
    wait_until_relayed(&relay, user_events(store.as_ref()).await.last().unwrap().position).await;
    relay.stop().await.unwrap();

    let got = messages(&direct, &js_stream).await;
    assert_eq!(got.len(), 200, "every event arrived, once");
    in_order(&by_stream(&got), 50);
    async_nats::jetstream::new(direct).delete_stream(&js_stream).await.unwrap();
}
