//! The subscriber cache at scale: N subscriptions over M restaurants (default 10,000,000 over
//! 100,000), loaded by the runner's own code (LISTEN + binary COPY). Reports load time, rows/s,
//! resident memory per subscription, and lookup latency idle and while a full reload runs.

use crate::report::{percentile, Report};
use anyhow::{Context, Result};
use runner::events::Events;
use runner::pipelines::campaigns::cache::SubscriberCache;
use std::sync::Arc;
use std::time::{Duration, Instant};

const DATABASE: &str = "bench_cache";

fn rss_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    statm
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse::<u64>().ok())
        .unwrap_or(0)
        * 4096
}

fn restaurant(i: u64) -> String {
    format!("00000000-0000-4000-8000-{i:012x}")
}

/// Creates the data set unless the database already holds exactly it.
async fn prepare(admin_url: &str, subscriptions: u64, restaurants: u64) -> Result<String> {
    let admin = runner::db::connect(admin_url).await?;
    let exists = admin
        .query_opt("SELECT 1 FROM pg_database WHERE datname = $1", &[&DATABASE])
        .await?
        .is_some();
    if !exists {
        admin
            .batch_execute(&format!("CREATE DATABASE {DATABASE}"))
            .await?;
    }
    let mut cfg: tokio_postgres::Config = admin_url.parse()?;
    cfg.dbname(DATABASE);
    let url = format!(
        "host=127.0.0.1 port={} user={} dbname={DATABASE}",
        cfg.get_ports().first().copied().unwrap_or(5432),
        cfg.get_user().unwrap_or("postgres")
    );
    let db = runner::db::connect(&url).await?;
    let have: Option<i64> = db
        .query_opt(
            "SELECT count(*) FROM public.subscribers_restaurants WHERE EXISTS (SELECT 1 FROM pg_tables WHERE tablename = 'subscribers_restaurants')",
            &[],
        )
        .await
        .ok()
        .flatten()
        .map(|r| r.get(0));
    let distinct_restaurants: Option<i64> = match have {
        Some(n) if n as u64 == subscriptions => db
            .query_one(
                "SELECT count(DISTINCT restaurant_id) FROM public.subscribers_restaurants",
                &[],
            )
            .await
            .ok()
            .map(|r| r.get(0)),
        _ => None,
    };
    if distinct_restaurants != Some(restaurants as i64) {
        eprintln!("bench cache: generating {subscriptions} subscriptions over {restaurants} restaurants (once; kept in database {DATABASE})");
        db.batch_execute("DROP TABLE IF EXISTS public.subscribers_restaurants CASCADE; DROP TABLE IF EXISTS public.subscribers_feedback")
            .await?;
        db.batch_execute(runner::pipelines::campaigns::schema::SCHEMA_SQL)
            .await?;
        let chunk = 1_000_000u64;
        let mut done = 0;
        while done < subscriptions {
            let n = chunk.min(subscriptions - done);
            db.batch_execute(&format!(
                "INSERT INTO public.subscribers_restaurants (client_id, restaurant_id) \
                 SELECT gen_random_uuid()::text, '00000000-0000-4000-8000-' || lpad(to_hex(g % {restaurants}), 12, '0') \
                 FROM generate_series({done}, {}) g",
                done + n - 1
            ))
            .await?;
            done += n;
            eprintln!("bench cache:   {done} / {subscriptions} rows");
        }
    }
    // Index and triggers as the runner installs them (the index builds in bulk here).
    runner::pipelines::campaigns::ensure_schema(&db)
        .await
        .context("installing the runner's schema objects")?;
    db.batch_execute("VACUUM ANALYZE public.subscribers_restaurants")
        .await?;
    Ok(url)
}

/// Looks up random restaurants until `until` returns true (or `max` lookups); latencies in µs.
fn lookups(
    cache: &SubscriberCache,
    restaurants: u64,
    max: usize,
    until: impl Fn() -> bool,
) -> (Vec<f64>, usize) {
    let keys: Vec<String> = (0..4096u64)
        .map(|i| restaurant(i.wrapping_mul(2_654_435_761) % restaurants))
        .collect();
    let mut lat = Vec::with_capacity(max.min(1 << 20));
    let mut found = 0;
    for i in 0..max {
        if i % 256 == 0 && until() {
            break;
        }
        let key = &keys[i % keys.len()];
        let t = Instant::now();
        let snapshot = cache.snapshot();
        found += std::hint::black_box(snapshot.clients(key).count());
        lat.push(t.elapsed().as_secs_f64() * 1e6);
    }
    (lat, found)
}

pub async fn run(
    admin_url: &str,
    subscriptions: u64,
    restaurants: u64,
    runs: usize,
) -> Result<Report> {
    let url = prepare(admin_url, subscriptions, restaurants).await?;
    let mut report = Report::new("cache");
    let (mut load_s, mut rows_s, mut rss_b, mut heap_b) = (vec![], vec![], vec![], vec![]);
    let (mut idle, mut during, mut resync_s) = (vec![], vec![], vec![]);
    for run in 1..=runs {
        let events = Arc::new(Events::default());
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let before = rss_bytes();
        let t = Instant::now();
        let (cache, task) = SubscriberCache::start(
            url.clone(),
            Duration::from_secs(3600),
            events.clone(),
            stop_rx,
        )
        .await?;
        let load = t.elapsed().as_secs_f64();
        let after = rss_bytes();
        let snapshot = cache.snapshot();
        let subs = snapshot.subscriptions() as f64;
        eprintln!(
            "bench cache: run {run}/{runs}: loaded {} rows ({} subscriptions, {} restaurants) in {load:.2} s; RSS +{} MiB",
            snapshot.rows(),
            snapshot.subscriptions(),
            snapshot.restaurants(),
            (after.saturating_sub(before)) >> 20
        );
        load_s.push(load);
        rows_s.push(snapshot.rows() as f64 / load);
        rss_b.push(after.saturating_sub(before) as f64 / subs);
        heap_b.push(snapshot.heap_bytes() as f64 / subs);
        drop(snapshot);

        let (lat, _) = lookups(&cache, restaurants, 200_000, || false);
        idle.extend(lat);
        // A full reload in the background, readers going on meanwhile.
        let db = runner::db::connect(&url).await?;
        let t = Instant::now();
        db.batch_execute(&format!(
            "NOTIFY {}, '{{\"resync\":true}}'",
            runner::pipelines::campaigns::cache::CHANNEL
        ))
        .await?;
        let c2 = cache.clone();
        let c3 = cache.clone();
        let (lat, _) = tokio::task::spawn_blocking(move || {
            lookups(&c2, restaurants, usize::MAX, || c3.resyncs() >= 2)
        })
        .await?;
        resync_s.push(t.elapsed().as_secs_f64());
        eprintln!(
            "bench cache: run {run}/{runs}: {} lookups while the reload ran ({:.2} s)",
            lat.len(),
            t.elapsed().as_secs_f64()
        );
        during.extend(lat);
        let _ = stop_tx.send(true);
        let _ = task.await;
    }
    report.add("load time", "s", load_s, Some(("<=", 10.0)));
    report.add("load rate", "rows/s", rows_s, None);
    report.add(
        "resident memory per subscription",
        "bytes",
        rss_b,
        Some(("<=", 48.0)),
    );
    report.add(
        "snapshot structures per subscription",
        "bytes",
        heap_b,
        None,
    );
    report.add("full reload (while serving)", "s", resync_s, None);
    for (name, lat) in [
        ("lookup, idle", &idle),
        ("lookup, during a full reload", &during),
    ] {
        report.add(
            &format!("{name}: p50"),
            "µs",
            vec![percentile(lat, 50.0)],
            None,
        );
        report.add(
            &format!("{name}: p99"),
            "µs",
            vec![percentile(lat, 99.0)],
            None,
        );
        report.add(
            &format!("{name}: max"),
            "µs",
            vec![percentile(lat, 100.0)],
            None,
        );
    }
    report.notes.push(format!(
        "{subscriptions} subscriptions over {restaurants} restaurants; a lookup takes the current snapshot and counts one restaurant's distinct clients (~{} each). Resident memory is the process RSS growth across the load.",
        subscriptions / restaurants.max(1)
    ));
    Ok(report)
}
