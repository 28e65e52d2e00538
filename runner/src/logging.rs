//! librdkafka's log lines and error events, as the runner logs them. Every Kafka client's
//! context hands them to its [`ClientLog`], which
//! - logs each at the level it has: syslog 0–3 at error, 4 (warning) at warn, 5–6 (notice,
//!   info) at info, 7 (debug) at debug; the end of a partition (an event librdkafka reports
//!   through its error callback) at debug;
//! - replaces the values of the client's secret properties (see
//!   [`crate::kafka::is_secret_property`]) by `<redacted>` in whatever it prints, including
//!   librdkafka's own debug output when a user turns `debug` on;
//! - lets one line of the same message (ignoring the numbers in it: ports, counters, durations)
//!   out per client per minute, the next one saying how many were suppressed
//!   (`suppressed = 587`), so that a broker refusing connections cannot flood the log. Debug
//!   lines are not limited: they are there because someone asked for them (`debug`).
//!
//! The limiter is written here rather than taken from a crate: rate-limiting crates
//! (`governor`) answer "may this go now?" but neither count what they refused nor key by a
//! message's shape, which is all this needs, in some sixty lines.

use crate::kafka::is_secret_property;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::consumer::ConsumerContext;
use rdkafka::error::KafkaError;
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::{ClientConfig, ClientContext};
use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How long the same message is held back after it was logged.
pub const WINDOW: Duration = Duration::from_secs(60);

/// Distinct messages a limiter remembers; past that, those whose window has passed are
/// forgotten first, then the oldest.
const MAX_KEYS: usize = 1024;

/// Secret values shorter than this are not searched for in log lines: they would match
/// ordinary words.
const MIN_SECRET_LEN: usize = 4;

/// What the printed secrets are replaced with.
pub const REDACTED: &str = "<redacted>";

/// Lets the first line of each message out, then suppresses the same message for [`WINDOW`]
/// after each line let out, counting what it suppressed. Time is given by the caller.
#[derive(Debug)]
pub struct RateLimiter {
    window: Duration,
    seen: HashMap<String, Seen>,
}

#[derive(Debug, Clone, Copy)]
struct Seen {
    /// When a line of this message was last let out.
    logged: Instant,
    /// Lines of it suppressed since.
    suppressed: u64,
}

impl Default for RateLimiter {
    fn default() -> Self {
        RateLimiter::new(WINDOW)
    }
}

impl RateLimiter {
    pub fn new(window: Duration) -> Self {
        RateLimiter {
            window,
            seen: HashMap::new(),
        }
    }

    /// Whether a line with `key` goes out at `now`: `Some(n)` when it does, `n` being the lines
    /// of the same key suppressed since the last one that went out; `None` when it is
    /// suppressed (and counted).
    pub fn check(&mut self, key: &str, now: Instant) -> Option<u64> {
        if let Some(s) = self.seen.get_mut(key) {
            if now.saturating_duration_since(s.logged) < self.window {
                s.suppressed += 1;
                return None;
            }
            s.logged = now;
            return Some(std::mem::take(&mut s.suppressed));
        }
        if self.seen.len() >= MAX_KEYS {
            let window = self.window;
            self.seen
                .retain(|_, s| now.saturating_duration_since(s.logged) < window);
            if self.seen.len() >= MAX_KEYS {
                if let Some(oldest) = self
                    .seen
                    .iter()
                    .min_by_key(|(_, s)| s.logged)
                    .map(|(k, _)| k.clone())
                {
                    self.seen.remove(&oldest);
                }
            }
        }
        self.seen.insert(
            key.to_owned(),
            Seen {
                logged: now,
                suppressed: 0,
            },
        );
        Some(0)
    }
}

/// The shape of a message, what makes two lines "the same message": without librdkafka's
/// thread prefix (`[thrd:…]: `) and its closing remark on a broker failure (`(after 0ms in state
/// CONNECT, 3 identical error(s) suppressed)`), every run of digits replaced by `#` — so that
/// the same message with another port, counter or duration is the same message, and a broker
/// failure logged and then reported as an error event is one message.
pub fn shape(text: &str) -> String {
    let mut text = text.trim();
    if text.starts_with("[thrd:") {
        if let Some(i) = text.find("]: ") {
            text = &text[i + 3..];
        }
    }
    if let Some(i) = text.find(" (after ") {
        text = &text[..i];
    }
    let mut out = String::with_capacity(text.len());
    let mut in_digits = false;
    for c in text.chars() {
        if c.is_ascii_digit() {
            if !in_digits {
                out.push('#');
            }
            in_digits = true;
        } else {
            out.push(c);
            in_digits = false;
        }
    }
    out
}

/// The values of `config`'s secret properties worth searching for in log lines.
pub fn secrets_of(config: &ClientConfig) -> Vec<String> {
    let mut secrets: Vec<String> = config
        .config_map()
        .into_keys()
        .filter(|k| is_secret_property(k))
        .filter_map(|k| config.get(k))
        .filter(|v| v.len() >= MIN_SECRET_LEN)
        .map(str::to_owned)
        .collect();
    // Longest first, so that a secret containing another is replaced whole.
    secrets.sort_by_key(|s| std::cmp::Reverse(s.len()));
    secrets.dedup();
    secrets
}

/// Replaces every occurrence of each of `secrets` in `text` by [`REDACTED`].
pub fn redact<'a>(text: &'a str, secrets: &[String]) -> Cow<'a, str> {
    let mut out = Cow::Borrowed(text);
    for s in secrets {
        if out.contains(s.as_str()) {
            out = Cow::Owned(out.replace(s.as_str(), REDACTED));
        }
    }
    out
}

/// How one Kafka client's log lines and errors are logged: by level, secrets redacted,
/// repeats rate-limited.
pub struct ClientLog {
    /// Which client, in every line (e.g. `consumer campaign-runner`).
    client: String,
    secrets: Vec<String>,
    limiter: Mutex<RateLimiter>,
}

impl std::fmt::Debug for ClientLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientLog")
            .field("client", &self.client)
            .finish_non_exhaustive()
    }
}

impl Default for ClientLog {
    fn default() -> Self {
        ClientLog {
            client: "kafka".into(),
            secrets: Vec::new(),
            limiter: Mutex::default(),
        }
    }
}

/// One event at a level chosen at run time, with `suppressed` when lines were.
macro_rules! emit {
    ($level:expr, $suppressed:expr, $($field:tt)+) => {
        match ($level, $suppressed) {
            (tracing::Level::ERROR, 0) => tracing::error!(target: "librdkafka", $($field)+),
            (tracing::Level::ERROR, n) => tracing::error!(target: "librdkafka", suppressed = n, $($field)+),
            (tracing::Level::WARN, 0) => tracing::warn!(target: "librdkafka", $($field)+),
            (tracing::Level::WARN, n) => tracing::warn!(target: "librdkafka", suppressed = n, $($field)+),
            (tracing::Level::INFO, 0) => tracing::info!(target: "librdkafka", $($field)+),
            (tracing::Level::INFO, n) => tracing::info!(target: "librdkafka", suppressed = n, $($field)+),
            (_, 0) => tracing::debug!(target: "librdkafka", $($field)+),
            (_, n) => tracing::debug!(target: "librdkafka", suppressed = n, $($field)+),
        }
    };
}

/// The level a librdkafka log line is logged at.
pub fn level_of(level: RDKafkaLogLevel) -> tracing::Level {
    match level {
        RDKafkaLogLevel::Emerg
        | RDKafkaLogLevel::Alert
        | RDKafkaLogLevel::Critical
        | RDKafkaLogLevel::Error => tracing::Level::ERROR,
        RDKafkaLogLevel::Warning => tracing::Level::WARN,
        RDKafkaLogLevel::Notice | RDKafkaLogLevel::Info => tracing::Level::INFO,
        RDKafkaLogLevel::Debug => tracing::Level::DEBUG,
    }
}

impl ClientLog {
    /// The log of the client named `client` made from `config` (whose secrets it redacts).
    pub fn new(client: impl Into<String>, config: &ClientConfig) -> Self {
        ClientLog {
            client: client.into(),
            secrets: secrets_of(config),
            limiter: Mutex::default(),
        }
    }

    /// `Some(suppressed)` if a line with `key` goes out now.
    fn admit(&self, level: tracing::Level, key: impl FnOnce() -> String) -> Option<u64> {
        // Lines no subscriber wants are neither counted nor held back.
        let enabled = match level {
            tracing::Level::ERROR => tracing::enabled!(target: "librdkafka", tracing::Level::ERROR),
            tracing::Level::WARN => tracing::enabled!(target: "librdkafka", tracing::Level::WARN),
            tracing::Level::INFO => tracing::enabled!(target: "librdkafka", tracing::Level::INFO),
            _ => tracing::enabled!(target: "librdkafka", tracing::Level::DEBUG),
        };
        if !enabled {
            return None;
        }
        if level > tracing::Level::INFO {
            return Some(0);
        }
        self.limiter
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .check(&key(), Instant::now())
    }

    /// A librdkafka log line.
    pub fn log(&self, level: RDKafkaLogLevel, facility: &str, message: &str) {
        let level = level_of(level);
        let key = || format!("{level} {}", shape(message));
        if let Some(suppressed) = self.admit(level, key) {
            let message = redact(message, &self.secrets);
            let client = self.client.as_str();
            emit!(level, suppressed, client, facility, "{message}");
        }
    }

    /// A librdkafka error event. The end of a partition (reported when `enable.partition.eof`
    /// is on) is a normal event, logged at debug.
    pub fn error(&self, error: KafkaError, reason: &str) {
        let eof = matches!(error, KafkaError::PartitionEOF(_))
            || error.rdkafka_error_code() == Some(RDKafkaErrorCode::PartitionEOF);
        let level = if eof {
            tracing::Level::DEBUG
        } else {
            tracing::Level::ERROR
        };
        let error = error.to_string();
        // Keyed by the reason alone: librdkafka logs a broker failure, then reports it with
        // the same text as an error event; one line says it.
        let key = || {
            let said = if reason.is_empty() { &error } else { reason };
            format!("{level} {}", shape(said))
        };
        if let Some(suppressed) = self.admit(level, key) {
            let error = redact(&error, &self.secrets);
            let reason = redact(reason, &self.secrets);
            let client = self.client.as_str();
            if eof {
                emit!(level, suppressed, client, reason = %reason, "Reached the end of a partition.");
            } else {
                emit!(level, suppressed, client, error = %error, reason = %reason, "The Kafka client reports an error.");
            }
        }
    }
}

/// The context of a Kafka client that needs nothing but its log: the reachability probe,
/// operators' readers, the demo's producer.
#[derive(Debug, Default)]
pub struct LogContext {
    pub log: ClientLog,
}

impl LogContext {
    pub fn new(client: impl Into<String>, config: &ClientConfig) -> Self {
        LogContext {
            log: ClientLog::new(client, config),
        }
    }
}

impl ClientContext for LogContext {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, log_message: &str) {
        self.log.log(level, fac, log_message)
    }

    fn error(&self, error: KafkaError, reason: &str) {
        self.log.error(error, reason)
    }
}

impl ConsumerContext for LogContext {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_message_goes_out_once_a_window_with_the_count_of_the_others() {
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        let mut l = RateLimiter::new(Duration::from_secs(60));
        assert_eq!(l.check("refused", at(0)), Some(0));
        for s in 1..=59 {
            assert_eq!(l.check("refused", at(s)), None, "second {s}");
        }
        // Another message is not held back by the first.
        assert_eq!(l.check("other", at(30)), Some(0));
        // A window after the last line out, the next says how many were suppressed.
        assert_eq!(l.check("refused", at(60)), Some(59));
        assert_eq!(l.check("refused", at(61)), None);
        assert_eq!(l.check("refused", at(200)), Some(1));
        // Nothing suppressed in between: nothing to say.
        assert_eq!(l.check("refused", at(300)), Some(0));
    }

    #[test]
    fn a_storm_gives_one_line_a_minute() {
        let t0 = Instant::now();
        let mut l = RateLimiter::default();
        let mut out = Vec::new();
        // Ten attempts a second for ten minutes.
        for i in 0..6000u64 {
            if let Some(n) = l.check("refused", t0 + Duration::from_millis(i * 100)) {
                out.push(n);
            }
        }
        assert_eq!(out.len(), 10, "{out:?}");
        assert_eq!(out[0], 0);
        assert!(out[1..].iter().all(|&n| n == 599), "{out:?}");
        // The last minute's are counted, for the next line.
        assert_eq!(
            l.check("refused", t0 + Duration::from_secs(3600)),
            Some(599)
        );
        assert_eq!(out.iter().sum::<u64>() + 599 + out.len() as u64, 6000);
    }

    #[test]
    fn the_limiter_remembers_a_bounded_number_of_messages() {
        let t0 = Instant::now();
        let mut l = RateLimiter::default();
        for i in 0..(MAX_KEYS * 3) {
            assert_eq!(l.check(&format!("m{i}"), t0), Some(0));
        }
        assert!(l.seen.len() <= MAX_KEYS);
        // Once their window has passed, old messages make room first.
        let later = t0 + WINDOW;
        assert_eq!(l.check("new", later), Some(0));
        assert_eq!(l.seen.len(), 1);
    }

    #[test]
    fn numbers_and_librdkafka_remarks_do_not_make_a_message_new() {
        let a = "127.0.0.1:9092/1: Connect to ipv4#127.0.0.1:9092 failed: Connection refused (after 0ms in state CONNECT)";
        assert_eq!(
            shape(a),
            "#.#.#.#:#/#: Connect to ipv###.#.#.#:# failed: Connection refused"
        );
        // Another broker, a counter of librdkafka's own, the thread prefix of the log line.
        let b = "[thrd:127.0.0.1:9093/2]: 127.0.0.1:9093/2: Connect to ipv4#127.0.0.1:9093 failed: Connection refused (after 12ms in state CONNECT, 4 identical error(s) suppressed)";
        assert_eq!(shape(a), shape(b));
        assert_ne!(
            shape(a),
            shape(
                "127.0.0.1:9092/1: Connect to ipv4#127.0.0.1:9092 failed: Connection reset by peer"
            )
        );
        assert_ne!(shape(a), shape("GroupCoordinator: 127.0.0.1:9092: Connect to ipv4#127.0.0.1:9092 failed: Connection refused"));
    }

    #[test]
    fn secret_properties_are_redacted_from_log_lines() {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", "127.0.0.1:9092")
            .set("sasl.username", "runner")
            .set("sasl.password", "hunter2-pw")
            .set("ssl.key.password", "keypass-1")
            .set("sasl.oauthbearer.client.secret", "oauth-secret-1")
            .set("ssl.key.pem", "-----BEGIN PRIVATE KEY-----abc")
            .set("ssl.keystore.password", "abc");
        let secrets = secrets_of(&c);
        assert_eq!(secrets.len(), 4, "{secrets:?}");
        let line = "sasl.password = hunter2-pw, ssl.key.password = keypass-1, \
                    secret oauth-secret-1, pem -----BEGIN PRIVATE KEY-----abc, user runner";
        let r = redact(line, &secrets);
        for s in &secrets {
            assert!(!r.contains(s.as_str()), "{r}");
        }
        assert!(
            r.contains("user runner") && r.contains("sasl.password = <redacted>"),
            "{r}"
        );
        assert!(matches!(redact("nothing here", &secrets), Cow::Borrowed(_)));
    }

    #[test]
    fn librdkafka_levels_map_to_the_runner_levels() {
        use tracing::Level;
        assert_eq!(level_of(RDKafkaLogLevel::Critical), Level::ERROR);
        assert_eq!(level_of(RDKafkaLogLevel::Error), Level::ERROR);
        assert_eq!(level_of(RDKafkaLogLevel::Warning), Level::WARN);
        assert_eq!(level_of(RDKafkaLogLevel::Notice), Level::INFO);
        assert_eq!(level_of(RDKafkaLogLevel::Info), Level::INFO);
        assert_eq!(level_of(RDKafkaLogLevel::Debug), Level::DEBUG);
    }
}
