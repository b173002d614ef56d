//! The Prometheus endpoint: `GET /metrics` on `--metrics-listen`, its own listener (off by
//! default), answering the OpenMetrics text of [`Metrics::render`].
//!
//! It follows the gRPC listener's rules: TLS when the daemon has TLS (the same certificate),
//! plaintext on an address other hosts can reach only with `--insecure-plaintext-non-loopback`,
//! and on such an address a scrape must bring the read (or admin) token as
//! `Authorization: Bearer <token>` (Prometheus: `authorization.credentials_file`). On a
//! loopback address no token is asked, as only this host can connect.

use std::net::SocketAddr;

use axum::response::{IntoResponse, Response};
use http::{header, HeaderMap, HeaderValue, StatusCode};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::service::Routes;
use tonic::transport::ServerTlsConfig;

use crate::api::auth::Tokens;
use crate::telemetry::metrics::{Metrics, CONTENT_TYPE};

/// Who may scrape.
#[derive(Clone)]
enum Scrapers {
    /// Anyone who can connect (a loopback address).
    Local,
    /// Holders of the read or admin token.
    TokenHolders(Tokens),
}

/// Serves `/metrics` on `listener` until `stop`; `tokens` are asked for unless the address
/// is loopback.
pub fn spawn(
    listener: TcpListener,
    tls: Option<ServerTlsConfig>,
    tokens: Tokens,
    metrics: Metrics,
    stop: &CancellationToken,
) -> Result<tokio::task::JoinHandle<Result<(), tonic::transport::Error>>, tonic::transport::Error> {
    let local = listener
        .local_addr()
        .map(|a| a.ip().is_loopback())
        .unwrap_or(false);
    let scrapers = if local {
        Scrapers::Local
    } else {
        Scrapers::TokenHolders(tokens)
    };
    let router = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move |headers: HeaderMap| {
            let (metrics, scrapers) = (metrics.clone(), scrapers.clone());
            async move { scrape(&metrics, &scrapers, &headers).await }
        }),
    );
    let mut server = tonic::transport::Server::builder().accept_http1(true);
    if let Some(tls) = tls {
        server = server.tls_config(tls)?;
    }
    let serve = server
        .add_routes(Routes::from(router))
        .serve_with_incoming_shutdown(
            tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)),
            stop.clone().cancelled_owned(),
        );
    Ok(tokio::spawn(serve))
}

/// Binds the metrics address.
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}

async fn scrape(metrics: &Metrics, scrapers: &Scrapers, headers: &HeaderMap) -> Response {
    if let Scrapers::TokenHolders(tokens) = scrapers {
        let token = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        if token
            .and_then(|t| tokens.role_of(t.trim().as_bytes()))
            .is_none()
        {
            return (
                StatusCode::UNAUTHORIZED,
                [(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"))],
                "send `Authorization: Bearer <token>` with the daemon's read token\n",
            )
                .into_response();
        }
    }
    let metrics = metrics.clone();
    match tokio::task::spawn_blocking(move || metrics.render()).await {
        Ok(text) => (
            [(header::CONTENT_TYPE, HeaderValue::from_static(CONTENT_TYPE))],
            text,
        )
            .into_response(),
        Err(e) => {
            tracing::error!(error = %e, "rendering metrics failed");
            (
                StatusCode::INTERNAL_SERVER_ERROR,
                "rendering metrics failed\n",
            )
                .into_response()
        }
    }
}
