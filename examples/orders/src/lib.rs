//! The order flow: CQRS and event-driven integration, narrated.
//!
//! Placing an order appends `OrderCreated` through the command side and returns
//! at once; payment, email, inventory, shipping and analytics each follow the
//! events with their own checkpoint; the query side answers from read models
//! without replaying anything. Then the insurance story: an address change
//! leads to a new quote, once as a thin **notification** (the quote service
//! asks the customer service for details) and once as **event-carried state
//! transfer** (the event carries the address; the quote service keeps a copy).
// Amounts are in cents, written euros_cents (`100_00` is 100.00).
#![allow(clippy::inconsistent_digit_grouping)]

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Result;
use cairn_core::{EventStore, ExpectedVersion, NewEvent, RecordedEvent};
use cairn_cqrs::{
    Group, GroupConfig, MemoryModel, MemoryProjection, Runner, RunnerHandle, Source, SqliteModel,
    SqliteProjection, read_models_dir as models_dir,
};
use cairn_domain::{Aggregate, Dispatcher, DomainEvent, Invalid, Repository, Validate};
use cairn_log::EmbeddedStore;
use comfy_table::{Table, presets::UTF8_FULL_CONDENSED};
use rusqlite::{Transaction, params};
use serde::{Deserialize, Serialize};
use serde_json::json;

/// A numbered step's title, set apart from what the step prints.
fn step(title: &str) {
    println!("\n▸ {title}");
}

type Failure = Box<dyn std::error::Error + Send + Sync>;

// ---- the write side: an order aggregate --------------------------------------

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Order {
    placed: bool,
}

#[derive(Debug)]
struct PlaceOrder {
    customer: String,
    sku: String,
    quantity: u32,
    cents: u64,
}

impl Validate for PlaceOrder {
    fn validate(&self) -> Result<(), Invalid> {
        if self.quantity == 0 {
            return Err(Invalid::new("quantity", "must be at least 1"));
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
enum OrderEvent {
    OrderCreated { customer: String, sku: String, quantity: u32, total_cents: u64 },
}

impl DomainEvent for OrderEvent {}

#[derive(Debug, thiserror::Error)]
#[error("the order was already placed")]
struct AlreadyPlaced;

impl Aggregate for Order {
    const CATEGORY: &'static str = "order";
    type Command = PlaceOrder;
    type Event = OrderEvent;
    type Error = AlreadyPlaced;
    fn decide(&self, c: &PlaceOrder) -> Result<Vec<OrderEvent>, AlreadyPlaced> {
        if self.placed {
            return Err(AlreadyPlaced);
        }
        Ok(vec![OrderEvent::OrderCreated {
            customer: c.customer.clone(),
            sku: c.sku.clone(),
            quantity: c.quantity,
            total_cents: c.cents * c.quantity as u64,
        }])
    }
    fn evolve(self, _: &OrderEvent) -> Self {
        Order { placed: true }
    }
}

#[derive(Deserialize)]
struct Created {
    customer: String,
    sku: String,
    quantity: u32,
    total_cents: u64,
}

fn created(e: &RecordedEvent) -> Result<Option<Created>, Failure> {
    if e.event_type != "OrderCreated" {
        return Ok(None);
    }
    Ok(Some(e.json()?))
}

// ---- independent consumers, each with its own checkpoint ---------------------

/// A consumer that keeps a log of what it did (its read model).
struct Consumer {
    name: &'static str,
    act: fn(&RecordedEvent, &Created) -> String,
}

impl MemoryProjection for Consumer {
    type State = Vec<String>;
    fn name(&self) -> &str {
        self.name
    }
    fn apply(&self, done: &mut Vec<String>, e: &RecordedEvent) -> Result<(), Failure> {
        if let Some(order) = created(e)? {
            done.push((self.act)(e, &order));
        }
        Ok(())
    }
}

fn eur(cents: u64) -> String {
    format!("{}.{:02} EUR", cents / 100, cents % 100)
}

fn consumers() -> Vec<Consumer> {
    vec![
        Consumer {
            name: "payment",
            act: |e, o| format!("charged {} for {}", eur(o.total_cents), e.stream),
        },
        Consumer {
            name: "email",
            act: |e, o| format!("emailed {} a confirmation of {}", o.customer, e.stream),
        },
        Consumer { name: "inventory", act: |_, o| format!("reserved {} × {}", o.quantity, o.sku) },
        Consumer {
            name: "shipping",
            act: |e, o| format!("booked a parcel for {} to {}", e.stream, o.customer),
        },
        Consumer {
            name: "analytics",
            act: |_, o| format!("counted {} of revenue", eur(o.total_cents)),
        },
    ]
}

// ---- the query side: read models in SQLite ----------------------------------

struct OrdersByCustomer;

impl SqliteProjection for OrdersByCustomer {
    fn name(&self) -> &str {
        "orders_by_customer"
    }
    fn setup(&self, tx: &Transaction) -> rusqlite::Result<()> {
        tx.execute_batch(
            "CREATE TABLE IF NOT EXISTS orders (id TEXT PRIMARY KEY, customer TEXT NOT NULL, sku TEXT NOT NULL, total_cents INTEGER NOT NULL);
             CREATE INDEX IF NOT EXISTS orders_customer ON orders (customer);",
        )
    }
    fn apply(&self, tx: &Transaction, e: &RecordedEvent) -> Result<(), Failure> {
        if let Some(o) = created(e)? {
            tx.prepare_cached(
                "INSERT INTO orders (id, customer, sku, total_cents) VALUES (?1, ?2, ?3, ?4)",
            )?
            .execute(params![e.stream, o.customer, o.sku, o.total_cents as i64])?;
        }
        Ok(())
    }
}

struct Balances;

impl SqliteProjection for Balances {
    fn name(&self) -> &str {
        "balances"
    }
    fn setup(&self, tx: &Transaction) -> rusqlite::Result<()> {
        tx.execute_batch("CREATE TABLE IF NOT EXISTS balances (account TEXT PRIMARY KEY, cents INTEGER NOT NULL)")
    }
    fn apply(&self, tx: &Transaction, e: &RecordedEvent) -> Result<(), Failure> {
        let sign = match e.event_type.as_str() {
            "MoneyDeposited" => 1,
            "MoneyWithdrawn" => -1,
            _ => return Ok(()),
        };
        let amount = e.json::<serde_json::Value>()?["amount"].as_i64().ok_or("an amount")?;
        tx.prepare_cached("INSERT INTO balances VALUES (?1, ?2) ON CONFLICT (account) DO UPDATE SET cents = cents + ?2")?
            .execute(params![e.stream, sign * amount])?;
        Ok(())
    }
}

/// The projections' status as a table: position, lag in events and seconds, health.
pub(crate) async fn status_table(runners: &[&RunnerHandle]) -> Result<Table> {
    let mut table = Table::new();
    table.load_preset(UTF8_FULL_CONDENSED).set_header([
        "projection",
        "state",
        "position",
        "head",
        "behind",
        "lag",
        "health",
    ]);
    for r in runners {
        let s = r.status();
        let lag = r.lag().await?;
        let pos = |p: Option<cairn_core::Position>| p.map_or("-".into(), |p| p.0.to_string());
        table.add_row([
            s.name.clone(),
            format!("{:?}", s.state),
            pos(lag.position),
            pos(lag.head),
            format!("{} events", lag.events),
            format!("{:.1} s", lag.seconds),
            if lag.healthy { "ok".into() } else { "UNHEALTHY".into() },
        ]);
    }
    Ok(table)
}

/// `cairn demo orders` on a fresh store: a temporary one, or `keep` (which must
/// not hold one yet), so that `cairn projections status` and `cairn groups
/// status` can look at it afterwards.
pub async fn run(keep: Option<PathBuf>) -> Result<()> {
    let temp = tempfile::Builder::new().prefix("cairn-demo-").tempdir()?;
    let dir = match &keep {
        Some(dir) => {
            if dir.join("log").exists() {
                anyhow::bail!(
                    "{} already holds a Cairn store; the demo needs a fresh one: pass another --keep directory",
                    dir.display()
                );
            }
            dir.clone()
        }
        None => temp.path().to_path_buf(),
    };
    println!(
        "Cairn demo: the order flow with CQRS, and notification vs event-carried state (store in {})",
        dir.display()
    );
    walk(Arc::new(EmbeddedStore::open(&dir)?), &dir, 1).await?;
    println!(
        "\nThe code: examples/orders/src/lib.rs; the library: crates/cqrs (projections, consumer groups) and crates/domain (Dispatcher)."
    );
    if keep.is_some() {
        println!(
            "The data stays in {0}: try `cairn --data {0} projections status` and `cairn --data {0} groups status`.",
            dir.display()
        );
    }
    Ok(())
}

/// The orders demo then the insurance one on `store` (data in `dir`), steps numbered from `first`.
pub async fn walk(store: Arc<dyn EventStore>, dir: &Path, first: usize) -> Result<()> {
    orders(store.clone(), dir, first).await?;
    shipping_group(store.clone(), first + 4).await?;
    insurance(store, first + 5).await
}

/// Shipping labels as a consumer group: workers share the events, a failing
/// order is retried, parked, and replayed once the cause is fixed.
async fn shipping_group(store: Arc<dyn EventStore>, n: usize) -> Result<()> {
    step(&format!(
        "{n}. A consumer group: three label printers share the orders; a failing one is retried, parked, replayed"
    ));
    let config = GroupConfig::new("shipping-labels", Source::category("order"))
        .pin_streams()
        .max_attempts(3)
        .backoff(Duration::from_millis(20), Duration::from_millis(100));
    let group = Group::start(store.clone(), config).await?;
    let carrier_fixed = Arc::new(AtomicBool::new(false));
    let printed: Arc<std::sync::Mutex<BTreeMap<usize, Vec<String>>>> = Default::default();
    let mut workers = Vec::new();
    for w in 1..=3 {
        let (worker, fixed, printed) = (group.worker(), carrier_fixed.clone(), printed.clone());
        workers.push(tokio::spawn(async move {
            worker
                .run(|e| {
                    let (fixed, printed) = (fixed.clone(), printed.clone());
                    async move {
                        if e.stream == "order-1004" && !fixed.load(Ordering::SeqCst) {
                            return Err("the carrier rejected the address (postcode missing)");
                        }
                        printed.lock().unwrap().entry(w).or_default().push(e.stream.clone());
                        Ok(())
                    }
                })
                .await
        }));
    }
    let settled = |parked: usize| {
        let group = &group;
        async move {
            let s = group.status();
            Ok::<_, anyhow::Error>(
                group.lag().await?.events == 0
                    && s.parked == parked
                    && s.waiting + s.in_flight + s.retrying == 0,
            )
        }
    };
    while !settled(1).await? {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    for (w, labels) in printed.lock().unwrap().iter() {
        println!(
            "   printer {w} printed {} labels ({}…)",
            labels.len(),
            labels.iter().take(3).cloned().collect::<Vec<_>>().join(", ")
        );
    }
    for p in group.parked() {
        println!(
            "   parked in $parked-shipping-labels: {}@{} after {} attempts: {}",
            p.stream, p.version, p.attempts, p.error
        );
    }
    carrier_fixed.store(true, Ordering::SeqCst);
    let queued = group.replay_parked().await?;
    while !settled(0).await? {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let labels: Vec<String> = printed.lock().unwrap().values().flatten().cloned().collect();
    let orders: std::collections::BTreeSet<&String> = labels.iter().collect();
    println!(
        "   the carrier fixed its API; {queued} parked order replayed → {} labels for {} orders, {} acks",
        labels.len(),
        orders.len(),
        group.status().acked
    );
    group.stop().await?;
    for w in workers {
        w.await??;
    }
    Ok(())
}

async fn orders(store: Arc<dyn EventStore>, dir: &Path, first: usize) -> Result<()> {
    let mut n = first;
    let mut next = |title: &str| {
        step(&format!("{n}. {title}"));
        n += 1;
    };
    next("The command side: placing an order appends OrderCreated and returns at once");
    let dispatcher = Dispatcher::new().route(Repository::<Order>::new(store.clone()));
    let catalogue = [("kettle", 39_90), ("teapot", 24_50), ("mugs", 12_00)];
    let customers = ["ada", "grace", "alan"];
    let mut slowest = 0u128;
    for i in 0..9usize {
        let (sku, cents) = catalogue[i % 3];
        let place = PlaceOrder {
            customer: customers[i % 3].into(),
            sku: sku.into(),
            quantity: 1 + (i % 2) as u32,
            cents,
        };
        let t0 = Instant::now();
        dispatcher.dispatch(&format!("{}", 1001 + i), &place).await?;
        slowest = slowest.max(t0.elapsed().as_micros());
    }
    println!(
        "   9 orders placed; the slowest call returned after {slowest} µs (one durable append, no consumer waited for)"
    );
    let bad = dispatcher
        .dispatch(
            "1100",
            &PlaceOrder { customer: "ada".into(), sku: "kettle".into(), quantity: 0, cents: 1 },
        )
        .await;
    println!(
        "   an order for 0 kettles → {}",
        bad.map(|_| "accepted?!".to_string()).unwrap_or_else(|e| e.to_string())
    );

    next("Five consumers follow the order events, each with its own checkpoint");
    let mut models = Vec::new();
    let mut runners = Vec::new();
    for c in consumers() {
        let model = MemoryModel::new(c);
        runners.push(Runner::new(store.clone(), Source::category("order"), model.clone()).spawn());
        models.push(model);
    }
    let head = store.last_position().await?.expect("orders were placed");
    for r in &runners {
        r.wait_for(head).await?;
    }
    for m in &models {
        let name = cairn_cqrs::Sink::name(&m.clone()).to_string();
        m.read(|done| {
            println!(
                "   {name:<9} did {} things, e.g. {}",
                done.len(),
                done.first().map_or("-", |s| s.as_str())
            );
        });
    }

    next("One consumer stops; the others carry on, and the lag shows it");
    runners[1].pause();
    for i in 0..3 {
        dispatcher
            .dispatch(
                &format!("{}", 1010 + i),
                &PlaceOrder {
                    customer: "ada".into(),
                    sku: "mugs".into(),
                    quantity: 2,
                    cents: 12_00,
                },
            )
            .await?;
    }
    let head = store.last_position().await?.expect("orders");
    for (i, r) in runners.iter().enumerate() {
        if i != 1 {
            r.wait_for(head).await?;
        }
    }
    while runners[1].status().state != cairn_cqrs::State::Paused {
        tokio::time::sleep(std::time::Duration::from_millis(1)).await;
    }
    println!("{}", status_table(&runners.iter().collect::<Vec<_>>()).await?);
    runners[1].resume();
    runners[1].wait_for(head).await?;
    println!(
        "   email resumed from its checkpoint: {} confirmations sent, none twice",
        models[1].read(|d| d.len())
    );

    next("The query side answers from read models, without replaying events");
    std::fs::create_dir_all(models_dir(dir))?;
    let orders = SqliteModel::open(models_dir(dir).join("orders.db"), OrdersByCustomer)?;
    let orders_db = orders.reader()?;
    let orders_runner = Runner::new(store.clone(), Source::category("order"), orders).spawn();
    let bank = Repository::<cairn_example_bank::Account>::new(store.clone());
    for (who, cents) in [("shop-ada", 1_200_00u64), ("shop-grace", 300_00), ("shop-alan", 75_00)] {
        bank.execute(
            who,
            &cairn_example_bank::Command::Open { owner: who.into(), currency: "EUR".into() },
        )
        .await?;
        bank.execute(
            who,
            &cairn_example_bank::Command::Deposit {
                amount: cents,
                currency: "EUR".into(),
                note: None,
            },
        )
        .await?;
    }
    let balances = SqliteModel::open(models_dir(dir).join("balances.db"), Balances)?;
    let balances_db = balances.reader()?;
    let balances_runner = Runner::new(store.clone(), Source::category("account"), balances).spawn();
    let head = store.last_position().await?.expect("events");
    orders_runner.wait_for(head).await?;
    balances_runner.wait_for(head).await?;
    let ada: Vec<(String, String, i64)> = orders_db
        .prepare("SELECT id, sku, total_cents FROM orders WHERE customer = ?1 ORDER BY id")?
        .query_map(["ada"], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
        .collect::<Result<_, _>>()?;
    println!("   orders of customer ada ({} rows, SELECT … WHERE customer = 'ada'):", ada.len());
    for (id, sku, cents) in ada.iter().take(4) {
        println!("     {id:<12} {sku:<7} {}", eur(*cents as u64));
    }
    let rich: Vec<(String, i64)> = balances_db
        .prepare("SELECT account, cents FROM balances WHERE cents > ?1 ORDER BY cents DESC")?
        .query_map([250_00], |r| Ok((r.get(0)?, r.get(1)?)))?
        .collect::<Result<_, _>>()?;
    println!(
        "   accounts with a balance over 250.00 EUR: {}",
        rich.iter()
            .map(|(a, c)| format!("{a} ({})", eur(*c as u64)))
            .collect::<Vec<_>>()
            .join(", ")
    );
    for r in runners.into_iter().chain([orders_runner, balances_runner]) {
        r.stop().await.1?;
    }
    Ok(())
}

// ---- insurance: notification vs event-carried state transfer ---------------

/// The quote service's own copy of customers' addresses (event-carried state).
struct Addresses;

impl MemoryProjection for Addresses {
    type State = HashMap<String, String>;
    fn name(&self) -> &str {
        "quote-service-addresses"
    }
    fn apply(&self, copy: &mut HashMap<String, String>, e: &RecordedEvent) -> Result<(), Failure> {
        if e.event_type == "CustomerAddressChanged" {
            let v: serde_json::Value = e.json()?;
            if let Some(address) = v["address"].as_str() {
                copy.insert(
                    v["customer"].as_str().unwrap_or_default().to_string(),
                    address.to_string(),
                );
            }
        }
        Ok(())
    }
}

fn quote_for(address: &str) -> u64 {
    // A made-up tariff: riverside homes cost more to insure.
    if address.contains("River") { 412_00 } else { 298_00 }
}

async fn insurance(store: Arc<dyn EventStore>, first: usize) -> Result<()> {
    step(&format!(
        "{first}. Insurance, as a notification: a thin event, and the consumer asks for details"
    ));
    let moves = [("c-7", "3 River Lane"), ("c-8", "12 Hill Road"), ("c-9", "5 River Walk")];
    // The customer service's own data, behind its "API" (a stream per customer).
    let api_calls = AtomicU64::new(0);
    let mut quotes = BTreeMap::new();
    let mut sub = store
        .subscribe(
            cairn_core::SubscriptionTarget::Query(cairn_core::Query::types(["CustomerMoved"])),
            cairn_core::StartFrom::End,
        )
        .await?;
    for (customer, address) in moves {
        store
            .append(
                &format!("customer-{customer}"),
                ExpectedVersion::Any,
                vec![NewEvent::json("AddressRecorded", &json!({"address": address}))?],
            )
            .await?;
        store
            .append(
                "notifications-customers",
                ExpectedVersion::Any,
                vec![NewEvent::json("CustomerMoved", &json!({"customer": customer}))?],
            )
            .await?;
    }
    for _ in 0..moves.len() {
        let e = sub.next().await.expect("live")?;
        let customer =
            e.json::<serde_json::Value>()?["customer"].as_str().unwrap_or_default().to_string();
        // The notification said only who moved: ask the customer service where to.
        api_calls.fetch_add(1, Ordering::Relaxed);
        let details = store
            .read_stream(
                &format!("customer-{customer}"),
                cairn_core::ReadStreamOptions::backward().limit(1),
            )
            .await?;
        let address = details[0].json::<serde_json::Value>()?["address"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        quotes.insert(customer, quote_for(&address));
    }
    println!(
        "   CustomerMoved {{customer}} ×3 → the quote service made {} calls back to the customer service",
        api_calls.load(Ordering::Relaxed)
    );
    println!(
        "   quotes: {}",
        quotes.iter().map(|(c, q)| format!("{c} {}", eur(*q))).collect::<Vec<_>>().join(", ")
    );
    println!(
        "   small events and one source of truth, but the quote service needs the customer service up, and asks it each time"
    );

    step(&format!(
        "{}. The same story with event-carried state transfer: the event carries the address",
        first + 1
    ));
    let copy = MemoryModel::new(Addresses);
    let runner = Runner::new(
        store.clone(),
        cairn_cqrs::Source::types(["CustomerAddressChanged"]),
        copy.clone(),
    )
    .spawn();
    let mut last = None;
    for (customer, address) in moves {
        let done = store
            .append(
                &format!("customers-{customer}"),
                ExpectedVersion::Any,
                vec![NewEvent::json(
                    "CustomerAddressChanged",
                    &json!({"customer": customer, "address": address}),
                )?],
            )
            .await?;
        last = Some(done.position);
    }
    runner.wait_for(last.expect("appended")).await?;
    let quotes: BTreeMap<String, u64> =
        copy.read(|c| c.iter().map(|(k, a)| (k.clone(), quote_for(a))).collect());
    println!(
        "   CustomerAddressChanged {{customer, address}} ×3 → 0 calls back; the quote service keeps its own copy of {} addresses",
        copy.read(|c| c.len())
    );
    println!(
        "   quotes: {}",
        quotes.iter().map(|(c, q)| format!("{c} {}", eur(*q))).collect::<Vec<_>>().join(", ")
    );
    println!(
        "   no runtime coupling and fast reads, at the price of bigger events and a copy that is eventually consistent"
    );
    let email = quotes
        .iter()
        .map(|(c, q)| format!("to {c}: your new quote is {}", eur(*q)))
        .next()
        .unwrap_or_default();
    println!("   the email service, following QuoteGenerated, would send e.g. \"{email}\"");
    runner.stop().await.1?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use cairn_core::ReadAllOptions;

    use super::*;

    #[tokio::test]
    async fn the_read_models_agree_with_the_events() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn EventStore> = Arc::new(EmbeddedStore::open(dir.path()).unwrap());
        walk(store.clone(), dir.path(), 1).await.unwrap();
        let created: Vec<_> = store
            .read_all(ReadAllOptions::forward())
            .await
            .unwrap()
            .into_iter()
            .filter(|e| e.event_type == "OrderCreated")
            .collect();
        assert!(!created.is_empty());
        let db = rusqlite::Connection::open(models_dir(dir.path()).join("orders.db")).unwrap();
        let rows: i64 = db.query_row("SELECT count(*) FROM orders", [], |r| r.get(0)).unwrap();
        assert_eq!(rows, created.len() as i64, "one row per OrderCreated, none twice");
        let db = rusqlite::Connection::open(models_dir(dir.path()).join("balances.db")).unwrap();
        let ada: i64 = db
            .query_row("SELECT cents FROM balances WHERE account = 'account-shop-ada'", [], |r| {
                r.get(0)
            })
            .unwrap();
        assert_eq!(ada, 1200_00);
    }
}
