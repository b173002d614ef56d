//! How plugins are kept from the daemon's secrets and from each other, as policy: who each
//! plugin runs as, the modes and owners of the data directory's parts, which cgroup holds a
//! plugin's processes, and the one start-up line that says what is in force.
//!
//! When the daemon is root, each plugin runs under its own unprivileged uid (dynamic, from
//! a range, persisted in `users.json`; or one chosen with `--plugin-user`, `root` only when
//! named). The data directory is then traverse-only (0711) for them, everything of the
//! daemon's in it is root's and 0600/0700, and each plugin owns only `plugins/<id>/` and
//! `run/<id>/` (0700). When the daemon is not root, plugins share its uid and the file
//! modes alone do not separate them (see `docs/SECURITY.md`).
//! This module decides; `process.rs` applies the decision in the child before exec.

pub mod cgroup;
pub mod sandbox;
pub mod users;

use std::collections::BTreeMap;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::config::{create_dir_with_mode, Config};
use crate::plugin::process::Credentials;
pub use cgroup::{CgroupRoot, PluginCgroup};
pub use users::{UidRange, UserChoice, UserTable};

/// Errors of isolation: they name the file or the plugin and what to do.
#[derive(Debug, thiserror::Error)]
pub enum IsolationError {
    /// `users.json` could not be read, parsed or written.
    #[error("plugin users file {path}: {reason}")]
    UsersFile {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// Every uid of the range is taken.
    #[error("every uid of the plugin uid range {0} is taken; give a larger --plugin-uid-range")]
    RangeFull(UidRange),
    /// A `--plugin-user` names no user.
    #[error("--plugin-user {id}: {reason}")]
    UnknownUser {
        /// The plugin.
        id: String,
        /// Why.
        reason: String,
    },
}

/// Whether the daemon runs as root (effective uid 0).
pub fn daemon_is_root() -> bool {
    // SAFETY: geteuid cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// The mode of the data directory, `plugins/` and `run/`: traverse-only for others when
/// plugins run as other users, private otherwise.
pub fn shared_dir_mode() -> u32 {
    if daemon_is_root() {
        0o711
    } else {
        0o700
    }
}

/// Whether a client of the control socket may use it: root, or a process in the daemon's
/// own user namespace (a plugin of an unprivileged daemon lives in a namespace of its own).
/// `Err` says why not; the connection is then closed without an answer.
pub fn control_peer_allowed(stream: &impl std::os::fd::AsRawFd) -> Result<(), String> {
    let cred = crate::plugin::connection::peer_credentials(stream).map_err(|e| e.to_string())?;
    if cred.uid == 0 {
        return Ok(());
    }
    let theirs = std::fs::read_link(format!("/proc/{}/ns/user", cred.pid));
    let ours = std::fs::read_link("/proc/self/ns/user");
    match (theirs, ours) {
        (Ok(theirs), Ok(ours)) if theirs == ours => Ok(()),
        (Ok(theirs), Ok(ours)) => Err(format!(
            "pid {} (uid {}) is in user namespace {} and the daemon in {}: a plugin's",
            cred.pid,
            cred.uid,
            theirs.display(),
            ours.display()
        )),
        (Err(e), _) | (_, Err(e)) => Err(format!(
            "the user namespace of pid {} (uid {}) cannot be read: {e}",
            cred.pid, cred.uid
        )),
    }
}

/// Who one plugin runs as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// Its uid.
    pub uid: u32,
    /// Its gid (supplementary groups are cleared).
    pub gid: u32,
    /// Its `HOME`, when the daemon sets one.
    pub home: Option<PathBuf>,
    /// Whether the daemon switches to this user before exec (`false`: the plugin keeps the
    /// daemon's user, root by explicit choice or because the daemon is not root).
    pub switch: bool,
}

impl Identity {
    /// The credentials the child switches to, if it switches.
    pub fn credentials(&self) -> Option<Credentials> {
        self.switch.then_some(Credentials {
            uid: self.uid,
            gid: self.gid,
        })
    }
}

/// The isolation in force for this daemon.
pub struct Isolation {
    /// Dynamic uids (root only).
    users: Option<std::sync::Arc<UserTable>>,
    /// `--plugin-user` choices, resolved at start-up.
    chosen: BTreeMap<String, users::ResolvedUser>,
    /// Where plugins' cgroups go, or why there are none.
    cgroups: Result<CgroupRoot, String>,
    /// What confines plugins of a daemon that is not root (`None` when root).
    sandbox: Option<sandbox::Support>,
}

impl Isolation {
    /// Decides the isolation for `config`: loads the uid table and resolves the chosen
    /// users (root), and prepares the cgroup root.
    pub fn prepare(config: &Config) -> Result<Self, IsolationError> {
        let root = daemon_is_root();
        let users = root
            .then(|| {
                UserTable::open(
                    &config.data_dir.join(users::USERS_FILE),
                    config.plugin_uid_range,
                )
                .map(std::sync::Arc::new)
            })
            .transpose()?;
        let mut chosen = BTreeMap::new();
        for (id, choice) in &config.plugin_users {
            let user = users::resolve(choice).map_err(|reason| IsolationError::UnknownUser {
                id: id.clone(),
                reason,
            })?;
            chosen.insert(id.clone(), user);
        }
        // Without root, plugins share the daemon's uid and so could write to any cgroup it
        // owns (join another, or kill one): a delegated cgroup would hand them a weapon.
        let cgroups = if root {
            CgroupRoot::prepare(&config.data_dir)
        } else {
            Err(
                "the daemon is not root, and plugins sharing its uid could write to its cgroups"
                    .into(),
            )
        };
        let sandbox = (!root).then(|| {
            // Plugins share this uid: keep them out of /proc/<daemon>/{environ,fd,root,mem}.
            // SAFETY: a plain prctl.
            unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) };
            sandbox::Support::probe()
        });
        Ok(Isolation {
            users,
            chosen,
            cgroups,
            sandbox,
        })
    }

    /// Who plugin `id` runs as.
    pub fn identity(&self, config: &Config, id: &str) -> Result<Identity, IsolationError> {
        let Some(users) = &self.users else {
            // SAFETY: getuid/getgid cannot fail.
            let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
            return Ok(Identity {
                uid,
                gid,
                home: None,
                switch: false,
            });
        };
        if let Some(user) = self.chosen.get(id) {
            return Ok(Identity {
                uid: user.uid,
                gid: user.gid,
                home: user.home.clone(),
                switch: user.uid != 0,
            });
        }
        let uid = users.uid_of(id)?;
        Ok(Identity {
            uid,
            gid: uid,
            home: Some(config.plugin_data_dir(id)),
            switch: true,
        })
    }

    /// Allocates plugin `id`'s dynamic uid, if it gets one, and waits (on the runtime) until
    /// it is saved, so that [`Self::identity`] then finds it saved and does not write.
    pub async fn save_uid(&self, id: &str) -> Result<(), IsolationError> {
        match &self.users {
            Some(users) if !self.chosen.contains_key(id) => users.save_uid(id).await.map(|_| ()),
            _ => Ok(()),
        }
    }

    /// Who `--metadata` probes and `torud plugin check` run as: the range's first uid when
    /// the daemon is root (they need no data), the daemon's user otherwise.
    pub fn probe_credentials(&self) -> Option<Credentials> {
        self.users.as_ref().map(|u| u.range().probe_credentials())
    }

    /// How probes hide the data directory, when the daemon is not root.
    pub fn probe_hide(&self, config: &Config) -> Option<sandbox::Hide> {
        self.sandbox.map(|support| sandbox::Hide {
            data_dir: config.data_dir.clone(),
            support,
        })
    }

    /// The private view of the data directory for plugin `id`, when the daemon is not root.
    pub fn sandbox(&self, config: &Config, id: &str) -> Option<std::io::Result<sandbox::Sandbox>> {
        let support = self.sandbox?;
        let own = [config.plugin_data_dir(id), config.plugin_run_dir(id)];
        Some(sandbox::Sandbox::new(&config.data_dir, &own, support))
    }

    /// Where plugins' cgroups go, if they can have them.
    pub fn cgroups(&self) -> Option<&CgroupRoot> {
        self.cgroups.as_ref().ok()
    }

    /// One line saying what isolation is in force, for the start-up log.
    pub fn describe(&self) -> String {
        let users = match &self.users {
            Some(table) => {
                let mut text = format!("per-plugin users (uids {})", table.range());
                if !self.chosen.is_empty() {
                    let chosen: Vec<String> = self
                        .chosen
                        .iter()
                        .map(|(id, u)| format!("{id}={}", u.uid))
                        .collect();
                    text.push_str(&format!(", chosen users {}", chosen.join(" ")));
                }
                text
            }
            None => self.sandbox.map(|s| s.describe()).unwrap_or_default(),
        };
        let cgroups = match &self.cgroups {
            Ok(root) => format!("cgroup v2 {}", root.dir().display()),
            Err(why) => format!("no cgroups ({why}; stops kill by the inherited socket marker)"),
        };
        let control = if self.users.is_some() {
            "control socket root-only"
        } else {
            "control socket owner-only, closed to other user namespaces"
        };
        format!("isolation: {users}, {cgroups}, {control}")
    }

    /// Makes plugin `id`'s own directories (`plugins/<id>/`, `run/<id>/`), 0700 and owned by
    /// its user; a directory it does not own yet (a new uid, an older layout) is handed over
    /// with everything in it.
    pub fn prepare_plugin_dirs(
        &self,
        config: &Config,
        id: &str,
        who: &Identity,
    ) -> std::io::Result<()> {
        for dir in [config.plugin_data_dir(id), config.plugin_run_dir(id)] {
            create_dir_with_mode(&dir, 0o700)?;
            if who.switch && std::fs::symlink_metadata(&dir)?.uid() != who.uid {
                chown_tree(&dir, who.uid, who.gid)?;
            }
        }
        Ok(())
    }
}

/// Hands `dir` and everything below it to `uid:gid` (symbolic links themselves, never their
/// targets).
fn chown_tree(dir: &Path, uid: u32, gid: u32) -> std::io::Result<()> {
    std::os::unix::fs::lchown(dir, Some(uid), Some(gid))?;
    if std::fs::symlink_metadata(dir)?.is_dir() {
        for entry in std::fs::read_dir(dir)? {
            chown_tree(&entry?.path(), uid, gid)?;
        }
    }
    Ok(())
}

/// Why the user `who` cannot execute `binary` (a directory on the way it cannot traverse,
/// or a file it cannot read and execute), with the fix (`other_fix`, e.g. choosing another
/// user); `None` when it can, or when `who` is `None` (the daemon's own user).
pub fn unreachable(binary: &Path, who: Option<Credentials>, other_fix: &str) -> Option<String> {
    let who = who?;
    if let Some(reason) = untraversable(binary.ancestors().skip(1), binary, who, other_fix) {
        return Some(reason);
    }
    let meta = std::fs::metadata(binary).ok()?;
    let script = {
        use std::io::Read;
        let mut head = [0u8; 2];
        std::fs::File::open(binary)
            .and_then(|mut f| f.read_exact(&mut head))
            .is_ok()
            && &head == b"#!"
    };
    let need = if script { 0o5 } else { 0o1 };
    if !allows(&meta, who, need) {
        return Some(format!(
            "its user (uid {}) cannot {} {}: mode {:04o} owned by {}:{}; chmod o+{} it{other_fix}",
            who.uid,
            if script {
                "read and execute"
            } else {
                "execute"
            },
            binary.display(),
            meta.permissions().mode() & 0o7777,
            meta.uid(),
            meta.gid(),
            if script { "rx" } else { "x" },
        ));
    }
    None
}

/// Why the user `who` cannot enter the directory `dir` (as its working directory): it, or a
/// directory on the way, is one it cannot traverse; with the fix (`other_fix`). `None` when
/// it can, or when `who` is `None` (the daemon's own user).
pub fn cannot_enter(dir: &Path, who: Option<Credentials>, other_fix: &str) -> Option<String> {
    untraversable(dir.ancestors(), dir, who?, other_fix)
}

/// Why `who` cannot reach `target`: the first of `dirs` (innermost first, as
/// [`Path::ancestors`] gives them), counted from the root, that it may not traverse.
fn untraversable<'a>(
    dirs: impl Iterator<Item = &'a Path>,
    target: &Path,
    who: Credentials,
    other_fix: &str,
) -> Option<String> {
    let mut dirs: Vec<&Path> = dirs.collect();
    dirs.reverse();
    for dir in dirs {
        let Ok(meta) = std::fs::metadata(dir) else {
            continue;
        };
        if !allows(&meta, who, 0o1) {
            return Some(format!(
                "its user (uid {}) cannot reach {}: the directory {} is mode {:04o} owned by \
                 {}:{}; let it be traversed (chmod o+x {}){other_fix}",
                who.uid,
                target.display(),
                dir.display(),
                meta.permissions().mode() & 0o7777,
                meta.uid(),
                meta.gid(),
                dir.display()
            ));
        }
    }
    None
}

/// Whether the permission bits of `meta` give `who` all of `need` (r=4, w=2, x=1).
fn allows(meta: &std::fs::Metadata, who: Credentials, need: u32) -> bool {
    let mode = meta.permissions().mode();
    let bits = if meta.uid() == who.uid {
        mode >> 6
    } else if meta.gid() == who.gid {
        mode >> 3
    } else {
        mode
    };
    bits & need == need
}
