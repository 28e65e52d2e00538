//! Sink ceilings and fan-out, in the same run on the same services.
//! 1. PostgreSQL alone: binary COPY of feedback-shaped rows into the table as SPEC.md defines
//!    it, and the runner's own PostgreSQL transaction (fence, what each campaign has reached,
//!    COPY into the table, registry, outbox) for the same rows. Kafka alone: produce
//!    of output-shaped messages, with the runner's headers and without any (the drafts as a
//!    consumer needs them).
//! 2. Fan-out: 1,000 active campaigns x 1,000 subscribers = 1,000,000 drafts end to end
//!    through the runner, until both sinks committed; drafts/s and the ratios to the slower
//!    raw ceiling of (1) (COPY into SPEC.md's table, Kafka without headers) and to the slower
//!    ceiling with what the protocol adds (the runner's transaction, the runner's headers). The subscribers and the campaigns are those of `runner produce
//!    campaigns` (`runner::produce::campaigns`): one restaurant per campaign, seeded with
//!    binary COPY, and the campaigns sent as fast as its producer takes them.
//! 3. The peer: the same campaigns through a plain at-least-once Python pipeline
//!    (benches/peers/plain_pipeline.py), right after the runner's fan-out, both counted as
//!    rows of `subscribers_feedback` from the first commit to the last row ([`RowWatch`]);
//!    runner / peer.

use crate::broker::{Broker, INPUT_PARTITIONS};
use crate::cpu::machine_busy_secs;
use crate::report::Report;
use anyhow::{Context, Result};
use futures::pin_mut;
use rdkafka::ClientConfig;
use runner::delivery::{Evaluated, OutboxEntry, Outcome, Records, Target};
use runner::events::{Events, SourcePos};
use runner::pipelines::campaigns::contract::Campaign;
use runner::pipelines::campaigns::drafts::Drafts;
use runner::pipelines::campaigns::feedback::COLUMN_TYPES;
use runner::pipelines::campaigns::schedule::{Cause, Entry, RegistryOp};
use runner::pipelines::campaigns::CampaignDelivery;
use runner::produce::campaigns::{
    client_id, seed_subscribers, CampaignGenerator, DEFAULT_SEED_BATCH,
};
use runner::produce::{CampaignsOptions, Limit, Progress};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_postgres::binary_copy::BinaryCopyInWriter;
use tokio_postgres::types::ToSql;

const NOW: i64 = 1_700_000_000;

/// The seed of the fan-out's restaurants, subscribers and campaigns.
const SEED: u64 = 1;

/// A phase's rate (items/s) and the machine's busy CPU time per item (µs) over the same
/// window.
#[derive(Debug, Clone, Copy)]
struct Phase {
    rate: f64,
    cpu_us: f64,
}

/// Times a phase that starts now: call `done(items)` when its items are handled.
struct Timer {
    t: Instant,
    busy: f64,
}

impl Timer {
    fn start() -> Timer {
        Timer {
            t: Instant::now(),
            busy: machine_busy_secs(),
        }
    }

    fn done(&self, items: usize) -> Phase {
        let secs = self.t.elapsed().as_secs_f64();
        Phase {
            rate: items as f64 / secs,
            cpu_us: (machine_busy_secs() - self.busy) * 1e6 / items as f64,
        }
    }
}

async fn fresh_db(admin_url: &str, name: &str) -> Result<String> {
    let url = e2e_tests::fresh_database(admin_url, name).await?;
    runner::pipelines::campaigns::ensure_schema(&runner::db::connect(&url).await?).await?;
    Ok(url)
}

fn payload(campaign: &str, client: &str) -> Vec<u8> {
    format!(
        r#"{{"restaurant_id":"00000000-0000-4000-8000-000000000001","adv_campaign_id":"{campaign}","adv_campaign_content":"70% off the new dish until 14:00","adv_campaign_owner":"Ivanov Ivan Ivanovich","adv_campaign_owner_contact":"iiivanov@restaurant.ru","adv_campaign_datetime_start":1699999000,"adv_campaign_datetime_end":1700009000,"client_id":"{client}","datetime_created":1699998000,"trigger_datetime_created":1700000000}}"#
    )
    .into_bytes()
}

/// PostgreSQL COPY into the table as SPEC.md defines it (no index but its primary key), in
/// transactions of `chunk` rows: rows/s.
async fn pg_copy_alone(
    url: &str,
    campaigns: &[String],
    clients: &[String],
    chunk: usize,
) -> Result<Phase> {
    let mut c = runner::db::connect(url).await?;
    c.batch_execute("TRUNCATE subscribers_feedback").await?;
    let t = Timer::start();
    let total = campaigns.len() * clients.len();
    let mut done = 0;
    while done < total {
        let tx = c.transaction().await?;
        let sink = tx
            .copy_in(
                "COPY subscribers_feedback (restaurant_id, adv_campaign_id, adv_campaign_content, adv_campaign_owner, \
                 adv_campaign_owner_contact, adv_campaign_datetime_start, adv_campaign_datetime_end, datetime_created, \
                 client_id, trigger_datetime_created) FROM STDIN (FORMAT binary)",
            )
            .await?;
        let w = BinaryCopyInWriter::new(sink, &COLUMN_TYPES);
        pin_mut!(w);
        for i in done..(done + chunk).min(total) {
            let (camp, client) = (&campaigns[i / clients.len()], &clients[i % clients.len()]);
            let v: [&(dyn ToSql + Sync); 10] = [
                &"00000000-0000-4000-8000-000000000001",
                camp,
                &"70% off the new dish until 14:00",
                &"Ivanov Ivan Ivanovich",
                &"iiivanov@restaurant.ru",
                &(NOW - 1000),
                &(NOW + 9000),
                &(NOW - 2000),
                client,
                &(NOW as i32),
            ];
            w.as_mut().write(&v).await?;
        }
        w.finish().await?;
        tx.commit().await?;
        done = (done + chunk).min(total);
    }
    let rate = t.done(total);
    c.batch_execute("TRUNCATE subscribers_feedback").await?;
    Ok(rate)
}

/// A campaign's drafts as the runner holds them (shaped by the rules natively, the same
/// template and rendering as the component's).
fn drafts_for(campaign: &str, clients: &[String]) -> Drafts {
    let c = Campaign {
        restaurant_id: "00000000-0000-4000-8000-000000000001".into(),
        adv_campaign_id: campaign.into(),
        adv_campaign_content: "70% off the new dish until 14:00".into(),
        adv_campaign_owner: "Ivanov Ivan Ivanovich".into(),
        adv_campaign_owner_contact: "iiivanov@restaurant.ru".into(),
        adv_campaign_datetime_start: NOW - 1000,
        adv_campaign_datetime_end: NOW + 9000,
        datetime_created: NOW - 2000,
    };
    let json = serde_json::json!({
        "restaurant_id": c.restaurant_id,
        "adv_campaign_id": c.adv_campaign_id,
        "adv_campaign_content": c.adv_campaign_content,
        "adv_campaign_owner": c.adv_campaign_owner,
        "adv_campaign_owner_contact": c.adv_campaign_owner_contact,
        "adv_campaign_datetime_start": c.adv_campaign_datetime_start,
        "adv_campaign_datetime_end": c.adv_campaign_datetime_end,
        "datetime_created": c.datetime_created,
    });
    let native = campaign_rules::rules::validate(json.to_string().as_bytes())
        .expect("the bench campaign is valid");
    bench::shape(&c, &native, clients, NOW)
}

/// The delivery protocol's PostgreSQL transaction for the same rows: rows/s.
async fn pg_protocol(
    url: &str,
    campaigns: &[String],
    clients: &[String],
    per_commit: usize,
) -> Result<Phase> {
    let c = runner::db::connect(url).await?;
    c.batch_execute(
        "TRUNCATE subscribers_feedback, campaign_runner_outbox, campaign_runner_delivered",
    )
    .await?;
    let events = Events::default();
    let (_tx, mut stop) = tokio::sync::watch::channel(false);
    let mut sink = e2e_tests::campaigns_pg_at(url);
    let fence = sink
        .claim(
            "bench",
            0,
            "bench",
            &events,
            Duration::from_secs(1),
            &mut stop,
        )
        .await?;
    let drafts: Vec<Drafts> = campaigns.iter().map(|c| drafts_for(c, clients)).collect();
    let per = per_commit.div_ceil(clients.len()).max(1);
    let t = Timer::start();
    for (n, group) in campaigns.chunks(per).enumerate() {
        let mut unit = Vec::new();
        let mut entries = Vec::new();
        for k in 0..group.len() {
            let offset = (n * per + k) as i64;
            let d = &drafts[n * per + k];
            entries.push(OutboxEntry {
                source_offset: offset,
                target: Target::Output,
                records: Records::Template(d.records().clone()),
                headers: vec![("rules-version".into(), b"campaign-rules 3.0.0".to_vec())],
            });
            unit.push(Evaluated {
                msg: rdkafka::message::OwnedMessage::new(
                    None,
                    None,
                    "bench".into(),
                    rdkafka::Timestamp::NotAvailable,
                    0,
                    offset,
                    None,
                ),
                pos: SourcePos {
                    topic: "bench".into(),
                    partition: 0,
                    offset,
                },
                outcome: Outcome::Deliver(CampaignDelivery {
                    drafts: d.clone(),
                    trigger: NOW as i32,
                    snapshot: 1,
                    cause: Cause::Published,
                    // The registry row each publication writes in the same transaction.
                    registry: Some(RegistryOp::Keep(Entry {
                        adv_campaign_id: d.campaign.adv_campaign_id.clone(),
                        restaurant_id: d.campaign.restaurant_id.clone(),
                        topic: "bench".into(),
                        partition: 0,
                        source_offset: offset,
                        key: None,
                        payload: vec![b'x'; 400],
                        opens: d.campaign.adv_campaign_datetime_start + 1,
                        closes: d.campaign.adv_campaign_datetime_end,
                        started: true,
                    })),
                }),
            });
        }
        sink.commit(
            &fence,
            &unit,
            &entries,
            None,
            &events,
            Duration::from_secs(1),
            &mut stop,
        )
        .await?;
        sink.delete_outbox(&fence, i64::MAX, &events, Duration::from_secs(1), &mut stop)
            .await?;
    }
    Ok(t.done(campaigns.len() * clients.len()))
}

/// Kafka produce alone: output-shaped records (key, JSON value and, with `headers`, the
/// runner's headers; without, the records as a consumer of the drafts needs them) with the
/// runner's producer settings (idempotent, acks=all, its compression), as fast as the broker
/// takes them: msgs/s. As many producers at once as the runner has input partitions (it
/// publishes each partition's units on that partition's producer, at the same time), each
/// sending its share of the campaigns and flushing, with no future per record: the broker's
/// ceiling, not one client's.
async fn kafka_alone(
    brokers: &str,
    topic: &str,
    campaigns: &[String],
    clients: &[String],
    producers: i32,
    headers: bool,
) -> Result<Phase> {
    let producers = producers.max(1) as usize;
    let clients = Arc::new(clients.to_vec());
    let t = Timer::start();
    let handles: Vec<_> = (0..producers)
        .map(|i| {
            let share: Vec<String> = campaigns
                .iter()
                .skip(i)
                .step_by(producers)
                .cloned()
                .collect();
            let (brokers, topic, clients) =
                (brokers.to_string(), topic.to_string(), clients.clone());
            tokio::task::spawn_blocking(move || {
                produce_share(&brokers, &topic, &share, &clients, headers)
            })
        })
        .collect();
    for h in handles {
        h.await??;
    }
    Ok(t.done(campaigns.len() * clients.len()))
}

/// The headers of [`produce_share`]'s records of `campaign`: those the runner writes on a
/// draft, made by the runner's own code.
fn ceiling_headers(campaign: &str) -> rdkafka::message::OwnedHeaders {
    use runner::headers;
    use runner::pipelines::campaigns::{header, provenance};
    let given: headers::HeaderList = [
        (headers::SOURCE_TOPIC, "campaigns"),
        (headers::SOURCE_PARTITION, "0"),
        (headers::SOURCE_OFFSET, "123456"),
        (headers::RULES_VERSION, "campaign-rules 4.0.0"),
        (headers::RULES_SHA256, &"0".repeat(64)),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.as_bytes().to_vec()))
    .collect();
    let mut list = provenance::pack(given, 42);
    list.push((header::ADV_CAMPAIGN_ID.into(), campaign.as_bytes().to_vec()));
    headers::owned(list.iter().map(|(k, v)| (k.as_str(), v.as_slice())))
}

/// Counts records the broker did not take.
#[derive(Default)]
struct Failures(std::sync::atomic::AtomicUsize);

impl rdkafka::ClientContext for Failures {}

impl rdkafka::producer::ProducerContext for Failures {
    type DeliveryOpaque = ();

    fn delivery(&self, result: &rdkafka::message::DeliveryResult<'_>, _: ()) {
        if result.is_err() {
            self.0.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    }
}

/// One producer's share of [`kafka_alone`].
fn produce_share(
    brokers: &str,
    topic: &str,
    campaigns: &[String],
    clients: &[String],
    headers: bool,
) -> Result<()> {
    use rdkafka::config::FromClientConfigAndContext;
    use rdkafka::producer::{BaseRecord, Producer, ThreadedProducer};
    let mut config = ClientConfig::new();
    for (k, v) in runner::config::PRODUCER_DEFAULTS {
        config.set(*k, *v);
    }
    let producer = ThreadedProducer::from_config_and_context(
        config
            .set("bootstrap.servers", brokers)
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("linger.ms", "5"),
        Failures::default(),
    )?;
    for camp in campaigns {
        let h = ceiling_headers(camp);
        for client in clients {
            let p = payload(camp, client);
            let mut record = BaseRecord::to(topic).key(client.as_bytes()).payload(&p);
            if headers {
                record = record.headers(h.clone());
            }
            loop {
                match producer.send(record) {
                    Ok(()) => break,
                    Err((_, r)) => {
                        record = r;
                        std::thread::sleep(Duration::from_millis(1));
                    }
                }
            }
        }
    }
    producer.flush(Duration::from_secs(120))?;
    let failed = producer
        .context()
        .0
        .load(std::sync::atomic::Ordering::Relaxed);
    anyhow::ensure!(failed == 0, "{failed} records were not delivered");
    Ok(())
}

/// Sends campaigns `first ..` (`count` of them) of the fan-out's generator to `topic`, as fast
/// as the producer takes them. Campaign n goes to restaurant n mod `campaigns`: the warm-up is
/// campaign 0, the measured ones 1 ..= campaigns, one per restaurant. They are made at
/// `made_at` (unix seconds), the same for the runner and the peer, so that both read the same
/// values; made active, they stay active at the wall clock for an hour after `made_at` (the
/// generator's margins for its 2-hour campaigns).
async fn send_campaigns(
    broker: &Broker,
    topic: &str,
    (campaigns, per, made_at): (usize, usize, i64),
    first: u64,
    count: u64,
) -> Result<runner::produce::campaigns::CampaignsSummary> {
    let mut opts = CampaignsOptions {
        restaurants: u32::try_from(campaigns).unwrap_or(u32::MAX),
        first,
        now: Some(made_at),
        seed: Some(SEED),
        subscribers_per_restaurant: u32::try_from(per).ok(),
        ..CampaignsOptions::default()
    };
    opts.produce.topic = topic.to_string();
    opts.produce.limit = Limit::Count(count);
    opts.produce.as_fast_as_possible = true;
    let mut producer = ClientConfig::new();
    producer.set("bootstrap.servers", broker.brokers());
    runner::produce::campaigns(producer, opts, Progress::Hidden).await
}

/// The rows of `subscribers_feedback` from the first to the N-th, as a reader of the table
/// sees them: the same measure for the runner and the peer.
#[derive(Debug, Clone, Copy)]
struct RowSpan {
    /// Rows/s between the first commit seen and the N-th row seen, not counting the rows of
    /// that first commit.
    rate: f64,
    /// The new rows seen at the first sight of any (the first commit's, or more).
    first_rows: i64,
    secs: f64,
}

/// Watches `subscribers_feedback` on a connection of its own until it holds `n` rows more than
/// when the watch started. Until the first commit it counts the rows every 10 ms (the table
/// holds only the rows already there then); after that it reads the id sequence every 10 ms
/// (every row takes an id when it is written, so the sequence passing `n` new ids is the
/// earliest moment the N-th row can be committed), and only then counts the rows again, back to
/// back, until all `n` are there. Each moment is taken when the query that saw it was sent
/// (the rows it counts are those committed before it), so the end is seen at most one count
/// late.
struct RowWatch {
    task: tokio::task::JoinHandle<Result<RowSpan>>,
}

impl RowWatch {
    async fn start(url: &str, n: i64) -> Result<RowWatch> {
        let c = runner::db::connect(url).await?;
        let seq: String = c
            .query_one(
                "SELECT pg_get_serial_sequence('public.subscribers_feedback', 'id')",
                &[],
            )
            .await?
            .get(0);
        let ids = format!(
            "SELECT CASE WHEN is_called THEN last_value ELSE last_value - 1 END FROM {seq}"
        );
        let count = "SELECT count(*) FROM subscribers_feedback";
        let base = c.query_one(count, &[]).await?.get::<_, i64>(0);
        let base_id = c.query_one(&ids, &[]).await?.get::<_, i64>(0);
        let task = tokio::spawn(async move {
            let deadline = Instant::now() + Duration::from_secs(900);
            let tick = Duration::from_millis(10);
            let (t_first, first_rows) = loop {
                let t = Instant::now();
                let rows = c.query_one(count, &[]).await?.get::<_, i64>(0) - base;
                if rows > 0 {
                    break (t, rows);
                }
                anyhow::ensure!(Instant::now() < deadline, "no row was written");
                tokio::time::sleep(tick).await;
            };
            while c.query_one(&ids, &[]).await?.get::<_, i64>(0) - base_id < n {
                anyhow::ensure!(Instant::now() < deadline, "{n} rows were not written");
                tokio::time::sleep(tick).await;
            }
            let t_last = loop {
                let t = Instant::now();
                if c.query_one(count, &[]).await?.get::<_, i64>(0) - base >= n {
                    break t;
                }
                anyhow::ensure!(Instant::now() < deadline, "{n} rows were not committed");
            };
            let secs = (t_last - t_first).as_secs_f64();
            Ok(RowSpan {
                // All rows in the first commit seen: no span to measure.
                rate: if first_rows >= n {
                    f64::NAN
                } else {
                    (n - first_rows) as f64 / secs
                },
                first_rows,
                secs,
            })
        });
        Ok(RowWatch { task })
    }

    async fn finish(self) -> Result<RowSpan> {
        self.task.await?
    }
}

/// Seeds `campaigns` restaurants x `per` subscribers unless the table holds that many rows.
async fn seed(url: &str, campaigns: usize, per: usize) -> Result<()> {
    let c = runner::db::connect(url).await?;
    let have = c
        .query_one("SELECT count(*) FROM subscribers_restaurants", &[])
        .await?
        .get::<_, i64>(0);
    if have != (campaigns * per) as i64 {
        c.batch_execute("TRUNCATE subscribers_restaurants").await?;
        let seeded = seed_subscribers(
            url,
            u32::try_from(campaigns)?,
            u32::try_from(per)?,
            SEED,
            DEFAULT_SEED_BATCH,
            Progress::Hidden,
        )
        .await?;
        eprintln!("bench fanout: {seeded}");
    }
    Ok(())
}

/// Runs the runner over `campaigns` x `per` drafts (after a warm-up campaign): drafts/s from
/// the first campaign produced to the last unit committed in both sinks, and the rows of
/// `subscribers_feedback` from the first to the last ([`RowWatch`]).
async fn fanout(
    broker: &Broker,
    url: &str,
    rules: &Path,
    campaigns: usize,
    per: usize,
    made_at: i64,
) -> Result<(Phase, RowSpan, String)> {
    let c = runner::db::connect(url).await?;
    c.batch_execute(
        "TRUNCATE subscribers_feedback, campaign_runner_outbox, campaign_runner_fences, \
         campaign_runner_delivered, campaign_runner_registry",
    )
    .await?;
    seed(url, campaigns, per).await?;
    let (running, input) = broker.start_runner(url, rules, "").await?;
    let send = |first: u64, count: u64| {
        send_campaigns(broker, &input, (campaigns, per, made_at), first, count)
    };
    // Warm-up: the group join and first compile are not part of the figure.
    send(0, 1).await?;
    let deadline = Instant::now() + Duration::from_secs(60);
    while running.campaigns().stats().offsets_stored < 1 {
        anyhow::ensure!(
            Instant::now() < deadline,
            "the runner did not start consuming"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    eprintln!("bench fanout: fan-out of {campaigns} campaigns x {per} subscribers starts");
    let rows = RowWatch::start(url, (campaigns * per) as i64).await?;
    let t = Timer::start();
    let sent = send(1, campaigns as u64).await?;
    anyhow::ensure!(
        sent.expected_drafts == Some((campaigns * per) as u64),
        "the campaigns sent must make {} drafts: {sent:?}",
        campaigns * per
    );
    let want = campaigns as u64 + 1;
    let mut last = Instant::now();
    while running.campaigns().stats().offsets_stored < want {
        if last.elapsed() > Duration::from_secs(5) {
            let s = running.campaigns().stats();
            eprintln!(
                "bench fanout: {} / {want} campaigns, {} drafts",
                s.offsets_stored, s.records_delivered
            );
            last = Instant::now();
        }
        anyhow::ensure!(
            t.t.elapsed() < Duration::from_secs(900),
            "fan-out did not finish"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let phase = t.done(campaigns * per);
    let rows = rows.finish().await?;
    // Where a unit's time goes (a stage that is busy all the time is the bound).
    for (name, q) in running.campaigns().events.stages() {
        eprintln!(
            "bench fanout: stage {name:<13} p50 {:>8.2} ms  p99 {:>8.2} ms  max {:>8.2} ms  ({} units)",
            q.p50_ms, q.p99_ms, q.max_ms, q.samples
        );
    }
    running.stop().await?;
    // The runner's output topic is named after its input topic (Broker::start_runner).
    Ok((phase, rows, input.replacen("in-", "out-", 1)))
}

/// Where the peer's Python is: `BENCH_PEER_PYTHON`, or the environment scripts/bench-peers.sh
/// makes.
fn peer_python() -> std::path::PathBuf {
    std::env::var_os("BENCH_PEER_PYTHON")
        .map(Into::into)
        .unwrap_or_else(|| "/var/cache/wasm-runner/peers-venv/bin/python".into())
}

/// The plain at-least-once pipeline (benches/peers/plain_pipeline.py) over the same campaigns
/// and subscribers as [`fanout`]: the campaigns are sent to a fresh input topic first, then the
/// peer runs until it has written `campaigns` x `per` rows; measured by [`RowWatch`]. Returns
/// the rows' span and the peer's output topic.
async fn peer(
    broker: &Broker,
    url: &str,
    python: &Path,
    campaigns: usize,
    per: usize,
    made_at: i64,
) -> Result<(RowSpan, String)> {
    let c = runner::db::connect(url).await?;
    c.batch_execute("TRUNCATE subscribers_feedback").await?;
    seed(url, campaigns, per).await?;
    let id = uuid::Uuid::new_v4();
    let (input, output) = (format!("peer-in-{id}"), format!("peer-out-{id}"));
    broker.create_topic(&input, INPUT_PARTITIONS).await?;
    broker.create_topic(&output, 4).await?;
    send_campaigns(
        broker,
        &input,
        (campaigns, per, made_at),
        1,
        campaigns as u64,
    )
    .await?;
    let n = campaigns * per;
    let rows = RowWatch::start(url, n as i64).await?;
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/peers/plain_pipeline.py");
    let mut child = std::process::Command::new(python)
        .arg(script)
        .args([
            &broker.brokers(),
            &input,
            &output,
            &format!("peer-{id}"),
            url,
        ])
        .args(["--drafts", &n.to_string()])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {}", python.display()))?;
    let deadline = Instant::now() + Duration::from_secs(900);
    while !rows.task.is_finished() {
        if let Some(status) = child.try_wait()? {
            if !status.success() {
                rows.task.abort();
                anyhow::bail!("the peer failed ({status})");
            }
        }
        anyhow::ensure!(Instant::now() < deadline, "the peer did not finish");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let rows = rows.finish().await?;
    let out = tokio::task::spawn_blocking(move || child.wait_with_output()).await??;
    anyhow::ensure!(out.status.success(), "the peer failed ({})", out.status);
    eprintln!(
        "bench fanout: peer: {}",
        String::from_utf8_lossy(&out.stdout).trim()
    );
    Ok((rows, output))
}

/// A record read back from an output topic.
struct Found {
    key: Vec<u8>,
    value: Vec<u8>,
    /// The names of its headers, in order.
    headers: Vec<String>,
    /// The bytes of its headers' names and values.
    header_bytes: usize,
}

/// The first record of `topic`'s partition 0, or the first one of any partition whose key is
/// `key`.
fn find_record(brokers: &str, topic: &str, key: Option<&[u8]>) -> Result<Found> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::message::Headers;
    use rdkafka::{Message, Offset, TopicPartitionList};
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", format!("bench-check-{}", uuid::Uuid::new_v4()))
        .set("enable.auto.commit", "false")
        .create()?;
    let mut partitions = TopicPartitionList::new();
    for p in 0..if key.is_some() { 4 } else { 1 } {
        partitions.add_partition_offset(topic, p, Offset::Beginning)?;
    }
    consumer.assign(&partitions)?;
    let deadline = Instant::now() + Duration::from_secs(120);
    while Instant::now() < deadline {
        let Some(m) = consumer.poll(Duration::from_millis(100)) else {
            continue;
        };
        let m = m?;
        let k = m.key().unwrap_or_default();
        if key.is_none_or(|want| want == k) {
            let headers: Vec<_> = m.headers().map_or(Vec::new(), |h| h.iter().collect());
            return Ok(Found {
                key: k.to_vec(),
                value: m.payload().unwrap_or_default().to_vec(),
                headers: headers.iter().map(|h| h.key.to_string()).collect(),
                header_bytes: headers
                    .iter()
                    .map(|h| h.key.len() + h.value.map_or(0, <[u8]>::len))
                    .sum(),
            });
        }
    }
    anyhow::bail!("no record of {topic} found")
}

/// Checks that the peer's drafts are the runner's: the first draft of the peer's output, and the
/// runner's draft for the same client, equal byte for byte but for the value of
/// `trigger_datetime_created` (each pipeline's own clock). Returns a line for the report.
async fn same_drafts(brokers: &str, runner_out: &str, peer_out: &str) -> Result<String> {
    let (b, r, p) = (
        brokers.to_string(),
        runner_out.to_string(),
        peer_out.to_string(),
    );
    tokio::task::spawn_blocking(move || {
        let Found {
            key,
            value: peer_value,
            headers: peer_headers,
            ..
        } = find_record(&b, &p, None)?;
        let Found {
            value: runner_value,
            headers: runner_headers,
            header_bytes,
            ..
        } = find_record(&b, &r, Some(&key))?;
        let split = |v: &[u8]| -> Result<(Vec<u8>, i64)> {
            let text = std::str::from_utf8(v)?;
            let (head, tail) = text
                .rsplit_once(",\"trigger_datetime_created\":")
                .context("no trigger_datetime_created")?;
            let t = tail.strip_suffix('}').context("not an object")?.parse()?;
            Ok((head.as_bytes().to_vec(), t))
        };
        let ((pr, pt), (rr, rt)) = (split(&peer_value)?, split(&runner_value)?);
        anyhow::ensure!(
            pr == rr && peer_headers.is_empty(),
            "the peer's draft differs from the runner's:\n  peer:   {}\n  runner: {}",
            String::from_utf8_lossy(&peer_value),
            String::from_utf8_lossy(&runner_value)
        );
        use rdkafka::message::Headers as _;
        let ceiling_names: Vec<String> = ceiling_headers("")
            .iter()
            .map(|h| h.key.to_string())
            .collect();
        let ceiling = if runner_headers == ceiling_names {
            "the same as the Kafka ceiling's".to_string()
        } else {
            format!(
                "NOT those of the Kafka ceiling with the runner's headers ({})",
                ceiling_names.join(", ")
            )
        };
        Ok(format!(
            "Drafts checked: the peer's draft for client {} equals the runner's byte for byte but for trigger_datetime_created (runner {rt}, peer {pt}); the runner's carries {} headers ({header_bytes} bytes of names and values: {}), {ceiling}; the peer's none.",
            String::from_utf8_lossy(&key),
            runner_headers.len(),
            runner_headers.join(", ")
        ))
    })
    .await?
}

pub async fn run(
    admin_url: &str,
    rules: &Path,
    campaigns: usize,
    per: usize,
    runs: usize,
) -> Result<Report> {
    let broker = Broker::start()?;
    let url = fresh_db(admin_url, "bench_fanout")
        .await
        .context("bench database")?;
    // The generator's ids: 200 campaigns of restaurant 0 and its first 1,000 subscribers.
    let mut generator = CampaignGenerator::new(
        &CampaignsOptions {
            restaurants: 1,
            ..CampaignsOptions::default()
        },
        SEED,
    );
    let sink_campaigns: Vec<String> = (0..200)
        .map(|_| generator.next_campaign(NOW).campaign_id)
        .collect();
    let sink_clients: Vec<String> = (0..1000).map(|j| client_id(SEED, 0, j)).collect();
    let topic = format!("ceiling-{}", uuid::Uuid::new_v4());
    broker.create_topic(&topic, 4).await?;
    let mut report = Report::new("fanout");
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
    let python = peer_python();
    let with_peer = python.exists();
    if !with_peer {
        eprintln!(
            "bench fanout: no peer: {} is missing (scripts/bench-peers.sh makes it)",
            python.display()
        );
    }
    // Per run: COPY, the runner's PostgreSQL transaction, Kafka with the runner's headers,
    // fan-out, Kafka without headers; then the rows of the runner's fan-out and of the peer's,
    // one after the other.
    let mut phases: Vec<[Phase; 5]> = Vec::new();
    let mut spans: Vec<(RowSpan, Option<RowSpan>)> = Vec::new();
    let brokers = broker.brokers();
    // When the campaigns of every run are made: the runner and the peer read the same values.
    let made_at = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs() as i64;
    let kafka = |headers: bool| {
        kafka_alone(
            &brokers,
            &topic,
            &sink_campaigns,
            &sink_clients,
            INPUT_PARTITIONS,
            headers,
        )
    };
    // A fresh broker's JVM (and PostgreSQL's caches) are slower in their first seconds: one
    // unmeasured round of both ceilings first, so that run 1 measures what the others do.
    pg_copy_alone(&url, &sink_campaigns, &sink_clients, 50_000).await?;
    kafka(true).await?;
    for run in 1..=runs {
        let c = pg_copy_alone(&url, &sink_campaigns, &sink_clients, 50_000).await?;
        let p = pg_protocol(&url, &sink_campaigns, &sink_clients, 50_000).await?;
        let k = kafka(true).await?;
        let kr = kafka(false).await?;
        let (f, runner_rows, runner_out) =
            fanout(&broker, &url, rules, campaigns, per, made_at).await?;
        let peer_rows = match with_peer {
            true => {
                let (rows, peer_out) =
                    peer(&broker, &url, &python, campaigns, per, made_at).await?;
                if run == 1 {
                    let checked = same_drafts(&brokers, &runner_out, &peer_out).await?;
                    eprintln!("bench fanout: {checked}");
                    report.notes.push(checked);
                }
                Some(rows)
            }
            false => None,
        };
        eprintln!(
            "bench fanout: run {run}/{runs}: COPY {:.0} rows/s, protocol {:.0} rows/s, Kafka {:.0} msgs/s, Kafka without headers {:.0} msgs/s, fan-out {:.0} drafts/s; machine CPU per item: {:.1} / {:.1} / {:.1} / {:.1} / {:.1} µs",
            c.rate, p.rate, k.rate, kr.rate, f.rate, c.cpu_us, p.cpu_us, k.cpu_us, kr.cpu_us, f.cpu_us
        );
        eprintln!(
            "bench fanout: run {run}/{runs}: rows first to last: runner {:.0} drafts/s ({} rows in the first commit, {:.2} s){}",
            runner_rows.rate,
            runner_rows.first_rows,
            runner_rows.secs,
            peer_rows.map_or(String::new(), |r| format!(
                ", peer {:.0} drafts/s ({} rows in the first commit, {:.2} s)",
                r.rate, r.first_rows, r.secs
            ))
        );
        phases.push([c, p, k, f, kr]);
        spans.push((runner_rows, peer_rows));
    }
    let col = |i: usize, g: fn(&Phase) -> f64| phases.iter().map(|r| g(&r[i])).collect::<Vec<_>>();
    let per_run =
        |g: fn(&[Phase; 5], f64) -> f64| phases.iter().map(|r| g(r, cores)).collect::<Vec<_>>();
    // Phases: 0 COPY, 1 the runner's transaction, 2 Kafka with headers, 3 fan-out, 4 Kafka
    // without headers.
    report.add(
        "PostgreSQL COPY alone (SPEC.md's table)",
        "rows/s",
        col(0, |p| p.rate),
        None,
    );
    report.add(
        "PostgreSQL, the runner's transaction (fence, campaigns reached, COPY, registry, outbox)",
        "rows/s",
        col(1, |p| p.rate),
        None,
    );
    report.add(
        "Kafka produce alone (the runner's headers)",
        "msgs/s",
        col(2, |p| p.rate),
        None,
    );
    report.add(
        "Kafka produce alone (key and value, no headers)",
        "msgs/s",
        col(4, |p| p.rate),
        None,
    );
    report.add(
        &format!("fan-out {campaigns} x {per}, end to end"),
        "drafts/s",
        col(3, |p| p.rate),
        None,
    );
    // The raw ceilings: the sinks as SPEC.md defines them and the records as a consumer needs
    // them, nothing the delivery protocol adds.
    report.add(
        "fan-out / slower RAW ceiling (COPY into SPEC.md's table, Kafka without headers)",
        "ratio",
        per_run(|r, _| r[3].rate / r[0].rate.min(r[4].rate)),
        Some((">=", 0.8)),
    );
    // The ceilings with what the protocol adds: the runner's whole PostgreSQL transaction and
    // the runner's headers on every draft.
    report.add(
        "fan-out / slower ceiling with the protocol's additions (the runner's PostgreSQL transaction, Kafka with the runner's headers)",
        "ratio",
        per_run(|r, _| r[3].rate / r[1].rate.min(r[2].rate)),
        None,
    );
    report.add(
        "runner, rows in subscribers_feedback from the first commit to the last row",
        "drafts/s",
        spans.iter().map(|(r, _)| r.rate).collect(),
        None,
    );
    if with_peer {
        let peer_rates: Vec<f64> = spans
            .iter()
            .filter_map(|(_, p)| p.map(|p| p.rate))
            .collect();
        report.add(
            "peer (plain Python, at-least-once), rows from the first commit to the last row",
            "drafts/s",
            peer_rates,
            None,
        );
        report.add(
            "runner / peer, rows first to last, same run",
            "ratio",
            spans
                .iter()
                .filter_map(|(r, p)| p.map(|p| r.rate / p.rate))
                .collect(),
            Some((">=", 1.5)),
        );
    }
    report.add(
        "machine CPU per row, COPY alone",
        "µs",
        col(0, |p| p.cpu_us),
        None,
    );
    report.add(
        "machine CPU per row, the runner's PostgreSQL transaction",
        "µs",
        col(1, |p| p.cpu_us),
        None,
    );
    report.add(
        "machine CPU per message, Kafka alone (producer and broker)",
        "µs",
        col(2, |p| p.cpu_us),
        None,
    );
    report.add(
        "machine CPU per message, Kafka alone without headers",
        "µs",
        col(4, |p| p.cpu_us),
        None,
    );
    report.add(
        "machine CPU per draft, fan-out",
        "µs",
        col(3, |p| p.cpu_us),
        None,
    );
    report.add(
        "fan-out CPU per draft beyond the two raw sinks' own (COPY alone + Kafka without headers)",
        "µs",
        per_run(|r, _| r[3].cpu_us - r[0].cpu_us - r[4].cpu_us),
        None,
    );
    // Both raw sinks' work, at the CPU cost each has alone, on every core of the machine: no
    // fan-out on this machine can go faster, however well the runner overlaps them.
    report.add(
        "CPU bound: all cores / (COPY alone + Kafka without headers) CPU per item",
        "drafts/s",
        per_run(|r, cores| cores * 1e6 / (r[0].cpu_us + r[4].cpu_us)),
        None,
    );
    report.add(
        "CPU bound / slower raw sink ceiling",
        "ratio",
        per_run(|r, cores| cores * 1e6 / (r[0].cpu_us + r[4].cpu_us) / r[0].rate.min(r[4].rate)),
        None,
    );
    report.notes.push(format!(
        "Broker: {}. Ceilings with 200 x 1,000 rows/messages in transactions of 50,000, after one unmeasured round of COPY and Kafka (a fresh broker's JVM is slower in its first seconds). The fan-out counts from the first campaign produced to the last unit committed in both sinks (a warm-up campaign first). Machine CPU: every process's busy time over the phase (/proc/stat), per item; the sinks, the broker and the runner share the machine's cores.",
        broker.label()
    ));
    report.notes.push(
        "Runner and peer, counted the same way: rows of subscribers_feedback as a reader sees them, from the first commit seen to the N-th row seen (the first commit's rows not counted), polled every 10 ms; each run the runner first, then the peer (benches/peers/plain_pipeline.py: confluent-kafka, psycopg COPY, at-least-once, no deduplication) on the same subscribers and the same campaigns, sent to a fresh topic before it starts, into the same table (SPEC.md's, which the runner adds no index to).".into(),
    );
    if !with_peer {
        report.notes.push(format!(
            "No peer: {} is missing (scripts/bench-peers.sh makes it; BENCH_PEER_PYTHON names another).",
            python.display()
        ));
    }
    Ok(report)
}
