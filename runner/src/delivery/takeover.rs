//! Taking a partition over, on every assignment (so on every start too): a transactional
//! producer of its own (whose `init_transactions` fences any older producer with the same id
//! and aborts its open transaction), a new fence epoch in PostgreSQL (fencing a zombie's next
//! PostgreSQL transaction), then the outbox judged by the committed offset: entries below it
//! were published already and are deleted; the others are published now, in one transaction
//! with the offset past them, and the consumer seeks past them.

use super::outbox::{Kept, OutboxEntry};
use super::producer::TxProducer;
use super::stage::Flight;
use super::{Delivery, Owned, Pipeline};
use crate::retry::{Abandoned, Backoff};
use rdkafka::consumer::Consumer;
use rdkafka::{Offset, TopicPartitionList};
use std::time::Duration;
use tokio::sync::watch;

/// Kafka transactions wait this long for the broker.
const TX_TIMEOUT: Duration = Duration::from_secs(10);

impl<P: Pipeline> Delivery<P> {
    /// Takes a newly assigned partition over (see the module's documentation).
    pub(super) async fn recover(
        &mut self,
        topic: &str,
        partition: i32,
        mut stop: watch::Receiver<bool>,
    ) -> Result<(), Abandoned> {
        let backoff_max = self.cfg.sink_retry_max_backoff;
        let tx_id = format!("{}-{topic}-{partition}", self.cfg.transactional_prefix);
        let mut backoff = Backoff::new(backoff_max);
        let producer = loop {
            match TxProducer::create(&self.cfg.producer, &tx_id, TX_TIMEOUT).await {
                Ok(p) => break p,
                Err(e) => {
                    backoff
                        .wait(&mut stop, |attempt, pause| {
                            self.events.sink_retry("kafka", &e, attempt, pause)
                        })
                        .await?
                }
            }
        };
        let events = self.events.clone();
        let fence = self
            .pg
            .claim(
                topic,
                partition,
                &self.instance_id,
                &events,
                backoff_max,
                &mut stop,
            )
            .await
            .map_err(|_| Abandoned)?;
        let committed = self.committed_offset(topic, partition, &mut stop).await?;
        let outbox = self
            .pg
            .load_outbox(&fence, &events, backoff_max, &mut stop)
            .await
            .map_err(|_| Abandoned)?;
        let pending: Vec<OutboxEntry> = outbox
            .into_iter()
            .filter(|e| committed.is_none_or(|c| e.source_offset >= c))
            .collect();
        let mut next_offset = committed.unwrap_or(0);
        if let Some(last) = pending.last().map(|e| e.source_offset) {
            let kept = Kept::all(&pending);
            let flight = self
                .publisher
                .publish(
                    &producer,
                    (topic, partition),
                    last,
                    &[(&pending, &kept)],
                    &mut stop,
                )
                .await?;
            match flight {
                Flight::Published => {}
                Flight::Fenced => return Ok(()),
                // Tried again by the loop while the partition is assigned to this runner.
                Flight::Lost => {
                    self.lost.insert((topic.to_string(), partition));
                    return Ok(());
                }
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
        }
        // Kafka answered the new producer (and took the outbox, if there was one): whatever made
        // it fail before (a stuck producer given up, a coordinator lost) is over.
        self.events.sink_recovered("kafka");
        // Where this runner goes on from: past the outbox, or the committed offset. A partition
        // taken over again (its producer lost) has been consumed further already.
        self.seek(topic, partition, next_offset).await;
        if let Some(through) = next_offset.checked_sub(1) {
            let _ = self
                .pg
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

    /// The group's committed offset of the partition (None: nothing committed yet). A failed
    /// read is retried, never taken for "nothing committed": that would publish again what the
    /// outbox still holds of units already published.
    async fn committed_offset(
        &self,
        topic: &str,
        partition: i32,
        stop: &mut watch::Receiver<bool>,
    ) -> Result<Option<i64>, Abandoned> {
        let mut backoff = Backoff::new(self.cfg.sink_retry_max_backoff);
        loop {
            let consumer = self.consumer.clone();
            let mut tpl = TopicPartitionList::new();
            tpl.add_partition(topic, partition);
            let r = tokio::task::spawn_blocking(move || {
                consumer.committed_offsets(tpl, Duration::from_secs(10))
            })
            .await;
            let error = match r {
                Ok(Ok(tpl)) => {
                    let element = tpl.elements().into_iter().next();
                    match element.map(|e| (e.offset(), e.error())) {
                        Some((_, Err(e))) => e.to_string(),
                        Some((Offset::Offset(o), Ok(()))) => return Ok(Some(o)),
                        _ => return Ok(None),
                    }
                }
                Ok(Err(e)) => e.to_string(),
                Err(e) => e.to_string(),
            };
            backoff
                .wait(stop, |attempt, pause| {
                    tracing::warn!(error, topic, partition, attempt, backoff_ms = pause.as_millis() as u64, "Cannot read the committed offset of a partition being taken over; retrying.")
                })
                .await?;
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
            // Not fatal on a new assignment: consuming starts at the committed offset, and
            // messages before `offset` are skipped by the pipeline anyway.
            tracing::debug!(error = %e, topic, partition, offset, "Seek after recovery failed.");
        }
    }
}
