//! The coderd REST client: HTTP, auth header, error JSON → typed error.
//!
//! Every request has a timeout and a capped body; redirects are followed only
//! within the deployment's own origin so the session token never travels
//! elsewhere; transport failures, cut-off bodies, 5xx and 429 are marked
//! transient so callers can retry them, while answers that will not change on
//! a retry (4xx, an untrusted certificate, a body that is not the JSON we
//! asked for) fail at once. Text a server sends back is scrubbed of the
//! session token before it reaches a message. Requests go through the HTTP
//! proxy the environment names ([`crate::proxy`]; reqwest's own environment
//! lookup is off so one policy covers REST, websockets and DERP), and a
//! proxy that refuses is reported as the proxy's doing. The watch stream
//! lives in [`watch`].

pub mod models;
pub mod sse;
pub mod watch;

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use reqwest::header::{HeaderMap, HeaderName, HeaderValue};
use reqwest::{Method, StatusCode};
use serde::de::DeserializeOwned;
use url::Url;

use crate::proxy::{ProxyEnv, ProxyError};
use crate::settings::Settings;
use models::*;

/// Largest JSON body we read; real workspaces are a few KiB.
pub const MAX_BODY: usize = 4 << 20;
/// How much of an error body we read; the rest is dropped unread.
pub const MAX_ERROR_BODY: usize = 64 << 10;
/// Bound on one ordinary request, headers and body.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Bound on TCP + TLS connect.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// The header carrying the session token.
pub const TOKEN_HEADER: &str = "Coder-Session-Token";

/// Why a call to coderd failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ApiError {
    /// coderd answered with an error status.
    #[error("{}", status_text(.status, .message, .detail, .validations, .helper))]
    Status {
        status: u16,
        message: String,
        detail: String,
        validations: Vec<String>,
        helper: Option<String>,
    },
    /// We could not talk to coderd at all.
    #[error("cannot reach coderd at {url}: {cause}")]
    Transport { url: String, cause: String },
    /// The TLS handshake failed in a way a retry cannot fix (an untrusted
    /// certificate, or no TLS at all on the other end).
    #[error("cannot reach coderd at {url}: TLS failed: {cause}; {hint}")]
    Tls {
        url: String,
        cause: String,
        hint: &'static str,
    },
    /// The connection broke while the body was being read.
    #[error("the answer from coderd was cut off ({what}): {cause}")]
    Truncated { what: String, cause: String },
    /// coderd (or something in front of it) answered with a body we cannot use.
    #[error("unexpected response from coderd ({what}): {cause}")]
    Body { what: String, cause: String },
    /// A redirect pointed at another origin; we refuse to follow it with the token.
    #[error("coderd redirected to another origin ({location}); refusing to send the session token there: set --url or CODER_URL to the deployment's real address")]
    Redirect { location: String },
    /// The HTTP proxy in front of coderd failed or refused.
    #[error(transparent)]
    Proxy(#[from] ProxyError),
}

fn status_text(
    status: &u16,
    message: &str,
    detail: &str,
    validations: &[String],
    helper: &Option<String>,
) -> String {
    let mut s = message.to_string();
    if !validations.is_empty() {
        s.push_str(&format!(" ({})", validations.join("; ")));
    }
    if !detail.is_empty() && helper.is_none() {
        s.push_str(&format!(": {detail}"));
    }
    s.push_str(&format!(" [HTTP {status}]"));
    if let Some(h) = helper {
        s.push_str(&format!(". {h}"));
    }
    s
}

impl ApiError {
    /// Worth retrying: the deployment may come back.
    ///
    /// A proxy's error page during an outage comes with a 5xx status and is
    /// transient like any 5xx. A *successful* status with a body that is not
    /// the JSON we asked for (a login portal's HTML, a non-Coder server's
    /// JSON, more than [`MAX_BODY`]) will say the same on every retry, so
    /// [`ApiError::Body`] fails at once; a body cut off mid-read is a network
    /// problem and [`ApiError::Truncated`] is retried.
    pub fn is_transient(&self) -> bool {
        match self {
            ApiError::Status { status, .. } => *status >= 500 || *status == 429,
            ApiError::Transport { .. } | ApiError::Truncated { .. } => true,
            ApiError::Proxy(p) => p.is_transient(),
            ApiError::Tls { .. } | ApiError::Body { .. } | ApiError::Redirect { .. } => false,
        }
    }
    /// The HTTP status, when coderd answered.
    pub fn status(&self) -> Option<u16> {
        match self {
            ApiError::Status { status, .. } => Some(*status),
            _ => None,
        }
    }
}

/// A coderd client bound to one deployment.
#[derive(Clone)]
pub struct Client {
    http: reqwest::Client,
    base: Url,
    timeout: Duration,
    /// The session token, to scrub from text the server sends back.
    scrub: Option<crate::settings::Secret>,
    /// Token and `--header`s, for connections reqwest does not make
    /// (websocket and DERP upgrades).
    upgrade_headers: Vec<(HeaderName, HeaderValue)>,
    /// The HTTP proxies from the environment, for every connection.
    proxies: Arc<ProxyEnv>,
}

impl fmt::Debug for Client {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Client")
            .field("base", &self.base.as_str())
            .finish()
    }
}

impl Client {
    /// Build the client: token and extra headers on every request.
    pub fn new(settings: &Settings) -> anyhow::Result<Client> {
        let mut headers = HeaderMap::new();
        for (k, v) in &settings.headers {
            headers.append(k.clone(), v.clone());
        }
        if let Some(token) = &settings.token {
            let mut v = HeaderValue::from_str(token.expose())
                .map_err(|_| anyhow::anyhow!("the session token contains characters not allowed in an HTTP header; run 'coder login' again"))?;
            v.set_sensitive(true);
            headers.insert(HeaderName::from_static("coder-session-token"), v);
        }
        let mut builder = reqwest::Client::builder()
            .default_headers(headers.clone())
            .user_agent(concat!("coder-proxy/", env!("CARGO_PKG_VERSION")))
            .connect_timeout(CONNECT_TIMEOUT)
            .redirect(same_origin_redirects())
            .tcp_nodelay(true)
            .tls_built_in_root_certs(false);
        // A plain-http deployment never needs the roots (redirects stay on
        // the same origin, so this client never speaks TLS); an https one
        // shares them with the tailnet dialer (see `crate::tls`).
        if settings.url.scheme() == "https" {
            builder = builder.use_preconfigured_tls(
                crate::tls::rest_config().map_err(|e| anyhow::anyhow!("cannot set up TLS: {e}"))?,
            );
        }
        let proxies = Arc::new(settings.proxy.clone());
        builder = if proxies.is_empty() {
            builder.no_proxy()
        } else {
            let p = proxies.clone();
            // REST only goes to the deployment's origin, whose proxy
            // Settings checked; an unusable one cannot appear here.
            builder.proxy(reqwest::Proxy::custom(move |url| {
                p.for_url(url)
                    .ok()
                    .flatten()
                    .map(|proxy| proxy.url_with_credentials())
            }))
        };
        let http = builder
            .build()
            .map_err(|e| anyhow::anyhow!("cannot set up the HTTP client: {}", error_chain(&e)))?;
        Ok(Client {
            http,
            base: settings.url.clone(),
            timeout: request_timeout(),
            scrub: settings.token.clone().filter(|t| t.expose().len() >= 4),
            upgrade_headers: headers
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            proxies,
        })
    }

    /// The HTTP proxy settings every connection to the deployment follows.
    pub fn proxies(&self) -> &Arc<ProxyEnv> {
        &self.proxies
    }

    /// The deployment URL.
    pub fn base(&self) -> &Url {
        &self.base
    }

    fn url(&self, path: &str) -> Result<Url, ApiError> {
        self.base.join(path).map_err(|e| ApiError::Body {
            what: path.to_string(),
            cause: format!("cannot build URL: {e}"),
        })
    }

    /// Send a request and return (status, body) for a success status.
    async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> Result<(StatusCode, Vec<u8>), ApiError> {
        let url = self.url(path)?;
        let what = format!("{method} {}", url.path());
        log::debug!("{what}");
        let started = std::time::Instant::now();
        let fut = async {
            let mut req = self.http.request(method.clone(), url.clone());
            if let Some(b) = &body {
                req = req.json(b);
            }
            let resp = match req.send().await {
                Ok(r) => r,
                Err(e) => return Err(self.send_error(&e, &url).await),
            };
            self.check_redirect(&resp)?;
            self.check_proxy_auth(&url, &resp)?;
            let status = resp.status();
            if status.is_success() {
                Ok((status, read_capped(resp, MAX_BODY, &what).await?))
            } else {
                let ctype = content_type(&resp);
                let bytes = read_prefix(resp, MAX_ERROR_BODY).await;
                Err(self.error_from(&url, &what, status, &ctype, &bytes))
            }
        };
        let r = match tokio::time::timeout(self.timeout, fut).await {
            Ok(r) => r,
            Err(_) => Err(ApiError::Transport {
                url: self.base.to_string(),
                cause: format!("{what} got no answer within {}s", self.timeout.as_secs()),
            }),
        };
        log::debug!(
            "{what} -> {} in {}ms",
            match &r {
                Ok((s, _)) => s.as_u16().to_string(),
                Err(e) => e
                    .status()
                    .map(|s| s.to_string())
                    .unwrap_or_else(|| "error".into()),
            },
            started.elapsed().as_millis()
        );
        r
    }

    async fn get_json<T: DeserializeOwned>(&self, path: &str) -> Result<T, ApiError> {
        let (_, body) = self.call(Method::GET, path, None).await?;
        self.decode(&format!("GET {}", strip_query(path)), &body)
    }

    /// Why sending a request failed: the proxy's doing when the request
    /// went through one and never got past it, else [`Self::transport`].
    async fn send_error(&self, e: &reqwest::Error, url: &Url) -> ApiError {
        if let Ok(Some(proxy)) = self.proxies.for_url(url) {
            if e.is_connect() {
                let chain = error_chain(e);
                // hyper-util's tunnel errors are not exported; their text is
                // stable ("tunnel error: …").
                if chain.contains("tunnel error: proxy authorization required") {
                    return ProxyError::auth(proxy).into();
                }
                if chain.contains("tunnel error: unsuccessful") {
                    // The CONNECT got a non-2xx answer reqwest does not
                    // pass on: ask the proxy ourselves to learn which.
                    return self.probe_proxy(proxy, url).await;
                }
                // No TCP connection to the proxy itself: for https the
                // tunnel says so; for http the proxy is all we connect to.
                // (A TLS failure after a good tunnel is coderd's: below.)
                let to_proxy = chain
                    .contains("tunnel error: failed to create underlying connection")
                    || (url.scheme() == "http" && !chain.contains("tunnel error"));
                if to_proxy {
                    return ProxyError::unreachable(proxy, self.scrubbed(&chain, 300)).into();
                }
            }
        }
        self.transport(e)
    }

    /// CONNECT through `proxy` to `url`'s host to learn why a tunnel failed.
    async fn probe_proxy(&self, proxy: &crate::proxy::Proxy, url: &Url) -> ApiError {
        let host = url.host_str().unwrap_or("").trim_matches(['[', ']']);
        let port = url.port_or_known_default().unwrap_or(443);
        match crate::proxy::connect_within(proxy, host, port, CONNECT_TIMEOUT).await {
            Err(e) => e.into(),
            // Refused once, allowed now: a proxy having a moment.
            Ok(_) => {
                ProxyError::broken(proxy, "it refused a tunnel, then allowed one".into()).into()
            }
        }
    }

    fn transport(&self, e: &reqwest::Error) -> ApiError {
        let cause = self.scrubbed(&error_chain(e), 400);
        // rustls's error type is not reachable through reqwest, but its text
        // names the failure: "invalid peer certificate: UnknownIssuer", "peer
        // sent no certificates", "received fatal alert: BadCertificate", or
        // "received corrupt message of type InvalidContentType" when the
        // other end does not speak TLS at all.
        let lower = cause.to_ascii_lowercase();
        let hint = if lower.contains("certificate") {
            Some("if the deployment uses a private CA, add it to the system trust store or point SSL_CERT_FILE at it")
        } else if lower.contains("invalidcontenttype") {
            Some("the server does not speak TLS on that port; if the deployment is served over plain http, use an http:// URL")
        } else {
            None
        };
        if let Some(hint) = hint {
            return ApiError::Tls {
                url: self.base.to_string(),
                cause,
                hint,
            };
        }
        ApiError::Transport {
            url: self.base.to_string(),
            cause,
        }
    }

    /// `s` without the session token, as one line of at most `max` chars.
    fn scrubbed(&self, s: &str, max: usize) -> String {
        match &self.scrub {
            Some(t) if s.contains(t.expose()) => {
                one_line(&s.replace(t.expose(), "[REDACTED]"), max)
            }
            _ => one_line(s, max),
        }
    }

    /// Decode a successful body, or say plainly what came instead.
    fn decode<T: DeserializeOwned>(&self, what: &str, body: &[u8]) -> Result<T, ApiError> {
        serde_json::from_slice(body).map_err(|e| ApiError::Body {
            what: what.to_string(),
            cause: if body.trim_ascii_start().first() == Some(&b'<') {
                "got HTML, not JSON (is --url the Coder deployment?)".to_string()
            } else if body.trim_ascii().is_empty() {
                "got an empty body, not JSON (is --url the Coder deployment?)".to_string()
            } else if e.is_data() {
                format!(
                    "the JSON is not shaped as expected ({}); is --url the Coder deployment?",
                    self.scrubbed(&e.to_string(), 200)
                )
            } else if e.is_eof() {
                format!("the JSON ends early ({e})")
            } else {
                format!("invalid JSON: {}", self.scrubbed(&e.to_string(), 200))
            },
        })
    }

    /// Turn an error status into an [`ApiError`].
    ///
    /// coderd always explains an error with its JSON; a 4xx without it comes
    /// from something else (a wrong `--url`, a proxy, a login portal) and is
    /// reported as such rather than as, say, "workspace not found".
    fn error_from(
        &self,
        url: &Url,
        what: &str,
        status: StatusCode,
        ctype: &str,
        body: &[u8],
    ) -> ApiError {
        let proxy = self.proxies.for_url(url).ok().flatten();
        let helper = (status == StatusCode::UNAUTHORIZED).then(|| {
            format!(
                "Try logging in using 'coder login {}'",
                self.base.as_str().trim_end_matches('/')
            )
        });
        let code = status.as_u16();
        let reason = status.canonical_reason().unwrap_or("error");
        if let Ok(e) = serde_json::from_slice::<ErrorBody>(body) {
            if !e.message.trim().is_empty() {
                return ApiError::Status {
                    status: code,
                    message: self.scrubbed(&e.message, 300),
                    detail: self.scrubbed(&e.detail, 300),
                    validations: e
                        .validations
                        .iter()
                        .map(|v| self.scrubbed(&format!("{}: {}", v.field, v.detail), 200))
                        .collect(),
                    helper,
                };
            }
        }
        let mut got = if body.trim_ascii().is_empty() {
            "an empty body".to_string()
        } else {
            format!(
                "a body that is not Coder error JSON ({ctype:?}: {})",
                self.scrubbed(&String::from_utf8_lossy(body), 120)
            )
        };
        // Not coderd's answer: perhaps the proxy's.
        if let Some(p) = proxy {
            got.push_str(&format!(", through the HTTP proxy {}", p.addr()));
        }
        if code == 401 || code == 429 || code >= 500 {
            return ApiError::Status {
                status: code,
                message: format!("{reason} ({got})"),
                detail: String::new(),
                validations: vec![],
                helper,
            };
        }
        if let Some(p) = proxy {
            return ApiError::Body {
                what: what.to_string(),
                cause: format!(
                    "HTTP {code} {reason} from the HTTP proxy {} (from {}) or a server behind it, not Coder's JSON ({ctype:?}: {}); check {} and NO_PROXY",
                    p.addr(),
                    p.var,
                    self.scrubbed(&String::from_utf8_lossy(body), 80),
                    p.var
                ),
            };
        }
        ApiError::Body {
            what: what.to_string(),
            cause: format!(
                "HTTP {code} {reason} with {got}; is --url the Coder deployment's address?"
            ),
        }
    }

    /// Through a proxy (plain-http deployments, where the request itself
    /// goes to the proxy), a 407 — or a 401 with a Basic challenge, which
    /// tinyproxy sends for wrong credentials and coderd never does — is the
    /// proxy asking for credentials.
    fn check_proxy_auth(&self, url: &Url, resp: &reqwest::Response) -> Result<(), ApiError> {
        let Ok(Some(proxy)) = self.proxies.for_url(url) else {
            return Ok(());
        };
        let basic_challenge = resp
            .headers()
            .get(reqwest::header::WWW_AUTHENTICATE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.trim_start().to_ascii_lowercase().starts_with("basic"));
        match resp.status() {
            StatusCode::PROXY_AUTHENTICATION_REQUIRED => Err(ProxyError::auth(proxy).into()),
            StatusCode::UNAUTHORIZED if basic_challenge => Err(ProxyError::auth(proxy).into()),
            _ => Ok(()),
        }
    }

    fn check_redirect(&self, resp: &reqwest::Response) -> Result<(), ApiError> {
        if resp.status().is_redirection() {
            let Some(location) = resp.headers().get(reqwest::header::LOCATION) else {
                return Err(ApiError::Body {
                    what: resp.url().path().to_string(),
                    cause: format!(
                        "HTTP {} without a Location; is --url the Coder deployment's address?",
                        resp.status().as_u16()
                    ),
                });
            };
            let location = self.scrubbed(&String::from_utf8_lossy(location.as_bytes()), 200);
            return Err(ApiError::Redirect { location });
        }
        Ok(())
    }

    /// `GET /api/v2/users/{owner}/workspace/{name}`.
    pub async fn workspace_by_name(&self, owner: &str, name: &str) -> Result<Workspace, ApiError> {
        self.get_json(&format!(
            "/api/v2/users/{}/workspace/{}?include_deleted=false",
            seg(owner),
            seg(name)
        ))
        .await
        .and_then(check_workspace)
    }

    /// `GET /api/v2/workspaces/{id}`.
    pub async fn workspace(&self, id: &str) -> Result<Workspace, ApiError> {
        self.get_json(&format!("/api/v2/workspaces/{}", seg(id)))
            .await
            .and_then(check_workspace)
    }

    /// `GET /api/v2/workspacebuilds/{id}/parameters`.
    pub async fn build_parameters(&self, build: &str) -> Result<Vec<BuildParameter>, ApiError> {
        let v: Option<Vec<BuildParameter>> = self
            .get_json(&format!(
                "/api/v2/workspacebuilds/{}/parameters",
                seg(build)
            ))
            .await?;
        Ok(v.unwrap_or_default())
    }

    /// `POST /api/v2/workspaces/{id}/builds`.
    pub async fn create_build(
        &self,
        ws: &str,
        req: &CreateBuild,
    ) -> Result<WorkspaceBuild, ApiError> {
        let body = serde_json::to_value(req).map_err(|e| ApiError::Body {
            what: "build request".into(),
            cause: e.to_string(),
        })?;
        let path = format!("/api/v2/workspaces/{}/builds", seg(ws));
        let (_, bytes) = self.call(Method::POST, &path, Some(body)).await?;
        self.decode(&format!("POST {path}"), &bytes)
    }

    /// `PUT /api/v2/workspaces/{id}/dormant {"dormant": false}`.
    pub async fn wake_dormant(&self, ws: &str) -> Result<(), ApiError> {
        let path = format!("/api/v2/workspaces/{}/dormant", seg(ws));
        self.call(
            Method::PUT,
            &path,
            Some(serde_json::json!({"dormant": false})),
        )
        .await
        .map(|_| ())
    }

    /// `GET /api/v2/workspacebuilds/{id}/logs?after=N`.
    pub async fn build_logs(&self, build: &str, after: i64) -> Result<Vec<BuildLog>, ApiError> {
        let v: Option<Vec<BuildLog>> = self
            .get_json(&format!(
                "/api/v2/workspacebuilds/{}/logs?after={after}",
                seg(build)
            ))
            .await?;
        Ok(v.unwrap_or_default())
    }

    /// `GET /api/v2/workspaceagents/{id}/logs?after=N`.
    pub async fn agent_logs(&self, agent: &str, after: i64) -> Result<Vec<AgentLog>, ApiError> {
        let v: Option<Vec<AgentLog>> = self
            .get_json(&format!(
                "/api/v2/workspaceagents/{}/logs?after={after}",
                seg(agent)
            ))
            .await?;
        Ok(v.unwrap_or_default())
    }

    /// Token and extra headers for websocket and DERP upgrades.
    pub fn upgrade_headers(&self) -> &[(HeaderName, HeaderValue)] {
        &self.upgrade_headers
    }

    /// `GET /api/v2/workspaceagents/{id}/connection`: the DERP map.
    pub async fn agent_connection_info(
        &self,
        agent: &str,
    ) -> Result<coder_tailnet::derpmap::ConnectionInfo, ApiError> {
        self.get_json(&format!(
            "/api/v2/workspaceagents/{}/connection",
            seg(agent)
        ))
        .await
    }

    /// `GET /api/v2/workspaceagents/connection`.
    pub async fn connection_info(&self) -> Result<ConnectionInfo, ApiError> {
        self.get_json("/api/v2/workspaceagents/connection").await
    }

    /// `POST /api/v2/workspaces/{id}/usage`.
    pub async fn post_usage(&self, ws: &str, agent: &str, app: &str) -> Result<(), ApiError> {
        let path = format!("/api/v2/workspaces/{}/usage", seg(ws));
        let body = serde_json::json!({"agent_id": agent, "app_name": app});
        self.call(Method::POST, &path, Some(body)).await.map(|_| ())
    }

    /// Open `GET /api/v2/workspaces/{id}/watch` and wait for its headers.
    pub(crate) async fn open_watch(&self, id: &str) -> Result<reqwest::Response, ApiError> {
        let url = self.url(&format!("/api/v2/workspaces/{}/watch", seg(id)))?;
        let fut = async {
            let resp = match self
                .http
                .get(url.clone())
                .header("Accept", "text/event-stream")
                .send()
                .await
            {
                Ok(r) => r,
                Err(e) => return Err(self.send_error(&e, &url).await),
            };
            self.check_redirect(&resp)?;
            self.check_proxy_auth(&url, &resp)?;
            let status = resp.status();
            if status.is_success() {
                return Ok(resp);
            }
            let ctype = content_type(&resp);
            let bytes = read_prefix(resp, MAX_ERROR_BODY).await;
            Err(self.error_from(&url, "watch", status, &ctype, &bytes))
        };
        tokio::time::timeout(self.timeout, fut)
            .await
            .unwrap_or_else(|_| {
                Err(ApiError::Transport {
                    url: self.base.to_string(),
                    cause: "the watch stream got no answer".into(),
                })
            })
    }
}

/// [`REQUEST_TIMEOUT`], or `CODER_PROXY_HTTP_TIMEOUT` (a duration such as
/// `2s`) so tests of hanging servers need not wait 30 s.
fn request_timeout() -> Duration {
    std::env::var("CODER_PROXY_HTTP_TIMEOUT")
        .ok()
        .and_then(|v| crate::cli::parse_duration(&v).ok())
        .filter(|d| !d.is_zero())
        .unwrap_or(REQUEST_TIMEOUT)
}

/// Percent-encode one path segment (names are validated, IDs come from coderd).
fn seg(s: &str) -> String {
    url::form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

/// Reject JSON that decoded but is not a workspace (serde is lenient).
pub fn check_workspace(ws: Workspace) -> Result<Workspace, ApiError> {
    if ws.id.is_empty() || ws.latest_build.id.is_empty() {
        return Err(ApiError::Body {
            what: "workspace".into(),
            cause:
                "the JSON is not a workspace (no id or latest_build); is --url a Coder deployment?"
                    .into(),
        });
    }
    Ok(ws)
}

fn content_type(resp: &reqwest::Response) -> String {
    resp.headers()
        .get(reqwest::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string()
}

fn strip_query(path: &str) -> &str {
    path.split('?').next().unwrap_or(path)
}

/// Read a body, refusing more than `cap` bytes without buffering them.
async fn read_capped(resp: reqwest::Response, cap: usize, what: &str) -> Result<Vec<u8>, ApiError> {
    let too_large = || ApiError::Body {
        what: what.to_string(),
        cause: format!("response body is larger than {} MiB", cap >> 20),
    };
    if resp.content_length().is_some_and(|n| n > cap as u64) {
        return Err(too_large());
    }
    let mut out = Vec::new();
    let mut stream = resp.bytes_stream();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| ApiError::Truncated {
            what: what.to_string(),
            cause: format!("reading the body failed: {}", error_chain(&e)),
        })?;
        if out.len() + chunk.len() > cap {
            return Err(too_large());
        }
        out.extend_from_slice(&chunk);
    }
    Ok(out)
}

/// The first `cap` bytes of an (error) body; a read error ends it early.
async fn read_prefix(resp: reqwest::Response, cap: usize) -> Vec<u8> {
    let mut out = Vec::new();
    let mut stream = resp.bytes_stream();
    while let Some(Ok(chunk)) = stream.next().await {
        let room = cap - out.len();
        out.extend_from_slice(&chunk[..chunk.len().min(room)]);
        if out.len() >= cap {
            break;
        }
    }
    out
}

/// Follow redirects only within the original origin, at most five.
fn same_origin_redirects() -> reqwest::redirect::Policy {
    reqwest::redirect::Policy::custom(|attempt| {
        let same = attempt
            .previous()
            .first()
            .is_some_and(|first| first.origin() == attempt.url().origin());
        if same && attempt.previous().len() <= 5 {
            attempt.follow()
        } else {
            attempt.stop()
        }
    })
}

/// The innermost useful cause of an error, one line.
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        let s = err.to_string();
        // reqwest's top level repeats the URL; the causes say what happened.
        if !s.starts_with("error sending request")
            && !s.starts_with("client error (")
            && !parts.iter().any(|p| p.contains(&s))
        {
            parts.push(s);
        }
        cur = err.source();
    }
    if parts.is_empty() {
        parts.push(e.to_string());
    }
    one_line(&parts.join(": "), 400)
}

/// Collapse to one printable line of at most `max` characters.
pub fn one_line(s: &str, max: usize) -> String {
    let mut out: String = s
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .take(max)
        .collect();
    if s.chars().count() > max {
        out.push('…');
    }
    out.trim().to_string()
}
