//! The registry's side of a delivery unit: what each campaign message changes in
//! `campaign_runner_registry`, written in the unit's own PostgreSQL transaction, so that the
//! registry moves exactly with the input offsets (a unit consumed again writes the same rows).
//! The latest publication of a campaign wins: within a unit the last message about a campaign
//! decides, and across units the later unit overwrites.

use crate::delivery::WriteError;
use std::collections::BTreeMap;
use tokio_postgres::{Client, Statement, Transaction};

const KEEP_SQL: &str = include_str!("../sql/registry_keep.sql");
const FORGET_SQL: &str = include_str!("../sql/registry_forget.sql");
const REOPEN_SQL: &str = include_str!("../sql/registry_reopen.sql");

/// The registry's statements, prepared once per connection.
#[derive(Debug, Clone)]
pub struct Prepared {
    keep: Statement,
    forget: Statement,
    reopen: Statement,
}

pub async fn prepare(c: &Client) -> Result<Prepared, tokio_postgres::Error> {
    let (keep, forget, reopen) = futures::try_join!(
        c.prepare(KEEP_SQL),
        c.prepare(FORGET_SQL),
        c.prepare(REOPEN_SQL)
    )?;
    Ok(Prepared {
        keep,
        forget,
        reopen,
    })
}

/// A campaign as the registry keeps it: its latest publication (raw, as the rules will read
/// it again when it is triggered), where it was read, and the rules' window.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub adv_campaign_id: String,
    pub restaurant_id: String,
    pub topic: String,
    pub partition: i32,
    pub source_offset: i64,
    pub key: Option<Vec<u8>>,
    pub payload: Vec<u8>,
    pub opens: i64,
    pub closes: i64,
    /// Delivered to the subscribers of its start already (published while active).
    pub started: bool,
}

/// What one campaign message changes in the registry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RegistryOp {
    /// A valid campaign that is not over: kept (replacing an earlier publication).
    Keep(Entry),
    /// A campaign published again after its end: forgotten.
    Forget { adv_campaign_id: String },
    /// A scheduled start whose trigger was evaluated before the window opened (the clocks of
    /// the runner that triggered it and of the one that evaluated it disagree): triggered again
    /// later, unless the campaign was published again since.
    Reopen {
        adv_campaign_id: String,
        partition: i32,
        source_offset: i64,
    },
}

impl RegistryOp {
    fn campaign(&self) -> &str {
        match self {
            RegistryOp::Keep(e) => &e.adv_campaign_id,
            RegistryOp::Forget { adv_campaign_id }
            | RegistryOp::Reopen {
                adv_campaign_id, ..
            } => adv_campaign_id,
        }
    }
}

/// Writes a unit's registry changes, in its transaction. `ops` in the unit's order. Rows are
/// written in the order of their campaign ids, so that two units (two partitions) touching the
/// same campaigns take their locks in the same order.
pub async fn record<'a>(
    tx: &Transaction<'_>,
    prepared: &Prepared,
    ops: impl IntoIterator<Item = &'a RegistryOp>,
) -> Result<(), WriteError> {
    // The last word on each campaign; reopenings apply on top (they name the publication).
    let mut last: BTreeMap<&str, &RegistryOp> = BTreeMap::new();
    let mut reopen = (Vec::new(), Vec::new(), Vec::new());
    for op in ops {
        if let RegistryOp::Reopen {
            adv_campaign_id,
            partition,
            source_offset,
        } = op
        {
            reopen.0.push(adv_campaign_id.as_str());
            reopen.1.push(*partition);
            reopen.2.push(*source_offset);
            continue;
        }
        last.insert(op.campaign(), op);
    }
    let mut keep = KeepColumns::default();
    let mut forget: Vec<&str> = Vec::new();
    for op in last.into_values() {
        match op {
            RegistryOp::Keep(e) => keep.push(e),
            RegistryOp::Forget { adv_campaign_id } => forget.push(adv_campaign_id),
            RegistryOp::Reopen { .. } => {}
        }
    }
    if !keep.ids.is_empty() {
        tx.execute(
            &prepared.keep,
            &[
                &keep.ids,
                &keep.restaurants,
                &keep.topics,
                &keep.partitions,
                &keep.offsets,
                &keep.keys,
                &keep.payloads,
                &keep.opens,
                &keep.closes,
                &keep.started,
            ],
        )
        .await?;
    }
    if !forget.is_empty() {
        tx.execute(&prepared.forget, &[&forget]).await?;
    }
    if !reopen.0.is_empty() {
        tx.execute(&prepared.reopen, &[&reopen.0, &reopen.1, &reopen.2])
            .await?;
    }
    Ok(())
}

/// The kept entries as the columns `registry_keep.sql` unnests.
#[derive(Default)]
struct KeepColumns<'a> {
    ids: Vec<&'a str>,
    restaurants: Vec<&'a str>,
    topics: Vec<&'a str>,
    partitions: Vec<i32>,
    offsets: Vec<i64>,
    keys: Vec<Option<&'a [u8]>>,
    payloads: Vec<&'a [u8]>,
    opens: Vec<i64>,
    closes: Vec<i64>,
    started: Vec<bool>,
}

impl<'a> KeepColumns<'a> {
    fn push(&mut self, e: &'a Entry) {
        self.ids.push(&e.adv_campaign_id);
        self.restaurants.push(&e.restaurant_id);
        self.topics.push(&e.topic);
        self.partitions.push(e.partition);
        self.offsets.push(e.source_offset);
        self.keys.push(e.key.as_deref());
        self.payloads.push(&e.payload);
        self.opens.push(e.opens);
        self.closes.push(e.closes);
        self.started.push(e.started);
    }
}
