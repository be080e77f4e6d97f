//! The PostgreSQL backend against the machine's real server
//! (127.0.0.1:5432, database `test`). Each test works in a schema of its
//! own, dropped when the test ends. Outside CI a test whose server is down
//! says so and passes; under `CI=true` it fails.

mod common;
mod conformance;
mod gaps;
mod notify;
mod outbox;
mod outcome;
