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
    Broke(ProxyError),
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
/// came, else what the proxy saw. `total` is the ready endpoints the call
/// could choose from; `full`, those it passed over at their limit.
pub(super) fn give_up(
    failed: Failed,
    cluster: &Cluster,
    tried: &Tried,
    total: usize,
    full: usize,
) -> Result<Response<ResponseBody>, ProxyError> {
    match failed {
        Failed::Answered(response) => Ok(*response),
        Failed::Broke(error) => Err(error),
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
            tried: tried.len(),
            total,
            last: last.into_owned(),
        }),
    }
}
