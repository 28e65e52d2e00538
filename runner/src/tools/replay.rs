//! `runner dead-letters replay`: re-drives the campaign pipeline's dead letters (their raw key
//! and value, from the dead-letter topic) through the pipeline with a chosen rules version,
//! exactly once, by the pipeline's own delivery protocol (`delivery/`), in a bounded run over
//! the dead-letter topic's partitions. docs/dead-letter-replay.md is the operator's guide.
//!
//! - Selection: dead letters (read_committed) with a timestamp in [--since, --until), a
//!   `dlq-reason` among --reason, before the end offsets seen at the start, not in the replay
//!   ledger.
//! - Exactly once: each partition of the dead-letter topic is a partition of the delivery
//!   protocol (fence, outbox `campaign_replay_*`, transactional producer, offsets of the group
//!   `{group_id}-replay`), and the ledger `campaign_replay_ledger` (keyed by dead-letter topic,
//!   partition, offset) is written in each unit's PostgreSQL transaction.
//! - A message that fails again is dead-lettered again, to the same topic, with its new reason,
//!   the new rules, its original `source-*` headers, and `replay-of`.

mod pipeline;

pub use pipeline::{Selection, REPLAY_OF};

use crate::clock::{Clock, SystemClock};
use crate::config::{Config, Sources};
use crate::delivery::{Delivery, DeliveryConfig, Outcome, PgSide, Source, Tables, Worker};
use crate::events::Events;
use crate::pipelines::campaigns::cache::{Snapshot, SubscriberCache};
use crate::pipelines::campaigns::contract::CampaignContract;
use crate::pipelines::campaigns::{self, CampaignWorker, Campaigns};
use crate::source::SourceContext;
use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};
use pipeline::{ReplayPipeline, ReplayWorker, Seen};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{Offset, TopicPartitionList};
use serde::Serialize;
use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

const LEDGER_SCHEMA_SQL: &str = include_str!("replay/sql/ledger_schema.sql");
const LEDGER_EXISTS_SQL: &str = include_str!("replay/sql/ledger_exists.sql");
const LEDGER_LOAD_SQL: &str = include_str!("replay/sql/ledger_load.sql");
const LEDGER_RUN_SQL: &str = include_str!("replay/sql/ledger_run.sql");
const SUBSCRIPTIONS_SQL: &str = include_str!("replay/sql/subscriptions.sql");

/// Kafka requests of the set-up (metadata, offsets) wait this long.
const KAFKA_TIMEOUT: Duration = Duration::from_secs(15);

/// The pipeline whose dead letters are replayed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum PipelineKind {
    /// The campaign pipeline (`[pipelines.campaigns]`).
    Campaigns,
    /// The store-revenue pipeline: not replayable (see docs/dead-letter-replay.md).
    #[value(name = "store_revenue", alias = "store-revenue")]
    StoreRevenue,
}

/// `runner dead-letters replay [--since T] [--reason R] [--rules FILE]`.
#[derive(Debug, Args)]
pub struct ReplayArgs {
    /// Runner configuration (TOML), as for `runner run`; environment variables RUNNER__… apply
    /// on top.
    #[arg(long, short)]
    pub config: Option<PathBuf>,
    /// The pipeline whose dead letters are replayed.
    #[arg(long, value_enum, default_value_t = PipelineKind::Campaigns)]
    pub pipeline: PipelineKind,
    /// Only dead letters written at or after T: unix seconds or RFC 3339
    /// (2025-09-02T10:30:00Z) [default: the beginning of the dead-letter topic].
    #[arg(long, value_name = "T", value_parser = crate::produce::parse_event_time)]
    pub since: Option<i64>,
    /// Only dead letters written before T (unix seconds or RFC 3339).
    #[arg(long, value_name = "T", value_parser = crate::produce::parse_event_time)]
    pub until: Option<i64>,
    /// Only dead letters with this `dlq-reason` (repeatable) [default: any reason].
    #[arg(long = "reason", value_name = "R")]
    pub reasons: Vec<String>,
    /// The rules component to replay with, loaded and smoke-tested as the runner loads rules
    /// [default: pipelines.campaigns.rules.path of the configuration].
    #[arg(long, value_name = "FILE")]
    pub rules: Option<PathBuf>,
    /// Evaluate the selected dead letters with the rules and print what would happen; write
    /// nothing anywhere.
    #[arg(long)]
    pub dry_run: bool,
    /// Print the summary as JSON.
    #[arg(long)]
    pub json: bool,
}

/// What a replay does, beyond the configuration.
#[derive(Debug, Clone)]
pub struct ReplayOptions {
    pub selection_since_s: Option<i64>,
    pub selection_until_s: Option<i64>,
    pub reasons: Vec<String>,
    pub rules: Option<PathBuf>,
    pub dry_run: bool,
    pub clock: Arc<dyn Clock>,
    /// The broker is librdkafka's mock cluster (tests): offsets are also committed the plain
    /// way (see `app::RunOptions::mock_cluster`).
    pub mock_cluster: bool,
}

impl ReplayOptions {
    /// Options selecting every dead letter, with the configured rules.
    pub fn new() -> ReplayOptions {
        ReplayOptions {
            selection_since_s: None,
            selection_until_s: None,
            reasons: Vec::new(),
            rules: None,
            dry_run: false,
            clock: Arc::new(SystemClock),
            mock_cluster: false,
        }
    }
}

impl Default for ReplayOptions {
    fn default() -> Self {
        ReplayOptions::new()
    }
}

/// What a replay did (or, with --dry-run, would do).
#[derive(Debug, Clone, Default, Serialize)]
pub struct Summary {
    pub dead_letter_topic: String,
    /// The rules replayed with (`version sha256:…`).
    pub rules: String,
    pub dry_run: bool,
    /// Every partition was read to its end offset and everything selected is durable in both
    /// sinks (false: stopped, or another replay took a partition over; run again).
    pub complete: bool,
    /// Dead letters before the end offsets seen at the start.
    pub examined: u64,
    /// Of those, within --since/--until and --reason.
    pub selected: u64,
    /// Of the selected, replayed by an earlier (or concurrent) run: left alone.
    pub already_replayed: u64,
    /// Replayed into drafts, in both sinks.
    pub delivered: u64,
    /// Drafts made by the delivered ones.
    pub drafts: u64,
    /// Replayed and valid, but producing nothing (by reason).
    pub skipped: BTreeMap<String, u64>,
    /// Replayed and dead-lettered again (by the new reason).
    pub dead_lettered_again: BTreeMap<String, u64>,
}

impl std::fmt::Display for Summary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let verb = if self.dry_run { "would be " } else { "" };
        writeln!(
            f,
            "dead-letter replay of {}{} with rules {}",
            self.dead_letter_topic,
            if self.dry_run {
                " (dry run: nothing written)"
            } else {
                ""
            },
            self.rules
        )?;
        writeln!(f, "  examined:          {}", self.examined)?;
        writeln!(f, "  selected:          {}", self.selected)?;
        writeln!(f, "  already replayed:  {}", self.already_replayed)?;
        writeln!(
            f,
            "  {verb}delivered: {} ({} drafts)",
            self.delivered, self.drafts
        )?;
        let list = |m: &BTreeMap<String, u64>| {
            if m.is_empty() {
                "0".to_string()
            } else {
                m.iter()
                    .map(|(k, v)| format!("{k} {v}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            }
        };
        writeln!(f, "  {verb}skipped:   {}", list(&self.skipped))?;
        writeln!(
            f,
            "  {verb}dead-lettered again: {}",
            list(&self.dead_lettered_again)
        )?;
        if !self.dry_run && !self.complete {
            writeln!(
                f,
                "  INCOMPLETE: the run stopped before the end offsets; run it again (nothing is replayed twice)"
            )?;
        }
        Ok(())
    }
}

/// The command: loads the configuration, replays, prints the summary. Exits non-zero when the
/// run did not complete.
pub async fn run(args: ReplayArgs) -> Result<ExitCode> {
    if args.pipeline == PipelineKind::StoreRevenue {
        bail!(
            "the store-revenue pipeline's dead letters cannot be replayed: they are sales that \
             arrived after their window was final (`late`: replaying them would change a window \
             already published) or that its rules refused; only --pipeline campaigns is supported"
        );
    }
    let config = Config::load(&Sources {
        file: args.config.as_deref(),
        overlay: None,
        env: true,
    })?;
    let (tx, shutdown) = watch::channel(false);
    let signal = stop_signal()?;
    tokio::spawn(async move {
        signal.await;
        let _ = tx.send(true);
    });
    let opts = ReplayOptions {
        selection_since_s: args.since,
        selection_until_s: args.until,
        reasons: args.reasons,
        rules: args.rules,
        dry_run: args.dry_run,
        ..ReplayOptions::new()
    };
    let summary = replay(&config, opts, shutdown).await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&summary)?);
    } else {
        print!("{summary}");
    }
    Ok(if summary.complete {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn stop_signal() -> Result<impl std::future::Future<Output = ()>> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).context("installing a SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing a SIGINT handler")?;
    Ok(async move {
        tokio::select! {
            _ = int.recv() => {}
            _ = term.recv() => {}
        }
        tracing::info!("Stop asked: finishing the unit in hand.");
    })
}

/// Where each partition of the dead-letter topic is read from and to.
#[derive(Debug, Clone, Copy)]
struct Range {
    partition: i32,
    start: i64,
    end: i64,
}

/// Replays the campaign pipeline's dead letters (see the module's documentation); stops early,
/// drained, when `shutdown` turns true.
pub async fn replay(
    config: &Config,
    opts: ReplayOptions,
    shutdown: watch::Receiver<bool>,
) -> Result<Summary> {
    let Some(cfg) = config.campaigns.as_ref() else {
        bail!("the campaign pipeline is not enabled in the configuration ([pipelines.campaigns] enabled = false)");
    };
    let events = Arc::new(
        Events::new(&crate::metrics::Metrics::new(), "campaigns-replay").with_quiet_skips(&[
            pipeline::NOT_SELECTED,
            pipeline::ALREADY_REPLAYED,
            pipeline::AFTER_END,
        ]),
    );
    let rules_path = opts.rules.clone().unwrap_or_else(|| cfg.rules.path.clone());
    let rules = crate::pipelines::Rules::<CampaignContract>::load(
        campaigns::NAME,
        cfg.rules.limits.clone(),
        &rules_path,
        &events,
    )?;
    let identity = rules.handle.current().identity().clone();
    let topic = cfg.dead_letter_topic.clone();
    let group = format!("{}-replay", cfg.group_id);

    let pg = crate::db::connect(config.postgres_url.as_str())
        .await
        .context("connecting to PostgreSQL")?;
    if !opts.dry_run {
        campaigns::schema::ensure(&pg)
            .await
            .context("checking the PostgreSQL schema")?;
        campaigns::schema::ensure_registry(&pg)
            .await
            .context("creating the campaign registry")?;
        replay_tables()
            .ensure(&pg)
            .await
            .context("creating the replay's delivery tables")?;
        crate::db::run_schema_script(&pg, LEDGER_SCHEMA_SQL)
            .await
            .context("creating the replay ledger")?;
    }
    let ledger_exists: bool = pg
        .query_one(LEDGER_EXISTS_SQL, &[])
        .await
        .context("looking for the replay ledger")?
        .get(0);
    let replayed = if ledger_exists {
        pg.query(LEDGER_LOAD_SQL, &[&topic])
            .await
            .context("reading the replay ledger")?
            .iter()
            .map(|r| (r.get::<_, i32>(0), r.get::<_, i64>(1)))
            .collect()
    } else {
        Default::default()
    };
    let rows = pg
        .query(SUBSCRIPTIONS_SQL, &[])
        .await
        .context("reading the subscribers")?;
    let snapshot = Snapshot::from_rows(
        0,
        rows.iter()
            .map(|r| (r.get::<_, &str>(0), r.get::<_, &str>(1))),
    );
    tracing::info!(
        subscriptions = snapshot.subscriptions(),
        "Subscribers read (one snapshot for the whole run)."
    );

    let mut consumer_config = config.kafka.consumer_config(&group);
    consumer_config.set("enable.partition.eof", "true");
    let ranges = ranges(
        &consumer_config,
        &topic,
        opts.selection_since_s.map(|s| s * 1000),
    )
    .await?;
    let seen = Arc::new(Seen::default());
    let worker = ReplayWorker {
        inner: CampaignWorker::new(rules.handle.clone(), opts.clock.clone()),
        selection: Selection {
            since_ms: opts.selection_since_s.map(|s| s * 1000),
            until_ms: opts.selection_until_s.map(|s| s * 1000),
            reasons: opts.reasons.clone(),
            ends: ranges.iter().map(|r| (r.partition, r.end)).collect(),
            replayed,
        },
        seen: seen.clone(),
    };
    let mut summary = Summary {
        dead_letter_topic: topic.clone(),
        rules: identity.to_string(),
        dry_run: opts.dry_run,
        ..Summary::default()
    };
    let todo: Vec<Range> = ranges.into_iter().filter(|r| r.start < r.end).collect();
    tracing::info!(topic, partitions = ?todo, "Dead letters to examine.");
    if opts.dry_run {
        dry_run(
            consumer_config,
            &topic,
            todo,
            worker,
            snapshot,
            cfg.max_message_bytes,
            &mut summary,
            shutdown,
        )
        .await?;
        fill_seen(&mut summary, &seen);
        summary.already_replayed = Seen::get(&seen.already_replayed);
        return Ok(summary);
    }
    if todo.is_empty() {
        summary.complete = true;
        return Ok(summary);
    }

    let run_id = uuid::Uuid::new_v4().to_string();
    let pipeline = Arc::new(ReplayPipeline {
        campaigns: Campaigns::new(SubscriberCache::fixed(snapshot)),
        rules: identity.clone(),
        run_id: run_id.clone(),
    });
    let producer = config.kafka.producer_config();
    let record_limits = crate::delivery::SharedLimits::default();
    record_limits.set(
        crate::pipelines::record_limits(
            &producer,
            &cfg.output_topic,
            &cfg.dead_letter_topic,
            !opts.mock_cluster,
        )
        .await,
        true,
    );
    let delivery_cfg = DeliveryConfig {
        batch_max_messages: cfg.batch_max_messages,
        batch_linger: Duration::ZERO,
        batch_max_weight: cfg.batch_max_drafts,
        parallel_units: cfg.parallel_units,
        max_message_bytes: cfg.max_message_bytes,
        sink_retry_max_backoff: cfg.sink_retry_max_backoff,
        output_topic: cfg.output_topic.clone(),
        dead_letter_topic: cfg.dead_letter_topic.clone(),
        transactional_prefix: format!("campaign-replay-{}", cfg.group_id),
        producer,
        plain_offset_commits: opts.mock_cluster,
        record_limits,
    };
    let consumer: crate::source::SourceConsumer = consumer_config
        .create_with_context(SourceContext::default())
        .map_err(crate::kafka::redact_client_error)
        .context("creating the Kafka consumer")?;
    let tables = Arc::new(replay_tables());
    let pg_side = PgSide::new(
        config.postgres_url.as_str().to_string(),
        tables,
        pipeline.clone(),
    );
    let completed = Arc::new(AtomicBool::new(false));
    let delivery = Delivery::new(
        delivery_cfg,
        pipeline,
        worker,
        Source {
            consumer: Arc::new(consumer),
            rebalances: Arc::default(),
        },
        pg_side,
        format!("replay-{run_id}"),
        events.clone(),
    )
    .with_fixed_assignment(
        todo.iter()
            .map(|r| (topic.clone(), r.partition, r.start))
            .collect(),
        completed.clone(),
    );
    let (hard_tx, hard_rx) = watch::channel(false);
    let mut task = tokio::spawn(delivery.run(shutdown.clone(), hard_rx));
    let mut stop = shutdown.clone();
    tokio::select! {
        r = &mut task => r.context("the replay's delivery task failed")?,
        _ = crate::retry::stopped(&mut stop) => {
            if tokio::time::timeout(cfg.shutdown_timeout, &mut task).await.is_err() {
                tracing::warn!("Shutdown deadline passed; abandoning the unit in hand (it is replayed by the next run).");
                let _ = hard_tx.send(true);
                let _ = tokio::time::timeout(Duration::from_secs(10), &mut task).await;
            }
        }
    }
    summary.complete = completed.load(Ordering::SeqCst);
    fill_seen(&mut summary, &seen);
    // What this run replayed, as the ledger holds it (durable, exact).
    let rows = pg
        .query(LEDGER_RUN_SQL, &[&run_id])
        .await
        .context("reading the replay ledger")?;
    let mut recorded = 0;
    for r in rows {
        let (outcome, reason, n, drafts): (String, String, i64, i64) =
            (r.get(0), r.get(1), r.get(2), r.get(3));
        recorded += n as u64;
        match outcome.as_str() {
            "delivered" => {
                summary.delivered += n as u64;
                summary.drafts += drafts as u64;
            }
            "skipped" => *summary.skipped.entry(reason).or_default() += n as u64,
            _ => *summary.dead_lettered_again.entry(reason).or_default() += n as u64,
        }
    }
    summary.already_replayed = Seen::get(&seen.already_replayed);
    if summary.complete {
        // Selected, not in the ledger at the start, and not recorded by this run: recorded by
        // a concurrent one.
        let fresh = summary.selected - summary.already_replayed;
        summary.already_replayed += fresh.saturating_sub(recorded);
    }
    Ok(summary)
}

fn fill_seen(summary: &mut Summary, seen: &Seen) {
    summary.examined = Seen::get(&seen.examined);
    summary.selected = Seen::get(&seen.selected);
}

/// The delivery protocol's tables of the replay: `campaign_replay_outbox`,
/// `campaign_replay_fences`.
pub fn replay_tables() -> Tables {
    Tables::new("campaign_replay")
}

/// Per partition of `topic`: where the dead letters at or after `since_ms` start, and the end
/// offset now.
async fn ranges(
    config: &rdkafka::ClientConfig,
    topic: &str,
    since_ms: Option<i64>,
) -> Result<Vec<Range>> {
    let consumer: BaseConsumer = config
        .create()
        .map_err(crate::kafka::redact_client_error)
        .context("creating a Kafka consumer")?;
    let topic = topic.to_string();
    tokio::task::spawn_blocking(move || -> Result<Vec<Range>> {
        let metadata = consumer
            .fetch_metadata(Some(&topic), KAFKA_TIMEOUT)
            .with_context(|| format!("reading the metadata of {topic}"))?;
        let partitions: Vec<i32> = metadata
            .topics()
            .iter()
            .filter(|t| t.name() == topic && t.error().is_none())
            .flat_map(|t| t.partitions().iter().map(|p| p.id()))
            .collect();
        if partitions.is_empty() {
            bail!("the dead-letter topic {topic} does not exist (or has no partitions)");
        }
        let mut out = Vec::new();
        for p in partitions {
            let (low, high) = consumer
                .fetch_watermarks(&topic, p, KAFKA_TIMEOUT)
                .with_context(|| format!("reading the offsets of {topic}/{p}"))?;
            let start = match since_ms {
                None => low,
                Some(t) => {
                    let mut tpl = TopicPartitionList::new();
                    tpl.add_partition_offset(&topic, p, Offset::Offset(t))?;
                    let found = consumer
                        .offsets_for_times(tpl, KAFKA_TIMEOUT)
                        .with_context(|| format!("looking up {topic}/{p} by time"))?;
                    match found.elements().first().map(|e| e.offset()) {
                        Some(Offset::Offset(o)) => o.max(low),
                        _ => high,
                    }
                }
            };
            out.push(Range {
                partition: p,
                start,
                end: high,
            });
        }
        Ok(out)
    })
    .await
    .context("reading the dead-letter topic's offsets")?
}

/// Reads the ranges and evaluates every message with the worker; counts what would happen.
#[allow(clippy::too_many_arguments)]
async fn dry_run(
    config: rdkafka::ClientConfig,
    topic: &str,
    todo: Vec<Range>,
    mut worker: ReplayWorker,
    snapshot: Snapshot,
    max_message_bytes: usize,
    summary: &mut Summary,
    shutdown: watch::Receiver<bool>,
) -> Result<()> {
    if todo.is_empty() {
        summary.complete = true;
        return Ok(());
    }
    let consumer: BaseConsumer = config
        .create()
        .map_err(crate::kafka::redact_client_error)
        .context("creating a Kafka consumer")?;
    let mut tpl = TopicPartitionList::new();
    for r in &todo {
        tpl.add_partition_offset(topic, r.partition, Offset::Offset(r.start))?;
    }
    consumer.assign(&tpl)?;
    let snapshot = Arc::new(snapshot);
    let result = tokio::task::spawn_blocking(move || -> Result<Summary> {
        let mut s = Summary::default();
        let mut ended: HashMap<i32, bool> = todo.iter().map(|r| (r.partition, false)).collect();
        let mut quiet = std::time::Instant::now();
        while !ended.values().all(|e| *e) && !*shutdown.borrow() {
            match consumer.poll(Duration::from_millis(200)) {
                None => {
                    if quiet.elapsed() > Duration::from_secs(60) {
                        bail!("the dead-letter topic gave nothing for 60 s before its end");
                    }
                }
                Some(Err(rdkafka::error::KafkaError::PartitionEOF(p))) => {
                    ended.insert(p, true);
                    quiet = std::time::Instant::now();
                }
                Some(Err(e)) => tracing::warn!(error = %e, "Kafka consumer error."),
                Some(Ok(m)) => {
                    quiet = std::time::Instant::now();
                    let m = m.detach();
                    match worker.evaluate_message(&m, max_message_bytes, &snapshot) {
                        Outcome::Deliver(d) => {
                            s.delivered += 1;
                            s.drafts += d.drafts.len() as u64;
                        }
                        Outcome::Skip { reason, .. } => {
                            if ![
                                pipeline::NOT_SELECTED,
                                pipeline::ALREADY_REPLAYED,
                                pipeline::AFTER_END,
                            ]
                            .contains(&reason)
                            {
                                *s.skipped.entry(reason.to_string()).or_default() += 1;
                            }
                        }
                        Outcome::DeadLetter { code, .. } => {
                            *s.dead_lettered_again.entry(code).or_default() += 1
                        }
                    }
                }
            }
        }
        s.complete = ended.values().all(|e| *e);
        Ok(s)
    })
    .await
    .context("the dry run failed")??;
    summary.complete = result.complete;
    summary.delivered = result.delivered;
    summary.drafts = result.drafts;
    summary.skipped = result.skipped;
    summary.dead_lettered_again = result.dead_lettered_again;
    Ok(())
}
