//! What the broker tests share: a fresh store, events to relay, waiting for
//! the relay, order checks, and a proxy that takes the broker away.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cairn_core::{EventStore, ExpectedVersion, NewEvent, Position, ReadAllOptions, RecordedEvent};
use cairn_log::EmbeddedStore;
use cairn_relay::RelayHandle;
use uuid::Uuid;

/// Appends events `from..from + n` (`ItemShipped`, `{"i": i}`), event `i`
/// to stream `<category>-<i % streams>`.
pub(crate) async fn write(store: &dyn EventStore, category: &str, streams: u64, from: u64, n: u64) {
    for i in from..from + n {
        let e = NewEvent::json("ItemShipped", &serde_json::json!({"i": i})).unwrap();
        store
            .append(&format!("{category}-{}", i % streams), ExpectedVersion::Any, vec![e])
            .await
            .unwrap();
    }
}

/// Every user event of the store, in global order.
pub(crate) async fn user_events(store: &dyn EventStore) -> Vec<RecordedEvent> {
    store
        .read_all(ReadAllOptions::forward())
        .await
        .unwrap()
        .into_iter()
        .filter(|e| !e.is_system())
        .collect()
}

pub(crate) async fn wait_for_retries(relay: &RelayHandle, retries: u64) {
    for _ in 0..1500 {
        if relay.status().retries >= retries {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("the relay did not retry {retries} times within 15 s: {:?}", relay.status());
}

pub(crate) async fn wait_until_relayed(relay: &RelayHandle, last: Position) {
    for _ in 0..1500 {
        if relay.status().checkpoint >= Some(last) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("the relay did not reach position {last} within 15 s: {:?}", relay.status());
}

/// Per stream, the versions in the order the broker holds them.
pub(crate) fn by_stream<'a>(
    messages: impl IntoIterator<Item = (&'a str, u64)>,
) -> HashMap<String, Vec<u64>> {
    let mut out: HashMap<String, Vec<u64>> = HashMap::new();
    for (stream, version) in messages {
        out.entry(stream.to_string()).or_default().push(version);
    }
    out
}

pub(crate) fn in_order(streams: &HashMap<String, Vec<u64>>, per_stream: u64) {
    for (stream, versions) in streams {
        assert_eq!(
            versions,
            &(1..=per_stream).collect::<Vec<_>>(),
            "{stream} arrived out of order or with gaps"
        );
    }
}

/// A fresh store, and an id no other test uses (for broker-side names) with
/// a category made from it.
pub(crate) struct Fixture {
    pub store: Arc<dyn EventStore>,
    pub id: String,
    pub category: String,
    pub _dir: tempfile::TempDir,
}

pub(crate) fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn EventStore> = Arc::new(EmbeddedStore::open(dir.path()).unwrap());
    let id = Uuid::new_v4().simple().to_string();
    Fixture { store, category: format!("shop{}", &id[..8]), id, _dir: dir }
}

/// A TCP proxy that can cut every connection and refuse new ones, to take
/// the broker away from the relay and give it back.
pub(crate) struct Proxy {
    pub port: u16,
    open: Arc<AtomicBool>,
    conns: Arc<Mutex<Vec<tokio::task::JoinHandle<()>>>>,
}

impl Proxy {
    pub(crate) async fn start(target: &'static str) -> Proxy {
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

    pub(crate) fn cut(&self) {
        self.open.store(false, Ordering::SeqCst);
        for c in self.conns.lock().unwrap().drain(..) {
            c.abort();
        }
    }

    pub(crate) fn restore(&self) {
        self.open.store(true, Ordering::SeqCst);
    }
}

/// Appends `streams × per_stream` events in appends of 50 to one stream,
/// going round the streams `<category>-0..`: a backlog written fast.
pub(crate) async fn write_backlog(
    store: &dyn EventStore,
    category: &str,
    streams: u64,
    per_stream: u64,
) {
    for round in 0..per_stream / 50 {
        for s in 0..streams {
            let batch = (0..50)
                .map(|i| {
                    NewEvent::json("ItemShipped", &serde_json::json!({"round": round, "i": i}))
                        .unwrap()
                })
                .collect();
            store.append(&format!("{category}-{s}"), ExpectedVersion::Any, batch).await.unwrap();
        }
    }
}

/// Waits until the relay has confirmed at least `confirmed` events and has
/// at least `in_flight` events sent and not yet confirmed.
pub(crate) async fn wait_until_in_flight(relay: &RelayHandle, confirmed: Position, in_flight: u64) {
    for _ in 0..15_000 {
        let s = relay.status();
        if s.checkpoint >= Some(confirmed) && s.in_flight >= in_flight {
            return;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    panic!(
        "the relay never had {in_flight} events in flight after {confirmed}: {:?}",
        relay.status()
    );
}

/// What a broker holds, as indexes into `events` (by id), may repeat
/// events (at least once) but never skip one: each message is the event
/// right after the previous message's, or an earlier one (the relay sending
/// again from its oldest unconfirmed event). Every event is there. So a
/// consumer that drops repeats by id applies all of them in global order.
pub(crate) fn no_event_skipped(events: &[RecordedEvent], message_ids: &[String]) {
    let index: HashMap<String, usize> =
        events.iter().enumerate().map(|(i, e)| (e.id.to_string(), i)).collect();
    let mut next = 0; // the first event not yet delivered
    let mut previous: Option<usize> = None;
    for (k, id) in message_ids.iter().enumerate() {
        let i = *index.get(id).unwrap_or_else(|| panic!("message {k} has an unknown id {id}"));
        let expected = previous.map_or(0, |p| p + 1);
        assert!(
            i <= expected,
            "message {k} is event {i}, right after event {previous:?}: events {expected}..{i} were skipped"
        );
        next = next.max(i + 1);
        previous = Some(i);
    }
    assert_eq!(next, events.len(), "the broker holds events 0..{next} of {}", events.len());
}

/// The relay config of the mid-pipeline cut tests: small batches, 8 in
/// flight, quick retries.
pub(crate) fn pipelined_config(name: String) -> cairn_relay::RelayConfig {
    cairn_relay::RelayConfig::new(name)
        .batch(50)
        .max_in_flight(8)
        .backoff(std::time::Duration::from_millis(20), std::time::Duration::from_millis(200))
}

/// Cuts the broker away while part of the backlog is confirmed and at least
/// three batches are out, checks that the relay notices, restores it, and
/// stops the relay once it has caught up with `events`.
pub(crate) async fn cut_mid_pipeline(relay: RelayHandle, proxy: &Proxy, events: &[RecordedEvent]) {
    let last = events.last().unwrap().position;
    wait_until_in_flight(&relay, events[500].position, 150).await;
    proxy.cut();
    wait_for_retries(&relay, 2).await;
    let status = relay.status();
    assert!(status.checkpoint < Some(last) && status.error.is_some(), "{status:?}");
    proxy.restore();
    wait_until_relayed(&relay, last).await;
    relay.stop().await.unwrap();
}
