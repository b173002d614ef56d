//! The README's grpcurl walk-through and toructl examples, run exactly as written against a
//! live daemon with the example plugins. Each fenced block after a `<!-- readme-test: NAME
//! -->` marker is read from README.md; only the address (`127.0.0.1:50051`), the data
//! directory (`target/example-data`) and toructl's directory (`$PWD/target/release`) are
//! swapped for the test's. Every command must succeed (or end as the README says), and the
//! commands the README promises must be there, with the output they promise.
//!
//! grpcurl comes from `$GRPCURL`, else `PATH`, else `$(go env GOPATH)/bin`; `tests/run.sh`
//! installs a pinned one.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;
use serde_json::Value;

const README: &str = include_str!("../README.md");

/// The lines of the fenced block that follows `<!-- readme-test: NAME -->`.
fn block(name: &str) -> Vec<String> {
    let marker = format!("<!-- readme-test: {name} -->");
    let after = README
        .split_once(&marker)
        .unwrap_or_else(|| panic!("README.md has no {marker}"))
        .1;
    let body = after.trim_start().split_once('\n').unwrap().1;
    let end = body.find("\n```").expect("unterminated block");
    body[..end].lines().map(str::to_owned).collect()
}

/// One README command and what it did.
struct Ran {
    line: String,
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl std::fmt::Debug for Ran {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "$ {}\nexit {:?}\n{}\n{}",
            self.line, self.code, self.stdout, self.stderr
        )
    }
}

/// Runs each command line of a block in its own `bash`, after the block's variable
/// assignments and exports, with the test's values substituted.
fn run_block(name: &str, swaps: &[(&str, String)], path: &str) -> Vec<Ran> {
    let swap = |line: &str| {
        swaps
            .iter()
            .fold(line.to_owned(), |l, (from, to)| l.replace(from, to))
    };
    let mut prelude = String::from("set -e\n");
    let mut ran = Vec::new();
    for line in block(name) {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let is_assignment = line.starts_with("export ")
            || line
                .split_once('=')
                .is_some_and(|(k, _)| k.chars().all(|c| c.is_ascii_uppercase() || c == '_'));
        if is_assignment {
            prelude.push_str(&swap(line));
            prelude.push('\n');
            continue;
        }
        let out = Command::new("bash")
            .arg("-c")
            .arg(format!("{prelude}{}", swap(line)))
            .env("PATH", path)
            .env_remove("TORUD_ADDR")
            .env_remove("TORUD_TOKEN")
            .env_remove("TORUD_DATA_DIR")
            .output()
            .unwrap();
        ran.push(Ran {
            line: line.to_owned(),
            code: out.status.code(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        });
    }
    ran
}

/// The one command whose line contains every needle.
fn find<'a>(ran: &'a [Ran], needles: &[&str]) -> &'a Ran {
    let hits: Vec<&Ran> = ran
        .iter()
        .filter(|r| needles.iter().all(|n| r.line.contains(n)))
        .collect();
    assert_eq!(
        hits.len(),
        1,
        "README should have exactly one command with {needles:?}"
    );
    hits[0]
}

fn grpcurl() -> PathBuf {
    if let Some(p) = std::env::var_os("GRPCURL") {
        return p.into();
    }
    let on_path = std::env::var_os("PATH")
        .map(|p| {
            std::env::split_paths(&p)
                .map(|d| d.join("grpcurl"))
                .collect::<Vec<_>>()
        })
        .unwrap_or_default();
    let gopath = Command::new("go")
        .args(["env", "GOPATH"])
        .output()
        .ok()
        .map(|o| PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()).join("bin/grpcurl"));
    on_path
        .into_iter()
        .chain(gopath)
        .find(|p| p.is_file())
        .expect("grpcurl not found: `bash tests/run.sh` installs it, or `go install github.com/fullstorydev/grpcurl/cmd/grpcurl@v1.9.3`")
}

/// `dir` first on `PATH`.
fn path_with(dir: &Path) -> String {
    let rest = std::env::var("PATH").unwrap_or_default();
    format!("{}:{rest}", dir.display())
}

async fn daemon() -> Daemon {
    let install = |d: &Daemon| {
        d.install_hello("hello");
        d.install_py_echo();
    };
    start_enabled(&[], install, &["hello", "py-echo"]).await.0
}

fn json(r: &Ran) -> Value {
    serde_json::from_str(&r.stdout).unwrap_or_else(|e| panic!("{e}: {r:?}"))
}

#[tokio::test]
async fn grpcurl_walk_through_runs_as_written() {
    let d = daemon().await;
    let grpcurl = grpcurl();
    let swaps = [
        ("127.0.0.1:50051", d.addr.clone()),
        ("target/example-data", d.data_dir.display().to_string()),
    ];
    let ran = run_block("grpcurl", &swaps, &path_with(grpcurl.parent().unwrap()));

    // Follow streams end at -max-time with DeadlineExceeded (exit 64 + 4); all else succeeds.
    for r in &ran {
        let expected = if r.line.contains("-max-time") { 68 } else { 0 };
        assert_eq!(r.code, Some(expected), "{r:?}");
    }

    let list = find(&ran, &[" list"]);
    for service in [
        "toru.v1.PluginService",
        "toru.v1.KvService",
        "toru.v1.LogService",
        "grpc.health.v1.Health",
        "grpc.reflection.v1.ServerReflection",
    ] {
        assert!(list.stdout.lines().any(|l| l == service), "{list:?}");
    }
    let describe = find(&ran, &["describe toru.v1.KvService"]);
    assert!(describe.stdout.contains("rpc GetValue"), "{describe:?}");

    let plugins = json(find(&ran, &["ListPlugins"]));
    let ids: Vec<&str> = plugins["plugins"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["hello", "py-echo"]);
    assert_eq!(plugins["plugins"][0]["state"], "PLUGIN_STATE_RUNNING");

    let disabled = json(find(&ran, &["DisablePlugin"]));
    assert_eq!(disabled["plugin"]["state"], "PLUGIN_STATE_STOPPED");
    let enabled = json(find(&ran, &["EnablePlugin"]));
    assert_eq!(enabled["plugin"]["state"], "PLUGIN_STATE_RUNNING");

    let events = find(&ran, &["WatchEvents", "after_seq"]);
    assert!(
        events.stdout.contains("EVENT_KIND_PLUGIN_ADDED"),
        "{events:?}"
    );
    assert!(events.stderr.contains("DeadlineExceeded"), "{events:?}");
    let from_now = find(&ran, &["WatchEvents", "plugin_ids"]);
    assert_eq!(from_now.stdout, "", "{from_now:?}");

    assert_eq!(json(find(&ran, &["SetValue"])), serde_json::json!({}));
    let got = json(find(&ran, &["GetValue", "color"]));
    assert_eq!(got, serde_json::json!({"found": true, "value": "blue"}));
    assert_eq!(
        json(find(&ran, &["GetValue", "missing"])),
        serde_json::json!({})
    );

    let call = json(find(&ran, &["CallPlugin"]));
    assert_eq!(call["status"], 200);
    let body = base64_decode(call["body"].as_str().unwrap());
    let body: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(
        body,
        serde_json::json!({"method": "POST", "path": "/echo?x=1", "body": "hello"})
    );

    let follow = find(&ran, &["StreamLogs", "\"follow\": true"]);
    assert!(follow.stdout.contains("\"cursor\": \"hello:"), "{follow:?}");
    assert!(follow.stderr.contains("DeadlineExceeded"), "{follow:?}");
    // hello logs nothing at warn or above: the resumed, filtered stream is empty and ends.
    let resumed = find(&ran, &["StreamLogs", "after_cursors"]);
    assert_eq!(resumed.stdout.trim(), "", "{resumed:?}");

    let page = json(find(&ran, &["QueryLogs"]));
    assert_eq!(page["records"].as_array().unwrap().len(), 2, "{page}");
    assert!(page["nextPageToken"].is_string());

    let health = json(find(&ran, &["Health/Check"]));
    assert_eq!(health["status"], "SERVING");
    assert!(find(&ran, &["RescanPlugins"]).code == Some(0));

    // Over TCP: reflection without a token, the admin token for everything, the read token
    // refused a change with PermissionDenied (exit 64 + 7).
    let tcp = run_block("grpcurl-tcp", &swaps, &path_with(grpcurl.parent().unwrap()));
    let list = find(&tcp, &[" list"]);
    assert_eq!(list.code, Some(0), "{list:?}");
    assert!(list.stdout.contains("toru.v1.PluginService"), "{list:?}");
    let admin = find(&tcp, &["admin.token", "ListPlugins"]);
    assert_eq!(admin.code, Some(0), "{admin:?}");
    assert_eq!(
        json(admin)["plugins"].as_array().unwrap().len(),
        2,
        "{admin:?}"
    );
    let read = find(&tcp, &["read.token", "DisablePlugin"]);
    assert_eq!(read.code, Some(71), "{read:?}");
    assert!(read.stderr.contains("PermissionDenied"), "{read:?}");
    assert_eq!(tcp.len(), 3, "a README command is not checked: {tcp:?}");
}

/// Standard base64, as grpcurl prints bytes.
fn base64_decode(text: &str) -> Vec<u8> {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = Vec::new();
    let (mut acc, mut bits) = (0u32, 0);
    for c in text.bytes().filter(|&c| c != b'=') {
        let v = ALPHABET.iter().position(|&a| a == c).expect("base64") as u32;
        acc = (acc << 6) | v;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    out
}

#[tokio::test]
async fn toructl_examples_run_as_written() {
    let d = daemon().await;
    let bin = Path::new(env!("CARGO_BIN_EXE_toructl")).parent().unwrap();
    let swaps = [
        ("$PWD/target/release", bin.display().to_string()),
        ("127.0.0.1:50051", d.addr.clone()),
        ("target/example-data", d.data_dir.display().to_string()),
    ];
    let ran = run_block("toructl", &swaps, &path_with(bin));
    for r in &ran {
        assert_eq!(r.code, Some(0), "{r:?}");
        assert_eq!(r.stderr, "", "{r:?}");
    }
    let list = find(&ran, &["toructl plugins list"]);
    assert!(list.stdout.starts_with("ID "), "{list:?}");
    assert!(list.stdout.contains("\nhello "), "{list:?}");
    assert!(find(&ran, &["plugins get hello"])
        .stdout
        .contains("Hello (Rust example)"));
    assert!(find(&ran, &["plugins enable hello"])
        .stdout
        .contains("running"));
    assert!(find(&ran, &["plugins restart py-echo"])
        .stdout
        .contains("running"));
    assert_eq!(find(&ran, &["kv get hello color"]).stdout, "blue\n");
    assert!(find(&ran, &["call py-echo"])
        .stdout
        .starts_with("HTTP 200\n"));
    let tail = find(&ran, &["--tail 5"]);
    assert_eq!(tail.stdout.lines().count(), 10, "{tail:?}");
    let one: Value = serde_json::from_str(find(&ran, &["-o json logs"]).stdout.trim()).unwrap();
    assert!(one["cursor"].as_str().unwrap().starts_with("py-echo:"));
    let after = find(&ran, &["--after py-echo:2"]);
    assert!(after.stdout.contains("starting: spawned"), "{after:?}");
    let events = find(&ran, &["events hello"]);
    assert!(events.stdout.contains("plugin_added"), "{events:?}");
    let health = find(&ran, &["toructl health"]);
    assert!(health.stdout.contains("toru.plugin.hello"), "{health:?}");
    let socket = find(&ran, &["--addr unix:"]);
    assert!(socket.stdout.contains("\nhello "), "{socket:?}");
}
