//! A test client for the simulator's tailnet side, assembled from
//! coder-tailnet's pieces the way a native client uses them: websocket
//! dial, yamux client, dRPC calls, DERP over `Upgrade: DERP` or websocket,
//! and a WireGuard engine wired to a DERP connection.

#![allow(dead_code)] // each test binary uses a subset

use std::net::Ipv6Addr;
use std::time::Duration;

use coder_sim::{Sim, WorkspaceSpec};
use coder_tailnet::derp::{
    self, ClientOptions, DerpClient, DerpSender, DiscoPublic, Event, NodePrivate, NodePublic,
    Upgraded,
};
use coder_tailnet::drpc::{self, MessageReceiver, MessageSender};
use coder_tailnet::proto::{
    method, CoordinateRequest, CoordinateResponse, Node, PeerId, PeerUpdate, PeerUpdateKind,
    RefreshResumeTokenRequest, RefreshResumeTokenResponse,
};
use coder_tailnet::ws::WsStream;
use coder_tailnet::{addr, wg, yamux};
use prost::Message;
use serde_json::Value;
use tokio::io::{ReadHalf, WriteHalf};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::Error as WsError;

pub const WAIT: Duration = Duration::from_secs(10);

pub async fn sim_with_dev() -> Sim {
    let sim = Sim::start(Default::default()).await.expect("start sim");
    sim.add_workspace(WorkspaceSpec::new("dev"))
        .await
        .expect("add workspace");
    sim
}

/// A sim whose agents home on a second DERP region, `region`.
pub async fn sim_with_dev_in_region(region: i64) -> Sim {
    let opts = coder_sim::SimOptions {
        agent_derp_region: Some(region),
        ..Default::default()
    };
    let sim = Sim::start(opts).await.expect("start sim");
    sim.add_workspace(WorkspaceSpec::new("dev"))
        .await
        .expect("add workspace");
    sim
}

/// `HOST:PORT` of the second region's relay.
pub fn proxy_host_port(sim: &Sim) -> String {
    let url = sim.proxy_derp_url().expect("a second DERP region");
    url.trim_start_matches("http://")
        .trim_end_matches("/derp")
        .to_string()
}

/// DERP login over `Upgrade: DERP` to any `HOST:PORT`.
pub async fn derp_http_at(hp: &str, private: &NodePrivate) -> DerpClient<Upgraded<TcpStream>> {
    let tcp = TcpStream::connect(hp).await.expect("tcp connect");
    derp::connect_http(tcp, hp, &[], private, ClientOptions::default())
        .await
        .expect("DERP login")
}

pub fn host_port(sim: &Sim) -> String {
    sim.url().trim_start_matches("http://").to_string()
}

/// Waits until `f()` holds (polling); false on timeout.
pub async fn eventually(mut f: impl FnMut() -> bool, limit: Duration) -> bool {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if f() {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub type Ws = WsStream<TcpStream>;

/// Dials a websocket at `path` (with query); `Err((status, json body))`
/// when the server refuses the upgrade.
pub async fn ws_dial(
    sim: &Sim,
    path: &str,
    token: Option<&str>,
    protocol: Option<&str>,
) -> Result<(Ws, Option<String>), (u16, Value)> {
    let hp = host_port(sim);
    let mut req = format!("ws://{hp}{path}")
        .into_client_request()
        .expect("request");
    if let Some(t) = token {
        req.headers_mut()
            .insert("Coder-Session-Token", HeaderValue::from_str(t).unwrap());
    }
    if let Some(p) = protocol {
        req.headers_mut()
            .insert("Sec-WebSocket-Protocol", HeaderValue::from_str(p).unwrap());
    }
    let tcp = TcpStream::connect(&hp).await.expect("tcp connect");
    match tokio_tungstenite::client_async(req, tcp).await {
        Ok((ws, resp)) => {
            let proto = resp
                .headers()
                .get("Sec-WebSocket-Protocol")
                .and_then(|v| v.to_str().ok())
                .map(str::to_string);
            Ok((WsStream::new(ws), proto))
        }
        Err(WsError::Http(resp)) => {
            let status = resp.status().as_u16();
            let body = resp
                .body()
                .as_ref()
                .and_then(|b| serde_json::from_slice(b).ok())
                .unwrap_or(Value::Null);
            Err((status, body))
        }
        Err(e) => panic!("websocket dial failed: {e}"),
    }
}

pub fn coordinate_path(agent: &str, version: Option<&str>, resume: Option<&str>) -> String {
    let mut q = Vec::new();
    if let Some(v) = version {
        q.push(format!("version={v}"));
    }
    if let Some(t) = resume {
        q.push(format!("resume_token={t}"));
    }
    format!("/api/v2/workspaceagents/{agent}/coordinate?{}", q.join("&"))
}

/// A yamux client session over a coordinate websocket.
pub async fn coordinate_session(sim: &Sim, agent: &str, resume: Option<&str>) -> yamux::Session {
    let (ws, _) = ws_dial(
        sim,
        &coordinate_path(agent, Some("2.0"), resume),
        Some(&sim.token()),
        None,
    )
    .await
    .expect("coordinate dial");
    yamux::Session::client(ws, yamux::Config::default())
}

pub async fn refresh_token(session: &yamux::Session) -> RefreshResumeTokenResponse {
    let bytes = drpc::unary_on(
        session,
        method::REFRESH_RESUME_TOKEN,
        &RefreshResumeTokenRequest {}.encode_to_vec(),
    )
    .await
    .expect("RefreshResumeToken");
    RefreshResumeTokenResponse::decode(bytes.as_slice()).expect("decode")
}

/// The Coordinate call of a client.
pub struct Coordinate {
    pub tx: MessageSender<WriteHalf<yamux::Stream>>,
    pub rx: MessageReceiver<ReadHalf<yamux::Stream>>,
    /// Updates read but not yet asked for.
    pub backlog: Vec<PeerUpdate>,
    pub errors: Vec<String>,
}

impl Coordinate {
    pub async fn open(session: &yamux::Session) -> Coordinate {
        let stream = session.open().await.expect("open stream");
        let (tx, rx) = drpc::bidi(stream, method::COORDINATE)
            .await
            .expect("Coordinate");
        Coordinate {
            tx,
            rx,
            backlog: Vec::new(),
            errors: Vec::new(),
        }
    }

    pub async fn send(&mut self, req: CoordinateRequest) {
        self.tx.send(&req.encode_to_vec()).await.expect("send");
    }

    /// Next response; `None` when the server ended the call.
    pub async fn recv(&mut self) -> Option<CoordinateResponse> {
        match tokio::time::timeout(WAIT, self.rx.recv()).await {
            Ok(Ok(Some(b))) => Some(CoordinateResponse::decode(b.as_slice()).expect("decode")),
            Ok(Ok(None)) | Ok(Err(_)) => None,
            Err(_) => panic!("no coordinate response within {WAIT:?}"),
        }
    }

    /// The next update of `kind` (others are kept in the backlog).
    pub async fn next(&mut self, kind: PeerUpdateKind) -> PeerUpdate {
        self.next_within(kind, WAIT)
            .await
            .unwrap_or_else(|| panic!("no {kind:?} update within {WAIT:?}"))
    }

    pub async fn next_within(
        &mut self,
        kind: PeerUpdateKind,
        limit: Duration,
    ) -> Option<PeerUpdate> {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            if let Some(i) = self.backlog.iter().position(|u| u.kind == kind as i32) {
                return Some(self.backlog.remove(i));
            }
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let r = match tokio::time::timeout(left, self.rx.recv()).await {
                Ok(Ok(Some(b))) => CoordinateResponse::decode(b.as_slice()).expect("decode"),
                Ok(_) => return None,
                Err(_) => return None,
            };
            if !r.error.is_empty() {
                self.errors.push(r.error);
            }
            self.backlog.extend(r.peer_updates);
        }
    }
}

/// A client's identity on the tailnet.
pub struct Client {
    pub private: NodePrivate,
    pub ip: Ipv6Addr,
}

impl Client {
    pub fn new() -> Client {
        Client {
            private: NodePrivate::generate(),
            ip: addr::client_addr(None),
        }
    }

    pub fn node(&self) -> Node {
        let prefix = format!("{}/128", self.ip);
        Node {
            id: addr::random_node_id(),
            key: self.private.public().to_wire(),
            disco: DiscoPublic::random().to_text(),
            preferred_derp: 999,
            addresses: vec![prefix.clone()],
            allowed_ips: vec![prefix],
            ..Node::default()
        }
    }
}

/// DERP login over `GET /derp` + `Upgrade: DERP`.
pub async fn derp_http(sim: &Sim, private: &NodePrivate) -> DerpClient<Upgraded<TcpStream>> {
    let hp = host_port(sim);
    let tcp = TcpStream::connect(&hp).await.expect("tcp connect");
    derp::connect_http(tcp, &hp, &[], private, ClientOptions::default())
        .await
        .expect("DERP login")
}

/// Carries a WireGuard engine's datagrams over a DERP connection that can
/// be replaced (after a relay restart) without touching the engine.
pub struct Pump {
    current: watch::Sender<Option<DerpSender>>,
    inbound: mpsc::Sender<Vec<u8>>,
    peer: NodePublic,
    up: tokio::task::JoinHandle<()>,
}

impl Pump {
    pub fn new(
        inbound: mpsc::Sender<Vec<u8>>,
        mut outbound: mpsc::Receiver<Vec<u8>>,
        peer: NodePublic,
    ) -> Pump {
        let current = watch::channel::<Option<DerpSender>>(None).0;
        let mut rx = current.subscribe();
        let up = tokio::spawn(async move {
            while let Some(p) = outbound.recv().await {
                let s = rx.borrow_and_update().clone();
                if let Some(s) = s {
                    let _ = s.send(&peer, &p).await;
                }
            }
        });
        Pump {
            current,
            inbound,
            peer,
            up,
        }
    }

    /// Starts using `client`; the previous connection is forgotten.
    pub fn attach(&self, client: DerpClient<Upgraded<TcpStream>>) {
        let (sender, mut receiver) = client.into_split();
        self.current.send_replace(Some(sender));
        let inbound = self.inbound.clone();
        let peer = self.peer;
        tokio::spawn(async move {
            loop {
                match receiver.recv().await {
                    Ok(Event::Packet { src, data }) if src == peer => {
                        if inbound.send(data).await.is_err() {
                            break;
                        }
                    }
                    Ok(_) => {}
                    Err(_) => break,
                }
            }
        });
    }
}

impl Drop for Pump {
    fn drop(&mut self) {
        self.up.abort();
    }
}

/// Starts a Connect-role engine to the agent's SSH port.
pub fn client_engine(
    client: &Client,
    agent_key: &NodePublic,
    agent: &PeerId,
) -> (wg::Handle, mpsc::Receiver<Vec<u8>>) {
    let (out_tx, out_rx) = mpsc::channel(1024);
    let h = wg::spawn(
        wg::Config::new(
            client.private.to_raw(),
            *agent_key.as_bytes(),
            client.ip,
            addr::agent_addr(agent),
            wg::Role::Connect {
                port: addr::AGENT_SSH_PORT,
            },
        ),
        out_tx,
    );
    (h, out_rx)
}
