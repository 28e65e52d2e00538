//! `runner dead-letters replay` on the mock cluster and a real PostgreSQL: dead letters made by
//! the hostile fixture's rules (a campaign it traps on, a malformed message) replayed with the
//! real rules. The trapped campaign's drafts reach both sinks exactly once, with `replay-of`;
//! replaying again changes nothing; `--reason` selects; the malformed message is dead-lettered
//! again with its new reason and a reference to the earlier dead letter; `--dry-run` writes
//! nothing.

use e2e_tests::*;
use rdkafka::message::{Message, OwnedMessage};
use runner::app::RunOptions;
use runner::config::Config;
use runner::pipelines::campaigns::header;
use runner::tools::replay::{replay, ReplayOptions, Summary, REPLAY_OF};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

const NOW: i64 = 1_700_000_000;
const R0: &str = "123e4567-e89b-12d3-a456-426614174000";
const TRAPPED: &str = "00000000-0000-4000-8000-000000000001";
const GOOD: &str = "00000000-0000-4000-8000-000000000002";
const MALFORMED: &[u8] = b"{\"restaurant_id\": ";

fn with_content(id: &str, content: &str) -> String {
    let mut v: serde_json::Value =
        serde_json::from_str(&campaign(R0, id, NOW - 10, NOW + 10)).unwrap();
    v["adv_campaign_content"] = content.into();
    v.to_string()
}

/// Runs the pipeline with the hostile fixture as its rules over a campaign it traps on, a good
/// campaign and a malformed message: two dead letters, one delivered campaign (8 drafts).
async fn dead_letters_made_by_hostile_rules() -> anyhow::Result<(MockKafka, TestDb, Config)> {
    let kafka = MockKafka::new(1)?;
    let db = TestDb::with_spec_subscribers().await?;
    let extra = format!(
        "[pipelines.campaigns.rules]\npath = \"{}\"\n",
        fixture("hostile.wasm").display()
    );
    let running = start(
        config(&kafka, &db, &extra),
        RunOptions {
            clock: Arc::new(FixedClock(NOW)),
            ..RunOptions::default()
        },
    )
    .await?;
    let trapped = with_content(TRAPPED, "PANIC now");
    let good = with_content(GOOD, "good");
    kafka
        .produce(&[
            (Some("k1"), trapped.as_bytes()),
            (Some("k2"), good.as_bytes()),
            (Some("k3"), MALFORMED),
        ])
        .await?;
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
    let stats = stop(running).await?;
    assert_eq!(stats.dead_lettered("rules_trap"), 1, "{stats:?}");
    assert_eq!(stats.dead_lettered("malformed_json"), 1, "{stats:?}");
    assert_eq!(kafka.dead_letters(2).await?.len(), 2);
    // The replay runs with the configuration's default rules (the real ones) unless told.
    let replay_config = config(&kafka, &db, "");
    Ok((kafka, db, replay_config))
}

fn options() -> ReplayOptions {
    ReplayOptions {
        clock: Arc::new(FixedClock(NOW)),
        mock_cluster: true,
        rules: Some(rules_wasm()),
        ..ReplayOptions::new()
    }
}

async fn run(config: &Config, opts: ReplayOptions) -> anyhow::Result<Summary> {
    let (_tx, rx) = watch::channel(false);
    let summary = replay(config, opts, rx).await?;
    println!("{summary}");
    Ok(summary)
}

/// Drafts of `campaign` in each sink: rows of subscribers_feedback, records of the output
/// topic (read to its end).
async fn drafts_of(
    kafka: &MockKafka,
    db: &TestDb,
    campaign: &str,
) -> anyhow::Result<(i64, Vec<OwnedMessage>)> {
    let rows = db
        .count(&format!(
            "SELECT count(*) FROM subscribers_feedback WHERE adv_campaign_id = '{campaign}'"
        ))
        .await?;
    let records = kafka
        .drafts(16)
        .await?
        .into_iter()
        .filter(|m| header(m, header::ADV_CAMPAIGN_ID) == Some(campaign))
        .collect();
    Ok((rows, records))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trapped_campaign_is_replayed_once_into_both_sinks() -> anyhow::Result<()> {
    let (kafka, db, config) = dead_letters_made_by_hostile_rules().await?;
    let (rows, records) = drafts_of(&kafka, &db, TRAPPED).await?;
    assert_eq!((rows, records.len()), (0, 0), "nothing before the replay");

    let first = run(
        &config,
        ReplayOptions {
            reasons: vec!["rules_trap".into()],
            ..options()
        },
    )
    .await?;
    assert!(first.complete, "{first:?}");
    assert_eq!((first.examined, first.selected), (2, 1), "{first:?}");
    assert_eq!((first.delivered, first.drafts), (1, 8), "{first:?}");
    assert!(first.dead_lettered_again.is_empty(), "{first:?}");

    let dead = kafka.dead_letters(2).await?;
    let trapped_dl = dead
        .iter()
        .find(|m| header(m, header::DLQ_REASON) == Some("rules_trap"))
        .expect("the trap's dead letter");
    let replay_of = format!("{}/{}/{}", kafka.dlq, 0, trapped_dl.offset());
    let (rows, records) = drafts_of(&kafka, &db, TRAPPED).await?;
    assert_eq!(rows, 8, "each draft once in PostgreSQL");
    assert_eq!(records.len(), 8, "each draft once in Kafka");
    let real_rules = provenance(&records[0]).unwrap().rules_version;
    assert_ne!(real_rules, "hostile-rules 0.0.1");
    for m in &records {
        assert_eq!(header(m, REPLAY_OF), Some(replay_of.as_str()));
        let p = provenance(m).expect("a provenance header");
        assert_eq!(p.source_topic, kafka.input);
        assert_eq!(p.source_offset, 0, "the original source");
    }
    // Nothing is left in flight: the outbox is empty, the ledger has the one row.
    assert_eq!(
        db.count("SELECT count(*) FROM campaign_replay_outbox")
            .await?,
        0
    );
    assert_eq!(
        db.count("SELECT count(*) FROM campaign_replay_ledger")
            .await?,
        1
    );

    // The same replay again: nothing new anywhere.
    let second = run(
        &config,
        ReplayOptions {
            reasons: vec!["rules_trap".into()],
            ..options()
        },
    )
    .await?;
    assert!(second.complete, "{second:?}");
    assert_eq!(
        (second.selected, second.already_replayed),
        (1, 1),
        "{second:?}"
    );
    assert_eq!((second.delivered, second.drafts), (0, 0), "{second:?}");
    let (rows, records) = drafts_of(&kafka, &db, TRAPPED).await?;
    assert_eq!((rows, records.len()), (8, 8), "unchanged by the second run");
    assert_eq!(kafka.dead_letters(2).await?.len(), 2, "no new dead letter");
    assert_eq!(
        db.count("SELECT count(*) FROM subscribers_feedback")
            .await?,
        16
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_failing_again_is_dead_lettered_again_with_a_reference() -> anyhow::Result<()> {
    let (kafka, db, config) = dead_letters_made_by_hostile_rules().await?;
    let before = kafka.dead_letters(2).await?;
    let malformed_dl = before
        .iter()
        .find(|m| header(m, header::DLQ_REASON) == Some("malformed_json"))
        .expect("the malformed message's dead letter");

    let summary = run(&config, options()).await?;
    assert!(summary.complete, "{summary:?}");
    assert_eq!((summary.examined, summary.selected), (2, 2), "{summary:?}");
    assert_eq!((summary.delivered, summary.drafts), (1, 8), "{summary:?}");
    assert_eq!(
        summary.dead_lettered_again.get("malformed_json"),
        Some(&1),
        "{summary:?}"
    );

    let after = kafka.dead_letters(3).await?;
    assert_eq!(after.len(), 3, "one new dead letter");
    let again = after
        .iter()
        .find(|m| header(m, REPLAY_OF).is_some())
        .expect("the new dead letter refers to the earlier one");
    assert_eq!(
        header(again, REPLAY_OF),
        Some(format!("{}/0/{}", kafka.dlq, malformed_dl.offset()).as_str())
    );
    assert_eq!(again.payload(), Some(MALFORMED), "the raw value");
    assert_eq!(again.key(), Some(&b"k3"[..]), "the raw key");
    assert_eq!(header(again, header::DLQ_REASON), Some("malformed_json"));
    assert_eq!(
        header(again, header::SOURCE_TOPIC),
        Some(kafka.input.as_str())
    );
    assert_eq!(header(again, header::SOURCE_OFFSET), Some("2"));
    assert_ne!(
        header(again, header::RULES_VERSION),
        Some("hostile-rules 0.0.1"),
        "the new rules' identity"
    );
    let reasons = again
        .headers()
        .map(|h| {
            use rdkafka::message::Headers;
            h.iter().filter(|h| h.key == header::DLQ_REASON).count()
        })
        .unwrap_or(0);
    assert_eq!(reasons, 1, "one reason: the new one");
    assert_eq!(
        db.count(&format!(
            "SELECT count(*) FROM subscribers_feedback WHERE adv_campaign_id = '{TRAPPED}'"
        ))
        .await?,
        8
    );
    assert_eq!(
        db.count("SELECT count(*) FROM campaign_replay_ledger WHERE outcome = 'dead_lettered' AND reason = 'malformed_json'")
            .await?,
        1
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dry_run_and_selection_write_nothing() -> anyhow::Result<()> {
    let (kafka, db, config) = dead_letters_made_by_hostile_rules().await?;
    let feedback_before = db
        .count("SELECT count(*) FROM subscribers_feedback")
        .await?;

    let dry = run(
        &config,
        ReplayOptions {
            dry_run: true,
            ..options()
        },
    )
    .await?;
    assert!(dry.dry_run && dry.complete, "{dry:?}");
    assert_eq!((dry.examined, dry.selected), (2, 2), "{dry:?}");
    assert_eq!((dry.delivered, dry.drafts), (1, 8), "{dry:?}");
    assert_eq!(
        dry.dead_lettered_again.get("malformed_json"),
        Some(&1),
        "{dry:?}"
    );
    assert_eq!(
        db.count("SELECT count(*) FROM pg_tables WHERE tablename LIKE 'campaign_replay%'")
            .await?,
        0,
        "a dry run creates no table"
    );

    // A reason no dead letter has, and a --since after every dead letter: nothing selected.
    let none = run(
        &config,
        ReplayOptions {
            reasons: vec!["rules_timeout".into()],
            ..options()
        },
    )
    .await?;
    assert_eq!(
        (none.examined, none.selected, none.delivered),
        (2, 0, 0),
        "{none:?}"
    );
    let later = run(
        &config,
        ReplayOptions {
            selection_since_s: Some(
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)?
                    .as_secs() as i64
                    + 3600,
            ),
            ..options()
        },
    )
    .await?;
    assert_eq!((later.examined, later.selected), (0, 0), "{later:?}");

    assert_eq!(
        db.count("SELECT count(*) FROM subscribers_feedback")
            .await?,
        feedback_before,
        "no rows written"
    );
    assert_eq!(
        kafka.dead_letters(2).await?.len(),
        2,
        "no dead letter written"
    );
    let (_, records) = drafts_of(&kafka, &db, TRAPPED).await?;
    assert!(records.is_empty(), "no draft published");
    assert_eq!(
        db.count("SELECT count(*) FROM campaign_replay_ledger")
            .await?,
        0,
        "nothing in the ledger"
    );
    Ok(())
}

#[test]
fn the_store_revenue_pipeline_is_refused_with_its_reason() {
    let out = std::process::Command::new(runner_binary())
        .args(["dead-letters", "replay", "--pipeline", "store_revenue"])
        .output()
        .expect("the runner runs");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("store-revenue pipeline's dead letters cannot be replayed")
            && stderr.contains("late"),
        "{stderr}"
    );
}
