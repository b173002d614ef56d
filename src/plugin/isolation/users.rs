//! Who a plugin runs as when the daemon is root: a dynamic uid per plugin id, allocated
//! from a range and persisted in `<data-dir>/users.json` so a plugin keeps its uid (and its
//! files stay its own) across restarts; or a user the operator named with `--plugin-user`.
//! This module knows nothing of processes: it answers "which uid and gid", nothing more.

use std::collections::BTreeMap;
use std::ffi::CString;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use super::IsolationError;
use crate::store::state::write_atomically;

/// The file, in the data directory, that remembers each plugin's dynamic uid.
pub const USERS_FILE: &str = "users.json";

/// A range of uids (and equal gids) for dynamic plugin users: `first` is kept for the
/// `--metadata` probes and `torud plugin check`, plugins get `first + 1 ..= last`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UidRange {
    /// The first uid of the range (the probes' uid).
    pub first: u32,
    /// The last uid of the range, inclusive.
    pub last: u32,
}

impl UidRange {
    /// Who `--metadata` probes (and `torud plugin check`) run as: the range's first uid,
    /// with the same gid.
    pub fn probe_credentials(&self) -> crate::plugin::process::Credentials {
        crate::plugin::process::Credentials {
            uid: self.first,
            gid: self.first,
        }
    }
}

/// The default range, as `--plugin-uid-range` writes it: the 65536 uids from 524288.
pub const DEFAULT_UID_RANGE: &str = "524288-589823";

impl Default for UidRange {
    fn default() -> Self {
        DEFAULT_UID_RANGE
            .parse()
            .expect("DEFAULT_UID_RANGE is a valid range")
    }
}

impl std::str::FromStr for UidRange {
    type Err = String;

    /// `FIRST-LAST`, e.g. `524288-589823`; at least two uids, none of them 0.
    fn from_str(text: &str) -> Result<Self, String> {
        let (a, b) = text
            .split_once('-')
            .ok_or_else(|| format!("{text:?} is not FIRST-LAST"))?;
        let parse = |s: &str| {
            s.trim()
                .parse::<u32>()
                .map_err(|_| format!("{s:?} is not a uid"))
        };
        let (first, last) = (parse(a)?, parse(b)?);
        if first == 0 || last <= first || last == u32::MAX {
            return Err(format!(
                "{text:?}: the range must hold at least two uids, above 0 and below 4294967295"
            ));
        }
        Ok(UidRange { first, last })
    }
}

impl std::fmt::Display for UidRange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}–{}", self.first, self.last)
    }
}

/// A user chosen for one plugin with `--plugin-user ID=USER|UID`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UserChoice {
    /// A user name, looked up in the user database at start-up.
    Name(String),
    /// A numeric uid (its gid is the user database's, or the same number).
    Uid(u32),
}

/// Parses `ID=USER|UID`.
pub fn parse_plugin_user(text: &str) -> Result<(String, UserChoice), String> {
    let (id, user) = text
        .split_once('=')
        .ok_or_else(|| format!("{text:?} is not ID=USER or ID=UID"))?;
    if !toru_plugin_sdk::metadata::is_valid_id(id) {
        return Err(format!("{id:?} is not a plugin id"));
    }
    let user = user.trim();
    if user.is_empty() {
        return Err(format!("no user given for {id}"));
    }
    let choice = match user.parse::<u32>() {
        Ok(uid) => UserChoice::Uid(uid),
        Err(_) => UserChoice::Name(user.to_owned()),
    };
    Ok((id.to_owned(), choice))
}

/// A resolved user: uid, primary gid, and its home directory if the user database has one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvedUser {
    /// The uid.
    pub uid: u32,
    /// The primary gid.
    pub gid: u32,
    /// The home directory.
    pub home: Option<PathBuf>,
}

/// Looks a user up by name (or a uid up, for its gid and home) in the user database.
pub fn resolve(choice: &UserChoice) -> Result<ResolvedUser, String> {
    match choice {
        UserChoice::Name(name) => {
            lookup_name(name).ok_or_else(|| format!("no user named {name:?} in the user database"))
        }
        UserChoice::Uid(uid) => Ok(lookup_uid(*uid).unwrap_or(ResolvedUser {
            uid: *uid,
            gid: *uid,
            home: None,
        })),
    }
}

fn lookup_name(name: &str) -> Option<ResolvedUser> {
    let name = CString::new(name).ok()?;
    passwd_entry(&|pwd, buf, len, out| {
        // SAFETY: valid pointers to a local passwd, buffer and result slot.
        unsafe { libc::getpwnam_r(name.as_ptr(), pwd, buf, len, out) }
    })
}

fn lookup_uid(uid: u32) -> Option<ResolvedUser> {
    passwd_entry(&|pwd, buf, len, out| {
        // SAFETY: valid pointers to a local passwd, buffer and result slot.
        unsafe { libc::getpwuid_r(uid, pwd, buf, len, out) }
    })
}

type PasswdCall<'a> = dyn Fn(*mut libc::passwd, *mut libc::c_char, libc::size_t, *mut *mut libc::passwd) -> libc::c_int
    + 'a;

fn passwd_entry(call: &PasswdCall<'_>) -> Option<ResolvedUser> {
    let mut buf = vec![0 as libc::c_char; 16 * 1024];
    // SAFETY: an all-zero passwd is a valid value to be overwritten.
    let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
    let mut out: *mut libc::passwd = std::ptr::null_mut();
    let rc = call(&mut pwd, buf.as_mut_ptr(), buf.len(), &mut out);
    if rc != 0 || out.is_null() {
        return None;
    }
    let home = (!pwd.pw_dir.is_null()).then(|| {
        // SAFETY: getpw*_r filled pw_dir with a NUL-terminated string inside `buf`.
        let dir = unsafe { std::ffi::CStr::from_ptr(pwd.pw_dir) };
        {
            use std::os::unix::ffi::OsStrExt;
            PathBuf::from(std::ffi::OsStr::from_bytes(dir.to_bytes()))
        }
    });
    Some(ResolvedUser {
        uid: pwd.pw_uid,
        gid: pwd.pw_gid,
        home,
    })
}

/// The dynamic uids given out so far, by plugin id, persisted.
///
/// A uid is returned only once the file holding it is on disk. Saves are group commits:
/// while one caller writes the file, the uids others allocate meanwhile wait and are all
/// saved by the next single write, so a thousand new plugins starting together cost a few
/// writes, not a thousand. Blocking (the file is synced): call from a blocking thread.
pub struct UserTable {
    path: PathBuf,
    range: UidRange,
    /// The uids, and which are not yet on disk. Locked to look up or allocate, never across
    /// the write.
    uids: Mutex<Uids>,
    /// Held across a write of the file, so writes happen one at a time. Waited for on the
    /// runtime by [`UserTable::save_uid`] (callers queued behind a write hold no thread) and
    /// on the calling thread by [`UserTable::uid_of`].
    writer: Arc<tokio::sync::Mutex<()>>,
}

/// The table in memory, with the generations that tell what is saved.
#[derive(Default)]
struct Uids {
    by_id: BTreeMap<String, u32>,
    /// The generation at which each uid not yet on disk was allocated.
    unsaved: BTreeMap<String, u64>,
    /// Bumped at each allocation.
    generation: u64,
    /// Every allocation up to this generation is on disk.
    saved: u64,
    /// Writes of the file made so far (for tests).
    writes: u64,
}

impl UserTable {
    /// Loads `path` (missing: empty).
    pub fn open(path: &Path, range: UidRange) -> Result<Self, IsolationError> {
        let uids = match std::fs::read(path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| IsolationError::UsersFile {
                path: path.to_owned(),
                reason: format!(
                    "it is corrupt ({e}); fix it or delete it (plugins then get new uids \
                         and their directories are handed to them)"
                ),
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeMap::new(),
            Err(e) => {
                return Err(IsolationError::UsersFile {
                    path: path.to_owned(),
                    reason: e.to_string(),
                })
            }
        };
        Ok(UserTable {
            path: path.to_owned(),
            range,
            uids: Mutex::new(Uids {
                by_id: uids,
                ..Uids::default()
            }),
            writer: Arc::new(tokio::sync::Mutex::new(())),
        })
    }

    /// The range uids come from.
    pub fn range(&self) -> UidRange {
        self.range
    }

    /// The uid of plugin `id`: the one it had, or the lowest free one of the range (saved
    /// before it is returned, together with any others allocated meanwhile).
    pub fn uid_of(&self, id: &str) -> Result<u32, IsolationError> {
        let (uid, generation) = self.allocate(id)?;
        if self.saved(generation) {
            return Ok(uid);
        }
        let _writing = self.writer.blocking_lock();
        self.save(id, uid, generation)
    }

    /// [`Self::uid_of`] for async callers: waits for a write under way on the runtime, not on
    /// a blocking thread, and only the write itself runs on one. A thousand new plugins
    /// starting together thus share a few writes (each saves every uid allocated before
    /// it), where callers waiting on threads (a few at a time, to bound the threads) made
    /// hundreds of them.
    pub async fn save_uid(self: &Arc<Self>, id: &str) -> Result<u32, IsolationError> {
        let (uid, generation) = self.allocate(id)?;
        if self.saved(generation) {
            return Ok(uid);
        }
        let writing = self.writer.clone().lock_owned().await;
        if self.saved(generation) {
            return Ok(uid);
        }
        let (table, id) = (self.clone(), id.to_owned());
        tokio::task::spawn_blocking(move || {
            let _writing = writing;
            table.save(&id, uid, generation)
        })
        .await
        .expect("users.json writer panicked")
    }

    /// Whether every allocation up to `generation` is on disk.
    fn saved(&self, generation: u64) -> bool {
        self.uids.lock().expect("user table poisoned").saved >= generation
    }

    /// Writes the table unless a write made meanwhile saved `generation`; on failure gives
    /// `id`'s new uid back. The caller holds the writer lock. Blocking.
    fn save(&self, id: &str, uid: u32, generation: u64) -> Result<u32, IsolationError> {
        let (bytes, upto) = {
            let uids = self.uids.lock().expect("user table poisoned");
            if uids.saved >= generation {
                // A write made while this caller waited saved its uid.
                return Ok(uid);
            }
            let bytes = serde_json::to_vec_pretty(&uids.by_id).expect("a map of uids serialises");
            (bytes, uids.generation)
        };
        let written = write_atomically(&self.path, &bytes, 0o600);
        let mut uids = self.uids.lock().expect("user table poisoned");
        uids.writes += 1;
        match written {
            Ok(()) => {
                uids.saved = upto;
                uids.unsaved.retain(|_, g| *g > upto);
                Ok(uid)
            }
            Err(e) => {
                // Only this caller's uid is given back; others still waiting write again.
                if uids.unsaved.remove(id).is_some() {
                    uids.by_id.remove(id);
                }
                Err(IsolationError::UsersFile {
                    path: self.path.clone(),
                    reason: e.to_string(),
                })
            }
        }
    }

    /// `id`'s uid, allocated if it has none in the range, with the generation that must be
    /// saved before it is returned (0: already on disk).
    fn allocate(&self, id: &str) -> Result<(u32, u64), IsolationError> {
        let mut uids = self.uids.lock().expect("user table poisoned");
        let range = self.range;
        let in_range = |uid: u32| uid > range.first && uid <= range.last;
        if let Some(&uid) = uids.by_id.get(id) {
            if in_range(uid) {
                return Ok((uid, uids.unsaved.get(id).copied().unwrap_or(0)));
            }
        }
        let taken: std::collections::HashSet<u32> = uids.by_id.values().copied().collect();
        let uid = (range.first + 1..=range.last)
            .find(|uid| !taken.contains(uid))
            .ok_or(IsolationError::RangeFull(range))?;
        uids.generation += 1;
        let generation = uids.generation;
        uids.by_id.insert(id.to_owned(), uid);
        uids.unsaved.insert(id.to_owned(), generation);
        Ok((uid, generation))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_range_is_the_65536_uids_from_524288() {
        assert_eq!(
            UidRange::default(),
            UidRange {
                first: 524_288,
                last: 524_288 + 65_535
            }
        );
    }

    #[test]
    fn uids_are_allocated_once_and_kept_across_reloads() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(USERS_FILE);
        let range: UidRange = "1000-1003".parse().unwrap();
        let table = UserTable::open(&path, range).unwrap();
        assert_eq!(table.uid_of("a").unwrap(), 1001);
        assert_eq!(table.uid_of("b").unwrap(), 1002);
        assert_eq!(table.uid_of("a").unwrap(), 1001);
        let again = UserTable::open(&path, range).unwrap();
        assert_eq!(again.uid_of("b").unwrap(), 1002);
        assert_eq!(again.uid_of("c").unwrap(), 1003);
        assert!(matches!(
            again.uid_of("d"),
            Err(IsolationError::RangeFull(_))
        ));
    }

    #[test]
    fn uids_allocated_together_are_all_on_disk_when_returned() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(USERS_FILE);
        let range: UidRange = "1000-2000".parse().unwrap();
        let table = std::sync::Arc::new(UserTable::open(&path, range).unwrap());
        let threads: Vec<_> = (0..32)
            .map(|i| {
                let (table, path) = (table.clone(), path.clone());
                std::thread::spawn(move || {
                    let id = format!("p{i}");
                    let uid = table.uid_of(&id).unwrap();
                    let saved: BTreeMap<String, u32> =
                        serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
                    assert_eq!(saved.get(&id), Some(&uid), "returned before it was saved");
                    uid
                })
            })
            .collect();
        let mut uids: Vec<u32> = threads.into_iter().map(|t| t.join().unwrap()).collect();
        uids.sort();
        uids.dedup();
        assert_eq!(uids.len(), 32, "every plugin its own uid");
    }

    #[test]
    fn new_plugins_starting_together_share_a_few_writes() {
        // Each write is a new temporary file, an fsync and a rename: a few for 500 plugins,
        // not one per handful of them.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(USERS_FILE);
        let range: UidRange = "1000-5000".parse().unwrap();
        let table = Arc::new(UserTable::open(&path, range).unwrap());
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .build()
            .unwrap();
        let uids = runtime.block_on(async {
            let saves: Vec<_> = (0..500)
                .map(|i| {
                    let (table, path) = (table.clone(), path.clone());
                    tokio::spawn(async move {
                        let id = format!("p{i}");
                        let uid = table.save_uid(&id).await.unwrap();
                        let saved: BTreeMap<String, u32> =
                            serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
                        assert_eq!(saved.get(&id), Some(&uid), "returned before it was saved");
                        uid
                    })
                })
                .collect();
            let mut uids = Vec::new();
            for save in saves {
                uids.push(save.await.unwrap());
            }
            uids
        });
        let mut distinct = uids.clone();
        distinct.sort();
        distinct.dedup();
        assert_eq!(distinct.len(), 500, "every plugin its own uid");
        let writes = table.uids.lock().unwrap().writes;
        assert!(
            writes <= 20,
            "{writes} writes of users.json for 500 new plugins"
        );
    }

    #[test]
    fn ranges_and_user_choices_parse() {
        assert!("0-10".parse::<UidRange>().is_err());
        assert!("10-10".parse::<UidRange>().is_err());
        assert_eq!(
            parse_plugin_user("sys=root").unwrap(),
            ("sys".into(), UserChoice::Name("root".into()))
        );
        assert_eq!(
            parse_plugin_user("sys=1234").unwrap().1,
            UserChoice::Uid(1234)
        );
        assert!(parse_plugin_user("bad id=root").is_err());
        assert_eq!(resolve(&UserChoice::Name("root".into())).unwrap().uid, 0);
    }
}
