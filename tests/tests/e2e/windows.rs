//! The store-revenue pipeline end to end, on librdkafka's mock cluster and a real PostgreSQL:
//! exact sums, late sales, idle partitions, skewed and unkeyed partitions, bad input, restarts.

use e2e_tests::*;
use rdkafka::message::Message;
use runner::app::RunOptions;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

/// A multiple of 30: window starts are t0 + 30k.
const T0: i64 = 1_764_255_600;

fn at(now: i64) -> RunOptions {
    RunOptions {
        clock: Arc::new(FixedClock(now)),
        ..RunOptions::default()
    }
}

/// `store_revenue_windows`, keyed by (store, window start): (total as text, events, final).
async fn windows(db: &TestDb) -> anyhow::Result<BTreeMap<(String, i64), (String, i64, bool)>> {
    let rows = db
        .client()
        .await?
        .query(
            "SELECT store, extract(epoch FROM window_start)::int8, total::text, events, final, \
             total_minor, total_revenue_int, extract(epoch FROM window_end - window_start)::int8 \
             FROM store_revenue_windows",
            &[],
        )
        .await?;
    let mut out = BTreeMap::new();
    for r in rows {
        let total_minor: i64 = r.get(5);
        let total_int: i64 = r.get(6);
        assert_eq!(total_int, total_minor / 100, "total_revenue_int truncates");
        assert_eq!(r.get::<_, i64>(7), 30, "30-second windows");
        out.insert((r.get(0), r.get(1)), (r.get(2), r.get(3), r.get(4)));
    }
    Ok(out)
}

fn row(total: &str, events: i64, fin: bool) -> (String, i64, bool) {
    (total.to_string(), events, fin)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exact_sums_late_sales_and_bad_input_on_a_hand_computed_example() -> anyhow::Result<()> {
    let kafka = SalesKafka::new(1)?;
    let db = TestDb::new().await?;
    // Processing time far behind the sales' event time: no partition turns idle-final here.
    let running = start(sales_config(&kafka, &db, ""), at(T0 - 3600)).await?;
    let send = |store: &'static str, price: &'static str, ts: i64| {
        let k = &kafka;
        async move { k.send(None, Some(store), &sale(store, price, ts)).await }
    };
    send("s1", "0.10", T0).await?; // the first second of [T0, T0+30)
    send("s1", "0.20", T0 + 29).await?; // its last second
    send("s2", "1.00", T0 + 31).await?;
    send("s1", "5.55", T0 + 65).await?; // watermark T0+35
    send("s1", "9.99", T0 + 10).await?; // [T0, T0+30) ends at T0+30 <= T0+35: late
    send("s2", "2.50", T0 + 40).await?; // out of order, within lateness: counted
    for bad in [
        "not json",
        r#"{"store":"s1","item":"x","price":-1,"ts":1764255700}"#,
        r#"{"store":"s1","item":"x","price":"3","ts":1764255700}"#,
        r#"{"store":"s1","item":"x","price":0.105,"ts":1764255700}"#,
    ] {
        kafka.send(None, Some("s1"), bad).await?;
    }
    // Moves the watermark to T0+170: the first three windows become final.
    send("s3", "0.01", T0 + 200).await?;
    assert!(
        db.wait_count(
            "SELECT count(*) FROM store_revenue_windows WHERE final",
            3,
            Duration::from_secs(20)
        )
        .await,
        "{:?}",
        windows(&db).await?
    );
    let w = windows(&db).await?;
    let key = |s: &str, t: i64| (s.to_string(), t);
    assert_eq!(
        w[&key("s1", T0)],
        row("0.30", 2, true),
        "0.10 + 0.20 is exactly 0.30"
    );
    assert_eq!(w[&key("s2", T0 + 30)], row("3.50", 2, true));
    assert_eq!(w[&key("s1", T0 + 60)], row("5.55", 1, true));
    assert_eq!(w[&key("s3", T0 + 180)], row("0.01", 1, false));
    assert_eq!(w.len(), 4);

    let finals = kafka.read_at_least(&kafka.output, 3).await?;
    assert_eq!(finals.len(), 3, "one record per final window");
    let first = finals
        .iter()
        .map(json)
        .find(|v| v["store"] == "s1" && v["window_start"] == "2025-11-27T15:00:00Z")
        .expect("the final record of s1's first window");
    assert_eq!(first["window_end"], "2025-11-27T15:00:30Z");
    assert_eq!(first["total_minor"], 30);
    assert_eq!(first["events"], 2);
    assert_eq!(first["final"], true);
    assert!(finals
        .iter()
        .all(|m| m.key() == Some(json(m)["store"].as_str().unwrap().as_bytes())));

    let dead = kafka.read_at_least(&kafka.dlq, 5).await?;
    let reasons: Vec<&str> = dead
        .iter()
        .map(|m| header(m, "dlq-reason").unwrap_or("-"))
        .collect();
    assert_eq!(
        reasons,
        [
            "late",
            "malformed_json",
            "negative_price",
            "wrong_type",
            "too_precise"
        ]
    );
    let late = &dead[0];
    assert_eq!(header(late, "window-start"), Some("2025-11-27T15:00:00Z"));
    assert_eq!(header(late, "window-end"), Some("2025-11-27T15:00:30Z"));
    assert_eq!(late.payload(), Some(sale("s1", "9.99", T0 + 10).as_bytes()));
    assert_eq!(late.key(), Some(&b"s1"[..]));

    let stats = running.store_revenue().stats();
    let ws = stats.windows.clone().expect("window stats");
    assert_eq!(ws.late, 1);
    assert_eq!(stats.dead_lettered("late"), 1);
    assert_eq!(stats.delivered, 6, "six sales counted");
    assert_eq!(ws.global_watermark, Some(T0 + 170));
    running.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_partitions_last_window_becomes_final() -> anyhow::Result<()> {
    let kafka = SalesKafka::new(2)?;
    let db = TestDb::new().await?;
    // Processing time 1,000 s after the sale: once both partitions are idle (caught up and
    // quiet for idle_after), their watermarks are now - 30 s, past the window's end.
    let running = start(sales_config(&kafka, &db, ""), at(T0 + 1000)).await?;
    kafka
        .send(Some(0), Some("s1"), &sale("s1", "4.20", T0 + 5))
        .await?;
    assert!(
        db.wait_count(
            "SELECT count(*) FROM store_revenue_windows WHERE final AND total = 4.20",
            1,
            Duration::from_secs(20)
        )
        .await,
        "{:?}",
        windows(&db).await?
    );
    let finals = kafka.read_at_least(&kafka.output, 1).await?;
    assert_eq!(finals.len(), 1);
    let ws = running
        .store_revenue()
        .stats()
        .windows
        .expect("window stats");
    assert!(ws.partitions.values().all(|p| p.idle), "{ws:?}");
    assert_eq!(ws.global_watermark, Some(T0 + 970));
    running.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partition_far_ahead_does_not_make_another_partitions_sales_late() -> anyhow::Result<()> {
    let kafka = SalesKafka::new(2)?;
    let db = TestDb::new().await?;
    let running = start(sales_config(&kafka, &db, ""), at(T0 - 3600)).await?;
    // Partition 0 is an hour ahead of partition 1.
    kafka
        .send(Some(0), Some("a"), &sale("a", "1.00", T0 + 3600))
        .await?;
    kafka
        .send(Some(0), Some("a"), &sale("a", "1.00", T0 + 3601))
        .await?;
    kafka
        .send(Some(1), Some("b"), &sale("b", "2.00", T0))
        .await?;
    kafka
        .send(Some(1), Some("b"), &sale("b", "3.00", T0 + 1))
        .await?;
    assert!(
        db.wait_count(
            "SELECT count(*) FROM store_revenue_windows WHERE store = 'b' AND events = 2",
            1,
            Duration::from_secs(20)
        )
        .await,
        "{:?}",
        windows(&db).await?
    );
    // Not final: partition 1's watermark (T0 - 29) holds the topic's back.
    let w = windows(&db).await?;
    assert_eq!(w[&("b".to_string(), T0)], row("5.00", 2, false));
    // Partition 1 catches up: now every window before T0+3570 is final.
    kafka
        .send(Some(1), Some("b"), &sale("b", "1.00", T0 + 3600))
        .await?;
    assert!(
        db.wait_count(
            "SELECT count(*) FROM store_revenue_windows WHERE store = 'b' AND final",
            1,
            Duration::from_secs(20)
        )
        .await
    );
    let stats = running.store_revenue().stats();
    assert_eq!(stats.dead_lettered("late"), 0, "{stats:?}");
    assert_eq!(
        windows(&db).await?[&("b".to_string(), T0)],
        row("5.00", 2, true)
    );
    running.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unkeyed_sales_of_one_store_on_several_partitions_are_summed_once() -> anyhow::Result<()> {
    let kafka = SalesKafka::new(3)?;
    let db = TestDb::new().await?;
    let running = start(sales_config(&kafka, &db, ""), at(T0 - 3600)).await?;
    let mut expected_minor = 0;
    for i in 0..30i64 {
        let p = (i % 3) as i32;
        let price = format!("{}.{:02}", i, i);
        expected_minor += i * 100 + i;
        kafka
            .send(Some(p), None, &sale("s", &price, T0 + i % 30))
            .await?;
    }
    // Every partition moves past the window.
    for p in 0..3 {
        kafka
            .send(Some(p), None, &sale("marker", "0", T0 + 100))
            .await?;
    }
    assert!(
        db.wait_count(
            "SELECT count(*) FROM store_revenue_windows WHERE store = 's' AND final",
            1,
            Duration::from_secs(20)
        )
        .await,
        "{:?}",
        windows(&db).await?
    );
    let rows = db
        .client()
        .await?
        .query_one(
            "SELECT total_minor, events FROM store_revenue_windows WHERE store = 's'",
            &[],
        )
        .await?;
    assert_eq!(rows.get::<_, i64>(0), expected_minor);
    assert_eq!(rows.get::<_, i64>(1), 30);
    let finals = kafka.read_at_least(&kafka.output, 1).await?;
    let of_s: Vec<_> = finals
        .iter()
        .map(json)
        .filter(|v| v["store"] == "s")
        .collect();
    assert_eq!(
        of_s.len(),
        1,
        "one final record, whichever partition made it final"
    );
    assert_eq!(of_s[0]["total_minor"], expected_minor);
    running.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_resumes_from_the_committed_state_without_counting_twice() -> anyhow::Result<()> {
    let kafka = SalesKafka::new(2)?;
    let db = TestDb::new().await?;
    // The mock cluster frees a closed member's partitions only when its session times out.
    let cfg = sales_config(
        &kafka,
        &db,
        "[kafka.consumer_properties]\n\"session.timeout.ms\" = \"6000\"\n",
    );
    let mut expected: BTreeMap<(String, i64), i64> = BTreeMap::new();
    let mut sent = 0;
    for round in 0..3 {
        let running = start(cfg.clone(), at(T0 - 3600)).await?;
        for i in 0..40i64 {
            let store = format!("s{}", i % 4);
            let ts = T0 + round * 40 + i;
            let minor = 100 + i;
            *expected
                .entry((store.clone(), ts.div_euclid(30) * 30))
                .or_default() += minor;
            let price = format!("{}.{:02}", minor / 100, minor % 100);
            kafka
                .send(None, Some(&store), &sale(&store, &price, ts))
                .await?;
            sent += 1;
        }
        let want = sent;
        assert!(
            wait_for(Duration::from_secs(40), || running
                .store_revenue()
                .stats()
                .windows
                .as_ref()
                .is_some_and(|w| w
                    .partitions
                    .values()
                    .map(|p| p.next_offset)
                    .sum::<i64>()
                    >= want))
            .await,
            "{:?}",
            running.store_revenue().stats()
        );
        running.stop().await?;
    }
    let w = windows(&db).await?;
    let got: BTreeMap<(String, i64), i64> = db
        .client()
        .await?
        .query("SELECT store, extract(epoch FROM window_start)::int8, total_minor FROM store_revenue_windows", &[])
        .await?
        .iter()
        .map(|r| ((r.get(0), r.get(1)), r.get(2)))
        .collect();
    assert_eq!(got, expected, "{w:?}");
    // Every final window published once.
    let finals = w.values().filter(|(_, _, f)| *f).count();
    let records = kafka.read_at_least(&kafka.output, finals).await?;
    let mut seen = std::collections::BTreeSet::new();
    for r in &records {
        let v = json(r);
        assert!(
            seen.insert((v["store"].to_string(), v["window_start"].to_string())),
            "published twice: {v}"
        );
    }
    assert_eq!(records.len(), finals);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_sales_rules_are_swapped_in_while_running_and_nothing_is_lost() -> anyhow::Result<()> {
    let kafka = SalesKafka::new(1)?;
    let db = TestDb::new().await?;
    let dir = tempfile::tempdir()?;
    let rules = dir.path().join("sales-rules.wasm");
    std::fs::copy(sales_wasm(), &rules)?;
    let cfg = sales_config(
        &kafka,
        &db,
        &format!(
            "[pipelines.store_revenue.rules]\npath = \"{}\"\nwatch = true\nsettle = \"100ms\"\n",
            rules.display()
        ),
    );
    let running = start(cfg, at(T0 - 3600)).await?;
    let sr = running.store_revenue();
    kafka.send(None, Some("s"), &sale("s", "1.10", T0)).await?;
    kafka.send(None, Some("s"), "before the swap").await?;
    assert!(
        wait_for(Duration::from_secs(20), || sr
            .stats()
            .dead_lettered("malformed_json")
            == 1)
        .await
    );
    replace_atomically(&fixture("sales-rules-v2.wasm"), &rules)?;
    assert!(
        wait_for(Duration::from_secs(20), || sr
            .stats()
            .rules
            .version
            .ends_with("+v2"))
        .await,
        "{:?}",
        sr.stats().rules
    );
    kafka
        .send(None, Some("s"), &sale("s", "2.20", T0 + 1))
        .await?;
    kafka.send(None, Some("s"), "after the swap").await?;
    let dead = kafka.read_at_least(&kafka.dlq, 2).await?;
    let versions: Vec<_> = dead
        .iter()
        .map(|m| header(m, "rules-version").unwrap_or("-").to_string())
        .collect();
    assert_eq!(versions, ["sales-rules 1.0.0", "sales-rules 1.0.0+v2"]);
    assert!(
        db.wait_count(
            "SELECT count(*) FROM store_revenue_windows WHERE total = 3.30 AND events = 2",
            1,
            Duration::from_secs(20)
        )
        .await,
        "{:?}",
        windows(&db).await?
    );
    assert_eq!(sr.stats().rules.swaps, 1);
    running.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_the_table_cannot_hold_is_dead_lettered_and_the_partition_goes_on(
) -> anyhow::Result<()> {
    let kafka = SalesKafka::new(1)?;
    let db = TestDb::new().await?;
    let running = start(sales_config(&kafka, &db, ""), at(T0 - 3600)).await?;
    kafka.send(None, Some("s"), &sale("s", "1.00", T0)).await?;
    // Valid JSON and UTF-8, accepted by the rules; a PostgreSQL text column refuses it.
    let nul = r#"{"store":"s\u0000x","item":"coffee","price":2.00,"ts":1764255601}"#;
    kafka.send(None, Some("s"), nul).await?;
    kafka
        .send(None, Some("s"), &sale("s", "3.00", T0 + 2))
        .await?;
    assert!(
        db.wait_count(
            "SELECT count(*) FROM store_revenue_windows WHERE total = 4.00 AND events = 2",
            1,
            Duration::from_secs(20)
        )
        .await,
        "{:?}",
        windows(&db).await?
    );
    let dead = kafka.read_at_least(&kafka.dlq, 1).await?;
    assert_eq!(dead.len(), 1);
    assert_eq!(header(&dead[0], "dlq-reason"), Some("sink_refused"));
    assert_eq!(dead[0].payload(), Some(nul.as_bytes()));
    running.stop().await?;
    Ok(())
}
