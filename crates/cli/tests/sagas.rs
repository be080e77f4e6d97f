//! `cairn sagas` on histories a real saga runner wrote: the table and its
//! filters, one saga's steps and timeline, errors that say what to do next,
//! and resume: refused (with nothing written) unless the saga is parked, and
//! through a server for a parked one, which the next runner then finishes.
//! And on what a real process manager wrote: `cairn sagas processes` and
//! `cairn sagas show` on one of its instances.

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use cairn_core::{
    EventStore, ExpectedVersion, Metadata, NewEvent, Query, QueryItem, ReadStreamOptions,
};
use cairn_log::EmbeddedStore;
use cairn_saga::{
    Effect, Message, Process, ProcessManager, RetryPolicy, Saga, SagaRunner, Status, Step,
    StepError,
};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use uuid::Uuid;

fn cairn(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_cairn"))
        .arg("--data")
        .arg(dir)
        .args(args)
        .output()
        .expect("run cairn")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A step that fails when the input's `fail` names it, and whose
/// compensation fails while `down` is set (when given).
fn step(name: &'static str, down: Option<Arc<AtomicBool>>) -> Step {
    Step::new(name, move |ctx| async move {
        let input: Value = ctx.input()?;
        if input["fail"] == name {
            return Err(StepError::new(input["why"].as_str().unwrap_or("refused")));
        }
        Ok(json!({ "step": name }))
    })
    .compensate(move |_ctx| {
        let down = down.clone();
        async move {
            if down.is_some_and(|d| d.load(Ordering::SeqCst)) {
                return Err(StepError::new("payments service down"));
            }
            Ok(())
        }
    })
}

fn order_saga(payments_down: &Arc<AtomicBool>) -> Saga {
    Saga::new("order")
        .step(step("create-order", None))
        .step(step("charge-card", Some(payments_down.clone())))
        .step(step("reserve-items", None))
        .retry(RetryPolicy {
            attempts: 2,
            backoff: Duration::from_millis(1),
            max_backoff: Duration::from_millis(1),
        })
}

fn signup_saga() -> Saga {
    Saga::new("signup")
        .step(step("create-user", None))
        .step(Step::new("send-welcome", |_ctx| async { Ok(json!(null)) }).cannot_be_undone())
        .step(step("grant-trial", None))
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap()
}

/// Runs five sagas to their ends in `dir`: order 1 completes, order 2 is
/// compensated (card declined), order 3 is parked (its charge cannot be
/// refunded), signup u-7 is compensated around a step that cannot be undone.
fn make_sagas(dir: &Path) {
    runtime().block_on(async {
        let store: Arc<dyn EventStore> = Arc::new(EmbeddedStore::open(dir).unwrap());
        let down = Arc::new(AtomicBool::new(true));
        let runner = SagaRunner::builder(store.clone(), "shop")
            .saga(order_saga(&down))
            .saga(signup_saga())
            .run()
            .await
            .unwrap();
        let cases = [
            ("order", "1", json!({"customer": "ada"})),
            ("order", "2", json!({"fail": "charge-card", "why": "card declined"})),
            ("order", "3", json!({"fail": "reserve-items", "why": "out of stock"})),
            ("signup", "u-7", json!({"fail": "grant-trial", "why": "no trials left"})),
        ];
        for (saga, id, input) in &cases {
            runner.start(saga, id, input).await.unwrap();
            runner.wait(saga, id).await.unwrap();
        }
        runner.shutdown().await;
    });
}

#[test]
fn list_and_show_tell_where_each_saga_is_and_why() {
    let dir = tempfile::tempdir().unwrap();
    make_sagas(dir.path());

    let list = cairn(dir.path(), &["sagas", "list"]);
    assert!(list.status.success(), "{}", stderr(&list));
    let text = stdout(&list);
    assert!(text.contains("4 sagas: 1 needs attention, 2 compensated, 1 completed"), "{text}");
    for expected in [
        "charge-card failed: card declined",
        "reserve-items failed: out of stock; undo: payments service down",
        "undo charge-card",
        "2/3, 0/2 undone",
    ] {
        assert!(text.contains(expected), "{expected:?} in {text}");
    }
    assert!(
        text.contains("`cairn sagas resume order 3`"),
        "the parked saga's next step is named: {text}"
    );
    assert!(!text.contains("shop"), "the runner's checkpoint ($saga-shop) is no saga: {text}");

    let parked = stdout(&cairn(dir.path(), &["sagas", "list", "--status", "needs-attention"]));
    assert!(
        parked.contains("1 saga needs attention")
            && parked.contains("undo charge-card")
            && !parked.contains("declined"),
        "{parked}"
    );
    let none = stdout(&cairn(dir.path(), &["sagas", "list", "--status", "running"]));
    assert!(none.contains("no sagas running in this store"), "{none}");

    let json = stdout(&cairn(dir.path(), &["--json", "sagas", "list", "--saga", "order"]));
    let rows: Vec<Value> = json.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let mut ids: Vec<&str> = rows.iter().map(|r| r["id"].as_str().unwrap()).collect();
    ids.sort();
    assert_eq!(ids, ["1", "2", "3"], "{json}");
    let three = rows.iter().find(|r| r["id"] == "3").unwrap();
    assert_eq!(
        (three["status"].as_str(), three["step"].as_str(), three["attempts"].as_u64()),
        (Some("needs_attention"), Some("undo charge-card"), Some(2))
    );
    assert_eq!(three["undo"], json!(["charge-card", "create-order"]));

    let show = cairn(dir.path(), &["sagas", "show", "order", "2"]);
    assert!(show.status.success(), "{}", stderr(&show));
    let text = stdout(&show);
    assert!(text.starts_with("saga order 2 — compensated"), "{text}");
    assert!(
        text.contains("create-order ✓↩ → charge-card ✗ → reserve-items ·"),
        "the step pipeline: {text}"
    );
    assert!(text.contains("reason   charge-card failed: card declined"), "{text}");
    let timeline: Vec<&str> = text.lines().skip_while(|l| *l != "timeline").skip(1).collect();
    // "   +12 ms  ✓ create-order done": the offset, two spaces, the mark and the line.
    let marks_and_lines: Vec<&str> = timeline
        .iter()
        .map(|l| l.trim_start().split_once("  ").expect("offset, then the line").1)
        .collect();
    assert_eq!(
        marks_and_lines,
        [
            "▶ started order: create-order → charge-card → reserve-items",
            "✓ create-order done: {\"step\":\"create-order\"}",
            "✗ charge-card failed: card declined",
            "↩ compensating: create-order",
            "↩ create-order undone",
            "↩ compensated",
        ],
        "{text}"
    );
    assert!(
        timeline.iter().all(|l| l.trim_start().starts_with('+')),
        "each line has its offset from the start: {text}"
    );

    let parked = stdout(&cairn(dir.path(), &["sagas", "show", "order", "3"]));
    assert!(parked.contains("create-order ✓ → charge-card ✓↩✗ → reserve-items ✗"), "{parked}");
    assert!(
        parked.contains("problem  undoing charge-card failed: payments service down"),
        "{parked}"
    );
    assert!(
        parked.contains("✗ undoing charge-card failed (attempt 2): payments service down"),
        "{parked}"
    );
    assert!(parked.contains("! needs attention: undoing charge-card failed 2 times"), "{parked}");
    assert!(parked.contains("`cairn sagas resume order 3`"), "{parked}");

    let signup = stdout(&cairn(dir.path(), &["sagas", "show", "signup", "u-7"]));
    assert!(signup.contains("create-user ✓↩ → send-welcome ✓ kept → grant-trial ✗"), "{signup}");
    assert!(
        signup.contains("compensating: create-user (cannot be undone, skipped: send-welcome)"),
        "{signup}"
    );

    let json = stdout(&cairn(dir.path(), &["--json", "sagas", "show", "order", "2"]));
    let shown: Value = serde_json::from_str(json.trim()).unwrap();
    assert_eq!(shown["status"], "compensated");
    assert_eq!(shown["timeline"].as_array().unwrap().len(), 6);
    assert_eq!(shown["timeline"][2]["type"], "StepFailed");
    assert_eq!(shown["pipeline"][1], json!({"step": "charge-card", "mark": "✗"}));

    // A reader that goes away early is no error.
    let mut child = Command::new(env!("CARGO_BIN_EXE_cairn"))
        .arg("--data")
        .arg(dir.path())
        .args(["sagas", "show", "order", "3"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    assert!(!stderr(&out).contains("panicked"), "{}", stderr(&out));
}

#[test]
fn unknown_sagas_and_resuming_a_saga_that_is_not_parked_say_what_to_do() {
    let dir = tempfile::tempdir().unwrap();
    make_sagas(dir.path());

    let unknown_id = cairn(dir.path(), &["sagas", "show", "order", "99"]);
    assert!(!unknown_id.status.success());
    assert!(
        stderr(&unknown_id).contains("no saga 'order' with id '99'")
            && stderr(&unknown_id).contains("`cairn sagas list --saga order`"),
        "{}",
        stderr(&unknown_id)
    );
    let unknown_type = cairn(dir.path(), &["sagas", "resume", "invoice", "1"]);
    assert!(!unknown_type.status.success());
    assert!(
        stderr(&unknown_type).contains("no saga of type 'invoice'")
            && stderr(&unknown_type).contains("`cairn sagas list`"),
        "{}",
        stderr(&unknown_type)
    );
    let checkpoint = cairn(dir.path(), &["sagas", "show", "shop", "x"]);
    assert!(
        !checkpoint.status.success() && stderr(&checkpoint).contains("no saga of type 'shop'"),
        "{}",
        stderr(&checkpoint)
    );

    let versions = |dir: &Path| -> Vec<(String, u64)> {
        let o = cairn(dir, &["--json", "streams", "--prefix", "$saga-"]);
        stdout(&o)
            .lines()
            .map(|l| serde_json::from_str::<Value>(l).unwrap())
            .map(|s| (s["stream"].as_str().unwrap().to_string(), s["version"].as_u64().unwrap()))
            .collect()
    };
    let before = versions(dir.path());
    assert_eq!(before.len(), 5, "four sagas and the runner's checkpoint: {before:?}");
    for (id, status) in [("1", "completed"), ("2", "compensated")] {
        let refused = cairn(dir.path(), &["sagas", "resume", "order", id]);
        assert!(!refused.status.success());
        let message = stderr(&refused);
        assert!(
            message.contains(&format!(
                "saga order {id} is {status}, not waiting for attention: nothing to resume"
            )),
            "{message}"
        );
        assert!(message.contains("--status needs-attention"), "{message}");
    }
    assert_eq!(versions(dir.path()), before, "nothing was written");
}

#[test]
fn a_parked_saga_resumed_through_a_server_is_finished_by_the_next_runner() {
    use std::io::{BufRead, BufReader};
    let dir = tempfile::tempdir().unwrap();
    make_sagas(dir.path());

    let mut server = Command::new(env!("CARGO_BIN_EXE_cairn"))
        .arg("--data")
        .arg(dir.path())
        .args(["serve", "--listen", "127.0.0.1:0"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(server.stdout.take().unwrap()).read_line(&mut line).unwrap();
    let url = line
        .split_whitespace()
        .find(|w| w.starts_with("http://"))
        .expect("the server prints its URL")
        .to_string();
    let remote = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_cairn")).args(["--url", &url]).args(args).output().unwrap()
    };

    let list = remote(&["sagas", "list", "--status", "needs-attention"]);
    assert!(
        list.status.success() && stdout(&list).contains("1 saga needs attention"),
        "{} {}",
        stdout(&list),
        stderr(&list)
    );
    let resumed = remote(&["sagas", "resume", "order", "3", "--by", "ops-tester"]);
    assert!(resumed.status.success(), "{}", stderr(&resumed));
    assert!(stdout(&resumed).contains("resumed saga order 3 (by ops-tester): its runner retries undoing charge-card, then create-order"), "{}", stdout(&resumed));
    let again = remote(&["sagas", "resume", "order", "3"]);
    assert!(
        !again.status.success()
            && stderr(&again).contains("is compensating, not waiting for attention"),
        "{}",
        stderr(&again)
    );
    let show = remote(&["sagas", "show", "order", "3"]);
    assert!(
        stdout(&show).contains("▶ resumed by ops-tester")
            && stdout(&show).contains("now      undoing charge-card"),
        "{}",
        stdout(&show)
    );

    Command::new("kill").args(["-TERM", &server.id().to_string()]).status().unwrap();
    assert!(server.wait().unwrap().success());

    // The payments service is back: the shop's next runner finishes the saga.
    runtime().block_on(async {
        let store: Arc<dyn EventStore> = Arc::new(EmbeddedStore::open(dir.path()).unwrap());
        let runner = SagaRunner::builder(store.clone(), "shop")
            .saga(order_saga(&Arc::new(AtomicBool::new(false))))
            .run()
            .await
            .unwrap();
        let state = tokio::time::timeout(Duration::from_secs(20), runner.wait("order", "3"))
            .await
            .expect("finished in time")
            .unwrap();
        assert_eq!(state.status, Status::Compensated);
        runner.shutdown().await;
        let events =
            store.read_stream("$saga-order-3", ReadStreamOptions::forward()).await.unwrap();
        assert_eq!(events.last().unwrap().event_type, "SagaCompensated");
    });
    let list = stdout(&cairn(dir.path(), &["sagas", "list", "--saga", "order"]));
    assert!(list.contains("3 sagas of type 'order': 2 compensated, 1 completed"), "{list}");
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Fulfilment {
    order: Option<String>,
    paid: bool,
}

/// Ships an order once it is placed and paid (in either order); an order
/// unpaid when its payment window (`window_ms` in `OrderPlaced`) closes is
/// cancelled.
struct OrderFulfilment;

impl Process for OrderFulfilment {
    type State = Fulfilment;

    fn name(&self) -> &str {
        "fulfilment"
    }

    fn query(&self) -> Query {
        Query::new([
            QueryItem::types(["OrderPlaced"]).with_categories(["order"]),
            QueryItem::types(["PaymentReceived"]).with_categories(["payment"]),
        ])
    }

    fn react(&self, state: &mut Fulfilment, message: Message) -> Vec<Effect> {
        let ship = |state: &Fulfilment| {
            vec![Effect::command("ShipOrder", json!({ "order": state.order })), Effect::End]
        };
        match message {
            Message::Event(e) if e.event_type == "OrderPlaced" => {
                state.order = Some(e.stream.clone());
                let window = e.json::<Value>().unwrap()["window_ms"].as_u64().unwrap();
                if state.paid {
                    ship(state)
                } else {
                    vec![Effect::deadline("payment", Duration::from_millis(window))]
                }
            }
            Message::Event(e) if e.event_type == "PaymentReceived" => {
                state.paid = true;
                if state.order.is_some() { ship(state) } else { Vec::new() }
            }
            Message::Deadline { name } if name == "payment" && !state.paid => {
                vec![Effect::command("CancelOrder", json!({ "order": state.order })), Effect::End]
            }
            _ => Vec::new(),
        }
    }
}

/// The instances `make_processes` leaves behind, by what happened to them.
struct Instances {
    shipped: Uuid,
    cancelled: Uuid,
    waiting: Uuid,
    paid_first: Uuid,
}

/// Runs the fulfilment process in `dir` until: `shipped` was placed and paid
/// (ended), `cancelled` missed its 200 ms payment window (ended), `waiting`
/// was placed with an hour to pay (running, a deadline pending), and
/// `paid_first` was paid but not placed (running); then shuts it down.
fn make_processes(dir: &Path) -> Instances {
    let ids = Instances {
        shipped: Uuid::now_v7(),
        cancelled: Uuid::now_v7(),
        waiting: Uuid::now_v7(),
        paid_first: Uuid::now_v7(),
    };
    runtime().block_on(async {
        let store: Arc<dyn EventStore> = Arc::new(EmbeddedStore::open(dir).unwrap());
        let manager = ProcessManager::builder(store.clone(), OrderFulfilment, |_command| async {
            Ok::<(), String>(())
        })
        .start()
        .await
        .unwrap();
        let emit = async |stream: &str, event_type: &str, data: Value, correlation: Uuid| {
            let metadata = Metadata { correlation_id: Some(correlation), ..Metadata::default() };
            store
                .append(
                    stream,
                    ExpectedVersion::Any,
                    vec![NewEvent::json(event_type, &data).unwrap().with_metadata(metadata)],
                )
                .await
                .unwrap();
        };
        emit("order-1", "OrderPlaced", json!({"window_ms": 3_600_000}), ids.shipped).await;
        emit("order-2", "OrderPlaced", json!({"window_ms": 200}), ids.cancelled).await;
        emit("order-3", "OrderPlaced", json!({"window_ms": 3_600_000}), ids.waiting).await;
        emit("payment-1", "PaymentReceived", json!({}), ids.shipped).await;
        emit("payment-4", "PaymentReceived", json!({}), ids.paid_first).await;
        let expected = [
            (ids.shipped, 2, true),
            (ids.cancelled, 2, true),
            (ids.waiting, 1, false),
            (ids.paid_first, 1, false),
        ];
        let start = std::time::Instant::now();
        for (id, version, ended) in expected {
            loop {
                let instance = manager.instance(&id.to_string()).await.unwrap();
                if instance.is_some_and(|i| i.version == version && i.ended == ended) {
                    break;
                }
                assert!(
                    start.elapsed() < Duration::from_secs(10),
                    "instance {id} did not reach version {version}: {:?}",
                    manager.last_error()
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        manager.shutdown().await;
    });
    ids
}

#[test]
fn process_instances_are_listed_and_shown_apart_from_sagas() {
    let dir = tempfile::tempdir().unwrap();
    make_sagas(dir.path());
    let ids = make_processes(dir.path());

    let processes = cairn(dir.path(), &["sagas", "processes"]);
    assert!(processes.status.success(), "{}", stderr(&processes));
    let text = stdout(&processes);
    assert!(text.contains("4 process instances: 2 running, 2 ended"), "{text}");
    let row = |id: Uuid| {
        text.lines()
            .find(|l| l.contains(&id.to_string()))
            .unwrap_or_else(|| panic!("a row for {id} in {text}"))
            .to_string()
    };
    for (id, cells) in [
        (ids.shipped, ["fulfilment", "ended", " 2 ", "PaymentReceived in payment-1 at"]),
        (
            ids.cancelled,
            ["fulfilment", "ended", " 2 ", "deadline payment: sent CancelOrder; ended"],
        ),
        (ids.waiting, ["running", " 1 ", "OrderPlaced in order-3 at", "payment"]),
        (ids.paid_first, ["running", " 1 ", "PaymentReceived in payment-4 at", "(state only)"]),
    ] {
        let row = row(id);
        for cell in cells {
            assert!(row.contains(cell), "{cell:?} in {row}");
        }
    }
    let rows: Vec<&str> =
        text.lines().filter(|l| l.starts_with("│ ") && !l.starts_with("│ process")).collect();
    assert!(
        rows.len() == 4 && rows.iter().all(|l| l.starts_with("│ fulfilment ")),
        "sagas and checkpoints are no instances: {text}"
    );
    assert!(text.contains("`cairn sagas show fulfilment "), "{text}");

    let json = |args: &[&str]| -> Vec<Value> {
        stdout(&cairn(dir.path(), args)).lines().map(|l| serde_json::from_str(l).unwrap()).collect()
    };
    let running = json(&["--json", "sagas", "processes", "--process", "fulfilment", "--running"]);
    let mut correlations: Vec<String> =
        running.iter().map(|r| r["correlation"].as_str().unwrap().to_string()).collect();
    correlations.sort();
    let mut expected = vec![ids.waiting.to_string(), ids.paid_first.to_string()];
    expected.sort();
    assert_eq!(correlations, expected);
    let waiting = running.iter().find(|r| r["correlation"] == ids.waiting.to_string()).unwrap();
    assert_eq!(
        (waiting["status"].as_str(), waiting["reactions"].as_u64(), &waiting["deadlines"]),
        (Some("running"), Some(1), &json!(["payment"]))
    );
    assert_eq!(waiting["state"], json!({"order": "order-3", "paid": false}));
    assert_eq!(json(&["--json", "sagas", "processes", "--ended"]).len(), 2);
    let ended =
        stdout(&cairn(dir.path(), &["sagas", "processes", "--ended", "--process", "fulfilment"]));
    assert!(ended.contains("2 process instances of process 'fulfilment' ended"), "{ended}");
    let none = stdout(&cairn(dir.path(), &["sagas", "processes", "--process", "billing"]));
    assert!(none.contains("no process instances of process 'billing' in this store"), "{none}");
    let saga_type = stdout(&cairn(dir.path(), &["sagas", "processes", "--process", "order"]));
    assert!(
        saga_type
            .contains("'order' is a saga type, not a process: `cairn sagas list --saga order`"),
        "{saga_type}"
    );

    // Sagas stay among sagas.
    let list = stdout(&cairn(dir.path(), &["sagas", "list"]));
    assert!(
        list.contains("4 sagas: 1 needs attention, 2 compensated, 1 completed")
            && !list.contains("fulfilment"),
        "{list}"
    );

    let show = cairn(dir.path(), &["sagas", "show", "fulfilment", &ids.shipped.to_string()]);
    assert!(show.status.success(), "{}", stderr(&show));
    let text = stdout(&show);
    assert!(text.starts_with(&format!("process fulfilment {} — ended", ids.shipped)), "{text}");
    assert!(text.contains("state      {\"order\":\"order-1\",\"paid\":true}"), "{text}");
    assert!(text.contains("deadlines  none (ended)"), "{text}");
    assert!(
        text.contains("checkpoint the fulfilment manager had read up to position "),
        "shutdown wrote the checkpoint: {text}"
    );
    let timeline: Vec<&str> = text.lines().skip_while(|l| *l != "timeline").skip(1).collect();
    assert_eq!(timeline.len(), 2, "{text}");
    assert!(
        timeline.iter().all(|l| l.trim_start().starts_with('+')),
        "each line has its offset from the first: {text}"
    );
    let line =
        |i: usize| timeline[i].trim_start().split_once("  ").expect("offset, then the line").1;
    assert!(
        line(0).starts_with("▶ OrderPlaced in order-1 at ")
            && line(0).ends_with(": set deadline payment"),
        "{text}"
    );
    assert!(
        line(1).starts_with("■ PaymentReceived in payment-1 at ")
            && line(1).ends_with(": sent ShipOrder; cancelled deadline payment; ended"),
        "{text}"
    );

    let cancelled =
        stdout(&cairn(dir.path(), &["sagas", "show", "fulfilment", &ids.cancelled.to_string()]));
    assert!(cancelled.contains("■ deadline payment: sent CancelOrder; ended"), "{cancelled}");
    let waiting =
        stdout(&cairn(dir.path(), &["sagas", "show", "fulfilment", &ids.waiting.to_string()]));
    assert!(
        waiting.contains("— running")
            && waiting.contains(&format!("deadlines  payment (timer {}/payment@1)", ids.waiting)),
        "{waiting}"
    );
    assert!(
        waiting.contains("now        waiting for its next event or its deadline payment"),
        "{waiting}"
    );

    let shown: Value = serde_json::from_str(
        stdout(&cairn(
            dir.path(),
            &["--json", "sagas", "show", "fulfilment", &ids.cancelled.to_string()],
        ))
        .trim(),
    )
    .unwrap();
    assert_eq!(
        (shown["kind"].as_str(), shown["status"].as_str(), shown["reactions"].as_u64()),
        (Some("process"), Some("ended"), Some(2))
    );
    assert_eq!(shown["timeline"][1]["deadline_fired"], "payment");
    assert_eq!(shown["timeline"][1]["commands"][0]["name"], "CancelOrder");
    assert!(
        shown["timeline"][1]["commands"][0]["key"]
            .as_str()
            .unwrap()
            .starts_with(&format!("$saga-fulfilment-{}/", ids.cancelled))
    );
    assert!(shown["checkpoint"]["position"].as_u64().unwrap() > 0);

    // What is not there, and what cannot be done, says what to do instead.
    let unknown_id = cairn(dir.path(), &["sagas", "show", "fulfilment", "nope"]);
    assert!(!unknown_id.status.success());
    let message = stderr(&unknown_id);
    assert!(
        message.contains("no instance of process 'fulfilment' with correlation id 'nope'")
            && message.contains("`cairn sagas processes --process fulfilment`"),
        "{message}"
    );
    let unknown = cairn(dir.path(), &["sagas", "show", "billing", "1"]);
    assert!(!unknown.status.success());
    let message = stderr(&unknown);
    assert!(
        message.contains("no saga of type 'billing' and no process named 'billing'")
            && message.contains("`cairn sagas processes`"),
        "{message}"
    );
    let resume = cairn(dir.path(), &["sagas", "resume", "fulfilment", &ids.waiting.to_string()]);
    assert!(
        !resume.status.success()
            && stderr(&resume).contains("is running, not parked: nothing to resume"),
        "{}",
        stderr(&resume)
    );
    let both = cairn(dir.path(), &["sagas", "processes", "--ended", "--running"]);
    assert!(!both.status.success(), "--ended and --running exclude each other");
}

/// A fulfilment manager whose warehouse refuses to ship while `down` is set
/// (2 attempts, then the instance parks).
async fn fulfilment(
    store: &Arc<dyn EventStore>,
    down: &Arc<AtomicBool>,
) -> ProcessManager<OrderFulfilment> {
    let down = down.clone();
    ProcessManager::builder(store.clone(), OrderFulfilment, move |_command| {
        let down = down.load(Ordering::SeqCst);
        async move { if down { Err("warehouse down".to_string()) } else { Ok(()) } }
    })
    .command_attempts(2)
    .start()
    .await
    .unwrap()
}

#[test]
fn a_parked_process_instance_is_listed_shown_and_resumed() {
    let dir = tempfile::tempdir().unwrap();
    let (order, other) = (Uuid::now_v7(), Uuid::now_v7());
    let down = Arc::new(AtomicBool::new(true));
    let rt = runtime();
    rt.block_on(async {
        let store: Arc<dyn EventStore> = Arc::new(EmbeddedStore::open(dir.path()).unwrap());
        let manager = fulfilment(&store, &down).await;
        for (n, correlation) in [(9, order), (10, other)] {
            for (stream, event_type, data) in [
                (format!("order-{n}"), "OrderPlaced", json!({"window_ms": 3_600_000})),
                (format!("payment-{n}"), "PaymentReceived", json!({})),
            ] {
                let metadata =
                    Metadata { correlation_id: Some(correlation), ..Metadata::default() };
                store
                    .append(
                        &stream,
                        ExpectedVersion::Any,
                        vec![NewEvent::json(event_type, &data).unwrap().with_metadata(metadata)],
                    )
                    .await
                    .unwrap();
            }
        }
        let start = std::time::Instant::now();
        for id in [order, other] {
            while manager
                .instance(&id.to_string())
                .await
                .unwrap()
                .is_none_or(|i| i.parked.is_none())
            {
                assert!(
                    start.elapsed() < Duration::from_secs(20),
                    "never parked: {:?}",
                    manager.last_error()
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        manager.shutdown().await;
    });

    let listed = stdout(&cairn(dir.path(), &["sagas", "processes", "--parked"]));
    assert!(listed.contains("2 process instances parked"), "{listed}");
    let row = listed
        .lines()
        .find(|l| l.contains(&order.to_string()))
        .unwrap_or_else(|| panic!("a row in {listed}"));
    assert!(row.contains("needs attention") && row.contains("parked at PaymentRec"), "{row}");
    assert!(
        [order, other]
            .iter()
            .any(|id| listed.contains(&format!("`cairn sagas resume fulfilment {id}`"))),
        "{listed}"
    );
    let all = stdout(&cairn(dir.path(), &["sagas", "processes"]));
    assert!(all.contains("2 process instances: 2 needs attention"), "{all}");
    let shown = stdout(&cairn(dir.path(), &["sagas", "show", "fulfilment", &order.to_string()]));
    assert!(shown.starts_with(&format!("process fulfilment {order} — needs attention")), "{shown}");
    assert!(
        shown.contains("parked     parked at PaymentReceived in payment-9 at ")
            && shown.contains(": ShipOrder failed 2 times: warehouse down (key $saga-fulfilment-"),
        "{shown}"
    );
    assert!(shown.contains(&format!("`cairn sagas resume fulfilment {order}`")), "{shown}");
    let timeline: Vec<&str> = shown.lines().skip_while(|l| *l != "timeline").skip(1).collect();
    assert_eq!(timeline.len(), 2, "{shown}");
    assert!(timeline[1].contains("✋ parked at PaymentReceived"), "{shown}");

    let resumed =
        cairn(dir.path(), &["sagas", "resume", "fulfilment", &order.to_string(), "--by", "ops"]);
    assert!(resumed.status.success(), "{}", stderr(&resumed));
    assert!(
        stdout(&resumed).contains(&format!(
            "resumed process fulfilment {order} (by ops): its manager sends ShipOrder again"
        )),
        "{}",
        stdout(&resumed)
    );
    let again = cairn(dir.path(), &["sagas", "resume", "fulfilment", &order.to_string()]);
    assert!(
        !again.status.success()
            && stderr(&again).contains("is running, not parked: nothing to resume"),
        "{}",
        stderr(&again)
    );
    // The rest at once: only `other` is still parked.
    let rest = cairn(dir.path(), &["sagas", "resume", "fulfilment", "--all-parked", "--by", "ops"]);
    assert!(rest.status.success(), "{}", stderr(&rest));
    assert_eq!(
        stdout(&rest).trim(),
        format!("resumed 1 parked instance of process 'fulfilment' (by ops): {other}")
    );
    let none = stdout(&cairn(dir.path(), &["sagas", "resume", "fulfilment", "--all-parked"]));
    assert!(
        none.contains(
            "no parked saga or process instance named 'fulfilment' in this store: nothing to resume"
        ),
        "{none}"
    );
    let both =
        cairn(dir.path(), &["sagas", "resume", "fulfilment", &order.to_string(), "--all-parked"]);
    assert!(!both.status.success(), "an id and --all-parked exclude each other");

    // The next manager (the warehouse is back) ships it.
    down.store(false, Ordering::SeqCst);
    rt.block_on(async {
        let store: Arc<dyn EventStore> = Arc::new(EmbeddedStore::open(dir.path()).unwrap());
        let manager = fulfilment(&store, &down).await;
        let start = std::time::Instant::now();
        for id in [order, other] {
            while !manager.instance(&id.to_string()).await.unwrap().is_some_and(|i| i.ended) {
                assert!(
                    start.elapsed() < Duration::from_secs(10),
                    "never shipped: {:?}",
                    manager.last_error()
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        manager.shutdown().await;
    });
    let shown = stdout(&cairn(dir.path(), &["sagas", "show", "fulfilment", &order.to_string()]));
    assert!(
        shown.contains("— ended")
            && shown.contains("↻ resumed by ops")
            && shown.contains("■ PaymentReceived in payment-9"),
        "{shown}"
    );
}

#[test]
fn sagas_in_postgresql() {
    const URL: &str = "postgres://postgres@127.0.0.1:5432/test";
    if !cairn_core::conformance::reachable("127.0.0.1:5432", "PostgreSQL") {
        return;
    }
    let schema = format!("cairn_sagas_{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
    runtime().block_on(async {
        let store = cairn_postgres::PgStore::connect_with(
            URL,
            cairn_postgres::PgOptions::default().schema(&schema),
        )
        .await
        .unwrap();
        let events = [
            (
                "SagaStarted",
                json!({"saga": "order", "input": {}, "steps": ["create-order", "charge-card"]}),
            ),
            ("StepCompleted", json!({"step": "create-order", "output": null})),
        ];
        let events = events.iter().map(|(t, d)| NewEvent::json(*t, d).unwrap()).collect();
        store.append("$saga-order-pg1", ExpectedVersion::NoStream, events).await.unwrap();
    });
    let pg = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_cairn"))
            .args(["--backend", "postgres", "--database-url", URL, "--pg-schema", &schema])
            .args(args)
            .output()
            .unwrap()
    };
    let list = pg(&["sagas", "list"]);
    assert!(
        stdout(&list).contains("pg1") && stdout(&list).contains("1 saga: 1 running"),
        "{} {}",
        stdout(&list),
        stderr(&list)
    );
    let show = pg(&["sagas", "show", "order", "pg1"]);
    assert!(
        stdout(&show).contains("create-order ✓ → charge-card …")
            && stdout(&show).contains("now      running charge-card"),
        "{}",
        stdout(&show)
    );
    let refused = pg(&["sagas", "resume", "order", "pg1"]);
    assert!(
        !refused.status.success()
            && stderr(&refused).contains("is running, not waiting for attention"),
        "{}",
        stderr(&refused)
    );
    runtime().block_on(async {
        let (client, conn) = tokio_postgres::connect(URL, tokio_postgres::NoTls).await.unwrap();
        tokio::spawn(conn);
        client.batch_execute(&format!("DROP SCHEMA {schema} CASCADE")).await.unwrap();
    });
}
