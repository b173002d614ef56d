//! Test harness: a real `torud` process in a temporary directory, real plugin executables
//! (the Rust example and the Python fixture), a gRPC client, and waiting on events with
//! deadlines instead of sleeping.
#![allow(dead_code)]

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, Command};
use tonic::transport::Channel;
use torud_api::pb;
use torud_api::pb::plugin_service_client::PluginServiceClient;

pub const TORUD: &str = env!("CARGO_BIN_EXE_torud");
pub const FIXTURE: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/fixtures/fixture_plugin.py"
);
pub const PY_ECHO: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/examples/python/py-echo.binary"
);
/// The Python SDK's directory (for `PYTHONPATH`).
pub const PY_SDK: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/plugin-sdk/python");
/// A v1 plugin in the style of Toru's Python example.
pub const PY_ECHO_V1: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/py_echo_v1.py");

/// An example binary built by `cargo test` next to the daemon (`hello-plugin`,
/// `toru-crate-plugin`).
pub fn example_path(name: &str) -> PathBuf {
    let path = Path::new(TORUD)
        .parent()
        .unwrap()
        .join("examples")
        .join(name);
    assert!(
        path.exists(),
        "{} is missing: run `cargo build --examples`",
        path.display()
    );
    path
}

/// A daemon under test.
pub struct Daemon {
    pub root: tempfile::TempDir,
    pub plugins_dir: PathBuf,
    pub data_dir: PathBuf,
    pub args: Vec<String>,
    /// Extra environment variables for the daemon process.
    pub envs: Vec<(String, String)>,
    pub addr: String,
    /// The metrics endpoint's address, when `--metrics-listen` was given.
    pub metrics_addr: Option<String>,
    /// The umask the daemon starts with (`None`: the test's).
    pub umask: Option<libc::mode_t>,
    /// A descriptor of the test's that the daemon inherits without close-on-exec.
    pub inherit_fd: Option<i32>,
    /// Run the daemon as this uid (and gid), not root; see [`Daemon::hand_to`].
    pub run_as: Option<u32>,
    child: Option<Child>,
}

impl Daemon {
    /// A daemon (not started) with fast timings for tests; `args` override them.
    pub fn new(args: &[&str]) -> Self {
        let root = tempfile::Builder::new().prefix("torud-").tempdir().unwrap();
        // Plugins run as their own users: they must be able to traverse to their files.
        std::fs::set_permissions(root.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let plugins_dir = root.path().join("plugins");
        let data_dir = root.path().join("data");
        std::fs::create_dir_all(&plugins_dir).unwrap();
        let mut all: Vec<String> = [
            "--backoff-base",
            "200ms",
            "--stop-grace",
            "2s",
            "--kill-grace",
            "1s",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        all.extend(args.iter().map(|s| s.to_string()));
        Daemon {
            root,
            plugins_dir,
            data_dir,
            args: all,
            envs: Vec::new(),
            addr: String::new(),
            metrics_addr: None,
            umask: None,
            inherit_fd: None,
            run_as: None,
            child: None,
        }
    }

    /// Starts the daemon and waits (with a deadline) for its "listening" line.
    pub async fn start(&mut self) {
        let stderr = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.root.path().join("daemon.stderr"))
            .unwrap();
        let mut cmd = Command::new(TORUD);
        let (umask, inherit_fd, run_as) = (self.umask, self.inherit_fd, self.run_as);
        // SAFETY: umask, fcntl, setgroups, setgid and setuid are async-signal-safe.
        unsafe {
            cmd.pre_exec(move || {
                if let Some(id) = run_as {
                    if libc::setgroups(0, std::ptr::null()) != 0
                        || libc::setgid(id) != 0
                        || libc::setuid(id) != 0
                    {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                if let Some(mask) = umask {
                    libc::umask(mask);
                }
                if let Some(fd) = inherit_fd {
                    libc::fcntl(fd, libc::F_SETFD, 0);
                }
                Ok(())
            });
        }
        let mut child = cmd
            .arg("serve")
            .args(["--listen", "127.0.0.1:0"])
            .arg("--plugins-dir")
            .arg(&self.plugins_dir)
            .arg("--data-dir")
            .arg(&self.data_dir)
            .args(["--log", "torud=debug"])
            .args(&self.args)
            .envs(self.envs.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::piped())
            .stderr(stderr)
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let mut lines = BufReader::new(stdout).lines();
        let line = tokio::time::timeout(Duration::from_secs(20), lines.next_line())
            .await
            .expect("daemon did not report listening within 20 s")
            .unwrap()
            .expect("daemon exited before listening");
        self.addr = line
            .strip_prefix("torud listening on ")
            .expect(&line)
            .to_owned();
        if self.args.iter().any(|a| a == "--metrics-listen") {
            let line = tokio::time::timeout(Duration::from_secs(5), lines.next_line())
                .await
                .expect("daemon did not report its metrics address")
                .unwrap()
                .expect("daemon exited before reporting its metrics address");
            let addr = line
                .strip_prefix("torud metrics on http://")
                .and_then(|rest| rest.strip_suffix("/metrics"))
                .expect(&line);
            self.metrics_addr = Some(addr.to_owned());
        }
        // Keep draining stdout so the daemon never blocks on it.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        self.child = Some(child);
    }

    /// Makes the daemon run as `uid` (not root), owning its plugins and data directories.
    pub fn hand_to(&mut self, uid: u32) {
        std::fs::create_dir_all(&self.data_dir).unwrap();
        for dir in [&self.plugins_dir, &self.data_dir] {
            std::os::unix::fs::chown(dir, Some(uid), Some(uid)).unwrap();
        }
        self.run_as = Some(uid);
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id().unwrap()
    }

    /// A channel over the control socket in the data directory (trusted by file
    /// permission, so no token): what most tests use.
    pub async fn channel(&self) -> Channel {
        let mut socket = self.data_dir.join(torud_api::CONTROL_SOCKET);
        if socket.as_os_str().len() >= 100 {
            // Over the kernel's limit for a socket path: connect through a short symlink.
            let link = self.root.path().join("c.sock");
            let _ = std::os::unix::fs::symlink(&socket, &link);
            socket = link;
        }
        let uri = format!("unix://{}", socket.display());
        tonic::transport::Endpoint::from_shared(uri)
            .unwrap()
            .connect()
            .await
            .unwrap()
    }

    /// A channel over TCP, which needs a token on every call but health and reflection.
    pub async fn tcp_channel(&self) -> Channel {
        Channel::from_shared(format!("http://{}", self.addr))
            .unwrap()
            .connect()
            .await
            .unwrap()
    }

    /// A generated token of the daemon's (`admin` or `read`).
    pub fn token(&self, role: &str) -> String {
        std::fs::read_to_string(self.data_dir.join(format!("{role}.token")))
            .unwrap()
            .trim()
            .to_owned()
    }

    pub async fn client(&self) -> PluginServiceClient<Channel> {
        PluginServiceClient::new(self.channel().await)
    }

    /// SIGTERM, then waits for the exit; returns its status. A daemon still there after
    /// 30 s fails the test with what each of its threads (and its children) is blocked
    /// in, so a hang at exit can be diagnosed from the test's output alone.
    pub async fn stop(&mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("daemon not running");
        let pid = child.id().unwrap();
        signal(pid, libc::SIGTERM);
        match tokio::time::timeout(Duration::from_secs(30), child.wait()).await {
            Ok(status) => status.unwrap(),
            Err(_) => panic!(
                "daemon did not exit within 30 s of SIGTERM; its threads and children:\n{}",
                blocked_in(pid)
            ),
        }
    }

    /// SIGKILL, then reaps it.
    pub async fn kill9(&mut self) {
        let mut child = self.child.take().expect("daemon not running");
        signal(child.id().unwrap(), libc::SIGKILL);
        child.wait().await.unwrap();
    }

    /// Installs the Rust example plugin as `<name>.binary`.
    pub fn install_hello(&self, name: &str) -> PathBuf {
        let dest = self.plugins_dir.join(format!("{name}.binary"));
        std::fs::copy(example_path("hello-plugin"), &dest).unwrap();
        dest
    }

    /// Installs the Toru-crate-style v1 fixture as `toru-crate.binary`.
    pub fn install_crate_plugin(&self) -> PathBuf {
        let dest = self.plugins_dir.join("toru-crate.binary");
        std::fs::copy(example_path("toru-crate-plugin"), &dest).unwrap();
        dest
    }

    /// Installs the Python example plugin (on the Python SDK, protocol 2) as
    /// `py-echo.binary`: a wrapper that puts the SDK on `PYTHONPATH`.
    pub fn install_py_echo(&self) -> PathBuf {
        let dest = self.plugins_dir.join("py-echo.binary");
        let script = format!("#!/bin/sh\nPYTHONPATH={PY_SDK} exec python3 {PY_ECHO} \"$@\"\n");
        write_executable(&dest, &script);
        dest
    }

    /// Installs a v1 plugin in the style of Toru's Python example as `py-echo.binary`.
    pub fn install_py_echo_v1(&self) -> PathBuf {
        let dest = self.plugins_dir.join("py-echo.binary");
        std::fs::copy(PY_ECHO_V1, &dest).unwrap();
        dest
    }

    pub async fn kv_client(&self) -> torud_api::pb::kv_service_client::KvServiceClient<Channel> {
        torud_api::pb::kv_service_client::KvServiceClient::new(self.channel().await)
    }

    /// Installs the Python fixture as `<id>.binary` in `mode`, with extra arguments.
    pub fn install_fixture(&self, id: &str, mode: &str, extra: &[&str]) -> PathBuf {
        let dest = self.plugins_dir.join(format!("{id}.binary"));
        let script = format!(
            "#!/bin/sh\nexec python3 {FIXTURE} --id {id} --mode {mode} {} \"$@\"\n",
            extra.join(" ")
        );
        write_executable(&dest, &script);
        dest
    }

    /// Installs the Python fixture behind a shell that does not `exec` it, so the plugin's
    /// pid is the shell's and the Python process is its child.
    pub fn install_fixture_behind_shell(&self, id: &str, mode: &str) -> PathBuf {
        let dest = self.plugins_dir.join(format!("{id}.binary"));
        let script = format!("#!/bin/sh\npython3 {FIXTURE} --id {id} --mode {mode} \"$@\"\n");
        write_executable(&dest, &script);
        dest
    }

    /// Everything stored in a plugin's log (its JSON-line segments, oldest first).
    pub fn log_text(&self, id: &str) -> String {
        let mut segments: Vec<PathBuf> = std::fs::read_dir(self.data_dir.join("logs").join(id))
            .map(|dir| dir.filter_map(|e| e.ok()).map(|e| e.path()).collect())
            .unwrap_or_default();
        segments.retain(|p| p.extension().is_some_and(|x| x == "jsonl"));
        segments.sort();
        segments
            .iter()
            .map(|p| std::fs::read_to_string(p).unwrap_or_default())
            .collect()
    }

    pub fn daemon_stderr(&self) -> String {
        std::fs::read_to_string(self.root.path().join("daemon.stderr")).unwrap_or_default()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("---- daemon stderr ----\n{}", self.daemon_stderr());
        }
        // Stop the daemon gracefully and wait, so it stops its plugins; dropping the child
        // would SIGKILL it and orphan what the plugins forked.
        if let Some(child) = self.child.as_mut() {
            if let Some(pid) = child.id() {
                signal(pid, libc::SIGTERM);
            }
            let deadline = Instant::now() + Duration::from_secs(20);
            while matches!(child.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(5));
            }
        }
    }
}

pub fn write_executable(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
}

pub fn signal(pid: u32, sig: i32) {
    unsafe {
        libc::kill(pid as i32, sig);
    }
}

/// True when the process is gone or a zombie.
pub fn process_gone(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rsplit(')')
            .next()
            .and_then(|rest| rest.split_whitespace().next())
            .is_some_and(|state| state == "Z" || state == "X"),
    }
}

/// The children of a process.
pub fn children(pid: u32) -> Vec<u32> {
    let text =
        std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap_or_default();
    text.split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}

/// Waits until `cond` holds, checking every 10 ms, failing after `limit`.
pub async fn wait_until(what: &str, limit: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !cond() {
        assert!(
            Instant::now() < deadline,
            "timed out after {limit:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A `WatchEvents` subscription with the events seen so far.
pub struct Events {
    stream: tonic::Streaming<pb::WatchEventsResponse>,
    pub seen: Vec<pb::Event>,
    /// Gaps the stream reported (events the event log does not hold).
    pub gaps: Vec<pb::EventGap>,
}

impl Events {
    pub async fn watch(client: &mut PluginServiceClient<Channel>, after_seq: Option<u64>) -> Self {
        let req = pb::WatchEventsRequest {
            after_seq,
            plugin_ids: vec![],
        };
        let stream = client.watch_events(req).await.unwrap().into_inner();
        Events {
            stream,
            seen: Vec::new(),
            gaps: Vec::new(),
        }
    }

    /// The next event, or `None` if none comes within `limit`.
    /// Gaps are recorded in `gaps` and skipped.
    pub async fn next_within(&mut self, limit: Duration) -> Option<pb::Event> {
        let deadline = Instant::now() + limit;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, self.stream.message()).await {
                Ok(Ok(Some(resp))) => match (resp.event, resp.gap) {
                    (Some(event), _) => {
                        self.seen.push(event.clone());
                        return Some(event);
                    }
                    (None, Some(gap)) => self.gaps.push(gap),
                    (None, None) => panic!("an empty WatchEvents message"),
                },
                Ok(other) => panic!("event stream ended: {other:?}"),
                Err(_) => return None,
            }
        }
    }

    /// Waits for the first event matching `pred`, failing after `limit`.
    pub async fn wait_for(
        &mut self,
        what: &str,
        limit: Duration,
        pred: impl Fn(&pb::Event) -> bool,
    ) -> pb::Event {
        let deadline = Instant::now() + limit;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.next_within(left).await {
                Some(e) if pred(&e) => return e,
                Some(_) => {}
                None => panic!(
                    "timed out after {limit:?} waiting for {what}; seen: {:#?}",
                    self.seen
                ),
            }
        }
    }

    /// Waits until every id in `ids` has been discovered.
    pub async fn wait_added(&mut self, ids: &[&str]) {
        let mut missing: Vec<String> = ids.iter().map(|s| s.to_string()).collect();
        for e in &self.seen {
            if e.kind == pb::EventKind::PluginAdded as i32 {
                missing.retain(|id| *id != e.plugin_id);
            }
        }
        while !missing.is_empty() {
            let what = format!("{missing:?} to be discovered");
            let e = self
                .wait_for(&what, SECS10, |e| {
                    e.kind == pb::EventKind::PluginAdded as i32
                })
                .await;
            missing.retain(|id| *id != e.plugin_id);
        }
    }

    /// Waits for `id` to reach `state`.
    pub async fn wait_state(
        &mut self,
        id: &str,
        state: pb::PluginState,
        limit: Duration,
    ) -> pb::Event {
        let what = format!("{id} to reach {state:?}");
        self.wait_for(&what, limit, |e| {
            e.plugin_id == id && e.to_state == state as i32
        })
        .await
    }
}

/// The client type the tests use.
pub type Client = PluginServiceClient<Channel>;

pub use torud_api::Bearer;

/// A plugin client over TCP sending `token`.
pub type TcpClient = PluginServiceClient<tonic::codegen::InterceptedService<Channel, Bearer>>;

impl Daemon {
    pub async fn tcp_client(&self, token: &str) -> TcpClient {
        PluginServiceClient::with_interceptor(self.tcp_channel().await, Bearer::new(token).unwrap())
    }
}

/// `EnablePlugin`, expecting success.
pub async fn enable(client: &mut Client, id: &str) -> pb::Plugin {
    let req = pb::EnablePluginRequest {
        plugin_id: id.into(),
    };
    client
        .enable_plugin(req)
        .await
        .unwrap()
        .into_inner()
        .plugin
        .unwrap()
}

/// `DisablePlugin`, expecting success.
pub async fn disable(client: &mut Client, id: &str) -> pb::Plugin {
    let req = pb::DisablePluginRequest {
        plugin_id: id.into(),
    };
    client
        .disable_plugin(req)
        .await
        .unwrap()
        .into_inner()
        .plugin
        .unwrap()
}

/// `GetPlugin`, expecting success.
pub async fn get(client: &mut Client, id: &str) -> pb::Plugin {
    let req = pb::GetPluginRequest {
        plugin_id: id.into(),
    };
    client
        .get_plugin(req)
        .await
        .unwrap()
        .into_inner()
        .plugin
        .unwrap()
}

/// `RescanPlugins`, expecting success.
pub async fn rescan(client: &mut Client) -> pb::RescanPluginsResponse {
    client
        .rescan_plugins(pb::RescanPluginsRequest {})
        .await
        .unwrap()
        .into_inner()
}

pub fn state_of(p: &pb::Plugin) -> pb::PluginState {
    pb::PluginState::try_from(p.state).unwrap()
}

pub const SECS10: Duration = Duration::from_secs(10);

/// Starts a daemon with `args` whose plugins directory `install` fills, and waits until the
/// plugins `ids` are discovered. Returns it with a client (over the control socket).
pub async fn start_discovered(
    args: &[&str],
    install: impl FnOnce(&Daemon),
    ids: &[&str],
) -> (Daemon, Client) {
    let mut d = Daemon::new(args);
    install(&d);
    d.start().await;
    let mut client = d.client().await;
    Events::watch(&mut client, Some(0))
        .await
        .wait_added(ids)
        .await;
    (d, client)
}

/// [`start_discovered`], then enables every plugin of `ids`.
pub async fn start_enabled(
    args: &[&str],
    install: impl FnOnce(&Daemon),
    ids: &[&str],
) -> (Daemon, Client) {
    let (d, mut client) = start_discovered(args, install, ids).await;
    for id in ids {
        enable(&mut client, id).await;
    }
    (d, client)
}

/// A plain HTTP/1.1 GET: the status code and the body.
pub async fn http_get(addr: &str, path: &str, token: Option<&str>) -> (u16, String) {
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    get_on(stream, addr, path, token).await
}

pub async fn get_on(
    mut stream: tokio::net::TcpStream,
    addr: &str,
    path: &str,
    token: Option<&str>,
) -> (u16, String) {
    let auth = token.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\n{auth}Connection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut response))
        .await
        .expect("no HTTP answer within 10 s")
        .unwrap();
    let text = String::from_utf8_lossy(&response).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").expect("an HTTP answer");
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    (status, body.to_owned())
}

/// The value of the sample whose name and labels are exactly `series`
/// (`name{label="v",…}` as the exposition writes it).
pub fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .map(|v| v.trim().parse().unwrap())
}

pub async fn scrape(d: &Daemon) -> String {
    let addr = d
        .metrics_addr
        .as_deref()
        .expect("started with --metrics-listen");
    let (status, body) = http_get(addr, "/metrics", None).await;
    assert_eq!(status, 200, "{body}");
    body
}

/// A CA, a server certificate for localhost and a client certificate, as PEM.
pub struct Pki {
    pub ca: String,
    pub server_cert: String,
    pub server_key: String,
    pub client_cert: String,
    pub client_key: String,
}

pub fn pki() -> Pki {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let server_key = KeyPair::generate().unwrap();
    let server = CertificateParams::new(vec!["localhost".to_string()])
        .unwrap()
        .signed_by(&server_key, &issuer)
        .unwrap();
    let client_key = KeyPair::generate().unwrap();
    let client = CertificateParams::new(vec!["client".to_string()])
        .unwrap()
        .signed_by(&client_key, &issuer)
        .unwrap();
    Pki {
        ca: ca.pem(),
        server_cert: server.pem(),
        server_key: server_key.serialize_pem(),
        client_cert: client.pem(),
        client_key: client_key.serialize_pem(),
    }
}

/// Each thread of `pid` and of its children: name, state, wait channel and kernel stack
/// (`/proc`; the stack needs root, which the tests run as).
pub fn blocked_in(pid: u32) -> String {
    let mut out = String::new();
    let children =
        std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap_or_default();
    let pids =
        std::iter::once(pid.to_string()).chain(children.split_whitespace().map(str::to_owned));
    for p in pids {
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{p}/task")) else {
            continue;
        };
        for task in tasks.flatten() {
            let dir = task.path();
            let read = |f: &str| std::fs::read_to_string(dir.join(f)).unwrap_or_default();
            let stat = read("stat");
            let state = stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().next())
                .unwrap_or("?")
                .to_owned();
            out.push_str(&format!(
                "pid {p} task {} {:?} state {state} wchan {}\n{}\n",
                task.file_name().to_string_lossy(),
                read("comm").trim(),
                read("wchan"),
                read("stack").trim_end()
            ));
        }
    }
    out
}

/// The daemon's descriptor table, `/proc/<pid>/task/<tid>/fd` of a thread other than its
/// main one: the main thread (the spawner, whose table `/proc/<pid>/fd` shows) has a
/// nearly empty table of its own.
pub fn daemon_fd_dir(pid: u32) -> std::path::PathBuf {
    let task = std::path::PathBuf::from(format!("/proc/{pid}/task"));
    std::fs::read_dir(&task)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .find(|tid| *tid != pid.to_string())
        .map(|tid| task.join(tid).join("fd"))
        .unwrap_or_else(|| format!("/proc/{pid}/fd").into())
}

/// The daemon's open descriptors (its table, see [`daemon_fd_dir`]).
pub fn daemon_fds(pid: u32) -> usize {
    std::fs::read_dir(daemon_fd_dir(pid)).unwrap().count()
}

/// A process's resident memory, in KiB (`VmRSS`).
pub fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap()
}
