//! The Kafka client settings every pipeline shares (the `[kafka]` section, checked): the
//! brokers, the security settings production needs (SASL_SSL, SCRAM, a CA file), any
//! librdkafka property, and the client configurations every pipeline's consumer and producers
//! are made from (with the properties the delivery protocol owns set last).

use rdkafka::error::KafkaError;
use rdkafka::ClientConfig;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::PathBuf;

#[derive(Clone, Deserialize)]
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

/// Whether a client property holds a secret, by its name: a password, a secret, a key (or a
/// key's file), or `sasl.oauthbearer.config` (which can carry the client's secret).
pub fn is_secret_property(name: &str) -> bool {
    let name = name.to_ascii_lowercase();
    ["password", "secret", "key"]
        .iter()
        .any(|w| name.contains(w))
        || name == "sasl.oauthbearer.config"
}

/// `e` without the value of a secret property: librdkafka's refusal of a property carries
/// its value, and prints it.
pub fn redact_client_error(e: KafkaError) -> KafkaError {
    match e {
        KafkaError::ClientConfig(res, desc, key, value) if is_secret_property(&key) => {
            let desc = if value.is_empty() {
                desc
            } else {
                desc.replace(&value, crate::logging::REDACTED)
            };
            KafkaError::ClientConfig(res, desc, key, crate::logging::REDACTED.into())
        }
        e => e,
    }
}

/// `m` with the value of each secret property replaced by `<redacted>`.
fn redacted(m: &BTreeMap<String, String>) -> BTreeMap<&str, &str> {
    m.iter()
        .map(|(k, v)| {
            let v = if is_secret_property(k) {
                crate::logging::REDACTED
            } else {
                v.as_str()
            };
            (k.as_str(), v)
        })
        .collect()
}

impl std::fmt::Debug for KafkaConfig {
    /// Secrets (the SASL password, any property [`is_secret_property`] names) are never
    /// printed.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaConfig")
            .field("properties", &redacted(&self.common))
            .field("consumer_properties", &redacted(&self.consumer))
            .field("producer_properties", &redacted(&self.producer))
            .finish()
    }
}

impl std::fmt::Debug for RawKafka {
    /// As [`KafkaConfig`]'s: no secret printed.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RawKafka")
            .field("brokers", &self.brokers)
            .field("security_protocol", &self.security_protocol)
            .field("sasl_mechanism", &self.sasl_mechanism)
            .field("sasl_username", &self.sasl_username)
            .field(
                "sasl_password",
                &self
                    .sasl_password
                    .as_ref()
                    .map(|_| crate::logging::REDACTED),
            )
            .field("ssl_ca_location", &self.ssl_ca_location)
            .field("properties", &redacted(&self.properties))
            .field("consumer_properties", &redacted(&self.consumer_properties))
            .field("producer_properties", &redacted(&self.producer_properties))
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
        let config = KafkaConfig {
            common,
            consumer: self.consumer_properties.clone(),
            producer: self.producer_properties.clone(),
        };
        // librdkafka's own check of every property (its name known to this build, its value
        // of the right form), so that a mistake is a configuration problem, said at once.
        for (role, client) in [
            ("consumer", config.consumer_config("check")),
            ("producer", config.producer_config()),
        ] {
            if let Err(e) = client.create_native_config() {
                let e = redact_client_error(e);
                let problem = match &e {
                    KafkaError::ClientConfig(_, desc, key, _) => {
                        format!("kafka property {key} is refused by librdkafka: {desc}")
                    }
                    e => format!("the Kafka {role} configuration is refused: {e}"),
                };
                if !problems.contains(&problem) {
                    problems.push(problem);
                }
            }
        }
        config
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

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(properties: &[(&str, &str)]) -> RawKafka {
        RawKafka {
            brokers: "127.0.0.1:9092".into(),
            security_protocol: None,
            sasl_mechanism: None,
            sasl_username: Some("runner".into()),
            sasl_password: Some("sasl-hunter2".into()),
            ssl_ca_location: None,
            properties: properties
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            consumer_properties: BTreeMap::new(),
            producer_properties: BTreeMap::new(),
        }
    }

    #[test]
    fn secret_properties_are_named_by_password_secret_or_key() {
        for p in [
            "sasl.password",
            "ssl.key.password",
            "ssl.keystore.password",
            "ssl.key.pem",
            "sasl.oauthbearer.client.secret",
            "sasl.oauthbearer.config",
        ] {
            assert!(is_secret_property(p), "{p}");
        }
        for p in ["bootstrap.servers", "sasl.username", "debug", "linger.ms"] {
            assert!(!is_secret_property(p), "{p}");
        }
    }

    #[test]
    fn no_debug_form_prints_a_secret() {
        let r = raw(&[("ssl.key.password", "key-hunter2"), ("linger.ms", "5")]);
        let mut problems = Vec::new();
        let k = r.validate(&mut problems);
        assert!(problems.is_empty(), "{problems:?}");
        for printed in [format!("{r:?}"), format!("{k:#?}")] {
            assert!(!printed.contains("hunter2"), "{printed}");
            assert!(
                printed.contains("runner") && printed.contains("linger.ms"),
                "{printed}"
            );
        }
        // The clients still get the real values.
        let c = k.consumer_config("g");
        assert_eq!(c.get("sasl.password"), Some("sasl-hunter2"));
        assert_eq!(c.get("ssl.key.password"), Some("key-hunter2"));
    }

    #[test]
    fn a_property_librdkafka_refuses_is_a_problem_that_keeps_its_secret() {
        let mut problems = Vec::new();
        raw(&[("ssl.secret.typo", "typo-hunter2")]).validate(&mut problems);
        let all = problems.join("; ");
        assert!(
            all.contains("ssl.secret.typo") && !all.contains("hunter2"),
            "{all}"
        );
        let mut problems = Vec::new();
        raw(&[("linger.ms", "soon")]).validate(&mut problems);
        assert!(problems.join("; ").contains("linger.ms"), "{problems:?}");
    }
}
