use cairn_core::*;
use cairn_log::{EmbeddedStore, Options};

fn ev(n: usize) -> NewEvent { NewEvent::json("T", &serde_json::json!({"pad": "x".repeat(n)})).unwrap() }

#[tokio::test]
async fn suffix_retry() {
    let dir = tempfile::tempdir().unwrap();
    let s = EmbeddedStore::open(dir.path()).unwrap();
    let b = vec![ev(1), ev(2), ev(3)];
    let r = s.append("a", ExpectedVersion::Any, b.clone()).await;
    println!("orig {r:?}");
    println!("suffix [b3] {:?}", s.append("a", ExpectedVersion::Any, vec![b[2].clone()]).await);
    println!("suffix [b2,b3] {:?}", s.append("a", ExpectedVersion::Any, vec![b[1].clone(), b[2].clone()]).await);
    println!("{:?}", s.read_stream("a", ReadStreamOptions::forward()).await.unwrap().len());
}

#[tokio::test]
async fn head_at_boundary() {
    let dir = tempfile::tempdir().unwrap();
    let s = EmbeddedStore::open_with(dir.path(), Options { segment_bytes: 16 * 1024, ..Options::default() }).unwrap();
    let mut v = 0;
    loop {
        let h = s.head_position().await.unwrap().0;
        if h + 3000 > 16 * 1024 { break; }
        v = s.append("a", ExpectedVersion::Exact(v), vec![ev(1000)]).await.unwrap().next_version;
    }
    // does not fit and is rejected
    let e = s.append("a", ExpectedVersion::Exact(v + 5), vec![ev(3000)]).await;
    println!("rejected {e:?}");
    let head = s.head_position().await.unwrap();
    println!("head {head:?}, segments {:?}", std::fs::read_dir(dir.path().join("log")).unwrap().map(|e| e.unwrap().file_name()).collect::<Vec<_>>());
    println!("from head now {:?}", s.read_all(ReadAllOptions::forward().from(head)).await.map(|v| v.len()));
    let r = s.append("a", ExpectedVersion::Exact(v), vec![ev(10)]).await.unwrap();
    println!("new event at {:?}", r.position);
    println!("from saved head {:?}", s.read_all(ReadAllOptions::forward().from(head)).await.map(|v| v.len()));
    println!("sub after saved head {:?}", s.subscribe(SubscriptionTarget::All, StartFrom::After(head.0)).await.map(|_| ()));
}

#[tokio::test]
async fn roll_crash() {
    for zeros in [0u64, 16 * 1024] {
        let dir = tempfile::tempdir().unwrap();
        let o = Options { segment_bytes: 16 * 1024, ..Options::default() };
        {
            let s = EmbeddedStore::open_with(dir.path(), o.clone()).unwrap();
            s.append("a", ExpectedVersion::Any, vec![ev(100)]).await.unwrap();
        }
        let seg = dir.path().join("log/00000000000000000000.seg");
        let bytes = std::fs::read(&seg).unwrap();
        let used = 24 + 12 + u32::from_le_bytes(bytes[24..28].try_into().unwrap()) as u64;
        std::fs::OpenOptions::new().write(true).open(&seg).unwrap().set_len(used).unwrap();
        let next = dir.path().join(format!("log/{used:020}.seg"));
        std::fs::File::create(&next).unwrap().set_len(zeros).unwrap();
        println!("open {:?}", EmbeddedStore::open_with(dir.path(), o.clone()).map(|s| s.open_report().clone()));
        println!("verify {:?}", cairn_log::verify(dir.path(), |_, _| {}));
    }
}

#[tokio::test]
async fn snapshot_after_reopen_on_empty_segment() {
    let dir = tempfile::tempdir().unwrap();
    let o = Options { segment_bytes: 16 * 1024, ..Options::default() };
    {
        let s = EmbeddedStore::open_with(dir.path(), o.clone()).unwrap();
        let mut v = 0;
        loop {
            let h = s.head_position().await.unwrap().0;
            if h + 3000 > 16 * 1024 { break; }
            v = s.append("a", ExpectedVersion::Exact(v), vec![ev(1000)]).await.unwrap().next_version;
        }
        let _ = s.append("a", ExpectedVersion::Exact(v + 5), vec![ev(3000)]).await;
    }
    for _ in 0..3 {
        let s = EmbeddedStore::open_with(dir.path(), o.clone()).unwrap();
        println!("{:?} head {:?}", s.open_report(), s.head_position().await);
    }
}
