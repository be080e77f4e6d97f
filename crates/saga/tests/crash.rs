//! Sagas survive `kill -9` of their runner. `kill_runner_at_random_points`
//! runs this test binary again as a child that executes only `child_runner`:
//! it starts 100 order sagas (a quarter fail at the charge, a quarter at the
//! reservation) whose steps append their effect to `effects-<id>` with the
//! step's key as event id, and log every call to `calls-<id>`. The parent
//! SIGKILLs the child at random moments, round after round, then lets a last
//! runner finish. Every saga must reach its final state with each effect
//! exactly once, every completed step undone in reverse when it failed, and
//! only the steps in flight at a kill called again.
//!
//! Replay a run with `CAIRN_SAGA_CRASH_SEED=<seed printed by the test>`.

use std::os::unix::process::ExitStatusExt;
use std::sync::Arc;
use std::time::Duration;

use cairn_core::conformance::spawn_ready_child;
use cairn_core::{EventStore, ExpectedVersion, NewEvent, ReadStreamOptions};
use cairn_log::EmbeddedStore;
use cairn_saga::{Saga, SagaRunner, Status, Step, StepContext, StepError};
use serde_json::json;

const DIR_VAR: &str = "CAIRN_SAGA_CRASH_DIR";
const SEED_VAR: &str = "CAIRN_SAGA_CRASH_SEED";
const SAGAS: usize = 100;
const MAX_RUNNING: usize = 8;
const STEPS: [&str; 3] = ["create", "charge", "reserve"];

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next() % (hi - lo).max(1)
    }
}

fn failing_step(id: usize) -> Option<&'static str> {
    match id % 4 {
        1 => Some("charge"),
        2 => Some("reserve"),
        _ => None,
    }
}

/// Logs the call, waits a little (so kills land mid-step), then writes the
/// effect once, keyed by the step's key.
async fn call(
    store: Arc<dyn EventStore>,
    ctx: StepContext,
    effect: String,
    fail: bool,
) -> Result<(), StepError> {
    let calls = format!("calls-{}", ctx.saga_id);
    store
        .append(
            &calls,
            ExpectedVersion::Any,
            vec![NewEvent::json("Called", &json!({ "effect": effect })).unwrap()],
        )
        .await?;
    let pause = 20 + ctx.event_id().as_u128() as u64 % 60;
    tokio::time::sleep(Duration::from_millis(pause)).await;
    if fail {
        return Err(StepError::new(format!("{effect} refused")));
    }
    let event = NewEvent::json(effect.as_str(), &json!({}))
        .unwrap()
        .with_id(ctx.event_id())
        .with_metadata(ctx.metadata());
    store.append(&format!("effects-{}", ctx.saga_id), ExpectedVersion::Any, vec![event]).await?;
    Ok(())
}

fn order_saga(store: &Arc<dyn EventStore>) -> Saga {
    let mut saga = Saga::new("order");
    for name in STEPS {
        let (s1, s2) = (store.clone(), store.clone());
        saga = saga.step(
            Step::new(name, move |ctx: StepContext| {
                let store = s1.clone();
                async move {
                    let fail = ctx.input::<serde_json::Value>()?["fail"] == name;
                    call(store, ctx, name.to_string(), fail).await
                }
            })
            .compensate(move |ctx: StepContext| {
                call(s2.clone(), ctx, format!("undo:{name}"), false)
            }),
        );
    }
    saga
}

async fn run_all(store: Arc<dyn EventStore>, checkpoint_ms: u64, ready: bool) -> SagaRunner {
    let runner = SagaRunner::builder(store.clone(), "shop")
        .saga(order_saga(&store))
        .max_running(MAX_RUNNING)
        .checkpoint_every(Duration::from_millis(checkpoint_ms))
        .run()
        .await
        .expect("runner");
    if ready {
        println!("\nready");
    }
    // Only the sagas never started: the others must be found by recovery.
    for id in 0..SAGAS {
        if cairn_saga::load(store.as_ref(), "order", &id.to_string()).await.expect("load").is_none()
        {
            runner
                .start("order", &id.to_string(), &json!({ "fail": failing_step(id) }))
                .await
                .expect("start");
        }
    }
    runner
}

#[test]
#[ignore = "runs only as the child process of kill_runner_at_random_points"]
fn child_runner() {
    let Some(dir) = std::env::var_os(DIR_VAR) else { return };
    let seed: u64 = std::env::var(SEED_VAR).ok().and_then(|s| s.parse().ok()).unwrap_or(1);
    let rt =
        tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    rt.block_on(async move {
        let store: Arc<dyn EventStore> = Arc::new(EmbeddedStore::open(&dir).expect("open store"));
        let runner = run_all(store, Rng(seed | 1).range(5, 200), true).await;
        for id in 0..SAGAS {
            runner.wait("order", &id.to_string()).await.expect("wait");
        }
        // The parent stopped reading after "ready": ignore a closed pipe.
        let _ = std::io::Write::write_all(&mut std::io::stdout(), b"all final\n");
        std::future::pending::<()>().await;
    });
}

async fn types(store: &dyn EventStore, stream: &str) -> Vec<String> {
    match store.read_stream(stream, ReadStreamOptions::forward()).await {
        // A call's line is the effect it was for; an effect's, its type.
        Ok(events) => events
            .into_iter()
            .map(|e| if e.event_type == "Called" { called_effect(&e) } else { e.event_type })
            .collect(),
        Err(cairn_core::StoreError::StreamNotFound { .. }) => Vec::new(),
        Err(e) => panic!("{e}"),
    }
}

fn called_effect(call: &cairn_core::RecordedEvent) -> String {
    call.json::<serde_json::Value>().unwrap()["effect"].as_str().unwrap().to_string()
}

#[test]
fn kill_runner_at_random_points() {
    let seed = std::env::var(SEED_VAR).ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos()
            as u64
            | 1
    });
    eprintln!("crash::kill_runner_at_random_points seed {seed} (set {SEED_VAR} to replay)");
    let mut rng = Rng(seed);
    let dir = tempfile::tempdir().unwrap();
    let mut kills = 0;
    for round in 0..10 {
        let envs =
            [(DIR_VAR, dir.path().display().to_string()), (SEED_VAR, (rng.next() | 1).to_string())];
        let mut child = spawn_ready_child("child_runner", &envs);
        std::thread::sleep(Duration::from_millis(rng.range(5, 120)));
        child.kill().unwrap();
        let status = child.wait().unwrap();
        if status.signal() == Some(9) {
            kills += 1;
        } else {
            panic!("round {round}: the child ended by itself: {status}");
        }
    }

    let rt =
        tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    rt.block_on(async move {
        let store: Arc<dyn EventStore> =
            Arc::new(EmbeddedStore::open(dir.path()).expect("open store"));
        let runner = run_all(store.clone(), 50, false).await;
        eprintln!("after {kills} kills, the last runner resumed {} sagas", runner.recovered());
        // The rounds are too short for all the work: the kills landed mid-way.
        assert!(
            runner.recovered() > 0,
            "nothing was left to resume: the test did not test recovery"
        );
        let mut repeats = 0;
        for id in 0..SAGAS {
            let state = tokio::time::timeout(
                Duration::from_secs(30),
                runner.wait("order", &id.to_string()),
            )
            .await
            .expect("finishes")
            .unwrap();
            let fail = failing_step(id);
            let expected_status =
                if fail.is_some() { Status::Compensated } else { Status::Completed };
            assert_eq!(state.status, expected_status, "saga {id}");
            // Each effect once; the completed steps undone newest first.
            let done: Vec<&str> = STEPS.iter().copied().take_while(|s| Some(*s) != fail).collect();
            let mut expected: Vec<String> = done.iter().map(|s| s.to_string()).collect();
            if fail.is_some() {
                expected.extend(done.iter().rev().map(|s| format!("undo:{s}")));
            }
            assert_eq!(
                types(store.as_ref(), &format!("effects-{id}")).await,
                expected,
                "saga {id} (seed {seed})"
            );
            // Called again only if a kill caught it in flight.
            let calls = types(store.as_ref(), &format!("calls-{id}")).await;
            let needed = expected.len() + usize::from(fail.is_some());
            assert!(calls.len() >= needed, "saga {id}: {calls:?}");
            repeats += calls.len() - needed;
        }
        eprintln!("{repeats} calls repeated after kills");
        assert!(
            repeats <= kills * MAX_RUNNING,
            "{repeats} repeated calls after {kills} kills: completed steps ran again (seed {seed})"
        );
        runner.shutdown().await;
    });
}
