//! Scheduled campaign starts against a real Apache Kafka broker (Apache Kafka 4.x, KRaft,
//! on-disk storage), real runner processes and the real clock: campaigns published a few
//! seconds before their start reach every subscriber at their start, once, while the runner is
//! killed with SIGKILL around the starts; when the start passes while no runner is up; and when
//! two runners share the partitions and one leaves or joins while starts pass (the registry's
//! rows move with their partitions).
//!
//! Delivery is judged the way its readers see it: every (campaign, client) pair expected from
//! `subscribers_restaurants`, counted in `subscribers_feedback` by SQL and in the whole output
//! topic by a read_committed consumer: lost, duplicated, unexpected (a draft for a pair that
//! should have none) and early (a draft made before the campaign's start). Each test runs alone
//! (the brokers are JVMs and the machine has two cores).

use super::brokers::*;
use anyhow::Result;
use e2e_tests::*;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::ClientConfig;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

/// Now, in unix seconds (the runner's clock).
fn now_s() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("after 1970")
        .as_secs() as i64
}

/// A campaign of a test: published on `partition` (by its key when None), active while
/// start < now < end.
#[derive(Debug, Clone)]
struct Planned {
    id: String,
    restaurant: String,
    start: i64,
    end: i64,
    partition: Option<i32>,
}

impl Planned {
    fn new(i: usize, restaurant: &str, start: i64, end: i64, partition: Option<i32>) -> Planned {
        Planned {
            id: format!("00000000-0000-4000-9000-{i:012}"),
            restaurant: restaurant.to_string(),
            start,
            end,
            partition,
        }
    }

    /// The first second at which the rules say active.
    fn opens(&self) -> i64 {
        self.start + 1
    }
}

/// What one sink holds against what it should: pairs missing, extra copies of expected pairs,
/// drafts of pairs that should have none, drafts made at or before their campaign's start.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Tally {
    lost: i64,
    duplicated: i64,
    unexpected: i64,
    early: i64,
}

const CLEAN: [Tally; 2] = [
    Tally {
        lost: 0,
        duplicated: 0,
        unexpected: 0,
        early: 0,
    },
    Tally {
        lost: 0,
        duplicated: 0,
        unexpected: 0,
        early: 0,
    },
];

/// (campaign, client) → (copies, the earliest trigger_datetime_created minus the start).
type Seen = BTreeMap<(String, String), (i64, i64)>;

fn tally(expected: &std::collections::BTreeSet<(String, String)>, seen: &Seen) -> Tally {
    let mut t = Tally {
        lost: expected.iter().filter(|p| !seen.contains_key(*p)).count() as i64,
        ..Tally::default()
    };
    for (pair, (copies, after_start)) in seen {
        if expected.contains(pair) {
            t.duplicated += copies - 1;
        } else {
            t.unexpected += copies;
        }
        if *after_start <= 0 {
            t.early += 1;
        }
    }
    t
}

/// One test's world: a broker, topics, a database with subscribers, a runner config file.
struct World {
    kafka: Kafka,
    input: String,
    output: String,
    db: TestDb,
    config: PathBuf,
    _dir: tempfile::TempDir,
    restaurants: Vec<String>,
    status: std::net::SocketAddr,
}

impl World {
    async fn new(
        kafka: Kafka,
        partitions: i32,
        restaurants: usize,
        per_restaurant: usize,
    ) -> Result<World> {
        let (input, output, dlq) = (unique("campaigns"), unique("drafts"), unique("dlq"));
        kafka
            .create_topics(&[(&input, partitions), (&output, partitions), (&dlq, 1)])
            .await?;
        let db = TestDb::new().await?.with_schema().await?;
        let restaurants = seed_restaurants(&db, 8000, restaurants, per_restaurant).await?;
        let dir = tempfile::tempdir()?;
        let config = dir.path().join("runner.toml");
        let status: std::net::SocketAddr =
            std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
        // A killed runner's partitions go to the next once its session expires: 6 s, the
        // broker's minimum (librdkafka's default is 45 s).
        std::fs::write(
            &config,
            format!(
                "[kafka]\nbrokers = \"{}\"\n[kafka.consumer_properties]\n\"session.timeout.ms\" = \"6000\"\n\"heartbeat.interval.ms\" = \"1000\"\n\
                 [postgres]\nurl = \"{}\"\n[status]\nlisten = \"{status}\"\n\
                 [pipelines.campaigns]\ninput_topic = \"{input}\"\noutput_topic = \"{output}\"\ndead_letter_topic = \"{dlq}\"\n\
                 group_id = \"{}\"\nshutdown_timeout = \"20s\"\n\
                 [pipelines.campaigns.rules]\npath = \"{}\"\ncompile_cache_dir = \"{}\"\n",
                kafka.brokers,
                db.url,
                unique("group"),
                rules_wasm().display(),
                dir.path().join("compiled").display()
            ),
        )?;
        Ok(World {
            kafka,
            input,
            output,
            db,
            config,
            _dir: dir,
            restaurants,
            status,
        })
    }

    fn spawn_runner(&self) -> ChildGuard {
        self.spawn_runner_with(&[])
    }

    /// Another runner on the same config: its status endpoint off (the port is the first's).
    fn spawn_second_runner(&self) -> ChildGuard {
        self.spawn_runner_with(&[("RUNNER__STATUS__LISTEN", "")])
    }

    fn spawn_runner_with(&self, env: &[(&str, &str)]) -> ChildGuard {
        super::brokers::spawn_runner(&self.config, env)
    }

    /// Waits until the runner answering on the status port holds what the group gave it.
    async fn wait_ready(&self, timeout: Duration) -> bool {
        wait_for_async(timeout, || async {
            http_get(self.status, "/health/ready")
                .await
                .is_ok_and(|(code, _)| code == 200)
        })
        .await
    }

    /// Publishes the campaigns, keyed by their id, each acknowledged.
    async fn publish(&self, campaigns: &[Planned]) -> Result<()> {
        let producer: FutureProducer = ClientConfig::new()
            .set("bootstrap.servers", &self.kafka.brokers)
            .set("enable.idempotence", "true")
            .create()?;
        for c in campaigns {
            let value = campaign(&c.restaurant, &c.id, c.start, c.end);
            let mut record = FutureRecord::to(&self.input).key(&c.id).payload(&value);
            if let Some(p) = c.partition {
                record = record.partition(p);
            }
            producer
                .send(record, Duration::from_secs(30))
                .await
                .map_err(|(e, _)| e)?;
        }
        Ok(())
    }

    async fn count(&self, sql: &str) -> i64 {
        self.db.count(sql).await.unwrap_or(-1)
    }

    /// Registry rows: (waiting for their start, started).
    async fn registry(&self) -> (i64, i64) {
        (
            self.count("SELECT count(*) FROM campaign_runner_registry WHERE NOT started")
                .await,
            self.count("SELECT count(*) FROM campaign_runner_registry WHERE started")
                .await,
        )
    }

    /// Waits until `n` campaigns wait in the registry for their start, until unix second
    /// `until` at the latest.
    async fn wait_registered(&self, n: i64, until: i64) -> bool {
        let left = Duration::from_secs((until - now_s()).max(0) as u64);
        wait_for_async(left, || async { self.registry().await.0 == n }).await
    }

    /// Waits until `subscribers_feedback` holds `rows` rows and the outbox is empty.
    async fn wait_delivered(&self, rows: i64, timeout: Duration) -> bool {
        wait_for_async(timeout, || async {
            self.count("SELECT count(*) FROM subscribers_feedback")
                .await
                >= rows
                && self
                    .count("SELECT count(*) FROM campaign_runner_outbox")
                    .await
                    == 0
        })
        .await
    }

    async fn rows(&self) -> i64 {
        self.count("SELECT count(*) FROM subscribers_feedback")
            .await
    }

    /// The runners owning the input topic's partitions (their fence claims).
    async fn owners(&self) -> i64 {
        self.count(&format!(
            "SELECT count(DISTINCT owner) FROM campaign_runner_fences WHERE topic = '{}'",
            self.input
        ))
        .await
    }

    /// Every (campaign, client) pair the campaigns should reach: all current subscribers of the
    /// campaign's restaurant.
    async fn expected(
        &self,
        campaigns: &[Planned],
    ) -> Result<std::collections::BTreeSet<(String, String)>> {
        let c = self.db.client().await?;
        let mut pairs = std::collections::BTreeSet::new();
        for p in campaigns {
            for row in c
                .query(
                    "SELECT client_id FROM subscribers_restaurants WHERE restaurant_id = $1",
                    &[&p.restaurant],
                )
                .await?
            {
                pairs.insert((p.id.clone(), row.get::<_, String>(0)));
            }
        }
        Ok(pairs)
    }

    /// Judges both sinks against the pairs `delivered` should reach (and nothing else):
    /// [PostgreSQL, Kafka read_committed].
    async fn judge(&self, delivered: &[Planned]) -> Result<[Tally; 2]> {
        let expected = self.expected(delivered).await?;
        let mut pg = Seen::new();
        for row in self
            .db
            .client()
            .await?
            .query(
                "SELECT adv_campaign_id, client_id, \
                 trigger_datetime_created::int8 - adv_campaign_datetime_start FROM subscribers_feedback",
                &[],
            )
            .await?
        {
            let e = pg.entry((row.get(0), row.get(1))).or_insert((0, i64::MAX));
            e.0 += 1;
            e.1 = e.1.min(row.get(2));
        }
        let records = read_topic(
            &self.kafka.brokers,
            &self.output,
            expected.len(),
            Duration::from_secs(60),
        )
        .await?;
        let mut kafka = Seen::new();
        for m in &records {
            let v = json(m);
            let pair = (
                v["adv_campaign_id"].as_str().unwrap_or("").to_string(),
                v["client_id"].as_str().unwrap_or("").to_string(),
            );
            let after = v["trigger_datetime_created"].as_i64().unwrap_or(0)
                - v["adv_campaign_datetime_start"]
                    .as_i64()
                    .unwrap_or(i64::MAX);
            let e = kafka.entry(pair).or_insert((0, i64::MAX));
            e.0 += 1;
            e.1 = e.1.min(after);
        }
        let verdict = [tally(&expected, &pg), tally(&expected, &kafka)];
        println!(
            "{} campaigns, {} (campaign, client) pairs expected; PostgreSQL {} rows: {:?}; \
             Kafka read_committed {} records: {:?}",
            delivered.len(),
            expected.len(),
            pg.values().map(|(n, _)| n).sum::<i64>(),
            verdict[0],
            records.len(),
            verdict[1]
        );
        Ok(verdict)
    }

    /// The campaigns among `campaigns` with no `scheduled_start` trigger record in the input
    /// topic: those that were not delivered through their start's trigger.
    async fn without_trigger(&self, campaigns: &[Planned]) -> Result<Vec<String>> {
        let records = read_topic(
            &self.kafka.brokers,
            &self.input,
            campaigns.len() * 2,
            Duration::from_secs(60),
        )
        .await?;
        let triggered: std::collections::BTreeSet<String> = records
            .iter()
            .filter(|m| header(m, "campaign-trigger") == Some("scheduled_start"))
            .filter_map(|m| json(m)["adv_campaign_id"].as_str().map(str::to_string))
            .collect();
        Ok(campaigns
            .iter()
            .filter(|c| !triggered.contains(&c.id))
            .map(|c| c.id.clone())
            .collect())
    }
}

const JUDGED: &str = "[PostgreSQL, Kafka]: lost, duplicated, unexpected, early";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_dash_nine_around_scheduled_starts_delivers_each_draft_once() -> Result<()> {
    let _one = SERIAL.lock().await;
    let (restaurants, per) = (20, 40);
    let world = World::new(Kafka::single()?, 4, restaurants, per).await?;
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_nanos() as u64;
    let mut rng = Lcg(seed);
    let mut runner = world.spawn_runner();
    assert!(
        world.wait_ready(Duration::from_secs(60)).await,
        "the runner is ready"
    );
    // 40 campaigns, two per restaurant, starting 5 to 25 s from now, over in an hour.
    let t0 = now_s();
    let campaigns: Vec<Planned> = (0..40)
        .map(|i| {
            let start = t0 + 5 + (i as i64 * 20) / 40;
            Planned::new(
                i,
                &world.restaurants[i % restaurants],
                start,
                t0 + 3600,
                None,
            )
        })
        .collect();
    world.publish(&campaigns).await?;
    assert!(
        world.wait_registered(40, t0 + 5).await,
        "the 40 campaigns wait in the registry before the first start: {:?}",
        world.registry().await
    );
    assert_eq!(
        world.rows().await,
        0,
        "nothing is delivered before its start"
    );
    // While the starts pass, the runner is killed with SIGKILL and started again: every other
    // one 1.5 to 3 s after its start (it may never hold its partitions: the killed one's
    // session has to expire first), the others once they hold them, as soon as they mark a
    // start triggered (its trigger record is on its way through the pipeline) or 0.2 to 2.5 s
    // after, whichever comes first.
    let last_opens = campaigns.iter().map(Planned::opens).max().unwrap();
    println!("seed {seed}; starts from {} to {last_opens}", t0 + 6);
    let mut kills = 0;
    while now_s() <= last_opens + 1 {
        if kills % 2 == 0 {
            tokio::time::sleep(Duration::from_millis(rng.next_ms(1500, 3000))).await;
        } else {
            let ready = world.wait_ready(Duration::from_secs(15)).await;
            let started = world.registry().await.1;
            let within = Duration::from_millis(rng.next_ms(200, 2500));
            let triggered =
                wait_for_async(within, || async { world.registry().await.1 > started }).await;
            println!("runner {kills}: ready {ready}, a start triggered {triggered}");
        }
        runner.kill()?; // SIGKILL
        runner.wait()?;
        kills += 1;
        let (rows, (waiting, started)) = (world.rows().await, world.registry().await);
        println!(
            "kill -9 #{kills} at first start + {} s: {rows} rows, {waiting} starts waiting, \
             {started} triggered, {} drafts of triggered starts not delivered",
            now_s() - t0 - 5,
            started * per as i64 - rows
        );
        runner = world.spawn_runner();
    }
    let ready = world.wait_ready(Duration::from_secs(60)).await;
    let expected_rows = (campaigns.len() * per) as i64;
    let done = world
        .wait_delivered(expected_rows, Duration::from_secs(90))
        .await;
    let status = terminate(&mut runner)?;
    assert!(kills >= 4, "killed {kills} times while the starts passed");
    assert!(ready, "the last runner became ready");
    assert!(
        done,
        "every start delivered: {} of {expected_rows} rows, registry {:?}",
        world.rows().await,
        world.registry().await
    );
    assert_eq!(status.code(), Some(0), "the last runner exits 0 on SIGTERM");
    assert_eq!(world.judge(&campaigns).await?, CLEAN, "{JUDGED}");
    assert_eq!(
        world.without_trigger(&campaigns).await?,
        Vec::<String>::new(),
        "every campaign was delivered through its start's trigger"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_start_that_passes_while_no_runner_is_up_is_delivered_at_start_up() -> Result<()> {
    let _one = SERIAL.lock().await;
    let world = World::new(Kafka::single()?, 2, 2, 30).await?;
    let mut runner = world.spawn_runner();
    assert!(
        world.wait_ready(Duration::from_secs(60)).await,
        "the runner is ready"
    );
    // One campaign starts in 4 s and runs an hour; another one's whole window (4 to 7 s from
    // now) passes while no runner is up: it reaches nobody.
    let t0 = now_s();
    let starts = Planned::new(1, &world.restaurants[0], t0 + 4, t0 + 3600, None);
    let missed = Planned::new(2, &world.restaurants[1], t0 + 4, t0 + 7, None);
    world.publish(&[starts.clone(), missed.clone()]).await?;
    assert!(
        world.wait_registered(2, starts.start).await,
        "both campaigns wait in the registry before their start: {:?}",
        world.registry().await
    );
    runner.kill()?; // SIGKILL
    runner.wait()?;
    assert!(
        now_s() < starts.opens(),
        "the runner was killed before the start"
    );
    // The clock passes the first campaign's start and the second one's end.
    while now_s() <= missed.end {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(
        world.registry().await,
        (2, 0),
        "both starts passed with nobody to trigger them"
    );
    let restarted = now_s();
    let mut runner = world.spawn_runner();
    let ready = world.wait_ready(Duration::from_secs(60)).await;
    let done = world.wait_delivered(30, Duration::from_secs(60)).await;
    // The campaign that is over leaves the registry (counted as skipped expired).
    let forgotten = world
        .db
        .wait_count(
            &format!(
                "SELECT count(*) FROM campaign_runner_registry WHERE adv_campaign_id = '{}'",
                missed.id
            ),
            0,
            Duration::from_secs(30),
        )
        .await;
    let registry = world.registry().await;
    let before_restart = world
        .count(&format!(
            "SELECT count(*) FROM subscribers_feedback WHERE trigger_datetime_created < {restarted}"
        ))
        .await;
    let status = terminate(&mut runner)?;
    assert!(ready, "the new runner became ready");
    assert!(done, "the start was delivered: {} rows", world.rows().await);
    assert!(forgotten, "the campaign that is over left the registry");
    assert_eq!(registry, (0, 1), "the started campaign stays, started");
    assert_eq!(before_restart, 0, "the drafts were made at start-up");
    assert_eq!(status.code(), Some(0), "the runner exits 0 on SIGTERM");
    assert_eq!(
        world.judge(std::slice::from_ref(&starts)).await?,
        CLEAN,
        "{JUDGED}"
    );
    assert_eq!(
        world.without_trigger(&[starts]).await?,
        Vec::<String>::new()
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_runners_deliver_scheduled_starts_once() -> Result<()> {
    let _one = SERIAL.lock().await;
    let (restaurants, per) = (8, 40);
    let world = World::new(Kafka::single()?, 4, restaurants, per).await?;
    let mut a = world.spawn_runner();
    assert!(
        world.wait_ready(Duration::from_secs(60)).await,
        "a is ready"
    );
    let mut b = world.spawn_second_runner();
    assert!(
        wait_for_async(Duration::from_secs(60), || async {
            world.owners().await == 2
        })
        .await,
        "a and b share the 4 partitions"
    );
    // 32 campaigns, 8 on each partition, starting 5 to 17 s from now.
    let t0 = now_s();
    let campaigns: Vec<Planned> = (0..32)
        .map(|i| {
            let start = t0 + 5 + (i as i64 * 12) / 32;
            let restaurant = &world.restaurants[i % restaurants];
            Planned::new(i, restaurant, start, t0 + 3600, Some((i % 4) as i32))
        })
        .collect();
    world.publish(&campaigns).await?;
    assert!(
        world.wait_registered(32, t0 + 5).await,
        "the 32 campaigns wait in the registry before the first start: {:?}",
        world.registry().await
    );
    // b leaves (SIGTERM) once some starts were triggered: its partitions, and their registry
    // rows, go to a while the next starts pass.
    let some = wait_for_async(Duration::from_secs(30), || async {
        world.registry().await.1 >= 6
    })
    .await;
    println!(
        "b leaves at start + {} s: {} rows, registry {:?}",
        now_s() - t0 - 5,
        world.rows().await,
        world.registry().await
    );
    let status_b = terminate(&mut b)?;
    let taken_over = wait_for_async(Duration::from_secs(30), || async {
        world.owners().await == 1
    })
    .await;
    // c joins while starts still pass: the partitions are shared again.
    let more = wait_for_async(Duration::from_secs(30), || async {
        world.registry().await.1 >= 16
    })
    .await;
    println!(
        "c joins at start + {} s: {} rows, registry {:?}",
        now_s() - t0 - 5,
        world.rows().await,
        world.registry().await
    );
    let mut c = world.spawn_second_runner();
    let shared = wait_for_async(Duration::from_secs(60), || async {
        world.owners().await == 2
    })
    .await;
    let expected_rows = (campaigns.len() * per) as i64;
    let done = world
        .wait_delivered(expected_rows, Duration::from_secs(60))
        .await;
    println!(
        "done at start + {} s: {} rows, registry {:?}",
        now_s() - t0 - 5,
        world.rows().await,
        world.registry().await
    );
    let status_c = terminate(&mut c)?;
    let status_a = terminate(&mut a)?;
    assert!(
        some && more,
        "starts were triggered while b left and c joined"
    );
    assert!(taken_over, "a took b's partitions over");
    assert!(shared, "a and c share the partitions");
    assert!(
        done,
        "every start delivered: {} of {expected_rows} rows, registry {:?}",
        world.rows().await,
        world.registry().await
    );
    assert_eq!(
        (status_a.code(), status_b.code(), status_c.code()),
        (Some(0), Some(0), Some(0)),
        "every runner exits 0 on SIGTERM"
    );
    assert_eq!(world.judge(&campaigns).await?, CLEAN, "{JUDGED}");
    assert_eq!(
        world.without_trigger(&campaigns).await?,
        Vec::<String>::new(),
        "every campaign was delivered through its start's trigger"
    );
    Ok(())
}
