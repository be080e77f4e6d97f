//! `cairn bench W7 --client-process`: the server measured from another
//! process, as services see it. The parent runs the server on the store
//! under test; for each line a child process (`cairn bench W7-client`)
//! connects over loopback and drives it: writers that each append one
//! event with the exact expected version and wait for the answer, a
//! streaming producer, or readers of short streams. The parent adds what
//! only the server side knows: its CPU time per append and the appends
//! per fsync.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use cairn_grpc::proto;
use uuid::Uuid;

/// The hidden workload name of the child.
pub(crate) const CHILD: &str = "W7-client";

/// Streams the readers read, of `READ_STREAM_LEN` events each.
const READ_STREAMS: u64 = 1_000;
const READ_STREAM_LEN: u64 = 10;

/// What one child does.
#[derive(Clone, Copy, PartialEq)]
enum Mode {
    Append,
    Stream,
    Read,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Append => "append",
            Mode::Stream => "stream",
            Mode::Read => "read",
        }
    }

    fn parse(s: &str) -> Result<Mode> {
        Ok(match s {
            "append" => Mode::Append,
            "stream" => Mode::Stream,
            "read" => Mode::Read,
            other => bail!("W7-client: unknown mode {other:?}"),
        })
    }
}

/// The lines of W7 measured from a child process.
pub(crate) async fn w7(target: &crate::measure::Target, seconds: f64) -> Result<String> {
    let config = cairn_server::ServerConfig {
        listen: "127.0.0.1:0".parse()?,
        ..cairn_server::ServerConfig::default()
    };
    let server = cairn_server::start(target.store.clone(), config)?;
    let mut lines = Vec::new();
    let runs: [(&str, Mode, usize); 9] = [
        ("grpc", Mode::Append, 1),
        ("grpc", Mode::Append, 16),
        ("grpc", Mode::Append, 64),
        ("http", Mode::Append, 1),
        ("http", Mode::Append, 16),
        ("http", Mode::Append, 64),
        ("grpc", Mode::Stream, 1),
        ("grpc", Mode::Read, 16),
        ("http", Mode::Read, 16),
    ];
    let mut filled = false;
    for (api, mode, tasks) in runs {
        if mode == Mode::Read && !filled {
            fill_read_streams(target).await?;
            filled = true;
        }
        lines.push(run_child(target, server.addr, api, mode, tasks, seconds).await?);
    }
    server.shutdown().await?;
    Ok(lines.join("\n"))
}

/// The streams the readers read.
async fn fill_read_streams(target: &crate::measure::Target) -> Result<()> {
    for s in 0..READ_STREAMS {
        let events =
            (0..READ_STREAM_LEN).map(|i| crate::measure::deposit(i, Uuid::now_v7())).collect();
        target
            .store
            .append(&format!("w7-read-{s}"), cairn_core::ExpectedVersion::NoStream, events)
            .await?;
    }
    Ok(())
}

/// The user and system CPU time of this process (`libc::RUSAGE_SELF`) or
/// of its children that ended (`libc::RUSAGE_CHILDREN`).
fn cpu_time_of(who: libc::c_int) -> Duration {
    // SAFETY: getrusage only writes the struct it is given.
    let usage = unsafe {
        let mut usage: libc::rusage = std::mem::zeroed();
        libc::getrusage(who, &mut usage);
        usage
    };
    let micros = |t: libc::timeval| t.tv_sec as u64 * 1_000_000 + t.tv_usec as u64;
    Duration::from_micros(micros(usage.ru_utime) + micros(usage.ru_stime))
}

async fn run_child(
    target: &crate::measure::Target,
    addr: SocketAddr,
    api: &str,
    mode: Mode,
    tasks: usize,
    seconds: f64,
) -> Result<String> {
    let spec = format!("{api} {} {tasks} {seconds} {addr}", mode.name());
    let cpu_time = || cpu_time_of(libc::RUSAGE_SELF);
    let (syncs, cpu, client_cpu) = (target.syncs(), cpu_time(), cpu_time_of(libc::RUSAGE_CHILDREN));
    let child = tokio::task::spawn_blocking(move || {
        std::process::Command::new(std::env::current_exe()?)
            .args(["bench", CHILD, "--client-spec", &spec])
            .output()
    });
    let out = child.await??;
    let cpu = cpu_time() - cpu;
    let client_cpu = cpu_time_of(libc::RUSAGE_CHILDREN) - client_cpu;
    let syncs = target.syncs().zip(syncs).map(|(after, before)| after - before);
    let text = String::from_utf8_lossy(&out.stdout);
    let Some(line) = text.lines().find(|l| l.starts_with("events=")) else {
        bail!(
            "the W7 client ({api} {} x{tasks}) failed: {}",
            mode.name(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    };
    let events = crate::scale::field(line, "events").unwrap_or(0.0);
    let requests = crate::scale::field(line, "requests").unwrap_or(events);
    let mut out = format!(
        "bench W7 backend={} client=process api={api} mode={} tasks={tasks} {line}",
        target.backend,
        mode.name()
    );
    let what = if mode == Mode::Read { "read" } else { "append" };
    if let Some(syncs) = syncs.filter(|s| *s > 0 && mode != Mode::Read) {
        out += &format!(" appends_per_fsync={:.1}", requests / syncs as f64);
    }
    let per = |t: Duration| t.as_secs_f64() * 1e6 / requests.max(1.0);
    out += &format!(
        " server_cpu_us_per_{what}={:.1} client_cpu_us_per_{what}={:.1}",
        per(cpu),
        per(client_cpu)
    );
    Ok(out)
}

/// The child: `spec` is "API MODE TASKS SECONDS ADDR"; prints one line.
pub(crate) async fn child(spec: &str) -> Result<String> {
    let parts: Vec<&str> = spec.split_whitespace().collect();
    let [api, mode, tasks, seconds, addr] = parts[..] else {
        bail!("W7-client: --client-spec wants \"API MODE TASKS SECONDS ADDR\", got {spec:?}")
    };
    let (mode, tasks, seconds): (Mode, usize, f64) =
        (Mode::parse(mode)?, tasks.parse()?, seconds.parse()?);
    let addr: SocketAddr = addr.parse().context("W7-client: the address")?;
    let run_for = Duration::from_secs_f64(seconds);
    let run = Uuid::now_v7().simple().to_string();
    // gRPC clients share one connection (HTTP/2 multiplexes: a service
    // keeps one channel); HTTP/1.1 ones have a connection each.
    let channel = if api == "grpc" { Some(grpc_client(addr).await?) } else { None };
    let started = Instant::now();
    let mut handles = Vec::new();
    for t in 0..tasks {
        let name = format!("w7-{}-{t}", &run[..12]);
        let api = api.to_string();
        let channel = channel.clone();
        handles.push(tokio::spawn(async move {
            match (api.as_str(), mode, channel) {
                ("grpc", Mode::Append, Some(c)) => grpc_writer(c, &name, started, run_for).await,
                ("http", Mode::Append, _) => http_writer(addr, &name, started, run_for).await,
                ("grpc", Mode::Stream, Some(c)) => grpc_streamer(c, &name, started, run_for).await,
                ("grpc", Mode::Read, Some(c)) => grpc_reader(c, t, started, run_for).await,
                ("http", Mode::Read, _) => http_reader(addr, t, started, run_for).await,
                _ => bail!("W7-client: {api} {} is not a run", mode.name()),
            }
        }));
    }
    let (mut latencies, mut events) = (Vec::new(), 0u64);
    for h in handles {
        let (l, n) = h.await??;
        latencies.extend(l);
        events += n;
    }
    let secs = started.elapsed().as_secs_f64();
    latencies.sort();
    let p = |q| crate::measure::percentile(&latencies, q);
    Ok(format!(
        "events={events} requests={} secs={secs:.1} events_per_s={:.0} p50_us={} p99_us={} p999_us={}",
        latencies.len(),
        events as f64 / secs,
        p(0.50),
        p(0.99),
        p(0.999)
    ))
}

/// Latencies of each request, and the events they carried.
type Measured = Result<(Vec<Duration>, u64)>;

fn grpc_event() -> proto::NewEvent {
    cairn_grpc::convert::new_event_to(&crate::measure::deposit(100, Uuid::now_v7()))
}

type GrpcClient = proto::event_store_client::EventStoreClient<tonic::transport::Channel>;

async fn grpc_client(addr: SocketAddr) -> Result<GrpcClient> {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?
        .tcp_nodelay(true)
        .connect()
        .await?;
    Ok(proto::event_store_client::EventStoreClient::new(channel))
}

fn exact(v: u64) -> Option<proto::ExpectedVersion> {
    Some(cairn_grpc::convert::expected_to(cairn_core::ExpectedVersion::Exact(v)))
}

async fn grpc_writer(
    mut client: GrpcClient,
    stream: &str,
    started: Instant,
    run_for: Duration,
) -> Measured {
    let (mut latencies, mut version) = (Vec::new(), 0);
    while started.elapsed() < run_for {
        let event = proto::NewEvent { id: Uuid::now_v7().to_string(), ..grpc_event() };
        let message = proto::AppendRequest {
            stream: stream.to_string(),
            expected: exact(version),
            events: vec![event],
            condition_json: String::new(),
        };
        let t0 = Instant::now();
        version = client.append(message).await?.into_inner().next_version;
        latencies.push(t0.elapsed());
    }
    let n = latencies.len() as u64;
    Ok((latencies, n))
}

/// Appends a streaming producer keeps in flight (sent, not yet answered).
const WINDOW: usize = 4_096;

/// One producer on one connection with up to `WINDOW` appends in flight,
/// each of one event to one of 100 streams; latency is from send to answer.
async fn grpc_streamer(
    mut client: GrpcClient,
    stream: &str,
    started: Instant,
    run_for: Duration,
) -> Measured {
    let (tx, rx) = tokio::sync::mpsc::channel::<proto::AppendRequest>(WINDOW);
    let window = std::sync::Arc::new(tokio::sync::Semaphore::new(WINDOW));
    let sent =
        std::sync::Arc::new(std::sync::Mutex::new(std::collections::VecDeque::<Instant>::new()));
    let outgoing =
        futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|m| (m, rx)) });
    let producer = {
        let (window, sent, stream) = (window.clone(), sent.clone(), stream.to_string());
        tokio::spawn(async move {
            // The payload is encoded once, as a load generator sends one
            // body: this measures the store, not the producer's JSON. Each
            // event still has an id of its own, so the store checks it.
            let template = grpc_event();
            let mut i = 0u64;
            while !i.is_multiple_of(256) || started.elapsed() < run_for {
                window.acquire().await.expect("never closed").forget();
                let event = proto::NewEvent { id: Uuid::now_v7().to_string(), ..template.clone() };
                let message = proto::AppendRequest {
                    stream: format!("{stream}-{}", i % 100),
                    expected: None,
                    events: vec![event],
                    condition_json: String::new(),
                };
                sent.lock().unwrap().push_back(Instant::now());
                if tx.send(message).await.is_err() {
                    break;
                }
                i += 1;
            }
        })
    };
    let mut replies = client.append_stream(outgoing).await?.into_inner();
    let mut latencies = Vec::new();
    while let Some(reply) = replies.message().await? {
        if let Some(proto::append_stream_reply::Outcome::ErrorJson(e)) = reply.outcome {
            bail!("a streamed append failed: {e}");
        }
        let at = sent.lock().unwrap().pop_front().expect("an answer for each append sent");
        latencies.push(at.elapsed());
        window.add_permits(1);
    }
    producer.await?;
    let n = latencies.len() as u64;
    Ok((latencies, n))
}

async fn grpc_reader(
    mut client: GrpcClient,
    task: usize,
    started: Instant,
    run_for: Duration,
) -> Measured {
    let (mut latencies, mut events, mut i) = (Vec::new(), 0, task as u64);
    while started.elapsed() < run_for {
        let message = proto::ReadStreamRequest {
            stream: format!("w7-read-{}", i % READ_STREAMS),
            from_version: 0,
            direction: 0,
            limit: Some(100),
        };
        let t0 = Instant::now();
        let got = client.read_stream(message).await?.into_inner().events.len() as u64;
        latencies.push(t0.elapsed());
        if got != READ_STREAM_LEN {
            bail!("a read of w7-read-{} got {got} events, not {READ_STREAM_LEN}", i % READ_STREAMS);
        }
        events += got;
        i += 7;
    }
    Ok((latencies, events))
}

/// A bare HTTP/1.1 client on one keep-alive connection.
struct RawHttp {
    sender: hyper::client::conn::http1::SendRequest<http_body_util::Full<bytes::Bytes>>,
    host: String,
}

impl RawHttp {
    async fn connect(addr: SocketAddr) -> Result<RawHttp> {
        let tcp = tokio::net::TcpStream::connect(addr).await?;
        tcp.set_nodelay(true)?;
        let (sender, connection) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp)).await?;
        tokio::spawn(connection);
        Ok(RawHttp { sender, host: addr.to_string() })
    }

    async fn call(
        &mut self,
        method: hyper::Method,
        path: &str,
        body: bytes::Bytes,
    ) -> Result<bytes::Bytes> {
        use http_body_util::BodyExt;
        let request = hyper::Request::builder()
            .method(method)
            .uri(path)
            .header(hyper::header::HOST, &self.host)
            .header(hyper::header::CONTENT_TYPE, "application/json")
            .body(http_body_util::Full::new(body))?;
        let response = self.sender.send_request(request).await?;
        let status = response.status();
        let body = response.into_body().collect().await?.to_bytes();
        if !status.is_success() {
            bail!("the server answered {status}: {}", String::from_utf8_lossy(&body));
        }
        Ok(body)
    }
}

async fn http_writer(
    addr: SocketAddr,
    stream: &str,
    started: Instant,
    run_for: Duration,
) -> Measured {
    let mut http = RawHttp::connect(addr).await?;
    let path = format!("/streams/{stream}");
    let (mut latencies, mut version) = (Vec::new(), 0u64);
    while started.elapsed() < run_for {
        let event =
            cairn_client::wire::EventIn::from_new(&crate::measure::deposit(100, Uuid::now_v7()))?;
        let body = serde_json::to_vec(&cairn_client::wire::AppendRequest {
            expected_version: Some(version.into()),
            events: vec![event],
            condition: None,
        })?;
        let t0 = Instant::now();
        let answer = http.call(hyper::Method::POST, &path, body.into()).await?;
        latencies.push(t0.elapsed());
        version = serde_json::from_slice::<cairn_core::AppendResult>(&answer)?.next_version;
    }
    let n = latencies.len() as u64;
    Ok((latencies, n))
}

async fn http_reader(
    addr: SocketAddr,
    task: usize,
    started: Instant,
    run_for: Duration,
) -> Measured {
    #[derive(serde::Deserialize)]
    struct Page {
        events: Vec<serde::de::IgnoredAny>,
    }
    let mut http = RawHttp::connect(addr).await?;
    let (mut latencies, mut events, mut i) = (Vec::new(), 0, task as u64);
    while started.elapsed() < run_for {
        let path = format!("/streams/w7-read-{}", i % READ_STREAMS);
        let t0 = Instant::now();
        let body = http.call(hyper::Method::GET, &path, bytes::Bytes::new()).await?;
        latencies.push(t0.elapsed());
        let got = serde_json::from_slice::<Page>(&body)?.events.len() as u64;
        if got != READ_STREAM_LEN {
            bail!("a read of {path} got {got} events, not {READ_STREAM_LEN}");
        }
        events += got;
        i += 7;
    }
    Ok((latencies, events))
}
