//! The campaign pipeline's rows in a unit's PostgreSQL transaction: one `subscribers_feedback`
//! row per draft, each (campaign, client) exactly once. SPEC.md's table carries no index for
//! that: what each campaign has reached is its row in `campaign_runner_delivered` (the clients
//! with a draft), written in the same transaction, so a unit costs one row per campaign, not an
//! index entry per draft.
//!
//! First attempt (a campaign delivered for the first time, the common case): a binary COPY of
//! the unit's campaigns into `campaign_runner_delivered`, whose primary key refuses it whole if
//! any of them has a row already (a replay, a campaign published again, a trigger, the same
//! campaign twice in the unit), then a binary COPY of the drafts straight into
//! `subscribers_feedback`. When refused, the transaction is tried again carefully: the rows of
//! the unit's campaigns are read and locked, each delivery keeps the drafts of the clients not
//! reached yet (the first delivery of a campaign in the unit has them), only those are copied,
//! and the rows are extended (or inserted, for campaigns without one).

use super::CampaignDelivery;
use crate::delivery::{Kept, WriteError};
use futures::{pin_mut, TryStreamExt};
use std::collections::{BTreeMap, HashMap, HashSet};
use tokio_postgres::binary_copy::BinaryCopyInWriter;
use tokio_postgres::error::SqlState;
use tokio_postgres::types::{ToSql, Type};
use tokio_postgres::{Client, Statement, Transaction};

const COPY_DIRECT_SQL: &str = include_str!("sql/copy_feedback_direct.sql");
const DELIVERED_COPY_SQL: &str = include_str!("sql/delivered_copy.sql");
const DELIVERED_LOCK_SQL: &str = include_str!("sql/delivered_lock.sql");
const DELIVERED_EXTEND_SQL: &str = include_str!("sql/delivered_extend.sql");

/// Clients of campaigns, in campaign-id order.
type Reached<'a> = BTreeMap<&'a str, Vec<&'a str>>;

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

/// The statements the first attempt runs, prepared once per connection.
#[derive(Debug, Clone)]
pub struct Prepared {
    copy_direct: Statement,
    copy_delivered: Statement,
}

pub async fn prepare(c: &Client) -> Result<Prepared, tokio_postgres::Error> {
    let (copy_direct, copy_delivered) =
        futures::try_join!(c.prepare(COPY_DIRECT_SQL), c.prepare(DELIVERED_COPY_SQL))?;
    Ok(Prepared {
        copy_direct,
        copy_delivered,
    })
}

/// The feedback rows of the drafts kept of a unit's deliveries, in order.
fn rows<'d>(deliveries: &[(usize, &'d CampaignDelivery)], kept: &[Kept]) -> Vec<FeedbackRow<'d>> {
    let mut rows = Vec::new();
    let mut kept = kept.iter().peekable();
    for (entry, d) in deliveries {
        let Some(k) = kept.next_if(|k| k.entry == *entry) else {
            continue;
        };
        let c = &d.drafts.campaign;
        let row = |client_id| FeedbackRow {
            restaurant_id: &c.restaurant_id,
            adv_campaign_id: &c.adv_campaign_id,
            adv_campaign_content: &c.adv_campaign_content,
            adv_campaign_owner: &c.adv_campaign_owner,
            adv_campaign_owner_contact: &c.adv_campaign_owner_contact,
            adv_campaign_datetime_start: c.adv_campaign_datetime_start,
            adv_campaign_datetime_end: c.adv_campaign_datetime_end,
            datetime_created: c.datetime_created,
            client_id,
            trigger_datetime_created: d.trigger,
        };
        match &k.only {
            None => rows.extend(d.drafts.iter().map(|draft| row(draft.client_id))),
            Some(only) => {
                let clients: Vec<&str> = d.drafts.iter().map(|draft| draft.client_id).collect();
                rows.extend(only.iter().map(|&i| row(clients[i])));
            }
        }
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
    if careful {
        return write_new_only(tx, prepared, deliveries).await;
    }
    let kept: Vec<Kept> = deliveries
        .iter()
        .map(|(entry, _)| Kept {
            entry: *entry,
            only: None,
        })
        .collect();
    // Campaign-id order, as the careful attempt locks them: two units never wait on each other
    // crosswise.
    let mut reached: Reached = BTreeMap::new();
    for (_, d) in deliveries {
        let clients = reached
            .entry(d.drafts.campaign.adv_campaign_id.as_str())
            .or_default();
        if !clients.is_empty() {
            // The same campaign twice in the unit: the careful attempt sorts that out.
            return Err(WriteError::AlreadyThere);
        }
        clients.extend(d.drafts.iter().map(|draft| draft.client_id));
    }
    match copy_delivered(tx, &prepared.copy_delivered, &reached).await {
        Ok(()) => {}
        Err(e) if e.code() == Some(&SqlState::UNIQUE_VIOLATION) => {
            return Err(WriteError::AlreadyThere)
        }
        Err(e) => return Err(e.into()),
    }
    copy_rows(tx, &prepared.copy_direct, &rows(deliveries, &kept)).await?;
    Ok(kept)
}

/// Writes only the drafts of clients the campaign has not reached yet, and keeps, of each
/// delivery, the drafts that were new. Each new (campaign, client) pair goes to the first
/// delivery that has it (the same campaign twice in one unit).
async fn write_new_only(
    tx: &Transaction<'_>,
    prepared: &Prepared,
    deliveries: &[(usize, &CampaignDelivery)],
) -> Result<Vec<Kept>, WriteError> {
    let mut ids: Vec<&str> = deliveries
        .iter()
        .map(|(_, d)| d.drafts.campaign.adv_campaign_id.as_str())
        .collect();
    ids.sort_unstable();
    ids.dedup();
    let mut reached: HashMap<String, HashSet<String>> = HashMap::new();
    let locked = tx
        .query_raw(DELIVERED_LOCK_SQL, [&ids as &(dyn ToSql + Sync)])
        .await?;
    pin_mut!(locked);
    while let Some(row) = locked.try_next().await? {
        let clients: Vec<String> = row.get(1);
        reached.insert(row.get(0), clients.into_iter().collect());
    }
    let known: HashSet<String> = reached.keys().cloned().collect();
    // What each campaign reaches now, in campaign-id order.
    let mut added: Reached = BTreeMap::new();
    let mut kept = Vec::new();
    for (entry, d) in deliveries {
        let campaign = d.drafts.campaign.adv_campaign_id.as_str();
        let before = reached.entry(campaign.to_string()).or_default();
        let only: Vec<usize> = d
            .drafts
            .iter()
            .enumerate()
            .filter(|(_, draft)| before.insert(draft.client_id.to_string()))
            .map(|(i, _)| i)
            .collect();
        if only.is_empty() {
            continue;
        }
        let clients: Vec<&str> = d.drafts.iter().map(|draft| draft.client_id).collect();
        added
            .entry(campaign)
            .or_default()
            .extend(only.iter().map(|&i| clients[i]));
        kept.push(Kept {
            entry: *entry,
            only: (only.len() < d.drafts.len()).then_some(only),
        });
    }
    let (extended, first): (Reached, Reached) =
        added.into_iter().partition(|(id, _)| known.contains(*id));
    // A campaign another unit delivered for the first time since the lock above is refused
    // here (unique violation): the attempt is made again, and sees it.
    match copy_delivered(tx, &prepared.copy_delivered, &first).await {
        Ok(()) => {}
        Err(e) if e.code() == Some(&SqlState::UNIQUE_VIOLATION) => {
            return Err(WriteError::AlreadyThere)
        }
        Err(e) => return Err(e.into()),
    }
    futures::future::try_join_all(extended.iter().map(|(id, clients)| {
        let params: [&(dyn ToSql + Sync); 2] = [id, clients];
        async move { tx.execute(DELIVERED_EXTEND_SQL, &params).await }
    }))
    .await?;
    copy_rows(tx, &prepared.copy_direct, &rows(deliveries, &kept)).await?;
    Ok(kept)
}

/// Streams the campaigns' first rows into `campaign_runner_delivered` (nothing when empty).
async fn copy_delivered(
    tx: &Transaction<'_>,
    statement: &Statement,
    campaigns: &Reached<'_>,
) -> Result<(), tokio_postgres::Error> {
    if campaigns.is_empty() {
        return Ok(());
    }
    let sink = tx.copy_in(statement).await?;
    let writer = BinaryCopyInWriter::new(sink, &[Type::TEXT, Type::TEXT_ARRAY]);
    pin_mut!(writer);
    for (id, clients) in campaigns {
        let values: [&(dyn ToSql + Sync); 2] = [id, clients];
        writer.as_mut().write(&values).await?;
    }
    writer.finish().await?;
    Ok(())
}

/// Streams `rows` into a binary COPY.
async fn copy_rows<S: tokio_postgres::ToStatement + ?Sized>(
    tx: &Transaction<'_>,
    statement: &S,
    rows: &[FeedbackRow<'_>],
) -> Result<(), tokio_postgres::Error> {
    if rows.is_empty() {
        return Ok(());
    }
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
