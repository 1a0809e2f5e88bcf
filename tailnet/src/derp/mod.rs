//! The DERP relay protocol (Tailscale's "Designated Encrypted Relay for
//! Packets", as run by coderd's embedded relay), both sides, over any
//! `AsyncRead + AsyncWrite` byte stream.
//!
//! - [`key`]: node/disco keys, text and wire forms, NaCl box.
//! - [`frame`]: frame types, typed encode/decode, a cancel-safe reader.
//! - [`client`]: login handshake, send/receive, automatic Pong, and the
//!   connection's liveness: a Ping after a few seconds of silence, a bound
//!   on every write.
//! - [`http`]: the `GET /derp` + `Upgrade: DERP` dialer and its 4xx seam
//!   for a websocket fallback (which lives elsewhere).
//! - [`server`]: an in-process relay for coder-sim and tests, with fault
//!   hooks (Health, Restarting, drop all connections).
//!
//! Clean-room: written from the facts in `shared/reference/tailnet.md` §3.1
//! (frame layouts, constants, message order); no Tailscale code is ported.

pub mod client;
pub mod frame;
pub mod http;
pub mod key;
pub mod server;

pub use client::{ClientOptions, DerpClient, DerpReceiver, DerpSender, Event, ServerInfo};
pub use frame::{Frame, PeerGoneReason, MAGIC, MAX_PACKET_SIZE, PROTOCOL_VERSION};
pub use http::{
    accept_upgrade, connect_http, derp_url, upgrade, UpgradeError, UpgradeResponse, Upgraded,
};
pub use key::{DiscoPublic, KeyError, NodePrivate, NodePublic};
pub use server::{DerpServer, ServerOptions, ServerStats};

/// Everything that can go wrong on a DERP connection.
#[derive(Debug, thiserror::Error)]
pub enum DerpError {
    #[error("DERP I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error("DERP connection closed")]
    Closed,
    #[error("DERP server greeting has the wrong magic (not a DERP server?)")]
    BadMagic,
    #[error("DERP frame type {kind:#04x} of {len} bytes exceeds the limit of {max}")]
    FrameTooLarge { kind: u8, len: u32, max: u32 },
    #[error("DERP packet of {0} bytes exceeds the 64 KiB limit")]
    PacketTooLarge(usize),
    #[error("malformed DERP frame type {kind:#04x}: {reason}")]
    Malformed { kind: u8, reason: &'static str },
    #[error("unexpected DERP frame type {got:#04x} (wanted {want})")]
    UnexpectedFrame { got: u8, want: &'static str },
    #[error("DERP {0} box did not open (wrong key?)")]
    BadBox(&'static str),
    #[error("DERP {what} JSON: {source}")]
    Json {
        what: &'static str,
        source: serde_json::Error,
    },
    #[error("DERP handshake timed out after {0:?}")]
    Timeout(std::time::Duration),
    #[error("no answer to ping for {0:?}")]
    NoPong(std::time::Duration),
    #[error("a write made no progress for {0:?}")]
    WriteStalled(std::time::Duration),
    #[error("DERP send queue full")]
    QueueFull,
    #[error("DERP protocol error: {0}")]
    Protocol(String),
    #[error(transparent)]
    Upgrade(#[from] UpgradeError),
}
