//! One test binary for the read side.
mod common;
mod crash;
mod groups;
mod postgres;
mod projections;
