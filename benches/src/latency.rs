//! Latency at a steady rate, and the same with the rules swapped under load.
//! Campaigns at `rate`/s, each for a restaurant with `subscribers` subscribers (the
//! restaurants, subscribers and campaigns of `runner produce campaigns`, sent by this bench
//! with its own timestamps); latency is what
//! the runner records per message: from its Kafka timestamp (set when it was produced) to its
//! results being committed in both sinks (read back from the runner's latency histogram, to
//! within its bucket). The load runs for 2 x `secs` in slices that
//! alternate: quiet, then swapping (the rules file replaced v1 <-> v2 `swaps_per_slice` times),
//! and so on. The p99 added by swapping is the swapping slices' p99 minus the quiet slices'.
//! Interleaving matters: a machine or broker that slows down over a run would otherwise be
//! counted as swap cost.

use crate::broker::Broker;
use crate::report::Report;
use anyhow::Result;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::ClientConfig;
use runner::app::Running;
use runner::events::stage;
use runner::metrics::Quantiles;
use runner::produce::campaigns::{seed_subscribers, CampaignGenerator, DEFAULT_SEED_BATCH};
use runner::produce::{CampaignsOptions, Progress};
use std::path::Path;
use std::time::{Duration, Instant};

/// The unit stages the runner times, in the order a message goes through them.
const STAGE_ORDER: [&str; 10] = stage::ALL;

/// Seconds of load at the measured rate before measuring.
const WARM_UP_SECS: u64 = 15;

/// The number of restaurants the campaigns go to (round robin).
const RESTAURANTS: u32 = 100;

/// The seed of the restaurants, subscribers and campaigns.
const SEED: u64 = 1;

/// Produces the generator's next campaigns at `rate`/s for `secs`, each active at the wall
/// clock, calling `during` after each with the time since the start, and waits until the
/// runner committed them all.
async fn steady_load(
    running: &Running,
    brokers: &str,
    topic: &str,
    generator: &mut CampaignGenerator,
    rate: u64,
    secs: u64,
    mut during: impl FnMut(Duration),
) -> Result<()> {
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("linger.ms", "0")
        .create()?;
    let base = running.campaigns().stats().offsets_stored;
    let mut tick = tokio::time::interval(Duration::from_micros(1_000_000 / rate));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let t = Instant::now();
    let total = rate * secs;
    let mut deliveries = Vec::with_capacity(total as usize);
    for i in 0..total {
        tick.tick().await;
        let wall = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?;
        let campaign = generator.next_campaign(wall.as_secs() as i64);
        let key = campaign.key.unwrap_or_else(|| i.to_string());
        match producer.send_result(
            FutureRecord::to(topic)
                .key(&key)
                .payload(&campaign.value)
                .timestamp(wall.as_millis() as i64),
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
    while running.campaigns().stats().offsets_stored < want {
        anyhow::ensure!(Instant::now() < deadline, "the load was not drained");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
pub async fn run(
    admin_url: &str,
    rules: &Path,
    v2: &Path,
    rate: u64,
    subscribers: usize,
    secs: u64,
    slice: Duration,
    swaps_per_slice: u32,
    runs: usize,
) -> Result<Report> {
    let mut report = Report::new("latency");
    let mut stage_figures = std::collections::BTreeMap::new();
    let (mut p50, mut p99, mut max, mut s99, mut delta, mut swaps) =
        (vec![], vec![], vec![], vec![], vec![], vec![]);
    let mut label = String::new();
    for run in 1..=runs {
        // Each run on a fresh broker, database and runner.
        let broker = Broker::start()?;
        let url = e2e_tests::fresh_database(admin_url, "bench_latency").await?;
        let c = runner::db::connect(&url).await?;
        runner::pipelines::campaigns::ensure_schema(&c).await?;
        seed_subscribers(
            &url,
            RESTAURANTS,
            u32::try_from(subscribers)?,
            SEED,
            DEFAULT_SEED_BATCH,
            Progress::Hidden,
        )
        .await?;
        // Every campaign active: one draft per subscriber each.
        let mut generator = CampaignGenerator::new(
            &CampaignsOptions {
                restaurants: RESTAURANTS,
                seed: Some(SEED),
                ..CampaignsOptions::default()
            },
            SEED,
        );
        let dir = std::env::temp_dir().join(format!("bench-latency-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let live = dir.join("rules.wasm");
        std::fs::copy(rules, &live)?;
        let rules_extra = format!(
            "settle = \"50ms\"\ncompile_cache_dir = \"{}\"\n",
            dir.join("compiled").display()
        );
        let (running, input) = broker.start_runner(&url, &live, &rules_extra).await?;
        // Warm-up at the measured rate: the group is joined, both versions compiled once (the
        // cache then serves swaps), and a fresh broker's JVM has compiled its hot paths (its
        // first seconds under load are several times slower).
        steady_load(
            &running,
            &broker.brokers(),
            &input,
            &mut generator,
            rate,
            WARM_UP_SECS,
            |_| {},
        )
        .await?;
        for src in [v2, rules] {
            std::fs::copy(src, dir.join("swap.tmp"))?;
            std::fs::rename(dir.join("swap.tmp"), &live)?;
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        label = broker.label().to_string();
        let events = running.campaigns().events.clone();
        let stages_before = events.stage_snapshots();
        let mut last = events.latency_snapshot();
        let before = running.campaigns().stats().rules.swaps;
        // Slice k covers [k * slice, (k + 1) * slice) of produce time; odd slices swap. A
        // sample is counted in the slice during which it was committed: with latencies of
        // ~10 ms against 5 s slices, little crosses over.
        let (mut quiet, mut swapped) = (Quantiles::default(), Quantiles::default());
        let mut current = 0u32;
        let mut done_in_slice = 0u32;
        let mut flip = false;
        steady_load(
            &running,
            &broker.brokers(),
            &input,
            &mut generator,
            rate,
            2 * secs,
            |elapsed| {
                let k = (elapsed.as_secs_f64() / slice.as_secs_f64()) as u32;
                if k != current {
                    let now = events.latency_snapshot();
                    let slice = now.since(&last);
                    last = now;
                    if current.is_multiple_of(2) {
                        &mut quiet
                    } else {
                        &mut swapped
                    }
                    .add(&slice);
                    current = k;
                    done_in_slice = 0;
                }
                // Swaps at (j + 1/4) / swaps_per_slice of the slice: the last one well before
                // the next quiet slice starts.
                let into = elapsed.as_secs_f64() - k as f64 * slice.as_secs_f64();
                let due =
                    (done_in_slice as f64 + 0.25) / swaps_per_slice as f64 * slice.as_secs_f64();
                if k % 2 == 1 && done_in_slice < swaps_per_slice && into >= due {
                    done_in_slice += 1;
                    flip = !flip;
                    let src = if flip { v2 } else { rules };
                    let _ = std::fs::copy(src, dir.join("swap.tmp"))
                        .and_then(|_| std::fs::rename(dir.join("swap.tmp"), &live));
                }
            },
        )
        .await?;
        let rest = events.latency_snapshot().since(&last);
        if current.is_multiple_of(2) {
            &mut quiet
        } else {
            &mut swapped
        }
        .add(&rest);
        for (name, after) in events.stage_snapshots() {
            let q = match stages_before.get(name) {
                Some(b) => after.since(b).latency(),
                None => after.latency(),
            };
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
        let n_swaps = running.campaigns().stats().rules.swaps - before;
        let (q, s) = (quiet.latency(), swapped.latency());
        let (a, b) = (q.p99_ms, s.p99_ms);
        eprintln!("bench latency: run {run}/{runs}: p50 {:.1} ms, p99 {a:.1} ms, max {:.1} ms; with {n_swaps} swaps p99 {b:.1} ms", q.p50_ms, q.max_ms);
        p50.push(q.p50_ms);
        p99.push(a);
        max.push(q.max_ms);
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
    report.add("swaps per run", "count", swaps, None);
    for name in STAGE_ORDER {
        if let Some((p50, p99)) = stage_figures.remove(name) {
            report.add(&format!("stage {name}: p50"), "ms", p50, None);
            report.add(&format!("stage {name}: p99"), "ms", p99, None);
        }
    }
    report.notes.push(format!(
        "Broker: {}. {rate} campaigns/s x {subscribers} subscribers for {} s: slices of {:?} alternating quiet and swapping ({swaps_per_slice} swaps per swapping slice), {secs} s of each. Stage timings cover both kinds of slice. Each run on a fresh broker process, database and runner, after {WARM_UP_SECS} s of warm-up at the same rate.",
        label,
        2 * secs,
        slice
    ));
    Ok(report)
}
