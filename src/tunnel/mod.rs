//! Transports to the agent's SSH server, behind one `dial` entry point.
//!
//! Each transport lives in its own file; [`Tunnel`] picks one from
//! `--tunnel`. They all yield a byte stream to the agent's SSH server, and
//! none of them knows anything about SSH.

pub mod coder_connect;
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

/// Bound on one TCP connect.
pub const DIAL_TIMEOUT: Duration = Duration::from_secs(10);

/// The transport chosen by `--tunnel`.
#[derive(Clone, Debug)]
pub enum Tunnel {
    /// `tcp://HOST:PORT` with `{agent}`, `{workspace}`, `{owner}` placeholders.
    Tcp(tcp::Template),
    /// Coder Connect only (fail if it is not running).
    CoderConnect,
    /// The native tailnet transport (not built yet).
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
    pub async fn dial(&self, client: &Client, t: &DialTarget) -> Result<TcpStream> {
        match self {
            Tunnel::Tcp(tpl) => tpl.dial(t).await,
            Tunnel::CoderConnect => match coder_connect::find(client, t).await? {
                Some(addr) => coder_connect::dial(addr).await,
                None => bail!(
                    "Coder Connect is not serving {}; start Coder Desktop / 'coder vpn', or use --tunnel tcp://HOST:PORT",
                    coder_connect::hostname(t, "coder")
                ),
            },
            Tunnel::Tailnet => bail!(no_tailnet()),
            Tunnel::Auto => match coder_connect::find(client, t).await? {
                Some(addr) => {
                    log::info!("using Coder Connect at [{addr}]:22");
                    coder_connect::dial(addr).await
                }
                None => bail!(
                    "Coder Connect is not running and {}",
                    no_tailnet()
                ),
            },
        }
    }
}

fn no_tailnet() -> &'static str {
    "the native tailnet transport is not available in this build yet; start Coder Connect (Coder Desktop or 'coder vpn'), or pass --tunnel tcp://HOST:PORT to reach the agent's SSH server directly (see README)"
}
