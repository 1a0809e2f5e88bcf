//! Serde models of the coderd JSON we read.
//!
//! Only the fields coder-proxy uses are declared; unknown fields are ignored
//! and every field has a default so older or newer servers still decode.
//! Server enums keep unknown values in an `Unknown(String)` arm instead of
//! failing, because a new coderd status must never break a connection.

use serde::{Deserialize, Serialize};

/// Declare a string enum that round-trips unknown values.
macro_rules! server_enum {
    ($(#[$m:meta])* $name:ident { $($variant:ident = $text:literal),+ $(,)? }) => {
        $(#[$m])*
        #[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize, Default)]
        #[serde(from = "String", into = "String")]
        pub enum $name {
            $($variant,)+
            /// A value this build does not know.
            Unknown(String),
            /// The field was absent.
            #[default]
            Missing,
        }
        impl From<String> for $name {
            fn from(s: String) -> Self {
                match s.as_str() {
                    $($text => $name::$variant,)+
                    "" => $name::Missing,
                    _ => $name::Unknown(s),
                }
            }
        }
        impl From<$name> for String {
            fn from(v: $name) -> String {
                v.as_str().to_string()
            }
        }
        impl $name {
            /// The wire value.
            pub fn as_str(&self) -> &str {
                match self {
                    $($name::$variant => $text,)+
                    $name::Unknown(s) => s,
                    $name::Missing => "",
                }
            }
        }
        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

server_enum!(
    /// `WorkspaceBuild.status`.
    WorkspaceStatus {
        Pending = "pending",
        Starting = "starting",
        Running = "running",
        Stopping = "stopping",
        Stopped = "stopped",
        Failed = "failed",
        Canceling = "canceling",
        Canceled = "canceled",
        Deleting = "deleting",
        Deleted = "deleted",
    }
);

server_enum!(
    /// `WorkspaceBuild.transition`.
    Transition {
        Start = "start",
        Stop = "stop",
        Delete = "delete",
    }
);

server_enum!(
    /// `ProvisionerJob.status`.
    JobStatus {
        Pending = "pending",
        Running = "running",
        Succeeded = "succeeded",
        Canceling = "canceling",
        Canceled = "canceled",
        Failed = "failed",
    }
);

server_enum!(
    /// `WorkspaceAgent.status`: the control plane's view of the agent.
    AgentStatus {
        Connecting = "connecting",
        Connected = "connected",
        Disconnected = "disconnected",
        Timeout = "timeout",
    }
);

server_enum!(
    /// `WorkspaceAgent.lifecycle_state`.
    Lifecycle {
        Created = "created",
        Starting = "starting",
        StartTimeout = "start_timeout",
        StartError = "start_error",
        Ready = "ready",
        ShuttingDown = "shutting_down",
        ShutdownTimeout = "shutdown_timeout",
        ShutdownError = "shutdown_error",
        Off = "off",
    }
);

impl Lifecycle {
    /// `created` or `starting`: startup scripts have not finished.
    pub fn is_starting(&self) -> bool {
        matches!(self, Lifecycle::Created | Lifecycle::Starting)
    }
    /// Any shutting-down state, `off` included.
    pub fn is_shutting_down(&self) -> bool {
        matches!(
            self,
            Lifecycle::ShuttingDown
                | Lifecycle::ShutdownTimeout
                | Lifecycle::ShutdownError
                | Lifecycle::Off
        )
    }
}

/// `codersdk.Workspace`.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(default)]
pub struct Workspace {
    pub id: String,
    pub name: String,
    pub owner_name: String,
    pub template_active_version_id: String,
    pub template_require_active_version: bool,
    pub automatic_updates: String,
    pub outdated: bool,
    pub dormant_at: Option<String>,
    pub latest_build: WorkspaceBuild,
}

/// `codersdk.WorkspaceBuild`.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(default)]
pub struct WorkspaceBuild {
    pub id: String,
    pub build_number: i64,
    pub transition: Transition,
    pub status: WorkspaceStatus,
    pub template_version_id: String,
    pub job: ProvisionerJob,
    #[serde(deserialize_with = "null_as_default")]
    pub resources: Vec<Resource>,
}

impl WorkspaceBuild {
    /// Every agent of every resource of this build.
    pub fn agents(&self) -> Vec<&Agent> {
        self.resources
            .iter()
            .flat_map(|r| r.agents.iter())
            .collect()
    }
}

/// `codersdk.ProvisionerJob` (the parts we read).
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(default)]
pub struct ProvisionerJob {
    pub id: String,
    pub status: JobStatus,
    pub error: Option<String>,
    pub completed_at: Option<String>,
}

/// `codersdk.WorkspaceResource`.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(default)]
pub struct Resource {
    pub name: String,
    #[serde(deserialize_with = "null_as_default")]
    pub agents: Vec<Agent>,
}

/// `codersdk.WorkspaceAgent`.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(default)]
pub struct Agent {
    pub id: String,
    pub name: String,
    pub status: AgentStatus,
    pub lifecycle_state: Lifecycle,
    pub troubleshooting_url: String,
    #[serde(deserialize_with = "null_as_default")]
    pub scripts: Vec<AgentScript>,
    #[serde(deserialize_with = "null_as_default")]
    pub log_sources: Vec<LogSource>,
}

impl Agent {
    /// Whether `--wait=auto` waits: some script blocks login.
    pub fn scripts_block_login(&self) -> bool {
        self.scripts.iter().any(|s| s.start_blocks_login)
    }
}

/// `codersdk.WorkspaceAgentScript`.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(default)]
pub struct AgentScript {
    pub display_name: String,
    pub start_blocks_login: bool,
    pub run_on_start: bool,
    pub log_source_id: String,
}

/// `codersdk.WorkspaceAgentLogSource`.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(default)]
pub struct LogSource {
    pub id: String,
    pub display_name: String,
}

/// `codersdk.ProvisionerJobLog`.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(default)]
pub struct BuildLog {
    pub id: i64,
    pub stage: String,
    pub output: String,
    pub log_level: String,
}

/// `codersdk.WorkspaceAgentLog`.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(default)]
pub struct AgentLog {
    pub id: i64,
    pub output: String,
    pub level: String,
    pub source_id: String,
}

/// `codersdk.WorkspaceBuildParameter`.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(default)]
pub struct BuildParameter {
    pub name: String,
    pub value: String,
}

/// `codersdk.CreateWorkspaceBuildRequest` (the fields we send).
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct CreateBuild {
    pub transition: Transition,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub template_version_id: String,
    pub rich_parameter_values: Vec<BuildParameter>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// `GET /api/v2/workspaceagents/connection` (the part we read).
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(default)]
pub struct ConnectionInfo {
    pub hostname_suffix: String,
}

/// Coder's error body: `{"message", "detail", "validations"}`.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(default)]
pub struct ErrorBody {
    pub message: String,
    pub detail: String,
    #[serde(deserialize_with = "null_as_default")]
    pub validations: Vec<Validation>,
}

/// One field error of an [`ErrorBody`].
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(default)]
pub struct Validation {
    pub field: String,
    pub detail: String,
}

/// Go marshals empty slices as `null`; treat it as empty.
fn null_as_default<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Default + Deserialize<'de>,
{
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tolerant_decoding() {
        let json = r#"{
            "id":"w1","name":"dev","owner_name":"alice","extra":{"x":1},
            "latest_build":{"id":"b1","transition":"start","status":"hibernating",
              "job":{"status":"succeeded","completed_at":"2026-01-01T00:00:00Z","new":true},
              "resources":[{"name":"vm","agents":null},{"agents":[{"id":"a1","name":"main",
                "status":"connected","lifecycle_state":"warming_up","scripts":null}]}]}
        }"#;
        let ws: Workspace = serde_json::from_str(json).unwrap();
        assert_eq!(
            ws.latest_build.status,
            WorkspaceStatus::Unknown("hibernating".into())
        );
        assert_eq!(ws.latest_build.transition, Transition::Start);
        let agents = ws.latest_build.agents();
        assert_eq!(agents.len(), 1);
        assert_eq!(
            agents[0].lifecycle_state,
            Lifecycle::Unknown("warming_up".into())
        );
        assert_eq!(ws.latest_build.job.status, JobStatus::Succeeded);
        assert_eq!(ws.dormant_at, None);
    }

    #[test]
    fn missing_fields_default() {
        let ws: Workspace = serde_json::from_str("{}").unwrap();
        assert_eq!(ws.latest_build.status, WorkspaceStatus::Missing);
        // serde accepts an array for a struct; the client rejects a workspace
        // without an id as the wrong shape.
        assert!(serde_json::from_str::<Workspace>("[]")
            .unwrap()
            .id
            .is_empty());
        assert!(serde_json::from_str::<Workspace>("\"x\"").is_err());
    }

    #[test]
    fn create_build_shape() {
        let b = CreateBuild {
            transition: Transition::Start,
            template_version_id: "tv".into(),
            rich_parameter_values: vec![],
            reason: Some("ssh_connection".into()),
        };
        assert_eq!(
            serde_json::to_string(&b).unwrap(),
            r#"{"transition":"start","template_version_id":"tv","rich_parameter_values":[],"reason":"ssh_connection"}"#
        );
    }
}
