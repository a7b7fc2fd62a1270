//! `grpc-timeout` parsing on arbitrary bytes, against the protocol's
//! grammar (1 to 8 ASCII digits and a unit), and the value the sidecar
//! sends on (what is left of a call, at most a year): it parses back, is never shorter than the time left, and at
//! most a millisecond (or a second, past 27 hours) longer.
//! Run: `cargo +nightly fuzz run grpc_timeout`.

#![no_main]

use std::time::Duration;

use agentmesh::fuzzing::{grpc_timeout, grpc_timeout_sent};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let parsed = grpc_timeout(data);
    let valid = data.split_last().is_some_and(|(unit, digits)| {
        (1..=8).contains(&digits.len())
            && digits.iter().all(u8::is_ascii_digit)
            && b"HMSmun".contains(unit)
    });
    assert_eq!(parsed.is_some(), valid, "{data:?}");
    if let Some(d) = parsed {
        assert!(d <= Duration::from_secs(99_999_999 * 3600));
        // What is left of a call is at most a year (request_timeout's bound).
        let d = d.min(Duration::from_secs(365 * 24 * 3600));
        let original = d + Duration::from_millis(5);
        let sent = grpc_timeout_sent(d, original).expect("a header is sent");
        let back = grpc_timeout(&sent).expect("the sent value parses");
        assert!(back >= d, "{sent:?} is shorter than {d:?}");
        let slack = if d < Duration::from_secs(27 * 3600) {
            Duration::from_millis(1)
        } else {
            Duration::from_secs(1)
        };
        assert!(back <= d.max(Duration::from_millis(1)) + slack, "{sent:?} for {d:?}");
    }
});
