//! The in-memory tailnet coordinator: which peers are connected, their
//! latest nodes, and the tunnels between them; it turns each peer's
//! `CoordinateRequest`s into `PeerUpdate`s for the peers it shares a tunnel
//! with.
//!
//! Rules (reference `tailnet.md` §2.2, modelled, not ported):
//! - a client may only `add_tunnel` to the agent of its route; agents may
//!   not open tunnels; clients may not send `ready_for_handshake`;
//! - a client's `update_self` addresses must all be `/128`s;
//! - `update_self` stores the node and sends `NODE` to every peer sharing a
//!   tunnel with the sender;
//! - `add_tunnel(dst)` sends `NODE(dst)` to the source if `dst` is connected
//!   with a node, and `NODE(src)` to `dst` if the source has a node;
//! - the agent's `ready_for_handshake{client}` reaches that client as
//!   `READY_FOR_HANDSHAKE` from the agent, or the agent gets an `error`
//!   when it shares no tunnel with that client;
//! - leaving with `disconnect` sends `DISCONNECTED` to tunnel peers, a stream
//!   that just ends sends `LOST`; either way the leaver's own tunnels (as a
//!   source) go, while tunnels *to* it stay, so a returning agent's node
//!   reaches its clients again;
//! - a new stream with a connected peer's ID replaces the old one silently
//!   (its tunnels stay; it must send its node again);
//! - a (re)connecting peer gets `NODE` for every connected peer it already
//!   shares a tunnel with, so an agent that comes up after its clients
//!   still learns their nodes;
//! - a peer whose response queue (512) is full is removed with
//!   `DISCONNECTED` ("failed update").
//!
//! Streams talk to it through [`Coordinator::connect`] (a connection number
//! and a queue of responses), [`Coordinator::handle`] and
//! [`Coordinator::leave`]; the number makes calls from a replaced stream
//! no-ops.

use std::collections::{BTreeSet, HashMap};
use std::net::IpAddr;
use std::sync::Mutex;

use coder_tailnet::proto::{
    CoordinateRequest, CoordinateResponse, Node, PeerId, PeerUpdate, PeerUpdateKind,
};
use tokio::sync::mpsc;

use crate::state::lock;

/// Responses queued per peer before it counts as too slow.
pub(crate) const RESPONSE_BUFFER: usize = 512;

/// Who a coordinating peer is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Role {
    /// A client that came in on `/workspaceagents/{agent}/coordinate`.
    Client { agent: PeerId },
    /// A workspace agent (in-process in the simulator).
    Agent,
}

/// A request the coordinator refuses; the stream gets it as
/// `CoordinateResponse.error` and then ends, as coderd does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Refused(pub String);

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

struct Peer {
    conn: u64,
    role: Role,
    node: Option<Node>,
    tx: mpsc::Sender<CoordinateResponse>,
}

#[derive(Default)]
struct State {
    peers: HashMap<PeerId, Peer>,
    /// (source, destination): clients are sources, agents destinations.
    tunnels: BTreeSet<(PeerId, PeerId)>,
    next_conn: u64,
    /// Peers found too slow during the current operation.
    slow: Vec<PeerId>,
}

/// See the module docs. One per simulated deployment.
#[derive(Default)]
pub(crate) struct Coordinator {
    state: Mutex<State>,
}

fn update(id: PeerId, kind: PeerUpdateKind, node: Option<Node>, reason: &str) -> PeerUpdate {
    PeerUpdate {
        id: id.to_vec(),
        node,
        kind: kind as i32,
        reason: reason.to_string(),
    }
}

impl State {
    /// Peers sharing a tunnel with `id`, in either direction.
    fn tunnel_peers(&self, id: PeerId) -> Vec<PeerId> {
        let mut out: Vec<PeerId> = self
            .tunnels
            .iter()
            .filter_map(|&(s, d)| {
                if s == id {
                    Some(d)
                } else if d == id {
                    Some(s)
                } else {
                    None
                }
            })
            .collect();
        out.sort_unstable();
        out.dedup();
        out
    }

    fn shares_tunnel(&self, a: PeerId, b: PeerId) -> bool {
        self.tunnels.contains(&(a, b)) || self.tunnels.contains(&(b, a))
    }

    /// Queues `resp` for `to` if connected; a full queue marks it slow.
    fn send(&mut self, to: PeerId, resp: CoordinateResponse) {
        let Some(p) = self.peers.get(&to) else {
            return;
        };
        match p.tx.try_send(resp) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(_)) => {
                log::warn!("coder-sim coordinator: {to} is not reading; removing it");
                self.slow.push(to);
            }
            // The stream is on its way out; its `leave` follows.
            Err(mpsc::error::TrySendError::Closed(_)) => {}
        }
    }

    fn send_update(&mut self, to: PeerId, u: PeerUpdate) {
        self.send(
            to,
            CoordinateResponse {
                peer_updates: vec![u],
                error: String::new(),
            },
        );
    }

    fn send_error(&mut self, to: PeerId, error: String) {
        self.send(
            to,
            CoordinateResponse {
                peer_updates: Vec::new(),
                error,
            },
        );
    }

    /// Removes `id` and tells its tunnel peers.
    fn remove(&mut self, id: PeerId, kind: PeerUpdateKind, reason: &str) {
        if self.peers.remove(&id).is_none() {
            return;
        }
        for p in self.tunnel_peers(id) {
            self.send_update(p, update(id, kind, None, reason));
        }
        self.tunnels.retain(|&(s, _)| s != id);
    }

    /// Removes peers found slow (their removal may find more).
    fn reap_slow(&mut self) {
        while let Some(id) = self.slow.pop() {
            self.remove(id, PeerUpdateKind::Disconnected, "failed update");
        }
    }
}

/// Every address of a client's node must be a single IPv6 host (`/128`).
fn check_client_node(node: &Node) -> Result<(), Refused> {
    for a in node.addresses.iter().chain(node.allowed_ips.iter()) {
        let ok = a
            .split_once('/')
            .and_then(|(ip, bits)| Some((ip.parse::<IpAddr>().ok()?, bits.parse::<u8>().ok()?)))
            .is_some_and(|(ip, bits)| ip.is_ipv6() && bits == 128);
        if !ok {
            return Err(Refused(format!(
                "invalid address {a:?}: addresses must be single-host /128 prefixes"
            )));
        }
    }
    Ok(())
}

impl Coordinator {
    /// Registers a stream for `id`, replacing (silently) any stream the same
    /// ID already has. Returns the connection number for later calls and the
    /// queue of responses to deliver; the queue ends when the peer is
    /// removed or replaced.
    pub fn connect(&self, id: PeerId, role: Role) -> (u64, mpsc::Receiver<CoordinateResponse>) {
        let (tx, rx) = mpsc::channel(RESPONSE_BUFFER);
        let mut st = lock(&self.state);
        st.next_conn += 1;
        let conn = st.next_conn;
        if st.peers.contains_key(&id) {
            log::info!("coder-sim coordinator: {id} reconnected; old stream replaced");
        }
        // Dropping the old sender ends the old stream without LOST or
        // DISCONNECTED; tunnels stay, the node must be sent again.
        st.peers.insert(
            id,
            Peer {
                conn,
                role,
                node: None,
                tx,
            },
        );
        // Tunnels outlive their destination's streams: a (re)connecting
        // peer learns the nodes of the peers it already shares one with.
        for p in st.tunnel_peers(id) {
            if let Some(n) = st.peers.get(&p).and_then(|q| q.node.clone()) {
                st.send_update(id, update(p, PeerUpdateKind::Node, Some(n), "connected"));
            }
        }
        st.reap_slow();
        (conn, rx)
    }

    /// Applies one request from `id`'s stream number `conn`. A refused
    /// request has already been answered with `error`; the caller should end
    /// the stream (and then [`leave`](Self::leave) as lost). A `disconnect`
    /// is not handled here: the caller checks for it and calls `leave`.
    pub fn handle(&self, id: PeerId, conn: u64, req: &CoordinateRequest) -> Result<(), Refused> {
        let mut st = lock(&self.state);
        let result = Self::apply(&mut st, id, conn, req);
        if let Err(e) = &result {
            st.send_error(id, e.0.clone());
        }
        st.reap_slow();
        result
    }

    fn apply(
        st: &mut State,
        id: PeerId,
        conn: u64,
        req: &CoordinateRequest,
    ) -> Result<(), Refused> {
        let role = match st.peers.get(&id) {
            Some(p) if p.conn == conn => p.role,
            _ => return Err(Refused("this coordination stream was replaced".into())),
        };

        if let Some(node) = req.update_self.as_ref().and_then(|u| u.node.as_ref()) {
            if let Role::Client { .. } = role {
                check_client_node(node)?;
            }
            if let Some(p) = st.peers.get_mut(&id) {
                p.node = Some(node.clone());
            }
            for to in st.tunnel_peers(id) {
                st.send_update(
                    to,
                    update(id, PeerUpdateKind::Node, Some(node.clone()), "update"),
                );
            }
        }

        if let Some(t) = &req.add_tunnel {
            let dst = PeerId::from_bytes(&t.id).map_err(|e| Refused(format!("add_tunnel: {e}")))?;
            match role {
                Role::Agent => return Err(Refused("agents may not open tunnels".into())),
                Role::Client { agent } if agent != dst => {
                    return Err(Refused(format!(
                        "invalid agent id, expected {agent}, got {dst}"
                    )));
                }
                Role::Client { .. } => {}
            }
            st.tunnels.insert((id, dst));
            if let Some(n) = st.peers.get(&dst).and_then(|p| p.node.clone()) {
                st.send_update(id, update(dst, PeerUpdateKind::Node, Some(n), "add tunnel"));
            }
            let own = st.peers.get(&id).and_then(|p| p.node.clone());
            if let Some(n) = own {
                st.send_update(dst, update(id, PeerUpdateKind::Node, Some(n), "add tunnel"));
            }
        }

        if let Some(t) = &req.remove_tunnel {
            let dst =
                PeerId::from_bytes(&t.id).map_err(|e| Refused(format!("remove_tunnel: {e}")))?;
            if st.tunnels.remove(&(id, dst)) && !st.shares_tunnel(id, dst) {
                st.send_update(
                    dst,
                    update(id, PeerUpdateKind::Disconnected, None, "tunnel removed"),
                );
            }
        }

        if !req.ready_for_handshake.is_empty() {
            if let Role::Client { .. } = role {
                return Err(Refused("clients may not send ready_for_handshake".into()));
            }
            for r in &req.ready_for_handshake {
                let to = PeerId::from_bytes(&r.id)
                    .map_err(|e| Refused(format!("ready_for_handshake: {e}")))?;
                if st.shares_tunnel(id, to) {
                    st.send_update(
                        to,
                        update(
                            id,
                            PeerUpdateKind::ReadyForHandshake,
                            None,
                            "ready for handshake",
                        ),
                    );
                } else {
                    // Not fatal: the agent may race a client that just left.
                    st.send_error(id, format!("you do not share a tunnel with {to}"));
                }
            }
        }
        Ok(())
    }

    /// The stream `conn` of `id` ended: `graceful` (after `disconnect`)
    /// sends `DISCONNECTED` to tunnel peers, otherwise `LOST`. A no-op for
    /// a replaced or already removed stream.
    pub fn leave(&self, id: PeerId, conn: u64, graceful: bool) {
        let mut st = lock(&self.state);
        if st.peers.get(&id).is_none_or(|p| p.conn != conn) {
            return;
        }
        let (kind, reason) = if graceful {
            (PeerUpdateKind::Disconnected, "graceful disconnect")
        } else {
            (PeerUpdateKind::Lost, "lost")
        };
        st.remove(id, kind, reason);
        st.reap_slow();
    }

    /// Sends `PeerUpdate{id=agent, kind}` to every connected client with a
    /// tunnel to `agent` (fault injection). Returns how many got it.
    pub fn inject(&self, agent: PeerId, kind: PeerUpdateKind, reason: &str) -> usize {
        let mut st = lock(&self.state);
        let clients: Vec<PeerId> = st
            .tunnels
            .iter()
            .filter(|&&(_, d)| d == agent)
            .map(|&(s, _)| s)
            .filter(|s| st.peers.contains_key(s))
            .collect();
        for &c in &clients {
            st.send_update(c, update(agent, kind, None, reason));
        }
        st.reap_slow();
        clients.len()
    }

    /// Connected peers.
    pub fn peers(&self) -> Vec<PeerId> {
        lock(&self.state).peers.keys().copied().collect()
    }

    /// Connected clients with a tunnel to `agent`.
    pub fn clients_of(&self, agent: PeerId) -> Vec<PeerId> {
        let st = lock(&self.state);
        st.tunnels
            .iter()
            .filter(|&&(s, d)| d == agent && st.peers.contains_key(&s))
            .map(|&(s, _)| s)
            .collect()
    }

    /// The node `id` last sent, if connected.
    pub fn node(&self, id: PeerId) -> Option<Node> {
        lock(&self.state).peers.get(&id)?.node.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use coder_tailnet::proto::UpdateSelf;

    fn node(addr: &str) -> Node {
        Node {
            id: 7,
            preferred_derp: 999,
            addresses: vec![addr.into()],
            allowed_ips: vec![addr.into()],
            ..Node::default()
        }
    }

    fn kinds(rx: &mut mpsc::Receiver<CoordinateResponse>) -> Vec<(PeerUpdateKind, bool, String)> {
        let mut out = Vec::new();
        while let Ok(r) = rx.try_recv() {
            for u in r.peer_updates {
                let k = PeerUpdateKind::try_from(u.kind).unwrap_or(PeerUpdateKind::Unspecified);
                out.push((k, u.node.is_some(), u.reason));
            }
            if !r.error.is_empty() {
                out.push((PeerUpdateKind::Unspecified, false, r.error));
            }
        }
        out
    }

    #[test]
    fn tunnel_node_exchange_handshake_and_leave() {
        let c = Coordinator::default();
        let agent = PeerId::new_v4();
        let client = PeerId::new_v4();
        let (ac, mut arx) = c.connect(agent, Role::Agent);
        c.handle(
            agent,
            ac,
            &CoordinateRequest::update_self(node("fd7a:115c:a1e0::1/128")),
        )
        .unwrap();
        let (cc, mut crx) = c.connect(client, Role::Client { agent });
        c.handle(client, cc, &CoordinateRequest::add_tunnel(agent))
            .unwrap();
        assert_eq!(kinds(&mut crx)[0].0, PeerUpdateKind::Node);
        assert!(kinds(&mut arx).is_empty(), "client has no node yet");
        c.handle(
            client,
            cc,
            &CoordinateRequest::update_self(node("fd60:627a:a42b::9/128")),
        )
        .unwrap();
        assert_eq!(kinds(&mut arx)[0].0, PeerUpdateKind::Node);
        c.handle(agent, ac, &CoordinateRequest::ready_for_handshake([client]))
            .unwrap();
        let got = kinds(&mut crx);
        assert_eq!(got[0].0, PeerUpdateKind::ReadyForHandshake);
        assert!(!got[0].1, "node only with NODE");
        // Replaced stream: silent, and the old connection's leave is a no-op.
        let (cc2, _crx2) = c.connect(client, Role::Client { agent });
        c.leave(client, cc, false);
        assert!(kinds(&mut arx).is_empty());
        assert!(crx.try_recv().is_err());
        c.handle(client, cc2, &CoordinateRequest::add_tunnel(agent))
            .unwrap();
        c.leave(client, cc2, false);
        assert_eq!(kinds(&mut arx)[0].0, PeerUpdateKind::Lost);
    }

    #[test]
    fn agent_arriving_after_its_client_gets_the_client_node() {
        let c = Coordinator::default();
        let agent = PeerId::new_v4();
        let client = PeerId::new_v4();
        let (cc, mut crx) = c.connect(client, Role::Client { agent });
        c.handle(client, cc, &CoordinateRequest::add_tunnel(agent))
            .unwrap();
        c.handle(
            client,
            cc,
            &CoordinateRequest::update_self(node("fd60:627a:a42b::9/128")),
        )
        .unwrap();
        let (ac, mut arx) = c.connect(agent, Role::Agent);
        let got = kinds(&mut arx);
        assert_eq!(got.len(), 1, "{got:?}");
        assert_eq!(got[0].0, PeerUpdateKind::Node);
        c.handle(
            agent,
            ac,
            &CoordinateRequest::update_self(node("fd7a:115c:a1e0::1/128")),
        )
        .unwrap();
        assert_eq!(kinds(&mut crx)[0].0, PeerUpdateKind::Node);
    }

    #[test]
    fn refusals() {
        let c = Coordinator::default();
        let agent = PeerId::new_v4();
        let other = PeerId::new_v4();
        let client = PeerId::new_v4();
        let (cc, mut crx) = c.connect(client, Role::Client { agent });
        assert!(c
            .handle(client, cc, &CoordinateRequest::add_tunnel(other))
            .is_err());
        let bad = CoordinateRequest {
            update_self: Some(UpdateSelf {
                node: Some(node("fd60:627a:a42b::/64")),
            }),
            ..Default::default()
        };
        assert!(c.handle(client, cc, &bad).is_err());
        assert!(c
            .handle(client, cc, &CoordinateRequest::ready_for_handshake([agent]))
            .is_err());
        let errs = kinds(&mut crx);
        assert_eq!(errs.len(), 3);
        assert!(errs[0].2.contains("invalid agent id"), "{errs:?}");
        let (ac, mut arx) = c.connect(agent, Role::Agent);
        c.handle(agent, ac, &CoordinateRequest::ready_for_handshake([other]))
            .unwrap();
        assert!(kinds(&mut arx)[0].2.contains("do not share a tunnel"));
    }

    #[test]
    fn graceful_disconnect_and_injection() {
        let c = Coordinator::default();
        let agent = PeerId::new_v4();
        let client = PeerId::new_v4();
        let (ac, _arx) = c.connect(agent, Role::Agent);
        let (cc, mut crx) = c.connect(client, Role::Client { agent });
        c.handle(client, cc, &CoordinateRequest::add_tunnel(agent))
            .unwrap();
        assert_eq!(c.inject(agent, PeerUpdateKind::Lost, "sim"), 1);
        assert_eq!(kinds(&mut crx)[0].0, PeerUpdateKind::Lost);
        c.leave(agent, ac, true);
        assert_eq!(kinds(&mut crx)[0].0, PeerUpdateKind::Disconnected);
        // The client's tunnel survives the agent: a new agent stream gets
        // the client's node once it has one.
        assert_eq!(c.clients_of(agent), vec![client]);
    }
}
