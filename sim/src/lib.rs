//! `coder-sim`: a stand-in Coder deployment for testing `coder-proxy`.
//!
//! A [`Sim`] serves the slice of coderd's REST API and workspace watch
//! stream that `coder ssh --stdio` uses, with JSON shaped like the real
//! thing, and puts one TCP endpoint with an SSH server behind each agent.
//! Tests script state changes (builds, agent status and lifecycle, stops,
//! deletes) and faults (error statuses, hangs, non-JSON, cut watch streams,
//! a coordinate endpoint answering 502 for a while, watch streams that
//! replay a stale snapshot first)
//! and read back what the server saw.
//!
//! Modules: [`spec`] (what tests ask for), [`model`] (wire JSON), `state`
//! (the world and its timers), `api` (axum routes), [`sim`] (the handle),
//! [`endpoint`]/[`ssh`]/[`sshd`] (the agent side), `tailnet` (coordinator,
//! DERP relays and fake agent peers for native tailnet clients), [`demo`]
//! (the README demo).

mod api;
pub mod demo;
pub mod endpoint;
pub mod model;
pub mod sim;
pub mod spec;
pub mod ssh;
pub mod sshd;
mod state;
mod tailnet;

/// Peer update kinds for [`Sim::send_peer_update`].
pub use coder_tailnet::proto::PeerUpdateKind;
pub use endpoint::SshBackend;
pub use model::{AgentStatus, Lifecycle};
pub use sim::Sim;
pub use spec::{
    AgentSpec, ApiFault, Initial, LoggedRequest, Route, ScriptSpec, SimOptions, WorkspaceSpec,
};
