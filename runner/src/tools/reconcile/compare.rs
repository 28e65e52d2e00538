//! The comparison itself, free of I/O: the feedback rows go in first (a digest of each), then the
//! drafts read from the output topic, then the rows looked up again for drafts that had none;
//! what comes out is a [`Report`] of every difference, per campaign.
//!
//! Memory: one [`Slot`] per (campaign, client) pair, keyed by the client id (16 bytes inline when
//! it is a lowercase hyphenated UUID, as the runner's ids are) under its campaign. Whole drafts
//! are kept only for pairs that differ or exist on one side only.

use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::hash::{Hash, Hasher};

/// A draft as docs/SPEC.md "Output 1" gives it, fields in its order (also the order a repaired
/// draft is serialised in); the feedback row is the same fields plus `id` and `feedback`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Draft {
    pub restaurant_id: String,
    pub adv_campaign_id: String,
    pub adv_campaign_content: String,
    pub adv_campaign_owner: String,
    pub adv_campaign_owner_contact: String,
    pub adv_campaign_datetime_start: i64,
    pub adv_campaign_datetime_end: i64,
    pub client_id: String,
    pub datetime_created: i64,
    pub trigger_datetime_created: i64,
}

/// A draft's fields borrowed (from a PostgreSQL row or a [`Draft`]).
#[derive(Debug, Clone, Copy)]
pub struct DraftView<'a> {
    pub restaurant_id: &'a str,
    pub adv_campaign_id: &'a str,
    pub adv_campaign_content: &'a str,
    pub adv_campaign_owner: &'a str,
    pub adv_campaign_owner_contact: &'a str,
    pub adv_campaign_datetime_start: i64,
    pub adv_campaign_datetime_end: i64,
    pub client_id: &'a str,
    pub datetime_created: i64,
    pub trigger_datetime_created: i64,
}

impl Draft {
    pub fn view(&self) -> DraftView<'_> {
        DraftView {
            restaurant_id: &self.restaurant_id,
            adv_campaign_id: &self.adv_campaign_id,
            adv_campaign_content: &self.adv_campaign_content,
            adv_campaign_owner: &self.adv_campaign_owner,
            adv_campaign_owner_contact: &self.adv_campaign_owner_contact,
            adv_campaign_datetime_start: self.adv_campaign_datetime_start,
            adv_campaign_datetime_end: self.adv_campaign_datetime_end,
            client_id: &self.client_id,
            datetime_created: self.datetime_created,
            trigger_datetime_created: self.trigger_datetime_created,
        }
    }
}

impl DraftView<'_> {
    /// A digest of every field: equal drafts have equal digests; unequal ones, equal digests
    /// with a chance of 2⁻⁶⁴.
    pub fn digest(&self) -> u64 {
        // SipHash with fixed keys: the same value for the same fields within one process.
        #[allow(deprecated, reason = "a fixed-key SipHash is what is wanted here")]
        let mut h = std::hash::SipHasher::new();
        (
            self.restaurant_id,
            self.adv_campaign_id,
            self.adv_campaign_content,
            self.adv_campaign_owner,
            self.adv_campaign_owner_contact,
            self.adv_campaign_datetime_start,
            self.adv_campaign_datetime_end,
            self.client_id,
            self.datetime_created,
            self.trigger_datetime_created,
        )
            .hash(&mut h);
        h.finish()
    }

    pub fn to_draft(self) -> Draft {
        Draft {
            restaurant_id: self.restaurant_id.into(),
            adv_campaign_id: self.adv_campaign_id.into(),
            adv_campaign_content: self.adv_campaign_content.into(),
            adv_campaign_owner: self.adv_campaign_owner.into(),
            adv_campaign_owner_contact: self.adv_campaign_owner_contact.into(),
            adv_campaign_datetime_start: self.adv_campaign_datetime_start,
            adv_campaign_datetime_end: self.adv_campaign_datetime_end,
            client_id: self.client_id.into(),
            datetime_created: self.datetime_created,
            trigger_datetime_created: self.trigger_datetime_created,
        }
    }
}

/// The fields in which `pg` (the row) and `kafka` (the draft) differ, each with both values.
pub fn field_differences(pg: &Draft, kafka: &Draft) -> Vec<FieldDifference> {
    let mut out = Vec::new();
    let mut text = |field: &'static str, a: &str, b: &str| {
        if a != b {
            out.push(FieldDifference {
                field,
                postgres: serde_json::Value::from(a),
                kafka: serde_json::Value::from(b),
            });
        }
    };
    text("restaurant_id", &pg.restaurant_id, &kafka.restaurant_id);
    text(
        "adv_campaign_id",
        &pg.adv_campaign_id,
        &kafka.adv_campaign_id,
    );
    text(
        "adv_campaign_content",
        &pg.adv_campaign_content,
        &kafka.adv_campaign_content,
    );
    text(
        "adv_campaign_owner",
        &pg.adv_campaign_owner,
        &kafka.adv_campaign_owner,
    );
    text(
        "adv_campaign_owner_contact",
        &pg.adv_campaign_owner_contact,
        &kafka.adv_campaign_owner_contact,
    );
    text("client_id", &pg.client_id, &kafka.client_id);
    let mut number = |field: &'static str, a: i64, b: i64| {
        if a != b {
            out.push(FieldDifference {
                field,
                postgres: a.into(),
                kafka: b.into(),
            });
        }
    };
    number(
        "adv_campaign_datetime_start",
        pg.adv_campaign_datetime_start,
        kafka.adv_campaign_datetime_start,
    );
    number(
        "adv_campaign_datetime_end",
        pg.adv_campaign_datetime_end,
        kafka.adv_campaign_datetime_end,
    );
    number(
        "datetime_created",
        pg.datetime_created,
        kafka.datetime_created,
    );
    number(
        "trigger_datetime_created",
        pg.trigger_datetime_created,
        kafka.trigger_datetime_created,
    );
    out
}

/// A client id as a map key: a lowercase hyphenated UUID inline, anything else as text.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ClientKey {
    Uuid([u8; 16]),
    Text(Box<str>),
}

impl ClientKey {
    pub fn of(s: &str) -> ClientKey {
        if let Ok(u) = uuid::Uuid::try_parse(s) {
            let mut buf = [0u8; uuid::fmt::Hyphenated::LENGTH];
            if u.hyphenated().encode_lower(&mut buf) == s {
                return ClientKey::Uuid(*u.as_bytes());
            }
        }
        ClientKey::Text(s.into())
    }
}

impl std::fmt::Display for ClientKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ClientKey::Uuid(u) => write!(f, "{}", uuid::Uuid::from_bytes(*u).hyphenated()),
            ClientKey::Text(s) => f.write_str(s),
        }
    }
}

/// Where a record is in the output topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct Pos {
    pub partition: i32,
    pub offset: i64,
}

impl std::fmt::Display for Pos {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "partition {} offset {}", self.partition, self.offset)
    }
}

/// What is known of one (campaign, client) pair.
#[derive(Debug, Clone, Copy)]
struct Slot {
    /// The first row's digest (0 when only Kafka has the pair so far).
    digest: u64,
    /// The first row's id.
    row_id: i32,
    rows: u32,
    records: u32,
    /// The first record's place (partition, offset), kept apart so that the slot packs.
    first_partition: i32,
    first_offset: i64,
}

impl Slot {
    fn first(&self) -> Pos {
        Pos {
            partition: self.first_partition,
            offset: self.first_offset,
        }
    }
}

/// Bytes of map entry per (campaign, client) pair, besides the hash table's own overhead (one
/// control byte per bucket, at most 7/8 of the buckets used) and, for a client id that is not
/// a lowercase UUID, the id's text.
pub const ENTRY_BYTES: usize = std::mem::size_of::<(ClientKey, Slot)>();

/// One difference between the two sides, for one (campaign, client) pair.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Difference {
    /// A row with no draft in the output topic (and no unpublished outbox entry).
    MissingInKafka { client_id: String, row_id: i32 },
    /// A draft with no row.
    MissingInPostgres { client_id: String, record: Pos },
    /// The pair more than once in the output topic.
    DuplicateInKafka {
        client_id: String,
        records: Vec<Pos>,
    },
    /// The pair more than once in the table (the runner writes each pair once).
    DuplicateInPostgres {
        client_id: String,
        row_ids: Vec<i32>,
    },
    /// The row and the draft differ in these fields.
    FieldsDiffer {
        client_id: String,
        row_id: i32,
        record: Pos,
        fields: Vec<FieldDifference>,
    },
    /// The record's key is not its draft's client_id.
    KeyDiffers {
        client_id: String,
        key: String,
        record: Pos,
    },
}

impl Difference {
    pub fn client_id(&self) -> &str {
        match self {
            Difference::MissingInKafka { client_id, .. }
            | Difference::MissingInPostgres { client_id, .. }
            | Difference::DuplicateInKafka { client_id, .. }
            | Difference::DuplicateInPostgres { client_id, .. }
            | Difference::FieldsDiffer { client_id, .. }
            | Difference::KeyDiffers { client_id, .. } => client_id,
        }
    }

    /// Whether `--repair` completes it.
    pub fn repairable(&self) -> bool {
        matches!(
            self,
            Difference::MissingInKafka { .. } | Difference::MissingInPostgres { .. }
        )
    }

    fn rank(&self) -> u8 {
        match self {
            Difference::MissingInKafka { .. } => 0,
            Difference::MissingInPostgres { .. } => 1,
            Difference::DuplicateInKafka { .. } => 2,
            Difference::DuplicateInPostgres { .. } => 3,
            Difference::FieldsDiffer { .. } => 4,
            Difference::KeyDiffers { .. } => 5,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FieldDifference {
    pub field: &'static str,
    pub postgres: serde_json::Value,
    pub kafka: serde_json::Value,
}

/// A record of the output topic that is not a draft (not JSON, a field missing or of the wrong
/// type, a field SPEC.md does not have).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct NotADraft {
    pub record: Pos,
    pub error: String,
}

/// One campaign's counts and differences.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct CampaignReport {
    pub adv_campaign_id: String,
    /// Rows of `subscribers_feedback`.
    pub postgres_rows: u64,
    /// Drafts in the output topic.
    pub kafka_drafts: u64,
    /// Pairs present once on each side with equal fields.
    pub equal: u64,
    /// Rows whose draft is in the outbox, not yet published: not a difference.
    pub in_flight: u64,
    pub differences: Vec<Difference>,
}

/// Totals over every campaign.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Totals {
    pub campaigns: u64,
    pub postgres_rows: u64,
    pub kafka_drafts: u64,
    pub equal: u64,
    pub in_flight: u64,
    pub missing_in_kafka: u64,
    pub missing_in_postgres: u64,
    pub duplicates: u64,
    pub fields_differ: u64,
    pub not_drafts: u64,
    pub differences: u64,
}

/// The outcome of one comparison.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Report {
    /// No difference (drafts in flight are not differences).
    pub equal: bool,
    pub totals: Totals,
    pub campaigns: Vec<CampaignReport>,
    pub not_drafts: Vec<NotADraft>,
    /// Partitions of the output topic whose first offset is above 0: their earlier records
    /// were deleted (retention, or a truncation), so older drafts show as missing in Kafka.
    pub kafka_log_start: Vec<Pos>,
}

/// What `--repair` needs besides the report.
#[derive(Debug, Clone, Default)]
pub struct ToRepair {
    /// Drafts whose rows are missing: inserted into PostgreSQL.
    pub missing_in_postgres: Vec<Draft>,
    /// Pairs whose drafts are missing: produced to Kafka from their rows.
    pub missing_in_kafka: Vec<(String, String)>,
}

#[derive(Debug, Default)]
struct Campaign {
    clients: HashMap<ClientKey, Slot>,
}

/// A draft seen only in Kafka so far.
#[derive(Debug)]
struct KafkaOnly {
    draft: Draft,
    records: Vec<Pos>,
}

/// The comparison in progress. Feed rows with [`Tally::row`], then drafts with
/// [`Tally::record`], then the rows looked up again for [`Tally::unmatched`] with
/// [`Tally::late_row`]; then [`Tally::finish`].
#[derive(Debug, Default)]
pub struct Tally {
    campaigns: HashMap<Box<str>, Campaign>,
    /// Pairs with an unpublished outbox entry.
    in_flight: HashSet<(String, String)>,
    pg_duplicates: HashMap<(String, String), Vec<i32>>,
    kafka_duplicates: HashMap<(String, String), Vec<Pos>>,
    /// Drafts that differ from their row: fetched again at the end for the fields.
    differing: Vec<(Draft, Pos, i32)>,
    kafka_only: HashMap<(String, String), KafkaOnly>,
    key_differences: Vec<(String, Difference)>,
    not_drafts: Vec<NotADraft>,
    log_start: Vec<Pos>,
}

impl Tally {
    pub fn in_flight(&mut self, adv_campaign_id: String, client_id: String) {
        self.in_flight.insert((adv_campaign_id, client_id));
    }

    /// A row of `subscribers_feedback`.
    pub fn row(&mut self, row_id: i32, d: &DraftView<'_>) {
        let digest = d.digest();
        let campaign = match self.campaigns.get_mut(d.adv_campaign_id) {
            Some(c) => c,
            None => self.campaigns.entry(d.adv_campaign_id.into()).or_default(),
        };
        let slot = campaign
            .clients
            .entry(ClientKey::of(d.client_id))
            .or_insert(Slot {
                digest,
                row_id,
                rows: 0,
                records: 0,
                first_partition: -1,
                first_offset: -1,
            });
        slot.rows += 1;
        if slot.rows > 1 {
            let first = slot.row_id;
            self.pg_duplicates
                .entry((d.adv_campaign_id.into(), d.client_id.into()))
                .or_insert_with(|| vec![first])
                .push(row_id);
        }
    }

    /// A record of the output topic that is not a draft.
    /// A partition of the output topic starts at `offset`, above 0.
    pub fn log_start(&mut self, partition: i32, offset: i64) {
        self.log_start.push(Pos { partition, offset });
    }

    pub fn not_a_draft(&mut self, record: Pos, error: String) {
        self.not_drafts.push(NotADraft { record, error });
    }

    /// A draft read from the output topic, with its record's key.
    pub fn record(&mut self, at: Pos, key: Option<&[u8]>, d: Draft) {
        if key != Some(d.client_id.as_bytes()) {
            self.key_differences.push((
                d.adv_campaign_id.clone(),
                Difference::KeyDiffers {
                    client_id: d.client_id.clone(),
                    key: key
                        .map(|k| String::from_utf8_lossy(k).into_owned())
                        .unwrap_or_else(|| "(none)".into()),
                    record: at,
                },
            ));
        }
        let slot = self
            .campaigns
            .get_mut(d.adv_campaign_id.as_str())
            .and_then(|c| c.clients.get_mut(&ClientKey::of(&d.client_id)));
        let Some(slot) = slot else {
            let pair = (d.adv_campaign_id.clone(), d.client_id.clone());
            self.kafka_only
                .entry(pair)
                .or_insert_with(|| KafkaOnly {
                    draft: d,
                    records: Vec::new(),
                })
                .records
                .push(at);
            return;
        };
        slot.records += 1;
        if slot.records == 1 {
            slot.first_partition = at.partition;
            slot.first_offset = at.offset;
        } else {
            let first = slot.first();
            self.kafka_duplicates
                .entry((d.adv_campaign_id.clone(), d.client_id.clone()))
                .or_insert_with(|| vec![first])
                .push(at);
        }
        if slot.digest != d.view().digest() {
            let row_id = slot.row_id;
            self.differing.push((d, at, row_id));
        }
    }

    /// The (campaign, client) pairs of drafts that had no row: to be looked up again, since
    /// the pipeline writes PostgreSQL before Kafka and the rows were read first.
    pub fn unmatched(&self) -> Vec<(String, String)> {
        self.kafka_only.keys().cloned().collect()
    }

    /// A row found when looking up [`Tally::unmatched`] pairs again.
    pub fn late_row(&mut self, row_id: i32, d: &DraftView<'_>) {
        let pair = (d.adv_campaign_id.to_string(), d.client_id.to_string());
        let Some(only) = self.kafka_only.remove(&pair) else {
            return;
        };
        self.row(row_id, d);
        for at in only.records {
            self.record(
                at,
                Some(only.draft.client_id.as_bytes()),
                only.draft.clone(),
            );
        }
    }

    /// The pairs whose fields differ, to be fetched for the detail of the fields.
    pub fn differing_pairs(&self) -> Vec<(String, String)> {
        self.differing
            .iter()
            .map(|(d, _, _)| (d.adv_campaign_id.clone(), d.client_id.clone()))
            .collect()
    }

    /// The report, given the rows of [`Tally::differing_pairs`] (by pair).
    pub fn finish(self, rows: &HashMap<(String, String), Draft>) -> (Report, ToRepair) {
        let mut per: BTreeMap<String, CampaignReport> = BTreeMap::new();
        let mut repair = ToRepair::default();
        fn entry<'a>(
            per: &'a mut BTreeMap<String, CampaignReport>,
            c: &str,
        ) -> &'a mut CampaignReport {
            per.entry(c.to_string()).or_insert_with(|| CampaignReport {
                adv_campaign_id: c.to_string(),
                ..CampaignReport::default()
            })
        }
        let mut differing: HashMap<String, HashSet<ClientKey>> = HashMap::new();
        for (d, _, _) in &self.differing {
            differing
                .entry(d.adv_campaign_id.clone())
                .or_default()
                .insert(ClientKey::of(&d.client_id));
        }
        for (campaign, c) in &self.campaigns {
            let r = entry(&mut per, campaign);
            for (client, slot) in &c.clients {
                r.postgres_rows += u64::from(slot.rows);
                r.kafka_drafts += u64::from(slot.records);
                if slot.records == 0 {
                    let client = client.to_string();
                    let pair = (campaign.to_string(), client);
                    if self.in_flight.contains(&pair) {
                        r.in_flight += 1;
                    } else {
                        r.differences.push(Difference::MissingInKafka {
                            client_id: pair.1.clone(),
                            row_id: slot.row_id,
                        });
                        repair.missing_in_kafka.push(pair);
                    }
                } else if slot.rows == 1
                    && slot.records == 1
                    && !differing
                        .get(campaign.as_ref())
                        .is_some_and(|s| s.contains(client))
                {
                    r.equal += 1;
                }
            }
        }
        for ((campaign, client), only) in self.kafka_only {
            let r = entry(&mut per, &campaign);
            r.kafka_drafts += only.records.len() as u64;
            r.differences.push(Difference::MissingInPostgres {
                client_id: client.clone(),
                record: only.records[0],
            });
            if only.records.len() > 1 {
                r.differences.push(Difference::DuplicateInKafka {
                    client_id: client,
                    records: only.records,
                });
            }
            repair.missing_in_postgres.push(only.draft);
        }
        for ((campaign, client), records) in self.kafka_duplicates {
            entry(&mut per, &campaign)
                .differences
                .push(Difference::DuplicateInKafka {
                    client_id: client,
                    records,
                });
        }
        for ((campaign, client), row_ids) in self.pg_duplicates {
            entry(&mut per, &campaign)
                .differences
                .push(Difference::DuplicateInPostgres {
                    client_id: client,
                    row_ids,
                });
        }
        for (d, at, row_id) in self.differing {
            let pair = (d.adv_campaign_id.clone(), d.client_id.clone());
            let r = entry(&mut per, &d.adv_campaign_id);
            let fields = match rows.get(&pair) {
                Some(row) => field_differences(row, &d),
                // The row changed or went between the two reads: say so rather than nothing.
                None => vec![FieldDifference {
                    field: "(row no longer found)",
                    postgres: serde_json::Value::Null,
                    kafka: serde_json::Value::Null,
                }],
            };
            r.differences.push(Difference::FieldsDiffer {
                client_id: d.client_id,
                row_id,
                record: at,
                fields,
            });
        }
        for (campaign, diff) in self.key_differences {
            entry(&mut per, &campaign).differences.push(diff);
        }
        let mut totals = Totals::default();
        let mut campaigns: Vec<CampaignReport> = per.into_values().collect();
        for r in &mut campaigns {
            r.differences
                .sort_by(|a, b| (a.client_id(), a.rank()).cmp(&(b.client_id(), b.rank())));
            totals.campaigns += 1;
            totals.postgres_rows += r.postgres_rows;
            totals.kafka_drafts += r.kafka_drafts;
            totals.equal += r.equal;
            totals.in_flight += r.in_flight;
            for d in &r.differences {
                totals.differences += 1;
                match d {
                    Difference::MissingInKafka { .. } => totals.missing_in_kafka += 1,
                    Difference::MissingInPostgres { .. } => totals.missing_in_postgres += 1,
                    Difference::DuplicateInKafka { .. }
                    | Difference::DuplicateInPostgres { .. } => totals.duplicates += 1,
                    Difference::FieldsDiffer { .. } | Difference::KeyDiffers { .. } => {
                        totals.fields_differ += 1
                    }
                }
            }
        }
        let mut not_drafts = self.not_drafts;
        not_drafts.sort_by_key(|n| n.record);
        totals.not_drafts = not_drafts.len() as u64;
        totals.differences += totals.not_drafts;
        repair.missing_in_kafka.sort();
        (
            Report {
                equal: totals.differences == 0,
                totals,
                campaigns,
                not_drafts,
                kafka_log_start: {
                    let mut l = self.log_start;
                    l.sort();
                    l
                },
            },
            repair,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn draft(campaign: &str, client: &str) -> Draft {
        Draft {
            restaurant_id: "r".into(),
            adv_campaign_id: campaign.into(),
            adv_campaign_content: "c".into(),
            adv_campaign_owner: "o".into(),
            adv_campaign_owner_contact: "e".into(),
            adv_campaign_datetime_start: 1,
            adv_campaign_datetime_end: 3,
            client_id: client.into(),
            datetime_created: 0,
            trigger_datetime_created: 2,
        }
    }

    fn at(offset: i64) -> Pos {
        Pos {
            partition: 0,
            offset,
        }
    }

    fn record(t: &mut Tally, offset: i64, d: Draft) {
        let key = d.client_id.clone();
        t.record(at(offset), Some(key.as_bytes()), d);
    }

    #[test]
    fn client_keys_keep_their_text() {
        let u = "023e4567-e89b-12d3-a456-426614174000";
        assert!(matches!(ClientKey::of(u), ClientKey::Uuid(_)));
        assert_eq!(ClientKey::of(u).to_string(), u);
        let upper = "023E4567-E89B-12D3-A456-426614174000";
        assert_eq!(ClientKey::of(upper), ClientKey::Text(upper.into()));
        assert_eq!(ClientKey::of("alice").to_string(), "alice");
        const { assert!(ENTRY_BYTES <= 56, "a pair's entry packs into 56 bytes") };
    }

    #[test]
    fn every_kind_of_difference_is_found_and_in_flight_is_not_one() {
        let mut t = Tally::default();
        for (id, c) in ["a", "b", "c", "d", "e"].into_iter().enumerate() {
            t.row(id as i32, &draft("x", c).view());
        }
        t.in_flight("x".into(), "e".into());
        record(&mut t, 0, draft("x", "a"));
        record(&mut t, 1, draft("x", "b"));
        record(&mut t, 2, draft("x", "b"));
        let mut changed = draft("x", "c");
        changed.adv_campaign_content = "other".into();
        record(&mut t, 3, changed.clone());
        record(&mut t, 4, draft("y", "z"));
        t.not_a_draft(at(5), "not JSON".into());
        assert_eq!(t.unmatched(), [("y".to_string(), "z".to_string())]);
        let rows: HashMap<_, _> = [(("x".to_string(), "c".to_string()), draft("x", "c"))].into();
        let (report, repair) = t.finish(&rows);
        assert!(!report.equal);
        let x = &report.campaigns[0];
        assert_eq!(
            (x.postgres_rows, x.kafka_drafts, x.equal, x.in_flight),
            (5, 4, 1, 1)
        );
        assert_eq!(
            x.differences,
            [
                Difference::DuplicateInKafka {
                    client_id: "b".into(),
                    records: vec![at(1), at(2)]
                },
                Difference::FieldsDiffer {
                    client_id: "c".into(),
                    row_id: 2,
                    record: at(3),
                    fields: vec![FieldDifference {
                        field: "adv_campaign_content",
                        postgres: "c".into(),
                        kafka: "other".into()
                    }]
                },
                Difference::MissingInKafka {
                    client_id: "d".into(),
                    row_id: 3
                },
            ]
        );
        assert_eq!(
            report.campaigns[1].differences,
            [Difference::MissingInPostgres {
                client_id: "z".into(),
                record: at(4)
            }]
        );
        assert_eq!(report.totals.differences, 5);
        assert_eq!(repair.missing_in_kafka, [("x".into(), "d".into())]);
        assert_eq!(repair.missing_in_postgres, [draft("y", "z")]);
    }

    /// Resident memory of this process, in bytes (Linux).
    fn rss() -> usize {
        let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<usize>().ok())
            .unwrap_or(0)
            * 1024
    }

    /// The memory a comparison holds per draft: one million rows of 100 campaigns, each then
    /// matched by its draft. `cargo test -p runner --lib reconcile::compare::tests::memory --
    /// --ignored --nocapture`.
    #[test]
    #[ignore = "a measurement, not a check"]
    fn memory_per_draft() {
        let n: usize = 1_000_000;
        let before = rss();
        let mut t = Tally::default();
        for i in 0..n {
            let campaign = format!("00000000-0000-4000-9000-{:012}", i % 100);
            let client = uuid::Uuid::from_u128(i as u128 * 0x9e37_79b9_7f4a_7c15).to_string();
            t.row(i as i32, &draft(&campaign, &client).view());
        }
        let rows = rss();
        for i in 0..n {
            let campaign = format!("00000000-0000-4000-9000-{:012}", i % 100);
            let client = uuid::Uuid::from_u128(i as u128 * 0x9e37_79b9_7f4a_7c15).to_string();
            record(&mut t, i as i64, draft(&campaign, &client));
        }
        let after = rss();
        let (report, _) = t.finish(&HashMap::new());
        assert!(report.equal);
        assert_eq!(report.totals.equal, n as u64);
        println!(
            "{n} drafts: {} bytes per draft after the rows, {} after the drafts (RSS)",
            (rows - before) / n,
            (after - before) / n
        );
    }

    #[test]
    fn a_row_committed_after_the_snapshot_matches_its_draft() {
        let mut t = Tally::default();
        record(&mut t, 0, draft("x", "a"));
        t.late_row(7, &draft("x", "a").view());
        let (report, repair) = t.finish(&HashMap::new());
        assert!(report.equal, "{report:?}");
        assert_eq!(report.totals.equal, 1);
        assert!(repair.missing_in_postgres.is_empty());
    }

    #[test]
    fn a_record_keyed_by_another_client_is_a_difference() {
        let mut t = Tally::default();
        t.row(1, &draft("x", "a").view());
        t.record(at(0), Some(b"b"), draft("x", "a"));
        let (report, _) = t.finish(&HashMap::new());
        assert_eq!(report.totals.fields_differ, 1);
        assert!(matches!(
            report.campaigns[0].differences[0],
            Difference::KeyDiffers { .. }
        ));
    }
}
