//! The campaign pipeline, run over dead letters: the messages of the dead-letter topic are
//! selected (time, reason, not replayed yet, before the end offsets seen at the start),
//! evaluated by the campaign pipeline's own worker with the chosen rules, and delivered by the
//! same delivery protocol (`delivery/`). What this adds to the campaign pipeline:
//!
//! - the replay ledger, one row per dead letter replayed, written in the unit's PostgreSQL
//!   transaction (`record_unit`): a dead letter another replay has replayed already is left
//!   out there, whatever this run's snapshot of the ledger said;
//! - the headers: drafts and new dead letters name the original source message (the dead
//!   letter's `source-*` headers), the new rules, and `replay-of` (the dead letter replayed).

use crate::delivery::{Evaluated, Kept, OutboxEntry, Outcome, Pipeline, Worker, WriteError};
use crate::events::{Events, SourcePos};
use crate::headers::{self, HeaderList};
use crate::pipelines::campaigns::cache::Snapshot;
use crate::pipelines::campaigns::schedule::RegistryOp;
use crate::pipelines::campaigns::{self, CampaignDelivery, CampaignWorker, Campaigns};
use crate::sandbox::RulesIdentity;
use rdkafka::message::{Headers, Message, OwnedMessage};
use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use tokio_postgres::{Client, Transaction};

const LEDGER_INSERT_SQL: &str = include_str!("sql/ledger_insert.sql");

/// The header of a replay's drafts and new dead letters: `topic/partition/offset` of the dead
/// letter replayed.
pub const REPLAY_OF: &str = "replay-of";

/// Skip reasons of dead letters the replay leaves alone (no ledger row).
pub const NOT_SELECTED: &str = "not_selected";
pub const ALREADY_REPLAYED: &str = "already_replayed";
pub const AFTER_END: &str = "after_end";

/// The headers a dead letter gets from the pipeline that dead-lettered it: a new dead letter
/// gets them anew (the original source position is carried over by [`Pipeline::provenance`]).
const DEAD_LETTER_HEADERS: &[&str] = &[
    headers::DLQ_REASON,
    headers::DLQ_DETAIL,
    headers::DLQ_FIELD,
    headers::SOURCE_TOPIC,
    headers::SOURCE_PARTITION,
    headers::SOURCE_OFFSET,
    headers::RULES_VERSION,
    headers::RULES_SHA256,
    REPLAY_OF,
];

/// Which dead letters a run replays.
#[derive(Debug, Clone, Default)]
pub struct Selection {
    /// Kafka timestamp at or after this (milliseconds).
    pub since_ms: Option<i64>,
    /// Kafka timestamp before this (milliseconds).
    pub until_ms: Option<i64>,
    /// `dlq-reason` one of these (empty: any).
    pub reasons: Vec<String>,
    /// Per partition, the end offset seen at the start: later messages are left alone.
    pub ends: HashMap<i32, i64>,
    /// Dead letters in the ledger when the run started.
    pub replayed: HashSet<(i32, i64)>,
}

/// What the worker saw (before delivery).
#[derive(Debug, Default)]
pub struct Seen {
    /// Dead letters before the end offsets.
    pub examined: AtomicU64,
    /// Of those, selected by time and reason.
    pub selected: AtomicU64,
    /// Of those, found in the ledger snapshot.
    pub already_replayed: AtomicU64,
}

impl Seen {
    pub fn get(c: &AtomicU64) -> u64 {
        c.load(Ordering::Relaxed)
    }
}

/// The value of header `name` of `msg`, as text.
pub fn header(msg: &OwnedMessage, name: &str) -> Option<String> {
    let hs = msg.headers()?;
    (0..hs.count())
        .filter_map(|i| hs.try_get(i))
        .find(|h| h.key == name)
        .and_then(|h| h.value)
        .map(|v| String::from_utf8_lossy(v).into_owned())
}

/// Evaluates dead letters: the selection, then the campaign pipeline's own evaluation.
#[derive(Debug)]
pub struct ReplayWorker {
    pub inner: CampaignWorker,
    pub selection: Selection,
    pub seen: Arc<Seen>,
}

impl ReplayWorker {
    /// Why `msg` is left alone, if it is.
    fn leave_alone(&self, msg: &OwnedMessage) -> Option<&'static str> {
        let s = &self.selection;
        if s.ends
            .get(&msg.partition())
            .is_none_or(|end| msg.offset() >= *end)
        {
            return Some(AFTER_END);
        }
        self.seen.examined.fetch_add(1, Ordering::Relaxed);
        let ts = msg.timestamp().to_millis();
        let in_time = s.since_ms.is_none_or(|t| ts.is_some_and(|ts| ts >= t))
            && s.until_ms.is_none_or(|t| ts.is_some_and(|ts| ts < t));
        let reason_ok = s.reasons.is_empty()
            || header(msg, headers::DLQ_REASON).is_some_and(|r| s.reasons.contains(&r));
        if !(in_time && reason_ok) {
            return Some(NOT_SELECTED);
        }
        self.seen.selected.fetch_add(1, Ordering::Relaxed);
        if s.replayed.contains(&(msg.partition(), msg.offset())) {
            self.seen.already_replayed.fetch_add(1, Ordering::Relaxed);
            return Some(ALREADY_REPLAYED);
        }
        None
    }
}

impl Worker for ReplayWorker {
    type Delivery = CampaignDelivery;
    type Held = RegistryOp;
    type Round = Arc<Snapshot>;

    fn refresh(&mut self) {
        self.inner.refresh()
    }

    fn rules(&self) -> &RulesIdentity {
        self.inner.rules()
    }

    fn evaluate(
        &mut self,
        payload: &[u8],
        round: &Arc<Snapshot>,
    ) -> Outcome<CampaignDelivery, RegistryOp> {
        self.inner.evaluate(payload, round)
    }

    fn evaluate_message(
        &mut self,
        msg: &OwnedMessage,
        max_message_bytes: usize,
        round: &Arc<Snapshot>,
    ) -> Outcome<CampaignDelivery, RegistryOp> {
        if let Some(reason) = self.leave_alone(msg) {
            return Outcome::skip(
                reason,
                format!("{}/{}/{}", msg.topic(), msg.partition(), msg.offset()),
            );
        }
        let mut outcome = self.inner.evaluate_message(msg, max_message_bytes, round);
        // A campaign kept in the registry belongs to the input partition it was first read
        // from (the dead letter's `source-*` headers), where its triggers go.
        if let Some(RegistryOp::Keep(e)) =
            crate::pipelines::campaigns::registry_op_mut(&mut outcome)
        {
            let source = (
                header(msg, headers::SOURCE_TOPIC),
                header(msg, headers::SOURCE_PARTITION).and_then(|p| p.parse().ok()),
                header(msg, headers::SOURCE_OFFSET).and_then(|o| o.parse().ok()),
            );
            if let (Some(topic), Some(partition), Some(offset)) = source {
                e.topic = topic;
                e.partition = partition;
                e.source_offset = offset;
            }
        }
        outcome
    }
}

/// The campaign pipeline over dead letters (see the module's documentation).
#[derive(Debug)]
pub struct ReplayPipeline {
    pub campaigns: Campaigns,
    pub rules: RulesIdentity,
    /// This run, in the ledger.
    pub run_id: String,
}

/// Whether a message's outcome is a replay (and gets a ledger row).
fn replayed<D, H>(outcome: &Outcome<D, H>) -> bool {
    !matches!(
        outcome,
        Outcome::Skip { reason, .. } if [NOT_SELECTED, ALREADY_REPLAYED, AFTER_END].contains(reason)
    )
}

impl Pipeline for ReplayPipeline {
    type Delivery = CampaignDelivery;
    type Held = RegistryOp;
    type Worker = ReplayWorker;
    type Round = Arc<Snapshot>;
    type Prepared = campaigns::Prepared;

    async fn round(&self) -> Arc<Snapshot> {
        self.campaigns.round().await
    }

    fn weight(d: &CampaignDelivery) -> usize {
        Campaigns::weight(d)
    }

    fn entry(&self, d: &CampaignDelivery, source_offset: i64, headers: HeaderList) -> OutboxEntry {
        self.campaigns.entry(d, source_offset, headers)
    }

    async fn prepare(&self, client: &Client) -> Result<campaigns::Prepared, tokio_postgres::Error> {
        self.campaigns.prepare(client).await
    }

    async fn write(
        &self,
        tx: &Transaction<'_>,
        prepared: &campaigns::Prepared,
        deliveries: &[(usize, &CampaignDelivery)],
        entries: &[OutboxEntry],
        careful: bool,
    ) -> Result<Vec<Kept>, WriteError> {
        self.campaigns
            .write(tx, prepared, deliveries, entries, careful)
            .await
    }

    fn delivered(
        &self,
        events: &Events,
        pos: &SourcePos,
        d: &CampaignDelivery,
        rules: &str,
        published: usize,
    ) {
        self.campaigns.delivered(events, pos, d, rules, published)
    }

    /// The original source position (the dead letter's `source-*` headers; the dead letter's
    /// own position when it has none), the new rules, and `replay-of`.
    fn provenance(&self, msg: &OwnedMessage, pos: &SourcePos, rules: &RulesIdentity) -> HeaderList {
        let mut out = crate::delivery::default_provenance(pos, rules);
        for (name, value) in out.iter_mut() {
            if [
                headers::SOURCE_TOPIC,
                headers::SOURCE_PARTITION,
                headers::SOURCE_OFFSET,
            ]
            .contains(&name.as_str())
            {
                if let Some(original) = header(msg, name) {
                    *value = original.into_bytes();
                }
            }
        }
        out.push((
            REPLAY_OF.to_string(),
            format!("{}/{}/{}", pos.topic, pos.partition, pos.offset).into_bytes(),
        ));
        out
    }

    /// The original message's headers: the dead letter's, less those its dead-lettering added.
    fn dead_letter_headers(&self, msg: &OwnedMessage) -> HeaderList {
        headers::of_message(msg)
            .into_iter()
            .filter(|(k, _)| !DEAD_LETTER_HEADERS.contains(&k.as_str()))
            .collect()
    }

    async fn record_unit(
        &self,
        tx: &Transaction<'_>,
        prepared: &campaigns::Prepared,
        unit: &[Evaluated<CampaignDelivery, RegistryOp>],
    ) -> Result<BTreeSet<usize>, WriteError> {
        let mut rows: Vec<usize> = Vec::new();
        let (mut offsets, mut outcomes, mut reasons, mut drafts) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for (i, e) in unit.iter().enumerate() {
            if !replayed(&e.outcome) {
                continue;
            }
            let (outcome, reason, n) = match &e.outcome {
                Outcome::Deliver(d) => ("delivered", None, d.drafts.len() as i32),
                Outcome::Skip { reason, .. } => ("skipped", Some(reason.to_string()), 0),
                Outcome::DeadLetter { code, .. } => ("dead_lettered", Some(code.clone()), 0),
            };
            rows.push(i);
            offsets.push(e.pos.offset);
            outcomes.push(outcome.to_string());
            reasons.push(reason);
            drafts.push(n);
        }
        let Some(first) = rows.first().map(|&i| &unit[i]) else {
            return Ok(BTreeSet::new());
        };
        let inserted = tx
            .query(
                LEDGER_INSERT_SQL,
                &[
                    &first.pos.topic,
                    &first.pos.partition,
                    &self.rules.version,
                    &self.rules.sha256,
                    &self.run_id,
                    &offsets,
                    &outcomes,
                    &reasons,
                    &drafts,
                ],
            )
            .await?;
        let new: HashSet<i64> = inserted.iter().map(|r| r.get(0)).collect();
        let left_out: BTreeSet<usize> = rows
            .into_iter()
            .filter(|&i| !new.contains(&unit[i].pos.offset))
            .collect();
        for &i in &left_out {
            tracing::info!(dead_letter = %unit[i].pos, "Dead letter replayed already by another run; left out.");
        }
        // The campaigns replayed now that are not over are kept in the pipeline's registry
        // (delivered at their start, and to subscribers added while they run).
        let ops: Vec<RegistryOp> = crate::pipelines::campaigns::registry_ops(
            unit.iter()
                .enumerate()
                .filter(|(i, _)| !left_out.contains(i))
                .map(|(_, e)| e),
        )
        .cloned()
        .collect();
        campaigns::schedule::registry::record(tx, &prepared.registry, &ops).await?;
        Ok(left_out)
    }
}
