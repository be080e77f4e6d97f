//! W9: the relay. First 100,000 events already in the store are relayed to
//! the broker (events/s until the relay's checkpoint reaches the last one),
//! then, with the relay caught up and idle, events appended one at a time
//! (500/s) are timed from the append call to their arrival at a consumer
//! of the broker (p50/p99 ms): the live path, woken by LISTEN/NOTIFY on
//! PostgreSQL and by the head on the embedded engine.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, anyhow, bail};
use cairn_core::{ExpectedVersion, NewEvent, ReadAllOptions};
use cairn_relay::{NatsSink, RabbitSink, Relay, RelayConfig, RelayHandle, Sink};
use futures_util::StreamExt;
use tokio::sync::mpsc;
use uuid::Uuid;

use crate::measure::{Target, deposit, percentile};

pub(crate) const NATS_URL: &str = "127.0.0.1:4222";
/// Scales the live part with the backlog (at least 100 events).
pub(crate) fn live_events(scale: f64) -> usize {
    ((LIVE as f64 * scale) as usize).max(100)
}

pub(crate) const AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

/// Live events timed end to end at full scale.
const LIVE: usize = 2_000;

pub(crate) async fn w9(t: &Target, events: u64, live: usize, sinks: &[String]) -> Result<String> {
    // The backlog: as W2 writes it (batches of 100 over 1,000 streams).
    let mut handles = Vec::new();
    for task in 0..16u64 {
        let store = t.store.clone();
        handles.push(tokio::spawn(async move {
            for b in (task..events / 100).step_by(16) {
                let batch = (0..100).map(|i| deposit(b * 100 + i, Uuid::now_v7())).collect();
                store.append(&format!("relayed-{}", b % 1000), ExpectedVersion::Any, batch).await?;
            }
            anyhow::Ok(())
        }));
    }
    for h in handles {
        h.await??;
    }
    let last = t
        .store
        .read_all(ReadAllOptions::backward().limit(1))
        .await?
        .first()
        .map(|e| e.position)
        .context("the store is empty")?;
    let mut lines = Vec::new();
    for sink in sinks {
        let id = Uuid::new_v4().simple().to_string()[..12].to_string();
        let line = match sink.as_str() {
            "nats" => {
                let client = async_nats::connect(NATS_URL)
                    .await
                    .with_context(|| format!("cannot reach NATS at {NATS_URL}; W9 needs it"))?;
                let prefix = format!("bench{id}");
                let stream = format!("CAIRN_BENCH_{id}");
                let sink = NatsSink::new(client.clone(), &prefix);
                sink.ensure_stream(&stream).await.map_err(|e| anyhow!(e.0))?;
                let mut sub = client.subscribe(format!("{prefix}.>")).await?;
                let (tx, rx) = mpsc::unbounded_channel();
                let consumer = tokio::spawn(async move {
                    while let Some(m) = sub.next().await {
                        let id = m
                            .headers
                            .as_ref()
                            .and_then(|h| h.get("Nats-Msg-Id"))
                            .map(|v| v.to_string());
                        if let Some(id) = id.and_then(|s| s.parse::<Uuid>().ok())
                            && tx.send((id, Instant::now())).is_err()
                        {
                            return;
                        }
                    }
                });
                let result = measure(t, "nats", sink, &id, last, events, live, rx).await;
                consumer.abort();
                let _ = async_nats::jetstream::new(client).delete_stream(&stream).await;
                result?
            }
            "rabbitmq" => {
                let exchange = format!("cairn.bench.{id}");
                let mut sink = RabbitSink::new(AMQP_URL, &exchange).map_err(|e| anyhow!(e.0))?;
                // A queue that takes everything, so the broker keeps (and we can time) each message.
                let queue = format!("cairn.bench.{id}");
                sink.bind_queue(&queue, "#")
                    .await
                    .map_err(|e| anyhow!("RabbitMQ at {AMQP_URL} (W9 needs it): {}", e.0))?;
                let (tx, rx) = mpsc::unbounded_channel();
                let consumer = tokio::spawn(rabbit_consumer(queue.clone(), tx));
                let result = measure(t, "rabbitmq", sink, &id, last, events, live, rx).await;
                consumer.abort();
                let _ = rabbit_cleanup(&queue, &exchange).await;
                result?
            }
            other => bail!("unknown sink '{other}': nats or rabbitmq"),
        };
        lines.push(line);
    }
    Ok(lines.join("\n"))
}

#[allow(clippy::too_many_arguments)] // a bench helper: each is one figure of the line
async fn measure<S: Sink + 'static>(
    t: &Target,
    name: &str,
    sink: S,
    id: &str,
    last: cairn_core::Position,
    events: u64,
    live: usize,
    mut arrivals: mpsc::UnboundedReceiver<(Uuid, Instant)>,
) -> Result<String> {
    let started = Instant::now();
    let relay =
        Relay::new(t.store.clone(), RelayConfig::new(format!("bench-{name}-{id}")), sink).spawn();
    wait_for(&relay, last, Duration::from_secs(600)).await?;
    let secs = started.elapsed().as_secs_f64();
    // Events appended since the backlog (an earlier sink's live part) go out
    // first, so that the live part starts with the relay idle.
    let newest =
        t.store.read_query(&cairn_core::Query::all(), ReadAllOptions::backward().limit(1)).await?;
    if let Some(e) = newest.first() {
        wait_for(&relay, e.position, Duration::from_secs(60)).await?;
    }
    // The live path: the relay is idle; each event is timed from the append call.
    while arrivals.try_recv().is_ok() {}
    let mut sent = HashMap::with_capacity(live);
    let mut tick = tokio::time::interval(Duration::from_millis(2));
    for i in 0..live {
        tick.tick().await;
        let e: NewEvent = deposit(i as u64, Uuid::now_v7());
        sent.insert(e.id, Instant::now());
        t.store.append(&format!("live-{}", i % 10), ExpectedVersion::Any, vec![e]).await?;
    }
    let mut latencies = Vec::with_capacity(live);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while latencies.len() < live {
        match tokio::time::timeout_at(deadline, arrivals.recv()).await {
            Ok(Some((id, at))) => {
                if let Some(t0) = sent.remove(&id) {
                    latencies.push(at.saturating_duration_since(t0));
                }
            }
            _ => bail!(
                "W9 {name}: {} live events did not reach the broker within 30 s; relay: {:?}",
                sent.len(),
                relay.status()
            ),
        }
    }
    let status = relay.status();
    relay.stop().await?;
    latencies.sort();
    let ms = |p: f64| percentile(&latencies, p) as f64 / 1000.0;
    Ok(format!(
        "bench W9 backend={} sink={name} events={events} batch=100 secs={secs:.2} events_per_s={:.0} live={live} live_rate_per_s=500 p50_ms={:.2} p99_ms={:.2} retries={}",
        t.backend,
        events as f64 / secs,
        ms(0.5),
        ms(0.99),
        status.retries
    ))
}

async fn wait_for(relay: &RelayHandle, last: cairn_core::Position, limit: Duration) -> Result<()> {
    let started = Instant::now();
    while relay.status().checkpoint < Some(last) {
        if started.elapsed() > limit {
            bail!("the relay did not catch up within {limit:?}: {:?}", relay.status());
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    Ok(())
}

async fn rabbit_consumer(queue: String, tx: mpsc::UnboundedSender<(Uuid, Instant)>) -> Result<()> {
    use lapin::options::BasicConsumeOptions;
    let conn = lapin::Connection::connect(AMQP_URL, lapin::ConnectionProperties::default()).await?;
    let channel = conn.create_channel().await?;
    let mut consumer = channel
        .basic_consume(
            queue.as_str().into(),
            "bench".into(),
            BasicConsumeOptions { no_ack: true, ..Default::default() },
            Default::default(),
        )
        .await?;
    while let Some(delivery) = consumer.next().await {
        let delivery = delivery?;
        let id =
            delivery.properties.message_id().as_ref().and_then(|s| s.as_str().parse::<Uuid>().ok());
        if let Some(id) = id
            && tx.send((id, Instant::now())).is_err()
        {
            break;
        }
    }
    Ok(())
}

async fn rabbit_cleanup(queue: &str, exchange: &str) -> Result<()> {
    let conn = lapin::Connection::connect(AMQP_URL, lapin::ConnectionProperties::default()).await?;
    let channel = conn.create_channel().await?;
    channel.queue_delete(queue.into(), Default::default()).await?;
    channel.exchange_delete(exchange.into(), Default::default()).await?;
    Ok(())
}
