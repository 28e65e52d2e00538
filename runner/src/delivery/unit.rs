//! The PostgreSQL side of delivery. One transaction per unit (a run of one partition's
//! messages): check that this runner still owns the partition (fence), let the pipeline write
//! its rows idempotently and say which of the unit's records are new, put what must reach Kafka
//! — those records and the dead letters — in the outbox, and delete the outbox entries the
//! partition's earlier units published. A COMMIT whose answer is lost (the connection broke)
//! is settled by the token each attempt writes in the fence row: the next attempt reads it
//! back before writing anything again. Also the steps of taking a partition over: claiming it
//! (a new fence epoch), reading its outbox, deleting published entries.

use super::outbox::{self, Kept, OutboxEntry, Target};
use super::{Evaluated, Outcome, Pipeline};
use crate::db::{self, DbError, FailureClass};
use crate::events::Events;
use crate::retry::{Abandoned, Backoff};
use futures::future::BoxFuture;
use futures::pin_mut;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tokio_postgres::binary_copy::BinaryCopyInWriter;
use tokio_postgres::types::{ToSql, Type};
use tokio_postgres::{Client, Statement};

const SCHEMA_SQL: &str = include_str!("sql/schema.sql");
const FENCE_CHECK_SQL: &str = include_str!("sql/fence_check.sql");
const COMMIT_CHECK_SQL: &str = include_str!("sql/commit_check.sql");
const CLAIM_SQL: &str = include_str!("sql/claim.sql");
const OUTBOX_LOAD_SQL: &str = include_str!("sql/outbox_load.sql");
const OUTBOX_DELETE_SQL: &str = include_str!("sql/outbox_delete.sql");
const OUTBOX_COPY_SQL: &str = include_str!("sql/outbox_copy.sql");

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

/// The delivery protocol's statements for one pipeline's tables (`{prefix}_outbox`,
/// `{prefix}_fences`).
#[derive(Debug, Clone)]
pub struct Tables {
    pub prefix: String,
    schema: String,
    fence_check: String,
    commit_check: String,
    claim: String,
    outbox_load: String,
    outbox_delete: String,
    outbox_copy: String,
}

impl Tables {
    /// `prefix` names the tables; it must be a plain SQL identifier.
    pub fn new(prefix: &str) -> Tables {
        assert!(
            !prefix.is_empty()
                && prefix
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_'),
            "a table prefix is a lowercase SQL identifier: {prefix:?}"
        );
        let sql = |s: &str| s.replace("{prefix}", prefix);
        Tables {
            prefix: prefix.to_string(),
            schema: sql(SCHEMA_SQL),
            fence_check: sql(FENCE_CHECK_SQL),
            commit_check: sql(COMMIT_CHECK_SQL),
            claim: sql(CLAIM_SQL),
            outbox_load: sql(OUTBOX_LOAD_SQL),
            outbox_delete: sql(OUTBOX_DELETE_SQL),
            outbox_copy: sql(OUTBOX_COPY_SQL),
        }
    }

    /// Creates the tables when absent (serialised between runners starting together).
    pub async fn ensure(&self, client: &Client) -> Result<(), DbError> {
        db::run_schema_script(client, &self.schema).await
    }
}

/// This runner's claim on an input partition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fence {
    pub topic: String,
    pub partition: i32,
    pub epoch: i64,
}

impl Fence {
    fn args(&self, through: i64) -> OpArgs<'_> {
        OpArgs {
            topic: &self.topic,
            partition: self.partition,
            owner: "",
            through,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CommitError {
    #[error("another runner owns {topic}/{partition} now (our epoch {epoch})")]
    Fenced {
        topic: String,
        partition: i32,
        epoch: i64,
    },
    /// PostgreSQL refused the unit for the content of what one of its messages came to (a
    /// data exception or a constraint): the unit is tried again message by message, and the
    /// message it refuses is dead-lettered (`sink_refused`).
    #[error("PostgreSQL refused the unit's rows: {0}")]
    Refused(DbError),
    #[error(transparent)]
    Abandoned(#[from] Abandoned),
}

/// How the pipeline's part of a unit's transaction failed.
#[derive(Debug)]
pub enum WriteError {
    /// A row is there already (a replay, a message published twice): the transaction is tried
    /// again with `careful` set, and the pipeline then keeps only what is new.
    AlreadyThere,
    Db(tokio_postgres::Error),
}

impl From<tokio_postgres::Error> for WriteError {
    fn from(e: tokio_postgres::Error) -> Self {
        WriteError::Db(e)
    }
}

enum OpError {
    Db(DbError),
    Fenced(Fence),
    AlreadyThere,
    /// The connection broke while the unit's COMMIT was in flight: the transaction may or may
    /// not have committed. `kept` is what it would have committed, under `token`.
    CommitUnknown {
        cause: DbError,
        token: String,
        kept: Vec<Kept>,
    },
}

impl From<tokio_postgres::Error> for OpError {
    fn from(e: tokio_postgres::Error) -> Self {
        OpError::Db(DbError::from_pg(e))
    }
}

impl From<WriteError> for OpError {
    fn from(e: WriteError) -> Self {
        match e {
            WriteError::AlreadyThere => OpError::AlreadyThere,
            WriteError::Db(e) => e.into(),
        }
    }
}

/// Statements a unit's transaction runs, prepared once per connection: each saves the round
/// trip that parsing it would cost every time.
#[derive(Debug, Clone)]
struct Statements<P: Clone> {
    fence: Statement,
    delete_outbox: Statement,
    copy_outbox: Statement,
    pipeline: P,
}

/// One connection's worth of the PostgreSQL side, for pipeline `P`.
pub struct PgSide<P: Pipeline> {
    url: String,
    tables: Arc<Tables>,
    pipeline: Arc<P>,
    client: Option<Client>,
    /// The unit transaction's statements, prepared on `client` (None until first needed, and
    /// again whenever the connection is replaced).
    statements: Option<Statements<P::Prepared>>,
}

impl<P: Pipeline> std::fmt::Debug for PgSide<P> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgSide")
            .field("tables", &self.tables.prefix)
            .finish_non_exhaustive()
    }
}

/// What an operation of a takeover is about.
#[derive(Debug, Default)]
struct OpArgs<'a> {
    topic: &'a str,
    partition: i32,
    owner: &'a str,
    through: i64,
}

/// An operation of a takeover, retried as a whole.
type Op<T> =
    for<'c> fn(&'c Client, &'c Tables, &'c OpArgs<'c>) -> BoxFuture<'c, Result<T, OpError>>;

impl<P: Pipeline> PgSide<P> {
    pub fn new(url: String, tables: Arc<Tables>, pipeline: Arc<P>) -> Self {
        PgSide {
            url,
            tables,
            pipeline,
            client: None,
            statements: None,
        }
    }

    /// Another side on the same database, with its own connection (made when first used).
    pub fn clone_unconnected(&self) -> Self {
        PgSide::new(self.url.clone(), self.tables.clone(), self.pipeline.clone())
    }

    /// Connects and prepares now, so that the first unit does not pay for it.
    pub async fn warm_up(&mut self) -> Result<(), DbError> {
        self.prepared().await.map(|_| ())
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

    /// The connection, with the unit statements prepared on it.
    async fn prepared(&mut self) -> Result<(&mut Client, Statements<P::Prepared>), DbError> {
        if self.client.as_ref().is_none_or(|c| c.is_closed()) {
            self.statements = None;
        }
        let cached = self.statements.clone();
        let tables = self.tables.clone();
        let pipeline = self.pipeline.clone();
        let c = self.client().await?;
        let statements = match cached {
            Some(s) => s,
            None => {
                let (fence, delete_outbox, copy_outbox, pipeline) = futures::try_join!(
                    c.prepare(&tables.fence_check),
                    c.prepare(&tables.outbox_delete),
                    c.prepare(&tables.outbox_copy),
                    pipeline.prepare(c),
                )
                .map_err(DbError::from_pg)?;
                let s = Statements {
                    fence,
                    delete_outbox,
                    copy_outbox,
                    pipeline,
                };
                self.statements = Some(s.clone());
                s
            }
        };
        let c = self.client.as_mut().expect("connected above");
        Ok((c, statements))
    }

    /// Handles a failed attempt: Err when fenced or stopping, Ok(()) to try again after the
    /// backoff (with a fresh connection).
    async fn after_failure(
        &mut self,
        e: OpError,
        what: &'static str,
        backoff: &mut Backoff,
        events: &Events,
        stop: &mut watch::Receiver<bool>,
    ) -> Result<(), CommitError> {
        let e = match e {
            OpError::CommitUnknown { cause, .. } => OpError::Db(cause),
            e => e,
        };
        match e {
            OpError::AlreadyThere | OpError::CommitUnknown { .. } => Ok(()),
            OpError::Fenced(f) => Err(CommitError::Fenced {
                topic: f.topic,
                partition: f.partition,
                epoch: f.epoch,
            }),
            OpError::Db(e) => {
                let class = e.class();
                if class == FailureClass::Content && what == "commit" {
                    return Err(CommitError::Refused(e));
                }
                self.client = None;
                self.statements = None;
                if class == FailureClass::Transient {
                    backoff
                        .wait(stop, |attempt, pause| {
                            events.sink_retry("postgres", &e, attempt, pause)
                        })
                        .await?;
                } else {
                    // Nothing the runner can do: said once a minute, retried slowly, so that the
                    // partition goes on by itself once an operator has acted.
                    events.sink_blocked("postgres", &e, e.sqlstate());
                    backoff.wait(stop, |_, _| {}).await?;
                }
                Ok(())
            }
        }
    }

    /// Runs `op` until it succeeds, is fenced, or the runner stops; transient failures are
    /// retried with backoff on a fresh connection.
    async fn retrying<T>(
        &mut self,
        what: &'static str,
        op: Op<T>,
        args: OpArgs<'_>,
        events: &Events,
        max_backoff: Duration,
        stop: &mut watch::Receiver<bool>,
    ) -> Result<T, CommitError> {
        let mut backoff = Backoff::new(max_backoff);
        let tables = self.tables.clone();
        loop {
            let attempt = match self.client().await {
                Ok(c) => op(c, &tables, &args).await,
                Err(e) => Err(OpError::Db(e)),
            };
            match attempt {
                Ok(v) => return Ok(v),
                Err(e) => {
                    self.after_failure(e, what, &mut backoff, events, stop)
                        .await?
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
        stop: &mut watch::Receiver<bool>,
    ) -> Result<Fence, CommitError> {
        let args = OpArgs {
            topic,
            partition,
            owner,
            through: 0,
        };
        self.retrying(
            "claim",
            |c, t, a| {
                Box::pin(async move {
                    let row = c
                        .query_one(&t.claim, &[&a.topic, &a.partition, &a.owner])
                        .await?;
                    Ok(Fence {
                        topic: a.topic.to_string(),
                        partition: a.partition,
                        epoch: row.get(0),
                    })
                })
            },
            args,
            events,
            max_backoff,
            stop,
        )
        .await
    }

    /// The outbox of a partition, oldest first. A row that cannot be read is an operator's
    /// problem, never skipped: the read is retried.
    pub async fn load_outbox(
        &mut self,
        fence: &Fence,
        events: &Events,
        max_backoff: Duration,
        stop: &mut watch::Receiver<bool>,
    ) -> Result<Vec<OutboxEntry>, CommitError> {
        self.retrying(
            "load outbox",
            |c, t, a| {
                Box::pin(async move {
                    let rows = c.query(&t.outbox_load, &[&a.topic, &a.partition]).await?;
                    rows.iter()
                        .map(|r| {
                            outbox::read_row(r).map_err(|detail| {
                                OpError::Db(DbError::Schema {
                                    table: "outbox",
                                    detail,
                                })
                            })
                        })
                        .collect()
                })
            },
            fence.args(0),
            events,
            max_backoff,
            stop,
        )
        .await
    }

    /// Deletes a partition's outbox entries up to `through` (their Kafka transaction committed).
    pub async fn delete_outbox(
        &mut self,
        fence: &Fence,
        through: i64,
        events: &Events,
        max_backoff: Duration,
        stop: &mut watch::Receiver<bool>,
    ) -> Result<(), CommitError> {
        self.retrying(
            "delete outbox",
            |c, t, a| {
                Box::pin(async move {
                    c.execute(&t.outbox_delete, &[&a.topic, &a.partition, &a.through])
                        .await?;
                    Ok(())
                })
            },
            fence.args(through),
            events,
            max_backoff,
            stop,
        )
        .await
    }

    /// In one transaction: fence check, the pipeline's idempotent write of the unit, and the
    /// outbox entries of what must be published. Returns what was written to the outbox.
    /// `published_through`: the partition's outbox entries up to that offset were published
    /// (their Kafka transaction committed) and are deleted in the same transaction, so that
    /// cleanup costs no round trip of its own.
    #[allow(clippy::too_many_arguments)]
    pub async fn commit(
        &mut self,
        fence: &Fence,
        unit: &[Evaluated<P::Delivery, P::Held>],
        entries: &[OutboxEntry],
        published_through: Option<i64>,
        events: &Events,
        max_backoff: Duration,
        stop: &mut watch::Receiver<bool>,
    ) -> Result<Vec<Kept>, CommitError> {
        let mut backoff = Backoff::new(max_backoff);
        let mut careful = false;
        // An attempt whose COMMIT got no answer: its token and what it would have committed.
        let mut unknown: Option<(String, Vec<Kept>)> = None;
        let pipeline = self.pipeline.clone();
        let tables = self.tables.clone();
        loop {
            let attempt = match self.prepared().await {
                Ok((c, st)) => match &unknown {
                    // Did it commit? Then it is done: written again, its drafts would all be
                    // there already and none would be published.
                    Some((token, kept)) => match committed(c, &tables, fence, token).await {
                        Ok(true) => break Ok(kept.clone()),
                        Ok(false) => {
                            unknown = None;
                            continue;
                        }
                        Err(e) => Err(e),
                    },
                    None => {
                        let unit = UnitTx {
                            fence,
                            unit,
                            entries,
                            published_through,
                            careful,
                            token: uuid::Uuid::new_v4().simple().to_string(),
                        };
                        unit.commit(c, &st, &*pipeline).await
                    }
                },
                Err(e) => Err(OpError::Db(e)),
            };
            match attempt {
                Ok(kept) => break Ok(kept),
                // Some record was delivered already: again, keeping only the new ones.
                Err(OpError::AlreadyThere) => careful = true,
                Err(OpError::CommitUnknown { cause, token, kept }) => {
                    unknown = Some((token, kept));
                    self.after_failure(OpError::Db(cause), "commit", &mut backoff, events, stop)
                        .await?
                }
                Err(e) => {
                    self.after_failure(e, "commit", &mut backoff, events, stop)
                        .await?
                }
            }
        }
    }
}

/// Whether the unit transaction marked with `token` committed (see `fence_check.sql`).
async fn committed(
    c: &Client,
    tables: &Tables,
    fence: &Fence,
    token: &str,
) -> Result<bool, OpError> {
    let row = c
        .query_opt(&tables.commit_check, &[&fence.topic, &fence.partition])
        .await?;
    Ok(row.and_then(|r| r.get::<_, Option<String>>(0)).as_deref() == Some(token))
}

/// One attempt at a unit's transaction.
struct UnitTx<'a, D, H> {
    fence: &'a Fence,
    unit: &'a [Evaluated<D, H>],
    entries: &'a [OutboxEntry],
    published_through: Option<i64>,
    careful: bool,
    /// Marks the attempt in the partition's fence row (`fence_check.sql`).
    token: String,
}

impl<D: Send + Sync + 'static, H: Send + Sync + 'static> UnitTx<'_, D, H> {
    async fn commit<P: Pipeline<Delivery = D, Held = H>>(
        self,
        client: &mut Client,
        st: &Statements<P::Prepared>,
        pipeline: &P,
    ) -> Result<Vec<Kept>, OpError> {
        let fence = self.fence;
        let tx = client.transaction().await?;
        // Sent together (one round trip): if the fence check fails the cleanup is rolled back.
        let fence_params: [&(dyn ToSql + Sync); 3] = [&fence.topic, &fence.partition, &self.token];
        let check = tx.query_opt(&st.fence, &fence_params);
        let cleanup = async {
            match self.published_through {
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
        // What the pipeline records of the unit itself, and which messages it leaves out: sent
        // in the same round trip too (when the fence has moved, all of it is rolled back).
        let record = async {
            pipeline
                .record_unit(&tx, &st.pipeline, self.unit)
                .await
                .map_err(OpError::from)
        };
        let (current, _, left_out) = futures::try_join!(
            async { check.await.map_err(OpError::from) },
            async { cleanup.await.map_err(OpError::from) },
            record
        )?;
        if current.map(|r| r.get::<_, i64>(0)) != Some(fence.epoch) {
            return Err(OpError::Fenced(fence.clone()));
        }
        let entry_units = entry_units(self.unit);
        let written = |entry: usize| !left_out.contains(&entry_units[entry]);
        // The pipeline's rows, and which records of its deliveries are new; dead letters are
        // always published.
        let deliveries: Vec<(usize, &D)> = delivered_entries(self.unit)
            .filter(|(entry, _)| written(*entry))
            .collect();
        let mut kept = if deliveries.is_empty() {
            Vec::new()
        } else {
            pipeline
                .write(&tx, &st.pipeline, &deliveries, self.entries, self.careful)
                .await?
        };
        kept.extend(
            self.entries
                .iter()
                .enumerate()
                .filter(|(entry, e)| e.target == Target::DeadLetters && written(*entry))
                .map(|(entry, _)| Kept { entry, only: None }),
        );
        kept.sort_by_key(|k| k.entry);
        if !kept.is_empty() {
            let sink = tx.copy_in(&st.copy_outbox).await?;
            let writer = BinaryCopyInWriter::new(sink, &OUTBOX_TYPES);
            pin_mut!(writer);
            for k in &kept {
                let e = &self.entries[k.entry];
                let (target, keys, payloads, template, headers) = outbox::stored_columns(e, k);
                let values: [&(dyn ToSql + Sync); 8] = [
                    &fence.topic,
                    &fence.partition,
                    &e.source_offset,
                    &target,
                    &keys,
                    &payloads,
                    &template,
                    &headers,
                ];
                writer.as_mut().write(&values).await?;
            }
            writer.finish().await?;
        }
        match tx.commit().await {
            Ok(()) => Ok(kept),
            // No answer (the connection broke): committed or not, the next attempt finds out.
            Err(e) if e.as_db_error().is_none() => Err(OpError::CommitUnknown {
                cause: DbError::from_pg(e),
                token: self.token,
                kept,
            }),
            Err(e) => Err(e.into()),
        }
    }
}

/// The delivered messages of a unit, each with the index of its outbox entry (entries are
/// made, in order, for every delivered or dead-lettered message).
pub(super) fn delivered_entries<D, H>(
    unit: &[Evaluated<D, H>],
) -> impl Iterator<Item = (usize, &D)> + '_ {
    unit.iter()
        .filter(|e| !matches!(e.outcome, Outcome::Skip { .. }))
        .enumerate()
        .filter_map(|(entry, e)| match &e.outcome {
            Outcome::Deliver(d) => Some((entry, d)),
            _ => None,
        })
}

/// The index in `unit` of the message of each outbox entry (entries are made, in order, for
/// every delivered or dead-lettered message).
fn entry_units<D, H>(unit: &[Evaluated<D, H>]) -> Vec<usize> {
    unit.iter()
        .enumerate()
        .filter(|(_, e)| !matches!(e.outcome, Outcome::Skip { .. }))
        .map(|(i, _)| i)
        .collect()
}
