//! `tcp://HOST:PORT` transport: a plain TCP connection to the agent's SSH
//! server, for deployments that expose agents directly (and for coder-sim).
//!
//! `{agent}`, `{workspace}` and `{owner}` in the template are replaced with
//! the resolved names; names are validated by `target`, so they cannot
//! inject anything into the address.

use anyhow::{anyhow, bail, Context, Result};
use tokio::net::TcpStream;

use super::{DialTarget, DIAL_TIMEOUT};

/// A parsed `tcp://` template.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Template {
    raw: String,
}

impl Template {
    /// Check the template's shape once, at start-up.
    pub fn parse(s: &str) -> Result<Template> {
        let t = Template { raw: s.to_string() };
        let sample = DialTarget {
            owner: "o".into(),
            workspace: "w".into(),
            agent: "a".into(),
            agent_id: "i".into(),
        };
        split_host_port(&t.expand(&sample)).map_err(|e| anyhow!("invalid --tunnel {s:?}: {e}"))?;
        Ok(t)
    }

    /// The address for one target, as `host:port` text.
    pub fn expand(&self, t: &DialTarget) -> String {
        self.raw
            .trim_start_matches("tcp://")
            .trim_end_matches('/')
            .replace("{agent}", &t.agent)
            .replace("{workspace}", &t.workspace)
            .replace("{owner}", &t.owner)
    }

    /// Connect with a timeout.
    pub async fn dial(&self, t: &DialTarget) -> Result<TcpStream> {
        let addr = self.expand(t);
        let (host, port) = split_host_port(&addr)?;
        let conn = tokio::time::timeout(DIAL_TIMEOUT, TcpStream::connect((host.as_str(), port)))
            .await
            .map_err(|_| anyhow!("dial {addr}: no answer within {}s", DIAL_TIMEOUT.as_secs()))?
            .with_context(|| format!("dial {addr}"))?;
        conn.set_nodelay(true).ok();
        Ok(conn)
    }
}

/// Split `host:port` or `[v6]:port`.
fn split_host_port(s: &str) -> Result<(String, u16)> {
    let (host, port) = if let Some(rest) = s.strip_prefix('[') {
        let (h, p) = rest
            .split_once("]:")
            .ok_or_else(|| anyhow!("expected [IPv6]:PORT"))?;
        (h.to_string(), p)
    } else {
        let (h, p) = s
            .rsplit_once(':')
            .ok_or_else(|| anyhow!("expected HOST:PORT"))?;
        (h.to_string(), p)
    };
    if host.is_empty() {
        bail!("the host is empty");
    }
    if host.contains('{') || host.contains('}') {
        bail!("unknown placeholder in {host:?}: use {{agent}}, {{workspace}} or {{owner}}");
    }
    let port: u16 = port
        .parse()
        .map_err(|_| anyhow!("port {port:?} is not a number from 1 to 65535"))?;
    if port == 0 {
        bail!("port 0 is not dialable");
    }
    Ok((host, port))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target() -> DialTarget {
        DialTarget {
            owner: "alice".into(),
            workspace: "dev".into(),
            agent: "main".into(),
            agent_id: "id".into(),
        }
    }

    #[test]
    fn expands_placeholders() {
        let t = Template::parse("tcp://{agent}.{workspace}.{owner}.example:2222").unwrap();
        assert_eq!(t.expand(&target()), "main.dev.alice.example:2222");
        let t = Template::parse("tcp://[::1]:22").unwrap();
        assert_eq!(
            split_host_port(&t.expand(&target())).unwrap(),
            ("::1".into(), 22)
        );
    }

    #[test]
    fn rejects_bad_templates() {
        for bad in [
            "tcp://host",
            "tcp://:22",
            "tcp://h:0",
            "tcp://h:99999",
            "tcp://{nope}:22",
            "tcp://[::1]22",
        ] {
            assert!(Template::parse(bad).is_err(), "{bad}");
        }
    }
}
