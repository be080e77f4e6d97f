//! The Rust blocks of the README, each inside enough code to compile (the
//! functions are never called: they need services). The test below checks
//! that every line of every README block appears here, in order, so the
//! README cannot show code that no longer compiles.
// Excerpts keep the README's digit grouping and names.
#![allow(clippy::inconsistent_digit_grouping, dead_code)]

#[rustfmt::skip]
mod outbox {
    use cairn_core::{ExpectedVersion, NewEvent};
    use cairn_postgres::PgStore;

    async fn excerpt(
        client: &mut tokio_postgres::Client,
        id: &str,
        total: i64,
        placed: NewEvent,
    ) -> anyhow::Result<()> {
        let store = PgStore::connect("postgres://postgres@127.0.0.1:5432/test").await?;
        let tx = client.transaction().await?;                     // your own connection
        tx.execute("INSERT INTO orders (id, total) VALUES ($1, $2)", &[&id, &total]).await?;
        store.append_in(&tx, &format!("order-{id}"), ExpectedVersion::NoStream, vec![placed]).await?;
        tx.commit().await?;                                       // or roll back: no event, nothing published
        Ok(())
    }
}

#[rustfmt::skip]
mod aggregate {
    use std::sync::Arc;

    use cairn_core::{EventStore, Timestamp};
    use cairn_domain::{Aggregate, At, DomainEvent, Repository, RetryPolicy, SnapshotPolicy, Upcasters};
    use serde::{Deserialize, Serialize};

    enum Command {
        Deposit { amount: u64, currency: String, note: Option<String> },
        Withdraw { amount: u64 },
    }

    #[derive(Debug, thiserror::Error)]
    #[error("refused")]
    struct Error;

#[derive(Clone, Default, Serialize, Deserialize)]
struct Account { open: bool, balance: u64 }

#[derive(Serialize, Deserialize)]            // the variant name is the stored type
enum Event { AccountOpened { owner: String }, MoneyDeposited { amount: u64, currency: String }, MoneyWithdrawn { amount: u64 } }

impl DomainEvent for Event {
    fn schema_version(t: &str) -> u32 { if t == "MoneyDeposited" { 2 } else { 1 } }
    fn upcasters() -> Upcasters {             // v1 deposits had no currency
        Upcasters::new().add("MoneyDeposited", 1, |mut d| { d["currency"] = "USD".into(); d })
    }
}

impl Aggregate for Account {
    const CATEGORY: &'static str = "account"; // streams account-<id>
    type Command = Command;
    type Event = Event;
    type Error = Error;
    fn decide(&self, c: &Command) -> Result<Vec<Event>, Error> {
        match c {
            Command::Deposit { amount, currency, .. } => Ok(vec![Event::MoneyDeposited { amount: *amount, currency: currency.clone() }]),
            Command::Withdraw { amount } if *amount <= self.balance => Ok(vec![Event::MoneyWithdrawn { amount: *amount }]),
            Command::Withdraw { .. } => Err(Error),
        }
    }
    fn evolve(self, e: &Event) -> Self {
        match e {
            Event::AccountOpened { .. } => Account { open: true, ..self },
            Event::MoneyDeposited { amount, .. } => Account { balance: self.balance + amount, ..self },
            Event::MoneyWithdrawn { amount } => Account { balance: self.balance - amount, ..self },
        }
    }
}

    async fn excerpt(store: Arc<dyn EventStore>, yesterday_10am: Timestamp) -> anyhow::Result<()> {
let accounts = Repository::<Account>::new(store)       // any EventStore
    .with_snapshots(SnapshotPolicy::every(100))          // the default
    .with_retry(RetryPolicy::attempts(5));               // default: no retry
accounts.execute("42", &Command::Deposit { amount: 125_00, currency: "EUR".into(), note: None }).await?;
let now = accounts.load("42").await?;                                   // snapshot + newer events
let then = accounts.load_at("42", At::Time(yesterday_10am)).await?;     // or At::Version / At::Position
let history = accounts.history("42").await?;                            // (event, state after) pairs
let mut what_if = accounts.branch("42", At::Version(3)).await?;         // in memory only
what_if.execute(&Command::Withdraw { amount: 300_00 })?;
let diff = accounts.compare("42", &what_if).await?;
        let _ = (now, then, history, diff);
        Ok(())
    }
}

#[rustfmt::skip]
mod projection {
    use std::sync::Arc;

    use cairn_core::{EventStore, Position, RecordedEvent};
    use cairn_cqrs::{Runner, Source, SqliteModel, SqliteProjection};
    use rusqlite::Transaction;

    type Failure = Box<dyn std::error::Error + Send + Sync>;

    #[derive(serde::Deserialize)]
    struct Created {
        customer: String,
    }

struct OrdersByCustomer;
impl SqliteProjection for OrdersByCustomer {
    fn name(&self) -> &str { "orders_by_customer" }
    fn setup(&self, tx: &Transaction) -> rusqlite::Result<()> {
        tx.execute_batch("CREATE TABLE IF NOT EXISTS orders (id TEXT PRIMARY KEY, customer TEXT)")
    }
    fn apply(&self, tx: &Transaction, e: &RecordedEvent) -> Result<(), Failure> {
        let o: Created = e.json()?;
        tx.execute("INSERT INTO orders VALUES (?1, ?2)", (&e.stream, &o.customer))?;
        Ok(())
    }
}

    async fn excerpt(store: Arc<dyn EventStore>, position: Position) -> anyhow::Result<()> {
let model = SqliteModel::open("orders.db", OrdersByCustomer)?;     // your schema, a real file
let runner = Runner::new(store, Source::category("order"), model).spawn();
runner.wait_for(position).await?;                                   // read your own writes
runner.lag().await?;                                                // events and seconds behind, healthy?
        Ok(())
    }
}

#[rustfmt::skip]
mod group {
    use std::sync::Arc;

    use cairn_core::{EventStore, RecordedEvent};
    use cairn_cqrs::{Group, GroupConfig, Source};

    async fn print_label(_: &RecordedEvent) -> Result<(), String> {
        Ok(())
    }

    async fn excerpt(store: Arc<dyn EventStore>) -> anyhow::Result<()> {
let config = GroupConfig::new("shipping-labels", Source::category("order"))
    .pin_streams()      // a stream's events one at a time, in order
    .max_attempts(5);   // then parked in $parked-shipping-labels
let group = Group::start(store, config).await?;
let worker = group.worker();                    // as many as you like
while let Some(delivery) = worker.next().await {
    match print_label(delivery.event()).await {
        Ok(()) => delivery.ack().await?,        // durable when it returns
        Err(e) => { delivery.nack(e).await?; }  // retried with backoff, or parked
    }
}
group.replay_parked().await?;                   // after fixing the cause
        Ok(())
    }
}

#[rustfmt::skip]
mod relay {
    use std::sync::Arc;

    use cairn_core::EventStore;
    use cairn_relay::{NatsSink, Relay, RelayConfig};

    async fn excerpt(store: Arc<dyn EventStore>) -> anyhow::Result<()> {
let sink = NatsSink::new(async_nats::connect("127.0.0.1:4222").await?, "cairn");
sink.ensure_stream("CAIRN").await?;                        // captures cairn.>
let relay = Relay::new(store, RelayConfig::new("to-nats"), sink).spawn();
relay.pending().await?;                                    // (events not yet confirmed, oldest one's age)
        Ok(())
    }
}

#[rustfmt::skip]
mod idempotency {
    use cairn_idempotency::{Handled, PgInbox, RedisKeys};
    use uuid::Uuid;

    struct Order;
    struct Request {
        idempotency_key: String,
    }

    async fn charge(_: &tokio_postgres::Transaction<'_>, _: &Order) -> Result<u64, tokio_postgres::Error> {
        Ok(1)
    }

    async fn charge_card(_: &Request) -> Result<u64, std::io::Error> {
        Ok(1)
    }

    async fn excerpt(mut client: tokio_postgres::Client, message_id: Uuid, order: Order, request: Request) -> anyhow::Result<()> {
// PostgreSQL: the message id is recorded in the same transaction as the effect.
let inbox = PgInbox::new("billing");
match inbox.handle(&mut client, message_id, async |tx| charge(tx, &order).await).await? {
    Handled::Applied(receipt) => println!("charged: {receipt}"),   // ran and committed together with the id
    Handled::Duplicate => {},          // processed before: nothing ran
}

// Redis: a retried request (same idempotency key) gets the first result back.
let keys = RedisKeys::connect("redis://127.0.0.1:6379", "payments:").await?; // TTL 24 h
let receipt = keys.run(&request.idempotency_key, || charge_card(&request)).await?; // Ran or Cached
        let _ = receipt;
        Ok(())
    }
}

#[rustfmt::skip]
mod saga {
    use std::sync::Arc;
    use std::time::Duration;

    use cairn_core::EventStore;
    use cairn_saga::{Saga, SagaRunner, Step, StepContext, StepError};

    #[derive(serde::Deserialize)]
    struct Order;
    type ChargeId = u64;
    struct Payments;
    impl Payments {
        async fn charge(&self, _: &Order, _: &str) -> Result<ChargeId, StepError> {
            Ok(1)
        }
    }

    async fn done(_: StepContext) -> Result<(), StepError> {
        Ok(())
    }
    use done as create_order;
    use done as cancel_order;
    use done as refund_card;
    use done as reserve_items;
    use done as release_items;
    use done as send_email;

    async fn excerpt(store: Arc<dyn EventStore>, order_id: String, input: serde_json::Value) -> anyhow::Result<()> {
let saga = Saga::new("order")
    .step(Step::new("create-order", create_order).compensate(cancel_order))
    .step(Step::new("charge-card", charge_card).compensate(refund_card).timeout(Duration::from_secs(30)))
    .step(Step::new("reserve-items", reserve_items).compensate(release_items))
    .step(Step::new("email-receipt", send_email).cannot_be_undone());
let runner = SagaRunner::builder(store.clone(), "shop").saga(saga).run().await?; // resumes unfinished sagas
runner.start("order", &order_id, &input).await?;   // durable when it returns
let state = runner.wait("order", &order_id).await?; // Completed, Compensated or NeedsAttention
        let _ = state;
        Ok(())
    }

async fn charge_card(ctx: StepContext) -> Result<ChargeId, StepError> {
    let order: Order = ctx.input()?;
        let payments = Payments;
    payments.charge(&order, &ctx.key).await            // the key is the same every time this step runs
}
}

#[rustfmt::skip]
mod timers {
    use std::sync::Arc;
    use std::time::Duration;

    use cairn_core::EventStore;
    use cairn_saga::{Scheduler, TimerAction};
    use serde_json::json;

    async fn excerpt(store: Arc<dyn EventStore>, id: &str) -> anyhow::Result<()> {
let timers = Scheduler::builder(store.clone(), "orders").start().await?;
timers.schedule(&format!("cancel-unpaid-{id}"), Duration::from_secs(15 * 60),
    TimerAction::append(format!("order-{id}"), "OrderCancelled", json!({"reason": "not paid in time"}))).await?;
timers.cancel(&format!("cancel-unpaid-{id}")).await?;   // when the payment arrives
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    /// The README's ```rust blocks, but the way-in program (a test builds
    /// that one in a project of its own).
    fn readme_blocks() -> Vec<(usize, Vec<String>)> {
        let readme = include_str!("../../../README.md");
        let (mut blocks, mut current) = (Vec::new(), None::<(usize, Vec<String>)>);
        for (n, line) in readme.lines().enumerate() {
            match (&mut current, line.trim_end()) {
                (None, "```rust") => current = Some((n + 1, Vec::new())),
                (Some(_), "```") => blocks.push(current.take().expect("in a block")),
                (Some((_, lines)), text) => lines.push(text.to_string()),
                (None, _) => {}
            }
        }
        blocks.retain(|(_, lines)| !lines.iter().any(|l| l.contains("fn main")));
        blocks
    }

    /// What must match: the line up to an elision (`/* … */`, `…`).
    fn shown(line: &str) -> Option<(&str, bool)> {
        let text = line.trim();
        if text.is_empty() {
            return None;
        }
        match text.find("/*").or_else(|| text.find('…')) {
            Some(cut) => Some((text[..cut].trim_end(), true)),
            None => Some((text, false)),
        }
    }

    #[test]
    fn every_rust_block_of_the_readme_is_compiled_here() {
        let source: Vec<&str> = include_str!("lib.rs").lines().map(str::trim).collect();
        let blocks = readme_blocks();
        assert!(blocks.len() >= 8, "the README's Rust blocks were not found: {}", blocks.len());
        for (start, lines) in blocks {
            let mut at = 0;
            for line in &lines {
                let Some((text, elided)) = shown(line) else { continue };
                let found = source[at..]
                    .iter()
                    .position(|s| if elided { s.starts_with(text) } else { *s == text });
                match found {
                    Some(i) => at += i + 1,
                    None => panic!(
                        "README.md line {start}ff: `{}` is not in crates/readme/src/lib.rs (in order); change both together",
                        line.trim()
                    ),
                }
            }
        }
    }
}
