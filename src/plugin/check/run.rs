//! The plugin's process under check: spawned as the daemon spawns it with its output kept,
//! started through the daemon's handshake (the `start` and `init` steps), and stopped with
//! the `shutdown` message (the `shutdown` step); then what its output showed.
//! It knows nothing of the requests a ready plugin is sent (`round_trips`).

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::net::UnixStream;

use super::{ms, Outcome, Plugin, Report, Scratch};
use crate::plugin::connection::connect_with_retry;
use crate::plugin::handshake::{send_shutdown, Budget, Handshake, ReadyError};
use crate::plugin::link::{Link, LinkLimits};
use crate::plugin::process::Launch;
use crate::plugin::process::{plugin_command, signal_group, Confinement};
use crate::plugin::spawn::{Child, Stdio};

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
pub(super) struct Running {
    child: Child,
    /// Its pid, which is also its process group.
    pid: u32,
    output: Output,
    /// When it was spawned.
    spawned: Instant,
}

impl Running {
    /// Everything it wrote so far, stdout and stderr lines in the order read.
    pub(super) fn output(&self) -> Vec<String> {
        self.output.lines()
    }
}

/// Spawns the plugin as the daemon does (its environment, limits and user), capturing
/// its output; a failure is the `start` step's.
pub(super) fn spawn(plugin: &Plugin, scratch: &Scratch, report: &mut Report) -> Option<Running> {
    let env = scratch.launch(&plugin.meta.id).env();
    let mut cmd = plugin_command(
        &plugin.path,
        &plugin.env_allowlist,
        &Launch::default(),
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
pub(super) async fn start(
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
pub(super) async fn stop(
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
pub(super) fn report_output(report: &mut Report, lines: &[String]) {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn structured_lines_are_counted_and_the_last_ten_kept() {
        let mut lines: Vec<String> = (0..11).map(|i| format!("plain {i}")).collect();
        lines.push(r#"{"level":"info","message":"hi"}"#.into());
        lines.push(r#"{"message":"no level"}"#.into());
        let mut report = Report::default();
        report_output(&mut report, &lines);
        assert_eq!(report.supports, ["structured logs (1 of 13 lines)"]);
        assert_eq!(report.stderr_tail.len(), 10);
        assert_eq!(report.stderr_tail[0], "plain 3");
        assert_eq!(report.stderr_tail[9], r#"{"message":"no level"}"#);
    }

    #[test]
    fn plain_output_claims_no_structured_logs() {
        let mut report = Report::default();
        report_output(&mut report, &["started".to_owned()]);
        assert!(report.supports.is_empty(), "{:?}", report.supports);
        assert_eq!(report.stderr_tail, ["started"]);
    }
}
