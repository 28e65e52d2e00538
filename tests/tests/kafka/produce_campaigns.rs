//! The `runner produce campaigns` binary against a real Apache Kafka node and PostgreSQL: it
//! seeds the subscribers, sends exactly the campaigns its seed makes (keyed by restaurant, each
//! restaurant's in order), its JSON summary counts what arrived in the topic, and a missing
//! topic is a clear error with a non-zero exit.

use super::brokers::*;
use anyhow::Result;
use e2e_tests::*;
use rdkafka::message::Message;
use runner::produce::campaigns::{restaurant_id, CampaignGenerator, CampaignKind};
use runner::produce::CampaignsOptions;
use std::collections::{BTreeMap, BTreeSet};
use std::process::Command;
use std::time::Duration;

const NOW: i64 = 1_764_255_600;
const SEED: u64 = 9;
const COUNT: usize = 80;

/// What a valid campaign value is at `NOW`, by SPEC.md's rules (None: the rules refuse it).
fn classify(value: &[u8]) -> Option<&'static str> {
    let v: serde_json::Value = serde_json::from_slice(value).ok()?;
    let obj = v.as_object()?;
    for id in ["restaurant_id", "adv_campaign_id"] {
        let s = obj.get(id)?.as_str()?;
        if s.len() != 36 || uuid::Uuid::try_parse(s).is_err() {
            return None;
        }
    }
    for text in [
        "adv_campaign_content",
        "adv_campaign_owner",
        "adv_campaign_owner_contact",
    ] {
        obj.get(text)?.as_str()?;
    }
    let start = obj.get("adv_campaign_datetime_start")?.as_i64()?;
    let end = obj.get("adv_campaign_datetime_end")?.as_i64()?;
    obj.get("datetime_created")?.as_i64()?;
    if start >= end {
        return None;
    }
    Some(if NOW <= start {
        "future"
    } else if NOW >= end {
        "expired"
    } else {
        "active"
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_seeds_and_sends_what_its_summary_says() -> Result<()> {
    let _serial = SERIAL.lock().await;
    let kafka = Kafka::single()?;
    let topic = unique("campaigns");
    kafka.create_topics(&[(&topic, 3)]).await?;
    let db = TestDb::new().await?;

    let out = Command::new(runner_binary())
        .args([
            "--log",
            "error",
            "produce",
            "campaigns",
            "--brokers",
            &kafka.brokers,
            "--topic",
            &topic,
            "--postgres-url",
            &db.url,
            "--seed",
            &SEED.to_string(),
            "--seed-subscribers",
            "--restaurants",
            "4",
            "--subscribers-per-restaurant",
            "5",
            "--count",
            &COUNT.to_string(),
            "--rate",
            "200",
            "--now",
            "2025-11-27T15:00:00Z",
            "--expired-fraction",
            "0.2",
            "--future-fraction",
            "0.2",
            "--malformed-fraction",
            "0.2",
            "--json",
            "--quiet",
        ])
        .output()?;
    anyhow::ensure!(
        out.status.success(),
        "produce campaigns failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    assert_eq!(summary["sent"], COUNT);
    assert_eq!(summary["seed"], SEED);
    assert_eq!(summary["seeded"]["rows"], 20);
    assert_eq!(summary["fixed_now"], true);
    let active = summary["active"].as_u64().unwrap();
    assert_eq!(summary["expected_drafts"], active * 5);
    assert_eq!(
        db.count(
            "SELECT count(DISTINCT (restaurant_id, client_id)) FROM public.subscribers_restaurants"
        )
        .await?,
        20
    );

    // What arrived: every campaign, keyed by its restaurant, each restaurant's in the order
    // the generator makes them from the same seed.
    let messages = read_topic(&kafka.brokers, &topic, COUNT, Duration::from_secs(30)).await?;
    assert_eq!(messages.len(), COUNT);
    let restaurants: BTreeSet<String> = (0..4).map(|i| restaurant_id(SEED, i)).collect();
    let mut sorted: Vec<_> = messages.iter().collect();
    sorted.sort_by_key(|m| (m.partition(), m.offset()));
    let mut got: BTreeMap<String, Vec<Vec<u8>>> = BTreeMap::new();
    let mut kinds: BTreeMap<&str, u64> = BTreeMap::new();
    for m in sorted {
        let key = String::from_utf8(m.key().expect("keyed").to_vec())?;
        assert!(restaurants.contains(&key), "{key}");
        let value = m.payload().expect("a value").to_vec();
        *kinds
            .entry(classify(&value).unwrap_or("malformed"))
            .or_default() += 1;
        got.entry(key).or_default().push(value);
    }
    for kind in ["active", "expired", "future", "malformed"] {
        assert_eq!(
            kinds.get(kind).copied().unwrap_or(0),
            summary[kind].as_u64().unwrap(),
            "{kind}: {kinds:?}"
        );
    }
    let opts = CampaignsOptions {
        restaurants: 4,
        expired_fraction: 0.2,
        future_fraction: 0.2,
        malformed_fraction: 0.2,
        ..CampaignsOptions::default()
    };
    let mut generator = CampaignGenerator::new(&opts, SEED);
    let mut expected: BTreeMap<String, Vec<Vec<u8>>> = BTreeMap::new();
    let mut dead: BTreeMap<&str, u64> = BTreeMap::new();
    for _ in 0..COUNT {
        let c = generator.next_campaign(NOW);
        if let CampaignKind::Malformed(m) = c.kind {
            *dead.entry(m.expected_rejection()).or_default() += 1;
        }
        expected.entry(c.restaurant_id).or_default().push(c.value);
    }
    assert_eq!(got, expected);
    for (reason, n) in dead {
        assert_eq!(summary["expected_dead_letters"][reason], n, "{reason}");
    }

    // A topic the brokers do not have: a clear error, a non-zero exit, nothing hangs.
    let missing = unique("missing");
    let started = std::time::Instant::now();
    let out = Command::new(runner_binary())
        .args([
            "--log",
            "error",
            "produce",
            "campaigns",
            "--brokers",
            &kafka.brokers,
            "--topic",
            &missing,
            "--count",
            "5",
            "--quiet",
        ])
        .output()?;
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!("topic {missing} does not exist")),
        "{stderr}"
    );
    assert!(started.elapsed() < Duration::from_secs(30));
    Ok(())
}
