//! DERP frame and key vectors, written out by hand from the layouts in
//! reference §3.1 (type byte, 4-byte big-endian length, payload).

use std::time::Duration;

use coder_tailnet::derp::frame::{encode_frame, kind, FrameReader, CLIENT_MAX_FRAME_LEN};
use coder_tailnet::derp::{
    DerpError, DiscoPublic, Frame, KeyError, NodePrivate, NodePublic, PeerGoneReason, MAGIC,
    MAX_PACKET_SIZE, PROTOCOL_VERSION,
};
use tokio::io::AsyncWriteExt;

fn k(fill: u8) -> NodePublic {
    NodePublic::from_raw([fill; 32])
}

fn cat(parts: &[&[u8]]) -> Vec<u8> {
    parts.concat()
}

#[test]
fn constants() {
    assert_eq!(&MAGIC, b"DERP\xf0\x9f\x94\x91");
    assert_eq!(&MAGIC, "DERP🔑".as_bytes());
    assert_eq!(PROTOCOL_VERSION, 2);
    assert_eq!(MAX_PACKET_SIZE, 65536);
    assert_eq!(
        [
            kind::SERVER_KEY,
            kind::CLIENT_INFO,
            kind::SERVER_INFO,
            kind::SEND_PACKET,
            kind::RECV_PACKET,
            kind::KEEP_ALIVE,
            kind::NOTE_PREFERRED,
            kind::PEER_GONE,
            kind::PEER_PRESENT,
            kind::FORWARD_PACKET,
            kind::WATCH_CONNS,
            kind::CLOSE_PEER,
            kind::PING,
            kind::PONG,
            kind::HEALTH,
            kind::RESTARTING,
        ],
        [1, 2, 3, 4, 5, 6, 7, 8, 9, 0x0a, 0x10, 0x11, 0x12, 0x13, 0x14, 0x15]
    );
}

#[test]
fn frame_vectors() {
    let cases: Vec<(Frame, Vec<u8>)> = vec![
        (
            Frame::ServerKey {
                key: k(0x11),
                extra: vec![],
            },
            cat(&[
                &[0x01, 0, 0, 0, 0x28],
                &[0x44, 0x45, 0x52, 0x50, 0xf0, 0x9f, 0x94, 0x91],
                &[0x11; 32],
            ]),
        ),
        (
            Frame::ClientInfo {
                key: k(0x22),
                sealed: vec![0x33; 24 + 16 + 2],
            },
            cat(&[&[0x02, 0, 0, 0, 0x4a], &[0x22; 32], &[0x33; 42]]),
        ),
        (
            Frame::ServerInfo {
                sealed: vec![0x44; 40],
            },
            cat(&[&[0x03, 0, 0, 0, 0x28], &[0x44; 40]]),
        ),
        (
            Frame::SendPacket {
                dst: k(0x55),
                data: b"abcde".to_vec(),
            },
            cat(&[&[0x04, 0, 0, 0, 0x25], &[0x55; 32], b"abcde"]),
        ),
        (
            Frame::RecvPacket {
                src: k(0x66),
                data: vec![],
            },
            cat(&[&[0x05, 0, 0, 0, 0x20], &[0x66; 32]]),
        ),
        (Frame::KeepAlive, vec![0x06, 0, 0, 0, 0]),
        (Frame::NotePreferred(true), vec![0x07, 0, 0, 0, 1, 1]),
        (Frame::NotePreferred(false), vec![0x07, 0, 0, 0, 1, 0]),
        (
            Frame::PeerGone {
                peer: k(0x77),
                reason: PeerGoneReason::NotHere,
            },
            cat(&[&[0x08, 0, 0, 0, 0x21], &[0x77; 32], &[0x01]]),
        ),
        (
            Frame::PeerGone {
                peer: k(0x77),
                reason: PeerGoneReason::Disconnected,
            },
            cat(&[&[0x08, 0, 0, 0, 0x21], &[0x77; 32], &[0x00]]),
        ),
        (
            Frame::PeerPresent { peer: k(0x88) },
            cat(&[&[0x09, 0, 0, 0, 0x20], &[0x88; 32]]),
        ),
        (
            Frame::Ping([1, 2, 3, 4, 5, 6, 7, 8]),
            vec![0x12, 0, 0, 0, 8, 1, 2, 3, 4, 5, 6, 7, 8],
        ),
        (
            Frame::Pong([8, 7, 6, 5, 4, 3, 2, 1]),
            vec![0x13, 0, 0, 0, 8, 8, 7, 6, 5, 4, 3, 2, 1],
        ),
        (
            Frame::Health("hi".into()),
            vec![0x14, 0, 0, 0, 2, b'h', b'i'],
        ),
        (Frame::Health(String::new()), vec![0x14, 0, 0, 0, 0]),
        (
            Frame::Restarting {
                reconnect_in: Duration::from_millis(1000),
                try_for: Duration::from_millis(10_000),
            },
            vec![0x15, 0, 0, 0, 8, 0, 0, 0x03, 0xe8, 0, 0, 0x27, 0x10],
        ),
        (
            Frame::Unknown {
                kind: 0x7f,
                payload: vec![9, 9],
            },
            vec![0x7f, 0, 0, 0, 2, 9, 9],
        ),
    ];
    for (frame, wire) in cases {
        assert_eq!(frame.encode(), wire, "{frame:?}");
        let back = Frame::decode(wire[0], &wire[5..]).unwrap();
        assert_eq!(back, frame);
    }
}

#[test]
fn decode_tolerance_and_errors() {
    // PeerGone without the reason byte (old servers) = disconnected.
    let f = Frame::decode(kind::PEER_GONE, &[0x77; 32]).unwrap();
    assert_eq!(
        f,
        Frame::PeerGone {
            peer: k(0x77),
            reason: PeerGoneReason::Disconnected
        }
    );
    // Unknown reason byte kept.
    let f = Frame::decode(kind::PEER_GONE, &cat(&[&[0x77; 32], &[9]])).unwrap();
    assert!(matches!(
        f,
        Frame::PeerGone {
            reason: PeerGoneReason::Other(9),
            ..
        }
    ));
    // A longer ping body: first 8 bytes count.
    assert_eq!(
        Frame::decode(kind::PING, &[1, 2, 3, 4, 5, 6, 7, 8, 9]).unwrap(),
        Frame::Ping([1, 2, 3, 4, 5, 6, 7, 8])
    );
    // ServerKey with extra bytes for future use.
    let mut sk = cat(&[&MAGIC, &[0x11; 32], b"future"]);
    assert_eq!(
        Frame::decode(kind::SERVER_KEY, &sk).unwrap(),
        Frame::ServerKey {
            key: k(0x11),
            extra: b"future".to_vec()
        }
    );
    sk[0] = b'X';
    assert!(matches!(
        Frame::decode(kind::SERVER_KEY, &sk),
        Err(DerpError::BadMagic)
    ));
    for (t, body) in [
        (kind::SERVER_KEY, vec![0u8; 39]),
        (kind::CLIENT_INFO, vec![0u8; 55]),
        (kind::SERVER_INFO, vec![0u8; 23]),
        (kind::SEND_PACKET, vec![0u8; 31]),
        (kind::RECV_PACKET, vec![0u8; 31]),
        (kind::PEER_GONE, vec![0u8; 31]),
        (kind::PEER_PRESENT, vec![0u8; 31]),
        (kind::PING, vec![0u8; 7]),
        (kind::PONG, vec![0u8; 7]),
        (kind::RESTARTING, vec![0u8; 7]),
        (kind::NOTE_PREFERRED, vec![]),
        (kind::NOTE_PREFERRED, vec![1, 1]),
    ] {
        assert!(
            matches!(Frame::decode(t, &body), Err(DerpError::Malformed { .. })),
            "type {t:#x} len {}",
            body.len()
        );
    }
    // Invalid UTF-8 health text does not fail.
    assert!(matches!(
        Frame::decode(kind::HEALTH, &[0xff, b'x']).unwrap(),
        Frame::Health(_)
    ));
}

#[tokio::test]
async fn reader_handles_split_reads_and_bounds() {
    let (mut tx, rx) = tokio::io::duplex(64);
    let mut r = FrameReader::new(rx);
    let wire = cat(&[
        &Frame::KeepAlive.encode(),
        &Frame::SendPacket {
            dst: k(1),
            data: vec![7; 300],
        }
        .encode(),
        // Header announcing 2 MiB: rejected before any payload is read.
        &[0x05, 0x00, 0x20, 0x00, 0x00],
    ]);
    let writer = tokio::spawn(async move {
        // Trickle: every byte in its own write.
        for b in wire {
            tx.write_all(&[b]).await.unwrap();
        }
        tx
    });
    assert_eq!(
        r.next_frame(CLIENT_MAX_FRAME_LEN).await.unwrap(),
        Some((kind::KEEP_ALIVE, vec![]))
    );
    let (t, p) = r.next_frame(CLIENT_MAX_FRAME_LEN).await.unwrap().unwrap();
    assert_eq!(t, kind::SEND_PACKET);
    assert_eq!(p.len(), 332);
    match r.next_frame(CLIENT_MAX_FRAME_LEN).await {
        Err(DerpError::FrameTooLarge { kind, len, max }) => {
            assert_eq!((kind, len, max), (5, 2 << 20, 1 << 20));
        }
        other => panic!("expected FrameTooLarge, got {other:?}"),
    }
    drop(writer.await.unwrap());
}

#[tokio::test]
async fn reader_eof_clean_and_mid_frame() {
    let (mut tx, rx) = tokio::io::duplex(64);
    tx.write_all(&Frame::KeepAlive.encode()).await.unwrap();
    drop(tx);
    let mut r = FrameReader::new(rx);
    assert!(r.next_frame(100).await.unwrap().is_some());
    assert!(r.next_frame(100).await.unwrap().is_none());

    let (mut tx, rx) = tokio::io::duplex(64);
    tx.write_all(&[0x06, 0, 0, 0, 3, 1]).await.unwrap();
    drop(tx);
    let mut r = FrameReader::new(rx);
    assert!(matches!(r.next_frame(100).await, Err(DerpError::Io(_))));
}

#[tokio::test]
async fn reader_is_cancel_safe() {
    let (mut tx, rx) = tokio::io::duplex(64);
    let mut r = FrameReader::new(rx);
    let wire = encode_frame(0x42, b"hello");
    tx.write_all(&wire[..4]).await.unwrap();
    // A pending read that gets cancelled must not lose the 4 bytes.
    let t = tokio::time::timeout(Duration::from_millis(20), r.next_frame(100)).await;
    assert!(t.is_err(), "no full frame yet");
    tx.write_all(&wire[4..]).await.unwrap();
    assert_eq!(
        r.next_frame(100).await.unwrap(),
        Some((0x42, b"hello".to_vec()))
    );
}

#[test]
fn key_text_and_wire_forms() {
    let p = k(0xab);
    assert_eq!(p.to_text(), format!("nodekey:{}", "ab".repeat(32)));
    assert_eq!(NodePublic::parse_text(&p.to_text()).unwrap(), p);
    assert_eq!(
        NodePublic::parse_text(&format!("nodekey:{}", "AB".repeat(32))).unwrap(),
        p
    );
    assert!(matches!(
        NodePublic::parse_text(&format!("discokey:{}", "ab".repeat(32))),
        Err(KeyError::MissingPrefix { .. })
    ));
    assert!(matches!(
        NodePublic::parse_text(&format!("nodekey:{}", "ab".repeat(31))),
        Err(KeyError::WrongLength { got: 62, want: 64 })
    ));
    assert_eq!(
        NodePublic::parse_text(&format!("nodekey:{}zz", "ab".repeat(31))),
        Err(KeyError::BadHex)
    );
    assert_eq!(p.to_wire(), cat(&[b"np", &[0xab; 32]]));
    assert_eq!(NodePublic::from_wire(&p.to_wire()).unwrap(), p);
    assert!(NodePublic::from_wire(&[0xab; 32]).is_err());
    assert!(NodePublic::from_wire(&cat(&[b"np", &[0xab; 33]])).is_err());
    assert_eq!(p.to_untyped_hex(), "ab".repeat(32));
    assert_eq!(
        DiscoPublic::from_raw([0xcd; 32]).to_text(),
        format!("discokey:{}", "cd".repeat(32))
    );
    // Debug never prints a private key.
    let sk = NodePrivate::generate();
    let dbg = format!("{sk:?}");
    assert!(!dbg.contains(&sk.to_text()[8..]));
    assert_eq!(
        NodePrivate::parse_text(&sk.to_text()).unwrap().public(),
        sk.public()
    );
}

#[test]
fn generated_keys_are_clamped_and_distinct() {
    let a = NodePrivate::generate();
    let b = NodePrivate::generate();
    assert_ne!(a.public(), b.public());
    let raw = a.to_raw();
    assert_eq!(raw[0] & 7, 0);
    assert_eq!(raw[31] & 0xc0, 0x40);
}

#[test]
fn nacl_box_round_trip_and_layout() {
    let a = NodePrivate::generate();
    let b = NodePrivate::generate();
    let sealed = a.seal_to(&b.public(), b"{\"version\":2}");
    // nonce(24) + tag(16) + 13 bytes
    assert_eq!(sealed.len(), 24 + 16 + 13);
    assert_eq!(
        b.open_from(&a.public(), &sealed).unwrap(),
        b"{\"version\":2}"
    );
    // Wrong sender key, tampering, truncation: all refused.
    let c = NodePrivate::generate();
    assert!(b.open_from(&c.public(), &sealed).is_none());
    let mut bad = sealed.clone();
    bad[30] ^= 1;
    assert!(b.open_from(&a.public(), &bad).is_none());
    assert!(b.open_from(&a.public(), &sealed[..39]).is_none());
    // Fresh nonce each time.
    assert_ne!(
        a.seal_to(&b.public(), b"x")[..24],
        a.seal_to(&b.public(), b"x")[..24]
    );
}

/// Known-answer test from the NaCl distribution (`tests/box.c`, the
/// Alice/Bob example in "Cryptography in NaCl"): checks the first bytes of
/// the box of the published 131-byte message under the published keys and
/// nonce, independent of any implementation here.
#[test]
fn nacl_box_known_answer() {
    let alice_sk = [
        0x77, 0x07, 0x6d, 0x0a, 0x73, 0x18, 0xa5, 0x7d, 0x3c, 0x16, 0xc1, 0x72, 0x51, 0xb2, 0x66,
        0x45, 0xdf, 0x4c, 0x2f, 0x87, 0xeb, 0xc0, 0x99, 0x2a, 0xb1, 0x77, 0xfb, 0xa5, 0x1d, 0xb9,
        0x2c, 0x2a,
    ];
    let bob_pk = [
        0xde, 0x9e, 0xdb, 0x7d, 0x7b, 0x7d, 0xc1, 0xb4, 0xd3, 0x5b, 0x61, 0xc2, 0xec, 0xe4, 0x35,
        0x37, 0x3f, 0x83, 0x43, 0xc8, 0x5b, 0x78, 0x67, 0x4d, 0xad, 0xfc, 0x7e, 0x14, 0x6f, 0x88,
        0x2b, 0x4f,
    ];
    let nonce = [
        0x69, 0x69, 0x6e, 0xe9, 0x55, 0xb6, 0x2b, 0x73, 0xcd, 0x62, 0xbd, 0xa8, 0x75, 0xfc, 0x73,
        0xd6, 0x82, 0x19, 0xe0, 0x03, 0x6b, 0x7a, 0x0b, 0x37,
    ];
    let m = [
        0xbe, 0x07, 0x5f, 0xc5, 0x3c, 0x81, 0xf2, 0xd5, 0xcf, 0x14, 0x13, 0x16, 0xeb, 0xeb, 0x0c,
        0x7b, 0x52, 0x28, 0xc5, 0x2a, 0x4c, 0x62, 0xcb, 0xd4, 0x4b, 0x66, 0x84, 0x9b, 0x64, 0x24,
        0x4f, 0xfc, 0xe5, 0xec, 0xba, 0xaf, 0x33, 0xbd, 0x75, 0x1a, 0x1a, 0xc7, 0x28, 0xd4, 0x5e,
        0x6c, 0x61, 0x29, 0x6c, 0xdc, 0x3c, 0x01, 0x23, 0x35, 0x61, 0xf4, 0x1d, 0xb6, 0x6c, 0xce,
        0x31, 0x4a, 0xdb, 0x31, 0x0e, 0x3b, 0xe8, 0x25, 0x0c, 0x46, 0xf0, 0x6d, 0xce, 0xea, 0x3a,
        0x7f, 0xa1, 0x34, 0x80, 0x57, 0xe2, 0xf6, 0x55, 0x6a, 0xd6, 0xb1, 0x31, 0x8a, 0x02, 0x4a,
        0x83, 0x8f, 0x21, 0xaf, 0x1f, 0xde, 0x04, 0x89, 0x77, 0xeb, 0x48, 0xf5, 0x9f, 0xfd, 0x49,
        0x24, 0xca, 0x1c, 0x60, 0x90, 0x2e, 0x52, 0xf0, 0xa0, 0x89, 0xbc, 0x76, 0x89, 0x70, 0x40,
        0xe0, 0x82, 0xf9, 0x37, 0x76, 0x38, 0x48, 0x64, 0x5e, 0x07, 0x05,
    ];
    let alice = NodePrivate::from_raw(alice_sk);
    let sealed = alice.seal_to_with_nonce(&NodePublic::from_raw(bob_pk), &nonce, &m);
    // Published box: tag f3 ff c7 70 3f 94 00 e5 2a 7d fb 4b 3d 33 05 d9,
    // then ciphertext 8e 99 3b 9f 48 68 12 73 c2 96 50 ba 32 fc 76 ce …
    let expect_prefix = [
        0xf3, 0xff, 0xc7, 0x70, 0x3f, 0x94, 0x00, 0xe5, 0x2a, 0x7d, 0xfb, 0x4b, 0x3d, 0x33, 0x05,
        0xd9, 0x8e, 0x99, 0x3b, 0x9f, 0x48, 0x68, 0x12, 0x73, 0xc2, 0x96, 0x50, 0xba, 0x32, 0xfc,
        0x76, 0xce,
    ];
    assert_eq!(&sealed[..24], &nonce);
    assert_eq!(&sealed[24..24 + 32], &expect_prefix);
    assert_eq!(sealed.len(), 24 + 16 + 131);
}
