//! Kafka output through transactions: one transactional producer per owned input partition
//! (its `transactional.id` names the group and the partition, so a new owner's
//! `init_transactions` fences a zombie). Each transaction carries the output records and dead
//! letters of a run of that partition's messages and commits the consumer group's offset past
//! them.

use rdkafka::client::ClientContext;
use rdkafka::config::FromClientConfigAndContext;
use rdkafka::consumer::ConsumerGroupMetadata;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{DeliveryResult, OwnedHeaders};
use rdkafka::producer::{BaseRecord, Producer, ProducerContext, ThreadedProducer};
use rdkafka::{ClientConfig, TopicPartitionList};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Duration;
use tokio::sync::Notify;

/// One record to produce, borrowing its bytes.
#[derive(Debug, Clone)]
pub struct OutRecord<'a> {
    pub topic: &'a str,
    pub key: Option<&'a [u8]>,
    pub payload: Option<&'a [u8]>,
    pub headers: &'a OwnedHeaders,
}

#[derive(Debug, thiserror::Error)]
pub enum TxError {
    /// Another instance owns the partition now (or the producer failed fatally): stop writing
    /// for it; the new owner takes over from what is committed.
    #[error("the transaction was fenced or failed fatally: {0}")]
    Fenced(KafkaError),
    /// The transaction was aborted (or never committed): nothing of it is visible; try again.
    #[error("the transaction failed and was aborted: {0}")]
    Retry(KafkaError),
    /// A transactional call did not return long after its own timeout (librdkafka can wait on a
    /// coordinator that is gone without ever timing out: confluentinc/librdkafka#5456, #5511).
    /// The producer cannot be used any more: a new one with the same transactional id takes its
    /// place, which fences it and aborts its open transaction.
    #[error("{0} did not return within {1:?}; the producer is given up")]
    Stuck(&'static str, Duration),
}

/// How long past its own timeout a transactional call may take before it is taken for stuck.
const STUCK_GRACE: Duration = Duration::from_secs(10);

/// How long a transactional call is made again while it fails with a retriable error (the
/// broker's default transaction timeout: past it the coordinator aborts the transaction).
const RETRIABLE_FOR: Duration = Duration::from_secs(60);

/// Errors after which this runner must stop writing for the partition: the producer was
/// fenced, or the consumer is no longer a member of the generation that owns the partition (for
/// instance after a sink outage longer than `max.poll.interval.ms`). The pipeline then polls
/// again, rejoins, and takes the partition over properly (recovering its outbox).
const FENCING_CODES: &[RDKafkaErrorCode] = &[
    RDKafkaErrorCode::Fenced,
    RDKafkaErrorCode::ProducerFenced,
    RDKafkaErrorCode::InvalidProducerEpoch,
    RDKafkaErrorCode::IllegalGeneration,
    RDKafkaErrorCode::UnknownMemberId,
    RDKafkaErrorCode::FencedInstanceId,
    RDKafkaErrorCode::RebalanceInProgress,
];

fn classify(e: KafkaError) -> TxError {
    let fatal = matches!(&e, KafkaError::Transaction(r) if r.is_fatal());
    let fencing = e
        .rdkafka_error_code()
        .is_some_and(|c| FENCING_CODES.contains(&c));
    if fatal || fencing {
        TxError::Fenced(e)
    } else {
        TxError::Retry(e)
    }
}

/// The records of the producer's transaction not yet acknowledged, and the first failure among
/// them: the delivery callback (on the producer's polling thread) keeps this up to date, so a
/// record costs no allocation, channel or future of its own.
#[derive(Debug, Default)]
pub struct Deliveries {
    outstanding: AtomicUsize,
    failed: Mutex<Option<KafkaError>>,
    /// Woken when `outstanding` reaches zero.
    settled: Notify,
    log: crate::logging::ClientLog,
}

impl Deliveries {
    fn sending(&self) {
        self.outstanding.fetch_add(1, Ordering::AcqRel);
    }

    fn done(&self) {
        if self.outstanding.fetch_sub(1, Ordering::AcqRel) == 1 {
            // Stores a permit if nobody waits yet: the next wait sees the count and returns.
            self.settled.notify_one();
        }
    }

    /// Waits until every record sent has been acknowledged or has failed.
    async fn settled(&self) {
        while self.outstanding.load(Ordering::Acquire) > 0 {
            self.settled.notified().await;
        }
    }

    fn take_failure(&self) -> Option<KafkaError> {
        self.failed
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .take()
    }
}

impl ClientContext for Deliveries {
    fn log(&self, level: rdkafka::config::RDKafkaLogLevel, fac: &str, log_message: &str) {
        self.log.log(level, fac, log_message)
    }

    fn error(&self, error: KafkaError, reason: &str) {
        self.log.error(error, reason)
    }
}

impl ProducerContext for Deliveries {
    type DeliveryOpaque = ();

    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        if let Err((e, _)) = result {
            self.failed
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .get_or_insert_with(|| e.clone());
        }
        self.done();
    }
}

/// How long each step of a committed transaction took.
#[derive(Debug, Clone, Copy, Default)]
pub struct TxSteps {
    /// Beginning it, producing every record and waiting for their acknowledgements.
    pub produce: Duration,
    /// Adding the consumer group's offsets to it.
    pub offsets: Duration,
    /// Committing it.
    pub commit: Duration,
}

/// The transactional producer of one input partition.
#[derive(Clone)]
pub struct TxProducer {
    producer: ThreadedProducer<Deliveries>,
    timeout: Duration,
    id: std::sync::Arc<str>,
}

impl std::fmt::Debug for TxProducer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TxProducer").finish_non_exhaustive()
    }
}

impl TxProducer {
    /// Creates the producer and initialises its transactions, which fences any earlier producer
    /// with the same id and aborts its open transaction.
    pub async fn create(
        base: &ClientConfig,
        transactional_id: &str,
        timeout: Duration,
    ) -> Result<TxProducer, KafkaError> {
        let mut config = base.clone();
        config.set("transactional.id", transactional_id);
        let deliveries = Deliveries {
            log: crate::logging::ClientLog::new(format!("producer {transactional_id}"), &config),
            ..Deliveries::default()
        };
        let producer = ThreadedProducer::from_config_and_context(&config, deliveries)
            .map_err(crate::kafka::redact_client_error)?;
        let p = producer.clone();
        let init = tokio::task::spawn_blocking(move || p.init_transactions(timeout));
        // init_transactions waits on the transaction coordinator too: bounded the same way.
        tokio::time::timeout(timeout + STUCK_GRACE, init)
            .await
            .map_err(|_| KafkaError::Canceled)?
            .map_err(|_| KafkaError::Canceled)??;
        Ok(TxProducer {
            producer,
            timeout,
            id: transactional_id.into(),
        })
    }

    /// Runs a blocking transactional call with the producer's timeout, on a blocking thread,
    /// and gives up waiting for it `STUCK_GRACE` after that timeout (the call, if it ever
    /// returns, then finds the producer fenced).
    async fn blocking<F>(&self, what: &'static str, f: F) -> Result<Result<(), KafkaError>, TxError>
    where
        F: FnOnce(&ThreadedProducer<Deliveries>, Duration) -> Result<(), KafkaError>
            + Send
            + 'static,
    {
        let p = self.producer.clone();
        let t = self.timeout;
        let limit = t + STUCK_GRACE;
        match tokio::time::timeout(limit, tokio::task::spawn_blocking(move || f(&p, t))).await {
            Ok(r) => Ok(r.unwrap_or(Err(KafkaError::Canceled))),
            Err(_) => Err(TxError::Stuck(what, limit)),
        }
    }

    /// A transactional call, made again while librdkafka says its error is retriable: a
    /// commit (or abort, or offsets) that timed out goes on in the background and is resumed by
    /// calling it again, never by another call. Past `RETRIABLE_FOR` the producer is taken for
    /// stuck. Ok(Err): the call failed for good (abortable or fatal).
    async fn call<F>(&self, what: &'static str, f: F) -> Result<Result<(), KafkaError>, TxError>
    where
        F: Fn(&ThreadedProducer<Deliveries>, Duration) -> Result<(), KafkaError>
            + Clone
            + Send
            + 'static,
    {
        let deadline = std::time::Instant::now() + RETRIABLE_FOR;
        loop {
            match self.blocking(what, f.clone()).await? {
                Err(KafkaError::Transaction(e)) if e.is_retriable() && !e.txn_requires_abort() => {
                    if std::time::Instant::now() > deadline {
                        return Err(TxError::Stuck(what, RETRIABLE_FOR));
                    }
                    tracing::debug!(id = &*self.id, what, error = %e, "Transactional call failed with a retriable error; calling it again.");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                r => return Ok(r),
            }
        }
    }

    /// Aborts the transaction (again while retriable); Err only when the producer is stuck or
    /// cannot abort (fatal: it is given up like a fenced one).
    async fn abort(&self) -> Result<(), TxError> {
        match self
            .call("abort_transaction", |p, t| p.abort_transaction(t))
            .await?
        {
            Ok(()) => Ok(()),
            Err(e) => {
                tracing::warn!(id = &*self.id, error = %e, "Aborting the Kafka transaction failed.");
                Err(TxError::Fenced(e))
            }
        }
    }

    /// A transaction that failed with `e`: aborted when librdkafka says it must (or may) be,
    /// given up when the producer cannot go on (fatal, fenced).
    async fn failed(&self, e: KafkaError) -> TxError {
        let e = classify(e);
        if let TxError::Retry(_) = &e {
            if let Err(stuck_or_fatal) = self.abort().await {
                return stuck_or_fatal;
            }
        }
        e
    }

    /// Produces every record and commits `offsets` for the group, all in one transaction.
    pub async fn publish(
        &self,
        records: &[OutRecord<'_>],
        offsets: TopicPartitionList,
        group: ConsumerGroupMetadata,
    ) -> Result<TxSteps, TxError> {
        let deliveries = self.producer.context();
        let start = std::time::Instant::now();
        let id = &*self.id;
        // Records of an earlier, aborted transaction are reported (purged) before this one
        // starts, so their failures are not taken for this one's.
        deliveries.settled().await;
        deliveries.take_failure();
        tracing::debug!(id, records = records.len(), "Kafka transaction: begin.");
        self.producer.begin_transaction().map_err(classify)?;
        for r in records {
            loop {
                let mut rec = BaseRecord::<[u8], [u8]>::to(r.topic).headers(r.headers.clone());
                if let Some(k) = r.key {
                    rec = rec.key(k);
                }
                if let Some(p) = r.payload {
                    rec = rec.payload(p);
                }
                deliveries.sending();
                match self.producer.send(rec) {
                    Ok(()) => break,
                    Err((e, _)) => {
                        deliveries.done();
                        if let KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull) = e {
                            tokio::time::sleep(Duration::from_millis(2)).await;
                            continue;
                        }
                        return Err(self.failed(e).await);
                    }
                }
            }
        }
        // Every record is acknowledged before the offsets join the transaction: adding the
        // group to a transaction while its partitions are still being added makes the broker
        // answer CONCURRENT_TRANSACTIONS, and librdkafka retries only after retry.backoff.ms
        // (measured: a 9 ms transaction became 100 ms).
        deliveries.settled().await;
        if let Some(e) = deliveries.take_failure() {
            return Err(self.failed(e).await);
        }
        let produced = std::time::Instant::now();
        tracing::debug!(id, "Kafka transaction: acknowledged; adding offsets.");
        let group = std::sync::Arc::new(group);
        let sent = self
            .call("send_offsets_to_transaction", move |p, t| {
                p.send_offsets_to_transaction(&offsets, &group, t)
            })
            .await?;
        if let Err(e) = sent {
            return Err(self.failed(e).await);
        }
        let offsets_added = std::time::Instant::now();
        tracing::debug!(id, "Kafka transaction: offsets added; committing.");
        if let Err(e) = self
            .call("commit_transaction", |p, t| p.commit_transaction(t))
            .await?
        {
            return Err(self.failed(e).await);
        }
        tracing::debug!(id, "Kafka transaction: committed.");
        Ok(TxSteps {
            produce: produced - start,
            offsets: offsets_added - produced,
            commit: offsets_added.elapsed(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn losing_the_group_generation_gives_the_partition_up() {
        for code in [
            RDKafkaErrorCode::IllegalGeneration,
            RDKafkaErrorCode::UnknownMemberId,
            RDKafkaErrorCode::ProducerFenced,
        ] {
            assert!(
                matches!(
                    classify(KafkaError::MessageProduction(code)),
                    TxError::Fenced(_)
                ),
                "{code:?}"
            );
        }
        for code in [
            RDKafkaErrorCode::BrokerTransportFailure,
            RDKafkaErrorCode::RequestTimedOut,
            RDKafkaErrorCode::QueueFull,
        ] {
            assert!(
                matches!(
                    classify(KafkaError::MessageProduction(code)),
                    TxError::Retry(_)
                ),
                "{code:?}"
            );
        }
    }
}
