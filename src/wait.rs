//! Drives readiness to a connected stream.
//!
//! Looks the workspace up (retrying while coderd is unreachable), follows the
//! watch stream so a state change is acted on as soon as coderd publishes it
//! (with a slow poll as a safety net), starts stopped workspaces (retrying
//! the start's requests on 5xx), prints each stage and a "still waiting"
//! line every 10 s, enforces `--wait-timeout` per stage, and dials once
//! [`decide`] says so — retrying a dial that failed for a reason a retry
//! can fix ([`crate::tunnel::is_transient`]) with the same backoff.

use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Result};

use crate::cli::WaitMode;
use crate::coderd::models::*;
use crate::coderd::watch::{spawn_watcher, WatchState};
use crate::coderd::{ApiError, Client};
use crate::progress::{Progress, STILL_WAITING_EVERY};
use crate::readiness::{decide, Decision, Policy, Stage};
use crate::target::Target;
use crate::tunnel::{AgentStream, DialTarget, Tunnel};

/// Poll interval while the watch stream is healthy (a safety net only).
const POLL_HEALTHY: Duration = Duration::from_secs(5);
/// Poll interval while the watch stream is down, and for logs.
const POLL_FAST: Duration = Duration::from_secs(1);
/// Backoff bounds for retries against coderd and the agent.
const RETRY_MIN: Duration = Duration::from_millis(250);
const RETRY_MAX: Duration = Duration::from_secs(4);

/// Everything the wait needs.
pub struct Waiter<'a> {
    pub client: &'a Client,
    pub target: &'a Target,
    pub autostart: bool,
    pub wait: WaitMode,
    pub tunnel: &'a Tunnel,
    /// Per-stage bound; `None` waits forever.
    pub timeout: Option<Duration>,
}

/// The result of a successful wait.
pub struct Connected {
    pub workspace: Workspace,
    pub agent_id: String,
    pub agent_name: String,
    pub stream: AgentStream,
    /// The watch subscription, handed on to watch-and-close.
    pub watch: tokio::sync::watch::Receiver<WatchState>,
}

enum StartError {
    Conflict(ApiError),
    Other(anyhow::Error),
}

impl Waiter<'_> {
    /// Wait until the agent is reachable and return a stream to it.
    pub async fn run(&self) -> Result<Connected> {
        let mut progress = Progress::new();
        let t0 = Instant::now();
        let mut ws = self
            .retry(&mut progress, "look up the workspace", || {
                self.client
                    .workspace_by_name(&self.target.owner, &self.target.workspace)
            })
            .await
            .map_err(|e| lookup_error(e, self.target))?;
        log::debug!(
            "workspace {} found in {}ms",
            ws.id,
            t0.elapsed().as_millis()
        );
        let mut watch = spawn_watcher(self.client.clone(), ws.id.clone());

        let mut autostart = self.autostart;
        let mut stage: Option<Stage> = None;
        let mut stage_started = Instant::now();
        let mut next_still = Instant::now() + STILL_WAITING_EVERY;
        let mut last_poll = Instant::now();
        let mut watch_down = false;
        let mut api_trouble: Option<String> = None;
        // The build whose log we follow, the last line printed, and whether
        // its tail was printed when the build stage ended.
        let mut build_log_after = (String::new(), 0i64);
        let mut build_log_done = true;
        let mut agent_log_after = 0i64;
        let mut waited_scripts = false;
        let mut dial_backoff = RETRY_MIN;
        let mut last_dial_error: Option<String> = None;
        // When the current run of failed dials began.
        let mut dialing_since: Option<Instant> = None;

        loop {
            let policy = Policy {
                autostart,
                wait: self.wait,
            };
            let decision = decide(&ws, self.target, &policy);
            log::debug!("decision: {decision:?}");
            // A build can finish between two looks at its log: when its
            // stage ends, print the lines we have not shown yet (as `coder
            // ssh` streams the whole log).
            let still_building = matches!(decision, Decision::Wait(Stage::Build { .. }))
                && ws.latest_build.id == build_log_after.0;
            if !build_log_done && !still_building {
                let id = build_log_after.0.clone();
                self.print_build_logs(&progress, &id, &mut build_log_after.1)
                    .await;
                build_log_done = true;
            }
            let wait_stage = match decision {
                Decision::Fail(msg) => {
                    progress.finish_stage(false);
                    bail!(msg);
                }
                Decision::StartBuild => {
                    progress.line(&format!(
                        "Workspace was stopped, starting workspace to allow connecting to {:?}...",
                        ws.name
                    ));
                    match self.start(&mut progress, &ws).await {
                        Ok(build) => {
                            log::info!("started build {} (#{})", build.id, build.build_number);
                            ws.latest_build = build;
                        }
                        Err(StartError::Conflict(e)) => {
                            log::info!("start conflict: {e}");
                            progress.line("Unable to start the workspace due to conflict, the workspace may be starting, retrying without autostart...");
                            autostart = false;
                            let id = ws.id.clone();
                            ws = self
                                .retry(&mut progress, "look up the workspace", || {
                                    self.client.workspace(&id)
                                })
                                .await
                                .map_err(|e| anyhow!("{e}"))?;
                        }
                        Err(StartError::Other(e)) => return Err(e),
                    }
                    continue;
                }
                Decision::Connect {
                    agent_id,
                    agent_name,
                } => {
                    let dt = DialTarget {
                        owner: ws.owner_name.clone(),
                        workspace: ws.name.clone(),
                        agent: agent_name.clone(),
                        agent_id: agent_id.clone(),
                    };
                    let dial_started = Instant::now();
                    match self.tunnel.dial(self.client, &dt).await {
                        Ok(stream) => {
                            log::info!(
                                "connected to agent {agent_name} in {}ms (dial {}ms)",
                                t0.elapsed().as_millis(),
                                dial_started.elapsed().as_millis()
                            );
                            if progress.in_stage() {
                                progress.finish_stage(true);
                            }
                            if waited_scripts {
                                script_warnings(&progress, &ws, &agent_id);
                            }
                            return Ok(Connected {
                                workspace: ws,
                                agent_id,
                                agent_name,
                                stream,
                                watch,
                            });
                        }
                        Err(e) if !matches!(self.tunnel, Tunnel::Tcp(_)) => {
                            // Tailnet or Coder Connect: coderd, its load
                            // balancer, a proxy or the relay may be having a
                            // bad moment; retry what can recover, within
                            // the wait timeout, and fail at once otherwise.
                            let over = self.tunnel.describe();
                            if !crate::tunnel::is_transient(&e) {
                                progress.finish_stage(false);
                                if let Some(hint) = crate::tunnel::refusal_hint(&e, &dt) {
                                    bail!("{hint}: {e:#}");
                                }
                                return Err(e.context(format!("cannot reach the agent {over}")));
                            }
                            let since = *dialing_since.get_or_insert_with(Instant::now);
                            if self
                                .timeout
                                .is_some_and(|t| since.elapsed() + dial_backoff > t)
                            {
                                progress.finish_stage(false);
                                bail!(
                                    "timed out after {} trying to reach the agent {over} (last error: {e:#}); check the deployment and its proxy, or raise --wait-timeout",
                                    fmt_duration(since.elapsed())
                                );
                            }
                            progress.line(&format!(
                                "cannot reach the agent {over} ({e:#}); retrying in {:.1}s",
                                dial_backoff.as_secs_f64()
                            ));
                            tokio::time::sleep(dial_backoff).await;
                            dial_backoff = (dial_backoff * 2).min(RETRY_MAX);
                            if let Ok(fresh) = self.refetch(&ws).await {
                                ws = fresh;
                            }
                            continue;
                        }
                        Err(e) => {
                            // coderd says the agent is connected but its SSH
                            // server does not answer yet: retry while that
                            // holds, within the wait timeout.
                            let msg = format!("{e:#}");
                            if last_dial_error.as_deref() != Some(msg.as_str()) {
                                progress.line(&format!(
                                    "cannot reach the agent's SSH server ({msg}); retrying while the agent is connected"
                                ));
                            }
                            last_dial_error = Some(msg);
                            let since = *dialing_since.get_or_insert_with(Instant::now);
                            if self.timeout.is_some_and(|t| since.elapsed() >= t) {
                                progress.finish_stage(false);
                                bail!(
                                    "timed out after {} waiting for the agent's SSH server to accept connections (last error: {}); check --tunnel and the agent",
                                    fmt_duration(since.elapsed()),
                                    last_dial_error.as_deref().unwrap_or("")
                                );
                            }
                            tokio::time::sleep(dial_backoff).await;
                            dial_backoff = (dial_backoff * 2).min(Duration::from_secs(2));
                            if let Ok(fresh) = self.refetch(&ws).await {
                                ws = fresh;
                            }
                            continue;
                        }
                    }
                }
                Decision::Wait(s) => s,
            };
            dialing_since = None;
            dial_backoff = RETRY_MIN;

            // Waiting: announce the stage once.
            if stage.as_ref() != Some(&wait_stage) {
                stage_started = Instant::now();
                next_still = Instant::now() + STILL_WAITING_EVERY;
                self.announce(&mut progress, &wait_stage, &ws);
                if wait_stage == Stage::Scripts {
                    waited_scripts = true;
                }
                stage = Some(wait_stage.clone());
            }
            let what = wait_stage.describe();
            if let Some(limit) = self.timeout {
                if stage_started.elapsed() >= limit {
                    progress.finish_stage(false);
                    bail!(
                        "timed out after {} waiting for {what}; {}",
                        fmt_duration(limit),
                        timeout_hint(&wait_stage, &ws)
                    );
                }
            }
            // Logs for the stages that have them.
            match &wait_stage {
                Stage::Build { .. } => {
                    if build_log_after.0 != ws.latest_build.id {
                        build_log_after = (ws.latest_build.id.clone(), 0);
                    }
                    build_log_done = false;
                    let id = build_log_after.0.clone();
                    self.print_build_logs(&progress, &id, &mut build_log_after.1)
                        .await;
                }
                Stage::Scripts => {
                    if let Some(agent) = self.chosen_agent(&ws) {
                        if let Ok(logs) = self.client.agent_logs(&agent.id, agent_log_after).await {
                            for l in logs {
                                agent_log_after = agent_log_after.max(l.id);
                                let src = agent
                                    .log_sources
                                    .iter()
                                    .find(|s| s.id == l.source_id)
                                    .map(|s| s.display_name.as_str())
                                    .unwrap_or("startup");
                                progress.line(&format!("    {src}: {}", l.output));
                            }
                        }
                    }
                }
                _ => {}
            }

            let poll_every =
                if watch_down || matches!(wait_stage, Stage::Build { .. } | Stage::Scripts) {
                    POLL_FAST
                } else {
                    POLL_HEALTHY
                };
            let deadline = self
                .timeout
                .map(|t| stage_started + t)
                .unwrap_or_else(|| Instant::now() + Duration::from_secs(86400));
            let poll_at = last_poll + poll_every;
            tokio::select! {
                changed = watch.changed() => {
                    if changed.is_err() {
                        bail!("internal error: the watch task ended");
                    }
                    let state = watch.borrow_and_update().clone();
                    match state {
                        WatchState::Snapshot(fresh) => {
                            watch_down = false;
                            if fresh.latest_build.build_number >= ws.latest_build.build_number {
                                ws = *fresh;
                            }
                        }
                        WatchState::Down(e) => {
                            if !watch_down {
                                log::info!("watch stream down ({e}); polling every {}s", POLL_FAST.as_secs());
                            }
                            watch_down = true;
                        }
                        WatchState::Gone => bail!("workspace {:?} was deleted while waiting", ws.name),
                        WatchState::Connecting => {}
                    }
                }
                _ = tokio::time::sleep_until(poll_at.into()) => {
                    last_poll = Instant::now();
                    match self.refetch(&ws).await {
                        Ok(fresh) => {
                            if api_trouble.take().is_some() {
                                progress.line("coderd is reachable again");
                            }
                            if fresh.latest_build.build_number >= ws.latest_build.build_number {
                                ws = fresh;
                            }
                        }
                        Err(e) if e.is_transient() => {
                            let m = e.to_string();
                            if api_trouble.as_deref() != Some(m.as_str()) {
                                progress.line(&format!("coderd is not answering ({m}); still waiting and retrying"));
                                api_trouble = Some(m);
                            }
                        }
                        Err(e) => bail!("{e}"),
                    }
                }
                _ = tokio::time::sleep_until(next_still.into()) => {
                    next_still = Instant::now() + STILL_WAITING_EVERY;
                    progress.line(&format!(
                        "    still waiting for {what} ({}s)",
                        stage_started.elapsed().as_secs()
                    ));
                }
                _ = tokio::time::sleep_until(deadline.into()) => {}
            }
        }
    }

    /// Prints the lines of a build's log after `after` (best effort: a
    /// failed read is retried on the next look) and moves `after` on.
    async fn print_build_logs(&self, progress: &Progress, build_id: &str, after: &mut i64) {
        if let Ok(logs) = self.client.build_logs(build_id, *after).await {
            for l in logs {
                *after = (*after).max(l.id);
                if !l.output.is_empty() {
                    progress.line(&format!("    {}: {}", l.stage, l.output));
                }
            }
        }
    }

    fn chosen_agent<'w>(&self, ws: &'w Workspace) -> Option<&'w Agent> {
        let agents = ws.latest_build.agents();
        match &self.target.agent {
            Some(n) => agents.into_iter().find(|a| &a.name == n || &a.id == n),
            None if agents.len() == 1 => agents.into_iter().next(),
            None => None,
        }
    }

    fn announce(&self, progress: &mut Progress, stage: &Stage, ws: &Workspace) {
        let title = match stage {
            Stage::Build { transition, job } => match job {
                JobStatus::Pending => format!(
                    "Queued ({transition} build #{})",
                    ws.latest_build.build_number
                ),
                JobStatus::Canceling => format!("Canceling the {transition} build"),
                _ => format!(
                    "Running the {transition} build #{}",
                    ws.latest_build.build_number
                ),
            },
            Stage::Stopping => "Waiting for the workspace to stop before starting it".into(),
            Stage::AgentConnecting => "Waiting for the workspace agent to connect".into(),
            Stage::AgentTimeout => "Waiting for the workspace agent to connect".into(),
            Stage::AgentDisconnected => "The workspace agent lost connection".into(),
            Stage::Scripts => "Running workspace agent startup scripts".into(),
            Stage::Unknown(s) => format!("Waiting for the workspace (state {s:?})"),
        };
        progress.stage(&title);
        let trouble = self
            .chosen_agent(ws)
            .map(|a| a.troubleshooting_url.clone())
            .filter(|u| !u.is_empty())
            .map(|u| format!(" and {u}"))
            .unwrap_or_default();
        match stage {
            Stage::AgentTimeout => progress.line(&format!(
                "The workspace agent is having trouble connecting, wait for it to connect or restart your workspace. For more information and troubleshooting, see https://coder.com/docs/admin/templates/troubleshooting#agent-connection-issues{trouble}"
            )),
            Stage::AgentDisconnected => progress.line(&format!(
                "Wait for it to reconnect or restart your workspace. For more information and troubleshooting, see https://coder.com/docs/admin/templates/troubleshooting#agent-connection-issues{trouble}"
            )),
            Stage::Scripts => progress.line("==> ℹ︎ To connect immediately, reconnect with --wait=no or CODER_SSH_WAIT=no, see --help for more information."),
            _ => {}
        }
    }

    async fn refetch(&self, ws: &Workspace) -> Result<Workspace, ApiError> {
        self.client.workspace(&ws.id).await
    }

    /// Create a start build: wake a dormant workspace, reuse the last build's
    /// parameters, and fall back to the active version when required.
    async fn start(
        &self,
        progress: &mut Progress,
        ws: &Workspace,
    ) -> Result<WorkspaceBuild, StartError> {
        if ws.dormant_at.is_some() {
            progress.line("Activating dormant workspace...");
            self.retry(progress, "activate the dormant workspace", || {
                self.client.wake_dormant(&ws.id)
            })
            .await
            .map_err(|e| StartError::Other(anyhow!("activate dormant workspace: {e}")))?;
        }
        let params = self
            .retry(progress, "read the last build's parameters", || {
                self.client.build_parameters(&ws.latest_build.id)
            })
            .await
            .map_err(|e| {
                StartError::Other(anyhow!(
                    "start workspace: read the last build's parameters: {e}"
                ))
            })?;
        let use_active = ws.automatic_updates == "always" || ws.template_require_active_version;
        let version = if use_active {
            ws.template_active_version_id.clone()
        } else {
            ws.latest_build.template_version_id.clone()
        };
        let mut req = CreateBuild {
            transition: Transition::Start,
            template_version_id: version,
            rich_parameter_values: params,
            reason: None,
        };
        // A 5xx from coderd or its load balancer is retried; should the
        // build have been created anyway, the retry gets a 409 and we wait
        // for that build like any other start in progress.
        match self
            .retry(progress, "start the workspace", || {
                self.client.create_build(&ws.id, &req)
            })
            .await
        {
            Ok(b) => Ok(b),
            Err(e) if e.status() == Some(409) => Err(StartError::Conflict(e)),
            Err(e)
                if e.status() == Some(403)
                    && !use_active
                    && !ws.template_active_version_id.is_empty() =>
            {
                log::info!("start with the last version refused: {e}");
                req.template_version_id = ws.template_active_version_id.clone();
                let b = self
                    .retry(progress, "start the workspace", || {
                        self.client.create_build(&ws.id, &req)
                    })
                    .await
                    .map_err(|e| match e.status() {
                        Some(409) => StartError::Conflict(e),
                        _ => StartError::Other(anyhow!(
                            "start workspace with active template version: {e}"
                        )),
                    })?;
                progress.line("Unable to start the workspace with template version from last build. Your workspace has been updated to the current active template version.");
                Ok(b)
            }
            Err(e) => Err(StartError::Other(anyhow!(
                "start workspace with current template version: {e}"
            ))),
        }
    }

    /// Run `f` until it succeeds or fails permanently, retrying transient
    /// errors with backoff within the wait timeout.
    async fn retry<T, F, Fut>(
        &self,
        progress: &mut Progress,
        what: &str,
        mut f: F,
    ) -> Result<T, ApiError>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T, ApiError>>,
    {
        let started = Instant::now();
        let mut backoff = RETRY_MIN;
        loop {
            match f().await {
                Ok(v) => return Ok(v),
                Err(e) if e.is_transient() => {
                    if self
                        .timeout
                        .is_some_and(|t| started.elapsed() + backoff > t)
                    {
                        return Err(e);
                    }
                    progress.line(&format!(
                        "coderd is not answering ({e}); retrying to {what} in {:.1}s",
                        backoff.as_secs_f64()
                    ));
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(RETRY_MAX);
                }
                Err(e) => return Err(e),
            }
        }
    }
}

fn lookup_error(e: ApiError, target: &Target) -> anyhow::Error {
    match e.status() {
        Some(404) => anyhow!(
            "workspace {}/{} not found: {e}; check the name with 'coder list'",
            target.owner,
            target.workspace
        ),
        _ => anyhow!(
            "look up workspace {}/{}: {e}",
            target.owner,
            target.workspace
        ),
    }
}

fn script_warnings(progress: &Progress, ws: &Workspace, agent_id: &str) {
    let Some(agent) = ws
        .latest_build
        .agents()
        .into_iter()
        .find(|a| a.id == agent_id)
    else {
        return;
    };
    match agent.lifecycle_state {
        Lifecycle::StartTimeout => progress.line("Warning: A startup script timed out and your workspace may be incomplete."),
        Lifecycle::StartError => progress.line("Warning: A startup script exited with an error and your workspace may be incomplete. For more information and troubleshooting, see https://coder.com/docs/admin/templates/troubleshooting#startup-script-exited-with-an-error"),
        _ => {}
    }
}

fn timeout_hint(stage: &Stage, ws: &Workspace) -> String {
    let name = format!("{}/{}", ws.owner_name, ws.name);
    match stage {
        Stage::Build { .. } | Stage::Stopping => format!(
            "check the build in the dashboard ('coder show {name}') or raise --wait-timeout"
        ),
        Stage::AgentConnecting | Stage::AgentTimeout | Stage::AgentDisconnected => {
            format!("the agent is not connected to coderd; restart the workspace ('coder restart {name}') or raise --wait-timeout")
        }
        Stage::Scripts => "connect now with --wait=no, or raise --wait-timeout".into(),
        Stage::Unknown(_) => {
            "check the agent's SSH server and the --tunnel address, or raise --wait-timeout".into()
        }
    }
}

fn fmt_duration(d: Duration) -> String {
    let s = d.as_secs();
    if s == 0 {
        format!("{}ms", d.as_millis())
    } else if s % 3600 == 0 {
        format!("{}h", s / 3600)
    } else if s % 60 == 0 {
        format!("{}m", s / 60)
    } else {
        format!("{s}s")
    }
}
