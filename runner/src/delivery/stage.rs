//! The Kafka stage: units whose PostgreSQL transaction committed are published here (records +
//! the input offset, in Kafka transactions), while the pipeline evaluates and writes the next
//! units to PostgreSQL. The two sinks then work at the same time instead of taking turns. Each
//! partition is a lane of its own: its units go out in the order they were handed over, and
//! those that queued up while its previous transaction was in flight go out in one transaction
//! (group commit: a transaction's fixed cost, several broker round trips, is paid once for all
//! of them). Different partitions' transactions are in flight at the same time: each partition
//! has its own transactional producer, so a unit never waits behind another partition's.
//!
//! Why this keeps the delivery protocol: a unit reaches this stage only after its PostgreSQL
//! transaction put it in the outbox, and a partition's Kafka transactions still commit in input
//! order (one transaction in flight per partition, first in, first out). If this runner dies
//! with units queued here, they are in the outbox past the committed offset, and whoever takes
//! the partition over publishes them in one transaction (`takeover.rs`). The outbox of a
//! unit is deleted only after its Kafka transaction committed (`Done::Published` sets
//! `published_through`).

use super::outbox::{Kept, OutboxEntry, Target};
use super::producer::{OutRecord, TxError, TxProducer};
use super::{Evaluated, Outcome, Pipeline};
use crate::events::{stage, Events};
use crate::retry::{Abandoned, Backoff};
use crate::sandbox::RulesIdentity;
use crate::source::SourceConsumer;
use futures::stream::{FuturesUnordered, StreamExt};
use rdkafka::consumer::{CommitMode, Consumer};
use rdkafka::{Offset, TopicPartitionList};
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::sync::{mpsc, watch, OwnedSemaphorePermit, Semaphore};

/// Publishes units to Kafka: what both the Kafka stage and partition recovery use.
#[derive(Clone)]
pub(crate) struct Publisher {
    pub(crate) consumer: Arc<SourceConsumer>,
    pub(crate) events: Arc<Events>,
    pub(crate) output_topic: String,
    pub(crate) dead_letter_topic: String,
    pub(crate) retry_max_backoff: Duration,
    /// See `DeliveryConfig::plain_offset_commits`.
    pub(crate) plain_offset_commits: bool,
}

/// What became of a Kafka transaction (after its retries).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Flight {
    Published,
    /// The partition is not ours any more (another producer fenced ours).
    Fenced,
    /// The producer is stuck and given up: the partition must be taken over again.
    Lost,
}

impl Publisher {
    /// Publishes what was kept of each unit's entries and commits the offset past `last`, in
    /// one transaction, retrying aborted transactions.
    pub(crate) async fn publish(
        &self,
        producer: &TxProducer,
        (topic, partition): (&str, i32),
        last: i64,
        units: &[(&[OutboxEntry], &[Kept])],
        stop: &mut watch::Receiver<bool>,
    ) -> Result<Flight, Abandoned> {
        let records: Vec<Records<'_>> = units
            .iter()
            .map(|(entries, kept)| Records::of(entries, kept))
            .collect();
        let records: Vec<OutRecord<'_>> = records
            .iter()
            .flat_map(|r| r.out(&self.output_topic, &self.dead_letter_topic))
            .collect();
        let mut backoff = Backoff::new(self.retry_max_backoff);
        loop {
            let mut offsets = TopicPartitionList::new();
            if offsets
                .add_partition_offset(topic, partition, Offset::Offset(last + 1))
                .is_err()
            {
                return Err(Abandoned);
            }
            let Some(group) = self.consumer.group_metadata() else {
                tracing::error!(
                    "The consumer has no group metadata; cannot commit offsets in a transaction."
                );
                return Err(Abandoned);
            };
            match producer.publish(&records, offsets, group).await {
                Ok(steps) => {
                    for (name, d) in [
                        (stage::KAFKA_PRODUCE, steps.produce),
                        (stage::KAFKA_OFFSETS, steps.offsets),
                        (stage::KAFKA_COMMIT, steps.commit),
                    ] {
                        self.events.stage_time(name, d.as_micros() as u64);
                    }
                    if self.plain_offset_commits {
                        self.commit_plain(topic, partition, last + 1);
                    }
                    return Ok(Flight::Published);
                }
                Err(TxError::Fenced(e)) => {
                    tracing::warn!(error = %e, topic, partition, "The Kafka transaction was fenced.");
                    self.events.fenced(topic, partition, "kafka");
                    return Ok(Flight::Fenced);
                }
                Err(e @ TxError::Stuck(..)) => {
                    self.events.producer_lost(topic, partition, &e);
                    return Ok(Flight::Lost);
                }
                Err(TxError::Retry(e)) => {
                    backoff
                        .wait(stop, |attempt, pause| {
                            self.events.sink_retry("kafka", &e, attempt, pause)
                        })
                        .await?;
                }
            }
        }
    }

    /// Commits `next` the ordinary way too, after the transaction committed it: only on
    /// librdkafka's mock cluster, which accepts TxnOffsetCommit but does not store it.
    fn commit_plain(&self, topic: &str, partition: i32, next: i64) {
        let mut tpl = TopicPartitionList::new();
        if tpl
            .add_partition_offset(topic, partition, Offset::Offset(next))
            .is_ok()
        {
            if let Err(e) = self.consumer.commit(&tpl, CommitMode::Async) {
                tracing::debug!(error = %e, topic, partition, "Plain offset commit failed (the transactional one stands).");
            }
        }
    }
}

/// Records to publish, borrowing from outbox entries; the headers are built once per entry.
struct Records<'e> {
    headers: Vec<rdkafka::message::OwnedHeaders>,
    records: Vec<Rec<'e>>,
}

struct Rec<'e> {
    target: Target,
    key: Option<&'e [u8]>,
    payload: Option<&'e [u8]>,
    /// Index into `Records::headers`.
    headers: usize,
}

impl<'e> Records<'e> {
    /// The Kafka records of what was kept of outbox entries.
    fn of(entries: &'e [OutboxEntry], kept: &[Kept]) -> Records<'e> {
        let mut out = Records {
            headers: Vec::with_capacity(kept.len()),
            records: Vec::new(),
        };
        for k in kept {
            let e = &entries[k.entry];
            out.headers.push(crate::headers::owned(
                e.headers.iter().map(|(k, v)| (k.as_str(), v.as_slice())),
            ));
            let h = out.headers.len() - 1;
            out.records.extend(k.records(e).map(|i| {
                let (key, payload) = e.record(i);
                Rec {
                    target: e.target,
                    key,
                    payload,
                    headers: h,
                }
            }));
        }
        out
    }

    fn out<'a>(&'a self, output: &'a str, dead_letters: &'a str) -> Vec<OutRecord<'a>> {
        self.records
            .iter()
            .map(|r| OutRecord {
                topic: match r.target {
                    Target::Output => output,
                    Target::DeadLetters => dead_letters,
                },
                key: r.key,
                payload: r.payload,
                headers: &self.headers[r.headers],
            })
            .collect()
    }
}

/// A unit durable in PostgreSQL (its outbox entries written), to be published.
pub(crate) struct Job<D, H = ()> {
    pub(crate) key: (String, i32),
    /// The fence epoch the PostgreSQL transaction held.
    pub(crate) epoch: i64,
    pub(crate) producer: TxProducer,
    /// The unit's last input offset: the transaction commits the offset past it.
    pub(crate) last: i64,
    pub(crate) entries: Vec<OutboxEntry>,
    pub(crate) kept: Vec<Kept>,
    /// The unit's messages and outcomes, reported once the unit is durable in both sinks.
    pub(crate) group: Vec<Evaluated<D, H>>,
    /// Its share of the stage's queue (released once it is published).
    pub(crate) room: Option<OwnedSemaphorePermit>,
    pub(crate) rules: RulesIdentity,
    /// When the unit's evaluation started.
    pub(crate) started: Instant,
    /// When its PostgreSQL transaction committed.
    pub(crate) written: Instant,
}

/// What became of a job.
#[derive(Debug)]
pub(crate) enum Done {
    /// Durable in both sinks, through input offset `last`.
    Published {
        key: (String, i32),
        epoch: i64,
        last: i64,
    },
    /// Another runner owns the partition now (or the group moved on): this unit, and the
    /// partition's later units held by the same epoch, are left to whoever recovers it.
    Fenced { key: (String, i32), epoch: i64 },
    /// The partition's producer is stuck and given up: this unit and the partition's later
    /// units held by the same epoch stay in the outbox; the partition is taken over again.
    Lost { key: (String, i32), epoch: i64 },
    /// The runner is stopping hard: the stage ended; what it held stays in the outbox.
    Abandoned,
}

/// The pipeline's handle on the Kafka stage.
pub(crate) struct Stage<P: Pipeline> {
    jobs: mpsc::UnboundedSender<Job<P::Delivery, P::Held>>,
    done: mpsc::UnboundedReceiver<Done>,
    /// Drafts the queue may hold (units handed over and not yet published): bounds memory.
    room: Arc<Semaphore>,
    max_drafts: u32,
    /// Jobs handed over whose `Done` has not been received.
    pending: usize,
}

impl<P: Pipeline> Stage<P> {
    /// Starts the stage's task. `max_drafts`: how much weight (campaigns: drafts) the units
    /// handed over and not yet published may hold (a unit heavier than that still goes,
    /// alone); the pipeline waits for room beyond it.
    pub(crate) fn start(
        publisher: Publisher,
        pipeline: Arc<P>,
        max_drafts: usize,
        stop: watch::Receiver<bool>,
    ) -> Stage<P> {
        let (jobs, rx) = mpsc::unbounded_channel();
        let (tx, done) = mpsc::unbounded_channel();
        tokio::spawn(run(publisher, pipeline, rx, tx, stop));
        let max_drafts = u32::try_from(max_drafts.max(1)).unwrap_or(u32::MAX);
        Stage {
            jobs,
            done,
            room: Arc::new(Semaphore::new(max_drafts as usize)),
            max_drafts,
            pending: 0,
        }
    }

    pub(crate) fn pending(&self) -> usize {
        self.pending
    }

    /// Hands a unit over (waiting while the queue is full).
    pub(crate) async fn send(
        &mut self,
        mut job: Job<P::Delivery, P::Held>,
    ) -> Result<(), Abandoned> {
        let drafts: usize = job.group.iter().map(|e| weight::<P>(&e.outcome)).sum();
        let want = u32::try_from(drafts.max(1))
            .unwrap_or(u32::MAX)
            .min(self.max_drafts);
        let permit = self
            .room
            .clone()
            .acquire_many_owned(want)
            .await
            .map_err(|_| Abandoned)?;
        job.room = Some(permit);
        self.jobs.send(job).map_err(|_| Abandoned)?;
        self.pending += 1;
        Ok(())
    }

    /// The next outcome, waiting for it; None when nothing is pending.
    pub(crate) async fn next(&mut self) -> Option<Done> {
        if self.pending == 0 {
            return None;
        }
        let d = self.done.recv().await.unwrap_or(Done::Abandoned);
        self.pending -= 1;
        Some(d)
    }

    /// An outcome already there, without waiting.
    pub(crate) fn try_next(&mut self) -> Option<Done> {
        if self.pending == 0 {
            return None;
        }
        match self.done.try_recv() {
            Ok(d) => {
                self.pending -= 1;
                Some(d)
            }
            Err(mpsc::error::TryRecvError::Empty) => None,
            Err(mpsc::error::TryRecvError::Disconnected) => {
                self.pending -= 1;
                Some(Done::Abandoned)
            }
        }
    }
}

fn weight<P: Pipeline>(outcome: &Outcome<P::Delivery, P::Held>) -> usize {
    match outcome {
        Outcome::Deliver(d) => P::weight(d),
        _ => 0,
    }
}

/// A pipeline's jobs.
type JobOf<P> = Job<<P as Pipeline>::Delivery, <P as Pipeline>::Held>;

/// A partition and the fence epoch its units were written under: the stage's unit of order.
type Lane = ((String, i32), i64);

fn lane<D, H>(job: &Job<D, H>) -> Lane {
    (job.key.clone(), job.epoch)
}

/// One Kafka transaction carrying a lane's queued units, in order; resolves to what became of
/// it (`Err`: the runner is stopping hard).
async fn flight<D, H>(
    publisher: Publisher,
    lane: Lane,
    group: Vec<Job<D, H>>,
    mut stop: watch::Receiver<bool>,
) -> (Lane, Vec<Job<D, H>>, Result<Flight, Abandoned>) {
    let events = &publisher.events;
    for job in &group {
        events.stage_time(
            stage::KAFKA_QUEUED,
            job.written.elapsed().as_micros() as u64,
        );
    }
    let last = group.last().expect("a group has a job").last;
    let units: Vec<(&[OutboxEntry], &[Kept])> = group
        .iter()
        .map(|j| (j.entries.as_slice(), j.kept.as_slice()))
        .collect();
    let t = Instant::now();
    let key = &lane.0;
    let result = publisher
        .publish(&group[0].producer, (&key.0, key.1), last, &units, &mut stop)
        .await;
    if let Ok(Flight::Published) = result {
        events.stage_time(stage::KAFKA, t.elapsed().as_micros() as u64);
    }
    (lane, group, result)
}

/// The stage's task. Each partition is a lane: its units are published in order, one
/// transaction at a time, and the units that queue up while its transaction is in flight go
/// out together in the next one (group commit). Lanes do not wait for each other: each
/// partition has its own transactional producer, so their transactions run at the same time,
/// and a unit waits only behind its own partition's earlier units.
async fn run<P: Pipeline>(
    publisher: Publisher,
    pipeline: Arc<P>,
    mut jobs: mpsc::UnboundedReceiver<Job<P::Delivery, P::Held>>,
    done: mpsc::UnboundedSender<Done>,
    stop: watch::Receiver<bool>,
) {
    // Lanes whose producer was fenced or lost: their later units are not published by this
    // runner (they are handed back with the same verdict).
    let mut ended: HashMap<Lane, Flight> = HashMap::new();
    // Units handed over and not yet in a transaction, per lane, in order.
    let mut waiting: HashMap<Lane, Vec<JobOf<P>>> = HashMap::new();
    // Lanes with a transaction in flight.
    let mut busy: HashSet<Lane> = HashSet::new();
    let mut flights = FuturesUnordered::new();
    let mut open = true;
    loop {
        tokio::select! {
            job = jobs.recv(), if open => match job {
                Some(job) => waiting.entry(lane(&job)).or_default().push(job),
                None => open = false,
            },
            Some((lane, group, result)) = flights.next(), if !flights.is_empty() => {
                busy.remove(&lane);
                let flight = match result {
                    Ok(flight) => flight,
                    Err(Abandoned) => {
                        let _ = done.send(Done::Abandoned);
                        return;
                    }
                };
                if flight != Flight::Published {
                    ended.insert(lane, flight);
                }
                if finish(&*pipeline, &publisher.events, group, flight, &done).is_err() {
                    return;
                }
            },
            else => break,
        }
        // Every idle lane with units waiting starts its next transaction (an ended lane's
        // units are handed back at once).
        let ready: Vec<Lane> = waiting
            .keys()
            .filter(|l| !busy.contains(*l))
            .cloned()
            .collect();
        for lane in ready {
            let group = waiting.remove(&lane).expect("a waiting lane");
            if let Some(flight) = ended.get(&lane).copied() {
                if finish(&*pipeline, &publisher.events, group, flight, &done).is_err() {
                    return;
                }
                continue;
            }
            busy.insert(lane.clone());
            flights.push(flight(publisher.clone(), lane, group, stop.clone()));
        }
    }
}

/// Reports what became of a group of units to the pipeline (and, when published, to the
/// events: each message's outcome, latency and the unit's commit).
fn finish<P: Pipeline>(
    pipeline: &P,
    events: &Events,
    group: Vec<Job<P::Delivery, P::Held>>,
    flight: Flight,
    done: &mpsc::UnboundedSender<Done>,
) -> Result<(), mpsc::error::SendError<Done>> {
    for job in group {
        if matches!(flight, Flight::Published) {
            report(pipeline, events, &job);
        }
        let (key, epoch) = (job.key, job.epoch);
        let outcome = match flight {
            Flight::Published => {
                record_latency(events, &job.group);
                let drafts = job.group.iter().map(|e| weight::<P>(&e.outcome)).sum();
                events.batch_committed(job.group.len(), drafts, job.started.elapsed());
                Done::Published {
                    key,
                    epoch,
                    last: job.last,
                }
            }
            Flight::Fenced => Done::Fenced { key, epoch },
            Flight::Lost => Done::Lost { key, epoch },
        };
        done.send(outcome)?;
    }
    Ok(())
}

/// End-to-end latency of each message of a committed unit: from its Kafka timestamp.
fn record_latency<D, H>(events: &Events, group: &[Evaluated<D, H>]) {
    let now_us = unix_micros();
    for e in group {
        if let Some(ms) = rdkafka::Message::timestamp(&e.msg).to_millis() {
            events.committed_latency((now_us - ms * 1000).max(0) as u64);
        }
    }
}

fn report<P: Pipeline>(pipeline: &P, events: &Events, job: &Job<P::Delivery, P::Held>) {
    let rules = job.rules.to_string();
    // Records published per outbox entry (a delivery whose records were all there already
    // published none).
    let published: HashMap<usize, usize> = job
        .kept
        .iter()
        .map(|k| {
            let n = k
                .only
                .as_ref()
                .map_or_else(|| job.entries[k.entry].records.len(), Vec::len);
            (k.entry, n)
        })
        .collect();
    let mut entry = 0;
    for e in &job.group {
        match &e.outcome {
            Outcome::Deliver(d) => {
                let n = published.get(&entry).copied().unwrap_or(0);
                pipeline.delivered(events, &e.pos, d, &rules, n)
            }
            Outcome::Skip {
                reason, subject, ..
            } => events.skipped(reason, &e.pos, subject),
            Outcome::DeadLetter { code, detail, .. } => {
                events.dead_lettered(code, detail, &e.pos, &rules)
            }
        }
        if !matches!(e.outcome, Outcome::Skip { .. }) {
            entry += 1;
        }
    }
}

/// Wall-clock time in microseconds since the unix epoch (Kafka timestamps are wall-clock).
pub(crate) fn unix_micros() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0)
}
