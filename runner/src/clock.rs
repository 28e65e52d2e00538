//! Processing time as the rules are told it ("now"): the system clock in production, a fixed
//! one in tests and the demo.

use std::time::{SystemTime, UNIX_EPOCH};

/// The time the rules are asked about, in unix seconds.
pub trait Clock: Send + Sync + std::fmt::Debug + 'static {
    fn now(&self) -> i64;
}

#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> i64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or(0)
    }
}
