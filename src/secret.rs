//! [`Secret`]: a value (a plugin's environment variable from its config section) that is
//! never logged and never shown. A leaf module, so that the config (which reads secrets) and
//! the process spawner (the one place that hands them over) can both name it.

use std::fmt;

use serde::{Deserialize, Serialize};

/// A value that is never logged and never shown: its `Debug` and its serialized form are
/// `(redacted)`. Only the plugin it is meant for gets it, in its environment.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub struct Secret(String);

impl TryFrom<String> for Secret {
    type Error = String;

    fn try_from(value: String) -> Result<Self, String> {
        if value.contains('\0') {
            return Err("an environment value cannot hold a NUL byte".into());
        }
        Ok(Secret(value))
    }
}

/// What a [`Secret`] shows instead of itself.
pub const REDACTED: &str = "(redacted)";

impl Secret {
    /// A secret holding `value`.
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }

    /// The value itself, for the one place that hands it over (the plugin's environment).
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(REDACTED)
    }
}

impl Serialize for Secret {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(REDACTED)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_secret_never_shows_itself() {
        let secret = Secret::new("hunter2");
        assert_eq!(format!("{secret:?}"), REDACTED);
        let json = serde_json::to_string(&secret).unwrap();
        assert!(!json.contains("hunter2"), "{json}");
        assert_eq!(secret.expose(), "hunter2");
    }
}
