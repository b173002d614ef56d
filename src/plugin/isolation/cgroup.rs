//! One cgroup v2 per plugin, so stopping a plugin stops everything it started, even a
//! descendant that left the process group with `setsid()` and ignores SIGTERM.
//!
//! The daemon finds the cgroup2 mount (`/proc/self/mountinfo`) and its own cgroup
//! (`/proc/self/cgroup`, the `0::` line) and makes `<own cgroup>/torud-<hash of the data
//! dir>/<plugin id>/`. A child joins its cgroup before exec by writing to a `cgroup.procs`
//! descriptor opened before the fork; every stop writes `1` to `cgroup.kill`, waits for
//! `cgroup.events` to say `populated 0`, and removes the directory.
//! This module knows nothing of plugins' states, sockets or users.

use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// How often an emptying cgroup is polled.
const POLL: Duration = Duration::from_millis(2);

/// The cgroup under which this daemon makes its plugins' cgroups.
#[derive(Debug, Clone)]
pub struct CgroupRoot {
    dir: PathBuf,
}

impl CgroupRoot {
    /// Finds the cgroup2 hierarchy and makes this data directory's cgroup in the daemon's
    /// own; `Err` says why plugins cannot have cgroups here.
    pub fn prepare(data_dir: &Path) -> Result<CgroupRoot, String> {
        let mountinfo = std::fs::read_to_string("/proc/self/mountinfo")
            .map_err(|e| format!("cannot read /proc/self/mountinfo: {e}"))?;
        let (mount, mount_root) =
            cgroup2_mount(&mountinfo).ok_or("no cgroup2 file system is mounted")?;
        let own = std::fs::read_to_string("/proc/self/cgroup")
            .map_err(|e| format!("cannot read /proc/self/cgroup: {e}"))?;
        let own = own
            .lines()
            .find_map(|l| l.strip_prefix("0::"))
            .ok_or("the daemon is in no cgroup v2 (no 0:: line in /proc/self/cgroup)")?;
        let relative = own
            .strip_prefix(mount_root.as_str())
            .unwrap_or(own)
            .trim_start_matches('/');
        let hash = {
            use sha2::{Digest, Sha256};
            hex::encode(&Sha256::digest(data_dir.as_os_str().as_encoded_bytes())[..6])
        };
        let dir = mount.join(relative).join(format!("torud-{hash}"));
        match std::fs::create_dir(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(format!("cannot create {}: {e}", dir.display())),
        }
        if !dir.join("cgroup.kill").exists() {
            return Err(format!(
                "{} has no cgroup.kill (Linux 5.14 or later is needed)",
                dir.display()
            ));
        }
        Ok(CgroupRoot { dir })
    }

    /// The directory holding the plugins' cgroups.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Kills whatever an earlier run of this daemon left in its plugins' cgroups (a daemon
    /// that was SIGKILLed), and removes them. Returns how many cgroups held processes.
    pub async fn sweep(&self) -> usize {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return 0;
        };
        let mut populated = 0;
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                let cgroup = PluginCgroup {
                    dir: entry.path(),
                    procs: None,
                    armed: true,
                };
                if cgroup.populated() {
                    populated += 1;
                }
                cgroup.kill_all(Duration::from_secs(5)).await;
            }
        }
        populated
    }

    /// Makes (or empties and reuses) plugin `id`'s cgroup and opens its `cgroup.procs` for
    /// the child to join with.
    pub async fn plugin(&self, id: &str) -> std::io::Result<PluginCgroup> {
        let dir = self.dir.join(id);
        match std::fs::create_dir(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                // Left from a run whose stop could not finish: empty it first.
                let stale = PluginCgroup {
                    dir: dir.clone(),
                    procs: None,
                    armed: true,
                };
                stale.kill_all(Duration::from_secs(5)).await;
                // Its `Drop` removes the directory: drop it before making the new one.
                drop(stale);
                let _ = std::fs::create_dir(&dir);
            }
            Err(e) => return Err(e),
        }
        let procs = std::fs::OpenOptions::new()
            .write(true)
            .open(dir.join("cgroup.procs"))?;
        Ok(PluginCgroup {
            dir,
            procs: Some(procs.into()),
            armed: true,
        })
    }

    /// Removes the daemon's cgroup directory at shutdown (fails harmlessly if a plugin's
    /// cgroup could not be removed).
    pub fn remove(&self) {
        let _ = std::fs::remove_dir(&self.dir);
    }
}

/// The cgroup2 mount point and the root of the hierarchy it shows, from mountinfo text.
fn cgroup2_mount(mountinfo: &str) -> Option<(PathBuf, String)> {
    mountinfo.lines().find_map(|line| {
        let (left, right) = line.split_once(" - ")?;
        if right.split_whitespace().next()? != "cgroup2" {
            return None;
        }
        let fields: Vec<&str> = left.split_whitespace().collect();
        Some((
            PathBuf::from(unescape(fields.get(4)?)),
            unescape(fields.get(3)?),
        ))
    })
}

/// Undoes mountinfo's octal escapes (`\040` for a space).
fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes
            .get(i + 1..i + 4)
            .filter(|d| d.iter().all(u8::is_ascii_digit));
        if let (b'\\', Some(d)) = (bytes[i], octal) {
            let value = d.iter().fold(0u32, |v, &b| v * 8 + u32::from(b - b'0'));
            out.push(value as u8);
            i += 4;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// One plugin's cgroup.
#[derive(Debug)]
pub struct PluginCgroup {
    dir: PathBuf,
    /// `cgroup.procs`, open for writing, until it is handed to the child.
    procs: Option<OwnedFd>,
    /// Whether dropping it kills and removes it (not for one handed over and not adopted).
    armed: bool,
}

impl PluginCgroup {
    /// The cgroup at `dir`, made by an earlier image of the daemon and handed over with its
    /// plugin. Not armed: dropping it does nothing until its plugin is adopted
    /// ([`PluginCgroup::arm`]), so a handover that is passed on (a rollback) kills nothing.
    pub fn adopted(dir: PathBuf) -> Self {
        PluginCgroup {
            dir,
            procs: None,
            armed: false,
        }
    }

    /// From now on, dropping it kills what is in it (its plugin is this image's now).
    pub fn arm(&mut self) {
        self.armed = true;
    }

    /// The cgroup's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Lets go of the cgroup without killing or removing it (its plugin is handed over to
    /// the daemon's next image): its directory.
    pub fn release(mut self) -> PathBuf {
        // An empty path does not exist: the drop does nothing.
        std::mem::take(&mut self.dir)
    }

    /// The open `cgroup.procs` for the child to write `0` to before exec (once).
    pub fn take_procs(&mut self) -> Option<OwnedFd> {
        self.procs.take()
    }

    /// Whether any process is in the cgroup (or below it).
    pub fn populated(&self) -> bool {
        std::fs::read_to_string(self.dir.join("cgroup.events"))
            .map(|text| text.lines().any(|l| l == "populated 1"))
            .unwrap_or(false)
    }

    /// SIGKILLs every process in the cgroup at once (`cgroup.kill`). Synchronous and cheap.
    pub fn kill(&self) {
        let _ = std::fs::write(self.dir.join("cgroup.kill"), b"1");
    }

    /// Kills everything in the cgroup, waits (at most `limit`) until it is empty, and
    /// removes it. Returns whether it emptied in time.
    pub async fn kill_all(&self, limit: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            self.kill();
            if !self.populated() {
                let _ = std::fs::remove_dir(&self.dir);
                return true;
            }
            if tokio::time::Instant::now() >= deadline {
                tracing::error!(cgroup = %self.dir.display(),
                    "processes still in the cgroup {limit:?} after cgroup.kill");
                return false;
            }
            tokio::time::sleep(POLL).await;
        }
    }
}

impl Drop for PluginCgroup {
    fn drop(&mut self) {
        // The stop paths empty and remove it; this only covers an actor that was dropped.
        if self.armed && self.dir.exists() {
            self.kill();
            let _ = std::fs::remove_dir(&self.dir);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_cgroup2_mount() {
        let text = "25 30 0:22 / /sys/fs/cgroup/unified\\040x rw - cgroup2 cgroup2 rw\n\
                    26 30 0:23 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory\n";
        let (mount, root) = cgroup2_mount(text).unwrap();
        assert_eq!(mount, PathBuf::from("/sys/fs/cgroup/unified x"));
        assert_eq!(root, "/");
        assert!(cgroup2_mount("26 30 0:23 / /x rw - cgroup cgroup rw\n").is_none());
    }

    #[tokio::test]
    async fn a_stale_plugin_cgroup_is_emptied_and_made_again() {
        let data = tempfile::tempdir().unwrap();
        let root = match CgroupRoot::prepare(data.path()) {
            Ok(root) => root,
            Err(why) => {
                eprintln!("SKIPPED: no cgroups here: {why}");
                return;
            }
        };
        // Left by a stop that could not finish.
        std::fs::create_dir(root.dir.join("stale")).unwrap();
        let cgroup = root
            .plugin("stale")
            .await
            .expect("a stale cgroup is reused");
        assert!(cgroup.dir.join("cgroup.procs").exists());
        assert!(cgroup.kill_all(Duration::from_secs(5)).await);
        let _ = std::fs::remove_dir(&root.dir);
    }
}
