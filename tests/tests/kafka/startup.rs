//! Start-up against a real Apache Kafka broker with a SASL_PLAINTEXT listener (mechanism PLAIN,
//! its users in the broker's JAAS configuration): credentials the broker refuses are named as
//! an authentication failure, the right ones pass, and a topic the broker lacks (auto-creation
//! off) is named; the runner binary as an operator runs it.

use crate::brokers::{kafka_sh, Kafka, SERIAL};
use anyhow::{Context, Result};
use e2e_tests::*;
use runner::startup::{Cause, KafkaCheck};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const USER: &str = "runner";
const PASSWORD: &str = "right-password-1f6a";
const WRONG: &str = "wrong-password-93c2";

/// A single node with a SASL_PLAINTEXT listener beside its PLAINTEXT one (which the script and
/// the test's admin client use).
struct SaslKafka {
    kafka: Kafka,
    /// The SASL_PLAINTEXT listener, host:port.
    sasl: String,
}

impl SaslKafka {
    fn start() -> Result<SaslKafka> {
        let kafka = Kafka::single()?;
        // "node 1 broker 127.0.0.1:P controller 127.0.0.1:C PID"
        let status = kafka_sh(&["status", &kafka.name], &[])?;
        let words: Vec<&str> = status.split_whitespace().collect();
        let controller = words
            .iter()
            .position(|w| *w == "controller")
            .and_then(|i| words.get(i + 1))
            .context("the controller's address in kafka.sh status")?
            .to_string();
        let sasl = format!("127.0.0.1:{}", free_port()?);
        kafka.stop()?;
        let props = format!(
            "{}\nlisteners=PLAINTEXT://{plain},CONTROLLER://{controller},SASL_PLAINTEXT://{sasl}\n\
             advertised.listeners=PLAINTEXT://{plain},SASL_PLAINTEXT://{sasl}\n\
             listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT,SASL_PLAINTEXT:SASL_PLAINTEXT\n\
             sasl.enabled.mechanisms=PLAIN\n\
             listener.name.sasl_plaintext.plain.sasl.jaas.config=org.apache.kafka.common.security.plain.PlainLoginModule required user_{USER}=\"{PASSWORD}\";",
            crate::brokers::CLUSTER_PROPS,
            plain = kafka.brokers,
        );
        kafka_sh(&["start", &kafka.name], &[("KAFKA_SERVER_PROPS", &props)])?;
        Ok(SaslKafka { kafka, sasl })
    }

    /// The runner's `[kafka]` section for the SASL listener with `password`.
    fn kafka_section(&self, password: &str) -> String {
        format!(
            "[kafka]\nbrokers = \"{}\"\nsecurity_protocol = \"SASL_PLAINTEXT\"\n\
             sasl_mechanism = \"PLAIN\"\nsasl_username = \"{USER}\"\nsasl_password = \"{password}\"\n",
            self.sasl
        )
    }

    /// A check client as a pipeline's consumer would be configured, with `password`.
    fn check(&self, password: &str, topic: &str) -> Result<KafkaCheck> {
        let config = runner::config::Config::load(&runner::config::Sources {
            file: None,
            overlay: Some(&self.kafka_section(password)),
            env: false,
        })?;
        Ok(KafkaCheck::new(&config.kafka.consumer_config("g"), topic)?)
    }
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// Runs `runner run` on the SASL listener with `password` and input topic `topic`, the
/// start-up deadline `timeout`; it must fail by itself within that and a few seconds. Its log.
fn runner_fails(
    sasl: &SaslKafka,
    password: &str,
    topic: &str,
    timeout: Duration,
) -> Result<String> {
    let dir = tempfile::tempdir()?;
    let config = dir.path().join("runner.toml");
    std::fs::write(
        &config,
        format!(
            "{}[postgres]\nurl = \"{}\"\n[startup]\ntimeout = \"{}\"\n\
             [pipelines.campaigns]\ninput_topic = \"{topic}\"\ngroup_id = \"{}\"\n\
             [pipelines.campaigns.rules]\npath = \"{}\"\n",
            sasl.kafka_section(password),
            pg_admin_url(),
            humantime::format_duration(timeout),
            unique("group"),
            rules_wasm().display()
        ),
    )?;
    let log_path = dir.path().join("runner.log");
    let started = Instant::now();
    let mut child = ChildGuard(
        Command::new(runner_binary())
            .args(["run", "--config"])
            .arg(&config)
            .env_remove("RUST_LOG")
            .env("NO_COLOR", "1")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log_path)?)
            .spawn()?,
    );
    let status = loop {
        if let Some(s) = child.try_wait()? {
            break s;
        }
        anyhow::ensure!(
            started.elapsed() < timeout + Duration::from_secs(30),
            "the runner did not exit"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    let took = started.elapsed();
    let log = std::fs::read_to_string(&log_path)?;
    eprintln!("--- the runner's output ({took:?}, {status}) ---\n{log}---");
    anyhow::ensure!(!status.success(), "the runner must fail: {log}");
    anyhow::ensure!(
        took <= timeout + Duration::from_secs(4),
        "the runner took {took:?}, the deadline being {timeout:?}"
    );
    Ok(log)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sasl_credentials_refused_and_a_missing_topic_are_named() -> Result<()> {
    let _one = SERIAL.lock().await;
    let sasl = tokio::task::spawn_blocking(SaslKafka::start).await??;
    let input = unique("campaigns");
    sasl.kafka.create_topics(&[(&input, 1)]).await?;

    // The check client: the right credentials pass, wrong ones are named.
    let (ok, refused, missing) = {
        let right = sasl.check(PASSWORD, &input)?;
        let wrong = sasl.check(WRONG, &input)?;
        let absent = sasl.check(PASSWORD, "no-such-topic")?;
        tokio::task::spawn_blocking(move || {
            (
                right.check(Duration::from_secs(10)),
                wrong.check(Duration::from_secs(5)),
                absent.check(Duration::from_secs(10)),
            )
        })
        .await?
    };
    assert_eq!(ok, Ok(()));
    let refused = refused.expect_err("wrong credentials");
    assert!(
        matches!(refused, Cause::KafkaAuthentication { .. }),
        "{refused}"
    );
    assert_eq!(
        missing.expect_err("no such topic").code(),
        "input_topic_missing"
    );

    // The runner: one line naming the refusal and the brokers; the password never printed.
    let log = {
        let input = input.clone();
        let sasl = &sasl;
        tokio::task::block_in_place(|| runner_fails(sasl, WRONG, &input, Duration::from_secs(5)))?
    };
    let line = log
        .lines()
        .find(|l| l.starts_with("runner: error:"))
        .unwrap_or_default();
    assert!(
        line.contains(&format!(
            "Kafka brokers {} refused the runner's credentials",
            sasl.sasl
        )) && line.contains("kafka_auth_failed"),
        "{line}"
    );
    assert!(!log.contains(WRONG), "the password is never printed: {log}");

    // The right credentials and a topic the broker lacks (auto-creation is off).
    let absent = unique("campaigns");
    let log = tokio::task::block_in_place(|| {
        runner_fails(&sasl, PASSWORD, &absent, Duration::from_secs(5))
    })?;
    let line = log
        .lines()
        .find(|l| l.starts_with("runner: error:"))
        .unwrap_or_default();
    assert!(
        line.contains(&format!("input topic {absent} does not exist"))
            && line.contains("input_topic_missing"),
        "{line}"
    );
    assert!(
        !log.contains(PASSWORD),
        "the password is never printed: {log}"
    );
    Ok(())
}
