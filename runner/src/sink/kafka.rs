//! Kafka output through transactions: one transactional producer per owned input partition
//! (its `transactional.id` names the group and the partition, so a new owner's
//! `init_transactions` fences a zombie). Each transaction carries the drafts and dead letters of
//! a run of that partition's messages and commits the consumer group's offset past them.

use rdkafka::consumer::ConsumerGroupMetadata;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::{ClientConfig, TopicPartitionList};
use std::time::Duration;

/// One record to produce, borrowing its bytes.
#[derive(Debug, Clone)]
pub struct OutRecord<'a> {
    pub topic: &'a str,
    pub key: Option<&'a [u8]>,
    pub payload: Option<&'a [u8]>,
    pub headers: &'a OwnedHeaders,
}

/// Builds headers from (name, value) pairs.
pub fn headers<'v>(pairs: impl IntoIterator<Item = (&'v str, &'v [u8])>) -> OwnedHeaders {
    pairs
        .into_iter()
        .fold(OwnedHeaders::new(), |h, (key, value)| {
            h.insert(Header {
                key,
                value: Some(value),
            })
        })
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
}

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

/// The transactional producer of one input partition.
#[derive(Clone)]
pub struct TxProducer {
    producer: FutureProducer,
    timeout: Duration,
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
        let producer: FutureProducer = config.create()?;
        let p = producer.clone();
        tokio::task::spawn_blocking(move || p.init_transactions(timeout))
            .await
            .map_err(|_| KafkaError::Canceled)??;
        Ok(TxProducer { producer, timeout })
    }

    async fn blocking(
        &self,
        f: impl FnOnce(&FutureProducer, Duration) -> Result<(), KafkaError> + Send + 'static,
    ) -> Result<(), KafkaError> {
        let p = self.producer.clone();
        let t = self.timeout;
        tokio::task::spawn_blocking(move || f(&p, t))
            .await
            .map_err(|_| KafkaError::Canceled)?
    }

    async fn abort(&self) {
        if let Err(e) = self.blocking(|p, t| p.abort_transaction(t)).await {
            tracing::warn!(error = %e, "Aborting the Kafka transaction failed.");
        }
    }

    /// Produces every record and commits `offsets` for the group, all in one transaction.
    pub async fn publish(
        &self,
        records: &[OutRecord<'_>],
        offsets: TopicPartitionList,
        group: ConsumerGroupMetadata,
    ) -> Result<(), TxError> {
        self.producer.begin_transaction().map_err(classify)?;
        let attempt = uuid::Uuid::new_v4().to_string();
        let mut deliveries = Vec::with_capacity(records.len());
        for r in records {
            loop {
                let headers = r.headers.clone().insert(Header {
                    key: crate::pipeline::header::TX_ATTEMPT,
                    value: Some(attempt.as_bytes()),
                });
                let mut rec = FutureRecord::<[u8], [u8]>::to(r.topic).headers(headers);
                if let Some(k) = r.key {
                    rec = rec.key(k);
                }
                if let Some(p) = r.payload {
                    rec = rec.payload(p);
                }
                match self.producer.send_result(rec) {
                    Ok(f) => {
                        deliveries.push(f);
                        break;
                    }
                    Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                        tokio::time::sleep(Duration::from_millis(2)).await;
                    }
                    Err((e, _)) => {
                        self.abort().await;
                        return Err(classify(e));
                    }
                }
            }
        }
        // Every record is acknowledged before the offsets join the transaction: adding the
        // group to a transaction while its partitions are still being added makes the broker
        // answer CONCURRENT_TRANSACTIONS, and librdkafka retries only after retry.backoff.ms
        // (measured: a 9 ms transaction became 100 ms).
        let mut failed = None;
        for d in deliveries {
            match d.await {
                Ok(Ok(_)) => {}
                Ok(Err((e, _))) => {
                    failed.get_or_insert(e);
                }
                Err(_) => {
                    failed.get_or_insert(KafkaError::Canceled);
                }
            }
        }
        if let Some(e) = failed {
            self.abort().await;
            return Err(classify(e));
        }
        let sent = self
            .blocking(move |p, t| p.send_offsets_to_transaction(&offsets, &group, t))
            .await;
        let committed = match sent {
            Ok(()) => self.blocking(|p, t| p.commit_transaction(t)).await,
            Err(e) => Err(e),
        };
        if let Err(e) = committed {
            let e = classify(e);
            if matches!(e, TxError::Retry(_)) {
                self.abort().await;
            }
            return Err(e);
        }
        Ok(())
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
