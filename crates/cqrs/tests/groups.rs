//! Consumer groups: competing workers, retries, the dead-letter stream,
//! per-stream order and durable acks (in-process restarts and real kills).

use std::collections::{HashMap, HashSet};
use std::io::Write;
use std::os::unix::process::ExitStatusExt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cairn_core::{EventStore, ExpectedVersion, NewEvent, RecordedEvent};
use cairn_cqrs::{Group, GroupConfig, GroupError, Nacked, Source, read_parked};
use uuid::Uuid;

use crate::common::{Rng, spawn_ready_child, store, store_in};

/// `n` events over `streams` order streams, each carrying its index.
async fn write_orders(store: &dyn EventStore, streams: u64, n: u64) -> Vec<RecordedEvent> {
    for i in 0..n {
        let event = NewEvent::json("OrderEvent", &serde_json::json!({ "i": i })).unwrap();
        store
            .append(&format!("order-{}", i % streams), ExpectedVersion::Any, vec![event])
            .await
            .unwrap();
    }
    store
        .read_all(cairn_core::ReadAllOptions::forward())
        .await
        .unwrap()
        .into_iter()
        .filter(|e| !e.is_system())
        .collect()
}

fn index(e: &RecordedEvent) -> u64 {
    e.json::<serde_json::Value>().unwrap()["i"].as_u64().unwrap()
}

/// Fails for good on every 13th event, and on the first try of every 7th.
fn flaky(e: &RecordedEvent, attempt: u32) -> Result<(), String> {
    let i = index(e);
    if i % 13 == 5 {
        Err(format!("event {i} is malformed"))
    } else if i % 7 == 3 && attempt == 1 {
        Err(format!("event {i}: the service timed out"))
    } else {
        Ok(())
    }
}

/// The events `flaky` always fails on.
fn always_failing(events: &[RecordedEvent]) -> HashSet<Uuid> {
    events.iter().filter(|e| index(e) % 13 == 5).map(|e| e.id).collect()
}

/// Takes `n` replayed deliveries off `worker`, acks them, returns their ids.
async fn ack_replays(worker: &cairn_cqrs::Worker, n: usize) -> HashSet<Uuid> {
    let mut replayed = HashSet::new();
    while replayed.len() < n {
        let d = tokio::time::timeout(Duration::from_secs(10), worker.next())
            .await
            .expect("replays arrive")
            .unwrap();
        assert!(d.is_replay(), "only replays are delivered: {}", d.event().position);
        replayed.insert(d.event().id);
        d.ack().await.unwrap();
    }
    replayed
}

fn fast(name: &str, source: Source) -> GroupConfig {
    GroupConfig::new(name, source)
        .max_attempts(3)
        .backoff(Duration::from_millis(1), Duration::from_millis(5))
}

/// What the workers of a test saw.
#[derive(Default)]
struct Seen {
    acked: HashSet<Uuid>,
    parked: HashSet<Uuid>,
    handled_after_ack: Vec<Uuid>,
    by_worker: HashMap<usize, u64>,
    /// stream → versions in the order they were handled with success.
    order: HashMap<String, Vec<u64>>,
}

async fn run_workers(
    group: &Group,
    workers: usize,
    total: usize,
    seen: Arc<Mutex<Seen>>,
    jitter: bool,
) {
    let mut tasks = Vec::new();
    for w in 0..workers {
        let worker = group.worker();
        let seen = seen.clone();
        tasks.push(tokio::spawn(async move {
            let mut rng = Rng(w as u64 + 1);
            while let Some(delivery) = worker.next().await {
                let e = delivery.event().clone();
                {
                    let mut s = seen.lock().unwrap();
                    if s.acked.contains(&e.id) {
                        s.handled_after_ack.push(e.id);
                    }
                    *s.by_worker.entry(w).or_default() += 1;
                }
                if jitter {
                    tokio::time::sleep(Duration::from_micros(rng.range(0, 400))).await;
                }
                match flaky(&e, delivery.attempt()) {
                    Ok(()) => {
                        seen.lock()
                            .unwrap()
                            .order
                            .entry(e.stream.clone())
                            .or_default()
                            .push(e.version);
                        delivery.ack().await.unwrap();
                        seen.lock().unwrap().acked.insert(e.id);
                    }
                    Err(reason) => {
                        if let Nacked::Parked { .. } = delivery.nack(reason).await.unwrap() {
                            seen.lock().unwrap().parked.insert(e.id);
                        }
                    }
                }
            }
        }));
    }
    let settled = async {
        loop {
            {
                let s = seen.lock().unwrap();
                if s.acked.len() + s.parked.len() >= total {
                    return;
                }
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(60), settled)
        .await
        .expect("the workers settled every event within 60 s");
    for task in tasks {
        task.abort();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_workers_with_a_failing_handler_settle_every_event_once() {
    let (store, _dir) = store();
    let events = write_orders(store.as_ref(), 40, 1_500).await;
    let group = Group::start(store.clone(), fast("billing", Source::All)).await.unwrap();
    let seen = Arc::new(Mutex::new(Seen::default()));
    run_workers(&group, 4, events.len(), seen.clone(), false).await;

    let bad: HashSet<Uuid> = always_failing(&events);
    {
        let s = seen.lock().unwrap();
        assert!(
            s.handled_after_ack.is_empty(),
            "events delivered again after their ack: {:?}",
            s.handled_after_ack
        );
        assert_eq!(s.parked, bad, "exactly the events that always fail are parked");
        assert!(s.acked.is_disjoint(&s.parked));
        let all: HashSet<Uuid> = events.iter().map(|e| e.id).collect();
        assert_eq!(&s.acked | &s.parked, all, "every event is acked or parked");
        assert_eq!(s.by_worker.len(), 4, "every worker took events: {:?}", s.by_worker);
    }

    // The dead-letter stream holds each with its error and attempts.
    let parked = read_parked(store.as_ref(), "billing").await.unwrap();
    assert_eq!(parked.len(), bad.len());
    for p in &parked {
        assert_eq!(p.attempts, 3);
        assert!(p.error.contains("is malformed"), "{}", p.error);
    }
    let status = group.status();
    assert_eq!(status.parked, bad.len());
    assert_eq!((status.in_flight, status.retrying, status.waiting), (0, 0, 0));
    group.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pinned_streams_are_handled_in_order_despite_retries() {
    let (store, _dir) = store();
    let events = write_orders(store.as_ref(), 12, 600).await;
    let config = fast("shipping", Source::category("order")).pin_streams();
    let group = Group::start(store.clone(), config).await.unwrap();
    let seen = Arc::new(Mutex::new(Seen::default()));
    run_workers(&group, 4, events.len(), seen.clone(), true).await;

    {
        let s = seen.lock().unwrap();
        assert_eq!(
            s.by_worker.len(),
            4,
            "the streams were spread over the workers: {:?}",
            s.by_worker
        );
        for (stream, versions) in &s.order {
            let expected: Vec<u64> = events
                .iter()
                .filter(|e| &e.stream == stream && index(e) % 13 != 5)
                .map(|e| e.version)
                .collect();
            assert_eq!(versions, &expected, "{stream} handled out of order");
        }
    }
    group.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_group_resumes_where_its_acks_left_it() {
    let (store, _dir) = store();
    let events = write_orders(store.as_ref(), 10, 300).await;
    let config = || GroupConfig::new("email", Source::category("order"));

    // Ack every third event of the first 150 delivered, nack-free; leave the rest out.
    let group = Group::start(store.clone(), config()).await.unwrap();
    let worker = group.worker();
    let mut acked = HashSet::new();
    let mut held = Vec::new();
    for n in 0..150 {
        let d = worker.next().await.unwrap();
        if n % 3 == 0 {
            acked.insert(d.event().id);
            d.ack().await.unwrap();
        } else {
            held.push(d);
        }
    }
    group.stop().await.unwrap();
    // Acks after the stop are refused: they were not made durable.
    let late = held.pop().unwrap();
    assert!(matches!(late.ack().await, Err(GroupError::Stopped(_))));
    drop(held);

    let group = Group::start(store.clone(), config()).await.unwrap();
    let worker = group.worker();
    let mut again = HashSet::new();
    while again.len() + acked.len() < events.len() {
        let d = tokio::time::timeout(Duration::from_secs(10), worker.next())
            .await
            .expect("the rest is delivered")
            .unwrap();
        assert!(
            !acked.contains(&d.event().id),
            "event {} was acked before the restart",
            d.event().position
        );
        assert!(again.insert(d.event().id), "delivered twice in one run");
        d.ack().await.unwrap();
    }
    let all: HashSet<Uuid> = events.iter().map(|e| e.id).collect();
    assert_eq!(&acked | &again, all);
    assert_eq!(group.status().checkpoint, Some(events.last().unwrap().position));
    group.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parked_events_survive_a_restart_and_replay() {
    let (store, _dir) = store();
    let events = write_orders(store.as_ref(), 5, 100).await;
    let bad: HashSet<Uuid> = always_failing(&events);
    let config = || fast("inventory", Source::category("order"));

    let group = Group::start(store.clone(), config()).await.unwrap();
    let seen = Arc::new(Mutex::new(Seen::default()));
    run_workers(&group, 2, events.len(), seen, false).await;
    group.stop().await.unwrap();

    let group = Group::start(store.clone(), config()).await.unwrap();
    let parked: HashSet<Uuid> = group.parked().iter().map(|p| p.event_id).collect();
    assert_eq!(parked, bad, "the parked events are known after a restart");
    // The handler is fixed; replay.
    assert_eq!(group.replay_parked().await.unwrap(), bad.len());
    assert_eq!(ack_replays(&group.worker(), bad.len()).await, bad);
    assert!(group.parked().is_empty());
    group.stop().await.unwrap();

    // Settled replays stay settled, and nothing else comes.
    let group = Group::start(store.clone(), config()).await.unwrap();
    assert!(group.parked().is_empty());
    let next = tokio::time::timeout(Duration::from_millis(300), group.worker().next()).await;
    assert!(next.is_err(), "nothing is delivered again");
    group.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_settings_are_refused_by_name() {
    let (store, _dir) = store();
    for (config, says) in [
        (GroupConfig::new("", Source::All), "group name"),
        (GroupConfig::new("$x", Source::All), "group name"),
        (GroupConfig::new("ok", Source::All).max_attempts(0), "max_attempts"),
        (GroupConfig::new("ok", Source::All).max_in_flight(0), "max_in_flight"),
    ] {
        match Group::start(store.clone(), config).await {
            Err(e @ GroupError::Invalid(_)) => assert!(e.to_string().contains(says), "{e}"),
            Err(e) => panic!("wrong error: {e}"),
            Ok(_) => panic!("accepted bad settings"),
        }
    }
    assert!(store.list_streams("", 10).await.unwrap().is_empty(), "nothing written");
}

const DIR_VAR: &str = "CAIRN_GROUP_CRASH_DIR";
const SEED_VAR: &str = "CAIRN_GROUP_CRASH_SEED";
const EVENTS: u64 = 3_000;

#[test]
#[ignore = "runs only as the child process of groups::kill_group_workers_and_resume"]
fn child_group() {
    let Some(dir) = std::env::var_os(DIR_VAR) else { return };
    let seed: u64 = std::env::var(SEED_VAR).ok().and_then(|s| s.parse().ok()).unwrap_or(1);
    let dir = std::path::PathBuf::from(dir);
    let rt =
        tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    rt.block_on(async move {
        let store = store_in(&dir);
        let mut config = fast("crashy", Source::All);
        if seed.is_multiple_of(2) {
            config = config.pin_streams();
        }
        let group = Group::start(store, config).await.unwrap();
        let log = Arc::new(Mutex::new(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(dir.join("handled.txt"))
                .unwrap(),
        ));
        println!("\nready");
        let mut tasks = Vec::new();
        for w in 0..4 {
            let worker = group.worker();
            let log = log.clone();
            tasks.push(tokio::spawn(async move {
                let mut rng = Rng(seed ^ w);
                while let Some(d) = worker.next().await {
                    let id = d.event().id;
                    log_line(&log, format!("handling {id}\n"));
                    tokio::time::sleep(Duration::from_micros(rng.range(0, 300))).await;
                    match flaky(d.event(), d.attempt()) {
                        Ok(()) => {
                            d.ack().await.unwrap();
                            log_line(&log, format!("acked {id}\n"));
                        }
                        Err(e) => {
                            d.nack(e).await.unwrap();
                        }
                    }
                }
            }));
        }
        futures_util::future::join_all(tasks).await;
    });
}

/// One write call per line, so that a kill cannot cut a line in two.
fn log_line(log: &Mutex<std::fs::File>, line: String) {
    log.lock().unwrap().write_all(line.as_bytes()).unwrap();
}

/// SIGKILLs a process whose four workers handle a group's events, again and
/// again; the log they keep must never show an event handled after its ack
/// returned, and at the end every event is acked or parked.
#[test]
fn kill_group_workers_and_resume() {
    let seed = std::env::var(SEED_VAR)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| Rng::from_time().next_u64());
    eprintln!("groups::kill_group_workers_and_resume seed {seed} (set {SEED_VAR} to replay)");
    let mut rng = Rng(seed);
    let dir = tempfile::tempdir().unwrap();
    let rt =
        tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let events = rt.block_on(write_orders(store_in(dir.path()).as_ref(), 30, EVENTS));

    for cycle in 0..8 {
        let dir_var = dir.path().display().to_string();
        let mut child = spawn_ready_child(
            "groups::child_group",
            &[(DIR_VAR, dir_var), (SEED_VAR, rng.next_u64().to_string())],
        );
        std::thread::sleep(Duration::from_millis(rng.range(20, 300)));
        child.kill().unwrap(); // SIGKILL
        assert_eq!(child.wait().unwrap().signal(), Some(9), "cycle {cycle}");
    }

    // A last run settles the rest.
    let bad: HashSet<Uuid> = always_failing(&events);
    let log_path = dir.path().join("handled.txt");
    rt.block_on(async {
        let store = store_in(dir.path());
        let group = Group::start(store.clone(), fast("crashy", Source::All)).await.unwrap();
        let log = Mutex::new(
            std::fs::OpenOptions::new().append(true).create(true).open(&log_path).unwrap(),
        );
        let worker = group.worker();
        loop {
            let status = group.status();
            if status.parked == bad.len()
                && status.waiting + status.in_flight + status.retrying == 0
                && status.checkpoint >= Some(events.last().unwrap().position)
            {
                break;
            }
            let Ok(Some(d)) = tokio::time::timeout(Duration::from_millis(200), worker.next()).await
            else {
                continue;
            };
            let id = d.event().id;
            log_line(&log, format!("handling {id}\n"));
            match flaky(d.event(), d.attempt()) {
                Ok(()) => {
                    d.ack().await.unwrap();
                    log_line(&log, format!("acked {id}\n"));
                }
                Err(e) => {
                    d.nack(e).await.unwrap();
                }
            }
        }
        let parked: HashSet<Uuid> = read_parked(store.as_ref(), "crashy")
            .await
            .unwrap()
            .iter()
            .map(|p| p.event_id)
            .collect();
        assert_eq!(parked, bad, "exactly the failing events are parked, each once");
        group.stop().await.unwrap();
    });

    let text = std::fs::read_to_string(&log_path).unwrap();
    let mut acked = HashSet::new();
    let mut handled = HashSet::new();
    for line in text.lines() {
        // A kill can cut the last line of a cycle short.
        let Some((what, id)) = line.split_once(' ') else { continue };
        let Ok(id) = id.parse::<Uuid>() else { continue };
        match what {
            "handling" => {
                assert!(!acked.contains(&id), "event {id} handled again after its ack returned");
                handled.insert(id);
            }
            "acked" => assert!(acked.insert(id), "event {id} acked twice"),
            _ => {}
        }
    }
    let all: HashSet<Uuid> = events.iter().map(|e| e.id).collect();
    assert_eq!(handled, all, "every event was handled");
    assert!(acked.is_disjoint(&bad));
    eprintln!("groups::kill_group_workers_and_resume: {} acks logged over 8 kills", acked.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_sees_a_stopped_group_and_asks_for_a_replay() {
    let (store, _dir) = store();
    let events = write_orders(store.as_ref(), 5, 60).await;
    let bad: HashSet<Uuid> = always_failing(&events);
    let config = || fast("analytics", Source::category("order"));
    let group = Group::start(store.clone(), config()).await.unwrap();
    run_workers(&group, 2, events.len(), Arc::new(Mutex::new(Seen::default())), false).await;
    group.stop().await.unwrap();

    let groups = cairn_cqrs::stored_groups(store.as_ref()).await.unwrap();
    assert_eq!(groups.len(), 1);
    let g = &groups[0];
    assert_eq!(g.name, "analytics");
    assert_eq!(g.checkpoint.map(|c| c.0), Some(events.last().unwrap().position));
    assert_eq!(g.source, Some(Source::category("order")));
    assert_eq!(g.parked.iter().map(|p| p.event_id).collect::<HashSet<_>>(), bad);
    assert_eq!(g.replay_pending, 0);

    assert_eq!(cairn_cqrs::request_replay(store.as_ref(), "analytics").await.unwrap(), bad.len());
    assert_eq!(
        cairn_cqrs::stored_groups(store.as_ref()).await.unwrap()[0].replay_pending,
        bad.len()
    );
    // The group replays them as it starts, with no call of its own.
    let group = Group::start(store.clone(), config()).await.unwrap();
    assert_eq!(ack_replays(&group.worker(), bad.len()).await, bad);
    group.stop().await.unwrap();
    assert!(cairn_cqrs::stored_groups(store.as_ref()).await.unwrap()[0].parked.is_empty());
}
