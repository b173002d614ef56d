//! The value types of settings that flags, environment variables and the config file share.
//! Each checks its value where it is parsed (`FromStr` for flags and the environment,
//! `TryFrom` for the file through serde), so an out-of-range number or a malformed duration
//! is refused with the flag's, variable's or file line's own error, and code past parsing
//! never sees an invalid value.

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

pub use crate::secret::{Secret, REDACTED};

/// A duration written the human way: `500ms`, `5s`, `1m 30s`, `2h`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Span(pub Duration);

impl FromStr for Span {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        humantime::parse_duration(text.trim())
            .map(Span)
            .map_err(|e| format!("{text:?} is not a duration like 500ms, 5s or 1m 30s ({e})"))
    }
}

impl TryFrom<String> for Span {
    type Error = String;

    fn try_from(text: String) -> Result<Self, String> {
        text.parse()
    }
}

impl From<Span> for String {
    fn from(span: Span) -> String {
        span.to_string()
    }
}

impl fmt::Display for Span {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        humantime::format_duration(self.0).fmt(f)
    }
}

impl From<Duration> for Span {
    fn from(d: Duration) -> Self {
        Span(d)
    }
}

/// Where the metrics endpoint listens: `HOST:PORT`, or a bare `PORT` on the loopback address
/// (so turning metrics on never exposes them by accident).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct MetricsAddr(pub SocketAddr);

impl FromStr for MetricsAddr {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let text = text.trim();
        if let Ok(port) = text.parse::<u16>() {
            return Ok(MetricsAddr(SocketAddr::from(([127, 0, 0, 1], port))));
        }
        text.parse()
            .map(MetricsAddr)
            .map_err(|_| format!("{text:?} is not an address like 9464 (loopback) or 0.0.0.0:9464"))
    }
}

impl TryFrom<String> for MetricsAddr {
    type Error = String;

    fn try_from(text: String) -> Result<Self, String> {
        text.parse()
    }
}

impl From<MetricsAddr> for String {
    fn from(addr: MetricsAddr) -> String {
        addr.0.to_string()
    }
}

impl fmt::Display for MetricsAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// Where OpenTelemetry data is exported: the `http://` or `https://` URL of an OTLP/gRPC
/// receiver (a collector's port 4317, usually).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct OtlpEndpoint(pub String);

impl FromStr for OtlpEndpoint {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let text = text.trim();
        let uri: http::Uri = text
            .parse()
            .map_err(|e| format!("{text:?} is not a URL ({e})"))?;
        match (uri.scheme_str(), uri.host()) {
            (Some("http" | "https"), Some(_)) => Ok(OtlpEndpoint(text.to_owned())),
            _ => Err(format!(
                "{text:?} is not an http:// or https:// URL like http://127.0.0.1:4317"
            )),
        }
    }
}

impl TryFrom<String> for OtlpEndpoint {
    type Error = String;

    fn try_from(text: String) -> Result<Self, String> {
        text.parse()
    }
}

impl From<OtlpEndpoint> for String {
    fn from(endpoint: OtlpEndpoint) -> String {
        endpoint.0
    }
}

/// A web page's origin allowed to call the API from a browser (CORS): `scheme://host` or
/// `scheme://host:port`, exactly as the browser sends it in `Origin`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct WebOrigin(pub String);

impl FromStr for WebOrigin {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let text = text.trim();
        let refused = || {
            format!("{text:?} is not an origin like https://console.example.com or http://localhost:5173")
        };
        let uri: http::Uri = text.parse().map_err(|_| refused())?;
        let bare = uri
            .path_and_query()
            .is_none_or(|p| p.as_str().is_empty() || p.as_str() == "/")
            && !text.ends_with('/');
        match (uri.scheme_str(), uri.host()) {
            (Some("http" | "https"), Some(_)) if bare => Ok(WebOrigin(text.to_owned())),
            _ => Err(refused()),
        }
    }
}

impl TryFrom<String> for WebOrigin {
    type Error = String;

    fn try_from(text: String) -> Result<Self, String> {
        text.parse()
    }
}

impl From<WebOrigin> for String {
    fn from(origin: WebOrigin) -> String {
        origin.0
    }
}

/// A header sent with every OTLP export, written `name=value` (an API key, a tenant). The
/// name is a gRPC metadata key; the value is a [`Secret`], never logged or shown.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub struct OtlpHeader {
    /// The header's name, lower case.
    pub name: String,
    /// Its value.
    pub value: Secret,
}

impl FromStr for OtlpHeader {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let (name, value) = text
            .split_once('=')
            .ok_or_else(|| "a header is written name=value".to_owned())?;
        let name = name.trim().to_ascii_lowercase();
        let valid_name = !name.is_empty()
            && !name.ends_with("-bin")
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
        if !valid_name {
            return Err(format!(
                "{name:?} is not a header name (letters, digits, - _ .)"
            ));
        }
        let value = value.trim();
        if !value.bytes().all(|b| (0x20..0x7f).contains(&b)) {
            return Err(format!("the value of header {name} is not printable ASCII"));
        }
        Ok(OtlpHeader {
            name,
            value: Secret::new(value),
        })
    }
}

impl TryFrom<String> for OtlpHeader {
    type Error = String;

    fn try_from(text: String) -> Result<Self, String> {
        text.parse()
    }
}

impl Serialize for OtlpHeader {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format!("{}={REDACTED}", self.name))
    }
}

/// A count or size of at least `MIN`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "u64", into = "u64")]
pub struct AtLeast<const MIN: u64>(pub u64);

impl<const MIN: u64> TryFrom<u64> for AtLeast<MIN> {
    type Error = String;

    fn try_from(n: u64) -> Result<Self, String> {
        if n < MIN {
            return Err(format!("{n} is below the smallest value allowed, {MIN}"));
        }
        Ok(AtLeast(n))
    }
}

impl<const MIN: u64> FromStr for AtLeast<MIN> {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let n: u64 = text
            .trim()
            .parse()
            .map_err(|_| format!("{text:?} is not a whole number"))?;
        n.try_into()
    }
}

impl<const MIN: u64> From<AtLeast<MIN>> for u64 {
    fn from(n: AtLeast<MIN>) -> u64 {
        n.0
    }
}

impl<const MIN: u64> fmt::Display for AtLeast<MIN> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl<const MIN: u64> AtLeast<MIN> {
    /// The number, for a `u32` setting: saturated, since every such setting is a limit.
    pub fn as_u32(self) -> u32 {
        u32::try_from(self.0).unwrap_or(u32::MAX)
    }

    /// The number, for a `usize` setting.
    pub fn as_usize(self) -> usize {
        usize::try_from(self.0).unwrap_or(usize::MAX)
    }
}

/// A plugin id, checked against the plugin protocol's rules.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct PluginId(pub String);

impl TryFrom<String> for PluginId {
    type Error = String;

    fn try_from(id: String) -> Result<Self, String> {
        if !toru_plugin_sdk::metadata::is_valid_id(&id) {
            return Err(format!(
                "{id:?} is not a plugin id (ASCII letters, digits and '-')"
            ));
        }
        Ok(PluginId(id))
    }
}

impl From<PluginId> for String {
    fn from(id: PluginId) -> String {
        id.0
    }
}

/// The SHA-256 of a binary, as 64 hex digits (stored lowercase).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Sha256Hex(pub String);

impl FromStr for Sha256Hex {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let hash = text.trim().to_ascii_lowercase();
        if hash.len() != 64 || !hash.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(format!("{text:?} is not a SHA-256 (64 hex digits)"));
        }
        Ok(Sha256Hex(hash))
    }
}

impl TryFrom<String> for Sha256Hex {
    type Error = String;

    fn try_from(text: String) -> Result<Self, String> {
        text.parse()
    }
}

impl fmt::Display for Sha256Hex {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl From<Sha256Hex> for String {
    fn from(hash: Sha256Hex) -> String {
        hash.0
    }
}

/// `ID=VALUE`: a setting of one plugin given on the command line (`--pin`,
/// `--plugin-user`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(
    try_from = "String",
    into = "String",
    bound(
        serialize = "T: Clone + fmt::Display",
        deserialize = "T: FromStr<Err = String>"
    )
)]
pub struct ForPlugin<T> {
    /// The plugin.
    pub id: PluginId,
    /// Its value.
    pub value: T,
}

impl<T: FromStr<Err = String>> FromStr for ForPlugin<T> {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let (id, value) = text
            .split_once('=')
            .ok_or_else(|| format!("{text:?} is not ID=VALUE"))?;
        let id = PluginId::try_from(id.trim().to_owned())?;
        let value = value
            .parse()
            .map_err(|e| format!("the value for {}: {e}", id.0))?;
        Ok(ForPlugin { id, value })
    }
}

impl<T: FromStr<Err = String>> TryFrom<String> for ForPlugin<T> {
    type Error = String;

    fn try_from(text: String) -> Result<Self, String> {
        text.parse()
    }
}

impl<T: fmt::Display> From<ForPlugin<T>> for String {
    fn from(p: ForPlugin<T>) -> String {
        format!("{}={}", p.id.0, p.value)
    }
}

/// Whom a plugin runs as, instead of its own dynamic user: a user name or a uid.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct UserName(pub crate::plugin::isolation::users::UserChoice);

impl FromStr for UserName {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        use crate::plugin::isolation::users::UserChoice;
        let user = text.trim();
        if user.is_empty() {
            return Err("no user given".into());
        }
        Ok(UserName(match user.parse::<u32>() {
            Ok(uid) => UserChoice::Uid(uid),
            Err(_) => UserChoice::Name(user.to_owned()),
        }))
    }
}

impl TryFrom<String> for UserName {
    type Error = String;

    fn try_from(text: String) -> Result<Self, String> {
        text.parse()
    }
}

impl fmt::Display for UserName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use crate::plugin::isolation::users::UserChoice;
        match &self.0 {
            UserChoice::Name(name) => name.fmt(f),
            UserChoice::Uid(uid) => uid.fmt(f),
        }
    }
}

impl From<UserName> for String {
    fn from(user: UserName) -> String {
        user.to_string()
    }
}

/// The name of an environment variable given to a plugin: letters, digits and `_`, not
/// starting with a digit, and not one of the `TORU_*` variables the daemon sets.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct EnvName(pub String);

impl TryFrom<String> for EnvName {
    type Error = String;

    fn try_from(name: String) -> Result<Self, String> {
        let well_formed = !name.is_empty()
            && !name.starts_with(|c: char| c.is_ascii_digit())
            && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        if !well_formed {
            return Err(format!(
                "{name:?} is not an environment variable name (letters, digits and '_')"
            ));
        }
        if name.starts_with("TORU_") {
            return Err(format!(
                "{name} is set by the daemon (TORU_* variables cannot be overridden)"
            ));
        }
        Ok(EnvName(name))
    }
}

impl FromStr for EnvName {
    type Err = String;

    fn from_str(name: &str) -> Result<Self, String> {
        EnvName::try_from(name.trim().to_owned())
    }
}

impl From<EnvName> for String {
    fn from(name: EnvName) -> String {
        name.0
    }
}

/// An absolute path.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "PathBuf", into = "PathBuf")]
pub struct AbsolutePath(pub PathBuf);

impl TryFrom<PathBuf> for AbsolutePath {
    type Error = String;

    fn try_from(path: PathBuf) -> Result<Self, String> {
        if !path.is_absolute() {
            return Err(format!("{} is not an absolute path", path.display()));
        }
        Ok(AbsolutePath(path))
    }
}

impl From<AbsolutePath> for PathBuf {
    fn from(path: AbsolutePath) -> PathBuf {
        path.0
    }
}

/// An argument given to a plugin (no NUL byte: it could not reach the plugin).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Arg(pub String);

impl TryFrom<String> for Arg {
    type Error = String;

    fn try_from(arg: String) -> Result<Self, String> {
        if arg.contains('\0') {
            return Err(format!("{arg:?} holds a NUL byte"));
        }
        Ok(Arg(arg))
    }
}

impl From<Arg> for String {
    fn from(arg: Arg) -> String {
        arg.0
    }
}

/// What the supervisor does when a running plugin's process ends on its own.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum RestartPolicy {
    /// Restart it after any exit, with backoff (a clean exit counts as a failure too).
    #[default]
    Always,
    /// Restart it after a crash (non-zero exit, signal, lost connection, failed start); a
    /// clean exit (code 0) leaves it stopped.
    OnFailure,
    /// Never restart it: it stays stopped (clean exit) or crashed until an operator acts.
    Never,
}

impl fmt::Display for RestartPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            RestartPolicy::Always => "always",
            RestartPolicy::OnFailure => "on-failure",
            RestartPolicy::Never => "never",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_refuse_what_they_cannot_hold() {
        assert_eq!("1m 30s".parse::<Span>().unwrap().0, Duration::from_secs(90));
        assert!("soon"
            .parse::<Span>()
            .unwrap_err()
            .contains("not a duration"));
        assert!(AtLeast::<1>::try_from(0).unwrap_err().contains("smallest"));
        assert_eq!("4096".parse::<AtLeast<4096>>().unwrap().0, 4096);
        assert!(PluginId::try_from("Bad Id".to_owned()).is_err());
        assert!(EnvName::try_from("TORU_ADMIN".to_owned())
            .unwrap_err()
            .contains("set by the daemon"));
        assert!(EnvName::try_from("1X".to_owned()).is_err());
        let pin: ForPlugin<Sha256Hex> = format!("hello={}", "AB".repeat(32)).parse().unwrap();
        assert_eq!((pin.id.0.as_str(), pin.value.0.len()), ("hello", 64));
        assert!("hello=12".parse::<ForPlugin<Sha256Hex>>().is_err());
    }
}
