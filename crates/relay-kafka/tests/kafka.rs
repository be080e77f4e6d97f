use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use cairn_core::{EventStore, ExpectedVersion, NewEvent, Position, ReadAllOptions, RecordedEvent};
use cairn_log::EmbeddedStore;
use cairn_relay::{Confirm, Relay, RelayConfig, RelayHandle, Sink, SinkError};
use cairn_relay_kafka::{KafkaSink, Topics};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::mocking::MockCluster;
use rdkafka::producer::DefaultProducerContext;
use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};

const PARTITIONS: i32 = 4;

/// `n` events over `streams` streams of one category.
async fn write(store: &dyn EventStore, category: &str, streams: u64, from: u64, n: u64) {
    for i in from..from + n {
        let e = NewEvent::json("ItemShipped", &serde_json::json!({"i": i})).unwrap();
        store
            .append(&format!("{category}-{}", i % streams), ExpectedVersion::Any, vec![e])
            .await
            .unwrap();
    }
}

async fn user_events(store: &dyn EventStore) -> Vec<RecordedEvent> {
    store
        .read_all(ReadAllOptions::forward())
        .await
        .unwrap()
        .into_iter()
        .filter(|e| !e.is_system())
        .collect()
}

async fn wait_until_relayed(relay: &RelayHandle, last: Position) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while relay.status().checkpoint < Some(last) {
        assert!(
            Instant::now() < deadline,
            "the relay did not reach position {last} within 30 s: {:?}",
            relay.status()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A fresh store and a mock cluster of 3 brokers.
struct Fixture {
    store: Arc<dyn EventStore>,
    cluster: MockCluster<'static, DefaultProducerContext>,
    _dir: tempfile::TempDir,
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn EventStore> = Arc::new(EmbeddedStore::open(dir.path()).unwrap());
    Fixture { store, cluster: MockCluster::new(3).unwrap(), _dir: dir }
}

/// One consumed message, with what the sink put in it.
#[derive(Debug, Clone, PartialEq)]
struct Msg {
    partition: i32,
    key: String,
    payload: Vec<u8>,
    timestamp: Option<i64>,
    headers: HashMap<String, String>,
}

impl Msg {
    fn h(&self, key: &str) -> &str {
        self.headers.get(key).map_or("", |v| v.as_str())
    }
    fn version(&self) -> u64 {
        self.h("cairn-version").parse().unwrap()
    }
}

/// Every message of `topic`, partition by partition in offset order: reads
/// each partition up to its high watermark, so the count is exact.
fn consume(bootstrap: &str, topic: &str) -> Vec<Msg> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", "cairn-test")
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    let mut out = Vec::new();
    for p in 0..PARTITIONS {
        let (low, high) = consumer.fetch_watermarks(topic, p, Duration::from_secs(10)).unwrap();
        assert_eq!(low, 0);
        if high == 0 {
            continue;
        }
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(topic, p, Offset::Beginning).unwrap();
        consumer.assign(&tpl).unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut next = 0;
        while next < high {
            assert!(Instant::now() < deadline, "partition {p} of {topic}: read {next} of {high}");
            let Some(m) = consumer.poll(Duration::from_millis(100)) else { continue };
            let m = m.unwrap();
            assert_eq!(
                (m.partition(), m.offset()),
                (p, next),
                "offsets are contiguous (no transactions)"
            );
            next += 1;
            let headers = m.headers().map_or_else(HashMap::new, |hs| {
                hs.iter()
                    .map(|h| {
                        (
                            h.key.to_string(),
                            String::from_utf8(h.value.unwrap_or_default().to_vec()).unwrap(),
                        )
                    })
                    .collect()
            });
            out.push(Msg {
                partition: p,
                key: String::from_utf8(m.key().unwrap_or_default().to_vec()).unwrap(),
                payload: m.payload().unwrap_or_default().to_vec(),
                timestamp: m.timestamp().to_millis(),
                headers,
            });
        }
    }
    out
}

/// What a consumer that dedupes by `cairn-id` applies: each event once, in
/// the order read; per stream, the versions applied.
fn apply_once(messages: &[Msg]) -> HashMap<String, Vec<u64>> {
    let mut seen = HashSet::new();
    let mut applied: HashMap<String, Vec<u64>> = HashMap::new();
    for m in messages {
        if seen.insert(m.h("cairn-id").to_string()) {
            applied.entry(m.h("cairn-stream").to_string()).or_default().push(m.version());
        }
    }
    applied
}

fn assert_in_order(applied: &HashMap<String, Vec<u64>>, streams: usize, per_stream: u64) {
    assert_eq!(applied.len(), streams);
    for (stream, versions) in applied {
        assert_eq!(
            versions,
            &(1..=per_stream).collect::<Vec<_>>(),
            "{stream} arrived out of order or with gaps"
        );
    }
}

fn sink(cluster: &MockCluster<'static, DefaultProducerContext>, topics: Topics) -> KafkaSink {
    KafkaSink::new(&cluster.bootstrap_servers(), topics, [("reconnect.backoff.max.ms", "500")])
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_event_arrives_keyed_by_stream_in_version_order_with_its_id() {
    let Fixture { store, cluster, _dir } = fixture();
    cluster.create_topic("events", PARTITIONS, 3).unwrap();
    write(store.as_ref(), "shop", 6, 0, 300).await;
    let relay = Relay::new(
        store.clone(),
        RelayConfig::new("kafka"),
        sink(&cluster, Topics::One("events".into())),
    )
    .spawn();
    let events = user_events(store.as_ref()).await;
    wait_until_relayed(&relay, events.last().unwrap().position).await;
    let status = relay.status();
    relay.stop().await.unwrap();
    assert_eq!((status.published, status.retries), (300, 0));

    let got = consume(&cluster.bootstrap_servers(), "events");
    assert_eq!(got.len(), 300, "every event once");
    let by_id: HashMap<String, &RecordedEvent> =
        events.iter().map(|e| (e.id.to_string(), e)).collect();
    let mut partition_of: HashMap<&str, i32> = HashMap::new();
    let mut versions: HashMap<&str, Vec<u64>> = HashMap::new();
    for m in &got {
        let e = by_id[m.h("cairn-id")];
        assert_eq!(m.key, e.stream, "key = stream name");
        assert_eq!(m.h("cairn-stream"), e.stream);
        assert_eq!(m.version(), e.version);
        assert_eq!(m.h("cairn-position"), e.position.0.to_string());
        assert_eq!(m.h("cairn-type"), "ItemShipped");
        assert_eq!(m.h("content-type"), "application/json");
        assert_eq!(m.payload, e.data.to_vec());
        assert_eq!(m.timestamp, Some(e.timestamp.0 / 1000), "the message time is the event's");
        assert_eq!(
            *partition_of.entry(&e.stream).or_insert(m.partition),
            m.partition,
            "{} is in one partition",
            e.stream
        );
        versions.entry(&e.stream).or_default().push(m.version());
    }
    let used: HashSet<i32> = partition_of.values().copied().collect();
    assert!(
        used.len() > 1,
        "6 streams over {PARTITIONS} partitions use more than one: {partition_of:?}"
    );
    for (stream, v) in versions {
        assert_eq!(v, (1..=50).collect::<Vec<_>>(), "{stream} in version order");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_sends_the_same_ids_and_a_deduplicating_consumer_applies_each_once() {
    let Fixture { store, cluster, _dir } = fixture();
    cluster.create_topic("events", PARTITIONS, 3).unwrap();
    write(store.as_ref(), "shop", 6, 0, 300).await;
    let events = user_events(store.as_ref()).await;
    let last = events.last().unwrap().position;
    let relay = Relay::new(
        store.clone(),
        RelayConfig::new("kafka"),
        sink(&cluster, Topics::One("events".into())),
    )
    .spawn();
    wait_until_relayed(&relay, last).await;
    relay.stop().await.unwrap();

    // The checkpoint is lost back to event 100 (as if the relay died before
    // recording what it had published): the rest goes out again.
    cairn_relay::store_checkpoint(store.as_ref(), "kafka", events[99].position).await.unwrap();
    let relay = Relay::new(
        store.clone(),
        RelayConfig::new("kafka"),
        sink(&cluster, Topics::One("events".into())),
    )
    .spawn();
    wait_until_relayed(&relay, last).await;
    assert_eq!(relay.status().published, 200, "published again after the lost checkpoint");
    relay.stop().await.unwrap();

    let got = consume(&cluster.bootstrap_servers(), "events");
    assert_eq!(got.len(), 500, "Kafka keeps the repeats: the consumer drops them");
    let mut copies: HashMap<&str, Vec<&Msg>> = HashMap::new();
    for m in &got {
        copies.entry(m.h("cairn-id")).or_default().push(m);
    }
    for (i, e) in events.iter().enumerate() {
        let c = &copies[e.id.to_string().as_str()];
        assert_eq!(c.len(), if i < 100 { 1 } else { 2 }, "event {i}");
        assert!(
            c.iter().all(|m| *m == c[0]),
            "a repeat is the same message, in the same partition: {c:?}"
        );
    }
    assert_in_order(&apply_once(&got), 6, 50);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_relay_waits_out_a_broker_outage_and_loses_nothing() {
    let Fixture { store, cluster, _dir } = fixture();
    cluster.create_topic("events", PARTITIONS, 3).unwrap();
    // 3 s rather than less: on a loaded machine a shorter timeout fails
    // messages before the outage too, and one that fails while a later one
    // of its stream is already in flight is the race the sink leaves open.
    let sink = KafkaSink::new(
        &cluster.bootstrap_servers(),
        Topics::One("events".into()),
        [("message.timeout.ms", "3000"), ("reconnect.backoff.max.ms", "500")],
    )
    .unwrap();
    let config =
        RelayConfig::new("kafka").backoff(Duration::from_millis(20), Duration::from_millis(200));
    let relay = Relay::new(store.clone(), config, sink).spawn();

    write(store.as_ref(), "shop", 4, 0, 100).await;
    wait_until_relayed(&relay, user_events(store.as_ref()).await.last().unwrap().position).await;
    cluster.broker_down(-1).unwrap();
    write(store.as_ref(), "shop", 4, 100, 100).await;
    // Wait for the relay to notice (each try fails after message.timeout.ms).
    let deadline = Instant::now() + Duration::from_secs(30);
    while relay.status().retries < 2 {
        assert!(
            Instant::now() < deadline,
            "no failed publish while every broker is down: {:?}",
            relay.status()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let status = relay.status();
    assert!(status.error.as_deref().is_some_and(|e| e.contains("Kafka")), "{status:?}");
    assert_eq!(
        relay.pending().await.unwrap().0,
        100,
        "nothing confirmed while the brokers are down"
    );
    cluster.broker_up(-1).unwrap();
    wait_until_relayed(&relay, user_events(store.as_ref()).await.last().unwrap().position).await;
    assert_eq!(relay.status().error, None);
    relay.stop().await.unwrap();

    let got = consume(&cluster.bootstrap_servers(), "events");
    assert!(got.len() >= 200, "{}", got.len());
    assert_in_order(&apply_once(&got), 4, 50);
}

/// The sink, telling when one of its confirms failed.
struct Probe {
    sink: KafkaSink,
    failures: Arc<AtomicUsize>,
}

#[async_trait]
impl Sink for Probe {
    async fn send(&mut self, events: &[RecordedEvent]) -> Result<Confirm, SinkError> {
        let (confirm, failures) = (self.sink.send(events).await?, self.failures.clone());
        Ok(Box::pin(async move {
            let outcome = confirm.await;
            if outcome.is_err() {
                failures.fetch_add(1, Ordering::SeqCst);
            }
            outcome
        }))
    }

    async fn reset(&mut self) {
        self.sink.reset().await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_that_timed_out_is_not_overtaken_by_the_batches_sent_after_it() {
    let Fixture { store, cluster, _dir } = fixture();
    cluster.create_topic("events", PARTITIONS, 3).unwrap();
    let sink = KafkaSink::new(
        &cluster.bootstrap_servers(),
        Topics::One("events".into()),
        [("message.timeout.ms", "3000"), ("reconnect.backoff.max.ms", "100")],
    )
    .unwrap();
    let failures = Arc::new(AtomicUsize::new(0));
    let config =
        RelayConfig::new("kafka").backoff(Duration::from_millis(20), Duration::from_millis(200));
    let relay =
        Relay::new(store.clone(), config, Probe { sink, failures: failures.clone() }).spawn();
    write(store.as_ref(), "shop", 4, 0, 4).await;
    wait_until_relayed(&relay, user_events(store.as_ref()).await.last().unwrap().position).await;

    // With the brokers down, version 2 of each stream goes out, then 2 s
    // later version 3. The brokers are back as soon as version 2 timed out
    // (librdkafka checks about every second), while version 3 can still be
    // delivered: it must fail too, not go ahead of version 2 sent again.
    cluster.broker_down(-1).unwrap();
    write(store.as_ref(), "shop", 4, 4, 4).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(failures.load(Ordering::SeqCst), 0, "nothing timed out yet: {:?}", relay.status());
    write(store.as_ref(), "shop", 4, 8, 4).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while failures.load(Ordering::SeqCst) == 0 {
        assert!(
            Instant::now() < deadline,
            "no failure while every broker is down: {:?}",
            relay.status()
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    cluster.broker_up(-1).unwrap();
    wait_until_relayed(&relay, user_events(store.as_ref()).await.last().unwrap().position).await;
    relay.stop().await.unwrap();

    let got = consume(&cluster.bootstrap_servers(), "events");
    assert_in_order(&apply_once(&got), 4, 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_category_topics_hold_their_category() {
    let Fixture { store, cluster, _dir } = fixture();
    for t in ["cairn.order", "cairn.user", "cairn.none"] {
        cluster.create_topic(t, PARTITIONS, 3).unwrap();
    }
    write(store.as_ref(), "order", 3, 0, 30).await;
    write(store.as_ref(), "user", 2, 0, 10).await;
    let e = NewEvent::json("Ping", &serde_json::json!({})).unwrap();
    store.append("singleton", ExpectedVersion::Any, vec![e]).await.unwrap();
    let relay = Relay::new(
        store.clone(),
        RelayConfig::new("kafka"),
        sink(&cluster, Topics::PerCategory("cairn.".into())),
    )
    .spawn();
    wait_until_relayed(&relay, user_events(store.as_ref()).await.last().unwrap().position).await;
    relay.stop().await.unwrap();

    let bootstrap = cluster.bootstrap_servers();
    let order = consume(&bootstrap, "cairn.order");
    let user = consume(&bootstrap, "cairn.user");
    let none = consume(&bootstrap, "cairn.none");
    assert_eq!((order.len(), user.len(), none.len()), (30, 10, 1));
    assert!(
        order.iter().all(|m| m.key.starts_with("order-"))
            && user.iter().all(|m| m.key.starts_with("user-"))
    );
    assert_eq!(none[0].key, "singleton");
    assert_in_order(&apply_once(&order), 3, 10);
}

/// `streams × per_stream` events, in appends of 50 to one stream in turn.
async fn write_backlog(store: &dyn EventStore, category: &str, streams: u64, per_stream: u64) {
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn brokers_lost_with_batches_in_flight_lose_nothing_and_skip_nothing_in_a_stream() {
    let Fixture { store, cluster, _dir } = fixture();
    cluster.create_topic("events", PARTITIONS, 3).unwrap();
    write_backlog(store.as_ref(), "shop", 8, 2500).await;
    let events = user_events(store.as_ref()).await;
    let last = events.last().unwrap().position;
    let sink = KafkaSink::new(
        &cluster.bootstrap_servers(),
        Topics::One("events".into()),
        [("message.timeout.ms", "1000"), ("reconnect.backoff.max.ms", "500")],
    )
    .unwrap();
    let config = RelayConfig::new("kafka")
        .batch(50)
        .max_in_flight(8)
        .backoff(Duration::from_millis(20), Duration::from_millis(200));
    let relay = Relay::new(store.clone(), config, sink).spawn();

    // Every broker goes while a part is confirmed and at least three batches are out.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let s = relay.status();
        if s.checkpoint >= Some(events[1000].position) && s.in_flight >= 150 {
            break;
        }
        assert!(Instant::now() < deadline, "never 150 events in flight: {s:?}");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    cluster.broker_down(-1).unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while relay.status().retries < 1 {
        assert!(
            Instant::now() < deadline,
            "no failure while every broker is down: {:?}",
            relay.status()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(relay.status().checkpoint < Some(last), "{:?}", relay.status());
    cluster.broker_up(-1).unwrap();
    wait_until_relayed(&relay, last).await;
    relay.stop().await.unwrap();

    // Per stream (one partition each), the broker holds its versions with
    // repeats but no gap: each message is the next version or an earlier
    // one sent again; a consumer dropping repeats applies them all in order.
    let got = consume(&cluster.bootstrap_servers(), "events");
    let mut previous: HashMap<String, u64> = HashMap::new();
    for m in &got {
        let (stream, version) = (m.h("cairn-stream").to_string(), m.version());
        let before = previous.insert(stream.clone(), version).unwrap_or(0);
        assert!(version <= before + 1, "{stream}: version {version} right after {before}");
    }
    assert_in_order(&apply_once(&got), 8, 2500);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_batch_is_not_overtaken_by_the_batches_sent_after_it() {
    let Fixture { store, cluster, _dir } = fixture();
    cluster.create_topic("events", PARTITIONS, 3).unwrap();
    write(store.as_ref(), "shop", 2, 0, 100).await;
    // The first Produce request is refused for good; the relay has 8
    // batches of 5 out by then, each in a request of its own.
    cluster.request_errors(
        RDKafkaApiKey::Produce,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_INVALID_RECORD],
    );
    let sink = KafkaSink::new(
        &cluster.bootstrap_servers(),
        Topics::One("events".into()),
        [("batch.num.messages", "5"), ("reconnect.backoff.max.ms", "500")],
    )
    .unwrap();
    let config = RelayConfig::new("kafka")
        .batch(5)
        .backoff(Duration::from_millis(20), Duration::from_millis(200));
    let relay = Relay::new(store.clone(), config, sink).spawn();
    wait_until_relayed(&relay, user_events(store.as_ref()).await.last().unwrap().position).await;
    let status = relay.status();
    relay.stop().await.unwrap();
    assert!(status.retries >= 1, "the refusal was retried: {status:?}");

    let got = consume(&cluster.bootstrap_servers(), "events");
    assert_in_order(&apply_once(&got), 2, 50);
}
