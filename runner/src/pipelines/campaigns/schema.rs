//! The campaign pipeline's schema step: SPEC.md's two tables (created when absent, never
//! altered: the columns the runner needs are checked instead), the change feed on
//! `subscribers_restaurants`, and what each campaign has reached (`campaign_runner_delivered`,
//! which makes each draft exactly once; made from the drafts already there when first created).

use crate::db::{self, Column, DbError};
use tokio_postgres::Client;

/// SPEC.md's two tables, exactly (created when absent).
pub const SCHEMA_SQL: &str = include_str!("sql/schema.sql");
const FEED_SQL: &str = include_str!("sql/subscriptions_feed.sql");
const DELIVERED_SQL: &str = include_str!("sql/delivered_schema.sql");
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
/// sure of `campaign_runner_delivered` (dropping the unique index earlier versions added to
/// `subscribers_feedback` once the table holds what it indexed).
pub async fn ensure(client: &Client) -> Result<(), DbError> {
    db::run_schema_script(client, &format!("{SCHEMA_SQL}\n{FEED_SQL}")).await?;
    for (table, columns) in NEEDED {
        db::check_columns(client, table, columns).await?;
    }
    db::run_schema_script(client, DELIVERED_SQL).await
}

/// Creates the registry of campaigns not over yet (`schedule/`) when absent.
pub async fn ensure_registry(client: &Client) -> Result<(), DbError> {
    db::run_schema_script(client, REGISTRY_SQL).await
}
