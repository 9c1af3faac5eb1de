//! Test support shared by the store's tests and the uplink's: what a power cut leaves on disk.

use std::fs;
use std::path::{Path, PathBuf};

use tempfile::TempDir;

/// What a power cut leaves of `dir`: the state file as last written, each segment cut back to
/// `synced` bytes where given. Copied into a new directory, so the live log's own close (which
/// a power cut would not run) touches nothing of it.
pub(crate) fn after_power_cut(dir: &Path, synced: &[(PathBuf, u64)]) -> TempDir {
    let cut = TempDir::new().unwrap();
    for entry in fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap();
        if name == "LOCK" {
            continue;
        }
        let mut bytes = fs::read(&path).unwrap();
        if let Some((_, len)) = synced.iter().find(|(p, _)| *p == path) {
            bytes.truncate(*len as usize);
        }
        fs::write(cut.path().join(name), bytes).unwrap();
    }
    cut
}

/// Lengths of the segment files now (call right after `sync`).
pub(crate) fn synced_lengths(dir: &Path) -> Vec<(PathBuf, u64)> {
    segment_files(dir)
        .into_iter()
        .map(|p| {
            let len = fs::metadata(&p).unwrap().len();
            (p, len)
        })
        .collect()
}

/// The segment files in `dir`, oldest first.
pub(crate) fn segment_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "seg"))
        .collect();
    files.sort();
    files
}
