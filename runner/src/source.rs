//! A pipeline's source: a Kafka consumer in a consumer group. Offsets are never committed by
//! the consumer: they are committed inside the Kafka transactions that publish a partition's
//! results (`delivery/`). Rebalances are handed to the delivery loop, which takes a newly
//! assigned partition over before it processes any of its messages.

use crate::events::Events;
use crate::retry::stopped;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, Rebalance, StreamConsumer};
use rdkafka::error::{KafkaError, KafkaResult};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::{ClientConfig, ClientContext, TopicPartitionList};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{watch, Notify};

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
    pub rebalances: Arc<Rebalances>,
}

impl ClientContext for SourceContext {
    fn error(&self, error: KafkaError, reason: &str) {
        log_client_error(error, reason)
    }
}

/// librdkafka's global errors, as the runner logs them: the end of a partition (reported when
/// `enable.partition.eof` is on) is a normal event, not an error.
pub fn log_client_error(error: KafkaError, reason: &str) {
    if matches!(error, KafkaError::PartitionEOF(_))
        || error.rdkafka_error_code() == Some(RDKafkaErrorCode::PartitionEOF)
    {
        tracing::debug!(reason, "Reached the end of a partition.");
    } else {
        tracing::error!(error = %error, reason, "librdkafka: global error.");
    }
}

/// The context of a consumer that reads topics to their end (operators' tools, the demo).
#[derive(Debug, Default, Clone, Copy)]
pub struct ReaderContext;

impl ClientContext for ReaderContext {
    fn error(&self, error: KafkaError, reason: &str) {
        log_client_error(error, reason)
    }
}

impl ConsumerContext for ReaderContext {}

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

pub type SourceConsumer = StreamConsumer<SourceContext>;

/// Creates the consumer and subscribes it to the input topic.
pub fn subscribe(
    config: &ClientConfig,
    topic: &str,
) -> KafkaResult<(SourceConsumer, Arc<Rebalances>)> {
    let rebalances = Arc::new(Rebalances::default());
    let consumer: SourceConsumer = config.create_with_context(SourceContext {
        rebalances: rebalances.clone(),
    })?;
    consumer.subscribe(&[topic])?;
    Ok((consumer, rebalances))
}

/// Asks the broker for `topic`'s metadata every 2 s; an unanswered probe marks Kafka
/// unreachable (health degraded) until one is answered again. A broker that is frozen or cut
/// off is seen this way even when no write is in flight. `config` is the pipeline's consumer
/// configuration; the probe never joins its group.
pub async fn probe(
    mut config: ClientConfig,
    topic: String,
    events: Arc<Events>,
    mut shutdown: watch::Receiver<bool>,
) {
    if let Some(group) = config.get("group.id").map(|g| format!("{g}-probe")) {
        config.set("group.id", group);
    }
    let client: BaseConsumer = match config.create() {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(error = %e, "Cannot create the Kafka probe; reachability is not reported.");
            return;
        }
    };
    let client = Arc::new(client);
    loop {
        let c = client.clone();
        let t = topic.clone();
        let ok = tokio::task::spawn_blocking(move || {
            c.fetch_metadata(Some(&t), Duration::from_secs(2)).is_ok()
        })
        .await
        .unwrap_or(false);
        if events.kafka_reachable(ok) {
            if ok {
                tracing::info!(pipeline = events.pipeline(), "Kafka answers again.");
            } else {
                tracing::warn!(
                    pipeline = events.pipeline(),
                    "Kafka does not answer metadata requests; health is degraded."
                );
            }
        }
        tokio::select! {
            _ = stopped(&mut shutdown) => return,
            _ = tokio::time::sleep(Duration::from_secs(2)) => {}
        }
    }
}
