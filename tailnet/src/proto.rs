//! Tailnet v2 coordination messages (protobuf package `coder.tailnet.v2`),
//! hand-written as prost structs, plus the encodings Coder puts inside
//! them: node keys as `np` + 32 bytes, disco keys as `discokey:<hex>`,
//! peer IDs as 16 raw UUID bytes.
//!
//! Clean-room: field numbers and types are facts taken from Coder's schema
//! (see `shared/reference/tailnet.md` §2.1); names and layout here are our
//! own. Only what a client and the simulator need is modelled (no
//! telemetry, no workspace updates). Unknown fields are skipped by prost on
//! decode, so newer servers' additions are tolerated.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;
use std::time::{Duration as StdDuration, SystemTime, UNIX_EPOCH};

use rand_core::{OsRng, RngCore};

use crate::derp::key::{hex_encode, DiscoPublic, KeyError, NodePublic};

/// Protobuf package of the tailnet API.
pub const PACKAGE: &str = "coder.tailnet.v2";

/// dRPC method names of the `Tailnet` service.
pub mod method {
    pub const POST_TELEMETRY: &str = "/coder.tailnet.v2.Tailnet/PostTelemetry";
    pub const STREAM_DERP_MAPS: &str = "/coder.tailnet.v2.Tailnet/StreamDERPMaps";
    pub const COORDINATE: &str = "/coder.tailnet.v2.Tailnet/Coordinate";
    pub const REFRESH_RESUME_TOKEN: &str = "/coder.tailnet.v2.Tailnet/RefreshResumeToken";
    pub const WORKSPACE_UPDATES: &str = "/coder.tailnet.v2.Tailnet/WorkspaceUpdates";
}

/// Why a field's contents could not be interpreted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtoError {
    #[error("peer id must be 16 bytes, got {0}")]
    BadPeerIdLength(usize),
    #[error("not a UUID: {0:?}")]
    BadUuid(String),
    #[error("node key: {0}")]
    NodeKey(KeyError),
    #[error("disco key: {0}")]
    DiscoKey(KeyError),
}

// ---------------------------------------------------------------------------
// Well-known types (google.protobuf.Timestamp / Duration: seconds=1, nanos=2)
// ---------------------------------------------------------------------------

/// `google.protobuf.Timestamp`.
#[derive(Clone, Copy, PartialEq, Eq, Hash, prost::Message)]
pub struct Timestamp {
    #[prost(int64, tag = "1")]
    pub seconds: i64,
    #[prost(int32, tag = "2")]
    pub nanos: i32,
}

impl Timestamp {
    pub fn now() -> Self {
        Self::from_system_time(SystemTime::now())
    }

    pub fn from_system_time(t: SystemTime) -> Self {
        match t.duration_since(UNIX_EPOCH) {
            Ok(d) => Self {
                seconds: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
                nanos: d.subsec_nanos() as i32,
            },
            Err(e) => {
                // Before the epoch: seconds negative, nanos still in [0, 1e9).
                let d = e.duration();
                let mut seconds = -i64::try_from(d.as_secs()).unwrap_or(i64::MAX);
                let mut nanos = d.subsec_nanos() as i32;
                if nanos > 0 {
                    seconds -= 1;
                    nanos = 1_000_000_000 - nanos;
                }
                Self { seconds, nanos }
            }
        }
    }

    /// `None` when the value is outside what `SystemTime` can hold or nanos
    /// are out of range.
    pub fn to_system_time(&self) -> Option<SystemTime> {
        if !(0..1_000_000_000).contains(&self.nanos) {
            return None;
        }
        let nanos = StdDuration::from_nanos(self.nanos as u64);
        if self.seconds >= 0 {
            UNIX_EPOCH.checked_add(StdDuration::from_secs(self.seconds as u64) + nanos)
        } else {
            UNIX_EPOCH
                .checked_sub(StdDuration::from_secs(self.seconds.unsigned_abs()))?
                .checked_add(nanos)
        }
    }
}

/// `google.protobuf.Duration`.
#[derive(Clone, Copy, PartialEq, Eq, Hash, prost::Message)]
pub struct Duration {
    #[prost(int64, tag = "1")]
    pub seconds: i64,
    #[prost(int32, tag = "2")]
    pub nanos: i32,
}

impl Duration {
    pub fn from_std(d: StdDuration) -> Self {
        Self {
            seconds: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
            nanos: d.subsec_nanos() as i32,
        }
    }

    /// `None` for negative or malformed durations.
    pub fn to_std(&self) -> Option<StdDuration> {
        if self.seconds < 0 || !(0..1_000_000_000).contains(&self.nanos) {
            return None;
        }
        Some(StdDuration::new(self.seconds as u64, self.nanos as u32))
    }
}

// ---------------------------------------------------------------------------
// Peer IDs
// ---------------------------------------------------------------------------

/// A peer or agent UUID, carried on the wire as its 16 raw bytes
/// (`PeerUpdate.id`, `Tunnel.id`, `ReadyForHandshake.id`,
/// `RefreshResumeTokenResponse.peer_id`).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct PeerId(pub [u8; 16]);

impl PeerId {
    pub const NIL: PeerId = PeerId([0; 16]);

    /// From the 16-byte wire form.
    pub fn from_bytes(b: &[u8]) -> Result<Self, ProtoError> {
        b.try_into()
            .map(PeerId)
            .map_err(|_| ProtoError::BadPeerIdLength(b.len()))
    }

    pub const fn as_bytes(&self) -> &[u8; 16] {
        &self.0
    }

    /// The 16-byte wire form.
    pub fn to_vec(&self) -> Vec<u8> {
        self.0.to_vec()
    }

    pub fn is_nil(&self) -> bool {
        self.0 == [0; 16]
    }

    /// A random version-4 UUID.
    pub fn new_v4() -> Self {
        let mut b = [0u8; 16];
        OsRng.fill_bytes(&mut b);
        b[6] = (b[6] & 0x0f) | 0x40;
        b[8] = (b[8] & 0x3f) | 0x80;
        PeerId(b)
    }

    /// Parses `xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx` (either case), also
    /// without hyphens or wrapped in `{}` / `urn:uuid:`.
    pub fn parse(s: &str) -> Result<Self, ProtoError> {
        let bad = || ProtoError::BadUuid(s.to_string());
        let t = s
            .strip_prefix("urn:uuid:")
            .or_else(|| s.strip_prefix('{').and_then(|x| x.strip_suffix('}')))
            .unwrap_or(s);
        let hex: String = match t.len() {
            36 => {
                let b = t.as_bytes();
                if [8, 13, 18, 23].iter().any(|&i| b[i] != b'-') {
                    return Err(bad());
                }
                t.chars().filter(|&c| c != '-').collect()
            }
            32 => t.to_string(),
            _ => return Err(bad()),
        };
        crate::derp::key::hex_decode_exact::<16>(&hex)
            .map(PeerId)
            .map_err(|_| bad())
    }
}

impl fmt::Display for PeerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let h = hex_encode(&self.0);
        write!(
            f,
            "{}-{}-{}-{}-{}",
            &h[0..8],
            &h[8..12],
            &h[12..16],
            &h[16..20],
            &h[20..32]
        )
    }
}

impl fmt::Debug for PeerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PeerId({self})")
    }
}

impl FromStr for PeerId {
    type Err = ProtoError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

// ---------------------------------------------------------------------------
// Node
// ---------------------------------------------------------------------------

/// A tailnet node as published through the coordinator.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Node {
    /// Tailscale node ID (see [`crate::addr::node_id`]).
    #[prost(int64, tag = "1")]
    pub id: i64,
    #[prost(message, optional, tag = "2")]
    pub as_of: Option<Timestamp>,
    /// Node public key in wire form: ASCII `np` + 32 raw bytes (34 bytes).
    #[prost(bytes = "vec", tag = "3")]
    pub key: Vec<u8>,
    /// Disco public key as text: `discokey:` + 64 hex digits.
    #[prost(string, tag = "4")]
    pub disco: String,
    /// Home DERP region; peers ignore a node whose value is 0.
    #[prost(int32, tag = "5")]
    pub preferred_derp: i32,
    /// Region ID (as decimal text) → latency in seconds.
    #[prost(btree_map = "string, double", tag = "6")]
    pub derp_latency: BTreeMap<String, f64>,
    /// Region ID → reason the region is forced onto websockets.
    #[prost(btree_map = "int32, string", tag = "7")]
    pub derp_forced_websocket: BTreeMap<i32, String>,
    /// Own addresses as prefixes, e.g. `fd60:627a:a42b:…/128`.
    #[prost(string, repeated, tag = "8")]
    pub addresses: Vec<String>,
    #[prost(string, repeated, tag = "9")]
    pub allowed_ips: Vec<String>,
    /// UDP endpoints (`ip:port`); empty when direct paths are blocked.
    #[prost(string, repeated, tag = "10")]
    pub endpoints: Vec<String>,
    /// Newer servers only; informational.
    #[prost(string, tag = "11")]
    pub short_description: String,
    /// Newer servers only; informational.
    #[prost(string, tag = "12")]
    pub hostname: String,
}

impl Node {
    /// Parses [`key`](Self::key) (`np` + 32 bytes).
    pub fn node_key(&self) -> Result<NodePublic, ProtoError> {
        NodePublic::from_wire(&self.key).map_err(ProtoError::NodeKey)
    }

    pub fn set_node_key(&mut self, key: &NodePublic) {
        self.key = key.to_wire();
    }

    /// Parses [`disco`](Self::disco) (`discokey:<hex>`).
    pub fn disco_key(&self) -> Result<DiscoPublic, ProtoError> {
        DiscoPublic::parse_text(&self.disco).map_err(ProtoError::DiscoKey)
    }

    pub fn set_disco_key(&mut self, key: &DiscoPublic) {
        self.disco = key.to_text();
    }
}

// ---------------------------------------------------------------------------
// Coordinate
// ---------------------------------------------------------------------------

/// `CoordinateRequest.UpdateSelf`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct UpdateSelf {
    #[prost(message, optional, tag = "1")]
    pub node: Option<Node>,
}

/// `CoordinateRequest.Disconnect` (empty).
#[derive(Clone, Copy, PartialEq, Eq, prost::Message)]
pub struct Disconnect {}

/// `CoordinateRequest.Tunnel`: the other end's peer ID.
#[derive(Clone, PartialEq, Eq, prost::Message)]
pub struct Tunnel {
    #[prost(bytes = "vec", tag = "1")]
    pub id: Vec<u8>,
}

/// `CoordinateRequest.ReadyForHandshake`: sent by a destination (agent)
/// to tell a source it has the source's node.
#[derive(Clone, PartialEq, Eq, prost::Message)]
pub struct ReadyForHandshake {
    #[prost(bytes = "vec", tag = "1")]
    pub id: Vec<u8>,
}

/// One message on the Coordinate stream, peer → coordinator. Fields are
/// independent (not a oneof); usually one is set per message.
#[derive(Clone, PartialEq, prost::Message)]
pub struct CoordinateRequest {
    #[prost(message, optional, tag = "1")]
    pub update_self: Option<UpdateSelf>,
    #[prost(message, optional, tag = "2")]
    pub disconnect: Option<Disconnect>,
    #[prost(message, optional, tag = "3")]
    pub add_tunnel: Option<Tunnel>,
    #[prost(message, optional, tag = "4")]
    pub remove_tunnel: Option<Tunnel>,
    #[prost(message, repeated, tag = "5")]
    pub ready_for_handshake: Vec<ReadyForHandshake>,
}

impl CoordinateRequest {
    pub fn update_self(node: Node) -> Self {
        Self {
            update_self: Some(UpdateSelf { node: Some(node) }),
            ..Self::default()
        }
    }

    pub fn disconnect() -> Self {
        Self {
            disconnect: Some(Disconnect {}),
            ..Self::default()
        }
    }

    pub fn add_tunnel(dst: PeerId) -> Self {
        Self {
            add_tunnel: Some(Tunnel { id: dst.to_vec() }),
            ..Self::default()
        }
    }

    pub fn remove_tunnel(dst: PeerId) -> Self {
        Self {
            remove_tunnel: Some(Tunnel { id: dst.to_vec() }),
            ..Self::default()
        }
    }

    pub fn ready_for_handshake(srcs: impl IntoIterator<Item = PeerId>) -> Self {
        Self {
            ready_for_handshake: srcs
                .into_iter()
                .map(|p| ReadyForHandshake { id: p.to_vec() })
                .collect(),
            ..Self::default()
        }
    }
}

/// `CoordinateResponse.PeerUpdate.Kind`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
#[repr(i32)]
pub enum PeerUpdateKind {
    Unspecified = 0,
    /// The peer's node (new or changed).
    Node = 1,
    /// The peer left gracefully: remove it now.
    Disconnected = 2,
    /// The peer's coordination stream broke: keep it for now.
    Lost = 3,
    /// The destination has our node; start the WireGuard handshake.
    ReadyForHandshake = 4,
}

/// `CoordinateResponse.PeerUpdate`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct PeerUpdate {
    #[prost(bytes = "vec", tag = "1")]
    pub id: Vec<u8>,
    #[prost(message, optional, tag = "2")]
    pub node: Option<Node>,
    /// Raw value; use `kind()` for the enum (unknown values read as
    /// `Unspecified`).
    #[prost(enumeration = "PeerUpdateKind", tag = "3")]
    pub kind: i32,
    #[prost(string, tag = "4")]
    pub reason: String,
}

impl PeerUpdate {
    pub fn peer_id(&self) -> Result<PeerId, ProtoError> {
        PeerId::from_bytes(&self.id)
    }
}

/// One message on the Coordinate stream, coordinator → peer.
#[derive(Clone, PartialEq, prost::Message)]
pub struct CoordinateResponse {
    #[prost(message, repeated, tag = "1")]
    pub peer_updates: Vec<PeerUpdate>,
    /// Set when the coordinator rejected a request (e.g. "you do not share
    /// a tunnel with …").
    #[prost(string, tag = "2")]
    pub error: String,
}

// ---------------------------------------------------------------------------
// DERP map (StreamDERPMaps)
// ---------------------------------------------------------------------------

/// `StreamDERPMapsRequest` (empty).
#[derive(Clone, Copy, PartialEq, Eq, prost::Message)]
pub struct StreamDerpMapsRequest {}

/// `DERPMap`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct DerpMap {
    #[prost(message, optional, tag = "1")]
    pub home_params: Option<DerpHomeParams>,
    #[prost(btree_map = "int64, message", tag = "2")]
    pub regions: BTreeMap<i64, DerpRegion>,
}

/// `DERPMap.HomeParams`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct DerpHomeParams {
    #[prost(btree_map = "int64, double", tag = "1")]
    pub region_score: BTreeMap<i64, f64>,
}

/// `DERPMap.Region`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct DerpRegion {
    #[prost(int64, tag = "1")]
    pub region_id: i64,
    #[prost(bool, tag = "2")]
    pub embedded_relay: bool,
    #[prost(string, tag = "3")]
    pub region_code: String,
    #[prost(string, tag = "4")]
    pub region_name: String,
    #[prost(bool, tag = "5")]
    pub avoid: bool,
    #[prost(message, repeated, tag = "6")]
    pub nodes: Vec<DerpNode>,
}

/// `DERPMap.Region.Node`.
#[derive(Clone, PartialEq, Eq, prost::Message)]
pub struct DerpNode {
    #[prost(string, tag = "1")]
    pub name: String,
    #[prost(int64, tag = "2")]
    pub region_id: i64,
    #[prost(string, tag = "3")]
    pub host_name: String,
    #[prost(string, tag = "4")]
    pub cert_name: String,
    #[prost(string, tag = "5")]
    pub ipv4: String,
    #[prost(string, tag = "6")]
    pub ipv6: String,
    #[prost(int32, tag = "7")]
    pub stun_port: i32,
    #[prost(bool, tag = "8")]
    pub stun_only: bool,
    #[prost(int32, tag = "9")]
    pub derp_port: i32,
    #[prost(bool, tag = "10")]
    pub insecure_for_tests: bool,
    #[prost(bool, tag = "11")]
    pub force_http: bool,
    #[prost(string, tag = "12")]
    pub stun_test_ip: String,
    #[prost(bool, tag = "13")]
    pub can_port_80: bool,
}

// ---------------------------------------------------------------------------
// Resume tokens
// ---------------------------------------------------------------------------

/// `RefreshResumeTokenRequest` (empty).
#[derive(Clone, Copy, PartialEq, Eq, prost::Message)]
pub struct RefreshResumeTokenRequest {}

/// `RefreshResumeTokenResponse`.
#[derive(Clone, PartialEq, Eq, prost::Message)]
pub struct RefreshResumeTokenResponse {
    /// Opaque token to send as `resume_token=` on the next coordinate dial.
    #[prost(string, tag = "1")]
    pub token: String,
    #[prost(message, optional, tag = "2")]
    pub refresh_in: Option<Duration>,
    #[prost(message, optional, tag = "3")]
    pub expires_at: Option<Timestamp>,
    /// Server-assigned peer UUID (16 bytes); newest servers only.
    #[prost(bytes = "vec", tag = "4")]
    pub peer_id: Vec<u8>,
}

impl RefreshResumeTokenResponse {
    /// The server-assigned peer ID, if the server sent one.
    pub fn peer_id(&self) -> Option<Result<PeerId, ProtoError>> {
        (!self.peer_id.is_empty()).then(|| PeerId::from_bytes(&self.peer_id))
    }
}
