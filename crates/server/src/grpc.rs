//! The gRPC service (`crates/grpc/proto/cairn/v1/store.proto`) on the same port as the
//! HTTP API, with the same keys, checks and metrics.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Instant;

use axum::extract::ConnectInfo;
use cairn_core::{
    AppendCondition, Direction, Query, ReadStreamOptions, RecordedEvent, StartFrom, StoreError,
    StreamMetadata, SubscriptionTarget,
};
use cairn_grpc::convert::{
    all_options, error_to_status, event_to, expected_from, new_event_from, status_with_body,
};
use cairn_grpc::proto;
use cairn_wire::{EVENTS_PAGE_MAX, Next, STREAMS_PAGE_MAX, parse_query};
use futures_util::{Stream, StreamExt};
use serde_json::json;
use tonic::{Request, Response, Status};

use crate::App;
use crate::auth::{Principal, Refusal};

pub(crate) struct GrpcService {
    pub app: Arc<App>,
}

fn invalid(message: String) -> Status {
    status_with_body(400, &json!({"error": "invalid_request", "message": message}))
}

fn denied(code: &str, reason: String) -> Status {
    error_to_status(&StoreError::AccessDenied { code: code.into(), reason })
}

fn check(reason: Option<String>) -> Result<(), Status> {
    reason.map_or(Ok(()), |r| Err(denied("forbidden", r)))
}

impl GrpcService {
    async fn who<T>(&self, request: &Request<T>) -> Result<Principal, Status> {
        let Some(auth) = &self.app.auth else { return Ok(Principal::anonymous_admin()) };
        let header =
            request.metadata().get("authorization").and_then(|v| v.to_str().ok()).map(String::from);
        let peer = request
            .extensions()
            .get::<ConnectInfo<std::net::SocketAddr>>()
            .map(|c| c.0.ip())
            .or(request.remote_addr().map(|a| a.ip()))
            .unwrap_or(std::net::IpAddr::from([0, 0, 0, 0]));
        auth.check(header.as_deref(), peer).await.map_err(|refusal| match refusal {
            Refusal::Unauthorized(reason) => denied("unauthorized", reason),
            Refusal::TooManyFailures => denied(
                "too_many_failed_logins",
                "too many failed logins from this address; wait a minute".into(),
            ),
            Refusal::Busy => error_to_status(&StoreError::Busy(
                "too many API keys are being checked at once; retry in a second".into(),
            )),
        })
    }
}

/// What an append's answer says over gRPC.
fn answer(done: &cairn_core::AppendResult) -> proto::AppendResponse {
    proto::AppendResponse { next_version: done.next_version, position: done.position.0 }
}

type EventStream = Pin<Box<dyn Stream<Item = Result<proto::Event, Status>> + Send>>;

type AppendEach = Pin<
    Box<
        futures_util::future::MaybeDone<
            Pin<
                Box<
                    dyn std::future::Future<
                            Output = Vec<Result<cairn_core::AppendResult, StoreError>>,
                        > + Send,
                >,
            >,
        >,
    >,
>;

/// A batch of an `AppendStream` handed to the store, its answers awaited.
struct Started {
    checked: crate::appends::Checked,
    at: Instant,
    done: AppendEach,
}

/// A read's limit: at most `max` (also when absent), a larger one lowered.
fn page_limit(limit: Option<u64>, max: usize) -> usize {
    limit.map_or(max, |l| usize::try_from(l).unwrap_or(usize::MAX).min(max))
}

/// Events, with the cursor of the next page in `x-cairn-next` (the HTTP
/// API's `next`, as JSON) when the page is full.
fn events_page(
    events: Vec<RecordedEvent>,
    limit: usize,
    next: impl Fn(&RecordedEvent) -> Option<Next>,
) -> Response<proto::Events> {
    let next = events.last().filter(|_| events.len() >= limit).and_then(next);
    let mut response =
        Response::new(proto::Events { events: events.into_iter().map(event_to).collect() });
    if let Some(value) =
        next.and_then(|n| serde_json::to_string(&n).ok()).and_then(|v| v.parse().ok())
    {
        response.metadata_mut().insert(NEXT_KEY, value);
    }
    response
}

use cairn_grpc::convert::NEXT_KEY;

/// The append a message asks for; the message names what is wrong with it.
fn append_from(r: proto::AppendRequest) -> Result<cairn_core::Append, String> {
    let expected = expected_from(r.expected);
    let events = r
        .events
        .into_iter()
        .enumerate()
        .map(|(i, e)| new_event_from(e, i))
        .collect::<Result<Vec<_>, _>>()?;
    let mut append = cairn_core::Append::new(r.stream, expected, events);
    if !r.condition_json.is_empty() {
        let condition: AppendCondition = cairn_wire::parse_condition(&r.condition_json)
            .map_err(|e| format!("condition_json: {e}"))?;
        append = append.with_condition(condition);
    }
    Ok(append)
}

#[tonic::async_trait]
impl proto::event_store_server::EventStore for GrpcService {
    async fn append(
        &self,
        request: Request<proto::AppendRequest>,
    ) -> Result<Response<proto::AppendResponse>, Status> {
        let who = self.who(&request).await?;
        let r = request.into_inner();
        check(who.denies_stream(&r.stream, true))?;
        let append = append_from(r).map_err(invalid)?;
        if let Some(c) = &append.condition {
            check(who.denies_condition(c))?;
        }
        let (count, bytes) =
            (append.events.len(), append.events.iter().map(|e| e.data.len()).sum::<usize>());
        let started = Instant::now();
        let store = &self.app.store;
        let result = match append.condition {
            Some(c) => store.append_if(&append.stream, append.expected, append.events, c).await,
            None => store.append(&append.stream, append.expected, append.events).await,
        };
        match result {
            Ok(done) => {
                self.app.metrics.append_ok(count, bytes, started.elapsed());
                Ok(Response::new(answer(&done)))
            }
            Err(e) => {
                self.app.metrics.append_failed();
                Err(error_to_status(&e))
            }
        }
    }

    type AppendStreamStream =
        Pin<Box<dyn Stream<Item = Result<proto::AppendStreamReply, Status>> + Send>>;

    async fn append_stream(
        &self,
        request: Request<tonic::Streaming<proto::AppendRequest>>,
    ) -> Result<Response<Self::AppendStreamStream>, Status> {
        let who = self.who(&request).await?;
        let mut incoming = request.into_inner();
        let app = self.app.clone();
        // Answers wait here for the client to read them; a full channel
        // stops the reading of more appends, so a slow reader is not buffered for.
        let (tx, rx) = tokio::sync::mpsc::channel(crate::appends::BATCH_MAX);
        // One batch decodes while the one before it is written: the reading
        // and the writing run on two tasks, in order, one batch apart.
        let (batches, mut decoded) = tokio::sync::mpsc::channel::<(
            Vec<Result<cairn_core::Append, StoreError>>,
            Option<Status>,
        )>(1);
        tokio::spawn(async move {
            let mut ended = false;
            while !ended {
                let first = match incoming.message().await {
                    Ok(Some(m)) => m,
                    Ok(None) => break,
                    Err(status) => {
                        let _ = batches.send((Vec::new(), Some(status))).await;
                        break;
                    }
                };
                // Whatever else has arrived joins the batch, without waiting.
                let mut bytes = prost::Message::encoded_len(&first);
                let mut batch = vec![first];
                let mut broken = None;
                while batch.len() < crate::appends::BATCH_MAX
                    && bytes < crate::appends::BATCH_BYTES_MAX
                {
                    match futures_util::FutureExt::now_or_never(incoming.message()) {
                        Some(Ok(Some(m))) => {
                            bytes += prost::Message::encoded_len(&m);
                            batch.push(m);
                        }
                        Some(Ok(None)) => {
                            ended = true;
                            break;
                        }
                        Some(Err(status)) => {
                            broken = Some(status);
                            break;
                        }
                        None => break,
                    }
                }
                let appends = batch
                    .into_iter()
                    .map(|r| append_from(r).map_err(StoreError::InvalidArgument))
                    .collect();
                let stop = broken.is_some();
                if batches.send((appends, broken)).await.is_err() || stop {
                    break;
                }
            }
        });
        // A store that queues a batch when first asked (the embedded engine)
        // takes the next batch while this one's answers are awaited.
        let (started, mut answering) = tokio::sync::mpsc::channel::<(Started, Option<Status>)>(1);
        tokio::spawn(async move {
            while let Some((appends, broken)) = decoded.recv().await {
                let (checked, taken) = crate::appends::Checked::new(&who, appends);
                let at = Instant::now();
                let store = app.store.clone();
                let each: Pin<Box<dyn std::future::Future<Output = _> + Send>> =
                    Box::pin(async move { store.append_each(taken).await });
                let mut done = Box::pin(futures_util::future::maybe_done(each));
                if app.store.append_each_pipelines() {
                    // Polled once here: that queues the batch.
                    std::future::poll_fn(|cx| {
                        let _ = std::future::Future::poll(done.as_mut(), cx);
                        std::task::Poll::Ready(())
                    })
                    .await;
                } else {
                    done.as_mut().await;
                }
                if started.send((Started { checked, at, done }, broken)).await.is_err() {
                    return;
                }
            }
        });
        let app = self.app.clone();
        tokio::spawn(async move {
            let mut index = 0u64;
            while let Some((Started { checked, at, mut done }, broken)) = answering.recv().await {
                done.as_mut().await;
                let results = done.as_mut().take_output().expect("awaited");
                for result in checked.finish(&app, results, at.elapsed()) {
                    let outcome = match result {
                        Ok(done) => proto::append_stream_reply::Outcome::Done(answer(&done)),
                        Err(e) => proto::append_stream_reply::Outcome::ErrorJson(
                            cairn_wire::error_body(&e).1.to_string(),
                        ),
                    };
                    if tx
                        .send(Ok(proto::AppendStreamReply { index, outcome: Some(outcome) }))
                        .await
                        .is_err()
                    {
                        return;
                    }
                    index += 1;
                }
                if let Some(status) = broken {
                    let _ = tx.send(Err(status)).await;
                    return;
                }
            }
        });
        let replies = futures_util::stream::unfold(rx, |mut rx| async move {
            rx.recv().await.map(|item| (item, rx))
        });
        Ok(Response::new(Box::pin(replies)))
    }

    async fn read_stream(
        &self,
        request: Request<proto::ReadStreamRequest>,
    ) -> Result<Response<proto::Events>, Status> {
        let who = self.who(&request).await?;
        let r = request.into_inner();
        check(who.denies_stream(&r.stream, false))?;
        let direction =
            cairn_grpc::convert::direction_from(r.direction).map_err(|e| error_to_status(&e))?;
        let options = if direction == Direction::Backward {
            ReadStreamOptions::backward()
        } else {
            ReadStreamOptions::forward()
        };
        let limit = page_limit(r.limit, EVENTS_PAGE_MAX);
        let events = self
            .app
            .store
            .read_stream(&r.stream, options.from_version(r.from_version).limit(limit))
            .await
            .map_err(|e| error_to_status(&e))?;
        let next = |e: &RecordedEvent| match direction {
            Direction::Forward => e.version.checked_add(1).map(Next::From),
            Direction::Backward => e.version.checked_sub(1).filter(|&v| v > 0).map(Next::From),
        };
        Ok(events_page(events, limit, next))
    }

    async fn read_all(
        &self,
        request: Request<proto::ReadAllRequest>,
    ) -> Result<Response<proto::Events>, Status> {
        check(self.who(&request).await?.denies_all())?;
        let options = all_options(request.get_ref()).map_err(|e| error_to_status(&e))?;
        let options = options.limit(options.limit.min(EVENTS_PAGE_MAX));
        let events = self.app.store.read_all(options).await.map_err(|e| error_to_status(&e))?;
        Ok(events_page(events, options.limit, |e| Some(Next::After(e.position.0))))
    }

    async fn read_query(
        &self,
        request: Request<proto::ReadQueryRequest>,
    ) -> Result<Response<proto::Events>, Status> {
        check(self.who(&request).await?.denies_all())?;
        let r = request.into_inner();
        let query: Query =
            parse_query(&r.query_json).map_err(|e| invalid(format!("query_json: {e}")))?;
        let options =
            all_options(&r.options.unwrap_or_default()).map_err(|e| error_to_status(&e))?;
        let options = options.limit(options.limit.min(EVENTS_PAGE_MAX));
        let events =
            self.app.store.read_query(&query, options).await.map_err(|e| error_to_status(&e))?;
        Ok(events_page(events, options.limit, |e| Some(Next::After(e.position.0))))
    }

    async fn stream_info(
        &self,
        request: Request<proto::StreamRequest>,
    ) -> Result<Response<proto::StreamInfoReply>, Status> {
        let who = self.who(&request).await?;
        let r = request.into_inner();
        check(who.denies_stream(&r.stream, false))?;
        let info = self.app.store.stream_info(&r.stream).await.map_err(|e| error_to_status(&e))?;
        Ok(Response::new(proto::StreamInfoReply {
            json: serde_json::to_string(&info).unwrap_or_default(),
        }))
    }

    async fn list_streams(
        &self,
        request: Request<proto::ListStreamsRequest>,
    ) -> Result<Response<proto::StreamInfoList>, Status> {
        check(self.who(&request).await?.denies_all())?;
        let r = request.into_inner();
        let limit = page_limit(r.limit, STREAMS_PAGE_MAX);
        let streams =
            self.app.store.list_streams(&r.prefix, limit).await.map_err(|e| error_to_status(&e))?;
        let streams = streams
            .iter()
            .map(|s| proto::StreamInfoReply { json: serde_json::to_string(s).unwrap_or_default() })
            .collect();
        Ok(Response::new(proto::StreamInfoList { streams }))
    }

    async fn set_stream_metadata(
        &self,
        request: Request<proto::SetMetadataRequest>,
    ) -> Result<Response<proto::AppendResponse>, Status> {
        let who = self.who(&request).await?;
        let r = request.into_inner();
        check(who.denies_stream(&r.stream, true))?;
        let metadata: StreamMetadata = cairn_wire::parse_metadata(r.metadata_json.as_bytes())
            .map_err(|e| invalid(format!("metadata_json: {e}")))?;
        let done = self
            .app
            .store
            .set_stream_metadata(&r.stream, metadata)
            .await
            .map_err(|e| error_to_status(&e))?;
        Ok(Response::new(answer(&done)))
    }

    async fn delete_stream(
        &self,
        request: Request<proto::DeleteRequest>,
    ) -> Result<Response<proto::AppendResponse>, Status> {
        let who = self.who(&request).await?;
        let r = request.into_inner();
        check(who.denies_stream(&r.stream, true))?;
        let done = self
            .app
            .store
            .delete_stream(&r.stream, expected_from(r.expected), r.hard)
            .await
            .map_err(|e| error_to_status(&e))?;
        Ok(Response::new(answer(&done)))
    }

    async fn head(
        &self,
        request: Request<proto::HeadRequest>,
    ) -> Result<Response<proto::HeadReply>, Status> {
        check(self.who(&request).await?.denies_all())?;
        let head = self.app.store.head_position().await.map_err(|e| error_to_status(&e))?;
        let last = self.app.store.last_position().await.map_err(|e| error_to_status(&e))?;
        Ok(Response::new(proto::HeadReply {
            head: head.0,
            last: last.map_or(0, |p| p.0),
            has_last: last.is_some(),
        }))
    }

    type SubscribeStream = EventStream;

    async fn subscribe(
        &self,
        request: Request<proto::SubscribeRequest>,
    ) -> Result<Response<EventStream>, Status> {
        use proto::subscribe_request::{Start, Target};
        let who = self.who(&request).await?;
        let r = request.into_inner();
        let target = match r.target {
            Some(Target::Stream(s)) => {
                check(who.denies_stream(&s, false))?;
                SubscriptionTarget::Stream(s)
            }
            Some(Target::All(_)) | None => {
                check(who.denies_all())?;
                SubscriptionTarget::All
            }
            Some(Target::QueryJson(q)) => {
                check(who.denies_all())?;
                SubscriptionTarget::Query(
                    parse_query(&q).map_err(|e| invalid(format!("query_json: {e}")))?,
                )
            }
        };
        let from = match r.start {
            Some(Start::FromStart(_)) | None => StartFrom::Start,
            Some(Start::After(n)) => StartFrom::After(n),
            Some(Start::FromEnd(_)) => StartFrom::End,
        };
        let subscription =
            self.app.store.subscribe(target, from).await.map_err(|e| error_to_status(&e))?;
        let guard = self.app.metrics.subscription();
        let mut shutdown = self.app.shutdown.clone();
        let stopped = async move {
            let _ = shutdown.wait_for(|&stop| stop).await;
        };
        let events = subscription
            .map(move |item| {
                let _keep = &guard;
                item.map(event_to).map_err(|e| error_to_status(&e))
            })
            .take_until(Box::pin(stopped));
        Ok(Response::new(Box::pin(events)))
    }
}

/// The gRPC routes, ready to merge into the HTTP router.
pub(crate) fn routes(app: Arc<App>) -> axum::Router {
    let limit = app.config.body_limit;
    let service = proto::event_store_server::EventStoreServer::new(GrpcService { app })
        .max_decoding_message_size(limit)
        .max_encoding_message_size(limit);
    tonic::service::Routes::new(service).into_axum_router()
}
