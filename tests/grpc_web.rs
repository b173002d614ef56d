//! gRPC-Web on the TCP listener, spoken here as a browser speaks it (HTTP/1.1 POSTs of
//! `application/grpc-web+proto` frames, the status in a trailer frame): unary calls and a
//! server stream (`WatchEvents`) answer; the token check and the roles hold as for native
//! gRPC; CORS answers only the origins the operator allows; the web console's files are
//! served beside the API on the same port, with their Content-Security-Policy.

mod common;

use bytes::{Buf, Bytes};
use common::*;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use prost::Message;
use torud_api::pb;

/// One gRPC-Web frame of an answer.
#[derive(Debug)]
enum Frame {
    Message(Bytes),
    /// The trailers, as `name: value` lines, lower-cased names.
    Trailers(Vec<(String, String)>),
}

/// An answer: the HTTP status and headers, and the frames read so far.
struct Answer {
    status: u16,
    headers: http::HeaderMap,
    frames: Vec<Frame>,
}

impl Answer {
    /// The gRPC status: from the trailer frame, or from the headers of a trailers-only answer.
    fn grpc_status(&self) -> Option<String> {
        let from_trailers = self.frames.iter().find_map(|f| match f {
            Frame::Trailers(t) => t
                .iter()
                .find(|(k, _)| k == "grpc-status")
                .map(|(_, v)| v.clone()),
            Frame::Message(_) => None,
        });
        from_trailers.or_else(|| {
            self.headers
                .get("grpc-status")
                .map(|v| v.to_str().unwrap().to_owned())
        })
    }

    fn messages<M: Message + Default>(&self) -> Vec<M> {
        self.frames
            .iter()
            .filter_map(|f| match f {
                Frame::Message(data) => Some(M::decode(data.clone()).unwrap()),
                Frame::Trailers(_) => None,
            })
            .collect()
    }
}

/// Splits whole frames off the front of `buf`.
fn frames(buf: &mut Vec<u8>) -> Vec<Frame> {
    let mut out = Vec::new();
    while buf.len() >= 5 {
        let len = u32::from_be_bytes(buf[1..5].try_into().unwrap()) as usize;
        if buf.len() < 5 + len {
            break;
        }
        let flag = buf[0];
        let data: Vec<u8> = buf.drain(..5 + len).skip(5).collect();
        out.push(if flag & 0x80 != 0 {
            let text = String::from_utf8(data).unwrap();
            Frame::Trailers(
                text.split("\r\n")
                    .filter_map(|l| l.split_once(':'))
                    .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
                    .collect(),
            )
        } else {
            Frame::Message(Bytes::from(data))
        });
    }
    out
}

/// POSTs `message` to `method` (`/toru.v1.PluginService/ListPlugins`) as gRPC-Web over
/// HTTP/1.1, then reads frames until the trailers or until `enough` message frames came.
async fn web_call(
    d: &Daemon,
    method: &str,
    token: Option<&str>,
    message: &impl Message,
    enough: usize,
) -> Answer {
    let auth = token.map(|t| ("authorization", format!("Bearer {t}")));
    web_call_with(d, method, auth.as_slice(), message, enough).await
}

/// [`web_call`] with these extra request headers (the credentials, if any, among them).
async fn web_call_with(
    d: &Daemon,
    method: &str,
    headers: &[(&str, String)],
    message: &impl Message,
    enough: usize,
) -> Answer {
    let mut sender = connect(d).await;
    let encoded = message.encode_to_vec();
    let mut body = vec![0u8];
    body.extend_from_slice(&(encoded.len() as u32).to_be_bytes());
    body.extend_from_slice(&encoded);
    let mut request = http::Request::post(method)
        .header("host", &d.addr)
        .header("content-type", "application/grpc-web+proto")
        .header("x-grpc-web", "1");
    for (name, value) in headers {
        request = request.header(*name, value);
    }
    let request = request.body(Full::new(Bytes::from(body))).unwrap();
    let response = tokio::time::timeout(SECS10, sender.send_request(request))
        .await
        .expect("an answer within 10 s")
        .unwrap();
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let mut body = response.into_body();
    let mut buf = Vec::new();
    let mut got = Vec::new();
    let done = |got: &Vec<Frame>| {
        got.iter().any(|f| matches!(f, Frame::Trailers(_)))
            || got
                .iter()
                .filter(|f| matches!(f, Frame::Message(_)))
                .count()
                >= enough
    };
    while !done(&got) {
        let Some(frame) = tokio::time::timeout(SECS10, body.frame())
            .await
            .expect("the next frame within 10 s")
        else {
            break;
        };
        if let Ok(data) = frame.unwrap().into_data() {
            buf.extend_from_slice(data.chunk());
            got.extend(frames(&mut buf));
        }
    }
    Answer {
        status,
        headers,
        frames: got,
    }
}

/// An HTTP/1.1 connection to the daemon's TCP listener, as a browser opens one.
async fn connect(d: &Daemon) -> http1::SendRequest<Full<Bytes>> {
    let stream = tokio::net::TcpStream::connect(&d.addr).await.unwrap();
    let (sender, conn) = http1::handshake(TokioIo::new(stream)).await.unwrap();
    tokio::spawn(conn);
    sender
}

const LIST: &str = "/toru.v1.PluginService/ListPlugins";

#[tokio::test]
async fn a_browser_lists_plugins_and_follows_events_over_grpc_web() {
    let (d, _client) = start_discovered(
        &[],
        |d| {
            d.install_hello("hello");
        },
        &["hello"],
    )
    .await;
    let read = d.token("read");

    let list = pb::ListPluginsRequest::default();
    let answer = web_call(&d, LIST, Some(&read), &list, usize::MAX).await;
    assert_eq!(answer.status, 200);
    assert!(
        answer.headers.get("set-cookie").is_none(),
        "no cookie is set"
    );
    assert_eq!(
        answer.headers["content-type"].to_str().unwrap(),
        "application/grpc-web+proto"
    );
    assert_eq!(answer.grpc_status().as_deref(), Some("0"));
    let plugins: Vec<pb::ListPluginsResponse> = answer.messages();
    assert_eq!(plugins[0].plugins[0].id, "hello");

    // A server stream: the replayed events arrive as frames of one open response.
    let watch = pb::WatchEventsRequest {
        after_seq: Some(0),
        plugin_ids: vec![],
    };
    let answer = web_call(
        &d,
        "/toru.v1.PluginService/WatchEvents",
        Some(&read),
        &watch,
        1,
    )
    .await;
    assert_eq!(answer.status, 200);
    assert_eq!(answer.grpc_status(), None, "still open");
    let events: Vec<pb::WatchEventsResponse> = answer.messages();
    let first = events[0].event.as_ref().expect("an event, not a gap");
    assert_eq!(first.plugin_id, "hello");
}

#[tokio::test]
async fn grpc_web_keeps_the_token_check_and_the_roles() {
    let (d, _client) = start_discovered(
        &[],
        |d| {
            d.install_hello("hello");
        },
        &["hello"],
    )
    .await;
    let list = pb::ListPluginsRequest::default();
    let none = web_call(&d, LIST, None, &list, usize::MAX).await;
    assert_eq!(none.grpc_status().as_deref(), Some("16"), "UNAUTHENTICATED");
    assert!(none.messages::<pb::ListPluginsResponse>().is_empty());
    let wrong = web_call(&d, LIST, Some("not-a-token"), &list, usize::MAX).await;
    assert_eq!(wrong.grpc_status().as_deref(), Some("16"));
    // A browser's cookies are no credential: the token in a cookie is not read.
    let cookie = [(
        "cookie",
        format!("authorization=Bearer {}", d.token("admin")),
    )];
    let cookie_only = web_call_with(&d, LIST, &cookie, &list, usize::MAX).await;
    assert_eq!(cookie_only.grpc_status().as_deref(), Some("16"));

    let enable = pb::EnablePluginRequest {
        plugin_id: "hello".into(),
    };
    let method = "/toru.v1.PluginService/EnablePlugin";
    let read = web_call(&d, method, Some(&d.token("read")), &enable, usize::MAX).await;
    assert_eq!(
        read.grpc_status().as_deref(),
        Some("7"),
        "PERMISSION_DENIED"
    );
    let admin = web_call(&d, method, Some(&d.token("admin")), &enable, usize::MAX).await;
    assert_eq!(admin.grpc_status().as_deref(), Some("0"));
    let enabled: Vec<pb::EnablePluginResponse> = admin.messages();
    assert!(enabled[0].plugin.as_ref().unwrap().enabled);
}

/// A CORS preflight from `origin`: the status and the `access-control-allow-origin` header.
async fn preflight(d: &Daemon, origin: &str) -> (u16, Option<String>, Option<String>) {
    let mut sender = connect(d).await;
    let request = http::Request::builder()
        .method("OPTIONS")
        .uri(LIST)
        .header("host", &d.addr)
        .header("origin", origin)
        .header("access-control-request-method", "POST")
        .header(
            "access-control-request-headers",
            "authorization,content-type,x-grpc-web",
        )
        .body(Full::new(Bytes::new()))
        .unwrap();
    let response = tokio::time::timeout(SECS10, sender.send_request(request))
        .await
        .unwrap()
        .unwrap();
    let header = |name: &str| {
        response
            .headers()
            .get(name)
            .map(|v| v.to_str().unwrap().to_owned())
    };
    (
        response.status().as_u16(),
        header("access-control-allow-origin"),
        header("access-control-allow-headers"),
    )
}

#[tokio::test]
async fn cors_answers_only_the_origins_allowed() {
    let console = "https://console.example.com";
    let d = {
        let mut d = Daemon::new(&["--cors-origin", console]);
        d.start().await;
        d
    };
    let (status, allow_origin, allow_headers) = preflight(&d, console).await;
    assert_eq!(status, 200);
    assert_eq!(allow_origin.as_deref(), Some(console));
    let allow_headers = allow_headers.unwrap().to_ascii_lowercase();
    assert!(allow_headers.contains("authorization"), "{allow_headers}");
    assert!(allow_headers.contains("x-grpc-web"), "{allow_headers}");
    let (_, other, _) = preflight(&d, "https://evil.example.com").await;
    assert_eq!(other, None, "another origin is not allowed");

    // By default no origin is.
    let mut plain = Daemon::new(&[]);
    plain.start().await;
    let (_, allow_origin, _) = preflight(&plain, console).await;
    assert_eq!(allow_origin, None);
    // Native gRPC still works beside gRPC-Web on the same port.
    let mut client = plain.tcp_client(&plain.token("read")).await;
    client
        .list_plugins(pb::ListPluginsRequest::default())
        .await
        .unwrap();
}

/// A GET on the listener, as a browser opening the console sends it.
async fn get(d: &Daemon, path: &str) -> (u16, http::HeaderMap, Bytes) {
    let mut sender = connect(d).await;
    let request = http::Request::get(path)
        .header("host", &d.addr)
        .body(Full::new(Bytes::new()))
        .unwrap();
    let response = tokio::time::timeout(SECS10, sender.send_request(request))
        .await
        .expect("an answer within 10 s")
        .unwrap();
    let (parts, body) = response.into_parts();
    let body = tokio::time::timeout(SECS10, body.collect())
        .await
        .expect("the whole body within 10 s")
        .unwrap()
        .to_bytes();
    (parts.status.as_u16(), parts.headers, body)
}

#[tokio::test]
async fn the_console_is_served_at_the_root_with_its_policy_beside_the_api() {
    let (d, mut client) = start_discovered(
        &[],
        |d| {
            d.install_hello("hello");
        },
        &["hello"],
    )
    .await;

    // No token is needed for the console's own files: it signs in through the API.
    let (status, headers, body) = get(&d, "/").await;
    assert_eq!(status, 200);
    assert_eq!(headers["content-type"], "text/html; charset=utf-8");
    let csp = headers["content-security-policy"].to_str().unwrap();
    assert_eq!(csp, torud::api::console::CONTENT_SECURITY_POLICY);
    for directive in [
        "script-src 'self' blob:",
        "connect-src 'self'",
        "frame-ancestors 'none'",
    ] {
        assert!(csp.contains(directive), "{directive} in {csp}");
    }
    assert_eq!(headers["x-content-type-options"], "nosniff");
    assert_eq!(headers["x-frame-options"], "DENY");
    assert_eq!(headers["referrer-policy"], "no-referrer");
    assert!(headers.get("set-cookie").is_none(), "no cookie is set");
    let html = String::from_utf8(body.to_vec()).unwrap();
    assert!(html.contains(r#"<script src="console.js""#), "{html}");

    let (status, headers, body) = get(&d, "/console.js").await;
    assert_eq!(status, 200);
    assert_eq!(headers["content-type"], "text/javascript; charset=utf-8");
    assert!(body.len() > 10_000, "the bundle, {} bytes", body.len());
    let (status, _, _) = get(&d, "/favicon.svg").await;
    assert_eq!(status, 200);
    // Nothing else is served, whatever the path names.
    for path in [
        "/admin.token",
        "/../data/admin.token",
        "/toru.v1.PluginService/ListPlugins",
    ] {
        let (status, headers, _) = get(&d, path).await;
        assert_eq!(status, 404, "{path}");
        assert!(headers.contains_key("content-security-policy"), "{path}");
    }

    // The API on the same port is unchanged: gRPC-Web, with the token check, and native gRPC.
    let list = pb::ListPluginsRequest::default();
    let answer = web_call(&d, LIST, None, &list, usize::MAX).await;
    assert_eq!(
        answer.grpc_status().as_deref(),
        Some("16"),
        "UNAUTHENTICATED"
    );
    let answer = web_call(&d, LIST, Some(&d.token("read")), &list, usize::MAX).await;
    assert_eq!(answer.grpc_status().as_deref(), Some("0"));
    let listed = client.list_plugins(list).await.unwrap().into_inner();
    assert_eq!(listed.plugins[0].id, "hello");
}
