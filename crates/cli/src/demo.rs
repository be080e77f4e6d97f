//! `cairn demo bank`: event sourcing for application code, narrated. The bank
//! account of `examples/bank` goes through the repository: replay, rules,
//! snapshots, time travel, upcasting, the census, a conflict resolved by retry
//! and a what-if branch.
// Amounts are in cents, written euros_cents (`100_00` is 100.00).
#![allow(clippy::inconsistent_digit_grouping)]

use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use cairn_core::{EventStore, ExpectedVersion, NewEvent, ReadStreamOptions, Timestamp};
use cairn_domain::{
    At, CommandContext, Repository, RepositoryError, RetryPolicy, SnapshotPolicy, census,
};
use cairn_example_bank::{Account, Command, Event, money};
use cairn_log::EmbeddedStore;
use comfy_table::{Table, presets::UTF8_FULL_CONDENSED};
use serde_json::json;

use crate::output::count;
use crate::tour::step;

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

/// `cairn demo bank` on a fresh temporary store.
pub(crate) async fn run_bank() -> Result<()> {
    let dir = tempfile::Builder::new().prefix("cairn-demo-").tempdir()?;
    println!(
        "Cairn demo: a bank account as an event-sourced aggregate (store in {})",
        dir.path().display()
    );
    bank(EmbeddedStore::open(dir.path())?, 1).await?;
    println!(
        "\nThe code: examples/bank/src/lib.rs (the aggregate) and crates/cli/src/demo.rs (this demo)."
    );
    Ok(())
}

/// Runs the bank demo on `store`, numbering its steps from `first`.
pub(crate) async fn bank(store: EmbeddedStore, first: usize) -> Result<()> {
    let store: Arc<dyn EventStore> = Arc::new(store);
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
                count(*n, "event"),
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

/// `cairn demo courses` on a fresh temporary store.
pub(crate) async fn run_courses() -> Result<()> {
    let dir = tempfile::Builder::new().prefix("cairn-demo-").tempdir()?;
    println!(
        "Cairn demo: rules across entities with tags and conditional appends (store in {})",
        dir.path().display()
    );
    courses(EmbeddedStore::open(dir.path())?, 1).await?;
    println!(
        "\nThe code: examples/courses/src/lib.rs (the rules) and crates/cli/src/demo.rs (this demo)."
    );
    Ok(())
}

/// Races subscriptions against the course rules on `store`, numbering steps from `first`.
pub(crate) async fn courses(store: EmbeddedStore, first: usize) -> Result<()> {
    use cairn_core::{Query, ReadAllOptions};
    use cairn_example_courses::{COURSES_PER_STUDENT, Courses, Error as CourseError};

    let store: Arc<dyn EventStore> = Arc::new(store);
    let courses = Courses::new(store.clone());
    let mut n = first;
    let mut next = |title: &str| {
        step(&format!("{n}. {title}"));
        n += 1;
    };
    // Runs `count` subscriptions at once; returns (accepted, refusals, attempts).
    let race = |pairs: Vec<(String, String)>| {
        let courses = courses.clone();
        async move {
            let handles: Vec<_> = pairs
                .into_iter()
                .map(|(student, course)| {
                    let courses = courses.clone();
                    tokio::spawn(async move { courses.subscribe(&student, &course).await })
                })
                .collect();
            let (mut accepted, mut refused, mut attempts) = (0, Vec::new(), 0);
            for h in handles {
                match h.await? {
                    Ok(done) => {
                        accepted += 1;
                        attempts += done.attempts;
                    }
                    Err(RepositoryError::Rejected(e)) => refused.push(e),
                    Err(e) => return Err(anyhow::Error::from(e)),
                }
            }
            anyhow::Ok((accepted, refused, attempts))
        }
    };

    next("Rules that span entities: seats per course, courses per student, no double subscription");
    println!("   a subscription is one event tagged course:<id> and student:<id>; each rule is a");
    println!("   decision model: a tag query plus a fold (see examples/courses)");
    courses.define("cs101", 30).await?;
    println!("   CourseDefined cs101 with 30 seats");

    next("40 students race for cs101's 30 seats, all at once");
    let (accepted, refused, attempts) =
        race((0..40).map(|s| (format!("student-{s}"), "cs101".to_string())).collect()).await?;
    let full = refused.iter().filter(|e| matches!(e, CourseError::CourseFull { .. })).count();
    println!(
        "   {accepted} subscribed, {full} refused (\"course full\"); the course now has {} students",
        courses.course("cs101").await?.students
    );
    println!(
        "   the winners needed {attempts} attempts between them: whenever another subscription landed"
    );
    println!(
        "   between a decision's read and its append, the condition failed and it decided again"
    );

    next(&format!("One student races for 8 electives (the limit is {COURSES_PER_STUDENT})"));
    for c in 0..8 {
        courses.define(&format!("elective-{c}"), 20).await?;
    }
    let (accepted, refused, _) =
        race((0..8).map(|c| ("zoe".to_string(), format!("elective-{c}"))).collect()).await?;
    println!(
        "   {accepted} accepted, {} refused: {}",
        refused.len(),
        refused.first().map(|e| e.to_string()).unwrap_or_default()
    );

    next("The same subscription sent twice at once");
    courses.define("once", 5).await?;
    let (accepted, refused, _) =
        race(vec![("yan".into(), "once".into()), ("yan".into(), "once".into())]).await?;
    println!(
        "   {accepted} accepted, {} refused: {}",
        refused.len(),
        refused.first().map(|e| e.to_string()).unwrap_or_default()
    );

    next("Reading by tag: the events of one student, in global order");
    let events = store.read_query(&Query::tags(["student:zoe"]), ReadAllOptions::forward()).await?;
    for e in &events {
        println!(
            "   [{:>6}] {} {}  tags {}",
            e.position,
            e.stream,
            e.event_type,
            e.tags.join(", ")
        );
    }
    let decided =
        courses.decider().load(&(cairn_example_courses::CourseModel("cs101".into()),)).await?;
    let after = decided.after.map(|p| p.to_string()).unwrap_or_default();
    println!(
        "   a decision on cs101 now reads {} events, the store's newest at position {after}; its append",
        decided.events_read
    );
    println!(
        "   carries the condition \"fail if an event tagged course:cs101 was appended after {after}\""
    );
    Ok(())
}
