//! The client side of a DERP-only tailnet connection to one agent.
//!
//! [`connect`] does what Coder's CLI does to reach an agent, minus direct
//! UDP paths: it opens the coordinate websocket (yamux → dRPC), learns its
//! peer ID from `RefreshResumeToken` where the server offers it, logs in to
//! its home DERP region, sends `add_tunnel` + `update_self`, waits for the
//! agent's node and for `READY_FOR_HANDSHAKE` (or 5 s after the node, as
//! Coder does), then runs WireGuard + userspace TCP to the agent's SSH port
//! over DERP and returns the byte stream. When the agent homes on another
//! DERP region it opens a second connection there for sending (Tailscale:
//! send to the peer's home region, receive on your own) and starts the
//! handshake once that connection is up (or its first dial took 3 s).
//!
//! After that a controller task keeps the stream's supports alive: it
//! redials a dropped coordinate websocket (50 ms → 10 s backoff with
//! jitter, reusing the resume token) and a dead DERP connection (100 ms →
//! 8 s), and treats the agent being reported LOST or DISCONNECTED as
//! information only. Only the WireGuard engine's own dead-path rule, a
//! reset from the agent, or [`Control::close`] ends the tunnel.
//!
//! Control and data are separate. Datagrams never pass through the
//! controller: each DERP connection's reader hands the agent's datagrams
//! straight to the engine's inbound queue, and the engine's outbound goes
//! straight to the current relay connection's send queue ([`RelayOut`]).
//! The controller only decides which connection is current, by writing
//! two `watch` slots the data path reads per datagram without waiting
//! ([`DataPath`]); so a slow coordinate close, a full relay queue or a
//! redial never stalls the stream. While no relay is up, outbound
//! datagrams are dropped (WireGuard and TCP retransmit).
//!
//! Every relay dial (TCP, TLS, the HTTP or websocket upgrade, the DERP
//! login) is bounded as a whole by [`DERP_DIAL_BOUND`], and each live
//! connection probes itself when silent (see [`crate::derp::client`]), so
//! a relay that dies without a FIN is redialed well inside WireGuard's
//! 120 s dead-path bound.
//!
//! Every task the client starts is owned: the controller holds them in a
//! `JoinSet` (they end when it does), and the controller is stopped by
//! dropping [`Control`] or, gracefully, by [`Control::close`].
//!
//! Networking is behind [`Dialer`], so the caller decides TLS, proxies and
//! headers, and tests can dial anything.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::net::Ipv6Addr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use prost::Message as _;
use tokio::io::{AsyncRead, AsyncWrite, DuplexStream, ReadHalf, WriteHalf};
use tokio::sync::{mpsc, watch};
use tokio::task::{AbortHandle, JoinSet};
use tokio_util::sync::CancellationToken;

use crate::addr;
use crate::backoff::Backoff;
use crate::derp::{
    ClientOptions, DerpClient, DerpSender, DiscoPublic, Event, NodePrivate, NodePublic,
};
use crate::derpmap::{DerpMap, DerpTarget};
use crate::drpc::{self, MessageReceiver, MessageSender};
use crate::proto::{
    method, CoordinateRequest, CoordinateResponse, Node, PeerId, PeerUpdateKind,
    RefreshResumeTokenRequest, RefreshResumeTokenResponse, Timestamp,
};
use crate::wg;
use crate::yamux;

/// How long the WireGuard handshake waits for the first dial to the
/// agent's home DERP region when that is not ours (see
/// [`Controller::awaiting_agent_region`]).
const FIRST_AGENT_REGION_DIAL: Duration = Duration::from_secs(3);
/// Bound on one whole relay dial: TCP connect, TLS, the HTTP or websocket
/// upgrade, and the DERP login. A dial that hangs must not leave its
/// region pending forever.
pub const DERP_DIAL_BOUND: Duration = Duration::from_secs(15);
/// Frames a relay connection queues before the data path drops datagrams:
/// about a TCP window's worth of WireGuard datagrams (1.3 MB).
const DERP_SEND_QUEUE: usize = 1024;
/// A relay connection that lived at least this long starts its region's
/// redial backoff afresh; one that dies sooner keeps backing off.
const DERP_STABLE: Duration = Duration::from_secs(10);
/// [`Control::close`]: how long our FIN waits for the agent's ACK before
/// it becomes a RST, and how long the relay gets to write them out.
const CLOSE_FIN_BOUND: Duration = Duration::from_millis(500);
const CLOSE_FLUSH_BOUND: Duration = Duration::from_millis(150);
/// How long the goodbye waits for the coordinator to hang up on us: coderd
/// answers a Disconnect by ending the Coordinate stream, and only a
/// Disconnect it has read makes the agent drop our peer at once (a hang-up
/// it sees first is "lost", which agents keep for 15 minutes).
const CLOSE_COORD_BOUND: Duration = Duration::from_millis(300);

/// A byte stream the dialer hands back.
pub trait Io: AsyncRead + AsyncWrite + Unpin + Send + 'static {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> Io for T {}
/// A boxed [`Io`].
pub type BoxIo = Box<dyn Io>;
/// A boxed future, for an object-safe [`Dialer`].
pub type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

/// How the client reaches coderd and the DERP relays.
pub trait Dialer: Send + Sync + 'static {
    /// The coordinate websocket as a byte stream.
    fn coordinate(&self, resume_token: Option<String>) -> BoxFuture<Result<BoxIo>>;
    /// A stream already switched to DERP (HTTP upgrade or websocket) to
    /// one relay node.
    fn derp(&self, target: DerpTarget) -> BoxFuture<Result<BoxIo>>;
    /// Adjust a map from `StreamDERPMaps` before use (e.g. point the
    /// embedded relay at the URL we dial).
    fn fix_map(&self, map: &mut DerpMap);
}

/// What the client needs to know.
#[derive(Clone, Debug)]
pub struct Config {
    pub agent_id: PeerId,
    /// The DERP map, with the embedded relay already pointed at the URL we use.
    pub derp_map: DerpMap,
    /// Wait this long after the agent's node for READY_FOR_HANDSHAKE.
    pub ready_timeout: Duration,
    /// Give up establishing the stream after this long.
    pub connect_timeout: Duration,
    /// The WireGuard dead-path bound.
    pub dead_after: Duration,
}

impl Config {
    pub fn new(agent_id: PeerId, derp_map: DerpMap) -> Config {
        Config {
            agent_id,
            derp_map,
            ready_timeout: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(30),
            dead_after: Duration::from_secs(120),
        }
    }
}

/// A live tunnel: the stream to the agent's SSH server plus the tasks
/// keeping it alive.
pub struct Tunnel {
    pub stream: DuplexStream,
    /// `Some(reason)` once the data path is gone or the agent reset the
    /// connection — set before `stream` reads EOF, so a reader that sees
    /// EOF can tell a break from an end by looking here.
    pub dead: watch::Receiver<Option<String>>,
    pub control: Control,
}

/// Owns the tunnel's controller (and through it every task the tunnel
/// runs). Dropping it stops them all at once; [`close`](Self::close) first
/// closes the connection towards the agent.
pub struct Control {
    cancel: CancellationToken,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Control {
    /// Closes the TCP connection towards the agent (a FIN; a RST if the
    /// FIN is not acknowledged within 500 ms), writes that out to the relay,
    /// says goodbye to the coordinator (and waits for it to hang up), and
    /// stops every task. Takes at most about 1.2 s.
    pub async fn close(mut self) {
        self.cancel.cancel();
        if let Some(mut task) = self.task.take() {
            let limit = CLOSE_FIN_BOUND
                + CLOSE_FLUSH_BOUND
                + Duration::from_millis(100)
                + CLOSE_COORD_BOUND
                + Duration::from_millis(100);
            if tokio::time::timeout(limit, &mut task).await.is_err() {
                task.abort();
            }
        }
    }
}

impl Drop for Control {
    fn drop(&mut self) {
        if let Some(t) = &self.task {
            t.abort();
        }
    }
}

type CoordTx = MessageSender<WriteHalf<yamux::Stream>>;
type CoordRx = MessageReceiver<ReadHalf<yamux::Stream>>;

/// Events into the controller loop. Datagrams are not among them.
enum Msg {
    Coordinate(CoordinateResponse),
    CoordinateDown(String),
    CoordinateUp(Box<CoordinateLink>),
    DerpMap(DerpMap),
    /// A control event on a relay connection (Health, Restarting).
    DerpEvent(i64, Event),
    /// A dial to the region succeeded.
    DerpUp(i64, Box<DerpClient<BoxIo>>),
    /// A dial to the region failed or timed out.
    DerpDialFailed(i64, String),
    /// The live connection `id` to the region died.
    DerpDown(i64, u64, String),
}

/// Where the engine's datagrams to the agent go: a relay connection's
/// sender and the agent's key.
#[derive(Clone)]
struct Route {
    sender: DerpSender,
    dst: NodePublic,
}

/// Where the relay readers put the agent's datagrams: the engine's
/// inbound queue, and the only key whose datagrams it takes.
#[derive(Clone)]
struct Inbound {
    agent: NodePublic,
    tx: mpsc::Sender<Vec<u8>>,
}

/// The slots the data path reads and only the controller writes.
struct DataPath {
    route: watch::Sender<Option<Route>>,
    inbound: watch::Sender<Option<Inbound>>,
}

/// The engine's [`wg::Transmit`]: straight into the current relay
/// connection's send queue, never waiting; no relay or a full queue drops
/// the datagram.
struct RelayOut {
    route: watch::Receiver<Option<Route>>,
    dropped: AtomicU64,
}

impl wg::Transmit for RelayOut {
    fn transmit(&self, datagram: &[u8]) {
        let sent = match &*self.route.borrow() {
            Some(r) => r.sender.try_send(&r.dst, datagram).is_ok(),
            None => false,
        };
        if !sent {
            let n = self.dropped.fetch_add(1, Ordering::Relaxed);
            if n.is_power_of_two() {
                log::debug!(
                    "tailnet: {} datagram(s) to the agent dropped (no relay, or its queue full)",
                    n + 1
                );
            }
        }
    }
}

/// One live relay connection, as the controller tracks it.
struct RelayConn {
    id: u64,
    sender: DerpSender,
    since: Instant,
    reader: AbortHandle,
}

/// One coordinate connection: the yamux session and the Coordinate call.
struct CoordinateLink {
    session: yamux::Session,
    tx: CoordTx,
    reader: Option<CoordRx>,
    resume: Option<RefreshResumeTokenResponse>,
}

async fn open_coordinate(dialer: &dyn Dialer, token: Option<String>) -> Result<CoordinateLink> {
    let io = dialer.coordinate(token).await?;
    let session = yamux::Session::client(io, yamux::Config::default());
    // The resume token (and, on new servers, our peer ID). Old servers
    // answer "unimplemented"; that is fine.
    let resume = match tokio::time::timeout(
        Duration::from_secs(5),
        drpc::unary_on(
            &session,
            method::REFRESH_RESUME_TOKEN,
            &RefreshResumeTokenRequest {}.encode_to_vec(),
        ),
    )
    .await
    {
        Ok(Ok(bytes)) => RefreshResumeTokenResponse::decode(bytes.as_slice()).ok(),
        Ok(Err(e)) => {
            log::debug!("tailnet: RefreshResumeToken unavailable: {e}");
            None
        }
        Err(_) => None,
    };
    let stream = session.open().await.context("open the Coordinate stream")?;
    let (tx, rx) = drpc::bidi(stream, method::COORDINATE)
        .await
        .context("start Coordinate")?;
    Ok(CoordinateLink {
        session,
        tx,
        reader: Some(rx),
        resume,
    })
}

/// Dials and logs in to a region's relay, bounded as a whole by
/// [`DERP_DIAL_BOUND`].
async fn open_derp(
    dialer: &dyn Dialer,
    region: i64,
    map: &DerpMap,
    key: &NodePrivate,
) -> Result<DerpClient<BoxIo>> {
    let target = map
        .target(region)
        .ok_or_else(|| anyhow!("DERP region {region} is not in the map"))?;
    let dial = async {
        let io = dialer.derp(target).await?;
        let opts = ClientOptions {
            send_queue: DERP_SEND_QUEUE,
            ..ClientOptions::default()
        };
        DerpClient::handshake(io, key, opts)
            .await
            .with_context(|| format!("DERP login to region {region}"))
    };
    match tokio::time::timeout(DERP_DIAL_BOUND, dial).await {
        Ok(r) => r,
        Err(_) => bail!(
            "no DERP connection to region {region} within {}s",
            DERP_DIAL_BOUND.as_secs()
        ),
    }
}

/// Reads one relay connection: the agent's datagrams go straight to the
/// engine, control events to the controller (never waiting on it), and
/// the connection's death ends the task with a [`Msg::DerpDown`].
async fn read_relay(
    mut rx: crate::derp::DerpReceiver<BoxIo>,
    region: i64,
    id: u64,
    inbound: watch::Receiver<Option<Inbound>>,
    msgs: mpsc::Sender<Msg>,
) {
    loop {
        match rx.recv().await {
            Ok(Event::Packet { src, data }) => {
                if disco_magic(&data) {
                    continue;
                }
                if let Some(i) = &*inbound.borrow() {
                    // Like magicsock: only the peer we programmed. A full
                    // engine queue drops the datagram.
                    if i.agent == src {
                        let _ = i.tx.try_send(data);
                    }
                }
            }
            Ok(ev @ (Event::Health { .. } | Event::Restarting { .. })) => {
                let _ = msgs.try_send(Msg::DerpEvent(region, ev));
            }
            Ok(_) => {}
            Err(e) => {
                let _ = msgs.send(Msg::DerpDown(region, id, e.to_string())).await;
                return;
            }
        }
    }
}

/// Follow `StreamDERPMaps` on a coordinate session (best effort: old
/// servers may not offer it, and its failure never tears anything down).
fn spawn_derp_map_reader(
    tasks: &mut JoinSet<()>,
    session: &yamux::Session,
    dialer: Arc<dyn Dialer>,
    tx: mpsc::Sender<Msg>,
) {
    let session = session.clone();
    tasks.spawn(async move {
        let stream = match session.open().await {
            Ok(s) => s,
            Err(e) => {
                log::debug!("tailnet: StreamDERPMaps: {e}");
                return;
            }
        };
        let req = crate::proto::StreamDerpMapsRequest {}.encode_to_vec();
        let mut rx = match drpc::server_stream(stream, method::STREAM_DERP_MAPS, &req).await {
            Ok(rx) => rx,
            Err(e) => {
                log::debug!("tailnet: StreamDERPMaps unavailable: {e}");
                return;
            }
        };
        while let Ok(Some(bytes)) = rx.recv().await {
            match crate::proto::DerpMap::decode(bytes.as_slice()) {
                Ok(p) => {
                    let mut map = DerpMap::from(&p);
                    dialer.fix_map(&mut map);
                    if tx.send(Msg::DerpMap(map)).await.is_err() {
                        return;
                    }
                }
                Err(e) => log::debug!("tailnet: bad DERP map from StreamDERPMaps: {e}"),
            }
        }
    });
}

fn spawn_coordinate_reader(tasks: &mut JoinSet<()>, mut rx: CoordRx, tx: mpsc::Sender<Msg>) {
    tasks.spawn(async move {
        loop {
            match rx.recv().await {
                Ok(Some(bytes)) => match CoordinateResponse::decode(bytes.as_slice()) {
                    Ok(r) => {
                        if tx.send(Msg::Coordinate(r)).await.is_err() {
                            return;
                        }
                    }
                    Err(e) => {
                        let _ = tx
                            .send(Msg::CoordinateDown(format!("bad CoordinateResponse: {e}")))
                            .await;
                        return;
                    }
                },
                Ok(None) => {
                    let _ = tx
                        .send(Msg::CoordinateDown(
                            "the coordinator ended the stream".into(),
                        ))
                        .await;
                    return;
                }
                Err(e) => {
                    let _ = tx.send(Msg::CoordinateDown(e.to_string())).await;
                    return;
                }
            }
        }
    });
}

/// The agent as the coordinator describes it.
#[derive(Clone, Debug)]
struct AgentNode {
    key: NodePublic,
    region: i64,
}

/// The parts of a WireGuard engine the controller loop waits on.
type EngineEnds = (
    mpsc::Receiver<DuplexStream>,
    watch::Receiver<Option<String>>,
);

struct Controller {
    dialer: Arc<dyn Dialer>,
    cfg: Config,
    key: NodePrivate,
    node: Node,
    home: i64,
    msgs_tx: mpsc::Sender<Msg>,
    coord: Option<CoordinateLink>,
    resume_token: Option<String>,
    derp: HashMap<i64, RelayConn>,
    /// Regions with a dial under way, since when (bounded by
    /// [`DERP_DIAL_BOUND`] plus the backoff delay before it).
    derp_pending: HashMap<i64, Instant>,
    derp_backoff: HashMap<i64, Backoff>,
    /// Regions whose dial has concluded at least once (up or down).
    derp_tried: HashSet<i64>,
    next_relay_id: u64,
    agent: Option<AgentNode>,
    node_at: Option<Instant>,
    ready: bool,
    engine: Option<wg::Handle>,
    coord_backoff: Backoff,
    path: DataPath,
    /// Every task the controller starts; they end with it.
    tasks: JoinSet<()>,
}

impl Controller {
    async fn send_coordinate(&mut self, req: CoordinateRequest) {
        if let Some(c) = &mut self.coord {
            if let Err(e) = c.tx.send(&req.encode_to_vec()).await {
                log::debug!("tailnet: coordinate send failed: {e}");
            }
        }
    }

    /// After (re)connecting: resync the tunnel and our node.
    async fn announce(&mut self) {
        self.send_coordinate(CoordinateRequest::add_tunnel(self.cfg.agent_id))
            .await;
        let mut node = self.node.clone();
        node.as_of = Some(Timestamp::now());
        self.send_coordinate(CoordinateRequest::update_self(node))
            .await;
    }

    fn redial_coordinate(&mut self, delay: Duration) {
        let dialer = self.dialer.clone();
        let tx = self.msgs_tx.clone();
        let token = self.resume_token.clone();
        self.tasks.spawn(async move {
            tokio::time::sleep(delay).await;
            match open_coordinate(dialer.as_ref(), token).await {
                Ok(link) => {
                    let _ = tx.send(Msg::CoordinateUp(Box::new(link))).await;
                }
                Err(e) => {
                    let _ = tx.send(Msg::CoordinateDown(format!("{e:#}"))).await;
                }
            }
        });
    }

    fn redial_derp(&mut self, region: i64, delay: Duration) {
        if self.derp_pending.contains_key(&region) {
            return;
        }
        self.derp_pending.insert(region, Instant::now());
        let dialer = self.dialer.clone();
        let tx = self.msgs_tx.clone();
        let key = self.key.clone();
        let map = self.cfg.derp_map.clone();
        self.tasks.spawn(async move {
            tokio::time::sleep(delay).await;
            let msg = match open_derp(dialer.as_ref(), region, &map, &key).await {
                Ok(client) => Msg::DerpUp(region, Box::new(client)),
                Err(e) => Msg::DerpDialFailed(region, format!("{e:#}")),
            };
            let _ = tx.send(msg).await;
        });
    }

    /// The next redial delay for `region`.
    fn derp_delay(&mut self, region: i64) -> Duration {
        self.derp_backoff
            .entry(region)
            .or_insert_with(|| Backoff::new(Duration::from_millis(100), Duration::from_secs(8)))
            .next_delay()
    }

    /// Makes `client` the region's live connection: starts its reader and
    /// points the data path at it.
    async fn start_relay(&mut self, region: i64, client: DerpClient<BoxIo>) {
        let id = self.next_relay_id;
        self.next_relay_id += 1;
        let (sender, rx) = client.into_split();
        if region == self.home {
            // Just logged in: the queue is empty, this does not wait.
            let _ = sender.note_preferred(true).await;
        }
        let reader = self.tasks.spawn(read_relay(
            rx,
            region,
            id,
            self.path.inbound.subscribe(),
            self.msgs_tx.clone(),
        ));
        let conn = RelayConn {
            id,
            sender,
            since: Instant::now(),
            reader,
        };
        if let Some(old) = self.derp.insert(region, conn) {
            old.reader.abort();
        }
        self.update_route();
    }

    /// Points the engine's outbound at the agent's region's connection,
    /// else ours, else nowhere (datagrams are dropped meanwhile).
    fn update_route(&self) {
        let route = self.agent.as_ref().and_then(|a| {
            let c = self
                .derp
                .get(&a.region)
                .or_else(|| self.derp.get(&self.home))?;
            Some(Route {
                sender: c.sender.clone(),
                dst: a.key,
            })
        });
        self.path.route.send_replace(route);
    }

    /// Graceful end ([`Control::close`]): FIN (or RST) to the agent, out
    /// through the relay, a goodbye to the coordinator and, briefly, its
    /// hang-up (read from `msgs`, where the Coordinate reader reports it).
    async fn shut_down(&mut self, msgs: &mut mpsc::Receiver<Msg>) {
        if let Some(e) = self.engine.as_mut() {
            e.close(CLOSE_FIN_BOUND).await;
        }
        let route = self.path.route.borrow().clone();
        if let Some(r) = route {
            let _ = tokio::time::timeout(CLOSE_FLUSH_BOUND, r.sender.flush()).await;
        }
        if let Some(c) = self.coord.as_mut() {
            let bye = CoordinateRequest::disconnect().encode_to_vec();
            let sent = tokio::time::timeout(Duration::from_millis(100), c.tx.send(&bye)).await;
            if matches!(sent, Ok(Ok(()))) {
                let hung_up = async {
                    while let Some(m) = msgs.recv().await {
                        if matches!(m, Msg::CoordinateDown(_)) {
                            return;
                        }
                    }
                };
                if tokio::time::timeout(CLOSE_COORD_BOUND, hung_up)
                    .await
                    .is_err()
                {
                    log::debug!("tailnet: the coordinator did not hang up after our disconnect");
                }
            }
        }
    }

    fn handle_peer_updates(&mut self, resp: CoordinateResponse) {
        if !resp.error.is_empty() {
            log::warn!("tailnet: coordinator error: {}", resp.error);
        }
        for u in resp.peer_updates {
            let Ok(id) = u.peer_id() else { continue };
            if id != self.cfg.agent_id {
                continue;
            }
            match u.kind() {
                PeerUpdateKind::Node => {
                    let Some(node) = u.node else { continue };
                    if node.preferred_derp == 0 {
                        log::debug!("tailnet: agent node has no preferred DERP yet");
                        continue;
                    }
                    let key = match node.node_key() {
                        Ok(k) => k,
                        Err(e) => {
                            log::warn!("tailnet: agent node has a bad key: {e}");
                            continue;
                        }
                    };
                    let region = i64::from(node.preferred_derp);
                    match &self.agent {
                        Some(a) if a.key != key && self.engine.is_some() => {
                            log::warn!("tailnet: the agent's key changed; keeping the live tunnel on the old key");
                        }
                        _ => {
                            log::debug!("tailnet: agent node received (home region {region})");
                            self.agent = Some(AgentNode { key, region });
                            self.node_at.get_or_insert_with(Instant::now);
                            self.update_route();
                        }
                    }
                    if region != self.home && !self.derp.contains_key(&region) {
                        self.redial_derp(region, Duration::ZERO);
                    }
                }
                PeerUpdateKind::ReadyForHandshake => {
                    log::debug!("tailnet: agent is ready for the handshake");
                    self.ready = true;
                }
                PeerUpdateKind::Lost => {
                    log::info!(
                        "tailnet: coordinator reports the agent lost ({}); keeping the tunnel",
                        u.reason
                    );
                }
                PeerUpdateKind::Disconnected => {
                    log::info!(
                        "tailnet: coordinator reports the agent disconnected ({}); keeping the tunnel while WireGuard carries packets",
                        u.reason
                    );
                }
                PeerUpdateKind::Unspecified => {}
            }
        }
    }

    /// Start WireGuard once the agent is known and ready (or 5 s passed).
    /// Returns the new engine's stream and death receivers when it starts.
    fn maybe_start_engine(&mut self, my_ip: Ipv6Addr) -> Option<EngineEnds> {
        if self.engine.is_some() || self.awaiting_agent_region() {
            return None;
        }
        let agent = self.agent.as_ref()?;
        let waited = self.node_at.map(|t| t.elapsed()).unwrap_or_default();
        if !self.ready && waited < self.cfg.ready_timeout {
            return None;
        }
        if !self.ready {
            log::info!(
                "tailnet: no READY_FOR_HANDSHAKE after {}s; handshaking anyway",
                waited.as_secs()
            );
        }
        let mut cfg = wg::Config::new(
            self.key.to_raw(),
            *agent.key.as_bytes(),
            my_ip,
            addr::agent_addr(&self.cfg.agent_id),
            wg::Role::Connect {
                port: addr::AGENT_SSH_PORT,
            },
        );
        cfg.dead_after = self.cfg.dead_after;
        let out = RelayOut {
            route: self.path.route.subscribe(),
            dropped: AtomicU64::new(0),
        };
        let agent_key = agent.key;
        let mut h = wg::spawn(cfg, out);
        self.path.inbound.send_replace(Some(Inbound {
            agent: agent_key,
            tx: h.inbound.clone(),
        }));
        let streams = std::mem::replace(&mut h.streams, mpsc::channel(1).1);
        let dead = h.dead.clone();
        self.engine = Some(h);
        Some((streams, dead))
    }

    /// True while the first dial to the agent's home region (not ours) is
    /// under way, for at most [`FIRST_AGENT_REGION_DIAL`]. The agent
    /// receives on its home region; until it has sent us something it has
    /// no connection to ours, so a handshake initiation sent through ours
    /// (the fallback in [`Self::agent_sender`]) is dropped by the relay and
    /// WireGuard only retries after its 5 s RekeyTimeout.
    fn awaiting_agent_region(&self) -> bool {
        let Some(a) = self.agent.as_ref() else {
            return false;
        };
        !self.derp.contains_key(&a.region)
            && !self.derp_tried.contains(&a.region)
            && self
                .derp_pending
                .get(&a.region)
                .is_some_and(|t| t.elapsed() < FIRST_AGENT_REGION_DIAL)
    }
}

fn disco_magic(p: &[u8]) -> bool {
    p.starts_with(&[0x54, 0x53, 0xf0, 0x9f, 0x92, 0xac])
}

/// Connect to the agent's SSH server over tailnet.
pub async fn connect(dialer: Arc<dyn Dialer>, cfg: Config) -> Result<Tunnel> {
    let started = Instant::now();
    let home = cfg
        .derp_map
        .home_region()
        .ok_or_else(|| anyhow!("the deployment's DERP map has no usable region"))?;
    let key = NodePrivate::generate();

    // Coordinate first: it tells us our peer ID and thus our address.
    let link = open_coordinate(dialer.as_ref(), None)
        .await
        .context("coordinate")?;
    log::debug!(
        "tailnet: coordinate up in {}ms",
        started.elapsed().as_millis()
    );
    let peer_id = link
        .resume
        .as_ref()
        .and_then(|r| r.peer_id())
        .and_then(Result::ok);
    let my_ip = addr::client_addr(peer_id.as_ref());
    let node_id = peer_id
        .as_ref()
        .map(addr::node_id)
        .unwrap_or_else(addr::random_node_id);
    let resume_token = link
        .resume
        .as_ref()
        .map(|r| r.token.clone())
        .filter(|t| !t.is_empty());

    let derp = open_derp(dialer.as_ref(), home, &cfg.derp_map, &key).await?;
    log::debug!(
        "tailnet: DERP region {home} up in {}ms",
        started.elapsed().as_millis()
    );

    let mut node = Node {
        id: node_id,
        preferred_derp: home as i32,
        addresses: vec![format!("{my_ip}/128")],
        allowed_ips: vec![format!("{my_ip}/128")],
        ..Default::default()
    };
    node.set_node_key(&key.public());
    node.set_disco_key(&DiscoPublic::random());

    let (msgs_tx, mut msgs) = mpsc::channel::<Msg>(1024);
    let mut tasks = JoinSet::new();
    let mut link = link;
    if let Some(rx) = link.reader.take() {
        spawn_coordinate_reader(&mut tasks, rx, msgs_tx.clone());
    }
    spawn_derp_map_reader(&mut tasks, &link.session, dialer.clone(), msgs_tx.clone());
    let mut ctl = Controller {
        dialer,
        cfg,
        key,
        node,
        home,
        msgs_tx,
        coord: Some(link),
        resume_token,
        derp: HashMap::new(),
        derp_pending: HashMap::new(),
        derp_backoff: HashMap::new(),
        derp_tried: HashSet::from([home]),
        next_relay_id: 1,
        agent: None,
        node_at: None,
        ready: false,
        engine: None,
        coord_backoff: Backoff::new(Duration::from_millis(50), Duration::from_secs(10)),
        path: DataPath {
            route: watch::channel(None).0,
            inbound: watch::channel(None).0,
        },
        tasks,
    };
    ctl.start_relay(home, derp).await;
    ctl.announce().await;

    type Opened = Result<(DuplexStream, watch::Receiver<Option<String>>), String>;
    let (stream_tx, stream_rx) = tokio::sync::oneshot::channel::<Opened>();
    let deadline = started + ctl.cfg.connect_timeout;
    let cancel = CancellationToken::new();
    let cancelled = cancel.clone();

    let task = tokio::spawn(async move {
        let mut stream_tx = Some(stream_tx);
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        let mut engine_streams: Option<mpsc::Receiver<DuplexStream>> = None;
        let mut engine_dead: Option<watch::Receiver<Option<String>>> = None;
        loop {
            if let Some((st, dd)) = ctl.maybe_start_engine(my_ip) {
                engine_streams = Some(st);
                engine_dead = Some(dd);
            }
            if stream_tx.is_some() && Instant::now() > deadline {
                let why = match (&ctl.agent, ctl.engine.is_some()) {
                    (None, _) => {
                        "the coordinator never sent the agent's node (is the agent connected?)"
                    }
                    (Some(_), false) => "the agent never became ready for a WireGuard handshake",
                    (Some(_), true) => {
                        "no WireGuard handshake or TCP connection completed over DERP"
                    }
                };
                if let Some(tx) = stream_tx.take() {
                    let _ = tx.send(Err(why.to_string()));
                }
                return;
            }
            tokio::select! {
                _ = cancelled.cancelled() => {
                    ctl.shut_down(&mut msgs).await;
                    return;
                }
                Some(m) = msgs.recv() => match m {
                    Msg::Coordinate(r) => ctl.handle_peer_updates(r),
                    Msg::CoordinateDown(e) => {
                        let d = ctl.coord_backoff.next_delay();
                        log::info!("tailnet: coordinate connection down ({e}); redialing in {}ms", d.as_millis());
                        if let Some(c) = ctl.coord.take() {
                            // Not awaited here: a slow close must not hold
                            // up the controller (the data path does not
                            // wait on it either way).
                            ctl.tasks.spawn(async move { c.session.close().await });
                        }
                        ctl.redial_coordinate(d);
                    }
                    Msg::CoordinateUp(mut link) => {
                        log::info!("tailnet: coordinate connection restored");
                        ctl.coord_backoff.reset();
                        if let Some(t) = link.resume.as_ref().map(|r| r.token.clone()).filter(|t| !t.is_empty()) {
                            ctl.resume_token = Some(t);
                        }
                        if let Some(rx) = link.reader.take() {
                            spawn_coordinate_reader(&mut ctl.tasks, rx, ctl.msgs_tx.clone());
                        }
                        spawn_derp_map_reader(&mut ctl.tasks, &link.session, ctl.dialer.clone(), ctl.msgs_tx.clone());
                        ctl.coord = Some(*link);
                        ctl.announce().await;
                    }
                    Msg::DerpMap(map) => {
                        if map != ctl.cfg.derp_map {
                            log::debug!("tailnet: DERP map update: {} region(s)", map.regions.len());
                            if map.target(ctl.home).is_some() {
                                ctl.cfg.derp_map = map;
                            } else {
                                log::info!("tailnet: the new DERP map lacks our home region {}; keeping the old map", ctl.home);
                            }
                        }
                    }
                    Msg::DerpEvent(region, Event::Health { problem }) if !problem.is_empty() => {
                        log::info!("tailnet: DERP region {region} health: {problem}");
                    }
                    Msg::DerpEvent(region, Event::Restarting { reconnect_in, .. }) => {
                        log::info!("tailnet: DERP region {region} is restarting; reconnecting in {}ms", reconnect_in.as_millis());
                    }
                    Msg::DerpEvent(..) => {}
                    Msg::DerpDown(region, id, e) => {
                        let Some(conn) = ctl.derp.get(&region).filter(|c| c.id == id) else {
                            // A connection already replaced.
                            continue;
                        };
                        let stable = conn.since.elapsed() >= DERP_STABLE;
                        ctl.derp.remove(&region);
                        ctl.update_route();
                        if stable {
                            if let Some(b) = ctl.derp_backoff.get_mut(&region) {
                                b.reset();
                            }
                        }
                        let d = ctl.derp_delay(region);
                        log::info!("tailnet: DERP region {region} down ({e}); reconnecting in {}ms", d.as_millis());
                        ctl.redial_derp(region, d);
                    }
                    Msg::DerpDialFailed(region, e) => {
                        ctl.derp_tried.insert(region);
                        ctl.derp_pending.remove(&region);
                        let d = ctl.derp_delay(region);
                        log::info!("tailnet: DERP region {region}: redial failed ({e}); retrying in {}ms", d.as_millis());
                        ctl.redial_derp(region, d);
                    }
                    Msg::DerpUp(region, client) => {
                        log::info!("tailnet: DERP region {region} connected");
                        ctl.derp_tried.insert(region);
                        ctl.derp_pending.remove(&region);
                        ctl.start_relay(region, *client).await;
                    }
                },
                Some(stream) = async {
                    match engine_streams.as_mut() {
                        Some(e) => e.recv().await,
                        None => std::future::pending().await,
                    }
                } => {
                    log::info!("tailnet: stream to the agent open after {}ms", started.elapsed().as_millis());
                    if let (Some(tx), Some(dead)) = (stream_tx.take(), engine_dead.clone()) {
                        let _ = tx.send(Ok((stream, dead)));
                    }
                }
                reason = async {
                    match engine_dead.as_mut() {
                        // An engine that ended without a reason (its stream
                        // closed normally) is not a dead data path.
                        Some(d) => {
                            let reason = d
                                .wait_for(|d| d.is_some())
                                .await
                                .ok()
                                .and_then(|r| r.clone());
                            match reason {
                                Some(r) => r,
                                None => std::future::pending().await,
                            }
                        }
                        None => std::future::pending().await,
                    }
                } => {
                    // The tunnel's owner reads the same reason from the
                    // engine itself; nothing is left to keep alive.
                    if let Some(tx) = stream_tx.take() {
                        let _ = tx.send(Err(reason));
                    }
                    if let Some(c) = ctl.coord.take() {
                        let _ = tokio::time::timeout(Duration::from_millis(500), c.session.close()).await;
                    }
                    return;
                }
                Some(_) = ctl.tasks.join_next() => {}
                _ = tick.tick() => {}
            }
        }
    });
    let control = Control {
        cancel,
        task: Some(task),
    };

    match stream_rx.await {
        Ok(Ok((stream, dead))) => Ok(Tunnel {
            stream,
            dead,
            control,
        }),
        Ok(Err(e)) => bail!("tailnet: {e}"),
        Err(_) => bail!("tailnet: the controller stopped"),
    }
}
