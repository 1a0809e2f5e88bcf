//! coder-tailnet: a clean-room Rust implementation of the pieces of Coder's
//! tailnet that a client needs to reach a workspace agent, and that
//! coder-sim needs to play the other side.
//!
//! Written from protocol facts (field numbers, frame layouts, message
//! order) recorded in `shared/reference/tailnet.md`; no code or `.proto`
//! file is copied from Coder or Tailscale.
//!
//! Layers, bottom up: [`yamux`] (stream multiplexing over the coordinate
//! websocket), [`drpc`] (storj dRPC framing, one RPC per yamux stream),
//! [`proto`] (tailnet v2 protobuf messages), [`derp`] (the DERP relay
//! protocol, client and server sides), [`wg`] (WireGuard + userspace
//! TCP), [`client`] (the controller that ties them together). [`clock`]
//! and [`backoff`] are the timing rules they share; [`http1`] is the client
//! side of an HTTP upgrade (DERP's and the websocket's), [`ws`] a websocket
//! as a byte stream.
pub mod addr;
pub mod backoff;
pub mod client;
pub mod clock;
pub mod derp;
pub mod derpmap;
pub mod drpc;
pub mod http1;
pub mod proto;
pub mod wg;
pub mod ws;
pub mod yamux;
