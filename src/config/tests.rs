//! Parsing whole config files: what is read, what the defaults are, and the
//! key and reason every refusal names.

use super::env::expand;
use super::*;
use crate::endpoint::Outcome;

fn parse(text: &str) -> Result<Config, ConfigErrors> {
    let env = |name: &str| match name {
        "PLANNER_HOST" => Some("10.0.0.9".to_string()),
        _ => None,
    };
    Config::parse(Path::new("mesh.toml"), text, &env)
}

fn first_error(text: &str) -> String {
    parse(text).expect_err("config should be refused").0[0].to_string()
}

const GOOD: &str = r#"
    [listener]
    proxy = "127.0.0.1:15001"
    refuse_unknown = true

    [admin]
    listen = "127.0.0.1:15000"

    [[cluster]]
    name = "planner.agents"
    aliases = ["planner"]
    strategy = "weighted"
    local_port = "127.0.0.1:15101"
    [[cluster.endpoints]]
    address = "127.0.0.1:50051"
    weight = 5
    [[cluster.endpoints]]
    address = "${PLANNER_HOST}:50052"
"#;

#[test]
fn reads_every_key_of_the_documented_example() {
    let c = parse(GOOD).unwrap();
    assert_eq!(c.listener.proxy.to_string(), "127.0.0.1:15001");
    assert!(c.listener.refuse_unknown);
    assert_eq!(c.admin.listen.to_string(), "127.0.0.1:15000");
    let cl = &c.clusters[0];
    assert_eq!(cl.name, "planner.agents");
    assert_eq!(cl.aliases, ["planner"]);
    assert_eq!(cl.strategy, Strategy::Weighted);
    assert_eq!(cl.local_port.unwrap().port(), 15101);
    assert_eq!(cl.endpoints[0].weight.get(), 5);
    assert_eq!(cl.endpoints[1].weight.get(), 1);
    assert_eq!(cl.endpoints[1].address, "10.0.0.9:50052");
}

#[test]
fn defaults_fill_an_almost_empty_file() {
    let c = parse("[[cluster]]\nname = \"a\"\nendpoints = [{ address = \"h:1\" }]").unwrap();
    assert_eq!(c.listener.proxy.to_string(), DEFAULT_PROXY);
    assert_eq!(c.admin.listen.to_string(), DEFAULT_ADMIN);
    assert_eq!(c.clusters[0].strategy, Strategy::RoundRobin);
    assert_eq!(c.clusters[0].connect_timeout, DEFAULT_CONNECT_TIMEOUT);
    assert_eq!(c.clusters[0].choices, Choices::default());
    assert!(c.clusters[0].remember_runner_up);
}

#[test]
fn choices_and_the_runner_up_are_read_and_checked() {
    let base = "[[cluster]]\nname = \"a\"\nendpoints = [{ address = \"h:1\" }]\n";
    let c = parse(&format!(
        "{base}choices = \"all\"\nremember_runner_up = false"
    ))
    .unwrap();
    assert_eq!(c.clusters[0].choices, Choices::All);
    assert!(!c.clusters[0].remember_runner_up);
    let e = first_error(&format!("{base}remember_runner_up = \"yes\""));
    assert!(
        e.starts_with("mesh.toml: cluster[0].remember_runner_up: invalid type"),
        "{e}"
    );
    let e = first_error(&format!("{base}choices = 0"));
    assert!(
        e.starts_with("mesh.toml: cluster[0].choices: must be"),
        "{e}"
    );
}

#[test]
fn the_second_round_of_picking_knobs_are_read_and_checked() {
    let base = "[[cluster]]\nname = \"a\"\nendpoints = [{ address = \"h:1\" }]\n";
    let c = parse(&format!(
        "{base}strategy = \"hot_cold\"\nchoices = \"auto\"\nhot_quantile = 0.9\n\
         performance = {{ score = \"performance_based\" }}\n\
         session_affinity = {{ balance_factor = 1.25 }}"
    ))
    .unwrap();
    let cl = &c.clusters[0];
    assert_eq!(cl.strategy, Strategy::HotCold);
    assert_eq!(cl.choices, Choices::Auto);
    assert_eq!(cl.hot_quantile, 0.9);
    assert_eq!(
        cl.performance.score,
        crate::config::PerformanceScore::PerformanceBased
    );
    assert_eq!(cl.affinity.as_ref().unwrap().balance_factor, Some(1.25));
    let c = parse(base).unwrap();
    assert_eq!(c.clusters[0].choices, Choices::Auto);
    assert_eq!(c.clusters[0].hot_quantile, DEFAULT_HOT_QUANTILE);
    assert_eq!(
        c.clusters[0].performance.score,
        crate::config::PerformanceScore::LoadAware
    );
    for (text, key) in [
        (
            "hot_quantile = 0.0",
            "cluster[0].hot_quantile: must be more than 0",
        ),
        (
            "hot_quantile = 1.5",
            "cluster[0].hot_quantile: must be more than 0",
        ),
        (
            "session_affinity = { balance_factor = 0.9 }",
            "cluster[0].session_affinity.balance_factor: must be from 1 to 100",
        ),
        (
            "performance = { score = \"fastest\" }",
            "cluster[0].performance.score: unknown variant `fastest`",
        ),
    ] {
        let e = first_error(&format!("{base}{text}"));
        assert!(e.starts_with(&format!("mesh.toml: {key}")), "{text}: {e}");
    }
}

#[test]
fn mesh_wide_limits_need_a_mesh() {
    let base = "[[cluster]]\nname = \"a\"\nendpoints = [{ address = \"h:1\" }]\n\
                retry = { methods = [\"*\"], scope = \"mesh\" }\n\
                [[cluster.rate_limit]]\ncalls = 100\nwindow = \"1m\"\nscope = \"mesh\"\n";
    let e = parse(base).unwrap_err().to_string();
    assert!(
        e.contains("mesh.toml: cluster[0].retry.scope: needs a [mesh]"),
        "{e}"
    );
    assert!(
        e.contains("mesh.toml: cluster[0].rate_limit[0].scope: needs a [mesh]"),
        "{e}"
    );
    let c = parse(&format!(
        "{base}[mesh]\nlisten = \"127.0.0.1:7946\"\ninsecure = true\n"
    ))
    .unwrap();
    assert!(c.clusters[0].rate_limits[0].mesh_wide);
    assert!(c.clusters[0].retry.as_ref().unwrap().mesh_wide_budget);
}

#[test]
fn unknown_strategy_names_the_key_and_the_choices() {
    let e = first_error(&GOOD.replace("\"weighted\"", "\"fastest\""));
    assert!(
        e.starts_with("mesh.toml: cluster[0].strategy: unknown variant `fastest`"),
        "{e}"
    );
    assert!(e.contains("round_robin"), "{e}");
}

#[test]
fn weight_zero_is_refused() {
    let e = first_error(&GOOD.replace("weight = 5", "weight = 0"));
    assert!(
        e.starts_with("mesh.toml: cluster[0].endpoints[0].weight: must be at least 1"),
        "{e}"
    );
}

#[test]
fn duplicate_cluster_names_and_aliases_are_refused() {
    let twice =
        format!("{GOOD}\n[[cluster]]\nname = \"Planner\"\nendpoints = [{{ address = \"h:1\" }}]");
    let e = first_error(&twice);
    assert!(e.starts_with("mesh.toml: cluster[1].name: \"Planner\" already names another cluster (at cluster[0].aliases[0])"), "{e}");
}

#[test]
fn unparsable_addresses_are_refused() {
    let e = first_error(&GOOD.replace("127.0.0.1:50051", "127.0.0.1"));
    assert!(
        e.starts_with("mesh.toml: cluster[0].endpoints[0].address: \"127.0.0.1\" has no port"),
        "{e}"
    );
    let e = first_error(&GOOD.replace("127.0.0.1:50051", "bad host:80"));
    assert!(e.contains("not a valid host name"), "{e}");
    let e = first_error(&GOOD.replace("127.0.0.1:15001", "localhost:x"));
    assert!(
        e.starts_with("mesh.toml: listener.proxy: \"localhost:x\" is not a socket address"),
        "{e}"
    );
}

#[test]
fn unknown_keys_are_errors_that_name_the_key() {
    let e = first_error(&GOOD.replace("weight = 5", "wieght = 5"));
    assert!(
        e.starts_with("mesh.toml: cluster[0].endpoints[0].wieght: unknown field `wieght`"),
        "{e}"
    );
    let e = first_error(&format!("colour = 1\n{GOOD}"));
    assert!(e.starts_with("mesh.toml: colour: unknown field"), "{e}");
}

#[test]
fn an_endpoint_that_is_the_sidecar_itself_is_refused() {
    let e = first_error(&GOOD.replace("127.0.0.1:50051", "127.0.0.1:15001"));
    assert!(e.starts_with("mesh.toml: cluster[0].endpoints[0].address: \"127.0.0.1:15001\" is this sidecar's own listener.proxy"), "{e}");
    let e = first_error(&GOOD.replace("127.0.0.1:50051", "127.0.0.1:15101"));
    assert!(e.contains("own cluster[0].local_port"), "{e}");
}

#[test]
fn a_wildcard_listener_clashes_with_any_address_on_its_port() {
    let e = first_error(&GOOD.replace("127.0.0.1:15000", "0.0.0.0:15001"));
    assert!(
        e.starts_with("mesh.toml: admin.listen: 0.0.0.0:15001 is already used by listener.proxy"),
        "{e}"
    );
}

#[test]
fn syntax_errors_give_a_position() {
    let e = first_error("[listener\nproxy = 1");
    assert!(e.starts_with("mesh.toml: line 1, column"), "{e}");
}

#[test]
fn environment_variables_are_substituted_or_named_when_missing() {
    let e = first_error(&GOOD.replace("${PLANNER_HOST}", "${NOPE}"));
    assert!(
        e.starts_with(
            "mesh.toml: cluster[0].endpoints[1].address: environment variable NOPE is not set"
        ),
        "{e}"
    );
    let c = parse(&GOOD.replace("${PLANNER_HOST}", "${NOPE:-10.1.1.1}")).unwrap();
    assert_eq!(c.clusters[0].endpoints[1].address, "10.1.1.1:50052");
    assert_eq!(expand("a$$b$c", &|_| None).unwrap(), "a$b$c");
}

const RESILIENT: &str = r#"
    [[cluster]]
    name = "a"
    request_timeout = "5s"
    idle_timeout = "1m"
    keepalive_interval = "5s"
    keepalive_timeout = "2s"
    max_in_flight = 10
    max_in_flight_per_endpoint = 3
    panic_threshold = 30
    endpoints = [{ address = "h:1" }]
    [cluster.circuit_breaker]
    failure_threshold = 7
    open_for = "2s"
    max_open_for = "20s"
    failures = ["reset", "UNAVAILABLE", "resource_exhausted"]
    max_ejection_percent = 25
    [cluster.outlier_detection]
    min_success_rate = 0.9
    window = "30s"
    min_calls = 20
    [cluster.health_check]
    interval = "1s"
    service = "planner"
    [cluster.retry]
    methods = ["/p.S/M", "/p.T/*"]
    on = ["UNAVAILABLE", "ABORTED"]
    max_attempts = 2
    min_retries_per_second = 0
    [[cluster.rate_limit]]
    calls = 100
    window = "1m"
    key = "x-user-id"
"#;

#[test]
fn reads_every_resilience_key() {
    use tonic::Code;
    let c = parse(RESILIENT).unwrap();
    let cl = &c.clusters[0];
    assert_eq!(cl.request_timeout, Duration::from_secs(5));
    assert_eq!(cl.idle_timeout, Duration::from_secs(60));
    assert_eq!(
        (cl.keepalive_interval, cl.keepalive_timeout),
        (Duration::from_secs(5), Duration::from_secs(2))
    );
    assert_eq!((cl.max_in_flight, cl.max_in_flight_per_endpoint), (10, 3));
    assert_eq!(cl.panic_threshold, 0.3);
    let b = &cl.breaker;
    assert_eq!(b.failure_threshold.get(), 7);
    assert_eq!(
        (b.open_for, b.max_open_for),
        (Duration::from_secs(2), Duration::from_secs(20))
    );
    assert_eq!(b.max_ejection, 0.25);
    assert!(
        b.failures
            .contains(Outcome::Status(Code::ResourceExhausted))
    );
    assert!(b.failures.contains(Outcome::Reset));
    assert!(!b.failures.contains(Outcome::Connect));
    assert!(!b.failures.contains(Outcome::Status(Code::Internal)));
    let o = cl.outlier.as_ref().unwrap();
    assert_eq!((o.min_success_rate, o.min_calls), (0.9, 20));
    let h = cl.health_check.as_ref().unwrap();
    assert_eq!(
        (h.interval, h.timeout),
        (Duration::from_secs(1), Duration::from_secs(5))
    );
    assert_eq!(h.service, "planner");
    let r = cl.retry.as_ref().unwrap();
    assert!(r.covers("/p.S/M") && r.covers("/p.T/X") && !r.covers("/p.S/N"));
    assert_eq!(r.on, [Code::Unavailable, Code::Aborted]);
    assert_eq!((r.max_attempts.get(), r.min_retries_per_second), (2, 0));
    let l = &cl.rate_limits[0];
    assert_eq!((l.calls.get(), l.window), (100, Duration::from_secs(60)));
    assert_eq!(l.key.as_ref().unwrap().as_str(), "x-user-id");
    // Defaults: breaker and outlier detection on, no checks, no retries.
    let d = parse("[[cluster]]\nname = \"a\"\nendpoints = [{ address = \"h:1\" }]").unwrap();
    let d = &d.clusters[0];
    assert!(d.breaker.enabled && d.outlier.is_some());
    assert!(d.health_check.is_none() && d.retry.is_none() && d.rate_limits.is_empty());
    assert!(d.breaker.failures.contains(Outcome::Connect));
}

#[test]
fn bad_resilience_values_name_their_keys() {
    for (from, to, key, reason) in [
        (
            "\"resource_exhausted\"",
            "\"SLOW\"",
            "cluster[0].circuit_breaker.failures",
            "\"SLOW\" is not a gRPC status name",
        ),
        (
            "max_ejection_percent = 25",
            "max_ejection_percent = 120",
            "cluster[0].circuit_breaker.max_ejection_percent",
            "must be a percentage from 0 to 100",
        ),
        (
            "min_success_rate = 0.9",
            "min_success_rate = 90",
            "cluster[0].outlier_detection.min_success_rate",
            "must be a share from 0.0 to 1.0",
        ),
        (
            "\"/p.T/*\"",
            "\"p.T*\"",
            "cluster[0].retry.methods[1]",
            "\"p.T*\" is not",
        ),
        (
            "\"ABORTED\"",
            "\"NOPE\"",
            "cluster[0].retry.on[1]",
            "\"NOPE\" is not a gRPC status name",
        ),
        (
            "max_attempts = 2",
            "max_attempts = 0",
            "cluster[0].retry.max_attempts",
            "must be a whole number from 1 to 10",
        ),
        (
            "calls = 100",
            "calls = 0",
            "cluster[0].rate_limit[0].calls",
            "must be a whole number of at least 1",
        ),
        (
            "max_in_flight = 10",
            "max_in_flight = -1",
            "cluster[0].max_in_flight",
            "must be a whole number",
        ),
        (
            "request_timeout = \"5s\"",
            "request_timeout = \"0s\"",
            "cluster[0].request_timeout",
            "must be more than 0",
        ),
        (
            "keepalive_timeout = \"2s\"",
            "keepalive_timeout = \"0s\"",
            "cluster[0].keepalive_timeout",
            "must be more than 0",
        ),
        (
            "open_for = \"2s\"",
            "open_for = \"1m\"",
            "cluster[0].circuit_breaker.max_open_for",
            "must be at least open_for",
        ),
        (
            "interval = \"1s\"",
            "intervall = \"1s\"",
            "cluster[0].health_check.intervall",
            "unknown field",
        ),
    ] {
        let text = RESILIENT.replace(from, to);
        assert_ne!(text, RESILIENT, "{from}");
        let e = first_error(&text);
        assert!(e.starts_with(&format!("mesh.toml: {key}: ")), "{e}");
        assert!(e.contains(reason), "{e}");
    }
}

#[test]
fn all_problems_are_reported_at_once() {
    let text = GOOD
        .replace("weight = 5", "weight = 0")
        .replace("127.0.0.1:15101", "127.0.0.1:15000");
    let errors = parse(&text).unwrap_err().0;
    let keys: Vec<_> = errors.iter().map(|e| e.key.as_str()).collect();
    assert_eq!(
        keys,
        ["cluster[0].local_port", "cluster[0].endpoints[0].weight"]
    );
}

const MESH: &str = r#"
    [[cluster]]
    name = "planner"
    strategy = "least_connections"
    endpoints = [{ address = "h:1" }]

    [mesh]
    listen = "127.0.0.1:15002"
    advertise = "${POD_IP:-}:15002"
    seeds = ["agentmesh-peers.agents.svc.cluster.local:15002"]
    node_id = "planner-caller-0"
    key = "YW4gYWdlbnRtZXNoIHRlc3Qga2V5IG9mIDMyIGJ5dGU="
    interval = "100ms"
"#;

#[test]
fn a_mesh_section_turns_gossip_and_mesh_wide_load_on() {
    let c = parse(MESH).unwrap();
    let m = c.mesh.as_ref().expect("[mesh] read");
    assert_eq!(m.listen.to_string(), "127.0.0.1:15002");
    assert_eq!(
        m.advertise.to_string(),
        "127.0.0.1:15002",
        "no POD_IP: listen's address"
    );
    assert_eq!(m.seeds, ["agentmesh-peers.agents.svc.cluster.local:15002"]);
    assert_eq!(m.node_id, "planner-caller-0");
    assert_eq!(
        m.key.as_deref(),
        Some(&b"an agentmesh test key of 32 byte"[..])
    );
    assert_eq!(m.interval, Duration::from_millis(100));
    assert_eq!(m.stale_after, DEFAULT_MESH_STALE_AFTER);
    assert!(
        c.clusters[0].mesh_load,
        "least_connections counts peers' calls"
    );
    let plain = parse(GOOD).unwrap();
    assert!(plain.mesh.is_none() && !plain.clusters[0].mesh_load);
}

#[test]
fn a_mesh_without_a_key_or_with_a_weak_one_is_refused() {
    let no_key = MESH.replace("key = \"YW4gYWdlbnRtZXNoIHRlc3Qga2V5IG9mIDMyIGJ5dGU=\"", "");
    let e = first_error(&no_key);
    assert!(
        e.contains("mesh.key") && e.contains("insecure = true"),
        "{e}"
    );
    let insecure = format!("{no_key}\ninsecure = true");
    assert_eq!(parse(&insecure).unwrap().mesh.unwrap().key, None);
    let short = MESH.replace("YW4gYWdlbnRtZXNoIHRlc3Qga2V5IG9mIDMyIGJ5dGU=", "c2hvcnQ=");
    let e = first_error(&short);
    assert!(e.contains("mesh.key") && e.contains("5 bytes"), "{e}");
    let garbled = MESH.replace(
        "YW4gYWdlbnRtZXNoIHRlc3Qga2V5IG9mIDMyIGJ5dGU=",
        "not base64!",
    );
    assert!(first_error(&garbled).contains("is not base64"));
}

#[test]
fn mesh_addresses_and_timing_are_checked() {
    let unspecified = MESH.replace("listen = \"127.0.0.1:15002\"", "listen = \"0.0.0.0:15002\"");
    let e = first_error(&unspecified);
    assert!(e.contains("mesh.advertise") && e.contains("POD_IP"), "{e}");
    let seed = MESH.replace("agentmesh-peers.agents.svc.cluster.local:15002", "no-port");
    assert!(first_error(&seed).contains("mesh.seeds[0]"));
    let stale = MESH.replace(
        "interval = \"100ms\"",
        "interval = \"1s\"\nstale_after = \"2s\"",
    );
    assert!(first_error(&stale).contains("mesh.stale_after"));
}

#[test]
fn telemetry_is_off_unless_an_endpoint_is_given_by_the_file_or_the_environment() {
    let off = parse(GOOD).unwrap().telemetry;
    assert_eq!(off, TelemetryConfig::default());
    assert_eq!(off.otlp_endpoint, None);

    let file = format!(
        "{GOOD}\n[telemetry]\notlp_endpoint = \"http://collector:4317\"\nsample_ratio = 0.25\nservice_name = \"caller-sidecar\"\nmax_queued_spans = 100\n"
    );
    let on = parse(&file).unwrap().telemetry;
    assert_eq!(on.otlp_endpoint.as_deref(), Some("http://collector:4317"));
    assert_eq!(on.sample_ratio, 0.25);
    assert_eq!(on.service_name, "caller-sidecar");
    assert_eq!(on.max_queued_spans, 100);

    // The standard variables stand in for what the file leaves out.
    let env = |name: &str| match name {
        "OTEL_EXPORTER_OTLP_ENDPOINT" => {
            Some("http://otel-collector.observability:4317".to_string())
        }
        "OTEL_SERVICE_NAME" => Some("planner-caller".to_string()),
        "PLANNER_HOST" => Some("10.0.0.9".to_string()),
        _ => None,
    };
    let from_env = Config::parse(Path::new("mesh.toml"), GOOD, &env)
        .unwrap()
        .telemetry;
    assert_eq!(
        from_env.otlp_endpoint.as_deref(),
        Some("http://otel-collector.observability:4317")
    );
    assert_eq!(from_env.service_name, "planner-caller");
    // The file wins over the environment.
    let both = Config::parse(Path::new("mesh.toml"), &file, &env)
        .unwrap()
        .telemetry;
    assert_eq!(both.otlp_endpoint.as_deref(), Some("http://collector:4317"));
    assert_eq!(both.service_name, "caller-sidecar");
}

#[test]
fn bad_telemetry_values_name_their_keys() {
    let with = |body: &str| format!("{GOOD}\n[telemetry]\n{body}\n");
    let e = first_error(&with("otlp_endpoint = \"collector:4317\""));
    assert!(
        e.contains("telemetry.otlp_endpoint") && e.contains("http://"),
        "{e}"
    );
    let e = first_error(&with("otlp_endpoint = \"https://collector:4317\""));
    assert!(
        e.contains("telemetry.otlp_endpoint") && e.contains("no TLS"),
        "{e}"
    );
    let e = first_error(&with(
        "otlp_endpoint = \"http://c:4317\"\nsample_ratio = 1.5",
    ));
    assert!(
        e.contains("telemetry.sample_ratio") && e.contains("between 0 and 1"),
        "{e}"
    );
    let e = first_error(&with("max_queued_spans = 0"));
    assert!(e.contains("telemetry.max_queued_spans"), "{e}");
    let e = first_error(&with("sample_rate = 0.5"));
    assert!(e.contains("sample_rate"), "{e}");
    let env = |name: &str| match name {
        "OTEL_EXPORTER_OTLP_ENDPOINT" => Some("nonsense".to_string()),
        "PLANNER_HOST" => Some("10.0.0.9".to_string()),
        _ => None,
    };
    let e = Config::parse(Path::new("mesh.toml"), GOOD, &env)
        .unwrap_err()
        .0[0]
        .to_string();
    assert!(e.contains("OTEL_EXPORTER_OTLP_ENDPOINT"), "{e}");
}

#[test]
fn transparent_mode_takes_a_listen_address_and_matches_by_address_or_name() {
    let on = GOOD.replace(
        "[listener]\n",
        "[listener]\ntransparent = \"127.0.0.1:15006\"\n",
    );
    let on = on.replace(
        "name = \"planner.agents\"\n",
        "name = \"planner.agents\"\nmatch = [\"10.96.0.15:50051\"]\n",
    );
    let c = parse(&on).unwrap();
    assert_eq!(
        c.listener.transparent,
        Some("127.0.0.1:15006".parse().unwrap())
    );
    assert_eq!(
        c.clusters[0].matches,
        vec!["10.96.0.15:50051".parse().unwrap()]
    );

    let named = parse(&on.replace("10.96.0.15:50051", "planner.agents:50051")).unwrap();
    assert_eq!(
        named.clusters[0].match_names,
        vec![("planner.agents".to_string(), 50051)]
    );
    let e = first_error(&on.replace("10.96.0.15:50051", "planner agents"));
    assert!(
        e.starts_with(
            "mesh.toml: cluster[0].match[0]: \"planner agents\" is not IP:port or name:port"
        ),
        "{e}"
    );
    let e = first_error(&on.replace("127.0.0.1:15006", "127.0.0.1:15001"));
    assert!(
        e.starts_with(
            "mesh.toml: listener.transparent: 127.0.0.1:15001 is already used by listener.proxy"
        ),
        "{e}"
    );
    let e = first_error(&on.replace("127.0.0.1:50051", "127.0.0.1:15006"));
    assert!(
        e.contains("is this sidecar's own listener.transparent"),
        "{e}"
    );
}

#[test]
fn kubernetes_discovery_names_its_service_and_port_and_every_mistake_by_key() {
    let base = "[[cluster]]\nname = \"planner\"\nkubernetes = { service = \"planner\", namespace = \"agents\", port = \"grpc\" }\n";
    let c = parse(base).unwrap();
    let k = c.clusters[0].kubernetes.clone().unwrap();
    assert_eq!(k.service, "planner");
    assert_eq!(k.namespace.as_deref(), Some("agents"));
    assert_eq!(
        k.port,
        crate::cluster::kubernetes::PortRef::Name("grpc".into())
    );
    assert!(c.clusters[0].endpoints.is_empty());
    let numbered = parse(&base.replace("\"grpc\"", "50051")).unwrap();
    assert_eq!(
        numbered.clusters[0].kubernetes.as_ref().unwrap().port,
        crate::cluster::kubernetes::PortRef::Number(50051)
    );
    for (from, to, error) in [
        (
            "service = \"planner\"",
            "service = \"Planner_1\"",
            "mesh.toml: cluster[0].kubernetes.service: \"Planner_1\" is not a Service name",
        ),
        (
            "namespace = \"agents\"",
            "namespace = \"\"",
            "mesh.toml: cluster[0].kubernetes.namespace: \"\" is not a namespace name",
        ),
        (
            "port = \"grpc\"",
            "port = 0",
            "mesh.toml: cluster[0].kubernetes.port: must be the Service port's name",
        ),
        (
            "port = \"grpc\"",
            "port = \"grpc\", zone = 1",
            "mesh.toml: cluster[0].kubernetes.zone: unknown field",
        ),
        (
            "name = \"planner\"\n",
            "name = \"planner\"\ndns = \"planner.test:1\"\n",
            "mesh.toml: cluster[0].kubernetes: a cluster takes its endpoints from one of",
        ),
    ] {
        let e = first_error(&base.replace(from, to));
        assert!(e.starts_with(error), "{to}: {e}");
    }
}
