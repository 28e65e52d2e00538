//! `runner dead-letters replay` against a real Apache Kafka node with the real runner binary:
//! dead letters of campaigns the rules trapped on, replayed with the real rules, the replay
//! killed with kill -9 midway and run again. Judged from the sinks themselves: every
//! (campaign, client) draft exactly once in `subscribers_feedback` and in the output topic as a
//! read_committed consumer reads it, every dead letter once in the ledger, nothing left in the
//! replay's outbox; a third run replays nothing.

use super::brokers::*;
use anyhow::{Context, Result};
use e2e_tests::*;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::ClientConfig;
use std::collections::BTreeMap;
use std::process::{Command, Stdio};
use std::time::Duration;

const DEAD_LETTERS: usize = 240;
const RESTAURANTS: usize = 4;
const PER_RESTAURANT: usize = 40;

/// One test's world: a broker, topics, subscribers, dead letters, a configuration file.
struct World {
    kafka: Kafka,
    output: String,
    dlq: String,
    db: TestDb,
    config: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl World {
    async fn new() -> Result<World> {
        let kafka = Kafka::single()?;
        let (input, output, dlq) = (unique("campaigns"), unique("drafts"), unique("dlq"));
        kafka
            .create_topics(&[(&input, 1), (&output, 2), (&dlq, 2)])
            .await?;
        let db = TestDb::new().await?.with_schema().await?;
        let restaurants = seed_restaurants(&db, 8000, RESTAURANTS, PER_RESTAURANT).await?;
        // Dead letters as the pipeline writes them: the raw campaign, the reason, the source.
        let producer: FutureProducer = ClientConfig::new()
            .set("bootstrap.servers", &kafka.brokers)
            .set("enable.idempotence", "true")
            .create()?;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_secs() as i64;
        for i in 0..DEAD_LETTERS {
            let value = campaign(
                &restaurants[i % RESTAURANTS],
                &format!("00000000-0000-4000-9000-{i:012}"),
                now - 3600,
                now + 3 * 3600,
            );
            let offset = i.to_string();
            let headers = [
                ("dlq-reason", "rules_trap"),
                ("dlq-detail", "wasm trap"),
                ("source-topic", input.as_str()),
                ("source-partition", "0"),
                ("source-offset", offset.as_str()),
                ("rules-version", "hostile-rules 0.0.1"),
            ]
            .into_iter()
            .fold(OwnedHeaders::new(), |h, (key, value)| {
                h.insert(Header {
                    key,
                    value: Some(value),
                })
            });
            let key = i.to_string();
            producer
                .send(
                    FutureRecord::to(&dlq)
                        .key(&key)
                        .payload(&value)
                        .headers(headers),
                    Duration::from_secs(30),
                )
                .await
                .map_err(|(e, _)| e)?;
        }
        let dir = tempfile::tempdir()?;
        let config = dir.path().join("runner.toml");
        std::fs::write(
            &config,
            format!(
                "[kafka]\nbrokers = \"{}\"\n[postgres]\nurl = \"{}\"\n\
                 [pipelines.campaigns]\ninput_topic = \"{input}\"\noutput_topic = \"{output}\"\ndead_letter_topic = \"{dlq}\"\n\
                 group_id = \"{}\"\nbatch_max_messages = 1\n\
                 [pipelines.campaigns.rules]\npath = \"{}\"\ncompile_cache_dir = \"{}\"\n",
                kafka.brokers,
                db.url,
                unique("group"),
                fixture("hostile.wasm").display(),
                dir.path().join("compiled").display()
            ),
        )?;
        Ok(World {
            kafka,
            output,
            dlq,
            db,
            config,
            _dir: dir,
        })
    }

    /// `runner dead-letters replay` of the rules_trap dead letters with the real rules.
    fn replay(&self, json: bool) -> Command {
        let log = std::env::var("RUNNER_TEST_LOG").unwrap_or_else(|_| "error".into());
        let mut cmd = Command::new(runner_binary());
        cmd.args([
            "--log",
            &log,
            "dead-letters",
            "replay",
            "--config",
            self.config.to_str().unwrap(),
            "--rules",
            rules_wasm().to_str().unwrap(),
            "--reason",
            "rules_trap",
        ]);
        if json {
            cmd.arg("--json");
        }
        cmd.stdout(Stdio::piped());
        cmd
    }

    /// Runs a replay to its end: its summary.
    async fn replay_to_end(&self) -> Result<serde_json::Value> {
        let mut cmd = self.replay(true);
        let out = tokio::task::spawn_blocking(move || cmd.output()).await??;
        anyhow::ensure!(out.status.success(), "the replay completes: {:?}", out);
        let summary: serde_json::Value = serde_json::from_slice(&out.stdout)?;
        println!("replay: {summary}");
        assert_eq!(summary["complete"], true);
        Ok(summary)
    }

    /// [pg lost, pg duplicated, kafka lost, kafka duplicated] over every draft, and the output
    /// topic's records (read_committed).
    async fn invariant(&self) -> Result<([i64; 4], usize)> {
        let expected = (DEAD_LETTERS * PER_RESTAURANT) as i64;
        let total = self
            .db
            .count("SELECT count(*) FROM subscribers_feedback")
            .await?;
        let distinct = self
            .db
            .count("SELECT count(*) FROM (SELECT DISTINCT adv_campaign_id, client_id FROM subscribers_feedback) d")
            .await?;
        let records = read_topic(
            &self.kafka.brokers,
            &self.output,
            expected as usize,
            Duration::from_secs(120),
        )
        .await?;
        let mut per: BTreeMap<(String, String), i64> = BTreeMap::new();
        for m in &records {
            let v = json(m);
            let pair = (
                v["adv_campaign_id"].as_str().unwrap_or("").to_string(),
                v["client_id"].as_str().unwrap_or("").to_string(),
            );
            *per.entry(pair).or_default() += 1;
            assert!(header(m, "replay-of").is_some_and(|r| r.starts_with(&self.dlq)));
        }
        let kafka_dup: i64 = per.values().map(|n| n - 1).sum();
        let counts = [
            expected - distinct,
            total - distinct,
            expected - per.len() as i64,
            kafka_dup,
        ];
        println!(
            "replay over {DEAD_LETTERS} dead letters x {PER_RESTAURANT} subscribers = {expected} drafts: \
             [pg lost, pg duplicated, kafka lost, kafka duplicated] = {counts:?}"
        );
        Ok((counts, records.len()))
    }
}

const LEDGER: &str = "SELECT count(*) FROM campaign_replay_ledger";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_killed_midway_and_rerun_delivers_exactly_once() -> Result<()> {
    let _serial = SERIAL.lock().await;
    let world = World::new().await?;
    let db = &world.db;

    // First run: killed (SIGKILL) once some dead letters are replayed, before all are.
    let mut child = ChildGuard(world.replay(false).spawn().context("the replay starts")?);
    let started = wait_for_async(Duration::from_secs(120), || async {
        db.count(LEDGER).await.unwrap_or(0) >= 20
    })
    .await;
    anyhow::ensure!(started, "the replay made progress");
    child.kill()?;
    child.wait()?;
    let at_kill = db.count(LEDGER).await?;
    let outbox = db
        .count("SELECT count(*) FROM campaign_replay_outbox")
        .await?;
    println!(
        "replay killed with {at_kill} of {DEAD_LETTERS} dead letters in the ledger, {outbox} outbox entries"
    );
    anyhow::ensure!(
        (at_kill as usize) < DEAD_LETTERS,
        "the replay was killed midway ({at_kill} replayed)"
    );

    // Second run: to the end.
    let summary = world.replay_to_end().await?;
    assert_eq!(summary["selected"], DEAD_LETTERS as u64);
    assert_eq!(
        summary["already_replayed"].as_u64().unwrap() + summary["delivered"].as_u64().unwrap(),
        DEAD_LETTERS as u64
    );
    let (counts, records) = world.invariant().await?;
    assert_eq!(counts, [0, 0, 0, 0]);
    assert_eq!(db.count(LEDGER).await?, DEAD_LETTERS as i64);
    assert_eq!(
        db.count("SELECT count(*) FROM campaign_replay_outbox")
            .await?,
        0
    );

    // Third run: everything is replayed already; nothing changes.
    let summary = world.replay_to_end().await?;
    assert_eq!(summary["already_replayed"], DEAD_LETTERS as u64);
    assert_eq!(summary["delivered"], 0);
    let (counts, again) = world.invariant().await?;
    assert_eq!(counts, [0, 0, 0, 0]);
    assert_eq!(again, records, "no record added by the third run");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overlapping_replays_deliver_exactly_once() -> Result<()> {
    let _serial = SERIAL.lock().await;
    let world = World::new().await?;
    // Two runs at the same time: one may take the other's partitions over (the other then
    // stops and exits non-zero); a third run completes whatever neither finished.
    let (mut a, mut b) = (world.replay(true), world.replay(true));
    let (a, b) = tokio::join!(
        tokio::task::spawn_blocking(move || a.output()),
        tokio::task::spawn_blocking(move || b.output()),
    );
    let (a, b) = (a??, b??);
    println!(
        "overlapping runs: exit {:?} and {:?}",
        a.status.code(),
        b.status.code()
    );
    world.replay_to_end().await?;
    let (counts, _) = world.invariant().await?;
    assert_eq!(counts, [0, 0, 0, 0]);
    assert_eq!(world.db.count(LEDGER).await?, DEAD_LETTERS as i64);
    Ok(())
}
