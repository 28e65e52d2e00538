//! `runner reconcile` (the real binary) against real PostgreSQL and the mock cluster: sinks a
//! pipeline run left consistent compare equal; every kind of damage to either side is printed,
//! in text and JSON, per campaign and filtered by campaign; `--repair` completes the missing
//! side, idempotently; an unpublished outbox entry is in flight, not a difference.

use anyhow::{Context, Result};
use e2e_tests::*;
use rdkafka::message::Message;
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::ClientConfig;
use runner::app::RunOptions;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

const RESTAURANT: &str = "123e4567-e89b-12d3-a456-426614174000";
/// SPEC.md's campaign.
const CAMPAIGN_A: &str = "123e4567-e89b-12d3-a456-426614174003";
const CAMPAIGN_B: &str = "123e4567-e89b-12d3-a456-426614174099";

/// One test's world: topics, a database with SPEC.md's subscribers, a runner config file.
struct World {
    kafka: MockKafka,
    db: TestDb,
    config: runner::config::Config,
    file: PathBuf,
    _dir: tempfile::TempDir,
}

impl World {
    /// A pipeline run over two campaigns of the restaurant with 8 subscribers: 16 drafts in
    /// each sink.
    async fn after_a_run() -> Result<World> {
        let kafka = MockKafka::new(1)?;
        let db = TestDb::with_spec_subscribers().await?;
        let config = config(&kafka, &db, "");
        let c = config.campaigns.as_ref().context("campaigns on")?;
        let dir = tempfile::tempdir()?;
        let file = dir.path().join("runner.toml");
        std::fs::write(
            &file,
            format!(
                "[kafka]\nbrokers = \"{}\"\n[postgres]\nurl = \"{}\"\n\
                 [pipelines.campaigns]\ninput_topic = \"{}\"\noutput_topic = \"{}\"\n\
                 dead_letter_topic = \"{}\"\ngroup_id = \"{}\"\n\
                 [pipelines.campaigns.rules]\npath = \"{}\"\n",
                kafka.brokers,
                db.url,
                c.input_topic,
                c.output_topic,
                c.dead_letter_topic,
                c.group_id,
                rules_wasm().display()
            ),
        )?;
        let running = start(
            config.clone(),
            RunOptions {
                mock_cluster: true,
                ..RunOptions::default()
            },
        )
        .await?;
        let b = campaign(RESTAURANT, CAMPAIGN_B, 1659203516, 2659207116);
        kafka
            .produce(&[
                (Some("a"), SPEC_CAMPAIGN.as_bytes()),
                (Some("b"), b.as_bytes()),
            ])
            .await?;
        assert!(
            db.wait_count(
                "SELECT count(*) FROM subscribers_feedback",
                16,
                Duration::from_secs(30)
            )
            .await,
            "the pipeline wrote 16 rows"
        );
        let published = wait_for_async(Duration::from_secs(30), || async {
            kafka.drafts(16).await.map(|d| d.len()).unwrap_or(0) == 16
        })
        .await;
        assert!(published, "the pipeline published 16 drafts");
        stop(running).await?;
        Ok(World {
            kafka,
            db,
            config,
            file,
            _dir: dir,
        })
    }

    fn group(&self) -> &str {
        &self.config.campaigns.as_ref().unwrap().group_id
    }

    /// Runs `runner reconcile` with `args`: (exit code, stdout, stderr).
    fn reconcile(&self, args: &[&str]) -> (i32, String, String) {
        let out = Command::new(runner_binary())
            .args(["--log", "error", "reconcile", "--config"])
            .arg(&self.file)
            .args(["--timeout", "20s"])
            .args(args)
            .output()
            .expect("the runner runs");
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    fn reconcile_json(&self, args: &[&str]) -> (i32, serde_json::Value) {
        let mut all = vec!["--json"];
        all.extend_from_slice(args);
        let (code, out, err) = self.reconcile(&all);
        let v = serde_json::from_str(&out)
            .unwrap_or_else(|e| panic!("JSON output ({e}): {out}\nstderr: {err}"));
        (code, v)
    }

    /// Produces records straight to the output topic, as a plain (non-transactional) producer.
    async fn produce_output(&self, records: &[(&str, &[u8])]) -> Result<()> {
        let producer: FutureProducer = ClientConfig::new()
            .set("bootstrap.servers", &self.kafka.brokers)
            .create()?;
        for (key, value) in records {
            producer
                .send(
                    FutureRecord::to(&self.kafka.output)
                        .key(*key)
                        .payload(*value),
                    Duration::from_secs(10),
                )
                .await
                .map_err(|(e, _)| e)?;
        }
        producer.flush(Duration::from_secs(10))?;
        Ok(())
    }

    /// Every (campaign, client) pair of the output topic, read_committed, with its value.
    async fn kafka_pairs(&self) -> Result<Vec<(String, String, serde_json::Value)>> {
        let records = read_topic(
            &self.kafka.brokers,
            &self.kafka.output,
            32,
            Duration::from_secs(20),
        )
        .await?;
        Ok(records
            .iter()
            .filter_map(|m| {
                let v: serde_json::Value = serde_json::from_slice(m.payload()?).ok()?;
                Some((
                    v["adv_campaign_id"].as_str()?.to_string(),
                    v["client_id"].as_str()?.to_string(),
                    v,
                ))
            })
            .collect())
    }

    async fn delete_row(&self, campaign: &str, client: &str) -> Result<()> {
        let n = self
            .db
            .client()
            .await?
            .execute(
                "DELETE FROM subscribers_feedback WHERE adv_campaign_id = $1 AND client_id = $2",
                &[&campaign, &client],
            )
            .await?;
        assert_eq!(n, 1, "one row deleted");
        Ok(())
    }

    /// A row with no draft: a copy of (campaign, `from`)'s row for client `client`.
    async fn insert_row_like(&self, campaign: &str, from: &str, client: &str) -> Result<()> {
        self.db
            .client()
            .await?
            .execute(
                "INSERT INTO subscribers_feedback (restaurant_id, adv_campaign_id, adv_campaign_content, \
                 adv_campaign_owner, adv_campaign_owner_contact, adv_campaign_datetime_start, \
                 adv_campaign_datetime_end, datetime_created, client_id, trigger_datetime_created) \
                 SELECT restaurant_id, adv_campaign_id, adv_campaign_content, adv_campaign_owner, \
                 adv_campaign_owner_contact, adv_campaign_datetime_start, adv_campaign_datetime_end, \
                 datetime_created, $3, trigger_datetime_created FROM subscribers_feedback \
                 WHERE adv_campaign_id = $1 AND client_id = $2",
                &[&campaign, &from, &client],
            )
            .await?;
        Ok(())
    }

    async fn clients_of(&self, campaign: &str) -> Result<Vec<String>> {
        Ok(self
            .db
            .client()
            .await?
            .query(
                "SELECT client_id FROM subscribers_feedback WHERE adv_campaign_id = $1 ORDER BY client_id",
                &[&campaign],
            )
            .await?
            .iter()
            .map(|r| r.get(0))
            .collect())
    }
}

/// The draft of (campaign, client) in the output topic, as a JSON value.
async fn draft_of(w: &World, campaign: &str, client: &str) -> Result<serde_json::Value> {
    w.kafka_pairs()
        .await?
        .into_iter()
        .find(|(a, c, _)| a == campaign && c == client)
        .map(|(_, _, v)| v)
        .with_context(|| format!("a draft for {campaign}/{client}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consistent_sinks_are_equal_missing_sides_are_printed_and_repaired() -> Result<()> {
    let w = World::after_a_run().await?;
    let (code, out, err) = w.reconcile(&[]);
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(
        out.contains("total: 2 campaigns, 16 rows in PostgreSQL, 16 drafts in Kafka, 16 equal, 0 in flight; 0 differences"),
        "{out}"
    );
    assert!(out.contains(&format!("campaign {CAMPAIGN_A}: 8 rows in PostgreSQL, 8 drafts in Kafka, 8 equal, 0 differences")), "{out}");

    // Damage: two rows of A deleted (missing in PostgreSQL); a draft of B for a client with no
    // row (missing in PostgreSQL); a row of B for a client with no draft (missing in Kafka).
    let a_clients = w.clients_of(CAMPAIGN_A).await?;
    let b_clients = w.clients_of(CAMPAIGN_B).await?;
    let kept = draft_of(&w, CAMPAIGN_A, &a_clients[0]).await?;
    w.delete_row(CAMPAIGN_A, &a_clients[0]).await?;
    w.delete_row(CAMPAIGN_A, &a_clients[1]).await?;
    let mut extra = draft_of(&w, CAMPAIGN_B, &b_clients[0]).await?;
    let extra_client = "0a000000-0000-4000-8000-00000000e0e0";
    extra["client_id"] = extra_client.into();
    w.produce_output(&[(extra_client, extra.to_string().as_bytes())])
        .await?;
    let pg_only = "0b000000-0000-4000-8000-00000000f0f0";
    w.insert_row_like(CAMPAIGN_B, &b_clients[0], pg_only)
        .await?;

    let (code, out, err) = w.reconcile(&[]);
    assert_eq!(code, 1, "{out}\n{err}");
    for line in [
        format!("missing in PostgreSQL: client {} (partition", a_clients[0]),
        format!("missing in PostgreSQL: client {} (partition", a_clients[1]),
        format!("missing in PostgreSQL: client {extra_client} (partition"),
        format!("missing in Kafka: client {pg_only} (subscribers_feedback id"),
        format!("campaign {CAMPAIGN_A}: 6 rows in PostgreSQL, 8 drafts in Kafka, 6 equal, 2 differences, 0 in flight"),
        format!("campaign {CAMPAIGN_B}: 9 rows in PostgreSQL, 9 drafts in Kafka, 8 equal, 2 differences, 0 in flight"),
        "4 differences: 1 missing in Kafka, 3 missing in PostgreSQL, 0 duplicates, 0 fields differ, 0 not drafts".to_string(),
        "4 differences can be completed with --repair".to_string(),
    ] {
        assert!(out.contains(&line), "no {line:?} in:\n{out}");
    }
    assert_eq!(
        out.lines().filter(|l| l.starts_with("  ")).count(),
        4,
        "one line per difference:\n{out}"
    );

    // The same as JSON, and filtered by campaign.
    let (code, v) = w.reconcile_json(&[]);
    assert_eq!(code, 1);
    assert_eq!(v["equal"], false);
    assert_eq!(v["totals"]["missing_in_postgres"], 3, "{v:#}");
    assert_eq!(v["totals"]["missing_in_kafka"], 1, "{v:#}");
    let b = &v["campaigns"][1];
    assert_eq!(b["adv_campaign_id"], CAMPAIGN_B);
    let kinds: Vec<(&str, &str)> = b["differences"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| {
            (
                d["kind"].as_str().unwrap(),
                d["client_id"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        kinds,
        [
            ("missing_in_postgres", extra_client),
            ("missing_in_kafka", pg_only)
        ]
    );
    let (code, v) = w.reconcile_json(&["--campaign", CAMPAIGN_B]);
    assert_eq!(code, 1);
    assert_eq!(v["totals"]["campaigns"], 1, "{v:#}");
    assert_eq!(v["campaigns"][0]["adv_campaign_id"], CAMPAIGN_B);
    assert_eq!(v["totals"]["differences"], 2);
    let (code, out, err) = w.reconcile(&["--campaign", "00000000-0000-4000-8000-000000000000"]);
    assert_eq!(
        code, 0,
        "an unknown campaign has nothing to differ: {out}\n{err}"
    );
    assert!(out.contains("total: 0 campaigns"), "{out}");

    // Repair, then again: nothing left to do.
    let (code, out, err) = w.reconcile(&["--repair"]);
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(
        out.contains("repair: 3 rows inserted into PostgreSQL, 1 drafts produced to Kafka, 0 differences not repairable"),
        "{out}"
    );
    assert!(out.contains("after repair:\ncampaign"), "{out}");
    let (code, v) = w.reconcile_json(&["--repair"]);
    assert_eq!(code, 0, "{v:#}");
    assert_eq!(v["before"]["equal"], true, "{v:#}");
    assert_eq!(v["repair"]["inserted_into_postgres"], 0);
    assert_eq!(v["repair"]["produced_to_kafka"], 0);
    let (code, out, _) = w.reconcile(&[]);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("18 rows in PostgreSQL, 18 drafts in Kafka, 18 equal"),
        "{out}"
    );

    // What the repair wrote: the row as the draft was, the draft as the row is (SPEC.md's
    // fields in its order, keyed by client, marked as a repair), committed.
    assert_eq!(w.clients_of(CAMPAIGN_A).await?.len(), 8);
    let row: String = w
        .db
        .client()
        .await?
        .query_one(
            "SELECT row_to_json(f)::text FROM (SELECT restaurant_id, adv_campaign_id, adv_campaign_content, \
             adv_campaign_owner, adv_campaign_owner_contact, adv_campaign_datetime_start, \
             adv_campaign_datetime_end, client_id, datetime_created, trigger_datetime_created \
             FROM subscribers_feedback WHERE adv_campaign_id = $1 AND client_id = $2) f",
            &[&CAMPAIGN_A, &a_clients[0]],
        )
        .await?
        .get(0);
    assert_eq!(serde_json::from_str::<serde_json::Value>(&row)?, kept);
    let records = read_topic(
        &w.kafka.brokers,
        &w.kafka.output,
        32,
        Duration::from_secs(20),
    )
    .await?;
    let repaired: Vec<_> = records
        .iter()
        .filter(|m| header(m, runner::tools::reconcile::REPAIR_HEADER).is_some())
        .collect();
    assert_eq!(repaired.len(), 1);
    let m = repaired[0];
    assert_eq!(m.key(), Some(pg_only.as_bytes()));
    assert_eq!(header(m, "adv-campaign-id"), Some(CAMPAIGN_B));
    // SPEC.md's fields, in its order.
    let text = std::str::from_utf8(m.payload().unwrap())?;
    let places: Vec<usize> = [
        "restaurant_id",
        "adv_campaign_id",
        "adv_campaign_content",
        "adv_campaign_owner",
        "adv_campaign_owner_contact",
        "adv_campaign_datetime_start",
        "adv_campaign_datetime_end",
        "client_id",
        "datetime_created",
        "trigger_datetime_created",
    ]
    .iter()
    .map(|f| {
        text.find(&format!("\"{f}\":"))
            .unwrap_or_else(|| panic!("{f} in {text}"))
    })
    .collect();
    assert!(places.windows(2).all(|w| w[0] < w[1]), "{text}");
    let mut want = draft_of(&w, CAMPAIGN_B, &b_clients[0]).await?;
    want["client_id"] = pg_only.into();
    assert_eq!(json(m), want);
    assert!(w.group().len() > 1);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicates_altered_drafts_and_foreign_records_are_reported_not_repaired() -> Result<()> {
    let w = World::after_a_run().await?;
    let a_clients = w.clients_of(CAMPAIGN_A).await?;
    // A second draft of an existing pair, its content altered; a record that is no draft.
    let mut altered = draft_of(&w, CAMPAIGN_A, &a_clients[2]).await?;
    altered["adv_campaign_content"] = "altered".into();
    altered["trigger_datetime_created"] = 1.into();
    w.produce_output(&[
        (&a_clients[2], altered.to_string().as_bytes()),
        ("junk", b"not json"),
    ])
    .await?;
    let (code, out, err) = w.reconcile(&[]);
    assert_eq!(code, 1, "{out}\n{err}");
    for line in [
        format!("duplicate in Kafka: client {}, 2 records (partition", a_clients[2]),
        format!(
            "fields differ: client {}",
            a_clients[2]
        ),
        "adv_campaign_content: PostgreSQL \"first campaign\" / Kafka \"altered\"".to_string(),
        "trigger_datetime_created: PostgreSQL ".to_string(),
        "not a draft: partition".to_string(),
        format!("campaign {CAMPAIGN_A}: 8 rows in PostgreSQL, 9 drafts in Kafka, 7 equal, 2 differences"),
        "3 differences: 0 missing in Kafka, 0 missing in PostgreSQL, 1 duplicates, 1 fields differ, 1 not drafts".to_string(),
    ] {
        assert!(out.contains(&line), "no {line:?} in:\n{out}");
    }
    let (code, v) = w.reconcile_json(&["--repair"]);
    assert_eq!(code, 1, "{v:#}");
    assert_eq!(v["repair"]["not_repaired"], 3, "{v:#}");
    assert_eq!(v["repair"]["inserted_into_postgres"], 0);
    assert_eq!(v["repair"]["produced_to_kafka"], 0);
    assert_eq!(v["after"]["totals"]["differences"], 3);
    assert_eq!(
        w.clients_of(CAMPAIGN_A).await?.len(),
        8,
        "the table untouched"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_whose_outbox_entry_is_unpublished_is_in_flight_not_missing() -> Result<()> {
    let w = World::after_a_run().await?;
    let b_clients = w.clients_of(CAMPAIGN_B).await?;
    let client = "0c000000-0000-4000-8000-00000000abcd";
    w.insert_row_like(CAMPAIGN_B, &b_clients[0], client).await?;
    // Its outbox entry, as the pipeline writes one (records given whole, the campaign header).
    let mut draft = draft_of(&w, CAMPAIGN_B, &b_clients[0]).await?;
    draft["client_id"] = client.into();
    let headers =
        runner::headers::encode(&[("adv-campaign-id".into(), CAMPAIGN_B.as_bytes().to_vec())]);
    let pg = w.db.client().await?;
    pg.execute(
        "INSERT INTO campaign_runner_outbox (topic, partition, source_offset, target, keys, payloads, headers) \
         VALUES ($1, 0, 1000, 'drafts', ARRAY[$2::bytea], ARRAY[$3::bytea], $4)",
        &[
            &w.kafka.input,
            &client.as_bytes(),
            &draft.to_string().into_bytes(),
            &headers,
        ],
    )
    .await?;
    let (code, out, err) = w.reconcile(&[]);
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(
        out.contains(&format!("campaign {CAMPAIGN_B}: 9 rows in PostgreSQL, 8 drafts in Kafka, 8 equal, 0 differences, 1 in flight")),
        "{out}"
    );
    assert!(out.contains("1 drafts are in flight"), "{out}");
    // `--repair` leaves it to the pipeline.
    let (code, v) = w.reconcile_json(&["--repair"]);
    assert_eq!(code, 0, "{v:#}");
    assert_eq!(v["repair"]["produced_to_kafka"], 0);
    assert_eq!(v["after"]["totals"]["in_flight"], 1);
    // Once the entry is gone without its draft published, the draft is missing.
    pg.execute(
        "DELETE FROM campaign_runner_outbox WHERE source_offset = 1000",
        &[],
    )
    .await?;
    let (code, out, _) = w.reconcile(&[]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains(&format!("missing in Kafka: client {client}")),
        "{out}"
    );
    Ok(())
}

#[test]
fn an_unreachable_database_is_an_error_exit_2() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("runner.toml");
    std::fs::write(
        &file,
        "[kafka]\nbrokers = \"127.0.0.1:1\"\n[postgres]\nurl = \"host=127.0.0.1 port=1 user=x dbname=x connect_timeout=2\"\n",
    )
    .unwrap();
    let out = Command::new(runner_binary())
        .args(["--log", "error", "reconcile", "--config"])
        .arg(&file)
        .output()
        .expect("the runner runs");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("connecting to PostgreSQL"), "{err}");
}

/// The figures of docs/reconcile.md "Cost": the reconcile process's peak RSS over many drafts,
/// against its peak when it holds none. The mock cluster keeps a bounded log per partition
/// (older records are deleted), hence 50,000 drafts by default. Ignored by default:
/// `cargo test -p e2e-tests --test e2e reconcile::scale -- --ignored --nocapture`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement, not a check"]
async fn scale_peak_memory_per_draft() -> Result<()> {
    let subscribers: i64 = std::env::var("RECONCILE_SCALE_SUBSCRIBERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5_000);
    let campaigns = 10;
    let kafka = MockKafka::new(1)?;
    let db = TestDb::new().await?.with_schema().await?;
    db.client()
        .await?
        .execute(
            "INSERT INTO subscribers_restaurants (client_id, restaurant_id) \
             SELECT gen_random_uuid()::text, $1 FROM generate_series(1, $2::int)",
            &[&RESTAURANT, &(subscribers as i32)],
        )
        .await?;
    let mut w = World {
        config: config(&kafka, &db, ""),
        kafka,
        db,
        file: PathBuf::new(),
        _dir: tempfile::tempdir()?,
    };
    let c = w.config.campaigns.clone().context("campaigns on")?;
    w.file = w._dir.path().join("runner.toml");
    std::fs::write(
        &w.file,
        format!(
            "[kafka]\nbrokers = \"{}\"\n[postgres]\nurl = \"{}\"\n\
             [pipelines.campaigns]\ninput_topic = \"{}\"\noutput_topic = \"{}\"\n\
             dead_letter_topic = \"{}\"\ngroup_id = \"{}\"\n\
             [pipelines.campaigns.rules]\npath = \"{}\"\n",
            w.kafka.brokers,
            w.db.url,
            c.input_topic,
            c.output_topic,
            c.dead_letter_topic,
            c.group_id,
            rules_wasm().display()
        ),
    )?;
    let running = start(w.config.clone(), RunOptions::default()).await?;
    let values: Vec<String> = (0..campaigns)
        .map(|i| {
            campaign(
                RESTAURANT,
                &format!("00000000-0000-4000-9000-{i:012}"),
                1659203516,
                2659207116,
            )
        })
        .collect();
    let batch: Vec<(Option<&str>, &[u8])> = values.iter().map(|v| (None, v.as_bytes())).collect();
    w.kafka.produce(&batch).await?;
    let all = subscribers * campaigns;
    assert!(
        w.db.wait_count(
            "SELECT count(*) FROM subscribers_feedback",
            all,
            Duration::from_secs(300)
        )
        .await
            && w.db
                .wait_count(
                    "SELECT count(*) FROM campaign_runner_outbox",
                    0,
                    Duration::from_secs(60)
                )
                .await
    );
    stop(running).await?;
    let measure = |args: &[&str]| -> Result<(i32, u64, f64)> {
        let out = Command::new("/usr/bin/time")
            .arg("-v")
            .arg(runner_binary())
            .args(["--log", "error", "reconcile", "--config"])
            .arg(&w.file)
            .args(args)
            .output()?;
        let err = String::from_utf8_lossy(&out.stderr);
        let field = |name: &str| {
            err.lines()
                .find_map(|l| l.trim().strip_prefix(name))
                .map(|v| v.trim().to_string())
                .unwrap_or_default()
        };
        let kib: u64 = field("Maximum resident set size (kbytes):").parse()?;
        let wall = field("Elapsed (wall clock) time (h:mm:ss or m:ss):");
        let secs = wall
            .rsplit(':')
            .next()
            .and_then(|s| s.parse::<f64>().ok())
            .unwrap_or(0.0)
            + wall
                .rsplit(':')
                .nth(1)
                .and_then(|m| m.parse::<f64>().ok())
                .unwrap_or(0.0)
                * 60.0;
        let code = out.status.code().unwrap_or(-1);
        if code != 0 {
            let text = String::from_utf8_lossy(&out.stdout);
            let lines: Vec<&str> = text.lines().collect();
            eprintln!("{}\n{err}", lines[..lines.len().min(20)].join("\n"));
            eprintln!("{}", lines[lines.len().saturating_sub(3)..].join("\n"));
        }
        Ok((code, kib, secs))
    };
    let (code, empty_kib, _) = measure(&["--campaign", "none"])?;
    assert_eq!(code, 0);
    let (code, full_kib, secs) = measure(&[])?;
    assert_eq!(code, 0);
    let per_draft = (full_kib.saturating_sub(empty_kib) * 1024) as f64 / all as f64;
    println!(
        "reconcile over {all} drafts: peak RSS {full_kib} KiB, {empty_kib} KiB holding none: \
         {per_draft:.0} bytes per draft; {secs:.1} s (this build)"
    );
    Ok(())
}
