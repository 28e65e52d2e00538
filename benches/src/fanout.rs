//! Sink ceilings and fan-out, in the same run on the same services.
//! 1. PostgreSQL alone: binary COPY of feedback-shaped rows into the table, without and with
//!    the unique index the delivery protocol needs, and the runner's own PostgreSQL
//!    transaction (fence, COPY into the table, outbox) for the same rows. Kafka alone: produce
//!    of output-shaped messages.
//! 2. Fan-out: 1,000 active campaigns x 1,000 subscribers = 1,000,000 drafts end to end
//!    through the runner, until both sinks committed; drafts/s and the ratio to the slower
//!    ceiling of (1). The subscribers and the campaigns are those of `runner produce
//!    campaigns` (`runner::produce::campaigns`): one restaurant per campaign, seeded with
//!    binary COPY, and the campaigns sent as fast as its producer takes them.

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

/// PostgreSQL COPY into the table, in transactions of `chunk` rows, with or without the unique
/// index the delivery protocol needs: rows/s.
async fn pg_copy_alone(
    url: &str,
    campaigns: &[String],
    clients: &[String],
    chunk: usize,
    with_index: bool,
) -> Result<Phase> {
    let mut c = runner::db::connect(url).await?;
    c.batch_execute("TRUNCATE subscribers_feedback").await?;
    if !with_index {
        c.batch_execute("DROP INDEX IF EXISTS subscribers_feedback_campaign_client_key")
            .await?;
    }
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
    // Put the protocol's index back for what follows.
    c.batch_execute("TRUNCATE subscribers_feedback").await?;
    runner::pipelines::campaigns::ensure_schema(&c).await?;
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
    c.batch_execute("TRUNCATE subscribers_feedback, campaign_runner_outbox")
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

/// Kafka produce alone: output-shaped records (key, JSON value and the runner's headers) with
/// the runner's producer settings (idempotent, acks=all, its compression), as fast as the
/// broker takes them: msgs/s. As many producers at once as the runner has input partitions (it
/// publishes each partition's units on that partition's producer, at the same time), each
/// sending its share of the campaigns and flushing, with no future per record: the broker's
/// ceiling, not one client's.
async fn kafka_alone(
    brokers: &str,
    topic: &str,
    campaigns: &[String],
    clients: &[String],
    producers: i32,
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
            tokio::task::spawn_blocking(move || produce_share(&brokers, &topic, &share, &clients))
        })
        .collect();
    for h in handles {
        h.await??;
    }
    Ok(t.done(campaigns.len() * clients.len()))
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
        let h = runner::headers::owned([
            ("source-topic", &b"campaigns"[..]),
            ("source-partition", b"0"),
            ("source-offset", b"123456"),
            ("rules-version", b"campaign-rules 1.0.0"),
            ("rules-sha256", &[b'0'; 64][..]),
            ("subscribers-snapshot", b"42"),
            ("adv-campaign-id", camp.as_bytes()),
            ("tx-attempt", b"00000000-0000-4000-8000-000000000000"),
        ]);
        for client in clients {
            let p = payload(camp, client);
            let mut record = BaseRecord::to(topic)
                .key(client.as_bytes())
                .payload(&p)
                .headers(h.clone());
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

/// Runs the runner over `campaigns` x `per` drafts (after a warm-up campaign); drafts/s.
async fn fanout(
    broker: &Broker,
    url: &str,
    rules: &Path,
    campaigns: usize,
    per: usize,
) -> Result<Phase> {
    let c = runner::db::connect(url).await?;
    c.batch_execute(
        "TRUNCATE subscribers_feedback, campaign_runner_outbox, campaign_runner_fences",
    )
    .await?;
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
    let (running, input) = broker.start_runner(url, rules, "").await?;
    // Campaign n goes to restaurant n mod `campaigns`: the warm-up is campaign 0, the
    // measured ones 1 ..= campaigns, one per restaurant. All active at the runner's clock.
    let send = |first: u64, count: u64| {
        let mut opts = CampaignsOptions {
            restaurants: u32::try_from(campaigns).unwrap_or(u32::MAX),
            first,
            seed: Some(SEED),
            subscribers_per_restaurant: u32::try_from(per).ok(),
            ..CampaignsOptions::default()
        };
        opts.produce.topic = input.clone();
        opts.produce.limit = Limit::Count(count);
        opts.produce.as_fast_as_possible = true;
        let mut producer = ClientConfig::new();
        producer.set("bootstrap.servers", broker.brokers());
        runner::produce::campaigns(producer, opts, Progress::Hidden)
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
    // Where a unit's time goes (a stage that is busy all the time is the bound).
    for (name, q) in running.campaigns().events.stages() {
        eprintln!(
            "bench fanout: stage {name:<13} p50 {:>8.2} ms  p99 {:>8.2} ms  max {:>8.2} ms  ({} units)",
            q.p50_ms, q.p99_ms, q.max_ms, q.samples
        );
    }
    running.stop().await?;
    Ok(phase)
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
    // Per run: COPY, COPY with index, the runner's PostgreSQL transaction, Kafka, fan-out.
    let mut phases: Vec<[Phase; 5]> = Vec::new();
    for run in 1..=runs {
        let c = pg_copy_alone(&url, &sink_campaigns, &sink_clients, 50_000, false).await?;
        let ci = pg_copy_alone(&url, &sink_campaigns, &sink_clients, 50_000, true).await?;
        let p = pg_protocol(&url, &sink_campaigns, &sink_clients, 50_000).await?;
        let k = kafka_alone(
            &broker.brokers(),
            &topic,
            &sink_campaigns,
            &sink_clients,
            INPUT_PARTITIONS,
        )
        .await?;
        let f = fanout(&broker, &url, rules, campaigns, per).await?;
        eprintln!(
            "bench fanout: run {run}/{runs}: COPY {:.0} rows/s, COPY with index {:.0} rows/s, protocol {:.0} rows/s, Kafka {:.0} msgs/s, fan-out {:.0} drafts/s; machine CPU per item: {:.1} / {:.1} / {:.1} / {:.1} / {:.1} µs",
            c.rate, ci.rate, p.rate, k.rate, f.rate, c.cpu_us, ci.cpu_us, p.cpu_us, k.cpu_us, f.cpu_us
        );
        phases.push([c, ci, p, k, f]);
    }
    let col = |i: usize, g: fn(&Phase) -> f64| phases.iter().map(|r| g(&r[i])).collect::<Vec<_>>();
    let per_run =
        |g: fn(&[Phase; 5], f64) -> f64| phases.iter().map(|r| g(r, cores)).collect::<Vec<_>>();
    report.add(
        "PostgreSQL COPY alone (no index)",
        "rows/s",
        col(0, |p| p.rate),
        None,
    );
    report.add(
        "PostgreSQL COPY alone (with the unique index)",
        "rows/s",
        col(1, |p| p.rate),
        None,
    );
    report.add(
        "PostgreSQL, the runner's transaction (fence, COPY, outbox)",
        "rows/s",
        col(2, |p| p.rate),
        None,
    );
    report.add("Kafka produce alone", "msgs/s", col(3, |p| p.rate), None);
    report.add(
        &format!("fan-out {campaigns} x {per}, end to end"),
        "drafts/s",
        col(4, |p| p.rate),
        None,
    );
    // The slower sink, PostgreSQL with the index the delivery protocol needs or Kafka.
    report.add(
        "fan-out / slower sink ceiling (COPY with index, Kafka)",
        "ratio",
        per_run(|r, _| r[4].rate / r[1].rate.min(r[3].rate)),
        Some((">=", 0.8)),
    );
    report.add(
        "fan-out / slower of the runner's PostgreSQL transaction and Kafka",
        "ratio",
        per_run(|r, _| r[4].rate / r[2].rate.min(r[3].rate)),
        None,
    );
    report.add(
        "machine CPU per row, COPY with index",
        "µs",
        col(1, |p| p.cpu_us),
        None,
    );
    report.add(
        "machine CPU per row, the runner's PostgreSQL transaction",
        "µs",
        col(2, |p| p.cpu_us),
        None,
    );
    report.add(
        "machine CPU per message, Kafka alone (producer and broker)",
        "µs",
        col(3, |p| p.cpu_us),
        None,
    );
    report.add(
        "machine CPU per draft, fan-out",
        "µs",
        col(4, |p| p.cpu_us),
        None,
    );
    report.add(
        "fan-out CPU per draft beyond the two sinks' own (COPY with index + Kafka alone)",
        "µs",
        per_run(|r, _| r[4].cpu_us - r[1].cpu_us - r[3].cpu_us),
        None,
    );
    // Both sinks' work, at the CPU cost each has alone, on every core of the machine: no
    // fan-out on this machine can go faster, however well the runner overlaps them.
    report.add(
        "CPU bound: all cores / (COPY with index + Kafka alone) CPU per item",
        "drafts/s",
        per_run(|r, cores| cores * 1e6 / (r[1].cpu_us + r[3].cpu_us)),
        None,
    );
    report.add(
        "CPU bound / slower sink ceiling",
        "ratio",
        per_run(|r, cores| cores * 1e6 / (r[1].cpu_us + r[3].cpu_us) / r[1].rate.min(r[3].rate)),
        None,
    );
    report.notes.push(format!(
        "Broker: {}. Ceilings with 200 x 1,000 rows/messages in transactions of 50,000. The fan-out counts from the first campaign produced to the last unit committed in both sinks (a warm-up campaign first). Machine CPU: every process's busy time over the phase (/proc/stat), per item; the sinks, the broker and the runner share the machine's cores.",
        broker.label()
    ));
    Ok(report)
}
