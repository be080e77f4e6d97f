//! API keys, roles and prefixes: who may do what, and what the rest get.

use std::sync::Arc;

use cairn_client::HttpStore;
use cairn_core::{EventStore, ExpectedVersion, NewEvent, ReadAllOptions, ReadStreamOptions, StoreError};
use cairn_log::EmbeddedStore;
use cairn_server::auth::{KeyFile, Role};
use cairn_server::ServerConfig;
use serde_json::json;
use tempfile::TempDir;

pub struct Secured {
    pub url: String,
    pub admin: String,
    pub orders: String,
    pub reader: String,
    _dir: TempDir,
    _running: cairn_server::Running,
}

pub fn secured() -> Secured {
    let dir = tempfile::tempdir().unwrap();
    let mut keys = KeyFile::default();
    let admin = keys.add("ops", Role::Admin, vec![]).unwrap();
    let orders = keys.add("order-service", Role::Writer, vec!["orders-".into()]).unwrap();
    let reader = keys.add("dashboard", Role::Reader, vec![]).unwrap();
    let path = KeyFile::default_path(dir.path());
    keys.save(&path).unwrap();
    let keys = KeyFile::load(&path).unwrap();
    assert!(keys.keys.iter().all(|k| !k.hash.contains(admin.rsplit('_').next().unwrap())), "only hashes are stored");
    let store: Arc<dyn EventStore> = Arc::new(EmbeddedStore::open(dir.path().join("data")).unwrap());
    let config = ServerConfig { listen: "127.0.0.1:0".parse().unwrap(), keys: Some(keys), ..ServerConfig::default() };
    let running = cairn_server::start(store, config).unwrap();
    Secured { url: format!("http://{}", running.addr), admin, orders, reader, _dir: dir, _running: running }
}

fn event() -> Vec<NewEvent> {
    vec![NewEvent::json("Something", &json!({"n": 1})).unwrap()]
}

fn denied(result: Result<impl std::fmt::Debug, StoreError>, code: &str, says: &str) {
    match result {
        Err(StoreError::AccessDenied { code: got, reason }) => {
            assert_eq!(got, code, "{reason}");
            assert!(reason.contains(says), "the reason should say {says:?}: {reason}");
        }
        other => panic!("expected access denied ({code}), got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_roles_and_prefixes_decide_who_does_what() {
    let s = secured();
    let anonymous = HttpStore::new(&s.url).unwrap();
    let admin = HttpStore::new(&s.url).unwrap().with_api_key(&s.admin);
    let orders = HttpStore::new(&s.url).unwrap().with_api_key(&s.orders);
    let reader = HttpStore::new(&s.url).unwrap().with_api_key(&s.reader);

    denied(anonymous.append("account-1", ExpectedVersion::Any, event()).await, "unauthorized", "needs an API key");
    let forged = format!("{}x", &s.admin[..s.admin.len() - 1]);
    denied(HttpStore::new(&s.url).unwrap().with_api_key(forged).read_all(ReadAllOptions::forward()).await, "unauthorized", "wrong API key");

    admin.append("account-1", ExpectedVersion::NoStream, event()).await.unwrap();
    denied(reader.append("account-1", ExpectedVersion::Any, event()).await, "forbidden", "is a reader");
    assert_eq!(reader.read_stream("account-1", ReadStreamOptions::forward()).await.unwrap().len(), 1);
    assert!(!reader.read_all(ReadAllOptions::forward()).await.unwrap().is_empty());

    orders.append("orders-7", ExpectedVersion::NoStream, event()).await.unwrap();
    assert_eq!(orders.read_stream("orders-7", ReadStreamOptions::forward()).await.unwrap().len(), 1);
    denied(orders.read_stream("account-1", ReadStreamOptions::forward()).await, "forbidden", "starting with orders-");
    denied(orders.append("account-1", ExpectedVersion::Any, event()).await, "forbidden", "starting with orders-");
    denied(orders.read_all(ReadAllOptions::forward()).await, "forbidden", "across all streams");
    denied(orders.delete_stream("account-1", ExpectedVersion::Any, false).await, "forbidden", "orders-");
    assert!(orders.subscribe(cairn_core::SubscriptionTarget::All, cairn_core::StartFrom::Start).await.is_err());

    // Nothing the refused calls tried was written.
    assert_eq!(admin.read_stream("account-1", ReadStreamOptions::forward()).await.unwrap().len(), 1);
    // Health stays open for probes.
    assert_eq!(reqwest::get(format!("{}/health", s.url)).await.unwrap().status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeated_failed_logins_are_refused_for_a_while() {
    let s = secured();
    let wrong = HttpStore::new(&s.url).unwrap().with_api_key("cairn_ops_0000");
    for _ in 0..10 {
        denied(wrong.head_position().await, "unauthorized", "wrong API key");
    }
    // Now even the right key is refused from this address, without a hash check.
    let admin = HttpStore::new(&s.url).unwrap().with_api_key(&s.admin);
    denied(admin.head_position().await, "too_many_failed_logins", "wait a minute");
}

#[test]
fn a_key_file_refuses_bad_names_and_duplicates() {
    let mut keys = KeyFile::default();
    keys.add("ci-bot", Role::Writer, vec![]).unwrap();
    assert!(keys.add("ci-bot", Role::Reader, vec![]).unwrap_err().contains("already a key"));
    assert!(keys.add("has space", Role::Reader, vec![]).unwrap_err().contains("letters, digits"));
    assert!(keys.remove("ci-bot") && !keys.remove("ci-bot"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_applies_the_same_keys_and_checks() {
    let s = secured();
    let anonymous = cairn_grpc::GrpcStore::new(&s.url).unwrap();
    denied(anonymous.append("account-1", ExpectedVersion::Any, event()).await, "unauthorized", "needs an API key");
    let reader = cairn_grpc::GrpcStore::new(&s.url).unwrap().with_api_key(&s.reader).unwrap();
    denied(reader.append("account-1", ExpectedVersion::Any, event()).await, "forbidden", "is a reader");
    let orders = cairn_grpc::GrpcStore::new(&s.url).unwrap().with_api_key(&s.orders).unwrap();
    orders.append("orders-1", ExpectedVersion::NoStream, event()).await.unwrap();
    denied(orders.read_stream("account-1", ReadStreamOptions::forward()).await, "forbidden", "orders-");
    denied(orders.read_all(ReadAllOptions::forward()).await, "forbidden", "across all streams");
    let admin = cairn_grpc::GrpcStore::new(&s.url).unwrap().with_api_key(&s.admin).unwrap();
    assert_eq!(admin.read_stream("orders-1", ReadStreamOptions::forward()).await.unwrap().len(), 1);
}
