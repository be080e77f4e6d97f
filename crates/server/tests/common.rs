use std::sync::Arc;

use cairn_client::HttpStore;
use cairn_core::EventStore;
use cairn_log::EmbeddedStore;
use cairn_server::{Running, ServerConfig};
use tempfile::TempDir;

/// A server on a free loopback port over a fresh embedded store.
pub(crate) struct TestServer {
    pub running: Running,
    pub store: Arc<dyn EventStore>,
    pub url: String,
    _dir: TempDir,
}

pub(crate) fn server() -> TestServer {
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn EventStore> = Arc::new(EmbeddedStore::open(dir.path()).unwrap());
    let config = ServerConfig { listen: "127.0.0.1:0".parse().unwrap(), ..ServerConfig::default() };
    let running = cairn_server::start(store.clone(), config).unwrap();
    let url = format!("http://{}", running.addr);
    TestServer { running, store, url, _dir: dir }
}

/// A fresh server and an HTTP client of it, as the conformance suite wants them.
pub(crate) fn http_store() -> (Arc<dyn EventStore>, TestServer) {
    let server = server();
    let client: Arc<dyn EventStore> = Arc::new(HttpStore::new(&server.url).unwrap());
    (client, server)
}
