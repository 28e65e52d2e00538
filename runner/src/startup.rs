//! Start-up: before a pipeline consumes, the outside world it needs is checked — PostgreSQL
//! reachable and accepting the runner's user and database, the Kafka brokers reachable and
//! accepting its credentials, the input topic present — and while something is missing the
//! runner says what, naming the brokers, the topic or the host: in one log line when a cause
//! appears or changes, in `/health` and `/health/ready` (`starting` and the cause), and once
//! the start-up deadline (`[startup] timeout`, from the process's start) has passed, in the
//! error it exits with, or, with `on_timeout = "wait"`, in `startup_failed` and a log line a
//! minute while it goes on checking. The Kafka check also serves the broker probe of a running
//! pipeline (`source::probe`), so a topic deleted later or credentials revoked are reported too.

use crate::db::{self, DbError};
use crate::events::Events;
use crate::pipelines::Shared;
use rdkafka::error::KafkaError;
use rdkafka::producer::{BaseProducer, DeliveryResult, Producer, ProducerContext};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::{ClientConfig, ClientContext};
use serde::Deserialize;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Time between two checks while something is missing.
const RECHECK: Duration = Duration::from_secs(1);
/// Past the deadline, when waiting on, the causes are logged again this often.
const REMIND: Duration = Duration::from_secs(60);
/// Longest wait for the brokers' answer to one check.
const KAFKA_ANSWER: Duration = Duration::from_secs(2);

/// `[startup]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawStartup {
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    pub on_timeout: OnTimeout,
}

/// What the runner does when something it needs is still missing at the start-up deadline.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnTimeout {
    /// Exit non-zero, the causes in the error.
    Exit,
    /// Go on checking and saying why (`startup_failed` in `/health`, a log line a minute).
    Wait,
}

/// The checked section.
#[derive(Debug, Clone, Copy)]
pub struct StartupConfig {
    pub timeout: Duration,
    pub on_timeout: OnTimeout,
}

impl RawStartup {
    /// Checks the section; problems are added to `problems`.
    pub fn validate(&self, problems: &mut Vec<String>) -> StartupConfig {
        if self.timeout.is_zero() {
            problems.push("startup.timeout must be above zero".into());
        }
        StartupConfig {
            timeout: self.timeout,
            on_timeout: self.on_timeout,
        }
    }
}

impl StartupConfig {
    /// The deadline of a start beginning now.
    pub fn deadline(&self) -> Deadline {
        Deadline {
            at: Instant::now() + self.timeout,
            timeout: self.timeout,
            on_timeout: self.on_timeout,
        }
    }
}

/// The start-up deadline every pipeline of the process shares.
#[derive(Debug, Clone, Copy)]
pub struct Deadline {
    pub at: Instant,
    pub timeout: Duration,
    pub on_timeout: OnTimeout,
}

/// Something a pipeline needs from outside that is missing.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Cause {
    #[error("Kafka brokers {brokers} cannot be reached: {detail}")]
    KafkaUnreachable { brokers: String, detail: String },
    #[error(
        "Kafka brokers {brokers} refused the runner's credentials (SASL authentication failed): {detail}"
    )]
    KafkaAuthentication { brokers: String, detail: String },
    #[error("input topic {topic} does not exist on Kafka brokers {brokers}")]
    TopicMissing { topic: String, brokers: String },
    #[error(
        "the runner may not read input topic {topic} on Kafka brokers {brokers} (not authorized)"
    )]
    TopicUnauthorized { topic: String, brokers: String },
    #[error("input topic {topic} is not available on Kafka brokers {brokers}: {detail}")]
    TopicUnavailable {
        topic: String,
        brokers: String,
        detail: String,
    },
    #[error("PostgreSQL at {host} cannot be reached: {detail}")]
    PostgresUnreachable { host: String, detail: String },
    #[error("PostgreSQL at {host} refused user {user:?} (authentication failed): {detail}")]
    PostgresAuthentication {
        host: String,
        user: String,
        detail: String,
    },
    #[error("PostgreSQL at {host} has no database {database:?}")]
    PostgresDatabaseMissing { host: String, database: String },
    #[error("PostgreSQL at {host} does not take connections: {detail}")]
    PostgresUnavailable { host: String, detail: String },
}

impl Cause {
    /// The cause's code in `/health`, `/health/ready` and the logs.
    pub fn code(&self) -> &'static str {
        match self {
            Cause::KafkaUnreachable { .. } => "kafka_unreachable",
            Cause::KafkaAuthentication { .. } => "kafka_auth_failed",
            Cause::TopicMissing { .. } => "input_topic_missing",
            Cause::TopicUnauthorized { .. } => "input_topic_unauthorized",
            Cause::TopicUnavailable { .. } => "input_topic_unavailable",
            Cause::PostgresUnreachable { .. } => "postgres_unreachable",
            Cause::PostgresAuthentication { .. } => "postgres_auth_failed",
            Cause::PostgresDatabaseMissing { .. } => "postgres_database_missing",
            Cause::PostgresUnavailable { .. } => "postgres_unavailable",
        }
    }

    /// Every code a cause found by the Kafka check can have.
    pub const KAFKA_CODES: [&'static str; 5] = [
        "kafka_unreachable",
        "kafka_auth_failed",
        "input_topic_missing",
        "input_topic_unauthorized",
        "input_topic_unavailable",
    ];
}

/// A duration as people read it, to the millisecond.
fn shown(d: Duration) -> String {
    humantime::format_duration(Duration::from_millis(d.as_millis() as u64)).to_string()
}

/// The causes, each as a sentence followed by its code, on one line.
fn sentence(causes: &[Cause]) -> String {
    causes
        .iter()
        .map(|c| format!("{c} ({})", c.code()))
        .collect::<Vec<_>>()
        .join("; ")
}

/// A pipeline could not start before the start-up deadline.
#[derive(Debug, thiserror::Error)]
#[error("the start-up deadline ({}) passed: {}", humantime::format_duration(*.timeout), sentence(.causes))]
pub struct StartupFailed {
    pub timeout: Duration,
    pub causes: Vec<Cause>,
}

/// The runner was told to stop while it waited to start.
#[derive(Debug, thiserror::Error)]
#[error("stopped during start-up")]
pub struct StoppedDuringStartup;

/// Waits until what the pipeline of `events` needs from outside is there: PostgreSQL (the
/// shared connection string) and, through a client made from its consumer configuration
/// `consumer`, the Kafka brokers and `topic`. Checks both every second and reports what is
/// missing (see the module's documentation). Err([`StartupFailed`]) past the deadline when
/// start-up is to exit then; Err([`StoppedDuringStartup`]) when the runner is stopped.
pub async fn wait_until_reachable(
    shared: &Shared,
    events: &Events,
    consumer: &ClientConfig,
    topic: &str,
) -> anyhow::Result<()> {
    let deadline = shared.startup;
    let pipeline = events.pipeline();
    let kafka = std::sync::Arc::new(
        KafkaCheck::new(consumer, topic)
            .map_err(|e| anyhow::anyhow!("creating a Kafka client to check the brokers: {e}"))?,
    );
    let mut stop = shared.shutdown.clone();
    let began = Instant::now();
    let mut said: Vec<&'static str> = Vec::new();
    let mut reminded: Option<Instant> = None;
    loop {
        // Before the deadline an attempt ends by it (half a second at least); past it (waiting
        // on), each has its own limits: the brokers' answer, PostgreSQL's connect timeout.
        let remaining = deadline.at.saturating_duration_since(Instant::now());
        let (kafka_budget, pg_budget) = if remaining.is_zero() {
            (KAFKA_ANSWER, None)
        } else {
            let at_least = remaining.max(Duration::from_millis(500));
            (at_least.min(KAFKA_ANSWER), Some(at_least))
        };
        let k = kafka.clone();
        let (pg, kafka_result) = tokio::join!(
            check_postgres(shared.postgres.as_str(), pg_budget),
            tokio::task::spawn_blocking(move || k.check(kafka_budget)),
        );
        let mut causes: Vec<Cause> = pg.err().into_iter().collect();
        match kafka_result {
            Ok(Err(c)) => causes.push(c),
            Ok(Ok(())) => {}
            Err(e) => anyhow::bail!("the Kafka check failed: {e}"),
        }
        if causes.is_empty() {
            if !said.is_empty() {
                tracing::info!(
                    pipeline,
                    waited_s = began.elapsed().as_secs(),
                    "Start-up: everything the pipeline needs is there now; starting."
                );
            }
            return Ok(());
        }
        let codes: Vec<&'static str> = causes.iter().map(Cause::code).collect();
        let past = Instant::now() >= deadline.at;
        events.startup_waits(
            &causes
                .iter()
                .map(|c| (c.code(), c.to_string()))
                .collect::<Vec<_>>(),
            past,
        );
        if past && deadline.on_timeout == OnTimeout::Exit {
            return Err(StartupFailed {
                timeout: deadline.timeout,
                causes,
            }
            .into());
        }
        if past {
            if reminded.is_none_or(|at| at.elapsed() >= REMIND) || codes != said {
                tracing::error!(
                    pipeline,
                    cause = %codes.join(","),
                    detail = %sentence(&causes),
                    timeout = %humantime::format_duration(deadline.timeout),
                    "Start-up deadline passed; still waiting (startup.on_timeout = \"wait\"), checking every second. Said again in a minute if it lasts."
                );
                reminded = Some(Instant::now());
            }
        } else if codes != said {
            tracing::warn!(
                pipeline,
                cause = %codes.join(","),
                detail = %sentence(&causes),
                deadline_in_s = deadline.at.saturating_duration_since(Instant::now()).as_secs(),
                "Start-up waits; checking every second until the start-up deadline."
            );
        }
        said = codes;
        let pause = if past {
            RECHECK
        } else {
            RECHECK.min(deadline.at.saturating_duration_since(Instant::now()))
        };
        if !crate::retry::sleep(pause, &mut stop).await {
            return Err(StoppedDuringStartup.into());
        }
    }
}

/// Where a PostgreSQL connection string points: `host:port`, comma-separated.
fn postgres_hosts(config: &tokio_postgres::Config) -> String {
    let ports = config.get_ports();
    let port = |i: usize| ports.get(i).or(ports.first()).copied().unwrap_or(5432);
    let hosts: Vec<String> = config
        .get_hosts()
        .iter()
        .enumerate()
        .map(|(i, h)| match h {
            tokio_postgres::config::Host::Tcp(name) => format!("{name}:{}", port(i)),
            tokio_postgres::config::Host::Unix(dir) => format!("{}:{}", dir.display(), port(i)),
        })
        .collect();
    if hosts.is_empty() {
        format!("localhost:{}", port(0))
    } else {
        hosts.join(",")
    }
}

/// Connects to PostgreSQL once (bounded by the connect timeout, and by `budget` when given):
/// Ok, or what is wrong.
pub async fn check_postgres(url: &str, budget: Option<Duration>) -> Result<(), Cause> {
    let config = db::connect_config(url).ok();
    let host = config
        .as_ref()
        .map(postgres_hosts)
        .unwrap_or_else(|| "<unparsable connection string>".into());
    let user = config
        .as_ref()
        .and_then(|c| c.get_user().map(str::to_string))
        .unwrap_or_default();
    let database = config
        .as_ref()
        .and_then(|c| c.get_dbname().map(str::to_string))
        .unwrap_or_else(|| user.clone());
    let attempt = async {
        match budget {
            Some(b) => tokio::time::timeout(b, db::connect(url)).await.ok(),
            None => Some(db::connect(url).await),
        }
    };
    let error = match attempt.await {
        Some(Ok(_client)) => return Ok(()),
        Some(Err(e)) => e,
        None => {
            return Err(Cause::PostgresUnreachable {
                host,
                detail: format!("no answer within {}", shown(budget.unwrap_or_default())),
            })
        }
    };
    let pg = match &error {
        DbError::Unavailable(e) | DbError::Statement(e) => e.as_db_error(),
        _ => None,
    };
    Err(match pg {
        // Class 28: invalid authorization specification (no such role, wrong password, no
        // pg_hba.conf entry).
        Some(d) if d.code().code().starts_with("28") => Cause::PostgresAuthentication {
            host,
            user,
            detail: format!("{} (SQLSTATE {})", d.message(), d.code().code()),
        },
        Some(d) if d.code().code() == "3D000" => Cause::PostgresDatabaseMissing { host, database },
        Some(d) => Cause::PostgresUnavailable {
            host,
            detail: format!("{} (SQLSTATE {})", d.message(), d.code().code()),
        },
        None => Cause::PostgresUnreachable {
            host,
            detail: match &error {
                DbError::Unavailable(e) => match std::error::Error::source(e) {
                    Some(source) => format!("{e}: {source}"),
                    None => e.to_string(),
                },
                other => other.to_string(),
            },
        },
    })
}

/// Keeps the last failure librdkafka reported about the brokers, with its reason, for the
/// check to name it. The check client's own log lines and errors go to debug, secrets
/// redacted: the check says what they mean, and the pipeline's other clients log theirs.
#[derive(Debug, Default)]
pub struct CheckContext {
    last: Mutex<Option<(RDKafkaErrorCode, String)>>,
    secrets: Vec<String>,
}

impl ClientContext for CheckContext {
    fn log(&self, level: rdkafka::config::RDKafkaLogLevel, fac: &str, message: &str) {
        let message = crate::logging::redact(message, &self.secrets);
        tracing::debug!(target: "librdkafka", client = "startup check", ?level, facility = fac, "{message}");
    }

    fn error(&self, error: KafkaError, reason: &str) {
        let code = error
            .rdkafka_error_code()
            .unwrap_or(RDKafkaErrorCode::Unknown);
        let reason = without_repeat_count(&crate::logging::redact(reason, &self.secrets));
        tracing::debug!(target: "librdkafka", client = "startup check", error = %error, reason, "The Kafka client reports an error.");
        let mut last = self.last.lock().expect("check context lock");
        // "1/1 brokers are down" says less than the failure that came before it.
        if code == RDKafkaErrorCode::AllBrokersDown && last.is_some() {
            return;
        }
        *last = Some((code, reason));
    }
}

/// librdkafka's reason without the count of identical failures it suppressed before it (", 1
/// identical error(s) suppressed"): the check reports one failure, not their number.
fn without_repeat_count(reason: &str) -> String {
    const MARK: &str = " identical error(s) suppressed";
    let Some(at) = reason.find(MARK) else {
        return reason.to_string();
    };
    let digits = reason[..at].trim_end_matches(|c: char| c.is_ascii_digit());
    let end = at + MARK.len();
    if let Some(before) = digits.strip_suffix(", ") {
        format!("{before}{}", &reason[end..])
    } else if let (Some(before), Some(after)) =
        (digits.strip_suffix(" ("), reason[end..].strip_prefix(')'))
    {
        format!("{before}{after}")
    } else {
        reason.to_string()
    }
}

impl ProducerContext for CheckContext {
    type DeliveryOpaque = ();
    fn delivery(&self, _: &DeliveryResult<'_>, _: ()) {}
}

/// A Kafka client that asks the brokers for a topic's metadata and says what is wrong: the
/// brokers unreachable, the credentials refused, the topic missing. It has the consumer's
/// brokers, security settings and properties, joins no group and never creates a topic.
pub struct KafkaCheck {
    client: BaseProducer<CheckContext>,
    brokers: String,
    topic: String,
}

impl std::fmt::Debug for KafkaCheck {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaCheck")
            .field("brokers", &self.brokers)
            .field("topic", &self.topic)
            .finish()
    }
}

/// Properties of a pipeline's consumer that a client asking for metadata has no use for.
const CONSUMER_ONLY: &[&str] = &[
    "group.id",
    "enable.auto.commit",
    "enable.auto.offset.store",
    "isolation.level",
    "auto.offset.reset",
    "enable.partition.eof",
    "fetch.queue.backoff.ms",
];

impl KafkaCheck {
    /// A check client made from a pipeline's consumer configuration, for `topic`.
    pub fn new(consumer: &ClientConfig, topic: &str) -> rdkafka::error::KafkaResult<KafkaCheck> {
        // A copy, not `config_map()`: that view hides the secrets the client needs.
        let mut config = consumer.clone();
        for k in CONSUMER_ONLY {
            config.remove(k);
        }
        // Asking for a topic's metadata must not create it (the default for a producer).
        config.set("allow.auto.create.topics", "false");
        let brokers = consumer
            .get("bootstrap.servers")
            .unwrap_or_default()
            .to_string();
        let context = CheckContext {
            last: Mutex::default(),
            secrets: crate::logging::secrets_of(&config),
        };
        Ok(KafkaCheck {
            client: config.create_with_context(context)?,
            brokers,
            topic: topic.to_string(),
        })
    }

    /// Asks for the topic's metadata, waiting `timeout` at most for an answer (blocking).
    pub fn check(&self, timeout: Duration) -> Result<(), Cause> {
        let answer = self
            .client
            .client()
            .fetch_metadata(Some(&self.topic), timeout);
        // Serve the client's events (log lines, and errors: the brokers' failures with
        // librdkafka's reasons): everything queued, and what arrives within 10 ms.
        self.client.poll(Duration::from_millis(10));
        let (brokers, topic) = (self.brokers.clone(), self.topic.clone());
        let metadata = match answer {
            Ok(m) => {
                *self
                    .client
                    .context()
                    .last
                    .lock()
                    .expect("check context lock") = None;
                m
            }
            Err(e) => {
                let last = self
                    .client
                    .context()
                    .last
                    .lock()
                    .expect("check context lock")
                    .clone();
                return Err(match last {
                    Some((
                        RDKafkaErrorCode::Authentication
                        | RDKafkaErrorCode::SaslAuthenticationFailed,
                        reason,
                    )) => Cause::KafkaAuthentication {
                        brokers,
                        detail: reason,
                    },
                    Some((_, reason)) => Cause::KafkaUnreachable {
                        brokers,
                        detail: reason,
                    },
                    None => Cause::KafkaUnreachable {
                        brokers,
                        detail: format!(
                            "no answer to a metadata request within {} ({e})",
                            shown(timeout)
                        ),
                    },
                });
            }
        };
        let Some(t) = metadata.topics().iter().find(|t| t.name() == self.topic) else {
            return Err(Cause::TopicMissing { topic, brokers });
        };
        match t.error().map(RDKafkaErrorCode::from) {
            None if !t.partitions().is_empty() => Ok(()),
            None | Some(RDKafkaErrorCode::UnknownTopicOrPartition) => {
                Err(Cause::TopicMissing { topic, brokers })
            }
            Some(RDKafkaErrorCode::TopicAuthorizationFailed) => {
                Err(Cause::TopicUnauthorized { topic, brokers })
            }
            Some(other) => Err(Cause::TopicUnavailable {
                topic,
                brokers,
                detail: other.to_string(),
            }),
        }
    }
}

/// What the broker probe of a running pipeline found (`source::probe`): the brokers
/// unreachable or refusing the credentials mark Kafka unreachable; each other cause is a
/// condition of its own (degraded, not ready). Changes are logged.
pub fn probed(events: &Events, result: &Result<(), Cause>) {
    let code = result.as_ref().err().map(Cause::code);
    let reachable = !matches!(
        result,
        Err(Cause::KafkaUnreachable { .. } | Cause::KafkaAuthentication { .. })
    );
    let before = events.stats();
    if events.kafka_reachable(reachable) {
        if reachable {
            tracing::info!(pipeline = events.pipeline(), "Kafka answers again.");
        } else {
            tracing::warn!(
                pipeline = events.pipeline(),
                cause = code.unwrap_or("-"),
                detail = %result.as_ref().err().map(Cause::to_string).unwrap_or_default(),
                "Kafka does not answer metadata requests; health is degraded."
            );
        }
    }
    for c in Cause::KAFKA_CODES {
        if c == "kafka_unreachable" {
            continue;
        }
        let holds = code == Some(c);
        let held = before.conditions.contains(&c);
        if holds != held {
            events.condition(c, holds);
            if holds {
                tracing::warn!(
                    pipeline = events.pipeline(),
                    cause = c,
                    detail = %result.as_ref().err().map(Cause::to_string).unwrap_or_default(),
                    "The broker probe finds the pipeline cannot read its input; health is degraded, not ready."
                );
            } else {
                tracing::info!(
                    pipeline = events.pipeline(),
                    cause = c,
                    "The broker probe finds the cause gone."
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rdkafka::mocking::MockCluster;

    fn consumer(brokers: &str) -> ClientConfig {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", brokers).set("group.id", "g");
        c
    }

    fn closed_port() -> u16 {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    }

    #[test]
    fn a_closed_port_is_named_as_unreachable() {
        let brokers = format!("127.0.0.1:{}", closed_port());
        let check = KafkaCheck::new(&consumer(&brokers), "t").unwrap();
        let e = check.check(Duration::from_millis(500)).unwrap_err();
        assert_eq!(e.code(), "kafka_unreachable", "{e}");
        assert!(e.to_string().contains(&brokers), "{e}");
        // Again: librdkafka does not report an identical failure twice; the cause stays.
        let e = check.check(Duration::from_millis(500)).unwrap_err();
        assert_eq!(e.code(), "kafka_unreachable", "{e}");
    }

    #[test]
    fn a_missing_topic_is_named_and_not_created() {
        let cluster = MockCluster::new(1).unwrap();
        cluster.create_topic("there", 2, 1).unwrap();
        let c = consumer(&cluster.bootstrap_servers());
        let check = KafkaCheck::new(&c, "absent").unwrap();
        for _ in 0..2 {
            let e = check.check(Duration::from_secs(5)).unwrap_err();
            assert_eq!(
                e,
                Cause::TopicMissing {
                    topic: "absent".into(),
                    brokers: cluster.bootstrap_servers()
                }
            );
        }
        KafkaCheck::new(&c, "there")
            .unwrap()
            .check(Duration::from_secs(5))
            .unwrap();
    }

    #[tokio::test]
    async fn a_closed_postgres_port_is_named() {
        let port = closed_port();
        let e = check_postgres(
            &format!("host=127.0.0.1 port={port} user=runner dbname=x"),
            Some(Duration::from_secs(5)),
        )
        .await
        .unwrap_err();
        assert_eq!(e.code(), "postgres_unreachable", "{e}");
        assert!(e.to_string().contains(&format!("127.0.0.1:{port}")), "{e}");
    }

    #[test]
    fn the_probe_keeps_readiness_honest_after_start() {
        let e = Events::default();
        e.running(true);
        e.assignment(Some(1));
        let gone = Cause::TopicMissing {
            topic: "t".into(),
            brokers: "b:1".into(),
        };
        probed(&e, &Err(gone));
        assert_eq!(e.stats().not_ready(), ["input_topic_missing"]);
        assert_eq!(e.stats().degraded(), ["input_topic_missing"]);
        probed(&e, &Ok(()));
        assert!(e.stats().not_ready().is_empty());
        let refused = Cause::KafkaAuthentication {
            brokers: "b:1".into(),
            detail: "Authentication failed".into(),
        };
        probed(&e, &Err(refused));
        assert_eq!(
            e.stats().not_ready(),
            ["kafka_auth_failed", "kafka_unreachable"]
        );
        probed(&e, &Ok(()));
        assert!(e.stats().degraded().is_empty());
    }

    #[test]
    fn the_count_of_suppressed_repeats_is_left_out() {
        assert_eq!(
            without_repeat_count("b:1/bootstrap: Connect to ipv4#127.0.0.1:1 failed: Connection refused (after 0ms in state CONNECT, 12 identical error(s) suppressed)"),
            "b:1/bootstrap: Connect to ipv4#127.0.0.1:1 failed: Connection refused (after 0ms in state CONNECT)"
        );
        assert_eq!(
            without_repeat_count("Authentication failed (3 identical error(s) suppressed)"),
            "Authentication failed"
        );
        assert_eq!(
            without_repeat_count("1/1 brokers are down"),
            "1/1 brokers are down"
        );
    }

    #[test]
    fn postgres_connections_get_a_timeout_unless_the_string_sets_one() {
        let c = db::connect_config("host=db user=runner").unwrap();
        assert_eq!(c.get_connect_timeout(), Some(&db::DEFAULT_CONNECT_TIMEOUT));
        let c = db::connect_config("postgresql://runner@db/x?connect_timeout=3").unwrap();
        assert_eq!(c.get_connect_timeout(), Some(&Duration::from_secs(3)));
        let c = db::connect_config("host=a,b port=1,2 user=runner").unwrap();
        assert_eq!(postgres_hosts(&c), "a:1,b:2");
    }

    #[test]
    fn the_section_reads_both_policies() {
        for (text, want) in [("exit", OnTimeout::Exit), ("wait", OnTimeout::Wait)] {
            let raw: RawStartup =
                toml::from_str(&format!("timeout = \"5s\"\non_timeout = \"{text}\"\n")).unwrap();
            let mut problems = Vec::new();
            let c = raw.validate(&mut problems);
            assert!(problems.is_empty());
            assert_eq!((c.timeout, c.on_timeout), (Duration::from_secs(5), want));
        }
        assert!(
            toml::from_str::<RawStartup>("timeout = \"5s\"\non_timeout = \"retry\"\n").is_err()
        );
    }
}
