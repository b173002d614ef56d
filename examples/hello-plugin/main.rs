//! The Rust example plugin: answers every call with a greeting naming the path it was
//! called with, and leaves KV to the SDK's default handler, which keeps values in the
//! daemon's durable storage, so values set through `KvService` survive plugin and daemon
//! restarts. Built on `toru-plugin-sdk`: protocol 2.

use std::process::ExitCode;

use toru_plugin_sdk::{Context, HttpRequest, HttpResponse, Metadata, Plugin, PluginError};

struct Hello;

impl Plugin for Hello {
    fn metadata(&self) -> Metadata {
        Metadata {
            author: Some("torud authors".into()),
            icon: "wave".into(),
            description: Some(
                "Greets whoever calls it; keeps KV values in the daemon's durable storage.".into(),
            ),
            ..Metadata::new(
                "hello",
                "Hello (Rust example)",
                env!("CARGO_PKG_VERSION"),
                "/hello",
            )
        }
    }

    async fn call(
        &self,
        _ctx: &Context,
        request: HttpRequest,
    ) -> Result<HttpResponse, PluginError> {
        tracing::debug!(path = %request.path, "greeting");
        Ok(HttpResponse::text(format!(
            "hello from {} {} ({} body bytes)",
            request.method,
            request.path,
            request.body.map_or(0, |b| b.len())
        )))
    }
}

fn main() -> ExitCode {
    toru_plugin_sdk::serve(Hello)
}
