//! Wiring: builds every part from a checked [`Config`] in dependency order (rules, database,
//! subscribers, Kafka), starts the loops, and stops them as an ordered drain before a deadline.

use crate::cache::SubscriberCache;
use crate::config::Config;
use crate::events::{Events, Stats};
use crate::pipeline::{Clock, Pipeline, SystemClock, Worker};
use crate::rules::{Evaluator, Reloader, RulesEngine, RulesHandle, SandboxLimits};
use crate::sink::feedback::FeedbackSink;
use crate::{db, source};
use anyhow::{Context, Result};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// Options a test or the demo may change; production uses the defaults.
#[derive(Debug, Clone)]
pub struct RunOptions {
    pub clock: Arc<dyn Clock>,
}

impl Default for RunOptions {
    fn default() -> Self {
        RunOptions {
            clock: Arc::new(SystemClock),
        }
    }
}

/// A started runner.
#[derive(Debug)]
pub struct Running {
    pub events: Arc<Events>,
    pub rules: RulesHandle,
    pub cache: SubscriberCache,
    pub engine: RulesEngine,
    /// Reloads the rules file on demand (what a file change or SIGHUP triggers).
    pub reloader: Reloader,
    /// Where the status endpoint listens, when configured.
    pub status_addr: Option<std::net::SocketAddr>,
    shutdown: watch::Sender<bool>,
    hard_stop: watch::Sender<bool>,
    pipeline: JoinHandle<()>,
    background: Vec<JoinHandle<()>>,
    shutdown_timeout: Duration,
}

/// Starts every part; returns once the runner consumes.
pub async fn start(config: Config, options: RunOptions) -> Result<Running> {
    let engine =
        RulesEngine::new(SandboxLimits::from(&config.rules)).context("starting the WASM engine")?;
    let loaded = engine.load_file(&config.rules.path).with_context(|| {
        format!(
            "loading the rules component {}",
            config.rules.path.display()
        )
    })?;
    tracing::info!(rules = %loaded.identity(), path = %config.rules.path.display(), "Rules component loaded.");
    let rules = RulesHandle::new(loaded);
    let events = Arc::new(Events::default());
    events.rules_loaded(rules.current().identity());

    let pg = db::connect(&config.postgres_url)
        .await
        .context("connecting to PostgreSQL")?;
    db::ensure_schema(&pg)
        .await
        .context("checking the PostgreSQL schema")?;
    drop(pg);
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let (hard_tx, hard_rx) = watch::channel(false);
    // Campaigns wait for this: they are never joined against an empty cache.
    let (cache, follower) = SubscriberCache::start(
        config.postgres_url.clone(),
        config.subscribers_full_resync,
        events.clone(),
        shutdown_rx.clone(),
    )
    .await
    .context("loading subscribers")?;

    let (consumer, rebalances) =
        source::subscribe(&config.kafka.consumer_config(), &config.kafka.input_topic)
            .context("creating the Kafka consumer")?;

    let reloader = Reloader::new(
        engine.clone(),
        rules.clone(),
        config.rules.path.clone(),
        events.clone(),
    );
    let reloader_task = reloader
        .clone()
        .spawn(config.rules.watch, config.rules.settle, shutdown_rx.clone())
        .await;
    let status = match config.status_listen {
        Some(addr) => {
            let (bound, task) = crate::status::serve(addr, events.clone(), shutdown_rx.clone())
                .await
                .with_context(|| format!("starting the status endpoint on {addr}"))?;
            Some((bound, task))
        }
        None => None,
    };
    let probe = tokio::spawn(probe_kafka(
        consumer_probe_config(&config),
        config.kafka.input_topic.clone(),
        events.clone(),
        shutdown_rx.clone(),
    ));
    let instance_id = format!("{}-{}", hostname(), uuid::Uuid::new_v4());
    let pipeline = Pipeline::new(
        config.pipeline.clone(),
        config.kafka.output_topic.clone(),
        config.kafka.dead_letter_topic.clone(),
        Arc::new(consumer),
        rebalances,
        Worker {
            evaluator: Evaluator::new(rules.clone()),
            clients: Vec::new(),
        },
        cache.clone(),
        config.kafka.producer_config(),
        format!("campaign-runner-{}", config.kafka.group_id),
        instance_id,
        FeedbackSink::new(config.postgres_url.clone()),
        events.clone(),
        options.clock,
    );
    let pipeline = tokio::spawn(pipeline.run(shutdown_rx, hard_rx));
    tracing::info!(
        brokers = config.kafka.brokers(),
        input = %config.kafka.input_topic,
        output = %config.kafka.output_topic,
        dead_letters = %config.kafka.dead_letter_topic,
        "Runner consuming."
    );
    Ok(Running {
        events,
        rules,
        cache,
        engine,
        reloader,
        status_addr: status.as_ref().map(|(a, _)| *a),
        shutdown: shutdown_tx,
        hard_stop: hard_tx,
        pipeline,
        background: [
            Some(follower),
            Some(reloader_task),
            Some(probe),
            status.map(|(_, t)| t),
        ]
        .into_iter()
        .flatten()
        .collect(),
        shutdown_timeout: config.pipeline.shutdown_timeout,
    })
}

impl Running {
    pub fn stats(&self) -> Stats {
        self.events.stats()
    }

    /// Ordered drain: stop consuming, finish the batch in hand, flush, commit — within the
    /// shutdown deadline; past it, abandon the batch (it is consumed again next time).
    pub async fn stop(mut self) -> Result<Stats> {
        let _ = self.shutdown.send(true);
        let drained = tokio::time::timeout(self.shutdown_timeout, &mut self.pipeline).await;
        if drained.is_err() {
            tracing::warn!(deadline = ?self.shutdown_timeout, "Shutdown deadline passed; abandoning the batch in hand.");
            let _ = self.hard_stop.send(true);
            if tokio::time::timeout(Duration::from_secs(10), &mut self.pipeline)
                .await
                .is_err()
            {
                self.pipeline.abort();
            }
        }
        for task in self.background.drain(..) {
            let _ = task.await;
        }
        let stats = self.events.stats();
        tracing::info!(stats = ?stats, "Runner stopped.");
        Ok(stats)
    }

    /// Runs until `signal` resolves or the pipeline ends by itself (an error), then stops.
    pub async fn run_until(mut self, signal: impl Future<Output = ()>) -> Result<Stats> {
        tokio::select! {
            _ = signal => self.stop().await,
            r = &mut self.pipeline => {
                r.context("the pipeline task failed")?;
                anyhow::bail!("the pipeline stopped by itself")
            }
        }
    }
}

/// Starts a runner and runs it until `shutdown` resolves (which may happen during start-up:
/// then nothing was consumed and it returns at once).
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> Result<Stats> {
    tokio::pin!(shutdown);
    let running = tokio::select! {
        biased;
        _ = &mut shutdown => {
            tracing::info!("Stopped during start-up; nothing was consumed.");
            return Ok(Stats::default());
        }
        r = start(config, RunOptions::default()) => r?,
    };
    running.run_until(shutdown).await
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "runner".into())
}

fn consumer_probe_config(config: &Config) -> rdkafka::ClientConfig {
    let mut c = config.kafka.consumer_config();
    // The probe only asks for metadata; it never joins the group.
    c.set("group.id", format!("{}-probe", config.kafka.group_id));
    c
}

/// Asks the broker for the input topic's metadata every 2 s; an unanswered probe marks Kafka
/// unreachable (health degraded) until one is answered again. A broker that is frozen or cut
/// off is seen this way even when no write is in flight.
async fn probe_kafka(
    config: rdkafka::ClientConfig,
    topic: String,
    events: Arc<Events>,
    mut shutdown: watch::Receiver<bool>,
) {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use std::sync::atomic::Ordering;
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
        let was = events.kafka_unreachable.swap(!ok, Ordering::Relaxed);
        if was == ok {
            if ok {
                tracing::info!("Kafka answers again.");
            } else {
                tracing::warn!("Kafka does not answer metadata requests; health is degraded.");
            }
        }
        tokio::select! {
            _ = crate::sink::stopped(&mut shutdown) => return,
            _ = tokio::time::sleep(Duration::from_secs(2)) => {}
        }
    }
}
