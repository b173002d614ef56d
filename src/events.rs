//! The persisted, sequenced event log: every lifecycle event gets the next daemon-wide `seq`,
//! is appended as one JSON line to `events.jsonl`, and is then broadcast to live watchers.
//!
//! Durability: a line is written to the file (one `write`) before the event is broadcast,
//! so a watcher never sees an event that a daemon crash could lose; the file is fsynced on
//! shutdown, not per event. At open, a torn last line (a crash mid-write) is cut off and
//! numbering continues after the last whole event.
//!
//! [`EventLog::follow`] replays from the file and then follows the broadcast with no gap
//! and no duplicate at the boundary; a watcher that falls behind the broadcast re-reads the
//! file instead of losing events.
//! This module knows nothing of plugins' processes or of gRPC.

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use time::OffsetDateTime;
use tokio::sync::broadcast;

use crate::model::{Event, EventDraft};

const BROADCAST_CAPACITY: usize = 4096;

/// Errors opening or reading the event log.
#[derive(Debug, thiserror::Error)]
pub enum EventLogError {
    /// The file could not be opened, read or repaired.
    #[error("event log {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What failed.
        source: std::io::Error,
    },
}

/// Handle to the event log; clones share it.
#[derive(Clone)]
pub struct EventLog {
    inner: Arc<Inner>,
}

struct Inner {
    path: PathBuf,
    /// Serialises numbering, the file append and the broadcast, so that seq order, file
    /// order and broadcast order agree. Held only for one `write`, never across `.await`.
    writer: Mutex<Writer>,
    tx: broadcast::Sender<Arc<Event>>,
}

struct Writer {
    file: File,
    /// Length of the file's whole lines; a failed write is cut back to it.
    len: u64,
    next_seq: u64,
}

impl EventLog {
    /// Opens (or creates) the log at `path`, repairing a torn last line.
    pub fn open(path: &Path) -> Result<Self, EventLogError> {
        let io_err = |source| EventLogError::Io {
            path: path.to_owned(),
            source,
        };
        let mut file = OpenOptions::new()
            .create(true)
            .read(true)
            .append(true)
            .open(path)
            .map_err(io_err)?;
        let (last_seq, good_len) = scan(&mut file).map_err(io_err)?;
        let len = file.metadata().map_err(io_err)?.len();
        if good_len < len {
            tracing::warn!(path = %path.display(), dropped_bytes = len - good_len,
                "event log ended with a torn line; cutting it off");
            file.set_len(good_len).map_err(io_err)?;
        }
        let (tx, _) = broadcast::channel(BROADCAST_CAPACITY);
        Ok(EventLog {
            inner: Arc::new(Inner {
                path: path.to_owned(),
                writer: Mutex::new(Writer {
                    file,
                    len: good_len,
                    next_seq: last_seq + 1,
                }),
                tx,
            }),
        })
    }

    /// Numbers, persists and broadcasts an event; returns it.
    pub fn append(&self, draft: EventDraft) -> Arc<Event> {
        let mut w = self.inner.writer.lock().expect("event log lock poisoned");
        let event = Arc::new(Event {
            seq: w.next_seq,
            time: OffsetDateTime::now_utc(),
            body: draft,
        });
        w.next_seq += 1;
        let mut line = serde_json::to_vec(&*event).expect("events always serialise");
        line.push(b'\n');
        match w.file.write_all(&line) {
            Ok(()) => w.len += line.len() as u64,
            Err(e) => {
                // Never leave half a line for the next event to be glued onto.
                let _ = w.file.set_len(w.len);
                tracing::error!(seq = event.seq, error = %e, "could not persist an event; it is delivered live only");
            }
        }
        let _ = self.inner.tx.send(event.clone());
        drop(w);
        tracing::debug!(seq = event.seq, plugin = %event.body.plugin_id, kind = ?event.body.kind,
            to = ?event.body.to_state, reason = %event.body.reason, "event");
        event
    }

    /// The seq of the newest event (0 when there is none).
    pub fn last_seq(&self) -> u64 {
        self.inner
            .writer
            .lock()
            .expect("event log lock poisoned")
            .next_seq
            - 1
    }

    /// Flushes the file to disk.
    pub fn sync(&self) -> std::io::Result<()> {
        self.inner
            .writer
            .lock()
            .expect("event log lock poisoned")
            .file
            .sync_data()
    }

    /// Starts following the log: events with seq > `after` first (from the file), then live
    /// ones. `None` follows only events appended from now on.
    pub async fn follow(&self, after: Option<u64>) -> Result<Follower, EventLogError> {
        let (rx, current) = {
            let w = self.inner.writer.lock().expect("event log lock poisoned");
            (self.inner.tx.subscribe(), w.next_seq - 1)
        };
        let mut follower = Follower {
            log: self.clone(),
            rx,
            pending: VecDeque::new(),
            last: current,
        };
        if let Some(after) = after {
            follower.pending = self.read_range(after, current).await?.into();
        }
        Ok(follower)
    }

    /// Events with `after < seq <= upto`, from the file, read on a blocking thread.
    async fn read_range(&self, after: u64, upto: u64) -> Result<Vec<Arc<Event>>, EventLogError> {
        let log = self.clone();
        tokio::task::spawn_blocking(move || log.read_range_blocking(after, upto))
            .await
            .expect("event log reader panicked")
    }

    fn read_range_blocking(&self, after: u64, upto: u64) -> Result<Vec<Arc<Event>>, EventLogError> {
        if after >= upto {
            return Ok(Vec::new());
        }
        let io_err = |source| EventLogError::Io {
            path: self.inner.path.clone(),
            source,
        };
        let file = File::open(&self.inner.path).map_err(io_err)?;
        let mut out = Vec::new();
        for line in BufReader::new(file).lines() {
            let line = line.map_err(io_err)?;
            let Ok(event) = serde_json::from_str::<Event>(&line) else {
                continue;
            };
            if event.seq > upto {
                break;
            }
            if event.seq > after {
                out.push(Arc::new(event));
            }
        }
        Ok(out)
    }
}

/// Reads the whole file: the highest seq and the length up to the end of the last whole,
/// valid line. A damaged line in the middle is skipped (readers skip it too); only what
/// follows the last valid line is treated as torn.
fn scan(file: &mut File) -> std::io::Result<(u64, u64)> {
    file.seek(SeekFrom::Start(0))?;
    let mut reader = BufReader::new(&*file);
    let mut line = Vec::new();
    let (mut last_seq, mut good_len, mut offset) = (0u64, 0u64, 0u64);
    loop {
        line.clear();
        let n = reader.read_until(b'\n', &mut line)?;
        if n == 0 {
            break;
        }
        offset += n as u64;
        if line.last() != Some(&b'\n') {
            break;
        }
        if let Ok(event) = serde_json::from_slice::<Event>(&line) {
            last_seq = last_seq.max(event.seq);
            good_len = offset;
        }
    }
    Ok((last_seq, good_len))
}

/// A reader of the log that replays and then follows; see [`EventLog::follow`].
pub struct Follower {
    log: EventLog,
    rx: broadcast::Receiver<Arc<Event>>,
    pending: VecDeque<Arc<Event>>,
    /// Highest seq handed out or queued; live events at or below it are duplicates.
    last: u64,
}

impl Follower {
    /// The next event, waiting for one if needed. `None` when the log is gone.
    pub async fn next(&mut self) -> Option<Result<Arc<Event>, EventLogError>> {
        loop {
            if let Some(event) = self.pending.pop_front() {
                return Some(Ok(event));
            }
            match self.rx.recv().await {
                Ok(event) if event.seq > self.last => {
                    self.last = event.seq;
                    return Some(Ok(event));
                }
                Ok(_) => continue,
                Err(broadcast::error::RecvError::Lagged(_)) => {
                    let upto = self.log.last_seq();
                    match self.log.read_range(self.last, upto).await {
                        Ok(events) => {
                            self.pending = events.into();
                            self.last = upto;
                        }
                        Err(e) => return Some(Err(e)),
                    }
                }
                Err(broadcast::error::RecvError::Closed) => return None,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::EventKind;

    fn draft(id: &str) -> EventDraft {
        EventDraft::new(id, EventKind::PluginAdded)
    }

    /// The plugin ids of every event, replayed from the start.
    async fn replayed_ids(log: &EventLog) -> Vec<String> {
        let mut f = log.follow(Some(0)).await.unwrap();
        let mut ids = Vec::new();
        for _ in 0..log.last_seq() {
            ids.push(f.next().await.unwrap().unwrap().body.plugin_id.clone());
        }
        ids
    }

    #[tokio::test]
    async fn replay_then_live_without_gap_or_duplicate() {
        let dir = tempfile::tempdir().unwrap();
        let log = EventLog::open(&dir.path().join("e.jsonl")).unwrap();
        for i in 0..5 {
            log.append(draft(&format!("p{i}")));
        }
        let mut f = log.follow(Some(2)).await.unwrap();
        log.append(draft("live"));
        let mut seqs = Vec::new();
        for _ in 0..4 {
            seqs.push(f.next().await.unwrap().unwrap().seq);
        }
        assert_eq!(seqs, [3, 4, 5, 6]);
    }

    #[tokio::test]
    async fn numbering_continues_after_reopen_and_torn_line_is_cut() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("e.jsonl");
        {
            let log = EventLog::open(&path).unwrap();
            log.append(draft("a"));
            log.append(draft("b"));
        }
        let mut file = OpenOptions::new().append(true).open(&path).unwrap();
        file.write_all(br#"{"seq":3,"time":"20"#).unwrap();
        let log = EventLog::open(&path).unwrap();
        assert_eq!(log.last_seq(), 2);
        assert_eq!(log.append(draft("c")).seq, 3);
        assert_eq!(replayed_ids(&log).await, ["a", "b", "c"]);
    }

    #[tokio::test]
    async fn a_damaged_line_in_the_middle_loses_nothing_after_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("e.jsonl");
        let first = EventLog::open(&path).unwrap().append(draft("a"));
        let mut later = (*first).clone();
        later.seq = 2;
        later.body.plugin_id = "b".into();
        let mut file = OpenOptions::new().append(true).open(&path).unwrap();
        file.write_all(b"{\"seq\":2,\"ti\n").unwrap();
        file.write_all(&serde_json::to_vec(&later).unwrap())
            .unwrap();
        file.write_all(b"\n").unwrap();
        drop(file);
        let log = EventLog::open(&path).unwrap();
        assert_eq!(
            log.last_seq(),
            2,
            "the event after the damaged line survives"
        );
        assert_eq!(log.append(draft("c")).seq, 3);
        assert_eq!(replayed_ids(&log).await, ["a", "b", "c"]);
    }

    #[tokio::test]
    async fn lagging_follower_catches_up_from_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let log = EventLog::open(&dir.path().join("e.jsonl")).unwrap();
        let mut f = log.follow(None).await.unwrap();
        let total = BROADCAST_CAPACITY as u64 + 100;
        for i in 0..total {
            log.append(draft(&format!("p{i}")));
        }
        for want in 1..=total {
            assert_eq!(f.next().await.unwrap().unwrap().seq, want);
        }
    }
}
