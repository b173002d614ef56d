//! Telemetry for the operator's own stack: Prometheus metrics (`metrics.rs`), read from the
//! supervisor, the plugins' logs and storage at each scrape, plus what the control plane
//! counts as it serves (forwarded requests by gRPC code and latency, log gaps sent, open
//! subscriptions and their lag).
//!
//! OpenTelemetry export (`otlp.rs`, opt-in): plugin logs and lifecycle events as OTLP
//! logs, a span per forwarded request (`trace.rs`) continuing the caller's W3C trace into
//! the plugin, and the metrics above as OTLP metrics (`openmetrics.rs` reads them back from
//! their text).
//!
//! This layer sits beside `api/`: it reads the supervisor and the stores, and the control
//! plane records into it. It knows no gRPC types (codes arrive as numbers) and serves
//! nothing itself: `api/metrics.rs` is the HTTP endpoint.

pub mod export;
pub mod metrics;
pub mod openmetrics;
pub mod otlp;
pub mod trace;
