//! The campaign source: a Kafka consumer in a consumer group. Offsets are never stored
//! automatically: the pipeline stores them once both sinks took a batch, and they are committed
//! periodically, on partition revocation and on shutdown.

use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer,
};
use rdkafka::error::{KafkaError, KafkaResult, RDKafkaErrorCode};
use rdkafka::{ClientConfig, ClientContext, TopicPartitionList};

/// Logs rebalances and commits stored offsets before partitions are taken away.
#[derive(Debug, Default)]
pub struct SourceContext;

impl ClientContext for SourceContext {}

fn describe(tpl: &TopicPartitionList) -> String {
    tpl.elements()
        .iter()
        .map(|e| format!("{}/{}", e.topic(), e.partition()))
        .collect::<Vec<_>>()
        .join(",")
}

impl ConsumerContext for SourceContext {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Revoke(tpl) => {
                tracing::info!(partitions = %describe(tpl), "Partitions revoked; committing stored offsets.");
                commit_stored(consumer);
            }
            Rebalance::Assign(tpl) => {
                tracing::info!(partitions = %describe(tpl), "Partitions assigned.")
            }
            Rebalance::Error(e) => tracing::warn!(error = %e, "Rebalance error."),
        }
    }

    fn commit_callback(&self, result: KafkaResult<()>, offsets: &TopicPartitionList) {
        match result {
            Ok(()) => tracing::trace!(offsets = ?offsets, "Offsets committed."),
            Err(KafkaError::ConsumerCommit(RDKafkaErrorCode::NoOffset)) => {}
            Err(e) => {
                tracing::warn!(error = %e, "Offset commit failed; it is retried with the next commit.")
            }
        }
    }
}

/// Commits what was stored, synchronously. Nothing stored is not an error.
pub fn commit_stored<C: Consumer<SourceContext>>(consumer: &C) {
    match consumer.commit_consumer_state(CommitMode::Sync) {
        Ok(()) | Err(KafkaError::ConsumerCommit(RDKafkaErrorCode::NoOffset)) => {}
        Err(e) => tracing::warn!(error = %e, "Committing stored offsets failed."),
    }
}

pub type CampaignConsumer = StreamConsumer<SourceContext>;

/// Creates the consumer and subscribes it to the input topic.
pub fn subscribe(config: &ClientConfig, topic: &str) -> KafkaResult<CampaignConsumer> {
    let consumer: CampaignConsumer = config.create_with_context(SourceContext)?;
    consumer.subscribe(&[topic])?;
    Ok(consumer)
}
