//! The conformance suite through the gRPC client, against a live server.

use std::sync::Arc;

use cairn_core::EventStore;
use cairn_grpc::GrpcStore;

fn grpc_store() -> (Arc<dyn EventStore>, crate::common::TestServer) {
    let server = crate::common::server();
    let client: Arc<dyn EventStore> = Arc::new(GrpcStore::new(&server.url).unwrap());
    (client, server)
}

cairn_core::conformance_suite!(grpc_store());
