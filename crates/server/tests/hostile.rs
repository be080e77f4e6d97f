//! Hostile clients over raw TCP: half-open and trickling connections neither
//! starve other clients nor hold up a stop, heads and idle connections time
//! out, the connection cap makes newcomers wait, and a body declared too
//! large gets a 413 the client can read.

use std::sync::Arc;
use std::time::{Duration, Instant};

use cairn_client::HttpStore;
use cairn_core::{EventStore, ExpectedVersion, NewEvent};
use cairn_log::EmbeddedStore;
use cairn_server::{Running, ServerConfig};
use serde_json::json;
use tempfile::TempDir;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const PARTIAL_HEAD: &[u8] = b"POST /streams/held HTTP/1.1\r\nHost: cairn\r\nContent-Type: appl";

fn server(config: ServerConfig) -> (Running, TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn EventStore> = Arc::new(EmbeddedStore::open(dir.path()).unwrap());
    let config = ServerConfig { listen: "127.0.0.1:0".parse().unwrap(), ..config };
    (cairn_server::start(store, config).unwrap(), dir)
}

/// This process's soft open-file limit, raised to the hard one.
#[allow(clippy::unnecessary_cast)] // rlim_t is not u64 on every Unix
fn raise_own_fd_limit() -> u64 {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: both calls only read or write the struct passed.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit), 0);
        let raised = libc::rlimit { rlim_cur: limit.rlim_max, rlim_max: limit.rlim_max };
        if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
            limit = raised;
        }
    }
    limit.rlim_cur as u64
}

/// `n` connections, opened 100 at a time (the listen queue is short).
async fn connect_many(addr: std::net::SocketAddr, n: usize) -> Vec<TcpStream> {
    let mut all = Vec::with_capacity(n);
    while all.len() < n {
        let batch = (n - all.len()).min(100);
        let opened =
            futures_util::future::join_all((0..batch).map(|_| TcpStream::connect(addr))).await;
        all.extend(opened.into_iter().map(|c| c.expect("connect")));
    }
    all
}

fn append_one(
    url: &str,
    stream: &str,
) -> impl std::future::Future<Output = cairn_core::Result<cairn_core::AppendResult>> {
    let client = HttpStore::new(url).unwrap();
    let stream = stream.to_string();
    async move {
        client
            .append(
                &stream,
                ExpectedVersion::Any,
                vec![NewEvent::json("Ping", &json!({"n": 1})).unwrap()],
            )
            .await
    }
}

/// Whether the server has closed `tcp` (EOF or reset), waiting up to `within`.
async fn closed_within(tcp: &mut TcpStream, within: Duration) -> bool {
    let mut buf = [0u8; 4096];
    let deadline = Instant::now() + within;
    loop {
        match tokio::time::timeout_at(deadline.into(), tcp.read(&mut buf)).await {
            Err(_) => return false,
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => continue,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_open_and_trickling_connections_neither_starve_appends_nor_hold_up_the_stop() {
    // 2,500 sockets on each side, and the other tests' besides.
    let files = raise_own_fd_limit();
    assert!(
        files >= 8_000,
        "this test needs an open-file limit of 8,000 or more (ulimit -Hn is {files})"
    );
    // Long head and idle timeouts: the sockets are still held when the stop comes.
    let config = ServerConfig {
        header_read_timeout: Duration::from_secs(120),
        idle_timeout: Duration::from_secs(120),
        shutdown_grace: Duration::from_secs(1),
        ..ServerConfig::default()
    };
    let (running, _dir) = server(config);
    let addr = running.addr;
    let mut half_open = connect_many(addr, 2_000).await;
    for tcp in &mut half_open {
        tcp.write_all(PARTIAL_HEAD).await.unwrap();
    }
    let trickling = connect_many(addr, 500).await;
    let head = b"POST /streams/trickle HTTP/1.1\r\nHost: cairn\r\nContent-Type: application/json\r\nContent-Length: 100000\r\n\r\n{";
    let mut tricklers = Vec::new();
    for mut tcp in trickling {
        tcp.write_all(head).await.unwrap();
        tricklers.push(tokio::spawn(async move {
            // A byte every half second until the server lets go.
            while tcp.write_all(b" ").await.is_ok() {
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }));
    }

    let appended =
        tokio::time::timeout(Duration::from_secs(30), append_one(&running.url, "fresh-1")).await;
    appended
        .expect("an append on a new connection completes while 2,500 are held")
        .expect("the append succeeds");

    let started = Instant::now();
    tokio::time::timeout(Duration::from_secs(20), running.shutdown())
        .await
        .expect("shutdown returns after its grace although half-open sockets are still open")
        .unwrap();
    assert!(
        started.elapsed() >= Duration::from_millis(900),
        "the stop waited for the grace: {:?}",
        started.elapsed()
    );
    for trickler in tricklers {
        tokio::time::timeout(Duration::from_secs(10), trickler)
            .await
            .expect("the server dropped the trickling connections")
            .unwrap();
    }
    drop(half_open);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heads_that_do_not_come_and_idle_connections_are_closed() {
    let config = ServerConfig {
        header_read_timeout: Duration::from_millis(500),
        idle_timeout: Duration::from_secs(3),
        ..ServerConfig::default()
    };
    let (running, _dir) = server(config);
    let addr = running.addr;
    let mut silent = TcpStream::connect(addr).await.unwrap();
    let mut partial = TcpStream::connect(addr).await.unwrap();
    partial.write_all(PARTIAL_HEAD).await.unwrap();
    let mut h2_preface = TcpStream::connect(addr).await.unwrap();
    h2_preface.write_all(b"PRI * HTTP/2.0\r\n").await.unwrap();
    for (name, tcp) in [
        ("silent", &mut silent),
        ("partial head", &mut partial),
        ("part of the HTTP/2 preface", &mut h2_preface),
    ] {
        assert!(
            closed_within(tcp, Duration::from_secs(10)).await,
            "a {name} connection is closed after the head timeout"
        );
    }

    // One answered request, then: nothing (idle), or part of the next head.
    let request = b"GET /health HTTP/1.1\r\nHost: cairn\r\n\r\n";
    let mut idle = TcpStream::connect(addr).await.unwrap();
    let mut next_head = TcpStream::connect(addr).await.unwrap();
    for tcp in [&mut idle, &mut next_head] {
        tcp.write_all(request).await.unwrap();
        let mut buf = [0u8; 4096];
        let n = tcp.read(&mut buf).await.unwrap();
        assert!(buf[..n].starts_with(b"HTTP/1.1 200"), "{}", String::from_utf8_lossy(&buf[..n]));
    }
    let answered = Instant::now();
    next_head.write_all(PARTIAL_HEAD).await.unwrap();
    assert!(
        closed_within(&mut next_head, Duration::from_secs(10)).await,
        "an unfinished second head is cut"
    );
    tokio::time::sleep_until((answered + Duration::from_millis(1_500)).into()).await;
    assert!(
        matches!(idle.try_read(&mut [0u8; 16]), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock),
        "an idle keep-alive connection outlives the head timeout"
    );
    assert!(
        closed_within(&mut idle, Duration::from_secs(15)).await,
        "an idle connection is closed after the idle timeout"
    );
    assert!(
        answered.elapsed() >= Duration::from_millis(2_900),
        "not before: {:?}",
        answered.elapsed()
    );
    running.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_the_connection_cap_newcomers_wait_for_a_slot() {
    let config = ServerConfig {
        max_connections: 4,
        header_read_timeout: Duration::from_secs(1),
        ..ServerConfig::default()
    };
    let (running, _dir) = server(config);
    assert_eq!(running.max_connections, 4);
    let holders = connect_many(running.addr, 4).await;
    let started = Instant::now();
    let appended =
        tokio::time::timeout(Duration::from_secs(20), append_one(&running.url, "capped-1")).await;
    appended
        .expect("the append gets a slot once the silent connections are cut")
        .expect("the append succeeds");
    assert!(
        started.elapsed() >= Duration::from_millis(800),
        "it waited for a slot: {:?}",
        started.elapsed()
    );
    drop(holders);
    running.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_declared_too_large_gets_a_readable_413() {
    assert!(
        ServerConfig::default().body_limit < 128 * 1024 * 1024
            && ServerConfig::default().body_limit > 64 * 1024 * 1024 * 4 / 3
    );
    let (running, _dir) = server(ServerConfig::default());
    let tcp = TcpStream::connect(running.addr).await.unwrap();
    let (mut reader, mut writer) = tcp.into_split();
    // 200 MB declared, 4 MB sent: the client then waits for the answer.
    let sender = tokio::spawn(async move {
        let head = "POST /streams/huge HTTP/1.1\r\nHost: cairn\r\nContent-Type: application/json\r\nContent-Length: 200000000\r\n\r\n";
        writer.write_all(head.as_bytes()).await?;
        let chunk = vec![b' '; 64 * 1024];
        for _ in 0..64 {
            writer.write_all(&chunk).await?;
        }
        Ok::<_, std::io::Error>(writer)
    });
    let mut answer = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(20), async {
        let mut buf = [0u8; 8192];
        // Up to the end of the JSON body (the server closes after it).
        while !answer.ends_with(b"}") {
            match reader.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => answer.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    let text = String::from_utf8_lossy(&answer);
    assert!(read.is_ok(), "the 413 arrives without the body being read; got {text:?}");
    assert!(text.starts_with("HTTP/1.1 413"), "{text}");
    assert!(text.contains(r#""error":"body_too_large""#), "{text}");
    let _ = tokio::time::timeout(Duration::from_secs(10), sender)
        .await
        .expect("the server read and dropped the rest until the client stopped");
    // The server carries on.
    append_one(&running.url, "after-413").await.unwrap();
    running.shutdown().await.unwrap();
}
