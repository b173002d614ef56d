//! Wires the daemon together: binds the listeners (TCP, behind token checks and optionally
//! TLS; the control socket in the data directory, trusted by file permission; and, when asked
//! for, the metrics endpoint), starts the supervisor, serves the gRPC services (plugins, KV,
//! logs, config, health, reflection) on the first two and `/metrics` on the third, reloads the configuration on SIGHUP, and shuts everything down in order when
//! the `shutdown` future resolves: reloads end, open streams end, plugins stop (in parallel,
//! by escalation), the server drains.

use std::future::Future;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, UnixListener};
use tokio_stream::wrappers::UnixListenerStream;
use tokio_util::sync::CancellationToken;
use tonic::service::Routes;
use tonic::transport::{Certificate, Identity, ServerTlsConfig};
use tonic_health::pb::health_server::HealthServer;
use tonic_health::server::{HealthReporter, HealthService};
use tonic_health::ServingStatus;

use crate::api::auth::{AuthLayer, TokenError, TokenSource, Tokens};
use crate::api::config::{ConfigApi, Reloader, StaleProcesses};
use crate::api::health;
use crate::api::kv::KvApi;
use crate::api::logs::LogApi;
use crate::api::plugins::PluginApi;
use crate::api::readiness::HoldLayer;
use crate::api::systemd;
use crate::api::upgrade::{
    self, Began, Handover, KeptListeners, Received, SelfExe, UpgradeError, UpgradeRequest,
    Upgrades, Upgrading,
};
use crate::api::{console, metrics, web};
use crate::config::{create_dir_with_mode, Config, GrpcLimits, Source, TlsFiles};
use crate::model::{EventDraft, EventKind};
use crate::supervisor::{StartupError, Supervisor};
use crate::telemetry::metrics::Metrics;
use crate::telemetry::otlp::{Exporter, OtlpError};
use crate::telemetry::trace::Tracer;
use torud_api::pb;

/// How long connections get to close after plugins have stopped. The server has been
/// draining since shutdown began (streams ended at once, unary calls finished with their
/// plugins), so what is left is mostly idle client connections that ignore GOAWAY.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(1);

/// Errors that stop the daemon from serving.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The listen address could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// What failed.
        source: std::io::Error,
    },
    /// The control socket could not be bound.
    #[error("cannot listen on the control socket {path}: {source}")]
    BindUnix {
        /// The socket path.
        path: PathBuf,
        /// What failed.
        source: std::io::Error,
    },
    /// The OTLP export settings could not be used.
    #[error("{0}")]
    Otlp(#[from] OtlpError),
    /// Plaintext on an address other hosts can reach, without being told to.
    #[error(
        "refusing to serve plaintext on {0}, which other hosts can reach: give --tls-cert and \
         --tls-key, listen on a loopback address, or pass --insecure-plaintext-non-loopback"
    )]
    PlaintextNonLoopback(SocketAddr),
    /// A TLS file could not be read.
    #[error("TLS: {path}: {source}")]
    TlsFile {
        /// The file.
        path: PathBuf,
        /// What failed.
        source: std::io::Error,
    },
    /// The TLS files could not be used.
    #[error("TLS: {0}")]
    Tls(tonic::transport::Error),
    /// The data directory could not be prepared.
    #[error("data directory {path}: {source}")]
    DataDir {
        /// The directory.
        path: PathBuf,
        /// What failed.
        source: std::io::Error,
    },
    /// Tokens could not be loaded.
    #[error(transparent)]
    Tokens(#[from] TokenError),
    /// The supervisor could not start.
    #[error(transparent)]
    Startup(#[from] StartupError),
    /// Reflection could not be built.
    #[error("cannot build server reflection: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    /// The SIGTERM, SIGINT or SIGHUP handler could not be installed.
    #[error("cannot install the SIGTERM, SIGINT and SIGHUP handlers")]
    Signals,
    /// The gRPC server failed.
    #[error("gRPC server failed: {0}")]
    Transport(#[from] tonic::transport::Error),
    /// A gRPC server's task panicked.
    #[error("gRPC server failed: {0}")]
    ServerTask(#[from] tokio::task::JoinError),
    /// What an earlier image handed over cannot be taken over.
    #[error("cannot take over from the daemon's earlier image: {0}")]
    Handover(String),
}

/// What the daemon starts from beyond its configuration.
#[derive(Debug, Default)]
pub struct Start {
    /// The running binary, when upgrades are possible (the `torud` binary).
    pub exe: Option<SelfExe>,
    /// What the daemon's earlier image handed over, when it was started by a handover.
    pub received: Option<Received>,
}

/// How serving ended.
pub enum Ending {
    /// Shut down: every plugin stopped.
    Stopped,
    /// Handing over: every plugin let go of, everything the next image needs here. The
    /// caller executes it ([`upgrade::execute`]).
    HandOver(Handover),
}

fn tls_config(files: &TlsFiles) -> Result<ServerTlsConfig, ServeError> {
    let read = |path: &PathBuf| {
        std::fs::read(path).map_err(|source| ServeError::TlsFile {
            path: path.clone(),
            source,
        })
    };
    let mut tls =
        ServerTlsConfig::new().identity(Identity::from_pem(read(&files.cert)?, read(&files.key)?));
    if let Some(ca) = &files.client_ca {
        tls = tls.client_ca_root(Certificate::from_pem(read(ca)?));
    }
    Ok(tls)
}

/// Binds the control socket in the data directory, replacing a stale one, readable and
/// writable by the daemon's user only.
fn bind_control_socket(path: &Path) -> Result<UnixListener, ServeError> {
    let err = |source| ServeError::BindUnix {
        path: path.to_owned(),
        source,
    };
    if path.as_os_str().len() < 100 && std::os::unix::net::UnixStream::connect(path).is_ok() {
        return Err(err(std::io::Error::new(
            std::io::ErrorKind::AddrInUse,
            "another daemon is serving this data directory",
        )));
    }
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(err(e)),
    }
    // A path over the kernel's 108-byte limit is bound through the directory's descriptor
    // (the /proc magic link keeps the path short).
    let listener = if path.as_os_str().len() >= 100 {
        let dir = path
            .parent()
            .ok_or_else(|| err(std::io::ErrorKind::InvalidInput.into()))?;
        let dir = std::fs::File::open(dir).map_err(err)?;
        let name = path.file_name().unwrap_or_default().to_string_lossy();
        let short = format!("/proc/thread-self/fd/{}/{name}", dir.as_raw_fd());
        UnixListener::bind(short).map_err(err)?
    } else {
        UnixListener::bind(path).map_err(err)?
    };
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(err)?;
    Ok(listener)
}

/// The addresses the daemon serves on, as bound (a port 0 resolved).
#[derive(Debug, Clone, Copy)]
pub struct Bound {
    /// The gRPC TCP listener.
    pub grpc: SocketAddr,
    /// The metrics endpoint, when one was asked for.
    pub metrics: Option<SocketAddr>,
}

/// Binds `config.listen`, the control socket and the metrics address (if any), then serves
/// until `shutdown` resolves. `source` is where `config` came from, read again on a reload
/// (SIGHUP or `ReloadConfig`). `on_listening` is told the bound addresses once every
/// listener is ready.
pub async fn run(
    config: Config,
    source: Source,
    shutdown: impl Future<Output = ()> + Send,
    on_listening: impl FnOnce(Bound),
) -> Result<(), ServeError> {
    serve(config, source, Start::default(), shutdown, on_listening)
        .await
        .map(|_| ())
}

/// [`run`], from what `start` gives: upgrades (with the running binary) and what an earlier
/// image handed over. Ends with a handover when an upgrade asked for one.
pub async fn serve(
    config: Config,
    source: Source,
    start: Start,
    shutdown: impl Future<Output = ()> + Send,
    on_listening: impl FnOnce(Bound),
) -> Result<Ending, ServeError> {
    let Start { exe, mut received } = start;
    // First: from here on a SIGHUP reloads (or is ignored) instead of ending the daemon.
    let hangups = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        .map_err(|_| ServeError::Signals)?;
    let upgrade_signals =
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::user_defined2())
            .map_err(|_| ServeError::Signals)?;
    let watchdog = systemd::spawn_watchdog();
    let tls = transport_security(&config)?;
    let scheme = if tls.is_some() { "https" } else { "http" };
    prepare_data_dir(&config.data_dir)?;
    let tokens = load_tokens(&config)?;
    let listeners = match &mut received {
        Some(received) => Listeners::adopt(&config, received)?,
        None => Listeners::bind(&config).await?,
    };
    let kept = listeners.keep().map_err(ServeError::Handover)?;
    let limits = config.grpc.clone();
    let otlp = Exporter::prepare(&config)?;
    let cors = web::cors(&config.cors_origins);
    let supervisor = match &mut received {
        Some(received) => {
            let plugins = received.plugins().map_err(ServeError::Handover)?;
            let skipped = std::mem::take(&mut received.state.skipped);
            Supervisor::resume(config, source.given.clone(), plugins, skipped)?
        }
        None => Supervisor::start(config, source.given.clone())?,
    };
    tracing::info!("{}", supervisor.isolation_summary());
    let metrics = Metrics::new(supervisor.clone());
    let exporter = Exporter::start(otlp, &supervisor, &metrics);
    let reloader = Arc::new(Reloader::new(source, supervisor.clone()));
    let (upgrades, mut upgrade_requests) = Upgrades::channel();
    let upgrading = Upgrading::default();

    let health = Health::start(&supervisor).await;
    if let Some(received) = &received {
        tokio::spawn(report_takeover(supervisor.clone(), received.outcome()));
    }
    let stop = CancellationToken::new();
    // Each SIGHUP reloads the configuration, restarting no plugin (the log names those that
    // need it). A reload under way is finished before this ends, and shutdown waits for it
    // before it stops the supervisor, so a reload never overlaps it.
    let reload = reloader.clone();
    let reloads = tokio::spawn(on_each_signal(hangups, stop.clone(), move || {
        tracing::info!("SIGHUP received: reloading the configuration");
        let reloader = reload.clone();
        async move {
            // The outcome, or the error, is logged by the reload.
            let _ = reloader.reload(StaleProcesses::Report).await;
        }
    }));
    // Each SIGUSR2 (systemd's ExecReload, if so configured) upgrades to the binary the
    // daemon was started from.
    let upgrade = upgrades.clone();
    let signalled = tokio::spawn(on_each_signal(upgrade_signals, stop.clone(), move || {
        tracing::info!("SIGUSR2 received: upgrading to the binary the daemon was started from");
        let upgrades = upgrade.clone();
        async move {
            match upgrades.request(None).await {
                Ok(began) => tracing::info!(to_version = %began.to_version, "upgrade began"),
                Err(e) => tracing::error!(error = %e, "upgrade refused"),
            }
        }
    }));
    let routes = routes(
        &supervisor,
        &reloader,
        &upgrades,
        &upgrading,
        &stop,
        &limits,
        &metrics,
        exporter.tracer(),
        health.service(),
    )?;
    let bound = Bound {
        grpc: listeners.local,
        metrics: listeners.metrics_local,
    };
    let control_path = listeners.control_path.clone();
    let hold = HoldLayer::new(supervisor.discovery());
    let servers = Servers::spawn(
        listeners, routes, tls, cors, tokens, hold, metrics, &limits, &stop,
    )?;
    tracing::info!(local = %bound.grpc, control = %control_path.display(), "listening");
    tracing::info!("web console at {scheme}://{}/", bound.grpc);
    if let Some(addr) = bound.metrics {
        tracing::info!(%addr, "serving metrics at /metrics");
    }
    systemd::status("listening; scanning the plugins directory");
    on_listening(bound);

    tokio::pin!(shutdown);
    let began = loop {
        tokio::select! {
            _ = &mut shutdown => break None,
            Some(request) = upgrade_requests.recv() => {
                if let Some(began) = begin_upgrade(request, &supervisor, exe.as_ref()).await {
                    break Some(began);
                }
            }
        }
    };
    let Some(began) = began else {
        signalled.abort();
        let result = shut_down(health, &stop, reloads, &supervisor, servers, &control_path).await;
        exporter.finish().await;
        if let Some(watchdog) = watchdog {
            watchdog.abort();
        }
        result?;
        tracing::info!("stopped");
        return Ok(Ending::Stopped);
    };
    // The point of no return: the new binary passed its check.
    systemd::upgrading();
    upgrading.set();
    stop.cancel();
    let _ = reloads.await;
    signalled.abort();
    let drain = supervisor.config().upgrade_timeout;
    if let Err(e) = servers.drain_within(drain).await {
        tracing::warn!(error = %e, "a server ended with an error while draining for the upgrade");
    }
    let plugins = supervisor.hand_over(drain).await;
    health.stop_bridge();
    exporter.finish().await;
    if let Some(watchdog) = watchdog {
        watchdog.abort();
    }
    let exe = exe.expect("an upgrade began, so the binary is known");
    let handover = upgrade::assemble(&began, &exe, kept, plugins, supervisor.skipped())
        .map_err(|e| ServeError::Handover(format!("cannot write the handover state: {e}")))?;
    tracing::info!(binary = %began.binary.display(), descriptors = handover.fds.len(), "handing over");
    Ok(Ending::HandOver(handover))
}

/// Checks the binary an upgrade asks for and, when it passes, writes `DAEMON_UPGRADING` and
/// answers the caller: the upgrade began (`Some`). Otherwise answers with why not and writes
/// `DAEMON_UPGRADE_FAILED` for a failed check (`None`: serving goes on, nothing changed).
async fn begin_upgrade(
    request: UpgradeRequest,
    supervisor: &Supervisor,
    exe: Option<&SelfExe>,
) -> Option<Began> {
    let UpgradeRequest { binary, reply } = request;
    let Some(exe) = exe else {
        let _ = reply.send(Err(UpgradeError::BadBinary(
            "this daemon was not started as the torud binary: it cannot re-execute itself".into(),
        )));
        return None;
    };
    let binary = binary.unwrap_or_else(|| exe.path.clone());
    if let Err(e) = upgrade::valid_binary(&binary) {
        let _ = reply.send(Err(e));
        return None;
    }
    let now = time::OffsetDateTime::now_utc();
    let preview = upgrade::preview(&binary, now, supervisor.list(), supervisor.skipped());
    let limit = supervisor.config().upgrade_timeout;
    tracing::info!(binary = %binary.display(), "upgrade: checking the new binary");
    let to_version = match upgrade::check(&binary, &preview, limit).await {
        Ok(version) => version,
        Err(reason) => {
            tracing::warn!(%reason, "upgrade: the new binary failed its check; nothing changed");
            supervisor.events().append(
                EventDraft::new("", EventKind::DaemonUpgradeFailed)
                    .reason(reason.clone())
                    .detail("rolled_back", "true")
                    .detail("stage", "check")
                    .detail("binary", binary.display()),
            );
            let _ = reply.send(Err(UpgradeError::CheckFailed(reason)));
            return None;
        }
    };
    let event = supervisor.events().append(
        EventDraft::new("", EventKind::DaemonUpgrading)
            .reason(format!("handing over to {}", binary.display()))
            .detail("from_version", upgrade::VERSION)
            .detail("to_version", &to_version)
            .detail("binary", binary.display()),
    );
    let began = Began {
        from_version: upgrade::VERSION.to_owned(),
        to_version,
        binary,
        upgrading_seq: event.seq,
        at: now,
        timeout: limit,
    };
    tracing::info!(binary = %began.binary.display(), to_version = %began.to_version, "upgrade: handing over");
    let _ = reply.send(Ok(began.clone()));
    Some(began)
}

/// After a handover: once ready, writes `DAEMON_UPGRADED` (or `DAEMON_UPGRADE_FAILED` when
/// this image is the previous binary executed again).
async fn report_takeover(supervisor: Supervisor, outcome: upgrade::Outcome) {
    supervisor.settled().await;
    let draft = match outcome.rolled_back.clone() {
        Some(reason) => EventDraft::new("", EventKind::DaemonUpgradeFailed)
            .reason(reason)
            .detail("rolled_back", "true")
            .detail("stage", "handover")
            .detail("binary", outcome.binary.display()),
        None => EventDraft::new("", EventKind::DaemonUpgraded)
            .reason("the new image took over every plugin")
            .detail("from_version", &outcome.from_version)
            .detail("to_version", upgrade::VERSION)
            .detail("duration_ms", outcome.duration().as_millis())
            .detail("plugins", outcome.plugins),
    };
    tracing::info!(duration = ?outcome.duration(), "took over from the earlier image");
    supervisor.events().append(draft);
}

/// Runs `act` at each signal `signals` receives, one after another, until `stop` (an `act`
/// under way is finished first).
async fn on_each_signal<F, A>(
    mut signals: tokio::signal::unix::Signal,
    stop: CancellationToken,
    mut act: A,
) where
    A: FnMut() -> F,
    F: Future<Output = ()>,
{
    loop {
        tokio::select! {
            biased;
            _ = stop.cancelled() => return,
            received = signals.recv() => {
                if received.is_none() {
                    return;
                }
                act().await;
            }
        }
    }
}

/// Shuts down in order: the daemon reports NOT_SERVING, open streams and SIGHUP reloads
/// end, plugins stop (in parallel, by escalation), the servers drain, the control socket
/// goes.
async fn shut_down(
    health: Health,
    stop: &CancellationToken,
    reloads: tokio::task::JoinHandle<()>,
    supervisor: &Supervisor,
    servers: Servers,
    control_path: &Path,
) -> Result<(), ServeError> {
    tracing::info!("shutting down: stopping plugins");
    systemd::stopping();
    health.not_serving().await;
    stop.cancel();
    let _ = reloads.await;
    supervisor.shutdown().await;
    health.stop_bridge();
    let result = servers.drain().await;
    let _ = std::fs::remove_file(control_path);
    result
}

/// TLS for the TCP listeners (gRPC and metrics), if configured; refuses plaintext on an
/// address other hosts can reach unless told to serve it.
fn transport_security(config: &Config) -> Result<Option<ServerTlsConfig>, ServeError> {
    let tls = config.security.tls.as_ref().map(tls_config).transpose()?;
    let allowed = tls.is_some() || config.security.insecure_plaintext_non_loopback;
    for addr in std::iter::once(config.listen).chain(config.metrics_listen) {
        if !allowed && !addr.ip().is_loopback() {
            return Err(ServeError::PlaintextNonLoopback(addr));
        }
    }
    Ok(tls)
}

/// Creates the data directory with the mode plugins' users need to reach their parts.
fn prepare_data_dir(data_dir: &Path) -> Result<(), ServeError> {
    create_dir_with_mode(data_dir, crate::plugin::isolation::shared_dir_mode()).map_err(|source| {
        ServeError::DataDir {
            path: data_dir.to_owned(),
            source,
        }
    })
}

/// Loads (or generates) the admin and read tokens, and says where generated ones are.
fn load_tokens(config: &Config) -> Result<Tokens, ServeError> {
    let security = &config.security;
    let tokens = Tokens::load(&security.admin_token, &security.read_token)?;
    for source in [&security.admin_token, &security.read_token] {
        if let TokenSource::Generated(path) = source {
            tracing::info!(path = %path.display(), "token file");
        }
    }
    Ok(tokens)
}

/// Both listeners, bound before anything is served.
struct Listeners {
    /// The TCP listener of `config.listen`.
    tcp: TcpListener,
    /// Its bound address (the port chosen when `listen` asked for port 0).
    local: SocketAddr,
    /// The control socket.
    control: UnixListener,
    /// Its path, removed at the end.
    control_path: PathBuf,
    /// The metrics endpoint's listener, when asked for.
    metrics: Option<TcpListener>,
    /// Its bound address.
    metrics_local: Option<SocketAddr>,
}

impl Listeners {
    /// The listeners an earlier image handed over (bound to its addresses: a changed
    /// `listen` needs a restart, as ever).
    fn adopt(config: &Config, received: &mut Received) -> Result<Self, ServeError> {
        let state = &received.state;
        let fds = &mut received.fds;
        let taken = |fds: &mut crate::supervisor::handover::Fds, place| {
            fds.take(place).map_err(ServeError::Handover)
        };
        let tcp = tcp_listener(taken(fds, state.tcp)?)?;
        let local = tcp
            .local_addr()
            .map_err(|e| ServeError::Handover(format!("the TCP listener: {e}")))?;
        let control = std::os::unix::net::UnixListener::from(taken(fds, state.control)?);
        control
            .set_nonblocking(true)
            .map_err(|e| ServeError::Handover(format!("the control socket: {e}")))?;
        let control = UnixListener::from_std(control)
            .map_err(|e| ServeError::Handover(format!("the control socket: {e}")))?;
        let (metrics, metrics_local) = match state.metrics {
            Some(place) => {
                let listener = tcp_listener(taken(fds, place)?)?;
                let local = listener
                    .local_addr()
                    .map_err(|e| ServeError::Handover(format!("the metrics listener: {e}")))?;
                (Some(listener), Some(local))
            }
            None => (None, None),
        };
        Ok(Listeners {
            tcp,
            local,
            control,
            control_path: config.control_socket(),
            metrics,
            metrics_local,
        })
    }

    /// Copies of the listening sockets, kept open for a handover while the servers own
    /// (and at their end close) theirs: connections arriving meanwhile wait in the backlog.
    fn keep(&self) -> Result<KeptListeners, String> {
        use std::os::fd::AsFd;
        let copy = |fd: std::os::fd::BorrowedFd<'_>| {
            fd.try_clone_to_owned()
                .map_err(|e| format!("cannot keep a listener for upgrades: {e}"))
        };
        Ok(KeptListeners {
            tcp: copy(self.tcp.as_fd())?,
            control: copy(self.control.as_fd())?,
            metrics: self.metrics.as_ref().map(|m| copy(m.as_fd())).transpose()?,
        })
    }

    async fn bind(config: &Config) -> Result<Self, ServeError> {
        let addr = config.listen;
        let tcp = TcpListener::bind(addr)
            .await
            .map_err(|source| ServeError::Bind { addr, source })?;
        let local = tcp
            .local_addr()
            .map_err(|source| ServeError::Bind { addr, source })?;
        let (metrics, metrics_local) = match config.metrics_listen {
            Some(addr) => {
                let bind_error = |source| ServeError::Bind { addr, source };
                let listener = metrics::bind(addr).await.map_err(bind_error)?;
                let local = listener.local_addr().map_err(bind_error)?;
                (Some(listener), Some(local))
            }
            None => (None, None),
        };
        let control_path = config.control_socket();
        let control = bind_control_socket(&control_path)?;
        Ok(Listeners {
            tcp,
            local,
            control,
            control_path,
            metrics,
            metrics_local,
        })
    }
}

/// A TCP listener handed over, for tokio.
fn tcp_listener(fd: std::os::fd::OwnedFd) -> Result<TcpListener, ServeError> {
    let listener = std::net::TcpListener::from(fd);
    listener
        .set_nonblocking(true)
        .and_then(|()| TcpListener::from_std(listener))
        .map_err(|e| ServeError::Handover(format!("a TCP listener: {e}")))
}

/// The health service and what keeps it current: for the daemon, NOT_SERVING until it is
/// ready ([`Supervisor::settled`]: the first scan ended and every enabled plugin started or
/// failed), then SERVING until shutdown; and each plugin's health bridged from the
/// supervisor.
struct Health {
    reporter: HealthReporter,
    bridge: tokio::task::JoinHandle<()>,
    ready: tokio::task::JoinHandle<()>,
}

impl Health {
    async fn start(supervisor: &Supervisor) -> Self {
        let reporter = HealthReporter::new();
        reporter
            .set_service_status("", ServingStatus::NotServing)
            .await;
        let bridge = tokio::spawn(health::bridge(reporter.clone(), supervisor.clone()));
        let ready = tokio::spawn(report_ready(reporter.clone(), supervisor.clone()));
        Health {
            reporter,
            bridge,
            ready,
        }
    }

    /// The `grpc.health.v1.Health` service, answering from this reporter.
    fn service(&self) -> HealthServer<HealthService> {
        HealthServer::new(HealthService::from_health_reporter(self.reporter.clone()))
    }

    /// Reports NOT_SERVING for the daemon, first thing at shutdown.
    async fn not_serving(&self) {
        self.ready.abort();
        self.reporter
            .set_service_status("", ServingStatus::NotServing)
            .await;
    }

    /// Stops bridging plugin health (the plugins have stopped).
    fn stop_bridge(&self) {
        self.bridge.abort();
    }
}

impl Drop for Health {
    /// An early return (a failed start) stops the bridge too.
    fn drop(&mut self) {
        self.stop_bridge();
        self.ready.abort();
    }
}

/// Says SERVING for the daemon once it is ready, and logs what it is ready with.
async fn report_ready(reporter: HealthReporter, supervisor: Supervisor) {
    supervisor.settled().await;
    let plugins = supervisor.list();
    let running = plugins
        .iter()
        .filter(|p| p.state == crate::model::PluginState::Running)
        .count();
    let enabled = plugins.iter().filter(|p| p.enabled).count();
    let skipped = supervisor.skipped().len();
    tracing::info!(plugins = plugins.len(), enabled, running, skipped, "ready");
    reporter
        .set_service_status("", ServingStatus::Serving)
        .await;
    systemd::ready(&format!(
        "ready: {} plugins, {enabled} enabled, {running} running, {skipped} skipped",
        plugins.len()
    ));
}

/// The gRPC services (plugins, KV, logs, config, health, reflection), the same on both
/// listeners.
#[allow(clippy::too_many_arguments)]
fn routes(
    supervisor: &Supervisor,
    reloader: &Arc<Reloader>,
    upgrades: &Upgrades,
    upgrading: &Upgrading,
    stop: &CancellationToken,
    limits: &GrpcLimits,
    metrics: &Metrics,
    tracer: Tracer,
    health: HealthServer<HealthService>,
) -> Result<Routes, ServeError> {
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(crate::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let reflection_v1 = reflection().build_v1()?;
    let reflection_v1alpha = reflection().build_v1alpha()?;
    let max = limits.max_message_bytes;
    let plugins = pb::plugin_service_server::PluginServiceServer::new(PluginApi::new(
        supervisor.clone(),
        stop.clone(),
        upgrading.clone(),
        metrics.clone(),
        tracer.clone(),
    ))
    .max_decoding_message_size(max)
    .max_encoding_message_size(max);
    let kv = pb::kv_service_server::KvServiceServer::new(KvApi::new(
        supervisor.clone(),
        metrics.clone(),
        tracer,
    ))
    .max_decoding_message_size(max)
    .max_encoding_message_size(max);
    let logs = pb::log_service_server::LogServiceServer::new(LogApi::new(
        supervisor.clone(),
        stop.clone(),
        upgrading.clone(),
        max,
        metrics.clone(),
    ))
    .max_decoding_message_size(max)
    .max_encoding_message_size(max);
    let config = pb::config_service_server::ConfigServiceServer::new(ConfigApi::new(
        reloader.clone(),
        upgrades.clone(),
    ))
    .max_decoding_message_size(max)
    .max_encoding_message_size(max);
    let mut routes = Routes::builder();
    routes
        .add_service(plugins)
        .add_service(config)
        .add_service(kv)
        .add_service(logs)
        .add_service(health)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha);
    Ok(routes.routes())
}

type ServerTask = tokio::task::JoinHandle<Result<(), tonic::transport::Error>>;

/// The servers, each ending when `stop` is cancelled.
struct Servers {
    tcp: ServerTask,
    unix: ServerTask,
    metrics: Option<ServerTask>,
}

impl Servers {
    /// Serves `routes` on both gRPC listeners: TCP behind the token check (and TLS when
    /// configured), the control socket to the peers it allows; and `metrics` on the metrics
    /// listener, if any.
    #[allow(clippy::too_many_arguments)]
    fn spawn(
        listeners: Listeners,
        routes: Routes,
        tls: Option<ServerTlsConfig>,
        cors: Option<tower_http::cors::CorsLayer>,
        tokens: Tokens,
        hold: HoldLayer,
        metrics: Metrics,
        limits: &GrpcLimits,
        stop: &CancellationToken,
    ) -> Result<Self, ServeError> {
        let metrics = match listeners.metrics {
            Some(listener) => Some(
                metrics::spawn(listener, tls.clone(), tokens.clone(), metrics, stop)
                    .map_err(ServeError::Tls)?,
            ),
            None => None,
        };
        let builder = || {
            tonic::transport::Server::builder()
                .max_concurrent_streams(limits.max_concurrent_streams)
        };
        // Browsers speak gRPC-Web over HTTP/1.1 as well as HTTP/2.
        let mut tcp_builder = builder().accept_http1(true);
        if let Some(tls) = tls {
            tcp_builder = tcp_builder.tls_config(tls).map_err(ServeError::Tls)?;
        }
        // Layers added first see a request first: a preflight is answered by CORS alone; a
        // browser's GET is answered by the console (its pages need no token: it signs in
        // through the API); a gRPC-Web call is translated before the token check sees it; a
        // call without a valid token is refused at once, never held until the first scan ends.
        let tcp = tcp_builder
            .layer(tower::util::option_layer(cors))
            .layer(console::ConsoleLayer)
            .layer(tonic_web::GrpcWebLayer::new())
            .layer(AuthLayer::new(tokens))
            .layer(hold.clone())
            .add_routes(routes.clone())
            .serve_with_incoming_shutdown(
                // Without TCP_NODELAY, small responses wait for delayed ACKs (~40 ms).
                tonic::transport::server::TcpIncoming::from(listeners.tcp).with_nodelay(Some(true)),
                stop.clone().cancelled_owned(),
            );
        let unix = builder()
            .layer(hold)
            .add_routes(routes)
            .serve_with_incoming_shutdown(
                tokio_stream::StreamExt::filter(
                    UnixListenerStream::new(listeners.control),
                    |conn| {
                        let Ok(stream) = conn else { return true };
                        crate::plugin::isolation::control_peer_allowed(stream)
                            .inspect_err(|why| {
                                tracing::warn!(
                                    "control socket: refused a client ({why}); connection closed"
                                )
                            })
                            .is_ok()
                    },
                ),
                stop.clone().cancelled_owned(),
            );
        Ok(Servers {
            tcp: tokio::spawn(tcp),
            unix: tokio::spawn(unix),
            metrics,
        })
    }

    /// Waits for the servers to finish draining, at most [`DRAIN_TIMEOUT`]; connections
    /// still open then are closed.
    async fn drain(self) -> Result<(), ServeError> {
        self.drain_within(DRAIN_TIMEOUT).await
    }

    /// Waits for the servers to finish draining, at most `limit`; connections still open
    /// then are closed.
    async fn drain_within(self, limit: Duration) -> Result<(), ServeError> {
        let servers = async {
            let metrics = match self.metrics {
                Some(metrics) => metrics.await,
                None => Ok(Ok(())),
            };
            (self.tcp.await, self.unix.await, metrics)
        };
        match tokio::time::timeout(limit, servers).await {
            Ok((tcp, unix, metrics)) => {
                [tcp, unix, metrics].into_iter().try_for_each(|r| match r {
                    Ok(Ok(())) => Ok(()),
                    Ok(Err(e)) => Err(ServeError::Transport(e)),
                    Err(e) => Err(ServeError::ServerTask(e)),
                })
            }
            Err(_) => {
                tracing::info!("closing client connections still open after shutdown");
                Ok(())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_tls_file_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let cert = dir.path().join("cert.pem");
        let files = TlsFiles {
            cert: cert.clone(),
            key: dir.path().join("key.pem"),
            client_ca: None,
        };
        let message = tls_config(&files).unwrap_err().to_string();
        assert!(
            message.starts_with(&format!("TLS: {}: ", cert.display())),
            "{message}"
        );
    }

    #[test]
    fn plaintext_on_a_reachable_address_is_refused_unless_asked_for() {
        let mut config = Config::new("/p".into(), "/d".into());
        config.listen = "0.0.0.0:0".parse().unwrap();
        assert!(matches!(
            transport_security(&config),
            Err(ServeError::PlaintextNonLoopback(_))
        ));
        config.security.insecure_plaintext_non_loopback = true;
        assert!(matches!(transport_security(&config), Ok(None)));
    }
}
