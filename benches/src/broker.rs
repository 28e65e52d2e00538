//! The Kafka-protocol broker a workload runs against: the tansu process when it is installed
//! (scripts/tansu.sh), librdkafka's mock cluster otherwise. Reports carry which one it was.

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

pub enum Broker {
    Tansu { port: u16 },
    Mock(MockCluster<'static, DefaultProducerContext>),
}

impl Broker {
    pub fn start() -> Result<Broker> {
        let script = std::path::Path::new("scripts/tansu.sh");
        if script.exists()
            && Command::new("bash")
                .arg(script)
                .arg("install")
                .output()
                .is_ok_and(|o| o.status.success())
        {
            let port = std::net::TcpListener::bind("127.0.0.1:0")?
                .local_addr()?
                .port();
            let out = Command::new("bash")
                .arg(script)
                .args(["start", &port.to_string()])
                .output()?;
            if out.status.success() {
                return Ok(Broker::Tansu { port });
            }
            eprintln!(
                "bench: tansu did not start ({}); using the mock cluster",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(Broker::Mock(MockCluster::new(1)?))
    }

    pub fn label(&self) -> &'static str {
        match self {
            Broker::Tansu { .. } => "tansu broker process",
            Broker::Mock(_) => "librdkafka mock cluster (in-process)",
        }
    }

    pub fn brokers(&self) -> String {
        match self {
            Broker::Tansu { port } => format!("127.0.0.1:{port}"),
            Broker::Mock(m) => m.bootstrap_servers(),
        }
    }

    /// Creates fresh input/output/dead-letter topics and starts a runner on them in-process;
    /// `rules_extra` is more TOML for its `[pipelines.campaigns.rules]` section. Returns it and its input topic.
    /// `BENCH_KAFKA_PROPERTIES`, TOML lines such as `"socket.nagle.disable" = "false"`, go to
    /// the runner's `[kafka.properties]`: for comparing client settings back to back.
    pub async fn start_runner(
        &self,
        url: &str,
        rules: &std::path::Path,
        rules_extra: &str,
    ) -> Result<(Running, String)> {
        let id = uuid::Uuid::new_v4();
        let (input, output, dlq) = (format!("in-{id}"), format!("out-{id}"), format!("dlq-{id}"));
        self.create_topic(&input, INPUT_PARTITIONS).await?;
        self.create_topic(&output, 4).await?;
        self.create_topic(&dlq, 1).await?;
        let overlay = format!(
            "[kafka]\nbrokers = \"{}\"\n[kafka.consumer_properties]\n\"session.timeout.ms\" = \"6000\"\n\"heartbeat.interval.ms\" = \"1000\"\n\
             [kafka.properties]\n{}\n[postgres]\nurl = \"{url}\"\n\
             [pipelines.campaigns]\ninput_topic = \"{input}\"\noutput_topic = \"{output}\"\ndead_letter_topic = \"{dlq}\"\ngroup_id = \"bench-{id}\"\n\
             [pipelines.campaigns.rules]\npath = \"{}\"\n{rules_extra}",
            self.brokers(),
            std::env::var("BENCH_KAFKA_PROPERTIES").unwrap_or_default(),
            rules.display()
        );
        let config = Config::load(&Sources {
            file: None,
            overlay: Some(&overlay),
            env: false,
        })?;
        Ok((app::start(config, RunOptions::default()).await?, input))
    }

    pub async fn create_topic(&self, name: &str, partitions: i32) -> Result<()> {
        match self {
            Broker::Mock(m) => Ok(m.create_topic(name, partitions, 1)?),
            Broker::Tansu { .. } => {
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

impl Drop for Broker {
    fn drop(&mut self) {
        if let Broker::Tansu { port } = self {
            let _ = Command::new("bash")
                .arg("scripts/tansu.sh")
                .args(["stop", &port.to_string()])
                .output();
        }
    }
}
