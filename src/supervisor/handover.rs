//! The plugins' part of a handover's state: what [`Supervisor::hand_over`] let go of, as
//! it crosses the exec to the daemon's next image. Descriptors cannot be serialized: each is
//! put in a list ([`Fds`]) that the exec passes in order, and the state names it by its
//! place there. Everything else is plain data (serde).
//!
//! Identity is certain: a process is named by its pidfd, and [`load`] checks that each
//! pidfd still names the pid written beside it (`/proc/thread-self/fdinfo`) before anything is
//! adopted. No pid alone is ever signalled.
//!
//! [`Supervisor::hand_over`]: super::Supervisor::hand_over

use std::os::fd::{AsRawFd, OwnedFd};
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::{HandedOver, HandedOverRun};
use crate::model::PluginStatus;
use crate::plugin::discovery::FileIdentity;
use crate::plugin::isolation::cgroup::PluginCgroup;
use crate::plugin::link::DetachedConnection;
use crate::plugin::process::{Descendants, DetachedProcess};

/// Descriptors crossing the exec, named by their place in the list.
#[derive(Debug, Default)]
pub struct Fds(Vec<Option<OwnedFd>>);

impl Fds {
    /// The descriptors as the exec passes them, in order.
    pub fn from_received(fds: Vec<OwnedFd>) -> Self {
        Fds(fds.into_iter().map(Some).collect())
    }

    /// Adds `fd`; returns its place.
    pub fn push(&mut self, fd: OwnedFd) -> usize {
        self.0.push(Some(fd));
        self.0.len() - 1
    }

    /// Takes the descriptor at `place` (once).
    pub fn take(&mut self, place: usize) -> Result<OwnedFd, String> {
        self.0
            .get_mut(place)
            .and_then(Option::take)
            .ok_or_else(|| format!("descriptor #{place} was not handed over (or named twice)"))
    }

    /// The descriptor at `place`, if it is there.
    pub fn get(&self, place: usize) -> Option<&OwnedFd> {
        self.0.get(place).and_then(Option::as_ref)
    }

    /// The descriptors' numbers, in order (for the exec).
    pub fn raw(&self) -> Vec<i32> {
        self.0
            .iter()
            .map(|fd| fd.as_ref().map_or(-1, AsRawFd::as_raw_fd))
            .collect()
    }

    /// How many there are.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// One plugin, as handed over.
#[derive(Debug, Serialize, Deserialize)]
pub struct PluginEntry {
    /// Its status.
    pub status: PluginStatus,
    /// Its executable and that file's identity when it last declared this id.
    pub verified: Option<(PathBuf, FileIdentity)>,
    /// Its running process, if any.
    pub run: Option<RunEntry>,
}

/// A running plugin, as handed over.
#[derive(Debug, Serialize, Deserialize)]
pub struct RunEntry {
    /// Its pid.
    pub pid: u32,
    /// Its pidfd's place.
    pub pidfd: usize,
    /// Its stdout pipe.
    pub stdout: Option<PipeEntry>,
    /// Its stderr pipe.
    pub stderr: Option<PipeEntry>,
    /// Its last stderr lines.
    pub stderr_tail: Vec<String>,
    /// How what it started is found.
    pub descendants: DescendantsEntry,
    /// The protocol it speaks.
    pub protocol: u32,
    /// A protocol-2 plugin's connection.
    pub connection: Option<ConnectionEntry>,
}

/// A pipe's read end and the unfinished line read from it.
#[derive(Debug, Serialize, Deserialize)]
pub struct PipeEntry {
    /// The read end's place.
    pub fd: usize,
    /// The unfinished line.
    pub partial: Vec<u8>,
}

/// A connection and the bytes read past its last whole frame.
#[derive(Debug, Serialize, Deserialize)]
pub struct ConnectionEntry {
    /// The socket's place.
    pub fd: usize,
    /// Read, not yet a whole frame.
    pub unread: Vec<u8>,
}

/// How what a plugin started is found.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DescendantsEntry {
    /// Its cgroup's directory.
    Cgroup(PathBuf),
    /// Its socket path (the marker in its descendants' environment).
    Marker(PathBuf),
}

/// The plugins as data, their descriptors added to `fds`.
pub fn save(handed: Vec<HandedOver>, fds: &mut Fds) -> Vec<PluginEntry> {
    handed
        .into_iter()
        .map(|h| PluginEntry {
            status: h.status,
            verified: h.verified,
            run: h.run.map(|run| save_run(run, fds)),
        })
        .collect()
}

fn save_run(run: HandedOverRun, fds: &mut Fds) -> RunEntry {
    let HandedOverRun {
        process,
        protocol,
        connection,
    } = run;
    let mut pipe = |p: Option<(OwnedFd, Vec<u8>)>| {
        p.map(|(fd, partial)| PipeEntry {
            fd: fds.push(fd),
            partial,
        })
    };
    let stdout = pipe(process.stdout);
    let stderr = pipe(process.stderr);
    RunEntry {
        pid: process.pid,
        pidfd: fds.push(process.pidfd),
        stdout,
        stderr,
        stderr_tail: process.stderr_tail,
        descendants: match process.descendants {
            Descendants::Cgroup(cgroup) => DescendantsEntry::Cgroup(cgroup.release()),
            Descendants::Marker(socket) => DescendantsEntry::Marker(socket),
        },
        protocol,
        connection: connection.map(|c| ConnectionEntry {
            fd: fds.push(c.socket),
            unread: c.unread,
        }),
    }
}

/// Checks, taking nothing, that every descriptor the plugins name is in `fds` and each
/// pidfd names its pid: what [`load`] needs, so that a handover it would refuse can still
/// be passed on whole (a rollback).
pub fn validate(entries: &[PluginEntry], fds: &Fds) -> Result<(), String> {
    for entry in entries {
        let Some(run) = &entry.run else { continue };
        let id = entry.status.id();
        let mut places = vec![run.pidfd];
        places.extend(run.stdout.iter().chain(run.stderr.iter()).map(|p| p.fd));
        places.extend(run.connection.iter().map(|c| c.fd));
        for place in places {
            if fds.get(place).is_none() {
                return Err(format!(
                    "plugin {id:?}: descriptor #{place} was not handed over"
                ));
            }
        }
        let pidfd = fds.get(run.pidfd).expect("checked above");
        names(pidfd, run.pid).map_err(|e| format!("plugin {id:?}: {e}"))?;
    }
    Ok(())
}

/// The plugins back from data, their descriptors taken from `fds`. A run whose descriptors
/// are missing or whose pidfd names another pid is refused: the whole state is then not
/// this daemon's to adopt.
pub fn load(entries: Vec<PluginEntry>, fds: &mut Fds) -> Result<Vec<HandedOver>, String> {
    entries
        .into_iter()
        .map(|entry| {
            let run = entry.run.map(|run| load_run(run, fds)).transpose();
            let run = run.map_err(|e| format!("plugin {:?}: {e}", entry.status.id()))?;
            Ok(HandedOver {
                status: entry.status,
                verified: entry.verified,
                run,
            })
        })
        .collect()
}

fn load_run(run: RunEntry, fds: &mut Fds) -> Result<HandedOverRun, String> {
    let pidfd = fds.take(run.pidfd)?;
    names(&pidfd, run.pid)?;
    let mut pipe = |p: Option<PipeEntry>| -> Result<Option<(OwnedFd, Vec<u8>)>, String> {
        p.map(|p| Ok((fds.take(p.fd)?, p.partial))).transpose()
    };
    let stdout = pipe(run.stdout)?;
    let stderr = pipe(run.stderr)?;
    let connection = match run.connection {
        Some(c) => Some(DetachedConnection {
            socket: fds.take(c.fd)?,
            unread: c.unread,
        }),
        None => None,
    };
    Ok(HandedOverRun {
        process: DetachedProcess {
            pid: run.pid,
            pidfd,
            stdout,
            stderr,
            stderr_tail: run.stderr_tail,
            descendants: match run.descendants {
                DescendantsEntry::Cgroup(dir) => Descendants::Cgroup(PluginCgroup::adopted(dir)),
                DescendantsEntry::Marker(socket) => Descendants::Marker(socket),
            },
        },
        protocol: run.protocol,
        connection,
    })
}

/// Whether `pidfd` still names process `pid` (not one reaped, nor another).
fn names(pidfd: &OwnedFd, pid: u32) -> Result<(), String> {
    match pidfd_pid(pidfd) {
        Some(named) if named == i64::from(pid) => Ok(()),
        Some(-1) => Err(format!("process {pid} has exited")),
        other => Err(format!(
            "the pidfd handed over for process {pid} names {other:?}"
        )),
    }
}

/// The pid a pidfd names (`-1` once the process has exited and been reaped), from
/// `/proc/thread-self/fdinfo`.
fn pidfd_pid(pidfd: &OwnedFd) -> Option<i64> {
    let info =
        std::fs::read_to_string(format!("/proc/thread-self/fdinfo/{}", pidfd.as_raw_fd())).ok()?;
    info.lines()
        .find_map(|line| line.strip_prefix("Pid:"))
        .and_then(|pid| pid.trim().parse().ok())
}
