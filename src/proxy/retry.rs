//! When a call is sent again, and what the caller gets when it is not.

use std::borrow::Cow;
use std::time::Duration;

use http::Response;

use super::error::ProxyError;
use super::response::ResponseBody;
use crate::balance::Tried;
use crate::cluster::Cluster;
use crate::config::RetryConfig;

/// Why the last attempt did not give the caller its answer.
pub(super) enum Failed {
    /// Nothing reached an endpoint yet.
    Nothing(Cow<'static, str>),
    /// An endpoint answered with a status the policy retries; kept to be
    /// passed on if no retry happens.
    Answered(Box<Response<ResponseBody>>),
    /// An endpoint took the call and failed before answering.
    Broke(Box<ProxyError>),
}

/// Whether the policy retries a call whose `answered`-th attempt ended with
/// `code` before any response message.
pub(super) fn wants_retry(policy: Option<&RetryConfig>, code: tonic::Code, answered: u32) -> bool {
    policy.is_some_and(|p| p.on.contains(&code) && answered < p.max_attempts.get())
}

/// Exponential backoff with full jitter: a random pause of up to
/// `backoff * 2^(n-1)`, capped at `max_backoff`.
pub(super) fn backoff(policy: &RetryConfig, retry: u32) -> Duration {
    let ceiling = policy
        .backoff
        .saturating_mul(1 << retry.saturating_sub(1).min(16))
        .min(policy.max_backoff);
    ceiling.mul_f64(fastrand::f64())
}

/// The answer when no attempt is left: the endpoint's own answer if one
/// came, else what the proxy saw. `tried` is the endpoints picked, of
/// which the call went to `sent_to` and passed the others over; `total` is
/// the ready endpoints the call could choose from; `full`, those it passed
/// over at their limit.
pub(super) fn give_up(
    failed: Failed,
    cluster: &Cluster,
    tried: &Tried,
    sent_to: usize,
    total: usize,
    full: usize,
) -> Result<Response<ResponseBody>, ProxyError> {
    match failed {
        Failed::Answered(response) => Ok(*response),
        Failed::Broke(error) => Err(*error),
        Failed::Nothing(_) if full > 0 && full == tried.len() => {
            let error = ProxyError::EndpointsFull {
                cluster: cluster.name().to_string(),
                max: cluster.config().max_in_flight_per_endpoint,
                full,
            };
            cluster.refused(&cluster.stats().endpoints_full, &error);
            Err(error)
        }
        Failed::Nothing(last) => Err(ProxyError::NoEndpointReachable {
            cluster: cluster.name().to_string(),
            tried: sent_to,
            passed_over: tried.len().saturating_sub(sent_to),
            total,
            last: last.into_owned(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use super::*;
    use crate::config::ClusterConfig;

    #[tokio::test]
    async fn endpoints_passed_over_are_not_said_to_be_tried() {
        let addrs: Vec<SocketAddr> = vec![
            "127.0.0.1:1".parse().unwrap(),
            "127.0.0.1:2".parse().unwrap(),
        ];
        let cluster = Cluster::new(&ClusterConfig::for_test("c", &addrs), None);
        let mut tried = Tried::default();
        tried.insert(1);
        let nothing_sent = give_up(
            Failed::Nothing("127.0.0.1:1 passed over: removed from the cluster".into()),
            &cluster,
            &tried,
            0,
            1,
            0,
        );
        assert_eq!(
            nothing_sent.err().expect("an error").to_string(),
            "cluster \"c\": no endpoint reachable (tried 0 of 1, 1 passed over; last: 127.0.0.1:1 passed over: removed from the cluster)"
        );
        tried.insert(2);
        let one_sent = give_up(
            Failed::Nothing("127.0.0.1:2: Connection refused".into()),
            &cluster,
            &tried,
            1,
            2,
            0,
        );
        assert_eq!(
            one_sent.err().expect("an error").to_string(),
            "cluster \"c\": no endpoint reachable (tried 1 of 2, 1 passed over; last: 127.0.0.1:2: Connection refused)"
        );
    }
}
