//! What a call ended with, and which of those endings count as failures
//! for an endpoint's breaker.
//!
//! Some endings say nothing of the endpoint's health and are counted
//! neither for nor against it ([`Outcome::Excused`]): a deadline the caller
//! chose passed, the caller gave up or its request stream broke, or the
//! endpoint refused a request the caller malformed. Envoy's outlier
//! detection draws the same line: it counts the upstream timeouts it
//! imposed itself, not the caller's.

/// What a call ended with, as far as breaking is concerned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The endpoint answered with this status (OK included).
    Status(tonic::Code),
    /// The stream or connection broke before a status arrived.
    Reset,
    /// No connection could be made.
    Connect,
    /// The call ended with this status for a reason of the caller's own
    /// (see the module's doc): shown in the endpoint's figures, but fed to
    /// neither its breaker nor its load estimates.
    Excused(tonic::Code),
}

/// A set of outcomes, as `failures = ["connect", "reset", "UNAVAILABLE"]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FailureClasses(u32);

const CONNECT_BIT: u32 = 1 << 17;
const RESET_BIT: u32 = 1 << 18;

impl Default for FailureClasses {
    /// Connect errors, resets, UNAVAILABLE, DEADLINE_EXCEEDED and INTERNAL.
    fn default() -> Self {
        use tonic::Code::*;
        FailureClasses(
            CONNECT_BIT
                | RESET_BIT
                | 1 << Unavailable as u32
                | 1 << DeadlineExceeded as u32
                | 1 << Internal as u32,
        )
    }
}

impl FailureClasses {
    pub fn contains(self, outcome: Outcome) -> bool {
        let bit = match outcome {
            Outcome::Status(code) => 1 << (code as u32).min(16),
            Outcome::Reset => RESET_BIT,
            Outcome::Connect => CONNECT_BIT,
            Outcome::Excused(_) => return false,
        };
        self.0 & bit != 0
    }

    /// Parses `connect`, `reset` or a gRPC status name (`UNAVAILABLE`).
    pub(crate) fn parse(names: &[String]) -> Result<FailureClasses, String> {
        let mut bits = 0;
        for name in names {
            bits |= match name.as_str() {
                "connect" => CONNECT_BIT,
                "reset" => RESET_BIT,
                other => 1 << crate::wire::grpc::parse_code(other)? as u32,
            };
        }
        Ok(FailureClasses(bits))
    }
}
