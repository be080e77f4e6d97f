//! The Cairn event store over gRPC (`crates/grpc/proto/cairn/v1/store.proto`): the
//! generated types, conversions to and from the core's, errors as statuses
//! that carry the HTTP API's error body, and [`GrpcStore`], a client that is
//! an [`EventStore`] so the conformance suite runs through it.

pub mod convert;

pub mod proto {
    tonic::include_proto!("cairn.v1");
}

use async_trait::async_trait;
use cairn_core::{
    AppendCondition, AppendResult, EventStore, ExpectedVersion, NewEvent, Position, Query,
    ReadAllOptions, ReadStreamOptions, RecordedEvent, Result, StartFrom, StoreError, StreamInfo,
    StreamMetadata, Subscription, SubscriptionTarget,
};
use futures_util::StreamExt;
use tonic::metadata::MetadataValue;
use tonic::transport::{Channel, Endpoint};

use cairn_wire::{EVENTS_PAGE_MAX, Next};

use crate::convert::{
    NEXT_KEY, all_request, event_from, expected_to, new_event_to, status_to_error,
};

/// The read of a page of `n` events of `$all` (or a query), from `options` or the cursor `next`.
fn page_of(options: &ReadAllOptions, n: usize, next: Option<Next>) -> proto::ReadAllRequest {
    let mut message = all_request(options);
    if let Some(Next::After(p)) = next {
        (message.from, message.exclusive) = (p, true);
    }
    message.limit = Some(n as u64);
    message
}
use crate::proto::event_store_client::EventStoreClient;

/// Largest message either way. The server's own limit is its body limit
/// (88 MiB by default), which it answers with a status past that.
pub const MESSAGE_BYTES_MAX: usize = 128 * 1024 * 1024;

/// Attempts of an append whose answer was busy, closed or outcome unknown,
/// backing off from 100 ms to 2 s.
const APPEND_ATTEMPTS: u32 = 5;
/// Waits between resends of an append (jittered: clients cut off by one
/// server restart do not all come back at once).
const APPEND_RETRY: cairn_core::Backoff = cairn_core::Backoff::new(
    std::time::Duration::from_millis(100),
    std::time::Duration::from_secs(2),
)
.with_jitter(0.3);

/// An event store reached over gRPC (`http://127.0.0.1:8720`: the HTTP port serves both).
#[derive(Clone)]
pub struct GrpcStore {
    client: EventStoreClient<Channel>,
    api_key: Option<MetadataValue<tonic::metadata::Ascii>>,
}

impl GrpcStore {
    /// A client for the server at `url`; it connects on first use.
    pub fn new(url: &str) -> Result<GrpcStore> {
        Self::with_tls_root(url, None)
    }

    /// A client that also trusts the CA certificate (PEM) `root`, for an
    /// `https://` server whose certificate a private CA signed. TLS needs
    /// this crate's `tls` feature.
    pub fn with_tls_root(url: &str, root: Option<&[u8]>) -> Result<GrpcStore> {
        let endpoint = Endpoint::from_shared(url.to_string())
            .map_err(|e| StoreError::InvalidArgument(format!("server URL {url:?}: {e}")))?;
        let https = endpoint.uri().scheme_str() == Some("https");
        if root.is_some() && !https {
            return Err(StoreError::InvalidArgument(format!(
                "a CA certificate was given for {url:?}, which is not https://; use the https:// URL or leave the CA out"
            )));
        }
        let endpoint = if https { tls(endpoint, url, root)? } else { endpoint };
        let client = EventStoreClient::new(endpoint.connect_lazy())
            .max_decoding_message_size(MESSAGE_BYTES_MAX)
            .max_encoding_message_size(MESSAGE_BYTES_MAX);
        Ok(GrpcStore { client, api_key: None })
    }

    /// Sends this API key with every call.
    pub fn with_api_key(mut self, key: &str) -> Result<Self> {
        let value = format!("Bearer {key}").parse().map_err(|_| {
            StoreError::InvalidArgument("the API key has characters a header cannot carry".into())
        })?;
        self.api_key = Some(value);
        Ok(self)
    }

    fn request<T>(&self, message: T) -> tonic::Request<T> {
        let mut request = tonic::Request::new(message);
        if let Some(key) = &self.api_key {
            request.metadata_mut().insert("authorization", key.clone());
        }
        request
    }

    async fn append_request(
        &self,
        stream: &str,
        expected: ExpectedVersion,
        events: Vec<NewEvent>,
        condition: Option<AppendCondition>,
    ) -> Result<AppendResult> {
        let condition_json = match condition {
            Some(c) => {
                serde_json::to_string(&c).map_err(|e| StoreError::InvalidArgument(e.to_string()))?
            }
            None => String::new(),
        };
        let message = proto::AppendRequest {
            stream: stream.to_string(),
            expected: Some(expected_to(expected)),
            events: events.iter().map(new_event_to).collect(),
            condition_json,
        };
        // The batch carries its ids, so resending it is safe: the server
        // writes it once and answers a retry with the first result.
        for attempt in 1.. {
            let error = match self.client.clone().append(self.request(message.clone())).await {
                Ok(reply) => {
                    let reply = reply.into_inner();
                    return Ok(AppendResult {
                        next_version: reply.next_version,
                        position: Position(reply.position),
                    });
                }
                Err(status) => convert::append_status_to_error(&status),
            };
            if !error.is_retryable() || attempt >= APPEND_ATTEMPTS {
                return Err(error);
            }
            tokio::time::sleep(APPEND_RETRY.delay(attempt - 1)).await;
        }
        unreachable!("the loop returns")
    }

    fn events(reply: proto::Events) -> Result<Vec<RecordedEvent>> {
        reply.events.into_iter().map(event_from).collect()
    }

    /// Up to `limit` events, page after page: the server answers at most
    /// [`EVENTS_PAGE_MAX`] a call and says in [`NEXT_KEY`] where the next
    /// page starts. `call` makes the call for a page of `n` from a cursor.
    async fn paged<F, Fut>(&self, limit: usize, mut call: F) -> Result<Vec<RecordedEvent>>
    where
        F: FnMut(usize, Option<Next>) -> Fut,
        Fut: std::future::Future<
                Output = std::result::Result<tonic::Response<proto::Events>, tonic::Status>,
            >,
    {
        let mut out = Vec::new();
        let mut next = None;
        loop {
            let response = call((limit - out.len()).min(EVENTS_PAGE_MAX), next)
                .await
                .map_err(|s| status_to_error(&s))?;
            next = response
                .metadata()
                .get(NEXT_KEY)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| serde_json::from_str::<Next>(v).ok());
            let page = Self::events(response.into_inner())?;
            let empty = page.is_empty();
            out.extend(page);
            if next.is_none() || empty || out.len() >= limit {
                return Ok(out);
            }
        }
    }
}

/// TLS with the public roots (webpki) and `root`, if given.
#[cfg(feature = "tls")]
fn tls(endpoint: Endpoint, url: &str, root: Option<&[u8]>) -> Result<Endpoint> {
    let mut config = tonic::transport::ClientTlsConfig::new().with_webpki_roots();
    if let Some(pem) = root {
        config = config.ca_certificate(tonic::transport::Certificate::from_pem(pem));
    }
    endpoint.tls_config(config).map_err(|e| {
        StoreError::InvalidArgument(format!("TLS for {url:?}: {e}; is the CA certificate PEM?"))
    })
}

#[cfg(not(feature = "tls"))]
fn tls(_: Endpoint, url: &str, _: Option<&[u8]>) -> Result<Endpoint> {
    Err(StoreError::InvalidArgument(format!(
        "{url:?} needs TLS, which this build of cairn-grpc leaves out: enable its `tls` feature"
    )))
}

/// `n` errors like `e` (a store error is not `Clone`: its wire form is copied).
fn copies(e: &StoreError, n: usize) -> Vec<StoreError> {
    let (status, body) = cairn_wire::error_body(e);
    (0..n).map(|_| cairn_wire::error_from(status, &body, "gRPC")).collect()
}

fn stream_info(json: &str) -> Result<StreamInfo> {
    serde_json::from_str(json)
        .map_err(|e| StoreError::Io { path: "gRPC".into(), source: std::io::Error::other(e) })
}

#[async_trait]
impl EventStore for GrpcStore {
    async fn append(
        &self,
        stream: &str,
        expected: ExpectedVersion,
        events: Vec<NewEvent>,
    ) -> Result<AppendResult> {
        self.append_request(stream, expected, events, None).await
    }

    async fn append_if(
        &self,
        stream: &str,
        expected: ExpectedVersion,
        events: Vec<NewEvent>,
        condition: AppendCondition,
    ) -> Result<AppendResult> {
        self.append_request(stream, expected, events, Some(condition)).await
    }

    /// All on one `AppendStream` call: the server takes what has arrived as
    /// one batch, so they share fsyncs. If the call breaks, the appends not
    /// answered yet are `OutcomeUnknown` (their ids make a retry safe).
    async fn append_each(&self, appends: Vec<cairn_core::Append>) -> Vec<Result<AppendResult>> {
        let n = appends.len();
        if n == 0 {
            return Vec::new();
        }
        let mut messages = Vec::with_capacity(n);
        let mut out: Vec<Result<AppendResult>> = Vec::with_capacity(n);
        for a in appends {
            let condition_json = match &a.condition {
                Some(c) => match serde_json::to_string(c) {
                    Ok(json) => json,
                    Err(e) => {
                        return (0..n)
                            .map(|_| {
                                Err(StoreError::InvalidArgument(format!(
                                    "a condition could not be encoded: {e}"
                                )))
                            })
                            .collect();
                    }
                },
                None => String::new(),
            };
            messages.push(proto::AppendRequest {
                stream: a.stream,
                expected: Some(expected_to(a.expected)),
                events: a.events.iter().map(new_event_to).collect(),
                condition_json,
            });
        }
        let broke = |why: String| StoreError::OutcomeUnknown {
            reason: format!("the append stream broke before the server answered ({why})"),
        };
        let call = self
            .client
            .clone()
            .append_stream(self.request(futures_util::stream::iter(messages)))
            .await;
        let mut replies = match call {
            Ok(r) => r.into_inner(),
            Err(status) => {
                let e = convert::append_status_to_error(&status);
                return copies(&e, n).into_iter().map(Err).collect();
            }
        };
        while out.len() < n {
            match replies.message().await {
                Ok(Some(reply)) => out.push(match reply.outcome {
                    Some(proto::append_stream_reply::Outcome::Done(d)) => Ok(AppendResult {
                        next_version: d.next_version,
                        position: Position(d.position),
                    }),
                    Some(proto::append_stream_reply::Outcome::ErrorJson(json)) => {
                        Err(serde_json::from_str(&json)
                            .map(|body| cairn_wire::error_from(500, &body, "gRPC"))
                            .unwrap_or_else(|_| {
                                broke(format!("an answer the client cannot read: {json}"))
                            }))
                    }
                    None => Err(broke("an empty answer".into())),
                }),
                Ok(None) => break,
                Err(status) => {
                    // The status applies to every append not answered yet.
                    let left = n - out.len();
                    out.extend(
                        copies(&convert::append_status_to_error(&status), left)
                            .into_iter()
                            .map(Err),
                    );
                }
            }
        }
        while out.len() < n {
            out.push(Err(broke("the server ended the call early".into())));
        }
        out
    }

    async fn read_query(
        &self,
        query: &Query,
        options: ReadAllOptions,
    ) -> Result<Vec<RecordedEvent>> {
        let query_json =
            serde_json::to_string(query).map_err(|e| StoreError::InvalidArgument(e.to_string()))?;
        self.paged(options.limit, |n, next| {
            let message = proto::ReadQueryRequest {
                query_json: query_json.clone(),
                options: Some(page_of(&options, n, next)),
            };
            let mut client = self.client.clone();
            let request = self.request(message);
            async move { client.read_query(request).await }
        })
        .await
    }

    async fn read_stream(
        &self,
        stream: &str,
        options: ReadStreamOptions,
    ) -> Result<Vec<RecordedEvent>> {
        self.paged(options.limit, |n, next| {
            let from_version = match next {
                Some(Next::From(v)) => v,
                _ => options.from_version,
            };
            let direction = convert::direction_to(options.direction) as i32;
            let message = proto::ReadStreamRequest {
                stream: stream.to_string(),
                from_version,
                direction,
                limit: Some(n as u64),
            };
            let mut client = self.client.clone();
            let request = self.request(message);
            async move { client.read_stream(request).await }
        })
        .await
    }

    async fn read_all(&self, options: ReadAllOptions) -> Result<Vec<RecordedEvent>> {
        self.paged(options.limit, |n, next| {
            let mut client = self.client.clone();
            let request = self.request(page_of(&options, n, next));
            async move { client.read_all(request).await }
        })
        .await
    }

    async fn stream_info(&self, stream: &str) -> Result<StreamInfo> {
        let message = proto::StreamRequest { stream: stream.to_string() };
        let reply = self
            .client
            .clone()
            .stream_info(self.request(message))
            .await
            .map_err(|s| status_to_error(&s))?
            .into_inner();
        stream_info(&reply.json)
    }

    async fn list_streams(&self, prefix: &str, limit: usize) -> Result<Vec<StreamInfo>> {
        let message = proto::ListStreamsRequest {
            prefix: prefix.to_string(),
            limit: (limit != usize::MAX).then_some(limit as u64),
        };
        let reply = self
            .client
            .clone()
            .list_streams(self.request(message))
            .await
            .map_err(|s| status_to_error(&s))?
            .into_inner();
        reply.streams.iter().map(|s| stream_info(&s.json)).collect()
    }

    async fn set_stream_metadata(
        &self,
        stream: &str,
        metadata: StreamMetadata,
    ) -> Result<AppendResult> {
        let metadata_json = serde_json::to_string(&metadata)
            .map_err(|e| StoreError::InvalidArgument(e.to_string()))?;
        let message = proto::SetMetadataRequest { stream: stream.to_string(), metadata_json };
        let reply = self
            .client
            .clone()
            .set_stream_metadata(self.request(message))
            .await
            .map_err(|s| status_to_error(&s))?
            .into_inner();
        Ok(AppendResult { next_version: reply.next_version, position: Position(reply.position) })
    }

    async fn delete_stream(
        &self,
        stream: &str,
        expected: ExpectedVersion,
        hard: bool,
    ) -> Result<AppendResult> {
        let message = proto::DeleteRequest {
            stream: stream.to_string(),
            expected: Some(expected_to(expected)),
            hard,
        };
        let reply = self
            .client
            .clone()
            .delete_stream(self.request(message))
            .await
            .map_err(|s| status_to_error(&s))?
            .into_inner();
        Ok(AppendResult { next_version: reply.next_version, position: Position(reply.position) })
    }

    async fn subscribe(&self, target: SubscriptionTarget, from: StartFrom) -> Result<Subscription> {
        use proto::subscribe_request::{Start, Target};
        let target = match target {
            SubscriptionTarget::Stream(s) => Target::Stream(s),
            SubscriptionTarget::All => Target::All(proto::Empty {}),
            SubscriptionTarget::Query(q) => Target::QueryJson(
                serde_json::to_string(&q)
                    .map_err(|e| StoreError::InvalidArgument(e.to_string()))?,
            ),
            other => {
                return Err(StoreError::InvalidArgument(format!(
                    "this client cannot subscribe to {other:?}"
                )));
            }
        };
        let start = match from {
            StartFrom::Start => Start::FromStart(proto::Empty {}),
            StartFrom::After(n) => Start::After(n),
            StartFrom::End => Start::FromEnd(proto::Empty {}),
        };
        let message = proto::SubscribeRequest { target: Some(target), start: Some(start) };
        let stream = self
            .client
            .clone()
            .subscribe(self.request(message))
            .await
            .map_err(|s| status_to_error(&s))?
            .into_inner();
        Ok(Subscription::new(
            stream.map(|item| item.map_err(|s| status_to_error(&s)).and_then(event_from)),
        ))
    }

    async fn head_position(&self) -> Result<Position> {
        let reply = self
            .client
            .clone()
            .head(self.request(proto::HeadRequest {}))
            .await
            .map_err(|s| status_to_error(&s))?
            .into_inner();
        Ok(Position(reply.head))
    }

    async fn last_position(&self) -> Result<Option<Position>> {
        let reply = self
            .client
            .clone()
            .head(self.request(proto::HeadRequest {}))
            .await
            .map_err(|s| status_to_error(&s))?
            .into_inner();
        Ok(reply.has_last.then_some(Position(reply.last)))
    }
}
