//! `toructl` end to end: the real binary against the real daemon with the Rust and Python
//! example plugins, checking its tables, its JSON, its exit statuses and its one-line
//! errors, and that `logs -f` and `events -f` follow live.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

const TORUCTL: &str = env!("CARGO_BIN_EXE_toructl");

/// `toructl` pointed at the daemon by `--addr`, with its data dir for the token.
fn cmd(d: &Daemon, args: &[&str]) -> Command {
    let mut c = Command::new(TORUCTL);
    c.args(["--addr", &d.addr])
        .arg("--data-dir")
        .arg(&d.data_dir)
        .args(args)
        .env_remove("TORUD_ADDR")
        .env_remove("TORUD_TOKEN")
        .env_remove("TORUD_DATA_DIR");
    c
}

/// Runs `toructl`, expecting success; returns stdout.
fn ok(d: &Daemon, args: &[&str]) -> String {
    let out = cmd(d, args).output().unwrap();
    assert!(
        out.status.success(),
        "toructl {args:?} failed: {}",
        text(&out)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn json(d: &Daemon, args: &[&str]) -> Value {
    let mut all = vec!["-o", "json"];
    all.extend_from_slice(args);
    serde_json::from_str(&ok(d, &all)).unwrap()
}

fn text(out: &Output) -> String {
    format!(
        "status {:?}\nstdout: {}\nstderr: {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// A daemon with `hello` and `py-echo` installed, both running.
async fn daemon() -> Daemon {
    let install = |d: &Daemon| {
        d.install_hello("hello");
        d.install_py_echo();
    };
    start_enabled(&[], install, &["hello", "py-echo"]).await.0
}

/// A running `toructl` whose stdout lines arrive on a channel.
struct Follower {
    child: Child,
    lines: mpsc::Receiver<String>,
}

impl Follower {
    fn start(d: &Daemon, args: &[&str]) -> Self {
        let mut child = cmd(d, args).stdout(Stdio::piped()).spawn().unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Follower { child, lines }
    }

    /// Waits for a line containing `needle`, returning every line up to it.
    fn wait_for(&self, needle: &str, limit: Duration) -> Vec<String> {
        let deadline = Instant::now() + limit;
        let mut seen = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    let done = line.contains(needle);
                    seen.push(line);
                    if done {
                        return seen;
                    }
                }
                Err(_) => panic!("no line with {needle:?} within {limit:?}; saw {seen:#?}"),
            }
        }
    }
}

impl Drop for Follower {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test]
async fn plugins_commands_print_tables_and_json() {
    let d = daemon().await;
    let table = ok(&d, &["plugins", "list"]);
    let lines: Vec<&str> = table.lines().collect();
    assert!(
        lines[0].starts_with("ID ") && lines[0].contains("STATE"),
        "{table}"
    );
    assert!(
        lines[1].starts_with("hello ") && lines[1].contains("running"),
        "{table}"
    );
    assert!(
        lines[2].starts_with("py-echo ") && lines[2].contains("running"),
        "{table}"
    );

    let list = json(&d, &["plugins", "list"]);
    let ids: Vec<&str> = list["plugins"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["hello", "py-echo"]);

    let details = ok(&d, &["plugins", "get", "hello"]);
    assert!(
        details.contains("name:") && details.contains("Hello (Rust example)"),
        "{details}"
    );

    let stopped = json(&d, &["plugins", "disable", "hello"]);
    assert_eq!(stopped["state"], "stopped");
    assert_eq!(stopped["enabled"], false);
    let started = json(&d, &["plugins", "enable", "hello"]);
    assert_eq!(started["state"], "running");
    let pid = started["pid"].as_i64().unwrap();
    let restarted = json(&d, &["plugins", "restart", "hello"]);
    assert_eq!(restarted["state"], "running");
    assert_ne!(restarted["pid"].as_i64().unwrap(), pid);

    d.install_fixture("extra", "v2-echo", &[]);
    let rescan = ok(&d, &["plugins", "rescan"]);
    assert!(rescan.contains("added: extra"), "{rescan}");
    assert_eq!(
        json(&d, &["plugins", "rescan"])["added"],
        serde_json::json!([])
    );
}

#[tokio::test]
async fn kv_and_call_forward_to_plugins() {
    let d = daemon().await;
    ok(&d, &["kv", "set", "hello", "color", "blue"]);
    assert_eq!(ok(&d, &["kv", "get", "hello", "color"]), "blue\n");
    assert_eq!(
        json(&d, &["kv", "get", "hello", "color"]),
        serde_json::json!({"found": true, "value": "blue"})
    );
    ok(&d, &["kv", "delete", "hello", "color"]);
    let missing = cmd(&d, &["kv", "get", "hello", "color"]).output().unwrap();
    assert_eq!(missing.status.code(), Some(1), "{}", text(&missing));
    assert!(missing.stdout.is_empty());
    assert!(String::from_utf8_lossy(&missing.stderr).contains("no key \"color\""));

    let answer = ok(
        &d,
        &[
            "call",
            "py-echo",
            "/echo?x=1",
            "-X",
            "POST",
            "-d",
            "hi",
            "-H",
            "content-type: text/plain",
        ],
    );
    assert!(answer.starts_with("HTTP 200\n"), "{answer}");
    assert!(
        answer.contains(r#""path": "/echo?x=1""#) && answer.contains(r#""body": "hi""#),
        "{answer}"
    );
    let answer = json(&d, &["call", "hello", "/greet"]);
    assert_eq!(answer["status"], 200);
    assert_eq!(answer["body"], "hello from GET /greet (0 body bytes)");
}

#[tokio::test]
async fn logs_filter_and_resume_from_a_cursor() {
    let d = daemon().await;
    // Both plugins, last record each: one line per plugin.
    let tail = ok(&d, &["logs", "hello", "py-echo", "--tail", "1"]);
    assert_eq!(tail.lines().count(), 2, "{tail}");
    assert!(
        tail.contains(" hello ") && tail.contains(" py-echo "),
        "{tail}"
    );

    // --grep and --level filter; -o json gives cursors.
    let lines = ok(
        &d,
        &[
            "-o", "json", "logs", "py-echo", "--tail", "100", "--grep", "ready",
        ],
    );
    let records: Vec<Value> = lines
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(!records.is_empty());
    assert!(records
        .iter()
        .all(|r| r["message"].as_str().unwrap().contains("ready")));
    let warn = ok(&d, &["logs", "py-echo", "--tail", "100", "--level", "warn"]);
    assert_eq!(warn, "", "py-echo logged nothing at warn or above");

    // Resume after the last record: nothing yet; after a restart, only the new records.
    let all = ok(&d, &["-o", "json", "logs", "py-echo", "--tail", "1000"]);
    let last: Value = serde_json::from_str(all.lines().last().unwrap()).unwrap();
    let cursor = last["cursor"].as_str().unwrap().to_owned();
    assert_eq!(ok(&d, &["logs", "--after", &cursor]), "");
    ok(&d, &["plugins", "restart", "py-echo"]);
    let after = ok(&d, &["-o", "json", "logs", "--after", &cursor]);
    let seqs: Vec<u64> = after
        .lines()
        .map(|l| {
            serde_json::from_str::<Value>(l).unwrap()["seq"]
                .as_u64()
                .unwrap()
        })
        .collect();
    let first = last["seq"].as_u64().unwrap() + 1;
    assert_eq!(seqs, (first..first + seqs.len() as u64).collect::<Vec<_>>());
    assert!(after.contains("running: ready"), "{after}");

    // --since an age covers everything just written.
    let since = ok(&d, &["logs", "py-echo", "--since", "1h"]);
    assert!(since.contains("running: ready"), "{since}");
    let bad = cmd(&d, &["logs", "--level", "loud"]).output().unwrap();
    assert!(!bad.status.success());
    assert_eq!(
        String::from_utf8_lossy(&bad.stderr).lines().count(),
        1,
        "{}",
        text(&bad)
    );
}

#[tokio::test]
async fn logs_and_events_follow_live() {
    let d = daemon().await;
    // The last stored record comes first, so the stream is open before anything happens.
    let logs = Follower::start(&d, &["logs", "-f", "hello", "--tail", "1"]);
    logs.wait_for("", SECS10);
    let events = Follower::start(&d, &["events", "-f", "hello"]);
    // Stored events are replayed first.
    events.wait_for("starting -> running", SECS10);
    ok(&d, &["plugins", "disable", "hello"]);
    events.wait_for("stopping -> stopped", SECS10);
    ok(&d, &["plugins", "enable", "hello"]);
    let mut seen = logs.wait_for("starting: spawned", SECS10);
    seen.extend(logs.wait_for("running: ready", SECS10));
    assert!(seen.iter().all(|l| l.contains(" hello ")), "{seen:#?}");
    events.wait_for("starting -> running", SECS10);

    // Without -f, events stops after the stored ones.
    let stored = ok(&d, &["-o", "json", "events", "hello"]);
    let kinds: Vec<Value> = stored
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(kinds[0]["kind"], "plugin_added");
    assert_eq!(kinds.last().unwrap()["to_state"], "running");
}

#[tokio::test]
async fn health_reports_the_daemon_and_plugins() {
    let d = daemon().await;
    let table = ok(&d, &["health"]);
    assert!(
        table.contains("torud") && table.contains("SERVING"),
        "{table}"
    );
    assert!(table.contains("toru.plugin.py-echo"), "{table}");
    ok(&d, &["plugins", "disable", "py-echo"]);
    let out = cmd(&d, &["health", "py-echo"]).output().unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("NOT_SERVING"));
    ok(&d, &["health", "hello"]);
}

#[tokio::test]
async fn errors_are_one_line_and_exit_non_zero() {
    let d = daemon().await;
    for args in [
        vec!["plugins", "get", "nope"],
        vec!["kv", "get", "nope", "k"],
        vec!["--addr", "127.0.0.1:1", "plugins", "list"],
        vec!["--addr", "nonsense", "plugins", "list"],
    ] {
        let out = cmd(&d, &args).output().unwrap();
        assert_eq!(out.status.code(), Some(1), "{args:?}: {}", text(&out));
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(err.lines().count(), 1, "{args:?}: {}", text(&out));
        assert!(err.starts_with("toructl: error: "), "{args:?}: {err}");
    }
    let out = cmd(&d, &["plugins", "get", "nope"]).output().unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("NOT_FOUND"));
}

#[tokio::test]
async fn address_from_the_environment() {
    let d = daemon().await;
    let out = Command::new(TORUCTL)
        .args(["plugins", "list"])
        .env("TORUD_ADDR", &d.addr)
        .env("TORUD_DATA_DIR", &d.data_dir)
        .env_remove("TORUD_TOKEN")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("hello"));
}

#[tokio::test]
async fn credentials_from_flags_the_data_dir_or_the_socket() {
    let d = daemon().await;
    let bare = |args: &[&str]| {
        Command::new(TORUCTL)
            .args(args)
            .env_remove("TORUD_ADDR")
            .env_remove("TORUD_TOKEN")
            .env_remove("TORUD_DATA_DIR")
            .output()
            .unwrap()
    };
    // No token over TCP: one line naming UNAUTHENTICATED and what to do.
    let out = bare(&["--addr", &d.addr, "plugins", "list"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.contains("UNAUTHENTICATED") && err.contains("--token"),
        "{err}"
    );

    // The read token may list but not disable.
    let read = d.token("read");
    let out = bare(&["--addr", &d.addr, "--token", &read, "plugins", "list"]);
    assert!(out.status.success(), "{}", text(&out));
    let out = bare(&[
        "--addr", &d.addr, "--token", &read, "plugins", "disable", "hello",
    ]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(String::from_utf8_lossy(&out.stderr).contains("PERMISSION_DENIED"));

    // The admin token from TORUD_TOKEN.
    let out = Command::new(TORUCTL)
        .args(["--addr", &d.addr, "kv", "set", "hello", "k", "v"])
        .env("TORUD_TOKEN", d.token("admin"))
        .env_remove("TORUD_DATA_DIR")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));

    // Only the data dir: its control socket, no token needed.
    let dir = d.data_dir.display().to_string();
    let out = bare(&["--data-dir", &dir, "kv", "get", "hello", "k"]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "v\n");
}

/// PEM files in `dir`: a CA, a server certificate for localhost and a client certificate.
fn write_pki(dir: &std::path::Path) {
    let pki = pki();
    for (name, pem) in [
        ("ca.pem", &pki.ca),
        ("server.pem", &pki.server_cert),
        ("server.key", &pki.server_key),
        ("client.pem", &pki.client_cert),
        ("client.key", &pki.client_key),
    ] {
        std::fs::write(dir.join(name), pem).unwrap();
    }
}

#[tokio::test]
async fn tls_with_a_client_certificate() {
    let mut d = Daemon::new(&["--enable-new-plugins"]);
    let pki = d.root.path().to_owned();
    write_pki(&pki);
    let file = |name: &str| pki.join(name).display().to_string();
    d.args.extend([
        "--tls-cert".into(),
        file("server.pem"),
        "--tls-key".into(),
        file("server.key"),
        "--tls-client-ca".into(),
        file("ca.pem"),
    ]);
    d.install_hello("hello");
    d.start().await;
    // The listener answers before the first scan has found every plugin.
    let mut client = d.client().await;
    Events::watch(&mut client, Some(0))
        .await
        .wait_added(&["hello"])
        .await;
    let port = d.addr.rsplit(':').next().unwrap().to_owned();
    let addr = format!("https://localhost:{port}");
    let dir = d.data_dir.display().to_string();
    let tls = |extra: &[&str]| {
        let mut args = vec!["--addr", &addr, "--data-dir", &dir];
        args.extend_from_slice(extra);
        Command::new(TORUCTL)
            .args(args)
            .env_remove("TORUD_TOKEN")
            .output()
            .unwrap()
    };
    let (ca, cert, key) = (file("ca.pem"), file("client.pem"), file("client.key"));
    let out = tls(&[
        "--tls-ca",
        &ca,
        "--tls-cert",
        &cert,
        "--tls-key",
        &key,
        "plugins",
        "list",
    ]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("hello"));

    // Without the CA: told what to give. Without a client certificate: refused.
    for (args, needle) in [
        (vec!["plugins", "list"], "--tls-ca"),
        (vec!["--tls-ca", &ca, "plugins", "list"], "toructl: error: "),
    ] {
        let out = tls(&args);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {}", text(&out));
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(err.lines().count(), 1, "{args:?}: {err}");
        assert!(err.contains(needle), "{args:?}: {err}");
    }
}

/// `toructl logs -f | head -1`: once the reader goes away, the next write ends toructl
/// quietly with status 0 (no panic, no signal).
#[tokio::test]
async fn a_closed_stdout_ends_a_follow_quietly() {
    let d = daemon().await;
    let mut child = cmd(&d, &["logs", "-f", "hello", "--tail", "1"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut first = String::new();
    stdout.read_line(&mut first).unwrap();
    assert!(first.contains(" hello "), "{first}");
    drop(stdout);
    ok(&d, &["plugins", "restart", "hello"]);
    let deadline = Instant::now() + SECS10;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "toructl kept running with stdout closed"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    assert_eq!(status.code(), Some(0), "{stderr}");
    assert_eq!(stderr, "");
}

/// The bytes a terminal would act on: ESC, CR and BEL (and any other C0 control but the
/// line breaks toructl writes itself, DEL, and C1 as UTF-8).
fn raw_controls(bytes: &[u8]) -> Vec<String> {
    String::from_utf8_lossy(bytes)
        .chars()
        .filter(|c| c.is_control() && *c != '\n')
        .map(|c| format!("U+{:04X}", c as u32))
        .collect()
}

#[tokio::test]
async fn terminal_escapes_from_plugins_are_shown_escaped_and_json_stays_exact() {
    const HOSTILE: &str = "\x1b[2J\x1b]0;x\x07\r";
    const SHOWN: &str = "\\e[2J\\e]0;x\\x07\\r";
    let install = |d: &Daemon| {
        d.install_fixture("hostile", "v2-hostile", &[]);
        let red = d.install_fixture("red", "normal", &[]);
        std::fs::rename(red, d.plugins_dir.join("e\x1b[31mRED.binary")).unwrap();
    };
    let d = start_enabled(&[], install, &["hostile"]).await.0;
    let human = |args: &[&str]| {
        let out = cmd(&d, args).output().unwrap();
        let bad = raw_controls(&out.stdout)
            .into_iter()
            .chain(raw_controls(&out.stderr))
            .collect::<Vec<_>>();
        assert!(
            bad.is_empty(),
            "toructl {args:?} printed {bad:?}: {}",
            text(&out)
        );
        let expect_failure = args.contains(&"refuse");
        assert_eq!(
            out.status.success(),
            !expect_failure,
            "{args:?}: {}",
            text(&out)
        );
        out
    };

    // A plugin file named with escapes: skipped, its path shown escaped.
    let rescan = String::from_utf8(human(&["plugins", "rescan"]).stdout).unwrap();
    assert!(
        rescan.contains("e\\e[31mRED.binary: its file name"),
        "{rescan}"
    );
    let skipped = &json(&d, &["plugins", "rescan"])["skipped"][0]["path"];
    assert!(
        skipped.as_str().unwrap().ends_with("e\x1b[31mRED.binary"),
        "{skipped}"
    );

    // Log lines, plain and structured.
    let mut logged = Value::Null;
    wait_until("the plugin's hostile log lines", SECS10, || {
        logged = json_lines(&d, &["logs", "hostile", "--tail", "100"]);
        logged.as_array().unwrap().len() >= 2 && logged.to_string().contains("json \\u001b[2J")
    })
    .await;
    let messages: Vec<&str> = logged
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["message"].as_str().unwrap())
        .collect();
    assert!(
        messages.contains(&format!("plain {HOSTILE} end").as_str()),
        "{messages:?}"
    );
    assert!(
        messages.contains(&format!("json {HOSTILE} end").as_str()),
        "{messages:?}"
    );
    let logs = String::from_utf8(human(&["logs", "hostile", "--tail", "100"]).stdout).unwrap();
    assert!(logs.contains(&format!("plain {SHOWN} end")), "{logs}");
    assert!(logs.contains(&format!("json {SHOWN} end")), "{logs}");

    // A call's headers (where CR is refused) and body.
    let call = String::from_utf8(human(&["call", "hostile", "/hostile"]).stdout).unwrap();
    assert!(call.contains("x-hostile: v\\e[2J\\e]0;x\\x07\n"), "{call}");
    assert!(
        call.contains(&format!("line one{SHOWN}\nline two\n")),
        "{call}"
    );
    let exact = json(&d, &["call", "hostile", "/hostile"]);
    assert_eq!(exact["headers"][0]["value"], "v\x1b[2J\x1b]0;x\x07");
    assert_eq!(exact["body"], format!("line one{HOSTILE}\nline two\n"));

    // An error message the plugin wrote, on stderr.
    let out = human(&["kv", "get", "hostile", "refuse"]);
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(err.contains(&format!("no{SHOWN}")), "{err}");
    human(&["events"]);
}

/// `toructl -o json ARGS` printing one JSON object per line, as an array.
fn json_lines(d: &Daemon, args: &[&str]) -> Value {
    let mut all = vec!["-o", "json"];
    all.extend_from_slice(args);
    let out = ok(d, &all);
    Value::Array(
        out.lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect(),
    )
}

#[tokio::test]
async fn config_show_and_reload() {
    let mut d = Daemon::new(&[]);
    let file = d.root.path().join("config.toml");
    let config = |hello: &str| {
        let text = format!(
            "enable-new-plugins = true\n[plugins.hello]\nenv = {{ KEY = \"hunter2-secret\" }}\n{hello}\n"
        );
        std::fs::write(&file, text).unwrap();
    };
    config("call-timeout = \"11s\"");
    d.args
        .extend(["--config".to_owned(), file.display().to_string()]);
    d.install_hello("hello");
    d.start().await;
    let mut client = d.client().await;
    let mut events = Events::watch(&mut client, Some(0)).await;
    events
        .wait_state(
            "hello",
            torud_api::pb::PluginState::Running,
            Duration::from_secs(20),
        )
        .await;

    let shown = ok(&d, &["config", "show"]);
    assert!(
        shown.starts_with(&format!("# config file: {}\n", file.display())),
        "{shown}"
    );
    assert!(shown.contains("call-timeout = \"11s\""), "{shown}");
    assert!(!shown.contains("hunter2-secret"), "{shown}");
    assert_eq!(
        json(&d, &["config", "show"])["file"],
        file.display().to_string()
    );

    config("call-timeout = \"12s\"\nargs = [\"--again\"]");
    let reloaded = ok(&d, &["config", "reload"]);
    assert_eq!(
        reloaded,
        format!(
            "reloaded: {}\nplugins needing a restart: hello (args)\n\
             settings needing a daemon restart: -\n",
            file.display()
        )
    );
    let pid = get(&mut client, "hello").await.pid;
    let reloaded = ok(&d, &["config", "reload", "--restart"]);
    assert!(
        reloaded.contains("plugins restarted: hello\n"),
        "{reloaded}"
    );
    assert_ne!(get(&mut client, "hello").await.pid, pid);
    let again = json(&d, &["config", "reload"]);
    assert_eq!(again["plugins_needing_restart"], serde_json::json!([]));

    std::fs::write(&file, "[plugins.hello]\nmax-failures = 0\n").unwrap();
    let out = cmd(&d, &["config", "reload"]).output().unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    let want = format!(
        "toructl: error: FAILED_PRECONDITION: {}:2:16: plugins.hello.max-failures: ",
        file.display()
    );
    assert!(err.starts_with(&want), "{err}");
    assert!(ok(&d, &["config", "show"]).contains("call-timeout = \"12s\""));
}
