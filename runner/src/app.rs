//! Wiring: starts the process's shared parts, the status endpoint (it answers during start-up,
//! saying what each pipeline waits for), then every enabled pipeline from a checked
//! [`Config`], all at the same time and within the start-up deadline; stops them as an
//! ordered drain, each pipeline before its deadline.

use crate::clock::{Clock, SystemClock};
use crate::config::Config;
use crate::events::{Events, Stats};
use crate::metrics::Metrics;
use crate::pipelines::{campaigns, store_revenue, Shared, Task};
use anyhow::{Context, Result};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// Options a test or the demo may change; production uses the defaults (no configuration file
/// reaches them).
#[derive(Debug, Clone)]
pub struct RunOptions {
    pub clock: Arc<dyn Clock>,
    /// The broker is librdkafka's in-process mock cluster (the demo, the fast tests). It accepts
    /// the offsets a Kafka transaction commits but does not store them, so each offset is also
    /// committed the plain way after its transaction: that is what lets a restart resume there.
    pub mock_cluster: bool,
}

impl Default for RunOptions {
    fn default() -> Self {
        RunOptions {
            clock: Arc::new(SystemClock),
            mock_cluster: false,
        }
    }
}

/// A started runner.
#[derive(Debug)]
pub struct Running {
    pub metrics: Metrics,
    /// The campaign pipeline, when enabled.
    pub campaigns: Option<campaigns::Running>,
    /// The store-revenue pipeline, when enabled.
    pub store_revenue: Option<store_revenue::Running>,
    /// Where the status endpoint listens, when configured.
    pub status_addr: Option<std::net::SocketAddr>,
    shutdown: watch::Sender<bool>,
    hard_stop: watch::Sender<bool>,
    tasks: Vec<Task>,
    status: Option<JoinHandle<()>>,
}

/// Starts every enabled pipeline; returns once each consumes. Fails when one cannot start: at
/// once for what only the configuration can fix (rules refused, a schema that does not fit),
/// at the start-up deadline for what is missing outside (`startup.rs`), unless configured to
/// wait on.
pub async fn start(config: Config, options: RunOptions) -> Result<Running> {
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let (hard_tx, hard_rx) = watch::channel(false);
    let shared = Shared {
        metrics: Metrics::new(),
        kafka: config.kafka.clone(),
        postgres: config.postgres_url.clone(),
        instance_id: format!("{}-{}", hostname(), uuid::Uuid::new_v4()),
        clock: options.clock,
        mock_cluster: options.mock_cluster,
        startup: config.startup.deadline(),
        shutdown: shutdown_rx.clone(),
        hard_stop: hard_rx,
    };
    // Each pipeline's events exist before it starts, so that the status endpoint answers from
    // the start and says what start-up waits for.
    let starting = |enabled: bool, name: &str| {
        enabled.then(|| {
            let events = Arc::new(Events::new(&shared.metrics, name));
            events.starting();
            events
        })
    };
    let campaign_events = starting(config.campaigns.is_some(), campaigns::NAME);
    let revenue_events = starting(config.store_revenue.is_some(), store_revenue::NAME);
    let events: Vec<Arc<Events>> = campaign_events
        .iter()
        .chain(&revenue_events)
        .cloned()
        .collect();
    let (status_addr, status) = match config.status_listen {
        Some(addr) => {
            let (bound, task) =
                crate::status::serve(addr, events, shared.metrics.clone(), shutdown_rx)
                    .await
                    .with_context(|| format!("starting the status endpoint on {addr}"))?;
            (Some(bound), Some(task))
        }
        None => (None, None),
    };
    // The pipelines start at the same time, each waiting for what it needs; the first that
    // cannot start stops the start of the others.
    let (campaigns, store_revenue) = tokio::try_join!(
        async {
            match (&config.campaigns, &campaign_events) {
                (Some(cfg), Some(events)) => campaigns::start(&shared, cfg, events.clone())
                    .await
                    .context("starting the campaign pipeline")
                    .map(Some),
                _ => Ok(None),
            }
        },
        async {
            match (&config.store_revenue, &revenue_events) {
                (Some(cfg), Some(events)) => store_revenue::start(&shared, cfg, events.clone())
                    .await
                    .context("starting the store-revenue pipeline")
                    .map(Some),
                _ => Ok(None),
            }
        },
    )?;
    let mut tasks = Vec::new();
    let campaigns = campaigns.map(|(running, task)| {
        tasks.push(task);
        running
    });
    let store_revenue = store_revenue.map(|(running, task)| {
        tasks.push(task);
        running
    });
    Ok(Running {
        metrics: shared.metrics,
        campaigns,
        store_revenue,
        status_addr,
        shutdown: shutdown_tx,
        hard_stop: hard_tx,
        tasks,
        status,
    })
}

impl Running {
    /// The campaign pipeline.
    ///
    /// # Panics
    /// When it is not enabled.
    pub fn campaigns(&self) -> &campaigns::Running {
        self.campaigns
            .as_ref()
            .expect("the campaign pipeline is enabled")
    }

    /// The store-revenue pipeline.
    ///
    /// # Panics
    /// When it is not enabled.
    pub fn store_revenue(&self) -> &store_revenue::Running {
        self.store_revenue
            .as_ref()
            .expect("the store-revenue pipeline is enabled")
    }

    /// Every pipeline's counters.
    pub fn stats(&self) -> Vec<Stats> {
        self.tasks.iter().map(|t| t.events.stats()).collect()
    }

    /// Ordered drain: stop consuming, finish the unit in hand, flush, commit — each pipeline
    /// within its shutdown deadline; past it, abandon what is in hand (it is consumed again
    /// next time). Returns every pipeline's counters.
    pub async fn stop(mut self) -> Result<Vec<Stats>> {
        let _ = self.shutdown.send(true);
        let deadline = self
            .tasks
            .iter()
            .map(|t| t.shutdown_timeout)
            .max()
            .unwrap_or_default();
        let drained = tokio::time::timeout(
            deadline,
            futures::future::join_all(self.tasks.iter_mut().map(|t| &mut t.delivery)),
        )
        .await;
        if drained.is_err() {
            tracing::warn!(deadline = ?deadline, "Shutdown deadline passed; abandoning what is in hand.");
            let _ = self.hard_stop.send(true);
            for t in &mut self.tasks {
                if tokio::time::timeout(Duration::from_secs(10), &mut t.delivery)
                    .await
                    .is_err()
                {
                    t.delivery.abort();
                }
            }
        }
        // The rest stops at the same signal; none may hold the exit up for long.
        let rest = self
            .tasks
            .iter_mut()
            .flat_map(|t| t.background.drain(..))
            .chain(self.status.take());
        for mut task in rest {
            if tokio::time::timeout(Duration::from_secs(5), &mut task)
                .await
                .is_err()
            {
                task.abort();
            }
        }
        let stats = self.stats();
        tracing::info!(stats = ?stats, "Runner stopped.");
        Ok(stats)
    }

    /// Runs until `signal` resolves or a pipeline ends by itself (an error), then stops.
    pub async fn run_until(mut self, signal: impl Future<Output = ()>) -> Result<Vec<Stats>> {
        if self.tasks.is_empty() {
            signal.await;
            return self.stop().await;
        }
        tokio::select! {
            _ = signal => self.stop().await,
            (r, i, _) = futures::future::select_all(self.tasks.iter_mut().map(|t| &mut t.delivery)) => {
                let name = self.tasks[i].events.pipeline().to_string();
                r.with_context(|| format!("the {name} pipeline's task failed"))?;
                anyhow::bail!("the {name} pipeline stopped by itself")
            }
        }
    }
}

/// Starts a runner and runs it until `shutdown` resolves (which may happen during start-up:
/// then nothing was consumed and it returns at once).
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> Result<Vec<Stats>> {
    tokio::pin!(shutdown);
    let running = tokio::select! {
        biased;
        _ = &mut shutdown => {
            tracing::info!("Stopped during start-up; nothing was consumed.");
            return Ok(Vec::new());
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
