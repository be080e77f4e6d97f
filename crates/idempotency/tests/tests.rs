//! Against the real PostgreSQL and Redis of the machine. Outside CI a test
//! whose service is down says so and passes; under `CI=true` it fails.

mod postgres;
mod redis_keys;

pub use cairn_core::conformance::reachable;
