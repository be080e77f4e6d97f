//! `cairn bench S1`: the embedded engine with a long history. Fills a store
//! natively (appends of 1,000 events over 10,000 streams, or `--streams N`
//! with smaller appends when needed, ~170-byte
//! events, a tag on 1 in 100), then measures what grows with the log: open
//! time after a clean stop and after a SIGKILL of a child that was
//! appending, anonymous memory after open, and the everyday workloads on
//! the full store next to the same workloads on an empty one
//! (`ratio_vs_empty`, 1.0 = no slower). `--events` sets the size (default
//! 100,000,000: ~22 GB of disk), `--keep DIR` keeps the store, and a kept
//! store is measured again without a new fill. The short workloads run
//! three times, full and empty in turn, and each figure is the median.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use cairn_core::{EventStore, ExpectedVersion, Query, ReadAllOptions};
use cairn_log::EmbeddedStore;

use crate::measure::Target;

pub(crate) const DEFAULT_EVENTS: u64 = 100_000_000;
pub(crate) const DEFAULT_STREAMS: u64 = 10_000;
/// Events an append of the fill carries at most.
const BATCH: u64 = 1_000;
/// Events per tag: one event in 100 carries a tag, each tag on this many.
const PER_TAG: u64 = 100;
const WRITERS: u64 = 16;
/// Rounds of each short workload, full and empty in turn.
const ROUNDS: usize = 3;

/// The hidden child roles S1 starts itself.
pub(crate) const CHILD_OPEN: &str = "S1-open";
pub(crate) const CHILD_APPEND: &str = "S1-append";

fn tags(events: u64) -> u64 {
    (events / 100 / PER_TAG).max(1)
}

fn tag(k: u64) -> String {
    format!("customer:{k}")
}

/// Event `i` of the fill: a deposit, tagged if `i` is a multiple of 100.
fn fill_event(i: u64, tags: u64) -> cairn_core::NewEvent {
    let e = crate::measure::deposit(i, uuid::Uuid::now_v7());
    if i.is_multiple_of(100) { e.with_tags([tag((i / 100) % tags)]) } else { e }
}

/// Fills `store` with `events` in appends over `streams` streams (batches
/// of up to 1,000, smaller when that is needed for every stream to get some).
async fn fill(store: &EmbeddedStore, events: u64, streams: u64) -> Result<f64> {
    let streams = streams.max(1);
    let batch_len = (events / streams).clamp(1, BATCH);
    let bar = indicatif::ProgressBar::new(events).with_message("filling");
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{msg} {bar:40} {pos}/{len} events, {per_sec}, eta {eta}",
        )
        .expect("a valid template"),
    );
    let tags = tags(events);
    let started = Instant::now();
    let mut handles = Vec::new();
    for w in 0..WRITERS {
        let (store, bar) = (store.clone(), bar.clone());
        handles.push(tokio::spawn(async move {
            let mut b = w;
            while b * batch_len < events {
                let batch: Vec<_> = (b * batch_len..((b + 1) * batch_len).min(events))
                    .map(|i| fill_event(i, tags))
                    .collect();
                let n = batch.len() as u64;
                store.append(&format!("s1-{}", b % streams), ExpectedVersion::Any, batch).await?;
                bar.inc(n);
                b += WRITERS;
            }
            anyhow::Ok(())
        }));
    }
    for h in handles {
        h.await??;
    }
    bar.finish_and_clear();
    Ok(started.elapsed().as_secs_f64())
}

/// `RssAnon` of this process in KiB (Linux), or 0.
fn rss_anon_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| {
                l.strip_prefix("RssAnon:")
                    .map(|v| v.trim().trim_end_matches("kB").trim().parse().unwrap_or(0))
            })
        })
        .unwrap_or(0)
}

/// The child that opens the store, says how long that took and how much
/// anonymous memory it holds, and exits.
pub(crate) fn child_open(dir: &Path) -> Result<String> {
    let t0 = Instant::now();
    let store = EmbeddedStore::open(dir)?;
    let secs = t0.elapsed().as_secs_f64();
    let report = store.open_report();
    let (summaries, tables) = store.summaries_layout();
    Ok(format!(
        "open_secs={secs:.3} rss_anon_kib={} events={} scanned={} from_snapshot={} stream_tables={tables} summaries_in_memory={summaries}",
        rss_anon_kib(),
        report.events,
        report.scanned_events,
        report.from_snapshot
    ))
}

/// The child that appends until it is killed; prints `ready` after its first acknowledgement.
pub(crate) async fn child_append(dir: &Path) -> Result<String> {
    use std::io::Write as _;
    let store = EmbeddedStore::open(dir)?;
    let mut i = 0u64;
    loop {
        // Untagged, so that S1's D2 reads only the fill's tags.
        let batch =
            (0..100).map(|k| crate::measure::deposit(i * 100 + k, uuid::Uuid::now_v7())).collect();
        store.append(&format!("s1-killed-{}", i % 100), ExpectedVersion::Any, batch).await?;
        if i == 0 {
            let _ = writeln!(std::io::stdout(), "ready");
            let _ = std::io::stdout().flush();
        }
        i += 1;
    }
}

/// Runs this binary as a child in `role` on `dir`; returns it, its stdout piped.
fn spawn_child(role: &str, dir: &Path) -> Result<std::process::Child> {
    std::process::Command::new(std::env::current_exe()?)
        .args(["bench", role, "--keep"])
        .arg(dir)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::inherit())
        .spawn()
        .context("starting a child cairn for S1")
}

fn open_in_child(dir: &Path) -> Result<String> {
    let out = spawn_child(CHILD_OPEN, dir)?.wait_with_output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    match text.lines().find(|l| l.contains("open_secs=")) {
        Some(line) if out.status.success() => Ok(line.trim().to_string()),
        _ => bail!("the S1 child could not open the store ({}): {text}", out.status),
    }
}

/// Appends in a child, SIGKILLs it mid-append after `after`, and returns.
fn kill_while_appending(dir: &Path, after: Duration) -> Result<()> {
    use std::io::BufRead as _;
    let mut child = spawn_child(CHILD_APPEND, dir)?;
    let stdout = child.stdout.take().expect("piped");
    if !std::io::BufReader::new(stdout).lines().map_while(Result::ok).any(|l| l.trim() == "ready") {
        bail!("the appending S1 child ended before its first append: {:?}", child.wait()?);
    }
    std::thread::sleep(after);
    child.kill()?;
    child.wait()?;
    Ok(())
}

/// The value of `key=` in a bench line.
pub(crate) fn field(line: &str, key: &str) -> Option<f64> {
    line.split_whitespace().find_map(|kv| kv.strip_prefix(key)?.strip_prefix('=')?.parse().ok())
}

/// Reads `n` events of `$all` from the middle of the log, in pages; events per second.
async fn w4_middle(store: &EmbeddedStore, n: u64) -> Result<(u64, f64)> {
    let head = store.head_position().await?.0;
    // A query's `from` is only a bound: the first user event past the middle.
    let start = store
        .read_query(
            &Query::all(),
            ReadAllOptions::forward().from(cairn_core::Position(head / 2)).limit(1),
        )
        .await?;
    let Some(first) = start.first() else { return Ok((0, 0.0)) };
    let t0 = Instant::now();
    let mut count = 0u64;
    let mut after = None;
    let mut page =
        store.read_all(ReadAllOptions::forward().from(first.position).limit(10_000)).await?;
    while let Some(last) = page.last().map(|e| e.position) {
        count += page.len() as u64;
        if count >= n || after == Some(last) {
            break;
        }
        after = Some(last);
        page = store
            .read_all(ReadAllOptions::forward().after(last).limit(10_000.min(n - count) as usize))
            .await?;
    }
    Ok((count, count as f64 / t0.elapsed().as_secs_f64()))
}

/// Median milliseconds of 21 reads of one tag's events (each tag on 100).
async fn d2_tag(store: &EmbeddedStore, tags: u64) -> Result<f64> {
    let mut times = Vec::new();
    for k in 0..21u64 {
        let q = Query::tags([tag((k * 7919) % tags)]);
        let t0 = Instant::now();
        let found = store.read_query(&q, ReadAllOptions::forward()).await?;
        times.push(t0.elapsed());
        if found.is_empty() {
            bail!("S1 D2: tag {} has no events", tag((k * 7919) % tags));
        }
    }
    times.sort();
    Ok(times[10].as_secs_f64() * 1e3)
}

fn target(store: &EmbeddedStore) -> Target {
    Target {
        store: Arc::new(store.clone()) as Arc<dyn EventStore>,
        backend: "embedded",
        embedded: Some(store.clone()),
        second: None,
    }
}

/// One workload on the full store and on the empty one: (name, figure, full, empty, ratio).
struct Pair(&'static str, &'static str, f64, f64, bool);

impl Pair {
    fn line(&self, events: u64) -> String {
        let Pair(name, figure, full, empty, higher_is_better) = self;
        let ratio = if *higher_is_better { full / empty } else { empty / full };
        let digits = if *higher_is_better { 0 } else { 3 };
        format!(
            "bench S1 workload={name} events_in_store={events} {figure}={full:.digits$} empty_{figure}={empty:.digits$} ratio_vs_empty={ratio:.3}"
        )
    }
}

/// Runs `w` on the full and the empty store in turn, `ROUNDS` times; the
/// median line of each, by `key` (short workloads vary from run to run).
async fn median_pair<F, Fut>(f: &Target, e: &Target, key: &str, w: F) -> Result<(f64, f64)>
where
    F: Fn(Target, String) -> Fut,
    Fut: std::future::Future<Output = Result<String>>,
{
    let (mut full, mut empty) = (Vec::new(), Vec::new());
    // Each round writes new streams (a kept store is measured more than once).
    let run = uuid::Uuid::now_v7().simple().to_string();
    for round in 0..ROUNDS {
        full.push(
            field(&w(f.clone(), format!("{}r{round}", &run[..12])).await?, key).unwrap_or(0.0),
        );
        empty.push(
            field(&w(e.clone(), format!("{}r{round}", &run[..12])).await?, key).unwrap_or(0.0),
        );
    }
    Ok((median(full), median(empty)))
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// The workloads on `full` (filled with `events`) and on `empty`, each pair back to back.
async fn pairs(full: &EmbeddedStore, empty: &EmbeddedStore, events: u64) -> Result<Vec<Pair>> {
    let (f, e) = (target(full), target(empty));
    let mut out = Vec::new();
    let (a, b) = median_pair(&f, &e, "events_per_s", |t, r| async move {
        crate::engine::w1(&t, &format!("s1w1{r}"), 1, 5_000, 0).await
    })
    .await?;
    out.push(Pair("W1", "events_per_s", a, b, true));
    let (a, b) = median_pair(&f, &e, "events_per_s", |t, r| async move {
        crate::engine::w1(&t, &format!("s1w1c{r}"), 16, 20_000, 0).await
    })
    .await?;
    out.push(Pair("W1c", "events_per_s", a, b, true));
    let (a, b) = median_pair(&f, &e, "events_per_s", |t, _| async move {
        crate::engine::w2(&t, 100_000, 16).await
    })
    .await?;
    out.push(Pair("W2", "events_per_s", a, b, true));
    let (a, b) =
        median_pair(&f, &e, "read_ms", |t, _| async move { crate::engine::w3(&t, 10_000).await })
            .await?;
    out.push(Pair("W3", "read_ms", a, b, false));
    let middle = 1_000_000.min(events / 2).max(1);
    let (_, w4f) = w4_middle(full, middle).await?;
    // The empty store gets the same number of events to read, written first.
    crate::engine::w2(&e, middle.div_ceil(100) * 100 * 2, 16).await?;
    let (_, w4e) = w4_middle(empty, middle).await?;
    out.push(Pair("W4", "events_per_s", w4f, w4e, true));
    let d2f = d2_tag(full, tags(events)).await?;
    // Again, the same tags: their pages are mapped now.
    let d2wf = d2_tag(full, tags(events)).await?;
    // The same shape, small: 100 events of a tag among at most 1,000,000.
    let small = events.clamp(10_000, 1_000_000);
    fill(empty, small, DEFAULT_STREAMS).await?;
    let d2e = d2_tag(empty, tags(small)).await?;
    let d2we = d2_tag(empty, tags(small)).await?;
    out.push(Pair("D2", "ms", d2f, d2e, false));
    out.push(Pair("D2warm", "ms", d2wf, d2we, false));
    Ok(out)
}

/// Waits until no merge of index files is due, so that the figures are
/// those of a store at rest; the line says how long that took and what the index is then.
async fn settle(store: &EmbeddedStore, when: &str) -> String {
    let t0 = Instant::now();
    let bar = indicatif::ProgressBar::new_spinner().with_message("merging index files");
    while store.index_layout().3 {
        bar.tick();
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // (A running merge keeps its window due until it is installed.)
    bar.finish_and_clear();
    let (files, covered, memtables, _) = store.index_layout();
    let merges = store.stats().index_merges.load(std::sync::atomic::Ordering::Relaxed);
    format!(
        "bench S1 figure=merge_wait_{when} secs={:.1} index_files={files} segments_covered={covered} memtables={memtables} merges={merges}",
        t0.elapsed().as_secs_f64()
    )
}

/// `cairn bench S1`.
pub(crate) async fn s1(
    events: u64,
    streams: u64,
    keep: Option<&Path>,
    tmp: &Path,
) -> Result<String> {
    let dir: PathBuf = match keep {
        Some(d) => d.to_path_buf(),
        None => tmp.join("s1"),
    };
    let reused = dir.join("log").exists();
    let mut lines = Vec::new();
    let store = EmbeddedStore::open(&dir)?;
    if reused {
        let held = store.stats().events_written.load(std::sync::atomic::Ordering::Relaxed);
        // D2 reads the fill's tags: the last one must be there.
        let last_tag = tag(tags(events) - 1);
        if held < events
            || store
                .read_query(&Query::tags([last_tag.as_str()]), ReadAllOptions::forward().limit(1))
                .await?
                .is_empty()
        {
            bail!(
                "{} was filled with fewer than --events {events} (it has no event tagged {last_tag}): give the --events it was filled with, or a new directory",
                dir.display()
            );
        }
        lines.push(format!(
            "bench S1 figure=fill reused={} events_in_store={held} log_bytes={}",
            dir.display(),
            store.head_position().await?.0
        ));
    } else {
        let secs = fill(&store, events, streams).await?;
        let log_bytes = store.head_position().await?.0;
        lines.push(format!("bench S1 figure=fill events={events} streams={streams} secs={secs:.1} events_per_s={:.0} log_bytes={log_bytes} rss_anon_kib_after_fill={}", events as f64 / secs, rss_anon_kib()));
    }
    lines.push(settle(&store, "after_fill").await);
    let t0 = Instant::now();
    drop(store);
    lines.push(format!("bench S1 figure=close secs={:.3}", t0.elapsed().as_secs_f64()));
    lines.push(format!("bench S1 figure=open_after_clean_stop {}", open_in_child(&dir)?));
    kill_while_appending(&dir, Duration::from_secs(2))?;
    lines.push(format!("bench S1 figure=open_after_sigkill {}", open_in_child(&dir)?));
    let full = EmbeddedStore::open(&dir)?;
    lines.push(settle(&full, "before_workloads").await);
    let empty = EmbeddedStore::open(tmp.join("s1-empty"))?;
    let total = full.stats().events_written.load(std::sync::atomic::Ordering::Relaxed);
    for pair in pairs(&full, &empty, events).await? {
        lines.push(pair.line(total));
    }
    Ok(lines.join("\n"))
}
