//! The Kafka side: the output topic read by a read_committed consumer assigned to every partition,
//! from the beginning up to the ends taken at the start (no group membership, no offset
//! commit), and the repair's drafts produced in one transaction.

use super::compare::{Draft, Pos, Tally};
use super::ReconcileError;
use crate::kafka::KafkaConfig;
use crate::logging::LogContext;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::Message;
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::{Offset, TopicPartitionList};
use std::collections::HashMap;
use std::time::Duration;

/// How long a metadata or watermark request may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(15);

/// The header every draft produced by `--repair` carries, saying where it came from.
pub const REPAIR_HEADER: &str = "reconcile-repair";
/// Its value: the draft was made from its `subscribers_feedback` row.
pub const REPAIR_FROM: &str = "subscribers_feedback";

/// Reads `topic` from the beginning up to the end each partition had when the read started,
/// feeding `tally` the drafts of `campaigns` (or all); `idle` bounds the wait for the next
/// record. Returns the records read.
pub async fn read(
    kafka: &KafkaConfig,
    group_id: &str,
    topic: &str,
    campaigns: Option<&[String]>,
    idle: Duration,
    tally: &mut Tally,
) -> Result<u64, ReconcileError> {
    let mut config = kafka.consumer_config(&format!("{group_id}-reconcile"));
    config.set("enable.partition.eof", "true");
    let consumer: StreamConsumer<LogContext> = config
        .create_with_context(LogContext::new("reconcile reader", &config))
        .map_err(ReconcileError::Kafka)?;
    let meta = consumer
        .fetch_metadata(Some(topic), REQUEST_TIMEOUT)
        .map_err(ReconcileError::Kafka)?;
    let partitions: Vec<i32> = match meta.topics().first() {
        Some(t) if t.error().is_none() && !t.partitions().is_empty() => {
            t.partitions().iter().map(|p| p.id()).collect()
        }
        _ => return Err(ReconcileError::NoTopic(topic.to_string())),
    };
    // read_committed: the end is the last stable offset, past which nothing is readable yet.
    let mut ends: HashMap<i32, i64> = HashMap::new();
    let mut tpl = TopicPartitionList::new();
    for p in partitions {
        let (low, high) = consumer
            .fetch_watermarks(topic, p, REQUEST_TIMEOUT)
            .map_err(ReconcileError::Kafka)?;
        if low > 0 {
            tally.log_start(p, low);
        }
        if high > low {
            ends.insert(p, high);
            tpl.add_partition_offset(topic, p, Offset::Beginning)
                .map_err(ReconcileError::Kafka)?;
        }
    }
    let mut read = 0u64;
    if ends.is_empty() {
        return Ok(read);
    }
    consumer.assign(&tpl).map_err(ReconcileError::Kafka)?;
    while !ends.is_empty() {
        let m = match tokio::time::timeout(idle, consumer.recv()).await {
            Err(_) => {
                return Err(ReconcileError::Stalled {
                    topic: topic.to_string(),
                    idle,
                    partitions: ends.keys().copied().collect(),
                })
            }
            Ok(Err(KafkaError::PartitionEOF(p))) => {
                ends.remove(&p);
                continue;
            }
            Ok(Err(e)) => return Err(ReconcileError::Kafka(e)),
            Ok(Ok(m)) => m,
        };
        let (p, offset) = (m.partition(), m.offset());
        let Some(&end) = ends.get(&p) else {
            continue;
        };
        if offset >= end {
            ends.remove(&p);
            continue;
        }
        if offset + 1 >= end {
            ends.remove(&p);
        }
        read += 1;
        let at = Pos {
            partition: p,
            offset,
        };
        match serde_json::from_slice::<Draft>(m.payload().unwrap_or_default()) {
            Ok(d) => {
                if campaigns.is_none_or(|c| c.contains(&d.adv_campaign_id)) {
                    tally.record(at, m.key(), d);
                }
            }
            Err(e) => tally.not_a_draft(at, e.to_string()),
        }
    }
    Ok(read)
}

/// The transactional id of the repair's producer: fixed per pipeline group, so that two
/// repairs fence each other; distinct from the pipeline's own (`campaign-runner-{group}-{topic}-{partition}`).
pub fn transactional_id(group_id: &str) -> String {
    format!("campaign-runner-{group_id}-reconcile")
}

/// Produces `drafts` to `topic` in one transaction, keyed by client id, fields in SPEC.md's
/// order, each with the [`REPAIR_HEADER`] and the campaign's `adv-campaign-id`.
pub async fn produce(
    kafka: &KafkaConfig,
    group_id: &str,
    topic: &str,
    drafts: &[Draft],
    timeout: Duration,
) -> Result<u64, ReconcileError> {
    let mut config = kafka.producer_config();
    let id = transactional_id(group_id);
    config.set("transactional.id", &id);
    let producer: FutureProducer<LogContext> = config
        .create_with_context(LogContext::new(format!("reconcile producer {id}"), &config))
        .map_err(ReconcileError::Kafka)?;
    let p = producer.clone();
    tokio::task::spawn_blocking(move || p.init_transactions(timeout))
        .await
        .expect("init_transactions does not panic")
        .map_err(ReconcileError::Kafka)?;
    producer
        .begin_transaction()
        .map_err(ReconcileError::Kafka)?;
    let sent = async {
        let mut deliveries = Vec::with_capacity(drafts.len());
        for d in drafts {
            let payload = serde_json::to_vec(d).expect("a draft serialises");
            let headers = crate::headers::owned([
                (REPAIR_HEADER, REPAIR_FROM.as_bytes()),
                (
                    crate::pipelines::campaigns::header::ADV_CAMPAIGN_ID,
                    d.adv_campaign_id.as_bytes(),
                ),
            ]);
            let mut record = FutureRecord::to(topic)
                .key(d.client_id.as_bytes())
                .payload(&payload)
                .headers(headers);
            loop {
                match producer.send_result(record) {
                    Ok(delivery) => {
                        deliveries.push(delivery);
                        break;
                    }
                    // The producer's queue is full: wait for room.
                    Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                        record = r;
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                    Err((e, _)) => return Err(ReconcileError::Kafka(e)),
                }
            }
        }
        for delivery in deliveries {
            match delivery.await {
                Ok(Ok(_)) => {}
                Ok(Err((e, _))) => return Err(ReconcileError::Kafka(e)),
                Err(_) => return Err(ReconcileError::Kafka(KafkaError::Canceled)),
            }
        }
        Ok::<_, ReconcileError>(drafts.len() as u64)
    }
    .await;
    let p = producer.clone();
    match sent {
        Ok(n) => {
            tokio::task::spawn_blocking(move || p.commit_transaction(timeout))
                .await
                .expect("commit_transaction does not panic")
                .map_err(ReconcileError::Kafka)?;
            Ok(n)
        }
        Err(e) => {
            let _ = tokio::task::spawn_blocking(move || p.abort_transaction(timeout)).await;
            Err(e)
        }
    }
}
