use std::sync::Arc;

use cairn_core::{ReadAllOptions, ReadStreamOptions};
use cairn_domain::{CommandContext, RepositoryError, RetryPolicy};
use cairn_example_bank::{Command, Error, Event};
use uuid::Uuid;

use crate::common::{bank, deposit, open};

#[tokio::test]
async fn execute_appends_the_decided_events_and_load_replays_them() {
    let (repo, _dir) = bank();
    let done = repo.execute("a1", &open("ada")).await.unwrap();
    assert_eq!((done.version, done.attempts), (1, 1));
    repo.execute("a1", &deposit(250)).await.unwrap();
    let done = repo.execute("a1", &Command::Withdraw { amount: 100 }).await.unwrap();
    assert_eq!(done.events, vec![Event::MoneyWithdrawn { amount: 100 }]);
    assert_eq!(done.state.balance, 150);

    let loaded = repo.load("a1").await.unwrap();
    assert_eq!((loaded.version, loaded.state.balance, loaded.replayed), (3, 150, 3));
    assert_eq!(loaded.stream, "account-a1");
    let stored =
        repo.store().read_stream("account-a1", ReadStreamOptions::forward()).await.unwrap();
    let types: Vec<_> = stored.iter().map(|e| (e.event_type.as_str(), e.schema_version)).collect();
    assert_eq!(types, [("AccountOpened", 1), ("MoneyDeposited", 2), ("MoneyWithdrawn", 1)]);
    assert_eq!(
        stored[1].json::<serde_json::Value>().unwrap(),
        serde_json::json!({"amount": 250, "currency": "EUR"})
    );
}

#[tokio::test]
async fn a_rejected_command_writes_nothing() {
    let (repo, _dir) = bank();
    repo.execute("a2", &open("ada")).await.unwrap();
    let head = repo.store().head_position().await.unwrap();
    let err = repo.execute("a2", &Command::Withdraw { amount: 1 }).await.unwrap_err();
    assert_eq!(err.rejection(), Some(&Error::InsufficientFunds { balance: 0, requested: 1 }));
    assert!(err.to_string().contains("insufficient funds"), "{err}");
    assert_eq!(repo.store().head_position().await.unwrap(), head);
    // A missing account is a rejection too, and creates no stream.
    let err = repo.execute("nobody", &deposit(1)).await.unwrap_err();
    assert_eq!(err.rejection(), Some(&Error::NotOpen));
    assert!(repo.store().stream_info("account-nobody").await.is_err());
}

#[tokio::test]
async fn correlation_and_causation_ids_flow_from_the_command_into_its_events() {
    let (repo, _dir) = bank();
    repo.execute("a3", &open("ada")).await.unwrap();
    let conversation = Uuid::now_v7();
    let ctx = CommandContext::new().correlated(conversation).with("user", "teller-7");
    let mut ctx2 = ctx.clone();
    ctx2.command_id = Uuid::now_v7();
    repo.execute_with("a3", &deposit(10), &ctx).await.unwrap();
    repo.execute_with("a3", &deposit(20), &ctx2).await.unwrap();
    let events = repo
        .store()
        .read_stream("account-a3", ReadStreamOptions::forward().from_version(2))
        .await
        .unwrap();
    assert_eq!(events[0].metadata.correlation_id, Some(conversation));
    assert_eq!(events[0].metadata.causation_id, Some(ctx.command_id));
    assert_eq!(events[1].metadata.causation_id, Some(ctx2.command_id));
    assert_eq!(events[0].metadata.extra.get("user").map(String::as_str), Some("teller-7"));

    // A command with no correlation starts a conversation named after itself,
    // and a command caused by an event joins that event's conversation.
    let first = CommandContext::new();
    repo.execute_with("a4", &open("bob"), &first).await.unwrap();
    let opened = repo
        .store()
        .read_stream("account-a4", ReadStreamOptions::forward())
        .await
        .unwrap()
        .remove(0);
    assert_eq!(opened.metadata.correlation_id, Some(first.command_id));
    let reaction = CommandContext::caused_by(&opened);
    repo.execute_with("a4", &deposit(5), &reaction).await.unwrap();
    let deposited = repo
        .store()
        .read_stream("account-a4", ReadStreamOptions::forward().from_version(2))
        .await
        .unwrap()
        .remove(0);
    assert_eq!(deposited.metadata.correlation_id, Some(first.command_id));
    assert_eq!(deposited.metadata.causation_id, Some(reaction.command_id));
}

#[tokio::test]
async fn without_a_retry_policy_a_concurrent_command_gets_the_conflict() {
    let (repo, _dir) = bank();
    repo.execute("a5", &open("ada")).await.unwrap();
    // Two tellers race; with one attempt each, the losers get a clear conflict.
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let repo = repo.clone();
        tasks.push(tokio::spawn(async move { repo.execute("a5", &deposit(10)).await }));
    }
    let mut ok = 0;
    let mut conflicts = 0;
    for t in tasks {
        match t.await.unwrap() {
            Ok(_) => ok += 1,
            Err(RepositoryError::Conflict { stream, expected, actual_version, attempts }) => {
                assert_eq!(stream, "account-a5");
                assert!(actual_version > expected, "{expected} {actual_version}");
                assert_eq!(attempts, 1);
                conflicts += 1;
            }
            Err(e) => panic!("unexpected {e}"),
        }
    }
    let loaded = repo.load("a5").await.unwrap();
    assert_eq!(loaded.state.balance, 10 * ok);
    assert_eq!(ok + conflicts, 8);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_retry_policy_resolves_conflicts_without_losing_a_deposit() {
    let (repo, _dir) = bank();
    let repo = repo.with_retry(RetryPolicy::attempts(200));
    repo.execute("a6", &open("ada")).await.unwrap();
    let tasks = 16;
    let each = 10;
    let barrier = Arc::new(tokio::sync::Barrier::new(tasks));
    let mut handles = Vec::new();
    for t in 0..tasks {
        let repo = repo.clone();
        let barrier = barrier.clone();
        handles.push(tokio::spawn(async move {
            barrier.wait().await;
            let mut retried = 0;
            for i in 0..each {
                let done = repo.execute("a6", &deposit((t * each + i + 1) as u64)).await.unwrap();
                retried += done.attempts - 1;
            }
            retried
        }));
    }
    let mut retried = 0;
    for h in handles {
        retried += h.await.unwrap();
    }
    let n = (tasks * each) as u64;
    let loaded = repo.load("a6").await.unwrap();
    assert_eq!(loaded.state.balance, n * (n + 1) / 2, "every deposit counted once");
    assert_eq!(loaded.version, n + 1);
    assert!(retried > 0, "16 racing tasks should have conflicted at least once");
    // Each successful attempt wrote exactly one event: no duplicates from retries.
    let all = repo.store().read_all(ReadAllOptions::forward()).await.unwrap();
    assert_eq!(all.iter().filter(|e| e.stream == "account-a6").count() as u64, n + 1);
}

#[tokio::test]
async fn a_per_command_retry_policy_overrides_the_repository() {
    let (repo, _dir) = bank();
    repo.execute("a7", &open("ada")).await.unwrap();
    let ctx = CommandContext::new().with_retry(RetryPolicy::attempts(50));
    let mut handles = Vec::new();
    for _ in 0..8 {
        let (repo, ctx) = (repo.clone(), ctx.clone());
        handles.push(tokio::spawn(async move {
            repo.execute_with("a7", &deposit(1), &ctx).await.map(|_| ())
        }));
    }
    for h in handles {
        h.await.unwrap().unwrap();
    }
    assert_eq!(repo.load("a7").await.unwrap().state.balance, 8);
}

#[tokio::test]
async fn a_deleted_account_starts_over_and_a_tombstoned_one_reports_it() {
    let (repo, _dir) = bank();
    repo.execute("a8", &open("ada")).await.unwrap();
    repo.execute("a8", &deposit(9)).await.unwrap();
    repo.store()
        .delete_stream("account-a8", cairn_core::ExpectedVersion::Any, false)
        .await
        .unwrap();
    let loaded = repo.load("a8").await.unwrap();
    assert_eq!((loaded.version, loaded.state.balance), (0, 0));
    assert_eq!(repo.execute("a8", &open("bob")).await.unwrap().state.owner, "bob");
    repo.store().delete_stream("account-a8", cairn_core::ExpectedVersion::Any, true).await.unwrap();
    let err = repo.execute("a8", &deposit(1)).await.unwrap_err();
    assert!(
        matches!(err, RepositoryError::Store(cairn_core::StoreError::StreamDeleted { .. })),
        "{err}"
    );
}

#[tokio::test]
async fn the_cache_replays_only_new_events_and_never_trusts_a_stale_entry() {
    let (plain, _dir) = bank();
    let cached = plain.clone().with_cache(2);
    cached.execute("k1", &open("ada")).await.unwrap();
    cached.execute("k1", &deposit(10)).await.unwrap();
    let first = cached.load("k1").await.unwrap();
    assert_eq!((first.cached, first.replayed, first.state.balance), (true, 0, 10));

    // Another writer (no shared cache) moves the stream on: only its events are replayed.
    plain.execute("k1", &deposit(5)).await.unwrap();
    plain.execute("k1", &deposit(7)).await.unwrap();
    let moved = cached.load("k1").await.unwrap();
    assert_eq!(
        (moved.cached, moved.replayed, moved.version, moved.state.balance),
        (true, 2, 4, 22)
    );

    // The stream is deleted and rewritten to the same version: the cached state
    // is not the stream's any more, and the id check notices.
    plain
        .store()
        .delete_stream("account-k1", cairn_core::ExpectedVersion::Any, false)
        .await
        .unwrap();
    plain.execute("k1", &open("bob")).await.unwrap();
    for amount in [1, 1, 1] {
        plain.execute("k1", &deposit(amount)).await.unwrap();
    }
    let reset = cached.load("k1").await.unwrap();
    assert_eq!(
        (reset.cached, reset.replayed, reset.state.owner.as_str(), reset.state.balance),
        (false, 4, "bob", 3)
    );

    // Beyond its capacity the cache forgets, and loads stay correct.
    for id in ["k2", "k3", "k4"] {
        cached.execute(id, &open(id)).await.unwrap();
        cached.execute(id, &deposit(3)).await.unwrap();
    }
    for id in ["k1", "k2", "k3", "k4"] {
        let loaded = cached.load(id).await.unwrap();
        assert_eq!(loaded.state, plain.load(id).await.unwrap().state);
    }
}
