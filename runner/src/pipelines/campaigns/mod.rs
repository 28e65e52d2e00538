//! Pipeline 1, campaign notifications (docs/SPEC.md): campaigns from Kafka → the rules'
//! `validate` (and the "active now" decision) → the restaurant's subscribers from the cache →
//! the rules' `shape`, once per campaign → one draft per subscriber, written to the output
//! topic and to `subscribers_feedback` from the same memory, exactly once.
//!
//! - `contract.rs`: the WIT world of the campaign rules, as the sandbox hosts it;
//! - `drafts.rs`: the clients going into `shape`, the drafts coming out;
//! - `cache/`: every subscription in memory, kept fresh by LISTEN/NOTIFY;
//! - `schedule/`: campaigns kept until they are over, delivered at their start and to
//!   subscribers added while they run;
//! - `feedback.rs`: the drafts' rows in the unit's PostgreSQL transaction;
//! - `provenance.rs`: the one header that says where a draft comes from;
//! - `schema.rs`, `sql/`: the tables, the change feed, what each campaign has reached;
//! - `config.rs`: `[pipelines.campaigns]`;
//! - here: evaluating a campaign, its records, starting the pipeline.

pub mod cache;
pub mod config;
pub mod contract;
pub mod drafts;
pub mod feedback;
pub mod provenance;
pub mod schedule;
pub mod schema;

use self::cache::{Snapshot, SubscriberCache};
use self::config::CampaignsConfig;
use self::contract::{Activity, CampaignEvaluator, Reloader, RulesEngine, RulesHandle};
use self::drafts::Drafts;
use self::schedule::scheduler::{ScheduleHandle, Scheduler, SchedulerConfig};
use self::schedule::{Cause, RegistryOp, Trigger};
use super::{Shared, Task, Wiring};
use crate::clock::Clock;
use crate::delivery::{
    DeliveryConfig, Evaluated, Kept, OutboxEntry, Outcome, Records, Tables, Target, Worker,
    WriteError,
};
use crate::events::{Events, SourcePos};
use crate::headers::HeaderList;
use crate::sandbox::RulesIdentity;
use anyhow::{Context, Result};
use rdkafka::message::OwnedMessage;
use std::collections::{BTreeSet, HashSet};
use std::sync::Arc;
use tokio_postgres::{Client, Transaction};

/// The pipeline's name in metrics, logs and `/status`.
pub const NAME: &str = "campaigns";

/// Header names of the campaign pipeline's drafts: `provenance` (see `provenance.rs`) and the
/// campaign's id.
pub mod header {
    pub use super::provenance::PROVENANCE;
    pub use crate::headers::*;
    pub const ADV_CAMPAIGN_ID: &str = "adv-campaign-id";
}

/// Why a valid campaign produced nothing (counted, logged, not dead-lettered).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum SkipReason {
    /// Published before its start: kept in the registry and delivered at its start.
    Scheduled,
    /// A trigger of the campaign's start came before the start (the clocks of the runner
    /// that triggered it and of the one that evaluated it disagree): triggered again later.
    NotStarted,
    /// The campaign ended.
    Expired,
    /// The restaurant has no subscribers.
    NoSubscribers,
}

impl SkipReason {
    pub fn as_str(self) -> &'static str {
        match self {
            SkipReason::Scheduled => "scheduled",
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
    /// Why the drafts were made.
    pub cause: Cause,
    /// What the publication changes in the registry (None for a trigger).
    pub registry: Option<RegistryOp>,
}

/// The campaign pipeline, as the delivery core sees it.
#[derive(Debug, Clone)]
pub struct Campaigns {
    cache: SubscriberCache,
    schedule: Option<ScheduleHandle>,
}

impl Campaigns {
    /// The pipeline joining campaigns against `cache`.
    pub fn new(cache: SubscriberCache) -> Campaigns {
        Campaigns {
            cache,
            schedule: None,
        }
    }

    /// Reports its deliveries to the scheduler.
    pub fn with_schedule(mut self, schedule: ScheduleHandle) -> Campaigns {
        self.schedule = Some(schedule);
        self
    }
}

/// The campaign pipeline's statements in a unit's transaction, prepared once per connection.
#[derive(Debug, Clone)]
pub struct Prepared {
    pub feedback: feedback::Prepared,
    pub registry: schedule::registry::Prepared,
}

pub async fn prepare(client: &Client) -> Result<Prepared, tokio_postgres::Error> {
    let (feedback, registry) = futures::try_join!(
        feedback::prepare(client),
        schedule::registry::prepare(client)
    )?;
    Ok(Prepared { feedback, registry })
}

/// The registry changes of a unit's messages, in order.
pub fn registry_ops<'a>(
    unit: impl IntoIterator<Item = &'a Evaluated<CampaignDelivery, RegistryOp>>,
) -> impl Iterator<Item = &'a RegistryOp> {
    unit.into_iter().filter_map(|e| match &e.outcome {
        Outcome::Deliver(d) => d.registry.as_ref(),
        Outcome::Skip { held, .. } => held.as_ref(),
        Outcome::DeadLetter { .. } => None,
    })
}

/// What a message's outcome changes in the registry, to be amended.
pub fn registry_op_mut(
    outcome: &mut Outcome<CampaignDelivery, RegistryOp>,
) -> Option<&mut RegistryOp> {
    match outcome {
        Outcome::Deliver(d) => d.registry.as_mut(),
        Outcome::Skip { held, .. } => held.as_mut(),
        Outcome::DeadLetter { .. } => None,
    }
}

impl crate::delivery::Pipeline for Campaigns {
    type Delivery = CampaignDelivery;
    type Held = RegistryOp;
    type Worker = CampaignWorker;
    type Round = Arc<Snapshot>;
    type Prepared = Prepared;

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

    fn entry(&self, d: &CampaignDelivery, source_offset: i64, headers: HeaderList) -> OutboxEntry {
        let mut headers = provenance::pack(headers, d.snapshot);
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

    async fn prepare(&self, client: &Client) -> Result<Prepared, tokio_postgres::Error> {
        prepare(client).await
    }

    async fn write(
        &self,
        tx: &Transaction<'_>,
        prepared: &Prepared,
        deliveries: &[(usize, &CampaignDelivery)],
        _entries: &[OutboxEntry],
        careful: bool,
    ) -> Result<Vec<Kept>, WriteError> {
        feedback::write(tx, &prepared.feedback, deliveries, careful).await
    }

    fn delivered(
        &self,
        events: &Events,
        pos: &SourcePos,
        d: &CampaignDelivery,
        rules: &str,
        published: usize,
    ) {
        let c = &d.drafts.campaign;
        events.delivered(pos, &c.adv_campaign_id, d.drafts.len(), rules);
        if let Some(s) = &self.schedule {
            s.delivered(
                d.cause,
                published,
                &c.adv_campaign_id,
                &c.restaurant_id,
                d.snapshot,
            );
        }
    }

    /// The registry changes of the unit's publications, in its transaction.
    async fn record_unit(
        &self,
        tx: &Transaction<'_>,
        prepared: &Prepared,
        unit: &[Evaluated<CampaignDelivery, RegistryOp>],
    ) -> Result<BTreeSet<usize>, WriteError> {
        schedule::registry::record(tx, &prepared.registry, registry_ops(unit)).await?;
        Ok(BTreeSet::new())
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
    type Held = RegistryOp;
    type Round = Arc<Snapshot>;

    fn refresh(&mut self) {
        self.evaluator.refresh();
    }

    fn rules(&self) -> &RulesIdentity {
        self.evaluator.identity()
    }

    /// A payload alone (no message: nothing is kept in the registry).
    fn evaluate(
        &mut self,
        payload: &[u8],
        snapshot: &Arc<Snapshot>,
    ) -> Outcome<CampaignDelivery, RegistryOp> {
        self.evaluate_campaign(payload, None, None, snapshot)
    }

    /// A publication or a trigger record (`schedule::Trigger`).
    fn evaluate_message(
        &mut self,
        msg: &OwnedMessage,
        max_message_bytes: usize,
        snapshot: &Arc<Snapshot>,
    ) -> Outcome<CampaignDelivery, RegistryOp> {
        let trigger = match Trigger::of(msg) {
            Ok(t) => t,
            Err(detail) => {
                return Outcome::dead_letter(
                    "invalid_trigger",
                    detail,
                    Some(schedule::TRIGGER.into()),
                )
            }
        };
        match crate::delivery::payload_within(msg, max_message_bytes) {
            Ok(p) => self.evaluate_campaign(p, Some(msg), trigger, snapshot),
            Err(dead_letter) => dead_letter,
        }
    }
}

impl CampaignWorker {
    /// Validates a campaign (the rules decide whether it is active now), keeps a publication
    /// in the registry, and shapes the drafts of its audience: every subscriber of the
    /// restaurant, or the clients a `new_subscriber` trigger names who are subscribed.
    fn evaluate_campaign(
        &mut self,
        payload: &[u8],
        msg: Option<&OwnedMessage>,
        trigger: Option<Trigger>,
        snapshot: &Arc<Snapshot>,
    ) -> Outcome<CampaignDelivery, RegistryOp> {
        let now = self.clock.now();
        let verdict = match self.evaluator.validate(payload, now) {
            Err(e) => return Outcome::dead_letter(e.code(), e.to_string(), None),
            Ok(Err(r)) => return Outcome::dead_letter(r.code.as_str(), r.detail, r.field),
            Ok(Ok(v)) => v,
        };
        let campaign = &verdict.campaign;
        let window = verdict.window;
        // A publication is kept (latest wins); a trigger only stands for one.
        let keep = |started: bool| {
            msg.filter(|_| trigger.is_none()).map(|m| {
                RegistryOp::Keep(schedule::entry(
                    m,
                    &campaign.adv_campaign_id,
                    &campaign.restaurant_id,
                    window.opens,
                    window.closes,
                    started,
                ))
            })
        };
        let skip = |reason: SkipReason, held: Option<RegistryOp>| Outcome::Skip {
            reason: reason.as_str(),
            subject: campaign.adv_campaign_id.clone(),
            held,
        };
        match (&trigger, verdict.activity) {
            (None, Activity::NotStarted) => return skip(SkipReason::Scheduled, keep(false)),
            (None, Activity::Expired) => {
                let forget = RegistryOp::Forget {
                    adv_campaign_id: campaign.adv_campaign_id.clone(),
                };
                return skip(SkipReason::Expired, msg.map(|_| forget));
            }
            (Some(Trigger::ScheduledStart { of }), Activity::NotStarted) => {
                let reopen = of.map(|(partition, source_offset)| RegistryOp::Reopen {
                    adv_campaign_id: campaign.adv_campaign_id.clone(),
                    partition,
                    source_offset,
                });
                return skip(SkipReason::NotStarted, reopen);
            }
            (Some(_), Activity::NotStarted) => return skip(SkipReason::NotStarted, None),
            (Some(_), Activity::Expired) => return skip(SkipReason::Expired, None),
            (_, Activity::Active) => {}
        }
        snapshot.clients_into(&campaign.restaurant_id, &mut self.clients);
        if let Some(Trigger::NewSubscriber { clients }) = &trigger {
            let named: HashSet<&str> = clients.iter().map(String::as_str).collect();
            self.clients.retain(|c| named.contains(c.as_str()));
        }
        if self.clients.is_empty() {
            return skip(SkipReason::NoSubscribers, keep(true));
        }
        let drafts = match self.evaluator.shape(campaign, &self.clients, now) {
            Ok(d) => d,
            Err(e) => return Outcome::dead_letter(e.code(), e.to_string(), None),
        };
        // The feedback table's column is int4: refuse loudly rather than wrap (January 2038).
        match i32::try_from(drafts.trigger_datetime_created) {
            Ok(trigger_time) => Outcome::Deliver(CampaignDelivery {
                drafts,
                trigger: trigger_time,
                snapshot: snapshot.version(),
                cause: trigger.as_ref().map_or(Cause::Published, Trigger::cause),
                registry: keep(true),
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
/// change feed, what each campaign has reached, and the delivery protocol's tables.
pub async fn ensure_schema(client: &Client) -> Result<(), crate::db::DbError> {
    schema::ensure(client).await?;
    tables().ensure(client).await?;
    schema::ensure_registry(client).await
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
    schema::ensure_registry(&pg)
        .await
        .context("creating the campaign registry")?;
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
    let (scheduler, schedule) = Scheduler::new(
        SchedulerConfig {
            postgres_url: shared.postgres.as_str().to_string(),
            input_topic: cfg.input_topic.clone(),
            instance_id: shared.instance_id.clone(),
            producer: shared.kafka.producer_config(),
        },
        shared.clock.clone(),
        cache.clone(),
        events.clone(),
    )
    .context("creating the campaign scheduler's producer")?;
    let pipeline = Arc::new(Campaigns::new(cache.clone()).with_schedule(schedule));
    let (delivery, probe) = super::spawn(shared, wiring, pipeline, worker, events.clone()).await?;
    let scheduler = tokio::spawn(scheduler.run(shared.shutdown.clone()));
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
        background: vec![follower, reloads, probe, scheduler],
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
