//! Integration tests of the embedded engine, compiled into one binary.

mod common;
mod conformance;
mod corruption;
mod crash;
mod damage;
mod dcb;
mod faults;
mod index_files;
mod model;
mod writers;
