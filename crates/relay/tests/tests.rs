//! The relay against the machine's real NATS JetStream and RabbitMQ. Outside
//! CI a test whose broker is down says so and passes; under `CI=true` it fails.
//! `pipeline` needs no broker: a scripted sink answers each batch.

mod common;
mod nats;
mod pipeline;
mod rabbitmq;

pub use cairn_core::conformance::reachable;
