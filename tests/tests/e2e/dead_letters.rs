//! Every class of invalid input lands in the dead-letter topic with its raw key and value, its
//! reason code and where it came from; the good message after them is still delivered.

use e2e_tests::*;
use rdkafka::message::Message;
use runner::app::RunOptions;
use runner::pipelines::campaigns::header;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

const SPEC_NOW: i64 = 1_659_304_828;

fn spec_with(f: impl FnOnce(&mut serde_json::Value)) -> Vec<u8> {
    let mut v: serde_json::Value = serde_json::from_str(SPEC_CAMPAIGN).unwrap();
    f(&mut v);
    serde_json::to_vec(&v).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_invalid_input_class_is_dead_lettered_with_its_code() -> anyhow::Result<()> {
    let kafka = MockKafka::new(1)?;
    let db = TestDb::with_spec_subscribers().await?;
    let running = start(
        config(
            &kafka,
            &db,
            "[pipelines.campaigns]\nmax_message_bytes = 2048\n",
        ),
        RunOptions {
            clock: Arc::new(FixedClock(SPEC_NOW)),
            ..RunOptions::default()
        },
    )
    .await?;

    let mut not_utf8 = SPEC_CAMPAIGN.as_bytes().to_vec();
    not_utf8[40] = 0xc3;
    not_utf8[41] = 0x28;
    let oversized = spec_with(|v| v["adv_campaign_content"] = "x".repeat(4096).into());
    let cases: Vec<(&str, Vec<u8>)> = vec![
        (
            "malformed_json",
            br#"{"restaurant_id": "123e4567-"#.to_vec(),
        ),
        (
            "missing_field",
            spec_with(|v| {
                v.as_object_mut().unwrap().remove("adv_campaign_owner");
            }),
        ),
        (
            "wrong_type",
            spec_with(|v| v["adv_campaign_datetime_start"] = "yesterday".into()),
        ),
        (
            "invalid_uuid",
            spec_with(|v| v["restaurant_id"] = "restaurant-42".into()),
        ),
        (
            "invalid_interval",
            spec_with(|v| v["adv_campaign_datetime_end"] = 1_659_203_516.into()),
        ),
        ("not_utf8", not_utf8),
        ("oversized", oversized),
        ("not_an_object", b"[\"a campaign\"]".to_vec()),
    ];
    let keyed: Vec<(String, &[u8])> = cases
        .iter()
        .map(|(code, v)| (format!("key-{code}"), v.as_slice()))
        .collect();
    let mut messages: Vec<(Option<&str>, &[u8])> =
        keyed.iter().map(|(k, v)| (Some(k.as_str()), *v)).collect();
    messages.push((Some("good"), SPEC_CAMPAIGN.as_bytes()));
    kafka.produce(&messages).await?;

    let n = messages.len() as u64;
    assert!(
        wait_for(Duration::from_secs(20), || running
            .campaigns()
            .stats()
            .offsets_stored
            >= n)
        .await,
        "{:?}",
        running.campaigns().stats()
    );
    let rules = running.campaigns().rules.current().identity().clone();
    let stats = stop(running).await?;
    for (code, _) in &cases {
        assert_eq!(stats.dead_lettered(code), 1, "{code}: {stats:?}");
    }
    assert_eq!(
        stats.delivered, 1,
        "the good message after the bad ones is delivered"
    );
    assert_eq!(stats.settled(), n, "every message accounted for");

    let dead = kafka.dead_letters(cases.len() + 1).await?;
    assert_eq!(dead.len(), cases.len());
    let by_code: BTreeMap<&str, _> = dead
        .iter()
        .map(|m| (header(m, header::DLQ_REASON).unwrap(), m))
        .collect();
    for (offset, (code, raw)) in cases.iter().enumerate() {
        let m = by_code
            .get(code)
            .unwrap_or_else(|| panic!("no dead letter with reason {code}"));
        assert_eq!(
            m.payload(),
            Some(raw.as_slice()),
            "{code}: raw value kept byte for byte"
        );
        assert_eq!(
            m.key(),
            Some(format!("key-{code}").as_bytes()),
            "{code}: raw key kept"
        );
        assert!(
            !header(m, header::DLQ_DETAIL).unwrap_or("").is_empty(),
            "{code}: a detail"
        );
        assert_eq!(header(m, header::SOURCE_TOPIC), Some(kafka.input.as_str()));
        assert_eq!(header(m, header::SOURCE_PARTITION), Some("0"));
        assert_eq!(
            header(m, header::SOURCE_OFFSET),
            Some(offset.to_string().as_str())
        );
        assert_eq!(
            header(m, header::RULES_VERSION),
            Some(rules.version.as_str())
        );
        assert_eq!(header(m, header::RULES_SHA256), Some(rules.sha256.as_str()));
    }
    assert_eq!(
        header(by_code["missing_field"], header::DLQ_FIELD),
        Some("adv_campaign_owner")
    );
    assert_eq!(
        header(by_code["invalid_uuid"], header::DLQ_FIELD),
        Some("restaurant_id")
    );
    assert_eq!(kafka.drafts(9).await?.len(), 8);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_without_value_is_dead_lettered() -> anyhow::Result<()> {
    let kafka = MockKafka::new(1)?;
    let db = TestDb::new().await?.with_schema().await?;
    let running = start(config(&kafka, &db, ""), RunOptions::default()).await?;
    // A tombstone: key, no value.
    let producer: rdkafka::producer::FutureProducer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", &kafka.brokers)
        .create()?;
    producer
        .send(
            rdkafka::producer::FutureRecord::<str, [u8]>::to(&kafka.input).key("tomb"),
            Duration::from_secs(5),
        )
        .await
        .map_err(|(e, _)| e)?;
    assert!(
        wait_for(Duration::from_secs(20), || running
            .campaigns()
            .stats()
            .offsets_stored
            >= 1)
        .await
    );
    let stats = stop(running).await?;
    assert_eq!(stats.dead_lettered("missing_value"), 1, "{stats:?}");
    let dead = kafka.dead_letters(1).await?;
    assert_eq!(dead[0].key(), Some(&b"tomb"[..]));
    assert_eq!(dead[0].payload(), None);
    Ok(())
}
