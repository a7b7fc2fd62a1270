//! Small pieces of the gRPC wire protocol that the proxy reads or writes.

use std::time::Duration;

use http::{HeaderMap, HeaderName, HeaderValue, Response, header};
use tonic::Status;

// Names as values: a lookup by `&str` parses the name first.
static GRPC_TIMEOUT: HeaderName = HeaderName::from_static("grpc-timeout");
static GRPC_STATUS: HeaderName = HeaderName::from_static("grpc-status");
static GRPC_MESSAGE: HeaderName = HeaderName::from_static("grpc-message");

/// Reads the call's `grpc-timeout` header: 1 to 8 ASCII digits and a unit
/// (`H`, `M`, `S`, `m`, `u`, `n`), as the gRPC HTTP/2 protocol defines it.
/// A missing or malformed header means no deadline.
pub fn timeout(headers: &HeaderMap) -> Option<Duration> {
    parse_timeout(headers.get(&GRPC_TIMEOUT)?.as_bytes())
}

pub(crate) fn parse_timeout(value: &[u8]) -> Option<Duration> {
    let (&unit, digits) = value.split_last()?;
    if digits.is_empty() || digits.len() > 8 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let n = digits
        .iter()
        .fold(0u64, |n, d| n * 10 + u64::from(d - b'0'));
    Some(match unit {
        b'H' => Duration::from_secs(n * 3600),
        b'M' => Duration::from_secs(n * 60),
        b'S' => Duration::from_secs(n),
        b'm' => Duration::from_millis(n),
        b'u' => Duration::from_micros(n),
        b'n' => Duration::from_nanos(n),
        _ => return None,
    })
}

/// Tells the endpoint how much of the call's time is left, when connecting
/// has used up a noticeable part of the `original` timeout (the header is
/// left as the caller sent it otherwise).
///
/// Rounded up, never down: the endpoint starts counting after the proxy
/// did, so its deadline then cannot pass before the proxy's, and when the
/// deadline is the proxy's to answer for, the proxy notices it first.
pub fn set_remaining(headers: &mut HeaderMap, remaining: Duration, original: Option<Duration>) {
    let used = original.map_or(Duration::ZERO, |o| o.saturating_sub(remaining));
    if used < Duration::from_millis(1) {
        return;
    }
    // At most 8 digits: milliseconds cover 27 hours, seconds beyond.
    let value = match remaining.as_nanos().div_ceil(1_000_000) {
        ms if ms < 100_000_000 => format!("{}m", ms.max(1)),
        _ => format!(
            "{}S",
            remaining.as_nanos().div_ceil(1_000_000_000).min(99_999_999)
        ),
    };
    if let Ok(v) = HeaderValue::from_str(&value) {
        headers.insert(&GRPC_TIMEOUT, v);
    }
}

/// The `grpc-status` in `headers` (response headers of a trailers-only
/// answer, or trailers).
pub fn status_code(headers: &HeaderMap) -> Option<tonic::Code> {
    let value = headers.get(&GRPC_STATUS)?;
    Some(tonic::Code::from_bytes(value.as_bytes()))
}

/// The `grpc-message` in `headers`, as sent (percent-encoded).
pub fn message(headers: &HeaderMap) -> Option<&str> {
    headers.get(&GRPC_MESSAGE)?.to_str().ok()
}

/// The bytes before each message of a gRPC body: a compressed flag and a
/// 4-byte length.
pub const PREFIX_LEN: usize = 5;

/// The spec's status names, indexed by code number.
const CODE_NAMES: [&str; 17] = [
    "OK",
    "CANCELLED",
    "UNKNOWN",
    "INVALID_ARGUMENT",
    "DEADLINE_EXCEEDED",
    "NOT_FOUND",
    "ALREADY_EXISTS",
    "PERMISSION_DENIED",
    "RESOURCE_EXHAUSTED",
    "FAILED_PRECONDITION",
    "ABORTED",
    "OUT_OF_RANGE",
    "UNIMPLEMENTED",
    "INTERNAL",
    "UNAVAILABLE",
    "DATA_LOSS",
    "UNAUTHENTICATED",
];

/// A gRPC status code by its name, as in the gRPC spec (`UNAVAILABLE`).
pub fn parse_code(name: &str) -> Result<tonic::Code, String> {
    CODE_NAMES
        .iter()
        .position(|n| n.eq_ignore_ascii_case(name))
        .map(|i| tonic::Code::from_i32(i as i32))
        .ok_or_else(|| format!("{name:?} is not a gRPC status name (e.g. UNAVAILABLE)"))
}

/// The spec's name of a gRPC status code.
pub fn code_name(code: tonic::Code) -> &'static str {
    CODE_NAMES.get(code as usize).copied().unwrap_or("UNKNOWN")
}

/// Whether a call that ended with `code` counts against the endpoint (for
/// the latency penalty and the success rate): the endpoint was unavailable,
/// overloaded, broken or too slow. Answers such as NOT_FOUND or
/// INVALID_ARGUMENT are the caller's business and count as successes.
pub fn counts_as_failure(code: tonic::Code) -> bool {
    use tonic::Code::*;
    matches!(
        code,
        Unavailable | ResourceExhausted | Internal | DeadlineExceeded
    )
}

/// The status a caller gets when the endpoint's stream or connection broke,
/// as the gRPC HTTP/2 protocol maps HTTP/2 errors: a lost connection is
/// UNAVAILABLE (the call may not have run), RST_STREAM with REFUSED_STREAM
/// UNAVAILABLE, CANCEL CANCELLED, ENHANCE_YOUR_CALM RESOURCE_EXHAUSTED,
/// INADEQUATE_SECURITY PERMISSION_DENIED, any other code INTERNAL.
pub fn code_for_upstream_error(error: &h2::Error) -> tonic::Code {
    use tonic::Code;
    if error.is_io() || error.is_go_away() {
        return Code::Unavailable;
    }
    match error.reason() {
        Some(h2::Reason::REFUSED_STREAM) => Code::Unavailable,
        Some(h2::Reason::CANCEL) => Code::Cancelled,
        Some(h2::Reason::ENHANCE_YOUR_CALM) => Code::ResourceExhausted,
        Some(h2::Reason::INADEQUATE_SECURITY) => Code::PermissionDenied,
        Some(_) => Code::Internal,
        None => Code::Unavailable,
    }
}

/// `error` with its chain of causes (`connection error: Connection reset
/// by peer (os error 104)`), for messages that say what happened.
pub fn describe(error: &(dyn std::error::Error + 'static)) -> String {
    let mut out = error.to_string();
    let mut source = error.source();
    while let Some(e) = source {
        let text = e.to_string();
        if !out.ends_with(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = e.source();
    }
    out
}

/// Whether the endpoint certainly did not process a call that failed with
/// `error`: it refused the stream (REFUSED_STREAM), or its GOAWAY named a
/// last stream below this one. Such a call is safe to send elsewhere.
pub fn is_unprocessed(error: &h2::Error) -> bool {
    error.is_remote() && (error.is_go_away() || error.reason() == Some(h2::Reason::REFUSED_STREAM))
}

/// Whether an HTTP status sent without `grpc-status` is the endpoint's HTTP
/// layer refusing the request itself (400 Bad Request, 413 Content Too
/// Large, 431 Request Header Fields Too Large, ...): any 4xx but 408
/// Request Timeout and 429 Too Many Requests, which speak of the endpoint.
pub fn refuses_the_request(status: http::StatusCode) -> bool {
    status.is_client_error()
        && status != http::StatusCode::REQUEST_TIMEOUT
        && status != http::StatusCode::TOO_MANY_REQUESTS
}

/// The gRPC status a caller reads from an HTTP status sent without
/// `grpc-status`, as gRPC's HTTP mapping says.
pub fn code_for_http_status(status: http::StatusCode) -> tonic::Code {
    use tonic::Code;
    match status.as_u16() {
        400 => Code::Internal,
        401 => Code::Unauthenticated,
        403 => Code::PermissionDenied,
        404 => Code::Unimplemented,
        429 | 502 | 503 | 504 => Code::Unavailable,
        _ => Code::Unknown,
    }
}

/// Writes `status` into `headers` as `grpc-status` and a percent-encoded
/// `grpc-message`.
pub fn put_status(headers: &mut HeaderMap, status: &Status) {
    if status.add_header(headers).is_err() {
        // Percent-encoding makes every message a valid header value, so this
        // only guards against a future change in tonic.
        headers.insert(&GRPC_STATUS, HeaderValue::from(status.code() as i32));
    }
}

/// A trailers-only gRPC response: HTTP 200 whose headers carry the status.
pub fn status_response<B: Default>(status: &Status) -> Response<B> {
    let mut response = Response::new(B::default());
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/grpc"),
    );
    put_status(headers, status);
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_unit_and_refuses_malformed_values() {
        assert_eq!(parse_timeout(b"1H"), Some(Duration::from_secs(3600)));
        assert_eq!(parse_timeout(b"2M"), Some(Duration::from_secs(120)));
        assert_eq!(parse_timeout(b"3S"), Some(Duration::from_secs(3)));
        assert_eq!(parse_timeout(b"250m"), Some(Duration::from_millis(250)));
        assert_eq!(
            parse_timeout(b"99999999u"),
            Some(Duration::from_micros(99_999_999))
        );
        assert_eq!(parse_timeout(b"7n"), Some(Duration::from_nanos(7)));
        for bad in [
            &b""[..],
            b"m",
            b"123456789m",
            b"1x",
            b"-1S",
            b"1.5S",
            b" 1S",
        ] {
            assert_eq!(
                parse_timeout(bad),
                None,
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn remaining_time_is_written_only_once_time_was_used() {
        let mut h = HeaderMap::new();
        h.insert(&GRPC_TIMEOUT, HeaderValue::from_static("5S"));
        set_remaining(
            &mut h,
            Duration::from_micros(4_999_900),
            Some(Duration::from_secs(5)),
        );
        assert_eq!(h[&GRPC_TIMEOUT], "5S", "100us used: left alone");
        set_remaining(
            &mut h,
            Duration::from_millis(3_000),
            Some(Duration::from_secs(5)),
        );
        assert_eq!(h[&GRPC_TIMEOUT], "3000m");
        assert_eq!(timeout(&h), Some(Duration::from_secs(3)));
        set_remaining(
            &mut h,
            Duration::from_micros(199_100),
            Some(Duration::from_secs(5)),
        );
        assert_eq!(h[&GRPC_TIMEOUT], "200m", "rounded up, never down");
        set_remaining(&mut h, Duration::ZERO, Some(Duration::from_secs(5)));
        assert_eq!(h[&GRPC_TIMEOUT], "1m");
    }

    #[test]
    fn status_response_is_trailers_only_with_an_encoded_message() {
        let r: Response<()> = status_response(&Status::unavailable("cluster \"a\": 100% down"));
        assert_eq!(r.headers()["grpc-status"], "14");
        assert_eq!(r.headers()["content-type"], "application/grpc");
        assert!(
            r.headers()["grpc-message"]
                .to_str()
                .unwrap()
                .contains("100%25")
        );
        let back = Status::from_header_map(r.headers()).unwrap();
        assert_eq!(back.message(), "cluster \"a\": 100% down");
    }
}
