//! One test binary for the domain crate (faster to build than one per file).
mod bank;
mod common;
mod decisions;
mod dispatch;
mod repository;
mod snapshots;
mod travel;
mod upcasting;
