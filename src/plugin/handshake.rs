//! The host's side of a plugin's start and stop, written once for the daemon's actor and
//! for `torud plugin check`: what a plugin is told when it starts (its environment and its
//! `init`, [`Launch`]), the `init` → `ready` handshake on its socket ([`Handshake`]), with
//! its time limit and the reasons a start fails ([`HandshakeError`]), and the `shutdown`
//! message ([`send_shutdown`]).
//!
//! A protocol-2 plugin keeps the connection `init` came on as its [`Link`] and is ready when
//! it answers `init` with `ready` (same `request_id`); a v1 plugin gets `init` on a
//! connection of its own and is ready once it is written.
//!
//! This module knows nothing of processes, plugin states or reports: the caller spawns the
//! plugin, races the handshake against its exit, and decides what a failure means.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::net::UnixStream;
use tokio::time::Instant;
use toru_plugin_sdk::wire::InitParams;
use toru_plugin_sdk::{Envelope, MessageType, PROTOCOL_VERSION};

use crate::plugin::connection::{connect_with_retry, send_one, send_one_on, ConnectError};
use crate::plugin::link::{new_request_id, Link, LinkError, LinkLimits};
use crate::store::storage::Namespace;

/// What a plugin is told about itself when it starts: through its environment
/// ([`Launch::env`]) and in its `init` message ([`Launch::init_params`]).
#[derive(Debug, Clone)]
pub struct Launch {
    /// The plugin's id (`TORU_PLUGIN_ID`).
    pub id: String,
    /// This run's id (`TORU_INSTANCE_ID` and `init`'s `instance_id`).
    pub instance_id: String,
    /// Where it must listen (`TORU_PLUGIN_SOCKET` and `init`'s `plugin_socket`).
    pub socket: PathBuf,
    /// Its own directory for files (`TORU_DATA_DIR`).
    pub data_dir: PathBuf,
    /// Where the host keeps its logs (`init`'s `log_path`).
    pub log_path: PathBuf,
    /// Its user's home (`HOME`), when it runs as a user of its own that has one.
    pub home: Option<PathBuf>,
}

impl Launch {
    /// The variables the host sets on top of the allowlisted environment.
    pub fn env(&self) -> Vec<(&'static str, OsString)> {
        let mut env = vec![
            (
                toru_plugin_sdk::ENV_PLUGIN_SOCKET,
                self.socket.clone().into_os_string(),
            ),
            (toru_plugin_sdk::ENV_PLUGIN_ID, self.id.clone().into()),
            (
                toru_plugin_sdk::ENV_INSTANCE_ID,
                self.instance_id.clone().into(),
            ),
            (
                toru_plugin_sdk::ENV_DATA_DIR,
                self.data_dir.clone().into_os_string(),
            ),
        ];
        if let Some(home) = &self.home {
            env.push(("HOME", home.clone().into_os_string()));
        }
        env
    }

    /// The parameters of the `init` message.
    pub fn init_params(&self) -> InitParams {
        InitParams {
            instance_id: self.instance_id.clone(),
            plugin_socket: self.socket.to_string_lossy().into_owned(),
            log_path: self.log_path.to_string_lossy().into_owned(),
            host_protocol_version: PROTOCOL_VERSION,
        }
    }
}

/// Why the plugin did not become ready once connected.
#[derive(Debug, thiserror::Error)]
pub enum ReadyError {
    /// A protocol-2 plugin did not answer `init` (in time, or at all).
    #[error("{}", no_ready(*.limit, .error))]
    NoReady {
        /// The start's whole time limit, as the reason quotes it.
        limit: Duration,
        /// Why the answer did not come.
        error: LinkError,
    },
    /// A protocol-2 plugin answered `init` with another message than `ready`.
    #[error("it answered init with {} instead of ready", .0.as_str())]
    Answered(MessageType),
    /// Writing `init` to a v1 plugin failed.
    #[error("sending init failed: {0}")]
    SendInit(std::io::Error),
}

fn no_ready(limit: Duration, error: &LinkError) -> String {
    match error {
        LinkError::Timeout(_) => format!(
            "not ready within {}: no ready message after init",
            humantime::format_duration(limit)
        ),
        other => format!("no ready message after init: {other}"),
    }
}

/// Why a start did not reach ready: each reason says what the plugin failed to do.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    /// Its socket never accepted a connection.
    #[error(transparent)]
    Connect(ConnectError),
    /// Connected, but no ready.
    #[error(transparent)]
    Ready(ReadyError),
    /// The whole start took longer than its limit.
    #[error("not ready within {}", humantime::format_duration(*.0))]
    Timeout(Duration),
}

impl HandshakeError {
    /// Whether the start ran out of time (at any step), rather than being refused.
    pub fn timed_out(&self) -> bool {
        matches!(
            self,
            HandshakeError::Timeout(_)
                | HandshakeError::Connect(ConnectError::Timeout { .. })
                | HandshakeError::Ready(ReadyError::NoReady {
                    error: LinkError::Timeout(_),
                    ..
                })
        )
    }
}

/// The time a start is given: `limit` in all, quoted in reasons, of which `left` remains
/// for the step at hand.
#[derive(Debug, Clone, Copy)]
pub struct Budget {
    /// The whole limit.
    pub limit: Duration,
    /// What is left of it.
    pub left: Duration,
}

impl Budget {
    /// All of `limit`, from now.
    pub fn full(limit: Duration) -> Self {
        Budget { limit, left: limit }
    }

    /// What is left of `limit` counted from `began`.
    pub fn since(began: Instant, limit: Duration) -> Self {
        Budget {
            limit,
            left: limit.saturating_sub(began.elapsed()),
        }
    }
}

/// One plugin's handshake: where to reach it, what to tell it, and how to talk to it once
/// it is ready.
pub struct Handshake {
    /// Its socket.
    pub socket: PathBuf,
    /// The `init` message's parameters ([`Launch::init_params`]).
    pub init: InitParams,
    /// The protocol version it declared.
    pub protocol: u32,
    /// The link's frame and in-flight limits.
    pub limits: LinkLimits,
    /// The storage namespace its protocol-2 `storage` requests are served from (refused
    /// when `None`).
    pub storage: Option<Namespace>,
}

impl Handshake {
    /// Connects to the socket and runs [`Handshake::ready`], all within `limit`.
    /// `on_link` is given the protocol-2 link as soon as it exists, before it is ready, so
    /// that a stop during the start can ask the plugin to shut down on it.
    pub async fn run(
        self,
        limit: Duration,
        on_link: impl FnOnce(&Link),
    ) -> Result<Link, HandshakeError> {
        let began = Instant::now();
        let work = async {
            let stream = connect_with_retry(&self.socket, limit)
                .await
                .map_err(HandshakeError::Connect)?;
            self.ready(stream, Budget::since(began, limit), on_link)
                .await
                .map_err(HandshakeError::Ready)
        };
        match tokio::time::timeout(limit, work).await {
            Ok(result) => result,
            Err(_) => Err(HandshakeError::Timeout(limit)),
        }
    }

    /// Sends `init` on a connected `stream` and waits (at most `budget.left`) until the
    /// plugin is ready; returns the link requests then take. A protocol-2 link that fails
    /// here is closed; `on_link` is as in [`Handshake::run`].
    pub async fn ready(
        self,
        mut stream: UnixStream,
        budget: Budget,
        on_link: impl FnOnce(&Link),
    ) -> Result<Link, ReadyError> {
        let message = Envelope::init(new_request_id(), &self.init);
        if self.protocol < 2 {
            send_one_on(&mut stream, &message)
                .await
                .map_err(ReadyError::SendInit)?;
            return Ok(Link::per_request(self.socket, self.limits));
        }
        let link = Link::persistent(stream, self.protocol, self.limits, self.storage);
        on_link(&link);
        let answer = link.request(message, budget.left).await;
        let failed = match answer {
            Ok(answer) if answer.kind == MessageType::Ready => return Ok(link),
            Ok(answer) => ReadyError::Answered(answer.kind),
            Err(error) => ReadyError::NoReady {
                limit: budget.limit,
                error,
            },
        };
        link.close("start failed");
        Err(failed)
    }
}

/// Asks the plugin to shut down: on its link's connection for protocol 2, on a connection
/// of its own otherwise (no link, or a v1 one).
pub async fn send_shutdown(link: Option<&Link>, socket: &Path) -> Result<(), LinkError> {
    let shutdown = Envelope::shutdown(new_request_id());
    match link {
        Some(link) if link.protocol() >= 2 => link.notify(&shutdown).await,
        _ => send_one(socket, &shutdown)
            .await
            .map_err(|e| LinkError::Unavailable(e.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::{SinkExt, StreamExt};
    use tokio_util::codec::Framed;
    use toru_plugin_sdk::FrameCodec;

    fn launch(home: Option<&str>) -> Launch {
        Launch {
            id: "hello".into(),
            instance_id: "run-1".into(),
            socket: "/run/torud/hello/p.sock".into(),
            data_dir: "/var/lib/torud/plugins/hello".into(),
            log_path: "/var/log/torud/hello".into(),
            home: home.map(PathBuf::from),
        }
    }

    fn handshake(protocol: u32) -> Handshake {
        Handshake {
            socket: "/nonexistent/p.sock".into(),
            init: launch(None).init_params(),
            protocol,
            limits: LinkLimits::from(&crate::config::BridgeConfig::default()),
            storage: None,
        }
    }

    /// Reads the next frame the host sent on `plugin`'s end.
    async fn next_message(plugin: &mut Framed<UnixStream, FrameCodec>) -> Envelope {
        let frame = plugin
            .next()
            .await
            .expect("a frame")
            .expect("a readable frame");
        Envelope::from_slice(&frame).expect("an envelope")
    }

    #[test]
    fn the_environment_names_socket_id_instance_and_data_dir() {
        let env = launch(None).env();
        let names: Vec<&str> = env.iter().map(|(name, _)| *name).collect();
        assert_eq!(
            names,
            [
                "TORU_PLUGIN_SOCKET",
                "TORU_PLUGIN_ID",
                "TORU_INSTANCE_ID",
                "TORU_DATA_DIR"
            ]
        );
        assert_eq!(env[0].1, "/run/torud/hello/p.sock");
        assert_eq!(env[1].1, "hello");
        assert_eq!(env[2].1, "run-1");
        assert_eq!(env[3].1, "/var/lib/torud/plugins/hello");
    }

    #[test]
    fn a_home_is_passed_only_when_there_is_one() {
        let env = launch(Some("/home/hello")).env();
        assert_eq!(env.last().unwrap(), &("HOME", "/home/hello".into()));
        assert!(launch(None).env().iter().all(|(name, _)| *name != "HOME"));
    }

    #[test]
    fn init_tells_the_same_socket_and_instance_as_the_environment() {
        let init = launch(None).init_params();
        assert_eq!(init.instance_id, "run-1");
        assert_eq!(init.plugin_socket, "/run/torud/hello/p.sock");
        assert_eq!(init.log_path, "/var/log/torud/hello");
        assert_eq!(init.host_protocol_version, PROTOCOL_VERSION);
    }

    #[test]
    fn reasons_quote_the_start_limit() {
        let limit = Duration::from_millis(500);
        let late = ReadyError::NoReady {
            limit,
            error: LinkError::Timeout(Duration::from_millis(499)),
        };
        assert_eq!(
            late.to_string(),
            "not ready within 500ms: no ready message after init"
        );
        let gone = ReadyError::NoReady {
            limit,
            error: LinkError::Unavailable("eof".into()),
        };
        assert_eq!(
            gone.to_string(),
            "no ready message after init: the plugin's connection is gone: eof"
        );
        assert_eq!(
            HandshakeError::Timeout(limit).to_string(),
            "not ready within 500ms"
        );
        assert_eq!(
            ReadyError::Answered(MessageType::Pong).to_string(),
            "it answered init with pong instead of ready"
        );
    }

    #[tokio::test]
    async fn a_protocol_2_plugin_is_ready_when_it_answers_init_with_ready() {
        let (host, plugin) = UnixStream::pair().unwrap();
        let mut plugin = Framed::new(plugin, FrameCodec::default());
        let fake = async {
            let init = next_message(&mut plugin).await;
            assert_eq!(init.lifecycle_action(), Some("init"));
            let id = init.request_id.clone().unwrap();
            let ready = Envelope::bare(MessageType::Ready, id).to_vec();
            plugin.send(ready).await.unwrap();
            plugin
        };
        let mut early = None;
        let budget = Budget::full(Duration::from_secs(10));
        let ready = handshake(2).ready(host, budget, |link| early = Some(link.clone()));
        let (link, mut plugin) = tokio::join!(ready, fake);
        let link = link.unwrap();
        assert_eq!(link.protocol(), 2);
        assert!(early.is_some(), "the link was not handed over before ready");

        send_shutdown(Some(&link), Path::new("/nonexistent/p.sock"))
            .await
            .unwrap();
        let shutdown = next_message(&mut plugin).await;
        assert_eq!(shutdown.lifecycle_action(), Some("shutdown"));
    }

    #[tokio::test]
    async fn another_answer_than_ready_fails_the_start_and_closes_the_link() {
        let (host, plugin) = UnixStream::pair().unwrap();
        let mut plugin = Framed::new(plugin, FrameCodec::default());
        let fake = async {
            let init = next_message(&mut plugin).await;
            let pong = Envelope::bare(MessageType::Pong, init.request_id.unwrap()).to_vec();
            plugin.send(pong).await.unwrap();
        };
        let mut early = None;
        let budget = Budget::full(Duration::from_secs(10));
        let ready = handshake(2).ready(host, budget, |link| early = Some(link.clone()));
        let (result, ()) = tokio::join!(ready, fake);
        assert!(
            matches!(result, Err(ReadyError::Answered(MessageType::Pong))),
            "{:?}",
            result.err()
        );
        let closed = early.expect("the early link");
        let reason = tokio::time::timeout(Duration::from_secs(10), closed.closed())
            .await
            .expect("the link was left open");
        assert_eq!(reason, "start failed");
    }

    #[tokio::test]
    async fn a_plugin_that_hangs_up_after_init_is_not_ready() {
        let (host, plugin) = UnixStream::pair().unwrap();
        drop(plugin);
        let budget = Budget::full(Duration::from_secs(10));
        let result = handshake(2).ready(host, budget, |_early| {}).await;
        assert!(
            matches!(
                result,
                Err(ReadyError::NoReady {
                    error: LinkError::Unavailable(_),
                    ..
                })
            ),
            "{:?}",
            result.err()
        );
    }

    #[tokio::test]
    async fn a_v1_plugin_gets_init_alone_on_its_connection() {
        let (host, plugin) = UnixStream::pair().unwrap();
        let mut plugin = Framed::new(plugin, FrameCodec::default());
        let budget = Budget::full(Duration::from_secs(10));
        let link = handshake(1)
            .ready(host, budget, |_early| {
                panic!("a v1 plugin has no early link")
            })
            .await
            .unwrap();
        assert_eq!(link.protocol(), 1);
        let init = next_message(&mut plugin).await;
        assert_eq!(init.lifecycle_action(), Some("init"));
        assert!(
            plugin.next().await.is_none(),
            "init was not alone on its connection"
        );
    }

    #[test]
    fn a_budget_counts_from_when_the_start_began() {
        let limit = Duration::from_secs(3600);
        let full = Budget::full(limit);
        assert_eq!((full.limit, full.left), (limit, limit));
        let began = Instant::now() - Duration::from_secs(2);
        let since = Budget::since(began, limit);
        assert_eq!(since.limit, limit);
        assert!(since.left <= Duration::from_secs(3598), "{:?}", since.left);
        let over = Budget::since(began, Duration::from_secs(1));
        assert_eq!(over.left, Duration::ZERO);
    }
}
