//! `cairn bench W7`: 32 clients each appending single events to the server
//! on loopback for 10 s (scaled), over HTTP then over gRPC, with an SSE subscriber on `$all`
//! that must keep up. The clients run in the same process as the server, so
//! the two share the machine's cores, as a load generator on loopback would.
//! On PostgreSQL it also runs two servers on one database (each with its own
//! pool and LISTEN connection), 16 clients on each, while the subscriber on
//! the first must see the events appended through the second.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use cairn_client::HttpStore;
use cairn_core::{EventStore, ExpectedVersion, StartFrom, SubscriptionTarget};
use cairn_server::ServerConfig;
use uuid::Uuid;

/// W7 over HTTP with a lean client (raw HTTP/1.1 connections, so that the
/// figure is the server's), then through the Rust clients: `HttpStore` and
/// `GrpcStore` (a connection per client).
pub(crate) async fn w7(target: &crate::measure::Target, seconds: f64) -> Result<String> {
    let one = [target.store.clone()];
    let mut lines = Vec::new();
    for api in ["http", "http-client", "grpc"] {
        lines.push(w7_api(&one, target.backend, seconds, api).await?);
    }
    if let Some(second) = &target.second {
        lines.push(
            w7_api(&[target.store.clone(), second.clone()], target.backend, seconds, "http")
                .await?,
        );
    }
    Ok(lines.join("\n"))
}

/// A bare HTTP/1.1 client on one keep-alive connection: one POST per event.
struct RawHttp {
    sender: hyper::client::conn::http1::SendRequest<http_body_util::Full<bytes::Bytes>>,
    host: String,
    body: bytes::Bytes,
}

impl RawHttp {
    async fn connect(addr: std::net::SocketAddr) -> Result<RawHttp> {
        let tcp = tokio::net::TcpStream::connect(addr).await?;
        tcp.set_nodelay(true)?;
        let (sender, connection) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp)).await?;
        tokio::spawn(connection);
        let event =
            cairn_client::wire::EventIn::from_new(&crate::measure::deposit(100, Uuid::now_v7()))?;
        // No id: the server gives each event its own.
        let event = cairn_client::wire::EventIn { id: None, ..event };
        let body = serde_json::to_vec(&cairn_client::wire::AppendRequest {
            expected_version: None,
            events: vec![event],
            condition: None,
        })?;
        Ok(RawHttp { sender, host: addr.to_string(), body: body.into() })
    }

    async fn append(&mut self, stream: &str) -> Result<cairn_core::Position> {
        use http_body_util::BodyExt;
        let request = hyper::Request::post(format!("/streams/{stream}"))
            .header(hyper::header::HOST, &self.host)
            .header(hyper::header::CONTENT_TYPE, "application/json")
            .body(http_body_util::Full::new(self.body.clone()))?;
        let response = self.sender.send_request(request).await?;
        let status = response.status();
        let body = response.into_body().collect().await?.to_bytes();
        if !status.is_success() {
            bail!("the server answered {status}: {}", String::from_utf8_lossy(&body));
        }
        let done: cairn_core::AppendResult = serde_json::from_slice(&body)?;
        Ok(done.position)
    }
}

/// One run: a server per store in `stores` (the clients spread over them),
/// the SSE subscriber on the first.
async fn w7_api(
    stores: &[Arc<dyn EventStore>],
    backend: &str,
    seconds: f64,
    api: &str,
) -> Result<String> {
    let mut servers = Vec::new();
    for store in stores {
        let config = ServerConfig { listen: "127.0.0.1:0".parse()?, ..ServerConfig::default() };
        servers.push(cairn_server::start(store.clone(), config)?);
    }
    let running = &servers[0];
    let sse = HttpStore::new(&running.url)?;
    // Each gRPC client has its own connection, as separate services would.
    let client = |_: usize| -> Result<Option<Arc<dyn EventStore>>> {
        Ok(match api {
            "grpc" => Some(Arc::new(cairn_grpc::GrpcStore::new(&running.url)?)),
            "http-client" => Some(Arc::new(sse.clone())),
            _ => None,
        })
    };
    let addrs: Vec<std::net::SocketAddr> = servers.iter().map(|s| s.addr).collect();
    // The subscriber counts what it sees, from now on.
    let mut sub = sse.subscribe(SubscriptionTarget::All, StartFrom::End).await?;
    let (progress, mut watched) = tokio::sync::watch::channel((0u64, None));
    let seen = tokio::spawn(async move {
        let mut n = 0u64;
        while let Some(Ok(e)) = sub.next().await {
            if e.stream.starts_with("w7-") {
                n += 1;
                progress.send_replace((n, Some(e.position)));
            }
        }
    });
    let run_for = Duration::from_secs_f64(seconds);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..32 {
        let client = client(c)?;
        let addr = addrs[c % addrs.len()];
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            let stream = format!("w7-{c}-{}", Uuid::now_v7().simple());
            let mut last = None;
            let mut raw = match client {
                None => Some(RawHttp::connect(addr).await?),
                Some(_) => None,
            };
            while started.elapsed() < run_for {
                let t0 = Instant::now();
                let position = match (&client, &mut raw) {
                    (Some(client), _) => {
                        client
                            .append(
                                &stream,
                                ExpectedVersion::Any,
                                vec![crate::measure::deposit(100, Uuid::now_v7())],
                            )
                            .await?
                            .position
                    }
                    (None, Some(raw)) => raw.append(&stream).await?,
                    (None, None) => unreachable!("a client of one kind or the other"),
                };
                latencies.push(t0.elapsed());
                last = Some(position);
            }
            anyhow::Ok((latencies, last))
        }));
    }
    let mut latencies = Vec::new();
    let mut newest = None;
    for t in tasks {
        let (l, last) = t.await??;
        latencies.extend(l);
        newest = newest.max(last);
    }
    let elapsed = started.elapsed();
    let total = latencies.len() as u64;
    // How long after the last acknowledgement the subscriber had seen everything.
    let stopped_writing = Instant::now();
    let caught_up = tokio::time::timeout(
        Duration::from_secs(30),
        watched.wait_for(|(_, last)| *last >= newest),
    )
    .await
    .map(|r| r.map(drop));
    let sse_lag = stopped_writing.elapsed();
    let (delivered, last_seen) = *watched.borrow();
    for server in servers {
        server.shutdown().await?;
    }
    let _ = seen.await;
    if caught_up.is_err() || delivered != total {
        bail!(
            "the SSE subscriber saw {delivered} of {total} events (last {last_seen:?}, newest {newest:?})"
        );
    }
    latencies.sort();
    Ok(format!(
        "bench W7 backend={backend} api={api} servers={} clients=32 secs={:.1} events={total} events_per_s={:.0} p50_us={} p99_us={} sse_delivered={delivered} sse_lag_ms={}",
        stores.len(),
        elapsed.as_secs_f64(),
        total as f64 / elapsed.as_secs_f64(),
        crate::measure::percentile(&latencies, 0.50),
        crate::measure::percentile(&latencies, 0.99),
        sse_lag.as_millis(),
    ))
}
