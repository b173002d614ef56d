//! The plugin of `torud-bench scale` (not an example to copy: plugins should use
//! `toru_plugin_sdk::serve`). One thread, no async runtime and a small binary, so that a
//! thousand of them cost the host, and the daemon starting them, as little as a plugin can.
//!
//! `--id ID --protocol 1|2 [--metadata]`: prints its metadata, or binds
//! `TORU_PLUGIN_SOCKET` and serves protocol 1 (one message per connection, no answers) or
//! 2 (init → ready, ping → pong on a persistent connection) until `shutdown`.

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::process::ExitCode;

use toru_plugin_sdk::codec::encode_frame;
use toru_plugin_sdk::{Envelope, MessageType};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let value = |flag: &str| {
        args.iter()
            .position(|a| a == flag)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    let id = value("--id").unwrap_or_else(|| "scale".into());
    let protocol: u32 = value("--protocol")
        .and_then(|p| p.parse().ok())
        .unwrap_or(1);
    if args.iter().any(|a| a == "--metadata") {
        let meta = serde_json::json!({
            "id": id, "name": "scale", "version": "1", "icon": "s",
            "route": format!("/{id}"), "protocol_version": protocol,
        });
        println!("{meta}");
        return ExitCode::SUCCESS;
    }
    match serve(protocol) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("scale-plugin: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Serves connections one after another until `shutdown`.
fn serve(protocol: u32) -> std::io::Result<()> {
    let socket = std::env::var_os(toru_plugin_sdk::ENV_PLUGIN_SOCKET).ok_or_else(|| {
        std::io::Error::other("TORU_PLUGIN_SOCKET is not set: run this under torud")
    })?;
    let _ = std::fs::remove_file(&socket);
    let listener = UnixListener::bind(&socket)?;
    for stream in listener.incoming() {
        if serve_connection(stream?, protocol) {
            return Ok(());
        }
    }
    Ok(())
}

/// Answers one connection's messages until it closes; `true` when shutdown was asked. A
/// protocol-1 host sends one message per connection and reads no answer.
fn serve_connection(mut stream: UnixStream, protocol: u32) -> bool {
    loop {
        let mut len = [0u8; 4];
        if stream.read_exact(&mut len).is_err() {
            return false;
        }
        let mut body = vec![0u8; u32::from_be_bytes(len) as usize];
        if stream.read_exact(&mut body).is_err() {
            return false;
        }
        let Ok(message) = Envelope::from_slice(&body) else {
            continue;
        };
        let id = message.request_id.clone().unwrap_or_default();
        let answer = match (message.kind, message.lifecycle_action()) {
            (_, Some("shutdown")) => return true,
            _ if protocol < 2 => continue,
            (_, Some("init")) => Envelope::bare(MessageType::Ready, id),
            (MessageType::Ping, _) => Envelope::bare(MessageType::Pong, id),
            _ => continue,
        };
        if stream.write_all(&encode_frame(&answer.to_vec())).is_err() {
            return false;
        }
    }
}
