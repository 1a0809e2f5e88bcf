//! Dialing for the native tailnet transport: TCP (directly or through an
//! HTTP proxy's `CONNECT`), TLS with the system's roots, and websocket
//! upgrades carrying the session token and `--header`s.
//!
//! reqwest covers the REST calls; the coordinate websocket and the DERP
//! relay need a raw upgraded connection, so they are dialed here with the
//! same TLS stack (rustls + ring), the same trust store and the same proxy
//! policy ([`crate::proxy`]). Failures come back as a typed [`DialError`]
//! that says whether a retry can help.

use std::sync::Arc;
use std::time::Duration;

use reqwest::header::{HeaderName, HeaderValue};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::rustls;
use tokio_tungstenite::tungstenite::{self, protocol::Role};
use tokio_tungstenite::WebSocketStream;
use url::Url;

use coder_tailnet::http1::{read_error_body, read_response_head, ResponseHead, Upgraded};
use coder_tailnet::ws::WsStream;

use crate::proxy::{ProxyEnv, ProxyError};

/// Bound on TCP connect (+ CONNECT) + TLS, and separately on the upgrade.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);

/// A byte stream we can hand to yamux or DERP.
pub trait Io: AsyncRead + AsyncWrite + Unpin + Send + 'static {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> Io for T {}

/// A boxed [`Io`].
pub type BoxIo = Box<dyn Io>;

/// Why a connection to coderd or a relay failed.
#[derive(Debug, thiserror::Error)]
pub enum DialError {
    /// No TCP connection (refused, unresolvable, unreachable).
    #[error("connect {addr}: {cause}")]
    Connect { addr: String, cause: String },
    /// Connect, TLS or the upgrade took longer than [`CONNECT_TIMEOUT`].
    #[error("{what}: timed out after {}s", CONNECT_TIMEOUT.as_secs())]
    Timeout { what: String },
    /// The TLS handshake failed; `permanent` when the certificate (or the
    /// lack of TLS on the other end) is the problem rather than the network.
    #[error("TLS handshake with {host}: {cause}")]
    Tls {
        host: String,
        cause: String,
        permanent: bool,
    },
    /// Going through the HTTP proxy failed.
    #[error(transparent)]
    Proxy(#[from] ProxyError),
    /// The server answered the upgrade with an error status.
    #[error("the websocket upgrade of {path} was refused: HTTP {status} {reason}{detail}")]
    Refused {
        path: String,
        status: u16,
        reason: String,
        /// `: message` from a Coder error body, or empty.
        detail: String,
    },
    /// The upgrade broke off (I/O error, a malformed answer).
    #[error("websocket upgrade of {path}: {cause}")]
    Handshake { path: String, cause: String },
    /// We could not even build the request (a bad header or URL).
    #[error("{0}")]
    Invalid(String),
}

impl DialError {
    /// Whether trying again later can succeed: network trouble, timeouts,
    /// 5xx and 429 can; a refusal (4xx), a bad certificate, a refusing
    /// proxy or a request we cannot build cannot.
    pub fn is_transient(&self) -> bool {
        match self {
            DialError::Connect { .. } | DialError::Timeout { .. } | DialError::Handshake { .. } => {
                true
            }
            DialError::Tls { permanent, .. } => !permanent,
            DialError::Proxy(p) => p.is_transient(),
            DialError::Refused { status, .. } => *status >= 500 || *status == 429,
            DialError::Invalid(_) => false,
        }
    }

    /// The HTTP status of a refused upgrade.
    pub fn status(&self) -> Option<u16> {
        match self {
            DialError::Refused { status, .. } => Some(*status),
            _ => None,
        }
    }
}

fn tls_config() -> Result<Arc<rustls::ClientConfig>, DialError> {
    crate::tls::upgrade_config().map_err(DialError::Invalid)
}

/// TCP (and TLS for `https`/`wss`) to `dial_host:port`, verifying
/// `tls_name`, through the proxy `proxies` chooses for `tls_name:port`.
pub async fn connect(
    proxies: &ProxyEnv,
    tls: bool,
    dial_host: &str,
    port: u16,
    tls_name: &str,
) -> Result<BoxIo, DialError> {
    let addr = if dial_host.contains(':') {
        format!("[{dial_host}]:{port}")
    } else {
        format!("{dial_host}:{port}")
    };
    let proxy = proxies
        .for_target(if tls { "https" } else { "http" }, tls_name, port)
        .map_err(DialError::Invalid)?;
    let fut = async {
        let tcp = match proxy {
            Some(p) => crate::proxy::connect(p, dial_host, port).await?,
            None => {
                let tcp = TcpStream::connect((dial_host, port)).await.map_err(|e| {
                    DialError::Connect {
                        addr: addr.clone(),
                        cause: e.to_string(),
                    }
                })?;
                tcp.set_nodelay(true).ok();
                tcp
            }
        };
        if !tls {
            return Ok(Box::new(tcp) as BoxIo);
        }
        let name = rustls::pki_types::ServerName::try_from(tls_name.to_string())
            .map_err(|_| DialError::Invalid(format!("invalid TLS server name {tls_name:?}")))?;
        let conn = tokio_rustls::TlsConnector::from(tls_config()?)
            .connect(name, tcp)
            .await
            .map_err(|e| tls_error(tls_name, e))?;
        Ok(Box::new(conn) as BoxIo)
    };
    match tokio::time::timeout(CONNECT_TIMEOUT, fut).await {
        Ok(r) => r,
        Err(_) => Err(match proxy {
            Some(p) => DialError::Proxy(ProxyError::broken(
                p,
                format!("no tunnel to {addr} within {}s", CONNECT_TIMEOUT.as_secs()),
            )),
            None => DialError::Timeout {
                what: format!("connect {addr}"),
            },
        }),
    }
}

/// A rustls failure (bad or unknown certificate, not TLS at all) will say
/// the same on a retry; an I/O error during the handshake may not.
fn tls_error(host: &str, e: std::io::Error) -> DialError {
    let permanent = e
        .get_ref()
        .is_some_and(|inner| inner.downcast_ref::<rustls::Error>().is_some());
    let mut cause = e.to_string();
    let lower = cause.to_ascii_lowercase();
    if lower.contains("certificate") {
        cause.push_str("; if the deployment uses a private CA, add it to the system trust store or point SSL_CERT_FILE at it");
    }
    DialError::Tls {
        host: host.to_string(),
        cause,
        permanent,
    }
}

/// Open a websocket to an `http(s)` URL (converted to `ws(s)`), adding
/// `headers` and the optional subprotocol.
pub async fn websocket(
    proxies: &ProxyEnv,
    url: &Url,
    headers: &[(HeaderName, HeaderValue)],
    subprotocol: Option<&str>,
) -> Result<WsStream<BoxIo>, DialError> {
    let tls = match url.scheme() {
        "https" | "wss" => true,
        "http" | "ws" => false,
        s => {
            return Err(DialError::Invalid(format!(
                "unsupported scheme {s:?} for a websocket"
            )))
        }
    };
    let host = url
        .host_str()
        .ok_or_else(|| DialError::Invalid("URL has no host".into()))?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let port = url
        .port_or_known_default()
        .ok_or_else(|| DialError::Invalid("URL has no port".into()))?;
    let path = url.path().to_string();
    let mut target = path.clone();
    if let Some(q) = url.query() {
        target.push('?');
        target.push_str(q);
    }
    let default_port = if tls { 443 } else { 80 };
    let host_header = match (host.contains(':'), port == default_port) {
        (true, true) => format!("[{host}]"),
        (true, false) => format!("[{host}]:{port}"),
        (false, true) => host.to_string(),
        (false, false) => format!("{host}:{port}"),
    };
    let key = tungstenite::handshake::client::generate_key();
    let mut req = format!(
        "GET {target} HTTP/1.1\r\nHost: {host_header}\r\nUser-Agent: {USER_AGENT}\r\n\
         Connection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\n\
         Sec-WebSocket-Key: {key}\r\n"
    )
    .into_bytes();
    if let Some(p) = subprotocol {
        if p.bytes().any(|b| b <= b' ' || b == b',' || b >= 0x7f) {
            return Err(DialError::Invalid("invalid subprotocol".into()));
        }
        req.extend_from_slice(format!("Sec-WebSocket-Protocol: {p}\r\n").as_bytes());
    }
    for (k, v) in headers {
        // HeaderName/HeaderValue already exclude CR, LF and NUL.
        if RESERVED.iter().any(|r| k.as_str().eq_ignore_ascii_case(r)) {
            continue;
        }
        req.extend_from_slice(k.as_str().as_bytes());
        req.extend_from_slice(b": ");
        req.extend_from_slice(v.as_bytes());
        req.extend_from_slice(b"\r\n");
    }
    req.extend_from_slice(b"\r\n");

    let mut io = connect(proxies, tls, host, port, host).await?;
    let handshake = async {
        io.write_all(&req).await?;
        io.flush().await?;
        read_response_head(&mut io).await
    };
    let (head, rest) = tokio::time::timeout(CONNECT_TIMEOUT, handshake)
        .await
        .map_err(|_| DialError::Timeout {
            what: format!("websocket upgrade of {path}"),
        })?
        .map_err(|e| DialError::Handshake {
            path: path.clone(),
            cause: e.to_string(),
        })?;
    if head.code != 101 {
        let body = read_error_body(&mut io, &head, rest).await;
        return Err(DialError::Refused {
            path,
            status: head.code,
            reason: reason_phrase(&head),
            detail: coder_detail(&body),
        });
    }
    let accept = tungstenite::handshake::derive_accept_key(key.as_bytes());
    let upgraded = head
        .header("Upgrade")
        .is_some_and(|v| v.eq_ignore_ascii_case("websocket"));
    if !upgraded || head.header("Sec-WebSocket-Accept").map(str::trim) != Some(accept.as_str()) {
        return Err(DialError::Handshake {
            path,
            cause: "the 101 answer is not a websocket upgrade for our key".into(),
        });
    }
    let ws = WebSocketStream::from_raw_socket(
        Box::new(Upgraded::new(rest, io)) as BoxIo,
        Role::Client,
        None,
    )
    .await;
    log::debug!("websocket {path} upgraded (101 Switching Protocols)");
    Ok(WsStream::new(ws))
}

/// Headers the upgrade request sets itself.
const RESERVED: [&str; 7] = [
    "host",
    "user-agent",
    "connection",
    "upgrade",
    "sec-websocket-version",
    "sec-websocket-key",
    "sec-websocket-protocol",
];

/// What coder-proxy calls itself on the websocket upgrades (REST sends the
/// same through reqwest), so coderd's logs can tell its clients apart.
const USER_AGENT: &str = concat!("coder-proxy/", env!("CARGO_PKG_VERSION"));

/// The status line's reason phrase, or the standard one when it has none.
fn reason_phrase(head: &ResponseHead) -> String {
    if !head.reason.is_empty() {
        return crate::coderd::one_line(&head.reason, 80);
    }
    reqwest::StatusCode::from_u16(head.code)
        .ok()
        .and_then(|s| s.canonical_reason())
        .unwrap_or("")
        .to_string()
}

/// `: message (detail; validation details)` from a Coder error body; a
/// short excerpt of any other text; nothing for HTML (a load balancer's
/// error page says no more than its status).
fn coder_detail(body: &[u8]) -> String {
    #[derive(serde::Deserialize)]
    struct Validation {
        #[serde(default)]
        field: String,
        #[serde(default)]
        detail: String,
    }
    #[derive(serde::Deserialize)]
    struct CoderError {
        #[serde(default)]
        message: String,
        #[serde(default)]
        detail: String,
        #[serde(default)]
        validations: Vec<Validation>,
    }
    if let Ok(e) = serde_json::from_slice::<CoderError>(body) {
        let mut s = crate::coderd::one_line(&e.message, 200);
        let mut more: Vec<String> = Vec::new();
        if !e.detail.is_empty() {
            more.push(crate::coderd::one_line(&e.detail, 200));
        }
        for v in e.validations.iter().take(3) {
            more.push(crate::coderd::one_line(
                &format!("{}: {}", v.field, v.detail),
                200,
            ));
        }
        if !more.is_empty() {
            s.push_str(&format!(" ({})", more.join("; ")));
        }
        return if s.is_empty() { s } else { format!(": {s}") };
    }
    let text = String::from_utf8_lossy(body);
    let t = text.trim();
    if t.is_empty() || t.starts_with('<') {
        return String::new();
    }
    format!(": {}", crate::coderd::one_line(t, 200))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_classify_by_status() {
        let refused = |status| DialError::Refused {
            path: "/x".into(),
            status,
            reason: String::new(),
            detail: String::new(),
        };
        for s in [500, 502, 503, 504, 429] {
            assert!(refused(s).is_transient(), "{s}");
        }
        for s in [400, 401, 403, 404, 410] {
            assert!(!refused(s).is_transient(), "{s}");
        }
        assert!(DialError::Connect {
            addr: "a:1".into(),
            cause: "refused".into()
        }
        .is_transient());
    }

    #[test]
    fn coder_error_bodies_are_summarised() {
        assert_eq!(
            coder_detail(br#"{"message":"Unauthorized.","detail":"API key expired"}"#),
            ": Unauthorized. (API key expired)"
        );
        assert_eq!(coder_detail(b"<html><h1>502 Bad Gateway</h1></html>"), "");
        assert_eq!(coder_detail(b"upstream down\n"), ": upstream down");
    }

    /// A listener on loopback that reads one request and answers with each
    /// of `writes` in turn; returns its port.
    async fn answer_once(writes: Vec<Vec<u8>>) -> u16 {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        tokio::spawn(async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let (mut s, _) = l.accept().await.unwrap();
            let mut buf = vec![0u8; 4096];
            let _ = s.read(&mut buf).await;
            for w in writes {
                let _ = s.write_all(&w).await;
            }
        });
        port
    }

    #[tokio::test]
    async fn a_refused_upgrade_carries_its_status() {
        let body = br#"{"message":"Agent not found."}"#;
        let head = format!(
            "HTTP/1.1 404 Not Found\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
            body.len()
        );
        // Head and body in separate writes, as Go's server sends them.
        let port = answer_once(vec![head.into_bytes(), body.to_vec()]).await;
        let url = Url::parse(&format!("http://127.0.0.1:{port}/api/v2/x/coordinate")).unwrap();
        let err = websocket(&ProxyEnv::default(), &url, &[], None)
            .await
            .err()
            .expect("refused");
        assert_eq!(err.status(), Some(404));
        assert!(!err.is_transient());
        assert_eq!(
            err.to_string(),
            "the websocket upgrade of /api/v2/x/coordinate was refused: HTTP 404 Not Found: Agent not found."
        );
    }

    #[tokio::test]
    async fn a_proxy_refusal_is_a_typed_proxy_error() {
        let port = answer_once(vec![b"HTTP/1.0 403 Access denied\r\n\r\n".to_vec()]).await;
        let proxies = ProxyEnv::from_vars(|k| match k {
            "HTTPS_PROXY" => Some(format!("http://127.0.0.1:{port}")),
            _ => None,
        });
        let err = connect(
            &proxies,
            true,
            "coder.example.com",
            443,
            "coder.example.com",
        )
        .await
        .err()
        .expect("refused");
        assert!(matches!(err, DialError::Proxy(_)), "{err:?}");
        assert!(!err.is_transient());
        assert!(
            err.to_string().contains(&format!("127.0.0.1:{port}")),
            "{err}"
        );
    }
}
