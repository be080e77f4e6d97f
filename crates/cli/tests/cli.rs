//! End-to-end tests of the real `cairn` binary.

use std::io::Write;
use std::process::{Command, Output, Stdio};

fn cairn(dir: &std::path::Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_cairn"))
        .arg("--data")
        .arg(dir)
        .args(args)
        .output()
        .expect("run cairn")
}

fn cairn_stdin(dir: &std::path::Path, args: &[&str], input: &str) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_cairn"))
        .arg("--data")
        .arg(dir)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run cairn");
    child.stdin.take().expect("stdin").write_all(input.as_bytes()).expect("write stdin");
    child.wait_with_output().expect("wait for cairn")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn append_read_and_streams_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let o = cairn(
        dir.path(),
        &["append", "account-1", "MoneyDeposited", r#"{"amount":125}"#, "-e", "no-stream"],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).contains("version 1"), "{}", stdout(&o));

    let mut child = Command::new(env!("CARGO_BIN_EXE_cairn"))
        .arg("--data")
        .arg(dir.path())
        .args(["append", "account-1", "-e", "1"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(b"{\"type\":\"MoneyWithdrawn\",\"data\":{\"amount\":5}}\n{\"type\":\"MoneyDeposited\",\"data\":{\"amount\":7}}\n").unwrap();
    let o = child.wait_with_output().unwrap();
    assert!(o.status.success());
    assert!(
        stdout(&o).contains("appended 2 events") && stdout(&o).contains("version 3"),
        "{}",
        stdout(&o)
    );

    let o = cairn(dir.path(), &["--json", "read", "account-1"]);
    let lines: Vec<serde_json::Value> =
        stdout(&o).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 3);
    assert_eq!(lines[1]["type"], "MoneyWithdrawn");
    assert_eq!(lines[2]["data"]["amount"], 7);
    assert_eq!(lines[2]["version"], 3);

    let o = cairn(dir.path(), &["--json", "streams"]);
    let s: serde_json::Value = serde_json::from_str(stdout(&o).lines().next().unwrap()).unwrap();
    assert_eq!((s["stream"].as_str(), s["version"].as_u64()), (Some("account-1"), Some(3)));

    let o = cairn(dir.path(), &["verify"]);
    assert!(o.status.success() && stdout(&o).contains("3 events"), "{}", stdout(&o));
    let o = cairn(dir.path(), &["reindex"]);
    assert!(o.status.success() && stdout(&o).contains("3 events"), "{}", stdout(&o));
}

#[test]
fn errors_name_the_problem_and_what_to_do() {
    let dir = tempfile::tempdir().unwrap();
    cairn(dir.path(), &["append", "acc", "Opened", "{}"]);
    let o = cairn(dir.path(), &["append", "acc", "Opened", "-e", "no-stream"]);
    assert!(
        !o.status.success()
            && stderr(&o).contains("needs its JSON payload")
            && stderr(&o).contains("'{}'"),
        "{}",
        stderr(&o)
    );
    let o = cairn(dir.path(), &["append", "acc", "Opened", "{}", "-e", "no-stream"]);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("actual version is 1") && stderr(&o).contains("hint:"),
        "{}",
        stderr(&o)
    );

    let o = cairn(dir.path(), &["append", "acc", "X", "{oops"]);
    assert!(
        !o.status.success() && stderr(&o).contains("payload is not valid JSON"),
        "{}",
        stderr(&o)
    );

    let o = cairn(dir.path(), &["append", "$sys", "X", "{}"]);
    assert!(
        !o.status.success() && stderr(&o).contains("reserved for system streams"),
        "{}",
        stderr(&o)
    );

    let o = cairn(dir.path(), &["append", "acc", "X", "-e", "banana"]);
    assert!(
        !o.status.success()
            && stderr(&o).contains("not any, no-stream, exists or a version number"),
        "{}",
        stderr(&o)
    );

    let empty = tempfile::tempdir().unwrap();
    let o = cairn(&empty.path().join("nothing"), &["read", "acc"]);
    assert!(!o.status.success() && stderr(&o).contains("no Cairn data"), "{}", stderr(&o));

    let o = cairn(dir.path(), &["read", "acc"]);
    assert!(o.status.success(), "a failed command changed nothing: {}", stderr(&o));
    assert!(stdout(&o).contains("1 event"), "{}", stdout(&o));
}

#[test]
fn tour_runs_end_to_end() {
    let o = Command::new(env!("CARGO_BIN_EXE_cairn")).arg("tour").output().unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    assert!(!out.contains('\x1b'), "terminal escapes in output that goes to a pipe: {out}");
    assert!(out.contains("balance = 150"), "{out}");
    assert!(out.contains("teller B: rejected"), "{out}");
    assert!(out.contains("reopened: account-ada has 5 events, balance 30"), "{out}");
    // The domain half: the same account through the repository.
    assert!(
        out.contains("rejected: insufficient funds: the balance is 270.00, the withdrawal 1000.00"),
        "{out}"
    );
    assert!(out.contains("started from the snapshot of v20 and replayed only 6 events"), "{out}");
    assert!(out.contains("seen as: MoneyDeposited 40.00 USD"), "{out}");
    assert!(out.contains("/balance: real 540.00 EUR vs branch 50.00 EUR"), "{out}");
    // The tags half: the rules hold under racing.
    assert!(out.contains("30 subscribed, 10 refused"), "{out}");
    assert!(out.contains("5 accepted, 3 refused"), "{out}");
    assert!(out.contains("1 accepted, 1 refused"), "{out}");
    // The read side: consumers, lag, read models, notification vs state transfer.
    assert!(
        out.contains("analytics did 9 things") && out.contains("12 confirmations sent"),
        "{out}"
    );
    assert!(out.contains("made 3 calls back"), "{out}");
    assert!(out.contains("12 labels for 12 orders"), "the consumer group: {out}");
    // Sagas: reverse compensation, a timeout, a resumed runner, a deadline.
    assert!(
        out.contains(
            "order-3: OrderCreated, OrderCancelled | payment-3: CardCharged, CardRefunded"
        ),
        "{out}"
    );
    assert!(out.contains("charge-card timed out after 2 s"), "{out}");
    assert!(out.contains("it found 1 unfinished saga(s)"), "{out}");
    assert!(out.contains("order-6: OrderCreated, OrderCancelled"), "the deadline: {out}");
    // A process manager parks one instance, the others ship, and the resumed one ships.
    assert!(out.contains("Shipped: checkout-11, checkout-12, checkout-14"), "{out}");
    assert!(out.contains("checkout-13 needs attention: ShipOrder failed 3 times"), "{out}");
    assert!(out.contains("went on: shipped checkout-13 (key $saga-shipping-"), "{out}");
}

#[test]
fn demo_sagas_with_a_declined_payment_and_bench_w8() {
    let dir = tempfile::tempdir().unwrap();
    let keep = dir.path().join("demo");
    let o = Command::new(env!("CARGO_BIN_EXE_cairn"))
        .args(["demo", "sagas", "--payment", "decline", "--keep"])
        .arg(&keep)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    assert!(
        out.contains("charge-card failed: card declined")
            && out.contains("order-1: OrderCreated, OrderCancelled"),
        "{out}"
    );
    // What the demo left is there for `cairn sagas`.
    let o = cairn(&keep, &["sagas", "show", "order", "1"]);
    assert!(
        o.status.success() && stdout(&o).contains("compensated"),
        "{}{}",
        stdout(&o),
        stderr(&o)
    );
    let o = Command::new(env!("CARGO_BIN_EXE_cairn"))
        .args(["demo", "bank", "--payment", "hang"])
        .output()
        .unwrap();
    assert!(
        !o.status.success() && stderr(&o).contains("--payment belongs to `cairn demo sagas`"),
        "{}",
        stderr(&o)
    );

    let o = Command::new(env!("CARGO_BIN_EXE_cairn"))
        .args(["bench", "W8", "--scale", "0.05"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    assert!(
        out.starts_with("bench W8 backend=embedded sagas=500 steps=3 ")
            && out.contains("sagas_per_s="),
        "{out}"
    );
}

#[test]
fn census_counts_types_and_versions() {
    let dir = tempfile::tempdir().unwrap();
    let o = cairn(dir.path(), &["census"]);
    assert!(!o.status.success() && stderr(&o).contains("no Cairn data"), "{}", stderr(&o));
    for (stream, version) in [("a", "1"), ("b", "1"), ("c", "2")] {
        let event = format!(
            r#"{{"type": "MoneyDeposited", "data": {{"amount": 1}}, "schema_version": {version}}}"#
        );
        let o = cairn_stdin(dir.path(), &["append", stream], &event);
        assert!(o.status.success(), "{}", stderr(&o));
    }
    let o = cairn(dir.path(), &["census", "--json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let rows: Vec<serde_json::Value> =
        stdout(&o).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(rows.len(), 2, "{rows:?}");
    assert_eq!(
        (rows[0]["schema_version"].as_u64(), rows[0]["events"].as_u64()),
        (Some(1), Some(2))
    );
    assert_eq!(
        (rows[1]["schema_version"].as_u64(), rows[1]["events"].as_u64()),
        (Some(2), Some(1))
    );
    let o = cairn(dir.path(), &["census"]);
    assert!(stdout(&o).contains("66.7%"), "{}", stdout(&o));
}

#[test]
fn bench_prints_one_line_per_workload() {
    let o = Command::new(env!("CARGO_BIN_EXE_cairn"))
        .args(["bench", "W1", "W3", "--scale", "0.01"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 3, "{out}");
    assert!(
        lines[0].starts_with("bench W1 backend=embedded via=repository cache=0 events=200 ")
            && lines[0].contains("events_per_s="),
        "{out}"
    );
    assert!(
        lines[1].starts_with("bench W3 backend=embedded via=repository events=100 snapshots=none ")
            && lines[1].contains("median_ms="),
        "{out}"
    );
    assert!(lines[2].contains("snapshots=every_100") && lines[2].contains("replayed=0"), "{out}");
    let o = Command::new(env!("CARGO_BIN_EXE_cairn")).args(["bench", "W99"]).output().unwrap();
    assert!(!o.status.success() && stderr(&o).contains("unknown workload 'W99'"), "{}", stderr(&o));
    let o = Command::new(env!("CARGO_BIN_EXE_cairn"))
        .args(["--backend", "postgres", "bench", "W6"])
        .output()
        .unwrap();
    assert!(!o.status.success() && stderr(&o).contains("embedded engine only"), "{}", stderr(&o));
}

/// S1 at a toy size: every figure is printed, the SIGKILLed child's store
/// opens, and the kept store is a store.
#[test]
fn bench_s1_fills_kills_reopens_and_compares_with_an_empty_store() {
    let keep = tempfile::tempdir().unwrap();
    let dir = keep.path().join("s1");
    let o = Command::new(env!("CARGO_BIN_EXE_cairn"))
        .args(["bench", "S1", "--events", "3000", "--keep"])
        .arg(&dir)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    for figure in [
        "figure=fill events=3000 ",
        "figure=open_after_clean_stop open_secs=",
        "figure=open_after_sigkill open_secs=",
    ] {
        assert!(out.contains(figure), "{figure} missing: {out}");
    }
    for w in ["W1", "W1c", "W2", "W3", "W4", "D2"] {
        assert!(
            out.lines().any(|l| l.starts_with(&format!("bench S1 workload={w} "))
                && l.contains("ratio_vs_empty=")),
            "{w} missing: {out}"
        );
    }
    assert!(cairn(&dir, &["verify"]).status.success(), "the kept store verifies");
    // A kept store is measured again without a new fill, unless it is
    // smaller than asked (then the tags D2 reads are not all there).
    let o = Command::new(env!("CARGO_BIN_EXE_cairn"))
        .args(["bench", "S1", "--events", "10000000", "--keep"])
        .arg(&dir)
        .output()
        .unwrap();
    assert!(
        !o.status.success() && stderr(&o).contains("fewer than --events 10000000"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn bench_w9_relays_to_both_brokers_and_postgres_runs_the_append_and_server_workloads() {
    let up = |addr: &str| {
        std::net::TcpStream::connect_timeout(
            &addr.parse().unwrap(),
            std::time::Duration::from_secs(1),
        )
        .is_ok()
    };
    if !(up("127.0.0.1:4222") && up("127.0.0.1:5672") && up("127.0.0.1:5432")) {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "NATS, RabbitMQ and PostgreSQL must run under CI"
        );
        eprintln!("skipped: NATS, RabbitMQ or PostgreSQL is not reachable");
        return;
    }
    let o = Command::new(env!("CARGO_BIN_EXE_cairn"))
        .args(["bench", "W9", "--scale", "0.01"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 2, "{out}");
    assert!(
        lines[0].starts_with("bench W9 backend=embedded sink=nats events=1000 ")
            && lines[0].contains("p99_ms="),
        "{out}"
    );
    assert!(
        lines[1].starts_with("bench W9 backend=embedded sink=rabbitmq events=1000 ")
            && lines[1].contains("p99_ms="),
        "{out}"
    );
    let o = Command::new(env!("CARGO_BIN_EXE_cairn"))
        .args([
            "--backend",
            "postgres",
            "--database-url",
            "postgres://postgres@127.0.0.1:5432/test",
            "bench",
            "W1",
            "W2",
            "W4",
            "W7",
            "--scale",
            "0.01",
        ])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    assert!(
        out.contains("bench W1 backend=postgres")
            && out.contains("bench W2 backend=postgres")
            && out.contains("bench W4 backend=postgres"),
        "{out}"
    );
    // W7 checks itself that the subscriber saw every event; with two servers,
    // those appended through the second too.
    assert!(
        out.contains("bench W7 backend=postgres api=http servers=1 ")
            && out.contains("bench W7 backend=postgres api=grpc servers=1 "),
        "{out}"
    );
    assert!(
        out.lines().any(|l| l.starts_with("bench W7 backend=postgres api=http servers=2 ")
            && l.contains("sse_delivered=")),
        "{out}"
    );
}

#[test]
fn tagged_appends_and_queries() {
    let dir = tempfile::tempdir().unwrap();
    let ok = |args: &[&str]| {
        let o = cairn(dir.path(), args);
        assert!(o.status.success(), "{args:?}: {}", stderr(&o));
        stdout(&o)
    };
    ok(&["append", "course-cs101", "CourseDefined", r#"{"capacity":30}"#, "--tag", "course:cs101"]);
    ok(&[
        "append",
        "student-42",
        "StudentSubscribed",
        "{}",
        "--tag",
        "course:cs101",
        "--tag",
        "student:42",
    ]);
    ok(&[
        "append",
        "student-7",
        "StudentSubscribed",
        "{}",
        "--tag",
        "course:db",
        "--tag",
        "student:7",
    ]);
    let table = ok(&["query", "--tag", "course:cs101"]);
    assert!(
        table.contains("course:cs101 student:42") && table.contains("2 events"),
        "tags are shown: {table}"
    );
    let json = ok(&["--json", "query", "--type", "StudentSubscribed", "--tag", "course:cs101"]);
    let lines: Vec<serde_json::Value> =
        json.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 1);
    assert_eq!(lines[0]["stream"], "student-42");
    assert_eq!(lines[0]["tags"], serde_json::json!(["course:cs101", "student:42"]));
    let back = ok(&["--json", "query", "--type", "StudentSubscribed", "--backward", "-n", "1"]);
    assert!(back.contains("student-7") && back.lines().count() == 1, "{back}");
    let o = cairn(dir.path(), &["append", "x", "T", "{}", "--tag", ""]);
    assert!(!o.status.success() && stderr(&o).contains("a tag cannot be empty"), "{}", stderr(&o));
}

#[test]
fn bench_dcb_workloads_print_their_lines() {
    let o = Command::new(env!("CARGO_BIN_EXE_cairn"))
        .args(["bench", "D1", "D2", "--scale", "0.01"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 3, "{out}");
    assert!(lines[0].starts_with("bench D1 backend=embedded condition=none events=192 "), "{out}");
    assert!(
        lines[1].starts_with("bench D1 backend=embedded condition=own_tag ")
            && lines[1].contains("ratio_vs_unconditional="),
        "{out}"
    );
    assert!(
        lines[2].starts_with("bench D2 backend=embedded ")
            && lines[2].contains("matches=100 ")
            && lines[2].contains(" ms="),
        "{out}"
    );
}

#[test]
fn bench_read_side_workloads_print_their_lines() {
    let o = Command::new(env!("CARGO_BIN_EXE_cairn"))
        .args(["bench", "W6", "W5", "--scale", "0.01"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 4, "{out}");
    assert!(
        lines[0].starts_with("bench W6 backend=embedded model=memory events=10000 ")
            && lines[0].contains("events_per_s="),
        "{out}"
    );
    assert!(lines[1].starts_with("bench W6 backend=embedded model=sqlite events=10000 "), "{out}");
    assert!(
        lines[3].starts_with("bench W5 backend=embedded target=projection model=memory events=")
            && lines[3].contains("p99_us="),
        "{out}"
    );
}

#[test]
fn orders_demo_runs_every_consumer_and_the_query_side() {
    let o = Command::new(env!("CARGO_BIN_EXE_cairn")).args(["demo", "orders"]).output().unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    for consumer in ["payment", "email", "inventory", "shipping", "analytics"] {
        assert!(out.contains(&format!("{consumer:<9} did 9 things")), "{consumer}: {out}");
    }
    assert!(out.contains("Paused") && out.contains("3 events"), "the paused consumer's lag: {out}");
    assert!(out.contains("12 confirmations sent"), "{out}");
    assert!(out.contains("orders of customer ada (6 rows"), "{out}");
    assert!(
        out.contains("account-shop-ada (1200.00 EUR), account-shop-grace (300.00 EUR)")
            && !out.contains("account-shop-alan ("),
        "{out}"
    );
    assert!(out.contains("made 3 calls back") && out.contains("0 calls back"), "{out}");
    assert!(out.contains("PlaceOrder is invalid: invalid quantity"), "{out}");
}

#[test]
fn operators_see_and_steer_the_read_side_of_a_kept_demo() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("demo");
    let o = Command::new(env!("CARGO_BIN_EXE_cairn"))
        .args(["demo", "orders", "--keep"])
        .arg(&data)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stdout(&o).contains("1 parked order replayed → 12 labels for 12 orders, 12 acks"),
        "{}",
        stdout(&o)
    );
    // The same directory twice is refused, not mixed.
    let again = Command::new(env!("CARGO_BIN_EXE_cairn"))
        .args(["demo", "orders", "--keep"])
        .arg(&data)
        .output()
        .unwrap();
    assert!(
        !again.status.success() && stderr(&again).contains("already holds a Cairn store"),
        "{}",
        stderr(&again)
    );

    let status = cairn(&data, &["projections", "status"]);
    assert!(status.status.success(), "{}", stderr(&status));
    let table = stdout(&status);
    for want in [
        "balances",
        "orders_by_customer",
        "category account",
        "category order",
        "2 projections in 2 read model files",
    ] {
        assert!(table.contains(want), "{want}: {table}");
    }
    assert!(!table.contains("UNHEALTHY") && !table.contains("paused"), "{table}");

    let paused = cairn(&data, &["projections", "pause", "balances"]);
    assert!(paused.status.success(), "{}", stderr(&paused));
    let json = stdout(&cairn(&data, &["--json", "projections", "status"]));
    let rows: Vec<serde_json::Value> =
        json.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let balances = rows.iter().find(|r| r["projection"] == "balances").unwrap();
    assert_eq!(
        (balances["paused"].as_bool(), balances["behind_events"].as_u64()),
        (Some(true), Some(0)),
        "{json}"
    );
    let orders = rows.iter().find(|r| r["projection"] == "orders_by_customer").unwrap();
    assert_eq!(orders["paused"].as_bool(), Some(false));

    let unknown = cairn(&data, &["projections", "reset", "nope"]);
    assert!(
        !unknown.status.success() && stderr(&unknown).contains("no projection named 'nope'"),
        "{}",
        stderr(&unknown)
    );

    let groups = stdout(&cairn(&data, &["groups", "status"]));
    assert!(groups.contains("shipping-labels") && groups.contains("1 consumer group"), "{groups}");
    let parked = stdout(&cairn(&data, &["groups", "parked", "shipping-labels"]));
    assert!(parked.contains("no events parked"), "the demo replayed its parked order: {parked}");
    let none = cairn(&data, &["groups", "replay", "nope"]);
    assert!(
        !none.status.success() && stderr(&none).contains("groups: shipping-labels"),
        "{}",
        stderr(&none)
    );
}

#[test]
fn serve_answers_the_cli_over_url_and_stops_on_sigterm_even_with_requests_held_open() {
    use std::io::{BufRead, BufReader};
    use std::time::Duration;
    let dir = tempfile::tempdir().unwrap();
    let refused = cairn(dir.path(), &["serve", "--listen", "0.0.0.0:8720"]);
    assert!(
        !refused.status.success() && stderr(&refused).contains("without authentication"),
        "{}",
        stderr(&refused)
    );

    let mut server = Command::new(env!("CARGO_BIN_EXE_cairn"))
        .arg("--data")
        .arg(dir.path())
        .args(["serve", "--listen", "127.0.0.1:0"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(server.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    let url = line
        .split_whitespace()
        .find(|w| w.starts_with("http://"))
        .expect("the server prints its URL")
        .to_string();

    let remote = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_cairn")).args(["--url", &url]).args(args).output().unwrap()
    };
    let appended = remote(&["append", "order-1", "OrderPlaced", r#"{"total": 12}"#]);
    assert!(appended.status.success(), "{}", stderr(&appended));
    let conflict = remote(&["append", "order-1", "OrderPaid", "{}", "-e", "7"]);
    assert!(
        !conflict.status.success() && stderr(&conflict).contains("actual version is 1"),
        "{}",
        stderr(&conflict)
    );
    let read = remote(&["--json", "read", "order-1"]);
    let event: serde_json::Value =
        serde_json::from_str(stdout(&read).lines().next().unwrap()).unwrap();
    assert_eq!(
        (event["type"].as_str(), event["data"]["total"].as_u64()),
        (Some("OrderPlaced"), Some(12))
    );
    let verify = remote(&["verify"]);
    assert!(
        !verify.status.success() && stderr(&verify).contains("not through a server"),
        "{}",
        stderr(&verify)
    );

    // Two clients that never finish: half a request head, and a body that
    // trickles a byte every 200 ms (no read timeout ever fires for it). The
    // stop must not wait for them past its grace (10 s).
    let addr = url.trim_start_matches("http://").trim_end_matches('/').to_string();
    let mut half_head = std::net::TcpStream::connect(&addr).unwrap();
    half_head.write_all(b"POST /streams/order-2 HTTP/1.1\r\nHost: x\r\n").unwrap();
    let trickling = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let trickler = {
        let (addr, trickling) = (addr.clone(), trickling.clone());
        std::thread::spawn(move || {
            let mut s = std::net::TcpStream::connect(&addr).unwrap();
            s.write_all(b"POST /streams/order-3 HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 1000000\r\n\r\n{").unwrap();
            while trickling.load(std::sync::atomic::Ordering::Relaxed) && s.write_all(b" ").is_ok()
            {
                std::thread::sleep(Duration::from_millis(200));
            }
        })
    };
    std::thread::sleep(Duration::from_millis(500));
    Command::new("kill").args(["-TERM", &server.id().to_string()]).status().unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(status) = server.try_wait().unwrap() {
            break status;
        }
        if std::time::Instant::now() > deadline {
            let _ = server.kill();
            panic!(
                "SIGTERM did not stop the server within 60 s while two clients held requests open"
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    trickling.store(false, std::sync::atomic::Ordering::Relaxed);
    trickler.join().unwrap();
    drop(half_head);
    assert!(status.success(), "a graceful stop exits 0: {status:?}");
    // What it acknowledged is in the data directory; the unfinished appends wrote nothing.
    let local = cairn(dir.path(), &["--json", "read", "order-1"]);
    assert!(stdout(&local).contains("OrderPlaced"), "{}", stdout(&local));
    let streams = stdout(&cairn(dir.path(), &["streams"]));
    assert!(!streams.contains("order-2") && !streams.contains("order-3"), "{streams}");
}

#[test]
fn a_served_store_with_keys_refuses_requests_without_one() {
    use std::io::{BufRead, BufReader};
    let dir = tempfile::tempdir().unwrap();
    let added = cairn(dir.path(), &["keys", "add", "ops", "--role", "admin"]);
    assert!(added.status.success(), "{}", stderr(&added));
    let key = stdout(&added).trim().to_string();
    assert!(key.starts_with("cairn_ops_"), "{key}");
    let listed = stdout(&cairn(dir.path(), &["keys", "list"]));
    assert!(
        listed.contains("ops") && listed.contains("admin") && !listed.contains(&key[10..]),
        "{listed}"
    );

    let mut server = Command::new(env!("CARGO_BIN_EXE_cairn"))
        .arg("--data")
        .arg(dir.path())
        .args(["serve", "--listen", "127.0.0.1:0"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(server.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    let url = line.split_whitespace().find(|w| w.starts_with("http://")).unwrap().to_string();
    let without = Command::new(env!("CARGO_BIN_EXE_cairn"))
        .args(["--url", &url, "streams"])
        .output()
        .unwrap();
    assert!(
        !without.status.success()
            && stderr(&without).contains("needs an API key")
            && stderr(&without).contains("--api-key"),
        "{}",
        stderr(&without)
    );
    let with = Command::new(env!("CARGO_BIN_EXE_cairn"))
        .args(["--url", &url, "append", "a-1", "X", "{}"])
        .env("CAIRN_API_KEY", &key)
        .output()
        .unwrap();
    assert!(with.status.success(), "{}", stderr(&with));
    server.kill().unwrap();
    let _ = server.wait();
}

#[test]
fn serve_reads_a_config_file_and_flags_win_over_it() {
    use std::io::{BufRead, BufReader};
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("cairn.toml");
    std::fs::write(
        &config,
        "listen = \"127.0.0.1:1\"\ndata = \"from-config\"\nbody_limit = 1024\n",
    )
    .unwrap();
    let mut server = Command::new(env!("CARGO_BIN_EXE_cairn"))
        .args(["serve", "--config"])
        .arg(&config)
        .args(["--listen", "127.0.0.1:0"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(server.stdout.take().unwrap()).read_line(&mut line).unwrap();
    server.kill().unwrap();
    let _ = server.wait();
    assert!(
        !line.contains("127.0.0.1:1 ") && line.contains("http://127.0.0.1:"),
        "the flag's address wins: {line}"
    );
    assert!(
        line.contains("from-config") && dir.path().join("from-config").join("log").is_dir(),
        "the file's data directory is used: {line}"
    );

    std::fs::write(&config, "listen = \"127.0.0.1:0\"\nport = 8\n").unwrap();
    let bad = Command::new(env!("CARGO_BIN_EXE_cairn"))
        .args(["serve", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert!(
        !bad.status.success() && stderr(&bad).contains("unknown field `port`"),
        "{}",
        stderr(&bad)
    );
}

#[test]
fn bench_w7_prints_a_line_per_api() {
    let o = Command::new(env!("CARGO_BIN_EXE_cairn"))
        .args(["bench", "W7", "--scale", "0.02"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    for api in ["api=http ", "api=http-client ", "api=grpc "] {
        let line =
            out.lines().find(|l| l.contains(api)).unwrap_or_else(|| panic!("no {api} line: {out}"));
        assert!(
            line.starts_with("bench W7 backend=embedded")
                && line.contains("events_per_s=")
                && line.contains("sse_delivered="),
            "{line}"
        );
    }
}

/// `--client-process`: every line comes from a child process that really
/// appended, streamed or read through the server, with the server's CPU.
#[test]
fn bench_w7_client_process_prints_every_line() {
    let o = Command::new(env!("CARGO_BIN_EXE_cairn"))
        .args(["bench", "W7", "--client-process", "--scale", "0.04"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    for run in [
        "api=grpc mode=append tasks=1 ",
        "api=grpc mode=append tasks=16 ",
        "api=grpc mode=append tasks=64 ",
        "api=http mode=append tasks=1 ",
        "api=http mode=append tasks=16 ",
        "api=http mode=append tasks=64 ",
        "api=grpc mode=stream tasks=1 ",
        "api=grpc mode=read tasks=16 ",
        "api=http mode=read tasks=16 ",
    ] {
        let line =
            out.lines().find(|l| l.contains(run)).unwrap_or_else(|| panic!("no {run} line: {out}"));
        let field = |k: &str| {
            line.split_whitespace()
                .find_map(|kv| kv.strip_prefix(k)?.strip_prefix('=')?.parse::<f64>().ok())
                .unwrap_or_else(|| panic!("no {k} in {line}"))
        };
        assert!(field("events") > 0.0 && field("p999_us") >= field("p50_us"), "{line}");
        if run.contains("append") || run.contains("stream") {
            assert!(
                field("appends_per_fsync") >= 1.0 && field("server_cpu_us_per_append") > 0.0,
                "{line}"
            );
        }
    }
}

/// Started with a low soft limit on open files (1,024 is common), `cairn
/// serve` raises it to the hard limit, so that idle connections cannot use
/// up the descriptors a segment roll needs, and says so with the cap it
/// derived from it.
#[test]
fn serve_raises_a_low_open_file_limit_and_caps_connections_below_it() {
    use std::io::{BufRead, BufReader};
    let hard: u64 =
        String::from_utf8(Command::new("sh").args(["-c", "ulimit -Hn"]).output().unwrap().stdout)
            .unwrap()
            .trim()
            .parse()
            .unwrap_or(0);
    if hard <= 512 {
        eprintln!(
            "skipped: the hard open-file limit here is {hard}, nothing to raise a 256 soft limit to"
        );
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let script = format!(
        "ulimit -Sn 256 && exec {} --data {} serve --listen 127.0.0.1:0",
        env!("CARGO_BIN_EXE_cairn"),
        dir.path().display()
    );
    let mut server = Command::new("sh")
        .args(["-c", &script])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let out = BufReader::new(server.stdout.take().unwrap());
    let line = out
        .lines()
        .map_while(Result::ok)
        .take(20)
        .find(|l| l.contains("connections"))
        .unwrap_or_default();
    server.kill().unwrap();
    let _ = server.wait();
    assert!(line.contains(&format!("open-file limit raised from 256 to {hard}")), "{line}");
    let cap: u64 = line
        .rsplit("at most ")
        .next()
        .and_then(|s| s.split_whitespace().next())
        .and_then(|n| n.replace(',', "").parse().ok())
        .unwrap();
    assert!(cap > 0 && cap < hard, "{line}");
}

/// The code blocks of one README section, of one language, joined.
fn readme_blocks(section: &str, language: &str) -> String {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
    let heading = format!("\n## {section}\n");
    let body = readme.split(&heading).nth(1).unwrap_or_else(|| panic!("no section {section:?}"));
    let body = body.split("\n## ").next().unwrap();
    let fence = format!("```{language}\n");
    body.split(&fence).skip(1).map(|b| b.split("```").next().unwrap()).collect()
}

/// "Use Cairn in your service" as a newcomer follows it: a new project
/// outside this workspace, the README's dependency lines and main.rs, then
/// `cargo run`, twice (the data directory stays between runs).
#[test]
fn the_readme_way_in_builds_and_runs_in_a_project_of_its_own() {
    let root =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..").canonicalize().unwrap();
    let project = tempfile::tempdir().unwrap();
    let dependencies = readme_blocks("Use Cairn in your service", "toml")
        .replace("/path/to/cairn", root.to_str().unwrap());
    let manifest = format!(
        "[package]\nname = \"my-service\"\nversion = \"0.1.0\"\nedition = \"2024\"\n\n{dependencies}\n[workspace]\n"
    );
    std::fs::write(project.path().join("Cargo.toml"), manifest).unwrap();
    std::fs::create_dir(project.path().join("src")).unwrap();
    std::fs::write(
        project.path().join("src/main.rs"),
        readme_blocks("Use Cairn in your service", "rust"),
    )
    .unwrap();
    // The workspace's versions of everything, so that nothing new is fetched.
    std::fs::copy(root.join("Cargo.lock"), project.path().join("Cargo.lock")).unwrap();
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    // A target directory of its own (this run's holds cargo's lock), kept for the next run.
    let target = root.join("target/readme-way-in");
    for run in 1..=2 {
        let o = Command::new(&cargo)
            .args(["run", "--quiet"])
            .current_dir(project.path())
            .env("CARGO_TARGET_DIR", &target)
            .output()
            .unwrap();
        assert!(o.status.success(), "run {run}: {}", stderr(&o));
        let out = stdout(&o);
        assert!(out.contains(&format!("appended: version {run} at position")), "run {run}: {out}");
        assert_eq!(out.matches("MoneyDeposited {\"amount\":125}").count(), run, "run {run}: {out}");
    }
}

/// `tail --from N` starts where `read --from N` does (inclusive), and
/// `metadata --max-age` takes a duration as well as seconds.
#[test]
fn tail_from_is_inclusive_like_read_and_max_age_takes_durations() {
    let dir = tempfile::tempdir().unwrap();
    for n in 1..=3 {
        let o = cairn(dir.path(), &["append", "acc-1", "Counted", &format!("{{\"n\": {n}}}")]);
        assert!(o.status.success(), "{}", stderr(&o));
    }
    let versions = |o: &Output| -> Vec<u64> {
        stdout(o)
            .lines()
            .map(|l| {
                serde_json::from_str::<serde_json::Value>(l).unwrap()["version"].as_u64().unwrap()
            })
            .collect()
    };
    let read = cairn(dir.path(), &["--json", "read", "acc-1", "--from", "2"]);
    let tail = cairn(dir.path(), &["--json", "tail", "acc-1", "--from", "2", "-n", "2"]);
    assert!(tail.status.success(), "{}", stderr(&tail));
    assert_eq!(versions(&read), vec![2, 3]);
    assert_eq!(versions(&tail), versions(&read));

    let o = cairn(dir.path(), &["--json", "metadata", "acc-1", "--max-age", "7d"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).contains("604800"), "{}", stdout(&o));
    let o = cairn(dir.path(), &["metadata", "acc-1", "--max-age", "a week"]);
    assert!(!o.status.success() && stderr(&o).contains("such as 90s, 12h, 7d"), "{}", stderr(&o));
}

#[test]
fn completions_are_printed_for_each_shell() {
    let dir = tempfile::tempdir().unwrap();
    for (shell, mark) in
        [("bash", "_cairn()"), ("zsh", "#compdef cairn"), ("fish", "complete -c cairn")]
    {
        let o = cairn(dir.path(), &["completions", shell]);
        assert!(o.status.success(), "{shell}: {}", stderr(&o));
        let script = stdout(&o);
        assert!(script.contains(mark) && script.contains("read-all"), "{shell}: {script}");
    }
    let o = cairn(dir.path(), &["completions", "tcsh"]);
    assert!(!o.status.success() && stderr(&o).contains("possible values"), "{}", stderr(&o));
}
