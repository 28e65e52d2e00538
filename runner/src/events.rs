//! What the runner reports: each event is one method that both logs a sentence with structured
//! fields and counts, so logs and counters cannot disagree. [`Stats`] is the counted view.

use serde::Serialize;
use std::collections::BTreeMap;
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;

/// Where an input message came from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SourcePos {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
}

impl fmt::Display for SourcePos {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}@{}", self.topic, self.partition, self.offset)
    }
}

/// Why a valid message produced nothing (counted, logged, not dead-lettered).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SkipReason {
    /// The campaign starts later than now.
    NotStarted,
    /// The campaign ended.
    Expired,
    /// The restaurant has no subscribers.
    NoSubscribers,
}

impl SkipReason {
    pub fn as_str(self) -> &'static str {
        match self {
            SkipReason::NotStarted => "not_started",
            SkipReason::Expired => "expired",
            SkipReason::NoSubscribers => "no_subscribers",
        }
    }
}

#[derive(Debug, Default)]
pub struct Events {
    received: AtomicU64,
    campaigns_delivered: AtomicU64,
    drafts_delivered: AtomicU64,
    offsets_stored: AtomicU64,
    batches: AtomicU64,
    sink_retries: AtomicU64,
    cache_resyncs: AtomicU64,
    partitions_fenced: AtomicU64,
    skipped: Mutex<BTreeMap<&'static str, u64>>,
    dead_lettered: Mutex<BTreeMap<String, u64>>,
    pub(crate) cache_stale: AtomicBool,
    kafka_failing: AtomicBool,
    postgres_failing: AtomicBool,
    pub(crate) kafka_unreachable: AtomicBool,
    rules: Mutex<RulesStatus>,
    /// Latest end-to-end latencies (µs): message timestamp to both sinks committed.
    latencies: Mutex<std::collections::VecDeque<u64>>,
    /// Latest durations (µs) of each stage a unit goes through, by stage name.
    stages: Mutex<BTreeMap<&'static str, std::collections::VecDeque<u64>>>,
}

/// How many samples of each stage's duration are kept (the most recent).
const STAGE_SAMPLES: usize = 10_000;

/// The stages of a unit, in order, timed for /status and the benchmarks: `fetch` and `queued`
/// from the message's Kafka timestamp (broker, fetch, batching, waiting for earlier units),
/// then evaluation, the PostgreSQL transaction, the Kafka transaction, and the
/// outbox cleanup.
pub mod stage {
    /// From the message's Kafka timestamp to the consumer handing it to the pipeline.
    pub const FETCH: &str = "fetch";
    /// From the message's Kafka timestamp to its evaluation starting (fetch included).
    pub const QUEUED: &str = "queued";
    pub const EVALUATE: &str = "evaluate";
    pub const POSTGRES: &str = "postgres";
    /// From a unit's PostgreSQL commit to its Kafka transaction starting (waiting for the
    /// Kafka stage to finish the units before it).
    pub const KAFKA_QUEUED: &str = "kafka_queued";
    pub const KAFKA: &str = "kafka";
    /// The steps of a committed Kafka transaction: producing its records until acknowledged,
    /// adding the group's offsets, committing.
    pub const KAFKA_PRODUCE: &str = "kafka_produce";
    pub const KAFKA_OFFSETS: &str = "kafka_offsets";
    pub const KAFKA_COMMIT: &str = "kafka_commit";
    pub const OUTBOX_DELETE: &str = "outbox_delete";
}

/// How many latency samples are kept (the most recent).
const LATENCY_SAMPLES: usize = 100_000;

/// End-to-end latency quantiles over the kept samples, in milliseconds.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Latency {
    pub samples: usize,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

/// The rules in service and the history of reloads.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct RulesStatus {
    /// Identity of the rules in service: version and sha256.
    pub version: String,
    pub sha256: String,
    /// Successful swaps since start.
    pub swaps: u64,
    /// Refused reloads by reason code.
    pub refused: BTreeMap<&'static str, u64>,
    /// Why the last refused reload was refused (cleared by the next successful swap).
    pub last_refusal: Option<String>,
}

/// A point-in-time copy of the counters.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Stats {
    /// Input messages taken from the topic.
    pub received: u64,
    /// Active campaigns whose drafts are in both sinks.
    pub campaigns_delivered: u64,
    /// Drafts in both sinks.
    pub drafts_delivered: u64,
    /// Input messages whose offset was stored after their results were durable.
    pub offsets_stored: u64,
    pub batches: u64,
    pub sink_retries: u64,
    /// Full loads of the subscriber table (the first one included).
    pub cache_resyncs: u64,
    /// Partitions given up because another runner claimed them (zombie fencing).
    pub partitions_fenced: u64,
    pub skipped: BTreeMap<&'static str, u64>,
    pub dead_lettered: BTreeMap<String, u64>,
    pub cache_stale: bool,
    /// A sink is failing and being retried (cleared by the next unit that commits).
    pub kafka_failing: bool,
    pub postgres_failing: bool,
    /// The broker did not answer the last metadata probe.
    pub kafka_unreachable: bool,
    pub rules: RulesStatus,
}

impl Stats {
    /// Every input message accounted for: delivered, skipped or dead-lettered.
    pub fn settled(&self) -> u64 {
        self.campaigns_delivered
            + self.skipped.values().sum::<u64>()
            + self.dead_lettered.values().sum::<u64>()
    }

    pub fn skipped(&self, reason: SkipReason) -> u64 {
        self.skipped.get(reason.as_str()).copied().unwrap_or(0)
    }

    pub fn dead_lettered(&self, code: &str) -> u64 {
        self.dead_lettered.get(code).copied().unwrap_or(0)
    }
}

impl Events {
    pub fn stats(&self) -> Stats {
        Stats {
            received: self.received.load(Ordering::Relaxed),
            campaigns_delivered: self.campaigns_delivered.load(Ordering::Relaxed),
            drafts_delivered: self.drafts_delivered.load(Ordering::Relaxed),
            offsets_stored: self.offsets_stored.load(Ordering::Relaxed),
            batches: self.batches.load(Ordering::Relaxed),
            sink_retries: self.sink_retries.load(Ordering::Relaxed),
            cache_resyncs: self.cache_resyncs.load(Ordering::Relaxed),
            partitions_fenced: self.partitions_fenced.load(Ordering::Relaxed),
            skipped: self.skipped.lock().expect("stats lock").clone(),
            dead_lettered: self.dead_lettered.lock().expect("stats lock").clone(),
            cache_stale: self.cache_stale.load(Ordering::Relaxed),
            kafka_failing: self.kafka_failing.load(Ordering::Relaxed),
            postgres_failing: self.postgres_failing.load(Ordering::Relaxed),
            kafka_unreachable: self.kafka_unreachable.load(Ordering::Relaxed),
            rules: self.rules.lock().expect("stats lock").clone(),
        }
    }

    pub fn fenced(&self, topic: &str, partition: i32, sink: &'static str) {
        tracing::warn!(topic, partition, sink, "Fenced: another runner owns the partition now; leaving it to that runner, writing nothing more for it.");
        self.partitions_fenced.fetch_add(1, Ordering::Relaxed);
    }

    /// A message's results are durable in both sinks, `us` after its Kafka timestamp.
    pub fn committed_latency(&self, us: u64) {
        let mut l = self.latencies.lock().expect("latency lock");
        if l.len() == LATENCY_SAMPLES {
            l.pop_front();
        }
        l.push_back(us);
    }

    /// The kept latency samples in µs, oldest first (for benchmarks).
    pub fn latency_samples(&self) -> Vec<u64> {
        self.latencies
            .lock()
            .expect("latency lock")
            .iter()
            .copied()
            .collect()
    }

    /// The latency samples recorded since the last call (or clear), removed.
    pub fn take_latency_samples(&self) -> Vec<u64> {
        std::mem::take(&mut *self.latencies.lock().expect("latency lock")).into()
    }

    pub fn clear_latencies(&self) {
        self.latencies.lock().expect("latency lock").clear();
        self.stages.lock().expect("stage lock").clear();
    }

    /// One run of stage `name` took `us` microseconds.
    pub fn stage_time(&self, name: &'static str, us: u64) {
        let mut stages = self.stages.lock().expect("stage lock");
        let l = stages.entry(name).or_default();
        if l.len() == STAGE_SAMPLES {
            l.pop_front();
        }
        l.push_back(us);
    }

    /// Quantiles of each stage's kept durations.
    pub fn stages(&self) -> BTreeMap<&'static str, Latency> {
        let stages = self.stages.lock().expect("stage lock");
        stages
            .iter()
            .map(|(k, v)| (*k, quantiles(v.iter().copied().collect())))
            .collect()
    }

    /// Quantiles over the kept samples (computed on request: /status, benchmarks).
    pub fn latency(&self) -> Latency {
        quantiles(self.latency_samples())
    }

    pub fn cache_resynced(&self) {
        self.cache_resyncs.fetch_add(1, Ordering::Relaxed);
    }

    /// The rules the runner starts with.
    pub fn rules_loaded(&self, identity: &crate::rules::RulesIdentity) {
        let mut r = self.rules.lock().expect("stats lock");
        r.version = identity.version.clone();
        r.sha256 = identity.sha256.clone();
    }

    pub fn rules_swapped(
        &self,
        old: &crate::rules::RulesIdentity,
        new: &crate::rules::RulesIdentity,
        trigger: &str,
    ) {
        tracing::info!(old = %old, new = %new, trigger, "Rules swapped; the next batch uses the new version.");
        let mut r = self.rules.lock().expect("stats lock");
        r.version = new.version.clone();
        r.sha256 = new.sha256.clone();
        r.swaps += 1;
        r.last_refusal = None;
    }

    pub fn rules_refused(
        &self,
        path: &std::path::Path,
        error: &crate::rules::LoadError,
        trigger: &str,
    ) {
        tracing::error!(
            path = %path.display(),
            reason = error.code(),
            error = %error,
            trigger,
            "New rules refused; the running version stays in service."
        );
        let mut r = self.rules.lock().expect("stats lock");
        *r.refused.entry(error.code()).or_default() += 1;
        r.last_refusal = Some(format!("{}: {error}", error.code()));
    }

    pub fn received(&self, n: usize) {
        self.received.fetch_add(n as u64, Ordering::Relaxed);
    }

    pub fn skipped(&self, reason: SkipReason, pos: &SourcePos, campaign_id: &str) {
        tracing::info!(reason = reason.as_str(), source = %pos, campaign_id, "Campaign skipped: it produces no drafts.");
        *self
            .skipped
            .lock()
            .expect("stats lock")
            .entry(reason.as_str())
            .or_default() += 1;
    }

    pub fn dead_lettered(&self, code: &str, detail: &str, pos: &SourcePos, rules: &str) {
        tracing::warn!(reason = code, detail, source = %pos, rules, "Message dead-lettered.");
        *self
            .dead_lettered
            .lock()
            .expect("stats lock")
            .entry(code.to_string())
            .or_default() += 1;
    }

    pub fn delivered(&self, pos: &SourcePos, campaign_id: &str, drafts: usize, rules: &str) {
        tracing::debug!(source = %pos, campaign_id, drafts, rules, "Campaign delivered to both sinks.");
        self.campaigns_delivered.fetch_add(1, Ordering::Relaxed);
        self.drafts_delivered
            .fetch_add(drafts as u64, Ordering::Relaxed);
    }

    pub fn batch_committed(&self, messages: usize, drafts: usize, elapsed: std::time::Duration) {
        self.kafka_failing.store(false, Ordering::Relaxed);
        self.postgres_failing.store(false, Ordering::Relaxed);
        tracing::debug!(
            messages,
            drafts,
            elapsed_ms = elapsed.as_millis() as u64,
            "Batch durable in both sinks; offsets stored."
        );
        self.batches.fetch_add(1, Ordering::Relaxed);
        self.offsets_stored
            .fetch_add(messages as u64, Ordering::Relaxed);
    }

    pub fn sink_retry(
        &self,
        sink: &'static str,
        error: &dyn fmt::Display,
        attempt: u32,
        backoff: std::time::Duration,
    ) {
        match sink {
            "kafka" => self.kafka_failing.store(true, Ordering::Relaxed),
            _ => self.postgres_failing.store(true, Ordering::Relaxed),
        }
        tracing::warn!(sink, error = %error, attempt, backoff_ms = backoff.as_millis() as u64, "Sink write failed; retrying.");
        self.sink_retries.fetch_add(1, Ordering::Relaxed);
    }
}

/// p50, p99 and max of samples in µs, reported in milliseconds.
fn quantiles(mut v: Vec<u64>) -> Latency {
    if v.is_empty() {
        return Latency::default();
    }
    v.sort_unstable();
    let q =
        |p: f64| v[((p * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1] as f64 / 1000.0;
    Latency {
        samples: v.len(),
        p50_ms: q(0.50),
        p99_ms: q(0.99),
        max_ms: *v.last().expect("non-empty") as f64 / 1000.0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latency_quantiles_over_the_kept_samples() {
        let e = Events::default();
        assert_eq!(e.latency(), Latency::default());
        for us in 1..=1000u64 {
            e.committed_latency(us * 1000);
        }
        let l = e.latency();
        assert_eq!(
            (l.samples, l.p50_ms, l.p99_ms, l.max_ms),
            (1000, 500.0, 990.0, 1000.0)
        );
        for _ in 0..LATENCY_SAMPLES {
            e.committed_latency(7);
        }
        assert_eq!(
            e.latency().samples,
            LATENCY_SAMPLES,
            "bounded: the oldest samples go"
        );
        assert_eq!(e.latency().max_ms, 0.007);
    }
}
