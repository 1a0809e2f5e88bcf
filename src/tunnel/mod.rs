//! Transports to the agent's SSH server, behind one `dial` entry point.
//!
//! Each transport lives in its own file; [`Tunnel`] picks one from
//! `--tunnel`. They all yield a byte stream to the agent's SSH server, and
//! none of them knows anything about SSH.

pub mod coder_connect;
pub mod net;
pub mod tailnet;
pub mod tcp;

use std::time::Duration;

use anyhow::{bail, Result};
use tokio::net::TcpStream;

use crate::coderd::Client;

/// What to dial: the names the host resolved to.
#[derive(Clone, Debug)]
pub struct DialTarget {
    pub owner: String,
    pub workspace: String,
    pub agent: String,
    pub agent_id: String,
}

/// A byte stream to the agent's SSH server.
pub enum AgentStream {
    /// A kernel TCP connection (tcp:// and Coder Connect).
    Tcp(TcpStream),
    /// A TCP connection inside our own WireGuard tunnel.
    Tailnet(coder_tailnet::client::Tunnel),
}

/// Bound on one TCP connect.
pub const DIAL_TIMEOUT: Duration = Duration::from_secs(10);

/// The transport chosen by `--tunnel`.
#[derive(Clone, Debug)]
pub enum Tunnel {
    /// `tcp://HOST:PORT` with `{agent}`, `{workspace}`, `{owner}` placeholders.
    Tcp(tcp::Template),
    /// Coder Connect only (fail if it is not running).
    CoderConnect,
    /// The native tailnet transport (DERP + WireGuard).
    Tailnet,
    /// Coder Connect when present, else tailnet.
    Auto,
}

impl Tunnel {
    /// Parse `--tunnel`.
    pub fn parse(s: &str) -> Result<Tunnel> {
        match s.trim() {
            "" | "auto" => Ok(Tunnel::Auto),
            "coder-connect" => Ok(Tunnel::CoderConnect),
            "tailnet" => Ok(Tunnel::Tailnet),
            t if t.starts_with("tcp://") => Ok(Tunnel::Tcp(tcp::Template::parse(t)?)),
            t => bail!(
                "invalid --tunnel {:?}: use auto, coder-connect, tailnet or tcp://HOST:PORT",
                crate::coderd::one_line(t, 80)
            ),
        }
    }

    /// Open a stream to the agent's SSH server.
    pub async fn dial(&self, client: &Client, t: &DialTarget) -> Result<AgentStream> {
        match self {
            Tunnel::Tcp(tpl) => tpl.dial(t).await.map(AgentStream::Tcp),
            Tunnel::CoderConnect => match coder_connect::find(client, t).await? {
                Some(addr) => coder_connect::dial(addr).await.map(AgentStream::Tcp),
                None => bail!(
                    "Coder Connect is not serving {}; start Coder Desktop / 'coder vpn', or use --tunnel tailnet (or --tunnel tcp://HOST:PORT)",
                    coder_connect::hostname(t, "coder")
                ),
            },
            Tunnel::Tailnet => tailnet::dial(client, t).await.map(AgentStream::Tailnet),
            Tunnel::Auto => match coder_connect::find(client, t).await {
                Ok(Some(addr)) => {
                    log::info!("using Coder Connect at [{addr}]:22");
                    coder_connect::dial(addr).await.map(AgentStream::Tcp)
                }
                Ok(None) => tailnet::dial(client, t).await.map(AgentStream::Tailnet),
                Err(e) => {
                    log::debug!("Coder Connect check failed ({e:#}); using tailnet");
                    tailnet::dial(client, t).await.map(AgentStream::Tailnet)
                }
            },
        }
    }
}
