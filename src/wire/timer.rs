//! A timer that costs almost nothing to poll again.
//!
//! A connection's task polls its timers (keepalive, idle check) and a call
//! its deadline on every wake-up, which comes several times per call,
//! while the timers fire seldom or never. Polling a tokio [`Sleep`]
//! registers the waker anew each time; [`Timer`] remembers which task it
//! last registered and, while that task polls it again before it fires,
//! answers from one atomic load.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};

use tokio::time::{Duration, Instant, Sleep};

pin_project_lite::pin_project! {
    pub struct Timer {
        #[pin]
        sleep: Sleep,
        // The waker the sleep holds now, if any.
        registered: Option<Waker>,
    }
}

impl Timer {
    pub fn at(deadline: Instant) -> Timer {
        Timer {
            sleep: tokio::time::sleep_until(deadline),
            registered: None,
        }
    }

    pub fn after(duration: Duration) -> Timer {
        Timer::at(Instant::now() + duration)
    }

    /// Sets a new deadline; the timer fires again, at `deadline`.
    pub fn reset(self: Pin<&mut Self>, deadline: Instant) {
        let this = self.project();
        this.sleep.reset(deadline);
        *this.registered = None;
    }
}

impl Future for Timer {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.project();
        // The timer wakes the registered task when it fires, and that
        // shows in `is_elapsed` before the wake: until then, the same task
        // has nothing to learn from polling the sleep.
        if let Some(waker) = this.registered.as_ref() {
            if waker.will_wake(cx.waker()) && !this.sleep.is_elapsed() {
                return Poll::Pending;
            }
        }
        match this.sleep.poll(cx) {
            Poll::Ready(()) => {
                *this.registered = None;
                Poll::Ready(())
            }
            Poll::Pending => {
                match this.registered {
                    Some(waker) if waker.will_wake(cx.waker()) => {}
                    registered => *registered = Some(cx.waker().clone()),
                }
                Poll::Pending
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::task::Wake;

    struct Count(AtomicUsize);

    impl Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn fires_at_its_deadline_and_again_after_a_reset() {
        let started = Instant::now();
        let mut timer = std::pin::pin!(Timer::after(Duration::from_secs(3)));
        (&mut timer).await;
        assert_eq!(started.elapsed(), Duration::from_secs(3));
        timer
            .as_mut()
            .reset(Instant::now() + Duration::from_secs(2));
        (&mut timer).await;
        assert_eq!(started.elapsed(), Duration::from_secs(5));
    }

    #[tokio::test(start_paused = true)]
    async fn a_repoll_is_pending_and_the_timer_still_wakes_its_task() {
        let count = Arc::new(Count(AtomicUsize::new(0)));
        let waker = Waker::from(count.clone());
        let mut cx = Context::from_waker(&waker);
        let mut timer = std::pin::pin!(Timer::after(Duration::from_secs(1)));
        for _ in 0..3 {
            assert!(timer.as_mut().poll(&mut cx).is_pending());
        }
        tokio::time::sleep(Duration::from_millis(999)).await;
        assert!(timer.as_mut().poll(&mut cx).is_pending());
        assert_eq!(count.0.load(Ordering::SeqCst), 0, "woken early");
        tokio::time::sleep(Duration::from_millis(1)).await;
        assert_eq!(count.0.load(Ordering::SeqCst), 1, "the timer woke its task");
        assert!(timer.as_mut().poll(&mut cx).is_ready());
    }

    #[tokio::test(start_paused = true)]
    async fn another_task_polling_it_is_woken_instead() {
        let first = Arc::new(Count(AtomicUsize::new(0)));
        let second = Arc::new(Count(AtomicUsize::new(0)));
        let mut timer = std::pin::pin!(Timer::after(Duration::from_secs(1)));
        let w1 = Waker::from(first.clone());
        let w2 = Waker::from(second.clone());
        assert!(
            timer
                .as_mut()
                .poll(&mut Context::from_waker(&w1))
                .is_pending()
        );
        assert!(
            timer
                .as_mut()
                .poll(&mut Context::from_waker(&w2))
                .is_pending()
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(first.0.load(Ordering::SeqCst), 0);
        assert_eq!(second.0.load(Ordering::SeqCst), 1);
    }
}
