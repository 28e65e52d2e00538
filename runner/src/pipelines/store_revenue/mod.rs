//! The store-revenue pipeline (docs/SPEC.md, "Pipeline 2"): sales validated by the rules
//! component (`wit/sales/sales-rules.wit`, a batch per call), summed exactly per store in
//! tumbling event-time windows with a watermark per input partition (`windows.rs`), the state
//! kept in PostgreSQL (`state.rs`), committed and emitted at every trigger (`task.rs`): the
//! table `store_revenue_windows`, one Kafka record per final window, the console table.

pub mod config;
pub mod console;
pub mod contract;
pub mod state;
pub mod task;
pub mod windows;

use super::{Shared, Task};
use crate::events::Events;
use anyhow::{Context, Result};
use config::StoreRevenueConfig;
use contract::{Reloader, RulesEngine, RulesHandle, SalesEvaluator};
use std::sync::Arc;

/// The pipeline's name in metrics, logs and `/status`.
pub const NAME: &str = "store_revenue";

/// The started pipeline: what operators and tests reach into.
#[derive(Debug)]
pub struct Running {
    pub events: Arc<Events>,
    pub rules: RulesHandle,
    pub engine: RulesEngine,
    /// Reloads the rules file on demand (what a file change or SIGHUP triggers).
    pub reloader: Reloader,
}

impl Running {
    pub fn stats(&self) -> crate::events::Stats {
        self.events.stats()
    }
}

/// Starts the pipeline: rules loaded and checked, what it needs from outside there (PostgreSQL,
/// the brokers, the input topic: `startup.rs`), tables, the rules watch, the consumer, then the
/// loop. `events` report the start already.
pub async fn start(
    shared: &Shared,
    cfg: &StoreRevenueConfig,
    events: Arc<Events>,
) -> Result<(Running, Task)> {
    let loaded = super::Rules::load(NAME, cfg.rules.limits.clone(), &cfg.rules.path, &events)?;
    crate::startup::wait_until_reachable(
        shared,
        &events,
        &shared.kafka.consumer_config(&cfg.group_id),
        &cfg.input_topic,
    )
    .await?;

    let pg = crate::db::connect(shared.postgres.as_str())
        .await
        .context("connecting to PostgreSQL")?;
    state::ensure_schema(&pg)
        .await
        .context("creating the store-revenue tables")?;
    drop(pg);

    let reloads = loaded
        .watch(cfg.rules.watch, cfg.rules.settle, shared.shutdown.clone())
        .await;
    let super::Rules {
        engine,
        handle: rules,
        reloader,
    } = loaded;

    let mut consumer_config = shared.kafka.consumer_config(&cfg.group_id);
    // The end of a partition is how an idle partition is told from a lagging one.
    consumer_config.set("enable.partition.eof", "true");
    // librdkafka pauses fetching a partition for `fetch.queue.backoff.ms` (1 s by default) once
    // its local queue is full; one compressed fetch of small sales fills it, so the default
    // holds the pipeline to about a fifth of what it counts otherwise (bench-results/windows.md).
    if consumer_config.get("fetch.queue.backoff.ms").is_none() {
        consumer_config.set("fetch.queue.backoff.ms", "10");
    }
    let (consumer, rebalances) = crate::source::subscribe(&consumer_config, &cfg.input_topic)
        .context("creating the Kafka consumer")?;
    let probe = tokio::spawn(crate::source::probe(
        consumer_config,
        cfg.input_topic.clone(),
        events.clone(),
        shared.shutdown.clone(),
    ));
    let units = state::Units {
        window_secs: cfg.window_secs,
        minor_digits: cfg.minor_digits,
    };
    let revenue = task::Revenue::new(
        cfg.clone(),
        task::Kafka {
            consumer: Arc::new(consumer),
            rebalances,
            producer: shared.kafka.producer_config(),
            transactional_prefix: format!("store-revenue-{}-{}", cfg.group_id, cfg.input_topic),
            plain_offset_commits: shared.mock_cluster,
        },
        SalesEvaluator::new(rules.clone()),
        (0..cfg.parallel_commits)
            .map(|_| state::State::new(shared.postgres.as_str().to_string(), units))
            .collect(),
        shared.instance_id.clone(),
        events.clone(),
        shared.clock.clone(),
        cfg.console.then_some(console::Console {
            window_secs: cfg.window_secs,
            minor_digits: cfg.minor_digits,
        }),
    );
    let delivery = tokio::spawn(revenue.run(shared.shutdown.clone(), shared.hard_stop.clone()));
    events.started();
    tracing::info!(
        pipeline = NAME,
        brokers = shared.kafka.brokers(),
        input = %cfg.input_topic,
        output = %cfg.output_topic,
        dead_letters = %cfg.dead_letter_topic,
        window_s = cfg.window_secs,
        lateness_s = cfg.lateness_secs,
        trigger = ?cfg.trigger,
        "Pipeline consuming."
    );
    let task = Task {
        events: events.clone(),
        delivery,
        background: vec![reloads, probe],
        shutdown_timeout: cfg.shutdown_timeout,
    };
    Ok((
        Running {
            events,
            rules,
            engine,
            reloader,
        },
        task,
    ))
}
