//! [`Sim`]: the handle tests hold — starts the HTTP server, adds workspaces
//! (with one SSH endpoint per agent), scripts state changes and injects
//! faults, and exposes what the server saw.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use rand::distributions::Alphanumeric;
use rand::Rng;
use tokio::sync::{broadcast, watch};
use uuid::Uuid;

use crate::endpoint::AgentEndpoint;
use crate::model::{AgentStatus, Lifecycle, Transition};
use crate::spec::{ApiFault, LoggedRequest, Route, SimOptions, WorkspaceSpec};
use crate::state::{lock, Shared, World};
use crate::tailnet::{self, Tailnet};
use coder_tailnet::derp::{DerpServer, NodePublic};
use coder_tailnet::proto::{Node, PeerUpdateKind};

/// A running simulated Coder deployment. Cheap to clone.
#[derive(Clone)]
pub struct Sim {
    shared: Arc<Shared>,
    /// Tells the HTTP servers to stop accepting and close idle connections.
    stop: Arc<watch::Sender<bool>>,
}

impl std::fmt::Debug for Sim {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sim")
            .field("url", &self.shared.url)
            .field("owner", &self.shared.owner)
            .finish_non_exhaustive()
    }
}

fn random_token() -> String {
    let mut rng = rand::thread_rng();
    let id: String = (&mut rng)
        .sample_iter(&Alphanumeric)
        .take(10)
        .map(char::from)
        .collect();
    let secret: String = (&mut rng)
        .sample_iter(&Alphanumeric)
        .take(22)
        .map(char::from)
        .collect();
    format!("{id}-{secret}")
}

/// Serves `app` on `listener` until `stop` turns true (gracefully: idle
/// connections close, upgraded ones are the sim's to end).
fn serve_until(
    listener: tokio::net::TcpListener,
    app: axum::Router,
    mut stop: watch::Receiver<bool>,
    what: &'static str,
) {
    tokio::spawn(async move {
        let stopped = async move {
            // Every `Sim` handle gone without a shutdown: keep serving.
            if stop.wait_for(|s| *s).await.is_err() {
                std::future::pending::<()>().await;
            }
        };
        // Like coderd (Go sets TCP_NODELAY on every connection): upgraded
        // DERP and websocket streams carry small frames that Nagle would hold.
        let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
            let _ = tcp.set_nodelay(true);
        });
        let serve = axum::serve(listener, app).with_graceful_shutdown(stopped);
        if let Err(e) = serve.await {
            log::error!("coder-sim: {what} stopped: {e}");
        }
    });
}

/// Usernames and workspace names as codersdk validates them.
fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 32
        && s.split('-')
            .all(|part| !part.is_empty() && part.chars().all(|c| c.is_ascii_alphanumeric()))
}

impl Sim {
    /// Starts a deployment on `127.0.0.1:0`.
    pub async fn start(opts: SimOptions) -> anyhow::Result<Sim> {
        Sim::start_on(SocketAddr::from(([127, 0, 0, 1], 0)), opts).await
    }

    /// Starts a deployment on a chosen address (the `serve` command's `--addr`).
    pub async fn start_on(addr: SocketAddr, opts: SimOptions) -> anyhow::Result<Sim> {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("bind {addr}"))?;
        let local = listener.local_addr()?;
        // The second DERP region listens on the same interface, any port.
        let proxy = match opts.agent_derp_region {
            Some(id) => {
                anyhow::ensure!(
                    id > 0 && id <= i64::from(i32::MAX) && id != i64::from(tailnet::DERP_REGION_ID),
                    "agent_derp_region {id}: want a positive i32 other than {}",
                    tailnet::DERP_REGION_ID
                );
                let l = tokio::net::TcpListener::bind(SocketAddr::new(addr.ip(), 0))
                    .await
                    .with_context(|| format!("bind the DERP region {id} listener"))?;
                let mut at = l.local_addr()?;
                if at.ip().is_unspecified() {
                    at.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
                }
                Some((id, l, at))
            }
            None => None,
        };
        let (events, _) = broadcast::channel(1024);
        let (cut, _) = watch::channel(0u64);
        let rt = tokio::runtime::Handle::current();
        let tailnet = Arc::new(Tailnet::new(
            local,
            proxy.as_ref().map(|(id, _, at)| (*id, *at)),
            rt.clone(),
        ));
        let shared = Arc::new(Shared {
            world: Mutex::new(World::new()),
            events,
            token: random_token(),
            owner: "alice".into(),
            url: format!("http://{local}"),
            opts,
            deployment_id: Uuid::new_v4(),
            fault: Mutex::new(ApiFault::None),
            requests: Mutex::new(Vec::new()),
            watchers: AtomicUsize::new(0),
            cut,
            rt,
            tasks: Mutex::new(Vec::new()),
            tailnet,
            race_next_build: std::sync::atomic::AtomicBool::new(false),
            route_faults: Mutex::new(Vec::new()),
            watch_replay_stale: std::sync::atomic::AtomicBool::new(false),
            stale_replays: [AtomicUsize::new(0), AtomicUsize::new(0)],
        });
        lock(&shared.world).user_id("alice");
        let app = crate::api::router(shared.clone());
        let stop = Arc::new(watch::channel(false).0);
        serve_until(listener, app, stop.subscribe(), "server");
        if let Some((id, l, at)) = proxy {
            log::info!("coder-sim: DERP region {id} relay on http://{at}/derp");
            let app = crate::tailnet::http::proxy_router(shared.clone());
            serve_until(l, app, stop.subscribe(), "DERP region server");
        }
        Ok(Sim { shared, stop })
    }

    /// Stops accepting API connections (idle keep-alive connections close,
    /// hung requests stay hung), ends watch streams, stops every timer and
    /// every agent endpoint (killing their connections).
    pub fn shutdown(&self) {
        // A stored value: works even before the server tasks first poll.
        self.stop.send_replace(true);
        self.cut_watch_streams();
        for t in lock(&self.shared.tasks).drain(..) {
            t.abort();
        }
        let endpoints: Vec<Arc<AgentEndpoint>> = {
            let mut w = lock(&self.shared.world);
            w.workspaces
                .iter_mut()
                .flat_map(|ws| std::mem::take(&mut ws.endpoints).into_values())
                .collect()
        };
        for ep in &endpoints {
            ep.set_accepting(false);
            ep.kill_connections();
        }
        self.shared.tailnet.shutdown();
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        self.shared.url.clone()
    }

    /// A valid session token of the default user.
    pub fn token(&self) -> String {
        self.shared.token.clone()
    }

    /// The default user's username (`alice`).
    pub fn owner(&self) -> String {
        self.shared.owner.clone()
    }

    /// Adds a workspace and starts one SSH endpoint per agent.
    pub async fn add_workspace(&self, spec: WorkspaceSpec) -> anyhow::Result<()> {
        anyhow::ensure!(
            valid_name(&spec.name),
            "invalid workspace name {:?}",
            spec.name
        );
        if let Some(owner) = &spec.owner {
            anyhow::ensure!(valid_name(owner), "invalid owner name {owner:?}");
        }
        let mut names: Vec<&str> = spec.agents.iter().map(|a| a.name.as_str()).collect();
        names.sort_unstable();
        names.dedup();
        anyhow::ensure!(names.len() == spec.agents.len(), "duplicate agent names");
        for a in &spec.agents {
            anyhow::ensure!(valid_name(&a.name), "invalid agent name {:?}", a.name);
        }
        let mut endpoints = BTreeMap::new();
        for a in &spec.agents {
            let ep = AgentEndpoint::start(self.shared.opts.ssh)
                .await
                .with_context(|| format!("start SSH endpoint of agent {}", a.name))?;
            endpoints.insert(a.name.clone(), Arc::new(ep));
        }
        self.shared.insert_workspace(spec, endpoints)
    }

    fn endpoint(&self, workspace: &str, agent: &str) -> Option<Arc<AgentEndpoint>> {
        let w = lock(&self.shared.world);
        let i = w.ws_by_name(workspace)?;
        w.workspaces[i].endpoints.get(agent).cloned()
    }

    /// The agent's SSH endpoint (stable across builds).
    pub fn agent_addr(&self, workspace: &str, agent: &str) -> Option<SocketAddr> {
        self.endpoint(workspace, agent).map(|e| e.addr())
    }

    /// `tcp://127.0.0.1:PORT` of the agent's endpoint, for `--tunnel`.
    pub fn tunnel(&self, workspace: &str, agent: &str) -> Option<String> {
        self.agent_addr(workspace, agent)
            .map(|a| format!("tcp://{a}"))
    }

    /// Private key for `ssh -i` (OpenSSH backend only).
    pub fn client_key_path(&self, workspace: &str, agent: &str) -> Option<PathBuf> {
        self.endpoint(workspace, agent)?.client_key_path()
    }

    /// Live connections on the agent's endpoint.
    pub fn live_connections(&self, workspace: &str, agent: &str) -> usize {
        self.endpoint(workspace, agent)
            .map(|e| e.live_connections())
            .unwrap_or(0)
    }

    /// Aborts every live connection on the agent's endpoint (false: no such agent).
    pub fn kill_connections(&self, workspace: &str, agent: &str) -> bool {
        self.endpoint(workspace, agent)
            .map(|e| e.kill_connections())
            .is_some()
    }

    /// Like [`Sim::kill_connections`], with a guaranteed TCP RST.
    pub fn reset_connections(&self, workspace: &str, agent: &str) -> bool {
        self.endpoint(workspace, agent)
            .map(|e| e.reset_connections())
            .is_some()
    }

    /// Makes the agent's endpoint accept (or refuse) new connections, as the
    /// simulator does on its own when builds start and stop.
    pub fn set_accepting(&self, workspace: &str, agent: &str, yes: bool) -> bool {
        self.endpoint(workspace, agent)
            .map(|e| e.set_accepting(yes))
            .is_some()
    }

    /// Sets the control-plane status only; the SSH endpoint is untouched.
    pub fn set_agent_status(&self, ws: &str, agent: &str, s: AgentStatus) {
        if !self.shared.set_agent_status(ws, agent, s) {
            log::warn!("coder-sim: set_agent_status: no agent {ws}.{agent}");
        }
    }

    pub fn set_agent_lifecycle(&self, ws: &str, agent: &str, l: Lifecycle) {
        if !self.shared.set_agent_lifecycle(ws, agent, l) {
            log::warn!("coder-sim: set_agent_lifecycle: no agent {ws}.{agent}");
        }
    }

    /// Queues a stop build (even if one is running).
    pub fn stop_workspace(&self, ws: &str) {
        if !self
            .shared
            .scripted_build(ws, Transition::Stop, "initiator")
        {
            log::warn!("coder-sim: stop_workspace: no workspace {ws}");
        }
    }

    /// Queues a start build, as autostart does, even if already running.
    pub fn start_workspace(&self, ws: &str) {
        if !self
            .shared
            .scripted_build(ws, Transition::Start, "autostart")
        {
            log::warn!("coder-sim: start_workspace: no workspace {ws}");
        }
    }

    /// Makes the next `POST /workspaces/{id}/builds` lose a race: just before
    /// it is handled, another client's start build is queued, so the request
    /// gets coderd's 409 (a build is already in progress).
    pub fn race_next_build(&self) {
        self.shared
            .race_next_build
            .store(true, std::sync::atomic::Ordering::SeqCst);
    }

    /// Queues a delete build; once it succeeds the name lookup is a 404.
    pub fn delete_workspace(&self, ws: &str) {
        if !self
            .shared
            .scripted_build(ws, Transition::Delete, "initiator")
        {
            log::warn!("coder-sim: delete_workspace: no workspace {ws}");
        }
    }

    /// Applies to every `/api/v2` request from now on.
    pub fn set_api_fault(&self, f: ApiFault) {
        *lock(&self.shared.fault) = f;
    }

    /// For the next `dur`, `route` answers `status` with a load balancer's
    /// HTML error page (as one in front of a restarting coderd does), before
    /// auth and before any upgrade; other routes are unaffected. A later call
    /// for the same route replaces the earlier one; `Duration::ZERO` clears it.
    pub fn fail_route(&self, route: Route, status: u16, dur: Duration) {
        let mut f = lock(&self.shared.route_faults);
        f.retain(|(r, _, _)| *r != route);
        if !dur.is_zero() {
            f.push((route, status, std::time::Instant::now() + dur));
        }
    }

    /// When on, every watch stream opened from now on first sends the
    /// workspace with its *previous* build shown as a succeeded stop
    /// (`stopped`), then, after a pause, the current state: the ordering a
    /// client sees when a replayed, stale snapshot arrives first. Streams
    /// already open are unaffected.
    pub fn set_watch_replays_stale_stop(&self, on: bool) {
        self.shared
            .watch_replay_stale
            .store(on, std::sync::atomic::Ordering::SeqCst);
    }

    /// Watch streams that have sent the first frame of a stale replay (the
    /// previous build as stopped).
    pub fn stale_replays_begun(&self) -> usize {
        self.shared.stale_replays[0].load(Ordering::SeqCst)
    }

    /// Watch streams that have sent both frames of a stale replay (the
    /// previous build as stopped, then the current state); a client that
    /// hung up on the stale frame never gets the second.
    pub fn stale_replays_delivered(&self) -> usize {
        self.shared.stale_replays[1].load(Ordering::SeqCst)
    }

    /// Ends every open watch stream now, abruptly (no final chunk).
    pub fn cut_watch_streams(&self) {
        self.shared.cut.send_modify(|n| *n += 1);
    }

    /// Open watch streams.
    pub fn watch_subscribers(&self) -> usize {
        self.shared.watchers.load(Ordering::SeqCst)
    }

    /// Every request so far, oldest first.
    pub fn request_log(&self) -> Vec<LoggedRequest> {
        lock(&self.shared.requests).clone()
    }

    /// `POST /workspaces/{id}/usage` calls for this workspace.
    pub fn usage_count(&self, ws: &str) -> usize {
        let w = lock(&self.shared.world);
        w.ws_by_name(ws).map(|i| w.workspaces[i].usage).unwrap_or(0)
    }

    /// The workspace as `GET /workspaces/{id}` renders it (deleted ones too).
    pub fn workspace_json(&self, ws: &str) -> Option<serde_json::Value> {
        let w = lock(&self.shared.world);
        let rendered = w.render_workspace(w.ws_by_name(ws)?)?;
        serde_json::to_value(rendered).ok()
    }

    /// The workspace's id.
    pub fn workspace_id(&self, ws: &str) -> Option<String> {
        let w = lock(&self.shared.world);
        w.ws_by_name(ws).map(|i| w.workspaces[i].id.to_string())
    }

    /// Waits until `f(workspace_json)` holds; false on timeout.
    pub async fn wait_for<F: Fn(&serde_json::Value) -> bool>(
        &self,
        ws: &str,
        f: F,
        timeout: Duration,
    ) -> bool {
        let mut events = self.shared.events.subscribe();
        let check = || self.workspace_json(ws).is_some_and(|v| f(&v));
        let wait = async {
            loop {
                if check() {
                    return;
                }
                // Re-check on every event, and now and then regardless.
                let _ = tokio::time::timeout(Duration::from_millis(200), events.recv()).await;
            }
        };
        tokio::time::timeout(timeout, wait).await.is_ok()
    }

    // ----- tailnet ----------------------------------------------------------

    /// The workspace's id and its current agent's id (newest build with
    /// that agent).
    fn agent_ids(&self, ws: &str, agent: &str) -> Option<(Uuid, Uuid)> {
        let mut w = lock(&self.shared.world);
        let i = w.ws_by_name(ws)?;
        let ws_id = w.workspaces[i].id;
        let agent_id = w.current_agent_mut(i, agent)?.id;
        Some((ws_id, agent_id))
    }

    /// The id of the workspace's current agent of that name.
    pub fn agent_id(&self, ws: &str, agent: &str) -> Option<Uuid> {
        self.agent_ids(ws, agent).map(|(_, a)| a)
    }

    /// Node key of the agent's tailnet peer, while it runs (a start build
    /// succeeded and no stop has taken effect).
    pub fn agent_node_key(&self, ws: &str, agent: &str) -> Option<NodePublic> {
        let (ws_id, _) = self.agent_ids(ws, agent)?;
        self.shared.tailnet.with_agent(ws_id, agent, |p| p.key())
    }

    /// The embedded DERP relay (for finer checks: `is_connected`,
    /// `wait_connected`, `stats`, Health/Restarting frames).
    pub fn derp_server(&self) -> DerpServer {
        self.shared.tailnet.derp.clone()
    }

    /// The relay of a DERP region: [`Sim::derp_server`] for 999, the
    /// second relay for [`SimOptions::agent_derp_region`]; `None` for any
    /// other id.
    pub fn derp_region_server(&self, region: i64) -> Option<DerpServer> {
        self.shared.tailnet.relay(region)
    }

    /// The region the fake agents home on (their node's `preferred_derp`):
    /// [`SimOptions::agent_derp_region`] if set, else 999.
    pub fn agent_derp_region(&self) -> i64 {
        self.shared.tailnet.agent_region()
    }

    /// `http://HOST:PORT/derp` of the second region's relay, if any.
    pub fn proxy_derp_url(&self) -> Option<String> {
        let p = self.shared.tailnet.proxy.as_ref()?;
        Some(format!("http://{}/derp", p.addr))
    }

    /// DERP regions the agent's tailnet peer holds a live connection to
    /// (its home region, plus one per client home region it sends to).
    pub fn agent_derp_regions(&self, ws: &str, agent: &str) -> Vec<i64> {
        let Some((ws_id, _)) = self.agent_ids(ws, agent) else {
            return Vec::new();
        };
        self.shared
            .tailnet
            .with_agent(ws_id, agent, |p| p.derp_regions())
            .unwrap_or_default()
    }

    /// WireGuard datagrams the agent's tailnet peer received from clients,
    /// by the DERP region they arrived through (since the peer started).
    pub fn agent_packets_by_region(&self, ws: &str, agent: &str) -> BTreeMap<i64, u64> {
        let Some((ws_id, _)) = self.agent_ids(ws, agent) else {
            return BTreeMap::new();
        };
        self.shared
            .tailnet
            .with_agent(ws_id, agent, |p| p.packets_by_region())
            .unwrap_or_default()
    }

    /// Cuts every coordinate websocket at the transport (no close frame);
    /// clients are expected to redial. Returns how many were cut.
    pub fn drop_coordinate_connections(&self) -> usize {
        self.shared.tailnet.drop_coordinate_connections()
    }

    /// Drops every DERP connection (the fake agents' too; both regions'
    /// relays) as a relay restart would; the relays keep their keys and
    /// accept reconnections at once. Returns how many connections were
    /// dropped.
    pub fn restart_derp(&self) -> usize {
        self.shared.tailnet.restart_derp()
    }

    /// Node keys of the agent's connected tailnet clients (as their
    /// `update_self` announced them).
    pub fn tailnet_client_keys(&self, ws: &str, agent: &str) -> Vec<NodePublic> {
        self.tailnet_clients(ws, agent)
            .into_iter()
            .filter_map(|p| self.coordinator_node(p)?.node_key().ok())
            .collect()
    }

    /// Makes the relay connections of the agent's tailnet clients silently
    /// dead: open, but never read from or written to again (the fake
    /// agent's own connections stay healthy). Returns how many froze.
    pub fn freeze_client_derp(&self, ws: &str, agent: &str) -> usize {
        let keys = self.tailnet_client_keys(ws, agent);
        self.shared.tailnet.freeze_derp(&keys)
    }

    /// Closes the relay connections of the agent's tailnet clients (not the
    /// agent's). Returns how many keys had one.
    pub fn drop_client_derp(&self, ws: &str, agent: &str) -> usize {
        let keys = self.tailnet_client_keys(ws, agent);
        self.shared.tailnet.drop_derp(&keys)
    }

    /// Every relay drops new connections (before the DERP greeting) for
    /// `d` from now; live ones are untouched. See
    /// [`DerpServer::refused_at`] for when each attempt came.
    pub fn refuse_derp_for(&self, d: Duration) {
        self.shared.tailnet.refuse_derp_for(d);
    }

    /// Resets (RST) the TCP connections inside the agent's tailnet tunnels
    /// (not the SSH endpoint's). Returns how many engines were reset.
    pub fn reset_tailnet_streams(&self, ws: &str, agent: &str) -> usize {
        let Some((ws_id, _)) = self.agent_ids(ws, agent) else {
            return 0;
        };
        self.shared
            .tailnet
            .with_agent(ws_id, agent, |p| p.reset_streams())
            .unwrap_or(0)
    }

    /// Sets `derp_force_websockets` in the connection info, so clients use
    /// the relay's websocket (`derp` subprotocol) instead of `Upgrade: DERP`.
    pub fn set_derp_force_websockets(&self, yes: bool) {
        self.shared
            .tailnet
            .force_websockets
            .store(yes, std::sync::atomic::Ordering::Relaxed);
    }

    /// Sends `PeerUpdate{id = agent, kind}` (normally `Lost` or
    /// `Disconnected`) to every client with a tunnel to the workspace's
    /// current agent, without touching the agent itself. Returns how many
    /// clients got it.
    pub fn send_peer_update(&self, ws: &str, agent: &str, kind: PeerUpdateKind) -> usize {
        match self.agent_ids(ws, agent) {
            Some((_, a)) => self
                .shared
                .tailnet
                .send_peer_update(tailnet::peer_id(a), kind),
            None => {
                log::warn!("coder-sim: send_peer_update: no agent {ws}.{agent}");
                0
            }
        }
    }

    /// When the fake agents answer a client's node with
    /// `ready_for_handshake`: `Some(d)` after `d` (default: `Some(ZERO)`,
    /// at once), `None` never — clients must fall back to their 5 s rule.
    /// Applies to nodes that arrive afterwards (and to answers still
    /// waiting out a delay, which a later `None` cancels).
    pub fn set_ready_for_handshake_delay(&self, delay: Option<Duration>) {
        self.shared.tailnet.set_handshake_delay(delay);
    }

    /// Live coordinate websockets.
    pub fn coordinate_connections(&self) -> usize {
        self.shared.tailnet.coordinate_connections()
    }

    /// Peer ids of the live coordinate websockets for this agent.
    pub fn coordinate_peers(&self, ws: &str, agent: &str) -> Vec<Uuid> {
        match self.agent_ids(ws, agent) {
            Some((_, a)) => self
                .shared
                .tailnet
                .coordinate_peers(tailnet::peer_id(a))
                .into_iter()
                .map(tailnet::uuid)
                .collect(),
            None => Vec::new(),
        }
    }

    /// Node keys connected to the DERP relay (fake agents included).
    pub fn derp_clients(&self) -> usize {
        self.shared.tailnet.derp.connected().len()
    }

    /// Streams through the agent's tailnet peer that are bridged to its
    /// SSH endpoint right now.
    pub fn tailnet_streams(&self, ws: &str, agent: &str) -> usize {
        let Some((ws_id, _)) = self.agent_ids(ws, agent) else {
            return 0;
        };
        self.shared
            .tailnet
            .with_agent(ws_id, agent, |p| p.live_streams())
            .unwrap_or(0)
    }

    /// dRPC methods called on coordinate websockets so far, oldest first.
    pub fn tailnet_rpcs(&self) -> Vec<String> {
        lock(&self.shared.tailnet.rpcs).clone()
    }

    /// Peers connected to the coordinator (clients and fake agents).
    pub fn coordinator_peers(&self) -> Vec<Uuid> {
        self.shared
            .tailnet
            .coord
            .peers()
            .into_iter()
            .map(tailnet::uuid)
            .collect()
    }

    /// Connected clients with a tunnel to the agent.
    pub fn tailnet_clients(&self, ws: &str, agent: &str) -> Vec<Uuid> {
        match self.agent_ids(ws, agent) {
            Some((_, a)) => self
                .shared
                .tailnet
                .coord
                .clients_of(tailnet::peer_id(a))
                .into_iter()
                .map(tailnet::uuid)
                .collect(),
            None => Vec::new(),
        }
    }

    /// The node a coordinating peer last sent (`update_self`).
    pub fn coordinator_node(&self, peer: Uuid) -> Option<Node> {
        self.shared.tailnet.coord.node(tailnet::peer_id(peer))
    }

    /// Client node keys the agent's tailnet peer runs a WireGuard engine for.
    pub fn agent_engine_keys(&self, ws: &str, agent: &str) -> Vec<NodePublic> {
        let Some((ws_id, _)) = self.agent_ids(ws, agent) else {
            return Vec::new();
        };
        self.shared
            .tailnet
            .with_agent(ws_id, agent, |p| p.engine_keys())
            .unwrap_or_default()
    }
}
