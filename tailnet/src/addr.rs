//! Tailnet addressing: the two service prefixes, per-peer IPv6 addresses
//! derived from UUIDs, Tailscale node IDs from UUIDs, and the agent's
//! well-known tailnet ports.
//!
//! Facts (Coder `tailnet/conn.go`, `tailnet/tunnel.go`, reference §2.4):
//! an address is the 16 UUID bytes with bytes 0–5 replaced by the 6-byte
//! prefix; nodes publish it as a `/128` prefix; the SDK dials the agent at
//! its Tailscale-prefix address, port 1; very old agents used one fixed
//! address.

use std::fmt;
use std::net::Ipv6Addr;

use rand_core::{OsRng, RngCore};

use crate::proto::PeerId;

/// The agent's built-in SSH server (what `coder ssh` dials).
pub const AGENT_SSH_PORT: u16 = 1;
/// Reconnecting PTY (2-byte LE length + JSON init, then raw PTY bytes).
pub const AGENT_RECONNECTING_PTY_PORT: u16 = 2;
pub const AGENT_SPEEDTEST_PORT: u16 = 3;
/// The agent's HTTP API.
pub const AGENT_HTTP_API_PORT: u16 = 4;
/// Same SSH server on the standard port (used by Coder Connect).
pub const AGENT_STANDARD_SSH_PORT: u16 = 22;

/// The first 48 bits of a tailnet address.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct ServicePrefix(pub [u8; 6]);

/// `fd7a:115c:a1e0::/48` — the prefix Coder has used since the start
/// (shared with Tailscale); agents still listen here and the SDK dials
/// agents here.
pub const TAILSCALE_SERVICE_PREFIX: ServicePrefix =
    ServicePrefix([0xfd, 0x7a, 0x11, 0x5c, 0xa1, 0xe0]);

/// `fd60:627a:a42b::/48` — Coder's own prefix; newest clients take their
/// address here from the server-assigned peer ID.
pub const CODER_SERVICE_PREFIX: ServicePrefix = ServicePrefix([0xfd, 0x60, 0x62, 0x7a, 0xa4, 0x2b]);

/// The single fixed address very old agents used (still accepted from
/// agents by the coordinator).
pub const LEGACY_AGENT_IP: Ipv6Addr = Ipv6Addr::new(
    0xfd7a, 0x115c, 0xa1e0, 0x49d6, 0xb259, 0xb7ac, 0xb1b2, 0x48f4,
);

impl ServicePrefix {
    /// The UUID's bytes with the first six replaced by the prefix.
    pub fn addr_from_uuid(&self, id: &PeerId) -> Ipv6Addr {
        let mut b = *id.as_bytes();
        b[..6].copy_from_slice(&self.0);
        Ipv6Addr::from(b)
    }

    /// `addr_from_uuid(id)` as a `/128` prefix in text form, as nodes
    /// publish it in `addresses` / `allowed_ips`.
    pub fn prefix_from_uuid(&self, id: &PeerId) -> String {
        format!("{}/128", self.addr_from_uuid(id))
    }

    /// A random address in the prefix (a random v4 UUID, masked — as
    /// Coder's SDK does when it has no peer ID).
    pub fn random_addr(&self) -> Ipv6Addr {
        self.addr_from_uuid(&PeerId::new_v4())
    }

    /// The prefix itself, e.g. `fd60:627a:a42b::`.
    pub fn network(&self) -> Ipv6Addr {
        let mut b = [0u8; 16];
        b[..6].copy_from_slice(&self.0);
        Ipv6Addr::from(b)
    }

    pub fn contains(&self, addr: &Ipv6Addr) -> bool {
        addr.octets()[..6] == self.0
    }
}

impl fmt::Display for ServicePrefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/48", self.network())
    }
}

impl fmt::Debug for ServicePrefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ServicePrefix({self})")
    }
}

/// The address the SDK dials for an agent:
/// `TAILSCALE_SERVICE_PREFIX.addr_from_uuid(agent_id)`.
pub fn agent_addr(agent_id: &PeerId) -> Ipv6Addr {
    TAILSCALE_SERVICE_PREFIX.addr_from_uuid(agent_id)
}

/// Both `/128`s an agent listens on (Tailscale prefix, then Coder prefix).
pub fn agent_prefixes(agent_id: &PeerId) -> [String; 2] {
    [
        TAILSCALE_SERVICE_PREFIX.prefix_from_uuid(agent_id),
        CODER_SERVICE_PREFIX.prefix_from_uuid(agent_id),
    ]
}

/// A client's own address: from the server-assigned peer ID when the
/// server gave one (`CODER_SERVICE_PREFIX`), else a random Coder-prefix
/// address.
pub fn client_addr(server_peer_id: Option<&PeerId>) -> Ipv6Addr {
    match server_peer_id {
        Some(id) => CODER_SERVICE_PREFIX.addr_from_uuid(id),
        None => CODER_SERVICE_PREFIX.random_addr(),
    }
}

/// Tailscale node ID for a UUID: its last 8 bytes as a big-endian `i64`,
/// made non-negative the way Coder does (two's-complement absolute value,
/// so `i64::MIN` stays as is).
pub fn node_id(id: &PeerId) -> i64 {
    let b = id.as_bytes();
    let mut last = [0u8; 8];
    last.copy_from_slice(&b[8..]);
    let v = i64::from_be_bytes(last);
    let sign = v >> 63;
    (v ^ sign).wrapping_sub(sign)
}

/// A random positive node ID, for a client without a UUID.
pub fn random_node_id() -> i64 {
    (OsRng.next_u64() >> 1) as i64
}
