//! A fixed hash: FNV-1a with a SplitMix64 finaliser, written out here so
//! that it cannot change between builds and sidecars of different versions
//! agree (session placement, the names of long keys). Not keyed: use it
//! where a caller that forces a collision gains nothing but sharing its own
//! state between two of its own keys.

use std::borrow::Cow;

pub const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;

pub fn fnv1a(bytes: &[u8], seed: u64) -> u64 {
    bytes.iter().fold(seed, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

pub fn splitmix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Keys longer than this many bytes are kept by their hash.
pub const MAX_KEY_BYTES: usize = 64;

/// A caller's key (a session id, a rate-limit key) as it is stored: itself,
/// or, past [`MAX_KEY_BYTES`], `#` and the first 128 bits of its SHA-256 in
/// hex, so that a table of keys is bounded in bytes as well as in length.
/// SHA-256, not the FNV hash above: a caller who knows another's long key
/// must not be able to make a key of its own that lands on the other's
/// rate-limit count.
pub fn short_key(value: &str) -> Cow<'_, str> {
    use sha2::{Digest, Sha256};
    use std::fmt::Write;
    if value.len() <= MAX_KEY_BYTES {
        return Cow::Borrowed(value);
    }
    let digest = Sha256::digest(value.as_bytes());
    let mut name = String::with_capacity(33);
    name.push('#');
    for b in &digest[..16] {
        let _ = write!(name, "{b:02x}");
    }
    Cow::Owned(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_hash_is_fixed_across_builds() {
        // Sidecars of different builds must agree: pin the function down.
        assert_eq!(fnv1a(b"", FNV_OFFSET), FNV_OFFSET);
        assert_eq!(fnv1a(b"a", FNV_OFFSET), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(splitmix64(0), 0xe220_a839_7b1d_cdaf);
    }

    #[test]
    fn long_keys_are_kept_short_and_distinct() {
        assert_eq!(short_key("tenant-7"), "tenant-7");
        let long = "x".repeat(15 * 1024);
        let mut other = long.clone();
        other.push('y');
        let (a, b) = (short_key(&long), short_key(&other));
        assert_eq!(a.len(), 33);
        assert!(a.starts_with('#') && a != b);
        assert_eq!(a, short_key(&long), "the same key, the same name");
        // Pinned: sidecars of different builds name a long key alike.
        assert_eq!(
            short_key(&"k".repeat(65)),
            "#f39cdc2584758c99cf81c1f41d2572f5"
        );
    }
}
