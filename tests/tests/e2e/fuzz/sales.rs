//! The store-revenue pipeline end to end on generated messages: one runner on the mock cluster
//! (two input partitions) and a real database, fed batch after batch of sales with any key (or
//! none), any value (or none: empty, past the size limit, not UTF-8, nested deep, sales of any
//! shape with stores of any text, prices of any form, event times in and out of order, edits
//! of them) and any headers, each batch followed by a marker sale on every partition, its
//! event times a while after the batch before.
//!
//! The properties: nothing panics or hangs (each marker is counted: the partition went on);
//! every message is accounted for as the rules natively say and as each partition's watermark
//! makes it — counted into its window, or dead-lettered with its reason (`late`, a rejection,
//! `sink_refused` for a store PostgreSQL cannot hold, `out_of_range` for a window whose sum
//! would pass 64 bits) — by the runner's counters and by the sinks: `store_revenue_windows`
//! holds exactly the sums counted, every dead letter carries its message's key, value and
//! headers, and every final window is published once.

use super::inputs::{self, SaleValue};
use super::{check_dead_letter, env_number, header_list, property, runtime, source_of};
use super::{Input, Reader, Sender, Tally};
use e2e_tests::*;
use proptest::collection::vec;
use proptest::prelude::*;
use proptest::test_runner::TestCaseError;
use runner::app::{RunOptions, Running};
use runner::events::Stats;
use sales_rules::rules::EVENT_TIME_END;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

const LIMIT: usize = 128 * 1024;
const DEADLINE: Duration = Duration::from_secs(60);
const WINDOW: i64 = 30;
const LATENESS: i64 = 30;
/// The first batch's base event time; each batch's is an hour or more after the last one's.
const T0: i64 = 1_764_255_600;
/// Decimal digits of the minor unit (the default: cents).
const MINOR_DIGITS: u8 = 2;

/// A partition's event-time progress, as the README defines it.
#[derive(Debug, Default, Clone, Copy)]
struct PartitionTime {
    max_event_time: Option<i64>,
    watermark: Option<i64>,
}

/// Everything one run of the property holds between batches.
struct World {
    /// The mock cluster lives as long as the property.
    _kafka: SalesKafka,
    db: TestDb,
    running: Option<Running>,
    sender: Sender,
    dead: Reader,
    output: Reader,
    partitions: [PartitionTime; 2],
    /// What `store_revenue_windows` must hold (markers aside): (store, window start) →
    /// (amount in minor units, sales).
    windows: BTreeMap<(String, i64), (i128, i64)>,
    base: i64,
    sent: u64,
    dead_letters: usize,
    batch: u64,
}

impl World {
    async fn start() -> anyhow::Result<World> {
        let kafka = SalesKafka::new(2)?;
        let db = TestDb::new().await?;
        let extra = format!(
            "[pipelines.store_revenue]\nmax_message_bytes = {LIMIT}\nwindow = \"{WINDOW}s\"\n\
             allowed_lateness = \"{LATENESS}s\"\nminor_digits = {MINOR_DIGITS}\n"
        );
        // Processing time before any sale: idle partitions hold no watermark of their own.
        let running = start(
            sales_config(&kafka, &db, &extra),
            RunOptions {
                clock: Arc::new(FixedClock(sales_rules::rules::EVENT_TIME_MIN - 3600)),
                ..RunOptions::default()
            },
        )
        .await?;
        Ok(World {
            sender: Sender::new(&kafka.brokers, &kafka.input)?,
            dead: Reader::new(&kafka.brokers, &kafka.dlq, 1)?,
            output: Reader::new(&kafka.brokers, &kafka.output, 2)?,
            _kafka: kafka,
            db,
            running: Some(running),
            partitions: Default::default(),
            windows: BTreeMap::new(),
            base: T0,
            sent: 0,
            dead_letters: 0,
            batch: 0,
        })
    }

    fn stats(&self) -> Stats {
        self.running
            .as_ref()
            .expect("the runner runs")
            .store_revenue()
            .stats()
    }

    /// What the runner must do with `value` on `partition`, as the rules say natively and the
    /// partition's watermark makes it: None when it is counted (and then counts it).
    fn expect(&mut self, partition: i32, value: Option<&[u8]>) -> Option<String> {
        let Some(value) = value else {
            return Some("missing_value".into());
        };
        if value.len() > LIMIT {
            return Some("oversized".into());
        }
        let sale = match sales_rules::rules::validate(value, MINOR_DIGITS) {
            Err(r) => return Some(super::rules::sales_code(r.code).into()),
            Ok(s) => s,
        };
        if sale.store.contains('\0') {
            return Some("sink_refused".into());
        }
        let time = &mut self.partitions[partition as usize];
        let start = sale.event_time.div_euclid(WINDOW) * WINDOW;
        if time.watermark.is_some_and(|w| start + WINDOW <= w) {
            return Some("late".into());
        }
        let slot = self
            .windows
            .entry((sale.store.to_string(), start))
            .or_default();
        if slot.0 + i128::from(sale.amount_minor) > i128::from(i64::MAX) {
            return Some("out_of_range".into());
        }
        slot.0 += i128::from(sale.amount_minor);
        slot.1 += 1;
        let max = time
            .max_event_time
            .map_or(sale.event_time, |m| m.max(sale.event_time));
        time.max_event_time = Some(max);
        time.watermark = Some(
            time.watermark
                .map_or(max - LATENESS, |w| w.max(max - LATENESS)),
        );
        None
    }

    async fn batch(&mut self, batch: &[Input<SaleValue>], tally: &mut Tally) -> Result<(), String> {
        self.batch += 1;
        let before = self.stats();
        let values: Vec<Option<Vec<u8>>> =
            batch.iter().map(|m| m.value.render(self.base)).collect();
        let mut expected: BTreeMap<(i32, i64), (usize, Option<String>)> = BTreeMap::new();
        for (i, m) in batch.iter().enumerate() {
            let at = self
                .sender
                .send(None, m.key.as_deref(), values[i].as_deref(), &m.headers)
                .await
                .map_err(|e| format!("sending message {i}: {e:#}"))?;
            let e = self.expect(at.0, values[i].as_deref());
            expected.insert(at, (i, e));
        }
        // A marker per partition, after every sale of the batch on it: never late.
        let mut markers = Vec::new();
        for p in 0..2 {
            let ts = self.partitions[p as usize]
                .max_event_time
                .unwrap_or(0)
                .max(self.base + 400)
                .min(EVENT_TIME_END - 1);
            let store = format!("marker-{}-{p}", self.batch);
            let value = sale(&store, "0.01", ts);
            self.sender
                .send(Some(p), None, Some(value.as_bytes()), &[])
                .await
                .map_err(|e| format!("sending the marker: {e:#}"))?;
            if let Some(why) = self.expect(p, Some(value.as_bytes())) {
                return Err(format!("the marker would be dead-lettered ({why})"));
            }
            self.windows
                .remove(&(store.clone(), ts.div_euclid(WINDOW) * WINDOW));
            markers.push(store);
        }
        self.sent += batch.len() as u64 + 2;
        let max_seen = self
            .partitions
            .iter()
            .filter_map(|t| t.max_event_time)
            .max()
            .unwrap_or(T0);
        self.base = (self.base + 3600).max(max_seen + 3600);

        // Nothing stuck: each partition went on to its marker.
        let sql = format!(
            "SELECT count(*) FROM store_revenue_windows WHERE store IN ('{}', '{}')",
            markers[0], markers[1]
        );
        if !self.db.wait_count(&sql, 2, DEADLINE).await {
            return Err(format!(
                "a partition is stuck: its marker was not counted within {DEADLINE:?}: {:?}",
                self.stats()
            ));
        }
        let n = batch.len() as u64 + 2;
        let running = self.running.as_ref().expect("runs");
        let settled = before.settled() + n;
        if !wait_for(DEADLINE, || {
            running.store_revenue().stats().settled() >= settled
        })
        .await
        {
            return Err(format!("not every message was settled: {:?}", self.stats()));
        }
        let after = self.stats();

        // The counters.
        let mut want_dead: BTreeMap<String, u64> = BTreeMap::new();
        let mut counted = 2;
        for (_, e) in expected.values() {
            match e {
                None => {
                    counted += 1;
                    tally.input("counted");
                }
                Some(r) => {
                    *want_dead.entry(r.clone()).or_default() += 1;
                    tally.input(format!("dead-lettered: {r}"));
                }
            }
        }
        check_eq("received", after.received - before.received, n)?;
        check_eq("settled", after.settled() - before.settled(), n)?;
        check_eq("counted", after.delivered - before.delivered, counted)?;
        let dead: BTreeMap<String, u64> = after
            .dead_lettered
            .iter()
            .map(|(k, v)| (k.clone(), v - before.dead_lettered(k)))
            .filter(|(_, v)| *v > 0)
            .collect();
        check_eq("dead-lettered by reason", dead, want_dead.clone())?;

        // PostgreSQL: exactly the sums counted.
        let rows = self
            .db
            .client()
            .await
            .map_err(|e| format!("{e:#}"))?
            .query(
                "SELECT store, extract(epoch FROM window_start)::int8, total_minor, events \
                 FROM store_revenue_windows WHERE store NOT LIKE 'marker-%'",
                &[],
            )
            .await
            .map_err(|e| format!("{e:#}"))?;
        let table: BTreeMap<(String, i64), (i128, i64)> = rows
            .iter()
            .map(|r| {
                (
                    (r.get(0), r.get(1)),
                    (i128::from(r.get::<_, i64>(2)), r.get(3)),
                )
            })
            .collect();
        let want: BTreeMap<(String, i64), (i128, i64)> = self
            .windows
            .iter()
            .filter(|(_, (_, events))| *events > 0)
            .map(|(k, v)| (k.clone(), *v))
            .collect();
        if table != want {
            let diff: Vec<_> = want
                .iter()
                .filter(|(k, v)| table.get(*k) != Some(*v))
                .map(|(k, v)| format!("{k:?}: want {v:?}, table {:?}", table.get(k)))
                .chain(
                    table
                        .iter()
                        .filter(|(k, _)| !want.contains_key(*k))
                        .map(|(k, v)| format!("{k:?}: not counted, table {v:?}")),
                )
                .collect();
            return Err(format!("store_revenue_windows differs: {diff:?}"));
        }

        // Kafka: each dead letter carries its message; each final window published once.
        let dead_before = self.dead_letters;
        self.dead_letters += want_dead.values().sum::<u64>() as usize;
        let got = self
            .dead
            .read_to(self.dead_letters, DEADLINE, Duration::from_millis(100))
            .await;
        check_eq("dead letters on the topic", got, self.dead_letters)?;
        for m in &self.dead.messages[dead_before..] {
            let hs = header_list(m);
            let (_, (i, expect)) = expected
                .iter()
                .find(|(at, (i, _))| source_of(&hs, batch[*i].headers.len()) == Some(**at))
                .ok_or("a dead letter of no message of this batch")?;
            let reason = check_dead_letter(m, &batch[*i], values[*i].as_deref())?;
            check_eq("a dead letter's reason", Some(reason), expect.clone())?;
        }
        let finals = self
            .db
            .count("SELECT count(*) FROM store_revenue_windows WHERE final")
            .await
            .map_err(|e| format!("{e:#}"))?;
        let published = self
            .output
            .read_to(finals as usize, DEADLINE, Duration::from_millis(100))
            .await;
        let finals_now = self
            .db
            .count("SELECT count(*) FROM store_revenue_windows WHERE final")
            .await
            .map_err(|e| format!("{e:#}"))?;
        if published < finals as usize || published > finals_now as usize {
            return Err(format!(
                "{published} final windows published, {finals} to {finals_now} final in the table"
            ));
        }
        tally.add("messages sent (markers included)", n);
        Ok(())
    }
}

fn check_eq<T: PartialEq + std::fmt::Debug>(what: &str, got: T, want: T) -> Result<(), String> {
    if got == want {
        Ok(())
    } else {
        Err(format!("{what}: got {got:?}, want {want:?}"))
    }
}

fn message() -> impl Strategy<Value = Input<SaleValue>> {
    (
        inputs::key(),
        prop_oneof![1 => Just(SaleValue::None), 30 => inputs::sale_value(LIMIT)],
        inputs::headers(),
    )
        .prop_map(|(key, value, headers)| Input {
            key,
            value,
            headers,
        })
}

#[test]
fn sales_any_message_is_counted_or_dead_lettered() {
    let rt = runtime();
    let world = std::cell::RefCell::new(rt.block_on(World::start()).expect("the runner starts"));
    let batches = env_number("FUZZ_E2E_BATCHES", 8);
    let most = env_number("FUZZ_E2E_BATCH", 12).max(1);
    property(
        "store-revenue pipeline, end to end",
        batches,
        0,
        vec(message(), 1..=most),
        |batch, tally| {
            rt.block_on(world.borrow_mut().batch(&batch, tally))
                .map_err(TestCaseError::fail)
        },
    );
    let mut w = world.into_inner();
    let stats = rt
        .block_on(w.running.take().expect("runs").stop())
        .expect("the runner stops");
    println!("fuzz store-revenue pipeline: runner counters {stats:?}");
    drop(w);
}

/// The smallest input the property above reaches rarely (two large prices in one store's
/// window, counted at different triggers): the second sale would take the window's sum past 64
/// bits of minor units, and is dead-lettered as `out_of_range` like one counted in the same
/// trigger; the partition goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "today PostgreSQL refuses the window's sum (SQLSTATE 22003) and the partition is held as postgres_blocked; waits for the sum to be checked against the stored window"]
async fn a_window_sum_past_64_bits_across_triggers_is_dead_lettered() -> anyhow::Result<()> {
    let kafka = SalesKafka::new(1)?;
    let db = TestDb::new().await?;
    let running = start(
        sales_config(&kafka, &db, ""),
        RunOptions {
            clock: Arc::new(FixedClock(T0 - 3600)),
            ..RunOptions::default()
        },
    )
    .await?;
    // 5 × 10^18 minor units each: one fits 64 bits, two do not.
    let big = "50000000000000000";
    kafka.send(Some(0), Some("s"), &sale("s", big, T0)).await?;
    assert!(
        db.wait_count(
            "SELECT count(*) FROM store_revenue_windows WHERE store = 's'",
            1,
            DEADLINE
        )
        .await
    );
    kafka
        .send(Some(0), Some("s"), &sale("s", big, T0 + 1))
        .await?;
    kafka
        .send(Some(0), Some("marker"), &sale("marker", "1", T0 + 2))
        .await?;
    let counted = db
        .wait_count(
            "SELECT count(*) FROM store_revenue_windows WHERE store = 'marker'",
            1,
            Duration::from_secs(20),
        )
        .await;
    let stats = running.store_revenue().stats();
    assert!(counted, "the partition goes on to the marker: {stats:?}");
    assert_eq!(stats.dead_lettered("out_of_range"), 1, "{stats:?}");
    assert_eq!(
        db.count("SELECT total_minor FROM store_revenue_windows WHERE store = 's'")
            .await?,
        5_000_000_000_000_000_000
    );
    running.stop().await?;
    Ok(())
}
