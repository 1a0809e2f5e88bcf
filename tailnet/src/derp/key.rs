//! Node and disco keys: X25519 key pairs, their text forms (`nodekey:<hex>`,
//! `discokey:<hex>`), the `np`-prefixed binary form carried in the tailnet
//! `Node.key` protobuf field, and the NaCl box (X25519 + XSalsa20-Poly1305)
//! used by the DERP handshake.
//!
//! Facts (from Tailscale's `types/key`): text forms are a type prefix plus 64
//! lowercase hex digits (parsing accepts either case); the binary form of a
//! node public key is ASCII `np` followed by the 32 raw bytes; DERP frames
//! carry the raw 32 bytes; a sealed box is `nonce(24) | box`, where `box` is
//! the 16-byte Poly1305 tag followed by the ciphertext (NaCl `crypto_box`).

use std::fmt;

use crypto_box::aead::Aead;
use crypto_box::{PublicKey, SalsaBox, SecretKey};
use rand_core::{OsRng, RngCore};

/// Length of a raw X25519 key.
pub const KEY_LEN: usize = 32;
/// Length of a NaCl box nonce.
pub const NONCE_LEN: usize = 24;
/// Bytes a NaCl box adds to its plaintext (the Poly1305 tag).
pub const BOX_OVERHEAD: usize = 16;

const NODE_PUBLIC_TEXT_PREFIX: &str = "nodekey:";
const NODE_PRIVATE_TEXT_PREFIX: &str = "privkey:";
const DISCO_PUBLIC_TEXT_PREFIX: &str = "discokey:";
const NODE_PUBLIC_BINARY_PREFIX: &[u8] = b"np";

/// Why a key could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error("key text does not start with {expected:?}")]
    MissingPrefix { expected: &'static str },
    #[error("key has the wrong size: got {got} bytes/hex digits, want {want}")]
    WrongLength { got: usize, want: usize },
    #[error("invalid hex character in key")]
    BadHex,
}

/// A node's public key: the WireGuard static key and the DERP address.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct NodePublic([u8; KEY_LEN]);

impl NodePublic {
    pub const fn from_raw(raw: [u8; KEY_LEN]) -> Self {
        Self(raw)
    }

    /// From a 32-byte slice (DERP frames carry keys this way).
    pub fn from_slice(raw: &[u8]) -> Result<Self, KeyError> {
        raw_32(raw).map(Self)
    }

    pub const fn as_bytes(&self) -> &[u8; KEY_LEN] {
        &self.0
    }

    pub fn is_zero(&self) -> bool {
        self.0 == [0; KEY_LEN]
    }

    /// `nodekey:` + 64 lowercase hex digits.
    pub fn to_text(&self) -> String {
        format!("{NODE_PUBLIC_TEXT_PREFIX}{}", hex_encode(&self.0))
    }

    pub fn parse_text(s: &str) -> Result<Self, KeyError> {
        parse_prefixed_hex(s, NODE_PUBLIC_TEXT_PREFIX).map(Self)
    }

    /// Bare 64 hex digits (the `Derp-Public-Key` response header uses this).
    pub fn to_untyped_hex(&self) -> String {
        hex_encode(&self.0)
    }

    pub fn parse_untyped_hex(s: &str) -> Result<Self, KeyError> {
        parse_prefixed_hex(s, "").map(Self)
    }

    /// The binary form used in the tailnet `Node.key` field: `np` + 32 bytes.
    pub fn to_wire(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(NODE_PUBLIC_BINARY_PREFIX.len() + KEY_LEN);
        out.extend_from_slice(NODE_PUBLIC_BINARY_PREFIX);
        out.extend_from_slice(&self.0);
        out
    }

    /// Parses the `np` + 32 bytes form; a missing prefix or wrong length is
    /// rejected, as Coder's peers do.
    pub fn from_wire(b: &[u8]) -> Result<Self, KeyError> {
        let rest = b
            .strip_prefix(NODE_PUBLIC_BINARY_PREFIX)
            .ok_or(KeyError::MissingPrefix { expected: "np" })?;
        if rest.len() != KEY_LEN {
            return Err(KeyError::WrongLength {
                got: b.len(),
                want: NODE_PUBLIC_BINARY_PREFIX.len() + KEY_LEN,
            });
        }
        raw_32(rest).map(Self)
    }

    fn to_box_key(self) -> PublicKey {
        PublicKey::from_bytes(self.0)
    }
}

impl fmt::Display for NodePublic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_text())
    }
}

impl fmt::Debug for NodePublic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Short form, enough to tell keys apart in logs.
        write!(f, "nodekey:{}…", &hex_encode(&self.0)[..8])
    }
}

/// A node's private key. Never printed.
#[derive(Clone)]
pub struct NodePrivate {
    raw: [u8; KEY_LEN],
    secret: SecretKey,
}

impl NodePrivate {
    /// A fresh random key, clamped as an X25519 scalar at creation (the
    /// public key is the same either way; clamping keeps the stored bytes
    /// identical to what other implementations expect).
    pub fn generate() -> Self {
        let mut raw = [0u8; KEY_LEN];
        OsRng.fill_bytes(&mut raw);
        raw[0] &= 248;
        raw[31] = (raw[31] & 127) | 64;
        Self::from_raw(raw)
    }

    pub fn from_raw(raw: [u8; KEY_LEN]) -> Self {
        Self {
            raw,
            secret: SecretKey::from_bytes(raw),
        }
    }

    /// The raw 32 bytes (for handing the same key to WireGuard).
    pub fn to_raw(&self) -> [u8; KEY_LEN] {
        self.raw
    }

    /// `privkey:` + 64 hex digits. Handle with care.
    pub fn to_text(&self) -> String {
        format!("{NODE_PRIVATE_TEXT_PREFIX}{}", hex_encode(&self.raw))
    }

    pub fn parse_text(s: &str) -> Result<Self, KeyError> {
        parse_prefixed_hex(s, NODE_PRIVATE_TEXT_PREFIX).map(Self::from_raw)
    }

    pub fn public(&self) -> NodePublic {
        NodePublic(self.secret.public_key().to_bytes())
    }

    /// Seals `cleartext` to `to` with a fresh random nonce and returns
    /// `nonce(24) | box`.
    pub fn seal_to(&self, to: &NodePublic, cleartext: &[u8]) -> Vec<u8> {
        let mut nonce = [0u8; NONCE_LEN];
        OsRng.fill_bytes(&mut nonce);
        self.seal_to_with_nonce(to, &nonce, cleartext)
    }

    /// Like [`seal_to`](Self::seal_to) with a caller-chosen nonce (tests).
    pub fn seal_to_with_nonce(
        &self,
        to: &NodePublic,
        nonce: &[u8; NONCE_LEN],
        cleartext: &[u8],
    ) -> Vec<u8> {
        let sealer = SalsaBox::new(&to.to_box_key(), &self.secret);
        let mut out = Vec::with_capacity(NONCE_LEN + BOX_OVERHEAD + cleartext.len());
        out.extend_from_slice(nonce);
        // Encryption with an empty AAD cannot fail for any message size we
        // can hold in memory; keep the error path anyway instead of panicking.
        match sealer.encrypt(nonce.into(), cleartext) {
            Ok(b) => out.extend_from_slice(&b),
            Err(_) => out.clear(),
        }
        out
    }

    /// Opens `nonce(24) | box` sealed by `from` to this key. `None` if it is
    /// too short or does not authenticate.
    pub fn open_from(&self, from: &NodePublic, sealed: &[u8]) -> Option<Vec<u8>> {
        if sealed.len() < NONCE_LEN + BOX_OVERHEAD {
            return None;
        }
        let (nonce, boxed) = sealed.split_at(NONCE_LEN);
        let opener = SalsaBox::new(&from.to_box_key(), &self.secret);
        opener.decrypt(nonce.into(), boxed).ok()
    }
}

impl fmt::Debug for NodePrivate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "NodePrivate(public={:?})", self.public())
    }
}

/// A disco public key. A DERP-only client never speaks disco, but its node
/// must still carry a parsable `discokey:` value or peers drop the node.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct DiscoPublic([u8; KEY_LEN]);

impl DiscoPublic {
    pub const fn from_raw(raw: [u8; KEY_LEN]) -> Self {
        Self(raw)
    }

    /// A random (valid-looking) disco key for a client that never uses it.
    pub fn random() -> Self {
        NodePrivate::generate().public().0.into()
    }

    pub const fn as_bytes(&self) -> &[u8; KEY_LEN] {
        &self.0
    }

    /// `discokey:` + 64 lowercase hex digits.
    pub fn to_text(&self) -> String {
        format!("{DISCO_PUBLIC_TEXT_PREFIX}{}", hex_encode(&self.0))
    }

    pub fn parse_text(s: &str) -> Result<Self, KeyError> {
        parse_prefixed_hex(s, DISCO_PUBLIC_TEXT_PREFIX).map(Self)
    }
}

impl From<[u8; KEY_LEN]> for DiscoPublic {
    fn from(raw: [u8; KEY_LEN]) -> Self {
        Self(raw)
    }
}

impl fmt::Display for DiscoPublic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_text())
    }
}

impl fmt::Debug for DiscoPublic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "discokey:{}…", &hex_encode(&self.0)[..8])
    }
}

fn raw_32(b: &[u8]) -> Result<[u8; KEY_LEN], KeyError> {
    b.try_into().map_err(|_| KeyError::WrongLength {
        got: b.len(),
        want: KEY_LEN,
    })
}

/// Lowercase hex, as Go's `encoding/hex`.
pub fn hex_encode(b: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(b.len() * 2);
    for &x in b {
        s.push(DIGITS[usize::from(x >> 4)] as char);
        s.push(DIGITS[usize::from(x & 0x0f)] as char);
    }
    s
}

fn hex_val(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

/// Decodes hex of either case into exactly `N` bytes.
pub fn hex_decode_exact<const N: usize>(s: &str) -> Result<[u8; N], KeyError> {
    let b = s.as_bytes();
    if b.len() != N * 2 {
        return Err(KeyError::WrongLength {
            got: b.len(),
            want: N * 2,
        });
    }
    let mut out = [0u8; N];
    for (i, pair) in b.chunks_exact(2).enumerate() {
        let hi = hex_val(pair[0]).ok_or(KeyError::BadHex)?;
        let lo = hex_val(pair[1]).ok_or(KeyError::BadHex)?;
        out[i] = (hi << 4) | lo;
    }
    Ok(out)
}

fn parse_prefixed_hex(s: &str, prefix: &'static str) -> Result<[u8; KEY_LEN], KeyError> {
    let rest = s
        .strip_prefix(prefix)
        .ok_or(KeyError::MissingPrefix { expected: prefix })?;
    hex_decode_exact::<KEY_LEN>(rest)
}
