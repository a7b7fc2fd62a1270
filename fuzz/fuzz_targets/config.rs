//! The config parser on arbitrary text: TOML, then every check. It must
//! answer every input with a config or with errors that name the file and
//! a key, never panic. Run: `cargo +nightly fuzz run config`.

#![no_main]

use std::path::Path;

use agentmesh::config::Config;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let file = Path::new("/nonexistent/agentmesh.toml");
    let env = |name: &str| (name == "AGENTMESH_TOKEN").then(|| "secret".to_string());
    match Config::parse(file, text, &env) {
        Ok(config) => {
            // What validation let through holds what the sidecar relies on.
            for c in &config.clusters {
                assert!(!c.name.is_empty());
                assert!(c.max_in_flight >= 1 && c.max_in_flight_per_endpoint >= 1);
                assert!((0.0..=1.0).contains(&c.panic_threshold));
            }
        }
        Err(errors) => {
            let shown = errors.to_string();
            assert!(shown.contains("agentmesh.toml"), "{shown}");
        }
    }
});
