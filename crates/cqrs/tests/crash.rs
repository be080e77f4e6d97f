//! Exactly-once effect across crashes, by really killing a process.
//! `kill_projection_and_resume` runs this test binary again as a child that
//! executes only `child_projector`: it follows the store into a SQLite read
//! model in small batches while it keeps appending to the store. The parent
//! SIGKILLs it at a random moment, then checks that the read model holds
//! exactly the events up to its checkpoint (none missed, none applied twice),
//! and starts the next child on the same files. At the end a runner catches
//! up and the model must equal one computed from scratch.
//!
//! Replay a run with `CAIRN_CQRS_CRASH_SEED=<seed printed by the test>`.

use std::os::unix::process::ExitStatusExt;
use std::time::Duration;

use cairn_cqrs::{Runner, Sink, Source, SqliteModel};

use crate::common::{
    Rng, SqlBalances, expected, expected_upto, spawn_ready_child, sql_balances, store_in,
    write_history, write_while_projecting,
};

const DIR_VAR: &str = "CAIRN_CQRS_CRASH_DIR";
const SEED_VAR: &str = "CAIRN_CQRS_CRASH_SEED";
const CYCLES: usize = 12;

#[test]
#[ignore = "runs only as the child process of crash::kill_projection_and_resume"]
fn child_projector() {
    let Some(dir) = std::env::var_os(DIR_VAR) else { return };
    let seed: u64 = std::env::var(SEED_VAR).ok().and_then(|s| s.parse().ok()).unwrap_or(1);
    let dir = std::path::PathBuf::from(dir);
    let rt =
        tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    rt.block_on(async move {
        let store = store_in(&dir);
        let model = SqliteModel::open(dir.join("balances.db"), SqlBalances).unwrap();
        let mut rng = Rng(seed);
        let runner =
            Runner::new(store.clone(), Source::All, model).batch(rng.range(1, 40) as usize).spawn();
        write_while_projecting(store, &runner, seed, rng).await
    });
}

#[test]
fn kill_projection_and_resume() {
    let seed = std::env::var(SEED_VAR)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| Rng::from_time().next_u64());
    eprintln!("crash::kill_projection_and_resume seed {seed} (set {SEED_VAR} to replay)");
    let mut rng = Rng(seed);
    let dir = tempfile::tempdir().unwrap();
    let rt =
        tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    // History to catch up on, so that kills land in catch-up as well as live.
    rt.block_on(async { write_history(store_in(dir.path()).as_ref(), 25, 3_000, seed).await });
    let mut checkpoints = Vec::new();

    for cycle in 0..CYCLES {
        let dir_var = dir.path().display().to_string();
        let mut child = spawn_ready_child(
            "crash::child_projector",
            &[(DIR_VAR, dir_var), (SEED_VAR, rng.next_u64().to_string())],
        );
        std::thread::sleep(Duration::from_millis(rng.range(5, 250)));
        assert!(child.try_wait().unwrap().is_none(), "cycle {cycle}: the child stopped on its own");
        child.kill().unwrap(); // SIGKILL
        assert_eq!(child.wait().unwrap().signal(), Some(9));

        rt.block_on(async {
            let store = store_in(dir.path());
            let mut model = SqliteModel::open(dir.path().join("balances.db"), SqlBalances).unwrap();
            let checkpoint = model.checkpoint().await.unwrap().map(|c| c.0);
            let held = sql_balances(&model.reader().unwrap());
            assert_eq!(
                held,
                expected_upto(store.as_ref(), checkpoint).await,
                "cycle {cycle}: the model after a kill at checkpoint {checkpoint:?}"
            );
            checkpoints.push(checkpoint);
        });
    }

    rt.block_on(async {
        let store = store_in(dir.path());
        let model = SqliteModel::open(dir.path().join("balances.db"), SqlBalances).unwrap();
        let reader = model.reader().unwrap();
        let runner = Runner::new(store.clone(), Source::All, model).spawn();
        runner.wait_for(store.last_position().await.unwrap().unwrap()).await.unwrap();
        assert_eq!(sql_balances(&reader), expected(store.as_ref()).await, "after the last restart");
    });
    let moved = checkpoints.windows(2).filter(|w| w[0] < w[1]).count();
    eprintln!("crash::kill_projection_and_resume: {CYCLES} kills, checkpoints {checkpoints:?}");
    assert_eq!(
        moved,
        CYCLES - 1,
        "each child was killed after it applied something: {checkpoints:?}"
    );
}
