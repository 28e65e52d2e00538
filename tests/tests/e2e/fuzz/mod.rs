//! Property tests over generated inputs (proptest): the rules components as the runner loads
//! and calls them (`rules.rs`), and the whole runner on the mock cluster and a real database,
//! for both pipelines (`campaigns.rs`, `sales.rs`). The rules natively are the oracle of what
//! must become of an input.
//!
//! `make test` runs a short pass; `make fuzz` a long one, sized by `FUZZ_RULES_CASES` (inputs
//! per rules property), `FUZZ_E2E_BATCHES` (batches per end-to-end property) and
//! `FUZZ_E2E_BATCH` (messages per batch at most). Each property prints its figures: inputs run
//! and outcomes by class. A failure prints the input that broke the property (the rules
//! properties shrink it to a minimal one first).

mod campaigns;
mod inputs;
mod rules;
mod sales;

use proptest::strategy::Strategy;
use proptest::test_runner::{Config, TestCaseError, TestRunner};
use std::cell::RefCell;
use std::collections::BTreeMap;
use std::time::Instant;

/// A number from the environment, or `default`.
fn env_number(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.replace('_', "").parse().ok())
        .unwrap_or(default)
}

/// Outcomes by class, counted.
#[derive(Debug, Default)]
pub struct Tally {
    inputs: u64,
    classes: BTreeMap<String, u64>,
}

impl Tally {
    pub fn input(&mut self, class: impl Into<String>) {
        self.inputs += 1;
        *self.classes.entry(class.into()).or_default() += 1;
    }

    /// Counts `n` of something that is not an input (e.g. drafts checked).
    pub fn add(&mut self, class: impl Into<String>, n: u64) {
        *self.classes.entry(class.into()).or_default() += n;
    }

    fn print(&self, name: &str, secs: f64, extra: &str) {
        println!("fuzz {name}: {} inputs in {secs:.1} s{extra}", self.inputs);
        for (class, n) in &self.classes {
            println!("    {class:<40} {n:>10}");
        }
    }
}

/// Runs `check` on `cases` inputs from `strategy`, shrinking a failure to a minimal input
/// (up to `shrink_iters` steps), and prints the figures.
fn property<S: Strategy>(
    name: &str,
    cases: usize,
    shrink_iters: u32,
    strategy: S,
    check: impl Fn(S::Value, &mut Tally) -> Result<(), TestCaseError>,
) where
    S::Value: std::fmt::Debug,
{
    let tally = RefCell::new(Tally::default());
    let mut runner = TestRunner::new(Config {
        cases: cases as u32,
        max_shrink_iters: shrink_iters,
        failure_persistence: None,
        ..Config::default()
    });
    let started = Instant::now();
    let result = runner.run(&strategy, |input| check(input, &mut tally.borrow_mut()));
    tally
        .borrow()
        .print(name, started.elapsed().as_secs_f64(), "");
    if let Err(e) = result {
        panic!("fuzz {name}: {}", abbreviate(&e.to_string()));
    }
}

/// `s` with every run of more than 16 identical characters written as the character and its
/// count, and cut after 20,000 characters: a failing input stays readable.
fn abbreviate(s: &str) -> String {
    let mut out = String::new();
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        let mut n = 1;
        while chars.peek() == Some(&c) {
            chars.next();
            n += 1;
        }
        if n > 16 {
            out.push_str(&format!("{c}[×{n}]"));
        } else {
            out.extend(std::iter::repeat_n(c, n));
        }
        if out.len() > 20_000 {
            out.push_str(" […]");
            break;
        }
    }
    out
}

/// Bytes that print as an escaped byte string (`b"{\"a\":\xff"`), so that a failing input
/// reads as what was sent.
#[derive(Clone, PartialEq, Eq)]
pub struct Bytes(pub Vec<u8>);

impl std::fmt::Debug for Bytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "b\"{}\"", self.0.escape_ascii())
    }
}

/// A generated Kafka message.
#[derive(Debug, Clone)]
pub struct Input<V> {
    pub key: Option<Vec<u8>>,
    pub value: V,
    pub headers: Vec<(String, Option<Vec<u8>>)>,
}

/// Sends messages with any key, value and headers, and says where each one landed.
pub struct Sender {
    producer: rdkafka::producer::FutureProducer,
    topic: String,
}

impl Sender {
    pub fn new(brokers: &str, topic: &str) -> anyhow::Result<Sender> {
        Ok(Sender {
            producer: rdkafka::ClientConfig::new()
                .set("bootstrap.servers", brokers)
                .set("message.max.bytes", "4000000")
                .create()?,
            topic: topic.to_string(),
        })
    }

    /// Sends one message (to `partition`, or where its key says) and returns its partition and
    /// offset.
    pub async fn send(
        &self,
        partition: Option<i32>,
        key: Option<&[u8]>,
        value: Option<&[u8]>,
        headers: &[(String, Option<Vec<u8>>)],
    ) -> anyhow::Result<(i32, i64)> {
        use rdkafka::message::{Header, OwnedHeaders};
        let mut r = rdkafka::producer::FutureRecord::<[u8], [u8]>::to(&self.topic);
        if let Some(k) = key {
            r = r.key(k);
        }
        if let Some(v) = value {
            r = r.payload(v);
        }
        if let Some(p) = partition {
            r = r.partition(p);
        }
        if !headers.is_empty() {
            r = r.headers(headers.iter().fold(OwnedHeaders::new(), |h, (k, v)| {
                h.insert(Header {
                    key: k,
                    value: v.as_deref(),
                })
            }));
        }
        let delivery = self
            .producer
            .send(r, std::time::Duration::from_secs(30))
            .await
            .map_err(|(e, _)| e)?;
        Ok((delivery.partition, delivery.offset))
    }
}

/// Reads a topic from its beginning as a `read_committed` consumer, keeping what it read.
pub struct Reader {
    consumer: rdkafka::consumer::StreamConsumer,
    pub messages: Vec<rdkafka::message::OwnedMessage>,
}

impl Reader {
    pub fn new(brokers: &str, topic: &str, partitions: i32) -> anyhow::Result<Reader> {
        use rdkafka::consumer::Consumer;
        let consumer: rdkafka::consumer::StreamConsumer = rdkafka::ClientConfig::new()
            .set("bootstrap.servers", brokers)
            .set("group.id", e2e_tests::unique("fuzz-reader"))
            .set("enable.auto.commit", "false")
            .set("isolation.level", "read_committed")
            .set("fetch.message.max.bytes", "8000000")
            .create()?;
        let mut tpl = rdkafka::TopicPartitionList::new();
        for p in 0..partitions {
            tpl.add_partition_offset(topic, p, rdkafka::Offset::Beginning)?;
        }
        consumer.assign(&tpl)?;
        Ok(Reader {
            consumer,
            messages: Vec::new(),
        })
    }

    /// Reads until `n` messages in all were read or `timeout` passes, then for `grace` more (to
    /// see any message past `n`); returns how many were read in all.
    pub async fn read_to(
        &mut self,
        n: usize,
        timeout: std::time::Duration,
        grace: std::time::Duration,
    ) -> usize {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut until = deadline;
        loop {
            if self.messages.len() >= n && until == deadline {
                until = (tokio::time::Instant::now() + grace).min(deadline);
            }
            match tokio::time::timeout_at(until, self.consumer.recv()).await {
                Ok(Ok(m)) => self.messages.push(m.detach()),
                Ok(Err(e)) => tracing_error(&e),
                Err(_) => return self.messages.len(),
            }
        }
    }
}

fn tracing_error(e: &rdkafka::error::KafkaError) {
    eprintln!("fuzz reader: {e}");
}

/// A record's headers, in order (a null value as empty).
pub fn header_list(m: &rdkafka::message::OwnedMessage) -> Vec<(String, Vec<u8>)> {
    use rdkafka::message::{Headers, Message};
    m.headers()
        .map(|hs| {
            hs.iter()
                .map(|h| (h.key.to_string(), h.value.unwrap_or_default().to_vec()))
                .collect()
        })
        .unwrap_or_default()
}

/// The value of the first header named `name` at or after position `from`.
pub fn header_from<'a>(hs: &'a [(String, Vec<u8>)], from: usize, name: &str) -> Option<&'a str> {
    hs.get(from..)?
        .iter()
        .find(|(k, _)| k == name)
        .and_then(|(_, v)| std::str::from_utf8(v).ok())
}

/// Checks that a dead letter carries what the message was: its key and value byte for byte,
/// its headers first (a null header value as empty), then the runner's; returns the runner's
/// reason.
pub fn check_dead_letter<V>(
    m: &rdkafka::message::OwnedMessage,
    input: &Input<V>,
    value: Option<&[u8]>,
) -> Result<String, String> {
    use rdkafka::message::Message;
    if m.key() != input.key.as_deref() {
        return Err("the dead letter's key is not the message's".into());
    }
    if m.payload() != value {
        return Err("the dead letter's value is not the message's".into());
    }
    let hs = header_list(m);
    let n = input.headers.len();
    let original: Vec<(String, Vec<u8>)> = input
        .headers
        .iter()
        .map(|(k, v)| (k.clone(), v.clone().unwrap_or_default()))
        .collect();
    if hs.get(..n) != Some(&original[..]) {
        return Err("the dead letter does not start with the message's headers".into());
    }
    header_from(&hs, n, runner::headers::DLQ_REASON)
        .map(str::to_string)
        .ok_or_else(|| "the dead letter has no reason".into())
}

/// Where a record came from: its source partition and offset headers, after the first `from`.
pub fn source_of(hs: &[(String, Vec<u8>)], from: usize) -> Option<(i32, i64)> {
    Some((
        header_from(hs, from, runner::headers::SOURCE_PARTITION)?
            .parse()
            .ok()?,
        header_from(hs, from, runner::headers::SOURCE_OFFSET)?
            .parse()
            .ok()?,
    ))
}

/// Where a draft came from: its `provenance` header's source partition and offset.
pub fn draft_source(hs: &[(String, Vec<u8>)]) -> Option<(i32, i64)> {
    let p = runner::pipelines::campaigns::provenance::Provenance::parse(header_from(
        hs,
        0,
        runner::pipelines::campaigns::header::PROVENANCE,
    )?)?;
    Some((p.source_partition, p.source_offset))
}

/// A multi-threaded runtime for a property that drives the runner from a plain test.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a runtime")
}
