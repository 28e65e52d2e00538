//! The happy paths and the deliberate skips of pipeline 1.

use e2e_tests::*;
use rdkafka::message::Message;
use runner::app::RunOptions;
use runner::pipelines::campaigns::header;
use runner::pipelines::campaigns::SkipReason;
use std::sync::Arc;
use std::time::Duration;

const SPEC_NOW: i64 = 1_659_304_828;
const SPEC_OUTPUT_023: &str = r#"{"restaurant_id":"123e4567-e89b-12d3-a456-426614174000","adv_campaign_id":"123e4567-e89b-12d3-a456-426614174003","adv_campaign_content":"first campaign","adv_campaign_owner":"Ivanov Ivan Ivanovich","adv_campaign_owner_contact":"iiivanov@restaurant.ru","adv_campaign_datetime_start":1659203516,"adv_campaign_datetime_end":2659207116,"client_id":"023e4567-e89b-12d3-a456-426614174000","datetime_created":1659131516,"trigger_datetime_created":1659304828}"#;
const R0: &str = "123e4567-e89b-12d3-a456-426614174000";
const R1: &str = "123e4567-e89b-12d3-a456-426614174001";

fn fixed(now: i64) -> RunOptions {
    RunOptions {
        clock: Arc::new(FixedClock(now)),
        ..RunOptions::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spec_example_end_to_end() -> anyhow::Result<()> {
    let kafka = MockKafka::new(3)?;
    let db = TestDb::with_spec_subscribers().await?;
    let running = start(config(&kafka, &db, ""), fixed(SPEC_NOW)).await?;
    kafka
        .produce(&[(Some("first_message"), SPEC_CAMPAIGN.as_bytes())])
        .await?;
    assert!(
        wait_for(Duration::from_secs(20), || running
            .campaigns()
            .stats()
            .offsets_stored
            >= 1)
        .await,
        "{:?}",
        running.campaigns().stats()
    );
    let rules = running.campaigns().rules.current().identity().clone();
    let stats = stop(running).await?;
    assert_eq!(
        (stats.delivered, stats.records_delivered),
        (1, 8),
        "{stats:?}"
    );

    // Kafka: 8 drafts, one per distinct subscriber of restaurant ...000, exact SPEC JSON.
    let drafts = kafka.drafts(9).await?;
    assert_eq!(drafts.len(), 8);
    let mut clients: Vec<String> = drafts
        .iter()
        .map(|m| json(m)["client_id"].as_str().unwrap().to_string())
        .collect();
    clients.sort();
    let mut want: Vec<String> = SPEC_SUBSCRIBERS
        .iter()
        .filter(|(_, r)| *r == R0)
        .map(|(c, _)| c.to_string())
        .collect();
    want.sort();
    assert_eq!(clients, want);
    let spec = drafts
        .iter()
        .find(|m| json(m)["client_id"] == "023e4567-e89b-12d3-a456-426614174000")
        .expect("the SPEC subscriber's draft");
    assert_eq!(
        std::str::from_utf8(spec.payload().unwrap())?,
        SPEC_OUTPUT_023,
        "byte-exact SPEC output"
    );
    for m in &drafts {
        let v = json(m);
        assert_eq!(
            m.key(),
            Some(v["client_id"].as_str().unwrap().as_bytes()),
            "keyed by client"
        );
        assert_eq!(v.as_object().unwrap().len(), 10, "exactly the SPEC fields");
        assert!(v.get("feedback").is_none());
        let p = provenance(m).expect("a provenance header");
        assert_eq!(p.rules_version, rules.version);
        assert_eq!(p.rules_sha256, rules.sha256);
        assert_eq!(p.source_topic, kafka.input);
        assert_eq!(
            m.headers().map(rdkafka::message::Headers::count),
            Some(2),
            "provenance and adv-campaign-id"
        );
        assert_eq!(
            header(m, header::ADV_CAMPAIGN_ID),
            Some("123e4567-e89b-12d3-a456-426614174003")
        );
    }

    // PostgreSQL: the same 8 drafts, exact values, feedback NULL.
    let c = db.client().await?;
    let rows = c
        .query(
            "SELECT restaurant_id, adv_campaign_id, adv_campaign_content, adv_campaign_owner, \
             adv_campaign_owner_contact, adv_campaign_datetime_start, adv_campaign_datetime_end, \
             datetime_created, client_id, trigger_datetime_created, feedback \
             FROM public.subscribers_feedback ORDER BY client_id",
            &[],
        )
        .await?;
    assert_eq!(rows.len(), 8);
    for (row, client) in rows.iter().zip(&want) {
        assert_eq!(row.get::<_, &str>(0), R0);
        assert_eq!(
            row.get::<_, &str>(1),
            "123e4567-e89b-12d3-a456-426614174003"
        );
        assert_eq!(row.get::<_, &str>(2), "first campaign");
        assert_eq!(row.get::<_, &str>(3), "Ivanov Ivan Ivanovich");
        assert_eq!(row.get::<_, &str>(4), "iiivanov@restaurant.ru");
        assert_eq!(row.get::<_, i64>(5), 1_659_203_516);
        assert_eq!(row.get::<_, i64>(6), 2_659_207_116);
        assert_eq!(row.get::<_, i64>(7), 1_659_131_516);
        assert_eq!(row.get::<_, &str>(8), client);
        assert_eq!(row.get::<_, i32>(9), SPEC_NOW as i32);
        assert_eq!(row.get::<_, Option<&str>>(10), None);
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicate_subscription_gives_one_draft() -> anyhow::Result<()> {
    let kafka = MockKafka::new(1)?;
    let db = TestDb::with_spec_subscribers().await?;
    let running = start(config(&kafka, &db, ""), fixed(SPEC_NOW)).await?;
    let value = campaign(
        R1,
        "00000000-0000-4000-8000-000000000001",
        1_659_200_000,
        1_659_400_000,
    );
    kafka.produce(&[(None, value.as_bytes())]).await?;
    assert!(
        wait_for(Duration::from_secs(20), || running
            .campaigns()
            .stats()
            .offsets_stored
            >= 1)
        .await
    );
    stop(running).await?;
    let drafts = kafka.drafts(2).await?;
    assert_eq!(drafts.len(), 1, "rows 8 and 9 are one subscription");
    assert_eq!(
        json(&drafts[0])["client_id"],
        "923e4567-e89b-12d3-a456-426614174000"
    );
    assert_eq!(
        db.count("SELECT count(*) FROM subscribers_feedback")
            .await?,
        1
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restaurant_without_subscribers_produces_nothing_and_advances() -> anyhow::Result<()> {
    let kafka = MockKafka::new(1)?;
    let db = TestDb::with_spec_subscribers().await?;
    let running = start(config(&kafka, &db, ""), fixed(SPEC_NOW)).await?;
    let lonely = campaign(
        "99999999-0000-4000-8000-000000000000",
        "00000000-0000-4000-8000-000000000002",
        1,
        2_000_000_000,
    );
    kafka.produce(&[(None, lonely.as_bytes())]).await?;
    assert!(
        wait_for(Duration::from_secs(20), || running
            .campaigns()
            .stats()
            .offsets_stored
            >= 1)
        .await
    );
    let stats = stop(running).await?;
    assert_eq!(stats.skipped(SkipReason::NoSubscribers), 1, "{stats:?}");
    assert_eq!(stats.records_delivered, 0);
    assert!(kafka.drafts(1).await?.is_empty());
    assert!(kafka.dead_letters(1).await?.is_empty(), "not a dead letter");
    assert_eq!(
        db.count("SELECT count(*) FROM subscribers_feedback")
            .await?,
        0
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_campaigns_are_skipped_and_future_ones_scheduled() -> anyhow::Result<()> {
    let kafka = MockKafka::new(1)?;
    let db = TestDb::with_spec_subscribers().await?;
    let now = 1_700_000_000;
    let running = start(config(&kafka, &db, ""), fixed(now)).await?;
    let expired = campaign(R0, "00000000-0000-4000-8000-00000000000e", now - 100, now);
    let future = campaign(R0, "00000000-0000-4000-8000-00000000000f", now, now + 100);
    let active = campaign(R0, "00000000-0000-4000-8000-00000000000a", now - 1, now + 1);
    kafka
        .produce(&[
            (None, expired.as_bytes()),
            (None, future.as_bytes()),
            (None, active.as_bytes()),
        ])
        .await?;
    assert!(
        wait_for(Duration::from_secs(20), || running
            .campaigns()
            .stats()
            .offsets_stored
            >= 3)
        .await
    );
    let stats = stop(running).await?;
    assert_eq!(stats.skipped(SkipReason::Expired), 1, "{stats:?}");
    assert_eq!(stats.skipped(SkipReason::Scheduled), 1, "{stats:?}");
    assert_eq!(stats.skipped(SkipReason::NotStarted), 0, "{stats:?}");
    assert_eq!(stats.delivered, 1);
    let drafts = kafka.drafts(9).await?;
    assert_eq!(drafts.len(), 8);
    assert!(drafts
        .iter()
        .all(|m| json(m)["adv_campaign_id"] == "00000000-0000-4000-8000-00000000000a"));
    assert!(kafka.dead_letters(1).await?.is_empty());
    assert_eq!(
        db.count("SELECT count(*) FROM subscribers_feedback WHERE adv_campaign_id LIKE '%a'")
            .await?,
        8
    );
    assert_eq!(
        db.count("SELECT count(*) FROM subscribers_feedback")
            .await?,
        8
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscription_changes_reach_the_join_while_running() -> anyhow::Result<()> {
    let kafka = MockKafka::new(1)?;
    let db = TestDb::with_spec_subscribers().await?;
    let running = start(
        config(
            &kafka,
            &db,
            "[pipelines.campaigns.subscribers]\nfull_resync_interval = \"1h\"\n",
        ),
        fixed(SPEC_NOW),
    )
    .await?;
    let v0 = running.campaigns().cache.snapshot().version();
    let c = db.client().await?;
    db.subscribe_with(&c, "new-client-not-a-uuid", R1).await?;
    c.execute("DELETE FROM subscribers_restaurants WHERE client_id = '923e4567-e89b-12d3-a456-426614174000'", &[])
        .await?;
    assert!(
        wait_for(Duration::from_secs(10), || running
            .campaigns()
            .cache
            .snapshot()
            .version()
            > v0)
        .await,
        "the periodic reload swapped in a new snapshot"
    );
    let value = campaign(
        R1,
        "00000000-0000-4000-8000-000000000003",
        1_659_200_000,
        1_659_400_000,
    );
    kafka.produce(&[(None, value.as_bytes())]).await?;
    assert!(
        wait_for(Duration::from_secs(20), || running
            .campaigns()
            .stats()
            .offsets_stored
            >= 1)
        .await
    );
    stop(running).await?;
    let drafts = kafka.drafts(2).await?;
    let clients: Vec<_> = drafts
        .iter()
        .map(|m| json(m)["client_id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        clients,
        ["new-client-not-a-uuid"],
        "added one seen, removed one gone"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trigger_time_that_overflows_int4_is_refused_loudly() -> anyhow::Result<()> {
    let kafka = MockKafka::new(1)?;
    let db = TestDb::with_spec_subscribers().await?;
    let after_2038 = i64::from(i32::MAX) + 10;
    let running = start(config(&kafka, &db, ""), fixed(after_2038)).await?;
    let value = campaign(
        R0,
        "00000000-0000-4000-8000-000000000004",
        after_2038 - 5,
        after_2038 + 5,
    );
    kafka.produce(&[(Some("k"), value.as_bytes())]).await?;
    assert!(
        wait_for(Duration::from_secs(20), || running
            .campaigns()
            .stats()
            .offsets_stored
            >= 1)
        .await
    );
    let stats = stop(running).await?;
    assert_eq!(
        stats.dead_lettered("trigger_time_out_of_range"),
        1,
        "{stats:?}"
    );
    assert!(
        kafka.drafts(1).await?.is_empty(),
        "neither sink gets a draft that one sink cannot take"
    );
    assert_eq!(
        db.count("SELECT count(*) FROM subscribers_feedback")
            .await?,
        0
    );
    let dead = kafka.dead_letters(1).await?;
    assert_eq!(
        header(&dead[0], header::DLQ_REASON),
        Some("trigger_time_out_of_range")
    );
    assert_eq!(dead[0].payload(), Some(value.as_bytes()));
    Ok(())
}
