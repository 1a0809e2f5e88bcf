//! Coder Connect transport: when Coder Desktop / `coder vpn` runs, the
//! agent's name resolves (AAAA) inside Coder's service prefix and its SSH
//! server listens on port 22 there.
//!
//! The lookup is bounded to 250 ms so a machine without Coder Connect pays
//! almost nothing, and an address outside `fd60:627a:a42b::/48` is ignored
//! (captive or wildcard DNS must not redirect us).

use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use anyhow::{Context, Result};
use tokio::net::TcpStream;

use super::{DialTarget, DIAL_TIMEOUT};
use crate::coderd::Client;

/// Bound on the DNS lookup.
pub const LOOKUP_TIMEOUT: Duration = Duration::from_millis(250);

/// Whether an address is inside Coder's service prefix `fd60:627a:a42b::/48`.
pub fn in_service_prefix(ip: &Ipv6Addr) -> bool {
    let s = ip.segments();
    s[0] == 0xfd60 && s[1] == 0x627a && s[2] == 0xa42b
}

/// `<agent>.<workspace>.<owner>.<suffix>`.
pub fn hostname(t: &DialTarget, suffix: &str) -> String {
    format!(
        "{}.{}.{}.{}",
        t.agent,
        t.workspace,
        t.owner,
        suffix.trim_matches('.')
    )
}

/// The agent's Coder Connect address, if Coder Connect serves it.
pub async fn find(client: &Client, t: &DialTarget) -> Result<Option<Ipv6Addr>> {
    let info = client
        .connection_info()
        .await
        .context("get agent connection info")?;
    let suffix = if info.hostname_suffix.is_empty() {
        "coder"
    } else {
        info.hostname_suffix.as_str()
    };
    let name = hostname(t, suffix);
    let lookup =
        tokio::time::timeout(LOOKUP_TIMEOUT, tokio::net::lookup_host((name.as_str(), 22))).await;
    let addrs: Vec<SocketAddr> = match lookup {
        Ok(Ok(a)) => a.collect(),
        Ok(Err(e)) => {
            log::debug!("coder connect: {name} does not resolve: {e}");
            return Ok(None);
        }
        Err(_) => {
            log::debug!("coder connect: lookup of {name} timed out");
            return Ok(None);
        }
    };
    Ok(addrs.into_iter().find_map(|a| match a.ip() {
        IpAddr::V6(ip) if in_service_prefix(&ip) => Some(ip),
        _ => None,
    }))
}

/// Connect to port 22 of a Coder Connect address.
pub async fn dial(ip: Ipv6Addr) -> Result<TcpStream> {
    let s = tokio::time::timeout(DIAL_TIMEOUT, TcpStream::connect((ip, 22)))
        .await
        .map_err(|_| anyhow::anyhow!("dial coder connect host [{ip}]:22: timed out"))?
        .with_context(|| format!("dial coder connect host [{ip}]:22"))?;
    s.set_nodelay(true).ok();
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix() {
        assert!(in_service_prefix(&"fd60:627a:a42b::1".parse().unwrap()));
        assert!(in_service_prefix(
            &"fd60:627a:a42b:ffff::1".parse().unwrap()
        ));
        assert!(!in_service_prefix(&"fd60:627a:a42c::1".parse().unwrap()));
        assert!(!in_service_prefix(&"::1".parse().unwrap()));
    }
}
