//! The bank account, narrated: event sourcing for application code. The
//! account goes through the repository: replay, rules, snapshots, time travel,
//! upcasting, the census, a conflict resolved by retry and a what-if branch.
//! `cargo run -p cairn-example-bank` runs it on a fresh store, and `cairn demo
//! bank` and `cairn tour` do too.
// Amounts are in cents, written euros_cents (`100_00` is 100.00).
#![allow(clippy::inconsistent_digit_grouping)]

use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use cairn_core::{EventStore, ExpectedVersion, NewEvent, ReadStreamOptions, Timestamp};
use cairn_domain::{
    At, CommandContext, Repository, RepositoryError, RetryPolicy, SnapshotPolicy, census,
};
use cairn_log::EmbeddedStore;
use comfy_table::{Table, presets::UTF8_FULL_CONDENSED};
use serde_json::json;

use crate::{Account, Command, Event, money};

/// A numbered step's title, set apart from what the step prints.
fn step(title: &str) {
    println!("\n▸ {title}");
}

fn eur(cents: u64) -> String {
    money(cents, "EUR")
}

fn deposit(cents: u64) -> Command {
    Command::Deposit { amount: cents, currency: "EUR".into(), note: None }
}

fn describe_command(c: &Command) -> String {
    match c {
        Command::Open { owner, currency } => format!("Open an account for {owner} in {currency}"),
        Command::Deposit { amount, currency, .. } => {
            format!("Deposit {}", money(*amount, currency))
        }
        Command::Withdraw { amount } => format!("Withdraw {}", eur(*amount)),
        Command::Close => "Close".into(),
    }
}

fn describe(e: &Event) -> String {
    match e {
        Event::AccountOpened { owner, currency } => {
            format!("AccountOpened for {owner} in {currency}")
        }
        Event::MoneyDeposited { amount, currency, .. } => {
            format!("MoneyDeposited {}", money(*amount, currency))
        }
        Event::MoneyWithdrawn { amount } => format!("MoneyWithdrawn {}", eur(*amount)),
        Event::AccountClosed => "AccountClosed".into(),
    }
}

/// The walk on a fresh temporary store, with a word before and after.
pub async fn run() -> Result<()> {
    let dir = tempfile::Builder::new().prefix("cairn-demo-").tempdir()?;
    println!(
        "Cairn demo: a bank account as an event-sourced aggregate (store in {})",
        dir.path().display()
    );
    walk(Arc::new(EmbeddedStore::open(dir.path())?), 1).await?;
    println!(
        "\nThe code: examples/bank/src/lib.rs (the aggregate) and examples/bank/src/demo.rs (this walk)."
    );
    Ok(())
}

/// Runs the bank demo on `store`, numbering its steps from `first`.
pub async fn walk(store: Arc<dyn EventStore>, first: usize) -> Result<()> {
    let repo = Repository::<Account>::new(store.clone()).with_snapshots(SnapshotPolicy::every(10));
    let mut n = first;
    let mut next = |title: &str| {
        step(&format!("{n}. {title}"));
        n += 1;
    };

    next("An aggregate decides, the repository appends: commands in, events out");
    let ctx = CommandContext::new().with("teller", "demo");
    for command in [
        Command::Open { owner: "Ada".into(), currency: "EUR".into() },
        deposit(100_00),
        deposit(250_00),
        Command::Withdraw { amount: 80_00 },
    ] {
        let done = repo.execute_with("ada", &command, &ctx).await?;
        println!(
            "   {:<34} → {} (v{}, balance {})",
            describe_command(&command),
            describe(&done.events[0]),
            done.version,
            eur(done.state.balance)
        );
    }
    let stored = store.read_stream("account-ada", ReadStreamOptions::forward().limit(1)).await?;
    println!(
        "   each event's causation id is its command's id ({}…), and its correlation id",
        &stored[0].metadata.causation_id.map(|u| u.to_string()).unwrap_or_default()[..13]
    );
    println!("   the conversation's; this command started one, so the two are equal here");
    let noon = Timestamp::now();

    next("Business rules refuse a command, and nothing is written");
    match repo.execute("ada", &Command::Withdraw { amount: 1_000_00 }).await {
        Err(RepositoryError::Rejected(e)) => {
            println!("   Withdraw 1000.00 EUR → rejected: {e}; account-ada is still at v4")
        }
        other => println!("   unexpected: {other:?}"),
    }

    next("Loading replays the stream");
    let loaded = repo.load("ada").await?;
    println!(
        "   load(ada) replayed {} events → balance {}, version {}",
        loaded.replayed,
        eur(loaded.state.balance),
        loaded.version
    );

    next("Snapshots: every 10 events the state is stored with the version it covers");
    tokio::time::sleep(Duration::from_millis(5)).await;
    for i in 1..=22 {
        let done = repo.execute("ada", &deposit(i * 1_00)).await?;
        if done.snapshotted {
            println!(
                "   after v{} the repository stored a snapshot ($snapshots-account-ada)",
                done.version
            );
        }
    }
    let loaded = repo.load("ada").await?;
    println!(
        "   load(ada) started from the snapshot of v{} and replayed only {} events → balance {}",
        loaded.snapshot_version.unwrap_or(0),
        loaded.replayed,
        eur(loaded.state.balance)
    );
    repo.delete_snapshots("ada").await?;
    let again = repo.load("ada").await?;
    println!(
        "   snapshots deleted: load replays all {} events, same balance {} (they only buy speed)",
        again.replayed,
        eur(again.state.balance)
    );

    next("Time travel: the account as it was");
    let then = repo.load_at("ada", At::Time(noon)).await?;
    println!(
        "   at {} (before the 22 small deposits): balance {}, version {}",
        &noon.to_rfc3339()[11..23],
        eur(then.state.balance),
        then.version
    );
    let v2 = repo.load_at("ada", At::Version(2)).await?;
    println!("   at version 2: balance {}", eur(v2.state.balance));

    next("History: each event with the state right after it");
    let history = repo.history("ada").await?;
    let mut table = Table::new();
    table.load_preset(UTF8_FULL_CONDENSED);
    table.set_header(["version", "event", "balance after"]);
    for h in history.iter().take(5) {
        table.add_row([h.version.to_string(), describe(&h.event), eur(h.state.balance)]);
    }
    table.add_row([
        "…".to_string(),
        format!("{} more", history.len().saturating_sub(5)),
        String::new(),
    ]);
    println!("{table}");

    next("Upcasting: an event stored by old code is read in today's shape");
    let old_deposit = NewEvent::json("MoneyDeposited", &json!({"amount": 40_00}))?; // v1: no currency yet
    let opened = NewEvent::json("AccountOpened", &json!({"owner": "Grace", "currency": "USD"}))?;
    store.append("account-grace", ExpectedVersion::NoStream, vec![opened, old_deposit]).await?;
    let raw =
        store.read_stream("account-grace", ReadStreamOptions::forward().from_version(2)).await?;
    println!(
        "   stored:  {} v{} {}",
        raw[0].event_type,
        raw[0].schema_version,
        String::from_utf8_lossy(&raw[0].data)
    );
    let seen = repo.history("grace").await?;
    println!(
        "   seen as: {} (v2: the upcaster filled in the currency old deposits were made in)",
        describe(&seen[1].event)
    );

    next("The census: which schema versions are still stored");
    let c = census(store.as_ref(), |_, _| {}).await?;
    for (event_type, versions) in &c.types {
        for (version, n) in versions {
            println!(
                "   {event_type:<16} v{version}: {:>10} ({:.0}%)",
                format!("{n} event{}", if *n == 1 { "" } else { "s" }),
                100.0 * c.share(event_type, *version)
            );
        }
    }
    println!("   when no v1 MoneyDeposited is left, its upcaster can go");

    next("Concurrency: two tellers deposit on the same account at once");
    let plain = Repository::<Account>::new(store.clone());
    let race = |repo: Repository<Account>| async move {
        let (five, seven) = (deposit(5_00), deposit(7_00));
        tokio::join!(repo.execute("ada", &five), repo.execute("ada", &seven))
    };
    let (a, b) = race(plain.clone()).await;
    for (teller, r) in [("A", &a), ("B", &b)] {
        match r {
            Ok(done) => println!("   teller {teller}: deposited, account at v{}", done.version),
            Err(e) => println!("   teller {teller}: {e}"),
        }
    }
    let retrying = plain.with_retry(RetryPolicy::attempts(5));
    let (a, b) = race(retrying).await;
    let (a, b) = (a?, b?);
    println!(
        "   with RetryPolicy::attempts(5): teller A took {} attempt(s), teller B {}; both deposits are in (v{})",
        a.attempts,
        b.attempts,
        a.version.max(b.version)
    );

    next("What if? A branch in memory, compared with reality");
    let mut branch = repo.branch("ada", At::Version(3)).await?;
    branch.execute(&Command::Withdraw { amount: 300_00 })?;
    let comparison = repo.compare("ada", &branch).await?;
    println!(
        "   forked at v3 (balance {}) and withdrew 300.00 EUR in the branch",
        eur(branch.base.state.balance)
    );
    for d in &comparison.differences {
        let show = |v: &Option<serde_json::Value>| match (
            d.path.as_str(),
            v.as_ref().and_then(|v| v.as_u64()),
        ) {
            ("/balance", Some(c)) => eur(c),
            _ => v.clone().unwrap_or_default().to_string(),
        };
        println!("   {}: real {} vs branch {}", d.path, show(&d.real), show(&d.branch));
    }
    println!("   nothing was written: account-ada is still at v{}", comparison.real.version);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_walk_leaves_the_account_it_narrates() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn EventStore> = Arc::new(EmbeddedStore::open(dir.path()).unwrap());
        walk(store.clone(), 1).await.unwrap();
        // Both racing deposits landed (the loser retried) and the what-if
        // branch wrote nothing.
        let ada = Repository::<Account>::new(store).load("ada").await.unwrap();
        assert_eq!((ada.state.balance, ada.state.currency.as_str()), (540_00, "EUR"));
        assert_eq!(ada.state.owner, "Ada");
    }
}
