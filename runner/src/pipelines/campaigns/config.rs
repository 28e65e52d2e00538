//! `[pipelines.campaigns]`: the campaign pipeline's topics and group, its batching, its rules
//! component and its subscriber cache, checked into [`CampaignsConfig`].

use crate::sandbox::SandboxLimits;
use serde::Deserialize;
use std::path::PathBuf;
use std::time::Duration;

/// Where the section lives, for messages.
const SECTION: &str = "pipelines.campaigns";

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawCampaigns {
    pub enabled: bool,
    pub group_id: String,
    pub input_topic: String,
    pub output_topic: String,
    pub dead_letter_topic: String,
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
    pub rules: RawRules,
    pub subscribers: RawSubscribers,
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
pub struct RawSubscribers {
    /// A full reload as a safety net; changes arrive within a second through LISTEN/NOTIFY.
    #[serde(with = "humantime_serde")]
    pub full_resync_interval: Duration,
}

/// The checked section.
#[derive(Debug, Clone)]
pub struct CampaignsConfig {
    pub group_id: String,
    pub input_topic: String,
    pub output_topic: String,
    pub dead_letter_topic: String,
    pub batch_max_messages: usize,
    pub batch_linger: Duration,
    pub batch_max_drafts: usize,
    /// Units of different partitions committed at once, each on its own PostgreSQL connection.
    pub parallel_units: usize,
    pub max_message_bytes: usize,
    pub sink_retry_max_backoff: Duration,
    pub shutdown_timeout: Duration,
    pub rules: RulesConfig,
    pub full_resync_interval: Duration,
}

#[derive(Debug, Clone)]
pub struct RulesConfig {
    pub path: PathBuf,
    pub watch: bool,
    pub settle: Duration,
    pub limits: SandboxLimits,
}

impl RawCampaigns {
    /// Checks the section; problems are added to `problems`. None when disabled.
    pub fn validate(&self, problems: &mut Vec<String>) -> Option<CampaignsConfig> {
        if !self.enabled {
            return None;
        }
        super::super::check_topics(
            SECTION,
            &self.group_id,
            [
                &self.input_topic,
                &self.output_topic,
                &self.dead_letter_topic,
            ],
            problems,
        );
        for (name, v) in [
            ("batch_max_messages", self.batch_max_messages),
            ("batch_max_drafts", self.batch_max_drafts),
            ("parallel_units", self.parallel_units),
            ("max_message_bytes", self.max_message_bytes),
        ] {
            if v == 0 {
                problems.push(format!("{SECTION}.{name} must be at least 1"));
            }
        }
        let r = &self.rules;
        super::super::check_rules_limits(SECTION, r.call_timeout, r.memory_limit_mib, problems);
        if self.subscribers.full_resync_interval.is_zero() {
            problems.push(format!(
                "{SECTION}.subscribers.full_resync_interval must be positive"
            ));
        }
        Some(CampaignsConfig {
            group_id: self.group_id.clone(),
            input_topic: self.input_topic.clone(),
            output_topic: self.output_topic.clone(),
            dead_letter_topic: self.dead_letter_topic.clone(),
            batch_max_messages: self.batch_max_messages,
            batch_linger: self.batch_linger,
            batch_max_drafts: self.batch_max_drafts,
            parallel_units: self.parallel_units,
            max_message_bytes: self.max_message_bytes,
            sink_retry_max_backoff: self.sink_retry_max_backoff,
            shutdown_timeout: self.shutdown_timeout,
            rules: RulesConfig {
                path: r.path.clone(),
                watch: r.watch,
                settle: r.settle,
                limits: SandboxLimits {
                    call_timeout: r.call_timeout,
                    call_timeout_per_1000: r.call_timeout_per_1000_subscribers,
                    memory_limit_bytes: (r.memory_limit_mib as usize) << 20,
                    compile_cache_dir: Some(r.compile_cache_dir.clone())
                        .filter(|p| !p.as_os_str().is_empty()),
                    interruptible: true,
                },
            },
            full_resync_interval: self.subscribers.full_resync_interval,
        })
    }
}
