//! HTTP proxies from the environment: which proxy, if any, a connection to
//! coderd or a DERP relay goes through, and the `CONNECT` handshake.
//!
//! One policy for every connection coder-proxy makes to the deployment —
//! the REST calls (handed to reqwest as a custom proxy), the coordinate
//! websocket and the DERP relay (tunnelled here with `CONNECT`, for `http`
//! and `https` alike, as browsers do for websockets). The rules are Go's
//! `net/http` ones, which `coder` uses:
//!
//! - `HTTPS_PROXY` for `https` URLs, `HTTP_PROXY` for `http` URLs (the
//!   upper-case name wins over the lower-case one; empty means unset);
//!   `ALL_PROXY` is the fallback for both, as in curl. A value without a
//!   scheme means `http://`; the port defaults to 80. Only HTTP proxies
//!   are spoken to: `https://` (TLS to the proxy) and `socks5://` proxies
//!   are refused with one line rather than silently bypassed.
//! - `user:password@` in the proxy URL becomes `Proxy-Authorization: Basic`.
//!   The credentials never appear in a message or log line.
//! - `NO_PROXY`: comma-separated; `*` matches everything; an IP address or
//!   CIDR block matches addresses; `example.com` matches it and its
//!   subdomains, `.example.com` and `*.example.com` only subdomains; any
//!   entry may carry `:port` to match only that port.
//! - `localhost` and loopback addresses never use a proxy (a proxy elsewhere
//!   cannot reach our loopback), unless `CODER_PROXY_PROXY_LOOPBACK=1`
//!   asks for it — for a debugging proxy on this machine (mitmproxy), or
//!   tests.

use std::fmt;
use std::net::IpAddr;
use std::time::Duration;

use base64::Engine as _;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::settings::Secret;

/// Opt-in: send loopback destinations through the proxy too.
pub const LOOPBACK_VAR: &str = "CODER_PROXY_PROXY_LOOPBACK";

/// Largest CONNECT response head we read.
const MAX_HEAD: usize = 16 << 10;

/// A proxy taken from the environment.
#[derive(Clone)]
pub struct Proxy {
    /// The variable it came from (`HTTPS_PROXY`, `http_proxy`, …).
    pub var: &'static str,
    host: String,
    port: u16,
    /// `user[:password]` as written (percent-encoded), for reqwest.
    userinfo: Option<Secret>,
    /// `Basic …`.
    authorization: Option<Secret>,
    /// The decoded password, for the log redactor.
    password: Option<Secret>,
}

impl Proxy {
    /// `host:port` (`[v6]:port`): how messages name the proxy.
    pub fn addr(&self) -> String {
        authority(&self.host, self.port)
    }

    /// Whether we send credentials.
    pub fn has_credentials(&self) -> bool {
        self.authorization.is_some()
    }

    /// The proxy URL with its credentials, for reqwest (never displayed).
    pub fn url_with_credentials(&self) -> String {
        match &self.userinfo {
            Some(u) => format!("http://{}@{}", u.expose(), self.addr()),
            None => format!("http://{}", self.addr()),
        }
    }

    fn error(&self, kind: ProxyErrorKind) -> ProxyError {
        ProxyError {
            proxy: self.addr(),
            var: self.var,
            kind,
        }
    }
}

impl fmt::Debug for Proxy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let creds = if self.userinfo.is_some() {
            "[credentials]@"
        } else {
            ""
        };
        write!(f, "http://{creds}{} (from {})", self.addr(), self.var)
    }
}

/// The proxy settings of this process.
///
/// A variable naming a proxy we cannot use is kept as its error and
/// reported only when a connection would go through it: `ALL_PROXY` set to
/// a SOCKS proxy for other tools must not break an `https` deployment that
/// `HTTPS_PROXY` covers.
#[derive(Clone, Debug, Default)]
pub struct ProxyEnv {
    https: Option<Result<Proxy, String>>,
    http: Option<Result<Proxy, String>>,
    no_proxy: NoProxy,
    loopback: bool,
}

impl ProxyEnv {
    /// Read the environment.
    pub fn from_env() -> ProxyEnv {
        Self::from_vars(|k| std::env::var(k).ok())
    }

    /// [`Self::from_env`] over any source of variables (tests).
    pub fn from_vars(get: impl Fn(&str) -> Option<String>) -> ProxyEnv {
        let first = |names: &[&'static str]| {
            names
                .iter()
                .find_map(|n| get(n).filter(|v| !v.trim().is_empty()).map(|v| (*n, v)))
        };
        // Under CGI, HTTP_PROXY is a request header anyone can set
        // ("httpoxy"); only the lower-case name counts there.
        let cgi = get("REQUEST_METHOD").is_some_and(|v| !v.is_empty());
        let http_names: &[&'static str] = if cgi {
            &["http_proxy"]
        } else {
            &["HTTP_PROXY", "http_proxy"]
        };
        let all = first(&["ALL_PROXY", "all_proxy"]);
        let parse = |v: Option<(&'static str, String)>| v.map(|(var, raw)| parse_proxy(var, &raw));
        let https = parse(first(&["HTTPS_PROXY", "https_proxy"]).or_else(|| all.clone()));
        let http = parse(first(http_names).or(all));
        let no_proxy = NoProxy::parse(
            &first(&["NO_PROXY", "no_proxy"])
                .map(|(_, v)| v)
                .unwrap_or_default(),
        );
        let loopback = get(LOOPBACK_VAR).is_some_and(|v| matches!(v.trim(), "1" | "true" | "yes"));
        ProxyEnv {
            https,
            http,
            no_proxy,
            loopback,
        }
    }

    /// No proxy is configured at all.
    pub fn is_empty(&self) -> bool {
        self.https.is_none() && self.http.is_none()
    }

    /// The proxy for a connection to `host:port` made for a URL of `scheme`
    /// (`https`/`wss` or `http`/`ws`), `None` to go direct, or why the
    /// variable that applies names no usable proxy.
    pub fn for_target(
        &self,
        scheme: &str,
        host: &str,
        port: u16,
    ) -> Result<Option<&Proxy>, String> {
        let proxy = match scheme {
            "https" | "wss" => self.https.as_ref(),
            "http" | "ws" => self.http.as_ref(),
            _ => None,
        };
        let Some(proxy) = proxy else {
            return Ok(None);
        };
        let host = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .trim_end_matches('.')
            .to_ascii_lowercase();
        if (!self.loopback && is_loopback(&host)) || self.no_proxy.matches(&host, port) {
            return Ok(None);
        }
        proxy.as_ref().map(Some).map_err(Clone::clone)
    }

    /// The proxy for a URL (see [`Self::for_target`]).
    pub fn for_url(&self, url: &url::Url) -> Result<Option<&Proxy>, String> {
        match (url.host_str(), url.port_or_known_default()) {
            (Some(host), Some(port)) => self.for_target(url.scheme(), host, port),
            _ => Ok(None),
        }
    }

    /// Decoded proxy passwords and raw credentials, for the log redactor.
    pub fn secrets(&self) -> Vec<String> {
        let mut v = Vec::new();
        for p in [&self.https, &self.http]
            .into_iter()
            .flatten()
            .filter_map(|p| p.as_ref().ok())
        {
            for s in [&p.password, &p.userinfo, &p.authorization]
                .into_iter()
                .flatten()
            {
                v.push(s.expose().to_string());
            }
        }
        v
    }
}

/// `localhost`, `*.localhost`, and loopback addresses.
fn is_loopback(host: &str) -> bool {
    if host == "localhost" || host.ends_with(".localhost") {
        return true;
    }
    match host.parse::<IpAddr>() {
        Ok(IpAddr::V4(ip)) => ip.is_loopback(),
        Ok(IpAddr::V6(ip)) => {
            ip.is_loopback() || ip.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback())
        }
        Err(_) => false,
    }
}

/// `host:port`, bracketing IPv6.
fn authority(host: &str, port: u16) -> String {
    if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

/// `raw` with anything that may be credentials replaced.
fn masked(raw: &str) -> String {
    let raw = crate::coderd::one_line(raw, 200);
    match raw.rfind('@') {
        Some(at) => {
            let start = raw.find("://").map(|i| i + 3).unwrap_or(0).min(at);
            format!("{}***{}", &raw[..start], &raw[at..])
        }
        None => raw,
    }
}

fn parse_proxy(var: &'static str, raw: &str) -> Result<Proxy, String> {
    let raw = raw.trim();
    let with_scheme = if raw.contains("://") {
        raw.to_string()
    } else {
        format!("http://{raw}")
    };
    let bad = |why: &str| format!("{var}={} is not a usable proxy: {why}", masked(raw));
    let url = url::Url::parse(&with_scheme).map_err(|e| bad(&e.to_string()))?;
    match url.scheme() {
        "http" => {}
        "https" => {
            return Err(bad(
                "TLS to the proxy (https://) is not supported; use the proxy's plain http:// port",
            ))
        }
        s => {
            return Err(bad(&format!(
                "only HTTP proxies (http://HOST:PORT) are supported, not {s}://"
            )))
        }
    }
    let host = match url.host() {
        Some(url::Host::Domain(d)) if !d.is_empty() => d.to_string(),
        Some(url::Host::Ipv4(ip)) => ip.to_string(),
        Some(url::Host::Ipv6(ip)) => ip.to_string(),
        _ => return Err(bad("it has no host")),
    };
    let port = url.port().unwrap_or(80);
    let (userinfo, authorization, password) =
        if url.username().is_empty() && url.password().is_none() {
            (None, None, None)
        } else {
            let decode = |s: &str| {
                percent_decode(s)
                    .ok_or_else(|| bad("its credentials are not valid percent-encoded UTF-8"))
            };
            let user = decode(url.username())?;
            let pass = decode(url.password().unwrap_or(""))?;
            let info = match url.password() {
                Some(p) => format!("{}:{p}", url.username()),
                None => url.username().to_string(),
            };
            let basic = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}"));
            (
                Some(Secret::new(info)),
                Some(Secret::new(format!("Basic {basic}"))),
                (!pass.is_empty()).then(|| Secret::new(pass)),
            )
        };
    Ok(Proxy {
        var,
        host,
        port,
        userinfo,
        authorization,
        password,
    })
}

fn percent_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = std::str::from_utf8(b.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// Parsed `NO_PROXY`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NoProxy {
    all: bool,
    entries: Vec<NoProxyEntry>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum NoProxyEntry {
    Cidr {
        net: IpAddr,
        bits: u8,
    },
    Ip {
        ip: IpAddr,
        port: Option<u16>,
    },
    /// `suffix` starts with `.`; `exact` also matches the name itself.
    Domain {
        suffix: String,
        exact: bool,
        port: Option<u16>,
    },
}

impl NoProxy {
    /// Parse a `NO_PROXY` value; entries that make no sense are skipped,
    /// as Go and curl do.
    pub fn parse(s: &str) -> NoProxy {
        let mut np = NoProxy::default();
        for entry in s.split(',') {
            let e = entry.trim().to_ascii_lowercase();
            if e.is_empty() {
                continue;
            }
            if e == "*" {
                np.all = true;
                continue;
            }
            if let Some((net, bits)) = parse_cidr(&e) {
                np.entries.push(NoProxyEntry::Cidr { net, bits });
                continue;
            }
            let (host, port) = split_port(&e);
            let host = host.trim_start_matches('[').trim_end_matches(']');
            if host.is_empty() {
                continue;
            }
            if let Ok(ip) = host.parse::<IpAddr>() {
                np.entries.push(NoProxyEntry::Ip { ip, port });
                continue;
            }
            let host = host.strip_prefix('*').unwrap_or(host);
            let host = host.trim_end_matches('.');
            if host.is_empty() || host == "." {
                continue;
            }
            let (suffix, exact) = match host.strip_prefix('.') {
                Some(_) => (host.to_string(), false),
                None => (format!(".{host}"), true),
            };
            np.entries.push(NoProxyEntry::Domain {
                suffix,
                exact,
                port,
            });
        }
        np
    }

    /// Whether `host` (lower-case, no brackets) at `port` bypasses the proxy.
    pub fn matches(&self, host: &str, port: u16) -> bool {
        if self.all {
            return true;
        }
        let ip = host.parse::<IpAddr>().ok();
        let port_ok = |p: &Option<u16>| p.is_none_or(|p| p == port);
        self.entries.iter().any(|e| match e {
            NoProxyEntry::Cidr { net, bits } => ip.is_some_and(|ip| in_cidr(ip, *net, *bits)),
            NoProxyEntry::Ip { ip: want, port: p } => {
                ip.is_some_and(|ip| same_ip(ip, *want)) && port_ok(p)
            }
            NoProxyEntry::Domain {
                suffix,
                exact,
                port: p,
            } => {
                (host.ends_with(suffix.as_str()) || (*exact && host == &suffix[1..])) && port_ok(p)
            }
        })
    }
}

/// `host:port` → (host, Some(port)); anything else → (s, None).
fn split_port(s: &str) -> (&str, Option<u16>) {
    if let Some(rest) = s.strip_prefix('[') {
        if let Some((h, p)) = rest.split_once("]:") {
            if let Ok(p) = p.parse() {
                return (h, Some(p));
            }
        }
        return (s, None);
    }
    // A bare IPv6 address has several colons and no port.
    if s.matches(':').count() == 1 {
        if let Some((h, p)) = s.rsplit_once(':') {
            if let Ok(p) = p.parse() {
                return (h, Some(p));
            }
        }
    }
    (s, None)
}

fn parse_cidr(s: &str) -> Option<(IpAddr, u8)> {
    let (ip, bits) = s.split_once('/')?;
    let ip: IpAddr = ip.parse().ok()?;
    let bits: u8 = bits.parse().ok()?;
    let max = if ip.is_ipv4() { 32 } else { 128 };
    (bits <= max).then_some((ip, bits))
}

fn same_ip(a: IpAddr, b: IpAddr) -> bool {
    canonical(a) == canonical(b)
}

/// IPv4-mapped IPv6 as IPv4 (Go's `net.IP.Equal` treats them as equal).
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

fn in_cidr(ip: IpAddr, net: IpAddr, bits: u8) -> bool {
    match (canonical(ip), canonical(net)) {
        (IpAddr::V4(a), IpAddr::V4(n)) => prefix_eq(&a.octets(), &n.octets(), bits),
        (IpAddr::V6(a), IpAddr::V6(n)) => prefix_eq(&a.octets(), &n.octets(), bits),
        _ => false,
    }
}

fn prefix_eq(a: &[u8], b: &[u8], bits: u8) -> bool {
    let full = usize::from(bits / 8);
    if a[..full] != b[..full] {
        return false;
    }
    let rest = bits % 8;
    rest == 0 || {
        let mask = 0xffu8 << (8 - rest);
        (a[full] & mask) == (b[full] & mask)
    }
}

/// Why going through the proxy failed.
#[derive(Clone, Debug, thiserror::Error)]
#[error("{}", self.text())]
pub struct ProxyError {
    /// `host:port` of the proxy (never its credentials).
    pub proxy: String,
    /// The variable that named it.
    pub var: &'static str,
    pub kind: ProxyErrorKind,
}

/// What went wrong with the proxy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ProxyErrorKind {
    /// No TCP connection to the proxy (refused, unresolvable, unreachable,
    /// timed out).
    Unreachable(String),
    /// 407 and we sent no credentials.
    AuthRequired,
    /// 407 although we sent credentials.
    AuthRejected,
    /// CONNECT answered with another status.
    Refused {
        target: String,
        status: u16,
        reason: String,
    },
    /// The proxy closed the connection or broke mid-answer.
    Broken(String),
    /// The answer is not HTTP.
    NotHttp,
}

impl ProxyError {
    fn text(&self) -> String {
        let (p, v) = (&self.proxy, self.var);
        match &self.kind {
            ProxyErrorKind::Unreachable(cause) => {
                format!("cannot reach the HTTP proxy {p} (from {v}): {cause}; check {v}")
            }
            ProxyErrorKind::AuthRequired => format!(
                "the HTTP proxy {p} (from {v}) requires authentication (HTTP 407); put the credentials in {v}: http://USER:PASSWORD@{p}"
            ),
            ProxyErrorKind::AuthRejected => {
                format!("the HTTP proxy {p} (from {v}) rejected the credentials in {v}")
            }
            ProxyErrorKind::Refused {
                target,
                status,
                reason,
            } if *status >= 500 => format!(
                "the HTTP proxy {p} (from {v}) could not reach {target}: HTTP {status} {reason}"
            ),
            ProxyErrorKind::Refused {
                target,
                status,
                reason,
            } => format!(
                "the HTTP proxy {p} (from {v}) refused to connect to {target}: HTTP {status} {reason}"
            ),
            ProxyErrorKind::Broken(cause) => {
                format!("the HTTP proxy {p} (from {v}) broke off the CONNECT: {cause}")
            }
            ProxyErrorKind::NotHttp => format!(
                "the HTTP proxy {p} (from {v}) did not answer CONNECT in HTTP; is {v} an HTTP proxy?"
            ),
        }
    }

    /// A proxy that cannot reach coderd (5xx) or broke off may recover;
    /// a missing proxy, refused credentials or a policy refusal will not.
    pub fn is_transient(&self) -> bool {
        match &self.kind {
            ProxyErrorKind::Refused { status, .. } => *status >= 500 || *status == 429,
            ProxyErrorKind::Broken(_) => true,
            ProxyErrorKind::Unreachable(_)
            | ProxyErrorKind::AuthRequired
            | ProxyErrorKind::AuthRejected
            | ProxyErrorKind::NotHttp => false,
        }
    }

    /// A TCP connection to the proxy failed.
    pub fn unreachable(proxy: &Proxy, cause: String) -> ProxyError {
        proxy.error(ProxyErrorKind::Unreachable(cause))
    }

    /// The proxy answered 407.
    pub fn auth(proxy: &Proxy) -> ProxyError {
        proxy.error(if proxy.has_credentials() {
            ProxyErrorKind::AuthRejected
        } else {
            ProxyErrorKind::AuthRequired
        })
    }

    /// The proxy broke off.
    pub fn broken(proxy: &Proxy, cause: String) -> ProxyError {
        proxy.error(ProxyErrorKind::Broken(cause))
    }
}

/// Open a TCP connection through `proxy` to `host:port` with `CONNECT`.
/// The caller bounds the time.
pub async fn connect(proxy: &Proxy, host: &str, port: u16) -> Result<TcpStream, ProxyError> {
    let mut tcp = TcpStream::connect((proxy.host.as_str(), proxy.port))
        .await
        .map_err(|e| ProxyError::unreachable(proxy, e.to_string()))?;
    tcp.set_nodelay(true).ok();
    let target = authority(host, port);
    log::debug!("CONNECT {target} via the HTTP proxy {proxy:?}");
    let mut req = format!(
        "CONNECT {target} HTTP/1.1\r\nHost: {target}\r\nUser-Agent: coder-proxy/{}\r\n",
        env!("CARGO_PKG_VERSION")
    );
    if let Some(a) = &proxy.authorization {
        req.push_str("Proxy-Authorization: ");
        req.push_str(a.expose());
        req.push_str("\r\n");
    }
    req.push_str("\r\n");
    tcp.write_all(req.as_bytes())
        .await
        .map_err(|e| ProxyError::broken(proxy, e.to_string()))?;
    // Byte by byte: nothing past the head may be consumed, and the head is
    // short and read once per connection.
    let mut head = Vec::with_capacity(256);
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if head.len() >= MAX_HEAD {
            return Err(proxy.error(ProxyErrorKind::NotHttp));
        }
        match tcp.read(&mut byte).await {
            Ok(0) => {
                return Err(ProxyError::broken(
                    proxy,
                    "the connection closed before the answer".into(),
                ))
            }
            Ok(_) => head.push(byte[0]),
            Err(e) => return Err(ProxyError::broken(proxy, e.to_string())),
        }
        if head.len() == 5 && &head[..] != b"HTTP/" {
            return Err(proxy.error(ProxyErrorKind::NotHttp));
        }
    }
    let text = String::from_utf8_lossy(&head[..head.len() - 4]);
    let parsed = coder_tailnet::http1::parse_response_head(&text)
        .map_err(|_| proxy.error(ProxyErrorKind::NotHttp))?;
    let status = parsed.code;
    let reason = crate::coderd::one_line(parsed.reason.trim(), 80);
    log::debug!("CONNECT {target}: HTTP {status} {reason}");
    match status {
        200..=299 => Ok(tcp),
        // tinyproxy answers wrong credentials with 401, not 407.
        401 | 407 => Err(ProxyError::auth(proxy)),
        _ => Err(proxy.error(ProxyErrorKind::Refused {
            target,
            status,
            reason,
        })),
    }
}

/// [`connect`] within `limit`; running out of time counts as the proxy
/// breaking off (it accepted the connection but did not answer).
pub async fn connect_within(
    proxy: &Proxy,
    host: &str,
    port: u16,
    limit: Duration,
) -> Result<TcpStream, ProxyError> {
    tokio::time::timeout(limit, connect(proxy, host, port))
        .await
        .unwrap_or_else(|_| {
            Err(ProxyError::broken(
                proxy,
                format!("no answer to CONNECT within {}s", limit.as_secs()),
            ))
        })
}

/// For unit tests elsewhere: a proxy at `host:port` without credentials.
#[cfg(test)]
pub(crate) fn test_proxy(host: std::net::Ipv4Addr, port: u16) -> Proxy {
    Proxy {
        var: "HTTP_PROXY",
        host: host.to_string(),
        port,
        userinfo: None,
        authorization: None,
        password: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;
    use std::net::{Ipv4Addr, Ipv6Addr};

    fn env(vars: &[(&str, &str)]) -> ProxyEnv {
        let m: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        ProxyEnv::from_vars(|k| m.get(k).cloned())
    }

    fn via(e: &ProxyEnv, url: &str) -> Option<String> {
        e.for_url(&url::Url::parse(url).unwrap())
            .unwrap()
            .map(|p| p.addr())
    }

    #[test]
    fn scheme_picks_the_variable_upper_case_first_all_proxy_last() {
        let e = env(&[
            ("HTTPS_PROXY", "http://secure:3128"),
            ("https_proxy", "http://lower:1"),
            ("http_proxy", "plain:8080"),
            ("ALL_PROXY", "http://fallback:9"),
        ]);
        assert_eq!(
            via(&e, "https://coder.example.com").as_deref(),
            Some("secure:3128")
        );
        assert_eq!(
            via(&e, "http://coder.example.com").as_deref(),
            Some("plain:8080")
        );
        assert_eq!(
            via(&e, "wss://coder.example.com/x").as_deref(),
            Some("secure:3128")
        );
        let e = env(&[("all_proxy", "fallback"), ("HTTPS_PROXY", "")]);
        assert_eq!(via(&e, "https://c.example").as_deref(), Some("fallback:80"));
        assert_eq!(via(&e, "http://c.example").as_deref(), Some("fallback:80"));
        assert!(env(&[]).is_empty());
    }

    #[test]
    fn cgi_ignores_upper_case_http_proxy() {
        let e = env(&[("REQUEST_METHOD", "GET"), ("HTTP_PROXY", "evil:1")]);
        assert_eq!(via(&e, "http://c.example"), None);
    }

    #[test]
    fn loopback_is_direct_unless_opted_in() {
        let e = env(&[("HTTP_PROXY", "p:1"), ("HTTPS_PROXY", "p:1")]);
        for u in [
            "http://localhost:3000",
            "http://LOCALHOST.:3000",
            "http://dev.localhost",
            "http://127.0.0.1:3000",
            "http://127.9.9.9",
            "http://[::1]:3000",
            "https://[::ffff:127.0.0.1]",
        ] {
            assert_eq!(via(&e, u), None, "{u}");
        }
        assert_eq!(via(&e, "http://10.0.0.1").as_deref(), Some("p:1"));
        assert_eq!(
            via(&e, "http://localhost.example.com").as_deref(),
            Some("p:1")
        );
        let e = env(&[("HTTP_PROXY", "p:1"), (LOOPBACK_VAR, "1")]);
        assert_eq!(via(&e, "http://127.0.0.1:3000").as_deref(), Some("p:1"));
    }

    #[test]
    fn no_proxy_matches_as_go_does() {
        let np = NoProxy::parse(
            " example.com, .sub.org ,*.star.net, 10.0.0.0/8, 192.168.1.5:8080, [fd00::1]:443, ::2, port.io:444, , :99",
        );
        let m = |h: &str, p: u16| np.matches(h, p);
        assert!(m("example.com", 443) && m("a.b.example.com", 80));
        assert!(!m("notexample.com", 443));
        assert!(m("x.sub.org", 443) && !m("sub.org", 443));
        assert!(m("a.star.net", 1) && !m("star.net", 1));
        assert!(m("10.1.2.3", 1) && !m("11.0.0.1", 1));
        assert!(m("192.168.1.5", 8080) && !m("192.168.1.5", 80));
        assert!(m("fd00::1", 443) && !m("fd00::1", 80));
        assert!(m("::2", 1));
        assert!(m("port.io", 444) && !m("port.io", 443));
        assert!(!m("99", 99));
        assert!(NoProxy::parse("*").matches("anything", 1));
        assert!(NoProxy::parse("::ffff:10.0.0.1").matches("10.0.0.1", 1));
        assert!(NoProxy::parse("fd00::/16").matches("fd00:1::5", 1));
        assert!(!NoProxy::parse("10.0.0.0/33").matches("10.0.0.1", 1));
    }

    #[test]
    fn no_proxy_from_the_environment_applies() {
        let e = env(&[
            ("HTTPS_PROXY", "p:1"),
            ("no_proxy", "Coder.Example.com:443"),
        ]);
        assert_eq!(via(&e, "https://coder.example.com"), None);
        assert_eq!(
            via(&e, "https://coder.example.com:8443").as_deref(),
            Some("p:1")
        );
    }

    #[test]
    fn credentials_become_basic_auth_and_never_print() {
        let e = env(&[("HTTPS_PROXY", "http://us%40er:p%3Ass@proxy.corp:3128")]);
        let p = e.for_target("https", "c.example", 443).unwrap().unwrap();
        assert_eq!(
            p.authorization.as_ref().unwrap().expose(),
            format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode("us@er:p:ss")
            )
        );
        assert_eq!(
            p.url_with_credentials(),
            "http://us%40er:p%3Ass@proxy.corp:3128"
        );
        let shown = format!("{p:?} {e:?}");
        assert!(
            !shown.contains("p%3Ass") && !shown.contains("p:ss"),
            "{shown}"
        );
        assert!(e.secrets().iter().any(|s| s == "p:ss"));
    }

    #[test]
    fn an_unusable_proxy_matters_only_where_it_applies() {
        let e = env(&[
            ("ALL_PROXY", "socks5://127.0.0.1:1080"),
            ("HTTPS_PROXY", "http://p:3128"),
            ("NO_PROXY", "direct.example"),
        ]);
        assert_eq!(via(&e, "https://c.example").as_deref(), Some("p:3128"));
        assert!(e.for_target("http", "c.example", 80).is_err());
        assert_eq!(via(&e, "http://direct.example"), None);
        assert_eq!(via(&e, "http://127.0.0.1:3000"), None);
    }

    #[test]
    fn unusable_proxies_are_refused_without_echoing_credentials() {
        for (v, needle) in [
            ("socks5://user:hunter22@127.0.0.1:1080", "only HTTP proxies"),
            ("https://user:hunter22@proxy:443", "TLS to the proxy"),
            ("http://user:hunter22@", "hunter22"),
            ("http://[::1", "not a usable proxy"),
        ] {
            let err = env(&[("HTTPS_PROXY", v)])
                .for_target("https", "c.example", 443)
                .unwrap_err();
            assert!(err.starts_with("HTTPS_PROXY="), "{err}");
            if needle == "hunter22" {
                assert!(!err.contains(needle), "{err}");
            } else {
                assert!(err.contains(needle), "{err}");
                assert!(!err.contains("hunter22"), "{err}");
            }
        }
    }

    /// A one-shot fake proxy answering `answer` to whatever it is sent, and
    /// handing back what it received.
    async fn fake_proxy(answer: &'static [u8]) -> (u16, tokio::task::JoinHandle<Vec<u8>>) {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        let h = tokio::spawn(async move {
            let (mut s, _) = l.accept().await.unwrap();
            let mut got = Vec::new();
            let mut buf = [0u8; 1024];
            while !got.ends_with(b"\r\n\r\n") {
                let n = s.read(&mut buf).await.unwrap();
                if n == 0 {
                    break;
                }
                got.extend_from_slice(&buf[..n]);
            }
            let _ = s.write_all(answer).await;
            let _ = s.write_all(b"tunnelled").await;
            got
        });
        (port, h)
    }

    #[tokio::test]
    async fn connect_tunnels_on_200_with_basic_auth() {
        let (port, seen) =
            fake_proxy(b"HTTP/1.1 200 Connection established\r\nVia: x\r\n\r\n").await;
        let e = env(&[("HTTPS_PROXY", &format!("http://u:pw@127.0.0.1:{port}"))]);
        let p = e
            .for_target("https", "coder.example.com", 443)
            .unwrap()
            .unwrap();
        let mut s = connect(p, "coder.example.com", 443).await.unwrap();
        let mut rest = Vec::new();
        s.read_to_end(&mut rest).await.unwrap();
        assert_eq!(rest, b"tunnelled", "bytes after the head are the tunnel's");
        let req = String::from_utf8(seen.await.unwrap()).unwrap();
        assert!(
            req.starts_with("CONNECT coder.example.com:443 HTTP/1.1\r\n"),
            "{req}"
        );
        assert!(
            req.contains("Proxy-Authorization: Basic dTpwdw==\r\n"),
            "{req}"
        );
    }

    #[tokio::test]
    async fn connect_refusals_are_typed() {
        for (answer, transient, needle) in [
            (
                &b"HTTP/1.0 407 Proxy Authentication Required\r\n\r\n"[..],
                false,
                "requires authentication",
            ),
            (
                b"HTTP/1.0 403 Access denied\r\n\r\n",
                false,
                "refused to connect to h:443: HTTP 403 Access denied",
            ),
            (
                b"HTTP/1.1 502 Bad Gateway\r\n\r\n",
                true,
                "could not reach h:443: HTTP 502",
            ),
            (
                b"SSH-2.0-not-a-proxy\r\n",
                false,
                "did not answer CONNECT in HTTP",
            ),
        ] {
            let (port, _seen) = fake_proxy(answer).await;
            let p = test_proxy(Ipv4Addr::LOCALHOST, port);
            let e = connect(&p, "h", 443).await.unwrap_err();
            assert_eq!(e.is_transient(), transient, "{e}");
            let text = e.to_string();
            assert!(text.contains(needle), "{text}");
            assert!(text.contains(&format!("127.0.0.1:{port}")), "{text}");
        }
        let closed = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let e = connect(&test_proxy(Ipv4Addr::LOCALHOST, closed), "h", 443)
            .await
            .unwrap_err();
        assert!(!e.is_transient());
        assert!(
            e.to_string()
                .starts_with("cannot reach the HTTP proxy 127.0.0.1:"),
            "{e}"
        );
    }

    #[test]
    fn ipv6_targets_are_bracketed() {
        assert_eq!(authority("fd00::1", 443), "[fd00::1]:443");
        assert_eq!(authority(&Ipv6Addr::LOCALHOST.to_string(), 1), "[::1]:1");
    }
}
