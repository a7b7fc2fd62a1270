//! The gossip datagram decoder on arbitrary input: opening (size, header,
//! key id, timestamp, tag, nonce) must refuse anything not sealed with the
//! key, and the report decoders must refuse or bound anything else, without
//! panicking. Run: `cargo +nightly fuzz run datagram`.

#![no_main]

use agentmesh::mesh::report::{Item, unpack};
use agentmesh::mesh::seal::{MeshKey, Opener, now_ms};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut opener = Opener::new(MeshKey::derive(&[7u8; 32]), None);
    let mut datagram = data.to_vec();
    assert!(opener.open(&mut datagram, now_ms()).is_err());
    // What follows a successful open, on arbitrary bytes.
    let _ = Item::decode(data);
    if let Some(items) = unpack(data) {
        assert!(items.iter().all(|i| i.cluster.len() <= 128));
    }
});
