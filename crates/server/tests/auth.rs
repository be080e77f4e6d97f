//! API keys, roles and prefixes: who may do what, and what the rest get.

use std::sync::Arc;

use cairn_client::HttpStore;
use cairn_core::{
    EventStore, ExpectedVersion, NewEvent, ReadAllOptions, ReadStreamOptions, StoreError,
};
use cairn_log::EmbeddedStore;
use cairn_server::ServerConfig;
use cairn_server::auth::{Key, KeyFile, Role};
use serde_json::json;
use tempfile::TempDir;

pub(crate) struct Secured {
    pub url: String,
    pub admin: String,
    pub orders: String,
    pub reader: String,
    _dir: TempDir,
    _running: cairn_server::Running,
}

pub(crate) fn secured() -> Secured {
    secured_with(vec![])
}

/// `secured()` with `extra` keys as found in an existing key file.
fn secured_with(extra: Vec<Key>) -> Secured {
    let dir = tempfile::tempdir().unwrap();
    let mut keys = KeyFile::default();
    let admin = keys.add("ops", Role::Admin, vec![]).unwrap();
    let orders = keys.add("order-service", Role::Writer, vec!["orders-".into()]).unwrap();
    let reader = keys.add("dashboard", Role::Reader, vec![]).unwrap();
    keys.keys.extend(extra);
    let path = KeyFile::default_path(dir.path());
    keys.save(&path).unwrap();
    let keys = KeyFile::load(&path).unwrap();
    assert!(
        keys.keys.iter().all(|k| !k.hash.contains(admin.rsplit('_').next().unwrap())),
        "only hashes are stored"
    );
    let store: Arc<dyn EventStore> =
        Arc::new(EmbeddedStore::open(dir.path().join("data")).unwrap());
    let config = ServerConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        keys: Some(keys),
        ..ServerConfig::default()
    };
    let running = cairn_server::start(store, config).unwrap();
    Secured {
        url: format!("http://{}", running.addr),
        admin,
        orders,
        reader,
        _dir: dir,
        _running: running,
    }
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

    denied(
        anonymous.append("account-1", ExpectedVersion::Any, event()).await,
        "unauthorized",
        "needs an API key",
    );
    let forged = format!("{}x", &s.admin[..s.admin.len() - 1]);
    denied(
        HttpStore::new(&s.url)
            .unwrap()
            .with_api_key(forged)
            .read_all(ReadAllOptions::forward())
            .await,
        "unauthorized",
        "wrong API key",
    );

    admin.append("account-1", ExpectedVersion::NoStream, event()).await.unwrap();
    denied(
        reader.append("account-1", ExpectedVersion::Any, event()).await,
        "forbidden",
        "is a reader",
    );
    assert_eq!(
        reader.read_stream("account-1", ReadStreamOptions::forward()).await.unwrap().len(),
        1
    );
    assert!(!reader.read_all(ReadAllOptions::forward()).await.unwrap().is_empty());

    orders.append("orders-7", ExpectedVersion::NoStream, event()).await.unwrap();
    assert_eq!(
        orders.read_stream("orders-7", ReadStreamOptions::forward()).await.unwrap().len(),
        1
    );
    denied(
        orders.read_stream("account-1", ReadStreamOptions::forward()).await,
        "forbidden",
        "starting with orders-",
    );
    denied(
        orders.append("account-1", ExpectedVersion::Any, event()).await,
        "forbidden",
        "starting with orders-",
    );
    denied(orders.read_all(ReadAllOptions::forward()).await, "forbidden", "across all streams");
    denied(
        orders.delete_stream("account-1", ExpectedVersion::Any, false).await,
        "forbidden",
        "orders-",
    );
    assert!(
        orders
            .subscribe(cairn_core::SubscriptionTarget::All, cairn_core::StartFrom::Start)
            .await
            .is_err()
    );

    // Nothing the refused calls tried was written.
    assert_eq!(
        admin.read_stream("account-1", ReadStreamOptions::forward()).await.unwrap().len(),
        1
    );
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
    denied(
        anonymous.append("account-1", ExpectedVersion::Any, event()).await,
        "unauthorized",
        "needs an API key",
    );
    let reader = cairn_grpc::GrpcStore::new(&s.url).unwrap().with_api_key(&s.reader).unwrap();
    denied(
        reader.append("account-1", ExpectedVersion::Any, event()).await,
        "forbidden",
        "is a reader",
    );
    let orders = cairn_grpc::GrpcStore::new(&s.url).unwrap().with_api_key(&s.orders).unwrap();
    orders.append("orders-1", ExpectedVersion::NoStream, event()).await.unwrap();
    denied(
        orders.read_stream("account-1", ReadStreamOptions::forward()).await,
        "forbidden",
        "orders-",
    );
    denied(orders.read_all(ReadAllOptions::forward()).await, "forbidden", "across all streams");
    let admin = cairn_grpc::GrpcStore::new(&s.url).unwrap().with_api_key(&s.admin).unwrap();
    assert_eq!(admin.read_stream("orders-1", ReadStreamOptions::forward()).await.unwrap().len(), 1);
}

/// The batch paths check each append against the key: a key limited to
/// `orders-` gets its own appends written and the others refused, in place.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batched_appends_are_checked_one_by_one() {
    use cairn_core::Append;
    let s = secured();
    let grpc: Arc<dyn EventStore> =
        Arc::new(cairn_grpc::GrpcStore::new(&s.url).unwrap().with_api_key(&s.orders).unwrap());
    let http: Arc<dyn EventStore> =
        Arc::new(HttpStore::new(&s.url).unwrap().with_api_key(&s.orders));
    for (n, client) in [grpc, http].into_iter().enumerate() {
        let mut results = client
            .append_each(vec![
                Append::new(format!("orders-b{n}"), ExpectedVersion::NoStream, event()),
                Append::new("account-1", ExpectedVersion::Any, event()),
            ])
            .await
            .into_iter();
        assert_eq!(results.next().unwrap().unwrap().next_version, 1);
        denied(results.next().unwrap(), "forbidden", "orders-");
    }
    let anonymous = cairn_grpc::GrpcStore::new(&s.url).unwrap();
    for result in
        anonymous.append_each(vec![Append::new("orders-x", ExpectedVersion::Any, event())]).await
    {
        denied(result, "unauthorized", "needs an API key");
    }
    let admin = HttpStore::new(&s.url).unwrap().with_api_key(&s.admin);
    assert!(
        admin.read_stream("account-1", ReadStreamOptions::forward()).await.is_err(),
        "nothing refused was written"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_without_a_key_are_not_failed_logins() {
    let s = secured();
    let client = reqwest::Client::new();
    for _ in 0..12 {
        assert_eq!(client.get(format!("{}/head", s.url)).send().await.unwrap().status(), 401);
    }
    HttpStore::new(&s.url).unwrap().with_api_key(&s.admin).head_position().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_that_verified_is_not_refused_by_the_limiter() {
    let s = secured();
    let admin = HttpStore::new(&s.url).unwrap().with_api_key(&s.admin);
    admin.head_position().await.unwrap();
    let wrong = HttpStore::new(&s.url).unwrap().with_api_key("cairn_ops_0000");
    for _ in 0..10 {
        denied(wrong.head_position().await, "unauthorized", "wrong API key");
    }
    denied(wrong.head_position().await, "too_many_failed_logins", "wait a minute");
    admin.head_position().await.unwrap();
    // A key not verified yet is refused unchecked while the address is over the limit.
    let reader = HttpStore::new(&s.url).unwrap().with_api_key(&s.reader);
    denied(reader.head_position().await, "too_many_failed_logins", "wait a minute");
}

/// Guesses are counted before they are checked: a burst (on more workers
/// than the limit) gets no more checks than the limit allows.
#[tokio::test(flavor = "multi_thread", worker_threads = 16)]
async fn a_burst_of_guesses_gets_no_more_checks_than_the_limit() {
    let s = secured();
    let client = reqwest::Client::new();
    let guesses: Vec<_> = (0..40)
        .map(|_| {
            let request = client.get(format!("{}/head", s.url)).bearer_auth("cairn_ops_0000");
            tokio::spawn(async move { request.send().await.unwrap().status().as_u16() })
        })
        .collect();
    let mut statuses = Vec::new();
    for guess in guesses {
        statuses.push(guess.await.unwrap());
    }
    let checked = statuses.iter().filter(|&&s| s == 401).count();
    assert!(
        checked <= 10 && statuses.iter().all(|&s| s == 401 || s == 429),
        "{checked} guesses checked: {statuses:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_token_in_the_url_is_for_subscriptions_only() {
    let s = secured();
    let client = reqwest::Client::new();
    let token = &s.admin;
    let routes = [
        ("GET", "/head"),
        ("POST", "/streams/orders-1"),
        ("GET", "/streams/orders-1"),
        ("GET", "/streams/orders-1/info"),
        ("GET", "/streams/orders-1/metadata"),
        ("POST", "/query"),
        ("GET", "/groups"),
        ("GET", "/all"),
    ];
    for (method, path) in routes {
        let url = format!("{}{path}?access_token={token}", s.url);
        let request = if method == "GET" {
            client.get(url)
        } else {
            client.post(url).body(r#"{"events": []}"#)
        };
        // Refused even with the header too: the key should not be in URLs (logs, history) at all.
        for request in [request.try_clone().unwrap(), request.bearer_auth(token)] {
            let response = request.send().await.unwrap();
            assert_eq!(response.status(), 400, "{method} {path}");
            let body: serde_json::Value = response.json().await.unwrap();
            let message = body["message"].as_str().unwrap();
            assert!(
                message.contains("access_token") && message.contains("Authorization"),
                "{method} {path}: {message}"
            );
        }
    }
    for path in ["/all/subscribe", "/streams/orders-1/subscribe"] {
        let response = client
            .get(format!("{}{path}?from=end&access_token={token}", s.url))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200, "{path}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_append_condition_stays_within_the_keys_streams() {
    use cairn_core::{AppendCondition, Query, QueryItem};
    let s = secured();
    let admin = HttpStore::new(&s.url).unwrap().with_api_key(&s.admin);
    admin
        .append(
            "account-1",
            ExpectedVersion::Any,
            vec![NewEvent::json("MoneyDeposited", &json!({"amount": 5})).unwrap()],
        )
        .await
        .unwrap();
    let outside = [
        Query::from(QueryItem::categories(["account"]).with_types(["MoneyDeposited"])),
        Query::types(["MoneyDeposited"]),
        Query::category("orders").or(QueryItem::categories(["account"])),
    ];
    let http = HttpStore::new(&s.url).unwrap().with_api_key(&s.orders);
    let grpc = cairn_grpc::GrpcStore::new(&s.url).unwrap().with_api_key(&s.orders).unwrap();
    for (stream, store) in [("orders-http", &http as &dyn EventStore), ("orders-grpc", &grpc)] {
        for query in &outside {
            let condition = AppendCondition::fail_if_events_match(query.clone());
            denied(
                store.append_if(stream, ExpectedVersion::Any, event(), condition).await,
                "forbidden",
                "condition",
            );
        }
        let own = AppendCondition::fail_if_events_match(
            QueryItem::categories(["orders"]).with_types(["MoneyDeposited"]).into(),
        );
        store.append_if(stream, ExpectedVersion::Any, event(), own).await.unwrap();
    }
}

/// An argon2 hash as key files held before keys were hashed with SHA-256,
/// for the secret in `LEGACY_TOKEN`, made slow (about a second) so that
/// blocking shows.
const LEGACY_TOKEN: &str = "cairn_legacy_legacy-secret-7f3a";
const LEGACY_HASH: &str = "$argon2id$v=19$m=19456,t=60,p=1$Y2Fpcm4tbGVnYWN5LXRlc3Q$2FyxQoGiYW09V9a2U8bgQw2gWTGGz4w2JUcWrdYEIdM";

/// A GET over a plain socket, needing no runtime: how long the answer took, and its status line.
fn timed_get(addr: std::net::SocketAddr, path: &str, key: &str) -> (std::time::Duration, String) {
    use std::io::{Read, Write};
    let started = std::time::Instant::now();
    let mut tcp = std::net::TcpStream::connect(addr).unwrap();
    write!(tcp, "GET {path} HTTP/1.1\r\nHost: cairn\r\nAuthorization: Bearer {key}\r\nConnection: close\r\n\r\n").unwrap();
    let mut answer = String::new();
    tcp.read_to_string(&mut answer).unwrap();
    (started.elapsed(), answer.lines().next().unwrap_or_default().to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn argon2_keys_still_work_and_are_checked_off_the_async_workers() {
    use std::time::{Duration, Instant};
    let legacy = Key {
        name: "legacy".into(),
        role: Role::Writer,
        prefixes: vec![],
        hash: LEGACY_HASH.into(),
    };
    let s = secured_with(vec![legacy]);
    let addr: std::net::SocketAddr = s.url.trim_start_matches("http://").parse().unwrap();
    HttpStore::new(&s.url)
        .unwrap()
        .with_api_key(LEGACY_TOKEN)
        .append("legacy-1", ExpectedVersion::NoStream, event())
        .await
        .unwrap();

    // An unknown name costs what a known one does, so timing does not tell which names exist.
    let client = reqwest::Client::new();
    let mut took = Vec::new();
    for token in ["cairn_legacy_wrong", "cairn_nobody_wrong"] {
        let started = Instant::now();
        assert_eq!(
            client.get(format!("{}/head", s.url)).bearer_auth(token).send().await.unwrap().status(),
            401
        );
        took.push(started.elapsed());
    }
    assert!(took[1] * 2 > took[0], "an unknown name took {:?}, a known one {:?}", took[1], took[0]);

    // Guesses from six addresses: two are checked at a time, the rest refused
    // at once, and the async workers stay free for everyone else.
    let guesses: Vec<_> = (0..6u8)
        .map(|i| {
            let client = reqwest::Client::builder()
                .local_address(std::net::IpAddr::from([127, 0, 0, 10 + i]))
                .build()
                .unwrap();
            let request = client.get(format!("{}/head", s.url)).bearer_auth("cairn_legacy_wrong");
            tokio::spawn(async move { request.send().await.unwrap().status().as_u16() })
        })
        .collect();
    let admin = s.admin.clone();
    let probe = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(200));
        [timed_get(addr, "/health", &admin), timed_get(addr, "/streams/legacy-1", &admin)]
    });
    let mut statuses = Vec::new();
    for guess in guesses {
        statuses.push(guess.await.unwrap());
    }
    for (took, status) in tokio::task::spawn_blocking(move || probe.join().unwrap()).await.unwrap()
    {
        assert!(
            status.contains(" 200 ") && took < Duration::from_millis(400),
            "{status} after {took:?} while keys were checked"
        );
    }
    let busy = statuses.iter().filter(|&&s| s == 503).count();
    assert!(busy >= 3 && statuses.iter().all(|&s| s == 503 || s == 401), "{statuses:?}");
}
