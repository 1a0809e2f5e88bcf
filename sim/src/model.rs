//! JSON shapes the simulator serves, mirroring codersdk's wire format.
//!
//! Field names, `omitempty` behaviour and enum spellings follow coderd's
//! `codersdk` types (Workspace, WorkspaceBuild, ProvisionerJob,
//! WorkspaceResource, WorkspaceAgent, log entries, the error `Response`).
//! Fields a client ignores are still present so clients are tested against
//! realistic documents, not minimal ones. Nothing here has behaviour: the
//! state module builds these values and the API module serialises them.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// Timestamps are RFC 3339 in UTC, like Go's `time.Time`.
pub type Time = DateTime<Utc>;

/// Agent connection status as coderd reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AgentStatus {
    Connecting,
    Connected,
    Disconnected,
    Timeout,
}

impl AgentStatus {
    /// The wire spelling, e.g. `"connected"`.
    pub fn as_str(self) -> &'static str {
        match self {
            AgentStatus::Connecting => "connecting",
            AgentStatus::Connected => "connected",
            AgentStatus::Disconnected => "disconnected",
            AgentStatus::Timeout => "timeout",
        }
    }
}

impl std::str::FromStr for AgentStatus {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s {
            "connecting" => AgentStatus::Connecting,
            "connected" => AgentStatus::Connected,
            "disconnected" => AgentStatus::Disconnected,
            "timeout" => AgentStatus::Timeout,
            other => return Err(format!("unknown agent status {other:?}")),
        })
    }
}

/// Agent lifecycle state (startup scripts and shutdown).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Lifecycle {
    Created,
    Starting,
    StartTimeout,
    StartError,
    Ready,
    ShuttingDown,
    ShutdownTimeout,
    ShutdownError,
    Off,
}

impl std::str::FromStr for Lifecycle {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s {
            "created" => Lifecycle::Created,
            "starting" => Lifecycle::Starting,
            "start_timeout" => Lifecycle::StartTimeout,
            "start_error" => Lifecycle::StartError,
            "ready" => Lifecycle::Ready,
            "shutting_down" => Lifecycle::ShuttingDown,
            "shutdown_timeout" => Lifecycle::ShutdownTimeout,
            "shutdown_error" => Lifecycle::ShutdownError,
            "off" => Lifecycle::Off,
            other => return Err(format!("unknown lifecycle state {other:?}")),
        })
    }
}

/// Build transition.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Transition {
    Start,
    Stop,
    Delete,
}

/// Provisioner job status.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JobStatus {
    Pending,
    Running,
    Succeeded,
    Canceling,
    Canceled,
    Failed,
}

/// Workspace (= latest build) status, derived from job status and transition.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WorkspaceStatus {
    Pending,
    Starting,
    Running,
    Stopping,
    Stopped,
    Failed,
    Canceling,
    Canceled,
    Deleting,
    Deleted,
}

impl WorkspaceStatus {
    /// What coderd reports for a build with this transition and job status.
    pub fn derive(transition: Transition, job: JobStatus) -> Self {
        match (job, transition) {
            (JobStatus::Pending, _) => WorkspaceStatus::Pending,
            (JobStatus::Running, Transition::Start) => WorkspaceStatus::Starting,
            (JobStatus::Running, Transition::Stop) => WorkspaceStatus::Stopping,
            (JobStatus::Running, Transition::Delete) => WorkspaceStatus::Deleting,
            (JobStatus::Succeeded, Transition::Start) => WorkspaceStatus::Running,
            (JobStatus::Succeeded, Transition::Stop) => WorkspaceStatus::Stopped,
            (JobStatus::Succeeded, Transition::Delete) => WorkspaceStatus::Deleted,
            (JobStatus::Failed, _) => WorkspaceStatus::Failed,
            (JobStatus::Canceling, _) => WorkspaceStatus::Canceling,
            (JobStatus::Canceled, _) => WorkspaceStatus::Canceled,
        }
    }
}

/// `codersdk.Response`: every error body.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ErrorResponse {
    pub message: String,
    #[serde(skip_serializing_if = "String::is_empty", default)]
    pub detail: String,
    #[serde(skip_serializing_if = "Vec::is_empty", default)]
    pub validations: Vec<Validation>,
}

/// One field error inside [`ErrorResponse`].
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Validation {
    pub field: String,
    pub detail: String,
}

/// `codersdk.Workspace`.
#[derive(Clone, Debug, Serialize)]
pub struct Workspace {
    pub id: Uuid,
    pub created_at: Time,
    pub updated_at: Time,
    pub owner_id: Uuid,
    pub owner_name: String,
    pub owner_avatar_url: String,
    pub organization_id: Uuid,
    pub organization_name: String,
    pub template_id: Uuid,
    pub template_name: String,
    pub template_display_name: String,
    pub template_icon: String,
    pub template_allow_user_cancel_workspace_jobs: bool,
    pub template_active_version_id: Uuid,
    pub template_require_active_version: bool,
    pub latest_build: WorkspaceBuild,
    pub latest_app_status: Option<serde_json::Value>,
    pub outdated: bool,
    pub name: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub autostart_schedule: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ttl_ms: Option<i64>,
    pub last_used_at: Time,
    pub deleting_at: Option<Time>,
    pub dormant_at: Option<Time>,
    pub health: WorkspaceHealth,
    pub automatic_updates: String,
    pub allow_renames: bool,
    pub favorite: bool,
    pub next_start_at: Option<Time>,
}

/// `codersdk.WorkspaceHealth`.
#[derive(Clone, Debug, Serialize)]
pub struct WorkspaceHealth {
    pub healthy: bool,
    pub failing_agents: Vec<Uuid>,
}

/// `codersdk.WorkspaceBuild`.
#[derive(Clone, Debug, Serialize)]
pub struct WorkspaceBuild {
    pub id: Uuid,
    pub created_at: Time,
    pub updated_at: Time,
    pub workspace_id: Uuid,
    pub workspace_name: String,
    pub workspace_owner_id: Uuid,
    pub workspace_owner_name: String,
    pub workspace_owner_avatar_url: String,
    pub template_version_id: Uuid,
    pub template_version_name: String,
    pub build_number: i32,
    pub transition: Transition,
    pub initiator_id: Uuid,
    pub initiator_name: String,
    pub job: ProvisionerJob,
    pub reason: String,
    pub resources: Vec<WorkspaceResource>,
    pub deadline: Option<Time>,
    pub max_deadline: Option<Time>,
    pub status: WorkspaceStatus,
    pub daily_cost: i32,
    pub template_version_preset_id: Option<Uuid>,
}

/// `codersdk.ProvisionerJob`.
#[derive(Clone, Debug, Serialize)]
pub struct ProvisionerJob {
    pub id: Uuid,
    pub created_at: Time,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub started_at: Option<Time>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub completed_at: Option<Time>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub canceled_at: Option<Time>,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub error: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub error_code: String,
    pub status: JobStatus,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub worker_id: Option<Uuid>,
    pub file_id: Uuid,
    pub tags: BTreeMap<String, String>,
    pub queue_position: i32,
    pub queue_size: i32,
    pub organization_id: Uuid,
    pub input: JobInput,
    #[serde(rename = "type")]
    pub kind: String,
}

/// `codersdk.ProvisionerJobInput`.
#[derive(Clone, Debug, Serialize)]
pub struct JobInput {
    pub workspace_build_id: Uuid,
}

/// `codersdk.WorkspaceResource`.
#[derive(Clone, Debug, Serialize)]
pub struct WorkspaceResource {
    pub id: Uuid,
    pub created_at: Time,
    pub job_id: Uuid,
    pub workspace_transition: Transition,
    #[serde(rename = "type")]
    pub kind: String,
    pub name: String,
    pub hide: bool,
    pub icon: String,
    /// `omitempty` in codersdk: absent, not `[]`, when a resource has no agents.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub agents: Vec<WorkspaceAgent>,
    pub metadata: Vec<ResourceMetadata>,
    pub daily_cost: i32,
}

/// `codersdk.WorkspaceResourceMetadata`.
#[derive(Clone, Debug, Serialize)]
pub struct ResourceMetadata {
    pub key: String,
    pub value: String,
    pub sensitive: bool,
}

/// `codersdk.WorkspaceAgent`.
#[derive(Clone, Debug, Serialize)]
pub struct WorkspaceAgent {
    pub id: Uuid,
    pub parent_id: Option<Uuid>,
    pub created_at: Time,
    pub updated_at: Time,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub first_connected_at: Option<Time>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_connected_at: Option<Time>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub disconnected_at: Option<Time>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub started_at: Option<Time>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ready_at: Option<Time>,
    pub status: AgentStatus,
    pub lifecycle_state: Lifecycle,
    pub name: String,
    pub resource_id: Uuid,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub instance_id: String,
    pub architecture: String,
    pub environment_variables: BTreeMap<String, String>,
    pub operating_system: String,
    pub logs_length: i32,
    pub logs_overflowed: bool,
    pub directory: String,
    pub expanded_directory: String,
    pub version: String,
    pub api_version: String,
    pub apps: Vec<serde_json::Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub latency: Option<BTreeMap<String, serde_json::Value>>,
    pub connection_timeout_seconds: i32,
    pub troubleshooting_url: String,
    pub subsystems: Vec<String>,
    pub health: AgentHealth,
    pub display_apps: Vec<String>,
    pub log_sources: Vec<AgentLogSource>,
    pub scripts: Vec<AgentScript>,
    /// Deprecated in codersdk but still sent.
    pub startup_script_behavior: String,
}

/// `codersdk.WorkspaceAgentHealth`.
#[derive(Clone, Debug, Serialize)]
pub struct AgentHealth {
    pub healthy: bool,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub reason: String,
}

/// `codersdk.WorkspaceAgentLogSource`.
#[derive(Clone, Debug, Serialize)]
pub struct AgentLogSource {
    pub workspace_agent_id: Uuid,
    pub id: Uuid,
    pub created_at: Time,
    pub display_name: String,
    pub icon: String,
}

/// `codersdk.WorkspaceAgentScript`.
#[derive(Clone, Debug, Serialize)]
pub struct AgentScript {
    pub id: Uuid,
    pub log_source_id: Uuid,
    pub log_path: String,
    pub script: String,
    pub cron: String,
    pub run_on_start: bool,
    pub run_on_stop: bool,
    pub start_blocks_login: bool,
    /// Nanoseconds, as Go encodes `time.Duration`.
    pub timeout: i64,
    pub display_name: String,
}

/// `codersdk.ProvisionerJobLog`.
#[derive(Clone, Debug, Serialize)]
pub struct ProvisionerJobLog {
    pub id: i64,
    pub created_at: Time,
    pub log_source: String,
    pub log_level: String,
    pub stage: String,
    pub output: String,
}

/// `codersdk.WorkspaceAgentLog`.
#[derive(Clone, Debug, Serialize)]
pub struct WorkspaceAgentLog {
    pub id: i64,
    pub created_at: Time,
    pub output: String,
    pub level: String,
    pub source_id: Uuid,
}

/// `codersdk.WorkspaceBuildParameter`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BuildParameter {
    pub name: String,
    pub value: String,
}

/// `codersdk.CreateWorkspaceBuildRequest` (the fields the simulator reads;
/// unknown fields are ignored, as coderd's decoder does).
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default)]
pub struct CreateBuildRequest {
    pub transition: String,
    pub template_version_id: Option<Uuid>,
    pub rich_parameter_values: Option<Vec<BuildParameter>>,
    pub log_level: Option<String>,
    pub dry_run: bool,
    pub reason: Option<String>,
}

/// `codersdk.UpdateWorkspaceDormancy`.
#[derive(Clone, Debug, Deserialize)]
pub struct DormancyRequest {
    pub dormant: bool,
}

/// `codersdk.PostWorkspaceUsageRequest`.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default)]
pub struct UsageRequest {
    pub agent_id: Option<Uuid>,
    pub app_name: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn enums_use_wire_spelling() {
        let v = serde_json::to_value((
            AgentStatus::Timeout,
            Lifecycle::StartError,
            Transition::Delete,
            JobStatus::Succeeded,
            WorkspaceStatus::Stopping,
        ))
        .unwrap_or_default();
        assert_eq!(
            v,
            serde_json::json!(["timeout", "start_error", "delete", "succeeded", "stopping"])
        );
        assert_eq!("shutting_down".parse(), Ok(Lifecycle::ShuttingDown));
        assert_eq!("connected".parse(), Ok(AgentStatus::Connected));
    }

    #[test]
    fn status_derivation() {
        use JobStatus as J;
        use Transition as T;
        use WorkspaceStatus as W;
        assert_eq!(W::derive(T::Start, J::Pending), W::Pending);
        assert_eq!(W::derive(T::Start, J::Running), W::Starting);
        assert_eq!(W::derive(T::Stop, J::Succeeded), W::Stopped);
        assert_eq!(W::derive(T::Delete, J::Running), W::Deleting);
        assert_eq!(W::derive(T::Start, J::Failed), W::Failed);
    }
}
