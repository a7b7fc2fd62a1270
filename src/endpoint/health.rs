//! Active health checks: every `interval`, each endpoint of a cluster with
//! `[cluster.health_check]` is sent `grpc.health.v1.Health/Check` (the
//! standard gRPC health protocol) over a connection of the checker's own,
//! apart from the one that carries calls. An answer of
//! SERVING within `timeout` passes; anything else (NOT_SERVING, an error
//! status, a timeout, a failed connect) fails. `unhealthy_threshold`
//! failures in a row take the endpoint out; `healthy_threshold` passes in
//! a row bring it back, as in Envoy's health checker.
//!
//! Endpoints start healthy, so that a sidecar serves at once; passive
//! signals (the circuit breaker, connect failures) cover the time before
//! the first checks. Coming back healthy also closes the endpoint's
//! breaker and forgets its connect failures (Envoy's
//! `successful_active_health_check_uneject_host`).
//!
//! A check that times out drops its connection, and the next one dials
//! anew, as Envoy's checker does. Checks left unanswered on one connection
//! would each leave a reset stream behind, and an endpoint that wakes from
//! a hang to a backlog of those may close the whole connection (the HTTP/2
//! guard against reset floods). On the calls' connection that would fail
//! the calls in flight; on the checker's own it costs one check at most.
//!
//! [`Verdicts`] is the plain state machine; [`run`] is the task that feeds
//! it, one per endpoint, under the sidecar's supervision.

use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use http::{HeaderValue, Request};
use http_body_util::{BodyExt, LengthLimitError, Limited};
use prost::Message;
use tokio::sync::Notify;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::{HealthCheckRequest, HealthCheckResponse};

use crate::config::HealthCheckConfig;
use crate::endpoint::{Connection, Endpoint};
use crate::wire::stream::Received;

/// Consecutive passes and failures, and the verdict they add up to.
#[derive(Debug)]
pub struct Verdicts {
    healthy: bool,
    passes: u32,
    failures: u32,
}

impl Default for Verdicts {
    fn default() -> Self {
        Verdicts {
            healthy: true,
            passes: 0,
            failures: 0,
        }
    }
}

impl Verdicts {
    pub fn is_healthy(&self) -> bool {
        self.healthy
    }

    /// Records one check; returns the new verdict when it changes.
    pub fn record(&mut self, passed: bool, config: &HealthCheckConfig) -> Option<bool> {
        if passed {
            self.passes += 1;
            self.failures = 0;
            if !self.healthy && self.passes >= config.healthy_threshold.get() {
                self.healthy = true;
                return Some(true);
            }
        } else {
            self.failures += 1;
            self.passes = 0;
            if self.healthy && self.failures >= config.unhealthy_threshold.get() {
                self.healthy = false;
                return Some(false);
            }
        }
        None
    }
}

/// The checker's own connection, shut when the checker stops, so that a
/// removed endpoint keeps no connection of its checker.
struct Own(Connection);

impl Drop for Own {
    fn drop(&mut self) {
        self.0.shut_down();
    }
}

/// Checks `endpoint` every `config.interval`, for as long as the task runs
/// (its owner, the endpoint's place in the cluster, aborts it).
pub async fn run(endpoint: Arc<Endpoint>, config: HealthCheckConfig) {
    let own = Own(Connection::new(
        endpoint.address().into(),
        endpoint.connection().timeouts(),
        endpoint.connection().tls().cloned(),
        Arc::new(Notify::new()),
    ));
    let connection = &own.0;
    let mut verdicts = Verdicts::default();
    let mut last_failure = String::new();
    tokio::time::sleep(first_delay(config.interval)).await;
    loop {
        let result = check(connection, &config).await;
        let passed = result.is_ok();
        endpoint.health_checked(passed);
        if let Err(reason) = result {
            tracing::debug!(endpoint = endpoint.address(), %reason, "health check failed");
            last_failure = reason;
        }
        match verdicts.record(passed, &config) {
            Some(true) => endpoint.set_healthy(
                true,
                &format!("{} health checks passed", config.healthy_threshold),
            ),
            Some(false) => endpoint.set_healthy(
                false,
                &format!(
                    "{} health checks failed; last: {last_failure}",
                    config.unhealthy_threshold
                ),
            ),
            None => {}
        }
        tokio::time::sleep(config.interval).await;
    }
}

/// A health answer is a few bytes; one larger than this is not one.
const MAX_ANSWER: usize = 64 * 1024;

/// One `grpc.health.v1.Health/Check` over `connection`; `Err` says why it
/// did not pass.
pub async fn check(connection: &Connection, config: &HealthCheckConfig) -> Result<(), String> {
    match tokio::time::timeout(config.timeout, check_once(connection, config)).await {
        Ok(result) => result,
        Err(_) => {
            connection.close();
            Err(format!("no answer within {:?}", config.timeout))
        }
    }
}

async fn check_once(connection: &Connection, config: &HealthCheckConfig) -> Result<(), String> {
    let mut sender = connection.get().await.map_err(|e| e.reason.to_string())?;
    let message = HealthCheckRequest {
        service: config.service.clone(),
    }
    .encode_to_vec();
    let mut framed = BytesMut::with_capacity(5 + message.len());
    framed.extend_from_slice(&[0]);
    framed.extend_from_slice(&(message.len() as u32).to_be_bytes());
    framed.extend_from_slice(&message);
    let timeout_ms = config.timeout.as_millis().clamp(1, 99_999_999);
    let request = Request::post(format!(
        "http://{}/grpc.health.v1.Health/Check",
        connection.address()
    ))
    .header("content-type", "application/grpc")
    .header("te", "trailers")
    .header("user-agent", "agentmesh-health")
    .header(
        "grpc-timeout",
        HeaderValue::from_str(&format!("{timeout_ms}m")).map_err(|e| e.to_string())?,
    )
    .body(())
    .map_err(|e| e.to_string())?;
    let (response, mut stream) = sender
        .send_request(request, false)
        .map_err(|e| format!("the check could not be sent: {e}"))?;
    stream
        .send_data(framed.freeze(), true)
        .map_err(|e| format!("the check could not be sent: {e}"))?;
    let response = response
        .await
        .map_err(|e| format!("the check failed: {e}"))?;
    if !response.status().is_success() {
        return Err(format!("HTTP status {}", response.status()));
    }
    if let Some(status) = tonic::Status::from_header_map(response.headers()) {
        if status.code() != tonic::Code::Ok {
            return Err(describe(&status));
        }
    }
    let collected = Limited::new(Received::new(response.into_body()), MAX_ANSWER)
        .collect()
        .await
        .map_err(|e| {
            if e.is::<LengthLimitError>() {
                format!("the answer is over {MAX_ANSWER} bytes")
            } else {
                format!("the answer broke off: {e}")
            }
        })?;
    if let Some(status) = collected
        .trailers()
        .and_then(tonic::Status::from_header_map)
    {
        if status.code() != tonic::Code::Ok {
            return Err(describe(&status));
        }
    }
    let serving = decode(collected.to_bytes())?;
    match serving {
        ServingStatus::Serving => Ok(()),
        other => Err(format!("the endpoint says {}", other.as_str_name())),
    }
}

fn describe(status: &tonic::Status) -> String {
    format!(
        "answered {}: {}",
        crate::wire::grpc::code_name(status.code()),
        status.message()
    )
}

/// The serving status in a gRPC-framed `HealthCheckResponse`.
fn decode(mut body: Bytes) -> Result<ServingStatus, String> {
    if body.len() < 5 {
        return Err("the answer had no message".into());
    }
    if body.get_u8() != 0 {
        return Err("the answer was compressed, which the checker does not ask for".into());
    }
    let len = body.get_u32() as usize;
    if body.len() < len {
        return Err("the answer's message was cut short".into());
    }
    let response = HealthCheckResponse::decode(body.slice(..len))
        .map_err(|e| format!("the answer is not a HealthCheckResponse: {e}"))?;
    Ok(ServingStatus::try_from(response.status).unwrap_or(ServingStatus::Unknown))
}

/// How long to wait for the first check of a freshly started task: the
/// checks of a cluster's endpoints are spread out instead of all at once.
pub fn first_delay(interval: Duration) -> Duration {
    interval.mul_f64(fastrand::f64() * 0.1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::num::NonZeroU32;

    fn config() -> HealthCheckConfig {
        HealthCheckConfig {
            unhealthy_threshold: NonZeroU32::new(3).unwrap(),
            healthy_threshold: NonZeroU32::new(2).unwrap(),
            ..HealthCheckConfig::default()
        }
    }

    #[test]
    fn thresholds_turn_the_verdict_both_ways() {
        let c = config();
        let mut v = Verdicts::default();
        assert!(v.is_healthy(), "endpoints start healthy");
        assert_eq!(v.record(false, &c), None);
        assert_eq!(v.record(false, &c), None);
        // A pass in between starts the count of failures again.
        assert_eq!(v.record(true, &c), None);
        assert_eq!(v.record(false, &c), None);
        assert_eq!(v.record(false, &c), None);
        assert_eq!(v.record(false, &c), Some(false), "third failure in a row");
        assert_eq!(v.record(false, &c), None, "told once");
        assert_eq!(v.record(true, &c), None);
        assert_eq!(v.record(false, &c), None);
        assert_eq!(v.record(true, &c), None);
        assert_eq!(v.record(true, &c), Some(true), "second pass in a row");
        assert!(v.is_healthy());
    }

    #[tokio::test(start_paused = true)]
    async fn the_checker_marks_an_endpoint_unhealthy_after_three_intervals_of_failures() {
        use crate::config::ClusterConfig;
        use crate::endpoint::EjectionBudget;
        use std::time::Duration;
        // Nothing listens there: every check fails at once.
        let closed = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let cluster = ClusterConfig::for_test("c", &[closed]);
        let endpoint = Arc::new(Endpoint::new(
            &cluster.endpoints[0],
            &cluster,
            Arc::new(tokio::sync::Notify::new()),
            Arc::new(EjectionBudget::new(1, 0.5)),
            None,
        ));
        let task = tokio::spawn(run(endpoint.clone(), config()));
        // Checks at about 0 s, 30 s and 60 s (plus up to 3 s of spread).
        tokio::time::sleep(Duration::from_secs(45)).await;
        assert!(endpoint.is_healthy(), "two failures are not three");
        tokio::time::sleep(Duration::from_secs(20)).await;
        assert!(!endpoint.is_healthy(), "three failures in a row");
        assert_eq!(endpoint.stats().marked_unhealthy, 1);
        task.abort();
    }

    #[test]
    fn decodes_serving_and_refuses_garbage() {
        let encode = |status: ServingStatus| {
            let m = HealthCheckResponse {
                status: status as i32,
            }
            .encode_to_vec();
            let mut b = vec![0];
            b.extend_from_slice(&(m.len() as u32).to_be_bytes());
            b.extend_from_slice(&m);
            Bytes::from(b)
        };
        assert_eq!(
            decode(encode(ServingStatus::Serving)),
            Ok(ServingStatus::Serving)
        );
        assert_eq!(
            decode(encode(ServingStatus::NotServing)),
            Ok(ServingStatus::NotServing)
        );
        assert!(decode(Bytes::from_static(b"\0\0\0")).is_err());
        assert!(decode(Bytes::from_static(b"\0\0\0\0\x09\x08")).is_err());
    }
}
