//! The web console, served at `/` on the TCP listener beside the API it calls.
//!
//! Its files are built from `console/src` into `console/dist` (checked in, with a drift
//! check in the test command) and compiled into the binary here, so a `cargo build` needs
//! no Node and the daemon needs no files beside it. A `GET` or `HEAD` on the listener is
//! answered here and never reaches the gRPC stack; everything else passes through. The
//! console's own files need no token: it signs in by calling the API with one.
//!
//! Every answer carries the console's Content-Security-Policy: scripts only from the daemon
//! (and the `blob:` URLs the console makes of plugin bundles it fetched through the API),
//! connections only to the daemon, no frames, no plugins, no forms posted elsewhere.
//! docs/SECURITY.md ("The web console") gives the reasons and what it means for plugin UIs.

use std::sync::LazyLock;
use std::task::{Context, Poll};

use bytes::Bytes;
use futures::future::{Either, Ready};
use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use sha2::{Digest, Sha256};

/// The policy for every console answer. `style-src 'unsafe-inline'` is for plugin UIs that
/// inject their own `<style>` elements (bundlers' CSS-in-JS); styles cannot run code, and
/// images they name are still held to `img-src`.
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self' blob:; \
     style-src 'self' 'unsafe-inline'; img-src 'self' data: blob:; font-src 'self' data:; \
     connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

/// One built file.
struct Asset {
    path: &'static str,
    content_type: &'static str,
    bytes: &'static [u8],
}

const ASSETS: [Asset; 4] = [
    Asset {
        path: "/",
        content_type: "text/html; charset=utf-8",
        bytes: include_bytes!("../../console/dist/index.html"),
    },
    Asset {
        path: "/console.js",
        content_type: "text/javascript; charset=utf-8",
        bytes: include_bytes!("../../console/dist/console.js"),
    },
    Asset {
        path: "/console.css",
        content_type: "text/css; charset=utf-8",
        bytes: include_bytes!("../../console/dist/console.css"),
    },
    Asset {
        path: "/favicon.svg",
        content_type: "image/svg+xml",
        bytes: include_bytes!("../../console/dist/favicon.svg"),
    },
];

/// Each asset's entity tag (a digest of its bytes), so a browser revalidates cheaply.
static ETAGS: LazyLock<Vec<HeaderValue>> = LazyLock::new(|| {
    ASSETS
        .iter()
        .map(|a| {
            let digest = Sha256::digest(a.bytes);
            HeaderValue::from_str(&format!("\"{}\"", hex::encode(&digest[..12])))
                .expect("hex is a valid header value")
        })
        .collect()
});

/// The answer to a `GET` or `HEAD` of `path` with these request headers.
pub fn answer(method: &Method, path: &str, headers: &http::HeaderMap) -> Response<Bytes> {
    let path = if path == "/index.html" { "/" } else { path };
    let Some(at) = ASSETS.iter().position(|a| a.path == path) else {
        return respond(
            StatusCode::NOT_FOUND,
            "text/plain; charset=utf-8",
            Bytes::from_static(b"not found: the console is at /\n"),
            None,
        );
    };
    let asset = &ASSETS[at];
    let etag = ETAGS[at].clone();
    if headers
        .get(header::IF_NONE_MATCH)
        .is_some_and(|v| v.as_bytes() == etag.as_bytes())
    {
        return respond(
            StatusCode::NOT_MODIFIED,
            asset.content_type,
            Bytes::new(),
            Some(etag),
        );
    }
    let body = if method == Method::HEAD {
        Bytes::new()
    } else {
        Bytes::from_static(asset.bytes)
    };
    let mut response = respond(StatusCode::OK, asset.content_type, body, Some(etag));
    response
        .headers_mut()
        .insert(header::CONTENT_LENGTH, HeaderValue::from(asset.bytes.len()));
    response
}

fn respond(
    status: StatusCode,
    content_type: &'static str,
    body: Bytes,
    etag: Option<HeaderValue>,
) -> Response<Bytes> {
    let mut response = Response::new(body);
    *response.status_mut() = status;
    let h = response.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CONTENT_SECURITY_POLICY),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.insert(
        "cross-origin-opener-policy",
        HeaderValue::from_static("same-origin"),
    );
    // Revalidate every time (the ETag makes that a 304): a new daemon serves a new console.
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    if let Some(etag) = etag {
        h.insert(header::ETAG, etag);
    }
    response
}

/// A tower layer answering `GET` and `HEAD` from the console, in front of the gRPC stack.
#[derive(Clone, Copy, Default)]
pub struct ConsoleLayer;

impl<S> tower::Layer<S> for ConsoleLayer {
    type Service = Console<S>;

    fn layer(&self, inner: S) -> Console<S> {
        Console { inner }
    }
}

/// The service [`ConsoleLayer`] wraps the gRPC stack in.
#[derive(Clone)]
pub struct Console<S> {
    inner: S,
}

impl<S, B> tower::Service<Request<B>> for Console<S>
where
    S: tower::Service<Request<B>, Response = Response<tonic::body::Body>>,
{
    type Response = Response<tonic::body::Body>;
    type Error = S::Error;
    type Future = Either<Ready<Result<Self::Response, S::Error>>, S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        // gRPC (and gRPC-Web) calls are POSTs; a GET or HEAD is a browser asking for a page.
        if req.method() != Method::GET && req.method() != Method::HEAD {
            return Either::Right(self.inner.call(req));
        }
        let response = answer(req.method(), req.uri().path(), req.headers())
            .map(|body| tonic::body::Body::new(http_body_util::Full::new(body)));
        Either::Left(futures::future::ready(Ok(response)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_are_served_with_their_type_and_policy_and_others_are_not_found() {
        let none = http::HeaderMap::new();
        let index = answer(&Method::GET, "/", &none);
        assert_eq!(index.status(), StatusCode::OK);
        assert_eq!(
            index.headers()[header::CONTENT_TYPE],
            "text/html; charset=utf-8"
        );
        assert!(std::str::from_utf8(index.body())
            .unwrap()
            .contains("console.js"));
        assert_eq!(
            index.headers()[header::CONTENT_SECURITY_POLICY],
            CONTENT_SECURITY_POLICY
        );
        let js = answer(&Method::HEAD, "/console.js", &none);
        assert_eq!(js.status(), StatusCode::OK);
        assert!(js.body().is_empty(), "HEAD has no body");
        assert_eq!(
            js.headers()[header::CONTENT_LENGTH],
            ASSETS[1].bytes.len().to_string().as_str()
        );
        let missing = answer(&Method::GET, "/admin.token", &none);
        assert_eq!(missing.status(), StatusCode::NOT_FOUND);
        assert_eq!(
            missing.headers()[header::CONTENT_SECURITY_POLICY],
            CONTENT_SECURITY_POLICY
        );
    }

    #[test]
    fn a_known_etag_is_not_modified() {
        let first = answer(&Method::GET, "/console.css", &http::HeaderMap::new());
        let etag = first.headers()[header::ETAG].clone();
        let mut headers = http::HeaderMap::new();
        headers.insert(header::IF_NONE_MATCH, etag);
        let again = answer(&Method::GET, "/console.css", &headers);
        assert_eq!(again.status(), StatusCode::NOT_MODIFIED);
        assert!(again.body().is_empty());
    }
}
