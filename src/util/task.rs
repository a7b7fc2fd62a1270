//! Background tasks with an owner.
//!
//! A [`Task`] is the handle of a spawned task, held by whatever the task
//! serves (a listener by the sidecar, a health checker by its endpoint's
//! place in the cluster); dropping the handle aborts the task, so nothing
//! outlives what it served. [`Task::supervised`] also restarts a task that
//! panics, after logging it: a background task is never silently gone.

use std::time::Duration;

use tokio::task::JoinHandle;

/// How long a supervised task waits before it is started again after a
/// panic, so that a task that panics at once does not spin.
const RESTART_AFTER: Duration = Duration::from_millis(100);

/// A spawned task, aborted when this handle is dropped.
#[derive(Debug)]
pub struct Task {
    /// Taken only by [`Task::stop`].
    handle: Option<JoinHandle<()>>,
}

impl Task {
    /// Spawns `future` as a task owned by the returned handle.
    pub fn spawn(future: impl Future<Output = ()> + Send + 'static) -> Task {
        Task {
            handle: Some(tokio::spawn(future)),
        }
    }

    /// Runs the future that `make` returns; when it panics, logs the panic
    /// and runs a new one. Ends when a run returns.
    pub fn supervised<F, Fut>(name: &'static str, make: F) -> Task
    where
        F: Fn() -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        Task::spawn(async move {
            loop {
                // Aborting the supervisor drops this guard, which aborts the
                // run it is waiting on.
                let mut run = Task::spawn(make());
                let Some(handle) = run.handle.as_mut() else {
                    return;
                };
                match handle.await {
                    Ok(()) => return,
                    Err(e) if e.is_panic() => {
                        tracing::error!(task = name, "background task panicked; restarting it");
                        tokio::time::sleep(RESTART_AFTER).await;
                    }
                    Err(_) => return,
                }
            }
        })
    }

    /// Whether the task has ended.
    pub fn is_finished(&self) -> bool {
        self.handle.as_ref().is_none_or(JoinHandle::is_finished)
    }

    /// Waits until the task ends by itself.
    pub async fn finished(mut self) {
        if let Some(handle) = self.handle.take() {
            let _ = handle.await;
        }
    }

    /// Aborts the task and waits until it is gone.
    pub async fn stop(mut self) {
        if let Some(handle) = self.handle.take() {
            handle.abort();
            let _ = handle.await;
        }
    }
}

impl Drop for Task {
    fn drop(&mut self) {
        if let Some(handle) = &self.handle {
            handle.abort();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[tokio::test(start_paused = true)]
    async fn a_supervised_task_that_panics_is_started_again() {
        let runs = Arc::new(AtomicUsize::new(0));
        let counted = runs.clone();
        let task = Task::supervised("test", move || {
            let runs = counted.clone();
            async move {
                if runs.fetch_add(1, Ordering::SeqCst) < 2 {
                    panic!("a bad input");
                }
            }
        });
        tokio::time::timeout(Duration::from_secs(5), async {
            while !task.is_finished() {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await
        .expect("the third run returns, and the supervisor with it");
        assert_eq!(runs.load(Ordering::SeqCst), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn dropping_the_handle_stops_the_supervisor_and_its_run() {
        struct Alive(Arc<AtomicUsize>);
        impl Drop for Alive {
            fn drop(&mut self) {
                self.0.fetch_sub(1, Ordering::SeqCst);
            }
        }
        let alive = Arc::new(AtomicUsize::new(0));
        let counted = alive.clone();
        let task = Task::supervised("test", move || {
            let alive = counted.clone();
            async move {
                alive.fetch_add(1, Ordering::SeqCst);
                let _guard = Alive(alive);
                std::future::pending::<()>().await;
            }
        });
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert_eq!(alive.load(Ordering::SeqCst), 1, "the run started");
        drop(task);
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert_eq!(alive.load(Ordering::SeqCst), 0, "the run was dropped too");
    }
}
