//! `runner reconcile`: compares, per campaign, the drafts in the campaign pipeline's output topic
//! (as a read_committed consumer sees them) with the rows of `subscribers_feedback`, prints
//! every difference, and with `--repair` completes the side that lacks something. Operators'
//! guide: docs/reconcile.md.
//!
//! Order of the reads, so that a running pipeline (PostgreSQL first, then Kafka from the
//! outbox: README, "Delivery guarantees") causes no false difference:
//! 1. the feedback rows and the pipeline's outbox, in one PostgreSQL snapshot: a row whose draft
//!    is not in Kafka yet has its outbox entry there, and is *in flight*, not missing;
//! 2. the output topic, up to the ends it has when this read starts (after 1, so every draft
//!    of a row seen in 1 whose outbox entry was gone was published before);
//! 3. the rows of drafts that had none in 1, looked up again (their units committed after 1).
//!
//! - `compare.rs`: the comparison (digests per pair), the report;
//! - `postgres.rs`, `sql/`: the snapshot, look-ups, the repair's inserts;
//! - `kafka.rs`: the bounded read, the repair's transaction.

mod compare;
mod kafka;
mod postgres;

pub use compare::{
    CampaignReport, Difference, Draft, FieldDifference, NotADraft, Pos, Report, Totals, ENTRY_BYTES,
};
pub use kafka::{transactional_id, REPAIR_FROM, REPAIR_HEADER};

use crate::config::{Config, Sources};
use anyhow::Context;
use clap::Args;
use rdkafka::error::KafkaError;
use serde::Serialize;
use std::fmt::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

/// Exit status when both sides are equal (drafts in flight aside).
pub const EXIT_EQUAL: u8 = 0;
/// Exit status when there is at least one difference (after `--repair`: one left).
pub const EXIT_DIFFERENCES: u8 = 1;
/// Exit status when the comparison could not be made (configuration, PostgreSQL, Kafka).
pub const EXIT_ERROR: u8 = 2;

/// `runner reconcile [--campaign ID]… [--repair] [--json]`.
///
/// Exit status: 0 when both sides are equal (drafts in flight are not differences), 1 when
/// there is a difference (with --repair: one left after repairing), 2 when the comparison
/// could not be made.
#[derive(Debug, Args)]
#[command(
    after_help = "Exit status: 0 when both sides are equal (drafts in flight are not differences), 1 when there is a difference (with --repair: one left after repairing), 2 when the comparison could not be made. Operators' guide: docs/reconcile.md."
)]
pub struct ReconcileArgs {
    /// Runner configuration (TOML), as for `runner run`; environment variables RUNNER__…
    /// apply on top. The campaign pipeline's output topic, group and database are compared.
    #[arg(long, short)]
    pub config: Option<PathBuf>,
    /// Compare only this campaign (adv_campaign_id); repeat for several.
    #[arg(long = "campaign", value_name = "ID")]
    pub campaigns: Vec<String>,
    /// Complete the side that lacks something: rows missing in PostgreSQL are inserted from
    /// their drafts, drafts missing in Kafka are produced from their rows (in one transaction,
    /// header `reconcile-repair`); then compare again. Idempotent. Duplicates and differing
    /// fields are reported, never repaired.
    #[arg(long)]
    pub repair: bool,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
    /// How long reading the output topic may wait for its next record (a read_committed
    /// reader waits at an open transaction) and a Kafka transaction of the repair may take.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
}

/// Why a comparison or a repair could not be made.
#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    #[error("PostgreSQL")]
    Postgres(#[from] tokio_postgres::Error),
    #[error("Kafka")]
    Kafka(#[source] KafkaError),
    #[error("the output topic {0} does not exist")]
    NoTopic(String),
    #[error(
        "reading {topic}: no record for {idle:?} on partitions {partitions:?} before their end \
         (a read_committed reader waits at a transaction still open; try again, or raise --timeout)"
    )]
    Stalled {
        topic: String,
        idle: Duration,
        partitions: Vec<i32>,
    },
    #[error("the pipeline's outbox cannot be read: {0}")]
    Outbox(String),
    #[error(
        "the draft of campaign {adv_campaign_id}, client {client_id} has trigger_datetime_created \
         {value}, which the table's int4 cannot hold: not inserted"
    )]
    TriggerOutOfRange {
        adv_campaign_id: String,
        client_id: String,
        value: i64,
    },
}

/// What `--repair` did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Repaired {
    /// Rows inserted into `subscribers_feedback` (a pair already there is not counted).
    pub inserted_into_postgres: u64,
    /// Drafts produced to the output topic.
    pub produced_to_kafka: u64,
    /// Differences left as they are: duplicates, differing fields, records that are not
    /// drafts, and drafts missing in Kafka when the topic's older records were deleted.
    pub not_repaired: u64,
    /// Drafts missing in Kafka were not produced: the topic does not start at offset 0 (see
    /// [`Report::kafka_log_start`]), so rows older than its first records would look missing,
    /// and no `--campaign` said which campaigns to repair.
    pub kafka_skipped_truncated: bool,
}

/// The outcome of `runner reconcile`.
#[derive(Debug, Clone, Serialize)]
#[serde(untagged)]
pub enum Outcome {
    Compared(Report),
    Repaired {
        before: Report,
        repair: Repaired,
        after: Report,
    },
}

impl Outcome {
    /// The report that decides the exit status.
    pub fn last(&self) -> &Report {
        match self {
            Outcome::Compared(r) | Outcome::Repaired { after: r, .. } => r,
        }
    }
}

pub async fn run(args: ReconcileArgs) -> anyhow::Result<ExitCode> {
    match reconcile(&args).await {
        Ok(outcome) => {
            if args.json {
                println!("{}", serde_json::to_string_pretty(&outcome)?);
            } else {
                print!("{}", render(&outcome));
            }
            Ok(ExitCode::from(if outcome.last().equal {
                EXIT_EQUAL
            } else {
                EXIT_DIFFERENCES
            }))
        }
        Err(e) => {
            eprintln!("runner: error: {e:#}");
            Ok(ExitCode::from(EXIT_ERROR))
        }
    }
}

/// Compares, and repairs when asked.
pub async fn reconcile(args: &ReconcileArgs) -> anyhow::Result<Outcome> {
    let config = Config::load(&Sources {
        file: args.config.as_deref(),
        overlay: None,
        env: true,
    })?;
    let filter = (!args.campaigns.is_empty()).then_some(args.campaigns.as_slice());
    let mut pg = crate::db::connect(config.postgres_url.as_str())
        .await
        .context("connecting to PostgreSQL")?;
    let (before, to_repair) = compare(&config, &mut pg, filter, args.timeout).await?;
    if !args.repair {
        return Ok(Outcome::Compared(before));
    }
    let campaigns = campaigns_config(&config)?;
    let mut repair = Repaired {
        not_repaired: before.totals.differences
            - before.totals.missing_in_kafka
            - before.totals.missing_in_postgres,
        ..Repaired::default()
    };
    if !to_repair.missing_in_postgres.is_empty() {
        repair.inserted_into_postgres = postgres::insert(&mut pg, &to_repair.missing_in_postgres)
            .await
            .context("inserting the rows missing in PostgreSQL")?;
    }
    // With --campaign the operator names campaigns whose drafts are within the topic.
    let truncated = !before.kafka_log_start.is_empty() && filter.is_none();
    if truncated && !to_repair.missing_in_kafka.is_empty() {
        // Drafts deleted by retention would be published again, long after their campaign.
        repair.not_repaired += to_repair.missing_in_kafka.len() as u64;
        repair.kafka_skipped_truncated = true;
    } else if !to_repair.missing_in_kafka.is_empty() {
        let mut drafts: Vec<Draft> = postgres::lookup(&pg, &to_repair.missing_in_kafka)
            .await
            .context("reading the rows whose drafts are missing in Kafka")?
            .into_iter()
            .map(|(_, d)| d)
            .collect();
        drafts.sort_by(|a, b| {
            (&a.adv_campaign_id, &a.client_id).cmp(&(&b.adv_campaign_id, &b.client_id))
        });
        drafts
            .dedup_by(|a, b| a.adv_campaign_id == b.adv_campaign_id && a.client_id == b.client_id);
        repair.produced_to_kafka = kafka::produce(
            &config.kafka,
            &campaigns.group_id,
            &campaigns.output_topic,
            &drafts,
            args.timeout,
        )
        .await
        .context("producing the drafts missing in Kafka")?;
    }
    let (after, _) = compare(&config, &mut pg, filter, args.timeout).await?;
    Ok(Outcome::Repaired {
        before,
        repair,
        after,
    })
}

fn campaigns_config(
    config: &Config,
) -> anyhow::Result<&crate::pipelines::campaigns::config::CampaignsConfig> {
    config.campaigns.as_ref().context(
        "the campaign pipeline is not enabled in this configuration (pipelines.campaigns.enabled)",
    )
}

/// One comparison (see the module's documentation for the order of the reads).
async fn compare(
    config: &Config,
    pg: &mut tokio_postgres::Client,
    filter: Option<&[String]>,
    timeout: Duration,
) -> anyhow::Result<(Report, compare::ToRepair)> {
    let campaigns = campaigns_config(config)?;
    let mut tally = compare::Tally::default();
    let prefix = crate::pipelines::campaigns::tables().prefix;
    let rows = postgres::scan(pg, &prefix, filter, &mut tally)
        .await
        .context("reading subscribers_feedback")?;
    let records = kafka::read(
        &config.kafka,
        &campaigns.group_id,
        &campaigns.output_topic,
        filter,
        timeout,
        &mut tally,
    )
    .await
    .with_context(|| format!("reading the output topic {}", campaigns.output_topic))?;
    let unmatched = tally.unmatched();
    for (id, d) in postgres::lookup(pg, &unmatched)
        .await
        .context("looking up the rows of drafts that had none")?
    {
        tally.late_row(id, &d.view());
    }
    let rows_of_differing = postgres::lookup_map(pg, &tally.differing_pairs())
        .await
        .context("reading the rows that differ from their drafts")?;
    tracing::debug!(rows, records, "Compared.");
    Ok(tally.finish(&rows_of_differing))
}

/// The outcome as text: per campaign, a summary line and one line per difference; the records
/// that are not drafts; the totals; what to do.
pub fn render(outcome: &Outcome) -> String {
    match outcome {
        Outcome::Compared(r) => {
            let mut s = render_report(r);
            s.push_str(&advice(r, false));
            s
        }
        Outcome::Repaired {
            before,
            repair,
            after,
        } => {
            let mut s = String::from("before repair:\n");
            s.push_str(&render_report(before));
            let _ = writeln!(
                s,
                "repair: {} rows inserted into PostgreSQL, {} drafts produced to Kafka, {} differences not repairable (duplicates, differing fields, records that are not drafts)",
                repair.inserted_into_postgres, repair.produced_to_kafka, repair.not_repaired
            );
            if repair.kafka_skipped_truncated {
                s.push_str("repair: drafts missing in Kafka were not produced: the output topic's earliest records were deleted, so a row may only look missing (see the notes); repair with --campaign for the campaigns whose drafts are really lost\n");
            }
            s.push_str("after repair:\n");
            s.push_str(&render_report(after));
            s.push_str(&advice(after, true));
            s
        }
    }
}

fn render_report(r: &Report) -> String {
    let mut s = String::new();
    for c in &r.campaigns {
        let _ = writeln!(
            s,
            "campaign {}: {} rows in PostgreSQL, {} drafts in Kafka, {} equal, {} differences, {} in flight",
            c.adv_campaign_id,
            c.postgres_rows,
            c.kafka_drafts,
            c.equal,
            c.differences.len(),
            c.in_flight
        );
        for d in &c.differences {
            let _ = writeln!(s, "  {}", difference_line(d));
        }
    }
    for p in &r.kafka_log_start {
        let _ = writeln!(
            s,
            "note: partition {} of the output topic starts at offset {}: its earlier records were deleted (retention), so drafts older than that show as missing in Kafka; compare recent campaigns with --campaign",
            p.partition, p.offset
        );
    }
    for n in &r.not_drafts {
        let _ = writeln!(s, "not a draft: {}: {}", n.record, n.error);
    }
    let t = &r.totals;
    let _ = writeln!(
        s,
        "total: {} campaigns, {} rows in PostgreSQL, {} drafts in Kafka, {} equal, {} in flight; {} differences: {} missing in Kafka, {} missing in PostgreSQL, {} duplicates, {} fields differ, {} not drafts",
        t.campaigns,
        t.postgres_rows,
        t.kafka_drafts,
        t.equal,
        t.in_flight,
        t.differences,
        t.missing_in_kafka,
        t.missing_in_postgres,
        t.duplicates,
        t.fields_differ,
        t.not_drafts
    );
    s
}

fn difference_line(d: &Difference) -> String {
    match d {
        Difference::MissingInKafka { client_id, row_id } => {
            format!("missing in Kafka: client {client_id} (subscribers_feedback id {row_id})")
        }
        Difference::MissingInPostgres { client_id, record } => {
            format!("missing in PostgreSQL: client {client_id} ({record})")
        }
        Difference::DuplicateInKafka { client_id, records } => {
            let at: Vec<String> = records.iter().map(Pos::to_string).collect();
            format!(
                "duplicate in Kafka: client {client_id}, {} records ({})",
                records.len(),
                at.join(", ")
            )
        }
        Difference::DuplicateInPostgres { client_id, row_ids } => {
            let ids: Vec<String> = row_ids.iter().map(i32::to_string).collect();
            format!(
                "duplicate in PostgreSQL: client {client_id}, {} rows (ids {})",
                row_ids.len(),
                ids.join(", ")
            )
        }
        Difference::FieldsDiffer {
            client_id,
            row_id,
            record,
            fields,
        } => {
            let f: Vec<String> = fields
                .iter()
                .map(|f| format!("{}: PostgreSQL {} / Kafka {}", f.field, f.postgres, f.kafka))
                .collect();
            format!(
                "fields differ: client {client_id} (subscribers_feedback id {row_id}, {record}): {}",
                f.join("; ")
            )
        }
        Difference::KeyDiffers {
            client_id,
            key,
            record,
        } => format!("key differs: client {client_id} ({record}): the record's key is {key:?}"),
    }
}

fn advice(r: &Report, repaired: bool) -> String {
    let mut s = String::new();
    if r.totals.in_flight > 0 {
        let _ = writeln!(
            s,
            "{} drafts are in flight (in PostgreSQL and the pipeline's outbox, not yet in Kafka): not differences; run again to see them settle.",
            r.totals.in_flight
        );
    }
    if r.equal {
        s.push_str("The two sides are equal.\n");
    } else {
        let repairable = r.totals.missing_in_kafka + r.totals.missing_in_postgres;
        if repairable > 0 && !repaired {
            let _ = writeln!(
                s,
                "{repairable} differences can be completed with --repair; duplicates and differing fields are only reported."
            );
        } else {
            s.push_str(
                "Duplicates and differing fields are only reported: --repair does not change them.\n",
            );
        }
    }
    s
}
