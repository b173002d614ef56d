//! Output capture: a plugin's stdout and stderr read line by line (never chunk by chunk) and
//! stored as structured, sequenced records in the plugin's log, plus the last stderr lines
//! kept in memory for crash reports.
//!
//! A line that is a JSON object with a string `message` (and, if present, a string `level`
//! of trace/debug/info/warn/error in any case) is a structured record: its `timestamp` is
//! kept as the plugin's time and its other keys as fields. Any other line — plain text, or
//! JSON whose `level` or `message` has the wrong type — is kept whole as a message, at level
//! info unless it starts with a recognised prefix (`[WARN]`, `ERROR:`, …). A line longer
//! than the limit ([`DEFAULT_MAX_LINE`] unless configured) is stored as several records, all
//! but the last marked `continued`, cut between characters;
//! invalid UTF-8 is replaced. Each read's lines are stored with one append.
//! This module knows nothing of processes' lifecycle or of gRPC.

use std::collections::VecDeque;
use std::path::Path;
use std::sync::{Arc, Mutex};

use serde_json::{Map, Value};
use time::OffsetDateTime;
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::time::{Duration, Instant};

use crate::logs::seqlog::{SeqLog, SeqLogConfig, SeqLogError, Sequenced};
use crate::model::{LogLevel, LogRecord, LogStream};

/// Longest line kept as one record, unless configured otherwise.
pub const DEFAULT_MAX_LINE: usize = 64 * 1024;
#[cfg(test)]
const MAX_LINE: usize = DEFAULT_MAX_LINE;
/// Stderr lines kept for crash reports.
pub const STDERR_TAIL_LINES: usize = 20;

impl Sequenced for LogRecord {
    fn seq(&self) -> u64 {
        self.seq
    }

    fn time(&self) -> OffsetDateTime {
        self.time
    }

    fn write_json(&self, out: &mut Vec<u8>) {
        write_record_json(self, out);
    }

    fn read_json(line: &[u8]) -> Result<Self, serde_json::Error> {
        match read_record_json(line) {
            Some(record) => Ok(record),
            None => serde_json::from_slice(line),
        }
    }

    fn size_hint(&self) -> usize {
        // The struct, its strings, and a rough share for fields.
        std::mem::size_of::<Self>()
            + self.message.len()
            + self.plugin_time.as_ref().map_or(0, String::len)
            + self.fields.len() * 64
    }
}

/// One plugin's log: a [`SeqLog`] of [`LogRecord`]s in its own directory, rotated at
/// `segment_bytes` keeping `segments` files. Clones share it.
#[derive(Clone)]
pub struct PluginLog {
    log: SeqLog<LogRecord>,
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

/// Writes `r` as the JSON serde would (the same fields, names and order, so serde reads it
/// back), without serde's per-field overhead: capture writes every line of every plugin.
fn write_record_json(r: &LogRecord, out: &mut Vec<u8>) {
    let mut digits = itoa::Buffer::new();
    out.extend_from_slice(b"{\"seq\":");
    out.extend_from_slice(digits.format(r.seq).as_bytes());
    out.extend_from_slice(b",\"time\":\"");
    write_rfc3339(r.time, out);
    out.extend_from_slice(b"\",\"stream\":\"");
    out.extend_from_slice(match r.stream {
        LogStream::Stdout => b"stdout".as_slice(),
        LogStream::Stderr => b"stderr",
        LogStream::Supervisor => b"supervisor",
    });
    out.extend_from_slice(b"\",\"level\":\"");
    out.extend_from_slice(match r.level {
        LogLevel::Trace => b"trace".as_slice(),
        LogLevel::Debug => b"debug",
        LogLevel::Info => b"info",
        LogLevel::Warn => b"warn",
        LogLevel::Error => b"error",
    });
    out.extend_from_slice(b"\",\"message\":");
    write_json_string(&r.message, out);
    if let Some(t) = &r.plugin_time {
        out.extend_from_slice(b",\"plugin_time\":");
        write_json_string(t, out);
    }
    if !r.fields.is_empty() {
        out.extend_from_slice(b",\"fields\":");
        serde_json::to_writer(&mut *out, &r.fields).expect("JSON values always serialise");
    }
    out.extend_from_slice(b",\"pid\":");
    out.extend_from_slice(digits.format(r.pid).as_bytes());
    if r.continued {
        out.extend_from_slice(b",\"continued\":true");
    }
    out.push(b'}');
}

/// Reads a record as [`write_record_json`] writes the usual one: no escapes in its strings,
/// no fields, a UTC time with nine fraction digits. `None` for anything else (serde reads
/// those), so this is only ever a faster way to the same result.
fn read_record_json(line: &[u8]) -> Option<LogRecord> {
    let mut p = Parser {
        rest: line.strip_suffix(b"\n").unwrap_or(line),
    };
    p.expect(b"{\"seq\":")?;
    let seq = p.number()?;
    p.expect(b",\"time\":\"")?;
    let time = p.rfc3339()?;
    p.expect(b"\",\"stream\":\"")?;
    let stream = match p.until_quote()? {
        b"stdout" => LogStream::Stdout,
        b"stderr" => LogStream::Stderr,
        b"supervisor" => LogStream::Supervisor,
        _ => return None,
    };
    p.expect(b",\"level\":\"")?;
    let level = match p.until_quote()? {
        b"trace" => LogLevel::Trace,
        b"debug" => LogLevel::Debug,
        b"info" => LogLevel::Info,
        b"warn" => LogLevel::Warn,
        b"error" => LogLevel::Error,
        _ => return None,
    };
    p.expect(b",\"message\":\"")?;
    let message = p.plain_string()?;
    let plugin_time = if p.rest.starts_with(b",\"plugin_time\":\"") {
        p.expect(b",\"plugin_time\":\"")?;
        Some(p.plain_string()?)
    } else {
        None
    };
    p.expect(b",\"pid\":")?;
    let pid = u32::try_from(p.number()?).ok()?;
    let continued = if p.rest.starts_with(b",\"continued\":true") {
        p.expect(b",\"continued\":true")?;
        true
    } else {
        false
    };
    p.expect(b"}")?;
    p.rest.is_empty().then_some(LogRecord {
        seq,
        time,
        stream,
        level,
        message,
        plugin_time,
        fields: Map::new(),
        pid,
        continued,
    })
}

/// A cursor over the bytes of one line, for [`read_record_json`].
struct Parser<'a> {
    rest: &'a [u8],
}

impl<'a> Parser<'a> {
    fn expect(&mut self, token: &[u8]) -> Option<()> {
        self.rest = self.rest.strip_prefix(token)?;
        Some(())
    }

    fn number(&mut self) -> Option<u64> {
        let digits = self.rest.iter().take_while(|b| b.is_ascii_digit()).count();
        if digits == 0 || digits > 19 {
            return None;
        }
        let mut n: u64 = 0;
        for &b in &self.rest[..digits] {
            n = n * 10 + u64::from(b - b'0');
        }
        self.rest = &self.rest[digits..];
        Some(n)
    }

    /// The bytes up to the next quote, which is consumed.
    fn until_quote(&mut self) -> Option<&'a [u8]> {
        let end = memchr_quote(self.rest)?;
        let text = &self.rest[..end];
        self.rest = &self.rest[end + 1..];
        Some(text)
    }

    /// A string's content up to its closing quote, when it has no escape.
    fn plain_string(&mut self) -> Option<String> {
        let text = self.until_quote()?;
        if text.contains(&b'\\') {
            return None;
        }
        String::from_utf8(text.to_vec()).ok()
    }

    /// `YYYY-MM-DDTHH:MM:SS.nnnnnnnnnZ`, then the closing quote is left for the caller.
    fn rfc3339(&mut self) -> Option<OffsetDateTime> {
        let t = self.rest.get(..30)?;
        let d = |range: std::ops::Range<usize>| -> Option<u32> {
            let mut n = 0u32;
            for &b in &t[range] {
                if !b.is_ascii_digit() {
                    return None;
                }
                n = n * 10 + u32::from(b - b'0');
            }
            Some(n)
        };
        if (t[4], t[7], t[10], t[13], t[16], t[19], t[29])
            != (b'-', b'-', b'T', b':', b':', b'.', b'Z')
        {
            return None;
        }
        let month = time::Month::try_from(u8::try_from(d(5..7)?).ok()?).ok()?;
        let date =
            time::Date::from_calendar_date(i32::try_from(d(0..4)?).ok()?, month, d(8..10)? as u8)
                .ok()?;
        let clock = time::Time::from_hms_nano(
            d(11..13)? as u8,
            d(14..16)? as u8,
            d(17..19)? as u8,
            d(20..29)?,
        )
        .ok()?;
        self.rest = &self.rest[30..];
        Some(time::PrimitiveDateTime::new(date, clock).assume_utc())
    }
}

fn memchr_quote(bytes: &[u8]) -> Option<usize> {
    bytes.iter().position(|&b| b == b'"')
}

/// A JSON string: copied as is when nothing needs escaping (the usual case), else serde's.
fn write_json_string(s: &str, out: &mut Vec<u8>) {
    if s.bytes().all(|b| b >= 0x20 && b != b'"' && b != b'\\') {
        out.push(b'"');
        out.extend_from_slice(s.as_bytes());
        out.push(b'"');
    } else {
        serde_json::to_writer(&mut *out, s).expect("strings always serialise");
    }
}

/// `YYYY-MM-DDTHH:MM:SS.nnnnnnnnnZ` (UTC, nanoseconds). The records of one store share
/// their time, so the last text is kept per thread and reused.
fn write_rfc3339(t: OffsetDateTime, out: &mut Vec<u8>) {
    thread_local! {
        static LAST: std::cell::RefCell<(Option<OffsetDateTime>, Vec<u8>)> =
            const { std::cell::RefCell::new((None, Vec::new())) };
    }
    LAST.with_borrow_mut(|(last, text)| {
        if *last != Some(t) {
            text.clear();
            format_rfc3339(t, text);
            *last = Some(t);
        }
        out.extend_from_slice(text);
    });
}

fn format_rfc3339(t: OffsetDateTime, out: &mut Vec<u8>) {
    let t = t.to_offset(time::UtcOffset::UTC);
    let (year, month, day) = t.to_calendar_date();
    let (hour, minute, second, nano) = t.to_hms_nano();
    if !(0..=9999).contains(&year) {
        // Outside what four digits hold: let the time crate write it.
        let text = t
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap_or_default();
        out.extend_from_slice(text.as_bytes());
        return;
    }
    put_digits(out, year as u32, 4);
    out.push(b'-');
    put_digits(out, month as u32, 2);
    out.push(b'-');
    put_digits(out, u32::from(day), 2);
    out.push(b'T');
    put_digits(out, u32::from(hour), 2);
    out.push(b':');
    put_digits(out, u32::from(minute), 2);
    out.push(b':');
    put_digits(out, u32::from(second), 2);
    out.push(b'.');
    put_digits(out, nano, 9);
    out.push(b'Z');
}

/// `value` in exactly `width` (at most 9) decimal digits, zero-padded.
fn put_digits(out: &mut Vec<u8>, value: u32, width: usize) {
    let mut buf = [b'0'; 9];
    let mut v = value;
    for slot in buf[..width].iter_mut().rev() {
        *slot = b'0' + (v % 10) as u8;
        v /= 10;
    }
    out.extend_from_slice(&buf[..width]);
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
/// Bytes read from a pipe at once.
const READ_BUFFER: usize = 64 * 1024;

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
    let max_line = max_line.max(16);
    let mut reader = BufReader::with_capacity(READ_BUFFER, reader);
    let mut partial: Vec<u8> = Vec::new();
    let mut batch: Vec<Line> = Vec::new();
    let mut held_bytes = 0;
    // When the last store happened; lines arriving sooner than COALESCE after it are held.
    let mut last_store = Instant::now() - COALESCE;
    loop {
        let read = if batch.is_empty() {
            reader.fill_buf().await
        } else {
            // `fill_buf` is cancel-safe: a timeout loses no bytes.
            match tokio::time::timeout_at(last_store + COALESCE, reader.fill_buf()).await {
                Ok(read) => read,
                Err(_) => {
                    emit(&log, stream, pid, tail.as_ref(), &mut batch);
                    held_bytes = 0;
                    last_store = Instant::now();
                    continue;
                }
            }
        };
        let chunk = match read {
            Ok(chunk) => chunk,
            Err(e) => {
                tracing::warn!(?stream, error = %e, "reading plugin output failed");
                break;
            }
        };
        if chunk.is_empty() {
            break;
        }
        let used = chunk.len();
        split_lines(chunk, &mut partial, &mut batch, max_line);
        reader.consume(used);
        held_bytes += used;
        let due = last_store.elapsed() >= COALESCE || held_bytes >= COALESCE_BYTES;
        if !batch.is_empty() && due {
            emit(&log, stream, pid, tail.as_ref(), &mut batch);
            held_bytes = 0;
            last_store = Instant::now();
        } else if !batch.is_empty() && used < READ_BUFFER {
            // A busy stream that was just stored, and the pipe is drained: let it fill until
            // the next store is due instead of waking for every write. (A pipe that is not
            // drained, `used == READ_BUFFER`, is read on at once.) The pipe holds far more
            // than a millisecond of any plugin's logging, so the plugin does not block; and
            // while the pipe stays non-empty its writes wake nobody, which also makes them
            // cheaper for the plugin.
            tokio::time::sleep_until(last_store + COALESCE).await;
        }
    }
    if !partial.is_empty() {
        batch.push(Line {
            text: String::from_utf8_lossy(&partial).into_owned(),
            continued: false,
        });
    }
    emit(&log, stream, pid, tail.as_ref(), &mut batch);
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

/// A record (seq, time, stream, pid unset) from one line of output.
fn parse_line(line: String) -> LogRecord {
    let mut record = LogRecord {
        seq: 0,
        time: OffsetDateTime::UNIX_EPOCH,
        stream: LogStream::Stdout,
        level: LogLevel::Info,
        message: String::new(),
        plugin_time: None,
        fields: Map::new(),
        pid: 0,
        continued: false,
    };
    if line.trim_start().starts_with('{') {
        let parsed = serde_json::from_str::<Value>(&line)
            .ok()
            .filter(|v| depth(v) <= MAX_DEPTH);
        if let Some(Value::Object(mut map)) = parsed {
            let level = match map.get("level") {
                None => Some(LogLevel::Info),
                Some(Value::String(name)) => LogLevel::parse(name),
                Some(_) => None,
            };
            if let (Some(level), Some(Value::String(_))) = (level, map.get("message")) {
                let Some(Value::String(message)) = map.remove("message") else {
                    unreachable!("checked above")
                };
                map.remove("level");
                record.plugin_time = match map.remove("timestamp") {
                    Some(Value::String(t)) => Some(t),
                    Some(other) => {
                        map.insert("timestamp".into(), other);
                        None
                    }
                    None => None,
                };
                record.level = level;
                record.message = message;
                record.fields = map;
                return record;
            }
        }
    }
    record.level = plain_level(&line).unwrap_or(LogLevel::Info);
    record.message = line;
    record
}

/// Deepest JSON kept as structured fields: stored records wrap the fields in two more
/// levels, and serde_json reads at most 128.
const MAX_DEPTH: usize = 100;

/// Nesting depth of a JSON value.
fn depth(v: &Value) -> usize {
    match v {
        Value::Array(items) => 1 + items.iter().map(depth).max().unwrap_or(0),
        Value::Object(map) => 1 + map.values().map(depth).max().unwrap_or(0),
        _ => 0,
    }
}

/// The level a plain line announces with a common prefix: `[WARN]`, `WARN:`, `ERROR `, ….
fn plain_level(line: &str) -> Option<LogLevel> {
    let head = line.trim_start();
    let head = head.strip_prefix('[').unwrap_or(head);
    // No allocation: this runs for every plain line.
    let len = head
        .bytes()
        .take_while(u8::is_ascii_alphabetic)
        .take(8)
        .count();
    let (word, rest) = head.split_at(len);
    let delimited = rest.is_empty() || rest.starts_with([']', ':', ' ', '\t']);
    if !delimited || word.len() < 3 {
        return None;
    }
    let is = |name: &str| word.eq_ignore_ascii_case(name);
    if is("TRACE") {
        Some(LogLevel::Trace)
    } else if is("DEBUG") {
        Some(LogLevel::Debug)
    } else if is("INFO") {
        Some(LogLevel::Info)
    } else if is("WARN") || is("WARNING") {
        Some(LogLevel::Warn)
    } else if is("ERROR") || is("ERR") || is("FATAL") {
        Some(LogLevel::Error)
    } else {
        None
    }
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
    fn records_are_written_as_serde_would_read_them() {
        use time::macros::datetime;
        let base = LogRecord {
            seq: 42,
            time: datetime!(2026-11-24 23:41:07.000000001 UTC),
            stream: LogStream::Stderr,
            level: LogLevel::Warn,
            message: "plain".into(),
            plugin_time: None,
            fields: Map::new(),
            pid: 7,
            continued: false,
        };
        let mut fields = Map::new();
        fields.insert("n".into(), Value::from(1));
        fields.insert("s".into(), Value::from("x\"y"));
        let cases = [
            base.clone(),
            LogRecord {
                message: "quote \" backslash \\ newline \n tab \t nul \0 \u{e9}\u{20ac}".into(),
                plugin_time: Some("2026-01-01T00:00:00Z \"".into()),
                fields,
                continued: true,
                stream: LogStream::Supervisor,
                level: LogLevel::Trace,
                ..base.clone()
            },
            LogRecord {
                time: datetime!(0001-01-01 00:00:00 UTC),
                stream: LogStream::Stdout,
                level: LogLevel::Error,
                message: String::new(),
                ..base.clone()
            },
            LogRecord {
                time: datetime!(2026-11-24 23:41:07 +02:00),
                level: LogLevel::Debug,
                ..base.clone()
            },
        ];
        for r in cases {
            let mut fast = Vec::new();
            write_record_json(&r, &mut fast);
            let back: LogRecord = serde_json::from_slice(&fast)
                .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&fast)));
            assert_eq!(back, r);
            assert!(fast.starts_with(b"{\"seq\":"));
            // The same object serde writes, field for field.
            let ours: Value = serde_json::from_slice(&fast).unwrap();
            let serde: Value = serde_json::to_value(&r).unwrap();
            let keys = |v: &Value| v.as_object().unwrap().keys().cloned().collect::<Vec<_>>();
            assert_eq!(keys(&ours), keys(&serde));
        }
    }

    #[test]
    fn records_read_back_fast_exactly_as_serde_reads_them() {
        let base = parse_line("plain line".into());
        let mut fields = Map::new();
        fields.insert("k".into(), Value::from(1));
        let variants = [
            LogRecord {
                seq: 1,
                time: OffsetDateTime::now_utc(),
                ..base.clone()
            },
            LogRecord {
                seq: u64::MAX,
                time: time::macros::datetime!(9999-12-31 23:59:59.999999999 UTC),
                stream: LogStream::Supervisor,
                level: LogLevel::Error,
                plugin_time: Some("2026-01-01T00:00:00Z".into()),
                continued: true,
                pid: u32::MAX,
                ..base.clone()
            },
            LogRecord {
                message: "with \"quotes\" and \\".into(),
                ..base.clone()
            },
            LogRecord {
                message: "caf\u{e9} \u{20ac}".into(),
                ..base.clone()
            },
            LogRecord {
                fields,
                ..base.clone()
            },
            LogRecord {
                message: String::new(),
                level: LogLevel::Trace,
                ..base.clone()
            },
        ];
        for r in variants {
            let mut line = Vec::new();
            write_record_json(&r, &mut line);
            line.push(b'\n');
            let fast = <LogRecord as Sequenced>::read_json(&line).unwrap();
            let serde: LogRecord = serde_json::from_slice(&line).unwrap();
            assert_eq!(fast, serde);
            assert_eq!(fast, r);
        }
        // Lines written by serde itself (older logs) still read.
        let old = br#"{"seq":3,"time":"2026-11-24T23:41:07.92Z","stream":"stderr","level":"info","message":"x","pid":1}"#;
        assert_eq!(<LogRecord as Sequenced>::read_json(old).unwrap().seq, 3);
        assert!(
            read_record_json(old).is_none(),
            "a short fraction takes serde's path"
        );
        assert!(<LogRecord as Sequenced>::read_json(b"{\"seq\":1,garbage").is_err());
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

    #[test]
    fn structured_lines_become_fields_and_bad_types_stay_plain() {
        let r = parse_line(
            r#"{"timestamp":"2026-01-01T00:00:00Z","level":"WARN","message":"disk low","free":12}"#
                .into(),
        );
        assert_eq!((r.level, r.message.as_str()), (LogLevel::Warn, "disk low"));
        assert_eq!(r.plugin_time.as_deref(), Some("2026-01-01T00:00:00Z"));
        assert_eq!(r.fields.get("free"), Some(&Value::from(12)));
        for bad in [
            r#"{"level":5,"message":"x"}"#,
            r#"{"level":"info","message":["x"]}"#,
            r#"{"level":"loud","message":"x"}"#,
        ] {
            let r = parse_line(bad.to_owned());
            assert_eq!(
                (r.level, r.message.as_str()),
                (LogLevel::Info, bad),
                "{bad}"
            );
        }
        assert_eq!(parse_line("[WARN] careful".into()).level, LogLevel::Warn);
        assert_eq!(parse_line("ERROR: broke".into()).level, LogLevel::Error);
        assert_eq!(parse_line("debug detail".into()).level, LogLevel::Debug);
        assert_eq!(parse_line("errors are fine".into()).level, LogLevel::Info);
        assert_eq!(parse_line("plain text".into()).level, LogLevel::Info);
        let deep = format!(
            "{{\"message\":\"m\",\"a\":{}{}}}",
            "[".repeat(120),
            "]".repeat(120)
        );
        let r = parse_line(deep.clone());
        assert_eq!(r.message, deep, "too deep to store as fields: kept as text");
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
