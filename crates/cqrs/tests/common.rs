use std::collections::HashMap;
use std::sync::Arc;

use cairn_core::{EventStore, ExpectedVersion, NewEvent, RecordedEvent};
use cairn_cqrs::{MemoryProjection, SqliteProjection};
use cairn_log::EmbeddedStore;
use rusqlite::{Transaction, params};
use tempfile::TempDir;

pub(crate) fn store_in(dir: &std::path::Path) -> Arc<dyn EventStore> {
    Arc::new(EmbeddedStore::open(dir).expect("open store"))
}

pub(crate) fn store() -> (Arc<dyn EventStore>, TempDir) {
    let dir = tempfile::tempdir().unwrap();
    (store_in(dir.path()), dir)
}

/// `n` deposits and withdrawals spread over `accounts` accounts, in batches.
pub(crate) async fn write_history(store: &dyn EventStore, accounts: u64, n: u64, seed: u64) {
    let mut batch = Vec::new();
    for i in 0..n {
        let account = (i * 7 + seed) % accounts;
        let (kind, amount) =
            if i % 3 == 2 { ("MoneyWithdrawn", i % 50) } else { ("MoneyDeposited", 100 + i % 900) };
        batch.push((
            format!("account-{account}"),
            NewEvent::json(kind, &serde_json::json!({ "amount": amount })).unwrap(),
        ));
        if batch.len() == 50 || i + 1 == n {
            for (stream, event) in batch.drain(..) {
                store.append(&stream, ExpectedVersion::Any, vec![event]).await.unwrap();
            }
        }
    }
}

pub(crate) fn signed_amount(e: &RecordedEvent) -> Option<i64> {
    let amount = e.json::<serde_json::Value>().ok()?["amount"].as_i64()?;
    match e.event_type.as_str() {
        "MoneyDeposited" => Some(amount),
        "MoneyWithdrawn" => Some(-amount),
        _ => None,
    }
}

/// Account → (balance, events applied): the events count catches double applies.
pub(crate) type Balances = HashMap<String, (i64, u64)>;

/// What a correct projection must hold: computed straight from `$all`.
pub(crate) async fn expected(store: &dyn EventStore) -> Balances {
    let mut out = Balances::new();
    for e in store.read_all(cairn_core::ReadAllOptions::forward()).await.unwrap() {
        if let Some(a) = signed_amount(&e) {
            let entry = out.entry(e.stream.clone()).or_default();
            entry.0 += a;
            entry.1 += 1;
        }
    }
    out
}

pub(crate) struct MemoryBalances;

impl MemoryProjection for MemoryBalances {
    type State = Balances;
    fn name(&self) -> &str {
        "balances"
    }
    fn apply(
        &self,
        state: &mut Balances,
        e: &RecordedEvent,
    ) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        if e.event_type == "Poison" {
            return Err("cannot digest Poison".into());
        }
        if let Some(a) = signed_amount(e) {
            let entry = state.entry(e.stream.clone()).or_default();
            entry.0 += a;
            entry.1 += 1;
        }
        Ok(())
    }
}

pub(crate) struct SqlBalances;

impl SqliteProjection for SqlBalances {
    fn name(&self) -> &str {
        "balances"
    }
    fn setup(&self, tx: &Transaction) -> rusqlite::Result<()> {
        tx.execute_batch("CREATE TABLE IF NOT EXISTS balances (account TEXT PRIMARY KEY, balance INTEGER NOT NULL, events INTEGER NOT NULL)")
    }
    fn apply(
        &self,
        tx: &Transaction,
        e: &RecordedEvent,
    ) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        if e.event_type == "Poison" {
            return Err("cannot digest Poison".into());
        }
        if let Some(a) = signed_amount(e) {
            tx.prepare_cached(
                "INSERT INTO balances (account, balance, events) VALUES (?1, ?2, 1)
                 ON CONFLICT (account) DO UPDATE SET balance = balance + ?2, events = events + 1",
            )?
            .execute(params![e.stream, a])?;
        }
        Ok(())
    }
}

pub(crate) fn sql_balances(conn: &rusqlite::Connection) -> Balances {
    let mut stmt = conn.prepare("SELECT account, balance, events FROM balances").unwrap();
    let rows = stmt
        .query_map([], |r| {
            Ok((r.get::<_, String>(0)?, (r.get::<_, i64>(1)?, r.get::<_, i64>(2)? as u64)))
        })
        .unwrap();
    rows.map(|r| r.unwrap()).collect()
}

/// [`expected`] over the events up to `position` only (nothing for `None`).
pub(crate) async fn expected_upto(
    store: &dyn EventStore,
    position: Option<cairn_core::Position>,
) -> Balances {
    let Some(position) = position else { return Balances::new() };
    let mut out = Balances::new();
    for e in store.read_all(cairn_core::ReadAllOptions::forward()).await.unwrap() {
        if e.position > position {
            break;
        }
        if let Some(a) = signed_amount(&e) {
            let entry = out.entry(e.stream.clone()).or_default();
            entry.0 += a;
            entry.1 += 1;
        }
    }
    out
}

/// A small seeded generator (xorshift64*), so a failing run can be replayed.
pub(crate) struct Rng(pub u64);

impl Rng {
    pub(crate) fn from_time() -> Self {
        Rng(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos()
            as u64
            | 1)
    }
    pub(crate) fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    pub(crate) fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next_u64() % (hi - lo)
    }
}

pub(crate) use cairn_core::conformance::spawn_ready_child;

/// The body of a child projector that the parent SIGKILLs: keeps appending
/// to the store while `runner` projects it, and says "ready" only once the
/// runner has applied something, so that every kill lands after progress.
pub(crate) async fn write_while_projecting(
    store: Arc<dyn EventStore>,
    runner: &cairn_cqrs::RunnerHandle,
    seed: u64,
    mut rng: Rng,
) -> ! {
    let writer = tokio::spawn(async move {
        for round in 0.. {
            write_history(store.as_ref(), 25, 20, seed.wrapping_add(round)).await;
            tokio::time::sleep(std::time::Duration::from_millis(rng.range(0, 5))).await;
        }
    });
    let mut ready = false;
    loop {
        let status = runner.status();
        if let cairn_cqrs::State::Failed(reason) = status.state {
            panic!("the projection failed: {reason}");
        }
        assert!(!writer.is_finished(), "the writer stopped");
        if !ready && status.applied > 0 {
            println!("\nready");
            ready = true;
        }
        tokio::time::sleep(std::time::Duration::from_millis(1)).await;
    }
}
