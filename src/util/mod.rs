//! Small mechanisms that several modules share, written once: a
//! poison-tolerant lock, a clock that fits an atomic, and a sliding window
//! of buckets.

pub mod clock;
pub mod hash;
pub mod sync;
pub mod task;
pub mod window;

pub use clock::Clock;
pub use sync::lock;
pub use task::Task;
pub use window::Window;
