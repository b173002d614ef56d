//! The confinement of a plugin when the daemon is not root: the strongest the kernel gives
//! without privileges. In the child, before exec: a new user namespace (mapping the same
//! uid and gid) and mount namespace, mounts made private, a read-only tmpfs over the data
//! directory with only the plugin's own `plugins/<id>/` and `run/<id>/` bound back (opened
//! in the new namespace before the tmpfs covers them), then `no_new_privs` and a Landlock domain (ptrace
//! of anything outside it is refused; with ABI 6 also signals and abstract Unix sockets).
//!
//! [`Sandbox::new`] runs in the daemon and prepares every path and descriptor;
//! [`Sandbox::enter`] runs in the forked child and only makes async-signal-safe system
//! calls (no allocation). This module knows nothing of plugins or supervision.

use std::ffi::CString;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

/// `LANDLOCK_CREATE_RULESET_VERSION`.
const LANDLOCK_VERSION: libc::c_uint = 1;
/// `LANDLOCK_SCOPE_ABSTRACT_UNIX_SOCKET` (ABI 6).
const SCOPE_ABSTRACT_UNIX_SOCKET: u64 = 1;
/// `LANDLOCK_SCOPE_SIGNAL` (ABI 6).
const SCOPE_SIGNAL: u64 = 2;
/// `LANDLOCK_ACCESS_FS_REFER` (ABI 2): handled with no rule, it forbids moving and linking
/// files across directories; the least intrusive right that makes a domain before ABI 6.
const ACCESS_FS_REFER: u64 = 1 << 13;

#[repr(C)]
struct RulesetAttr {
    handled_access_fs: u64,
    handled_access_net: u64,
    scoped: u64,
}

/// What the kernel offers an unprivileged daemon, found once at start-up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Support {
    /// Unprivileged user namespaces are enabled.
    pub user_namespaces: bool,
    /// The Landlock ABI version (0: none).
    pub landlock_abi: i64,
}

impl Support {
    /// Reads the kernel's switches and asks Landlock for its ABI.
    pub fn probe() -> Support {
        let read = |path: &str| {
            std::fs::read_to_string(path)
                .ok()
                .and_then(|t| t.trim().parse::<i64>().ok())
        };
        let user_namespaces = read("/proc/sys/user/max_user_namespaces").unwrap_or(1) > 0
            && read("/proc/sys/kernel/unprivileged_userns_clone").unwrap_or(1) != 0
            && read("/proc/sys/kernel/apparmor_restrict_unprivileged_userns").unwrap_or(0) == 0;
        // SAFETY: the version query takes no pointer.
        let abi = unsafe {
            libc::syscall(
                libc::SYS_landlock_create_ruleset,
                std::ptr::null::<RulesetAttr>(),
                0usize,
                LANDLOCK_VERSION,
            )
        };
        Support {
            user_namespaces,
            landlock_abi: abi.max(0),
        }
    }

    /// What the line at start-up says.
    pub fn describe(&self) -> String {
        let ns = if self.user_namespaces {
            "a private mount namespace per plugin showing only its own directories"
        } else {
            "NO private mount namespaces (unprivileged user namespaces are disabled: plugins \
             can read the data directory and use the control socket)"
        };
        let landlock = match self.landlock_abi {
            0 | 1 => "NO Landlock domain (plugins may ptrace or signal each other)".to_owned(),
            2..=5 => format!(
                "Landlock ABI {} (ptrace scoped; signals NOT scoped, ABI 6 needed; no moving \
                 files across directories)",
                self.landlock_abi
            ),
            abi => format!("Landlock ABI {abi} (ptrace, signals and abstract sockets scoped)"),
        };
        format!("same user as the daemon, {ns}, {landlock}")
    }
}

/// How to hide a data directory from a short-lived process that needs none of it (the
/// `--metadata` probe); cheap to clone, turned into a [`Sandbox`] per process.
#[derive(Debug, Clone)]
pub struct Hide {
    /// The directory to cover.
    pub data_dir: PathBuf,
    /// What the kernel offers.
    pub support: Support,
}

impl Hide {
    /// A sandbox showing nothing of the data directory.
    pub fn sandbox(&self) -> std::io::Result<Sandbox> {
        Sandbox::new(&self.data_dir, &[], self.support)
    }
}

/// Everything the child needs to confine itself, prepared before the fork.
#[derive(Debug)]
pub struct Sandbox {
    /// `/proc/self/setgroups`, `uid_map`, `gid_map` and what to write in them.
    maps: [(CString, Vec<u8>); 3],
    /// The data directory, covered by a tmpfs.
    data_dir: CString,
    /// Directories made in the tmpfs, parents first.
    mkdirs: Vec<CString>,
    /// The plugin's own directories: (a descriptor whose number the child reuses for the
    /// directory opened in its namespace, `/proc/self/fd/N`, path).
    binds: Vec<(OwnedFd, CString, CString)>,
    /// Whether namespaces are used at all.
    namespaces: bool,
    /// The Landlock ABI (0: none).
    landlock_abi: i64,
}

fn cstring(path: &Path) -> std::io::Result<CString> {
    CString::new(path.as_os_str().as_bytes())
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidInput, "NUL in a path"))
}

impl Sandbox {
    /// Prepares a view of `data_dir` showing only `own` (directories inside it).
    pub fn new(data_dir: &Path, own: &[PathBuf], support: Support) -> std::io::Result<Self> {
        use std::os::unix::fs::OpenOptionsExt;
        // SAFETY: getuid/getgid cannot fail.
        let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
        let maps = [
            (c"/proc/self/setgroups".to_owned(), b"deny".to_vec()),
            (
                c"/proc/self/uid_map".to_owned(),
                format!("{uid} {uid} 1\n").into_bytes(),
            ),
            (
                c"/proc/self/gid_map".to_owned(),
                format!("{gid} {gid} 1\n").into_bytes(),
            ),
        ];
        let mut mkdirs = Vec::new();
        let mut binds = Vec::new();
        for dir in own {
            let relative = dir.strip_prefix(data_dir).map_err(|_| {
                std::io::Error::new(std::io::ErrorKind::InvalidInput, "outside the data dir")
            })?;
            let mut at = data_dir.to_path_buf();
            for part in relative.components() {
                at.push(part);
                let c = cstring(&at)?;
                if !mkdirs.contains(&c) {
                    mkdirs.push(c);
                }
            }
            let fd: OwnedFd = std::fs::OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_PATH | libc::O_DIRECTORY | libc::O_NOFOLLOW)
                .open(dir)?
                .into();
            let source = CString::new(format!("/proc/self/fd/{}", fd.as_raw_fd()))
                .expect("no NUL in a number");
            binds.push((fd, source, cstring(dir)?));
        }
        Ok(Sandbox {
            maps,
            data_dir: cstring(data_dir)?,
            mkdirs,
            binds,
            namespaces: support.user_namespaces,
            landlock_abi: support.landlock_abi,
        })
    }

    /// One more than the highest descriptor number [`Sandbox::enter`] puts a bind at: the
    /// spawn keeps its own descriptors at or above it.
    pub fn fd_floor(&self) -> std::os::fd::RawFd {
        self.binds
            .iter()
            .map(|(fd, _, _)| fd.as_raw_fd() + 1)
            .max()
            .unwrap_or(0)
    }

    /// Confines the calling (forked, single-threaded) child. Async-signal-safe: only system
    /// calls on data prepared by [`Sandbox::new`].
    ///
    /// # Safety
    /// Call only in the child between fork and exec.
    pub unsafe fn enter(&self) -> std::io::Result<()> {
        let fail = || Err(std::io::Error::last_os_error());
        if self.namespaces {
            // The daemon is not dumpable, so /proc/self/* would be root's and the maps
            // unwritable; exec makes the plugin dumpable again anyway.
            if libc::prctl(libc::PR_SET_DUMPABLE, 1, 0, 0, 0) != 0 {
                return fail();
            }
            if libc::unshare(libc::CLONE_NEWUSER | libc::CLONE_NEWNS) != 0 {
                return fail();
            }
            for (path, text) in &self.maps {
                let fd = libc::open(path.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
                if fd < 0 {
                    return fail();
                }
                let written = libc::write(fd, text.as_ptr().cast(), text.len());
                libc::close(fd);
                if written != text.len() as isize {
                    return fail();
                }
            }
            let none = std::ptr::null();
            if libc::mount(
                none,
                c"/".as_ptr(),
                none,
                libc::MS_REC | libc::MS_PRIVATE,
                std::ptr::null(),
            ) != 0
            {
                return fail();
            }
            // The descriptors opened before the fork name mounts of the daemon's namespace,
            // which cannot be bound here: open the same directories again in this one, at
            // the same descriptor numbers, before the tmpfs covers them.
            for (fd, _, target) in &self.binds {
                let again = libc::open(
                    target.as_ptr(),
                    libc::O_PATH | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC,
                );
                if again < 0 || libc::dup3(again, fd.as_raw_fd(), libc::O_CLOEXEC) < 0 {
                    return fail();
                }
                libc::close(again);
            }
            if libc::mount(
                c"tmpfs".as_ptr(),
                self.data_dir.as_ptr(),
                c"tmpfs".as_ptr(),
                libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
                c"mode=0555,size=64k".as_ptr().cast(),
            ) != 0
            {
                return fail();
            }
            for dir in &self.mkdirs {
                if libc::mkdir(dir.as_ptr(), 0o555) != 0
                    && *libc::__errno_location() != libc::EEXIST
                {
                    return fail();
                }
            }
            for (_, source, target) in &self.binds {
                if libc::mount(
                    source.as_ptr(),
                    target.as_ptr(),
                    none,
                    libc::MS_BIND | libc::MS_REC,
                    std::ptr::null(),
                ) != 0
                {
                    return fail();
                }
            }
            // Read-only now that it is populated (the binds stay writable).
            if libc::mount(
                none,
                self.data_dir.as_ptr(),
                none,
                libc::MS_REMOUNT
                    | libc::MS_BIND
                    | libc::MS_RDONLY
                    | libc::MS_NOSUID
                    | libc::MS_NODEV
                    | libc::MS_NOEXEC,
                std::ptr::null(),
            ) != 0
            {
                return fail();
            }
        }
        if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 {
            return fail();
        }
        if self.landlock_abi >= 2 {
            // ABI 6 scopes signals and abstract sockets and needs no file-system right; before
            // it, the least intrusive handled right (REFER, no rules) makes the domain that
            // scopes ptrace.
            let scoped = self.landlock_abi >= 6;
            let attr = RulesetAttr {
                handled_access_fs: if scoped { 0 } else { ACCESS_FS_REFER },
                handled_access_net: 0,
                scoped: if scoped {
                    SCOPE_SIGNAL | SCOPE_ABSTRACT_UNIX_SOCKET
                } else {
                    0
                },
            };
            let size = if scoped {
                std::mem::size_of::<RulesetAttr>()
            } else {
                std::mem::size_of::<u64>()
            };
            let ruleset = libc::syscall(
                libc::SYS_landlock_create_ruleset,
                &attr as *const RulesetAttr,
                size,
                0u32,
            );
            if ruleset < 0 {
                return fail();
            }
            let restricted = libc::syscall(libc::SYS_landlock_restrict_self, ruleset, 0u32);
            libc::close(ruleset as libc::c_int);
            if restricted != 0 {
                return fail();
            }
        }
        Ok(())
    }
}
