//! Dialing for the native tailnet transport: TCP, TLS with the system's
//! roots, and websocket upgrades carrying the session token and `--header`s.
//!
//! reqwest covers the REST calls; the coordinate websocket and the DERP
//! relay need a raw upgraded connection, so they are dialed here with the
//! same TLS stack (rustls + ring) and the same trust store.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use reqwest::header::{HeaderName, HeaderValue};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio_rustls::rustls;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use url::Url;

use coder_tailnet::ws::WsStream;

/// Bound on TCP connect + TLS + upgrade.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);

/// A byte stream we can hand to yamux or DERP.
pub trait Io: AsyncRead + AsyncWrite + Unpin + Send + 'static {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> Io for T {}

/// A boxed [`Io`].
pub type BoxIo = Box<dyn Io>;

fn tls_config() -> Result<Arc<rustls::ClientConfig>> {
    crate::tls::upgrade_config().map_err(|e| anyhow!(e))
}

/// TCP (and TLS for `https`/`wss`) to `host:port`, verifying `tls_name`.
pub async fn connect(tls: bool, dial_host: &str, port: u16, tls_name: &str) -> Result<BoxIo> {
    let fut = async {
        let tcp = TcpStream::connect((dial_host, port))
            .await
            .with_context(|| format!("connect {dial_host}:{port}"))?;
        tcp.set_nodelay(true).ok();
        if !tls {
            return Ok(Box::new(tcp) as BoxIo);
        }
        let name = rustls::pki_types::ServerName::try_from(tls_name.to_string())
            .map_err(|_| anyhow!("invalid TLS server name {tls_name:?}"))?;
        let conn = tokio_rustls::TlsConnector::from(tls_config()?)
            .connect(name, tcp)
            .await
            .with_context(|| format!("TLS handshake with {tls_name}"))?;
        Ok(Box::new(conn) as BoxIo)
    };
    tokio::time::timeout(CONNECT_TIMEOUT, fut)
        .await
        .map_err(|_| anyhow!("connect {dial_host}:{port}: timed out"))?
}

/// Open a websocket to an `http(s)` URL (converted to `ws(s)`), adding
/// `headers` and the optional subprotocol.
pub async fn websocket(
    url: &Url,
    headers: &[(HeaderName, HeaderValue)],
    subprotocol: Option<&str>,
) -> Result<WsStream<BoxIo>> {
    let tls = match url.scheme() {
        "https" | "wss" => true,
        "http" | "ws" => false,
        s => bail!("unsupported scheme {s:?} for a websocket"),
    };
    let host = url.host_str().ok_or_else(|| anyhow!("URL has no host"))?;
    let port = url
        .port_or_known_default()
        .ok_or_else(|| anyhow!("URL has no port"))?;
    let mut ws_url = url.clone();
    let _ = ws_url.set_scheme(if tls { "wss" } else { "ws" });
    let mut req = ws_url
        .as_str()
        .into_client_request()
        .map_err(|e| anyhow!("websocket request: {e}"))?;
    for (k, v) in headers {
        req.headers_mut().append(
            k.as_str()
                .parse::<tokio_tungstenite::tungstenite::http::HeaderName>()
                .map_err(|_| anyhow!("invalid header name"))?,
            tokio_tungstenite::tungstenite::http::HeaderValue::from_bytes(v.as_bytes())
                .map_err(|_| anyhow!("invalid header value"))?,
        );
    }
    if let Some(p) = subprotocol {
        req.headers_mut().insert(
            "Sec-WebSocket-Protocol",
            tokio_tungstenite::tungstenite::http::HeaderValue::from_str(p)
                .map_err(|_| anyhow!("invalid subprotocol"))?,
        );
    }
    let io = connect(tls, host, port, host).await?;
    let (ws, resp) = tokio::time::timeout(
        CONNECT_TIMEOUT,
        tokio_tungstenite::client_async_with_config(req, io, None),
    )
    .await
    .map_err(|_| anyhow!("websocket upgrade of {}: timed out", url.path()))?
    .map_err(|e| match e {
        tokio_tungstenite::tungstenite::Error::Http(r) => {
            let body = r
                .body()
                .as_ref()
                .map(|b| crate::coderd::one_line(&String::from_utf8_lossy(b), 200))
                .unwrap_or_default();
            anyhow!(
                "websocket upgrade of {} refused: HTTP {} {body}",
                url.path(),
                r.status().as_u16()
            )
        }
        other => anyhow!("websocket upgrade of {}: {other}", url.path()),
    })?;
    log::debug!("websocket {} upgraded ({})", url.path(), resp.status());
    Ok(WsStream::new(ws))
}
