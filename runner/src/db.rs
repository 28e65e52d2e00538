//! PostgreSQL plumbing shared by every part that talks to the database: connecting, the error
//! type that says whose fault a failure is, and the schema step's two tools (run a script under
//! the runners' shared lock; check that an existing table has the columns the runner needs).

use tokio_postgres::{Client, NoTls};

/// Serialises the schema steps of runners starting together.
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

/// A PostgreSQL connection string; its password is never printed.
#[derive(Clone)]
pub struct PostgresUrl(String);

impl PostgresUrl {
    pub fn new(url: String) -> Self {
        PostgresUrl(url)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for PostgresUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0.parse::<tokio_postgres::Config>() {
            Ok(c) => f
                .debug_struct("PostgresUrl")
                .field("hosts", &c.get_hosts())
                .field("ports", &c.get_ports())
                .field("user", &c.get_user())
                .field("dbname", &c.get_dbname())
                .field("password", &c.get_password().map(|_| "<redacted>"))
                .finish(),
            Err(_) => f.write_str("PostgresUrl(<unparsable>)"),
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

/// Runs a schema script in one transaction, holding the lock every runner's schema step
/// takes, with notices (e.g. "already exists") silenced.
pub async fn run_schema_script(client: &Client, script: &str) -> Result<(), DbError> {
    let script = format!(
        "BEGIN; SET LOCAL client_min_messages = warning; SELECT pg_advisory_xact_lock({SCHEMA_LOCK});\n{script}\nCOMMIT;"
    );
    client
        .batch_execute(&script)
        .await
        .map_err(DbError::from_pg)
}

/// A column the runner needs and the `information_schema` types it accepts for it.
pub type Column = (&'static str, &'static [&'static str]);

/// Checks that `public.{table}` has each of `columns` with an accepted type.
pub async fn check_columns(
    client: &Client,
    table: &'static str,
    columns: &[Column],
) -> Result<(), DbError> {
    let rows = client
        .query(COLUMNS_SQL, &[&table])
        .await
        .map_err(DbError::from_pg)?;
    let have: Vec<(String, String)> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    for (col, types) in columns {
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
    Ok(())
}
