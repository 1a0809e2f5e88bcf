//! DERP wire framing: `type(1) | length(4, big-endian, payload only) |
//! payload`, the frame types, typed encode/decode of each frame body, and a
//! cancel-safe frame reader.
//!
//! Facts (from Tailscale's `derp/derp.go`): magic `"DERP🔑"` =
//! `44 45 52 50 f0 9f 94 91`; protocol version 2; `MaxPacketSize` 64 KiB;
//! clients refuse frames over 1 MiB; the ServerKey greeting is read with a
//! 1 KiB bound; ClientInfo frames over 256 KiB are refused by servers.

use std::time::Duration;

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;

use super::key::{NodePublic, KEY_LEN, NONCE_LEN};
use super::DerpError;

/// The 8-byte magic at the start of a ServerKey frame.
pub const MAGIC: [u8; 8] = [0x44, 0x45, 0x52, 0x50, 0xf0, 0x9f, 0x94, 0x91];
/// DERP protocol version spoken here (v2: RecvPacket carries the source key).
pub const PROTOCOL_VERSION: u32 = 2;
/// Largest packet (payload after the key) a SendPacket/RecvPacket may carry.
pub const MAX_PACKET_SIZE: usize = 64 << 10;
/// `type(1) + length(4)`.
pub const FRAME_HEADER_LEN: usize = 5;
/// Largest frame a client accepts from a server.
pub const CLIENT_MAX_FRAME_LEN: u32 = 1 << 20;
/// Bound on the ServerKey greeting.
pub const SERVER_KEY_MAX_FRAME_LEN: u32 = 1 << 10;
/// Bound on the ClientInfo frame a server accepts.
pub const CLIENT_INFO_MAX_FRAME_LEN: u32 = 256 << 10;
/// Largest frame a server accepts from a client after the handshake
/// (a full SendPacket; mesh frames are not served).
pub const SERVER_MAX_FRAME_LEN: u32 = (2 * KEY_LEN + MAX_PACKET_SIZE) as u32;

/// Frame type bytes.
pub mod kind {
    pub const SERVER_KEY: u8 = 0x01;
    pub const CLIENT_INFO: u8 = 0x02;
    pub const SERVER_INFO: u8 = 0x03;
    pub const SEND_PACKET: u8 = 0x04;
    pub const RECV_PACKET: u8 = 0x05;
    pub const KEEP_ALIVE: u8 = 0x06;
    pub const NOTE_PREFERRED: u8 = 0x07;
    pub const PEER_GONE: u8 = 0x08;
    pub const PEER_PRESENT: u8 = 0x09;
    pub const FORWARD_PACKET: u8 = 0x0a;
    pub const WATCH_CONNS: u8 = 0x10;
    pub const CLOSE_PEER: u8 = 0x11;
    pub const PING: u8 = 0x12;
    pub const PONG: u8 = 0x13;
    pub const HEALTH: u8 = 0x14;
    pub const RESTARTING: u8 = 0x15;
}

/// Reason byte of a PeerGone frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerGoneReason {
    /// `0x00`: the peer was connected here and left.
    Disconnected,
    /// `0x01`: the server does not know the peer.
    NotHere,
    Other(u8),
}

impl PeerGoneReason {
    pub fn from_byte(b: u8) -> Self {
        match b {
            0x00 => Self::Disconnected,
            0x01 => Self::NotHere,
            x => Self::Other(x),
        }
    }

    pub fn to_byte(self) -> u8 {
        match self {
            Self::Disconnected => 0x00,
            Self::NotHere => 0x01,
            Self::Other(x) => x,
        }
    }
}

/// One decoded DERP frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// Server greeting: magic + server key (+ bytes reserved for future use).
    ServerKey {
        key: NodePublic,
        extra: Vec<u8>,
    },
    /// Client login: its key and `nonce | box(JSON)` sealed to the server.
    ClientInfo {
        key: NodePublic,
        sealed: Vec<u8>,
    },
    /// Server reply: `nonce | box(JSON)` sealed to the client.
    ServerInfo {
        sealed: Vec<u8>,
    },
    SendPacket {
        dst: NodePublic,
        data: Vec<u8>,
    },
    RecvPacket {
        src: NodePublic,
        data: Vec<u8>,
    },
    KeepAlive,
    NotePreferred(bool),
    PeerGone {
        peer: NodePublic,
        reason: PeerGoneReason,
    },
    PeerPresent {
        peer: NodePublic,
    },
    Ping([u8; 8]),
    Pong([u8; 8]),
    /// Connection health problem; empty text clears it.
    Health(String),
    Restarting {
        reconnect_in: Duration,
        try_for: Duration,
    },
    /// Any other type (mesh frames, future frames), kept raw.
    Unknown {
        kind: u8,
        payload: Vec<u8>,
    },
}

impl Frame {
    /// The type byte this frame is sent with.
    pub fn kind(&self) -> u8 {
        match self {
            Frame::ServerKey { .. } => kind::SERVER_KEY,
            Frame::ClientInfo { .. } => kind::CLIENT_INFO,
            Frame::ServerInfo { .. } => kind::SERVER_INFO,
            Frame::SendPacket { .. } => kind::SEND_PACKET,
            Frame::RecvPacket { .. } => kind::RECV_PACKET,
            Frame::KeepAlive => kind::KEEP_ALIVE,
            Frame::NotePreferred(_) => kind::NOTE_PREFERRED,
            Frame::PeerGone { .. } => kind::PEER_GONE,
            Frame::PeerPresent { .. } => kind::PEER_PRESENT,
            Frame::Ping(_) => kind::PING,
            Frame::Pong(_) => kind::PONG,
            Frame::Health(_) => kind::HEALTH,
            Frame::Restarting { .. } => kind::RESTARTING,
            Frame::Unknown { kind, .. } => *kind,
        }
    }

    /// The frame body (without the 5-byte header).
    pub fn payload(&self) -> Vec<u8> {
        fn key_then(key: &NodePublic, rest: &[u8]) -> Vec<u8> {
            let mut v = Vec::with_capacity(KEY_LEN + rest.len());
            v.extend_from_slice(key.as_bytes());
            v.extend_from_slice(rest);
            v
        }
        match self {
            Frame::ServerKey { key, extra } => {
                let mut v = Vec::with_capacity(MAGIC.len() + KEY_LEN + extra.len());
                v.extend_from_slice(&MAGIC);
                v.extend_from_slice(key.as_bytes());
                v.extend_from_slice(extra);
                v
            }
            Frame::ClientInfo { key, sealed } => key_then(key, sealed),
            Frame::ServerInfo { sealed } => sealed.clone(),
            Frame::SendPacket { dst, data } => key_then(dst, data),
            Frame::RecvPacket { src, data } => key_then(src, data),
            Frame::KeepAlive => Vec::new(),
            Frame::NotePreferred(p) => vec![u8::from(*p)],
            Frame::PeerGone { peer, reason } => key_then(peer, &[reason.to_byte()]),
            Frame::PeerPresent { peer } => peer.as_bytes().to_vec(),
            Frame::Ping(d) | Frame::Pong(d) => d.to_vec(),
            Frame::Health(text) => text.as_bytes().to_vec(),
            Frame::Restarting {
                reconnect_in,
                try_for,
            } => {
                let mut v = Vec::with_capacity(8);
                v.extend_from_slice(&millis_u32(*reconnect_in).to_be_bytes());
                v.extend_from_slice(&millis_u32(*try_for).to_be_bytes());
                v
            }
            Frame::Unknown { payload, .. } => payload.clone(),
        }
    }

    /// Header + body, ready to write.
    pub fn encode(&self) -> Vec<u8> {
        encode_frame(self.kind(), &self.payload())
    }

    /// Decodes a frame body of type `kind`. Known types that are too short
    /// are errors ([`DerpError::Malformed`]); receivers may skip them, as
    /// Tailscale's client does. Unknown types decode to [`Frame::Unknown`].
    pub fn decode(kind: u8, payload: &[u8]) -> Result<Frame, DerpError> {
        let short = |what: &'static str| DerpError::Malformed { kind, reason: what };
        let key_at = |b: &[u8]| NodePublic::from_slice(&b[..KEY_LEN]);
        Ok(match kind {
            kind::SERVER_KEY => {
                if payload.len() < MAGIC.len() + KEY_LEN {
                    return Err(short("short server key"));
                }
                if payload[..MAGIC.len()] != MAGIC {
                    return Err(DerpError::BadMagic);
                }
                let rest = &payload[MAGIC.len()..];
                Frame::ServerKey {
                    key: key_at(rest).map_err(|_| short("bad key"))?,
                    extra: rest[KEY_LEN..].to_vec(),
                }
            }
            kind::CLIENT_INFO => {
                if payload.len() < KEY_LEN + NONCE_LEN {
                    return Err(short("short client info"));
                }
                Frame::ClientInfo {
                    key: key_at(payload).map_err(|_| short("bad key"))?,
                    sealed: payload[KEY_LEN..].to_vec(),
                }
            }
            kind::SERVER_INFO => {
                if payload.len() < NONCE_LEN {
                    return Err(short("short server info"));
                }
                Frame::ServerInfo {
                    sealed: payload.to_vec(),
                }
            }
            kind::SEND_PACKET | kind::RECV_PACKET => {
                if payload.len() < KEY_LEN {
                    return Err(short("short packet"));
                }
                let k = key_at(payload).map_err(|_| short("bad key"))?;
                let data = payload[KEY_LEN..].to_vec();
                if kind == kind::SEND_PACKET {
                    Frame::SendPacket { dst: k, data }
                } else {
                    Frame::RecvPacket { src: k, data }
                }
            }
            kind::KEEP_ALIVE => Frame::KeepAlive,
            kind::NOTE_PREFERRED => {
                if payload.len() != 1 {
                    return Err(short("note preferred must be 1 byte"));
                }
                Frame::NotePreferred(payload[0] != 0)
            }
            kind::PEER_GONE => {
                if payload.len() < KEY_LEN {
                    return Err(short("short peer gone"));
                }
                // Older servers sent no reason byte: that means "disconnected".
                let reason = payload
                    .get(KEY_LEN)
                    .map_or(PeerGoneReason::Disconnected, |b| {
                        PeerGoneReason::from_byte(*b)
                    });
                Frame::PeerGone {
                    peer: key_at(payload).map_err(|_| short("bad key"))?,
                    reason,
                }
            }
            kind::PEER_PRESENT => {
                if payload.len() < KEY_LEN {
                    return Err(short("short peer present"));
                }
                Frame::PeerPresent {
                    peer: key_at(payload).map_err(|_| short("bad key"))?,
                }
            }
            kind::PING | kind::PONG => {
                if payload.len() < 8 {
                    return Err(short("short ping/pong"));
                }
                let mut d = [0u8; 8];
                d.copy_from_slice(&payload[..8]);
                if kind == kind::PING {
                    Frame::Ping(d)
                } else {
                    Frame::Pong(d)
                }
            }
            kind::HEALTH => Frame::Health(String::from_utf8_lossy(payload).into_owned()),
            kind::RESTARTING => {
                if payload.len() < 8 {
                    return Err(short("short restarting"));
                }
                let a = u32::from_be_bytes([payload[0], payload[1], payload[2], payload[3]]);
                let b = u32::from_be_bytes([payload[4], payload[5], payload[6], payload[7]]);
                Frame::Restarting {
                    reconnect_in: Duration::from_millis(u64::from(a)),
                    try_for: Duration::from_millis(u64::from(b)),
                }
            }
            other => Frame::Unknown {
                kind: other,
                payload: payload.to_vec(),
            },
        })
    }
}

fn millis_u32(d: Duration) -> u32 {
    u32::try_from(d.as_millis()).unwrap_or(u32::MAX)
}

/// `type | len(BE u32) | payload`.
pub fn encode_frame(kind: u8, payload: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(FRAME_HEADER_LEN + payload.len());
    v.push(kind);
    // Payloads here are bounded far below 4 GiB by every caller.
    v.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    v.extend_from_slice(payload);
    v
}

/// Spare room [`FrameReader`] keeps for each read.
const READ_CHUNK: usize = 64 << 10;

/// Most bytes of queued frames [`write_queued`] gathers into one write.
const WRITE_BATCH: usize = 256 << 10;

/// Writes `first` and whatever else is already queued on `rx` (up to
/// [`WRITE_BATCH`] bytes) with as few writes as possible, then flushes.
/// Returns how many frames it wrote.
///
/// A relayed WireGuard datagram is a ~1.3 KB frame; writing each on its own
/// cost one syscall (and, on loopback, one pass through the receiver's TCP
/// stack) per packet, which was most of a transfer's CPU. `out` is a scratch
/// buffer kept by the caller across calls.
pub(crate) async fn write_queued<W: AsyncWrite + Unpin>(
    w: &mut W,
    first: Vec<u8>,
    rx: &mut mpsc::Receiver<Vec<u8>>,
    out: &mut Vec<u8>,
) -> std::io::Result<u64> {
    out.clear();
    out.extend_from_slice(&first);
    let mut frames = 1;
    while out.len() < WRITE_BATCH {
        match rx.try_recv() {
            Ok(more) => {
                out.extend_from_slice(&more);
                frames += 1;
            }
            Err(_) => break,
        }
    }
    w.write_all(out).await?;
    w.flush().await?;
    Ok(frames)
}

/// Reads whole frames from a byte stream.
///
/// Cancel-safe: bytes read so far stay buffered in the reader, so dropping a
/// pending [`next_frame`](Self::next_frame) (e.g. in `tokio::select!`) loses
/// nothing. The length bound is checked on the header, before any payload is
/// buffered.
#[derive(Debug)]
pub struct FrameReader<R> {
    inner: R,
    buf: BytesMut,
}

impl<R: AsyncRead + Unpin> FrameReader<R> {
    pub fn new(inner: R) -> Self {
        Self {
            inner,
            buf: BytesMut::with_capacity(READ_CHUNK),
        }
    }

    /// Bytes already read past the last returned frame.
    pub fn buffered(&self) -> &[u8] {
        &self.buf
    }

    pub fn into_inner(self) -> (R, BytesMut) {
        (self.inner, self.buf)
    }

    /// The next frame as `(type, payload)`, or `Ok(None)` on a clean EOF
    /// between frames. Frames longer than `max_len` are an error.
    pub async fn next_frame(&mut self, max_len: u32) -> Result<Option<(u8, Vec<u8>)>, DerpError> {
        loop {
            if self.buf.len() >= FRAME_HEADER_LEN {
                let kind = self.buf[0];
                let len = u32::from_be_bytes([self.buf[1], self.buf[2], self.buf[3], self.buf[4]]);
                if len > max_len {
                    return Err(DerpError::FrameTooLarge {
                        kind,
                        len,
                        max: max_len,
                    });
                }
                let total = FRAME_HEADER_LEN + len as usize;
                if self.buf.len() >= total {
                    self.buf.advance(FRAME_HEADER_LEN);
                    let payload = self.buf.split_to(len as usize).to_vec();
                    return Ok(Some((kind, payload)));
                }
                self.buf.reserve(total - self.buf.len());
            }
            // Read big: one syscall should bring many small frames.
            self.buf.reserve(READ_CHUNK);
            let n = self.inner.read_buf(&mut self.buf).await?;
            if n == 0 {
                if self.buf.is_empty() {
                    return Ok(None);
                }
                return Err(DerpError::Io(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "connection closed mid-frame",
                )));
            }
        }
    }

    /// Like [`next_frame`](Self::next_frame) but EOF is an error.
    pub async fn expect_frame(&mut self, max_len: u32) -> Result<(u8, Vec<u8>), DerpError> {
        self.next_frame(max_len).await?.ok_or(DerpError::Closed)
    }
}
