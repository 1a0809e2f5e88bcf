//! The pure readiness decision: (workspace, target, policy) → what to do next.
//!
//! No I/O here, so every combination of workspace status × job status ×
//! transition and agent status × lifecycle × wait mode is tested as a table.
//! The rule it encodes (reference §4): start a stopped workspace, wait while a
//! build runs, and dial only when the agent is `connected` — and, when waiting
//! for scripts, once its lifecycle has left `created`/`starting`.

use crate::cli::WaitMode;
use crate::coderd::models::*;
use crate::target::{choose_agent, Target};

/// Inputs that are not the workspace itself.
#[derive(Clone, Debug)]
pub struct Policy {
    pub autostart: bool,
    pub wait: WaitMode,
}

/// A named wait; the driver prints it once and then "still waiting" lines.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Stage {
    /// A build job is queued or running.
    Build {
        transition: Transition,
        job: JobStatus,
    },
    /// A stop is in progress; we start the workspace once it is stopped.
    Stopping,
    AgentConnecting,
    /// Never connected within its timeout; it may still connect.
    AgentTimeout,
    AgentDisconnected,
    /// Blocking startup scripts are running.
    Scripts,
    /// A status this build does not know; wait for a known one.
    Unknown(String),
}

impl Stage {
    /// Human text for "waiting for …" lines.
    pub fn describe(&self) -> String {
        match self {
            Stage::Build { transition, job } => match (transition, job) {
                (_, JobStatus::Pending) => format!("the {transition} build to leave the queue"),
                _ => format!("the workspace {transition} build"),
            },
            Stage::Stopping => "the workspace to finish stopping".into(),
            Stage::AgentConnecting => "the workspace agent to connect".into(),
            Stage::AgentTimeout => {
                "the workspace agent to connect (it is having trouble connecting)".into()
            }
            Stage::AgentDisconnected => "the workspace agent to reconnect".into(),
            Stage::Scripts => "the workspace agent startup scripts".into(),
            Stage::Unknown(s) => format!("the workspace to leave the unknown state {s:?}"),
        }
    }
}

/// What the driver should do next.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    Wait(Stage),
    /// Create a start build (the workspace is stopped and autostart is on).
    StartBuild,
    /// Dial this agent (its id and name).
    Connect {
        agent_id: String,
        agent_name: String,
    },
    /// Give up with this one-line message.
    Fail(String),
}

/// Decide from one snapshot.
pub fn decide(ws: &Workspace, target: &Target, policy: &Policy) -> Decision {
    let b = &ws.latest_build;
    let name = format!("{}/{}", ws.owner_name, ws.name);
    let job_done = b.job.completed_at.is_some()
        || matches!(
            b.job.status,
            JobStatus::Succeeded | JobStatus::Failed | JobStatus::Canceled
        );

    match &b.transition {
        Transition::Delete => {
            return Decision::Fail(if b.status == WorkspaceStatus::Deleted {
                format!("workspace {name:?} is deleted")
            } else {
                format!("workspace {name:?} is being deleted")
            })
        }
        Transition::Stop => {
            if !policy.autostart {
                return Decision::Fail(format!(
                    "workspace must be started: {name:?} is {} and autostart is disabled; run 'coder start {name}' or drop --disable-autostart",
                    b.status
                ));
            }
            if b.job.status == JobStatus::Failed {
                return Decision::Fail(format!(
                    "workspace {name:?} is in failed state, unable to autostart the workspace: the last stop build failed{}",
                    job_error(b)
                ));
            }
            return match (&b.status, job_done) {
                (WorkspaceStatus::Stopped, _) => Decision::StartBuild,
                (WorkspaceStatus::Pending | WorkspaceStatus::Stopping, false) => Decision::Wait(Stage::Stopping),
                (WorkspaceStatus::Canceling, false) => Decision::Wait(Stage::Build {
                    transition: Transition::Stop,
                    job: b.job.status.clone(),
                }),
                (WorkspaceStatus::Unknown(s), false) => Decision::Wait(Stage::Unknown(s.clone())),
                (status, _) => Decision::Fail(format!(
                    "workspace must be started; was unable to autostart as the last build job is {:?}, expected \"stopped\"; run 'coder start {name}'",
                    status.as_str()
                )),
            };
        }
        Transition::Start => {}
        Transition::Unknown(t) => {
            return if job_done {
                Decision::Fail(format!(
                    "workspace {name:?} has a build with unknown transition {t:?}"
                ))
            } else {
                Decision::Wait(Stage::Unknown(t.clone()))
            }
        }
        Transition::Missing => {
            return Decision::Fail(format!(
                "workspace {name:?}: coderd sent no latest build; is --url a Coder deployment?"
            ))
        }
    }

    // A start build.
    if !job_done {
        return match b.job.status {
            JobStatus::Canceling => Decision::Wait(Stage::Build {
                transition: Transition::Start,
                job: JobStatus::Canceling,
            }),
            ref j => Decision::Wait(Stage::Build {
                transition: Transition::Start,
                job: j.clone(),
            }),
        };
    }

    let agents = b.agents();
    let agent = match choose_agent(
        &agents,
        |a| (a.name.as_str(), a.id.as_str()),
        &ws.name,
        target.agent.as_deref(),
    ) {
        Ok(a) => *a,
        Err(e) => {
            if b.job.status == JobStatus::Failed {
                return Decision::Fail(failed_start(&name, b));
            }
            return Decision::Fail(e);
        }
    };

    match b.job.status {
        JobStatus::Canceled => {
            return Decision::Fail(format!(
                "the start build of workspace {name:?} was canceled; run 'coder start {name}'"
            ))
        }
        // A failed start may still have a working agent; use it if coderd says so.
        JobStatus::Failed if agent.status != AgentStatus::Connected => {
            return Decision::Fail(failed_start(&name, b))
        }
        _ => {}
    }

    if agent.lifecycle_state.is_shutting_down() {
        return Decision::Fail(format!(
            "agent {:?} is shutting down (lifecycle {}); the workspace is stopping — start it again with 'coder start {name}'",
            agent.name, agent.lifecycle_state
        ));
    }
    match &agent.status {
        AgentStatus::Connected => {}
        AgentStatus::Connecting | AgentStatus::Missing => {
            return Decision::Wait(Stage::AgentConnecting)
        }
        AgentStatus::Timeout => return Decision::Wait(Stage::AgentTimeout),
        AgentStatus::Disconnected => return Decision::Wait(Stage::AgentDisconnected),
        AgentStatus::Unknown(s) => return Decision::Wait(Stage::Unknown(s.clone())),
    }
    let wait_scripts = match policy.wait {
        WaitMode::Yes => true,
        WaitMode::No => false,
        WaitMode::Auto => agent.scripts_block_login(),
    };
    if wait_scripts && agent.lifecycle_state.is_starting() {
        return Decision::Wait(Stage::Scripts);
    }
    Decision::Connect {
        agent_id: agent.id.clone(),
        agent_name: agent.name.clone(),
    }
}

fn job_error(b: &WorkspaceBuild) -> String {
    match b.job.error.as_deref().filter(|e| !e.is_empty()) {
        Some(e) => format!(": {}", crate::coderd::one_line(e, 300)),
        None => String::new(),
    }
}

fn failed_start(name: &str, b: &WorkspaceBuild) -> String {
    format!(
        "workspace {name:?} failed to start{}; fix the template or run 'coder start {name}' to retry",
        job_error(b)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const DONE: &str = "2026-01-01T00:00:00Z";
    /// Expected outcome: a decision, or a failure containing this text.
    type Want = Result<Decision, &'static str>;

    fn agent(name: &str, status: AgentStatus, life: Lifecycle, blocks: bool) -> Agent {
        Agent {
            id: format!("id-{name}"),
            name: name.into(),
            status,
            lifecycle_state: life,
            scripts: vec![AgentScript {
                start_blocks_login: blocks,
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    fn ws(t: Transition, s: WorkspaceStatus, j: JobStatus, agents: Vec<Agent>) -> Workspace {
        let done = matches!(
            j,
            JobStatus::Succeeded | JobStatus::Failed | JobStatus::Canceled
        );
        Workspace {
            id: "w".into(),
            name: "dev".into(),
            owner_name: "alice".into(),
            latest_build: WorkspaceBuild {
                id: "b".into(),
                transition: t,
                status: s,
                job: ProvisionerJob {
                    status: j,
                    completed_at: done.then(|| DONE.to_string()),
                    error: Some("boom".into()),
                    ..Default::default()
                },
                resources: vec![Resource {
                    name: "r".into(),
                    agents,
                }],
                ..Default::default()
            },
            ..Default::default()
        }
    }

    fn target(agent: Option<&str>) -> Target {
        Target {
            owner: "me".into(),
            workspace: "dev".into(),
            agent: agent.map(Into::into),
        }
    }

    fn pol(autostart: bool, wait: WaitMode) -> Policy {
        Policy { autostart, wait }
    }

    fn connect(name: &str) -> Decision {
        Decision::Connect {
            agent_id: format!("id-{name}"),
            agent_name: name.into(),
        }
    }

    fn is_fail(d: &Decision, needle: &str) -> bool {
        matches!(d, Decision::Fail(m) if m.contains(needle) && !m.contains('\n'))
    }

    #[test]
    fn workspace_table() {
        use JobStatus as J;
        use Transition as T;
        use WorkspaceStatus as S;
        let ok = || {
            vec![agent(
                "main",
                AgentStatus::Connected,
                Lifecycle::Ready,
                false,
            )]
        };
        let build = |t: Transition, j: JobStatus| {
            Decision::Wait(Stage::Build {
                transition: t,
                job: j,
            })
        };
        // (transition, status, job, autostart, expected)
        let rows: Vec<(T, S, J, bool, Want)> = vec![
            (
                T::Stop,
                S::Stopped,
                J::Succeeded,
                true,
                Ok(Decision::StartBuild),
            ),
            (
                T::Stop,
                S::Stopped,
                J::Succeeded,
                false,
                Err("autostart is disabled"),
            ),
            (
                T::Stop,
                S::Stopping,
                J::Running,
                true,
                Ok(Decision::Wait(Stage::Stopping)),
            ),
            (
                T::Stop,
                S::Pending,
                J::Pending,
                true,
                Ok(Decision::Wait(Stage::Stopping)),
            ),
            (
                T::Stop,
                S::Stopping,
                J::Running,
                false,
                Err("autostart is disabled"),
            ),
            (T::Stop, S::Failed, J::Failed, true, Err("failed state")),
            (
                T::Stop,
                S::Canceled,
                J::Canceled,
                true,
                Err("expected \"stopped\""),
            ),
            (
                T::Stop,
                S::Canceling,
                J::Canceling,
                true,
                Ok(build(T::Stop, J::Canceling)),
            ),
            (
                T::Delete,
                S::Deleting,
                J::Running,
                true,
                Err("is being deleted"),
            ),
            (T::Delete, S::Deleted, J::Succeeded, true, Err("is deleted")),
            (
                T::Delete,
                S::Failed,
                J::Failed,
                true,
                Err("is being deleted"),
            ),
            (
                T::Start,
                S::Pending,
                J::Pending,
                true,
                Ok(build(T::Start, J::Pending)),
            ),
            (
                T::Start,
                S::Starting,
                J::Running,
                true,
                Ok(build(T::Start, J::Running)),
            ),
            (
                T::Start,
                S::Canceling,
                J::Canceling,
                true,
                Ok(build(T::Start, J::Canceling)),
            ),
            (
                T::Start,
                S::Canceled,
                J::Canceled,
                true,
                Err("was canceled"),
            ),
            (
                T::Start,
                S::Running,
                J::Succeeded,
                true,
                Ok(connect("main")),
            ),
            (
                T::Start,
                S::Running,
                J::Succeeded,
                false,
                Ok(connect("main")),
            ),
            (T::Start, S::Failed, J::Failed, true, Ok(connect("main"))),
            (
                T::Start,
                S::Unknown("hibernating".into()),
                J::Succeeded,
                true,
                Ok(connect("main")),
            ),
            (
                T::Unknown("hibernate".into()),
                S::Unknown("x".into()),
                J::Running,
                true,
                Ok(Decision::Wait(Stage::Unknown("hibernate".into()))),
            ),
            (
                T::Unknown("hibernate".into()),
                S::Stopped,
                J::Succeeded,
                true,
                Err("unknown transition"),
            ),
            (
                T::Missing,
                S::Missing,
                J::Missing,
                true,
                Err("no latest build"),
            ),
        ];
        for (i, (t, s, j, auto, want)) in rows.into_iter().enumerate() {
            let w = ws(t, s, j, ok());
            let got = decide(&w, &target(None), &pol(auto, WaitMode::Auto));
            match want {
                Ok(d) => assert_eq!(got, d, "row {i}"),
                Err(needle) => assert!(is_fail(&got, needle), "row {i}: {got:?}"),
            }
        }
    }

    #[test]
    fn failed_start_without_agent_fails_with_job_error() {
        let w = ws(
            Transition::Start,
            WorkspaceStatus::Failed,
            JobStatus::Failed,
            vec![agent(
                "main",
                AgentStatus::Connecting,
                Lifecycle::Created,
                false,
            )],
        );
        let d = decide(&w, &target(None), &pol(true, WaitMode::Auto));
        assert!(is_fail(&d, "failed to start: boom"), "{d:?}");
        let w = ws(
            Transition::Start,
            WorkspaceStatus::Failed,
            JobStatus::Failed,
            vec![],
        );
        let d = decide(&w, &target(None), &pol(true, WaitMode::Auto));
        assert!(is_fail(&d, "failed to start"), "{d:?}");
    }

    #[test]
    fn agent_table() {
        use AgentStatus as A;
        use Lifecycle as L;
        use WaitMode as W;
        let wait = Decision::Wait;
        // (status, lifecycle, blocks_login, wait mode, expected)
        let rows: Vec<(A, L, bool, W, Want)> = vec![
            (
                A::Connecting,
                L::Created,
                false,
                W::Auto,
                Ok(wait(Stage::AgentConnecting)),
            ),
            (
                A::Missing,
                L::Missing,
                false,
                W::No,
                Ok(wait(Stage::AgentConnecting)),
            ),
            (
                A::Timeout,
                L::Created,
                false,
                W::Auto,
                Ok(wait(Stage::AgentTimeout)),
            ),
            (
                A::Disconnected,
                L::Ready,
                false,
                W::No,
                Ok(wait(Stage::AgentDisconnected)),
            ),
            (
                A::Unknown("x".into()),
                L::Ready,
                false,
                W::No,
                Ok(wait(Stage::Unknown("x".into()))),
            ),
            (A::Connected, L::Ready, false, W::Auto, Ok(connect("main"))),
            (
                A::Connected,
                L::Created,
                false,
                W::Auto,
                Ok(connect("main")),
            ),
            (
                A::Connected,
                L::Starting,
                false,
                W::Auto,
                Ok(connect("main")),
            ),
            (
                A::Connected,
                L::Starting,
                true,
                W::Auto,
                Ok(wait(Stage::Scripts)),
            ),
            (
                A::Connected,
                L::Created,
                true,
                W::Auto,
                Ok(wait(Stage::Scripts)),
            ),
            (
                A::Connected,
                L::Starting,
                false,
                W::Yes,
                Ok(wait(Stage::Scripts)),
            ),
            (A::Connected, L::Starting, true, W::No, Ok(connect("main"))),
            (
                A::Connected,
                L::StartTimeout,
                true,
                W::Yes,
                Ok(connect("main")),
            ),
            (
                A::Connected,
                L::StartError,
                true,
                W::Yes,
                Ok(connect("main")),
            ),
            (A::Connected, L::Ready, true, W::Yes, Ok(connect("main"))),
            (
                A::Connected,
                L::Unknown("new".into()),
                true,
                W::Yes,
                Ok(connect("main")),
            ),
            (
                A::Connected,
                L::ShuttingDown,
                false,
                W::No,
                Err("shutting down"),
            ),
            (
                A::Connected,
                L::ShutdownTimeout,
                false,
                W::No,
                Err("shutting down"),
            ),
            (
                A::Connected,
                L::ShutdownError,
                false,
                W::No,
                Err("shutting down"),
            ),
            (A::Connected, L::Off, false, W::No, Err("shutting down")),
            (A::Disconnected, L::Off, false, W::No, Err("shutting down")),
        ];
        for (i, (s, l, blocks, w, want)) in rows.into_iter().enumerate() {
            let ws = ws(
                Transition::Start,
                WorkspaceStatus::Running,
                JobStatus::Succeeded,
                vec![agent("main", s, l, blocks)],
            );
            let got = decide(&ws, &target(None), &pol(true, w));
            match want {
                Ok(d) => assert_eq!(got, d, "row {i}"),
                Err(needle) => assert!(is_fail(&got, needle), "row {i}: {got:?}"),
            }
        }
    }

    #[test]
    fn agent_selection() {
        let two = vec![
            agent("main", AgentStatus::Connected, Lifecycle::Ready, false),
            agent("dev", AgentStatus::Connecting, Lifecycle::Created, false),
        ];
        let w = ws(
            Transition::Start,
            WorkspaceStatus::Running,
            JobStatus::Succeeded,
            two,
        );
        let p = pol(true, WaitMode::Auto);
        assert!(is_fail(
            &decide(&w, &target(None), &p),
            "multiple agents found"
        ));
        assert_eq!(decide(&w, &target(Some("main")), &p), connect("main"));
        assert_eq!(
            decide(&w, &target(Some("dev")), &p),
            Decision::Wait(Stage::AgentConnecting)
        );
        assert!(is_fail(
            &decide(&w, &target(Some("x")), &p),
            "agent not found by name \"x\", available agents: [dev main]"
        ));
        let none = ws(
            Transition::Start,
            WorkspaceStatus::Running,
            JobStatus::Succeeded,
            vec![],
        );
        assert!(is_fail(&decide(&none, &target(None), &p), "has no agents"));
    }
}
