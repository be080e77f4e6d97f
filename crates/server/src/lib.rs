//! `cairn serve`: any [`EventStore`] behind an HTTP/JSON API with live
//! subscriptions as Server-Sent Events, health, Prometheus metrics and an
//! OpenAPI document. The JSON shapes are `cairn_wire`'s, so the Rust
//! client and the server cannot drift apart.

mod api;
mod appends;
pub mod auth;
mod conn;
mod grpc;
mod metrics;
mod openapi;
mod params;
mod reply;
mod sagas;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cairn_core::EventStore;
use tokio::sync::watch;

pub use metrics::Metrics;

/// Renders the storage engine's own Prometheus lines for `/metrics`.
pub type EngineMetrics = dyn Fn() -> String + Send + Sync;

/// How the server runs.
#[derive(Clone)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    /// Largest request body accepted (default [`BODY_LIMIT`], 88 MiB: the
    /// base64 of a binary append at the store's 64 MiB limit is 85⅓ MiB, and
    /// the JSON around the events gets the rest). So the store's own limits,
    /// 16 MiB per event and 64 MiB per append, decide for any body that could
    /// be a valid append, and nothing larger is read. A declared
    /// Content-Length over it gets 413 before any of the body is read.
    pub body_limit: usize,
    /// API keys; `None` (or no keys) leaves the API open, which `cairn serve`
    /// allows on loopback only.
    pub keys: Option<auth::KeyFile>,
    /// Serve HTTPS with this certificate chain and private key (PEM files).
    pub tls: Option<TlsFiles>,
    /// Extra Prometheus text from the storage engine (fsync histogram, bytes).
    pub engine_metrics: Option<Arc<EngineMetrics>>,
    /// Most connections open at once (default 10,000), and never more than
    /// the open-file limit less [`FD_RESERVE`]. At the cap the server stops
    /// accepting until a connection ends: new clients wait in the kernel's
    /// listen queue rather than being refused.
    pub max_connections: usize,
    /// A new connection's TLS handshake and first request head must arrive
    /// within this (default 10 s), and so must each later HTTP/1.1 request
    /// head once its first byte has.
    pub header_read_timeout: Duration,
    /// A connection with no request in flight is closed after this long
    /// (default 60 s). HTTP/2 connections are also pinged at half of it, so a
    /// vanished peer of a quiet gRPC subscription is noticed.
    pub idle_timeout: Duration,
    /// How long a graceful stop waits for requests in flight (default 10 s);
    /// the connections still open then are dropped.
    pub shutdown_grace: Duration,
}

/// The default body limit: 64 MiB of binary data in base64 (85⅓ MiB) plus
/// room for the JSON envelope (ids, types, tags of up to 10,000 events).
pub const BODY_LIMIT: usize = 88 * 1024 * 1024;

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 8720)),
            body_limit: BODY_LIMIT,
            keys: None,
            tls: None,
            engine_metrics: None,
            max_connections: 10_000,
            header_read_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            shutdown_grace: Duration::from_secs(10),
        }
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
        std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("TLS {what} {}: {e}", path.display()),
        )
    };
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&files.cert)
        .map_err(|e| bad("certificate", &files.cert, &e))?
        .collect::<Result<_, _>>()
        .map_err(|e| bad("certificate", &files.cert, &e))?;
    if certs.is_empty() {
        return Err(bad("certificate", &files.cert, &"no CERTIFICATE block in the file"));
    }
    let key =
        PrivateKeyDer::from_pem_file(&files.key).map_err(|e| bad("private key", &files.key, &e))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| bad("setup for", &files.cert, &e))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| bad("certificate and key", &files.cert, &e))?;
    // h2 first: gRPC clients need it, browsers and curl pick it too.
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
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
    /// The connection cap in force: `ServerConfig::max_connections`, lowered
    /// to fit the open-file limit.
    pub max_connections: usize,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl Running {
    /// Stops accepting connections, ends live subscriptions, lets in-flight
    /// requests (appends) finish for up to `shutdown_grace`, drops the
    /// connections still open then, and returns.
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
/// the current tokio runtime (call it from inside one). Raises the process's
/// open-file limit first ([`raise_fd_limit`]).
pub fn start(store: Arc<dyn EventStore>, config: ServerConfig) -> std::io::Result<Running> {
    let tls = config.tls.as_ref().map(tls_config).transpose()?;
    let url_scheme = if tls.is_some() { "https" } else { "http" };
    let max_connections = connection_cap(config.max_connections, raise_fd_limit());
    let listener = std::net::TcpListener::bind(config.listen)?;
    listener.set_nonblocking(true)?;
    let listener = tokio::net::TcpListener::from_std(listener)?;
    let addr = listener.local_addr()?;
    let (stop, shutdown) = watch::channel(false);
    let mut config = config;
    let auth = config.keys.take().map(auth::Auth::new).filter(|a| !a.is_empty());
    let limits = conn::Limits {
        header_read: config.header_read_timeout,
        idle: config.idle_timeout,
        grace: config.shutdown_grace,
        max: max_connections,
    };
    let app = Arc::new(App {
        store,
        metrics: Arc::new(Metrics::default()),
        config,
        auth,
        shutdown: shutdown.clone(),
        started: Instant::now(),
    });
    let router = api::router(app);
    let tls = tls.map(|c| tokio_rustls::TlsAcceptor::from(Arc::new(c)));
    let task = tokio::spawn(conn::serve(listener, router, tls, limits, shutdown));
    Ok(Running { addr, url: format!("{url_scheme}://{addr}"), max_connections, stop, task })
}

/// Open files kept back for the store (segments, indexes, a database pool)
/// when the connection cap is fitted to the open-file limit.
pub const FD_RESERVE: u64 = 256;

/// The process's soft open-file limit before and after [`raise_fd_limit`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FdLimit {
    pub was: u64,
    pub now: u64,
}

/// Raises the soft RLIMIT_NOFILE to the hard limit, once per process: each
/// connection is a file descriptor, and the usual soft limit (1,024) would
/// let a thousand idle sockets starve the store. Later calls return the
/// first answer; `None` where there is no such limit (not Unix).
pub fn raise_fd_limit() -> Option<FdLimit> {
    static RAISED: std::sync::OnceLock<Option<FdLimit>> = std::sync::OnceLock::new();
    *RAISED.get_or_init(raise_nofile)
}

#[cfg(unix)]
#[allow(clippy::unnecessary_cast)] // rlim_t is not u64 on every Unix
fn raise_nofile() -> Option<FdLimit> {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit and setrlimit only read or write the struct passed.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return None;
    }
    let was = limit.rlim_cur as u64;
    let raised = libc::rlimit { rlim_cur: limit.rlim_max, rlim_max: limit.rlim_max };
    // This fails where the hard limit is "unlimited" but the kernel caps it (macOS): keep the soft one then.
    let now = if limit.rlim_cur < limit.rlim_max
        && unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0
    {
        limit.rlim_max as u64
    } else {
        was
    };
    Some(FdLimit { was, now })
}

#[cfg(not(unix))]
fn raise_nofile() -> Option<FdLimit> {
    None
}

/// `wanted`, lowered so that connections leave [`FD_RESERVE`] files for the store.
fn connection_cap(wanted: usize, files: Option<FdLimit>) -> usize {
    let fit = files.map_or(usize::MAX, |f| {
        usize::try_from(f.now.saturating_sub(FD_RESERVE)).unwrap_or(usize::MAX)
    });
    wanted.min(fit).max(1)
}
