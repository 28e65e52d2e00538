//! Latency at a steady rate, and the same with the rules swapped under load.
//! Campaigns at `rate`/s, each for a restaurant with `subscribers` subscribers, for `secs`;
//! latency is what the runner records per message: from its Kafka timestamp (set when it was
//! produced) to its results being committed in both sinks. Phase 2 repeats the load while the
//! rules file is replaced (v1 ↔ v2) every `swap_every`; the p99 it adds is the swap cost.

use crate::broker::Broker;
use crate::report::{percentile, Report};
use anyhow::Result;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::ClientConfig;
use runner::app::Running;
use runner::events::stage;
use std::path::Path;
use std::time::{Duration, Instant};

/// The unit stages the runner times, in the order a message goes through them.
const STAGE_ORDER: [&str; 6] = [
    stage::FETCH,
    stage::QUEUED,
    stage::EVALUATE,
    stage::POSTGRES,
    stage::KAFKA,
    stage::OUTBOX_DELETE,
];

async fn steady_load(
    running: &Running,
    brokers: &str,
    topic: &str,
    restaurants: usize,
    rate: u64,
    secs: u64,
    mut during: impl FnMut(Duration),
) -> Result<Vec<f64>> {
    running.events.clear_latencies();
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("linger.ms", "0")
        .create()?;
    let base = running.stats().offsets_stored;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs() as i64;
    let mut tick = tokio::time::interval(Duration::from_micros(1_000_000 / rate));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let t = Instant::now();
    let total = rate * secs;
    let mut deliveries = Vec::with_capacity(total as usize);
    for i in 0..total {
        tick.tick().await;
        let value = format!(
            r#"{{"restaurant_id":"00000000-0000-4000-8000-{:012x}","adv_campaign_id":"{}","adv_campaign_content":"70% off","adv_campaign_owner":"o","adv_campaign_owner_contact":"c","adv_campaign_datetime_start":{},"adv_campaign_datetime_end":{},"datetime_created":{}}}"#,
            i as usize % restaurants,
            uuid::Uuid::new_v4(),
            now - 3600,
            now + 3600,
            now - 7200
        );
        let key = i.to_string();
        let ts = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_millis() as i64;
        match producer.send_result(
            FutureRecord::to(topic)
                .key(&key)
                .payload(&value)
                .timestamp(ts),
        ) {
            Ok(f) => deliveries.push(f),
            Err((e, _)) => anyhow::bail!("produce: {e}"),
        }
        during(t.elapsed());
    }
    for d in deliveries {
        d.await?.map_err(|(e, _)| e)?;
    }
    let want = base + total;
    let deadline = Instant::now() + Duration::from_secs(120);
    while running.stats().offsets_stored < want {
        anyhow::ensure!(Instant::now() < deadline, "the load was not drained");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(running
        .events
        .latency_samples()
        .iter()
        .map(|us| *us as f64 / 1000.0)
        .collect())
}

#[allow(clippy::too_many_arguments)]
pub async fn run(
    admin_url: &str,
    rules: &Path,
    v2: &Path,
    rate: u64,
    subscribers: usize,
    secs: u64,
    swap_every: Duration,
    runs: usize,
) -> Result<Report> {
    let mut report = Report::new("latency");
    let mut stage_figures = std::collections::BTreeMap::new();
    let (mut p50, mut p99, mut max, mut s99, mut delta, mut swaps) =
        (vec![], vec![], vec![], vec![], vec![], vec![]);
    let mut label = String::new();
    for run in 1..=runs {
        // Each run on a fresh broker, database and runner: tansu keeps topics in memory and
        // was measured to slow down run after run on one process (fetch and Kafka stages).
        let broker = Broker::start()?;
        let url = runner::demo::fresh_database(admin_url, "bench_latency").await?;
        let c = runner::db::connect(&url).await?;
        runner::db::ensure_schema(&c).await?;
        let restaurants = 100;
        c.batch_execute(&format!(
            "INSERT INTO subscribers_restaurants (client_id, restaurant_id) SELECT gen_random_uuid()::text, \
             '00000000-0000-4000-8000-' || lpad(to_hex(g / {subscribers}), 12, '0') FROM generate_series(0, {}) g",
            restaurants * subscribers - 1
        ))
        .await?;
        let dir = std::env::temp_dir().join(format!("bench-latency-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let live = dir.join("rules.wasm");
        std::fs::copy(rules, &live)?;
        let rules_extra = format!(
            "settle = \"50ms\"\ncompile_cache_dir = \"{}\"\n",
            dir.join("compiled").display()
        );
        let (running, input) = broker.start_runner(&url, &live, &rules_extra).await?;
        // Warm-up: join the group, compile both versions once (the cache then serves swaps).
        steady_load(
            &running,
            &broker.brokers(),
            &input,
            restaurants,
            20,
            2,
            |_| {},
        )
        .await?;
        for src in [v2, rules] {
            std::fs::copy(src, dir.join("swap.tmp"))?;
            std::fs::rename(dir.join("swap.tmp"), &live)?;
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        label = broker.label().to_string();
        let quiet = steady_load(
            &running,
            &broker.brokers(),
            &input,
            restaurants,
            rate,
            secs,
            |_| {},
        )
        .await?;
        for (name, q) in running.events.stages() {
            eprintln!(
                "bench latency: run {run}/{runs}: stage {name:<13} p50 {:>7.2} ms  p99 {:>7.2} ms  max {:>7.2} ms  ({} samples)",
                q.p50_ms, q.p99_ms, q.max_ms, q.samples
            );
            let s = stage_figures
                .entry(name)
                .or_insert_with(|| (vec![], vec![]));
            s.0.push(q.p50_ms);
            s.1.push(q.p99_ms);
        }
        let before = running.stats().rules.swaps;
        let mut next_swap = swap_every;
        let mut flip = false;
        let swapped = steady_load(
            &running,
            &broker.brokers(),
            &input,
            restaurants,
            rate,
            secs,
            |elapsed| {
                if elapsed >= next_swap {
                    next_swap += swap_every;
                    flip = !flip;
                    let src = if flip { v2 } else { rules };
                    let _ = std::fs::copy(src, dir.join("swap.tmp"))
                        .and_then(|_| std::fs::rename(dir.join("swap.tmp"), &live));
                }
            },
        )
        .await?;
        let n_swaps = running.stats().rules.swaps - before;
        let (a, b) = (percentile(&quiet, 99.0), percentile(&swapped, 99.0));
        eprintln!("bench latency: run {run}/{runs}: p50 {:.1} ms, p99 {a:.1} ms, max {:.1} ms; with {n_swaps} swaps p99 {b:.1} ms", percentile(&quiet, 50.0), percentile(&quiet, 100.0));
        p50.push(percentile(&quiet, 50.0));
        p99.push(a);
        max.push(percentile(&quiet, 100.0));
        s99.push(b);
        delta.push(b - a);
        swaps.push(n_swaps as f64);
        running.stop().await?;
        let _ = std::fs::remove_dir_all(&dir);
    }
    report.add(
        "latency p50 (produce → both sinks committed)",
        "ms",
        p50,
        None,
    );
    report.add("latency p99", "ms", p99, Some(("<=", 25.0)));
    report.add("latency max", "ms", max, None);
    report.add("latency p99 while swapping the rules", "ms", s99, None);
    report.add("p99 added by swapping", "ms", delta, Some(("<=", 5.0)));
    report.add("swaps during the swapping phase", "count", swaps, None);
    for name in STAGE_ORDER {
        if let Some((p50, p99)) = stage_figures.remove(name) {
            report.add(&format!("stage {name}: p50"), "ms", p50, None);
            report.add(&format!("stage {name}: p99"), "ms", p99, None);
        }
    }
    report.notes.push(format!(
        "Broker: {}. {rate} campaigns/s x {subscribers} subscribers for {secs} s per phase; swaps every {:?} in the second phase. Each run on a fresh broker process, database and runner.",
        label,
        swap_every
    ));
    Ok(report)
}
