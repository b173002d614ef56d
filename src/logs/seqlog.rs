//! A sequenced, rotated, indexed append-only log of JSON records: the one storage mechanism
//! behind the event log (and meant for plugin logs too).
//!
//! Records are numbered by a strictly increasing `seq`, written as JSON lines into segment
//! files `<stem>.<first seq, 20 digits>.jsonl`, and broadcast to live followers after the
//! write. Each segment has a sparse index `<segment>.idx` (fixed 24-byte entries: seq,
//! time in Unix nanoseconds, byte offset; one entry every [`SeqLogConfig::index_every`]
//! bytes), so finding a seq or a time costs a binary search over segments and index
//! entries plus a short scan, never a scan of everything. Segments rotate at a size and the
//! oldest are deleted beyond a count; [`SeqLog::first_seq`] tells what is still kept.
//!
//! Durability: a record is written to the file (one `write`) before it is broadcast; files
//! are fsynced on [`SeqLog::sync`] (shutdown), not per record. When the files cannot be
//! written (a full disk), records are still broadcast, [`SeqLog::health`] says so, and up
//! to [`SeqLogConfig::unsaved_limit`] of them wait in memory, visible to readers, to be
//! written in order once they can; any dropped beyond that leave a hole in the numbering
//! that readers can see (and [`SeqLog::take_lost`] counts). At open, a torn or damaged
//! tail of the newest segment is cut off (a damaged line in the middle is skipped by
//! readers) and numbering continues after the last whole record. Indexes are a cache: at
//! open each entry is checked against the segment (its offset starts a line holding its
//! seq; seqs and offsets increase, within the segment's seqs) and an index that disagrees
//! is rebuilt from the segment, so a damaged index never renumbers the log. Seqs never
//! wrap: a segment whose last seq leaves no room is an error naming it.
//! This module knows nothing of what the records mean.

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::marker::PhantomData;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use serde::de::DeserializeOwned;
use serde::Serialize;
use time::OffsetDateTime;
use tokio::sync::broadcast;

/// A record the log can store.
pub trait Sequenced: Serialize + DeserializeOwned + Send + Sync + 'static {
    /// Its sequence number.
    fn seq(&self) -> u64;
    /// When it was recorded (used to seek by time).
    fn time(&self) -> OffsetDateTime;
    /// About how many bytes it holds in memory (bounds what live followers buffer).
    fn size_hint(&self) -> usize {
        256
    }

    /// Appends its JSON (one object, no newline) to `out`. The default is serde's; a type
    /// written at high rates may write the same JSON faster. It must start with `{"seq":`.
    fn write_json(&self, out: &mut Vec<u8>) {
        serde_json::to_writer(out, self).expect("records always serialise");
    }

    /// Reads one record from its JSON line. The default is serde's; a type read back at
    /// high rates (followers catching up, queries) may read its own writing faster.
    fn read_json(line: &[u8]) -> Result<Self, serde_json::Error> {
        serde_json::from_slice(line)
    }
}

/// Sizes of a log.
#[derive(Debug, Clone, Copy)]
pub struct SeqLogConfig {
    /// A segment is closed and a new one started once it reaches this many bytes.
    pub segment_bytes: u64,
    /// Segments kept; older ones are deleted (0 keeps all).
    pub max_segments: usize,
    /// Bytes between two index entries.
    pub index_every: u64,
    /// Live batches (of at most [`BROADCAST_CHUNK`] records) buffered per follower before
    /// it falls back to reading the files.
    pub broadcast_capacity: usize,
    /// Records kept in memory while the files cannot be written (a full disk), to be
    /// written in order once they can; readers see them meanwhile. Beyond this many the
    /// oldest are dropped and counted as lost, leaving a hole in the numbering. 0 keeps
    /// none: a record that cannot be written is delivered live only.
    pub unsaved_limit: usize,
}

impl Default for SeqLogConfig {
    fn default() -> Self {
        SeqLogConfig {
            segment_bytes: 10 * 1024 * 1024,
            max_segments: 0,
            index_every: 64 * 1024,
            broadcast_capacity: 256,
            unsaved_limit: 0,
        }
    }
}

/// Records per broadcast message at most: appends are broadcast in chunks, so a follower
/// pays one channel operation per chunk.
pub const BROADCAST_CHUNK: usize = 256;
/// Bytes per broadcast message at most (by [`Sequenced::size_hint`]; a chunk holds one
/// record at least), so the live backlog of a log is at most about
/// `broadcast_capacity` × this.
pub const BROADCAST_CHUNK_BYTES: usize = 64 * 1024;

/// What followers receive: records appended together, in seq order.
type Chunk<T> = Arc<[Arc<T>]>;

/// Errors opening or reading a log.
#[derive(Debug, thiserror::Error)]
#[error("log {path}: {source}")]
pub struct SeqLogError {
    /// The file or directory.
    pub path: PathBuf,
    /// What failed.
    #[source]
    pub source: std::io::Error,
}

fn err(path: &Path) -> impl FnOnce(std::io::Error) -> SeqLogError + '_ {
    move |source| SeqLogError {
        path: path.to_owned(),
        source,
    }
}

const ENTRY: usize = 24;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct IndexEntry {
    seq: u64,
    time_ns: i64,
    offset: u64,
}

impl IndexEntry {
    fn to_bytes(self) -> [u8; ENTRY] {
        let mut out = [0u8; ENTRY];
        out[..8].copy_from_slice(&self.seq.to_le_bytes());
        out[8..16].copy_from_slice(&self.time_ns.to_le_bytes());
        out[16..].copy_from_slice(&self.offset.to_le_bytes());
        out
    }

    fn from_bytes(b: &[u8]) -> Self {
        let word = |i: usize| <[u8; 8]>::try_from(&b[i..i + 8]).expect("8 bytes");
        IndexEntry {
            seq: u64::from_le_bytes(word(0)),
            time_ns: i64::from_le_bytes(word(8)),
            offset: u64::from_le_bytes(word(16)),
        }
    }
}

fn nanos(t: OffsetDateTime) -> i64 {
    // Saturating both ways: a time before 1677 is before every record, not after.
    let ns = t.unix_timestamp_nanos();
    i64::try_from(ns).unwrap_or(if ns < 0 { i64::MIN } else { i64::MAX })
}

#[derive(Debug, Clone)]
struct Segment {
    first_seq: u64,
    path: PathBuf,
    index: Vec<IndexEntry>,
}

impl Segment {
    fn index_path(&self) -> PathBuf {
        index_path(&self.path)
    }
}

fn index_path(segment: &Path) -> PathBuf {
    let mut p = segment.as_os_str().to_owned();
    p.push(".idx");
    PathBuf::from(p)
}

/// Handle to a log; clones share it.
pub struct SeqLog<T> {
    inner: Arc<Inner<T>>,
}

impl<T> Clone for SeqLog<T> {
    fn clone(&self) -> Self {
        SeqLog {
            inner: self.inner.clone(),
        }
    }
}

struct Inner<T> {
    dir: PathBuf,
    stem: String,
    config: SeqLogConfig,
    /// Numbering, the file append, rotation and the broadcast, in one order. Held for one
    /// write (or one rotation), never across `.await`.
    writer: Mutex<Writer<T>>,
    tx: broadcast::Sender<Chunk<T>>,
    /// `Some(error)` while appends cannot be written to the files.
    health: tokio::sync::watch::Sender<Option<String>>,
    _records: PhantomData<fn() -> T>,
}

struct Writer<T> {
    /// Kept segments, oldest first; the last is the one being written.
    segments: Vec<Segment>,
    file: File,
    index_file: File,
    len: u64,
    since_index: u64,
    next_seq: u64,
    /// The line buffer, kept between appends so a busy log does not grow a fresh one each
    /// time.
    spare: Vec<u8>,
    /// Records numbered but not yet written (the files failed), oldest first; written
    /// before any newer record, so the files stay in seq order.
    unsaved: VecDeque<Arc<T>>,
    /// Records dropped from `unsaved` (over the limit) since [`SeqLog::take_lost`].
    lost: u64,
}

impl<T: Sequenced> SeqLog<T> {
    /// Opens (or creates) the log `<dir>/<stem>.*`, repairing a torn tail.
    pub fn open(dir: &Path, stem: &str, config: SeqLogConfig) -> Result<Self, SeqLogError> {
        std::fs::create_dir_all(dir).map_err(err(dir))?;
        let mut segments = list_segments(dir, stem).map_err(err(dir))?;
        let bounds: Vec<u64> = segments.iter().skip(1).map(|s| s.first_seq).collect();
        for (i, segment) in segments.iter_mut().enumerate() {
            let below = bounds.get(i).copied().unwrap_or(u64::MAX);
            segment.index = load_checked_index::<T>(segment, below, config.index_every)
                .map_err(err(&segment.index_path()))?;
        }
        let (next_seq, len) = match segments.last_mut() {
            Some(last) => repair_tail::<T>(last).map_err(err(&last.path))?,
            None => (1, 0),
        };
        if segments.is_empty() {
            segments.push(new_segment(dir, stem, next_seq));
        }
        let last = segments.last().expect("one segment at least");
        let file = append_file(&last.path)?;
        let index_file = append_file(&last.index_path())?;
        let since_index = match last.index.last() {
            Some(entry) => len.saturating_sub(entry.offset),
            None => config.index_every,
        };
        let (tx, _) = broadcast::channel(config.broadcast_capacity.max(1));
        Ok(SeqLog {
            inner: Arc::new(Inner {
                dir: dir.to_owned(),
                stem: stem.to_owned(),
                config,
                writer: Mutex::new(Writer {
                    segments,
                    file,
                    index_file,
                    len,
                    since_index,
                    next_seq,
                    spare: Vec::new(),
                    unsaved: VecDeque::new(),
                    lost: 0,
                }),
                tx,
                health: tokio::sync::watch::channel(None).0,
                _records: PhantomData,
            }),
        })
    }

    /// Numbers a record (`make` gets its seq), persists it, broadcasts it, returns it. A
    /// failed write is cut back so no half line stays; the record is then delivered live only.
    pub fn append(&self, make: impl FnOnce(u64) -> T) -> Arc<T> {
        let mut make = Some(make);
        let mut records = self.append_all([()], |seq, ()| (make.take().expect("one record"))(seq));
        records.pop().expect("one record")
    }

    /// Appends several records under one lock, numbered in order and written with as few
    /// `write`s as the index and rotation allow, then broadcasts them. Returns them.
    pub fn append_all<D>(
        &self,
        drafts: impl IntoIterator<Item = D>,
        mut make: impl FnMut(u64, D) -> T,
    ) -> Vec<Arc<T>> {
        let drafts = drafts.into_iter();
        let mut w = self.inner.writer.lock().expect("log writer poisoned");
        let mut records = Vec::with_capacity(drafts.size_hint().0);
        for draft in drafts {
            records.push(Arc::new(make(w.next_seq, draft)));
            // `open` leaves room: `next_seq` < u64::MAX, and 2^64 appends do not happen.
            w.next_seq = w.next_seq.checked_add(1).expect("log seq overflow");
        }
        let mut buf = std::mem::take(&mut w.spare);
        let stored = self.store(&mut w, &mut buf, &records);
        self.report(stored);
        if buf.capacity() <= 4 * 1024 * 1024 {
            buf.clear();
            w.spare = buf;
        }
        let mut rest = &records[..];
        while !rest.is_empty() {
            let mut bytes = 0;
            let n = rest
                .iter()
                .take(BROADCAST_CHUNK)
                .take_while(|r| {
                    bytes += r.size_hint();
                    bytes <= BROADCAST_CHUNK_BYTES
                })
                .count()
                .max(1);
            let _ = self.inner.tx.send(rest[..n].into());
            rest = &rest[n..];
        }
        records
    }

    /// Writes `records` after any unsaved ones, in seq order. What cannot be written is
    /// kept in memory (up to [`SeqLogConfig::unsaved_limit`]) for the next attempt.
    fn store(
        &self,
        w: &mut Writer<T>,
        buf: &mut Vec<u8>,
        records: &[Arc<T>],
    ) -> std::io::Result<()> {
        if w.unsaved.is_empty() {
            return self.write_records(w, buf, records).map_err(|(written, e)| {
                self.keep_unsaved(w, &records[written..]);
                e
            });
        }
        let queue: Vec<Arc<T>> = w.unsaved.drain(..).chain(records.iter().cloned()).collect();
        self.write_records(w, buf, &queue).map_err(|(written, e)| {
            self.keep_unsaved(w, &queue[written..]);
            e
        })
    }

    /// Writes the lines of `records` with as few `write`s as the index and rotation allow.
    /// On failure, says how many records (from the start) are on file; the rest are not
    /// (no half line stays).
    fn write_records(
        &self,
        w: &mut Writer<T>,
        buf: &mut Vec<u8>,
        records: &[Arc<T>],
    ) -> Result<(), (usize, std::io::Error)> {
        // Records before this one are on file; the ones from it on are in `buf`.
        let mut first_in_buf = 0;
        for (i, record) in records.iter().enumerate() {
            if let Err(e) = self.index_if_due(w, record) {
                cut_back(w, buf);
                return Err((first_in_buf, e));
            }
            push_line(w, buf, record);
            if w.len >= self.inner.config.segment_bytes {
                flush(w, buf).map_err(|e| (first_in_buf, e))?;
                first_in_buf = i + 1;
                // Named after the seq that follows: later records may be numbered already.
                let next = record.seq().saturating_add(1);
                self.rotate(w, next).map_err(|e| (first_in_buf, e))?;
            }
        }
        flush(w, buf).map_err(|e| (first_in_buf, e))
    }

    /// Keeps records that could not be written, within the limit; older ones beyond it are
    /// dropped and counted as lost.
    fn keep_unsaved(&self, w: &mut Writer<T>, records: &[Arc<T>]) {
        let limit = self.inner.config.unsaved_limit;
        w.unsaved.extend(records.iter().cloned());
        let excess = w.unsaved.len().saturating_sub(limit);
        if excess == 0 {
            return;
        }
        let dropped: Vec<Arc<T>> = w.unsaved.drain(..excess).collect();
        w.lost += excess as u64;
        if limit > 0 {
            tracing::error!(log = %self.inner.dir.display(), first = dropped[0].seq(),
                last = dropped[excess - 1].seq(),
                "records that cannot be written no longer fit in memory; they are lost");
        }
    }

    /// Publishes whether the files can be written, logging each change once.
    fn report(&self, stored: std::io::Result<()>) {
        match stored {
            Err(e) => {
                let text = e.to_string();
                let keep = self.inner.config.unsaved_limit;
                self.inner.health.send_if_modified(|h| {
                    let changed = h.is_none();
                    if changed && keep == 0 {
                        tracing::error!(log = %self.inner.dir.display(), error = %text,
                            "cannot write the log; records are delivered live only until it can");
                    } else if changed {
                        tracing::error!(log = %self.inner.dir.display(), error = %text, keep,
                            "cannot write the log; records are delivered live and kept in memory until it can");
                    }
                    *h = Some(text);
                    changed
                });
            }
            Ok(()) => {
                self.inner.health.send_if_modified(|h| {
                    let changed = h.take().is_some();
                    if changed {
                        tracing::info!(log = %self.inner.dir.display(), "the log is written again");
                    }
                    changed
                });
            }
        }
    }

    /// Tries again to write the records kept in memory; true when none is left unsaved.
    pub fn retry_unsaved(&self) -> bool {
        let mut w = self.inner.writer.lock().expect("log writer poisoned");
        if w.unsaved.is_empty() {
            return true;
        }
        let mut buf = std::mem::take(&mut w.spare);
        let stored = self.store(&mut w, &mut buf, &[]);
        buf.clear();
        w.spare = buf;
        self.report(stored);
        w.unsaved.is_empty()
    }

    /// How many records were dropped unsaved (over [`SeqLogConfig::unsaved_limit`], or
    /// every unwritable one when it is 0) since the last call; resets the count.
    pub fn take_lost(&self) -> u64 {
        std::mem::take(&mut self.inner.writer.lock().expect("log writer poisoned").lost)
    }

    /// Writes an index entry for `record` when one is due.
    fn index_if_due(&self, w: &mut Writer<T>, record: &T) -> std::io::Result<()> {
        if w.since_index >= self.inner.config.index_every {
            let entry = IndexEntry {
                seq: record.seq(),
                time_ns: nanos(record.time()),
                offset: w.len,
            };
            w.index_file.write_all(&entry.to_bytes())?;
            w.segments.last_mut().expect("a segment").index.push(entry);
            w.since_index = 0;
        }
        Ok(())
    }

    /// Closes the current segment and starts one whose first record is `first_seq` (or, if
    /// records were lost meanwhile, a later one).
    ///
    /// Runs under the writer lock, fsync included, on purpose: no record reaches the next
    /// segment before the closed one is durable, so a crash can cut the tail but never
    /// leave a hole before later records; and a failed fsync fails this append, whose
    /// records are then kept in memory and the log reported degraded. The cost is one
    /// segment's fsync per segment (10 MB of plugin logs), paid by the appender that
    /// crosses the boundary and by whoever waits for the lock meanwhile.
    fn rotate(&self, w: &mut Writer<T>, first_seq: u64) -> std::io::Result<()> {
        w.file.sync_data()?;
        let segment = new_segment(&self.inner.dir, &self.inner.stem, first_seq);
        w.file = append_file(&segment.path).map_err(|e| e.source)?;
        w.index_file = append_file(&segment.index_path()).map_err(|e| e.source)?;
        w.segments.push(segment);
        w.len = 0;
        w.since_index = self.inner.config.index_every;
        let max = self.inner.config.max_segments;
        while max > 0 && w.segments.len() > max {
            let old = w.segments.remove(0);
            let _ = std::fs::remove_file(&old.path);
            let _ = std::fs::remove_file(old.index_path());
        }
        Ok(())
    }

    /// Whether appends reach the files: `Some(error)` while they cannot (the records are
    /// then delivered to live followers only). Changes when a write fails after succeeding,
    /// and when one succeeds again.
    pub fn health(&self) -> tokio::sync::watch::Receiver<Option<String>> {
        self.inner.health.subscribe()
    }

    /// The seq of the newest record (0 when there is none).
    pub fn last_seq(&self) -> u64 {
        self.inner
            .writer
            .lock()
            .expect("log writer poisoned")
            .next_seq
            - 1
    }

    /// Bytes the log's kept segments and their indexes take on disk (read from the files:
    /// a few `stat`s, so callers off the runtime's workers).
    pub fn disk_bytes(&self) -> u64 {
        let paths: Vec<PathBuf> = {
            let w = self.inner.writer.lock().expect("log writer poisoned");
            w.segments
                .iter()
                .flat_map(|s| [s.path.clone(), s.index_path()])
                .collect()
        };
        paths
            .iter()
            .filter_map(|p| std::fs::metadata(p).ok())
            .map(|m| m.len())
            .sum()
    }

    /// The seq of the oldest record still kept (rotation deletes older ones).
    pub fn first_seq(&self) -> u64 {
        let w = self.inner.writer.lock().expect("log writer poisoned");
        w.segments.first().map_or(w.next_seq, |s| s.first_seq)
    }

    /// Writes any records kept in memory and flushes the current segment and its index to
    /// disk. Records that still cannot be written are lost with the process: that is logged
    /// with their seqs.
    pub fn sync(&self) -> std::io::Result<()> {
        if !self.retry_unsaved() {
            let w = self.inner.writer.lock().expect("log writer poisoned");
            if let (Some(first), Some(last)) = (w.unsaved.front(), w.unsaved.back()) {
                tracing::error!(log = %self.inner.dir.display(), first = first.seq(),
                    last = last.seq(), "records that could not be written are lost at exit");
            }
        }
        let w = self.inner.writer.lock().expect("log writer poisoned");
        w.file.sync_data()?;
        w.index_file.sync_data()
    }

    fn segments(&self) -> Vec<Segment> {
        self.inner
            .writer
            .lock()
            .expect("log writer poisoned")
            .segments
            .clone()
    }

    /// Up to `limit` records with `seq > after`, oldest first, from the files (blocking),
    /// and then from the records kept in memory while the files cannot be written.
    pub fn read_after(&self, after: u64, limit: usize) -> Result<Vec<Arc<T>>, SeqLogError> {
        self.read_after_within(after, limit, usize::MAX)
    }

    /// Like [`SeqLog::read_after`], but stops once the records read hold `max_bytes` (by
    /// [`Sequenced::size_hint`]; one record at least), so a reader's memory stays bounded
    /// however long the records are.
    pub fn read_after_within(
        &self,
        after: u64,
        limit: usize,
        max_bytes: usize,
    ) -> Result<Vec<Arc<T>>, SeqLogError> {
        // Unsaved records first: one written meanwhile is then in the files or in this copy.
        let (segments, unsaved) = {
            let w = self.inner.writer.lock().expect("log writer poisoned");
            let unsaved: Vec<Arc<T>> = w
                .unsaved
                .iter()
                .filter(|r| r.seq() > after)
                .take(limit)
                .cloned()
                .collect();
            (w.segments.clone(), unsaved)
        };
        let mut bytes = 0usize;
        let start = segments
            .partition_point(|s| s.first_seq <= after.saturating_add(1))
            .saturating_sub(1);
        let mut out = Vec::new();
        // Stopped by `limit` or `max_bytes`: unsaved records would skip what is left on file.
        let mut cut_short = false;
        for segment in &segments[start..] {
            let offset = segment
                .index
                .iter()
                .take_while(|e| e.seq <= after.saturating_add(1))
                .last()
                .map_or(0, |e| e.offset);
            let done = read_segment(&segment.path, offset, after, |record: T| {
                if record.seq() > after {
                    bytes = bytes.saturating_add(record.size_hint());
                    out.push(Arc::new(record));
                }
                out.len() < limit && bytes < max_bytes
            });
            match done {
                Ok(true) => {}
                Ok(false) => {
                    cut_short = true;
                    break;
                }
                // A segment rotated away while we read it: what is left is newer.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(err(&segment.path)(e)),
            }
        }
        if !cut_short {
            let on_file = out.last().map_or(after, |r| r.seq());
            out.extend(unsaved.into_iter().filter(|r| r.seq() > on_file));
        }
        out.truncate(limit);
        Ok(out)
    }

    /// The seq of the first kept record at or after `time` (the next seq if none), found
    /// through the indexes.
    pub fn seq_at(&self, time: OffsetDateTime) -> Result<u64, SeqLogError> {
        let want = nanos(time);
        let segments = self.segments();
        let entries: Vec<IndexEntry> = segments
            .iter()
            .flat_map(|s| s.index.iter().copied())
            .collect();
        let before = entries.partition_point(|e| e.time_ns < want);
        let from = if before == 0 {
            self.first_seq().saturating_sub(1)
        } else {
            entries[before - 1].seq - 1
        };
        let mut after = from;
        loop {
            // An index entry every 64 KiB: the wanted record is within a few hundred.
            let batch = self.read_after(after, 512)?;
            let Some(last) = batch.last() else {
                return Ok(self.last_seq() + 1);
            };
            if let Some(hit) = batch.iter().find(|r| nanos(r.time()) >= want) {
                return Ok(hit.seq());
            }
            after = last.seq();
        }
    }

    /// Starts following: records with seq > `after` first (from the files), then live ones,
    /// with no gap and no duplicate. `None` follows only records appended from now on.
    pub fn follow(&self, after: Option<u64>) -> Follower<T> {
        let (rx, current) = {
            let w = self.inner.writer.lock().expect("log writer poisoned");
            (self.inner.tx.subscribe(), w.next_seq - 1)
        };
        Follower {
            log: self.clone(),
            rx,
            pending: VecDeque::new(),
            cursor: after.unwrap_or(current).min(current),
            upto: current,
        }
    }
}

/// Replays from the files, then follows live records; see [`SeqLog::follow`].
pub struct Follower<T> {
    log: SeqLog<T>,
    rx: broadcast::Receiver<Chunk<T>>,
    /// Records read or received but not handed out yet, in seq order.
    pending: VecDeque<Arc<T>>,
    /// Highest seq handed out (or skipped as already seen).
    cursor: u64,
    /// Records up to this seq come from the files; later ones from the broadcast.
    upto: u64,
}

/// Records a follower reads from the files at once, at most.
const REPLAY_BATCH: usize = 1024;
/// Bytes (by [`Sequenced::size_hint`]) a follower reads from the files at once, at most:
/// with [`BROADCAST_CHUNK_BYTES`], what one follower holds of its own.
pub const REPLAY_BYTES: usize = 256 * 1024;

impl<T: Sequenced> Follower<T> {
    /// The next record, waiting for one if needed; `None` when the log is gone.
    pub async fn next(&mut self) -> Option<Result<Arc<T>, SeqLogError>> {
        loop {
            if let Some(record) = self.take_pending() {
                return Some(Ok(record));
            }
            if self.cursor < self.upto {
                let (log, after) = (self.log.clone(), self.cursor);
                let read = tokio::task::spawn_blocking(move || {
                    log.read_after_within(after, REPLAY_BATCH, REPLAY_BYTES)
                })
                .await
                .expect("log reader panicked");
                match read {
                    Ok(batch) => {
                        let upto = self.upto;
                        self.pending
                            .extend(batch.into_iter().filter(|r| r.seq() <= upto));
                        if self.pending.is_empty() {
                            // Nothing left on file up to `upto` (rotated away or never
                            // written): the live feed takes over.
                            self.cursor = self.upto;
                        }
                    }
                    Err(e) => return Some(Err(e)),
                }
                continue;
            }
            let received = self.rx.recv().await;
            if !self.accept(received) {
                return None;
            }
        }
    }

    /// The next record if one is at hand without waiting or reading the files; `None`
    /// otherwise (then [`Follower::next`] waits or reads). Lets a caller gather a batch of
    /// whatever is ready without abandoning a read half done.
    pub fn try_next(&mut self) -> Option<Arc<T>> {
        loop {
            if let Some(record) = self.take_pending() {
                return Some(record);
            }
            if self.cursor < self.upto {
                return None;
            }
            match self.rx.try_recv() {
                Ok(chunk) => {
                    self.accept(Ok(chunk));
                }
                Err(broadcast::error::TryRecvError::Lagged(_)) => {
                    self.upto = self.log.last_seq();
                    return None;
                }
                Err(_) => return None,
            }
        }
    }

    /// Whether the next records must be read from the files (the follower is replaying or
    /// catching up) rather than taken from the live feed.
    pub fn replaying(&self) -> bool {
        self.pending.is_empty() && self.cursor < self.upto
    }

    fn take_pending(&mut self) -> Option<Arc<T>> {
        let record = self.pending.pop_front()?;
        self.cursor = record.seq();
        Some(record)
    }

    /// Queues the new records of a received chunk; false when the log is gone.
    fn accept(&mut self, received: Result<Chunk<T>, broadcast::error::RecvError>) -> bool {
        match received {
            Ok(chunk) => {
                let cursor = self.cursor;
                self.pending
                    .extend(chunk.iter().filter(|r| r.seq() > cursor).cloned());
                if let Some(last) = self.pending.back() {
                    self.upto = self.upto.max(last.seq());
                }
                true
            }
            // Missed chunks are on file: read them before rejoining the live feed.
            Err(broadcast::error::RecvError::Lagged(_)) => {
                self.upto = self.log.last_seq();
                true
            }
            Err(broadcast::error::RecvError::Closed) => false,
        }
    }

    /// The seq of the last record handed out.
    pub fn cursor(&self) -> u64 {
        self.cursor
    }
}

/// Queues one record's line in `buf`.
fn push_line<T: Sequenced>(w: &mut Writer<T>, buf: &mut Vec<u8>, record: &T) {
    let before = buf.len();
    record.write_json(buf);
    buf.push(b'\n');
    let n = (buf.len() - before) as u64;
    w.len += n;
    w.since_index += n;
}

/// Writes the queued lines; on failure cuts the file back to the last whole line written
/// before them, so no half line stays.
fn flush<T>(w: &mut Writer<T>, buf: &mut Vec<u8>) -> std::io::Result<()> {
    if buf.is_empty() {
        return Ok(());
    }
    let result = w.file.write_all(buf);
    if result.is_err() {
        cut_back(w, buf);
    }
    buf.clear();
    result
}

/// Forgets the queued lines: the file (which may hold part of them) and its index are cut
/// back to the last whole line written before them.
fn cut_back<T>(w: &mut Writer<T>, buf: &mut Vec<u8>) {
    let before = w.len - buf.len() as u64;
    buf.clear();
    let _ = w.file.set_len(before);
    w.len = before;
    // Index entries for the lines just cut must not point into later ones.
    let segment = w.segments.last_mut().expect("a segment");
    segment.index.retain(|e| e.offset < before);
    let _ = w.index_file.set_len((segment.index.len() * ENTRY) as u64);
    w.since_index = u64::MAX;
}

fn list_segments(dir: &Path, stem: &str) -> std::io::Result<Vec<Segment>> {
    let prefix = format!("{stem}.");
    let mut segments: Vec<Segment> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let digits = name.strip_prefix(&prefix)?.strip_suffix(".jsonl")?;
            let first_seq = digits.parse().ok()?;
            Some(Segment {
                first_seq,
                path: e.path(),
                index: Vec::new(),
            })
        })
        .collect();
    segments.sort_by_key(|s| s.first_seq);
    Ok(segments)
}

fn new_segment(dir: &Path, stem: &str, first_seq: u64) -> Segment {
    Segment {
        first_seq,
        path: dir.join(format!("{stem}.{first_seq:020}.jsonl")),
        index: Vec::new(),
    }
}

fn append_file(path: &Path) -> Result<File, SeqLogError> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .read(true)
        .open(path)
        .map_err(err(path))
}

/// The index of `segment`, checked against the segment: entries must name, in increasing
/// order, the seq of the record that starts at their offset, within the segment's seqs
/// (from its first seq, below `below`, the next segment's). An index is only a cache, so
/// one that disagrees (damaged, left over from another file, or with entries for records a
/// crash cut off) is rebuilt from the segment, with a warning naming it.
fn load_checked_index<T: Sequenced>(
    segment: &Segment,
    below: u64,
    every: u64,
) -> std::io::Result<Vec<IndexEntry>> {
    let path = segment.index_path();
    let mut bytes = Vec::new();
    match File::open(&path) {
        Ok(mut f) => {
            f.read_to_end(&mut bytes)?;
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let entries: Vec<IndexEntry> = bytes
        .chunks_exact(ENTRY)
        .map(IndexEntry::from_bytes)
        .collect();
    let seg_len = std::fs::metadata(&segment.path).map_or(0, |m| m.len());
    let problem = match entries.iter().position(|e| e.offset >= seg_len) {
        // After a crash: entries written for records that never reached the segment.
        Some(i) => format!("entry {i} points past the end of the segment ({seg_len} bytes)"),
        None => match check_index(segment, &entries, below) {
            Ok(()) if entries.len() * ENTRY == bytes.len() => return Ok(entries),
            Ok(()) => "it ends with a partial entry".to_owned(),
            Err(problem) => problem,
        },
    };
    tracing::warn!(index = %path.display(), %problem,
        "the log index disagrees with its segment; rebuilding it from the segment");
    let entries = build_index::<T>(&segment.path, every)?;
    let bytes: Vec<u8> = entries.iter().flat_map(|e| e.to_bytes()).collect();
    crate::store::state::write_atomically(&path, &bytes, 0o600)?;
    Ok(entries)
}

/// Whether each entry names the record at its offset: offsets and seqs increasing, seqs
/// within `[segment.first_seq, below)`, and the line at each offset starting with
/// `{"seq":<its seq>`. Says what is wrong otherwise.
fn check_index(segment: &Segment, entries: &[IndexEntry], below: u64) -> Result<(), String> {
    use std::os::unix::fs::FileExt;
    let file = File::open(&segment.path).map_err(|e| format!("cannot read the segment: {e}"))?;
    let mut previous: Option<IndexEntry> = None;
    let mut head = [0u8; 48];
    for (i, entry) in entries.iter().enumerate() {
        if entry.seq < segment.first_seq || entry.seq >= below {
            return Err(format!(
                "entry {i} names seq {}, outside the segment's seqs {}..{below}",
                entry.seq, segment.first_seq
            ));
        }
        if let Some(p) = previous {
            if entry.seq <= p.seq || entry.offset <= p.offset {
                return Err(format!("entry {i} does not follow entry {}", i - 1));
            }
        }
        // The byte before the offset (a line's end) and the start of the line.
        let from = entry.offset.saturating_sub(1);
        let n = file
            .read_at(&mut head, from)
            .map_err(|e| format!("cannot read the segment: {e}"))?;
        let (before, line) = if entry.offset == 0 {
            (b'\n', &head[..n])
        } else {
            (head[0], &head[1.min(n)..n])
        };
        if before != b'\n' || seq_prefix(line) != Some(entry.seq) {
            return Err(format!(
                "entry {i} says seq {} starts at byte {}, and it does not",
                entry.seq, entry.offset
            ));
        }
        previous = Some(*entry);
    }
    Ok(())
}

/// An index of the segment at `path` read from the segment itself: an entry for the first
/// whole, readable record and then for the first one after every `every` bytes, as appends
/// make them.
fn build_index<T: Sequenced>(path: &Path, every: u64) -> std::io::Result<Vec<IndexEntry>> {
    let mut reader = BufReader::with_capacity(64 * 1024, File::open(path)?);
    let mut entries: Vec<IndexEntry> = Vec::new();
    let (mut offset, mut since_index) = (0u64, every);
    let mut line = Vec::new();
    loop {
        line.clear();
        let n = reader.read_until(b'\n', &mut line)? as u64;
        if n == 0 || line.last() != Some(&b'\n') {
            return Ok(entries);
        }
        if since_index >= every {
            let record = T::read_json(&line).ok();
            let increasing = |r: &T| entries.last().is_none_or(|e| r.seq() > e.seq);
            if let Some(record) = record.filter(increasing) {
                entries.push(IndexEntry {
                    seq: record.seq(),
                    time_ns: nanos(record.time()),
                    offset,
                });
                since_index = 0;
            }
        }
        offset += n;
        since_index += n;
    }
}

/// Finds the end of the last whole record of the newest segment, cuts anything after it,
/// and returns (next seq, segment length).
fn repair_tail<T: Sequenced>(segment: &mut Segment) -> std::io::Result<(u64, u64)> {
    // The last index entry names the record at its offset: the one before it has seq - 1.
    let (start, mut last_seq) = match segment.index.last() {
        Some(entry) => (entry.offset, entry.seq.saturating_sub(1)),
        None => (0, segment.first_seq.saturating_sub(1)),
    };
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&segment.path)?;
    file.seek(SeekFrom::Start(start))?;
    let mut reader = BufReader::new(&file);
    let (mut offset, mut good_len) = (start, start);
    let mut line = Vec::new();
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
        // A whole line counts even if it does not parse (readers skip it); its seq is
        // still taken, so it is never reused.
        if let Some(seq) = T::read_json(&line)
            .ok()
            .map(|r| r.seq())
            .or_else(|| seq_prefix(&line))
        {
            last_seq = last_seq.max(seq);
        }
        good_len = offset;
    }
    drop(reader);
    if good_len < file.metadata()?.len() {
        tracing::warn!(path = %segment.path.display(), "log ended with a torn or damaged tail; cutting it off");
        file.set_len(good_len)?;
    }
    let kept = segment
        .index
        .iter()
        .take_while(|e| e.offset < good_len)
        .count();
    if kept < segment.index.len() {
        // Entries for records that were cut must not survive to point into new ones.
        segment.index.truncate(kept);
        let index = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(segment.index_path())?;
        index.set_len((kept * ENTRY) as u64)?;
    }
    let next_seq = last_seq
        .checked_add(1)
        .filter(|next| *next < u64::MAX)
        .ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!(
                    "its last record has seq {last_seq}, which leaves no room for new ones; \
                     the segment is damaged: move it away"
                ),
            )
        })?;
    Ok((next_seq, good_len))
}

/// The seq of a stored line from its `{"seq":N,` prefix.
fn seq_prefix(line: &[u8]) -> Option<u64> {
    let rest = line.strip_prefix(b"{\"seq\":")?;
    let digits = rest.iter().take_while(|b| b.is_ascii_digit()).count();
    std::str::from_utf8(&rest[..digits]).ok()?.parse().ok()
}

/// Reads records from `offset`, calling `each` until it returns false; returns whether the
/// segment was read to its end.
/// Reads a segment from `offset`, giving each whole record with `seq > after` to `each`
/// until it returns false (then returns false). Lines at or before `after` are skipped by
/// their `seq` prefix, without being parsed.
fn read_segment<T: Sequenced>(
    path: &Path,
    offset: u64,
    after: u64,
    mut each: impl FnMut(T) -> bool,
) -> std::io::Result<bool> {
    let mut file = File::open(path)?;
    file.seek(SeekFrom::Start(offset))?;
    let mut reader = BufReader::with_capacity(64 * 1024, file);
    let mut line = Vec::new();
    loop {
        line.clear();
        if reader.read_until(b'\n', &mut line)? == 0 || line.last() != Some(&b'\n') {
            return Ok(true);
        }
        if seq_prefix(&line).is_some_and(|seq| seq <= after) {
            continue;
        }
        if let Ok(record) = T::read_json(&line) {
            if !each(record) {
                return Ok(false);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    struct Rec {
        seq: u64,
        #[serde(with = "time::serde::rfc3339")]
        time: OffsetDateTime,
        text: String,
    }

    impl Sequenced for Rec {
        fn seq(&self) -> u64 {
            self.seq
        }
        fn time(&self) -> OffsetDateTime {
            self.time
        }
    }

    fn small() -> SeqLogConfig {
        SeqLogConfig {
            segment_bytes: 4096,
            max_segments: 3,
            index_every: 512,
            broadcast_capacity: 16,
            unsaved_limit: 0,
        }
    }

    fn add(log: &SeqLog<Rec>, text: &str) -> u64 {
        log.append(|seq| Rec {
            seq,
            time: OffsetDateTime::now_utc(),
            text: text.into(),
        })
        .seq
    }

    #[test]
    fn reads_after_any_seq_across_rotation_and_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let log: SeqLog<Rec> = SeqLog::open(dir.path(), "p", small()).unwrap();
        for i in 0..200 {
            assert_eq!(add(&log, &format!("line {i}")), i + 1);
        }
        let first = log.first_seq();
        assert!(first > 1, "old segments were rotated away");
        let got = log.read_after(first + 9, 5).unwrap();
        let seqs: Vec<u64> = got.iter().map(|r| r.seq).collect();
        assert_eq!(seqs, (first + 10..first + 15).collect::<Vec<_>>());
        drop(log);
        let log: SeqLog<Rec> = SeqLog::open(dir.path(), "p", small()).unwrap();
        assert_eq!((log.first_seq(), log.last_seq()), (first, 200));
        assert_eq!(add(&log, "after reopen"), 201);
        let tail = log.read_after(198, 10).unwrap();
        assert_eq!(
            tail.iter().map(|r| r.seq).collect::<Vec<_>>(),
            [199, 200, 201]
        );
    }

    #[test]
    fn a_torn_tail_is_cut_and_numbering_continues() {
        let dir = tempfile::tempdir().unwrap();
        {
            let log: SeqLog<Rec> = SeqLog::open(dir.path(), "p", SeqLogConfig::default()).unwrap();
            add(&log, "a");
            add(&log, "b");
        }
        let seg = list_segments(dir.path(), "p").unwrap().pop().unwrap();
        OpenOptions::new()
            .append(true)
            .open(&seg.path)
            .unwrap()
            .write_all(br#"{"seq":3,"ti"#)
            .unwrap();
        let log: SeqLog<Rec> = SeqLog::open(dir.path(), "p", SeqLogConfig::default()).unwrap();
        assert_eq!(log.last_seq(), 2);
        assert_eq!(add(&log, "c"), 3);
        let all: Vec<String> = log
            .read_after(0, 10)
            .unwrap()
            .iter()
            .map(|r| r.text.clone())
            .collect();
        assert_eq!(all, ["a", "b", "c"]);
    }

    #[test]
    fn index_entries_of_a_cut_record_are_dropped_with_it() {
        let dir = tempfile::tempdir().unwrap();
        let every = SeqLogConfig {
            index_every: 1,
            ..SeqLogConfig::default()
        };
        {
            let log: SeqLog<Rec> = SeqLog::open(dir.path(), "p", every).unwrap();
            for i in 0..10 {
                add(&log, &format!("{i}"));
            }
        }
        // Tear the last record in half: its index entry now points past the good data.
        let seg = list_segments(dir.path(), "p").unwrap().pop().unwrap();
        let len = std::fs::metadata(&seg.path).unwrap().len();
        OpenOptions::new()
            .write(true)
            .open(&seg.path)
            .unwrap()
            .set_len(len - 10)
            .unwrap();
        {
            let log: SeqLog<Rec> = SeqLog::open(dir.path(), "p", every).unwrap();
            assert_eq!(log.last_seq(), 9);
            for i in 10..20 {
                add(&log, &format!("{i}"));
            }
        }
        let log: SeqLog<Rec> = SeqLog::open(dir.path(), "p", every).unwrap();
        for after in 0..19u64 {
            let got = log.read_after(after, 1).unwrap();
            assert_eq!(got[0].seq, after + 1, "reading after {after}");
        }
    }

    /// A log of 100 records indexed every 256 bytes, closed; returns its one segment.
    fn indexed_log(dir: &Path) -> Segment {
        let config = SeqLogConfig {
            index_every: 256,
            ..SeqLogConfig::default()
        };
        let log: SeqLog<Rec> = SeqLog::open(dir, "p", config).unwrap();
        for i in 0..100 {
            add(&log, &format!("record {i}"));
        }
        let mut segments = list_segments(dir, "p").unwrap();
        assert_eq!(segments.len(), 1);
        segments.pop().unwrap()
    }

    fn index_entries(segment: &Segment) -> Vec<IndexEntry> {
        std::fs::read(segment.index_path())
            .unwrap()
            .chunks_exact(ENTRY)
            .map(IndexEntry::from_bytes)
            .collect()
    }

    /// Rewrites every index entry's seq with `seq(i)`, keeping offsets and times.
    fn damage_index_seqs(segment: &Segment, seq: impl Fn(usize) -> u64) {
        let damaged: Vec<u8> = index_entries(segment)
            .into_iter()
            .enumerate()
            .flat_map(|(i, e)| IndexEntry { seq: seq(i), ..e }.to_bytes())
            .collect();
        std::fs::write(segment.index_path(), damaged).unwrap();
    }

    /// Reopens the log and checks it is numbered as written: 100 records, the next is 101,
    /// every seq readable through the index, and the index is whole again.
    fn assert_numbering_intact(dir: &Path, good: &[IndexEntry]) {
        let config = SeqLogConfig {
            index_every: 256,
            ..SeqLogConfig::default()
        };
        let log: SeqLog<Rec> = SeqLog::open(dir, "p", config).unwrap();
        assert_eq!(log.last_seq(), 100);
        for after in [0u64, 1, 37, 98, 99] {
            let got = log.read_after(after, 1).unwrap();
            assert_eq!(got[0].seq, after + 1, "reading after {after}");
        }
        let segment = list_segments(dir, "p").unwrap().pop().unwrap();
        assert_eq!(index_entries(&segment), good, "the index was rebuilt");
        assert_eq!(add(&log, "next"), 101);
    }

    #[test]
    fn an_index_with_huge_seqs_is_rebuilt_not_believed() {
        let dir = tempfile::tempdir().unwrap();
        let segment = indexed_log(dir.path());
        let good = index_entries(&segment);
        assert!(good.len() > 5, "{good:?}");
        damage_index_seqs(&segment, |i| (1u64 << 56) + i as u64);
        assert_numbering_intact(dir.path(), &good);
    }

    #[test]
    fn an_index_near_or_at_u64_max_neither_wraps_nor_hides_records() {
        for top in [u64::MAX - 1, u64::MAX] {
            let dir = tempfile::tempdir().unwrap();
            let segment = indexed_log(dir.path());
            let good = index_entries(&segment);
            let n = good.len();
            damage_index_seqs(&segment, |i| top - (n - 1 - i) as u64);
            assert_numbering_intact(dir.path(), &good);
        }
    }

    #[test]
    fn an_index_whose_offsets_point_elsewhere_is_rebuilt() {
        let dir = tempfile::tempdir().unwrap();
        let segment = indexed_log(dir.path());
        let good = index_entries(&segment);
        let shifted: Vec<u8> = good
            .iter()
            .flat_map(|e| {
                IndexEntry {
                    offset: e.offset + 7,
                    ..*e
                }
                .to_bytes()
            })
            .collect();
        std::fs::write(segment.index_path(), shifted).unwrap();
        assert_numbering_intact(dir.path(), &good);
        // Garbage of a whole number of entries, too.
        let dir = tempfile::tempdir().unwrap();
        let segment = indexed_log(dir.path());
        let good = index_entries(&segment);
        std::fs::write(segment.index_path(), vec![0xA5u8; ENTRY * 4]).unwrap();
        assert_numbering_intact(dir.path(), &good);
    }

    #[test]
    fn a_record_at_u64_max_is_an_error_naming_the_segment() {
        let dir = tempfile::tempdir().unwrap();
        let segment = indexed_log(dir.path());
        let last = Rec {
            seq: u64::MAX,
            time: OffsetDateTime::now_utc(),
            text: "the end".into(),
        };
        let mut line = serde_json::to_vec(&last).unwrap();
        line.push(b'\n');
        OpenOptions::new()
            .append(true)
            .open(&segment.path)
            .unwrap()
            .write_all(&line)
            .unwrap();
        let err = SeqLog::<Rec>::open(dir.path(), "p", SeqLogConfig::default())
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.contains(&segment.path.display().to_string()) && err.contains("no room"),
            "{err}"
        );
    }

    /// A 64 KiB tmpfs at `path`, unmounted when dropped; `None` where mounting is not
    /// permitted (not root).
    struct Tmpfs(PathBuf);

    impl Tmpfs {
        fn mount(path: &Path) -> Option<Self> {
            let ok = std::process::Command::new("mount")
                .args(["-t", "tmpfs", "-o", "size=64k", "tmpfs"])
                .arg(path)
                .stderr(std::process::Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            ok.then(|| Tmpfs(path.to_owned()))
        }
    }

    impl Drop for Tmpfs {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount")
                .arg("-l")
                .arg(&self.0)
                .status();
        }
    }

    /// A log keeping up to 5 unwritable records in memory, on a small tmpfs of its own
    /// mounted on `dir`; `None` (with a SKIPPED line) where mounting needs a privilege this
    /// run lacks. Keep the mount as long as the log.
    fn log_on_small_tmpfs(dir: &Path) -> Option<(Tmpfs, SeqLog<Rec>)> {
        let Some(mount) = Tmpfs::mount(dir) else {
            eprintln!("SKIPPED: mounting a tmpfs needs CAP_SYS_ADMIN here");
            return None;
        };
        let log = SeqLog::open(dir, "p", keeping_five()).unwrap();
        Some((mount, log))
    }

    /// The default configuration, keeping up to 5 unwritable records in memory.
    fn keeping_five() -> SeqLogConfig {
        SeqLogConfig {
            unsaved_limit: 5,
            ..SeqLogConfig::default()
        }
    }

    /// The seqs of every record `log` can give, files and memory.
    fn all_seqs(log: &SeqLog<Rec>) -> Vec<u64> {
        log.read_after(0, 100)
            .unwrap()
            .iter()
            .map(|r| r.seq)
            .collect()
    }

    /// Fills the file system holding `path` with that file, kept open.
    fn fill(path: &Path) -> std::fs::File {
        let mut f = std::fs::File::create(path).unwrap();
        while f.write_all(&[0u8; 512]).is_ok() {}
        f
    }

    #[test]
    fn a_read_cut_by_its_byte_budget_does_not_skip_to_records_kept_in_memory() {
        let dir = tempfile::tempdir().unwrap();
        let Some((_mount, log)) = log_on_small_tmpfs(dir.path()) else {
            return;
        };
        for _ in 0..3 {
            add(&log, "stored");
        }
        let _full = fill(&dir.path().join("filler"));
        add(&log, &"x".repeat(8192));
        assert!(
            log.health().borrow().is_some(),
            "the last record is unsaved"
        );
        let all = all_seqs(&log);
        assert_eq!(all, [1, 2, 3, 4]);
        // One record per read: each read must continue where the last stopped.
        let mut seqs = Vec::new();
        let mut after = 0;
        loop {
            let batch = log.read_after_within(after, 100, 1).unwrap();
            let Some(last) = batch.last() else { break };
            after = last.seq;
            seqs.extend(batch.iter().map(|r| r.seq));
        }
        assert_eq!(seqs, [1, 2, 3, 4]);
    }

    #[test]
    fn records_that_cannot_be_written_wait_in_memory_and_overflow_as_a_counted_hole() {
        let dir = tempfile::tempdir().unwrap();
        let Some((_mount, log)) = log_on_small_tmpfs(dir.path()) else {
            return;
        };
        let health = log.health();
        add(&log, "stored");
        let filler = dir.path().join("filler");
        let f = fill(&filler);
        // Big records: the segment's last page cannot take even one.
        let big = "x".repeat(8192);
        for _ in 0..3 {
            add(&log, &big);
        }
        assert!(health.borrow().is_some(), "the failure is reported");
        // Kept in memory, readers see them.
        let seqs = all_seqs(&log);
        assert_eq!(seqs, [1, 2, 3, 4]);
        for _ in 0..4 {
            add(&log, &big);
        }
        // 7 unsaved, 5 kept: 2 and 3 are lost.
        assert_eq!(log.take_lost(), 2);
        let seqs = all_seqs(&log);
        assert_eq!(seqs, [1, 4, 5, 6, 7, 8]);
        assert!(!log.retry_unsaved(), "still full");

        drop(f);
        std::fs::remove_file(&filler).unwrap();
        assert!(log.retry_unsaved(), "written once space returns");
        assert!(health.borrow().is_none());
        assert_eq!(add(&log, "after"), 9);
        drop(log);
        let log: SeqLog<Rec> = SeqLog::open(dir.path(), "p", keeping_five()).unwrap();
        let seqs = all_seqs(&log);
        assert_eq!(seqs, [1, 4, 5, 6, 7, 8, 9], "on file, in order");
    }

    #[test]
    fn seeks_by_time_through_the_index() {
        let dir = tempfile::tempdir().unwrap();
        let log: SeqLog<Rec> = SeqLog::open(
            dir.path(),
            "p",
            SeqLogConfig {
                max_segments: 0,
                ..small()
            },
        )
        .unwrap();
        let base = OffsetDateTime::UNIX_EPOCH + time::Duration::days(20_000);
        for i in 0..300u64 {
            log.append(|seq| Rec {
                seq,
                time: base + time::Duration::seconds(i as i64),
                text: "x".repeat(40),
            });
        }
        assert_eq!(
            log.seq_at(base + time::Duration::seconds(123)).unwrap(),
            124
        );
        assert_eq!(log.seq_at(base - time::Duration::seconds(5)).unwrap(), 1);
        assert_eq!(
            log.seq_at(base + time::Duration::seconds(999)).unwrap(),
            301
        );
    }

    #[tokio::test]
    async fn followers_replay_then_follow_and_survive_lagging() {
        let dir = tempfile::tempdir().unwrap();
        let log: SeqLog<Rec> = SeqLog::open(dir.path(), "p", small()).unwrap();
        for i in 0..50 {
            add(&log, &format!("{i}"));
        }
        let mut f = log.follow(Some(40));
        for i in 50..150 {
            add(&log, &format!("{i}"));
        }
        let mut seqs = Vec::new();
        while seqs.len() < 110 {
            seqs.push(f.next().await.unwrap().unwrap().seq);
        }
        assert_eq!(seqs, (41..=150).collect::<Vec<_>>());
    }

    #[tokio::test]
    async fn a_large_append_reaches_a_follower_live_in_chunks() {
        let dir = tempfile::tempdir().unwrap();
        let config = SeqLogConfig {
            broadcast_capacity: 4,
            ..SeqLogConfig::default()
        };
        let log: SeqLog<Rec> = SeqLog::open(dir.path(), "p", config).unwrap();
        let mut f = log.follow(None);
        // Three chunks' worth in one append: within a capacity of 4 chunks, so no lag.
        let n = (3 * BROADCAST_CHUNK) as u64;
        log.append_all(0..n, |seq, _| Rec {
            seq,
            time: OffsetDateTime::now_utc(),
            text: "x".into(),
        });
        let mut seqs = Vec::new();
        while let Some(r) = f.try_next() {
            seqs.push(r.seq);
        }
        assert_eq!(
            seqs,
            (1..=n).collect::<Vec<_>>(),
            "all live, none from the files"
        );
    }

    #[tokio::test]
    async fn try_next_never_abandons_a_replay() {
        let dir = tempfile::tempdir().unwrap();
        let log: SeqLog<Rec> = SeqLog::open(dir.path(), "p", small()).unwrap();
        for i in 0..30 {
            add(&log, &format!("{i}"));
        }
        let mut f = log.follow(Some(10));
        // Records 11..=30 are on file only: try_next does not read, next does.
        assert!(f.try_next().is_none());
        assert_eq!(f.next().await.unwrap().unwrap().seq, 11);
        let mut seqs = vec![11];
        while let Some(r) = f.try_next() {
            seqs.push(r.seq);
        }
        add(&log, "live");
        while seqs.len() < 21 {
            match f.try_next() {
                Some(r) => seqs.push(r.seq),
                None => seqs.push(f.next().await.unwrap().unwrap().seq),
            }
        }
        assert_eq!(seqs, (11..=31).collect::<Vec<_>>());
        assert!(f.try_next().is_none());
    }

    #[test]
    fn reads_stop_at_a_byte_budget_but_return_one_record_at_least() {
        let dir = tempfile::tempdir().unwrap();
        let log: SeqLog<Rec> = SeqLog::open(dir.path(), "p", small()).unwrap();
        for i in 0..40 {
            add(&log, &format!("{i}"));
        }
        // Each record counts 256 bytes (the default size hint).
        let seqs = |v: Vec<Arc<Rec>>| v.iter().map(|r| r.seq).collect::<Vec<_>>();
        assert_eq!(
            seqs(log.read_after_within(5, 100, 1000).unwrap()),
            [6, 7, 8, 9]
        );
        assert_eq!(seqs(log.read_after_within(5, 100, 1).unwrap()), [6]);
        assert_eq!(log.read_after(0, 100).unwrap().len(), 40);
    }
}
