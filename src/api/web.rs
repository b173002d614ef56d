//! Browser access to the API on the TCP listener: gRPC-Web (`tonic-web`) beside native gRPC
//! on the same port, behind the same token check and roles, and CORS for the web origins
//! the operator allows (`--cors-origin`; none by default, so only pages the daemon serves
//! itself can call it from a browser).
//!
//! The layers, outermost first: CORS (a preflight is answered before anything else, and
//! needs no token: it carries none), gRPC-Web (a browser's HTTP/1.1 or HTTP/2 gRPC-Web call
//! becomes a gRPC call, and its answer gRPC-Web again, trailers included), then the token
//! check and the rest, exactly as for native gRPC.

use std::time::Duration;

use http::header::{HeaderName, HeaderValue, AUTHORIZATION, CONTENT_TYPE};
use http::Method;
use tower_http::cors::{AllowOrigin, CorsLayer};

/// Request headers a gRPC-Web client sends (`@connectrpc/connect-web`, `grpc-web`).
const ALLOWED_HEADERS: [&str; 5] = [
    "x-grpc-web",
    "x-user-agent",
    "grpc-timeout",
    "connect-protocol-version",
    "connect-timeout-ms",
];

/// Response headers a gRPC-Web client must be able to read.
const EXPOSED_HEADERS: [&str; 3] = ["grpc-status", "grpc-message", "grpc-status-details-bin"];

/// How long a browser may cache a preflight's answer.
const PREFLIGHT_MAX_AGE: Duration = Duration::from_secs(600);

/// The CORS layer for `origins`, or `None` when there are none (then no response carries
/// CORS headers, and browsers keep other origins' pages out).
pub fn cors(origins: &[String]) -> Option<CorsLayer> {
    if origins.is_empty() {
        return None;
    }
    let origins: Vec<HeaderValue> = origins
        .iter()
        .filter_map(|o| HeaderValue::from_str(o).ok())
        .collect();
    let mut headers = vec![AUTHORIZATION, CONTENT_TYPE];
    headers.extend(ALLOWED_HEADERS.map(HeaderName::from_static));
    Some(
        CorsLayer::new()
            .allow_origin(AllowOrigin::list(origins))
            .allow_methods([Method::POST, Method::OPTIONS])
            .allow_headers(headers)
            .expose_headers(EXPOSED_HEADERS.map(HeaderName::from_static))
            .max_age(PREFLIGHT_MAX_AGE),
    )
}
