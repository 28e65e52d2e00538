//! PostgreSQL plumbing shared by every part that talks to the database: connecting, the error
//! type that says whose fault a failure is, and the schema step's two tools (run a script under
//! the runners' shared lock; check that an existing table has the columns the runner needs).

use std::time::Duration;
use tokio_postgres::tls::NoTlsStream;
use tokio_postgres::{Client, Connection, NoTls, Socket};

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
    /// The server took the connection but did not complete the handshake in time.
    #[error("PostgreSQL did not answer within {} (connect_timeout)", humantime::format_duration(*.0))]
    ConnectTimeout(Duration),
}

impl DbError {
    pub fn from_pg(e: tokio_postgres::Error) -> DbError {
        if e.is_closed() || e.as_db_error().is_none() {
            DbError::Unavailable(e)
        } else {
            DbError::Statement(e)
        }
    }

    /// Whose fault a failed write is, and so what the runner does about it.
    pub fn class(&self) -> FailureClass {
        if self.is_transient() {
            return FailureClass::Transient;
        }
        let code = match self {
            DbError::Statement(e) => e.as_db_error().map(|d| d.code().code().to_string()),
            _ => None,
        };
        match code.as_deref() {
            // Data exceptions (a value out of range, a byte the encoding refuses, a string too
            // long) and integrity constraint violations (not null, check, foreign key): the
            // rows a message came to cannot be stored.
            Some(c) if c.starts_with("22") || c.starts_with("23") => FailureClass::Content,
            _ => FailureClass::Operator,
        }
    }

    /// The SQLSTATE, when PostgreSQL gave one.
    pub fn sqlstate(&self) -> Option<&str> {
        match self {
            DbError::Unavailable(e) | DbError::Statement(e) => {
                e.as_db_error().map(|d| d.code().code())
            }
            _ => None,
        }
    }

    /// PostgreSQL's own message and detail, when it gave them.
    pub fn server_message(&self) -> Option<String> {
        match self {
            DbError::Unavailable(e) | DbError::Statement(e) => {
                e.as_db_error().map(|d| match d.detail() {
                    Some(detail) => format!("{}: {detail}", d.message()),
                    None => d.message().to_string(),
                })
            }
            _ => None,
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
            DbError::FeedLost(_) | DbError::ConnectTimeout(_) => true,
        }
    }
}

/// The three kinds of sink failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureClass {
    /// The connection, a timeout, a serialization failure, the server shutting down: retried
    /// with jittered backoff.
    Transient,
    /// Refused for the content of what one message came to: that message is dead-lettered
    /// (`sink_refused`), the rest delivered.
    Content,
    /// The schema changed under the runner, a permission, a full disk: an operator must act.
    /// The partition waits (retrying slowly) and says so in `/health` and once a minute in
    /// the log.
    Operator,
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

/// How long one attempt to reach a PostgreSQL host may take when the connection string sets
/// no `connect_timeout` (libpq's key, in seconds, in either form of the string).
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// The settings of a connection string, with [`DEFAULT_CONNECT_TIMEOUT`] when it sets no
/// `connect_timeout`.
pub fn connect_config(url: &str) -> Result<tokio_postgres::Config, DbError> {
    let mut config: tokio_postgres::Config = url.parse().map_err(DbError::Unavailable)?;
    if config.get_connect_timeout().is_none() {
        config.connect_timeout(DEFAULT_CONNECT_TIMEOUT);
    }
    Ok(config)
}

/// Opens a connection (the caller drives it). Each host is given the connect timeout for its
/// socket, and the whole handshake, authentication included, at most that long per host: a
/// server that takes the connection and never answers cannot hold the caller.
pub async fn open(url: &str) -> Result<(Client, Connection<Socket, NoTlsStream>), DbError> {
    let config = connect_config(url)?;
    let per_host = config
        .get_connect_timeout()
        .copied()
        .unwrap_or(DEFAULT_CONNECT_TIMEOUT);
    let limit = per_host * u32::try_from(config.get_hosts().len().max(1)).unwrap_or(1);
    match tokio::time::timeout(limit, config.connect(NoTls)).await {
        Ok(connected) => connected.map_err(DbError::Unavailable),
        Err(_) => Err(DbError::ConnectTimeout(limit)),
    }
}

/// Connects (see [`open`]) and drives the connection on a background task.
pub async fn connect(url: &str) -> Result<Client, DbError> {
    let (client, connection) = open(url).await?;
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
