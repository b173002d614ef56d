//! OpenTelemetry export (OTLP over gRPC, opt-in with `--otlp-endpoint`): every plugin's log
//! records and the lifecycle events as OTLP logs, the spans of forwarded requests
//! ([`super::trace`]) as OTLP traces, and the daemon's metrics ([`super::openmetrics`]) as
//! OTLP metrics every `--otlp-metrics-interval`.
//!
//! The local store stays the source of truth; export reads it and never holds it up:
//! - logs are read by a [`Follower`] per plugin log (and one
//!   on the event log), exactly as a `StreamLogs` subscriber reads them. A follower that
//!   cannot hand a record on waits, and catches up from the files later: capture never
//!   waits for the collector, and records that rotate out of the log before they were read
//!   are counted as dropped;
//! - spans come from calls through a bounded queue a call never waits on (a span that does
//!   not fit is counted as dropped);
//! - batches of up to [`BATCH`] items are sent; a batch the receiver does not take is tried
//!   again with backoff for [`RETRY_FOR`], then dropped and counted. The first failure of an
//!   outage, and the recovery, are logged once each; the counts are in the metrics
//!   (`torud_otlp_exported_total`, `torud_otlp_dropped_total`).
//!
//! Why the OTLP protobuf types (`opentelemetry-proto`, the OpenTelemetry project's own)
//! rather than the `opentelemetry` SDK's providers: the SDK ties one resource to a provider,
//! and each plugin is its own resource (`service.name` = its id), so it would take a
//! provider, with its own batch thread, per plugin; here one batch carries every plugin's
//! records, each under its resource.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use opentelemetry_proto::tonic::collector::logs::v1::logs_service_client::LogsServiceClient;
use opentelemetry_proto::tonic::collector::logs::v1::ExportLogsServiceRequest;
use opentelemetry_proto::tonic::collector::metrics::v1::metrics_service_client::MetricsServiceClient;
use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_client::TraceServiceClient;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::{
    any_value, AnyValue, ArrayValue, InstrumentationScope, KeyValue, KeyValueList,
};
use opentelemetry_proto::tonic::logs::v1::{LogRecord as OtlpLog, ResourceLogs, ScopeLogs};
use opentelemetry_proto::tonic::metrics::v1::{Metric, ResourceMetrics, ScopeMetrics};
use opentelemetry_proto::tonic::resource::v1::Resource;
use opentelemetry_proto::tonic::trace::v1::{
    span, status, ResourceSpans, ScopeSpans, Span, Status,
};
use serde_json::Value;
use time::OffsetDateTime;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::metadata::{MetadataKey, MetadataMap, MetadataValue};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};

use super::export::{ExportStats, Signal};
use super::trace::{SpanData, Tracer};
use crate::config::{Config, OtlpConfig};
use crate::logs::capture::PluginLog;
use crate::logs::seqlog::{Follower, SeqLogError, Sequenced};
use crate::model::{Event, EventKind, LogLevel, LogRecord, LogStream};
use crate::supervisor::Supervisor;
use crate::telemetry::metrics::Metrics;

/// Most log records or spans in one export request.
pub const BATCH: usize = 512;
/// How long a batch waits for more items once it has one.
const LINGER: Duration = Duration::from_millis(200);
/// How long a batch the receiver does not take is tried again before it is dropped.
pub const RETRY_FOR: Duration = Duration::from_secs(30);
/// The first wait between tries, doubled each time up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(200);
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// Log records waiting for a batch (beyond them, followers wait and read from the files).
const LOG_QUEUE: usize = 4 * BATCH;
/// Finished spans waiting for a batch; a span that does not fit is dropped and counted.
const SPAN_QUEUE: usize = 8 * BATCH;
/// How long shutdown gives the exporter to send what it holds.
pub const FLUSH_FOR: Duration = Duration::from_secs(3);

/// Why the exporter could not start.
#[derive(Debug, thiserror::Error)]
pub enum OtlpError {
    /// The endpoint or TLS settings were refused.
    #[error("otlp-endpoint {endpoint}: {reason}")]
    Endpoint {
        /// The endpoint.
        endpoint: String,
        /// Why.
        reason: String,
    },
    /// The CA file could not be read.
    #[error("otlp-ca {path}: {source}")]
    Ca {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
}

/// The running export: its tracer for the control plane, and its tasks.
#[derive(Debug)]
pub struct Exporter {
    tracer: Tracer,
    /// How the followers of the logs end.
    ends: Ends,
    /// The followers of the logs (ended first, once they have read what was captured).
    followers: TaskTracker,
    /// The batching and sending tasks (ended by `ends.stop`, after sending what they hold).
    tasks: TaskTracker,
}

/// How reading a log for export ends: at once when `stop` is cancelled; when `drain` is,
/// once everything captured until then has been read.
#[derive(Debug, Clone, Default)]
struct Ends {
    drain: CancellationToken,
    stop: CancellationToken,
}

impl Ends {
    /// The same drain, with `stop` a child of this one's (cancelled with it or alone).
    fn child(&self) -> Ends {
        Ends {
            drain: self.drain.clone(),
            stop: self.stop.child_token(),
        }
    }

    /// `follower`'s next record while the export lasts; `None` once it ends. `until` keeps,
    /// once draining began, the newest seq (`newest()` then) still to be read.
    async fn next<T: Sequenced>(
        &self,
        follower: &mut Follower<T>,
        until: &mut Option<u64>,
        newest: impl Fn() -> u64,
    ) -> Option<Result<Arc<T>, SeqLogError>> {
        loop {
            if until.is_some_and(|last| follower.cursor() >= last) {
                return None;
            }
            tokio::select! {
                _ = self.stop.cancelled() => return None,
                _ = self.drain.cancelled(), if until.is_none() => *until = Some(newest()),
                next = follower.next() => return next,
            }
        }
    }
}

/// A log record on its way, with the resource it belongs to ("" for the daemon's own).
type Queued = (Arc<str>, OtlpLog);

/// The receiver checked and ready to be connected to, before anything starts (so that a bad
/// setting stops the daemon before it starts a plugin).
pub struct Prepared(Option<(Target, Duration)>);

impl Exporter {
    /// Checks `config`'s OTLP receiver settings (none: nothing will be exported).
    pub fn prepare(config: &Config) -> Result<Prepared, OtlpError> {
        Ok(Prepared(match &config.otlp {
            Some(otlp) => Some((Target::new(otlp)?, config.otlp_metrics_interval)),
            None => None,
        }))
    }

    /// Starts exporting what `supervisor`'s plugins log, what calls trace and `metrics`,
    /// counting in `metrics`' export figures.
    pub fn start(prepared: Prepared, supervisor: &Supervisor, metrics: &Metrics) -> Exporter {
        let stats = metrics.export_stats();
        let ends = Ends::default();
        let stop = ends.stop.clone();
        let (followers, tasks) = (TaskTracker::new(), TaskTracker::new());
        let Some((target, metrics_every)) = prepared.0 else {
            return Exporter {
                tracer: Tracer::off(),
                ends,
                followers,
                tasks,
            };
        };
        tracing::info!(
            endpoint = %target.endpoint,
            "exporting logs, events, spans and metrics over OTLP"
        );
        let resources = Resources {
            supervisor: supervisor.clone(),
            host: host_name(),
        };

        let (spans_tx, spans_rx) = mpsc::channel(SPAN_QUEUE);
        let client = TraceServiceClient::new(target.channel.clone());
        let traces = Sink {
            signal: Signal::Traces,
            request: spans_request,
            send: move |request| {
                let mut client = client.clone();
                async move {
                    let answer = client.export(request).await?.into_inner();
                    Ok(answer
                        .partial_success
                        .map_or(0, |p| p.rejected_spans.max(0) as u64))
                }
            },
        };
        tasks.spawn(export_batches(
            spans_rx,
            traces,
            target.clone(),
            resources.clone(),
            stats.clone(),
            stop.clone(),
        ));
        tasks.spawn(export_metrics(
            metrics.clone(),
            metrics_every,
            target.clone(),
            resources.clone(),
            stats.clone(),
            stop.clone(),
        ));
        let (logs_tx, logs_rx) = mpsc::channel(LOG_QUEUE);
        let client = LogsServiceClient::new(target.channel.clone());
        let logs = Sink {
            signal: Signal::Logs,
            request: logs_request,
            send: move |request| {
                let mut client = client.clone();
                async move {
                    let answer = client.export(request).await?.into_inner();
                    Ok(answer
                        .partial_success
                        .map_or(0, |p| p.rejected_log_records.max(0) as u64))
                }
            },
        };
        tasks.spawn(export_batches(
            logs_rx,
            logs,
            target,
            resources,
            stats.clone(),
            stop.clone(),
        ));
        followers.spawn(follow_everything(
            supervisor.clone(),
            logs_tx,
            stats.clone(),
            ends.clone(),
            followers.clone(),
        ));
        Exporter {
            tracer: Tracer::exporting(spans_tx, stats),
            ends,
            followers,
            tasks,
        }
    }

    /// The tracer whose spans this exports.
    pub fn tracer(&self) -> Tracer {
        self.tracer.clone()
    }

    /// Reads what the logs captured until now (the plugins' last lines, the last events),
    /// then sends what is queued: each for at most [`FLUSH_FOR`]. Call it after the plugins
    /// have stopped.
    pub async fn finish(self) {
        self.ends.drain.cancel();
        self.followers.close();
        if tokio::time::timeout(FLUSH_FOR, self.followers.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                "OTLP export: not every record captured before shutdown was read within \
                 {FLUSH_FOR:?}; the local logs have them all"
            );
        }
        self.ends.stop.cancel();
        self.tasks.close();
        drop(self.tracer);
        if tokio::time::timeout(FLUSH_FOR, self.tasks.wait())
            .await
            .is_err()
        {
            tracing::warn!("OTLP export did not finish sending within {FLUSH_FOR:?}");
        }
    }
}

/// The receiver, and what every request carries.
#[derive(Clone)]
struct Target {
    endpoint: String,
    channel: Channel,
    headers: MetadataMap,
}

impl Target {
    fn new(config: &OtlpConfig) -> Result<Target, OtlpError> {
        let refused = |reason: String| OtlpError::Endpoint {
            endpoint: config.endpoint.clone(),
            reason,
        };
        let mut endpoint = Endpoint::from_shared(config.endpoint.clone())
            .map_err(|e| refused(e.to_string()))?
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(10));
        if config.endpoint.starts_with("https://") {
            let tls = match &config.ca {
                Some(path) => {
                    let pem = std::fs::read(path).map_err(|source| OtlpError::Ca {
                        path: path.display().to_string(),
                        source,
                    })?;
                    ClientTlsConfig::new().ca_certificate(Certificate::from_pem(pem))
                }
                None => ClientTlsConfig::new().with_native_roots(),
            };
            endpoint = endpoint
                .tls_config(tls)
                .map_err(|e| refused(e.to_string()))?;
        }
        let mut headers = MetadataMap::new();
        for header in &config.headers {
            let key = MetadataKey::from_bytes(header.name.as_bytes())
                .map_err(|e| refused(format!("header {}: {e}", header.name)))?;
            let value = MetadataValue::try_from(header.value.expose())
                .map_err(|e| refused(format!("header {}: {e}", header.name)))?;
            headers.insert(key, value);
        }
        Ok(Target {
            endpoint: config.endpoint.clone(),
            channel: endpoint.connect_lazy(),
            headers,
        })
    }

    fn request<T>(&self, body: T) -> tonic::Request<T> {
        let mut request = tonic::Request::new(body);
        *request.metadata_mut() = self.headers.clone();
        request
    }
}

/// The resource attributes of each source: a plugin (`service.name` = its id, its version)
/// or the daemon itself.
#[derive(Clone)]
struct Resources {
    supervisor: Supervisor,
    host: String,
}

impl Resources {
    fn of(&self, key: &str) -> Resource {
        let (name, version) = if key.is_empty() {
            ("torud".to_owned(), env!("CARGO_PKG_VERSION").to_owned())
        } else {
            let version = self
                .supervisor
                .get(key)
                .map(|s| s.spec.metadata.version.clone())
                .unwrap_or_default();
            (key.to_owned(), version)
        };
        let mut attributes = vec![
            string_kv("service.name", name),
            string_kv("service.namespace", "torud".into()),
            string_kv("host.name", self.host.clone()),
        ];
        if !version.is_empty() {
            attributes.push(string_kv("service.version", version));
        }
        Resource {
            attributes,
            ..Default::default()
        }
    }
}

fn scope() -> InstrumentationScope {
    InstrumentationScope {
        name: "torud".into(),
        version: env!("CARGO_PKG_VERSION").into(),
        ..Default::default()
    }
}

/// Follows every plugin's log, and the event log, into `queue`: plugins added later are
/// followed from their `PluginAdded` event on, removed ones dropped at their
/// `PluginRemoved`.
async fn follow_everything(
    supervisor: Supervisor,
    queue: mpsc::Sender<Queued>,
    stats: Arc<ExportStats>,
    ends: Ends,
    tasks: TaskTracker,
) {
    // Events first, so that a plugin added while the census is taken is seen either in the
    // census or as an event (and followed once).
    let mut events = supervisor.events().follow(None);
    let mut followed: HashMap<String, CancellationToken> = HashMap::new();
    let follow = |id: &str,
                  log: PluginLog,
                  since: Since,
                  followed: &mut HashMap<String, CancellationToken>| {
        if followed.contains_key(id) {
            return;
        }
        let own = ends.child();
        followed.insert(id.to_owned(), own.stop.clone());
        tasks.spawn(follow_plugin(
            Arc::from(id),
            log,
            since,
            queue.clone(),
            stats.clone(),
            own,
        ));
    };
    for (status, log) in supervisor.census() {
        let now = Since::Seq(log.records().last_seq());
        follow(status.id(), log, now, &mut followed);
    }
    let daemon: Arc<str> = Arc::from("");
    // Plugins announced and not found in the table yet, with when they were announced.
    let mut added: HashMap<String, OffsetDateTime> = HashMap::new();
    let mut until = None;
    let event_log = supervisor.events().clone();
    loop {
        let next = ends
            .next(&mut events, &mut until, || event_log.last_seq())
            .await;
        let event = match next {
            Some(Ok(event)) => event,
            Some(Err(e)) => {
                tracing::warn!(error = %e, "OTLP export stops following the event log");
                return;
            }
            None => return,
        };
        let id = event.body.plugin_id.as_str();
        match event.body.kind {
            // Announced just before the plugin is in the table: it is looked for again at
            // each event until found (its own first event comes after the insert).
            EventKind::PluginAdded => {
                added.insert(id.to_owned(), event.time);
            }
            EventKind::PluginRemoved => {
                added.remove(id);
                if let Some(token) = followed.remove(id) {
                    token.cancel();
                }
            }
            _ => {}
        }
        added.retain(|id, time| match supervisor.plugin_log(id) {
            Ok(log) => {
                follow(id, log, Since::Time(*time), &mut followed);
                false
            }
            Err(_) => true,
        });
        let key = if id.is_empty() {
            daemon.clone()
        } else {
            Arc::from(id)
        };
        let record = event_record(&event);
        tokio::select! {
            _ = ends.stop.cancelled() => return,
            sent = queue.send((key, record)) => if sent.is_err() { return },
        }
    }
}

/// Where following a plugin's log begins.
enum Since {
    /// After this seq (the newest when the exporter started).
    Seq(u64),
    /// At the first record of this time or later (when the plugin was added), however far
    /// the event that announced it lagged behind.
    Time(OffsetDateTime),
}

/// Follows plugin `id`'s log from `since` into `queue`, counting records that rotated away
/// before they were read as dropped.
async fn follow_plugin(
    id: Arc<str>,
    log: PluginLog,
    since: Since,
    queue: mpsc::Sender<Queued>,
    stats: Arc<ExportStats>,
    ends: Ends,
) {
    let after = match since {
        Since::Seq(seq) => seq,
        Since::Time(time) => {
            let records = log.records().clone();
            match tokio::task::spawn_blocking(move || records.seq_at(time)).await {
                Ok(Ok(seq)) => seq.saturating_sub(1),
                _ => log.records().first_seq().saturating_sub(1),
            }
        }
    };
    let mut follower = log.records().follow(Some(after));
    let mut last = follower.cursor();
    let mut until = None;
    loop {
        let next = ends
            .next(&mut follower, &mut until, || log.records().last_seq())
            .await;
        let record = match next {
            Some(Ok(record)) => record,
            Some(Err(e)) => {
                tracing::warn!(plugin = %id, error = %e, "OTLP export stops following this plugin's log");
                return;
            }
            None => return,
        };
        if record.seq > last + 1 {
            stats.dropped(Signal::Logs, record.seq - last - 1);
        }
        last = record.seq;
        let otlp = log_record(&record);
        tokio::select! {
            _ = ends.stop.cancelled() => return,
            sent = queue.send((id.clone(), otlp)) => if sent.is_err() { return },
        }
    }
}

/// Gathers a batch: waits for one item, then up to [`LINGER`] for more, up to [`BATCH`].
/// Empty when the queue is closed (or `stop` is cancelled with nothing queued).
async fn gather<T>(rx: &mut mpsc::Receiver<T>, stop: &CancellationToken) -> Vec<T> {
    let mut batch = Vec::with_capacity(BATCH);
    tokio::select! {
        _ = stop.cancelled() => {
            // Shutting down: whatever is queued now, then no more.
            while batch.len() < BATCH {
                match rx.try_recv() {
                    Ok(item) => batch.push(item),
                    Err(_) => break,
                }
            }
            return batch;
        }
        n = rx.recv_many(&mut batch, BATCH) => if n == 0 { return batch },
    }
    let deadline = tokio::time::Instant::now() + LINGER;
    while batch.len() < BATCH {
        let room = BATCH - batch.len();
        match tokio::time::timeout_at(deadline, rx.recv_many(&mut batch, room)).await {
            Ok(n) if n > 0 => {}
            _ => break,
        }
    }
    batch
}

/// Where one signal's batches go: how a batch becomes a request, and how a request is sent
/// (its answer: how many items the receiver rejected).
struct Sink<T, R, F> {
    signal: Signal,
    request: fn(&Resources, Vec<T>) -> R,
    send: F,
}

/// Gathers batches from `rx` and sends each through `sink`, retried, until `stop` (then
/// what is queued, once) or until every sender is gone; counts what was sent and dropped.
async fn export_batches<T, R, F, Fut>(
    mut rx: mpsc::Receiver<T>,
    sink: Sink<T, R, F>,
    target: Target,
    resources: Resources,
    stats: Arc<ExportStats>,
    stop: CancellationToken,
) where
    R: Clone,
    F: Fn(tonic::Request<R>) -> Fut,
    Fut: std::future::Future<Output = Result<u64, tonic::Status>>,
{
    let mut outage = Outage::new(sink.signal, &target.endpoint);
    loop {
        let batch = gather(&mut rx, &stop).await;
        if batch.is_empty() {
            if stop.is_cancelled() || rx.is_closed() {
                return;
            }
            continue;
        }
        let n = batch.len() as u64;
        let request = (sink.request)(&resources, batch);
        let sent = send_with_retries(&mut outage, &stop, || {
            (sink.send)(target.request(request.clone()))
        })
        .await;
        account(&stats, sink.signal, n, sent);
    }
}

/// Log records grouped by their resource.
fn logs_request(resources: &Resources, batch: Vec<Queued>) -> ExportLogsServiceRequest {
    let mut by_resource: BTreeMap<Arc<str>, Vec<OtlpLog>> = BTreeMap::new();
    for (key, record) in batch {
        by_resource.entry(key).or_default().push(record);
    }
    ExportLogsServiceRequest {
        resource_logs: by_resource
            .into_iter()
            .map(|(key, log_records)| ResourceLogs {
                resource: Some(resources.of(&key)),
                scope_logs: vec![ScopeLogs {
                    scope: Some(scope()),
                    log_records,
                    ..Default::default()
                }],
                ..Default::default()
            })
            .collect(),
    }
}

/// Spans, all the daemon's.
fn spans_request(resources: &Resources, batch: Vec<SpanData>) -> ExportTraceServiceRequest {
    ExportTraceServiceRequest {
        resource_spans: vec![ResourceSpans {
            resource: Some(resources.of("")),
            scope_spans: vec![ScopeSpans {
                scope: Some(scope()),
                spans: batch.iter().map(span_of).collect(),
                ..Default::default()
            }],
            ..Default::default()
        }],
    }
}

/// Sends a snapshot of `metrics` every `every` (the first one `every` after the start), and
/// a last one at shutdown. A snapshot the receiver does not take is not retried: the next
/// one carries the same cumulative figures, newer. Its data points are counted as dropped.
async fn export_metrics(
    metrics: Metrics,
    every: Duration,
    target: Target,
    resources: Resources,
    stats: Arc<ExportStats>,
    stop: CancellationToken,
) {
    let client = MetricsServiceClient::new(target.channel.clone());
    let mut outage = Outage::new(Signal::Metrics, &target.endpoint);
    let started = unix_nanos(OffsetDateTime::now_utc());
    let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let last = tokio::select! {
            _ = stop.cancelled() => true,
            _ = ticks.tick() => false,
        };
        let snapshot = metrics.clone();
        let Ok(text) = tokio::task::spawn_blocking(move || snapshot.render()).await else {
            return;
        };
        let now = unix_nanos(OffsetDateTime::now_utc());
        let converted = super::openmetrics::to_otlp(&text, started, now);
        let points: u64 = converted.iter().map(data_points).sum();
        let request = ExportMetricsServiceRequest {
            resource_metrics: vec![ResourceMetrics {
                resource: Some(resources.of("")),
                scope_metrics: vec![ScopeMetrics {
                    scope: Some(scope()),
                    metrics: converted,
                    ..Default::default()
                }],
                ..Default::default()
            }],
        };
        let mut client = client.clone();
        let limit = if last {
            FLUSH_FOR
        } else {
            every.max(FLUSH_FOR)
        };
        let sent = tokio::time::timeout(limit, client.export(target.request(request)))
            .await
            .unwrap_or_else(|_| Err(tonic::Status::deadline_exceeded("no answer in time")));
        match sent {
            Ok(answer) => {
                outage.recovered();
                let rejected = answer
                    .into_inner()
                    .partial_success
                    .map_or(0, |p| p.rejected_data_points.max(0) as u64);
                account(&stats, Signal::Metrics, points, Some(rejected));
            }
            Err(error) => {
                outage.failed(&error);
                outage.dropped(1);
                account(&stats, Signal::Metrics, points, None);
            }
        }
        if last {
            return;
        }
    }
}

/// How many data points a metric holds.
fn data_points(metric: &Metric) -> u64 {
    use opentelemetry_proto::tonic::metrics::v1::metric::Data;
    (match &metric.data {
        Some(Data::Gauge(g)) => g.data_points.len(),
        Some(Data::Sum(s)) => s.data_points.len(),
        Some(Data::Histogram(h)) => h.data_points.len(),
        _ => 0,
    }) as u64
}

/// Counts a batch of `n` items: `sent` is how many the receiver rejected, or `None` when the
/// whole batch was dropped.
fn account(stats: &ExportStats, signal: Signal, n: u64, sent: Option<u64>) {
    match sent {
        Some(rejected) => {
            let rejected = rejected.min(n);
            stats.exported(signal, n - rejected);
            stats.dropped(signal, rejected);
        }
        None => stats.dropped(signal, n),
    }
}

/// Whether export to the receiver is failing, so that an outage is logged once when it
/// begins and once when it ends.
struct Outage {
    signal: Signal,
    endpoint: String,
    since: Option<SystemTime>,
    /// Batches (or metrics snapshots) dropped since it began.
    dropped_during: u64,
}

impl Outage {
    fn new(signal: Signal, endpoint: &str) -> Self {
        Outage {
            signal,
            endpoint: endpoint.to_owned(),
            since: None,
            dropped_during: 0,
        }
    }

    fn failed(&mut self, error: &tonic::Status) {
        if self.since.is_none() {
            self.since = Some(SystemTime::now());
            tracing::warn!(
                endpoint = %self.endpoint,
                signal = self.signal.as_str(),
                code = ?error.code(),
                error = error.message(),
                "OTLP export failing: retrying each batch for {RETRY_FOR:?}, then dropping it \
                 (counted in torud_otlp_dropped_total); the local logs keep everything"
            );
        }
    }

    fn dropped(&mut self, n: u64) {
        self.dropped_during += n;
    }

    fn recovered(&mut self) {
        if let Some(since) = self.since.take() {
            let lasted = since.elapsed().unwrap_or_default();
            tracing::info!(
                endpoint = %self.endpoint,
                signal = self.signal.as_str(),
                dropped_batches = self.dropped_during,
                "OTLP export works again after {lasted:.1?}"
            );
            self.dropped_during = 0;
        }
    }
}

/// Sends one request made by `attempt`, trying again with backoff for [`RETRY_FOR`] (or
/// until `stop`, then once more at most). The number of items rejected, or `None` if the
/// batch was dropped.
async fn send_with_retries<F, Fut>(
    outage: &mut Outage,
    stop: &CancellationToken,
    mut attempt: F,
) -> Option<u64>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<u64, tonic::Status>>,
{
    let began = tokio::time::Instant::now();
    let mut backoff = FIRST_BACKOFF;
    loop {
        let result = if stop.is_cancelled() {
            // Flushing at shutdown: one short try.
            tokio::time::timeout(FLUSH_FOR, attempt())
                .await
                .unwrap_or_else(|_| Err(tonic::Status::deadline_exceeded("shutting down")))
        } else {
            attempt().await
        };
        match result {
            Ok(rejected) => {
                outage.recovered();
                return Some(rejected);
            }
            Err(error) => {
                outage.failed(&error);
                if stop.is_cancelled() || began.elapsed() + backoff > RETRY_FOR {
                    outage.dropped(1);
                    return None;
                }
                tokio::select! {
                    _ = stop.cancelled() => {}
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        }
    }
}

fn string_kv(key: &str, value: String) -> KeyValue {
    KeyValue {
        key: key.to_owned(),
        value: Some(AnyValue {
            value: Some(any_value::Value::StringValue(value)),
        }),
        ..Default::default()
    }
}

fn any(value: &Value) -> AnyValue {
    use any_value::Value as V;
    let value = match value {
        Value::Null => None,
        Value::Bool(b) => Some(V::BoolValue(*b)),
        Value::Number(n) => Some(match (n.as_i64(), n.as_f64()) {
            (Some(i), _) => V::IntValue(i),
            (None, Some(f)) => V::DoubleValue(f),
            (None, None) => V::StringValue(n.to_string()),
        }),
        Value::String(s) => Some(V::StringValue(s.clone())),
        Value::Array(items) => Some(V::ArrayValue(ArrayValue {
            values: items.iter().map(any).collect(),
        })),
        Value::Object(map) => Some(V::KvlistValue(KeyValueList {
            values: map
                .iter()
                .map(|(k, v)| KeyValue {
                    key: k.clone(),
                    value: Some(any(v)),
                    ..Default::default()
                })
                .collect(),
        })),
    };
    AnyValue { value }
}

fn unix_nanos(time: OffsetDateTime) -> u64 {
    u64::try_from(time.unix_timestamp_nanos()).unwrap_or(0)
}

/// OTLP's severity number and text of a level.
fn severity(level: LogLevel) -> (i32, &'static str) {
    match level {
        LogLevel::Trace => (1, "TRACE"),
        LogLevel::Debug => (5, "DEBUG"),
        LogLevel::Info => (9, "INFO"),
        LogLevel::Warn => (13, "WARN"),
        LogLevel::Error => (17, "ERROR"),
    }
}

/// A plugin's log record as an OTLP log record: its message the body, its level the
/// severity, its structured fields attributes (a `trace_id` and `span_id` of the right
/// shape, as the SDKs write them, become the record's trace context).
pub fn log_record(record: &LogRecord) -> OtlpLog {
    let (severity_number, severity_text) = severity(record.level);
    let mut attributes = vec![
        string_kv(
            "log.iostream",
            match record.stream {
                LogStream::Stdout => "stdout",
                LogStream::Stderr => "stderr",
                LogStream::Supervisor => "supervisor",
            }
            .to_owned(),
        ),
        KeyValue {
            key: "torud.seq".into(),
            value: Some(AnyValue {
                value: Some(any_value::Value::IntValue(record.seq as i64)),
            }),
            ..Default::default()
        },
        KeyValue {
            key: "process.pid".into(),
            value: Some(AnyValue {
                value: Some(any_value::Value::IntValue(record.pid.into())),
            }),
            ..Default::default()
        },
    ];
    if let Some(time) = &record.plugin_time {
        attributes.push(string_kv("torud.plugin_time", time.clone()));
    }
    let id_field = |name: &str, len: usize| {
        record
            .fields
            .get(name)
            .and_then(Value::as_str)
            .filter(|s| s.len() == len * 2)
            .and_then(|s| hex::decode(s).ok())
            .filter(|bytes| bytes.iter().any(|&b| b != 0))
    };
    let trace_id = id_field("trace_id", 16);
    let span_id = trace_id.as_ref().and_then(|_| id_field("span_id", 8));
    for (key, value) in &record.fields {
        let is_context =
            (key == "trace_id" && trace_id.is_some()) || (key == "span_id" && span_id.is_some());
        if !is_context {
            attributes.push(KeyValue {
                key: key.clone(),
                value: Some(any(value)),
                ..Default::default()
            });
        }
    }
    let time = unix_nanos(record.time);
    OtlpLog {
        time_unix_nano: time,
        observed_time_unix_nano: time,
        severity_number,
        severity_text: severity_text.into(),
        body: Some(AnyValue {
            value: Some(any_value::Value::StringValue(record.message.clone())),
        }),
        attributes,
        trace_id: trace_id.unwrap_or_default(),
        span_id: span_id.unwrap_or_default(),
        flags: 0,
        ..Default::default()
    }
}

/// A lifecycle event as an OTLP event (a log record with an event name, `torud.<kind>`):
/// its reason the body, its typed fields attributes.
pub fn event_record(event: &Event) -> OtlpLog {
    let json = serde_json::to_value(event).unwrap_or(Value::Null);
    let kind = json
        .get("kind")
        .and_then(Value::as_str)
        .unwrap_or("event")
        .to_owned();
    let attributes = match &json {
        Value::Object(map) => map
            .iter()
            .filter(|(k, _)| !matches!(k.as_str(), "time" | "reason"))
            .map(|(k, v)| KeyValue {
                key: format!("torud.{k}"),
                value: Some(any(v)),
                ..Default::default()
            })
            .collect(),
        _ => Vec::new(),
    };
    let failed = matches!(
        event.body.to_state,
        Some(crate::model::PluginState::Crashed | crate::model::PluginState::Backoff)
    ) || matches!(
        event.body.kind,
        EventKind::LoggingDegraded | EventKind::EventStorageDegraded
    );
    let (severity_number, severity_text) = severity(if failed {
        LogLevel::Warn
    } else {
        LogLevel::Info
    });
    let time = unix_nanos(event.time);
    OtlpLog {
        time_unix_nano: time,
        observed_time_unix_nano: time,
        severity_number,
        severity_text: severity_text.into(),
        body: Some(AnyValue {
            value: Some(any_value::Value::StringValue(event.body.reason.clone())),
        }),
        attributes,
        event_name: format!("torud.{kind}"),
        ..Default::default()
    }
}

/// A forwarded request's span: a server span of the daemon, with the plugin and the gRPC
/// code as attributes (an error status for any code but OK).
fn span_of(data: &SpanData) -> Span {
    let nanos = |t: SystemTime| {
        t.duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64)
    };
    Span {
        trace_id: data.trace_id.to_vec(),
        span_id: data.span_id.to_vec(),
        parent_span_id: data.parent_span_id.map(|p| p.to_vec()).unwrap_or_default(),
        name: data.name.to_owned(),
        kind: span::SpanKind::Server as i32,
        start_time_unix_nano: nanos(data.start),
        end_time_unix_nano: nanos(data.end),
        attributes: vec![
            string_kv("torud.plugin", data.plugin.clone()),
            string_kv("rpc.system", "grpc".into()),
            KeyValue {
                key: "rpc.grpc.status_code".into(),
                value: Some(AnyValue {
                    value: Some(any_value::Value::IntValue(data.code.into())),
                }),
                ..Default::default()
            },
        ],
        status: Some(Status {
            code: if data.code == 0 {
                status::StatusCode::Ok
            } else {
                status::StatusCode::Error
            } as i32,
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// This host's name, for `host.name`.
fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_owned())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn record(level: LogLevel, fields: serde_json::Map<String, Value>) -> LogRecord {
        LogRecord {
            seq: 7,
            time: OffsetDateTime::from_unix_timestamp(1_700_000_000).unwrap(),
            stream: LogStream::Stdout,
            level,
            message: "hello".into(),
            plugin_time: None,
            fields,
            pid: 42,
            continued: false,
        }
    }

    fn attribute<'a>(log: &'a OtlpLog, key: &str) -> Option<&'a any_value::Value> {
        log.attributes
            .iter()
            .find(|kv| kv.key == key)
            .and_then(|kv| kv.value.as_ref()?.value.as_ref())
    }

    #[test]
    fn a_record_keeps_its_level_message_and_fields() {
        let fields = json!({"user": "ada", "n": 3, "ok": true})
            .as_object()
            .unwrap()
            .clone();
        let log = log_record(&record(LogLevel::Warn, fields));
        assert_eq!(
            (log.severity_number, log.severity_text.as_str()),
            (13, "WARN")
        );
        assert_eq!(log.time_unix_nano, 1_700_000_000_000_000_000);
        assert_eq!(
            log.body.unwrap().value,
            Some(any_value::Value::StringValue("hello".into()))
        );
        let log = log_record(&record(
            LogLevel::Warn,
            json!({"user": "ada", "n": 3}).as_object().unwrap().clone(),
        ));
        assert_eq!(
            attribute(&log, "user"),
            Some(&any_value::Value::StringValue("ada".into()))
        );
        assert_eq!(attribute(&log, "n"), Some(&any_value::Value::IntValue(3)));
        assert_eq!(
            attribute(&log, "torud.seq"),
            Some(&any_value::Value::IntValue(7))
        );
        assert_eq!(
            attribute(&log, "log.iostream"),
            Some(&any_value::Value::StringValue("stdout".into()))
        );
        assert!(log.trace_id.is_empty());
    }

    #[test]
    fn trace_fields_become_the_records_trace_context() {
        let fields = json!({
            "trace_id": "4bf92f3577b34da6a3ce929d0e0e4736",
            "span_id": "00f067aa0ba902b7",
        });
        let log = log_record(&record(LogLevel::Info, fields.as_object().unwrap().clone()));
        assert_eq!(
            hex::encode(&log.trace_id),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
        assert_eq!(hex::encode(&log.span_id), "00f067aa0ba902b7");
        assert_eq!(
            attribute(&log, "trace_id"),
            None,
            "not repeated as an attribute"
        );

        let malformed = json!({"trace_id": "not hex"});
        let log = log_record(&record(
            LogLevel::Info,
            malformed.as_object().unwrap().clone(),
        ));
        assert!(log.trace_id.is_empty());
        assert_eq!(
            attribute(&log, "trace_id"),
            Some(&any_value::Value::StringValue("not hex".into()))
        );
    }

    #[test]
    fn an_event_is_named_by_its_kind_with_typed_fields() {
        let mut draft =
            crate::model::EventDraft::new("hello", EventKind::StateChanged).reason("it exited");
        draft.to_state = Some(crate::model::PluginState::Backoff);
        let event = Event {
            seq: 3,
            time: OffsetDateTime::from_unix_timestamp(1).unwrap(),
            body: draft,
        };
        let log = event_record(&event);
        assert_eq!(log.event_name, "torud.state_changed");
        assert_eq!(log.severity_text, "WARN");
        assert_eq!(
            attribute(&log, "torud.plugin_id"),
            Some(&any_value::Value::StringValue("hello".into()))
        );
        assert_eq!(
            attribute(&log, "torud.to_state"),
            Some(&any_value::Value::StringValue("backoff".into()))
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_batch_the_receiver_never_takes_is_dropped_after_retrying() {
        let mut outage = Outage::new(Signal::Logs, "http://127.0.0.1:4317");
        let stop = CancellationToken::new();
        let began = tokio::time::Instant::now();
        let mut attempts = 0;
        let sent = send_with_retries(&mut outage, &stop, || {
            attempts += 1;
            async { Err(tonic::Status::unavailable("down")) }
        })
        .await;
        assert_eq!(sent, None);
        assert!(began.elapsed() <= RETRY_FOR, "{:?}", began.elapsed());
        assert!(began.elapsed() >= RETRY_FOR - MAX_BACKOFF * 2);
        assert!(attempts > 5, "{attempts} attempts");
        assert!(outage.since.is_some(), "still in the outage");
        assert_eq!(outage.dropped_during, 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_batch_is_sent_once_the_receiver_is_back() {
        let mut outage = Outage::new(Signal::Logs, "http://127.0.0.1:4317");
        let stop = CancellationToken::new();
        let mut attempts = 0;
        let sent = send_with_retries(&mut outage, &stop, || {
            attempts += 1;
            let up = attempts > 3;
            async move {
                if up {
                    Ok(2)
                } else {
                    Err(tonic::Status::unavailable("down"))
                }
            }
        })
        .await;
        assert_eq!(sent, Some(2), "sent, with what the receiver rejected");
        assert_eq!(attempts, 4);
        assert!(outage.since.is_none(), "the outage ended");
    }

    #[tokio::test(start_paused = true)]
    async fn shutting_down_tries_a_batch_once_more_and_no_longer() {
        let mut outage = Outage::new(Signal::Traces, "http://127.0.0.1:4317");
        let stop = CancellationToken::new();
        stop.cancel();
        let mut attempts = 0;
        let sent = send_with_retries(&mut outage, &stop, || {
            attempts += 1;
            async { Err(tonic::Status::unavailable("down")) }
        })
        .await;
        assert_eq!((sent, attempts), (None, 1));
    }

    #[test]
    fn a_batch_counts_what_the_receiver_rejected_as_dropped() {
        let stats = ExportStats::default();
        account(&stats, Signal::Logs, 10, Some(3));
        account(&stats, Signal::Logs, 5, None);
        assert_eq!(stats.exported_count(Signal::Logs), 7);
        assert_eq!(stats.dropped_count(Signal::Logs), 8);
    }
}
