//! Loading and following `subscribers_restaurants`: the first load (a binary COPY), the
//! LISTEN/NOTIFY feed applied as overlays, a full resync after a lost connection (LISTEN first,
//! then COPY, then what arrived meanwhile, in commit order) and on a timer as a safety net.
//! Readers are never blocked: each new snapshot is swapped in whole.

use super::{Base, BaseBuilder, CacheChange, Snapshot, SubscriberCache};
use crate::db::DbError;
use crate::events::Events;
use crate::retry::{stopped, Backoff};
use arc_swap::ArcSwap;
use futures::{pin_mut, StreamExt};
use prometheus::{IntCounter, IntGauge, Opts};
use serde::Deserialize;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{broadcast, mpsc, watch};
use tokio_postgres::binary_copy::BinaryCopyOutStream;
use tokio_postgres::types::Type;
use tokio_postgres::{AsyncMessage, Client};

const COPY_SQL: &str = include_str!("../sql/copy_subscriptions.sql");
/// The channel the triggers of `sql/subscriptions_feed.sql` notify.
pub const CHANNEL: &str = "campaign_runner_subscriptions";
/// More overlay entries than this, and the next change triggers a full resync (a new base).
const OVERLAY_LIMIT: usize = 100_000;
/// Changes kept for a follower that falls behind; past that it is told it lagged (and the
/// scheduler audits every active campaign instead).
const CHANGES_QUEUE: usize = 4096;
/// The condition `/health` reports while the cache is stale.
pub const STALE: &str = "subscriber_cache_stale";

/// The notification payload written by the triggers.
#[derive(Debug, Deserialize)]
struct Notification {
    #[serde(default)]
    resync: bool,
    #[serde(default)]
    changes: Vec<(String, String, bool)>,
}

/// What the listening connection reports.
#[derive(Debug)]
enum Feed {
    Notification(String),
    Lost(String),
}

/// The cache's own metrics, labelled with its pipeline.
struct CacheMetrics {
    stale: IntGauge,
    resyncs: IntCounter,
}

impl CacheMetrics {
    fn new(events: &Events) -> CacheMetrics {
        let labels = |name: &str, help: &str| {
            Opts::new(name, help).const_label("pipeline", events.pipeline())
        };
        let stale = IntGauge::with_opts(labels(
            "runner_subscriber_cache_stale",
            "1 while the subscriber snapshot is known to be stale.",
        ))
        .expect("a valid gauge");
        let resyncs = IntCounter::with_opts(labels(
            "runner_subscriber_resyncs_total",
            "Full loads of the subscriber table.",
        ))
        .expect("a valid counter");
        for c in [
            Box::new(stale.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(resyncs.clone()),
        ] {
            if let Err(e) = events.metrics().registry.register(c) {
                tracing::debug!(error = %e, "The subscriber cache's metrics are registered already.");
            }
        }
        CacheMetrics { stale, resyncs }
    }
}

impl SubscriberCache {
    /// Loads the first snapshot and starts following changes; returns once the cache is fresh.
    /// The follower runs until `shutdown` turns true.
    pub async fn start(
        url: String,
        full_resync_interval: Duration,
        events: Arc<Events>,
        shutdown: watch::Receiver<bool>,
    ) -> Result<(SubscriberCache, tokio::task::JoinHandle<()>), DbError> {
        let (fresh_tx, fresh_rx) = watch::channel(false);
        let current = Arc::new(ArcSwap::from_pointee(Snapshot::default()));
        let resyncs = Arc::new(AtomicU64::new(0));
        let (changes, _) = broadcast::channel(CHANGES_QUEUE);
        let mut follower = Follower {
            url,
            current: current.clone(),
            fresh: fresh_tx,
            metrics: CacheMetrics::new(&events),
            events,
            resyncs: resyncs.clone(),
            version: 0,
            changes: changes.clone(),
        };
        // The first connection and load happen here, so a broken database fails the start.
        let feed = follower.connect_and_resync().await?;
        let cache = SubscriberCache {
            current,
            fresh: fresh_rx,
            resyncs,
            changes,
        };
        let task = tokio::spawn(follower.run(feed, full_resync_interval, shutdown));
        Ok((cache, task))
    }
}

struct Follower {
    url: String,
    current: Arc<ArcSwap<Snapshot>>,
    fresh: watch::Sender<bool>,
    events: Arc<Events>,
    metrics: CacheMetrics,
    resyncs: Arc<AtomicU64>,
    version: u64,
    /// What changed, for whoever follows the subscriptions (the campaign scheduler).
    changes: broadcast::Sender<Arc<CacheChange>>,
}

struct Connected {
    client: Client,
    feed: mpsc::UnboundedReceiver<Feed>,
}

impl Follower {
    fn set_fresh(&self, fresh: bool) {
        self.fresh.send_replace(fresh);
        self.events.condition(STALE, !fresh);
        self.metrics.stale.set(i64::from(!fresh));
    }

    /// LISTEN first, then COPY, then apply what arrived meanwhile: nothing is missed.
    async fn connect_and_resync(&mut self) -> Result<Connected, DbError> {
        let (client, mut connection) = crate::db::open(&self.url).await?;
        let (tx, feed) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            let stream = futures::stream::poll_fn(move |cx| connection.poll_message(cx));
            pin_mut!(stream);
            while let Some(m) = stream.next().await {
                match m {
                    Ok(AsyncMessage::Notification(n)) => {
                        let _ = tx.send(Feed::Notification(n.payload().to_string()));
                    }
                    Ok(_) => {}
                    Err(e) => {
                        let _ = tx.send(Feed::Lost(e.to_string()));
                        return;
                    }
                }
            }
            let _ = tx.send(Feed::Lost("the connection closed".into()));
        });
        client
            .batch_execute(&format!("LISTEN {CHANNEL}"))
            .await
            .map_err(DbError::from_pg)?;
        let mut connected = Connected { client, feed };
        self.resync(&mut connected).await?;
        Ok(connected)
    }

    async fn resync(&mut self, c: &mut Connected) -> Result<(), DbError> {
        let started = Instant::now();
        let base = load_base(&c.client).await?;
        self.version += 1;
        let mut snapshot = Snapshot::from_base(self.version, base);
        // Notifications that arrived during the COPY, in commit order, on top of it.
        while let Ok(f) = c.feed.try_recv() {
            match f {
                Feed::Notification(p) => match serde_json::from_str::<Notification>(&p) {
                    Ok(n) if !n.resync => {
                        snapshot = snapshot.with_changes(self.version, &n.changes)
                    }
                    _ => {}
                },
                Feed::Lost(e) => return Err(DbError::FeedLost(e)),
            }
        }
        tracing::info!(
            version = snapshot.version(),
            rows = snapshot.rows(),
            subscriptions = snapshot.subscriptions(),
            restaurants = snapshot.restaurants(),
            elapsed_ms = started.elapsed().as_millis() as u64,
            "Subscriber snapshot loaded in full."
        );
        let version = snapshot.version();
        self.current.store(Arc::new(snapshot));
        // Nobody listening is fine.
        let _ = self
            .changes
            .send(Arc::new(CacheChange::Reloaded { version }));
        self.resyncs.fetch_add(1, Ordering::Relaxed);
        self.metrics.resyncs.inc();
        self.set_fresh(true);
        Ok(())
    }

    async fn run(
        mut self,
        mut connected: Connected,
        full_resync_interval: Duration,
        mut shutdown: watch::Receiver<bool>,
    ) {
        let mut periodic = tokio::time::interval(full_resync_interval);
        periodic.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        periodic.tick().await;
        loop {
            let lost = tokio::select! {
                _ = stopped(&mut shutdown) => return,
                _ = periodic.tick() => self.resync(&mut connected).await.err().map(|e| e.to_string()),
                f = connected.feed.recv() => match f {
                    Some(Feed::Notification(p)) => self.apply(&mut connected, &p).await,
                    Some(Feed::Lost(e)) => Some(e),
                    None => Some("the connection task ended".into()),
                },
            };
            let Some(reason) = lost else { continue };
            // Stale from here until a full resync on a new connection succeeds.
            self.set_fresh(false);
            tracing::warn!(error = %reason, "Subscriber feed lost; the cache is stale until a full resync.");
            let mut backoff = Backoff::new(Duration::from_secs(2));
            connected = loop {
                if *shutdown.borrow() {
                    return;
                }
                match self.connect_and_resync().await {
                    Ok(c) => break c,
                    Err(e) => {
                        let waited = backoff
                            .wait(&mut shutdown, |attempt, _| {
                                tracing::warn!(error = %e, attempt, "Subscriber resync failed; retrying.")
                            })
                            .await;
                        if waited.is_err() {
                            return;
                        }
                    }
                }
            };
            tracing::info!("Subscriber cache resynchronised; fresh again.");
        }
    }

    /// Applies one notification; Some(reason) when the connection must be rebuilt.
    async fn apply(&mut self, c: &mut Connected, payload: &str) -> Option<String> {
        let n: Notification = match serde_json::from_str(payload) {
            Ok(n) => n,
            Err(e) => {
                tracing::warn!(error = %e, payload, "Unreadable subscriber notification; resyncing.");
                Notification {
                    resync: true,
                    changes: Vec::new(),
                }
            }
        };
        let current = self.current.load_full();
        if n.resync || current.overlay_len() > OVERLAY_LIMIT {
            return self.resync(c).await.err().map(|e| e.to_string());
        }
        self.version += 1;
        let next = current.with_changes(self.version, &n.changes);
        tracing::debug!(
            version = next.version(),
            changes = n.changes.len(),
            "Subscriber changes applied."
        );
        self.current.store(Arc::new(next));
        let present: Vec<(String, String)> = n
            .changes
            .into_iter()
            .filter(|(_, _, exists)| *exists)
            .map(|(restaurant, client, _)| (restaurant, client))
            .collect();
        if !present.is_empty() {
            let _ = self.changes.send(Arc::new(CacheChange::Present {
                version: self.version,
                pairs: present,
            }));
        }
        None
    }
}

async fn load_base(client: &Client) -> Result<Base, DbError> {
    let copy = client.copy_out(COPY_SQL).await.map_err(DbError::from_pg)?;
    let rows = BinaryCopyOutStream::new(copy, &[Type::VARCHAR, Type::VARCHAR]);
    pin_mut!(rows);
    let mut builder = BaseBuilder::default();
    while let Some(row) = rows.next().await {
        let row = row.map_err(DbError::from_pg)?;
        builder.push(
            row.try_get::<&str>(0).map_err(DbError::from_pg)?,
            row.try_get::<&str>(1).map_err(DbError::from_pg)?,
        );
    }
    Ok(builder.build())
}
