use cairn_core::{ReadStreamOptions, StoreError};
use cairn_domain::{
    Aggregate, DispatchError, Dispatcher, DomainEvent, Repository, RetryPolicy, Validate,
};
use cairn_example_bank::{Account, Command, Error};
use serde::{Deserialize, Serialize};

use crate::common::{deposit, open, store};

/// A second aggregate, to show that routes go by command type.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Counter(u64);

#[derive(Debug)]
struct Increment;

impl Validate for Increment {}

#[derive(Debug, Clone, Serialize, Deserialize)]
enum Counted {
    Incremented,
}

impl DomainEvent for Counted {}

#[derive(Debug, thiserror::Error)]
#[error("never")]
struct Never;

impl Aggregate for Counter {
    const CATEGORY: &'static str = "counter";
    type Command = Increment;
    type Event = Counted;
    type Error = Never;
    fn decide(&self, _: &Increment) -> Result<Vec<Counted>, Never> {
        Ok(vec![Counted::Incremented])
    }
    fn evolve(self, _: &Counted) -> Self {
        Counter(self.0 + 1)
    }
}

/// A command no aggregate handles.
struct Unrouted;
impl Validate for Unrouted {}

#[tokio::test]
async fn commands_reach_the_aggregate_of_their_type() {
    let (store, _dir) = store();
    let dispatcher = Dispatcher::new()
        .route(Repository::<Account>::new(store.clone()))
        .route(Repository::<Counter>::new(store.clone()));
    dispatcher.dispatch("a1", &open("Ada")).await.unwrap();
    let done = dispatcher.dispatch("a1", &deposit(500)).await.unwrap();
    assert_eq!(
        (done.stream.as_str(), done.events, done.version, done.attempts),
        ("account-a1", 1, 2, 1)
    );
    let counted = dispatcher.dispatch("c1", &Increment).await.unwrap();
    assert_eq!((counted.stream.as_str(), counted.version), ("counter-c1", 1));
    assert_eq!(
        Repository::<Account>::new(store.clone()).load("a1").await.unwrap().state.balance,
        500
    );

    let err = dispatcher.dispatch("x", &Unrouted).await.unwrap_err();
    assert!(matches!(err, DispatchError::NoRoute { .. }), "{err}");
    assert!(err.to_string().contains("Dispatcher::route"), "{err}");
}

#[tokio::test]
async fn invalid_input_is_refused_before_anything_is_loaded_or_written() {
    let (store, _dir) = store();
    let dispatcher = Dispatcher::new().route(Repository::<Account>::new(store.clone()));
    let bad = [
        (Command::Open { owner: " ".into(), currency: "EUR".into() }, "owner"),
        (Command::Open { owner: "Ada".into(), currency: "euro".into() }, "currency"),
        (Command::Deposit { amount: 0, currency: "EUR".into(), note: None }, "amount"),
        (Command::Withdraw { amount: 0 }, "amount"),
    ];
    for (command, field) in bad {
        let err = dispatcher.dispatch("v1", &command).await.unwrap_err();
        let DispatchError::Invalid { invalid, .. } = &err else { panic!("{command:?}: {err}") };
        assert_eq!(invalid.field, field, "{err}");
        assert!(!err.is_conflict());
    }
    assert!(matches!(
        store.read_stream("account-v1", ReadStreamOptions::forward()).await,
        Err(StoreError::StreamNotFound { .. })
    ));
}

#[tokio::test]
async fn a_rule_refusal_is_a_rejection_with_the_aggregates_own_error() {
    let (store, _dir) = store();
    let dispatcher = Dispatcher::new().route(Repository::<Account>::new(store.clone()));
    dispatcher.dispatch("r1", &open("Ada")).await.unwrap();
    dispatcher.dispatch("r1", &deposit(100)).await.unwrap();
    let err = dispatcher.dispatch("r1", &Command::Withdraw { amount: 250 }).await.unwrap_err();
    let DispatchError::Rejected { reason, stream, .. } = &err else { panic!("{err}") };
    assert_eq!(stream, "account-r1");
    assert_eq!(
        reason.downcast_ref::<Error>(),
        Some(&Error::InsufficientFunds { balance: 100, requested: 250 })
    );
    assert_eq!(
        store.read_stream("account-r1", ReadStreamOptions::forward()).await.unwrap().len(),
        2,
        "nothing appended"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn racing_commands_conflict_without_retry_and_all_land_with_it() {
    let (store, _dir) = store();
    for (retry, account) in [(RetryPolicy::none(), "race-1"), (RetryPolicy::attempts(64), "race-2")]
    {
        let dispatcher =
            Dispatcher::new().route(Repository::<Account>::new(store.clone()).with_retry(retry));
        dispatcher.dispatch(account, &open("Ada")).await.unwrap();
        let tasks: Vec<_> = (1..=16u64)
            .map(|n| {
                let d = dispatcher.clone();
                let account = account.to_string();
                tokio::spawn(async move { (n, d.dispatch(&account, &deposit(n)).await) })
            })
            .collect();
        let (mut landed, mut conflicts) = (0, 0);
        for t in tasks {
            match t.await.unwrap() {
                (n, Ok(_)) => landed += n,
                (_, Err(e)) if e.is_conflict() => conflicts += 1,
                (_, Err(e)) => panic!("{e}"),
            }
        }
        let balance =
            Repository::<Account>::new(store.clone()).load(account).await.unwrap().state.balance;
        assert_eq!(balance, landed, "{account}: exactly the deposits that reported success");
        if account == "race-2" {
            assert_eq!((conflicts, landed), (0, (1..=16).sum()));
        }
    }
}
