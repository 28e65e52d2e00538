//! The scheduler: one loop per runner over the registry rows of the input partitions this
//! runner owns (its claims in `campaign_runner_fences`, so rows move with their partition on a
//! rebalance). It turns
//!
//! - a window that opened (`opens <= now`) of a campaign not started yet into a
//!   `scheduled_start` trigger, then marks the row started;
//! - a subscriber added to the restaurant of a started, active campaign, who has no draft of it
//!   yet, into a `new_subscriber` trigger naming that client;
//! - a closed window into the row's deletion (a campaign that never started is counted as
//!   skipped `expired`).
//!
//! Added subscribers come from the subscriber cache's changes. What the changes cannot say is
//! audited against what the campaign has reached instead (the restaurant's current subscribers
//! less the clients of its row in `campaign_runner_delivered`): every active campaign after a full reload of the cache, or when
//! this loop fell behind the changes or lost PostgreSQL; the campaigns of a partition newly
//! taken over; and a campaign whose drafts were joined against a snapshot older than the one
//! current when they were committed (a subscriber added in between). Every trigger is
//! idempotent (see the module above), so an audit may err on the side of producing one.

use super::{Cause, TRIGGER, TRIGGER_CLIENTS, TRIGGER_OF};
use crate::clock::Clock;
use crate::db::DbError;
use crate::events::{Events, SourcePos};
use crate::pipelines::campaigns::cache::{CacheChange, SubscriberCache};
use crate::retry::stopped;
use prometheus::{IntCounterVec, IntGauge, Opts};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::util::Timeout;
use rdkafka::ClientConfig;
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{broadcast, mpsc, watch};
use tokio_postgres::types::ToSql;
use tokio_postgres::{Client, Row};

const OWNED_SQL: &str = include_str!("../sql/registry_owned.sql");
const DUE_SQL: &str = include_str!("../sql/registry_due.sql");
const STARTED_SQL: &str = include_str!("../sql/registry_started.sql");
const ENDED_SQL: &str = include_str!("../sql/registry_ended.sql");
const ACTIVE_SQL: &str = include_str!("../sql/registry_active.sql");
const SUMMARY_SQL: &str = include_str!("../sql/registry_summary.sql");
const PRESENT_SQL: &str = include_str!("../sql/delivered_clients.sql");

/// How often the registry is read for windows that opened or closed: a start is triggered
/// within this much of its second (plus the trigger's way through the pipeline).
pub const TICK: Duration = Duration::from_millis(200);
/// Starts triggered per read of the registry (more are read at once after).
const DUE_BATCH: i64 = 5_000;
/// Clients named in one `new_subscriber` trigger (about 40 bytes each).
const CLIENTS_PER_TRIGGER: usize = 1_000;
/// Campaigns whose clients reached are read from `campaign_runner_delivered` per statement.
const CAMPAIGNS_PER_LOOKUP: usize = 1_000;
/// A (campaign, client) pair triggered this recently is not triggered again (its trigger is
/// on its way).
const IN_FLIGHT: Duration = Duration::from_secs(30);
/// Added subscriptions remembered for the audit of a campaign joined against an older
/// snapshot; past either bound, such a campaign is audited in full.
const RECENT_MAX: usize = 100_000;
const RECENT_FOR: Duration = Duration::from_secs(600);
/// How long a trigger's produce may take before the scheduler tries again.
const PRODUCE_TIMEOUT: Duration = Duration::from_secs(30);

/// The schedule's metrics, labelled with the pipeline.
#[derive(Debug)]
pub struct ScheduleMetrics {
    deliveries: IntCounterVec,
    triggers: IntCounterVec,
    scheduled: IntGauge,
    next_start: IntGauge,
}

impl ScheduleMetrics {
    pub fn new(events: &Events) -> Arc<ScheduleMetrics> {
        let opts = |name: &str, help: &str| {
            Opts::new(name, help).const_label("pipeline", events.pipeline())
        };
        let deliveries = IntCounterVec::new(
            opts(
                "runner_campaign_deliveries_total",
                "Drafts made durable in both sinks, by cause (published, scheduled_start, new_subscriber).",
            ),
            &["cause"],
        )
        .expect("a valid counter");
        let triggers = IntCounterVec::new(
            opts(
                "runner_campaign_triggers_total",
                "Trigger records produced to the input topic, by cause (scheduled_start, new_subscriber).",
            ),
            &["cause"],
        )
        .expect("a valid counter");
        let scheduled = IntGauge::with_opts(opts(
            "runner_campaigns_scheduled",
            "Campaigns published before their start and not delivered yet, on the partitions this runner owns.",
        ))
        .expect("a valid gauge");
        let next_start = IntGauge::with_opts(opts(
            "runner_campaign_next_start_seconds",
            "The earliest start among them, in unix seconds (0: none).",
        ))
        .expect("a valid gauge");
        for cause in Cause::ALL {
            deliveries.with_label_values(&[cause.as_str()]);
        }
        for cause in [Cause::ScheduledStart, Cause::NewSubscriber] {
            triggers.with_label_values(&[cause.as_str()]);
        }
        for c in [
            Box::new(deliveries.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(triggers.clone()),
            Box::new(scheduled.clone()),
            Box::new(next_start.clone()),
        ] {
            if let Err(e) = events.metrics().registry.register(c) {
                tracing::debug!(error = %e, "The schedule's metrics are registered already.");
            }
        }
        Arc::new(ScheduleMetrics {
            deliveries,
            triggers,
            scheduled,
            next_start,
        })
    }
}

/// A campaign to audit: its drafts were joined against snapshot `joined`.
#[derive(Debug, Clone)]
struct Audit {
    adv_campaign_id: String,
    restaurant_id: String,
    joined: u64,
}

/// The pipeline's side of the schedule: counts deliveries by cause and asks for audits.
#[derive(Debug, Clone)]
pub struct ScheduleHandle {
    events: Arc<Events>,
    metrics: Arc<ScheduleMetrics>,
    cache: SubscriberCache,
    audits: mpsc::UnboundedSender<Audit>,
}

impl ScheduleHandle {
    /// `published` drafts of a campaign, joined against snapshot `joined`, are durable in both
    /// sinks.
    pub fn delivered(
        &self,
        cause: Cause,
        published: usize,
        adv_campaign_id: &str,
        restaurant_id: &str,
        joined: u64,
    ) {
        self.metrics
            .deliveries
            .with_label_values(&[cause.as_str()])
            .inc_by(published as u64);
        self.events.update_schedule(|s| {
            *s.deliveries.entry(cause.as_str()).or_default() += published as u64
        });
        // A subscriber added after the join and before the commit was not in the drafts, and
        // its change may have been looked at before the campaign was in the registry.
        if self.cache.snapshot().version() > joined {
            let _ = self.audits.send(Audit {
                adv_campaign_id: adv_campaign_id.to_string(),
                restaurant_id: restaurant_id.to_string(),
                joined,
            });
        }
    }
}

/// A registry row, as the scheduler reads it.
#[derive(Debug, Clone)]
struct Campaign {
    adv_campaign_id: String,
    restaurant_id: String,
    partition: i32,
    source_offset: i64,
    key: Option<Vec<u8>>,
    payload: Vec<u8>,
}

impl Campaign {
    fn from_row(r: &Row) -> Result<Campaign, tokio_postgres::Error> {
        Ok(Campaign {
            adv_campaign_id: r.try_get(0)?,
            restaurant_id: r.try_get(1)?,
            partition: r.try_get(2)?,
            source_offset: r.try_get(3)?,
            key: r.try_get(4)?,
            payload: r.try_get(5)?,
        })
    }
}

/// What the scheduler needs from the pipeline's wiring.
#[derive(Debug, Clone)]
pub struct SchedulerConfig {
    pub postgres_url: String,
    pub input_topic: String,
    pub instance_id: String,
    pub producer: ClientConfig,
}

/// Which active campaigns to look at, and for whom.
#[derive(Debug, Default)]
struct Work {
    /// Every started, active campaign of every owned partition, for every subscriber.
    all: bool,
    /// ... of these partitions.
    partitions: BTreeSet<i32>,
    /// Added subscriptions: restaurant → clients.
    added: BTreeMap<String, BTreeSet<String>>,
    /// Campaigns joined against an older snapshot.
    audits: Vec<Audit>,
}

impl Work {
    fn is_empty(&self) -> bool {
        !self.all && self.partitions.is_empty() && self.added.is_empty() && self.audits.is_empty()
    }
}

/// The scheduler's loop (see the module's documentation).
pub struct Scheduler {
    cfg: SchedulerConfig,
    clock: Arc<dyn Clock>,
    cache: SubscriberCache,
    events: Arc<Events>,
    metrics: Arc<ScheduleMetrics>,
    producer: FutureProducer<crate::logging::LogContext>,
    audits: mpsc::UnboundedReceiver<Audit>,
    changes: broadcast::Receiver<Arc<CacheChange>>,
    /// The cache's follower has stopped (the runner is stopping).
    changes_closed: bool,
    client: Option<Client>,
    owned: BTreeSet<i32>,
    work: Work,
    /// Added subscriptions (snapshot version, restaurant, client, when), oldest first.
    recent: VecDeque<(u64, String, String, Instant)>,
    /// `recent` holds every addition after any snapshot from this version on.
    covered_from: u64,
    /// (campaign, client) pairs triggered lately.
    in_flight: HashMap<(String, String), Instant>,
    /// Campaigns whose start was triggered lately: not audited in full while the trigger is on
    /// its way (it reaches every subscriber; its delivery asks for an audit of what it missed).
    starting: HashMap<String, Instant>,
    /// When a PostgreSQL failure was last logged.
    last_warned: Option<Instant>,
}

impl std::fmt::Debug for Scheduler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Scheduler")
            .field("cfg", &self.cfg.input_topic)
            .finish_non_exhaustive()
    }
}

/// Why one round of the scheduler did not complete (it is tried again next tick).
#[derive(Debug, thiserror::Error)]
enum RoundError {
    #[error(transparent)]
    Db(#[from] DbError),
    #[error("producing triggers: {0}")]
    Kafka(String),
}

impl From<tokio_postgres::Error> for RoundError {
    fn from(e: tokio_postgres::Error) -> Self {
        RoundError::Db(DbError::from_pg(e))
    }
}

impl Scheduler {
    /// The scheduler and the handle the pipeline reports deliveries through.
    pub fn new(
        cfg: SchedulerConfig,
        clock: Arc<dyn Clock>,
        cache: SubscriberCache,
        events: Arc<Events>,
    ) -> anyhow::Result<(Scheduler, ScheduleHandle)> {
        let metrics = ScheduleMetrics::new(&events);
        let (tx, rx) = mpsc::unbounded_channel();
        let mut producer_cfg = cfg.producer.clone();
        producer_cfg.set("linger.ms", "5");
        // Its librdkafka log lines go through the runner's (named, secrets taken out, repeats
        // limited), as every other client's.
        let producer: FutureProducer<crate::logging::LogContext> = producer_cfg
            .create_with_context(crate::logging::LogContext::new(
                "campaign scheduler",
                &producer_cfg,
            ))?;
        events.update_schedule(|s| {
            for cause in Cause::ALL {
                s.deliveries.entry(cause.as_str()).or_default();
            }
            for cause in [Cause::ScheduledStart, Cause::NewSubscriber] {
                s.triggers.entry(cause.as_str()).or_default();
            }
        });
        let handle = ScheduleHandle {
            events: events.clone(),
            metrics: metrics.clone(),
            cache: cache.clone(),
            audits: tx,
        };
        let changes = cache.changes();
        let covered_from = cache.snapshot().version();
        Ok((
            Scheduler {
                cfg,
                clock,
                cache,
                events,
                metrics,
                producer,
                audits: rx,
                changes,
                changes_closed: false,
                client: None,
                owned: BTreeSet::new(),
                work: Work::default(),
                recent: VecDeque::new(),
                covered_from,
                in_flight: HashMap::new(),
                starting: HashMap::new(),
                last_warned: None,
            },
            handle,
        ))
    }

    /// Runs until `shutdown` turns true.
    pub async fn run(mut self, mut shutdown: watch::Receiver<bool>) {
        let mut next_tick = tokio::time::Instant::now();
        loop {
            tokio::select! {
                biased;
                _ = stopped(&mut shutdown) => break,
                change = self.changes.recv(), if !self.changes_closed => self.note_change(change),
                Some(audit) = self.audits.recv() => self.work.audits.push(audit),
                _ = tokio::time::sleep_until(next_tick) => {}
            }
            // Whatever else is waiting, taken in one round.
            while !self.changes_closed {
                match self.changes.try_recv() {
                    Err(broadcast::error::TryRecvError::Empty) => break,
                    Err(broadcast::error::TryRecvError::Closed) => {
                        self.changes_closed = true;
                        break;
                    }
                    other => self.note_change(other.map_err(|e| match e {
                        broadcast::error::TryRecvError::Lagged(n) => {
                            broadcast::error::RecvError::Lagged(n)
                        }
                        _ => broadcast::error::RecvError::Closed,
                    })),
                }
            }
            while let Ok(a) = self.audits.try_recv() {
                self.work.audits.push(a);
            }
            let tick = tokio::time::Instant::now() >= next_tick;
            let mut again = false;
            let round = async {
                if tick {
                    again = self.tick().await?;
                }
                self.deliver_missing().await
            };
            match round.await {
                Ok(()) => {}
                Err(e) => {
                    self.client = None;
                    // What was pending may be lost with the connection: audit everything.
                    self.work = Work {
                        all: true,
                        ..Work::default()
                    };
                    if self
                        .last_warned
                        .is_none_or(|t| t.elapsed() > Duration::from_secs(60))
                    {
                        tracing::warn!(pipeline = self.events.pipeline(), error = %e, "The campaign scheduler could not complete a round; it tries again.");
                        self.last_warned = Some(Instant::now());
                    }
                }
            }
            if tick {
                next_tick = tokio::time::Instant::now() + if again { Duration::ZERO } else { TICK };
            }
        }
        tracing::debug!("Campaign scheduler stopped.");
    }

    fn note_change(&mut self, change: Result<Arc<CacheChange>, broadcast::error::RecvError>) {
        match change {
            Ok(c) => match &*c {
                CacheChange::Present { version, pairs } => {
                    let now = Instant::now();
                    for (restaurant, client) in pairs {
                        self.work
                            .added
                            .entry(restaurant.clone())
                            .or_default()
                            .insert(client.clone());
                        self.recent
                            .push_back((*version, restaurant.clone(), client.clone(), now));
                    }
                    while self.recent.len() > RECENT_MAX
                        || self
                            .recent
                            .front()
                            .is_some_and(|r| r.3.elapsed() > RECENT_FOR)
                    {
                        if let Some((v, ..)) = self.recent.pop_front() {
                            self.covered_from = self.covered_from.max(v);
                        }
                    }
                }
                CacheChange::Reloaded { version } => {
                    self.work.all = true;
                    self.recent.clear();
                    self.covered_from = *version;
                }
            },
            Err(broadcast::error::RecvError::Lagged(_)) => {
                self.work.all = true;
                self.recent.clear();
                self.covered_from = self.cache.snapshot().version();
            }
            // The cache's follower stopped: the runner is stopping.
            Err(broadcast::error::RecvError::Closed) => self.changes_closed = true,
        }
    }

    async fn client(&mut self) -> Result<&Client, DbError> {
        if self.client.as_ref().is_none_or(|c| c.is_closed()) {
            self.client = Some(crate::db::connect(&self.cfg.postgres_url).await?);
        }
        Ok(self.client.as_ref().expect("connected above"))
    }

    /// One tick: the partitions owned, starts due, windows closed, the summary. Returns true
    /// when more starts are due than one read takes.
    async fn tick(&mut self) -> Result<bool, RoundError> {
        let now = self.clock.now();
        let topic = self.cfg.input_topic.clone();
        let instance = self.cfg.instance_id.clone();
        let owned: BTreeSet<i32> = self
            .client()
            .await?
            .query(OWNED_SQL, &[&topic, &instance])
            .await?
            .iter()
            .map(|r| r.get(0))
            .collect();
        let newly: Vec<i32> = owned.difference(&self.owned).copied().collect();
        self.work.partitions.extend(newly);
        self.owned = owned;
        let partitions: Vec<i32> = self.owned.iter().copied().collect();
        if partitions.is_empty() {
            self.publish_summary(0, None);
            return Ok(false);
        }
        let due: Vec<Campaign> = self
            .client()
            .await?
            .query(DUE_SQL, &[&topic, &partitions, &now, &DUE_BATCH])
            .await?
            .iter()
            .map(Campaign::from_row)
            .collect::<Result<_, _>>()?;
        let more = due.len() as i64 == DUE_BATCH;
        if !due.is_empty() {
            self.start(&due).await?;
        }
        let ended = self
            .client()
            .await?
            .query(ENDED_SQL, &[&topic, &partitions, &now])
            .await?;
        for r in &ended {
            let started: bool = r.get(3);
            if !started {
                let id: String = r.get(0);
                let pos = SourcePos {
                    topic: topic.clone(),
                    partition: r.get(1),
                    offset: r.get(2),
                };
                self.events.skipped("expired", &pos, &id);
            }
        }
        let summary = self
            .client()
            .await?
            .query_one(SUMMARY_SQL, &[&topic, &partitions])
            .await?;
        let scheduled: i64 = summary.get(0);
        let next: Option<i64> = summary.get(1);
        self.publish_summary(scheduled.max(0) as u64, next);
        Ok(more)
    }

    fn publish_summary(&self, scheduled: u64, next_start: Option<i64>) {
        self.metrics.scheduled.set(scheduled as i64);
        self.metrics.next_start.set(next_start.unwrap_or(0));
        self.events.update_schedule(|s| {
            s.scheduled = scheduled;
            s.next_start = next_start;
        });
    }

    /// Triggers the starts of `due`, then marks them started (a crash in between triggers them
    /// again: harmless).
    async fn start(&mut self, due: &[Campaign]) -> Result<(), RoundError> {
        let sends = due
            .iter()
            .map(|c| self.produce(c, Cause::ScheduledStart, None));
        let results = futures::future::join_all(sends).await;
        let (mut ids, mut partitions, mut offsets) = (Vec::new(), Vec::new(), Vec::new());
        let mut failed = None;
        for (c, r) in due.iter().zip(results) {
            match r {
                Ok(()) => {
                    self.starting
                        .insert(c.adv_campaign_id.clone(), Instant::now());
                    ids.push(c.adv_campaign_id.as_str());
                    partitions.push(c.partition);
                    offsets.push(c.source_offset);
                    tracing::info!(pipeline = self.events.pipeline(), campaign = %c.adv_campaign_id, partition = c.partition, "Campaign start triggered.");
                }
                Err(e) => failed = Some(e),
            }
        }
        self.count_triggers(Cause::ScheduledStart, ids.len());
        if !ids.is_empty() {
            let params: [&(dyn ToSql + Sync); 3] = [&ids, &partitions, &offsets];
            self.client().await?.execute(STARTED_SQL, &params).await?;
        }
        match failed {
            Some(e) => Err(RoundError::Kafka(e)),
            None => Ok(()),
        }
    }

    fn count_triggers(&self, cause: Cause, n: usize) {
        if n == 0 {
            return;
        }
        self.metrics
            .triggers
            .with_label_values(&[cause.as_str()])
            .inc_by(n as u64);
        self.events
            .update_schedule(|s| *s.triggers.entry(cause.as_str()).or_default() += n as u64);
    }

    /// Produces one trigger record for `c` to its partition and waits for the broker's ack.
    async fn produce(
        &self,
        c: &Campaign,
        cause: Cause,
        clients: Option<&[String]>,
    ) -> Result<(), String> {
        let of = format!(
            "{}/{}/{}",
            self.cfg.input_topic, c.partition, c.source_offset
        );
        let clients_json = clients.map(|cl| serde_json::to_vec(cl).expect("strings serialise"));
        let mut headers: Vec<(&str, &[u8])> = vec![
            (TRIGGER, cause.as_str().as_bytes()),
            (TRIGGER_OF, of.as_bytes()),
        ];
        if let Some(j) = &clients_json {
            headers.push((TRIGGER_CLIENTS, j));
        }
        let mut record = FutureRecord::to(&self.cfg.input_topic)
            .partition(c.partition)
            .payload(&c.payload)
            .headers(crate::headers::owned(headers));
        if let Some(k) = &c.key {
            record = record.key(k);
        }
        self.producer
            .send(record, Timeout::After(PRODUCE_TIMEOUT))
            .await
            .map(|_| ())
            .map_err(|(e, _)| e.to_string())
    }

    /// Looks at the active campaigns the pending work names, and triggers the drafts their
    /// restaurants' subscribers miss.
    async fn deliver_missing(&mut self) -> Result<(), RoundError> {
        if self.work.is_empty() || self.owned.is_empty() {
            // Partitions not owned any more have nothing to audit here.
            self.work.partitions.clear();
            return Ok(());
        }
        let work = std::mem::take(&mut self.work);
        let now = self.clock.now();
        let topic = self.cfg.input_topic.clone();
        let partitions: Vec<i32> = self.owned.iter().copied().collect();
        let snapshot = self.cache.snapshot();
        // Each campaign with its candidates (None: every current subscriber).
        let mut wanted: BTreeMap<String, (Campaign, Option<BTreeSet<String>>)> = BTreeMap::new();
        let full = work.all || !work.partitions.is_empty();
        if full {
            let restaurants: Option<Vec<String>> = None;
            let rows = self
                .client()
                .await?
                .query(ACTIVE_SQL, &[&topic, &partitions, &now, &restaurants])
                .await?;
            self.starting.retain(|_, t| t.elapsed() < IN_FLIGHT);
            for r in &rows {
                let c = Campaign::from_row(r)?;
                if (work.all || work.partitions.contains(&c.partition))
                    && !self.starting.contains_key(&c.adv_campaign_id)
                {
                    wanted.insert(c.adv_campaign_id.clone(), (c, None));
                }
            }
        }
        let mut restaurants: BTreeSet<String> = work.added.keys().cloned().collect();
        restaurants.extend(work.audits.iter().map(|a| a.restaurant_id.clone()));
        if !restaurants.is_empty() {
            let restaurants: Option<Vec<String>> = Some(restaurants.into_iter().collect());
            let rows = self
                .client()
                .await?
                .query(ACTIVE_SQL, &[&topic, &partitions, &now, &restaurants])
                .await?;
            let audited: HashMap<&str, &Audit> = work
                .audits
                .iter()
                .map(|a| (a.adv_campaign_id.as_str(), a))
                .collect();
            for r in &rows {
                let c = Campaign::from_row(r)?;
                if wanted
                    .get(&c.adv_campaign_id)
                    .is_some_and(|w| w.1.is_none())
                {
                    continue;
                }
                let mut candidates: Option<BTreeSet<String>> = Some(
                    work.added
                        .get(&c.restaurant_id)
                        .cloned()
                        .unwrap_or_default(),
                );
                if let Some(a) = audited.get(c.adv_campaign_id.as_str()) {
                    if a.joined >= self.covered_from {
                        let since = self
                            .recent
                            .iter()
                            .filter(|r| r.0 > a.joined && r.1 == c.restaurant_id)
                            .map(|r| r.2.clone());
                        if let Some(cands) = candidates.as_mut() {
                            cands.extend(since);
                        }
                    } else {
                        candidates = None;
                    }
                }
                if candidates.as_ref().is_some_and(BTreeSet::is_empty) {
                    continue;
                }
                wanted.insert(c.adv_campaign_id.clone(), (c, candidates));
            }
        }
        if wanted.is_empty() {
            return Ok(());
        }
        // The candidates still subscribed, not triggered lately.
        self.in_flight.retain(|_, t| t.elapsed() < IN_FLIGHT);
        let mut clients_buf = Vec::new();
        let mut pairs: Vec<(String, String)> = Vec::new();
        for (id, (c, candidates)) in &wanted {
            snapshot.clients_into(&c.restaurant_id, &mut clients_buf);
            let subscribed: HashSet<&str> = clients_buf.iter().map(String::as_str).collect();
            let chosen: Vec<String> = match candidates {
                None => clients_buf.clone(),
                Some(cands) => cands
                    .iter()
                    .filter(|cl| subscribed.contains(cl.as_str()))
                    .cloned()
                    .collect(),
            };
            pairs.extend(
                chosen
                    .into_iter()
                    .filter(|cl| !self.in_flight.contains_key(&(id.clone(), cl.clone())))
                    .map(|cl| (id.clone(), cl)),
            );
        }
        // Those who have the draft already.
        let mut asked: HashMap<&str, HashSet<&str>> = HashMap::new();
        for (id, client) in &pairs {
            asked.entry(id).or_default().insert(client);
        }
        let ids: Vec<&str> = asked.keys().copied().collect();
        let mut present: HashSet<(String, String)> = HashSet::new();
        for chunk in ids.chunks(CAMPAIGNS_PER_LOOKUP) {
            let params: [&(dyn ToSql + Sync); 1] = [&chunk];
            for r in self.client().await?.query(PRESENT_SQL, &params).await? {
                let id: &str = r.get(0);
                let reached: Vec<&str> = r.get(1);
                let Some(wanted) = asked.get(id) else {
                    continue;
                };
                present.extend(
                    reached
                        .into_iter()
                        .filter(|cl| wanted.contains(cl))
                        .map(|cl| (id.to_string(), cl.to_string())),
                );
            }
        }
        let mut missing: BTreeMap<&str, Vec<String>> = BTreeMap::new();
        for (id, client) in &pairs {
            if !present.contains(&(id.clone(), client.clone())) {
                missing.entry(id).or_default().push(client.clone());
            }
        }
        let mut triggered = 0;
        let mut failed = None;
        for (id, clients) in missing {
            let c = &wanted[id].0;
            for chunk in clients.chunks(CLIENTS_PER_TRIGGER) {
                match self.produce(c, Cause::NewSubscriber, Some(chunk)).await {
                    Ok(()) => {
                        triggered += 1;
                        tracing::info!(pipeline = self.events.pipeline(), campaign = %id, clients = chunk.len(), "New subscribers of an active campaign triggered.");
                        let at = Instant::now();
                        for cl in chunk {
                            self.in_flight.insert((id.to_string(), cl.clone()), at);
                        }
                    }
                    Err(e) => failed = Some(e),
                }
            }
        }
        self.count_triggers(Cause::NewSubscriber, triggered);
        match failed {
            Some(e) => Err(RoundError::Kafka(e)),
            None => Ok(()),
        }
    }
}
