//! `runner demo`: both pipelines on embedded defaults — librdkafka's in-process mock cluster
//! (the real Kafka protocol over local sockets) and a database of the demo's own on the local
//! PostgreSQL. Campaigns: seeds SPEC.md's subscribers, produces SPEC.md's example campaign, an
//! expired one and a malformed message, and prints what came out of every sink. Store revenue:
//! produces six minutes of event time of sales in a few seconds, out of order, with late and
//! malformed ones, prints the windows table as it evolves, then the final rows, the late dead
//! letters and the counters. Also the small Kafka helpers the demo uses (produce, read a topic
//! to its end, wait for a condition).

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
    /// The sales rules component.
    pub sales_rules: PathBuf,
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
    let producer: FutureProducer<crate::logging::LogContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create_with_context(crate::logging::LogContext::new(
            "producer",
            &ClientConfig::new(),
        ))?;
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
    let consumer: StreamConsumer<crate::source::ReaderContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", format!("reader-{}", uuid::Uuid::new_v4()))
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "true")
        .set("isolation.level", "read_committed")
        .create_with_context(crate::source::ReaderContext::new(
            "reader",
            &ClientConfig::new(),
        ))?;
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
    println!("\nCampaigns OK: 8 drafts in Kafka, 8 rows in PostgreSQL, 1 dead letter, 1 expired campaign skipped.");
    let sales = sales_demo(&cluster, &url, &opts.sales_rules).await?;
    println!("\nDemo OK: campaigns (8 drafts in Kafka, 8 rows in PostgreSQL, 1 dead letter, 1 skipped); store revenue ({sales}).");
    drop(pg);
    drop(cluster);
    Ok(())
}

/// The store-revenue part: returns its one-line result.
async fn sales_demo(
    cluster: &MockCluster<'static, rdkafka::producer::DefaultProducerContext>,
    url: &str,
    rules: &std::path::Path,
) -> Result<String> {
    use crate::pipelines::store_revenue;
    use crate::produce::sales::{sales, SalesOptions};
    use crate::produce::{client_config, Limit, ProduceOptions, Progress};
    let brokers = cluster.bootstrap_servers();
    let (input, output, dlq) = ("sales", "store-revenue", "sales-dead-letter");
    cluster.create_topic(input, 3, 1)?;
    cluster.create_topic(output, 1, 1)?;
    cluster.create_topic(dlq, 1, 1)?;
    println!("\n\n== Store revenue: topics {input} (3 partitions), {output}, {dlq}; 30 s windows, 30 s allowed lateness, a trigger every 2 s");
    let overlay = format!(
        "[kafka]\nbrokers = \"{brokers}\"\n[postgres]\nurl = \"{url}\"\n\
         [pipelines.campaigns]\nenabled = false\n\
         [pipelines.store_revenue]\nenabled = true\ninput_topic = \"{input}\"\noutput_topic = \"{output}\"\n\
         dead_letter_topic = \"{dlq}\"\ngroup_id = \"demo-revenue\"\ntrigger = \"2s\"\nidle_after = \"2s\"\nconsole = true\n\
         [pipelines.store_revenue.rules]\npath = \"{}\"\n",
        rules.display()
    );
    let config = Config::load(&Sources {
        file: None,
        overlay: Some(&overlay),
        env: false,
    })?;
    let kafka = config.kafka.clone();
    let running = app::start(
        config,
        RunOptions {
            mock_cluster: true,
            ..RunOptions::default()
        },
    )
    .await?;
    let identity = running
        .store_revenue()
        .rules
        .current()
        .identity()
        .to_string();
    println!("== Runner started with rules {identity}");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs() as i64;
    // Six minutes of event time, ending a minute ago, in about six seconds: 5 stores, one
    // sale a second each, up to 5 s out of order, 2% sent two minutes late, 1% malformed.
    let mut produce = ProduceOptions::new(input, Limit::Count(5 * 360));
    produce.as_fast_as_possible = false;
    let opts = SalesOptions {
        produce,
        stores: 5,
        rate: 1.0,
        speedup: 60.0,
        simulated_start: Some(now - 420),
        jitter: Duration::from_secs(5),
        late_fraction: 0.02,
        late_by: Duration::from_secs(120),
        malformed_fraction: 0.01,
        seed: Some(42),
        ..SalesOptions::default()
    };
    println!("== Producing 1,800 sales: 6 minutes of event time from {} in ~6 s; the runner prints its table at every trigger:\n", store_revenue::task::rfc3339(now - 420));
    let summary = sales(
        client_config(&kafka, Duration::from_secs(30)),
        opts,
        Progress::Hidden,
    )
    .await?;
    // Every partition goes quiet: after idle_after its watermark follows the clock, and every
    // window (the last ended about a minute ago) becomes final.
    let pg = db::connect(url).await?;
    let mut done = false;
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        let open: i64 = pg
            .query_one(
                "SELECT count(*) FROM public.store_revenue_windows WHERE NOT final",
                &[],
            )
            .await?
            .get(0);
        let stats = running.store_revenue().stats();
        if open == 0 && stats.settled() as u64 >= summary.run.sent {
            done = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let stats = running.store_revenue().stats();
    running.stop().await?;
    if !done {
        bail!("the store-revenue pipeline did not settle every sale and close every window in time: {stats:?}");
    }
    let rows = pg
        .query(
            "SELECT store, to_char(window_start AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS'), \
             to_char(window_end AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS'), total::text, total_revenue_int, events, final \
             FROM public.store_revenue_windows ORDER BY window_start DESC, store LIMIT 10",
            &[],
        )
        .await?;
    let (windows, final_windows, cents): (i64, i64, i64) = {
        let r = pg
            .query_one(
                "SELECT count(*), count(*) FILTER (WHERE final), coalesce(sum(total_minor), 0)::int8 FROM public.store_revenue_windows",
                &[],
            )
            .await?;
        (r.get(0), r.get(1), r.get(2))
    };
    println!("\n== store_revenue_windows: {windows} windows, {final_windows} final; the last 10:");
    println!(
        "store | window_start | window_end | total | total_revenue_int | events | final (UTC)"
    );
    for r in &rows {
        println!(
            "{} | {} | {} | {} | {} | {} | {}",
            r.get::<_, String>(0),
            r.get::<_, String>(1),
            r.get::<_, String>(2),
            r.get::<_, String>(3),
            r.get::<_, i64>(4),
            r.get::<_, i64>(5),
            r.get::<_, bool>(6)
        );
    }
    let published = read_topic(&brokers, output, windows as usize, Duration::from_secs(20)).await?;
    println!(
        "\n== {} final windows on topic {output}, e.g.:",
        published.len()
    );
    if let Some(m) = published.last() {
        println!(
            "key={} {}",
            String::from_utf8_lossy(m.key().unwrap_or_default()),
            String::from_utf8_lossy(m.payload().unwrap_or_default())
        );
    }
    let dead = read_topic(&brokers, dlq, 64, Duration::from_secs(20)).await?;
    let late: Vec<&OwnedMessage> = dead
        .iter()
        .filter(|m| header_value(m, crate::headers::DLQ_REASON) == Some("late"))
        .collect();
    println!(
        "\n== {} dead letters on topic {dlq}, {} of them late; the first late ones:",
        dead.len(),
        late.len()
    );
    for m in late.iter().take(3) {
        println!(
            "key={} value={}\n   headers: {}",
            String::from_utf8_lossy(m.key().unwrap_or_default()),
            String::from_utf8_lossy(m.payload().unwrap_or_default()),
            header_text(m)
        );
    }
    println!("\n== Counters: {}", serde_json::to_string(&stats)?);
    let counted = stats.delivered;
    let ok = final_windows == windows
        && published.len() as i64 == windows
        && stats.settled() == summary.run.sent
        && !late.is_empty()
        && stats.dead_lettered.values().sum::<u64>() == dead.len() as u64
        && dead.len() as u64 == summary.malformed + late.len() as u64;
    if !ok {
        bail!(
            "the store-revenue demo did not produce what it should: {windows} windows ({final_windows} final), {} published, {} dead letters ({} late), {} sent, {stats:?}",
            published.len(),
            dead.len(),
            late.len(),
            summary.run.sent
        );
    }
    Ok(format!(
        "{} sales: {counted} counted into {windows} final windows totalling {}, each published once; {} late and {} malformed dead-lettered",
        summary.run.sent,
        store_revenue::task::decimal(cents, 2),
        late.len(),
        summary.malformed
    ))
}

fn header_value<'m>(m: &'m OwnedMessage, name: &str) -> Option<&'m str> {
    m.headers()?
        .iter()
        .find(|h| h.key == name)
        .and_then(|h| std::str::from_utf8(h.value?).ok())
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
