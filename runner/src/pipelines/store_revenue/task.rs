//! The store-revenue loop: consume sales, validate them in the rules component (a batch per
//! call), count them into each partition's pending sums against the partition's watermark, and
//! at every trigger make the state durable and the results visible.
//!
//! A trigger, for each partition this runner holds that changed:
//! 1. one PostgreSQL transaction (`state.rs`): the fence, the sums into
//!    `store_revenue_windows`, the partition's position and watermark, its dead letters into
//!    the outbox; the lowest partition held also makes final the windows every partition's
//!    watermark has passed, their records into its outbox;
//! 2. one Kafka transaction per partition with outbox entries (or a moved position): the
//!    entries, and the partition's offset with the greatest outbox id published as the offset's
//!    metadata. That metadata is how whoever takes the partition over knows which entries
//!    Kafka has: those after it are published again, those up to it deleted.
//!
//! PostgreSQL holds the input position: a partition taken over resumes at the offset its last
//! transaction committed, with the sums and watermark of that same transaction. Nothing is
//! counted twice (the sums and the position commit together), nothing is lost (a message's sum
//! or dead letter is committed before its offset is passed), and Kafka gets each final window
//! and dead letter once (the outbox and the offset metadata).

use super::config::StoreRevenueConfig;
use super::console::Console;
use super::contract::{PackedPayloads, SalesEvaluator};
use super::state::{
    Finalize, OutboxEntry, PartitionWrite, State, StateError, Target, WindowRow, Written,
};
use super::windows::{Counted, PartitionTime, Pending, WindowSpec};
use crate::clock::Clock;
use crate::delivery::{OutRecord, TxError, TxProducer};
use crate::events::{Events, PartitionTimeStats, WindowStats};
use crate::headers::{self, HeaderList};
use crate::retry::{stopped, Abandoned, Backoff};
use crate::source::{RebalanceEvent, Rebalances, SourceConsumer};
use rdkafka::consumer::{CommitMode, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{Message, OwnedMessage};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// Kafka transactions wait this long for the broker.
const TX_TIMEOUT: Duration = Duration::from_secs(10);
/// Outbox entries published in one Kafka transaction, at most.
const PUBLISH_CHUNK: i64 = 10_000;
/// The input topic's partition count is looked up again this often.
const PARTITIONS_REFRESH: Duration = Duration::from_secs(30);
/// The prefix of the offset metadata that records the last outbox id published.
const METADATA_PREFIX: &str = "store-revenue-outbox:";

/// The pipeline's Kafka side.
pub struct Kafka {
    pub consumer: Arc<SourceConsumer>,
    pub rebalances: Arc<Rebalances>,
    pub producer: ClientConfig,
    /// `transactional.id` = this + "-" + partition.
    pub transactional_prefix: String,
    /// Also commit each offset the plain way after its transaction (librdkafka's mock cluster
    /// does not store transactional offset commits).
    pub plain_offset_commits: bool,
}

/// A partition this runner holds.
struct Owned {
    epoch: i64,
    producer: TxProducer,
    /// The next offset to count (in memory).
    next_offset: i64,
    time: PartitionTime,
    /// What the last committed transaction left.
    committed_offset: i64,
    committed_time: PartitionTime,
    pending: Pending,
    dead_letters: Vec<(&'static str, OutboxEntry)>,
    /// Sales counted since the last commit.
    counted: u64,
    /// The greatest outbox id Kafka has (deleted from the outbox by the next transaction).
    published_through: i64,
    /// Outbox entries may wait after `published_through`.
    unpublished: bool,
    /// The offset Kafka has for the partition.
    kafka_offset: Option<i64>,
    /// The consumer reached the end of the partition and nothing came since.
    caught_up: bool,
    last_message: Instant,
    idle: bool,
}

/// The loop's state.
pub struct Revenue {
    cfg: StoreRevenueConfig,
    spec: WindowSpec,
    kafka: Kafka,
    evaluator: Option<SalesEvaluator>,
    packed: Option<PackedPayloads>,
    /// One connection per partition committed at the same time (`parallel_commits`).
    states: Vec<State>,
    owned: BTreeMap<i32, Owned>,
    /// Partitions whose producer was lost: taken over again while assigned to this runner.
    lost: BTreeSet<i32>,
    instance_id: String,
    events: Arc<Events>,
    clock: Arc<dyn Clock>,
    partitions: Option<(i32, Instant)>,
    console: Option<Console>,
    stats: WindowStats,
}

impl std::fmt::Debug for Kafka {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Kafka")
            .field("transactional_prefix", &self.transactional_prefix)
            .finish_non_exhaustive()
    }
}

impl std::fmt::Debug for Revenue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Revenue")
            .field("cfg", &self.cfg)
            .finish_non_exhaustive()
    }
}

/// A message's fate before its sale is counted.
enum Pre {
    /// Packed for the rules (verdicts come in packing order).
    Rules,
    DeadLetter(&'static str, String),
}

impl Revenue {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        cfg: StoreRevenueConfig,
        kafka: Kafka,
        evaluator: SalesEvaluator,
        states: Vec<State>,
        instance_id: String,
        events: Arc<Events>,
        clock: Arc<dyn Clock>,
        console: Option<Console>,
    ) -> Revenue {
        Revenue {
            spec: WindowSpec {
                size: cfg.window_secs,
                lateness: cfg.lateness_secs,
            },
            cfg,
            kafka,
            evaluator: Some(evaluator),
            packed: Some(PackedPayloads::default()),
            states,
            owned: BTreeMap::new(),
            lost: BTreeSet::new(),
            instance_id,
            events,
            clock,
            partitions: None,
            console,
            stats: WindowStats::default(),
        }
    }

    /// Runs until `shutdown`, then commits and publishes what is pending (unless `hard_stop`
    /// fires first: it is then counted again by whoever takes the partitions over).
    pub async fn run(
        mut self,
        mut shutdown: watch::Receiver<bool>,
        hard_stop: watch::Receiver<bool>,
    ) {
        self.events.running(true);
        let mut trigger = tokio::time::interval(self.cfg.trigger);
        trigger.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let consumer = self.kafka.consumer.clone();
        let rebalances = self.kafka.rebalances.clone();
        loop {
            if *shutdown.borrow() {
                break;
            }
            let r = async {
                self.apply_rebalances(&hard_stop).await?;
                self.retake_lost(&hard_stop).await
            }
            .await;
            if r.is_err() {
                break;
            }
            tokio::select! {
                biased;
                _ = stopped(&mut shutdown) => break,
                _ = rebalances.notify.notified() => continue,
                _ = trigger.tick() => {
                    if self.trigger(&hard_stop).await.is_err() {
                        break;
                    }
                }
                m = consumer.recv() => {
                    let (batch, ends) = match m {
                        Ok(m) => self.fill_batch(m.detach()),
                        Err(e) => {
                            self.consumer_error(e).await;
                            continue;
                        }
                    };
                    if self.count(batch, &hard_stop).await.is_err() {
                        break;
                    }
                    for p in ends {
                        if let Some(o) = self.owned.get_mut(&p) {
                            o.caught_up = true;
                        }
                    }
                    let waiting = self.owned.values().map(|o| o.dead_letters.len()).max();
                    if waiting.unwrap_or(0) >= self.cfg.max_pending_dead_letters
                        && self.trigger(&hard_stop).await.is_err()
                    {
                        break;
                    }
                }
            }
        }
        if !*hard_stop.borrow() {
            // What was counted is committed and published before the runner stops.
            if self.trigger(&hard_stop).await.is_err() {
                tracing::warn!(pipeline = self.events.pipeline(), "Stopping hard: what was counted since the last trigger is counted again by whoever takes the partitions over.");
            }
        }
        tracing::info!(pipeline = self.events.pipeline(), "Pipeline drained.");
        self.events.running(false);
    }

    async fn consumer_error(&mut self, e: KafkaError) {
        if let KafkaError::PartitionEOF(p) = e {
            if let Some(o) = self.owned.get_mut(&p) {
                o.caught_up = true;
            }
            return;
        }
        tracing::warn!(pipeline = self.events.pipeline(), error = %e, "Kafka consumer error.");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    /// Every message already fetched, after the first, up to `batch_max_messages`, and the
    /// partitions whose end was reached after their last message in the batch.
    fn fill_batch(&mut self, first: OwnedMessage) -> (Vec<OwnedMessage>, BTreeSet<i32>) {
        use futures::FutureExt;
        let mut ends = BTreeSet::new();
        let mut batch = vec![first];
        while batch.len() < self.cfg.batch_max_messages {
            match self.kafka.consumer.recv().now_or_never() {
                Some(Ok(m)) => {
                    ends.remove(&m.partition());
                    batch.push(m.detach());
                }
                Some(Err(KafkaError::PartitionEOF(p))) => {
                    ends.insert(p);
                }
                Some(Err(e)) => {
                    tracing::warn!(pipeline = self.events.pipeline(), error = %e, "Kafka consumer error.");
                    break;
                }
                None => break,
            }
        }
        (batch, ends)
    }

    async fn apply_rebalances(&mut self, stop: &watch::Receiver<bool>) -> Result<(), Abandoned> {
        let events = self.kafka.rebalances.take();
        for event in events {
            match event {
                RebalanceEvent::Revoked(parts) => {
                    self.events.assignment(None);
                    for (_, p) in parts {
                        // What it counted since the last trigger is counted again by the next
                        // owner, from the committed position.
                        self.owned.remove(&p);
                        let _ = self
                            .events
                            .metrics()
                            .watermark
                            .remove_label_values(&[self.events.pipeline(), &p.to_string()]);
                    }
                }
                RebalanceEvent::Assigned(parts) => {
                    for (topic, p) in parts {
                        if topic == self.cfg.input_topic && !self.owned.contains_key(&p) {
                            self.recover(p, stop.clone()).await?;
                        }
                    }
                    self.events.assignment(Some(self.owned.len()));
                }
            }
        }
        Ok(())
    }

    async fn retake_lost(&mut self, stop: &watch::Receiver<bool>) -> Result<(), Abandoned> {
        if self.lost.is_empty() {
            return Ok(());
        }
        let assigned: BTreeSet<i32> = self
            .kafka
            .consumer
            .assignment()
            .map(|tpl| tpl.elements().iter().map(|e| e.partition()).collect())
            .unwrap_or_default();
        for p in std::mem::take(&mut self.lost) {
            if assigned.contains(&p) && !self.owned.contains_key(&p) {
                tracing::warn!(
                    pipeline = self.events.pipeline(),
                    partition = p,
                    "Taking the partition over again: its producer was given up."
                );
                self.recover(p, stop.clone()).await?;
            }
        }
        Ok(())
    }

    /// Takes a partition over: a transactional producer of its own (fencing any earlier one),
    /// a new fence epoch in PostgreSQL with the committed position and watermark, the outbox
    /// entries Kafka lacks published, and the consumer moved to the committed position.
    async fn recover(&mut self, p: i32, mut stop: watch::Receiver<bool>) -> Result<(), Abandoned> {
        let topic = self.cfg.input_topic.clone();
        let tx_id = format!("{}-{p}", self.kafka.transactional_prefix);
        let mut backoff = Backoff::new(self.cfg.sink_retry_max_backoff);
        let producer = loop {
            match TxProducer::create(&self.kafka.producer, &tx_id, TX_TIMEOUT).await {
                Ok(pr) => break pr,
                Err(e) => {
                    backoff
                        .wait(&mut stop, |a, pause| {
                            self.events.sink_retry("kafka", &e, a, pause)
                        })
                        .await?
                }
            }
        };
        let (kafka_offset, published) = self.committed(p, &mut stop).await?;
        let mut backoff = Backoff::new(self.cfg.sink_retry_max_backoff);
        let claimed = loop {
            match self.states[0]
                .claim(&topic, p, kafka_offset.unwrap_or(0), &self.instance_id)
                .await
            {
                Ok(c) => break c,
                Err(e) => {
                    self.states[0].reset();
                    backoff
                        .wait(&mut stop, |a, pause| {
                            self.events.sink_retry("postgres", &e, a, pause)
                        })
                        .await?
                }
            }
        };
        let mut owned = Owned {
            epoch: claimed.epoch,
            producer,
            next_offset: claimed.next_offset,
            time: claimed.time,
            committed_offset: claimed.next_offset,
            committed_time: claimed.time,
            pending: Pending::default(),
            dead_letters: Vec::new(),
            counted: 0,
            published_through: published.unwrap_or(0),
            unpublished: true,
            // A partition never counted has nothing for Kafka to catch up on.
            kafka_offset: kafka_offset.or((claimed.next_offset == 0).then_some(0)),
            caught_up: false,
            last_message: Instant::now(),
            idle: false,
        };
        let mut state = std::mem::take(&mut self.states);
        let flight = self
            .ctx()
            .publish(&mut state[0], p, &mut owned, &mut stop)
            .await;
        self.states = state;
        match flight? {
            Flight::Published => {}
            Flight::Fenced => return Ok(()),
            Flight::Lost => {
                self.lost.insert(p);
                return Ok(());
            }
        }
        // Kafka answered the new producer: whatever made it fail before is over.
        self.events.sink_recovered("kafka");
        self.seek(p, owned.next_offset).await;
        tracing::info!(
            pipeline = self.events.pipeline(),
            topic,
            partition = p,
            epoch = owned.epoch,
            next_offset = owned.next_offset,
            watermark = ?owned.time.watermark,
            "Partition taken over."
        );
        self.owned.insert(p, owned);
        Ok(())
    }

    /// The group's committed offset of the partition and the outbox id recorded with it.
    async fn committed(
        &self,
        p: i32,
        stop: &mut watch::Receiver<bool>,
    ) -> Result<(Option<i64>, Option<i64>), Abandoned> {
        let mut backoff = Backoff::new(self.cfg.sink_retry_max_backoff);
        loop {
            let consumer = self.kafka.consumer.clone();
            let mut tpl = TopicPartitionList::new();
            tpl.add_partition(&self.cfg.input_topic, p);
            let r = tokio::task::spawn_blocking(move || {
                consumer.committed_offsets(tpl, Duration::from_secs(10))
            })
            .await;
            let error = match r {
                Ok(Ok(tpl)) => match tpl.elements().into_iter().next() {
                    Some(e) => match (e.error(), e.offset()) {
                        (Err(err), _) => err.to_string(),
                        (Ok(()), Offset::Offset(o)) => {
                            let id = e
                                .metadata()
                                .strip_prefix(METADATA_PREFIX)
                                .and_then(|s| s.parse().ok());
                            return Ok((Some(o), id));
                        }
                        (Ok(()), _) => return Ok((None, None)),
                    },
                    None => return Ok((None, None)),
                },
                Ok(Err(e)) => e.to_string(),
                Err(e) => e.to_string(),
            };
            backoff
                .wait(stop, |attempt, pause| {
                    tracing::warn!(error, partition = p, attempt, backoff_ms = pause.as_millis() as u64, "Cannot read the committed offset of a partition being taken over; retrying.")
                })
                .await?;
        }
    }

    async fn seek(&self, p: i32, offset: i64) {
        let consumer = self.kafka.consumer.clone();
        let topic = self.cfg.input_topic.clone();
        let r = tokio::task::spawn_blocking(move || {
            consumer.seek(&topic, p, Offset::Offset(offset), Duration::from_secs(5))
        })
        .await;
        if let Ok(Err(e)) = r {
            // Not fatal: messages before `offset` are skipped anyway.
            tracing::debug!(error = %e, partition = p, offset, "Seek after recovery failed.");
        }
    }

    /// Validates a batch in the rules component and counts each partition's sales, in offset
    /// order, against the partition's watermark.
    async fn count(
        &mut self,
        batch: Vec<OwnedMessage>,
        stop: &watch::Receiver<bool>,
    ) -> Result<(), Abandoned> {
        self.apply_rebalances(stop).await?;
        self.events.received(batch.len());
        let batch: Vec<OwnedMessage> = batch
            .into_iter()
            .filter(|m| {
                self.owned
                    .get(&m.partition())
                    .is_some_and(|o| m.offset() >= o.next_offset)
            })
            .collect();
        if batch.is_empty() {
            return Ok(());
        }
        let mut packed = self.packed.take().unwrap_or_default();
        packed.clear();
        let mut pre = Vec::with_capacity(batch.len());
        for m in &batch {
            pre.push(match m.payload() {
                None => Pre::DeadLetter("missing_value", "the message has no value".into()),
                Some(v) if v.len() > self.cfg.max_message_bytes => Pre::DeadLetter(
                    "oversized",
                    format!(
                        "the value is {} bytes; the limit is {}",
                        v.len(),
                        self.cfg.max_message_bytes
                    ),
                ),
                Some(v) => {
                    packed.push(v);
                    Pre::Rules
                }
            });
        }
        let mut evaluator = self.evaluator.take().expect("present between batches");
        let digits = self.cfg.minor_digits;
        let (evaluator, packed, verdicts) = tokio::task::spawn_blocking(move || {
            evaluator.refresh();
            let verdicts = validate(&mut evaluator, &packed, digits);
            (evaluator, packed, verdicts)
        })
        .await
        .expect("rules evaluation does not panic");
        let rules = evaluator.identity().clone();
        self.evaluator = Some(evaluator);
        self.packed = Some(packed);
        let mut verdicts = verdicts.into_iter();
        let now = Instant::now();
        for (m, pre) in batch.into_iter().zip(pre) {
            let Some(o) = self.owned.get_mut(&m.partition()) else {
                continue;
            };
            if m.offset() < o.next_offset {
                continue;
            }
            o.next_offset = m.offset() + 1;
            o.caught_up = false;
            o.idle = false;
            o.last_message = now;
            let dead = match pre {
                Pre::DeadLetter(code, detail) => Some((code, detail, None, Vec::new())),
                Pre::Rules => match verdicts.next().expect("a verdict per packed message") {
                    Verdict::Rejected { code, field, detail } => {
                        Some((code, detail, field, Vec::new()))
                    }
                    // A PostgreSQL text column cannot hold the NUL character (SQLSTATE 22021):
                    // such a store is refused here, alone, rather than by the partition's
                    // transaction with everyone else's sums.
                    Verdict::Sale { store, .. } if store.contains('\0') => Some((
                        "sink_refused",
                        "PostgreSQL refused this sale's store: SQLSTATE 22021: a text value cannot hold the NUL character"
                            .to_string(),
                        Some("store".into()),
                        Vec::new(),
                    )),
                    Verdict::Sale {
                        store,
                        amount_minor,
                        event_time,
                    } => match o.pending.add(&mut o.time, &self.spec, store, amount_minor, event_time) {
                        Counted::Added => {
                            o.counted += 1;
                            None
                        }
                        Counted::Late(late) => Some((
                            "late",
                            format!(
                                "event time {} is in the window [{}, {}), closed for partition {}: its watermark is {}",
                                rfc3339(event_time),
                                rfc3339(late.window_start),
                                rfc3339(late.window_end),
                                m.partition(),
                                rfc3339(late.watermark)
                            ),
                            None,
                            vec![
                                ("window-start", rfc3339(late.window_start)),
                                ("window-end", rfc3339(late.window_end)),
                                ("watermark", rfc3339(late.watermark)),
                            ],
                        )),
                        Counted::Overflow => Some((
                            "out_of_range",
                            "the window's revenue would exceed 64 bits of minor units".into(),
                            Some("price".into()),
                            Vec::new(),
                        )),
                    },
                },
            };
            if let Some((code, detail, field, extra)) = dead {
                let entry = dead_letter(&m, code, &detail, field.as_deref(), &extra, &rules);
                o.dead_letters.push((code, entry));
            }
        }
        Ok(())
    }

    /// The input topic's partition count (looked up every `PARTITIONS_REFRESH`).
    async fn partition_count(&mut self) -> Option<i32> {
        if let Some((n, at)) = self.partitions {
            if at.elapsed() < PARTITIONS_REFRESH {
                return Some(n);
            }
        }
        let consumer = self.kafka.consumer.clone();
        let topic = self.cfg.input_topic.clone();
        let n = tokio::task::spawn_blocking(move || {
            consumer
                .fetch_metadata(Some(&topic), Duration::from_secs(5))
                .ok()
                .and_then(|md| {
                    md.topics()
                        .iter()
                        .find(|t| t.name() == topic && t.error().is_none())
                        .map(|t| t.partitions().len() as i32)
                })
        })
        .await
        .ok()
        .flatten()
        .filter(|n| *n > 0);
        match n {
            Some(n) => {
                self.partitions = Some((n, Instant::now()));
                Some(n)
            }
            None => self.partitions.map(|(n, _)| n),
        }
    }

    /// Commits every changed partition's state, makes final what the watermarks allow,
    /// publishes the outboxes, prints the table. Partitions are committed and published at the
    /// same time, each on a connection of its own (up to `parallel_commits`); the partition that
    /// makes windows final goes last, so that it sees the others' new watermarks.
    async fn trigger(&mut self, stop: &watch::Receiver<bool>) -> Result<(), Abandoned> {
        let now = self.clock.now();
        for o in self.owned.values_mut() {
            if o.caught_up && o.last_message.elapsed() >= self.cfg.idle_after {
                o.idle = true;
                o.time.idle(now, &self.spec);
            }
        }
        let partitions = if self.owned.is_empty() {
            None
        } else {
            self.partition_count().await
        };
        let finalizer = self.owned.keys().next().copied();
        let dirty: Vec<i32> = self
            .owned
            .iter()
            .filter(|(p, o)| {
                Some(**p) != finalizer
                    && (!o.pending.is_empty()
                        || !o.dead_letters.is_empty()
                        || o.next_offset != o.committed_offset
                        || o.time != o.committed_time)
            })
            .map(|(p, _)| *p)
            .collect();
        let mut changed: BTreeMap<(String, i64), WindowRow> = BTreeMap::new();
        let mut rounds: Vec<Vec<(i32, Option<Finalize>)>> = dirty
            .chunks(self.states.len())
            .map(|c| c.iter().map(|p| (*p, None)).collect())
            .collect();
        if let Some(f) = finalizer {
            rounds.push(vec![(f, partitions.map(|n| Finalize { partitions: n }))]);
        }
        for round in rounds {
            for (_, finalize, written) in self.commit(&round, stop).await? {
                let Some(written) = written else { continue };
                if finalize.is_some() {
                    self.stats.global_watermark = written.global_watermark;
                }
                self.stats.windows_updated += written.updated.len() as u64;
                self.stats.windows_final += written.finalized.len() as u64;
                let m = self.events.metrics();
                let labels = [self.events.pipeline()];
                m.windows_updated
                    .with_label_values(&labels)
                    .inc_by(written.updated.len() as u64);
                m.windows_final
                    .with_label_values(&labels)
                    .inc_by(written.finalized.len() as u64);
                for r in written.updated.into_iter().chain(written.finalized) {
                    changed.insert((r.store.clone(), r.window_start), r);
                }
            }
        }
        self.publish_all(stop).await?;
        self.report();
        if let Some(console) = self.console.as_ref().filter(|_| !changed.is_empty()) {
            console.print(now, self.stats.global_watermark, changed.values());
        }
        Ok(())
    }

    /// The transactions of `round`'s partitions, at the same time, each retried while
    /// PostgreSQL fails; the outcome of each (None: fenced, the partition is dropped).
    async fn commit(
        &mut self,
        round: &[(i32, Option<Finalize>)],
        stop: &watch::Receiver<bool>,
    ) -> Result<Vec<(i32, Option<Finalize>, Option<Written>)>, Abandoned> {
        let topic = self.cfg.input_topic.clone();
        let (window_secs, digits) = (self.cfg.window_secs, self.cfg.minor_digits);
        let record = move |r: &WindowRow| final_record(r, window_secs, digits);
        let started = Instant::now();
        let mut states = std::mem::take(&mut self.states);
        let outcomes = {
            let owned = &self.owned;
            let events = &*self.events;
            let max_backoff = self.cfg.sink_retry_max_backoff;
            let entries: Vec<Vec<OutboxEntry>> = round
                .iter()
                .map(|(p, _)| {
                    owned[p]
                        .dead_letters
                        .iter()
                        .map(|(_, e)| e.clone())
                        .collect()
                })
                .collect();
            let writes = round.iter().zip(&entries).map(|((p, finalize), entries)| {
                let o = &owned[p];
                (
                    PartitionWrite {
                        topic: &topic,
                        partition: *p,
                        epoch: o.epoch,
                        next_offset: o.next_offset,
                        time: o.time,
                        from_offset: o.committed_offset,
                        deltas: &o.pending.deltas,
                        outbox: entries,
                        published_through: (o.published_through > 0).then_some(o.published_through),
                    },
                    *finalize,
                )
            });
            let record = &record;
            futures::future::join_all(writes.zip(states.iter_mut()).map(
                |((w, finalize), state)| {
                    let mut stop = stop.clone();
                    async move {
                        let mut backoff = Backoff::new(max_backoff);
                        loop {
                            match state.write(&w, finalize, record).await {
                                Ok(written) => return Ok(Some(written)),
                                Err(StateError::Fenced(..)) => return Ok(None),
                                Err(StateError::Db(e)) => {
                                    state.reset();
                                    if e.class() == crate::db::FailureClass::Transient {
                                        backoff
                                            .wait(&mut stop, |a, pause| {
                                                events.sink_retry("postgres", &e, a, pause)
                                            })
                                            .await?;
                                    } else {
                                        // The sums of many sales in one row: a refusal cannot be
                                        // pinned on one message (a store PostgreSQL cannot
                                        // store is dead-lettered before it is counted), so an
                                        // operator must act; the partition waits for that.
                                        events.sink_blocked("postgres", &e, e.sqlstate());
                                        backoff.wait(&mut stop, |_, _| {}).await?;
                                    }
                                }
                            }
                        }
                    }
                },
            ))
            .await
        };
        self.states = states;
        let mut out = Vec::with_capacity(round.len());
        for ((p, finalize), outcome) in round.iter().zip(outcomes) {
            let written = outcome?;
            match &written {
                Some(w) => self.durable(*p, w, started),
                None => {
                    self.events.fenced(&topic, *p, "postgres");
                    self.owned.remove(p);
                }
            }
            out.push((*p, *finalize, written));
        }
        Ok(out)
    }

    /// A partition's transaction committed: what it held is durable.
    fn durable(&mut self, p: i32, written: &Written, started: Instant) {
        let Some(o) = self.owned.get_mut(&p) else {
            return;
        };
        let messages = (o.next_offset - o.committed_offset).max(0) as u64;
        o.committed_offset = o.next_offset;
        o.committed_time = o.time;
        o.pending = Pending::default();
        let dead = std::mem::take(&mut o.dead_letters);
        o.unpublished |= !dead.is_empty() || !written.finalized.is_empty();
        let counted = std::mem::take(&mut o.counted);
        self.events
            .delivered_many(counted, written.finalized.len() as u64);
        let mut by_code: BTreeMap<&'static str, (u64, String)> = BTreeMap::new();
        for (code, e) in &dead {
            let slot = by_code.entry(code).or_insert_with(|| (0, String::new()));
            slot.0 += 1;
            if slot.1.is_empty() {
                slot.1 = e
                    .headers
                    .iter()
                    .find(|(k, _)| k == headers::DLQ_DETAIL)
                    .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
                    .unwrap_or_default();
            }
        }
        for (code, (n, example)) in by_code {
            if code == "late" {
                self.stats.late += n;
            }
            self.events.dead_lettered_many(code, n, &example);
        }
        self.events.batch_committed(
            messages as usize,
            written.finalized.len(),
            started.elapsed(),
        );
        for r in written.updated.iter().filter(|r| r.final_) {
            tracing::error!(pipeline = self.events.pipeline(), store = %r.store, window_start = r.window_start, "Sales were added to a window already final; its published total is short of them.");
        }
    }

    /// Publishes every partition that has outbox entries waiting or a position Kafka lacks, at
    /// the same time (each partition has its own producer).
    async fn publish_all(&mut self, stop: &watch::Receiver<bool>) -> Result<(), Abandoned> {
        let due: Vec<i32> = self
            .owned
            .iter()
            .filter(|(_, o)| o.unpublished || o.kafka_offset != Some(o.committed_offset))
            .map(|(p, _)| *p)
            .collect();
        for chunk in due.chunks(self.states.len()) {
            let mut taken: Vec<(i32, Owned)> = chunk
                .iter()
                .filter_map(|p| self.owned.remove(p).map(|o| (*p, o)))
                .collect();
            let mut states = std::mem::take(&mut self.states);
            let flights = {
                let ctx = self.ctx();
                futures::future::join_all(taken.iter_mut().zip(states.iter_mut()).map(
                    |((p, o), state)| {
                        let mut stop = stop.clone();
                        async move { ctx.publish(state, *p, o, &mut stop).await }
                    },
                ))
                .await
            };
            self.states = states;
            for ((p, o), flight) in taken.into_iter().zip(flights) {
                match flight? {
                    Flight::Published => {
                        self.owned.insert(p, o);
                    }
                    Flight::Fenced => {}
                    Flight::Lost => {
                        self.lost.insert(p);
                    }
                }
            }
        }
        Ok(())
    }

    fn ctx(&self) -> Ctx<'_> {
        Ctx {
            cfg: &self.cfg,
            kafka: &self.kafka,
            events: &self.events,
        }
    }

    fn report(&mut self) {
        let m = self.events.metrics();
        let pipeline = self.events.pipeline();
        for (p, o) in &self.owned {
            if let Some(w) = o.committed_time.watermark {
                m.watermark
                    .with_label_values(&[pipeline, &p.to_string()])
                    .set(w);
            }
        }
        if let Some(w) = self.stats.global_watermark {
            m.topic_watermark.with_label_values(&[pipeline]).set(w);
        }
        self.stats.partitions = self
            .owned
            .iter()
            .map(|(p, o)| {
                (
                    *p,
                    PartitionTimeStats {
                        watermark: o.committed_time.watermark,
                        max_event_time: o.committed_time.max_event_time,
                        next_offset: o.committed_offset,
                        idle: o.idle,
                    },
                )
            })
            .collect();
        self.events.set_windows(self.stats.clone());
    }
}

/// What publishing needs of the loop, shared by partitions published at the same time.
#[derive(Clone, Copy)]
struct Ctx<'a> {
    cfg: &'a StoreRevenueConfig,
    kafka: &'a Kafka,
    events: &'a Events,
}

impl Ctx<'_> {
    /// Publishes the partition's outbox entries after `published_through` with its committed
    /// offset, in Kafka transactions of at most `PUBLISH_CHUNK` entries; then deletes them.
    async fn publish(
        &self,
        state: &mut State,
        p: i32,
        o: &mut Owned,
        stop: &mut watch::Receiver<bool>,
    ) -> Result<Flight, Abandoned> {
        let topic = &self.cfg.input_topic;
        loop {
            let mut backoff = Backoff::new(self.cfg.sink_retry_max_backoff);
            let entries = loop {
                match state
                    .load_outbox(topic, p, o.published_through, PUBLISH_CHUNK)
                    .await
                {
                    Ok(e) => break e,
                    Err(e) => {
                        state.reset();
                        backoff
                            .wait(stop, |a, pause| {
                                self.events.sink_retry("postgres", &e, a, pause)
                            })
                            .await?
                    }
                }
            };
            let through = entries.last().map_or(o.published_through, |(id, _)| *id);
            if entries.is_empty() && o.kafka_offset == Some(o.committed_offset) {
                o.unpublished = false;
                return Ok(Flight::Published);
            }
            let flight = self.transaction(p, o, &entries, through, stop).await?;
            if flight != Flight::Published {
                return Ok(flight);
            }
            o.kafka_offset = Some(o.committed_offset);
            if through > o.published_through {
                o.published_through = through;
                // Deleted now, or by the partition's next transaction.
                if state
                    .delete_outbox(topic, p, o.epoch, through)
                    .await
                    .is_err()
                {
                    state.reset();
                }
            }
            if (entries.len() as i64) < PUBLISH_CHUNK {
                o.unpublished = false;
                return Ok(Flight::Published);
            }
        }
    }
    /// One Kafka transaction: `entries` and the partition's offset, with `through` as its
    /// metadata; aborted transactions are tried again.
    async fn transaction(
        &self,
        p: i32,
        o: &Owned,
        entries: &[(i64, OutboxEntry)],
        through: i64,
        stop: &mut watch::Receiver<bool>,
    ) -> Result<Flight, Abandoned> {
        let topic = &self.cfg.input_topic;
        let hs: Vec<rdkafka::message::OwnedHeaders> = entries
            .iter()
            .map(|(_, e)| headers::owned(e.headers.iter().map(|(k, v)| (k.as_str(), v.as_slice()))))
            .collect();
        let records: Vec<OutRecord<'_>> = entries
            .iter()
            .zip(&hs)
            .map(|((_, e), h)| OutRecord {
                topic: match e.target {
                    Target::Output => &self.cfg.output_topic,
                    Target::DeadLetters => &self.cfg.dead_letter_topic,
                },
                key: e.key.as_deref(),
                payload: e.value.as_deref(),
                headers: h,
            })
            .collect();
        let metadata = format!("{METADATA_PREFIX}{through}");
        let mut backoff = Backoff::new(self.cfg.sink_retry_max_backoff);
        loop {
            let mut offsets = TopicPartitionList::new();
            if offsets
                .add_partition_offset(topic, p, Offset::Offset(o.committed_offset))
                .is_err()
            {
                return Err(Abandoned);
            }
            if let Some(mut e) = offsets.find_partition(topic, p) {
                e.set_metadata(metadata.as_str());
            }
            let Some(group) = self.kafka.consumer.group_metadata() else {
                tracing::error!(
                    "The consumer has no group metadata; cannot commit offsets in a transaction."
                );
                return Err(Abandoned);
            };
            match o.producer.publish(&records, offsets.clone(), group).await {
                Ok(_) => {
                    if self.kafka.plain_offset_commits {
                        let consumer = self.kafka.consumer.clone();
                        let _ = tokio::task::spawn_blocking(move || {
                            consumer.commit(&offsets, CommitMode::Sync)
                        })
                        .await;
                    }
                    return Ok(Flight::Published);
                }
                Err(TxError::Fenced(e)) => {
                    tracing::warn!(error = %e, partition = p, "The Kafka transaction was fenced.");
                    self.events.fenced(topic, p, "kafka");
                    return Ok(Flight::Fenced);
                }
                Err(e @ TxError::Stuck(..)) => {
                    self.events.producer_lost(topic, p, &e);
                    return Ok(Flight::Lost);
                }
                Err(TxError::Retry(e)) => {
                    backoff
                        .wait(stop, |a, pause| {
                            self.events.sink_retry("kafka", &e, a, pause)
                        })
                        .await?;
                }
            }
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Flight {
    Published,
    Fenced,
    Lost,
}

/// What the rules made of one packed message.
enum Verdict {
    Sale {
        store: String,
        amount_minor: i64,
        event_time: i64,
    },
    Rejected {
        code: &'static str,
        field: Option<String>,
        detail: String,
    },
}

/// Validates a batch; a failed call (a trap, a timeout) is retried message by message, so that
/// one message that breaks the rules is dead-lettered alone. One verdict per packed message.
fn validate(evaluator: &mut SalesEvaluator, packed: &PackedPayloads, digits: u8) -> Vec<Verdict> {
    let n = packed.len();
    if n == 0 {
        return Vec::new();
    }
    match evaluator.validate(packed.bytes(), packed.ends(), digits) {
        Ok(r) => verdicts(n, r),
        Err(_) => {
            let mut out = Vec::with_capacity(n);
            let mut single = PackedPayloads::default();
            for i in 0..n {
                single.clear();
                single.push(packed.get(i));
                match evaluator.validate(single.bytes(), single.ends(), digits) {
                    Ok(r) => out.extend(verdicts(1, r)),
                    Err(e) => out.push(Verdict::Rejected {
                        code: e.code(),
                        field: None,
                        detail: e.to_string(),
                    }),
                }
            }
            out
        }
    }
}

fn verdicts(n: usize, r: super::contract::BatchResult) -> Vec<Verdict> {
    let mut out: Vec<Option<Verdict>> = (0..n).map(|_| None).collect();
    for s in r.sales {
        out[s.index as usize] = Some(Verdict::Sale {
            store: s.store,
            amount_minor: s.amount_minor,
            event_time: s.event_time,
        });
    }
    for j in r.rejections {
        out[j.index as usize] = Some(Verdict::Rejected {
            code: j.rejection.code.as_str(),
            field: j.rejection.field,
            detail: j.rejection.detail,
        });
    }
    out.into_iter()
        .map(|v| v.expect("the contract check guarantees a verdict per message"))
        .collect()
}

/// A dead letter: the raw key and value, the original headers, then the reason, where the
/// message came from and which rules judged it.
fn dead_letter(
    m: &OwnedMessage,
    code: &str,
    detail: &str,
    field: Option<&str>,
    extra: &[(&str, String)],
    rules: &crate::sandbox::RulesIdentity,
) -> OutboxEntry {
    let mut hs: HeaderList = headers::of_message(m);
    hs.push((headers::DLQ_REASON.into(), code.as_bytes().to_vec()));
    hs.push((headers::DLQ_DETAIL.into(), detail.as_bytes().to_vec()));
    if let Some(f) = field {
        hs.push((headers::DLQ_FIELD.into(), f.as_bytes().to_vec()));
    }
    for (k, v) in extra {
        hs.push((k.to_string(), v.as_bytes().to_vec()));
    }
    hs.push((headers::SOURCE_TOPIC.into(), m.topic().as_bytes().to_vec()));
    hs.push((
        headers::SOURCE_PARTITION.into(),
        m.partition().to_string().into_bytes(),
    ));
    hs.push((
        headers::SOURCE_OFFSET.into(),
        m.offset().to_string().into_bytes(),
    ));
    hs.push((
        headers::RULES_VERSION.into(),
        rules.version.as_bytes().to_vec(),
    ));
    hs.push((
        headers::RULES_SHA256.into(),
        rules.sha256.as_bytes().to_vec(),
    ));
    OutboxEntry {
        target: Target::DeadLetters,
        key: m.key().map(<[u8]>::to_vec),
        value: m.payload().map(<[u8]>::to_vec),
        headers: hs,
    }
}

/// `amount` minor units as a decimal with `digits` decimals, e.g. 28740 → "287.40".
pub fn decimal(amount: i64, digits: u8) -> String {
    if digits == 0 {
        return amount.to_string();
    }
    let scale = 10i64.pow(digits as u32);
    let sign = if amount < 0 { "-" } else { "" };
    let a = amount.unsigned_abs();
    let s = scale as u64;
    format!("{sign}{}.{:0width$}", a / s, a % s, width = digits as usize)
}

/// Unix seconds as RFC 3339 UTC, e.g. "2025-09-02T10:30:00Z".
pub fn rfc3339(secs: i64) -> String {
    match u64::try_from(secs) {
        Ok(s) => humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + Duration::from_secs(s))
            .to_string(),
        Err(_) => secs.to_string(),
    }
}

/// The output record of a final window: keyed by store, JSON with the table's fields.
pub fn final_record(r: &WindowRow, window_secs: i64, digits: u8) -> OutboxEntry {
    let scale = 10i64.pow(digits as u32);
    let value = format!(
        r#"{{"store":{},"window_start":"{}","window_end":"{}","total":{},"total_minor":{},"total_revenue_int":{},"events":{},"final":true}}"#,
        serde_json::Value::String(r.store.clone()),
        rfc3339(r.window_start),
        rfc3339(r.window_start + window_secs),
        decimal(r.total_minor, digits),
        r.total_minor,
        r.total_minor / scale,
        r.events,
    );
    OutboxEntry {
        target: Target::Output,
        key: Some(r.store.as_bytes().to_vec()),
        value: Some(value.into_bytes()),
        headers: Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn money_is_printed_exactly() {
        assert_eq!(decimal(28740, 2), "287.40");
        assert_eq!(decimal(30, 2), "0.30");
        assert_eq!(decimal(5, 3), "0.005");
        assert_eq!(decimal(12, 0), "12");
        assert_eq!(decimal(i64::MAX, 2), "92233720368547758.07");
    }

    #[test]
    fn a_final_record_is_json_with_the_table_fields() {
        let r = WindowRow {
            store: "store-\"1\"".into(),
            window_start: 1_756_809_000,
            total_minor: 28740,
            events: 12,
            final_: true,
        };
        let e = final_record(&r, 30, 2);
        let v: serde_json::Value = serde_json::from_slice(e.value.as_deref().unwrap()).unwrap();
        assert_eq!(v["store"], "store-\"1\"");
        assert_eq!(v["window_start"], "2025-09-02T10:30:00Z");
        assert_eq!(v["window_end"], "2025-09-02T10:30:30Z");
        assert_eq!(v["total_minor"], 28740);
        assert_eq!(v["total_revenue_int"], 287);
        assert_eq!(v["events"], 12);
        assert_eq!(v["final"], true);
        assert_eq!(e.key.as_deref(), Some("store-\"1\"".as_bytes()));
        assert!(String::from_utf8_lossy(e.value.as_deref().unwrap()).contains("\"total\":287.40"));
    }
}
