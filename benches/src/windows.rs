//! Store revenue end to end against the broker's own consume ceiling, in the same run on the
//! same services. Each run:
//! 1. Preload: `events` sales made by `runner produce sales`'s generator (`stores` stores,
//!    keyed by store, prices with two decimals, event time advancing ~1,000 sales per event
//!    second from a fixed base with a few seconds of jitter, one in 10,000 sent two minutes
//!    behind) into a fresh topic of 4 partitions, as fast as a producer with lz4, large batches
//!    and a linger takes them. Information only.
//! 2. Consume ceiling: a plain read_committed consumer, assigned every partition from the
//!    beginning, counts them all (no parsing): with the runner's consumer settings but a short
//!    `fetch.queue.backoff.ms` (the broker's ceiling), and with the runner's settings unchanged.
//! 3. Rules: the same payloads in batches of 1,000, validated by the same logic natively (the
//!    `sales-rules` rlib) and as the component through the runner's sandbox (`SalesEvaluator`,
//!    deadlines and limits on, and once more without deadlines); per event, and the ratio
//!    WASM / native.
//! 4. End to end: the runner started in-process on the topic with a fresh database and group,
//!    from `app::start` until PostgreSQL holds every partition's position at the end of the
//!    topic; then the windows' totals plus the late sales' prices must equal what was preloaded.

use crate::broker::{Broker, INPUT_PARTITIONS};
use crate::cpu::{machine_busy_secs, postgres_secs, proc_stat, thread_secs};
use crate::report::Report;
use anyhow::{Context, Result};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::producer::{BaseRecord, Producer, ThreadedProducer};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use runner::app::{self, RunOptions};
use runner::config::{Config, Sources};
use runner::pipelines::store_revenue::contract::{
    PackedPayloads, RulesEngine, RulesHandle, SalesEvaluator,
};
use runner::sandbox::SandboxLimits;
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Event time of the first sale: 2025-11-27T15:00:00Z, on a window boundary.
const BASE_TS: i64 = 1_764_255_600;
/// Sales per second of event time.
const PER_EVENT_SECOND: usize = 1000;
/// Event time runs up to this many seconds behind the stream (uniform 0..=JITTER).
const JITTER_SECS: u64 = 3;
/// One sale in this many is sent `LATE_BY_SECS` behind: past the default allowed lateness
/// (30 s) and window (30 s), so its partition's watermark has passed its window.
const LATE_ONE_IN: u64 = 10_000;
const LATE_BY_SECS: i64 = 120;
const MINOR_DIGITS: u8 = 2;
/// The end-to-end target, events/s (or 0.8 of the consume ceiling where that is lower).
const TARGET_RATE: f64 = 500_000.0;
/// Messages per rules call in the rules phase.
const RULES_BATCH: usize = 1000;
/// The runner's trigger in this workload (see the notes).
const TRIGGER: &str = "1s";
/// How often PostgreSQL is asked where the runner stands.
const POLL: Duration = Duration::from_millis(50);
/// A phase that takes longer than this has failed.
const PHASE_LIMIT: Duration = Duration::from_secs(900);
/// The preloaded sales, generated once from a seed and sent again each run.
struct Input {
    bytes: Vec<u8>,
    /// Where each sale's value ends in `bytes`.
    ends: Vec<usize>,
    /// Each sale's store number (its key is `store-{n}`).
    stores: Vec<u32>,
    /// The sum of every price, in cents.
    total_minor: i64,
}

impl Input {
    fn len(&self) -> usize {
        self.ends.len()
    }

    fn get(&self, i: usize) -> &[u8] {
        let start = if i == 0 { 0 } else { self.ends[i - 1] };
        &self.bytes[start..self.ends[i]]
    }
}

/// The sales of `runner produce sales` (`runner::produce::sales`): `stores` stores round robin,
/// keyed by store, `PER_EVENT_SECOND` sales per second of event time from `BASE_TS`, each up
/// to `JITTER_SECS` early, prices drawn between 1.00 and 19.99, one in `LATE_ONE_IN` sent
/// `LATE_BY_SECS` behind where its partition's watermark has surely passed its window.
fn generate(events: usize, stores: u32, seed: u64) -> Result<Input> {
    use runner::produce::sales::{SaleKind, SalesGenerator, SalesOptions};
    let opts = SalesOptions {
        stores,
        rate: PER_EVENT_SECOND as f64 / f64::from(stores.max(1)),
        simulated_start: Some(BASE_TS),
        price_range: Some((100, 1999)),
        jitter: Duration::from_secs(JITTER_SECS),
        late_fraction: 1.0 / LATE_ONE_IN as f64,
        late_by: Duration::from_secs(LATE_BY_SECS as u64),
        seed: Some(seed),
        ..SalesOptions::default()
    };
    opts.validate()?;
    let mut generator = SalesGenerator::new(&opts, seed, BASE_TS * 1000);
    let mut input = Input {
        bytes: Vec::with_capacity(events * 80),
        ends: Vec::with_capacity(events),
        stores: Vec::with_capacity(events),
        total_minor: 0,
    };
    for _ in 0..events {
        let sale = generator.next_sale();
        debug_assert!(matches!(sale.kind, SaleKind::OnTime | SaleKind::Late));
        let store = sale
            .store
            .strip_prefix("store-")
            .and_then(|n| n.parse::<u32>().ok())
            .context("a store id store-N")?;
        input.bytes.extend_from_slice(&sale.value);
        input.ends.push(input.bytes.len());
        input.stores.push(store);
        input.total_minor += sale.price_cents;
    }
    Ok(input)
}

/// CPU time spent so far, in seconds (USER_HZ = 1/100 s on Linux): the whole machine's busy time
/// (every process, every core), this process's (the runner under test and the bench's own
/// clients run in it), the broker's and PostgreSQL's (every `postgres` process, with the
/// backends that ended since).
#[derive(Debug, Clone, Copy, Default)]
struct Cpu {
    machine: f64,
    process: f64,
    broker: f64,
    postgres: f64,
}

impl Cpu {
    fn now(broker_pid: Option<u32>) -> Cpu {
        let own = |p: &str| proc_stat(Path::new(p)).map_or(0.0, |(_, o, _)| o);
        Cpu {
            machine: machine_busy_secs(),
            process: own("/proc/self/stat"),
            broker: broker_pid.map_or(0.0, |p| own(&format!("/proc/{p}/stat"))),
            postgres: postgres_secs(),
        }
    }

    fn since(&self, before: &Cpu) -> Cpu {
        Cpu {
            machine: self.machine - before.machine,
            process: self.process - before.process,
            broker: self.broker - before.broker,
            postgres: self.postgres - before.postgres,
        }
    }
}

/// A phase: how long it took for how many items, and the CPU it cost.
#[derive(Debug, Clone, Copy)]
struct Phase {
    secs: f64,
    items: usize,
    cpu: Cpu,
}

impl Phase {
    fn rate(&self) -> f64 {
        self.items as f64 / self.secs
    }

    /// µs of CPU per item.
    fn us(&self, of: fn(&Cpu) -> f64) -> f64 {
        of(&self.cpu) * 1e6 / self.items as f64
    }
}

/// Times a phase that starts now.
struct Timer {
    t: Instant,
    cpu: Cpu,
    broker_pid: Option<u32>,
}

impl Timer {
    fn start(broker_pid: Option<u32>) -> Timer {
        Timer {
            cpu: Cpu::now(broker_pid),
            t: Instant::now(),
            broker_pid,
        }
    }

    fn done(&self, items: usize) -> Phase {
        Phase {
            secs: self.t.elapsed().as_secs_f64(),
            items,
            cpu: Cpu::now(self.broker_pid).since(&self.cpu),
        }
    }
}

/// The broker's JVM, whose CPU is reported apart (`scripts/kafka.sh pid NAME 1`).
fn broker_pid(broker: &Broker) -> Option<u32> {
    let Broker::Kafka { name, .. } = broker else {
        return None;
    };
    let out = std::process::Command::new("bash")
        .args(["scripts/kafka.sh", "pid", name, "1"])
        .output()
        .ok()?;
    String::from_utf8_lossy(&out.stdout).trim().parse().ok()
}

/// Counts a producer's undelivered records.
#[derive(Default)]
struct Failures(AtomicUsize);

impl rdkafka::ClientContext for Failures {}

impl rdkafka::producer::ProducerContext for Failures {
    type DeliveryOpaque = ();

    fn delivery(&self, result: &rdkafka::message::DeliveryResult<'_>, _: ()) {
        if result.is_err() {
            self.0.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Sends every sale, keyed by store, and waits until the broker has them all.
fn preload(brokers: &str, topic: &str, input: &Input) -> Result<()> {
    use rdkafka::config::FromClientConfigAndContext;
    let producer = ThreadedProducer::from_config_and_context(
        ClientConfig::new()
            .set("bootstrap.servers", brokers)
            // No duplicates on a retry: the topic must hold each sale once.
            .set("enable.idempotence", "true")
            .set("compression.type", "lz4")
            .set("linger.ms", "20")
            .set("batch.size", "1000000")
            .set("batch.num.messages", "100000")
            .set("queue.buffering.max.messages", "1000000"),
        Failures::default(),
    )?;
    let keys: BTreeMap<u32, String> = input
        .stores
        .iter()
        .map(|&s| (s, format!("store-{s}")))
        .collect();
    for i in 0..input.len() {
        let mut record = BaseRecord::to(topic)
            .key(keys[&input.stores[i]].as_bytes())
            .payload(input.get(i));
        loop {
            match producer.send(record) {
                Ok(()) => break,
                Err((_, r)) => {
                    record = r;
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
        }
    }
    producer.flush(Duration::from_secs(300))?;
    let failed = producer.context().0.load(Ordering::Relaxed);
    anyhow::ensure!(failed == 0, "{failed} sales were not delivered");
    let mut held = 0;
    for p in 0..INPUT_PARTITIONS {
        held += producer
            .client()
            .fetch_watermarks(topic, p, Duration::from_secs(10))?
            .1;
    }
    anyhow::ensure!(
        held == input.len() as i64,
        "the topic holds {held} records after the preload of {}",
        input.len()
    );
    Ok(())
}

/// Reads `partitions` of `topic` from the beginning with `config` (read_committed) until `want`
/// messages were seen, giving each to `visit`. Fails past `limit`.
fn read_all(
    config: &ClientConfig,
    topic: &str,
    partitions: i32,
    want: usize,
    limit: Duration,
    mut visit: impl FnMut(&rdkafka::message::BorrowedMessage<'_>) -> Result<()>,
) -> Result<()> {
    let consumer: BaseConsumer = config.create()?;
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions {
        tpl.add_partition_offset(topic, p, Offset::Beginning)?;
    }
    consumer.assign(&tpl)?;
    let deadline = Instant::now() + limit;
    let mut seen = 0;
    while seen < want {
        match consumer.poll(Duration::from_millis(100)) {
            Some(Ok(m)) => {
                visit(&m)?;
                seen += 1;
            }
            Some(Err(e)) => eprintln!("bench windows: consumer error: {e}"),
            None => anyhow::ensure!(
                Instant::now() < deadline,
                "{seen} of {want} messages read from {topic} within {limit:?}"
            ),
        }
    }
    Ok(())
}

/// The runner's configuration for one run: the store-revenue pipeline alone on `topic`, with a
/// fresh group and database. `BENCH_KAFKA_PROPERTIES` (TOML lines) go to `[kafka.properties]`
/// and `BENCH_PIPELINE` to `[pipelines.store_revenue]`, for comparing settings back to back.
fn runner_config(brokers: &str, url: &str, rules: &Path, topic: &str, id: &str) -> Result<Config> {
    let overlay = format!(
        "[kafka]\nbrokers = \"{brokers}\"\n[kafka.properties]\n{}\n[postgres]\nurl = \"{url}\"\n\
         [pipelines.campaigns]\nenabled = false\n\
         [pipelines.store_revenue]\nenabled = true\ninput_topic = \"{topic}\"\n\
         output_topic = \"revenue-{id}\"\ndead_letter_topic = \"sales-dlq-{id}\"\n\
         group_id = \"bench-{id}\"\ntrigger = \"{TRIGGER}\"\nminor_digits = {MINOR_DIGITS}\n{}\n\
         [pipelines.store_revenue.rules]\npath = \"{}\"\n",
        std::env::var("BENCH_KAFKA_PROPERTIES").unwrap_or_default(),
        std::env::var("BENCH_PIPELINE").unwrap_or_default(),
        rules.display()
    );
    Ok(Config::load(&Sources {
        file: None,
        overlay: Some(&overlay),
        env: false,
    })?)
}

/// How long the broker's ceiling consumer lets a partition's fetches wait when its local
/// queue is over librdkafka's thresholds (`fetch.queue.backoff.ms`, 1,000 ms by default: with
/// compressed batches of ~100,000 sales a fetch fills the queue at once, and the consumer then
/// waits most of each second).
const CEILING_FETCH_BACKOFF_MS: &str = "10";

/// Consume ceiling: every preloaded sale read and counted by one plain consumer with the
/// runner's consumer settings, plus `extra`.
async fn ceiling(
    config: &Config,
    extra: &[(&str, &str)],
    topic: &str,
    n: usize,
    pid: Option<u32>,
) -> Result<Phase> {
    let mut consumer = config
        .kafka
        .consumer_config(&format!("bench-ceiling-{}", uuid::Uuid::new_v4()));
    for (k, v) in extra {
        consumer.set(*k, *v);
    }
    let topic = topic.to_string();
    let t = Timer::start(pid);
    tokio::task::spawn_blocking(move || {
        read_all(&consumer, &topic, INPUT_PARTITIONS, n, PHASE_LIMIT, |_| {
            Ok(())
        })
    })
    .await??;
    Ok(t.done(n))
}

/// The rules per event (ns): natively, as the component through the runner's sandbox, and the
/// same without deadlines (epoch interruption off).
#[derive(Debug, Clone, Copy)]
struct RulesTimes {
    native: f64,
    wasm: f64,
    wasm_no_deadline: f64,
}

/// Validates every batch natively: ns per event, sales and their sum.
fn time_native(batches: &[PackedPayloads], m: usize) -> (f64, usize, i64) {
    let t = Instant::now();
    let (mut sales, mut sum) = (0, 0);
    for b in batches {
        let r = sales_rules::rules::validate_batch(
            std::hint::black_box(b).bytes(),
            b.ends(),
            MINOR_DIGITS,
        );
        sales += r.sales.len();
        sum += r.sales.iter().map(|s| s.amount_minor).sum::<i64>();
    }
    (t.elapsed().as_secs_f64() * 1e9 / m as f64, sales, sum)
}

/// Validates every batch in the component, the way the runner calls it: ns per event, sales and
/// their sum.
fn time_wasm(
    evaluator: &mut SalesEvaluator,
    batches: &[PackedPayloads],
    m: usize,
) -> Result<(f64, usize, i64)> {
    let t = Instant::now();
    let (mut sales, mut sum) = (0, 0);
    for b in batches {
        evaluator.refresh();
        let r = evaluator.validate(std::hint::black_box(b).bytes(), b.ends(), MINOR_DIGITS)?;
        sales += r.sales.len();
        sum += r.sales.iter().map(|s| s.amount_minor).sum::<i64>();
    }
    Ok((t.elapsed().as_secs_f64() * 1e9 / m as f64, sales, sum))
}

/// The rules on the first `m` sales, in batches of `RULES_BATCH`, each way; they must agree.
fn rules_phase(
    evaluator: &mut SalesEvaluator,
    no_deadline: &mut SalesEvaluator,
    input: &Input,
    m: usize,
) -> Result<RulesTimes> {
    let m = m.min(input.len());
    let batches: Vec<PackedPayloads> = (0..m)
        .collect::<Vec<_>>()
        .chunks(RULES_BATCH)
        .map(|idx| {
            let mut b = PackedPayloads::new();
            for &i in idx {
                b.push(input.get(i));
            }
            b
        })
        .collect();
    // Warm-up: caches, the instances, the allocators' pools.
    let warm = &batches[..batches.len().min(20)];
    time_native(warm, m);
    time_wasm(evaluator, warm, m)?;
    time_wasm(no_deadline, warm, m)?;
    let (native, n_sales, n_sum) = time_native(&batches, m);
    let (wasm, w_sales, w_sum) = time_wasm(evaluator, &batches, m)?;
    let (wasm_no_deadline, ..) = time_wasm(no_deadline, &batches, m)?;
    anyhow::ensure!(
        (n_sales, n_sum) == (w_sales, w_sum) && n_sales == m,
        "the rules disagree: native {n_sales} sales summing {n_sum}, WASM {w_sales} summing {w_sum}, of {m}"
    );
    Ok(RulesTimes {
        native,
        wasm,
        wasm_no_deadline,
    })
}

/// Everything one run measured.
struct Run {
    preload: Phase,
    /// The broker's consume ceiling.
    ceiling: Phase,
    /// The same consumer with the runner's consumer settings as they are.
    ceiling_runner: Phase,
    rules: RulesTimes,
    e2e: EndToEnd,
}

/// What one end-to-end run measured besides its phase.
struct EndToEnd {
    phase: Phase,
    /// From `app::start` to the first sale taken from the topic.
    startup_secs: f64,
    /// From the last sale taken from the topic to the last position committed.
    tail_secs: f64,
    late: u64,
}

async fn end_to_end(
    broker: &Broker,
    admin_url: &str,
    rules: &Path,
    topic: &str,
    input: &Input,
    pid: Option<u32>,
) -> Result<EndToEnd> {
    let n = input.len();
    let url = e2e_tests::fresh_database(admin_url, "bench_windows")
        .await
        .context("bench database")?;
    let pg = runner::db::connect(&url).await?;
    runner::pipelines::store_revenue::state::ensure_schema(&pg).await?;
    let id = uuid::Uuid::new_v4().simple().to_string();
    let config = runner_config(&broker.brokers(), &url, rules, topic, &id)?;
    let cfg = config
        .store_revenue
        .clone()
        .expect("the overlay enables the pipeline");
    broker
        .create_topic(&cfg.output_topic, INPUT_PARTITIONS)
        .await?;
    broker.create_topic(&cfg.dead_letter_topic, 1).await?;
    let consumer_config = config.kafka.consumer_config(&format!("bench-dlq-{id}"));
    let options = RunOptions {
        mock_cluster: matches!(broker, Broker::Mock(_)),
        ..RunOptions::default()
    };

    let threads = thread_secs();
    let t = Timer::start(pid);
    let running = app::start(config, options).await?;
    let (mut first, mut all_taken) = (None, None);
    let mut last_report = Instant::now();
    loop {
        let committed: i64 = pg
            .query_one(
                "SELECT coalesce(sum(next_offset), 0)::int8 FROM store_revenue_partitions",
                &[],
            )
            .await?
            .get(0);
        let received = running.store_revenue().stats().received;
        if first.is_none() && received > 0 {
            first = Some(t.t.elapsed());
        }
        if all_taken.is_none() && received >= n as u64 {
            all_taken = Some(t.t.elapsed());
        }
        if committed >= n as i64 {
            break;
        }
        if last_report.elapsed() > Duration::from_secs(5) {
            eprintln!("bench windows: {received} / {n} sales taken, {committed} committed");
            last_report = Instant::now();
        }
        anyhow::ensure!(
            t.t.elapsed() < PHASE_LIMIT,
            "the runner did not commit {n} sales within {PHASE_LIMIT:?}"
        );
        tokio::time::sleep(POLL).await;
    }
    let phase = t.done(n);
    let elapsed = t.t.elapsed();
    print_threads(&threads, &thread_secs(), phase.cpu.process);
    let stats = running.store_revenue().stats();
    running.stop().await?;

    // The windows' totals plus the late sales' prices must be what was preloaded.
    let others: Vec<_> = stats
        .dead_lettered
        .iter()
        .filter(|(code, n)| code.as_str() != "late" && **n > 0)
        .collect();
    anyhow::ensure!(
        others.is_empty(),
        "valid sales were dead-lettered: {others:?}"
    );
    let late = stats.dead_lettered.get("late").copied().unwrap_or(0);
    let dlq = cfg.dead_letter_topic.clone();
    let (late_minor, late_seen) = tokio::task::spawn_blocking(move || -> Result<(i64, u64)> {
        let (mut late_minor, mut late_seen) = (0i64, 0u64);
        read_all(
            &consumer_config,
            &dlq,
            1,
            late as usize,
            Duration::from_secs(60),
            |m| {
                let reason = m
                    .headers()
                    .and_then(|h| h.iter().find(|h| h.key == runner::headers::DLQ_REASON))
                    .and_then(|h| h.value)
                    .unwrap_or_default();
                anyhow::ensure!(
                    reason == b"late",
                    "a dead letter for {}",
                    String::from_utf8_lossy(reason)
                );
                let sale =
                    sales_rules::rules::validate(m.payload().unwrap_or_default(), MINOR_DIGITS)
                        .map_err(|r| anyhow::anyhow!("a late dead letter is not a sale: {r:?}"))?;
                late_minor += sale.amount_minor;
                late_seen += 1;
                Ok(())
            },
        )?;
        Ok((late_minor, late_seen))
    })
    .await??;
    let row = pg
        .query_one(
            "SELECT coalesce(sum(total_minor), 0)::int8, coalesce(sum(events), 0)::int8 FROM store_revenue_windows",
            &[],
        )
        .await?;
    let (windows_minor, windows_events): (i64, i64) = (row.get(0), row.get(1));
    let (got_minor, got_events) = (
        windows_minor + late_minor,
        windows_events as u64 + late_seen,
    );
    if (got_minor, got_events) != (input.total_minor, n as u64) {
        eprintln!(
            "bench windows: WRONG TOTALS: the windows hold {windows_minor} cents over {windows_events} sales and {late_seen} late sales {late_minor} cents: {got_minor} cents over {got_events} sales, where {} cents over {n} sales were preloaded",
            input.total_minor
        );
        anyhow::bail!(
            "the windows' totals do not add up to the preloaded sales ({got_minor} of {} cents, {got_events} of {n} sales): this run's figures mean nothing",
            input.total_minor
        );
    }
    eprintln!(
        "bench windows: totals check: {windows_events} sales in the windows + {late_seen} late = {n}; {windows_minor} + {late_minor} cents = the {} preloaded",
        input.total_minor
    );
    let first = first.unwrap_or(elapsed);
    Ok(EndToEnd {
        phase,
        startup_secs: first.as_secs_f64(),
        tail_secs: (elapsed - all_taken.unwrap_or(elapsed)).as_secs_f64(),
        late,
    })
}

/// Where this process's CPU went over the phase, by thread name (threads that ended during it
/// are not listed).
fn print_threads(before: &BTreeMap<String, f64>, after: &BTreeMap<String, f64>, process: f64) {
    let mut spent: Vec<(&String, f64)> = after
        .iter()
        .map(|(name, s)| (name, s - before.get(name).copied().unwrap_or(0.0)))
        .filter(|(_, s)| *s >= 0.01)
        .collect();
    spent.sort_by(|a, b| b.1.total_cmp(&a.1));
    let line: Vec<String> = spent
        .iter()
        .map(|(name, s)| format!("{name} {s:.2} s ({:.0}%)", 100.0 * s / process.max(1e-9)))
        .collect();
    eprintln!(
        "bench windows: runner CPU {process:.2} s by thread: {}",
        line.join(", ")
    );
}

pub async fn run(
    admin_url: &str,
    rules: &Path,
    events: usize,
    stores: u32,
    rules_events: usize,
    seed: u64,
    runs: usize,
) -> Result<Report> {
    anyhow::ensure!(
        events > 0 && stores > 0,
        "--events and --stores must be positive"
    );
    // The runner's own logs when RUST_LOG asks for them (e.g. RUST_LOG=runner=debug: every
    // commit and Kafka transaction with its time). Off by default: the late sales are
    // dead-lettered on purpose, and each commit would log them.
    if std::env::var_os("RUST_LOG").is_some() {
        e2e_tests::init_logging();
    }
    let broker = Broker::start()?;
    let pid = broker_pid(&broker);
    let t = Instant::now();
    let input = Arc::new(generate(events, stores, seed)?);
    eprintln!(
        "bench windows: {events} sales of {stores} stores generated in {:.1} s ({} MB of values, {} cents in all)",
        t.elapsed().as_secs_f64(),
        input.bytes.len() >> 20,
        input.total_minor
    );
    let probe_config = runner_config(&broker.brokers(), admin_url, rules, "sales", "probe")?;
    let limits: SandboxLimits = probe_config
        .store_revenue
        .as_ref()
        .expect("the overlay enables the pipeline")
        .rules
        .limits
        .clone();
    let evaluator = |interruptible: bool| -> Result<SalesEvaluator> {
        let engine = RulesEngine::new(SandboxLimits {
            interruptible,
            ..limits.clone()
        })?;
        let loaded = engine
            .load_file(rules)
            .with_context(|| format!("loading {}", rules.display()))?;
        Ok(SalesEvaluator::new(RulesHandle::new(loaded)))
    };
    let (mut with_deadlines, mut no_deadlines) = (evaluator(true)?, evaluator(false)?);

    let mut runs_done: Vec<Run> = Vec::new();
    for run in 1..=runs {
        let topic = format!("sales-{}", uuid::Uuid::new_v4().simple());
        broker.create_topic(&topic, INPUT_PARTITIONS).await?;
        let t = Timer::start(pid);
        let brokers = broker.brokers();
        let (topic_, input_) = (topic.clone(), input.clone());
        tokio::task::spawn_blocking(move || preload(&brokers, &topic_, &input_)).await??;
        let preload = t.done(events);
        let ceiling_fast = ceiling(
            &probe_config,
            &[("fetch.queue.backoff.ms", CEILING_FETCH_BACKOFF_MS)],
            &topic,
            events,
            pid,
        )
        .await?;
        let ceiling_runner = ceiling(&probe_config, &[], &topic, events, pid).await?;
        let rules_times =
            rules_phase(&mut with_deadlines, &mut no_deadlines, &input, rules_events)?;
        let e = end_to_end(&broker, admin_url, rules, &topic, &input, pid).await?;
        eprintln!(
            "bench windows: run {run}/{runs}: preload {:.0}/s; consume ceiling {:.0}/s ({:.2} µs machine CPU per event), {:.0}/s with the runner's consumer settings; rules per event {:.0} ns native, {:.0} ns WASM, {:.0} ns WASM without deadlines; end to end {:.0}/s in {:.2} s ({:.2} s to the first sale, {:.2} s from the last sale taken to its commit), {:.3} of the ceiling; CPU per event: runner {:.2} µs, broker {:.2} µs, PostgreSQL {:.2} µs, machine {:.2} µs; {} late",
            preload.rate(),
            ceiling_fast.rate(),
            ceiling_fast.us(|c| c.machine),
            ceiling_runner.rate(),
            rules_times.native,
            rules_times.wasm,
            rules_times.wasm_no_deadline,
            e.phase.rate(),
            e.phase.secs,
            e.startup_secs,
            e.tail_secs,
            e.phase.rate() / ceiling_fast.rate(),
            e.phase.us(|c| c.process),
            e.phase.us(|c| c.broker),
            e.phase.us(|c| c.postgres),
            e.phase.us(|c| c.machine),
            e.late,
        );
        runs_done.push(Run {
            preload,
            ceiling: ceiling_fast,
            ceiling_runner,
            rules: rules_times,
            e2e: e,
        });
    }

    let mut report = Report::new("windows");
    let col = |f: fn(&Run) -> f64| runs_done.iter().map(f).collect::<Vec<_>>();
    let ceiling_median = crate::report::median(&col(|r| r.ceiling.rate()));
    // 500,000/s, or 0.8 of the ceiling where the ceiling is lower.
    let rate_target = (ceiling_median >= TARGET_RATE).then_some((">=", TARGET_RATE));
    let ratio_target = (ceiling_median < TARGET_RATE).then_some((">=", 0.8));
    report.add(
        &format!("end to end ({events} sales, {stores} stores): start to all committed"),
        "events/s",
        col(|r| r.e2e.phase.rate()),
        rate_target,
    );
    report.add(
        "end to end / consume ceiling",
        "ratio",
        col(|r| r.e2e.phase.rate() / r.ceiling.rate()),
        ratio_target,
    );
    report.add(
        "end to end from the first sale taken (start-up left out)",
        "events/s",
        col(|r| r.e2e.phase.items as f64 / (r.e2e.phase.secs - r.e2e.startup_secs)),
        None,
    );
    report.add(
        "start-up: app::start to the first sale taken",
        "s",
        col(|r| r.e2e.startup_secs),
        None,
    );
    report.add(
        "tail: last sale taken to its position committed",
        "s",
        col(|r| r.e2e.tail_secs),
        None,
    );
    report.add(
        "runner process CPU per event, end to end",
        "µs",
        col(|r| r.e2e.phase.us(|c| c.process)),
        None,
    );
    report.add(
        "machine CPU per event, end to end",
        "µs",
        col(|r| r.e2e.phase.us(|c| c.machine)),
        None,
    );
    report.add(
        "broker CPU per event, end to end",
        "µs",
        col(|r| r.e2e.phase.us(|c| c.broker)),
        None,
    );
    report.add(
        "PostgreSQL CPU per event, end to end",
        "µs",
        col(|r| r.e2e.phase.us(|c| c.postgres)),
        None,
    );
    report.add(
        &format!(
            "consume ceiling: one plain consumer, count only (fetch.queue.backoff.ms = {CEILING_FETCH_BACKOFF_MS})"
        ),
        "events/s",
        col(|r| r.ceiling.rate()),
        None,
    );
    report.add(
        "consumer process CPU per event, ceiling",
        "µs",
        col(|r| r.ceiling.us(|c| c.process)),
        None,
    );
    report.add(
        "machine CPU per event, ceiling",
        "µs",
        col(|r| r.ceiling.us(|c| c.machine)),
        None,
    );
    report.add(
        "the same consumer with the runner's consumer settings unchanged",
        "events/s",
        col(|r| r.ceiling_runner.rate()),
        None,
    );
    report.add(
        "rules per event, native (batches of 1,000)",
        "ns",
        col(|r| r.rules.native),
        None,
    );
    report.add(
        "rules per event, WASM (batches of 1,000)",
        "ns",
        col(|r| r.rules.wasm),
        None,
    );
    report.add(
        "rules WASM / native",
        "ratio",
        col(|r| r.rules.wasm / r.rules.native),
        Some(("<=", 1.5)),
    );
    report.add(
        "rules WASM without deadlines (epoch interruption off) / native",
        "ratio",
        col(|r| r.rules.wasm_no_deadline / r.rules.native),
        None,
    );
    report.add(
        "rules (WASM) share of the runner's CPU per event",
        "ratio",
        col(|r| r.rules.wasm / 1000.0 / r.e2e.phase.us(|c| c.process)),
        None,
    );
    report.add(
        "preload (information: lz4, linger 20 ms, batches up to 1 MB)",
        "events/s",
        col(|r| r.preload.rate()),
        None,
    );
    report.add(
        "late sales (dead-lettered, counted in the check)",
        "sales",
        col(|r| r.e2e.late as f64),
        None,
    );
    report.notes.push(format!(
        "Broker: {}; topic of {INPUT_PARTITIONS} partitions, fresh per run. {events} sales (seed {seed}) of {stores} stores keyed by store, ~{} bytes each, prices 1.00–19.99 with two decimals, event time {PER_EVENT_SECOND} sales per event second from {} with 0–{JITTER_SECS} s of jitter, one in {LATE_ONE_IN} sent {LATE_BY_SECS} s behind (only where its partition's watermark has surely passed its window); the sales of `runner produce sales`, stores round robin.",
        broker.label(),
        input.bytes.len() / events,
        runner::pipelines::store_revenue::task::rfc3339(BASE_TS),
    ));
    report.notes.push(format!(
        "End to end: the runner in this process (store-revenue pipeline alone, fresh database and group, default settings except trigger = \"{TRIGGER}\"), timed from `app::start` (rules compiled, consumer group joined, partitions claimed) until `SELECT sum(next_offset) FROM store_revenue_partitions` (polled every {} ms) equals the sales preloaded. The trigger is 1 s instead of the default 10 s because positions reach PostgreSQL only at a trigger: the time from the last sale counted to its commit is up to one trigger, which at 10 s would outweigh the whole run; 1 s bounds it to a fraction of it (\"tail\" above). After each run the windows' total_minor and events plus the late dead letters' prices (read back from the dead-letter topic) must equal the preloaded sum and count, or the run fails.",
        POLL.as_millis()
    ));
    report.notes.push("Target: end to end ≥ 500,000 events/s, or ≥ 0.8 × the consume ceiling when the ceiling is below 500,000/s (the target is put on whichever of the two figures applies, from the median ceiling); rules WASM ≤ 1.5 × native.".into());
    report.notes.push(format!("Consume ceiling: one librdkafka consumer (BaseConsumer::poll, read_committed) assigned every partition from the beginning, counting messages without looking at them, in this process; the runner's consumer settings except fetch.queue.backoff.ms = {CEILING_FETCH_BACKOFF_MS}: with librdkafka's default of 1,000 ms a partition whose local queue is past queued.min.messages (100,000; one fetch of lz4 batches brings about that many sales) is not fetched again for a second, and the consumer idles most of the time (the figure \"with the runner's consumer settings unchanged\"; the runner consumes with those settings). Rules: the same payloads packed in batches of 1,000, the same Rust code (transforms/sales/src/rules.rs) natively as an rlib and as the component through the runner's sandbox (SalesEvaluator: epoch deadlines, memory limits, the result lifted and checked against the contract)."));
    report.notes.push("CPU per event: busy time over the phase (/proc), per sale: the whole machine; this process (the runner, or the ceiling's consumer); the broker's JVM; every postgres process (with backends that ended). The broker, PostgreSQL and the runner share the machine's cores.".into());
    Ok(report)
}
