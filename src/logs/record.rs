//! The record codec of plugin logs: how one line of a plugin's output becomes a
//! [`LogRecord`] (`parse_line`), and how records are written to and read back from a log
//! file's JSON lines (the [`Sequenced`] impl of [`LogRecord`]).
//!
//! A line that is a JSON object with a string `message` (and, if present, a string `level`
//! of trace/debug/info/warn/error in any case) is a structured record: its `timestamp` is
//! kept as the plugin's time and its other keys as fields. Any other line — plain text, or
//! JSON whose `level` or `message` has the wrong type — is kept whole as a message, at level
//! info unless it starts with a recognised prefix (`[WARN]`, `ERROR:`, …).
//!
//! Records are written as the JSON serde would write them, without serde's per-field
//! overhead, and the usual record is read back the same way; anything else takes serde's
//! path, so the fast paths are never more than a faster way to the same result.
//! This module knows nothing of pipes, processes or where records are stored.

use serde_json::{Map, Value};
use time::OffsetDateTime;

use crate::logs::seqlog::Sequenced;
use crate::model::{LogLevel, LogRecord, LogStream};

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

/// A record (seq, time, stream, pid unset) from one line of output.
pub(crate) fn parse_line(line: String) -> LogRecord {
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
}
