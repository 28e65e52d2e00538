//! The runner's metrics, in one Prometheus registry (the `prometheus` crate: label values
//! escaped, the text format rendered by it). Every series carries the pipeline it belongs to.
//! Latencies are histograms (atomic buckets, nothing locked on the hot path); `/status` and the
//! benchmarks read quantiles back from the buckets ([`Quantiles`]).

use prometheus::core::Collector;
use prometheus::{Encoder, Histogram, HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec};
use prometheus::{Opts, Registry, TextEncoder};
use serde::Serialize;

/// Bucket bounds of every latency histogram, in seconds: from 50 µs, each 10% above the one
/// before, to about a minute (148 buckets). A quantile read back is exact to within its bucket
/// (10% wide), and linear interpolation inside the bucket usually does better.
pub fn latency_buckets() -> Vec<f64> {
    let mut b = Vec::new();
    let mut v = 50e-6;
    while v < 70.0 {
        b.push(v);
        v *= 1.1;
    }
    b
}

/// The registry and every metric vector; a pipeline's [`crate::events::Events`] holds the
/// series labelled with its name.
#[derive(Debug, Clone)]
pub struct Metrics {
    pub registry: Registry,
    pub(crate) received: IntCounterVec,
    pub(crate) delivered: IntCounterVec,
    pub(crate) records_delivered: IntCounterVec,
    pub(crate) offsets_stored: IntCounterVec,
    pub(crate) batches: IntCounterVec,
    pub(crate) sink_retries: IntCounterVec,
    pub(crate) partitions_fenced: IntCounterVec,
    pub(crate) producers_lost: IntCounterVec,
    pub(crate) skipped: IntCounterVec,
    pub(crate) dead_lettered: IntCounterVec,
    pub(crate) rules_swaps: IntCounterVec,
    pub(crate) windows_updated: IntCounterVec,
    pub(crate) windows_final: IntCounterVec,
    pub(crate) watermark: IntGaugeVec,
    pub(crate) topic_watermark: IntGaugeVec,
    pub(crate) rules_refused: IntCounterVec,
    pub(crate) rules_info: IntGaugeVec,
    pub(crate) kafka_unreachable: IntGaugeVec,
    pub(crate) sink_failing: IntGaugeVec,
    pub(crate) latency: HistogramVec,
    pub(crate) stages: HistogramVec,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

fn counter(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let c = IntCounterVec::new(Opts::new(format!("runner_{name}"), help), labels)
        .expect("a valid counter");
    r.register(Box::new(c.clone())).expect("registered once");
    c
}

fn gauge(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    let g =
        IntGaugeVec::new(Opts::new(format!("runner_{name}"), help), labels).expect("a valid gauge");
    r.register(Box::new(g.clone())).expect("registered once");
    g
}

fn histogram(r: &Registry, name: &str, help: &str, labels: &[&str]) -> HistogramVec {
    let h = HistogramVec::new(
        HistogramOpts::new(format!("runner_{name}"), help).buckets(latency_buckets()),
        labels,
    )
    .expect("a valid histogram");
    r.register(Box::new(h.clone())).expect("registered once");
    h
}

impl Metrics {
    pub fn new() -> Metrics {
        let r = Registry::new();
        let p = &["pipeline"];
        let pr = &["pipeline", "reason"];
        Metrics {
            received: counter(
                &r,
                "messages_received_total",
                "Input messages taken from the pipeline's topic.",
                p,
            ),
            delivered: counter(
                &r,
                "messages_delivered_total",
                "Input messages whose output is in both sinks.",
                p,
            ),
            records_delivered: counter(
                &r,
                "records_delivered_total",
                "Output records written to both sinks.",
                p,
            ),
            offsets_stored: counter(
                &r,
                "offsets_stored_total",
                "Input messages whose offsets were committed after both sinks.",
                p,
            ),
            batches: counter(
                &r,
                "units_committed_total",
                "Units (runs of one partition's messages) durable in both sinks.",
                p,
            ),
            sink_retries: counter(
                &r,
                "sink_retries_total",
                "Sink writes retried after a failure.",
                &["pipeline", "sink"],
            ),
            partitions_fenced: counter(
                &r,
                "partitions_fenced_total",
                "Partitions given up because another runner claimed them.",
                p,
            ),
            producers_lost: counter(
                &r,
                "producers_lost_total",
                "Transactional producers given up because a call did not return; their partitions were taken over again.",
                p,
            ),
            skipped: counter(
                &r,
                "skipped_total",
                "Valid messages that produced nothing, by reason.",
                pr,
            ),
            dead_lettered: counter(
                &r,
                "dead_lettered_total",
                "Messages sent to the dead-letter topic, by reason.",
                pr,
            ),
            rules_swaps: counter(
                &r,
                "rules_swaps_total",
                "Rules components swapped in while running.",
                p,
            ),
            windows_updated: counter(
                &r,
                "window_updates_total",
                "Event-time windows whose sums were updated (store revenue).",
                p,
            ),
            windows_final: counter(
                &r,
                "windows_final_total",
                "Event-time windows made final and published by this runner (store revenue).",
                p,
            ),
            watermark: gauge(
                &r,
                "watermark_seconds",
                "An input partition's watermark, unix seconds: its windows ending at or before it are closed (store revenue).",
                &["pipeline", "partition"],
            ),
            topic_watermark: gauge(
                &r,
                "topic_watermark_seconds",
                "The least watermark of the input topic's partitions, unix seconds: windows ending at or before it are final (store revenue).",
                p,
            ),
            rules_refused: counter(
                &r,
                "rules_refused_total",
                "Rules components refused at reload, by reason.",
                pr,
            ),
            rules_info: gauge(
                &r,
                "rules_info",
                "The rules in service (1 for the current version).",
                &["pipeline", "version", "sha256"],
            ),
            kafka_unreachable: gauge(
                &r,
                "kafka_unreachable",
                "1 while the broker does not answer metadata probes.",
                p,
            ),
            sink_failing: gauge(
                &r,
                "sink_failing",
                "1 while writes to the sink are failing and being retried.",
                &["pipeline", "sink"],
            ),
            latency: histogram(
                &r,
                "end_to_end_latency_seconds",
                "From an input message's Kafka timestamp to its results committed in both sinks.",
                p,
            ),
            stages: histogram(
                &r,
                "stage_seconds",
                "Time a unit (or a message, for fetch and queued) spent in each stage.",
                &["pipeline", "stage"],
            ),
            registry: r,
        }
    }

    /// Registers a metric of a pipeline's own (e.g. the campaign pipeline's subscriber cache).
    pub fn register(&self, c: impl Collector + Clone + 'static) -> prometheus::Result<()> {
        self.registry.register(Box::new(c))
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut out)
            .expect("the text encoder writes to memory");
        String::from_utf8(out).expect("the text format is UTF-8")
    }
}

/// Quantiles of a latency histogram, in milliseconds.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Latency {
    pub samples: u64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    /// The upper bound of the highest bucket that holds a sample.
    pub max_ms: f64,
}

/// A histogram's cumulative bucket counts at one moment: the difference of two is the
/// histogram of what happened between them.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Quantiles {
    bounds: Vec<f64>,
    /// Samples per bucket (not cumulative); the last is above the last bound.
    counts: Vec<u64>,
}

impl Quantiles {
    pub fn of(h: &Histogram) -> Quantiles {
        let m = h.collect();
        let Some(metric) = m.first().and_then(|f| f.get_metric().first()) else {
            return Quantiles::default();
        };
        let hist = metric.get_histogram();
        let mut bounds = Vec::new();
        let mut counts = Vec::new();
        let mut below = 0;
        for b in hist.get_bucket() {
            bounds.push(b.upper_bound());
            counts.push(b.cumulative_count() - below);
            below = b.cumulative_count();
        }
        counts.push(hist.get_sample_count() - below);
        Quantiles { bounds, counts }
    }

    /// What was recorded after `earlier` (a snapshot of the same histogram).
    pub fn since(&self, earlier: &Quantiles) -> Quantiles {
        if earlier.counts.len() != self.counts.len() {
            return self.clone();
        }
        Quantiles {
            bounds: self.bounds.clone(),
            counts: self
                .counts
                .iter()
                .zip(&earlier.counts)
                .map(|(a, b)| a.saturating_sub(*b))
                .collect(),
        }
    }

    /// Adds what `other` (a snapshot of the same histogram, or a difference of two) holds.
    pub fn add(&mut self, other: &Quantiles) {
        if self.counts.is_empty() {
            *self = other.clone();
        } else if self.counts.len() == other.counts.len() {
            for (a, b) in self.counts.iter_mut().zip(&other.counts) {
                *a += b;
            }
        }
    }

    pub fn samples(&self) -> u64 {
        self.counts.iter().sum()
    }

    /// The `q` quantile (0..=1) in seconds, interpolated linearly inside its bucket.
    pub fn quantile(&self, q: f64) -> f64 {
        let n = self.samples();
        if n == 0 {
            return 0.0;
        }
        let rank = (q * n as f64).ceil().clamp(1.0, n as f64);
        let mut seen = 0u64;
        for (i, &c) in self.counts.iter().enumerate() {
            if c > 0 && (seen + c) as f64 >= rank {
                let lo = if i == 0 { 0.0 } else { self.bounds[i - 1] };
                let Some(&hi) = self.bounds.get(i) else {
                    return lo;
                };
                return lo + (hi - lo) * (rank - seen as f64) / c as f64;
            }
            seen += c;
        }
        self.bounds.last().copied().unwrap_or(0.0)
    }

    /// The upper bound of the highest bucket holding a sample, in seconds.
    pub fn max(&self) -> f64 {
        match self.counts.iter().rposition(|c| *c > 0) {
            None => 0.0,
            Some(i) => self
                .bounds
                .get(i)
                .or(self.bounds.last())
                .copied()
                .unwrap_or(0.0),
        }
    }

    pub fn latency(&self) -> Latency {
        Latency {
            samples: self.samples(),
            p50_ms: self.quantile(0.50) * 1e3,
            p99_ms: self.quantile(0.99) * 1e3,
            max_ms: self.max() * 1e3,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_come_back_from_the_buckets_within_their_width() {
        let m = Metrics::new();
        let h = m.latency.with_label_values(&["p"]);
        let empty = Quantiles::of(&h);
        assert_eq!(empty.latency(), Latency::default());
        for ms in 1..=1000u64 {
            h.observe(ms as f64 / 1e3);
        }
        let all = Quantiles::of(&h);
        let l = all.latency();
        assert_eq!(l.samples, 1000);
        // Within the width of the bucket that holds the quantile.
        assert!((l.p50_ms - 500.0).abs() < 50.0, "{l:?}");
        assert!((l.p99_ms - 990.0).abs() < 99.0, "{l:?}");
        assert!(l.max_ms >= 1000.0 && l.max_ms < 1100.0, "{l:?}");
        // What came after a snapshot only.
        for _ in 0..100 {
            h.observe(0.005);
        }
        let later = Quantiles::of(&h).since(&all).latency();
        assert_eq!(later.samples, 100);
        assert!((later.p99_ms - 5.0).abs() < 0.5, "{later:?}");
        assert!(later.p50_ms > 4.5 && later.max_ms < 5.6, "{later:?}");
    }

    #[test]
    fn label_values_are_escaped_in_the_text_format() {
        let m = Metrics::new();
        m.dead_lettered
            .with_label_values(&["p", "a\"b\\c\nd"])
            .inc();
        let text = m.render();
        assert!(
            text.contains(r#"runner_dead_lettered_total{pipeline="p",reason="a\"b\\c\nd"} 1"#),
            "{text}"
        );
    }
}
