//! Who writes a group: an appender that finds the writer free does it on
//! its own thread, otherwise the holder or the writer thread takes the
//! request. A request nobody takes would wait for the writer thread's next
//! timed wake, here an hour away: racing appenders must all be answered.

use std::time::Duration;

use cairn_core::{Append, EventStore, ExpectedVersion, NewEvent, ReadStreamOptions};
use cairn_log::Options;

use crate::common::fresh_with;

const TASKS: usize = 24;
const THREADS: usize = 4;
const APPENDS: u64 = 150;

fn event(n: u64) -> NewEvent {
    NewEvent::json("Counted", &serde_json::json!({ "n": n })).unwrap()
}

fn race(linger: Duration) {
    let options = Options {
        group_linger: linger,
        checkpoint_interval: Duration::from_secs(3600),
        segment_bytes: 256 * 1024,
        ..Options::default()
    };
    let (store, _dir) = fresh_with(options);
    let rt =
        tokio::runtime::Builder::new_multi_thread().worker_threads(4).enable_all().build().unwrap();
    rt.block_on(async {
        let mut tasks = Vec::new();
        for t in 0..TASKS {
            let store = store.clone();
            tasks.push(tokio::spawn(async move {
                for n in 0..APPENDS {
                    store
                        .append(&format!("race-{t}"), ExpectedVersion::Exact(n), vec![event(n)])
                        .await
                        .unwrap();
                }
            }));
        }
        // Appenders on threads of their own (each with its own runtime), and batches, race too.
        let threads: Vec<_> = (0..THREADS)
            .map(|t| {
                let store = store.clone();
                std::thread::spawn(move || {
                    let rt =
                        tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
                    rt.block_on(async {
                        for n in (0..APPENDS).step_by(3) {
                            let appends = (0..3)
                                .map(|i| {
                                    Append::new(
                                        format!("batch-{t}"),
                                        ExpectedVersion::Exact(n + i),
                                        vec![event(n + i)],
                                    )
                                })
                                .collect();
                            for r in store.append_each(appends).await {
                                r.unwrap();
                            }
                        }
                    })
                })
            })
            .collect();
        let all = async {
            for task in tasks {
                task.await.unwrap();
            }
            tokio::task::spawn_blocking(move || {
                threads.into_iter().for_each(|t| t.join().unwrap())
            })
            .await
            .unwrap();
        };
        tokio::time::timeout(Duration::from_secs(120), all)
            .await
            .expect("an append was left in the queue with no one to write it");
    });
    for t in 0..TASKS {
        let events = rt
            .block_on(store.read_stream(&format!("race-{t}"), ReadStreamOptions::forward()))
            .unwrap();
        assert_eq!(
            events.iter().map(|e| e.version).collect::<Vec<_>>(),
            (1..=APPENDS).collect::<Vec<_>>()
        );
    }
    for t in 0..THREADS {
        assert_eq!(
            rt.block_on(store.read_stream(&format!("batch-{t}"), ReadStreamOptions::forward()))
                .unwrap()
                .len() as u64,
            APPENDS
        );
    }
}

#[test]
fn racing_appenders_are_all_answered_when_the_writer_thread_lingers() {
    race(Duration::from_micros(100));
}

#[test]
fn racing_appenders_are_all_answered_when_appenders_write_every_group() {
    race(Duration::ZERO);
}

/// An appender writes inline only after its task's other futures had their
/// turn: appends joined in one task still share one fsync, and decide
/// against the same state.
#[test]
fn appends_joined_in_one_task_share_one_group() {
    use std::sync::atomic::Ordering;
    let (store, _dir) = fresh_with(Options::default());
    let rt =
        tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    rt.block_on(async {
        store.append("warm", ExpectedVersion::Any, vec![event(0)]).await.unwrap();
        let syncs = store.stats().syncs.load(Ordering::Acquire);
        let names: Vec<String> = (0..8).map(|n| format!("joined-{n}")).collect();
        let appends = names
            .iter()
            .zip(0..)
            .map(|(name, n)| store.append(name, ExpectedVersion::NoStream, vec![event(n)]));
        for r in futures_util::future::join_all(appends).await {
            r.unwrap();
        }
        assert_eq!(
            store.stats().syncs.load(Ordering::Acquire) - syncs,
            1,
            "the eight appends took more than one fsync"
        );
        // Two that expect the same version: decided in one group, one wins.
        let (a, b) = tokio::join!(
            store.append("same", ExpectedVersion::NoStream, vec![event(1)]),
            store.append("same", ExpectedVersion::NoStream, vec![event(2)])
        );
        assert!(a.is_ok() != b.is_ok(), "{a:?} {b:?}");
    });
}

/// An append whose caller gives up after it was queued (a timeout, a
/// client that went away) is still written, soon: nobody else appends, and
/// the writer thread's timed wake is an hour away.
#[test]
fn an_append_dropped_after_it_was_queued_is_still_written() {
    let options = Options { checkpoint_interval: Duration::from_secs(3600), ..Options::default() };
    let (store, _dir) = fresh_with(options);
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        // The writer thread is parked by now.
        tokio::time::sleep(Duration::from_millis(200)).await;
        // Polled once (it queues its request), then dropped.
        let mut append =
            Box::pin(store.append("dropped", ExpectedVersion::NoStream, vec![event(1)]));
        let first =
            std::future::poll_fn(|cx| std::task::Poll::Ready(append.as_mut().poll(cx))).await;
        assert!(first.is_pending(), "the append finished in one poll: {first:?}");
        drop(append);
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while store
            .read_stream("dropped", ReadStreamOptions::forward())
            .await
            .map(|e| e.len())
            .unwrap_or(0)
            == 0
        {
            assert!(
                std::time::Instant::now() < deadline,
                "the dropped append's request stayed in the queue"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    });
}

/// `append_each` calls apply in the order they were first polled, even
/// when a full queue stops the first one midway: the server's
/// `AppendStream` queues its next batch before the last one is answered.
#[test]
fn pipelined_append_each_calls_keep_their_order_through_a_full_queue() {
    let (store, _dir) = fresh_with(Options { queue_depth: 4, ..Options::default() });
    assert!(store.append_each_pipelines());
    let rt =
        tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    rt.block_on(async {
        let chain = |from: u64| {
            (from..from + 50)
                .map(|v| Append::new("chain", ExpectedVersion::Exact(v), vec![event(v)]))
                .collect::<Vec<_>>()
        };
        let mut calls = Vec::new();
        for k in 0..4 {
            let store = store.clone();
            let mut call = Box::pin(async move { store.append_each(chain(k * 50)).await });
            // One poll each, in order, as the server does.
            let _ = std::future::poll_fn(|cx| std::task::Poll::Ready(call.as_mut().poll(cx))).await;
            calls.push(call);
        }
        // Then all at once: a call that found room before the one before it had queued all would cut in.
        for (k, results) in futures_util::future::join_all(calls).await.into_iter().enumerate() {
            for (i, r) in results.into_iter().enumerate() {
                r.unwrap_or_else(|e| panic!("append {i} of call {k}: {e}"));
            }
        }
    });
    let events = rt_read(&store, "chain");
    assert_eq!(events, (1..=200).collect::<Vec<_>>());
}

fn rt_read(store: &cairn_log::EmbeddedStore, stream: &str) -> Vec<u64> {
    let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
    rt.block_on(store.read_stream(stream, ReadStreamOptions::forward()))
        .unwrap()
        .iter()
        .map(|e| e.version)
        .collect()
}
