//! `runner produce …`: generators of input traffic for demos, tests, benchmarks and load runs.
//! A generator only makes its events (`campaigns`: the campaign pipeline's campaigns, and the
//! subscribers they fan out to; `sales`: the store-revenue pipeline's sales); what every
//! generator shares is here, written once:
//!
//! - the Kafka producer, made from the runner's own `[kafka]` settings (brokers, SASL, TLS,
//!   client properties), idempotent, lz4, with a bounded number of events in flight and a
//!   delivery timeout, so that an unreachable broker is a clear error and never a hang;
//! - the pacing: a steady rate on an absolute schedule (a slow moment is caught up, the
//!   average holds), or as fast as the producer takes them;
//! - the limit: a number of events or a wall-clock duration; an optional stop signal;
//! - the progress line on stderr about once a second (a bar on a terminal, plain lines
//!   otherwise) and the run's report.

pub mod campaigns;
pub mod sales;

pub use campaigns::{campaigns, CampaignsOptions, CampaignsSummary};
pub use sales::{sales, SalesOptions, SalesSummary};

use crate::config::{KafkaConfig, RawConfig, Sources};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use rdkafka::config::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{BaseRecord, DeliveryResult, Producer, ProducerContext, ThreadedProducer};
use rdkafka::ClientContext;
use serde::Serialize;
use std::io::IsTerminal;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{oneshot, watch};
use tokio::time::Instant;

/// How long a generator's producer lingers to batch events: small, so that a paced run's
/// events leave at their time.
pub const LINGER_MS: &str = "5";

/// Delivery timeout (`message.timeout.ms`) when the client configuration sets none.
pub const DEFAULT_DELIVERY_TIMEOUT: Duration = Duration::from_secs(30);

/// Events sent but not yet acknowledged, at most, unless the options say otherwise.
pub const DEFAULT_MAX_IN_FLIGHT: usize = 100_000;

/// Why a run failed: the options (ours to fix), or the Kafka side (the outside world's).
#[derive(Debug, thiserror::Error)]
pub enum ProduceError {
    #[error("invalid options: {0}")]
    Invalid(String),
    #[error("the Kafka producer could not be created: {0}")]
    Client(#[source] KafkaError),
    #[error("cannot reach the Kafka brokers at {brokers} within {timeout:?}: {source}")]
    Unreachable {
        brokers: String,
        timeout: Duration,
        #[source]
        source: KafkaError,
    },
    #[error("topic {topic} does not exist on the brokers at {brokers}; create it first")]
    NoSuchTopic { topic: String, brokers: String },
    #[error(
        "{failed} event(s) could not be delivered to topic {topic} at {brokers} (first: {first})"
    )]
    Delivery {
        topic: String,
        brokers: String,
        failed: u64,
        first: String,
    },
    #[error("the Kafka producer failed: {0}")]
    Fatal(String),
    #[error("{pending} event(s) were still unacknowledged {waited:?} after the last one was sent")]
    Unacknowledged { pending: u64, waited: Duration },
    #[error("sending to topic {topic}: {source}")]
    Send {
        topic: String,
        #[source]
        source: KafkaError,
    },
}

/// The runner's configuration as a generator reads it: built-in defaults, the file, then
/// `RUNNER__…` environment variables (as `runner run` reads it), with `brokers` in place of
/// `kafka.brokers` when given. Only the `[kafka]` section is checked; the pipelines' sections
/// give generators their defaults (topics, windows).
pub fn load_config(
    file: Option<&Path>,
    brokers: Option<&str>,
) -> anyhow::Result<(RawConfig, KafkaConfig)> {
    let mut raw = RawConfig::load(&Sources {
        file,
        overlay: None,
        env: true,
    })?;
    if let Some(b) = brokers {
        raw.kafka.brokers = b.to_string();
    }
    let mut problems = Vec::new();
    let kafka = raw.kafka.validate(&mut problems);
    if !problems.is_empty() {
        anyhow::bail!("invalid [kafka] configuration: {}", problems.join("; "));
    }
    Ok((raw, kafka))
}

/// The client configuration of a generator's producer: the runner's producer settings (brokers,
/// security, `[kafka.properties]` and `[kafka.producer_properties]`, lz4, idempotence), a short
/// linger, and `delivery_timeout` as `message.timeout.ms`.
pub fn client_config(kafka: &KafkaConfig, delivery_timeout: Duration) -> ClientConfig {
    let mut c = kafka.producer_config();
    c.set("linger.ms", LINGER_MS);
    c.set(
        "message.timeout.ms",
        delivery_timeout.as_millis().max(1).to_string(),
    );
    c
}

/// How much a run sends.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Limit {
    /// This many events in all.
    Count(u64),
    /// For this long, wall-clock time. A paced run sends the events this much time holds at
    /// its rate (so the same options give the same events); a run as fast as possible stops
    /// when the time is up.
    Duration(Duration),
}

impl Limit {
    /// The number of events, when known before the run: `per_second` is the paced rate
    /// (events per wall-clock second), `None` as fast as possible.
    pub fn events(&self, per_second: Option<f64>) -> Option<u64> {
        match (*self, per_second) {
            (Limit::Count(n), _) => Some(n),
            (Limit::Duration(d), Some(rate)) => Some((d.as_secs_f64() * rate).round() as u64),
            (Limit::Duration(_), None) => None,
        }
    }
}

/// What every generator is told: where to send, how much, how fast.
#[derive(Debug, Clone)]
pub struct ProduceOptions {
    pub topic: String,
    pub limit: Limit,
    /// No pacing: events go out as fast as the producer takes them.
    pub as_fast_as_possible: bool,
    /// Events sent but not yet acknowledged, at most.
    pub max_in_flight: usize,
    /// When it turns true, the run stops sending, waits for what is in flight and reports.
    pub stop: Option<watch::Receiver<bool>>,
}

impl ProduceOptions {
    pub fn new(topic: impl Into<String>, limit: Limit) -> ProduceOptions {
        ProduceOptions {
            topic: topic.into(),
            limit,
            as_fast_as_possible: false,
            max_in_flight: DEFAULT_MAX_IN_FLIGHT,
            stop: None,
        }
    }

    fn validate(&self, problems: &mut Vec<String>) {
        if self.topic.trim().is_empty() {
            problems.push("the topic must not be empty".into());
        }
        if self.max_in_flight == 0 {
            problems.push("max_in_flight must be at least 1".into());
        }
    }
}

/// Where the progress of a run is shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Progress {
    /// Nowhere (tests, benchmarks).
    Hidden,
    /// On stderr about once a second: a bar when stderr is a terminal, else a plain line.
    Stderr,
}

/// A run's counters, shared by the sending loop, the producer's delivery reports and the
/// progress line.
#[derive(Debug)]
pub struct Counters {
    /// Handed to the producer.
    pub sent: AtomicU64,
    /// Acknowledged by the broker.
    pub acknowledged: AtomicU64,
    /// Reported undeliverable.
    pub failed: AtomicU64,
    /// The generator's own categories (e.g. late, malformed), in the progress line.
    categories: Vec<(&'static str, AtomicU64)>,
}

impl Counters {
    pub fn new(categories: &[&'static str]) -> Counters {
        Counters {
            sent: AtomicU64::new(0),
            acknowledged: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            categories: categories.iter().map(|c| (*c, AtomicU64::new(0))).collect(),
        }
    }

    /// Counts one event of the category at `index` (its place in [`Counters::new`]'s list).
    pub fn add(&self, index: usize) {
        if let Some((_, c)) = self.categories.get(index) {
            c.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn in_flight(&self) -> u64 {
        let done = self.acknowledged.load(Ordering::Acquire) + self.failed.load(Ordering::Acquire);
        self.sent.load(Ordering::Acquire).saturating_sub(done)
    }

    fn categories_text(&self) -> String {
        self.categories
            .iter()
            .map(|(name, c)| format!("{name} {}", c.load(Ordering::Relaxed)))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// Delivery reports and client errors of a generator's producer.
struct DeliveryContext {
    counters: Arc<Counters>,
    /// The first delivery failure, for the error.
    first_failure: Mutex<Option<String>>,
    /// A fatal error of the (idempotent) producer: nothing more can be sent.
    fatal: Mutex<Option<String>>,
    has_fatal: AtomicBool,
    log: crate::logging::ClientLog,
}

impl ClientContext for DeliveryContext {
    fn log(&self, level: rdkafka::config::RDKafkaLogLevel, fac: &str, log_message: &str) {
        self.log.log(level, fac, log_message)
    }

    fn error(&self, error: KafkaError, reason: &str) {
        if error.rdkafka_error_code() == Some(RDKafkaErrorCode::Fatal) {
            if let Ok(mut f) = self.fatal.lock() {
                f.get_or_insert_with(|| format!("{error}: {reason}"));
            }
            self.has_fatal.store(true, Ordering::Release);
        }
        self.log.error(error, reason)
    }
}

impl ProducerContext for DeliveryContext {
    type DeliveryOpaque = ();

    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        match result {
            Ok(_) => {
                self.counters.acknowledged.fetch_add(1, Ordering::AcqRel);
            }
            Err((e, _)) => {
                if let Ok(mut f) = self.first_failure.lock() {
                    f.get_or_insert_with(|| e.to_string());
                }
                self.counters.failed.fetch_add(1, Ordering::AcqRel);
            }
        }
    }
}

/// A generator's producer: sends events with at most `max_in_flight` unacknowledged, and
/// stops at the first delivery failure.
struct Sender {
    producer: ThreadedProducer<DeliveryContext>,
    topic: String,
    brokers: String,
    max_in_flight: u64,
    delivery_timeout: Duration,
    counters: Arc<Counters>,
}

impl Sender {
    /// Creates the producer (idempotent; lz4, a short linger and a delivery timeout unless the
    /// configuration sets them) and checks that the brokers answer and know the topic.
    async fn connect(
        mut cfg: ClientConfig,
        topic: &str,
        max_in_flight: usize,
        counters: Arc<Counters>,
    ) -> Result<Sender, ProduceError> {
        for (key, value) in [
            ("compression.type", "lz4"),
            ("linger.ms", LINGER_MS),
            (
                "message.timeout.ms",
                &DEFAULT_DELIVERY_TIMEOUT.as_millis().to_string(),
            ),
        ] {
            if cfg.get(key).is_none() {
                cfg.set(key, value);
            }
        }
        cfg.set("enable.idempotence", "true");
        // librdkafka's own queue holds at least what may be in flight.
        let queue_floor = max_in_flight.saturating_add(1000);
        let queue = cfg
            .get("queue.buffering.max.messages")
            .and_then(|v| v.parse::<usize>().ok());
        if queue.is_none_or(|q| q < queue_floor) {
            cfg.set("queue.buffering.max.messages", queue_floor.to_string());
        }
        let delivery_timeout = cfg
            .get("message.timeout.ms")
            .or_else(|| cfg.get("delivery.timeout.ms"))
            .and_then(|v| v.parse::<u64>().ok())
            .map(Duration::from_millis)
            .unwrap_or(DEFAULT_DELIVERY_TIMEOUT);
        let brokers = cfg.get("bootstrap.servers").unwrap_or("").to_string();
        let context = DeliveryContext {
            counters: counters.clone(),
            first_failure: Mutex::new(None),
            fatal: Mutex::new(None),
            has_fatal: AtomicBool::new(false),
            log: crate::logging::ClientLog::new("generator", &cfg),
        };
        let producer: ThreadedProducer<DeliveryContext> = cfg
            .create_with_context(context)
            .map_err(|e| ProduceError::Client(crate::kafka::redact_client_error(e)))?;
        let sender = Sender {
            producer,
            topic: topic.to_string(),
            brokers,
            max_in_flight: max_in_flight as u64,
            delivery_timeout,
            counters,
        };
        match sender.check_topic().await {
            Ok(()) => Ok(sender),
            Err(e) => {
                sender.close().await;
                Err(e)
            }
        }
    }

    /// Asks the brokers for the topic's metadata, within the delivery timeout (15 s at most).
    async fn check_topic(&self) -> Result<(), ProduceError> {
        let timeout = self.delivery_timeout.min(Duration::from_secs(15));
        let probe = self.producer.clone();
        let topic = self.topic.clone();
        let known = tokio::task::spawn_blocking(move || {
            let meta = probe.client().fetch_metadata(Some(&topic), timeout)?;
            Ok::<_, KafkaError>(meta.topics().first().and_then(|t| t.error()))
        })
        .await
        .map_err(|e| ProduceError::Fatal(format!("the metadata request panicked: {e}")))?;
        match known {
            Err(source) => Err(ProduceError::Unreachable {
                brokers: self.brokers.clone(),
                timeout,
                source,
            }),
            Ok(Some(err))
                if RDKafkaErrorCode::from(err) == RDKafkaErrorCode::UnknownTopicOrPartition =>
            {
                Err(ProduceError::NoSuchTopic {
                    topic: self.topic.clone(),
                    brokers: self.brokers.clone(),
                })
            }
            // Any other topic error (a leader being elected) is the producer's to retry.
            Ok(_) => Ok(()),
        }
    }

    /// The first failure reported so far, as the run's error.
    fn failure(&self) -> Option<ProduceError> {
        let ctx = self.producer.context();
        if ctx.has_fatal.load(Ordering::Acquire) {
            let what = ctx
                .fatal
                .lock()
                .ok()
                .and_then(|f| f.clone())
                .unwrap_or_default();
            return Some(ProduceError::Fatal(what));
        }
        let failed = self.counters.failed.load(Ordering::Acquire);
        (failed > 0).then(|| ProduceError::Delivery {
            topic: self.topic.clone(),
            brokers: self.brokers.clone(),
            failed,
            first: ctx
                .first_failure
                .lock()
                .ok()
                .and_then(|f| f.clone())
                .unwrap_or_default(),
        })
    }

    /// Hands one event to the producer, first waiting while `max_in_flight` are unacknowledged.
    async fn send(&self, key: Option<&[u8]>, value: &[u8]) -> Result<(), ProduceError> {
        loop {
            if let Some(e) = self.failure() {
                return Err(e);
            }
            if self.counters.in_flight() >= self.max_in_flight {
                tokio::time::sleep(Duration::from_millis(1)).await;
                continue;
            }
            let mut record = BaseRecord::<[u8], [u8]>::to(&self.topic).payload(value);
            if let Some(k) = key {
                record = record.key(k);
            }
            match self.producer.send(record) {
                Ok(()) => {
                    self.counters.sent.fetch_add(1, Ordering::AcqRel);
                    return Ok(());
                }
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                Err((source, _)) => {
                    return Err(ProduceError::Send {
                        topic: self.topic.clone(),
                        source,
                    })
                }
            }
        }
    }

    /// Waits until every event sent is acknowledged (an event is acknowledged or reported
    /// failed within the delivery timeout, so this ends), then closes the producer.
    async fn finish(self) -> Result<(), ProduceError> {
        let waited_from = Instant::now();
        let deadline = waited_from + self.delivery_timeout + Duration::from_secs(5);
        let outcome = loop {
            if let Some(e) = self.failure() {
                break Err(e);
            }
            let pending = self.counters.in_flight();
            if pending == 0 {
                break Ok(());
            }
            if Instant::now() >= deadline {
                break Err(ProduceError::Unacknowledged {
                    pending,
                    waited: waited_from.elapsed(),
                });
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        };
        self.close().await;
        outcome
    }

    /// Drops the producer off the async threads (dropping purges and flushes briefly).
    async fn close(self) {
        let producer = self.producer;
        let _ = tokio::task::spawn_blocking(move || drop(producer)).await;
    }
}

/// Paces a run: event `n` is due `n / rate` seconds after the start. The schedule is absolute,
/// so a moment of slowness is caught up and the average rate holds.
#[derive(Debug)]
struct Pacer {
    start: Instant,
    /// Seconds between events; `None`: as fast as possible.
    interval: Option<f64>,
}

impl Pacer {
    fn new(per_second: Option<f64>) -> Pacer {
        Pacer {
            start: Instant::now(),
            interval: per_second.map(|r| 1.0 / r),
        }
    }

    fn due(&self, n: u64) -> Option<Instant> {
        self.interval
            .map(|i| self.start + Duration::from_secs_f64(n as f64 * i))
    }
}

/// Resolves when `stop` turns true; never without one.
async fn stop_requested(stop: &mut Option<watch::Receiver<bool>>) {
    match stop {
        Some(rx) => {
            if rx.wait_for(|v| *v).await.is_err() {
                // The sender is gone without asking to stop: run to the end.
                std::future::pending::<()>().await;
            }
        }
        None => std::future::pending().await,
    }
}

fn stop_is_set(stop: &Option<watch::Receiver<bool>>) -> bool {
    stop.as_ref().is_some_and(|rx| *rx.borrow())
}

/// The progress line, drawn by a task of its own about once a second.
struct ProgressTask {
    stop: oneshot::Sender<()>,
    handle: tokio::task::JoinHandle<()>,
}

impl Progress {
    fn start(
        self,
        label: &'static str,
        total: Option<u64>,
        counters: Arc<Counters>,
    ) -> Option<ProgressTask> {
        if self == Progress::Hidden {
            return None;
        }
        let (stop, mut stopped) = oneshot::channel();
        let handle = tokio::spawn(async move {
            let bar = std::io::stderr()
                .is_terminal()
                .then(|| progress_bar(label, total));
            let started = Instant::now();
            let mut last = (started, 0u64);
            let mut tick =
                tokio::time::interval_at(started + Duration::from_secs(1), Duration::from_secs(1));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = &mut stopped => break,
                    _ = tick.tick() => {}
                }
                let now = Instant::now();
                let sent = counters.sent.load(Ordering::Relaxed);
                let rate = (sent - last.1) as f64 / (now - last.0).as_secs_f64().max(1e-3);
                last = (now, sent);
                let acked = counters.acknowledged.load(Ordering::Relaxed);
                let categories = counters.categories_text();
                match &bar {
                    Some(bar) => {
                        bar.set_position(sent);
                        bar.set_message(format!(
                            "({rate:.0}/s), acknowledged {acked}, {categories}"
                        ));
                    }
                    None => eprintln!(
                        "{label}: {:.0}s, sent {sent} ({rate:.0}/s), acknowledged {acked}, {categories}",
                        (now - started).as_secs_f64()
                    ),
                }
            }
            if let Some(bar) = bar {
                bar.finish_and_clear();
            }
        });
        Some(ProgressTask { stop, handle })
    }
}

impl ProgressTask {
    async fn finish(self) {
        let _ = self.stop.send(());
        let _ = self.handle.await;
    }
}

fn progress_bar(label: &'static str, total: Option<u64>) -> ProgressBar {
    let template = if total.is_some() {
        "{prefix} [{elapsed_precise}] {wide_bar} {pos}/{len} {msg}"
    } else {
        "{prefix} [{elapsed_precise}] {spinner} sent {pos} {msg}"
    };
    let style = ProgressStyle::with_template(template).unwrap_or_else(|_| {
        if total.is_some() {
            ProgressStyle::default_bar()
        } else {
            ProgressStyle::default_spinner()
        }
    });
    ProgressBar::with_draw_target(total, ProgressDrawTarget::stderr())
        .with_style(style)
        .with_prefix(label)
}

/// What every run reports.
#[derive(Debug, Clone, Serialize)]
pub struct RunReport {
    pub topic: String,
    /// Events sent, every one acknowledged by the broker.
    pub sent: u64,
    pub wall_time_secs: f64,
    pub events_per_sec: f64,
    /// The run was stopped before its limit.
    pub interrupted: bool,
}

/// One event as a generator makes it.
#[derive(Debug, Clone)]
pub struct Record {
    pub key: Option<String>,
    pub value: Vec<u8>,
}

/// The loop every generator runs: connects, then asks `next` for event after event (its
/// sequence number and the counters, for its categories) and sends each at its time, until the
/// limit or a stop; waits for every acknowledgement; reports.
async fn drive(
    producer_cfg: ClientConfig,
    opts: &ProduceOptions,
    per_second: f64,
    label: &'static str,
    categories: &[&'static str],
    progress: Progress,
    mut next: impl FnMut(u64, &Counters) -> Record,
) -> Result<RunReport, ProduceError> {
    let counters = Arc::new(Counters::new(categories));
    let sender = Sender::connect(
        producer_cfg,
        &opts.topic,
        opts.max_in_flight,
        counters.clone(),
    )
    .await?;
    let paced = (!opts.as_fast_as_possible).then_some(per_second);
    let total = opts.limit.events(paced);
    let pacer = Pacer::new(paced);
    let deadline = match opts.limit {
        Limit::Duration(d) if paced.is_none() => Some(pacer.start + d),
        _ => None,
    };
    let task = progress.start(label, total, counters.clone());
    let mut stop = opts.stop.clone();
    let mut n = 0u64;
    let mut interrupted = false;
    let sent = async {
        loop {
            if total.is_some_and(|t| n >= t) {
                break;
            }
            if let Some(due) = pacer.due(n) {
                if due > Instant::now() {
                    tokio::select! {
                        _ = tokio::time::sleep_until(due) => {}
                        _ = stop_requested(&mut stop) => {}
                    }
                }
                if stop_is_set(&stop) {
                    interrupted = true;
                    break;
                }
            } else if n.is_multiple_of(1024) {
                if deadline.is_some_and(|d| Instant::now() >= d) {
                    break;
                }
                if stop_is_set(&stop) {
                    interrupted = true;
                    break;
                }
                // Unpaced, the loop would otherwise never yield.
                tokio::task::yield_now().await;
            }
            let record = next(n, &counters);
            sender
                .send(record.key.as_deref().map(str::as_bytes), &record.value)
                .await?;
            n += 1;
        }
        Ok(())
    }
    .await;
    let finished = match sent {
        Ok(()) => sender.finish().await,
        Err(e) => {
            sender.close().await;
            Err(e)
        }
    };
    if let Some(task) = task {
        task.finish().await;
    }
    finished?;
    let wall = pacer.start.elapsed().as_secs_f64();
    Ok(RunReport {
        topic: opts.topic.clone(),
        sent: n,
        wall_time_secs: wall,
        events_per_sec: if wall > 0.0 { n as f64 / wall } else { 0.0 },
        interrupted,
    })
}

/// An event time given on the command line: unix seconds, or an RFC 3339 date and time
/// (`2025-09-02T10:30:00Z`).
pub fn parse_event_time(s: &str) -> Result<i64, String> {
    let s = s.trim();
    if let Ok(secs) = s.parse::<i64>() {
        return Ok(secs);
    }
    let t = humantime::parse_rfc3339_weak(s)
        .map_err(|e| format!("{s:?} is neither unix seconds nor an RFC 3339 time: {e}"))?;
    match t.duration_since(std::time::UNIX_EPOCH) {
        Ok(d) => Ok(d.as_secs() as i64),
        Err(e) => Ok(-(e.duration().as_secs_f64().ceil() as i64)),
    }
}

/// Unix seconds as an RFC 3339 UTC time, for reports.
pub(crate) fn format_event_time(secs: i64) -> String {
    match u64::try_from(secs) {
        Ok(s) => humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + Duration::from_secs(s))
            .to_string(),
        Err(_) => format!("{secs} (unix seconds)"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_duration_is_a_count_when_paced() {
        let d = Limit::Duration(Duration::from_secs(60));
        assert_eq!(d.events(Some(10.0)), Some(600));
        assert_eq!(d.events(None), None);
        assert_eq!(Limit::Count(7).events(None), Some(7));
    }

    #[test]
    fn event_times_are_unix_seconds_or_rfc3339() {
        assert_eq!(parse_event_time("1764255600"), Ok(1764255600));
        assert_eq!(parse_event_time("2025-09-02T10:30:00Z"), Ok(1756809000));
        assert_eq!(parse_event_time("2025-09-02 10:30:00"), Ok(1756809000));
        assert!(parse_event_time("yesterday").is_err());
        assert_eq!(format_event_time(1756809000), "2025-09-02T10:30:00Z");
    }

    #[test]
    fn the_schedule_is_absolute() {
        let p = Pacer::new(Some(4.0));
        assert_eq!(p.due(0), Some(p.start));
        assert_eq!(p.due(10), Some(p.start + Duration::from_millis(2500)));
        assert_eq!(Pacer::new(None).due(10), None);
    }

    #[test]
    fn the_generators_producer_is_the_runners_lingering_briefly() {
        let (_, kafka) = load_config(None, Some("127.0.0.1:1")).unwrap();
        let c = client_config(&kafka, Duration::from_secs(3));
        assert_eq!(c.get("bootstrap.servers"), Some("127.0.0.1:1"));
        assert_eq!(c.get("enable.idempotence"), Some("true"));
        assert_eq!(c.get("compression.type"), Some("lz4"));
        assert_eq!(c.get("linger.ms"), Some(LINGER_MS));
        assert_eq!(c.get("message.timeout.ms"), Some("3000"));
    }
}
