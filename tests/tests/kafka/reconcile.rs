//! `runner reconcile` on a real Apache Kafka broker with the real runner binary: a running
//! pipeline's sinks compare equal (also while campaigns arrive: drafts committed to PostgreSQL
//! and not yet to Kafka are in flight, not missing); damage to each side is found (exit 1),
//! `--repair` completes it in a Kafka transaction (exit 0, and 0 again), and a read_committed
//! reader sees each repaired draft once. A topic whose first records were deleted is noted, and
//! its missing drafts are produced again only for the campaigns named with `--campaign`.

use super::brokers::*;
use anyhow::Result;
use e2e_tests::*;
use rdkafka::message::Message;
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::ClientConfig;
use std::collections::BTreeMap;
use std::process::Command;
use std::time::Duration;

const RESTAURANT: &str = "00000000-0000-4000-8000-000000007100";
const SUBSCRIBERS: i64 = 50;

fn reconcile(config: &std::path::Path, args: &[&str]) -> (i32, String) {
    let out = Command::new(runner_binary())
        .args(["--log", "error", "reconcile", "--config"])
        .arg(config)
        .args(args)
        .output()
        .expect("the runner runs");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}

/// Every (campaign, client) pair of the output topic as a read_committed reader sees it, with
/// how many times it is there.
async fn pairs(brokers: &str, topic: &str) -> Result<BTreeMap<(String, String), usize>> {
    let mut per = BTreeMap::new();
    for m in read_topic(brokers, topic, 1000, Duration::from_secs(60)).await? {
        let v: serde_json::Value = serde_json::from_slice(m.payload().unwrap_or_default())?;
        let pair = (
            v["adv_campaign_id"].as_str().unwrap_or("").to_string(),
            v["client_id"].as_str().unwrap_or("").to_string(),
        );
        *per.entry(pair).or_default() += 1;
    }
    Ok(per)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconcile_finds_damage_to_either_side_and_repairs_it() -> Result<()> {
    let _one = SERIAL.lock().await;
    let kafka = Kafka::single()?;
    let (input, output, dlq) = (unique("campaigns"), unique("drafts"), unique("dlq"));
    kafka
        .create_topics(&[(&input, 2), (&output, 2), (&dlq, 1)])
        .await?;
    let db = TestDb::new().await?.with_schema().await?;
    let pg = db.client().await?;
    pg.execute(
        "INSERT INTO subscribers_restaurants (client_id, restaurant_id) \
         SELECT gen_random_uuid()::text, $1 FROM generate_series(1, $2::int)",
        &[&RESTAURANT, &(SUBSCRIBERS as i32)],
    )
    .await?;
    let dir = tempfile::tempdir()?;
    let config = dir.path().join("runner.toml");
    std::fs::write(
        &config,
        format!(
            "[kafka]\nbrokers = \"{}\"\n[postgres]\nurl = \"{}\"\n\
             [pipelines.campaigns]\ninput_topic = \"{input}\"\noutput_topic = \"{output}\"\n\
             dead_letter_topic = \"{dlq}\"\ngroup_id = \"{}\"\n\
             [pipelines.campaigns.rules]\npath = \"{}\"\ncompile_cache_dir = \"{}\"\n",
            kafka.brokers,
            db.url,
            unique("group"),
            rules_wasm().display(),
            dir.path().join("compiled").display()
        ),
    )?;
    let mut runner = ChildGuard(
        Command::new(runner_binary())
            .args(["--log", "error", "run", "--config"])
            .arg(&config)
            .spawn()?,
    );
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs() as i64;
    let campaigns: Vec<String> = (0..20)
        .map(|i| format!("00000000-0000-4000-9000-{:012}", 7100 + i))
        .collect();
    let values: Vec<String> = campaigns
        .iter()
        .map(|c| campaign(RESTAURANT, c, now - 3600, now + 3600))
        .collect();
    // The first half, then a comparison while the second half is being delivered: whatever
    // is committed to PostgreSQL and not yet to Kafka is in flight, never a difference.
    let first: Vec<(Option<&str>, &[u8])> =
        values[..10].iter().map(|v| (None, v.as_bytes())).collect();
    produce(&kafka.brokers, &input, &first).await?;
    let expected = SUBSCRIBERS * 10;
    assert!(
        db.wait_count(
            "SELECT count(*) FROM subscribers_feedback",
            expected,
            Duration::from_secs(90)
        )
        .await,
        "the first campaigns reached PostgreSQL"
    );
    let second: Vec<(Option<&str>, &[u8])> =
        values[10..].iter().map(|v| (None, v.as_bytes())).collect();
    produce(&kafka.brokers, &input, &second).await?;
    let (code, out) = reconcile(&config, &[]);
    assert_eq!(code, 0, "no difference while the pipeline delivers:\n{out}");
    let all = SUBSCRIBERS * 20;
    assert!(
        db.wait_count(
            "SELECT count(*) FROM subscribers_feedback",
            all,
            Duration::from_secs(90)
        )
        .await
            && db
                .wait_count(
                    "SELECT count(*) FROM campaign_runner_outbox",
                    0,
                    Duration::from_secs(30)
                )
                .await,
        "every campaign delivered"
    );
    let (code, out) = reconcile(&config, &[]);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains(&format!(
            "total: 20 campaigns, {all} rows in PostgreSQL, {all} drafts in Kafka, {all} equal, 0 in flight; 0 differences"
        )),
        "{out}"
    );

    // Damage each side: three rows of one campaign deleted; a draft produced for a client
    // with no row, as a plain producer would.
    let victims: Vec<String> = pg
        .query(
            "DELETE FROM subscribers_feedback WHERE id IN (SELECT id FROM subscribers_feedback \
             WHERE adv_campaign_id = $1 ORDER BY id LIMIT 3) RETURNING client_id",
            &[&campaigns[3]],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(victims.len(), 3);
    let stray_client = "0d000000-0000-4000-8000-0000000000aa";
    let mut stray = serde_json::from_str::<serde_json::Value>(&values[5])?;
    stray["client_id"] = stray_client.into();
    stray["trigger_datetime_created"] = now.into();
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &kafka.brokers)
        .create()?;
    producer
        .send(
            FutureRecord::to(&output)
                .key(stray_client)
                .payload(&stray.to_string()),
            Duration::from_secs(30),
        )
        .await
        .map_err(|(e, _)| e)?;
    producer.flush(Duration::from_secs(10))?;
    let pg_only: Vec<String> = pg
        .query(
            "INSERT INTO subscribers_feedback (restaurant_id, adv_campaign_id, adv_campaign_content, \
             adv_campaign_owner, adv_campaign_owner_contact, adv_campaign_datetime_start, \
             adv_campaign_datetime_end, datetime_created, client_id, trigger_datetime_created) \
             SELECT restaurant_id, adv_campaign_id, adv_campaign_content, adv_campaign_owner, \
             adv_campaign_owner_contact, adv_campaign_datetime_start, adv_campaign_datetime_end, \
             datetime_created, '0e000000-0000-4000-8000-0000000000bb', trigger_datetime_created \
             FROM subscribers_feedback WHERE adv_campaign_id = $1 LIMIT 1 RETURNING client_id",
            &[&campaigns[7]],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();

    let (code, out) = reconcile(&config, &[]);
    assert_eq!(code, 1, "{out}");
    for v in &victims {
        assert!(
            out.contains(&format!("missing in PostgreSQL: client {v} (partition")),
            "{v}: {out}"
        );
    }
    assert!(
        out.contains(&format!("missing in PostgreSQL: client {stray_client}")),
        "{out}"
    );
    assert!(
        out.contains(&format!("missing in Kafka: client {}", pg_only[0])),
        "{out}"
    );
    assert!(
        out.contains("5 differences: 1 missing in Kafka, 4 missing in PostgreSQL"),
        "{out}"
    );

    let (code, out) = reconcile(&config, &["--repair"]);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("repair: 4 rows inserted into PostgreSQL, 1 drafts produced to Kafka"),
        "{out}"
    );
    let (code, out) = reconcile(&config, &[]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("0 differences"), "{out}");

    // As a read_committed reader sees it: every pair once, the repaired one included.
    let per = pairs(&kafka.brokers, &output).await?;
    assert_eq!(
        per.len() as i64,
        all + 2,
        "every draft plus the stray and the repaired one"
    );
    assert!(per.values().all(|n| *n == 1), "each pair once");
    assert_eq!(
        per.get(&(campaigns[7].clone(), pg_only[0].clone())),
        Some(&1)
    );
    assert_eq!(
        db.count("SELECT count(*) FROM subscribers_feedback")
            .await?,
        all + 2
    );

    // The first records of partition 0 deleted, as retention would: noted, and a repair
    // without --campaign does not publish those drafts again; one naming the campaigns does.
    let admin = kafka.admin()?;
    let mut tpl = rdkafka::TopicPartitionList::new();
    tpl.add_partition_offset(&output, 0, rdkafka::Offset::Offset(3))?;
    for r in admin
        .delete_records(&tpl, &rdkafka::admin::AdminOptions::new())
        .await?
        .elements()
    {
        r.error()?;
    }
    let (code, out) = reconcile(&config, &[]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("note: partition 0 of the output topic starts at offset 3"),
        "{out}"
    );
    let (code, out) = reconcile(&config, &["--json", "--repair"]);
    assert_eq!(code, 1, "{out}");
    let v: serde_json::Value = serde_json::from_str(&out)?;
    assert_eq!(v["repair"]["kafka_skipped_truncated"], true, "{v:#}");
    assert_eq!(v["repair"]["produced_to_kafka"], 0);
    let lost: Vec<String> = v["after"]["campaigns"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["differences"].as_array().is_some_and(|d| !d.is_empty()))
        .map(|c| c["adv_campaign_id"].as_str().unwrap().to_string())
        .collect();
    let missing = v["after"]["totals"]["missing_in_kafka"].as_u64().unwrap();
    assert!((1..=3).contains(&missing), "{v:#}");
    let mut args = vec!["--json", "--repair"];
    for c in &lost {
        args.extend(["--campaign", c.as_str()]);
    }
    let (code, out) = reconcile(&config, &args);
    assert_eq!(code, 0, "{out}");
    let v: serde_json::Value = serde_json::from_str(&out)?;
    assert_eq!(v["repair"]["produced_to_kafka"], missing, "{v:#}");
    let status = terminate(&mut runner)?;
    assert_eq!(status.code(), Some(0));
    Ok(())
}
