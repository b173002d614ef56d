//! The Rust example plugin: answers every call with a greeting naming the path it was
//! called with, and keeps KV values in memory. Built on `toru-plugin-sdk`, so it speaks
//! protocol 2 (one persistent connection from the daemon).

use std::process::ExitCode;

use toru_plugin_sdk::{HttpRequest, HttpResponse, Metadata, Plugin};

struct Hello;

impl Plugin for Hello {
    fn metadata(&self) -> Metadata {
        Metadata {
            id: "hello".into(),
            name: "Hello (Rust example)".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            author: Some("torud authors".into()),
            icon: "wave".into(),
            route: "/hello".into(),
            description: Some("Greets whoever calls it; keeps KV values in memory.".into()),
            protocol_version: toru_plugin_sdk::PROTOCOL_VERSION,
        }
    }

    fn call(&self, request: HttpRequest) -> HttpResponse {
        HttpResponse {
            status: 200,
            headers: [("content-type".to_owned(), "text/plain".to_owned())].into(),
            body: Some(
                format!(
                    "hello from {} {} ({} body bytes)",
                    request.method,
                    request.path,
                    request.body.map_or(0, |b| b.len())
                )
                .into_bytes(),
            ),
        }
    }
}

fn main() -> ExitCode {
    toru_plugin_sdk::run(Hello)
}
