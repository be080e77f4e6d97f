//! The relay against the machine's real NATS JetStream. Outside CI a test
//! whose broker is down says so and passes; under `CI=true` it fails.

mod nats;

pub use cairn_core::conformance::reachable;
