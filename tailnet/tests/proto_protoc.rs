//! Cross-check of the hand-written prost structs against Debian's `protoc`
//! (an independent protobuf implementation), using our own minimal schema
//! `interop/xcheck.proto` (same field numbers and types, different names).
//!
//! protoc encodes a text-format message → bytes must equal prost's, and
//! prost must decode them back; then prost's bytes go through
//! `protoc --decode` and `--encode` and must come back unchanged.
//!
//! Without `protoc` the tests skip loudly; `CODER_PROXY_REQUIRE_PROTOC=1`
//! turns the skip into a failure (CI sets it).

use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};

use coder_tailnet::derp::{DiscoPublic, NodePublic};
use coder_tailnet::proto::*;
use prost::Message;

fn interop_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("interop")
}

fn protoc_bin() -> Option<String> {
    let bin = std::env::var("PROTOC").unwrap_or_else(|_| "protoc".to_string());
    let ok = Command::new(&bin)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    ok.then_some(bin)
}

/// `Some(protoc)` or a loud skip (a panic when protoc is required).
fn protoc_or_skip(test: &str) -> Option<String> {
    if let Some(p) = protoc_bin() {
        return Some(p);
    }
    let msg = format!(
        "{test}: protoc not found (apt-get install protobuf-compiler); protobuf cross-check SKIPPED"
    );
    if std::env::var("CODER_PROXY_REQUIRE_PROTOC").as_deref() == Ok("1") {
        panic!("{msg} — but CODER_PROXY_REQUIRE_PROTOC=1");
    }
    eprintln!("\n*** SKIP *** {msg}\n");
    None
}

fn run_protoc(protoc: &str, mode: &str, ty: &str, input: &[u8]) -> Vec<u8> {
    let dir = interop_dir();
    let mut child = Command::new(protoc)
        .arg(format!("--{mode}=xcheck.{ty}"))
        .arg("-I")
        .arg(&dir)
        .arg(dir.join("xcheck.proto"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn protoc");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(input)
        .expect("write protoc stdin");
    let out = child.wait_with_output().expect("protoc output");
    assert!(
        out.status.success(),
        "protoc --{mode}={ty} failed: {}\ninput: {}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(input)
    );
    out.stdout
}

/// Octal escapes: valid in every protobuf text-format parser.
fn esc(b: &[u8]) -> String {
    b.iter().map(|x| format!("\\{x:03o}")).collect()
}

/// protoc(text) == prost(value), prost decodes protoc's bytes, and prost's
/// bytes survive protoc --decode / --encode unchanged.
fn check<M: Message + Default + PartialEq + std::fmt::Debug>(
    protoc: &str,
    ty: &str,
    text: &str,
    value: &M,
    exact: bool,
) {
    let theirs = run_protoc(protoc, "encode", ty, text.as_bytes());
    let ours = value.encode_to_vec();
    if exact {
        assert_eq!(hex(&theirs), hex(&ours), "{ty}: protoc vs prost bytes");
    }
    let decoded = M::decode(&theirs[..]).expect("prost decodes protoc bytes");
    assert_eq!(&decoded, value, "{ty}: prost decode of protoc bytes");

    let as_text = run_protoc(protoc, "decode", ty, &ours);
    let again = run_protoc(protoc, "encode", ty, &as_text);
    let reparsed = M::decode(&again[..]).expect("prost decodes re-encoded bytes");
    assert_eq!(&reparsed, value, "{ty}: prost → protoc text → protoc bytes");
    if exact {
        assert_eq!(hex(&again), hex(&ours), "{ty}: round trip through protoc");
    }
}

fn hex(b: &[u8]) -> String {
    b.iter()
        .map(|x| format!("{x:02x}"))
        .collect::<Vec<_>>()
        .join(" ")
}

fn key() -> NodePublic {
    let mut k = [0u8; 32];
    for (i, b) in k.iter_mut().enumerate() {
        *b = 0xff - i as u8;
    }
    NodePublic::from_raw(k)
}

fn uuid() -> PeerId {
    "aaaaaaaa-aaaa-aaaa-aaaa-123456789abc".parse().unwrap()
}

fn full_node() -> (Node, String) {
    let disco = DiscoPublic::from_raw([0x5a; 32]);
    let mut n = Node {
        id: -42,
        as_of: Some(Timestamp {
            seconds: 1_700_000_000,
            nanos: 123_456_789,
        }),
        preferred_derp: 999,
        derp_latency: BTreeMap::from([("999".to_string(), 0.0125)]),
        derp_forced_websocket: BTreeMap::from([(10001, "proxy said 426".to_string())]),
        addresses: vec!["fd60:627a:a42b:aaaa:aaaa:1234:5678:9abc/128".into()],
        allowed_ips: vec![
            "fd60:627a:a42b:aaaa:aaaa:1234:5678:9abc/128".into(),
            "fd7a:115c:a1e0:aaaa:aaaa:1234:5678:9abc/128".into(),
        ],
        endpoints: vec!["192.0.2.1:41641".into(), "[2001:db8::1]:41641".into()],
        short_description: "coder-proxy".into(),
        hostname: "laptop".into(),
        ..Node::default()
    };
    n.set_node_key(&key());
    n.set_disco_key(&disco);
    let text = format!(
        r#"
ident: -42
stamp {{ secs: 1700000000 frac: 123456789 }}
wire_key: "{wire}"
disco_text: "{disco}"
home: 999
latencies {{ key: "999" value: 0.0125 }}
ws_forced {{ key: 10001 value: "proxy said 426" }}
addrs: "fd60:627a:a42b:aaaa:aaaa:1234:5678:9abc/128"
allowed: "fd60:627a:a42b:aaaa:aaaa:1234:5678:9abc/128"
allowed: "fd7a:115c:a1e0:aaaa:aaaa:1234:5678:9abc/128"
udp: "192.0.2.1:41641"
udp: "[2001:db8::1]:41641"
description: "coder-proxy"
host: "laptop"
"#,
        wire = esc(&key().to_wire()),
        disco = disco.to_text(),
    );
    (n, text)
}

#[test]
fn protoc_node() {
    let Some(protoc) = protoc_or_skip("protoc_node") else {
        return;
    };
    let (n, text) = full_node();
    check(&protoc, "Peer", &text, &n, true);
}

#[test]
fn protoc_node_multi_entry_maps() {
    let Some(protoc) = protoc_or_skip("protoc_node_multi_entry_maps") else {
        return;
    };
    // Map entry order on the wire is unspecified: compare decoded values.
    let n = Node {
        preferred_derp: 1,
        derp_latency: BTreeMap::from([
            ("1".to_string(), 0.5),
            ("2".to_string(), 0.75),
            ("999".to_string(), 1e-3),
        ]),
        derp_forced_websocket: BTreeMap::from([(1, "a".to_string()), (-5, "b".to_string())]),
        ..Node::default()
    };
    let text = r#"
home: 1
latencies { key: "2" value: 0.75 }
latencies { key: "999" value: 0.001 }
latencies { key: "1" value: 0.5 }
ws_forced { key: -5 value: "b" }
ws_forced { key: 1 value: "a" }
"#;
    check(&protoc, "Peer", text, &n, false);
}

#[test]
fn protoc_coordinate_request() {
    let Some(protoc) = protoc_or_skip("protoc_coordinate_request") else {
        return;
    };
    let (node, node_text) = full_node();
    let other: PeerId = "01234567-89ab-cdef-0123-456789abcdef".parse().unwrap();
    let req = CoordinateRequest {
        update_self: Some(UpdateSelf { node: Some(node) }),
        disconnect: Some(Disconnect {}),
        add_tunnel: Some(Tunnel {
            id: uuid().to_vec(),
        }),
        remove_tunnel: Some(Tunnel { id: other.to_vec() }),
        ready_for_handshake: vec![
            ReadyForHandshake {
                id: uuid().to_vec(),
            },
            ReadyForHandshake { id: other.to_vec() },
        ],
    };
    let text = format!(
        r#"
self_update {{ peer {{ {node_text} }} }}
bye {{}}
open {{ uuid: "{u}" }}
close {{ uuid: "{o}" }}
ready {{ uuid: "{u}" }}
ready {{ uuid: "{o}" }}
"#,
        u = esc(uuid().as_bytes()),
        o = esc(other.as_bytes()),
    );
    check(&protoc, "Ask", &text, &req, true);

    for (r, t) in [
        (
            CoordinateRequest::add_tunnel(uuid()),
            format!("open {{ uuid: \"{}\" }}", esc(uuid().as_bytes())),
        ),
        (CoordinateRequest::disconnect(), "bye {}".to_string()),
        (
            CoordinateRequest::update_self(Node::default()),
            "self_update { peer {} }".to_string(),
        ),
    ] {
        check(&protoc, "Ask", &t, &r, true);
    }
}

#[test]
fn protoc_coordinate_response() {
    let Some(protoc) = protoc_or_skip("protoc_coordinate_response") else {
        return;
    };
    let (node, node_text) = full_node();
    let resp = CoordinateResponse {
        peer_updates: vec![
            PeerUpdate {
                id: uuid().to_vec(),
                node: Some(node),
                kind: PeerUpdateKind::Node as i32,
                reason: "update".into(),
            },
            PeerUpdate {
                id: uuid().to_vec(),
                node: None,
                kind: PeerUpdateKind::ReadyForHandshake as i32,
                reason: String::new(),
            },
            PeerUpdate {
                id: uuid().to_vec(),
                node: None,
                kind: PeerUpdateKind::Lost as i32,
                reason: "lost".into(),
            },
            PeerUpdate {
                id: uuid().to_vec(),
                node: None,
                kind: PeerUpdateKind::Disconnected as i32,
                reason: "graceful disconnect".into(),
            },
        ],
        error: "you do not share a tunnel with x".into(),
    };
    let u = esc(uuid().as_bytes());
    let text = format!(
        r#"
changes {{ uuid: "{u}" peer {{ {node_text} }} what: CHANGE_PEER why: "update" }}
changes {{ uuid: "{u}" what: CHANGE_READY }}
changes {{ uuid: "{u}" what: CHANGE_LOST why: "lost" }}
changes {{ uuid: "{u}" what: CHANGE_GONE why: "graceful disconnect" }}
problem: "you do not share a tunnel with x"
"#
    );
    check(&protoc, "Answer", &text, &resp, true);
}

#[test]
fn protoc_derp_map() {
    let Some(protoc) = protoc_or_skip("protoc_derp_map") else {
        return;
    };
    let node = DerpNode {
        name: "999a".into(),
        region_id: 999,
        host_name: "coder.example.com".into(),
        cert_name: "cert".into(),
        ipv4: "192.0.2.7".into(),
        ipv6: "2001:db8::7".into(),
        stun_port: -1,
        stun_only: false,
        derp_port: 443,
        insecure_for_tests: true,
        force_http: true,
        stun_test_ip: "192.0.2.8".into(),
        can_port_80: true,
    };
    let m = DerpMap {
        home_params: Some(DerpHomeParams {
            region_score: BTreeMap::from([(999, 0.5)]),
        }),
        regions: BTreeMap::from([(
            999,
            DerpRegion {
                region_id: 999,
                embedded_relay: true,
                region_code: "coder".into(),
                region_name: "Coder Embedded Relay".into(),
                avoid: true,
                nodes: vec![node.clone(), node],
            },
        )]),
    };
    let node_text = r#"label: "999a" region: 999 dns: "coder.example.com" tls_name: "cert"
        v4: "192.0.2.7" v6: "2001:db8::7" stun: -1 port: 443 insecure: true plain_http: true
        stun_probe: "192.0.2.8" port80: true"#;
    let text = format!(
        r#"
scores {{ by_region {{ key: 999 value: 0.5 }} }}
areas {{ key: 999 value {{ id: 999 embedded: true code: "coder" name: "Coder Embedded Relay" skip: true
  boxes {{ {node_text} }} boxes {{ {node_text} }} }} }}
"#
    );
    check(&protoc, "Relays", &text, &m, true);

    // Two regions (map order unspecified → value comparison).
    let mut two = m.clone();
    two.regions.insert(
        10001,
        DerpRegion {
            region_id: 10001,
            region_code: "proxy".into(),
            ..DerpRegion::default()
        },
    );
    let text2 = format!("{text}\nareas {{ key: 10001 value {{ id: 10001 code: \"proxy\" }} }}\n");
    check(&protoc, "Relays", &text2, &two, false);
}

#[test]
fn protoc_resume_token() {
    let Some(protoc) = protoc_or_skip("protoc_resume_token") else {
        return;
    };
    let r = RefreshResumeTokenResponse {
        token: "eyJhbGciOi.token".into(),
        refresh_in: Some(Duration {
            seconds: 43_200,
            nanos: 1,
        }),
        expires_at: Some(Timestamp {
            seconds: 1_800_000_000,
            nanos: 0,
        }),
        peer_id: uuid().to_vec(),
    };
    let text = format!(
        r#"text: "eyJhbGciOi.token" renew_after {{ secs: 43200 frac: 1 }} expiry {{ secs: 1800000000 }} peer: "{}""#,
        esc(uuid().as_bytes())
    );
    check(&protoc, "Token", &text, &r, true);
    check(&protoc, "Nothing", "", &RefreshResumeTokenRequest {}, true);
    check(&protoc, "Nothing", "", &StreamDerpMapsRequest {}, true);
}
