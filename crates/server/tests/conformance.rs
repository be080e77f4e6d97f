use crate::common::http_store;

cairn_core::conformance_suite!(http_store());

/// The suite again, every append through `POST /appends` (NDJSON).
mod through_appends {
    fn store() -> (std::sync::Arc<dyn cairn_core::EventStore>, crate::common::TestServer) {
        let (client, server) = crate::common::http_store();
        (std::sync::Arc::new(cairn_core::conformance::ThroughAppendEach(client)), server)
    }

    cairn_core::conformance_suite!(store());
}
