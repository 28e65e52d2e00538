//! Apache Kafka brokers of a test's own (scripts/kafka.sh), the runner binary, and what
//! the crash tests share.

use anyhow::Result;
use e2e_tests::*;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::ClientConfig;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

/// One test at a time.
pub(crate) static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

pub(crate) fn script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../scripts/kafka.sh")
}

/// Runs `scripts/kafka.sh ARGS` with `env`; its stdout, trimmed.
pub(crate) fn kafka_sh(args: &[&str], env: &[(&str, &str)]) -> Result<String> {
    let out = Command::new("bash")
        .arg(script())
        .args(args)
        .envs(env.iter().copied())
        .output()?;
    anyhow::ensure!(
        out.status.success(),
        "kafka.sh {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8(out.stdout)?.trim().to_string())
}

/// Broker settings of the test clusters: a killed broker is noticed in 3 s (Kafka's default is
/// 9 s), so failovers take seconds, not tens of seconds.
pub(crate) const CLUSTER_PROPS: &str =
    "broker.session.timeout.ms=3000\nbroker.heartbeat.interval.ms=500";

/// An Apache Kafka cluster of this test's own (1 or 3 nodes), wiped when dropped.
pub(crate) struct Kafka {
    pub(crate) name: String,
    pub(crate) nodes: usize,
    pub(crate) brokers: String,
}

impl Kafka {
    pub(crate) fn single() -> Result<Kafka> {
        Kafka::start(1)
    }

    pub(crate) fn cluster() -> Result<Kafka> {
        Kafka::start(3)
    }

    pub(crate) fn start(nodes: usize) -> Result<Kafka> {
        let name = unique("kafka");
        let start = if nodes == 1 { "start" } else { "start-cluster" };
        let brokers = kafka_sh(&[start, &name], &[("KAFKA_SERVER_PROPS", CLUSTER_PROPS)])?;
        Ok(Kafka {
            name,
            nodes,
            brokers,
        })
    }

    /// kill -9 of node `node` (1-based).
    pub(crate) fn kill(&self, node: i32) -> Result<()> {
        kafka_sh(&["kill", &self.name, &node.to_string()], &[]).map(drop)
    }

    pub(crate) fn restart_node(&self, node: i32) -> Result<()> {
        kafka_sh(&["restart-node", &self.name, &node.to_string()], &[]).map(drop)
    }

    /// Stops every node (controlled shutdown); the data stays on disk.
    pub(crate) fn stop(&self) -> Result<()> {
        kafka_sh(&["stop", &self.name], &[]).map(drop)
    }

    /// Starts the stopped nodes again on their data.
    pub(crate) fn start_again(&self) -> Result<()> {
        let start = if self.nodes == 1 {
            "start"
        } else {
            "start-cluster"
        };
        kafka_sh(&[start, &self.name], &[]).map(drop)
    }

    pub(crate) fn admin(&self) -> Result<AdminClient<DefaultClientContext>> {
        Ok(ClientConfig::new()
            .set("bootstrap.servers", &self.brokers)
            .create()?)
    }

    pub(crate) async fn create_topics(&self, topics: &[(&str, i32)]) -> Result<()> {
        let rf = self.nodes as i32;
        let new: Vec<NewTopic<'_>> = topics
            .iter()
            .map(|(t, p)| NewTopic::new(t, *p, TopicReplication::Fixed(rf)))
            .collect();
        for r in self
            .admin()?
            .create_topics(&new, &AdminOptions::new())
            .await?
        {
            r.map_err(|(t, e)| anyhow::anyhow!("creating {t}: {e}"))?;
        }
        Ok(())
    }

    /// The node that leads partition `partition` of `topic`.
    pub(crate) fn leader(&self, topic: &str, partition: i32) -> Result<i32> {
        let c: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &self.brokers)
            .create()?;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let meta = c.fetch_metadata(Some(topic), Duration::from_secs(5))?;
            let leader = meta
                .topics()
                .first()
                .and_then(|t| t.partitions().iter().find(|p| p.id() == partition))
                .map(|p| p.leader())
                .filter(|l| *l >= 1);
            if let Some(l) = leader {
                return Ok(l);
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "no leader for {topic}/{partition}"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// The node that coordinates `transactional_id`'s transactions: the leader of its partition
    /// of `__transaction_state` (Kafka's `Utils.abs` of the id's Java hash code, modulo the
    /// topic's 50 partitions).
    pub(crate) fn transaction_coordinator(&self, transactional_id: &str) -> Result<i32> {
        let hash = transactional_id
            .encode_utf16()
            .fold(0i32, |h, c| h.wrapping_mul(31).wrapping_add(c as i32));
        let abs = if hash == i32::MIN { 0 } else { hash.abs() };
        self.leader("__transaction_state", abs % 50)
    }
}

impl Drop for Kafka {
    fn drop(&mut self) {
        let _ = kafka_sh(&["wipe", &self.name], &[]);
    }
}

/// `runner run --config CONFIG` as a child process, with `env` set; `RUNNER_TEST_LOG` (e.g.
/// "info") makes it say more than errors.
pub(crate) fn spawn_runner(config: &std::path::Path, env: &[(&str, &str)]) -> ChildGuard {
    let log = std::env::var("RUNNER_TEST_LOG").unwrap_or_else(|_| "error".into());
    let child = Command::new(runner_binary())
        .args(["--log", &log, "run", "--config"])
        .arg(config)
        .envs(env.iter().copied())
        .spawn()
        .expect("the runner starts");
    ChildGuard(child)
}

pub(crate) fn terminate(child: &mut ChildGuard) -> Result<std::process::ExitStatus> {
    Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()?;
    let started = Instant::now();
    loop {
        if let Some(s) = child.try_wait()? {
            return Ok(s);
        }
        // The runner's shutdown deadline (20 s), then at most 10 s to abandon what is in hand.
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(40),
            "the runner did not exit after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A small deterministic generator for kill delays (no dependency for one number).
pub(crate) struct Lcg(pub(crate) u64);
impl Lcg {
    pub(crate) fn next_ms(&mut self, lo: u64, hi: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        lo + (self.0 >> 33) % (hi - lo)
    }
}

/// Restaurants `00000000-0000-4000-8000-{first + r}` for r in 0..count, each with `per`
/// subscribers of random client ids; their ids.
pub(crate) async fn seed_restaurants(
    db: &TestDb,
    first: usize,
    count: usize,
    per: usize,
) -> Result<Vec<String>> {
    let restaurants: Vec<String> = (0..count)
        .map(|r| format!("00000000-0000-4000-8000-{:012}", first + r))
        .collect();
    let c = db.client().await?;
    for r in &restaurants {
        c.execute(
            "INSERT INTO subscribers_restaurants (client_id, restaurant_id) \
             SELECT gen_random_uuid()::text, $1 FROM generate_series(1, $2::int)",
            &[r, &(per as i32)],
        )
        .await?;
    }
    Ok(restaurants)
}
