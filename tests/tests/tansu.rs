//! The delivery invariant against a real Kafka-compatible broker process (tansu), with real
//! runner processes: kill -9 at random moments while campaigns keep arriving, and two runners
//! sharing a group while one of them comes and goes. At the end PostgreSQL is checked by SQL
//! and the whole output topic is read: every (campaign, client) draft exactly once in each.
//!
//! tansu stores no record of an aborted transaction, so what a reader sees is what committed.
//! Its "latest offset" is wrong after multi-record batches, so the topic is read until it goes
//! quiet rather than up to its high watermark. Its group joins take about half a session
//! timeout, hence short session timeouts here.

use anyhow::{Context, Result};
use e2e_tests::*;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::Message;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

fn script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../scripts/tansu.sh")
}

/// A tansu broker on a free loopback port, stopped on drop.
struct Tansu {
    port: u16,
}

fn tansu_home() -> PathBuf {
    std::env::var_os("TANSU_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/cache/wasm-runner/tansu"))
}

impl Tansu {
    fn start() -> Result<Tansu> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let out = Command::new("bash")
            .arg(script())
            .args(["start", &port.to_string()])
            .output()?;
        anyhow::ensure!(
            out.status.success(),
            "tansu did not start: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(Tansu { port })
    }

    fn brokers(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Sends a signal to the broker process (STOP freezes it: unreachable, state kept).
    fn signal(&self, sig: &str) -> Result<()> {
        let pid = std::fs::read_to_string(tansu_home().join(format!("tansu-{}.pid", self.port)))?;
        let ok = Command::new("kill")
            .args([&format!("-{sig}"), pid.trim()])
            .status()?
            .success();
        anyhow::ensure!(ok, "kill -{sig} tansu");
        Ok(())
    }
}

impl Drop for Tansu {
    fn drop(&mut self) {
        let _ = Command::new("bash")
            .arg(script())
            .args(["stop", &self.port.to_string()])
            .output();
    }
}

async fn create_topics(brokers: &str, topics: &[(&str, i32)]) -> Result<()> {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()?;
    let new: Vec<NewTopic<'_>> = topics
        .iter()
        .map(|(t, p)| NewTopic::new(t, *p, TopicReplication::Fixed(1)))
        .collect();
    for r in admin.create_topics(&new, &AdminOptions::new()).await? {
        r.map_err(|(t, e)| anyhow::anyhow!("creating {t}: {e}"))?;
    }
    Ok(())
}

/// One output record: (campaign, client), the source message, the transaction attempt, and
/// its timestamp.
#[derive(Debug, Clone)]
struct Seen {
    pair: (String, String),
    source: String,
    attempt: String,
    ts: i64,
}

/// Reads every partition from the beginning until `expected` messages arrived and then
/// nothing more for `quiet`, or until `timeout`.
async fn read_until_quiet(
    brokers: &str,
    topic: &str,
    expected: usize,
    quiet: Duration,
    timeout: Duration,
) -> Result<Vec<Seen>> {
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", unique("reader"))
        .set("enable.auto.commit", "false")
        .set("isolation.level", "read_committed")
        .create()?;
    let meta = consumer.fetch_metadata(Some(topic), Duration::from_secs(10))?;
    let mut tpl = TopicPartitionList::new();
    for p in meta
        .topics()
        .first()
        .context("topic metadata")?
        .partitions()
    {
        tpl.add_partition_offset(topic, p.id(), Offset::Beginning)?;
    }
    consumer.assign(&tpl)?;
    let mut out = Vec::new();
    let deadline = Instant::now() + timeout;
    loop {
        let wait = if out.len() >= expected {
            quiet
        } else {
            Duration::from_secs(1)
        };
        match tokio::time::timeout(wait, consumer.recv()).await {
            Ok(Ok(m)) => {
                let m = m.detach();
                let v: serde_json::Value = serde_json::from_slice(m.payload().unwrap_or_default())?;
                let h = |k: &str| header(&m, k).unwrap_or("").to_string();
                out.push(Seen {
                    pair: (
                        v["adv_campaign_id"].as_str().unwrap_or("").to_string(),
                        v["client_id"].as_str().unwrap_or("").to_string(),
                    ),
                    source: format!("{}/{}", h("source-partition"), h("source-offset")),
                    attempt: h("tx-attempt"),
                    ts: m.timestamp().to_millis().unwrap_or(0),
                });
            }
            Ok(Err(e)) => anyhow::bail!("reading {topic}: {e}"),
            Err(_) if out.len() >= expected => return Ok(out),
            Err(_) => {}
        }
        if Instant::now() > deadline {
            return Ok(out);
        }
    }
}

/// One test's world: broker, topics, database with many subscribers, a runner config file.
struct World {
    tansu: Tansu,
    input: String,
    output: String,
    db: TestDb,
    config: PathBuf,
    _dir: tempfile::TempDir,
    restaurants: Vec<String>,
    per_restaurant: usize,
    status: std::net::SocketAddr,
}

impl World {
    async fn new(partitions: i32, restaurants: usize, per_restaurant: usize) -> Result<World> {
        let tansu = Tansu::start()?;
        let (input, output, dlq) = (unique("campaigns"), unique("drafts"), unique("dlq"));
        create_topics(
            &tansu.brokers(),
            &[(&input, partitions), (&output, partitions), (&dlq, 1)],
        )
        .await?;
        let db = TestDb::new().await?.with_schema().await?;
        let restaurants: Vec<String> = (0..restaurants)
            .map(|r| format!("00000000-0000-4000-8000-{:012}", 7000 + r))
            .collect();
        let c = db.client().await?;
        for r in &restaurants {
            c.execute(
                "INSERT INTO subscribers_restaurants (client_id, restaurant_id) \
                 SELECT gen_random_uuid()::text, $1 FROM generate_series(1, $2::int)",
                &[r, &(per_restaurant as i32)],
            )
            .await?;
        }
        let dir = tempfile::tempdir()?;
        let config = dir.path().join("runner.toml");
        let status: std::net::SocketAddr =
            std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
        std::fs::write(
            &config,
            format!(
                "[kafka]\nbrokers = \"{}\"\n[kafka.consumer_properties]\n\"session.timeout.ms\" = \"2000\"\n\"heartbeat.interval.ms\" = \"500\"\n\
                 [postgres]\nurl = \"{}\"\n[status]\nlisten = \"{status}\"\n\
                 [pipelines.campaigns]\ninput_topic = \"{input}\"\noutput_topic = \"{output}\"\ndead_letter_topic = \"{dlq}\"\n\
                 group_id = \"{}\"\nshutdown_timeout = \"20s\"\n\
                 [pipelines.campaigns.rules]\npath = \"{}\"\ncompile_cache_dir = \"{}\"\n",
                tansu.brokers(),
                db.url,
                unique("group"),
                rules_wasm().display(),
                dir.path().join("compiled").display()
            ),
        )?;
        Ok(World {
            tansu,
            input,
            output,
            db,
            config,
            _dir: dir,
            restaurants,
            per_restaurant,
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
        let child = Command::new(runner_binary())
            .args([
                "--log",
                "error",
                "run",
                "--config",
                self.config.to_str().unwrap(),
            ])
            .envs(env.iter().copied())
            .spawn()
            .expect("the runner starts");
        ChildGuard(child)
    }

    /// Produces `n` campaigns (unique ids, spread over the restaurants) in the background.
    fn produce(&self, n: usize, pause: Duration) -> tokio::task::JoinHandle<Result<()>> {
        let producer: FutureProducer = ClientConfig::new()
            .set("bootstrap.servers", self.tansu.brokers())
            .create()
            .expect("producer");
        let (topic, restaurants) = (self.input.clone(), self.restaurants.clone());
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64;
        tokio::spawn(async move {
            for i in 0..n {
                let value = campaign(
                    &restaurants[i % restaurants.len()],
                    &format!("00000000-0000-4000-9000-{i:012}"),
                    now - 3600,
                    now + 3600,
                );
                let key = i.to_string();
                producer
                    .send(
                        FutureRecord::to(&topic).key(&key).payload(&value),
                        Duration::from_secs(10),
                    )
                    .await
                    .map_err(|(e, _)| e)?;
                tokio::time::sleep(pause).await;
            }
            Ok(())
        })
    }

    /// Counts lost and duplicated drafts in both sinks; prints and returns them.
    ///
    /// Kafka is judged on committed transactions. tansu does not abort the open transaction of
    /// a killed producer when the next one initialises (a read_committed reader still sees its
    /// records; Apache Kafka hides them). Every record carries its transaction attempt: for a
    /// source message, the attempt that committed is its latest (after a commit the offset has
    /// moved past it, so no later attempt exists). Records of earlier attempts are counted and
    /// reported apart, as what only such a broker shows.
    async fn invariant(&self, campaigns: usize) -> Result<[i64; 4]> {
        let expected = (campaigns * self.per_restaurant) as i64;
        let total = self
            .db
            .count("SELECT count(*) FROM subscribers_feedback")
            .await?;
        let distinct = self.db.count("SELECT count(*) FROM (SELECT DISTINCT adv_campaign_id, client_id FROM subscribers_feedback) d").await?;
        let (pg_lost, pg_dup) = (expected - distinct, total - distinct);
        let seen = read_until_quiet(
            &self.tansu.brokers(),
            &self.output,
            expected as usize,
            Duration::from_secs(3),
            Duration::from_secs(120),
        )
        .await?;
        // The latest attempt per source message.
        let mut latest: BTreeMap<&str, (i64, &str)> = BTreeMap::new();
        for s in &seen {
            let e = latest
                .entry(s.source.as_str())
                .or_insert((s.ts, s.attempt.as_str()));
            if s.ts > e.0 {
                *e = (s.ts, s.attempt.as_str());
            }
        }
        let mut per: BTreeMap<&(String, String), i64> = BTreeMap::new();
        let mut superseded = 0;
        for s in &seen {
            if latest[s.source.as_str()].1 == s.attempt {
                *per.entry(&s.pair).or_default() += 1;
            } else {
                superseded += 1;
            }
        }
        let kafka_dup: i64 = per.values().map(|n| n - 1).sum();
        let kafka_lost = expected - per.len() as i64;
        println!(
            "invariant over {campaigns} campaigns x {} subscribers = {expected} drafts: \
             PostgreSQL lost {pg_lost}, duplicated {pg_dup}; Kafka (committed transactions) lost {kafka_lost}, duplicated {kafka_dup}; \
             records of never-committed transactions tansu still shows: {superseded}",
            self.per_restaurant
        );
        Ok([pg_lost, pg_dup, kafka_lost, kafka_dup])
    }

    async fn wait_all_in_postgres(&self, campaigns: usize, timeout: Duration) -> bool {
        let expected = (campaigns * self.per_restaurant) as i64;
        let db = self.db.clone();
        wait_for_async(timeout, || {
            let db = db.clone();
            async move {
                db.count("SELECT count(*) FROM subscribers_feedback")
                    .await
                    .unwrap_or(0)
                    >= expected
                    && db
                        .count("SELECT count(*) FROM campaign_runner_outbox")
                        .await
                        .unwrap_or(1)
                        == 0
            }
        })
        .await
    }
}

fn runner_binary() -> PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    let bin = exe
        .parent()
        .and_then(|d| d.parent())
        .expect("target/debug")
        .join("runner");
    assert!(
        bin.exists(),
        "{} is missing: build with `cargo test --workspace`",
        bin.display()
    );
    bin
}

fn terminate(child: &mut ChildGuard) -> Result<std::process::ExitStatus> {
    Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()?;
    let started = Instant::now();
    loop {
        if let Some(s) = child.try_wait()? {
            return Ok(s);
        }
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(30),
            "the runner did not exit after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A small deterministic generator for kill delays (no dependency for one number).
struct Lcg(u64);
impl Lcg {
    fn next_ms(&mut self, lo: u64, hi: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        lo + (self.0 >> 33) % (hi - lo)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_dash_nine_loop_loses_and_doubles_nothing() -> Result<()> {
    let loops: usize = std::env::var("CRASH_LOOPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    let world = World::new(4, 4, 200).await?;
    let campaigns = 40 + 4 * loops;
    let producing = world.produce(campaigns, Duration::from_millis(150));
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_nanos() as u64;
    let mut rng = Lcg(seed);
    println!("crash loop: {loops} kills, seed {seed}");
    for i in 0..loops {
        // Every other runner writes two partitions' units to PostgreSQL at a time.
        let parallel = if i % 2 == 1 { "2" } else { "1" };
        let mut child =
            world.spawn_runner_with(&[("RUNNER__PIPELINES__CAMPAIGNS__PARALLEL_UNITS", parallel)]);
        tokio::time::sleep(Duration::from_millis(rng.next_ms(400, 3000))).await;
        child.kill()?; // SIGKILL
        child.wait()?;
    }
    producing.await??;
    let mut last = world.spawn_runner();
    // Up (its signal handlers are installed before it starts): stopping it is then a drain.
    let up = wait_for_async(Duration::from_secs(60), || async {
        http_get(world.status, "/health").await.is_ok()
    })
    .await;
    let done = world
        .wait_all_in_postgres(campaigns, Duration::from_secs(180))
        .await;
    let status = terminate(&mut last)?;
    assert!(up, "the last runner came up");
    assert!(done, "the last runner delivered everything");
    assert_eq!(
        status.code(),
        Some(0),
        "the last runner exits 0 on SIGTERM: {status:?}"
    );
    let counts = world.invariant(campaigns).await?;
    assert_eq!(
        counts,
        [0, 0, 0, 0],
        "[pg lost, pg duplicated, kafka lost, kafka duplicated]"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_runners_in_one_group_one_coming_and_going() -> Result<()> {
    let world = World::new(4, 4, 100).await?;
    let campaigns = 120;
    let producing = world.produce(campaigns, Duration::from_millis(60));
    let mut a = world.spawn_runner();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut b = world.spawn_second_runner();
    tokio::time::sleep(Duration::from_secs(4)).await;
    let status_b = terminate(&mut b)?;
    producing.await??;
    let done = world
        .wait_all_in_postgres(campaigns, Duration::from_secs(120))
        .await;
    let status_a = terminate(&mut a)?;
    assert!(done, "everything delivered");
    assert_eq!((status_a.code(), status_b.code()), (Some(0), Some(0)));
    let counts = world.invariant(campaigns).await?;
    assert_eq!(
        counts,
        [0, 0, 0, 0],
        "[pg lost, pg duplicated, kafka lost, kafka duplicated]"
    );
    Ok(())
}

/// Resident memory of a process, in MiB (0 when gone).
fn rss_mib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .unwrap_or(0)
        / 1024
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_unreachable_for_30_s_loses_and_doubles_nothing() -> Result<()> {
    let world = World::new(2, 2, 100).await?;
    let mut runner = world.spawn_runner();
    let campaigns = 60;
    // Campaigns keep arriving before, during (queued by the producer) and after the outage.
    let producing = world.produce(campaigns, Duration::from_millis(100));
    assert!(
        world.wait_all_in_postgres(5, Duration::from_secs(60)).await,
        "the runner works before the outage"
    );
    let before = rss_mib(runner.id());
    world.tansu.signal("STOP")?;
    let frozen = Instant::now();
    let mut degraded = false;
    let mut peak = before;
    while frozen.elapsed() < Duration::from_secs(30) {
        peak = peak.max(rss_mib(runner.id()));
        if let Ok((503, body)) = http_get(world.status, "/health").await {
            degraded |= body.contains("kafka_unreachable") || body.contains("kafka_sink_retrying");
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    world.tansu.signal("CONT")?;
    producing.await??;
    let done = world
        .wait_all_in_postgres(campaigns, Duration::from_secs(180))
        .await;
    let after = rss_mib(runner.id());
    let healthy = http_get(world.status, "/health").await?.0 == 200;
    let status = terminate(&mut runner)?;
    println!("broker outage 30 s: runner RSS {before} MiB before, {peak} MiB peak during, {after} MiB after; degraded seen: {degraded}");
    assert!(done, "recovered by itself and delivered everything");
    assert!(
        degraded,
        "/health reported the broker unreachable during the outage"
    );
    assert!(healthy, "healthy again after");
    assert!(
        peak < before + 200,
        "memory stays bounded while the broker is away ({before} -> {peak} MiB)"
    );
    assert_eq!(status.code(), Some(0));
    let counts = world.invariant(campaigns).await?;
    assert_eq!(
        counts,
        [0, 0, 0, 0],
        "[pg lost, pg duplicated, kafka lost, kafka duplicated]"
    );
    Ok(())
}
