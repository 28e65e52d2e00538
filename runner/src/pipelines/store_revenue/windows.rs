//! Event-time windows, without I/O: which window a sale belongs to, each input partition's
//! watermark, what is late, and the sums a partition has gathered since its last commit.
//!
//! The rules (README, "Store revenue"):
//! - windows are tumbling, `[start, start + size)`, aligned on the Unix epoch;
//! - a partition's watermark is the greatest event time it has carried minus the allowed
//!   lateness; it never goes back. It is tracked per input partition, so a lagging or
//!   replayed partition never makes another partition's sales late;
//! - a sale is late when its window ends at or before its partition's watermark: it is
//!   dead-lettered with reason `late`, never added;
//! - a partition that has reached the end of its log and received nothing for `idle_after` is
//!   idle: its watermark becomes at least processing time minus the allowed lateness;
//! - a window is final when every partition's watermark has reached its end (decided in
//!   PostgreSQL, over the partitions of every runner: `state.rs`).

use std::collections::HashMap;

/// Window size and allowed lateness, whole seconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WindowSpec {
    pub size: i64,
    pub lateness: i64,
}

impl WindowSpec {
    /// The start of the window holding event time `ts`.
    pub fn start_of(&self, ts: i64) -> i64 {
        ts.div_euclid(self.size) * self.size
    }
}

/// One input partition's event-time progress.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PartitionTime {
    /// The greatest event time the partition has carried (unix seconds).
    pub max_event_time: Option<i64>,
    /// Windows ending at or before this are closed for the partition (unix seconds).
    pub watermark: Option<i64>,
}

impl PartitionTime {
    /// Whether a sale in the window ending at `window_end` comes too late for this partition.
    pub fn is_late(&self, window_end: i64) -> bool {
        self.watermark.is_some_and(|w| window_end <= w)
    }

    /// A sale with event time `ts` was counted.
    pub fn observe(&mut self, ts: i64, spec: &WindowSpec) {
        let max = self.max_event_time.map_or(ts, |m| m.max(ts));
        self.max_event_time = Some(max);
        self.raise(max - spec.lateness);
    }

    /// The partition is idle at processing time `now`: its watermark follows it. Returns
    /// whether the watermark moved.
    pub fn idle(&mut self, now: i64, spec: &WindowSpec) -> bool {
        self.raise(now - spec.lateness)
    }

    fn raise(&mut self, w: i64) -> bool {
        if self.watermark.is_none_or(|old| w > old) {
            self.watermark = Some(w);
            true
        } else {
            false
        }
    }
}

/// A window of one store.
pub type WindowKey = (String, i64);

/// What a partition adds to a window.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Delta {
    /// Revenue in minor currency units.
    pub amount_minor: i64,
    pub events: i64,
}

/// A sale that came too late, with the window it belonged to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Late {
    pub window_start: i64,
    pub window_end: i64,
    pub watermark: i64,
}

/// What became of one sale.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Counted {
    Added,
    Late(Late),
    /// The window's sum would not fit 64 bits.
    Overflow,
}

/// The sums a partition has gathered since its state was last committed.
#[derive(Debug, Default)]
pub struct Pending {
    pub deltas: HashMap<WindowKey, Delta>,
}

impl Pending {
    /// Counts a sale against the partition's watermark (which it then moves).
    pub fn add(
        &mut self,
        time: &mut PartitionTime,
        spec: &WindowSpec,
        store: String,
        amount_minor: i64,
        ts: i64,
    ) -> Counted {
        let start = spec.start_of(ts);
        let end = start + spec.size;
        if time.is_late(end) {
            return Counted::Late(Late {
                window_start: start,
                window_end: end,
                watermark: time.watermark.unwrap_or(i64::MIN),
            });
        }
        let d = self.deltas.entry((store, start)).or_default();
        let Some(sum) = d.amount_minor.checked_add(amount_minor) else {
            return Counted::Overflow;
        };
        d.amount_minor = sum;
        d.events += 1;
        time.observe(ts, spec);
        Counted::Added
    }

    pub fn is_empty(&self) -> bool {
        self.deltas.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SPEC: WindowSpec = WindowSpec {
        size: 30,
        lateness: 30,
    };

    #[test]
    fn windows_are_aligned_and_half_open() {
        assert_eq!(SPEC.start_of(1_000_000_020), 1_000_000_020);
        assert_eq!(SPEC.start_of(1_000_000_049), 1_000_000_020);
        assert_eq!(SPEC.start_of(1_000_000_050), 1_000_000_050);
        assert_eq!(SPEC.start_of(-1), -30);
    }

    #[test]
    fn a_hand_computed_example_with_disorder_within_lateness() {
        // Windows of 30 s from t0; lateness 30 s.
        let t0 = 1_764_255_600; // a multiple of 30
        let mut time = PartitionTime::default();
        let mut p = Pending::default();
        let sales = [
            ("s1", 10, t0),      // first second of w0
            ("s1", 20, t0 + 29), // last second of w0
            ("s2", 5, t0 + 31),  // w1
            ("s1", 7, t0 + 65),  // w2: watermark t0 + 35
            ("s1", 1, t0 + 10),  // w0 ends t0 + 30 <= t0 + 35: late
            ("s2", 2, t0 + 40),  // w1 ends t0 + 60 > t0 + 35: on time though out of order
        ];
        let outcomes: Vec<_> = sales
            .iter()
            .map(|(s, a, ts)| p.add(&mut time, &SPEC, s.to_string(), *a, *ts))
            .collect();
        assert_eq!(outcomes[..4], [Counted::Added; 4]);
        assert_eq!(
            outcomes[4],
            Counted::Late(Late {
                window_start: t0,
                window_end: t0 + 30,
                watermark: t0 + 35
            })
        );
        assert_eq!(outcomes[5], Counted::Added);
        let get = |s: &str, w: i64| p.deltas.get(&(s.to_string(), w)).copied();
        assert_eq!(
            get("s1", t0),
            Some(Delta {
                amount_minor: 30,
                events: 2
            })
        );
        assert_eq!(
            get("s2", t0 + 30),
            Some(Delta {
                amount_minor: 7,
                events: 2
            })
        );
        assert_eq!(
            get("s1", t0 + 60),
            Some(Delta {
                amount_minor: 7,
                events: 1
            })
        );
        assert_eq!(time.max_event_time, Some(t0 + 65));
        assert_eq!(time.watermark, Some(t0 + 35));
    }

    #[test]
    fn the_watermark_never_goes_back() {
        let mut time = PartitionTime::default();
        time.observe(100, &SPEC);
        time.observe(50, &SPEC);
        assert_eq!(time.watermark, Some(70));
        assert!(!time.idle(90, &SPEC), "processing time behind event time");
        assert!(time.idle(200, &SPEC));
        assert_eq!(time.watermark, Some(170));
        assert_eq!(time.max_event_time, Some(100));
    }

    #[test]
    fn a_window_ending_exactly_at_the_watermark_is_closed() {
        let mut time = PartitionTime::default();
        time.observe(90, &SPEC); // watermark 60
        assert!(time.is_late(60));
        assert!(!time.is_late(61));
    }

    #[test]
    fn sums_that_do_not_fit_are_refused_not_wrapped() {
        let mut time = PartitionTime::default();
        let mut p = Pending::default();
        assert_eq!(
            p.add(&mut time, &SPEC, "s".into(), i64::MAX, 0),
            Counted::Added
        );
        assert_eq!(p.add(&mut time, &SPEC, "s".into(), 1, 1), Counted::Overflow);
        assert_eq!(p.deltas[&("s".to_string(), 0)].events, 1);
    }
}
