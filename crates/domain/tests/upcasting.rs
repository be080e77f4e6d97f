use cairn_core::{ExpectedVersion, NewEvent, ReadStreamOptions};
use cairn_domain::{EventCodec, Upcasters, census};
use cairn_example_bank::Event;
use serde_json::json;

use crate::common::{bank, deposit, open};

/// What the code wrote before deposits had a currency.
fn v1_deposit(amount: u64) -> NewEvent {
    NewEvent::json("MoneyDeposited", &json!({ "amount": amount })).unwrap()
}

#[tokio::test]
async fn stored_v1_events_are_seen_as_v2_by_the_aggregate_and_the_history() {
    let (repo, _dir) = bank();
    let opened =
        NewEvent::json("AccountOpened", &json!({"owner": "old", "currency": "USD"})).unwrap();
    repo.store()
        .append(
            "account-u1",
            ExpectedVersion::NoStream,
            vec![opened, v1_deposit(300), v1_deposit(200)],
        )
        .await
        .unwrap();
    repo.execute(
        "u1",
        &cairn_example_bank::Command::Deposit { amount: 50, currency: "USD".into(), note: None },
    )
    .await
    .unwrap();

    let loaded = repo.load("u1").await.unwrap();
    assert_eq!(loaded.state.balance, 550);
    let history = repo.history("u1").await.unwrap();
    let seen: Vec<_> = history.iter().map(|h| (h.stored_schema_version, h.event.clone())).collect();
    assert_eq!(
        seen[1],
        (1, Event::MoneyDeposited { amount: 300, currency: "USD".into(), note: None })
    );
    assert_eq!(
        seen[3],
        (2, Event::MoneyDeposited { amount: 50, currency: "USD".into(), note: None })
    );
    assert_eq!(history.iter().map(|h| h.state.balance).collect::<Vec<_>>(), [0, 300, 500, 550]);
    // The stored bytes are untouched.
    let stored = repo
        .store()
        .read_stream("account-u1", ReadStreamOptions::forward().from_version(2).limit(1))
        .await
        .unwrap();
    assert_eq!(stored[0].json::<serde_json::Value>().unwrap(), json!({"amount": 300}));
    assert_eq!(stored[0].schema_version, 1);
}

#[tokio::test]
async fn the_census_counts_each_type_at_each_version() {
    let (repo, _dir) = bank();
    repo.execute("c1", &open("ada")).await.unwrap();
    for _ in 0..9 {
        repo.execute("c1", &deposit(1)).await.unwrap();
    }
    repo.store().append("account-c2", ExpectedVersion::Any, vec![v1_deposit(1)]).await.unwrap();
    repo.store().set_stream_metadata("account-c1", Default::default()).await.unwrap();
    let mut pages = 0;
    let c = census(repo.store().as_ref(), |_, _| pages += 1).await.unwrap();
    assert_eq!(c.events, 11, "system events are not counted");
    assert_eq!(c.types["MoneyDeposited"][&2], 9);
    assert_eq!(c.types["MoneyDeposited"][&1], 1);
    assert_eq!(c.types["AccountOpened"][&1], 1);
    assert!((c.share("MoneyDeposited", 2) - 0.9).abs() < 1e-9);
    assert!(pages >= 1);
}

fn recorded(event_type: &str, version: u32, data: serde_json::Value) -> cairn_core::RecordedEvent {
    cairn_core::RecordedEvent {
        id: uuid::Uuid::now_v7(),
        stream: "account-x".into(),
        version: 1,
        position: cairn_core::Position(1),
        event_type: event_type.into(),
        data: serde_json::to_vec(&data).unwrap().into(),
        content_type: cairn_core::ContentType::Json,
        metadata: Default::default(),
        schema_version: version,
        tags: vec![],
        timestamp: cairn_core::Timestamp::now(),
    }
}

#[test]
fn a_chain_runs_every_step_and_renames_keep_old_names_readable() {
    // Stored history: "Credited" v1 {value} → renamed MoneyDeposited, v1 → v2 adds currency.
    let upcasters = Upcasters::new()
        .rename("Credited", "MoneyDeposited")
        .add("MoneyDeposited", 1, |mut d| {
            if let Some(v) = d.get("value").cloned() {
                d["amount"] = v;
            }
            d
        })
        .add("MoneyDeposited", 2, |d| d); // never used: v2 is current
    let codec = EventCodec::<Event>::with_upcasters(upcasters.add("MoneyDeposited", 1, |mut d| {
        d["amount"] = d["value"].clone();
        d["currency"] = json!("USD");
        d
    }));
    let event = codec.decode(&recorded("Credited", 1, json!({"value": 7}))).unwrap();
    assert_eq!(event, Event::MoneyDeposited { amount: 7, currency: "USD".into(), note: None });
    let up = codec.upcast_json(&recorded("Credited", 1, json!({"value": 7}))).unwrap();
    assert_eq!((up.event_type.as_str(), up.schema_version), ("MoneyDeposited", 2));
}

#[test]
fn missing_upcasters_unknown_types_and_newer_versions_are_clear_errors() {
    let bare = EventCodec::<Event>::with_upcasters(Upcasters::new());
    let err = bare.decode(&recorded("MoneyDeposited", 1, json!({"amount": 1}))).unwrap_err();
    assert!(err.reason.contains("no upcaster from MoneyDeposited v1 to v2"), "{err}");
    let codec = EventCodec::<Event>::new();
    let err = codec
        .decode(&recorded("MoneyDeposited", 3, json!({"amount": 1, "currency": "EUR"})))
        .unwrap_err();
    assert!(err.reason.contains("deploy the newer code"), "{err}");
    let err = codec.decode(&recorded("MoneyLaundered", 1, json!({}))).unwrap_err();
    assert!(err.reason.contains("unknown variant"), "{err}");
    assert!(err.to_string().contains("account-x@1"), "{err}");
    let err = codec.decode(&recorded("MoneyWithdrawn", 1, json!({"amount": "ten"}))).unwrap_err();
    assert!(err.reason.contains("invalid type"), "{err}");
}

#[test]
fn every_kind_of_variant_round_trips() {
    let codec = EventCodec::<Event>::new();
    for event in [
        Event::AccountOpened { owner: "ada".into(), currency: "EUR".into() },
        Event::MoneyDeposited { amount: 5, currency: "EUR".into(), note: None },
        Event::AccountClosed,
    ] {
        let new = codec.encode(&event).unwrap();
        let stored = recorded(
            &new.event_type,
            new.schema_version,
            serde_json::from_slice(&new.data).unwrap(),
        );
        assert_eq!(codec.decode(&stored).unwrap(), event);
    }
    assert_eq!(codec.encode(&Event::AccountClosed).unwrap().event_type, "AccountClosed");
}
