//! An in-process DERP relay for coder-sim and tests: accepts upgraded
//! streams, logs clients in (ServerKey → ClientInfo box → ServerInfo),
//! keeps a registry of connected node keys, and relays SendPacket as
//! RecvPacket to the connection holding the destination key.
//!
//! Behaviour modelled on Tailscale's relay: PeerGone(NotHere) to a sender
//! whose destination is absent (rate-limited, 3 then 1/s per connection);
//! PeerGone(Disconnected) to the peers a departing client had sent to;
//! periodic KeepAlive; Ping answered with Pong; mesh frames refused;
//! other unknown frames skipped. A second connection with the same key
//! takes over delivery; the older one stays open until it ends.
//!
//! Fault hooks: [`DerpServer::send_health`], [`DerpServer::send_restarting`],
//! [`DerpServer::send_frame_to`], [`DerpServer::drop_client`],
//! [`DerpServer::drop_all`], [`DerpServer::freeze_client`] (a silently dead
//! connection: open, but nothing read or written any more) and
//! [`DerpServer::refuse_for`] (new connections are dropped before the
//! greeting, as a relay that is down would).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, WriteHalf};
use tokio::sync::{mpsc, watch, Notify};
use tokio::time::Instant;

use super::client::{ClientInfo, ServerInfo};
use super::frame::{
    kind, write_queued, Frame, FrameReader, PeerGoneReason, CLIENT_INFO_MAX_FRAME_LEN,
    MAX_PACKET_SIZE, PROTOCOL_VERSION, SERVER_MAX_FRAME_LEN,
};
use super::key::{NodePrivate, NodePublic};
use super::DerpError;

/// Knobs for [`DerpServer`].
#[derive(Debug, Clone)]
pub struct ServerOptions {
    /// Interval between KeepAlive frames (Tailscale: 60 s plus jitter).
    pub keepalive: Duration,
    /// Bound on the login exchange of each connection.
    pub handshake_timeout: Duration,
    /// Frames queued per connection before packets to it are dropped.
    pub queue_depth: usize,
}

impl Default for ServerOptions {
    fn default() -> Self {
        Self {
            keepalive: Duration::from_secs(60),
            handshake_timeout: Duration::from_secs(10),
            queue_depth: 256,
        }
    }
}

/// Counters since the server was created.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ServerStats {
    pub connections_accepted: u64,
    pub current_connections: u64,
    pub packets_forwarded: u64,
    /// Dropped because the destination's queue was full or closing.
    pub packets_dropped: u64,
    /// Destination key not connected here.
    pub packets_unknown_dst: u64,
    /// Connections dropped by [`DerpServer::refuse_for`].
    pub connections_refused: u64,
}

/// The relay. Cheap to clone; clones share the registry.
#[derive(Clone)]
pub struct DerpServer {
    inner: Arc<Inner>,
}

struct Inner {
    private: NodePrivate,
    public: NodePublic,
    opts: ServerOptions,
    state: Mutex<State>,
    next_conn: AtomicU64,
    generation: watch::Sender<u64>,
    accepted: AtomicU64,
    forwarded: AtomicU64,
    dropped: AtomicU64,
    unknown_dst: AtomicU64,
    refused: AtomicU64,
    /// Until when new connections are refused.
    refuse_until: Mutex<Option<Instant>>,
    /// When each refused connection arrived (the newest [`REFUSED_LOG`]).
    refused_at: Mutex<std::collections::VecDeque<Instant>>,
}

/// How many refused-connection times [`DerpServer::refused_at`] keeps.
const REFUSED_LOG: usize = 1024;

#[derive(Default)]
struct State {
    conns: HashMap<u64, ConnEntry>,
    /// Which connection receives packets for a key (the newest).
    active: HashMap<NodePublic, u64>,
    /// src key → (dst key → dst connection id), for PeerGone on departure.
    sent_to: HashMap<NodePublic, HashMap<NodePublic, u64>>,
}

struct ConnEntry {
    key: NodePublic,
    tx: mpsc::Sender<Vec<u8>>,
    close: Arc<Notify>,
    /// Parks the connection: it stays open, but is no longer read from
    /// or written to (until `close`).
    freeze: Arc<Notify>,
    frozen: bool,
    preferred: bool,
}

impl std::fmt::Debug for DerpServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DerpServer")
            .field("public", &self.inner.public)
            .field("stats", &self.stats())
            .finish()
    }
}

impl Default for DerpServer {
    fn default() -> Self {
        Self::new()
    }
}

impl DerpServer {
    /// A relay with a fresh key and default options.
    pub fn new() -> Self {
        Self::with_options(NodePrivate::generate(), ServerOptions::default())
    }

    pub fn with_options(private: NodePrivate, opts: ServerOptions) -> Self {
        let public = private.public();
        Self {
            inner: Arc::new(Inner {
                private,
                public,
                opts,
                state: Mutex::new(State::default()),
                next_conn: AtomicU64::new(1),
                generation: watch::channel(0).0,
                accepted: AtomicU64::new(0),
                forwarded: AtomicU64::new(0),
                dropped: AtomicU64::new(0),
                unknown_dst: AtomicU64::new(0),
                refused: AtomicU64::new(0),
                refuse_until: Mutex::new(None),
                refused_at: Mutex::new(std::collections::VecDeque::new()),
            }),
        }
    }

    /// The server's public key (sent in ServerKey and `Derp-Public-Key`).
    pub fn public_key(&self) -> NodePublic {
        self.inner.public
    }

    /// Serves one upgraded connection until it ends. Returns `Ok(())` when
    /// the client hangs up or a fault hook closes it.
    pub async fn accept<S>(&self, io: S) -> Result<(), DerpError>
    where
        S: AsyncRead + AsyncWrite + Send + 'static,
    {
        let inner = &self.inner;
        if self.refusing() {
            inner.refused.fetch_add(1, Ordering::Relaxed);
            let mut log = lock(&inner.refused_at);
            if log.len() >= REFUSED_LOG {
                log.pop_front();
            }
            log.push_back(Instant::now());
            drop(log);
            // Dropping `io` closes the connection before the greeting.
            return Err(DerpError::Protocol("refusing connections (fault)".into()));
        }
        let (r, mut w) = tokio::io::split(io);
        let mut reader = FrameReader::new(r);

        let limit = inner.opts.handshake_timeout;
        let login = async {
            let greeting = Frame::ServerKey {
                key: inner.public,
                extra: Vec::new(),
            };
            w.write_all(&greeting.encode()).await?;
            w.flush().await?;
            let (k, payload) = reader.expect_frame(CLIENT_INFO_MAX_FRAME_LEN).await?;
            if k != kind::CLIENT_INFO {
                return Err(DerpError::UnexpectedFrame {
                    got: k,
                    want: "ClientInfo",
                });
            }
            let (key, sealed) = match Frame::decode(k, &payload)? {
                Frame::ClientInfo { key, sealed } => (key, sealed),
                _ => return Err(DerpError::BadBox("client info")),
            };
            let json = inner
                .private
                .open_from(&key, &sealed)
                .ok_or(DerpError::BadBox("client info"))?;
            let info: ClientInfo =
                serde_json::from_slice(&json).map_err(|source| DerpError::Json {
                    what: "client info",
                    source,
                })?;
            Ok((key, info))
        };
        let (key, info) = match tokio::time::timeout(limit, login).await {
            Ok(r) => r?,
            Err(_) => return Err(DerpError::Timeout(limit)),
        };
        if info.mesh_key.is_some() {
            log::debug!("derp server: {key:?} offered a mesh key; mesh is not served");
        }

        let (tx, rx) = mpsc::channel(inner.opts.queue_depth.max(1));
        let close = Arc::new(Notify::new());
        let freeze = Arc::new(Notify::new());
        let id = inner.next_conn.fetch_add(1, Ordering::Relaxed);
        self.register(id, key, tx, close.clone(), freeze.clone());
        // Unregisters however this future ends, cancellation included (a
        // task serving it may be aborted).
        let _registered = Registered {
            server: self,
            id,
            key,
        };

        let result = async {
            let si = ServerInfo {
                version: PROTOCOL_VERSION,
                ..ServerInfo::default()
            };
            let json = serde_json::to_vec(&si).map_err(|source| DerpError::Json {
                what: "server info",
                source,
            })?;
            let frame = Frame::ServerInfo {
                sealed: inner.private.seal_to(&key, &json),
            };
            w.write_all(&frame.encode()).await?;
            w.flush().await?;
            let signals = ConnSignals {
                close: &close,
                freeze: &freeze,
            };
            self.serve(id, key, reader, &mut w, rx, signals).await
        }
        .await;
        drop(_registered);
        let _ = w.shutdown().await;
        result
    }

    /// Reads an HTTP `GET /derp` with `Upgrade: DERP` from `io`, answers
    /// `101` (or `426` when the request is not an upgrade, returning
    /// `Ok(())`), then serves the connection like [`accept`](Self::accept).
    pub async fn accept_http<S>(&self, io: S) -> Result<(), DerpError>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        match super::http::accept_upgrade(io, &self.inner.public).await? {
            Some((upgraded, _headers)) => self.accept(upgraded).await,
            None => Ok(()),
        }
    }

    async fn serve<R, W>(
        &self,
        id: u64,
        key: NodePublic,
        mut reader: FrameReader<R>,
        w: &mut WriteHalf<W>,
        mut rx: mpsc::Receiver<Vec<u8>>,
        ConnSignals { close, freeze }: ConnSignals<'_>,
    ) -> Result<(), DerpError>
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite,
    {
        let every = self.inner.opts.keepalive;
        let mut keepalive = tokio::time::interval_at(Instant::now() + every, every);
        let mut gone_budget = PeerGoneBudget::new();
        let mut batch = Vec::new();
        loop {
            tokio::select! {
                _ = close.notified() => return Ok(()),
                _ = freeze.notified() => {
                    // Silently dead: the socket stays open, nothing moves
                    // either way (what a client sees after a NAT expiry).
                    log::debug!("derp server: conn {id} of {key:?} frozen");
                    close.notified().await;
                    return Ok(());
                }
                got = reader.next_frame(SERVER_MAX_FRAME_LEN) => {
                    let Some((k, payload)) = got? else { return Ok(()) };
                    if let Some(reply) = self.handle(id, key, k, &payload, &mut gone_budget)? {
                        w.write_all(&reply).await?;
                        w.flush().await?;
                    }
                }
                out = rx.recv() => {
                    let Some(bytes) = out else { return Ok(()) };
                    write_queued(w, bytes, &mut rx, &mut batch).await?;
                }
                _ = keepalive.tick() => {
                    w.write_all(&Frame::KeepAlive.encode()).await?;
                    w.flush().await?;
                }
            }
        }
    }

    /// Handles one client frame; returns bytes to write back to the same
    /// client, if any.
    fn handle(
        &self,
        id: u64,
        key: NodePublic,
        k: u8,
        payload: &[u8],
        gone_budget: &mut PeerGoneBudget,
    ) -> Result<Option<Vec<u8>>, DerpError> {
        let inner = &self.inner;
        match k {
            kind::SEND_PACKET => {
                let (dst, data) = match Frame::decode(k, payload)? {
                    Frame::SendPacket { dst, data } => (dst, data),
                    _ => return Ok(None),
                };
                if data.len() > MAX_PACKET_SIZE {
                    return Err(DerpError::PacketTooLarge(data.len()));
                }
                let mut st = self.lock();
                let target = st
                    .active
                    .get(&dst)
                    .and_then(|cid| st.conns.get(cid).map(|c| (*cid, c.tx.clone())));
                match target {
                    Some((dst_id, tx)) => {
                        st.sent_to.entry(key).or_default().insert(dst, dst_id);
                        drop(st);
                        let frame = Frame::RecvPacket { src: key, data }.encode();
                        if tx.try_send(frame).is_ok() {
                            inner.forwarded.fetch_add(1, Ordering::Relaxed);
                        } else {
                            inner.dropped.fetch_add(1, Ordering::Relaxed);
                        }
                        Ok(None)
                    }
                    None => {
                        drop(st);
                        inner.unknown_dst.fetch_add(1, Ordering::Relaxed);
                        if gone_budget.take() {
                            let gone = Frame::PeerGone {
                                peer: dst,
                                reason: PeerGoneReason::NotHere,
                            };
                            Ok(Some(gone.encode()))
                        } else {
                            Ok(None)
                        }
                    }
                }
            }
            kind::NOTE_PREFERRED => {
                let preferred = match Frame::decode(k, payload)? {
                    Frame::NotePreferred(p) => p,
                    _ => return Ok(None),
                };
                if let Some(c) = self.lock().conns.get_mut(&id) {
                    c.preferred = preferred;
                }
                Ok(None)
            }
            kind::PING => {
                if payload.len() < 8 {
                    return Err(DerpError::Malformed {
                        kind: k,
                        reason: "short ping",
                    });
                }
                if payload.len() > 1000 {
                    return Err(DerpError::Malformed {
                        kind: k,
                        reason: "ping body too large",
                    });
                }
                let mut d = [0u8; 8];
                d.copy_from_slice(&payload[..8]);
                Ok(Some(Frame::Pong(d).encode()))
            }
            kind::FORWARD_PACKET | kind::WATCH_CONNS | kind::CLOSE_PEER => Err(
                DerpError::Protocol(format!("mesh frame {k:#04x} refused: not a mesh peer")),
            ),
            other => {
                log::debug!("derp server: skipping frame type {other:#04x} from {key:?}");
                Ok(None)
            }
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        lock(&self.inner.state)
    }

    fn refusing(&self) -> bool {
        lock(&self.inner.refuse_until).is_some_and(|t| Instant::now() < t)
    }

    fn register(
        &self,
        id: u64,
        key: NodePublic,
        tx: mpsc::Sender<Vec<u8>>,
        close: Arc<Notify>,
        freeze: Arc<Notify>,
    ) {
        {
            let mut st = self.lock();
            st.conns.insert(
                id,
                ConnEntry {
                    key,
                    tx,
                    close,
                    freeze,
                    frozen: false,
                    preferred: false,
                },
            );
            st.active.insert(key, id);
        }
        self.inner.accepted.fetch_add(1, Ordering::Relaxed);
        self.inner.generation.send_modify(|g| *g += 1);
        log::debug!("derp server: {key:?} connected (conn {id})");
    }

    fn unregister(&self, id: u64, key: NodePublic) {
        {
            let mut st = self.lock();
            st.conns.remove(&id);
            if st.active.get(&key) == Some(&id) {
                // Hand delivery to a remaining duplicate, newest first.
                let next = st
                    .conns
                    .iter()
                    .filter(|(_, c)| c.key == key)
                    .map(|(cid, _)| *cid)
                    .max();
                match next {
                    Some(cid) => {
                        st.active.insert(key, cid);
                    }
                    None => {
                        st.active.remove(&key);
                        let notify = st.sent_to.remove(&key).unwrap_or_default();
                        for (_dst, dst_id) in notify {
                            if let Some(c) = st.conns.get(&dst_id) {
                                let gone = Frame::PeerGone {
                                    peer: key,
                                    reason: PeerGoneReason::Disconnected,
                                };
                                let _ = c.tx.try_send(gone.encode());
                            }
                        }
                    }
                }
            }
        }
        self.inner.generation.send_modify(|g| *g += 1);
        log::debug!("derp server: {key:?} disconnected (conn {id})");
    }

    /// Keys with at least one live connection.
    pub fn connected(&self) -> Vec<NodePublic> {
        self.lock().active.keys().copied().collect()
    }

    pub fn is_connected(&self, key: &NodePublic) -> bool {
        self.lock().active.contains_key(key)
    }

    /// Whether the active connection for `key` declared this its home relay.
    pub fn is_preferred(&self, key: &NodePublic) -> bool {
        let st = self.lock();
        st.active
            .get(key)
            .and_then(|id| st.conns.get(id))
            .is_some_and(|c| c.preferred)
    }

    /// Waits until `key` is (`want = true`) or is not connected.
    pub async fn wait_connected(&self, key: &NodePublic, want: bool, limit: Duration) -> bool {
        let mut changes = self.inner.generation.subscribe();
        let wait = async {
            loop {
                if self.is_connected(key) == want {
                    return;
                }
                if changes.changed().await.is_err() {
                    return;
                }
            }
        };
        tokio::time::timeout(limit, wait).await.is_ok() && self.is_connected(key) == want
    }

    pub fn stats(&self) -> ServerStats {
        let i = &self.inner;
        ServerStats {
            connections_accepted: i.accepted.load(Ordering::Relaxed),
            current_connections: self.lock().conns.len() as u64,
            packets_forwarded: i.forwarded.load(Ordering::Relaxed),
            packets_dropped: i.dropped.load(Ordering::Relaxed),
            packets_unknown_dst: i.unknown_dst.load(Ordering::Relaxed),
            connections_refused: i.refused.load(Ordering::Relaxed),
        }
    }

    /// The id of the connection that receives packets for `key` (the
    /// newest), if any; a new id means the client reconnected.
    pub fn active_conn(&self, key: &NodePublic) -> Option<u64> {
        self.lock().active.get(key).copied()
    }

    /// Connections of `key` that are still registered (frozen ones too).
    pub fn conns_of(&self, key: &NodePublic) -> usize {
        self.lock().conns.values().filter(|c| c.key == *key).count()
    }

    /// Queues `frame` to the active connection of `key`. False if absent or
    /// its queue is full.
    pub fn send_frame_to(&self, key: &NodePublic, frame: &Frame) -> bool {
        let st = self.lock();
        st.active
            .get(key)
            .and_then(|id| st.conns.get(id))
            .is_some_and(|c| c.tx.try_send(frame.encode()).is_ok())
    }

    /// Queues `frame` to every connection; returns how many took it.
    pub fn broadcast_frame(&self, frame: &Frame) -> usize {
        let bytes = frame.encode();
        self.lock()
            .conns
            .values()
            .filter(|c| c.tx.try_send(bytes.clone()).is_ok())
            .count()
    }

    /// Sends a Health frame (`""` clears) to `key`, or to everyone.
    pub fn send_health(&self, key: Option<&NodePublic>, problem: &str) -> usize {
        let frame = Frame::Health(problem.to_string());
        match key {
            Some(k) => usize::from(self.send_frame_to(k, &frame)),
            None => self.broadcast_frame(&frame),
        }
    }

    /// Announces a restart to every connection.
    pub fn send_restarting(&self, reconnect_in: Duration, try_for: Duration) -> usize {
        self.broadcast_frame(&Frame::Restarting {
            reconnect_in,
            try_for,
        })
    }

    /// Closes every connection of `key`. False if none.
    pub fn drop_client(&self, key: &NodePublic) -> bool {
        let st = self.lock();
        let mut any = false;
        for c in st.conns.values().filter(|c| c.key == *key) {
            c.close.notify_one();
            any = true;
        }
        any
    }

    /// Freezes every connection of `key`: each stays open and registered,
    /// but the relay stops reading from it and writing to it — a silently
    /// dead connection, as a client sees one after a laptop sleep or a NAT
    /// expiry (no FIN, no RST). A frozen connection ends only with
    /// [`drop_client`](Self::drop_client) or [`drop_all`](Self::drop_all).
    /// Returns how many were frozen.
    pub fn freeze_client(&self, key: &NodePublic) -> usize {
        let mut st = self.lock();
        let mut n = 0;
        for c in st.conns.values_mut().filter(|c| c.key == *key && !c.frozen) {
            c.frozen = true;
            c.freeze.notify_one();
            n += 1;
        }
        n
    }

    /// Drops every new connection for `d` from now (before the greeting),
    /// as a relay that is down or restarting would; live connections are
    /// untouched. `Duration::ZERO` accepts again at once.
    pub fn refuse_for(&self, d: Duration) {
        *lock(&self.inner.refuse_until) = Some(Instant::now() + d);
    }

    /// When each refused connection arrived, oldest first.
    pub fn refused_at(&self) -> Vec<Instant> {
        lock(&self.inner.refused_at).iter().copied().collect()
    }

    /// Closes every connection (a relay restart, as clients see it).
    /// Returns how many were told to close.
    pub fn drop_all(&self) -> usize {
        let st = self.lock();
        for c in st.conns.values() {
            c.close.notify_one();
        }
        st.conns.len()
    }
}

/// Removes a connection from the registry when dropped.
struct Registered<'a> {
    server: &'a DerpServer,
    id: u64,
    key: NodePublic,
}

impl Drop for Registered<'_> {
    fn drop(&mut self) {
        self.server.unregister(self.id, self.key);
    }
}

/// What the fault hooks use to reach one connection's task.
struct ConnSignals<'a> {
    close: &'a Notify,
    freeze: &'a Notify,
}

/// A poisoned lock only means another connection task panicked; the data
/// itself is still consistent enough to serve.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Token bucket for PeerGone(NotHere) replies: burst 3, then 1 per second.
struct PeerGoneBudget {
    tokens: f64,
    at: Instant,
}

impl PeerGoneBudget {
    const BURST: f64 = 3.0;

    fn new() -> Self {
        Self {
            tokens: Self::BURST,
            at: Instant::now(),
        }
    }

    fn take(&mut self) -> bool {
        let now = Instant::now();
        let refill = now.duration_since(self.at).as_secs_f64();
        self.at = now;
        self.tokens = (self.tokens + refill).min(Self::BURST);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}
