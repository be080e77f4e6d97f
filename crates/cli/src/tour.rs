//! `cairn tour`: the patterns end to end on a fresh embedded store, narrated.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Result;
use cairn_core::{
    EventStore, ExpectedVersion, NewEvent, ReadAllOptions, ReadStreamOptions, StartFrom,
    StoreError, SubscriptionTarget,
};
use cairn_log::EmbeddedStore;
use serde_json::json;

pub(crate) fn step(title: &str) {
    println!("\n{}", bold(&format!("▸ {title}")));
}

/// `text` in bold on a terminal; plain when the output goes to a file or a
/// pipe, or when `NO_COLOR` is set (<https://no-color.org>).
pub(crate) fn bold(text: &str) -> String {
    use std::io::IsTerminal;
    let colour = std::io::stdout().is_terminal()
        && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
    if colour { format!("\x1b[1m{text}\x1b[0m") } else { text.to_string() }
}

fn balance(events: &[cairn_core::RecordedEvent]) -> i64 {
    events
        .iter()
        .map(|e| {
            let amount =
                e.json::<serde_json::Value>().ok().and_then(|v| v["amount"].as_i64()).unwrap_or(0);
            match e.event_type.as_str() {
                "MoneyDeposited" => amount,
                "MoneyWithdrawn" => -amount,
                _ => 0,
            }
        })
        .sum()
}

pub(crate) async fn run(keep: Option<PathBuf>) -> Result<()> {
    let tmp = tempfile::Builder::new().prefix("cairn-tour-").tempdir()?;
    let dir = keep.unwrap_or_else(|| tmp.path().to_path_buf());
    println!("Cairn tour — an embedded event store in {}", dir.display());
    let store = EmbeddedStore::open(&dir)?;

    step("1. Every change is an event appended to a stream");
    let opened = NewEvent::json("AccountOpened", &json!({"owner": "Ada", "currency": "EUR"}))?;
    let r = store.append("account-ada", ExpectedVersion::NoStream, vec![opened]).await?;
    println!(
        "   AccountOpened → account-ada version {} at global position {}",
        r.next_version, r.position
    );
    let deposits = vec![
        NewEvent::json("MoneyDeposited", &json!({"amount": 100, "currency": "EUR"}))?,
        NewEvent::json("MoneyDeposited", &json!({"amount": 50, "currency": "EUR"}))?,
    ];
    let r = store.append("account-ada", ExpectedVersion::Exact(1), deposits).await?;
    println!("   two deposits in one atomic append → version {}", r.next_version);

    step("2. State is rebuilt by replaying the events");
    let events = store.read_stream("account-ada", ReadStreamOptions::forward()).await?;
    for e in &events {
        println!("   v{} {} {}", e.version, e.event_type, String::from_utf8_lossy(&e.data));
    }
    println!("   balance = {}", balance(&events));

    step("3. Optimistic concurrency: two tellers decide on the same version");
    let teller_a = store
        .append(
            "account-ada",
            ExpectedVersion::Exact(3),
            vec![NewEvent::json("MoneyWithdrawn", &json!({"amount": 120}))?],
        )
        .await;
    let teller_b = store
        .append(
            "account-ada",
            ExpectedVersion::Exact(3),
            vec![NewEvent::json("MoneyWithdrawn", &json!({"amount": 120}))?],
        )
        .await;
    println!(
        "   teller A: {}",
        teller_a
            .as_ref()
            .map(|r| format!("withdrew 120, version {}", r.next_version))
            .unwrap_or_else(|e| e.to_string())
    );
    match teller_b {
        Err(StoreError::WrongExpectedVersion { actual_version, .. }) => println!(
            "   teller B: rejected, the account is now at version {actual_version}; B reloads and sees the balance is {} — no overdraft",
            balance(&store.read_stream("account-ada", ReadStreamOptions::forward()).await?)
        ),
        other => println!("   teller B: {other:?}"),
    }

    step("4. Retrying an append is safe: same event ids, no duplicate");
    let fee = NewEvent::json("FeeCharged", &json!({"amount": 2}))?;
    let first = store.append("account-ada", ExpectedVersion::Any, vec![fee.clone()]).await?;
    let retry = store.append("account-ada", ExpectedVersion::Any, vec![fee]).await?;
    println!(
        "   first: version {}, retry: version {} (same result, written once)",
        first.next_version, retry.next_version
    );

    step("5. A subscriber catches up on history, then follows live");
    let mut sub = store.subscribe(SubscriptionTarget::All, StartFrom::Start).await?;
    // History so far, plus the one live event written below.
    let total = store.read_all(ReadAllOptions::forward()).await?.len() + 1;
    let writer = store.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let _ = writer
            .append(
                "account-bob",
                ExpectedVersion::NoStream,
                vec![NewEvent::json("AccountOpened", &json!({"owner": "Bob"})).unwrap()],
            )
            .await;
    });
    for _ in 0..total {
        let e = tokio::time::timeout(Duration::from_secs(5), sub.next()).await?.expect("open")?;
        println!("   [{:>4}] {}@{} {}", e.position, e.stream, e.version, e.event_type);
    }

    step("6. Streams can be deleted: soft (the name can be reused) or hard (a tombstone)");
    store.delete_stream("account-bob", ExpectedVersion::Any, false).await?;
    println!(
        "   after a soft delete, reading account-bob: {}",
        store.read_stream("account-bob", ReadStreamOptions::forward()).await.unwrap_err()
    );
    store.delete_stream("account-bob", ExpectedVersion::Any, true).await?;
    println!(
        "   after a hard delete, appending to it: {}",
        store
            .append(
                "account-bob",
                ExpectedVersion::Any,
                vec![NewEvent::json("AccountOpened", &json!({}))?]
            )
            .await
            .unwrap_err()
    );

    step("7. Acknowledged means durable: close, reopen, everything is there");
    drop(store);
    let store = EmbeddedStore::open(&dir)?;
    let events = store.read_stream("account-ada", ReadStreamOptions::forward()).await?;
    println!("   reopened: account-ada has {} events, balance {}", events.len(), balance(&events));
    store.delete_stream("account-ada", ExpectedVersion::Any, false).await?;

    println!(
        "\n{}",
        bold("Now the same bank account as application code: an aggregate behind a repository.")
    );
    cairn_example_bank::demo::walk(std::sync::Arc::new(store.clone()), 8).await?;

    println!(
        "\n{}",
        bold("And rules that no single stream can guard: tags and conditional appends.")
    );
    cairn_example_courses::demo::walk(std::sync::Arc::new(store.clone()), 18).await?;

    println!(
        "\n{}",
        bold(
            "The read side: consumers with checkpoints, read models, and two ways to share state."
        )
    );
    let store: std::sync::Arc<dyn EventStore> = std::sync::Arc::new(store);
    cairn_example_orders::walk(store.clone(), &dir, 23).await?;

    println!(
        "\n{}",
        bold(
            "Transactions across services: the order saga, with compensation, timeouts, restarts and deadlines."
        )
    );
    cairn_example_sagas::walk(store, 30).await?;

    println!(
        "\nNext: `cairn --help`, `cairn demo bank|courses|orders|sagas`, `cairn sagas list`, `cairn bench`, and the README."
    );
    Ok(())
}
