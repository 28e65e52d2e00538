//! Pipeline 1, campaign notifications (docs/SPEC.md): campaigns from Kafka → the rules'
//! `validate` (and the "active now" decision) → the restaurant's subscribers from the cache →
//! the rules' `shape`, once per campaign → one draft per subscriber, written to the output
//! topic and to `subscribers_feedback` from the same memory, exactly once.
//!
//! - `contract.rs`: the WIT world of the campaign rules, as the sandbox hosts it;
//! - `drafts.rs`: the clients going into `shape`, the drafts coming out;
//! - `cache/`: every subscription in memory, kept fresh by LISTEN/NOTIFY;
//! - `feedback.rs`: the drafts' rows in the unit's PostgreSQL transaction;
//! - `schema.rs`, `sql/`: the tables, the change feed, the idempotency key;
//! - `config.rs`: `[pipelines.campaigns]`;
//! - here: evaluating a campaign, its records, starting the pipeline.

pub mod cache;
pub mod config;
pub mod contract;
pub mod drafts;
pub mod feedback;
pub mod schema;

use self::cache::{Snapshot, SubscriberCache};
use self::config::CampaignsConfig;
use self::contract::{Activity, CampaignEvaluator, Reloader, RulesEngine, RulesHandle};
use self::drafts::Drafts;
use super::{Shared, Task, Wiring};
use crate::clock::Clock;
use crate::delivery::{
    DeliveryConfig, Kept, OutboxEntry, Outcome, Records, Tables, Target, Worker, WriteError,
};
use crate::events::{Events, SourcePos};
use crate::headers::HeaderList;
use crate::sandbox::RulesIdentity;
use anyhow::{Context, Result};
use std::sync::Arc;
use tokio_postgres::{Client, Transaction};

/// The pipeline's name in metrics, logs and `/status`.
pub const NAME: &str = "campaigns";

/// Header names of the campaign pipeline's drafts (besides the provenance every record has).
pub mod header {
    pub use crate::headers::*;
    pub const SUBSCRIBERS_SNAPSHOT: &str = "subscribers-snapshot";
    pub const ADV_CAMPAIGN_ID: &str = "adv-campaign-id";
}

/// Why a valid campaign produced nothing (counted, logged, not dead-lettered).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum SkipReason {
    /// The campaign starts later than now.
    NotStarted,
    /// The campaign ended.
    Expired,
    /// The restaurant has no subscribers.
    NoSubscribers,
}

impl SkipReason {
    pub fn as_str(self) -> &'static str {
        match self {
            SkipReason::NotStarted => "not_started",
            SkipReason::Expired => "expired",
            SkipReason::NoSubscribers => "no_subscribers",
        }
    }
}

impl AsRef<str> for SkipReason {
    fn as_ref(&self) -> &str {
        self.as_str()
    }
}

/// An active campaign's drafts, joined against one snapshot of the subscribers.
#[derive(Debug)]
pub struct CampaignDelivery {
    pub drafts: Drafts,
    /// `trigger_datetime_created`, checked to fit the feedback table's int4.
    pub trigger: i32,
    /// The version of the subscriber snapshot the campaign was joined against.
    pub snapshot: u64,
}

/// The campaign pipeline, as the delivery core sees it.
#[derive(Debug, Clone)]
pub struct Campaigns {
    cache: SubscriberCache,
}

impl Campaigns {
    /// The pipeline joining campaigns against `cache`.
    pub fn new(cache: SubscriberCache) -> Campaigns {
        Campaigns { cache }
    }
}

impl crate::delivery::Pipeline for Campaigns {
    type Delivery = CampaignDelivery;
    type Worker = CampaignWorker;
    type Round = Arc<Snapshot>;
    type Prepared = feedback::Prepared;

    /// Never joins against a snapshot known to be stale (first load, lost connection).
    async fn round(&self) -> Arc<Snapshot> {
        if self.cache.is_stale() {
            tracing::info!("Waiting for the subscriber cache to be resynchronised.");
            self.cache.wait_fresh().await;
        }
        self.cache.snapshot()
    }

    fn weight(d: &CampaignDelivery) -> usize {
        d.drafts.len()
    }

    fn entry(
        &self,
        d: &CampaignDelivery,
        source_offset: i64,
        mut headers: HeaderList,
    ) -> OutboxEntry {
        headers.push((
            header::SUBSCRIBERS_SNAPSHOT.into(),
            d.snapshot.to_string().into_bytes(),
        ));
        headers.push((
            header::ADV_CAMPAIGN_ID.into(),
            d.drafts.campaign.adv_campaign_id.as_bytes().to_vec(),
        ));
        OutboxEntry {
            source_offset,
            target: Target::Output,
            records: Records::Template(d.drafts.records().clone()),
            headers,
        }
    }

    async fn prepare(&self, client: &Client) -> Result<feedback::Prepared, tokio_postgres::Error> {
        feedback::prepare(client).await
    }

    async fn write(
        &self,
        tx: &Transaction<'_>,
        prepared: &feedback::Prepared,
        deliveries: &[(usize, &CampaignDelivery)],
        _entries: &[OutboxEntry],
        careful: bool,
    ) -> Result<Vec<Kept>, WriteError> {
        feedback::write(tx, prepared, deliveries, careful).await
    }

    fn delivered(&self, events: &Events, pos: &SourcePos, d: &CampaignDelivery, rules: &str) {
        events.delivered(
            pos,
            &d.drafts.campaign.adv_campaign_id,
            d.drafts.len(),
            rules,
        );
    }
}

/// Evaluates campaigns off the async threads.
#[derive(Debug)]
pub struct CampaignWorker {
    evaluator: CampaignEvaluator,
    /// The subscribers of the campaign in hand, as text, reused from campaign to campaign.
    clients: Vec<String>,
    clock: Arc<dyn Clock>,
}

impl CampaignWorker {
    /// A worker evaluating with `rules`, reading the time from `clock`.
    pub fn new(rules: RulesHandle, clock: Arc<dyn Clock>) -> CampaignWorker {
        CampaignWorker {
            evaluator: CampaignEvaluator::new(rules),
            clients: Vec::new(),
            clock,
        }
    }
}

impl Worker for CampaignWorker {
    type Delivery = CampaignDelivery;
    type Round = Arc<Snapshot>;

    fn refresh(&mut self) {
        self.evaluator.refresh();
    }

    fn rules(&self) -> &RulesIdentity {
        self.evaluator.identity()
    }

    fn evaluate(&mut self, payload: &[u8], snapshot: &Arc<Snapshot>) -> Outcome<CampaignDelivery> {
        let now = self.clock.now();
        let verdict = match self.evaluator.validate(payload, now) {
            Err(e) => return Outcome::dead_letter(e.code(), e.to_string(), None),
            Ok(Err(r)) => return Outcome::dead_letter(r.code.as_str(), r.detail, r.field),
            Ok(Ok(v)) => v,
        };
        let skip = |reason: SkipReason| Outcome::Skip {
            reason: reason.as_str(),
            subject: verdict.campaign.adv_campaign_id.clone(),
        };
        match verdict.activity {
            Activity::NotStarted => return skip(SkipReason::NotStarted),
            Activity::Expired => return skip(SkipReason::Expired),
            Activity::Active => {}
        }
        snapshot.clients_into(&verdict.campaign.restaurant_id, &mut self.clients);
        if self.clients.is_empty() {
            return skip(SkipReason::NoSubscribers);
        }
        let drafts = match self.evaluator.shape(&verdict.campaign, &self.clients, now) {
            Ok(d) => d,
            Err(e) => return Outcome::dead_letter(e.code(), e.to_string(), None),
        };
        // The feedback table's column is int4: refuse loudly rather than wrap (January 2038).
        match i32::try_from(drafts.trigger_datetime_created) {
            Ok(trigger) => Outcome::Deliver(CampaignDelivery {
                drafts,
                trigger,
                snapshot: snapshot.version(),
            }),
            Err(_) => {
                tracing::error!(
                    trigger_datetime_created = drafts.trigger_datetime_created,
                    "trigger_datetime_created does not fit subscribers_feedback's int4 column; the campaign is dead-lettered. Widen the column to int8."
                );
                Outcome::dead_letter(
                    "trigger_time_out_of_range",
                    format!(
                        "trigger_datetime_created {} does not fit the int4 column subscribers_feedback.trigger_datetime_created",
                        drafts.trigger_datetime_created
                    ),
                    Some("trigger_datetime_created".into()),
                )
            }
        }
    }
}

/// The delivery protocol's tables of this pipeline: `campaign_runner_outbox`,
/// `campaign_runner_fences`.
pub fn tables() -> Tables {
    Tables::new("campaign_runner")
}

/// Creates everything the pipeline needs in the database: SPEC.md's tables (when absent), the
/// change feed, the idempotency key, and the delivery protocol's tables.
pub async fn ensure_schema(client: &Client) -> Result<(), crate::db::DbError> {
    schema::ensure(client).await?;
    tables().ensure(client).await
}

/// The started campaign pipeline: what operators and tests reach into.
#[derive(Debug)]
pub struct Running {
    pub events: Arc<Events>,
    pub rules: RulesHandle,
    pub cache: SubscriberCache,
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
/// the brokers, the input topic: `startup.rs`), schema, subscribers loaded (campaigns are never
/// joined against an empty cache), the rules watch, then the delivery loop. `events` report
/// the start already.
pub async fn start(
    shared: &Shared,
    cfg: &CampaignsConfig,
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
    schema::ensure(&pg)
        .await
        .context("checking the PostgreSQL schema")?;
    drop(pg);
    let (cache, follower) = SubscriberCache::start(
        shared.postgres.as_str().to_string(),
        cfg.full_resync_interval,
        events.clone(),
        shared.shutdown.clone(),
    )
    .await
    .context("loading subscribers")?;

    let reloads = loaded
        .watch(cfg.rules.watch, cfg.rules.settle, shared.shutdown.clone())
        .await;
    let super::Rules {
        engine,
        handle: rules,
        reloader,
    } = loaded;
    let wiring = Wiring {
        group_id: cfg.group_id.clone(),
        input_topic: cfg.input_topic.clone(),
        tables: Arc::new(tables()),
        delivery: DeliveryConfig {
            batch_max_messages: cfg.batch_max_messages,
            batch_linger: cfg.batch_linger,
            batch_max_weight: cfg.batch_max_drafts,
            parallel_units: cfg.parallel_units,
            max_message_bytes: cfg.max_message_bytes,
            sink_retry_max_backoff: cfg.sink_retry_max_backoff,
            output_topic: cfg.output_topic.clone(),
            dead_letter_topic: cfg.dead_letter_topic.clone(),
            transactional_prefix: format!("campaign-runner-{}", cfg.group_id),
            producer: shared.kafka.producer_config(),
            plain_offset_commits: shared.mock_cluster,
            record_limits: crate::delivery::SharedLimits::default(),
        },
    };
    let worker = CampaignWorker {
        evaluator: CampaignEvaluator::new(rules.clone()),
        clients: Vec::new(),
        clock: shared.clock.clone(),
    };
    let pipeline = Arc::new(Campaigns::new(cache.clone()));
    let (delivery, probe) = super::spawn(shared, wiring, pipeline, worker, events.clone()).await?;
    events.started();
    tracing::info!(
        pipeline = NAME,
        brokers = shared.kafka.brokers(),
        input = %cfg.input_topic,
        output = %cfg.output_topic,
        dead_letters = %cfg.dead_letter_topic,
        "Pipeline consuming."
    );
    let task = Task {
        events: events.clone(),
        delivery,
        background: vec![follower, reloads, probe],
        shutdown_timeout: cfg.shutdown_timeout,
    };
    Ok((
        Running {
            events,
            rules,
            cache,
            engine,
            reloader,
        },
        task,
    ))
}
