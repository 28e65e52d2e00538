//! The PostgreSQL side: the feedback rows and the pipeline's unpublished outbox entries read in
//! one snapshot, rows looked up by (campaign, client), and the repair's inserts.

use super::compare::{Draft, DraftView, Tally};
use super::ReconcileError;
use crate::delivery::template::TemplateRecords;
use futures::{pin_mut, TryStreamExt};
use std::collections::HashMap;
use tokio_postgres::{Client, IsolationLevel, Row};

const SCAN_SQL: &str = include_str!("sql/feedback_scan.sql");
const LOOKUP_SQL: &str = include_str!("sql/feedback_lookup.sql");
const REPAIR_SQL: &str = include_str!("sql/feedback_repair.sql");
const OUTBOX_EXISTS_SQL: &str = include_str!("sql/outbox_exists.sql");
const OUTBOX_DRAFTS_SQL: &str = include_str!("sql/outbox_drafts.sql");

/// Rows inserted per statement.
const BATCH: usize = 1000;
/// Pairs looked up per statement: SPEC.md's table has no index on them, so each statement reads
/// the table once.
const LOOKUP_BATCH: usize = 200_000;

/// A row's fields, borrowed, in the order of the SQL files' select lists (after `id`).
fn view(r: &Row) -> DraftView<'_> {
    DraftView {
        restaurant_id: r.get(1),
        adv_campaign_id: r.get(2),
        adv_campaign_content: r.get(3),
        adv_campaign_owner: r.get(4),
        adv_campaign_owner_contact: r.get(5),
        adv_campaign_datetime_start: r.get(6),
        adv_campaign_datetime_end: r.get(7),
        client_id: r.get(8),
        datetime_created: r.get(9),
        trigger_datetime_created: i64::from(r.get::<_, i32>(10)),
    }
}

/// Feeds `tally` every feedback row (of `campaigns`, or all) and every pair of the pipeline's
/// outbox, both from one snapshot: a row and its outbox entry are committed together, so a
/// row whose draft is not in Kafka yet is seen with its entry. Returns the rows read.
pub async fn scan(
    client: &mut Client,
    outbox_prefix: &str,
    campaigns: Option<&[String]>,
    tally: &mut Tally,
) -> Result<u64, ReconcileError> {
    let tx = client
        .build_transaction()
        .isolation_level(IsolationLevel::RepeatableRead)
        .read_only(true)
        .start()
        .await?;
    let sql = |s: &str| s.replace("{prefix}", outbox_prefix);
    let outbox: bool = tx.query_one(&sql(OUTBOX_EXISTS_SQL), &[]).await?.get(0);
    if outbox {
        for r in tx.query(&sql(OUTBOX_DRAFTS_SQL), &[]).await? {
            for (campaign, client) in outbox_pairs(&r)? {
                if campaigns.is_none_or(|c| c.contains(&campaign)) {
                    tally.in_flight(campaign, client);
                }
            }
        }
    }
    let filter: Option<Vec<String>> = campaigns.map(<[String]>::to_vec);
    let rows = tx.query_raw(SCAN_SQL, [&filter]).await?;
    pin_mut!(rows);
    let mut n = 0u64;
    while let Some(r) = rows.try_next().await? {
        tally.row(r.get(0), &view(&r));
        n += 1;
    }
    tx.commit().await?;
    Ok(n)
}

/// The (campaign, client) pairs of one outbox row of the output topic: the clients are the
/// records' keys, the campaign is the entry's `adv-campaign-id` header (or, failing that, the
/// first draft's field).
fn outbox_pairs(r: &Row) -> Result<Vec<(String, String)>, ReconcileError> {
    let damaged = |why: String| ReconcileError::Outbox(why);
    let (keys, payloads): (Vec<Vec<u8>>, Vec<Vec<u8>>) = match r.get::<_, Option<&[u8]>>(2) {
        Some(stored) => TemplateRecords::decode(stored)
            .map_err(|e| damaged(e.to_string()))?
            .into_iter()
            .unzip(),
        None => {
            let keys: Vec<Option<Vec<u8>>> = r.get(0);
            let payloads: Vec<Option<Vec<u8>>> = r.get(1);
            (
                keys.into_iter().map(Option::unwrap_or_default).collect(),
                payloads
                    .into_iter()
                    .map(Option::unwrap_or_default)
                    .collect(),
            )
        }
    };
    let headers = crate::headers::decode(r.get(3))
        .ok_or_else(|| damaged("an entry's headers cannot be decoded".into()))?;
    let from_header = headers
        .iter()
        .find(|(k, _)| k == crate::pipelines::campaigns::header::ADV_CAMPAIGN_ID)
        .and_then(|(_, v)| String::from_utf8(v.clone()).ok());
    let campaign = match from_header {
        Some(c) => c,
        None => match payloads.first() {
            Some(p) => {
                serde_json::from_slice::<Draft>(p)
                    .map_err(|e| damaged(format!("an entry's draft cannot be read: {e}")))?
                    .adv_campaign_id
            }
            None => return Ok(Vec::new()),
        },
    };
    keys.into_iter()
        .map(|k| {
            String::from_utf8(k)
                .map(|k| (campaign.clone(), k))
                .map_err(|_| damaged("an entry's key is not UTF-8".into()))
        })
        .collect()
}

/// The rows of `pairs`, with their ids.
pub async fn lookup(
    client: &Client,
    pairs: &[(String, String)],
) -> Result<Vec<(i32, Draft)>, ReconcileError> {
    let statement = client.prepare(LOOKUP_SQL).await?;
    let mut out = Vec::new();
    for chunk in pairs.chunks(LOOKUP_BATCH) {
        let (campaigns, clients): (Vec<&str>, Vec<&str>) =
            chunk.iter().map(|(a, c)| (a.as_str(), c.as_str())).unzip();
        for r in client.query(&statement, &[&campaigns, &clients]).await? {
            out.push((r.get(0), view(&r).to_draft()));
        }
    }
    Ok(out)
}

/// The rows of `pairs` by pair (the first, should there be several).
pub async fn lookup_map(
    client: &Client,
    pairs: &[(String, String)],
) -> Result<HashMap<(String, String), Draft>, ReconcileError> {
    let mut map = HashMap::new();
    for (_, d) in lookup(client, pairs).await? {
        map.entry((d.adv_campaign_id.clone(), d.client_id.clone()))
            .or_insert(d);
    }
    Ok(map)
}

/// Inserts `drafts` as rows in one transaction, a pair already there left as it is, and adds
/// the pairs inserted to what their campaigns have reached (`campaign_runner_delivered`);
/// returns how many rows were inserted.
pub async fn insert(client: &mut Client, drafts: &[Draft]) -> Result<u64, ReconcileError> {
    let tx = client.transaction().await?;
    let statement = tx.prepare(REPAIR_SQL).await?;
    let mut inserted = 0;
    for chunk in drafts.chunks(BATCH) {
        let text = |f: fn(&Draft) -> &str| chunk.iter().map(f).collect::<Vec<&str>>();
        let int8 = |f: fn(&Draft) -> i64| chunk.iter().map(f).collect::<Vec<i64>>();
        let trigger = chunk
            .iter()
            .map(|d| {
                i32::try_from(d.trigger_datetime_created).map_err(|_| {
                    ReconcileError::TriggerOutOfRange {
                        adv_campaign_id: d.adv_campaign_id.clone(),
                        client_id: d.client_id.clone(),
                        value: d.trigger_datetime_created,
                    }
                })
            })
            .collect::<Result<Vec<i32>, _>>()?;
        inserted += tx
            .query_one(
                &statement,
                &[
                    &text(|d| &d.restaurant_id),
                    &text(|d| &d.adv_campaign_id),
                    &text(|d| &d.adv_campaign_content),
                    &text(|d| &d.adv_campaign_owner),
                    &text(|d| &d.adv_campaign_owner_contact),
                    &int8(|d| d.adv_campaign_datetime_start),
                    &int8(|d| d.adv_campaign_datetime_end),
                    &text(|d| &d.client_id),
                    &int8(|d| d.datetime_created),
                    &trigger,
                ],
            )
            .await?
            .get::<_, i64>(0) as u64;
    }
    tx.commit().await?;
    Ok(inserted)
}
