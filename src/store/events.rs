//! The persisted, sequenced event log: every lifecycle event gets the next daemon-wide `seq`,
//! is appended to the `events` [`SeqLog`] in the data directory, and is then broadcast to
//! live watchers. All events are kept (segments of 10 MB, none deleted).
//!
//! Durability and replay are the sequenced log's: written (one `write`) before it is
//! broadcast, fsynced at shutdown, a torn tail cut at open with numbering continuing, and
//! [`EventLog::follow`] replaying from the files before following live events with no gap
//! and no duplicate. When the files cannot be written (a full disk), events are still
//! delivered live and up to [`UNSAVED_EVENTS`] wait in memory (replays include them) to be
//! written in order when space returns; only beyond that, or at exit while the disk is
//! still full, are events lost, and a replay then finds a hole in the numbering.
//! This module knows nothing of plugins' processes or of gRPC.

use std::path::Path;
use std::sync::Arc;

use time::OffsetDateTime;

use crate::logs::seqlog::{Follower, SeqLog, SeqLogConfig, SeqLogError, Sequenced};
use crate::model::{Event, EventDraft};

/// Events kept in memory while the event log cannot be written (a few MB at most).
pub const UNSAVED_EVENTS: usize = 10_000;

/// Errors opening or reading the event log.
pub type EventLogError = SeqLogError;

impl Sequenced for Event {
    fn seq(&self) -> u64 {
        self.seq
    }

    fn time(&self) -> OffsetDateTime {
        self.time
    }
}

/// Handle to the event log; clones share it.
#[derive(Clone)]
pub struct EventLog {
    log: SeqLog<Event>,
}

impl EventLog {
    /// Opens (or creates) the log in `dir`, repairing a torn tail.
    pub fn open(dir: &Path) -> Result<Self, EventLogError> {
        let config = SeqLogConfig {
            max_segments: 0,
            unsaved_limit: UNSAVED_EVENTS,
            ..SeqLogConfig::default()
        };
        Ok(EventLog {
            log: SeqLog::open(dir, "events", config)?,
        })
    }

    /// Numbers, persists and broadcasts an event; returns it.
    pub fn append(&self, draft: EventDraft) -> Arc<Event> {
        let event = self.log.append(|seq| Event {
            seq,
            time: OffsetDateTime::now_utc(),
            body: draft,
        });
        tracing::debug!(seq = event.seq, plugin = %event.body.plugin_id, kind = ?event.body.kind,
            to = ?event.body.to_state, reason = ?event.body.reason, "event");
        event
    }

    /// Whether events reach the files: `Some(error)` while they cannot (they are then
    /// delivered live and kept in memory, up to [`UNSAVED_EVENTS`]).
    pub fn health(&self) -> tokio::sync::watch::Receiver<Option<String>> {
        self.log.health()
    }

    /// Tries again to write the events kept in memory; true when all are stored.
    pub fn retry_unsaved(&self) -> bool {
        self.log.retry_unsaved()
    }

    /// Events dropped unsaved since the last call (beyond [`UNSAVED_EVENTS`]).
    pub fn take_lost(&self) -> u64 {
        self.log.take_lost()
    }

    /// The seq of the newest event (0 when there is none).
    pub fn last_seq(&self) -> u64 {
        self.log.last_seq()
    }

    /// Flushes the log to disk.
    pub fn sync(&self) -> std::io::Result<()> {
        self.log.sync()
    }

    /// Starts following the log: events with seq > `after` first (from the files), then live
    /// ones. `None` follows only events appended from now on.
    pub fn follow(&self, after: Option<u64>) -> Follower<Event> {
        self.log.follow(after)
    }
}

#[cfg(test)]
mod tests {
    use std::fs::OpenOptions;
    use std::io::Write;

    use super::*;
    use crate::model::EventKind;

    fn draft(id: &str) -> EventDraft {
        EventDraft::new(id, EventKind::PluginAdded)
    }

    /// The plugin ids of every event, replayed from the start.
    async fn replayed_ids(log: &EventLog) -> Vec<String> {
        let mut f = log.follow(Some(0));
        let mut ids = Vec::new();
        for _ in 0..log.last_seq() {
            ids.push(f.next().await.unwrap().unwrap().body.plugin_id.clone());
        }
        ids
    }

    fn segment(dir: &Path) -> std::path::PathBuf {
        std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .find(|p| p.extension().is_some_and(|x| x == "jsonl"))
            .unwrap()
    }

    #[tokio::test]
    async fn replay_then_live_without_gap_or_duplicate() {
        let dir = tempfile::tempdir().unwrap();
        let log = EventLog::open(dir.path()).unwrap();
        for i in 0..5 {
            log.append(draft(&format!("p{i}")));
        }
        let mut f = log.follow(Some(2));
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
        {
            let log = EventLog::open(dir.path()).unwrap();
            log.append(draft("a"));
            log.append(draft("b"));
        }
        let mut file = OpenOptions::new()
            .append(true)
            .open(segment(dir.path()))
            .unwrap();
        file.write_all(br#"{"seq":3,"time":"20"#).unwrap();
        let log = EventLog::open(dir.path()).unwrap();
        assert_eq!(log.last_seq(), 2);
        assert_eq!(log.append(draft("c")).seq, 3);
        assert_eq!(replayed_ids(&log).await, ["a", "b", "c"]);
    }

    #[tokio::test]
    async fn a_damaged_line_in_the_middle_loses_nothing_after_it() {
        let dir = tempfile::tempdir().unwrap();
        let first = EventLog::open(dir.path()).unwrap().append(draft("a"));
        let mut later = (*first).clone();
        later.seq = 2;
        later.body.plugin_id = "b".into();
        let mut file = OpenOptions::new()
            .append(true)
            .open(segment(dir.path()))
            .unwrap();
        file.write_all(b"{\"seq\":2,\"ti\n").unwrap();
        file.write_all(&serde_json::to_vec(&later).unwrap())
            .unwrap();
        file.write_all(b"\n").unwrap();
        drop(file);
        let log = EventLog::open(dir.path()).unwrap();
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
        let log = EventLog::open(dir.path()).unwrap();
        let mut f = log.follow(None);
        let total = 4096 + 100;
        for i in 0..total {
            log.append(draft(&format!("p{i}")));
        }
        for want in 1..=total {
            assert_eq!(f.next().await.unwrap().unwrap().seq, want);
        }
    }
}
