//! Plugin metadata: what a plugin prints when run with `--metadata`, and the rules it must
//! follow (docs/PROTOCOL.md, "Files and discovery"). Parsing and validation only; running
//! the plugin to get the text is the daemon's business.

use serde::{Deserialize, Serialize};

/// Longest id accepted. Ids name files and sockets, so they stay short.
pub const MAX_ID_LEN: usize = 64;
/// `name` and `author` must be shorter than this many characters.
pub const MAX_NAME_CHARS: usize = 100;

/// The JSON object a plugin prints on `--metadata`. Unknown fields are ignored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Metadata {
    /// Unique id: ASCII letters, digits and `-`.
    pub id: String,
    /// Human-readable name, under 100 characters.
    pub name: String,
    /// Version string.
    pub version: String,
    /// Author, under 100 characters.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub author: Option<String>,
    /// Icon name or URL, shown by host applications.
    pub icon: String,
    /// Route prefix: starts with `/`, contains no `..`.
    pub route: String,
    /// Optional longer description.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// Protocol version the plugin speaks; absent means 1.
    #[serde(default = "protocol_v1")]
    pub protocol_version: u32,
}

fn protocol_v1() -> u32 {
    1
}

/// Why metadata was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MetadataError {
    /// The text is not a JSON object with the required fields.
    #[error("metadata is not valid JSON with id, name, version, icon and route: {0}")]
    Json(String),
    /// The id breaks the id rule.
    #[error("id {0:?} is invalid: use 1 to 64 ASCII letters, digits and '-'")]
    Id(String),
    /// The route breaks the route rule.
    #[error("route {0:?} is invalid: it must start with '/' and contain no '..'")]
    Route(String),
    /// `name` or `author` is too long.
    #[error("{field} is {chars} characters long; it must be under 100")]
    TooLong {
        /// Which field.
        field: &'static str,
        /// Its length in characters.
        chars: usize,
    },
    /// A text field holds a control character (C0 including TAB, CR and LF; DEL; C1), which
    /// a terminal or log showing the field could act on.
    #[error("{field} contains the control character U+{code:04X} at character {at}; metadata fields are single-line text without control characters")]
    ControlChar {
        /// Which field.
        field: &'static str,
        /// The character's code point.
        code: u32,
        /// Its position in the field, in characters from 0.
        at: usize,
    },
    /// The declared protocol version is 0.
    #[error("protocol_version 0 is invalid: declare 1 or more, or leave it out")]
    ProtocolVersion,
}

impl Metadata {
    /// Metadata with the required fields, icon `plugin`, no author or description, and
    /// this SDK's protocol version.
    pub fn new(id: &str, name: &str, version: &str, route: &str) -> Self {
        Metadata {
            id: id.into(),
            name: name.into(),
            version: version.into(),
            author: None,
            icon: "plugin".into(),
            route: route.into(),
            description: None,
            protocol_version: crate::PROTOCOL_VERSION,
        }
    }

    /// Parses and validates metadata from the bytes a plugin printed.
    pub fn parse(bytes: &[u8]) -> Result<Self, MetadataError> {
        let meta: Metadata =
            serde_json::from_slice(bytes).map_err(|e| MetadataError::Json(e.to_string()))?;
        meta.validate()?;
        Ok(meta)
    }

    /// Checks the protocol's rules.
    pub fn validate(&self) -> Result<(), MetadataError> {
        if !is_valid_id(&self.id) {
            return Err(MetadataError::Id(self.id.clone()));
        }
        self.check_no_control_chars()?;
        if !self.route.starts_with('/') || self.route.contains("..") {
            return Err(MetadataError::Route(self.route.clone()));
        }
        let fields = [("name", Some(&self.name)), ("author", self.author.as_ref())];
        for (field, value) in fields {
            let chars = value.map_or(0, |v| v.chars().count());
            if chars >= MAX_NAME_CHARS {
                return Err(MetadataError::TooLong { field, chars });
            }
        }
        if self.protocol_version == 0 {
            return Err(MetadataError::ProtocolVersion);
        }
        Ok(())
    }

    /// Refuses a control character in any text field: hosts show these fields in terminals,
    /// tables and logs, where one could clear the screen or forge a line.
    fn check_no_control_chars(&self) -> Result<(), MetadataError> {
        let fields = [
            ("name", Some(&self.name)),
            ("version", Some(&self.version)),
            ("author", self.author.as_ref()),
            ("icon", Some(&self.icon)),
            ("route", Some(&self.route)),
            ("description", self.description.as_ref()),
        ];
        for (field, value) in fields {
            if let Some((at, c)) = value.and_then(|v| first_control_char(v)) {
                return Err(MetadataError::ControlChar {
                    field,
                    code: c as u32,
                    at,
                });
            }
        }
        Ok(())
    }
}

/// The first control character of `text` (C0 including TAB, CR and LF; DEL; C1, U+0080 to
/// U+009F) and its position in characters, if any. Also used for plugin file names.
pub fn first_control_char(text: &str) -> Option<(usize, char)> {
    text.chars().enumerate().find(|(_, c)| c.is_control())
}

/// Whether `id` follows the id rule (also used to validate ids given over the API).
pub fn is_valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_ID_LEN
        && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"{"id":"hello-1","name":"Hello","version":"1.0","icon":"x","route":"/hello","extra":true}"#;

    #[test]
    fn accepts_good_metadata_and_defaults_to_v1() {
        let m = Metadata::parse(GOOD.as_bytes()).unwrap();
        assert_eq!(m.id, "hello-1");
        assert_eq!(m.protocol_version, 1);
    }

    #[test]
    fn refuses_each_broken_rule() {
        let cases = [
            (r#""id":"a_b""#, "id"),
            (r#""id":"""#, "id"),
            (r#""route":"hello""#, "route"),
            (r#""route":"/a/../b""#, "route"),
        ];
        for (patch, what) in cases {
            let key = &patch[1..patch[1..].find('"').unwrap() + 1];
            let mut v: serde_json::Value = serde_json::from_str(GOOD).unwrap();
            let patched: serde_json::Value = serde_json::from_str(&format!("{{{patch}}}")).unwrap();
            v[key] = patched[key].clone();
            let err = Metadata::parse(v.to_string().as_bytes()).unwrap_err();
            assert!(err.to_string().contains(what), "{patch}: {err}");
        }
        let long_name = GOOD.replace("\"Hello\"", &format!("\"{}\"", "n".repeat(100)));
        assert!(matches!(
            Metadata::parse(long_name.as_bytes()),
            Err(MetadataError::TooLong { field: "name", .. })
        ));
        for field in ["name", "version", "author", "icon", "route", "description"] {
            for hostile in [
                "\u{1b}[2J",
                "\u{1b}]0;x\u{7}",
                "\rb",
                "\nb",
                "\tb",
                "\u{9b}31m",
                "\u{7f}",
            ] {
                let mut v: serde_json::Value = serde_json::from_str(GOOD).unwrap();
                v[field] = format!("/x{hostile}").into();
                let err = Metadata::parse(v.to_string().as_bytes()).unwrap_err();
                assert!(
                    matches!(err, MetadataError::ControlChar { field: f, at: 2, .. } if f == field),
                    "{field} {hostile:?}: {err}"
                );
                assert!(!err.to_string().contains(hostile), "{err}");
            }
        }
        assert!(matches!(
            Metadata::parse(b"not json"),
            Err(MetadataError::Json(_))
        ));
        assert!(matches!(
            Metadata::parse(br#"{"id":"x"}"#),
            Err(MetadataError::Json(_))
        ));
    }
}
