//! The JSON envelope every protocol message travels in, and constructors for the messages
//! the host sends.
//!
//! Every message built here is valid for the strictest known v1 reader (docs/PROTOCOL.md,
//! "Envelope"): the `payload` repeats the envelope's `type` and `request_id` (for readers
//! that parse an internally tagged payload), and `timestamp` is RFC 3339 UTC. Unknown
//! fields are ignored by every known plugin, so one shape serves all of them.
//! This module knows nothing of sockets or framing.

use base64::Engine;
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use crate::plugin::KvOp;

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
    /// Protocol 2: plugin → host, once, after `init`: ready to serve.
    Ready,
    /// Protocol 2: host → plugin heartbeat; answered by `pong` with the same `request_id`.
    Ping,
    /// Protocol 2: the answer to `ping`.
    Pong,
    /// Protocol 2: host → plugin: the caller of `request_id` is gone; drop the work.
    Cancel,
    /// Protocol 2: plugin → host: an operation on the plugin's durable storage, answered
    /// by the host with the same type and `request_id` (see [`crate::storage_wire::StorageOp`]).
    Storage,
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
            MessageType::Ready => "ready",
            MessageType::Ping => "ping",
            MessageType::Pong => "pong",
            MessageType::Cancel => "cancel",
            MessageType::Storage => "storage",
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
    /// When the message was made, RFC 3339 UTC (read leniently: null or a number is kept
    /// as text, never a reason to drop the message).
    #[serde(default, deserialize_with = "lenient_text")]
    pub timestamp: String,
    /// Correlates a request with its answer (a number is read as its text).
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "lenient_id"
    )]
    pub request_id: Option<String>,
    /// The type-specific body.
    #[serde(default)]
    pub payload: Value,
    /// The W3C trace context (`traceparent`) of a host → plugin `http` or `kv` request,
    /// when the request is traced (protocol 2 only; see [`crate::trace`]). A plugin
    /// continues the caller's trace from it; it never changes what the request means.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "lenient_id"
    )]
    pub traceparent: Option<String>,
}

fn lenient_text<'de, D: serde::Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    Ok(lenient_id(d)?.unwrap_or_default())
}

fn lenient_id<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    Ok(match Value::deserialize(d)? {
        Value::Null => None,
        Value::String(s) => Some(s),
        other => Some(other.to_string()),
    })
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
            traceparent: None,
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

    /// A `kv` request. The operation sits both in `payload` and in `payload.payload`, so
    /// plugins that read either place find it.
    pub fn kv_request(request_id: String, op: &KvOp) -> Self {
        let value = op.value();
        let mut op = json!({ "action": op.action(), "key": op.key() });
        if let Some(value) = value {
            op["value"] = Value::String(value.to_owned());
        }
        let mut fields = op.clone();
        fields["payload"] = op;
        Self::new(MessageType::Kv, request_id, fields)
    }

    /// An `http` request, in `payload.payload`.
    pub fn http_request(request_id: String, call: &HttpCall) -> Self {
        let headers: Map<String, Value> =
            call.headers
                .iter()
                .fold(Map::new(), |mut map, (name, value)| {
                    let joined = match map.get(name).and_then(Value::as_str) {
                        Some(previous) => format!("{previous}, {value}"),
                        None => value.clone(),
                    };
                    map.insert(name.clone(), Value::String(joined));
                    map
                });
        let header_list: Vec<[&str; 2]> = call
            .headers
            .iter()
            .map(|(n, v)| [n.as_str(), v.as_str()])
            .collect();
        let mut inner = json!({
            "method": call.method,
            "path": call.path,
            "headers": headers,
            "header_list": header_list,
        });
        encode_body(&mut inner, call.body.as_deref());
        Self::new(MessageType::Http, request_id, json!({ "payload": inner }))
    }

    /// A protocol-2 message with nothing but its type and id (`ready`, `ping`, `pong`,
    /// `cancel`).
    pub fn bare(kind: MessageType, request_id: String) -> Self {
        Self::new(kind, request_id, json!({}))
    }

    /// The answer's fields, in whichever accepted shape it came: in `payload` (documented),
    /// in `payload.payload` (nested), or — when `payload.payload` has no answer field of its
    /// own — as the whole answer in JSON text in `payload.payload.body` (Toru's Rust crate
    /// answers everything that way). `None` when no shape carries the answer `kind` wants:
    /// `status` for [`AnswerKind::Http`], `value` for [`AnswerKind::Kv`].
    pub fn answer(&self, kind: AnswerKind) -> Option<Map<String, Value>> {
        let outer = self.payload.as_object()?;
        if kind.carried_by(outer) {
            return Some(outer.clone());
        }
        let nested = outer.get("payload")?.as_object()?;
        if kind.carried_by(nested) {
            return Some(nested.clone());
        }
        let text = nested.get("body")?.as_str()?;
        match serde_json::from_str::<Value>(text) {
            Ok(Value::Object(inner)) if kind.wraps(&inner) => Some(inner),
            _ => None,
        }
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

/// Which answer a request expects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AnswerKind {
    /// An http answer: `status`, `headers`, `body`.
    Http,
    /// A kv answer: `value`.
    Kv,
}

impl AnswerKind {
    /// Whether `fields` carry this kind of answer directly.
    fn carried_by(self, fields: &Map<String, Value>) -> bool {
        match self {
            AnswerKind::Http => fields.contains_key("status"),
            AnswerKind::Kv => fields.contains_key("value"),
        }
    }

    /// Whether `inner` (parsed from a JSON-text body) is a whole answer of this kind and
    /// nothing else.
    fn wraps(self, inner: &Map<String, Value>) -> bool {
        const HTTP_KEYS: [&str; 5] = ["status", "headers", "body", "header_list", "body_encoding"];
        match self {
            AnswerKind::Http => {
                inner.get("status").is_some_and(Value::is_i64)
                    && inner.keys().all(|k| HTTP_KEYS.contains(&k.as_str()))
            }
            AnswerKind::Kv => inner.len() == 1 && inner.contains_key("value"),
        }
    }
}

/// An HTTP-style call as the host forwards it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HttpCall {
    /// Method, for example `GET`.
    pub method: String,
    /// Path with the query string.
    pub path: String,
    /// Header fields in order; names may repeat.
    pub headers: Vec<(String, String)>,
    /// The body, when there is one.
    pub body: Option<Vec<u8>>,
}

/// A plugin's answer to an [`HttpCall`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HttpAnswer {
    /// Status code.
    pub status: i32,
    /// Header fields in order.
    pub headers: Vec<(String, String)>,
    /// The body (empty when the plugin sent null).
    pub body: Vec<u8>,
}

/// Why an answer could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AnswerError {
    /// No accepted shape carried the answer.
    #[error("the answer carries no status or value in any accepted shape")]
    Shape,
    /// A field has the wrong type or encoding.
    #[error("the answer's {0} is invalid")]
    Field(&'static str),
}

impl HttpAnswer {
    /// Reads an http answer from its fields (see [`Envelope::answer`]). Headers may be an
    /// object of strings or string arrays, or a `header_list` of pairs.
    pub fn from_fields(fields: &Map<String, Value>) -> Result<Self, AnswerError> {
        let status = fields
            .get("status")
            .and_then(Value::as_i64)
            .and_then(|s| i32::try_from(s).ok())
            .ok_or(AnswerError::Field("status"))?;
        let mut headers = Vec::new();
        if let Some(list) = fields.get("header_list").and_then(Value::as_array) {
            for pair in list {
                match pair.as_array().map(Vec::as_slice) {
                    Some([Value::String(n), Value::String(v)]) => {
                        headers.push((n.clone(), v.clone()))
                    }
                    _ => return Err(AnswerError::Field("header_list")),
                }
            }
        } else if let Some(map) = fields.get("headers").and_then(Value::as_object) {
            for (name, value) in map {
                match value {
                    Value::String(v) => headers.push((name.clone(), v.clone())),
                    Value::Array(values) => {
                        for v in values {
                            let v = v.as_str().ok_or(AnswerError::Field("headers"))?;
                            headers.push((name.clone(), v.to_owned()));
                        }
                    }
                    _ => return Err(AnswerError::Field("headers")),
                }
            }
        }
        let body = decode_body(fields)?.unwrap_or_default();
        Ok(HttpAnswer {
            status,
            headers,
            body,
        })
    }

    /// The answer's fields as a plugin sends them.
    pub fn to_fields(&self) -> Value {
        let header_list: Vec<[&str; 2]> = self
            .headers
            .iter()
            .map(|(n, v)| [n.as_str(), v.as_str()])
            .collect();
        let headers: Map<String, Value> = self
            .headers
            .iter()
            .map(|(n, v)| (n.clone(), Value::String(v.clone())))
            .collect();
        let mut fields =
            json!({"status": self.status, "headers": headers, "header_list": header_list});
        encode_body(&mut fields, Some(&self.body));
        fields
    }
}

/// The statuses an answer may carry: three digits, 1xx to 5xx (RFC 9110, section 15).
pub const VALID_STATUS: std::ops::RangeInclusive<i32> = 100..=599;

/// A header field that breaks the rules every header crossing the host follows, in a
/// caller's request and in a plugin's answer alike: the name is an RFC 9110 token, the value
/// holds no CR, LF or NUL. Names in the message are cut to 80 characters.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HeaderError {
    /// The name is empty or has a character outside the token set.
    #[error("headers[{index}].name: {name:?} is not a header name (use letters, digits and !#$%&'*+-.^_`|~)")]
    Name {
        /// Position of the header in the list.
        index: usize,
        /// The name, cut to 80 characters.
        name: String,
    },
    /// The value contains CR, LF or NUL.
    #[error("headers[{index}].value: the value of {name:?} contains a line break or NUL")]
    Value {
        /// Position of the header in the list.
        index: usize,
        /// The header's name, cut to 80 characters.
        name: String,
    },
}

/// Checks each `(name, value)` against the header rules (see [`HeaderError`]); the first
/// header that breaks one is the error.
pub fn check_headers<'a>(
    headers: impl IntoIterator<Item = (&'a str, &'a str)>,
) -> Result<(), HeaderError> {
    let token = |b: u8| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b);
    let cut = |name: &str| name.chars().take(80).collect::<String>();
    for (index, (name, value)) in headers.into_iter().enumerate() {
        if name.is_empty() || !name.bytes().all(token) {
            return Err(HeaderError::Name {
                index,
                name: cut(name),
            });
        }
        if value.bytes().any(|b| matches!(b, b'\r' | b'\n' | 0)) {
            return Err(HeaderError::Value {
                index,
                name: cut(name),
            });
        }
    }
    Ok(())
}

/// Why a readable http answer breaks the rules a caller's request follows.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidAnswer {
    /// The status is outside [`VALID_STATUS`].
    #[error("status {0} is not an HTTP status (100 to 599)")]
    Status(i32),
    /// A header breaks the header rules.
    #[error("{0}")]
    Header(#[from] HeaderError),
}

impl HttpAnswer {
    /// Checks what the answer carries against the rules a caller's request follows: a status
    /// in [`VALID_STATUS`] and headers that pass [`check_headers`].
    pub fn check(&self) -> Result<(), InvalidAnswer> {
        if !VALID_STATUS.contains(&self.status) {
            return Err(InvalidAnswer::Status(self.status));
        }
        check_headers(self.headers.iter().map(|(n, v)| (n.as_str(), v.as_str())))?;
        Ok(())
    }
}

/// Writes `body` into `fields`: as text when it is UTF-8, else as base64 with
/// `"body_encoding": "base64"`; `null` when absent.
pub fn encode_body(fields: &mut Value, body: Option<&[u8]>) {
    fields["body"] = match body {
        None => Value::Null,
        Some(bytes) => match std::str::from_utf8(bytes) {
            Ok(text) => Value::String(text.to_owned()),
            Err(_) => {
                fields["body_encoding"] = Value::String("base64".into());
                Value::String(base64::engine::general_purpose::STANDARD.encode(bytes))
            }
        },
    };
}

/// Reads `body` (and `body_encoding`) from `fields`; `None` for null or absent.
pub fn decode_body(fields: &Map<String, Value>) -> Result<Option<Vec<u8>>, AnswerError> {
    let text = match fields.get("body") {
        None | Some(Value::Null) => return Ok(None),
        Some(Value::String(text)) => text,
        Some(_) => return Err(AnswerError::Field("body")),
    };
    match fields.get("body_encoding").and_then(Value::as_str) {
        None | Some("utf-8") => Ok(Some(text.clone().into_bytes())),
        Some("base64") => base64::engine::general_purpose::STANDARD
            .decode(text)
            .map(Some)
            .map_err(|_| AnswerError::Field("body (base64)")),
        Some(_) => Err(AnswerError::Field("body_encoding")),
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
    fn kv_request_names_each_op_and_carries_a_value_only_for_set() {
        for (op, action) in [
            (KvOp::Get { key: "k".into() }, "get"),
            (KvOp::Delete { key: "k".into() }, "delete"),
        ] {
            let v: Value =
                serde_json::from_slice(&Envelope::kv_request("r".into(), &op).to_vec()).unwrap();
            assert_eq!(v["payload"]["action"], action);
            assert_eq!(v["payload"]["key"], "k");
            assert!(v["payload"].get("value").is_none(), "{v}");
        }
    }

    #[test]
    fn kv_request_is_readable_flat_and_nested() {
        let env = Envelope::kv_request(
            "r".into(),
            &KvOp::Set {
                key: "k".into(),
                value: "v".into(),
            },
        );
        let v: Value = serde_json::from_slice(&env.to_vec()).unwrap();
        for op in [&v["payload"], &v["payload"]["payload"]] {
            assert_eq!(
                (op["action"].as_str(), op["key"].as_str()),
                (Some("set"), Some("k"))
            );
            assert_eq!(op["value"], "v");
        }
        assert_eq!(v["payload"]["type"], "kv");
    }

    #[test]
    fn answers_are_found_in_every_accepted_shape() {
        let shapes = [
            json!({"status": 201, "headers": {"a": "1"}, "body": "x"}),
            json!({"payload": {"status": 201, "headers": {"a": "1"}, "body": "x"}}),
            json!({"payload": {"body": "{\"status\":201,\"headers\":{\"a\":\"1\"},\"body\":\"x\"}"}}),
        ];
        for payload in shapes {
            let env = Envelope {
                kind: MessageType::Http,
                timestamp: String::new(),
                request_id: None,
                payload,
                traceparent: None,
            };
            let answer = HttpAnswer::from_fields(&env.answer(AnswerKind::Http).unwrap()).unwrap();
            assert_eq!(answer.status, 201);
            assert_eq!(answer.headers, [("a".to_owned(), "1".to_owned())]);
            assert_eq!(answer.body, b"x");
        }
    }

    #[test]
    fn a_json_body_is_unwrapped_only_in_the_crate_shape() {
        let envelope = |payload| Envelope {
            kind: MessageType::Http,
            timestamp: String::new(),
            request_id: None,
            payload,
            traceparent: None,
        };
        // Documented shape: a JSON body is just a body, whatever it holds.
        for body in [
            r#"{"status":"ok","items":[]}"#,
            r#"{"value":42}"#,
            r#"{"status":503}"#,
        ] {
            let env = envelope(json!({"status": 200, "headers": {}, "body": body}));
            let answer = HttpAnswer::from_fields(&env.answer(AnswerKind::Http).unwrap()).unwrap();
            assert_eq!(
                (answer.status, answer.body),
                (200, body.as_bytes().to_vec())
            );
        }
        // The crate's kv answer, and an http answer is not mistaken for a kv one.
        let kv = envelope(json!({"payload": {"body": "{\"value\":null}"}}));
        assert_eq!(
            kv.answer(AnswerKind::Kv).unwrap().get("value"),
            Some(&Value::Null)
        );
        assert!(kv.answer(AnswerKind::Http).is_none());
        // A kv answer without "value" is no answer.
        let bad = envelope(json!({"status": 500, "body": "disk full"}));
        assert!(bad.answer(AnswerKind::Kv).is_none());
    }

    #[test]
    fn binary_bodies_survive_as_base64() {
        let body = vec![0u8, 159, 146, 150, 255];
        let call = HttpCall {
            method: "POST".into(),
            path: "/".into(),
            headers: vec![],
            body: Some(body.clone()),
        };
        let env = Envelope::http_request("r".into(), &call);
        let inner = env.payload["payload"].as_object().unwrap();
        assert_eq!(inner["body_encoding"], "base64");
        assert_eq!(decode_body(inner).unwrap(), Some(body));
    }

    #[test]
    fn repeated_headers_are_kept_in_order() {
        let call = HttpCall {
            method: "GET".into(),
            path: "/".into(),
            headers: vec![("a".into(), "1".into()), ("a".into(), "2".into())],
            body: None,
        };
        let env = Envelope::http_request("r".into(), &call);
        assert_eq!(env.payload["payload"]["headers"]["a"], "1, 2");
        assert_eq!(
            env.payload["payload"]["header_list"],
            json!([["a", "1"], ["a", "2"]])
        );
    }

    #[test]
    fn sloppy_timestamps_and_numeric_ids_are_read() {
        let env = Envelope::from_slice(
            br#"{"type":"kv","timestamp":null,"request_id":7,"payload":{"value":"x"}}"#,
        )
        .unwrap();
        assert_eq!(
            (env.timestamp.as_str(), env.request_id.as_deref()),
            ("", Some("7"))
        );
    }

    #[test]
    fn answers_follow_the_rules_of_requests() {
        let answer = |status: i32, name: &str, value: &str| HttpAnswer {
            status,
            headers: vec![("x-ok".into(), "1".into()), (name.into(), value.into())],
            body: vec![],
        };
        assert_eq!(answer(200, "x-a", "tab\tand é").check(), Ok(()));
        for status in [99999, 99, 600, -1, 0] {
            assert_eq!(
                answer(status, "x-a", "1").check(),
                Err(InvalidAnswer::Status(status))
            );
        }
        for name in ["", "bad name", "x\r\nInjected", "a:b", "nul\0", "é"] {
            let err = answer(200, name, "1").check().unwrap_err();
            assert!(
                matches!(
                    &err,
                    InvalidAnswer::Header(HeaderError::Name { index: 1, .. })
                ),
                "{name:?}: {err}"
            );
        }
        for value in ["1\r\nSet-Cookie: a=b", "1\n", "1\r", "1\0"] {
            let err = answer(200, "x-a", value).check().unwrap_err();
            assert_eq!(
                err.to_string(),
                "headers[1].value: the value of \"x-a\" contains a line break or NUL"
            );
        }
    }

    #[test]
    fn unknown_type_parses_as_unknown() {
        let env = Envelope::from_slice(br#"{"type":"gossip","payload":{}}"#).unwrap();
        assert_eq!(env.kind, MessageType::Unknown);
    }
}
