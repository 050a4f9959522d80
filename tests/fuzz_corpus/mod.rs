//! Replays the committed fuzz corpus (`fuzz/corpus/<target>/*`) on the stable toolchain through
//! the very functions the fuzz targets call (`fuzz/src/lib.rs`, included here as `harness`), so a
//! crash the fuzzer found and we committed stays fixed.

#[path = "../../fuzz/src/lib.rs"]
pub mod harness;

use std::path::PathBuf;

fn corpus_dir(target: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz")
        .join("corpus")
        .join(target)
}

/// Runs `f` on every file of the target's corpus; names the file that failed. Returns the count.
fn replay(target: &str, f: fn(&[u8])) -> usize {
    let dir = corpus_dir(target);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("corpus {}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    for p in &files {
        let data = std::fs::read(p).unwrap();
        if let Err(e) = std::panic::catch_unwind(|| f(&data)) {
            let msg = e
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            panic!("fuzz corpus {target}: {} failed: {msg}", p.display());
        }
    }
    files.len()
}

#[test]
fn session_corpus_replays() {
    let n = replay("session", harness::session_target);
    assert!(
        n >= 10,
        "the session corpus should hold at least 10 inputs, found {n}"
    );
}

#[test]
fn session_raw_corpus_replays() {
    let n = replay("session_raw", harness::session_raw_target);
    assert!(
        n >= 5,
        "the session_raw corpus should hold at least 5 inputs, found {n}"
    );
}

#[test]
fn parse_corpus_replays() {
    let n = replay("parse", harness::parse_target);
    assert!(
        n >= 10,
        "the parse corpus should hold at least 10 inputs, found {n}"
    );
}

#[test]
fn data_corpus_replays() {
    let n = replay("data", harness::data_target);
    assert!(
        n >= 10,
        "the data corpus should hold at least 10 inputs, found {n}"
    );
}
