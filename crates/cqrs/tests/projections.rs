use std::time::Duration;

use cairn_core::{ExpectedVersion, NewEvent};
use cairn_cqrs::{MemoryModel, ProjectionError, Runner, Sink, Source, SqliteModel, State, rebuild};

use crate::common::{MemoryBalances, SqlBalances, expected, sql_balances, store, write_history};

#[tokio::test]
async fn a_memory_projection_catches_up_then_follows_live() {
    let (store, _dir) = store();
    write_history(store.as_ref(), 20, 2_000, 1).await;
    let model = MemoryModel::new(MemoryBalances);
    let runner = Runner::new(store.clone(), Source::All, model.clone()).batch(64).spawn();
    runner.wait_for(store.last_position().await.unwrap().unwrap()).await.unwrap();
    assert_eq!(model.read(|b| b.clone()), expected(store.as_ref()).await);

    write_history(store.as_ref(), 20, 300, 2).await;
    runner.wait_for(store.last_position().await.unwrap().unwrap()).await.unwrap();
    assert_eq!(model.read(|b| b.clone()), expected(store.as_ref()).await);
    let lag = runner.lag().await.unwrap();
    assert_eq!((lag.events, lag.seconds, lag.healthy), (0, 0.0, true));
    assert_eq!(runner.status().state, State::Live);
    assert_eq!(runner.status().applied, 2_300);
}

#[tokio::test]
async fn a_sqlite_projection_resumes_from_its_checkpoint_without_double_applying() {
    let (store, dir) = store();
    let path = dir.path().join("balances.db");
    write_history(store.as_ref(), 30, 1_500, 3).await;
    let runner =
        Runner::new(store.clone(), Source::All, SqliteModel::open(&path, SqlBalances).unwrap())
            .batch(100)
            .spawn();
    runner.wait_for(store.last_position().await.unwrap().unwrap()).await.unwrap();
    let (mut sink, result) = runner.stop().await;
    result.unwrap();
    let checkpoint = sink.checkpoint().await.unwrap().unwrap();
    drop(sink);

    // More events while no runner runs; a new runner on the same file resumes.
    write_history(store.as_ref(), 30, 700, 4).await;
    let model = SqliteModel::open(&path, SqlBalances).unwrap();
    let reader = model.reader().unwrap();
    let runner = Runner::new(store.clone(), Source::All, model).spawn();
    runner.wait_for(store.last_position().await.unwrap().unwrap()).await.unwrap();
    assert!(runner.status().position.unwrap() > checkpoint.0);
    assert_eq!(runner.status().applied, 700, "only the new events");
    assert_eq!(sql_balances(&reader), expected(store.as_ref()).await);
}

#[tokio::test]
async fn a_paused_projection_reports_its_lag_and_resumes() {
    let (store, _dir) = store();
    write_history(store.as_ref(), 5, 100, 5).await;
    let model = MemoryModel::new(MemoryBalances);
    let runner = Runner::new(store.clone(), Source::All, model.clone())
        .spawn()
        .alert_after(Duration::from_millis(50));
    runner.wait_for(store.last_position().await.unwrap().unwrap()).await.unwrap();
    runner.pause();
    while runner.status().state != State::Paused {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    write_history(store.as_ref(), 5, 40, 6).await;
    tokio::time::sleep(Duration::from_millis(80)).await;
    let lag = runner.lag().await.unwrap();
    assert_eq!(lag.events, 40);
    assert!(lag.seconds >= 0.08, "{lag:?}");
    assert!(!lag.healthy, "over the 50 ms threshold: {lag:?}");
    assert_eq!(
        model.read(|b| b.values().map(|v| v.1).sum::<u64>()),
        100,
        "nothing applied while paused"
    );

    runner.resume();
    runner.wait_for(store.last_position().await.unwrap().unwrap()).await.unwrap();
    let lag = runner.lag().await.unwrap();
    assert_eq!((lag.events, lag.healthy), (0, true));
    assert_eq!(model.read(|b| b.clone()), expected(store.as_ref()).await);
}

#[tokio::test]
async fn a_failing_handler_stops_the_projection_at_the_event_and_applies_nothing_of_its_batch() {
    let (store, dir) = store();
    write_history(store.as_ref(), 5, 50, 7).await;
    let before = store.last_position().await.unwrap().unwrap();
    let poison = store
        .append(
            "account-x",
            ExpectedVersion::Any,
            vec![NewEvent::json("Poison", &serde_json::json!({})).unwrap()],
        )
        .await
        .unwrap();
    write_history(store.as_ref(), 5, 10, 8).await;

    let path = dir.path().join("b.db");
    let model = SqliteModel::open(&path, SqlBalances).unwrap();
    let reader = model.reader().unwrap();
    let runner = Runner::new(store.clone(), Source::All, model).batch(1000).spawn();
    let err = runner.wait_for(store.last_position().await.unwrap().unwrap()).await.unwrap_err();
    assert!(err.to_string().contains("cannot digest Poison"), "{err}");
    let State::Failed(reason) = runner.status().state else { panic!("{:?}", runner.status()) };
    assert!(reason.contains(&format!("position {}", poison.position)), "{reason}");
    // One batch held everything: rolled back whole, checkpoint untouched.
    let (mut sink, result) = runner.stop().await;
    assert!(matches!(result, Err(ProjectionError::Handler { .. })));
    assert_eq!(sink.checkpoint().await.unwrap(), None);
    assert!(sql_balances(&reader).is_empty());

    // In memory the events before the poison stay, and the checkpoint says so.
    let model = MemoryModel::new(MemoryBalances);
    let runner = Runner::new(store.clone(), Source::All, model.clone()).spawn();
    assert!(runner.wait_for(poison.position).await.is_err());
    assert_eq!(model.position(), Some(before));
}

#[tokio::test]
async fn a_rebuild_builds_a_fresh_model_beside_the_live_one_then_swaps() {
    let (store, dir) = store();
    write_history(store.as_ref(), 40, 3_000, 9).await;
    let live_path = dir.path().join("live.db");
    let live = SqliteModel::open(&live_path, SqlBalances).unwrap();
    let old_reader = live.reader().unwrap();
    let runner = Runner::new(store.clone(), Source::All, live).spawn();
    runner.wait_for(store.last_position().await.unwrap().unwrap()).await.unwrap();

    let mut fresh = SqliteModel::open(dir.path().join("rebuilding.db"), SqlBalances).unwrap();
    let mut reports = Vec::new();
    let done =
        rebuild(store.clone(), &Source::All, &mut fresh, 500, |p| reports.push(p)).await.unwrap();
    assert_eq!(done.events, 3_000);
    assert!(reports.len() >= 6 && reports.windows(2).all(|w| w[0].position < w[1].position));
    assert!((reports.last().unwrap().fraction() - 1.0).abs() < 1e-9);
    // The old model served all along.
    assert_eq!(sql_balances(&old_reader), expected(store.as_ref()).await);

    write_history(store.as_ref(), 40, 100, 10).await;
    let (old, result) = runner.stop().await;
    result.unwrap();
    drop(old);
    let mut swapped = fresh.replace(&live_path).unwrap();
    rebuild(store.clone(), &Source::All, &mut swapped, 500, |_| {}).await.unwrap();
    let reader = swapped.reader().unwrap();
    assert_eq!(sql_balances(&reader), expected(store.as_ref()).await);
    assert!(!dir.path().join("rebuilding.db").exists());

    // A reset empties the model and its checkpoint.
    swapped.reset().await.unwrap();
    assert_eq!(swapped.checkpoint().await.unwrap(), None);
    assert!(sql_balances(&swapped.reader().unwrap()).is_empty());
}

#[tokio::test]
async fn a_query_source_sees_only_its_events() {
    let (store, _dir) = store();
    write_history(store.as_ref(), 5, 60, 11).await;
    let model = MemoryModel::new(MemoryBalances);
    let runner =
        Runner::new(store.clone(), Source::types(["MoneyDeposited"]), model.clone()).spawn();
    runner.wait_for(store.last_position().await.unwrap().unwrap()).await.unwrap();
    let deposits = expected(store.as_ref()).await;
    let applied: u64 = model.read(|b| b.values().map(|v| v.1).sum());
    assert_eq!(applied, 40, "two thirds of the 60 events are deposits");
    assert!(model.read(|b| b.values().all(|v| v.0 > 0)));
    assert_eq!(deposits.len(), model.read(|b| b.len()));
}

async fn until(what: &str, mut done: impl FnMut() -> bool) {
    for _ in 0..500 {
        if done() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("gave up waiting for {what}");
}

#[tokio::test]
async fn an_operator_pauses_resumes_and_resets_a_sqlite_projection_through_its_file() {
    let (store, dir) = store();
    let path = dir.path().join("ops.db");
    write_history(store.as_ref(), 10, 200, 12).await;
    let model = SqliteModel::open(&path, SqlBalances).unwrap();
    let reader = model.reader().unwrap();
    let runner = Runner::new(store.clone(), Source::All, model).spawn();
    runner.wait_for(store.last_position().await.unwrap().unwrap()).await.unwrap();
    let rows = cairn_cqrs::stored_checkpoints(&path).unwrap();
    assert_eq!(rows.len(), 1);
    assert_eq!(
        (rows[0].projection.as_str(), Some(rows[0].position)),
        ("balances", runner.status().position)
    );
    assert_eq!(rows[0].source, Some(Source::All), "the file says what the projection follows");

    // Another process (here: another connection) asks for a pause.
    cairn_cqrs::request(&path, "balances", Some(true), false).unwrap();
    until("the pause", || runner.status().state == State::Paused).await;
    write_history(store.as_ref(), 10, 30, 13).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(runner.lag().await.unwrap().events, 30, "nothing applied while paused");
    assert!(cairn_cqrs::stored_checkpoints(&path).unwrap()[0].requested.paused);

    cairn_cqrs::request(&path, "balances", Some(false), false).unwrap();
    runner.wait_for(store.last_position().await.unwrap().unwrap()).await.unwrap();
    assert_eq!(sql_balances(&reader), expected(store.as_ref()).await);

    // A reset empties the model and replays everything into it.
    let applied = runner.status().applied;
    cairn_cqrs::request(&path, "balances", None, true).unwrap();
    until("the replay", || runner.status().applied >= applied + 230).await;
    runner.wait_for(store.last_position().await.unwrap().unwrap()).await.unwrap();
    assert_eq!(
        sql_balances(&SqliteModel::open(&path, SqlBalances).unwrap().reader().unwrap()),
        expected(store.as_ref()).await
    );
    assert!(
        !cairn_cqrs::stored_checkpoints(&path).unwrap()[0].requested.reset,
        "the reset clears the request"
    );
}
