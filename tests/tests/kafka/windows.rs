//! The store-revenue pipeline against real Apache Kafka with real runner processes: kill -9 at
//! random moments while sales keep arriving, and two runners sharing the group while one comes
//! and goes. Judged against a reference computed from the input topic itself: every window's
//! total in `store_revenue_windows` equals the reference, every late sale is dead-lettered once,
//! and every final window reaches the output topic once (read_committed), with its total.

use super::brokers::*;
use anyhow::Result;
use e2e_tests::*;
use rdkafka::message::Message;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::ClientConfig;
use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// Window size and allowed lateness of these tests, seconds.
const WINDOW: i64 = 10;
const LATENESS: i64 = 5;

struct SalesWorld {
    kafka: Kafka,
    input: String,
    output: String,
    dlq: String,
    db: TestDb,
    config: PathBuf,
    _dir: tempfile::TempDir,
    status: std::net::SocketAddr,
}

impl SalesWorld {
    async fn new(kafka: Kafka, partitions: i32) -> Result<SalesWorld> {
        let (input, output, dlq) = (unique("sales"), unique("revenue"), unique("sales_dlq"));
        kafka
            .create_topics(&[(&input, partitions), (&output, 2), (&dlq, 1)])
            .await?;
        let db = TestDb::new().await?;
        let dir = tempfile::tempdir()?;
        let config = dir.path().join("runner.toml");
        let status: std::net::SocketAddr =
            std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
        std::fs::write(
            &config,
            format!(
                "[kafka]\nbrokers = \"{}\"\n[kafka.consumer_properties]\n\"session.timeout.ms\" = \"6000\"\n\"heartbeat.interval.ms\" = \"1000\"\n\
                 [postgres]\nurl = \"{}\"\n[status]\nlisten = \"{status}\"\n\
                 [pipelines.campaigns]\nenabled = false\n\
                 [pipelines.store_revenue]\nenabled = true\ninput_topic = \"{input}\"\noutput_topic = \"{output}\"\n\
                 dead_letter_topic = \"{dlq}\"\ngroup_id = \"{}\"\nwindow = \"{WINDOW}s\"\nallowed_lateness = \"{LATENESS}s\"\n\
                 trigger = \"500ms\"\nidle_after = \"2s\"\nshutdown_timeout = \"20s\"\n\
                 [pipelines.store_revenue.rules]\npath = \"{}\"\ncompile_cache_dir = \"{}\"\n",
                kafka.brokers,
                db.url,
                unique("group"),
                sales_wasm().display(),
                dir.path().join("compiled").display()
            ),
        )?;
        Ok(SalesWorld {
            kafka,
            input,
            output,
            dlq,
            db,
            config,
            _dir: dir,
            status,
        })
    }

    fn spawn_runner_with(&self, env: &[(&str, &str)]) -> ChildGuard {
        super::brokers::spawn_runner(&self.config, env)
    }

    /// Produces `n` sales keyed by store in the background. Event time runs an hour ahead of
    /// the clock (so no partition's watermark ever follows processing time here and the
    /// reference is exact), 20 sales per second of event time, each up to 8 s early: some
    /// come after their partition's watermark passed their window (late).
    fn produce(&self, n: usize, pause: Duration) -> tokio::task::JoinHandle<Result<()>> {
        let producer: FutureProducer = ClientConfig::new()
            .set("bootstrap.servers", &self.kafka.brokers)
            .set("enable.idempotence", "true")
            .set("message.timeout.ms", "300000")
            .create()
            .expect("producer");
        let topic = self.input.clone();
        let base = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64
            + 3600;
        tokio::spawn(async move {
            let mut rng = Lcg(7);
            for i in 0..n {
                let store = format!("store-{}", i % 13);
                let cents = 1 + (i * 37) % 2000;
                let ts = base + (i / 20) as i64 - rng.next_ms(0, 9) as i64;
                let value = sale(&store, &format!("{}.{:02}", cents / 100, cents % 100), ts);
                producer
                    .send(
                        FutureRecord::to(&topic).key(&store).payload(&value),
                        Duration::from_secs(60),
                    )
                    .await
                    .map_err(|(e, _)| e)?;
                if i % 20 == 19 {
                    tokio::time::sleep(pause).await;
                }
            }
            Ok(())
        })
    }

    async fn wait_ready(&self, timeout: Duration) -> bool {
        wait_for_async(timeout, || async {
            http_get(self.status, "/health/ready")
                .await
                .map(|(c, _)| c)
                .unwrap_or(0)
                == 200
        })
        .await
    }

    /// Waits until every input message is committed and the outbox is empty.
    async fn wait_settled(&self, messages: i64, timeout: Duration) -> bool {
        wait_for_async(timeout, || async {
            self.db
                .count("SELECT coalesce(sum(next_offset), 0)::int8 FROM store_revenue_partitions")
                .await
                .unwrap_or(0)
                >= messages
                && self
                    .db
                    .count("SELECT count(*) FROM store_revenue_outbox")
                    .await
                    .unwrap_or(1)
                    == 0
        })
        .await
    }

    /// Compares both sinks with the reference computed from the input topic; returns the
    /// differences found (empty: none) and prints the figures.
    async fn check(&self, messages: usize) -> Result<Vec<String>> {
        let input = read_topic(
            &self.kafka.brokers,
            &self.input,
            messages,
            Duration::from_secs(60),
        )
        .await?;
        anyhow::ensure!(
            input.len() == messages,
            "read {} of {messages} sales",
            input.len()
        );
        let mut input: Vec<_> = input.iter().collect();
        input.sort_by_key(|m| (m.partition(), m.offset()));
        // The reference: the documented rules, partition by partition in offset order.
        let mut totals: BTreeMap<(String, i64), i64> = BTreeMap::new();
        let mut late: BTreeSet<(i32, i64)> = BTreeSet::new();
        let mut wm: BTreeMap<i32, i64> = BTreeMap::new();
        for m in &input {
            let v = json(m);
            let store = v["store"].as_str().unwrap_or_default().to_string();
            let price = v["price"].to_string();
            let (units, cents) = price.split_once('.').unwrap_or((&price, "0"));
            let minor: i64 = units.parse::<i64>()? * 100 + format!("{cents:0<2}").parse::<i64>()?;
            let ts = v["ts"].as_i64().unwrap_or_default();
            let start = ts.div_euclid(WINDOW) * WINDOW;
            let w = wm.get(&m.partition()).copied();
            if w.is_some_and(|w| start + WINDOW <= w) {
                late.insert((m.partition(), m.offset()));
                continue;
            }
            *totals.entry((store, start)).or_default() += minor;
            let next = ts - LATENESS;
            wm.insert(m.partition(), w.map_or(next, |w| w.max(next)));
        }
        let rows = self
            .db
            .client()
            .await?
            .query(
                "SELECT store, extract(epoch FROM window_start)::int8, total_minor, final \
                 FROM store_revenue_windows",
                &[],
            )
            .await?;
        let mut problems = Vec::new();
        let stored: BTreeMap<(String, i64), (i64, bool)> = rows
            .iter()
            .map(|r| ((r.get(0), r.get(1)), (r.get(2), r.get(3))))
            .collect();
        let stored_totals: BTreeMap<(String, i64), i64> =
            stored.iter().map(|(k, (t, _))| (k.clone(), *t)).collect();
        if stored_totals != totals {
            let differ = totals
                .iter()
                .filter(|(k, t)| stored_totals.get(*k) != Some(*t))
                .count();
            problems.push(format!(
                "{differ} of {} windows differ from the reference in PostgreSQL",
                totals.len()
            ));
        }
        let dead = read_topic(
            &self.kafka.brokers,
            &self.dlq,
            late.len(),
            Duration::from_secs(60),
        )
        .await?;
        let mut dead_late = BTreeSet::new();
        for m in &dead {
            anyhow::ensure!(
                header(m, "dlq-reason") == Some("late"),
                "only late dead letters"
            );
            let key = (
                header(m, "source-partition")
                    .unwrap_or("-1")
                    .parse::<i32>()?,
                header(m, "source-offset").unwrap_or("-1").parse::<i64>()?,
            );
            if !dead_late.insert(key) {
                problems.push(format!("late sale {key:?} dead-lettered twice"));
            }
        }
        if dead_late != late {
            problems.push(format!(
                "late sales: {} dead-lettered, {} in the reference",
                dead_late.len(),
                late.len()
            ));
        }
        let finals: BTreeMap<(String, i64), i64> = stored
            .iter()
            .filter(|(_, (_, f))| *f)
            .map(|(k, (t, _))| (k.clone(), *t))
            .collect();
        let published = read_topic(
            &self.kafka.brokers,
            &self.output,
            finals.len(),
            Duration::from_secs(60),
        )
        .await?;
        let mut out: BTreeMap<(String, i64), i64> = BTreeMap::new();
        for m in &published {
            let v = json(m);
            let start = humantime::parse_rfc3339(v["window_start"].as_str().unwrap_or(""))?
                .duration_since(std::time::UNIX_EPOCH)?
                .as_secs() as i64;
            let key = (v["store"].as_str().unwrap_or("").to_string(), start);
            if out
                .insert(key.clone(), v["total_minor"].as_i64().unwrap_or(-1))
                .is_some()
            {
                problems.push(format!("final window {key:?} published twice"));
            }
        }
        if out != finals {
            problems.push(format!(
                "{} final windows in PostgreSQL, {} published, {} differing",
                finals.len(),
                out.len(),
                finals
                    .iter()
                    .filter(|(k, t)| out.get(*k) != Some(*t))
                    .count()
            ));
        }
        println!(
            "{messages} sales: {} windows ({} final, {} records published), {} late sales \
             dead-lettered; problems: {problems:?}",
            totals.len(),
            finals.len(),
            published.len(),
            dead_late.len()
        );
        Ok(problems)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn windows_kill_dash_nine_loop_counts_exactly_once() -> Result<()> {
    let _one = SERIAL.lock().await;
    let loops: usize = std::env::var("CRASH_LOOPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    let world = SalesWorld::new(Kafka::single()?, 4).await?;
    let sales = 4_000 + 200 * loops;
    let producing = world.produce(sales, Duration::from_millis(100));
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_nanos() as u64;
    let mut rng = Lcg(seed);
    println!("windows crash loop: {loops} kills, seed {seed}");
    for _ in 0..loops {
        let mut child = world.spawn_runner_with(&[]);
        tokio::time::sleep(Duration::from_millis(rng.next_ms(400, 3000))).await;
        child.kill()?; // SIGKILL
        child.wait()?;
    }
    producing.await??;
    let mut last = world.spawn_runner_with(&[]);
    let ready = world.wait_ready(Duration::from_secs(60)).await;
    let settled = world
        .wait_settled(sales as i64, Duration::from_secs(180))
        .await;
    let status = terminate(&mut last)?;
    assert!(ready, "the last runner became ready");
    assert!(settled, "the last runner counted everything");
    assert_eq!(status.code(), Some(0), "SIGTERM is a clean exit");
    assert_eq!(world.check(sales).await?, Vec::<String>::new());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn windows_two_runners_with_a_rebalance_mid_stream() -> Result<()> {
    let _one = SERIAL.lock().await;
    let world = SalesWorld::new(Kafka::single()?, 4).await?;
    let sales = 6_000;
    let producing = world.produce(sales, Duration::from_millis(50));
    let mut a = world.spawn_runner_with(&[]);
    assert!(
        world.wait_ready(Duration::from_secs(60)).await,
        "a is ready"
    );
    let mut b = world.spawn_runner_with(&[("RUNNER__STATUS__LISTEN", "")]);
    let started = Instant::now();
    // b joins (a rebalance gives it partitions), counts a while, and leaves (another).
    assert!(
        wait_for_async(Duration::from_secs(60), || async {
            world
                .db
                .count("SELECT count(DISTINCT owner)::int8 FROM store_revenue_partitions")
                .await
                .unwrap_or(0)
                >= 2
        })
        .await,
        "b took partitions over"
    );
    tokio::time::sleep(Duration::from_secs(3).saturating_sub(started.elapsed())).await;
    let status_b = terminate(&mut b)?;
    producing.await??;
    let settled = world
        .wait_settled(sales as i64, Duration::from_secs(120))
        .await;
    let status_a = terminate(&mut a)?;
    assert!(settled, "everything counted");
    assert_eq!((status_a.code(), status_b.code()), (Some(0), Some(0)));
    assert_eq!(world.check(sales).await?, Vec::<String>::new());
    Ok(())
}
