//! `runner produce sales` against librdkafka's mock cluster: what is read back is what the
//! generator says it sent (keys, values, order per store), an unreachable or vanished broker is
//! an error within the delivery timeout, pacing holds its rate, and the store-revenue pipeline
//! sums generated sales to exactly the generator's expected totals.

use e2e_tests::*;
use rdkafka::message::Message;
use rdkafka::ClientConfig;
use runner::app::RunOptions;
use runner::produce::sales::{Malformed, SaleKind, SalesGenerator};
use runner::produce::{sales, Limit, Progress, SalesOptions};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A multiple of 30: window starts are T0 + 30k.
const T0: i64 = 1_764_255_600;

fn producer(brokers: &str) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", brokers);
    c
}

fn options(topic: &str, count: u64) -> SalesOptions {
    let mut o = SalesOptions {
        stores: 7,
        simulated_start: Some(T0),
        seed: Some(11),
        ..SalesOptions::default()
    };
    o.produce.topic = topic.to_string();
    o.produce.limit = Limit::Count(count);
    o.produce.as_fast_as_possible = true;
    o
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sales_are_read_back_keyed_by_store_as_generated() -> anyhow::Result<()> {
    let kafka = SalesKafka::new(3)?;
    let opts = SalesOptions {
        late_fraction: 0.1,
        malformed_fraction: 0.1,
        record_totals: true,
        ..options(&kafka.input, 700)
    };
    let summary = sales(producer(&kafka.brokers), opts.clone(), Progress::Hidden).await?;
    assert_eq!(summary.run.sent, 700);
    assert_eq!(summary.on_time + summary.late + summary.malformed, 700);
    assert!(summary.late > 30 && summary.malformed > 30, "{summary:?}");
    assert_eq!(summary.seed, 11);
    assert!(!summary.run.interrupted);

    // The same seed and start make the same sales: each store's, in order, on one partition.
    let mut generator = SalesGenerator::new(&opts, 11, T0 * 1000);
    let mut expected: BTreeMap<String, Vec<Vec<u8>>> = BTreeMap::new();
    let mut kinds = BTreeMap::new();
    for _ in 0..700 {
        let s = generator.next_sale();
        *kinds.entry(format!("{:?}", s.kind)).or_insert(0u64) += 1;
        expected.entry(s.store).or_default().push(s.value);
    }
    let messages = read_topic(&kafka.brokers, &kafka.input, 700, Duration::from_secs(20)).await?;
    assert_eq!(messages.len(), 700);
    let mut got: BTreeMap<String, Vec<Vec<u8>>> = BTreeMap::new();
    let mut partitions: BTreeMap<String, std::collections::BTreeSet<i32>> = BTreeMap::new();
    let mut valid = 0u64;
    for m in &messages {
        let key = String::from_utf8(m.key().expect("keyed").to_vec())?;
        let value = m.payload().expect("a value").to_vec();
        partitions
            .entry(key.clone())
            .or_default()
            .insert(m.partition());
        if let Ok(v) = serde_json::from_slice::<serde_json::Value>(&value) {
            assert_eq!(v["store"].as_str(), Some(key.as_str()), "key = store");
            let text = String::from_utf8(value.clone())?;
            let two_decimals = written_price(&text).is_some_and(|p| {
                p.split_once('.')
                    .is_some_and(|(u, d)| !u.starts_with('-') && d.len() == 2)
            });
            if two_decimals && v["ts"].is_i64() && v["item"].is_string() {
                valid += 1;
            }
        }
        got.entry(key).or_default().push(value);
    }
    assert_eq!(got, expected, "every store's sales, in order");
    assert!(partitions.values().all(|p| p.len() == 1), "{partitions:?}");
    assert_eq!(valid, summary.on_time + summary.late);
    assert_eq!(kinds.get("OnTime").copied(), Some(summary.on_time));
    assert_eq!(kinds.get("Late").copied(), Some(summary.late));

    let totals = summary.totals.expect("recorded");
    assert_eq!(totals.late.len() as u64, summary.late);
    let counted: i64 = totals.windows.values().sum();
    assert!(counted > 0);
    let range = summary.event_time.expect("a range");
    assert!(range.min <= T0 - 100 && range.max <= T0 + 100, "{range:?}");
    Ok(())
}

/// The price as written in a value (the text after `"price":`).
fn written_price(text: &str) -> Option<&str> {
    let start = text.find("\"price\":")? + "\"price\":".len();
    let end = start + text[start..].find([',', '}'])?;
    Some(&text[start..end])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unkeyed_sales_have_no_key() -> anyhow::Result<()> {
    let kafka = SalesKafka::new(3)?;
    let opts = SalesOptions {
        keyed: false,
        ..options(&kafka.input, 100)
    };
    let summary = sales(producer(&kafka.brokers), opts, Progress::Hidden).await?;
    assert_eq!(summary.run.sent, 100);
    assert!(!summary.keyed);
    let messages = read_topic(&kafka.brokers, &kafka.input, 100, Duration::from_secs(20)).await?;
    assert_eq!(messages.len(), 100);
    assert!(messages.iter().all(|m| m.key().is_none()));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_broker_is_an_error_not_a_hang() -> anyhow::Result<()> {
    // Nothing listens on port 1.
    let mut cfg = producer("127.0.0.1:1");
    cfg.set("message.timeout.ms", "2000");
    let started = Instant::now();
    let outcome = tokio::time::timeout(
        Duration::from_secs(30),
        sales(cfg, options("sales", 10), Progress::Hidden),
    )
    .await
    .expect("the run ends by itself");
    let e = format!("{:#}", outcome.expect_err("no broker, no sales"));
    assert!(
        e.contains("cannot reach the Kafka brokers at 127.0.0.1:1"),
        "{e}"
    );
    assert!(started.elapsed() < Duration::from_secs(10), "{e}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_lost_mid_run_fails_the_run_within_the_delivery_timeout() -> anyhow::Result<()> {
    let kafka = SalesKafka::new(1)?;
    let mut cfg = producer(&kafka.brokers);
    cfg.set("message.timeout.ms", "2000");
    let mut opts = options(&kafka.input, 100_000);
    opts.produce.as_fast_as_possible = false;
    opts.rate = 10.0; // 70 sales per second
    let started = Instant::now();
    let (outcome, _) = tokio::join!(
        tokio::time::timeout(Duration::from_secs(30), sales(cfg, opts, Progress::Hidden)),
        async {
            tokio::time::sleep(Duration::from_millis(500)).await;
            kafka.cluster.broker_down(1)
        }
    );
    let e = format!(
        "{:#}",
        outcome
            .expect("the run ends by itself")
            .expect_err("the broker went away")
    );
    assert!(e.contains("could not be delivered"), "{e}");
    assert!(started.elapsed() < Duration::from_secs(15), "{e}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paced_run_holds_its_rate_and_a_stop_ends_it_early() -> anyhow::Result<()> {
    let kafka = SalesKafka::new(1)?;
    // 2 stores × 1 sale per event-time second × speedup 10: 20 sales per second.
    let mut opts = SalesOptions {
        stores: 2,
        speedup: 10.0,
        ..options(&kafka.input, 0)
    };
    opts.produce.as_fast_as_possible = false;
    opts.produce.limit = Limit::Duration(Duration::from_millis(1000));
    let summary = sales(producer(&kafka.brokers), opts.clone(), Progress::Hidden).await?;
    assert_eq!(summary.run.sent, 20, "1 s at 20/s");
    assert!(
        (0.9..3.0).contains(&summary.run.wall_time_secs),
        "{summary:?}"
    );
    // Each store's sales are 1 s of event time apart: 10 s of event time in 1 s.
    let range = summary.event_time.expect("a range");
    assert!(range.max - range.min >= 9 - 5, "{range:?}");

    let (stop, stopped) = tokio::sync::watch::channel(false);
    opts.produce.limit = Limit::Count(1_000_000);
    opts.produce.stop = Some(stopped);
    let run = sales(producer(&kafka.brokers), opts, Progress::Hidden);
    let (summary, _) = tokio::join!(run, async {
        tokio::time::sleep(Duration::from_millis(500)).await;
        stop.send(true)
    });
    let summary = summary?;
    assert!(summary.run.interrupted);
    assert!((5..=20).contains(&summary.run.sent), "{summary:?}");
    Ok(())
}

/// The generator's claim, checked against the pipeline: its on-time sales are summed exactly
/// to its expected totals, its late sales are dead-lettered as late, its malformed sales with
/// the rules' codes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pipeline_sums_generated_sales_to_the_expected_totals() -> anyhow::Result<()> {
    let kafka = SalesKafka::new(3)?;
    let db = TestDb::new().await?;
    let running = start(
        sales_config(&kafka, &db, ""),
        RunOptions {
            // Processing time behind the sales: no partition turns idle-final here.
            clock: Arc::new(FixedClock(T0 - 3600)),
            ..RunOptions::default()
        },
    )
    .await?;
    let opts = SalesOptions {
        stores: 6,
        late_fraction: 0.05,
        malformed_fraction: 0.05,
        record_totals: true,
        ..options(&kafka.input, 1200)
    };
    let summary = sales(producer(&kafka.brokers), opts.clone(), Progress::Hidden).await?;
    assert!(
        wait_for(Duration::from_secs(60), || running
            .store_revenue()
            .stats()
            .windows
            .as_ref()
            .is_some_and(|w| w
                .partitions
                .values()
                .map(|p| p.next_offset)
                .sum::<i64>()
                >= 1200))
        .await,
        "{:?}",
        running.store_revenue().stats()
    );
    running.stop().await?;

    let got: BTreeMap<(String, i64), i64> = db
        .client()
        .await?
        .query(
            "SELECT store, extract(epoch FROM window_start)::int8, total_minor FROM store_revenue_windows",
            &[],
        )
        .await?
        .iter()
        .map(|r| ((r.get(0), r.get(1)), r.get(2)))
        .collect();
    assert!(summary.late > 0 && summary.malformed > 0, "{summary:?}");
    let totals = summary.totals.expect("recorded");
    assert!(!got.is_empty());
    assert_eq!(got, totals.windows, "every window, to the cent");

    let dead = kafka
        .read_at_least(&kafka.dlq, (summary.late + summary.malformed) as usize)
        .await?;
    let mut reasons: BTreeMap<String, u64> = BTreeMap::new();
    for m in &dead {
        *reasons
            .entry(header(m, "dlq-reason").unwrap_or("-").to_string())
            .or_default() += 1;
    }
    let mut want: BTreeMap<String, u64> = BTreeMap::new();
    if summary.late > 0 {
        want.insert("late".into(), summary.late);
    }
    let mut generator = SalesGenerator::new(&opts, 11, T0 * 1000);
    for _ in 0..1200 {
        if let SaleKind::Malformed(m) = generator.next_sale().kind {
            *want.entry(m.expected_rejection().into()).or_default() += 1;
        }
    }
    assert_eq!(reasons, want, "dead letters by reason");
    assert!(
        want.len() > Malformed::ALL.len(),
        "late and every malformed kind: {want:?}"
    );
    Ok(())
}

/// The generator's ceiling against the mock cluster: a figure, not an assertion. Run with
/// `cargo test --release -p e2e-tests --test e2e produce::as_fast -- --ignored --nocapture`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement"]
async fn as_fast_as_possible_against_the_mock_cluster() -> anyhow::Result<()> {
    let kafka = SalesKafka::new(3)?;
    let opts = SalesOptions {
        stores: 10,
        ..options(&kafka.input, 1_000_000)
    };
    let summary = sales(producer(&kafka.brokers), opts, Progress::Stderr).await?;
    println!("{summary}");
    Ok(())
}
