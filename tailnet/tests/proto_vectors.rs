//! Byte vectors for the tailnet v2 messages, derived by hand from the field
//! numbers (tag byte = field << 3 | wire type; 0 varint, 1 fixed64,
//! 2 length-delimited) — not produced by the code under test.

use std::collections::BTreeMap;
use std::time::{Duration as StdDuration, UNIX_EPOCH};

use coder_tailnet::derp::{DiscoPublic, NodePublic};
use coder_tailnet::proto::*;
use prost::Message;

fn key32() -> [u8; 32] {
    let mut k = [0u8; 32];
    for (i, b) in k.iter_mut().enumerate() {
        *b = i as u8 + 1;
    }
    k
}

fn uuid_bytes() -> [u8; 16] {
    // aaaaaaaa-aaaa-aaaa-aaaa-123456789abc
    [
        0xaa, 0xaa, 0xaa, 0xaa, 0xaa, 0xaa, 0xaa, 0xaa, 0xaa, 0xaa, 0x12, 0x34, 0x56, 0x78, 0x9a,
        0xbc,
    ]
}

fn cat(parts: &[&[u8]]) -> Vec<u8> {
    parts.concat()
}

#[test]
fn node_key_is_np_plus_32_bytes_in_field_3() {
    let mut n = Node::default();
    n.set_node_key(&NodePublic::from_raw(key32()));
    // field 3, wire type 2 → 0x1a; length 34 = 0x22; "np" = 6e 70.
    let want = cat(&[&[0x1a, 0x22, 0x6e, 0x70], &key32()]);
    assert_eq!(n.encode_to_vec(), want);
    let back = Node::decode(&want[..]).unwrap();
    assert_eq!(back.node_key().unwrap(), NodePublic::from_raw(key32()));
}

#[test]
fn node_full_vector() {
    let disco = DiscoPublic::from_raw([0xab; 32]);
    let addr = "fd60:627a:a42b:aaaa:aaaa:1234:5678:9abc/128".to_string();
    let mut n = Node {
        id: 1,
        as_of: Some(Timestamp {
            seconds: 1_700_000_000,
            nanos: 5,
        }),
        preferred_derp: 999,
        derp_latency: BTreeMap::from([("999".to_string(), 0.25)]),
        derp_forced_websocket: BTreeMap::from([(999, "x".to_string())]),
        addresses: vec![addr.clone()],
        allowed_ips: vec![addr.clone()],
        ..Node::default()
    };
    n.set_node_key(&NodePublic::from_raw(key32()));
    n.set_disco_key(&disco);
    let disco_text = format!("discokey:{}", "ab".repeat(32));
    assert_eq!(n.disco, disco_text);

    let want = cat(&[
        // id = 1
        &[0x08, 0x01],
        // as_of: 12 len=8 { 08 varint(1700000000)=80 e2 cf aa 06, 10 05 }
        &[0x12, 0x08, 0x08, 0x80, 0xe2, 0xcf, 0xaa, 0x06, 0x10, 0x05],
        // key
        &[0x1a, 0x22, 0x6e, 0x70],
        &key32(),
        // disco: 22 len=73 (0x49)
        &[0x22, 0x49],
        disco_text.as_bytes(),
        // preferred_derp 999 = e7 07
        &[0x28, 0xe7, 0x07],
        // derp_latency entry: 32 0e { 0a 03 "999", 11 <0.25 LE> }
        &[0x32, 0x0e, 0x0a, 0x03, b'9', b'9', b'9', 0x11],
        &0.25f64.to_le_bytes(),
        // derp_forced_websocket entry: 3a 06 { 08 e7 07, 12 01 "x" }
        &[0x3a, 0x06, 0x08, 0xe7, 0x07, 0x12, 0x01, b'x'],
        // addresses, allowed_ips: 43 = 0x2b bytes each
        &[0x42, 0x2b],
        addr.as_bytes(),
        &[0x4a, 0x2b],
        addr.as_bytes(),
    ]);
    assert_eq!(0.25f64.to_le_bytes(), [0, 0, 0, 0, 0, 0, 0xd0, 0x3f]);
    assert_eq!(n.encode_to_vec(), want);
    let back = Node::decode(&want[..]).unwrap();
    assert_eq!(back, n);
    assert_eq!(back.disco_key().unwrap(), disco);
}

#[test]
fn node_negative_id_and_newer_fields() {
    let n = Node {
        id: -1,
        short_description: "d".into(),
        hostname: "h".into(),
        ..Node::default()
    };
    // int64 -1 is a 10-byte varint; field 11 → 0x5a, field 12 → 0x62.
    let want = vec![
        0x08, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01, 0x5a, 0x01, b'd', 0x62,
        0x01, b'h',
    ];
    assert_eq!(n.encode_to_vec(), want);
}

#[test]
fn node_key_and_disco_parsing_rules() {
    let mut n = Node {
        key: key32().to_vec(), // raw, no "np"
        ..Node::default()
    };
    assert!(n.node_key().is_err(), "raw 32 bytes without np is rejected");
    n.key = cat(&[b"np", &key32()[..31]]);
    assert!(n.node_key().is_err(), "short key rejected");
    n.key = cat(&[b"mp", &key32()]);
    assert!(n.node_key().is_err(), "wrong prefix rejected");

    n.disco = format!("discokey:{}", "AB".repeat(32));
    assert_eq!(n.disco_key().unwrap(), DiscoPublic::from_raw([0xab; 32]));
    n.disco = format!("nodekey:{}", "ab".repeat(32));
    assert!(n.disco_key().is_err());
    n.disco = format!("discokey:{}", "ab".repeat(31));
    assert!(n.disco_key().is_err());
    n.disco = format!("discokey:{}g", "ab".repeat(31) + "a");
    assert!(n.disco_key().is_err());
}

#[test]
fn coordinate_request_vectors() {
    let id = PeerId(uuid_bytes());
    let u = uuid_bytes();

    // add_tunnel: 1a 12 { 0a 10 <16> }
    let want = cat(&[&[0x1a, 0x12, 0x0a, 0x10], &u]);
    assert_eq!(CoordinateRequest::add_tunnel(id).encode_to_vec(), want);

    // remove_tunnel: 22 12 { 0a 10 <16> }
    let want = cat(&[&[0x22, 0x12, 0x0a, 0x10], &u]);
    assert_eq!(CoordinateRequest::remove_tunnel(id).encode_to_vec(), want);

    // disconnect: 12 00
    assert_eq!(
        CoordinateRequest::disconnect().encode_to_vec(),
        vec![0x12, 0x00]
    );

    // ready_for_handshake x2: 2a 12 { 0a 10 <16> } twice
    let want = cat(&[&[0x2a, 0x12, 0x0a, 0x10], &u, &[0x2a, 0x12, 0x0a, 0x10], &u]);
    assert_eq!(
        CoordinateRequest::ready_for_handshake([id, id]).encode_to_vec(),
        want
    );

    // update_self { node { preferred_derp 1 } }: 0a 04 { 0a 02 { 28 01 } }
    let node = Node {
        preferred_derp: 1,
        ..Node::default()
    };
    assert_eq!(
        CoordinateRequest::update_self(node).encode_to_vec(),
        vec![0x0a, 0x04, 0x0a, 0x02, 0x28, 0x01]
    );

    // Empty node still present: 0a 02 0a 00
    assert_eq!(
        CoordinateRequest::update_self(Node::default()).encode_to_vec(),
        vec![0x0a, 0x02, 0x0a, 0x00]
    );
}

#[test]
fn coordinate_response_vectors() {
    let u = uuid_bytes();
    // peer_updates[0] = { id, kind = 4, reason = "ready" }, error = "no"
    let inner = cat(&[&[0x0a, 0x10], &u, &[0x18, 0x04, 0x22, 0x05], b"ready"]);
    assert_eq!(inner.len(), 0x1b);
    let wire = cat(&[&[0x0a, 0x1b], &inner, &[0x12, 0x02], b"no"]);

    let resp = CoordinateResponse::decode(&wire[..]).unwrap();
    assert_eq!(resp.error, "no");
    assert_eq!(resp.peer_updates.len(), 1);
    let pu = &resp.peer_updates[0];
    assert_eq!(pu.kind(), PeerUpdateKind::ReadyForHandshake);
    assert_eq!(pu.peer_id().unwrap(), PeerId(u));
    assert_eq!(pu.reason, "ready");
    assert!(pu.node.is_none());
    assert_eq!(resp.encode_to_vec(), wire);

    for (v, k) in [
        (0, PeerUpdateKind::Unspecified),
        (1, PeerUpdateKind::Node),
        (2, PeerUpdateKind::Disconnected),
        (3, PeerUpdateKind::Lost),
        (4, PeerUpdateKind::ReadyForHandshake),
    ] {
        assert_eq!(k as i32, v);
    }
}

#[test]
fn unknown_kinds_and_fields_are_tolerated() {
    // kind = 9 (unknown enum value), plus an unknown field 15 (varint 7)
    // inside the update and an unknown field 9 (string) at top level.
    let wire = vec![0x0a, 0x04, 0x18, 0x09, 0x78, 0x07, 0x4a, 0x01, b'z'];
    let resp = CoordinateResponse::decode(&wire[..]).unwrap();
    assert_eq!(resp.peer_updates[0].kind, 9);
    assert_eq!(resp.peer_updates[0].kind(), PeerUpdateKind::Unspecified);
    assert!(resp.peer_updates[0].peer_id().is_err());
}

#[test]
fn peer_update_with_node() {
    let u = uuid_bytes();
    let node = Node {
        preferred_derp: 999,
        ..Node::default()
    };
    let pu = PeerUpdate {
        id: u.to_vec(),
        node: Some(node),
        kind: PeerUpdateKind::Node as i32,
        reason: String::new(),
    };
    // 0a 10 <16>, 12 03 { 28 e7 07 }, 18 01
    let want = cat(&[
        &[0x0a, 0x10],
        &u,
        &[0x12, 0x03, 0x28, 0xe7, 0x07, 0x18, 0x01],
    ]);
    assert_eq!(pu.encode_to_vec(), want);
}

#[test]
fn refresh_resume_token_vectors() {
    let u = uuid_bytes();
    let r = RefreshResumeTokenResponse {
        token: "t".into(),
        refresh_in: Some(Duration {
            seconds: 1800,
            nanos: 0,
        }),
        expires_at: Some(Timestamp {
            seconds: 1,
            nanos: 0,
        }),
        peer_id: u.to_vec(),
    };
    // 0a 01 "t"; 12 03 { 08 88 0e } (1800); 1a 02 { 08 01 }; 22 10 <16>
    let want = cat(&[
        &[
            0x0a, 0x01, b't', 0x12, 0x03, 0x08, 0x88, 0x0e, 0x1a, 0x02, 0x08, 0x01, 0x22, 0x10,
        ],
        &u,
    ]);
    assert_eq!(r.encode_to_vec(), want);
    let back = RefreshResumeTokenResponse::decode(&want[..]).unwrap();
    assert_eq!(back.peer_id().unwrap().unwrap(), PeerId(u));
    assert_eq!(
        back.refresh_in.unwrap().to_std(),
        Some(StdDuration::from_secs(1800))
    );

    // Old servers: no peer_id.
    let old = RefreshResumeTokenResponse::decode(&[0x0a, 0x01, b't'][..]).unwrap();
    assert!(old.peer_id().is_none());

    assert!(RefreshResumeTokenRequest {}.encode_to_vec().is_empty());
    assert!(StreamDerpMapsRequest {}.encode_to_vec().is_empty());
}

#[test]
fn derp_node_vector() {
    let n = DerpNode {
        name: "999a".into(),
        region_id: 999,
        host_name: "localhost".into(),
        stun_port: -1,
        derp_port: 3000,
        force_http: true,
        can_port_80: true,
        ..DerpNode::default()
    };
    let want = cat(&[
        &[0x0a, 0x04],
        b"999a",
        &[0x10, 0xe7, 0x07],
        &[0x1a, 0x09],
        b"localhost",
        // stun_port -1: int32 negatives are sign-extended 10-byte varints
        &[
            0x38, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01,
        ],
        // derp_port 3000 = b8 17
        &[0x48, 0xb8, 0x17],
        // force_http (11) → 0x58, can_port_80 (13) → 0x68
        &[0x58, 0x01, 0x68, 0x01],
    ]);
    assert_eq!(n.encode_to_vec(), want);
}

#[test]
fn derp_map_vector() {
    let region = DerpRegion {
        region_id: 999,
        embedded_relay: true,
        region_code: "c".into(),
        nodes: vec![DerpNode {
            name: "n".into(),
            ..DerpNode::default()
        }],
        ..DerpRegion::default()
    };
    let m = DerpMap {
        home_params: Some(DerpHomeParams {
            region_score: BTreeMap::from([(999, 1.5)]),
        }),
        regions: BTreeMap::from([(999, region)]),
    };
    // region: 08 e7 07, 10 01, 1a 01 "c", 32 03 { 0a 01 "n" } → 13 bytes
    let region_bytes = vec![
        0x08, 0xe7, 0x07, 0x10, 0x01, 0x1a, 0x01, b'c', 0x32, 0x03, 0x0a, 0x01, b'n',
    ];
    // home_params: 0a 0e { 0a 0c { 08 e7 07, 11 <1.5 LE> } }
    // regions entry: 12 12 { 08 e7 07, 12 0d <region> }
    let want = cat(&[
        &[0x0a, 0x0e, 0x0a, 0x0c, 0x08, 0xe7, 0x07, 0x11],
        &1.5f64.to_le_bytes(),
        &[0x12, 0x12, 0x08, 0xe7, 0x07, 0x12, 0x0d],
        &region_bytes,
    ]);
    assert_eq!(m.encode_to_vec(), want);
    assert_eq!(DerpMap::decode(&want[..]).unwrap(), m);
}

#[test]
fn peer_id_text_and_bytes() {
    let id: PeerId = "aaaaaaaa-aaaa-aaaa-aaaa-123456789abc".parse().unwrap();
    assert_eq!(id.as_bytes(), &uuid_bytes());
    assert_eq!(id.to_string(), "aaaaaaaa-aaaa-aaaa-aaaa-123456789abc");
    assert_eq!(
        PeerId::parse("AAAAAAAA-AAAA-AAAA-AAAA-123456789ABC").unwrap(),
        id
    );
    assert_eq!(
        PeerId::parse("aaaaaaaaaaaaaaaaaaaa123456789abc").unwrap(),
        id
    );
    assert_eq!(
        PeerId::parse("{aaaaaaaa-aaaa-aaaa-aaaa-123456789abc}").unwrap(),
        id
    );
    assert_eq!(
        PeerId::parse("urn:uuid:aaaaaaaa-aaaa-aaaa-aaaa-123456789abc").unwrap(),
        id
    );
    for bad in [
        "",
        "aaaaaaaa-aaaa-aaaa-aaaa-123456789ab",
        "aaaaaaaa_aaaa-aaaa-aaaa-123456789abc",
        "gaaaaaaa-aaaa-aaaa-aaaa-123456789abc",
    ] {
        assert!(PeerId::parse(bad).is_err(), "{bad:?}");
    }
    assert_eq!(PeerId::from_bytes(&uuid_bytes()).unwrap(), id);
    assert_eq!(
        PeerId::from_bytes(&[1, 2, 3]),
        Err(ProtoError::BadPeerIdLength(3))
    );
    assert_eq!(id.to_vec(), uuid_bytes().to_vec());

    let r = PeerId::new_v4();
    assert_eq!(r.as_bytes()[6] >> 4, 4);
    assert_eq!(r.as_bytes()[8] & 0xc0, 0x80);
    assert_eq!(PeerId::parse(&r.to_string()).unwrap(), r);
}

#[test]
fn timestamps_and_durations() {
    let t = UNIX_EPOCH + StdDuration::new(1_700_000_000, 5);
    let ts = Timestamp::from_system_time(t);
    assert_eq!(
        ts,
        Timestamp {
            seconds: 1_700_000_000,
            nanos: 5
        }
    );
    assert_eq!(ts.to_system_time(), Some(t));

    let before = UNIX_EPOCH - StdDuration::new(1, 250_000_000);
    let ts = Timestamp::from_system_time(before);
    assert_eq!(
        ts,
        Timestamp {
            seconds: -2,
            nanos: 750_000_000
        }
    );
    assert_eq!(ts.to_system_time(), Some(before));
    assert_eq!(
        Timestamp {
            seconds: 0,
            nanos: -1
        }
        .to_system_time(),
        None
    );

    let d = Duration::from_std(StdDuration::from_millis(1500));
    assert_eq!(
        d,
        Duration {
            seconds: 1,
            nanos: 500_000_000
        }
    );
    assert_eq!(d.to_std(), Some(StdDuration::from_millis(1500)));
    assert_eq!(
        Duration {
            seconds: -1,
            nanos: 0
        }
        .to_std(),
        None
    );
}

#[test]
fn method_names() {
    assert_eq!(method::COORDINATE, "/coder.tailnet.v2.Tailnet/Coordinate");
    assert_eq!(method::COORDINATE.len(), 0x24);
    assert_eq!(PACKAGE, "coder.tailnet.v2");
}
