//! The data path: campaigns from Kafka → rules (validate, active-now) → join with the cached
//! subscribers → rules (shape) → both sinks from the same in-memory drafts → input offsets.
//!
//! One loop: take a batch (or stop), split it by partition, evaluate each partition's run of
//! messages off the async threads (in units of at most `batch_max_drafts` drafts), and make
//! each unit durable with the delivery protocol: PostgreSQL transaction (fence check,
//! idempotent insert, outbox), then Kafka transaction (records + the input offset), then the
//! outbox is cleared. The Kafka transactions run in their own stage (`kafka_stage.rs`), so that one
//! unit is published while the next is evaluated and written to PostgreSQL. README, "Delivery
//! guarantees", argues why nothing is lost or doubled.

mod kafka_stage;

use crate::cache::{Snapshot, SubscriberCache};
use crate::config::PipelineConfig;
use crate::events::{stage, Events, SkipReason, SourcePos};
use crate::rules::{Activity, Drafts, Evaluator, RulesIdentity};
use crate::sink::feedback::{
    CommitError, FeedbackRow, FeedbackSink, Fence, Kept, OutboxEntry, Records, Target,
};
use crate::sink::kafka::TxProducer;
use crate::sink::{pause, stopped, Abandoned, Backoff};
use crate::source::{CampaignConsumer, RebalanceEvent, Rebalances};
use kafka_stage::{unix_micros, Done, Job, Publisher, Stage};
use rdkafka::consumer::Consumer;
use rdkafka::message::{Headers, Message, OwnedMessage};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::sync::watch;

/// Header names the runner writes. Output drafts and dead letters carry the rules identity and
/// the source position; dead letters add the reason.
pub mod header {
    pub const RULES_VERSION: &str = "rules-version";
    pub const RULES_SHA256: &str = "rules-sha256";
    pub const SUBSCRIBERS_SNAPSHOT: &str = "subscribers-snapshot";
    pub const SOURCE_TOPIC: &str = "source-topic";
    pub const SOURCE_PARTITION: &str = "source-partition";
    pub const SOURCE_OFFSET: &str = "source-offset";
    pub const ADV_CAMPAIGN_ID: &str = "adv-campaign-id";
    /// One id per Kafka transaction attempt: records of an attempt that never committed (which
    /// a broker that does not abort it may still show) are told apart from the committed one.
    pub const TX_ATTEMPT: &str = "tx-attempt";
    pub const DLQ_REASON: &str = "dlq-reason";
    pub const DLQ_DETAIL: &str = "dlq-detail";
    pub const DLQ_FIELD: &str = "dlq-field";
}

/// The time the rules are asked about ("now"), in unix seconds.
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

/// What evaluates a group off the async threads.
#[derive(Debug)]
pub(crate) struct Worker {
    pub(crate) evaluator: Evaluator,
    /// The subscribers of the campaign in hand, as text, reused from campaign to campaign.
    pub(crate) clients: Vec<String>,
}

/// What one input message came to.
#[derive(Debug)]
enum Outcome {
    Deliver {
        /// Shared with the unit's outbox entry, which the Kafka stage publishes from.
        drafts: Arc<Drafts>,
        trigger: i32,
    },
    Skip {
        reason: SkipReason,
        campaign_id: String,
    },
    DeadLetter {
        code: String,
        detail: String,
        field: Option<String>,
    },
}

#[derive(Debug)]
struct Evaluated {
    msg: OwnedMessage,
    pos: SourcePos,
    outcome: Outcome,
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

/// A unit's PostgreSQL transaction committed: its outbox entries, and which of their records
/// are to be published. None when the partition was taken by another runner (the unit is left
/// to it).
type Written = Option<(Vec<OutboxEntry>, Vec<Kept>)>;

/// Everything the loop owns.
pub struct Pipeline {
    pub(crate) cfg: PipelineConfig,
    pub(crate) consumer: Arc<CampaignConsumer>,
    pub(crate) rebalances: Arc<Rebalances>,
    /// The rules caller and the join's reusable client buffer; moved onto a blocking thread
    /// for each group, so absent only while a group is being evaluated.
    pub(crate) worker: Option<Worker>,
    pub(crate) cache: SubscriberCache,
    pub(crate) producer_config: ClientConfig,
    /// `transactional.id` = this prefix + topic + partition.
    pub(crate) transactional_prefix: String,
    pub(crate) instance_id: String,
    /// For taking partitions over and cleaning outboxes.
    pub(crate) feedback: FeedbackSink,
    /// One per unit committed at the same time (`parallel_units`).
    unit_sinks: Vec<FeedbackSink>,
    pub(crate) events: Arc<Events>,
    pub(crate) clock: Arc<dyn Clock>,
    owned: HashMap<(String, i32), Owned>,
    publisher: Publisher,
    /// The Kafka stage, started by `run`.
    stage: Option<Stage>,
}

impl std::fmt::Debug for Pipeline {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pipeline")
            .field("cfg", &self.cfg)
            .finish_non_exhaustive()
    }
}

/// A partition idle this long has the outbox entries of its last unit deleted.
const IDLE_OUTBOX_CLEANUP: Duration = Duration::from_millis(500);

/// Kafka transactions wait this long for the broker.
const TX_TIMEOUT: Duration = Duration::from_secs(10);

impl Pipeline {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        cfg: PipelineConfig,
        output_topic: String,
        dead_letter_topic: String,
        consumer: Arc<CampaignConsumer>,
        rebalances: Arc<Rebalances>,
        worker: Worker,
        cache: SubscriberCache,
        producer_config: ClientConfig,
        transactional_prefix: String,
        instance_id: String,
        feedback: FeedbackSink,
        events: Arc<Events>,
        clock: Arc<dyn Clock>,
    ) -> Pipeline {
        let unit_sinks = (0..cfg.parallel_units)
            .map(|_| feedback.clone_unconnected())
            .collect();
        let publisher = Publisher {
            consumer: consumer.clone(),
            events: events.clone(),
            output_topic,
            dead_letter_topic,
            retry_max_backoff: cfg.sink_retry_max_backoff,
        };
        Pipeline {
            unit_sinks,
            cfg,
            consumer,
            rebalances,
            worker: Some(worker),
            cache,
            producer_config,
            transactional_prefix,
            instance_id,
            feedback,
            events,
            clock,
            owned: HashMap::new(),
            publisher,
            stage: None,
        }
    }

    fn stage(&mut self) -> &mut Stage {
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
        // drafts: enough to keep both sinks busy, and memory bounded.
        self.stage = Some(Stage::start(
            self.publisher.clone(),
            2 * self.cfg.batch_max_drafts,
            hard_stop.clone(),
        ));
        // The unit connections are made up front (a failure here is retried by the first unit
        // that needs the connection).
        let warm = futures::future::join_all(self.unit_sinks.iter_mut().map(|s| s.warm_up()));
        if let Ok(results) = tokio::time::timeout(Duration::from_secs(5), warm).await {
            for e in results.into_iter().filter_map(Result::err) {
                tracing::debug!(error = %e, "A unit connection could not be made yet.");
            }
        }
        loop {
            if *shutdown.borrow() {
                break;
            }
            if self.apply_rebalances(hard_stop.clone()).await.is_err() {
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
                    tracing::warn!(error = %e, "Kafka consumer error.");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let batch = self.fill_batch(first).await;
            let now_us = unix_micros();
            for m in &batch {
                if let Some(ms) = m.timestamp().to_millis() {
                    self.events
                        .stage_time(stage::FETCH, (now_us - ms * 1000).max(0) as u64);
                }
            }
            if self.process(batch, hard_stop.clone()).await.is_err() {
                tracing::warn!("Stopping hard: the unit in hand was not completed; it is consumed again from the committed offset.");
                break;
            }
        }
        // The units handed to the Kafka stage are published before the runner stops (unless it
        // is told to stop hard: they stay in the outbox, for whoever takes the partitions over).
        if !*hard_stop.borrow() && self.drain().await.is_err() {
            tracing::warn!("Stopping hard: units written to PostgreSQL stay in the outbox; they are published by whoever takes their partitions over.");
        }
        tracing::info!("Pipeline drained.");
    }

    /// Takes more messages after the first: every one already fetched (natural batching: the
    /// longer the previous batch took, the more are waiting), then, if `batch_linger` is set,
    /// whatever arrives within it, until the batch is full.
    async fn fill_batch(&self, first: OwnedMessage) -> Vec<OwnedMessage> {
        use futures::FutureExt;
        let mut batch = vec![first];
        while batch.len() < self.cfg.batch_max_messages {
            match self.consumer.recv().now_or_never() {
                Some(Ok(m)) => batch.push(m.detach()),
                Some(Err(e)) => {
                    tracing::warn!(error = %e, "Kafka consumer error.");
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
                m = self.consumer.recv() => match m {
                    Ok(m) => batch.push(m.detach()),
                    Err(e) => {
                        tracing::warn!(error = %e, "Kafka consumer error.");
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
                }
            }
        }
        Ok(())
    }

    /// Takes a newly assigned partition over: a transactional producer (fencing any earlier
    /// one), a new fence epoch in PostgreSQL, then the outbox: entries below the committed
    /// offset were published already and are deleted; the others are published now, in one
    /// transaction that commits the offset past them.
    async fn recover(
        &mut self,
        topic: &str,
        partition: i32,
        mut stop: watch::Receiver<bool>,
    ) -> Result<(), Abandoned> {
        let backoff_max = self.cfg.sink_retry_max_backoff;
        let tx_id = format!("{}-{topic}-{partition}", self.transactional_prefix);
        let mut backoff = Backoff::new(backoff_max);
        let producer = loop {
            match TxProducer::create(&self.producer_config, &tx_id, TX_TIMEOUT).await {
                Ok(p) => break p,
                Err(e) => {
                    let wait = backoff.step();
                    self.events.sink_retry("kafka", &e, backoff.attempt, wait);
                    if !pause(wait, &mut stop).await {
                        return Err(Abandoned);
                    }
                }
            }
        };
        let events = self.events.clone();
        let fence = match self
            .feedback
            .claim(
                topic,
                partition,
                &self.instance_id,
                &events,
                backoff_max,
                &mut stop,
            )
            .await
        {
            Ok(f) => f,
            Err(_) => return Err(Abandoned),
        };
        let committed = self.committed_offset(topic, partition).await;
        let outbox = match self
            .feedback
            .load_outbox(&fence, &events, backoff_max, &mut stop)
            .await
        {
            Ok(o) => o,
            Err(_) => return Err(Abandoned),
        };
        let pending: Vec<OutboxEntry> = outbox
            .into_iter()
            .filter(|e| committed.is_none_or(|c| e.source_offset >= c))
            .collect();
        let mut next_offset = committed.unwrap_or(0);
        if let Some(last) = pending.last().map(|e| e.source_offset) {
            let kept = Kept::all(&pending);
            if !self
                .publisher
                .publish(
                    &producer,
                    (topic, partition),
                    last,
                    &[(&pending, &kept)],
                    &mut stop,
                )
                .await?
            {
                return Ok(());
            }
            tracing::info!(
                topic,
                partition,
                entries = pending.len(),
                records = kept
                    .iter()
                    .map(|k| k.records(&pending[k.entry]).count())
                    .sum::<usize>(),
                through = last,
                "Recovered: outbox published."
            );
            next_offset = last + 1;
            self.seek(topic, partition, next_offset).await;
        }
        if let Some(through) = next_offset.checked_sub(1) {
            let _ = self
                .feedback
                .delete_outbox(&fence, through, &events, backoff_max, &mut stop)
                .await;
        }
        tracing::info!(
            topic,
            partition,
            epoch = fence.epoch,
            next_offset,
            "Partition taken over."
        );
        self.owned.insert(
            (topic.to_string(), partition),
            Owned {
                fence,
                producer,
                next_offset,
                published_through: None,
            },
        );
        Ok(())
    }

    async fn committed_offset(&self, topic: &str, partition: i32) -> Option<i64> {
        let consumer = self.consumer.clone();
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition(topic, partition);
        let r = tokio::task::spawn_blocking(move || {
            consumer.committed_offsets(tpl, Duration::from_secs(10))
        })
        .await;
        match r {
            Ok(Ok(tpl)) => tpl.elements().first().and_then(|e| match e.offset() {
                Offset::Offset(o) => Some(o),
                _ => None,
            }),
            Ok(Err(e)) => {
                tracing::warn!(error = %e, topic, partition, "Cannot read the committed offset; publishing the whole outbox.");
                None
            }
            Err(_) => None,
        }
    }

    async fn seek(&self, topic: &str, partition: i32, offset: i64) {
        let consumer = self.consumer.clone();
        let t = topic.to_string();
        let r = tokio::task::spawn_blocking(move || {
            consumer.seek(
                &t,
                partition,
                Offset::Offset(offset),
                Duration::from_secs(5),
            )
        })
        .await;
        if let Ok(Err(e)) = r {
            // Not fatal: messages before `offset` are skipped by the pipeline anyway.
            tracing::debug!(error = %e, topic, partition, offset, "Seek after recovery failed.");
        }
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
        let mut parts: BTreeMap<(String, i32), VecDeque<OwnedMessage>> = BTreeMap::new();
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
        worker.evaluator.refresh();
        let mut result = Ok(());
        // In rounds: one unit of each partition that has messages left is evaluated, then those
        // units are made durable at the same time (each partition has its own fence, producer
        // and transactions; units of one partition stay in order, one round apart).
        while !parts.is_empty() {
            // Never join against a snapshot known to be stale (first load, lost connection).
            if self.cache.is_stale() {
                tracing::info!("Waiting for the subscriber cache to be resynchronised.");
                self.cache.wait_fresh().await;
            }
            let started = Instant::now();
            let started_wall_us = unix_micros();
            let snapshot = self.cache.snapshot();
            let clock = self.clock.clone();
            let cfg = self.cfg.clone();
            let (w, units, remaining, snapshot) = tokio::task::spawn_blocking(move || {
                let mut w = worker;
                let mut units = Vec::new();
                for (key, rest) in parts.iter_mut() {
                    units.push((
                        key.clone(),
                        evaluate_group(&mut w, rest, &snapshot, &*clock, &cfg),
                    ));
                }
                parts.retain(|_, rest| !rest.is_empty());
                (w, units, parts, snapshot)
            })
            .await
            .expect("rules evaluation does not panic");
            worker = w;
            parts = remaining;
            self.events
                .stage_time(stage::EVALUATE, started.elapsed().as_micros() as u64);
            for (_, group) in &units {
                for e in group {
                    if let Some(ms) = e.msg.timestamp().to_millis() {
                        self.events
                            .stage_time(stage::QUEUED, (started_wall_us - ms * 1000).max(0) as u64);
                    }
                }
            }
            let identity = worker.evaluator.identity().clone();
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
                let outcomes = self
                    .write_units(&chunk, &identity, snapshot.version(), &stop)
                    .await;
                for ((key, group), outcome) in chunk.into_iter().zip(outcomes) {
                    match outcome {
                        Ok(Some((entries, kept))) => {
                            let Some(o) = self.owned.get_mut(&key) else {
                                continue;
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
                                rules: identity.clone(),
                                started,
                                written: Instant::now(),
                                room: None,
                            };
                            if let Err(e) = self.stage().send(job).await {
                                result = Err(e);
                            }
                        }
                        Ok(None) => {
                            // The partition is another runner's now: its unit and the rest of its
                            // messages are left to it.
                            self.owned.remove(&key);
                            parts.remove(&key);
                        }
                        Err(e) => result = Err(e),
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

    /// Writes units of different partitions to PostgreSQL at the same time, each on its own
    /// connection (as many as `parallel_units`). One outcome per unit, in order.
    async fn write_units(
        &mut self,
        units: &[((String, i32), Vec<Evaluated>)],
        rules: &RulesIdentity,
        snapshot_version: u64,
        stop: &watch::Receiver<bool>,
    ) -> Vec<Result<Written, Abandoned>> {
        let mut sinks = std::mem::take(&mut self.unit_sinks);
        let mut outcomes = Vec::with_capacity(units.len());
        {
            let this = &*self;
            let done = futures::future::join_all(units.iter().zip(sinks.iter_mut()).map(
                |((key, group), sink)| {
                    this.write_unit(sink, key, group, rules, snapshot_version, stop.clone())
                },
            ))
            .await;
            outcomes.extend(done);
        }
        self.unit_sinks = sinks;
        outcomes
    }

    /// Writes one unit (a run of one partition's messages) to PostgreSQL: the drafts, the
    /// outbox entries of what must reach Kafka, and the cleanup of the outbox entries the
    /// partition's earlier units published. The Kafka stage then publishes it; its own outbox
    /// entries are deleted by the partition's next unit (or by whoever recovers the partition,
    /// judging by the committed offset).
    async fn write_unit(
        &self,
        sink: &mut FeedbackSink,
        key: &(String, i32),
        group: &[Evaluated],
        rules: &RulesIdentity,
        snapshot_version: u64,
        mut stop: watch::Receiver<bool>,
    ) -> Result<Written, Abandoned> {
        let Some(owned) = self.owned.get(key) else {
            return Ok(None);
        };
        let (fence, published_through) = (owned.fence.clone(), owned.published_through);
        let (rows, entries) = self.unit_outputs(group, rules, snapshot_version);
        let events = self.events.clone();
        let backoff = self.cfg.sink_retry_max_backoff;
        let t = Instant::now();
        let committed = sink
            .commit(
                &fence,
                &rows,
                &entries,
                published_through,
                &events,
                backoff,
                &mut stop,
            )
            .await;
        self.events
            .stage_time(stage::POSTGRES, t.elapsed().as_micros() as u64);
        drop(rows);
        match committed {
            Ok(kept) => Ok(Some((entries, kept))),
            Err(CommitError::Fenced { .. }) => {
                self.events.fenced(&key.0, key.1, "postgres");
                Ok(None)
            }
            Err(CommitError::Abandoned(a)) => Err(a),
        }
    }

    /// Deletes the outbox entries of partitions that have been idle since their last unit was
    /// published (a busy partition's next unit deletes them in its own transaction).
    async fn clean_idle_outboxes(&mut self, stop: watch::Receiver<bool>) {
        let events = self.events.clone();
        let backoff = self.cfg.sink_retry_max_backoff;
        for o in self.owned.values_mut() {
            if let Some(through) = o.published_through {
                let mut stop = stop.clone();
                if self
                    .feedback
                    .delete_outbox(&o.fence, through, &events, backoff, &mut stop)
                    .await
                    .is_ok()
                {
                    o.published_through = None;
                }
            }
        }
    }

    /// The feedback rows and outbox entries of a unit, from its in-memory results.
    fn unit_outputs<'g>(
        &self,
        group: &'g [Evaluated],
        rules: &RulesIdentity,
        snapshot_version: u64,
    ) -> (Vec<FeedbackRow<'g>>, Vec<OutboxEntry>) {
        let snapshot = snapshot_version.to_string();
        let mut rows = Vec::new();
        let mut entries = Vec::new();
        for e in group {
            let source = [
                (header::SOURCE_TOPIC, e.pos.topic.as_bytes().to_vec()),
                (
                    header::SOURCE_PARTITION,
                    e.pos.partition.to_string().into_bytes(),
                ),
                (header::SOURCE_OFFSET, e.pos.offset.to_string().into_bytes()),
                (header::RULES_VERSION, rules.version.as_bytes().to_vec()),
                (header::RULES_SHA256, rules.sha256.as_bytes().to_vec()),
            ];
            match &e.outcome {
                Outcome::Deliver { drafts, trigger } => {
                    let c = &drafts.campaign;
                    let mut headers: Vec<(String, Vec<u8>)> = source
                        .iter()
                        .map(|(k, v)| (k.to_string(), v.clone()))
                        .collect();
                    headers.push((
                        header::SUBSCRIBERS_SNAPSHOT.into(),
                        snapshot.as_bytes().to_vec(),
                    ));
                    headers.push((
                        header::ADV_CAMPAIGN_ID.into(),
                        c.adv_campaign_id.as_bytes().to_vec(),
                    ));
                    for d in drafts.iter() {
                        rows.push(FeedbackRow {
                            restaurant_id: &c.restaurant_id,
                            adv_campaign_id: &c.adv_campaign_id,
                            adv_campaign_content: &c.adv_campaign_content,
                            adv_campaign_owner: &c.adv_campaign_owner,
                            adv_campaign_owner_contact: &c.adv_campaign_owner_contact,
                            adv_campaign_datetime_start: c.adv_campaign_datetime_start,
                            adv_campaign_datetime_end: c.adv_campaign_datetime_end,
                            datetime_created: c.datetime_created,
                            client_id: d.client_id,
                            trigger_datetime_created: *trigger,
                        });
                    }
                    entries.push(OutboxEntry {
                        source_offset: e.pos.offset,
                        target: Target::Drafts,
                        records: Records::Drafts(drafts.clone()),
                        headers,
                    });
                }
                Outcome::DeadLetter {
                    code,
                    detail,
                    field,
                } => {
                    // The original headers first, then the reason and where the message came from.
                    let mut headers: Vec<(String, Vec<u8>)> = e
                        .msg
                        .headers()
                        .map(|hs| {
                            hs.iter()
                                .map(|h| (h.key.to_string(), h.value.unwrap_or_default().to_vec()))
                                .collect()
                        })
                        .unwrap_or_default();
                    headers.push((header::DLQ_REASON.into(), code.as_bytes().to_vec()));
                    headers.push((header::DLQ_DETAIL.into(), detail.as_bytes().to_vec()));
                    headers.extend(source.iter().map(|(k, v)| (k.to_string(), v.clone())));
                    if let Some(f) = field {
                        headers.push((header::DLQ_FIELD.into(), f.as_bytes().to_vec()));
                    }
                    entries.push(OutboxEntry {
                        source_offset: e.pos.offset,
                        target: Target::DeadLetters,
                        records: Records::Raw {
                            keys: vec![e.msg.key().map(<[u8]>::to_vec)],
                            payloads: vec![e.msg.payload().map(<[u8]>::to_vec)],
                        },
                        headers,
                    });
                }
                Outcome::Skip { .. } => {}
            }
        }
        (rows, entries)
    }
}

/// Evaluates messages from the front of `rest` until it is empty or the group holds at least
/// `batch_max_drafts` drafts. Runs on a blocking thread: rules calls are synchronous.
fn evaluate_group(
    w: &mut Worker,
    rest: &mut VecDeque<OwnedMessage>,
    snapshot: &Snapshot,
    clock: &dyn Clock,
    cfg: &PipelineConfig,
) -> Vec<Evaluated> {
    let mut group = Vec::new();
    let mut drafts = 0;
    while drafts < cfg.batch_max_drafts {
        let Some(msg) = rest.pop_front() else { break };
        let pos = SourcePos {
            topic: msg.topic().to_string(),
            partition: msg.partition(),
            offset: msg.offset(),
        };
        let outcome = evaluate_one(w, &msg, snapshot, clock, cfg);
        if let Outcome::Deliver { drafts: d, .. } = &outcome {
            drafts += d.len();
        }
        group.push(Evaluated { msg, pos, outcome });
    }
    group
}

fn dead_letter(code: &str, detail: String, field: Option<String>) -> Outcome {
    Outcome::DeadLetter {
        code: code.to_string(),
        detail,
        field,
    }
}

fn evaluate_one(
    w: &mut Worker,
    msg: &OwnedMessage,
    snapshot: &Snapshot,
    clock: &dyn Clock,
    cfg: &PipelineConfig,
) -> Outcome {
    let Some(payload) = msg.payload() else {
        return dead_letter("missing_value", "the message has no value".into(), None);
    };
    if payload.len() > cfg.max_message_bytes {
        return dead_letter(
            "oversized",
            format!(
                "the value is {} bytes; the limit is {}",
                payload.len(),
                cfg.max_message_bytes
            ),
            None,
        );
    }
    let now = clock.now();
    let verdict = match w.evaluator.validate(payload, now) {
        Err(e) => return dead_letter(e.code(), e.to_string(), None),
        Ok(Err(r)) => return dead_letter(r.code.as_str(), r.detail, r.field),
        Ok(Ok(v)) => v,
    };
    let campaign_id = verdict.campaign.adv_campaign_id.clone();
    match verdict.activity {
        Activity::NotStarted => {
            return Outcome::Skip {
                reason: SkipReason::NotStarted,
                campaign_id,
            }
        }
        Activity::Expired => {
            return Outcome::Skip {
                reason: SkipReason::Expired,
                campaign_id,
            }
        }
        Activity::Active => {}
    }
    snapshot.clients_into(&verdict.campaign.restaurant_id, &mut w.clients);
    if w.clients.is_empty() {
        return Outcome::Skip {
            reason: SkipReason::NoSubscribers,
            campaign_id,
        };
    }
    let drafts = match w.evaluator.shape(&verdict.campaign, &w.clients, now) {
        Ok(d) => d,
        Err(e) => return dead_letter(e.code(), e.to_string(), None),
    };
    // The feedback table's column is int4: refuse loudly rather than wrap (January 2038).
    match i32::try_from(drafts.trigger_datetime_created) {
        Ok(trigger) => Outcome::Deliver {
            drafts: Arc::new(drafts),
            trigger,
        },
        Err(_) => {
            tracing::error!(
                trigger_datetime_created = drafts.trigger_datetime_created,
                "trigger_datetime_created does not fit subscribers_feedback's int4 column; the campaign is dead-lettered. Widen the column to int8."
            );
            dead_letter(
                "trigger_time_out_of_range",
                format!(
                    "trigger_datetime_created {} does not fit the int4 column subscribers_feedback.trigger_datetime_created",
                    drafts.trigger_datetime_created
                ),
                Some("trigger_datetime_created".into()),
            )
        }
    }
}
