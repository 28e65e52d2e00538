//! `runner produce campaigns` against librdkafka's mock cluster and a real PostgreSQL: the
//! seeded subscriptions are the ones the ids promise, the mix is counted as asked, and the
//! campaign pipeline fed by the generator makes exactly the drafts the summary predicts (in
//! both sinks, for the active campaigns only: the runner's clock stays before the future ones'
//! starts, so they stay scheduled) and dead-letters the malformed ones with the reason codes the
//! summary predicts; PostgreSQL out of reach and a missing topic are clear errors.

use e2e_tests::*;
use rdkafka::message::Message;
use rdkafka::ClientConfig;
use runner::app::RunOptions;
use runner::produce::campaigns::{
    client_id, restaurant_id, seed_subscribers, CampaignGenerator, CampaignKind, SeedTarget,
};
use runner::produce::{campaigns, CampaignsOptions, Limit, Progress};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

/// The "now" of the generator and of the runner's clock.
const NOW: i64 = 1_764_255_600;
const SEED: u64 = 21;

fn producer(brokers: &str) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", brokers);
    c
}

fn options(topic: &str, count: u64) -> CampaignsOptions {
    let mut o = CampaignsOptions {
        restaurants: 6,
        now: Some(NOW),
        seed: Some(SEED),
        ..CampaignsOptions::default()
    };
    o.produce.topic = topic.to_string();
    o.produce.limit = Limit::Count(count);
    o.produce.as_fast_as_possible = true;
    o
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pipeline_makes_the_drafts_and_dead_letters_the_summary_predicts() -> anyhow::Result<()>
{
    let kafka = MockKafka::new(2)?;
    // A database without the tables: seeding creates them.
    let db = TestDb::new().await?;
    let opts = CampaignsOptions {
        expired_fraction: 0.15,
        future_fraction: 0.15,
        malformed_fraction: 0.25,
        subscribers_per_restaurant: Some(7),
        seed_into: Some(SeedTarget {
            url: db.url.clone(),
            // Several COPY statements in the one transaction.
            batch_rows: 10,
        }),
        ..options(&kafka.input, 120)
    };
    let summary = campaigns(producer(&kafka.brokers), opts.clone(), Progress::Hidden).await?;

    // The mix, counted as asked and as the generator makes it again from the same seed.
    assert_eq!(summary.run.sent, 120);
    assert_eq!(
        summary.active + summary.expired + summary.future + summary.malformed,
        120
    );
    for (what, n) in [
        ("active", summary.active),
        ("expired", summary.expired),
        ("future", summary.future),
        ("malformed", summary.malformed),
    ] {
        assert!(n >= 8, "{what}: {summary:?}");
    }
    let mut generator = CampaignGenerator::new(&opts, SEED);
    let generated: Vec<_> = (0..120).map(|_| generator.next_campaign(NOW)).collect();
    let active: BTreeSet<String> = generated
        .iter()
        .filter(|c| c.kind == CampaignKind::Active)
        .map(|c| c.campaign_id.clone())
        .collect();
    let skipped: BTreeSet<String> = generated
        .iter()
        .filter(|c| matches!(c.kind, CampaignKind::Expired | CampaignKind::Future))
        .map(|c| c.campaign_id.clone())
        .collect();
    assert_eq!(active.len() as u64, summary.active);
    let mut predicted_dead: BTreeMap<&str, u64> = BTreeMap::new();
    for c in &generated {
        if let CampaignKind::Malformed(m) = c.kind {
            *predicted_dead.entry(m.expected_rejection()).or_default() += 1;
        }
    }
    assert_eq!(summary.expected_dead_letters, predicted_dead);
    assert_eq!(summary.expected_drafts, Some(summary.active * 7));
    assert_eq!(summary.expected_scheduled_drafts, Some(summary.future * 7));

    // The seeded rows: 6 restaurants × 7 distinct clients, the ids from the seed.
    let seeded = summary.seeded.clone().expect("seeded");
    assert_eq!((seeded.rows, seeded.replaced), (42, 0));
    let rows = db
        .client()
        .await?
        .query(
            "SELECT restaurant_id, client_id FROM public.subscribers_restaurants",
            &[],
        )
        .await?;
    let got: BTreeSet<(String, String)> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    let want: BTreeSet<(String, String)> = (0..6)
        .flat_map(|i| (0..7).map(move |j| (restaurant_id(SEED, i), client_id(SEED, i, j))))
        .collect();
    assert_eq!(rows.len(), 42);
    assert_eq!(got, want);
    // Seeding again with the same seed replaces those rows: the same 42.
    let again = seed_subscribers(&db.url, 6, 7, SEED, 1000, Progress::Hidden).await?;
    assert_eq!((again.rows, again.replaced), (42, 42));
    assert_eq!(
        db.count("SELECT count(*) FROM public.subscribers_restaurants")
            .await?,
        42
    );

    // The pipeline, its clock at the generator's "now", fed by what was sent.
    let running = start(
        config(&kafka, &db, ""),
        RunOptions {
            clock: Arc::new(FixedClock(NOW)),
            ..RunOptions::default()
        },
    )
    .await?;
    let drafts = summary.expected_drafts.unwrap() as i64;
    assert!(
        db.wait_count(
            "SELECT count(*) FROM subscribers_feedback",
            drafts,
            Duration::from_secs(60)
        )
        .await,
        "{} feedback rows, {drafts} expected",
        db.count("SELECT count(*) FROM subscribers_feedback")
            .await?
    );
    assert!(
        wait_for(Duration::from_secs(30), || running
            .campaigns()
            .stats()
            .offsets_stored
            >= 120)
        .await,
        "{:?}",
        running.campaigns().stats()
    );
    let stats = stop(running).await?;
    assert_eq!(stats.records_delivered as i64, drafts);
    assert_eq!(stats.delivered, summary.active);
    assert_eq!(
        stats.skipped.get("expired").copied().unwrap_or(0),
        summary.expired
    );
    // Future campaigns are kept for their start, which the fixed clock never reaches.
    assert_eq!(
        stats.skipped.get("scheduled").copied().unwrap_or(0),
        summary.future
    );
    assert_eq!(stats.skipped.get("not_started"), None);
    assert_eq!(stats.skipped.get("no_subscribers"), None);

    // Both sinks hold one draft per (active campaign, subscriber), nothing else.
    let feedback: BTreeSet<(String, String)> = db
        .client()
        .await?
        .query(
            "SELECT adv_campaign_id, client_id FROM subscribers_feedback",
            &[],
        )
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let topic: Vec<_> = kafka.drafts(drafts as usize).await?;
    assert_eq!(topic.len() as i64, drafts);
    let mut from_topic = BTreeSet::new();
    for m in &topic {
        let v = json(m);
        let campaign = v["adv_campaign_id"].as_str().unwrap().to_string();
        assert!(active.contains(&campaign), "{v}");
        assert!(!skipped.contains(&campaign));
        assert_eq!(v["trigger_datetime_created"], NOW);
        from_topic.insert((campaign, v["client_id"].as_str().unwrap().to_string()));
    }
    assert_eq!(from_topic.len() as i64, drafts, "no draft twice");
    assert_eq!(feedback, from_topic, "the same drafts in both sinks");
    let per_campaign: BTreeMap<&String, usize> =
        from_topic.iter().fold(BTreeMap::new(), |mut m, (c, _)| {
            *m.entry(c).or_default() += 1;
            m
        });
    assert_eq!(per_campaign.len(), active.len());
    assert!(per_campaign.values().all(|n| *n == 7), "{per_campaign:?}");

    // The malformed ones are dead letters, with the reason codes the summary predicted.
    let dead = kafka.dead_letters(summary.malformed as usize).await?;
    let mut reasons: BTreeMap<&str, u64> = BTreeMap::new();
    for m in &dead {
        *reasons
            .entry(header(m, "dlq-reason").expect("a reason"))
            .or_default() += 1;
    }
    assert_eq!(reasons.len(), summary.expected_dead_letters.len());
    for (reason, n) in &summary.expected_dead_letters {
        assert_eq!(reasons.get(reason), Some(n), "{reason}: {reasons:?}");
    }
    let dead_bytes: BTreeSet<Vec<u8>> = dead
        .iter()
        .map(|m| m.payload().unwrap_or_default().to_vec())
        .collect();
    for c in generated
        .iter()
        .filter(|c| matches!(c.kind, CampaignKind::Malformed(_)))
    {
        assert!(dead_bytes.contains(&c.value), "its raw bytes are kept");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn campaigns_are_keyed_as_asked_and_read_back_as_generated() -> anyhow::Result<()> {
    let kafka = MockKafka::new(3)?;
    let opts = CampaignsOptions {
        malformed_fraction: 0.2,
        ..options(&kafka.input, 60)
    };
    let summary = campaigns(producer(&kafka.brokers), opts.clone(), Progress::Hidden).await?;
    assert_eq!(summary.run.sent, 60);
    assert_eq!(summary.expected_drafts, None, "M not given");
    let mut generator = CampaignGenerator::new(&opts, SEED);
    let mut expected: BTreeMap<String, Vec<Vec<u8>>> = BTreeMap::new();
    for _ in 0..60 {
        let c = generator.next_campaign(NOW);
        expected.entry(c.restaurant_id).or_default().push(c.value);
    }
    let messages = read_topic(&kafka.brokers, &kafka.input, 60, Duration::from_secs(20)).await?;
    let mut got: BTreeMap<String, Vec<Vec<u8>>> = BTreeMap::new();
    let mut sorted: Vec<_> = messages.iter().collect();
    sorted.sort_by_key(|m| (m.partition(), m.offset()));
    for m in sorted {
        let key = String::from_utf8(m.key().expect("keyed").to_vec())?;
        got.entry(key)
            .or_default()
            .push(m.payload().unwrap().to_vec());
    }
    assert_eq!(
        got, expected,
        "each restaurant's campaigns, in order, keyed by it"
    );

    let fixed = CampaignsOptions {
        key: runner::produce::campaigns::KeyMode::Fixed("first_message".into()),
        ..options(&kafka.output, 5)
    };
    campaigns(producer(&kafka.brokers), fixed, Progress::Hidden).await?;
    let messages = read_topic(&kafka.brokers, &kafka.output, 5, Duration::from_secs(20)).await?;
    assert_eq!(messages.len(), 5);
    assert!(messages
        .iter()
        .all(|m| m.key() == Some(&b"first_message"[..])));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_out_of_reach_and_a_missing_topic_are_clear_errors() -> anyhow::Result<()> {
    let kafka = MockKafka::new(1)?;
    // Nothing listens on port 1.
    let opts = CampaignsOptions {
        subscribers_per_restaurant: Some(3),
        seed_into: Some(SeedTarget {
            url: "host=127.0.0.1 port=1 user=postgres dbname=nowhere connect_timeout=2".into(),
            batch_rows: 100,
        }),
        ..options(&kafka.input, 10)
    };
    let outcome = tokio::time::timeout(
        Duration::from_secs(30),
        campaigns(producer(&kafka.brokers), opts, Progress::Hidden),
    )
    .await
    .expect("the run ends by itself");
    let e = format!("{:#}", outcome.expect_err("no PostgreSQL, no seeding"));
    assert!(
        e.contains("cannot reach PostgreSQL at 127.0.0.1:1/nowhere"),
        "{e}"
    );

    let mut cfg = producer(&kafka.brokers);
    cfg.set("allow.auto.create.topics", "false");
    let missing = unique("no_such_topic");
    let outcome = tokio::time::timeout(
        Duration::from_secs(30),
        campaigns(cfg, options(&missing, 10), Progress::Hidden),
    )
    .await
    .expect("the run ends by itself");
    let e = format!("{:#}", outcome.expect_err("no topic"));
    assert!(
        e.contains(&format!("topic {missing} does not exist")),
        "{e}"
    );
    Ok(())
}
