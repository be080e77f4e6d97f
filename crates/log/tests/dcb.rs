//! Tags, queries and append conditions on the embedded engine.
//!
//! - A model-based property test: random histories of tagged appends,
//!   conditional appends, metadata changes, deletes and reopens (from the
//!   snapshot, rebuilt from the log alone, and after `reindex`); every query
//!   read (tags, types, categories), every category read and every
//!   condition's outcome must agree with `Query::matches` applied to the log.
//! - The course race: 32 tasks subscribe students to a course of capacity 30
//!   with conditional appends; exactly 30 succeed, every time, over 100 rounds.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use cairn_core::{
    AppendCondition, Direction, EventStore, ExpectedVersion, NewEvent, Position, Query, QueryItem,
    ReadAllOptions, RecordedEvent, StartFrom, StoreError, StreamMetadata, SubscriptionTarget,
};
use cairn_log::{EmbeddedStore, Options};
use proptest::prelude::*;
use uuid::Uuid;

/// Categories: `course` (three streams: the first `-` counts), `student`,
/// `courses` (not `course`); `course` has none.
const STREAMS: [&str; 6] =
    ["course-a", "course-b", "student-c", "course-a-b", "courses-x", "course"];
const CATEGORIES: [&str; 4] = ["course", "student", "courses", "nobody"];
const TYPES: [&str; 3] = ["CourseDefined", "StudentSubscribed", "StudentUnsubscribed"];
const TAGS: [&str; 5] = ["course:1", "course:2", "student:1", "student:2", "student:3"];

fn options() -> Options {
    // Small segments: histories cross segment boundaries.
    Options { segment_bytes: 8 * 1024, ..Options::default() }
}

// ---------------------------------------------------------------------------
// Operations

/// An event to append: a type and a set of tags (indexes into TYPES, TAGS).
#[derive(Debug, Clone)]
struct Ev {
    kind: usize,
    tags: Vec<usize>,
    pad: usize,
}

#[derive(Debug, Clone)]
struct Item {
    /// Bit i: TYPES[i] is one of the item's types.
    types: u8,
    tags: Vec<usize>,
    /// Bit i: CATEGORIES[i] is one of the item's categories.
    categories: u8,
}

#[derive(Debug, Clone)]
enum At {
    Nothing,
    /// The position of the n-th event of the log (modulo its length).
    Event(usize),
    /// One byte past the n-th event's position: a bound, not an event.
    Inside(usize),
    Last,
    Head,
}

#[derive(Debug, Clone)]
enum Op {
    Append {
        s: usize,
        events: Vec<Ev>,
    },
    AppendIf {
        s: usize,
        events: Vec<Ev>,
        query: Vec<Item>,
        after: At,
    },
    Read {
        query: Vec<Item>,
        backward: bool,
        from: At,
        exclusive: bool,
        limit: Option<usize>,
    },
    SetMetadata {
        s: usize,
    },
    Delete {
        s: usize,
    },
    Reopen,
    /// Reopen without the stream tables: the summaries are rebuilt from the log.
    Rebuild,
    /// `EmbeddedStore::reindex`, then reopen.
    Reindex,
}

fn ev() -> impl Strategy<Value = Ev> {
    (0..TYPES.len(), prop::collection::btree_set(0..TAGS.len(), 0..=3), 0usize..400)
        .prop_map(|(kind, tags, pad)| Ev { kind, tags: tags.into_iter().collect(), pad })
}

fn item() -> impl Strategy<Value = Item> {
    let categories = prop_oneof![3 => Just(0u8), 1 => Just(1u8), 1 => 1u8..16];
    (
        prop_oneof![2 => Just(0u8), 1 => 1u8..8],
        prop::collection::vec(0..TAGS.len(), 0..=2),
        categories,
    )
        .prop_map(|(types, tags, categories)| Item { types, tags, categories })
}

fn at() -> impl Strategy<Value = At> {
    prop_oneof![
        1 => Just(At::Nothing),
        4 => any::<usize>().prop_map(At::Event),
        1 => any::<usize>().prop_map(At::Inside),
        2 => Just(At::Last),
        1 => Just(At::Head),
    ]
}

fn op() -> impl Strategy<Value = Op> {
    let s = 0..STREAMS.len();
    let events = || prop::collection::vec(ev(), 1..=3);
    let query = || prop::collection::vec(item(), 1..=3);
    prop_oneof![
        8 => (s.clone(), events()).prop_map(|(s, events)| Op::Append { s, events }),
        6 => (s.clone(), events(), query(), at()).prop_map(|(s, events, query, after)| Op::AppendIf { s, events, query, after }),
        6 => (query(), any::<bool>(), at(), any::<bool>(), prop::option::of(0usize..5))
            .prop_map(|(query, backward, from, exclusive, limit)| Op::Read { query, backward, from, exclusive, limit }),
        1 => s.clone().prop_map(|s| Op::SetMetadata { s }),
        1 => s.prop_map(|s| Op::Delete { s }),
        1 => Just(Op::Reopen),
        1 => Just(Op::Rebuild),
        1 => Just(Op::Reindex),
    ]
}

fn to_query(items: &[Item]) -> Query {
    Query::new(items.iter().map(|i| {
        let types = (0..TYPES.len()).filter(|t| i.types & (1 << t) != 0).map(|t| TYPES[t]);
        let categories =
            (0..CATEGORIES.len()).filter(|c| i.categories & (1 << c) != 0).map(|c| CATEGORIES[c]);
        QueryItem::types(types)
            .with_tags(i.tags.iter().map(|t| TAGS[*t]))
            .with_categories(categories)
    }))
}

fn to_event(e: &Ev) -> NewEvent {
    NewEvent::json(TYPES[e.kind], &serde_json::json!({ "pad": "x".repeat(e.pad) }))
        .unwrap()
        .with_tags(e.tags.iter().map(|t| TAGS[*t]))
}

// ---------------------------------------------------------------------------
// The model: the log as (position, stream, type, tags), taken from $all after
// each write and checked against what was appended.

#[derive(Debug, Clone, PartialEq)]
struct Logged {
    position: u64,
    id: Uuid,
    stream: String,
    event_type: String,
    tags: Vec<String>,
}

impl Logged {
    fn of(e: &RecordedEvent) -> Self {
        Logged {
            position: e.position.0,
            id: e.id,
            stream: e.stream.clone(),
            event_type: e.event_type.clone(),
            tags: e.tags.clone(),
        }
    }
    fn matches(&self, query: &Query) -> bool {
        query.matches(&self.stream, &self.event_type, &self.tags)
    }
}

#[derive(Default)]
struct Model {
    log: Vec<Logged>,
}

impl Model {
    fn position(&self, at: &At, head: u64) -> Option<u64> {
        let n = self.log.len();
        match at {
            At::Nothing => None,
            At::Event(k) if n > 0 => Some(self.log[k % n].position),
            At::Inside(k) if n > 0 => Some(self.log[k % n].position + 1),
            At::Event(_) | At::Inside(_) => None,
            At::Last => self.log.last().map(|e| e.position),
            At::Head => Some(head),
        }
    }

    fn read(&self, query: &Query, options: &ReadAllOptions) -> Vec<u64> {
        let from = options.from.0;
        let in_range = |p: u64| match (options.direction, options.exclusive) {
            (Direction::Forward, false) => p >= from,
            (Direction::Forward, true) => p > from,
            (Direction::Backward, false) => p <= from,
            (Direction::Backward, true) => p < from,
        };
        let matching = self
            .log
            .iter()
            .filter(|e| e.matches(query) && in_range(e.position))
            .map(|e| e.position);
        match options.direction {
            Direction::Forward => matching.take(options.limit).collect(),
            Direction::Backward => matching.rev().take(options.limit).collect(),
        }
    }

    fn first_conflict(&self, condition: &AppendCondition) -> Option<u64> {
        self.log
            .iter()
            .find(|e| {
                e.matches(&condition.fail_if_events_match)
                    && condition.conflicts_at(Position(e.position))
            })
            .map(|e| e.position)
    }

    /// Takes the log from `$all`; the events before must be unchanged and the
    /// new ones must be `appended` (user events) or system events.
    async fn sync(&mut self, store: &EmbeddedStore, appended: &[NewEvent], step: &str) {
        let all: Vec<Logged> = store
            .read_all(ReadAllOptions::forward())
            .await
            .unwrap()
            .iter()
            .map(Logged::of)
            .collect();
        assert_eq!(
            &all[..self.log.len()],
            &self.log[..],
            "{step}: the log changed under earlier events"
        );
        let new = &all[self.log.len()..];
        let user: Vec<&Logged> = new.iter().filter(|e| !e.stream.starts_with('$')).collect();
        assert_eq!(user.len(), appended.len(), "{step}: new user events");
        for (got, want) in user.iter().zip(appended) {
            assert_eq!(
                (got.id, &got.event_type, &got.tags),
                (want.id, &want.event_type, &want.tags),
                "{step}"
            );
        }
        self.log = all;
    }
}

/// Queries compared after every step: each tag, each type, each category,
/// everything, and mixes.
fn probes() -> Vec<Query> {
    let mut probes: Vec<Query> = TAGS.iter().map(|t| Query::tags([*t])).collect();
    probes.extend(TYPES.iter().map(|t| Query::types([*t])));
    probes.extend(CATEGORIES.iter().map(|c| Query::category(*c)));
    probes.push(Query::all());
    probes.push(
        Query::tags([TAGS[0], TAGS[2]]).or(QueryItem::types([TYPES[0]]).with_tags([TAGS[1]])),
    );
    probes.push(
        Query::from(QueryItem::categories([CATEGORIES[0]]).with_types([TYPES[1]]))
            .or(QueryItem::categories(["student", "courses"]).with_tags([TAGS[2]])),
    );
    probes
}

async fn check_probes(store: &EmbeddedStore, model: &Model, step: &str) {
    let last = store.last_position().await.unwrap().map(|p| p.0);
    assert_eq!(
        last,
        model.log.last().map(|e| e.position),
        "{step}: last_position is the newest event's"
    );
    for q in probes() {
        for options in [ReadAllOptions::forward(), ReadAllOptions::backward()] {
            let got: Vec<u64> =
                store.read_query(&q, options).await.unwrap().iter().map(|e| e.position.0).collect();
            assert_eq!(
                got,
                model.read(&q, &options),
                "{step}: probe {q:?} {:?}",
                options.direction
            );
        }
    }
    for c in CATEGORIES {
        for options in [ReadAllOptions::forward(), ReadAllOptions::backward().limit(3)] {
            let got: Vec<u64> = store
                .read_category(c, options)
                .await
                .unwrap()
                .iter()
                .map(|e| e.position.0)
                .collect();
            assert_eq!(
                got,
                model.read(&Query::category(c), &options),
                "{step}: category {c} {options:?}"
            );
        }
    }
}

async fn run(dir: &Path, ops: Vec<Op>) {
    let mut store = EmbeddedStore::open_with(dir, options()).unwrap();
    let mut model = Model::default();
    for (i, op) in ops.iter().enumerate() {
        let step = format!("step {i} {op:?}");
        let head = store.head_position().await.unwrap().0;
        match op {
            Op::Append { s, events } => {
                let events: Vec<NewEvent> = events.iter().map(to_event).collect();
                store.append(STREAMS[*s], ExpectedVersion::Any, events.clone()).await.unwrap();
                model.sync(&store, &events, &step).await;
            }
            Op::AppendIf { s, events, query, after } => {
                let events: Vec<NewEvent> = events.iter().map(to_event).collect();
                let condition = AppendCondition::new(
                    to_query(query),
                    model.position(after, head).map(Position),
                );
                let got = store
                    .append_if(STREAMS[*s], ExpectedVersion::Any, events.clone(), condition.clone())
                    .await;
                match (model.first_conflict(&condition), got) {
                    (None, Ok(_)) => model.sync(&store, &events, &step).await,
                    (
                        Some(want),
                        Err(StoreError::AppendConditionFailed { first_conflict, after }),
                    ) => {
                        assert_eq!((first_conflict.0, after), (want, condition.after), "{step}");
                        model.sync(&store, &[], &step).await;
                    }
                    (want, got) => panic!(
                        "{step}: the model expects first conflict {want:?}, the store said {got:?}"
                    ),
                }
            }
            Op::Read { query, backward, from, exclusive, limit } => {
                let q = to_query(query);
                let mut options =
                    if *backward { ReadAllOptions::backward() } else { ReadAllOptions::forward() };
                if let Some(p) = model.position(from, head) {
                    options = if *exclusive {
                        options.after(Position(p))
                    } else {
                        options.from(Position(p))
                    };
                }
                if let Some(limit) = limit {
                    options = options.limit(*limit);
                }
                let got = store.read_query(&q, options).await.unwrap();
                let positions: Vec<u64> = got.iter().map(|e| e.position.0).collect();
                assert_eq!(positions, model.read(&q, &options), "{step}: {options:?}");
                for e in &got {
                    let logged = model
                        .log
                        .iter()
                        .find(|l| l.position == e.position.0)
                        .expect("a logged event");
                    assert_eq!(&Logged::of(e), logged, "{step}: the event read is the one logged");
                }
            }
            Op::SetMetadata { s } => {
                let metadata = StreamMetadata { max_count: Some(1), ..Default::default() };
                store.set_stream_metadata(STREAMS[*s], metadata).await.unwrap();
                model.sync(&store, &[], &step).await;
            }
            Op::Delete { s } => {
                // Soft: may fail if the stream is gone; either way no user event.
                let _ = store.delete_stream(STREAMS[*s], ExpectedVersion::Any, false).await;
                model.sync(&store, &[], &step).await;
            }
            Op::Reopen | Op::Rebuild | Op::Reindex => {
                drop(store);
                match op {
                    Op::Rebuild => crate::common::remove_stream_tables(dir),
                    Op::Reindex => assert!(
                        !reindex(dir).from_snapshot,
                        "{step}: reindex rebuilds from the log"
                    ),
                    _ => {}
                }
                store = crate::common::reopen(dir, options()).unwrap();
                // An empty log has no stream table to start from.
                let events = store.open_report().events;
                assert_eq!(
                    store.open_report().from_snapshot,
                    !matches!(op, Op::Rebuild) && events > 0,
                    "{step}"
                );
            }
        }
        check_probes(&store, &model, &step).await;
    }
    // Subscriptions by query deliver the same events, then live ones.
    for q in probes() {
        let mut sub =
            store.subscribe(SubscriptionTarget::Query(q.clone()), StartFrom::Start).await.unwrap();
        let want = model.read(&q, &ReadAllOptions::forward());
        let mut got = Vec::new();
        while got.len() < want.len() {
            got.push(next(&mut sub).await.position.0);
        }
        assert_eq!(got, want, "subscription to {q:?}");
        // Nothing extra before the live part: the next event is one appended now (if it matches).
        let live = NewEvent::json(TYPES[0], &serde_json::json!({})).unwrap().with_tags(TAGS);
        let r = store.append(STREAMS[0], ExpectedVersion::Any, vec![live.clone()]).await.unwrap();
        model.sync(&store, &[live], "live").await;
        if model.log.last().unwrap().matches(&q) {
            assert_eq!(
                next(&mut sub).await.position,
                r.position,
                "subscription to {q:?}: then live"
            );
        }
    }
}

/// `EmbeddedStore::reindex`, retried while a child process another test is
/// spawning still shares the lock (see `common::reopen`).
fn reindex(dir: &Path) -> cairn_log::OpenReport {
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        match EmbeddedStore::reindex(dir) {
            Err(StoreError::Locked { .. }) if std::time::Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(2))
            }
            other => return other.unwrap(),
        }
    }
}

async fn next(sub: &mut cairn_core::Subscription) -> RecordedEvent {
    tokio::time::timeout(Duration::from_secs(10), sub.next())
        .await
        .expect("an event within 10 s")
        .expect("open")
        .expect("ok")
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn queries_and_conditions_match_the_model(ops in prop::collection::vec(op(), 5..=40)) {
        let dir = tempfile::tempdir().unwrap();
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(run(dir.path(), ops));
    }
}

// ---------------------------------------------------------------------------
// The course race

const CAPACITY: usize = 30;
const STUDENTS: usize = 32;

/// One student's attempt: read the course's events, count the subscriptions,
/// and if there is room, subscribe with a condition on what was read;
/// on a conflict, read again and decide again. True if subscribed.
async fn subscribe_student(store: Arc<EmbeddedStore>, course: String, student: usize) -> bool {
    let q = Query::tags([course.as_str()]);
    loop {
        let last = store.last_position().await.unwrap();
        let events = store.read_query(&q, ReadAllOptions::forward()).await.unwrap();
        let subscribed = events.iter().filter(|e| e.event_type == "StudentSubscribed").count();
        assert!(subscribed <= CAPACITY, "the course is over capacity: {subscribed}");
        if subscribed == CAPACITY {
            return false;
        }
        let event = NewEvent::json("StudentSubscribed", &serde_json::json!({ "student": student }))
            .unwrap()
            .with_tags([course.clone(), format!("student:{student}")]);
        let condition = AppendCondition::after_read(q.clone(), last, &events);
        match store
            .append_if(&format!("student-{student}"), ExpectedVersion::Any, vec![event], condition)
            .await
        {
            Ok(_) => return true,
            Err(StoreError::AppendConditionFailed { .. }) => continue,
            Err(e) => panic!("student {student}: {e}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn course_capacity_holds_under_racing_subscriptions() {
    let (store, _dir) = crate::common::fresh();
    let store = Arc::new(store);
    for round in 0..100 {
        let course = format!("course:{round}-{}", Uuid::new_v4().simple());
        let defined = NewEvent::json("CourseDefined", &serde_json::json!({ "capacity": CAPACITY }))
            .unwrap()
            .with_tags([course.clone()]);
        store
            .append(&format!("course-{round}"), ExpectedVersion::NoStream, vec![defined])
            .await
            .unwrap();
        let barrier = Arc::new(tokio::sync::Barrier::new(STUDENTS));
        let tasks: Vec<_> = (0..STUDENTS)
            .map(|student| {
                let (store, course, barrier) = (store.clone(), course.clone(), barrier.clone());
                tokio::spawn(async move {
                    barrier.wait().await;
                    subscribe_student(store, course, student).await
                })
            })
            .collect();
        let mut succeeded = 0;
        for t in tasks {
            succeeded += t.await.unwrap() as usize;
        }
        assert_eq!(
            succeeded, CAPACITY,
            "round {round}: exactly {CAPACITY} of {STUDENTS} students get a seat"
        );
        let seats = store
            .read_query(
                &Query::from(QueryItem::types(["StudentSubscribed"]).with_tags([course.as_str()])),
                ReadAllOptions::forward(),
            )
            .await
            .unwrap();
        assert_eq!(
            seats.len(),
            CAPACITY,
            "round {round}: the log holds exactly {CAPACITY} subscriptions"
        );
    }
}

/// A condition checked inside a group commit sees the group's earlier
/// events, which are not durable yet, and a failed condition does not
/// break the group for the others.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conditions_see_the_events_of_their_own_group() {
    let (store, _dir) = crate::common::fresh();
    for round in 0..40 {
        // Even rounds: a tag query; odd rounds: a category query.
        let tag = format!("seat:{round}");
        let category = format!("seat{round}");
        let q = if round % 2 == 0 {
            Query::tags([tag.as_str()])
        } else {
            Query::category(category.as_str())
        };
        let last = store.last_position().await.unwrap();
        let condition = AppendCondition::new(q.clone(), last);
        // Sent together: they almost always share one group.
        let seat = |n: u32| {
            NewEvent::json("SeatTaken", &serde_json::json!({ "n": n }))
                .unwrap()
                .with_tags([tag.clone()])
        };
        let (sa, sb) = (format!("{category}-a"), format!("{category}-b"));
        let (a, b, plain) = tokio::join!(
            store.append_if(&sa, ExpectedVersion::Any, vec![seat(1)], condition.clone()),
            store.append_if(&sb, ExpectedVersion::Any, vec![seat(2)], condition.clone()),
            store.append(
                "c",
                ExpectedVersion::Any,
                vec![NewEvent::json("Other", &serde_json::json!({})).unwrap()]
            ),
        );
        plain.expect("an unconditional append in the same group is unaffected");
        let (winner, loser) = match (a, b) {
            (Ok(w), Err(l)) | (Err(l), Ok(w)) => (w, l),
            other => panic!(
                "round {round}: exactly one of two conflicting conditional appends succeeds: {other:?}"
            ),
        };
        assert!(
            matches!(loser, StoreError::AppendConditionFailed { first_conflict, .. } if first_conflict == winner.position),
            "{loser:?}"
        );
        assert_eq!(store.read_query(&q, ReadAllOptions::forward()).await.unwrap().len(), 1);
    }
}
