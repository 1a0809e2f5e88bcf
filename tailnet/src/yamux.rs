//! yamux: a symmetric stream multiplexer, wire-compatible with HashiCorp's
//! yamux — the one coderd wraps around the `/coordinate` websocket (client
//! role for us, server role for coder-sim).
//!
//! Owns the frame codec ([`Header`]), per-stream flow control, stream
//! open/accept/half-close/reset, pings (answering them is mandatory: Go
//! yamux ends a session whose ping goes unanswered for 10 s), keepalive,
//! and GoAway. Written from the protocol facts in
//! `shared/reference/tailnet.md` §1.3 and the public yamux spec; no code is
//! ported from any implementation.
//!
//! # Shape
//!
//! [`Session::client`] / [`Session::server`] take any byte stream, split it,
//! and spawn (on the current Tokio runtime) a reader task, a writer task
//! and, if enabled, a keepalive task. Everything else talks to them through
//! one mutex-protected state and two queues of encoded frames:
//!
//! - *ordered*: data and stream-control frames (SYN, ACK, FIN, RST). They
//!   must reach the peer in the order produced, or a FIN could overtake the
//!   data it ends.
//! - *urgent*: pings, pong replies, plain window updates and error GoAways,
//!   which carry no ordering obligation; sending them first keeps pongs
//!   prompt even when megabytes of data are queued.
//!
//! Memory is bounded by flow control: a stream can only queue as much
//! outgoing data as the peer's window allows, and the peer can only make us
//! buffer as much as our window allows (excess is a protocol error). The
//! reader task therefore never waits on a slow consumer, so one stalled
//! stream cannot block the others or the pong replies.
//!
//! # Stream lifecycle
//!
//! - [`Session::open`] sends SYN at once (as a window update, like Go) and
//!   returns without waiting for the ACK; data may follow immediately.
//! - Incoming SYNs are ACKed at once and queued for [`Session::accept`] (up
//!   to `accept_backlog`, beyond which they are refused with RST). ACKing
//!   early matters: Go yamux closes the whole session if a stream it opened
//!   is not ACKed within 75 s.
//! - `shutdown()` (AsyncWrite) sends FIN: a half-close; reading continues
//!   until the peer's FIN (read returns 0).
//! - [`Stream::reset`] sends RST: both directions end with `ConnectionReset`.
//! - Dropping a [`Stream`] is a graceful close, like Go's `Close()`: FIN is
//!   sent if not yet sent. If the peer has not finished, the stream lingers
//!   as an *orphan* that discards what the peer still sends until its FIN;
//!   should the peer exhaust its window instead, the orphan answers with RST
//!   so the peer's writer fails rather than stalls.
//! - Dropping the last [`Session`] handle closes the session (GoAway, then
//!   the connection is shut down), so keep it alive while streams are used.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, ReadBuf};
use tokio::sync::{oneshot, watch, Notify};

/// Length of every frame header.
pub const HEADER_LEN: usize = 12;
/// The only protocol version in existence.
pub const PROTO_VERSION: u8 = 0;
/// Window every stream starts with, in both directions (spec: 256 KiB).
pub const INITIAL_WINDOW: u32 = 256 * 1024;

/// Largest Data payload we put in one frame. Smaller than the window so
/// that streams sharing the connection interleave instead of taking turns
/// of 256 KiB.
const MAX_DATA_FRAME: usize = 64 * 1024;
/// How much the writer task gathers into one write (one websocket message
/// when the transport is a websocket).
const WRITE_BATCH: usize = 256 * 1024;

/// Frame flags (16 bits on the wire). Unknown bits are ignored on receipt.
pub mod flags {
    /// Opens a stream; on a ping, marks the request.
    pub const SYN: u16 = 0x1;
    /// Accepts a stream; on a ping, marks the reply.
    pub const ACK: u16 = 0x2;
    /// Half-close: the sender will send no more data on this stream.
    pub const FIN: u16 = 0x4;
    /// Hard close of a stream in both directions.
    pub const RST: u16 = 0x8;
}

/// GoAway codes (carried in the header's length field).
pub mod go_away {
    /// Normal termination: the sender accepts no new streams.
    pub const NORMAL: u32 = 0;
    /// The sender saw a protocol error and is closing the session.
    pub const PROTOCOL_ERROR: u32 = 1;
    /// The sender hit an internal error and is closing the session.
    pub const INTERNAL_ERROR: u32 = 2;
}

/// Frame types. The meaning of [`Header::length`] depends on the type: Data
/// → payload bytes that follow; WindowUpdate → window delta; Ping → opaque
/// value echoed in the reply; GoAway → error code.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FrameType {
    Data,
    WindowUpdate,
    Ping,
    GoAway,
}

impl FrameType {
    /// Wire value of this type.
    pub fn code(self) -> u8 {
        match self {
            FrameType::Data => 0,
            FrameType::WindowUpdate => 1,
            FrameType::Ping => 2,
            FrameType::GoAway => 3,
        }
    }

    /// Type for a wire value, if it is one of the four defined.
    pub fn from_code(code: u8) -> Option<Self> {
        match code {
            0 => Some(FrameType::Data),
            1 => Some(FrameType::WindowUpdate),
            2 => Some(FrameType::Ping),
            3 => Some(FrameType::GoAway),
            _ => None,
        }
    }
}

/// A frame header: `version(1) | type(1) | flags(2) | stream id(4) |
/// length(4)`, all big-endian.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    pub frame_type: FrameType,
    pub flags: u16,
    pub stream_id: u32,
    pub length: u32,
}

/// Why 12 bytes are not a header we can handle.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum HeaderError {
    #[error("unsupported yamux version {0}")]
    Version(u8),
    #[error("unknown yamux frame type {0}")]
    FrameType(u8),
}

impl Header {
    pub fn new(frame_type: FrameType, flags: u16, stream_id: u32, length: u32) -> Self {
        Header {
            frame_type,
            flags,
            stream_id,
            length,
        }
    }

    /// The 12 wire bytes of this header.
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut out = [0u8; HEADER_LEN];
        out[0] = PROTO_VERSION;
        out[1] = self.frame_type.code();
        out[2..4].copy_from_slice(&self.flags.to_be_bytes());
        out[4..8].copy_from_slice(&self.stream_id.to_be_bytes());
        out[8..12].copy_from_slice(&self.length.to_be_bytes());
        out
    }

    /// Parses 12 wire bytes. Flags are kept as sent (unknown bits included).
    pub fn decode(buf: &[u8; HEADER_LEN]) -> Result<Self, HeaderError> {
        if buf[0] != PROTO_VERSION {
            return Err(HeaderError::Version(buf[0]));
        }
        let frame_type = FrameType::from_code(buf[1]).ok_or(HeaderError::FrameType(buf[1]))?;
        Ok(Header {
            frame_type,
            flags: u16::from_be_bytes([buf[2], buf[3]]),
            stream_id: u32::from_be_bytes([buf[4], buf[5], buf[6], buf[7]]),
            length: u32::from_be_bytes([buf[8], buf[9], buf[10], buf[11]]),
        })
    }

    fn has(&self, flag: u16) -> bool {
        self.flags & flag == flag
    }
}

/// Session settings. Defaults match Go yamux's `DefaultConfig()`, which is
/// what coderd uses.
#[derive(Clone, Debug)]
pub struct Config {
    /// Incoming streams queued for [`Session::accept`]; more are refused
    /// with RST. Go: `AcceptBacklog` 256.
    pub accept_backlog: usize,
    /// Send a ping this often and end the session if it is not answered
    /// within `ping_timeout`. `None` disables. Go: 30 s.
    pub keepalive_interval: Option<Duration>,
    /// How long [`Session::ping`] (and keepalive) waits for the reply. Go
    /// uses its `ConnectionWriteTimeout` (10 s) for this.
    pub ping_timeout: Duration,
    /// A write to the underlying connection that takes longer than this
    /// ends the session (a dead peer otherwise wedges the writer). Go's
    /// `ConnectionWriteTimeout`: 10 s.
    pub write_timeout: Duration,
    /// Receive window per stream; at least [`INITIAL_WINDOW`] (smaller
    /// values are raised to it). Larger values are announced to the peer
    /// with the SYN/ACK window update. Go: `MaxStreamWindowSize` 256 KiB.
    pub max_stream_window: u32,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            accept_backlog: 256,
            keepalive_interval: Some(Duration::from_secs(30)),
            ping_timeout: Duration::from_secs(10),
            write_timeout: Duration::from_secs(10),
            max_stream_window: INITIAL_WINDOW,
        }
    }
}

/// Why a session ended, or why an operation on it failed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    #[error("yamux session closed locally")]
    Closed,
    #[error("yamux connection closed by the remote side")]
    RemoteClosed,
    #[error("yamux connection failed: {message}")]
    Io {
        kind: io::ErrorKind,
        message: String,
    },
    #[error("yamux protocol error: {0}")]
    Protocol(String),
    #[error("remote ended the yamux session with GoAway code {0}")]
    RemoteGoAway(u32),
    #[error("remote sent GoAway: it accepts no new streams")]
    GoAwayReceived,
    #[error("no yamux ping reply within {0:?}")]
    PingTimeout(Duration),
    #[error("yamux keepalive ping not answered within {0:?}")]
    KeepAliveTimeout(Duration),
    #[error("writing to the yamux connection took longer than {0:?}")]
    WriteTimeout(Duration),
    #[error("yamux stream IDs exhausted")]
    StreamsExhausted,
}

impl Error {
    fn from_io(err: &io::Error) -> Self {
        if err.kind() == io::ErrorKind::UnexpectedEof {
            return Error::RemoteClosed;
        }
        Error::Io {
            kind: err.kind(),
            message: err.to_string(),
        }
    }
}

impl From<Error> for io::Error {
    fn from(err: Error) -> io::Error {
        let kind = match &err {
            Error::Io { kind, .. } => *kind,
            Error::PingTimeout(_) | Error::KeepAliveTimeout(_) | Error::WriteTimeout(_) => {
                io::ErrorKind::TimedOut
            }
            _ => io::ErrorKind::ConnectionAborted,
        };
        io::Error::new(kind, err)
    }
}

// ---------------------------------------------------------------------------
// Shared state
// ---------------------------------------------------------------------------

struct StreamState {
    /// Received, not yet read. Never more than the window we granted.
    recv_buf: VecDeque<Bytes>,
    buffered: usize,
    /// How many more bytes the peer may send before our next window update.
    recv_window: u32,
    /// How many more bytes we may send.
    send_window: u32,
    local_fin: bool,
    remote_fin: bool,
    reset: bool,
    /// The handle was dropped while the peer was still sending (see the
    /// module docs).
    orphan: bool,
    read_waker: Option<Waker>,
    write_waker: Option<Waker>,
}

impl StreamState {
    fn new(recv_window: u32) -> Self {
        StreamState {
            recv_buf: VecDeque::new(),
            buffered: 0,
            recv_window,
            send_window: INITIAL_WINDOW,
            local_fin: false,
            remote_fin: false,
            reset: false,
            orphan: false,
            read_waker: None,
            write_waker: None,
        }
    }

    fn wake_reader(&mut self) {
        if let Some(w) = self.read_waker.take() {
            w.wake();
        }
    }

    fn wake_writer(&mut self) {
        if let Some(w) = self.write_waker.take() {
            w.wake();
        }
    }
}

struct Inner {
    streams: HashMap<u32, StreamState>,
    next_stream_id: u32,
    accept_queue: VecDeque<u32>,
    urgent: VecDeque<Bytes>,
    ordered: VecDeque<Bytes>,
    pings: HashMap<u32, oneshot::Sender<()>>,
    next_ping_id: u32,
    /// We sent GoAway: refuse new incoming streams.
    local_go_away: bool,
    /// The peer sent GoAway(normal): it refuses new streams from us.
    remote_go_away: bool,
    closed: Option<Error>,
}

struct Shared {
    client: bool,
    config: Config,
    inner: Mutex<Inner>,
    /// Wakes the writer task: frames queued, or the session ended.
    write_notify: Notify,
    accept_notify: Notify,
    closed_tx: watch::Sender<bool>,
    /// Set by the writer task as its last act (connection shut down).
    writer_done: watch::Sender<bool>,
}

fn header_frame(frame_type: FrameType, flags: u16, stream_id: u32, length: u32) -> Bytes {
    Bytes::copy_from_slice(&Header::new(frame_type, flags, stream_id, length).encode())
}

fn data_frame(stream_id: u32, payload: &[u8]) -> Bytes {
    let mut buf = BytesMut::with_capacity(HEADER_LEN + payload.len());
    // Payloads are capped at MAX_DATA_FRAME, so the length always fits.
    let len = u32::try_from(payload.len()).unwrap_or(u32::MAX);
    buf.put_slice(&Header::new(FrameType::Data, 0, stream_id, len).encode());
    buf.put_slice(payload);
    buf.freeze()
}

impl Shared {
    /// Locks the state. A panic while holding the lock cannot leave the
    /// state half-updated in a way that matters more than losing the whole
    /// session would, so poisoning is ignored.
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn is_our_id(&self, id: u32) -> bool {
        // Clients use odd IDs, servers even.
        (id % 2 == 1) == self.client
    }

    /// Ends the session once: records why, queues GoAway if asked (normal
    /// after queued data; errors ahead of it), wakes everyone waiting.
    fn terminate(&self, reason: Error, send_go_away: Option<u32>) {
        let mut g = self.lock();
        if g.closed.is_some() {
            return;
        }
        log::debug!(
            "yamux {} session ending: {reason}",
            if self.client { "client" } else { "server" }
        );
        if let Some(code) = send_go_away {
            let frame = header_frame(FrameType::GoAway, 0, 0, code);
            if code == go_away::NORMAL {
                g.ordered.push_back(frame);
            } else {
                g.urgent.push_back(frame);
            }
            g.local_go_away = true;
        }
        g.closed = Some(reason);
        // Dropping the senders fails every pending ping.
        g.pings.clear();
        for st in g.streams.values_mut() {
            st.wake_reader();
            st.wake_writer();
        }
        drop(g);
        self.closed_tx.send_replace(true);
        self.accept_notify.notify_waiters();
        self.write_notify.notify_one();
    }

    async fn ping(&self) -> Result<Duration, Error> {
        let (tx, rx) = oneshot::channel();
        let id = {
            let mut g = self.lock();
            if let Some(e) = &g.closed {
                return Err(e.clone());
            }
            let id = g.next_ping_id;
            g.next_ping_id = g.next_ping_id.wrapping_add(1);
            g.pings.insert(id, tx);
            g.urgent
                .push_back(header_frame(FrameType::Ping, flags::SYN, 0, id));
            id
        };
        self.write_notify.notify_one();
        let start = Instant::now();
        match tokio::time::timeout(self.config.ping_timeout, rx).await {
            Ok(Ok(())) => Ok(start.elapsed()),
            Ok(Err(_)) => Err(self.lock().closed.clone().unwrap_or(Error::Closed)),
            Err(_) => {
                self.lock().pings.remove(&id);
                Err(Error::PingTimeout(self.config.ping_timeout))
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Session
// ---------------------------------------------------------------------------

/// Closes the session when the last [`Session`] clone goes away.
struct CloseOnDrop(Arc<Shared>);

impl Drop for CloseOnDrop {
    fn drop(&mut self) {
        self.0.terminate(Error::Closed, Some(go_away::NORMAL));
    }
}

/// One yamux session over one connection. Cheap to clone; all clones refer
/// to the same session, which closes when the last clone is dropped.
#[derive(Clone)]
pub struct Session {
    shared: Arc<Shared>,
    _guard: Arc<CloseOnDrop>,
}

impl fmt::Debug for Session {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Session")
            .field("client", &self.shared.client)
            .field("closed", &self.shared.lock().closed)
            .finish()
    }
}

impl Session {
    /// Starts the client side (opens odd stream IDs) over `io`. Must be
    /// called within a Tokio runtime: it spawns the driver tasks.
    pub fn client<T>(io: T, config: Config) -> Session
    where
        T: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    {
        Session::new(io, config, true)
    }

    /// Starts the server side (opens even stream IDs) over `io`. Must be
    /// called within a Tokio runtime: it spawns the driver tasks.
    pub fn server<T>(io: T, config: Config) -> Session
    where
        T: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    {
        Session::new(io, config, false)
    }

    fn new<T>(io: T, mut config: Config, client: bool) -> Session
    where
        T: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    {
        if config.max_stream_window < INITIAL_WINDOW {
            config.max_stream_window = INITIAL_WINDOW;
        }
        let keepalive = config.keepalive_interval;
        let shared = Arc::new(Shared {
            client,
            config,
            inner: Mutex::new(Inner {
                streams: HashMap::new(),
                next_stream_id: if client { 1 } else { 2 },
                accept_queue: VecDeque::new(),
                urgent: VecDeque::new(),
                ordered: VecDeque::new(),
                pings: HashMap::new(),
                next_ping_id: 0,
                local_go_away: false,
                remote_go_away: false,
                closed: None,
            }),
            write_notify: Notify::new(),
            accept_notify: Notify::new(),
            closed_tx: watch::channel(false).0,
            writer_done: watch::channel(false).0,
        });
        let (rd, wr) = tokio::io::split(io);
        tokio::spawn(read_loop(shared.clone(), rd));
        tokio::spawn(write_loop(shared.clone(), wr));
        if let Some(interval) = keepalive {
            tokio::spawn(keepalive_loop(shared.clone(), interval));
        }
        Session {
            _guard: Arc::new(CloseOnDrop(shared.clone())),
            shared,
        }
    }

    /// Opens a new stream. SYN is queued at once; the call does not wait
    /// for the peer's ACK (data may be written right away, as in Go).
    pub async fn open(&self) -> Result<Stream, Error> {
        let shared = &self.shared;
        {
            let mut g = shared.lock();
            if let Some(e) = &g.closed {
                return Err(e.clone());
            }
            if g.remote_go_away {
                return Err(Error::GoAwayReceived);
            }
            let id = g.next_stream_id;
            if id >= u32::MAX - 1 {
                return Err(Error::StreamsExhausted);
            }
            g.next_stream_id += 2;
            let max = shared.config.max_stream_window;
            g.streams.insert(id, StreamState::new(max));
            // The SYN carries whatever we grant beyond the initial window
            // (window updates are additive).
            g.ordered.push_back(header_frame(
                FrameType::WindowUpdate,
                flags::SYN,
                id,
                max - INITIAL_WINDOW,
            ));
            drop(g);
            shared.write_notify.notify_one();
            Ok(Stream {
                id,
                shared: shared.clone(),
            })
        }
    }

    /// Waits for the next stream opened by the peer. `None` once the
    /// session has ended.
    pub async fn accept(&self) -> Option<Stream> {
        loop {
            let notified = self.shared.accept_notify.notified();
            tokio::pin!(notified);
            // Register before checking so a SYN between the check and the
            // await is not missed.
            notified.as_mut().enable();
            {
                let mut g = self.shared.lock();
                if g.closed.is_some() {
                    return None;
                }
                if let Some(id) = g.accept_queue.pop_front() {
                    return Some(Stream {
                        id,
                        shared: self.shared.clone(),
                    });
                }
            }
            notified.await;
        }
    }

    /// Measures the round trip of one ping. Fails after
    /// [`Config::ping_timeout`] without ending the session.
    pub async fn ping(&self) -> Result<Duration, Error> {
        self.shared.ping().await
    }

    /// Closes the session: GoAway(normal) after any queued data, then the
    /// connection is shut down. Waits (at most the write timeout) until that
    /// has been written. Streams fail afterwards.
    pub async fn close(&self) {
        self.shared.terminate(Error::Closed, Some(go_away::NORMAL));
        let mut done = self.shared.writer_done.subscribe();
        let wait = done.wait_for(|d| *d);
        let _ = tokio::time::timeout(self.shared.config.write_timeout, wait).await;
    }

    /// Resolves when the session has ended, with the reason — the cue for
    /// a caller to redial.
    pub async fn closed(&self) -> Error {
        let mut rx = self.shared.closed_tx.subscribe();
        let _ = rx.wait_for(|c| *c).await;
        self.shared.lock().closed.clone().unwrap_or(Error::Closed)
    }

    /// Why the session ended, if it has.
    pub fn close_reason(&self) -> Option<Error> {
        self.shared.lock().closed.clone()
    }

    pub fn is_closed(&self) -> bool {
        self.shared.lock().closed.is_some()
    }

    /// Whether this is the client side (odd stream IDs).
    pub fn is_client(&self) -> bool {
        self.shared.client
    }

    /// Streams with a live handle or not yet accepted (orphans excluded).
    pub fn num_streams(&self) -> usize {
        self.shared
            .lock()
            .streams
            .values()
            .filter(|s| !s.orphan)
            .count()
    }
}

// ---------------------------------------------------------------------------
// Driver tasks
// ---------------------------------------------------------------------------

async fn write_loop<W: AsyncWrite + Unpin>(shared: Arc<Shared>, mut wr: W) {
    let timeout = shared.config.write_timeout;
    let mut batch: Vec<u8> = Vec::with_capacity(WRITE_BATCH + MAX_DATA_FRAME + HEADER_LEN);
    loop {
        let closed = {
            let mut g = shared.lock();
            while batch.len() < WRITE_BATCH {
                let Some(frame) = g.urgent.pop_front().or_else(|| g.ordered.pop_front()) else {
                    break;
                };
                batch.extend_from_slice(&frame);
            }
            g.closed.is_some()
        };
        if !batch.is_empty() {
            let res = tokio::time::timeout(timeout, async {
                wr.write_all(&batch).await?;
                wr.flush().await
            })
            .await;
            batch.clear();
            match res {
                Ok(Ok(())) => continue,
                Ok(Err(e)) => {
                    shared.terminate(Error::from_io(&e), None);
                    break;
                }
                Err(_) => {
                    shared.terminate(Error::WriteTimeout(timeout), None);
                    break;
                }
            }
        }
        // Queue drained: after the session ended this is where the final
        // GoAway has just been written.
        if closed {
            break;
        }
        shared.write_notify.notified().await;
    }
    let _ = tokio::time::timeout(timeout, wr.shutdown()).await;
    shared.writer_done.send_replace(true);
}

async fn keepalive_loop(shared: Arc<Shared>, interval: Duration) {
    let mut closed = shared.closed_tx.subscribe();
    loop {
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = closed.wait_for(|c| *c) => return,
        }
        match shared.ping().await {
            Ok(_) => {}
            Err(Error::PingTimeout(d)) => {
                shared.terminate(Error::KeepAliveTimeout(d), None);
                return;
            }
            Err(_) => return,
        }
    }
}

/// Why the reader stopped: the error to record, and the GoAway to send.
struct Fail(Error, Option<u32>);

impl Fail {
    fn protocol(msg: impl Into<String>) -> Fail {
        Fail(Error::Protocol(msg.into()), Some(go_away::PROTOCOL_ERROR))
    }
}

impl From<io::Error> for Fail {
    fn from(e: io::Error) -> Fail {
        Fail(Error::from_io(&e), None)
    }
}

async fn read_loop<R: AsyncRead + Unpin>(shared: Arc<Shared>, rd: R) {
    let mut rd = BufReader::with_capacity(64 * 1024, rd);
    let mut closed = shared.closed_tx.subscribe();
    let fail = tokio::select! {
        res = read_frames(&shared, &mut rd) => match res {
            Err(fail) => fail,
            Ok(never) => match never {},
        },
        _ = closed.wait_for(|c| *c) => return,
    };
    shared.terminate(fail.0, fail.1);
}

/// What to do with a Data payload once the header has been processed.
enum Payload {
    None,
    Keep,
    Discard,
}

async fn read_frames<R: AsyncRead + Unpin>(
    shared: &Shared,
    rd: &mut R,
) -> Result<std::convert::Infallible, Fail> {
    let mut raw = [0u8; HEADER_LEN];
    loop {
        rd.read_exact(&mut raw).await?;
        let hdr = Header::decode(&raw).map_err(|e| Fail::protocol(e.to_string()))?;
        match hdr.frame_type {
            FrameType::Data | FrameType::WindowUpdate => {
                stream_frame(shared, rd, hdr).await?;
            }
            FrameType::Ping => {
                if hdr.has(flags::SYN) {
                    // Echo the opaque value; this is what keeps Go's
                    // keepalive from killing the session.
                    shared.lock().urgent.push_back(header_frame(
                        FrameType::Ping,
                        flags::ACK,
                        0,
                        hdr.length,
                    ));
                    shared.write_notify.notify_one();
                } else if hdr.has(flags::ACK) {
                    if let Some(tx) = shared.lock().pings.remove(&hdr.length) {
                        let _ = tx.send(());
                    }
                }
            }
            FrameType::GoAway => match hdr.length {
                go_away::NORMAL => {
                    log::debug!("yamux: peer sent GoAway(normal); no new streams");
                    shared.lock().remote_go_away = true;
                }
                code => return Err(Fail(Error::RemoteGoAway(code), None)),
            },
        }
    }
}

/// Handles a Data or WindowUpdate frame: flags, window, payload.
async fn stream_frame<R: AsyncRead + Unpin>(
    shared: &Shared,
    rd: &mut R,
    hdr: Header,
) -> Result<(), Fail> {
    let id = hdr.stream_id;
    let is_data = hdr.frame_type == FrameType::Data;
    let mut notify_writer = false;

    // Phase 1: open/ack, window accounting; decide on the payload before
    // reading it so that nothing beyond the window is ever buffered.
    let payload = {
        let mut g = shared.lock();
        let inner = &mut *g;
        if hdr.has(flags::SYN) {
            if id == 0 || shared.is_our_id(id) {
                return Err(Fail::protocol(format!(
                    "peer opened stream {id}, which is not in its ID space"
                )));
            }
            if inner.streams.contains_key(&id) {
                return Err(Fail::protocol(format!("duplicate stream {id}")));
            }
            if inner.local_go_away
                || inner.closed.is_some()
                || inner.accept_queue.len() >= shared.config.accept_backlog
            {
                log::debug!("yamux: refusing stream {id} (closing or backlog full)");
                inner
                    .ordered
                    .push_back(header_frame(FrameType::WindowUpdate, flags::RST, id, 0));
                notify_writer = true;
            } else {
                let max = shared.config.max_stream_window;
                inner.streams.insert(id, StreamState::new(max));
                inner.ordered.push_back(header_frame(
                    FrameType::WindowUpdate,
                    flags::ACK,
                    id,
                    max - INITIAL_WINDOW,
                ));
                inner.accept_queue.push_back(id);
                notify_writer = true;
                shared.accept_notify.notify_waiters();
            }
        }
        match inner.streams.get_mut(&id) {
            None => {
                if is_data && hdr.length > 0 {
                    // Likely a stream we reset; its data is meaningless now.
                    Payload::Discard
                } else {
                    Payload::None
                }
            }
            Some(st) => {
                if !is_data {
                    st.send_window = st.send_window.checked_add(hdr.length).ok_or_else(|| {
                        Fail::protocol(format!("send window overflow on stream {id}"))
                    })?;
                    st.wake_writer();
                    Payload::None
                } else if hdr.length == 0 {
                    Payload::None
                } else if hdr.length > st.recv_window {
                    return Err(Fail::protocol(format!(
                        "stream {id} sent {} bytes with {} left in its window",
                        hdr.length, st.recv_window
                    )));
                } else {
                    st.recv_window -= hdr.length;
                    Payload::Keep
                }
            }
        }
    };
    if notify_writer {
        shared.write_notify.notify_one();
    }

    // Phase 2: the payload, read without holding the lock.
    let data = match payload {
        Payload::None => None,
        Payload::Discard => {
            let mut limited = (&mut *rd).take(u64::from(hdr.length));
            let n = tokio::io::copy(&mut limited, &mut tokio::io::sink()).await?;
            if n < u64::from(hdr.length) {
                return Err(Fail(Error::RemoteClosed, None));
            }
            None
        }
        Payload::Keep => {
            let mut buf = BytesMut::zeroed(hdr.length as usize);
            rd.read_exact(&mut buf).await?;
            Some(buf.freeze())
        }
    };

    // Phase 3: deliver data, then FIN/RST (they logically follow the data
    // in the same frame).
    let mut g = shared.lock();
    let inner = &mut *g;
    let Some(st) = inner.streams.get_mut(&id) else {
        return Ok(());
    };
    if let Some(data) = data {
        if st.orphan || st.reset || st.remote_fin {
            // Nobody will read it. An orphan whose peer has used up the
            // whole window would stall the peer forever: reset instead.
            if st.orphan && st.recv_window == 0 {
                inner.streams.remove(&id);
                inner
                    .ordered
                    .push_back(header_frame(FrameType::WindowUpdate, flags::RST, id, 0));
                drop(g);
                shared.write_notify.notify_one();
                return Ok(());
            }
        } else {
            st.buffered += data.len();
            st.recv_buf.push_back(data);
            st.wake_reader();
        }
    }
    if hdr.has(flags::RST) {
        st.reset = true;
        st.recv_buf.clear();
        st.buffered = 0;
        st.wake_reader();
        st.wake_writer();
        if st.orphan {
            inner.streams.remove(&id);
        }
    } else if hdr.has(flags::FIN) {
        st.remote_fin = true;
        st.wake_reader();
        if st.orphan {
            // We sent FIN when the handle was dropped; both sides are done.
            inner.streams.remove(&id);
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// Stream
// ---------------------------------------------------------------------------

/// One bidirectional stream of a [`Session`]. `AsyncRead` returns 0 after
/// the peer's FIN; `AsyncWrite::shutdown` sends our FIN (half-close).
/// Dropping it closes gracefully (see the module docs); [`Stream::reset`]
/// aborts.
pub struct Stream {
    id: u32,
    shared: Arc<Shared>,
}

impl fmt::Debug for Stream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Stream").field("id", &self.id).finish()
    }
}

fn gone() -> io::Error {
    io::Error::new(io::ErrorKind::NotConnected, "yamux stream no longer exists")
}

fn reset_error() -> io::Error {
    io::Error::new(io::ErrorKind::ConnectionReset, "yamux stream reset")
}

impl Stream {
    /// The stream ID (odd when opened by the client side).
    pub fn id(&self) -> u32 {
        self.id
    }

    /// Aborts the stream: sends RST; the peer's reads and writes fail with
    /// a reset error. Buffered data is discarded on both sides.
    pub fn reset(self) {
        let mut g = self.shared.lock();
        if g.streams.remove(&self.id).is_some() && g.closed.is_none() {
            // Ordered, so it cannot overtake our own SYN.
            g.ordered.push_back(header_frame(
                FrameType::WindowUpdate,
                flags::RST,
                self.id,
                0,
            ));
            drop(g);
            self.shared.write_notify.notify_one();
        }
        // Drop now finds no state and does nothing more.
    }
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let shared = &*self.shared;
        let max = shared.config.max_stream_window;
        let mut g = shared.lock();
        let inner = &mut *g;
        let Some(st) = inner.streams.get_mut(&self.id) else {
            return Poll::Ready(Err(gone()));
        };
        if st.buffered > 0 {
            let mut copied = 0;
            while buf.remaining() > 0 {
                let Some(front) = st.recv_buf.front_mut() else {
                    break;
                };
                let n = front.len().min(buf.remaining());
                buf.put_slice(&front[..n]);
                front.advance(n);
                if front.is_empty() {
                    st.recv_buf.pop_front();
                }
                copied += n;
            }
            st.buffered -= copied;
            // Like Go: re-grant what has been consumed once it reaches half
            // the window, so small reads do not each cost a frame.
            if !st.remote_fin && inner.closed.is_none() {
                let buffered = u32::try_from(st.buffered).unwrap_or(max);
                let delta = max.saturating_sub(buffered).saturating_sub(st.recv_window);
                if delta >= max / 2 {
                    st.recv_window += delta;
                    inner.urgent.push_back(header_frame(
                        FrameType::WindowUpdate,
                        0,
                        self.id,
                        delta,
                    ));
                    drop(g);
                    shared.write_notify.notify_one();
                }
            }
            return Poll::Ready(Ok(()));
        }
        if st.reset {
            return Poll::Ready(Err(reset_error()));
        }
        if st.remote_fin {
            return Poll::Ready(Ok(()));
        }
        if let Some(e) = &inner.closed {
            return Poll::Ready(Err(e.clone().into()));
        }
        st.read_waker = Some(cx.waker().clone());
        Poll::Pending
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let shared = &*self.shared;
        let mut g = shared.lock();
        let inner = &mut *g;
        if let Some(e) = &inner.closed {
            return Poll::Ready(Err(e.clone().into()));
        }
        let Some(st) = inner.streams.get_mut(&self.id) else {
            return Poll::Ready(Err(gone()));
        };
        if st.reset {
            return Poll::Ready(Err(reset_error()));
        }
        if st.local_fin {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "write after shutdown of yamux stream",
            )));
        }
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        if st.send_window == 0 {
            // Never exceed the peer's window: wait for its update.
            st.write_waker = Some(cx.waker().clone());
            return Poll::Pending;
        }
        let n = buf.len().min(st.send_window as usize).min(MAX_DATA_FRAME);
        // n <= send_window, a u32.
        st.send_window -= n as u32;
        inner.ordered.push_back(data_frame(self.id, &buf[..n]));
        drop(g);
        shared.write_notify.notify_one();
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // Frames are handed to the writer task as soon as they are written;
        // there is nothing buffered here to push.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let shared = &*self.shared;
        let mut g = shared.lock();
        let inner = &mut *g;
        if let Some(e) = &inner.closed {
            return Poll::Ready(Err(e.clone().into()));
        }
        let Some(st) = inner.streams.get_mut(&self.id) else {
            return Poll::Ready(Err(gone()));
        };
        if st.reset {
            return Poll::Ready(Err(reset_error()));
        }
        if !st.local_fin {
            st.local_fin = true;
            inner.ordered.push_back(header_frame(
                FrameType::WindowUpdate,
                flags::FIN,
                self.id,
                0,
            ));
            drop(g);
            shared.write_notify.notify_one();
        }
        Poll::Ready(Ok(()))
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        let mut g = self.shared.lock();
        let inner = &mut *g;
        let Some(st) = inner.streams.get_mut(&self.id) else {
            return;
        };
        if inner.closed.is_some() || st.reset || (st.local_fin && st.remote_fin) {
            inner.streams.remove(&self.id);
            return;
        }
        if !st.local_fin {
            st.local_fin = true;
            inner.ordered.push_back(header_frame(
                FrameType::WindowUpdate,
                flags::FIN,
                self.id,
                0,
            ));
        }
        if st.remote_fin {
            inner.streams.remove(&self.id);
        } else if st.recv_window == 0 {
            // The peer is blocked on a window we will never reopen.
            inner.streams.remove(&self.id);
            inner.ordered.push_back(header_frame(
                FrameType::WindowUpdate,
                flags::RST,
                self.id,
                0,
            ));
        } else {
            st.orphan = true;
            st.recv_buf.clear();
            st.buffered = 0;
            st.read_waker = None;
            st.write_waker = None;
        }
        drop(g);
        self.shared.write_notify.notify_one();
    }
}
