use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use cairn_core::{ExpectedVersion, NewEvent, RecordedEvent};
use cairn_relay::{RabbitSink, Relay, RelayConfig};
use lapin::options::{
    BasicGetOptions, ExchangeDeleteOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Channel, Connection, ConnectionProperties};

use crate::common::{
    Fixture, Proxy, by_stream, cut_mid_pipeline, fixture, in_order, no_event_skipped,
    pipelined_config, user_events, wait_for_retries, wait_until_relayed, write, write_backlog,
};
use crate::reachable;

const RABBIT: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

/// A message as a consumer sees it.
#[derive(Debug)]
struct Message {
    id: String,
    routing_key: String,
    kind: String,
    content_type: String,
    delivery_mode: u8,
    timestamp: u64,
    stream: String,
    version: u64,
    position: u64,
    data: Vec<u8>,
}

/// A consumer's own connection to the broker, not through the sink.
async fn consumer() -> (Connection, Channel) {
    let connection = Connection::connect(RABBIT, ConnectionProperties::default()).await.unwrap();
    let channel = connection.create_channel().await.unwrap();
    (connection, channel)
}

/// Takes every message waiting in `queue`, in queue order.
async fn take_all(channel: &Channel, queue: &str) -> Vec<Message> {
    let mut out = Vec::new();
    while let Some(m) =
        channel.basic_get(queue.into(), BasicGetOptions { no_ack: true }).await.unwrap()
    {
        let (d, p) = (&m.delivery, &m.delivery.properties);
        let headers = p.headers().clone().unwrap_or_default();
        let header = |k: &str| {
            headers.inner().get(k).cloned().unwrap_or_else(|| panic!("no {k} header: {p:?}"))
        };
        let number = |k: &str| match header(k) {
            AMQPValue::LongLongInt(n) => n as u64,
            other => panic!("{k} is {other:?}"),
        };
        let text = |s: &Option<lapin::types::ShortString>| {
            s.as_ref().map(|s| s.to_string()).unwrap_or_default()
        };
        out.push(Message {
            id: text(p.message_id()),
            routing_key: d.routing_key.to_string(),
            kind: text(p.kind()),
            content_type: text(p.content_type()),
            delivery_mode: p.delivery_mode().unwrap_or(0),
            timestamp: p.timestamp().unwrap_or(0),
            stream: match header("cairn-stream") {
                AMQPValue::LongString(s) => String::from_utf8(s.as_bytes().to_vec()).unwrap(),
                other => panic!("cairn-stream is {other:?}"),
            },
            version: number("cairn-version"),
            position: number("cairn-position"),
            data: d.data.clone(),
        });
    }
    out
}

/// How many messages `queue` holds.
async fn waiting(channel: &Channel, queue: &str) -> u32 {
    channel
        .queue_declare(
            queue.into(),
            QueueDeclareOptions::durable().passive(),
            FieldTable::default(),
        )
        .await
        .unwrap()
        .message_count()
}

async fn clean_up(channel: &Channel, exchange: &str, queues: &[&str]) {
    for q in queues {
        channel.queue_delete((*q).into(), QueueDeleteOptions::default()).await.unwrap();
    }
    channel.exchange_delete(exchange.into(), ExchangeDeleteOptions::default()).await.unwrap();
}

fn ids(events: &[RecordedEvent]) -> Vec<String> {
    events.iter().map(|e| e.id.to_string()).collect()
}

fn message_ids(messages: &[Message]) -> Vec<String> {
    messages.iter().map(|m| m.id.clone()).collect()
}

fn streams(messages: &[Message]) -> impl Iterator<Item = (&str, u64)> {
    messages.iter().map(|m| (m.stream.as_str(), m.version))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_event_arrives_once_in_stream_order_with_its_id_as_message_id() {
    if !reachable("127.0.0.1:5672", "RabbitMQ") {
        return;
    }
    let Fixture { store, id, category, _dir } = fixture();
    let (exchange, queue) = (format!("cairn-t-{id}"), format!("cairn-t-{id}-all"));
    write(store.as_ref(), &category, 6, 0, 300).await;
    let mut sink = RabbitSink::new(RABBIT, &exchange).unwrap();
    sink.bind_queue(&queue, "#").await.unwrap();
    let relay = Relay::new(store.clone(), RelayConfig::new(format!("rabbit-{id}")), sink).spawn();
    let events = user_events(store.as_ref()).await;
    wait_until_relayed(&relay, events.last().unwrap().position).await;
    assert_eq!(relay.pending().await.unwrap().0, 0);
    let status = relay.status();
    relay.stop().await.unwrap();
    assert_eq!(status.published, 300);

    let (_connection, channel) = consumer().await;
    let got = take_all(&channel, &queue).await;
    assert_eq!(got.len(), 300, "each event once");
    assert_eq!(message_ids(&got), ids(&events), "the message id is the event id, in global order");
    in_order(&by_stream(streams(&got)), 50);
    for (m, e) in got.iter().zip(&events) {
        assert_eq!(m.routing_key, format!("{category}.ItemShipped"));
        assert_eq!(
            (m.kind.as_str(), m.content_type.as_str(), m.delivery_mode),
            ("ItemShipped", "application/json", 2)
        );
        assert_eq!(
            (m.stream.as_str(), m.version, m.position),
            (e.stream.as_str(), e.version, e.position.0)
        );
        assert_eq!(m.timestamp, (e.timestamp.0 / 1_000_000) as u64);
        assert_eq!(m.data, e.data.as_ref());
    }
    clean_up(&channel, &exchange, &[&queue]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bindings_route_each_consuming_service_its_own_events() {
    if !reachable("127.0.0.1:5672", "RabbitMQ") {
        return;
    }
    let Fixture { store, id, _dir, .. } = fixture();
    let exchange = format!("cairn-t-{id}");
    let (shipping, support) = (format!("cairn-t-{id}-shipping"), format!("cairn-t-{id}-support"));
    let appends = [
        ("order-1", NewEvent::json("OrderPlaced", &1).unwrap()),
        ("payment-1", NewEvent::json("PaymentFailed", &2).unwrap()),
        ("customer-1", NewEvent::json("CustomerRegistered", &3).unwrap()),
        ("order-1", NewEvent::json("OrderShipped", &4).unwrap()),
        ("payment-2", NewEvent::json("PaymentSettled", &5).unwrap()),
        ("inventory-1", NewEvent::json("StockCounted", &6).unwrap()), // no binding matches
        ("order-2", NewEvent::json("PaymentFailed", &7).unwrap()),    // both match: one copy each
        // Dots and wildcards in a type stay inside its word: `order.Order_Cancelled_`.
        ("order-3", NewEvent::binary("Order.Cancelled*", &b"\x00\x01"[..])),
    ];
    for (stream, e) in appends {
        store.append(stream, ExpectedVersion::Any, vec![e]).await.unwrap();
    }
    let mut sink = RabbitSink::new(RABBIT, &exchange).unwrap();
    sink.bind_queue(&shipping, "order.*").await.unwrap();
    sink.bind_queue(&support, "*.PaymentFailed").await.unwrap();
    sink.bind_queue(&support, "customer.*").await.unwrap();
    let relay = Relay::new(store.clone(), RelayConfig::new(format!("rabbit-{id}")), sink).spawn();
    let events = user_events(store.as_ref()).await;
    wait_until_relayed(&relay, events.last().unwrap().position).await;
    relay.stop().await.unwrap();

    let (_connection, channel) = consumer().await;
    let to_shipping: Vec<RecordedEvent> =
        events.iter().filter(|e| e.stream.starts_with("order-")).cloned().collect();
    let to_support: Vec<RecordedEvent> = events
        .iter()
        .filter(|e| e.event_type == "PaymentFailed" || e.stream.starts_with("customer-"))
        .cloned()
        .collect();
    let got_shipping = take_all(&channel, &shipping).await;
    let got_support = take_all(&channel, &support).await;
    assert_eq!(
        message_ids(&got_shipping),
        ids(&to_shipping),
        "shipping gets the order events, in order"
    );
    assert_eq!(
        message_ids(&got_support),
        ids(&to_support),
        "support gets failed payments and customers, in order"
    );
    let cancelled = got_shipping.last().unwrap();
    assert_eq!(
        (cancelled.routing_key.as_str(), cancelled.kind.as_str()),
        ("order.Order_Cancelled_", "Order.Cancelled*")
    );
    assert_eq!(cancelled.content_type, "application/octet-stream");
    assert_eq!(cancelled.data, b"\x00\x01");
    clean_up(&channel, &exchange, &[&shipping, &support]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_relay_reconnects_after_a_broker_outage_and_loses_nothing() {
    if !reachable("127.0.0.1:5672", "RabbitMQ") {
        return;
    }
    let Fixture { store, id, category, _dir } = fixture();
    let (exchange, queue) = (format!("cairn-t-{id}"), format!("cairn-t-{id}-all"));
    RabbitSink::new(RABBIT, &exchange).unwrap().bind_queue(&queue, "#").await.unwrap();

    let proxy = Proxy::start("127.0.0.1:5672").await;
    let through_proxy = format!("amqp://guest:guest@127.0.0.1:{}/%2f", proxy.port);
    // Long enough that a slow confirm before the cut is not taken for a failure (that would publish repeats).
    let sink =
        RabbitSink::new(through_proxy, &exchange).unwrap().confirm_timeout(Duration::from_secs(5));
    let config = RelayConfig::new(format!("rabbit-{id}"))
        .backoff(Duration::from_millis(20), Duration::from_millis(200));
    let relay = Relay::new(store.clone(), config, sink).spawn();

    write(store.as_ref(), &category, 4, 0, 100).await;
    wait_until_relayed(&relay, user_events(store.as_ref()).await.last().unwrap().position).await;
    proxy.cut();
    write(store.as_ref(), &category, 4, 100, 100).await;
    let written = Instant::now();
    wait_for_retries(&relay, 3).await;
    let since_written = written.elapsed();
    let (pending, oldest) = relay.pending().await.unwrap();
    assert_eq!(pending, 100, "nothing gets through while the broker is away");
    assert!(
        oldest >= since_written,
        "the oldest unpublished event is at least as old as the wait: {oldest:?} < {since_written:?}"
    );
    assert!(relay.status().error.is_some(), "{:?}", relay.status());
    let (_connection, channel) = consumer().await;
    assert_eq!(
        waiting(&channel, &queue).await,
        100,
        "the broker holds only what was confirmed before the cut"
    );
    wait_for_retries(&relay, relay.status().retries + 2).await;
    let (pending, later) = relay.pending().await.unwrap();
    assert!(
        pending == 100 && later > oldest,
        "the lag grows while the outage lasts: {pending}, {later:?} after {oldest:?}"
    );

    proxy.restore();
    wait_until_relayed(&relay, user_events(store.as_ref()).await.last().unwrap().position).await;
    assert_eq!(relay.pending().await.unwrap().0, 0);
    assert!(relay.status().error.is_none(), "{:?}", relay.status());
    relay.stop().await.unwrap();

    let got = take_all(&channel, &queue).await;
    assert_eq!(
        message_ids(&got),
        ids(&user_events(store.as_ref()).await),
        "every event arrived, once, in global order"
    );
    in_order(&by_stream(streams(&got)), 50);
    clean_up(&channel, &exchange, &[&queue]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_lost_checkpoint_repeats_carry_the_same_ids_and_a_deduping_consumer_applies_each_once()
 {
    if !reachable("127.0.0.1:5672", "RabbitMQ") {
        return;
    }
    let Fixture { store, id, category, _dir } = fixture();
    let (exchange, queue) = (format!("cairn-t-{id}"), format!("cairn-t-{id}-all"));
    write(store.as_ref(), &category, 3, 0, 60).await;
    let events = user_events(store.as_ref()).await;
    let name = format!("rabbit-{id}");
    let mut sink = RabbitSink::new(RABBIT, &exchange).unwrap();
    sink.bind_queue(&queue, "#").await.unwrap();
    let relay = Relay::new(store.clone(), RelayConfig::new(&name), sink).spawn();
    wait_until_relayed(&relay, events.last().unwrap().position).await;
    relay.stop().await.unwrap();

    // The checkpoint goes back to event 20 (as if the relay died between
    // publishing and recording it): the rest goes out again.
    cairn_relay::store_checkpoint(store.as_ref(), &name, events[19].position).await.unwrap();
    let relay = Relay::new(
        store.clone(),
        RelayConfig::new(&name),
        RabbitSink::new(RABBIT, &exchange).unwrap(),
    )
    .spawn();
    wait_until_relayed(&relay, events.last().unwrap().position).await;
    assert_eq!(relay.status().published, 40, "published again after the lost checkpoint");
    relay.stop().await.unwrap();

    let (_connection, channel) = consumer().await;
    let got = take_all(&channel, &queue).await;
    assert_eq!(got.len(), 100, "RabbitMQ keeps the repeats");
    assert_eq!(message_ids(&got[..60]), ids(&events));
    assert_eq!(message_ids(&got[60..]), ids(&events[20..]), "a repeat carries the same message id");

    // A consumer that remembers the message ids it applied applies each event once.
    let mut seen = HashSet::new();
    let applied: Vec<&Message> = got.iter().filter(|m| seen.insert(m.id.clone())).collect();
    assert_eq!(applied.iter().map(|m| m.id.clone()).collect::<Vec<_>>(), ids(&events));
    in_order(&by_stream(applied.iter().map(|m| (m.stream.as_str(), m.version))), 20);
    clean_up(&channel, &exchange, &[&queue]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nacked_batch_is_published_again_once_the_broker_has_room() {
    if !reachable("127.0.0.1:5672", "RabbitMQ") {
        return;
    }
    let Fixture { store, id, category, _dir } = fixture();
    let (exchange, queue) = (format!("cairn-t-{id}"), format!("cairn-t-{id}-small"));
    // A queue of 10 that refuses more: RabbitMQ nacks what it cannot take.
    let mut arguments = FieldTable::default();
    arguments.insert("x-max-length".into(), AMQPValue::LongInt(10));
    arguments.insert("x-overflow".into(), AMQPValue::LongString("reject-publish".into()));
    let mut sink = RabbitSink::new(RABBIT, &exchange).unwrap();
    sink.bind_queue_with(&queue, "#", arguments).await.unwrap();
    let (_connection, channel) = consumer().await;

    write(store.as_ref(), &category, 3, 0, 30).await;
    let events = user_events(store.as_ref()).await;
    let config = RelayConfig::new(format!("rabbit-{id}"))
        .batch(5)
        .backoff(Duration::from_millis(20), Duration::from_millis(100));
    let relay = Relay::new(store.clone(), config, sink).spawn();
    wait_for_retries(&relay, 1).await;
    let error = relay.status().error.unwrap_or_default();
    assert!(error.contains("nack"), "{error}");
    assert_eq!(relay.status().checkpoint, Some(events[9].position), "two batches of five fit");
    assert_eq!(waiting(&channel, &queue).await, 10);

    // A consumer makes room; the refused batch goes out again.
    let mut got = Vec::new();
    for _ in 0..1500 {
        got.extend(take_all(&channel, &queue).await);
        if relay.status().checkpoint >= Some(events.last().unwrap().position) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    wait_until_relayed(&relay, events.last().unwrap().position).await;
    relay.stop().await.unwrap();
    got.extend(take_all(&channel, &queue).await);
    let arrived: HashSet<String> = got.iter().map(|m| m.id.clone()).collect();
    assert_eq!(arrived, ids(&events).into_iter().collect::<HashSet<_>>(), "every event arrives");
    // The broker may take a later message of a batch whose earlier one it
    // refused (the module docs say so), but the relay sends the whole
    // unconfirmed rest again. So a consumer that applies only the next
    // version of each stream, skipping repeats and anything past a gap,
    // applies every event once and in stream order.
    let mut next: HashMap<String, u64> = HashMap::new();
    let mut applied = Vec::new();
    for m in &got {
        let expected = next.entry(m.stream.clone()).or_insert(1);
        if m.version == *expected {
            *expected += 1;
            applied.push((m.stream.as_str(), m.version));
        }
    }
    assert_eq!(applied.len(), events.len(), "a gap-checking consumer applies every event once");
    in_order(&by_stream(applied), 10);
    clean_up(&channel, &exchange, &[&queue]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_with_batches_in_flight_loses_nothing_and_skips_nothing() {
    if !reachable("127.0.0.1:5672", "RabbitMQ") {
        return;
    }
    let Fixture { store, id, category, _dir } = fixture();
    let (exchange, queue) = (format!("cairn-t-{id}"), format!("cairn-t-{id}-all"));
    RabbitSink::new(RABBIT, &exchange).unwrap().bind_queue(&queue, "#").await.unwrap();
    write_backlog(store.as_ref(), &category, 8, 750).await;
    let events = user_events(store.as_ref()).await;

    let proxy = Proxy::start("127.0.0.1:5672").await;
    let through_proxy = format!("amqp://guest:guest@127.0.0.1:{}/%2f", proxy.port);
    // Long enough that a slow confirm before the cut is not taken for a failure (that would publish repeats).
    let sink =
        RabbitSink::new(through_proxy, &exchange).unwrap().confirm_timeout(Duration::from_secs(5));
    let config = pipelined_config(format!("rabbit-{id}"));
    let relay = Relay::new(store.clone(), config, sink).spawn();

    cut_mid_pipeline(relay, &proxy, &events).await;

    let (_connection, channel) = consumer().await;
    let got = take_all(&channel, &queue).await;
    no_event_skipped(&events, &message_ids(&got));
    let mut seen = HashSet::new();
    let applied: Vec<&Message> = got.iter().filter(|m| seen.insert(m.id.clone())).collect();
    assert_eq!(
        applied.iter().map(|m| m.id.clone()).collect::<Vec<_>>(),
        ids(&events),
        "a deduping consumer applies each event once, in global order"
    );
    in_order(&by_stream(applied.iter().map(|m| (m.stream.as_str(), m.version))), 750);
    clean_up(&channel, &exchange, &[&queue]).await;
}
