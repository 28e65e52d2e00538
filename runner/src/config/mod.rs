//! Configuration: the embedded defaults, then the TOML file, then `RUNNER__…` environment
//! variables, deserialised strictly (unknown keys are errors) into [`RawConfig`] and checked
//! into [`Config`], the only form the rest of the runner sees.
//!
//! Shared sections: `[kafka]` (brokers, security, client properties), `[postgres]`,
//! `[status]`, `[startup]` (the start-up deadline); then one section per pipeline
//! (`[pipelines.campaigns]`), each with `enabled`.
//! A file in the single-pipeline layout (`[kafka]` topics and group, `[pipeline]`, `[rules]`,
//! `[subscribers]`) still works: its keys are read as the campaign pipeline's, and a warning
//! names the new keys.

pub use crate::kafka::{KafkaConfig, RawKafka, PRODUCER_DEFAULTS};

use crate::db::PostgresUrl;
use crate::pipelines::campaigns::config::{CampaignsConfig, RawCampaigns};
use crate::pipelines::store_revenue::config::{RawStoreRevenue, StoreRevenueConfig};
use crate::startup::{RawStartup, StartupConfig};
use figment::providers::{Env, Format, Serialized, Toml};
use figment::Figment;
use serde::Deserialize;
use std::path::Path;

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
    pub status: RawStatus,
    pub startup: RawStartup,
    pub pipelines: RawPipelines,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawStatus {
    /// Address of the HTTP status endpoint (/health, /status, /metrics); empty: none.
    pub listen: String,
}

#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPostgres {
    pub url: String,
}

impl std::fmt::Debug for RawPostgres {
    /// As [`PostgresUrl`]'s: the password is never printed.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RawPostgres")
            .field("url", &PostgresUrl::new(self.url.clone()))
            .finish()
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPipelines {
    pub campaigns: RawCampaigns,
    pub store_revenue: RawStoreRevenue,
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

/// Keys of the single-pipeline layout and where each now lives.
const LEGACY: &[(&str, &str, &str)] = &[
    ("kafka", "group_id", "pipelines.campaigns.group_id"),
    ("kafka", "input_topic", "pipelines.campaigns.input_topic"),
    ("kafka", "output_topic", "pipelines.campaigns.output_topic"),
    (
        "kafka",
        "dead_letter_topic",
        "pipelines.campaigns.dead_letter_topic",
    ),
    ("pipeline", "*", "pipelines.campaigns.*"),
    ("rules", "", "pipelines.campaigns.rules"),
    ("subscribers", "", "pipelines.campaigns.subscribers"),
];

/// Moves keys of the single-pipeline layout to where they live now; returns the moves made,
/// as "old → new".
fn upgrade_layout(v: &mut serde_json::Value) -> Vec<String> {
    let mut moved = Vec::new();
    let Some(root) = v.as_object_mut() else {
        return moved;
    };
    let mut campaigns = root
        .get_mut("pipelines")
        .and_then(|p| p.get_mut("campaigns"))
        .and_then(|c| c.as_object_mut())
        .map(std::mem::take)
        .unwrap_or_default();
    for (section, key, to) in LEGACY {
        match *key {
            // A whole section becomes a subsection of the pipeline's.
            "" => {
                if let Some(serde_json::Value::Object(old)) = root.remove(*section) {
                    let sub = campaigns
                        .entry(section.to_string())
                        .or_insert_with(|| serde_json::json!({}));
                    if let Some(sub) = sub.as_object_mut() {
                        for (k, val) in old {
                            moved.push(format!("{section}.{k} → {to}.{k}"));
                            sub.insert(k, val);
                        }
                    }
                }
            }
            // Every key of a section moves up into the pipeline's.
            "*" => {
                if let Some(serde_json::Value::Object(old)) = root.remove(*section) {
                    for (k, val) in old {
                        moved.push(format!("{section}.{k} → pipelines.campaigns.{k}"));
                        campaigns.insert(k, val);
                    }
                }
            }
            key => {
                let old = root
                    .get_mut(*section)
                    .and_then(|s| s.as_object_mut())
                    .and_then(|s| s.remove(key));
                if let Some(val) = old {
                    moved.push(format!("{section}.{key} → {to}"));
                    campaigns.insert(key.to_string(), val);
                }
            }
        }
    }
    let pipelines = root
        .entry("pipelines")
        .or_insert_with(|| serde_json::json!({}));
    if let Some(p) = pipelines.as_object_mut() {
        p.insert("campaigns".into(), serde_json::Value::Object(campaigns));
    }
    moved
}

/// Whether the key at `path` holds a secret: the SASL password, the PostgreSQL connection
/// string, a client property [`crate::kafka::is_secret_property`] names.
fn is_secret_key(path: &[String]) -> bool {
    match path {
        [.., last] if last == "sasl_password" => true,
        [.., section, last] if section == "postgres" && last == "url" => true,
        [.., section, last] if section.ends_with("properties") => {
            crate::kafka::is_secret_property(last)
        }
        _ => false,
    }
}

/// A line of a parse error that quotes the source (`3 | url = "..."`, `  |   ^`).
fn is_quoted_source(line: &str) -> bool {
    line.trim_start()
        .trim_start_matches(|c: char| c.is_ascii_digit())
        .trim_start()
        .starts_with('|')
}

/// `e` with the value of any secret key it quotes (a password given as a number, say)
/// replaced by `<redacted>`.
fn redact_load_error(e: figment::Error) -> Box<figment::Error> {
    use figment::error::{Actual, Kind};
    let mut errors: Vec<figment::Error> = e
        .into_iter()
        .map(|mut e| {
            if is_secret_key(&e.path) {
                let hidden = || Actual::Other(crate::logging::REDACTED.into());
                e.kind = match e.kind {
                    Kind::InvalidType(_, expected) => Kind::InvalidType(hidden(), expected),
                    Kind::InvalidValue(_, expected) => Kind::InvalidValue(hidden(), expected),
                    Kind::Message(_) => Kind::Message(format!(
                        "the value is not accepted ({})",
                        crate::logging::REDACTED
                    )),
                    other => other,
                };
            }
            // A syntax error quotes the line it is on, which may hold a secret: the line and
            // column it gives are enough.
            if let Kind::Message(m) = &mut e.kind {
                if m.lines().any(is_quoted_source) {
                    *m = m
                        .lines()
                        .filter(|l| !is_quoted_source(l))
                        .collect::<Vec<_>>()
                        .join("\n");
                }
            }
            e
        })
        .collect();
    let mut chained = errors.pop().expect("an error has at least one");
    while let Some(e) = errors.pop() {
        chained = chained.chain(e);
    }
    Box::new(chained)
}

impl RawConfig {
    pub fn load(sources: &Sources<'_>) -> Result<RawConfig, ConfigError> {
        let defaults: serde_json::Value = Figment::from(Toml::string(DEFAULTS))
            .extract()
            .map_err(|e| ConfigError::Load(Box::new(e)))?;
        let mut fig = Figment::new();
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
        let mut given: serde_json::Value = fig
            .extract()
            .map_err(|e| ConfigError::Load(redact_load_error(e)))?;
        let moved = upgrade_layout(&mut given);
        if !moved.is_empty() {
            tracing::warn!(
                moved = %moved.join(", "),
                "The configuration uses the single-pipeline layout; its keys are read as the campaign pipeline's. Rename them."
            );
        }
        Figment::from(Serialized::defaults(defaults))
            .merge(Serialized::defaults(given))
            .extract()
            .map_err(|e| ConfigError::Load(redact_load_error(e)))
    }
}

/// The checked configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub kafka: KafkaConfig,
    pub postgres_url: PostgresUrl,
    /// Where the HTTP status endpoint listens, if anywhere.
    pub status_listen: Option<std::net::SocketAddr>,
    /// The start-up deadline and what to do past it.
    pub startup: StartupConfig,
    /// The campaign pipeline, when enabled.
    pub campaigns: Option<CampaignsConfig>,
    /// The store-revenue pipeline, when enabled.
    pub store_revenue: Option<StoreRevenueConfig>,
}

impl Config {
    pub fn load(sources: &Sources<'_>) -> Result<Config, ConfigError> {
        RawConfig::load(sources)?.validate()
    }
}

impl RawConfig {
    pub fn validate(self) -> Result<Config, ConfigError> {
        let mut problems = Vec::new();
        let kafka = self.kafka.validate(&mut problems);
        if self.postgres.url.trim().is_empty() {
            problems.push("postgres.url must not be empty".into());
        } else if let Err(e) = self.postgres.url.parse::<tokio_postgres::Config>() {
            problems.push(format!(
                "postgres.url is not a valid connection string: {e}"
            ));
        }
        let campaigns = self.pipelines.campaigns.validate(&mut problems);
        let store_revenue = self.pipelines.store_revenue.validate(&mut problems);
        let startup = self.startup.validate(&mut problems);
        if campaigns.is_none() && store_revenue.is_none() {
            problems.push("no pipeline is enabled (pipelines.campaigns.enabled and pipelines.store_revenue.enabled are both false)".into());
        }
        let status_listen = match self.status.listen.trim() {
            "" => None,
            s => match s.parse() {
                Ok(a) => Some(a),
                Err(e) => {
                    problems.push(format!("status.listen {s:?} is not host:port: {e}"));
                    None
                }
            },
        };
        if !problems.is_empty() {
            return Err(ConfigError::Invalid(problems.join("; ")));
        }
        Ok(Config {
            kafka,
            postgres_url: PostgresUrl::new(self.postgres.url),
            status_listen,
            startup,
            campaigns,
            store_revenue,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn load(overlay: &str) -> Result<Config, ConfigError> {
        Config::load(&Sources {
            file: None,
            overlay: Some(overlay),
            env: false,
        })
    }

    fn campaigns(c: &Config) -> &CampaignsConfig {
        c.campaigns.as_ref().expect("the campaign pipeline is on")
    }

    #[test]
    fn defaults_are_valid() {
        let c = load("").expect("defaults validate");
        let p = campaigns(&c);
        assert_eq!(p.input_topic, "campaigns");
        assert_eq!(p.rules.limits.memory_limit_bytes, 64 << 20);
        assert_eq!(p.batch_linger, Duration::ZERO);
    }

    #[test]
    fn unknown_keys_are_refused() {
        let e = load("[kafka]\nbrokerz = \"x\"\n").unwrap_err().to_string();
        assert!(e.contains("brokerz"), "{e}");
        let e = load("[pipelines.campaigns]\nbatch_max_messagez = 1\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("batch_max_messagez"), "{e}");
    }

    #[test]
    fn problems_are_all_reported() {
        let e =
            load("[pipelines.campaigns]\noutput_topic = \"campaigns\"\nbatch_max_messages = 0\n")
                .unwrap_err()
                .to_string();
        assert!(e.contains("three different topics"), "{e}");
        assert!(e.contains("batch_max_messages"), "{e}");
    }

    #[test]
    fn the_single_pipeline_layout_still_works() {
        let c = load(
            "[kafka]\ninput_topic = \"in\"\ngroup_id = \"g\"\n[pipeline]\nparallel_units = 3\n\
             [rules]\nmemory_limit_mib = 8\n[subscribers]\nfull_resync_interval = \"5m\"\n",
        )
        .expect("the old layout is read");
        let p = campaigns(&c);
        assert_eq!((p.input_topic.as_str(), p.group_id.as_str()), ("in", "g"));
        assert_eq!(p.parallel_units, 3);
        assert_eq!(p.rules.limits.memory_limit_bytes, 8 << 20);
        assert_eq!(
            p.rules.path.to_str(),
            Some("build/wasm/campaign-rules.wasm")
        );
        assert_eq!(p.full_resync_interval, Duration::from_secs(300));
        // Its problems are reported too.
        let e = load("[kafka]\noutput_topic = \"campaigns\"\n[pipeline]\nbatch_max_messages = 0\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("three different topics") && e.contains("batch_max_messages"),
            "{e}"
        );
    }

    #[test]
    fn a_pipeline_can_be_switched_off_but_not_all() {
        let e = load("[pipelines.campaigns]\nenabled = false\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("no pipeline is enabled"), "{e}");
    }

    #[test]
    fn production_security_is_expressible() {
        let c = load(
            "[kafka]\nsecurity_protocol = \"SASL_SSL\"\nsasl_mechanism = \"SCRAM-SHA-512\"\n\
             sasl_username = \"u\"\nsasl_password = \"p\"\n[kafka.properties]\n\"ssl.endpoint.identification.algorithm\" = \"https\"\n",
        )
        .unwrap();
        let cc = c.kafka.consumer_config("g");
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
    fn the_postgres_password_is_not_printed() {
        for url in [
            "host=db user=runner password=hunter2 dbname=x",
            "postgresql://runner:hunter2@db/x",
        ] {
            let c = load(&format!("[postgres]\nurl = \"{url}\"\n")).unwrap();
            let printed = format!("{c:?}");
            assert!(!printed.contains("hunter2"), "{printed}");
            assert!(printed.contains("runner"), "{printed}");
        }
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
        let c = load("[kafka.producer_properties]\n\"compression.type\" = \"gzip\"\n").unwrap();
        assert_eq!(
            c.kafka.producer_config().get("compression.type"),
            Some("gzip")
        );
    }
}
