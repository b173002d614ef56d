//! `torud plugin check PATH`: the conformance checker. Runs a plugin executable the way
//! the daemon does — `--metadata`, spawn, connect, `init` — then KV and call round trips,
//! the extensions its protocol version has (ready, heartbeat, cancel, concurrent requests,
//! durable storage), and shutdown, and reports each step (passed, failed with the precise
//! reason, or skipped), what the plugin supports, and the tail of its stderr on failure.
//!
//! It reuses the daemon's own pieces (discovery's probe, the process builder, the
//! environment, `init`→`ready` handshake and `shutdown` of `handshake`, the bridge, a real
//! storage namespace in a temporary directory), so a plugin that passes here speaks to the
//! daemon the same way. What is its own is the reporting, and the capture of the plugin's
//! output, kept whole in memory to count structured lines and show the last ones.
//! Architecture invariant: it knows nothing of gRPC, supervision or the data directory.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{ExitCode, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::net::UnixStream;
use tokio::process::Child;
use toru_plugin_sdk::storage_wire::{StorageAnswer, StorageOp};
use toru_plugin_sdk::wire::HttpCall;
use toru_plugin_sdk::{Envelope, MessageType, Metadata, PROTOCOL_VERSION};

use crate::config::{PluginLimits, DEFAULT_PLUGIN_ENV};
use crate::plugin::connection::connect_with_retry;
use crate::plugin::discovery::{probe, ProbeOptions};
use crate::plugin::handshake::{send_shutdown, Budget, Handshake, Launch, ReadyError};
use crate::plugin::link::{new_request_id, BridgeError, Link, LinkLimits};
use crate::plugin::process::{plugin_command, signal_group, Confinement, Credentials};
use crate::store::storage::{Namespace, Quotas, Storage};
use torud_api::text::escape;

/// How to check.
#[derive(Debug, Clone)]
pub struct CheckOptions {
    /// The plugin executable.
    pub path: PathBuf,
    /// Longest wait for each step (metadata, start, each answer, exit after shutdown).
    pub timeout: Duration,
}

/// The outcome of one step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// It worked; the detail says what was seen.
    Pass(String),
    /// It did not; the reason says what was expected and what happened.
    Fail(String),
    /// Not applicable to this plugin (for example, protocol-2 steps for a v1 plugin).
    Skip(String),
}

/// One step of the check.
#[derive(Debug, Clone)]
pub struct Step {
    /// Short name, e.g. `kv set`.
    pub name: &'static str,
    /// What happened.
    pub outcome: Outcome,
}

/// The whole check.
#[derive(Debug, Clone, Default)]
pub struct Report {
    /// The steps, in the order run.
    pub steps: Vec<Step>,
    /// What the plugin was seen to support.
    pub supports: Vec<String>,
    /// The plugin's last stderr lines (shown when a step failed).
    pub stderr_tail: Vec<String>,
}

impl Report {
    fn add(&mut self, name: &'static str, outcome: Outcome) -> bool {
        let ok = !matches!(outcome, Outcome::Fail(_));
        self.steps.push(Step { name, outcome });
        ok
    }

    /// Steps that failed.
    pub fn failures(&self) -> usize {
        self.steps
            .iter()
            .filter(|s| matches!(s.outcome, Outcome::Fail(_)))
            .count()
    }

    /// The report as text, one line per step.
    pub fn render(&self, path: &Path) -> String {
        let mut out = format!(
            "torud plugin check {}\n",
            escape(&path.display().to_string())
        );
        for step in &self.steps {
            let (tag, text) = match &step.outcome {
                Outcome::Pass(t) => ("PASS", t),
                Outcome::Fail(t) => ("FAIL", t),
                Outcome::Skip(t) => ("SKIP", t),
            };
            let _ = writeln!(out, "  {tag}  {:<12} {}", step.name, escape(text));
        }
        if !self.supports.is_empty() {
            let _ = writeln!(out, "supports: {}", escape(&self.supports.join(", ")));
        }
        if self.failures() > 0 && !self.stderr_tail.is_empty() {
            let _ = writeln!(out, "last stderr lines of the plugin:");
            for line in &self.stderr_tail {
                let _ = writeln!(out, "  | {}", escape(line));
            }
        }
        let run = self
            .steps
            .iter()
            .filter(|s| !matches!(s.outcome, Outcome::Skip(_)))
            .count();
        let verdict = if self.failures() == 0 {
            "conforms"
        } else {
            "does NOT conform"
        };
        let _ = writeln!(
            out,
            "verdict: {verdict} ({} of {run} checks failed)",
            self.failures()
        );
        out
    }
}

/// Runs the check from the command line: prints the report, exits 0 only if it conforms.
pub fn run_cli(opts: CheckOptions) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("torud: error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let report = runtime.block_on(check(&opts));
    print!("{}", report.render(&opts.path));
    if report.failures() == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// Makes `data_dir` and its parent, and hands the parent to `run_as`; the scratch root
/// stays the caller's, traversable.
fn own_corner(root: &Path, data_dir: &Path, run_as: Option<Credentials>) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(data_dir)?;
    if let Some(who) = run_as {
        std::fs::set_permissions(root, std::fs::Permissions::from_mode(0o711))?;
        for dir in [data_dir.parent().unwrap_or(data_dir), data_dir] {
            std::os::unix::fs::chown(dir, Some(who.uid), Some(who.gid))?;
        }
    }
    Ok(())
}

/// The instance id the plugin is given.
const INSTANCE_ID: &str = "torud-check";

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

/// Runs every step against the plugin at `opts.path`: its metadata, a start the way the
/// daemon starts it, the round trips, shutdown, and what its output shows.
pub async fn check(opts: &CheckOptions) -> Report {
    let mut report = Report::default();
    let limit = opts.timeout;
    let Some(plugin) = read_metadata(&opts.path, limit, &mut report).await else {
        return report;
    };
    let Some(scratch) = Scratch::prepare(&plugin, &mut report) else {
        return report;
    };
    let Some(mut running) = spawn(&plugin, &scratch, &mut report) else {
        return report;
    };
    let link = start(&plugin, &scratch, &mut running, limit, &mut report).await;
    if let Some(link) = &link {
        round_trips(
            &mut report,
            link,
            plugin.protocol(),
            limit,
            scratch.namespace.as_ref(),
        )
        .await;
    }
    stop(&mut report, link, &scratch, &mut running, limit).await;
    report_output(&mut report, &running.output.lines());
    report
}

/// The plugin under check, as its `--metadata` declared it, and how the daemon would run it.
struct Plugin {
    /// The executable, resolved.
    path: PathBuf,
    /// Its metadata.
    meta: Metadata,
    /// The environment variables it keeps from the checker's (the daemon's default).
    env_allowlist: Vec<String>,
    /// The daemon's default process limits, so a plugin that passes here fits under them.
    limits: PluginLimits,
    /// Run as root, the plugin gets an unprivileged user, as under the daemon.
    run_as: Option<Credentials>,
}

impl Plugin {
    fn protocol(&self) -> u32 {
        self.meta.protocol_version
    }
}

/// The `metadata` step: discovery's probe, as the daemon runs it.
async fn read_metadata(path: &Path, limit: Duration, report: &mut Report) -> Option<Plugin> {
    let path = match path.canonicalize() {
        Ok(p) => p,
        Err(e) => {
            report.add(
                "metadata",
                Outcome::Fail(format!("cannot resolve the file: {e}")),
            );
            return None;
        }
    };
    let dir = path.parent().unwrap_or(Path::new("/")).to_path_buf();
    let env_allowlist: Vec<String> = DEFAULT_PLUGIN_ENV.iter().map(|s| s.to_string()).collect();
    let limits = PluginLimits::default();
    let run_as = crate::plugin::isolation::daemon_is_root()
        .then(|| crate::plugin::isolation::UidRange::default().probe_credentials());
    let probe_opts = ProbeOptions {
        timeout: limit,
        env_allowlist: env_allowlist.clone(),
        max_bytes: crate::plugin::discovery::DEFAULT_MAX_METADATA_BYTES,
        limits: limits.clone(),
        run_as,
        hide: None,
        cgroups: None,
    };
    let meta = match probe(dir, path.clone(), probe_opts).await {
        Ok(spec) => spec.metadata,
        Err(skipped) => {
            report.add("metadata", Outcome::Fail(skipped.reason));
            return None;
        }
    };
    let protocol = meta.protocol_version;
    let newer = if protocol > PROTOCOL_VERSION {
        format!(" (newer than this host's {PROTOCOL_VERSION})")
    } else {
        String::new()
    };
    report.add(
        "metadata",
        Outcome::Pass(format!(
            "id {}, version {}, route {}, protocol {protocol}{newer}",
            meta.id, meta.version, meta.route,
        )),
    );
    report.supports.push(if protocol >= 2 {
        format!("protocol {protocol} (one persistent multiplexed connection)")
    } else {
        "protocol 1 (a connection per message)".to_owned()
    });
    Some(Plugin {
        path,
        meta,
        env_allowlist,
        limits,
        run_as,
    })
}

/// A temporary directory standing in for the daemon's data directory: the plugin's own
/// corner (its data directory and socket) and a real storage namespace.
struct Scratch {
    /// Removed when the check ends.
    tmp: tempfile::TempDir,
    /// The plugin's data directory.
    data_dir: PathBuf,
    /// Where the plugin listens.
    socket: PathBuf,
    /// Kept open for the namespace.
    _storage: Option<Storage>,
    /// The plugin's durable KV, served to its `storage` requests; `None` if it cannot open.
    namespace: Option<Namespace>,
}

impl Scratch {
    /// Makes the directory, handing the plugin's corner to its user; a failure is the
    /// `start` step's.
    fn prepare(plugin: &Plugin, report: &mut Report) -> Option<Scratch> {
        let tmp = match tempfile::Builder::new().prefix("torud-check-").tempdir() {
            Ok(t) => t,
            Err(e) => {
                report.add(
                    "start",
                    Outcome::Fail(format!("cannot make a temporary directory: {e}")),
                );
                return None;
            }
        };
        let own = tmp.path().join("plugin");
        let data_dir = own.join("data");
        let socket = own.join("p.sock");
        if let Err(e) = own_corner(tmp.path(), &data_dir, plugin.run_as) {
            report.add(
                "start",
                Outcome::Fail(format!("cannot prepare {}: {e}", own.display())),
            );
            return None;
        }
        let storage = Storage::open(&tmp.path().join("storage.redb"), Quotas::default()).ok();
        let namespace = storage.as_ref().map(|s| s.namespace(&plugin.meta.id));
        Some(Scratch {
            tmp,
            data_dir,
            socket,
            _storage: storage,
            namespace,
        })
    }

    /// What the plugin is told at start, as the daemon tells it.
    fn launch(&self, id: &str) -> Launch {
        Launch {
            id: id.to_owned(),
            instance_id: INSTANCE_ID.into(),
            socket: self.socket.clone(),
            data_dir: self.data_dir.clone(),
            log_path: self.tmp.path().to_path_buf(),
            home: None,
        }
    }
}

/// Everything the plugin writes to stdout and stderr, line by line. The mutex guards the
/// list only to push a line or copy it, never across `.await`.
#[derive(Clone, Default)]
struct Output(Arc<Mutex<Vec<String>>>);

impl Output {
    /// Reads `pipe` to its end in a task of its own, keeping each line.
    fn capture(&self, pipe: impl AsyncRead + Send + Unpin + 'static) {
        let output = self.clone();
        tokio::spawn(async move {
            let mut reader = BufReader::new(pipe).lines();
            while let Ok(Some(line)) = reader.next_line().await {
                output.0.lock().expect("output poisoned").push(line);
            }
        });
    }

    /// The lines so far, in the order read.
    fn lines(&self) -> Vec<String> {
        self.0.lock().expect("output poisoned").clone()
    }
}

/// The plugin's process while it is checked.
struct Running {
    child: Child,
    /// Its pid, which is also its process group.
    pid: u32,
    output: Output,
    /// When it was spawned.
    spawned: Instant,
}

/// Spawns the plugin as the daemon does (its environment, limits and user), capturing
/// its output; a failure is the `start` step's.
fn spawn(plugin: &Plugin, scratch: &Scratch, report: &mut Report) -> Option<Running> {
    let env = scratch.launch(&plugin.meta.id).env();
    let mut cmd = plugin_command(
        &plugin.path,
        &plugin.env_allowlist,
        &env,
        &plugin.limits,
        Confinement::user(plugin.run_as),
    );
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = match cmd.spawn() {
        Ok(child) => child,
        Err(e) => {
            report.add("start", Outcome::Fail(format!("cannot spawn it: {e}")));
            return None;
        }
    };
    let spawned = Instant::now();
    let output = Output::default();
    if let Some(out) = child.stdout.take() {
        output.capture(out);
    }
    if let Some(err) = child.stderr.take() {
        output.capture(err);
    }
    Some(Running {
        pid: child.id().unwrap_or(0),
        child,
        output,
        spawned,
    })
}

/// The `start` and `init` steps: the daemon's handshake, its connection raced against the
/// plugin's exit. The link requests take once the plugin is ready.
async fn start(
    plugin: &Plugin,
    scratch: &Scratch,
    running: &mut Running,
    limit: Duration,
    report: &mut Report,
) -> Option<Link> {
    let stream = connect(&scratch.socket, running, limit, report).await?;
    let handshake = Handshake {
        socket: scratch.socket.clone(),
        init: scratch.launch(&plugin.meta.id).init_params(),
        protocol: plugin.protocol(),
        // The daemon's default limits.
        limits: LinkLimits::from(&crate::config::BridgeConfig::default()),
        storage: scratch.namespace.clone(),
    };
    init(handshake, stream, limit, report).await
}

/// The `start` step: the plugin's socket accepts a connection before the plugin exits.
async fn connect(
    socket: &Path,
    running: &mut Running,
    limit: Duration,
    report: &mut Report,
) -> Option<UnixStream> {
    let connected = tokio::select! {
        connected = connect_with_retry(socket, limit) => connected.map_err(|e| e.to_string()),
        status = running.child.wait() => Err(match status {
            Ok(status) => format!("the plugin exited ({status}) before its socket accepted connections"),
            Err(e) => format!("cannot wait for the plugin: {e}"),
        }),
    };
    match connected {
        Ok(stream) => {
            let after = ms(running.spawned.elapsed());
            report.add(
                "start",
                Outcome::Pass(format!("socket accepting {after} after spawn")),
            );
            Some(stream)
        }
        Err(e) => {
            report.add("start", Outcome::Fail(e));
            None
        }
    }
}

/// The `init` step: `init` sent, and for protocol 2 answered with `ready`.
async fn init(
    handshake: Handshake,
    stream: UnixStream,
    limit: Duration,
    report: &mut Report,
) -> Option<Link> {
    let protocol = handshake.protocol;
    let sent = Instant::now();
    let outcome = match handshake
        .ready(stream, Budget::full(limit), |_early| {})
        .await
    {
        Ok(link) if protocol >= 2 => {
            report.supports.push("ready".into());
            let after = ms(sent.elapsed());
            report.add("init", Outcome::Pass(format!("ready {after} after init")));
            return Some(link);
        }
        Ok(link) => {
            report.add(
                "init",
                Outcome::Pass("init written on its own connection".into()),
            );
            return Some(link);
        }
        Err(ReadyError::Answered(kind)) => format!(
            "init was answered with {} instead of ready (same request_id)",
            kind.as_str()
        ),
        Err(ReadyError::NoReady { error, .. }) => format!(
            "no ready after init: {error}; a protocol-2 plugin answers init with \
             {{\"type\":\"ready\"}} carrying init's request_id"
        ),
        Err(ReadyError::SendInit(e)) => format!("writing init failed: {e}"),
    };
    report.add("init", Outcome::Fail(outcome));
    None
}

/// The `shutdown` step (skipped when the plugin is already gone), then whatever is left of
/// the plugin is killed and its link closed.
async fn stop(
    report: &mut Report,
    link: Option<Link>,
    scratch: &Scratch,
    running: &mut Running,
    limit: Duration,
) {
    if link.is_none() && matches!(running.child.try_wait(), Ok(Some(_))) {
        report.add(
            "shutdown",
            Outcome::Skip("the plugin is not running".into()),
        );
    } else {
        let outcome = shutdown(link.as_ref(), &scratch.socket, running, limit).await;
        report.add("shutdown", outcome);
    }
    signal_group(running.pid, libc::SIGKILL);
    if let Some(link) = link {
        link.close("check finished");
    }
}

/// Sends `shutdown` and waits (within `limit`) for the plugin to exit 0.
async fn shutdown(
    link: Option<&Link>,
    socket: &Path,
    running: &mut Running,
    limit: Duration,
) -> Outcome {
    let asked = send_shutdown(link, socket).await.is_ok();
    let stop_began = Instant::now();
    match tokio::time::timeout(limit, running.child.wait()).await {
        Ok(Ok(status)) if asked && status.success() => Outcome::Pass(format!(
            "exited 0 {} after the shutdown message",
            ms(stop_began.elapsed())
        )),
        Ok(Ok(status)) if asked => Outcome::Fail(format!(
            "exited with {status} after the shutdown message; exit 0"
        )),
        Ok(Ok(status)) => Outcome::Fail(format!(
            "the shutdown message could not be delivered; the plugin had already exited ({status})"
        )),
        Ok(Err(e)) => Outcome::Fail(format!("cannot wait for the plugin: {e}")),
        Err(_) => {
            signal_group(running.pid, libc::SIGKILL);
            let _ = running.child.wait().await;
            Outcome::Fail(format!(
                "still running {} after the shutdown message; exit promptly on shutdown",
                humantime::format_duration(limit)
            ))
        }
    }
}

/// What the plugin's output shows: how many lines are structured records the daemon
/// parses, and the last lines, shown when a step failed.
fn report_output(report: &mut Report, lines: &[String]) {
    let structured = lines.iter().filter(|l| is_structured(l)).count();
    if structured > 0 {
        report.supports.push(format!(
            "structured logs ({structured} of {} lines)",
            lines.len()
        ));
    }
    report.stderr_tail = lines.iter().rev().take(10).rev().cloned().collect();
}

/// Whether `line` is a JSON object with `level` and `message`.
fn is_structured(line: &str) -> bool {
    serde_json::from_str::<serde_json::Value>(line)
        .ok()
        .is_some_and(|v| v.get("level").is_some() && v.get("message").is_some())
}

/// The key the KV steps use.
const KEY: &str = "torud-check";

/// Heartbeat, KV, call, and (protocol 2) concurrency and cancel steps.
async fn round_trips(
    report: &mut Report,
    link: &Link,
    protocol: u32,
    limit: Duration,
    storage: Option<&Namespace>,
) {
    if protocol >= 2 {
        heartbeat(report, link, limit).await;
    } else {
        report.add(
            "heartbeat",
            Outcome::Skip("protocol 1 has no heartbeat".into()),
        );
    }
    kv(report, link, limit, storage).await;
    call(report, link, limit).await;
    if protocol >= 2 {
        concurrency(report, link, limit).await;
        cancel(report, link, limit).await;
    } else {
        for name in ["concurrency", "cancel"] {
            report.add(
                name,
                Outcome::Skip("protocol 1 has one message per connection".into()),
            );
        }
    }
}

/// The `heartbeat` step: `ping` answered with `pong`.
async fn heartbeat(report: &mut Report, link: &Link, limit: Duration) {
    let sent = Instant::now();
    let outcome = match link.ping(limit).await {
        Ok(()) => {
            report.supports.push("heartbeat".into());
            Outcome::Pass(format!("pong {} after ping", ms(sent.elapsed())))
        }
        Err(e) => Outcome::Fail(format!(
            "ping: {e}; answer ping with pong carrying its request_id"
        )),
    };
    report.add("heartbeat", outcome);
}

/// The `kv` steps: a value set, read back, deleted, and then absent; and whether the
/// value reached the host's durable storage.
async fn kv(report: &mut Report, link: &Link, limit: Duration, storage: Option<&Namespace>) {
    let value = format!("value-{}", new_request_id());
    let set = match link.kv("set", KEY, Some(&value), limit).await {
        Ok(_) => Outcome::Pass(format!("set {KEY:?}")),
        Err(e) => Outcome::Fail(format!("{e}")),
    };
    if !report.add("kv set", set) {
        return;
    }
    let got = match link.kv("get", KEY, None, limit).await {
        Ok(Some(v)) if v == value => Outcome::Pass("read back the value set".into()),
        Ok(other) => Outcome::Fail(format!("read {other:?} back after setting {value:?}")),
        Err(e) => Outcome::Fail(e.to_string()),
    };
    report.add("kv get", got);
    if let Some(ns) = storage {
        if stored_durably(ns, &value).await {
            report
                .supports
                .push("durable storage (KV kept by the host)".into());
        }
    }
    let deleted = match link.kv("delete", KEY, None, limit).await {
        Ok(Some(v)) if v == value => Outcome::Pass("answered the old value".into()),
        Ok(None) => {
            Outcome::Pass("deleted (answered null; the host cannot tell the key existed)".into())
        }
        Ok(Some(other)) => {
            Outcome::Fail(format!("answered {other:?}; answer the old value or null"))
        }
        Err(e) => Outcome::Fail(e.to_string()),
    };
    report.add("kv delete", deleted);
    let gone = match link.kv("get", KEY, None, limit).await {
        Ok(None) => Outcome::Pass("a deleted key reads as null".into()),
        Ok(Some(v)) => Outcome::Fail(format!(
            "a deleted key still reads {v:?}; answer null for an absent key"
        )),
        Err(e) => Outcome::Fail(e.to_string()),
    };
    report.add("kv absent", gone);
}

/// Whether the host's storage namespace holds `value` under [`KEY`]: the plugin keeps its
/// KV in the host's durable storage.
async fn stored_durably(ns: &Namespace, value: &str) -> bool {
    let op = StorageOp::Get { key: KEY.into() };
    matches!(ns.apply(op).await, Ok(StorageAnswer::Value(Some(v))) if v == value)
}

/// The `call` step: an HTTP call answered, with a response or an error.
async fn call(report: &mut Report, link: &Link, limit: Duration) {
    let call = HttpCall {
        method: "GET".into(),
        path: "/torud-check?probe=1".into(),
        headers: vec![("x-torud-check".into(), "1".into())],
        body: None,
    };
    let sent = Instant::now();
    let outcome = match link.call(&call, limit).await {
        Ok(answer) => Outcome::Pass(format!(
            "status {} with {} body bytes, {} after the call",
            answer.status,
            answer.body.len(),
            ms(sent.elapsed())
        )),
        Err(BridgeError::Refused { code, message }) => {
            Outcome::Pass(format!("answered an error ({code}: {message})"))
        }
        Err(e) => Outcome::Fail(e.to_string()),
    };
    report.add("call", outcome);
}

/// Requests the `concurrency` step keeps in flight at once.
const CONCURRENT: usize = 16;

/// The `concurrency` step: [`CONCURRENT`] requests in flight at once, all answered.
async fn concurrency(report: &mut Report, link: &Link, limit: Duration) {
    let many = (0..CONCURRENT).map(|i| {
        let key = format!("torud-check-{i}");
        async move { link.kv("get", &key, None, limit).await }
    });
    let failed: Vec<String> = futures::future::join_all(many)
        .await
        .into_iter()
        .filter_map(|r| r.err().map(|e| e.to_string()))
        .collect();
    let outcome = match failed.first() {
        None => Outcome::Pass(format!(
            "{CONCURRENT} requests in flight at once, all answered"
        )),
        Some(first) => Outcome::Fail(format!(
            "{} of {CONCURRENT} concurrent requests failed: {first}",
            failed.len()
        )),
    };
    report.add("concurrency", outcome);
}

/// The `cancel` step: a cancel for a request the plugin already answered (or never saw)
/// is ignored, and the plugin still serves.
async fn cancel(report: &mut Report, link: &Link, limit: Duration) {
    let cancel = Envelope::bare(MessageType::Cancel, new_request_id());
    let outcome = match link.notify(&cancel).await {
        Ok(()) => match link.ping(limit).await {
            Ok(()) => {
                report.supports.push("cancel".into());
                Outcome::Pass("a cancel for an unknown request was ignored; still serving".into())
            }
            Err(e) => Outcome::Fail(format!("after a cancel: {e}")),
        },
        Err(e) => Outcome::Fail(format!("sending cancel: {e}")),
    };
    report.add("cancel", outcome);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_report_shows_what_the_plugin_wrote_escaped() {
        let report = Report {
            steps: vec![Step {
                name: "call",
                outcome: Outcome::Fail("answered \x1b[2J\r".into()),
            }],
            supports: vec![],
            stderr_tail: vec!["\x1b]0;title\x07".into()],
        };
        let text = report.render(Path::new("/p/x.binary"));
        assert!(!text.contains(['\x1b', '\r', '\x07']), "{text:?}");
        assert!(text.contains("answered \\e[2J\\r") && text.contains("| \\e]0;title\\x07"));
    }
}
