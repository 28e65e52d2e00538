//! The sinks: the Kafka producer (drafts and dead letters) and the PostgreSQL feedback writer.
//! Both retry transient failures until they succeed or the runner is told to stop hard, so the
//! pipeline can store input offsets only once both have taken a batch.

pub mod feedback;
pub mod kafka;

use std::time::Duration;

/// A sink gave up because the runner is stopping; the batch's offsets are not stored.
#[derive(Debug, thiserror::Error)]
#[error("sink write abandoned: the runner is stopping")]
pub struct Abandoned;

/// Exponential backoff from 50 ms up to `max`.
#[derive(Debug)]
pub(crate) struct Backoff {
    next: Duration,
    max: Duration,
    pub attempt: u32,
}

impl Backoff {
    pub fn new(max: Duration) -> Self {
        Backoff {
            next: Duration::from_millis(50),
            max,
            attempt: 0,
        }
    }

    pub fn step(&mut self) -> Duration {
        let d = self.next.min(self.max);
        self.next = (self.next * 2).min(self.max);
        self.attempt += 1;
        d
    }
}

/// Resolves once `stop` is true (holds no borrow of the channel across the await's end).
pub(crate) async fn stopped(stop: &mut tokio::sync::watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

/// Sleeps for `d` unless `stop` fires first; false when stopped.
pub(crate) async fn pause(d: Duration, stop: &mut tokio::sync::watch::Receiver<bool>) -> bool {
    if *stop.borrow() {
        return false;
    }
    tokio::select! {
        _ = tokio::time::sleep(d) => true,
        _ = stop.wait_for(|s| *s) => false,
    }
}
