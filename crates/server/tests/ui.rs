//! The web admin UI in a real headless Chromium: events appended through the
//! API appear in the page, event text is shown as text (never as markup),
//! and an event's page shows its data and metadata; the Sagas view lists
//! sagas and process-manager instances and shows each one's history.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cairn_client::HttpStore;
use cairn_core::{EventStore, ExpectedVersion, Metadata, NewEvent};
use cairn_log::EmbeddedStore;
use cairn_server::ServerConfig;
use serde_json::json;

fn chromium() -> Option<PathBuf> {
    ["/usr/bin/chromium", "/usr/bin/chromium-browser"]
        .into_iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
}

/// The page's DOM after its scripts ran, as Chromium prints it.
fn dom(browser: &PathBuf, url: &str) -> String {
    let profile = tempfile::tempdir().unwrap();
    let mut child = Command::new(browser)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
        ])
        .args([
            "--disable-component-update",
            "--disable-sync",
            "--virtual-time-budget=5000",
            "--dump-dom",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .arg(url)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start chromium");
    let started = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if started.elapsed() > Duration::from_secs(60) {
            child.kill().unwrap();
            panic!("chromium did not finish within 60 s on {url}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = child.wait_with_output().unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Chromium and a server on a fresh embedded store.
struct Ui {
    browser: PathBuf,
    rt: tokio::runtime::Runtime,
    running: cairn_server::Running,
    url: String,
    _dir: tempfile::TempDir,
}

impl Ui {
    /// `None` (the test skips) without chromium, outside CI.
    fn start() -> Option<Ui> {
        let Some(browser) = chromium() else {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "CI needs chromium for the UI test; .ci/run installs it"
            );
            eprintln!("skipped: no chromium (apt-get install chromium) for the web UI test");
            return None;
        };
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let embedded = EmbeddedStore::open(dir.path()).unwrap();
        let engine = embedded.clone();
        let engine_metrics: Arc<dyn Fn() -> String + Send + Sync> =
            Arc::new(move || engine.stats().prometheus());
        let store: Arc<dyn EventStore> = Arc::new(embedded);
        let config = ServerConfig {
            listen: "127.0.0.1:0".parse().unwrap(),
            engine_metrics: Some(engine_metrics),
            ..Default::default()
        };
        let running = rt.block_on(async { cairn_server::start(store, config) }).unwrap();
        let url = running.url.clone();
        Some(Ui { browser, rt, running, url, _dir: dir })
    }

    fn shutdown(self) {
        self.rt.block_on(self.running.shutdown()).unwrap();
    }
}

#[test]
fn events_appended_through_the_api_appear_in_the_page() {
    let Some(ui) = Ui::start() else { return };
    let (browser, rt, url) = (&ui.browser, &ui.rt, ui.url.clone());
    let correlation = uuid::Uuid::now_v7();
    rt.block_on(async {
        let client = HttpStore::new(&url).unwrap();
        let meta = Metadata { correlation_id: Some(correlation), ..Default::default() };
        let placed = NewEvent::json("OrderPlaced", &json!({"customer": "ada", "total": 42}))
            .unwrap()
            .with_metadata(meta.clone());
        client.append("order-42", ExpectedVersion::NoStream, vec![placed]).await.unwrap();
        let paid = NewEvent::json("PaymentTaken", &json!({"order": "order-42"}))
            .unwrap()
            .with_metadata(meta);
        client.append("payment-42", ExpectedVersion::NoStream, vec![paid]).await.unwrap();
        let nasty = NewEvent::json(
            "<img src=x onerror=alert(1)>",
            &json!({"note": "<script>alert(2)</script>"}),
        )
        .unwrap();
        client.append("order-43", ExpectedVersion::NoStream, vec![nasty]).await.unwrap();
    });

    let streams = dom(browser, &format!("{url}/#/streams"));
    assert!(
        streams.contains("order-42")
            && streams.contains("payment-42")
            && streams.contains("3 streams"),
        "{streams}"
    );
    assert!(
        streams.contains("scrubbed: 0 passes, this one 0%, no damage"),
        "the header shows the scrubber: {streams}"
    );

    let page = dom(browser, &format!("{url}/#/stream/order-42"));
    assert!(page.contains("OrderPlaced") && page.contains(r#""customer":"ada""#), "{page}");

    let event = dom(browser, &format!("{url}/#/event/order-42/1"));
    assert!(event.contains("\"total\": 42"), "the event's data, pretty: {event}");
    assert!(
        event.contains(&correlation.to_string()) && event.contains("(2 events)"),
        "the correlation chain: {event}"
    );

    let all = dom(browser, &format!("{url}/#/all"));
    assert!(all.contains("&lt;img src=x onerror=alert(1)&gt;"), "event text is escaped: {all}");
    assert!(
        !all.contains("<img src=\"x\"") && !all.contains("<script>alert(2)"),
        "no markup from event text: {all}"
    );
    ui.shutdown();
}

/// Appends a saga's history as its runner would, event by event, through the API.
async fn append_saga(client: &HttpStore, stream: &str, events: &[(&str, serde_json::Value)]) {
    let events = events.iter().map(|(t, d)| NewEvent::json(*t, d).unwrap()).collect();
    client.append(stream, ExpectedVersion::NoStream, events).await.unwrap();
}

#[test]
fn the_sagas_view_lists_sagas_appended_through_the_api_and_shows_a_timeline() {
    let Some(ui) = Ui::start() else { return };
    let (browser, rt, url) = (&ui.browser, &ui.rt, ui.url.clone());
    let steps = json!(["create-order", "charge-card", "reserve-items"]);
    rt.block_on(async {
        let client = HttpStore::new(&url).unwrap();
        append_saga(&client, "$saga-order-1", &[
            ("SagaStarted", json!({"saga": "order", "input": {"customer": "ada"}, "steps": steps})),
            ("StepCompleted", json!({"step": "create-order", "output": {"order": 1}})),
            ("StepFailed", json!({"step": "charge-card", "error": "card declined"})),
            ("Compensating", json!({"reason": "charge-card failed: card declined", "undo": ["create-order"], "not_undoable": []})),
            ("StepCompensated", json!({"step": "create-order"})),
            ("SagaCompensated", json!({})),
        ])
        .await;
        append_saga(&client, "$saga-order-2", &[
            ("SagaStarted", json!({"saga": "order", "input": {}, "steps": steps})),
            ("StepCompleted", json!({"step": "create-order", "output": null})),
            ("StepCompleted", json!({"step": "charge-card", "output": null})),
            ("StepTimedOut", json!({"step": "reserve-items", "after_ms": 30000})),
            ("Compensating", json!({"reason": "reserve-items timed out after 30 s", "undo": ["reserve-items", "charge-card", "create-order"], "not_undoable": []})),
            ("StepCompensated", json!({"step": "reserve-items"})),
            ("CompensationFailed", json!({"step": "charge-card", "attempt": 1, "error": "<b>payments</b> down"})),
            ("SagaParked", json!({"step": "charge-card", "attempts": 1, "error": "<b>payments</b> down"})),
        ])
        .await;
        append_saga(&client, "$saga-order-3", &[("SagaStarted", json!({"saga": "order", "input": {}, "steps": steps}))]).await;
        // A runner's checkpoint lives among the saga streams but is no saga.
        append_saga(&client, "$saga-shop", &[("RunnerCheckpoint", json!({"after": 0, "parked": []}))]).await;
    });

    let list = dom(browser, &format!("{url}/#/sagas"));
    assert!(list.contains("3 sagas"), "{list}");
    assert!(
        list.contains("compensated")
            && list.contains("needs attention")
            && list.contains("running"),
        "{list}"
    );
    assert!(
        list.contains("charge-card failed: card declined")
            && list.contains("undo charge-card")
            && list.contains("2/3, 1/3 undone"),
        "{list}"
    );
    assert!(list.contains("href=\"#/saga/order/1\""), "each saga links to its timeline: {list}");
    assert!(!list.contains("shop"), "the checkpoint is not listed: {list}");
    assert!(
        list.contains("&lt;b&gt;payments&lt;/b&gt; down") && !list.contains("<b>payments"),
        "event text is text: {list}"
    );

    let parked = dom(browser, &format!("{url}/#/sagas/needs_attention"));
    assert!(
        parked.contains("1 saga;")
            && parked.contains("undo charge-card")
            && !parked.contains("card declined"),
        "{parked}"
    );

    let one = dom(browser, &format!("{url}/#/saga/order/1"));
    assert!(one.contains("Saga order 1") && one.contains("compensated"), "{one}");
    for step in ["create-order ✓↩", "charge-card ✗", "reserve-items ·"] {
        assert!(one.contains(step), "the pipeline shows {step:?}: {one}");
    }
    for line in [
        "started order: create-order → charge-card → reserve-items",
        "create-order done: {\"order\":1}",
        "charge-card failed: card declined",
        "compensating: create-order",
        "create-order undone",
    ] {
        assert!(one.contains(line), "the timeline has {line:?}: {one}");
    }
    let two = dom(browser, &format!("{url}/#/saga/order/2"));
    assert!(
        two.contains("charge-card ✓↩✗")
            && two.contains("reserve-items ✗↩")
            && two.contains("cairn sagas resume order 2"),
        "{two}"
    );
    ui.shutdown();
}

/// One table row of the page, from its `data-stream` attribute to its end.
fn row<'a>(page: &'a str, stream: &str) -> &'a str {
    let start = page
        .find(&format!("data-stream=\"{stream}\""))
        .unwrap_or_else(|| panic!("no row for {stream}: {page}"));
    &page[start..start + page[start..].find("</tr>").unwrap()]
}

/// The part of the page from `start` (e.g. `<table id="sagas"`) up to the next `end`.
fn part<'a>(page: &'a str, start: &str, end: &str) -> &'a str {
    let from = page.find(start).unwrap_or_else(|| panic!("no {start}: {page}"));
    &page[from..from + page[from..].find(end).unwrap()]
}

#[test]
fn the_sagas_view_lists_process_instances_and_shows_their_reactions() {
    let Some(ui) = Ui::start() else { return };
    let (browser, rt, url) = (&ui.browser, &ui.rt, ui.url.clone());
    let (done, open) = (uuid::Uuid::now_v7().to_string(), uuid::Uuid::now_v7().to_string());
    let (done_stream, open_stream) =
        (format!("$saga-fulfilment-{done}"), format!("$saga-fulfilment-{open}"));
    let (stuck, again) = (uuid::Uuid::now_v7().to_string(), uuid::Uuid::now_v7().to_string());
    let (stuck_stream, again_stream) =
        (format!("$saga-fulfilment-{stuck}"), format!("$saga-fulfilment-{again}"));
    let key = |stream: &str| format!("{stream}/{}/0", uuid::Uuid::now_v7());
    let reserve = key(&open_stream);
    rt.block_on(async {
        let client = HttpStore::new(&url).unwrap();
        // Reactions as ProcessManager records them (Reaction in
        // crates/saga/src/process.rs; command_names is left out when empty).
        append_saga(&client, &done_stream, &[
            ("ProcessReacted", json!({"state": {"order": "order-7", "paid": false}, "position": 100, "handled": "OrderPlaced in order-7 at 100",
                "commands": [], "deadlines": [{"timer": format!("{done}/payment@1"), "name": "payment"}], "ended": false})),
            ("ProcessReacted", json!({"state": {"order": "order-7", "paid": true}, "position": 200, "handled": "PaymentTaken in payment-7 at 200",
                "commands": [key(&done_stream)], "command_names": ["ShipOrder"], "deadlines": [], "ended": false})),
            ("ProcessEnded", json!({"state": {"order": "order-7", "paid": true, "shipped": true}, "position": 300, "handled": "OrderShipped in shipping-7 at 300",
                "commands": [], "deadlines": [], "ended": true})),
        ])
        .await;
        append_saga(&client, &open_stream, &[
            ("ProcessReacted", json!({"state": {"order": "order-8"}, "position": 400, "handled": "OrderPlaced in order-8 at 400",
                "commands": [reserve], "command_names": ["ReserveStock"], "deadlines": [{"timer": format!("{open}/payment@1"), "name": "payment"}], "ended": false})),
            ("ProcessReacted", json!({"state": {"order": "order-8", "reminded": 1}, "position": 400, "handled": "deadline payment",
                "commands": [format!("{open_stream}/deadline/{open}/payment@1/0")], "command_names": ["RemindCustomer"],
                "deadlines": [{"timer": format!("{open}/payment@2"), "name": "payment"}], "ended": false})),
            ("ProcessReacted", json!({"state": {"order": "order-8", "reminded": 1, "note": "<b>rush</b>"}, "position": 600,
                "handled": "<img src=x onerror=alert(4)> in order-8 at 600",
                "commands": [], "deadlines": [{"timer": format!("{open}/payment@2"), "name": "payment"}], "ended": false})),
        ])
        .await;
        // Parked at its first event (Parked in process.rs), and one parked, resumed, then parked again.
        append_saga(&client, &stuck_stream, &[
            ("ProcessParked", json!({"handled": "OrderPlaced in order-9 at 700", "command": "ReserveStock", "key": format!("{stuck_stream}/x/0"),
                "attempts": 10, "error": "stock service down"})),
        ])
        .await;
        append_saga(&client, &again_stream, &[
            ("ProcessReacted", json!({"state": {"order": "order-10"}, "position": 800, "handled": "OrderPlaced in order-10 at 800",
                "commands": [], "deadlines": [], "ended": false})),
            ("ProcessParked", json!({"handled": "PaymentTaken in payment-10 at 900", "command": "ShipOrder", "key": "k1", "attempts": 3, "error": "first"})),
            ("ProcessResumed", json!({"by": "ops"})),
            ("ProcessParked", json!({"handled": "PaymentTaken in payment-10 at 900", "command": "ShipOrder", "key": "k1", "attempts": 3, "error": "<i>again</i>"})),
        ])
        .await;
        // The manager's checkpoint shares the namespace but is no instance.
        append_saga(&client, "$saga-fulfilment-$checkpoint", &[("ProcessCheckpoint", json!(600))]).await;
        append_saga(&client, "$saga-order-1", &[("SagaStarted", json!({"saga": "order", "input": {}, "steps": ["create-order"]}))]).await;
    });

    let list = dom(browser, &format!("{url}/#/sagas"));
    let sagas = part(&list, "<table id=\"sagas\"", "</table>");
    assert!(
        list.contains("1 saga;") && sagas.contains("create-order") && !sagas.contains("fulfilment"),
        "the saga rows are the sagas only: {list}"
    );
    let processes = part(&list, "<table id=\"processes\"", "</table>");
    assert!(
        list.contains("Process managers")
            && list.contains("4 process instances: 1 running, 2 needs attention, 1 ended"),
        "{list}"
    );
    let stuck_row = row(processes, &stuck_stream);
    assert!(
        stuck_row.contains("class=\"status-needs_attention\">needs attention<")
            && stuck_row.contains("<td>0</td>"),
        "{stuck_row}"
    );
    assert!(stuck_row.contains("parked at OrderPlaced in order-9 at 700: ReserveStock failed 10 times: stock service down"), "{stuck_row}");
    let again_row = row(processes, &again_stream);
    assert!(
        again_row.contains("needs attention<")
            && again_row.contains("ShipOrder failed 3 times: &lt;i&gt;again&lt;/i&gt;"),
        "the newest park, as text: {again_row}"
    );
    let ended = row(processes, &done_stream);
    assert!(
        ended.contains(&format!("href=\"#/saga/fulfilment/{done}\">{done}</a>")),
        "the correlation id links to the instance: {ended}"
    );
    assert!(
        ended.contains("class=\"status-ended\">ended<")
            && ended.contains("<td>3</td>")
            && ended.contains("OrderShipped in shipping-7 at 300: ended"),
        "{ended}"
    );
    let open_row = row(processes, &open_stream);
    assert!(
        open_row.contains("class=\"status-running\">running<")
            && open_row.contains("<td>3</td>")
            && open_row.contains("<td>payment</td>"),
        "{open_row}"
    );
    assert!(
        open_row.contains("&lt;img src=x onerror=alert(4)&gt; in order-8 at 600 (state only)"),
        "event text is text: {open_row}"
    );
    let shown = part(&list, "<main", "</main>");
    assert!(
        !shown.contains("$checkpoint") && !shown.contains("ProcessCheckpoint"),
        "the checkpoint is no instance (the page's script names it): {list}"
    );
    assert!(!list.contains("<img src=\"x\""), "no markup from event text: {list}");

    let one = dom(browser, &format!("{url}/#/saga/fulfilment/{done}"));
    assert!(
        one.contains(&format!("Process fulfilment {done}"))
            && one.contains("none (ended)")
            && one.contains("3 reactions"),
        "{one}"
    );
    assert!(one.contains("\"shipped\": true"), "the state, as JSON text: {one}");
    assert!(
        one.contains("the fulfilment manager had read up to position 600"),
        "the manager's checkpoint: {one}"
    );
    let timeline = part(&one, "<table id=\"timeline\"", "</table>");
    for line in [
        "▶</td><td>OrderPlaced in order-7 at 100</td><td>set deadline payment</td>",
        "•</td><td>PaymentTaken in payment-7 at 200</td>",
        "sent ShipOrder; cancelled deadline payment</td>",
        "■</td><td>OrderShipped in shipping-7 at 300</td><td>ended</td>",
    ] {
        assert!(timeline.contains(line), "the timeline has {line:?}: {timeline}");
    }

    let two = dom(browser, &format!("{url}/#/saga/fulfilment/{open}"));
    assert!(
        two.contains("class=\"status-running\">running<")
            && two.contains(&format!("payment (timer {open}/payment@2)")),
        "{two}"
    );
    assert!(two.contains("waiting for its next event or its deadline payment"), "{two}");
    assert!(
        two.contains(&format!("ReserveStock: {reserve}")),
        "a command's idempotency key: {two}"
    );
    let timeline = part(&two, "<table id=\"timeline\"", "</table>");
    for line in [
        "▶</td><td>OrderPlaced in order-8 at 400</td>",
        "sent ReserveStock; set deadline payment</td>",
        "⧖</td><td>deadline payment</td>",
        "sent RemindCustomer; set deadline payment</td>",
        "&lt;img src=x onerror=alert(4)&gt; in order-8 at 600</td><td>(state only)</td>",
    ] {
        assert!(timeline.contains(line), "the timeline has {line:?}: {timeline}");
    }
    assert!(
        two.contains("&lt;b&gt;rush&lt;/b&gt;")
            && !two.contains("<b>rush")
            && !two.contains("<img src=\"x\""),
        "event text is text: {two}"
    );

    let parked = dom(browser, &format!("{url}/#/saga/fulfilment/{again}"));
    assert!(
        parked.contains("needs attention<")
            && parked.contains(&format!("`cairn sagas resume fulfilment {again}`")),
        "{parked}"
    );
    let timeline = part(&parked, "<table id=\"timeline\"", "</table>");
    let marks: Vec<&str> =
        ["▶</td>", "✋</td>", "↻</td><td></td><td>resumed by ops</td>", "✋</td>"]
            .into_iter()
            .collect();
    let mut at = 0;
    for mark in marks {
        let found = timeline[at..]
            .find(mark)
            .unwrap_or_else(|| panic!("{mark:?} after {at} in the timeline, in order: {timeline}"));
        at += found + mark.len();
    }
    assert!(!parked.contains("<i>again"), "event text is text: {parked}");
    ui.shutdown();
}
