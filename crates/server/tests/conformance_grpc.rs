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

/// The suite again, every append through the `AppendStream` call.
mod through_append_stream {
    fn store() -> (std::sync::Arc<dyn cairn_core::EventStore>, crate::common::TestServer) {
        let (client, server) = super::grpc_store();
        (std::sync::Arc::new(cairn_core::conformance::ThroughAppendEach(client)), server)
    }

    cairn_core::conformance_suite!(store());
}

/// The server answers at most 10,000 events a call; GrpcStore follows the
/// `x-cairn-next` cursor so a caller still gets all it asked for.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_reads_page_past_the_servers_cap() {
    use cairn_core::{ExpectedVersion, NewEvent, Query, ReadAllOptions, ReadStreamOptions};
    let (client, server) = grpc_store();
    let n = cairn_client::wire::EVENTS_PAGE_MAX + 50;
    for chunk in 0..n.div_ceil(1000) {
        let events = (0..1000.min(n - chunk * 1000))
            .map(|i| NewEvent::json_bytes("Paged", format!("{{\"i\": {i}}}")))
            .collect();
        server.store.append("acct-1", ExpectedVersion::Any, events).await.unwrap();
    }
    assert_eq!(client.read_stream("acct-1", ReadStreamOptions::forward()).await.unwrap().len(), n);
    assert_eq!(client.read_stream("acct-1", ReadStreamOptions::backward()).await.unwrap().len(), n);
    assert_eq!(
        client
            .read_all(ReadAllOptions::forward())
            .await
            .unwrap()
            .iter()
            .filter(|e| e.stream == "acct-1")
            .count(),
        n
    );
    assert_eq!(
        client
            .read_query(&Query::types(["Paged"]), ReadAllOptions::backward())
            .await
            .unwrap()
            .len(),
        n
    );
    let some = client.read_all(ReadAllOptions::forward().limit(10_020)).await.unwrap();
    assert_eq!(some.len(), 10_020, "a limit past one page is met exactly");
}

/// One `AppendStream` call that extends one stream with exact versions,
/// longer than a server batch: the server queues each batch while the one
/// before it is written, and every append still sees the ones before it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_append_stream_longer_than_a_batch_keeps_its_order() {
    use cairn_core::{Append, ExpectedVersion, NewEvent, ReadStreamOptions};
    let (client, server) = grpc_store();
    let n = 25_000u64;
    let appends = (0..n)
        .map(|v| {
            Append::new(
                "chain-1",
                ExpectedVersion::Exact(v),
                vec![NewEvent::json_bytes("Linked", format!("{{\"v\": {v}}}"))],
            )
        })
        .collect();
    for (v, result) in client.append_each(appends).await.into_iter().enumerate() {
        assert_eq!(result.unwrap_or_else(|e| panic!("append {v}: {e}")).next_version, v as u64 + 1);
    }
    let versions: Vec<u64> = server
        .store
        .read_stream("chain-1", ReadStreamOptions::forward())
        .await
        .unwrap()
        .iter()
        .map(|e| e.version)
        .collect();
    assert_eq!(versions, (1..=n).collect::<Vec<_>>());
}
