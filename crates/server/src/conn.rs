//! Connections: the accept loop, each connection's timeouts, and the
//! bounded graceful stop (in place of `axum::serve`, which has none of them).

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, ready};
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use http_body::{Frame, SizeHint};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinSet;

/// After the server closes its side, how long it goes on reading (and
/// dropping) what the client still sends: closing with unread data sends
/// a reset, which can destroy an answer (a 413) the client has not read.
const LINGER: Duration = Duration::from_secs(2);

pub(crate) struct Limits {
    pub header_read: Duration,
    pub idle: Duration,
    pub grace: Duration,
    pub max: usize,
}

struct Shared {
    router: axum::Router,
    http: auto::Builder<TokioExecutor>,
    tls: Option<tokio_rustls::TlsAcceptor>,
    limits: Limits,
}

/// Accepts until `stop`, then waits up to `limits.grace` for the
/// connections (each told to finish) and drops the rest.
pub(crate) async fn serve(
    listener: TcpListener,
    router: axum::Router,
    tls: Option<tokio_rustls::TlsAcceptor>,
    limits: Limits,
    mut stop: watch::Receiver<bool>,
) -> io::Result<()> {
    let mut http = auto::Builder::new(TokioExecutor::new());
    // Heads are timed by `Activity` (hyper's own timer would also cut idle keep-alive at the head timeout).
    http.http1().header_read_timeout(None);
    let ping = Some(limits.idle / 2).filter(|p| !p.is_zero());
    http.http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(ping)
        .keep_alive_timeout(limits.header_read);
    let slots = Arc::new(Semaphore::new(limits.max));
    let grace = limits.grace;
    let shared = Arc::new(Shared { router, http, tls, limits });
    let mut connections = JoinSet::new();
    loop {
        // At the cap, wait here rather than accept and close: the file
        // descriptor is never taken, and the client waits in the listen
        // queue for a slot instead of getting a refusal to retry.
        let slot = tokio::select! {
            slot = slots.clone().acquire_owned() => slot.expect("the semaphore is never closed"),
            _ = stopped(&mut stop) => break,
        };
        let (tcp, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(e) => {
                    accept_failed(e).await;
                    continue;
                }
            },
            Some(_) = connections.join_next() => continue,
            _ = stopped(&mut stop) => break,
        };
        // No Nagle delay: HTTP/2 (gRPC) answers in several small writes.
        let _ = tcp.set_nodelay(true);
        let (shared, stop) = (shared.clone(), stop.clone());
        connections.spawn(async move {
            connection(tcp, peer, &shared, stop).await;
            drop(slot);
        });
    }
    drop(listener);
    let finished =
        tokio::time::timeout(grace, async { while connections.join_next().await.is_some() {} })
            .await;
    if finished.is_err() {
        connections.shutdown().await;
    }
    Ok(())
}

async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|&s| s).await;
}

/// A failed accept: a connection reset before it was taken is the
/// client's loss; anything else (out of file descriptors) passes with
/// time, so wait a little rather than spin.
async fn accept_failed(e: io::Error) {
    if !matches!(
        e.kind(),
        io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionRefused
    ) {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn connection(
    tcp: TcpStream,
    peer: SocketAddr,
    shared: &Shared,
    mut stop: watch::Receiver<bool>,
) {
    let activity = Arc::new(Activity::new());
    let socket = Socket { tcp, activity: activity.clone(), linger: None };
    let Some(acceptor) = &shared.tls else {
        return http(socket, peer, activity, shared, stop).await;
    };
    let deadline = activity.accepted + shared.limits.header_read;
    let handshake = tokio::time::timeout_at(deadline.into(), acceptor.accept(socket));
    let tls = tokio::select! {
        tls = handshake => tls,
        _ = stopped(&mut stop) => return,
    };
    if let Ok(Ok(tls)) = tls {
        http(tls, peer, activity, shared, stop).await;
    }
}

/// HTTP/1.1 or HTTP/2 (sniffed) on one connection until it ends, times
/// out or the server stops.
async fn http<I>(
    io: I,
    peer: SocketAddr,
    activity: Arc<Activity>,
    shared: &Shared,
    mut stop: watch::Receiver<bool>,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (router, tracker) = (shared.router.clone(), activity.clone());
    let service = hyper::service::service_fn(move |mut request: hyper::Request<Incoming>| {
        request.extensions_mut().insert(axum::extract::ConnectInfo(peer));
        let busy = tracker.begin(request.version());
        let mut router = router.clone();
        async move {
            let response = tower_service::Service::call(&mut router, request).await?;
            Ok::<_, Infallible>(response.map(|body| Busy { body, _busy: busy }))
        }
    });
    let conn = shared.http.serve_connection_with_upgrades(TokioIo::new(io), service);
    tokio::pin!(conn);
    let Limits { header_read, idle, .. } = shared.limits;
    let stopping = tokio::select! {
        _ = conn.as_mut() => return,
        _ = stopped(&mut stop) => true,
        expiry = activity.expired(header_read, idle) => match expiry {
            // No request in flight and the head is late: nothing to finish.
            Expiry::Head => return,
            Expiry::Idle => false,
        },
    };
    // Finish what is in flight (HTTP/2 says GOAWAY); after a stop, `serve` bounds the wait.
    conn.as_mut().graceful_shutdown();
    if stopping {
        let _ = conn.await;
    } else {
        let _ = tokio::time::timeout(header_read.max(LINGER), conn).await;
    }
}

enum Expiry {
    Head,
    Idle,
}

/// What a connection is doing, for its timeouts.
struct Activity {
    accepted: Instant,
    doing: Mutex<Doing>,
}

struct Doing {
    in_flight: usize,
    requests: u64,
    http2: bool,
    idle_since: Instant,
    /// The first byte read while no request was in flight (a head coming).
    head_since: Option<Instant>,
}

impl Activity {
    fn new() -> Activity {
        let now = Instant::now();
        Activity {
            accepted: now,
            doing: Mutex::new(Doing {
                in_flight: 0,
                requests: 0,
                http2: false,
                idle_since: now,
                head_since: None,
            }),
        }
    }

    fn doing(&self) -> std::sync::MutexGuard<'_, Doing> {
        self.doing.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn read(&self) {
        let mut doing = self.doing();
        if doing.in_flight == 0 && doing.head_since.is_none() {
            doing.head_since = Some(Instant::now());
        }
    }

    fn begin(self: &Arc<Self>, version: hyper::Version) -> BusyGuard {
        let mut doing = self.doing();
        doing.in_flight += 1;
        doing.requests += 1;
        doing.http2 = version == hyper::Version::HTTP_2;
        doing.head_since = None;
        BusyGuard(self.clone())
    }

    /// When the connection should close, and why, if nothing changes.
    fn deadline(&self, header_read: Duration, idle: Duration) -> Option<(Instant, Expiry)> {
        let doing = self.doing();
        if doing.in_flight > 0 {
            return None;
        }
        if doing.requests == 0 {
            return Some((self.accepted + header_read, Expiry::Head));
        }
        let idle_end = doing.idle_since + idle;
        // HTTP/2 reads control frames between requests; only HTTP/1.1 bytes start a head.
        match doing.head_since {
            Some(head) if !doing.http2 && head + header_read < idle_end => {
                Some((head + header_read, Expiry::Head))
            }
            _ => Some((idle_end, Expiry::Idle)),
        }
    }

    /// Resolves when a timeout has passed. Wakes at least twice per the
    /// shorter timeout, so a deadline that moves earlier is never missed.
    async fn expired(&self, header_read: Duration, idle: Duration) -> Expiry {
        let check = (header_read.min(idle) / 2).max(Duration::from_millis(10));
        loop {
            let now = Instant::now();
            let wake = match self.deadline(header_read, idle) {
                Some((end, why)) if end <= now => return why,
                Some((end, _)) => end.min(now + check),
                None => now + check,
            };
            tokio::time::sleep_until(wake.into()).await;
        }
    }
}

/// Held from a request's start until its response body is done or dropped.
struct BusyGuard(Arc<Activity>);

impl Drop for BusyGuard {
    fn drop(&mut self) {
        let mut doing = self.0.doing();
        doing.in_flight -= 1;
        if doing.in_flight == 0 {
            doing.idle_since = Instant::now();
            doing.head_since = None;
        }
    }
}

/// A response body that keeps its request counted as in flight.
struct Busy {
    body: Body,
    _busy: BusyGuard,
}

impl http_body::Body for Busy {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        Pin::new(&mut self.get_mut().body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// A connection's TCP stream: notes reads for the timeouts, and lingers
/// on close (see [`LINGER`]).
struct Socket {
    tcp: TcpStream,
    activity: Arc<Activity>,
    linger: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl AsyncRead for Socket {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let read = Pin::new(&mut this.tcp).poll_read(cx, buf);
        if buf.filled().len() > before {
            this.activity.read();
        }
        read
    }
}

impl AsyncWrite for Socket {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().tcp).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().tcp).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.tcp.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().tcp).poll_flush(cx)
    }

    /// Sends FIN, then reads and drops until the client closes too or
    /// [`LINGER`] passes.
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.linger.is_none() {
            ready!(Pin::new(&mut this.tcp).poll_shutdown(cx))?;
            this.linger = Some(Box::pin(tokio::time::sleep(LINGER)));
        }
        let mut scratch = [0u8; 8192];
        loop {
            if this.linger.as_mut().is_some_and(|l| l.as_mut().poll(cx).is_ready()) {
                return Poll::Ready(Ok(()));
            }
            let mut buf = ReadBuf::new(&mut scratch);
            match ready!(Pin::new(&mut this.tcp).poll_read(cx, &mut buf)) {
                Ok(()) if !buf.filled().is_empty() => continue,
                _ => return Poll::Ready(Ok(())),
            }
        }
    }
}
