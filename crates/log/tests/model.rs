//! Model-based test: random sequences of operations run against the embedded
//! store and against a plain in-memory model of the `EventStore` contract;
//! results and error kinds must agree after every step, and the whole visible
//! state (stream infos, listings, system streams, `$all`) is compared too.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use bytes::Bytes;
use cairn_core::{
    AppendResult, EventStore, ExpectedVersion, NewEvent, Position, ReadAllOptions,
    ReadStreamOptions, RecordedEvent, StoreError, StreamMetadata, StreamState,
};
use cairn_log::{EmbeddedStore, Options};
use proptest::prelude::*;
use uuid::Uuid;

const STREAMS: [&str; 4] = ["acct-0", "acct-1", "acct-2", "acct-3"];
const EVENT_TYPE: &str = "Deposited";
/// Small segments so that the sequences cross segment boundaries.
const SEGMENT_BYTES: u64 = 8 * 1024;

fn options() -> Options {
    // Index files merged in pairs as soon as there are two: sequences read
    // through merged files, see merges between steps, and damage them.
    Options {
        segment_bytes: SEGMENT_BYTES,
        merge: cairn_log::MergeOptions { fanout: 2, max_segments: 8 },
        summaries_in_memory: 3,
        ..Options::default()
    }
}

// ---------------------------------------------------------------------------
// Operations

#[derive(Debug, Clone)]
enum Exp {
    Any,
    NoStream,
    StreamExists,
    /// Exact(the version the model says is current).
    Current,
    Exact(u64),
}

#[derive(Debug, Clone)]
enum From {
    Start,
    End,
    /// The position of the n-th event of `$all` (modulo its length).
    Event(usize),
    /// One byte past the start of the n-th event: not a valid position.
    Inside(usize),
    /// The store's current head position.
    Head,
    /// A head position the store reported after an earlier step (it stays a
    /// valid place to read from, also after rolls and reopens).
    SavedHead(usize),
}

#[derive(Debug, Clone)]
enum Op {
    /// Append fresh events with these payload sizes.
    Append {
        s: usize,
        exp: Exp,
        sizes: Vec<usize>,
    },
    /// Resend an earlier successful batch unchanged: the original result.
    Retry {
        pick: usize,
        exp: Exp,
    },
    /// Resend an earlier batch to another stream: a conflict (or the original
    /// result if it happens to be the same stream).
    RetryElsewhere {
        pick: usize,
        s: usize,
    },
    /// An earlier batch's first id plus a fresh event: a conflict.
    RetryMixed {
        pick: usize,
    },
    ReadStream {
        s: usize,
        backward: bool,
        from: Option<u64>,
        limit: Option<usize>,
    },
    ReadAll {
        backward: bool,
        from: From,
        limit: Option<usize>,
    },
    Delete {
        s: usize,
        exp: Exp,
        hard: bool,
    },
    SetMetadata {
        s: usize,
        max_count: Option<u64>,
        truncate_before: Option<u64>,
    },
    Reopen,
    /// Close, then delete, damage or drop the snapshot or one index file, and reopen.
    DamageIndex {
        pick: usize,
        how: u8,
    },
}

fn exp() -> impl Strategy<Value = Exp> {
    prop_oneof![
        2 => Just(Exp::Any),
        1 => Just(Exp::NoStream),
        1 => Just(Exp::StreamExists),
        4 => Just(Exp::Current),
        2 => (0u64..6).prop_map(Exp::Exact),
    ]
}

fn from() -> impl Strategy<Value = From> {
    prop_oneof![
        1 => Just(From::Start),
        1 => Just(From::End),
        3 => any::<usize>().prop_map(From::Event),
        1 => any::<usize>().prop_map(From::Inside),
        1 => Just(From::Head),
        2 => any::<usize>().prop_map(From::SavedHead),
    ]
}

fn op() -> impl Strategy<Value = Op> {
    let s = 0..STREAMS.len();
    prop_oneof![
        10 => (s.clone(), exp(), prop::collection::vec(0usize..1200, 1..=3))
            .prop_map(|(s, exp, sizes)| Op::Append { s, exp, sizes }),
        1 => (any::<usize>(), exp()).prop_map(|(pick, exp)| Op::Retry { pick, exp }),
        1 => (any::<usize>(), s.clone()).prop_map(|(pick, s)| Op::RetryElsewhere { pick, s }),
        1 => any::<usize>().prop_map(|pick| Op::RetryMixed { pick }),
        4 => (s.clone(), any::<bool>(), prop::option::of(0u64..9), prop::option::of(0usize..5))
            .prop_map(|(s, backward, from, limit)| Op::ReadStream { s, backward, from, limit }),
        3 => (any::<bool>(), from(), prop::option::of(0usize..6))
            .prop_map(|(backward, from, limit)| Op::ReadAll { backward, from, limit }),
        2 => (s.clone(), exp()).prop_map(|(s, exp)| Op::Delete { s, exp, hard: false }),
        1 => (s.clone(), exp()).prop_map(|(s, exp)| Op::Delete { s, exp, hard: true }),
        3 => (s, prop::option::of(0u64..5), prop::option::of(0u64..9))
            .prop_map(|(s, max_count, truncate_before)| Op::SetMetadata { s, max_count, truncate_before }),
        2 => Just(Op::Reopen),
        2 => (any::<usize>(), 0u8..5).prop_map(|(pick, how)| Op::DamageIndex { pick, how }),
    ]
}

// ---------------------------------------------------------------------------
// The model

/// An event as the model knows it. System events' ids are generated inside the
/// store, so the model does not know them.
#[derive(Debug, Clone)]
struct MEvent {
    stream: String,
    version: u64,
    position: u64,
    event_type: String,
    id: Option<Uuid>,
    data: Option<Bytes>,
}

#[derive(Debug, Clone, Default)]
struct MStream {
    /// Whether the store knows the name at all (stream_info succeeds).
    exists: bool,
    tombstoned: bool,
    deleted: bool,
    metadata: StreamMetadata,
    /// `log` indices of the current incarnation's events; version v at [v-1].
    events: Vec<usize>,
    /// `log` indices of the events of the system stream `$$name`.
    system: Vec<usize>,
}

impl MStream {
    fn version(&self) -> u64 {
        self.events.len() as u64
    }
    fn state(&self) -> StreamState {
        if self.tombstoned {
            StreamState::Tombstoned
        } else if self.deleted {
            StreamState::Deleted
        } else {
            StreamState::Live
        }
    }
}

#[derive(Default)]
struct Model {
    /// `$all`, in order.
    log: Vec<MEvent>,
    streams: HashMap<String, MStream>,
    /// Every successful fresh append: stream, batch, result.
    appends: Vec<(String, Vec<NewEvent>, AppendResult)>,
    /// The store's head after each step.
    heads: Vec<u64>,
    counter: u64,
}

/// What an operation returned, with errors reduced to what the contract fixes.
#[derive(Debug, Clone, PartialEq)]
enum Out<T> {
    Ok(T),
    WrongExpectedVersion(u64),
    StreamNotFound,
    StreamDeleted,
    InvalidArgument,
    IdempotencyConflict,
    InvalidPosition,
}

fn out<T>(r: Result<T, StoreError>) -> Out<T> {
    match r {
        Ok(v) => Out::Ok(v),
        Err(StoreError::WrongExpectedVersion { actual_version, .. }) => {
            Out::WrongExpectedVersion(actual_version)
        }
        Err(StoreError::StreamNotFound { .. }) => Out::StreamNotFound,
        Err(StoreError::StreamDeleted { .. }) => Out::StreamDeleted,
        Err(StoreError::InvalidArgument(_)) => Out::InvalidArgument,
        Err(StoreError::IdempotencyConflict { .. }) => Out::IdempotencyConflict,
        Err(StoreError::InvalidPosition(_)) => Out::InvalidPosition,
        Err(e) => panic!("the store failed: {e}"),
    }
}

impl<T> Out<T> {
    fn map<U>(self, f: impl FnOnce(T) -> U) -> Out<U> {
        match self {
            Out::Ok(v) => Out::Ok(f(v)),
            Out::WrongExpectedVersion(v) => Out::WrongExpectedVersion(v),
            Out::StreamNotFound => Out::StreamNotFound,
            Out::StreamDeleted => Out::StreamDeleted,
            Out::InvalidArgument => Out::InvalidArgument,
            Out::IdempotencyConflict => Out::IdempotencyConflict,
            Out::InvalidPosition => Out::InvalidPosition,
        }
    }
}

/// The fields of an event that the model can predict.
type Seen = (String, u64, u64, String, Option<Uuid>, Option<Bytes>);

fn seen(e: &RecordedEvent, model: &MEvent) -> Seen {
    (
        e.stream.clone(),
        e.version,
        e.position.0,
        e.event_type.clone(),
        model.id.map(|_| e.id),
        model.data.as_ref().map(|_| e.data.clone()),
    )
}

fn expected(m: &MEvent) -> Seen {
    (m.stream.clone(), m.version, m.position, m.event_type.clone(), m.id, m.data.clone())
}

/// On-disk size of a user event of this test (no tags, no metadata), from the
/// record layout in docs/design.md: 12 bytes of framing plus the body.
fn record_len(stream: &str, e: &NewEvent) -> u64 {
    let body = 1
        + 1
        + 8
        + 8
        + 16
        + 4
        + (2 + stream.len())
        + (2 + e.event_type.len())
        + 2
        + 2
        + (4 + e.data.len());
    (body + 12) as u64
}

fn resolve(exp: &Exp, current: u64) -> ExpectedVersion {
    match exp {
        Exp::Any => ExpectedVersion::Any,
        Exp::NoStream => ExpectedVersion::NoStream,
        Exp::StreamExists => ExpectedVersion::StreamExists,
        Exp::Current => ExpectedVersion::Exact(current),
        Exp::Exact(v) => ExpectedVersion::Exact(*v),
    }
}

impl Model {
    fn stream(&self, s: &str) -> MStream {
        self.streams.get(s).cloned().unwrap_or_default()
    }

    fn last_position(&self) -> u64 {
        self.log.last().map_or(0, |e| e.position)
    }

    fn fresh_event(&mut self, size: usize) -> NewEvent {
        self.counter += 1;
        NewEvent::json(EVENT_TYPE, &serde_json::json!({"k": self.counter, "pad": "y".repeat(size)}))
            .unwrap()
    }

    /// Whether the append whose first event is `first` is still part of the
    /// current incarnation of `s` (no delete since).
    fn still_current(&self, s: &str, first: Uuid) -> bool {
        self.stream(s).events.iter().any(|&i| self.log[i].id == Some(first))
    }

    /// What appending fresh events to `s` must give (positions aside).
    fn predict_append(&self, s: &str, expected: ExpectedVersion, n: usize) -> Out<u64> {
        let st = self.stream(s);
        if st.tombstoned {
            Out::StreamDeleted
        } else if !expected.accepts(st.version()) {
            Out::WrongExpectedVersion(st.version())
        } else {
            Out::Ok(st.version() + n as u64)
        }
    }

    /// Records a successful append whose last event is at `result.position`.
    fn apply_append(&mut self, s: &str, events: Vec<NewEvent>, result: AppendResult) {
        let lens: Vec<u64> = events.iter().map(|e| record_len(s, e)).collect();
        let mut position = result.position.0 - lens[..lens.len() - 1].iter().sum::<u64>();
        assert!(position > self.last_position(), "a new append goes after everything before it");
        let st = self.streams.entry(s.to_string()).or_default();
        st.exists = true;
        st.deleted = false;
        let first_version = st.version() + 1;
        for (i, e) in events.iter().enumerate() {
            st.events.push(self.log.len());
            self.log.push(MEvent {
                stream: s.to_string(),
                version: first_version + i as u64,
                position,
                event_type: EVENT_TYPE.to_string(),
                id: Some(e.id),
                data: Some(e.data.clone()),
            });
            position += lens[i];
        }
        self.appends.push((s.to_string(), events, result));
    }

    /// Records an event the store wrote to `$$s`.
    fn apply_system(&mut self, s: &str, event_type: &str, result: AppendResult) {
        assert!(result.position.0 > self.last_position());
        let st = self.streams.entry(s.to_string()).or_default();
        st.exists = true;
        st.system.push(self.log.len());
        assert_eq!(result.next_version, st.system.len() as u64, "system stream version");
        self.log.push(MEvent {
            stream: format!("$${s}"),
            version: result.next_version,
            position: result.position.0,
            event_type: event_type.to_string(),
            id: None,
            data: None,
        });
    }

    fn predict_delete(&self, s: &str, expected: ExpectedVersion, hard: bool) -> Out<u64> {
        let st = self.stream(s);
        if st.tombstoned {
            return Out::StreamDeleted;
        }
        if !hard && (st.deleted || st.version() == 0) {
            return Out::StreamNotFound;
        }
        if !expected.accepts(st.version()) {
            return Out::WrongExpectedVersion(st.version());
        }
        Out::Ok(st.system.len() as u64 + 1)
    }

    fn apply_delete(&mut self, s: &str, hard: bool, result: AppendResult) {
        let st = self.streams.entry(s.to_string()).or_default();
        st.events.clear();
        st.metadata = StreamMetadata::default();
        if hard {
            st.tombstoned = true
        } else {
            st.deleted = true
        }
        self.apply_system(s, if hard { "$tombstone" } else { "$deleted" }, result);
    }

    fn predict_metadata(&self, s: &str, metadata: &StreamMetadata) -> Out<u64> {
        if metadata.max_count == Some(0) {
            return Out::InvalidArgument;
        }
        let st = self.stream(s);
        if st.tombstoned {
            return Out::StreamDeleted;
        }
        Out::Ok(st.system.len() as u64 + 1)
    }

    fn read_stream(&self, s: &str, options: ReadStreamOptions) -> Out<Vec<Seen>> {
        let st = self.stream(s);
        if st.tombstoned {
            return Out::StreamDeleted;
        }
        if st.deleted || st.version() == 0 {
            return Out::StreamNotFound;
        }
        let last = st.version();
        let mut first = st.metadata.truncate_before.unwrap_or(1).max(1);
        if let Some(max_count) = st.metadata.max_count {
            first = first.max(last.saturating_sub(max_count) + 1);
        }
        let versions: Vec<u64> = if options.direction == cairn_core::Direction::Forward {
            (options.from_version.max(first)..=last).take(options.limit).collect()
        } else {
            let from = options.from_version.min(last);
            if from < first { vec![] } else { (first..=from).rev().take(options.limit).collect() }
        };
        Out::Ok(versions.iter().map(|v| expected(&self.log[st.events[*v as usize - 1]])).collect())
    }

    fn read_system(&self, s: &str) -> Out<Vec<Seen>> {
        let st = self.stream(s);
        if st.system.is_empty() {
            return Out::StreamNotFound;
        }
        Out::Ok(st.system.iter().map(|i| expected(&self.log[*i])).collect())
    }

    /// `head` is the store's head position, which the model cannot predict.
    fn read_all(&self, options: ReadAllOptions, head: u64) -> Out<Vec<Seen>> {
        let from = options.from.0;
        let is_event = self.log.iter().any(|e| e.position == from);
        let was_head = self.heads.contains(&from);
        let valid =
            from == 0 || options.from == Position::END || from == head || is_event || was_head;
        if !valid {
            return Out::InvalidPosition;
        }
        let events: Vec<Seen> = if options.direction == cairn_core::Direction::Forward {
            self.log
                .iter()
                .filter(|e| e.position >= from)
                .take(options.limit)
                .map(expected)
                .collect()
        } else {
            self.log
                .iter()
                .rev()
                .filter(|e| e.position <= from)
                .take(options.limit)
                .map(expected)
                .collect()
        };
        Out::Ok(events)
    }
}

// ---------------------------------------------------------------------------
// Running a sequence

fn compare(got: Out<Vec<RecordedEvent>>, want: Out<Vec<Seen>>, model: &Model, what: &str) {
    let by_position: HashMap<u64, &MEvent> = model.log.iter().map(|e| (e.position, e)).collect();
    let got = got.map(|events| {
        events
            .iter()
            .map(|e| match by_position.get(&e.position.0) {
                Some(m) => seen(e, m),
                None => panic!(
                    "{what}: the store returned an event at {} that the model does not know: {e:?}",
                    e.position
                ),
            })
            .collect::<Vec<_>>()
    });
    assert_eq!(got, want, "{what}");
}

/// Compares everything observable about every stream and `$all`.
async fn check_state(store: &EmbeddedStore, model: &Model, step: &str) {
    for s in STREAMS {
        let st = model.stream(s);
        let info = out(store.stream_info(s).await);
        if !st.exists {
            assert_eq!(info.map(|_| ()), Out::StreamNotFound, "{step}: stream_info({s})");
        } else {
            let Out::Ok(info) = info else { panic!("{step}: stream_info({s}) = {info:?}") };
            assert_eq!(info.version, st.version(), "{step}: version of {s}");
            assert_eq!(info.state, st.state(), "{step}: state of {s}");
            assert_eq!(info.metadata, st.metadata, "{step}: metadata of {s}");
            assert_eq!(
                info.last_position.map(|p| p.0),
                st.events.last().map(|i| model.log[*i].position),
                "{step}: last position of {s}"
            );
        }
        compare(
            out(store.read_stream(s, ReadStreamOptions::forward()).await),
            model.read_stream(s, ReadStreamOptions::forward()),
            model,
            &format!("{step}: read {s}"),
        );
        compare(
            out(store.read_stream(&format!("$${s}"), ReadStreamOptions::forward()).await),
            model.read_system(s),
            model,
            &format!("{step}: read $${s}"),
        );
    }
    let listed: BTreeMap<String, u64> = store
        .list_streams("", usize::MAX)
        .await
        .unwrap()
        .into_iter()
        .map(|i| (i.stream, i.version))
        .collect();
    let want: BTreeMap<String, u64> = model
        .streams
        .iter()
        .filter(|(_, st)| st.exists)
        .map(|(n, st)| (n.clone(), st.version()))
        .collect();
    assert_eq!(listed, want, "{step}: list_streams");
    let head = store.head_position().await.unwrap().0;
    assert!(head > model.last_position(), "{step}: the head is past every event");
    let all = store.read_all(ReadAllOptions::forward()).await.unwrap();
    compare(
        Out::Ok(all.clone()),
        model.read_all(ReadAllOptions::forward(), head),
        model,
        &format!("{step}: read_all"),
    );
    assert!(
        all.windows(2).all(|w| w[0].timestamp <= w[1].timestamp),
        "{step}: timestamps never decrease in the log"
    );
    let back = store.read_all(ReadAllOptions::backward()).await.unwrap();
    assert!(
        back.iter().rev().map(|e| e.position).eq(all.iter().map(|e| e.position)),
        "{step}: backward $all is forward reversed"
    );
}

async fn run(dir: &Path, ops: Vec<Op>) {
    let mut store = EmbeddedStore::open_with(dir, options()).unwrap();
    let mut model = Model::default();
    for (i, op) in ops.iter().enumerate() {
        let step = format!("step {i} {op:?}");
        match op {
            Op::Append { s, exp, sizes } => {
                let s = STREAMS[*s];
                let expected = resolve(exp, model.stream(s).version());
                let events: Vec<NewEvent> = sizes.iter().map(|n| model.fresh_event(*n)).collect();
                let want = model.predict_append(s, expected, events.len());
                let got = out(store.append(s, expected, events.clone()).await);
                assert_eq!(got.clone().map(|r| r.next_version), want, "{step} ({expected:?})");
                if let Out::Ok(result) = got {
                    model.apply_append(s, events, result);
                }
            }
            Op::Retry { pick, exp } => {
                if model.appends.is_empty() {
                    continue;
                }
                let (s, events, original) = model.appends[pick % model.appends.len()].clone();
                let expected = resolve(exp, model.stream(&s).version());
                let current = model.still_current(&s, events[0].id);
                let got = out(store.append(&s, expected, events).await);
                if current {
                    assert_eq!(
                        got,
                        Out::Ok(original),
                        "{step}: a retry returns the original result, whatever was appended since"
                    );
                } else {
                    assert_eq!(
                        got,
                        Out::IdempotencyConflict,
                        "{step}: a retry of an append the stream lost to a delete since"
                    );
                }
            }
            Op::RetryElsewhere { pick, s } => {
                if model.appends.is_empty() {
                    continue;
                }
                let (orig, events, original) = model.appends[pick % model.appends.len()].clone();
                let s = STREAMS[*s];
                let want = if s == orig && model.still_current(s, events[0].id) {
                    Out::Ok(original)
                } else {
                    Out::IdempotencyConflict
                };
                let got = out(store.append(s, ExpectedVersion::Any, events).await);
                assert_eq!(got, want, "{step}");
            }
            Op::RetryMixed { pick } => {
                if model.appends.is_empty() {
                    continue;
                }
                let (s, events, _) = model.appends[pick % model.appends.len()].clone();
                let batch = vec![events[0].clone(), model.fresh_event(1)];
                let got = out(store.append(&s, ExpectedVersion::Any, batch).await);
                assert_eq!(got, Out::IdempotencyConflict, "{step}");
            }
            Op::ReadStream { s, backward, from, limit } => {
                let s = STREAMS[*s];
                let mut options = if *backward {
                    ReadStreamOptions::backward()
                } else {
                    ReadStreamOptions::forward()
                };
                if let Some(from) = from {
                    options = options.from_version(*from);
                }
                if let Some(limit) = limit {
                    options = options.limit(*limit);
                }
                compare(
                    out(store.read_stream(s, options).await),
                    model.read_stream(s, options),
                    &model,
                    &step,
                );
            }
            Op::ReadAll { backward, from, limit } => {
                let mut options =
                    if *backward { ReadAllOptions::backward() } else { ReadAllOptions::forward() };
                let n = model.log.len().max(1);
                let position = match from {
                    From::Start => Position::START,
                    From::End => Position::END,
                    From::Event(k) => {
                        model.log.get(k % n).map_or(Position::START, |e| Position(e.position))
                    }
                    From::Inside(k) => {
                        model.log.get(k % n).map_or(Position::START, |e| Position(e.position + 1))
                    }
                    From::Head => store.head_position().await.unwrap(),
                    From::SavedHead(k) => Position(
                        model.heads.get(k % model.heads.len().max(1)).copied().unwrap_or(0),
                    ),
                };
                options = options.from(position);
                if let Some(limit) = limit {
                    options = options.limit(*limit);
                }
                let head = store.head_position().await.unwrap().0;
                compare(
                    out(store.read_all(options).await),
                    model.read_all(options, head),
                    &model,
                    &format!("{step} at {position}"),
                );
            }
            Op::Delete { s, exp, hard } => {
                let s = STREAMS[*s];
                let expected = resolve(exp, model.stream(s).version());
                let want = model.predict_delete(s, expected, *hard);
                let got = out(store.delete_stream(s, expected, *hard).await);
                assert_eq!(got.clone().map(|r| r.next_version), want, "{step} ({expected:?})");
                if let Out::Ok(result) = got {
                    model.apply_delete(s, *hard, result);
                }
            }
            Op::SetMetadata { s, max_count, truncate_before } => {
                let s = STREAMS[*s];
                let metadata = StreamMetadata {
                    max_count: *max_count,
                    truncate_before: *truncate_before,
                    max_age_secs: None,
                };
                let want = model.predict_metadata(s, &metadata);
                let got = out(store.set_stream_metadata(s, metadata.clone()).await);
                assert_eq!(got.clone().map(|r| r.next_version), want, "{step}");
                if let Out::Ok(result) = got {
                    model.streams.entry(s.to_string()).or_default().metadata = metadata;
                    model.apply_system(s, "$metadata", result);
                }
            }
            Op::DamageIndex { pick, how } => {
                drop(store);
                // Segments' own index files, merged ones, and stream tables.
                let mut files: Vec<_> = std::fs::read_dir(dir.join("log"))
                    .unwrap()
                    .map(|e| e.unwrap().path())
                    .filter(|p| p.extension().is_some_and(|x| x == "idx"))
                    .collect();
                files.sort();
                files.extend(crate::common::stream_tables(dir));
                if let Some(file) = files.get(pick % files.len().max(1)) {
                    let mut bytes = std::fs::read(file).unwrap();
                    let at = pick % bytes.len();
                    match how {
                        0 => std::fs::remove_file(file).unwrap(),
                        1 => {
                            bytes[at] ^= 1;
                            std::fs::write(file, &bytes).unwrap()
                        }
                        2 => std::fs::write(file, &bytes[..at]).unwrap(),
                        3 => crate::common::remove_stream_tables(dir),
                        _ => {
                            bytes[at.max(256)..].iter_mut().for_each(|b| *b = 0);
                            std::fs::write(file, &bytes).unwrap()
                        }
                    }
                }
                store = crate::common::reopen(dir, options()).unwrap();
                assert_eq!(
                    store.open_report().events,
                    model.log.len() as u64,
                    "{step}: every event is found again"
                );
            }
            Op::Reopen => {
                drop(store);
                store = crate::common::reopen(dir, options()).unwrap();
                let report = store.open_report();
                assert_eq!(
                    report.truncated_bytes, 0,
                    "{step}: a clean close leaves nothing to cut"
                );
                assert_eq!(report.truncated_at, None, "{step}");
                assert_eq!(
                    report.events,
                    model.log.len() as u64,
                    "{step}: every event is found again"
                );
            }
        }
        check_state(&store, &model, &step).await;
        model.heads.push(store.head_position().await.unwrap().0);
    }
    // Finally, from the log alone: no stream table, a full rebuild.
    drop(store);
    crate::common::remove_stream_tables(dir);
    let store = crate::common::reopen(dir, options()).unwrap();
    assert!(!store.open_report().from_snapshot);
    check_state(&store, &model, "after a rebuild from the log").await;
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 32, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn store_matches_model(ops in prop::collection::vec(op(), 5..=40)) {
        let dir = tempfile::tempdir().unwrap();
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(run(dir.path(), ops));
    }
}

// ---------------------------------------------------------------------------
// Edge cases the random sequences rarely reach.

fn sized(size: usize) -> NewEvent {
    NewEvent::json(EVENT_TYPE, &serde_json::json!({"pad": "y".repeat(size)})).unwrap()
}

/// A retry returns the original result only if the batch is exactly one
/// earlier append; a part of it (a suffix ends an append too) is a conflict,
/// also when the original is in the same group commit or in the snapshot.
#[tokio::test]
async fn resending_part_of_a_batch_is_a_conflict() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = EmbeddedStore::open_with(dir.path(), options()).unwrap();
    let batch = vec![sized(1), sized(2), sized(3)];
    let first = store.append("a", ExpectedVersion::NoStream, batch.clone()).await.unwrap();
    for round in 0..2 {
        for part in [&batch[2..], &batch[1..], &batch[..2], &batch[..1], &batch[1..2]] {
            let got = store.append("a", ExpectedVersion::Any, part.to_vec()).await;
            assert!(
                matches!(got, Err(StoreError::IdempotencyConflict { .. })),
                "round {round}: a part of a batch is not a retry of it: got {got:?}"
            );
        }
        assert_eq!(
            store.append("a", ExpectedVersion::Exact(7), batch.clone()).await.unwrap(),
            first
        );
        assert_eq!(store.read_stream("a", ReadStreamOptions::forward()).await.unwrap().len(), 3);
        drop(store);
        store = crate::common::reopen(dir.path(), options()).unwrap();
    }
}

// ---------------------------------------------------------------------------
// A saved head at a segment boundary

/// The contract (`ReadAllOptions::from`): the head is a valid position to
/// read `$all` from and to subscribe after. When an append that needs a new
/// segment is rejected, the writer has already rolled, so the head sits at
/// the new segment's base, a header byte; the next event goes 24 bytes later.
/// That saved head must stay valid.
#[tokio::test]
async fn saved_head_stays_a_valid_read_position() {
    let dir = tempfile::tempdir().unwrap();
    let store = EmbeddedStore::open_with(dir.path(), options()).unwrap();
    let mut version = 0;
    while store.head_position().await.unwrap().0 + 3000 < SEGMENT_BYTES {
        version = store
            .append("a", ExpectedVersion::Exact(version), vec![sized(1000)])
            .await
            .unwrap()
            .next_version;
    }
    // Does not fit in the segment, and is rejected.
    let rejected = store.append("a", ExpectedVersion::Exact(version + 1), vec![sized(3000)]).await;
    assert!(matches!(rejected, Err(StoreError::WrongExpectedVersion { .. })));
    let head = store.head_position().await.unwrap();
    assert!(store.read_all(ReadAllOptions::forward().from(head)).await.unwrap().is_empty());
    let r = store.append("a", ExpectedVersion::Exact(version), vec![sized(10)]).await.unwrap();
    let after = store.read_all(ReadAllOptions::forward().from(head)).await;
    assert_eq!(
        after.map(|v| v.iter().map(|e| e.position).collect::<Vec<_>>()).ok(),
        Some(vec![r.position]),
        "reading $all from a head saved before the append returns the append (head was {head})"
    );
    let sub = store
        .subscribe(cairn_core::SubscriptionTarget::All, cairn_core::StartFrom::After(head.0))
        .await;
    assert!(sub.is_ok(), "subscribing after a saved head: {:?}", sub.err());
}
