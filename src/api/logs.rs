//! `toru.v1.LogService`: streaming plugin logs from the per-plugin sequenced logs.
//!
//! One producer task per plugin follows that plugin's log from the requested start point:
//! replayed records first (read from the files), then live ones, in batches of whatever is
//! ready. A client that reads slowly only makes its producers wait; their followers then
//! fall behind the live broadcast and catch up from the files, so nothing is lost and
//! nothing grows without bound. A jump in `seq` (records rotated away before they were
//! read) is sent as a gap.

use std::collections::HashMap;
use std::pin::Pin;

use futures::{FutureExt, Stream};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

use super::{checked_id, convert};
use crate::capture::PluginLog;
use crate::model::{LogLevel, LogRecord, LogStream};
use crate::pb;
use crate::pb::log_service_server::LogService;
use crate::supervisor::Supervisor;

/// Records per response at most.
const MAX_BATCH: usize = 500;
/// Responses buffered per stream before producers wait for the client.
const STREAM_BUFFER: usize = 16;

/// The `LogService` implementation.
pub struct LogApi {
    supervisor: Supervisor,
    /// Cancelled when the daemon shuts down, ending open streams.
    stop: CancellationToken,
}

impl LogApi {
    /// A service over `supervisor`; streams end when `stop` is cancelled.
    pub fn new(supervisor: Supervisor, stop: CancellationToken) -> Self {
        LogApi { supervisor, stop }
    }
}

/// What a producer sends.
#[derive(Clone)]
struct Filter {
    min_level: Option<LogLevel>,
    contains: String,
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
    format!("{plugin_id}:{seq}")
}

fn parse_cursor(text: &str) -> Result<(String, u64), Status> {
    let bad = || {
        Status::invalid_argument(format!(
            "after_cursors: {:?} is not a cursor; pass LogRecord.cursor back unchanged",
            text.chars().take(80).collect::<String>()
        ))
    };
    let (id, seq) = text.rsplit_once(':').ok_or_else(bad)?;
    if !toru_plugin_sdk::metadata::is_valid_id(id) {
        return Err(bad());
    }
    Ok((id.to_owned(), seq.parse().map_err(|_| bad())?))
}

type LogStreamOut = Pin<Box<dyn Stream<Item = Result<pb::StreamLogsResponse, Status>> + Send>>;

#[tonic::async_trait]
impl LogService for LogApi {
    type StreamLogsStream = LogStreamOut;

    async fn stream_logs(
        &self,
        request: Request<pb::StreamLogsRequest>,
    ) -> Result<Response<LogStreamOut>, Status> {
        let req = request.into_inner();
        let filter_pb = req.filter.unwrap_or_default();
        let min_level = pb::LogLevel::try_from(filter_pb.min_level).map_err(|_| {
            Status::invalid_argument(format!(
                "filter.min_level: unknown level {}",
                filter_pb.min_level
            ))
        })?;
        let filter = Filter {
            min_level: from_pb_level(min_level),
            contains: filter_pb.contains,
        };
        let ids: Vec<String> = if filter_pb.plugin_ids.is_empty() {
            self.supervisor
                .list()
                .iter()
                .map(|p| p.id().to_owned())
                .collect()
        } else {
            filter_pb.plugin_ids
        };
        let mut logs: Vec<(String, PluginLog)> = Vec::with_capacity(ids.len());
        for id in ids {
            let id = checked_id(&id)?.to_owned();
            let log = self.supervisor.plugin_log(&id)?;
            logs.push((id, log));
        }
        let mut cursors: HashMap<String, u64> = HashMap::new();
        if let Some(pb::stream_logs_request::Start::AfterCursors(list)) = &req.start {
            for text in &list.cursors {
                let (id, seq) = parse_cursor(text)?;
                cursors.insert(id, seq);
            }
        }
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
                Some(pb::stream_logs_request::Start::Since(ts)) => Start::Since(
                    time::OffsetDateTime::from_unix_timestamp_nanos(
                        i128::from(ts.seconds) * 1_000_000_000 + i128::from(ts.nanos),
                    )
                    .unwrap_or(time::OffsetDateTime::UNIX_EPOCH),
                ),
            }
        };
        let (tx, rx) = mpsc::channel(STREAM_BUFFER);
        for (id, log) in logs {
            let start = start_for(&log, &id);
            let upto = (!req.follow).then(|| log.records().last_seq());
            tokio::spawn(produce(
                id,
                log,
                start,
                upto,
                filter.clone(),
                tx.clone(),
                self.stop.clone(),
            ));
        }
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

/// Follows one plugin's log and sends its batches (and gaps) until `upto` (when not
/// following), the client goes away, or the daemon stops.
async fn produce(
    id: String,
    log: PluginLog,
    start: Start,
    upto: Option<u64>,
    filter: Filter,
    tx: mpsc::Sender<Result<pb::StreamLogsResponse, Status>>,
    stop: CancellationToken,
) {
    let records = log.records().clone();
    let after = match start {
        Start::After(seq) => seq,
        Start::Since(t) => {
            let r = records.clone();
            match tokio::task::spawn_blocking(move || r.seq_at(t)).await {
                Ok(Ok(seq)) => seq.saturating_sub(1),
                _ => records.last_seq(),
            }
        }
    };
    let mut expected = after + 1;
    if let Some(upto) = upto {
        read_until(&id, &records, after, upto, &filter, &tx).await;
        return;
    }
    let mut follower = records.follow(Some(after));
    let gap = |from: u64, to: u64| pb::StreamLogsResponse {
        records: Vec::new(),
        gap: Some(pb::LogGap {
            plugin_id: id.clone(),
            from_seq: from,
            to_seq: to,
        }),
    };
    loop {
        let first = tokio::select! {
            next = follower.next() => next,
            _ = stop.cancelled() => return,
            _ = tx.closed() => return,
        };
        let mut batch = Vec::new();
        let mut next = first;
        loop {
            let record = match next {
                Some(Ok(record)) => record,
                Some(Err(e)) => {
                    let _ = tx.send(Err(Status::internal(e.to_string()))).await;
                    return;
                }
                None => return,
            };
            if record.seq > expected {
                if !batch.is_empty() {
                    let out = pb::StreamLogsResponse {
                        records: std::mem::take(&mut batch),
                        gap: None,
                    };
                    if tx.send(Ok(out)).await.is_err() {
                        return;
                    }
                }
                if tx.send(Ok(gap(expected, record.seq - 1))).await.is_err() {
                    return;
                }
            }
            expected = record.seq + 1;
            if filter.keeps(&record) {
                batch.push(self::record(&id, &record));
            }
            if batch.len() >= MAX_BATCH {
                break;
            }
            match follower.next().now_or_never() {
                Some(more) => next = more,
                None => break,
            }
        }
        if !batch.is_empty() {
            let out = pb::StreamLogsResponse {
                records: batch,
                gap: None,
            };
            if tx.send(Ok(out)).await.is_err() {
                return;
            }
        }
    }
}

/// Sends the records after `after` up to `upto` read straight from the files (no live
/// following), with gaps where records were rotated away.
async fn read_until(
    id: &str,
    records: &crate::seqlog::SeqLog<LogRecord>,
    after: u64,
    upto: u64,
    filter: &Filter,
    tx: &mpsc::Sender<Result<pb::StreamLogsResponse, Status>>,
) {
    let mut expected = after + 1;
    while expected <= upto {
        let (log, from) = (records.clone(), expected - 1);
        let read = tokio::task::spawn_blocking(move || log.read_after(from, MAX_BATCH)).await;
        let batch = match read {
            Ok(Ok(batch)) if !batch.is_empty() => batch,
            Ok(Ok(_)) => return,
            Ok(Err(e)) => {
                let _ = tx.send(Err(Status::internal(e.to_string()))).await;
                return;
            }
            Err(e) => {
                let _ = tx.send(Err(Status::internal(e.to_string()))).await;
                return;
            }
        };
        let mut out = Vec::new();
        for r in batch.iter().filter(|r| r.seq <= upto) {
            if r.seq > expected {
                if !out.is_empty() {
                    let batch = pb::StreamLogsResponse {
                        records: std::mem::take(&mut out),
                        gap: None,
                    };
                    if tx.send(Ok(batch)).await.is_err() {
                        return;
                    }
                }
                let gap = pb::LogGap {
                    plugin_id: id.to_owned(),
                    from_seq: expected,
                    to_seq: r.seq - 1,
                };
                let gap = pb::StreamLogsResponse {
                    records: Vec::new(),
                    gap: Some(gap),
                };
                if tx.send(Ok(gap)).await.is_err() {
                    return;
                }
            }
            expected = r.seq + 1;
            if filter.keeps(r) {
                out.push(record(id, r));
            }
        }
        if batch.last().is_some_and(|r| r.seq > upto) {
            expected = upto + 1;
        }
        if !out.is_empty() {
            let batch = pb::StreamLogsResponse {
                records: out,
                gap: None,
            };
            if tx.send(Ok(batch)).await.is_err() {
                return;
            }
        }
    }
}
