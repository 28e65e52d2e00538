//! Scheduled starts at scale: `campaigns` campaigns (one per restaurant, each restaurant with
//! `subscribers` subscribers; default 10,000 × 100) all published ahead of the same start
//! second S, and the time from S until all their drafts are committed in both sinks.
//!
//! The restaurants and subscribers are those of `runner produce campaigns`
//! (`runner::produce::campaigns`, seeded with its binary COPY); the campaigns are its
//! generator's, with the start set to S for all of them (the generator draws each start on its
//! own) and sent by this bench, keyed by restaurant.
//!
//! **The clock.** The runner runs in-process with a clock of its own (`RunOptions.clock`): the
//! wall clock plus an offset, 0 at first. S is a day after the wall clock when the campaigns
//! are made, so every one is consumed and kept (skip reason `scheduled`, a registry row not
//! started) however long that takes; once the runner counts all of them and the registry holds
//! them all, the offset is set so that the clock reads S at that instant, and it runs on with
//! the wall clock from there. That is the moment second S begins, as a wall clock would reach
//! it, without guessing beforehand how long registration takes (a wall-clock S chosen too close
//! would open windows before every campaign is kept, one chosen too far wastes the run's time
//! waiting). The rules' window opens at S + 1 (active is start < now < end), one second later.
//!
//! **Measured.** From the instant the clock reads S until the runner's count of drafts made
//! durable for the cause `scheduled_start` (`stats().schedule.deliveries`, counted after
//! Kafka's transaction committed, which follows PostgreSQL's) reaches campaigns × subscribers,
//! polled every 10 ms; reported from S and from the opening (S + 1). Also: when the scheduler's
//! count of `scheduled_start` triggers reached the number of campaigns, the triggers produced
//! in all, and the bench process's peak resident memory (the runner runs in it). At the end the
//! run is checked in PostgreSQL: campaigns × subscribers rows of `subscribers_feedback` for
//! those campaigns, each evaluated at or after the opening.

use crate::broker::Broker;
use crate::report::Report;
use anyhow::{Context, Result};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::ClientConfig;
use runner::clock::Clock;
use runner::produce::campaigns::{seed_subscribers, CampaignGenerator, DEFAULT_SEED_BATCH};
use runner::produce::{CampaignsOptions, Progress};
use std::path::Path;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// The seed of the restaurants, subscribers and campaigns.
const SEED: u64 = 1;

/// S, after the wall clock at the moment the campaigns are made.
const AHEAD_SECS: i64 = 86_400;

/// From start to end of each campaign.
const LENGTH_SECS: i64 = 2 * 3600;

/// How long registration, and then the deliveries, may take before the run is given up.
const REGISTRATION_LIMIT: Duration = Duration::from_secs(900);
const DELIVERY_LIMIT: Duration = Duration::from_secs(1800);

/// How often the runner's counters are read.
const POLL: Duration = Duration::from_millis(10);

fn wall_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// The runner's clock in this workload: the wall clock plus an offset that is set once.
#[derive(Debug, Default)]
struct ShiftedClock {
    offset_ms: AtomicI64,
}

impl ShiftedClock {
    /// From now on the clock reads `second` (which has just begun) and runs on with the wall
    /// clock.
    fn jump_to(&self, second: i64) {
        self.offset_ms
            .store(second * 1000 - wall_ms(), Ordering::SeqCst);
    }
}

impl Clock for ShiftedClock {
    fn now(&self) -> i64 {
        (wall_ms() + self.offset_ms.load(Ordering::SeqCst)).div_euclid(1000)
    }
}

/// The bench process's peak resident memory (VmHWM), bytes.
fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Starts the peak resident memory again from the current one (Linux `clear_refs`); false when
/// that is not possible here.
fn reset_peak_rss() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

/// The campaign value `value` (the generator's) with its start set to `start`, its end
/// `LENGTH_SECS` later and its creation at `created`.
fn starting_at(value: &[u8], start: i64, created: i64) -> Result<Vec<u8>> {
    let mut v: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(value).context("the generator's campaign is a JSON object")?;
    v.insert("adv_campaign_datetime_start".into(), start.into());
    v.insert(
        "adv_campaign_datetime_end".into(),
        (start + LENGTH_SECS).into(),
    );
    v.insert("datetime_created".into(), created.into());
    Ok(serde_json::to_vec(&v)?)
}

/// One run's figures.
#[derive(Debug, Clone, Copy)]
struct RunFigures {
    registration_s: f64,
    all_from_s: f64,
    triggers: u64,
    last_trigger_from_s: f64,
    peak_rss: Option<u64>,
}

fn scheduled_start(map: &std::collections::BTreeMap<&'static str, u64>) -> u64 {
    map.get("scheduled_start").copied().unwrap_or(0)
}

/// One run: a fresh runner, the campaigns sent and kept, then the clock moved to S.
async fn one_run(
    broker: &Broker,
    url: &str,
    rules: &Path,
    campaigns: usize,
    per: usize,
    run: usize,
) -> Result<RunFigures> {
    let db = runner::db::connect(url).await?;
    db.batch_execute(
        "TRUNCATE subscribers_feedback, campaign_runner_outbox, campaign_runner_fences, campaign_runner_registry, campaign_runner_delivered",
    )
    .await?;
    let rss_from_here = reset_peak_rss();
    let clock = Arc::new(ShiftedClock::default());
    let (running, input) = broker
        .start_runner_with_clock(url, rules, "", clock.clone())
        .await?;
    let made_at = clock.now();
    let s = made_at + AHEAD_SECS;
    let total = (campaigns * per) as u64;

    // Campaign n goes to restaurant n mod `campaigns`: each run's are new campaigns, one per
    // restaurant.
    let mut generator = CampaignGenerator::new(
        &CampaignsOptions {
            restaurants: u32::try_from(campaigns)?,
            first: ((run - 1) * campaigns) as u64,
            seed: Some(SEED),
            ..CampaignsOptions::default()
        },
        SEED,
    );
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", broker.brokers())
        .set("linger.ms", "5")
        .create()?;
    let mut ids = Vec::with_capacity(campaigns);
    let mut sends = Vec::with_capacity(campaigns);
    for _ in 0..campaigns {
        let c = generator.next_campaign(made_at);
        let value = starting_at(&c.value, s, made_at)?;
        let key = c.key.clone().unwrap_or_else(|| c.restaurant_id.clone());
        loop {
            match producer.send_result(FutureRecord::to(&input).key(&key).payload(&value)) {
                Ok(f) => {
                    sends.push(f);
                    break;
                }
                Err((
                    rdkafka::error::KafkaError::MessageProduction(
                        rdkafka::types::RDKafkaErrorCode::QueueFull,
                    ),
                    _,
                )) => tokio::time::sleep(Duration::from_millis(1)).await,
                Err((e, _)) => anyhow::bail!("produce: {e}"),
            }
        }
        ids.push(c.campaign_id);
    }
    for f in sends {
        f.await?.map_err(|(e, _)| e)?;
    }

    // Every campaign consumed and kept for S.
    let t = Instant::now();
    let mut last = Instant::now();
    loop {
        let st = running.campaigns().stats();
        let kept = st.skipped.get("scheduled").copied().unwrap_or(0);
        if kept >= campaigns as u64 {
            break;
        }
        if last.elapsed() > Duration::from_secs(5) {
            eprintln!(
                "bench schedule: run {run}: {kept} / {campaigns} campaigns kept for their start; skipped {:?}, dead-lettered {:?}",
                st.skipped, st.dead_lettered
            );
            last = Instant::now();
        }
        anyhow::ensure!(
            t.elapsed() < REGISTRATION_LIMIT,
            "the runner did not keep every campaign for its start within {REGISTRATION_LIMIT:?}: {:?}",
            st
        );
        tokio::time::sleep(POLL).await;
    }
    let registration_s = t.elapsed().as_secs_f64();
    let row = db
        .query_one(
            "SELECT count(*), count(*) FILTER (WHERE opens = $2) FROM campaign_runner_registry WHERE NOT started AND adv_campaign_id = ANY($1)",
            &[&ids, &(s + 1)],
        )
        .await?;
    let (waiting, opening): (i64, i64) = (row.get(0), row.get(1));
    anyhow::ensure!(
        waiting == campaigns as i64 && opening == waiting,
        "the registry holds {waiting} of the {campaigns} campaigns not started ({opening} opening at S + 1 = {})",
        s + 1
    );
    let before = running.campaigns().stats().schedule.unwrap_or_default();
    anyhow::ensure!(
        scheduled_start(&before.deliveries) == 0 && scheduled_start(&before.triggers) == 0,
        "scheduled starts before S: {before:?}"
    );
    eprintln!(
        "bench schedule: run {run}: {campaigns} campaigns kept for S in {registration_s:.2} s; the clock moves to S"
    );

    // Second S begins.
    let stages_before = running.campaigns().events.stage_snapshots();
    clock.jump_to(s);
    let t0 = Instant::now();
    let mut last_trigger = None;
    let mut last = Instant::now();
    let all = loop {
        let sch = running
            .campaigns()
            .stats()
            .schedule
            .context("the campaign pipeline reports its schedule")?;
        let elapsed = t0.elapsed();
        if last_trigger.is_none() && scheduled_start(&sch.triggers) >= campaigns as u64 {
            last_trigger = Some(elapsed);
        }
        if scheduled_start(&sch.deliveries) >= total {
            break elapsed;
        }
        if last.elapsed() > Duration::from_secs(5) {
            eprintln!(
                "bench schedule: run {run}: {:.1} s after S: {} / {campaigns} triggers, {} / {total} drafts",
                elapsed.as_secs_f64(),
                scheduled_start(&sch.triggers),
                scheduled_start(&sch.deliveries)
            );
            last = Instant::now();
        }
        anyhow::ensure!(
            elapsed < DELIVERY_LIMIT,
            "not every draft was committed within {DELIVERY_LIMIT:?} of S: {sch:?}"
        );
        tokio::time::sleep(POLL).await;
    };
    let peak_rss = if rss_from_here {
        peak_rss_bytes()
    } else {
        None
    };
    let sch = running
        .campaigns()
        .stats()
        .schedule
        .context("the campaign pipeline reports its schedule")?;
    let triggers = scheduled_start(&sch.triggers);
    let last_trigger = last_trigger.unwrap_or(all);
    let row = db
        .query_one(
            "SELECT count(*), min(trigger_datetime_created) FROM subscribers_feedback WHERE adv_campaign_id = ANY($1)",
            &[&ids],
        )
        .await?;
    let (rows, first_eval): (i64, Option<i32>) = (row.get(0), row.get(1));
    anyhow::ensure!(
        rows as u64 == total,
        "subscribers_feedback holds {rows} rows of the campaigns, not {total}"
    );
    anyhow::ensure!(
        first_eval.is_some_and(|e| i64::from(e) > s),
        "a draft was evaluated at {first_eval:?}, before the opening S + 1 = {}",
        s + 1
    );
    anyhow::ensure!(
        sch.deliveries.get("published").copied().unwrap_or(0) == 0,
        "drafts delivered at publication: {sch:?}"
    );
    eprintln!(
        "bench schedule: run {run}: {total} drafts committed {:.2} s after S ({:.2} s after the opening), {triggers} triggers, the last {:.2} s after S",
        all.as_secs_f64(),
        all.as_secs_f64() - 1.0,
        last_trigger.as_secs_f64()
    );
    // Where the triggers' units spent their time (from S on).
    for (name, after) in running.campaigns().events.stage_snapshots() {
        let q = match stages_before.get(name) {
            Some(b) => after.since(b).latency(),
            None => after.latency(),
        };
        eprintln!(
            "bench schedule: stage {name:<13} p50 {:>8.2} ms  p99 {:>8.2} ms  max {:>8.2} ms  ({} units)",
            q.p50_ms, q.p99_ms, q.max_ms, q.samples
        );
    }
    running.stop().await?;
    Ok(RunFigures {
        registration_s,
        all_from_s: all.as_secs_f64(),
        triggers,
        last_trigger_from_s: last_trigger.as_secs_f64(),
        peak_rss,
    })
}

pub async fn run(
    admin_url: &str,
    rules: &Path,
    campaigns: usize,
    per: usize,
    runs: usize,
) -> Result<Report> {
    anyhow::ensure!(
        campaigns > 0 && per > 0 && runs > 0,
        "campaigns, subscribers and runs must be at least 1"
    );
    let broker = Broker::start()?;
    let url = e2e_tests::fresh_database(admin_url, "bench_schedule")
        .await
        .context("bench database")?;
    runner::pipelines::campaigns::ensure_schema(&runner::db::connect(&url).await?).await?;
    let seeded = seed_subscribers(
        &url,
        u32::try_from(campaigns)?,
        u32::try_from(per)?,
        SEED,
        DEFAULT_SEED_BATCH,
        Progress::Hidden,
    )
    .await?;
    eprintln!("bench schedule: {seeded}");
    let mut figures = Vec::with_capacity(runs);
    for run in 1..=runs {
        figures.push(one_run(&broker, &url, rules, campaigns, per, run).await?);
    }
    let total = (campaigns * per) as f64;
    let col = |g: fn(&RunFigures) -> f64| figures.iter().map(g).collect::<Vec<_>>();
    let mut report = Report::new("schedule");
    report.add(
        &format!("{campaigns} x {per}: all drafts committed in both sinks, from S"),
        "s",
        col(|f| f.all_from_s),
        None,
    );
    report.add(
        "all drafts committed, from the opening (S + 1)",
        "s",
        col(|f| f.all_from_s - 1.0),
        None,
    );
    report.add(
        "drafts/s from S",
        "drafts/s",
        figures.iter().map(|f| total / f.all_from_s).collect(),
        None,
    );
    report.add(
        "drafts/s from the opening",
        "drafts/s",
        figures
            .iter()
            .map(|f| total / (f.all_from_s - 1.0))
            .collect(),
        None,
    );
    report.add(
        "scheduled_start triggers produced",
        "count",
        col(|f| f.triggers as f64),
        None,
    );
    report.add(
        "last trigger produced, from S",
        "s",
        col(|f| f.last_trigger_from_s),
        None,
    );
    report.add(
        "last trigger produced, from the opening",
        "s",
        col(|f| f.last_trigger_from_s - 1.0),
        None,
    );
    report.add(
        &format!(
            "{campaigns} campaigns consumed and kept for S (before S, not in the figures above)"
        ),
        "s",
        col(|f| f.registration_s),
        None,
    );
    if figures.iter().all(|f| f.peak_rss.is_some()) {
        report.add(
            "peak resident memory of the bench process (the runner in it)",
            "MiB",
            figures
                .iter()
                .map(|f| f.peak_rss.unwrap_or(0) as f64 / f64::from(1 << 20))
                .collect(),
            None,
        );
    }
    report.notes.push(format!(
        "Broker: {}. {campaigns} campaigns, one per restaurant, each restaurant with {per} subscribers ({} subscriptions, seeded with binary COPY), all starting at the same second S. The runner's clock is the wall clock until every campaign is kept (skip reason `scheduled`, a registry row not started); then it is set to read S at that instant and runs on with the wall clock. The rules' window opens at S + 1. Drafts count once Kafka's transaction committed (after PostgreSQL's): the runner's deliveries of cause `scheduled_start`, read every 10 ms, then checked against subscribers_feedback. Peak memory: VmHWM of the bench process, reset before each run's runner starts (it includes the bench's own producer). Each run on a fresh runner and topics; the subscribers seeded once.",
        broker.label(),
        campaigns * per
    ));
    Ok(report)
}
