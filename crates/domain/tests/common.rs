use std::sync::Arc;

use cairn_core::EventStore;
use cairn_domain::{Repository, SnapshotPolicy};
use cairn_example_bank::{Account, Command};
use cairn_log::EmbeddedStore;
use tempfile::TempDir;

pub(crate) fn store() -> (Arc<dyn EventStore>, TempDir) {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = EmbeddedStore::open(dir.path()).expect("open store");
    (Arc::new(store), dir)
}

/// A repository without snapshots, so each test chooses its own.
pub(crate) fn bank() -> (Repository<Account>, TempDir) {
    let (store, dir) = store();
    (Repository::new(store).with_snapshots(SnapshotPolicy::Never), dir)
}

pub(crate) fn open(owner: &str) -> Command {
    Command::Open { owner: owner.into(), currency: "EUR".into() }
}

pub(crate) fn deposit(amount: u64) -> Command {
    Command::Deposit { amount, currency: "EUR".into(), note: None }
}
