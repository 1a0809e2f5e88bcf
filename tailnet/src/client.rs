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
//! redials a dropped coordinate websocket (50 ms → 10 s backoff, reusing
//! the resume token) and a dropped DERP connection, and treats the agent
//! being reported LOST or DISCONNECTED as information only. Only the
//! WireGuard engine's own dead-path rule ends the tunnel.
//!
//! Networking is behind [`Dialer`], so the caller decides TLS, proxies and
//! headers, and tests can dial anything.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::net::Ipv6Addr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use prost::Message as _;
use tokio::io::{AsyncRead, AsyncWrite, DuplexStream, ReadHalf, WriteHalf};
use tokio::sync::{mpsc, watch};

use crate::addr;
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
    /// `Some(reason)` once the data path is gone.
    pub dead: watch::Receiver<Option<String>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Tunnel {
    fn drop(&mut self) {
        self.task.abort();
    }
}

type CoordTx = MessageSender<WriteHalf<yamux::Stream>>;
type CoordRx = MessageReceiver<ReadHalf<yamux::Stream>>;

/// Events into the controller loop.
enum Msg {
    Coordinate(CoordinateResponse),
    CoordinateDown(String),
    CoordinateUp(Box<CoordinateLink>),
    DerpMap(DerpMap),
    Derp(i64, Event),
    DerpDown(i64, String),
    DerpUp(i64, DerpSender, tokio::task::JoinHandle<()>),
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

async fn open_derp(
    dialer: &dyn Dialer,
    region: i64,
    map: &DerpMap,
    key: &NodePrivate,
) -> Result<DerpClient<BoxIo>> {
    let target = map
        .target(region)
        .ok_or_else(|| anyhow!("DERP region {region} is not in the map"))?;
    let io = dialer.derp(target).await?;
    let client = DerpClient::handshake(io, key, ClientOptions::default())
        .await
        .with_context(|| format!("DERP login to region {region}"))?;
    Ok(client)
}

/// Spawn a reader that turns a DERP connection's events into [`Msg`]s.
fn spawn_derp_reader(
    client: DerpClient<BoxIo>,
    region: i64,
    tx: mpsc::Sender<Msg>,
) -> (DerpSender, tokio::task::JoinHandle<()>) {
    let (sender, mut rx) = client.into_split();
    let h = tokio::spawn(async move {
        loop {
            match rx.recv().await {
                Ok(ev) => {
                    if tx.send(Msg::Derp(region, ev)).await.is_err() {
                        return;
                    }
                }
                Err(e) => {
                    let _ = tx.send(Msg::DerpDown(region, e.to_string())).await;
                    return;
                }
            }
        }
    });
    (sender, h)
}

/// Follow `StreamDERPMaps` on a coordinate session (best effort: old
/// servers may not offer it, and its failure never tears anything down).
fn spawn_derp_map_reader(session: &yamux::Session, dialer: Arc<dyn Dialer>, tx: mpsc::Sender<Msg>) {
    let session = session.clone();
    tokio::spawn(async move {
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

fn spawn_coordinate_reader(mut rx: CoordRx, tx: mpsc::Sender<Msg>) {
    tokio::spawn(async move {
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
    derp: HashMap<i64, (DerpSender, tokio::task::JoinHandle<()>)>,
    derp_pending: HashMap<i64, Instant>,
    /// Regions whose dial has concluded at least once (up or down).
    derp_tried: HashSet<i64>,
    agent: Option<AgentNode>,
    node_at: Option<Instant>,
    ready: bool,
    engine: Option<wg::Handle>,
    coord_backoff: Duration,
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
        tokio::spawn(async move {
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
        let is_home = region == self.home;
        let map = self.cfg.derp_map.clone();
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            match open_derp(dialer.as_ref(), region, &map, &key).await {
                Ok(client) => {
                    let (sender, h) = spawn_derp_reader(client, region, tx.clone());
                    if is_home {
                        let _ = sender.note_preferred(true).await;
                    }
                    let _ = tx.send(Msg::DerpUp(region, sender, h)).await;
                }
                Err(e) => {
                    let _ = tx.send(Msg::DerpDown(region, format!("{e:#}"))).await;
                }
            }
        });
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
    fn maybe_start_engine(
        &mut self,
        out_tx: &mpsc::Sender<Vec<u8>>,
        my_ip: Ipv6Addr,
    ) -> Option<EngineEnds> {
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
        let mut h = wg::spawn(cfg, out_tx.clone());
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

    fn agent_sender(&self) -> Option<(&DerpSender, NodePublic)> {
        let a = self.agent.as_ref()?;
        let s = self
            .derp
            .get(&a.region)
            .or_else(|| self.derp.get(&self.home))?;
        Some((&s.0, a.key))
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
    let mut link = link;
    if let Some(rx) = link.reader.take() {
        spawn_coordinate_reader(rx, msgs_tx.clone());
    }
    spawn_derp_map_reader(&link.session, dialer.clone(), msgs_tx.clone());
    let (sender, reader) = spawn_derp_reader(derp, home, msgs_tx.clone());
    sender.note_preferred(true).await.ok();
    let mut ctl = Controller {
        dialer,
        cfg,
        key,
        node,
        home,
        msgs_tx,
        coord: Some(link),
        resume_token,
        derp: HashMap::from([(home, (sender, reader))]),
        derp_pending: HashMap::new(),
        derp_tried: HashSet::from([home]),
        agent: None,
        node_at: None,
        ready: false,
        engine: None,
        coord_backoff: Duration::from_millis(50),
    };
    ctl.announce().await;

    let (out_tx, mut out_rx) = mpsc::channel::<Vec<u8>>(1024);
    let (dead_tx, dead_rx) = watch::channel(None::<String>);
    let (stream_tx, stream_rx) = tokio::sync::oneshot::channel::<Result<DuplexStream, String>>();
    let deadline = started + ctl.cfg.connect_timeout;

    let task = tokio::spawn(async move {
        let mut stream_tx = Some(stream_tx);
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        let mut engine_streams: Option<mpsc::Receiver<DuplexStream>> = None;
        let mut engine_dead: Option<watch::Receiver<Option<String>>> = None;
        loop {
            if let Some((st, dd)) = ctl.maybe_start_engine(&out_tx, my_ip) {
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
                let _ = dead_tx.send(Some(why.to_string()));
                return;
            }
            tokio::select! {
                Some(m) = msgs.recv() => match m {
                    Msg::Coordinate(r) => ctl.handle_peer_updates(r),
                    Msg::CoordinateDown(e) => {
                        log::info!("tailnet: coordinate connection down ({e}); redialing in {}ms", ctl.coord_backoff.as_millis());
                        if let Some(c) = ctl.coord.take() {
                            c.session.close().await;
                        }
                        let d = ctl.coord_backoff;
                        ctl.coord_backoff = (d * 2).min(Duration::from_secs(10));
                        ctl.redial_coordinate(d);
                    }
                    Msg::CoordinateUp(mut link) => {
                        log::info!("tailnet: coordinate connection restored");
                        ctl.coord_backoff = Duration::from_millis(50);
                        if let Some(t) = link.resume.as_ref().map(|r| r.token.clone()).filter(|t| !t.is_empty()) {
                            ctl.resume_token = Some(t);
                        }
                        if let Some(rx) = link.reader.take() {
                            spawn_coordinate_reader(rx, ctl.msgs_tx.clone());
                        }
                        spawn_derp_map_reader(&link.session, ctl.dialer.clone(), ctl.msgs_tx.clone());
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
                    Msg::Derp(_, Event::Packet { src, data }) => {
                        if disco_magic(&data) {
                            continue;
                        }
                        if ctl.agent.as_ref().is_some_and(|a| a.key == src) {
                            if let Some(e) = &ctl.engine {
                                let _ = e.inbound.try_send(data);
                            }
                        }
                    }
                    Msg::Derp(region, Event::Health { problem }) if !problem.is_empty() => {
                        log::info!("tailnet: DERP region {region} health: {problem}");
                    }
                    Msg::Derp(region, Event::Restarting { reconnect_in, .. }) => {
                        log::info!("tailnet: DERP region {region} is restarting; reconnecting in {}ms", reconnect_in.as_millis());
                    }
                    Msg::Derp(..) => {}
                    Msg::DerpDown(region, e) => {
                        log::info!("tailnet: DERP region {region} down ({e}); reconnecting");
                        ctl.derp_tried.insert(region);
                        ctl.derp.remove(&region);
                        let waited = ctl.derp_pending.remove(&region).map(|t| t.elapsed());
                        let delay = if waited.is_some() { Duration::from_secs(1) } else { Duration::from_millis(100) };
                        ctl.redial_derp(region, delay);
                    }
                    Msg::DerpUp(region, sender, h) => {
                        log::info!("tailnet: DERP region {region} connected");
                        ctl.derp_tried.insert(region);
                        ctl.derp_pending.remove(&region);
                        if let Some((_, old)) = ctl.derp.insert(region, (sender, h)) {
                            old.abort();
                        }
                    }
                },
                Some(pkt) = out_rx.recv() => {
                    if let Some((s, dst)) = ctl.agent_sender() {
                        if let Err(e) = s.send(&dst, &pkt).await {
                            log::debug!("tailnet: DERP send failed: {e}");
                        }
                    }
                }
                Some(stream) = async {
                    match engine_streams.as_mut() {
                        Some(e) => e.recv().await,
                        None => std::future::pending().await,
                    }
                } => {
                    log::info!("tailnet: stream to the agent open after {}ms", started.elapsed().as_millis());
                    if let Some(tx) = stream_tx.take() {
                        let _ = tx.send(Ok(stream));
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
                    if let Some(tx) = stream_tx.take() {
                        let _ = tx.send(Err(reason.clone()));
                    }
                    let _ = dead_tx.send(Some(reason));
                    if let Some(c) = ctl.coord.take() {
                        c.session.close().await;
                    }
                    return;
                }
                _ = tick.tick() => {}
            }
        }
    });

    match stream_rx.await {
        Ok(Ok(stream)) => Ok(Tunnel {
            stream,
            dead: dead_rx,
            task,
        }),
        Ok(Err(e)) => {
            task.abort();
            bail!("tailnet: {e}")
        }
        Err(_) => {
            task.abort();
            bail!("tailnet: the controller stopped")
        }
    }
}
