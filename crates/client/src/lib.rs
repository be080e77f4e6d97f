//! A Cairn server as an [`EventStore`]: the same trait as the embedded engine,
//! over the server's HTTP API, so code (and the conformance suite) runs
//! unchanged against either. Subscriptions arrive as Server-Sent Events.

/// The API's JSON shapes (the `cairn-wire` crate).
pub use cairn_wire as wire;

use async_trait::async_trait;
use bytes::BytesMut;
use cairn_core::{
    AppendCondition, AppendResult, Direction, EventStore, ExpectedVersion, NewEvent, Position,
    Query, ReadAllOptions, ReadStreamOptions, RecordedEvent, Result, StartFrom, StoreError,
    StreamInfo, StreamMetadata, Subscription, SubscriptionTarget,
};
use futures_util::StreamExt;
use reqwest::{Method, RequestBuilder, Response, Url};
use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::wire::{
    AppendRequest, EVENTS_PAGE_MAX, EventIn, EventOut, Events, Head, Next, QueryRequest,
    error_from, expected_to_wire,
};

/// An event store reached over HTTP (`http://127.0.0.1:8720` by default).
#[derive(Clone)]
pub struct HttpStore {
    base: Url,
    http: reqwest::Client,
    api_key: Option<String>,
    append_attempts: u32,
}

/// Attempts of an append whose answer was busy, closed or outcome unknown.
const APPEND_ATTEMPTS_DEFAULT: u32 = 5;
/// Waits between resends of an append (jittered: clients cut off by one
/// server restart do not all come back at once).
const APPEND_RETRY: cairn_core::Backoff = cairn_core::Backoff::new(
    std::time::Duration::from_millis(100),
    std::time::Duration::from_secs(2),
)
.with_jitter(0.3);

impl HttpStore {
    /// A client for the server at `url`; nothing is sent until the first call.
    pub fn new(url: &str) -> Result<HttpStore> {
        Self::with_tls_root(url, None)
    }

    /// A client that also trusts the CA certificate (PEM) `root`, for a
    /// server whose certificate a private CA signed.
    pub fn with_tls_root(url: &str, root: Option<&[u8]>) -> Result<HttpStore> {
        let mut base = Url::parse(url)
            .map_err(|e| StoreError::InvalidArgument(format!("server URL {url:?}: {e}")))?;
        if base.cannot_be_a_base() || !matches!(base.scheme(), "http" | "https") {
            return Err(StoreError::InvalidArgument(format!(
                "server URL {url:?}: use http://host:port or https://host:port"
            )));
        }
        base.set_path("/");
        let mut builder = reqwest::Client::builder().pool_max_idle_per_host(64);
        if let Some(pem) = root {
            let cert = reqwest::Certificate::from_pem(pem)
                .map_err(|e| StoreError::InvalidArgument(format!("CA certificate: {e}")))?;
            builder = builder.add_root_certificate(cert);
        }
        let http = builder
            .build()
            .map_err(|e| StoreError::InvalidArgument(format!("HTTP client: {e}")))?;
        Ok(HttpStore { base, http, api_key: None, append_attempts: APPEND_ATTEMPTS_DEFAULT })
    }

    /// How many times an append is sent before its error is returned, when
    /// the server was busy or closed or the outcome was unknown (default 5,
    /// backing off from 100 ms to 2 s). 1 turns retries off.
    pub fn with_append_attempts(mut self, attempts: u32) -> Self {
        self.append_attempts = attempts.max(1);
        self
    }

    /// Sends this API key (`Authorization: Bearer …`) with every request.
    pub fn with_api_key(mut self, key: impl Into<String>) -> Self {
        self.api_key = Some(key.into());
        self
    }

    pub fn url(&self) -> &Url {
        &self.base
    }

    /// The URL of a path. Segments are percent-encoded here, every byte but
    /// unreserved ones: `Url`'s own segment encoding drops tabs and newlines,
    /// and a stream name must reach the server as it is (to be judged there).
    fn url_for(&self, segments: &[&str]) -> Url {
        const SEGMENT: &percent_encoding::AsciiSet =
            &percent_encoding::NON_ALPHANUMERIC.remove(b'-').remove(b'_').remove(b'.').remove(b'~');
        let mut path = String::new();
        for segment in segments {
            path.push('/');
            path.extend(percent_encoding::utf8_percent_encode(segment, SEGMENT));
        }
        // Only the path changes: no parse of scheme and host per request.
        let mut url = self.base.clone();
        url.set_path(&path);
        url
    }

    fn request(&self, method: Method, segments: &[&str]) -> RequestBuilder {
        let builder = self.http.request(method, self.url_for(segments));
        match &self.api_key {
            Some(key) => builder.bearer_auth(key),
            None => builder,
        }
    }

    fn io(&self, e: impl std::fmt::Display) -> StoreError {
        StoreError::Io { path: self.base.to_string(), source: std::io::Error::other(e.to_string()) }
    }

    /// What a failed send means. An append sent on a connection that broke
    /// before the answer came may have been written: its outcome is unknown.
    fn send_error(&self, e: reqwest::Error, append: bool) -> StoreError {
        // The innermost cause says what happened (connection refused, …).
        let mut cause: &dyn std::error::Error = &e;
        while let Some(next) = cause.source() {
            cause = next;
        }
        let cause = cause.to_string();
        if append && !e.is_connect() && !e.is_builder() {
            return StoreError::OutcomeUnknown {
                reason: format!(
                    "the connection to {} broke before it answered ({cause})",
                    self.base
                ),
            };
        }
        let hint = cairn_wire::connect_hint(&cause);
        self.io(format!("cannot reach the server ({cause}); {hint}"))
    }

    async fn send(&self, builder: RequestBuilder) -> Result<Response> {
        self.send_as(builder, false).await
    }

    async fn send_as(&self, builder: RequestBuilder, append: bool) -> Result<Response> {
        let response = builder.send().await.map_err(|e| self.send_error(e, append))?;
        if response.status().is_success() {
            return Ok(response);
        }
        let status = response.status().as_u16();
        let body: Value = response.json().await.unwrap_or(Value::Null);
        Err(error_from(status, &body, self.base.as_str()))
    }

    async fn call<T: DeserializeOwned>(&self, builder: RequestBuilder) -> Result<T> {
        let response = self.send(builder).await?;
        let bytes =
            response.bytes().await.map_err(|e| self.io(format!("reading the response: {e}")))?;
        serde_json::from_slice(&bytes).map_err(|e| {
            self.io(format!("the server's answer is not what this client expects: {e}"))
        })
    }

    /// Up to `limit` events, page after page: the server answers at most
    /// [`EVENTS_PAGE_MAX`] a request and says where the next page starts.
    /// `request` builds the request for a page of `n` from a cursor, which is
    /// a version for a stream, else a position.
    async fn events(
        &self,
        limit: usize,
        stream: bool,
        request: impl Fn(usize, Option<Next>) -> RequestBuilder,
    ) -> Result<Vec<RecordedEvent>> {
        let mut out = Vec::new();
        let mut next = None;
        loop {
            let page: Events =
                self.call(request((limit - out.len()).min(EVENTS_PAGE_MAX), next)).await?;
            let empty = page.events.is_empty();
            for e in page.events {
                out.push(e.into_recorded().map_err(|e| self.io(e))?);
            }
            next = page.next;
            if matches!((next, stream), (Some(Next::After(_)), true) | (Some(Next::From(_)), false))
            {
                return Err(self.io(format!(
                    "the server's answer has a cursor of the wrong kind for this read: {next:?}"
                )));
            }
            if next.is_none() || empty || out.len() >= limit {
                return Ok(out);
            }
        }
    }

    async fn append_body(
        &self,
        stream: &str,
        expected: ExpectedVersion,
        events: Vec<NewEvent>,
        condition: Option<AppendCondition>,
    ) -> Result<AppendResult> {
        let events = events_in(&events)?;
        let body =
            AppendRequest { expected_version: Some(expected_to_wire(expected)), events, condition };
        let json = bytes::Bytes::from(
            serde_json::to_vec(&body).map_err(|e| StoreError::InvalidEvent(e.to_string()))?,
        );
        // The batch carries its ids, so resending it is safe: the server
        // writes it once and answers a retry with the first result.
        let answer = self.post_append(&["streams", stream], "application/json", json).await?;
        serde_json::from_slice(&answer).map_err(|e| {
            self.io(format!("the server's answer is not what this client expects: {e}"))
        })
    }

    /// POSTs an append body to `segments`, resending it while the answer
    /// is retryable (busy, closed, outcome unknown) up to `append_attempts`
    /// with backoff; the answer's bytes. The events carry their ids, so a
    /// resent body written once is not written again.
    async fn post_append(
        &self,
        segments: &[&str],
        content_type: &str,
        body: bytes::Bytes,
    ) -> Result<bytes::Bytes> {
        let mut attempt = 1;
        loop {
            let request = self
                .request(Method::POST, segments)
                .header("content-type", content_type)
                .body(body.clone());
            let result = async {
                let response = self.send_as(request, true).await?;
                response.bytes().await.map_err(|e| StoreError::OutcomeUnknown {
                    reason: format!("reading the answer: {e}"),
                })
            }
            .await;
            match result {
                Err(e) if e.is_retryable() && attempt < self.append_attempts => {
                    tokio::time::sleep(APPEND_RETRY.delay(attempt - 1)).await;
                    attempt += 1;
                }
                other => return other,
            }
        }
    }

    /// One `POST /appends`: the answers, or what refused the whole body.
    async fn append_lines(
        &self,
        appends: Vec<cairn_core::Append>,
    ) -> Result<Vec<Result<AppendResult>>> {
        let n = appends.len();
        let mut body = Vec::new();
        for a in appends {
            let events = events_in(&a.events)?;
            let line = wire::AppendLine {
                stream: a.stream,
                expected_version: Some(expected_to_wire(a.expected)),
                events,
                condition: a.condition,
            };
            serde_json::to_writer(&mut body, &line)
                .map_err(|e| StoreError::InvalidEvent(e.to_string()))?;
            body.push(b'\n');
        }
        let answer = self.post_append(&["appends"], wire::NDJSON, body.into()).await?;
        let mut results = Vec::with_capacity(n);
        for line in answer.split(|b| *b == b'\n').filter(|l| !l.trim_ascii().is_empty()) {
            let line: wire::AppendLineResult = serde_json::from_slice(line).map_err(|e| {
                self.io(format!("the server's answer is not what this client expects: {e}"))
            })?;
            results.push(match line {
                wire::AppendLineResult::Done(done) => Ok(done),
                wire::AppendLineResult::Failed(body) => {
                    Err(error_from(500, &body, self.base.as_str()))
                }
            });
        }
        if results.len() != n {
            return Err(self.io(format!("the server answered {} of {n} appends", results.len())));
        }
        Ok(results)
    }
}

/// Events as the API takes them.
fn events_in(events: &[NewEvent]) -> Result<Vec<EventIn>> {
    events
        .iter()
        .enumerate()
        .map(|(i, e)| {
            EventIn::from_new(e)
                .map_err(|err| StoreError::InvalidEvent(format!("event {i}: {err}")))
        })
        .collect()
}

/// The query string of a page of `n` events of `$all`, from `options` or the cursor `next`.
fn all_params(
    options: &ReadAllOptions,
    n: usize,
    next: Option<Next>,
) -> Vec<(&'static str, String)> {
    let mut params = match next {
        Some(Next::After(p)) => vec![("after", p.to_string())],
        _ => vec![(if options.exclusive { "after" } else { "from" }, options.from.0.to_string())],
    };
    params.push(("limit", n.to_string()));
    if options.direction == Direction::Backward {
        params.push(("direction", "backward".into()));
    }
    params
}

#[async_trait]
impl EventStore for HttpStore {
    async fn append(
        &self,
        stream: &str,
        expected: ExpectedVersion,
        events: Vec<NewEvent>,
    ) -> Result<AppendResult> {
        self.append_body(stream, expected, events, None).await
    }

    async fn append_if(
        &self,
        stream: &str,
        expected: ExpectedVersion,
        events: Vec<NewEvent>,
        condition: AppendCondition,
    ) -> Result<AppendResult> {
        self.append_body(stream, expected, events, Some(condition)).await
    }

    /// `POST /appends`, up to [`wire::APPENDS_MAX`] a body, retried like an
    /// append (the events carry their ids, so a body written once is not
    /// written again).
    async fn append_each(&self, appends: Vec<cairn_core::Append>) -> Vec<Result<AppendResult>> {
        let mut out = Vec::with_capacity(appends.len());
        let mut appends = appends.into_iter().peekable();
        while appends.peek().is_some() {
            let chunk: Vec<_> = appends.by_ref().take(wire::APPENDS_MAX).collect();
            let n = chunk.len();
            match self.append_lines(chunk).await {
                Ok(results) => out.extend(results),
                Err(e) => {
                    let (status, body) = wire::error_body(&e);
                    out.extend((0..n).map(|_| Err(error_from(status, &body, self.base.as_str()))));
                }
            }
        }
        out
    }

    async fn read_query(
        &self,
        query: &Query,
        options: ReadAllOptions,
    ) -> Result<Vec<RecordedEvent>> {
        self.events(options.limit, false, |n, next| {
            let (from, after) = match next {
                Some(Next::After(p)) => (None, Some(p)),
                _ => (
                    (!options.exclusive).then_some(options.from.0),
                    options.exclusive.then_some(options.from.0),
                ),
            };
            let body = QueryRequest {
                query: query.clone(),
                from,
                after,
                limit: Some(n),
                direction: options.direction,
            };
            self.request(Method::POST, &["query"]).json(&body)
        })
        .await
    }

    async fn read_stream(
        &self,
        stream: &str,
        options: ReadStreamOptions,
    ) -> Result<Vec<RecordedEvent>> {
        self.events(options.limit, true, |n, next| {
            let from = match next {
                Some(Next::From(v)) => v,
                _ => options.from_version,
            };
            let mut params = vec![("from", from.to_string()), ("limit", n.to_string())];
            if options.direction == Direction::Backward {
                params.push(("direction", "backward".into()));
            }
            self.request(Method::GET, &["streams", stream]).query(&params)
        })
        .await
    }

    async fn read_all(&self, options: ReadAllOptions) -> Result<Vec<RecordedEvent>> {
        self.events(options.limit, false, |n, next| {
            self.request(Method::GET, &["all"]).query(&all_params(&options, n, next))
        })
        .await
    }

    async fn stream_info(&self, stream: &str) -> Result<StreamInfo> {
        self.call(self.request(Method::GET, &["streams", stream, "info"])).await
    }

    async fn list_streams(&self, prefix: &str, limit: usize) -> Result<Vec<StreamInfo>> {
        #[derive(serde::Deserialize)]
        struct Streams {
            streams: Vec<StreamInfo>,
        }
        let mut params = vec![("prefix", prefix.to_string())];
        if limit != usize::MAX {
            params.push(("limit", limit.to_string()));
        }
        let page: Streams =
            self.call(self.request(Method::GET, &["streams"]).query(&params)).await?;
        Ok(page.streams)
    }

    async fn set_stream_metadata(
        &self,
        stream: &str,
        metadata: StreamMetadata,
    ) -> Result<AppendResult> {
        self.call(self.request(Method::PUT, &["streams", stream, "metadata"]).json(&metadata)).await
    }

    async fn delete_stream(
        &self,
        stream: &str,
        expected: ExpectedVersion,
        hard: bool,
    ) -> Result<AppendResult> {
        let expected = match expected_to_wire(expected) {
            Value::String(s) => s,
            other => other.to_string(),
        };
        let params = [("expected_version", expected), ("hard", hard.to_string())];
        self.call(self.request(Method::DELETE, &["streams", stream]).query(&params)).await
    }

    async fn subscribe(&self, target: SubscriptionTarget, from: StartFrom) -> Result<Subscription> {
        let mut builder = match &target {
            SubscriptionTarget::Stream(stream) => {
                self.request(Method::GET, &["streams", stream, "subscribe"])
            }
            SubscriptionTarget::All => self.request(Method::GET, &["all", "subscribe"]),
            SubscriptionTarget::Query(q) => {
                let q = serde_json::to_string(q)
                    .map_err(|e| StoreError::InvalidArgument(e.to_string()))?;
                self.request(Method::GET, &["all", "subscribe"]).query(&[("query", q)])
            }
            other => {
                return Err(StoreError::InvalidArgument(format!(
                    "this client cannot subscribe to {other:?}"
                )));
            }
        };
        builder = match from {
            StartFrom::Start => builder,
            StartFrom::After(n) => builder.query(&[("after", n.to_string())]),
            StartFrom::End => builder.query(&[("from", "end")]),
        };
        let response = self.send(builder.header("accept", "text/event-stream")).await?;
        let where_ = self.base.to_string();
        let state = (response.bytes_stream(), BytesMut::new(), false, where_);
        let events = futures_util::stream::unfold(
            state,
            |(mut body, mut buffer, ended, where_)| async move {
                if ended {
                    return None;
                }
                loop {
                    if let Some(frame) = sse::take_frame(&mut buffer) {
                        match sse::parse(&frame) {
                            sse::Frame::Event(data) => {
                                let item = serde_json::from_str::<EventOut>(&data)
                                    .map_err(|e| e.to_string())
                                    .and_then(EventOut::into_recorded)
                                    .map_err(|e| StoreError::Io {
                                        path: where_.clone(),
                                        source: std::io::Error::other(e),
                                    });
                                return Some((item, (body, buffer, false, where_)));
                            }
                            sse::Frame::Error(data) => {
                                let value: Value =
                                    serde_json::from_str(&data).unwrap_or(Value::Null);
                                return Some((
                                    Err(error_from(500, &value, &where_)),
                                    (body, buffer, true, where_),
                                ));
                            }
                            sse::Frame::Other => continue,
                        }
                    }
                    match body.next().await {
                        Some(Ok(chunk)) => buffer.extend_from_slice(&chunk),
                        Some(Err(e)) => {
                            let e = StoreError::Io {
                                path: where_.clone(),
                                source: std::io::Error::other(format!("subscription: {e}")),
                            };
                            return Some((Err(e), (body, buffer, true, where_)));
                        }
                        None => return None,
                    }
                }
            },
        );
        Ok(Subscription::new(events))
    }

    async fn head_position(&self) -> Result<Position> {
        let head: Head = self.call(self.request(Method::GET, &["head"])).await?;
        Ok(Position(head.head))
    }

    async fn last_position(&self) -> Result<Option<Position>> {
        let head: Head = self.call(self.request(Method::GET, &["head"])).await?;
        Ok(head.last.map(Position))
    }
}

/// The little of Server-Sent Events the API uses: `event:` and `data:` lines,
/// frames ended by a blank line.
mod sse {
    use bytes::BytesMut;

    pub(crate) enum Frame {
        Event(String),
        Error(String),
        Other,
    }

    /// Cuts the first complete frame off `buffer`.
    pub(crate) fn take_frame(buffer: &mut BytesMut) -> Option<String> {
        let end = buffer.windows(2).position(|w| w == b"\n\n")?;
        let frame = buffer.split_to(end + 2);
        Some(String::from_utf8_lossy(&frame[..end]).into_owned())
    }

    pub(crate) fn parse(frame: &str) -> Frame {
        let (mut kind, mut data) = ("message", String::new());
        for line in frame.lines() {
            if let Some(v) = line.strip_prefix("event:") {
                kind = v.trim_start();
            } else if let Some(v) = line.strip_prefix("data:") {
                if !data.is_empty() {
                    data.push('\n');
                }
                data.push_str(v.strip_prefix(' ').unwrap_or(v));
            }
        }
        match kind {
            "event" | "message" if !data.is_empty() => Frame::Event(data),
            "error" => Frame::Error(data),
            _ => Frame::Other,
        }
    }
}
