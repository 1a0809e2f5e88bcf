//! The simulated deployment's state and its clock: users, workspaces, builds,
//! agents, logs, and the timed scripts that move them along.
//!
//! Everything lives in one [`World`] behind one mutex. Changes that coderd
//! would publish (build state, agent status and lifecycle, dormancy) go out
//! on a broadcast channel as the workspace's id; watch streams re-render the
//! workspace on each, like coderd's `watchWorkspace` does. Timed progress
//! (build jobs, agents connecting, startup scripts, stop lingering) runs in
//! spawned tasks that re-check on every step that their build is still the
//! workspace's latest, so a newer build simply supersedes them.

use std::collections::BTreeMap;
use std::collections::HashMap;
use std::sync::atomic::AtomicUsize;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use chrono::Utc;
use tokio::sync::{broadcast, watch};
use tokio::task::AbortHandle;
use uuid::Uuid;

use crate::endpoint::AgentEndpoint;
use crate::model::{self, AgentStatus, JobStatus, Lifecycle, Time, Transition, WorkspaceStatus};
use crate::spec::{AgentSpec, ApiFault, Initial, LoggedRequest, Route, SimOptions, WorkspaceSpec};
use crate::tailnet::{AgentInfo, Tailnet};

/// Locks a mutex, ignoring poisoning: a panicked test task must not turn
/// every later request into a panic too.
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn now() -> Time {
    Utc::now()
}

/// A refusal of an API request: status plus Coder error JSON.
#[derive(Debug, Clone)]
pub(crate) struct Refusal {
    pub status: u16,
    pub body: model::ErrorResponse,
}

impl Refusal {
    pub fn new(status: u16, message: impl Into<String>) -> Self {
        Refusal {
            status,
            body: model::ErrorResponse {
                message: message.into(),
                detail: String::new(),
                validations: Vec::new(),
            },
        }
    }
    pub fn detail(mut self, detail: impl Into<String>) -> Self {
        self.body.detail = detail.into();
        self
    }
    pub fn not_found() -> Self {
        Refusal::new(
            404,
            "Resource not found or you do not have access to this resource",
        )
    }
}

/// State shared by the HTTP handlers, the timers and the [`crate::Sim`] handle.
pub(crate) struct Shared {
    pub world: Mutex<World>,
    /// Workspace ids whose rendered JSON may have changed.
    pub events: broadcast::Sender<Uuid>,
    pub token: String,
    pub owner: String,
    pub url: String,
    pub opts: SimOptions,
    pub deployment_id: Uuid,
    pub fault: Mutex<ApiFault>,
    pub requests: Mutex<Vec<LoggedRequest>>,
    pub watchers: AtomicUsize,
    /// Bumped by `cut_watch_streams`; every open watch stream ends on change.
    pub cut: watch::Sender<u64>,
    pub rt: tokio::runtime::Handle,
    pub tasks: Mutex<Vec<AbortHandle>>,
    /// Coordinator, DERP relay and fake agent peers.
    pub tailnet: Arc<Tailnet>,
    /// Set by `Sim::race_next_build`: the next build request loses a race
    /// against another client's start.
    pub race_next_build: std::sync::atomic::AtomicBool,
    /// Tailnet routes answering an error status until a deadline
    /// (`Sim::fail_route`).
    pub route_faults: Mutex<Vec<(Route, u16, std::time::Instant)>>,
    /// Every new watch stream first replays the previous build as stopped
    /// (`Sim::set_watch_replays_stale_stop`).
    pub watch_replay_stale: std::sync::atomic::AtomicBool,
    /// Stale replays begun (the stale frame sent) and delivered in full
    /// (the current frame sent after it).
    pub stale_replays: [AtomicUsize; 2],
}

pub(crate) struct User {
    pub id: Uuid,
    pub name: String,
}

pub(crate) struct World {
    pub org_id: Uuid,
    pub template_id: Uuid,
    pub active_version: Uuid,
    pub old_version: Uuid,
    pub users: Vec<User>,
    pub workspaces: Vec<WsRec>,
    pub builds: HashMap<Uuid, BuildRec>,
    next_log_id: i64,
}

pub(crate) struct WsRec {
    pub id: Uuid,
    pub name: String,
    pub owner_id: Uuid,
    pub owner_name: String,
    pub created_at: Time,
    pub updated_at: Time,
    pub last_used_at: Time,
    pub spec: WorkspaceSpec,
    pub fail_next_start: bool,
    pub dormant_at: Option<Time>,
    pub deleted: bool,
    /// Build ids, oldest first; the last one is the latest build.
    pub builds: Vec<Uuid>,
    pub endpoints: BTreeMap<String, Arc<AgentEndpoint>>,
    pub usage: usize,
}

pub(crate) struct BuildRec {
    pub id: Uuid,
    pub ws_id: Uuid,
    pub number: i32,
    pub transition: Transition,
    pub version: Uuid,
    pub reason: String,
    pub created_at: Time,
    pub updated_at: Time,
    pub initiator_id: Uuid,
    pub initiator_name: String,
    pub job_id: Uuid,
    pub job_created_at: Time,
    pub job_started_at: Option<Time>,
    pub job_completed_at: Option<Time>,
    pub job_status: JobStatus,
    pub job_error: String,
    pub will_fail: bool,
    pub params: Vec<model::BuildParameter>,
    /// Resources are recorded when the job succeeds, as coderd does.
    pub resources_done: bool,
    pub container_id: Uuid,
    pub volume_id: Uuid,
    pub agents: Vec<AgentRec>,
    pub logs: Vec<model::ProvisionerJobLog>,
}

pub(crate) struct AgentRec {
    pub id: Uuid,
    pub name: String,
    pub spec: AgentSpec,
    pub created_at: Time,
    pub updated_at: Time,
    pub status: AgentStatus,
    pub lifecycle: Lifecycle,
    pub first_connected_at: Option<Time>,
    pub last_connected_at: Option<Time>,
    pub disconnected_at: Option<Time>,
    pub started_at: Option<Time>,
    pub ready_at: Option<Time>,
    pub log_source_id: Uuid,
    pub script_id: Uuid,
    pub logs: Vec<model::WorkspaceAgentLog>,
}

impl AgentRec {
    fn new(spec: &AgentSpec, at: Time) -> Self {
        AgentRec {
            id: Uuid::new_v4(),
            name: spec.name.clone(),
            spec: spec.clone(),
            created_at: at,
            updated_at: at,
            status: AgentStatus::Connecting,
            lifecycle: Lifecycle::Created,
            first_connected_at: None,
            last_connected_at: None,
            disconnected_at: None,
            started_at: None,
            ready_at: None,
            log_source_id: Uuid::new_v4(),
            script_id: Uuid::new_v4(),
            logs: Vec::new(),
        }
    }
}

/// What a build's timeline looks like: (stage, output) lines spread over
/// the running part of the job.
fn build_script(t: Transition) -> Vec<(&'static str, &'static str)> {
    let mut v = vec![
        ("Setting up", "sim: provisioner started"),
        ("Planning infrastructure", "Terraform 1.9.8"),
    ];
    match t {
        Transition::Start => v.extend([
            (
                "Planning infrastructure",
                "Plan: 1 to add, 0 to change, 0 to destroy.",
            ),
            (
                "Starting workspace",
                "docker_container.workspace[0]: Creating...",
            ),
            (
                "Starting workspace",
                "docker_container.workspace[0]: Creation complete after 1s",
            ),
        ]),
        Transition::Stop => v.extend([
            (
                "Planning infrastructure",
                "Plan: 0 to add, 0 to change, 1 to destroy.",
            ),
            (
                "Stopping workspace",
                "docker_container.workspace[0]: Destroying...",
            ),
            (
                "Stopping workspace",
                "docker_container.workspace[0]: Destruction complete after 1s",
            ),
        ]),
        Transition::Delete => v.extend([
            (
                "Planning infrastructure",
                "Plan: 0 to add, 0 to change, 2 to destroy.",
            ),
            ("Destroying workspace", "docker_volume.home: Destroying..."),
            (
                "Destroying workspace",
                "docker_volume.home: Destruction complete after 0s",
            ),
        ]),
    }
    v
}

impl World {
    pub fn new() -> Self {
        World {
            org_id: Uuid::new_v4(),
            template_id: Uuid::new_v4(),
            active_version: Uuid::new_v4(),
            old_version: Uuid::new_v4(),
            users: Vec::new(),
            workspaces: Vec::new(),
            builds: HashMap::new(),
            next_log_id: 1,
        }
    }

    fn log_id(&mut self) -> i64 {
        let id = self.next_log_id;
        self.next_log_id += 1;
        id
    }

    pub fn user_id(&mut self, name: &str) -> Uuid {
        if let Some(u) = self.users.iter().find(|u| u.name == name) {
            return u.id;
        }
        let id = Uuid::new_v4();
        self.users.push(User {
            id,
            name: name.to_string(),
        });
        id
    }

    /// `owner` is a username or user id (`me` is resolved by the caller).
    pub fn ws_by_owner_name(
        &self,
        owner: &str,
        name: &str,
        include_deleted: bool,
    ) -> Option<usize> {
        let matches = |w: &WsRec| {
            w.name == name && (w.owner_name == owner || w.owner_id.to_string() == owner)
        };
        self.workspaces
            .iter()
            .rposition(|w| matches(w) && !w.deleted)
            .or_else(|| {
                include_deleted
                    .then(|| self.workspaces.iter().rposition(matches))
                    .flatten()
            })
    }

    /// By name alone (tests address workspaces by name); prefers live ones.
    pub fn ws_by_name(&self, name: &str) -> Option<usize> {
        self.workspaces
            .iter()
            .rposition(|w| w.name == name && !w.deleted)
            .or_else(|| self.workspaces.iter().rposition(|w| w.name == name))
    }

    pub fn ws_by_id(&self, id: Uuid) -> Option<usize> {
        self.workspaces.iter().position(|w| w.id == id)
    }

    pub fn latest_id(&self, ws: usize) -> Option<Uuid> {
        self.workspaces
            .get(ws)
            .and_then(|w| w.builds.last().copied())
    }

    pub fn latest(&self, ws: usize) -> Option<&BuildRec> {
        self.latest_id(ws).and_then(|id| self.builds.get(&id))
    }

    fn is_latest(&self, build: Uuid) -> bool {
        self.builds
            .get(&build)
            .and_then(|b| self.ws_by_id(b.ws_id))
            .and_then(|ws| self.latest_id(ws))
            == Some(build)
    }

    /// The agent of that name in the newest build that has agents.
    pub fn current_agent_mut(&mut self, ws: usize, agent: &str) -> Option<&mut AgentRec> {
        let w = self.workspaces.get(ws)?;
        let build = w.builds.iter().rev().find(|id| {
            self.builds
                .get(id)
                .is_some_and(|b| b.agents.iter().any(|a| a.name == agent))
        })?;
        let build = *build;
        self.builds
            .get_mut(&build)?
            .agents
            .iter_mut()
            .find(|a| a.name == agent)
    }

    /// The agent of that name in `build`, only while `build` is the latest.
    fn live_agent_mut(&mut self, build: Uuid, agent: &str) -> Option<&mut AgentRec> {
        if !self.is_latest(build) {
            return None;
        }
        self.builds
            .get_mut(&build)?
            .agents
            .iter_mut()
            .find(|a| a.name == agent)
    }

    pub fn find_agent(&self, id: Uuid) -> Option<(&BuildRec, &AgentRec)> {
        self.builds
            .values()
            .find_map(|b| b.agents.iter().find(|a| a.id == id).map(|a| (b, a)))
    }

    fn touch_ws(&mut self, ws_id: Uuid) {
        if let Some(i) = self.ws_by_id(ws_id) {
            self.workspaces[i].updated_at = now();
        }
    }

    // ----- builds -------------------------------------------------------

    /// Queues a build (job pending) and makes it the latest.
    pub fn new_build(
        &mut self,
        ws: usize,
        transition: Transition,
        version: Uuid,
        reason: &str,
        params: Vec<model::BuildParameter>,
    ) -> Uuid {
        let at = now();
        let number = self.workspaces[ws].builds.len() as i32 + 1;
        let will_fail = transition == Transition::Start && {
            let f = self.workspaces[ws].fail_next_start;
            self.workspaces[ws].fail_next_start = false;
            f
        };
        let w = &mut self.workspaces[ws];
        let b = BuildRec {
            id: Uuid::new_v4(),
            ws_id: w.id,
            number,
            transition,
            version,
            reason: reason.to_string(),
            created_at: at,
            updated_at: at,
            initiator_id: w.owner_id,
            initiator_name: w.owner_name.clone(),
            job_id: Uuid::new_v4(),
            job_created_at: at,
            job_started_at: None,
            job_completed_at: None,
            job_status: JobStatus::Pending,
            job_error: String::new(),
            will_fail,
            params,
            resources_done: false,
            container_id: Uuid::new_v4(),
            volume_id: Uuid::new_v4(),
            agents: Vec::new(),
            logs: Vec::new(),
        };
        let id = b.id;
        w.builds.push(id);
        w.updated_at = at;
        self.builds.insert(id, b);
        id
    }

    fn build_log(&mut self, build: Uuid, stage: &str, output: &str, level: &str) {
        let id = self.log_id();
        if let Some(b) = self.builds.get_mut(&build) {
            b.logs.push(model::ProvisionerJobLog {
                id,
                created_at: now(),
                log_source: "provisioner".into(),
                log_level: level.into(),
                stage: stage.into(),
                output: output.into(),
            });
        }
    }

    /// Records a completed build's whole log at once (for history builds).
    fn fill_logs(&mut self, build: Uuid) {
        let Some(t) = self.builds.get(&build).map(|b| b.transition) else {
            return;
        };
        for (stage, output) in build_script(t) {
            self.build_log(build, stage, output, "info");
        }
    }

    /// Job pending → running. Returns the workspace id to publish.
    fn job_running(&mut self, build: Uuid) -> Option<Uuid> {
        let at = now();
        let latest = self.is_latest(build);
        let b = self.builds.get_mut(&build)?;
        if b.job_status != JobStatus::Pending {
            return None;
        }
        b.job_status = JobStatus::Running;
        b.job_started_at = Some(at);
        b.updated_at = at;
        let (ws_id, transition) = (b.ws_id, b.transition);
        if latest && transition != Transition::Start {
            // The agents of the running start build begin shutting down.
            let ws = self.ws_by_id(ws_id)?;
            self.for_previous_agents(ws, build, |a, at| {
                if !matches!(a.lifecycle, Lifecycle::Off | Lifecycle::ShuttingDown) {
                    a.lifecycle = Lifecycle::ShuttingDown;
                    a.updated_at = at;
                }
            });
        }
        self.touch_ws(ws_id);
        Some(ws_id)
    }

    /// Applies `f` to the agents of the newest build before `build` that has agents.
    fn for_previous_agents(&mut self, ws: usize, build: Uuid, f: impl Fn(&mut AgentRec, Time)) {
        let at = now();
        let ids = self.workspaces[ws].builds.clone();
        let Some(pos) = ids.iter().position(|id| *id == build) else {
            return;
        };
        let prev = ids[..pos]
            .iter()
            .rev()
            .find(|id| self.builds.get(id).is_some_and(|b| !b.agents.is_empty()));
        if let Some(prev) = prev {
            if let Some(b) = self.builds.get_mut(prev) {
                for a in &mut b.agents {
                    f(a, at);
                }
            }
        }
    }

    /// Job running → succeeded/failed: records resources and agents, updates
    /// the previous agents, flips endpoints. Returns (ws id, succeeded start?).
    fn job_done(&mut self, build: Uuid) -> Option<(Uuid, bool)> {
        let at = now();
        let latest = self.is_latest(build);
        let b = self.builds.get_mut(&build)?;
        if b.job_completed_at.is_some() {
            return None;
        }
        let ws_id = b.ws_id;
        let transition = b.transition;
        let failed = b.will_fail;
        b.job_completed_at = Some(at);
        b.updated_at = at;
        if b.job_started_at.is_none() {
            b.job_started_at = Some(at);
        }
        if failed {
            b.job_status = JobStatus::Failed;
            b.job_error = "sim: provisioner failed".into();
        } else {
            b.job_status = JobStatus::Succeeded;
            b.resources_done = true;
        }
        let ws = self.ws_by_id(ws_id)?;
        if failed {
            if latest {
                // Whatever ran before is gone; nothing answers until a start succeeds.
                for ep in self.workspaces[ws].endpoints.values() {
                    ep.set_accepting(false);
                }
            }
            self.build_log(
                build,
                "Starting workspace",
                "Error: sim: provisioner failed",
                "error",
            );
            self.touch_ws(ws_id);
            return Some((ws_id, false));
        }
        let mut started = false;
        match transition {
            Transition::Start => {
                let specs = self.workspaces[ws].spec.agents.clone();
                if let Some(b) = self.builds.get_mut(&build) {
                    b.agents = specs.iter().map(|s| AgentRec::new(s, at)).collect();
                }
                if latest {
                    for ep in self.workspaces[ws].endpoints.values() {
                        ep.set_accepting(true);
                    }
                    started = true;
                }
            }
            Transition::Stop | Transition::Delete => {
                if latest {
                    self.for_previous_agents(ws, build, |a, at| {
                        if a.status != AgentStatus::Disconnected {
                            a.status = AgentStatus::Disconnected;
                            a.disconnected_at = Some(at);
                        }
                        a.lifecycle = Lifecycle::Off;
                        a.updated_at = at;
                    });
                    for ep in self.workspaces[ws].endpoints.values() {
                        ep.set_accepting(false);
                    }
                    if transition == Transition::Delete {
                        self.workspaces[ws].deleted = true;
                    }
                }
            }
        }
        self.touch_ws(ws_id);
        Some((ws_id, started))
    }

    // ----- agents -------------------------------------------------------

    fn agent_connect(&mut self, build: Uuid, name: &str) -> Option<Uuid> {
        let at = now();
        let a = self.live_agent_mut(build, name)?;
        a.status = AgentStatus::Connected;
        a.first_connected_at.get_or_insert(at);
        a.last_connected_at = Some(at);
        a.updated_at = at;
        self.ws_of(build)
    }

    fn agent_timeout(&mut self, build: Uuid, name: &str) -> Option<Uuid> {
        let a = self.live_agent_mut(build, name)?;
        if a.status != AgentStatus::Connecting {
            return None;
        }
        a.status = AgentStatus::Timeout;
        a.updated_at = now();
        self.ws_of(build)
    }

    fn agent_lifecycle(&mut self, build: Uuid, name: &str, l: Lifecycle) -> Option<Uuid> {
        let at = now();
        let a = self.live_agent_mut(build, name)?;
        a.lifecycle = l;
        match l {
            Lifecycle::Starting => a.started_at = Some(at),
            Lifecycle::Ready | Lifecycle::StartError | Lifecycle::StartTimeout => {
                a.started_at.get_or_insert(at);
                a.ready_at = Some(at);
            }
            _ => {}
        }
        a.updated_at = at;
        self.ws_of(build)
    }

    fn agent_log(&mut self, build: Uuid, name: &str, output: &str, level: &str) -> bool {
        let id = self.log_id();
        match self.live_agent_mut(build, name) {
            Some(a) => {
                let source_id = a.log_source_id;
                a.logs.push(model::WorkspaceAgentLog {
                    id,
                    created_at: now(),
                    output: output.into(),
                    level: level.into(),
                    source_id,
                });
                true
            }
            None => false,
        }
    }

    fn ws_of(&mut self, build: Uuid) -> Option<Uuid> {
        let ws_id = self.builds.get(&build)?.ws_id;
        self.touch_ws(ws_id);
        Some(ws_id)
    }

    // ----- rendering ----------------------------------------------------

    pub fn render_workspace(&self, ws: usize) -> Option<model::Workspace> {
        let w = self.workspaces.get(ws)?;
        let latest = self.latest(ws)?;
        let build = self.render_build(latest)?;
        let failing: Vec<Uuid> = build
            .resources
            .iter()
            .flat_map(|r| r.agents.iter())
            .filter(|a| !a.health.healthy)
            .map(|a| a.id)
            .collect();
        Some(model::Workspace {
            id: w.id,
            created_at: w.created_at,
            updated_at: w.updated_at,
            owner_id: w.owner_id,
            owner_name: w.owner_name.clone(),
            owner_avatar_url: String::new(),
            organization_id: self.org_id,
            organization_name: "coder".into(),
            template_id: self.template_id,
            template_name: "docker".into(),
            template_display_name: "Docker (sim)".into(),
            template_icon: "/icon/docker.png".into(),
            template_allow_user_cancel_workspace_jobs: true,
            template_active_version_id: self.active_version,
            template_require_active_version: w.spec.require_active_version,
            outdated: latest.version != self.active_version,
            latest_build: build,
            latest_app_status: None,
            name: w.name.clone(),
            autostart_schedule: None,
            ttl_ms: None,
            last_used_at: w.last_used_at,
            deleting_at: None,
            dormant_at: w.dormant_at,
            health: model::WorkspaceHealth {
                healthy: failing.is_empty(),
                failing_agents: failing,
            },
            automatic_updates: "never".into(),
            allow_renames: false,
            favorite: false,
            next_start_at: None,
        })
    }

    /// The workspace as it looked one build ago, shown stopped: the
    /// previous build rendered as a succeeded stop (for the stale-replay
    /// watch fault). `None` while there is no previous build.
    pub fn render_previous_as_stopped(&self, ws: usize) -> Option<model::Workspace> {
        let builds = &self.workspaces.get(ws)?.builds;
        let prev = self.builds.get(builds.iter().rev().nth(1)?)?;
        let mut out = self.render_workspace(ws)?;
        let mut b = self.render_build(prev)?;
        b.transition = Transition::Stop;
        b.job.status = JobStatus::Succeeded;
        b.status = WorkspaceStatus::Stopped;
        b.resources.retain(|r| r.agents.is_empty());
        out.latest_build = b;
        Some(out)
    }

    pub fn render_build(&self, b: &BuildRec) -> Option<model::WorkspaceBuild> {
        let w = &self.workspaces[self.ws_by_id(b.ws_id)?];
        let mut resources = Vec::new();
        if b.resources_done {
            if b.transition == Transition::Start {
                resources.push(model::WorkspaceResource {
                    id: b.container_id,
                    created_at: b.job_completed_at.unwrap_or(b.created_at),
                    job_id: b.job_id,
                    workspace_transition: b.transition,
                    kind: "docker_container".into(),
                    name: "workspace".into(),
                    hide: false,
                    icon: "/icon/docker.png".into(),
                    agents: b.agents.iter().map(|a| self.render_agent(b, a)).collect(),
                    metadata: vec![model::ResourceMetadata {
                        key: "image".into(),
                        value: "codercom/enterprise-base:ubuntu".into(),
                        sensitive: false,
                    }],
                    daily_cost: 0,
                });
            }
            if b.transition != Transition::Delete {
                resources.push(model::WorkspaceResource {
                    id: b.volume_id,
                    created_at: b.job_completed_at.unwrap_or(b.created_at),
                    job_id: b.job_id,
                    workspace_transition: b.transition,
                    kind: "docker_volume".into(),
                    name: "home".into(),
                    hide: true,
                    icon: String::new(),
                    agents: Vec::new(),
                    metadata: Vec::new(),
                    daily_cost: 0,
                });
            }
        }
        let version_name = if b.version == self.active_version {
            "v2-sim"
        } else {
            "v1-sim"
        };
        Some(model::WorkspaceBuild {
            id: b.id,
            created_at: b.created_at,
            updated_at: b.updated_at,
            workspace_id: w.id,
            workspace_name: w.name.clone(),
            workspace_owner_id: w.owner_id,
            workspace_owner_name: w.owner_name.clone(),
            workspace_owner_avatar_url: String::new(),
            template_version_id: b.version,
            template_version_name: version_name.into(),
            build_number: b.number,
            transition: b.transition,
            initiator_id: b.initiator_id,
            initiator_name: b.initiator_name.clone(),
            job: model::ProvisionerJob {
                id: b.job_id,
                created_at: b.job_created_at,
                started_at: b.job_started_at,
                completed_at: b.job_completed_at,
                canceled_at: None,
                error: b.job_error.clone(),
                error_code: String::new(),
                status: b.job_status,
                worker_id: b.job_started_at.map(|_| self.org_id),
                file_id: self.template_id,
                tags: BTreeMap::from([
                    ("owner".to_string(), String::new()),
                    ("scope".to_string(), "organization".to_string()),
                ]),
                queue_position: 0,
                queue_size: 0,
                organization_id: self.org_id,
                input: model::JobInput {
                    workspace_build_id: b.id,
                },
                kind: "workspace_build".into(),
            },
            reason: b.reason.clone(),
            resources,
            deadline: None,
            max_deadline: None,
            status: WorkspaceStatus::derive(b.transition, b.job_status),
            daily_cost: 0,
            template_version_preset_id: None,
        })
    }

    pub fn render_agent(&self, b: &BuildRec, a: &AgentRec) -> model::WorkspaceAgent {
        let (healthy, reason) = match a.status {
            AgentStatus::Connected => match a.lifecycle {
                Lifecycle::StartError => (false, "agent startup script exited with an error"),
                _ => (true, ""),
            },
            AgentStatus::Connecting => (false, "agent is not running"),
            AgentStatus::Timeout => (false, "agent is taking too long to connect"),
            AgentStatus::Disconnected => (false, "agent has lost connection"),
        };
        let mut log_sources = Vec::new();
        let mut scripts = Vec::new();
        if let Some(s) = &a.spec.startup_script {
            log_sources.push(model::AgentLogSource {
                workspace_agent_id: a.id,
                id: a.log_source_id,
                created_at: a.created_at,
                display_name: "Startup Script".into(),
                icon: "/emojis/25b6.png".into(),
            });
            scripts.push(model::AgentScript {
                id: a.script_id,
                log_source_id: a.log_source_id,
                log_path: "/tmp/coder-startup-script.log".into(),
                script: "#!/bin/sh\necho sim".into(),
                cron: String::new(),
                run_on_start: true,
                run_on_stop: false,
                start_blocks_login: s.blocks_login,
                timeout: 0,
                display_name: "Startup Script".into(),
            });
        }
        let blocking = a.spec.startup_script.is_some_and(|s| s.blocks_login);
        let timeout_secs = a.spec.connection_timeout.as_secs_f64().ceil() as i32;
        model::WorkspaceAgent {
            id: a.id,
            parent_id: None,
            created_at: a.created_at,
            updated_at: a.updated_at,
            first_connected_at: a.first_connected_at,
            last_connected_at: a.last_connected_at,
            disconnected_at: a.disconnected_at,
            started_at: a.started_at,
            ready_at: a.ready_at,
            status: a.status,
            lifecycle_state: a.lifecycle,
            name: a.name.clone(),
            resource_id: b.container_id,
            instance_id: String::new(),
            architecture: "amd64".into(),
            environment_variables: BTreeMap::new(),
            operating_system: "linux".into(),
            logs_length: a.logs.iter().map(|l| l.output.len() as i32).sum(),
            logs_overflowed: false,
            directory: "/home/coder".into(),
            expanded_directory: "/home/coder".into(),
            version: "v2.99.0-sim".into(),
            api_version: "2.0".into(),
            apps: Vec::new(),
            latency: (a.status == AgentStatus::Connected).then(BTreeMap::new),
            connection_timeout_seconds: timeout_secs,
            troubleshooting_url: String::new(),
            subsystems: Vec::new(),
            health: model::AgentHealth {
                healthy,
                reason: reason.into(),
            },
            display_apps: vec!["ssh_helper".into(), "port_forwarding_helper".into()],
            log_sources,
            scripts,
            startup_script_behavior: if blocking { "blocking" } else { "non-blocking" }.into(),
        }
    }
}

impl Shared {
    /// Tells watch streams that this workspace may have changed.
    pub fn publish(&self, ws_id: Uuid) {
        let _ = self.events.send(ws_id);
    }

    pub fn spawn<F>(&self, fut: F)
    where
        F: std::future::Future<Output = ()> + Send + 'static,
    {
        let handle = self.rt.spawn(fut);
        let mut tasks = lock(&self.tasks);
        tasks.retain(|t| !t.is_finished());
        tasks.push(handle.abort_handle());
    }

    /// Runs `f` on the world and publishes the workspace id it returns.
    fn change(&self, f: impl FnOnce(&mut World) -> Option<Uuid>) -> bool {
        let changed = f(&mut lock(&self.world));
        if let Some(id) = changed {
            self.publish(id);
        }
        changed.is_some()
    }

    /// Starts the job timeline of a freshly queued build.
    pub fn drive_build(self: &Arc<Self>, build: Uuid, build_time: Duration) {
        let me = self.clone();
        self.spawn(async move { me.run_build(build, build_time).await });
    }

    async fn run_build(self: Arc<Self>, build: Uuid, build_time: Duration) {
        let queued = build_time / 10;
        tokio::time::sleep(queued).await;
        if !self.change(|w| w.job_running(build)) {
            return;
        }
        let Some(transition) = lock(&self.world).builds.get(&build).map(|b| b.transition) else {
            return;
        };
        let script = build_script(transition);
        let step = (build_time - queued) / script.len() as u32;
        for (stage, output) in script {
            lock(&self.world).build_log(build, stage, output, "info");
            tokio::time::sleep(step).await;
        }
        let done = lock(&self.world).job_done(build);
        let Some((ws_id, started)) = done else {
            return;
        };
        self.publish(ws_id);
        if started {
            self.tailnet_agents_started(build);
            self.start_agents(build, false);
        } else {
            self.schedule_linger_kill(build);
        }
    }

    /// After a stop/delete build succeeded: kill live connections after the
    /// workspace's linger time, unless a newer build came along.
    fn schedule_linger_kill(self: &Arc<Self>, build: Uuid) {
        let (linger, is_stop) = {
            let w = lock(&self.world);
            let Some(b) = w.builds.get(&build) else {
                return;
            };
            let linger = w
                .ws_by_id(b.ws_id)
                .map(|i| w.workspaces[i].spec.linger_after_stop)
                .unwrap_or_default();
            (
                linger,
                b.transition != Transition::Start && b.job_status == JobStatus::Succeeded,
            )
        };
        if !is_stop {
            return;
        }
        let me = self.clone();
        self.spawn(async move {
            tokio::time::sleep(linger).await;
            let w = lock(&me.world);
            if !w.is_latest(build) {
                return;
            }
            let Some(ws) = w.builds.get(&build).and_then(|b| w.ws_by_id(b.ws_id)) else {
                return;
            };
            for ep in w.workspaces[ws].endpoints.values() {
                ep.kill_connections();
            }
            let ws_id = w.workspaces[ws].id;
            drop(w);
            me.tailnet.stop_workspace_agents(ws_id);
        });
    }

    /// A start build succeeded: its agents come up on the tailnet (and the
    /// workspace's older agent peers go).
    pub fn tailnet_agents_started(&self, build: Uuid) {
        let found = {
            let w = lock(&self.world);
            w.builds.get(&build).and_then(|b| {
                let i = w.ws_by_id(b.ws_id)?;
                let eps = &w.workspaces[i].endpoints;
                let infos: Vec<AgentInfo> = b
                    .agents
                    .iter()
                    .filter_map(|a| {
                        eps.get(&a.name).map(|ep| AgentInfo {
                            id: a.id,
                            ws_id: b.ws_id,
                            name: a.name.clone(),
                            ssh: a.spec.tailnet_target.unwrap_or_else(|| ep.addr()),
                        })
                    })
                    .collect();
                Some((b.ws_id, infos))
            })
        };
        if let Some((ws_id, infos)) = found {
            self.tailnet.agents_started(ws_id, infos);
        }
    }

    /// Runs each agent's script for a start build that just succeeded.
    /// `settled`: the build finished long ago (a workspace added as running):
    /// agents without a delay reach their final state right now.
    pub fn start_agents(self: &Arc<Self>, build: Uuid, settled: bool) {
        let specs: Vec<AgentSpec> = {
            let w = lock(&self.world);
            match w.builds.get(&build) {
                Some(b) => b.agents.iter().map(|a| a.spec.clone()).collect(),
                None => return,
            }
        };
        for spec in specs {
            if settled && !spec.never_connects && spec.connect_after.is_zero() {
                let mut w = lock(&self.world);
                w.agent_connect(build, &spec.name);
                match spec.startup_script {
                    None => {
                        w.agent_lifecycle(build, &spec.name, Lifecycle::Ready);
                    }
                    Some(s) => {
                        w.agent_lifecycle(build, &spec.name, Lifecycle::Starting);
                        for (line, level) in script_lines(s.fails) {
                            w.agent_log(build, &spec.name, line, level);
                        }
                        let end = if s.fails {
                            Lifecycle::StartError
                        } else {
                            Lifecycle::Ready
                        };
                        w.agent_lifecycle(build, &spec.name, end);
                    }
                }
                continue;
            }
            let me = self.clone();
            self.spawn(async move { me.run_agent(build, spec).await });
        }
    }

    async fn run_agent(self: Arc<Self>, build: Uuid, spec: AgentSpec) {
        let name = spec.name.as_str();
        let timeout = spec.connection_timeout;
        if spec.never_connects {
            if !timeout.is_zero() {
                tokio::time::sleep(timeout).await;
                self.change(|w| w.agent_timeout(build, name));
            }
            return;
        }
        if !timeout.is_zero() && spec.connect_after > timeout {
            tokio::time::sleep(timeout).await;
            self.change(|w| w.agent_timeout(build, name));
            tokio::time::sleep(spec.connect_after - timeout).await;
        } else {
            tokio::time::sleep(spec.connect_after).await;
        }
        if !self.change(|w| w.agent_connect(build, name)) {
            return;
        }
        let Some(script) = spec.startup_script else {
            self.change(|w| w.agent_lifecycle(build, name, Lifecycle::Ready));
            return;
        };
        if !self.change(|w| w.agent_lifecycle(build, name, Lifecycle::Starting)) {
            return;
        }
        let lines = script_lines(script.fails);
        let step = script.duration / lines.len() as u32;
        for (line, level) in lines {
            if !lock(&self.world).agent_log(build, name, line, level) {
                return;
            }
            tokio::time::sleep(step).await;
        }
        let end = if script.fails {
            Lifecycle::StartError
        } else {
            Lifecycle::Ready
        };
        self.change(|w| w.agent_lifecycle(build, name, end));
    }

    // ----- scripted changes (the Sim handle) ------------------------------

    pub fn set_agent_status(&self, ws: &str, agent: &str, s: AgentStatus) -> bool {
        self.change(|w| {
            let i = w.ws_by_name(ws)?;
            let ws_id = w.workspaces[i].id;
            let a = w.current_agent_mut(i, agent)?;
            let at = now();
            a.status = s;
            a.updated_at = at;
            match s {
                AgentStatus::Connected => {
                    a.first_connected_at.get_or_insert(at);
                    a.last_connected_at = Some(at);
                }
                AgentStatus::Disconnected => a.disconnected_at = Some(at),
                AgentStatus::Connecting | AgentStatus::Timeout => {}
            }
            w.touch_ws(ws_id);
            Some(ws_id)
        })
    }

    pub fn set_agent_lifecycle(&self, ws: &str, agent: &str, l: Lifecycle) -> bool {
        self.change(|w| {
            let i = w.ws_by_name(ws)?;
            let ws_id = w.workspaces[i].id;
            let a = w.current_agent_mut(i, agent)?;
            let at = now();
            a.lifecycle = l;
            a.updated_at = at;
            match l {
                Lifecycle::Starting => a.started_at = Some(at),
                Lifecycle::Ready | Lifecycle::StartError | Lifecycle::StartTimeout => {
                    a.ready_at = Some(at)
                }
                _ => {}
            }
            w.touch_ws(ws_id);
            Some(ws_id)
        })
    }

    /// Queues a build without the API's checks (scripted / autostart style).
    pub fn scripted_build(
        self: &Arc<Self>,
        ws: &str,
        transition: Transition,
        reason: &str,
    ) -> bool {
        let queued = {
            let mut w = lock(&self.world);
            let Some(i) = w.ws_by_name(ws).filter(|&i| !w.workspaces[i].deleted) else {
                return false;
            };
            let (version, params) = match w.latest(i) {
                Some(b) => (b.version, b.params.clone()),
                None => (w.active_version, Vec::new()),
            };
            let id = w.new_build(i, transition, version, reason, params);
            Some((id, w.workspaces[i].id, w.workspaces[i].spec.build_time))
        };
        match queued {
            Some((build, ws_id, build_time)) => {
                self.publish(ws_id);
                self.drive_build(build, build_time);
                true
            }
            None => false,
        }
    }

    /// `POST /workspaces/{id}/builds`.
    pub fn api_build(
        self: &Arc<Self>,
        ws_id: Uuid,
        req: model::CreateBuildRequest,
    ) -> Result<model::WorkspaceBuild, Refusal> {
        let transition = match req.transition.as_str() {
            "start" => Transition::Start,
            "stop" => Transition::Stop,
            "delete" => Transition::Delete,
            other => {
                let mut r = Refusal::new(400, "Validation failed.");
                r.body.validations.push(model::Validation {
                    field: "transition".into(),
                    detail: format!("Validation failed for tag \"oneof\" with value: \"{other}\""),
                });
                return Err(r);
            }
        };
        let (build, build_time, rendered) = {
            let mut w = lock(&self.world);
            let i = w.ws_by_id(ws_id).ok_or_else(Refusal::not_found)?;
            if w.workspaces[i].deleted {
                return Err(Refusal::new(410, "Workspace has been deleted."));
            }
            let latest = w.latest(i).ok_or_else(Refusal::not_found)?;
            if matches!(latest.job_status, JobStatus::Pending | JobStatus::Running) {
                return Err(
                    Refusal::new(409, "A workspace build is already active.").detail(format!(
                        "build #{} is {:?}",
                        latest.number, latest.job_status
                    )),
                );
            }
            let running =
                latest.transition == Transition::Start && latest.job_status == JobStatus::Succeeded;
            if req.reason.as_deref() == Some("ssh_connection")
                && transition == Transition::Start
                && running
            {
                return Err(Refusal::new(409, "Workspace is already running."));
            }
            // Go clients send the zero UUID for "not specified".
            let version = req
                .template_version_id
                .filter(|v| !v.is_nil())
                .unwrap_or(latest.version);
            if version != w.active_version && version != w.old_version {
                return Err(Refusal::new(400, "Template version not found.")
                    .detail(format!("no template version {version}")));
            }
            let spec = &w.workspaces[i].spec;
            if transition == Transition::Start {
                if w.workspaces[i].dormant_at.is_some() {
                    return Err(Refusal::new(403, "Workspace is dormant.").detail(
                        "Activate the workspace (PUT /dormant {\"dormant\":false}) before starting it.",
                    ));
                }
                if spec.require_active_version && version != w.active_version {
                    return Err(Refusal::new(
                        403,
                        "cannot use non-active version: template requires active version",
                    ));
                }
            }
            let mut params = latest.params.clone();
            for p in req.rich_parameter_values.unwrap_or_default() {
                match params.iter_mut().find(|q| q.name == p.name) {
                    Some(q) => q.value = p.value,
                    None => params.push(p),
                }
            }
            let reason = req.reason.unwrap_or_else(|| "initiator".into());
            let build_time = spec.build_time;
            let id = w.new_build(i, transition, version, &reason, params);
            let rendered = w
                .builds
                .get(&id)
                .and_then(|b| w.render_build(b))
                .ok_or_else(Refusal::not_found)?;
            (id, build_time, rendered)
        };
        self.publish(ws_id);
        self.drive_build(build, build_time);
        Ok(rendered)
    }

    /// Adds a workspace in its initial state (endpoints already started).
    pub fn insert_workspace(
        self: &Arc<Self>,
        spec: WorkspaceSpec,
        endpoints: BTreeMap<String, Arc<AgentEndpoint>>,
    ) -> anyhow::Result<()> {
        let owner = spec.owner.clone().unwrap_or_else(|| self.owner.clone());
        let mut w = lock(&self.world);
        if w.ws_by_owner_name(&owner, &spec.name, false).is_some() {
            anyhow::bail!("workspace {owner}/{} already exists", spec.name);
        }
        let owner_id = w.user_id(&owner);
        let old_version = spec.outdated || spec.require_active_version;
        let version = if old_version {
            w.old_version
        } else {
            w.active_version
        };
        let at = now();
        let ws_id = Uuid::new_v4();
        for ep in endpoints.values() {
            ep.set_accepting(spec.initial == Initial::Running);
        }
        w.workspaces.push(WsRec {
            id: ws_id,
            name: spec.name.clone(),
            owner_id,
            owner_name: owner,
            created_at: at,
            updated_at: at,
            last_used_at: at,
            fail_next_start: spec.fail_next_start,
            dormant_at: spec.dormant.then_some(at),
            deleted: false,
            builds: Vec::new(),
            endpoints,
            usage: 0,
            spec: spec.clone(),
        });
        let i = w.workspaces.len() - 1;
        let params = spec.parameters.clone();
        let mut drive = None;
        let mut settle = None;
        match spec.initial {
            Initial::Running => {
                let b = w.new_build(i, Transition::Start, version, "initiator", params);
                w.job_running(b);
                w.fill_logs(b);
                w.job_done(b);
                settle = Some(b);
            }
            Initial::Stopped => {
                let b = w.new_build(i, Transition::Start, version, "initiator", params.clone());
                w.job_running(b);
                w.fill_logs(b);
                w.job_done(b);
                if let Some(b) = w.builds.get_mut(&b) {
                    for a in &mut b.agents {
                        a.status = AgentStatus::Disconnected;
                        a.first_connected_at = Some(at);
                        a.last_connected_at = Some(at);
                        a.disconnected_at = Some(at);
                        a.lifecycle = Lifecycle::Off;
                    }
                }
                let s = w.new_build(i, Transition::Stop, version, "autostop", params);
                w.job_running(s);
                w.fill_logs(s);
                w.job_done(s);
            }
            Initial::Failed => {
                let b = w.new_build(i, Transition::Start, version, "initiator", params);
                if let Some(b) = w.builds.get_mut(&b) {
                    b.will_fail = true;
                }
                w.job_running(b);
                w.fill_logs(b);
                w.job_done(b);
            }
            Initial::Starting => {
                let b = w.new_build(i, Transition::Start, version, "initiator", params);
                drive = Some(b);
            }
        }
        // Setting up the history must not leave the initial logs or an
        // endpoint state behind that contradict the initial state.
        for ep in w.workspaces[i].endpoints.values() {
            ep.set_accepting(spec.initial == Initial::Running);
        }
        // fail_next_start was consumed only by a scripted failed build above.
        w.workspaces[i].fail_next_start = spec.fail_next_start;
        drop(w);
        if let Some(b) = settle {
            self.tailnet_agents_started(b);
            self.start_agents(b, true);
        }
        if let Some(b) = drive {
            self.drive_build(b, spec.build_time);
        }
        self.publish(ws_id);
        Ok(())
    }
}

/// Agent log lines of a startup script.
fn script_lines(fails: bool) -> Vec<(&'static str, &'static str)> {
    let mut v = vec![
        ("sim: startup script started", "info"),
        ("Installing tools (1/3)", "info"),
        ("Installing tools (2/3)", "info"),
        ("Installing tools (3/3)", "info"),
    ];
    v.push(if fails {
        ("sim: startup script failed: exit status 1", "error")
    } else {
        ("sim: startup script finished", "info")
    });
    v
}
