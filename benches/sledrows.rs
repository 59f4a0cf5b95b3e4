//! How sled 0.34's memory depends on how many turns one row holds (issue 16, "fewer,
//! larger keys"). Not the store's code: sled alone, with rows shaped like confab's.
//!
//! ```sh
//! cargo bench --bench sledrows -- K     # K = turns per row: 1, 2, 3 or 6
//! ```
//! Writes 100,000 conversations of 6 turns (300 bytes each) plus a user row each, in
//! rows of K turns, into a temp dir; reopens it in a fresh process with an 8 MB page cache
//! (confab's default `store.cache_capacity_mb`) and prints the RSS after opening, then
//! after 10,000 "active users" (each reads its conversation's last row and appends one).
//! Run it with `MALLOC_ARENA_MAX=2`, as the daemon caps its arenas.

fn rss_mib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        .map_or(0, |kb| kb / 1024)
}

fn key(conv: u32, seq: u64) -> Vec<u8> {
    let id = 1_000_000 + conv;
    let mut k = format!("tassistant\0tg\0{id}\0{id}\0").into_bytes();
    k.extend_from_slice(&seq.to_be_bytes());
    k
}

fn open(dir: &std::path::Path) -> (sled::Db, sled::Tree) {
    let db = sled::Config::new()
        .path(dir)
        .cache_capacity(8 * 1024 * 1024)
        .open()
        .expect("open");
    let rows = db.open_tree("rows").expect("tree");
    (db, rows)
}

/// The measured half, in a fresh process (the writer's freed heap would count otherwise).
fn measure(dir: &std::path::Path, k: u64) {
    let turn = vec![7u8; 300];
    let (db, rows) = open(dir);
    let opened = rss_mib();
    for user in 0..10_000u32 {
        let conv = user * 10;
        let prefix = key(conv, 0);
        let last = rows.scan_prefix(&prefix[..prefix.len() - 8]).next_back();
        assert!(matches!(last, Some(Ok(_))), "conversation {conv} has rows");
        rows.insert(key(conv, 100), turn.repeat(2)).expect("append");
    }
    db.flush().expect("flush");
    println!(
        "turns per row {k}: RSS after opening {opened} MiB, after 10,000 active users {} MiB; on disk {} MiB",
        rss_mib(),
        db.size_on_disk().unwrap_or(0) / (1024 * 1024)
    );
}

fn main() {
    let k: u64 = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .filter(|k| [1, 2, 3, 6].contains(k))
        .unwrap_or(2);
    if let Some(dir) = std::env::var_os("SLEDROWS_DIR") {
        return measure(std::path::Path::new(&dir), k);
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let turn = vec![7u8; 300];
    {
        let (db, rows) = open(dir.path());
        for conv in 0..100_000u32 {
            let mut batch = sled::Batch::default();
            for row in 0..6 / k {
                batch.insert(key(conv, row), turn.repeat(k as usize));
            }
            batch.insert(format!("utg:{conv}").into_bytes(), vec![1u8; 80]);
            rows.apply_batch(batch).expect("write");
        }
        db.flush().expect("flush");
    }
    let exe = std::env::current_exe().expect("own path");
    let status = std::process::Command::new(exe)
        .arg(k.to_string())
        .env("SLEDROWS_DIR", dir.path())
        .status()
        .expect("measuring process");
    assert!(status.success());
}
