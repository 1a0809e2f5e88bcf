//! The native tailnet transport: reach the agent the way `coder ssh` does
//! (coordinate websocket, DERP relay, WireGuard, TCP to port 1) with no
//! Coder CLI installed.
//!
//! The protocol work lives in the `coder-tailnet` crate; this file supplies
//! what only coder-proxy knows: the deployment URL, the session token and
//! `--header`s, and how to dial (TLS with system roots, through the HTTP
//! proxy the environment names; DERP over an HTTP upgrade, falling back to
//! a websocket when the relay refuses it or the deployment forces
//! websockets). Dial failures keep their type ([`net::DialError`],
//! [`crate::coderd::ApiError`], [`coder_tailnet::derp::UpgradeError`])
//! through anyhow's context chain so [`super::is_transient`] can classify
//! them.

use std::sync::Arc;

use anyhow::{Context, Result};
use reqwest::header::{HeaderName, HeaderValue};
use url::Url;

use coder_tailnet::client::{self, BoxFuture, BoxIo, Dialer};
use coder_tailnet::derpmap::{DerpMap, DerpTarget};
use coder_tailnet::proto::PeerId;

use super::{net, DialTarget, Permanent};
use crate::coderd::Client;
use crate::proxy::ProxyEnv;

/// Dials coderd and its DERP relays for one agent.
struct CoderDialer {
    base: Url,
    agent_id: String,
    headers: Vec<(HeaderName, HeaderValue)>,
    force_websockets: bool,
    proxies: Arc<ProxyEnv>,
}

impl Dialer for CoderDialer {
    fn coordinate(&self, resume_token: Option<String>) -> BoxFuture<Result<BoxIo>> {
        let mut url = self.base.clone();
        url.set_path(&format!(
            "/api/v2/workspaceagents/{}/coordinate",
            self.agent_id
        ));
        url.query_pairs_mut().append_pair("version", "2.0");
        if let Some(t) = resume_token {
            url.query_pairs_mut().append_pair("resume_token", &t);
        }
        let headers = self.headers.clone();
        let proxies = self.proxies.clone();
        Box::pin(async move {
            let ws = net::websocket(&proxies, &url, &headers, None).await?;
            Ok(Box::new(ws) as BoxIo)
        })
    }

    fn fix_map(&self, map: &mut DerpMap) {
        rewrite_to_base(map, &self.base);
    }

    fn derp(&self, t: DerpTarget) -> BoxFuture<Result<BoxIo>> {
        // The relay needs no token; only the deployment's own headers.
        let headers: Vec<(HeaderName, HeaderValue)> = self
            .headers
            .iter()
            .filter(|(k, _)| k.as_str() != "coder-session-token")
            .cloned()
            .collect();
        let force_ws = self.force_websockets;
        let proxies = self.proxies.clone();
        Box::pin(async move {
            let url = Url::parse(&t.url()).context("DERP URL")?;
            if !force_ws {
                let io = net::connect(&proxies, t.scheme == "https", &t.dial_host, t.port, &t.host)
                    .await
                    .with_context(|| format!("DERP relay {}", t.url()))?;
                let host_header = if (t.scheme == "https" && t.port == 443)
                    || (t.scheme == "http" && t.port == 80)
                {
                    t.host.clone()
                } else {
                    format!("{}:{}", t.host, t.port)
                };
                let text_headers: Vec<(String, String)> = headers
                    .iter()
                    .filter_map(|(k, v)| Some((k.to_string(), v.to_str().ok()?.to_string())))
                    .collect();
                match coder_tailnet::derp::upgrade(io, &host_header, &text_headers).await {
                    Ok((up, _)) => return Ok(Box::new(up) as BoxIo),
                    Err(e) if e.should_try_websocket() => {
                        log::info!("tailnet: DERP upgrade refused ({e}); trying a websocket");
                    }
                    Err(e) => {
                        return Err(
                            anyhow::Error::new(e).context(format!("DERP upgrade at {}", t.url()))
                        )
                    }
                }
            }
            let ws = net::websocket(&proxies, &url, &headers, Some("derp"))
                .await
                .context("DERP websocket")?;
            Ok(Box::new(ws) as BoxIo)
        })
    }
}

/// Point the embedded relay at the deployment URL we use (as Coder's SDK does).
fn rewrite_to_base(map: &mut DerpMap, base: &Url) {
    if let Some(host) = base.host_str() {
        let port = base.port_or_known_default().unwrap_or(443);
        map.rewrite_embedded_relay(base.scheme(), host, port);
    }
}

/// Open a stream to the agent's SSH server over tailnet.
pub async fn dial(client: &Client, t: &DialTarget) -> Result<client::Tunnel> {
    let started = std::time::Instant::now();
    let agent_id = PeerId::parse(&t.agent_id)
        .map_err(|e| Permanent(format!("agent id {:?} is not a UUID: {e}", t.agent_id)))?;
    let mut info = client
        .agent_connection_info(&t.agent_id)
        .await
        .context("get agent connection info")?;
    log::debug!(
        "tailnet: connection info in {}ms",
        started.elapsed().as_millis()
    );
    let base = client.base().clone();
    rewrite_to_base(&mut info.derp_map, &base);
    log::debug!(
        "tailnet: {} DERP region(s), home {:?}",
        info.derp_map.regions.len(),
        info.derp_map.home_region()
    );
    if info.derp_map.home_region().is_none() {
        return Err(Permanent(
            "the deployment's DERP map has no usable region; ask the Coder admin to check the DERP settings"
                .into(),
        )
        .into());
    }
    let dialer = CoderDialer {
        base,
        agent_id: t.agent_id.clone(),
        headers: client.upgrade_headers().to_vec(),
        force_websockets: info.derp_force_websockets,
        proxies: client.proxies().clone(),
    };
    let cfg = client::Config::new(agent_id, info.derp_map);
    client::connect(Arc::new(dialer), cfg).await
}
