//! The campaign pipeline's schema step: SPEC.md's two tables (created when absent, never
//! altered: the columns the runner needs are checked instead), the change feed on
//! `subscribers_restaurants`, and the idempotency key of `subscribers_feedback` — or exactly why
//! it cannot be created.

use crate::db::{self, Column, DbError};
use tokio_postgres::Client;

/// SPEC.md's two tables, exactly (created when absent).
pub const SCHEMA_SQL: &str = include_str!("sql/schema.sql");
const FEED_SQL: &str = include_str!("sql/subscriptions_feed.sql");
const KEY_SQL: &str = include_str!("sql/idempotency_key.sql");
const DUPLICATES_SQL: &str = include_str!("sql/feedback_duplicates.sql");
const REGISTRY_SQL: &str = include_str!("sql/registry_schema.sql");

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

/// Creates the tables when absent, never alters them, checks that what exists fits, and makes
/// sure of the idempotency key.
pub async fn ensure(client: &Client) -> Result<(), DbError> {
    db::run_schema_script(client, &format!("{SCHEMA_SQL}\n{FEED_SQL}")).await?;
    for (table, columns) in NEEDED {
        db::check_columns(client, table, columns).await?;
    }
    ensure_idempotency_key(client).await
}

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
    db::run_schema_script(client, KEY_SQL).await
}

/// Creates the registry of campaigns not over yet (`schedule/`) when absent.
pub async fn ensure_registry(client: &Client) -> Result<(), DbError> {
    db::run_schema_script(client, REGISTRY_SQL).await
}
