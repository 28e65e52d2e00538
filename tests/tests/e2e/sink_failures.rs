//! The three classes of sink failure, against the real PostgreSQL: a message whose rows the
//! table refuses is dead-lettered (`sink_refused`) while the rest of its unit is delivered; a
//! refusal only an operator can remove (the schema changed under the runner) holds the
//! partition, says so in the status, and the runner goes on by itself once it is removed.

use e2e_tests::*;
use rdkafka::message::Message;
use runner::app::RunOptions;
use std::sync::Arc;
use std::time::Duration;

const SPEC_NOW: i64 = 1_659_304_828;

fn fixed() -> RunOptions {
    RunOptions {
        clock: Arc::new(FixedClock(SPEC_NOW)),
        ..RunOptions::default()
    }
}

fn spec_campaign(id: &str, content: &str) -> String {
    let mut v: serde_json::Value = serde_json::from_str(SPEC_CAMPAIGN).unwrap();
    v["adv_campaign_id"] = id.into();
    v["adv_campaign_content"] = content.into();
    v.to_string()
}

/// Drafts per campaign in PostgreSQL.
async fn rows_of(db: &TestDb, campaign: &str) -> i64 {
    db.count(&format!(
        "SELECT count(*) FROM subscribers_feedback WHERE adv_campaign_id = '{campaign}'"
    ))
    .await
    .unwrap_or(-1)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_the_table_refuses_are_dead_lettered_and_the_rest_of_the_unit_is_delivered(
) -> anyhow::Result<()> {
    let kafka = MockKafka::new(1)?;
    let db = TestDb::with_spec_subscribers().await?;
    // One unit for all three: they are produced before the runner starts.
    let ids = [
        "123e4567-e89b-12d3-a456-426614170001",
        "123e4567-e89b-12d3-a456-426614170002",
        "123e4567-e89b-12d3-a456-426614170003",
    ];
    // The rules accept a NUL character in the content (valid JSON, valid UTF-8); a PostgreSQL
    // text column cannot store it.
    let values = [
        spec_campaign(ids[0], "before"),
        spec_campaign(ids[1], "a NUL \u{0} inside"),
        spec_campaign(ids[2], "after"),
    ];
    let batch: Vec<(Option<&str>, &[u8])> =
        values.iter().map(|v| (Some("k"), v.as_bytes())).collect();
    kafka.produce(&batch).await?;
    let running = start(config(&kafka, &db, ""), fixed()).await?;
    let c = running.campaigns();
    assert!(
        wait_for(Duration::from_secs(30), || c.stats().offsets_stored >= 3).await,
        "{:?}",
        c.stats()
    );
    // The marker after them goes through: the partition is not stopped.
    let marker = spec_campaign("123e4567-e89b-12d3-a456-426614170004", "marker");
    kafka.produce(&[(Some("k"), marker.as_bytes())]).await?;
    assert!(wait_for(Duration::from_secs(30), || c.stats().offsets_stored >= 4).await);
    let stats = running.stop().await?;
    let stats = stats
        .iter()
        .find(|s| s.pipeline == "campaigns")
        .expect("campaign stats");
    assert_eq!(stats.dead_lettered("sink_refused"), 1, "{stats:?}");
    assert_eq!(stats.delivered, 3, "{stats:?}");
    // 8 subscribers of the SPEC restaurant (one listed twice).
    assert_eq!(rows_of(&db, ids[0]).await, 8);
    assert_eq!(rows_of(&db, ids[1]).await, 0);
    assert_eq!(rows_of(&db, ids[2]).await, 8);
    let drafts = kafka.drafts(24).await?;
    assert_eq!(drafts.len(), 24, "3 campaigns x 8 drafts, once each");
    assert!(drafts.iter().all(|m| json(m)["adv_campaign_id"] != ids[1]));
    let dead = kafka.dead_letters(1).await?;
    assert_eq!(dead.len(), 1);
    assert_eq!(header(&dead[0], "dlq-reason"), Some("sink_refused"));
    let detail = header(&dead[0], "dlq-detail")
        .unwrap_or_default()
        .to_string();
    assert!(detail.contains("SQLSTATE 22"), "{detail}");
    assert_eq!(
        dead[0].payload(),
        Some(values[1].as_bytes()),
        "the raw value"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_schema_changed_under_the_runner_holds_the_partition_until_it_is_put_back(
) -> anyhow::Result<()> {
    let kafka = MockKafka::new(1)?;
    let db = TestDb::with_spec_subscribers().await?;
    let running = start(config(&kafka, &db, ""), fixed()).await?;
    let c = running.campaigns();
    assert!(wait_for(Duration::from_secs(30), || c.stats().not_ready().is_empty()).await);
    let admin = db.client().await?;
    // A column the runner writes disappears under it.
    admin
        .batch_execute(
            "ALTER TABLE subscribers_feedback RENAME COLUMN adv_campaign_content TO content_moved",
        )
        .await?;
    let id = "123e4567-e89b-12d3-a456-426614170010";
    let v = spec_campaign(id, "while the schema is wrong");
    kafka.produce(&[(Some("k"), v.as_bytes())]).await?;
    assert!(
        wait_for(Duration::from_secs(30), || c
            .stats()
            .conditions
            .contains(&"postgres_blocked"))
        .await,
        "{:?}",
        c.stats()
    );
    assert!(c.stats().degraded().contains(&"postgres_blocked"));
    assert_eq!(
        c.stats().dead_lettered.values().sum::<u64>(),
        0,
        "nothing dead-lettered"
    );
    admin
        .batch_execute(
            "ALTER TABLE subscribers_feedback RENAME COLUMN content_moved TO adv_campaign_content",
        )
        .await?;
    assert!(
        db.wait_count(
            &format!("SELECT count(*) FROM subscribers_feedback WHERE adv_campaign_id = '{id}'"),
            8,
            Duration::from_secs(30)
        )
        .await
    );
    assert!(
        wait_for(Duration::from_secs(10), || !c
            .stats()
            .conditions
            .contains(&"postgres_blocked"))
        .await
    );
    running.stop().await?;
    assert_eq!(kafka.drafts(8).await?.len(), 8);
    Ok(())
}
