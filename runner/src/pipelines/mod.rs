//! The pipelines one runner hosts, each in a folder of its own: its contract with its rules
//! (a WIT world, hosted by `sandbox/`), its evaluation, its rows and records (delivered by
//! `delivery/`), its configuration section. What they share is here: the parts of the process
//! every pipeline gets ([`Shared`]), and starting a pipeline's delivery loop ([`spawn`]).

pub mod campaigns;
pub mod store_revenue;

use crate::clock::Clock;
use crate::db::PostgresUrl;
use crate::delivery::{Delivery, DeliveryConfig, PgSide, Pipeline, Source, Tables};
use crate::events::Events;
use crate::kafka::KafkaConfig;
use crate::metrics::Metrics;
use anyhow::{Context, Result};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// What every pipeline of the process gets.
#[derive(Debug, Clone)]
pub struct Shared {
    pub metrics: Metrics,
    pub kafka: KafkaConfig,
    pub postgres: PostgresUrl,
    /// This process, as the owner recorded in the fences (host and a random id).
    pub instance_id: String,
    pub clock: Arc<dyn Clock>,
    /// The broker is librdkafka's mock cluster (see `app::RunOptions`).
    pub mock_cluster: bool,
    /// When start-up must be over, and what happens then (`startup.rs`).
    pub startup: crate::startup::Deadline,
    /// Turns true to stop: finish the unit in hand, drain, exit.
    pub shutdown: watch::Receiver<bool>,
    /// Turns true when the shutdown deadline passed: abandon what is in hand.
    pub hard_stop: watch::Receiver<bool>,
}

/// A started pipeline, as the process sees it.
#[derive(Debug)]
pub struct Task {
    pub events: Arc<Events>,
    /// The delivery loop; it ends after a drain (or a hard stop).
    pub delivery: JoinHandle<()>,
    /// Everything else the pipeline runs (rules reloads, the broker probe, caches).
    pub background: Vec<JoinHandle<()>>,
    pub shutdown_timeout: Duration,
}

/// Where a pipeline reads, writes and keeps its protocol tables.
#[derive(Debug, Clone)]
pub struct Wiring {
    pub group_id: String,
    pub input_topic: String,
    pub tables: Arc<Tables>,
    pub delivery: DeliveryConfig,
}

/// Subscribes the pipeline's consumer, starts the broker probe, and spawns the delivery loop.
/// The delivery tables are created first.
pub async fn spawn<P: Pipeline>(
    shared: &Shared,
    wiring: Wiring,
    pipeline: Arc<P>,
    worker: P::Worker,
    events: Arc<Events>,
) -> Result<(JoinHandle<()>, JoinHandle<()>)> {
    let pg = crate::db::connect(shared.postgres.as_str())
        .await
        .context("connecting to PostgreSQL")?;
    wiring
        .tables
        .ensure(&pg)
        .await
        .context("creating the delivery tables")?;
    drop(pg);
    // The producer's limits now, each topic's own once the broker has said them (a broker that
    // does not answer, such as librdkafka's mock cluster, must not hold the start up).
    let limits = wiring.delivery.record_limits.clone();
    let producer_only = record_limits(&wiring.delivery.producer, "", "", false).await;
    limits.set(producer_only, shared.mock_cluster);
    if !shared.mock_cluster {
        let (producer, output, dead_letters) = (
            wiring.delivery.producer.clone(),
            wiring.delivery.output_topic.clone(),
            wiring.delivery.dead_letter_topic.clone(),
        );
        tokio::spawn(async move {
            limits.set(
                record_limits(&producer, &output, &dead_letters, true).await,
                true,
            );
        });
    }
    let consumer_config = shared.kafka.consumer_config(&wiring.group_id);
    let (consumer, rebalances) = crate::source::subscribe(&consumer_config, &wiring.input_topic)
        .context("creating the Kafka consumer")?;
    let probe = tokio::spawn(crate::source::probe(
        consumer_config,
        wiring.input_topic.clone(),
        events.clone(),
        shared.shutdown.clone(),
    ));
    let pg = PgSide::new(
        shared.postgres.as_str().to_string(),
        wiring.tables.clone(),
        pipeline.clone(),
    );
    let delivery = Delivery::new(
        wiring.delivery,
        pipeline,
        worker,
        Source {
            consumer: Arc::new(consumer),
            rebalances,
        },
        pg,
        shared.instance_id.clone(),
        events,
    );
    let task = tokio::spawn(delivery.run(shared.shutdown.clone(), shared.hard_stop.clone()));
    Ok((task, probe))
}

/// The largest record the output and dead-letter topics take: the producer's
/// `message.max.bytes`, and each topic's `max.message.bytes` when the broker says it
/// (`describe_topics`: librdkafka's mock cluster cannot).
pub async fn record_limits(
    producer: &rdkafka::ClientConfig,
    output: &str,
    dead_letters: &str,
    describe_topics: bool,
) -> crate::delivery::RecordLimits {
    use rdkafka::admin::{AdminClient, AdminOptions, ResourceSpecifier};
    use rdkafka::client::DefaultClientContext;
    let producer_max: usize = producer
        .get("message.max.bytes")
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    let mut limits = crate::delivery::RecordLimits {
        output: producer_max,
        dead_letters: producer_max,
    };
    if !describe_topics {
        return limits;
    }
    let Ok(admin) = producer.create::<AdminClient<DefaultClientContext>>() else {
        return limits;
    };
    let options = AdminOptions::new().request_timeout(Some(Duration::from_secs(4)));
    let described = admin
        .describe_configs(
            &[
                ResourceSpecifier::Topic(output),
                ResourceSpecifier::Topic(dead_letters),
            ],
            &options,
        )
        .await;
    match described {
        Ok(results) => {
            for (i, r) in results.into_iter().enumerate() {
                let topic_max = r.ok().and_then(|c| {
                    c.get("max.message.bytes")
                        .and_then(|e| e.value.as_deref())
                        .and_then(|v| v.parse::<usize>().ok())
                });
                if let Some(m) = topic_max {
                    let slot = if i == 0 {
                        &mut limits.output
                    } else {
                        &mut limits.dead_letters
                    };
                    *slot = (*slot).min(m);
                }
            }
        }
        Err(e) => {
            tracing::debug!(error = %e, "The topics' max.message.bytes could not be read; the producer's message.max.bytes is the limit.")
        }
    }
    tracing::debug!(
        output,
        dead_letters,
        ?limits,
        "Largest records the topics take."
    );
    limits
}

/// A pipeline's rules component, as a started pipeline holds it: the engine, the swappable
/// handle, and the reloader (file watch, SIGHUP) with its task.
pub struct Rules<C: crate::sandbox::Contract> {
    pub engine: crate::sandbox::RulesEngine<C>,
    pub handle: crate::sandbox::RulesHandle<C>,
    pub reloader: crate::sandbox::Reloader<C>,
}

impl<C: crate::sandbox::Contract> std::fmt::Debug for Rules<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Rules")
            .field("handle", &self.handle)
            .finish_non_exhaustive()
    }
}

impl<C: crate::sandbox::Contract> Rules<C> {
    /// Loads and checks the component at `path` (compile, contract, smoke test), reports it on
    /// `events`.
    pub fn load(
        pipeline: &str,
        limits: crate::sandbox::SandboxLimits,
        path: &std::path::Path,
        events: &Arc<Events>,
    ) -> Result<Rules<C>> {
        let engine =
            crate::sandbox::RulesEngine::<C>::new(limits).context("starting the WASM engine")?;
        let loaded = engine
            .load_file(path)
            .with_context(|| format!("loading the rules component {}", path.display()))?;
        tracing::info!(pipeline, rules = %loaded.identity(), path = %path.display(), "Rules component loaded.");
        let handle = crate::sandbox::RulesHandle::new(loaded);
        let identity = handle.current().identity().clone();
        events.rules_loaded(&identity.version, &identity.sha256);
        let reloader = crate::sandbox::Reloader::new(
            engine.clone(),
            handle.clone(),
            path.to_path_buf(),
            events.clone(),
        );
        Ok(Rules {
            engine,
            handle,
            reloader,
        })
    }

    /// Starts the hot swap: a file watch when `watch`, SIGHUP always.
    pub async fn watch(
        &self,
        watch: bool,
        settle: Duration,
        shutdown: watch::Receiver<bool>,
    ) -> JoinHandle<()> {
        self.reloader.clone().spawn(watch, settle, shutdown).await
    }
}

/// Checks a pipeline section's group and topics: none empty, the three topics different.
/// Problems are added to `problems`, named under `section`.
pub fn check_topics(
    section: &str,
    group_id: &str,
    [input, output, dead_letters]: [&str; 3],
    problems: &mut Vec<String>,
) {
    for (name, v) in [
        ("group_id", group_id),
        ("input_topic", input),
        ("output_topic", output),
        ("dead_letter_topic", dead_letters),
    ] {
        if v.trim().is_empty() {
            problems.push(format!("{section}.{name} must not be empty"));
        }
    }
    if input == output || input == dead_letters || output == dead_letters {
        problems.push(format!(
            "{section}.input_topic, output_topic and dead_letter_topic must be three different topics (got {input:?}, {output:?}, {dead_letters:?})"
        ));
    }
}

/// Checks a pipeline's rules limits: a positive call deadline, memory between 1 and 4096 MiB.
pub fn check_rules_limits(
    section: &str,
    call_timeout: std::time::Duration,
    memory_limit_mib: u64,
    problems: &mut Vec<String>,
) {
    if call_timeout.is_zero() {
        problems.push(format!("{section}.rules.call_timeout must be positive"));
    }
    if !(1..=4096).contains(&memory_limit_mib) {
        problems.push(format!(
            "{section}.rules.memory_limit_mib must be between 1 and 4096 (got {memory_limit_mib})"
        ));
    }
}
