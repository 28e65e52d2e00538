//! What a pipeline reports: each event is one method that both logs a sentence with structured
//! fields and counts (in the Prometheus registry, `metrics.rs`, labelled with the pipeline), so
//! logs and counters cannot disagree. [`Stats`] is the counted view, for `/status` and tests.

use crate::metrics::{Latency, Metrics, Quantiles};
use prometheus::{Histogram, IntCounter};
use serde::Serialize;
use std::collections::BTreeMap;
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
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

/// The stages of a unit, in order, timed for /status, /metrics and the benchmarks: `fetch`
/// and `queued` from the message's Kafka timestamp (broker, fetch, batching, waiting for
/// earlier units), then evaluation, the PostgreSQL transaction, the Kafka transaction, and the
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

    /// Every stage, in order.
    pub const ALL: [&str; 10] = [
        FETCH,
        QUEUED,
        EVALUATE,
        POSTGRES,
        KAFKA_QUEUED,
        KAFKA,
        KAFKA_PRODUCE,
        KAFKA_OFFSETS,
        KAFKA_COMMIT,
        OUTBOX_DELETE,
    ];
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

/// A point-in-time copy of one pipeline's counters.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Stats {
    pub pipeline: String,
    /// Input messages taken from the topic.
    pub received: u64,
    /// Input messages whose output is in both sinks (the campaign pipeline: active campaigns).
    pub delivered: u64,
    /// Output records in both sinks (the campaign pipeline: drafts).
    pub records_delivered: u64,
    /// Input messages whose offset was committed after their results were durable.
    pub offsets_stored: u64,
    pub batches: u64,
    pub sink_retries: u64,
    /// Partitions given up because another runner claimed them (zombie fencing).
    pub partitions_fenced: u64,
    pub skipped: BTreeMap<&'static str, u64>,
    pub dead_lettered: BTreeMap<String, u64>,
    /// A sink is failing and being retried (cleared by the next unit that commits).
    pub kafka_failing: bool,
    pub postgres_failing: bool,
    /// The broker did not answer the last metadata probe.
    pub kafka_unreachable: bool,
    /// The pipeline's own reasons to be degraded that hold now (e.g. a stale cache).
    pub conditions: Vec<&'static str>,
    /// The partitions this runner holds, once the group has given them and each was taken
    /// over (None: waiting for an assignment, at start or during a rebalance).
    pub partitions: Option<usize>,
    /// The delivery loop runs.
    pub running: bool,
    pub rules: RulesStatus,
    /// Event-time windows (the store-revenue pipeline).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub windows: Option<WindowStats>,
    /// Campaigns kept for their start and deliveries by cause (the campaign pipeline).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub schedule: Option<ScheduleStats>,
    /// While the pipeline starts: what it waits for (None once it consumes).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub startup: Option<StartupStatus>,
}

/// A pipeline that has not started consuming yet, and why (`startup.rs`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct StartupStatus {
    /// `starting`, or `startup_failed` once the start-up deadline has passed and the runner
    /// waits on (`startup.on_timeout = "wait"`).
    pub state: &'static str,
    /// What it waits for, by code (`kafka_unreachable`, `input_topic_missing`, …); empty while
    /// nothing outside is missing.
    pub causes: Vec<&'static str>,
    /// The same in sentences, naming the brokers, the topic or the host.
    pub details: Vec<String>,
}

/// The campaign pipeline's registry of campaigns not over yet, as this runner sees it (the
/// partitions it holds), and what it delivered by cause.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ScheduleStats {
    /// Campaigns published before their start and not delivered yet.
    pub scheduled: u64,
    /// The earliest window opening among them (unix seconds).
    pub next_start: Option<i64>,
    /// Drafts made durable in both sinks, by cause: `published`, `scheduled_start`,
    /// `new_subscriber`.
    pub deliveries: BTreeMap<&'static str, u64>,
    /// Trigger records this runner produced, by cause.
    pub triggers: BTreeMap<&'static str, u64>,
}

/// The store-revenue pipeline's windows, as this runner sees them.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct WindowStats {
    /// Sales that came after their partition's watermark had passed their window
    /// (dead-lettered with reason `late`).
    pub late: u64,
    /// Window rows updated with new sums.
    pub windows_updated: u64,
    /// Windows this runner made final (and published).
    pub windows_final: u64,
    /// The least watermark of the input topic's partitions (unix seconds), when each has one:
    /// windows ending at or before it are final.
    pub global_watermark: Option<i64>,
    /// The partitions this runner holds, by number.
    pub partitions: BTreeMap<i32, PartitionTimeStats>,
}

/// One input partition's event-time progress.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct PartitionTimeStats {
    /// Unix seconds; windows ending at or before it are closed for the partition.
    pub watermark: Option<i64>,
    pub max_event_time: Option<i64>,
    /// The first offset not committed yet.
    pub next_offset: i64,
    /// Caught up and quiet for `idle_after`: its watermark follows processing time.
    pub idle: bool,
}

impl Stats {
    /// Every input message accounted for: delivered, skipped or dead-lettered.
    pub fn settled(&self) -> u64 {
        self.delivered
            + self.skipped.values().sum::<u64>()
            + self.dead_lettered.values().sum::<u64>()
    }

    pub fn skipped(&self, reason: impl AsRef<str>) -> u64 {
        self.skipped.get(reason.as_ref()).copied().unwrap_or(0)
    }

    pub fn dead_lettered(&self, code: &str) -> u64 {
        self.dead_lettered.get(code).copied().unwrap_or(0)
    }

    /// Why the pipeline is not ready to do its work (empty: ready): it has not taken over what
    /// the group gave it, or a condition of its own holds (e.g. a stale cache).
    pub fn not_ready(&self) -> Vec<&'static str> {
        let mut r = self.conditions.clone();
        if let Some(s) = &self.startup {
            r.push(s.state);
            r.extend(&s.causes);
        } else if !self.running {
            r.push("not_running");
        } else if self.partitions.is_none() {
            r.push("waiting_for_partitions");
        }
        if self.kafka_unreachable && !r.contains(&"kafka_unreachable") {
            r.push("kafka_unreachable");
        }
        r
    }

    /// Why the pipeline is degraded now (empty: healthy).
    pub fn degraded(&self) -> Vec<&'static str> {
        let mut r = self.conditions.clone();
        if let Some(s) = &self.startup {
            r.push(s.state);
            r.extend(&s.causes);
        }
        if self.kafka_failing {
            r.push("kafka_sink_retrying");
        }
        if self.kafka_unreachable && !r.contains(&"kafka_unreachable") {
            r.push("kafka_unreachable");
        }
        if self.postgres_failing {
            r.push("postgres_sink_retrying");
        }
        r
    }
}

/// One pipeline's events.
#[derive(Debug)]
pub struct Events {
    pipeline: String,
    metrics: Metrics,
    received: IntCounter,
    delivered: IntCounter,
    records_delivered: IntCounter,
    offsets_stored: IntCounter,
    batches: IntCounter,
    partitions_fenced: IntCounter,
    rules_swaps: IntCounter,
    latency: Histogram,
    /// Skips and dead letters by reason (few reasons; a message each at most).
    skipped: Mutex<BTreeMap<&'static str, u64>>,
    dead_lettered: Mutex<BTreeMap<String, u64>>,
    kafka_failing: AtomicBool,
    postgres_failing: AtomicBool,
    kafka_unreachable: AtomicBool,
    /// The pipeline's own conditions and whether each holds.
    conditions: Mutex<BTreeMap<&'static str, bool>>,
    /// The partitions held, +1 (0: waiting for an assignment).
    partitions: AtomicUsize,
    running: AtomicBool,
    rules: Mutex<RulesStatus>,
    windows: Mutex<Option<WindowStats>>,
    schedule: Mutex<Option<ScheduleStats>>,
    startup: Mutex<Option<StartupStatus>>,
    /// When a blocked sink was last logged, and the attempts since.
    blocked: Mutex<(Option<std::time::Instant>, u64)>,
    /// Skip reasons logged at debug, not info: reasons that stand for most messages of a run
    /// (the dead letters a replay leaves alone).
    quiet_skips: &'static [&'static str],
}

impl Default for Events {
    /// Events of a pipeline named "test" in a registry of their own.
    fn default() -> Self {
        Events::new(&Metrics::new(), "test")
    }
}

impl Events {
    pub fn new(metrics: &Metrics, pipeline: &str) -> Events {
        let p = [pipeline];
        let m = metrics;
        Events {
            pipeline: pipeline.to_string(),
            received: m.received.with_label_values(&p),
            delivered: m.delivered.with_label_values(&p),
            records_delivered: m.records_delivered.with_label_values(&p),
            offsets_stored: m.offsets_stored.with_label_values(&p),
            batches: m.batches.with_label_values(&p),
            partitions_fenced: m.partitions_fenced.with_label_values(&p),
            rules_swaps: m.rules_swaps.with_label_values(&p),
            latency: m.latency.with_label_values(&p),
            metrics: metrics.clone(),
            skipped: Mutex::default(),
            dead_lettered: Mutex::default(),
            kafka_failing: AtomicBool::new(false),
            postgres_failing: AtomicBool::new(false),
            kafka_unreachable: AtomicBool::new(false),
            conditions: Mutex::default(),
            partitions: AtomicUsize::new(0),
            running: AtomicBool::new(false),
            rules: Mutex::default(),
            windows: Mutex::default(),
            schedule: Mutex::default(),
            startup: Mutex::default(),
            blocked: Mutex::default(),
            quiet_skips: &[],
        }
    }

    pub fn pipeline(&self) -> &str {
        &self.pipeline
    }

    /// The registry these events count in (a pipeline may register metrics of its own there).
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    pub fn stats(&self) -> Stats {
        Stats {
            pipeline: self.pipeline.clone(),
            received: self.received.get(),
            delivered: self.delivered.get(),
            records_delivered: self.records_delivered.get(),
            offsets_stored: self.offsets_stored.get(),
            batches: self.batches.get(),
            sink_retries: ["kafka", "postgres"]
                .iter()
                .map(|s| {
                    self.metrics
                        .sink_retries
                        .with_label_values(&[self.pipeline.as_str(), s])
                        .get()
                })
                .sum(),
            partitions_fenced: self.partitions_fenced.get(),
            skipped: self.skipped.lock().expect("stats lock").clone(),
            dead_lettered: self.dead_lettered.lock().expect("stats lock").clone(),
            kafka_failing: self.kafka_failing.load(Ordering::Relaxed),
            postgres_failing: self.postgres_failing.load(Ordering::Relaxed),
            kafka_unreachable: self.kafka_unreachable.load(Ordering::Relaxed),
            conditions: self
                .conditions
                .lock()
                .expect("stats lock")
                .iter()
                .filter(|(_, on)| **on)
                .map(|(c, _)| *c)
                .collect(),
            partitions: self.partitions.load(Ordering::Relaxed).checked_sub(1),
            running: self.running.load(Ordering::Relaxed),
            rules: self.rules.lock().expect("stats lock").clone(),
            windows: self.windows.lock().expect("stats lock").clone(),
            schedule: self.schedule.lock().expect("stats lock").clone(),
            startup: self.startup.lock().expect("stats lock").clone(),
        }
    }

    /// The pipeline is starting: reported as `starting` until [`Events::started`].
    pub fn starting(&self) {
        *self.startup.lock().expect("stats lock") = Some(StartupStatus {
            state: "starting",
            ..StartupStatus::default()
        });
    }

    /// What start-up waits for now (`causes` as (code, sentence)); `past_deadline`: the
    /// start-up deadline has passed and the runner waits on.
    pub fn startup_waits(&self, causes: &[(&'static str, String)], past_deadline: bool) {
        *self.startup.lock().expect("stats lock") = Some(StartupStatus {
            state: if past_deadline {
                "startup_failed"
            } else {
                "starting"
            },
            causes: causes.iter().map(|(c, _)| *c).collect(),
            details: causes.iter().map(|(_, d)| d.clone()).collect(),
        });
    }

    /// The pipeline has everything it needs and consumes.
    pub fn started(&self) {
        *self.startup.lock().expect("stats lock") = None;
    }

    /// The windows' state as of the last trigger.
    /// Updates the campaign pipeline's schedule section with `f`.
    pub fn update_schedule(&self, f: impl FnOnce(&mut ScheduleStats)) {
        f(self
            .schedule
            .lock()
            .expect("stats lock")
            .get_or_insert_with(ScheduleStats::default))
    }

    pub fn set_windows(&self, w: WindowStats) {
        *self.windows.lock().expect("stats lock") = Some(w);
    }

    /// The partitions held after a rebalance was applied (each taken over), or None while one
    /// is in progress.
    pub fn assignment(&self, held: Option<usize>) {
        let was = self
            .partitions
            .swap(held.map_or(0, |n| n + 1), Ordering::Relaxed);
        if held.is_some() && was == 0 {
            tracing::info!(pipeline = %self.pipeline, partitions = held.unwrap_or(0), "Ready: every partition the group gave is taken over.");
        }
    }

    /// The delivery loop started (true) or ended (false).
    pub fn running(&self, running: bool) {
        self.running.store(running, Ordering::Relaxed);
    }

    /// A condition of the pipeline's own that makes it degraded while it holds (reported in
    /// `/health` under its name).
    pub fn condition(&self, name: &'static str, holds: bool) {
        self.conditions
            .lock()
            .expect("stats lock")
            .insert(name, holds);
    }

    pub fn fenced(&self, topic: &str, partition: i32, sink: &'static str) {
        tracing::warn!(pipeline = %self.pipeline, topic, partition, sink, "Fenced: another runner owns the partition now; leaving it to that runner, writing nothing more for it.");
        self.partitions_fenced.inc();
    }

    /// A partition's transactional producer is stuck and given up (see `TxError::Stuck`); the
    /// partition is taken over again with a new one.
    pub fn producer_lost(&self, topic: &str, partition: i32, error: &dyn fmt::Display) {
        tracing::error!(pipeline = %self.pipeline, topic, partition, error = %error, "A Kafka transaction is stuck; its producer is given up and the partition taken over again.");
        self.failing("kafka").store(true, Ordering::Relaxed);
        self.metrics
            .sink_failing
            .with_label_values(&[self.pipeline.as_str(), "kafka"])
            .set(1);
        self.metrics
            .producers_lost
            .with_label_values(&[self.pipeline.as_str()])
            .inc();
    }

    /// Whether the broker answers the metadata probe; returns whether it changed.
    pub fn kafka_reachable(&self, reachable: bool) -> bool {
        let was = self.kafka_unreachable.swap(!reachable, Ordering::Relaxed);
        self.metrics
            .kafka_unreachable
            .with_label_values(&[self.pipeline.as_str()])
            .set(i64::from(!reachable));
        was == reachable
    }

    /// A message's results are durable in both sinks, `us` after its Kafka timestamp.
    pub fn committed_latency(&self, us: u64) {
        self.latency.observe(us as f64 / 1e6);
    }

    /// The end-to-end latency histogram so far (take two and subtract for an interval).
    pub fn latency_snapshot(&self) -> Quantiles {
        Quantiles::of(&self.latency)
    }

    /// One run of stage `name` took `us` microseconds.
    pub fn stage_time(&self, name: &'static str, us: u64) {
        self.metrics
            .stages
            .with_label_values(&[self.pipeline.as_str(), name])
            .observe(us as f64 / 1e6);
    }

    /// Each stage's histogram so far, for the stages that ran.
    pub fn stage_snapshots(&self) -> BTreeMap<&'static str, Quantiles> {
        stage::ALL
            .iter()
            .map(|s| {
                let h = self
                    .metrics
                    .stages
                    .with_label_values(&[self.pipeline.as_str(), s]);
                (*s, Quantiles::of(&h))
            })
            .filter(|(_, q)| q.samples() > 0)
            .collect()
    }

    /// Quantiles of each stage's durations so far.
    pub fn stages(&self) -> BTreeMap<&'static str, Latency> {
        self.stage_snapshots()
            .into_iter()
            .map(|(s, q)| (s, q.latency()))
            .collect()
    }

    /// End-to-end latency quantiles so far.
    pub fn latency(&self) -> Latency {
        self.latency_snapshot().latency()
    }

    /// The rules the pipeline starts with (their version and the sha256 of their bytes).
    pub fn rules_loaded(&self, version: &str, sha256: &str) {
        let mut r = self.rules.lock().expect("stats lock");
        self.set_rules(&mut r, version, sha256);
    }

    fn set_rules(&self, r: &mut RulesStatus, version: &str, sha256: &str) {
        let info = &self.metrics.rules_info;
        let _ = info.remove_label_values(&[self.pipeline.as_str(), &r.version, &r.sha256]);
        info.with_label_values(&[self.pipeline.as_str(), version, sha256])
            .set(1);
        r.version = version.to_string();
        r.sha256 = sha256.to_string();
    }

    /// New rules are in service; `old` and `new` say which, for the log.
    pub fn rules_swapped(
        &self,
        old: &dyn fmt::Display,
        new: &dyn fmt::Display,
        version: &str,
        sha256: &str,
        trigger: &str,
    ) {
        tracing::info!(pipeline = %self.pipeline, old = %old, new = %new, trigger, "Rules swapped; the next batch uses the new version.");
        let mut r = self.rules.lock().expect("stats lock");
        self.set_rules(&mut r, version, sha256);
        r.swaps += 1;
        r.last_refusal = None;
        self.rules_swaps.inc();
    }

    /// A reload was refused for reason `code`; the running rules stay.
    pub fn rules_refused(
        &self,
        path: &std::path::Path,
        code: &'static str,
        error: &dyn fmt::Display,
        trigger: &str,
    ) {
        tracing::error!(
            pipeline = %self.pipeline,
            path = %path.display(),
            reason = code,
            error = %error,
            trigger,
            "New rules refused; the running version stays in service."
        );
        let mut r = self.rules.lock().expect("stats lock");
        *r.refused.entry(code).or_default() += 1;
        r.last_refusal = Some(format!("{code}: {error}"));
        self.metrics
            .rules_refused
            .with_label_values(&[self.pipeline.as_str(), code])
            .inc();
    }

    pub fn received(&self, n: usize) {
        self.received.inc_by(n as u64);
    }

    /// Skips for these reasons are logged at debug (still counted).
    pub fn with_quiet_skips(mut self, reasons: &'static [&'static str]) -> Events {
        self.quiet_skips = reasons;
        self
    }

    pub fn skipped(&self, reason: &'static str, pos: &SourcePos, subject: &str) {
        if self.quiet_skips.contains(&reason) {
            tracing::debug!(pipeline = %self.pipeline, reason, source = %pos, subject, "Message skipped: it produces no output.");
        } else {
            tracing::info!(pipeline = %self.pipeline, reason, source = %pos, subject, "Message skipped: it produces no output.");
        }
        *self
            .skipped
            .lock()
            .expect("stats lock")
            .entry(reason)
            .or_default() += 1;
        self.metrics
            .skipped
            .with_label_values(&[self.pipeline.as_str(), reason])
            .inc();
    }

    pub fn dead_lettered(&self, code: &str, detail: &str, pos: &SourcePos, rules: &str) {
        tracing::warn!(pipeline = %self.pipeline, reason = code, detail, source = %pos, rules, "Message dead-lettered.");
        *self
            .dead_lettered
            .lock()
            .expect("stats lock")
            .entry(code.to_string())
            .or_default() += 1;
        self.metrics
            .dead_lettered
            .with_label_values(&[self.pipeline.as_str(), code])
            .inc();
    }

    /// `n` messages of the same kind dead-lettered at once (one log line).
    pub fn dead_lettered_many(&self, code: &str, n: u64, example: &str) {
        if n == 0 {
            return;
        }
        // Late data is expected in a stream (each one is in the dead-letter topic with its
        // window): not a warning.
        if code == "late" {
            tracing::info!(pipeline = %self.pipeline, reason = code, messages = n, example, "Messages dead-lettered.");
        } else {
            tracing::warn!(pipeline = %self.pipeline, reason = code, messages = n, example, "Messages dead-lettered.");
        }
        *self
            .dead_lettered
            .lock()
            .expect("stats lock")
            .entry(code.to_string())
            .or_default() += n;
        self.metrics
            .dead_lettered
            .with_label_values(&[self.pipeline.as_str(), code])
            .inc_by(n);
    }

    /// `n` messages whose output is durable in both sinks, `records` output records.
    pub fn delivered_many(&self, n: u64, records: u64) {
        self.delivered.inc_by(n);
        self.records_delivered.inc_by(records);
    }

    /// A message's output (`records` records) is durable in both sinks.
    pub fn delivered(&self, pos: &SourcePos, subject: &str, records: usize, rules: &str) {
        tracing::debug!(pipeline = %self.pipeline, source = %pos, subject, records, rules, "Message delivered to both sinks.");
        self.delivered.inc();
        self.records_delivered.inc_by(records as u64);
    }

    pub fn batch_committed(&self, messages: usize, records: usize, elapsed: std::time::Duration) {
        self.sink_recovered("kafka");
        self.sink_recovered("postgres");
        tracing::debug!(
            pipeline = %self.pipeline,
            messages,
            records,
            elapsed_ms = elapsed.as_millis() as u64,
            "Unit durable in both sinks; offsets committed."
        );
        self.batches.inc();
        self.offsets_stored.inc_by(messages as u64);
    }

    /// A sink refuses writes for a reason only an operator can remove (the schema changed, a
    /// permission, a full disk): degraded (`postgres_blocked`) until a write succeeds; logged
    /// at once, then at most once a minute with the number of attempts in between.
    pub fn sink_blocked(&self, sink: &'static str, error: &dyn fmt::Display, code: Option<&str>) {
        self.failing(sink).store(true, Ordering::Relaxed);
        let labels = [self.pipeline.as_str(), sink];
        self.metrics.sink_failing.with_label_values(&labels).set(1);
        self.metrics.sink_retries.with_label_values(&labels).inc();
        self.condition(
            match sink {
                "kafka" => "kafka_blocked",
                _ => "postgres_blocked",
            },
            true,
        );
        let mut b = self.blocked.lock().expect("stats lock");
        b.1 += 1;
        if b.0
            .is_none_or(|at| at.elapsed() >= std::time::Duration::from_secs(60))
        {
            tracing::error!(pipeline = %self.pipeline, sink, sqlstate = code.unwrap_or("-"), error = %error, attempts = b.1, "The sink refuses the write for a reason only an operator can remove; the partition waits and retries. Said again in a minute if it lasts.");
            *b = (Some(std::time::Instant::now()), 0);
        }
    }

    fn failing(&self, sink: &'static str) -> &AtomicBool {
        match sink {
            "kafka" => &self.kafka_failing,
            _ => &self.postgres_failing,
        }
    }

    pub(crate) fn sink_recovered(&self, sink: &'static str) {
        let blocked = match sink {
            "kafka" => "kafka_blocked",
            _ => "postgres_blocked",
        };
        if self
            .conditions
            .lock()
            .expect("stats lock")
            .insert(blocked, false)
            .unwrap_or(false)
        {
            tracing::info!(pipeline = %self.pipeline, sink, "The sink takes writes again.");
            *self.blocked.lock().expect("stats lock") = (None, 0);
        }
        if self.failing(sink).swap(false, Ordering::Relaxed) {
            self.metrics
                .sink_failing
                .with_label_values(&[self.pipeline.as_str(), sink])
                .set(0);
        }
    }

    pub fn sink_retry(
        &self,
        sink: &'static str,
        error: &dyn fmt::Display,
        attempt: u32,
        backoff: std::time::Duration,
    ) {
        self.failing(sink).store(true, Ordering::Relaxed);
        let labels = [self.pipeline.as_str(), sink];
        self.metrics.sink_failing.with_label_values(&labels).set(1);
        tracing::warn!(pipeline = %self.pipeline, sink, error = %error, attempt, backoff_ms = backoff.as_millis() as u64, "Sink write failed; retrying.");
        self.metrics.sink_retries.with_label_values(&labels).inc();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_once_what_the_group_gave_is_taken_over() {
        let e = Events::default();
        assert_eq!(e.stats().not_ready(), ["not_running"]);
        e.running(true);
        assert_eq!(e.stats().not_ready(), ["waiting_for_partitions"]);
        e.assignment(Some(0));
        assert!(
            e.stats().not_ready().is_empty(),
            "a group with none to give"
        );
        e.assignment(None);
        assert_eq!(e.stats().not_ready(), ["waiting_for_partitions"]);
        e.assignment(Some(3));
        assert_eq!(e.stats().partitions, Some(3));
        e.condition("subscriber_cache_stale", true);
        assert_eq!(e.stats().not_ready(), ["subscriber_cache_stale"]);
        assert_eq!(e.stats().degraded(), ["subscriber_cache_stale"]);
        e.condition("subscriber_cache_stale", false);
        assert!(e.stats().not_ready().is_empty());
        e.running(false);
        assert_eq!(e.stats().not_ready(), ["not_running"]);
    }

    #[test]
    fn start_up_is_reported_with_its_causes_until_started() {
        let e = Events::default();
        e.starting();
        assert_eq!(e.stats().not_ready(), ["starting"]);
        assert_eq!(e.stats().degraded(), ["starting"]);
        e.startup_waits(
            &[("kafka_unreachable", "Kafka brokers b:1 …".into())],
            false,
        );
        assert_eq!(e.stats().not_ready(), ["starting", "kafka_unreachable"]);
        e.startup_waits(&[("input_topic_missing", "input topic t …".into())], true);
        assert_eq!(
            e.stats().degraded(),
            ["startup_failed", "input_topic_missing"]
        );
        e.started();
        e.running(true);
        assert_eq!(e.stats().not_ready(), ["waiting_for_partitions"]);
        assert!(e.stats().startup.is_none());
        e.assignment(Some(1));
        e.kafka_reachable(false);
        assert_eq!(e.stats().not_ready(), ["kafka_unreachable"]);
    }
}
