use cairn_core::{ExpectedVersion, NewEvent, ReadStreamOptions, snapshot_stream_name};
use cairn_domain::{Aggregate, Repository, SnapshotPolicy};
use cairn_example_bank::{Account, Command};
use proptest::prelude::*;
use serde::{Deserialize, Serialize};

use crate::common::{deposit, open, store};

#[tokio::test]
async fn loading_starts_from_the_newest_snapshot_and_replays_only_later_events() {
    let (store, _dir) = store();
    let repo = Repository::<Account>::new(store.clone()).with_snapshots(SnapshotPolicy::every(10));
    repo.execute("s1", &open("ada")).await.unwrap();
    let mut snapshotted = Vec::new();
    for i in 1..=24 {
        let done = repo.execute("s1", &deposit(i)).await.unwrap();
        if done.snapshotted {
            snapshotted.push(done.version);
        }
    }
    assert_eq!(snapshotted, [10, 20]);
    let loaded = repo.load("s1").await.unwrap();
    assert_eq!((loaded.version, loaded.snapshot_version, loaded.replayed), (25, Some(20), 5));
    assert_eq!(loaded.state.balance, 24 * 25 / 2);

    // Snapshots are derived data: deleting them all changes nothing but speed.
    repo.delete_snapshots("s1").await.unwrap();
    let replayed = repo.load("s1").await.unwrap();
    assert_eq!((replayed.snapshot_version, replayed.replayed), (None, 25));
    assert_eq!(replayed.state, loaded.state);
    // The snapshot streams are system streams: not listed among the user's.
    assert!(store.list_streams("", 100).await.unwrap().iter().all(|s| s.stream == "account-s1"));
}

#[tokio::test]
async fn a_custom_predicate_decides_when_to_snapshot() {
    let (store, _dir) = store();
    // Snapshot whenever the balance passes 1,000.
    let policy = SnapshotPolicy::when(|a: &Account, _before, _after| a.balance >= 1000);
    let repo = Repository::<Account>::new(store).with_snapshots(policy);
    repo.execute("s2", &open("ada")).await.unwrap();
    assert!(!repo.execute("s2", &deposit(999)).await.unwrap().snapshotted);
    assert!(repo.execute("s2", &deposit(1)).await.unwrap().snapshotted);
    assert_eq!(repo.load("s2").await.unwrap().snapshot_version, Some(3));
    // An explicit snapshot, whatever the policy says.
    let never =
        Repository::<Account>::new(repo.store().clone()).with_snapshots(SnapshotPolicy::Never);
    never.execute("s2", &deposit(5)).await.unwrap();
    assert_eq!(repo.snapshot("s2").await.unwrap().snapshot_version, Some(4));
    assert_eq!(repo.load("s2").await.unwrap().replayed, 0);
}

/// The account with a new state shape: its snapshots have another version.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
struct AccountV2(Account);

impl Aggregate for AccountV2 {
    const CATEGORY: &'static str = "account";
    const SNAPSHOT_VERSION: u32 = 2;
    type Command = Command;
    type Event = cairn_example_bank::Event;
    type Error = cairn_example_bank::Error;
    fn decide(&self, command: &Command) -> Result<Vec<Self::Event>, Self::Error> {
        self.0.decide(command)
    }
    fn evolve(self, event: &Self::Event) -> Self {
        AccountV2(self.0.evolve(event))
    }
}

#[tokio::test]
async fn a_snapshot_of_another_state_version_is_ignored_and_rebuilt() {
    let (store, _dir) = store();
    let old = Repository::<Account>::new(store.clone()).with_snapshots(SnapshotPolicy::every(5));
    old.execute("s3", &open("ada")).await.unwrap();
    for _ in 0..6 {
        old.execute("s3", &deposit(10)).await.unwrap();
    }
    assert_eq!(old.load("s3").await.unwrap().snapshot_version, Some(5));

    let new = Repository::<AccountV2>::new(store.clone()).with_snapshots(SnapshotPolicy::every(5));
    let loaded = new.load("s3").await.unwrap();
    assert_eq!((loaded.snapshot_version, loaded.replayed, loaded.state.0.balance), (None, 7, 60));
    // The load replaced it with a snapshot of the new shape, which the next load uses.
    let again = new.load("s3").await.unwrap();
    assert_eq!((again.snapshot_version, again.replayed, again.state.0.balance), (Some(7), 0, 60));
    let newest = store
        .read_stream(&snapshot_stream_name("account-s3"), ReadStreamOptions::backward().limit(1))
        .await
        .unwrap();
    assert_eq!(newest[0].schema_version, 2);
}

#[tokio::test]
async fn a_snapshot_that_no_longer_matches_its_stream_is_not_trusted() {
    let (store, _dir) = store();
    let repo = Repository::<Account>::new(store.clone()).with_snapshots(SnapshotPolicy::every(2));
    repo.execute("s4", &open("ada")).await.unwrap();
    repo.execute("s4", &deposit(500)).await.unwrap();
    assert_eq!(repo.load("s4").await.unwrap().snapshot_version, Some(2));
    // The stream is deleted and started over: version 2 is now another event.
    store.delete_stream("account-s4", ExpectedVersion::Any, false).await.unwrap();
    let never = Repository::<Account>::new(store.clone()).with_snapshots(SnapshotPolicy::Never);
    never.execute("s4", &open("bob")).await.unwrap();
    never.execute("s4", &deposit(7)).await.unwrap();
    let loaded = repo.load("s4").await.unwrap();
    assert_eq!(
        (loaded.state.owner.as_str(), loaded.state.balance, loaded.snapshot_version),
        ("bob", 7, None)
    );

    // A snapshot whose payload does not parse is not trusted either.
    store
        .append(
            &snapshot_stream_name("account-s4"),
            ExpectedVersion::Any,
            vec![NewEvent::json_bytes("Snapshot", &b"{\"covers_version\": 2}"[..])],
        )
        .await
        .unwrap();
    let loaded = repo.load("s4").await.unwrap();
    assert_eq!((loaded.state.balance, loaded.replayed), (7, 2));
}

#[derive(Debug, Clone)]
enum Step {
    Deposit(u64),
    Withdraw(u64),
}

fn steps() -> impl Strategy<Value = Vec<Step>> {
    prop::collection::vec(
        prop_oneof![(1..500u64).prop_map(Step::Deposit), (1..800u64).prop_map(Step::Withdraw)],
        0..60,
    )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    /// Snapshot + tail replay equals a full replay, at the head and at every version.
    #[test]
    fn replay_equals_snapshot_plus_tail(history in steps(), every in 1..12u64) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let (store, _dir) = store();
            let snap = Repository::<Account>::new(store.clone()).with_snapshots(SnapshotPolicy::every(every));
            let plain = Repository::<Account>::new(store.clone()).with_snapshots(SnapshotPolicy::Never);
            snap.execute("p", &open("ada")).await.unwrap();
            for step in &history {
                let command = match step { Step::Deposit(a) => deposit(*a), Step::Withdraw(a) => Command::Withdraw { amount: *a } };
                // Withdrawals beyond the balance are refused; that is part of the history too.
                let _ = snap.execute("p", &command).await;
            }
            let (a, b) = (snap.load("p").await.unwrap(), plain.load("p").await.unwrap());
            prop_assert_eq!(&a.state, &b.state);
            prop_assert_eq!(a.version, b.version);
            prop_assert_eq!(a.replayed as u64, a.version - a.snapshot_version.unwrap_or(0));
            if a.version >= every { prop_assert!(a.snapshot_version.is_some()); }
            for v in 0..=a.version {
                let at = cairn_domain::At::Version(v);
                prop_assert_eq!(snap.load_at("p", at).await.unwrap().state, plain.load_at("p", at).await.unwrap().state);
            }
            Ok(())
        })?;
    }
}
