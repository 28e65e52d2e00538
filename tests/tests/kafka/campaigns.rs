//! The campaign pipeline's delivery invariant against real Apache Kafka brokers (Apache Kafka 4.x,
//! KRaft, on-disk storage) with real runner processes: kill -9 at random moments while
//! campaigns keep arriving; two runners sharing a group while one comes and goes; the broker
//! stopped and started again; on a 3-broker cluster, kill -9 of the leader of the input
//! partition, of the output partition and of the transaction coordinator, and a full cluster
//! stop and start; and an operator's Debian `kcat` in and out.
//!
//! Delivery is judged the way a consumer of the output sees it: the whole output topic read by
//! a read_committed consumer, every (campaign, client) draft counted, and the rows of
//! `subscribers_feedback` counted by SQL. Each test runs alone (the brokers are JVMs and the
//! machine has two cores).

use super::brokers::*;
use anyhow::{Context, Result};
use e2e_tests::*;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::ClientConfig;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

/// One test's world: a broker, topics, a database with many subscribers, a runner config file.
struct World {
    kafka: Kafka,
    input: String,
    output: String,
    dlq: String,
    group: String,
    db: TestDb,
    config: PathBuf,
    _dir: tempfile::TempDir,
    restaurants: Vec<String>,
    per_restaurant: usize,
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
        let restaurants = seed_restaurants(&db, 7000, restaurants, per_restaurant).await?;
        let dir = tempfile::tempdir()?;
        let config = dir.path().join("runner.toml");
        let status: std::net::SocketAddr =
            std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
        let group = unique("group");
        // A killed runner's partitions go to the others once its session expires: 6 s, the
        // broker's minimum (librdkafka's default is 45 s).
        std::fs::write(
            &config,
            format!(
                "[kafka]\nbrokers = \"{}\"\n[kafka.consumer_properties]\n\"session.timeout.ms\" = \"6000\"\n\"heartbeat.interval.ms\" = \"1000\"\n\
                 [postgres]\nurl = \"{}\"\n[status]\nlisten = \"{status}\"\n\
                 [pipelines.campaigns]\ninput_topic = \"{input}\"\noutput_topic = \"{output}\"\ndead_letter_topic = \"{dlq}\"\n\
                 group_id = \"{group}\"\nshutdown_timeout = \"20s\"\n\
                 [pipelines.campaigns.rules]\npath = \"{}\"\ncompile_cache_dir = \"{}\"\n",
                kafka.brokers,
                db.url,
                rules_wasm().display(),
                dir.path().join("compiled").display()
            ),
        )?;
        Ok(World {
            kafka,
            input,
            output,
            dlq,
            group,
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
        super::brokers::spawn_runner(&self.config, env)
    }

    /// The transactional id of input partition `partition`'s producer.
    fn transactional_id(&self, partition: i32) -> String {
        format!("campaign-runner-{}-{}-{partition}", self.group, self.input)
    }

    /// Produces `n` campaigns (unique ids, spread over the restaurants) in the background, with
    /// a producer that keeps retrying through broker outages.
    fn produce(&self, n: usize, pause: Duration) -> tokio::task::JoinHandle<Result<()>> {
        let brokers = self.kafka.brokers.clone();
        let make = move || -> FutureProducer {
            ClientConfig::new()
                .set("bootstrap.servers", &brokers)
                .set("enable.idempotence", "true")
                .set("message.timeout.ms", "60000")
                .create()
                .expect("producer")
        };
        let mut producer = make();
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
                // Through an outage a send may time out: sent again, by a new producer (an
                // idempotent producer can stay stuck after the whole cluster restarted), until it
                // is acknowledged (a campaign published twice reaches each subscriber once).
                let deadline = Instant::now() + Duration::from_secs(300);
                loop {
                    let sent = producer
                        .send(
                            FutureRecord::to(&topic).key(&key).payload(&value),
                            Duration::from_secs(60),
                        )
                        .await;
                    match sent {
                        Ok(_) => break,
                        Err((e, _)) if Instant::now() < deadline => {
                            eprintln!("producing campaign {i}: {e}; sending it again");
                            producer = make();
                            tokio::time::sleep(Duration::from_millis(500)).await;
                        }
                        Err((e, _)) => return Err(e.into()),
                    }
                }
                tokio::time::sleep(pause).await;
            }
            Ok(())
        })
    }

    /// Counts lost and duplicated drafts in both sinks, as their readers see them: rows of
    /// `subscribers_feedback` by SQL, the whole output topic by a read_committed consumer.
    async fn invariant(&self, campaigns: usize) -> Result<[i64; 4]> {
        let expected = (campaigns * self.per_restaurant) as i64;
        let total = self
            .db
            .count("SELECT count(*) FROM subscribers_feedback")
            .await?;
        let distinct = self.db.count("SELECT count(*) FROM (SELECT DISTINCT adv_campaign_id, client_id FROM subscribers_feedback) d").await?;
        let (pg_lost, pg_dup) = (expected - distinct, total - distinct);
        let records = read_topic(
            &self.kafka.brokers,
            &self.output,
            expected as usize,
            Duration::from_secs(120),
        )
        .await?;
        let mut per: BTreeMap<(String, String), i64> = BTreeMap::new();
        for m in &records {
            let v = json(m);
            let pair = (
                v["adv_campaign_id"].as_str().unwrap_or("").to_string(),
                v["client_id"].as_str().unwrap_or("").to_string(),
            );
            *per.entry(pair).or_default() += 1;
        }
        let kafka_dup: i64 = per.values().map(|n| n - 1).sum();
        let kafka_lost = expected - per.len() as i64;
        println!(
            "invariant over {campaigns} campaigns x {} subscribers = {expected} drafts: \
             PostgreSQL lost {pg_lost}, duplicated {pg_dup}; Kafka (read_committed, {} records) lost {kafka_lost}, duplicated {kafka_dup}",
            self.per_restaurant,
            records.len()
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

    async fn rows(&self) -> i64 {
        self.db
            .count("SELECT count(*) FROM subscribers_feedback")
            .await
            .unwrap_or(0)
    }

    /// Waits until more rows than now are in PostgreSQL: the runner is delivering.
    async fn wait_progress(&self, timeout: Duration) -> bool {
        let before = self.rows().await;
        wait_for_async(timeout, || async { self.rows().await > before }).await
    }

    /// GET `path` of the first runner's status endpoint: the status code (0 if it does not
    /// answer) and the body.
    async fn status(&self, path: &str) -> (u16, String) {
        http_get(self.status, path)
            .await
            .unwrap_or((0, String::new()))
    }

    /// Waits until `/health` says healthy again (the runner recovers by itself).
    async fn wait_healthy(&self) -> bool {
        wait_for_async(Duration::from_secs(30), || async {
            self.status("/health").await.0 == 200
        })
        .await
    }

    /// A runner on a fresh 3-broker cluster, ready, with `campaigns` being produced and the
    /// first of them delivered.
    async fn cluster_under_load(
        campaigns: usize,
    ) -> Result<(World, ChildGuard, tokio::task::JoinHandle<Result<()>>)> {
        let world = World::new(Kafka::cluster()?, 2, 2, 100).await?;
        let runner = world.spawn_runner();
        anyhow::ensure!(world.wait_ready(Duration::from_secs(60)).await, "ready");
        let producing = world.produce(campaigns, Duration::from_millis(100));
        anyhow::ensure!(
            world.wait_progress(Duration::from_secs(30)).await,
            "delivering"
        );
        Ok((world, runner, producing))
    }

    async fn wait_ready(&self, timeout: Duration) -> bool {
        wait_for_async(timeout, || async {
            self.status("/health/ready").await.0 == 200
        })
        .await
    }
}

const NOTHING: [i64; 4] = [0, 0, 0, 0];
const COUNTS: &str = "[pg lost, pg duplicated, kafka lost, kafka duplicated]";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_dash_nine_loop_loses_and_doubles_nothing() -> Result<()> {
    let _one = SERIAL.lock().await;
    let loops: usize = std::env::var("CRASH_LOOPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    let world = World::new(Kafka::single()?, 4, 4, 200).await?;
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
    let ready = world.wait_ready(Duration::from_secs(60)).await;
    let done = world
        .wait_all_in_postgres(campaigns, Duration::from_secs(180))
        .await;
    let status = terminate(&mut last)?;
    assert!(ready, "the last runner became ready");
    assert!(done, "the last runner delivered everything");
    assert_eq!(
        status.code(),
        Some(0),
        "the last runner exits 0 on SIGTERM: {status:?}"
    );
    assert_eq!(world.invariant(campaigns).await?, NOTHING, "{COUNTS}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_and_exits_zero_and_the_next_start_doubles_nothing() -> Result<()> {
    let _one = SERIAL.lock().await;
    let world = World::new(Kafka::single()?, 2, 1, 8).await?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs() as i64;
    let values: Vec<String> = (0..10)
        .map(|i| {
            campaign(
                &world.restaurants[0],
                &format!("00000000-0000-4000-8000-{:012}", 900 + i),
                now - 3600,
                now + 3600,
            )
        })
        .collect();
    for (round, chunk) in values.chunks(5).enumerate() {
        let mut child = world.spawn_runner();
        let batch: Vec<(Option<&str>, &[u8])> =
            chunk.iter().map(|v| (None, v.as_bytes())).collect();
        produce(&world.kafka.brokers, &world.input, &batch).await?;
        let want = 8 * 5 * (round as i64 + 1);
        assert!(
            wait_for_async(Duration::from_secs(60), || async {
                world.rows().await >= want
            })
            .await,
            "round {round}: the campaigns reached PostgreSQL"
        );
        let status = terminate(&mut child)?;
        assert_eq!(status.code(), Some(0), "SIGTERM is a clean exit");
    }
    assert_eq!(world.invariant(10).await?, NOTHING, "{COUNTS}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_runners_in_one_group_one_coming_and_going() -> Result<()> {
    let _one = SERIAL.lock().await;
    let world = World::new(Kafka::single()?, 4, 4, 100).await?;
    let campaigns = 120;
    let producing = world.produce(campaigns, Duration::from_millis(60));
    let mut a = world.spawn_runner();
    assert!(
        world.wait_ready(Duration::from_secs(60)).await,
        "a is ready"
    );
    let mut b = world.spawn_second_runner();
    // b joins (a rebalance moves partitions to it), works a while, and leaves (another).
    assert!(world.wait_progress(Duration::from_secs(30)).await);
    tokio::time::sleep(Duration::from_secs(4)).await;
    let status_b = terminate(&mut b)?;
    producing.await??;
    let done = world
        .wait_all_in_postgres(campaigns, Duration::from_secs(120))
        .await;
    let status_a = terminate(&mut a)?;
    assert!(done, "everything delivered");
    assert_eq!((status_a.code(), status_b.code()), (Some(0), Some(0)));
    assert_eq!(world.invariant(campaigns).await?, NOTHING, "{COUNTS}");
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
async fn a_broker_stopped_for_30_s_loses_and_doubles_nothing() -> Result<()> {
    let _one = SERIAL.lock().await;
    let world = World::new(Kafka::single()?, 2, 2, 100).await?;
    let mut runner = world.spawn_runner();
    let campaigns = 60;
    // Campaigns keep arriving before, during (held by the producer) and after the outage.
    let producing = world.produce(campaigns, Duration::from_millis(100));
    assert!(
        world.wait_all_in_postgres(5, Duration::from_secs(60)).await,
        "the runner works before the outage"
    );
    let before = rss_mib(runner.id());
    world.kafka.stop()?;
    let stopped = Instant::now();
    let mut degraded = false;
    let mut peak = before;
    while stopped.elapsed() < Duration::from_secs(30) {
        peak = peak.max(rss_mib(runner.id()));
        if let (503, body) = world.status("/health").await {
            degraded |= body.contains("kafka_unreachable") || body.contains("kafka_sink_retrying");
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    world.kafka.start_again()?;
    producing.await??;
    let done = world
        .wait_all_in_postgres(campaigns, Duration::from_secs(180))
        .await;
    let after = rss_mib(runner.id());
    let healthy = world.wait_healthy().await;
    let status = terminate(&mut runner)?;
    println!("broker stopped 30 s: runner RSS {before} MiB before, {peak} MiB peak during, {after} MiB after; degraded seen: {degraded}");
    assert!(done, "recovered by itself and delivered everything");
    assert!(
        degraded,
        "/health reported the broker unreachable meanwhile"
    );
    assert!(healthy, "healthy again after");
    assert!(
        peak < before + 200,
        "memory stays bounded while the broker is away ({before} -> {peak} MiB)"
    );
    assert_eq!(status.code(), Some(0));
    assert_eq!(world.invariant(campaigns).await?, NOTHING, "{COUNTS}");
    Ok(())
}

/// Runs Debian's kcat with `args`, `stdin` on its standard input; its stdout.
fn kcat(args: &[&str], stdin: &str) -> Result<String> {
    use std::io::Write;
    let mut child = Command::new("kcat")
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .context("kcat runs (Debian's kcat, installed by scripts/setup.sh)")?;
    child
        .stdin
        .take()
        .context("kcat's stdin")?
        .write_all(stdin.as_bytes())?;
    let out = child.wait_with_output()?;
    anyhow::ensure!(
        out.status.success(),
        "kcat {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8(out.stdout)?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_with_kcat_sends_campaigns_in_and_reads_drafts_out() -> Result<()> {
    let _one = SERIAL.lock().await;
    let world = World::new(Kafka::single()?, 3, 1, 1).await?;
    world.db.seed_spec_subscribers().await?;
    let mut runner = world.spawn_runner();
    // Ready once it holds its partitions: what is produced then is delivered without waiting
    // for a group assignment.
    assert!(
        world.wait_ready(Duration::from_secs(60)).await,
        "the runner says when it is ready"
    );
    let (code, live) = world.status("/health/live").await;
    assert_eq!(code, 200, "{live}");
    // The seed's own line, as an operator types it.
    let line = format!("first_message:{SPEC_CAMPAIGN}\n");
    kcat(
        &["-b", &world.kafka.brokers, "-t", &world.input, "-K:", "-P"],
        &line,
    )?;
    kcat(
        &["-b", &world.kafka.brokers, "-t", &world.input, "-K:", "-P"],
        "broken_message:{\"restaurant_id\": \n",
    )?;
    let db = world.db.clone();
    let delivered = wait_for_async(Duration::from_secs(30), || {
        let db = db.clone();
        async move {
            db.count("SELECT count(*) FROM subscribers_feedback")
                .await
                .unwrap_or(0)
                == 8
        }
    })
    .await;
    let read = |topic: &str| {
        kcat(
            &[
                "-b",
                &world.kafka.brokers,
                "-t",
                topic,
                "-C",
                "-X",
                "isolation.level=read_committed",
                "-o",
                "beginning",
                "-e",
                "-q",
                "-K:",
            ],
            "",
        )
    };
    let out = wait_for_async(Duration::from_secs(30), || async {
        read(&world.output).is_ok_and(|o| o.lines().count() >= 8)
    })
    .await;
    let drafts = read(&world.output)?;
    let dead = read(&world.dlq)?;
    let status = terminate(&mut runner)?;
    assert!(delivered && out, "8 drafts in both sinks");
    let clients: Vec<String> = drafts
        .lines()
        .map(|l| {
            let (key, value) = l.split_once(':').expect("key:value");
            let v: serde_json::Value = serde_json::from_str(value).expect("a JSON draft");
            assert_eq!(v["client_id"].as_str(), Some(key), "keyed by client");
            key.to_string()
        })
        .collect();
    assert_eq!(clients.len(), 8, "{drafts}");
    assert!(clients.contains(&"023e4567-e89b-12d3-a456-426614174000".to_string()));
    assert_eq!(dead.lines().count(), 1, "{dead}");
    assert!(dead.starts_with("broken_message:"), "{dead}");
    assert_eq!(status.code(), Some(0));
    Ok(())
}

/// Kills the node leading `role`, waits until the runner delivers again, restarts the node and
/// waits until it is back; returns the node.
async fn kill_and_restart(world: &World, role: &str, node: i32) -> Result<i32> {
    println!(
        "kill -9 of node {node}, {role}; {} rows",
        world.rows().await
    );
    world.kafka.kill(node)?;
    let t = Instant::now();
    let delivering = world.wait_progress(Duration::from_secs(60)).await;
    println!(
        "delivering again after {:.1} s: {delivering}; {} rows",
        t.elapsed().as_secs_f64(),
        world.rows().await
    );
    world.kafka.restart_node(node)?;
    println!(
        "node {node} back after {:.1} s: {}",
        t.elapsed().as_secs_f64(),
        kafka_sh(&["status", &world.kafka.name], &[])?.replace('\n', "; ")
    );
    anyhow::ensure!(delivering, "the runner delivers again after losing {role}");
    Ok(node)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leaders_killed_on_a_3_broker_cluster_lose_and_double_nothing() -> Result<()> {
    let _one = SERIAL.lock().await;
    let campaigns = 300;
    let (world, mut runner, producing) = World::cluster_under_load(campaigns).await?;
    let node = world.kafka.leader(&world.input, 0)?;
    kill_and_restart(&world, "the leader of input partition 0", node).await?;
    let node = world.kafka.leader(&world.output, 0)?;
    kill_and_restart(&world, "the leader of output partition 0", node).await?;
    let node = world
        .kafka
        .transaction_coordinator(&world.transactional_id(0))?;
    kill_and_restart(&world, "the transaction coordinator of partition 0", node).await?;
    producing.await??;
    let done = world
        .wait_all_in_postgres(campaigns, Duration::from_secs(180))
        .await;
    let healthy = world.wait_healthy().await;
    println!(
        "done {done}, healthy {healthy}: {} rows; /health {:?}",
        world.rows().await,
        world.status("/health").await
    );
    let status = terminate(&mut runner)?;
    assert!(done, "everything delivered");
    assert!(healthy, "healthy again by itself");
    assert_eq!(status.code(), Some(0));
    assert_eq!(world.invariant(campaigns).await?, NOTHING, "{COUNTS}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_3_broker_cluster_stopped_and_started_loses_and_doubles_nothing() -> Result<()> {
    let _one = SERIAL.lock().await;
    let campaigns = 150;
    let (world, mut runner, producing) = World::cluster_under_load(campaigns).await?;
    world.kafka.stop()?;
    let degraded = wait_for_async(Duration::from_secs(20), || async {
        let (code, body) = world.status("/health").await;
        code == 503 && body.contains("kafka_")
    })
    .await;
    world.kafka.start_again()?;
    producing.await??;
    let done = world
        .wait_all_in_postgres(campaigns, Duration::from_secs(180))
        .await;
    let healthy = world.wait_healthy().await;
    let status = terminate(&mut runner)?;
    assert!(degraded, "/health said the cluster was gone");
    assert!(done, "everything delivered after the restart");
    assert!(healthy, "healthy again by itself");
    assert_eq!(status.code(), Some(0));
    assert_eq!(world.invariant(campaigns).await?, NOTHING, "{COUNTS}");
    Ok(())
}

/// A draft larger than the output topic takes (its `max.message.bytes`, set by an operator
/// below the producer's) is refused before anything is written: the campaign is dead-lettered
/// (`sink_refused`), the next one is delivered, and the partition goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_draft_larger_than_the_output_topic_takes_is_dead_lettered() -> Result<()> {
    use rdkafka::admin::{AdminOptions, AlterConfig, ResourceSpecifier};
    let _one = SERIAL.lock().await;
    let world = World::new(Kafka::single()?, 1, 1, 1).await?;
    world.db.seed_spec_subscribers().await?;
    for r in world
        .kafka
        .admin()?
        .alter_configs(
            &[AlterConfig::new(ResourceSpecifier::Topic(&world.output))
                .set("max.message.bytes", "4000")],
            &AdminOptions::new(),
        )
        .await?
    {
        r.map_err(|(t, e)| anyhow::anyhow!("altering {t:?}: {e}"))?;
    }
    let mut runner = world.spawn_runner();
    assert!(world.wait_ready(Duration::from_secs(60)).await, "ready");
    let with = |id: &str, content: &str| {
        let mut v: serde_json::Value = serde_json::from_str(SPEC_CAMPAIGN).unwrap();
        v["adv_campaign_id"] = id.into();
        v["adv_campaign_content"] = content.into();
        v.to_string()
    };
    let big = with("123e4567-e89b-12d3-a456-426614175001", &"x".repeat(5000));
    let small = with("123e4567-e89b-12d3-a456-426614175002", "small");
    produce(
        &world.kafka.brokers,
        &world.input,
        &[(Some("a"), big.as_bytes()), (Some("b"), small.as_bytes())],
    )
    .await?;
    assert!(
        world
            .db
            .wait_count(
                "SELECT count(*) FROM subscribers_feedback WHERE adv_campaign_id = '123e4567-e89b-12d3-a456-426614175002'",
                8,
                Duration::from_secs(60)
            )
            .await,
        "the campaign after the refused one is delivered"
    );
    let status = terminate(&mut runner)?;
    assert_eq!(status.code(), Some(0));
    assert_eq!(
        world
            .db
            .count("SELECT count(*) FROM subscribers_feedback WHERE adv_campaign_id = '123e4567-e89b-12d3-a456-426614175001'")
            .await?,
        0,
        "nothing of the refused campaign in PostgreSQL"
    );
    let dead = read_topic(&world.kafka.brokers, &world.dlq, 1, Duration::from_secs(30)).await?;
    assert_eq!(dead.len(), 1);
    assert_eq!(header(&dead[0], "dlq-reason"), Some("sink_refused"));
    assert!(
        header(&dead[0], "dlq-detail").is_some_and(|d| d.contains("MSG_SIZE_TOO_LARGE")),
        "{:?}",
        header(&dead[0], "dlq-detail")
    );
    let drafts = read_topic(
        &world.kafka.brokers,
        &world.output,
        8,
        Duration::from_secs(30),
    )
    .await?;
    assert_eq!(drafts.len(), 8, "only the small campaign's drafts");
    Ok(())
}
