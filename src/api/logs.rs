//! `toru.v1.LogService`: streaming plugin logs from the per-plugin sequenced logs.
//!
//! A stream follows each selected plugin's log from the requested start point: replayed
//! records first (read from the files), then live ones, in batches of whatever is ready. A
//! stream is pulled, never pushed: the next batch is read from the log only when the
//! transport asks for it, which tonic does only when HTTP/2 flow control lets it send. A
//! client that does not read therefore holds, per plugin it follows, one response in the
//! transport and what its follower already read (see [`STREAM_MEMORY`]), however fast the
//! plugin logs; its follower falls behind the live broadcast and catches up from the files
//! when the client reads again, so nothing is lost. A jump in `seq` (records rotated away
//! before they were read) is sent as a gap. This module knows nothing of how the logs are
//! captured or stored.

use crate::api::upgrade::Upgrading;
use std::collections::{HashMap, VecDeque};
use std::pin::Pin;

use futures::{Stream, StreamExt};
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

use super::{checked_ids_in, convert, truncate};
use crate::logs::capture::PluginLog;
use crate::logs::query;
use crate::model::{LogLevel, LogRecord, LogStream};
use crate::supervisor::Supervisor;
use crate::telemetry::metrics::{Lag, Metrics, SubscriptionKind};
use torud_api::pb;
use torud_api::pb::log_service_server::LogService;

/// Records per response at most.
const MAX_BATCH: usize = 4096;
/// Encoded bytes per response at most (a response always carries at least one record): small
/// enough that what waits in the transport for a client that does not read stays small,
/// large enough that a reader keeping up with a flood gets few responses.
const MAX_BATCH_BYTES: usize = 32 * 1024;

/// What one plugin's part of a stream whose client does not read holds at most, about: one
/// response in the transport (HTTP/2 buffers the response it was given when the client's
/// window closed, and tonic's encoder up to 32 KiB more), and the records its follower read
/// from the files but has not sent ([`crate::logs::seqlog::REPLAY_BYTES`]). Live records are shared
/// with the log's broadcast, whose backlog (about 16 MiB per log) every follower shares.
pub const STREAM_MEMORY: usize = MAX_BATCH_BYTES + 32 * 1024 + crate::logs::seqlog::REPLAY_BYTES;

/// What one record adds to a response: its encoded size, plus its field tag and length
/// prefix.
fn encoded_cost(record: &pb::LogRecord) -> usize {
    use prost::Message;
    let len = record.encoded_len();
    1 + prost::encoding::encoded_len_varint(len as u64) + len
}

/// The bytes of records a response may carry under a `max_message_bytes` limit: half of it,
/// leaving the rest for the page token and framing.
fn response_budget(max_message_bytes: usize) -> usize {
    max_message_bytes / 2
}

/// How long a following stream gathers records into a batch, from the batch's first record.
const LINGER: std::time::Duration = std::time::Duration::from_millis(2);

/// Turns one plugin's records, taken in seq order, into responses: batches of the records
/// the filter keeps, and a gap wherever `seq` jumps (records rotated away unread). Both the
/// following and the reading producers use it.
struct Batcher {
    id: String,
    filter: Filter,
    /// The seq the next record should have.
    expected: u64,
    records: Vec<pb::LogRecord>,
    /// Encoded bytes of `records`.
    bytes: usize,
}

impl Batcher {
    fn new(id: String, filter: Filter, after: u64) -> Self {
        Batcher {
            id,
            filter,
            expected: after + 1,
            records: Vec::new(),
            bytes: 0,
        }
    }

    /// Takes the next record. When its seq jumps, returns what must go out before it: the
    /// batch so far (if any) and the gap.
    fn push(&mut self, r: &LogRecord) -> Vec<pb::StreamLogsResponse> {
        let mut out = Vec::new();
        if r.seq > self.expected {
            out.extend(self.take());
            let gap = pb::LogGap {
                plugin_id: self.id.clone(),
                from_seq: self.expected,
                to_seq: r.seq - 1,
            };
            out.push(pb::StreamLogsResponse {
                records: Vec::new(),
                gap: Some(gap),
            });
        }
        self.expected = r.seq + 1;
        if self.filter.keeps(r) {
            let record = record(&self.id, r);
            self.bytes += encoded_cost(&record);
            self.records.push(record);
        }
        out
    }

    /// Whether the batch should go out now.
    fn full(&self) -> bool {
        self.records.len() >= MAX_BATCH || self.bytes >= self.filter.batch_bytes
    }

    /// The batch so far, if it holds any record.
    fn take(&mut self) -> Option<pb::StreamLogsResponse> {
        self.bytes = 0;
        (!self.records.is_empty()).then(|| pb::StreamLogsResponse {
            records: std::mem::take(&mut self.records),
            gap: None,
        })
    }
}

/// The `LogService` implementation.
pub struct LogApi {
    supervisor: Supervisor,
    /// Cancelled when the daemon shuts down, ending open streams.
    stop: CancellationToken,
    /// Set when they end for an upgrade: they end with UNAVAILABLE saying so.
    upgrading: Upgrading,
    /// The largest gRPC message (`--max-message-bytes`); pages and batches stay well under.
    max_message_bytes: usize,
    /// Where open subscriptions, their lag and the gaps sent are counted.
    metrics: Metrics,
}

impl LogApi {
    /// A service over `supervisor` whose responses fit `max_message_bytes`; streams end
    /// when `stop` is cancelled.
    pub fn new(
        supervisor: Supervisor,
        stop: CancellationToken,
        upgrading: Upgrading,
        max_message_bytes: usize,
        metrics: Metrics,
    ) -> Self {
        LogApi {
            supervisor,
            stop,
            upgrading,
            max_message_bytes,
            metrics,
        }
    }
}

/// What a producer sends, and in batches of what size.
#[derive(Clone)]
struct Filter {
    min_level: Option<LogLevel>,
    contains: String,
    /// Encoded bytes of records per response at most (at least one record is sent).
    batch_bytes: usize,
}

impl Filter {
    fn keeps(&self, r: &LogRecord) -> bool {
        self.min_level.is_none_or(|min| r.level >= min)
            && (self.contains.is_empty() || r.message.contains(&self.contains))
    }
}

/// Where a producer starts: right after this seq.
enum Start {
    After(u64),
    Since(time::OffsetDateTime),
}

fn level(l: LogLevel) -> pb::LogLevel {
    match l {
        LogLevel::Trace => pb::LogLevel::Trace,
        LogLevel::Debug => pb::LogLevel::Debug,
        LogLevel::Info => pb::LogLevel::Info,
        LogLevel::Warn => pb::LogLevel::Warn,
        LogLevel::Error => pb::LogLevel::Error,
    }
}

fn from_pb_level(l: pb::LogLevel) -> Option<LogLevel> {
    match l {
        pb::LogLevel::Unspecified => None,
        pb::LogLevel::Trace => Some(LogLevel::Trace),
        pb::LogLevel::Debug => Some(LogLevel::Debug),
        pb::LogLevel::Info => Some(LogLevel::Info),
        pb::LogLevel::Warn => Some(LogLevel::Warn),
        pb::LogLevel::Error => Some(LogLevel::Error),
    }
}

/// The protobuf record, with its cursor.
fn record(plugin_id: &str, r: &LogRecord) -> pb::LogRecord {
    pb::LogRecord {
        plugin_id: plugin_id.to_owned(),
        seq: r.seq,
        time: Some(convert::timestamp(r.time)),
        plugin_time: r.plugin_time.clone().unwrap_or_default(),
        stream: match r.stream {
            LogStream::Stdout => pb::LogStream::Stdout,
            LogStream::Stderr => pb::LogStream::Stderr,
            LogStream::Supervisor => pb::LogStream::Supervisor,
        } as i32,
        level: level(r.level) as i32,
        message: r.message.clone(),
        fields_json: if r.fields.is_empty() {
            String::new()
        } else {
            serde_json::Value::Object(r.fields.clone()).to_string()
        },
        pid: r.pid,
        continued: r.continued,
        cursor: cursor(plugin_id, r.seq),
    }
}

/// A cursor: `<plugin id>:<seq>`.
fn cursor(plugin_id: &str, seq: u64) -> String {
    // Built by hand: this runs for every record streamed, and `format!` costs more.
    let mut digits = itoa::Buffer::new();
    let seq = digits.format(seq);
    let mut out = String::with_capacity(plugin_id.len() + 1 + seq.len());
    out.push_str(plugin_id);
    out.push(':');
    out.push_str(seq);
    out
}

fn parse_cursor(text: &str) -> Result<(String, u64), Status> {
    let bad = || {
        Status::invalid_argument(format!(
            "after_cursors: {:?} is not a cursor; pass LogRecord.cursor back unchanged",
            truncate(text)
        ))
    };
    let (id, seq) = text.rsplit_once(':').ok_or_else(bad)?;
    if !toru_plugin_sdk::metadata::is_valid_id(id) {
        return Err(bad());
    }
    Ok((id.to_owned(), seq.parse().map_err(|_| bad())?))
}

type LogStreamOut = Pin<Box<dyn Stream<Item = Result<pb::StreamLogsResponse, Status>> + Send>>;

/// The selected plugins' ids and logs (all known plugins when `ids` is empty).
fn selected_logs(
    supervisor: &Supervisor,
    ids: Vec<String>,
) -> Result<Vec<(String, PluginLog)>, Status> {
    let ids: Vec<String> = if ids.is_empty() {
        supervisor
            .list()
            .iter()
            .map(|p| p.id().to_owned())
            .collect()
    } else {
        ids
    };
    checked_ids_in("filter.plugin_ids", &ids)?;
    let mut logs = Vec::with_capacity(ids.len());
    for id in ids {
        let log = supervisor.plugin_log(&id)?;
        logs.push((id, log));
    }
    Ok(logs)
}

fn filter_of(filter: &pb::LogFilter, batch_bytes: usize) -> Result<Filter, Status> {
    let min_level = pb::LogLevel::try_from(filter.min_level).map_err(|_| {
        Status::invalid_argument(format!(
            "filter.min_level: unknown level {}",
            filter.min_level
        ))
    })?;
    Ok(Filter {
        min_level: from_pb_level(min_level),
        contains: filter.contains.clone(),
        batch_bytes,
    })
}

/// A protobuf time, which must be one (years 0001–9999, nanos within a second), else
/// INVALID_ARGUMENT naming `field`. Any such time is a bound: one before the first record
/// or after the last (even beyond what the log's index holds, 1677–2262) just bounds nothing.
fn time_of(field: &str, ts: &prost_types::Timestamp) -> Result<time::OffsetDateTime, Status> {
    const MIN: i64 = -62_135_596_800;
    const MAX: i64 = 253_402_300_799;
    if !(MIN..=MAX).contains(&ts.seconds) || !(0..=999_999_999).contains(&ts.nanos) {
        return Err(Status::invalid_argument(format!(
            "{field}: {}s {}ns is not a time; seconds must be within years 0001-9999 \
             ({MIN} to {MAX}) and nanos within 0-999999999",
            ts.seconds, ts.nanos
        )));
    }
    let nanos = i128::from(ts.seconds) * 1_000_000_000 + i128::from(ts.nanos);
    time::OffsetDateTime::from_unix_timestamp_nanos(nanos)
        .map_err(|e| Status::invalid_argument(format!("{field}: {e}")))
}

/// A page token: which query it continues and, per plugin, the next seq to read.
#[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub(super) struct PageToken {
    /// [`query_fingerprint`] of the request that made it.
    query: String,
    next: std::collections::BTreeMap<String, u64>,
}

/// A log that cannot be read is the daemon's fault, not the caller's.
fn internal(e: crate::logs::seqlog::SeqLogError) -> Status {
    Status::internal(e.to_string())
}

#[cfg(test)]
impl PageToken {
    pub(super) fn for_test(query: String, next: std::collections::BTreeMap<String, u64>) -> Self {
        PageToken { query, next }
    }
}

/// What a page token is bound to: every field of a `QueryLogs` request but the page size
/// and the token, hashed (SHA-256, first 16 bytes in hex). A token used with other fields
/// would resume seqs meant for another query.
pub(super) fn query_fingerprint(req: &pb::QueryLogsRequest) -> String {
    use sha2::Digest;
    let filter = req.filter.clone().unwrap_or_default();
    let time = |t: &Option<prost_types::Timestamp>| t.as_ref().map(|t| (t.seconds, t.nanos));
    let fields = serde_json::json!([
        filter.plugin_ids,
        filter.min_level,
        filter.contains,
        time(&req.since),
        time(&req.until),
        req.after_seq,
        req.before_seq,
        req.newest_first,
    ]);
    let digest = sha2::Sha256::digest(fields.to_string().as_bytes());
    hex::encode(&digest[..16])
}

/// A `QueryLogs` page token as the caller sent it (`None` for the first page), checked to
/// belong to the query with `fingerprint`.
pub(super) fn decode_query_token(
    text: &str,
    fingerprint: &str,
) -> Result<Option<PageToken>, Status> {
    if text.is_empty() {
        return Ok(None);
    }
    let malformed =
        || Status::invalid_argument("page_token is malformed: pass next_page_token back unchanged");
    if text.len() > MAX_TOKEN_CHARS {
        return Err(malformed());
    }
    let bytes = hex::decode(text).map_err(|_| malformed())?;
    let token: PageToken = serde_json::from_slice(&bytes).map_err(|_| malformed())?;
    if token
        .next
        .keys()
        .any(|id| !toru_plugin_sdk::metadata::is_valid_id(id))
    {
        return Err(malformed());
    }
    if token.query != fingerprint {
        return Err(Status::invalid_argument(
            "page_token belongs to another query: pass it only with the same filter, since, \
             until, after_seq, before_seq and newest_first as the request that returned it \
             (page_size may change), or leave it empty to start again",
        ));
    }
    Ok(Some(token))
}

/// The longest page token accepted (a token names each plugin of the query once).
const MAX_TOKEN_CHARS: usize = 1024 * 1024;

const DEFAULT_PAGE: usize = 100;
const MAX_PAGE: i32 = 1000;

#[tonic::async_trait]
impl LogService for LogApi {
    async fn query_logs(
        &self,
        request: Request<pb::QueryLogsRequest>,
    ) -> Result<Response<pb::QueryLogsResponse>, Status> {
        let req = request.into_inner();
        if !(0..=MAX_PAGE).contains(&req.page_size) {
            return Err(Status::invalid_argument(format!(
                "page_size must be between 0 and {MAX_PAGE}, got {}",
                req.page_size
            )));
        }
        let limit = if req.page_size == 0 {
            DEFAULT_PAGE
        } else {
            req.page_size as usize
        };
        let fingerprint = query_fingerprint(&req);
        let filter_pb = req.filter.unwrap_or_default();
        let budget = query::Budget {
            records: limit,
            bytes: response_budget(self.max_message_bytes),
            scanned: query::MAX_SCANNED,
        };
        let filter = filter_of(&filter_pb, budget.bytes)?;
        if (req.after_seq > 0 || req.before_seq > 0) && filter_pb.plugin_ids.len() != 1 {
            return Err(Status::invalid_argument(
                "after_seq/before_seq: seqs are per plugin; name exactly one plugin in filter.plugin_ids",
            ));
        }
        let token = decode_query_token(&req.page_token, &fingerprint)?;
        let logs = selected_logs(&self.supervisor, filter_pb.plugin_ids)?;
        let bounds = query::Bounds {
            since: req
                .since
                .as_ref()
                .map(|t| time_of("since", t))
                .transpose()?,
            until: req
                .until
                .as_ref()
                .map(|t| time_of("until", t))
                .transpose()?,
            after_seq: req.after_seq,
            before_seq: req.before_seq,
        };
        let newest_first = req.newest_first;
        let work = move || -> Result<pb::QueryLogsResponse, Status> {
            let mut sources = Vec::with_capacity(logs.len());
            for (id, log) in &logs {
                let resume = match &token {
                    None => None,
                    // A plugin the token does not name has nothing left.
                    Some(t) => match t.next.get(id) {
                        Some(next) => Some(*next),
                        None => continue,
                    },
                };
                sources.push(
                    query::Source::open(id.clone(), log, &bounds, resume, newest_first)
                        .map_err(internal)?,
                );
            }
            let keep = |id: &str, r: &LogRecord| filter.keeps(r).then(|| record(id, r));
            let (records, resume) = query::page(sources, &budget, newest_first, keep, encoded_cost)
                .map_err(internal)?;
            let next_page_token = match resume {
                Some(next) => hex::encode(
                    serde_json::to_vec(&PageToken {
                        query: fingerprint,
                        next,
                    })
                    .expect("token serialises"),
                ),
                None => String::new(),
            };
            Ok(pb::QueryLogsResponse {
                records,
                next_page_token,
            })
        };
        let response = tokio::task::spawn_blocking(work)
            .await
            .map_err(|e| Status::internal(e.to_string()))??;
        Ok(Response::new(response))
    }

    type StreamLogsStream = LogStreamOut;

    async fn stream_logs(
        &self,
        request: Request<pb::StreamLogsRequest>,
    ) -> Result<Response<LogStreamOut>, Status> {
        let req = request.into_inner();
        let filter_pb = req.filter.unwrap_or_default();
        let batch_bytes = MAX_BATCH_BYTES.min(response_budget(self.max_message_bytes));
        let filter = filter_of(&filter_pb, batch_bytes)?;
        let logs = selected_logs(&self.supervisor, filter_pb.plugin_ids)?;
        let mut cursors: HashMap<String, u64> = HashMap::new();
        if let Some(pb::stream_logs_request::Start::AfterCursors(list)) = &req.start {
            for text in &list.cursors {
                let (id, seq) = parse_cursor(text)?;
                cursors.insert(id, seq);
            }
        }
        let since = match &req.start {
            Some(pb::stream_logs_request::Start::Since(ts)) => Some(time_of("since", ts)?),
            _ => None,
        };
        let start_for = |log: &PluginLog, id: &str| -> Start {
            let last = log.records().last_seq();
            match &req.start {
                None => Start::After(last),
                Some(pb::stream_logs_request::Start::Tail(n)) => {
                    Start::After(last.saturating_sub(u64::from(*n)))
                }
                Some(pb::stream_logs_request::Start::AfterCursors(_)) => {
                    Start::After(cursors.get(id).copied().unwrap_or(last).min(last))
                }
                Some(pb::stream_logs_request::Start::Since(_)) => {
                    Start::Since(since.expect("checked above"))
                }
            }
        };
        // A following stream counts as a subscription for as long as it is open.
        let subscription = req
            .follow
            .then(|| self.metrics.subscribe(SubscriptionKind::Logs));
        let feeds: Vec<LogStreamOut> = logs
            .into_iter()
            .map(|(id, log)| {
                let start = start_for(&log, &id);
                let upto = (!req.follow).then(|| log.records().last_seq());
                let records = log.records().clone();
                let meter = FeedMeter {
                    metrics: self.metrics.clone(),
                    lag: subscription
                        .as_ref()
                        .map(|s| s.lag_gauge(move || records.last_seq())),
                };
                Feed::new(id, &log, start, upto, filter.clone(), meter).into_stream()
            })
            .collect();
        let stop = self.stop.clone();
        let upgrading = self.upgrading.clone();
        // A stream ended by an upgrade says so last (checked once the feeds have ended).
        let upgrade_note = futures::stream::once(async move {
            stop.is_cancelled()
                .then(|| upgrading.status())
                .flatten()
                .map(Err)
        })
        .filter_map(futures::future::ready);
        let merged = futures::stream::select_all(feeds)
            .take_until(self.stop.clone().cancelled_owned())
            .chain(upgrade_note)
            .map(move |response| {
                let _open = &subscription;
                response
            });
        Ok(Response::new(Box::pin(merged)))
    }
}

/// One plugin's part of a stream: its records from the start point, in batches and gaps,
/// each read from the log only when the stream is asked for its next response.
struct Feed {
    records: crate::logs::seqlog::SeqLog<LogRecord>,
    source: Source,
    batcher: Batcher,
    /// Responses made and not yet handed out (a batch cut short by a gap, and the gap).
    queued: VecDeque<pb::StreamLogsResponse>,
    /// Nothing more comes after `queued`.
    finished: bool,
    meter: FeedMeter,
}

/// What a feed reports to the metrics: each gap it sends, and (following) its lag.
struct FeedMeter {
    metrics: Metrics,
    lag: Option<Lag>,
}

/// Where a feed takes its records from.
enum Source {
    /// Not opened yet (finding a start time reads the files).
    Start(Start, Option<u64>),
    /// Following the log, live once caught up.
    Follow(Follower),
    /// Reading the files up to this seq, then ending.
    Read(u64),
}

type Follower = crate::logs::seqlog::Follower<LogRecord>;

impl Feed {
    fn new(
        id: String,
        log: &PluginLog,
        start: Start,
        upto: Option<u64>,
        filter: Filter,
        meter: FeedMeter,
    ) -> Self {
        Feed {
            records: log.records().clone(),
            source: Source::Start(start, upto),
            batcher: Batcher::new(id, filter, 0),
            queued: VecDeque::new(),
            finished: false,
            meter,
        }
    }

    /// The feed as a stream that ends after an error.
    fn into_stream(self) -> LogStreamOut {
        Box::pin(futures::stream::unfold(Some(self), |feed| async move {
            let mut feed = feed?;
            match feed.next().await? {
                Ok(response) => Some((Ok(response), Some(feed))),
                Err(status) => Some((Err(status), None)),
            }
        }))
    }

    /// The next response; `None` when the feed has ended.
    async fn next(&mut self) -> Option<Result<pb::StreamLogsResponse, Status>> {
        loop {
            if let Some(response) = self.queued.pop_front() {
                if response.gap.is_some() {
                    self.meter.metrics.log_gap(&self.batcher.id);
                }
                return Some(Ok(response));
            }
            if self.finished {
                return None;
            }
            let made = match &mut self.source {
                Source::Start(..) => self.open().await,
                Source::Follow(follower) => {
                    let made = follow_batch(follower, &mut self.batcher, &mut self.queued).await;
                    if let Some(lag) = &self.meter.lag {
                        lag.sent(self.batcher.expected - 1);
                    }
                    made
                }
                Source::Read(upto) => {
                    let upto = *upto;
                    read_batch(&self.records, upto, &mut self.batcher, &mut self.queued).await
                }
            };
            match made {
                Ok(more) => self.finished = !more,
                Err(status) => {
                    self.finished = true;
                    return Some(Err(status));
                }
            }
        }
    }

    /// Finds the start seq and begins following or reading from there.
    async fn open(&mut self) -> Result<bool, Status> {
        let Source::Start(start, upto) = &self.source else {
            return Ok(true);
        };
        let upto = *upto;
        let after = match *start {
            Start::After(seq) => seq,
            Start::Since(t) => {
                let r = self.records.clone();
                match tokio::task::spawn_blocking(move || r.seq_at(t)).await {
                    Ok(Ok(seq)) => seq.saturating_sub(1),
                    _ => self.records.last_seq(),
                }
            }
        };
        self.batcher.expected = after + 1;
        self.source = match upto {
            Some(upto) => Source::Read(upto),
            None => Source::Follow(self.records.follow(Some(after))),
        };
        Ok(true)
    }
}

/// Gathers one batch from a follower into `out` (after any gap before it); false when the
/// log is gone.
async fn follow_batch(
    follower: &mut Follower,
    batcher: &mut Batcher,
    out: &mut VecDeque<pb::StreamLogsResponse>,
) -> Result<bool, Status> {
    let mut next = follower.next().await;
    // A batch goes out when full or LINGER after its first record, whichever is first.
    let deadline = tokio::time::Instant::now() + LINGER;
    let mut more = true;
    loop {
        let record = match next {
            Some(Ok(record)) => record,
            Some(Err(e)) => return Err(Status::internal(e.to_string())),
            None => {
                more = false;
                break;
            }
        };
        let cut = batcher.push(&record);
        let gap = !cut.is_empty();
        out.extend(cut);
        if gap || batcher.full() {
            break;
        }
        // Linger briefly for more: many small responses cost more than they save.
        match follower.try_next() {
            Some(record) => next = Some(Ok(record)),
            // A file read is due: send what we have rather than abandon the read at the
            // deadline (the next round waits for it in full).
            None if follower.replaying() => break,
            None => match tokio::time::timeout_at(deadline, follower.next()).await {
                Ok(record) => next = record,
                Err(_) => break,
            },
        }
    }
    out.extend(batcher.take());
    Ok(more)
}

/// Reads the next records up to `upto` straight from the files (no live following) into
/// `out`, with gaps where records were rotated away; false once `upto` is reached.
async fn read_batch(
    records: &crate::logs::seqlog::SeqLog<LogRecord>,
    upto: u64,
    batcher: &mut Batcher,
    out: &mut VecDeque<pb::StreamLogsResponse>,
) -> Result<bool, Status> {
    if batcher.expected > upto {
        return Ok(false);
    }
    let (log, from) = (records.clone(), batcher.expected - 1);
    let batch = tokio::task::spawn_blocking(move || {
        log.read_after_within(from, MAX_BATCH, crate::logs::seqlog::REPLAY_BYTES)
    })
    .await
    .map_err(|e| Status::internal(e.to_string()))?
    .map_err(|e| Status::internal(e.to_string()))?;
    if batch.is_empty() {
        return Ok(false);
    }
    for r in batch.iter().filter(|r| r.seq <= upto) {
        out.extend(batcher.push(r));
        if batcher.full() {
            out.extend(batcher.take());
        }
    }
    if batch.last().is_some_and(|r| r.seq > upto) {
        batcher.expected = upto + 1;
    }
    out.extend(batcher.take());
    Ok(batcher.expected <= upto)
}
