//! Shipping new rules under load: a continuous stream of campaigns while the rules file is
//! replaced v1 → v2 → v1 … Every campaign's drafts come from exactly one version, none is lost
//! or doubled, and each swap is in service within a second of the file change.

use e2e_tests::*;
use rdkafka::producer::{FutureProducer, FutureRecord};
use runner::app::RunOptions;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const NOW: i64 = 1_700_000_000;
const R0: &str = "123e4567-e89b-12d3-a456-426614174000";
/// Campaigns produced after the last swap, so the final version serves some too.
const TAIL: usize = 50;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn swapping_rules_under_load_loses_and_doubles_nothing() -> anyhow::Result<()> {
    let kafka = MockKafka::new(3)?;
    let db = TestDb::with_spec_subscribers().await?;
    let dir = tempfile::tempdir()?;
    let live = dir.path().join("rules.wasm");
    let (v1, v2) = (rules_wasm(), fixture("campaign-rules-v2.wasm"));
    std::fs::copy(&v1, &live)?;
    let extra = format!(
        "[pipelines.campaigns.rules]\npath = \"{}\"\nsettle = \"100ms\"\ncompile_cache_dir = \"{}\"\n",
        live.display(),
        dir.path().join("cache").display()
    );
    let running = start(
        config(&kafka, &db, &extra),
        RunOptions {
            clock: Arc::new(FixedClock(NOW)),
            ..RunOptions::default()
        },
    )
    .await?;

    // A steady stream of campaigns, each with its own id, while the rules change underneath.
    // It starts once the runner consumes (the group join takes seconds) and ends TAIL campaigns
    // after the last swap.
    let producer: FutureProducer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", &kafka.brokers)
        .set("linger.ms", "0")
        .create()?;
    let topic = kafka.input.clone();
    let swaps_done = Arc::new(AtomicBool::new(false));
    let (started_tx, started_rx) = tokio::sync::oneshot::channel();
    let done = swaps_done.clone();
    let stream = tokio::spawn(async move {
        let (mut i, mut tail, mut started_tx) = (0usize, 0usize, Some(started_tx));
        while tail < TAIL {
            let value = campaign(
                R0,
                &format!("00000000-0000-4000-8000-{i:012}"),
                NOW - 10,
                NOW + 10,
            );
            let key = i.to_string();
            producer
                .send(
                    FutureRecord::to(&topic).key(&key).payload(&value),
                    Duration::from_secs(10),
                )
                .await
                .map_err(|(e, _)| e)?;
            i += 1;
            if i == 1 {
                let _ = started_tx.take().map(|tx| tx.send(()));
            }
            if done.load(Ordering::Relaxed) {
                tail += 1;
            }
            tokio::time::sleep(Duration::from_millis(4)).await;
        }
        anyhow::Ok(i)
    });
    started_rx.await?;
    assert!(
        wait_for(Duration::from_secs(30), || running
            .campaigns()
            .stats()
            .offsets_stored
            >= 1)
        .await,
        "the runner consumes"
    );

    let mut delays = Vec::new();
    for source in [&v2, &v1, &v2, &v1, &v2, &v1] {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let want = sha256_hex(&std::fs::read(source)?);
        replace_atomically(source, &live)?;
        let changed = Instant::now();
        let swapped = wait_for(Duration::from_secs(5), || {
            running.campaigns().rules.current().identity().sha256 == want
        })
        .await;
        assert!(
            swapped,
            "the swap to {} never happened: {:?}",
            source.display(),
            running.campaigns().stats().rules
        );
        delays.push(changed.elapsed());
    }
    swaps_done.store(true, Ordering::Relaxed);
    let campaigns = stream.await??;
    let all = campaigns as u64;
    assert!(
        wait_for(Duration::from_secs(30), || running
            .campaigns()
            .stats()
            .offsets_stored
            >= all)
        .await,
        "{:?}",
        running.campaigns().stats()
    );
    let stats = stop(running).await?;
    println!("swap delays after the file change: {delays:?}");
    assert_eq!(stats.rules.swaps, 6, "{:?}", stats.rules);
    assert!(stats.rules.refused.is_empty(), "{:?}", stats.rules);
    assert!(
        delays.iter().all(|d| *d < Duration::from_secs(1)),
        "every swap in service within 1 s: {delays:?}"
    );

    // Kafka: each campaign exactly 8 drafts (8 distinct clients), all from one rules version,
    // and the content says which version shaped it.
    let drafts = kafka.drafts(campaigns * 8).await?;
    let mut per_campaign: BTreeMap<String, (BTreeSet<String>, BTreeSet<String>, usize)> =
        BTreeMap::new();
    for m in &drafts {
        let v = json(m);
        let version = provenance(m).expect("a provenance header").rules_version;
        let content = v["adv_campaign_content"].as_str().unwrap();
        assert_eq!(
            content.starts_with("[v2] "),
            version.ends_with("+v2"),
            "content {content:?} vs version {version}"
        );
        let e = per_campaign
            .entry(v["adv_campaign_id"].as_str().unwrap().to_string())
            .or_default();
        e.0.insert(version);
        e.1.insert(v["client_id"].as_str().unwrap().to_string());
        e.2 += 1;
    }
    assert_eq!(per_campaign.len(), campaigns, "no campaign lost");
    for (id, (versions, clients, n)) in &per_campaign {
        assert_eq!(
            versions.len(),
            1,
            "{id} shaped by one version only: {versions:?}"
        );
        assert_eq!(
            (*n, clients.len()),
            (8, 8),
            "{id}: 8 drafts for 8 clients, none doubled"
        );
    }
    let used: BTreeSet<&String> = per_campaign.values().flat_map(|(v, _, _)| v).collect();
    assert_eq!(used.len(), 2, "both versions served: {used:?}");

    // PostgreSQL: the same drafts, the same version per campaign.
    let c = db.client().await?;
    let rows = c
        .query(
            "SELECT adv_campaign_id, count(*), count(DISTINCT client_id), bool_and(adv_campaign_content LIKE '[v2] %'), \
             bool_or(adv_campaign_content LIKE '[v2] %') FROM subscribers_feedback GROUP BY 1",
            &[],
        )
        .await?;
    assert_eq!(rows.len(), campaigns);
    for r in rows {
        let id: String = r.get(0);
        assert_eq!((r.get::<_, i64>(1), r.get::<_, i64>(2)), (8, 8), "{id}");
        let (all_v2, any_v2): (bool, bool) = (r.get(3), r.get(4));
        assert_eq!(
            all_v2, any_v2,
            "{id}: one version per campaign in PostgreSQL"
        );
        let kafka_v2 = per_campaign[&id].0.iter().next().unwrap().ends_with("+v2");
        assert_eq!(
            all_v2, kafka_v2,
            "{id}: both sinks got the same version's drafts"
        );
    }
    Ok(())
}
