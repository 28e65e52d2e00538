//! The delivery protocol on the Kafka protocol's in-process mock cluster: duplicates in the
//! input, work committed to PostgreSQL but not to Kafka (a crash between the two), outbox rows
//! of an earlier release, a zombie fenced off. (Real runner processes — SIGTERM, kill -9 loops,
//! outages — run against Apache Kafka in tests/kafka.rs: the mock does not store the offsets a
//! transaction commits, and shows aborted transactions to readers.)

use e2e_tests::*;
use rdkafka::message::Message;
use runner::app::RunOptions;
use runner::delivery::{Evaluated, Kept, OutboxEntry, Outcome, Records, Target};
use runner::events::SourcePos;
use runner::pipelines::campaigns::contract::{Campaign, TemplateDrafts};
use runner::pipelines::campaigns::drafts::{ClientIds, Drafts};
use runner::pipelines::campaigns::CampaignDelivery;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

const NOW: i64 = 1_700_000_000;
const R0: &str = "123e4567-e89b-12d3-a456-426614174000";
const R1: &str = "123e4567-e89b-12d3-a456-426614174001";

fn fixed() -> RunOptions {
    RunOptions {
        clock: Arc::new(FixedClock(NOW)),
        ..RunOptions::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_campaign_published_twice_reaches_each_subscriber_once() -> anyhow::Result<()> {
    let kafka = MockKafka::new(2)?;
    let db = TestDb::with_spec_subscribers().await?;
    let running = start(config(&kafka, &db, ""), fixed()).await?;
    let value = campaign(
        R1,
        "00000000-0000-4000-8000-0000000000e1",
        NOW - 10,
        NOW + 10,
    );
    kafka
        .produce(&[(Some("a"), value.as_bytes()), (Some("b"), value.as_bytes())])
        .await?;
    assert!(
        wait_for(Duration::from_secs(20), || running
            .campaigns()
            .stats()
            .offsets_stored
            >= 2)
        .await
    );
    // A subscriber joins, and the same campaign is published a third time: only the newcomer
    // gets a draft.
    db.subscribe_with(&db.client().await?, "newcomer", R1)
        .await?;
    assert!(
        wait_for(Duration::from_secs(5), || running
            .campaigns()
            .cache
            .snapshot()
            .clients(R1)
            .count()
            == 2)
        .await
    );
    kafka.produce(&[(Some("c"), value.as_bytes())]).await?;
    assert!(
        wait_for(Duration::from_secs(20), || running
            .campaigns()
            .stats()
            .offsets_stored
            >= 3)
        .await
    );
    stop(running).await?;
    let mut clients: Vec<String> = kafka
        .drafts(3)
        .await?
        .iter()
        .map(|m| json(m)["client_id"].as_str().unwrap().to_string())
        .collect();
    clients.sort();
    assert_eq!(
        clients,
        ["923e4567-e89b-12d3-a456-426614174000", "newcomer"]
    );
    assert_eq!(
        db.count("SELECT count(*) FROM subscribers_feedback")
            .await?,
        2
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn work_committed_to_postgres_only_is_published_once_by_the_next_owner() -> anyhow::Result<()>
{
    let kafka = MockKafka::new(1)?;
    let db = TestDb::with_spec_subscribers().await?;
    let campaign_id = "00000000-0000-4000-8000-0000000000e2";
    let value = campaign(R0, campaign_id, NOW - 10, NOW + 10);
    kafka.produce(&[(None, value.as_bytes())]).await?;

    // A runner that crashed right after its PostgreSQL transaction: rows and outbox committed,
    // the Kafka transaction never committed.
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
    let clients: Vec<String> = SPEC_SUBSCRIBERS
        .iter()
        .filter(|(_, r)| *r == R0)
        .map(|(c, _)| c.to_string())
        .collect();
    // The drafts as the rules hand them over (a template: one slot, filled with the client
    // id), so the takeover below renders them from the outbox's stored template.
    let fills: String = clients.concat();
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
                adv_campaign_content: "from the crashed runner".into(),
                adv_campaign_owner: "o".into(),
                adv_campaign_owner_contact: "c".into(),
                adv_campaign_datetime_start: NOW - 10,
                adv_campaign_datetime_end: NOW + 10,
                datetime_created: NOW - 110,
            },
            trigger_datetime_created: NOW - 5,
            shared: b"outbox draft for ".to_vec(),
            shared_ends: vec![17, 17],
            fills: fills.into_bytes(),
            fill_ends,
        },
        1 << 20,
    )?;
    let entry = OutboxEntry {
        source_offset: 0,
        target: Target::Output,
        records: Records::Template(drafts.records().clone()),
        headers: vec![("rules-version".into(), b"campaign-rules 3.0.0".to_vec())],
    };
    // The unit: the message at offset 0 and the drafts the rules made of it.
    let unit = [Evaluated {
        msg: rdkafka::message::OwnedMessage::new(
            Some(value.clone().into_bytes()),
            None,
            kafka.input.clone(),
            rdkafka::Timestamp::NotAvailable,
            0,
            0,
            None,
        ),
        pos: SourcePos {
            topic: kafka.input.clone(),
            partition: 0,
            offset: 0,
        },
        outcome: Outcome::Deliver(CampaignDelivery {
            drafts,
            trigger: (NOW - 5) as i32,
            snapshot: 1,
            cause: runner::pipelines::campaigns::schedule::Cause::Published,
            registry: None,
        }),
    }];
    let kept = sink
        .commit(
            &fence,
            &unit,
            &[entry],
            None,
            &events,
            Duration::from_secs(1),
            &mut stop_rx,
        )
        .await?;
    assert_eq!(
        kept,
        vec![Kept {
            entry: 0,
            only: None
        }],
        "all 8 drafts are new"
    );
    assert_eq!(
        db.count("SELECT count(*) FROM campaign_runner_outbox")
            .await?,
        1
    );

    // The next owner takes the partition over.
    let running = start(config(&kafka, &db, ""), fixed()).await?;
    let cleared = db
        .wait_count(
            "SELECT count(*) FROM campaign_runner_outbox",
            0,
            Duration::from_secs(20),
        )
        .await;
    assert!(cleared, "the outbox was published and cleared");
    // Give the replayed message a chance to be (wrongly) processed again.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let stats = stop(running).await?;
    assert_eq!(
        stats.delivered, 0,
        "message 0 is done: not evaluated again: {stats:?}"
    );
    let drafts = kafka.drafts(9).await?;
    assert_eq!(drafts.len(), 8, "each draft exactly once");
    for m in &drafts {
        let client = std::str::from_utf8(m.key().unwrap())?;
        assert_eq!(
            m.payload(),
            Some(format!("outbox draft for {client}").as_bytes()),
            "published from the outbox"
        );
    }
    assert_eq!(
        db.count("SELECT count(*) FROM subscribers_feedback")
            .await?,
        8
    );
    assert_eq!(
        db.count("SELECT epoch FROM campaign_runner_fences").await?,
        2,
        "the new owner bumped the epoch"
    );
    Ok(())
}

/// A packed buffer as the outbox stores it: count, byte length, each item's end (u32
/// little-endian), the bytes.
fn packed(items: &[&str]) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(&(items.len() as u32).to_le_bytes());
    out.extend_from_slice(&(items.iter().map(|i| i.len()).sum::<usize>() as u32).to_le_bytes());
    let mut end = 0u32;
    for i in items {
        end += i.len() as u32;
        out.extend_from_slice(&end.to_le_bytes());
    }
    for i in items {
        out.extend_from_slice(i.as_bytes());
    }
    out
}

/// Headers as the outbox stores them: count (u16), then per header key length (u16), key,
/// value length (u32), value, big-endian.
fn stored_headers(headers: &[(&str, &str)]) -> Vec<u8> {
    let mut out = (headers.len() as u16).to_be_bytes().to_vec();
    for (k, v) in headers {
        out.extend_from_slice(&(k.len() as u16).to_be_bytes());
        out.extend_from_slice(k.as_bytes());
        out.extend_from_slice(&(v.len() as u32).to_be_bytes());
        out.extend_from_slice(v.as_bytes());
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outbox_rows_in_the_stored_format_are_published_once_after_an_upgrade() -> anyhow::Result<()>
{
    // What a runner of the single-pipeline release left behind when it stopped between its
    // PostgreSQL and Kafka transactions: the rows are written here byte by byte in the format
    // it used (a campaign's drafts as their template, format 2: the fills are the client ids;
    // a dead letter as its raw bytes), not by this runner's code.
    let kafka = MockKafka::new(1)?;
    let db = TestDb::with_spec_subscribers().await?;
    let value = campaign(
        R0,
        "00000000-0000-4000-8000-0000000000b1",
        NOW - 10,
        NOW + 10,
    );
    let garbage: &[u8] = b"{\"restaurant_id\": ";
    kafka
        .produce(&[(None, value.as_bytes()), (Some("k"), garbage)])
        .await?;
    let mut template = vec![2u8];
    template.extend(packed(&["client-a", "client-b"]));
    template.extend(packed(&[r#"{"draft_for":""#, r#""}"#]));
    let c = db.client().await?;
    c.execute(
        "INSERT INTO campaign_runner_fences (topic, partition, epoch, owner) VALUES ($1, 0, 3, 'previous-release')",
        &[&kafka.input],
    )
    .await?;
    let no_records: Vec<Option<Vec<u8>>> = Vec::new();
    c.execute(
        "INSERT INTO campaign_runner_outbox (topic, partition, source_offset, target, keys, payloads, drafts, headers) \
         VALUES ($1, 0, 0, 'drafts', $2, $2, $3, $4)",
        &[
            &kafka.input,
            &no_records,
            &template,
            &stored_headers(&[("source-offset", "0"), ("rules-version", "campaign-rules 3.1.0")]),
        ],
    )
    .await?;
    c.execute(
        "INSERT INTO campaign_runner_outbox (topic, partition, source_offset, target, keys, payloads, drafts, headers) \
         VALUES ($1, 0, 1, 'dead_letters', $2, $3, NULL, $4)",
        &[
            &kafka.input,
            &vec![Some(b"k".to_vec())],
            &vec![Some(garbage.to_vec())],
            &stored_headers(&[("dlq-reason", "malformed_json"), ("source-offset", "1")]),
        ],
    )
    .await?;

    let running = start(config(&kafka, &db, ""), fixed()).await?;
    let cleared = db
        .wait_count(
            "SELECT count(*) FROM campaign_runner_outbox",
            0,
            Duration::from_secs(20),
        )
        .await;
    // A marker after the two, on the same partition: once it is in PostgreSQL, the two before
    // it were either skipped as done or evaluated again, and the counters say which.
    let marker = campaign(
        R1,
        "00000000-0000-4000-8000-0000000000b2",
        NOW - 10,
        NOW + 10,
    );
    kafka.produce(&[(None, marker.as_bytes())]).await?;
    let marked = db
        .wait_count(
            "SELECT count(*) FROM subscribers_feedback WHERE adv_campaign_id LIKE '%b2'",
            1,
            Duration::from_secs(20),
        )
        .await;
    assert!(marked, "the marker was delivered");
    assert!(
        wait_for(Duration::from_secs(20), || running
            .campaigns()
            .stats()
            .offsets_stored
            >= 1)
        .await
    );
    let stats = stop(running).await?;
    assert!(cleared, "the outbox was published and cleared");
    assert_eq!(
        (stats.delivered, stats.dead_lettered.len()),
        (1, 0),
        "only the marker is evaluated: the two stored messages are done: {stats:?}"
    );
    let drafts: BTreeMap<String, String> = kafka
        .drafts(3)
        .await?
        .iter()
        // The marker's drafts (offset 2) say so in their provenance; the stored ones carry
        // the headers stored with them.
        .filter(|m| provenance(m).map(|p| p.source_offset) != Some(2))
        .map(|m| {
            (
                String::from_utf8_lossy(m.key().unwrap_or_default()).into_owned(),
                String::from_utf8_lossy(m.payload().unwrap_or_default()).into_owned(),
            )
        })
        .collect();
    assert_eq!(
        drafts,
        BTreeMap::from([
            ("client-a".into(), r#"{"draft_for":"client-a"}"#.into()),
            ("client-b".into(), r#"{"draft_for":"client-b"}"#.into()),
        ]),
        "each stored draft published once, rendered from its template"
    );
    let dead = kafka.dead_letters(1).await?;
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].payload(), Some(garbage));
    assert_eq!(dead[0].key(), Some(&b"k"[..]));
    assert_eq!(header(&dead[0], "dlq-reason"), Some("malformed_json"));
    assert_eq!(
        db.count("SELECT epoch FROM campaign_runner_fences").await?,
        4,
        "the new owner bumped the stored epoch"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fenced_runner_writes_nothing_for_the_partition() -> anyhow::Result<()> {
    let kafka = MockKafka::new(1)?;
    let db = TestDb::with_spec_subscribers().await?;
    let running = start(config(&kafka, &db, ""), fixed()).await?;
    let first = campaign(
        R0,
        "00000000-0000-4000-8000-0000000000f1",
        NOW - 10,
        NOW + 10,
    );
    kafka.produce(&[(None, first.as_bytes())]).await?;
    assert!(
        wait_for(Duration::from_secs(20), || running
            .campaigns()
            .stats()
            .offsets_stored
            >= 1)
        .await
    );
    // Another runner claims the partition (as after a rebalance this one missed): this one is
    // now a zombie and must not write.
    let events = runner::events::Events::default();
    let (_tx, mut stop_rx) = tokio::sync::watch::channel(false);
    campaigns_pg(&db)
        .claim(
            &kafka.input,
            0,
            "usurper",
            &events,
            Duration::from_secs(1),
            &mut stop_rx,
        )
        .await?;
    let second = campaign(
        R0,
        "00000000-0000-4000-8000-0000000000f2",
        NOW - 10,
        NOW + 10,
    );
    kafka.produce(&[(None, second.as_bytes())]).await?;
    assert!(
        wait_for(Duration::from_secs(20), || running
            .campaigns()
            .stats()
            .partitions_fenced
            >= 1)
        .await,
        "{:?}",
        running.campaigns().stats()
    );
    stop(running).await?;
    assert_eq!(
        db.count("SELECT count(*) FROM subscribers_feedback WHERE adv_campaign_id LIKE '%f2'")
            .await?,
        0
    );
    // Nothing of the second campaign (offset 1) in the outbox either. The first unit's row,
    // published already, may still be there: its cleanup rides on the partition's next
    // transaction, which the zombie may not make; the next owner deletes it when it takes over.
    assert_eq!(
        db.count("SELECT count(*) FROM campaign_runner_outbox WHERE source_offset >= 1")
            .await?,
        0
    );
    let drafts = kafka.drafts(17).await?;
    assert_eq!(drafts.len(), 8, "only the first campaign's drafts");
    Ok(())
}
