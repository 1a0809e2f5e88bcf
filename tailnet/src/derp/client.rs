//! DERP client over an already-upgraded byte stream: the login handshake
//! (ServerKey → ClientInfo → ServerInfo), sending packets, and receiving
//! events with Ping answered automatically and unknown frames skipped.
//!
//! The stream is split: a background task owns the write half and drains a
//! bounded queue, so [`DerpSender::send`] and [`DerpReceiver::recv`] are
//! both cancel-safe and can run on different tasks.
//!
//! Liveness is this module's too, because a relay connection can die with
//! no FIN or RST (a laptop sleep, a Wi-Fi change, a NAT mapping expiring)
//! and real relays send a KeepAlive only every 60 s. With nothing read for
//! [`ClientOptions::probe_after`] — or only [`ClientOptions::probe_after_busy`]
//! when we have sent packets since the last frame arrived, so answers are
//! due — the receiver sends a Ping; with still nothing read
//! [`ClientOptions::probe_timeout`] later, `recv` fails with
//! [`DerpError::NoPong`]. The bounds are short on purpose: a real Coder
//! agent's TCP stack retransmits unacknowledged data five times, the last
//! about 6.2 s after the first send (at the minimum 200 ms timeout), and
//! gives up on the connection at about 12.6 s — so a dead relay must be
//! replaced within roughly 6 s of the agent's first unanswered packet for
//! the session to live. Busy: a Ping after 1 s of silence, dead 2 s later. A write that makes no progress for
//! [`ClientOptions::write_timeout`] ends the writer, and `recv` then fails
//! with [`DerpError::WriteStalled`]. Both bounds count only time the
//! process was awake ([`crate::clock`]). The writer task ends by itself
//! once every sender and the receiver are gone (after writing what was
//! queued) or when a write fails or stalls.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::sync::{mpsc, watch};
use tokio::time::{Interval, MissedTickBehavior};

use crate::clock::AwakeClock;

use super::frame::{
    self, kind, write_queued, Frame, FrameReader, PeerGoneReason, CLIENT_MAX_FRAME_LEN,
    MAX_PACKET_SIZE, PROTOCOL_VERSION, SERVER_KEY_MAX_FRAME_LEN,
};
use super::key::{NodePrivate, NodePublic};
use super::DerpError;

/// Knobs for [`DerpClient::handshake`].
#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// Declares that this client answers pings (it does). Sent as
    /// `CanAckPings` in the ClientInfo JSON.
    pub can_ack_pings: bool,
    /// Mesh key for trusted relay-to-relay clients; `None` for normal clients.
    pub mesh_key: Option<String>,
    pub is_prober: bool,
    /// Bound on the whole login exchange.
    pub handshake_timeout: Duration,
    /// Frames queued for the writer task before `send` waits (and
    /// `try_send` refuses).
    pub send_queue: usize,
    /// Send a Ping after this long with nothing read; `None` never probes
    /// (the connection then dies only by EOF, an error or a stalled write).
    pub probe_after: Option<Duration>,
    /// The same, when packets went out since the last frame came in (so
    /// acknowledgements are due): silence is suspicious sooner.
    pub probe_after_busy: Duration,
    /// After the probe, how much longer with nothing read makes the
    /// connection dead.
    pub probe_timeout: Duration,
    /// A write that makes no progress for this long makes it dead.
    pub write_timeout: Duration,
}

impl Default for ClientOptions {
    fn default() -> Self {
        Self {
            can_ack_pings: true,
            mesh_key: None,
            is_prober: false,
            handshake_timeout: Duration::from_secs(10),
            send_queue: 64,
            probe_after: Some(Duration::from_secs(4)),
            probe_after_busy: Duration::from_secs(1),
            probe_timeout: Duration::from_secs(2),
            write_timeout: Duration::from_secs(10),
        }
    }
}

/// The JSON a client seals into its ClientInfo frame. Field names follow
/// what Go servers expect (`version`, `meshKey`, `CanAckPings`,
/// `IsProber`); parsing also accepts other capitalisations because Go's
/// JSON decoder matches names case-insensitively.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClientInfo {
    #[serde(
        rename = "version",
        alias = "Version",
        default,
        skip_serializing_if = "is_zero"
    )]
    pub version: u32,
    #[serde(
        rename = "meshKey",
        alias = "MeshKey",
        alias = "meshkey",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub mesh_key: Option<String>,
    #[serde(rename = "CanAckPings", alias = "canAckPings", default)]
    pub can_ack_pings: bool,
    #[serde(
        rename = "IsProber",
        alias = "isProber",
        default,
        skip_serializing_if = "is_false"
    )]
    pub is_prober: bool,
}

/// The JSON a server seals into its ServerInfo frame.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServerInfo {
    #[serde(
        rename = "version",
        alias = "Version",
        default,
        skip_serializing_if = "is_zero"
    )]
    pub version: u32,
    /// Bytes per second the server says it accepts (0 = unspecified).
    /// Not enforced by this client.
    #[serde(
        rename = "TokenBucketBytesPerSecond",
        alias = "tokenBucketBytesPerSecond",
        default,
        skip_serializing_if = "is_zero_i64"
    )]
    pub token_bucket_bytes_per_second: i64,
    #[serde(
        rename = "TokenBucketBytesBurst",
        alias = "tokenBucketBytesBurst",
        default,
        skip_serializing_if = "is_zero_i64"
    )]
    pub token_bucket_bytes_burst: i64,
}

fn is_zero(v: &u32) -> bool {
    *v == 0
}
fn is_zero_i64(v: &i64) -> bool {
    *v == 0
}
fn is_false(v: &bool) -> bool {
    !*v
}

/// What [`DerpReceiver::recv`] hands back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A packet relayed from `src` (a WireGuard or disco datagram).
    Packet { src: NodePublic, data: Vec<u8> },
    /// A peer we talked to is gone from this relay.
    PeerGone {
        peer: NodePublic,
        reason: PeerGoneReason,
    },
    /// (Mesh watchers only.) A peer is connected.
    PeerPresent { peer: NodePublic },
    /// The server's periodic keep-alive.
    KeepAlive,
    /// A server ping; the Pong has already been queued.
    Ping([u8; 8]),
    /// Reply to a ping we sent.
    Pong([u8; 8]),
    /// Connection health text; empty means healthy again.
    Health { problem: String },
    /// The server is restarting: reconnect after `reconnect_in`, keep
    /// trying for `try_for`.
    Restarting {
        reconnect_in: Duration,
        try_for: Duration,
    },
}

/// A logged-in DERP connection.
#[derive(Debug)]
pub struct DerpClient<S> {
    sender: DerpSender,
    receiver: DerpReceiver<S>,
    server_info: ServerInfo,
}

/// The sending side; cheap to clone.
#[derive(Debug, Clone)]
pub struct DerpSender {
    tx: mpsc::Sender<Vec<u8>>,
    public: NodePublic,
    server_key: NodePublic,
    writer: Arc<WriterState>,
}

/// What the writer task shares with the senders and the receiver.
#[derive(Debug)]
struct WriterState {
    /// Frames accepted into the queue so far.
    queued: AtomicU64,
    /// Packets (SendPacket frames) accepted so far: what we expect answers
    /// to.
    packets: AtomicU64,
    /// Frames written (and flushed) so far.
    written: watch::Sender<u64>,
    /// Why the writer stopped, if it failed.
    failure: Mutex<Option<DerpError>>,
}

impl WriterState {
    fn take_failure(&self) -> Option<DerpError> {
        self.failure
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .take()
    }
}

/// The receiving side.
#[derive(Debug)]
pub struct DerpReceiver<S> {
    reader: FrameReader<ReadHalf<S>>,
    pongs: DerpSender,
    probe_after: Option<Duration>,
    probe_after_busy: Duration,
    probe_timeout: Duration,
    /// Packets sent when the last frame arrived (see `WriterState::packets`).
    packets_at_read: u64,
    /// Awake time since the last frame arrived.
    silence: AwakeClock,
    /// How far into the current silence our Ping went out, if it did.
    probed_at: Option<Duration>,
    /// Wakes `recv` to look at the silence.
    tick: Interval,
    pings: u64,
}

impl<S> DerpClient<S>
where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    /// Logs in on `io`, a stream already switched to DERP (after the HTTP
    /// upgrade or inside a websocket): reads the ServerKey greeting (≤ 1 KiB,
    /// magic checked), sends ClientInfo sealed to the server key with a
    /// random nonce, then waits for ServerInfo and opens it.
    pub async fn handshake(
        io: S,
        private: &NodePrivate,
        opts: ClientOptions,
    ) -> Result<Self, DerpError> {
        let limit = opts.handshake_timeout;
        match tokio::time::timeout(limit, Self::handshake_inner(io, private, opts)).await {
            Ok(r) => r,
            Err(_) => Err(DerpError::Timeout(limit)),
        }
    }

    async fn handshake_inner(
        io: S,
        private: &NodePrivate,
        opts: ClientOptions,
    ) -> Result<Self, DerpError> {
        let (r, mut w) = tokio::io::split(io);
        let mut reader = FrameReader::new(r);

        let (k, payload) = reader.expect_frame(SERVER_KEY_MAX_FRAME_LEN).await?;
        if k != kind::SERVER_KEY {
            return Err(DerpError::UnexpectedFrame {
                got: k,
                want: "ServerKey",
            });
        }
        let server_key = match Frame::decode(k, &payload)? {
            Frame::ServerKey { key, .. } => key,
            _ => return Err(DerpError::BadMagic),
        };

        let info = ClientInfo {
            version: PROTOCOL_VERSION,
            mesh_key: opts.mesh_key.clone(),
            can_ack_pings: opts.can_ack_pings,
            is_prober: opts.is_prober,
        };
        let json = serde_json::to_vec(&info).map_err(|source| DerpError::Json {
            what: "client info",
            source,
        })?;
        let hello = Frame::ClientInfo {
            key: private.public(),
            sealed: private.seal_to(&server_key, &json),
        };
        w.write_all(&hello.encode()).await?;
        w.flush().await?;

        let server_info = loop {
            let (k, payload) = reader.expect_frame(CLIENT_MAX_FRAME_LEN).await?;
            match k {
                kind::SERVER_INFO => {
                    let sealed = match Frame::decode(k, &payload)? {
                        Frame::ServerInfo { sealed } => sealed,
                        _ => return Err(DerpError::BadBox("server info")),
                    };
                    let json = private
                        .open_from(&server_key, &sealed)
                        .ok_or(DerpError::BadBox("server info"))?;
                    let si: ServerInfo =
                        serde_json::from_slice(&json).map_err(|source| DerpError::Json {
                            what: "server info",
                            source,
                        })?;
                    break si;
                }
                kind::KEEP_ALIVE => continue,
                k if is_known(k) => {
                    return Err(DerpError::UnexpectedFrame {
                        got: k,
                        want: "ServerInfo",
                    })
                }
                other => {
                    log::debug!("derp: skipping unknown frame type {other:#04x} during login");
                    continue;
                }
            }
        };

        let (tx, rx) = mpsc::channel(opts.send_queue.max(1));
        let writer = Arc::new(WriterState {
            queued: AtomicU64::new(0),
            packets: AtomicU64::new(0),
            written: watch::channel(0).0,
            failure: Mutex::new(None),
        });
        tokio::spawn(write_loop(w, rx, opts.write_timeout, writer.clone()));
        let sender = DerpSender {
            tx,
            public: private.public(),
            server_key,
            writer,
        };
        let mut tick = tokio::time::interval(LIVENESS_TICK);
        tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        Ok(Self {
            receiver: DerpReceiver {
                reader,
                pongs: sender.clone(),
                probe_after: opts.probe_after,
                probe_after_busy: opts.probe_after_busy,
                probe_timeout: opts.probe_timeout,
                packets_at_read: 0,
                silence: AwakeClock::new(),
                probed_at: None,
                tick,
                pings: 0,
            },
            sender,
            server_info,
        })
    }
}

impl<S: AsyncRead> DerpClient<S> {
    pub fn server_key(&self) -> NodePublic {
        self.sender.server_key
    }

    pub fn public_key(&self) -> NodePublic {
        self.sender.public
    }

    pub fn server_info(&self) -> &ServerInfo {
        &self.server_info
    }

    /// A clonable handle for sending from other tasks.
    pub fn sender(&self) -> DerpSender {
        self.sender.clone()
    }

    pub fn into_split(self) -> (DerpSender, DerpReceiver<S>) {
        (self.sender, self.receiver)
    }

    pub async fn send(&self, dst: &NodePublic, packet: &[u8]) -> Result<(), DerpError> {
        self.sender.send(dst, packet).await
    }

    pub async fn note_preferred(&self, preferred: bool) -> Result<(), DerpError> {
        self.sender.note_preferred(preferred).await
    }
}

impl<S: AsyncRead> DerpClient<S> {
    pub async fn recv(&mut self) -> Result<Event, DerpError> {
        self.receiver.recv().await
    }
}

impl DerpSender {
    pub fn public_key(&self) -> NodePublic {
        self.public
    }

    pub fn server_key(&self) -> NodePublic {
        self.server_key
    }

    /// Whether the writer task has stopped (connection broken or closed).
    pub fn is_closed(&self) -> bool {
        self.tx.is_closed()
    }

    /// Queues `packet` for `dst`. Fails if the packet exceeds 64 KiB or the
    /// connection is gone. Waits while the send queue is full.
    pub async fn send(&self, dst: &NodePublic, packet: &[u8]) -> Result<(), DerpError> {
        let body = send_packet_frame(dst, packet)?;
        self.queue(body).await?;
        self.writer.packets.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Like [`send`](Self::send), but never waits: a full queue is
    /// [`DerpError::QueueFull`] (the datagram is dropped; WireGuard and TCP
    /// recover from a lost packet, a stalled data path they cannot).
    pub fn try_send(&self, dst: &NodePublic, packet: &[u8]) -> Result<(), DerpError> {
        let body = send_packet_frame(dst, packet)?;
        match self.tx.try_send(body) {
            Ok(()) => {
                self.writer.queued.fetch_add(1, Ordering::Relaxed);
                self.writer.packets.fetch_add(1, Ordering::Relaxed);
                Ok(())
            }
            Err(mpsc::error::TrySendError::Full(_)) => Err(DerpError::QueueFull),
            Err(mpsc::error::TrySendError::Closed(_)) => Err(DerpError::Closed),
        }
    }

    /// Waits until every frame queued before this call has been written
    /// and flushed; fails if the writer stopped first. Unbounded: callers
    /// wrap it in a timeout.
    pub async fn flush(&self) -> Result<(), DerpError> {
        let target = self.writer.queued.load(Ordering::Relaxed);
        let mut written = self.writer.written.subscribe();
        tokio::select! {
            r = written.wait_for(|n| *n >= target) => r.map(|_| ()).map_err(|_| DerpError::Closed),
            _ = self.tx.closed() => Err(DerpError::Closed),
        }
    }

    /// Tells the server whether this is our home (preferred) relay.
    pub async fn note_preferred(&self, preferred: bool) -> Result<(), DerpError> {
        self.queue(Frame::NotePreferred(preferred).encode()).await
    }

    /// Sends a Ping; the server answers with a Pong event.
    pub async fn send_ping(&self, data: [u8; 8]) -> Result<(), DerpError> {
        self.queue(Frame::Ping(data).encode()).await
    }

    /// Sends any frame as-is (tests, future frame types).
    pub async fn send_frame(&self, frame: &Frame) -> Result<(), DerpError> {
        self.queue(frame.encode()).await
    }

    async fn queue(&self, bytes: Vec<u8>) -> Result<(), DerpError> {
        self.tx.send(bytes).await.map_err(|_| DerpError::Closed)?;
        self.writer.queued.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}

/// How often a waiting receiver looks at its silence.
const LIVENESS_TICK: Duration = Duration::from_secs(1);
/// The same while packets we sent await an answer.
const LIVENESS_TICK_BUSY: Duration = Duration::from_millis(250);

fn send_packet_frame(dst: &NodePublic, packet: &[u8]) -> Result<Vec<u8>, DerpError> {
    if packet.len() > MAX_PACKET_SIZE {
        return Err(DerpError::PacketTooLarge(packet.len()));
    }
    let mut body = Vec::with_capacity(frame::FRAME_HEADER_LEN + 32 + packet.len());
    body.push(kind::SEND_PACKET);
    body.extend_from_slice(&((32 + packet.len()) as u32).to_be_bytes());
    body.extend_from_slice(dst.as_bytes());
    body.extend_from_slice(packet);
    Ok(body)
}

impl<S: AsyncRead> DerpReceiver<S> {
    /// The next event. Pings are answered before they are returned;
    /// unknown frame types and malformed known frames are skipped (logged
    /// at debug). Cancel-safe. `Err(Closed)` on EOF; I/O errors and frames
    /// over 1 MiB are fatal, and so are a probe nobody answers
    /// ([`DerpError::NoPong`]) and a stalled or failed write.
    pub async fn recv(&mut self) -> Result<Event, DerpError> {
        loop {
            // Biased: a writer that died must be noticed even while frames
            // keep arriving, and a frame that is there is life, whatever
            // the clock says.
            tokio::select! {
                biased;
                _ = self.pongs.tx.closed() => {
                    return Err(self.pongs.writer.take_failure().unwrap_or(DerpError::Closed));
                }
                got = self.reader.expect_frame(CLIENT_MAX_FRAME_LEN) => {
                    let (k, payload) = got?;
                    self.silence.reset();
                    self.probed_at = None;
                    self.packets_at_read = self.pongs.writer.packets.load(Ordering::Relaxed);
                    if let Some(ev) = self.event(k, &payload) {
                        return Ok(ev);
                    }
                }
                _ = self.tick.tick(), if self.probe_after.is_some() => {
                    self.check_silence()?;
                    // Look closer while answers are due (the busy bound is
                    // short); an idle connection wakes once a second.
                    let busy = self.pongs.writer.packets.load(Ordering::Relaxed) > self.packets_at_read;
                    let period = if busy { LIVENESS_TICK_BUSY } else { LIVENESS_TICK };
                    if self.tick.period() != period {
                        self.tick = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
                        self.tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
                    }
                }
            }
        }
    }

    /// Probes a silent connection; fails one whose probe went unanswered.
    fn check_silence(&mut self) -> Result<(), DerpError> {
        let Some(after) = self.probe_after else {
            return Ok(());
        };
        if let Some(gap) = self.silence.look() {
            log::debug!("derp: {gap:?} without running; not counted as silence");
        }
        let silent = self.silence.counted();
        let busy = self.pongs.writer.packets.load(Ordering::Relaxed) > self.packets_at_read;
        let after = if busy {
            after.min(self.probe_after_busy)
        } else {
            after
        };
        if let Some(at) = self.probed_at {
            if silent >= at + self.probe_timeout {
                return Err(DerpError::NoPong(self.probe_timeout));
            }
            return Ok(());
        }
        if silent >= after {
            self.probed_at = Some(silent);
            self.pings += 1;
            let mut data = [0u8; 8];
            data.copy_from_slice(&self.pings.to_be_bytes());
            // Never wait on the writer here: a full queue means the writer
            // is stuck, which its own bound reports.
            if self.pongs.tx.try_send(Frame::Ping(data).encode()).is_ok() {
                self.pongs.writer.queued.fetch_add(1, Ordering::Relaxed);
            }
            log::debug!("derp: nothing read for {silent:?}; ping sent");
        }
        Ok(())
    }

    /// The event for one frame, `None` for a frame that is skipped.
    fn event(&mut self, k: u8, payload: &[u8]) -> Option<Event> {
        let frame = match Frame::decode(k, payload) {
            Ok(f) => f,
            Err(e) => {
                // Like Tailscale's client: a bad frame of a known type is
                // dropped, not fatal (e.g. a short packet, a stray greeting).
                log::debug!("derp: dropping frame {k:#04x}: {e}");
                return None;
            }
        };
        Some(match frame {
            Frame::RecvPacket { src, data } => Event::Packet { src, data },
            Frame::KeepAlive => Event::KeepAlive,
            Frame::PeerGone { peer, reason } => Event::PeerGone { peer, reason },
            Frame::PeerPresent { peer } => Event::PeerPresent { peer },
            Frame::Ping(d) => {
                // Never block the reader on a congested writer: like the
                // Go server, drop a pong we cannot queue right now.
                if self.pongs.tx.try_send(Frame::Pong(d).encode()).is_ok() {
                    self.pongs.writer.queued.fetch_add(1, Ordering::Relaxed);
                } else {
                    log::debug!("derp: send queue full or closed; pong dropped");
                }
                Event::Ping(d)
            }
            Frame::Pong(d) => Event::Pong(d),
            Frame::Health(problem) => Event::Health { problem },
            Frame::Restarting {
                reconnect_in,
                try_for,
            } => Event::Restarting {
                reconnect_in,
                try_for,
            },
            other => {
                log::debug!("derp: skipping frame type {:#04x}", other.kind());
                return None;
            }
        })
    }

    /// A sender sharing this connection's writer.
    pub fn sender(&self) -> DerpSender {
        self.pongs.clone()
    }
}

fn is_known(k: u8) -> bool {
    matches!(
        k,
        kind::SERVER_KEY
            | kind::CLIENT_INFO
            | kind::SEND_PACKET
            | kind::RECV_PACKET
            | kind::NOTE_PREFERRED
            | kind::PEER_GONE
            | kind::PEER_PRESENT
            | kind::PING
            | kind::PONG
            | kind::HEALTH
            | kind::RESTARTING
    )
}

/// Owns the write half: writes queued frames, flushing once the queue is
/// momentarily empty. Ends (closing the write side) when every sender is
/// dropped, or when a write fails or makes no progress for `limit` of
/// awake time; senders then see [`DerpError::Closed`] and the receiver the
/// failure.
async fn write_loop<W: AsyncWrite>(
    mut w: WriteHalf<W>,
    mut rx: mpsc::Receiver<Vec<u8>>,
    limit: Duration,
    state: Arc<WriterState>,
) {
    let mut out = Vec::new();
    let mut tick = tokio::time::interval(LIVENESS_TICK);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut stalled = AwakeClock::new();
    while let Some(first) = rx.recv().await {
        stalled.reset();
        let write = write_queued(&mut w, first, &mut rx, &mut out);
        tokio::pin!(write);
        let result = loop {
            tokio::select! {
                biased;
                r = &mut write => break r.map_err(DerpError::from),
                _ = tick.tick() => {
                    stalled.look();
                    if stalled.counted() >= limit {
                        break Err(DerpError::WriteStalled(limit));
                    }
                }
            }
        };
        match result {
            Ok(n) => state.written.send_modify(|w| *w += n),
            Err(e) => {
                log::debug!("derp: write failed: {e}");
                *state
                    .failure
                    .lock()
                    .unwrap_or_else(|poisoned| poisoned.into_inner()) = Some(e);
                return;
            }
        }
    }
    let _ = tokio::time::timeout(limit, w.shutdown()).await;
}
