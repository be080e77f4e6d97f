//! Arbitrary damage to a closed store's files (flipped bytes, zeroed
//! ranges, truncated or removed segments, a damaged mark or snapshot),
//! found by proptest: opening either succeeds with every acknowledged event,
//! as it was, or refuses with `Corrupt` naming a file; it never panics and
//! never opens with fewer events. Bounded for CI; `PROPTEST_CASES=5000` for
//! a longer run.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use cairn_core::{
    EventStore, ExpectedVersion, NewEvent, ReadAllOptions, RecordedEvent, StoreError,
};
use cairn_log::{EmbeddedStore, Options};
use proptest::prelude::*;

use crate::common::segment_files;

const SEG_BYTES: u64 = 16 * 1024;

fn options(verify_on_open: bool) -> Options {
    Options { segment_bytes: SEG_BYTES, verify_on_open, ..Options::default() }
}

struct Fixture {
    dir: tempfile::TempDir,
    events: Vec<RecordedEvent>,
}

/// A store of three segments and more, closed cleanly, built once.
fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let events = rt.block_on(async {
            let store = EmbeddedStore::open_with(dir.path(), options(true)).unwrap();
            for i in 0..90u64 {
                let batch = (0..1 + i % 3)
                    .map(|k| NewEvent::json("Damaged", &serde_json::json!({"i": i, "k": k, "pad": "z".repeat((i as usize * 37) % 400)})).unwrap())
                    .collect();
                store.append(&format!("acct-{}", i % 5), ExpectedVersion::Any, batch).await.unwrap();
            }
            store.read_all(ReadAllOptions::forward()).await.unwrap()
        });
        assert!(segment_files(dir.path()).len() >= 3);
        Fixture { dir, events }
    })
}

fn copy_dir(from: &Path, to: &Path) {
    for sub in ["", "log"] {
        std::fs::create_dir_all(to.join(sub)).unwrap();
        for entry in std::fs::read_dir(from.join(sub)).unwrap() {
            let path = entry.unwrap().path();
            if path.is_file() && path.file_name().unwrap() != "LOCK" {
                std::fs::copy(&path, to.join(sub).join(path.file_name().unwrap())).unwrap();
            }
        }
    }
}

#[derive(Debug, Clone)]
enum Damage {
    Flip { file: usize, at: u64, bit: u8 },
    Zero { file: usize, at: u64, len: u64 },
    Truncate { file: usize, at: u64 },
    Remove { file: usize },
}

fn damage() -> impl Strategy<Value = Damage> {
    let file = 0..16usize;
    prop_oneof![
        4 => (file.clone(), any::<u64>(), 0..8u8).prop_map(|(file, at, bit)| Damage::Flip { file, at, bit }),
        2 => (file.clone(), any::<u64>(), 1..300u64).prop_map(|(file, at, len)| Damage::Zero { file, at, len }),
        1 => (file.clone(), any::<u64>()).prop_map(|(file, at)| Damage::Truncate { file, at }),
        1 => file.prop_map(|file| Damage::Remove { file }),
    ]
}

/// The store's files that damage may hit: segments, the mark and the snapshot.
fn targets(dir: &Path) -> Vec<PathBuf> {
    let mut files = segment_files(dir);
    files.extend([dir.join("checkpoint")].into_iter().filter(|p| p.exists()));
    files.extend(crate::common::stream_tables(dir));
    files
}

/// Applies `d`; offsets are taken modulo the used part of the file (the
/// records, not the zeros after them), so most damage hits data.
fn apply(dir: &Path, d: &Damage) {
    use std::os::unix::fs::FileExt;
    let files = targets(dir);
    let pick = |i: usize| files[i % files.len()].clone();
    // Only flips and zeroed ranges hit the mark and the snapshot: with both
    // of them gone as well as the log's end, no check could tell.
    let segments = segment_files(dir);
    let pick_segment = |i: usize| segments[i % segments.len()].clone();
    let used = |p: &Path| {
        let bytes = std::fs::read(p).unwrap();
        bytes
            .iter()
            .rposition(|b| *b != 0)
            .map_or(1, |i| i as u64 + 64)
            .min(bytes.len() as u64)
            .max(1)
    };
    match d {
        Damage::Flip { file, at, bit } => {
            let p = pick(*file);
            // An earlier truncation may have emptied it: nothing left to hit.
            if std::fs::metadata(&p).unwrap().len() == 0 {
                return;
            }
            let at = at % used(&p);
            let f = std::fs::OpenOptions::new().read(true).write(true).open(&p).unwrap();
            let mut b = [0u8];
            f.read_exact_at(&mut b, at).unwrap();
            f.write_all_at(&[b[0] ^ (1 << bit)], at).unwrap();
        }
        Damage::Zero { file, at, len } => {
            let p = pick(*file);
            let size = std::fs::metadata(&p).unwrap().len();
            if size == 0 {
                return;
            }
            let at = at % used(&p);
            let len = (*len).min(size - at);
            std::fs::OpenOptions::new()
                .write(true)
                .open(&p)
                .unwrap()
                .write_all_at(&vec![0; len as usize], at)
                .unwrap();
        }
        Damage::Truncate { file, at } => {
            let p = pick_segment(*file);
            let at = at % used(&p);
            std::fs::OpenOptions::new().write(true).open(&p).unwrap().set_len(at).unwrap();
        }
        Damage::Remove { file } => std::fs::remove_file(pick_segment(*file)).unwrap(),
    }
}

/// Opens the damaged copy and checks the outcome.
fn check(dir: &Path, verify_on_open: bool, what: &str) -> Result<(), TestCaseError> {
    let want = &fixture().events;
    let outcome = std::panic::catch_unwind(|| {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let store = EmbeddedStore::open_with(dir, options(verify_on_open))?;
            store.read_all(ReadAllOptions::forward()).await
        })
    });
    let result = match outcome {
        Ok(r) => r,
        Err(_) => return Err(TestCaseError::fail(format!("{what}: open or read panicked"))),
    };
    match result {
        Ok(events) => {
            if std::env::var_os("CAIRN_DAMAGE_TRACE").is_some() {
                eprintln!("outcome: opened");
            }
            prop_assert_eq!(
                events.len(),
                want.len(),
                "{}: opened with {} events instead of {}",
                what,
                events.len(),
                want.len()
            );
            for (got, want) in events.iter().zip(want) {
                prop_assert_eq!(
                    (got.id, &got.data, got.position),
                    (want.id, &want.data, want.position),
                    "{}",
                    what
                );
            }
        }
        Err(StoreError::Corrupt { file, reason, .. }) => {
            if std::env::var_os("CAIRN_DAMAGE_TRACE").is_some() {
                eprintln!("outcome: refused {reason}");
            }
            prop_assert!(
                !file.is_empty() && !reason.is_empty(),
                "{}: a refusal names the file and why",
                what
            );
        }
        Err(e) => {
            return Err(TestCaseError::fail(format!(
                "{what}: expected every event or Corrupt, got {e}"
            )));
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(96),
        ..ProptestConfig::default()
    })]

    #[test]
    fn damaged_files_open_whole_or_refuse(damages in prop::collection::vec(damage(), 1..4), verify_on_open in any::<bool>()) {
        let copy = tempfile::tempdir().unwrap();
        copy_dir(fixture().dir.path(), copy.path());
        for d in &damages {
            if !segment_files(copy.path()).is_empty() {
                apply(copy.path(), d);
            }
        }
        check(copy.path(), verify_on_open, &format!("{damages:?} verify_on_open={verify_on_open}"))?;
        // A refused open changed nothing, so a second one answers the same way.
        check(copy.path(), verify_on_open, &format!("again: {damages:?}"))?;
    }
}
