//! Userspace WireGuard plus a userspace TCP/IP stack for one peer.
//!
//! [`spawn`] runs an engine task that owns a boringtun `Tunn` (Noise IKpsk2
//! with our node key) and a smoltcp interface (IPv6, MTU 1280). WireGuard
//! datagrams come in and go out over plain channels, so the engine does not
//! care whether they travel over DERP, UDP or an in-memory pipe. TCP
//! connections are bridged to tokio `DuplexStream`s: in the `Connect` role
//! the engine dials one connection (the agent's SSH server on port 1); in the
//! `Listen` role (coder-sim's fake agent) it hands out every accepted
//! connection.
//!
//! Liveness: with a persistent keepalive both sides hear from each other at
//! least every keepalive interval. When nothing at all has been received from
//! the peer for `dead_after` (default 120 s, covering WireGuard's 90 s of
//! handshake retries), the engine declares the data path dead and closes
//! every stream, with the reason on its `dead` channel. Only awake time
//! counts ([`crate::clock`]): a process that was stopped for three minutes
//! could not have heard anything, so it gets the whole bound again after
//! it wakes up. The reason is published *before* any stream sees its EOF,
//! in the Connect role also for a reset from the peer, so whoever reads
//! the stream can tell an end from a break at the moment it sees EOF.
//!
//! Datagrams leave through a [`Transmit`], which must never block: the
//! engine does not wait on its transport (a full or missing relay drops
//! the datagram; WireGuard and TCP retransmit). Inbound datagrams arrive
//! on a bounded channel. Both ends are `Send`, so the engine can move to a
//! thread of its own without changing its callers.
//!
//! The engine owns every task it starts (the per-stream bridges, in a
//! `JoinSet`): aborting the engine aborts them; when it stops by itself
//! they finish handing over what they hold, then end. [`Handle::close`] ends it gracefully: a
//! FIN on each connection, and a RST for those whose FIN is not
//! acknowledged within a bound.

use std::collections::VecDeque;
use std::net::{IpAddr, Ipv6Addr};
use std::sync::Arc;
use std::time::Duration;

use boringtun::noise::{Tunn, TunnResult};
use boringtun::x25519;
use smoltcp::iface::{Config as IfaceConfig, Interface, SocketHandle, SocketSet};
use smoltcp::phy::{Device, DeviceCapabilities, Medium, RxToken, TxToken};
use smoltcp::socket::tcp;
use smoltcp::wire::{HardwareAddress, IpAddress, IpCidr, IpEndpoint};
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
use tokio::sync::{mpsc, watch, Notify};
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::clock::PauseDetector;

/// IPv6 minimum MTU, as Coder's tailnet uses.
pub const MTU: usize = 1280;
/// Per-connection TCP buffer in each direction.
const TCP_BUF: usize = 256 * 1024;
/// Chunk size between the engine and a stream's bridge task.
const CHUNK: usize = 32 * 1024;
/// WireGuard timers want a tick about this often.
const TIMER_TICK: Duration = Duration::from_millis(250);
/// Why a Connect-role engine stops when the peer resets its connection.
const RESET_BY_PEER: &str = "the agent reset the TCP connection";

/// What the engine does with TCP.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// Dial `peer_ip:port` once.
    Connect { port: u16 },
    /// Accept connections on `local_ip:port`.
    Listen { port: u16 },
}

/// Engine configuration.
#[derive(Clone, Debug)]
pub struct Config {
    /// Our node private key (X25519), also our WireGuard static key.
    pub private_key: [u8; 32],
    /// The peer's node public key.
    pub peer_public_key: [u8; 32],
    pub local_ip: Ipv6Addr,
    pub peer_ip: Ipv6Addr,
    pub role: Role,
    /// WireGuard persistent keepalive, seconds.
    pub keepalive: Option<u16>,
    /// Declare the path dead after this long without any packet from the peer.
    pub dead_after: Duration,
    /// Index for boringtun's session IDs (any value unique per peer).
    pub index: u32,
    /// Abort (RST) a TCP connection that has data waiting to be sent or
    /// acknowledged while nothing has come from the peer for this long;
    /// `None` never gives up (the client: its dead-path rule decides). An
    /// idle connection is never aborted. coder-sim's agent sets it to behave
    /// like a real Coder agent, whose TCP stack stops after five
    /// unanswered retransmissions. (Not smoltcp's own socket timeout: that
    /// one also ends idle connections.)
    pub tcp_give_up: Option<Duration>,
}

impl Config {
    /// Defaults for everything but keys, addresses and role.
    pub fn new(
        private_key: [u8; 32],
        peer_public_key: [u8; 32],
        local_ip: Ipv6Addr,
        peer_ip: Ipv6Addr,
        role: Role,
    ) -> Config {
        Config {
            private_key,
            peer_public_key,
            local_ip,
            peer_ip,
            role,
            keepalive: Some(25),
            dead_after: Duration::from_secs(120),
            index: 1,
            tcp_give_up: None,
        }
    }
}

/// Where an engine's outbound WireGuard datagrams go. Called from the
/// engine's own task for every datagram, so it must not block: drop what
/// cannot be sent now.
pub trait Transmit: Send + Sync + 'static {
    fn transmit(&self, datagram: &[u8]);
}

/// A channel as the transport (tests, coder-sim's agent): full means the
/// datagram is dropped.
impl Transmit for mpsc::Sender<Vec<u8>> {
    fn transmit(&self, datagram: &[u8]) {
        let _ = self.try_send(datagram.to_vec());
    }
}

/// What the caller holds of a running engine.
pub struct Handle {
    /// Established TCP connections (one in the Connect role).
    pub streams: mpsc::Receiver<DuplexStream>,
    /// `Some(reason)` once the engine has stopped.
    pub dead: watch::Receiver<Option<String>>,
    /// Feed inbound WireGuard datagrams here.
    pub inbound: mpsc::Sender<Vec<u8>>,
    commands: mpsc::UnboundedSender<Command>,
    task: tokio::task::JoinHandle<()>,
}

/// What the owner of a [`Handle`] can ask of its running engine.
enum Command {
    /// Abort every TCP connection (RST to the peer).
    Reset,
    /// FIN every connection; RST those not acknowledged within the bound;
    /// then stop.
    Close(Duration),
}

impl Handle {
    /// Stop the engine and close its streams.
    pub fn abort(&self) {
        self.task.abort();
    }

    /// Resets (RST) every TCP connection of the engine; each app stream
    /// then reads EOF. The engine keeps running in the Listen role.
    pub fn reset_connections(&self) {
        let _ = self.commands.send(Command::Reset);
    }

    /// Closes every connection towards the peer — a FIN, or a RST for a
    /// connection whose FIN is not acknowledged within `fin_bound` — and
    /// waits (a little longer than that, at most) for the engine to stop.
    /// The datagrams carrying them are handed to the transport before it
    /// returns.
    pub async fn close(&mut self, fin_bound: Duration) {
        if self.commands.send(Command::Close(fin_bound)).is_err() {
            return;
        }
        let limit = fin_bound + Duration::from_millis(100);
        if tokio::time::timeout(limit, &mut self.task).await.is_err() {
            self.task.abort();
        }
    }
}

impl Drop for Handle {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Start an engine; outbound WireGuard datagrams go to `outbound`.
pub fn spawn(cfg: Config, outbound: impl Transmit) -> Handle {
    let (in_tx, in_rx) = mpsc::channel(256);
    let (streams_tx, streams_rx) = mpsc::channel(16);
    let (dead_tx, dead_rx) = watch::channel(None);
    let dead_tx = Arc::new(dead_tx);
    let (cmd_tx, cmd_rx) = mpsc::unbounded_channel();
    let task = tokio::spawn(async move {
        match Engine::new(cfg, Box::new(outbound), streams_tx, dead_tx.clone()) {
            Ok(mut e) => {
                let stop = e.run(in_rx, cmd_rx).await;
                // Before `e` (and with it every stream) is dropped.
                e.publish(&stop);
                // Bridges still hand the app what the engine passed them
                // (the last bytes before a FIN); each ends once drained,
                // or once the app drops its end. Only an aborted engine
                // aborts them.
                e.bridges.detach_all();
                match stop {
                    Stop::Failed(reason) => log::debug!("wireguard engine stopped: {reason}"),
                    // Not a failure: `dead` is dropped without a reason, and
                    // the stream's own EOF tells the caller.
                    Stop::Ended => {
                        log::debug!("wireguard engine stopped: the TCP connection ended")
                    }
                }
            }
            Err(reason) => {
                log::debug!("wireguard engine did not start: {reason}");
                dead_tx.send_replace(Some(reason));
            }
        }
    });
    Handle {
        streams: streams_rx,
        dead: dead_rx,
        inbound: in_tx,
        commands: cmd_tx,
        task,
    }
}

/// Why an engine stopped.
enum Stop {
    /// The Connect role's connection closed after both FINs: the stream
    /// ended normally, which its reader sees as EOF.
    Ended,
    /// The data path or the connection failed.
    Failed(String),
}

impl From<String> for Stop {
    fn from(reason: String) -> Stop {
        Stop::Failed(reason)
    }
}

impl From<&str> for Stop {
    fn from(reason: &str) -> Stop {
        Stop::Failed(reason.to_string())
    }
}

/// Packets between smoltcp and WireGuard.
#[derive(Default)]
struct Queues {
    rx: VecDeque<Vec<u8>>,
    tx: VecDeque<Vec<u8>>,
}

struct Rx(Vec<u8>);
struct Tx<'a>(&'a mut VecDeque<Vec<u8>>);

impl RxToken for Rx {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        f(&self.0)
    }
}

impl TxToken for Tx<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        let mut buf = vec![0u8; len];
        let r = f(&mut buf);
        self.0.push_back(buf);
        r
    }
}

impl Device for Queues {
    type RxToken<'a> = Rx;
    type TxToken<'a> = Tx<'a>;

    fn receive(&mut self, _: smoltcp::time::Instant) -> Option<(Rx, Tx<'_>)> {
        let p = self.rx.pop_front()?;
        Some((Rx(p), Tx(&mut self.tx)))
    }
    fn transmit(&mut self, _: smoltcp::time::Instant) -> Option<Tx<'_>> {
        Some(Tx(&mut self.tx))
    }
    fn capabilities(&self) -> DeviceCapabilities {
        let mut c = DeviceCapabilities::default();
        c.medium = Medium::Ip;
        c.max_transmission_unit = MTU;
        c
    }
}

/// One TCP connection and its bridge to a duplex stream.
struct Conn {
    handle: SocketHandle,
    /// Data read from the app, not yet accepted by the socket.
    pending: VecDeque<u8>,
    /// The app closed its write side.
    app_eof: bool,
    /// We already closed the socket's send side.
    fin_sent: bool,
    /// `None` once the peer's FIN was passed on as EOF.
    to_app: Option<mpsc::Sender<Vec<u8>>>,
    /// The peer closed its side with a FIN (not a reset).
    peer_fin: bool,
    /// Set once the connection was handed to the caller.
    announced: bool,
    /// Kept until the connection is established.
    app_end: Option<DuplexStream>,
    from_app: mpsc::Receiver<Option<Vec<u8>>>,
}

struct Engine {
    cfg: Config,
    tunn: Tunn,
    iface: Interface,
    dev: Queues,
    sockets: SocketSet<'static>,
    conns: Vec<Conn>,
    listener: Option<SocketHandle>,
    outbound: Box<dyn Transmit>,
    streams: mpsc::Sender<DuplexStream>,
    /// Where the death reason goes, the moment it is known.
    dead: Arc<watch::Sender<Option<String>>>,
    /// The per-stream bridge tasks; they end with the engine.
    bridges: JoinSet<()>,
    wake: Arc<Notify>,
    started: std::time::Instant,
    /// When the peer was last heard from, moved forward by pauses.
    last_rx: Instant,
    pause: PauseDetector,
    /// Set by [`Command::Close`]: when unacknowledged FINs become RSTs.
    closing: Option<Instant>,
    buf: Vec<u8>,
    next_port: u16,
    handshake_logged: bool,
}

fn tcp_socket() -> tcp::Socket<'static> {
    let mut s = tcp::Socket::new(
        tcp::SocketBuffer::new(vec![0; TCP_BUF]),
        tcp::SocketBuffer::new(vec![0; TCP_BUF]),
    );
    s.set_nagle_enabled(false);
    s.set_ack_delay(None);
    s
}

impl Engine {
    fn new(
        cfg: Config,
        outbound: Box<dyn Transmit>,
        streams: mpsc::Sender<DuplexStream>,
        dead: Arc<watch::Sender<Option<String>>>,
    ) -> Result<Engine, String> {
        let tunn = Tunn::new(
            x25519::StaticSecret::from(cfg.private_key),
            x25519::PublicKey::from(cfg.peer_public_key),
            None,
            cfg.keepalive,
            cfg.index,
            None,
        );
        let mut dev = Queues::default();
        let started = std::time::Instant::now();
        let mut iface = Interface::new(
            IfaceConfig::new(HardwareAddress::Ip),
            &mut dev,
            smoltcp::time::Instant::from_millis(0),
        );
        iface.update_ip_addrs(|a| {
            let _ = a.push(IpCidr::new(IpAddress::Ipv6(cfg.local_ip), 128));
        });
        iface
            .routes_mut()
            .add_default_ipv6_route(cfg.peer_ip)
            .map_err(|e| format!("route: {e}"))?;
        let mut e = Engine {
            tunn,
            iface,
            dev,
            sockets: SocketSet::new(Vec::new()),
            conns: Vec::new(),
            listener: None,
            outbound,
            streams,
            dead,
            bridges: JoinSet::new(),
            wake: Arc::new(Notify::new()),
            started,
            last_rx: Instant::now(),
            pause: PauseDetector::new(),
            closing: None,
            buf: vec![0u8; 65536 + 256],
            next_port: 40000 + (cfg.index % 20000) as u16,
            handshake_logged: false,
            cfg,
        };
        match e.cfg.role {
            Role::Connect { port } => e.dial(port)?,
            Role::Listen { port } => e.listen(port)?,
        }
        Ok(e)
    }

    fn now(&self) -> smoltcp::time::Instant {
        smoltcp::time::Instant::from_millis(self.started.elapsed().as_millis() as i64)
    }

    fn dial(&mut self, port: u16) -> Result<(), String> {
        let mut s = tcp_socket();
        self.next_port = self.next_port.wrapping_add(1).max(1024);
        s.connect(
            self.iface.context(),
            IpEndpoint::new(IpAddress::Ipv6(self.cfg.peer_ip), port),
            self.next_port,
        )
        .map_err(|e| format!("tcp connect: {e}"))?;
        let h = self.sockets.add(s);
        self.add_conn(h);
        Ok(())
    }

    fn listen(&mut self, port: u16) -> Result<(), String> {
        let mut s = tcp_socket();
        s.listen(port).map_err(|e| format!("tcp listen: {e}"))?;
        let h = self.sockets.add(s);
        self.listener = Some(h);
        Ok(())
    }

    fn add_conn(&mut self, handle: SocketHandle) {
        let (app, engine_end) = tokio::io::duplex(TCP_BUF);
        let (to_app_tx, mut to_app_rx) = mpsc::channel::<Vec<u8>>(8);
        let (from_app_tx, from_app_rx) = mpsc::channel::<Option<Vec<u8>>>(8);
        let wake = self.wake.clone();
        let (mut rd, mut wr) = tokio::io::split(engine_end);
        // Bridge: engine → app.
        let wake1 = wake.clone();
        self.bridges.spawn(async move {
            while let Some(chunk) = to_app_rx.recv().await {
                wake1.notify_one();
                if wr.write_all(&chunk).await.is_err() {
                    break;
                }
            }
            let _ = wr.shutdown().await;
        });
        // Bridge: app → engine.
        self.bridges.spawn(async move {
            let mut buf = vec![0u8; CHUNK];
            loop {
                match rd.read(&mut buf).await {
                    Ok(0) | Err(_) => {
                        let _ = from_app_tx.send(None).await;
                        wake.notify_one();
                        break;
                    }
                    Ok(n) => {
                        if from_app_tx.send(Some(buf[..n].to_vec())).await.is_err() {
                            break;
                        }
                        wake.notify_one();
                    }
                }
            }
        });
        self.conns.push(Conn {
            handle,
            pending: VecDeque::new(),
            app_eof: false,
            fin_sent: false,
            to_app: Some(to_app_tx),
            peer_fin: false,
            announced: false,
            app_end: Some(app),
            from_app: from_app_rx,
        });
    }

    /// Run until the data path dies or the caller goes away.
    async fn run(
        &mut self,
        mut inbound: mpsc::Receiver<Vec<u8>>,
        mut commands: mpsc::UnboundedReceiver<Command>,
    ) -> Stop {
        let mut timers = tokio::time::interval(TIMER_TICK);
        timers.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // A first handshake right away (Connect) so the path comes up fast.
        self.flush_handshake();
        loop {
            // Awake, this loop comes round at least every TIMER_TICK; a
            // longer gap is time we were stopped, when nothing could have
            // been heard.
            if let Err(gap) = self.pause.look() {
                self.last_rx += gap;
                log::info!(
                    "tailnet: the process did not run for {}s; that silence does not count against the agent",
                    gap.as_secs()
                );
            }
            if let Err(stop) = self.step().await {
                return stop;
            }
            if let Some(rst_at) = self.closing {
                if self.conns.iter().all(|c| self.fin_acked(c)) {
                    return Stop::Ended;
                }
                if Instant::now() >= rst_at {
                    log::debug!("wireguard: FIN not acknowledged in time; resetting");
                    self.abort_all();
                    // One more poll puts the RSTs on the wire.
                    let _ = self.step().await;
                    return Stop::Ended;
                }
            }
            if self.last_rx.elapsed() > self.cfg.dead_after {
                return Stop::Failed(format!(
                    "the WireGuard data path is dead: nothing received from the peer for {}s",
                    self.cfg.dead_after.as_secs()
                ));
            }
            let delay = self
                .iface
                .poll_delay(self.now(), &self.sockets)
                .map(|d| Duration::from_micros(d.total_micros()))
                .unwrap_or(TIMER_TICK)
                .min(TIMER_TICK);
            let wake = self.wake.clone();
            tokio::select! {
                pkt = inbound.recv() => match pkt {
                    Some(p) => {
                        self.decapsulate(&p);
                        // Drain whatever else is queued before polling.
                        while let Ok(p) = inbound.try_recv() {
                            self.decapsulate(&p);
                        }
                    }
                    None => return "the packet transport closed".into(),
                },
                Some(cmd) = commands.recv() => match cmd {
                    Command::Reset => self.abort_all(),
                    Command::Close(bound) => {
                        self.closing = Some(Instant::now() + bound);
                        for c in &mut self.conns {
                            // Whatever the app had not handed over yet is
                            // dropped: the session is ending.
                            c.pending.clear();
                            c.app_eof = true;
                            if !c.fin_sent {
                                self.sockets.get_mut::<tcp::Socket>(c.handle).close();
                                c.fin_sent = true;
                            }
                        }
                    }
                },
                _ = wake.notified() => {}
                _ = tokio::time::sleep(delay) => {}
                _ = timers.tick() => {
                    self.wireguard_timers();
                }
            }
        }
    }

    fn send_out(&self, pkt: &[u8]) {
        // The transport drops what it cannot take now; WireGuard and TCP
        // both tolerate a lost packet better than a stalled engine.
        self.outbound.transmit(pkt);
    }

    /// Publishes why the engine stopped, if it failed.
    fn publish(&self, stop: &Stop) {
        if let Stop::Failed(reason) = stop {
            self.dead.send_replace(Some(reason.clone()));
        }
    }

    fn abort_all(&mut self) {
        for c in &self.conns {
            self.sockets.get_mut::<tcp::Socket>(c.handle).abort();
        }
    }

    /// Our FIN (or RST) on `c` reached the peer: nothing more to send.
    fn fin_acked(&self, c: &Conn) -> bool {
        matches!(
            self.sockets.get::<tcp::Socket>(c.handle).state(),
            tcp::State::FinWait2 | tcp::State::TimeWait | tcp::State::Closed
        )
    }

    fn flush_handshake(&mut self) {
        if matches!(self.cfg.role, Role::Connect { .. }) {
            let mut buf = std::mem::take(&mut self.buf);
            if let TunnResult::WriteToNetwork(p) =
                self.tunn.format_handshake_initiation(&mut buf, false)
            {
                self.send_out(p);
            }
            self.buf = buf;
        }
    }

    fn wireguard_timers(&mut self) {
        let mut buf = std::mem::take(&mut self.buf);
        match self.tunn.update_timers(&mut buf) {
            TunnResult::WriteToNetwork(p) => self.send_out(p),
            TunnResult::Err(e) => log::debug!("wireguard timers: {e:?}"),
            _ => {}
        }
        self.buf = buf;
    }

    fn decapsulate(&mut self, datagram: &[u8]) {
        let mut buf = std::mem::take(&mut self.buf);
        let mut first = true;
        loop {
            let input: &[u8] = if first { datagram } else { &[] };
            first = false;
            match self.tunn.decapsulate(None, input, &mut buf) {
                TunnResult::WriteToNetwork(p) => {
                    self.last_rx = Instant::now();
                    self.send_out(p);
                    continue; // repeat with an empty datagram to flush queued packets
                }
                TunnResult::WriteToTunnelV6(p, src) => {
                    self.last_rx = Instant::now();
                    if IpAddr::V6(src) == IpAddr::V6(self.cfg.peer_ip) {
                        self.dev.rx.push_back(p.to_vec());
                    } else {
                        log::debug!("dropping a packet from unexpected source {src}");
                    }
                }
                TunnResult::WriteToTunnelV4(..) => {
                    self.last_rx = Instant::now();
                }
                TunnResult::Done => {
                    if !input.is_empty() {
                        // A keepalive or handshake completion.
                        self.last_rx = Instant::now();
                    }
                }
                TunnResult::Err(e) => log::debug!("wireguard decapsulate: {e:?}"),
            }
            break;
        }
        self.buf = buf;
        if !self.handshake_logged && self.tunn.stats().0.is_some() {
            self.handshake_logged = true;
            log::debug!(
                "wireguard: handshake complete {}ms after start",
                self.started.elapsed().as_millis()
            );
        }
    }

    /// Poll the stack, move data between sockets and apps, send packets.
    async fn step(&mut self) -> Result<(), Stop> {
        // App → sockets.
        for c in &mut self.conns {
            while c.pending.len() < CHUNK && !c.app_eof {
                match c.from_app.try_recv() {
                    Ok(Some(d)) => c.pending.extend(d),
                    Ok(None) | Err(mpsc::error::TryRecvError::Disconnected) => c.app_eof = true,
                    Err(mpsc::error::TryRecvError::Empty) => break,
                }
            }
        }
        for _ in 0..4 {
            let now = self.now();
            self.iface.poll(now, &mut self.dev, &mut self.sockets);
            let mut progressed = false;
            for c in &mut self.conns {
                let s = self.sockets.get_mut::<tcp::Socket>(c.handle);
                if s.can_send() && !c.pending.is_empty() {
                    let (a, b) = c.pending.as_slices();
                    let chunk = if a.is_empty() { b } else { a };
                    if let Ok(n) = s.send_slice(chunk) {
                        c.pending.drain(..n);
                        progressed |= n > 0;
                    }
                }
                if c.app_eof && c.pending.is_empty() && !c.fin_sent && s.may_send() {
                    s.close();
                    c.fin_sent = true;
                    progressed = true;
                }
                if let Some(to_app) = &c.to_app {
                    while s.can_recv() && to_app.capacity() > 0 {
                        let mut buf = vec![0u8; CHUNK];
                        match s.recv_slice(&mut buf) {
                            Ok(0) | Err(_) => break,
                            Ok(n) => {
                                buf.truncate(n);
                                let _ = to_app.try_send(buf);
                                progressed = true;
                            }
                        }
                    }
                    // The peer half-closed and everything was passed on:
                    // let the app read EOF.
                    if c.announced && !s.may_recv() && !s.can_recv() {
                        // A reset lands in Closed directly; a FIN never does.
                        c.peer_fin = s.state() != tcp::State::Closed;
                        if !c.peer_fin
                            && self.closing.is_none()
                            && matches!(self.cfg.role, Role::Connect { .. })
                        {
                            // Known before the app sees EOF, so it can tell
                            // this EOF from the end of the stream.
                            self.dead.send_replace(Some(RESET_BY_PEER.to_string()));
                        }
                        c.to_app = None;
                        progressed = true;
                    }
                }
            }
            // Encrypt and send what the stack produced.
            while let Some(p) = self.dev.tx.pop_front() {
                let mut buf = std::mem::take(&mut self.buf);
                match self.tunn.encapsulate(&p, &mut buf) {
                    TunnResult::WriteToNetwork(out) => self.send_out(out),
                    TunnResult::Err(e) => log::debug!("wireguard encapsulate: {e:?}"),
                    _ => {}
                }
                self.buf = buf;
            }
            if !progressed {
                break;
            }
        }
        self.housekeeping().await
    }

    /// Announce established connections, accept new ones, reap dead ones.
    async fn housekeeping(&mut self) -> Result<(), Stop> {
        if let Some(limit) = self.cfg.tcp_give_up {
            if self.last_rx.elapsed() >= limit {
                for c in &self.conns {
                    let s = self.sockets.get_mut::<tcp::Socket>(c.handle);
                    if s.send_queue() > 0 && s.state() != tcp::State::Closed {
                        log::debug!(
                            "tcp: data unanswered for {}s; aborting the connection",
                            limit.as_secs_f32()
                        );
                        s.abort();
                    }
                }
            }
        }
        // A listener that got a connection becomes a connection; listen again.
        if let Some(h) = self.listener {
            let s = self.sockets.get::<tcp::Socket>(h);
            if s.is_active() && s.state() != tcp::State::Listen {
                if let Role::Listen { port } = self.cfg.role {
                    self.add_conn(h);
                    self.listen(port)?;
                }
            }
        }
        let mut i = 0;
        while i < self.conns.len() {
            let state = self
                .sockets
                .get::<tcp::Socket>(self.conns[i].handle)
                .state();
            let c = &mut self.conns[i];
            // Established, or already past it: the handshake and the peer's
            // FIN can arrive in one poll (a client that sends nothing and
            // half-closes at once), and such a connection must still reach
            // the app, or nobody ever serves it.
            let was_established = matches!(
                state,
                tcp::State::Established
                    | tcp::State::FinWait1
                    | tcp::State::FinWait2
                    | tcp::State::CloseWait
                    | tcp::State::Closing
                    | tcp::State::LastAck
                    | tcp::State::TimeWait
            );
            if !c.announced && was_established {
                c.announced = true;
                if let Some(app) = c.app_end.take() {
                    if self.streams.send(app).await.is_err() {
                        return Err("the caller went away".into());
                    }
                }
            }
            // In TIME-WAIT the socket may still hold data the app has not
            // taken (its channel was full): keep it until the EOF was passed.
            let closed = state == tcp::State::Closed
                || (state == tcp::State::TimeWait && c.to_app.is_none());
            if closed {
                let c = self.conns.remove(i);
                if !c.announced {
                    if let Role::Connect { .. } = self.cfg.role {
                        return Err("the agent refused or reset the TCP connection".into());
                    }
                }
                self.sockets.remove(c.handle);
                // Dropping `to_app` ends the app's read side.
                if let Role::Connect { .. } = self.cfg.role {
                    return Err(if c.peer_fin || self.closing.is_some() {
                        Stop::Ended
                    } else {
                        RESET_BY_PEER.into()
                    });
                }
                continue;
            }
            i += 1;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keypair(seed: u8) -> ([u8; 32], [u8; 32]) {
        let secret = x25519::StaticSecret::from([seed; 32]);
        let public = x25519::PublicKey::from(&secret);
        (secret.to_bytes(), public.to_bytes())
    }

    /// Two engines wired back to back over channels: TCP over WireGuard.
    #[tokio::test]
    async fn tcp_over_wireguard_roundtrip() {
        let (a_priv, a_pub) = keypair(1);
        let (b_priv, b_pub) = keypair(2);
        let a_ip: Ipv6Addr = "fd60:627a:a42b::a".parse().unwrap();
        let b_ip: Ipv6Addr = "fd60:627a:a42b::b".parse().unwrap();
        let (a_out_tx, mut a_out_rx) = mpsc::channel(1024);
        let (b_out_tx, mut b_out_rx) = mpsc::channel(1024);
        let server = spawn(
            Config::new(b_priv, a_pub, b_ip, a_ip, Role::Listen { port: 1 }),
            b_out_tx,
        );
        let mut client = spawn(
            Config::new(a_priv, b_pub, a_ip, b_ip, Role::Connect { port: 1 }),
            a_out_tx,
        );
        let (s_in, c_in) = (server.inbound.clone(), client.inbound.clone());
        tokio::spawn(async move {
            while let Some(p) = a_out_rx.recv().await {
                let _ = s_in.send(p).await;
            }
        });
        tokio::spawn(async move {
            while let Some(p) = b_out_rx.recv().await {
                let _ = c_in.send(p).await;
            }
        });
        let mut server = server;
        // Server side: echo.
        tokio::spawn(async move {
            while let Some(mut s) = server.streams.recv().await {
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 65536];
                    loop {
                        match s.read(&mut buf).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => {
                                if s.write_all(&buf[..n]).await.is_err() {
                                    break;
                                }
                            }
                        }
                    }
                    let _ = s.shutdown().await;
                });
            }
        });
        let stream = tokio::time::timeout(Duration::from_secs(10), client.streams.recv())
            .await
            .expect("connect timed out")
            .expect("engine ended");
        let (mut rd, mut wr) = tokio::io::split(stream);
        let data: Vec<u8> = (0..4 * 1024 * 1024u32)
            .map(|i| (i * 7 + i / 251) as u8)
            .collect();
        let send = data.clone();
        let writer = tokio::spawn(async move {
            wr.write_all(&send).await.unwrap();
            wr.shutdown().await.unwrap();
        });
        let mut got = Vec::new();
        tokio::time::timeout(Duration::from_secs(60), rd.read_to_end(&mut got))
            .await
            .expect("echo timed out")
            .unwrap();
        writer.await.unwrap();
        assert_eq!(got.len(), data.len());
        assert!(got == data);
    }

    #[tokio::test]
    async fn silent_peer_is_declared_dead() {
        let (a_priv, _) = keypair(3);
        let (_, b_pub) = keypair(4);
        let (out_tx, mut out_rx) = mpsc::channel(1024);
        let mut cfg = Config::new(
            a_priv,
            b_pub,
            "fd60:627a:a42b::1".parse().unwrap(),
            "fd60:627a:a42b::2".parse().unwrap(),
            Role::Connect { port: 1 },
        );
        cfg.dead_after = Duration::from_millis(600);
        let mut h = spawn(cfg, out_tx);
        // Swallow everything: nobody answers.
        tokio::spawn(async move { while out_rx.recv().await.is_some() {} });
        tokio::time::timeout(Duration::from_secs(10), h.dead.wait_for(|d| d.is_some()))
            .await
            .expect("not declared dead")
            .unwrap();
        let reason = h.dead.borrow().clone().unwrap();
        assert!(reason.contains("data path is dead"), "{reason}");
        assert!(h.streams.recv().await.is_none());
    }
}
