//! Who may call the control plane: bearer tokens with two roles, checked in front of every
//! gRPC route of the TCP listener.
//!
//! A call carries `authorization: Bearer <token>`. The admin token allows everything; the
//! read token allows only the methods in [`READ_METHODS`] (list, get, query, stream, watch).
//! Health and reflection stay open: they reveal no plugin data, and probes and `grpcurl
//! list` need them. Tokens are compared as SHA-256 digests in constant time, so neither
//! their content nor their length leaks through timing. The Unix-socket listener is trusted
//! by file permission and does not ask (see `server.rs`).
//!
//! Tokens come from the configuration (a value or a file); a role with none configured gets
//! a random token generated into the data directory (mode 0600) on first start and read
//! back on later ones. This module knows nothing of plugins.

use std::os::unix::fs::MetadataExt;
#[cfg(test)]
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::task::{Context, Poll};

use futures::future::{Either, Ready};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tonic::Status;

pub use crate::config::TokenSource;
use crate::store::state::write_atomically;

/// What a caller may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Read-only: list, get, query, stream, watch.
    Read,
    /// Everything.
    Admin,
}

/// Methods the read role may call (full gRPC paths).
pub const READ_METHODS: &[&str] = &[
    "/toru.v1.PluginService/ListPlugins",
    "/toru.v1.PluginService/GetPlugin",
    "/toru.v1.PluginService/WatchEvents",
    "/toru.v1.KvService/GetValue",
    "/toru.v1.LogService/QueryLogs",
    "/toru.v1.LogService/StreamLogs",
    "/toru.v1.ConfigService/GetConfig",
];

/// Services anyone may call: they reveal no plugin data.
pub const OPEN_SERVICES: &[&str] = &[
    "/grpc.health.v1.Health/",
    "/grpc.reflection.v1.ServerReflection/",
    "/grpc.reflection.v1alpha.ServerReflection/",
];

/// The role a method needs; `None` for open services.
pub fn required_role(path: &str) -> Option<Role> {
    if OPEN_SERVICES.iter().any(|s| path.starts_with(s)) {
        None
    } else if READ_METHODS.contains(&path) {
        Some(Role::Read)
    } else {
        // Every other method, and any unknown path, needs the admin token.
        Some(Role::Admin)
    }
}

/// Errors loading tokens; each names the file.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    /// A token file could not be read or written.
    #[error("token file {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What failed.
        source: std::io::Error,
    },
    /// A token is empty or too short to be a secret.
    #[error("{what}: a token must be at least {MIN_TOKEN} characters")]
    TooShort {
        /// Which token.
        what: String,
    },
    /// The admin and read tokens are the same.
    #[error("the admin and read tokens must differ")]
    Same,
}

/// Shortest token accepted.
pub const MIN_TOKEN: usize = 16;

/// The two roles' tokens, as digests.
#[derive(Clone)]
pub struct Tokens {
    admin: [u8; 32],
    read: [u8; 32],
}

fn digest(token: &[u8]) -> [u8; 32] {
    Sha256::digest(token).into()
}

impl Tokens {
    /// Tokens from their values.
    pub fn new(admin: &str, read: &str) -> Result<Self, TokenError> {
        for (what, token) in [("admin token", admin), ("read token", read)] {
            if token.len() < MIN_TOKEN {
                return Err(TokenError::TooShort { what: what.into() });
            }
        }
        if admin == read {
            return Err(TokenError::Same);
        }
        Ok(Tokens {
            admin: digest(admin.as_bytes()),
            read: digest(read.as_bytes()),
        })
    }

    /// Loads (or generates) both tokens.
    pub fn load(admin: &TokenSource, read: &TokenSource) -> Result<Self, TokenError> {
        Tokens::new(&load_token(admin)?, &load_token(read)?)
    }

    /// The role `token` grants, if any (constant time in the token's content and length).
    pub fn role_of(&self, token: &[u8]) -> Option<Role> {
        let d = digest(token);
        let admin: bool = d.ct_eq(&self.admin).into();
        let read: bool = d.ct_eq(&self.read).into();
        match (admin, read) {
            (true, _) => Some(Role::Admin),
            (false, true) => Some(Role::Read),
            _ => None,
        }
    }

    /// Whether the call to `path` with these `headers` may proceed.
    pub fn check(&self, path: &str, headers: &http::HeaderMap) -> Result<(), Status> {
        let Some(needed) = required_role(path) else {
            return Ok(());
        };
        let Some(value) = headers.get(http::header::AUTHORIZATION) else {
            return Err(Status::unauthenticated(
                "missing authorization metadata: send `authorization: Bearer <token>` \
                 (the token is in the daemon's data directory unless configured)",
            ));
        };
        let token = value
            .as_bytes()
            .strip_prefix(b"Bearer ")
            .or_else(|| value.as_bytes().strip_prefix(b"bearer "))
            .ok_or_else(|| {
                Status::unauthenticated("authorization metadata must be `Bearer <token>`")
            })?;
        match self.role_of(token.trim_ascii()) {
            None => Err(Status::unauthenticated("invalid token")),
            Some(Role::Read) if needed == Role::Admin => Err(Status::permission_denied(format!(
                "{path} needs the admin token; this token is read-only"
            ))),
            Some(_) => Ok(()),
        }
    }
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> TokenError + '_ {
    move |source| TokenError::Io {
        path: path.to_owned(),
        source,
    }
}

fn load_token(source: &TokenSource) -> Result<String, TokenError> {
    match source {
        TokenSource::Value(v) => Ok(v.trim().to_owned()),
        TokenSource::File(path) => {
            let text = std::fs::read_to_string(path).map_err(io_err(path))?;
            let mode = std::fs::metadata(path).map_err(io_err(path))?.mode();
            if mode & 0o077 != 0 {
                tracing::warn!(path = %path.display(), mode = format!("{:o}", mode & 0o777),
                    "token file is readable by other users; chmod 600 it");
            }
            Ok(text.trim().to_owned())
        }
        TokenSource::Generated(path) => match std::fs::read_to_string(path) {
            Ok(text) => Ok(text.trim().to_owned()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let token = random_token().map_err(io_err(path))?;
                let text = format!("{token}\n");
                // Readable by the daemon's user only.
                write_atomically(path, text.as_bytes(), 0o600).map_err(io_err(path))?;
                tracing::info!(path = %path.display(), "generated a token");
                Ok(token)
            }
            Err(e) => Err(io_err(path)(e)),
        },
    }
}

/// 32 random bytes, hex.
fn random_token() -> std::io::Result<String> {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).map_err(|e| std::io::Error::other(e.to_string()))?;
    Ok(hex::encode(bytes))
}

/// A tower layer that checks tokens in front of every route.
#[derive(Clone)]
pub struct AuthLayer {
    tokens: Arc<Tokens>,
}

impl AuthLayer {
    /// Checks calls against `tokens`.
    pub fn new(tokens: Tokens) -> Self {
        AuthLayer {
            tokens: Arc::new(tokens),
        }
    }
}

impl<S> tower::Layer<S> for AuthLayer {
    type Service = Auth<S>;

    fn layer(&self, inner: S) -> Auth<S> {
        Auth {
            inner,
            tokens: self.tokens.clone(),
        }
    }
}

/// The service [`AuthLayer`] wraps routes in: refused calls get a gRPC status without
/// reaching them.
#[derive(Clone)]
pub struct Auth<S> {
    inner: S,
    tokens: Arc<Tokens>,
}

impl<S, B> tower::Service<http::Request<B>> for Auth<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<tonic::body::Body>>,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = S::Error;
    type Future = Either<Ready<Result<Self::Response, S::Error>>, S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        match self.tokens.check(req.uri().path(), req.headers()) {
            Ok(()) => Either::Right(self.inner.call(req)),
            Err(status) => Either::Left(futures::future::ready(Ok(status.into_http()))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(value: &str) -> http::HeaderMap {
        let mut h = http::HeaderMap::new();
        h.insert(http::header::AUTHORIZATION, value.parse().unwrap());
        h
    }

    #[test]
    fn roles_gate_methods_and_open_services_stay_open() {
        let t = Tokens::new("admin-token-0123456789", "read-token-0123456789").unwrap();
        let admin = headers("Bearer admin-token-0123456789");
        let read = headers("Bearer read-token-0123456789");
        let list = "/toru.v1.PluginService/ListPlugins";
        let enable = "/toru.v1.PluginService/EnablePlugin";
        assert!(t.check(list, &admin).is_ok());
        assert!(t.check(enable, &admin).is_ok());
        assert!(t.check(list, &read).is_ok());
        let denied = t.check(enable, &read).unwrap_err();
        assert_eq!(denied.code(), tonic::Code::PermissionDenied);
        for bad in [
            http::HeaderMap::new(),
            headers("Bearer nope"),
            headers("admin-token-0123456789"),
            headers("Bearer admin-token-012345678"),
        ] {
            assert_eq!(
                t.check(list, &bad).unwrap_err().code(),
                tonic::Code::Unauthenticated
            );
        }
        let health = "/grpc.health.v1.Health/Check";
        assert!(t.check(health, &http::HeaderMap::new()).is_ok());
        // The configuration is readable (secrets redacted); reloading it is not.
        assert_eq!(
            required_role("/toru.v1.ConfigService/GetConfig"),
            Some(Role::Read)
        );
        assert_eq!(
            required_role("/toru.v1.ConfigService/ReloadConfig"),
            Some(Role::Admin)
        );
        let unknown = "/toru.v1.PluginService/NoSuchMethod";
        assert_eq!(
            t.check(unknown, &read).unwrap_err().code(),
            tonic::Code::PermissionDenied
        );
    }

    #[test]
    fn tokens_are_generated_once_private_and_validated() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("admin.token");
        let first = load_token(&TokenSource::Generated(path.clone())).unwrap();
        assert_eq!(first.len(), 64);
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let again = load_token(&TokenSource::Generated(path.clone())).unwrap();
        assert_eq!(first, again, "read back, not regenerated");
        assert!(matches!(
            Tokens::new("short", "read-token-0123456789"),
            Err(TokenError::TooShort { .. })
        ));
        assert!(matches!(
            Tokens::new("same-token-0123456789", "same-token-0123456789"),
            Err(TokenError::Same)
        ));
    }
}
