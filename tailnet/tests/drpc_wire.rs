//! dRPC at the byte level: varints, frames and packets as Coder's tailnet
//! API puts them on a yamux stream, error bodies, splitting and
//! reassembly, and the reader's rules (ID order, size cap, kind changes).

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use coder_tailnet::drpc::{
    decode_error, encode_error, encode_packet, put_varint, read_varint, DrpcError, Frame, Kind,
    MessageReceiver, Packet, PacketReader, VarintError, MAX_MESSAGE_SIZE, SPLIT_SIZE,
};
use tokio::io::{AsyncRead, ReadBuf};

const COORDINATE: &str = "/coder.tailnet.v2.Tailnet/Coordinate";

fn varint(v: u64) -> Vec<u8> {
    let mut out = Vec::new();
    put_varint(&mut out, v);
    out
}

/// Hands out at most `chunk` bytes per read, to exercise reassembly across
/// arbitrary read boundaries.
struct Trickle {
    data: Vec<u8>,
    pos: usize,
    chunk: usize,
}

impl Trickle {
    fn new(data: Vec<u8>, chunk: usize) -> Self {
        Trickle {
            data,
            pos: 0,
            chunk,
        }
    }
}

impl AsyncRead for Trickle {
    fn poll_read(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let n = self
            .chunk
            .min(buf.remaining())
            .min(self.data.len() - self.pos);
        let start = self.pos;
        buf.put_slice(&self.data[start..start + n]);
        self.pos += n;
        Poll::Ready(Ok(()))
    }
}

fn packet(kind: Kind, stream: u64, message: u64, data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    encode_packet(&mut out, kind, false, stream, message, data, SPLIT_SIZE);
    out
}

#[test]
fn varint_vectors() {
    let cases: &[(u64, &[u8])] = &[
        (0, &[0x00]),
        (1, &[0x01]),
        (127, &[0x7f]),
        (128, &[0x80, 0x01]),
        (300, &[0xac, 0x02]),
        (16_383, &[0xff, 0x7f]),
        (16_384, &[0x80, 0x80, 0x01]),
        (u64::from(u32::MAX), &[0xff, 0xff, 0xff, 0xff, 0x0f]),
        (
            u64::MAX,
            &[0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01],
        ),
    ];
    for &(v, bytes) in cases {
        assert_eq!(varint(v), bytes, "encode {v}");
        assert_eq!(read_varint(bytes), Ok(Some((v, bytes.len()))), "decode {v}");
        // Trailing bytes are left alone.
        let mut more = bytes.to_vec();
        more.extend_from_slice(&[0x55, 0x66]);
        assert_eq!(read_varint(&more), Ok(Some((v, bytes.len()))));
    }
}

#[test]
fn varint_edge_cases() {
    // Incomplete: needs more bytes, not an error.
    assert_eq!(read_varint(&[]), Ok(None));
    assert_eq!(read_varint(&[0x80]), Ok(None));
    assert_eq!(read_varint(&[0xff; 9]), Ok(None));
    // Non-minimal encodings are accepted, as dRPC and protobuf do.
    assert_eq!(read_varint(&[0x80, 0x00]), Ok(Some((0, 2))));
    assert_eq!(read_varint(&[0xff, 0x80, 0x00]), Ok(Some((127, 3))));
    // The 10th byte may only carry bit 63.
    let mut overflow = vec![0xff; 9];
    overflow.push(0x02);
    assert_eq!(read_varint(&overflow), Err(VarintError::Overflow));
    let mut overflow = vec![0x80; 9];
    overflow.push(0x7f);
    assert_eq!(read_varint(&overflow), Err(VarintError::Overflow));
    // An 11th byte is never valid.
    let mut long = vec![0xff; 10];
    long.push(0x01);
    assert_eq!(read_varint(&long), Err(VarintError::TooLong));
    assert_eq!(read_varint(&[0x80; 10]), Err(VarintError::TooLong));
}

#[test]
fn opening_coordinate_bytes() {
    assert_eq!(COORDINATE.len(), 36);
    let wire = packet(Kind::Invoke, 1, 1, COORDINATE.as_bytes());
    assert_eq!(&wire[..4], &[0x03, 0x01, 0x01, 0x24]);
    assert_eq!(&wire[4..], COORDINATE.as_bytes());

    // Each request after it: Message, done, stream 1, next message ID.
    let req = [0x0a, 0x02, 0x08, 0x01];
    assert_eq!(
        packet(Kind::Message, 1, 2, &req),
        [0x05, 0x01, 0x02, 0x04, 0x0a, 0x02, 0x08, 0x01]
    );
    // Message IDs past 127 take two varint bytes.
    assert_eq!(
        &packet(Kind::Message, 1, 200, &[])[..4],
        &[0x05, 0x01, 0xc8, 0x01]
    );
}

#[test]
fn control_byte_per_kind() {
    let cases = [
        (Kind::Invoke, 0x03),
        (Kind::Message, 0x05),
        (Kind::Error, 0x07),
        (Kind::Cancel, 0x09),
        (Kind::Close, 0x0b),
        (Kind::CloseSend, 0x0d),
        (Kind::InvokeMetadata, 0x0f),
    ];
    for (kind, byte) in cases {
        assert_eq!(
            packet(kind, 1, 3, &[]),
            [byte, 0x01, 0x03, 0x00],
            "{kind:?}"
        );
        assert_eq!(Kind::from_code(kind.code()), kind);
    }
    // Control bit (bit 7) and a not-done frame (bit 0 clear).
    let f = Frame {
        kind: Kind::Cancel,
        control: true,
        done: false,
        stream_id: 1,
        message_id: 4,
        data: vec![],
    };
    let mut out = Vec::new();
    f.encode(&mut out);
    assert_eq!(out, [0x88, 0x01, 0x04, 0x00]);
    assert_eq!(Frame::decode(&out).expect("ok"), Some((f, 4)));
    // Unknown kinds survive a round trip.
    let (g, _) = Frame::decode(&[0xff, 0x01, 0x01, 0x00])
        .expect("ok")
        .expect("frame");
    assert_eq!((g.kind, g.control, g.done), (Kind::Other(63), true, true));
}

#[test]
fn frame_decode_partial_and_oversized() {
    let wire = packet(Kind::Message, 1, 2, b"hello");
    for cut in 0..wire.len() {
        assert_eq!(
            Frame::decode(&wire[..cut]).expect("no error"),
            None,
            "cut {cut}"
        );
    }
    let (f, used) = Frame::decode(&wire).expect("ok").expect("frame");
    assert_eq!(used, wire.len());
    assert_eq!(f.data, b"hello");
    // A declared length beyond the 4 MiB cap is refused before buffering.
    let mut huge = vec![0x05, 0x01, 0x02];
    put_varint(&mut huge, MAX_MESSAGE_SIZE as u64 + 1);
    assert!(matches!(Frame::decode(&huge), Err(DrpcError::Protocol(_))));
    // A bad varint in the header is an error, not "need more".
    let bad = [
        0x05, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01,
    ];
    assert!(matches!(Frame::decode(&bad), Err(DrpcError::Protocol(_))));
}

#[test]
fn error_body() {
    let body = encode_error(12, "Unimplemented");
    assert_eq!(&body[..8], &[0, 0, 0, 0, 0, 0, 0, 12]);
    assert_eq!(&body[8..], b"Unimplemented");
    assert_eq!(decode_error(&body), (12, "Unimplemented".to_string()));
    assert_eq!(
        decode_error(&encode_error(0x0102_0304_0506_0708, "")),
        (0x0102_0304_0506_0708, String::new())
    );
    // Too short to hold a code: code 0, bytes kept as text.
    assert_eq!(decode_error(b"oops"), (0, "oops".to_string()));
}

#[tokio::test]
async fn split_at_64k_and_reassembled() {
    let msg: Vec<u8> = (0..200 * 1024u32).map(|i| (i % 251) as u8).collect();
    let wire = packet(Kind::Message, 1, 2, &msg);
    // Frames: 64 KiB, 64 KiB, 64 KiB, 8 KiB; only the last is done.
    let mut rest = &wire[..];
    let mut sizes = Vec::new();
    while let Some((f, used)) = Frame::decode(rest).expect("ok") {
        assert_eq!((f.kind, f.stream_id, f.message_id), (Kind::Message, 1, 2));
        sizes.push((f.data.len(), f.done));
        rest = &rest[used..];
    }
    assert!(rest.is_empty());
    assert_eq!(
        sizes,
        [(65536, false), (65536, false), (65536, false), (8192, true)]
    );
    // Reassembly across odd read boundaries.
    let mut both = wire.clone();
    both.extend(packet(Kind::CloseSend, 1, 3, &[]));
    let mut rd = PacketReader::new(Trickle::new(both, 997));
    let p = rd.read_packet().await.expect("ok").expect("packet");
    assert_eq!(
        p,
        Packet {
            kind: Kind::Message,
            control: false,
            stream_id: 1,
            message_id: 2,
            data: msg
        }
    );
    let p = rd.read_packet().await.expect("ok").expect("packet");
    assert_eq!((p.kind, p.message_id), (Kind::CloseSend, 3));
    assert!(rd.read_packet().await.expect("clean EOF").is_none());
}

#[tokio::test]
async fn empty_packet_is_one_done_frame() {
    let wire = packet(Kind::Message, 1, 2, &[]);
    assert_eq!(wire, [0x05, 0x01, 0x02, 0x00]);
    let mut rd = PacketReader::new(&wire[..]);
    let p = rd.read_packet().await.expect("ok").expect("packet");
    assert!(p.data.is_empty());
}

#[tokio::test]
async fn reader_caps_packet_size() {
    // Two frames of 3 KiB each, cap 4 KiB: the second one overflows.
    let mut wire = Vec::new();
    encode_packet(&mut wire, Kind::Message, false, 1, 1, &[0u8; 6144], 3072);
    let mut rd = PacketReader::with_max(&wire[..], 4096);
    assert!(matches!(
        rd.read_packet().await,
        Err(DrpcError::Protocol(_))
    ));
    // 4 MiB exactly is fine with the default cap.
    let big = vec![7u8; MAX_MESSAGE_SIZE];
    let wire = packet(Kind::Message, 1, 1, &big);
    let mut rd = PacketReader::new(&wire[..]);
    assert_eq!(
        rd.read_packet()
            .await
            .expect("ok")
            .expect("packet")
            .data
            .len(),
        MAX_MESSAGE_SIZE
    );
    // One byte more is refused.
    let mut wire = Vec::new();
    encode_packet(
        &mut wire,
        Kind::Message,
        false,
        1,
        1,
        &vec![0u8; MAX_MESSAGE_SIZE + 1],
        SPLIT_SIZE,
    );
    let mut rd = PacketReader::new(&wire[..]);
    assert!(matches!(
        rd.read_packet().await,
        Err(DrpcError::Protocol(_))
    ));
}

#[tokio::test]
async fn reader_rejects_ids_going_backwards_and_kind_changes() {
    let mut wire = packet(Kind::Message, 1, 2, b"a");
    wire.extend(packet(Kind::Message, 1, 2, b"again"));
    let mut rd = PacketReader::new(&wire[..]);
    rd.read_packet().await.expect("ok").expect("first");
    assert!(matches!(
        rd.read_packet().await,
        Err(DrpcError::Protocol(_))
    ));

    // IDs start at (1, 1): zero is never valid.
    let wire = packet(Kind::Message, 1, 0, b"x");
    assert!(matches!(
        PacketReader::new(&wire[..]).read_packet().await,
        Err(DrpcError::Protocol(_))
    ));

    let mut wire = Vec::new();
    Frame {
        kind: Kind::Message,
        control: false,
        done: false,
        stream_id: 1,
        message_id: 1,
        data: b"ab".to_vec(),
    }
    .encode(&mut wire);
    Frame {
        kind: Kind::Error,
        control: false,
        done: true,
        stream_id: 1,
        message_id: 1,
        data: b"cd".to_vec(),
    }
    .encode(&mut wire);
    assert!(matches!(
        PacketReader::new(&wire[..]).read_packet().await,
        Err(DrpcError::Protocol(_))
    ));
}

#[tokio::test]
async fn new_id_abandons_an_unfinished_packet() {
    let mut wire = Vec::new();
    Frame {
        kind: Kind::Message,
        control: false,
        done: false,
        stream_id: 1,
        message_id: 1,
        data: b"half".to_vec(),
    }
    .encode(&mut wire);
    wire.extend(packet(Kind::Message, 1, 2, b"whole"));
    let mut rd = PacketReader::new(&wire[..]);
    let p = rd.read_packet().await.expect("ok").expect("packet");
    assert_eq!((p.message_id, p.data.as_slice()), (2, &b"whole"[..]));
}

#[tokio::test]
async fn eof_inside_a_packet_is_an_error() {
    let wire = packet(Kind::Message, 1, 1, b"hello");
    let mut rd = PacketReader::new(&wire[..wire.len() - 1]);
    assert!(matches!(rd.read_packet().await, Err(DrpcError::Io(_))));
}

#[tokio::test]
async fn receiver_maps_kinds() {
    // Message, an unknown control packet (ignored), a packet of an older
    // stream (ignored), then CloseSend.
    let mut wire = packet(Kind::Message, 2, 1, b"one");
    let mut ctl = Vec::new();
    encode_packet(&mut ctl, Kind::Other(40), true, 2, 2, b"future", SPLIT_SIZE);
    wire.extend(ctl);
    wire.extend(packet(Kind::Message, 2, 3, b"two"));
    wire.extend(packet(Kind::CloseSend, 2, 4, &[]));
    let mut rx = MessageReceiver::new(&wire[..], 2);
    assert_eq!(rx.recv().await.expect("ok"), Some(b"one".to_vec()));
    assert_eq!(rx.recv().await.expect("ok"), Some(b"two".to_vec()));
    assert_eq!(rx.recv().await.expect("ok"), None);
    assert!(rx.is_finished());
    assert_eq!(rx.recv().await.expect("still done"), None);

    // Unknown kind without the control bit is an error.
    let mut wire = Vec::new();
    encode_packet(&mut wire, Kind::Other(40), false, 1, 1, &[], SPLIT_SIZE);
    let mut rx = MessageReceiver::new(&wire[..], 1);
    assert!(matches!(rx.recv().await, Err(DrpcError::Protocol(_))));

    // Error packets carry code and text.
    let wire = packet(Kind::Error, 1, 1, &encode_error(12, "Unimplemented"));
    let err = MessageReceiver::new(&wire[..], 1)
        .recv()
        .await
        .expect_err("remote error");
    assert_eq!(err.code(), Some(12));
    assert!(err.is_unimplemented());
    // dRPC's own "unknown rpc" error has no code but means the same.
    let wire = packet(
        Kind::Error,
        1,
        1,
        &encode_error(0, "protocol error: unknown rpc: \"/x/Y\""),
    );
    let err = MessageReceiver::new(&wire[..], 1)
        .recv()
        .await
        .expect_err("remote error");
    assert!(err.is_unimplemented());
    let wire = packet(Kind::Error, 1, 1, &encode_error(7, "boom"));
    let err = MessageReceiver::new(&wire[..], 1)
        .recv()
        .await
        .expect_err("remote error");
    assert!(!err.is_unimplemented());
    assert!(matches!(err, DrpcError::Remote { code: 7, ref message } if message == "boom"));

    // Transport ending without CloseSend is not a clean end.
    let wire = packet(Kind::Message, 1, 1, b"x");
    let mut rx = MessageReceiver::new(&wire[..], 1);
    rx.recv().await.expect("message");
    assert!(matches!(rx.recv().await, Err(DrpcError::Closed(_))));

    // Cancel (sent by dRPC with the control bit set).
    let mut wire = Vec::new();
    encode_packet(&mut wire, Kind::Cancel, true, 1, 1, &[], SPLIT_SIZE);
    assert!(matches!(
        MessageReceiver::new(&wire[..], 1).recv().await,
        Err(DrpcError::Canceled)
    ));
}
