//! Exactly-once delivery to Kafka and PostgreSQL, written once for every pipeline. A pipeline
//! ([`Pipeline`]) evaluates messages and says what its rows are and which records to publish;
//! this module owns everything else: consuming, batching, units, fences, the outbox, the Kafka
//! transactions, offsets and taking partitions over. README, "Delivery guarantees", argues why
//! nothing is lost or doubled.
//!
//! One loop ([`Delivery::run`]): take a batch (or stop, or apply a rebalance), split it by
//! partition, evaluate each partition's run of messages off the async threads (in units of at
//! most `batch_max_weight`), and make each unit durable:
//!
//! 1. `unit.rs`: one PostgreSQL transaction — fence check, the pipeline's idempotent rows, the
//!    outbox of what Kafka must get (`outbox.rs`, `template.rs`), the cleanup of what earlier
//!    units published;
//! 2. `stage.rs`: one Kafka transaction — the records and the input offset — in a stage of its
//!    own, so that one unit is published while the next is evaluated and written, on the
//!    partition's transactional producer (`producer.rs`);
//! 3. the unit's outbox entries are deleted by the partition's next unit.
//!
//! `takeover.rs` takes a newly assigned partition over from what is committed.

mod outbox;
mod producer;
mod stage;
mod takeover;
pub mod template;
mod unit;

pub use outbox::{Kept, OutboxEntry, Records, Target};
pub use producer::{OutRecord, TxError, TxProducer};
pub use unit::{CommitError, Fence, PgSide, Tables, WriteError};

use crate::events::{stage as stages, Events, SourcePos};
use crate::headers::{self, HeaderList};
use crate::retry::{stopped, Abandoned};
use crate::sandbox::RulesIdentity;
use crate::source::{RebalanceEvent, Rebalances, SourceConsumer};
use rdkafka::consumer::Consumer;
use rdkafka::message::{Message, OwnedMessage};
use rdkafka::ClientConfig;
use stage::{unix_micros, Done, Job, Publisher, Stage};
use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::watch;
use tokio_postgres::{Client, Transaction};

/// What one input message came to.
#[derive(Debug)]
pub enum Outcome<D, H = ()> {
    /// Delivered to both sinks: the pipeline's rows and records.
    Deliver(D),
    /// Valid but produces nothing: counted and logged with a reason, not dead-lettered.
    Skip {
        reason: &'static str,
        /// What the message was about (the campaign pipeline: the campaign id), for the log.
        subject: String,
        /// What the pipeline records of the message in the unit's transaction all the same
        /// ([`Pipeline::record_unit`]; the campaign pipeline: a campaign kept for its start).
        held: Option<H>,
    },
    /// Sent to the dead-letter topic with its raw key and value and the reason.
    DeadLetter {
        code: String,
        detail: String,
        field: Option<String>,
    },
}

impl<D, H> Outcome<D, H> {
    /// Skipped, with nothing held.
    pub fn skip(reason: &'static str, subject: String) -> Outcome<D, H> {
        Outcome::Skip {
            reason,
            subject,
            held: None,
        }
    }

    pub fn dead_letter(code: &str, detail: String, field: Option<String>) -> Outcome<D, H> {
        Outcome::DeadLetter {
            code: code.to_string(),
            detail,
            field,
        }
    }
}

/// An input message, where it came from, and what it came to.
#[derive(Debug)]
pub struct Evaluated<D, H = ()> {
    pub msg: OwnedMessage,
    pub pos: SourcePos,
    pub outcome: Outcome<D, H>,
}

/// What a pipeline brings to the delivery core: how it evaluates messages, its rows in the
/// unit's PostgreSQL transaction, and its records for Kafka.
pub trait Pipeline: Send + Sync + Sized + 'static {
    /// What a delivered message carries to the sinks.
    type Delivery: Send + Sync + 'static;
    /// What a skipped message may leave to [`Pipeline::record_unit`] (`()` when nothing).
    type Held: Send + Sync + 'static;
    /// Evaluates messages off the async threads; owns the rules evaluator and its buffers.
    type Worker: Worker<Delivery = Self::Delivery, Held = Self::Held, Round = Self::Round>;
    /// What one round of evaluation reads (the campaign pipeline: the subscriber snapshot).
    type Round: Send + Sync + 'static;
    /// The pipeline's statements, prepared once per connection.
    type Prepared: Clone + Send + Sync + 'static;

    /// Waits until evaluation may go on and returns what it reads.
    fn round(&self) -> impl Future<Output = Self::Round> + Send;

    /// How much a delivery weighs against `batch_max_weight` and the Kafka stage's bound (the
    /// campaign pipeline: its drafts).
    fn weight(delivery: &Self::Delivery) -> usize;

    /// The outbox entry of a delivered message: its records, with `headers` (where the
    /// message came from and which rules made it) extended by the pipeline's own.
    fn entry(
        &self,
        delivery: &Self::Delivery,
        source_offset: i64,
        headers: HeaderList,
    ) -> OutboxEntry;

    fn prepare<'c>(
        &'c self,
        client: &'c Client,
    ) -> impl Future<Output = Result<Self::Prepared, tokio_postgres::Error>> + Send + 'c;

    /// Writes a unit's deliveries in its transaction, after the fence check: `deliveries` are
    /// the delivered messages, each with the index of its entry in `entries`. Returns which
    /// records of those entries are new and must be published. A row already there may be
    /// reported as [`WriteError::AlreadyThere`]: the transaction is then tried again with
    /// `careful`, and the pipeline keeps only what is new.
    fn write<'t>(
        &'t self,
        tx: &'t Transaction<'t>,
        prepared: &'t Self::Prepared,
        deliveries: &'t [(usize, &'t Self::Delivery)],
        entries: &'t [OutboxEntry],
        careful: bool,
    ) -> impl Future<Output = Result<Vec<Kept>, WriteError>> + Send + 't;

    /// Reports a message whose results are durable in both sinks; `published`: how many of its
    /// records were new and published (the others were there already).
    fn delivered(
        &self,
        events: &Events,
        pos: &SourcePos,
        delivery: &Self::Delivery,
        rules: &str,
        published: usize,
    );

    /// The headers saying where a message's records come from and which rules made them:
    /// by default the message's own position and `rules`.
    fn provenance(
        &self,
        _msg: &OwnedMessage,
        pos: &SourcePos,
        rules: &RulesIdentity,
    ) -> HeaderList {
        default_provenance(pos, rules)
    }

    /// The headers a message's dead letter starts with, before its reason and provenance: by
    /// default all of the message's own.
    fn dead_letter_headers(&self, msg: &OwnedMessage) -> HeaderList {
        headers::of_message(msg)
    }

    /// Records the unit in its PostgreSQL transaction, sent with the fence check (all of it is
    /// rolled back if the fence has moved) and before the pipeline's rows: returns the indices
    /// (in `unit`) of messages whose results must not be written nor published (the dead-letter
    /// replay: messages another replay has replayed already). By default nothing is recorded
    /// and everything is written.
    fn record_unit<'t>(
        &'t self,
        _tx: &'t Transaction<'t>,
        _prepared: &'t Self::Prepared,
        _unit: &'t [Evaluated<Self::Delivery, Self::Held>],
    ) -> impl Future<Output = Result<BTreeSet<usize>, WriteError>> + Send + 't {
        async { Ok(BTreeSet::new()) }
    }
}

/// Where a message came from (topic, partition, offset) and which rules made its records.
pub fn default_provenance(pos: &SourcePos, rules: &RulesIdentity) -> HeaderList {
    [
        (headers::SOURCE_TOPIC, pos.topic.as_bytes().to_vec()),
        (
            headers::SOURCE_PARTITION,
            pos.partition.to_string().into_bytes(),
        ),
        (headers::SOURCE_OFFSET, pos.offset.to_string().into_bytes()),
        (headers::RULES_VERSION, rules.version.as_bytes().to_vec()),
        (headers::RULES_SHA256, rules.sha256.as_bytes().to_vec()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect()
}

/// Evaluates messages on a blocking thread (rules calls are synchronous).
pub trait Worker: Send + Sync + 'static {
    type Delivery;
    type Held;
    type Round;
    /// Picks up swapped rules: called between batches, so one batch sees one rules version.
    fn refresh(&mut self);
    /// The rules in use.
    fn rules(&self) -> &RulesIdentity;
    /// Evaluates one message that has a value within the size limit.
    fn evaluate(
        &mut self,
        payload: &[u8],
        round: &Self::Round,
    ) -> Outcome<Self::Delivery, Self::Held>;

    /// Evaluates one message as it came from the topic: by default a message without a value
    /// (`missing_value`) or over `max_message_bytes` (`oversized`) is dead-lettered, any other
    /// is given to [`Worker::evaluate`].
    fn evaluate_message(
        &mut self,
        msg: &OwnedMessage,
        max_message_bytes: usize,
        round: &Self::Round,
    ) -> Outcome<Self::Delivery, Self::Held> {
        match payload_within(msg, max_message_bytes) {
            Ok(p) => self.evaluate(p, round),
            Err(dead_letter) => dead_letter,
        }
    }
}

/// A message's value, or its dead letter: `missing_value` when it has none, `oversized` when it
/// is over `max_message_bytes`.
pub fn payload_within<D, H>(
    msg: &OwnedMessage,
    max_message_bytes: usize,
) -> Result<&[u8], Outcome<D, H>> {
    match msg.payload() {
        None => Err(Outcome::dead_letter(
            "missing_value",
            "the message has no value".into(),
            None,
        )),
        Some(p) if p.len() > max_message_bytes => Err(Outcome::dead_letter(
            "oversized",
            format!(
                "the value is {} bytes; the limit is {}",
                p.len(),
                max_message_bytes
            ),
            None,
        )),
        Some(p) => Ok(p),
    }
}

/// How the core delivers one pipeline's messages.
#[derive(Debug, Clone)]
pub struct DeliveryConfig {
    pub batch_max_messages: usize,
    pub batch_linger: Duration,
    /// A unit closes when its deliveries weigh this much (the campaign pipeline: drafts).
    pub batch_max_weight: usize,
    /// Units of different partitions committed at once, each on its own PostgreSQL connection.
    pub parallel_units: usize,
    pub max_message_bytes: usize,
    pub sink_retry_max_backoff: Duration,
    pub output_topic: String,
    pub dead_letter_topic: String,
    /// `transactional.id` = this prefix + input topic + partition.
    pub transactional_prefix: String,
    pub producer: ClientConfig,
    /// Also commit each offset the plain way after its transaction: only for librdkafka's mock
    /// cluster, which does not store transactional offset commits.
    pub plain_offset_commits: bool,
    /// The largest record each topic takes (read from the broker in the background at start:
    /// the producer's limits until then).
    pub record_limits: SharedLimits,
}

/// [`RecordLimits`] that are filled in once known (whether they are, beside them).
#[derive(Debug, Clone)]
pub struct SharedLimits(Arc<watch::Sender<(RecordLimits, bool)>>);

impl Default for SharedLimits {
    fn default() -> Self {
        SharedLimits(Arc::new(watch::Sender::new((
            RecordLimits::default(),
            false,
        ))))
    }
}

impl SharedLimits {
    pub fn get(&self) -> RecordLimits {
        self.0.borrow().0
    }

    /// Sets the limits; `known`: as the broker says them (else provisional).
    pub fn set(&self, limits: RecordLimits, known: bool) {
        self.0.send_replace((limits, known));
    }

    /// Waits until the limits are known, at most `timeout`.
    pub async fn known(&self, timeout: Duration) {
        let mut rx = self.0.subscribe();
        let _ = tokio::time::timeout(timeout, rx.wait_for(|(_, known)| *known)).await;
    }
}

/// The largest record (key, value and headers, in bytes) Kafka takes on the output and the
/// dead-letter topic: the producer's `message.max.bytes` and each topic's `max.message.bytes`,
/// whichever is smaller. A message whose output record would be larger is dead-lettered
/// (`sink_refused`) before anything is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordLimits {
    pub output: usize,
    pub dead_letters: usize,
}

impl Default for RecordLimits {
    /// librdkafka's default `message.max.bytes`.
    fn default() -> Self {
        RecordLimits {
            output: 1_000_000,
            dead_letters: 1_000_000,
        }
    }
}

/// A record's size as the limits count it.
fn record_bytes(key: Option<&[u8]>, value: Option<&[u8]>, headers: &HeaderList) -> usize {
    key.map_or(0, <[u8]>::len)
        + value.map_or(0, <[u8]>::len)
        + headers
            .iter()
            .map(|(k, v)| k.len() + v.len())
            .sum::<usize>()
}

/// A partition this runner owns: its fence, its transactional producer, and the next offset
/// to process (messages before it are done).
struct Owned {
    fence: Fence,
    producer: TxProducer,
    next_offset: i64,
    /// The offset through which this runner published the partition's outbox entries and has
    /// not deleted them yet.
    published_through: Option<i64>,
}

/// What became of a unit's PostgreSQL transaction.
enum Written {
    /// Committed: its outbox entries, and which of their records are to be published.
    Committed(Vec<OutboxEntry>, Vec<Kept>),
    /// The partition was taken by another runner (the unit is left to it).
    Fenced,
    /// Refused for the content of one of its messages' rows.
    Refused(crate::db::DbError),
    /// Messages whose output records Kafka would refuse as too large (their index in the
    /// unit, the record's size): nothing was written.
    TooLarge(Vec<(usize, usize)>),
}

/// A partition.
type Key = (String, i32);

/// A pipeline's evaluated messages.
type EvaluatedOf<P> = Evaluated<<P as Pipeline>::Delivery, <P as Pipeline>::Held>;

/// Everything the loop owns.
pub struct Delivery<P: Pipeline> {
    cfg: DeliveryConfig,
    pipeline: Arc<P>,
    consumer: Arc<SourceConsumer>,
    rebalances: Arc<Rebalances>,
    /// Moved onto a blocking thread for each round, so absent only while one is evaluated.
    worker: Option<P::Worker>,
    instance_id: String,
    /// For taking partitions over and cleaning outboxes.
    pg: PgSide<P>,
    /// One per unit committed at the same time (`parallel_units`).
    unit_sinks: Vec<PgSide<P>>,
    events: Arc<Events>,
    owned: HashMap<Key, Owned>,
    /// Partitions whose producer was lost (stuck): taken over again while they are assigned to
    /// this runner.
    lost: BTreeSet<Key>,
    publisher: Publisher,
    /// The Kafka stage, started by `run`.
    stage: Option<Stage<P>>,
    /// A bounded run over given partitions (see [`Delivery::with_fixed_assignment`]).
    fixed: Option<Fixed>,
}

/// A bounded run: partitions assigned by the caller (no consumer group membership), each from
/// a given offset, until the consumer has reached the end of every one of them.
#[derive(Debug)]
struct Fixed {
    start: Vec<(Key, i64)>,
    /// Partitions whose end the consumer has reached.
    ended: BTreeSet<i32>,
    /// Set when the run has reached every end and drained.
    completed: Arc<std::sync::atomic::AtomicBool>,
}

impl<P: Pipeline> std::fmt::Debug for Delivery<P> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Delivery")
            .field("cfg", &self.cfg)
            .finish_non_exhaustive()
    }
}

/// A partition idle this long has the outbox entries of its last unit deleted.
const IDLE_OUTBOX_CLEANUP: Duration = Duration::from_millis(500);

/// What the loop reads from: the consumer and the rebalances it reports.
pub struct Source {
    pub consumer: Arc<SourceConsumer>,
    pub rebalances: Arc<Rebalances>,
}

impl std::fmt::Debug for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Source").finish_non_exhaustive()
    }
}

impl<P: Pipeline> Delivery<P> {
    pub fn new(
        cfg: DeliveryConfig,
        pipeline: Arc<P>,
        worker: P::Worker,
        source: Source,
        pg: PgSide<P>,
        instance_id: String,
        events: Arc<Events>,
    ) -> Delivery<P> {
        let unit_sinks = (0..cfg.parallel_units)
            .map(|_| pg.clone_unconnected())
            .collect();
        let publisher = Publisher {
            consumer: source.consumer.clone(),
            events: events.clone(),
            output_topic: cfg.output_topic.clone(),
            dead_letter_topic: cfg.dead_letter_topic.clone(),
            retry_max_backoff: cfg.sink_retry_max_backoff,
            plain_offset_commits: cfg.plain_offset_commits,
        };
        Delivery {
            unit_sinks,
            cfg,
            pipeline,
            consumer: source.consumer,
            rebalances: source.rebalances,
            worker: Some(worker),
            instance_id,
            pg,
            events,
            owned: HashMap::new(),
            lost: BTreeSet::new(),
            publisher,
            stage: None,
            fixed: None,
        }
    }

    /// Makes the run bounded, over the partitions given (the dead-letter replay): no group
    /// subscription and no rebalances. At the start each partition is taken over as usual (its
    /// outbox published or deleted, judged by the committed offset) and then the group's
    /// offset of the partition is set to its start offset, in a Kafka transaction of the
    /// partition's producer (so that the outbox of the units to come is judged against it);
    /// the consumer is assigned the partitions from there. The run ends, drained, once the
    /// consumer has reached the end of every partition (it needs `enable.partition.eof`);
    /// `completed` is set then, once every unit is published.
    pub fn with_fixed_assignment(
        mut self,
        start: Vec<(String, i32, i64)>,
        completed: Arc<std::sync::atomic::AtomicBool>,
    ) -> Self {
        self.fixed = Some(Fixed {
            start: start.into_iter().map(|(t, p, o)| ((t, p), o)).collect(),
            ended: BTreeSet::new(),
            completed,
        });
        self
    }

    /// A consumer error: the end of a partition in a bounded run, else logged.
    fn consumer_error(&mut self, e: &rdkafka::error::KafkaError) -> bool {
        if let (rdkafka::error::KafkaError::PartitionEOF(p), Some(f)) = (e, self.fixed.as_mut()) {
            f.ended.insert(*p);
            return true;
        }
        tracing::warn!(error = %e, "Kafka consumer error.");
        false
    }

    /// A bounded run has reached the end of every partition.
    fn fixed_done(&self) -> bool {
        self.fixed
            .as_ref()
            .is_some_and(|f| f.start.iter().all(|((_, p), _)| f.ended.contains(p)))
    }

    /// Takes the partitions of a bounded run over, sets their offsets to their start, and
    /// assigns them to the consumer.
    async fn start_fixed(&mut self, stop: watch::Receiver<bool>) -> Result<(), Abandoned> {
        let start = self
            .fixed
            .as_ref()
            .map(|f| f.start.clone())
            .unwrap_or_default();
        let mut tpl = rdkafka::TopicPartitionList::new();
        for ((topic, partition), offset) in start {
            self.recover(&topic, partition, stop.clone()).await?;
            let key = (topic.clone(), partition);
            let Some(o) = self.owned.get_mut(&key) else {
                tracing::warn!(
                    topic,
                    partition,
                    "The partition could not be taken over: another run holds it."
                );
                return Err(Abandoned);
            };
            let producer = o.producer.clone();
            let mut s = stop.clone();
            let flight = self
                .publisher
                .publish(&producer, (&topic, partition), offset - 1, &[], &mut s)
                .await?;
            if !matches!(flight, stage::Flight::Published) {
                tracing::warn!(
                    topic,
                    partition,
                    "The partition's start offset could not be set: another run holds it."
                );
                self.owned.remove(&key);
                return Err(Abandoned);
            }
            if let Some(o) = self.owned.get_mut(&key) {
                o.next_offset = offset;
            }
            tpl.add_partition_offset(&topic, partition, rdkafka::Offset::Offset(offset))
                .map_err(|_| Abandoned)?;
        }
        if let Err(e) = self.consumer.assign(&tpl) {
            tracing::error!(error = %e, "Cannot assign the partitions to the consumer.");
            return Err(Abandoned);
        }
        self.events.assignment(Some(self.owned.len()));
        Ok(())
    }

    fn stage(&mut self) -> &mut Stage<P> {
        self.stage
            .as_mut()
            .expect("the Kafka stage runs while the pipeline does")
    }

    /// Applies what the Kafka stage reports: a published unit's outbox entries can be deleted;
    /// a fenced partition is not ours any more.
    fn apply(&mut self, done: Done) -> Result<(), Abandoned> {
        match done {
            Done::Published { key, epoch, last } => {
                if let Some(o) = self.owned.get_mut(&key).filter(|o| o.fence.epoch == epoch) {
                    o.published_through = Some(last);
                }
            }
            Done::Fenced { key, epoch } => {
                if self.owned.get(&key).is_some_and(|o| o.fence.epoch == epoch) {
                    self.owned.remove(&key);
                }
            }
            Done::Lost { key, epoch } => {
                if self.owned.get(&key).is_some_and(|o| o.fence.epoch == epoch) {
                    self.owned.remove(&key);
                    self.lost.insert(key);
                }
            }
            Done::Abandoned => return Err(Abandoned),
        }
        Ok(())
    }

    /// Applies what the Kafka stage has reported so far, without waiting.
    fn absorb(&mut self) -> Result<(), Abandoned> {
        while let Some(done) = self.stage().try_next() {
            self.apply(done)?;
        }
        Ok(())
    }

    /// Waits until every unit handed to the Kafka stage is published (or fenced).
    async fn drain(&mut self) -> Result<(), Abandoned> {
        while let Some(done) = self.stage().next().await {
            self.apply(done)?;
        }
        Ok(())
    }

    /// Runs until `shutdown` turns true, then drains: the unit in hand is finished (unless
    /// `hard_stop` fires first). Offsets need no final commit: each unit's Kafka transaction
    /// committed its own.
    pub async fn run(
        mut self,
        mut shutdown: watch::Receiver<bool>,
        hard_stop: watch::Receiver<bool>,
    ) {
        // Units written to PostgreSQL and not yet published hold at most two units' worth of
        // weight: enough to keep both sinks busy, and memory bounded.
        self.stage = Some(Stage::start(
            self.publisher.clone(),
            self.pipeline.clone(),
            2 * self.cfg.batch_max_weight,
            hard_stop.clone(),
        ));
        self.events.running(true);
        // Nothing is written before the largest record each topic takes is known (read from the
        // broker while the consumer joins its group), or the broker has not said it in time.
        self.cfg.record_limits.known(Duration::from_secs(5)).await;
        // The unit connections are made up front (a failure here is retried by the first unit
        // that needs the connection).
        let warm = futures::future::join_all(self.unit_sinks.iter_mut().map(|s| s.warm_up()));
        if let Ok(results) = tokio::time::timeout(Duration::from_secs(5), warm).await {
            for e in results.into_iter().filter_map(Result::err) {
                tracing::debug!(error = %e, "A unit connection could not be made yet.");
            }
        }
        if self.fixed.is_some() && self.start_fixed(hard_stop.clone()).await.is_err() {
            tracing::warn!("The bounded run could not start.");
            let _ = self.drain().await;
            self.events.running(false);
            return;
        }
        loop {
            if *shutdown.borrow() || self.fixed_done() {
                break;
            }
            if self.apply_rebalances(hard_stop.clone()).await.is_err() {
                break;
            }
            if self.retake_lost(hard_stop.clone()).await.is_err() {
                break;
            }
            let first = tokio::select! {
                biased;
                _ = stopped(&mut shutdown) => break,
                _ = self.rebalances.notify.notified() => continue,
                m = self.consumer.recv() => m,
                done = self.stage.as_mut().expect("started above").next(),
                    if self.stage.as_ref().is_some_and(|s| s.pending() > 0) =>
                {
                    if self.apply(done.expect("pending")).is_err() {
                        break;
                    }
                    continue;
                }
                _ = tokio::time::sleep(IDLE_OUTBOX_CLEANUP),
                    if self.owned.values().any(|o| o.published_through.is_some()) =>
                {
                    self.clean_idle_outboxes(hard_stop.clone()).await;
                    continue;
                }
            };
            let first = match first {
                Ok(m) => m.detach(),
                Err(e) => {
                    if !self.consumer_error(&e) {
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                    continue;
                }
            };
            let batch = self.fill_batch(first).await;
            let now_us = unix_micros();
            for m in &batch {
                if let Some(ms) = m.timestamp().to_millis() {
                    self.events
                        .stage_time(stages::FETCH, (now_us - ms * 1000).max(0) as u64);
                }
            }
            if self.process(batch, hard_stop.clone()).await.is_err() {
                tracing::warn!("Stopping hard: the unit in hand was not completed; it is consumed again from the committed offset.");
                break;
            }
        }
        // The units handed to the Kafka stage are published before the runner stops (unless it
        // is told to stop hard: they stay in the outbox, for whoever takes the partitions over).
        let reached_end = self.fixed_done();
        let drained = if *hard_stop.borrow() {
            false
        } else if self.drain().await.is_err() {
            tracing::warn!("Stopping hard: units written to PostgreSQL stay in the outbox; they are published by whoever takes their partitions over.");
            false
        } else {
            true
        };
        if drained && self.fixed.is_some() {
            // A bounded run leaves no published entry behind in the outbox.
            self.clean_idle_outboxes(hard_stop.clone()).await;
        }
        if let Some(f) = self.fixed.as_ref().filter(|_| reached_end && drained) {
            // Every partition still ours (none fenced by another run) and published.
            let all_owned = f.start.iter().all(|(k, _)| self.owned.contains_key(k));
            if all_owned {
                f.completed.store(true, std::sync::atomic::Ordering::SeqCst);
            }
        }
        tracing::info!("Pipeline drained.");
        self.events.running(false);
    }

    /// Takes more messages after the first: every one already fetched (natural batching: the
    /// longer the previous batch took, the more are waiting), then, if `batch_linger` is set,
    /// whatever arrives within it, until the batch is full.
    async fn fill_batch(&mut self, first: OwnedMessage) -> Vec<OwnedMessage> {
        use futures::FutureExt;
        let consumer = self.consumer.clone();
        let mut batch = vec![first];
        while batch.len() < self.cfg.batch_max_messages {
            match consumer.recv().now_or_never() {
                Some(Ok(m)) => batch.push(m.detach()),
                Some(Err(e)) => {
                    self.consumer_error(&e);
                    return batch;
                }
                None => break,
            }
        }
        if self.cfg.batch_linger.is_zero() {
            return batch;
        }
        let deadline = tokio::time::Instant::now() + self.cfg.batch_linger;
        while batch.len() < self.cfg.batch_max_messages {
            tokio::select! {
                m = consumer.recv() => match m {
                    Ok(m) => batch.push(m.detach()),
                    Err(e) => {
                        self.consumer_error(&e);
                        break;
                    }
                },
                _ = tokio::time::sleep_until(deadline) => break,
            }
        }
        batch
    }

    /// Drops revoked partitions and recovers newly assigned ones.
    async fn apply_rebalances(&mut self, stop: watch::Receiver<bool>) -> Result<(), Abandoned> {
        let events = self.rebalances.take();
        if events.is_empty() {
            return Ok(());
        }
        // Units in the Kafka stage finish first (published, or fenced if the group moved on):
        // a partition is taken over from what is committed, with nothing of ours in flight.
        self.drain().await?;
        for event in events {
            match event {
                RebalanceEvent::Revoked(parts) => {
                    self.events.assignment(None);
                    for p in parts {
                        self.owned.remove(&p);
                    }
                }
                RebalanceEvent::Assigned(parts) => {
                    for (topic, partition) in parts {
                        if !self.owned.contains_key(&(topic.clone(), partition)) {
                            self.recover(&topic, partition, stop.clone()).await?;
                        }
                    }
                    // Every partition the group gave us is taken over (or it gave none).
                    self.events.assignment(Some(self.owned.len()));
                }
            }
        }
        Ok(())
    }

    /// Takes the partitions whose producer was lost over again, those still assigned to this
    /// runner (a new producer with the same transactional id fences the lost one).
    async fn retake_lost(&mut self, stop: watch::Receiver<bool>) -> Result<(), Abandoned> {
        if self.lost.is_empty() {
            return Ok(());
        }
        // What the lost lanes held is handed back first: nothing of ours is in flight.
        self.drain().await?;
        let assigned = self.consumer.assignment().map(|tpl| {
            tpl.elements()
                .iter()
                .map(|e| (e.topic().to_string(), e.partition()))
                .collect::<BTreeSet<Key>>()
        });
        for key in std::mem::take(&mut self.lost) {
            let mine = assigned.as_ref().is_ok_and(|a| a.contains(&key));
            if mine && !self.owned.contains_key(&key) {
                tracing::warn!(topic = %key.0, partition = key.1, "Taking the partition over again: its producer was given up.");
                self.recover(&key.0, key.1, stop.clone()).await?;
            }
        }
        Ok(())
    }

    async fn process(
        &mut self,
        batch: Vec<OwnedMessage>,
        stop: watch::Receiver<bool>,
    ) -> Result<(), Abandoned> {
        // A rebalance while the batch filled: handle it before touching any of its messages.
        self.apply_rebalances(stop.clone()).await?;
        self.events.received(batch.len());
        // Per owned partition, in offset order; anything else (revoked, or already done) is
        // left to whoever owns it.
        let mut parts: BTreeMap<Key, VecDeque<OwnedMessage>> = BTreeMap::new();
        let mut ignored = 0;
        for m in batch {
            let key = (m.topic().to_string(), m.partition());
            match self.owned.get(&key) {
                Some(o) if m.offset() >= o.next_offset => {
                    parts.entry(key).or_default().push_back(m)
                }
                _ => ignored += 1,
            }
        }
        if ignored > 0 {
            tracing::debug!(
                ignored,
                "Messages of partitions not owned, or already done, were left alone."
            );
        }
        let mut worker = self
            .worker
            .take()
            .expect("the worker is present between batches");
        // A swap of the rules takes effect here, between batches: one batch, one rules version.
        worker.refresh();
        let mut result = Ok(());
        // In rounds: one unit of each partition that has messages left is evaluated, then those
        // units are made durable at the same time (each partition has its own fence, producer
        // and transactions; units of one partition stay in order, one round apart).
        while !parts.is_empty() {
            let round = self.pipeline.round().await;
            let started = Instant::now();
            let started_wall_us = unix_micros();
            let cfg = self.cfg.clone();
            let (w, units, remaining) = tokio::task::spawn_blocking(move || {
                let mut w = worker;
                let mut units = Vec::new();
                for (key, rest) in parts.iter_mut() {
                    units.push((key.clone(), evaluate_unit::<P>(&mut w, rest, &round, &cfg)));
                }
                parts.retain(|_, rest| !rest.is_empty());
                (w, units, parts)
            })
            .await
            .expect("rules evaluation does not panic");
            worker = w;
            parts = remaining;
            self.events
                .stage_time(stages::EVALUATE, started.elapsed().as_micros() as u64);
            for (_, group) in &units {
                for e in group {
                    if let Some(ms) = e.msg.timestamp().to_millis() {
                        self.events.stage_time(
                            stages::QUEUED,
                            (started_wall_us - ms * 1000).max(0) as u64,
                        );
                    }
                }
            }
            let identity = worker.rules().clone();
            // What the Kafka stage published or found fenced since the last round: the
            // cleanups this round's transactions carry, and the partitions no longer ours.
            if let Err(e) = self.absorb() {
                result = Err(e);
                break;
            }
            // A chunk of units goes to PostgreSQL at once (`parallel_units`), and each unit goes
            // on to the Kafka stage as soon as its chunk is written: the stage publishes it
            // while the next chunk is written.
            let mut units = units.into_iter();
            let n = self.unit_sinks.len();
            loop {
                let chunk: Vec<_> = units.by_ref().take(n).collect();
                if chunk.is_empty() {
                    break;
                }
                let outcomes = self.write_units(&chunk, &identity, &stop).await;
                for ((key, group), outcome) in chunk.into_iter().zip(outcomes) {
                    let handed = match outcome {
                        Ok(Written::Committed(entries, kept)) => {
                            self.hand_over(key, group, entries, kept, &identity, started)
                                .await
                        }
                        Ok(Written::Fenced) => {
                            // The partition is another runner's now: its unit and the rest of its
                            // messages are left to it.
                            self.owned.remove(&key);
                            parts.remove(&key);
                            Ok(())
                        }
                        Ok(Written::Refused(e)) => {
                            self.one_by_one(key, group, e, &identity, started, &stop, &mut parts)
                                .await
                        }
                        Ok(Written::TooLarge(which)) => {
                            self.without_too_large(
                                key, group, which, &identity, started, &stop, &mut parts,
                            )
                            .await
                        }
                        Err(e) => Err(e),
                    };
                    if let Err(e) = handed {
                        result = Err(e);
                    }
                }
                if result.is_err() {
                    break;
                }
            }
            if result.is_err() {
                break;
            }
        }
        self.worker = Some(worker);
        result
    }

    /// Hands a unit committed in PostgreSQL to the Kafka stage.
    async fn hand_over(
        &mut self,
        key: Key,
        group: Vec<Evaluated<P::Delivery, P::Held>>,
        entries: Vec<OutboxEntry>,
        kept: Vec<Kept>,
        rules: &RulesIdentity,
        started: Instant,
    ) -> Result<(), Abandoned> {
        let Some(o) = self.owned.get_mut(&key) else {
            return Ok(());
        };
        let last = group
            .last()
            .map(|e| e.pos.offset)
            .expect("a unit has messages");
        o.next_offset = last + 1;
        let job = Job {
            epoch: o.fence.epoch,
            producer: o.producer.clone(),
            key,
            last,
            entries,
            kept,
            group,
            rules: rules.clone(),
            started,
            written: Instant::now(),
            room: None,
        };
        self.stage().send(job).await
    }

    /// A unit PostgreSQL refused for the content of one of its messages' rows: its messages
    /// are written one at a time, and each one refused is dead-lettered (`sink_refused`, with
    /// the SQLSTATE and PostgreSQL's message) instead; the others are delivered as usual, in
    /// order, exactly once.
    #[allow(clippy::too_many_arguments)]
    async fn one_by_one(
        &mut self,
        key: Key,
        group: Vec<Evaluated<P::Delivery, P::Held>>,
        refused: crate::db::DbError,
        rules: &RulesIdentity,
        started: Instant,
        stop: &watch::Receiver<bool>,
        parts: &mut BTreeMap<Key, VecDeque<OwnedMessage>>,
    ) -> Result<(), Abandoned> {
        tracing::info!(pipeline = self.events.pipeline(), topic = %key.0, partition = key.1, messages = group.len(), error = %refused, "PostgreSQL refused a unit's rows; writing its messages one at a time to find which.");
        for e in group {
            let mut single = vec![(key.clone(), vec![e])];
            loop {
                let outcome = self.write_units(&single, rules, stop).await.pop();
                match outcome.expect("one outcome per unit")? {
                    Written::Committed(entries, kept) => {
                        let (key, group) = single.pop().expect("one unit");
                        self.hand_over(key, group, entries, kept, rules, started)
                            .await?;
                        break;
                    }
                    Written::Fenced => {
                        self.owned.remove(&key);
                        parts.remove(&key);
                        return Ok(());
                    }
                    Written::TooLarge(which) => {
                        let e = &mut single[0].1[0];
                        let bytes = which.first().map_or(0, |w| w.1);
                        e.outcome = Outcome::dead_letter(
                            "sink_refused",
                            format!(
                                "Kafka refuses records over {} bytes on {} (MSG_SIZE_TOO_LARGE): this message's record is {bytes} bytes",
                                self.cfg.record_limits.get().output, self.cfg.output_topic
                            ),
                            None,
                        );
                    }
                    Written::Refused(err) => {
                        let e = &mut single[0].1[0];
                        if matches!(e.outcome, Outcome::DeadLetter { .. }) {
                            // Even its dead letter is refused: not the message's content after
                            // all. Wait for an operator, as for any such refusal.
                            self.events.sink_blocked("postgres", &err, err.sqlstate());
                            let mut stop = stop.clone();
                            if !crate::retry::sleep(self.cfg.sink_retry_max_backoff, &mut stop)
                                .await
                            {
                                return Err(Abandoned);
                            }
                            continue;
                        }
                        let detail = format!(
                            "PostgreSQL refused this message's rows: SQLSTATE {}: {}",
                            err.sqlstate().unwrap_or("-"),
                            err.server_message().unwrap_or_else(|| err.to_string())
                        );
                        tracing::warn!(pipeline = self.events.pipeline(), source = %e.pos, sqlstate = err.sqlstate().unwrap_or("-"), detail, "A message's rows were refused by PostgreSQL; it is dead-lettered (sink_refused).");
                        e.outcome = Outcome::dead_letter("sink_refused", detail, None);
                    }
                }
            }
        }
        Ok(())
    }

    /// A unit some of whose messages' records Kafka would refuse as too large: those are
    /// dead-lettered (`sink_refused`) instead, and the unit written again.
    #[allow(clippy::too_many_arguments)]
    async fn without_too_large(
        &mut self,
        key: Key,
        mut group: Vec<Evaluated<P::Delivery, P::Held>>,
        mut which: Vec<(usize, usize)>,
        rules: &RulesIdentity,
        started: Instant,
        stop: &watch::Receiver<bool>,
        parts: &mut BTreeMap<Key, VecDeque<OwnedMessage>>,
    ) -> Result<(), Abandoned> {
        loop {
            for (i, bytes) in which.drain(..) {
                let e = &mut group[i];
                let detail = format!(
                    "Kafka refuses records over {} bytes on {} (MSG_SIZE_TOO_LARGE): this message's record is {bytes} bytes",
                    self.cfg.record_limits.get().output, self.cfg.output_topic
                );
                tracing::warn!(pipeline = self.events.pipeline(), source = %e.pos, bytes, "A message's output record is too large for Kafka; it is dead-lettered (sink_refused).");
                e.outcome = Outcome::dead_letter("sink_refused", detail, None);
            }
            let unit = vec![(key.clone(), std::mem::take(&mut group))];
            let outcome = self.write_units(&unit, rules, stop).await.pop();
            let (key, g) = unit.into_iter().next().expect("one unit");
            group = g;
            match outcome.expect("one outcome per unit")? {
                Written::Committed(entries, kept) => {
                    return self
                        .hand_over(key, group, entries, kept, rules, started)
                        .await
                }
                Written::Fenced => {
                    self.owned.remove(&key);
                    parts.remove(&key);
                    return Ok(());
                }
                Written::Refused(e) => {
                    return self
                        .one_by_one(key, group, e, rules, started, stop, parts)
                        .await
                }
                Written::TooLarge(more) => which = more,
            }
        }
    }

    /// Writes units of different partitions to PostgreSQL at the same time, each on its own
    /// connection (as many as `parallel_units`). One outcome per unit, in order.
    async fn write_units(
        &mut self,
        units: &[(Key, Vec<EvaluatedOf<P>>)],
        rules: &RulesIdentity,
        stop: &watch::Receiver<bool>,
    ) -> Vec<Result<Written, Abandoned>> {
        let mut sinks = std::mem::take(&mut self.unit_sinks);
        let mut outcomes = Vec::with_capacity(units.len());
        {
            let this = &*self;
            let done = futures::future::join_all(units.iter().zip(sinks.iter_mut()).map(
                |((key, group), sink)| this.write_unit(sink, key, group, rules, stop.clone()),
            ))
            .await;
            outcomes.extend(done);
        }
        self.unit_sinks = sinks;
        outcomes
    }

    /// Writes one unit (a run of one partition's messages) to PostgreSQL: the pipeline's rows,
    /// the outbox entries of what must reach Kafka, and the cleanup of the outbox entries the
    /// partition's earlier units published. The Kafka stage then publishes it; its own outbox
    /// entries are deleted by the partition's next unit (or by whoever recovers the partition,
    /// judging by the committed offset).
    async fn write_unit(
        &self,
        sink: &mut PgSide<P>,
        key: &Key,
        group: &[Evaluated<P::Delivery, P::Held>],
        rules: &RulesIdentity,
        mut stop: watch::Receiver<bool>,
    ) -> Result<Written, Abandoned> {
        let Some(owned) = self.owned.get(key) else {
            return Ok(Written::Fenced);
        };
        let (fence, published_through) = (owned.fence.clone(), owned.published_through);
        let entries = self.unit_entries(group, rules);
        let too_large = self.too_large(group, &entries);
        if !too_large.is_empty() {
            return Ok(Written::TooLarge(too_large));
        }
        let t = Instant::now();
        let committed = sink
            .commit(
                &fence,
                group,
                &entries,
                published_through,
                &self.events,
                self.cfg.sink_retry_max_backoff,
                &mut stop,
            )
            .await;
        self.events
            .stage_time(stages::POSTGRES, t.elapsed().as_micros() as u64);
        match committed {
            Ok(kept) => Ok(Written::Committed(entries, kept)),
            Err(CommitError::Fenced { .. }) => {
                self.events.fenced(&key.0, key.1, "postgres");
                Ok(Written::Fenced)
            }
            Err(CommitError::Refused(e)) => Ok(Written::Refused(e)),
            Err(CommitError::Abandoned(a)) => Err(a),
        }
    }

    /// The messages of a unit whose output records exceed the output topic's limit: their
    /// index in the unit and the largest record's size. (Entries are made, in order, for every
    /// message that is not skipped.)
    fn too_large(
        &self,
        group: &[Evaluated<P::Delivery, P::Held>],
        entries: &[OutboxEntry],
    ) -> Vec<(usize, usize)> {
        let limit = self.cfg.record_limits.get().output;
        group
            .iter()
            .enumerate()
            .filter(|(_, e)| !matches!(e.outcome, Outcome::Skip { .. }))
            .zip(entries)
            .filter(|(_, entry)| entry.target == Target::Output)
            .filter_map(|((i, _), entry)| {
                let largest = (0..entry.records.len())
                    .map(|r| {
                        let (k, v) = entry.records.get(r);
                        record_bytes(k, v, &entry.headers)
                    })
                    .max()
                    .unwrap_or(0);
                (largest > limit).then_some((i, largest))
            })
            .collect()
    }

    /// Deletes the outbox entries of partitions that have been idle since their last unit was
    /// published (a busy partition's next unit deletes them in its own transaction).
    async fn clean_idle_outboxes(&mut self, stop: watch::Receiver<bool>) {
        let backoff = self.cfg.sink_retry_max_backoff;
        for o in self.owned.values_mut() {
            if let Some(through) = o.published_through {
                let mut stop = stop.clone();
                if self
                    .pg
                    .delete_outbox(&o.fence, through, &self.events, backoff, &mut stop)
                    .await
                    .is_ok()
                {
                    o.published_through = None;
                }
            }
        }
    }

    /// The outbox entries of a unit, from its in-memory results: each delivered message's
    /// records, each dead letter, in order.
    fn unit_entries(
        &self,
        group: &[Evaluated<P::Delivery, P::Held>],
        rules: &RulesIdentity,
    ) -> Vec<OutboxEntry> {
        let mut entries = Vec::new();
        for e in group {
            if let Outcome::Skip { .. } = e.outcome {
                continue;
            }
            let provenance = self.pipeline.provenance(&e.msg, &e.pos, rules);
            match &e.outcome {
                Outcome::Deliver(d) => {
                    entries.push(self.pipeline.entry(d, e.pos.offset, provenance))
                }
                Outcome::DeadLetter {
                    code,
                    detail,
                    field,
                } => {
                    // The original headers first, then the reason and where the message came from.
                    let mut headers: HeaderList = self.pipeline.dead_letter_headers(&e.msg);
                    headers.push((headers::DLQ_REASON.into(), code.as_bytes().to_vec()));
                    headers.push((headers::DLQ_DETAIL.into(), detail.as_bytes().to_vec()));
                    headers.extend(provenance);
                    if let Some(f) = field {
                        headers.push((headers::DLQ_FIELD.into(), f.as_bytes().to_vec()));
                    }
                    entries.push(OutboxEntry {
                        source_offset: e.pos.offset,
                        target: Target::DeadLetters,
                        records: Records::one(e.msg.key(), e.msg.payload()),
                        headers,
                    });
                }
                Outcome::Skip { .. } => {}
            }
        }
        entries
    }
}

/// Evaluates messages from the front of `rest` until it is empty or the unit weighs at least
/// `batch_max_weight`. Runs on a blocking thread: rules calls are synchronous.
fn evaluate_unit<P: Pipeline>(
    w: &mut P::Worker,
    rest: &mut VecDeque<OwnedMessage>,
    round: &P::Round,
    cfg: &DeliveryConfig,
) -> Vec<Evaluated<P::Delivery, P::Held>> {
    let mut unit = Vec::new();
    let mut weight = 0;
    while weight < cfg.batch_max_weight {
        let Some(msg) = rest.pop_front() else { break };
        let pos = SourcePos {
            topic: msg.topic().to_string(),
            partition: msg.partition(),
            offset: msg.offset(),
        };
        let outcome = w.evaluate_message(&msg, cfg.max_message_bytes, round);
        if let Outcome::Deliver(d) = &outcome {
            weight += P::weight(d);
        }
        unit.push(Evaluated { msg, pos, outcome });
    }
    unit
}
