//! Stock gRPC clients on the control socket. grpcio, grpc-java and grpcurl 1.8 send the
//! socket's path (raw or percent-encoded) as HTTP/2's `:authority`, which is not a URI
//! authority; published h2 resets such a stream with PROTOCOL_ERROR, so the obvious
//! `grpc.insecure_channel("unix:" + path)` failed. The daemon is built with the patched h2
//! in `third_party/h2/` (see its `TORUD-PATCH.md`), which ignores that value instead.
//!
//! The first tests speak HTTP/2 by hand (frames and HPACK literals, no HTTP/2 library), so
//! the `:authority` sent is exactly the one a stock client sends; the last runs grpcurl
//! (from `$GRPCURL`, else `PATH`) as the operators' guide shows it.

mod common;

use std::path::PathBuf;
use std::process::Command;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

/// HTTP/2 frame types (RFC 9113 §6) the conversation uses.
const DATA: u8 = 0x0;
const HEADERS: u8 = 0x1;
const RST_STREAM: u8 = 0x3;
const SETTINGS: u8 = 0x4;
const GOAWAY: u8 = 0x7;
/// Frame flags: END_STREAM (DATA, HEADERS), ACK (SETTINGS), END_HEADERS (HEADERS).
const END_STREAM: u8 = 0x1;
const ACK: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
/// RST_STREAM's code for a malformed request.
const PROTOCOL_ERROR: u32 = 0x1;
/// The one stream each conversation opens.
const STREAM: u32 = 1;

/// What the daemon did with the request on stream 1.
#[derive(Debug, PartialEq)]
enum Answer {
    /// Answered: the response's DATA payload (gRPC length-prefixed messages).
    Served(Vec<u8>),
    /// Reset the stream with this error code.
    Reset(u32),
}

/// The control socket's path as a client would dial it: through a short symlink when the
/// real path is over the kernel's limit for a socket address.
fn control_socket(daemon: &Daemon) -> PathBuf {
    let socket = daemon.data_dir.join(torud_api::CONTROL_SOCKET);
    if socket.as_os_str().len() < 100 {
        return socket;
    }
    let link = daemon.root.path().join("c.sock");
    let _ = std::os::unix::fs::symlink(&socket, &link);
    link
}

/// One HTTP/2 frame: the 9-byte header, then the payload.
fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = u32::try_from(payload.len()).unwrap();
    let mut out = len.to_be_bytes()[1..].to_vec();
    out.extend([kind, flags]);
    out.extend(stream.to_be_bytes());
    out.extend(payload);
    out
}

/// An HPACK string (RFC 7541 §5.2) without Huffman coding: a 7-bit prefix integer length.
fn hpack_string(out: &mut Vec<u8>, text: &str) {
    let mut len = text.len();
    if len < 127 {
        out.push(len as u8);
    } else {
        out.push(127);
        len -= 127;
        while len >= 128 {
            out.push((len % 128) as u8 | 0x80);
            len /= 128;
        }
        out.push(len as u8);
    }
    out.extend(text.as_bytes());
}

/// A header block of literal fields without indexing and with new names (RFC 7541 §6.2.2):
/// every field goes on the wire exactly as given, whatever its value.
fn header_block(fields: &[(&str, &str)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (name, value) in fields {
        out.push(0x00);
        hpack_string(&mut out, name);
        hpack_string(&mut out, value);
    }
    out
}

/// The headers of a gRPC health check, as a stock client sends them, with `authority`.
fn health_check_headers(authority: &str) -> Vec<u8> {
    header_block(&[
        (":method", "POST"),
        (":scheme", "http"),
        (":path", "/grpc.health.v1.Health/Check"),
        (":authority", authority),
        ("content-type", "application/grpc"),
        ("te", "trailers"),
    ])
}

/// Reads one frame: (type, flags, stream, payload).
async fn read_frame(stream: &mut UnixStream) -> (u8, u8, u32, Vec<u8>) {
    let mut head = [0u8; 9];
    stream.read_exact(&mut head).await.unwrap();
    let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
    let id = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
    let mut payload = vec![0u8; len];
    stream.read_exact(&mut payload).await.unwrap();
    (head[3], head[4], id, payload)
}

/// Opens an HTTP/2 connection to the control socket, sends `headers` on stream 1 (and
/// `body`, if any, as one DATA frame ending the stream), and reads until the daemon
/// answers the stream or resets it; 10 s at most.
async fn converse(daemon: &Daemon, headers: Vec<u8>, body: Option<&[u8]>) -> Answer {
    let mut stream = UnixStream::connect(control_socket(daemon)).await.unwrap();
    let mut out = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    out.extend(frame(SETTINGS, 0, 0, &[]));
    out.extend(frame(HEADERS, END_HEADERS, STREAM, &headers));
    if let Some(body) = body {
        out.extend(frame(DATA, END_STREAM, STREAM, body));
    }
    stream.write_all(&out).await.unwrap();
    let talk = async {
        let mut data = Vec::new();
        loop {
            match read_frame(&mut stream).await {
                (SETTINGS, flags, _, _) if flags & ACK == 0 => {
                    stream
                        .write_all(&frame(SETTINGS, ACK, 0, &[]))
                        .await
                        .unwrap();
                }
                (GOAWAY, _, _, payload) => panic!("the daemon closed the connection: {payload:?}"),
                (RST_STREAM, _, STREAM, payload) => {
                    return Answer::Reset(u32::from_be_bytes(payload[..4].try_into().unwrap()));
                }
                (DATA, _, STREAM, payload) => data.extend(payload),
                (HEADERS, flags, STREAM, _) if flags & END_STREAM != 0 => {
                    return Answer::Served(data);
                }
                _ => {}
            }
        }
    };
    tokio::time::timeout(SECS10, talk)
        .await
        .expect("the daemon neither answered nor reset the stream within 10 s")
}

/// Whether a health check with `authority` as `:authority` was answered with a status.
async fn health_served(daemon: &Daemon, authority: &str) -> Result<(), Answer> {
    // One gRPC message: not compressed, length 0 (HealthCheckRequest{service: ""}).
    let request = [0u8, 0, 0, 0, 0];
    let answer = converse(daemon, health_check_headers(authority), Some(&request)).await;
    // HealthCheckResponse{status: SERVING (1) or NOT_SERVING (2)}: field 1, varint.
    let serving = Answer::Served(vec![0, 0, 0, 0, 2, 0x08, 1]);
    let not_serving = Answer::Served(vec![0, 0, 0, 0, 2, 0x08, 2]);
    if answer == serving || answer == not_serving {
        Ok(())
    } else {
        Err(answer)
    }
}

#[tokio::test]
async fn a_socket_path_as_authority_is_served() {
    let mut d = Daemon::new(&[]);
    d.start().await;
    let path = control_socket(&d).display().to_string();
    let encoded = path.replace('/', "%2F");
    let authorities = [
        // The path itself, as grpc-java sends it.
        path.as_str(),
        // Percent-encoded, as grpcio (grpc core) sends it, without the leading '/'.
        &encoded[3..],
        // Percent-encoded with it, as grpc-go-based grpcurl 1.8's `-unix` sends it.
        encoded.as_str(),
        // A real authority, as tonic and grpc-go send it, still works.
        "localhost",
    ];
    let mut refused = Vec::new();
    for authority in authorities {
        if let Err(answer) = health_served(&d, authority).await {
            refused.push((authority, answer));
        }
    }
    assert!(
        refused.is_empty(),
        "health checks with these :authority values got no status: {refused:?}"
    );
    d.stop().await;
}

#[tokio::test]
async fn connect_with_a_malformed_authority_is_still_refused() {
    let mut d = Daemon::new(&[]);
    d.start().await;
    // CONNECT names its target in :authority alone, so a malformed one stays an error.
    let headers = header_block(&[(":method", "CONNECT"), (":authority", "/not/a/host")]);
    let answer = converse(&d, headers, None).await;
    assert_eq!(answer, Answer::Reset(PROTOCOL_ERROR));
    d.stop().await;
}

/// grpcurl from `$GRPCURL` (set by `tests/run.sh`), else from `PATH`.
fn grpcurl() -> PathBuf {
    std::env::var_os("GRPCURL").map_or_else(|| "grpcurl".into(), PathBuf::from)
}

#[tokio::test]
async fn grpcurl_on_the_socket_lists_services() {
    let mut d = Daemon::new(&[]);
    d.start().await;
    let socket = control_socket(&d);
    let target = format!("unix:{}", socket.display());
    let path = socket.display().to_string();
    // As OPERATIONS.md shows it, then with the path itself as authority.
    for extra in [vec![], vec!["-authority", path.as_str()]] {
        let out = Command::new(grpcurl())
            .arg("-plaintext")
            .args(&extra)
            .args([target.as_str(), "list"])
            .output()
            .expect("grpcurl not found: set GRPCURL or put it on PATH (tests/run.sh installs it)");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && stdout.contains("toru.v1.PluginService"),
            "grpcurl {extra:?} {target} list: {}\n{stdout}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    d.stop().await;
}

/// grpcurl 1.8 from `$GRPCURL_1_8` (set by `tests/run.sh`, which installs 1.8.9): the last
/// release line whose `-unix PATH` dials, sending the path, percent-encoded, as authority.
#[tokio::test]
async fn grpcurl_1_8_dash_unix_lists_services() {
    let grpcurl = std::env::var_os("GRPCURL_1_8")
        .expect("set GRPCURL_1_8 to a grpcurl 1.8 binary (tests/run.sh installs 1.8.9)");
    let mut d = Daemon::new(&[]);
    d.start().await;
    let socket = control_socket(&d);
    let out = Command::new(grpcurl)
        .args(["-plaintext", "-unix"])
        .arg(&socket)
        .arg("list")
        .output()
        .expect("GRPCURL_1_8 runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("toru.v1.PluginService"),
        "grpcurl 1.8 -unix {} list: {}\n{stdout}{}",
        socket.display(),
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    d.stop().await;
}
