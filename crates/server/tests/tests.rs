//! The server over real sockets: the conformance suite through the HTTP
//! client (open, and with keys), what bad requests get, and access control.

mod api;
mod auth;
mod common;
mod conformance;
mod conformance_auth;
mod conformance_grpc;
mod faults;
mod hostile;
mod tls;
mod ui;
