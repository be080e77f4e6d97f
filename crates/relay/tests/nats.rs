use std::time::Duration;

use cairn_relay::{NatsSink, Relay, RelayConfig};

use crate::common::{
    Fixture, Proxy, by_stream, cut_mid_pipeline, fixture, in_order, no_event_skipped,
    pipelined_config, user_events, wait_until_relayed, write, write_backlog,
};
use crate::reachable;

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

/// A subject prefix and a JetStream stream no other test uses.
fn names(id: &str) -> (String, String) {
    (format!("t{id}"), format!("CAIRN_T_{id}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_event_arrives_once_in_stream_order_and_a_replay_is_deduplicated() {
    if !reachable("127.0.0.1:4222", "NATS") {
        return;
    }
    let Fixture { store, id, category, _dir } = fixture();
    let (prefix, js_stream) = names(&id);
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
    in_order(&by_stream(got.iter().map(|m| (m.0.as_str(), m.1))), 50);
    let ids: Vec<String> = events.iter().map(|e| e.id.to_string()).collect();
    assert_eq!(
        got.iter().map(|m| m.2.clone()).collect::<Vec<_>>(),
        ids,
        "the message id is the event id, in global order"
    );

    // The checkpoint is lost back to event 100 (as if the relay died before
    // recording what it had published): the rest goes out again, same ids.
    cairn_relay::store_checkpoint(store.as_ref(), &format!("nats-{id}"), events[99].position)
        .await
        .unwrap();
    let sink = NatsSink::new(client.clone(), &prefix);
    let relay = Relay::new(store.clone(), RelayConfig::new(format!("nats-{id}")), sink).spawn();
    wait_until_relayed(&relay, events.last().unwrap().position).await;
    assert_eq!(relay.status().published, 200, "published again after the lost checkpoint");
    relay.stop().await.unwrap();
    assert_eq!(
        messages(&client, &js_stream).await.len(),
        300,
        "JetStream dropped the repeats by message id"
    );
    async_nats::jetstream::new(client).delete_stream(&js_stream).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_relay_waits_out_a_broker_outage_and_loses_nothing() {
    if !reachable("127.0.0.1:4222", "NATS") {
        return;
    }
    let Fixture { store, id, category, _dir } = fixture();
    let (prefix, js_stream) = names(&id);
    let direct = async_nats::connect("127.0.0.1:4222").await.unwrap();
    NatsSink::new(direct.clone(), &prefix).ensure_stream(&js_stream).await.unwrap();

    let proxy = Proxy::start("127.0.0.1:4222").await;
    let options = async_nats::ConnectOptions::new()
        .retry_on_initial_connect()
        .request_timeout(Some(Duration::from_millis(500)));
    let through_proxy = options.connect(format!("127.0.0.1:{}", proxy.port)).await.unwrap();
    let config = RelayConfig::new(format!("nats-{id}"))
        .backoff(Duration::from_millis(20), Duration::from_millis(200));
    let sink = NatsSink::new(through_proxy, &prefix).ack_timeout(Duration::from_millis(300));
    let relay = Relay::new(store.clone(), config, sink).spawn();

    write(store.as_ref(), &category, 4, 0, 100).await;
    wait_until_relayed(&relay, user_events(store.as_ref()).await.last().unwrap().position).await;
    proxy.cut();
    write(store.as_ref(), &category, 4, 100, 100).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let (pending, oldest) = relay.pending().await.unwrap();
    assert_eq!(pending, 100, "nothing gets through while the broker is away");
    assert!(
        oldest >= Duration::from_millis(1000),
        "the oldest unpublished event's age grows: {oldest:?}"
    );
    assert!(relay.status().error.is_some() && relay.status().retries > 0, "{:?}", relay.status());
    proxy.restore();
    wait_until_relayed(&relay, user_events(store.as_ref()).await.last().unwrap().position).await;
    relay.stop().await.unwrap();

    let got = messages(&direct, &js_stream).await;
    assert_eq!(got.len(), 200, "every event arrived, once");
    in_order(&by_stream(got.iter().map(|m| (m.0.as_str(), m.1))), 50);
    async_nats::jetstream::new(direct).delete_stream(&js_stream).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_with_batches_in_flight_loses_nothing_and_skips_nothing() {
    if !reachable("127.0.0.1:4222", "NATS") {
        return;
    }
    let Fixture { store, id, category, _dir } = fixture();
    let (prefix, js_stream) = names(&id);
    let direct = async_nats::connect("127.0.0.1:4222").await.unwrap();
    NatsSink::new(direct.clone(), &prefix).ensure_stream(&js_stream).await.unwrap();
    write_backlog(store.as_ref(), &category, 8, 750).await;
    let events = user_events(store.as_ref()).await;

    let proxy = Proxy::start("127.0.0.1:4222").await;
    let options = async_nats::ConnectOptions::new()
        .retry_on_initial_connect()
        .request_timeout(Some(Duration::from_millis(500)));
    let through_proxy = options.connect(format!("127.0.0.1:{}", proxy.port)).await.unwrap();
    let config = pipelined_config(format!("nats-{id}"));
    let sink = NatsSink::new(through_proxy, &prefix).ack_timeout(Duration::from_millis(500));
    let relay = Relay::new(store.clone(), config, sink).spawn();

    cut_mid_pipeline(relay, &proxy, &events).await;

    let got = messages(&direct, &js_stream).await;
    let ids: Vec<String> = got.iter().map(|m| m.2.clone()).collect();
    assert_eq!(
        got.len(),
        events.len(),
        "JetStream holds each event once (repeats dropped by message id)"
    );
    no_event_skipped(&events, &ids);
    in_order(&by_stream(got.iter().map(|m| (m.0.as_str(), m.1))), 750);
    async_nats::jetstream::new(direct).delete_stream(&js_stream).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_jetstream_stream_has_its_own_chain_when_categories_go_to_different_streams() {
    if !reachable("127.0.0.1:4222", "NATS") {
        return;
    }
    let Fixture { store, id, _dir, .. } = fixture();
    let (prefix, js_stream) = names(&id);
    let client = async_nats::connect("127.0.0.1:4222").await.unwrap();
    let js = async_nats::jetstream::new(client.clone());
    let (orders, users) = (format!("{js_stream}_ORDERS"), format!("{js_stream}_USERS"));
    for (name, category) in [(&orders, "order"), (&users, "user")] {
        let config = async_nats::jetstream::stream::Config {
            name: name.clone(),
            subjects: vec![format!("{prefix}.{category}.>")],
            duplicate_window: Duration::from_secs(120),
            ..Default::default()
        };
        js.create_stream(config).await.unwrap();
    }
    // Alternating categories: each message's predecessor in the relay's
    // order is in the other stream, its predecessor in its own stream two back.
    write(store.as_ref(), "order", 3, 0, 60).await;
    write(store.as_ref(), "user", 3, 0, 60).await;
    for i in 60..120 {
        write(store.as_ref(), if i % 2 == 0 { "order" } else { "user" }, 3, i, 1).await;
    }
    let events = user_events(store.as_ref()).await;
    let config = RelayConfig::new(format!("nats-{id}"))
        .batch(7)
        .backoff(Duration::from_millis(20), Duration::from_millis(200));
    let relay = Relay::new(store.clone(), config, NatsSink::new(client.clone(), &prefix)).spawn();
    wait_until_relayed(&relay, events.last().unwrap().position).await;
    let status = relay.status();
    relay.stop().await.unwrap();
    assert_eq!((status.published, status.retries), (180, 0), "{status:?}");

    for (name, category) in [(&orders, "order"), (&users, "user")] {
        let got = messages(&client, name).await;
        let want: Vec<String> = events
            .iter()
            .filter(|e| e.stream.starts_with(category))
            .map(|e| e.id.to_string())
            .collect();
        assert_eq!(
            got.iter().map(|m| m.2.clone()).collect::<Vec<_>>(),
            want,
            "{name} holds its category, in order"
        );
        js.delete_stream(name).await.unwrap();
    }
}
