//! The on-disk record: `[body_len u32][crc32c u32][body][body_len u32]`, all
//! little-endian. The CRC covers the leading length and the body, so a torn or
//! flipped length is caught too. The trailing copy of the length lets readers
//! walk the log backwards. See docs/design.md for the body layout.

use bytes::Bytes;
use cairn_core::{ContentType, Metadata, NewEvent, Position, RecordedEvent, Timestamp};
use uuid::Uuid;

pub(crate) const RECORD_HEADER_BYTES: usize = 8;
pub(crate) const RECORD_TRAILER_BYTES: usize = 4;
pub(crate) const RECORD_OVERHEAD_BYTES: usize = RECORD_HEADER_BYTES + RECORD_TRAILER_BYTES;
/// Largest body the decoder accepts; anything bigger is treated as damage.
pub(crate) const RECORD_BODY_BYTES_MAX: usize = 1 << 30;

const KIND_EVENT: u8 = 1;
const FLAG_BINARY: u8 = 1;
/// Set on the last record of an append: recovery keeps only whole appends.
pub(crate) const FLAG_BATCH_END: u8 = 2;
const FLAG_CORRELATION: u8 = 4;
const FLAG_CAUSATION: u8 = 8;

/// Size of the encoded body of `event` in `stream`; used to check limits
/// before anything is written.
pub(crate) fn body_size(stream: &str, event: &NewEvent) -> usize {
    let m = &event.metadata;
    1 + 1
        + 8
        + 8
        + 16
        + 4
        + if m.correlation_id.is_some() { 16 } else { 0 }
        + if m.causation_id.is_some() { 16 } else { 0 }
        + 2
        + stream.len()
        + 2
        + event.event_type.len()
        + 2
        + event.tags.iter().map(|t| 2 + t.len()).sum::<usize>()
        + 2
        + m.extra.iter().map(|(k, v)| 2 + k.len() + 4 + v.len()).sum::<usize>()
        + 4
        + event.data.len()
}

/// Appends one encoded record to `buf`. Field lengths must already be checked
/// against the limits (names ≤ u16, payload ≤ u32).
pub(crate) fn encode(
    buf: &mut Vec<u8>,
    stream: &str,
    version: u64,
    timestamp: Timestamp,
    event: &NewEvent,
    batch_end: bool,
) {
    let body_len = body_size(stream, event);
    let start = buf.len();
    buf.reserve(body_len + RECORD_OVERHEAD_BYTES);
    buf.extend_from_slice(&(body_len as u32).to_le_bytes());
    buf.extend_from_slice(&[0; 4]); // crc, filled below
    let m = &event.metadata;
    let mut flags = 0;
    if event.content_type == ContentType::Binary {
        flags |= FLAG_BINARY;
    }
    if batch_end {
        flags |= FLAG_BATCH_END;
    }
    if m.correlation_id.is_some() {
        flags |= FLAG_CORRELATION;
    }
    if m.causation_id.is_some() {
        flags |= FLAG_CAUSATION;
    }
    buf.push(KIND_EVENT);
    buf.push(flags);
    buf.extend_from_slice(&version.to_le_bytes());
    buf.extend_from_slice(&timestamp.0.to_le_bytes());
    buf.extend_from_slice(event.id.as_bytes());
    buf.extend_from_slice(&event.schema_version.to_le_bytes());
    if let Some(id) = m.correlation_id {
        buf.extend_from_slice(id.as_bytes());
    }
    if let Some(id) = m.causation_id {
        buf.extend_from_slice(id.as_bytes());
    }
    put_str16(buf, stream);
    put_str16(buf, &event.event_type);
    buf.extend_from_slice(&(event.tags.len() as u16).to_le_bytes());
    for tag in &event.tags {
        put_str16(buf, tag);
    }
    buf.extend_from_slice(&(m.extra.len() as u16).to_le_bytes());
    for (k, v) in &m.extra {
        put_str16(buf, k);
        buf.extend_from_slice(&(v.len() as u32).to_le_bytes());
        buf.extend_from_slice(v.as_bytes());
    }
    buf.extend_from_slice(&(event.data.len() as u32).to_le_bytes());
    buf.extend_from_slice(&event.data);
    debug_assert_eq!(buf.len() - start - RECORD_HEADER_BYTES, body_len);
    let crc = crc32c::crc32c_append(crc32c::crc32c(&buf[start..start + 4]), &buf[start + 8..]);
    buf[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
    buf.extend_from_slice(&(body_len as u32).to_le_bytes());
}

fn put_str16(buf: &mut Vec<u8>, s: &str) {
    buf.extend_from_slice(&(s.len() as u16).to_le_bytes());
    buf.extend_from_slice(s.as_bytes());
}

/// Why bytes are not a valid record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum DecodeError {
    /// Zero length: unwritten (preallocated) space, the normal end of a segment.
    Empty,
    /// The record runs past the end of the available bytes.
    Truncated,
    /// Length, checksum or fields are wrong.
    Invalid(String),
}

/// A record decoded without copying; borrows from the segment's bytes.
#[derive(Debug, Clone)]
pub(crate) struct RecordView<'a> {
    pub flags: u8,
    pub version: u64,
    pub timestamp: Timestamp,
    pub id: Uuid,
    pub schema_version: u32,
    pub correlation_id: Option<Uuid>,
    pub causation_id: Option<Uuid>,
    pub stream: &'a str,
    pub event_type: &'a str,
    tags: &'a [u8],
    tag_count: u16,
    extra: &'a [u8],
    extra_count: u16,
    pub data: &'a [u8],
    /// Total bytes of the record, header and trailer included.
    pub len: usize,
}

impl<'a> RecordView<'a> {
    pub(crate) fn batch_end(&self) -> bool {
        self.flags & FLAG_BATCH_END != 0
    }

    /// Whether this record holds `event`'s content: type, payload, content
    /// type and tags (what a retry of the same append must resend).
    pub(crate) fn same_content(&self, event: &NewEvent) -> bool {
        let binary = self.flags & FLAG_BINARY != 0;
        self.event_type == event.event_type
            && self.data == &event.data[..]
            && binary == (event.content_type == ContentType::Binary)
            && self.tags().eq(event.tags.iter().map(String::as_str))
    }

    /// The event's tags, without copying.
    pub(crate) fn tags(&self) -> impl Iterator<Item = &'a str> + use<'a> {
        let mut r = Reader { bytes: self.tags };
        (0..self.tag_count).map_while(move |_| r.str16().ok())
    }

    /// The event, with `data` as its payload (a shared handle on `self.data`).
    pub(crate) fn to_event_sharing(&self, position: Position, data: Bytes) -> RecordedEvent {
        let tags = self.tags().map(str::to_string).collect();
        let mut metadata = Metadata {
            correlation_id: self.correlation_id,
            causation_id: self.causation_id,
            ..Default::default()
        };
        let mut r = Reader { bytes: self.extra };
        for _ in 0..self.extra_count {
            let k = r.str16().unwrap_or_default().to_string();
            let v = r.str32().unwrap_or_default().to_string();
            metadata.extra.insert(k, v);
        }
        RecordedEvent {
            id: self.id,
            stream: self.stream.to_string(),
            version: self.version,
            position,
            event_type: self.event_type.to_string(),
            data,
            content_type: if self.flags & FLAG_BINARY != 0 {
                ContentType::Binary
            } else {
                ContentType::Json
            },
            metadata,
            schema_version: self.schema_version,
            tags,
            timestamp: self.timestamp,
        }
    }
}

/// Decodes the record that starts at `bytes[0]`, checking length and CRC.
pub(crate) fn decode(bytes: &[u8]) -> Result<RecordView<'_>, DecodeError> {
    decode_inner(bytes, true)
}

/// Decodes a record this process just encoded (the writer's own buffer).
pub(crate) fn decode_trusted(bytes: &[u8]) -> Result<RecordView<'_>, DecodeError> {
    decode_inner(bytes, false)
}

fn decode_inner(bytes: &[u8], check_crc: bool) -> Result<RecordView<'_>, DecodeError> {
    if bytes.len() < RECORD_HEADER_BYTES {
        return if bytes.iter().all(|b| *b == 0) {
            Err(DecodeError::Empty)
        } else {
            Err(DecodeError::Truncated)
        };
    }
    let body_len = u32::from_le_bytes(bytes[0..4].try_into().unwrap()) as usize;
    if body_len == 0 {
        return Err(DecodeError::Empty);
    }
    if body_len > RECORD_BODY_BYTES_MAX {
        return Err(DecodeError::Invalid(format!("record length {body_len} is implausible")));
    }
    let total = body_len + RECORD_OVERHEAD_BYTES;
    if bytes.len() < total {
        return Err(DecodeError::Truncated);
    }
    let stored_crc = u32::from_le_bytes(bytes[4..8].try_into().unwrap());
    let body = &bytes[8..8 + body_len];
    let crc = if check_crc {
        crc32c::crc32c_append(crc32c::crc32c(&bytes[0..4]), body)
    } else {
        stored_crc
    };
    if crc != stored_crc {
        return Err(DecodeError::Invalid(format!(
            "checksum mismatch (stored {stored_crc:#010x}, computed {crc:#010x})"
        )));
    }
    let trailer = u32::from_le_bytes(bytes[8 + body_len..total].try_into().unwrap()) as usize;
    if trailer != body_len {
        return Err(DecodeError::Invalid(format!(
            "trailing length {trailer} differs from leading length {body_len}"
        )));
    }
    parse_body(body, total).map_err(|e| DecodeError::Invalid(e.to_string()))
}

fn parse_body(body: &[u8], len: usize) -> Result<RecordView<'_>, &'static str> {
    let mut r = Reader { bytes: body };
    let kind = r.u8()?;
    if kind != KIND_EVENT {
        return Err("unknown record kind");
    }
    let flags = r.u8()?;
    let version = r.u64()?;
    let timestamp = Timestamp(r.u64()? as i64);
    let id = r.uuid()?;
    let schema_version = r.u32()?;
    let correlation_id = if flags & FLAG_CORRELATION != 0 { Some(r.uuid()?) } else { None };
    let causation_id = if flags & FLAG_CAUSATION != 0 { Some(r.uuid()?) } else { None };
    let stream = r.str16()?;
    let event_type = r.str16()?;
    let tag_count = r.u16()?;
    let tags_start = r.bytes;
    for _ in 0..tag_count {
        r.str16()?;
    }
    let tags = &tags_start[..tags_start.len() - r.bytes.len()];
    let extra_count = r.u16()?;
    let extra_start = r.bytes;
    for _ in 0..extra_count {
        r.str16()?;
        r.str32()?;
    }
    let extra = &extra_start[..extra_start.len() - r.bytes.len()];
    let data_len = r.u32()? as usize;
    let data = r.take(data_len)?;
    if !r.bytes.is_empty() {
        return Err("bytes left over after the payload");
    }
    Ok(RecordView {
        flags,
        version,
        timestamp,
        id,
        schema_version,
        correlation_id,
        causation_id,
        stream,
        event_type,
        tags,
        tag_count,
        extra,
        extra_count,
        data,
        len,
    })
}

struct Reader<'a> {
    bytes: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], &'static str> {
        if self.bytes.len() < n {
            return Err("field runs past the end of the record");
        }
        let (head, rest) = self.bytes.split_at(n);
        self.bytes = rest;
        Ok(head)
    }
    fn u8(&mut self) -> Result<u8, &'static str> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, &'static str> {
        Ok(u16::from_le_bytes(self.take(2)?.try_into().unwrap()))
    }
    fn u32(&mut self) -> Result<u32, &'static str> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().unwrap()))
    }
    fn u64(&mut self) -> Result<u64, &'static str> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().unwrap()))
    }
    fn uuid(&mut self) -> Result<Uuid, &'static str> {
        Ok(Uuid::from_bytes(self.take(16)?.try_into().unwrap()))
    }
    fn str16(&mut self) -> Result<&'a str, &'static str> {
        let n = self.u16()? as usize;
        std::str::from_utf8(self.take(n)?).map_err(|_| "string field is not UTF-8")
    }
    fn str32(&mut self) -> Result<&'a str, &'static str> {
        let n = self.u32()? as usize;
        std::str::from_utf8(self.take(n)?).map_err(|_| "string field is not UTF-8")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> NewEvent {
        let mut e = NewEvent::json_bytes("MoneyDeposited", r#"{"amount":125}"#)
            .with_tags(["account:1", "customer:7"]);
        e.metadata.correlation_id = Some(Uuid::new_v4());
        e.metadata.extra.insert("user".into(), "alice".into());
        e
    }

    #[test]
    fn round_trip() {
        let e = sample();
        let mut buf = Vec::new();
        encode(&mut buf, "account-1", 7, Timestamp(42), &e, true);
        let view = decode(&buf).unwrap();
        assert_eq!(view.len, buf.len());
        assert!(view.batch_end());
        let got = view.to_event_sharing(Position(99), Bytes::copy_from_slice(view.data));
        assert_eq!(got.id, e.id);
        assert_eq!(got.stream, "account-1");
        assert_eq!(got.version, 7);
        assert_eq!(got.data, e.data);
        assert_eq!(got.metadata, e.metadata);
        assert_eq!(got.tags, e.tags);
        assert_eq!(got.timestamp, Timestamp(42));
    }

    proptest::proptest! {
        /// The decoder takes any bytes without panicking, and what it
        /// accepts is a record whose length fits the input.
        #[test]
        fn any_bytes_decode_without_panicking(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..512)) {
            if let Ok(view) = decode(&bytes) {
                proptest::prop_assert!(view.len <= bytes.len());
                let _ = view.to_event_sharing(Position(1), Bytes::new());
            }
            let _ = decode_trusted(&bytes).map(|v| v.tags().count());
        }

        /// A valid record with arbitrary bytes changed is refused, or (if the
        /// change kept every checksum right, which the flips here never do) equal.
        #[test]
        fn damaged_records_are_refused(at in 0usize..4096, xor in 1u8..=255) {
            let mut buf = Vec::new();
            encode(&mut buf, "acct-1", 3, Timestamp(5), &sample(), true);
            let at = at % buf.len();
            buf[at] ^= xor;
            proptest::prop_assert!(decode(&buf).is_err(), "damage at byte {} went unnoticed", at);
        }
    }

    #[test]
    fn every_flipped_byte_and_every_cut_is_detected() {
        let mut buf = Vec::new();
        encode(&mut buf, "s", 1, Timestamp(1), &sample(), true);
        for i in 0..buf.len() {
            let mut bad = buf.clone();
            bad[i] ^= 0x40;
            assert!(decode(&bad).is_err(), "flip at byte {i} went unnoticed");
        }
        for cut in 0..buf.len() {
            assert!(decode(&buf[..cut]).is_err(), "cut at {cut} went unnoticed");
        }
    }
}
