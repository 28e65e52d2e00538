//! A pipeline's source: a Kafka consumer in a consumer group. Offsets are never committed by
//! the consumer: they are committed inside the Kafka transactions that publish a partition's
//! results (`delivery/`). Rebalances are handed to the delivery loop, which takes a newly
//! assigned partition over before it processes any of its messages.

use crate::events::Events;
use crate::logging::{ClientLog, LogContext};
use crate::retry::stopped;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, Rebalance, StreamConsumer};
use rdkafka::error::{KafkaError, KafkaResult};
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

/// Hands rebalances to the pipeline; logs through [`ClientLog`].
#[derive(Debug, Default)]
pub struct SourceContext {
    pub rebalances: Arc<Rebalances>,
    pub log: ClientLog,
}

impl ClientContext for SourceContext {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, log_message: &str) {
        self.log.log(level, fac, log_message)
    }

    fn error(&self, error: KafkaError, reason: &str) {
        self.log.error(error, reason)
    }
}

/// The context of a consumer that reads topics to their end (operators' tools, the demo).
pub type ReaderContext = LogContext;

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
    let consumer: SourceConsumer = config
        .create_with_context(SourceContext {
            rebalances: rebalances.clone(),
            log: ClientLog::new(
                format!("consumer {}", config.get("group.id").unwrap_or(topic)),
                config,
            ),
        })
        .map_err(crate::kafka::redact_client_error)?;
    consumer.subscribe(&[topic])?;
    Ok((consumer, rebalances))
}

/// Asks the brokers for `topic`'s metadata every 2 s, through the client of the start-up check
/// ([`crate::startup::KafkaCheck`]): an unanswered probe or refused credentials mark Kafka
/// unreachable; the topic gone or no longer readable is a condition of its own
/// (`input_topic_missing`, …); each holds (health degraded, not ready) until a probe finds it
/// gone. A broker that is frozen or cut off is seen this way even when no write is in flight.
/// `config` is the pipeline's consumer configuration; the probe never joins its group nor
/// creates the topic.
pub async fn probe(
    config: ClientConfig,
    topic: String,
    events: Arc<Events>,
    mut shutdown: watch::Receiver<bool>,
) {
    let check = match crate::startup::KafkaCheck::new(&config, &topic) {
        Ok(c) => Arc::new(c),
        Err(e) => {
            tracing::warn!(error = %e, "Cannot create the Kafka probe; reachability is not reported.");
            return;
        }
    };
    loop {
        let c = check.clone();
        if let Ok(result) =
            tokio::task::spawn_blocking(move || c.check(Duration::from_secs(2))).await
        {
            crate::startup::probed(&events, &result);
        }
        tokio::select! {
            _ = stopped(&mut shutdown) => return,
            _ = tokio::time::sleep(Duration::from_secs(2)) => {}
        }
    }
}
