//! The first bytes of a proxy-port connection: the HTTP/2 preface or an
//! HTTP/1.1 request head (a CONNECT and its target), and the target's
//! host as clusters are matched by it. Run: `cargo +nightly fuzz run proxy_head`.

#![no_main]

use agentmesh::fuzzing::{proxy_head, strip_port};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    match proxy_head(data) {
        Ok(None) => assert!(data.len() < 8 * 1024, "an incomplete head past the bound"),
        Ok(Some(None)) => assert!(data.starts_with(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")),
        Ok(Some(Some((method, target, len)))) => {
            assert!(len <= data.len());
            assert!(!method.is_empty());
            let host = strip_port(&target);
            assert!(target.starts_with(host));
        }
        Err(reason) => assert!(reason.starts_with("agentmesh: ")),
    }
});
