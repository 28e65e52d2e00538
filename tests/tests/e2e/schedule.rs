//! Scheduled starts and new subscribers (docs/SPEC.md, "The rules": every subscriber gets every
//! campaign while it is active). A campaign published before its start is kept and delivered
//! at its start, also when the start passed while no runner ran; a subscriber added while a
//! campaign is active gets it; nobody gets a campaign twice, and nothing is delivered after a
//! campaign's end. Time is a settable clock shared by the evaluation and the scheduler, moved
//! when a test says so.
//!
//! Every test checks both sinks, `subscribers_feedback` and the output topic, for the exact set
//! of (campaign, client) pairs, each exactly once. That nothing more arrives is shown by a
//! *marker*: an active campaign published after the fact on the same (single) input partition,
//! whose drafts arrive only after everything before it was settled. What the scheduler has
//! not done is shown by a *witness*: a campaign or subscriber it must act on at the same time
//! or after (its changes are handled in order, its starts in one round), followed by a marker.

use anyhow::{ensure, Context, Result};
use e2e_tests::*;
use rdkafka::message::{Header, Message, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use runner::app::{RunOptions, Running};
use runner::events::Stats;
use runner::pipelines::campaigns::cache::IdRef;
use runner::pipelines::campaigns::header;
use runner::pipelines::campaigns::schedule::{TRIGGER, TRIGGER_CLIENTS};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const T: i64 = 1_700_000_000;
/// How long a first delivery may take (the consumer joins the group first).
const FIRST: Duration = Duration::from_secs(30);
/// How long a start or a new subscriber may take to reach both sinks once the runner runs.
const PROMPT: Duration = Duration::from_secs(5);

/// A clock the test moves.
#[derive(Debug, Clone)]
struct SetClock(Arc<AtomicI64>);

impl SetClock {
    fn at(now: i64) -> SetClock {
        SetClock(Arc::new(AtomicI64::new(now)))
    }

    fn set(&self, now: i64) {
        self.0.store(now, Ordering::SeqCst);
    }

    fn get(&self) -> i64 {
        self.0.load(Ordering::SeqCst)
    }

    fn options(&self) -> RunOptions {
        RunOptions {
            clock: Arc::new(self.clone()),
            ..RunOptions::default()
        }
    }
}

impl runner::clock::Clock for SetClock {
    fn now(&self) -> i64 {
        self.get()
    }
}

fn uuid() -> String {
    uuid::Uuid::new_v4().to_string()
}

/// A campaign value with its own content.
fn campaign_with(restaurant: &str, id: &str, content: &str, start: i64, end: i64) -> String {
    let mut v: serde_json::Value =
        serde_json::from_str(&campaign(restaurant, id, start, end)).expect("a campaign");
    v["adv_campaign_content"] = content.into();
    v.to_string()
}

type Pair = (String, String);

fn pair(campaign: &str, client: &str) -> Pair {
    (campaign.to_string(), client.to_string())
}

/// (campaign, client) → rows in `subscribers_feedback`.
async fn pg_pairs(db: &TestDb) -> Result<BTreeMap<Pair, usize>> {
    let rows = db
        .client()
        .await?
        .query(
            "SELECT adv_campaign_id, client_id, count(*) FROM public.subscribers_feedback GROUP BY 1, 2",
            &[],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| ((r.get(0), r.get(1)), r.get::<_, i64>(2) as usize))
        .collect())
}

/// The drafts of the output topic (committed ones).
async fn all_drafts(kafka: &MockKafka) -> Result<Vec<rdkafka::message::OwnedMessage>> {
    kafka.drafts(1_000).await
}

/// (campaign, client) → records in the output topic.
async fn kafka_pairs(kafka: &MockKafka) -> Result<BTreeMap<Pair, usize>> {
    let mut out = BTreeMap::new();
    for m in all_drafts(kafka).await? {
        let v = json(&m);
        let p = pair(
            v["adv_campaign_id"].as_str().context("adv_campaign_id")?,
            v["client_id"].as_str().context("client_id")?,
        );
        *out.entry(p).or_default() += 1;
    }
    Ok(out)
}

/// The clients that have `campaign`, with their number of drafts.
fn clients_of(pairs: &BTreeMap<Pair, usize>, campaign: &str) -> BTreeMap<String, usize> {
    pairs
        .iter()
        .filter(|((c, _), _)| c == campaign)
        .map(|((_, cl), n)| (cl.clone(), *n))
        .collect()
}

fn once_each(clients: &[&str]) -> BTreeMap<String, usize> {
    clients.iter().map(|c| (c.to_string(), 1)).collect()
}

/// Waits until both sinks hold exactly one draft of `campaign` for each of `clients` and none
/// for anyone else.
async fn wait_delivered(
    kafka: &MockKafka,
    db: &TestDb,
    campaign: &str,
    clients: &[&str],
    timeout: Duration,
) -> Result<()> {
    let want = once_each(clients);
    let deadline = Instant::now() + timeout;
    loop {
        let pg = clients_of(&pg_pairs(db).await?, campaign);
        let kf = clients_of(&kafka_pairs(kafka).await?, campaign);
        if pg == want && kf == want {
            return Ok(());
        }
        if Instant::now() > deadline {
            anyhow::bail!(
                "campaign {campaign} after {timeout:?}: subscribers_feedback {pg:?}, output topic {kf:?}; expected {want:?}"
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Both sinks hold exactly `want`, each pair once.
async fn assert_exactly(kafka: &MockKafka, db: &TestDb, want: &BTreeSet<Pair>) -> Result<()> {
    let want: BTreeMap<Pair, usize> = want.iter().map(|p| (p.clone(), 1)).collect();
    let pg = pg_pairs(db).await?;
    ensure!(pg == want, "subscribers_feedback {pg:?}\nexpected {want:?}");
    let kf = kafka_pairs(kafka).await?;
    ensure!(kf == want, "output topic {kf:?}\nexpected {want:?}");
    Ok(())
}

/// A campaign's registry row: (started, opens, closes, payload).
async fn registry_row(db: &TestDb, campaign: &str) -> Result<Option<(bool, i64, i64, String)>> {
    let row = db
        .client()
        .await?
        .query_opt(
            "SELECT started, opens, closes, convert_from(payload, 'UTF8') \
             FROM public.campaign_runner_registry WHERE adv_campaign_id = $1",
            &[&campaign],
        )
        .await?;
    Ok(row.map(|r| (r.get(0), r.get(1), r.get(2), r.get(3))))
}

async fn wait_registry(
    db: &TestDb,
    campaign: &str,
    timeout: Duration,
    mut ok: impl FnMut(&Option<(bool, i64, i64, String)>) -> bool,
) -> Result<Option<(bool, i64, i64, String)>> {
    let deadline = Instant::now() + timeout;
    loop {
        let row = registry_row(db, campaign).await?;
        if ok(&row) {
            return Ok(row);
        }
        if Instant::now() > deadline {
            anyhow::bail!("registry row of {campaign} after {timeout:?}: {row:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn count(m: &BTreeMap<&'static str, u64>, key: &str) -> u64 {
    m.get(key).copied().unwrap_or(0)
}

/// Waits until `f` holds of the campaign pipeline's counters.
async fn wait_stats(
    running: &Running,
    timeout: Duration,
    f: impl Fn(&Stats) -> bool,
) -> Result<Stats> {
    let ok = wait_for(timeout, || f(&running.campaigns().stats())).await;
    let stats = running.campaigns().stats();
    ensure!(ok, "counters after {timeout:?}: {stats:?}");
    Ok(stats)
}

/// Waits until the runner's subscriber cache shows exactly `clients` for `restaurant`.
async fn wait_cache(running: &Running, restaurant: &str, clients: &[&str]) -> Result<()> {
    let want: BTreeSet<String> = clients.iter().map(|c| c.to_string()).collect();
    let seen = || -> BTreeSet<String> {
        running
            .campaigns()
            .cache
            .snapshot()
            .clients(restaurant)
            .map(IdRef::to_text)
            .collect()
    };
    let ok = wait_for(Duration::from_secs(10), || seen() == want).await;
    ensure!(ok, "cache of {restaurant}: {:?}, expected {want:?}", seen());
    Ok(())
}

async fn subscribe(db: &TestDb, client: &str, restaurant: &str) -> Result<()> {
    db.subscribe_with(&db.client().await?, client, restaurant)
        .await
}

async fn unsubscribe(db: &TestDb, client: &str, restaurant: &str) -> Result<()> {
    db.client()
        .await?
        .execute(
            "DELETE FROM public.subscribers_restaurants WHERE client_id = $1 AND restaurant_id = $2",
            &[&client, &restaurant],
        )
        .await?;
    Ok(())
}

async fn publish(kafka: &MockKafka, value: &str) -> Result<()> {
    kafka.produce(&[(Some("k"), value.as_bytes())]).await
}

/// Produces `value` with `headers` to the input topic.
async fn publish_with_headers(
    kafka: &MockKafka,
    value: &str,
    headers: &[(&str, &str)],
) -> Result<()> {
    let producer: FutureProducer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", &kafka.brokers)
        .create()?;
    let h = headers.iter().fold(OwnedHeaders::new(), |h, (k, v)| {
        h.insert(Header {
            key: k,
            value: Some(v.as_bytes()),
        })
    });
    producer
        .send(
            FutureRecord::<str, str>::to(&kafka.input)
                .key("k")
                .payload(value)
                .headers(h),
            Duration::from_secs(10),
        )
        .await
        .map_err(|(e, _)| e)?;
    Ok(())
}

/// Active campaigns of a restaurant of their own, with one subscriber, published after the
/// fact: once a marker's drafts are in both sinks, everything before it on the partition is
/// settled.
struct Markers {
    restaurant: String,
    client: String,
}

impl Markers {
    async fn new(db: &TestDb) -> Result<Markers> {
        let m = Markers {
            restaurant: uuid(),
            client: "marker-client".into(),
        };
        subscribe(db, &m.client, &m.restaurant).await?;
        Ok(m)
    }

    /// Publishes a marker active at `now` and waits for its draft in both sinks; returns its
    /// pair.
    async fn pass(
        &self,
        kafka: &MockKafka,
        db: &TestDb,
        now: i64,
        timeout: Duration,
    ) -> Result<Pair> {
        let id = uuid();
        publish(
            kafka,
            &campaign_with(&self.restaurant, &id, "marker", now - 10, now + 1_000_000),
        )
        .await?;
        wait_delivered(kafka, db, &id, &[&self.client], timeout)
            .await
            .context("the marker")?;
        Ok(pair(&id, &self.client))
    }
}

/// The value of one series of `/metrics`.
fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        let (series, value) = l.rsplit_once(' ')?;
        let (n, rest) = series.split_once('{').unwrap_or((series, ""));
        (n == name
            && labels
                .iter()
                .all(|(k, v)| rest.contains(&format!("{k}=\"{v}\""))))
        .then(|| value.parse().ok())
        .flatten()
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_campaign_published_before_its_start_is_delivered_at_its_start() -> Result<()> {
    let kafka = MockKafka::new(1)?;
    let db = TestDb::new().await?.with_schema().await?;
    let clock = SetClock::at(T);
    let r = uuid();
    for c in ["a1", "a2", "a3"] {
        subscribe(&db, c, &r).await?;
    }
    let markers = Markers::new(&db).await?;
    let running = start(config(&kafka, &db, ""), clock.options()).await?;
    let mut want = BTreeSet::new();
    want.insert(markers.pass(&kafka, &db, T, FIRST).await?);

    let id = uuid();
    publish(
        &kafka,
        &campaign_with(&r, &id, "at the start", T + 100, T + 1000),
    )
    .await?;
    wait_stats(&running, PROMPT, |s| s.skipped("scheduled") == 1).await?;
    let row = registry_row(&db, &id).await?;
    assert_eq!(
        row.as_ref().map(|r| (r.0, r.1, r.2)),
        Some((false, T + 101, T + 1000)),
        "kept, not started, with the rules' window"
    );
    wait_stats(&running, PROMPT, |s| {
        s.schedule
            .as_ref()
            .is_some_and(|s| s.scheduled == 1 && s.next_start == Some(T + 101))
    })
    .await?;

    // While it waits: one subscriber comes, one goes.
    subscribe(&db, "a4", &r).await?;
    unsubscribe(&db, "a3", &r).await?;
    wait_cache(&running, &r, &["a1", "a2", "a4"]).await?;
    want.insert(markers.pass(&kafka, &db, T, PROMPT).await?);
    assert_exactly(&kafka, &db, &want).await?;

    clock.set(T + 101);
    let opened = Instant::now();
    wait_stats(&running, PROMPT, |s| {
        s.schedule
            .as_ref()
            .is_some_and(|s| count(&s.deliveries, "scheduled_start") == 3)
    })
    .await?;
    println!(
        "window open → drafts committed in both sinks: {:?}",
        opened.elapsed()
    );
    wait_delivered(&kafka, &db, &id, &["a1", "a2", "a4"], PROMPT).await?;
    for c in ["a1", "a2", "a4"] {
        want.insert(pair(&id, c));
    }
    let times: Vec<i32> = db
        .client()
        .await?
        .query(
            "SELECT trigger_datetime_created FROM public.subscribers_feedback WHERE adv_campaign_id = $1",
            &[&id],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(
        times,
        vec![(T + 101) as i32; 3],
        "made at the start, not at the publication"
    );
    for m in all_drafts(&kafka).await? {
        let v = json(&m);
        if v["adv_campaign_id"] == id.as_str() {
            assert_eq!(v["trigger_datetime_created"], T + 101, "{v}");
            assert_eq!(v["adv_campaign_content"], "at the start", "{v}");
            assert_eq!(header(&m, header::ADV_CAMPAIGN_ID), Some(id.as_str()));
        }
    }
    wait_stats(&running, PROMPT, |s| {
        s.schedule.as_ref().is_some_and(|s| {
            count(&s.deliveries, "scheduled_start") == 3
                && count(&s.triggers, "scheduled_start") == 1
                && s.scheduled == 0
                && s.next_start.is_none()
        })
    })
    .await?;
    let row = registry_row(&db, &id).await?;
    assert_eq!(row.map(|r| r.0), Some(true), "the registry row is started");

    // Nothing more: no second start, nobody twice.
    want.insert(markers.pass(&kafka, &db, T + 101, PROMPT).await?);
    let stats = stop(running).await?;
    assert_exactly(&kafka, &db, &want).await?;
    let s = stats.schedule.clone().unwrap_or_default();
    assert_eq!(count(&s.triggers, "scheduled_start"), 1, "{stats:?}");
    assert_eq!(count(&s.deliveries, "scheduled_start"), 3, "{stats:?}");
    assert_eq!(
        count(&s.deliveries, "published"),
        3,
        "the three markers: {stats:?}"
    );
    assert_eq!(stats.skipped("scheduled"), 1, "{stats:?}");
    assert_eq!(stats.skipped("not_started"), 0, "{stats:?}");
    assert!(kafka.dead_letters(1).await?.is_empty());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_added_while_a_campaign_runs_gets_it_once() -> Result<()> {
    let kafka = MockKafka::new(1)?;
    let db = TestDb::new().await?.with_schema().await?;
    let clock = SetClock::at(T);
    let (rb, rc) = (uuid(), uuid());
    for c in ["b1", "b2"] {
        subscribe(&db, c, &rb).await?;
    }
    subscribe(&db, "c1", &rc).await?;
    let markers = Markers::new(&db).await?;
    let running = start(config(&kafka, &db, ""), clock.options()).await?;
    let mut want = BTreeSet::new();

    // Active until T+1000, and one active until T+50 only.
    let (long, short) = (uuid(), uuid());
    publish(&kafka, &campaign_with(&rb, &long, "long", T - 10, T + 1000)).await?;
    publish(&kafka, &campaign_with(&rc, &short, "short", T - 10, T + 50)).await?;
    wait_delivered(&kafka, &db, &long, &["b1", "b2"], FIRST).await?;
    wait_delivered(&kafka, &db, &short, &["c1"], PROMPT).await?;
    want.extend([pair(&long, "b1"), pair(&long, "b2"), pair(&short, "c1")]);
    wait_stats(&running, PROMPT, |s| {
        s.schedule
            .as_ref()
            .is_some_and(|s| count(&s.deliveries, "published") == 3)
    })
    .await?;

    // A new subscriber: its draft, in both sinks, within a few seconds of the INSERT.
    let inserted = Instant::now();
    subscribe(&db, "b3", &rb).await?;
    wait_stats(&running, PROMPT, |s| {
        s.schedule
            .as_ref()
            .is_some_and(|s| count(&s.deliveries, "new_subscriber") == 1)
    })
    .await?;
    println!(
        "INSERT → draft committed in both sinks: {:?}",
        inserted.elapsed()
    );
    wait_delivered(&kafka, &db, &long, &["b1", "b2", "b3"], PROMPT).await?;
    want.insert(pair(&long, "b3"));
    wait_stats(&running, PROMPT, |s| {
        s.schedule.as_ref().is_some_and(|s| {
            count(&s.deliveries, "new_subscriber") == 1 && count(&s.triggers, "new_subscriber") >= 1
        })
    })
    .await?;

    // Removed and added again: no second draft. A later new subscriber (b4) shows that the
    // scheduler has looked at b1's return (changes are handled in order).
    unsubscribe(&db, "b1", &rb).await?;
    wait_cache(&running, &rb, &["b2", "b3"]).await?;
    subscribe(&db, "b1", &rb).await?;
    wait_cache(&running, &rb, &["b1", "b2", "b3"]).await?;
    subscribe(&db, "b4", &rb).await?;
    wait_delivered(&kafka, &db, &long, &["b1", "b2", "b3", "b4"], PROMPT).await?;
    want.insert(pair(&long, "b4"));
    want.insert(markers.pass(&kafka, &db, T, PROMPT).await?);
    assert_exactly(&kafka, &db, &want).await?;

    // Past the short campaign's end: its registry row goes, and a subscriber added to its
    // restaurant gets nothing. b5 (for the long one, still active) shows the scheduler has
    // looked at c2's subscription.
    clock.set(T + 60);
    wait_registry(&db, &short, PROMPT, Option::is_none).await?;
    subscribe(&db, "c2", &rc).await?;
    wait_cache(&running, &rc, &["c1", "c2"]).await?;
    subscribe(&db, "b5", &rb).await?;
    wait_delivered(&kafka, &db, &long, &["b1", "b2", "b3", "b4", "b5"], PROMPT).await?;
    want.insert(pair(&long, "b5"));
    want.insert(markers.pass(&kafka, &db, T + 60, PROMPT).await?);
    let stats = stop(running).await?;
    assert_exactly(&kafka, &db, &want).await?;
    let s = stats.schedule.clone().unwrap_or_default();
    assert_eq!(
        count(&s.deliveries, "new_subscriber"),
        3,
        "b3, b4, b5: {stats:?}"
    );
    assert_eq!(count(&s.deliveries, "published"), 5, "{stats:?}");
    assert_eq!(count(&s.deliveries, "scheduled_start"), 0, "{stats:?}");
    assert_eq!(
        stats.skipped("expired"),
        0,
        "a campaign that ran is not an expired skip: {stats:?}"
    );
    assert!(kafka.dead_letters(1).await?.is_empty());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_is_delivered_after_the_end() -> Result<()> {
    let kafka = MockKafka::new(1)?;
    let db = TestDb::new().await?.with_schema().await?;
    let clock = SetClock::at(T);
    let r = uuid();
    for c in ["d1", "d2"] {
        subscribe(&db, c, &r).await?;
    }
    let markers = Markers::new(&db).await?;
    let running = start(config(&kafka, &db, ""), clock.options()).await?;
    let mut want = BTreeSet::new();
    want.insert(markers.pass(&kafka, &db, T, FIRST).await?);

    let id = uuid();
    let value = campaign_with(&r, &id, "never", T + 100, T + 200);
    publish(&kafka, &value).await?;
    wait_registry(&db, &id, PROMPT, |r| r.as_ref().is_some_and(|r| !r.0)).await?;
    wait_stats(&running, PROMPT, |s| {
        s.schedule.as_ref().is_some_and(|s| s.scheduled == 1)
    })
    .await?;

    // The clock jumps over the whole window: the row goes, counted as expired, never started.
    clock.set(T + 300);
    wait_registry(&db, &id, PROMPT, Option::is_none).await?;
    wait_stats(&running, PROMPT, |s| s.skipped("expired") == 1).await?;

    // A start trigger that comes after the end (as one produced just before it would) is
    // skipped as expired too.
    publish_with_headers(&kafka, &value, &[(TRIGGER, "scheduled_start")]).await?;
    wait_stats(&running, PROMPT, |s| s.skipped("expired") == 2).await?;
    want.insert(markers.pass(&kafka, &db, T + 300, PROMPT).await?);
    let stats = stop(running).await?;
    assert_exactly(&kafka, &db, &want).await?;
    let s = stats.schedule.clone().unwrap_or_default();
    assert_eq!(count(&s.triggers, "scheduled_start"), 0, "{stats:?}");
    assert_eq!(count(&s.deliveries, "scheduled_start"), 0, "{stats:?}");
    assert_eq!(s.scheduled, 0, "{stats:?}");
    assert_eq!(registry_row(&db, &id).await?, None);
    assert!(kafka.dead_letters(1).await?.is_empty());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_start_that_passes_while_no_runner_runs_is_delivered_once_after() -> Result<()> {
    let kafka = MockKafka::new(1)?;
    let db = TestDb::new().await?.with_schema().await?;
    let clock = SetClock::at(T);
    let r = uuid();
    for c in ["e1", "e2"] {
        subscribe(&db, c, &r).await?;
    }
    let markers = Markers::new(&db).await?;
    // The mock cluster frees a closed member's partitions only when its session times out:
    // keep it short (as in restart.rs).
    let cfg = config(
        &kafka,
        &db,
        "[kafka.consumer_properties]\n\"session.timeout.ms\" = \"6000\"\n",
    );
    let mut want = BTreeSet::new();

    let first = start(cfg.clone(), clock.options()).await?;
    want.insert(markers.pass(&kafka, &db, T, FIRST).await?);
    // Starts while the runner is down; and one whose whole window passes while it is down.
    let (later, missed) = (uuid(), uuid());
    publish(
        &kafka,
        &campaign_with(&r, &later, "later", T + 100, T + 1000),
    )
    .await?;
    publish(
        &kafka,
        &campaign_with(&r, &missed, "missed", T + 50, T + 200),
    )
    .await?;
    wait_stats(&first, PROMPT, |s| s.skipped("scheduled") == 2).await?;
    wait_registry(&db, &later, PROMPT, |r| r.as_ref().is_some_and(|r| !r.0)).await?;
    wait_registry(&db, &missed, PROMPT, |r| r.as_ref().is_some_and(|r| !r.0)).await?;
    wait_stats(&first, PROMPT, |s| {
        s.schedule
            .as_ref()
            .is_some_and(|s| s.scheduled == 2 && s.next_start == Some(T + 51))
    })
    .await?;
    stop(first).await?;

    // While down: a subscriber comes, and time passes the start of one and the end of the other.
    subscribe(&db, "e3", &r).await?;
    clock.set(T + 500);
    let second = start(cfg, clock.options()).await?;
    wait_delivered(&kafka, &db, &later, &["e1", "e2", "e3"], FIRST).await?;
    want.extend(["e1", "e2", "e3"].map(|c| pair(&later, c)));
    wait_registry(&db, &missed, PROMPT, Option::is_none).await?;
    wait_registry(&db, &later, PROMPT, |r| r.as_ref().is_some_and(|r| r.0)).await?;
    wait_stats(&second, PROMPT, |s| {
        s.skipped("expired") == 1
            && s.schedule
                .as_ref()
                .is_some_and(|s| count(&s.deliveries, "scheduled_start") == 3 && s.scheduled == 0)
    })
    .await?;
    want.insert(markers.pass(&kafka, &db, T + 500, PROMPT).await?);
    let stats = stop(second).await?;
    assert_exactly(&kafka, &db, &want).await?;
    let s = stats.schedule.clone().unwrap_or_default();
    assert_eq!(count(&s.triggers, "scheduled_start"), 1, "{stats:?}");
    assert_eq!(count(&s.deliveries, "scheduled_start"), 3, "{stats:?}");
    assert_eq!(
        count(&s.deliveries, "new_subscriber"),
        0,
        "the start reached e3 (subscribed while down) already: {stats:?}"
    );
    // The partition taken over is audited, but not the campaign whose start is on its way.
    assert_eq!(count(&s.triggers, "new_subscriber"), 0, "{stats:?}");
    assert!(kafka.dead_letters(1).await?.is_empty());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_latest_publication_of_a_campaign_wins() -> Result<()> {
    let kafka = MockKafka::new(1)?;
    let db = TestDb::new().await?.with_schema().await?;
    let clock = SetClock::at(T);
    let (r, rw) = (uuid(), uuid());
    for c in ["f1", "f2"] {
        subscribe(&db, c, &r).await?;
    }
    subscribe(&db, "w1", &rw).await?;
    let markers = Markers::new(&db).await?;
    let running = start(config(&kafka, &db, ""), clock.options()).await?;
    let mut want = BTreeSet::new();
    want.insert(markers.pass(&kafka, &db, T, FIRST).await?);

    // (a) Published twice before its start: the second start and the second content win.
    let id = uuid();
    publish(&kafka, &campaign_with(&r, &id, "first", T + 100, T + 1000)).await?;
    publish(&kafka, &campaign_with(&r, &id, "second", T + 200, T + 1000)).await?;
    // A witness campaign starting between the two starts.
    let witness = uuid();
    publish(
        &kafka,
        &campaign_with(&rw, &witness, "witness", T + 120, T + 5000),
    )
    .await?;
    wait_stats(&running, PROMPT, |s| s.skipped("scheduled") == 3).await?;
    let row = registry_row(&db, &id).await?.context("kept")?;
    assert_eq!((row.0, row.1, row.2), (false, T + 201, T + 1000));
    assert!(row.3.contains("second"), "{}", row.3);

    // Past the first start, before the second: the witness starts (so the scheduler has run
    // at this time), the campaign does not.
    clock.set(T + 150);
    wait_delivered(&kafka, &db, &witness, &["w1"], PROMPT).await?;
    want.insert(pair(&witness, "w1"));
    want.insert(markers.pass(&kafka, &db, T + 150, PROMPT).await?);
    assert_exactly(&kafka, &db, &want).await?;
    let stats = running.campaigns().stats();
    let s = stats.schedule.clone().unwrap_or_default();
    assert_eq!(
        count(&s.triggers, "scheduled_start"),
        1,
        "only the witness started: {stats:?}"
    );
    assert_eq!(stats.skipped("not_started"), 0, "{stats:?}");

    clock.set(T + 201);
    wait_delivered(&kafka, &db, &id, &["f1", "f2"], PROMPT).await?;
    want.extend(["f1", "f2"].map(|c| pair(&id, c)));
    for m in all_drafts(&kafka).await? {
        let v = json(&m);
        if v["adv_campaign_id"] == id.as_str() {
            assert_eq!(v["adv_campaign_content"], "second", "{v}");
            assert_eq!(v["adv_campaign_datetime_start"], T + 200, "{v}");
            assert_eq!(v["trigger_datetime_created"], T + 201, "{v}");
        }
    }
    let contents: BTreeSet<String> = db
        .client()
        .await?
        .query(
            "SELECT adv_campaign_content FROM public.subscribers_feedback WHERE adv_campaign_id = $1",
            &[&id],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(contents, BTreeSet::from(["second".to_string()]));

    // (b) Published again after its delivery, with new content, while a subscriber comes: only
    // those who have not had it get it, once.
    subscribe(&db, "f3", &r).await?;
    publish(&kafka, &campaign_with(&r, &id, "third", T + 200, T + 1000)).await?;
    wait_delivered(&kafka, &db, &id, &["f1", "f2", "f3"], PROMPT).await?;
    want.insert(pair(&id, "f3"));
    let row = wait_registry(&db, &id, PROMPT, |r| {
        r.as_ref().is_some_and(|r| r.3.contains("third"))
    })
    .await?
    .context("kept")?;
    assert!(row.0, "still started");
    want.insert(markers.pass(&kafka, &db, T + 201, PROMPT).await?);
    assert_exactly(&kafka, &db, &want).await?;
    let f12: BTreeSet<String> = db
        .client()
        .await?
        .query(
            "SELECT adv_campaign_content FROM public.subscribers_feedback \
             WHERE adv_campaign_id = $1 AND client_id IN ('f1', 'f2')",
            &[&id],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(
        f12,
        BTreeSet::from(["second".to_string()]),
        "nothing new for them"
    );

    // (c) Published again before its start with an end already past: forgotten.
    let gone = uuid();
    publish(
        &kafka,
        &campaign_with(&r, &gone, "gone", T + 1000, T + 2000),
    )
    .await?;
    wait_registry(&db, &gone, PROMPT, |r| r.as_ref().is_some_and(|r| !r.0)).await?;
    publish(&kafka, &campaign_with(&r, &gone, "gone", T - 100, T)).await?;
    wait_registry(&db, &gone, PROMPT, Option::is_none).await?;
    // Past its first start: the witness restaurant's next campaign starts, it does not.
    let witness2 = uuid();
    publish(
        &kafka,
        &campaign_with(&rw, &witness2, "witness", T + 1000, T + 5000),
    )
    .await?;
    wait_registry(&db, &witness2, PROMPT, |r| r.is_some()).await?;
    clock.set(T + 1001);
    wait_delivered(&kafka, &db, &witness2, &["w1"], PROMPT).await?;
    want.insert(pair(&witness2, "w1"));
    want.insert(markers.pass(&kafka, &db, T + 1001, PROMPT).await?);
    let stats = stop(running).await?;
    assert_exactly(&kafka, &db, &want).await?;
    let s = stats.schedule.clone().unwrap_or_default();
    assert_eq!(
        count(&s.triggers, "scheduled_start"),
        3,
        "the witnesses and the campaign: {stats:?}"
    );
    assert_eq!(
        stats.skipped("expired"),
        1,
        "the forgetting publication: {stats:?}"
    );
    assert!(kafka.dead_letters(1).await?.is_empty());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trigger_with_unreadable_clients_is_dead_lettered_and_the_partition_goes_on() -> Result<()>
{
    let kafka = MockKafka::new(1)?;
    let db = TestDb::new().await?.with_schema().await?;
    let clock = SetClock::at(T);
    let r = uuid();
    subscribe(&db, "g1", &r).await?;
    let markers = Markers::new(&db).await?;
    let running = start(config(&kafka, &db, ""), clock.options()).await?;
    let mut want = BTreeSet::new();
    want.insert(markers.pass(&kafka, &db, T, FIRST).await?);

    let id = uuid();
    let value = campaign_with(&r, &id, "named", T - 10, T + 1000);
    let cases = [r#"{"clients":["g1"]}"#, "g1,g2"];
    for clients in cases {
        publish_with_headers(
            &kafka,
            &value,
            &[(TRIGGER, "new_subscriber"), (TRIGGER_CLIENTS, clients)],
        )
        .await?;
    }
    want.insert(markers.pass(&kafka, &db, T, PROMPT).await?);
    let stats = stop(running).await?;
    assert_exactly(&kafka, &db, &want).await?;
    assert_eq!(stats.dead_lettered("invalid_trigger"), 2, "{stats:?}");
    let dead = kafka.dead_letters(3).await?;
    assert_eq!(dead.len(), 2);
    for m in &dead {
        assert_eq!(header(m, header::DLQ_REASON), Some("invalid_trigger"));
        assert_eq!(m.payload(), Some(value.as_bytes()), "the raw value");
        let detail = header(m, header::DLQ_DETAIL).unwrap_or_default();
        assert!(detail.contains(TRIGGER_CLIENTS), "{detail}");
    }
    assert_eq!(
        registry_row(&db, &id).await?,
        None,
        "a trigger is no publication"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_and_metrics_show_the_schedule() -> Result<()> {
    let kafka = MockKafka::new(1)?;
    let db = TestDb::new().await?.with_schema().await?;
    let clock = SetClock::at(T);
    let r = uuid();
    for c in ["h1", "h2"] {
        subscribe(&db, c, &r).await?;
    }
    let markers = Markers::new(&db).await?;
    let running = start(
        config(&kafka, &db, "[status]\nlisten = \"127.0.0.1:0\"\n"),
        clock.options(),
    )
    .await?;
    let addr = running.status_addr.expect("the status endpoint");
    markers.pass(&kafka, &db, T, FIRST).await?;
    let (soon, later) = (uuid(), uuid());
    publish(&kafka, &campaign_with(&r, &soon, "soon", T + 100, T + 1000)).await?;
    publish(
        &kafka,
        &campaign_with(&r, &later, "later", T + 300, T + 1000),
    )
    .await?;
    wait_stats(&running, PROMPT, |s| {
        s.schedule
            .as_ref()
            .is_some_and(|s| s.scheduled == 2 && s.next_start == Some(T + 101))
    })
    .await?;

    let (code, body) = http_get(addr, "/status").await?;
    assert_eq!(code, 200, "{body}");
    let status: serde_json::Value = serde_json::from_str(&body)?;
    let schedule = &status["pipelines"]["campaigns"]["stats"]["schedule"];
    assert_eq!(schedule["scheduled"], 2, "{schedule}");
    assert_eq!(schedule["next_start"], T + 101, "{schedule}");
    let (_, metrics) = http_get(addr, "/metrics").await?;
    let p = ("pipeline", "campaigns");
    assert_eq!(
        metric(&metrics, "runner_campaigns_scheduled", &[p]),
        Some(2.0),
        "{metrics}"
    );
    assert_eq!(
        metric(&metrics, "runner_campaign_next_start_seconds", &[p]),
        Some((T + 101) as f64),
        "{metrics}"
    );
    for cause in ["published", "scheduled_start", "new_subscriber"] {
        let want = if cause == "published" { 1.0 } else { 0.0 };
        assert_eq!(
            metric(
                &metrics,
                "runner_campaign_deliveries_total",
                &[p, ("cause", cause)]
            ),
            Some(want),
            "{cause}: {metrics}"
        );
    }

    // The first start passes; a subscriber comes.
    clock.set(T + 101);
    wait_delivered(&kafka, &db, &soon, &["h1", "h2"], PROMPT).await?;
    subscribe(&db, "h3", &r).await?;
    wait_delivered(&kafka, &db, &soon, &["h1", "h2", "h3"], PROMPT).await?;
    wait_stats(&running, PROMPT, |s| {
        s.schedule.as_ref().is_some_and(|s| {
            s.scheduled == 1
                && s.next_start == Some(T + 301)
                && count(&s.deliveries, "new_subscriber") == 1
        })
    })
    .await?;
    let (_, body) = http_get(addr, "/status").await?;
    let status: serde_json::Value = serde_json::from_str(&body)?;
    let schedule = &status["pipelines"]["campaigns"]["stats"]["schedule"];
    assert_eq!(schedule["scheduled"], 1, "{schedule}");
    assert_eq!(schedule["next_start"], T + 301, "{schedule}");
    assert_eq!(schedule["deliveries"]["published"], 1, "{schedule}");
    assert_eq!(schedule["deliveries"]["scheduled_start"], 2, "{schedule}");
    assert_eq!(schedule["deliveries"]["new_subscriber"], 1, "{schedule}");
    assert_eq!(schedule["triggers"]["scheduled_start"], 1, "{schedule}");
    assert_eq!(schedule["triggers"]["new_subscriber"], 1, "{schedule}");
    let (_, metrics) = http_get(addr, "/metrics").await?;
    assert_eq!(
        metric(&metrics, "runner_campaigns_scheduled", &[p]),
        Some(1.0),
        "{metrics}"
    );
    assert_eq!(
        metric(&metrics, "runner_campaign_next_start_seconds", &[p]),
        Some((T + 301) as f64),
        "{metrics}"
    );
    for (cause, want) in [
        ("published", 1.0),
        ("scheduled_start", 2.0),
        ("new_subscriber", 1.0),
    ] {
        assert_eq!(
            metric(
                &metrics,
                "runner_campaign_deliveries_total",
                &[p, ("cause", cause)]
            ),
            Some(want),
            "{cause}: {metrics}"
        );
    }
    for (cause, want) in [("scheduled_start", 1.0), ("new_subscriber", 1.0)] {
        assert_eq!(
            metric(
                &metrics,
                "runner_campaign_triggers_total",
                &[p, ("cause", cause)]
            ),
            Some(want),
            "{cause}: {metrics}"
        );
    }
    assert_eq!(
        metric(
            &metrics,
            "runner_skipped_total",
            &[p, ("reason", "scheduled")]
        ),
        Some(2.0),
        "{metrics}"
    );

    // None left: the next start is 0.
    clock.set(T + 301);
    wait_delivered(&kafka, &db, &later, &["h1", "h2", "h3"], PROMPT).await?;
    wait_stats(&running, PROMPT, |s| {
        s.schedule
            .as_ref()
            .is_some_and(|s| s.scheduled == 0 && s.next_start.is_none())
    })
    .await?;
    let (_, body) = http_get(addr, "/status").await?;
    let status: serde_json::Value = serde_json::from_str(&body)?;
    let schedule = &status["pipelines"]["campaigns"]["stats"]["schedule"];
    assert_eq!(schedule["scheduled"], 0, "{schedule}");
    assert!(schedule["next_start"].is_null(), "{schedule}");
    let (_, metrics) = http_get(addr, "/metrics").await?;
    assert_eq!(
        metric(&metrics, "runner_campaigns_scheduled", &[p]),
        Some(0.0),
        "{metrics}"
    );
    assert_eq!(
        metric(&metrics, "runner_campaign_next_start_seconds", &[p]),
        Some(0.0),
        "{metrics}"
    );
    stop(running).await?;
    Ok(())
}
