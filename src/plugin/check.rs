//! `torud plugin check PATH`: the conformance checker. Runs a plugin executable the way
//! the daemon does — `--metadata`, spawn, connect, `init` — then KV and call round trips,
//! the extensions its protocol version has (ready, heartbeat, cancel, concurrent requests,
//! durable storage), and shutdown, and reports each step (passed, failed with the precise
//! reason, or skipped), what the plugin supports, and the tail of its stderr on failure.
//!
//! It reuses the daemon's own pieces (discovery's probe, the process builder, connection
//! and bridge code, a real storage namespace in a temporary directory), so a plugin that
//! passes here speaks to the daemon the same way.
//! Architecture invariant: it knows nothing of gRPC, supervision or the data directory.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{ExitCode, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, BufReader};
use toru_plugin_sdk::wire::{HttpCall, InitParams};
use toru_plugin_sdk::{Envelope, KvOp, MessageType, PROTOCOL_VERSION};

use crate::config::DEFAULT_PLUGIN_ENV;
use crate::plugin::connection::{connect_with_retry, send_one, send_one_on};
use crate::plugin::discovery::{probe, ProbeOptions};
use crate::plugin::link::{new_request_id, Link, LinkLimits};
use crate::store::storage::{Quotas, Storage};
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
fn own_corner(
    root: &Path,
    data_dir: &Path,
    run_as: Option<crate::plugin::process::Credentials>,
) -> std::io::Result<()> {
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

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

/// Runs every step against the plugin at `opts.path`.
pub async fn check(opts: &CheckOptions) -> Report {
    let mut report = Report::default();
    let limit = opts.timeout;
    let path = match opts.path.canonicalize() {
        Ok(p) => p,
        Err(e) => {
            report.add(
                "metadata",
                Outcome::Fail(format!("cannot resolve the file: {e}")),
            );
            return report;
        }
    };
    let dir = path.parent().unwrap_or(Path::new("/")).to_path_buf();
    let env_allowlist: Vec<String> = DEFAULT_PLUGIN_ENV.iter().map(|s| s.to_string()).collect();
    // The daemon's default limits, so a plugin that passes here fits under them.
    let limits = crate::config::PluginLimits::default();
    // Run as root, the plugin gets an unprivileged user, as under the daemon.
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
    let spec = match probe(dir, path.clone(), probe_opts).await {
        Ok(spec) => spec,
        Err(skipped) => {
            report.add("metadata", Outcome::Fail(skipped.reason));
            return report;
        }
    };
    let meta = &spec.metadata;
    let protocol = meta.protocol_version;
    report.add(
        "metadata",
        Outcome::Pass(format!(
            "id {}, version {}, route {}, protocol {protocol}{}",
            meta.id,
            meta.version,
            meta.route,
            if protocol > PROTOCOL_VERSION {
                format!(" (newer than this host's {PROTOCOL_VERSION})")
            } else {
                String::new()
            }
        )),
    );
    report.supports.push(if protocol >= 2 {
        format!("protocol {protocol} (one persistent multiplexed connection)")
    } else {
        "protocol 1 (a connection per message)".to_owned()
    });

    let tmp = match tempfile::Builder::new().prefix("torud-check-").tempdir() {
        Ok(t) => t,
        Err(e) => {
            report.add(
                "start",
                Outcome::Fail(format!("cannot make a temporary directory: {e}")),
            );
            return report;
        }
    };
    // The plugin's own corner of the scratch directory, handed to its user when run as root.
    let own = tmp.path().join("plugin");
    let data_dir = own.join("data");
    let socket = own.join("p.sock");
    if let Err(e) = own_corner(tmp.path(), &data_dir, run_as) {
        report.add(
            "start",
            Outcome::Fail(format!("cannot prepare {}: {e}", own.display())),
        );
        return report;
    }
    let env = [
        (
            toru_plugin_sdk::ENV_PLUGIN_SOCKET,
            socket.clone().into_os_string(),
        ),
        (toru_plugin_sdk::ENV_PLUGIN_ID, meta.id.clone().into()),
        (toru_plugin_sdk::ENV_INSTANCE_ID, "torud-check".into()),
        (toru_plugin_sdk::ENV_DATA_DIR, data_dir.into_os_string()),
    ];
    let mut cmd = crate::plugin::process::plugin_command(
        &path,
        &env_allowlist,
        &env,
        &limits,
        crate::plugin::process::Confinement::user(run_as),
    );
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = match cmd.spawn() {
        Ok(child) => child,
        Err(e) => {
            report.add("start", Outcome::Fail(format!("cannot spawn it: {e}")));
            return report;
        }
    };
    let pid = child.id().unwrap_or(0);
    let lines: Arc<Mutex<Vec<String>>> = Arc::default();
    for pipe in [
        child
            .stdout
            .take()
            .map(|s| Box::new(s) as Box<dyn tokio::io::AsyncRead + Send + Unpin>),
        child
            .stderr
            .take()
            .map(|s| Box::new(s) as Box<dyn tokio::io::AsyncRead + Send + Unpin>),
    ]
    .into_iter()
    .flatten()
    {
        let lines = lines.clone();
        tokio::spawn(async move {
            let mut reader = BufReader::new(pipe).lines();
            while let Ok(Some(line)) = reader.next_line().await {
                lines.lock().expect("lines poisoned").push(line);
            }
        });
    }

    let storage_file = tmp.path().join("storage.redb");
    let storage = Storage::open(&storage_file, Quotas::default()).ok();
    let namespace = storage.as_ref().map(|s| s.namespace(&meta.id));
    // The daemon's default limits.
    let limits = LinkLimits::from(&crate::config::BridgeConfig::default());

    let began = Instant::now();
    let link = async {
        let connected = tokio::select! {
            connected = connect_with_retry(&socket, limit) => connected.map_err(|e| e.to_string()),
            status = child.wait() => Err(match status {
                Ok(status) => format!("the plugin exited ({status}) before its socket accepted connections"),
                Err(e) => format!("cannot wait for the plugin: {e}"),
            }),
        };
        let mut stream = match connected {
            Ok(s) => s,
            Err(e) => {
                report.add("start", Outcome::Fail(e));
                return None;
            }
        };
        report.add(
            "start",
            Outcome::Pass(format!("socket accepting {} after spawn", ms(began.elapsed()))),
        );
        let init = Envelope::init(
            new_request_id(),
            &InitParams {
                instance_id: "torud-check".into(),
                plugin_socket: socket.to_string_lossy().into_owned(),
                log_path: tmp.path().to_string_lossy().into_owned(),
                host_protocol_version: PROTOCOL_VERSION,
            },
        );
        if protocol >= 2 {
            let link = Link::persistent(stream, protocol, limits, namespace.clone());
            let sent = Instant::now();
            match link.request(init, limit).await {
                Ok(a) if a.kind == MessageType::Ready => {
                    report.add("init", Outcome::Pass(format!("ready {} after init", ms(sent.elapsed()))));
                    report.supports.push("ready".into());
                    Some(link)
                }
                Ok(a) => {
                    report.add("init", Outcome::Fail(format!("init was answered with {} instead of ready (same request_id)", a.kind.as_str())));
                    None
                }
                Err(e) => {
                    report.add("init", Outcome::Fail(format!("no ready after init: {e}; a protocol-2 plugin answers init with {{\"type\":\"ready\"}} carrying init's request_id")));
                    None
                }
            }
        } else {
            match send_one_on(&mut stream, &init).await {
                Ok(()) => {
                    report.add("init", Outcome::Pass("init written on its own connection".into()));
                    Some(Link::per_request(socket.clone(), limits))
                }
                Err(e) => {
                    report.add("init", Outcome::Fail(format!("writing init failed: {e}")));
                    None
                }
            }
        }
    }
    .await;

    if let Some(link) = &link {
        round_trips(&mut report, link, protocol, limit, namespace.as_ref()).await;
    }

    // Shutdown: the message, then the grace the daemon gives.
    if link.is_none() && matches!(child.try_wait(), Ok(Some(_))) {
        report.add(
            "shutdown",
            Outcome::Skip("the plugin is not running".into()),
        );
    } else {
        shutdown(
            &mut report,
            link.as_ref(),
            protocol,
            &socket,
            &mut child,
            pid,
            limit,
        )
        .await;
    }
    crate::plugin::process::signal_group(pid, libc::SIGKILL);
    if let Some(link) = link {
        link.close("check finished");
    }

    // Logs: how many stderr/stdout lines are structured records the daemon parses.
    let lines = lines.lock().expect("lines poisoned").clone();
    let structured = lines
        .iter()
        .filter(|l| {
            serde_json::from_str::<serde_json::Value>(l)
                .ok()
                .is_some_and(|v| v.get("level").is_some() && v.get("message").is_some())
        })
        .count();
    if structured > 0 {
        report.supports.push(format!(
            "structured logs ({structured} of {} lines)",
            lines.len()
        ));
    }
    report.stderr_tail = lines.iter().rev().take(10).rev().cloned().collect();
    report
}

/// Sends `shutdown` and waits (within `limit`) for the plugin to exit 0.
async fn shutdown(
    report: &mut Report,
    link: Option<&Link>,
    protocol: u32,
    socket: &Path,
    child: &mut tokio::process::Child,
    pid: u32,
    limit: Duration,
) {
    let shutdown = Envelope::shutdown(new_request_id());
    let asked = match link {
        Some(l) if protocol >= 2 => l.notify(&shutdown).await.is_ok(),
        _ => send_one(socket, &shutdown).await.is_ok(),
    };
    let stop_began = Instant::now();
    match tokio::time::timeout(limit, child.wait()).await {
        Ok(Ok(status)) if asked => {
            let outcome = if status.success() {
                Outcome::Pass(format!(
                    "exited 0 {} after the shutdown message",
                    ms(stop_began.elapsed())
                ))
            } else {
                Outcome::Fail(format!(
                    "exited with {status} after the shutdown message; exit 0"
                ))
            };
            report.add("shutdown", outcome);
        }
        Ok(Ok(status)) => {
            report.add("shutdown", Outcome::Fail(format!("the shutdown message could not be delivered; the plugin had already exited ({status})")));
        }
        Ok(Err(e)) => {
            report.add(
                "shutdown",
                Outcome::Fail(format!("cannot wait for the plugin: {e}")),
            );
        }
        Err(_) => {
            crate::plugin::process::signal_group(pid, libc::SIGKILL);
            let _ = child.wait().await;
            report.add(
                "shutdown",
                Outcome::Fail(format!(
                    "still running {} after the shutdown message; exit promptly on shutdown",
                    humantime::format_duration(limit)
                )),
            );
        }
    }
}

/// KV, call, and (protocol 2) heartbeat, concurrency, cancel and storage steps.
async fn round_trips(
    report: &mut Report,
    link: &Link,
    protocol: u32,
    limit: Duration,
    storage: Option<&crate::store::storage::Namespace>,
) {
    if protocol >= 2 {
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
    } else {
        report.add(
            "heartbeat",
            Outcome::Skip("protocol 1 has no heartbeat".into()),
        );
    }

    let key = "torud-check";
    let value = format!("value-{}", new_request_id());
    let kv = |op: KvOp| async move { link.kv(&op, limit).await };
    let set = kv(KvOp::Set {
        key: key.into(),
        value: value.clone(),
    })
    .await;
    let set_ok = report.add(
        "kv set",
        match &set {
            Ok(_) => Outcome::Pass(format!("set {key:?}")),
            Err(e) => Outcome::Fail(format!("{e}")),
        },
    );
    if set_ok {
        let got = kv(KvOp::Get { key: key.into() }).await;
        report.add(
            "kv get",
            match got {
                Ok(Some(v)) if v == value => Outcome::Pass("read back the value set".into()),
                Ok(other) => Outcome::Fail(format!("read {other:?} back after setting {value:?}")),
                Err(e) => Outcome::Fail(e.to_string()),
            },
        );
        if let Some(ns) = storage {
            let op = toru_plugin_sdk::storage_wire::StorageOp::Get { key: key.into() };
            if let Ok(toru_plugin_sdk::storage_wire::StorageAnswer::Value(Some(v))) =
                ns.apply(op).await
            {
                if v == value {
                    report
                        .supports
                        .push("durable storage (KV kept by the host)".into());
                }
            }
        }
        let deleted = kv(KvOp::Delete { key: key.into() }).await;
        report.add(
            "kv delete",
            match deleted {
                Ok(Some(v)) if v == value => Outcome::Pass("answered the old value".into()),
                Ok(None) => Outcome::Pass(
                    "deleted (answered null; the host cannot tell the key existed)".into(),
                ),
                Ok(Some(other)) => {
                    Outcome::Fail(format!("answered {other:?}; answer the old value or null"))
                }
                Err(e) => Outcome::Fail(e.to_string()),
            },
        );
        let gone = kv(KvOp::Get { key: key.into() }).await;
        report.add(
            "kv absent",
            match gone {
                Ok(None) => Outcome::Pass("a deleted key reads as null".into()),
                Ok(Some(v)) => Outcome::Fail(format!(
                    "a deleted key still reads {v:?}; answer null for an absent key"
                )),
                Err(e) => Outcome::Fail(e.to_string()),
            },
        );
    }

    let call = HttpCall {
        method: "GET".into(),
        path: "/torud-check?probe=1".into(),
        headers: vec![("x-torud-check".into(), "1".into())],
        body: None,
    };
    let sent = Instant::now();
    report.add(
        "call",
        match link.call(&call, limit).await {
            Ok(answer) => Outcome::Pass(format!(
                "status {} with {} body bytes, {} after the call",
                answer.status,
                answer.body.len(),
                ms(sent.elapsed())
            )),
            Err(crate::plugin::link::LinkError::Refused { code, message }) => {
                Outcome::Pass(format!("answered an error ({code}: {message})"))
            }
            Err(e) => Outcome::Fail(e.to_string()),
        },
    );

    if protocol < 2 {
        for name in ["concurrency", "cancel"] {
            report.add(
                name,
                Outcome::Skip("protocol 1 has one message per connection".into()),
            );
        }
        return;
    }
    let many = (0..16).map(|i| {
        let key = format!("torud-check-{i}");
        async move { link.kv(&KvOp::Get { key }, limit).await }
    });
    let results = futures::future::join_all(many).await;
    let failed: Vec<String> = results
        .iter()
        .filter_map(|r| r.as_ref().err().map(|e| e.to_string()))
        .collect();
    report.add(
        "concurrency",
        if failed.is_empty() {
            Outcome::Pass("16 requests in flight at once, all answered".into())
        } else {
            Outcome::Fail(format!(
                "{} of 16 concurrent requests failed: {}",
                failed.len(),
                failed[0]
            ))
        },
    );
    // A cancel for a request the plugin already answered (or never saw) must be ignored.
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
