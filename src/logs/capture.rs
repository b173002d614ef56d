//! Output capture: a plugin's stdout and stderr read line by line (never chunk by chunk) and
//! stored as structured, sequenced records in the plugin's log, plus the last stderr lines
//! kept in memory for crash reports.
//!
//! Each line becomes a record as `record.rs` parses it (structured JSON or plain text). A
//! line longer than the limit ([`DEFAULT_MAX_LINE`] unless configured) is stored as several
//! records, all but the last marked `continued`, cut between characters; invalid UTF-8 is
//! replaced. Each read's lines are stored with one append.
//! This module knows nothing of processes' lifecycle or of gRPC.

use std::collections::VecDeque;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use tokio_util::sync::CancellationToken;

use serde_json::Map;
use time::OffsetDateTime;
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::time::{Duration, Instant};

use crate::logs::record::parse_line;
use crate::logs::seqlog::{SeqLog, SeqLogConfig, SeqLogError};
use crate::model::{LogLevel, LogRecord, LogStream};

/// Longest line kept as one record, unless configured otherwise.
pub const DEFAULT_MAX_LINE: usize = 64 * 1024;
#[cfg(test)]
const MAX_LINE: usize = DEFAULT_MAX_LINE;
/// Stderr lines kept for crash reports.
pub const STDERR_TAIL_LINES: usize = 20;

/// One plugin's log: a [`SeqLog`] of [`LogRecord`]s in its own directory, rotated at
/// `segment_bytes` keeping `segments` files. Clones share it.
#[derive(Clone)]
pub struct PluginLog {
    log: SeqLog<LogRecord>,
    captured: Arc<Captured>,
}

/// Lines and bytes captured from a plugin's output since the daemon started, per stream.
#[derive(Debug, Default)]
struct Captured {
    stdout: [AtomicU64; 2],
    stderr: [AtomicU64; 2],
}

impl Captured {
    fn of(&self, stream: LogStream) -> Option<&[AtomicU64; 2]> {
        match stream {
            LogStream::Stdout => Some(&self.stdout),
            LogStream::Stderr => Some(&self.stderr),
            LogStream::Supervisor => None,
        }
    }
}

impl PluginLog {
    /// Opens (or creates) the log in `dir`.
    pub fn open(dir: &Path, segment_bytes: u64, segments: usize) -> Result<Self, SeqLogError> {
        let config = SeqLogConfig {
            segment_bytes,
            max_segments: segments.max(1),
            ..SeqLogConfig::default()
        };
        Ok(PluginLog {
            log: SeqLog::open(dir, "log", config)?,
            captured: Arc::default(),
        })
    }

    /// Lines and bytes (line text, without the newline) captured from `stream` since the
    /// daemon started; `(0, 0)` for the supervisor's own notes.
    pub fn captured(&self, stream: LogStream) -> (u64, u64) {
        self.captured.of(stream).map_or((0, 0), |[lines, bytes]| {
            (lines.load(Ordering::Relaxed), bytes.load(Ordering::Relaxed))
        })
    }

    /// The underlying sequenced log (for readers and followers).
    pub fn records(&self) -> &SeqLog<LogRecord> {
        &self.log
    }

    /// Stores a note of the supervisor's about this plugin.
    pub fn note(&self, level: LogLevel, message: String, pid: u32) {
        self.log.append(|seq| LogRecord {
            seq,
            time: OffsetDateTime::now_utc(),
            stream: LogStream::Supervisor,
            level,
            message,
            plugin_time: None,
            fields: Map::new(),
            pid,
            continued: false,
        });
    }

    fn store(&self, stream: LogStream, pid: u32, lines: std::vec::Drain<'_, Line>) {
        if let Some([count, bytes]) = self.captured.of(stream) {
            count.fetch_add(lines.len() as u64, Ordering::Relaxed);
            let size: usize = lines.as_slice().iter().map(|l| l.text.len()).sum();
            bytes.fetch_add(size as u64, Ordering::Relaxed);
        }
        // The time is taken under the log's lock, so time order follows seq order; lines
        // are parsed there too, straight into the records, with no copy in between.
        let mut time = None;
        self.log.append_all(lines, |seq, line| {
            let time = *time.get_or_insert_with(OffsetDateTime::now_utc);
            let mut record = parse_line(line.text);
            record.seq = seq;
            record.time = time;
            record.continued = line.continued;
            record.stream = stream;
            record.pid = pid;
            record
        });
    }
}

/// The last lines a plugin wrote to stderr. The mutex guards a small ring and is held
/// only to push or copy it, never across `.await`.
#[derive(Clone, Default)]
pub struct StderrTail(Arc<Mutex<VecDeque<String>>>);

impl StderrTail {
    /// Keeps `line` as the newest.
    pub fn push(&self, line: &str) {
        let mut ring = self.0.lock().expect("stderr tail lock poisoned");
        if ring.len() == STDERR_TAIL_LINES {
            ring.pop_front();
        }
        ring.push_back(line.to_owned());
    }

    /// The kept lines, oldest first.
    pub fn lines(&self) -> Vec<String> {
        self.0
            .lock()
            .expect("stderr tail lock poisoned")
            .iter()
            .cloned()
            .collect()
    }
}

/// One line read from a pipe.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Line {
    text: String,
    /// The line went on past the limit; the next piece follows.
    continued: bool,
}

/// How long a busy stream's lines are held to be stored together: a line that follows a
/// quiet spell is stored at once; under a flood, stores (a file write, a broadcast and a
/// wake-up of every follower) happen about once per this interval instead of once per
/// read, which is what lets capture keep up with a plugin writing a line per `write`.
const COALESCE: Duration = Duration::from_millis(1);
/// Bytes of held lines that are stored without waiting any longer.
const COALESCE_BYTES: usize = 64 * 1024;
/// Most bytes read from a pipe at once.
const READ_BUFFER: usize = 64 * 1024;
/// Bytes read from a pipe at first. A read that fills the buffer doubles it, up to
/// [`READ_BUFFER`]: a busy stream reads 64 KiB at a time after a few reads, while a thousand
/// quiet plugins do not each hold two 64 KiB buffers.
const FIRST_READ_BUFFER: usize = 1024;

/// Reads `reader` to its end, line by line, storing every line in `log` (and stderr lines in
/// `tail`). Never stops reading early, so the writer can never block on a full pipe.
pub async fn drain_lines<R: AsyncRead + Unpin>(
    reader: R,
    stream: LogStream,
    pid: u32,
    log: PluginLog,
    tail: Option<StderrTail>,
    max_line: usize,
) {
    let never = CancellationToken::new();
    let capture = Capture {
        stream,
        pid,
        log,
        tail,
        max_line,
    };
    capture.run(reader, Vec::new(), &never).await;
}

/// Where a captured stream's lines go.
pub struct Capture {
    /// Which stream it is.
    pub stream: LogStream,
    /// The process writing it.
    pub pid: u32,
    /// The log its lines are stored in.
    pub log: PluginLog,
    /// Where stderr's last lines are kept.
    pub tail: Option<StderrTail>,
    /// Longest line stored whole.
    pub max_line: usize,
}

/// What a capture stopped by `pause` gives back: the pipe, unread bytes left in it, and the
/// unfinished line it had read (to be prepended to what is read next, by whoever resumes).
pub struct Paused<R> {
    /// The pipe.
    pub reader: R,
    /// Bytes of the line being read when it stopped (no newline yet).
    pub partial: Vec<u8>,
}

impl Capture {
    /// Reads `reader` as [`drain_lines`] does, starting with the unfinished line `partial`,
    /// until its end (`None`) or until `pause` is cancelled: then every complete line read
    /// is stored and the pipe is given back with the unfinished line, not a byte lost.
    pub async fn run<R: AsyncRead + Unpin>(
        self,
        mut reader: R,
        mut partial: Vec<u8>,
        pause: &CancellationToken,
    ) -> Option<Paused<R>> {
        let Capture {
            stream,
            pid,
            log,
            tail,
            max_line,
        } = self;
        let max_line = max_line.max(16);
        let mut buf = vec![0u8; FIRST_READ_BUFFER];
        let mut batch: Vec<Line> = Vec::new();
        let mut held_bytes = 0;
        // When the last store happened; lines arriving sooner than COALESCE after it are held.
        let mut last_store = Instant::now() - COALESCE;
        loop {
            // `read` is cancel-safe: a timeout or a pause loses no bytes.
            let read = if batch.is_empty() {
                tokio::select! {
                    read = reader.read(&mut buf) => read,
                    _ = pause.cancelled() => {
                        return Some(Paused { reader, partial });
                    }
                }
            } else {
                let read = tokio::select! {
                    read = tokio::time::timeout_at(last_store + COALESCE, reader.read(&mut buf)) => read,
                    _ = pause.cancelled() => {
                        emit(&log, stream, pid, tail.as_ref(), &mut batch);
                        return Some(Paused { reader, partial });
                    }
                };
                match read {
                    Ok(read) => read,
                    Err(_) => {
                        emit(&log, stream, pid, tail.as_ref(), &mut batch);
                        held_bytes = 0;
                        last_store = Instant::now();
                        continue;
                    }
                }
            };
            let used = match read {
                Ok(used) => used,
                Err(e) => {
                    tracing::warn!(?stream, error = %e, "reading plugin output failed");
                    break;
                }
            };
            if used == 0 {
                break;
            }
            split_lines(&buf[..used], &mut partial, &mut batch, max_line);
            held_bytes += used;
            let drained = used < buf.len();
            if !drained && buf.len() < READ_BUFFER {
                buf.resize((buf.len() * 2).min(READ_BUFFER), 0);
            }
            let due = last_store.elapsed() >= COALESCE || held_bytes >= COALESCE_BYTES;
            if !batch.is_empty() && due {
                emit(&log, stream, pid, tail.as_ref(), &mut batch);
                held_bytes = 0;
                last_store = Instant::now();
            } else if !batch.is_empty() && drained {
                // A busy stream that was just stored, and the pipe is drained: let it fill until
                // the next store is due instead of waking for every write. (A pipe that is not
                // drained, a read that filled the buffer, is read on at once.) The pipe holds far
                // more than a millisecond of any plugin's logging, so the plugin does not block;
                // and while the pipe stays non-empty its writes wake nobody, which also makes
                // them cheaper for the plugin.
                tokio::select! {
                    _ = tokio::time::sleep_until(last_store + COALESCE) => {}
                    _ = pause.cancelled() => {
                        emit(&log, stream, pid, tail.as_ref(), &mut batch);
                        return Some(Paused { reader, partial });
                    }
                }
            }
        }
        if !partial.is_empty() {
            batch.push(Line {
                text: String::from_utf8_lossy(&partial).into_owned(),
                continued: false,
            });
        }
        emit(&log, stream, pid, tail.as_ref(), &mut batch);
        None
    }
}

fn emit(
    log: &PluginLog,
    stream: LogStream,
    pid: u32,
    tail: Option<&StderrTail>,
    batch: &mut Vec<Line>,
) {
    if batch.is_empty() {
        return;
    }
    if let Some(tail) = tail {
        for line in batch.iter().rev().take(STDERR_TAIL_LINES).rev() {
            tail.push(&line.text);
        }
    }
    // Drained, not taken: the batch keeps its capacity for the next millisecond's lines.
    log.store(stream, pid, batch.drain(..));
}

/// Splits `chunk` into complete lines (appended to `out`), carrying an unfinished line in
/// `partial`; a line reaching `max` bytes is emitted as a continued piece.
fn split_lines(mut chunk: &[u8], partial: &mut Vec<u8>, out: &mut Vec<Line>, max: usize) {
    let mut finish = |partial: &mut Vec<u8>, continued: bool| {
        if !continued && partial.last() == Some(&b'\r') {
            partial.pop();
        }
        out.push(Line {
            text: String::from_utf8_lossy(partial).into_owned(),
            continued,
        });
        partial.clear();
    };
    while !chunk.is_empty() {
        if partial.len() >= max {
            // A full piece waits for the next byte: the line's end, or more of it.
            if chunk[0] == b'\n' {
                finish(partial, false);
                chunk = &chunk[1..];
                continue;
            }
            // Cut between characters: an incomplete UTF-8 sequence at the end moves on to
            // the next piece rather than turning into replacement characters in both.
            let carry = partial.split_off(partial.len() - incomplete_tail(partial));
            finish(partial, true);
            partial.extend_from_slice(&carry);
        }
        let room = max - partial.len();
        let window = &chunk[..chunk.len().min(room)];
        match window.iter().position(|&b| b == b'\n') {
            Some(nl) => {
                partial.extend_from_slice(&window[..nl]);
                finish(partial, false);
                chunk = &chunk[nl + 1..];
            }
            None => {
                partial.extend_from_slice(window);
                chunk = &chunk[window.len()..];
            }
        }
    }
}

/// How many bytes at the end of `bytes` are the start of a UTF-8 sequence that is not
/// complete yet (0 to 3).
fn incomplete_tail(bytes: &[u8]) -> usize {
    for back in 1..=bytes.len().min(3) {
        let b = bytes[bytes.len() - back];
        if b & 0b1100_0000 == 0b1000_0000 {
            continue; // a continuation byte: look further back for the lead
        }
        let needed = match b {
            0xC0..=0xDF => 2,
            0xE0..=0xEF => 3,
            0xF0..=0xF7 => 4,
            _ => return 0, // ASCII or not a lead byte: nothing to carry
        };
        return if back < needed { back } else { 0 };
    }
    0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_lines_across_chunks_and_caps_length() {
        let (mut partial, mut out) = (Vec::new(), Vec::new());
        split_lines(b"ab\ncd", &mut partial, &mut out, MAX_LINE);
        split_lines(b"e\r\n\n", &mut partial, &mut out, MAX_LINE);
        let texts: Vec<&str> = out.iter().map(|l| l.text.as_str()).collect();
        assert_eq!(texts, ["ab", "cde", ""]);
        out.clear();
        let long = vec![b'x'; MAX_LINE + 10];
        split_lines(&long, &mut partial, &mut out, MAX_LINE);
        split_lines(b"\n", &mut partial, &mut out, MAX_LINE);
        assert_eq!(out.len(), 2);
        assert!(out[0].continued && !out[1].continued);
        assert_eq!((out[0].text.len(), out[1].text.len()), (MAX_LINE, 10));
        out.clear();
        let exact = vec![b'y'; MAX_LINE];
        split_lines(&exact, &mut partial, &mut out, MAX_LINE);
        split_lines(b"\nnext\n", &mut partial, &mut out, MAX_LINE);
        assert_eq!(out.len(), 2, "a line of exactly the limit is one record");
        assert!(!out[0].continued && out[0].text.len() == MAX_LINE && out[1].text == "next");
    }

    #[test]
    fn long_lines_are_cut_between_characters() {
        assert_eq!(incomplete_tail(b"ab"), 0);
        assert_eq!(incomplete_tail("a\u{20ac}".as_bytes()), 0);
        assert_eq!(incomplete_tail(&"\u{20ac}".as_bytes()[..2]), 2);
        assert_eq!(incomplete_tail(&"\u{1f600}".as_bytes()[..3]), 3);
        assert_eq!(
            incomplete_tail(b"a\xff"),
            0,
            "invalid bytes are not carried"
        );
        let line = "\u{20ac}".repeat(MAX_LINE / 3 + 10);
        let (mut partial, mut out) = (Vec::new(), Vec::new());
        split_lines(
            format!("{line}\n").as_bytes(),
            &mut partial,
            &mut out,
            MAX_LINE,
        );
        assert_eq!(out.len(), 2);
        assert!(out[0].continued && out[0].text.len() <= MAX_LINE);
        assert_eq!(format!("{}{}", out[0].text, out[1].text), line);
    }

    #[tokio::test]
    async fn drains_everything_in_order_and_rotates() {
        let dir = tempfile::tempdir().unwrap();
        let log = PluginLog::open(dir.path(), 16 * 1024, 100).unwrap();
        let mut text = Vec::new();
        for i in 0..1000 {
            text.extend_from_slice(format!("line {i}\n").as_bytes());
        }
        text.extend_from_slice(b"bad \xff utf8 \0 nul");
        let tail = StderrTail::default();
        drain_lines(
            &text[..],
            LogStream::Stderr,
            7,
            log.clone(),
            Some(tail.clone()),
            MAX_LINE,
        )
        .await;
        assert_eq!(tail.lines().len(), STDERR_TAIL_LINES);
        let records = log.records().read_after(0, 2000).unwrap();
        assert_eq!(records.len(), 1001);
        for (i, r) in records.iter().take(1000).enumerate() {
            assert_eq!(
                (r.seq, r.message.as_str(), r.pid),
                (i as u64 + 1, format!("line {i}").as_str(), 7)
            );
        }
        assert_eq!(records[1000].message, "bad \u{fffd} utf8 \0 nul");
        assert!(
            std::fs::read_dir(dir.path()).unwrap().count() > 2,
            "the log rotated"
        );
    }
}
