//! Small mechanisms that several modules share, written once: a
//! poison-tolerant lock, a clock that fits an atomic, a sliding window
//! of buckets; and a throttle for the log lines that callers can cause.

pub mod clock;
pub mod hash;
pub mod sync;
pub mod task;
pub mod throttle;
pub mod window;

pub use clock::Clock;
pub use sync::lock;
pub use task::Task;
pub use throttle::Throttle;
pub use window::Window;
