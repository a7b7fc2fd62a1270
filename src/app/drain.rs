//! Graceful shutdown: tell every listener and connection to stop, then wait
//! (up to a limit) for them to finish.
//!
//! Each task that must finish before the process exits holds a [`Watch`].
//! [`Drain::drain`] flips the signal and waits until every `Watch` is
//! dropped, which is the moment the last in-flight call has ended.

use std::time::Duration;

use tokio::sync::{mpsc, watch};

pub struct Drain {
    signal: watch::Sender<bool>,
    alive: Option<mpsc::Sender<()>>,
    done: mpsc::Receiver<()>,
}

#[derive(Clone)]
pub struct Watch {
    signal: watch::Receiver<bool>,
    _alive: mpsc::Sender<()>,
}

impl Default for Drain {
    fn default() -> Self {
        Self::new()
    }
}

impl Drain {
    pub fn new() -> Drain {
        let (signal, _) = watch::channel(false);
        let (alive, done) = mpsc::channel(1);
        Drain {
            signal,
            alive: Some(alive),
            done,
        }
    }

    pub fn watch(&self) -> Watch {
        Watch {
            signal: self.signal.subscribe(),
            _alive: self.alive.clone().expect("watch() after drain()"),
        }
    }

    /// Signals every watcher and waits for all of them to finish, for at
    /// most `timeout`. Returns whether everything finished in time.
    pub async fn drain(mut self, timeout: Duration) -> bool {
        self.signal.send_replace(true);
        self.alive = None;
        // recv() returns None once every Watch (and so every sender) is gone.
        tokio::time::timeout(timeout, self.done.recv())
            .await
            .is_ok()
    }
}

impl Watch {
    /// Resolves once draining has begun.
    pub async fn signaled(&mut self) {
        // An error means the Drain was dropped: treat it as the signal.
        let _ = self.signal.wait_for(|&draining| draining).await;
    }

    pub fn is_draining(&self) -> bool {
        *self.signal.borrow()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn waits_for_watchers_and_gives_up_at_the_timeout() {
        let drain = Drain::new();
        let mut quick = drain.watch();
        let stuck = drain.watch();
        tokio::spawn(async move {
            quick.signaled().await;
            drop(quick);
        });
        let started = tokio::time::Instant::now();
        assert!(
            !drain.drain(Duration::from_secs(5)).await,
            "a watcher never finished"
        );
        assert_eq!(started.elapsed(), Duration::from_secs(5));
        drop(stuck);

        let drain = Drain::new();
        let mut w = drain.watch();
        tokio::spawn(async move {
            w.signaled().await;
            tokio::time::sleep(Duration::from_secs(1)).await;
        });
        let started = tokio::time::Instant::now();
        assert!(drain.drain(Duration::from_secs(5)).await);
        assert_eq!(started.elapsed(), Duration::from_secs(1));
    }
}
