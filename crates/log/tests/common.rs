use std::sync::Arc;

use cairn_core::EventStore;
use cairn_log::{EmbeddedStore, Options};
use tempfile::TempDir;

pub fn fresh() -> (EmbeddedStore, TempDir) {
    fresh_with(Options::default())
}

pub fn fresh_with(options: Options) -> (EmbeddedStore, TempDir) {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = EmbeddedStore::open_with(dir.path(), options).expect("open store");
    (store, dir)
}

pub fn fresh_dyn() -> (Arc<dyn EventStore>, TempDir) {
    // Small segments so that the suite also crosses segment boundaries.
    let (store, dir) = fresh_with(Options { segment_bytes: 64 * 1024, ..Options::default() });
    (Arc::new(store), dir)
}
