//! The campaign source: a Kafka consumer in a consumer group. Offsets are never committed by
//! the consumer: they are committed inside the Kafka transactions that publish a partition's
//! results (see `pipeline.rs`). Rebalances are handed to the pipeline, which recovers a newly
//! assigned partition before it processes any of its messages.

use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, Rebalance, StreamConsumer};
use rdkafka::error::KafkaResult;
use rdkafka::{ClientConfig, ClientContext, TopicPartitionList};
use std::sync::Mutex;
use tokio::sync::Notify;

/// A change of the partitions this consumer owns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RebalanceEvent {
    Assigned(Vec<(String, i32)>),
    Revoked(Vec<(String, i32)>),
}

/// Rebalances seen by the consumer, waiting for the pipeline.
#[derive(Debug, Default)]
pub struct Rebalances {
    queue: Mutex<Vec<RebalanceEvent>>,
    pub notify: Notify,
}

impl Rebalances {
    pub fn take(&self) -> Vec<RebalanceEvent> {
        std::mem::take(&mut *self.queue.lock().expect("rebalance lock"))
    }

    fn push(&self, e: RebalanceEvent) {
        self.queue.lock().expect("rebalance lock").push(e);
        self.notify.notify_one();
    }
}

fn partitions(tpl: &TopicPartitionList) -> Vec<(String, i32)> {
    tpl.elements()
        .iter()
        .map(|e| (e.topic().to_string(), e.partition()))
        .collect()
}

/// Hands rebalances to the pipeline.
#[derive(Debug, Default)]
pub struct SourceContext {
    pub rebalances: std::sync::Arc<Rebalances>,
}

impl ClientContext for SourceContext {}

impl ConsumerContext for SourceContext {
    fn pre_rebalance(&self, _: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Revoke(tpl) => {
                tracing::info!(partitions = ?partitions(tpl), "Partitions revoked.");
                self.rebalances
                    .push(RebalanceEvent::Revoked(partitions(tpl)));
            }
            Rebalance::Assign(_) => {}
            Rebalance::Error(e) => tracing::warn!(error = %e, "Rebalance error."),
        }
    }

    fn post_rebalance(&self, _: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(tpl) = rebalance {
            tracing::info!(partitions = ?partitions(tpl), "Partitions assigned.");
            self.rebalances
                .push(RebalanceEvent::Assigned(partitions(tpl)));
        }
    }
}

pub type CampaignConsumer = StreamConsumer<SourceContext>;

/// Creates the consumer and subscribes it to the input topic.
pub fn subscribe(
    config: &ClientConfig,
    topic: &str,
) -> KafkaResult<(CampaignConsumer, std::sync::Arc<Rebalances>)> {
    let rebalances = std::sync::Arc::new(Rebalances::default());
    let consumer: CampaignConsumer = config.create_with_context(SourceContext {
        rebalances: rebalances.clone(),
    })?;
    consumer.subscribe(&[topic])?;
    Ok((consumer, rebalances))
}
