//! The tailnet side of the simulator: everything a native tailnet client
//! meets when it dials an agent the way `coder ssh` does.
//!
//! [`Tailnet`] is the per-deployment state: the coordinator
//! ([`coordinator`]), the embedded DERP relay (coder-tailnet's
//! `DerpServer`), optionally a second, independent relay in its own region
//! (a workspace proxy's, where the fake agents then home), resume tokens,
//! the live coordinate websockets, and one fake agent peer ([`agent`]) per
//! agent of a running workspace. [`http`] holds the routes (`/connection`,
//! `/coordinate`, `/derp`, and the second relay's own router), [`service`]
//! the dRPC API served on each coordinate websocket. Fault injection and
//! observability are methods here, surfaced on [`crate::Sim`].

pub(crate) mod agent;
pub(crate) mod coordinator;
pub(crate) mod http;
pub(crate) mod service;

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use coder_tailnet::derp::DerpServer;
use coder_tailnet::proto::{self, PeerId, PeerUpdateKind};
use futures_util::task::AtomicWaker;
use rand::RngCore;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use uuid::Uuid;

use crate::state::lock;
use agent::AgentPeer;
use coordinator::Coordinator;

/// The embedded relay's region, as coderd's defaults name it.
pub const DERP_REGION_ID: i32 = 999;
pub const DERP_REGION_CODE: &str = "coder";
pub const DERP_REGION_NAME: &str = "Coder Embedded Relay";
/// The optional second region's code and name (its id is the caller's).
pub const PROXY_REGION_CODE: &str = "sim-proxy";
pub const PROXY_REGION_NAME: &str = "coder-sim workspace proxy";
/// Resume tokens live this long (coderd: 24 h) and should be refreshed
/// after half of it.
pub const RESUME_TOKEN_EXPIRY: Duration = Duration::from_secs(24 * 3600);
/// Newest tailnet API minor version accepted on `/coordinate` (major 2), as
/// coderd v2.36 serves.
pub const API_MINOR_MAX: u32 = 10;

/// A coordinate websocket as the fault hooks see it.
struct CoordConn {
    peer: PeerId,
    agent: PeerId,
    kill: Arc<KillSwitch>,
}

struct ResumeToken {
    peer: PeerId,
    expires: SystemTime,
}

/// The optional second DERP region: a relay of its own, served on its
/// own listener, with no mesh to the embedded one.
pub(crate) struct ProxyRegion {
    pub id: i64,
    pub derp: DerpServer,
    /// Where its listener is (the DERP map's `HostName` and `DERPPort`).
    pub addr: SocketAddr,
}

/// One region of the DERP map, as both renderings need it.
struct RegionDesc {
    id: i64,
    embedded: bool,
    code: &'static str,
    name: &'static str,
    host: String,
    port: u16,
}

/// Per-deployment tailnet state. See the module docs.
pub(crate) struct Tailnet {
    pub coord: Coordinator,
    /// The embedded relay, region [`DERP_REGION_ID`].
    pub derp: DerpServer,
    /// The second region, when the deployment has one.
    pub proxy: Option<ProxyRegion>,
    /// Host and port the DERP map advertises (the sim's own address).
    host: String,
    port: u16,
    pub rt: tokio::runtime::Handle,
    tokens: Mutex<HashMap<String, ResumeToken>>,
    conns: Mutex<HashMap<u64, CoordConn>>,
    next_conn: AtomicU64,
    agents: Mutex<HashMap<Uuid, AgentPeer>>,
    /// When the fake agents answer a client's node with
    /// `ready_for_handshake`: after this delay, or never (`None`).
    handshake_delay: Mutex<Option<Duration>>,
    /// Makes boringtun session indexes unique across every engine.
    next_engine: AtomicU64,
    /// `derp_force_websockets` in the connection info.
    pub force_websockets: std::sync::atomic::AtomicBool,
    /// dRPC methods invoked on coordinate websockets, oldest first.
    pub rpcs: Mutex<Vec<String>>,
}

/// What a fake agent peer needs to know about its agent.
#[derive(Clone, Debug)]
pub(crate) struct AgentInfo {
    pub id: Uuid,
    pub ws_id: Uuid,
    pub name: String,
    /// The agent's SSH endpoint, where tailnet streams are bridged to.
    pub ssh: SocketAddr,
}

impl Tailnet {
    /// `proxy`: the second region's id and listener address, if any.
    pub fn new(
        url_addr: SocketAddr,
        proxy: Option<(i64, SocketAddr)>,
        rt: tokio::runtime::Handle,
    ) -> Tailnet {
        Tailnet {
            coord: Coordinator::default(),
            derp: DerpServer::new(),
            proxy: proxy.map(|(id, addr)| ProxyRegion {
                id,
                derp: DerpServer::new(),
                addr,
            }),
            host: url_addr.ip().to_string(),
            port: url_addr.port(),
            rt,
            tokens: Mutex::new(HashMap::new()),
            conns: Mutex::new(HashMap::new()),
            next_conn: AtomicU64::new(1),
            agents: Mutex::new(HashMap::new()),
            handshake_delay: Mutex::new(Some(Duration::ZERO)),
            next_engine: AtomicU64::new(1),
            force_websockets: std::sync::atomic::AtomicBool::new(false),
            rpcs: Mutex::new(Vec::new()),
        }
    }

    // ----- the DERP map ---------------------------------------------------

    /// The regions the map advertises, embedded relay first.
    fn regions(&self) -> Vec<RegionDesc> {
        let mut out = vec![RegionDesc {
            id: i64::from(DERP_REGION_ID),
            embedded: true,
            code: DERP_REGION_CODE,
            name: DERP_REGION_NAME,
            host: self.host.clone(),
            port: self.port,
        }];
        if let Some(p) = &self.proxy {
            out.push(RegionDesc {
                id: p.id,
                embedded: false,
                code: PROXY_REGION_CODE,
                name: PROXY_REGION_NAME,
                host: p.addr.ip().to_string(),
                port: p.addr.port(),
            });
        }
        out
    }

    /// `AgentConnectionInfo.derp_map` as coderd renders `tailcfg.DERPMap`.
    pub fn derp_map_json(&self) -> serde_json::Value {
        let regions: serde_json::Map<String, serde_json::Value> = self
            .regions()
            .into_iter()
            .map(|r| {
                let region = serde_json::json!({
                    "EmbeddedRelay": r.embedded,
                    "RegionID": r.id,
                    "RegionCode": r.code,
                    "RegionName": r.name,
                    "Nodes": [{
                        "Name": format!("{}a", r.id),
                        "RegionID": r.id,
                        "HostName": r.host,
                        "IPv4": "",
                        "IPv6": "",
                        "STUNPort": -1,
                        "DERPPort": r.port,
                        "ForceHTTP": true,
                    }],
                });
                (r.id.to_string(), region)
            })
            .collect();
        serde_json::json!({ "Regions": regions })
    }

    /// The same map as `StreamDERPMaps` sends it.
    pub fn derp_map_proto(&self) -> proto::DerpMap {
        let regions = self
            .regions()
            .into_iter()
            .map(|r| {
                let node = proto::DerpNode {
                    name: format!("{}a", r.id),
                    region_id: r.id,
                    host_name: r.host,
                    stun_port: -1,
                    derp_port: i32::from(r.port),
                    force_http: true,
                    ..Default::default()
                };
                let region = proto::DerpRegion {
                    region_id: r.id,
                    embedded_relay: r.embedded,
                    region_code: r.code.into(),
                    region_name: r.name.into(),
                    avoid: false,
                    nodes: vec![node],
                };
                (r.id, region)
            })
            .collect();
        proto::DerpMap {
            home_params: Some(proto::DerpHomeParams::default()),
            regions,
        }
    }

    /// The relay of a region, if the deployment has that region.
    pub fn relay(&self, region: i64) -> Option<DerpServer> {
        if region == i64::from(DERP_REGION_ID) {
            return Some(self.derp.clone());
        }
        self.proxy
            .as_ref()
            .filter(|p| p.id == region)
            .map(|p| p.derp.clone())
    }

    /// Where the fake agents home: the second region when there is one.
    pub fn agent_region(&self) -> i64 {
        self.proxy
            .as_ref()
            .map_or(i64::from(DERP_REGION_ID), |p| p.id)
    }

    // ----- resume tokens --------------------------------------------------

    /// A fresh opaque token for `peer`, and when it expires.
    pub fn issue_token(&self, peer: PeerId) -> (String, SystemTime) {
        let mut raw = [0u8; 24];
        rand::thread_rng().fill_bytes(&mut raw);
        let token: String = raw.iter().map(|b| format!("{b:02x}")).collect();
        let expires = SystemTime::now() + RESUME_TOKEN_EXPIRY;
        let mut tokens = lock(&self.tokens);
        let now = SystemTime::now();
        tokens.retain(|_, t| t.expires > now);
        tokens.insert(token.clone(), ResumeToken { peer, expires });
        (token, expires)
    }

    /// The peer a valid, unexpired token was issued to.
    pub fn redeem_token(&self, token: &str) -> Option<PeerId> {
        let tokens = lock(&self.tokens);
        let t = tokens.get(token)?;
        (t.expires > SystemTime::now()).then_some(t.peer)
    }

    // ----- coordinate connections -----------------------------------------

    /// Registers a live coordinate websocket; the guard unregisters it.
    fn register_conn(
        self: &Arc<Self>,
        peer: PeerId,
        agent: PeerId,
    ) -> (ConnGuard, Arc<KillSwitch>) {
        let id = self.next_conn.fetch_add(1, Ordering::Relaxed);
        let kill = Arc::new(KillSwitch::default());
        lock(&self.conns).insert(
            id,
            CoordConn {
                peer,
                agent,
                kill: kill.clone(),
            },
        );
        (
            ConnGuard {
                tailnet: self.clone(),
                id,
            },
            kill,
        )
    }

    pub fn coordinate_connections(&self) -> usize {
        lock(&self.conns).len()
    }

    /// Peer IDs on the live coordinate websockets of `agent`.
    pub fn coordinate_peers(&self, agent: PeerId) -> Vec<PeerId> {
        lock(&self.conns)
            .values()
            .filter(|c| c.agent == agent)
            .map(|c| c.peer)
            .collect()
    }

    /// Cuts every coordinate websocket at the transport (no close frame,
    /// no yamux GoAway), as a coderd crash or network cut would.
    pub fn drop_coordinate_connections(&self) -> usize {
        let conns = lock(&self.conns);
        for c in conns.values() {
            c.kill.kill();
        }
        conns.len()
    }

    // ----- fault injection ------------------------------------------------

    /// Drops every connection of every relay (both regions).
    pub fn restart_derp(&self) -> usize {
        self.derp.drop_all() + self.proxy.as_ref().map_or(0, |p| p.derp.drop_all())
    }

    /// Every relay of the deployment (the embedded one first).
    fn relays(&self) -> Vec<DerpServer> {
        let mut v = vec![self.derp.clone()];
        v.extend(self.proxy.as_ref().map(|p| p.derp.clone()));
        v
    }

    /// Freezes the relay connections (every region) of these node keys.
    pub fn freeze_derp(&self, keys: &[coder_tailnet::derp::NodePublic]) -> usize {
        let relays = self.relays();
        keys.iter()
            .map(|k| relays.iter().map(|r| r.freeze_client(k)).sum::<usize>())
            .sum()
    }

    /// Closes the relay connections (every region) of these node keys.
    pub fn drop_derp(&self, keys: &[coder_tailnet::derp::NodePublic]) -> usize {
        let relays = self.relays();
        keys.iter()
            .map(|k| relays.iter().filter(|r| r.drop_client(k)).count())
            .sum()
    }

    /// Every relay drops new connections for `d`.
    pub fn refuse_derp_for(&self, d: Duration) {
        for r in self.relays() {
            r.refuse_for(d);
        }
    }

    pub fn send_peer_update(&self, agent: PeerId, kind: PeerUpdateKind) -> usize {
        self.coord.inject(agent, kind, "sim: injected")
    }

    /// `Some(delay)`: answer after `delay`; `None`: never answer.
    pub fn handshake_delay(&self) -> Option<Duration> {
        *lock(&self.handshake_delay)
    }

    pub fn set_handshake_delay(&self, delay: Option<Duration>) {
        *lock(&self.handshake_delay) = delay;
    }

    pub fn next_engine_index(&self) -> u32 {
        // boringtun keeps 24 bits of the index; any distinct value will do.
        (self.next_engine.fetch_add(1, Ordering::Relaxed) & 0x00ff_ffff) as u32
    }

    // ----- fake agents ----------------------------------------------------

    /// Starts a peer for each agent (if not already running) and stops the
    /// peers of `ws_id` that are not in `agents` (a newer start replaced
    /// them).
    pub fn agents_started(self: &Arc<Self>, ws_id: Uuid, agents: Vec<AgentInfo>) {
        let stale: Vec<AgentPeer> = {
            let mut map = lock(&self.agents);
            let keep: Vec<Uuid> = agents.iter().map(|a| a.id).collect();
            let gone: Vec<Uuid> = map
                .iter()
                .filter(|(id, p)| p.info.ws_id == ws_id && !keep.contains(id))
                .map(|(id, _)| *id)
                .collect();
            let stale = gone.iter().filter_map(|id| map.remove(id)).collect();
            for info in agents {
                if !map.contains_key(&info.id) {
                    let id = info.id;
                    map.insert(id, AgentPeer::start(self.clone(), info));
                }
            }
            stale
        };
        for p in stale {
            p.stop(self);
        }
    }

    /// Stops every agent peer of a workspace (stop/delete took effect).
    pub fn stop_workspace_agents(&self, ws_id: Uuid) {
        let stale: Vec<AgentPeer> = {
            let mut map = lock(&self.agents);
            let ids: Vec<Uuid> = map
                .iter()
                .filter(|(_, p)| p.info.ws_id == ws_id)
                .map(|(id, _)| *id)
                .collect();
            ids.iter().filter_map(|id| map.remove(id)).collect()
        };
        for p in stale {
            p.stop(self);
        }
    }

    /// Runs `f` on the peer of `(ws_id, name)`, if one is running.
    pub fn with_agent<T>(
        &self,
        ws_id: Uuid,
        name: &str,
        f: impl FnOnce(&AgentPeer) -> T,
    ) -> Option<T> {
        let map = lock(&self.agents);
        map.values()
            .find(|p| p.info.ws_id == ws_id && p.info.name == name)
            .map(f)
    }

    /// Stops everything: agents, coordinate websockets, DERP connections.
    pub fn shutdown(&self) {
        let all: Vec<AgentPeer> = lock(&self.agents).drain().map(|(_, p)| p).collect();
        for p in all {
            p.stop(self);
        }
        self.drop_coordinate_connections();
        self.restart_derp();
    }
}

pub(crate) fn peer_id(u: Uuid) -> PeerId {
    PeerId(u.into_bytes())
}

pub(crate) fn uuid(p: PeerId) -> Uuid {
    Uuid::from_bytes(p.0)
}

/// Unregisters a coordinate websocket when its task ends.
pub(crate) struct ConnGuard {
    tailnet: Arc<Tailnet>,
    id: u64,
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        lock(&self.tailnet.conns).remove(&self.id);
    }
}

/// Turns a transport off from outside: once killed, every read and write
/// of the [`Killable`] fails, whichever task is blocked in it.
#[derive(Default)]
pub(crate) struct KillSwitch {
    killed: AtomicBool,
    read: AtomicWaker,
    write: AtomicWaker,
}

impl KillSwitch {
    pub fn kill(&self) {
        self.killed.store(true, Ordering::SeqCst);
        self.read.wake();
        self.write.wake();
    }

    fn check(&self, waker: &AtomicWaker, cx: &Context<'_>) -> io::Result<()> {
        // Register first so a kill between the check and the inner poll
        // still wakes this task.
        waker.register(cx.waker());
        if self.killed.load(Ordering::SeqCst) {
            Err(io::Error::new(
                io::ErrorKind::ConnectionReset,
                "sim: connection dropped",
            ))
        } else {
            Ok(())
        }
    }
}

/// A byte stream that a [`KillSwitch`] can cut.
pub(crate) struct Killable<S> {
    io: S,
    kill: Arc<KillSwitch>,
}

impl<S> Killable<S> {
    pub fn new(io: S, kill: Arc<KillSwitch>) -> Self {
        Killable { io, kill }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Killable<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if let Err(e) = self.kill.check(&self.kill.read, cx) {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Killable<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        if let Err(e) = self.kill.check(&self.kill.write, cx) {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut self.io).poll_write(cx, data)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if let Err(e) = self.kill.check(&self.kill.write, cx) {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.kill.killed.load(Ordering::SeqCst) {
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}
