//! What a test asks the simulator for: deployment options, workspace and
//! agent scripts (timings, failures, flags), injected API faults, and the
//! record of requests it hands back.
//!
//! These are plain data with defaults and small builder methods; the state
//! module turns them into builds, agents and timers.

use std::time::Duration;

use crate::endpoint::SshBackend;
use crate::model::BuildParameter;

/// Options for [`crate::Sim::start`].
#[derive(Clone, Debug)]
pub struct SimOptions {
    /// Which SSH server sits behind each agent endpoint.
    pub ssh: SshBackend,
    /// Interval of the `event: ping` heartbeat on watch streams (coderd: 15 s).
    pub heartbeat: Duration,
    /// A second, independent DERP region with this id (e.g. `10001`, as
    /// coderd numbers workspace-proxy regions): its own relay on its own
    /// loopback listener, advertised in the DERP map as a non-embedded
    /// region, and the fake agents home there instead of on the embedded
    /// relay (999). Clients then need two DERP connections. `None`
    /// (default): one region, 999.
    pub agent_derp_region: Option<i64>,
}

impl Default for SimOptions {
    fn default() -> Self {
        SimOptions {
            ssh: SshBackend::default(),
            heartbeat: Duration::from_secs(15),
            agent_derp_region: None,
        }
    }
}

/// The state a workspace is in when it is added.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Initial {
    /// Latest build is a succeeded start; agents connected and settled
    /// (unless an agent is scripted to connect later or never).
    #[default]
    Running,
    /// A start build followed by a succeeded stop build.
    Stopped,
    /// The latest build is a start whose job failed.
    Failed,
    /// A start build was just queued and runs for `build_time`.
    Starting,
}

/// A workspace to add with [`crate::Sim::add_workspace`].
#[derive(Clone, Debug, PartialEq)]
pub struct WorkspaceSpec {
    pub name: String,
    /// Owner's username; `None` means the simulator's default user.
    pub owner: Option<String>,
    /// Agents of every start build (default: one agent `dev`). An empty list
    /// gives a workspace without agents.
    pub agents: Vec<AgentSpec>,
    pub initial: Initial,
    /// How long a start/stop/delete build job runs (about a tenth of it queued).
    pub build_time: Duration,
    /// The next start build fails with `job.error` "sim: provisioner failed".
    pub fail_next_start: bool,
    /// `dormant_at` is set; a start build is refused (403) until
    /// `PUT /dormant {"dormant":false}`.
    pub dormant: bool,
    /// `template_require_active_version`: a start build on a version other than
    /// the active one is refused (403). Implies the current build is on an old
    /// version (otherwise the flag could never matter).
    pub require_active_version: bool,
    /// The current build uses an old template version (`outdated: true`).
    pub outdated: bool,
    /// After a stop (or delete) build succeeds, live SSH connections to the
    /// agents are killed this much later.
    pub linger_after_stop: Duration,
    /// Rich parameters of the current build (`GET /workspacebuilds/{id}/parameters`).
    pub parameters: Vec<BuildParameter>,
}

impl Default for WorkspaceSpec {
    fn default() -> Self {
        WorkspaceSpec {
            name: String::new(),
            owner: None,
            agents: vec![AgentSpec::default()],
            initial: Initial::Running,
            build_time: Duration::from_secs(1),
            fail_next_start: false,
            dormant: false,
            require_active_version: false,
            outdated: false,
            linger_after_stop: Duration::from_secs(30),
            parameters: Vec::new(),
        }
    }
}

impl WorkspaceSpec {
    /// A running workspace with one agent `dev`.
    pub fn new(name: impl Into<String>) -> Self {
        WorkspaceSpec {
            name: name.into(),
            ..Default::default()
        }
    }
    pub fn owner(mut self, owner: impl Into<String>) -> Self {
        self.owner = Some(owner.into());
        self
    }
    /// Replaces the agent of the same name, or adds it. So
    /// `.agent(AgentSpec::new("dev").connect_after(..))` tunes the default
    /// agent and `.agent(AgentSpec::new("main"))` adds a second one.
    pub fn agent(mut self, agent: AgentSpec) -> Self {
        match self.agents.iter_mut().find(|a| a.name == agent.name) {
            Some(slot) => *slot = agent,
            None => self.agents.push(agent),
        }
        self
    }
    /// Replaces the whole agent list.
    pub fn agents(mut self, agents: Vec<AgentSpec>) -> Self {
        self.agents = agents;
        self
    }
    pub fn initial(mut self, initial: Initial) -> Self {
        self.initial = initial;
        self
    }
    pub fn stopped(self) -> Self {
        self.initial(Initial::Stopped)
    }
    pub fn failed(self) -> Self {
        self.initial(Initial::Failed)
    }
    pub fn starting(self) -> Self {
        self.initial(Initial::Starting)
    }
    pub fn build_time(mut self, d: Duration) -> Self {
        self.build_time = d;
        self
    }
    pub fn fail_next_start(mut self) -> Self {
        self.fail_next_start = true;
        self
    }
    pub fn dormant(mut self) -> Self {
        self.dormant = true;
        self
    }
    pub fn require_active_version(mut self) -> Self {
        self.require_active_version = true;
        self
    }
    pub fn outdated(mut self) -> Self {
        self.outdated = true;
        self
    }
    pub fn linger_after_stop(mut self, d: Duration) -> Self {
        self.linger_after_stop = d;
        self
    }
    pub fn parameter(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.parameters.push(BuildParameter {
            name: name.into(),
            value: value.into(),
        });
        self
    }
}

/// One agent of a workspace's start builds.
#[derive(Clone, Debug, PartialEq)]
pub struct AgentSpec {
    pub name: String,
    /// After the start build succeeds, the agent is `connecting` this long
    /// before it becomes `connected`.
    pub connect_after: Duration,
    pub startup_script: Option<ScriptSpec>,
    /// Stays `connecting` (then `timeout` after `connection_timeout`).
    pub never_connects: bool,
    /// `connection_timeout_seconds` (rounded up); zero disables the timeout.
    pub connection_timeout: Duration,
    /// Where the agent's tailnet streams go instead of its SSH endpoint
    /// (the benchmark points it at a raw TCP sink or source).
    pub tailnet_target: Option<std::net::SocketAddr>,
}

impl Default for AgentSpec {
    fn default() -> Self {
        AgentSpec {
            name: "dev".into(),
            connect_after: Duration::ZERO,
            startup_script: None,
            never_connects: false,
            connection_timeout: Duration::from_secs(120),
            tailnet_target: None,
        }
    }
}

impl AgentSpec {
    pub fn new(name: impl Into<String>) -> Self {
        AgentSpec {
            name: name.into(),
            ..Default::default()
        }
    }
    pub fn connect_after(mut self, d: Duration) -> Self {
        self.connect_after = d;
        self
    }
    pub fn startup_script(mut self, s: ScriptSpec) -> Self {
        self.startup_script = Some(s);
        self
    }
    pub fn never_connects(mut self) -> Self {
        self.never_connects = true;
        self
    }
    pub fn connection_timeout(mut self, d: Duration) -> Self {
        self.connection_timeout = d;
        self
    }
    pub fn tailnet_target(mut self, addr: std::net::SocketAddr) -> Self {
        self.tailnet_target = Some(addr);
        self
    }
}

/// A startup script: lifecycle `created` → `starting` (when the agent
/// connects) → `ready` or `start_error` after `duration`, with log lines.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ScriptSpec {
    /// `start_blocks_login` (the CLI waits for it under `--wait=auto`).
    pub blocks_login: bool,
    pub duration: Duration,
    /// Exits non-zero: lifecycle ends in `start_error`.
    pub fails: bool,
}

impl Default for ScriptSpec {
    fn default() -> Self {
        ScriptSpec {
            blocks_login: false,
            duration: Duration::from_secs(1),
            fails: false,
        }
    }
}

impl ScriptSpec {
    pub fn blocking(duration: Duration) -> Self {
        ScriptSpec {
            blocks_login: true,
            duration,
            fails: false,
        }
    }
    pub fn non_blocking(duration: Duration) -> Self {
        ScriptSpec {
            blocks_login: false,
            duration,
            fails: false,
        }
    }
    pub fn failing(mut self) -> Self {
        self.fails = true;
        self
    }
}

/// A fault applied to every new `/api/v2` request (open watch streams are
/// not affected).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ApiFault {
    #[default]
    None,
    /// Answer with this status and a Coder error JSON body.
    Status(u16),
    /// Accept the request and never answer it (even after the fault clears).
    Hang,
    /// `200 text/html` garbage.
    NonJson,
}

/// An endpoint [`crate::Sim::fail_route`] can make fail for a while.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Route {
    /// `GET /api/v2/workspaceagents/{id}/coordinate` (the websocket upgrade).
    Coordinate,
    /// `GET /api/v2/workspaceagents/{id}/connection` (the DERP map).
    Connection,
    /// `POST /api/v2/workspaces/{id}/builds` (start, stop, delete).
    CreateBuild,
}

impl Route {
    /// Whether a request is to this route.
    pub fn matches(self, method: &str, path: &str) -> bool {
        let one_segment = |rest: &str, tail: &str| {
            rest.strip_suffix(tail)
                .is_some_and(|id| !id.is_empty() && !id.contains('/'))
        };
        match self {
            Route::Coordinate => path
                .strip_prefix("/api/v2/workspaceagents/")
                .is_some_and(|r| one_segment(r, "/coordinate")),
            // `{id}/connection`, not `connection` (the Coder Connect check).
            Route::Connection => path
                .strip_prefix("/api/v2/workspaceagents/")
                .is_some_and(|r| one_segment(r, "/connection")),
            Route::CreateBuild => {
                method == "POST"
                    && path
                        .strip_prefix("/api/v2/workspaces/")
                        .is_some_and(|r| one_segment(r, "/builds"))
            }
        }
    }
}

/// One request the simulator received.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LoggedRequest {
    pub method: String,
    /// Path with query string.
    pub path: String,
    /// Response status; 0 while no response has been sent (e.g. `Hang`).
    pub status: u16,
    pub headers: Vec<(String, String)>,
}

impl LoggedRequest {
    /// First value of a header, case-insensitively.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}
