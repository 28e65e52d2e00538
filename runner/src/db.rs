//! PostgreSQL plumbing shared by the subscriber cache and the feedback sink: connecting, and the
//! schema step (create SPEC.md's tables when absent, check the columns of existing ones).

use tokio_postgres::{Client, NoTls};

/// SPEC.md's two tables, exactly (created when absent).
pub const SCHEMA_SQL: &str = include_str!("../sql/schema.sql");
const FEED_SQL: &str = include_str!("../sql/subscriptions_feed.sql");
const DELIVERY_SQL: &str = include_str!("../sql/delivery.sql");
const DUPLICATES_SQL: &str = include_str!("../sql/feedback_duplicates.sql");
/// Serialises the schema step between runners starting together.
const SCHEMA_LOCK: i64 = 0x6361_6d70_6169_676e;
const COLUMNS_SQL: &str = include_str!("../sql/columns.sql");

#[derive(Debug, thiserror::Error)]
pub enum DbError {
    /// The database is unreachable or the connection broke: retry later.
    #[error("PostgreSQL is unavailable: {0}")]
    Unavailable(#[source] tokio_postgres::Error),
    /// The existing schema cannot take what the runner writes: an operator must act.
    #[error("table public.{table} does not fit the runner: {detail}")]
    Schema { table: &'static str, detail: String },
    #[error("PostgreSQL refused a statement: {0}")]
    Statement(#[source] tokio_postgres::Error),
    /// The listening connection broke: retry with a new one.
    #[error("the subscriber feed connection was lost: {0}")]
    FeedLost(String),
}

impl DbError {
    pub fn from_pg(e: tokio_postgres::Error) -> DbError {
        if e.is_closed() || e.as_db_error().is_none() {
            DbError::Unavailable(e)
        } else {
            DbError::Statement(e)
        }
    }

    /// Worth retrying: the world's fault, not ours nor the input's.
    pub fn is_transient(&self) -> bool {
        match self {
            DbError::Unavailable(_) => true,
            DbError::Statement(e) => e.as_db_error().is_some_and(|d| {
                // Connection/admin shutdown classes, serialization failures, deadlocks.
                let c = d.code().code();
                c.starts_with("08") || c.starts_with("57") || c == "40001" || c == "40P01"
            }),
            DbError::Schema { .. } => false,
            DbError::FeedLost(_) => true,
        }
    }
}

/// Connects and drives the connection on a background task.
pub async fn connect(url: &str) -> Result<Client, DbError> {
    let (client, connection) = tokio_postgres::connect(url, NoTls)
        .await
        .map_err(DbError::Unavailable)?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::warn!(error = %e, "PostgreSQL connection ended.");
        }
    });
    Ok(client)
}

/// A column the runner needs and the `information_schema` types it accepts for it.
type Column = (&'static str, &'static [&'static str]);

/// Creates the unique (adv_campaign_id, client_id) index the delivery protocol relies on, or
/// says exactly why it cannot: existing duplicates, with the query that lists them.
async fn ensure_idempotency_key(client: &Client) -> Result<(), DbError> {
    let exists = client
        .query_opt(
            "SELECT 1 FROM pg_indexes WHERE schemaname = 'public' AND indexname = 'subscribers_feedback_campaign_client_key'",
            &[],
        )
        .await
        .map_err(DbError::from_pg)?
        .is_some();
    if !exists {
        let dups = client
            .query(DUPLICATES_SQL, &[])
            .await
            .map_err(DbError::from_pg)?;
        if let Some(first) = dups.first() {
            return Err(DbError::Schema {
                table: "subscribers_feedback",
                detail: format!(
                    "it holds duplicate (adv_campaign_id, client_id) pairs (e.g. {} / {}, {} copies), so the unique index \
                     the delivery protocol needs cannot be created; remove the extra copies, then start again. \
                     They are listed by:\n{DUPLICATES_SQL}",
                    first.get::<_, String>(0),
                    first.get::<_, String>(1),
                    first.get::<_, i64>(2)
                ),
            });
        }
    }
    let script = format!(
        "BEGIN; SET LOCAL client_min_messages = warning; SELECT pg_advisory_xact_lock({SCHEMA_LOCK});\n{DELIVERY_SQL}\nCOMMIT;"
    );
    client
        .batch_execute(&script)
        .await
        .map_err(DbError::from_pg)
}

/// The columns the runner reads or writes, per table.
const NEEDED: &[(&str, &[Column])] = &[
    (
        "subscribers_restaurants",
        &[
            ("client_id", &["character varying", "text"]),
            ("restaurant_id", &["character varying", "text"]),
        ],
    ),
    (
        "subscribers_feedback",
        &[
            ("restaurant_id", &["text", "character varying"]),
            ("adv_campaign_id", &["text", "character varying"]),
            ("adv_campaign_content", &["text", "character varying"]),
            ("adv_campaign_owner", &["text", "character varying"]),
            ("adv_campaign_owner_contact", &["text", "character varying"]),
            ("adv_campaign_datetime_start", &["bigint"]),
            ("adv_campaign_datetime_end", &["bigint"]),
            ("datetime_created", &["bigint"]),
            ("client_id", &["text", "character varying"]),
            ("trigger_datetime_created", &["integer"]),
        ],
    ),
];

/// Creates the tables when absent, never alters them, and checks that what exists fits.
pub async fn ensure_schema(client: &Client) -> Result<(), DbError> {
    let script = format!(
        "BEGIN; SET LOCAL client_min_messages = warning; SELECT pg_advisory_xact_lock({SCHEMA_LOCK});\n\
         {SCHEMA_SQL}\n{FEED_SQL}\nCOMMIT;"
    );
    client
        .batch_execute(&script)
        .await
        .map_err(DbError::from_pg)?;
    for (table, columns) in NEEDED {
        let rows = client
            .query(COLUMNS_SQL, &[table])
            .await
            .map_err(DbError::from_pg)?;
        let have: Vec<(String, String)> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
        for (col, types) in *columns {
            match have.iter().find(|(n, _)| n == col) {
                None => {
                    return Err(DbError::Schema {
                        table,
                        detail: format!("column {col} is missing"),
                    });
                }
                Some((_, ty)) if !types.contains(&ty.as_str()) => {
                    return Err(DbError::Schema {
                        table,
                        detail: format!("column {col} has type {ty}, expected one of {types:?}"),
                    });
                }
                Some(_) => {}
            }
        }
    }
    ensure_idempotency_key(client).await
}
