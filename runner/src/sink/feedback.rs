//! The PostgreSQL feedback sink: one binary COPY per batch inside one transaction, so a batch is
//! either wholly in `subscribers_feedback` or not at all. Reconnects after a lost connection.

use super::{pause, Abandoned, Backoff};
use crate::db::{self, DbError};
use crate::events::Events;
use futures::pin_mut;
use std::time::Duration;
use tokio_postgres::binary_copy::BinaryCopyInWriter;
use tokio_postgres::types::{ToSql, Type};
use tokio_postgres::Client;

const COPY_SQL: &str = include_str!("../../sql/copy_feedback.sql");

const COLUMN_TYPES: [Type; 10] = [
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

#[derive(Debug)]
pub struct FeedbackSink {
    url: String,
    client: Option<Client>,
}

impl FeedbackSink {
    pub fn new(url: String, client: Option<Client>) -> Self {
        FeedbackSink { url, client }
    }

    /// Writes all rows in one transaction, retrying transient failures with a fresh connection
    /// until it succeeds or `stop` fires. Rows are never half-written.
    pub async fn write_all(
        &mut self,
        rows: &[FeedbackRow<'_>],
        events: &Events,
        max_backoff: Duration,
        stop: &mut tokio::sync::watch::Receiver<bool>,
    ) -> Result<(), Abandoned> {
        if rows.is_empty() {
            return Ok(());
        }
        let mut backoff = Backoff::new(max_backoff);
        loop {
            match self.write_once(rows).await {
                Ok(()) => return Ok(()),
                Err(e) => {
                    if !e.is_transient() {
                        tracing::error!(error = %e, "Feedback write failed and will not succeed by retrying; an operator must act. Retrying anyway so nothing is lost.");
                    }
                    self.client = None;
                    let wait = backoff.step();
                    events.sink_retry("postgres", &e, backoff.attempt, wait);
                    if !pause(wait, stop).await {
                        return Err(Abandoned);
                    }
                }
            }
        }
    }

    async fn write_once(&mut self, rows: &[FeedbackRow<'_>]) -> Result<(), DbError> {
        let client = match self.client.take().filter(|c| !c.is_closed()) {
            Some(c) => self.client.insert(c),
            None => self.client.insert(db::connect(&self.url).await?),
        };
        let tx = client.transaction().await.map_err(DbError::from_pg)?;
        let sink = tx.copy_in(COPY_SQL).await.map_err(DbError::from_pg)?;
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
            writer
                .as_mut()
                .write(&values)
                .await
                .map_err(DbError::from_pg)?;
        }
        writer.finish().await.map_err(DbError::from_pg)?;
        tx.commit().await.map_err(DbError::from_pg)?;
        Ok(())
    }
}
