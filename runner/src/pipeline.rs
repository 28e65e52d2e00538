//! The data path: campaigns from Kafka → rules (validate, active-now) → join with the cached
//! subscribers → rules (shape) → both sinks from the same in-memory drafts → input offsets.
//!
//! One loop: take a batch (or stop), evaluate it off the async threads, write what it produced
//! to both sinks concurrently, and only then store the batch's offsets. A batch that produces
//! many drafts is written in several groups of at most `batch_max_drafts` drafts.

use crate::cache::{Snapshot, SubscriberCache};
use crate::config::PipelineConfig;
use crate::events::{Events, SkipReason, SourcePos};
use crate::rules::{Activity, Drafts, Evaluator, RulesIdentity};
use crate::sink::feedback::{FeedbackRow, FeedbackSink};
use crate::sink::kafka::{headers, KafkaSink, OutRecord};
use crate::sink::Abandoned;
use crate::source::CampaignConsumer;
use rdkafka::consumer::Consumer;
use rdkafka::message::{Headers, Message, OwnedMessage};
use rdkafka::{Offset, TopicPartitionList};
use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};
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
        drafts: Drafts,
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

/// Everything the loop owns.
pub struct Pipeline {
    pub(crate) cfg: PipelineConfig,
    pub(crate) output_topic: String,
    pub(crate) dead_letter_topic: String,
    pub(crate) consumer: Arc<CampaignConsumer>,
    /// The rules caller and the join's reusable client buffer; moved onto a blocking thread
    /// for each group, so absent only while a group is being evaluated.
    pub(crate) worker: Option<Worker>,
    pub(crate) cache: SubscriberCache,
    pub(crate) kafka: KafkaSink,
    pub(crate) feedback: FeedbackSink,
    pub(crate) events: Arc<Events>,
    pub(crate) clock: Arc<dyn Clock>,
}

impl std::fmt::Debug for Pipeline {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pipeline")
            .field("cfg", &self.cfg)
            .finish_non_exhaustive()
    }
}

impl Pipeline {
    /// Runs until `shutdown` turns true, then drains: the batch in hand is finished (unless
    /// `hard_stop` fires first), the producer flushed and stored offsets committed.
    pub async fn run(
        mut self,
        mut shutdown: watch::Receiver<bool>,
        hard_stop: watch::Receiver<bool>,
    ) {
        loop {
            let batch = tokio::select! {
                biased;
                _ = shutdown.wait_for(|s| *s) => break,
                batch = self.next_batch() => batch,
            };
            if self.process(batch, hard_stop.clone()).await.is_err() {
                tracing::warn!("Stopping hard: the batch in hand was not completed; its offsets were not stored and it will be consumed again.");
                break;
            }
        }
        self.kafka.flush(std::time::Duration::from_secs(5));
        crate::source::commit_stored(&*self.consumer);
        tracing::info!("Pipeline drained; stored offsets committed.");
    }

    /// Waits for one message, then takes more until the batch is full or the input pauses.
    async fn next_batch(&self) -> Vec<OwnedMessage> {
        let mut batch = Vec::new();
        loop {
            match self.consumer.recv().await {
                Ok(m) => {
                    batch.push(m.detach());
                    break;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "Kafka consumer error.");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                }
            }
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

    async fn process(
        &mut self,
        batch: Vec<OwnedMessage>,
        stop: watch::Receiver<bool>,
    ) -> Result<(), Abandoned> {
        self.events.received(batch.len());
        let mut rest: VecDeque<OwnedMessage> = batch.into();
        let mut worker = self
            .worker
            .take()
            .expect("the worker is present between batches");
        // A swap of the rules takes effect here, between batches: one batch, one rules version.
        worker.evaluator.refresh();
        while !rest.is_empty() {
            // Never join against a snapshot known to be stale (first load, lost connection).
            if self.cache.is_stale() {
                tracing::info!("Waiting for the subscriber cache to be resynchronised.");
                self.cache.wait_fresh().await;
            }
            let started = Instant::now();
            let snapshot = self.cache.snapshot();
            let clock = self.clock.clone();
            let cfg = self.cfg.clone();
            let (w, group, remaining) = tokio::task::spawn_blocking(move || {
                let mut w = worker;
                let group = evaluate_group(&mut w, &mut rest, &snapshot, &*clock, &cfg);
                (w, (group, snapshot), rest)
            })
            .await
            .expect("rules evaluation does not panic");
            worker = w;
            rest = remaining;
            let (group, snapshot) = group;
            let identity = worker.evaluator.identity().clone();
            let written = self
                .write_group(&group, &identity, snapshot.version(), stop.clone())
                .await;
            if written.is_err() {
                self.worker = Some(worker);
                return Err(Abandoned);
            }
            self.store_offsets(&group);
            let drafts: usize = group
                .iter()
                .map(|e| match &e.outcome {
                    Outcome::Deliver { drafts, .. } => drafts.drafts.len(),
                    _ => 0,
                })
                .sum();
            self.report(&group, &identity);
            self.events
                .batch_committed(group.len(), drafts, started.elapsed());
        }
        self.worker = Some(worker);
        Ok(())
    }

    /// Writes the drafts to both sinks and the dead letters to their topic, concurrently.
    async fn write_group(
        &mut self,
        group: &[Evaluated],
        rules: &RulesIdentity,
        snapshot_version: u64,
        stop: watch::Receiver<bool>,
    ) -> Result<(), Abandoned> {
        // The subscriber snapshot the group was joined against.
        let snapshot = snapshot_version.to_string();
        let mut records = Vec::new();
        let mut rows = Vec::new();
        for e in group {
            let partition = e.pos.partition.to_string();
            let offset = e.pos.offset.to_string();
            match &e.outcome {
                Outcome::Deliver { drafts, trigger } => {
                    let c = &drafts.campaign;
                    let h = headers([
                        (header::RULES_VERSION, rules.version.as_bytes()),
                        (header::RULES_SHA256, rules.sha256.as_bytes()),
                        (header::SUBSCRIBERS_SNAPSHOT, snapshot.as_bytes()),
                        (header::SOURCE_TOPIC, e.pos.topic.as_bytes()),
                        (header::SOURCE_PARTITION, partition.as_bytes()),
                        (header::SOURCE_OFFSET, offset.as_bytes()),
                        (header::ADV_CAMPAIGN_ID, c.adv_campaign_id.as_bytes()),
                    ]);
                    for d in &drafts.drafts {
                        records.push(OutRecord {
                            topic: &self.output_topic,
                            key: Some(d.client_id.as_bytes()),
                            payload: Some(&d.payload),
                            headers: h.clone(),
                        });
                        rows.push(FeedbackRow {
                            restaurant_id: &c.restaurant_id,
                            adv_campaign_id: &c.adv_campaign_id,
                            adv_campaign_content: &c.adv_campaign_content,
                            adv_campaign_owner: &c.adv_campaign_owner,
                            adv_campaign_owner_contact: &c.adv_campaign_owner_contact,
                            adv_campaign_datetime_start: c.adv_campaign_datetime_start,
                            adv_campaign_datetime_end: c.adv_campaign_datetime_end,
                            datetime_created: c.datetime_created,
                            client_id: &d.client_id,
                            trigger_datetime_created: *trigger,
                        });
                    }
                }
                Outcome::DeadLetter {
                    code,
                    detail,
                    field,
                } => {
                    // The original headers first, then the reason and where the message came from.
                    let mut pairs: Vec<(&str, &[u8])> = Vec::new();
                    if let Some(hs) = e.msg.headers() {
                        for h in hs.iter() {
                            pairs.push((h.key, h.value.unwrap_or_default()));
                        }
                    }
                    pairs.extend([
                        (header::DLQ_REASON, code.as_bytes()),
                        (header::DLQ_DETAIL, detail.as_bytes()),
                        (header::SOURCE_TOPIC, e.pos.topic.as_bytes()),
                        (header::SOURCE_PARTITION, partition.as_bytes()),
                        (header::SOURCE_OFFSET, offset.as_bytes()),
                        (header::RULES_VERSION, rules.version.as_bytes()),
                        (header::RULES_SHA256, rules.sha256.as_bytes()),
                    ]);
                    if let Some(f) = field {
                        pairs.push((header::DLQ_FIELD, f.as_bytes()));
                    }
                    records.push(OutRecord {
                        topic: &self.dead_letter_topic,
                        key: e.msg.key(),
                        payload: e.msg.payload(),
                        headers: headers(pairs),
                    });
                }
                Outcome::Skip { .. } => {}
            }
        }
        let backoff = self.cfg.sink_retry_max_backoff;
        let (mut stop_k, mut stop_p) = (stop.clone(), stop);
        let events = &*self.events;
        let (k, p) = tokio::join!(
            self.kafka.send_all(&records, events, backoff, &mut stop_k),
            self.feedback.write_all(&rows, events, backoff, &mut stop_p),
        );
        k.and(p)
    }

    fn store_offsets(&self, group: &[Evaluated]) {
        let mut next: BTreeMap<(&str, i32), i64> = BTreeMap::new();
        for e in group {
            let o = next
                .entry((e.pos.topic.as_str(), e.pos.partition))
                .or_insert(0);
            *o = (*o).max(e.pos.offset + 1);
        }
        let mut tpl = TopicPartitionList::new();
        for ((topic, partition), offset) in next {
            if let Err(e) = tpl.add_partition_offset(topic, partition, Offset::Offset(offset)) {
                tracing::error!(error = %e, topic, partition, offset, "Could not build the offset list.");
            }
        }
        if let Err(e) = self.consumer.store_offsets(&tpl) {
            // Happens when a partition was revoked meanwhile: its new owner replays it.
            tracing::warn!(error = %e, "Storing offsets failed.");
        }
    }

    fn report(&self, group: &[Evaluated], rules: &RulesIdentity) {
        let rules = rules.to_string();
        for e in group {
            match &e.outcome {
                Outcome::Deliver { drafts, .. } => self.events.delivered(
                    &e.pos,
                    &drafts.campaign.adv_campaign_id,
                    drafts.drafts.len(),
                    &rules,
                ),
                Outcome::Skip {
                    reason,
                    campaign_id,
                } => self.events.skipped(*reason, &e.pos, campaign_id),
                Outcome::DeadLetter { code, detail, .. } => {
                    self.events.dead_lettered(code, detail, &e.pos, &rules)
                }
            }
        }
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
            drafts += d.drafts.len();
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
        Ok(trigger) => Outcome::Deliver { drafts, trigger },
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
