//! The outbox: what a unit's PostgreSQL transaction committed and Kafka must still get. One
//! entry per source message — its output records or its dead letter, all with the same
//! headers — written in the unit's transaction, published by the Kafka stage (or by whoever
//! takes the partition over), and deleted once that Kafka transaction committed. The records
//! are generic (key, value, headers, and the output or dead-letter topic); records that share
//! most of their bytes are stored as their template (`template.rs`).

use super::template::TemplateRecords;
use crate::headers::{self, HeaderList};
use std::sync::Arc;

/// Where an outbox entry goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// The pipeline's output topic.
    Output,
    DeadLetters,
}

impl Target {
    /// The value of the outbox's `target` column. The output topic is stored as `drafts`, the
    /// name the column has always used, so that every runner version reads every row alike.
    pub fn as_str(self) -> &'static str {
        match self {
            Target::Output => "drafts",
            Target::DeadLetters => "dead_letters",
        }
    }

    fn parse(s: &str) -> Option<Target> {
        match s {
            "drafts" => Some(Target::Output),
            "dead_letters" => Some(Target::DeadLetters),
            _ => None,
        }
    }
}

/// What one source message sends to Kafka: its records (output) or its dead letter, all with
/// the same headers.
#[derive(Debug, Clone)]
pub struct OutboxEntry {
    pub source_offset: i64,
    pub target: Target,
    pub records: Records,
    pub headers: HeaderList,
}

/// The records of an outbox entry.
#[derive(Debug, Clone)]
pub enum Records {
    /// Records rendered from a template, stored as the template when all of them are kept.
    Template(Arc<TemplateRecords>),
    /// Records given whole: a dead letter, or entries read back from the outbox.
    Raw {
        keys: Vec<Option<Vec<u8>>>,
        payloads: Vec<Option<Vec<u8>>>,
    },
}

impl Records {
    /// One record given whole.
    pub fn one(key: Option<&[u8]>, payload: Option<&[u8]>) -> Records {
        Records::Raw {
            keys: vec![key.map(<[u8]>::to_vec)],
            payloads: vec![payload.map(<[u8]>::to_vec)],
        }
    }

    pub fn len(&self) -> usize {
        match self {
            Records::Template(t) => t.len(),
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
            Records::Template(t) => {
                let r = t.get(i).expect("record index below len");
                (Some(r.key.as_bytes()), Some(r.payload))
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

/// Which of a unit's outbox entries must be published, and which of their records: an entry
/// can keep only the records that were new (a record already delivered before, as the
/// pipeline's idempotency key says, was published before). Indexes into the unit's entries.
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

/// A bytea[] column's values.
pub(super) type Column<'a> = Vec<Option<&'a [u8]>>;

/// An entry as the outbox row stores it: `(target, keys, payloads, template, headers)`. Records
/// all kept from a template are stored as the template; anything else record by record.
pub(super) fn stored_columns<'e>(
    e: &'e OutboxEntry,
    k: &Kept,
) -> (
    &'static str,
    Column<'e>,
    Column<'e>,
    Option<Vec<u8>>,
    Vec<u8>,
) {
    let headers = headers::encode(&e.headers);
    let (keys, payloads, template) = match (&e.records, &k.only) {
        (Records::Template(t), None) => (Vec::new(), Vec::new(), Some(t.encode())),
        _ => {
            let (keys, payloads) = k.records(e).map(|i| e.record(i)).unzip();
            (keys, payloads, None)
        }
    };
    (e.target.as_str(), keys, payloads, template, headers)
}

/// An outbox row read back, or why it cannot be read (the row is damaged: an operator's
/// problem, never skipped).
pub(super) fn read_row(r: &tokio_postgres::Row) -> Result<OutboxEntry, String> {
    let source_offset: i64 = r.get(0);
    let headers = headers::decode(r.get(5)).ok_or_else(|| {
        format!("the headers of the entry at source offset {source_offset} cannot be decoded")
    })?;
    let records = match r.get::<_, Option<&[u8]>>(4) {
        Some(stored) => {
            let (keys, payloads) = TemplateRecords::decode(stored)
                .map_err(|e| format!("entry at source offset {source_offset}: {e}"))?
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
    let target = r.get::<_, &str>(1);
    Ok(OutboxEntry {
        source_offset,
        target: Target::parse(target).ok_or_else(|| {
            format!("the entry at source offset {source_offset} has an unknown target {target:?}")
        })?,
        records,
        headers,
    })
}
