//! Sealing and opening gossip datagrams with the mesh key.
//!
//! Every datagram a sidecar sends is sealed with XChaCha20-Poly1305 (an
//! AEAD: one pass both hides and authenticates), under a key derived from
//! the mesh's shared secret with HKDF-SHA256. Its layout:
//!
//! ```text
//! magic (1) | version (1) | key id (4) | sent at, ms since the epoch (8) | nonce (24)
//! | ciphertext of (kind (1) | payload) | tag (16)
//! ```
//!
//! The 38-byte header is the AEAD's associated data, so it cannot be
//! altered either. [`Opener::open`] checks, in this order and before
//! anything parses the payload: the size (at most [`MAX_DATAGRAM`] bytes,
//! at least a header and a tag), the magic and version, the key id (the
//! current key or the previous one, so keys rotate without a restart), the
//! timestamp (within [`REPLAY_WINDOW`] of the receiver's clock), the tag,
//! and that the nonce was not seen before within the window. Each refusal
//! is counted by its reason ([`Dropped`]).
//!
//! A random 192-bit nonce per datagram means two sidecars sharing a key
//! never reuse one, with no counter to keep across restarts.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use chacha20poly1305::aead::{AeadInPlace, KeyInit};
use chacha20poly1305::{Key, XChaCha20Poly1305, XNonce};
use hkdf::Hkdf;
use rand::Rng as _;
use rand::rngs::StdRng;
use sha2::Sha256;

/// The largest datagram sent or accepted: under a common path MTU.
pub const MAX_DATAGRAM: usize = 1400;

const MAGIC: u8 = 0xa7;
const VERSION: u8 = 1;
const NONCE: usize = 24;
const TAG: usize = 16;
/// Magic, version, key id, timestamp, nonce.
pub const HEADER: usize = 1 + 1 + 4 + 8 + NONCE;
/// What sealing adds to a payload: the header, the kind byte and the tag.
pub const OVERHEAD: usize = HEADER + 1 + TAG;

/// A datagram stamped further than this from the receiver's clock is
/// refused as a replay (or a sender whose clock is off).
pub const REPLAY_WINDOW: Duration = Duration::from_secs(10);

/// Nonces remembered to refuse a replay within the window; past this many
/// the older generation is forgotten early.
const MAX_REMEMBERED: usize = 1 << 16;

/// What a datagram carries, told apart after it is opened.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// A packet of the membership protocol (foca's).
    Swim = 0,
    /// A sidecar's own reports, sent straight to a peer that just joined.
    Sync = 1,
}

/// One key, as derived from a shared secret.
#[derive(Clone)]
pub struct MeshKey {
    id: [u8; 4],
    cipher: XChaCha20Poly1305,
}

impl MeshKey {
    /// Derives the key and its id from `secret` (at least 32 bytes; the
    /// config checks it).
    pub fn derive(secret: &[u8]) -> MeshKey {
        let hk = Hkdf::<Sha256>::new(Some(b"agentmesh mesh v1"), secret);
        let mut key = [0u8; 32];
        let mut id = [0u8; 4];
        hk.expand(b"datagram key", &mut key)
            .expect("32 bytes is a valid HKDF-SHA256 output length");
        hk.expand(b"key id", &mut id)
            .expect("4 bytes is a valid HKDF-SHA256 output length");
        MeshKey {
            id,
            cipher: XChaCha20Poly1305::new(Key::from_slice(&key)),
        }
    }

    /// The first four bytes of the key's id, in hex: safe to log.
    pub fn id_hex(&self) -> String {
        self.id.iter().map(|b| format!("{b:02x}")).collect()
    }
}

/// Why a datagram was dropped unopened.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dropped {
    /// Larger than [`MAX_DATAGRAM`].
    Oversized,
    /// Shorter than a header and a tag, or of another format.
    Truncated,
    /// Sealed with a key this sidecar does not hold.
    OtherKey,
    /// Stamped outside the replay window, or a nonce seen before.
    Replayed,
    /// The tag does not match: altered, or forged.
    Forged,
}

impl Dropped {
    pub const ALL: [Dropped; 5] = [
        Dropped::Oversized,
        Dropped::Truncated,
        Dropped::OtherKey,
        Dropped::Replayed,
        Dropped::Forged,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Dropped::Oversized => "oversized",
            Dropped::Truncated => "truncated",
            Dropped::OtherKey => "other_key",
            Dropped::Replayed => "replayed",
            Dropped::Forged => "forged",
        }
    }
}

/// Counts of datagrams dropped, by reason (relaxed atomics, read by `/mesh`).
#[derive(Debug, Default)]
pub struct DropCounts([AtomicU64; 5]);

impl DropCounts {
    pub fn count(&self, why: Dropped) {
        self.0[why as usize].fetch_add(1, Ordering::Relaxed);
    }

    pub fn get(&self, why: Dropped) -> u64 {
        self.0[why as usize].load(Ordering::Relaxed)
    }
}

/// Seals datagrams with the current key. Nonces come from a CSPRNG.
pub struct Sealer {
    key: MeshKey,
    rng: StdRng,
}

impl Sealer {
    pub fn new(key: MeshKey) -> Sealer {
        Sealer {
            key,
            rng: rand::make_rng(),
        }
    }

    /// Seals `payload` of `kind`, stamped `now_ms`, into `out` (cleared
    /// first). The caller keeps payloads within [`MAX_DATAGRAM`] less
    /// [`OVERHEAD`].
    pub fn seal(&mut self, kind: Kind, payload: &[u8], now_ms: u64, out: &mut Vec<u8>) {
        out.clear();
        out.push(MAGIC);
        out.push(VERSION);
        out.extend_from_slice(&self.key.id);
        out.extend_from_slice(&now_ms.to_be_bytes());
        let mut nonce = [0u8; NONCE];
        self.rng.fill_bytes(&mut nonce);
        out.extend_from_slice(&nonce);
        out.push(kind as u8);
        out.extend_from_slice(payload);
        let (header, body) = out.split_at_mut(HEADER);
        let tag = self
            .key
            .cipher
            .encrypt_in_place_detached(XNonce::from_slice(&nonce), header, body)
            .expect("a datagram is far below XChaCha20-Poly1305's length limit");
        out.extend_from_slice(&tag);
    }
}

/// Opens datagrams sealed with the current or the previous key, refusing
/// replays.
pub struct Opener {
    keys: Vec<MeshKey>,
    /// Nonces seen in this window and the one before.
    seen: [HashSet<[u8; NONCE]>; 2],
    /// When `seen[0]` was started, in ms since the epoch.
    generation_ms: u64,
}

impl Opener {
    pub fn new(current: MeshKey, previous: Option<MeshKey>) -> Opener {
        Opener {
            keys: std::iter::once(current).chain(previous).collect(),
            seen: [HashSet::new(), HashSet::new()],
            generation_ms: 0,
        }
    }

    /// Checks and decrypts `datagram` in place; on success returns its kind
    /// and its payload (a slice of `datagram`).
    pub fn open<'a>(
        &mut self,
        datagram: &'a mut [u8],
        now_ms: u64,
    ) -> Result<(Kind, &'a [u8]), Dropped> {
        if datagram.len() > MAX_DATAGRAM {
            return Err(Dropped::Oversized);
        }
        if datagram.len() < OVERHEAD || datagram[0] != MAGIC || datagram[1] != VERSION {
            return Err(Dropped::Truncated);
        }
        let key = self
            .keys
            .iter()
            .find(|k| k.id == datagram[2..6])
            .ok_or(Dropped::OtherKey)?;
        let sent_ms = u64::from_be_bytes(datagram[6..14].try_into().expect("8 bytes"));
        let window = REPLAY_WINDOW.as_millis() as u64;
        if sent_ms.abs_diff(now_ms) > window {
            return Err(Dropped::Replayed);
        }
        let nonce: [u8; NONCE] = datagram[14..HEADER].try_into().expect("24 bytes");
        let (header, rest) = datagram.split_at_mut(HEADER);
        let (body, tag) = rest.split_at_mut(rest.len() - TAG);
        key.cipher
            .decrypt_in_place_detached(
                XNonce::from_slice(&nonce),
                header,
                body,
                chacha20poly1305::Tag::from_slice(tag),
            )
            .map_err(|_| Dropped::Forged)?;
        // Only an authentic datagram is remembered, so forgeries cannot
        // fill the set.
        if !self.remember(nonce, now_ms) {
            return Err(Dropped::Replayed);
        }
        let kind = match body[0] {
            0 => Kind::Swim,
            1 => Kind::Sync,
            // Authentic but of a kind this version does not know.
            _ => return Err(Dropped::Truncated),
        };
        Ok((kind, &body[1..]))
    }

    /// Records a nonce; false if it was seen within the window.
    fn remember(&mut self, nonce: [u8; NONCE], now_ms: u64) -> bool {
        let window = REPLAY_WINDOW.as_millis() as u64;
        // Two generations, each at least a window long: a nonce is
        // remembered for at least one window (longer than any timestamp
        // accepted after it) and at most two.
        if now_ms >= self.generation_ms + window || self.seen[0].len() >= MAX_REMEMBERED {
            self.seen.swap(0, 1);
            self.seen[0].clear();
            self.generation_ms = now_ms;
        }
        if self.seen[1].contains(&nonce) {
            return false;
        }
        self.seen[0].insert(nonce)
    }
}

/// Milliseconds since the Unix epoch, as datagrams are stamped.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(byte: u8) -> MeshKey {
        MeshKey::derive(&[byte; 32])
    }

    fn sealed(kind: Kind, payload: &[u8], at: u64) -> Vec<u8> {
        let mut out = Vec::new();
        Sealer::new(key(1)).seal(kind, payload, at, &mut out);
        out
    }

    const T: u64 = 1_800_000_000_000;

    #[test]
    fn a_sealed_datagram_opens_once_with_the_same_key() {
        let mut d = sealed(Kind::Sync, b"hello", T);
        assert_eq!(d.len(), 5 + OVERHEAD);
        let mut opener = Opener::new(key(1), None);
        let mut copy = d.clone();
        assert_eq!(opener.open(&mut d, T + 5), Ok((Kind::Sync, &b"hello"[..])));
        assert_eq!(opener.open(&mut copy, T + 6), Err(Dropped::Replayed));
    }

    #[test]
    fn every_bad_datagram_is_refused_for_its_reason() {
        let good = sealed(Kind::Swim, b"payload", T);
        let mut opener = Opener::new(key(1), None);
        let open = |o: &mut Opener, mut d: Vec<u8>, at| o.open(&mut d, at).map(|_| ());
        assert_eq!(open(&mut opener, vec![0; 1401], T), Err(Dropped::Oversized));
        assert_eq!(
            open(&mut opener, good[..good.len() - 1].to_vec(), T),
            Err(Dropped::Forged),
            "a shortened datagram fails its tag"
        );
        assert_eq!(
            open(&mut opener, good[..OVERHEAD - 1].to_vec(), T),
            Err(Dropped::Truncated)
        );
        let mut flipped = good.clone();
        *flipped.last_mut().unwrap() ^= 1;
        assert_eq!(open(&mut opener, flipped, T), Err(Dropped::Forged));
        let mut body = good.clone();
        body[HEADER + 2] ^= 0x40;
        assert_eq!(open(&mut opener, body, T), Err(Dropped::Forged));
        let mut restamped = good.clone();
        restamped[13] ^= 1;
        assert_eq!(
            open(&mut opener, restamped, T),
            Err(Dropped::Forged),
            "the header is authenticated"
        );
        assert_eq!(
            open(&mut opener, good.clone(), T + 11_000),
            Err(Dropped::Replayed),
            "outside the window"
        );
        let mut other = Opener::new(key(2), None);
        assert_eq!(open(&mut other, good.clone(), T), Err(Dropped::OtherKey));
        assert_eq!(open(&mut opener, good, T), Ok(()));
    }

    #[test]
    fn the_previous_key_is_still_accepted_while_keys_rotate() {
        let mut rotated = Opener::new(key(2), Some(key(1)));
        let mut d = sealed(Kind::Swim, b"x", T);
        assert!(rotated.open(&mut d, T).is_ok());
    }

    #[test]
    fn nonces_are_forgotten_only_after_the_window() {
        let mut opener = Opener::new(key(1), None);
        let d = sealed(Kind::Swim, b"x", T);
        assert!(opener.open(&mut d.clone(), T).is_ok());
        // A generation later the nonce is still remembered...
        assert!(
            opener
                .open(&mut sealed(Kind::Swim, b"y", T + 10_001), T + 10_001)
                .is_ok()
        );
        assert_eq!(
            opener.open(&mut d.clone(), T + 9_999),
            Err(Dropped::Replayed)
        );
        // ...and past the window the timestamp refuses it anyway.
        assert_eq!(
            opener.open(&mut d.clone(), T + 20_002),
            Err(Dropped::Replayed)
        );
    }

    proptest::proptest! {
        /// The decoder's fuzz target, run as a property: arbitrary bytes,
        /// and a sealed datagram with arbitrary bytes changed, never open
        /// and never panic.
        #[test]
        fn no_altered_or_random_datagram_opens(
            random in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..1600),
            at in 0usize..1400,
            xor in 1u8..=255,
        ) {
            let mut opener = Opener::new(key(1), None);
            proptest::prop_assert!(opener.open(&mut random.clone(), T).is_err());
            let mut d = sealed(Kind::Swim, &[7u8; 100], T);
            let i = at % d.len();
            d[i] ^= xor;
            proptest::prop_assert!(opener.open(&mut d, T).is_err());
        }
    }
}
