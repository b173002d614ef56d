//! Prometheus metrics: one [`Metrics`] per daemon, rendered as OpenMetrics text by
//! `prometheus-client` at each scrape.
//!
//! Most figures are read at the scrape, not kept twice: each plugin's state, health,
//! restarts, crashes by reason and last start from its status; the lines and bytes its output
//! produced and its log's size from its log; its storage's keys and bytes from the storage;
//! the event log's seq; the process's CPU, memory and descriptors from `/proc/self`. What
//! only the control plane sees is recorded here as it serves: forwarded requests (calls and
//! KV operations) by gRPC code with their latency, gaps sent to log subscribers, and the
//! open subscriptions with how far each lags behind its log.
//!
//! Label values are bounded: plugin ids only of plugins the supervisor knows (a request
//! naming an unknown id records nothing, and a removed plugin's series go with it at the next
//! scrape), and otherwise closed sets (states, crash reasons, operations, the 17 gRPC codes,
//! streams, subscription kinds). Nothing taken from a request but a known id becomes a label.

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{
    DescriptorEncoder, EncodeCounterValue, EncodeGaugeValue, EncodeLabelSet, EncodeMetric,
};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

use crate::model::{CrashReason, LogStream, PluginState, PluginStatus};
use crate::supervisor::Supervisor;
use crate::telemetry::export::{ExportStats, Signal};

/// The `Content-Type` of [`Metrics::render`]'s text.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// A forwarded request's kind, as the `op` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// `CallPlugin`.
    Call,
    /// `KvService/GetValue`.
    KvGet,
    /// `KvService/SetValue`.
    KvSet,
    /// `KvService/DeleteValue`.
    KvDelete,
}

impl Op {
    const ALL: [Op; 4] = [Op::Call, Op::KvGet, Op::KvSet, Op::KvDelete];

    /// The gRPC method, as a span's name.
    pub fn rpc(self) -> &'static str {
        match self {
            Op::Call => "toru.v1.PluginService/CallPlugin",
            Op::KvGet => "toru.v1.KvService/GetValue",
            Op::KvSet => "toru.v1.KvService/SetValue",
            Op::KvDelete => "toru.v1.KvService/DeleteValue",
        }
    }

    fn as_str(self) -> &'static str {
        match self {
            Op::Call => "call",
            Op::KvGet => "kv_get",
            Op::KvSet => "kv_set",
            Op::KvDelete => "kv_delete",
        }
    }
}

/// The gRPC status codes by number, named as gRPC's own metrics name them.
const CODES: [&str; 17] = [
    "OK",
    "Canceled",
    "Unknown",
    "InvalidArgument",
    "DeadlineExceeded",
    "NotFound",
    "AlreadyExists",
    "PermissionDenied",
    "ResourceExhausted",
    "FailedPrecondition",
    "Aborted",
    "OutOfRange",
    "Unimplemented",
    "Internal",
    "Unavailable",
    "DataLoss",
    "Unauthenticated",
];

/// Upper bounds of the latency buckets, in seconds: 100 µs (a forwarded call to an idle
/// plugin takes a few hundred) to 30 s (the default call timeout).
const LATENCY_BUCKETS: [f64; 17] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0, 30.0,
];

/// A kind of subscription, as the `kind` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SubscriptionKind {
    /// `LogService/StreamLogs` following the logs.
    Logs,
    /// `PluginService/WatchEvents`.
    Events,
}

impl SubscriptionKind {
    const ALL: [SubscriptionKind; 2] = [SubscriptionKind::Logs, SubscriptionKind::Events];

    fn as_str(self) -> &'static str {
        match self {
            SubscriptionKind::Logs => "logs",
            SubscriptionKind::Events => "events",
        }
    }
}

/// The daemon's metrics: what the control plane records, and the registry whose collector
/// reads everything else at each scrape. Clones share it.
#[derive(Clone)]
pub struct Metrics {
    census: Arc<Census>,
    registry: Arc<Registry>,
}

impl fmt::Debug for Metrics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Metrics {
    /// Metrics of the daemon whose plugins `supervisor` runs.
    pub fn new(supervisor: Supervisor) -> Self {
        let census = Arc::new(Census {
            supervisor,
            traffic: Mutex::default(),
            subscriptions: Mutex::default(),
            export: Arc::default(),
        });
        let mut registry = Registry::default();
        registry.register_collector(Box::new(census.clone()));
        Metrics {
            census,
            registry: Arc::new(registry),
        }
    }

    /// Counts a forwarded request to plugin `id` that ended with gRPC code `code` after
    /// `elapsed`. Nothing is counted for an id the supervisor does not know.
    pub fn forwarded(&self, id: &str, op: Op, code: i32, elapsed: Duration) {
        let Some(traffic) = self.census.traffic(id) else {
            return;
        };
        let op = &traffic.ops[op as usize];
        let code = usize::try_from(code).unwrap_or(2).min(CODES.len() - 1);
        op.codes[code].fetch_add(1, Ordering::Relaxed);
        op.latency.observe(elapsed.as_secs_f64());
    }

    /// The counts of the OTLP export, which it updates itself.
    pub fn export_stats(&self) -> Arc<ExportStats> {
        self.census.export.clone()
    }

    /// Counts a gap (records rotated away before a subscriber read them) sent to a
    /// subscriber of plugin `id`'s log.
    pub fn log_gap(&self, id: &str) {
        if let Some(traffic) = self.census.traffic(id) {
            traffic.log_gaps.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Registers an open subscription; it counts as open until the returned guard drops.
    pub fn subscribe(&self, kind: SubscriptionKind) -> Subscription {
        let entry = Arc::new(SubscriptionEntry {
            kind,
            sources: Mutex::default(),
        });
        let mut open = self
            .census
            .subscriptions
            .lock()
            .expect("subscriptions poisoned");
        open.retain(|e| e.strong_count() > 0);
        open.push(Arc::downgrade(&entry));
        Subscription { entry }
    }

    /// Every metric as OpenMetrics text. Reads files and the storage: call it off the
    /// runtime's workers.
    pub fn render(&self) -> String {
        let mut text = String::new();
        // Writing into a String cannot fail; a collector error would be a bug here.
        if let Err(e) = prometheus_client::encoding::text::encode(&mut text, &self.registry) {
            tracing::error!(error = %e, "encoding metrics failed");
        }
        text
    }
}

/// An open subscription, counted until dropped.
#[derive(Debug)]
pub struct Subscription {
    entry: Arc<SubscriptionEntry>,
}

impl Subscription {
    /// A position for one of the subscription's sources (a plugin's log, the event log),
    /// whose newest seq `newest` reads. The subscription's lag, read at each scrape, is the
    /// most records any of its sources has that were not sent yet: a subscriber that stops
    /// reading is seen falling behind.
    pub fn lag_gauge(&self, newest: impl Fn() -> u64 + Send + Sync + 'static) -> Lag {
        let sent = Arc::new(AtomicU64::new(newest()));
        let mut sources = self
            .entry
            .sources
            .lock()
            .expect("subscription sources poisoned");
        sources.push(Source {
            sent: sent.clone(),
            newest: Box::new(newest),
        });
        Lag(sent)
    }
}

/// Where one source of a subscription has been sent up to.
#[derive(Debug, Clone)]
pub struct Lag(Arc<AtomicU64>);

impl Lag {
    /// Everything up to seq `sent` has been sent to the subscriber.
    pub fn sent(&self, sent: u64) {
        self.0.store(sent, Ordering::Relaxed);
    }
}

struct Source {
    sent: Arc<AtomicU64>,
    newest: Box<dyn Fn() -> u64 + Send + Sync>,
}

struct SubscriptionEntry {
    kind: SubscriptionKind,
    sources: Mutex<Vec<Source>>,
}

impl fmt::Debug for SubscriptionEntry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SubscriptionEntry")
            .field("kind", &self.kind)
            .finish_non_exhaustive()
    }
}

impl SubscriptionEntry {
    fn lag(&self) -> u64 {
        let sources = self.sources.lock().expect("subscription sources poisoned");
        sources
            .iter()
            .map(|s| (s.newest)().saturating_sub(s.sent.load(Ordering::Relaxed)))
            .max()
            .unwrap_or(0)
    }
}

/// What the control plane records about one plugin.
#[derive(Debug)]
struct PluginTraffic {
    ops: [OpTraffic; Op::ALL.len()],
    log_gaps: AtomicU64,
}

#[derive(Debug)]
struct OpTraffic {
    codes: [AtomicU64; CODES.len()],
    latency: Histogram,
}

impl Default for PluginTraffic {
    fn default() -> Self {
        PluginTraffic {
            ops: std::array::from_fn(|_| OpTraffic {
                codes: Default::default(),
                latency: Histogram::new(LATENCY_BUCKETS),
            }),
            log_gaps: AtomicU64::new(0),
        }
    }
}

/// The collector: reads the supervisor, the logs, the storage and the process at each
/// scrape, and holds what the control plane records.
struct Census {
    supervisor: Supervisor,
    /// Per known plugin; an entry is made at a plugin's first request and dropped at the
    /// first scrape after the plugin is gone. Locked only to look up, insert or prune.
    traffic: Mutex<HashMap<String, Arc<PluginTraffic>>>,
    /// Open subscriptions (dead ones pruned as new ones come and at each scrape).
    subscriptions: Mutex<Vec<Weak<SubscriptionEntry>>>,
    /// What the OTLP export sent and dropped.
    export: Arc<ExportStats>,
}

impl fmt::Debug for Census {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Census").finish_non_exhaustive()
    }
}

impl Census {
    /// Plugin `id`'s record, made at its first use if the supervisor knows it.
    fn traffic(&self, id: &str) -> Option<Arc<PluginTraffic>> {
        let mut traffic = self.traffic.lock().expect("traffic table poisoned");
        if let Some(t) = traffic.get(id) {
            return Some(t.clone());
        }
        if !self.supervisor.knows(id) {
            return None;
        }
        let t = Arc::new(PluginTraffic::default());
        traffic.insert(id.to_owned(), t.clone());
        Some(t)
    }

    /// The records of the plugins in `census`, dropping those of plugins that are gone.
    fn traffic_of(&self, census: &[Plugin]) -> Vec<Option<Arc<PluginTraffic>>> {
        let mut traffic = self.traffic.lock().expect("traffic table poisoned");
        traffic.retain(|id, _| census.binary_search_by(|p| p.status.id().cmp(id)).is_ok());
        census
            .iter()
            .map(|p| traffic.get(p.id()).cloned())
            .collect()
    }

    /// Open subscriptions by kind: how many, and the largest lag.
    fn subscriptions(&self) -> [(usize, u64); SubscriptionKind::ALL.len()] {
        let open: Vec<Arc<SubscriptionEntry>> = {
            let mut open = self.subscriptions.lock().expect("subscriptions poisoned");
            open.retain(|e| e.strong_count() > 0);
            open.iter().filter_map(Weak::upgrade).collect()
        };
        let mut by_kind = [(0, 0); SubscriptionKind::ALL.len()];
        for entry in open {
            let (count, lag) = &mut by_kind[entry.kind as usize];
            *count += 1;
            *lag = (*lag).max(entry.lag());
        }
        by_kind
    }
}

/// One plugin as a scrape sees it.
struct Plugin {
    status: PluginStatus,
    log: crate::logs::capture::PluginLog,
    /// Keys and bytes in its storage (`None`: could not be read).
    storage: Option<(u64, u64)>,
}

impl Plugin {
    fn id(&self) -> &str {
        self.status.id()
    }
}

impl Collector for Census {
    fn encode(&self, mut out: DescriptorEncoder) -> Result<(), fmt::Error> {
        let plugins: Vec<Plugin> = self
            .supervisor
            .census()
            .into_iter()
            .map(|(status, log)| {
                let storage = self.supervisor.storage_usage(status.id()).ok();
                Plugin {
                    status,
                    log,
                    storage,
                }
            })
            .collect();
        let traffic = self.traffic_of(&plugins);
        encode_daemon(&mut out, self, &plugins)?;
        encode_plugins(&mut out, &plugins)?;
        encode_traffic(&mut out, &plugins, &traffic)?;
        encode_process(&mut out)
    }
}

/// Writes one family of samples: a descriptor, then each `(labels, value)` row.
fn family<L: EncodeLabelSet, M: EncodeMetric>(
    out: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    kind: MetricType,
    rows: impl IntoIterator<Item = (L, M)>,
) -> Result<(), fmt::Error> {
    let mut metric = out.encode_descriptor(name, help, None, kind)?;
    for (labels, value) in rows {
        value.encode(metric.encode_family(&labels)?)?;
    }
    Ok(())
}

fn gauges<L: EncodeLabelSet, V: EncodeGaugeValue>(
    out: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    rows: impl IntoIterator<Item = (L, V)>,
) -> Result<(), fmt::Error> {
    let rows = rows.into_iter().map(|(l, v)| (l, ConstGauge::new(v)));
    family(out, name, help, MetricType::Gauge, rows)
}

fn counters<L: EncodeLabelSet, V: EncodeCounterValue>(
    out: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    rows: impl IntoIterator<Item = (L, V)>,
) -> Result<(), fmt::Error> {
    let rows = rows.into_iter().map(|(l, v)| (l, ConstCounter::new(v)));
    family(out, name, help, MetricType::Counter, rows)
}

fn encode_daemon(
    out: &mut DescriptorEncoder,
    census: &Census,
    plugins: &[Plugin],
) -> Result<(), fmt::Error> {
    let mut info = out.encode_descriptor(
        "torud_build",
        "The daemon's version.",
        None,
        MetricType::Info,
    )?;
    info.encode_info(&[("version", env!("CARGO_PKG_VERSION"))])?;
    gauges(
        out,
        "torud_plugins",
        "Known plugins by state.",
        PluginState::ALL.map(|state| {
            let count = plugins.iter().filter(|p| p.status.state == state).count() as u64;
            ([("state", state.as_str())], count)
        }),
    )?;
    gauges(
        out,
        "torud_event_seq",
        "Seq of the newest event in the event log.",
        [([("", ""); 0], census.supervisor.events().last_seq())],
    )?;
    let subscriptions = census.subscriptions();
    gauges(
        out,
        "torud_subscriptions",
        "Open StreamLogs (following) and WatchEvents subscriptions.",
        SubscriptionKind::ALL.map(|k| ([("kind", k.as_str())], subscriptions[k as usize].0 as u64)),
    )?;
    gauges(
        out,
        "torud_subscriber_lag_records",
        "Records the furthest-behind subscriber of each kind has yet to be sent.",
        SubscriptionKind::ALL.map(|k| ([("kind", k.as_str())], subscriptions[k as usize].1)),
    )?;
    counters(
        out,
        "torud_otlp_exported",
        "Log records (with events), spans and metric data points the OTLP receiver took.",
        Signal::ALL.map(|s| ([("signal", s.as_str())], census.export.exported_count(s))),
    )?;
    counters(
        out,
        "torud_otlp_dropped",
        "Log records (with events), spans and metric data points lost to OTLP export: \
         refused, unsent after retries, rotated out of a log before they were read, or with \
         no room in the queue.",
        Signal::ALL.map(|s| ([("signal", s.as_str())], census.export.dropped_count(s))),
    )
}

fn encode_plugins(out: &mut DescriptorEncoder, plugins: &[Plugin]) -> Result<(), fmt::Error> {
    fn one(p: &Plugin) -> [(&'static str, &str); 1] {
        [("plugin", p.id())]
    }
    gauges(
        out,
        "torud_plugin_up",
        "1 when the plugin is running and healthy.",
        plugins.iter().map(|p| {
            let up = p.status.state == PluginState::Running && p.status.healthy;
            (one(p), u64::from(up))
        }),
    )?;
    gauges(
        out,
        "torud_plugin_enabled",
        "1 when the plugin is enabled (meant to run).",
        plugins
            .iter()
            .map(|p| (one(p), u64::from(p.status.enabled))),
    )?;
    gauges(
        out,
        "torud_plugin_state",
        "1 for the plugin's current state, 0 for the others.",
        plugins.iter().flat_map(|p| {
            PluginState::ALL.map(|state| {
                let labels = [("plugin", p.id()), ("state", state.as_str())];
                (labels, u64::from(p.status.state == state))
            })
        }),
    )?;
    counters(
        out,
        "torud_plugin_restarts",
        "Restarts after failures since the daemon started.",
        plugins
            .iter()
            .map(|p| (one(p), u64::from(p.status.restart_count))),
    )?;
    counters(
        out,
        "torud_plugin_crashes",
        "Failed runs since the daemon started, by reason.",
        plugins.iter().flat_map(|p| {
            CrashReason::ALL.map(|reason| {
                let labels = [("plugin", p.id()), ("reason", reason.as_str())];
                (labels, p.status.crashes[reason as usize])
            })
        }),
    )?;
    gauges(
        out,
        "torud_plugin_last_start_timestamp_seconds",
        "When the plugin's current or last process was spawned (Unix time).",
        plugins.iter().filter_map(|p| {
            let at = p.status.started_at?;
            Some((one(p), at.unix_timestamp_nanos() as f64 / 1e9))
        }),
    )?;
    for (name, help, field) in [
        (
            "torud_plugin_log_lines",
            "Lines captured from the plugin's output, by stream.",
            0,
        ),
        (
            "torud_plugin_log_bytes",
            "Bytes of the lines captured from the plugin's output, by stream.",
            1,
        ),
    ] {
        counters(
            out,
            name,
            help,
            plugins.iter().flat_map(|p| {
                [LogStream::Stdout, LogStream::Stderr].map(|stream| {
                    let (lines, bytes) = p.log.captured(stream);
                    let labels = [("plugin", p.id()), ("stream", stream_name(stream))];
                    (labels, if field == 0 { lines } else { bytes })
                })
            }),
        )?;
    }
    gauges(
        out,
        "torud_plugin_log_store_bytes",
        "Bytes the plugin's log takes on disk.",
        plugins
            .iter()
            .map(|p| (one(p), p.log.records().disk_bytes())),
    )?;
    gauges(
        out,
        "torud_plugin_storage_keys",
        "Keys in the plugin's storage.",
        plugins.iter().filter_map(|p| Some((one(p), p.storage?.0))),
    )?;
    gauges(
        out,
        "torud_plugin_storage_bytes",
        "Bytes of keys and values in the plugin's storage.",
        plugins.iter().filter_map(|p| Some((one(p), p.storage?.1))),
    )
}

fn stream_name(stream: LogStream) -> &'static str {
    match stream {
        LogStream::Stdout => "stdout",
        LogStream::Stderr => "stderr",
        LogStream::Supervisor => "supervisor",
    }
}

fn encode_traffic(
    out: &mut DescriptorEncoder,
    plugins: &[Plugin],
    traffic: &[Option<Arc<PluginTraffic>>],
) -> Result<(), fmt::Error> {
    let recorded = || {
        plugins
            .iter()
            .zip(traffic)
            .filter_map(|(p, t)| Some((p.id(), t.as_ref()?)))
    };
    counters(
        out,
        "torud_forwarded_requests",
        "Requests forwarded to the plugin (calls and KV operations), by gRPC code.",
        recorded().flat_map(|(id, t)| {
            Op::ALL.into_iter().flat_map(move |op| {
                let codes = &t.ops[op as usize].codes;
                (0..CODES.len()).filter_map(move |code| {
                    let n = codes[code].load(Ordering::Relaxed);
                    let labels = [("plugin", id), ("op", op.as_str()), ("code", CODES[code])];
                    (n > 0).then_some((labels, n))
                })
            })
        }),
    )?;
    let mut latency = out.encode_descriptor(
        "torud_forwarded_request_duration_seconds",
        "Time from receiving a forwarded request to answering it.",
        None,
        MetricType::Histogram,
    )?;
    for (id, t) in recorded() {
        for op in Op::ALL {
            let op_traffic = &t.ops[op as usize];
            // Every observation counts a code too: an op with no code counted has none.
            if op_traffic
                .codes
                .iter()
                .all(|c| c.load(Ordering::Relaxed) == 0)
            {
                continue;
            }
            let labels = [("plugin", id), ("op", op.as_str())];
            op_traffic.latency.encode(latency.encode_family(&labels)?)?;
        }
    }
    counters(
        out,
        "torud_plugin_log_gaps",
        "Gaps (records rotated away unread) sent to subscribers of the plugin's log.",
        plugins.iter().zip(traffic).map(|(p, t)| {
            let gaps = t.as_ref().map_or(0, |t| t.log_gaps.load(Ordering::Relaxed));
            ([("plugin", p.id())], gaps)
        }),
    )
}

/// The process's own figures, named as Prometheus's client libraries name them.
fn encode_process(out: &mut DescriptorEncoder) -> Result<(), fmt::Error> {
    let Some(stat) = ProcessStat::read() else {
        return Ok(());
    };
    let none = [("", ""); 0];
    counters(
        out,
        "process_cpu_seconds",
        "User and system CPU time spent, in seconds.",
        [(none, stat.cpu_seconds)],
    )?;
    gauges(
        out,
        "process_resident_memory_bytes",
        "Resident memory size in bytes.",
        [(none, stat.resident_bytes)],
    )?;
    gauges(
        out,
        "process_virtual_memory_bytes",
        "Virtual memory size in bytes.",
        [(none, stat.virtual_bytes)],
    )?;
    gauges(
        out,
        "process_start_time_seconds",
        "Start time of the process since the Unix epoch, in seconds.",
        [(none, stat.start_time_seconds)],
    )?;
    gauges(
        out,
        "process_threads",
        "Threads in the process.",
        [(none, stat.threads)],
    )?;
    gauges(
        out,
        "process_open_fds",
        "Open file descriptors.",
        [(none, stat.open_fds)],
    )?;
    gauges(
        out,
        "process_max_fds",
        "The limit on open file descriptors.",
        [(none, stat.max_fds)],
    )
}

/// What `/proc/self` says about the daemon's process.
struct ProcessStat {
    cpu_seconds: f64,
    resident_bytes: u64,
    virtual_bytes: u64,
    start_time_seconds: f64,
    threads: u64,
    open_fds: u64,
    max_fds: u64,
}

impl ProcessStat {
    fn read() -> Option<Self> {
        let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
        // The command name is in parentheses and may hold spaces: fields count from after it.
        let fields: Vec<&str> = stat.get(stat.rfind(')')? + 2..)?.split(' ').collect();
        // Field n of proc(5) (1-based, counting pid and comm) is fields[n - 3].
        let field = |n: usize| fields.get(n - 3)?.parse::<u64>().ok();
        // SAFETY: sysconf and getrlimit only read values.
        let (ticks, page, max_fds) = unsafe {
            let mut limit = libc::rlimit {
                rlim_cur: 0,
                rlim_max: 0,
            };
            libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit);
            (
                libc::sysconf(libc::_SC_CLK_TCK).max(1) as f64,
                libc::sysconf(libc::_SC_PAGESIZE).max(1) as u64,
                limit.rlim_cur,
            )
        };
        let boot = std::fs::read_to_string("/proc/stat")
            .ok()?
            .lines()
            .find_map(|l| l.strip_prefix("btime ")?.trim().parse::<u64>().ok())?;
        let open_fds = std::fs::read_dir("/proc/thread-self/fd").ok()?.count() as u64;
        Some(ProcessStat {
            cpu_seconds: (field(14)? + field(15)?) as f64 / ticks,
            resident_bytes: field(24)? * page,
            virtual_bytes: field(23)?,
            start_time_seconds: boot as f64 + field(22)? as f64 / ticks,
            threads: field(20)?,
            // The directory's own descriptor, open while it was read, is not counted.
            open_fds: open_fds.saturating_sub(1),
            max_fds,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_process_reads_itself() {
        let stat = ProcessStat::read().expect("/proc/self readable");
        assert!(stat.resident_bytes > 0);
        assert!(stat.threads >= 1);
        assert!(stat.open_fds >= 3, "stdio at least");
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs_f64();
        assert!(stat.start_time_seconds <= now + 1.0);
        assert!(stat.start_time_seconds > now - 24.0 * 3600.0);
    }

    #[test]
    fn every_grpc_code_has_a_name_at_its_number() {
        assert_eq!(CODES[tonic::Code::Ok as usize], "OK");
        assert_eq!(CODES[tonic::Code::NotFound as usize], "NotFound");
        assert_eq!(CODES[tonic::Code::Unavailable as usize], "Unavailable");
        assert_eq!(
            CODES[tonic::Code::Unauthenticated as usize],
            "Unauthenticated"
        );
    }
}
