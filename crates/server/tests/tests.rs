//! The server over real sockets: the conformance suite through the HTTP
//! client, and what bad requests get.

mod api;
mod common;
mod conformance;
