//! The non-intrusive v1 health check: whether a plugin's socket is listening, read from the
//! kernel's table of Unix sockets (`/proc/net/unix`), so the check never opens a connection
//! that a v1 plugin would have to handle.
//!
//! The table lists every Unix socket on the host, so reading it once per plugin per health
//! interval costs N plugins × (N + every other socket): [`ListeningSockets`] reads it once
//! for all plugins (the supervisor's health scheduler asks once per tick) and hands out that
//! read, [`Listening`], while it is young.
//! This module knows nothing of processes, states or intervals: callers say how old an
//! answer may be.

use std::collections::HashSet;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

// Tokio's clock (the system's outside a runtime), so that reads age with the health
// scheduler's ticks under paused time too.
use tokio::time::Instant;

/// What reads the table's text; `/proc/net/unix` but in tests.
type ReadTable = Box<dyn Fn() -> std::io::Result<String> + Send + Sync>;

/// The paths of the host's listening Unix sockets, read at most once per `max_age` however
/// many ask. One per daemon, in the supervisor's health scheduler.
pub struct ListeningSockets {
    read_table: ReadTable,
    /// The last read: when, and the paths listening then. Locked to look or replace, and
    /// held across a read, so that checks arriving together wait for one read rather than
    /// each making their own.
    last: Mutex<Option<(Instant, Arc<HashSet<String>>)>>,
}

impl Default for ListeningSockets {
    fn default() -> Self {
        Self::reading(|| std::fs::read_to_string("/proc/net/unix"))
    }
}

impl ListeningSockets {
    /// Reads the table with `read_table` (tests count the reads, or feed a table of their
    /// own).
    pub fn reading(
        read_table: impl Fn() -> std::io::Result<String> + Send + Sync + 'static,
    ) -> Self {
        ListeningSockets {
            read_table: Box::new(read_table),
            last: Mutex::new(None),
        }
    }

    /// The listening sockets from a read younger than `max_age`, or from a new one. Blocks
    /// on the read (and on a read another caller is making): call on a blocking thread.
    pub fn read(&self, max_age: Duration) -> std::io::Result<Listening> {
        let mut last = self.last.lock().expect("listening sockets poisoned");
        if let Some((at, paths)) = last.as_ref() {
            if at.elapsed() < max_age {
                return Ok(Listening(paths.clone()));
            }
        }
        let paths = Arc::new(listening_paths(&(self.read_table)()?));
        *last = Some((Instant::now(), paths.clone()));
        Ok(Listening(paths))
    }
}

/// The host's listening Unix socket paths at one read of the table.
#[derive(Debug, Clone)]
pub struct Listening(Arc<HashSet<String>>);

impl Listening {
    /// Whether `path` was listening at that read.
    pub fn contains(&self, path: &Path) -> bool {
        self.0.contains(path.to_string_lossy().as_ref())
    }
}

/// The paths of the listening sockets in the `/proc/net/unix` text. Columns:
/// `Num RefCount Protocol Flags Type St Inode Path`; the path is the rest of the line and
/// may contain spaces; a socket without a path (unbound or abstract-less) is skipped.
fn listening_paths(table: &str) -> HashSet<String> {
    const SO_ACCEPTCON: u32 = 0x0001_0000;
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let mut rest = line.trim_start();
            let mut flags = "";
            for field in 0..7 {
                let end = rest.find(' ')?;
                if field == 3 {
                    flags = &rest[..end];
                }
                rest = rest[end..].trim_start();
            }
            let listening =
                u32::from_str_radix(flags, 16).is_ok_and(|flags| flags & SO_ACCEPTCON != 0);
            (listening && !rest.is_empty()).then(|| rest.to_owned())
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    const TABLE: &str = "Num       RefCount Protocol Flags    Type St Inode Path
0000000000000000: 00000002 00000000 00010000 0001 01 4242 /srv/my data/run/a.sock
0000000000000000: 00000003 00000000 00000000 0001 03 4343 /srv/data/run/b.sock
0000000000000000: 00000002 00000000 00010000 0001 01 4444
";

    #[test]
    fn finds_listening_sockets_even_with_spaces_in_the_path() {
        let paths = listening_paths(TABLE);
        assert!(paths.contains("/srv/my data/run/a.sock"));
        assert!(
            !paths.contains("/srv/data/run/b.sock"),
            "connected, not listening"
        );
        assert!(!paths.contains("/srv/my"));
        assert_eq!(paths.len(), 1, "{paths:?}");
    }

    fn counting() -> (Arc<AtomicUsize>, ListeningSockets) {
        let reads = Arc::new(AtomicUsize::new(0));
        let counter = reads.clone();
        let sockets = ListeningSockets::reading(move || {
            counter.fetch_add(1, Ordering::SeqCst);
            Ok(TABLE.to_owned())
        });
        (reads, sockets)
    }

    #[test]
    fn a_thousand_checks_within_the_age_read_the_table_once() {
        let (reads, sockets) = counting();
        let age = Duration::from_secs(3600);
        let (a, b) = (
            Path::new("/srv/my data/run/a.sock"),
            Path::new("/srv/data/run/b.sock"),
        );
        for i in 0..1000 {
            let path = if i % 2 == 0 { a } else { b };
            let answer = sockets.read(age).expect("read").contains(path);
            assert_eq!(answer, i % 2 == 0);
        }
        assert_eq!(reads.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn checks_from_many_threads_at_once_share_one_read() {
        let (reads, sockets) = counting();
        let sockets = Arc::new(sockets);
        let age = Duration::from_secs(3600);
        let threads: Vec<_> = (0..16)
            .map(|_| {
                let sockets = sockets.clone();
                std::thread::spawn(move || {
                    let listening = sockets.read(age)?;
                    Ok::<_, std::io::Error>(
                        listening.contains(Path::new("/srv/my data/run/a.sock")),
                    )
                })
            })
            .collect();
        for t in threads {
            assert!(t.join().expect("thread").expect("read"));
        }
        assert_eq!(reads.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn an_answer_older_than_the_age_is_read_again() {
        let (reads, sockets) = counting();
        let path = Path::new("/srv/my data/run/a.sock");
        assert!(sockets.read(Duration::ZERO).expect("read").contains(path));
        assert!(sockets.read(Duration::ZERO).expect("read").contains(path));
        assert_eq!(reads.load(Ordering::SeqCst), 2);
    }

    #[test]
    fn reads_the_real_table() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("s.sock");
        let sockets = ListeningSockets::default();
        assert!(!sockets.read(Duration::ZERO).expect("read").contains(&path));
        let _listener = std::os::unix::net::UnixListener::bind(&path).expect("bind");
        assert!(sockets.read(Duration::ZERO).expect("read").contains(&path));
    }
}
