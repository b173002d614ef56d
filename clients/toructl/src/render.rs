//! How answers are shown: aligned tables and `key: value` lines for people, JSON objects
//! (snake_case field names as in the proto files, enums as lower-case names, times as RFC
//! 3339) for scripts. Knows nothing of connections.
//!
//! Every string in human-readable output goes through [`escape`] (or [`escape_text`] for a
//! call's body), since plugins write most of them: no control character reaches the
//! terminal raw, so nothing a plugin prints can move the cursor, clear the screen, retitle
//! the window or forge a line. JSON output is exact (JSON escapes control characters itself).

use prost_types::Timestamp;
use serde_json::{json, Map, Value};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;
use torud_api::pb;
pub use torud_api::text::{escape, escape_text};

fn datetime(ts: Option<&Timestamp>) -> Option<OffsetDateTime> {
    let t = ts?;
    OffsetDateTime::from_unix_timestamp_nanos(t.seconds as i128 * 1_000_000_000 + t.nanos as i128)
        .ok()
}

/// An RFC 3339 UTC time with full precision, or "" when unset.
pub fn time(ts: Option<&Timestamp>) -> String {
    datetime(ts)
        .and_then(|t| t.format(&Rfc3339).ok())
        .unwrap_or_default()
}

/// An RFC 3339 UTC time to the millisecond (for tables), or "" when unset.
pub fn time_ms(ts: Option<&Timestamp>) -> String {
    let format = time::macros::format_description!(
        "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z"
    );
    datetime(ts)
        .and_then(|t| t.format(&format).ok())
        .unwrap_or_default()
}

fn time_json(ts: Option<&Timestamp>) -> Value {
    match time(ts) {
        s if s.is_empty() => Value::Null,
        s => Value::String(s),
    }
}

/// A plugin state's short name ("running").
pub fn state(s: i32) -> String {
    pb::PluginState::try_from(s).map_or_else(
        |_| format!("unknown({s})"),
        |s| short(s.as_str_name(), "PLUGIN_STATE_"),
    )
}

fn event_kind(k: i32) -> String {
    pb::EventKind::try_from(k).map_or_else(
        |_| format!("unknown({k})"),
        |k| short(k.as_str_name(), "EVENT_KIND_"),
    )
}

/// A log level's short name ("warn").
pub fn level(l: i32) -> String {
    pb::LogLevel::try_from(l).map_or_else(
        |_| format!("unknown({l})"),
        |l| short(l.as_str_name(), "LOG_LEVEL_"),
    )
}

fn stream(s: i32) -> String {
    pb::LogStream::try_from(s).map_or_else(
        |_| format!("unknown({s})"),
        |s| short(s.as_str_name(), "LOG_STREAM_"),
    )
}

fn short(name: &str, prefix: &str) -> String {
    name.strip_prefix(prefix)
        .unwrap_or(name)
        .to_ascii_lowercase()
}

/// Rows under headers, columns padded to their widest cell; the last column is not padded.
/// Cells are escaped (see [`escape`]).
pub fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let rows: Vec<Vec<String>> = rows
        .iter()
        .map(|row| row.iter().map(|cell| escape(cell).into_owned()).collect())
        .collect();
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let mut out = String::new();
        for (i, cell) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                out.push_str(cell);
            } else {
                out.push_str(&format!("{cell:<w$}  ", w = widths[i]));
            }
        }
        out.trim_end().to_owned() + "\n"
    };
    let mut out = line(headers.to_vec());
    for row in &rows {
        out.push_str(&line(row.iter().map(String::as_str).collect()));
    }
    out
}

fn exit_text(e: &pb::ExitInfo) -> String {
    match e.status {
        Some(pb::exit_info::Status::Code(c)) => format!("exit code {c}"),
        Some(pb::exit_info::Status::Signal(s)) => format!("signal {s}"),
        None => String::new(),
    }
}

fn exit_json(e: Option<&pb::ExitInfo>) -> Value {
    let Some(e) = e else { return Value::Null };
    let mut m = Map::new();
    match e.status {
        Some(pb::exit_info::Status::Code(c)) => {
            m.insert("code".into(), c.into());
        }
        Some(pb::exit_info::Status::Signal(s)) => {
            m.insert("signal".into(), s.into());
        }
        None => {}
    }
    m.insert("time".into(), time_json(e.time.as_ref()));
    m.insert("stderr_tail".into(), json!(e.stderr_tail));
    Value::Object(m)
}

/// The plugins table of `plugins list`.
pub fn plugins_table(plugins: &[pb::Plugin]) -> String {
    let rows: Vec<Vec<String>> = plugins
        .iter()
        .map(|p| {
            vec![
                p.id.clone(),
                state(p.state),
                yes_no(p.enabled),
                yes_no(p.healthy),
                if p.pid == 0 {
                    "-".into()
                } else {
                    p.pid.to_string()
                },
                p.version.clone(),
                p.restart_count.to_string(),
                p.last_error.clone(),
            ]
        })
        .collect();
    table(
        &[
            "ID",
            "STATE",
            "ENABLED",
            "HEALTHY",
            "PID",
            "VERSION",
            "RESTARTS",
            "LAST ERROR",
        ],
        &rows,
    )
}

fn yes_no(b: bool) -> String {
    if b { "yes" } else { "no" }.into()
}

/// One plugin as `key: value` lines.
pub fn plugin_details(p: &pb::Plugin) -> String {
    let mut rows = vec![
        ("id", p.id.clone()),
        ("name", p.name.clone()),
        ("version", p.version.clone()),
        ("author", p.author.clone()),
        ("description", p.description.clone()),
        ("route", p.route.clone()),
        ("binary", p.binary_path.clone()),
        ("protocol", p.protocol_version.to_string()),
        ("enabled", yes_no(p.enabled)),
        ("state", state(p.state)),
        ("healthy", yes_no(p.healthy)),
        (
            "pid",
            if p.pid == 0 {
                "-".into()
            } else {
                p.pid.to_string()
            },
        ),
        ("started", time_ms(p.started_at.as_ref())),
        ("restarts", p.restart_count.to_string()),
        ("failures in a row", p.consecutive_failures.to_string()),
        ("next restart", time_ms(p.next_restart_at.as_ref())),
        (
            "last exit",
            p.last_exit.as_ref().map(exit_text).unwrap_or_default(),
        ),
        ("last error", p.last_error.clone()),
    ];
    rows.retain(|(_, v)| !v.is_empty());
    let width = rows.iter().map(|(k, _)| k.len() + 1).max().unwrap_or(0);
    let mut out: String = rows
        .iter()
        .map(|(k, v)| format!("{:<width$}  {}\n", format!("{k}:"), escape(v)))
        .collect();
    if let Some(e) = &p.last_exit {
        for line in &e.stderr_tail {
            out.push_str(&format!("  stderr| {}\n", escape(line)));
        }
    }
    out
}

/// A plugin as JSON.
pub fn plugin_json(p: &pb::Plugin) -> Value {
    json!({
        "id": p.id, "name": p.name, "version": p.version, "author": p.author,
        "description": p.description, "icon": p.icon, "route": p.route,
        "binary_path": p.binary_path, "enabled": p.enabled, "state": state(p.state),
        "healthy": p.healthy, "pid": p.pid, "started_at": time_json(p.started_at.as_ref()),
        "restart_count": p.restart_count, "consecutive_failures": p.consecutive_failures,
        "next_restart_at": time_json(p.next_restart_at.as_ref()),
        "last_exit": exit_json(p.last_exit.as_ref()), "last_error": p.last_error,
        "protocol_version": p.protocol_version,
    })
}

/// A skipped file as JSON.
pub fn skipped_json(s: &pb::SkippedPlugin) -> Value {
    json!({ "path": s.path, "reason": s.reason })
}

/// One event as a line: seq, time, plugin, kind, transition and reason.
pub fn event_line(e: &pb::Event) -> String {
    let what = if e.kind == pb::EventKind::StateChanged as i32 {
        format!("{} -> {}", state(e.from_state), state(e.to_state))
    } else {
        event_kind(e.kind)
    };
    let mut line = format!(
        "{:>6}  {}  {:<12}  {}",
        e.seq,
        time_ms(e.time.as_ref()),
        if e.plugin_id.is_empty() {
            "-".into()
        } else {
            escape(&e.plugin_id)
        },
        what
    );
    if !e.reason.is_empty() {
        line.push_str(&format!("  ({})", escape(&e.reason)));
    }
    line
}

/// An event as JSON.
pub fn event_json(e: &pb::Event) -> Value {
    let details: Map<String, Value> = e
        .details
        .iter()
        .map(|(k, v)| (k.clone(), Value::String(v.clone())))
        .collect();
    json!({
        "seq": e.seq, "plugin_id": e.plugin_id, "time": time_json(e.time.as_ref()),
        "kind": event_kind(e.kind), "from_state": state(e.from_state),
        "to_state": state(e.to_state), "reason": e.reason, "details": details,
        "exit": exit_json(e.exit.as_ref()),
        "next_restart_at": time_json(e.next_restart_at.as_ref()), "healthy": e.healthy,
    })
}

/// One log record as a line: time, plugin, level, message and its structured fields.
pub fn log_line(r: &pb::LogRecord) -> String {
    let mut line = format!(
        "{}  {}  {:<5}  {}",
        time_ms(r.time.as_ref()),
        escape(&r.plugin_id),
        level(r.level).to_ascii_uppercase(),
        escape(&r.message)
    );
    if !r.fields_json.is_empty() && r.fields_json != "{}" {
        line.push_str("  ");
        line.push_str(&escape(&r.fields_json));
    }
    line
}

/// A log record as JSON (its `cursor` resumes after it with `logs --after`).
pub fn log_json(r: &pb::LogRecord) -> Value {
    let fields: Value = if r.fields_json.is_empty() {
        Value::Object(Map::new())
    } else {
        serde_json::from_str(&r.fields_json).unwrap_or(Value::String(r.fields_json.clone()))
    };
    json!({
        "plugin_id": r.plugin_id, "seq": r.seq, "time": time_json(r.time.as_ref()),
        "plugin_time": r.plugin_time, "stream": stream(r.stream), "level": level(r.level),
        "message": r.message, "fields": fields, "pid": r.pid, "continued": r.continued,
        "cursor": r.cursor,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_align_columns() {
        let t = table(&["ID", "STATE"], &[vec!["hello".into(), "running".into()]]);
        assert_eq!(t, "ID     STATE\nhello  running\n");
    }

    #[test]
    fn table_cells_are_escaped() {
        let t = table(&["ID"], &[vec!["x\ny".into()]]);
        assert_eq!(t, "ID\nx\\ny\n");
    }

    #[test]
    fn enums_have_short_names() {
        assert_eq!(state(pb::PluginState::Running as i32), "running");
        assert_eq!(level(pb::LogLevel::Warn as i32), "warn");
        assert_eq!(state(99), "unknown(99)");
    }

    #[test]
    fn times_are_rfc3339() {
        let ts = Timestamp {
            seconds: 0,
            nanos: 500_000_000,
        };
        assert_eq!(time(Some(&ts)), "1970-01-01T00:00:00.5Z");
        assert_eq!(time_ms(Some(&ts)), "1970-01-01T00:00:00.500Z");
        assert_eq!(time(None), "");
    }
}
