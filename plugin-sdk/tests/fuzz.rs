//! Property-based fuzzing of everything the host decodes from plugin-controlled bytes:
//! `--metadata` output, message envelopes and their answers. (The frame decoder has its own
//! in `codec.rs`.) Each runs briefly in CI; run them longer locally with
//! `PROPTEST_CASES=1000000 cargo test -p toru-plugin-sdk --test fuzz`.

use proptest::prelude::*;
use serde_json::{json, Value};
use toru_plugin_sdk::metadata::{is_valid_id, Metadata};
use toru_plugin_sdk::wire::{decode_body, HttpAnswer};
use toru_plugin_sdk::{AnswerKind, Envelope};

/// JSON values of any shape, a few levels deep.
fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<f64>().prop_map(|f| json!(f)),
        ".{0,40}".prop_map(Value::from),
    ];
    leaf.prop_recursive(4, 64, 8, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..6).prop_map(Value::from),
            proptest::collection::btree_map(".{0,12}", inner, 0..6)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// Objects that look like metadata, with any field of any type.
fn metadata_like() -> impl Strategy<Value = Vec<u8>> {
    let field = |name: &'static str| {
        prop_oneof![
            Just(None),
            json_value().prop_map(Some),
            "[a-z0-9-]{0,70}".prop_map(|s| Some(Value::from(s))),
        ]
        .prop_map(move |v| (name, v))
    };
    (
        field("id"),
        field("name"),
        field("version"),
        field("icon"),
        field("route"),
        field("protocol_version"),
    )
        .prop_map(|(a, b, c, d, e, f)| {
            let map: serde_json::Map<String, Value> = [a, b, c, d, e, f]
                .into_iter()
                .filter_map(|(k, v)| v.map(|v| (k.to_string(), v)))
                .collect();
            serde_json::to_vec(&Value::Object(map)).unwrap()
        })
}

proptest! {
    /// Whatever `--metadata` prints, parsing never panics, and what it accepts has a valid
    /// id.
    #[test]
    fn fuzz_metadata(bytes in prop_oneof![
        proptest::collection::vec(any::<u8>(), 0..512),
        metadata_like(),
    ]) {
        if let Ok(meta) = Metadata::parse(&bytes) {
            prop_assert!(is_valid_id(&meta.id));
        }
    }

    /// Whatever a frame holds, reading it as an envelope and then as each kind of answer
    /// never panics.
    #[test]
    fn fuzz_envelopes_and_answers(
        value in json_value(),
        raw in proptest::collection::vec(any::<u8>(), 0..256),
    ) {
        let _ = Envelope::from_slice(&raw);
        let bytes = serde_json::to_vec(&value).unwrap();
        if let Ok(envelope) = Envelope::from_slice(&bytes) {
            for kind in [AnswerKind::Kv, AnswerKind::Http] {
                if let Some(fields) = envelope.answer(kind) {
                    let _ = decode_body(&fields);
                    let _ = HttpAnswer::from_fields(&fields);
                }
            }
        }
        if let Value::Object(fields) = &value {
            let _ = decode_body(fields);
            let _ = HttpAnswer::from_fields(fields);
        }
    }
}
