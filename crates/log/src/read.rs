//! Reads, subscriptions and the `EventStore` implementation. Reads never take
//! the writer's path: they look up positions in the index and decode records
//! straight from the segment maps, below the durable head.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use async_trait::async_trait;
use cairn_core::{
    AppendCondition, AppendResult, Direction, EventStore, ExpectedVersion, NewEvent, Position,
    Query, ReadAllOptions, ReadStreamOptions, RecordedEvent, STREAM_NAME_BYTES_MAX, StartFrom,
    StoreError, StreamInfo, StreamMetadata, StreamState, Subscription, SubscriptionTarget,
    Timestamp,
};

use crate::record::{self, RECORD_OVERHEAD_BYTES};
use crate::segment::SEGMENT_HEADER_BYTES;
use crate::shared::Shared;
use crate::store::EmbeddedStore;

/// Events a subscription reads from the log at a time.
const SUBSCRIPTION_PAGE_EVENTS: usize = 512;
/// How far ahead (bytes) a long forward read of `$all` asks for pages, and
/// from what limit (events) on: reads of a page or two never pay for it.
const READ_AHEAD: u64 = 32 << 20;
const READ_AHEAD_FROM_EVENTS: usize = 4096;

fn check_read_name(stream: &str) -> Result<(), StoreError> {
    if stream.is_empty() || stream.len() > STREAM_NAME_BYTES_MAX + 2 {
        return Err(StoreError::InvalidStreamName {
            name: stream.to_string(),
            reason: "empty or too long".into(),
        });
    }
    Ok(())
}

fn corrupt_at(shared: &Shared, position: u64, reason: &str) -> StoreError {
    let seg = shared.segment_for(position);
    let file = seg.as_ref().map(|s| s.path.display().to_string()).unwrap_or_default();
    let offset = seg.as_ref().map_or(position, |s| position - s.base);
    StoreError::Corrupt { file, offset, reason: reason.to_string() }
}

impl Shared {
    fn event_at(&self, position: u64) -> Result<RecordedEvent, StoreError> {
        let seg = self.segment_for(position);
        self.events_at(&[position], seg.as_ref()).map(|mut v| v.remove(0))
    }

    /// Decodes the events at `positions`; `seg` is a guess at their segment,
    /// reused while it holds (stream reads mostly stay in one segment).
    fn events_at(
        &self,
        positions: &[u64],
        seg: Option<&Arc<crate::segment::Segment>>,
    ) -> Result<Vec<RecordedEvent>, StoreError> {
        let head = self.head.load(Ordering::Acquire);
        let mut out = Vec::with_capacity(positions.len());
        let mut seg = seg.cloned();
        for &position in positions {
            let fits = |s: &Arc<crate::segment::Segment>| {
                s.base <= position && position < s.base + s.capacity()
            };
            if !seg.as_ref().is_some_and(fits) {
                seg = self.segment_for(position);
            }
            let missing = || {
                corrupt_at(
                    self,
                    position,
                    "the index points at a position that holds no valid record",
                )
            };
            let s = seg.as_ref().ok_or_else(missing)?;
            let end = s.capacity().min(head.saturating_sub(s.base));
            let offset = position - s.base;
            if offset < SEGMENT_HEADER_BYTES || offset >= end {
                return Err(missing());
            }
            let view = record::decode(s.bytes(offset, end))
                .map_err(|e| corrupt_at(self, position, &format!("{e:?}")))?;
            out.push(view.to_event_sharing(Position(position), s.share(view.data)));
        }
        Ok(out)
    }

    /// Positions of the visible events of `stream` selected by `options`.
    fn stream_positions(
        &self,
        stream: &str,
        options: &ReadStreamOptions,
    ) -> Result<Vec<u64>, StoreError> {
        self.indexed(|index| Self::stream_positions_in(index, stream, options))
    }

    fn stream_positions_in(
        index: &crate::index::Index,
        stream: &str,
        options: &ReadStreamOptions,
    ) -> Result<Vec<u64>, StoreError> {
        let not_found = || StoreError::StreamNotFound { stream: stream.to_string() };
        let entry = index.streams.get(stream)?.ok_or_else(not_found)?;
        match entry.state {
            StreamState::Tombstoned => {
                return Err(StoreError::StreamDeleted { stream: stream.to_string() });
            }
            StreamState::Deleted => return Err(not_found()),
            StreamState::Live if entry.version() == 0 => return Err(not_found()),
            StreamState::Live => {}
        }
        let view = index.stream_view(stream, &entry)?;
        let first = entry.first_visible_version(Timestamp::now().0, |t| view.older_than(t));
        let last = entry.version();
        let limit = options.limit.min(usize::MAX as u64 as usize) as u64;
        Ok(match options.direction {
            Direction::Forward => {
                let from = options.from_version.max(first);
                if from > last || limit == 0 {
                    Vec::new()
                } else {
                    view.positions(from, last.min(from.saturating_add(limit - 1)))
                }
            }
            Direction::Backward => {
                let from = options.from_version.min(last);
                if from < first || limit == 0 {
                    Vec::new()
                } else {
                    let mut out = view.positions(from.saturating_sub(limit - 1).max(first), from);
                    out.reverse();
                    out
                }
            }
        })
    }

    fn first_record_position(&self) -> u64 {
        self.segments.read().unwrap()[0].base + SEGMENT_HEADER_BYTES
    }

    /// Whether `position` is the base of a segment: a record boundary that
    /// holds no event (the durable head sits there right after a roll).
    fn is_segment_base(&self, position: u64) -> bool {
        self.segment_for(position).is_some_and(|s| s.base == position)
    }

    /// Length of the event at `position`, checking that an event really starts
    /// there (its id must map back to this position in the index).
    fn event_len(&self, position: u64) -> Result<u64, StoreError> {
        let found = self.with_record(position, |v| (v.id.as_u128(), v.len as u64));
        match found {
            Some((id, len)) if self.indexed(|index| index.id(id))? == Some(position) => Ok(len),
            _ => Err(StoreError::InvalidPosition(Position(position))),
        }
    }

    /// Reads forward from the record boundary `from`; returns the events and the
    /// boundary after the last one.
    fn read_forward(
        &self,
        mut from: u64,
        limit: usize,
    ) -> Result<(Vec<RecordedEvent>, u64), StoreError> {
        let head = self.head.load(Ordering::Acquire);
        let mut out = Vec::with_capacity(limit.min(16_384));
        let mut seg = match self.segment_for(from) {
            Some(s) => s,
            None => return Ok((out, from)),
        };
        // A segment's base is a boundary too (the head sits there right after a roll).
        from = from.max(seg.base + SEGMENT_HEADER_BYTES);
        // A long read asks for the pages ahead of it while it decodes these
        // (cold history otherwise waits for the disk at each fault).
        let mut advised = from;
        while from < head && out.len() < limit {
            let seg_end = (seg.base + seg.capacity()).min(head);
            if from >= seg_end {
                // Next segment: it starts where this one ends.
                seg = match self.segment_for(seg.base + seg.capacity()) {
                    Some(s) if s.base > seg.base => s,
                    _ => break,
                };
                from = seg.base + SEGMENT_HEADER_BYTES;
                advised = from;
                continue;
            }
            if limit >= READ_AHEAD_FROM_EVENTS
                && from + READ_AHEAD / 2 >= advised
                && advised < seg_end
            {
                let start = advised.max(from);
                let end = (start + READ_AHEAD).min(seg_end);
                seg.will_need(start - seg.base, end - start);
                advised = end;
            }
            let bytes = seg.bytes(from - seg.base, seg_end - seg.base);
            let view =
                record::decode(bytes).map_err(|e| corrupt_at(self, from, &format!("{e:?}")))?;
            out.push(view.to_event_sharing(Position(from), seg.share(view.data)));
            from += view.len as u64;
        }
        Ok((out, from))
    }

    /// The position of the record that ends at the record boundary `end`
    /// (found by its trailing length), or `None` if no record precedes it.
    fn record_before(&self, mut end: u64) -> Result<Option<u64>, StoreError> {
        let first = self.first_record_position();
        while end > first {
            let Some(seg) = self.segment_for(end - 1) else { break };
            if end - seg.base <= SEGMENT_HEADER_BYTES {
                end = seg.base; // continue at the end of the previous segment
                continue;
            }
            let trailer = seg.bytes(end - seg.base - 4, end - seg.base);
            let body_len = u32::from_le_bytes(trailer.try_into().unwrap()) as u64;
            let start = end
                .checked_sub(body_len + RECORD_OVERHEAD_BYTES as u64)
                .filter(|s| *s >= seg.base + SEGMENT_HEADER_BYTES)
                .ok_or_else(|| {
                    corrupt_at(self, end - 4, "record trailer points before the segment start")
                })?;
            return Ok(Some(start));
        }
        Ok(None)
    }

    /// Reads backward from the record boundary `end` (exclusive).
    fn read_backward(&self, mut end: u64, limit: usize) -> Result<Vec<RecordedEvent>, StoreError> {
        let mut out = Vec::new();
        while out.len() < limit {
            let Some(start) = self.record_before(end)? else { break };
            out.push(self.event_at(start)?);
            end = start;
        }
        Ok(out)
    }

    /// The position of the newest durable event, checked to be a record
    /// (its structure, not its checksum: no payload is read).
    fn last_position(&self) -> Result<Option<Position>, StoreError> {
        let head = self.head.load(Ordering::Acquire);
        let Some(start) = self.record_before(head)? else { return Ok(None) };
        let seg = self
            .segment_for(start)
            .ok_or_else(|| corrupt_at(self, start, "no segment holds the newest record"))?;
        // The record may end its segment while the head is in the next one.
        let end = seg.capacity().min(head - seg.base);
        record::decode_trusted(seg.bytes(start - seg.base, end))
            .map_err(|e| corrupt_at(self, start, &format!("{e:?}")))?;
        Ok(Some(Position(start)))
    }

    /// Positions of the events matching `query` with `lo <= position <= hi`.
    fn query_positions(
        &self,
        query: &Query,
        lo: u64,
        hi: u64,
        direction: Direction,
        limit: usize,
    ) -> Result<Vec<u64>, StoreError> {
        self.indexed(|index| crate::query::positions(index, query, lo, hi, direction, limit))
    }

    fn read_query(
        &self,
        query: &Query,
        options: &ReadAllOptions,
    ) -> Result<Vec<RecordedEvent>, StoreError> {
        self.options.limits.check_query(query)?;
        let from = options.from.0;
        // `from` is only a bound here: events need not start at it.
        let bounds = match (options.direction, options.exclusive) {
            (Direction::Forward, false) => Some((from, u64::MAX)),
            (Direction::Forward, true) => from.checked_add(1).map(|lo| (lo, u64::MAX)),
            (Direction::Backward, false) => Some((0, from)),
            (Direction::Backward, true) => from.checked_sub(1).map(|hi| (0, hi)),
        };
        let Some((lo, hi)) = bounds else { return Ok(Vec::new()) };
        let positions = self.query_positions(query, lo, hi, options.direction, options.limit)?;
        self.events_at(&positions, None)
    }

    fn read_all(&self, options: &ReadAllOptions) -> Result<Vec<RecordedEvent>, StoreError> {
        let head = self.head.load(Ordering::Acquire);
        let from = options.from.0;
        match options.direction {
            Direction::Forward => {
                let start = if from == 0 {
                    self.first_record_position()
                } else if from >= head {
                    return if from == head || options.from == Position::END {
                        Ok(Vec::new())
                    } else {
                        Err(StoreError::InvalidPosition(options.from))
                    };
                } else if self.is_segment_base(from) {
                    from
                } else {
                    let len = self.event_len(from)?;
                    if options.exclusive { from + len } else { from }
                };
                Ok(self.read_forward(start, options.limit)?.0)
            }
            Direction::Backward => {
                let end = if from >= head {
                    head
                } else if from == 0 {
                    return Ok(Vec::new());
                } else if self.is_segment_base(from) {
                    from
                } else {
                    let len = self.event_len(from)?;
                    if options.exclusive { from } else { from + len }
                };
                self.read_backward(end, options.limit)
            }
        }
    }
}

#[async_trait]
impl EventStore for EmbeddedStore {
    async fn append(
        &self,
        stream: &str,
        expected: ExpectedVersion,
        events: Vec<NewEvent>,
    ) -> Result<AppendResult, StoreError> {
        self.append_user(stream, expected, events, None).await
    }

    async fn append_if(
        &self,
        stream: &str,
        expected: ExpectedVersion,
        events: Vec<NewEvent>,
        condition: AppendCondition,
    ) -> Result<AppendResult, StoreError> {
        self.append_user(stream, expected, events, Some(condition)).await
    }

    async fn append_each(
        &self,
        appends: Vec<cairn_core::Append>,
    ) -> Vec<Result<AppendResult, StoreError>> {
        self.append_each_user(appends).await
    }

    fn append_each_pipelines(&self) -> bool {
        true
    }

    async fn read_query(
        &self,
        query: &Query,
        options: ReadAllOptions,
    ) -> Result<Vec<RecordedEvent>, StoreError> {
        self.shared.read_query(query, &options)
    }

    async fn read_stream(
        &self,
        stream: &str,
        options: ReadStreamOptions,
    ) -> Result<Vec<RecordedEvent>, StoreError> {
        check_read_name(stream)?;
        let positions = self.shared.stream_positions(stream, &options)?;
        self.shared.events_at(&positions, None)
    }

    async fn read_all(&self, options: ReadAllOptions) -> Result<Vec<RecordedEvent>, StoreError> {
        self.shared.read_all(&options)
    }

    async fn stream_info(&self, stream: &str) -> Result<StreamInfo, StoreError> {
        check_read_name(stream)?;
        self.shared.indexed(|index| {
            let entry = index
                .streams
                .get(stream)?
                .ok_or_else(|| StoreError::StreamNotFound { stream: stream.to_string() })?;
            Ok(info(stream, &entry))
        })
    }

    async fn list_streams(
        &self,
        prefix: &str,
        limit: usize,
    ) -> Result<Vec<StreamInfo>, StoreError> {
        let system = prefix.starts_with('$');
        self.shared.indexed(|index| {
            let mut out = Vec::new();
            if limit > 0 {
                index.streams.walk(prefix, |name, entry| {
                    if system || !name.starts_with('$') {
                        out.push(info(name, &entry));
                    }
                    Ok(out.len() < limit)
                })?;
            }
            Ok(out)
        })
    }

    async fn set_stream_metadata(
        &self,
        stream: &str,
        metadata: StreamMetadata,
    ) -> Result<AppendResult, StoreError> {
        self.set_metadata(stream, metadata).await
    }

    async fn delete_stream(
        &self,
        stream: &str,
        expected: ExpectedVersion,
        hard: bool,
    ) -> Result<AppendResult, StoreError> {
        self.delete(stream, expected, hard).await
    }

    async fn subscribe(
        &self,
        target: SubscriptionTarget,
        from: StartFrom,
    ) -> Result<Subscription, StoreError> {
        let shared = self.shared.clone();
        match target {
            SubscriptionTarget::All => {
                let head = shared.head.load(Ordering::Acquire);
                let next = match from {
                    StartFrom::Start | StartFrom::After(0) => shared.first_record_position(),
                    StartFrom::End => head,
                    StartFrom::After(p) if p == head => head,
                    StartFrom::After(p) if p > head => {
                        return Err(StoreError::InvalidPosition(Position(p)));
                    }
                    StartFrom::After(p) if shared.is_segment_base(p) => p,
                    StartFrom::After(p) => p + shared.event_len(p)?,
                };
                Ok(subscription(shared, Cursor::All(next)))
            }
            SubscriptionTarget::Stream(stream) => {
                check_read_name(&stream)?;
                let next = match from {
                    StartFrom::Start => 1,
                    // After the largest version: nothing ever follows (no wrap to 1).
                    StartFrom::After(v) => v.saturating_add(1),
                    StartFrom::End => shared.indexed(|index| index.current(&stream))?.0 + 1,
                };
                Ok(subscription(shared, Cursor::Stream(stream, next)))
            }
            SubscriptionTarget::Query(query) => {
                shared.options.limits.check_query(&query)?;
                let head = shared.head.load(Ordering::Acquire);
                let next = match from {
                    StartFrom::Start => 0,
                    StartFrom::End => head,
                    StartFrom::After(p) if p > head => {
                        return Err(StoreError::InvalidPosition(Position(p)));
                    }
                    StartFrom::After(p) => p + 1,
                };
                Ok(subscription(shared, Cursor::Query(query, next)))
            }
            other => Err(StoreError::InvalidArgument(format!(
                "subscription target {other:?} is not supported by the embedded engine yet"
            ))),
        }
    }

    async fn health(&self) -> Result<(), StoreError> {
        match self.shared.poisoned() {
            Some(reason) => Err(StoreError::Closed { reason: Some(reason) }),
            None => Ok(()),
        }
    }

    async fn head_position(&self) -> Result<Position, StoreError> {
        Ok(Position(self.shared.head.load(Ordering::Acquire)))
    }

    async fn last_position(&self) -> Result<Option<Position>, StoreError> {
        self.shared.last_position()
    }
}

fn info(stream: &str, entry: &crate::index::StreamEntry) -> StreamInfo {
    StreamInfo {
        stream: stream.to_string(),
        version: entry.version(),
        state: entry.state,
        metadata: entry.metadata.clone(),
        last_position: entry.last_position.map(Position),
    }
}

enum Cursor {
    /// Next record boundary to read in `$all`.
    All(u64),
    /// Stream name and next version to deliver.
    Stream(String, u64),
    /// A query and the lowest position still to deliver.
    Query(Query, u64),
}

struct SubState {
    shared: Arc<Shared>,
    cursor: Cursor,
    head_rx: tokio::sync::watch::Receiver<u64>,
    buffer: VecDeque<RecordedEvent>,
    done: bool,
}

/// Catch-up and live are one loop: read the log from the cursor; when nothing
/// is left, wait for the durable head to move, then read again. Because every
/// event comes from the log by position, there is no gap and no duplicate at
/// the switch from history to live.
fn subscription(shared: Arc<Shared>, cursor: Cursor) -> Subscription {
    let head_rx = shared.watch_head();
    let done = head_rx.is_none();
    let head_rx = head_rx.unwrap_or_else(|| tokio::sync::watch::channel(0).1);
    let state = SubState { shared, cursor, head_rx, buffer: VecDeque::new(), done };
    Subscription::new(futures_util::stream::unfold(state, |mut s| async move {
        loop {
            if s.done {
                return None;
            }
            if let Some(e) = s.buffer.pop_front() {
                return Some((Ok(e), s));
            }
            s.head_rx.borrow_and_update();
            match s.fill() {
                Ok(true) => continue,
                Ok(false) => {}
                Err(e) => {
                    s.done = true;
                    return Some((Err(e), s));
                }
            }
            if s.head_rx.changed().await.is_err() {
                // The writer is gone: the store was closed.
                s.done = true;
                let reason = s.shared.poisoned();
                return reason.map(|r| (Err(StoreError::Closed { reason: Some(r) }), s));
            }
        }
    }))
}

impl SubState {
    /// Reads the next page into the buffer; false if there was nothing new.
    fn fill(&mut self) -> Result<bool, StoreError> {
        match &mut self.cursor {
            Cursor::All(next) => {
                let (events, after) = self.shared.read_forward(*next, SUBSCRIPTION_PAGE_EVENTS)?;
                *next = after;
                self.buffer.extend(events);
            }
            Cursor::Stream(stream, next) => {
                let options = ReadStreamOptions::forward()
                    .from_version(*next)
                    .limit(SUBSCRIPTION_PAGE_EVENTS);
                match self.shared.stream_positions(stream, &options) {
                    Ok(positions) => {
                        let events = self.shared.events_at(&positions, None)?;
                        if let Some(last) = events.last() {
                            *next = last.version + 1;
                        }
                        self.buffer.extend(events);
                    }
                    Err(StoreError::StreamNotFound { .. }) => {}
                    Err(e) => return Err(e),
                }
            }
            Cursor::Query(query, next) => {
                let positions = self.shared.query_positions(
                    query,
                    *next,
                    u64::MAX,
                    Direction::Forward,
                    SUBSCRIPTION_PAGE_EVENTS,
                )?;
                if let Some(last) = positions.last() {
                    *next = last + 1;
                }
                self.buffer.extend(self.shared.events_at(&positions, None)?);
            }
        }
        Ok(!self.buffer.is_empty())
    }
}
