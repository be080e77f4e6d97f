use crate::common::http_store;

cairn_core::conformance_suite!(http_store());
