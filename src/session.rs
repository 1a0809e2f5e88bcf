//! What runs beside the pump once connected: watch-and-close, the usage
//! heartbeat, and signal handling.
//!
//! The one rule of resilience lives here: the stream is closed only when a
//! side ends it, the workspace is stopped (or deleted, or a new start build
//! replaces the one we connected to), or a signal arrives. Agent status,
//! lifecycle, API errors and watch drops are logged and otherwise ignored.
//!
//! Over tailnet the stream is in-process, so two things `tcp://` gets from
//! the kernel are done here: a reset from the agent reads as EOF, so at EOF
//! the tunnel's death reason decides between an end and a break; and
//! however the session ends the tunnel is closed towards the agent — a FIN,
//! or a RST — and the coordinator is told we left, before the process
//! exits, so neither the agent's SSH server nor its WireGuard peer lingers.

use std::time::Duration;

use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::mpsc;
use tokio::sync::watch::Receiver;

use crate::coderd::models::{Transition, Workspace, WorkspaceBuild, WorkspaceStatus};
use crate::coderd::watch::WatchState;
use crate::coderd::Client;
use crate::pipe::{self, End};
use crate::tunnel::AgentStream;

/// Usage heartbeat period (as `coder ssh`).
pub const USAGE_EVERY: Duration = Duration::from_secs(60);

type DeadReason = tokio::sync::watch::Receiver<Option<String>>;

/// Why the session ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Closed {
    /// The agent closed the stream, or OpenSSH closed our stdout.
    StreamEnded,
    /// The stream broke (reset, timeout).
    StreamBroken(String),
    /// watch-and-close: the workspace went away under us.
    Workspace(String),
    /// SIGHUP, SIGTERM or SIGINT.
    Signal(i32),
}

impl Closed {
    /// The process exit code for this end.
    pub fn exit_code(&self) -> i32 {
        match self {
            Closed::StreamEnded | Closed::Workspace(_) => 0,
            Closed::StreamBroken(_) => 1,
            Closed::Signal(n) => 128 + n,
        }
    }
}

/// What the session needs from setup.
pub struct Session {
    pub client: Client,
    pub workspace: Workspace,
    pub agent_id: String,
    pub usage_app: Option<&'static str>,
    pub watch: Receiver<WatchState>,
}

/// Decide whether a snapshot closes a session connected to `connected`.
///
/// A snapshot of a build older than the one we connected to says nothing
/// about it: a watch stream may replay the previous (stop) build before the
/// current one, and a stop that preceded our autostart must not close the
/// session it made possible.
pub fn close_reason(connected: &WorkspaceBuild, ws: &Workspace) -> Option<String> {
    let b = &ws.latest_build;
    if b.build_number < connected.build_number {
        log::debug!(
            "watch: ignoring a snapshot of build #{} (connected to #{})",
            b.build_number,
            connected.build_number
        );
        return None;
    }
    let connected_build = connected.id.as_str();
    let name = format!("{}/{}", ws.owner_name, ws.name);
    if b.status == WorkspaceStatus::Stopped {
        return Some(format!("workspace {name:?} was stopped"));
    }
    if b.status == WorkspaceStatus::Deleted {
        return Some(format!("workspace {name:?} was deleted"));
    }
    if b.id != connected_build && b.transition == Transition::Start {
        return Some(format!(
            "a new start build (#{}) of workspace {name:?} replaced the one this session was connected to",
            b.build_number
        ));
    }
    None
}

impl Session {
    /// Pump `stream` until the session closes; returns why.
    pub async fn run(mut self, stdio: pipe::Stdio, stream: AgentStream) -> Closed {
        let (tx, done) = mpsc::unbounded_channel();
        // Why a tailnet data path died, if it does; and its controller.
        let mut tunnel_dead = None;
        let mut control = None;
        let started = match stream {
            AgentStream::Tcp(s) => s.into_std().and_then(|s| pipe::start(stdio, s, tx)),
            AgentStream::Tailnet(tunnel) => {
                // The pump drives kernel sockets; bridge the in-process
                // stream to one end of a socketpair.
                tunnel_dead = Some(tunnel.dead);
                control = Some(tunnel.control);
                bridge_tunnel(tunnel.stream).and_then(|s| pipe::start(stdio, s, tx))
            }
        };
        if let Err(e) = started {
            return Closed::StreamBroken(format!("cannot start the pump: {e}"));
        }
        let closed = self.until_closed(done, tunnel_dead).await;
        if let Some(c) = control {
            // However the session ended, leave the way Coder's own clients
            // do: close our connection towards the agent (a no-op when it is
            // already gone) and say goodbye to the coordinator, so coderd
            // tells the agent we left instead of "lost" — an agent keeps a
            // lost peer for 15 minutes. Bounded to about a second.
            c.close().await;
        }
        closed
    }

    async fn until_closed(
        &mut self,
        mut done: mpsc::UnboundedReceiver<End>,
        mut tunnel_dead: Option<DeadReason>,
    ) -> Closed {
        if let Some(app) = self.usage_app {
            let client = self.client.clone();
            let ws = self.workspace.id.clone();
            let agent = self.agent_id.clone();
            tokio::spawn(async move {
                let mut every = tokio::time::interval(USAGE_EVERY);
                loop {
                    every.tick().await;
                    match client.post_usage(&ws, &agent, app).await {
                        Ok(()) => log::debug!("usage heartbeat sent"),
                        Err(e) => log::debug!("usage heartbeat failed (ignored): {e}"),
                    }
                }
            });
        }

        let connected_build = self.workspace.latest_build.clone();
        let mut sigs = match Signals::new() {
            Ok(s) => s,
            Err(e) => {
                log::warn!("cannot install signal handlers: {e}");
                Signals::none()
            }
        };
        loop {
            // Look at the latest snapshot first: one may already be waiting
            // from the setup phase.
            {
                let state = self.watch.borrow_and_update().clone();
                match state {
                    WatchState::Snapshot(ws) => {
                        log::debug!(
                            "watch: build #{} {} {}, agents {:?}",
                            ws.latest_build.build_number,
                            ws.latest_build.transition,
                            ws.latest_build.status,
                            ws.latest_build
                                .agents()
                                .iter()
                                .map(|a| format!("{}={}/{}", a.name, a.status, a.lifecycle_state))
                                .collect::<Vec<_>>()
                        );
                        if let Some(reason) = close_reason(&connected_build, &ws) {
                            return Closed::Workspace(reason);
                        }
                    }
                    WatchState::Gone => {
                        return Closed::Workspace(format!(
                            "workspace {}/{} was deleted",
                            self.workspace.owner_name, self.workspace.name
                        ))
                    }
                    WatchState::Down(e) => {
                        log::info!("watch down ({e}); the session is unaffected")
                    }
                    WatchState::Connecting => {}
                }
            }
            tokio::select! {
                end = done.recv() => return ended(end, &tunnel_dead),
                changed = self.watch.changed() => {
                    if changed.is_err() {
                        // The watcher never ends on its own; keep the stream regardless.
                        log::warn!("watch task ended; the session continues without watch-and-close");
                        return wait_without_watch(&mut done, &mut sigs, &mut tunnel_dead).await;
                    }
                }
                n = sigs.recv() => return Closed::Signal(n),
                reason = tunnel_died(&mut tunnel_dead) => return broke(reason),
            }
        }
    }
}

fn broke(reason: impl std::fmt::Display) -> Closed {
    Closed::StreamBroken(format!("the connection to the agent broke: {reason}"))
}

/// Why the pump ended, as a session end. Over tailnet a reset from the
/// agent reaches the pump as EOF; the tunnel publishes the reset before
/// that EOF can be read, so it is known here.
fn ended(end: Option<End>, tunnel_dead: &Option<DeadReason>) -> Closed {
    match end {
        Some(End::RemoteError(e)) => broke(e),
        Some(End::RemoteClosed) => match tunnel_dead.as_ref().and_then(|d| d.borrow().clone()) {
            Some(reason) => broke(reason),
            None => Closed::StreamEnded,
        },
        Some(End::StdoutClosed) | None => Closed::StreamEnded,
    }
}

/// Resolves with the reason once a tailnet data path dies; never otherwise.
async fn tunnel_died(dead: &mut Option<DeadReason>) -> String {
    match dead {
        Some(d) => match d.wait_for(|r| r.is_some()).await {
            Ok(r) => r.clone().unwrap_or_default(),
            Err(_) => std::future::pending().await,
        },
        None => std::future::pending().await,
    }
}

/// Connect a tailnet tunnel's stream to a socketpair; return our end.
fn bridge_tunnel(
    mut stream: tokio::io::DuplexStream,
) -> std::io::Result<std::os::unix::net::UnixStream> {
    let (ours, theirs) = std::os::unix::net::UnixStream::pair()?;
    theirs.set_nonblocking(true)?;
    let mut theirs = tokio::net::UnixStream::from_std(theirs)?;
    tokio::spawn(async move {
        match tokio::io::copy_bidirectional(&mut theirs, &mut stream).await {
            Ok((up, down)) => log::debug!("tailnet bridge done: {up} bytes up, {down} down"),
            Err(e) => log::debug!("tailnet bridge ended: {e}"),
        }
    });
    Ok(ours)
}

async fn wait_without_watch(
    done: &mut mpsc::UnboundedReceiver<End>,
    sigs: &mut Signals,
    tunnel_dead: &mut Option<DeadReason>,
) -> Closed {
    tokio::select! {
        end = done.recv() => ended(end, tunnel_dead),
        n = sigs.recv() => Closed::Signal(n),
        reason = tunnel_died(tunnel_dead) => broke(reason),
    }
}

/// SIGHUP, SIGTERM and SIGINT as one stream.
pub struct Signals {
    inner: Option<[tokio::signal::unix::Signal; 3]>,
}

impl Signals {
    pub fn new() -> std::io::Result<Signals> {
        Ok(Signals {
            inner: Some([
                signal(SignalKind::hangup())?,
                signal(SignalKind::terminate())?,
                signal(SignalKind::interrupt())?,
            ]),
        })
    }
    fn none() -> Signals {
        Signals { inner: None }
    }
    /// The next signal number.
    pub async fn recv(&mut self) -> i32 {
        match &mut self.inner {
            Some([hup, term, int]) => tokio::select! {
                _ = hup.recv() => libc::SIGHUP,
                _ = term.recv() => libc::SIGTERM,
                _ = int.recv() => libc::SIGINT,
            },
            None => std::future::pending().await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::coderd::models::*;

    fn ws(id: &str, t: Transition, s: WorkspaceStatus, agent: AgentStatus) -> Workspace {
        let number = id.trim_start_matches('b').parse::<i64>().unwrap_or(0) + 6;
        Workspace {
            name: "dev".into(),
            owner_name: "alice".into(),
            latest_build: WorkspaceBuild {
                id: id.into(),
                build_number: number,
                transition: t,
                status: s,
                resources: vec![Resource {
                    agents: vec![Agent {
                        status: agent,
                        ..Default::default()
                    }],
                    ..Default::default()
                }],
                ..Default::default()
            },
            ..Default::default()
        }
    }

    #[test]
    fn only_stop_delete_and_new_start_close() {
        use AgentStatus as A;
        use Transition as T;
        use WorkspaceStatus as S;
        let keep = [
            ws("b1", T::Start, S::Running, A::Disconnected),
            ws("b1", T::Start, S::Running, A::Timeout),
            ws("b1", T::Start, S::Running, A::Connecting),
            ws(
                "b1",
                T::Start,
                S::Unknown("x".into()),
                A::Unknown("y".into()),
            ),
            ws("b2", T::Stop, S::Stopping, A::Connected),
            ws("b2", T::Stop, S::Pending, A::Connected),
            ws("b2", T::Stop, S::Failed, A::Connected),
            ws("b2", T::Delete, S::Deleting, A::Connected),
            ws("b1", T::Start, S::Failed, A::Connected),
        ];
        let b1 = ws("b1", T::Start, S::Running, A::Connected).latest_build;
        for w in &keep {
            assert_eq!(close_reason(&b1, w), None, "{:?}", w.latest_build);
        }
        let close = [
            ws("b2", T::Stop, S::Stopped, A::Connected),
            ws("b2", T::Delete, S::Deleted, A::Connected),
            ws("b2", T::Start, S::Pending, A::Connecting),
            ws("b2", T::Start, S::Running, A::Connected),
        ];
        for w in &close {
            assert!(close_reason(&b1, w).is_some(), "{:?}", w.latest_build);
        }
    }

    #[test]
    fn snapshots_of_older_builds_never_close() {
        use AgentStatus as A;
        use Transition as T;
        use WorkspaceStatus as S;
        // Connected to b3 (#9): a replayed stop (b2, #8) or delete is stale.
        let b3 = ws("b3", T::Start, S::Running, A::Connected).latest_build;
        for w in [
            ws("b2", T::Stop, S::Stopped, A::Connected),
            ws("b2", T::Delete, S::Deleted, A::Connected),
            ws("b1", T::Start, S::Running, A::Connected),
        ] {
            assert_eq!(close_reason(&b3, &w), None, "{:?}", w.latest_build);
        }
        // A later stop still closes.
        assert!(close_reason(&b3, &ws("b4", T::Stop, S::Stopped, A::Connected)).is_some());
    }
}
