//! dRPC: storj's RPC framing as Coder uses it for the tailnet API — one RPC
//! per yamux stream, dRPC stream ID 1, protobuf bodies handled by callers.
//!
//! Owns the wire codec (varints, frames, packets, error bodies), a packet
//! reader and writer over any byte stream, the client calls ([`unary`],
//! [`server_stream`], [`bidi`]) and the server side ([`accept_invoke`],
//! [`Invocation`], [`serve`]). Written from the protocol facts in
//! `shared/reference/tailnet.md` §1.4; no code is ported from storj/drpc.
//!
//! # Wire format
//!
//! A *frame* is `control(1) | varint stream | varint message | varint len |
//! data`. Control byte: bit 0 = done (last frame of its packet), bits 1–6 =
//! kind, bit 7 = control (forward compatibility: an unknown kind with this
//! bit set is ignored rather than an error). A *packet* is the frames with
//! the same (stream, message) ID concatenated up to the done frame; writers
//! split at 64 KiB, readers refuse packets over 4 MiB. Each side numbers
//! the packets it sends 1, 2, 3, … within the stream, and IDs read must
//! never go backwards.
//!
//! # Call shapes (what Go's drpcconn and generated clients send)
//!
//! - unary: Invoke(name), Message(request), CloseSend → one Message back.
//! - server stream: the same three packets, then Messages until CloseSend.
//! - bidi: Invoke only, then Messages both ways.
//! - The server ends a call with CloseSend (success) or Error (code + text).
//!
//! Do not half-close the yamux stream before the call is over: Go's dRPC
//! manager treats end-of-transport as cancellation of the call in flight,
//! so a FIN sent right after the request would cancel it. Dropping the
//! stream when done is the graceful end (see the yamux module).

use std::future::Future;
use std::io;
use std::sync::Arc;

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadHalf, WriteHalf};

use crate::yamux;

/// Largest packet we send or accept (Coder's `MaxMessageSize`, also the
/// dRPC reader's default buffer limit).
pub const MAX_MESSAGE_SIZE: usize = 4 << 20;
/// Frame data size at which writers split a packet.
pub const SPLIT_SIZE: usize = 64 << 10;
/// The dRPC stream ID of every call: each call has a transport of its own.
pub const STREAM_ID: u64 = 1;
/// Error code of "method not implemented" (`drpcerr.Unimplemented`).
pub const CODE_UNIMPLEMENTED: u64 = 12;
/// A u64 needs at most 10 LEB128 bytes.
pub const MAX_VARINT_LEN: usize = 10;

/// Packet kinds. [`Kind::Other`] keeps values this code does not know.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Kind {
    /// Starts a call; body = method name, e.g. `/coder.tailnet.v2.Tailnet/Coordinate`.
    Invoke,
    /// A protobuf-encoded message.
    Message,
    /// Ends the call with an error: 8-byte big-endian code + UTF-8 text.
    Error,
    /// The sender canceled the call.
    Cancel,
    /// The call is dead; no body.
    Close,
    /// The sender will send no more messages; no body.
    CloseSend,
    /// Metadata for the following Invoke.
    InvokeMetadata,
    Other(u8),
}

impl Kind {
    /// The 6-bit wire value.
    pub fn code(self) -> u8 {
        match self {
            Kind::Invoke => 1,
            Kind::Message => 2,
            Kind::Error => 3,
            Kind::Cancel => 4,
            Kind::Close => 5,
            Kind::CloseSend => 6,
            Kind::InvokeMetadata => 7,
            Kind::Other(k) => k & 0x3f,
        }
    }

    pub fn from_code(code: u8) -> Kind {
        match code {
            1 => Kind::Invoke,
            2 => Kind::Message,
            3 => Kind::Error,
            4 => Kind::Cancel,
            5 => Kind::Close,
            6 => Kind::CloseSend,
            7 => Kind::InvokeMetadata,
            k => Kind::Other(k),
        }
    }
}

/// Everything that can go wrong in a dRPC exchange.
#[derive(Debug, thiserror::Error)]
pub enum DrpcError {
    #[error("dRPC transport failed: {0}")]
    Io(#[from] io::Error),
    #[error("dRPC protocol error: {0}")]
    Protocol(String),
    /// The remote ended the call with an Error packet.
    #[error("dRPC call failed (code {code}): {message}")]
    Remote { code: u64, message: String },
    #[error("dRPC call canceled by the remote side")]
    Canceled,
    #[error("dRPC stream ended before {0}")]
    Closed(&'static str),
    #[error("dRPC message of {0} bytes exceeds the {MAX_MESSAGE_SIZE}-byte limit")]
    TooLarge(usize),
    #[error("could not open a yamux stream for the call: {0}")]
    Yamux(#[from] yamux::Error),
}

impl DrpcError {
    /// The code of a remote error.
    pub fn code(&self) -> Option<u64> {
        match self {
            DrpcError::Remote { code, .. } => Some(*code),
            _ => None,
        }
    }

    /// Whether the server does not implement the method: code 12, or dRPC's
    /// "unknown rpc" error, which carries no code (Coder's
    /// `IsDRPCUnimplementedError` accepts both).
    pub fn is_unimplemented(&self) -> bool {
        match self {
            DrpcError::Remote { code, message } => {
                *code == CODE_UNIMPLEMENTED || message.contains("unknown rpc: ")
            }
            _ => false,
        }
    }
}

fn protocol(msg: impl Into<String>) -> DrpcError {
    DrpcError::Protocol(msg.into())
}

// ---------------------------------------------------------------------------
// Varints
// ---------------------------------------------------------------------------

/// Why bytes are not a varint.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum VarintError {
    #[error("varint longer than {MAX_VARINT_LEN} bytes")]
    TooLong,
    #[error("varint overflows 64 bits")]
    Overflow,
}

/// Appends `v` as a protobuf varint (7 bits per byte, low first, high bit
/// = more follows).
pub fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// Reads a varint from the front of `buf`: `Ok(Some((value, bytes_used)))`,
/// or `Ok(None)` if `buf` ends inside it. Non-minimal encodings are accepted
/// (as dRPC and protobuf do); an 11th byte or bits beyond 64 are rejected
/// (dRPC would silently drop the excess bits; no correct writer sends them).
pub fn read_varint(buf: &[u8]) -> Result<Option<(u64, usize)>, VarintError> {
    let mut value: u64 = 0;
    for (i, &b) in buf.iter().enumerate().take(MAX_VARINT_LEN) {
        let bits = u64::from(b & 0x7f);
        if i == MAX_VARINT_LEN - 1 {
            // The 10th byte holds bit 63 only.
            if b & 0x80 != 0 {
                return Err(VarintError::TooLong);
            }
            if bits > 1 {
                return Err(VarintError::Overflow);
            }
        }
        value |= bits << (7 * i);
        if b & 0x80 == 0 {
            return Ok(Some((value, i + 1)));
        }
    }
    Ok(None)
}

// ---------------------------------------------------------------------------
// Frames and packets
// ---------------------------------------------------------------------------

const DONE_BIT: u8 = 0x01;
const CONTROL_BIT: u8 = 0x80;

/// One frame: a piece (or all) of a packet.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frame {
    pub kind: Kind,
    /// Set on forward-compatible packets (see the module docs).
    pub control: bool,
    /// Last frame of its packet.
    pub done: bool,
    pub stream_id: u64,
    pub message_id: u64,
    pub data: Vec<u8>,
}

/// A frame's header fields and where its data lies in the buffer.
struct FrameHead {
    kind: Kind,
    control: bool,
    done: bool,
    stream_id: u64,
    message_id: u64,
    data_start: usize,
    data_len: usize,
}

fn control_byte(kind: Kind, done: bool, control: bool) -> u8 {
    let mut b = kind.code() << 1;
    if done {
        b |= DONE_BIT;
    }
    if control {
        b |= CONTROL_BIT;
    }
    b
}

/// Parses a frame header at the front of `buf`; `Ok(None)` when more bytes
/// are needed for the header or the data. `max_data` bounds the declared
/// data length so a hostile length cannot make us buffer without limit.
fn parse_frame(buf: &[u8], max_data: usize) -> Result<Option<FrameHead>, DrpcError> {
    let Some(&c) = buf.first() else {
        return Ok(None);
    };
    let mut pos = 1;
    let next = |pos: &mut usize| -> Result<Option<u64>, DrpcError> {
        match read_varint(&buf[*pos..]).map_err(|e| protocol(e.to_string()))? {
            Some((v, n)) => {
                *pos += n;
                Ok(Some(v))
            }
            None => Ok(None),
        }
    };
    let Some(stream_id) = next(&mut pos)? else {
        return Ok(None);
    };
    let Some(message_id) = next(&mut pos)? else {
        return Ok(None);
    };
    let Some(len) = next(&mut pos)? else {
        return Ok(None);
    };
    let data_len = usize::try_from(len)
        .ok()
        .filter(|&l| l <= max_data)
        .ok_or_else(|| {
            protocol(format!(
                "frame of {len} bytes exceeds the {max_data}-byte limit"
            ))
        })?;
    if buf.len() - pos < data_len {
        return Ok(None);
    }
    Ok(Some(FrameHead {
        kind: Kind::from_code((c >> 1) & 0x3f),
        control: c & CONTROL_BIT != 0,
        done: c & DONE_BIT != 0,
        stream_id,
        message_id,
        data_start: pos,
        data_len,
    }))
}

impl Frame {
    /// Appends the wire form of this frame.
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.push(control_byte(self.kind, self.done, self.control));
        put_varint(out, self.stream_id);
        put_varint(out, self.message_id);
        put_varint(out, self.data.len() as u64);
        out.extend_from_slice(&self.data);
    }

    /// Parses one frame from the front of `buf`: the frame and the bytes it
    /// used, or `Ok(None)` if `buf` holds only part of it.
    pub fn decode(buf: &[u8]) -> Result<Option<(Frame, usize)>, DrpcError> {
        let Some(h) = parse_frame(buf, MAX_MESSAGE_SIZE)? else {
            return Ok(None);
        };
        let end = h.data_start + h.data_len;
        Ok(Some((
            Frame {
                kind: h.kind,
                control: h.control,
                done: h.done,
                stream_id: h.stream_id,
                message_id: h.message_id,
                data: buf[h.data_start..end].to_vec(),
            },
            end,
        )))
    }
}

/// A whole dRPC packet (all its frames joined).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Packet {
    pub kind: Kind,
    pub control: bool,
    pub stream_id: u64,
    pub message_id: u64,
    pub data: Vec<u8>,
}

/// Appends `data` as one packet, split into frames of at most `split`
/// data bytes (an empty packet is one empty done frame).
pub fn encode_packet(
    out: &mut Vec<u8>,
    kind: Kind,
    control: bool,
    stream_id: u64,
    message_id: u64,
    data: &[u8],
    split: usize,
) {
    let split = split.max(1);
    let mut rest = data;
    loop {
        let n = rest.len().min(split);
        let (chunk, tail) = rest.split_at(n);
        let done = tail.is_empty();
        out.push(control_byte(kind, done, control));
        put_varint(out, stream_id);
        put_varint(out, message_id);
        put_varint(out, chunk.len() as u64);
        out.extend_from_slice(chunk);
        if done {
            return;
        }
        rest = tail;
    }
}

impl Packet {
    /// Appends the wire form, split at [`SPLIT_SIZE`].
    pub fn encode(&self, out: &mut Vec<u8>) {
        encode_packet(
            out,
            self.kind,
            self.control,
            self.stream_id,
            self.message_id,
            &self.data,
            SPLIT_SIZE,
        );
    }
}

/// Body of an Error packet: 8-byte big-endian code, then the text.
pub fn encode_error(code: u64, message: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(8 + message.len());
    out.extend_from_slice(&code.to_be_bytes());
    out.extend_from_slice(message.as_bytes());
    out
}

/// Splits an Error body into code and text. A body shorter than 8 bytes is
/// malformed; it is reported as code 0 with its bytes as the text, so the
/// caller still sees something.
pub fn decode_error(data: &[u8]) -> (u64, String) {
    match data.split_first_chunk::<8>() {
        Some((code, text)) => (
            u64::from_be_bytes(*code),
            String::from_utf8_lossy(text).into_owned(),
        ),
        None => (0, String::from_utf8_lossy(data).into_owned()),
    }
}

// ---------------------------------------------------------------------------
// Packet reader / message sender / message receiver
// ---------------------------------------------------------------------------

/// Reassembles packets from frames read off a byte stream, enforcing the
/// size limit and that packet IDs never go backwards.
pub struct PacketReader<R> {
    rd: R,
    buf: BytesMut,
    max: usize,
    /// Smallest (stream, message) ID still acceptable.
    next_id: (u64, u64),
    partial: Option<Packet>,
}

impl<R: AsyncRead + Unpin> PacketReader<R> {
    pub fn new(rd: R) -> Self {
        Self::with_max(rd, MAX_MESSAGE_SIZE)
    }

    /// A reader refusing packets larger than `max` bytes.
    pub fn with_max(rd: R, max: usize) -> Self {
        PacketReader {
            rd,
            buf: BytesMut::with_capacity(8 * 1024),
            max,
            // dRPC starts here: IDs 0 are never valid.
            next_id: (1, 1),
            partial: None,
        }
    }

    /// The next complete packet; `Ok(None)` if the stream ended cleanly
    /// between packets.
    pub async fn read_packet(&mut self) -> Result<Option<Packet>, DrpcError> {
        loop {
            if let Some(h) = parse_frame(&self.buf, self.max)? {
                let id = (h.stream_id, h.message_id);
                if id < self.next_id {
                    return Err(protocol(format!(
                        "packet ID went backwards: {id:?} after {:?}",
                        self.next_id
                    )));
                }
                let same = matches!(&self.partial, Some(p) if (p.stream_id, p.message_id) == id);
                if same {
                    if let Some(p) = &self.partial {
                        if p.kind != h.kind {
                            return Err(protocol(format!(
                                "packet kind changed mid-packet: {:?} then {:?}",
                                p.kind, h.kind
                            )));
                        }
                    }
                } else {
                    // A new ID abandons any unfinished packet, as dRPC does.
                    self.partial = Some(Packet {
                        kind: h.kind,
                        control: false,
                        stream_id: h.stream_id,
                        message_id: h.message_id,
                        data: Vec::new(),
                    });
                }
                let Some(p) = self.partial.as_mut() else {
                    return Err(protocol("internal: no packet under assembly"));
                };
                p.control |= h.control;
                if p.data.len() + h.data_len > self.max {
                    return Err(protocol(format!(
                        "packet exceeds the {}-byte limit",
                        self.max
                    )));
                }
                p.data
                    .extend_from_slice(&self.buf[h.data_start..h.data_start + h.data_len]);
                self.buf.advance(h.data_start + h.data_len);
                if h.done {
                    self.next_id = (id.0, id.1.saturating_add(1));
                    return Ok(self.partial.take());
                }
                continue;
            }
            self.buf.reserve(16 * 1024);
            if self.rd.read_buf(&mut self.buf).await? == 0 {
                if self.buf.is_empty() && self.partial.is_none() {
                    return Ok(None);
                }
                return Err(DrpcError::Io(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "dRPC transport ended inside a packet",
                )));
            }
        }
    }

    pub fn into_inner(self) -> R {
        self.rd
    }
}

/// Sends packets of one dRPC stream, numbering them.
pub struct MessageSender<W> {
    wr: W,
    stream_id: u64,
    last_message_id: u64,
    buf: Vec<u8>,
    send_closed: bool,
}

impl<W: AsyncWrite + Unpin> MessageSender<W> {
    /// A sender for `stream_id` whose first packet will be message 1.
    pub fn new(wr: W, stream_id: u64) -> Self {
        MessageSender {
            wr,
            stream_id,
            last_message_id: 0,
            buf: Vec::new(),
            send_closed: false,
        }
    }

    /// Encodes a packet into the pending buffer (sent by [`Self::flush`]).
    fn queue(&mut self, kind: Kind, control: bool, data: &[u8]) -> Result<(), DrpcError> {
        if data.len() > MAX_MESSAGE_SIZE {
            return Err(DrpcError::TooLarge(data.len()));
        }
        self.last_message_id += 1;
        encode_packet(
            &mut self.buf,
            kind,
            control,
            self.stream_id,
            self.last_message_id,
            data,
            SPLIT_SIZE,
        );
        Ok(())
    }

    /// Writes everything queued in one go.
    async fn flush(&mut self) -> Result<(), DrpcError> {
        let res = async {
            self.wr.write_all(&self.buf).await?;
            self.wr.flush().await
        }
        .await;
        self.buf.clear();
        Ok(res?)
    }

    /// Sends any packet; the building block of the methods below.
    pub async fn send_packet(
        &mut self,
        kind: Kind,
        control: bool,
        data: &[u8],
    ) -> Result<(), DrpcError> {
        self.queue(kind, control, data)?;
        self.flush().await
    }

    /// Sends one message (protobuf bytes).
    pub async fn send(&mut self, message: &[u8]) -> Result<(), DrpcError> {
        if self.send_closed {
            return Err(protocol("send after CloseSend"));
        }
        self.send_packet(Kind::Message, false, message).await
    }

    /// Tells the remote no more messages follow. Idempotent.
    pub async fn close_send(&mut self) -> Result<(), DrpcError> {
        if self.send_closed {
            return Ok(());
        }
        self.send_closed = true;
        self.send_packet(Kind::CloseSend, false, &[]).await
    }

    /// Ends the call with an error (server side).
    pub async fn send_error(&mut self, code: u64, message: &str) -> Result<(), DrpcError> {
        self.send_closed = true;
        self.send_packet(Kind::Error, false, &encode_error(code, message))
            .await
    }

    /// Declares the call dead (what Go's client sends when it gives up).
    pub async fn send_close(&mut self) -> Result<(), DrpcError> {
        self.send_closed = true;
        self.send_packet(Kind::Close, false, &[]).await
    }

    pub fn into_inner(self) -> W {
        self.wr
    }
}

/// Receives the messages of one dRPC stream.
pub struct MessageReceiver<R> {
    rd: PacketReader<R>,
    stream_id: u64,
    finished: bool,
}

impl<R: AsyncRead + Unpin> MessageReceiver<R> {
    pub fn new(rd: R, stream_id: u64) -> Self {
        Self::from_reader(PacketReader::new(rd), stream_id)
    }

    /// Continues with a reader that has already consumed earlier packets
    /// (e.g. the Invoke).
    pub fn from_reader(rd: PacketReader<R>, stream_id: u64) -> Self {
        MessageReceiver {
            rd,
            stream_id,
            finished: false,
        }
    }

    /// The next message; `Ok(None)` once the remote sent CloseSend (or
    /// Close). An Error packet becomes [`DrpcError::Remote`].
    pub async fn recv(&mut self) -> Result<Option<Vec<u8>>, DrpcError> {
        while !self.finished {
            let Some(pkt) = self.rd.read_packet().await? else {
                self.finished = true;
                return Err(DrpcError::Closed("the remote finished sending"));
            };
            if pkt.stream_id < self.stream_id {
                // Leftovers of an earlier call on the same transport.
                continue;
            }
            if pkt.stream_id > self.stream_id {
                return Err(protocol(format!(
                    "packet for stream {} on a transport carrying stream {}",
                    pkt.stream_id, self.stream_id
                )));
            }
            match pkt.kind {
                Kind::Message => return Ok(Some(pkt.data)),
                Kind::CloseSend | Kind::Close => self.finished = true,
                Kind::Error => {
                    self.finished = true;
                    let (code, message) = decode_error(&pkt.data);
                    return Err(DrpcError::Remote { code, message });
                }
                Kind::Cancel => {
                    self.finished = true;
                    return Err(DrpcError::Canceled);
                }
                Kind::Invoke | Kind::InvokeMetadata => {
                    return Err(protocol("invoke in the middle of a call"));
                }
                Kind::Other(k) if pkt.control => {
                    log::debug!("dRPC: ignoring control packet of unknown kind {k}");
                }
                Kind::Other(k) => return Err(protocol(format!("unknown packet kind {k}"))),
            }
        }
        Ok(None)
    }

    /// Whether the remote has finished sending.
    pub fn is_finished(&self) -> bool {
        self.finished
    }

    pub fn into_inner(self) -> R {
        self.rd.into_inner()
    }
}

// ---------------------------------------------------------------------------
// Client calls
// ---------------------------------------------------------------------------

/// Sends Invoke, Message(request), CloseSend as one write.
async fn start_call<W: AsyncWrite + Unpin>(
    wr: W,
    method: &str,
    request: &[u8],
) -> Result<MessageSender<W>, DrpcError> {
    let mut tx = MessageSender::new(wr, STREAM_ID);
    tx.queue(Kind::Invoke, false, method.as_bytes())?;
    tx.queue(Kind::Message, false, request)?;
    tx.queue(Kind::CloseSend, false, &[])?;
    tx.send_closed = true;
    tx.flush().await?;
    Ok(tx)
}

/// A unary call on a fresh transport (a new yamux stream): returns the
/// response message. The transport is dropped afterwards, which with a
/// yamux stream is the graceful close.
pub async fn unary<S>(mut stream: S, method: &str, request: &[u8]) -> Result<Vec<u8>, DrpcError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    start_call(&mut stream, method, request).await?;
    let mut rx = MessageReceiver::new(&mut stream, STREAM_ID);
    match rx.recv().await? {
        Some(response) => Ok(response),
        None => Err(DrpcError::Closed("a response arrived")),
    }
}

/// A server-streaming call: sends the request, returns the receiver of the
/// server's messages. Dropping the receiver ends the call.
pub async fn server_stream<S>(
    mut stream: S,
    method: &str,
    request: &[u8],
) -> Result<MessageReceiver<S>, DrpcError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    start_call(&mut stream, method, request).await?;
    Ok(MessageReceiver::new(stream, STREAM_ID))
}

/// A bidirectional call: sends Invoke and returns both directions. The
/// call ends when both halves are dropped (or on CloseSend + the server's
/// CloseSend).
pub async fn bidi<S>(
    stream: S,
    method: &str,
) -> Result<(MessageSender<WriteHalf<S>>, MessageReceiver<ReadHalf<S>>), DrpcError>
where
    S: AsyncRead + AsyncWrite,
{
    let (rd, wr) = tokio::io::split(stream);
    let mut tx = MessageSender::new(wr, STREAM_ID);
    tx.send_packet(Kind::Invoke, false, method.as_bytes())
        .await?;
    Ok((tx, MessageReceiver::new(rd, STREAM_ID)))
}

/// Opens a yamux stream and makes a unary call on it, as Coder's
/// `drpcsdk.MultiplexedConn` does.
pub async fn unary_on(
    session: &yamux::Session,
    method: &str,
    request: &[u8],
) -> Result<Vec<u8>, DrpcError> {
    unary(session.open().await?, method, request).await
}

// ---------------------------------------------------------------------------
// Server side
// ---------------------------------------------------------------------------

/// A call received by a server: the method and both directions.
pub struct Invocation<S> {
    method: String,
    metadata: Option<Vec<u8>>,
    tx: MessageSender<WriteHalf<S>>,
    rx: MessageReceiver<ReadHalf<S>>,
}

/// Reads packets until the Invoke and returns the call. InvokeMetadata is
/// kept (undecoded); other packets before the Invoke are skipped, as dRPC's
/// server does.
pub async fn accept_invoke<S>(stream: S) -> Result<Invocation<S>, DrpcError>
where
    S: AsyncRead + AsyncWrite,
{
    let (rd, wr) = tokio::io::split(stream);
    let mut reader = PacketReader::new(rd);
    let mut metadata = None;
    loop {
        let Some(pkt) = reader.read_packet().await? else {
            return Err(DrpcError::Closed("an invoke arrived"));
        };
        match pkt.kind {
            Kind::InvokeMetadata => metadata = Some(pkt.data),
            Kind::Invoke => {
                let method = String::from_utf8(pkt.data)
                    .map_err(|_| protocol("method name is not UTF-8"))?;
                return Ok(Invocation {
                    method,
                    metadata,
                    tx: MessageSender::new(wr, pkt.stream_id),
                    rx: MessageReceiver::from_reader(reader, pkt.stream_id),
                });
            }
            other => log::debug!("dRPC: skipping {other:?} packet before invoke"),
        }
    }
}

impl<S: AsyncRead + AsyncWrite> Invocation<S> {
    /// The method name, e.g. `/coder.tailnet.v2.Tailnet/Coordinate`.
    pub fn method(&self) -> &str {
        &self.method
    }

    /// Raw InvokeMetadata body, if the client sent one.
    pub fn metadata(&self) -> Option<&[u8]> {
        self.metadata.as_deref()
    }

    /// Next client message; `Ok(None)` after the client's CloseSend.
    pub async fn recv(&mut self) -> Result<Option<Vec<u8>>, DrpcError> {
        self.rx.recv().await
    }

    pub async fn send(&mut self, message: &[u8]) -> Result<(), DrpcError> {
        self.tx.send(message).await
    }

    /// Ends the call successfully.
    pub async fn close_send(&mut self) -> Result<(), DrpcError> {
        self.tx.close_send().await
    }

    /// Ends the call with an error.
    pub async fn send_error(&mut self, code: u64, message: &str) -> Result<(), DrpcError> {
        self.tx.send_error(code, message).await
    }

    /// Answers a unary call: Message then CloseSend, in one write.
    pub async fn reply(&mut self, response: &[u8]) -> Result<(), DrpcError> {
        self.tx.queue(Kind::Message, false, response)?;
        self.tx.queue(Kind::CloseSend, false, &[])?;
        self.tx.send_closed = true;
        self.tx.flush().await
    }

    /// Refuses the call as dRPC's generated servers do for methods they
    /// lack: code 12, text "Unimplemented".
    pub async fn unimplemented(&mut self) -> Result<(), DrpcError> {
        self.send_error(CODE_UNIMPLEMENTED, "Unimplemented").await
    }

    /// Separates the directions, for handlers that send and receive at the
    /// same time (bidi).
    pub fn split(self) -> (MessageSender<WriteHalf<S>>, MessageReceiver<ReadHalf<S>>) {
        (self.tx, self.rx)
    }
}

/// Accepts yamux streams until the session ends and runs `handler` on each
/// call in its own task. The handler answers (reply, send + close_send, or
/// send_error); the stream closes when it drops the invocation.
pub async fn serve<F, Fut>(session: yamux::Session, handler: F)
where
    F: Fn(Invocation<yamux::Stream>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let handler = Arc::new(handler);
    while let Some(stream) = session.accept().await {
        let handler = handler.clone();
        tokio::spawn(async move {
            match accept_invoke(stream).await {
                Ok(call) => handler(call).await,
                Err(e) => log::debug!("dRPC: no call on accepted stream: {e}"),
            }
        });
    }
}
