//! `cairn serve`: any [`EventStore`] behind an HTTP/JSON API with live
//! subscriptions as Server-Sent Events, health, Prometheus metrics and an
//! OpenAPI document. The JSON shapes are `cairn_client::wire`'s, so the Rust
//! client and the server cannot drift apart.

mod api;
pub mod auth;
mod metrics;
mod openapi;
mod params;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use cairn_core::EventStore;
use tokio::sync::watch;

pub use metrics::Metrics;

/// How the server runs.
#[derive(Clone)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    /// Largest request body accepted (default 128 MiB, so that the store's own
    /// limits, 16 MiB per event and 64 MiB per append, decide first).
    pub body_limit: usize,
    /// API keys; `None` (or no keys) leaves the API open, which `cairn serve`
    /// allows on loopback only.
    pub keys: Option<auth::KeyFile>,
    /// Extra Prometheus text from the storage engine (fsync histogram, bytes).
    pub engine_metrics: Option<Arc<dyn Fn() -> String + Send + Sync>>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig { listen: SocketAddr::from(([127, 0, 0, 1], 8720)), body_limit: 128 * 1024 * 1024, keys: None, engine_metrics: None }
    }
}

pub(crate) struct App {
    pub store: Arc<dyn EventStore>,
    pub metrics: Arc<Metrics>,
    pub config: ServerConfig,
    pub auth: Option<auth::Auth>,
    pub shutdown: watch::Receiver<bool>,
    pub started: Instant,
}

/// A server running on the current tokio runtime.
pub struct Running {
    pub addr: SocketAddr,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl Running {
    /// Stops accepting connections, ends live subscriptions, lets in-flight
    /// requests (appends) finish, and returns when all is done.
    pub async fn shutdown(self) -> std::io::Result<()> {
        let _ = self.stop.send(true);
        self.task.await.unwrap_or_else(|e| Err(std::io::Error::other(e)))
    }

    /// Waits for the server to end (after [`Running::shutdown`] from elsewhere, or an error).
    pub async fn wait(self) -> std::io::Result<()> {
        self.task.await.unwrap_or_else(|e| Err(std::io::Error::other(e)))
    }

    /// A handle that stops the server when sent `true`.
    pub fn stopper(&self) -> watch::Sender<bool> {
        self.stop.clone()
    }
}

/// Binds `config.listen` (port 0 picks a free port) and serves `store` on
/// the current tokio runtime (call it from inside one).
pub fn start(store: Arc<dyn EventStore>, config: ServerConfig) -> std::io::Result<Running> {
    let listener = std::net::TcpListener::bind(config.listen)?;
    listener.set_nonblocking(true)?;
    let listener = tokio::net::TcpListener::from_std(listener)?;
    let addr = listener.local_addr()?;
    let (stop, shutdown) = watch::channel(false);
    let mut config = config;
    let auth = config.keys.take().map(auth::Auth::new).filter(|a| !a.is_empty());
    let app = Arc::new(App { store, metrics: Arc::new(Metrics::default()), config, auth, shutdown: shutdown.clone(), started: Instant::now() });
    let router = api::router(app);
    let mut signal = shutdown;
    let task = tokio::spawn(async move {
        axum::serve(listener, router.into_make_service_with_connect_info::<SocketAddr>())
            .with_graceful_shutdown(async move {
                let _ = signal.wait_for(|&stop| stop).await;
            })
            .await
    });
    Ok(Running { addr, stop, task })
}
