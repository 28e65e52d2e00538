//! The Kafka client settings every pipeline shares (the `[kafka]` section, checked): the
//! brokers, the security settings production needs (SASL_SSL, SCRAM, a CA file), any
//! librdkafka property, and the client configurations every pipeline's consumer and producers
//! are made from (with the properties the delivery protocol owns set last).

use rdkafka::ClientConfig;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::PathBuf;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawKafka {
    pub brokers: String,
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

/// Client properties for every Kafka client of the runner.
#[derive(Clone)]
pub struct KafkaConfig {
    /// Properties for every client (brokers and security included), then per role.
    common: BTreeMap<String, String>,
    consumer: BTreeMap<String, String>,
    producer: BTreeMap<String, String>,
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
            .field("properties", &redact(&self.common))
            .field("consumer_properties", &redact(&self.consumer))
            .field("producer_properties", &redact(&self.producer))
            .finish()
    }
}

/// Properties the runner sets itself because its delivery protocol depends on them.
const OWNED_PROPS: &[&str] = &[
    "group.id",
    "enable.auto.offset.store",
    "enable.auto.commit",
    "isolation.level",
    "transactional.id",
    "enable.idempotence",
];

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

impl RawKafka {
    /// Checks the section; problems are added to `problems`.
    pub fn validate(&self, problems: &mut Vec<String>) -> KafkaConfig {
        if self.brokers.trim().is_empty() {
            problems.push("kafka.brokers must not be empty".into());
        }
        let mut common = self.properties.clone();
        common.insert("bootstrap.servers".into(), self.brokers.clone());
        for (key, v) in [
            ("security.protocol", &self.security_protocol),
            ("sasl.mechanisms", &self.sasl_mechanism),
            ("sasl.username", &self.sasl_username),
            ("sasl.password", &self.sasl_password),
        ] {
            if let Some(v) = v {
                common.insert(key.into(), v.clone());
            }
        }
        if let Some(ca) = &self.ssl_ca_location {
            if !ca.exists() {
                problems.push(format!(
                    "kafka.ssl_ca_location {} does not exist",
                    ca.display()
                ));
            }
            common.insert("ssl.ca.location".into(), ca.display().to_string());
        }
        if self
            .sasl_mechanism
            .as_deref()
            .is_some_and(|m| m.starts_with("SCRAM"))
            && (self.sasl_username.is_none() || self.sasl_password.is_none())
        {
            problems.push(
                "kafka.sasl_mechanism SCRAM-* needs kafka.sasl_username and kafka.sasl_password"
                    .into(),
            );
        }
        for key in OWNED_PROPS {
            if self.consumer_properties.contains_key(*key)
                || self.producer_properties.contains_key(*key)
                || self.properties.contains_key(*key)
            {
                problems.push(format!(
                    "kafka property {key} is set by the runner (its delivery protocol depends on it); remove it"
                ));
            }
        }
        KafkaConfig {
            common,
            consumer: self.consumer_properties.clone(),
            producer: self.producer_properties.clone(),
        }
    }
}

impl KafkaConfig {
    /// Brokers as configured (bootstrap.servers).
    pub fn brokers(&self) -> &str {
        &self.common["bootstrap.servers"]
    }

    /// Client config for a pipeline's consumer in `group_id`: the runner's defaults, the
    /// user's properties, then what the runner must own.
    pub fn consumer_config(&self, group_id: &str) -> ClientConfig {
        let mut c = ClientConfig::new();
        c.set("auto.offset.reset", "earliest");
        // Requests go out at once, not when the previous segment is acknowledged.
        c.set("socket.nagle.disable", "true");
        for (k, v) in self.common.iter().chain(&self.consumer) {
            c.set(k, v);
        }
        c.set("group.id", group_id);
        // Offsets are committed only inside the Kafka transactions that publish the results.
        c.set("enable.auto.commit", "false");
        c.set("enable.auto.offset.store", "false");
        // Never read records of aborted transactions (for brokers that enforce it).
        c.set("isolation.level", "read_committed");
        c
    }

    /// Client config for the producers of output records and dead letters.
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
