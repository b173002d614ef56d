//! Spans of forwarded requests: each `CallPlugin` and KV operation is a span of the
//! daemon's, continuing the caller's W3C trace (its `traceparent` metadata) or starting one,
//! and the context handed to a protocol-2 plugin is this span's, so the plugin's own log
//! records name the daemon's span as their parent.
//!
//! A [`Tracer`] is cheap to clone. Without an OTLP endpoint it records nothing and passes
//! the caller's context on unchanged; with one, finished spans go to the exporter
//! (`otlp.rs`) through a bounded queue that a call never waits on: a span that does not fit
//! is counted as dropped.

use std::sync::Arc;
use std::time::SystemTime;

use tokio::sync::mpsc;
use toru_plugin_sdk::trace::TraceParent;

use super::export::{ExportStats, Signal};

/// A finished span, as the exporter takes it.
#[derive(Debug, Clone)]
pub struct SpanData {
    /// The trace it belongs to.
    pub trace_id: [u8; 16],
    /// Its own id.
    pub span_id: [u8; 8],
    /// The caller's span, when the caller sent one.
    pub parent_span_id: Option<[u8; 8]>,
    /// What was forwarded: `torud.CallPlugin`, `torud.KvService/GetValue`, ….
    pub name: &'static str,
    /// The plugin it went to.
    pub plugin: String,
    /// When it began and ended.
    pub start: SystemTime,
    /// When it ended.
    pub end: SystemTime,
    /// The gRPC code it ended with (0: OK).
    pub code: i32,
}

/// Starts spans and hands finished ones to the exporter. Clones share the queue.
#[derive(Debug, Clone)]
pub struct Tracer {
    sink: Option<(mpsc::Sender<SpanData>, Arc<ExportStats>)>,
}

impl Tracer {
    /// A tracer that exports nothing: spans only pass the caller's context on.
    pub fn off() -> Self {
        Tracer { sink: None }
    }

    /// A tracer whose finished spans go to `queue`, counted in `stats`.
    pub(super) fn exporting(queue: mpsc::Sender<SpanData>, stats: Arc<ExportStats>) -> Self {
        Tracer {
            sink: Some((queue, stats)),
        }
    }

    /// Starts the span of a request named `name` to plugin `plugin`, as a child of the
    /// caller's `caller` context if it sent one.
    pub fn start(&self, name: &'static str, plugin: &str, caller: Option<TraceParent>) -> CallSpan {
        let Some((queue, stats)) = &self.sink else {
            return CallSpan { caller, own: None };
        };
        let parsed = caller.as_ref().and_then(|c| {
            Some((
                hex_array::<16>(&c.trace_id)?,
                hex_array::<8>(&c.span_id)?,
                c.flags,
            ))
        });
        let (trace_id, parent_span_id, flags) = match parsed {
            Some((trace, parent, flags)) => (trace, Some(parent), flags),
            // No caller's trace: this span starts one, sampled.
            None => (random_id::<16>(), None, 1),
        };
        let span_id = random_id::<8>();
        let context = TraceParent {
            trace_id: hex::encode(trace_id),
            span_id: hex::encode(span_id),
            flags,
        };
        // An unsampled trace passes through with the daemon's span in it, but is not
        // exported (the caller decided it is not recorded).
        let record = context.sampled().then(|| PendingSpan {
            queue: queue.clone(),
            stats: stats.clone(),
            data: SpanData {
                trace_id,
                span_id,
                parent_span_id,
                name,
                plugin: plugin.to_owned(),
                start: SystemTime::now(),
                end: SystemTime::UNIX_EPOCH,
                code: 0,
            },
        });
        CallSpan {
            caller: Some(context),
            own: record,
        }
    }
}

/// A span in progress. Dropped without [`CallSpan::end`] (the caller went away), it is not
/// exported.
#[derive(Debug)]
pub struct CallSpan {
    /// The context to hand the plugin: the daemon's span when traces are exported, the
    /// caller's otherwise.
    caller: Option<TraceParent>,
    own: Option<PendingSpan>,
}

#[derive(Debug)]
struct PendingSpan {
    queue: mpsc::Sender<SpanData>,
    stats: Arc<ExportStats>,
    data: SpanData,
}

impl CallSpan {
    /// The trace context to pass the plugin.
    pub fn context(&self) -> Option<&TraceParent> {
        self.caller.as_ref()
    }

    /// Ends the span with gRPC code `code` and queues it for export; if the queue is full
    /// the span is counted as dropped, never waited for.
    pub fn end(self, code: i32) {
        let Some(mut pending) = self.own else {
            return;
        };
        pending.data.end = SystemTime::now();
        pending.data.code = code;
        if pending.queue.try_send(pending.data).is_err() {
            pending.stats.dropped(Signal::Traces, 1);
        }
    }
}

fn hex_array<const N: usize>(text: &str) -> Option<[u8; N]> {
    let mut out = [0; N];
    hex::decode_to_slice(text, &mut out).ok()?;
    Some(out)
}

/// A random id that is not all zeros (which W3C reserves as invalid).
fn random_id<const N: usize>() -> [u8; N] {
    let mut id = [0; N];
    while id.iter().all(|&b| b == 0) {
        getrandom::fill(&mut id).expect("the OS random source is available");
    }
    id
}

#[cfg(test)]
mod tests {
    use super::*;

    const CALLER: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    fn tracer() -> (Tracer, mpsc::Receiver<SpanData>, Arc<ExportStats>) {
        let (tx, rx) = mpsc::channel(1);
        let stats = Arc::new(ExportStats::default());
        (Tracer::exporting(tx, stats.clone()), rx, stats)
    }

    #[test]
    fn without_export_the_callers_context_passes_unchanged() {
        let caller = TraceParent::parse(CALLER);
        let span = Tracer::off().start("torud.CallPlugin", "p", caller.clone());
        assert_eq!(span.context(), caller.as_ref());
        assert_eq!(Tracer::off().start("n", "p", None).context(), None);
    }

    #[test]
    fn a_span_continues_the_callers_trace_as_its_child() {
        let (tracer, mut rx, _) = tracer();
        let span = tracer.start("torud.CallPlugin", "hello", TraceParent::parse(CALLER));
        let context = span.context().unwrap().clone();
        assert_eq!(context.trace_id, "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_ne!(context.span_id, "00f067aa0ba902b7", "the daemon's own span");
        span.end(5);
        let data = rx.try_recv().unwrap();
        assert_eq!(hex::encode(data.trace_id), context.trace_id);
        assert_eq!(hex::encode(data.span_id), context.span_id);
        assert_eq!(
            data.parent_span_id.map(hex::encode).as_deref(),
            Some("00f067aa0ba902b7")
        );
        assert_eq!(
            (data.name, data.plugin.as_str(), data.code),
            ("torud.CallPlugin", "hello", 5)
        );
        assert!(data.end >= data.start);
    }

    #[test]
    fn without_a_caller_a_span_starts_a_sampled_trace() {
        let (tracer, mut rx, _) = tracer();
        let span = tracer.start("torud.CallPlugin", "hello", None);
        let context = span.context().unwrap().clone();
        assert!(context.sampled());
        span.end(0);
        assert_eq!(rx.try_recv().unwrap().parent_span_id, None);
    }

    #[test]
    fn an_unsampled_trace_is_passed_on_but_not_exported() {
        let (tracer, mut rx, _) = tracer();
        let caller = TraceParent::parse(&CALLER.replace("-01", "-00"));
        let span = tracer.start("torud.CallPlugin", "hello", caller);
        assert!(!span.context().unwrap().sampled());
        span.end(0);
        assert!(rx.try_recv().is_err());
    }

    #[test]
    fn a_full_queue_counts_the_span_as_dropped() {
        let (tracer, _rx, stats) = tracer();
        tracer.start("a", "p", None).end(0);
        tracer.start("b", "p", None).end(0);
        assert_eq!(stats.dropped_count(Signal::Traces), 1);
    }
}
