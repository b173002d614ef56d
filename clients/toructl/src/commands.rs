//! One function per `toructl` command: build the request, call the daemon, print the
//! answer as a table or JSON (`render.rs`). gRPC errors become one line naming the status
//! code and the daemon's message.

use std::io::Write;
use std::process::ExitCode;
use std::time::Duration;

use serde_json::{json, Value};
use tonic::{Code, Status};
use torud_api::pb;
use torud_api::pb::kv_service_client::KvServiceClient;
use torud_api::pb::log_service_client::LogServiceClient;
use torud_api::pb::plugin_service_client::PluginServiceClient;

use crate::connect::Conn;
use crate::render;
use crate::{CallArgs, EventsArgs, HealthArgs, LogsArgs, Output};

type Result<T = ExitCode> = std::result::Result<T, String>;

/// Writes to stdout; a closed stdout (`toructl logs -f | head`) ends toructl quietly.
pub(crate) fn emit(bytes: &[u8]) {
    let mut out = std::io::stdout().lock();
    if out.write_all(bytes).and_then(|()| out.flush()).is_err() {
        std::process::exit(0);
    }
}

/// `println!` through [`emit`].
macro_rules! outln {
    ($($arg:tt)*) => { emit(format!("{}\n", format_args!($($arg)*)).as_bytes()) };
}

/// `print!` through [`emit`].
macro_rules! out {
    ($($arg:tt)*) => { emit(format!($($arg)*).as_bytes()) };
}

/// The one-line form of a gRPC error, with a hint when credentials are the problem.
pub(crate) fn status_line(s: Status) -> String {
    let code = match s.code() {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    };
    let hint = match s.code() {
        Code::Unauthenticated => {
            " (give a token with --token or TORUD_TOKEN, or the daemon's --data-dir)"
        }
        Code::PermissionDenied => " (this needs the admin token, not the read-only one)",
        _ => "",
    };
    let message = s.message().replace('\n', " ");
    format!("{code}: {message}{hint}")
}

/// Prints a JSON document (pretty) or a line of JSON (for streams).
pub(crate) fn print_json(v: &Value, pretty: bool) {
    let text = if pretty {
        serde_json::to_string_pretty(v)
    } else {
        serde_json::to_string(v)
    };
    outln!("{}", text.unwrap_or_default());
}

fn plugins(conn: &Conn) -> PluginServiceClient<tonic::transport::Channel> {
    PluginServiceClient::new(conn.channel.clone())
}

/// `plugins list`: every page.
pub async fn plugins_list(conn: &Conn, out: Output) -> Result {
    let mut client = plugins(conn);
    let mut all = Vec::new();
    let mut skipped = Vec::new();
    let mut page_token = String::new();
    loop {
        let req = pb::ListPluginsRequest {
            page_size: 1000,
            page_token,
        };
        let resp = client
            .list_plugins(conn.unary(req))
            .await
            .map_err(status_line)?
            .into_inner();
        all.extend(resp.plugins);
        skipped.extend(resp.skipped);
        if resp.next_page_token.is_empty() {
            break;
        }
        page_token = resp.next_page_token;
    }
    match out {
        Output::Json => print_json(
            &json!({
                "plugins": all.iter().map(render::plugin_json).collect::<Vec<_>>(),
                "skipped": skipped.iter().map(render::skipped_json).collect::<Vec<_>>(),
            }),
            true,
        ),
        Output::Table => {
            out!("{}", render::plugins_table(&all));
            for s in &skipped {
                outln!(
                    "skipped {}: {}",
                    render::escape(&s.path),
                    render::escape(&s.reason)
                );
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn show_plugin(out: Output, p: Option<pb::Plugin>) -> Result {
    let p = p.ok_or("the daemon answered without a plugin")?;
    match out {
        Output::Json => print_json(&render::plugin_json(&p), true),
        Output::Table => out!("{}", render::plugin_details(&p)),
    }
    Ok(ExitCode::SUCCESS)
}

/// `plugins get ID`.
pub async fn plugins_get(conn: &Conn, out: Output, plugin_id: String) -> Result {
    let req = conn.unary(pb::GetPluginRequest { plugin_id });
    let resp = plugins(conn).get_plugin(req).await.map_err(status_line)?;
    show_plugin(out, resp.into_inner().plugin)
}

/// `plugins enable ID`.
pub async fn plugins_enable(conn: &Conn, out: Output, plugin_id: String) -> Result {
    let req = conn.unary(pb::EnablePluginRequest { plugin_id });
    let resp = plugins(conn)
        .enable_plugin(req)
        .await
        .map_err(status_line)?;
    show_plugin(out, resp.into_inner().plugin)
}

/// `plugins disable ID`.
pub async fn plugins_disable(conn: &Conn, out: Output, plugin_id: String) -> Result {
    let req = conn.unary(pb::DisablePluginRequest { plugin_id });
    let resp = plugins(conn)
        .disable_plugin(req)
        .await
        .map_err(status_line)?;
    show_plugin(out, resp.into_inner().plugin)
}

/// `plugins restart ID`.
pub async fn plugins_restart(conn: &Conn, out: Output, plugin_id: String) -> Result {
    let req = conn.unary(pb::RestartPluginRequest { plugin_id });
    let resp = plugins(conn)
        .restart_plugin(req)
        .await
        .map_err(status_line)?;
    show_plugin(out, resp.into_inner().plugin)
}

/// `plugins rescan`.
pub async fn plugins_rescan(conn: &Conn, out: Output) -> Result {
    let req = conn.unary(pb::RescanPluginsRequest {});
    let r = plugins(conn)
        .rescan_plugins(req)
        .await
        .map_err(status_line)?
        .into_inner();
    match out {
        Output::Json => print_json(
            &json!({
                "added": r.added, "removed": r.removed, "updated": r.updated,
                "skipped": r.skipped.iter().map(render::skipped_json).collect::<Vec<_>>(),
            }),
            true,
        ),
        Output::Table => {
            for (what, ids) in [
                ("added", &r.added),
                ("removed", &r.removed),
                ("updated", &r.updated),
            ] {
                let list = if ids.is_empty() {
                    "-".to_owned()
                } else {
                    ids.join(", ")
                };
                outln!("{what}: {}", render::escape(&list));
            }
            for s in &r.skipped {
                outln!(
                    "skipped {}: {}",
                    render::escape(&s.path),
                    render::escape(&s.reason)
                );
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn kv(conn: &Conn) -> KvServiceClient<tonic::transport::Channel> {
    KvServiceClient::new(conn.channel.clone())
}

/// `kv get ID KEY`: the value on stdout; a missing key exits 1 (with a line on stderr).
pub async fn kv_get(conn: &Conn, out: Output, plugin_id: String, key: String) -> Result {
    let req = conn.unary(pb::GetValueRequest {
        plugin_id: plugin_id.clone(),
        key: key.clone(),
    });
    let r = kv(conn)
        .get_value(req)
        .await
        .map_err(status_line)?
        .into_inner();
    match out {
        Output::Json => print_json(&json!({ "found": r.found, "value": r.value }), true),
        Output::Table if r.found => outln!("{}", render::escape_text(&r.value)),
        Output::Table => eprintln!("toructl: {plugin_id} has no key {key:?}"),
    }
    Ok(if r.found {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// `kv set ID KEY VALUE`.
pub async fn kv_set(
    conn: &Conn,
    out: Output,
    plugin_id: String,
    key: String,
    value: String,
) -> Result {
    let req = conn.unary(pb::SetValueRequest {
        plugin_id,
        key,
        value,
    });
    kv(conn).set_value(req).await.map_err(status_line)?;
    if out == Output::Json {
        print_json(&json!({}), true);
    }
    Ok(ExitCode::SUCCESS)
}

/// `kv delete ID KEY`.
pub async fn kv_delete(conn: &Conn, out: Output, plugin_id: String, key: String) -> Result {
    let req = conn.unary(pb::DeleteValueRequest { plugin_id, key });
    let r = kv(conn)
        .delete_value(req)
        .await
        .map_err(status_line)?
        .into_inner();
    match out {
        Output::Json => print_json(&json!({ "existed": r.existed }), true),
        Output::Table => outln!(
            "{}",
            if r.existed {
                "deleted"
            } else {
                "deleted (the plugin did not say whether it existed)"
            }
        ),
    }
    Ok(ExitCode::SUCCESS)
}

/// A call's body for people: text with its control characters escaped (line breaks and tabs
/// kept), or a note for a body that is not UTF-8 (`-o json` gives it as hex).
fn body_text(body: &[u8]) -> String {
    match std::str::from_utf8(body) {
        Ok(text) => render::escape_text(text).into_owned(),
        Err(_) => format!(
            "({} bytes that are not UTF-8 text; use -o json to get them as hex)",
            body.len()
        ),
    }
}

/// `call ID PATH`: curl-like output (status, headers, blank line, body) or JSON.
pub async fn call(conn: &Conn, out: Output, args: CallArgs) -> Result {
    let body = match (&args.data, &args.data_file) {
        (Some(d), _) => d.clone().into_bytes(),
        (None, Some(p)) if p.as_os_str() == "-" => {
            let mut buf = Vec::new();
            std::io::Read::read_to_end(&mut std::io::stdin(), &mut buf)
                .map_err(|e| format!("cannot read the body from stdin: {e}"))?;
            buf
        }
        (None, Some(p)) => std::fs::read(p)
            .map_err(|e| format!("cannot read the body file {}: {e}", p.display()))?,
        (None, None) => Vec::new(),
    };
    let mut headers = Vec::new();
    for h in &args.headers {
        let (name, value) = h
            .split_once(':')
            .ok_or_else(|| format!("header {h:?} is not \"name: value\""))?;
        headers.push(pb::Header {
            name: name.trim().to_owned(),
            value: value.trim().to_owned(),
        });
    }
    let req = conn.unary(pb::CallPluginRequest {
        plugin_id: args.id,
        method: args.method,
        path: args.path,
        headers,
        body,
    });
    let r = plugins(conn)
        .call_plugin(req)
        .await
        .map_err(status_line)?
        .into_inner();
    match out {
        Output::Json => {
            let body = match std::str::from_utf8(&r.body) {
                Ok(text) => json!({ "body": text }),
                Err(_) => json!({ "body_hex": hex::encode(&r.body) }),
            };
            let mut v = json!({
                "status": r.status,
                "headers": r.headers.iter().map(|h| json!({"name": h.name, "value": h.value})).collect::<Vec<_>>(),
            });
            v.as_object_mut()
                .unwrap()
                .extend(body.as_object().unwrap().clone());
            print_json(&v, true);
        }
        Output::Table => {
            let mut all = format!("HTTP {}\n", r.status);
            for h in &r.headers {
                let (name, value) = (render::escape(&h.name), render::escape(&h.value));
                all.push_str(&format!("{name}: {value}\n"));
            }
            all.push('\n');
            all.push_str(&body_text(&r.body));
            if !all.ends_with('\n') {
                all.push('\n');
            }
            emit(all.as_bytes());
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn parse_level(text: &str) -> Result<pb::LogLevel> {
    Ok(match text.to_ascii_lowercase().as_str() {
        "trace" => pb::LogLevel::Trace,
        "debug" => pb::LogLevel::Debug,
        "info" => pb::LogLevel::Info,
        "warn" | "warning" => pb::LogLevel::Warn,
        "error" => pb::LogLevel::Error,
        _ => {
            return Err(format!(
                "--level {text:?} is not one of trace, debug, info, warn, error"
            ))
        }
    })
}

/// An RFC 3339 time, or an age ("10m") before now.
fn parse_since(text: &str) -> Result<prost_types::Timestamp> {
    use time::format_description::well_known::Rfc3339;
    let t = match time::OffsetDateTime::parse(text, &Rfc3339) {
        Ok(t) => t,
        Err(_) => {
            let age = humantime::parse_duration(text).map_err(|_| {
                format!("--since {text:?} is neither an RFC 3339 time nor an age like 10m")
            })?;
            time::OffsetDateTime::now_utc() - age
        }
    };
    Ok(torud_api::timestamp(t))
}

/// `logs [IDS] [-f] [--tail N | --since T | --after CURSOR...] [--level L] [--grep TEXT]`.
pub async fn logs(conn: &Conn, out: Output, args: LogsArgs) -> Result {
    use pb::stream_logs_request::Start;
    let min_level = match &args.level {
        Some(l) => parse_level(l)? as i32,
        None => 0,
    };
    let start = if !args.after.is_empty() {
        Start::AfterCursors(pb::Cursors {
            cursors: args.after.clone(),
        })
    } else if let Some(since) = &args.since {
        Start::Since(parse_since(since)?)
    } else {
        Start::Tail(args.tail.unwrap_or(20))
    };
    let filter = pb::LogFilter {
        plugin_ids: args.ids,
        min_level,
        contains: args.grep.unwrap_or_default(),
    };
    // With -f, a stream the daemon ends (an upgrade: UNAVAILABLE) or that breaks resumes
    // right after the last record of each plugin, within RESUME_WINDOW.
    let mut cursors: std::collections::BTreeMap<String, String> = std::collections::BTreeMap::new();
    let mut resume = Resume::new(args.follow);
    loop {
        let start = if cursors.is_empty() {
            start.clone()
        } else {
            Start::AfterCursors(pb::Cursors {
                cursors: cursors.values().cloned().collect(),
            })
        };
        let req = conn.stream(pb::StreamLogsRequest {
            filter: Some(filter.clone()),
            start: Some(start),
            follow: args.follow,
        });
        let opened = LogServiceClient::new(conn.channel.clone())
            .stream_logs(req)
            .await;
        let mut stream = match opened {
            Ok(stream) => stream.into_inner(),
            Err(status) => {
                resume.after(status).await?;
                continue;
            }
        };
        resume.reset();
        loop {
            let batch = match stream.message().await {
                Ok(Some(batch)) => batch,
                Ok(None) if !args.follow => return Ok(ExitCode::SUCCESS),
                Ok(None) => return Ok(ExitCode::SUCCESS),
                Err(status) => {
                    resume.after(status).await?;
                    break;
                }
            };
            if let Some(g) = &batch.gap {
                eprintln!(
                    "toructl: {}: records {} to {} were rotated away before they could be sent",
                    render::escape(&g.plugin_id),
                    g.from_seq,
                    g.to_seq
                );
                cursors.insert(g.plugin_id.clone(), format!("{}:{}", g.plugin_id, g.to_seq));
            }
            let mut lines = String::new();
            for r in &batch.records {
                match out {
                    Output::Json => lines
                        .push_str(&serde_json::to_string(&render::log_json(r)).unwrap_or_default()),
                    Output::Table => lines.push_str(&render::log_line(r)),
                }
                lines.push('\n');
                cursors.insert(r.plugin_id.clone(), r.cursor.clone());
            }
            emit(lines.as_bytes());
        }
    }
}

/// How long a follower keeps trying to resume a stream the daemon ended (an upgrade) or
/// that broke, before it gives up with the error.
const RESUME_WINDOW: Duration = Duration::from_secs(30);

/// When a follower resumes: after UNAVAILABLE (the daemon upgrading, or a connection lost),
/// backing off from 50 ms to 1 s, for at most [`RESUME_WINDOW`] without a stream opened.
struct Resume {
    follow: bool,
    /// Say nothing on stderr when resuming.
    quiet: bool,
    since: Option<tokio::time::Instant>,
    backoff: Duration,
}

impl Resume {
    fn new(follow: bool) -> Self {
        Resume {
            follow,
            quiet: false,
            since: None,
            backoff: Duration::from_millis(50),
        }
    }

    /// A stream opened: the window starts again at the next failure.
    fn reset(&mut self) {
        self.since = None;
        self.backoff = Duration::from_millis(50);
    }

    /// After `status` ended a stream: waits before resuming, or gives the error back when
    /// it is not one to resume after (or the window is over).
    async fn after(&mut self, status: tonic::Status) -> std::result::Result<(), String> {
        let since = *self.since.get_or_insert_with(tokio::time::Instant::now);
        // UNAVAILABLE: the daemon upgrading, or unreachable; CANCELLED and UNKNOWN: the
        // connection went away under the stream (toructl itself cancels nothing); INTERNAL
        // "GoAway": the request raced the old image's GOAWAY and never reached it.
        let went_away =
            status.code() == tonic::Code::Internal && format!("{status:?}").contains("GoAway");
        let resumable = self.follow
            && (went_away
                || matches!(
                    status.code(),
                    tonic::Code::Unavailable | tonic::Code::Cancelled | tonic::Code::Unknown
                ));
        if !resumable || since.elapsed() >= RESUME_WINDOW {
            return Err(status_line(status));
        }
        if self.backoff == Duration::from_millis(50) && !self.quiet {
            eprintln!("toructl: {}; resuming", status.message());
        }
        tokio::time::sleep(self.backoff).await;
        self.backoff = (self.backoff * 2).min(Duration::from_secs(1));
        Ok(())
    }
}

/// How long `events` without `-f` waits for one more stored event before it stops: the
/// stream replays stored events at once and then only follows, with no marker between.
const REPLAY_IDLE: Duration = Duration::from_secs(1);

/// How long `events` without `-f` waits for the first event (a busy daemon may take a
/// moment to start the replay).
const REPLAY_START: Duration = Duration::from_secs(5);

/// `events [IDS] [-f] [--after SEQ]`.
pub async fn events(conn: &Conn, out: Output, args: EventsArgs) -> Result {
    // With -f, resumed after the last event seen (an upgrade ends the stream).
    let mut feed = EventFeed::new(conn, args.after, args.ids, Resume::new(args.follow));
    let mut seen = 0u64;
    loop {
        let next = if args.follow {
            feed.next().await?
        } else {
            let wait = if seen == 0 { REPLAY_START } else { REPLAY_IDLE };
            seen += 1;
            match tokio::time::timeout(wait, feed.next()).await {
                Ok(next) => next?,
                Err(_) => return Ok(ExitCode::SUCCESS),
            }
        };
        let Some(resp) = next else {
            return Ok(ExitCode::SUCCESS);
        };
        if let Some(e) = resp.event {
            match out {
                Output::Json => print_json(&render::event_json(&e), false),
                Output::Table => outln!("{}", render::event_line(&e)),
            }
        } else if let Some(gap) = resp.gap {
            print_gap(out, &gap);
        }
    }
}

/// `WatchEvents` from a seq, opened again right after the last event (or gap) received when
/// the stream ends with an error `resume` resumes after.
struct EventFeed<'a> {
    conn: &'a Conn,
    after: u64,
    ids: Vec<String>,
    resume: Resume,
    stream: Option<tonic::Streaming<pb::WatchEventsResponse>>,
}

impl<'a> EventFeed<'a> {
    fn new(conn: &'a Conn, after: u64, ids: Vec<String>, resume: Resume) -> Self {
        EventFeed {
            conn,
            after,
            ids,
            resume,
            stream: None,
        }
    }

    /// The next message; `None` when the stream ended cleanly (`reopen` to go on).
    async fn next(&mut self) -> std::result::Result<Option<pb::WatchEventsResponse>, String> {
        loop {
            let stream = match &mut self.stream {
                Some(stream) => stream,
                None => {
                    let req = self.conn.stream(pb::WatchEventsRequest {
                        after_seq: Some(self.after),
                        plugin_ids: self.ids.clone(),
                    });
                    match plugins(self.conn).watch_events(req).await {
                        Ok(stream) => {
                            self.resume.reset();
                            self.stream.insert(stream.into_inner())
                        }
                        Err(status) => {
                            self.resume.after(status).await?;
                            continue;
                        }
                    }
                }
            };
            match stream.message().await {
                Ok(Some(resp)) => {
                    let last = resp.event.as_ref().map(|e| e.seq);
                    let last = last.or(resp.gap.as_ref().map(|g| g.last_seq));
                    self.after = self.after.max(last.unwrap_or_default());
                    return Ok(Some(resp));
                }
                Ok(None) => return Ok(None),
                Err(status) => {
                    self.stream = None;
                    self.resume.after(status).await?;
                }
            }
        }
    }

    /// Opens the stream again at the next [`EventFeed::next`].
    fn reopen(&mut self) {
        self.stream = None;
    }
}

/// `daemon upgrade [--binary PATH] [--wait D]`: hands the daemon over to a new binary and
/// waits (at most `wait`) for the outcome event. Exits 1 when the upgrade failed (rolled
/// back) or no outcome came in time.
pub async fn daemon_upgrade(
    conn: &Conn,
    out: Output,
    binary: Option<String>,
    wait: Duration,
) -> Result {
    use torud_api::pb::config_service_client::ConfigServiceClient;
    let began = ConfigServiceClient::new(conn.channel.clone())
        .upgrade_daemon(conn.unary(pb::UpgradeDaemonRequest {
            binary: binary.unwrap_or_default(),
        }))
        .await
        .map_err(status_line)?
        .into_inner();
    if out == Output::Table {
        outln!(
            "upgrading {} -> {} ({}); waiting for the new image to take over",
            render::escape(&began.from_version),
            render::escape(&began.to_version),
            render::escape(&began.binary)
        );
    }
    let outcome = tokio::time::timeout(wait, upgrade_outcome(conn, began.upgrading_seq)).await;
    let event = match outcome {
        Ok(event) => event?,
        Err(_) => {
            return Err(format!(
                "no outcome within {}: see `toructl events --after {}`",
                humantime::format_duration(wait),
                began.upgrading_seq
            ))
        }
    };
    let upgraded = event.kind == pb::EventKind::DaemonUpgraded as i32;
    match out {
        Output::Json => print_json(&render::event_json(&event), true),
        Output::Table => outln!("{}", render::event_line(&event)),
    }
    Ok(if upgraded {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// The first `DAEMON_UPGRADED` or `DAEMON_UPGRADE_FAILED` event after `after`, following
/// the events across the handover.
async fn upgrade_outcome(conn: &Conn, after: u64) -> std::result::Result<pb::Event, String> {
    // The stream ending for the handover is expected here: no note of it.
    let mut resume = Resume::new(true);
    resume.quiet = true;
    let mut feed = EventFeed::new(conn, after, Vec::new(), resume);
    loop {
        let Some(resp) = feed.next().await? else {
            feed.reopen();
            continue;
        };
        let Some(e) = resp.event else { continue };
        if e.kind == pb::EventKind::DaemonUpgraded as i32
            || e.kind == pb::EventKind::DaemonUpgradeFailed as i32
        {
            return Ok(e);
        }
    }
}

/// Prints the events a replay cannot send (the event log does not hold them).
fn print_gap(out: Output, gap: &pb::EventGap) {
    match out {
        Output::Json => print_json(
            &serde_json::json!({"gap": {
                "first_seq": gap.first_seq,
                "last_seq": gap.last_seq,
                "reason": gap.reason,
            }}),
            false,
        ),
        Output::Table => outln!(
            "GAP: events {} to {} are missing: {}",
            gap.first_seq,
            gap.last_seq,
            gap.reason
        ),
    }
}

/// `health [IDS]`: `grpc.health.v1` checks of the daemon (`""`) and plugins
/// (`toru.plugin.<id>`).
pub async fn health(conn: &Conn, out: Output, args: HealthArgs) -> Result {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::health_client::HealthClient;
    use tonic_health::pb::HealthCheckRequest;
    let mut client = HealthClient::new(conn.channel.clone());
    let named = !args.ids.is_empty();
    let ids = if named {
        args.ids
    } else {
        let req = conn.unary(pb::ListPluginsRequest {
            page_size: 1000,
            page_token: String::new(),
        });
        let list = plugins(conn).list_plugins(req).await.map_err(status_line)?;
        let mut ids = vec![String::new()];
        ids.extend(list.into_inner().plugins.into_iter().map(|p| p.id));
        ids
    };
    let mut rows = Vec::new();
    let mut all_serving = true;
    for id in ids {
        let service = if id.is_empty() {
            String::new()
        } else {
            torud_api::health_service_name(&id)
        };
        let req = conn.unary(HealthCheckRequest {
            service: service.clone(),
        });
        let status = client
            .check(req)
            .await
            .map_err(status_line)?
            .into_inner()
            .status;
        let serving = status == ServingStatus::Serving as i32;
        // Without named plugins, only the daemon decides the exit status.
        if named || id.is_empty() {
            all_serving &= serving;
        }
        let name = ServingStatus::try_from(status).map_or("UNKNOWN", |s| s.as_str_name());
        rows.push((
            if id.is_empty() {
                "torud".to_owned()
            } else {
                id
            },
            service,
            name.to_owned(),
        ));
    }
    match out {
        Output::Json => print_json(
            &Value::Array(
                rows.iter()
                    .map(|(who, service, status)| json!({"name": who, "service": service, "status": status}))
                    .collect(),
            ),
            true,
        ),
        Output::Table => {
            let rows: Vec<Vec<String>> = rows
                .into_iter()
                .map(|(who, service, status)| vec![who, if service.is_empty() { "\"\"".into() } else { service }, status])
                .collect();
            out!("{}", render::table(&["NAME", "SERVICE", "STATUS"], &rows));
        }
    }
    Ok(if all_serving {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_name_the_code_and_hint_at_credentials() {
        assert_eq!(
            status_line(Status::not_found("no plugin has the id \"x\"")),
            "NOT_FOUND: no plugin has the id \"x\""
        );
        assert!(status_line(Status::unauthenticated("missing token")).contains("--token"));
    }

    #[test]
    fn since_takes_times_and_ages() {
        assert_eq!(parse_since("1970-01-01T00:01:00Z").unwrap().seconds, 60);
        let ago = parse_since("10m").unwrap().seconds;
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        assert!((now - 600 - ago).abs() <= 2);
        assert!(parse_since("yesterday").is_err());
        assert!(parse_level("loud").is_err());
    }
}
