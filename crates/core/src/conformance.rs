//! The conformance suite: the behaviour every `EventStore` backend must show.
//!
//! A backend's test crate instantiates it with
//! `cairn_core::conformance_suite!(make_store())`, where `make_store()` returns
//! `(Arc<dyn EventStore>, guard)` for a fresh (or shared) store; the guard is
//! kept alive for the test. Tests use unique stream names and bound their
//! `$all` reads by positions they saw, so they also pass on a shared database
//! or server.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use uuid::Uuid;

use crate::*;

type Store = Arc<dyn EventStore>;

/// Whether an outside service (PostgreSQL, Redis, a broker) answers at
/// `addr`. Outside CI a test whose service is down prints why it skips;
/// under `CI=true` it fails, because CI starts every service the tests need.
pub fn reachable(addr: &str, what: &str) -> bool {
    let addr: std::net::SocketAddr = addr.parse().expect("an address like 127.0.0.1:5432");
    let ok = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(1)).is_ok();
    if !ok {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "{what} at {addr} is not reachable; .ci/run starts it"
        );
        eprintln!("skipped: {what} at {addr} is not reachable");
    }
    ok
}

/// Runs this test binary again as a child that executes only the ignored
/// test `name`, with `envs`, and returns it once it printed "ready" (for
/// tests that really kill a process). The child's stdout is closed after
/// that: it must ignore write errors from then on.
pub fn spawn_ready_child(name: &str, envs: &[(&str, String)]) -> std::process::Child {
    use std::io::{BufRead, BufReader};
    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        .args([name, "--exact", "--nocapture", "--ignored", "--test-threads=1"])
        .envs(envs.iter().map(|(k, v)| (*k, v.as_str())))
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::inherit())
        .spawn()
        .expect("spawn the child");
    let stdout = BufReader::new(child.stdout.take().expect("piped"));
    if !stdout.lines().map_while(Result::ok).any(|line| line.trim_end().ends_with("ready")) {
        let status = child.wait();
        panic!("{name}: the child ended before it was ready: {status:?}");
    }
    child
}

/// A stream name no other test uses.
pub fn unique(prefix: &str) -> String {
    format!("{prefix}-{}", Uuid::new_v4().simple())
}

pub fn deposit(amount: u64) -> NewEvent {
    NewEvent::json("MoneyDeposited", &serde_json::json!({"amount": amount, "currency": "EUR"}))
        .unwrap()
}

fn amounts(events: &[RecordedEvent]) -> Vec<u64> {
    events
        .iter()
        .map(|e| e.json::<serde_json::Value>().unwrap()["amount"].as_u64().unwrap())
        .collect()
}

fn versions(events: &[RecordedEvent]) -> Vec<u64> {
    events.iter().map(|e| e.version).collect()
}

async fn append_n(store: &Store, stream: &str, from: u64, n: u64) -> AppendResult {
    let events = (from..from + n).map(deposit).collect();
    store.append(stream, ExpectedVersion::Any, events).await.unwrap()
}

async fn read(store: &Store, stream: &str) -> Vec<RecordedEvent> {
    store.read_stream(stream, ReadStreamOptions::forward()).await.unwrap()
}

macro_rules! assert_err {
    ($result:expr, $pattern:pat $(if $guard:expr)?) => {
        match $result {
            Err($pattern) $(if $guard)? => {}
            other => panic!("expected {}, got {other:?}", stringify!($pattern)),
        }
    };
}

pub async fn versions_count_events(store: Store) {
    let s = unique("account");
    let r = store.append(&s, ExpectedVersion::NoStream, vec![deposit(1)]).await.unwrap();
    assert_eq!(r.next_version, 1, "the first event of a stream has version 1");
    let r =
        store.append(&s, ExpectedVersion::Exact(1), vec![deposit(2), deposit(3)]).await.unwrap();
    assert_eq!(r.next_version, 3, "a stream's version is its number of events");
    let events = read(&store, &s).await;
    assert_eq!(versions(&events), vec![1, 2, 3]);
    assert_eq!(amounts(&events), vec![1, 2, 3]);
    assert_eq!(events[2].position, r.position, "the append returns the last event's position");
    assert_eq!(store.stream_info(&s).await.unwrap().version, 3);
}

pub async fn expected_version_rules(store: Store) {
    let s = unique("account");
    assert_err!(
        store.append(&s, ExpectedVersion::StreamExists, vec![deposit(1)]).await,
        StoreError::WrongExpectedVersion { actual_version: 0, .. }
    );
    assert_err!(
        store.append(&s, ExpectedVersion::Exact(1), vec![deposit(1)]).await,
        StoreError::WrongExpectedVersion { actual_version: 0, .. }
    );
    store
        .append(&s, ExpectedVersion::Exact(0), vec![deposit(1)])
        .await
        .expect("exact(0) is the same as no stream");
    assert_err!(
        store.append(&s, ExpectedVersion::NoStream, vec![deposit(2)]).await,
        StoreError::WrongExpectedVersion { actual_version: 1, .. }
    );
    assert_err!(
        store.append(&s, ExpectedVersion::Exact(0), vec![deposit(2)]).await,
        StoreError::WrongExpectedVersion { actual_version: 1, .. }
    );
    store.append(&s, ExpectedVersion::StreamExists, vec![deposit(2)]).await.unwrap();
    store.append(&s, ExpectedVersion::Any, vec![deposit(3)]).await.unwrap();
    match store.append(&s, ExpectedVersion::Exact(2), vec![deposit(4)]).await {
        Err(StoreError::WrongExpectedVersion { stream, expected, actual_version }) => {
            assert_eq!(stream, s);
            assert_eq!(expected, ExpectedVersion::Exact(2));
            assert_eq!(actual_version, 3, "the conflict carries the actual version");
        }
        other => panic!("expected a conflict, got {other:?}"),
    }
    store.append(&s, ExpectedVersion::Exact(3), vec![deposit(4)]).await.unwrap();
    assert_eq!(amounts(&read(&store, &s).await), vec![1, 2, 3, 4], "failed appends wrote nothing");
}

pub async fn failed_batch_writes_nothing(store: Store) {
    let s = unique("account");
    append_n(&store, &s, 1, 2).await;
    let head = store.head_position().await.unwrap();
    let bad_json = NewEvent::json_bytes("MoneyDeposited", "{not json");
    assert_err!(
        store.append(&s, ExpectedVersion::Any, vec![deposit(3), bad_json]).await,
        StoreError::InvalidEvent(_)
    );
    let empty_type = NewEvent::json_bytes("", "{}");
    assert_err!(
        store.append(&s, ExpectedVersion::Any, vec![deposit(3), empty_type]).await,
        StoreError::InvalidEvent(_)
    );
    assert_err!(
        store.append(&s, ExpectedVersion::Exact(7), vec![deposit(3), deposit(4)]).await,
        StoreError::WrongExpectedVersion { .. }
    );
    assert_err!(store.append(&s, ExpectedVersion::Any, vec![]).await, StoreError::InvalidEvent(_));
    let dup = deposit(3);
    assert_err!(
        store.append(&s, ExpectedVersion::Any, vec![dup.clone(), dup]).await,
        StoreError::InvalidEvent(_)
    );
    assert_eq!(amounts(&read(&store, &s).await), vec![1, 2]);
    let after = store.read_all(ReadAllOptions::forward().from(head)).await.unwrap();
    assert!(after.iter().all(|e| e.stream != s), "no event of a rejected batch reached $all");
}

pub async fn event_fields_round_trip(store: Store) {
    let s = unique("account");
    let before = Timestamp::now();
    let mut extra = BTreeMap::new();
    extra.insert("user".to_string(), "alice".to_string());
    let metadata = Metadata {
        correlation_id: Some(Uuid::new_v4()),
        causation_id: Some(Uuid::new_v4()),
        extra,
    };
    let id = Uuid::new_v4();
    let json =
        NewEvent::json("MoneyDeposited", &serde_json::json!({"amount": 5, "note": "café ☕"}))
            .unwrap()
            .with_id(id)
            .with_metadata(metadata.clone())
            .with_schema_version(3)
            .with_tags(["account:1", "customer:9"]);
    let binary = NewEvent::binary("Blob", vec![0u8, 255, 1, 2, 0]);
    let r = store
        .append(&s, ExpectedVersion::NoStream, vec![json.clone(), binary.clone()])
        .await
        .unwrap();
    let after = Timestamp::now();
    let events = read(&store, &s).await;
    let e = &events[0];
    assert_eq!(e.id, id);
    assert_eq!(e.stream, s);
    assert_eq!(e.event_type, "MoneyDeposited");
    assert_eq!(e.data, json.data);
    assert_eq!(e.content_type, ContentType::Json);
    assert_eq!(e.metadata, metadata);
    assert_eq!(e.schema_version, 3);
    assert_eq!(e.tags, vec!["account:1", "customer:9"]);
    assert!(
        e.timestamp >= before && e.timestamp <= after,
        "the store records the time of the append"
    );
    let b = &events[1];
    assert_eq!(b.id, binary.id, "ids not set by the caller are generated");
    assert_eq!(b.content_type, ContentType::Binary);
    assert_eq!(&b.data[..], &[0u8, 255, 1, 2, 0]);
    assert_eq!(b.schema_version, 1);
    assert_eq!(b.position, r.position);
    assert!(b.position > e.position);
}

pub async fn idempotent_retry(store: Store) {
    let s = unique("account");
    let batch = vec![deposit(1), deposit(2)];
    let first = store.append(&s, ExpectedVersion::NoStream, batch.clone()).await.unwrap();
    append_n(&store, &s, 3, 1).await;
    // The same batch again, even with a now-stale expected version: same result, nothing written.
    let again = store.append(&s, ExpectedVersion::NoStream, batch.clone()).await.unwrap();
    assert_eq!(again, first);
    let again = store.append(&s, ExpectedVersion::Any, batch.clone()).await.unwrap();
    assert_eq!(again, first);
    assert_eq!(amounts(&read(&store, &s).await), vec![1, 2, 3]);
    // A batch that only partly matches is an error.
    assert_err!(
        store.append(&s, ExpectedVersion::Any, vec![batch[0].clone(), deposit(9)]).await,
        StoreError::IdempotencyConflict { .. }
    );
    assert_err!(
        store.append(&s, ExpectedVersion::Any, vec![batch[0].clone()]).await,
        StoreError::IdempotencyConflict { .. }
    );
    assert_err!(
        store.append(&s, ExpectedVersion::Any, vec![batch[1].clone(), batch[0].clone()]).await,
        StoreError::IdempotencyConflict { .. }
    );
    assert_err!(
        store.append(&s, ExpectedVersion::Any, vec![batch[1].clone()]).await,
        StoreError::IdempotencyConflict { .. }
    );
    let three = vec![deposit(4), deposit(5), deposit(6)];
    store.append(&s, ExpectedVersion::Any, three.clone()).await.unwrap();
    assert_err!(
        store.append(&s, ExpectedVersion::Any, three[1..].to_vec()).await,
        StoreError::IdempotencyConflict { .. }
    );
    assert_err!(
        store.append(&s, ExpectedVersion::Any, three[..2].to_vec()).await,
        StoreError::IdempotencyConflict { .. }
    );
    // The same ids sent to another stream are not a retry.
    let other = unique("account");
    assert_err!(
        store.append(&other, ExpectedVersion::Any, batch.clone()).await,
        StoreError::IdempotencyConflict { .. }
    );
    assert_err!(store.stream_info(&other).await, StoreError::StreamNotFound { .. });
    assert_eq!(amounts(&read(&store, &s).await), vec![1, 2, 3, 4, 5, 6]);
}

pub async fn concurrent_retries_write_once(store: Store) {
    let s = unique("account");
    let batch = vec![deposit(1), deposit(2), deposit(3)];
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let (store, s, batch) = (store.clone(), s.clone(), batch.clone());
        tasks.push(tokio::spawn(async move {
            store.append(&s, ExpectedVersion::Any, batch).await.unwrap()
        }));
    }
    let mut results = Vec::new();
    for t in tasks {
        results.push(t.await.unwrap());
    }
    assert!(
        results.windows(2).all(|w| w[0] == w[1]),
        "every retry gets the original result: {results:?}"
    );
    assert_eq!(amounts(&read(&store, &s).await), vec![1, 2, 3]);
}

pub async fn read_stream_directions_and_limits(store: Store) {
    let s = unique("account");
    append_n(&store, &s, 1, 10).await;
    let fwd =
        store.read_stream(&s, ReadStreamOptions::forward().from_version(4).limit(3)).await.unwrap();
    assert_eq!(versions(&fwd), vec![4, 5, 6]);
    let bwd = store.read_stream(&s, ReadStreamOptions::backward().limit(3)).await.unwrap();
    assert_eq!(versions(&bwd), vec![10, 9, 8]);
    let bwd = store.read_stream(&s, ReadStreamOptions::backward().from_version(2)).await.unwrap();
    assert_eq!(versions(&bwd), vec![2, 1]);
    let past = store.read_stream(&s, ReadStreamOptions::forward().from_version(11)).await.unwrap();
    assert!(past.is_empty());
    let zero = store.read_stream(&s, ReadStreamOptions::forward().limit(0)).await.unwrap();
    assert!(zero.is_empty());
    assert_err!(
        store.read_stream(&unique("missing"), ReadStreamOptions::forward()).await,
        StoreError::StreamNotFound { .. }
    );
}

pub async fn read_all_in_global_order(store: Store) {
    let (a, b) = (unique("account"), unique("account"));
    let start = store.head_position().await.unwrap();
    for i in 0..5 {
        append_n(&store, &a, i * 2, 1).await;
        append_n(&store, &b, i * 2 + 1, 1).await;
    }
    let ours = |events: Vec<RecordedEvent>| -> Vec<RecordedEvent> {
        events.into_iter().filter(|e| e.stream == a || e.stream == b).collect()
    };
    let all = ours(store.read_all(ReadAllOptions::forward().from(start)).await.unwrap());
    assert_eq!(amounts(&all), (0..10).collect::<Vec<_>>());
    assert!(all.windows(2).all(|w| w[0].position < w[1].position), "positions strictly increase");
    // From an event's position, inclusive.
    let from =
        store.read_all(ReadAllOptions::forward().from(all[4].position).limit(3)).await.unwrap();
    assert_eq!(
        from.iter().map(|e| e.position).collect::<Vec<_>>(),
        all[4..7].iter().map(|e| e.position).collect::<Vec<_>>()
    );
    // Backward from the end, and from an event's position.
    let back = store.read_all(ReadAllOptions::backward().limit(2)).await.unwrap();
    assert_eq!(back.len(), 2);
    assert!(back[0].position > back[1].position);
    let back =
        store.read_all(ReadAllOptions::backward().from(all[5].position).limit(3)).await.unwrap();
    assert_eq!(
        back.iter().map(|e| e.position).collect::<Vec<_>>(),
        vec![all[5].position, all[4].position, all[3].position]
    );
    let head = store.head_position().await.unwrap();
    assert!(head > all[9].position);
    assert!(store.read_all(ReadAllOptions::forward().from(head)).await.unwrap().is_empty());
}

pub async fn read_all_pages_with_after(store: Store) {
    let s = unique("account");
    let start = store.head_position().await.unwrap();
    for i in 0..7 {
        append_n(&store, &s, i * 3, 3).await;
    }
    let ours = |events: &[RecordedEvent]| -> Vec<Position> {
        events.iter().filter(|e| e.stream == s).map(|e| e.position).collect()
    };
    let everything = ours(&store.read_all(ReadAllOptions::forward().from(start)).await.unwrap());
    assert_eq!(everything.len(), 21);
    // Forward pages of 4: each starts strictly after the previous page's last event.
    let mut pages = Vec::new();
    let mut page =
        store.read_all(ReadAllOptions::forward().from(everything[0]).limit(4)).await.unwrap();
    while let Some(last) = page.last().map(|e| e.position) {
        pages.extend(ours(&page));
        page = store.read_all(ReadAllOptions::forward().after(last).limit(4)).await.unwrap();
    }
    assert_eq!(pages, everything, "forward paging with after: every event once, in order");
    // Backward pages from the newest event of ours.
    let mut back = Vec::new();
    let mut page =
        store.read_all(ReadAllOptions::backward().from(everything[20]).limit(5)).await.unwrap();
    while let Some(last) = page.last().map(|e| e.position) {
        back.extend(ours(&page));
        if last <= everything[0] {
            break;
        }
        page = store.read_all(ReadAllOptions::backward().after(last).limit(5)).await.unwrap();
    }
    back.reverse();
    assert_eq!(back, everything, "backward paging with after: every event once");
    let first = everything[0];
    assert!(
        !ours(&store.read_all(ReadAllOptions::forward().after(first).limit(1)).await.unwrap())
            .contains(&first)
    );
}

pub async fn invalid_stream_names(store: Store) {
    let long = "x".repeat(STREAM_NAME_BYTES_MAX + 1);
    for name in [
        "",
        "$system",
        long.as_str(),
        "bad\nname",
        "$group-",
        "$parked-$x",
        "$snapshots-",
        "$groups",
        "$saga-",
        "$timer-$y",
        "$sagas",
    ] {
        assert_err!(
            store.append(name, ExpectedVersion::Any, vec![deposit(1)]).await,
            StoreError::InvalidStreamName { .. }
        );
    }
    // The system families applications write: snapshots and consumer groups.
    for prefix in crate::WRITABLE_SYSTEM_PREFIXES {
        let name = format!("{prefix}{}", unique("owner"));
        store
            .append(&name, ExpectedVersion::Any, vec![deposit(1)])
            .await
            .expect("a writable system stream");
    }
    let longest = format!("{}-{}", Uuid::new_v4().simple(), "y".repeat(STREAM_NAME_BYTES_MAX - 33));
    assert_eq!(longest.len(), STREAM_NAME_BYTES_MAX);
    store
        .append(&longest, ExpectedVersion::Any, vec![deposit(1)])
        .await
        .expect("a 256-byte name is allowed");
}

pub async fn oversize_event_rejected(store: Store) {
    let s = unique("account");
    let big = NewEvent::binary("Big", vec![7u8; 16 * 1024 * 1024 + 1]);
    assert_err!(
        store.append(&s, ExpectedVersion::Any, vec![deposit(1), big]).await,
        StoreError::EventTooLarge { index: 1, .. }
    );
    assert_err!(store.stream_info(&s).await, StoreError::StreamNotFound { .. });
    let fits = NewEvent::binary("Big", vec![7u8; 1024 * 1024]);
    store.append(&s, ExpectedVersion::Any, vec![fits]).await.expect("a 1 MiB event is fine");
    assert_eq!(read(&store, &s).await[0].data.len(), 1024 * 1024);
}

pub async fn metadata_max_count_and_truncate_before(store: Store) {
    let s = unique("account");
    append_n(&store, &s, 1, 10).await;
    store
        .set_stream_metadata(&s, StreamMetadata { max_count: Some(3), ..Default::default() })
        .await
        .unwrap();
    assert_eq!(versions(&read(&store, &s).await), vec![8, 9, 10]);
    let back = store.read_stream(&s, ReadStreamOptions::backward()).await.unwrap();
    assert_eq!(versions(&back), vec![10, 9, 8]);
    store
        .set_stream_metadata(&s, StreamMetadata { truncate_before: Some(5), ..Default::default() })
        .await
        .unwrap();
    assert_eq!(versions(&read(&store, &s).await), vec![5, 6, 7, 8, 9, 10]);
    let info = store.stream_info(&s).await.unwrap();
    assert_eq!(info.version, 10, "hidden events still count in the version");
    assert_eq!(info.metadata.truncate_before, Some(5));
    store.append(&s, ExpectedVersion::Exact(10), vec![deposit(11)]).await.unwrap();
    store.set_stream_metadata(&s, StreamMetadata::default()).await.unwrap();
    assert_eq!(read(&store, &s).await.len(), 11, "clearing the metadata shows everything again");
}

pub async fn metadata_max_age(store: Store) {
    let s = unique("account");
    append_n(&store, &s, 1, 2).await;
    tokio::time::sleep(Duration::from_millis(1300)).await;
    append_n(&store, &s, 3, 1).await;
    store
        .set_stream_metadata(&s, StreamMetadata { max_age_secs: Some(1), ..Default::default() })
        .await
        .unwrap();
    assert_eq!(amounts(&read(&store, &s).await), vec![3], "events older than max age are hidden");
}

pub async fn soft_delete(store: Store) {
    let s = unique("account");
    append_n(&store, &s, 1, 3).await;
    assert_err!(
        store.delete_stream(&s, ExpectedVersion::Exact(2), false).await,
        StoreError::WrongExpectedVersion { actual_version: 3, .. }
    );
    store.delete_stream(&s, ExpectedVersion::Exact(3), false).await.unwrap();
    assert_err!(
        store.read_stream(&s, ReadStreamOptions::forward()).await,
        StoreError::StreamNotFound { .. }
    );
    assert_eq!(store.stream_info(&s).await.unwrap().state, StreamState::Deleted);
    assert_err!(
        store.delete_stream(&s, ExpectedVersion::Any, false).await,
        StoreError::StreamNotFound { .. }
    );
    // The name can be reused: the stream starts over.
    let r = store.append(&s, ExpectedVersion::NoStream, vec![deposit(10)]).await.unwrap();
    assert_eq!(r.next_version, 1);
    assert_eq!(amounts(&read(&store, &s).await), vec![10]);
    assert_eq!(store.stream_info(&s).await.unwrap().state, StreamState::Live);
}

pub async fn hard_delete(store: Store) {
    let s = unique("account");
    append_n(&store, &s, 1, 2).await;
    store.delete_stream(&s, ExpectedVersion::Any, true).await.unwrap();
    assert_err!(
        store.read_stream(&s, ReadStreamOptions::forward()).await,
        StoreError::StreamDeleted { .. }
    );
    for expected in [ExpectedVersion::Any, ExpectedVersion::NoStream, ExpectedVersion::Exact(2)] {
        assert_err!(
            store.append(&s, expected, vec![deposit(3)]).await,
            StoreError::StreamDeleted { .. }
        );
    }
    assert_err!(
        store.delete_stream(&s, ExpectedVersion::Any, true).await,
        StoreError::StreamDeleted { .. }
    );
    assert_err!(
        store.delete_stream(&s, ExpectedVersion::Any, false).await,
        StoreError::StreamDeleted { .. }
    );
    assert_err!(
        store.set_stream_metadata(&s, StreamMetadata::default()).await,
        StoreError::StreamDeleted { .. }
    );
    assert_eq!(store.stream_info(&s).await.unwrap().state, StreamState::Tombstoned);
    // A soft-deleted stream can still be tombstoned.
    let t = unique("account");
    append_n(&store, &t, 1, 1).await;
    store.delete_stream(&t, ExpectedVersion::Any, false).await.unwrap();
    store.delete_stream(&t, ExpectedVersion::Any, true).await.unwrap();
    assert_err!(
        store.append(&t, ExpectedVersion::Any, vec![deposit(1)]).await,
        StoreError::StreamDeleted { .. }
    );
}

pub async fn list_streams_and_info(store: Store) {
    let prefix = unique("list");
    for i in 0..3u64 {
        append_n(&store, &format!("{prefix}-{i}"), 0, i + 1).await;
    }
    let listed = store.list_streams(&prefix, 100).await.unwrap();
    assert_eq!(listed.iter().map(|i| i.version).collect::<Vec<_>>(), vec![1, 2, 3]);
    assert!(listed.windows(2).all(|w| w[0].stream < w[1].stream));
    assert_eq!(store.list_streams(&prefix, 2).await.unwrap().len(), 2);
    let all = store.list_streams("", usize::MAX).await.unwrap();
    assert!(
        all.iter().all(|i| !i.stream.starts_with('$')),
        "system streams are listed only when asked for"
    );
    assert_err!(store.stream_info(&unique("nope")).await, StoreError::StreamNotFound { .. });
}

pub async fn concurrent_same_expected_version_one_wins(store: Store) {
    let s = unique("account");
    append_n(&store, &s, 0, 1).await;
    let barrier = Arc::new(tokio::sync::Barrier::new(16));
    let mut tasks = Vec::new();
    for i in 0..16 {
        let (store, s, barrier) = (store.clone(), s.clone(), barrier.clone());
        tasks.push(tokio::spawn(async move {
            barrier.wait().await;
            store.append(&s, ExpectedVersion::Exact(1), vec![deposit(100 + i)]).await
        }));
    }
    let mut wins = 0;
    for t in tasks {
        match t.await.unwrap() {
            Ok(r) => {
                wins += 1;
                assert_eq!(r.next_version, 2);
            }
            Err(StoreError::WrongExpectedVersion { actual_version, .. }) => {
                assert_eq!(actual_version, 2)
            }
            Err(e) => panic!("unexpected error {e}"),
        }
    }
    assert_eq!(wins, 1, "exactly one of 16 racing appends succeeds");
    assert_eq!(read(&store, &s).await.len(), 2);
}

pub async fn concurrent_appends_keep_streams_gap_free(store: Store) {
    let prefix = unique("race");
    let mut tasks = Vec::new();
    for t in 0..8u64 {
        let (store, prefix) = (store.clone(), prefix.clone());
        tasks.push(tokio::spawn(async move {
            for i in 0..52u64 {
                let stream = format!("{prefix}-{}", i % 4);
                store
                    .append(&stream, ExpectedVersion::Any, vec![deposit(t * 1000 + i)])
                    .await
                    .unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let mut positions = Vec::new();
    for i in 0..4 {
        let events = read(&store, &format!("{prefix}-{i}")).await;
        assert_eq!(versions(&events), (1..=104).collect::<Vec<_>>(), "versions are gap-free");
        assert!(events.windows(2).all(|w| w[0].position < w[1].position));
        positions.extend(events.iter().map(|e| e.position));
    }
    positions.sort();
    positions.dedup();
    assert_eq!(positions.len(), 416, "every event has its own position");
}

async fn next_event(sub: &mut Subscription) -> RecordedEvent {
    tokio::time::timeout(Duration::from_secs(10), sub.next())
        .await
        .expect("subscription delivered nothing within 10 s")
        .expect("subscription ended")
        .expect("subscription failed")
}

pub async fn subscribe_stream_catch_up_then_live(store: Store) {
    let s = unique("account");
    append_n(&store, &s, 1, 50).await;
    let mut sub =
        store.subscribe(SubscriptionTarget::Stream(s.clone()), StartFrom::Start).await.unwrap();
    let writer = {
        let (store, s) = (store.clone(), s.clone());
        tokio::spawn(async move {
            for i in 51..=100 {
                append_n(&store, &s, i, 1).await;
            }
        })
    };
    let mut got = Vec::new();
    while got.len() < 100 {
        got.push(next_event(&mut sub).await.version);
    }
    writer.await.unwrap();
    assert_eq!(
        got,
        (1..=100).collect::<Vec<_>>(),
        "no gap and no duplicate across the switch to live"
    );
    let mut after =
        store.subscribe(SubscriptionTarget::Stream(s.clone()), StartFrom::After(98)).await.unwrap();
    assert_eq!(next_event(&mut after).await.version, 99);
    let mut end =
        store.subscribe(SubscriptionTarget::Stream(s.clone()), StartFrom::End).await.unwrap();
    append_n(&store, &s, 101, 1).await;
    assert_eq!(next_event(&mut end).await.version, 101);
}

pub async fn subscribe_stream_before_it_exists(store: Store) {
    let s = unique("account");
    let mut sub =
        store.subscribe(SubscriptionTarget::Stream(s.clone()), StartFrom::Start).await.unwrap();
    append_n(&store, &s, 7, 1).await;
    let e = next_event(&mut sub).await;
    assert_eq!((e.version, amounts(&[e])[0]), (1, 7));
}

pub async fn subscribe_all_catch_up_then_live(store: Store) {
    let s = unique("account");
    let first = append_n(&store, &s, 0, 1).await;
    let mut sub =
        store.subscribe(SubscriptionTarget::All, StartFrom::After(first.position.0)).await.unwrap();
    let mut end = store.subscribe(SubscriptionTarget::All, StartFrom::End).await.unwrap();
    append_n(&store, &s, 1, 30).await;
    let writer = {
        let (store, s) = (store.clone(), s.clone());
        tokio::spawn(async move {
            for i in 31..=60 {
                append_n(&store, &s, i, 1).await;
            }
        })
    };
    let mut got = Vec::new();
    let mut last = first.position;
    while got.len() < 60 {
        let e = next_event(&mut sub).await;
        assert!(e.position > last, "positions strictly increase in a subscription");
        last = e.position;
        if e.stream == s {
            got.push(e.version);
        }
    }
    writer.await.unwrap();
    assert_eq!(
        got,
        (2..=61).collect::<Vec<_>>(),
        "starts after the given position, no gap, no duplicate"
    );
    let e = loop {
        let e = next_event(&mut end).await;
        if e.stream == s {
            break e;
        }
    };
    assert_eq!(e.version, 2, "a subscription from the end sees only what comes after");
}

pub async fn system_streams_are_read_only(store: Store) {
    let s = unique("account");
    append_n(&store, &s, 1, 1).await;
    store
        .set_stream_metadata(&s, StreamMetadata { max_count: Some(5), ..Default::default() })
        .await
        .unwrap();
    let meta =
        store.read_stream(&metadata_stream_name(&s), ReadStreamOptions::forward()).await.unwrap();
    assert_eq!(meta.len(), 1, "metadata changes are events too");
    assert!(meta[0].is_system());
    assert_err!(
        store.append(&metadata_stream_name(&s), ExpectedVersion::Any, vec![deposit(1)]).await,
        StoreError::InvalidStreamName { .. }
    );
    let reserved = NewEvent::json_bytes("$metadata", "{}");
    assert_err!(
        store.append(&s, ExpectedVersion::Any, vec![reserved]).await,
        StoreError::InvalidEvent(_)
    );
}

// ---------------------------------------------------------------------------
// Tags, queries and append conditions (Dynamic Consistency Boundaries).
// Every test uses its own tags (and, for type-only queries, its own types),
// so the suite also passes on a shared store.

/// A JSON event `{"n": n}` of `event_type` with `tags`.
pub fn tagged(event_type: &str, n: u64, tags: &[&str]) -> NewEvent {
    NewEvent::json(event_type, &serde_json::json!({ "n": n }))
        .unwrap()
        .with_tags(tags.iter().copied())
}

/// A tag no other test uses.
pub fn unique_tag(prefix: &str) -> String {
    format!("{prefix}:{}", Uuid::new_v4().simple())
}

fn ns(events: &[RecordedEvent]) -> Vec<u64> {
    events.iter().map(|e| e.json::<serde_json::Value>().unwrap()["n"].as_u64().unwrap()).collect()
}

/// Appends one event and returns its position.
async fn put(store: &Store, stream: &str, event: NewEvent) -> Position {
    store.append(stream, ExpectedVersion::Any, vec![event]).await.unwrap().position
}

async fn query(store: &Store, q: &Query, options: ReadAllOptions) -> Vec<RecordedEvent> {
    let events = store.read_query(q, options).await.unwrap();
    assert!(events.iter().all(|e| !e.is_system()), "queries never return events of $ streams");
    events
}

pub async fn query_reads_matching_events_in_order(store: Store) {
    let (s1, s2) = (unique("course"), unique("student"));
    let (course, ada, bob) = (unique_tag("course"), unique_tag("student"), unique_tag("student"));
    let (c, a, b) = (course.as_str(), ada.as_str(), bob.as_str());
    let mut at = Vec::new();
    at.push(put(&store, &s1, tagged("CourseDefined", 0, &[c])).await);
    at.push(put(&store, &s2, tagged("Subscribed", 1, &[c, a])).await);
    at.push(put(&store, &s1, tagged("CourseRenamed", 2, &[])).await);
    store
        .set_stream_metadata(&s1, StreamMetadata { max_count: Some(100), ..Default::default() })
        .await
        .unwrap();
    let r = store
        .append(
            &s2,
            ExpectedVersion::Any,
            vec![tagged("Subscribed", 3, &[c, b]), tagged("Unsubscribed", 4, &[a, c])],
        )
        .await
        .unwrap();
    at.push(Position(0)); // event 3's position, found below
    at.push(r.position);
    at.push(put(&store, &s2, tagged("Subscribed", 5, &[b])).await);
    let q = Query::tags([c]);
    let all = query(&store, &q, ReadAllOptions::forward()).await;
    assert_eq!(ns(&all), vec![0, 1, 3, 4], "every event carrying the tag, in position order");
    at[3] = all[2].position;
    assert_eq!(
        all.iter().map(|e| e.position).collect::<Vec<_>>(),
        vec![at[0], at[1], at[3], at[4]]
    );
    assert_eq!(all[1].tags, vec![c, a], "tags are stored and returned as appended");
    assert_eq!(all[1].stream, s2);
    assert_eq!(all[1].version, 1);
    assert_eq!(
        ns(&query(&store, &Query::tags([a, c]), ReadAllOptions::forward()).await),
        vec![1, 4],
        "an item needs all its tags"
    );
    assert_eq!(
        ns(&query(
            &store,
            &Query::from(QueryItem::types(["Subscribed"]).with_tags([c])),
            ReadAllOptions::forward()
        )
        .await),
        vec![1, 3]
    );
    let types = QueryItem::types(["Subscribed", "CourseDefined"]).with_tags([c]);
    assert_eq!(ns(&query(&store, &types.into(), ReadAllOptions::forward()).await), vec![0, 1, 3]);
    let either = Query::tags([a]).or(QueryItem::tags([b]));
    assert_eq!(
        ns(&query(&store, &either, ReadAllOptions::forward()).await),
        vec![1, 3, 4, 5],
        "items are OR'ed, each event once"
    );
    let overlapping = Query::tags([c]).or(QueryItem::tags([a, c]));
    assert_eq!(
        ns(&query(&store, &overlapping, ReadAllOptions::forward()).await),
        vec![0, 1, 3, 4],
        "an event matching two items is returned once"
    );
    assert!(
        query(&store, &Query::tags([unique_tag("nobody")]), ReadAllOptions::forward())
            .await
            .is_empty()
    );
    assert!(
        query(
            &store,
            &Query::tags([a]).or(QueryItem::types([unique("NoSuchType")])),
            ReadAllOptions::forward()
        )
        .await
        .len()
            == 2
    );
    // Backward, from, after, limit.
    assert_eq!(ns(&query(&store, &q, ReadAllOptions::backward()).await), vec![4, 3, 1, 0]);
    assert_eq!(ns(&query(&store, &q, ReadAllOptions::backward().limit(2)).await), vec![4, 3]);
    assert_eq!(
        ns(&query(&store, &q, ReadAllOptions::forward().from(at[1]).limit(2)).await),
        vec![1, 3]
    );
    assert_eq!(ns(&query(&store, &q, ReadAllOptions::forward().after(at[1])).await), vec![3, 4]);
    assert_eq!(ns(&query(&store, &q, ReadAllOptions::backward().from(at[3])).await), vec![3, 1, 0]);
    assert_eq!(
        ns(&query(&store, &q, ReadAllOptions::backward().after(at[3]).limit(1)).await),
        vec![1]
    );
    assert_eq!(
        ns(&query(&store, &q, ReadAllOptions::forward().from(at[2])).await),
        vec![3, 4],
        "from need not be a matching event"
    );
    assert_eq!(
        ns(&query(&store, &q, ReadAllOptions::forward().from(Position(at[1].0 + 1))).await),
        vec![3, 4],
        "from is a bound, not necessarily an event"
    );
    assert!(query(&store, &q, ReadAllOptions::forward().limit(0)).await.is_empty());
    let head = store.head_position().await.unwrap();
    assert!(query(&store, &q, ReadAllOptions::forward().from(head)).await.is_empty());
    // Paging forward with after: every event once.
    let mut paged = Vec::new();
    let mut page = query(&store, &q, ReadAllOptions::forward().limit(3)).await;
    while let Some(last) = page.last().map(|e| e.position) {
        paged.extend(ns(&page));
        page = query(&store, &q, ReadAllOptions::forward().after(last).limit(3)).await;
    }
    assert_eq!(paged, vec![0, 1, 3, 4]);
}

pub async fn query_all_matches_every_user_event(store: Store) {
    let s = unique("account");
    let tag = unique_tag("account");
    let before = store.last_position().await.unwrap();
    append_n(&store, &s, 1, 2).await;
    put(&store, &s, tagged("Tagged", 3, &[&tag])).await;
    store
        .set_stream_metadata(&s, StreamMetadata { max_count: Some(1), ..Default::default() })
        .await
        .unwrap();
    store.delete_stream(&s, ExpectedVersion::Any, false).await.unwrap();
    let options = match before {
        Some(p) => ReadAllOptions::forward().after(p),
        None => ReadAllOptions::forward(),
    };
    let ours: Vec<RecordedEvent> =
        query(&store, &Query::all(), options).await.into_iter().filter(|e| e.stream == s).collect();
    assert_eq!(
        versions(&ours),
        vec![1, 2, 3],
        "Query::all() matches every event of user streams, those of deleted streams too (like $all)"
    );
    let typed = query(&store, &Query::types(["$metadata", "$deleted"]), options).await;
    assert!(
        typed.iter().all(|e| e.stream != metadata_stream_name(&s)),
        "events of $ streams never match, whatever the query"
    );
    let all = Query::tags([tag.as_str()]).or(QueryItem::any());
    let ours_too = query(&store, &all, options).await.into_iter().filter(|e| e.stream == s).count();
    assert_eq!(ours_too, 3, "an empty item makes the whole query match everything");
}

pub async fn invalid_queries_and_tags_rejected(store: Store) {
    let s = unique("account");
    let empty = Query { items: vec![] };
    assert_err!(
        store.read_query(&empty, ReadAllOptions::forward()).await,
        StoreError::InvalidArgument(_)
    );
    match store.subscribe(SubscriptionTarget::Query(empty.clone()), StartFrom::Start).await {
        Err(StoreError::InvalidArgument(_)) => {}
        Err(e) => panic!("expected InvalidArgument, got {e:?}"),
        Ok(_) => panic!("a subscription to a query without items was accepted"),
    }
    let condition = AppendCondition::fail_if_events_match(empty);
    assert_err!(
        store.append_if(&s, ExpectedVersion::Any, vec![deposit(1)], condition).await,
        StoreError::InvalidArgument(_)
    );
    for bad in [
        Query::tags([""]),
        Query::tags(["a\u{7}b"]),
        Query::tags(["x".repeat(TAG_BYTES_MAX + 1)]),
        Query::types([""]),
    ] {
        assert_err!(
            store.read_query(&bad, ReadAllOptions::forward()).await,
            StoreError::InvalidArgument(_)
        );
        let condition = AppendCondition::fail_if_events_match(bad);
        assert_err!(
            store.append_if(&s, ExpectedVersion::Any, vec![deposit(1)], condition).await,
            StoreError::InvalidArgument(_)
        );
    }
    let too_many_items =
        Query::new((0..=QUERY_ITEMS_MAX).map(|i| QueryItem::tags([format!("t:{i}")])));
    assert_err!(
        store.read_query(&too_many_items, ReadAllOptions::forward()).await,
        StoreError::InvalidArgument(_)
    );
    let many: Vec<String> =
        (0..=Limits::default().event_tags_max).map(|i| format!("tag:{i}")).collect();
    let long = "x".repeat(TAG_BYTES_MAX + 1);
    for tags in [
        vec!["ok".to_string(), String::new()],
        vec!["bad\ntag".into()],
        vec![long.clone()],
        vec!["same".into(), "same".into()],
        many,
    ] {
        let event = deposit(2).with_tags(tags.clone());
        match store.append(&s, ExpectedVersion::Any, vec![deposit(1), event.clone()]).await {
            Err(StoreError::InvalidEvent(message)) => {
                assert!(message.contains("event 1"), "the error names the event: {message}")
            }
            other => panic!("expected InvalidEvent for tags {tags:?}, got {other:?}"),
        }
        let condition = AppendCondition::fail_if_events_match(Query::tags(["ok"]));
        assert_err!(
            store.append_if(&s, ExpectedVersion::Any, vec![event], condition).await,
            StoreError::InvalidEvent(_)
        );
    }
    match store
        .append(&s, ExpectedVersion::Any, vec![deposit(1).with_tags(["fine", "a\u{1}b"])])
        .await
    {
        Err(StoreError::InvalidEvent(message)) => {
            assert!(message.contains("a\\u{1}b"), "the error names the tag: {message}")
        }
        other => panic!("expected InvalidEvent, got {other:?}"),
    }
    assert_err!(store.stream_info(&s).await, StoreError::StreamNotFound { .. });
    let longest = "y".repeat(TAG_BYTES_MAX);
    let most: Vec<String> =
        (0..Limits::default().event_tags_max).map(|i| format!("{}:{i}", unique_tag("t"))).collect();
    store
        .append(
            &s,
            ExpectedVersion::Any,
            vec![deposit(1).with_tags([longest]), deposit(2).with_tags(most)],
        )
        .await
        .expect("a 256-byte tag and the most tags allowed are fine");
}

pub async fn append_condition_after_what_was_read_succeeds(store: Store) {
    let (s, tag) = (unique("course"), unique_tag("course"));
    let q = Query::tags([tag.as_str()]);
    // Nothing matched yet: the condition is after the newest event in the store.
    let last = store.last_position().await.unwrap();
    let seen = query(&store, &q, ReadAllOptions::forward()).await;
    assert!(seen.is_empty());
    let condition = AppendCondition::after_read(q.clone(), last, &seen);
    assert_eq!(condition.after, last);
    let first = store
        .append_if(&s, ExpectedVersion::Any, vec![tagged("CourseDefined", 1, &[&tag])], condition)
        .await
        .unwrap();
    // Something matched: after its position (which is now the head's last event).
    let last = store.last_position().await.unwrap();
    let seen = query(&store, &q, ReadAllOptions::forward()).await;
    assert_eq!(seen.last().map(|e| e.position), Some(first.position));
    let condition = AppendCondition::after_read(q.clone(), last, &seen);
    let second = store
        .append_if(&s, ExpectedVersion::Any, vec![tagged("Subscribed", 2, &[&tag])], condition)
        .await
        .unwrap();
    assert!(second.position > first.position);
    // A plain `after` of the last matching event's position works as well.
    let condition = AppendCondition::fail_if_events_match(q.clone()).after(second.position);
    store
        .append_if(&s, ExpectedVersion::Exact(2), vec![tagged("Subscribed", 3, &[&tag])], condition)
        .await
        .unwrap();
    assert_eq!(ns(&query(&store, &q, ReadAllOptions::forward()).await), vec![1, 2, 3]);
}

pub async fn append_condition_fails_on_a_later_match(store: Store) {
    let (s, other, tag) = (unique("course"), unique("course"), unique_tag("course"));
    let q = Query::tags([tag.as_str()]);
    let last = store.last_position().await.unwrap();
    let seen = query(&store, &q, ReadAllOptions::forward()).await;
    let condition = AppendCondition::after_read(q.clone(), last, &seen);
    // Another decision gets in first: its event lands right after what we saw.
    let first = put(&store, &other, tagged("Subscribed", 1, &[&tag])).await;
    let second = put(&store, &other, tagged("Subscribed", 2, &[&tag])).await;
    match store
        .append_if(
            &s,
            ExpectedVersion::Any,
            vec![tagged("Subscribed", 3, &[&tag])],
            condition.clone(),
        )
        .await
    {
        Err(StoreError::AppendConditionFailed { first_conflict, after }) => {
            assert_eq!(first_conflict, first, "the error names the first conflicting position");
            assert_eq!(after, condition.after);
        }
        other => panic!("expected AppendConditionFailed, got {other:?}"),
    }
    assert_err!(store.stream_info(&s).await, StoreError::StreamNotFound { .. });
    // From an older position with matching events in between.
    let condition = AppendCondition::fail_if_events_match(q.clone()).after(first);
    assert_err!(store.append_if(&s, ExpectedVersion::Any, vec![deposit(1)], condition).await,
        StoreError::AppendConditionFailed { first_conflict, .. } if first_conflict == second);
    assert_eq!(
        ns(&query(&store, &q, ReadAllOptions::forward()).await),
        vec![1, 2],
        "a failed condition wrote nothing"
    );
    // Read again, decide again: now it goes through.
    let last = store.last_position().await.unwrap();
    let seen = query(&store, &q, ReadAllOptions::forward()).await;
    let condition = AppendCondition::after_read(q.clone(), last, &seen);
    store
        .append_if(&s, ExpectedVersion::Any, vec![tagged("Subscribed", 3, &[&tag])], condition)
        .await
        .unwrap();
    assert_eq!(ns(&query(&store, &q, ReadAllOptions::forward()).await), vec![1, 2, 3]);
}

pub async fn append_condition_ignores_events_that_do_not_match(store: Store) {
    let (s, course, student) = (unique("course"), unique_tag("course"), unique_tag("student"));
    let (c, st) = (course.as_str(), student.as_str());
    let seen = put(&store, &s, tagged("Subscribed", 1, &[c, st])).await;
    let q = Query::from(QueryItem::types(["Subscribed"]).with_tags([c, st]));
    // In between: other tags, only one of the two tags, another type, untagged events.
    put(&store, &s, tagged("Subscribed", 2, &[c])).await;
    put(&store, &s, tagged("Subscribed", 3, &[st, &unique_tag("course")])).await;
    put(&store, &s, tagged("Renamed", 4, &[c, st])).await;
    append_n(&store, &s, 5, 2).await;
    store
        .set_stream_metadata(&s, StreamMetadata { max_count: Some(10), ..Default::default() })
        .await
        .unwrap();
    let condition = AppendCondition::fail_if_events_match(q.clone()).after(seen);
    store
        .append_if(&s, ExpectedVersion::Any, vec![tagged("Unsubscribed", 7, &[c, st])], condition)
        .await
        .expect("events that do not match the query do not fail the condition");
}

pub async fn append_condition_without_after(store: Store) {
    let (s, tag) = (unique("user"), unique_tag("username"));
    let q = Query::tags([tag.as_str()]);
    let condition = AppendCondition::fail_if_events_match(q.clone());
    assert_eq!(condition.after, None);
    let r = store
        .append_if(
            &s,
            ExpectedVersion::NoStream,
            vec![tagged("UserRegistered", 1, &[&tag])],
            condition.clone(),
        )
        .await
        .expect("no matching event at all: the condition holds");
    let again = unique("user");
    match store
        .append_if(
            &again,
            ExpectedVersion::NoStream,
            vec![tagged("UserRegistered", 2, &[&tag])],
            condition,
        )
        .await
    {
        Err(StoreError::AppendConditionFailed { first_conflict, after: None }) => {
            assert_eq!(first_conflict, r.position)
        }
        other => panic!("a second registration of the same name must fail, got {other:?}"),
    }
    assert_err!(store.stream_info(&again).await, StoreError::StreamNotFound { .. });
}

pub async fn append_if_checks_expected_version_too(store: Store) {
    let (s, tag) = (unique("course"), unique_tag("course"));
    let q = Query::tags([tag.as_str()]);
    let holds = AppendCondition::fail_if_events_match(q.clone());
    assert_err!(
        store
            .append_if(&s, ExpectedVersion::Exact(3), vec![tagged("A", 1, &[&tag])], holds.clone())
            .await,
        StoreError::WrongExpectedVersion { actual_version: 0, .. }
    );
    assert_err!(store.stream_info(&s).await, StoreError::StreamNotFound { .. });
    let batch = vec![tagged("A", 1, &[&tag]), tagged("B", 2, &[&tag])];
    let first =
        store.append_if(&s, ExpectedVersion::NoStream, batch.clone(), holds.clone()).await.unwrap();
    assert_eq!(first.next_version, 2);
    // Retrying the same batch returns the first result: its own events do not fail its condition.
    assert_eq!(
        store.append_if(&s, ExpectedVersion::NoStream, batch, holds.clone()).await.unwrap(),
        first
    );
    assert_err!(
        store.append_if(&s, ExpectedVersion::Exact(2), vec![tagged("C", 3, &[&tag])], holds).await,
        StoreError::AppendConditionFailed { .. }
    );
    let after = AppendCondition::fail_if_events_match(q.clone()).after(first.position);
    assert_err!(
        store
            .append_if(&s, ExpectedVersion::Exact(1), vec![tagged("C", 3, &[&tag])], after.clone())
            .await,
        StoreError::WrongExpectedVersion { actual_version: 2, .. }
    );
    let r = store
        .append_if(&s, ExpectedVersion::Exact(2), vec![tagged("C", 3, &[&tag])], after)
        .await
        .unwrap();
    assert_eq!(r.next_version, 3);
    assert_eq!(ns(&read(&store, &s).await), vec![1, 2, 3]);
}

pub async fn concurrent_conditional_appends_one_wins(store: Store) {
    let tag = unique_tag("course");
    let q = Query::tags([tag.as_str()]);
    let last = store.last_position().await.unwrap();
    let condition = AppendCondition::after_read(
        q.clone(),
        last,
        &query(&store, &q, ReadAllOptions::forward()).await,
    );
    let barrier = Arc::new(tokio::sync::Barrier::new(16));
    let mut tasks = Vec::new();
    for i in 0..16 {
        let (store, barrier, condition, tag) =
            (store.clone(), barrier.clone(), condition.clone(), tag.clone());
        tasks.push(tokio::spawn(async move {
            barrier.wait().await;
            // Each to its own stream: only the condition links them.
            store
                .append_if(
                    &unique("seat"),
                    ExpectedVersion::Any,
                    vec![tagged("SeatTaken", i, &[&tag])],
                    condition,
                )
                .await
        }));
    }
    let mut wins = Vec::new();
    let mut conflicts = Vec::new();
    for t in tasks {
        match t.await.unwrap() {
            Ok(r) => wins.push(r.position),
            Err(StoreError::AppendConditionFailed { first_conflict, .. }) => {
                conflicts.push(first_conflict)
            }
            Err(e) => panic!("unexpected error {e}"),
        }
    }
    assert_eq!(wins.len(), 1, "exactly one of 16 racing conditional appends succeeds");
    assert!(conflicts.iter().all(|p| *p == wins[0]), "the others name the winner's event");
    assert_eq!(query(&store, &q, ReadAllOptions::forward()).await.len(), 1);
}

pub async fn subscribe_query_catch_up_then_live(store: Store) {
    let (a, b, tag) = (unique("course"), unique("course"), unique_tag("course"));
    let q = Query::tags([tag.as_str()]);
    for i in 0..20 {
        let tags: &[&str] = if i % 2 == 0 { &[&tag] } else { &[] };
        put(&store, if i % 3 == 0 { &a } else { &b }, tagged("E", i, tags)).await;
    }
    let mut sub =
        store.subscribe(SubscriptionTarget::Query(q.clone()), StartFrom::Start).await.unwrap();
    let mut end =
        store.subscribe(SubscriptionTarget::Query(q.clone()), StartFrom::End).await.unwrap();
    let writer = {
        let (store, a, b, tag) = (store.clone(), a.clone(), b.clone(), tag.clone());
        tokio::spawn(async move {
            for i in 20..40 {
                let tags: &[&str] = if i % 2 == 0 { &[&tag] } else { &[] };
                put(&store, if i % 3 == 0 { &a } else { &b }, tagged("E", i, tags)).await;
            }
        })
    };
    let mut got = Vec::new();
    let mut last = Position::START;
    while got.len() < 20 {
        let e = next_event(&mut sub).await;
        assert!(e.position > last, "positions strictly increase");
        last = e.position;
        got.push(ns(&[e])[0]);
    }
    writer.await.unwrap();
    assert_eq!(
        got,
        (0..40).step_by(2).collect::<Vec<_>>(),
        "every matching event once, history then live"
    );
    assert_eq!(ns(&[next_event(&mut end).await]), vec![20], "from the end: only what comes after");
    let history = query(&store, &q, ReadAllOptions::forward()).await;
    let mut after = store
        .subscribe(SubscriptionTarget::Query(q), StartFrom::After(history[4].position.0))
        .await
        .unwrap();
    assert_eq!(
        ns(&[next_event(&mut after).await]),
        vec![10],
        "after a position: strictly after it"
    );
}

// ---------------------------------------------------------------------------
// Categories and filtered subscriptions. Each test has its own category (a
// uuid without dashes), so the suite also passes on a shared store.

/// A category no other test uses.
pub fn unique_category(prefix: &str) -> String {
    format!("{prefix}{}", Uuid::new_v4().simple())
}

async fn read_category(
    store: &Store,
    category: &str,
    options: ReadAllOptions,
) -> Vec<RecordedEvent> {
    let events = store.read_category(category, options).await.unwrap();
    assert!(
        events.iter().all(|e| stream_category(&e.stream) == Some(category)),
        "only events of the category's streams"
    );
    events
}

fn positions(events: &[RecordedEvent]) -> Vec<Position> {
    events.iter().map(|e| e.position).collect()
}

/// The user events appended after `before` (a `last_position`), from `$all`.
async fn all_after(store: &Store, before: Option<Position>) -> Vec<RecordedEvent> {
    let options = match before {
        Some(p) => ReadAllOptions::forward().after(p),
        None => ReadAllOptions::forward(),
    };
    store.read_all(options).await.unwrap()
}

pub async fn category_reads_in_order(store: Store) {
    let cat = unique_category("account");
    let before = store.last_position().await.unwrap();
    // The first `-` ends the category, so `{cat}-x-y` is in it; `{cat}2-x`,
    // `{cat}s-x` and `{cat}` (no `-`) are not, nor are `$` streams.
    let ins = [format!("{cat}-1"), format!("{cat}-2"), format!("{cat}-x-y")];
    let outs = [format!("{cat}2-x"), format!("{cat}s-x"), cat.clone()];
    for n in 0..30u64 {
        let stream =
            if n % 2 == 0 { &ins[(n / 2 % 3) as usize] } else { &outs[(n / 2 % 3) as usize] };
        append_n(&store, stream, n * 10, 1 + n % 2).await;
        match n {
            7 => {
                store
                    .set_stream_metadata(
                        &ins[0],
                        StreamMetadata { max_count: Some(1), ..Default::default() },
                    )
                    .await
                    .unwrap();
            }
            11 => {
                store
                    .append(&snapshot_stream_name(&ins[1]), ExpectedVersion::Any, vec![deposit(1)])
                    .await
                    .unwrap();
            }
            17 => {
                store.delete_stream(&ins[1], ExpectedVersion::Any, false).await.unwrap();
            }
            _ => {}
        }
    }
    let want: Vec<RecordedEvent> =
        all_after(&store, before).await.into_iter().filter(|e| ins.contains(&e.stream)).collect();
    assert_eq!(want.len(), 15);
    let at = positions(&want);
    let all = read_category(&store, &cat, ReadAllOptions::forward()).await;
    assert_eq!(
        positions(&all),
        at,
        "every event of the category's streams, in position order, also those hidden from stream reads"
    );
    assert_eq!(amounts(&all), amounts(&want));
    let mut backward = at.clone();
    backward.reverse();
    assert_eq!(positions(&read_category(&store, &cat, ReadAllOptions::backward()).await), backward);
    assert_eq!(
        positions(&read_category(&store, &cat, ReadAllOptions::backward().limit(4)).await),
        backward[..4]
    );
    assert_eq!(
        positions(&read_category(&store, &cat, ReadAllOptions::forward().limit(4)).await),
        at[..4]
    );
    assert_eq!(
        positions(&read_category(&store, &cat, ReadAllOptions::forward().from(at[5])).await),
        at[5..]
    );
    assert_eq!(
        positions(
            &read_category(&store, &cat, ReadAllOptions::forward().after(at[5]).limit(3)).await
        ),
        at[6..9]
    );
    assert_eq!(
        positions(
            &read_category(&store, &cat, ReadAllOptions::forward().from(Position(at[5].0 + 1)))
                .await
        ),
        at[6..],
        "from is a bound"
    );
    assert_eq!(
        positions(&read_category(&store, &cat, ReadAllOptions::backward().from(at[5])).await),
        backward[9..]
    );
    assert_eq!(
        positions(&read_category(&store, &cat, ReadAllOptions::backward().after(at[5])).await),
        backward[10..]
    );
    let head = store.head_position().await.unwrap();
    assert!(read_category(&store, &cat, ReadAllOptions::forward().from(head)).await.is_empty());
    let mut paged = Vec::new();
    let mut page = read_category(&store, &cat, ReadAllOptions::forward().limit(4)).await;
    while let Some(last) = page.last().map(|e| e.position) {
        paged.extend(positions(&page));
        page = read_category(&store, &cat, ReadAllOptions::forward().after(last).limit(4)).await;
    }
    assert_eq!(paged, at, "paging with after: every event once");
    assert_eq!(
        positions(
            &store
                .read_query(&Query::category(cat.as_str()), ReadAllOptions::forward())
                .await
                .unwrap()
        ),
        at,
        "read_category is a category query"
    );
    for other in [format!("{cat}2"), format!("{cat}s")] {
        assert_eq!(
            read_category(&store, &other, ReadAllOptions::forward()).await.len(),
            10,
            "{other} holds only its own stream's events"
        );
    }
}

pub async fn category_combines_with_types_tags_and_conditions(store: Store) {
    let (cat, other, tag) =
        (unique_category("order"), unique_category("order"), unique_tag("customer"));
    let (o1, o2, x1) = (format!("{cat}-1"), format!("{cat}-2"), format!("{other}-1"));
    put(&store, &o1, tagged("OrderPlaced", 0, &[&tag])).await;
    put(&store, &x1, tagged("OrderPlaced", 1, &[&tag])).await;
    put(&store, &o2, tagged("OrderPlaced", 2, &[])).await;
    put(&store, &o1, tagged("OrderShipped", 3, &[&tag])).await;
    let placed = Query::from(QueryItem::categories([cat.as_str()]).with_types(["OrderPlaced"]));
    assert_eq!(
        ns(&query(&store, &placed, ReadAllOptions::forward()).await),
        vec![0, 2],
        "a category and a type: both must hold"
    );
    let tagged_in = Query::from(QueryItem::categories([cat.as_str()]).with_tags([tag.as_str()]));
    assert_eq!(ns(&query(&store, &tagged_in, ReadAllOptions::backward()).await), vec![3, 0]);
    let both = Query::from(QueryItem::categories([cat.as_str(), other.as_str()]));
    assert_eq!(
        ns(&query(&store, &both, ReadAllOptions::forward()).await),
        vec![0, 1, 2, 3],
        "categories of one item are OR'ed"
    );
    let either = Query::category(other.as_str())
        .or(QueryItem::categories([cat.as_str()]).with_types(["OrderShipped"]));
    assert_eq!(ns(&query(&store, &either, ReadAllOptions::forward()).await), vec![1, 3]);
    // A condition on a category: "no new order of this category since I read".
    let q = Query::category(cat.as_str());
    let last = store.last_position().await.unwrap();
    let read = query(&store, &q, ReadAllOptions::forward()).await;
    let condition = AppendCondition::after_read(q.clone(), last, &read);
    put(&store, &x1, tagged("OrderPlaced", 4, &[])).await;
    store
        .append_if(
            &format!("{cat}-3"),
            ExpectedVersion::NoStream,
            vec![tagged("OrderPlaced", 5, &[])],
            condition.clone(),
        )
        .await
        .expect("an event of another category does not break the condition");
    match store
        .append_if(
            &format!("{cat}-4"),
            ExpectedVersion::NoStream,
            vec![tagged("OrderPlaced", 6, &[])],
            condition,
        )
        .await
    {
        Err(StoreError::AppendConditionFailed { first_conflict, .. }) => {
            let newest = read_category(&store, &cat, ReadAllOptions::backward().limit(1)).await;
            assert_eq!(
                first_conflict, newest[0].position,
                "the conflict names the category's new event"
            );
        }
        other => panic!("expected AppendConditionFailed, got {other:?}"),
    }
    assert_eq!(ns(&read_category(&store, &cat, ReadAllOptions::forward()).await), vec![0, 2, 3, 5]);
}

pub async fn invalid_categories_rejected(store: Store) {
    for bad in ["", "account-1", "$snapshots", "a\u{7}b"] {
        assert_err!(
            store.read_category(bad, ReadAllOptions::forward()).await,
            StoreError::InvalidArgument(_)
        );
        match store.subscribe(SubscriptionTarget::category(bad), StartFrom::Start).await {
            Err(StoreError::InvalidArgument(_)) => {}
            Err(e) => panic!("expected InvalidArgument for {bad:?}, got {e:?}"),
            Ok(_) => panic!("a subscription to category {bad:?} was accepted"),
        }
        let condition = AppendCondition::fail_if_events_match(Query::category(bad));
        assert_err!(
            store
                .append_if(&unique("account"), ExpectedVersion::Any, vec![deposit(1)], condition)
                .await,
            StoreError::InvalidArgument(_)
        );
    }
    assert!(
        store
            .read_category(&unique_category("nobody"), ReadAllOptions::forward())
            .await
            .unwrap()
            .is_empty()
    );
}

pub async fn subscribe_category_catch_up_then_live(store: Store) {
    let cat = unique_category("account");
    let (a, b, out) = (format!("{cat}-a"), format!("{cat}-b"), format!("{cat}x-a"));
    let stream_of = |i: u64| [out.clone(), a.clone(), b.clone()][(i % 3) as usize].clone();
    for i in 0..30 {
        append_n(&store, &stream_of(i), i, 1).await;
    }
    let mut sub = store
        .subscribe(SubscriptionTarget::category(cat.as_str()), StartFrom::Start)
        .await
        .unwrap();
    let mut end =
        store.subscribe(SubscriptionTarget::category(cat.as_str()), StartFrom::End).await.unwrap();
    let writer = {
        let (store, streams) = (store.clone(), (30..60).map(stream_of).collect::<Vec<_>>());
        tokio::spawn(async move {
            for (i, s) in (30..60).zip(streams) {
                append_n(&store, &s, i, 1).await;
                if i == 40 {
                    store
                        .set_stream_metadata(
                            &s,
                            StreamMetadata { max_count: Some(2), ..Default::default() },
                        )
                        .await
                        .unwrap();
                }
            }
        })
    };
    let mut got = Vec::new();
    let mut last = Position::START;
    while got.len() < 40 {
        let e = next_event(&mut sub).await;
        assert!(e.position > last, "positions strictly increase");
        assert!(e.stream == a || e.stream == b, "only the category's streams, never {}", e.stream);
        last = e.position;
        got.push(amounts(&[e])[0]);
    }
    writer.await.unwrap();
    assert_eq!(
        got,
        (0..60).filter(|i| i % 3 != 0).collect::<Vec<_>>(),
        "every event of the category once, history then live"
    );
    assert_eq!(
        amounts(&[next_event(&mut end).await]),
        vec![31],
        "from the end: only what comes after"
    );
}

pub async fn subscribe_category_resumes_after_a_checkpoint(store: Store) {
    let cat = unique_category("account");
    let (a, b) = (format!("{cat}-a"), format!("{cat}-b"));
    for i in 0..10 {
        append_n(&store, if i % 2 == 0 { &a } else { &b }, i, 1).await;
    }
    let mut sub = store
        .subscribe(SubscriptionTarget::category(cat.as_str()), StartFrom::Start)
        .await
        .unwrap();
    let mut checkpoint = Position::START;
    for want in 0..4 {
        let e = next_event(&mut sub).await;
        checkpoint = e.position;
        assert_eq!(amounts(&[e]), vec![want]);
    }
    drop(sub); // "crash" after processing 0..=3
    for i in 10..15 {
        append_n(&store, if i % 2 == 0 { &a } else { &b }, i, 1).await;
    }
    let outsider = append_n(&store, &format!("{cat}x-a"), 99, 1).await.position;
    append_n(&store, &a, 15, 1).await;
    let mut resumed = store
        .subscribe(SubscriptionTarget::category(cat.as_str()), StartFrom::After(checkpoint.0))
        .await
        .unwrap();
    let mut got = Vec::new();
    for _ in 4..16 {
        got.push(amounts(&[next_event(&mut resumed).await])[0]);
    }
    assert_eq!(got, (4..16).collect::<Vec<_>>(), "exactly the events after the checkpoint");
    let extra = tokio::time::timeout(Duration::from_millis(200), resumed.next()).await;
    assert!(extra.is_err(), "nothing more: {extra:?}");
    // A checkpoint may be any position, also one of an event outside the category.
    let mut from_outsider = store
        .subscribe(SubscriptionTarget::category(cat.as_str()), StartFrom::After(outsider.0))
        .await
        .unwrap();
    assert_eq!(amounts(&[next_event(&mut from_outsider).await]), vec![15]);
}

pub async fn subscription_filter_applies_a_predicate(store: Store) {
    let (s, noise) = (unique("account"), unique("account"));
    let first = append_n(&store, &s, 0, 1).await;
    let wanted = s.clone();
    let mut sub = store
        .subscribe(SubscriptionTarget::All, StartFrom::After(first.position.0))
        .await
        .unwrap()
        .filter(move |e| {
            e.stream == wanted
                && e.json::<serde_json::Value>().unwrap()["amount"].as_u64().unwrap() % 2 == 0
        });
    for i in 1..=20 {
        append_n(&store, &s, i, 1).await;
        append_n(&store, &noise, i, 1).await;
        if i == 10 {
            store
                .set_stream_metadata(
                    &s,
                    StreamMetadata { max_count: Some(3), ..Default::default() },
                )
                .await
                .unwrap();
        }
    }
    let mut got = Vec::new();
    while got.len() < 10 {
        let e = next_event(&mut sub).await;
        assert_eq!(e.stream, s);
        got.push(amounts(&[e])[0]);
    }
    assert_eq!(
        got,
        (2..=20).step_by(2).collect::<Vec<_>>(),
        "only the events the predicate keeps, in order, history then live"
    );
    let cat = unique_category("account");
    append_n(&store, &format!("{cat}-1"), 1, 3).await;
    let mut typed = store
        .subscribe(SubscriptionTarget::category(cat.as_str()), StartFrom::Start)
        .await
        .unwrap()
        .filter(|e| e.version >= 2);
    assert_eq!(
        versions(&[next_event(&mut typed).await, next_event(&mut typed).await]),
        vec![2, 3],
        "any subscription can be filtered"
    );
}

/// JSON payloads are checked as readers will parse them (serde_json in
/// responses and clients): too deep, a lone surrogate escape or bad UTF-8
/// is refused with the reason, so no stored event can break a read.
pub async fn json_payloads_readers_cannot_parse_rejected(store: Store) {
    let s = unique("account");
    let max = Limits::default().json_depth_max;
    let nested = |n: usize| format!("{}{}", "[".repeat(n), "]".repeat(n));
    let refused = [
        (nested(200).into_bytes(), "deeper than"),
        (nested(max + 1).into_bytes(), "deeper than"),
        (format!(r#"{{"a":{}}}"#, nested(max)).into_bytes(), "deeper than"),
        (br#"{"a":"\ud800"}"#.to_vec(), "surrogate"),
        (br#"["x\udc00y"]"#.to_vec(), "surrogate"),
        (br#"{"\ud800":1}"#.to_vec(), "surrogate"),
        (b"\"\xff\"".to_vec(), "JSON"),
    ];
    for (payload, says) in refused {
        let text = String::from_utf8_lossy(&payload).into_owned();
        match store
            .append(
                &s,
                ExpectedVersion::Any,
                vec![deposit(1), NewEvent::json_bytes("Odd", payload)],
            )
            .await
        {
            Err(StoreError::InvalidEvent(m)) => assert!(
                m.contains("event 1") && m.contains(says),
                "{text:.40}: the error should say {says:?}: {m}"
            ),
            other => panic!("expected InvalidEvent for {text:.40}, got {other:?}"),
        }
    }
    assert_err!(store.stream_info(&s).await, StoreError::StreamNotFound { .. });
    // What strict parsers take is fine: the deepest nesting allowed, a
    // surrogate pair, and \u0000 (payloads are bytes on every backend).
    let fine = [
        nested(max),
        format!(r#"{{"a":{}}}"#, nested(max - 1)),
        r#"{"a":"\ud83d\ude00","b":"x\u0000y"}"#.to_string(),
    ];
    let before = store.last_position().await.unwrap();
    let events = fine.iter().map(|p| NewEvent::json_bytes("Odd", p.clone())).collect();
    store.append(&s, ExpectedVersion::NoStream, events).await.expect("payloads within the rules");
    let back = read(&store, &s).await;
    for (e, p) in back.iter().zip(&fine) {
        assert_eq!(e.data, p.as_bytes(), "a JSON payload reads back as it was written");
        e.json::<serde_json::Value>().expect("a payload serde_json can parse");
    }
    let all = all_after(&store, before).await;
    assert_eq!(all.iter().filter(|e| e.stream == s).count(), 3, "$all reads them too");
    assert_eq!(back[2].json::<serde_json::Value>().unwrap()["b"], "x\u{0}y");
}

/// Names are what people read and match: control characters, and invisible
/// or bidi-control ones that make a name look like another, are refused in
/// stream names, event types, tags and categories, naming the character.
pub async fn names_with_control_or_invisible_characters_rejected(store: Store) {
    let s = unique("account");
    let typed = |t: &str| NewEvent::json(t, &serde_json::json!({"amount": 2})).unwrap();
    for (t, says) in [
        ("Money\u{0}Deposited", "U+0000"),
        ("Money\tDeposited", "control character"),
        ("Deposit\u{202E}ed", "U+202E"),
        ("\u{200B}Deposited", "U+200B"),
        ("Deposited\u{FEFF}", "U+FEFF"),
        ("A\u{2028}B", "U+2028"),
        ("A\u{E0041}", "U+E0041"),
    ] {
        match store.append(&s, ExpectedVersion::Any, vec![deposit(1), typed(t)]).await {
            Err(StoreError::InvalidEvent(m)) => assert!(
                m.contains("event 1") && m.contains(says),
                "type {t:?}: the error should say {says:?}: {m}"
            ),
            other => panic!("expected InvalidEvent for type {t:?}, got {other:?}"),
        }
        let query = Query::types([t]);
        assert_err!(store.read_query(&query, ReadAllOptions::forward()).await, StoreError::InvalidArgument(m) if m.contains(says));
    }
    for (name, says) in [
        (format!("{s}\u{202E}x"), "U+202E"),
        (format!("a\u{200D}{s}"), "U+200D"),
        (format!("$snapshots-{s}\u{2066}"), "U+2066"),
    ] {
        match store.append(&name, ExpectedVersion::Any, vec![deposit(1)]).await {
            Err(StoreError::InvalidStreamName { reason, .. }) => {
                assert!(reason.contains(says), "{name:?}: the reason should say {says:?}: {reason}")
            }
            other => panic!("expected InvalidStreamName for {name:?}, got {other:?}"),
        }
    }
    match store
        .append(&s, ExpectedVersion::Any, vec![deposit(1).with_tags(["student:\u{2067}42"])])
        .await
    {
        Err(StoreError::InvalidEvent(m)) => {
            assert!(m.contains("U+2067"), "the error names the character: {m}")
        }
        other => panic!("expected InvalidEvent, got {other:?}"),
    }
    assert_err!(store.read_query(&Query::tags(["a\u{00AD}b"]), ReadAllOptions::forward()).await, StoreError::InvalidArgument(m) if m.contains("U+00AD"));
    assert_err!(store.read_query(&Query::category("acc\u{061C}ount"), ReadAllOptions::forward()).await, StoreError::InvalidArgument(m) if m.contains("U+061C"));
    assert_err!(store.stream_info(&s).await, StoreError::StreamNotFound { .. });
    // Letters of any script are names like any other.
    let tag = format!("{}:ü", unique_tag("名前"));
    store
        .append(&s, ExpectedVersion::NoStream, vec![typed("Überweisung").with_tags([tag.as_str()])])
        .await
        .expect("non-ASCII letters are fine");
    let found = query(
        &store,
        &Query::new([QueryItem::tags([tag.as_str()]).with_types(["Überweisung"])]),
        ReadAllOptions::forward(),
    )
    .await;
    assert_eq!(found.len(), 1);
}

/// `After(u64::MAX)` on a stream is past every version there can be: the
/// subscription delivers nothing, rather than wrapping round to version 1.
pub async fn subscribe_stream_after_the_largest_version_delivers_nothing(store: Store) {
    let s = unique("account");
    append_n(&store, &s, 1, 2).await;
    let mut sub = store
        .subscribe(SubscriptionTarget::Stream(s.clone()), StartFrom::After(u64::MAX))
        .await
        .unwrap();
    append_n(&store, &s, 3, 1).await;
    let got = tokio::time::timeout(Duration::from_millis(500), sub.next()).await;
    assert!(
        got.is_err(),
        "a subscription after u64::MAX delivered {:?}",
        got.ok().flatten().map(|r| r.map(|e| e.version))
    );
}

/// An event id is the append's identity: resending it with another type,
/// payload or tags is refused (nothing written), not answered with the first
/// result; an identical retry still gets the original result. A conflict
/// over part of a batch names the event that was written.
pub async fn reused_id_with_other_content_conflicts(store: Store) {
    let s = unique("account");
    let first = deposit(1);
    let done = store.append(&s, ExpectedVersion::Any, vec![first.clone()]).await.unwrap();
    let mut other_payload = deposit(2);
    other_payload.id = first.id;
    assert_err!(
        store.append(&s, ExpectedVersion::Any, vec![other_payload]).await,
        StoreError::IdempotencyConflict { .. }
    );
    let mut other_type = first.clone();
    other_type.event_type = "MoneyWithdrawn".into();
    assert_err!(
        store.append(&s, ExpectedVersion::Any, vec![other_type]).await,
        StoreError::IdempotencyConflict { .. }
    );
    let other_tags = first.clone().with_tags(["account:1"]);
    assert_err!(
        store.append(&s, ExpectedVersion::Any, vec![other_tags]).await,
        StoreError::IdempotencyConflict { .. }
    );
    assert_eq!(
        store.append(&s, ExpectedVersion::Any, vec![first.clone()]).await.unwrap(),
        done,
        "an identical retry"
    );
    let fresh = deposit(3);
    match store.append(&s, ExpectedVersion::Any, vec![fresh.clone(), first.clone()]).await {
        Err(StoreError::IdempotencyConflict { id, .. }) => {
            assert_eq!(id, first.id, "names the event that was written")
        }
        other => panic!("expected an idempotency conflict, got {other:?}"),
    }
    assert_eq!(versions(&read(&store, &s).await), vec![1], "nothing more was written");
}

/// After a soft delete, resending an append written before it does not
/// claim success for events the stream no longer has.
pub async fn retry_after_soft_delete_conflicts(store: Store) {
    let s = unique("account");
    let first = deposit(1);
    store.append(&s, ExpectedVersion::Any, vec![first.clone()]).await.unwrap();
    store.delete_stream(&s, ExpectedVersion::Any, false).await.unwrap();
    match store.append(&s, ExpectedVersion::Any, vec![first.clone()]).await {
        Err(StoreError::IdempotencyConflict { id, detail }) => {
            assert_eq!(id, first.id);
            assert!(detail.contains("deleted"), "{detail}");
        }
        other => panic!("expected an idempotency conflict, got {other:?}"),
    }
    assert_err!(
        store.read_stream(&s, ReadStreamOptions::forward()).await,
        StoreError::StreamNotFound { .. }
    );
}

/// A max age too large to count in microseconds hides nothing (it used to
/// overflow and hide the whole stream).
pub async fn huge_max_age_hides_nothing(store: Store) {
    let s = unique("account");
    append_n(&store, &s, 1, 3).await;
    for max_age in [1u64 << 62, 1 << 63, u64::MAX] {
        let metadata = StreamMetadata { max_age_secs: Some(max_age), ..Default::default() };
        store.set_stream_metadata(&s, metadata).await.unwrap();
        assert_eq!(versions(&read(&store, &s).await), vec![1, 2, 3], "max_age_secs {max_age}");
    }
}

/// A checkpoint stream shows its newest checkpoint and at most
/// [`CHECKPOINTS_KEPT`] events, however often it is saved.
pub async fn checkpoint_streams_stay_bounded(store: Store) {
    let checkpoints: CheckpointStream<u64> = CheckpointStream::new(
        format!("{RELAY_STREAM_PREFIX}c{}", Uuid::new_v4().simple()),
        "Checkpoint",
    );
    assert!(checkpoints.load(store.as_ref()).await.unwrap().is_none(), "none before the first");
    for n in 1..=40u64 {
        checkpoints.save(store.as_ref(), &n).await.unwrap();
    }
    let (newest, event) = checkpoints.load(store.as_ref()).await.unwrap().unwrap();
    assert_eq!((newest, event.version), (40, 40));
    let shown =
        store.read_stream(checkpoints.stream(), ReadStreamOptions::forward()).await.unwrap();
    assert_eq!(shown.len() as u64, CHECKPOINTS_KEPT, "older checkpoints are hidden");
    assert_eq!(shown.last().unwrap().json::<u64>().unwrap(), 40);
}

pub async fn append_each_applies_in_order_each_on_its_own(store: Store) {
    let (a, b) = (unique("account"), unique("account"));
    let retried = deposit(9);
    let results = store
        .append_each(vec![
            Append::new(&a, ExpectedVersion::NoStream, vec![deposit(1)]),
            // Sees the one before it.
            Append::new(&a, ExpectedVersion::Exact(1), vec![deposit(2), deposit(3)]),
            // Fails on its own: the others go on.
            Append::new(&a, ExpectedVersion::Exact(1), vec![deposit(4)]),
            Append::new(&b, ExpectedVersion::Any, vec![retried.clone()]),
            Append::new("", ExpectedVersion::Any, vec![deposit(5)]),
            Append::new(&a, ExpectedVersion::Exact(3), vec![deposit(6)]),
            // The same events again: the first result, nothing written.
            Append::new(&b, ExpectedVersion::Any, vec![retried]),
        ])
        .await;
    assert_eq!(results.len(), 7, "an answer per append");
    assert_eq!(results[0].as_ref().unwrap().next_version, 1);
    assert_eq!(results[1].as_ref().unwrap().next_version, 3);
    assert_err!(&results[2], StoreError::WrongExpectedVersion { actual_version: 3, .. });
    assert_eq!(results[3].as_ref().unwrap().next_version, 1);
    assert_err!(&results[4], StoreError::InvalidStreamName { .. });
    assert_eq!(results[5].as_ref().unwrap().next_version, 4);
    assert_eq!(
        results[6].as_ref().unwrap(),
        results[3].as_ref().unwrap(),
        "a retry inside one call is recognised"
    );
    let events = read(&store, &a).await;
    assert_eq!(amounts(&events), vec![1, 2, 3, 6]);
    assert!(
        results[0].as_ref().unwrap().position < results[1].as_ref().unwrap().position,
        "in the order given"
    );
    assert!(
        results[3].as_ref().unwrap().position < results[5].as_ref().unwrap().position,
        "in the order given"
    );
    assert_eq!(read(&store, &b).await.len(), 1);
    assert!(store.append_each(Vec::new()).await.is_empty());
}

/// A store whose `append` and `append_if` go through the `append_each` of
/// the one it wraps, an append a call, so that the whole suite runs
/// through a backend's batch path (a gRPC append stream, `POST /appends`).
pub struct ThroughAppendEach(pub Store);

#[async_trait::async_trait]
impl EventStore for ThroughAppendEach {
    async fn append(
        &self,
        stream: &str,
        expected: ExpectedVersion,
        events: Vec<NewEvent>,
    ) -> Result<AppendResult> {
        self.0
            .append_each(vec![Append::new(stream, expected, events)])
            .await
            .pop()
            .expect("one answer")
    }
    async fn append_if(
        &self,
        stream: &str,
        expected: ExpectedVersion,
        events: Vec<NewEvent>,
        condition: AppendCondition,
    ) -> Result<AppendResult> {
        self.0
            .append_each(vec![Append::new(stream, expected, events).with_condition(condition)])
            .await
            .pop()
            .expect("one answer")
    }
    async fn append_each(&self, appends: Vec<Append>) -> Vec<Result<AppendResult>> {
        self.0.append_each(appends).await
    }
    async fn read_query(
        &self,
        query: &Query,
        options: ReadAllOptions,
    ) -> Result<Vec<RecordedEvent>> {
        self.0.read_query(query, options).await
    }
    async fn read_stream(
        &self,
        stream: &str,
        options: ReadStreamOptions,
    ) -> Result<Vec<RecordedEvent>> {
        self.0.read_stream(stream, options).await
    }
    async fn read_all(&self, options: ReadAllOptions) -> Result<Vec<RecordedEvent>> {
        self.0.read_all(options).await
    }
    async fn stream_info(&self, stream: &str) -> Result<StreamInfo> {
        self.0.stream_info(stream).await
    }
    async fn list_streams(&self, prefix: &str, limit: usize) -> Result<Vec<StreamInfo>> {
        self.0.list_streams(prefix, limit).await
    }
    async fn set_stream_metadata(
        &self,
        stream: &str,
        metadata: StreamMetadata,
    ) -> Result<AppendResult> {
        self.0.set_stream_metadata(stream, metadata).await
    }
    async fn delete_stream(
        &self,
        stream: &str,
        expected: ExpectedVersion,
        hard: bool,
    ) -> Result<AppendResult> {
        self.0.delete_stream(stream, expected, hard).await
    }
    async fn subscribe(&self, target: SubscriptionTarget, from: StartFrom) -> Result<Subscription> {
        self.0.subscribe(target, from).await
    }
    async fn health(&self) -> Result<()> {
        self.0.health().await
    }
    async fn head_position(&self) -> Result<Position> {
        self.0.head_position().await
    }
    async fn last_position(&self) -> Result<Option<Position>> {
        self.0.last_position().await
    }
}

/// Instantiates every conformance test for a backend: `$make` is an expression
/// giving `(Arc<dyn EventStore>, guard)`.
#[macro_export]
macro_rules! conformance_suite {
    ($make:expr) => {
        $crate::conformance_suite!(@tests $make;
            versions_count_events, expected_version_rules, failed_batch_writes_nothing,
            event_fields_round_trip, idempotent_retry, concurrent_retries_write_once,
            read_stream_directions_and_limits, read_all_in_global_order, read_all_pages_with_after, invalid_stream_names,
            oversize_event_rejected, metadata_max_count_and_truncate_before, metadata_max_age,
            soft_delete, hard_delete, list_streams_and_info,
            concurrent_same_expected_version_one_wins, concurrent_appends_keep_streams_gap_free,
            subscribe_stream_catch_up_then_live, subscribe_stream_before_it_exists,
            subscribe_all_catch_up_then_live, system_streams_are_read_only,
            query_reads_matching_events_in_order, query_all_matches_every_user_event,
            invalid_queries_and_tags_rejected, append_condition_after_what_was_read_succeeds,
            append_condition_fails_on_a_later_match, append_condition_ignores_events_that_do_not_match,
            append_condition_without_after, append_if_checks_expected_version_too,
            concurrent_conditional_appends_one_wins, subscribe_query_catch_up_then_live,
            category_reads_in_order, category_combines_with_types_tags_and_conditions, invalid_categories_rejected,
            subscribe_category_catch_up_then_live, subscribe_category_resumes_after_a_checkpoint,
            subscription_filter_applies_a_predicate, json_payloads_readers_cannot_parse_rejected,
            names_with_control_or_invisible_characters_rejected, subscribe_stream_after_the_largest_version_delivers_nothing,
            reused_id_with_other_content_conflicts, retry_after_soft_delete_conflicts, huge_max_age_hides_nothing,
            append_each_applies_in_order_each_on_its_own, checkpoint_streams_stay_bounded);
    };
    (@tests $make:expr; $($name:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                let (store, _guard) = $make;
                $crate::conformance::$name(store).await;
            }
        )*
    };
}
