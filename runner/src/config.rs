//! Configuration: the embedded defaults, then the pipeline's TOML file, then `RUNNER__…`
//! environment variables, deserialised strictly (unknown keys are errors) into [`RawConfig`]
//! and checked into [`Config`], the only form the rest of the runner sees.

use figment::providers::{Env, Format, Toml};
use figment::Figment;
use rdkafka::ClientConfig;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The defaults, documented; also what `runner config defaults` prints.
pub const DEFAULTS: &str = include_str!("default.toml");

/// Prefix of environment overrides; `__` separates nesting levels.
pub const ENV_PREFIX: &str = "RUNNER__";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("configuration could not be read: {0}")]
    Load(#[from] Box<figment::Error>),
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    pub kafka: RawKafka,
    pub postgres: RawPostgres,
    pub subscribers: RawSubscribers,
    pub rules: RawRules,
    pub pipeline: RawPipeline,
    pub status: RawStatus,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawStatus {
    /// Address of the HTTP status endpoint (/health, /status, /metrics); empty: none.
    pub listen: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawKafka {
    pub brokers: String,
    pub group_id: String,
    pub input_topic: String,
    pub output_topic: String,
    pub dead_letter_topic: String,
    pub security_protocol: Option<String>,
    pub sasl_mechanism: Option<String>,
    pub sasl_username: Option<String>,
    pub sasl_password: Option<String>,
    pub ssl_ca_location: Option<PathBuf>,
    #[serde(default)]
    pub properties: BTreeMap<String, String>,
    #[serde(default)]
    pub consumer_properties: BTreeMap<String, String>,
    #[serde(default)]
    pub producer_properties: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPostgres {
    pub url: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSubscribers {
    /// A full reload as a safety net; changes arrive within a second through LISTEN/NOTIFY.
    #[serde(with = "humantime_serde")]
    pub full_resync_interval: Duration,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRules {
    pub path: PathBuf,
    #[serde(with = "humantime_serde")]
    pub call_timeout: Duration,
    #[serde(with = "humantime_serde")]
    pub call_timeout_per_1000_subscribers: Duration,
    pub memory_limit_mib: u64,
    /// Watch the rules file and swap in a new version when it changes.
    pub watch: bool,
    /// How long the file must stay unchanged before it is loaded.
    #[serde(with = "humantime_serde")]
    pub settle: Duration,
    /// Directory for compiled components; empty: no cache.
    pub compile_cache_dir: PathBuf,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPipeline {
    pub batch_max_messages: usize,
    #[serde(with = "humantime_serde")]
    pub batch_linger: Duration,
    pub batch_max_drafts: usize,
    pub parallel_units: usize,
    pub max_message_bytes: usize,
    #[serde(with = "humantime_serde")]
    pub sink_retry_max_backoff: Duration,
    #[serde(with = "humantime_serde")]
    pub shutdown_timeout: Duration,
}

/// Where a configuration comes from, in increasing precedence.
#[derive(Debug, Default, Clone)]
pub struct Sources<'a> {
    pub file: Option<&'a Path>,
    /// TOML text layered over the file (used by `runner demo` and tests).
    pub overlay: Option<&'a str>,
    /// Read `RUNNER__…` environment variables.
    pub env: bool,
}

impl RawConfig {
    pub fn load(sources: &Sources<'_>) -> Result<RawConfig, ConfigError> {
        let mut fig = Figment::from(Toml::string(DEFAULTS));
        if let Some(file) = sources.file {
            if !file.exists() {
                return Err(ConfigError::Invalid(format!(
                    "config file {} does not exist",
                    file.display()
                )));
            }
            fig = fig.merge(Toml::file_exact(file));
        }
        if let Some(text) = sources.overlay {
            fig = fig.merge(Toml::string(text));
        }
        if sources.env {
            fig = fig.merge(Env::prefixed(ENV_PREFIX).split("__"));
        }
        fig.extract().map_err(|e| ConfigError::Load(Box::new(e)))
    }
}

/// The checked configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub kafka: KafkaConfig,
    pub postgres_url: String,
    pub subscribers_full_resync: Duration,
    pub rules: RulesConfig,
    pub pipeline: PipelineConfig,
    /// Where the HTTP status endpoint listens, if anywhere.
    pub status_listen: Option<std::net::SocketAddr>,
}

#[derive(Clone)]
pub struct KafkaConfig {
    pub group_id: String,
    pub input_topic: String,
    pub output_topic: String,
    pub dead_letter_topic: String,
    /// Properties for every client (brokers and security included), then per role.
    common: BTreeMap<String, String>,
    consumer: BTreeMap<String, String>,
    producer: BTreeMap<String, String>,
}

#[derive(Debug, Clone)]
pub struct RulesConfig {
    pub path: PathBuf,
    pub call_timeout: Duration,
    pub call_timeout_per_1000_subscribers: Duration,
    pub memory_limit_bytes: usize,
    pub watch: bool,
    pub settle: Duration,
    pub compile_cache_dir: Option<PathBuf>,
}

#[derive(Debug, Clone)]
pub struct PipelineConfig {
    pub batch_max_messages: usize,
    pub batch_linger: Duration,
    pub batch_max_drafts: usize,
    /// Units of different partitions committed at once, each on its own PostgreSQL connection.
    pub parallel_units: usize,
    pub max_message_bytes: usize,
    pub sink_retry_max_backoff: Duration,
    pub shutdown_timeout: Duration,
}

impl std::fmt::Debug for KafkaConfig {
    /// Secrets (any property whose name mentions a password or secret) are never printed.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let redact = |m: &BTreeMap<String, String>| -> BTreeMap<String, String> {
            m.iter()
                .map(|(k, v)| {
                    let secret = k.contains("password") || k.contains("secret");
                    (
                        k.clone(),
                        if secret {
                            "<redacted>".into()
                        } else {
                            v.clone()
                        },
                    )
                })
                .collect()
        };
        f.debug_struct("KafkaConfig")
            .field("group_id", &self.group_id)
            .field("input_topic", &self.input_topic)
            .field("output_topic", &self.output_topic)
            .field("dead_letter_topic", &self.dead_letter_topic)
            .field("properties", &redact(&self.common))
            .field("consumer_properties", &redact(&self.consumer))
            .field("producer_properties", &redact(&self.producer))
            .finish()
    }
}

/// Properties the runner sets itself because its delivery protocol depends on them.
const OWNED_CONSUMER_PROPS: &[&str] = &[
    "group.id",
    "enable.auto.offset.store",
    "enable.auto.commit",
    "isolation.level",
    "transactional.id",
    "enable.idempotence",
];

impl Config {
    pub fn load(sources: &Sources<'_>) -> Result<Config, ConfigError> {
        RawConfig::load(sources)?.validate()
    }
}

impl RawConfig {
    pub fn validate(self) -> Result<Config, ConfigError> {
        let mut problems = Vec::new();
        let k = &self.kafka;
        for (name, v) in [
            ("kafka.brokers", &k.brokers),
            ("kafka.group_id", &k.group_id),
            ("kafka.input_topic", &k.input_topic),
            ("kafka.output_topic", &k.output_topic),
            ("kafka.dead_letter_topic", &k.dead_letter_topic),
            ("postgres.url", &self.postgres.url),
        ] {
            if v.trim().is_empty() {
                problems.push(format!("{name} must not be empty"));
            }
        }
        let topics = [&k.input_topic, &k.output_topic, &k.dead_letter_topic];
        if topics[0] == topics[1] || topics[0] == topics[2] || topics[1] == topics[2] {
            problems.push(format!(
                "kafka.input_topic, kafka.output_topic and kafka.dead_letter_topic must be three different topics (got {:?}, {:?}, {:?})",
                topics[0], topics[1], topics[2]
            ));
        }
        if let Err(e) = self.postgres.url.parse::<tokio_postgres::Config>() {
            problems.push(format!(
                "postgres.url is not a valid connection string: {e}"
            ));
        }
        let mut common = k.properties.clone();
        common.insert("bootstrap.servers".into(), k.brokers.clone());
        for (key, v) in [
            ("security.protocol", &k.security_protocol),
            ("sasl.mechanisms", &k.sasl_mechanism),
            ("sasl.username", &k.sasl_username),
            ("sasl.password", &k.sasl_password),
        ] {
            if let Some(v) = v {
                common.insert(key.into(), v.clone());
            }
        }
        if let Some(ca) = &k.ssl_ca_location {
            if !ca.exists() {
                problems.push(format!(
                    "kafka.ssl_ca_location {} does not exist",
                    ca.display()
                ));
            }
            common.insert("ssl.ca.location".into(), ca.display().to_string());
        }
        if k.sasl_mechanism
            .as_deref()
            .is_some_and(|m| m.starts_with("SCRAM"))
            && (k.sasl_username.is_none() || k.sasl_password.is_none())
        {
            problems.push(
                "kafka.sasl_mechanism SCRAM-* needs kafka.sasl_username and kafka.sasl_password"
                    .into(),
            );
        }
        for key in OWNED_CONSUMER_PROPS {
            if k.consumer_properties.contains_key(*key)
                || k.producer_properties.contains_key(*key)
                || k.properties.contains_key(*key)
            {
                problems.push(format!(
                    "kafka property {key} is set by the runner (its delivery protocol depends on it); remove it"
                ));
            }
        }
        let p = &self.pipeline;
        if p.batch_max_messages == 0 {
            problems.push("pipeline.batch_max_messages must be at least 1".into());
        }
        if p.batch_max_drafts == 0 {
            problems.push("pipeline.batch_max_drafts must be at least 1".into());
        }
        if p.parallel_units == 0 {
            problems.push("pipeline.parallel_units must be at least 1".into());
        }
        if p.max_message_bytes == 0 {
            problems.push("pipeline.max_message_bytes must be at least 1".into());
        }
        let r = &self.rules;
        if r.call_timeout.is_zero() {
            problems.push("rules.call_timeout must be positive".into());
        }
        if !(1..=4096).contains(&r.memory_limit_mib) {
            problems.push(format!(
                "rules.memory_limit_mib must be between 1 and 4096 (got {})",
                r.memory_limit_mib
            ));
        }
        if self.subscribers.full_resync_interval.is_zero() {
            problems.push("subscribers.full_resync_interval must be positive".into());
        }
        if !problems.is_empty() {
            return Err(ConfigError::Invalid(problems.join("; ")));
        }
        Ok(Config {
            kafka: KafkaConfig {
                group_id: k.group_id.clone(),
                input_topic: k.input_topic.clone(),
                output_topic: k.output_topic.clone(),
                dead_letter_topic: k.dead_letter_topic.clone(),
                common,
                consumer: k.consumer_properties.clone(),
                producer: k.producer_properties.clone(),
            },
            postgres_url: self.postgres.url,
            subscribers_full_resync: self.subscribers.full_resync_interval,
            rules: RulesConfig {
                path: r.path.clone(),
                call_timeout: r.call_timeout,
                call_timeout_per_1000_subscribers: r.call_timeout_per_1000_subscribers,
                memory_limit_bytes: (r.memory_limit_mib as usize) << 20,
                watch: r.watch,
                settle: r.settle,
                compile_cache_dir: Some(r.compile_cache_dir.clone())
                    .filter(|p| !p.as_os_str().is_empty()),
            },
            status_listen: match self.status.listen.trim() {
                "" => None,
                s => Some(s.parse().map_err(|e| {
                    ConfigError::Invalid(format!("status.listen {s:?} is not host:port: {e}"))
                })?),
            },
            pipeline: PipelineConfig {
                batch_max_messages: p.batch_max_messages,
                batch_linger: p.batch_linger,
                batch_max_drafts: p.batch_max_drafts,
                parallel_units: p.parallel_units,
                max_message_bytes: p.max_message_bytes,
                sink_retry_max_backoff: p.sink_retry_max_backoff,
                shutdown_timeout: p.shutdown_timeout,
            },
        })
    }
}

/// The producer's defaults that shape what reaches the broker (the user's properties override
/// them), shared with the benchmark's Kafka ceiling so that it measures the same records:
/// - lz4: a campaign's drafts differ only in the client, so a batch of them shrinks several
///   times, and the broker stores and copies that much less (measured on tansu: 16.2 µs of
///   machine CPU per draft without, 13.0 µs with, fan-out 110 k → 133 k drafts/s);
/// - Nagle off: requests go out at once, not when the previous segment is acknowledged.
pub const PRODUCER_DEFAULTS: &[(&str, &str)] = &[
    ("compression.type", "lz4"),
    ("socket.nagle.disable", "true"),
];

impl KafkaConfig {
    /// Brokers as configured (bootstrap.servers).
    pub fn brokers(&self) -> &str {
        &self.common["bootstrap.servers"]
    }

    /// Client config for the consumer: the runner's defaults, the user's properties, then
    /// what the runner must own.
    pub fn consumer_config(&self) -> ClientConfig {
        let mut c = ClientConfig::new();
        c.set("auto.offset.reset", "earliest");
        // Requests go out at once, not when the previous segment is acknowledged.
        c.set("socket.nagle.disable", "true");
        // A broker that does not answer a waiting fetch as soon as data arrives (tansu, seen
        // here) would hold every campaign up to this long; librdkafka's default is 500 ms. Costs
        // one empty fetch per broker every 5 ms while the input is idle.
        c.set("fetch.wait.max.ms", "5");
        for (k, v) in self.common.iter().chain(&self.consumer) {
            c.set(k, v);
        }
        c.set("group.id", &self.group_id);
        // Offsets are committed only inside the Kafka transactions that publish the results.
        c.set("enable.auto.commit", "false");
        c.set("enable.auto.offset.store", "false");
        // Never read drafts of aborted transactions (for brokers that enforce it).
        c.set("isolation.level", "read_committed");
        c
    }

    /// Client config for the producer of drafts and dead letters.
    pub fn producer_config(&self) -> ClientConfig {
        let mut c = ClientConfig::new();
        for (k, v) in PRODUCER_DEFAULTS {
            c.set(*k, *v);
        }
        // A unit's records are all enqueued at once and then awaited: lingering would only
        // delay the last batch of every transaction.
        c.set("linger.ms", "0");
        // A transaction that starts while the broker still finishes the previous one is told
        // CONCURRENT_TRANSACTIONS and retried after this; librdkafka's 100 ms default showed up
        // as 100 ms latency spikes.
        c.set("retry.backoff.ms", "10");
        for (k, v) in self.common.iter().chain(&self.producer) {
            c.set(k, v);
        }
        // Transactions need these; the transactional.id is set per input partition.
        c.set("enable.idempotence", "true");
        c.set("acks", "all");
        c
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(overlay: &str) -> Result<Config, ConfigError> {
        Config::load(&Sources {
            file: None,
            overlay: Some(overlay),
            env: false,
        })
    }

    #[test]
    fn defaults_are_valid() {
        let c = load("").expect("defaults validate");
        assert_eq!(c.kafka.input_topic, "campaigns");
        assert_eq!(c.rules.memory_limit_bytes, 64 << 20);
        assert_eq!(c.pipeline.batch_linger, Duration::ZERO);
    }

    #[test]
    fn unknown_keys_are_refused() {
        let e = load("[kafka]\nbrokerz = \"x\"\n").unwrap_err().to_string();
        assert!(e.contains("brokerz"), "{e}");
    }

    #[test]
    fn problems_are_all_reported() {
        let e = load("[kafka]\noutput_topic = \"campaigns\"\n[pipeline]\nbatch_max_messages = 0\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("three different topics"), "{e}");
        assert!(e.contains("batch_max_messages"), "{e}");
    }

    #[test]
    fn production_security_is_expressible() {
        let c = load(
            "[kafka]\nsecurity_protocol = \"SASL_SSL\"\nsasl_mechanism = \"SCRAM-SHA-512\"\n\
             sasl_username = \"u\"\nsasl_password = \"p\"\n[kafka.properties]\n\"ssl.endpoint.identification.algorithm\" = \"https\"\n",
        )
        .unwrap();
        let cc = c.kafka.consumer_config();
        assert_eq!(cc.get("security.protocol"), Some("SASL_SSL"));
        assert_eq!(cc.get("sasl.mechanisms"), Some("SCRAM-SHA-512"));
        assert_eq!(cc.get("sasl.password"), Some("p"));
        assert_eq!(
            cc.get("ssl.endpoint.identification.algorithm"),
            Some("https")
        );
        assert_eq!(cc.get("enable.auto.offset.store"), Some("false"));
        assert!(
            !format!("{c:?}").contains("\"p\""),
            "the password must not be printed"
        );
        let e = load("[kafka]\nsasl_mechanism = \"SCRAM-SHA-512\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("sasl_username"), "{e}");
    }

    #[test]
    fn the_runner_owns_offset_storage() {
        let e = load("[kafka.consumer_properties]\n\"enable.auto.offset.store\" = \"true\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("enable.auto.offset.store"), "{e}");
    }

    #[test]
    fn drafts_are_compressed_unless_the_user_says_otherwise() {
        let c = load("").unwrap();
        assert_eq!(
            c.kafka.producer_config().get("compression.type"),
            Some("lz4")
        );
        let c = load("[kafka.producer_properties]\n\"compression.type\" = \"zstd\"\n").unwrap();
        assert_eq!(
            c.kafka.producer_config().get("compression.type"),
            Some("zstd")
        );
    }
}
