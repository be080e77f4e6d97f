//! Domain events to and from stored events, without an intermediate JSON tree
//! on the hot path: a stored event at its current schema version is decoded
//! straight from its payload bytes.

use std::marker::PhantomData;

use cairn_core::{ContentType, NewEvent, RecordedEvent};
use serde::Deserialize;
use serde::de::{
    self, DeserializeSeed, Deserializer, EnumAccess, IntoDeserializer, VariantAccess, Visitor,
};
use serde_json::Value;

use crate::{DecodeError, DomainEvent, Upcasters};

/// A stored event brought to its newest type name, version and payload.
#[derive(Debug, Clone, PartialEq)]
pub struct Upcasted {
    pub event_type: String,
    pub schema_version: u32,
    pub data: Value,
}

/// Encodes and decodes the events of one domain type, upcasting on read.
#[derive(Debug)]
pub struct EventCodec<E> {
    upcasters: Upcasters,
    _events: PhantomData<fn() -> E>,
}

impl<E: DomainEvent> Default for EventCodec<E> {
    fn default() -> Self {
        Self::new()
    }
}

impl<E: DomainEvent> EventCodec<E> {
    /// A codec with the event type's own upcasters.
    pub fn new() -> Self {
        Self::with_upcasters(E::upcasters())
    }

    pub fn with_upcasters(upcasters: Upcasters) -> Self {
        EventCodec { upcasters, _events: PhantomData }
    }

    /// The event as a `NewEvent`: its variant name as type, its fields as JSON
    /// payload, the current schema version and its tags.
    pub fn encode(&self, event: &E) -> Result<NewEvent, String> {
        let (event_type, data) = match serde_json::to_value(event).map_err(|e| e.to_string())? {
            Value::String(unit) => (unit, b"{}".to_vec()),
            Value::Object(map) if map.len() == 1 => {
                let (name, fields) = map.into_iter().next().expect("one entry");
                (name, serde_json::to_vec(&fields).map_err(|e| e.to_string())?)
            }
            _ => return Err("a DomainEvent must be an enum in serde's default (externally tagged) representation".into()),
        };
        let version = E::schema_version(&event_type);
        Ok(NewEvent::json_bytes(event_type, data)
            .with_schema_version(version)
            .with_tags(event.tags()))
    }

    /// The stored event as the domain type, upcast to the newest version.
    pub fn decode(&self, stored: &RecordedEvent) -> Result<E, DecodeError> {
        let fail = |reason: String| DecodeError {
            stream: stored.stream.clone(),
            version: stored.version,
            event_type: stored.event_type.clone(),
            schema_version: stored.schema_version,
            reason,
        };
        if stored.content_type != ContentType::Json {
            return Err(fail("its payload is binary, not JSON".into()));
        }
        let current = E::schema_version(&stored.event_type);
        if self.upcasters.is_current(&stored.event_type, stored.schema_version, current) {
            let mut json = serde_json::Deserializer::from_slice(&stored.data);
            let event = E::deserialize(Tagged { event_type: &stored.event_type, data: &mut json })
                .map_err(|e| fail(e.to_string()))?;
            json.end().map_err(|e| fail(e.to_string()))?;
            return Ok(event);
        }
        let up = self.upcast(stored).map_err(fail)?;
        E::deserialize(Tagged { event_type: &up.event_type, data: up.data })
            .map_err(|e| fail(e.to_string()))
    }

    /// The stored event's payload as JSON after upcasting, for code that has no
    /// domain type for it (census, tools, generic projections).
    pub fn upcast_json(&self, stored: &RecordedEvent) -> Result<Upcasted, DecodeError> {
        self.upcast(stored).map_err(|reason| DecodeError {
            stream: stored.stream.clone(),
            version: stored.version,
            event_type: stored.event_type.clone(),
            schema_version: stored.schema_version,
            reason,
        })
    }

    fn upcast(&self, stored: &RecordedEvent) -> Result<Upcasted, String> {
        let data: Value = serde_json::from_slice(&stored.data)
            .map_err(|e| format!("its payload is not valid JSON: {e}"))?;
        let (event_type, schema_version, data) = self.upcasters.upcast(
            &stored.event_type,
            stored.schema_version,
            E::schema_version,
            data,
        )?;
        Ok(Upcasted { event_type, schema_version, data })
    }
}

/// Presents (type name, payload) to serde as an externally tagged enum.
struct Tagged<'a, D> {
    event_type: &'a str,
    data: D,
}

impl<'de, D: Deserializer<'de, Error = serde_json::Error>> Deserializer<'de> for Tagged<'_, D> {
    type Error = serde_json::Error;

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Self::Error> {
        visitor.visit_enum(self)
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf option unit
        unit_struct newtype_struct seq tuple tuple_struct map struct enum identifier ignored_any
    }
}

impl<'de, D: Deserializer<'de, Error = serde_json::Error>> EnumAccess<'de> for Tagged<'_, D> {
    type Error = serde_json::Error;
    type Variant = Payload<D>;

    fn variant_seed<S: DeserializeSeed<'de>>(
        self,
        seed: S,
    ) -> Result<(S::Value, Self::Variant), Self::Error> {
        let name: de::value::StrDeserializer<'_, serde_json::Error> =
            self.event_type.into_deserializer();
        Ok((seed.deserialize(name)?, Payload(self.data)))
    }
}

struct Payload<D>(D);

impl<'de, D: Deserializer<'de, Error = serde_json::Error>> VariantAccess<'de> for Payload<D> {
    type Error = serde_json::Error;

    fn unit_variant(self) -> Result<(), Self::Error> {
        // The payload of a unit variant is `{}`; read past it.
        de::IgnoredAny::deserialize(self.0).map(|_| ())
    }

    fn newtype_variant_seed<S: DeserializeSeed<'de>>(
        self,
        seed: S,
    ) -> Result<S::Value, Self::Error> {
        seed.deserialize(self.0)
    }

    fn tuple_variant<V: Visitor<'de>>(
        self,
        len: usize,
        visitor: V,
    ) -> Result<V::Value, Self::Error> {
        self.0.deserialize_tuple(len, visitor)
    }

    fn struct_variant<V: Visitor<'de>>(
        self,
        fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, Self::Error> {
        self.0.deserialize_struct("", fields, visitor)
    }
}
