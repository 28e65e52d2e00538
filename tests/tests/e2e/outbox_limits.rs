//! Records past the limits a fixed-width encoding would have (a header key or value over
//! 64 KiB, more than 65,535 headers, a draft over 64 KiB) go through both sinks byte for byte:
//! from memory as a unit is published, and through the outbox's stored form in PostgreSQL when
//! the next owner of a partition publishes what a crashed runner left there.

use e2e_tests::*;
use rdkafka::message::{Header, Message, OwnedHeaders, OwnedMessage};
use runner::app::RunOptions;
use runner::delivery::template::TemplateRecords;
use runner::delivery::{Evaluated, OutboxEntry, Outcome, Records, Target};
use runner::events::SourcePos;
use runner::headers::{self, HeaderList};
use runner::pipelines::campaigns::contract::{Campaign, TemplateDrafts};
use runner::pipelines::campaigns::drafts::{ClientIds, Drafts};
use runner::pipelines::campaigns::CampaignDelivery;
use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

const NOW: i64 = 1_700_000_000;
const R0: &str = "123e4567-e89b-12d3-a456-426614174000";
/// Past anything a u16 length or count holds.
const BIG: usize = 100 * 1024;
const MANY: usize = 66_000;

fn fixed() -> RunOptions {
    RunOptions {
        clock: Arc::new(FixedClock(NOW)),
        ..RunOptions::default()
    }
}

/// A header value past 64 KiB, a header key past 64 KiB, an empty and a null value, then
/// more headers than a u16 counts.
fn big_headers() -> Vec<(String, Option<Vec<u8>>)> {
    let mut h = vec![
        (
            "big-value".to_string(),
            Some((0..BIG).map(|i| (i % 251) as u8).collect()),
        ),
        ("k".repeat(70_000), Some(b"long key".to_vec())),
        ("empty".to_string(), Some(Vec::new())),
    ];
    h.extend((0..MANY).map(|i| (format!("h{}", i % 10), Some(vec![(i % 256) as u8]))));
    h
}

fn as_list(h: &[(String, Option<Vec<u8>>)]) -> HeaderList {
    h.iter()
        .map(|(k, v)| (k.clone(), v.clone().unwrap_or_default()))
        .collect()
}

fn headers_of(m: &OwnedMessage) -> HeaderList {
    use rdkafka::message::Headers;
    m.headers()
        .map(|hs| {
            hs.iter()
                .map(|h| (h.key.to_string(), h.value.unwrap_or_default().to_vec()))
                .collect()
        })
        .unwrap_or_default()
}

/// The distinct subscribers of SPEC.md's restaurant.
fn r0_clients() -> Vec<String> {
    SPEC_SUBSCRIBERS
        .iter()
        .filter(|(_, r)| *r == R0)
        .map(|(c, _)| c.to_string())
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect()
}

/// Content past 64 KiB, with multi-byte characters and characters JSON escapes.
fn big_content() -> String {
    let mut s = "é\"\\ünïcödé ".repeat(BIG / 16);
    s.push_str("end");
    s
}

async fn send(
    kafka: &MockKafka,
    key: &[u8],
    value: &[u8],
    headers: &[(String, Option<Vec<u8>>)],
) -> anyhow::Result<()> {
    let producer: rdkafka::producer::FutureProducer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", &kafka.brokers)
        .set("message.max.bytes", "4000000")
        .create()?;
    let hs = headers.iter().fold(OwnedHeaders::new(), |hs, (k, v)| {
        hs.insert(Header {
            key: k,
            value: v.as_deref(),
        })
    });
    producer
        .send(
            rdkafka::producer::FutureRecord::<[u8], [u8]>::to(&kafka.input)
                .key(key)
                .payload(value)
                .headers(hs),
            Duration::from_secs(30),
        )
        .await
        .map_err(|(e, _)| e)?;
    Ok(())
}

/// Reads `n` records of `topic` (and waits a little for any more), big ones included.
async fn read(kafka: &MockKafka, topic: &str, n: usize) -> anyhow::Result<Vec<OwnedMessage>> {
    read_topic(&kafka.brokers, topic, n + 1, Duration::from_secs(10)).await
}

/// The feedback rows' content and client, as PostgreSQL gives them back.
async fn feedback(db: &TestDb) -> anyhow::Result<Vec<(String, String)>> {
    Ok(db
        .client()
        .await?
        .query(
            "SELECT client_id, adv_campaign_content FROM subscribers_feedback ORDER BY client_id",
            &[],
        )
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn headers_and_drafts_past_64_kib_reach_both_sinks_intact() -> anyhow::Result<()> {
    let kafka = MockKafka::new(1)?;
    let db = TestDb::with_spec_subscribers().await?;
    let running = start(
        config(
            &kafka,
            &db,
            "[pipelines.campaigns]\nmax_message_bytes = 1048576\n",
        ),
        fixed(),
    )
    .await?;
    let hs = big_headers();
    let garbage = br#"{"restaurant_id": "#;
    send(&kafka, b"garbage", garbage, &hs).await?;
    let content = big_content();
    let mut value: serde_json::Value = serde_json::from_str(&campaign(
        R0,
        "00000000-0000-4000-8000-0000000000f1",
        NOW - 10,
        NOW + 10,
    ))?;
    value["adv_campaign_content"] = content.clone().into();
    send(&kafka, b"big", &serde_json::to_vec(&value)?, &hs).await?;
    assert!(
        wait_for(Duration::from_secs(30), || running
            .campaigns()
            .stats()
            .offsets_stored
            >= 2)
        .await,
        "{:?}",
        running.campaigns().stats()
    );
    let stats = stop(running).await?;
    assert_eq!(
        (stats.delivered, stats.dead_lettered("malformed_json")),
        (1, 1),
        "{stats:?}"
    );

    let dead = read(&kafka, &kafka.dlq, 1).await?;
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].payload(), Some(&garbage[..]));
    let got = headers_of(&dead[0]);
    assert!(got.len() > MANY, "{} headers", got.len());
    assert!(
        got[..hs.len()] == as_list(&hs)[..],
        "the dead letter keeps the message's headers byte for byte, in order"
    );
    assert_eq!(
        got[hs.len()..]
            .iter()
            .find(|(k, _)| k == headers::DLQ_REASON)
            .map(|(_, v)| v.as_slice()),
        Some(&b"malformed_json"[..]),
        "then the runner's"
    );

    let clients = r0_clients();
    let drafts = read(&kafka, &kafka.output, clients.len()).await?;
    assert_eq!(drafts.len(), clients.len());
    for m in &drafts {
        assert!(m.payload().unwrap_or_default().len() > BIG);
        let v = json(m);
        assert_eq!(
            v["adv_campaign_content"],
            content.as_str(),
            "the draft intact"
        );
        assert_eq!(v["client_id"].as_str().map(str::as_bytes), m.key());
    }
    let rows = feedback(&db).await?;
    assert_eq!(rows.len(), clients.len());
    for ((client, stored), want) in rows.iter().zip(&clients) {
        assert_eq!(client, want);
        assert!(stored == &content, "the row's content intact");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outbox_entries_past_64_kib_are_published_intact_by_the_next_owner() -> anyhow::Result<()> {
    let kafka = MockKafka::new(1)?;
    let db = TestDb::with_spec_subscribers().await?;
    let campaign_id = "00000000-0000-4000-8000-0000000000f2";
    let content = big_content();
    let value = campaign(R0, campaign_id, NOW - 10, NOW + 10);
    let garbage = br#"{"restaurant_id": "#;
    kafka
        .produce(&[(None, value.as_bytes()), (Some("garbage"), &garbage[..])])
        .await?;

    // A runner that crashed right after its PostgreSQL transaction: the outbox holds a
    // campaign's drafts (as their template, over 64 KiB each) and a dead letter, both with
    // headers past what a u16 holds.
    let events = runner::events::Events::default();
    let (_stop_tx, mut stop_rx) = tokio::sync::watch::channel(false);
    let mut sink = campaigns_pg(&db);
    let fence = sink
        .claim(
            &kafka.input,
            0,
            "crashed-runner",
            &events,
            Duration::from_secs(1),
            &mut stop_rx,
        )
        .await?;
    let clients = r0_clients();
    let head = format!(
        r#"{{"adv_campaign_content":{},"client_id":""#,
        serde_json::Value::from(content.as_str())
    );
    let shared = format!(r#"{head}"}}"#);
    let fills = clients.concat();
    let fill_ends = clients
        .iter()
        .scan(0, |end, c| {
            *end += c.len() as u32;
            Some(*end)
        })
        .collect();
    let drafts = Drafts::new(
        ClientIds::packed(&clients),
        TemplateDrafts {
            campaign: Campaign {
                restaurant_id: R0.into(),
                adv_campaign_id: campaign_id.into(),
                adv_campaign_content: content.clone(),
                adv_campaign_owner: "o".into(),
                adv_campaign_owner_contact: "c".into(),
                adv_campaign_datetime_start: NOW - 10,
                adv_campaign_datetime_end: NOW + 10,
                datetime_created: NOW - 110,
            },
            trigger_datetime_created: NOW - 5,
            shared: shared.clone().into_bytes(),
            shared_ends: vec![head.len() as u32, shared.len() as u32],
            fills: fills.into_bytes(),
            fill_ends,
        },
        1 << 28,
    )?;
    let draft_headers: HeaderList = vec![
        ("big-value".into(), vec![7; BIG]),
        ("k".repeat(70_000), b"long key".to_vec()),
        ("source-offset".into(), b"0".to_vec()),
    ];
    let dead_headers = as_list(&big_headers());
    let entries = [
        OutboxEntry {
            source_offset: 0,
            target: Target::Output,
            records: Records::Template(drafts.records().clone()),
            headers: draft_headers.clone(),
        },
        OutboxEntry {
            source_offset: 1,
            target: Target::DeadLetters,
            records: Records::one(Some(b"garbage"), Some(garbage)),
            headers: dead_headers.clone(),
        },
    ];
    let message = |offset: i64, value: &[u8]| {
        OwnedMessage::new(
            Some(value.to_vec()),
            None,
            kafka.input.clone(),
            rdkafka::Timestamp::NotAvailable,
            0,
            offset,
            None,
        )
    };
    let pos = |offset: i64| SourcePos {
        topic: kafka.input.clone(),
        partition: 0,
        offset,
    };
    let unit = [
        Evaluated {
            msg: message(0, value.as_bytes()),
            pos: pos(0),
            outcome: Outcome::Deliver(CampaignDelivery {
                drafts,
                trigger: (NOW - 5) as i32,
                snapshot: 1,
                cause: runner::pipelines::campaigns::schedule::Cause::Published,
                registry: None,
            }),
        },
        Evaluated {
            msg: message(1, garbage),
            pos: pos(1),
            outcome: Outcome::dead_letter("malformed_json", "cut short".into(), None),
        },
    ];
    sink.commit(
        &fence,
        &unit,
        &entries,
        None,
        &events,
        Duration::from_secs(1),
        &mut stop_rx,
    )
    .await?;

    // What PostgreSQL holds decodes to what was written.
    let rows = db
        .client()
        .await?
        .query(
            "SELECT source_offset, headers, drafts FROM campaign_runner_outbox ORDER BY source_offset",
            &[],
        )
        .await?;
    assert_eq!(rows.len(), 2);
    assert_eq!(
        headers::decode(rows[0].get(1)).as_ref(),
        Some(&draft_headers)
    );
    let stored = TemplateRecords::decode(rows[0].get::<_, Option<&[u8]>>(2).expect("a template"))?;
    assert_eq!(stored.len(), clients.len());
    for ((key, payload), client) in stored.iter().zip(&clients) {
        assert_eq!(key, client.as_bytes());
        assert_eq!(payload, format!(r#"{head}{client}"}}"#).as_bytes());
    }
    let back = headers::decode(rows[1].get(1)).expect("the dead letter's headers decode");
    assert_eq!(back.len(), dead_headers.len());
    assert!(back == dead_headers);

    // The next owner publishes them from the outbox.
    let running = start(config(&kafka, &db, ""), fixed()).await?;
    let cleared = db
        .wait_count(
            "SELECT count(*) FROM campaign_runner_outbox",
            0,
            Duration::from_secs(30),
        )
        .await;
    let stats = stop(running).await?;
    assert!(cleared, "the outbox was published and cleared: {stats:?}");
    let drafts = read(&kafka, &kafka.output, clients.len()).await?;
    assert_eq!(drafts.len(), clients.len());
    for m in &drafts {
        let client = std::str::from_utf8(m.key().expect("a key"))?;
        assert_eq!(
            m.payload(),
            Some(format!(r#"{head}{client}"}}"#).as_bytes()),
            "the draft rendered from the stored template, intact"
        );
        assert_eq!(headers_of(m), draft_headers);
    }
    let dead = read(&kafka, &kafka.dlq, 1).await?;
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].key(), Some(&b"garbage"[..]));
    assert_eq!(dead[0].payload(), Some(&garbage[..]));
    assert!(headers_of(&dead[0]) == dead_headers, "every header intact");
    let rows = feedback(&db).await?;
    assert_eq!(rows.len(), clients.len());
    assert!(rows.iter().all(|(_, c)| c == &content));
    Ok(())
}
