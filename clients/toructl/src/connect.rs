//! Where the daemon is and how to authenticate: the address and token from flags, the
//! environment, or the daemon's data directory, resolved into a [`Conn`] that opens one
//! gRPC channel (TCP or the Unix control socket) and stamps every request with the token.
//! Knows nothing of the commands.

use std::path::{Path, PathBuf};
use std::time::Duration;

use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity, Uri};
use tonic::Request;
use torud_api::Bearer;
use torud_api::{ADMIN_TOKEN_FILE, CONTROL_SOCKET};

/// The address used when neither a flag, the environment nor a data directory names one.
pub const DEFAULT_ADDR: &str = "127.0.0.1:50051";

/// How to reach the daemon, before connecting.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// `host:port` over TCP (plaintext HTTP/2).
    Tcp(String),
    /// `host:port` over TCP with TLS (`https://host:port`).
    Tls(String),
    /// The daemon's Unix control socket (no token needed).
    Unix(PathBuf),
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Target::Tcp(addr) => f.write_str(addr),
            Target::Tls(addr) => write!(f, "https://{addr}"),
            Target::Unix(path) => write!(f, "unix:{}", path.display()),
        }
    }
}

/// What the user said about the daemon's location and credentials (flags, whose clap
/// definitions also read `TORUD_ADDR`, `TORUD_TOKEN` and `TORUD_DATA_DIR`).
pub struct Settings {
    /// `--addr`: `host:port`, `http://host:port`, `https://host:port` or
    /// `unix:/path/to/torud.sock`.
    pub addr: Option<String>,
    /// `--token`: the bearer token itself.
    pub token: Option<String>,
    /// `--data-dir`: the daemon's data directory, for its socket and token files.
    pub data_dir: Option<PathBuf>,
    /// PEM files for `https://` addresses.
    pub tls: TlsFiles,
}

/// PEM files for TLS: the CA that signed the daemon's certificate, and an optional client
/// certificate and key for daemons that require one.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// `--tls-ca`.
    pub ca: Option<PathBuf>,
    /// `--tls-cert`.
    pub cert: Option<PathBuf>,
    /// `--tls-key`.
    pub key: Option<PathBuf>,
}

/// The resolved target and token.
#[derive(Debug, PartialEq, Eq)]
pub struct Resolved {
    /// Where to connect.
    pub target: Target,
    /// The bearer token to send, if any.
    pub token: Option<String>,
}

/// Resolves settings: an explicit address wins; otherwise the data directory's control
/// socket if it exists, otherwise the default TCP address. A token given explicitly wins;
/// otherwise, for TCP, the data directory's `admin.token` when it is readable.
pub fn resolve(s: &Settings) -> Result<Resolved, String> {
    let target = match &s.addr {
        Some(addr) => parse_addr(addr)?,
        None => match &s.data_dir {
            Some(dir) if dir.join(CONTROL_SOCKET).exists() => {
                Target::Unix(dir.join(CONTROL_SOCKET))
            }
            _ => Target::Tcp(DEFAULT_ADDR.to_owned()),
        },
    };
    let token = match (&s.token, &s.data_dir, &target) {
        (Some(t), _, _) => Some(t.trim().to_owned()),
        (None, Some(dir), Target::Tcp(_) | Target::Tls(_)) => {
            read_token(&dir.join(ADMIN_TOKEN_FILE))?
        }
        _ => None,
    };
    Ok(Resolved { target, token })
}

fn parse_addr(addr: &str) -> Result<Target, String> {
    if let Some(path) = addr.strip_prefix("unix:") {
        if path.is_empty() {
            return Err(
                "--addr unix: needs a socket path, e.g. unix:/var/lib/torud/torud.sock".into(),
            );
        }
        return Ok(Target::Unix(PathBuf::from(path)));
    }
    let (hostport, tls) = match addr.strip_prefix("https://") {
        Some(rest) => (rest, true),
        None => (addr.strip_prefix("http://").unwrap_or(addr), false),
    };
    if hostport.is_empty() || !hostport.contains(':') || hostport.contains('/') {
        return Err(format!(
            "--addr {addr:?} is not host:port, https://host:port or unix:PATH (for example {DEFAULT_ADDR})"
        ));
    }
    Ok(if tls {
        Target::Tls(hostport.to_owned())
    } else {
        Target::Tcp(hostport.to_owned())
    })
}

/// The token in a file, or `None` when the file does not exist.
fn read_token(path: &Path) -> Result<Option<String>, String> {
    match std::fs::read_to_string(path) {
        Ok(text) => Ok(Some(text.trim().to_owned())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(format!(
            "cannot read the token file {}: {e}",
            path.display()
        )),
    }
}

/// An open channel to the daemon and the token every request carries.
#[derive(Clone)]
pub struct Conn {
    /// The channel (HTTP/2, multiplexed).
    pub channel: Channel,
    auth: Option<Bearer>,
    /// Timeout for unary calls; streams have none.
    timeout: Duration,
}

impl Conn {
    /// Connects (within 5 s) to the resolved target; `tls` is used for `https://`.
    pub async fn open(r: &Resolved, tls: &TlsFiles, timeout: Duration) -> Result<Conn, String> {
        let connect_timeout = Duration::from_secs(5);
        let auth =
            match &r.token {
                Some(t) => Some(Bearer::new(t).map_err(|_| {
                    "the token contains characters a header cannot carry".to_owned()
                })?),
                None => None,
            };
        let cannot = |e: tonic::transport::Error| {
            let mut msg = e.to_string();
            let mut src = std::error::Error::source(&e);
            while let Some(s) = src {
                let text = s.to_string();
                if !msg.contains(&text) {
                    msg = format!("{msg}: {text}");
                }
                src = s.source();
            }
            format!("cannot connect to {}: {msg}", r.target)
        };
        let channel = match &r.target {
            Target::Tcp(addr) => Endpoint::from_shared(format!("http://{addr}"))
                .map_err(|e| format!("bad address {addr:?}: {e}"))?
                .connect_timeout(connect_timeout)
                .tcp_nodelay(true)
                .connect()
                .await
                .map_err(cannot)?,
            Target::Tls(addr) => Endpoint::from_shared(format!("https://{addr}"))
                .map_err(|e| format!("bad address {addr:?}: {e}"))?
                .tls_config(tls_config(addr, tls)?)
                .map_err(|e| format!("TLS settings: {e}"))?
                .connect_timeout(connect_timeout)
                .tcp_nodelay(true)
                .connect()
                .await
                .map_err(cannot)?,
            Target::Unix(path) => {
                let path = path.clone();
                // The URI is required by the API but unused: the connector opens the socket.
                Endpoint::from_static("http://localhost")
                    .connect_timeout(connect_timeout)
                    .connect_with_connector(tower::service_fn(move |_: Uri| {
                        let path = path.clone();
                        async move {
                            let stream = tokio::net::UnixStream::connect(path).await?;
                            Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
                        }
                    }))
                    .await
                    .map_err(cannot)?
            }
        };
        Ok(Conn {
            channel,
            auth,
            timeout,
        })
    }

    /// A unary request: the message, the token and the timeout.
    pub fn unary<T>(&self, msg: T) -> Request<T> {
        let mut req = self.stream(msg);
        req.set_timeout(self.timeout);
        req
    }

    /// A streaming request: the message and the token, no timeout.
    pub fn stream<T>(&self, msg: T) -> Request<T> {
        let mut req = Request::new(msg);
        if let Some(auth) = &self.auth {
            auth.apply(&mut req);
        }
        req
    }
}

/// TLS that trusts the given CA for the address's host name, with the client identity if
/// one is given.
fn tls_config(addr: &str, files: &TlsFiles) -> Result<ClientTlsConfig, String> {
    let read = |what: &str, path: &Path| {
        std::fs::read(path).map_err(|e| format!("cannot read the {what} {}: {e}", path.display()))
    };
    let ca = files.ca.as_deref().ok_or(
        "an https:// address needs --tls-ca FILE: the CA that signed the daemon's certificate",
    )?;
    let host = addr.rsplit_once(':').map_or(addr, |(h, _)| h);
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let mut config = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(read("CA certificate", ca)?))
        .domain_name(host);
    match (&files.cert, &files.key) {
        (Some(cert), Some(key)) => {
            config = config.identity(Identity::from_pem(
                read("client certificate", cert)?,
                read("client key", key)?,
            ));
        }
        (None, None) => {}
        _ => return Err("--tls-cert and --tls-key go together".into()),
    }
    Ok(config)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(addr: Option<&str>, token: Option<&str>, dir: Option<&Path>) -> Settings {
        Settings {
            addr: addr.map(str::to_owned),
            token: token.map(str::to_owned),
            data_dir: dir.map(Path::to_path_buf),
            tls: TlsFiles::default(),
        }
    }

    #[test]
    fn explicit_address_and_token_win() {
        let r = resolve(&settings(Some("http://10.0.0.1:7"), Some("t\n"), None)).unwrap();
        assert_eq!(r.target, Target::Tcp("10.0.0.1:7".into()));
        assert_eq!(r.token.as_deref(), Some("t"));
        let r = resolve(&settings(Some("https://h:7"), None, None)).unwrap();
        assert_eq!(r.target, Target::Tls("h:7".into()));
        let r = resolve(&settings(Some("unix:/x/torud.sock"), None, None)).unwrap();
        assert_eq!(r.target, Target::Unix("/x/torud.sock".into()));
        assert!(resolve(&settings(Some("nonsense"), None, None)).is_err());
        assert!(resolve(&settings(Some("unix:"), None, None)).is_err());
    }

    #[test]
    fn data_dir_gives_socket_or_token() {
        let dir = tempfile::tempdir().unwrap();
        let r = resolve(&settings(None, None, Some(dir.path()))).unwrap();
        assert_eq!(
            r,
            Resolved {
                target: Target::Tcp(DEFAULT_ADDR.into()),
                token: None
            }
        );
        std::fs::write(dir.path().join("admin.token"), "secret\n").unwrap();
        let r = resolve(&settings(Some("127.0.0.1:9"), None, Some(dir.path()))).unwrap();
        assert_eq!(r.token.as_deref(), Some("secret"));
        std::fs::write(dir.path().join("torud.sock"), "").unwrap();
        let r = resolve(&settings(None, None, Some(dir.path()))).unwrap();
        assert_eq!(r.target, Target::Unix(dir.path().join("torud.sock")));
        assert_eq!(r.token, None);
    }
}
