//! A runner stopped and started again resumes from its committed offset: completed campaigns
//! are not delivered again, new ones are.

use e2e_tests::*;
use runner::app::RunOptions;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

const NOW: i64 = 1_700_000_000;
const R0: &str = "123e4567-e89b-12d3-a456-426614174000";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_resumes_from_the_committed_offset() -> anyhow::Result<()> {
    let kafka = MockKafka::new(3)?;
    let db = TestDb::with_spec_subscribers().await?;
    // The mock cluster frees a closed member's partitions only when its session times out (the
    // LeaveGroup sent at close does not trigger an early rebalance there): keep it short.
    let cfg = config(
        &kafka,
        &db,
        "[kafka.consumer_properties]\n\"session.timeout.ms\" = \"6000\"\n",
    );
    let opts = RunOptions {
        clock: Arc::new(FixedClock(NOW)),
        ..RunOptions::default()
    };
    let ids: Vec<String> = (0..6)
        .map(|i| format!("00000000-0000-4000-8000-{i:012}"))
        .collect();
    let values: Vec<String> = ids
        .iter()
        .map(|id| campaign(R0, id, NOW - 10, NOW + 10))
        .collect();

    let first = start(cfg.clone(), opts.clone()).await?;
    let batch: Vec<(Option<&str>, &[u8])> = values[..3]
        .iter()
        .map(|v| (Some(v.as_str()), v.as_bytes()))
        .collect();
    kafka.produce(&batch).await?;
    assert!(
        wait_for(Duration::from_secs(20), || first
            .campaigns()
            .stats()
            .offsets_stored
            >= 3)
        .await
    );
    stop(first).await?;

    // Produced while no runner runs, consumed by the second one.
    let batch: Vec<(Option<&str>, &[u8])> = values[3..]
        .iter()
        .map(|v| (Some(v.as_str()), v.as_bytes()))
        .collect();
    kafka.produce(&batch).await?;
    let second = start(cfg, opts).await?;
    assert!(
        wait_for(Duration::from_secs(30), || second
            .campaigns()
            .stats()
            .offsets_stored
            >= 3)
        .await,
        "{:?}",
        second.campaigns().stats()
    );
    // Anything re-delivered would show up as more input than the three new messages.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let stats = stop(second).await?;
    assert_eq!(
        stats.received, 3,
        "only the new campaigns are consumed again: {stats:?}"
    );

    let drafts = kafka.drafts(6 * 8 + 1).await?;
    let mut per_campaign: BTreeMap<String, usize> = BTreeMap::new();
    for m in &drafts {
        *per_campaign
            .entry(json(m)["adv_campaign_id"].as_str().unwrap().to_string())
            .or_default() += 1;
    }
    assert_eq!(per_campaign.len(), 6);
    assert!(
        per_campaign.values().all(|n| *n == 8),
        "each campaign's 8 drafts exactly once: {per_campaign:?}"
    );
    assert_eq!(
        db.count("SELECT count(*) FROM subscribers_feedback")
            .await?,
        48
    );
    assert_eq!(
        db.count("SELECT count(*) FROM (SELECT adv_campaign_id, client_id FROM subscribers_feedback GROUP BY 1, 2 HAVING count(*) > 1) d").await?,
        0
    );
    Ok(())
}
