use std::time::Duration;

use cairn_core::{ReadStreamOptions, Timestamp};
use cairn_domain::{At, Repository, SnapshotPolicy};
use cairn_example_bank::{Account, Command, Error};

use crate::common::{deposit, open, store};

async fn account_with_history(repo: &Repository<Account>, id: &str) {
    repo.execute(id, &open("ada")).await.unwrap();
    for amount in [100, 200, 300] {
        repo.execute(id, &deposit(amount)).await.unwrap();
        // Distinct timestamps, so that each event has its own moment.
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    repo.execute(id, &Command::Withdraw { amount: 50 }).await.unwrap();
}

#[tokio::test]
async fn the_state_at_each_version_position_and_time() {
    let (store, _dir) = store();
    for policy in [SnapshotPolicy::Never, SnapshotPolicy::every(2)] {
        let repo = Repository::<Account>::new(store.clone()).with_snapshots(policy.clone());
        let id = format!("t-{policy:?}");
        account_with_history(&repo, &id).await;
        let events = store
            .read_stream(&format!("account-{id}"), ReadStreamOptions::forward())
            .await
            .unwrap();
        let balances = [0, 0, 100, 300, 600, 550];
        for (v, expected) in balances.iter().enumerate() {
            let at_version = repo.load_at(&id, At::Version(v as u64)).await.unwrap();
            assert_eq!(
                (at_version.version, at_version.state.balance),
                (v as u64, *expected),
                "{policy:?} version {v}"
            );
        }
        for e in &events {
            let expected = balances[e.version as usize];
            assert_eq!(
                repo.load_at(&id, At::Position(e.position)).await.unwrap().state.balance,
                expected
            );
            let at_time = repo.load_at(&id, At::Time(e.timestamp)).await.unwrap();
            assert_eq!(
                (at_time.version, at_time.state.balance),
                (e.version, expected),
                "{policy:?} at {}",
                e.timestamp.to_rfc3339()
            );
        }
        // Before the first event and after the last.
        let before = Timestamp(events[0].timestamp.as_micros() - 1);
        assert_eq!(repo.load_at(&id, At::Time(before)).await.unwrap().version, 0);
        assert_eq!(repo.load_at(&id, At::Time(Timestamp::now())).await.unwrap().state.balance, 550);
    }
}

#[tokio::test]
async fn the_history_lists_each_event_with_the_state_after_it() {
    let (store, _dir) = store();
    let repo = Repository::<Account>::new(store);
    account_with_history(&repo, "h1").await;
    let history = repo.history("h1").await.unwrap();
    let balances: Vec<_> = history.iter().map(|h| (h.version, h.state.balance)).collect();
    assert_eq!(balances, [(1, 0), (2, 100), (3, 300), (4, 600), (5, 550)]);
    assert!(
        history
            .windows(2)
            .all(|w| w[0].position < w[1].position && w[0].timestamp <= w[1].timestamp)
    );
    assert_eq!(history[4].stored_type, "MoneyWithdrawn");
}

#[tokio::test]
async fn a_what_if_branch_runs_commands_in_memory_and_writes_nothing() {
    let (store, _dir) = store();
    let repo = Repository::<Account>::new(store.clone());
    account_with_history(&repo, "w1").await;
    let head = store.head_position().await.unwrap();

    // What if, at version 3 (balance 300), we had withdrawn 250 and then 100?
    let mut branch = repo.branch("w1", At::Version(3)).await.unwrap();
    assert_eq!(branch.state().balance, 300);
    branch.execute(&Command::Withdraw { amount: 250 }).unwrap();
    assert_eq!(
        branch.execute(&Command::Withdraw { amount: 100 }).unwrap_err(),
        Error::InsufficientFunds { balance: 50, requested: 100 }
    );
    assert_eq!((branch.version(), branch.state().balance, branch.events().len()), (4, 50, 1));

    let comparison = repo.compare("w1", &branch).await.unwrap();
    assert_eq!(comparison.real.state.balance, 550);
    assert_eq!(comparison.differences.len(), 1);
    assert_eq!(comparison.differences[0].path, "/balance");
    assert_eq!(comparison.differences[0].real, Some(550.into()));
    assert_eq!(comparison.differences[0].branch, Some(50.into()));
    assert_eq!(store.head_position().await.unwrap(), head, "the branch wrote nothing");
}
