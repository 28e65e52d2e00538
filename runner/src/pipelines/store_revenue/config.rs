//! `[pipelines.store_revenue]`: the store-revenue pipeline's topics and group, its windows
//! (size, allowed lateness, trigger, idleness), its rules component, checked into
//! [`StoreRevenueConfig`].

use crate::sandbox::SandboxLimits;
use serde::Deserialize;
use std::path::PathBuf;
use std::time::Duration;

/// Where the section lives, for messages.
const SECTION: &str = "pipelines.store_revenue";

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawStoreRevenue {
    pub enabled: bool,
    pub group_id: String,
    pub input_topic: String,
    pub output_topic: String,
    pub dead_letter_topic: String,
    #[serde(with = "humantime_serde")]
    pub window: Duration,
    #[serde(with = "humantime_serde")]
    pub allowed_lateness: Duration,
    #[serde(with = "humantime_serde")]
    pub trigger: Duration,
    #[serde(with = "humantime_serde")]
    pub idle_after: Duration,
    pub minor_digits: u8,
    pub console: bool,
    pub batch_max_messages: usize,
    pub max_pending_dead_letters: usize,
    pub parallel_commits: usize,
    pub max_message_bytes: usize,
    #[serde(with = "humantime_serde")]
    pub sink_retry_max_backoff: Duration,
    #[serde(with = "humantime_serde")]
    pub shutdown_timeout: Duration,
    pub rules: RawSalesRules,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSalesRules {
    pub path: PathBuf,
    #[serde(with = "humantime_serde")]
    pub call_timeout: Duration,
    #[serde(with = "humantime_serde")]
    pub call_timeout_per_1000_messages: Duration,
    pub memory_limit_mib: u64,
    pub watch: bool,
    #[serde(with = "humantime_serde")]
    pub settle: Duration,
    pub compile_cache_dir: PathBuf,
}

/// The checked section.
#[derive(Debug, Clone)]
pub struct StoreRevenueConfig {
    pub group_id: String,
    pub input_topic: String,
    pub output_topic: String,
    pub dead_letter_topic: String,
    /// Tumbling window size, whole seconds.
    pub window_secs: i64,
    /// Watermark = greatest event time seen on the partition − this, whole seconds.
    pub lateness_secs: i64,
    /// How often state is committed, windows are emitted and finished windows made final.
    pub trigger: Duration,
    /// A partition that has reached the end of its log and received nothing for this long is
    /// idle: its watermark follows processing time.
    pub idle_after: Duration,
    /// Decimal digits of the currency's minor unit (2: cents).
    pub minor_digits: u8,
    /// Print the windows table on stdout at every trigger.
    pub console: bool,
    pub batch_max_messages: usize,
    /// State is committed before the next trigger when this many dead letters wait.
    pub max_pending_dead_letters: usize,
    /// Partitions committed (and published) at the same time, each on its own PostgreSQL
    /// connection.
    pub parallel_commits: usize,
    pub max_message_bytes: usize,
    pub sink_retry_max_backoff: Duration,
    pub shutdown_timeout: Duration,
    pub rules: SalesRulesConfig,
}

#[derive(Debug, Clone)]
pub struct SalesRulesConfig {
    pub path: PathBuf,
    pub watch: bool,
    pub settle: Duration,
    pub limits: SandboxLimits,
}

/// A duration in whole seconds, or a problem.
fn whole_secs(name: &str, d: Duration, problems: &mut Vec<String>) -> i64 {
    if d.subsec_nanos() != 0 || d.is_zero() {
        problems.push(format!(
            "{SECTION}.{name} must be a positive whole number of seconds (got {})",
            humantime::format_duration(d)
        ));
    }
    d.as_secs() as i64
}

impl RawStoreRevenue {
    /// Checks the section; problems are added to `problems`. None when disabled.
    pub fn validate(&self, problems: &mut Vec<String>) -> Option<StoreRevenueConfig> {
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
        let window_secs = whole_secs("window", self.window, problems);
        let lateness_secs = if self.allowed_lateness.is_zero() {
            0
        } else {
            whole_secs("allowed_lateness", self.allowed_lateness, problems)
        };
        if self.trigger.is_zero() {
            problems.push(format!("{SECTION}.trigger must be positive"));
        }
        if self.minor_digits > 6 {
            problems.push(format!(
                "{SECTION}.minor_digits must be between 0 and 6 (got {})",
                self.minor_digits
            ));
        }
        for (name, v) in [
            ("batch_max_messages", self.batch_max_messages),
            ("max_pending_dead_letters", self.max_pending_dead_letters),
            ("parallel_commits", self.parallel_commits),
            ("max_message_bytes", self.max_message_bytes),
        ] {
            if v == 0 {
                problems.push(format!("{SECTION}.{name} must be at least 1"));
            }
        }
        let r = &self.rules;
        super::super::check_rules_limits(SECTION, r.call_timeout, r.memory_limit_mib, problems);
        Some(StoreRevenueConfig {
            group_id: self.group_id.clone(),
            input_topic: self.input_topic.clone(),
            output_topic: self.output_topic.clone(),
            dead_letter_topic: self.dead_letter_topic.clone(),
            window_secs,
            lateness_secs,
            trigger: self.trigger,
            idle_after: self.idle_after,
            minor_digits: self.minor_digits,
            console: self.console,
            batch_max_messages: self.batch_max_messages,
            max_pending_dead_letters: self.max_pending_dead_letters,
            parallel_commits: self.parallel_commits,
            max_message_bytes: self.max_message_bytes,
            sink_retry_max_backoff: self.sink_retry_max_backoff,
            shutdown_timeout: self.shutdown_timeout,
            rules: SalesRulesConfig {
                path: r.path.clone(),
                watch: r.watch,
                settle: r.settle,
                limits: SandboxLimits {
                    call_timeout: r.call_timeout,
                    call_timeout_per_1000: r.call_timeout_per_1000_messages,
                    memory_limit_bytes: (r.memory_limit_mib as usize) << 20,
                    compile_cache_dir: Some(r.compile_cache_dir.clone())
                        .filter(|p| !p.as_os_str().is_empty()),
                    interruptible: true,
                },
            },
        })
    }
}
