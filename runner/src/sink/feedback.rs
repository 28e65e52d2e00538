//! The PostgreSQL side of delivery. One transaction per run of a partition's messages:
//! check that this runner still owns the partition (fence), insert the drafts idempotently
//! (binary COPY straight into the table, whose unique index refuses a pair already there; if it
//! does, a COPY into a staging table and `INSERT … ON CONFLICT DO NOTHING RETURNING` instead),
//! and put what must reach Kafka — the drafts that were new, the dead letters — in the outbox,
//! from which it is published and then deleted once Kafka's transaction committed.

use super::{pause, Abandoned, Backoff};
use crate::db::{self, DbError};
use crate::events::Events;
use crate::rules::Drafts;
use futures::{pin_mut, TryStreamExt};
use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;
use tokio_postgres::binary_copy::BinaryCopyInWriter;
use tokio_postgres::error::SqlState;
use tokio_postgres::types::{ToSql, Type};
use tokio_postgres::{Client, Statement};

const STAGE_SQL: &str = include_str!("../../sql/feedback_stage.sql");
const COPY_SQL: &str = include_str!("../../sql/copy_feedback.sql");
const INSERT_SQL: &str = include_str!("../../sql/feedback_insert.sql");
const COPY_DIRECT_SQL: &str = "COPY public.subscribers_feedback (restaurant_id, adv_campaign_id, \
    adv_campaign_content, adv_campaign_owner, adv_campaign_owner_contact, \
    adv_campaign_datetime_start, adv_campaign_datetime_end, datetime_created, client_id, \
    trigger_datetime_created) FROM STDIN (FORMAT binary)";
const FENCE_SQL: &str = "SELECT epoch FROM public.campaign_runner_fences \
    WHERE topic = $1 AND partition = $2 FOR UPDATE";
const COPY_OUTBOX_SQL: &str = "COPY public.campaign_runner_outbox \
    (topic, partition, source_offset, target, keys, payloads, drafts, headers) \
    FROM STDIN (FORMAT binary)";

const DELETE_OUTBOX_SQL: &str = "DELETE FROM public.campaign_runner_outbox \
    WHERE topic = $1 AND partition = $2 AND source_offset <= $3";

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
const OUTBOX_TYPES: [Type; 8] = [
    Type::TEXT,
    Type::INT4,
    Type::INT8,
    Type::TEXT,
    Type::BYTEA_ARRAY,
    Type::BYTEA_ARRAY,
    Type::BYTEA,
    Type::BYTEA,
];

/// One feedback row, borrowed from the batch's results. `feedback` stays NULL.
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

/// Where an outbox entry goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    Drafts,
    DeadLetters,
}

impl Target {
    fn as_str(self) -> &'static str {
        match self {
            Target::Drafts => "drafts",
            Target::DeadLetters => "dead_letters",
        }
    }
}

/// What one source message sends to Kafka: its drafts (one record per client) or its dead
/// letter, all with the same headers.
#[derive(Debug, Clone)]
pub struct OutboxEntry {
    pub source_offset: i64,
    pub target: Target,
    pub records: Records,
    pub headers: Vec<(String, Vec<u8>)>,
}

/// The records of an outbox entry.
#[derive(Debug, Clone)]
pub enum Records {
    /// A campaign's drafts as the rules shaped them: record i is client i's draft, keyed by the
    /// client id. The outbox stores them as their template ([`Drafts::encode`]).
    Drafts(Arc<Drafts>),
    /// Records given whole: a dead letter, or entries read back from the outbox.
    Raw {
        keys: Vec<Option<Vec<u8>>>,
        payloads: Vec<Option<Vec<u8>>>,
    },
}

impl Records {
    pub fn len(&self) -> usize {
        match self {
            Records::Drafts(d) => d.len(),
            Records::Raw { payloads, .. } => payloads.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Record `i`'s key and value.
    ///
    /// # Panics
    /// If `i` is not below [`Records::len`].
    pub fn get(&self, i: usize) -> (Option<&[u8]>, Option<&[u8]>) {
        match self {
            Records::Drafts(d) => {
                let d = d.get(i).expect("record index below len");
                (Some(d.client_id.as_bytes()), Some(d.payload))
            }
            Records::Raw { keys, payloads } => (keys[i].as_deref(), payloads[i].as_deref()),
        }
    }
}

impl OutboxEntry {
    /// Record `i`'s key and value.
    pub fn record(&self, i: usize) -> (Option<&[u8]>, Option<&[u8]>) {
        self.records.get(i)
    }
}

/// This runner's claim on an input partition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fence {
    pub topic: String,
    pub partition: i32,
    pub epoch: i64,
}

#[derive(Debug, thiserror::Error)]
pub enum CommitError {
    #[error("another runner owns {topic}/{partition} now (our epoch {epoch})")]
    Fenced {
        topic: String,
        partition: i32,
        epoch: i64,
    },
    #[error(transparent)]
    Abandoned(#[from] Abandoned),
}

/// Encodes headers as: count (u16), then per header key length (u16), key, value length (u32),
/// value.
pub fn encode_headers(headers: &[(String, Vec<u8>)]) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(&(headers.len() as u16).to_be_bytes());
    for (k, v) in headers {
        out.extend_from_slice(&(k.len() as u16).to_be_bytes());
        out.extend_from_slice(k.as_bytes());
        out.extend_from_slice(&(v.len() as u32).to_be_bytes());
        out.extend_from_slice(v);
    }
    out
}

pub fn decode_headers(mut b: &[u8]) -> Option<Vec<(String, Vec<u8>)>> {
    fn take<'a>(b: &mut &'a [u8], n: usize) -> Option<&'a [u8]> {
        if b.len() < n {
            return None;
        }
        let (h, t) = b.split_at(n);
        *b = t;
        Some(h)
    }
    let count = u16::from_be_bytes(take(&mut b, 2)?.try_into().ok()?);
    let mut out = Vec::with_capacity(count as usize);
    for _ in 0..count {
        let kl = u16::from_be_bytes(take(&mut b, 2)?.try_into().ok()?) as usize;
        let k = String::from_utf8(take(&mut b, kl)?.to_vec()).ok()?;
        let vl = u32::from_be_bytes(take(&mut b, 4)?.try_into().ok()?) as usize;
        out.push((k, take(&mut b, vl)?.to_vec()));
    }
    Some(out)
}

/// Runs `$op` (an expression using the connection `$c`) until it succeeds, is fenced, or the
/// runner stops; transient failures are retried with backoff on a fresh connection.
macro_rules! retrying {
    ($self:ident, $what:expr, $events:expr, $max:expr, $stop:expr, |$c:ident| $op:expr) => {{
        let mut backoff = Backoff::new($max);
        loop {
            let attempt: Result<_, OpError> = match $self.client().await {
                Ok($c) => $op.await,
                Err(e) => Err(OpError::Db(e)),
            };
            match attempt {
                Ok(v) => break Ok(v),
                Err(e) => {
                    $self
                        .after_failure(e, $what, &mut backoff, $events, $stop)
                        .await?
                }
            }
        }
    }};
}

#[derive(Debug)]
pub struct FeedbackSink {
    url: String,
    client: Option<Client>,
    /// The unit transaction's statements, prepared on `client` (None until first needed, and
    /// again whenever the connection is replaced).
    statements: Option<Statements>,
}

/// Statements a unit's transaction runs, prepared once per connection: each saves the round
/// trip that parsing it would cost every time.
#[derive(Debug, Clone)]
struct Statements {
    fence: Statement,
    delete_outbox: Statement,
    copy_direct: Statement,
    copy_outbox: Statement,
}

impl FeedbackSink {
    pub fn new(url: String) -> Self {
        FeedbackSink {
            url,
            client: None,
            statements: None,
        }
    }

    /// Connects and prepares now, so that the first unit does not pay for it.
    pub async fn warm_up(&mut self) -> Result<(), DbError> {
        self.prepared().await.map(|_| ())
    }

    /// The connection, with the unit statements prepared on it.
    async fn prepared(&mut self) -> Result<(&mut Client, Statements), DbError> {
        if self.client.as_ref().is_none_or(|c| c.is_closed()) {
            self.statements = None;
        }
        let cached = self.statements.clone();
        let c = self.client().await?;
        let statements = match cached {
            Some(s) => s,
            None => {
                let (fence, delete_outbox, copy_direct, copy_outbox) = futures::try_join!(
                    c.prepare(FENCE_SQL),
                    c.prepare(DELETE_OUTBOX_SQL),
                    c.prepare(COPY_DIRECT_SQL),
                    c.prepare(COPY_OUTBOX_SQL),
                )
                .map_err(DbError::from_pg)?;
                let s = Statements {
                    fence,
                    delete_outbox,
                    copy_direct,
                    copy_outbox,
                };
                self.statements = Some(s.clone());
                s
            }
        };
        let c = self.client.as_mut().expect("connected above");
        Ok((c, statements))
    }

    /// Another sink to the same database, with its own connection (made when first used).
    pub fn clone_unconnected(&self) -> Self {
        FeedbackSink::new(self.url.clone())
    }

    async fn client(&mut self) -> Result<&mut Client, DbError> {
        let c = match self.client.take().filter(|c| !c.is_closed()) {
            Some(c) => c,
            None => {
                let c = db::connect(&self.url).await?;
                c.batch_execute("SET client_min_messages = warning")
                    .await
                    .map_err(DbError::from_pg)?;
                c
            }
        };
        Ok(self.client.insert(c))
    }

    /// Handles a failed attempt: Err when fenced or stopping, Ok(()) to try again after the
    /// backoff (with a fresh connection).
    async fn after_failure(
        &mut self,
        e: OpError,
        what: &'static str,
        backoff: &mut Backoff,
        events: &Events,
        stop: &mut tokio::sync::watch::Receiver<bool>,
    ) -> Result<(), CommitError> {
        match e {
            OpError::AlreadyThere => Ok(()),
            OpError::Fenced(f) => Err(CommitError::Fenced {
                topic: f.topic,
                partition: f.partition,
                epoch: f.epoch,
            }),
            OpError::Db(e) => {
                if !e.is_transient() {
                    tracing::error!(error = %e, what, "PostgreSQL refused the write; an operator must act. Retrying so nothing is lost.");
                }
                self.client = None;
                self.statements = None;
                let wait = backoff.step();
                events.sink_retry("postgres", &e, backoff.attempt, wait);
                if pause(wait, stop).await {
                    Ok(())
                } else {
                    Err(Abandoned.into())
                }
            }
        }
    }

    /// Takes ownership of a partition: bumps its epoch, which fences any earlier owner.
    pub async fn claim(
        &mut self,
        topic: &str,
        partition: i32,
        owner: &str,
        events: &Events,
        max_backoff: Duration,
        stop: &mut tokio::sync::watch::Receiver<bool>,
    ) -> Result<Fence, CommitError> {
        let (topic, owner) = (topic.to_string(), owner.to_string());
        retrying!(self, "claim", events, max_backoff, stop, |c| async {
            let row = c
                .query_one(
                    "INSERT INTO public.campaign_runner_fences (topic, partition, epoch, owner) VALUES ($1, $2, 1, $3) \
                     ON CONFLICT (topic, partition) DO UPDATE SET epoch = campaign_runner_fences.epoch + 1, owner = EXCLUDED.owner \
                     RETURNING epoch",
                    &[&topic, &partition, &owner],
                )
                .await
                .map_err(|e| OpError::Db(DbError::from_pg(e)))?;
            Ok(Fence {
                topic: topic.clone(),
                partition,
                epoch: row.get(0),
            })
        })
    }

    /// The outbox of a partition, oldest first.
    pub async fn load_outbox(
        &mut self,
        fence: &Fence,
        events: &Events,
        max_backoff: Duration,
        stop: &mut tokio::sync::watch::Receiver<bool>,
    ) -> Result<Vec<OutboxEntry>, CommitError> {
        let f = fence.clone();
        retrying!(self, "load outbox", events, max_backoff, stop, |c| async {
            let rows = c
                .query(
                    "SELECT source_offset, target, keys, payloads, drafts, headers FROM public.campaign_runner_outbox \
                     WHERE topic = $1 AND partition = $2 ORDER BY source_offset, id",
                    &[&f.topic, &f.partition],
                )
                .await
                .map_err(|e| OpError::Db(DbError::from_pg(e)))?;
            rows.iter().map(stored_entry).collect::<Result<Vec<_>, _>>()
        })
    }

    /// Deletes a partition's outbox entries up to `through` (their Kafka transaction committed).
    pub async fn delete_outbox(
        &mut self,
        fence: &Fence,
        through: i64,
        events: &Events,
        max_backoff: Duration,
        stop: &mut tokio::sync::watch::Receiver<bool>,
    ) -> Result<(), CommitError> {
        let f = fence.clone();
        retrying!(
            self,
            "delete outbox",
            events,
            max_backoff,
            stop,
            |c| async {
                c.execute(DELETE_OUTBOX_SQL, &[&f.topic, &f.partition, &through])
                    .await
                    .map_err(|e| OpError::Db(DbError::from_pg(e)))?;
                Ok(())
            }
        )
    }

    /// In one transaction: fence check, idempotent insert of `rows`, and the outbox entries of
    /// what must be published. Draft entries keep only the drafts that were new. Returns what
    /// was written to the outbox. `published_through`: the partition's outbox entries up
    /// to that offset were published (their Kafka transaction committed) and are deleted in the
    /// same transaction, so that cleanup costs no round trip of its own.
    #[allow(clippy::too_many_arguments)]
    pub async fn commit(
        &mut self,
        fence: &Fence,
        rows: &[FeedbackRow<'_>],
        entries: &[OutboxEntry],
        published_through: Option<i64>,
        events: &Events,
        max_backoff: Duration,
        stop: &mut tokio::sync::watch::Receiver<bool>,
    ) -> Result<Vec<Kept>, CommitError> {
        let mut backoff = Backoff::new(max_backoff);
        let mut direct = true;
        loop {
            let attempt = match self.prepared().await {
                Ok((c, st)) => {
                    commit_once(c, &st, fence, rows, entries, published_through, direct).await
                }
                Err(e) => Err(OpError::Db(e)),
            };
            match attempt {
                Ok(kept) => break Ok(kept),
                // Some draft is in the table already: again, keeping only the new ones.
                Err(OpError::AlreadyThere) => direct = false,
                Err(e) => {
                    self.after_failure(e, "commit", &mut backoff, events, stop)
                        .await?
                }
            }
        }
    }
}

enum OpError {
    Db(DbError),
    Fenced(Fence),
    /// The direct COPY met a (campaign, client) pair already in the table.
    AlreadyThere,
}

impl From<tokio_postgres::Error> for OpError {
    fn from(e: tokio_postgres::Error) -> Self {
        OpError::Db(DbError::from_pg(e))
    }
}

/// Which of a unit's outbox entries must be published, and which of their records: an entry of
/// drafts keeps only the drafts that were new (a draft already in the table was published
/// before). Indexes into the entries given to [`FeedbackSink::commit`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Kept {
    pub entry: usize,
    /// None: every record of the entry.
    pub only: Option<Vec<usize>>,
}

impl Kept {
    /// Every record of every entry.
    pub fn all(entries: &[OutboxEntry]) -> Vec<Kept> {
        (0..entries.len())
            .map(|entry| Kept { entry, only: None })
            .collect()
    }

    /// The indexes of the records kept of `e` (this `Kept`'s entry).
    pub fn records<'k>(&'k self, e: &OutboxEntry) -> Box<dyn Iterator<Item = usize> + 'k> {
        match &self.only {
            None => Box::new(0..e.records.len()),
            Some(v) => Box::new(v.iter().copied()),
        }
    }
}

/// An outbox row read back: its records whole (drafts stored as their template are rendered).
/// A row that cannot be read is an operator's problem, never skipped: the read is retried.
fn stored_entry(r: &tokio_postgres::Row) -> Result<OutboxEntry, OpError> {
    let damaged = |detail: String| {
        OpError::Db(DbError::Schema {
            table: "campaign_runner_outbox",
            detail,
        })
    };
    let source_offset: i64 = r.get(0);
    let headers = decode_headers(r.get(5)).ok_or_else(|| {
        damaged(format!(
            "the headers of the entry at source offset {source_offset} cannot be decoded"
        ))
    })?;
    let records = match r.get::<_, Option<&[u8]>>(4) {
        Some(stored) => {
            let (keys, payloads) = Drafts::decode(stored)
                .map_err(|e| damaged(format!("entry at source offset {source_offset}: {e}")))?
                .into_iter()
                .map(|(k, p)| (Some(k), Some(p)))
                .unzip();
            Records::Raw { keys, payloads }
        }
        None => Records::Raw {
            keys: r.get(2),
            payloads: r.get(3),
        },
    };
    Ok(OutboxEntry {
        source_offset,
        target: if r.get::<_, &str>(1) == "drafts" {
            Target::Drafts
        } else {
            Target::DeadLetters
        },
        records,
        headers,
    })
}

/// Streams `rows` into a binary COPY.
async fn copy_rows<S: tokio_postgres::ToStatement + ?Sized>(
    tx: &tokio_postgres::Transaction<'_>,
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

/// A bytea[] column's values.
type Column<'a> = Vec<Option<&'a [u8]>>;

/// One attempt at a unit's transaction. `direct`: COPY the drafts straight into the table,
/// which the unique index refuses as a whole if any (campaign, client) pair is there already (a
/// replay, a campaign published twice): the attempt then fails with `AlreadyThere` and the
/// next one goes through the staging table and `INSERT … ON CONFLICT DO NOTHING`.
async fn commit_once(
    client: &mut Client,
    st: &Statements,
    fence: &Fence,
    rows: &[FeedbackRow<'_>],
    entries: &[OutboxEntry],
    published_through: Option<i64>,
    direct: bool,
) -> Result<Vec<Kept>, OpError> {
    let tx = client.transaction().await?;
    // Sent together (one round trip): if the fence check fails the cleanup is rolled back.
    let fence_params: [&(dyn ToSql + Sync); 2] = [&fence.topic, &fence.partition];
    let check = tx.query_opt(&st.fence, &fence_params);
    let cleanup = async {
        match published_through {
            Some(through) => tx
                .execute(
                    &st.delete_outbox,
                    &[&fence.topic, &fence.partition, &through],
                )
                .await
                .map(Some),
            None => Ok(None),
        }
    };
    let (current, _) = futures::try_join!(check, cleanup)?;
    if current.map(|r| r.get::<_, i64>(0)) != Some(fence.epoch) {
        return Err(OpError::Fenced(fence.clone()));
    }
    let kept = if rows.is_empty() {
        Kept::all(entries)
    } else if direct {
        match copy_rows(&tx, &st.copy_direct, rows).await {
            Ok(()) => Kept::all(entries),
            Err(e) if e.code() == Some(&SqlState::UNIQUE_VIOLATION) => {
                return Err(OpError::AlreadyThere)
            }
            Err(e) => return Err(e.into()),
        }
    } else {
        insert_new_only(&tx, rows, entries).await?
    };
    if !kept.is_empty() {
        let sink = tx.copy_in(&st.copy_outbox).await?;
        let writer = BinaryCopyInWriter::new(sink, &OUTBOX_TYPES);
        pin_mut!(writer);
        for k in &kept {
            let e = &entries[k.entry];
            let headers = encode_headers(&e.headers);
            // A campaign's drafts, all kept, are stored as their template (a tenth of the
            // bytes); anything else record by record.
            let (keys, payloads, drafts): (Column<'_>, Column<'_>, _) = match (&e.records, &k.only)
            {
                (Records::Drafts(d), None) => (Vec::new(), Vec::new(), Some(d.encode())),
                _ => {
                    let (keys, payloads) = k.records(e).map(|i| e.record(i)).unzip();
                    (keys, payloads, None)
                }
            };
            let values: [&(dyn ToSql + Sync); 8] = [
                &fence.topic,
                &fence.partition,
                &e.source_offset,
                &e.target.as_str(),
                &keys,
                &payloads,
                &drafts,
                &headers,
            ];
            writer.as_mut().write(&values).await?;
        }
        writer.finish().await?;
    }
    tx.commit().await?;
    Ok(kept)
}

/// Inserts only the drafts whose (campaign, client) pair is not in the table, and keeps, of
/// each entry, the drafts that were new. Each new pair goes to the first entry that has it
/// (the same campaign twice in one unit).
async fn insert_new_only(
    tx: &tokio_postgres::Transaction<'_>,
    rows: &[FeedbackRow<'_>],
    entries: &[OutboxEntry],
) -> Result<Vec<Kept>, OpError> {
    tx.batch_execute(STAGE_SQL).await?;
    copy_rows(tx, COPY_SQL, rows).await?;
    let mut new_pairs: HashSet<(String, String)> = HashSet::new();
    let inserted = tx.query_raw(INSERT_SQL, std::iter::empty::<i32>()).await?;
    pin_mut!(inserted);
    while let Some(row) = inserted.try_next().await? {
        new_pairs.insert((row.get(0), row.get(1)));
    }
    Ok(entries
        .iter()
        .enumerate()
        .filter_map(|(entry, e)| match &e.records {
            Records::Drafts(d) => {
                let campaign = &d.campaign.adv_campaign_id;
                let only: Vec<usize> = d
                    .iter()
                    .enumerate()
                    .filter(|(_, draft)| {
                        new_pairs.remove(&(campaign.clone(), draft.client_id.to_string()))
                    })
                    .map(|(i, _)| i)
                    .collect();
                (!only.is_empty()).then_some(Kept {
                    entry,
                    only: (only.len() < d.len()).then_some(only),
                })
            }
            Records::Raw { .. } => Some(Kept { entry, only: None }),
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_round_trip() {
        let h = vec![
            ("a".to_string(), b"1".to_vec()),
            ("dlq-detail".to_string(), vec![0, 255, 10]),
            ("e".into(), vec![]),
        ];
        assert_eq!(decode_headers(&encode_headers(&h)), Some(h));
        assert_eq!(
            decode_headers(&[0, 1, 0]),
            None,
            "truncated input is refused"
        );
    }
}
