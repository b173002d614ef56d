//! What the OTLP export sent and lost, by signal: counted by the exporter (`otlp.rs`) and
//! the tracer (`trace.rs`), shown by the metrics (`metrics.rs`). A leaf, so that the metrics
//! and the exporter, which reads the metrics, do not import each other.

use std::sync::atomic::{AtomicU64, Ordering};

/// What is exported, as the `signal` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    /// Plugin log records and lifecycle events.
    Logs,
    /// Spans of forwarded requests.
    Traces,
    /// Data points of the daemon's metrics.
    Metrics,
}

impl Signal {
    /// Every signal, in label order.
    pub const ALL: [Signal; 3] = [Signal::Logs, Signal::Traces, Signal::Metrics];

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Signal::Logs => "logs",
            Signal::Traces => "traces",
            Signal::Metrics => "metrics",
        }
    }
}

/// Items exported and dropped, by signal.
#[derive(Debug, Default)]
pub struct ExportStats {
    exported: [AtomicU64; Signal::ALL.len()],
    dropped: [AtomicU64; Signal::ALL.len()],
}

impl ExportStats {
    /// Counts `n` items the receiver took.
    pub fn exported(&self, signal: Signal, n: u64) {
        self.exported[signal as usize].fetch_add(n, Ordering::Relaxed);
    }

    /// Counts `n` items lost to export.
    pub fn dropped(&self, signal: Signal, n: u64) {
        self.dropped[signal as usize].fetch_add(n, Ordering::Relaxed);
    }

    /// Items of `signal` the receiver took so far.
    pub fn exported_count(&self, signal: Signal) -> u64 {
        self.exported[signal as usize].load(Ordering::Relaxed)
    }

    /// Items of `signal` lost so far.
    pub fn dropped_count(&self, signal: Signal) -> u64 {
        self.dropped[signal as usize].load(Ordering::Relaxed)
    }
}
