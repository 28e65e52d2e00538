//! The Kafka broker a workload runs against: a real Apache Kafka broker (scripts/kafka.sh, one
//! node, KRaft) when it can be started, librdkafka's mock cluster otherwise. Reports carry which
//! one it was.

use anyhow::Result;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::mocking::MockCluster;
use rdkafka::producer::DefaultProducerContext;
use rdkafka::ClientConfig;
use runner::app::{self, RunOptions, Running};
use runner::config::{Config, Sources};
use std::process::Command;

/// Partitions of the runner's input topic: the runner publishes each one's units on a
/// transactional producer of its own.
pub const INPUT_PARTITIONS: i32 = 4;

const SCRIPT: &str = "scripts/kafka.sh";

pub enum Broker {
    Kafka { name: String, brokers: String },
    Mock(MockCluster<'static, DefaultProducerContext>),
}

/// `scripts/kafka.sh ARGS`: its stdout, or why it failed.
fn kafka_sh(args: &[&str]) -> Result<String> {
    let out = Command::new("bash").arg(SCRIPT).args(args).output()?;
    anyhow::ensure!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(String::from_utf8(out.stdout)?.trim().to_string())
}

impl Broker {
    pub fn start() -> Result<Broker> {
        if std::path::Path::new(SCRIPT).exists() {
            let name = format!("bench-{}", uuid::Uuid::new_v4().simple());
            match kafka_sh(&["start", &name]) {
                Ok(brokers) => return Ok(Broker::Kafka { name, brokers }),
                Err(e) => {
                    let _ = kafka_sh(&["wipe", &name]);
                    eprintln!("bench: Apache Kafka did not start ({e}); using the mock cluster");
                }
            }
        }
        Ok(Broker::Mock(MockCluster::new(1)?))
    }

    pub fn label(&self) -> String {
        match self {
            Broker::Kafka { .. } => format!(
                "Apache Kafka {} broker process (one node, KRaft, scripts/kafka.sh)",
                kafka_version()
            ),
            Broker::Mock(_) => "librdkafka mock cluster (in-process)".into(),
        }
    }

    pub fn brokers(&self) -> String {
        match self {
            Broker::Kafka { brokers, .. } => brokers.clone(),
            Broker::Mock(m) => m.bootstrap_servers(),
        }
    }

    /// Creates fresh input/output/dead-letter topics and starts a runner on them in-process;
    /// `rules_extra` is more TOML for its `[pipelines.campaigns.rules]` section. Returns it and
    /// its input topic. `BENCH_KAFKA_PROPERTIES`, TOML lines such as `"socket.nagle.disable" =
    /// "false"`, go to the runner's `[kafka.properties]`, and `BENCH_PIPELINE`, TOML lines such
    /// as `parallel_units = 2`, to its `[pipelines.campaigns]`: for comparing settings back to
    /// back.
    pub async fn start_runner(
        &self,
        url: &str,
        rules: &std::path::Path,
        rules_extra: &str,
    ) -> Result<(Running, String)> {
        self.start_runner_with_clock(url, rules, rules_extra, RunOptions::default().clock)
            .await
    }

    /// [`Broker::start_runner`], the pipeline reading the time from `clock`.
    pub async fn start_runner_with_clock(
        &self,
        url: &str,
        rules: &std::path::Path,
        rules_extra: &str,
        clock: std::sync::Arc<dyn runner::clock::Clock>,
    ) -> Result<(Running, String)> {
        let id = uuid::Uuid::new_v4();
        let (input, output, dlq) = (format!("in-{id}"), format!("out-{id}"), format!("dlq-{id}"));
        self.create_topic(&input, INPUT_PARTITIONS).await?;
        self.create_topic(&output, 4).await?;
        self.create_topic(&dlq, 1).await?;
        let overlay = format!(
            "[kafka]\nbrokers = \"{}\"\n[kafka.consumer_properties]\n\"session.timeout.ms\" = \"6000\"\n\"heartbeat.interval.ms\" = \"1000\"\n\
             [kafka.properties]\n{}\n[postgres]\nurl = \"{url}\"\n\
             [pipelines.campaigns]\ninput_topic = \"{input}\"\noutput_topic = \"{output}\"\ndead_letter_topic = \"{dlq}\"\ngroup_id = \"bench-{id}\"\n{}\n\
             [pipelines.campaigns.rules]\npath = \"{}\"\n{rules_extra}",
            self.brokers(),
            std::env::var("BENCH_KAFKA_PROPERTIES").unwrap_or_default(),
            std::env::var("BENCH_PIPELINE").unwrap_or_default(),
            rules.display()
        );
        let config = Config::load(&Sources {
            file: None,
            overlay: Some(&overlay),
            env: false,
        })?;
        let options = RunOptions {
            clock,
            mock_cluster: matches!(self, Broker::Mock(_)),
        };
        Ok((app::start(config, options).await?, input))
    }

    pub async fn create_topic(&self, name: &str, partitions: i32) -> Result<()> {
        match self {
            Broker::Mock(m) => Ok(m.create_topic(name, partitions, 1)?),
            Broker::Kafka { .. } => {
                let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
                    .set("bootstrap.servers", self.brokers())
                    .create()?;
                for r in admin
                    .create_topics(
                        &[NewTopic::new(name, partitions, TopicReplication::Fixed(1))],
                        &AdminOptions::new(),
                    )
                    .await?
                {
                    r.map_err(|(t, e)| anyhow::anyhow!("creating {t}: {e}"))?;
                }
                Ok(())
            }
        }
    }
}

/// The Apache Kafka version scripts/kafka.sh pins.
fn kafka_version() -> String {
    std::fs::read_to_string("scripts/kafka/pom.xml")
        .ok()
        .and_then(|pom| {
            pom.split("<kafka.version>")
                .skip(1)
                .filter_map(|rest| rest.split_once("</kafka.version>"))
                .map(|(v, _)| v.trim().to_string())
                .find(|v| v.chars().next().is_some_and(|c| c.is_ascii_digit()))
        })
        .unwrap_or_else(|| "4.x".into())
}

impl Drop for Broker {
    fn drop(&mut self) {
        if let Broker::Kafka { name, .. } = self {
            let _ = kafka_sh(&["wipe", name]);
        }
    }
}
