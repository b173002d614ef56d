//! Output capture: a plugin's stdout and stderr read line by line (never chunk by chunk),
//! with a bounded line length, into the plugin's log file with size-based rotation, plus the
//! last stderr lines kept in memory for crash reports.
//!
//! Lines are written as `<RFC 3339 receive time> <stream> <line>`. A line longer than
//! [`MAX_LINE`] is cut into several records, each marked with a trailing `…(continued)` on
//! all but the last piece; invalid UTF-8 is replaced. This is the foundation's capture;
//! structured records, sequence numbers and queries belong to the log pipeline.
//! This module knows nothing of processes' lifecycle or of gRPC.

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};

/// Longest line kept as one record.
pub const MAX_LINE: usize = 64 * 1024;
/// Stderr lines kept for crash reports.
pub const STDERR_TAIL_LINES: usize = 20;

/// Which pipe a line came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputStream {
    /// The plugin's stdout.
    Stdout,
    /// The plugin's stderr.
    Stderr,
}

impl OutputStream {
    fn as_str(self) -> &'static str {
        match self {
            OutputStream::Stdout => "stdout",
            OutputStream::Stderr => "stderr",
        }
    }
}

/// The last lines a plugin wrote to stderr. The mutex guards a small ring and is held
/// only to push or copy it, never across `.await`.
#[derive(Clone, Default)]
pub struct StderrTail(Arc<Mutex<VecDeque<String>>>);

impl StderrTail {
    fn push(&self, line: &str) {
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

/// One plugin's log file with rotation; clones share it. The mutex is held for one batch
/// of lines (a buffered write), never across `.await`.
#[derive(Clone)]
pub struct LogSink(Arc<Mutex<SinkInner>>);

struct SinkInner {
    path: PathBuf,
    out: Option<BufWriter<File>>,
    size: u64,
    max_bytes: u64,
    keep: usize,
}

impl LogSink {
    /// A sink writing to `path`, rotating at `max_bytes` and keeping `keep` files in all.
    pub fn open(path: PathBuf, max_bytes: u64, keep: usize) -> std::io::Result<Self> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let file = OpenOptions::new().create(true).append(true).open(&path)?;
        let size = file.metadata()?.len();
        Ok(LogSink(Arc::new(Mutex::new(SinkInner {
            path,
            out: Some(BufWriter::with_capacity(64 * 1024, file)),
            size,
            max_bytes,
            keep: keep.max(1),
        }))))
    }

    /// Appends lines from one stream, then flushes.
    fn write_lines(&self, stream: OutputStream, lines: &[String]) {
        let now = OffsetDateTime::now_utc()
            .format(&Rfc3339)
            .unwrap_or_default();
        let mut inner = self.0.lock().expect("log sink lock poisoned");
        for line in lines {
            if let Err(e) = inner.write_line(&now, stream, line) {
                tracing::warn!(path = %inner.path.display(), error = %e, "plugin log write failed");
                break;
            }
        }
        if let Some(out) = inner.out.as_mut() {
            let _ = out.flush();
        }
    }
}

impl SinkInner {
    fn write_line(&mut self, now: &str, stream: OutputStream, line: &str) -> std::io::Result<()> {
        let len = (now.len() + stream.as_str().len() + line.len() + 3) as u64;
        if self.size > 0 && self.size + len > self.max_bytes {
            self.rotate()?;
        }
        let out = match self.out.as_mut() {
            Some(out) => out,
            None => return Err(std::io::Error::other("log file is not open")),
        };
        writeln!(out, "{now} {} {line}", stream.as_str())?;
        self.size += len;
        Ok(())
    }

    fn rotate(&mut self) -> std::io::Result<()> {
        if let Some(mut out) = self.out.take() {
            out.flush()?;
        }
        let numbered = |n: usize| PathBuf::from(format!("{}.{n}", self.path.display()));
        for n in (1..self.keep).rev() {
            let from = if n == 1 {
                self.path.clone()
            } else {
                numbered(n - 1)
            };
            if from.exists() {
                std::fs::rename(&from, numbered(n))?;
            }
        }
        if self.keep == 1 {
            std::fs::remove_file(&self.path)?;
        }
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)?;
        self.out = Some(BufWriter::with_capacity(64 * 1024, file));
        self.size = 0;
        Ok(())
    }
}

/// Reads `reader` to its end, line by line, writing every line to `sink` (and stderr lines
/// to `tail`). Never stops reading early, so the writer can never block on a full pipe.
pub async fn drain_lines<R: AsyncRead + Unpin>(
    reader: R,
    stream: OutputStream,
    sink: LogSink,
    tail: Option<StderrTail>,
) {
    let mut reader = BufReader::with_capacity(64 * 1024, reader);
    let mut partial: Vec<u8> = Vec::new();
    let mut batch: Vec<String> = Vec::new();
    loop {
        let chunk = match reader.fill_buf().await {
            Ok(chunk) => chunk,
            Err(e) => {
                tracing::warn!(stream = stream.as_str(), error = %e, "reading plugin output failed");
                break;
            }
        };
        if chunk.is_empty() {
            break;
        }
        let used = chunk.len();
        split_lines(chunk, &mut partial, &mut batch);
        reader.consume(used);
        if reader.buffer().is_empty() && !batch.is_empty() {
            emit(&sink, stream, tail.as_ref(), &mut batch);
        }
    }
    if !partial.is_empty() {
        batch.push(String::from_utf8_lossy(&partial).into_owned());
    }
    emit(&sink, stream, tail.as_ref(), &mut batch);
}

fn emit(sink: &LogSink, stream: OutputStream, tail: Option<&StderrTail>, batch: &mut Vec<String>) {
    if batch.is_empty() {
        return;
    }
    if let Some(tail) = tail {
        for line in batch.iter().rev().take(STDERR_TAIL_LINES).rev() {
            tail.push(line);
        }
    }
    sink.write_lines(stream, batch);
    batch.clear();
}

/// Splits `chunk` into complete lines (appended to `out`), carrying an unfinished line in
/// `partial`; a line reaching [`MAX_LINE`] bytes is emitted as a continued piece.
fn split_lines(mut chunk: &[u8], partial: &mut Vec<u8>, out: &mut Vec<String>) {
    while !chunk.is_empty() {
        let room = MAX_LINE - partial.len();
        let window = &chunk[..chunk.len().min(room)];
        match window.iter().position(|&b| b == b'\n') {
            Some(nl) => {
                partial.extend_from_slice(&window[..nl]);
                if partial.last() == Some(&b'\r') {
                    partial.pop();
                }
                out.push(String::from_utf8_lossy(partial).into_owned());
                partial.clear();
                chunk = &chunk[nl + 1..];
            }
            None => {
                partial.extend_from_slice(window);
                chunk = &chunk[window.len()..];
                if partial.len() == MAX_LINE {
                    let mut piece = String::from_utf8_lossy(partial).into_owned();
                    piece.push_str("…(continued)");
                    out.push(piece);
                    partial.clear();
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_lines_across_chunks_and_caps_length() {
        let (mut partial, mut out) = (Vec::new(), Vec::new());
        split_lines(b"ab\ncd", &mut partial, &mut out);
        split_lines(b"e\r\n\n", &mut partial, &mut out);
        assert_eq!(out, ["ab", "cde", ""]);
        out.clear();
        let long = vec![b'x'; MAX_LINE + 10];
        split_lines(&long, &mut partial, &mut out);
        split_lines(b"\n", &mut partial, &mut out);
        assert_eq!(out.len(), 2);
        assert!(out[0].ends_with("…(continued)"));
        assert_eq!(out[1].len(), 10);
    }

    #[tokio::test]
    async fn drains_everything_and_rotates() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.log");
        let sink = LogSink::open(path.clone(), 4096, 3).unwrap();
        let mut text = Vec::new();
        for i in 0..1000 {
            text.extend_from_slice(format!("line {i}\n").as_bytes());
        }
        let tail = StderrTail::default();
        drain_lines(&text[..], OutputStream::Stderr, sink, Some(tail.clone())).await;
        assert_eq!(tail.lines().len(), STDERR_TAIL_LINES);
        assert_eq!(tail.lines().last().unwrap(), "line 999");
        let current = std::fs::read_to_string(&path).unwrap();
        assert!(current.trim_end().ends_with("stderr line 999"));
        assert!(dir.path().join("p.log.2").exists());
        assert!(!dir.path().join("p.log.3").exists());
    }
}
