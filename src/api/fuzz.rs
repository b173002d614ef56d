//! Property-based fuzzing of what callers can send that is decoded by hand: page tokens.
//! Each runs briefly in CI (proptest's default case count); run them longer locally with
//! `PROPTEST_CASES=1000000 cargo test --lib fuzz_`.

use proptest::prelude::*;

use super::decode_page_token;
use super::logs::{decode_query_token, PageToken};

/// The fingerprint the fuzzed tokens are checked against.
const QUERY: &str = "00112233445566778899aabbccddeeff";

/// Strings near the token format: hex of JSON-ish text, plain hex, and anything.
fn token_like() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<String>(),
        "[0-9a-fA-F]{0,200}",
        any::<String>().prop_map(hex::encode),
        (
            prop_oneof![Just(QUERY.to_owned()), "[0-9a-f]{32}"],
            proptest::collection::btree_map(any::<String>(), any::<u64>(), 0..4)
        )
            .prop_map(|(query, next)| {
                hex::encode(serde_json::json!({"query": query, "next": next}).to_string())
            }),
    ]
}

proptest! {
    /// Whatever the text, a ListPlugins token decodes to a valid plugin id or is refused as
    /// INVALID_ARGUMENT naming the field; it never panics.
    #[test]
    fn fuzz_list_page_tokens(text in token_like()) {
        match decode_page_token(&text) {
            Ok(None) => prop_assert!(text.is_empty()),
            Ok(Some(id)) => prop_assert!(toru_plugin_sdk::metadata::is_valid_id(&id)),
            Err(status) => {
                prop_assert_eq!(status.code(), tonic::Code::InvalidArgument);
                prop_assert!(status.message().starts_with("page_token"));
            }
        }
    }

    /// Whatever the text, a QueryLogs token decodes to one naming only valid plugin ids for
    /// the query it is checked against, or is refused as INVALID_ARGUMENT naming the field.
    #[test]
    fn fuzz_query_page_tokens(text in token_like()) {
        match decode_query_token(&text, QUERY) {
            Ok(None) => prop_assert!(text.is_empty()),
            Ok(Some(token)) => {
                let again = hex::encode(serde_json::to_vec(&token).unwrap());
                prop_assert_eq!(decode_query_token(&again, QUERY).unwrap(), Some(token));
            }
            Err(status) => {
                prop_assert_eq!(status.code(), tonic::Code::InvalidArgument);
                prop_assert!(status.message().starts_with("page_token"));
            }
        }
    }
}

#[test]
fn a_query_token_naming_a_bad_id_is_refused() {
    let token = PageToken::for_test(QUERY.into(), [("../x".to_string(), 5)].into());
    let text = hex::encode(serde_json::to_vec(&token).unwrap());
    assert!(decode_query_token(&text, QUERY).is_err());
}
