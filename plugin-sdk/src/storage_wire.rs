//! The durable-storage extension of protocol 2, as it travels: a plugin sends a `storage`
//! request ([`StorageOp`]) on its persistent connection, the host answers with a `storage`
//! message carrying the same `request_id` and either a result or a [`StorageError`].
//!
//! The namespace is never on the wire: the host serves every request from the namespace of
//! the connection it arrived on. This module knows nothing of sockets or of how the host
//! stores data.

use serde_json::{json, Map, Value};

use crate::wire::{Envelope, MessageType};

/// One storage operation, plugin → host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StorageOp {
    /// Read a key; answered with `value` (a string, or `null` when absent).
    Get {
        /// The key.
        key: String,
    },
    /// Write a key, atomically and durably before the answer; answered with the old
    /// `value` (or `null`).
    Set {
        /// The key.
        key: String,
        /// The new value.
        value: String,
    },
    /// Remove a key; answered with the old `value` (or `null`).
    Delete {
        /// The key.
        key: String,
    },
    /// Keys in order, starting after `after` (exclusive), those starting with `prefix`,
    /// at most `limit`; answered with `keys` and `more` (whether keys remain).
    List {
        /// Only keys starting with this.
        prefix: String,
        /// Start after this key (a previous page's last key); empty for the first page.
        after: String,
        /// Most keys in one answer (the host caps it at 1000).
        limit: u32,
    },
}

/// Why the host refused a storage operation; `code` is stable, `message` is for people.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{code}: {message}")]
pub struct StorageError {
    /// `invalid_argument`, `resource_exhausted` (quota), `unavailable` or `internal`.
    pub code: String,
    /// What happened and what to do.
    pub message: String,
}

impl StorageError {
    /// An error with `code` and `message`.
    pub fn new(code: &str, message: impl Into<String>) -> Self {
        StorageError {
            code: code.to_owned(),
            message: message.into(),
        }
    }
}

/// A successful answer to a [`StorageOp`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StorageAnswer {
    /// The value read, or the previous value for `set` and `delete`.
    Value(Option<String>),
    /// A page of keys, and whether more remain.
    Keys {
        /// The keys, in order.
        keys: Vec<String>,
        /// Whether more keys match after the last one.
        more: bool,
    },
}

impl StorageOp {
    /// The request envelope.
    pub fn to_envelope(&self, request_id: String) -> Envelope {
        let fields = match self {
            StorageOp::Get { key } => json!({"action": "get", "key": key}),
            StorageOp::Set { key, value } => json!({"action": "set", "key": key, "value": value}),
            StorageOp::Delete { key } => json!({"action": "delete", "key": key}),
            StorageOp::List {
                prefix,
                after,
                limit,
            } => json!({"action": "list", "prefix": prefix, "after": after, "limit": limit}),
        };
        Envelope::new(MessageType::Storage, request_id, fields)
    }

    /// Reads the operation of a request envelope's payload.
    pub fn from_payload(payload: &Value) -> Result<Self, StorageError> {
        let text = |name: &str, required: bool| -> Result<String, StorageError> {
            match payload.get(name) {
                Some(Value::String(s)) => Ok(s.clone()),
                None | Some(Value::Null) if !required => Ok(String::new()),
                _ => Err(StorageError::new(
                    "invalid_argument",
                    format!("\"{name}\" must be a string"),
                )),
            }
        };
        match payload.get("action").and_then(Value::as_str) {
            Some("get") => Ok(StorageOp::Get {
                key: text("key", true)?,
            }),
            Some("set") => Ok(StorageOp::Set {
                key: text("key", true)?,
                value: text("value", true)?,
            }),
            Some("delete") => Ok(StorageOp::Delete {
                key: text("key", true)?,
            }),
            Some("list") => Ok(StorageOp::List {
                prefix: text("prefix", false)?,
                after: text("after", false)?,
                limit: match payload.get("limit") {
                    None | Some(Value::Null) => 100,
                    Some(v) => v
                        .as_u64()
                        .and_then(|n| u32::try_from(n).ok())
                        .ok_or_else(|| {
                            StorageError::new(
                                "invalid_argument",
                                "\"limit\" must be a non-negative integer",
                            )
                        })?,
                },
            }),
            other => Err(StorageError::new(
                "invalid_argument",
                format!("unknown storage action {other:?}; expected get, set, delete or list"),
            )),
        }
    }
}

/// The host's answer envelope to the storage request `request_id`.
pub fn answer_envelope(
    request_id: String,
    result: &Result<StorageAnswer, StorageError>,
) -> Envelope {
    let fields = match result {
        Ok(StorageAnswer::Value(value)) => json!({ "value": value }),
        Ok(StorageAnswer::Keys { keys, more }) => json!({ "keys": keys, "more": more }),
        Err(e) => json!({"error": {"code": e.code, "message": e.message}}),
    };
    Envelope::new(MessageType::Storage, request_id, fields)
}

/// Reads the host's answer to `op` from the answer envelope's payload.
pub fn read_answer(op: &StorageOp, payload: &Value) -> Result<StorageAnswer, StorageError> {
    let fields: &Map<String, Value> = payload
        .as_object()
        .ok_or_else(|| StorageError::new("internal", "the host's answer is not an object"))?;
    if let Some(error) = fields.get("error") {
        let text = |k: &str| error.get(k).and_then(Value::as_str).unwrap_or_default();
        return Err(StorageError::new(text("code"), text("message")));
    }
    let bad = || {
        StorageError::new(
            "internal",
            "the host's storage answer has an unexpected shape",
        )
    };
    match op {
        StorageOp::List { .. } => {
            let keys = fields
                .get("keys")
                .and_then(Value::as_array)
                .ok_or_else(bad)?
                .iter()
                .map(|k| k.as_str().map(str::to_owned).ok_or_else(bad))
                .collect::<Result<_, _>>()?;
            let more = fields.get("more").and_then(Value::as_bool).unwrap_or(false);
            Ok(StorageAnswer::Keys { keys, more })
        }
        _ => match fields.get("value") {
            None | Some(Value::Null) => Ok(StorageAnswer::Value(None)),
            Some(Value::String(s)) => Ok(StorageAnswer::Value(Some(s.clone()))),
            Some(_) => Err(bad()),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn operations_round_trip_through_their_envelopes() {
        let ops = [
            StorageOp::Get { key: "k".into() },
            StorageOp::Set {
                key: "k".into(),
                value: "v".into(),
            },
            StorageOp::Delete { key: "k".into() },
            StorageOp::List {
                prefix: "p".into(),
                after: "pa".into(),
                limit: 7,
            },
        ];
        for op in ops {
            let env = Envelope::from_slice(&op.to_envelope("r".into()).to_vec()).unwrap();
            assert_eq!(env.kind, MessageType::Storage);
            assert_eq!(StorageOp::from_payload(&env.payload).unwrap(), op);
        }
    }

    #[test]
    fn malformed_operations_are_clear_errors() {
        for payload in [
            json!({"action": "steal", "key": "k"}),
            json!({"action": "get"}),
            json!({"action": "set", "key": "k", "value": 5}),
            json!({"action": "list", "limit": -1}),
            json!("not an object"),
        ] {
            let e = StorageOp::from_payload(&payload).unwrap_err();
            assert_eq!(e.code, "invalid_argument", "{payload}");
        }
    }

    #[test]
    fn errors_and_values_are_read_back() {
        let get = StorageOp::Get { key: "k".into() };
        let err = Err(StorageError::new("resource_exhausted", "full"));
        let env = answer_envelope("r".into(), &err);
        assert_eq!(read_answer(&get, &env.payload), err);
        let ok = Ok(StorageAnswer::Value(Some("v".into())));
        let env = answer_envelope("r".into(), &ok);
        assert_eq!(read_answer(&get, &env.payload), ok);
    }
}
