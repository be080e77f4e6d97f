//! `PgModel` against the real PostgreSQL at 127.0.0.1:5432. Each test works
//! in a schema of its own (a fresh UUID, through the connection's
//! search_path), so the model's and the projection's tables never collide.
//! The model awaits its queries, so it runs on any runtime (one test runs it
//! on a current-thread one).

use std::os::unix::process::ExitStatusExt;
use std::time::Duration;

use cairn_core::conformance::reachable;
use cairn_core::{EventStore, ExpectedVersion, NewEvent, Position, ReadAllOptions, RecordedEvent};
use cairn_cqrs::{
    PgModel, PgProjection, ProjectionError, Runner, Sink, Source, State, pg_request,
    pg_stored_checkpoints,
};
use tokio_postgres::{Client, GenericClient, IsolationLevel, NoTls, Transaction};
use uuid::Uuid;

use crate::common::{
    Balances, Rng, expected, expected_upto, signed_amount, spawn_ready_child, store, store_in,
    write_history, write_while_projecting,
};

const PG: &str = "host=127.0.0.1 port=5432 user=postgres dbname=test";

async fn connect_in(schema: &str) -> Client {
    let (client, connection) =
        tokio_postgres::connect(&format!("{PG} options=-csearch_path={schema}"), NoTls)
            .await
            .expect("connect to PostgreSQL");
    tokio::spawn(connection);
    client
}

/// A schema of its own for one test.
struct Db {
    schema: String,
}

impl Db {
    async fn new() -> Db {
        let schema = format!("cqrs_{}", Uuid::new_v4().simple());
        connect_in("public").await.batch_execute(&format!("CREATE SCHEMA {schema}")).await.unwrap();
        Db { schema }
    }

    /// A connection whose tables are the schema's.
    async fn connect(&self) -> Client {
        connect_in(&self.schema).await
    }

    async fn model(&self) -> PgModel<PgBalances> {
        PgModel::open(self.connect().await, PgBalances).await.unwrap()
    }

    async fn drop(self) {
        connect_in("public")
            .await
            .batch_execute(&format!("DROP SCHEMA {} CASCADE", self.schema))
            .await
            .unwrap();
    }
}

/// Balances per account, plus an append-only log of the events applied, which
/// shows any event applied twice or skipped.
struct PgBalances;

impl PgProjection for PgBalances {
    fn name(&self) -> &str {
        "balances"
    }

    async fn setup(&self, tx: &Transaction<'_>) -> Result<(), tokio_postgres::Error> {
        tx.batch_execute(
            "CREATE TABLE IF NOT EXISTS balances (account TEXT PRIMARY KEY, balance BIGINT NOT NULL, events BIGINT NOT NULL);
             CREATE TABLE IF NOT EXISTS applied (seq BIGSERIAL PRIMARY KEY, position BIGINT NOT NULL, event_id UUID NOT NULL)",
        )
        .await
    }

    async fn apply(
        &self,
        tx: &Transaction<'_>,
        e: &RecordedEvent,
    ) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        if e.event_type == "Poison" {
            return Err("cannot digest Poison".into());
        }
        tx.execute(
            "INSERT INTO applied (position, event_id) VALUES ($1, $2)",
            &[&(e.position.0 as i64), &e.id],
        )
        .await?;
        if let Some(a) = signed_amount(e) {
            tx.execute(
                "INSERT INTO balances (account, balance, events) VALUES ($1, $2, 1)
                 ON CONFLICT (account) DO UPDATE SET balance = balances.balance + $2, events = balances.events + 1",
                &[&e.stream, &a],
            )
            .await?;
        }
        Ok(())
    }

    async fn reset(&self, tx: &Transaction<'_>) -> Result<(), tokio_postgres::Error> {
        tx.batch_execute("DROP TABLE IF EXISTS balances, applied").await
    }
}

async fn pg_balances(client: &impl GenericClient) -> Balances {
    let rows = client.query("SELECT account, balance, events FROM balances", &[]).await.unwrap();
    rows.iter().map(|r| (r.get(0), (r.get(1), r.get::<_, i64>(2) as u64))).collect()
}

/// Positions in the `applied` log, in the order they were applied.
async fn applied(client: &impl GenericClient) -> Vec<u64> {
    let rows = client.query("SELECT position FROM applied ORDER BY seq", &[]).await.unwrap();
    rows.iter().map(|r| r.get::<_, i64>(0) as u64).collect()
}

/// Positions of the user events up to `upto` (all for `None`): what `applied` must hold.
async fn user_positions(store: &dyn EventStore, upto: Option<Position>) -> Vec<u64> {
    let events = store.read_all(ReadAllOptions::forward()).await.unwrap();
    events
        .iter()
        .filter(|e| !e.is_system() && upto.is_none_or(|p| e.position <= p))
        .map(|e| e.position.0)
        .collect()
}

async fn last_event(store: &dyn EventStore) -> RecordedEvent {
    store.read_all(ReadAllOptions::backward().limit(1)).await.unwrap().remove(0)
}

async fn until(what: &str, mut done: impl FnMut() -> bool) {
    for _ in 0..1000 {
        if done() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("gave up waiting for {what}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_balance_projection_equals_the_events_and_checkpoints_the_last_one() {
    if !reachable("127.0.0.1:5432", "PostgreSQL") {
        return;
    }
    let db = Db::new().await;
    let reader = db.connect().await;
    let (store, _dir) = store();
    write_history(store.as_ref(), 20, 1_500, 21).await;
    let runner = Runner::new(store.clone(), Source::All, db.model().await).batch(64).spawn();
    runner.wait_for(store.last_position().await.unwrap().unwrap()).await.unwrap();
    assert_eq!(pg_balances(&reader).await, expected(store.as_ref()).await);

    // Live: events appended while it runs.
    write_history(store.as_ref(), 20, 300, 22).await;
    runner.wait_for(store.last_position().await.unwrap().unwrap()).await.unwrap();
    assert_eq!(pg_balances(&reader).await, expected(store.as_ref()).await);
    assert_eq!(runner.status().applied, 1_800);
    let (mut sink, result) = runner.stop().await;
    result.unwrap();

    let last = last_event(store.as_ref()).await;
    assert_eq!(
        sink.checkpoint().await.unwrap(),
        Some((last.position, last.timestamp)),
        "the last applied event, with its append time"
    );
    let rows = pg_stored_checkpoints(&reader).await.unwrap();
    assert_eq!(rows.len(), 1);
    assert_eq!(
        (rows[0].projection.as_str(), rows[0].position, rows[0].event_time),
        ("balances", last.position, last.timestamp)
    );
    assert_eq!(rows[0].source, Some(Source::All), "the database says what the projection follows");
    db.drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handler_failing_mid_batch_rolls_back_its_rows_and_the_checkpoint() {
    if !reachable("127.0.0.1:5432", "PostgreSQL") {
        return;
    }
    let db = Db::new().await;
    let reader = db.connect().await;
    let (store, _dir) = store();
    write_history(store.as_ref(), 5, 50, 23).await;
    let runner = Runner::new(store.clone(), Source::All, db.model().await).spawn();
    runner.wait_for(store.last_position().await.unwrap().unwrap()).await.unwrap();
    let (mut sink, result) = runner.stop().await;
    result.unwrap();
    let committed = sink.checkpoint().await.unwrap();
    drop(sink);

    // The next batch: 20 good events, the poison, 10 more.
    write_history(store.as_ref(), 5, 20, 24).await;
    let poison = store
        .append(
            "account-x",
            ExpectedVersion::Any,
            vec![NewEvent::json("Poison", &serde_json::json!({})).unwrap()],
        )
        .await
        .unwrap();
    write_history(store.as_ref(), 5, 10, 25).await;
    let runner = Runner::new(store.clone(), Source::All, db.model().await).batch(1000).spawn();
    let err = runner.wait_for(store.last_position().await.unwrap().unwrap()).await.unwrap_err();
    assert!(err.to_string().contains("cannot digest Poison"), "{err}");
    let State::Failed(reason) = runner.status().state else { panic!("{:?}", runner.status()) };
    assert!(reason.contains(&format!("position {}", poison.position)), "{reason}");
    let (mut sink, result) = runner.stop().await;
    assert!(
        matches!(result, Err(ProjectionError::Handler { position, .. }) if position == poison.position)
    );

    // The 20 events before the poison were written in the batch's transaction: none of them is visible.
    assert_eq!(sink.checkpoint().await.unwrap(), committed, "the checkpoint did not move");
    let committed = committed.map(|c| c.0);
    assert_eq!(pg_balances(&reader).await, expected_upto(store.as_ref(), committed).await);
    assert_eq!(applied(&reader).await, user_positions(store.as_ref(), committed).await);
    assert_eq!(applied(&reader).await.len(), 50);
    db.drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_projection_resumes_from_its_checkpoint_without_double_applying() {
    if !reachable("127.0.0.1:5432", "PostgreSQL") {
        return;
    }
    let db = Db::new().await;
    let reader = db.connect().await;
    let (store, _dir) = store();
    write_history(store.as_ref(), 30, 1_500, 26).await;
    let middle =
        store.read_all(ReadAllOptions::forward().limit(400)).await.unwrap().pop().unwrap().position;
    // Stopped part-way through the catch-up, wherever its batch of 10 ends.
    let runner = Runner::new(store.clone(), Source::All, db.model().await).batch(10).spawn();
    runner.wait_for(middle).await.unwrap();
    let (mut sink, result) = runner.stop().await;
    result.unwrap();
    let stopped_at = sink.checkpoint().await.unwrap().map(|c| c.0);
    drop(sink);
    assert!(stopped_at >= Some(middle));
    assert_eq!(applied(&reader).await, user_positions(store.as_ref(), stopped_at).await);

    // More events while no runner runs; a new runner (a new connection) resumes.
    write_history(store.as_ref(), 30, 700, 27).await;
    let behind = user_positions(store.as_ref(), None).await.len()
        - user_positions(store.as_ref(), stopped_at).await.len();
    let runner = Runner::new(store.clone(), Source::All, db.model().await).batch(100).spawn();
    runner.wait_for(store.last_position().await.unwrap().unwrap()).await.unwrap();
    assert_eq!(runner.status().applied, behind as u64, "only the events after the checkpoint");
    assert_eq!(pg_balances(&reader).await, expected(store.as_ref()).await);
    assert_eq!(
        applied(&reader).await,
        user_positions(store.as_ref(), None).await,
        "each event once, in order, none missing"
    );
    db.drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_model_on_a_stale_checkpoint_commits_nothing_and_a_reset_empties_the_model() {
    if !reachable("127.0.0.1:5432", "PostgreSQL") {
        return;
    }
    let db = Db::new().await;
    let reader = db.connect().await;
    let (store, _dir) = store();
    write_history(store.as_ref(), 5, 40, 28).await;
    let events = store.read_all(ReadAllOptions::forward()).await.unwrap();
    let at = |i: usize| (events[i].position, events[i].timestamp);

    // Two runners of one projection (a rolling deploy): both start from nothing.
    let (mut a, mut b) = (db.model().await, db.model().await);
    a.apply(&events[..20], at(19)).await.unwrap();
    let err = b.apply(&events[..20], at(19)).await.unwrap_err();
    assert!(matches!(err, ProjectionError::CheckpointMoved { expected: None, .. }), "{err}");
    a.apply(&events[20..30], at(29)).await.unwrap();
    assert_eq!(
        applied(&reader).await,
        user_positions(store.as_ref(), Some(events[29].position)).await,
        "b's batch left nothing"
    );

    // Once it reads the checkpoint again, b carries on from there.
    assert_eq!(b.checkpoint().await.unwrap(), Some(at(29)));
    b.apply(&events[30..], at(39)).await.unwrap();
    assert!(matches!(
        a.apply(&events[30..], at(39)).await,
        Err(ProjectionError::CheckpointMoved { .. })
    ));
    assert_eq!(pg_balances(&reader).await, expected(store.as_ref()).await);

    // The reset hook drops the tables, setup recreates them, the checkpoint is gone.
    b.reset().await.unwrap();
    assert_eq!(b.checkpoint().await.unwrap(), None);
    assert!(pg_balances(&reader).await.is_empty() && applied(&reader).await.is_empty());
    assert!(pg_stored_checkpoints(&reader).await.unwrap().is_empty());
    db.drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn models_opened_at_once_set_up_their_tables_without_racing() {
    if !reachable("127.0.0.1:5432", "PostgreSQL") {
        return;
    }
    let db = Db::new().await;
    let mut clients = Vec::new();
    for _ in 0..8 {
        clients.push(db.connect().await);
    }
    // Concurrent CREATE TABLE IF NOT EXISTS in a fresh schema fails without the advisory lock.
    let opens: Vec<_> =
        clients.into_iter().map(|c| tokio::spawn(PgModel::open(c, PgBalances))).collect();
    for open in opens {
        open.await.unwrap().unwrap();
    }
    db.drop().await;
}

/// The model is async (no `block_in_place`): it runs under a runner on a
/// current-thread runtime too, and its batches commit with the checkpoint.
#[tokio::test(flavor = "current_thread")]
async fn the_model_runs_on_a_current_thread_runtime() {
    if !reachable("127.0.0.1:5432", "PostgreSQL") {
        return;
    }
    let db = Db::new().await;
    let reader = db.connect().await;
    let (store, _dir) = store();
    write_history(store.as_ref(), 3, 12, 7).await;
    let last = store.last_position().await.unwrap().unwrap();
    let runner = Runner::new(store.clone(), Source::All, db.model().await).spawn();
    runner.wait_for(last).await.unwrap();
    let (mut model, stopped) = runner.stop().await;
    stopped.unwrap();
    assert_eq!(model.checkpoint().await.unwrap().map(|c| c.0), Some(last));
    assert_eq!(pg_balances(&reader).await, expected(store.as_ref()).await);
    db.drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_pauses_resumes_and_resets_a_projection_through_the_database() {
    if !reachable("127.0.0.1:5432", "PostgreSQL") {
        return;
    }
    let db = Db::new().await;
    let operator = db.connect().await;
    let (store, _dir) = store();
    write_history(store.as_ref(), 10, 200, 29).await;
    let runner = Runner::new(store.clone(), Source::All, db.model().await).spawn();
    runner.wait_for(store.last_position().await.unwrap().unwrap()).await.unwrap();

    // Another process (here: another connection) asks for a pause.
    pg_request(&operator, "balances", Some(true), false).await.unwrap();
    until("the pause", || runner.status().state == State::Paused).await;
    write_history(store.as_ref(), 10, 30, 30).await;
    // A window of several request polls (250 ms each) in which a paused runner must not apply.
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(runner.lag().await.unwrap().events, 30, "nothing applied while paused");
    assert!(pg_stored_checkpoints(&operator).await.unwrap()[0].requested.paused);

    pg_request(&operator, "balances", Some(false), false).await.unwrap();
    runner.wait_for(store.last_position().await.unwrap().unwrap()).await.unwrap();
    assert_eq!(pg_balances(&operator).await, expected(store.as_ref()).await);

    // A reset empties the model and replays everything into it.
    let before = runner.status().applied;
    pg_request(&operator, "balances", None, true).await.unwrap();
    until("the replay", || runner.status().applied >= before + 230).await;
    runner.wait_for(store.last_position().await.unwrap().unwrap()).await.unwrap();
    assert_eq!(pg_balances(&operator).await, expected(store.as_ref()).await);
    assert_eq!(
        applied(&operator).await,
        user_positions(store.as_ref(), None).await,
        "replayed once into emptied tables"
    );
    let rows = pg_stored_checkpoints(&operator).await.unwrap();
    assert_eq!(
        rows[0].requested,
        cairn_cqrs::Requested { paused: false, reset: false },
        "the reset clears the request"
    );
    runner.stop().await.1.unwrap();
    db.drop().await;
}

// Crash safety, as in crash.rs: a child process follows the store into a
// PgModel while it keeps appending; the parent SIGKILLs it at random moments
// and checks that the tables hold exactly the events up to the checkpoint.
// Replay a run with CAIRN_CQRS_PG_CRASH_SEED=<seed printed by the test>.

const DIR_VAR: &str = "CAIRN_CQRS_PG_CRASH_DIR";
const SCHEMA_VAR: &str = "CAIRN_CQRS_PG_CRASH_SCHEMA";
const SEED_VAR: &str = "CAIRN_CQRS_PG_CRASH_SEED";
const CYCLES: usize = 10;

#[test]
#[ignore = "runs only as the child process of postgres::kill_a_pg_projection_and_resume"]
fn child_pg_projector() {
    let (Some(dir), Ok(schema)) = (std::env::var_os(DIR_VAR), std::env::var(SCHEMA_VAR)) else {
        return;
    };
    let seed: u64 = std::env::var(SEED_VAR).ok().and_then(|s| s.parse().ok()).unwrap_or(1);
    let rt =
        tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    rt.block_on(async move {
        let store = store_in(std::path::Path::new(&dir));
        let model = PgModel::open(connect_in(&schema).await, PgBalances).await.unwrap();
        let mut rng = Rng(seed);
        let runner =
            Runner::new(store.clone(), Source::All, model).batch(rng.range(1, 40) as usize).spawn();
        write_while_projecting(store, &runner, seed, rng).await
    });
}

#[test]
fn kill_a_pg_projection_and_resume() {
    if !reachable("127.0.0.1:5432", "PostgreSQL") {
        return;
    }
    let seed = std::env::var(SEED_VAR)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| Rng::from_time().next_u64());
    eprintln!("postgres::kill_a_pg_projection_and_resume seed {seed} (set {SEED_VAR} to replay)");
    let mut rng = Rng(seed);
    let dir = tempfile::tempdir().unwrap();
    let rt =
        tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let db = rt.block_on(Db::new());
    rt.block_on(async { write_history(store_in(dir.path()).as_ref(), 25, 3_000, seed).await });
    let mut checkpoints = Vec::new();

    for cycle in 0..CYCLES {
        let envs = [
            (DIR_VAR, dir.path().display().to_string()),
            (SCHEMA_VAR, db.schema.clone()),
            (SEED_VAR, rng.next_u64().to_string()),
        ];
        let mut child = spawn_ready_child("postgres::child_pg_projector", &envs);
        std::thread::sleep(Duration::from_millis(rng.range(5, 250)));
        assert!(child.try_wait().unwrap().is_none(), "cycle {cycle}: the child stopped on its own");
        child.kill().unwrap(); // SIGKILL
        assert_eq!(child.wait().unwrap().signal(), Some(9));

        rt.block_on(async {
            let store = store_in(dir.path());
            let mut reader = db.connect().await;
            // One snapshot: the killed child's last COMMIT may still land while we read.
            let snapshot = reader
                .build_transaction()
                .isolation_level(IsolationLevel::RepeatableRead)
                .start()
                .await
                .unwrap();
            let row = snapshot
                .query_opt(
                    "SELECT position FROM cairn_checkpoints WHERE projection = 'balances'",
                    &[],
                )
                .await
                .unwrap();
            let checkpoint = row.map(|r| Position(r.get::<_, i64>(0) as u64));
            let reader = &snapshot;
            assert_eq!(
                pg_balances(reader).await,
                expected_upto(store.as_ref(), checkpoint).await,
                "cycle {cycle}: the model at checkpoint {checkpoint:?}"
            );
            assert_eq!(
                applied(reader).await,
                user_positions(store.as_ref(), checkpoint).await,
                "cycle {cycle}: each event once"
            );
            checkpoints.push(checkpoint);
        });
    }

    rt.block_on(async {
        let store = store_in(dir.path());
        let reader = db.connect().await;
        let runner = Runner::new(store.clone(), Source::All, db.model().await).spawn();
        runner.wait_for(store.last_position().await.unwrap().unwrap()).await.unwrap();
        assert_eq!(
            pg_balances(&reader).await,
            expected(store.as_ref()).await,
            "after the last restart"
        );
        assert_eq!(applied(&reader).await, user_positions(store.as_ref(), None).await);
        runner.stop().await.1.unwrap();
    });
    rt.block_on(db.drop());
    let moved = checkpoints.windows(2).filter(|w| w[0] < w[1]).count();
    eprintln!(
        "postgres::kill_a_pg_projection_and_resume: {CYCLES} kills, checkpoints {checkpoints:?}"
    );
    assert_eq!(
        moved,
        CYCLES - 1,
        "each child was killed after it applied something: {checkpoints:?}"
    );
}
