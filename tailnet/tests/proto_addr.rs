//! Address derivation and node IDs (reference §2.4).

use std::net::Ipv6Addr;

use coder_tailnet::addr::*;
use coder_tailnet::proto::PeerId;

fn id() -> PeerId {
    "aaaaaaaa-aaaa-aaaa-aaaa-123456789abc".parse().unwrap()
}

#[test]
fn coder_prefix_vector_from_go_test() {
    let a = CODER_SERVICE_PREFIX.addr_from_uuid(&id());
    assert_eq!(a.to_string(), "fd60:627a:a42b:aaaa:aaaa:1234:5678:9abc");
    assert_eq!(
        CODER_SERVICE_PREFIX.prefix_from_uuid(&id()),
        "fd60:627a:a42b:aaaa:aaaa:1234:5678:9abc/128"
    );
}

#[test]
fn tailscale_prefix_and_agent_addresses() {
    assert_eq!(
        agent_addr(&id()).to_string(),
        "fd7a:115c:a1e0:aaaa:aaaa:1234:5678:9abc"
    );
    assert_eq!(
        agent_prefixes(&id()),
        [
            "fd7a:115c:a1e0:aaaa:aaaa:1234:5678:9abc/128".to_string(),
            "fd60:627a:a42b:aaaa:aaaa:1234:5678:9abc/128".to_string(),
        ]
    );
    assert_eq!(TAILSCALE_SERVICE_PREFIX.to_string(), "fd7a:115c:a1e0::/48");
    assert_eq!(CODER_SERVICE_PREFIX.to_string(), "fd60:627a:a42b::/48");
    assert_eq!(
        LEGACY_AGENT_IP,
        "fd7a:115c:a1e0:49d6:b259:b7ac:b1b2:48f4"
            .parse::<Ipv6Addr>()
            .unwrap()
    );
    assert!(TAILSCALE_SERVICE_PREFIX.contains(&LEGACY_AGENT_IP));
    assert!(!CODER_SERVICE_PREFIX.contains(&LEGACY_AGENT_IP));
}

#[test]
fn client_addresses() {
    assert_eq!(
        client_addr(Some(&id())).to_string(),
        "fd60:627a:a42b:aaaa:aaaa:1234:5678:9abc"
    );
    let r1 = client_addr(None);
    let r2 = client_addr(None);
    assert!(CODER_SERVICE_PREFIX.contains(&r1));
    assert_ne!(r1, r2);
    assert!(TAILSCALE_SERVICE_PREFIX.contains(&TAILSCALE_SERVICE_PREFIX.random_addr()));
}

#[test]
fn zero_runs_compress_like_go() {
    // Prefix bytes then zeros: RFC 5952 compression, as Go's netip prints.
    let z = PeerId([0; 16]);
    assert_eq!(
        CODER_SERVICE_PREFIX.prefix_from_uuid(&z),
        "fd60:627a:a42b::/128"
    );
    let mut b = [0u8; 16];
    b[15] = 1;
    assert_eq!(
        CODER_SERVICE_PREFIX.addr_from_uuid(&PeerId(b)).to_string(),
        "fd60:627a:a42b::1"
    );
}

#[test]
fn node_ids() {
    // last 8 bytes aa aa 12 34 56 78 9a bc: high bit set → negative → abs.
    let raw = i64::from_be_bytes([0xaa, 0xaa, 0x12, 0x34, 0x56, 0x78, 0x9a, 0xbc]);
    assert!(raw < 0);
    assert_eq!(node_id(&id()), -raw);
    assert_eq!(node_id(&id()), 0x5555_edcb_a987_6544);

    let mut b = [0u8; 16];
    b[15] = 7;
    assert_eq!(node_id(&PeerId(b)), 7);
    // i64::MIN has no positive counterpart; Coder's formula leaves it.
    b[8..].copy_from_slice(&i64::MIN.to_be_bytes());
    assert_eq!(node_id(&PeerId(b)), i64::MIN);
    assert!(random_node_id() >= 0);
}

#[test]
fn ports() {
    assert_eq!(AGENT_SSH_PORT, 1);
    assert_eq!(AGENT_RECONNECTING_PTY_PORT, 2);
    assert_eq!(AGENT_SPEEDTEST_PORT, 3);
    assert_eq!(AGENT_HTTP_API_PORT, 4);
    assert_eq!(AGENT_STANDARD_SSH_PORT, 22);
}
