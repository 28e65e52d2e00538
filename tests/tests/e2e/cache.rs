//! The subscriber cache follows the table while the runner runs: inserts, deletes and updates
//! reach the join within a second, ids that are not UUIDs work, duplicates give one draft, and
//! a lost connection leads to a full resync before the cache is trusted again.

use e2e_tests::*;
use runner::app::RunOptions;
use runner::pipelines::campaigns::cache::IdRef;
use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

const NOW: i64 = 1_700_000_000;
const R0: &str = "123e4567-e89b-12d3-a456-426614174000";
const R1: &str = "123e4567-e89b-12d3-a456-426614174001";

fn clients(running: &runner::app::Running, restaurant: &str) -> BTreeSet<String> {
    running
        .campaigns()
        .cache
        .snapshot()
        .clients(restaurant)
        .map(IdRef::to_text)
        .collect()
}

/// Runs `change`, then measures how long until the cache shows `expect` for `restaurant`.
async fn visible_after(
    running: &runner::app::Running,
    db: &TestDb,
    change: &str,
    restaurant: &str,
    expect: &[&str],
) -> anyhow::Result<Duration> {
    let want: BTreeSet<String> = expect.iter().map(|s| s.to_string()).collect();
    db.client().await?.batch_execute(change).await?;
    let t = Instant::now();
    let seen = wait_for(Duration::from_secs(5), || {
        clients(running, restaurant) == want
    })
    .await;
    assert!(
        seen,
        "after `{change}`: {:?} instead of {want:?}",
        clients(running, restaurant)
    );
    Ok(t.elapsed())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inserts_deletes_and_updates_reach_the_join_within_a_second() -> anyhow::Result<()> {
    let kafka = MockKafka::new(1)?;
    let db = TestDb::with_spec_subscribers().await?;
    let running = start(
        config(&kafka, &db, ""),
        RunOptions {
            clock: Arc::new(FixedClock(NOW)),
            ..RunOptions::default()
        },
    )
    .await?;
    let c9 = "923e4567-e89b-12d3-a456-426614174000";
    assert_eq!(clients(&running, R1), BTreeSet::from([c9.to_string()]));

    let mut delays = Vec::new();
    // Added: a UUID and two ids that are not canonical UUIDs (kept verbatim).
    delays.push(
        visible_after(
            &running,
            &db,
            &format!("INSERT INTO subscribers_restaurants (client_id, restaurant_id) VALUES ('alice', '{R1}'), ('A23E4567-E89B-12D3-A456-426614174000', '{R1}')"),
            R1,
            &[c9, "alice", "A23E4567-E89B-12D3-A456-426614174000"],
        )
        .await?,
    );
    // Removed: one of the two duplicate rows keeps the subscription; the second removes it.
    let dup_ids: Vec<i32> = db
        .client()
        .await?
        .query(
            "SELECT id FROM subscribers_restaurants WHERE client_id = $1 ORDER BY id",
            &[&c9],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(dup_ids.len(), 2);
    db.client()
        .await?
        .execute(
            "DELETE FROM subscribers_restaurants WHERE id = $1",
            &[&dup_ids[0]],
        )
        .await?;
    delays.push(
        visible_after(
            &running,
            &db,
            &format!("INSERT INTO subscribers_restaurants (client_id, restaurant_id) VALUES ('marker-1', '{R1}')"),
            R1,
            &[c9, "alice", "A23E4567-E89B-12D3-A456-426614174000", "marker-1"],
        )
        .await?,
    );
    delays.push(
        visible_after(
            &running,
            &db,
            &format!(
                "DELETE FROM subscribers_restaurants WHERE id = {}",
                dup_ids[1]
            ),
            R1,
            &["alice", "A23E4567-E89B-12D3-A456-426614174000", "marker-1"],
        )
        .await?,
    );
    // Changed: a subscription moves to another restaurant.
    delays.push(
        visible_after(
            &running,
            &db,
            &format!("UPDATE subscribers_restaurants SET restaurant_id = '{R0}' WHERE client_id = 'alice'"),
            R1,
            &["A23E4567-E89B-12D3-A456-426614174000", "marker-1"],
        )
        .await?,
    );
    assert!(clients(&running, R0).contains("alice"));
    println!("change → visible in the cache: {delays:?}");
    assert!(
        delays.iter().all(|d| *d < Duration::from_secs(1)),
        "{delays:?}"
    );
    assert_eq!(
        running.campaigns().cache.resyncs(),
        1,
        "followed by notifications, no reload"
    );

    // And the join uses it: the campaign for R1 reaches exactly the current subscribers.
    let value = campaign(
        R1,
        "00000000-0000-4000-8000-0000000000c1",
        NOW - 10,
        NOW + 10,
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
    let got: BTreeSet<String> = kafka
        .drafts(3)
        .await?
        .iter()
        .map(|m| json(m)["client_id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        got,
        BTreeSet::from([
            "A23E4567-E89B-12D3-A456-426614174000".to_string(),
            "marker-1".to_string()
        ])
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_connection_leads_to_a_full_resync() -> anyhow::Result<()> {
    let kafka = MockKafka::new(1)?;
    let db = TestDb::with_spec_subscribers().await?;
    let running = start(
        config(&kafka, &db, ""),
        RunOptions {
            clock: Arc::new(FixedClock(NOW)),
            ..RunOptions::default()
        },
    )
    .await?;
    assert_eq!(running.campaigns().cache.resyncs(), 1);
    // Kill every connection of the runner to its database (the test's own admin one is elsewhere).
    let admin = runner::db::connect(&pg_admin_url()).await?;
    admin
        .execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1 AND pid <> pg_backend_pid()",
            &[&db.name],
        )
        .await?;
    db.subscribe_with(&db.client().await?, "after-the-cut", R1)
        .await?;
    assert!(
        wait_for(Duration::from_secs(10), || running
            .campaigns()
            .cache
            .resyncs()
            >= 2
            && !running.campaigns().cache.is_stale())
        .await,
        "resynchronised: {:?}",
        running.campaigns().stats()
    );
    assert!(
        wait_for(Duration::from_secs(5), || clients(&running, R1)
            .contains("after-the-cut"))
        .await,
        "{:?}",
        clients(&running, R1)
    );
    // The pipeline trusts it again: the campaign is joined with the current subscribers.
    let value = campaign(
        R1,
        "00000000-0000-4000-8000-0000000000c2",
        NOW - 10,
        NOW + 10,
    );
    kafka.produce(&[(None, value.as_bytes())]).await?;
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
    stop(running).await?;
    assert_eq!(kafka.drafts(3).await?.len(), 2);
    assert_eq!(
        db.count("SELECT count(*) FROM subscribers_feedback")
            .await?,
        2,
        "the feedback sink reconnected too"
    );
    Ok(())
}
