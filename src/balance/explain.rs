//! Why a call went where it went: filled in by the pickers only for a call
//! that carries an [`Explanation`] (a sampled call), and read into its
//! span. A call without one pays a branch per candidate.

use std::cell::RefCell;
use std::sync::Arc;

use crate::endpoint::Endpoint;

/// What the picker compared and what decided.
#[derive(Default)]
pub struct Explanation {
    /// `pinned` (the session's endpoint), `new pin` (placed by its hash
    /// now), or none for a call without a session key.
    pub affinity: Option<&'static str>,
    /// The group the call was placed in, when the ready set is split (by
    /// version, priority or zone): its index and size of how many.
    pub group: Option<(usize, usize, usize)>,
    /// The candidates compared, each with its cost (lower wins).
    pub candidates: Vec<(Arc<Endpoint>, f64)>,
}

/// A call's explanation, if it asks for one.
pub type Explain<'a> = Option<&'a RefCell<Explanation>>;

/// Notes a candidate and its cost.
#[inline]
pub fn candidate(explain: Explain<'_>, endpoint: &Arc<Endpoint>, cost: f64) {
    if let Some(x) = explain {
        x.borrow_mut().candidates.push((endpoint.clone(), cost));
    }
}
