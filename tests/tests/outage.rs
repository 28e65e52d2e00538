//! Outages of the real services. A separate test binary because these tests stop shared
//! servers: cargo runs test binaries one after another, so nothing else runs meanwhile.

use e2e_tests::*;
use runner::app::RunOptions;
use runner::pipelines::campaigns::cache::IdRef;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

const NOW: i64 = 1_700_000_000;
const R1: &str = "123e4567-e89b-12d3-a456-426614174001";

/// The local cluster, as `pg_ctlcluster` names it.
fn cluster() -> (String, String) {
    let out = Command::new("pg_lsclusters")
        .arg("-h")
        .output()
        .expect("pg_lsclusters (postgresql-common)");
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .find(|l| l.split_whitespace().nth(2) == Some("5432"))
        .expect("a cluster on port 5432");
    let mut f = line.split_whitespace();
    (f.next().unwrap().to_string(), f.next().unwrap().to_string())
}

fn pg_ctl(action: &str) {
    let (version, name) = cluster();
    let status = Command::new("pg_ctlcluster")
        .args([
            "--skip-systemctl-redirect",
            &version,
            &name,
            action,
            "-m",
            "fast",
        ])
        .status()
        .expect("pg_ctlcluster");
    assert!(status.success(), "pg_ctlcluster {action} failed");
}

/// The tests here stop the shared server: one at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn rss_mib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .unwrap_or(0)
        / 1024
}

/// Starts PostgreSQL again even when the test fails half-way.
struct Restart;
impl Drop for Restart {
    fn drop(&mut self) {
        let (version, name) = cluster();
        let _ = Command::new("pg_ctlcluster")
            .args(["--skip-systemctl-redirect", &version, &name, "start"])
            .status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_postgres_restart_leads_to_a_full_resync_and_correct_joins() -> anyhow::Result<()> {
    let _serial = SERIAL.lock().await;
    let kafka = MockKafka::new(1)?;
    let db = TestDb::with_spec_subscribers().await?;
    let extra = "[status]\nlisten = \"127.0.0.1:0\"\n";
    let running = start(
        config(&kafka, &db, extra),
        RunOptions {
            clock: Arc::new(FixedClock(NOW)),
            ..RunOptions::default()
        },
    )
    .await?;
    let addr = running.status_addr.expect("status endpoint");
    assert_eq!(http_get(addr, "/health").await?.0, 200);

    let guard = Restart;
    pg_ctl("stop");
    assert!(
        wait_for(Duration::from_secs(20), || running
            .campaigns()
            .cache
            .is_stale())
        .await,
        "the cache knows it is stale"
    );
    let (code, body) = http_get(addr, "/health").await?;
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("subscriber_cache_stale"), "{body}");
    let metrics = http_get(addr, "/metrics").await?.1;
    assert!(
        metrics
            .lines()
            .any(|l| l == r#"runner_subscriber_cache_stale{pipeline="campaigns"} 1"#),
        "{metrics}"
    );
    // A campaign arriving meanwhile waits: it is not joined against a stale cache.
    let value = campaign(
        R1,
        "00000000-0000-4000-8000-0000000000d1",
        NOW - 10,
        NOW + 10,
    );
    kafka.produce(&[(None, value.as_bytes())]).await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        running.campaigns().stats().offsets_stored,
        0,
        "nothing settled while the database is down"
    );

    pg_ctl("start");
    drop(guard);
    // The held campaign goes through once the cache is fresh again.
    assert!(
        wait_for(Duration::from_secs(30), || running
            .campaigns()
            .stats()
            .offsets_stored
            >= 1)
        .await,
        "{:?}",
        running.campaigns().stats()
    );
    assert!(
        running.campaigns().cache.resyncs() >= 2,
        "a full resync: {:?}",
        running.campaigns().stats()
    );
    assert!(!running.campaigns().cache.is_stale());
    assert_eq!(http_get(addr, "/health").await?.0, 200);

    // And the cache follows the table again: a subscription added now reaches the campaign that
    // is active (a new_subscriber trigger) and the next campaign.
    let c = db.client().await?;
    db.subscribe_with(&c, "joined-after-restart", R1).await?;
    assert!(
        wait_for(Duration::from_secs(5), || {
            running
                .campaigns()
                .cache
                .snapshot()
                .clients(R1)
                .map(IdRef::to_text)
                .any(|c| c == "joined-after-restart")
        })
        .await
    );
    let value = campaign(
        R1,
        "00000000-0000-4000-8000-0000000000d2",
        NOW - 10,
        NOW + 10,
    );
    kafka.produce(&[(None, value.as_bytes())]).await?;
    // d1, its trigger for the new subscriber, d2.
    assert!(
        wait_for(Duration::from_secs(30), || running
            .campaigns()
            .stats()
            .offsets_stored
            >= 3)
        .await,
        "{:?}",
        running.campaigns().stats()
    );
    stop(running).await?;
    let mut drafts: Vec<(String, String)> = kafka
        .drafts(5)
        .await?
        .iter()
        .map(|m| {
            let v = json(m);
            (
                v["adv_campaign_id"].as_str().unwrap().to_string(),
                v["client_id"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    drafts.sort();
    let c9 = "923e4567-e89b-12d3-a456-426614174000".to_string();
    let (d1, d2) = (
        "00000000-0000-4000-8000-0000000000d1".to_string(),
        "00000000-0000-4000-8000-0000000000d2".to_string(),
    );
    assert_eq!(
        drafts,
        [
            (d1.clone(), c9.clone()),
            (d1, "joined-after-restart".to_string()),
            (d2.clone(), c9),
            (d2, "joined-after-restart".to_string())
        ]
    );
    assert_eq!(
        db.count("SELECT count(*) FROM subscribers_feedback")
            .await?,
        4
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_down_for_30_s_loses_and_doubles_nothing() -> anyhow::Result<()> {
    let _serial = SERIAL.lock().await;
    const R0: &str = "123e4567-e89b-12d3-a456-426614174000";
    let kafka = MockKafka::new(2)?;
    let db = TestDb::with_spec_subscribers().await?;
    let running = start(
        config(&kafka, &db, "[status]\nlisten = \"127.0.0.1:0\"\n"),
        RunOptions {
            clock: Arc::new(FixedClock(NOW)),
            ..RunOptions::default()
        },
    )
    .await?;
    let addr = running.status_addr.expect("status endpoint");
    let value = |i: usize| {
        campaign(
            R0,
            &format!("00000000-0000-4000-a000-{i:012}"),
            NOW - 10,
            NOW + 10,
        )
    };
    for i in 0..5 {
        kafka.produce(&[(None, value(i).as_bytes())]).await?;
    }
    assert!(
        wait_for(Duration::from_secs(30), || running
            .campaigns()
            .stats()
            .offsets_stored
            >= 5)
        .await
    );
    let before = rss_mib();

    let guard = Restart;
    pg_ctl("stop");
    let down = std::time::Instant::now();
    let (mut degraded, mut peak, mut i) = (false, before, 5);
    while down.elapsed() < Duration::from_secs(30) {
        // Campaigns keep arriving while the database is down.
        if i < 25 {
            kafka.produce(&[(None, value(i).as_bytes())]).await?;
            i += 1;
        }
        peak = peak.max(rss_mib());
        if let Ok((503, body)) = http_get(addr, "/health").await {
            degraded |=
                body.contains("subscriber_cache_stale") || body.contains("postgres_sink_retrying");
        }
        tokio::time::sleep(Duration::from_millis(1200)).await;
    }
    let during = running.campaigns().stats().offsets_stored;
    pg_ctl("start");
    drop(guard);
    let done = wait_for(Duration::from_secs(60), || {
        running.campaigns().stats().offsets_stored >= 25
    })
    .await;
    let healthy = wait_for_async(Duration::from_secs(10), || async {
        matches!(http_get(addr, "/health").await, Ok((200, _)))
    })
    .await;
    let stats = stop(running).await?;
    println!("PostgreSQL down 30 s: test process RSS {before} MiB before, {peak} MiB peak; degraded seen: {degraded}; settled during the outage: {}", during - 5);
    assert!(degraded, "/health was degraded while the database was down");
    assert_eq!(during, 5, "nothing settles without the database");
    assert!(done, "recovered by itself: {stats:?}");
    assert!(healthy, "healthy again after");
    assert!(
        peak < before + 200,
        "memory bounded ({before} -> {peak} MiB)"
    );
    let drafts = kafka.drafts(201).await?;
    let pairs: std::collections::BTreeSet<(String, String)> = drafts
        .iter()
        .map(|m| {
            let v = json(m);
            (
                v["adv_campaign_id"].as_str().unwrap().to_string(),
                v["client_id"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    println!(
        "PostgreSQL outage: {} drafts read, {} distinct, 200 expected",
        drafts.len(),
        pairs.len()
    );
    assert_eq!(
        (drafts.len(), pairs.len()),
        (200, 200),
        "25 campaigns x 8 subscribers, each once"
    );
    assert_eq!(
        db.count("SELECT count(*) FROM subscribers_feedback")
            .await?,
        200
    );
    Ok(())
}
