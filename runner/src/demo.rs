//! `runner demo`: the campaign pipeline on embedded defaults — librdkafka's in-process mock
//! cluster (the real Kafka protocol over local sockets) and a database of the demo's own on the
//! local PostgreSQL. Seeds SPEC.md's subscribers, produces SPEC.md's example campaign, an
//! expired one and a malformed message, and prints what came out of every sink. Also the small
//! Kafka helpers the demo uses (produce, read a topic to its end, wait for a condition).

use crate::app::{self, RunOptions};
use crate::config::{Config, Sources};
use crate::db;
use crate::events::Stats;
use crate::pipelines::campaigns::{self, SkipReason};
use anyhow::{bail, Context, Result};
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::{Headers, Message, OwnedMessage};
use rdkafka::mocking::MockCluster;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// SPEC.md's ten example subscriptions (rows 8 and 9 are the same subscription twice).
pub const SPEC_SUBSCRIBERS: [(&str, &str); 10] = [
    (
        "223e4567-e89b-12d3-a456-426614174000",
        "123e4567-e89b-12d3-a456-426614174000",
    ),
    (
        "323e4567-e89b-12d3-a456-426614174000",
        "123e4567-e89b-12d3-a456-426614174000",
    ),
    (
        "423e4567-e89b-12d3-a456-426614174000",
        "123e4567-e89b-12d3-a456-426614174000",
    ),
    (
        "523e4567-e89b-12d3-a456-426614174000",
        "123e4567-e89b-12d3-a456-426614174000",
    ),
    (
        "623e4567-e89b-12d3-a456-426614174000",
        "123e4567-e89b-12d3-a456-426614174000",
    ),
    (
        "723e4567-e89b-12d3-a456-426614174000",
        "123e4567-e89b-12d3-a456-426614174000",
    ),
    (
        "823e4567-e89b-12d3-a456-426614174000",
        "123e4567-e89b-12d3-a456-426614174000",
    ),
    (
        "923e4567-e89b-12d3-a456-426614174000",
        "123e4567-e89b-12d3-a456-426614174001",
    ),
    (
        "923e4567-e89b-12d3-a456-426614174000",
        "123e4567-e89b-12d3-a456-426614174001",
    ),
    (
        "023e4567-e89b-12d3-a456-426614174000",
        "123e4567-e89b-12d3-a456-426614174000",
    ),
];

/// SPEC.md's example campaign value (it ends in 2054).
pub const SPEC_CAMPAIGN: &str = r#"{"restaurant_id": "123e4567-e89b-12d3-a456-426614174000","adv_campaign_id": "123e4567-e89b-12d3-a456-426614174003","adv_campaign_content": "first campaign","adv_campaign_owner": "Ivanov Ivan Ivanovich","adv_campaign_owner_contact": "iiivanov@restaurant.ru","adv_campaign_datetime_start": 1659203516,"adv_campaign_datetime_end": 2659207116,"datetime_created": 1659131516}"#;

/// The same restaurant's campaign that ended in 2022.
pub const EXPIRED_CAMPAIGN: &str = r#"{"restaurant_id": "123e4567-e89b-12d3-a456-426614174000","adv_campaign_id": "123e4567-e89b-12d3-a456-426614174004","adv_campaign_content": "last summer's offer","adv_campaign_owner": "Ivanov Ivan Ivanovich","adv_campaign_owner_contact": "iiivanov@restaurant.ru","adv_campaign_datetime_start": 1659203516,"adv_campaign_datetime_end": 1659207116,"datetime_created": 1659131516}"#;

/// A value cut short: not JSON.
pub const MALFORMED_MESSAGE: &str =
    r#"{"restaurant_id": "123e4567-e89b-12d3-a456-426614174000", "adv_campaign_id": "#;

#[derive(Debug, Clone)]
pub struct DemoOptions {
    pub rules: PathBuf,
    /// A connection string to a database where the demo may drop and create its own.
    pub admin_url: String,
    pub database: String,
}

/// What the demo writes on the database it creates: it drops only a database that says so.
const DEMO_MARK: &str = "created by runner demo";

/// Creates the demo's database anew through `admin_url` (dropping the one an earlier demo
/// made, never any other); returns its URL.
async fn demo_database(admin_url: &str, database: &str) -> Result<String> {
    let admin = db::connect(admin_url)
        .await
        .context("connecting to PostgreSQL as admin")?;
    let existing = admin
        .query_opt(
            "SELECT shobj_description(oid, 'pg_database') FROM pg_database WHERE datname = $1",
            &[&database],
        )
        .await?;
    if let Some(row) = existing {
        if row.get::<_, Option<String>>(0).as_deref() != Some(DEMO_MARK) {
            bail!(
                "database {database:?} exists and was not created by `runner demo`; it is left alone. \
                 Choose another name with --database."
            );
        }
        admin
            .batch_execute(&format!("DROP DATABASE \"{database}\" WITH (FORCE)"))
            .await?;
    }
    admin
        .batch_execute(&format!("CREATE DATABASE \"{database}\""))
        .await?;
    admin
        .batch_execute(&format!(
            "COMMENT ON DATABASE \"{database}\" IS '{DEMO_MARK}'"
        ))
        .await?;
    let mut cfg: tokio_postgres::Config = admin_url.parse()?;
    cfg.dbname(database);
    Ok(config_to_url(&cfg))
}

/// Renders a parsed connection config back into key=value form.
pub fn config_to_url(cfg: &tokio_postgres::Config) -> String {
    let mut parts = Vec::new();
    if let Some(tokio_postgres::config::Host::Tcp(h)) = cfg.get_hosts().first() {
        parts.push(format!("host={h}"));
    }
    if let Some(p) = cfg.get_ports().first() {
        parts.push(format!("port={p}"));
    }
    if let Some(u) = cfg.get_user() {
        parts.push(format!("user={u}"));
    }
    if let Some(pw) = cfg.get_password() {
        parts.push(format!("password={}", String::from_utf8_lossy(pw)));
    }
    if let Some(d) = cfg.get_dbname() {
        parts.push(format!("dbname={d}"));
    }
    parts.join(" ")
}

/// Produces `(key, value)` pairs and waits for each acknowledgement.
pub async fn produce(brokers: &str, topic: &str, messages: &[(Option<&str>, &[u8])]) -> Result<()> {
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()?;
    for (key, value) in messages {
        let mut rec = FutureRecord::<str, [u8]>::to(topic).payload(value);
        if let Some(k) = key {
            rec = rec.key(k);
        }
        producer
            .send(rec, Duration::from_secs(10))
            .await
            .map_err(|(e, _)| e)
            .context("producing")?;
    }
    Ok(())
}

/// Reads a topic from the beginning up to its current end: every partition read until the
/// consumer reports reaching its end (transaction markers included), so absence is proven
/// without waiting for messages that may never come. `expected` is only a capacity hint.
pub async fn read_topic(
    brokers: &str,
    topic: &str,
    expected: usize,
    timeout: Duration,
) -> Result<Vec<OwnedMessage>> {
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", format!("reader-{}", uuid::Uuid::new_v4()))
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "true")
        .set("isolation.level", "read_committed")
        .create()?;
    let partitions = {
        let meta = consumer.fetch_metadata(Some(topic), Duration::from_secs(10))?;
        let t = meta.topics().first().context("no metadata for the topic")?;
        t.partitions().iter().map(|p| p.id()).collect::<Vec<_>>()
    };
    let mut tpl = TopicPartitionList::new();
    let mut remaining = std::collections::HashSet::new();
    for p in partitions {
        let (low, high) = consumer.fetch_watermarks(topic, p, Duration::from_secs(10))?;
        if high > low {
            tpl.add_partition_offset(topic, p, Offset::Beginning)?;
            remaining.insert(p);
        }
    }
    let mut out = Vec::with_capacity(expected);
    if remaining.is_empty() {
        return Ok(out);
    }
    consumer.assign(&tpl)?;
    let deadline = Instant::now() + timeout;
    while !remaining.is_empty() {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, consumer.recv()).await {
            Ok(Ok(m)) => out.push(m.detach()),
            Ok(Err(rdkafka::error::KafkaError::PartitionEOF(p))) => {
                remaining.remove(&p);
            }
            Ok(Err(e)) => bail!("reading {topic}: {e}"),
            Err(_) => bail!(
                "reading {topic}: the end was not reached within {timeout:?} ({} messages read)",
                out.len()
            ),
        }
    }
    Ok(out)
}

/// Polls `f` until it returns true or `timeout` passes.
pub async fn wait_for(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if f() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    f()
}

fn header_text(m: &OwnedMessage) -> String {
    m.headers()
        .map(|hs| {
            hs.iter()
                .map(|h| {
                    format!(
                        "{}={}",
                        h.key,
                        String::from_utf8_lossy(h.value.unwrap_or_default())
                    )
                })
                .collect::<Vec<_>>()
                .join(" ")
        })
        .unwrap_or_default()
}

pub async fn run(opts: DemoOptions) -> Result<()> {
    let cluster = MockCluster::new(1).context("starting librdkafka's mock cluster")?;
    let brokers = cluster.bootstrap_servers();
    let (input, output, dlq) = ("campaigns", "notification-drafts", "campaigns-dead-letter");
    cluster.create_topic(input, 3, 1)?;
    cluster.create_topic(output, 3, 1)?;
    cluster.create_topic(dlq, 1, 1)?;
    println!("== Kafka: librdkafka mock cluster at {brokers}; topics {input} (3 partitions), {output}, {dlq}");

    let url = demo_database(&opts.admin_url, &opts.database).await?;
    let pg = db::connect(&url).await?;
    campaigns::ensure_schema(&pg).await?;
    for (client, restaurant) in SPEC_SUBSCRIBERS {
        pg.execute(
            "INSERT INTO public.subscribers_restaurants (client_id, restaurant_id) VALUES ($1, $2)",
            &[&client, &restaurant],
        )
        .await?;
    }
    println!(
        "== PostgreSQL: database {} with SPEC.md's schema and its 10 subscriber rows",
        opts.database
    );

    let overlay = format!(
        "[kafka]\nbrokers = \"{brokers}\"\n[postgres]\nurl = \"{url}\"\n\
         [pipelines.campaigns]\ninput_topic = \"{input}\"\noutput_topic = \"{output}\"\n\
         dead_letter_topic = \"{dlq}\"\ngroup_id = \"demo\"\n\
         [pipelines.campaigns.rules]\npath = \"{}\"\n",
        opts.rules.display()
    );
    let config = Config::load(&Sources {
        file: None,
        overlay: Some(&overlay),
        env: false,
    })?;
    let running = app::start(
        config,
        RunOptions {
            mock_cluster: true,
            ..RunOptions::default()
        },
    )
    .await?;
    let rules = running.campaigns().rules.current().identity().to_string();
    println!("== Runner started with rules {rules}");

    let messages: [(Option<&str>, &[u8]); 3] = [
        (Some("first_message"), SPEC_CAMPAIGN.as_bytes()),
        (Some("expired_message"), EXPIRED_CAMPAIGN.as_bytes()),
        (Some("broken_message"), MALFORMED_MESSAGE.as_bytes()),
    ];
    produce(&brokers, input, &messages).await?;
    println!("== Produced 3 messages: SPEC.md's example campaign, an expired campaign, a malformed value");

    let settled = wait_for(Duration::from_secs(60), || {
        running.campaigns().stats().offsets_stored >= 3
    })
    .await;
    let stats = running.campaigns().stats();
    running.stop().await?;
    if !settled {
        bail!("the runner did not settle the 3 messages in time: {stats:?}");
    }

    let drafts = read_topic(&brokers, output, 8, Duration::from_secs(20)).await?;
    println!("\n== {} drafts on topic {output}:", drafts.len());
    for m in &drafts {
        println!(
            "key={} {}",
            String::from_utf8_lossy(m.key().unwrap_or_default()),
            String::from_utf8_lossy(m.payload().unwrap_or_default())
        );
    }
    let rows = pg
        .query(
            "SELECT id, restaurant_id, adv_campaign_id, adv_campaign_content, client_id, \
             adv_campaign_datetime_start, adv_campaign_datetime_end, datetime_created, \
             trigger_datetime_created, feedback FROM public.subscribers_feedback ORDER BY client_id",
            &[],
        )
        .await?;
    println!("\n== {} rows in subscribers_feedback:", rows.len());
    println!("id | restaurant_id | adv_campaign_id | content | client_id | start | end | created | trigger | feedback");
    for r in &rows {
        println!(
            "{} | {} | {} | {} | {} | {} | {} | {} | {} | {}",
            r.get::<_, i32>(0),
            r.get::<_, String>(1),
            r.get::<_, String>(2),
            r.get::<_, String>(3),
            r.get::<_, String>(4),
            r.get::<_, i64>(5),
            r.get::<_, i64>(6),
            r.get::<_, i64>(7),
            r.get::<_, i32>(8),
            r.get::<_, Option<String>>(9)
                .unwrap_or_else(|| "NULL".into()),
        );
    }
    let dead = read_topic(&brokers, dlq, 1, Duration::from_secs(20)).await?;
    println!("\n== {} dead letter(s) on topic {dlq}:", dead.len());
    for m in &dead {
        println!(
            "key={} value={}\n   headers: {}",
            String::from_utf8_lossy(m.key().unwrap_or_default()),
            String::from_utf8_lossy(m.payload().unwrap_or_default()),
            header_text(m)
        );
    }
    println!("\n== Skipped (valid, not active now): {:?}", stats.skipped);
    println!("== Counters: {}", serde_json::to_string(&stats)?);
    check(&stats, drafts.len(), rows.len(), dead.len())?;
    println!("\nDemo OK: 8 drafts in Kafka, 8 rows in PostgreSQL, 1 dead letter, 1 expired campaign skipped.");
    drop(pg);
    drop(cluster);
    Ok(())
}

fn check(stats: &Stats, drafts: usize, rows: usize, dead: usize) -> Result<()> {
    let ok = drafts == 8
        && rows == 8
        && dead == 1
        && stats.skipped(SkipReason::Expired) == 1
        && stats.dead_lettered("malformed_json") == 1;
    if !ok {
        bail!("the demo did not produce what it should: {drafts} drafts, {rows} rows, {dead} dead letters, {stats:?}");
    }
    Ok(())
}
