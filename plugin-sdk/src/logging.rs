//! Structured logging for plugins: a `tracing` layer that writes each event to stderr as
//! one JSON line (`timestamp`, `level`, `message`, `target`, and the event's fields), the
//! shape the daemon parses into levels and fields. An event logged while a traced request
//! is handled also carries that request's `trace_id` and `span_id` ([`crate::trace`]).
//!
//! [`crate::serve`] installs it; call [`init`] yourself only when not using `serve`.
//! The level filter comes from `TORU_LOG` (an `EnvFilter` directive, default `info`).

use std::io::Write;

use serde_json::{Map, Value};
use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_subscriber::layer::{Context, SubscriberExt};
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

/// Writes events as JSON lines to stderr.
#[derive(Debug, Default, Clone, Copy)]
pub struct JsonLayer;

/// Installs [`JsonLayer`] as the global subscriber; does nothing if one is already set.
pub fn init() {
    let filter = std::env::var("TORU_LOG")
        .ok()
        .and_then(|f| EnvFilter::try_new(f).ok())
        .unwrap_or_else(|| EnvFilter::new("info"));
    let _ = tracing_subscriber::registry()
        .with(filter)
        .with(JsonLayer)
        .try_init();
}

/// The JSON line for one event (without the newline).
pub fn record(level: &tracing::Level, target: &str, fields: Map<String, Value>) -> String {
    let mut line = Map::new();
    line.insert("timestamp".into(), crate::wire::now_rfc3339().into());
    line.insert("level".into(), level.as_str().to_ascii_lowercase().into());
    line.insert("target".into(), target.into());
    for (k, v) in fields {
        line.insert(k, v);
    }
    line.entry("message")
        .or_insert(Value::String(String::new()));
    Value::Object(line).to_string()
}

struct Fields(Map<String, Value>);

impl Visit for Fields {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(field.name().into(), value.into());
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.0.insert(field.name().into(), value.into());
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.0.insert(field.name().into(), value.into());
    }
    fn record_bool(&mut self, field: &Field, value: bool) {
        self.0.insert(field.name().into(), value.into());
    }
    fn record_f64(&mut self, field: &Field, value: f64) {
        self.0.insert(field.name().into(), value.into());
    }
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.0
            .insert(field.name().into(), format!("{value:?}").into());
    }
}

/// Adds the request's `trace_id` and `span_id` to a line's fields (an event's own fields of
/// those names win).
fn with_trace(fields: &mut Map<String, Value>, trace: Option<crate::trace::TraceParent>) {
    if let Some(trace) = trace {
        fields.entry("trace_id").or_insert(trace.trace_id.into());
        fields.entry("span_id").or_insert(trace.span_id.into());
    }
}

impl<S: Subscriber> Layer<S> for JsonLayer {
    fn on_event(&self, event: &Event<'_>, _ctx: Context<'_, S>) {
        let mut fields = Fields(Map::new());
        event.record(&mut fields);
        with_trace(&mut fields.0, crate::trace::current());
        let meta = event.metadata();
        let mut line = record(meta.level(), meta.target(), fields.0);
        line.push('\n');
        // One write per line, so lines from several threads never interleave.
        let _ = std::io::stderr().lock().write_all(line.as_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_is_one_json_object_with_level_message_and_fields() {
        let mut fields = Map::new();
        fields.insert("message".into(), "hello".into());
        fields.insert("user".into(), 7.into());
        let line = record(&tracing::Level::WARN, "my_plugin", fields);
        assert!(!line.contains('\n'));
        let v: Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["level"], "warn");
        assert_eq!(v["message"], "hello");
        assert_eq!(v["user"], 7);
        assert_eq!(v["target"], "my_plugin");
        assert!(v["timestamp"].as_str().unwrap().ends_with('Z'));
    }

    #[test]
    fn a_line_logged_under_a_trace_carries_its_ids() {
        let trace = crate::trace::TraceParent::parse(
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        );
        let mut fields = Map::new();
        with_trace(&mut fields, trace);
        assert_eq!(fields["trace_id"], "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(fields["span_id"], "00f067aa0ba902b7");
        let mut untraced = Map::new();
        with_trace(&mut untraced, None);
        assert!(untraced.is_empty());
    }
}
