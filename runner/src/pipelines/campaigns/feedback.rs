//! The campaign pipeline's rows in a unit's PostgreSQL transaction: one `subscribers_feedback`
//! row per draft, written idempotently. First a binary COPY straight into the table, whose
//! unique (campaign, client) index refuses the whole COPY if any pair is there already (a
//! replay, a campaign published twice); the transaction is then tried again through a staging
//! table and `INSERT … ON CONFLICT DO NOTHING RETURNING`, and only the drafts that were new are
//! published.

use super::CampaignDelivery;
use crate::delivery::{Kept, WriteError};
use futures::{pin_mut, TryStreamExt};
use std::collections::HashSet;
use tokio_postgres::binary_copy::BinaryCopyInWriter;
use tokio_postgres::error::SqlState;
use tokio_postgres::types::{ToSql, Type};
use tokio_postgres::{Client, Statement, Transaction};

const STAGE_SQL: &str = include_str!("sql/feedback_stage.sql");
const COPY_STAGE_SQL: &str = include_str!("sql/copy_feedback.sql");
const INSERT_SQL: &str = include_str!("sql/feedback_insert.sql");
const COPY_DIRECT_SQL: &str = include_str!("sql/copy_feedback_direct.sql");

/// The types of the feedback columns the runner writes, in `copy_feedback.sql`'s order.
pub const COLUMN_TYPES: [Type; 10] = [
    Type::TEXT,
    Type::TEXT,
    Type::TEXT,
    Type::TEXT,
    Type::TEXT,
    Type::INT8,
    Type::INT8,
    Type::INT8,
    Type::TEXT,
    Type::INT4,
];

/// One feedback row, borrowed from the unit's results. `feedback` stays NULL.
#[derive(Debug, Clone, Copy)]
pub struct FeedbackRow<'a> {
    pub restaurant_id: &'a str,
    pub adv_campaign_id: &'a str,
    pub adv_campaign_content: &'a str,
    pub adv_campaign_owner: &'a str,
    pub adv_campaign_owner_contact: &'a str,
    pub adv_campaign_datetime_start: i64,
    pub adv_campaign_datetime_end: i64,
    pub datetime_created: i64,
    pub client_id: &'a str,
    /// Already checked to fit the table's int4.
    pub trigger_datetime_created: i32,
}

/// The statement the first attempt runs, prepared once per connection.
#[derive(Debug, Clone)]
pub struct Prepared {
    copy_direct: Statement,
}

pub async fn prepare(c: &Client) -> Result<Prepared, tokio_postgres::Error> {
    Ok(Prepared {
        copy_direct: c.prepare(COPY_DIRECT_SQL).await?,
    })
}

/// The feedback rows of a unit's deliveries, in order.
fn rows<'d>(deliveries: &[(usize, &'d CampaignDelivery)]) -> Vec<FeedbackRow<'d>> {
    let mut rows = Vec::new();
    for (_, d) in deliveries {
        let c = &d.drafts.campaign;
        rows.extend(d.drafts.iter().map(|draft| FeedbackRow {
            restaurant_id: &c.restaurant_id,
            adv_campaign_id: &c.adv_campaign_id,
            adv_campaign_content: &c.adv_campaign_content,
            adv_campaign_owner: &c.adv_campaign_owner,
            adv_campaign_owner_contact: &c.adv_campaign_owner_contact,
            adv_campaign_datetime_start: c.adv_campaign_datetime_start,
            adv_campaign_datetime_end: c.adv_campaign_datetime_end,
            datetime_created: c.datetime_created,
            client_id: draft.client_id,
            trigger_datetime_created: d.trigger,
        }));
    }
    rows
}

/// Writes the drafts of a unit (see the module's documentation); returns which of each
/// delivery's drafts are new.
pub async fn write(
    tx: &Transaction<'_>,
    prepared: &Prepared,
    deliveries: &[(usize, &CampaignDelivery)],
    careful: bool,
) -> Result<Vec<Kept>, WriteError> {
    let rows = rows(deliveries);
    if careful {
        return insert_new_only(tx, &rows, deliveries).await;
    }
    match copy_rows(tx, &prepared.copy_direct, &rows).await {
        Ok(()) => Ok(deliveries
            .iter()
            .map(|(entry, _)| Kept {
                entry: *entry,
                only: None,
            })
            .collect()),
        Err(e) if e.code() == Some(&SqlState::UNIQUE_VIOLATION) => Err(WriteError::AlreadyThere),
        Err(e) => Err(e.into()),
    }
}

/// Inserts only the drafts whose (campaign, client) pair is not in the table, and keeps, of
/// each delivery, the drafts that were new. Each new pair goes to the first delivery that has
/// it (the same campaign twice in one unit).
async fn insert_new_only(
    tx: &Transaction<'_>,
    rows: &[FeedbackRow<'_>],
    deliveries: &[(usize, &CampaignDelivery)],
) -> Result<Vec<Kept>, WriteError> {
    tx.batch_execute(STAGE_SQL).await?;
    copy_rows(tx, COPY_STAGE_SQL, rows).await?;
    let mut new_pairs: HashSet<(String, String)> = HashSet::new();
    let inserted = tx.query_raw(INSERT_SQL, std::iter::empty::<i32>()).await?;
    pin_mut!(inserted);
    while let Some(row) = inserted.try_next().await? {
        new_pairs.insert((row.get(0), row.get(1)));
    }
    Ok(deliveries
        .iter()
        .filter_map(|(entry, d)| {
            let campaign = &d.drafts.campaign.adv_campaign_id;
            let only: Vec<usize> = d
                .drafts
                .iter()
                .enumerate()
                .filter(|(_, draft)| {
                    new_pairs.remove(&(campaign.clone(), draft.client_id.to_string()))
                })
                .map(|(i, _)| i)
                .collect();
            (!only.is_empty()).then_some(Kept {
                entry: *entry,
                only: (only.len() < d.drafts.len()).then_some(only),
            })
        })
        .collect())
}

/// Streams `rows` into a binary COPY.
async fn copy_rows<S: tokio_postgres::ToStatement + ?Sized>(
    tx: &Transaction<'_>,
    statement: &S,
    rows: &[FeedbackRow<'_>],
) -> Result<(), tokio_postgres::Error> {
    let sink = tx.copy_in(statement).await?;
    let writer = BinaryCopyInWriter::new(sink, &COLUMN_TYPES);
    pin_mut!(writer);
    for r in rows {
        let values: [&(dyn ToSql + Sync); 10] = [
            &r.restaurant_id,
            &r.adv_campaign_id,
            &r.adv_campaign_content,
            &r.adv_campaign_owner,
            &r.adv_campaign_owner_contact,
            &r.adv_campaign_datetime_start,
            &r.adv_campaign_datetime_end,
            &r.datetime_created,
            &r.client_id,
            &r.trigger_datetime_created,
        ];
        writer.as_mut().write(&values).await?;
    }
    writer.finish().await?;
    Ok(())
}
