//! Waiting and retrying, aware of the runner's stop signal. Every loop that retries an outside
//! service (PostgreSQL, Kafka) waits through [`Backoff`]: exponential from 50 ms, capped, with
//! jitter (so that runners do not retry in lock step after an outage), and every wait ends
//! early when the runner is told to stop hard.

use backon::{BackoffBuilder, ExponentialBackoff, ExponentialBuilder};
use std::time::Duration;
use tokio::sync::watch;

/// A retried write gave up because the runner is stopping; nothing past it is committed.
#[derive(Debug, thiserror::Error)]
#[error("write abandoned: the runner is stopping")]
pub struct Abandoned;

/// The first pause between two attempts.
const FIRST_PAUSE: Duration = Duration::from_millis(50);

/// The pauses between the attempts of one retried operation.
#[derive(Debug)]
pub struct Backoff {
    pauses: ExponentialBackoff,
    max: Duration,
    /// Failed attempts so far.
    pub attempt: u32,
}

impl Backoff {
    /// Pauses from 50 ms, doubling up to `max`, each with jitter; never gives up by itself.
    pub fn new(max: Duration) -> Self {
        let max = max.max(FIRST_PAUSE);
        Backoff {
            // The jitter adds up to the base pause again: a base capped at half of `max`
            // keeps every pause within it, spread over [max / 2, max] once capped.
            pauses: ExponentialBuilder::default()
                .with_min_delay(FIRST_PAUSE)
                .with_max_delay((max / 2).max(FIRST_PAUSE))
                .with_jitter()
                .without_max_times()
                .build(),
            max,
            attempt: 0,
        }
    }

    /// The pause after one more failed attempt.
    pub fn step(&mut self) -> Duration {
        self.attempt += 1;
        self.pauses.next().unwrap_or(self.max).min(self.max)
    }

    /// Counts a failed attempt and waits the next pause; `report` is told the attempt and the
    /// pause first. Err when `stop` fires meanwhile.
    pub async fn wait(
        &mut self,
        stop: &mut watch::Receiver<bool>,
        report: impl FnOnce(u32, Duration),
    ) -> Result<(), Abandoned> {
        let pause = self.step();
        report(self.attempt, pause);
        if sleep(pause, stop).await {
            Ok(())
        } else {
            Err(Abandoned)
        }
    }
}

/// Resolves once `stop` is true (holds no borrow of the channel across the await's end).
pub async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

/// Sleeps for `d` unless `stop` fires first; false when stopped.
pub async fn sleep(d: Duration, stop: &mut watch::Receiver<bool>) -> bool {
    if *stop.borrow() {
        return false;
    }
    tokio::select! {
        _ = tokio::time::sleep(d) => true,
        _ = stop.wait_for(|s| *s) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pauses_grow_and_stay_under_the_cap() {
        let mut b = Backoff::new(Duration::from_millis(400));
        let pauses: Vec<Duration> = (0..12).map(|_| b.step()).collect();
        assert_eq!(b.attempt, 12);
        assert!(pauses.iter().all(|p| *p <= Duration::from_millis(400)));
        assert!(pauses[0] >= FIRST_PAUSE, "{pauses:?}");
        assert!(
            pauses[8..].iter().all(|p| *p >= Duration::from_millis(200)),
            "capped pauses stay near the cap: {pauses:?}"
        );
    }

    #[test]
    fn two_retries_do_not_wait_in_lock_step() {
        let run = || {
            let mut b = Backoff::new(Duration::from_secs(60));
            (0..6).map(|_| b.step()).collect::<Vec<_>>()
        };
        let (a, b) = (run(), run());
        assert_ne!(a, b, "jitter makes two runners' pauses differ");
    }

    #[tokio::test]
    async fn a_stop_ends_the_wait() {
        let (tx, mut rx) = watch::channel(false);
        let mut b = Backoff::new(Duration::from_secs(3600));
        for _ in 0..20 {
            b.step();
        }
        tx.send(true).unwrap();
        let mut reported = None;
        let r = b.wait(&mut rx, |a, _| reported = Some(a)).await;
        assert!(r.is_err());
        assert_eq!(reported, Some(21));
    }
}
