//! A fake workspace agent on the tailnet, built from coder-tailnet's own
//! pieces: it registers with the coordinator in-process, homes on the
//! embedded DERP relay over an in-memory pipe, and for every client node it
//! learns runs a WireGuard responder with a userspace TCP listener on the
//! SSH port (1). Each TCP stream accepted there is bridged to the agent's
//! SSH endpoint (the same one `--tunnel tcp://` reaches), so the endpoint's
//! stop/kill/reset rules apply to tailnet streams too.
//!
//! Like Coder's agent it answers every `NODE` with `ready_for_handshake`
//! (after the deployment's configured delay, or never when withheld), drops
//! packets from keys it has no node for, and ignores disco packets.

use std::collections::HashMap;
use std::net::Ipv6Addr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
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
use super::{peer_id, AgentInfo, Tailnet, DERP_REGION_ID};
use crate::state::lock;

/// Disco datagrams start with `TS💬`.
const DISCO_MAGIC: &[u8] = &[0x54, 0x53, 0xf0, 0x9f, 0x92, 0xac];

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
    /// The current DERP connection, if any.
    derp: watch::Sender<Option<DerpSender>>,
    /// WireGuard engines by client node key.
    engines: Mutex<HashMap<NodePublic, Engine>>,
    /// Live bridged streams, for teardown.
    streams: Mutex<HashMap<u64, AbortHandle>>,
    next_stream: AtomicU64,
    live: Arc<AtomicUsize>,
}

/// A WireGuard + TCP engine for one client key.
struct Engine {
    client: PeerId,
    client_ip: Ipv6Addr,
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
        let node = Node {
            id: addr::node_id(&id),
            as_of: Some(Timestamp::now()),
            key: private.public().to_wire(),
            disco: DiscoPublic::random().to_text(),
            preferred_derp: DERP_REGION_ID,
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
            derp: watch::channel(None).0,
            engines: Mutex::new(HashMap::new()),
            streams: Mutex::new(HashMap::new()),
            next_stream: AtomicU64::new(1),
            live: Arc::new(AtomicUsize::new(0)),
        });
        log::info!(
            "coder-sim: tailnet agent {} ({}) up, key {:?}",
            info.name,
            id,
            inner.private.public()
        );
        let coord = tn
            .rt
            .spawn(run_coordination(inner.clone(), tn.clone()))
            .abort_handle();
        let derp = tn
            .rt
            .spawn(run_derp(inner.clone(), tn.clone()))
            .abort_handle();
        AgentPeer {
            info,
            inner,
            tasks: vec![coord, derp],
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
        inner.derp.send_replace(None);
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

    /// Client keys with an engine.
    pub fn engine_keys(&self) -> Vec<NodePublic> {
        lock(&self.inner.engines).keys().copied().collect()
    }
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
            program(inner, tn, client, key, ip);
            send_ready_for_handshake(inner, tn, client);
        }
        PeerUpdateKind::Disconnected => {
            let mut engines = lock(&inner.engines);
            engines.retain(|_, e| e.client != client || e.live.load(Ordering::SeqCst) > 0);
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
fn program(inner: &Arc<Inner>, tn: &Arc<Tailnet>, client: PeerId, key: NodePublic, ip: Ipv6Addr) {
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
        // without a resume token).
        e.client = client;
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
    engines.insert(key, new_engine(inner, tn, client, key, ip));
}

fn new_engine(
    inner: &Arc<Inner>,
    tn: &Arc<Tailnet>,
    client: PeerId,
    key: NodePublic,
    ip: Ipv6Addr,
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
    let mut handle = wg::spawn(cfg, out_tx);
    let (_, closed) = mpsc::channel(1);
    let mut accepted = std::mem::replace(&mut handle.streams, closed);
    let live = Arc::new(AtomicUsize::new(0));

    let mut derp = inner.derp.subscribe();
    let forward = tn.rt.spawn(async move {
        while let Some(pkt) = out_rx.recv().await {
            let sender = derp.borrow_and_update().clone();
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

/// Keeps a DERP connection to the embedded relay (in-process pipe) and
/// routes what arrives to the engines.
async fn run_derp(inner: Arc<Inner>, tn: Arc<Tailnet>) {
    let mut backoff = Duration::from_millis(50);
    while !inner.stopped.load(Ordering::SeqCst) {
        let (server_end, client_end) = tokio::io::duplex(256 << 10);
        let relay = tn.derp.clone();
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
                if let Err(e) = client.note_preferred(true).await {
                    log::debug!("coder-sim: agent {}: note_preferred: {e}", inner.id);
                }
                let (sender, mut receiver) = client.into_split();
                inner.derp.send_replace(Some(sender));
                log::debug!("coder-sim: agent {}: DERP connected", inner.id);
                loop {
                    match receiver.recv().await {
                        Ok(Event::Packet { src, data }) => route(&inner, &tn, src, data),
                        Ok(_) => {}
                        Err(e) => {
                            log::debug!(
                                "coder-sim: agent {}: DERP connection ended: {e}",
                                inner.id
                            );
                            break;
                        }
                    }
                }
                inner.derp.send_replace(None);
            }
            Err(e) => log::debug!("coder-sim: agent {}: DERP login failed: {e}", inner.id),
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(1));
    }
}

/// Hands a relayed datagram to the engine of its sender, reviving an
/// engine that gave up after a long silence.
fn route(inner: &Arc<Inner>, tn: &Arc<Tailnet>, src: NodePublic, data: Vec<u8>) {
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
            *e = new_engine(inner, tn, client, src, ip);
        }
        e.handle.inbound.clone()
    };
    if inbound.try_send(data).is_err() {
        log::debug!(
            "coder-sim: agent {}: engine queue full; packet dropped",
            inner.id
        );
    }
}
