//! HTTPS with rustls from PEM files: a client that trusts the CA works,
//! one that does not is refused, and plain HTTP to the TLS port fails;
//! gRPC (HTTP/2 by ALPN) works on the same TLS port.

use std::path::PathBuf;
use std::sync::Arc;

use cairn_client::HttpStore;
use cairn_core::{
    EventStore, ExpectedVersion, NewEvent, ReadStreamOptions, StartFrom, SubscriptionTarget,
};
use cairn_log::EmbeddedStore;
use cairn_server::{ServerConfig, TlsFiles};
use serde_json::json;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/tls").join(name)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_with_a_trusted_ca_and_refusals_without() {
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn EventStore> = Arc::new(EmbeddedStore::open(dir.path()).unwrap());
    let tls = TlsFiles { cert: fixture("server.pem"), key: fixture("server.key") };
    let config = ServerConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        tls: Some(tls),
        ..ServerConfig::default()
    };
    let running = cairn_server::start(store, config).unwrap();
    assert!(running.url.starts_with("https://"), "{}", running.url);

    let ca = std::fs::read(fixture("ca.pem")).unwrap();
    let client = HttpStore::with_tls_root(&running.url, Some(&ca)).unwrap();
    client
        .append(
            "secure-1",
            ExpectedVersion::NoStream,
            vec![NewEvent::json("Sealed", &json!({"n": 1})).unwrap()],
        )
        .await
        .unwrap();
    assert_eq!(
        client.read_stream("secure-1", ReadStreamOptions::forward()).await.unwrap().len(),
        1
    );
    let mut live = client
        .subscribe(SubscriptionTarget::Stream("secure-1".into()), StartFrom::Start)
        .await
        .unwrap();
    assert_eq!(live.next().await.unwrap().unwrap().event_type, "Sealed");

    let untrusting = HttpStore::new(&running.url).unwrap();
    let refused = untrusting
        .read_stream("secure-1", ReadStreamOptions::forward())
        .await
        .unwrap_err()
        .to_string();
    assert!(refused.contains("cannot reach the server"), "{refused}");
    let plain = HttpStore::new(&format!("http://{}", running.addr)).unwrap();
    assert!(
        plain.read_stream("secure-1", ReadStreamOptions::forward()).await.is_err(),
        "plain HTTP to the TLS port fails"
    );
    running.shutdown().await.unwrap();
}

/// A self-signed certificate works when the client trusts the certificate
/// itself; one that says it is a CA (what `openssl req -x509` makes by
/// default) is refused with a hint that says how to make one that works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_self_signed_certificate_is_trusted_as_itself_and_a_ca_one_gets_a_hint() {
    for (name, works) in [("self-signed", true), ("self-signed-ca", false)] {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn EventStore> = Arc::new(EmbeddedStore::open(dir.path()).unwrap());
        let tls = TlsFiles {
            cert: fixture(&format!("{name}.pem")),
            key: fixture(&format!("{name}.key")),
        };
        let config = ServerConfig {
            listen: "127.0.0.1:0".parse().unwrap(),
            tls: Some(tls),
            ..ServerConfig::default()
        };
        let running = cairn_server::start(store, config).unwrap();
        let cert = std::fs::read(fixture(&format!("{name}.pem"))).unwrap();
        let client = HttpStore::with_tls_root(&running.url, Some(&cert)).unwrap();
        let read = client.read_stream("none-1", ReadStreamOptions::forward()).await;
        if works {
            assert!(
                matches!(read, Err(cairn_core::StoreError::StreamNotFound { .. })),
                "{name}: {read:?}"
            );
        } else {
            let e = read.unwrap_err().to_string();
            assert!(e.contains("basicConstraints=critical,CA:FALSE"), "{name}: {e}");
        }
        // The gRPC client says the same.
        let grpc = cairn_grpc::GrpcStore::with_tls_root(&running.url, Some(&cert)).unwrap();
        let read = grpc.read_stream("none-1", ReadStreamOptions::forward()).await;
        if works {
            assert!(
                matches!(read, Err(cairn_core::StoreError::StreamNotFound { .. })),
                "{name} over gRPC: {read:?}"
            );
        } else {
            let e = read.unwrap_err().to_string();
            assert!(e.contains("basicConstraints=critical,CA:FALSE"), "{name} over gRPC: {e}");
        }
        running.shutdown().await.unwrap();
    }
}

/// Conformance checks through `GrpcStore` over TLS with the private CA.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_over_tls_with_a_private_ca() {
    use cairn_core::conformance;
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn EventStore> = Arc::new(EmbeddedStore::open(dir.path()).unwrap());
    let tls = TlsFiles { cert: fixture("server.pem"), key: fixture("server.key") };
    let config = ServerConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        tls: Some(tls),
        ..ServerConfig::default()
    };
    let running = cairn_server::start(store, config).unwrap();
    let ca = std::fs::read(fixture("ca.pem")).unwrap();
    let client: Arc<dyn EventStore> =
        Arc::new(cairn_grpc::GrpcStore::with_tls_root(&running.url, Some(&ca)).unwrap());
    conformance::versions_count_events(client.clone()).await;
    conformance::expected_version_rules(client.clone()).await;
    conformance::event_fields_round_trip(client.clone()).await;
    conformance::read_all_in_global_order(client.clone()).await;
    conformance::subscribe_stream_catch_up_then_live(client.clone()).await;
    conformance::query_reads_matching_events_in_order(client.clone()).await;

    let untrusting = cairn_grpc::GrpcStore::new(&running.url).unwrap();
    assert!(untrusting.head_position().await.is_err(), "a client without the CA is refused");
    let plain =
        cairn_grpc::GrpcStore::with_tls_root(&format!("http://{}", running.addr), Some(&ca))
            .err()
            .expect("a CA for http:// is refused")
            .to_string();
    assert!(plain.contains("https://"), "{plain}");
    running.shutdown().await.unwrap();
}

#[test]
fn bad_pem_files_are_named() {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let _guard = rt.enter();
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn EventStore> = Arc::new(EmbeddedStore::open(dir.path()).unwrap());
    let tls = TlsFiles { cert: fixture("ca.pem"), key: fixture("missing.key") };
    let config = ServerConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        tls: Some(tls),
        ..ServerConfig::default()
    };
    let err = cairn_server::start(store, config).err().expect("refused").to_string();
    assert!(err.contains("private key") && err.contains("missing.key"), "{err}");
}
