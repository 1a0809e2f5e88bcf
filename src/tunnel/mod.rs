//! Transports to the agent's SSH server, behind one `dial` entry point.
//!
//! Each transport lives in its own file; [`Tunnel`] picks one from
//! `--tunnel`. They all yield a byte stream to the agent's SSH server, and
//! none of them knows anything about SSH. Their errors stay typed where
//! they arise, and [`is_transient`] is the one place that decides whether a
//! failed dial is worth retrying.

pub mod coder_connect;
pub mod net;
pub mod tailnet;
pub mod tcp;

use std::time::Duration;

use anyhow::{bail, Result};
use tokio::net::TcpStream;

use crate::coderd::{ApiError, Client};
use crate::proxy::ProxyError;

/// A dial failure no retry can fix, raised where no typed error exists.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Permanent(pub String);

/// Whether retrying a failed dial can succeed.
///
/// The outermost typed error in the chain decides: coderd's REST answers
/// ([`ApiError`]: 5xx, 429 and network trouble retry; 4xx do not), our own
/// dials ([`net::DialError`]: refused connections, DNS, timeouts, 5xx on an
/// upgrade retry; 4xx, bad certificates do not), the HTTP proxy
/// ([`ProxyError`]), DERP's HTTP upgrade, and I/O errors (retry). What is
/// left — a coordinator that never sent the agent's node, a relay login
/// that broke off — is the network or the agent settling, and is retried
/// within `--wait-timeout`. [`Permanent`] marks the rest.
pub fn is_transient(e: &anyhow::Error) -> bool {
    for cause in e.chain() {
        if let Some(e) = cause.downcast_ref::<ApiError>() {
            return e.is_transient();
        }
        if let Some(e) = cause.downcast_ref::<net::DialError>() {
            return e.is_transient();
        }
        if let Some(e) = cause.downcast_ref::<ProxyError>() {
            return e.is_transient();
        }
        if let Some(e) = cause.downcast_ref::<coder_tailnet::derp::UpgradeError>() {
            return match e {
                coder_tailnet::derp::UpgradeError::Status { code, .. } => {
                    *code >= 500 || *code == 429
                }
                coder_tailnet::derp::UpgradeError::Io(_) => true,
                _ => false,
            };
        }
        if cause.downcast_ref::<Permanent>().is_some() {
            return false;
        }
        if cause.downcast_ref::<std::io::Error>().is_some() {
            return true;
        }
    }
    true
}

/// What a permanent tailnet refusal means for the user, when coderd's answer
/// alone would mislead: coderd checks the right to SSH into a workspace on
/// the coordinate endpoint, and answers 404 (or 403) there to a user who may
/// see the workspace but not connect to it.
pub fn refusal_hint(e: &anyhow::Error, t: &DialTarget) -> Option<String> {
    let refused = e
        .chain()
        .find_map(|c| match c.downcast_ref::<net::DialError>() {
            Some(net::DialError::Refused { path, status, .. }) if path.ends_with("/coordinate") => {
                Some(*status)
            }
            _ => None,
        })?;
    match refused {
        403 | 404 => Some(format!(
            "your account may not have permission to SSH into {}/{} (coderd refused the connection to its agent {:?}); ask the workspace's owner or an admin",
            t.owner, t.workspace, t.agent
        )),
        _ => None,
    }
}

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

    /// How messages name the transport ("over tailnet").
    pub fn describe(&self) -> &'static str {
        match self {
            Tunnel::Tcp(_) => "over tcp://",
            Tunnel::CoderConnect => "over Coder Connect",
            Tunnel::Tailnet | Tunnel::Auto => "over tailnet",
        }
    }

    /// Open a stream to the agent's SSH server.
    pub async fn dial(&self, client: &Client, t: &DialTarget) -> Result<AgentStream> {
        match self {
            Tunnel::Tcp(tpl) => tpl.dial(t).await.map(AgentStream::Tcp),
            Tunnel::CoderConnect => match coder_connect::find(client, t).await? {
                Some(addr) => coder_connect::dial(addr).await.map(AgentStream::Tcp),
                None => Err(Permanent(format!(
                    "Coder Connect is not serving {}; start Coder Desktop / 'coder vpn', or use --tunnel tailnet (or --tunnel tcp://HOST:PORT)",
                    coder_connect::hostname(t, "coder")
                ))
                .into()),
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

#[cfg(test)]
mod tests {
    use super::*;
    use anyhow::Context as _;

    fn refused(status: u16) -> anyhow::Error {
        anyhow::Error::new(net::DialError::Refused {
            path: "/api/v2/workspaceagents/x/coordinate".into(),
            status,
            reason: String::new(),
            detail: String::new(),
        })
        .context("coordinate")
    }

    #[test]
    fn a_refused_coordinate_404_or_403_names_the_missing_ssh_permission() {
        let t = DialTarget {
            owner: "alice".into(),
            workspace: "dev".into(),
            agent: "main".into(),
            agent_id: "x".into(),
        };
        for s in [403, 404] {
            let hint = refusal_hint(&refused(s), &t).expect("a hint");
            assert!(hint.contains("permission to SSH into alice/dev"), "{hint}");
        }
        for s in [400, 401, 502] {
            assert_eq!(refusal_hint(&refused(s), &t), None, "{s}");
        }
        let relay = anyhow::Error::new(net::DialError::Refused {
            path: "/derp".into(),
            status: 404,
            reason: String::new(),
            detail: String::new(),
        });
        assert_eq!(refusal_hint(&relay, &t), None);
    }

    #[test]
    fn classification_reads_the_typed_error_through_contexts() {
        for s in [502, 503, 504, 500, 429] {
            assert!(is_transient(&refused(s)), "{s}");
        }
        for s in [400, 401, 403, 404] {
            assert!(!is_transient(&refused(s)), "{s}");
        }
        let api = |status| {
            Err::<(), _>(ApiError::Status {
                status,
                message: "m".into(),
                detail: String::new(),
                validations: vec![],
                helper: None,
            })
            .context("get agent connection info")
            .unwrap_err()
        };
        assert!(is_transient(&api(503)));
        assert!(!is_transient(&api(401)));
        let io = anyhow::Error::new(std::io::Error::from(std::io::ErrorKind::ConnectionRefused))
            .context("dial coder connect host [fd60:627a:a42b::1]:22");
        assert!(is_transient(&io));
        let derp = anyhow::Error::new(coder_tailnet::derp::UpgradeError::Status {
            code: 502,
            reason: "Bad Gateway".into(),
            body: String::new(),
        })
        .context("DERP upgrade at https://relay/derp");
        assert!(is_transient(&derp));
        assert!(!is_transient(&anyhow::Error::new(Permanent("no".into()))));
        // Untyped trouble from the tailnet engine is retried.
        assert!(is_transient(&anyhow::anyhow!(
            "tailnet: the coordinator never sent the agent's node"
        )));
    }
}
