//! The campaign pipeline end to end on generated messages: one runner on the mock cluster (two
//! input partitions) and a real database, fed batch after batch of messages with any key (or
//! none), any value (or none: empty, past the size limit, not UTF-8, with NUL characters,
//! nested deep, campaigns of any shape, mutations of SPEC.md's) and any headers, each batch
//! followed by a marker campaign on every partition.
//!
//! The properties: nothing panics or hangs (each marker is delivered: the partition went on);
//! every message is accounted for as the rules natively say — delivered, skipped with its
//! reason, or dead-lettered with its reason (`sink_refused` when PostgreSQL cannot hold a
//! draft: a NUL in a text field) — by the runner's counters and by the sinks (the drafts in
//! `subscribers_feedback` and on the output topic, each dead letter with the message's key,
//! value and headers, each draft consistent with its campaign).

use super::inputs::{self, NOW, RESTAURANTS};
use super::{
    check_dead_letter, draft_source, env_number, header_list, property, runtime, source_of,
};
use super::{Input, Reader, Sender, Tally};
use e2e_tests::*;
use proptest::collection::vec;
use proptest::prelude::*;
use proptest::test_runner::TestCaseError;
use rdkafka::message::Message;
use runner::app::{RunOptions, Running};
use runner::events::Stats;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

/// The runner's `max_message_bytes` here.
const LIMIT: usize = 128 * 1024;
/// How long a batch may take to be accounted for.
const DEADLINE: Duration = Duration::from_secs(60);

/// What must become of a message.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Expect {
    Deliver,
    Skip(&'static str),
    Dead(String),
}

impl Expect {
    fn class(&self) -> String {
        match self {
            Expect::Deliver => "delivered".into(),
            Expect::Skip(r) => format!("skipped: {r}"),
            Expect::Dead(r) => format!("dead-lettered: {r}"),
        }
    }
}

/// Everything one run of the property holds between batches.
struct World {
    /// The mock cluster lives as long as the property.
    _kafka: MockKafka,
    db: TestDb,
    running: Option<Running>,
    sender: Sender,
    drafts: Reader,
    dead: Reader,
    /// Each restaurant's distinct subscribers.
    subscribers: HashMap<String, BTreeSet<String>>,
    /// The (campaign, client) pairs delivered so far: a pair is delivered once.
    pairs: BTreeSet<(String, String)>,
    /// Messages sent so far, markers included.
    sent: u64,
    /// What the sinks should hold so far.
    feedback_rows: i64,
    dead_letters: usize,
    batch: u64,
}

impl World {
    async fn start() -> anyhow::Result<World> {
        let kafka = MockKafka::new(2)?;
        let db = TestDb::with_spec_subscribers().await?;
        let c = db.client().await?;
        let mut subscribers: HashMap<String, BTreeSet<String>> = HashMap::new();
        for (client, restaurant) in SPEC_SUBSCRIBERS {
            subscribers
                .entry(restaurant.to_string())
                .or_default()
                .insert(client.to_string());
        }
        // A client id that needs a JSON escape, one listed twice, and a restaurant with one.
        for (client, restaurant) in [
            ("c-1", RESTAURANTS[1]),
            ("c-\"2\"\\", RESTAURANTS[1]),
            ("c-1", RESTAURANTS[1]),
            ("0c000000-0000-4000-8000-000000000001", RESTAURANTS[2]),
        ] {
            db.subscribe_with(&c, client, restaurant).await?;
            subscribers
                .entry(restaurant.to_string())
                .or_default()
                .insert(client.to_string());
        }
        let running = start(
            config(
                &kafka,
                &db,
                &format!("[pipelines.campaigns]\nmax_message_bytes = {LIMIT}\n"),
            ),
            RunOptions {
                clock: Arc::new(FixedClock(NOW)),
                ..RunOptions::default()
            },
        )
        .await?;
        Ok(World {
            sender: Sender::new(&kafka.brokers, &kafka.input)?,
            drafts: Reader::new(&kafka.brokers, &kafka.output, 2)?,
            dead: Reader::new(&kafka.brokers, &kafka.dlq, 1)?,
            _kafka: kafka,
            db,
            running: Some(running),
            subscribers,
            pairs: BTreeSet::new(),
            sent: 0,
            feedback_rows: 0,
            dead_letters: 0,
            batch: 0,
        })
    }

    fn stats(&self) -> Stats {
        self.running
            .as_ref()
            .expect("the runner runs")
            .campaigns()
            .stats()
    }

    /// What the runner must do with `value`, as the rules say natively; records the pairs a
    /// delivery makes.
    fn expect(&mut self, value: Option<&[u8]>) -> Expect {
        let Some(value) = value else {
            return Expect::Dead("missing_value".into());
        };
        if value.len() > LIMIT {
            return Expect::Dead("oversized".into());
        }
        let c = match campaign_rules::rules::validate(value) {
            Err(r) => return Expect::Dead(super::rules::campaign_code(r.code).into()),
            Ok(c) => c,
        };
        match campaign_rules::rules::activity(&c, NOW) {
            // Kept for its start, which the fixed clock never reaches.
            campaign_rules::rules::Activity::NotStarted => return Expect::Skip("scheduled"),
            campaign_rules::rules::Activity::Expired => return Expect::Skip("expired"),
            campaign_rules::rules::Activity::Active => {}
        }
        let Some(clients) = self.subscribers.get(&c.restaurant_id) else {
            return Expect::Skip("no_subscribers");
        };
        // A PostgreSQL text column cannot hold NUL.
        if [
            &c.adv_campaign_content,
            &c.adv_campaign_owner,
            &c.adv_campaign_owner_contact,
        ]
        .iter()
        .any(|t| t.contains('\0'))
        {
            return Expect::Dead("sink_refused".into());
        }
        for client in clients {
            if self
                .pairs
                .insert((c.adv_campaign_id.clone(), client.clone()))
            {
                self.feedback_rows += 1;
            }
        }
        Expect::Deliver
    }

    /// Sends one batch and a marker per partition, waits for it to be accounted for, and
    /// checks the counters and the sinks against what the rules say.
    async fn batch(
        &mut self,
        batch: &[Input<Option<Vec<u8>>>],
        tally: &mut Tally,
    ) -> Result<(), String> {
        self.batch += 1;
        let before = self.stats();
        let mut expected: BTreeMap<(i32, i64), (usize, Expect)> = BTreeMap::new();
        for (i, m) in batch.iter().enumerate() {
            let at = self
                .sender
                .send(None, m.key.as_deref(), m.value.as_deref(), &m.headers)
                .await
                .map_err(|e| format!("sending message {i}: {e:#}"))?;
            let e = self.expect(m.value.as_deref());
            expected.insert(at, (i, e));
        }
        let markers: Vec<String> = (0..2)
            .map(|p| format!("0d000000-0000-4000-8000-{:06}{p:06}", self.batch))
            .collect();
        for (p, id) in markers.iter().enumerate() {
            let value = inputs::campaign_of_size(0, RESTAURANTS[2], id);
            self.sender
                .send(Some(p as i32), None, Some(&value), &[])
                .await
                .map_err(|e| format!("sending the marker: {e:#}"))?;
            self.expect(Some(&value));
        }
        self.sent += batch.len() as u64 + 2;

        // Nothing stuck: each partition went on to its marker.
        let sql = format!(
            "SELECT count(*) FROM subscribers_feedback WHERE adv_campaign_id IN ('{}', '{}')",
            markers[0], markers[1]
        );
        if !self.db.wait_count(&sql, 2, DEADLINE).await {
            return Err(format!(
                "a partition is stuck: its marker was not delivered within {DEADLINE:?}: {:?}",
                self.stats()
            ));
        }
        let sent = self.sent;
        let running = self.running.as_ref().expect("runs");
        if !wait_for(DEADLINE, || {
            running.campaigns().stats().offsets_stored >= sent
        })
        .await
        {
            return Err(format!(
                "offsets did not reach {sent}: {:?}",
                running.campaigns().stats()
            ));
        }
        let after = self.stats();

        // The counters: every message accounted for, each as the rules say.
        let mut want_dead: BTreeMap<String, u64> = BTreeMap::new();
        let mut want_skipped: BTreeMap<&str, u64> = BTreeMap::new();
        let mut want_delivered = 2;
        for (_, e) in expected.values() {
            tally.input(e.class());
            match e {
                Expect::Deliver => want_delivered += 1,
                Expect::Skip(r) => *want_skipped.entry(r).or_default() += 1,
                Expect::Dead(r) => *want_dead.entry(r.clone()).or_default() += 1,
            }
        }
        let n = batch.len() as u64 + 2;
        check_eq("received", after.received - before.received, n)?;
        check_eq("settled", after.settled() - before.settled(), n)?;
        check_eq(
            "delivered",
            after.delivered - before.delivered,
            want_delivered,
        )?;
        let delta =
            |a: &BTreeMap<String, u64>, b: &BTreeMap<String, u64>| -> BTreeMap<String, u64> {
                a.iter()
                    .map(|(k, v)| (k.clone(), v - b.get(k).copied().unwrap_or(0)))
                    .filter(|(_, v)| *v > 0)
                    .collect()
            };
        check_eq(
            "dead-lettered by reason",
            delta(&after.dead_lettered, &before.dead_lettered),
            want_dead.clone(),
        )?;
        let skipped: BTreeMap<String, u64> = after
            .skipped
            .iter()
            .map(|(k, v)| (k.to_string(), v - before.skipped(k)))
            .filter(|(_, v)| *v > 0)
            .collect();
        let want_skipped: BTreeMap<String, u64> = want_skipped
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect();
        check_eq("skipped by reason", skipped, want_skipped)?;

        // PostgreSQL: each new (campaign, client) pair once.
        let rows = self
            .db
            .count("SELECT count(*) FROM subscribers_feedback")
            .await
            .map_err(|e| format!("{e:#}"))?;
        check_eq("rows of subscribers_feedback", rows, self.feedback_rows)?;

        // Kafka: each dead letter carries its message, each draft its campaign.
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
            let input = &batch[*i];
            let reason = check_dead_letter(m, input, input.value.as_deref())?;
            check_eq(
                "a dead letter's reason",
                Expect::Dead(reason),
                expect.clone(),
            )?;
        }
        let drafts_before = self.drafts.messages.len();
        let got = self
            .drafts
            .read_to(
                self.feedback_rows as usize,
                DEADLINE,
                Duration::from_millis(100),
            )
            .await;
        check_eq("drafts on the topic", got, self.feedback_rows as usize)?;
        for m in &self.drafts.messages[drafts_before..] {
            let hs = header_list(m);
            let at = draft_source(&hs).ok_or("a draft without its source")?;
            let draft: serde_json::Value = serde_json::from_slice(m.payload().unwrap_or_default())
                .map_err(|e| format!("a draft is not JSON: {e}"))?;
            let client = std::str::from_utf8(m.key().unwrap_or_default()).unwrap_or("");
            check_eq(
                "a draft's client",
                draft["client_id"].as_str(),
                Some(client),
            )?;
            if let Some((i, e)) = expected.get(&at) {
                check_eq("what a message with drafts came to", e, &Expect::Deliver)?;
                let c =
                    campaign_rules::rules::validate(batch[*i].value.as_deref().unwrap_or_default())
                        .map_err(|r| format!("{r:?}"))?;
                check_eq(
                    "a draft's content",
                    draft["adv_campaign_content"].as_str(),
                    Some(c.adv_campaign_content.as_str()),
                )?;
            }
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

fn message() -> impl Strategy<Value = Input<Option<Vec<u8>>>> {
    (
        inputs::key(),
        prop_oneof![1 => Just(None), 30 => inputs::campaign_payload(LIMIT).prop_map(Some)],
        inputs::headers(),
    )
        .prop_map(|(key, value, headers)| Input {
            key,
            value,
            headers,
        })
}

#[test]
fn campaigns_any_message_is_delivered_skipped_or_dead_lettered() {
    let rt = runtime();
    let world = std::cell::RefCell::new(rt.block_on(World::start()).expect("the runner starts"));
    let batches = env_number("FUZZ_E2E_BATCHES", 8);
    let most = env_number("FUZZ_E2E_BATCH", 12).max(1);
    property(
        "campaign pipeline, end to end",
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
        .block_on(stop(w.running.take().expect("runs")))
        .expect("the runner stops");
    println!("fuzz campaign pipeline: runner counters {stats:?}");
    drop(w);
}
