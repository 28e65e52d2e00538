//! The Kafka stage: units whose PostgreSQL transaction committed are published here, one Kafka
//! transaction each (records + the input offset), in the order they were handed over, while
//! the pipeline evaluates and writes the next units to PostgreSQL. The two sinks then work at
//! the same time instead of taking turns.
//!
//! Why this keeps the delivery protocol: a unit reaches this stage only after its PostgreSQL
//! transaction put it in the outbox, and a partition's Kafka transactions still commit in input
//! order (one task, first in, first out). If this runner dies with units queued here, they are
//! in the outbox past the committed offset, and whoever takes the partition over publishes them
//! in one transaction (`Pipeline::recover`). The outbox of a unit is deleted only after its
//! Kafka transaction committed (`Done::Published` sets `published_through`).

use super::{Evaluated, Outcome};
use crate::events::{stage, Events};
use crate::rules::RulesIdentity;
use crate::sink::feedback::{Kept, OutboxEntry, Target};
use crate::sink::kafka::{headers, OutRecord, TxError, TxProducer};
use crate::sink::{pause, Abandoned, Backoff};
use crate::source::CampaignConsumer;
use rdkafka::consumer::{CommitMode, Consumer};
use rdkafka::{Offset, TopicPartitionList};
use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::sync::{mpsc, watch};

/// Publishes units to Kafka: what both the Kafka stage and partition recovery use.
#[derive(Clone)]
pub(crate) struct Publisher {
    pub(crate) consumer: Arc<CampaignConsumer>,
    pub(crate) events: Arc<Events>,
    pub(crate) output_topic: String,
    pub(crate) dead_letter_topic: String,
    pub(crate) retry_max_backoff: Duration,
}

impl Publisher {
    /// Publishes what was kept of `entries` and commits the offset past `last`, in one
    /// transaction, retrying aborted transactions. Ok(false): fenced, the partition is not ours
    /// any more.
    pub(crate) async fn publish(
        &self,
        producer: &TxProducer,
        (topic, partition): (&str, i32),
        last: i64,
        entries: &[OutboxEntry],
        kept: &[Kept],
        stop: &mut watch::Receiver<bool>,
    ) -> Result<bool, Abandoned> {
        let records = Records::of(entries, kept);
        let records = records.out(&self.output_topic, &self.dead_letter_topic);
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
                Ok(()) => {
                    self.commit_plain(topic, partition, last + 1);
                    return Ok(true);
                }
                Err(TxError::Fenced(e)) => {
                    tracing::warn!(error = %e, topic, partition, "The Kafka transaction was fenced.");
                    self.events.fenced(topic, partition, "kafka");
                    return Ok(false);
                }
                Err(TxError::Retry(e)) => {
                    let wait = backoff.step();
                    self.events.sink_retry("kafka", &e, backoff.attempt, wait);
                    if !pause(wait, stop).await {
                        return Err(Abandoned);
                    }
                }
            }
        }
    }

    /// Commits `next` the ordinary way too, after the transaction committed it. Redundant on a
    /// broker that implements transactional offset commits; librdkafka's mock cluster accepts
    /// TxnOffsetCommit but does not store it, and this is what lets a restart resume there.
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
            out.headers.push(headers(
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
                    Target::Drafts => output,
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
pub(crate) struct Job {
    pub(crate) key: (String, i32),
    /// The fence epoch the PostgreSQL transaction held.
    pub(crate) epoch: i64,
    pub(crate) producer: TxProducer,
    /// The unit's last input offset: the transaction commits the offset past it.
    pub(crate) last: i64,
    pub(crate) entries: Vec<OutboxEntry>,
    pub(crate) kept: Vec<Kept>,
    /// The unit's messages and outcomes, reported once the unit is durable in both sinks.
    pub(crate) group: Vec<Evaluated>,
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
    /// The runner is stopping hard: the stage ended; what it held stays in the outbox.
    Abandoned,
}

/// The pipeline's handle on the Kafka stage.
pub(crate) struct Stage {
    jobs: mpsc::Sender<Job>,
    done: mpsc::UnboundedReceiver<Done>,
    /// Jobs handed over whose `Done` has not been received.
    pending: usize,
}

impl Stage {
    /// Starts the stage's task. `queue`: how many units may wait for it (besides the one it is
    /// publishing); the pipeline blocks when they are that many, which bounds memory.
    pub(crate) fn start(publisher: Publisher, queue: usize, stop: watch::Receiver<bool>) -> Stage {
        let (jobs, rx) = mpsc::channel(queue.max(1));
        let (tx, done) = mpsc::unbounded_channel();
        tokio::spawn(run(publisher, rx, tx, stop));
        Stage {
            jobs,
            done,
            pending: 0,
        }
    }

    pub(crate) fn pending(&self) -> usize {
        self.pending
    }

    /// Hands a unit over (waiting while the queue is full).
    pub(crate) async fn send(&mut self, job: Job) -> Result<(), Abandoned> {
        self.jobs.send(job).await.map_err(|_| Abandoned)?;
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

async fn run(
    publisher: Publisher,
    mut jobs: mpsc::Receiver<Job>,
    done: mpsc::UnboundedSender<Done>,
    mut stop: watch::Receiver<bool>,
) {
    // Partitions (with the epoch they were held by) whose Kafka transaction was fenced: their
    // later units are not published by this runner.
    let mut fenced: HashSet<((String, i32), i64)> = HashSet::new();
    while let Some(job) = jobs.recv().await {
        let Job {
            key,
            epoch,
            producer,
            last,
            entries,
            kept,
            group,
            rules,
            started,
            written,
        } = job;
        let id = (key, epoch);
        let outcome = if fenced.contains(&id) {
            Done::Fenced {
                key: id.0,
                epoch: id.1,
            }
        } else {
            let (key, epoch) = (&id.0, id.1);
            publisher
                .events
                .stage_time(stage::KAFKA_QUEUED, written.elapsed().as_micros() as u64);
            let t = Instant::now();
            match publisher
                .publish(&producer, (&key.0, key.1), last, &entries, &kept, &mut stop)
                .await
            {
                Ok(true) => {
                    let events = &publisher.events;
                    events.stage_time(stage::KAFKA, t.elapsed().as_micros() as u64);
                    report(events, &group, &rules);
                    record_latency(events, &group);
                    let drafts = group
                        .iter()
                        .map(|e| match &e.outcome {
                            Outcome::Deliver { drafts, .. } => drafts.len(),
                            _ => 0,
                        })
                        .sum();
                    events.batch_committed(group.len(), drafts, started.elapsed());
                    Done::Published {
                        key: key.clone(),
                        epoch,
                        last,
                    }
                }
                Ok(false) => {
                    fenced.insert(id.clone());
                    Done::Fenced {
                        key: id.0,
                        epoch: id.1,
                    }
                }
                Err(Abandoned) => {
                    let _ = done.send(Done::Abandoned);
                    return;
                }
            }
        };
        if done.send(outcome).is_err() {
            return;
        }
    }
}

/// End-to-end latency of each message of a committed unit: from its Kafka timestamp.
fn record_latency(events: &Events, group: &[Evaluated]) {
    let now_us = unix_micros();
    for e in group {
        if let Some(ms) = rdkafka::Message::timestamp(&e.msg).to_millis() {
            events.committed_latency((now_us - ms * 1000).max(0) as u64);
        }
    }
}

fn report(events: &Events, group: &[Evaluated], rules: &RulesIdentity) {
    let rules = rules.to_string();
    for e in group {
        match &e.outcome {
            Outcome::Deliver { drafts, .. } => events.delivered(
                &e.pos,
                &drafts.campaign.adv_campaign_id,
                drafts.len(),
                &rules,
            ),
            Outcome::Skip {
                reason,
                campaign_id,
            } => events.skipped(*reason, &e.pos, campaign_id),
            Outcome::DeadLetter { code, detail, .. } => {
                events.dead_lettered(code, detail, &e.pos, &rules)
            }
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
