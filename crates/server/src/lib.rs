//! `cairn serve`: any [`EventStore`] behind an HTTP/JSON API with live
//! subscriptions as Server-Sent Events, health, Prometheus metrics and an
//! OpenAPI document. The JSON shapes are `cairn_client::wire`'s, so the Rust
//! client and the server cannot drift apart.

mod api;
pub mod auth;
mod grpc;
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
    /// Serve HTTPS with this certificate chain and private key (PEM files).
    pub tls: Option<TlsFiles>,
    /// Extra Prometheus text from the storage engine (fsync histogram, bytes).
    pub engine_metrics: Option<Arc<dyn Fn() -> String + Send + Sync>>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig { listen: SocketAddr::from(([127, 0, 0, 1], 8720)), body_limit: 128 * 1024 * 1024, keys: None, tls: None, engine_metrics: None }
    }
}

/// PEM files for HTTPS.
#[derive(Clone, Debug)]
pub struct TlsFiles {
    pub cert: std::path::PathBuf,
    pub key: std::path::PathBuf,
}

/// A rustls server configuration (ring) from PEM files, or what is wrong with them.
fn tls_config(files: &TlsFiles) -> std::io::Result<rustls::ServerConfig> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let bad = |what: &str, path: &std::path::Path, e: &dyn std::fmt::Display| {
        std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("TLS {what} {}: {e}", path.display()))
    };
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&files.cert)
        .map_err(|e| bad("certificate", &files.cert, &e))?
        .collect::<Result<_, _>>()
        .map_err(|e| bad("certificate", &files.cert, &e))?;
    if certs.is_empty() {
        return Err(bad("certificate", &files.cert, &"no CERTIFICATE block in the file"));
    }
    let key = PrivateKeyDer::from_pem_file(&files.key).map_err(|e| bad("private key", &files.key, &e))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| bad("setup for", &files.cert, &e))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| bad("certificate and key", &files.cert, &e))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
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
    /// `http://…` or `https://…`.
    pub url: String,
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
    let tls = config.tls.as_ref().map(tls_config).transpose()?;
    let config_tls = tls.is_some();
    let listener = std::net::TcpListener::bind(config.listen)?;
    listener.set_nonblocking(true)?;
    let addr = listener.local_addr()?;
    let (stop, shutdown) = watch::channel(false);
    let mut config = config;
    let auth = config.keys.take().map(auth::Auth::new).filter(|a| !a.is_empty());
    let app = Arc::new(App { store, metrics: Arc::new(Metrics::default()), config, auth, shutdown: shutdown.clone(), started: Instant::now() });
    let router = api::router(app);
    let mut signal = shutdown;
    let task = match tls {
        None => {
            // No Nagle delay: HTTP/2 (gRPC) answers in several small writes.
            let listener = axum::serve::ListenerExt::tap_io(tokio::net::TcpListener::from_std(listener)?, |tcp| {
                let _ = tcp.set_nodelay(true);
            });
            tokio::spawn(async move {
                axum::serve(listener, router.into_make_service_with_connect_info::<SocketAddr>())
                    .with_graceful_shutdown(async move {
                        let _ = signal.wait_for(|&stop| stop).await;
                    })
                    .await
            })
        }
        Some(config) => {
            let handle = axum_server::Handle::new();
            let stopper = handle.clone();
            tokio::spawn(async move {
                let _ = signal.wait_for(|&stop| stop).await;
                stopper.graceful_shutdown(None);
            });
            let rustls = axum_server::tls_rustls::RustlsConfig::from_config(Arc::new(config));
            let server = axum_server::from_tcp_rustls(listener, rustls)?.handle(handle);
            tokio::spawn(async move { server.serve(router.into_make_service_with_connect_info::<SocketAddr>()).await })
        }
    };
    let url = format!("{}://{addr}", if config_tls { "https" } else { "http" });
    Ok(Running { addr, url, stop, task })
}
