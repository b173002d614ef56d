//! The JSON envelope every protocol message travels in, and constructors for the messages
//! the host sends.
//!
//! Every message built here is valid for the strictest known v1 reader (DESIGN.md): the
//! `payload` repeats the envelope's `type` and `request_id` (for readers that parse an
//! internally tagged payload), and `timestamp` is RFC 3339 UTC. Unknown fields are ignored
//! by every known plugin, so one shape serves all of them.
//! This module knows nothing of sockets or framing.

use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

/// The `type` of a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MessageType {
    /// Host → plugin lifecycle notices (`init`, `shutdown`); never answered.
    Lifecycle,
    /// An HTTP-style call and its answer.
    Http,
    /// A key-value operation and its answer.
    Kv,
    /// Any type this version does not know; kept so the caller can report it.
    #[serde(other)]
    Unknown,
}

impl MessageType {
    /// The wire name of the type.
    pub fn as_str(self) -> &'static str {
        match self {
            MessageType::Lifecycle => "lifecycle",
            MessageType::Http => "http",
            MessageType::Kv => "kv",
            MessageType::Unknown => "unknown",
        }
    }
}

/// One protocol message: `{"type", "timestamp", "request_id", "payload"}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Envelope {
    /// The message type.
    #[serde(rename = "type")]
    pub kind: MessageType,
    /// When the message was made, RFC 3339 UTC.
    #[serde(default)]
    pub timestamp: String,
    /// Correlates a request with its answer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
    /// The type-specific body.
    #[serde(default)]
    pub payload: Value,
}

/// What the host tells a plugin in the `init` lifecycle message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InitParams {
    /// Id of this run of the plugin.
    pub instance_id: String,
    /// The socket path the plugin listens on.
    pub plugin_socket: String,
    /// Where the host stores the plugin's logs.
    pub log_path: String,
    /// The newest protocol version the host speaks.
    pub host_protocol_version: u32,
}

impl Envelope {
    /// Builds a message whose payload also carries `type` and `request_id`, so that readers
    /// of internally tagged payloads accept it. `fields` must be a JSON object.
    pub fn new(kind: MessageType, request_id: String, fields: Value) -> Self {
        let mut payload = match fields {
            Value::Object(map) => map,
            other => {
                let mut map = Map::new();
                map.insert("payload".into(), other);
                map
            }
        };
        payload.insert("type".into(), Value::String(kind.as_str().into()));
        payload.insert("request_id".into(), Value::String(request_id.clone()));
        Envelope {
            kind,
            timestamp: now_rfc3339(),
            request_id: Some(request_id),
            payload: Value::Object(payload),
        }
    }

    /// The `init` lifecycle message.
    pub fn init(request_id: String, params: &InitParams) -> Self {
        Self::new(
            MessageType::Lifecycle,
            request_id,
            json!({
                "action": "init",
                "instance_id": params.instance_id,
                "plugin_socket": params.plugin_socket,
                "log_path": params.log_path,
                "protocol_version": params.host_protocol_version,
            }),
        )
    }

    /// The `shutdown` lifecycle message.
    pub fn shutdown(request_id: String) -> Self {
        Self::new(
            MessageType::Lifecycle,
            request_id,
            json!({ "action": "shutdown" }),
        )
    }

    /// The lifecycle action (`init`, `shutdown`), when this is a lifecycle message.
    pub fn lifecycle_action(&self) -> Option<&str> {
        if self.kind != MessageType::Lifecycle {
            return None;
        }
        self.payload.get("action").and_then(Value::as_str)
    }

    /// Serialises the message to JSON bytes (the payload of one frame).
    pub fn to_vec(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("an envelope always serialises")
    }

    /// Parses a message from the payload of one frame.
    pub fn from_slice(bytes: &[u8]) -> Result<Self, serde_json::Error> {
        serde_json::from_slice(bytes)
    }
}

/// The current time as RFC 3339 UTC, as every `timestamp` field carries it.
pub fn now_rfc3339() -> String {
    OffsetDateTime::now_utc()
        .format(&Rfc3339)
        .expect("the current time always formats")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn init_carries_the_tag_inside_the_payload_too() {
        let env = Envelope::init(
            "r1".into(),
            &InitParams {
                instance_id: "i".into(),
                plugin_socket: "/s".into(),
                log_path: "/l".into(),
                host_protocol_version: 2,
            },
        );
        let v: Value = serde_json::from_slice(&env.to_vec()).unwrap();
        assert_eq!(v["type"], "lifecycle");
        assert_eq!(v["request_id"], "r1");
        assert_eq!(v["payload"]["type"], "lifecycle");
        assert_eq!(v["payload"]["request_id"], "r1");
        assert_eq!(v["payload"]["action"], "init");
        assert_eq!(v["payload"]["protocol_version"], 2);
        OffsetDateTime::parse(v["timestamp"].as_str().unwrap(), &Rfc3339).unwrap();
    }

    #[test]
    fn unknown_type_parses_as_unknown() {
        let env = Envelope::from_slice(br#"{"type":"ping","payload":{}}"#).unwrap();
        assert_eq!(env.kind, MessageType::Unknown);
    }
}
