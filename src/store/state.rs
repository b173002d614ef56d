//! The persisted enabled/disabled state of plugins, by id.
//!
//! Written atomically (temporary file, fsync, rename, fsync of the directory), so a crash
//! leaves either the old or the new file. A corrupt file is an error naming the file, never
//! silently replaced. An id absent from the file has never been decided by an operator.
//! This module knows nothing of processes.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

/// Errors loading or saving the state file.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// Reading or writing failed.
    #[error("state file {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What failed.
        source: std::io::Error,
    },
    /// The file is not valid.
    #[error("state file {path} is corrupt ({reason}); fix or remove it (removing it disables every plugin)")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// The parse error.
        reason: String,
    },
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct StateFile {
    version: u32,
    /// Plugin id → enabled.
    plugins: BTreeMap<String, bool>,
}

/// Handle to the persisted state; clones share it.
#[derive(Clone)]
pub struct EnabledStore {
    inner: Arc<Inner>,
}

struct Inner {
    path: PathBuf,
    /// The current state. Held only to read or update it, never across I/O.
    state: Mutex<Decisions>,
    /// Serialises file writes so that the last write carries the newest state. Waited for
    /// asynchronously, so callers queued behind a write hold no thread; the guard then moves
    /// into the blocking write and is released when the write ends, even if its caller
    /// went away meanwhile. Held across no `.await` but that wait.
    write: Arc<tokio::sync::Mutex<()>>,
}

/// The decisions in memory, with the generations that tell which are on disk. Saves are
/// group commits: decisions made while one write is under way are all saved by the next
/// single write, so a thousand new plugins enabled together cost a few writes, not a
/// thousand synced rewrites of a growing file.
#[derive(Default)]
struct Decisions {
    plugins: BTreeMap<String, bool>,
    /// Bumped at each decision.
    generation: u64,
    /// Every decision up to this generation is on disk.
    saved: u64,
}

impl EnabledStore {
    /// Loads the state file; a missing file is an empty state.
    pub fn load(path: &Path) -> Result<Self, StateError> {
        let plugins = match std::fs::read(path) {
            Ok(bytes) => {
                let file: StateFile =
                    serde_json::from_slice(&bytes).map_err(|e| StateError::Corrupt {
                        path: path.to_owned(),
                        reason: e.to_string(),
                    })?;
                file.plugins
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeMap::new(),
            Err(source) => {
                return Err(StateError::Io {
                    path: path.to_owned(),
                    source,
                })
            }
        };
        Ok(EnabledStore {
            inner: Arc::new(Inner {
                path: path.to_owned(),
                state: Mutex::new(Decisions {
                    plugins,
                    ..Decisions::default()
                }),
                write: Arc::new(tokio::sync::Mutex::new(())),
            }),
        })
    }

    /// The saved decision for `id`: `None` when no operator ever enabled or disabled it.
    pub fn get(&self, id: &str) -> Option<bool> {
        self.inner
            .state
            .lock()
            .expect("state lock poisoned")
            .plugins
            .get(id)
            .copied()
    }

    /// Records a decision and writes the file durably before returning. When the write
    /// fails, the decision is taken back, so the map never claims what the disk lacks.
    ///
    /// Callers waiting for a write under way wait on the runtime, not on a blocking thread
    /// each: a thousand new plugins enabled together held a thread apiece (~180 threads at
    /// start-up, `torud-bench scale`), and their memory stayed with the daemon. One write
    /// at a time runs on a blocking thread and saves every decision made before it.
    pub async fn set(&self, id: &str, enabled: bool) -> Result<(), StateError> {
        let Some((previous, generation)) = self.inner.decide(id, enabled) else {
            return Ok(());
        };
        let writing = self.inner.write.clone().lock_owned().await;
        if self.inner.saved(generation) {
            // A write made while this caller waited saved its decision: no thread needed.
            return Ok(());
        }
        let inner = self.inner.clone();
        let id = id.to_owned();
        tokio::task::spawn_blocking(move || {
            let _writing = writing;
            inner.write_decision(&id, previous, generation)
        })
        .await
        .expect("state writer panicked")
    }
}

impl Inner {
    /// Records a decision in memory; returns the previous one and the generation that must
    /// be saved, or `None` when it is already the saved decision.
    fn decide(&self, id: &str, enabled: bool) -> Option<(Option<bool>, u64)> {
        let mut state = self.state.lock().expect("state lock poisoned");
        if state.plugins.get(id) == Some(&enabled) && state.saved == state.generation {
            return None;
        }
        state.generation += 1;
        let previous = state.plugins.insert(id.to_owned(), enabled);
        Some((previous, state.generation))
    }

    /// Whether every decision up to `generation` is on disk.
    fn saved(&self, generation: u64) -> bool {
        self.state.lock().expect("state lock poisoned").saved >= generation
    }

    /// Saves decision `generation` (alone or with others made meanwhile), or takes it back
    /// (to `previous`) when the write fails. The caller holds the write lock, so the taking
    /// back happens under it: another plugin's write can never put a decision on disk whose
    /// own write failed (and was taken back). Blocking.
    fn write_decision(
        &self,
        id: &str,
        previous: Option<bool>,
        generation: u64,
    ) -> Result<(), StateError> {
        let (plugins, upto) = {
            let state = self.state.lock().expect("state lock poisoned");
            if state.saved >= generation {
                // A write made while this caller waited saved its decision.
                return Ok(());
            }
            (state.plugins.clone(), state.generation)
        };
        let result = self.write_file(plugins);
        let mut state = self.state.lock().expect("state lock poisoned");
        match &result {
            Ok(()) => state.saved = upto,
            Err(_) => {
                match previous {
                    Some(value) => state.plugins.insert(id.to_owned(), value),
                    None => state.plugins.remove(id),
                };
            }
        }
        result
    }

    /// Writes `plugins` as the file; the caller holds the write lock.
    fn write_file(&self, plugins: BTreeMap<String, bool>) -> Result<(), StateError> {
        let file = StateFile {
            version: 1,
            plugins,
        };
        let bytes = serde_json::to_vec_pretty(&file).expect("state serialises");
        write_atomically(&self.path, &bytes, 0o600).map_err(|source| StateError::Io {
            path: self.path.clone(),
            source,
        })
    }
}

/// Writes `bytes` to `path` through a temporary file, fsync and rename, so a crash leaves
/// the old file or the new one. The new file is created with `mode` (less the umask); a
/// stale temporary file is removed first so its mode cannot carry over.
pub fn write_atomically(path: &Path, bytes: &[u8], mode: u32) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    match std::fs::remove_file(&tmp) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)?;
    file.write_all(bytes)?;
    file.sync_data()?;
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn survives_reload() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        let store = EnabledStore::load(&path).unwrap();
        assert_eq!(store.get("a"), None);
        store.set("a", true).await.unwrap();
        store.set("b", false).await.unwrap();
        let again = EnabledStore::load(&path).unwrap();
        assert_eq!((again.get("a"), again.get("b")), (Some(true), Some(false)));
    }

    #[tokio::test]
    async fn a_failed_write_takes_the_decision_back() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        std::fs::create_dir(&data).unwrap();
        let store = EnabledStore::load(&data.join("state.json")).unwrap();
        // Writes now fail: the directory became a file.
        std::fs::remove_dir(&data).unwrap();
        std::fs::write(&data, b"").unwrap();
        assert!(store.set("a", true).await.is_err());
        assert_eq!(
            store.get("a"),
            None,
            "an unsaved decision must not look saved"
        );
        assert!(
            store.set("a", true).await.is_err(),
            "a retry must write again"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn decisions_made_together_are_all_on_disk_when_answered() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        let store = EnabledStore::load(&path).unwrap();
        let sets: Vec<_> = (0..64)
            .map(|i| {
                let (store, path) = (store.clone(), path.clone());
                tokio::spawn(async move {
                    let id = format!("p{i}");
                    store.set(&id, i % 2 == 0).await.unwrap();
                    let saved = EnabledStore::load(&path).unwrap();
                    assert_eq!(saved.get(&id), Some(i % 2 == 0), "answered before saved");
                })
            })
            .collect();
        for set in sets {
            set.await.unwrap();
        }
        let saved = EnabledStore::load(&path).unwrap();
        assert!((0..64).all(|i| saved.get(&format!("p{i}")) == Some(i % 2 == 0)));
    }

    #[test]
    fn decisions_waiting_for_a_write_hold_no_thread() {
        // Blocking threads are kept a minute after their work, so the runtime's threads at
        // the end count every one it ever needed.
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("state-test-rt")
            .thread_keep_alive(std::time::Duration::from_secs(60))
            .build()
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let store = EnabledStore::load(&dir.path().join("state.json")).unwrap();
        runtime.block_on(async {
            let sets: Vec<_> = (0..200)
                .map(|i| {
                    let store = store.clone();
                    tokio::spawn(async move { store.set(&format!("p{i}"), true).await })
                })
                .collect();
            for set in sets {
                set.await.unwrap().unwrap();
            }
        });
        let threads = std::fs::read_dir("/proc/self/task")
            .unwrap()
            .filter_map(|t| std::fs::read_to_string(t.unwrap().path().join("comm")).ok())
            .filter(|comm| comm.trim() == "state-test-rt")
            .count();
        assert!(
            threads <= 2 + 3,
            "{threads} threads for 200 decisions: waiting callers hold threads"
        );
    }

    #[test]
    fn corrupt_file_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        std::fs::write(&path, b"{not json").unwrap();
        let err = EnabledStore::load(&path).err().unwrap().to_string();
        assert!(
            err.contains("state.json") && err.contains("corrupt"),
            "{err}"
        );
    }
}
