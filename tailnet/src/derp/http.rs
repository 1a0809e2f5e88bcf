//! The HTTP side of reaching a DERP relay: the URL for a DERP-map node, the
//! `GET /derp` + `Upgrade: DERP` request, and a bounded parse of the `101`
//! response. A 4xx answer is returned as [`UpgradeError::Status`] whose
//! [`should_try_websocket`](UpgradeError::should_try_websocket) tells the
//! caller to retry over a websocket with subprotocol `derp` — that
//! transport is not in this module; it only needs to yield a byte stream
//! for [`DerpClient::handshake`](super::DerpClient::handshake).
//!
//! TLS is the caller's: hand in a TCP or TLS stream. (If TLS negotiated
//! ALPN `h2`, the Upgrade cannot work; the caller should go straight to
//! websocket, as Tailscale's client does.)

use std::io;

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

use crate::http1::{read_error_body, read_head, read_response_head, HeadError};
pub use crate::http1::{Upgraded, MAX_RESPONSE_HEAD};

use super::client::{ClientOptions, DerpClient};
use super::key::{NodePrivate, NodePublic};
use super::DerpError;
use crate::proto::DerpNode;

const USER_AGENT: &str = concat!("coder-tailnet/", env!("CARGO_PKG_VERSION"));

/// Why the upgrade did not happen.
#[derive(Debug, thiserror::Error)]
pub enum UpgradeError {
    #[error("DERP upgrade I/O: {0}")]
    Io(#[from] io::Error),
    #[error("DERP server answered HTTP {code} {reason}: {body}")]
    Status {
        code: u16,
        reason: String,
        /// The start of the body (lossy UTF-8, ≤ 512 bytes).
        body: String,
    },
    #[error("DERP server sent a malformed HTTP response: {0}")]
    BadResponse(&'static str),
    #[error("DERP upgrade response head exceeds {MAX_RESPONSE_HEAD} bytes")]
    HeadTooLarge,
    #[error("invalid header for the DERP request: {0:?}")]
    BadHeader(String),
}

impl UpgradeError {
    /// True for 4xx answers: a proxy in the way likely refuses
    /// `Upgrade: DERP`; retry this region over a websocket.
    pub fn should_try_websocket(&self) -> bool {
        matches!(self, UpgradeError::Status { code, .. } if (400..500).contains(code))
    }
}

/// What the `101` response told us.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UpgradeResponse {
    /// `Derp-Version` header, if present and numeric.
    pub derp_version: Option<u32>,
    /// `Derp-Public-Key` header (bare hex), if present and valid. The
    /// ServerKey frame that follows is authoritative.
    pub derp_public_key: Option<NodePublic>,
}

/// The URL Tailscale's client uses for a DERP-map node:
/// `https://<IPv4 or HostName>[:DERPPort]/derp`, `http` when `force_http`,
/// the port only when it is not the scheme default.
pub fn derp_url(node: &DerpNode) -> String {
    let scheme = if node.force_http { "http" } else { "https" };
    let host = if node.ipv4.is_empty() {
        node.host_name.as_str()
    } else {
        node.ipv4.as_str()
    };
    let default_port = if node.force_http { 80 } else { 443 };
    if node.derp_port != 0 && node.derp_port != default_port && !host.contains(':') {
        format!("{scheme}://{host}:{}/derp", node.derp_port)
    } else {
        format!("{scheme}://{host}/derp")
    }
}

/// Writes the upgrade request on `io` and reads the response head.
///
/// `host` is the `Host` header value (with `:port` when not the default).
/// `extra_headers` are sent first (e.g. the CLI's `--header` values);
/// `Host`, `Upgrade` and `Connection` among them are ignored because this
/// function sets them. Names and values must not contain CR or LF.
///
/// On success returns the stream, with any bytes that arrived after the
/// response head replayed first.
pub async fn upgrade<S>(
    mut io: S,
    host: &str,
    extra_headers: &[(String, String)],
) -> Result<(Upgraded<S>, UpgradeResponse), UpgradeError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let req = build_request(host, extra_headers)?;
    io.write_all(req.as_bytes()).await?;
    io.flush().await?;

    let (head, rest) = read_response_head(&mut io).await.map_err(head_error)?;
    if head.code != 101 {
        let body = read_error_body(&mut io, &head, rest).await;
        let body = String::from_utf8_lossy(&body[..body.len().min(512)]).into_owned();
        return Err(UpgradeError::Status {
            code: head.code,
            reason: head.reason,
            body,
        });
    }
    let header = |name: &str| head.header(name);
    let upgrade_ok = header("Upgrade").is_some_and(|v| v.eq_ignore_ascii_case("derp"));
    if !upgrade_ok {
        return Err(UpgradeError::BadResponse(
            "101 response without `Upgrade: DERP`",
        ));
    }
    let resp = UpgradeResponse {
        derp_version: header("Derp-Version").and_then(|v| v.trim().parse().ok()),
        derp_public_key: header("Derp-Public-Key")
            .and_then(|v| NodePublic::parse_untyped_hex(v.trim()).ok()),
    };
    Ok((Upgraded::new(rest, io), resp))
}

fn head_error(e: HeadError) -> UpgradeError {
    match e {
        HeadError::Io(e) => UpgradeError::Io(e),
        HeadError::Bad(what) => UpgradeError::BadResponse(what),
        HeadError::TooLarge => UpgradeError::HeadTooLarge,
    }
}

/// Upgrade + login in one call.
pub async fn connect_http<S>(
    io: S,
    host: &str,
    extra_headers: &[(String, String)],
    private: &NodePrivate,
    opts: ClientOptions,
) -> Result<DerpClient<Upgraded<S>>, DerpError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let limit = opts.handshake_timeout;
    let (up, _) = tokio::time::timeout(limit, upgrade(io, host, extra_headers))
        .await
        .map_err(|_| DerpError::Timeout(limit))??;
    DerpClient::handshake(up, private, opts).await
}

fn build_request(host: &str, extra: &[(String, String)]) -> Result<String, UpgradeError> {
    let bad = |s: &str| s.bytes().any(|b| b == b'\r' || b == b'\n');
    if host.is_empty() || bad(host) {
        return Err(UpgradeError::BadHeader(format!("Host: {host}")));
    }
    let mut req = format!("GET /derp HTTP/1.1\r\nHost: {host}\r\nUser-Agent: {USER_AGENT}\r\n");
    for (k, v) in extra {
        let invalid_name = k.is_empty() || k.bytes().any(|b| b <= b' ' || b == b':' || b >= 0x7f);
        if invalid_name || bad(v) {
            return Err(UpgradeError::BadHeader(k.clone()));
        }
        if ["host", "upgrade", "connection", "user-agent"]
            .iter()
            .any(|h| k.eq_ignore_ascii_case(h))
        {
            continue;
        }
        req.push_str(k);
        req.push_str(": ");
        req.push_str(v);
        req.push_str("\r\n");
    }
    req.push_str("Upgrade: DERP\r\nConnection: Upgrade\r\n\r\n");
    Ok(req)
}

/// Server side of the upgrade, for the simulator: reads the request head
/// from `io` (bounded), and if it asks for `Upgrade: DERP` answers `101`
/// with `Derp-Version` and `Derp-Public-Key`; otherwise answers
/// `426 Upgrade Required` and returns `Ok(None)`. Returns the request's
/// headers and the stream (with any bytes read past the head replayed).
pub async fn accept_upgrade<S>(
    mut io: S,
    server_key: &NodePublic,
) -> Result<Option<(Upgraded<S>, Vec<(String, String)>)>, UpgradeError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let (head, rest) = read_head(&mut io).await.map_err(head_error)?;
    let mut lines = head.split("\r\n");
    let request_line = lines.next().unwrap_or_default();
    let mut headers = Vec::new();
    for line in lines {
        if let Some((k, v)) = line.split_once(':') {
            headers.push((k.trim().to_string(), v.trim().to_string()));
        }
    }
    let wants_derp = request_line.starts_with("GET ")
        && headers
            .iter()
            .any(|(k, v)| k.eq_ignore_ascii_case("upgrade") && v.eq_ignore_ascii_case("derp"));
    if !wants_derp {
        let body = "DERP requires connection upgrade";
        let resp = format!(
            "HTTP/1.1 426 Upgrade Required\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        io.write_all(resp.as_bytes()).await?;
        io.flush().await?;
        return Ok(None);
    }
    let resp = format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: DERP\r\nConnection: Upgrade\r\nDerp-Version: {}\r\nDerp-Public-Key: {}\r\n\r\n",
        super::PROTOCOL_VERSION,
        server_key.to_untyped_hex()
    );
    io.write_all(resp.as_bytes()).await?;
    io.flush().await?;
    Ok(Some((Upgraded::new(rest, io), headers)))
}
