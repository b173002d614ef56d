//! Durable per-plugin key-value storage, kept by the daemon in one embedded redb database
//! (`data/storage.redb`).
//!
//! Every entry is keyed by `(namespace, key)`; a namespace is a plugin id, and callers get a
//! [`Namespace`] bound to one id by the daemon (the plugin link binds it to the connection
//! the actor made), so nothing a plugin sends can name another namespace. Each write is one redb
//! write transaction committed with immediate durability (fsynced) before it returns, and
//! updates the namespace's usage (keys, bytes) in the same transaction, so quotas are exact
//! and a crash never leaves usage and data out of step.
//!
//! This module knows nothing of sockets, frames or gRPC: it takes [`StorageOp`]s and gives
//! [`StorageAnswer`]s.

use std::path::Path;
use std::sync::Arc;

use redb::{Database, ReadableTable, TableDefinition};
use toru_plugin_sdk::storage_wire::{StorageAnswer, StorageError, StorageOp};

/// Entries: `(namespace, key) → value`.
const DATA: TableDefinition<(&str, &str), &str> = TableDefinition::new("data");
/// Usage per namespace: `namespace → (keys, bytes)`; bytes count keys and values.
const USAGE: TableDefinition<&str, (u64, u64)> = TableDefinition::new("usage");
/// Most keys one `list` answers.
pub const MAX_LIST: u32 = 1000;

/// Limits applied to each namespace and to each entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Quotas {
    /// Keys one namespace may hold.
    pub max_keys: u64,
    /// Bytes (keys plus values) one namespace may hold.
    pub max_bytes: u64,
    /// Longest key, in bytes.
    pub max_key: usize,
    /// Longest value, in bytes.
    pub max_value: usize,
}

impl Default for Quotas {
    fn default() -> Self {
        Quotas {
            max_keys: 100_000,
            max_bytes: 64 * 1024 * 1024,
            max_key: 512,
            max_value: 1024 * 1024,
        }
    }
}

/// Why the store could not be opened. The daemon refuses to start with any of these (see
/// docs/OPERATIONS.md, "Damaged plugin storage").
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// Another process holds the database's lock.
    #[error(
        "cannot open the plugin storage {path}: another torud is using this data directory; \
         stop it, or give this daemon its own --data-dir"
    )]
    InUse {
        /// The database file.
        path: String,
    },
    /// The file is not a whole redb database: truncated, or its header overwritten.
    #[error(
        "the plugin storage {path} is damaged: {reason}. torud does not start on damaged \
         storage: restore the file from a backup, or move it away to start with empty plugin \
         storage (the plugins' stored keys are then lost)"
    )]
    Damaged {
        /// The database file.
        path: String,
        /// What is wrong with it.
        reason: String,
    },
    /// Any other failure (permissions, a full disk, ...).
    #[error("cannot open the plugin storage {path}: {reason}")]
    Failed {
        /// The database file.
        path: String,
        /// What failed.
        reason: String,
    },
}

/// The first bytes of every redb database file (redb's own magic number).
const REDB_MAGIC: [u8; 9] = [b'r', b'e', b'd', b'b', 0x1A, 0x0A, 0xA9, 0x0D, 0x0A];
/// Name of the thread that opens the database; a panic there is reported as damage, not
/// printed by the default panic hook.
const OPEN_THREAD: &str = "torud-storage-open";

/// The store; clones share it.
#[derive(Clone)]
pub struct Storage {
    db: Arc<Database>,
    quotas: Quotas,
}

/// One plugin's namespace of the store; the only way to reach its data.
#[derive(Clone)]
pub struct Namespace {
    storage: Storage,
    name: Arc<str>,
}

fn internal(e: impl Into<redb::Error>) -> StorageError {
    StorageError::new(
        "internal",
        format!("the daemon's storage failed: {}", e.into()),
    )
}

impl Storage {
    /// Opens (or creates) the database at `path` and its tables. A file that is not a whole
    /// redb database is [`OpenError::Damaged`], never a panic: redb asserts on some damage
    /// (a truncated file), so it opens on a thread of its own whose panic is caught.
    pub fn open(path: &Path, quotas: Quotas) -> Result<Self, OpenError> {
        let shown = path.display().to_string();
        check_header(path).map_err(|reason| OpenError::Damaged {
            path: shown.clone(),
            reason,
        })?;
        quiet_panics_of_open_thread();
        let owned = path.to_owned();
        let opened = std::thread::Builder::new()
            .name(OPEN_THREAD.into())
            .spawn(move || open_tables(&owned))
            .map_err(|e| OpenError::Failed {
                path: shown.clone(),
                reason: format!("cannot start a thread: {e}"),
            })?
            .join();
        let db = match opened {
            Ok(Ok(db)) => db,
            Ok(Err(e)) => {
                return Err(match *e {
                    redb::Error::DatabaseAlreadyOpen => OpenError::InUse { path: shown },
                    e @ redb::Error::Corrupted(_) => OpenError::Damaged {
                        path: shown,
                        reason: e.to_string(),
                    },
                    e => OpenError::Failed {
                        path: shown,
                        reason: e.to_string(),
                    },
                });
            }
            Err(panic) => {
                let what = panic
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_default();
                return Err(OpenError::Damaged {
                    path: shown,
                    reason: format!("redb cannot read it ({what}); it is probably truncated"),
                });
            }
        };
        Ok(Storage {
            db: Arc::new(db),
            quotas,
        })
    }

    /// The namespace `name` (a plugin id, given by the daemon).
    pub fn namespace(&self, name: &str) -> Namespace {
        Namespace {
            storage: self.clone(),
            name: name.into(),
        }
    }
}

/// Opens the database and makes sure its tables exist.
fn open_tables(path: &Path) -> Result<Database, Box<redb::Error>> {
    fn boxed(e: impl Into<redb::Error>) -> Box<redb::Error> {
        Box::new(e.into())
    }
    let db = Database::create(path).map_err(boxed)?;
    let tx = db.begin_write().map_err(boxed)?;
    tx.open_table(DATA).map_err(boxed)?;
    tx.open_table(USAGE).map_err(boxed)?;
    tx.commit().map_err(boxed)?;
    Ok(db)
}

/// A file that exists and is not empty must start with redb's magic number (an empty or
/// missing file is a new database). Says what is wrong otherwise.
fn check_header(path: &Path) -> Result<(), String> {
    use std::io::Read;
    let mut file = match std::fs::File::open(path) {
        Ok(file) => file,
        // Missing: created. Unreadable: redb's own error says why.
        Err(_) => return Ok(()),
    };
    let mut head = Vec::with_capacity(REDB_MAGIC.len());
    (&mut file)
        .take(REDB_MAGIC.len() as u64)
        .read_to_end(&mut head)
        .map_err(|e| format!("cannot read it: {e}"))?;
    if head.is_empty() || head == REDB_MAGIC {
        return Ok(());
    }
    if REDB_MAGIC.starts_with(&head) {
        return Err(format!(
            "it is {} bytes long, shorter than a redb header; it was truncated",
            head.len()
        ));
    }
    Err(
        "it does not start with a redb header (its first bytes were overwritten, or it is not \
         a redb database)"
            .into(),
    )
}

/// Keeps the default panic hook from printing a panic of the storage-open thread (the open
/// reports it as damage); every other panic is printed as before. Installed once.
fn quiet_panics_of_open_thread() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if std::thread::current().name() != Some(OPEN_THREAD) {
                previous(info);
            }
        }));
    });
}

impl Namespace {
    /// The namespace's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Runs `op`: a `get` on the calling task, anything else on a blocking thread (writes
    /// fsync; a list reads up to a page of entries).
    ///
    /// A `get` reads one key in a read transaction, from redb's page cache once warm: a few
    /// microseconds, less than the two thread wake-ups a hop to the blocking pool and back
    /// costs, and each forwarded KV call of an SDK plugin makes one.
    pub async fn apply(&self, op: StorageOp) -> Result<StorageAnswer, StorageError> {
        if let StorageOp::Get { .. } = op {
            return self.apply_blocking(&op);
        }
        let this = self.clone();
        tokio::task::spawn_blocking(move || this.apply_blocking(&op))
            .await
            .unwrap_or_else(|e| Err(StorageError::new("internal", format!("storage task: {e}"))))
    }

    /// Runs `op` on the calling thread.
    pub fn apply_blocking(&self, op: &StorageOp) -> Result<StorageAnswer, StorageError> {
        let q = &self.storage.quotas;
        let check_key = |key: &str| {
            if key.is_empty() || key.len() > q.max_key {
                return Err(StorageError::new(
                    "invalid_argument",
                    format!(
                        "keys are 1 to {} bytes; this one is {}",
                        q.max_key,
                        key.len()
                    ),
                ));
            }
            Ok(())
        };
        match op {
            StorageOp::Get { key } => {
                check_key(key)?;
                let tx = self.storage.db.begin_read().map_err(internal)?;
                let table = tx.open_table(DATA).map_err(internal)?;
                let value = table
                    .get((&*self.name, key.as_str()))
                    .map_err(internal)?
                    .map(|v| v.value().to_owned());
                Ok(StorageAnswer::Value(value))
            }
            StorageOp::Set { key, value } => {
                check_key(key)?;
                if value.len() > q.max_value {
                    return Err(StorageError::new(
                        "invalid_argument",
                        format!(
                            "values are at most {} bytes; this one is {}",
                            q.max_value,
                            value.len()
                        ),
                    ));
                }
                self.write(key, Some(value))
            }
            StorageOp::Delete { key } => {
                check_key(key)?;
                self.write(key, None)
            }
            StorageOp::List {
                prefix,
                after,
                limit,
            } => self.list(prefix, after, (*limit).clamp(1, MAX_LIST)),
        }
    }

    /// Sets (`Some`) or deletes (`None`) `key` in one durable transaction, with the quota
    /// check and the usage update inside it. Answers the previous value.
    fn write(&self, key: &str, value: Option<&str>) -> Result<StorageAnswer, StorageError> {
        let q = &self.storage.quotas;
        let tx = self.storage.db.begin_write().map_err(internal)?;
        let previous = {
            let mut data = tx.open_table(DATA).map_err(internal)?;
            let mut usage = tx.open_table(USAGE).map_err(internal)?;
            let (keys, bytes) = usage
                .get(&*self.name)
                .map_err(internal)?
                .map_or((0, 0), |u| u.value());
            let previous = data
                .get((&*self.name, key))
                .map_err(internal)?
                .map(|v| v.value().to_owned());
            let old_size = previous
                .as_ref()
                .map_or(0, |v| (key.len() + v.len()) as u64);
            let new_size = value.map_or(0, |v| (key.len() + v.len()) as u64);
            let new_keys = keys - u64::from(previous.is_some()) + u64::from(value.is_some());
            let new_bytes = bytes - old_size.min(bytes) + new_size;
            if value.is_some() && new_keys > q.max_keys {
                return Err(StorageError::new(
                    "resource_exhausted",
                    format!(
                        "the plugin's storage holds {keys} keys, its quota (--storage-max-keys); delete keys or raise the quota"
                    ),
                ));
            }
            if value.is_some() && new_bytes > q.max_bytes && new_bytes > bytes {
                return Err(StorageError::new(
                    "resource_exhausted",
                    format!(
                        "this write would bring the plugin's storage to {new_bytes} bytes, over its quota of {} (--storage-max-bytes); delete keys or raise the quota",
                        q.max_bytes
                    ),
                ));
            }
            match value {
                Some(v) => {
                    data.insert((&*self.name, key), v).map_err(internal)?;
                }
                None => {
                    data.remove((&*self.name, key)).map_err(internal)?;
                }
            }
            if new_keys == 0 {
                usage.remove(&*self.name).map_err(internal)?;
            } else {
                usage
                    .insert(&*self.name, (new_keys, new_bytes))
                    .map_err(internal)?;
            }
            previous
        };
        // Durability::Immediate is redb's default: commit returns after fsync.
        tx.commit().map_err(internal)?;
        Ok(StorageAnswer::Value(previous))
    }

    fn list(&self, prefix: &str, after: &str, limit: u32) -> Result<StorageAnswer, StorageError> {
        let tx = self.storage.db.begin_read().map_err(internal)?;
        let table = tx.open_table(DATA).map_err(internal)?;
        let start = if after.as_bytes() > prefix.as_bytes() {
            after
        } else {
            prefix
        };
        let mut keys = Vec::new();
        let mut more = false;
        for entry in table.range((&*self.name, start)..).map_err(internal)? {
            let (k, _) = entry.map_err(internal)?;
            let (ns, key) = k.value();
            if ns != &*self.name || !key.starts_with(prefix) {
                break;
            }
            if key == after {
                continue;
            }
            if keys.len() == limit as usize {
                more = true;
                break;
            }
            keys.push(key.to_owned());
        }
        Ok(StorageAnswer::Keys { keys, more })
    }

    /// Keys and bytes the namespace holds.
    pub fn usage(&self) -> Result<(u64, u64), StorageError> {
        let tx = self.storage.db.begin_read().map_err(internal)?;
        let usage = tx.open_table(USAGE).map_err(internal)?;
        Ok(usage
            .get(&*self.name)
            .map_err(internal)?
            .map_or((0, 0), |u| u.value()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(ns: &Namespace, k: &str, v: &str) -> Result<StorageAnswer, StorageError> {
        ns.apply_blocking(&StorageOp::Set {
            key: k.into(),
            value: v.into(),
        })
    }

    fn get(ns: &Namespace, k: &str) -> Option<String> {
        match ns
            .apply_blocking(&StorageOp::Get { key: k.into() })
            .unwrap()
        {
            StorageAnswer::Value(v) => v,
            other => panic!("{other:?}"),
        }
    }

    fn damaged_reason(path: &Path) -> String {
        match Storage::open(path, Quotas::default()) {
            Err(e @ OpenError::Damaged { .. }) => e.to_string(),
            Err(e) => panic!("not reported as damage: {e}"),
            Ok(_) => panic!("a damaged file opened"),
        }
    }

    fn a_store_with_one_key(dir: &Path) -> std::path::PathBuf {
        let path = dir.join("s.redb");
        let s = Storage::open(&path, Quotas::default()).unwrap();
        set(&s.namespace("a"), "k", &"v".repeat(100_000)).unwrap();
        path
    }

    #[test]
    fn a_truncated_file_is_named_as_damaged_not_a_panic() {
        let dir = tempfile::tempdir().unwrap();
        let path = a_store_with_one_key(dir.path());
        let len = std::fs::metadata(&path).unwrap().len();
        for keep in [len / 2, 4096, 5] {
            let file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
            file.set_len(keep).unwrap();
            let text = damaged_reason(&path);
            assert!(
                text.contains("s.redb")
                    && text.contains("truncated")
                    && !text.contains("another torud"),
                "{keep} bytes: {text}"
            );
        }
    }

    #[test]
    fn an_overwritten_header_is_named_as_damaged() {
        let dir = tempfile::tempdir().unwrap();
        let path = a_store_with_one_key(dir.path());
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[..4096].fill(0x5a);
        std::fs::write(&path, bytes).unwrap();
        let text = damaged_reason(&path);
        assert!(
            text.contains("s.redb")
                && text.contains("redb header")
                && !text.contains("another torud"),
            "{text}"
        );
    }

    #[test]
    fn a_database_in_use_says_so() {
        let dir = tempfile::tempdir().unwrap();
        let path = a_store_with_one_key(dir.path());
        let _first = Storage::open(&path, Quotas::default()).unwrap();
        let err = Storage::open(&path, Quotas::default()).err().unwrap();
        assert!(matches!(err, OpenError::InUse { .. }), "{err}");
        assert!(err.to_string().contains("another torud is using"), "{err}");
    }

    fn store(quotas: Quotas) -> (tempfile::TempDir, Storage) {
        let dir = tempfile::tempdir().unwrap();
        let s = Storage::open(&dir.path().join("s.redb"), quotas).unwrap();
        (dir, s)
    }

    #[test]
    fn namespaces_do_not_see_each_other() {
        let (_dir, s) = store(Quotas::default());
        let (a, b) = (s.namespace("a"), s.namespace("b"));
        set(&a, "k", "from a").unwrap();
        assert_eq!(get(&b, "k"), None);
        set(&b, "k", "from b").unwrap();
        assert_eq!(get(&a, "k").as_deref(), Some("from a"));
        let list = b
            .apply_blocking(&StorageOp::List {
                prefix: String::new(),
                after: String::new(),
                limit: 10,
            })
            .unwrap();
        assert_eq!(
            list,
            StorageAnswer::Keys {
                keys: vec!["k".into()],
                more: false
            }
        );
    }

    #[test]
    fn values_survive_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.redb");
        {
            let s = Storage::open(&path, Quotas::default()).unwrap();
            set(&s.namespace("a"), "k", "v").unwrap();
        }
        let s = Storage::open(&path, Quotas::default()).unwrap();
        assert_eq!(get(&s.namespace("a"), "k").as_deref(), Some("v"));
        assert_eq!(s.namespace("a").usage().unwrap(), (1, 2));
    }

    #[test]
    fn quotas_refuse_growth_but_allow_shrinking_and_replacing() {
        let (_dir, s) = store(Quotas {
            max_keys: 2,
            max_bytes: 10,
            ..Quotas::default()
        });
        let a = s.namespace("a");
        set(&a, "k1", "abc").unwrap();
        set(&a, "k2", "abc").unwrap();
        let e = set(&a, "k3", "x").unwrap_err();
        assert_eq!(e.code, "resource_exhausted");
        assert!(e.message.contains("--storage-max-keys"), "{e}");
        set(&a, "k2", "ab").unwrap(); // replacing to shrink: 9 bytes
        let e = set(&a, "k1", "abcdef").unwrap_err();
        assert!(e.message.contains("--storage-max-bytes"), "{e}");
        // Another namespace has its own quota.
        set(&s.namespace("b"), "k1", "abc").unwrap();
        a.apply_blocking(&StorageOp::Delete { key: "k2".into() })
            .unwrap();
        assert_eq!(a.usage().unwrap(), (1, 5));
        set(&a, "k3", "x").unwrap();
    }

    #[test]
    fn lists_page_through_a_prefix() {
        let (_dir, s) = store(Quotas::default());
        let a = s.namespace("a");
        for k in ["p1", "p2", "p3", "q1"] {
            set(&a, k, "v").unwrap();
        }
        set(&s.namespace("a2"), "p0", "v").unwrap();
        let page = |after: &str| {
            a.apply_blocking(&StorageOp::List {
                prefix: "p".into(),
                after: after.into(),
                limit: 2,
            })
            .unwrap()
        };
        assert_eq!(
            page(""),
            StorageAnswer::Keys {
                keys: vec!["p1".into(), "p2".into()],
                more: true
            }
        );
        assert_eq!(
            page("p2"),
            StorageAnswer::Keys {
                keys: vec!["p3".into()],
                more: false
            }
        );
    }

    #[test]
    fn bad_keys_and_values_are_refused() {
        let (_dir, s) = store(Quotas {
            max_value: 4,
            ..Quotas::default()
        });
        let a = s.namespace("a");
        assert_eq!(set(&a, "", "v").unwrap_err().code, "invalid_argument");
        assert_eq!(
            set(&a, &"k".repeat(513), "v").unwrap_err().code,
            "invalid_argument"
        );
        assert_eq!(set(&a, "k", "12345").unwrap_err().code, "invalid_argument");
    }
}
