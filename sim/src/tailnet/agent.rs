//! A fake workspace agent on the tailnet, built from coder-tailnet's own
//! pieces: it registers with the coordinator in-process, homes on the
//! deployment's agent region (the embedded relay, or the second region
//! when the sim has one) over an in-memory pipe, and for every client node
//! it learns runs a WireGuard responder with a userspace TCP listener on
//! the SSH port (1). Each TCP stream accepted there is bridged to the
//! agent's SSH endpoint (the same one `--tunnel tcp://` reaches), so the
//! endpoint's stop/kill/reset rules apply to tailnet streams too.
//!
//! DERP follows Tailscale's rule: the agent receives on its home region
//! and sends to each client on the client's home region (its node's
//! `preferred_derp`), opening that extra connection when it first has
//! something to send there and holding the datagram (up to
//! [`SEND_WAIT`]) while it connects, as magicsock's per-region write queue
//! does. Packets are accepted on any of its connections.
//!
//! Like Coder's agent it answers every `NODE` with `ready_for_handshake`
//! (after the deployment's configured delay, or never when withheld), drops
//! packets from keys it has no node for, and ignores disco packets.

use std::collections::{BTreeMap, HashMap};
use std::net::Ipv6Addr;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use coder_tailnet::addr::{self, AGENT_SSH_PORT};
use coder_tailnet::derp::{ClientOptions, DerpClient, DerpSender, DiscoPublic, Event};
use coder_tailnet::derp::{NodePrivate, NodePublic};
use coder_tailnet::proto::{
    CoordinateRequest, Node, PeerId, PeerUpdate, PeerUpdateKind, Timestamp,
};
use coder_tailnet::wg;
use tokio::io::DuplexStream;
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch};
use tokio::task::AbortHandle;

use super::coordinator::Role;
use super::{peer_id, AgentInfo, Tailnet};
use crate::state::lock;

/// Disco datagrams start with `TS💬`.
const DISCO_MAGIC: &[u8] = &[0x54, 0x53, 0xf0, 0x9f, 0x92, 0xac];
/// How long a datagram waits for its region's DERP connection to come up.
pub(crate) const SEND_WAIT: Duration = Duration::from_secs(2);
/// Silence from a client after which its engine (and its streams) go.
/// Coder's agent has no dead-path rule of its own: its streams end by TCP,
/// and a client that was paused for minutes (a closed laptop lid) comes
/// back to a live session. This only reaps engines of clients that
/// vanished without a word; Coder's `lostTimeout` is the same 15 minutes.
const CLIENT_SILENCE: Duration = Duration::from_secs(15 * 60);
/// A real Coder agent's userspace TCP stack (gVisor, as Coder's tailscale
/// fork configures it) gives up on a connection after five unanswered
/// retransmissions: 0.2 + 0.4 + 0.8 + 1.6 + 3.2 s and a last 6.4 s wait at
/// the minimum retransmission timeout, about 12.6 s after the first
/// unacknowledged segment (the real-Coder suite saw an SSH session end with
/// "operation timed out" 13 s into a relay outage). The fake agent does the
/// same, so a client that is slow to heal its data path fails here too.
const AGENT_TCP_GIVE_UP: Duration = Duration::from_millis(12_600);

/// One running fake agent. [`AgentPeer::stop`] ends it.
pub(crate) struct AgentPeer {
    pub info: AgentInfo,
    inner: Arc<Inner>,
    tasks: Vec<AbortHandle>,
}

struct Inner {
    id: PeerId,
    private: NodePrivate,
    node: Node,
    ssh: std::net::SocketAddr,
    /// The agent's coordinator connection number.
    conn: AtomicU64,
    stopped: AtomicBool,
    /// The region the agent homes on (its node's `preferred_derp`).
    home: i64,
    /// DERP connections by region: the home region's from the start, a
    /// client home region's from the first datagram sent there.
    derp: Mutex<HashMap<i64, RegionLink>>,
    /// WireGuard datagrams received from known clients, by region.
    rx_by_region: Mutex<BTreeMap<i64, u64>>,
    /// WireGuard engines by client node key.
    engines: Mutex<HashMap<NodePublic, Engine>>,
    /// Live bridged streams, for teardown.
    streams: Mutex<HashMap<u64, AbortHandle>>,
    next_stream: AtomicU64,
    live: Arc<AtomicUsize>,
}

/// The agent's connection to one DERP region, kept up by its task.
struct RegionLink {
    /// The live connection's sender, `None` while (re)connecting.
    sender: watch::Sender<Option<DerpSender>>,
    task: AbortHandle,
}

/// A WireGuard + TCP engine for one client key.
struct Engine {
    client: PeerId,
    client_ip: Ipv6Addr,
    /// The client's home DERP region, where its datagrams are sent.
    region: Arc<AtomicI64>,
    handle: wg::Handle,
    /// Streams live through this engine.
    live: Arc<AtomicUsize>,
    tasks: [AbortHandle; 2],
}

impl Drop for Engine {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
        // `wg::Handle` stops its engine when dropped.
    }
}

impl Engine {
    fn is_dead(&self) -> bool {
        self.handle.dead.borrow().is_some()
    }
}

/// Counts a stream as live for as long as it exists.
struct LiveGuard(Vec<Arc<AtomicUsize>>);

impl LiveGuard {
    fn new(counters: Vec<Arc<AtomicUsize>>) -> Self {
        for c in &counters {
            c.fetch_add(1, Ordering::SeqCst);
        }
        LiveGuard(counters)
    }
}

impl Drop for LiveGuard {
    fn drop(&mut self) {
        for c in &self.0 {
            c.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

/// Aborts a task when dropped (ties a helper task to its owner's life).
struct AbortOnDrop(AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl AgentPeer {
    /// Starts the agent's coordinator and DERP tasks on the sim's runtime.
    pub fn start(tn: Arc<Tailnet>, info: AgentInfo) -> AgentPeer {
        let id = peer_id(info.id);
        let private = NodePrivate::generate();
        let prefixes = addr::agent_prefixes(&id).to_vec();
        let home = tn.agent_region();
        let node = Node {
            id: addr::node_id(&id),
            as_of: Some(Timestamp::now()),
            key: private.public().to_wire(),
            disco: DiscoPublic::random().to_text(),
            preferred_derp: i32::try_from(home).unwrap_or(i32::MAX),
            addresses: prefixes.clone(),
            allowed_ips: prefixes,
            hostname: info.name.clone(),
            ..Node::default()
        };
        let inner = Arc::new(Inner {
            id,
            private,
            node,
            ssh: info.ssh,
            conn: AtomicU64::new(0),
            stopped: AtomicBool::new(false),
            home,
            derp: Mutex::new(HashMap::new()),
            rx_by_region: Mutex::new(BTreeMap::new()),
            engines: Mutex::new(HashMap::new()),
            streams: Mutex::new(HashMap::new()),
            next_stream: AtomicU64::new(1),
            live: Arc::new(AtomicUsize::new(0)),
        });
        log::info!(
            "coder-sim: tailnet agent {} ({}) up, key {:?}, DERP home region {home}",
            info.name,
            id,
            inner.private.public()
        );
        // Home first: clients reach the agent there.
        if region_link(&inner, &tn, home).is_none() {
            log::warn!("coder-sim: agent {id}: no relay for its home region {home}");
        }
        let coord = tn
            .rt
            .spawn(run_coordination(inner.clone(), tn.clone()))
            .abort_handle();
        AgentPeer {
            info,
            inner,
            tasks: vec![coord],
        }
    }

    /// Disconnects gracefully (clients get `DISCONNECTED`), then closes the
    /// DERP connection, the engines and every bridged stream.
    pub fn stop(self, tn: &Tailnet) {
        let inner = &self.inner;
        inner.stopped.store(true, Ordering::SeqCst);
        for t in &self.tasks {
            t.abort();
        }
        tn.coord
            .leave(inner.id, inner.conn.load(Ordering::SeqCst), true);
        let links: Vec<RegionLink> = lock(&inner.derp).drain().map(|(_, l)| l).collect();
        for l in links {
            l.task.abort();
            l.sender.send_replace(None);
        }
        lock(&inner.engines).clear();
        for (_, t) in lock(&inner.streams).drain() {
            t.abort();
        }
        log::info!(
            "coder-sim: tailnet agent {} ({}) down",
            self.info.name,
            inner.id
        );
    }

    pub fn key(&self) -> NodePublic {
        self.inner.private.public()
    }

    /// Streams currently bridged to the SSH endpoint.
    pub fn live_streams(&self) -> usize {
        self.inner.live.load(Ordering::SeqCst)
    }

    /// Resets (RST) every TCP connection inside the agent's tunnels, as an
    /// agent whose TCP stack aborts them would. Returns how many engines
    /// were told to.
    pub fn reset_streams(&self) -> usize {
        let engines = lock(&self.inner.engines);
        for e in engines.values() {
            e.handle.reset_connections();
        }
        engines.len()
    }

    /// Client keys with an engine.
    pub fn engine_keys(&self) -> Vec<NodePublic> {
        lock(&self.inner.engines).keys().copied().collect()
    }

    /// Regions with a live DERP connection, ascending.
    pub fn derp_regions(&self) -> Vec<i64> {
        let mut out: Vec<i64> = lock(&self.inner.derp)
            .iter()
            .filter(|(_, l)| l.sender.borrow().is_some())
            .map(|(r, _)| *r)
            .collect();
        out.sort_unstable();
        out
    }

    /// WireGuard datagrams received from clients, by arrival region.
    pub fn packets_by_region(&self) -> BTreeMap<i64, u64> {
        lock(&self.inner.rx_by_region).clone()
    }
}

/// The connection to `region` (started if there is none yet); `None` once
/// the agent stopped or when the deployment has no such region.
fn region_link(
    inner: &Arc<Inner>,
    tn: &Arc<Tailnet>,
    region: i64,
) -> Option<watch::Receiver<Option<DerpSender>>> {
    let mut links = lock(&inner.derp);
    // Checked under the lock `stop` drains: no link outlives the agent.
    if inner.stopped.load(Ordering::SeqCst) {
        return None;
    }
    if let Some(l) = links.get(&region) {
        return Some(l.sender.subscribe());
    }
    tn.relay(region)?;
    let (tx, rx) = watch::channel(None);
    let task = tn
        .rt
        .spawn(run_derp(inner.clone(), tn.clone(), region, tx.clone()))
        .abort_handle();
    links.insert(region, RegionLink { sender: tx, task });
    Some(rx)
}

/// Keeps the agent registered with the coordinator and acts on updates.
async fn run_coordination(inner: Arc<Inner>, tn: Arc<Tailnet>) {
    while !inner.stopped.load(Ordering::SeqCst) {
        let (conn, mut rx) = tn.coord.connect(inner.id, Role::Agent);
        inner.conn.store(conn, Ordering::SeqCst);
        let hello = CoordinateRequest::update_self(inner.node.clone());
        if let Err(e) = tn.coord.handle(inner.id, conn, &hello) {
            log::warn!(
                "coder-sim: agent {}: coordinator refused its node: {e}",
                inner.id
            );
        }
        while let Some(resp) = rx.recv().await {
            if !resp.error.is_empty() {
                log::debug!("coder-sim: agent {}: coordinator: {}", inner.id, resp.error);
            }
            for u in resp.peer_updates {
                on_update(&inner, &tn, u);
            }
        }
        // Removed as too slow, or replaced: register again shortly.
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn on_update(inner: &Arc<Inner>, tn: &Arc<Tailnet>, u: PeerUpdate) {
    let Ok(client) = u.peer_id() else {
        log::debug!("coder-sim: agent {}: update with a bad peer id", inner.id);
        return;
    };
    let kind = PeerUpdateKind::try_from(u.kind).unwrap_or(PeerUpdateKind::Unspecified);
    match kind {
        PeerUpdateKind::Node => {
            let Some(node) = u.node else { return };
            let key = match node.node_key() {
                Ok(k) => k,
                Err(e) => {
                    log::warn!("coder-sim: agent {}: client {client} node: {e}", inner.id);
                    return;
                }
            };
            let Some(ip) = node.addresses.iter().find_map(|a| {
                let (ip, _) = a.split_once('/')?;
                ip.parse::<Ipv6Addr>().ok()
            }) else {
                log::warn!(
                    "coder-sim: agent {}: client {client} has no IPv6 address",
                    inner.id
                );
                return;
            };
            // Tailscale sends to a peer's home region; one the deployment
            // does not have (or none) leaves only ours to try.
            let mut region = i64::from(node.preferred_derp);
            if tn.relay(region).is_none() {
                log::debug!(
                    "coder-sim: agent {}: client {client} homes on unknown DERP region {region}; sending on {}",
                    inner.id,
                    inner.home
                );
                region = inner.home;
            }
            program(inner, tn, client, key, ip, region);
            send_ready_for_handshake(inner, tn, client);
        }
        PeerUpdateKind::Disconnected => {
            // A client that said goodbye is dropped at once, live streams or
            // not, as a real agent removes the peer from WireGuard: the
            // client has closed its side by then, and a stream still being
            // torn down here must not keep the peer forever (nothing else
            // would remove it before the 15-minute silence rule).
            let mut engines = lock(&inner.engines);
            engines.retain(|_, e| e.client != client);
            log::debug!(
                "coder-sim: agent {}: client {client} disconnected",
                inner.id
            );
        }
        PeerUpdateKind::Lost => {
            log::debug!(
                "coder-sim: agent {}: client {client} lost; keeping it",
                inner.id
            );
        }
        _ => {}
    }
}

/// Makes sure an engine for `key` exists; drops the client's engines for
/// other keys unless streams are live through them.
fn program(
    inner: &Arc<Inner>,
    tn: &Arc<Tailnet>,
    client: PeerId,
    key: NodePublic,
    ip: Ipv6Addr,
    region: i64,
) {
    let mut engines = lock(&inner.engines);
    engines.retain(|k, e| {
        if e.client != client || *k == key {
            return true;
        }
        let live = e.live.load(Ordering::SeqCst);
        if live > 0 {
            log::info!(
                "coder-sim: agent {}: client {client} has a new key; keeping the old engine for its {live} live stream(s)",
                inner.id
            );
            return true;
        }
        log::info!("coder-sim: agent {}: client {client} has a new key; engine replaced", inner.id);
        false
    });
    if let Some(e) = engines.get_mut(&key) {
        // The same key may come back under a new peer ID (a redial
        // without a resume token), or with a new home region.
        e.client = client;
        e.region.store(region, Ordering::SeqCst);
        let live = e.live.load(Ordering::SeqCst);
        if e.client_ip == ip && !e.is_dead() {
            return;
        }
        if live > 0 {
            log::info!(
                "coder-sim: agent {}: client {client} changed address to {ip}; keeping the engine for its {live} live stream(s)",
                inner.id
            );
            return;
        }
    }
    engines.insert(key, new_engine(inner, tn, client, key, ip, region));
}

fn new_engine(
    inner: &Arc<Inner>,
    tn: &Arc<Tailnet>,
    client: PeerId,
    key: NodePublic,
    ip: Ipv6Addr,
    region: i64,
) -> Engine {
    let (out_tx, mut out_rx) = mpsc::channel::<Vec<u8>>(1024);
    let mut cfg = wg::Config::new(
        inner.private.to_raw(),
        *key.as_bytes(),
        addr::agent_addr(&inner.id),
        ip,
        wg::Role::Listen {
            port: AGENT_SSH_PORT,
        },
    );
    cfg.index = tn.next_engine_index();
    cfg.dead_after = CLIENT_SILENCE;
    cfg.tcp_give_up = Some(AGENT_TCP_GIVE_UP);
    let mut handle = wg::spawn(cfg, out_tx);
    let (_, closed) = mpsc::channel(1);
    let mut accepted = std::mem::replace(&mut handle.streams, closed);
    let live = Arc::new(AtomicUsize::new(0));

    let region = Arc::new(AtomicI64::new(region));
    let to = region.clone();
    let (me, tn2) = (inner.clone(), tn.clone());
    let forward = tn.rt.spawn(async move {
        let mut link: Option<(i64, watch::Receiver<Option<DerpSender>>)> = None;
        while let Some(pkt) = out_rx.recv().await {
            let want = to.load(Ordering::SeqCst);
            if link.as_ref().is_none_or(|(r, _)| *r != want) {
                link = region_link(&me, &tn2, want).map(|rx| (want, rx));
            }
            let Some((_, rx)) = link.as_mut() else {
                continue;
            };
            // Hold the datagram while the region (re)connects, briefly.
            let sender = match tokio::time::timeout(SEND_WAIT, rx.wait_for(Option::is_some)).await {
                Ok(Ok(s)) => s.clone(),
                _ => None,
            };
            if let Some(s) = sender {
                // A broken relay connection is the DERP task's to fix.
                let _ = s.send(&key, &pkt).await;
            }
        }
    });
    let me = inner.clone();
    let counter = live.clone();
    let rt = tn.rt.clone();
    let accept = tn.rt.spawn(async move {
        while let Some(stream) = accepted.recv().await {
            bridge(&me, &rt, stream, counter.clone());
        }
    });
    log::debug!(
        "coder-sim: agent {}: engine for client {client} ({ip})",
        inner.id
    );
    Engine {
        client,
        client_ip: ip,
        region,
        handle,
        live,
        tasks: [forward.abort_handle(), accept.abort_handle()],
    }
}

/// Pipes one tailnet stream to the agent's SSH endpoint.
fn bridge(
    inner: &Arc<Inner>,
    rt: &tokio::runtime::Handle,
    mut stream: DuplexStream,
    engine_live: Arc<AtomicUsize>,
) {
    let id = inner.next_stream.fetch_add(1, Ordering::Relaxed);
    let me = inner.clone();
    // Hold the registry while spawning so the task cannot deregister
    // before it is registered.
    let mut streams = lock(&inner.streams);
    let task = rt.spawn(async move {
        let _live = LiveGuard::new(vec![engine_live, me.live.clone()]);
        match TcpStream::connect(me.ssh).await {
            Ok(mut tcp) => {
                let _ = tcp.set_nodelay(true);
                match tokio::io::copy_bidirectional(&mut stream, &mut tcp).await {
                    Ok((up, down)) => log::debug!(
                        "coder-sim: agent {}: tailnet stream closed ({up} bytes in, {down} out)",
                        me.id
                    ),
                    Err(e) => log::debug!("coder-sim: agent {}: tailnet stream: {e}", me.id),
                }
            }
            Err(e) => log::warn!(
                "coder-sim: agent {}: SSH endpoint {} unreachable: {e}",
                me.id,
                me.ssh
            ),
        }
        lock(&me.streams).remove(&id);
    });
    streams.insert(id, task.abort_handle());
}

fn send_ready_for_handshake(inner: &Arc<Inner>, tn: &Arc<Tailnet>, client: PeerId) {
    let Some(delay) = tn.handshake_delay() else {
        log::info!(
            "coder-sim: agent {}: withholding ready_for_handshake to {client}",
            inner.id
        );
        return;
    };
    let me = inner.clone();
    let tn2 = tn.clone();
    let send = move || {
        // Withheld meanwhile, or the agent went away.
        if me.stopped.load(Ordering::SeqCst) || tn2.handshake_delay().is_none() {
            return;
        }
        let conn = me.conn.load(Ordering::SeqCst);
        let req = CoordinateRequest::ready_for_handshake([client]);
        if let Err(e) = tn2.coord.handle(me.id, conn, &req) {
            log::debug!("coder-sim: agent {}: ready_for_handshake: {e}", me.id);
        }
    };
    if delay.is_zero() {
        send();
    } else {
        tn.rt.spawn(async move {
            tokio::time::sleep(delay).await;
            send();
        });
    }
}

/// Keeps the agent's DERP connection to `region` (in-process pipe to that
/// region's relay), publishes its sender on `link`, and routes what
/// arrives to the engines.
async fn run_derp(
    inner: Arc<Inner>,
    tn: Arc<Tailnet>,
    region: i64,
    link: watch::Sender<Option<DerpSender>>,
) {
    let mut backoff = Duration::from_millis(50);
    while !inner.stopped.load(Ordering::SeqCst) {
        let Some(relay) = tn.relay(region) else {
            return;
        };
        let (server_end, client_end) = tokio::io::duplex(256 << 10);
        let _server = AbortOnDrop(
            tn.rt
                .spawn(async move {
                    if let Err(e) = relay.accept(server_end).await {
                        log::debug!("coder-sim: agent DERP connection (relay side): {e}");
                    }
                })
                .abort_handle(),
        );
        match DerpClient::handshake(client_end, &inner.private, ClientOptions::default()).await {
            Ok(client) => {
                backoff = Duration::from_millis(50);
                if let Err(e) = client.note_preferred(region == inner.home).await {
                    log::debug!("coder-sim: agent {}: note_preferred: {e}", inner.id);
                }
                let (sender, mut receiver) = client.into_split();
                link.send_replace(Some(sender));
                log::debug!(
                    "coder-sim: agent {}: DERP region {region} connected",
                    inner.id
                );
                loop {
                    match receiver.recv().await {
                        Ok(Event::Packet { src, data }) => route(&inner, &tn, region, src, data),
                        Ok(_) => {}
                        Err(e) => {
                            log::debug!(
                                "coder-sim: agent {}: DERP region {region} connection ended: {e}",
                                inner.id
                            );
                            break;
                        }
                    }
                }
                link.send_replace(None);
            }
            Err(e) => log::debug!(
                "coder-sim: agent {}: DERP region {region} login failed: {e}",
                inner.id
            ),
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(1));
    }
}

/// Hands a relayed datagram to the engine of its sender, reviving an
/// engine that gave up after a long silence.
fn route(inner: &Arc<Inner>, tn: &Arc<Tailnet>, region: i64, src: NodePublic, data: Vec<u8>) {
    if data.starts_with(DISCO_MAGIC) {
        return;
    }
    let inbound = {
        let mut engines = lock(&inner.engines);
        let Some(e) = engines.get_mut(&src) else {
            // Like magicsock: no node for this key, nothing to do.
            log::debug!(
                "coder-sim: agent {}: packet from unknown key {src:?} dropped",
                inner.id
            );
            return;
        };
        if e.is_dead() {
            let (client, ip) = (e.client, e.client_ip);
            let to = e.region.load(Ordering::SeqCst);
            *e = new_engine(inner, tn, client, src, ip, to);
        }
        e.handle.inbound.clone()
    };
    *lock(&inner.rx_by_region).entry(region).or_default() += 1;
    if inbound.try_send(data).is_err() {
        log::debug!(
            "coder-sim: agent {}: engine queue full; packet dropped",
            inner.id
        );
    }
}
