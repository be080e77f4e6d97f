//! The relay's pipeline against a scripted sink: the test sees every batch
//! sent and decides when and how the broker answers, so that confirms can
//! come out of order, fail in the middle of the pipeline, or be pending
//! when the relay stops. No broker is needed.

use std::time::Duration;

use async_trait::async_trait;
use cairn_core::{EventStore, Position, RecordedEvent};
use cairn_relay::{Confirm, Relay, RelayConfig, RelayHandle, Sink, SinkError, stored_checkpoint};
use futures_util::FutureExt;
use tokio::sync::{mpsc, oneshot};

use crate::common::{Fixture, fixture, user_events, wait_until_relayed, write};

/// A batch the relay sent, and the broker's answer to give.
struct Sent {
    events: Vec<RecordedEvent>,
    answer: oneshot::Sender<Result<(), String>>,
}

impl Sent {
    fn confirm(self) {
        let _ = self.answer.send(Ok(()));
    }
    fn fail(self, why: &str) {
        let _ = self.answer.send(Err(why.to_string()));
    }
    fn ids(&self) -> Vec<String> {
        self.events.iter().map(|e| e.id.to_string()).collect()
    }
}

/// Hands each batch to the test; its confirm resolves with the test's answer.
struct Scripted {
    sent: mpsc::UnboundedSender<Sent>,
}

#[async_trait]
impl Sink for Scripted {
    async fn send(&mut self, events: &[RecordedEvent]) -> Result<Confirm, SinkError> {
        let (answer, answered) = oneshot::channel();
        self.sent
            .send(Sent { events: events.to_vec(), answer })
            .map_err(|_| SinkError("the test is gone".into()))?;
        Ok(Box::pin(async move {
            match answered.await {
                Ok(answer) => answer.map_err(SinkError),
                Err(_) => Err(SinkError("no answer".into())),
            }
        }))
    }
}

fn scripted(f: &Fixture, config: RelayConfig) -> (RelayHandle, mpsc::UnboundedReceiver<Sent>) {
    let (tx, rx) = mpsc::unbounded_channel();
    (Relay::new(f.store.clone(), config, Scripted { sent: tx }).spawn(), rx)
}

async fn next(sent: &mut mpsc::UnboundedReceiver<Sent>) -> Sent {
    tokio::time::timeout(Duration::from_secs(15), sent.recv())
        .await
        .expect("the relay sent nothing within 15 s")
        .expect("the relay is gone")
}

fn ids(events: &[RecordedEvent]) -> Vec<String> {
    events.iter().map(|e| e.id.to_string()).collect()
}

/// Batches of 10, up to 4 in flight, the checkpoint written only when idle or stopping.
fn config(name: &str) -> RelayConfig {
    RelayConfig::new(name)
        .batch(10)
        .max_in_flight(4)
        .checkpoint_interval(Duration::from_secs(3600))
        .backoff(Duration::from_millis(10), Duration::from_millis(50))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn several_batches_go_out_before_the_first_is_confirmed_and_the_checkpoint_follows_the_confirmed_prefix()
 {
    let f = fixture();
    write(f.store.as_ref(), &f.category, 3, 0, 100).await;
    let events = user_events(f.store.as_ref()).await;
    let (relay, mut sent) = scripted(&f, config("prefix"));

    // Four batches are sent with none confirmed: the pipeline is full.
    let mut batches = Vec::new();
    for i in 0..4 {
        let b = next(&mut sent).await;
        assert_eq!(
            b.ids(),
            ids(&events[i * 10..i * 10 + 10]),
            "batch {i} holds the next ten events, in order"
        );
        batches.push(b);
    }
    eventually(|| relay.status().in_flight == 40, "40 events in flight").await;
    assert_eq!(relay.status().checkpoint, None);

    // The broker confirms the 2nd and 3rd, then refuses the 1st: nothing was
    // confirmed in order, so all four go again, from the 1st, same ids.
    let mut batches = batches.into_iter();
    let (b0, b1, b2, b3) = (
        batches.next().unwrap(),
        batches.next().unwrap(),
        batches.next().unwrap(),
        batches.next().unwrap(),
    );
    b1.confirm();
    b2.confirm();
    b0.fail("refused");
    b3.confirm();
    let again = next(&mut sent).await;
    assert_eq!(again.ids(), ids(&events[..10]), "sent again from the oldest unconfirmed event");
    let status = relay.status();
    assert_eq!((status.checkpoint, status.published, status.retries), (None, 0, 1), "{status:?}");
    assert_eq!(status.error.as_deref(), Some("refused"));

    // From now on the broker confirms everything: every event, in order,
    // each batch once more, and the checkpoint reaches the end.
    again.confirm();
    let mut got = events[..10].to_vec();
    while got.len() < events.len() {
        let b = next(&mut sent).await;
        got.extend(b.events.iter().cloned());
        b.confirm();
    }
    assert_eq!(ids(&got), ids(&events), "after the repeat, each event once more, in order");
    wait_until_relayed(&relay, events.last().unwrap().position).await;
    let status = relay.status();
    assert_eq!((status.published, status.retries, status.error), (100, 1, None));
    relay.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failure_in_the_middle_of_the_pipeline_keeps_the_confirmed_prefix_and_sends_the_rest_again()
 {
    let f = fixture();
    write(f.store.as_ref(), &f.category, 4, 0, 200).await;
    let events = user_events(f.store.as_ref()).await;
    let (relay, mut sent) = scripted(&f, config("middle"));

    let b0 = next(&mut sent).await;
    let b1 = next(&mut sent).await;
    let b2 = next(&mut sent).await;
    let b3 = next(&mut sent).await;
    // The 3rd fails while the 4th is still out, and the 1st and 2nd are confirmed.
    b2.fail("connection lost");
    b0.confirm();
    b1.confirm();
    // The relay waits for the 4th to settle before sending anything again.
    b3.confirm();
    let again = next(&mut sent).await;
    assert_eq!(again.ids(), ids(&events[20..30]), "the 3rd batch goes again, first");
    let status = relay.status();
    assert_eq!(
        status.checkpoint,
        Some(events[19].position),
        "the confirmed prefix stands: {status:?}"
    );
    assert_eq!((status.published, status.retries), (20, 1));

    // Confirm everything from here on; record every event sent.
    let mut sent_after = again.events.clone();
    again.confirm();
    while sent_after.len() < events.len() - 20 {
        let b = next(&mut sent).await;
        sent_after.extend(b.events.iter().cloned());
        b.confirm();
    }
    assert_eq!(
        ids(&sent_after),
        ids(&events[20..]),
        "the 4th batch is repeated after the 3rd, then the rest, in order"
    );
    wait_until_relayed(&relay, events.last().unwrap().position).await;
    assert_eq!(relay.status().published, 200, "each event confirmed once in order");
    relay.stop().await.unwrap();
    covers(f.store.as_ref(), "middle", events.last().unwrap().position).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_writes_the_checkpoint_of_everything_confirmed_and_a_restart_resumes_there() {
    let f = fixture();
    write(f.store.as_ref(), &f.category, 3, 0, 100).await;
    let events = user_events(f.store.as_ref()).await;
    // A backoff of an hour: after the refusal below, nothing is sent again before the stop.
    let (relay, mut sent) =
        scripted(&f, config("stop").backoff(Duration::from_secs(3600), Duration::from_secs(3600)));

    let b0 = next(&mut sent).await;
    let b1 = next(&mut sent).await;
    let b2 = next(&mut sent).await;
    let b3 = next(&mut sent).await;
    b0.confirm();
    b1.confirm();
    // Two batches' room: the relay sends the 5th and 6th, so it has taken
    // the two confirms; the checkpoint moved in memory but, busy and with
    // an hour between writes, the relay has not written it.
    let b4 = next(&mut sent).await;
    let b5 = next(&mut sent).await;
    assert_eq!(b5.ids(), ids(&events[50..60]));
    let status = relay.status();
    assert_eq!(
        (status.checkpoint, status.durable_checkpoint),
        (Some(events[19].position), None),
        "{status:?}"
    );
    assert_eq!(
        stored_checkpoint(f.store.as_ref(), "stop").await.unwrap(),
        None,
        "no write per batch"
    );

    // Stop while four batches are in flight: it sends nothing more, waits
    // for their answers, and writes the checkpoint of the confirmed prefix.
    // (Polled once, the stop is asked for before the broker answers.)
    let stop = relay.stop();
    tokio::pin!(stop);
    assert!((&mut stop).now_or_never().is_none());
    b2.confirm();
    b3.fail("refused");
    b4.confirm();
    b5.confirm();
    stop.await.unwrap();
    assert_eq!(
        stored_checkpoint(f.store.as_ref(), "stop").await.unwrap(),
        Some(events[29].position),
        "the 3rd batch was confirmed, the 4th refused: the checkpoint is the end of the 3rd"
    );
    assert!(sent.recv().await.is_none(), "nothing was sent after the stop");

    // A new relay resumes after the checkpoint: the refused batch first.
    let (relay, mut sent) = scripted(&f, config("stop"));
    let b = next(&mut sent).await;
    assert_eq!(b.ids(), ids(&events[30..40]));
    b.confirm();
    let mut got = events[..40].to_vec();
    while got.len() < events.len() {
        let b = next(&mut sent).await;
        got.extend(b.events.iter().cloned());
        b.confirm();
    }
    assert_eq!(ids(&got), ids(&events));
    wait_until_relayed(&relay, events.last().unwrap().position).await;
    relay.stop().await.unwrap();
    covers(f.store.as_ref(), "stop", events.last().unwrap().position).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn busy_the_relay_writes_its_checkpoint_every_interval_and_idle_at_once() {
    let f = fixture();
    write(f.store.as_ref(), &f.category, 3, 0, 30).await;
    let events = user_events(f.store.as_ref()).await;
    let (relay, mut sent) = scripted(&f, config("idle"));
    for _ in 0..3 {
        next(&mut sent).await.confirm();
    }
    // Nothing left to send or confirm: the checkpoint is written at once,
    // although the interval is an hour.
    wait_for_durable(&relay, events[29].position).await;
    assert_eq!(
        stored_checkpoint(f.store.as_ref(), "idle").await.unwrap(),
        Some(events[29].position)
    );
    relay.stop().await.unwrap();

    // A short interval: written while batches are still in flight.
    write(f.store.as_ref(), &f.category, 3, 30, 60).await;
    let events = user_events(f.store.as_ref()).await;
    let (relay, mut sent) =
        scripted(&f, config("idle").checkpoint_interval(Duration::from_millis(1)));
    let mut held = Vec::new();
    for i in 0..4 {
        let b = next(&mut sent).await;
        assert_eq!(b.ids(), ids(&events[30 + i * 10..40 + i * 10]));
        held.push(b);
    }
    let mut held = held.into_iter();
    held.next().unwrap().confirm();
    // The relay keeps the other three in flight (and sends a fifth once it
    // has taken the confirm); the write does not wait for them.
    wait_for_durable(&relay, events[39].position).await;
    assert!(relay.status().in_flight >= 30, "{:?}", relay.status());
    for b in held {
        b.confirm();
    }
    let mut count = 40;
    while count < 60 {
        let b = next(&mut sent).await;
        count += b.events.len();
        b.confirm();
    }
    wait_until_relayed(&relay, events.last().unwrap().position).await;
    relay.stop().await.unwrap();
    covers(f.store.as_ref(), "idle", events.last().unwrap().position).await;
}

/// The stored checkpoint is at or after `last` (it may also cover the
/// relay's own checkpoint events, which are skipped).
async fn covers(store: &dyn EventStore, name: &str, last: Position) {
    let stored = stored_checkpoint(store, name).await.unwrap();
    assert!(stored >= Some(last), "the stored checkpoint {stored:?} does not cover {last}");
}

async fn eventually(condition: impl Fn() -> bool, what: &str) {
    for _ in 0..1500 {
        if condition() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("not within 15 s: {what}");
}

async fn wait_for_durable(relay: &RelayHandle, position: Position) {
    for _ in 0..1500 {
        if relay.status().durable_checkpoint >= Some(position) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("the checkpoint was not written up to {position} within 15 s: {:?}", relay.status());
}
