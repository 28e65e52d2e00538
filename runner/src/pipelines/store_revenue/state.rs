//! The pipeline's state in PostgreSQL (`sql/schema.sql`): window sums, each input partition's
//! position, watermark and fence, and the outbox of what Kafka must get. PostgreSQL is the
//! state store: a partition's sums, watermark and input position move in one transaction, so
//! after any crash counting resumes exactly where the committed state stands.

use super::windows::{Delta, PartitionTime, WindowKey};
use crate::db::{self, DbError};
use std::collections::HashMap;
use tokio_postgres::{Client, Statement};

const SCHEMA_SQL: &str = include_str!("sql/schema.sql");
const CLAIM_SQL: &str = include_str!("sql/claim.sql");
const FENCE_CHECK_SQL: &str = include_str!("sql/fence_check.sql");
const SAVE_PARTITION_SQL: &str = include_str!("sql/save_partition.sql");
const ADD_WINDOWS_SQL: &str = include_str!("sql/add_windows.sql");
const GLOBAL_WATERMARK_SQL: &str = include_str!("sql/global_watermark.sql");
const FINALIZE_SQL: &str = include_str!("sql/finalize.sql");
const OUTBOX_INSERT_SQL: &str = include_str!("sql/outbox_insert.sql");
const OUTBOX_LOAD_SQL: &str = include_str!("sql/outbox_load.sql");
const OUTBOX_DELETE_SQL: &str = include_str!("sql/outbox_delete.sql");

/// Windows made final by one transaction, at most.
const FINALIZE_LIMIT: i64 = 50_000;

/// Creates the tables when absent (serialised between runners starting together).
pub async fn ensure_schema(client: &Client) -> Result<(), DbError> {
    db::run_schema_script(client, SCHEMA_SQL).await
}

/// Where the outbox sends an entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    Output,
    DeadLetters,
}

impl Target {
    fn as_str(self) -> &'static str {
        match self {
            Target::Output => "output",
            Target::DeadLetters => "dead_letters",
        }
    }
}

/// One record for Kafka.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboxEntry {
    pub target: Target,
    pub key: Option<Vec<u8>>,
    pub value: Option<Vec<u8>>,
    pub headers: crate::headers::HeaderList,
}

/// A window's totals as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WindowRow {
    pub store: String,
    pub window_start: i64,
    pub total_minor: i64,
    pub events: i64,
    pub final_: bool,
}

/// A partition as claimed: its fence epoch and where counting stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Claimed {
    pub epoch: i64,
    pub next_offset: i64,
    pub time: PartitionTime,
}

/// What one partition's transaction writes.
#[derive(Debug)]
pub struct PartitionWrite<'a> {
    pub topic: &'a str,
    pub partition: i32,
    pub epoch: i64,
    pub next_offset: i64,
    pub time: PartitionTime,
    /// The position the last committed transaction left (what PostgreSQL must still hold).
    pub from_offset: i64,
    pub deltas: &'a HashMap<WindowKey, Delta>,
    pub outbox: &'a [OutboxEntry],
    /// Outbox entries up to this id were published: deleted in the same transaction.
    pub published_through: Option<i64>,
}

/// Finalizing in a partition's transaction: the topic's partition count, so that the least
/// watermark is taken over all of them.
#[derive(Debug, Clone, Copy)]
pub struct Finalize {
    pub partitions: i32,
}

/// What a partition's transaction came to.
#[derive(Debug, Default)]
pub struct Written {
    /// The windows the sums went to, with their totals after the transaction.
    pub updated: Vec<WindowRow>,
    /// The windows this transaction made final (their records are in the outbox).
    pub finalized: Vec<WindowRow>,
    /// The least watermark of the topic's partitions, when every one has one.
    pub global_watermark: Option<i64>,
}

/// How a transaction failed.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("another runner owns {0}/{1} now")]
    Fenced(String, i32),
    #[error(transparent)]
    Db(#[from] DbError),
}

impl From<tokio_postgres::Error> for StateError {
    fn from(e: tokio_postgres::Error) -> Self {
        StateError::Db(DbError::from_pg(e))
    }
}

/// Window sizes and currency, as the statements need them.
#[derive(Debug, Clone, Copy)]
pub struct Units {
    pub window_secs: i64,
    pub minor_digits: u8,
}

impl Units {
    fn scale(&self) -> i64 {
        10i64.pow(self.minor_digits as u32)
    }
}

struct Prepared {
    claim: Statement,
    fence_check: Statement,
    save_partition: Statement,
    add_windows: Statement,
    global_watermark: Statement,
    finalize: Statement,
    outbox_insert: Statement,
    outbox_load: Statement,
    outbox_delete: Statement,
}

/// One PostgreSQL connection with the pipeline's statements, made again after it breaks.
pub struct State {
    url: String,
    units: Units,
    conn: Option<(Client, Prepared)>,
}

impl std::fmt::Debug for State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("State")
            .field("units", &self.units)
            .field("connected", &self.conn.is_some())
            .finish()
    }
}

impl State {
    pub fn new(url: String, units: Units) -> State {
        State {
            url,
            units,
            conn: None,
        }
    }

    async fn conn(&mut self) -> Result<&mut (Client, Prepared), DbError> {
        if self.conn.as_ref().is_some_and(|(c, _)| c.is_closed()) {
            self.conn = None;
        }
        if self.conn.is_none() {
            let client = db::connect(&self.url).await?;
            let p = async {
                Ok::<_, tokio_postgres::Error>(Prepared {
                    claim: client.prepare(CLAIM_SQL).await?,
                    fence_check: client.prepare(FENCE_CHECK_SQL).await?,
                    save_partition: client.prepare(SAVE_PARTITION_SQL).await?,
                    add_windows: client.prepare(ADD_WINDOWS_SQL).await?,
                    global_watermark: client.prepare(GLOBAL_WATERMARK_SQL).await?,
                    finalize: client.prepare(FINALIZE_SQL).await?,
                    outbox_insert: client.prepare(OUTBOX_INSERT_SQL).await?,
                    outbox_load: client.prepare(OUTBOX_LOAD_SQL).await?,
                    outbox_delete: client.prepare(OUTBOX_DELETE_SQL).await?,
                })
            }
            .await
            .map_err(DbError::from_pg)?;
            self.conn = Some((client, p));
        }
        Ok(self.conn.as_mut().expect("connected above"))
    }

    /// Drops the connection after a failure, so that the next call makes a new one.
    pub fn reset(&mut self) {
        self.conn = None;
    }

    /// Claims a partition: a new fence epoch, and where counting stands (`first_offset` for a
    /// partition never counted before).
    pub async fn claim(
        &mut self,
        topic: &str,
        partition: i32,
        first_offset: i64,
        owner: &str,
    ) -> Result<Claimed, StateError> {
        let (c, p) = self.conn().await?;
        let row = c
            .query_one(&p.claim, &[&topic, &partition, &first_offset, &owner])
            .await?;
        Ok(Claimed {
            epoch: row.get(0),
            next_offset: row.get(1),
            time: PartitionTime {
                max_event_time: row.get(2),
                watermark: row.get(3),
            },
        })
    }

    /// One partition's transaction: the fence, the sums into their windows, the partition's
    /// position and watermark, its outbox entries (dead letters), the cleanup of what was
    /// published; with `finalize`, also the windows the topic's watermark has passed, made
    /// final, their records put in this partition's outbox.
    pub async fn write(
        &mut self,
        w: &PartitionWrite<'_>,
        finalize: Option<Finalize>,
        final_record: impl Fn(&WindowRow) -> OutboxEntry,
    ) -> Result<Written, StateError> {
        let units = self.units;
        let (c, p) = self.conn().await?;
        let tx = c.transaction().await?;
        let held: Option<(i64, i64)> = tx
            .query_opt(&p.fence_check, &[&w.topic, &w.partition])
            .await?
            .map(|r| (r.get(0), r.get(1)));
        match held {
            Some((epoch, _)) if epoch != w.epoch => {
                return Err(StateError::Fenced(w.topic.to_string(), w.partition))
            }
            None => return Err(StateError::Fenced(w.topic.to_string(), w.partition)),
            // This very write committed already (the answer to its COMMIT was lost and it is
            // being tried again): nothing more to do.
            Some((_, at)) if at == w.next_offset && at != w.from_offset => {
                return Ok(Written::default())
            }
            Some((_, at)) if at != w.from_offset => {
                return Err(StateError::Fenced(w.topic.to_string(), w.partition))
            }
            Some(_) => {}
        }
        if let Some(through) = w.published_through {
            tx.execute(&p.outbox_delete, &[&w.topic, &w.partition, &through])
                .await?;
        }
        let mut written = Written::default();
        if !w.deltas.is_empty() {
            let n = w.deltas.len();
            let (mut stores, mut starts, mut amounts, mut events) = (
                Vec::with_capacity(n),
                Vec::with_capacity(n),
                Vec::with_capacity(n),
                Vec::with_capacity(n),
            );
            // By store, then window: the lock order every partition uses.
            let mut sorted: Vec<(&WindowKey, &Delta)> = w.deltas.iter().collect();
            sorted.sort_unstable_by(|a, b| a.0.cmp(b.0));
            for ((store, start), d) in sorted {
                stores.push(store.as_str());
                starts.push(*start);
                amounts.push(d.amount_minor);
                events.push(d.events);
            }
            let scale = units.scale();
            let digits = units.minor_digits as i32;
            let rows = tx
                .query(
                    &p.add_windows,
                    &[
                        &stores,
                        &starts,
                        &amounts,
                        &events,
                        &units.window_secs,
                        &scale,
                        &digits,
                    ],
                )
                .await?;
            written.updated = rows
                .iter()
                .map(|r| WindowRow {
                    store: r.get(0),
                    window_start: r.get(1),
                    total_minor: r.get(2),
                    events: r.get(3),
                    final_: r.get(4),
                })
                .collect();
        }
        tx.execute(
            &p.save_partition,
            &[
                &w.topic,
                &w.partition,
                &w.next_offset,
                &w.time.max_event_time,
                &w.time.watermark,
            ],
        )
        .await?;
        let mut finals = Vec::new();
        if let Some(f) = finalize {
            let row = tx
                .query_one(&p.global_watermark, &[&w.topic, &f.partitions])
                .await?;
            let (known, with_watermark, least): (i64, i64, Option<i64>) =
                (row.get(0), row.get(1), row.get(2));
            if known == f.partitions as i64 && with_watermark == known {
                written.global_watermark = least;
            }
            if let Some(wm) = written.global_watermark {
                let rows = tx.query(&p.finalize, &[&wm, &FINALIZE_LIMIT]).await?;
                written.finalized = rows
                    .iter()
                    .map(|r| WindowRow {
                        store: r.get(0),
                        window_start: r.get(1),
                        total_minor: r.get(2),
                        events: r.get(3),
                        final_: true,
                    })
                    .collect();
                finals = written.finalized.iter().map(&final_record).collect();
            }
        }
        for entries in [w.outbox, finals.as_slice()] {
            if !entries.is_empty() {
                insert_outbox(&tx, &p.outbox_insert, w.topic, w.partition, entries).await?;
            }
        }
        tx.commit().await?;
        Ok(written)
    }

    /// A partition's outbox entries after `after` (oldest first, at most `limit`), with ids.
    pub async fn load_outbox(
        &mut self,
        topic: &str,
        partition: i32,
        after: i64,
        limit: i64,
    ) -> Result<Vec<(i64, OutboxEntry)>, StateError> {
        let (c, p) = self.conn().await?;
        let rows = c
            .query(&p.outbox_load, &[&topic, &partition, &after, &limit])
            .await?;
        Ok(rows
            .iter()
            .map(|r| {
                let target: &str = r.get(1);
                let headers: &[u8] = r.get(4);
                (
                    r.get(0),
                    OutboxEntry {
                        target: if target == "output" {
                            Target::Output
                        } else {
                            Target::DeadLetters
                        },
                        key: r.get(2),
                        value: r.get(3),
                        headers: crate::headers::decode(headers).unwrap_or_default(),
                    },
                )
            })
            .collect())
    }

    /// Deletes a partition's outbox entries up to `through` (published), if this runner still
    /// owns it.
    pub async fn delete_outbox(
        &mut self,
        topic: &str,
        partition: i32,
        epoch: i64,
        through: i64,
    ) -> Result<(), StateError> {
        let (c, p) = self.conn().await?;
        let tx = c.transaction().await?;
        let current: Option<i64> = tx
            .query_opt(&p.fence_check, &[&topic, &partition])
            .await?
            .map(|r| r.get(0));
        if current != Some(epoch) {
            return Err(StateError::Fenced(topic.to_string(), partition));
        }
        tx.execute(&p.outbox_delete, &[&topic, &partition, &through])
            .await?;
        tx.commit().await?;
        Ok(())
    }
}

async fn insert_outbox(
    tx: &tokio_postgres::Transaction<'_>,
    stmt: &Statement,
    topic: &str,
    partition: i32,
    entries: &[OutboxEntry],
) -> Result<(), tokio_postgres::Error> {
    let targets: Vec<&str> = entries.iter().map(|e| e.target.as_str()).collect();
    let keys: Vec<Option<&[u8]>> = entries.iter().map(|e| e.key.as_deref()).collect();
    let values: Vec<Option<&[u8]>> = entries.iter().map(|e| e.value.as_deref()).collect();
    let headers: Vec<Vec<u8>> = entries
        .iter()
        .map(|e| crate::headers::encode(&e.headers))
        .collect();
    tx.execute(
        stmt,
        &[&topic, &partition, &targets, &keys, &values, &headers],
    )
    .await?;
    Ok(())
}
