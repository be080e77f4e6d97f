//! Crash safety by really killing a process. `kill_and_recover` runs this test
//! binary again as a child that executes only `child_writer`: it appends in a
//! loop and prints one line per acknowledged append. The parent SIGKILLs it at
//! a random moment, reopens the data directory and checks that every
//! acknowledged event is there, where and as it was acknowledged, and that the
//! store is consistent and writable; then starts the next child on the same
//! directory.
//!
//! Replay a run with `CAIRN_CRASH_SEED=<seed printed by the test>`.

use std::collections::{BTreeMap, HashMap};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use cairn_core::{
    EventStore, ExpectedVersion, NewEvent, Query, ReadAllOptions, ReadStreamOptions, RecordedEvent,
    StoreError,
};
use cairn_log::{EmbeddedStore, Options};
use uuid::Uuid;

use crate::common::{Rng, segment_files};

const DIR_VAR: &str = "CAIRN_CRASH_DIR";
const SEED_VAR: &str = "CAIRN_CRASH_SEED";
const CYCLES: usize = 50;
/// Writer tasks in the child; each owns its streams, so it knows their versions.
const TASKS: u64 = 4;
const STREAMS_PER_TASK: u64 = 3;
const EVENT_TYPE: &str = "CrashTested";

fn options() -> Options {
    // Small segments, so that the children seal segments and write index
    // files and stream tables (flushed every few streams) while being killed, and most reads cross index
    // files; index files are merged in pairs, so kills land in merges too.
    Options {
        segment_bytes: 64 * 1024,
        merge: cairn_log::MergeOptions { fanout: 2, max_segments: 16 },
        summaries_in_memory: 4,
        ..Options::default()
    }
}

/// The payload of event `id`, recomputed by the parent to check the bytes.
fn payload(id: Uuid) -> String {
    let pad = (id.as_u128() % 700) as usize;
    format!(r#"{{"id":"{id}","pad":"{}"}}"#, "z".repeat(pad))
}

fn tag(id: Uuid) -> String {
    format!("t:{}", id.as_u128() % 3)
}

/// The event with id `id`: the same content each time, so that it can be retried.
fn event(id: Uuid) -> NewEvent {
    NewEvent::json_bytes(EVENT_TYPE, payload(id)).with_id(id).with_tags([tag(id)])
}

fn new_event() -> NewEvent {
    event(Uuid::new_v4())
}

/// One acknowledged append, as the child reported it.
#[derive(Debug, Clone)]
struct Ack {
    stream: String,
    next_version: u64,
    position: u64,
    ids: Vec<Uuid>,
}

impl Ack {
    fn line(&self) -> String {
        let ids: Vec<String> = self.ids.iter().map(Uuid::to_string).collect();
        format!("ACK {} {} {} {}\n", self.stream, self.next_version, self.position, ids.join(","))
    }

    fn parse(line: &str) -> Option<Ack> {
        let mut parts = line.strip_prefix("ACK ")?.trim_end().split(' ');
        let ack = Ack {
            stream: parts.next()?.to_string(),
            next_version: parts.next()?.parse().ok()?,
            position: parts.next()?.parse().ok()?,
            ids: parts.next()?.split(',').map(|s| s.parse().ok()).collect::<Option<_>>()?,
        };
        parts.next().is_none().then_some(ack)
    }
}

// ---------------------------------------------------------------------------
// The child

/// Prints a line and flushes it before the next append starts.
fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    out.write_all(line.as_bytes()).unwrap();
    out.flush().unwrap();
}

#[test]
#[ignore = "runs only as the child process of crash::kill_and_recover"]
fn child_writer() {
    let Some(dir) = std::env::var_os(DIR_VAR) else { return };
    let seed: u64 = std::env::var(SEED_VAR).ok().and_then(|s| s.parse().ok()).unwrap_or(1);
    // Any failure in any task ends the process at once, so the parent sees it.
    std::panic::set_hook(Box::new(|info| {
        eprintln!("child_writer failed: {info}");
        std::process::exit(101);
    }));
    let rt =
        tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    rt.block_on(async move {
        let store = EmbeddedStore::open_with(&dir, options()).expect("child: open");
        // On a line of its own: the harness has printed "test crash::child_writer ... ".
        say("\nREADY\n");
        let tasks: Vec<_> = (0..TASKS)
            .map(|t| tokio::spawn(write_forever(store.clone(), t, seed ^ (t << 56))))
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
    });
}

async fn write_forever(store: EmbeddedStore, task: u64, seed: u64) {
    let mut rng = Rng(seed);
    let names: Vec<String> = (0..STREAMS_PER_TASK).map(|k| format!("crash-{task}-{k}")).collect();
    let mut versions = Vec::new();
    for name in &names {
        versions.push(match store.stream_info(name).await {
            Ok(info) => info.version,
            Err(StoreError::StreamNotFound { .. }) => 0,
            Err(e) => panic!("child: stream_info: {e}"),
        });
    }
    loop {
        let k = rng.range(0, STREAMS_PER_TASK - 1) as usize;
        let n = if rng.range(0, 9) < 6 { 1 } else { rng.range(2, 4) };
        let events: Vec<NewEvent> = (0..n).map(|_| new_event()).collect();
        // Exact expected versions: a version the store lost or invented would fail here.
        let r = store
            .append(&names[k], ExpectedVersion::Exact(versions[k]), events.clone())
            .await
            .expect("child: append");
        assert_eq!(r.next_version, versions[k] + n);
        versions[k] = r.next_version;
        let ids = events.iter().map(|e| e.id).collect();
        say(&Ack {
            stream: names[k].clone(),
            next_version: r.next_version,
            position: r.position.0,
            ids,
        }
        .line());
        if rng.range(0, 19) == 0 {
            let again =
                store.append(&names[k], ExpectedVersion::Any, events).await.expect("child: retry");
            assert_eq!(again, r, "an idempotent retry returns the original result");
        }
        // Paced, so that the amount of data (and the checking time) does not
        // depend on how fast the disk syncs; the tasks still meet in groups.
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

// ---------------------------------------------------------------------------
// The parent

enum Line {
    Ready,
    Ack(Ack),
}

/// Reads the child's stdout until it closes; only whole lines count (a line
/// cut by the kill was never fully reported).
fn read_lines(stdout: impl Read, tx: mpsc::Sender<Line>) {
    let mut reader = BufReader::new(stdout);
    let mut line = String::new();
    loop {
        line.clear();
        match reader.read_line(&mut line) {
            Ok(0) | Err(_) => return,
            Ok(_) if !line.ends_with('\n') => return,
            Ok(_) => {}
        }
        let msg = if line == "READY\n" {
            Line::Ready
        } else if line.starts_with("ACK ") {
            Line::Ack(
                Ack::parse(&line).unwrap_or_else(|| panic!("bad line from the child: {line:?}")),
            )
        } else {
            continue; // the test harness's own output
        };
        if tx.send(msg).is_err() {
            return;
        }
    }
}

#[derive(Default, Debug)]
struct Totals {
    acked_appends: usize,
    acked_events: usize,
    unacked_but_kept: u64,
    truncated_opens: usize,
    truncated_bytes: u64,
    killed_before_ready: usize,
    /// Opens that took the stream summaries from stream tables.
    opens_from_tables: usize,
}

#[test]
fn kill_and_recover() {
    let seed = std::env::var(SEED_VAR)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| Rng::from_entropy().next_u64());
    eprintln!("crash::kill_and_recover seed {seed} (set {SEED_VAR} to replay)");
    let mut rng = Rng(seed);
    let dir = tempfile::tempdir().unwrap();
    let exe = std::env::current_exe().unwrap();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let started = Instant::now();
    let mut acked: Vec<Ack> = Vec::new();
    let mut totals = Totals::default();

    for cycle in 0..CYCLES {
        let mut child = Command::new(&exe)
            .args([
                "crash::child_writer",
                "--exact",
                "--nocapture",
                "--ignored",
                "--test-threads=1",
            ])
            .env(DIR_VAR, dir.path())
            .env(SEED_VAR, rng.next_u64().to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn the child");
        let (tx, rx) = mpsc::channel();
        let stdout = child.stdout.take().unwrap();
        let reader = std::thread::spawn(move || read_lines(stdout, tx));
        let mut stderr = child.stderr.take().unwrap();
        let errors = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = stderr.read_to_string(&mut s);
            s
        });
        let mut lines = Vec::new();
        // Every fifth child is killed at a moment counted from its start, so
        // some kills land while it opens (and recovers) the store.
        let from_start = cycle % 5 == 4;
        if !from_start {
            let deadline = Instant::now() + Duration::from_secs(20);
            loop {
                match rx.recv_timeout(Duration::from_millis(10)) {
                    Ok(Line::Ready) => break,
                    Ok(line) => lines.push(line),
                    Err(_) if Instant::now() > deadline => {
                        panic!("cycle {cycle}: the child did not open the store within 20 s")
                    }
                    Err(_) => {
                        if let Some(status) = child.try_wait().unwrap() {
                            panic!(
                                "cycle {cycle}: the child exited before opening the store ({status}):\n{}",
                                errors.join().unwrap()
                            );
                        }
                    }
                }
            }
        }
        std::thread::sleep(Duration::from_millis(rng.range(20, 300)));
        if let Some(status) = child.try_wait().unwrap() {
            panic!(
                "cycle {cycle}: the child stopped on its own ({status}):\n{}",
                errors.join().unwrap()
            );
        }
        child.kill().unwrap(); // SIGKILL
        let status = child.wait().unwrap(); // dead, so its LOCK is released
        assert_eq!(status.signal(), Some(9), "cycle {cycle}: the child died of SIGKILL");
        reader.join().unwrap();
        let stderr = errors.join().unwrap();
        lines.extend(rx.try_iter());
        let mut ready = !from_start;
        for line in lines {
            match line {
                Line::Ready => ready = true,
                Line::Ack(ack) => {
                    totals.acked_appends += 1;
                    totals.acked_events += ack.ids.len();
                    acked.push(ack);
                }
            }
        }
        if !ready {
            totals.killed_before_ready += 1;
        }
        rt.block_on(check_after_crash(dir.path(), cycle, &mut acked, &mut totals, &stderr));
    }

    let report = cairn_log::verify(dir.path(), |_, _| {}).expect("verify after the last cycle");
    assert_eq!(report.torn_tail, None);
    let segments = segment_files(dir.path()).len();
    let merged = std::fs::read_dir(dir.path().join("log"))
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .file_name()
                .to_str()
                .is_some_and(|n| n.ends_with(".idx") && n.contains('-'))
        })
        .count();
    eprintln!(
        "crash::kill_and_recover: {CYCLES} kills in {:.1?}, {segments} segments, {merged} merged index files, {report:?}, {totals:?}",
        started.elapsed()
    );
    assert!(merged > 0, "the children merged index files between kills");
    assert!(
        totals.opens_from_tables > CYCLES / 2 && report.stream_tables > 0,
        "opens start from stream tables: {totals:?} {report:?}"
    );
    assert!(
        totals.acked_appends >= 10 * CYCLES,
        "too few acknowledged appends to mean anything: {totals:?}"
    );
}

/// Opens the store after a kill and checks it against everything acknowledged.
async fn check_after_crash(
    dir: &Path,
    cycle: usize,
    acked: &mut Vec<Ack>,
    totals: &mut Totals,
    stderr: &str,
) {
    let store = EmbeddedStore::open_with(dir, options()).unwrap_or_else(|e| {
        panic!("cycle {cycle}: the store does not open after a kill: {e}\nchild stderr:\n{stderr}")
    });
    let report = store.open_report().clone();
    totals.opens_from_tables += usize::from(report.stream_tables > 0);
    if report.truncated_bytes > 0 {
        totals.truncated_opens += 1;
        totals.truncated_bytes += report.truncated_bytes;
    }

    // $all: strictly increasing positions, never decreasing timestamps, the
    // same backwards, every event once.
    let all = store.read_all(ReadAllOptions::forward()).await.expect("read_all");
    assert_eq!(all.len() as u64, report.events, "cycle {cycle}: $all holds every event");
    assert!(
        all.windows(2).all(|w| w[0].position < w[1].position),
        "cycle {cycle}: $all positions strictly increase"
    );
    assert!(
        all.windows(2).all(|w| w[0].timestamp <= w[1].timestamp),
        "cycle {cycle}: timestamps never decrease"
    );
    let back = store.read_all(ReadAllOptions::backward()).await.expect("read_all backward");
    assert!(
        back.iter().rev().map(|e| e.position).eq(all.iter().map(|e| e.position)),
        "cycle {cycle}: backward $all"
    );

    // Every stream: versions 1..=n, gap-free, the same in $all and in the stream.
    let mut streams: BTreeMap<&str, Vec<&RecordedEvent>> = BTreeMap::new();
    for e in &all {
        assert_eq!(e.event_type, EVENT_TYPE);
        assert_eq!(e.data, payload(e.id).as_bytes(), "cycle {cycle}: payload of {}", e.id);
        streams.entry(e.stream.as_str()).or_default().push(e);
    }
    let listed: Vec<String> =
        store.list_streams("", usize::MAX).await.unwrap().into_iter().map(|i| i.stream).collect();
    assert_eq!(
        listed,
        streams.keys().map(|s| s.to_string()).collect::<Vec<_>>(),
        "cycle {cycle}: list_streams"
    );
    for (name, in_all) in &streams {
        let versions: Vec<u64> = in_all.iter().map(|e| e.version).collect();
        assert!(
            versions.iter().copied().eq(1..=versions.len() as u64),
            "cycle {cycle}: {name} has versions {versions:?}"
        );
        let read =
            store.read_stream(name, ReadStreamOptions::forward()).await.expect("read_stream");
        assert!(
            read.iter().eq(in_all.iter().copied()),
            "cycle {cycle}: read_stream({name}) differs from $all"
        );
        let info = store.stream_info(name).await.unwrap();
        assert_eq!(info.version, read.len() as u64);
        assert_eq!(info.last_position, read.last().map(|e| e.position));
    }

    // Every acknowledged append: its events, in order, at the versions and
    // position that were acknowledged.
    let by_id: HashMap<Uuid, &RecordedEvent> = all.iter().map(|e| (e.id, e)).collect();
    let mut acked_ids = 0u64;
    for ack in acked.iter() {
        let n = ack.ids.len() as u64;
        for (i, id) in ack.ids.iter().enumerate() {
            let e = by_id.get(id).unwrap_or_else(|| {
                panic!("cycle {cycle}: acknowledged event {id} of {ack:?} is lost")
            });
            assert_eq!(e.stream, ack.stream, "cycle {cycle}: {id}");
            assert_eq!(
                e.version,
                ack.next_version + 1 - n + i as u64,
                "cycle {cycle}: version of {id} in {ack:?}"
            );
            if i as u64 + 1 == n {
                assert_eq!(
                    e.position.0, ack.position,
                    "cycle {cycle}: position of {id} in {ack:?}"
                );
            }
            acked_ids += 1;
        }
    }
    totals.unacked_but_kept = report.events - acked_ids;

    // Queries answer what a full scan of $all says, forward and backward.
    for k in 0..3 {
        let t = format!("t:{k}");
        let want: Vec<u64> =
            all.iter().filter(|e| e.tags.contains(&t)).map(|e| e.position.0).collect();
        let got =
            store.read_query(&Query::tags([t.clone()]), ReadAllOptions::forward()).await.unwrap();
        assert!(
            got.iter().map(|e| e.position.0).eq(want.iter().copied()),
            "cycle {cycle}: query {t}"
        );
        let back =
            store.read_query(&Query::tags([t.clone()]), ReadAllOptions::backward()).await.unwrap();
        assert!(
            back.iter().rev().map(|e| e.position.0).eq(want.iter().copied()),
            "cycle {cycle}: query {t} backward"
        );
    }
    let typed =
        store.read_query(&Query::types([EVENT_TYPE]), ReadAllOptions::forward()).await.unwrap();
    assert_eq!(typed.len(), all.len(), "cycle {cycle}: every event has the type");
    assert_eq!(
        store.read_category("crash", ReadAllOptions::forward()).await.unwrap().len(),
        all.len(),
        "cycle {cycle}: category"
    );

    // Idempotent retries of acknowledged appends (a sample) return what was acknowledged.
    for k in 0..20 {
        let Some(ack) = acked.get((cycle * 7919 + k * 104_729) % acked.len().max(1)) else { break };
        let events = ack.ids.iter().map(|id| event(*id)).collect();
        let again = store
            .append(&ack.stream, ExpectedVersion::Any, events)
            .await
            .unwrap_or_else(|e| panic!("cycle {cycle}: retry of {ack:?}: {e}"));
        assert_eq!(
            (again.next_version, again.position.0),
            (ack.next_version, ack.position),
            "cycle {cycle}: retry of {ack:?}"
        );
    }

    // The store takes a new append, and it reads back.
    let name = "crash-parent";
    let version = match store.stream_info(name).await {
        Ok(info) => info.version,
        Err(StoreError::StreamNotFound { .. }) => 0,
        Err(e) => panic!("{e}"),
    };
    let event = new_event();
    let id = event.id;
    let r = store
        .append(name, ExpectedVersion::Exact(version), vec![event])
        .await
        .unwrap_or_else(|e| panic!("cycle {cycle}: append after recovery: {e}"));
    assert_eq!(r.next_version, version + 1);
    assert!(all.last().is_none_or(|e| r.position > e.position));
    let last = store.read_stream(name, ReadStreamOptions::backward().limit(1)).await.unwrap();
    assert_eq!((last[0].id, last[0].position), (id, r.position));
    acked.push(Ack {
        stream: name.to_string(),
        next_version: r.next_version,
        position: r.position.0,
        ids: vec![id],
    });
    drop(store); // releases the LOCK before the next child starts
}
