//! The subscriber cache: every subscription held in memory so that a campaign never waits on
//! the database. A snapshot is immutable and swapped whole (readers are never blocked); a
//! background task reloads it periodically and swaps only when the content changed.

use crate::db::{self, DbError};
use crate::events::Events;
use arc_swap::ArcSwap;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_postgres::Client;

const SUBSCRIPTIONS_SQL: &str = include_str!("../sql/subscriptions.sql");

/// An immutable view of `subscribers_restaurants`, grouped by restaurant, duplicates removed.
#[derive(Debug, Default)]
pub struct Snapshot {
    version: u64,
    by_restaurant: HashMap<Box<str>, Vec<String>>,
    rows: usize,
    subscriptions: usize,
}

impl Snapshot {
    /// Builds a snapshot from (restaurant_id, client_id) rows in any order.
    pub fn from_rows(version: u64, rows: impl IntoIterator<Item = (String, String)>) -> Snapshot {
        let mut by_restaurant: HashMap<Box<str>, Vec<String>> = HashMap::new();
        let mut n = 0;
        for (restaurant, client) in rows {
            n += 1;
            by_restaurant
                .entry(restaurant.into_boxed_str())
                .or_default()
                .push(client);
        }
        let mut subscriptions = 0;
        for clients in by_restaurant.values_mut() {
            clients.sort_unstable();
            clients.dedup();
            clients.shrink_to_fit();
            subscriptions += clients.len();
        }
        Snapshot {
            version,
            by_restaurant,
            rows: n,
            subscriptions,
        }
    }

    /// The distinct subscribers of a restaurant, sorted.
    pub fn clients(&self, restaurant_id: &str) -> &[String] {
        self.by_restaurant
            .get(restaurant_id)
            .map(Vec::as_slice)
            .unwrap_or(&[])
    }

    pub fn version(&self) -> u64 {
        self.version
    }

    /// Distinct (restaurant, client) pairs.
    pub fn subscriptions(&self) -> usize {
        self.subscriptions
    }

    /// Rows read from the table, duplicates included.
    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn restaurants(&self) -> usize {
        self.by_restaurant.len()
    }

    fn same_content(&self, other: &Snapshot) -> bool {
        self.by_restaurant == other.by_restaurant
    }
}

/// The shared, swappable snapshot plus whether it is known to be stale.
#[derive(Debug, Clone)]
pub struct SubscriberCache {
    current: Arc<ArcSwap<Snapshot>>,
    stale: Arc<AtomicBool>,
}

impl SubscriberCache {
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.current.load_full()
    }

    /// True when the last refresh failed: joins use the previous snapshot meanwhile.
    pub fn is_stale(&self) -> bool {
        self.stale.load(Ordering::Relaxed)
    }

    /// Loads the first snapshot; the runner does not consume before this succeeds.
    pub async fn load(client: &Client) -> Result<SubscriberCache, DbError> {
        let snapshot = load_snapshot(client, 1).await?;
        Ok(SubscriberCache {
            current: Arc::new(ArcSwap::from_pointee(snapshot)),
            stale: Arc::new(AtomicBool::new(false)),
        })
    }

    /// Reloads every `interval` until `shutdown` resolves. Reconnects when the connection broke.
    pub async fn refresh_loop(
        self,
        url: String,
        mut client: Option<Client>,
        interval: Duration,
        events: Arc<Events>,
        mut shutdown: tokio::sync::watch::Receiver<bool>,
    ) {
        let mut ticker = tokio::time::interval(interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ticker.tick().await;
        loop {
            tokio::select! {
                _ = shutdown.changed() => return,
                _ = ticker.tick() => {}
            }
            let c = match client.take().filter(|c| !c.is_closed()) {
                Some(c) => c,
                None => match db::connect(&url).await {
                    Ok(c) => c,
                    Err(e) => {
                        self.mark_stale(&events, &e);
                        continue;
                    }
                },
            };
            let next_version = self.snapshot().version() + 1;
            match load_snapshot(&c, next_version).await {
                Ok(next) => {
                    self.stale.store(false, Ordering::Relaxed);
                    events.cache_stale.store(false, Ordering::Relaxed);
                    if !next.same_content(&self.snapshot()) {
                        tracing::info!(
                            version = next.version(),
                            subscriptions = next.subscriptions(),
                            restaurants = next.restaurants(),
                            "Subscriber snapshot changed; swapped in."
                        );
                        self.current.store(Arc::new(next));
                    }
                    client = Some(c);
                }
                Err(e) => self.mark_stale(&events, &e),
            }
        }
    }

    fn mark_stale(&self, events: &Events, e: &DbError) {
        if !self.stale.swap(true, Ordering::Relaxed) {
            tracing::warn!(error = %e, "Subscriber refresh failed; joins use the last snapshot, which may be stale.");
        }
        events.cache_stale.store(true, Ordering::Relaxed);
    }
}

async fn load_snapshot(client: &Client, version: u64) -> Result<Snapshot, DbError> {
    let started = Instant::now();
    let rows = client
        .query(SUBSCRIPTIONS_SQL, &[])
        .await
        .map_err(DbError::from_pg)?;
    let snapshot = Snapshot::from_rows(version, rows.into_iter().map(|r| (r.get(0), r.get(1))));
    tracing::debug!(
        version,
        rows = snapshot.rows(),
        subscriptions = snapshot.subscriptions(),
        elapsed_ms = started.elapsed().as_millis() as u64,
        "Subscriber snapshot loaded."
    );
    Ok(snapshot)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn duplicates_collapse_and_unknown_restaurants_are_empty() {
        let s = Snapshot::from_rows(
            1,
            [("r1", "c2"), ("r1", "c1"), ("r2", "c9"), ("r2", "c9")]
                .into_iter()
                .map(|(r, c)| (r.to_string(), c.to_string())),
        );
        assert_eq!(s.clients("r1"), ["c1", "c2"]);
        assert_eq!(s.clients("r2"), ["c9"]);
        assert!(s.clients("r3").is_empty());
        assert_eq!((s.rows(), s.subscriptions(), s.restaurants()), (4, 3, 2));
    }
}
