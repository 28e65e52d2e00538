//! `runner produce campaigns`: promo campaigns for the campaign pipeline (SPEC.md, "Pipeline
//! 1"), and the subscribers they fan out to.
//!
//! A value has exactly SPEC.md's fields, ids as hyphenated UUIDs and times in unix seconds:
//! `{"restaurant_id":"…","adv_campaign_id":"…","adv_campaign_content":"Pad thai, 40% off until
//! 14:00","adv_campaign_owner":"…","adv_campaign_owner_contact":"…@restaurant.example",
//! "adv_campaign_datetime_start":…,"adv_campaign_datetime_end":…,"datetime_created":…}`. The key
//! is free text, as operators send it: the restaurant id by default, or the campaign id, a fixed
//! text (`first_message`), or none.
//!
//! **Ids.** Restaurant `i` (0-based) and its subscriber `j` have ids derived from the seed
//! alone ([`restaurant_id`], [`client_id`]): seeding with a seed and producing with the same
//! seed use the same restaurants, so the campaigns fan out to the subscribers seeded. Campaign
//! `n` goes to restaurant `n mod R` (round robin), and everything else about it (its id, its
//! kind, its times relative to "now", its text) is drawn from (seed, n) alone: a run that
//! starts at `first = N` continues an earlier run of N campaigns with new campaign ids (the
//! pipeline makes a campaign's drafts once: the same campaign id sent again makes none).
//!
//! **The mix.** Each campaign is one of four kinds, drawn with the given fractions: *active*
//! at the moment it is made (start < now < end, with a margin each way, so it is still active
//! when the pipeline reads it and was already active a minute before), *expired* (ended at
//! least a minute before now), *future* (starts half a campaign length to a whole one after
//! now: the pipeline keeps it, counted as skip reason `scheduled`, and delivers it at its
//! start), or *malformed*, broken in one way chosen at random ([`Malformed`]), each of which
//! the rules dead-letter with a known reason code. "Now" is the wall clock at the moment a
//! campaign is made, or a fixed instant (`now`, for a runner whose clock is fixed too).
//!
//! **Seeding.** [`seed_subscribers`] writes R × M rows into `public.subscribers_restaurants`
//! (created as SPEC.md gives it when absent), M distinct clients per restaurant, with binary
//! COPY in batches, in one transaction that first deletes every row of those R restaurants:
//! seeding again with the same seed leaves the same rows, and a running runner reloads its
//! cache once. Each active campaign must then yield M drafts when it is read, and each future
//! one M drafts at its start: the summary says how many in all, and how many dead letters with
//! which reason code.

use super::{drive, format_event_time, Counters, Limit, ProduceError, ProduceOptions, Progress};
use super::{Record, RunReport};
use crate::db::DbError;
use futures::pin_mut;
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use rdkafka::config::ClientConfig;
use serde::Serialize;
use std::collections::BTreeMap;
use std::fmt;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio_postgres::binary_copy::BinaryCopyInWriter;
use tokio_postgres::types::{ToSql, Type};
use uuid::Uuid;

const DELETE_SQL: &str = include_str!("sql/delete_subscribers.sql");
const COPY_SQL: &str = include_str!("sql/copy_subscribers.sql");

/// Rows per COPY statement when seeding, unless told otherwise.
pub const DEFAULT_SEED_BATCH: usize = 100_000;

/// How far from "now" the start or end of a campaign that is not active is, at least, and how
/// long before "now" an active one started, at least: a clock a little off either way does
/// not change what a campaign is.
pub const MARGIN_SECS: i64 = 60;

/// The shortest campaign length accepted: an active campaign stays active for at least half
/// of it after it is made, and half of it must exceed the margin.
pub const MIN_LENGTH: Duration = Duration::from_secs(4 * MARGIN_SECS as u64);

/// Derives 64 well-mixed bits from `x` (SplitMix64's finaliser).
fn mix(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A version-4 UUID that depends only on (`seed`, `kind`, `a`, `b`).
fn derived_uuid(seed: u64, kind: u64, a: u64, b: u64) -> Uuid {
    let hi = mix(seed ^ mix(kind ^ mix(a ^ mix(b))));
    let lo = mix(hi ^ mix(seed.rotate_left(17) ^ mix(b ^ mix(a.wrapping_add(kind)))));
    uuid::Builder::from_random_bytes((((hi as u128) << 64) | lo as u128).to_be_bytes()).into_uuid()
}

/// The id of restaurant `i` (0-based) of the generator seeded with `seed`.
pub fn restaurant_id(seed: u64, i: u32) -> String {
    derived_uuid(seed, 1, u64::from(i), 0).to_string()
}

/// The id of subscriber `j` (0-based) of restaurant `i`, for the generator seeded with `seed`.
/// A restaurant's subscribers are distinct clients; no two restaurants share one.
pub fn client_id(seed: u64, i: u32, j: u32) -> String {
    derived_uuid(seed, 2, u64::from(i), u64::from(j)).to_string()
}

/// The ways a malformed campaign is broken, each refused by the campaign rules with its own
/// reason code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Malformed {
    /// The value cut short: not JSON.
    NotJson,
    /// A byte that is not UTF-8 inside the campaign's text.
    NotUtf8,
    /// The fields in a JSON array instead of an object.
    NotAnObject,
    /// One field, chosen at random, left out.
    MissingField,
    /// The start time as a JSON string (`"1764255600"`).
    WrongType,
    /// The campaign id not a hyphenated UUID (its 32-digit simple form).
    BadUuid,
    /// The campaign does not start before it ends.
    StartNotBeforeEnd,
}

impl Malformed {
    pub const ALL: [Malformed; 7] = [
        Malformed::NotJson,
        Malformed::NotUtf8,
        Malformed::NotAnObject,
        Malformed::MissingField,
        Malformed::WrongType,
        Malformed::BadUuid,
        Malformed::StartNotBeforeEnd,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Malformed::NotJson => "not_json",
            Malformed::NotUtf8 => "not_utf8",
            Malformed::NotAnObject => "not_an_object",
            Malformed::MissingField => "missing_field",
            Malformed::WrongType => "wrong_type",
            Malformed::BadUuid => "bad_uuid",
            Malformed::StartNotBeforeEnd => "start_not_before_end",
        }
    }

    /// The rejection code the campaign rules give it (`wit/campaign/campaign-rules.wit`), as
    /// it appears in the dead letter's `dlq-reason`.
    pub fn expected_rejection(self) -> &'static str {
        match self {
            Malformed::NotJson => "malformed_json",
            Malformed::NotUtf8 => "not_utf8",
            Malformed::NotAnObject => "not_an_object",
            Malformed::MissingField => "missing_field",
            Malformed::WrongType => "wrong_type",
            Malformed::BadUuid => "invalid_uuid",
            Malformed::StartNotBeforeEnd => "invalid_interval",
        }
    }
}

/// What a campaign is meant to be at the moment it is made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CampaignKind {
    /// Valid and active: one draft per subscriber of its restaurant.
    Active,
    /// Valid, ended: skipped by the pipeline as `expired`.
    Expired,
    /// Valid, not started: kept by the pipeline (skip reason `scheduled`) and delivered to the
    /// restaurant's subscribers at its start.
    Future,
    /// Refused by the rules: dead-lettered.
    Malformed(Malformed),
}

impl CampaignKind {
    /// What the campaign pipeline does with it when it reads it: `deliver`, a skip reason
    /// (`scheduled` for one delivered later, at its start), or the dead letter's reason code.
    pub fn expected_outcome(self) -> &'static str {
        match self {
            CampaignKind::Active => "deliver",
            CampaignKind::Expired => "expired",
            CampaignKind::Future => "scheduled",
            CampaignKind::Malformed(m) => m.expected_rejection(),
        }
    }
}

/// What a campaign is keyed by.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyMode {
    /// The restaurant id (the default: a restaurant's campaigns stay in order).
    Restaurant,
    /// The campaign id.
    Campaign,
    /// This text for every campaign (`first_message`, as in SPEC.md's `kcat -K:` example).
    Fixed(String),
    /// No key.
    None,
}

impl KeyMode {
    /// `restaurant`, `campaign`, `none`, or any other text as a fixed key.
    pub fn parse(s: &str) -> Result<KeyMode, String> {
        Ok(match s {
            "restaurant" => KeyMode::Restaurant,
            "campaign" => KeyMode::Campaign,
            "none" => KeyMode::None,
            "" => return Err("an empty key: say `none` for no key".into()),
            other => KeyMode::Fixed(other.to_string()),
        })
    }

    fn describe(&self) -> String {
        match self {
            KeyMode::Restaurant => "keyed by restaurant".into(),
            KeyMode::Campaign => "keyed by campaign".into(),
            KeyMode::Fixed(k) => format!("keyed {k:?}"),
            KeyMode::None => "unkeyed".into(),
        }
    }
}

/// Where and how the subscribers are seeded before the campaigns are sent.
#[derive(Debug, Clone)]
pub struct SeedTarget {
    /// The PostgreSQL connection string.
    pub url: String,
    /// Rows per COPY statement.
    pub batch_rows: usize,
}

/// The campaign generator's options.
#[derive(Debug, Clone)]
pub struct CampaignsOptions {
    pub produce: ProduceOptions,
    /// Restaurants 0 … R − 1; campaign n goes to restaurant n mod R.
    pub restaurants: u32,
    /// The sequence number of the first campaign: a run from `first = N` continues one that
    /// sent N campaigns with the same seed.
    pub first: u64,
    /// Campaigns per wall-clock second when paced.
    pub rate: f64,
    pub expired_fraction: f64,
    pub future_fraction: f64,
    pub malformed_fraction: f64,
    /// "Now" for every campaign, unix seconds; `None`: the wall clock when each is made.
    pub now: Option<i64>,
    /// From start to end of a campaign.
    pub length: Duration,
    pub key: KeyMode,
    /// The seed of the ids and of the random choices; `None`: a random one (in the summary).
    pub seed: Option<u64>,
    /// Subscribers per restaurant (M): the expected drafts are active × M. Required to seed.
    pub subscribers_per_restaurant: Option<u32>,
    /// Seed R × M subscriptions there before sending.
    pub seed_into: Option<SeedTarget>,
}

impl Default for CampaignsOptions {
    fn default() -> CampaignsOptions {
        CampaignsOptions {
            produce: ProduceOptions::new("campaigns", Limit::Duration(Duration::from_secs(60))),
            restaurants: 100,
            first: 0,
            rate: 10.0,
            expired_fraction: 0.0,
            future_fraction: 0.0,
            malformed_fraction: 0.0,
            now: None,
            length: Duration::from_secs(2 * 3600),
            key: KeyMode::Restaurant,
            seed: None,
            subscribers_per_restaurant: None,
            seed_into: None,
        }
    }
}

impl CampaignsOptions {
    /// Every problem of the options, in one error.
    pub fn validate(&self) -> Result<(), ProduceError> {
        let mut problems = Vec::new();
        self.produce.validate(&mut problems);
        if self.restaurants == 0 {
            problems.push("restaurants must be at least 1".into());
        }
        if !(self.rate.is_finite() && self.rate > 0.0) {
            problems.push(format!("rate must be a number above 0, not {}", self.rate));
        }
        let fractions = [
            ("expired_fraction", self.expired_fraction),
            ("future_fraction", self.future_fraction),
            ("malformed_fraction", self.malformed_fraction),
        ];
        for (name, v) in fractions {
            if !(0.0..=1.0).contains(&v) {
                problems.push(format!("{name} must be between 0 and 1, not {v}"));
            }
        }
        if fractions.iter().map(|(_, v)| v).sum::<f64>() > 1.0 + 1e-9 {
            problems.push(
                "expired_fraction + future_fraction + malformed_fraction must not exceed 1".into(),
            );
        }
        if self.length < MIN_LENGTH || self.length.subsec_nanos() != 0 {
            problems.push(format!(
                "the campaign length must be whole seconds, at least {}",
                humantime::format_duration(MIN_LENGTH)
            ));
        }
        if let Some(now) = self.now {
            // Every time a campaign may carry stays within the feedback table's int4 trigger
            // time and positive.
            let span = 2 * self.length.as_secs() as i64 + 3600;
            if now - span <= 0 || now + span > i64::from(i32::MAX) {
                problems.push(format!("now ({now}) is too close to 1970 or to 2038"));
            }
        }
        if self.subscribers_per_restaurant == Some(0) {
            problems.push("subscribers_per_restaurant must be at least 1".into());
        }
        if let Some(target) = &self.seed_into {
            if self.subscribers_per_restaurant.is_none() {
                problems.push("seeding needs the number of subscribers per restaurant".into());
            }
            if target.batch_rows == 0 {
                problems.push("the seeding batch must be at least 1 row".into());
            }
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(ProduceError::Invalid(problems.join("; ")))
        }
    }
}

/// One generated campaign: what was sent, and what it is meant to be.
#[derive(Debug, Clone)]
pub struct GeneratedCampaign {
    /// Sequence number in the run, from 0.
    pub n: u64,
    /// The restaurant's index (0-based) and id.
    pub restaurant: u32,
    pub restaurant_id: String,
    /// The campaign id as drawn (a malformed `BadUuid` value carries its simple form).
    pub campaign_id: String,
    /// "Now" when it was made.
    pub now: i64,
    pub start: i64,
    pub end: i64,
    pub kind: CampaignKind,
    pub key: Option<String>,
    pub value: Vec<u8>,
}

const DISHES: &[&str] = &[
    "Pad thai",
    "Margherita",
    "Ramen",
    "Falafel wrap",
    "Poke bowl",
    "Borscht",
    "Pelmeni",
    "Caesar salad",
    "Cheesecake",
    "Khachapuri",
];

const OWNERS: &[(&str, &str)] = &[
    ("Ivanov Ivan Ivanovich", "iiivanov"),
    ("Petrova Anna Sergeevna", "aspetrova"),
    ("Smirnov Oleg Petrovich", "opsmirnov"),
    ("Kuznetsova Maria Ilyinichna", "mikuznetsova"),
];

/// The fields of a campaign value, in SPEC.md's order.
const FIELDS: [&str; 8] = [
    "restaurant_id",
    "adv_campaign_id",
    "adv_campaign_content",
    "adv_campaign_owner",
    "adv_campaign_owner_contact",
    "adv_campaign_datetime_start",
    "adv_campaign_datetime_end",
    "datetime_created",
];

/// Makes the campaigns of a run, deterministically from its seed and the "now" of each.
#[derive(Debug)]
pub struct CampaignGenerator {
    seed: u64,
    restaurants: u32,
    expired: f64,
    future: f64,
    malformed: f64,
    length: i64,
    key: KeyMode,
    n: u64,
}

impl CampaignGenerator {
    /// A generator for `opts` (checked) from `seed`.
    pub fn new(opts: &CampaignsOptions, seed: u64) -> CampaignGenerator {
        CampaignGenerator {
            seed,
            restaurants: opts.restaurants.max(1),
            expired: opts.expired_fraction,
            future: opts.future_fraction,
            malformed: opts.malformed_fraction,
            length: opts.length.as_secs() as i64,
            key: opts.key.clone(),
            n: opts.first,
        }
    }

    /// The next campaign, made at `now` (unix seconds).
    pub fn next_campaign(&mut self, now: i64) -> GeneratedCampaign {
        let n = self.n;
        self.n += 1;
        // Campaign n's own draws, apart from the ids' derivation.
        let rng = &mut StdRng::seed_from_u64(mix(self.seed ^ mix(n ^ 0x6361_6d70)));
        let restaurant = (n % u64::from(self.restaurants)) as u32;
        let restaurant_id = restaurant_id(self.seed, restaurant);
        let campaign_id = uuid::Builder::from_random_bytes(rng.random::<u128>().to_be_bytes())
            .into_uuid()
            .to_string();
        let draw: f64 = rng.random();
        let kind = if draw < self.malformed {
            CampaignKind::Malformed(Malformed::ALL[rng.random_range(0..Malformed::ALL.len())])
        } else if draw < self.malformed + self.expired {
            CampaignKind::Expired
        } else if draw < self.malformed + self.expired + self.future {
            CampaignKind::Future
        } else {
            CampaignKind::Active
        };
        let (len, half) = (self.length, self.length / 2);
        let (start, end) = match kind {
            // Started 1 min .. L/2 ago: active for at least L/2 more.
            CampaignKind::Active | CampaignKind::Malformed(_) => {
                let start = now - rng.random_range(MARGIN_SECS..=half);
                (start, start + len)
            }
            CampaignKind::Expired => {
                let end = now - rng.random_range(MARGIN_SECS..=half);
                (end - len, end)
            }
            CampaignKind::Future => {
                let start = now + rng.random_range(half..=len);
                (start, start + len)
            }
        };
        let created = start - rng.random_range(0..=3600);
        let dish = DISHES[rng.random_range(0..DISHES.len())];
        let off = 5 * rng.random_range(2..=14);
        let until = end.rem_euclid(86_400);
        let content = format!(
            "{dish}, {off}% off until {:02}:{:02}",
            until / 3600,
            until % 3600 / 60
        );
        let (owner, login) = OWNERS[rng.random_range(0..OWNERS.len())];
        let contact = format!("{login}@restaurant.example");
        let key = match &self.key {
            KeyMode::Restaurant => Some(restaurant_id.clone()),
            KeyMode::Campaign => Some(campaign_id.clone()),
            KeyMode::Fixed(k) => Some(k.clone()),
            KeyMode::None => None,
        };
        let quote = |s: &str| serde_json::to_string(s).unwrap_or_else(|_| "\"\"".into());
        let mut fields: Vec<(&str, String)> = vec![
            (FIELDS[0], quote(&restaurant_id)),
            (FIELDS[1], quote(&campaign_id)),
            (FIELDS[2], quote(&content)),
            (FIELDS[3], quote(owner)),
            (FIELDS[4], quote(&contact)),
            (FIELDS[5], start.to_string()),
            (FIELDS[6], end.to_string()),
            (FIELDS[7], created.to_string()),
        ];
        let mut end_written = end;
        let object = |fields: &[(&str, String)]| {
            let body: Vec<String> = fields.iter().map(|(k, v)| format!("\"{k}\":{v}")).collect();
            format!("{{{}}}", body.join(","))
        };
        let value = match kind {
            CampaignKind::Malformed(m) => match m {
                Malformed::NotJson => {
                    let whole = object(&fields);
                    // Any proper prefix of an object is not JSON: its closing brace is missing.
                    let mut cut = rng.random_range(1..whole.len());
                    while !whole.is_char_boundary(cut) {
                        cut -= 1;
                    }
                    whole.as_bytes()[..cut].to_vec()
                }
                Malformed::NotUtf8 => {
                    let whole = object(&fields);
                    let at = whole.find(&content).unwrap_or(0) + content.len().min(4);
                    let mut bytes = whole.into_bytes();
                    bytes.insert(at, 0xFF);
                    bytes
                }
                Malformed::NotAnObject => {
                    let values: Vec<&str> = fields.iter().map(|(_, v)| v.as_str()).collect();
                    format!("[{}]", values.join(",")).into_bytes()
                }
                Malformed::MissingField => {
                    fields.remove(rng.random_range(0..fields.len()));
                    object(&fields).into_bytes()
                }
                Malformed::WrongType => {
                    fields[5].1 = quote(&start.to_string());
                    object(&fields).into_bytes()
                }
                Malformed::BadUuid => {
                    let simple = campaign_id.replace('-', "");
                    fields[1].1 = quote(&simple);
                    object(&fields).into_bytes()
                }
                Malformed::StartNotBeforeEnd => {
                    end_written = start - rng.random_range(0..=3600);
                    fields[6].1 = end_written.to_string();
                    object(&fields).into_bytes()
                }
            },
            _ => object(&fields).into_bytes(),
        };
        GeneratedCampaign {
            n,
            restaurant,
            restaurant_id,
            campaign_id,
            now,
            start,
            end: end_written,
            kind,
            key,
            value,
        }
    }
}

/// Why seeding failed: the options, PostgreSQL out of reach, the table, or the writing.
#[derive(Debug, thiserror::Error)]
pub enum SeedError {
    #[error("invalid seeding options: {0}")]
    Invalid(String),
    #[error("cannot reach PostgreSQL at {url}")]
    Unreachable {
        url: String,
        #[source]
        source: DbError,
    },
    #[error("preparing table public.subscribers_restaurants")]
    Schema(#[source] DbError),
    #[error("writing subscriptions into public.subscribers_restaurants")]
    Write(#[source] DbError),
}

/// Where a connection string points (host, port, database), never its password.
pub fn describe_url(url: &str) -> String {
    match url.parse::<tokio_postgres::Config>() {
        Ok(c) => {
            let host = match c.get_hosts().first() {
                Some(tokio_postgres::config::Host::Tcp(h)) => h.clone(),
                Some(tokio_postgres::config::Host::Unix(p)) => p.display().to_string(),
                None => "localhost".into(),
            };
            let port = c.get_ports().first().copied().unwrap_or(5432);
            let db = c.get_dbname().or(c.get_user()).unwrap_or("postgres");
            format!("{host}:{port}/{db}")
        }
        Err(_) => "<an unparsable connection string>".into(),
    }
}

/// What seeding did.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct SeedReport {
    pub table: &'static str,
    /// Where (host:port/database).
    pub database: String,
    pub restaurants: u32,
    pub subscribers_per_restaurant: u32,
    /// Rows written.
    pub rows: u64,
    /// Rows of the same restaurants deleted first (an earlier seeding).
    pub replaced: u64,
    pub secs: f64,
}

impl fmt::Display for SeedReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "seeded {} subscriptions ({} restaurants × {} subscribers) into {} at {} in {:.2} s",
            self.rows,
            self.restaurants,
            self.subscribers_per_restaurant,
            self.table,
            self.database,
            self.secs
        )?;
        if self.replaced > 0 {
            write!(
                f,
                ", replacing {} rows of the same restaurants",
                self.replaced
            )?;
        }
        Ok(())
    }
}

/// Seeds `restaurants` × `per_restaurant` subscriptions for the generator seeded with `seed`:
/// creates SPEC.md's tables when absent (the runner's schema step), then in one transaction
/// deletes the rows of those restaurants and writes the new ones with binary COPY,
/// `batch_rows` per statement.
pub async fn seed_subscribers(
    url: &str,
    restaurants: u32,
    per_restaurant: u32,
    seed: u64,
    batch_rows: usize,
    progress: Progress,
) -> Result<SeedReport, SeedError> {
    if restaurants == 0 || per_restaurant == 0 || batch_rows == 0 {
        return Err(SeedError::Invalid(format!(
            "restaurants ({restaurants}), subscribers per restaurant ({per_restaurant}) and the batch ({batch_rows} rows) must all be at least 1"
        )));
    }
    let started = Instant::now();
    let database = describe_url(url);
    let mut client = crate::db::connect(url)
        .await
        .map_err(|source| SeedError::Unreachable {
            url: database.clone(),
            source,
        })?;
    crate::pipelines::campaigns::schema::ensure(&client)
        .await
        .map_err(SeedError::Schema)?;
    let write = |e: tokio_postgres::Error| SeedError::Write(DbError::from_pg(e));
    let tx = client.transaction().await.map_err(write)?;
    let ids: Vec<String> = (0..restaurants).map(|i| restaurant_id(seed, i)).collect();
    let replaced = tx.execute(DELETE_SQL, &[&ids]).await.map_err(write)?;
    let total = u64::from(restaurants) * u64::from(per_restaurant);
    let mut rows = 0u64;
    let mut last_report = Instant::now();
    let (mut i, mut j) = (0u32, 0u32);
    while rows < total {
        let sink = tx.copy_in(COPY_SQL).await.map_err(write)?;
        let writer = BinaryCopyInWriter::new(sink, &[Type::VARCHAR, Type::VARCHAR]);
        pin_mut!(writer);
        let mut in_batch = 0usize;
        while in_batch < batch_rows && rows < total {
            let client_id = client_id(seed, i, j);
            let row: [&(dyn ToSql + Sync); 2] = [&client_id, &ids[i as usize]];
            writer.as_mut().write(&row).await.map_err(write)?;
            in_batch += 1;
            rows += 1;
            j += 1;
            if j == per_restaurant {
                (i, j) = (i + 1, 0);
            }
        }
        writer.finish().await.map_err(write)?;
        if progress == Progress::Stderr && last_report.elapsed() >= Duration::from_secs(1) {
            eprintln!("seed subscribers: {rows} / {total} rows");
            last_report = Instant::now();
        }
    }
    tx.commit().await.map_err(write)?;
    Ok(SeedReport {
        table: "public.subscribers_restaurants",
        database,
        restaurants,
        subscribers_per_restaurant: per_restaurant,
        rows,
        replaced,
        secs: started.elapsed().as_secs_f64(),
    })
}

/// The smallest and greatest "now" the campaigns were made at.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct NowRange {
    pub first: i64,
    pub last: i64,
}

/// What a campaigns run sent, and what the pipeline must make of it.
#[derive(Debug, Clone, Serialize)]
pub struct CampaignsSummary {
    #[serde(flatten)]
    pub run: RunReport,
    /// The seed: the same seed gives the same restaurants and subscribers, and with the same
    /// options and "now", the same campaigns.
    pub seed: u64,
    pub restaurants: u32,
    /// The sequence number of the first campaign sent; a run continuing this one with the same
    /// seed starts at `first + sent`.
    pub first: u64,
    /// How the campaigns were keyed (`keyed by restaurant`, `unkeyed`, …).
    pub key: String,
    pub active: u64,
    pub expired: u64,
    pub future: u64,
    /// Malformed campaigns, in all and per way of breaking.
    pub malformed: u64,
    pub malformed_kinds: BTreeMap<&'static str, u64>,
    /// The dead letters the malformed campaigns must become, per `dlq-reason` code.
    pub expected_dead_letters: BTreeMap<&'static str, u64>,
    /// When the subscribers per restaurant (M) are known: active × M, the drafts made when the
    /// campaigns are read.
    pub subscribers_per_restaurant: Option<u32>,
    pub expected_drafts: Option<u64>,
    /// When M is known: future × M, the drafts made later, each campaign's at its start.
    pub expected_scheduled_drafts: Option<u64>,
    /// The "now" the campaigns were made at; `fixed_now` when it was given.
    pub now: Option<NowRange>,
    pub fixed_now: bool,
    /// When the subscribers were seeded first.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub seeded: Option<SeedReport>,
}

/// Indexes of the progress line's categories.
const ACTIVE: usize = 0;
const EXPIRED: usize = 1;
const FUTURE: usize = 2;
const MALFORMED: usize = 3;

#[derive(Debug, Default)]
struct Tally {
    active: u64,
    expired: u64,
    future: u64,
    malformed: BTreeMap<&'static str, u64>,
    dead_letters: BTreeMap<&'static str, u64>,
    now: Option<NowRange>,
}

impl Tally {
    fn add(&mut self, c: &GeneratedCampaign, counters: &Counters) {
        match c.kind {
            CampaignKind::Active => {
                self.active += 1;
                counters.add(ACTIVE);
            }
            CampaignKind::Expired => {
                self.expired += 1;
                counters.add(EXPIRED);
            }
            CampaignKind::Future => {
                self.future += 1;
                counters.add(FUTURE);
            }
            CampaignKind::Malformed(m) => {
                *self.malformed.entry(m.name()).or_default() += 1;
                *self.dead_letters.entry(m.expected_rejection()).or_default() += 1;
                counters.add(MALFORMED);
            }
        }
        self.now = Some(match self.now {
            None => NowRange {
                first: c.now,
                last: c.now,
            },
            Some(r) => NowRange {
                first: r.first.min(c.now),
                last: r.last.max(c.now),
            },
        });
    }
}

/// A seed for a run that was given none (printed in its summary).
pub fn random_seed() -> u64 {
    rand::rng().random()
}

fn wall_clock_secs() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// Seeds the subscribers when asked (`opts.seed_into`), then sends campaigns to
/// `opts.produce.topic` with a producer made from `producer_cfg` (see
/// [`super::client_config`] for the runner's), paced or as fast as possible, until the limit or
/// a stop; returns once every campaign is acknowledged. Fails with a clear error if PostgreSQL
/// or the brokers are unreachable, the topic is missing, or a campaign cannot be delivered
/// within the delivery timeout.
pub async fn campaigns(
    producer_cfg: ClientConfig,
    opts: CampaignsOptions,
    progress: Progress,
) -> anyhow::Result<CampaignsSummary> {
    opts.validate()?;
    let seed = opts.seed.unwrap_or_else(random_seed);
    let seeded = match (&opts.seed_into, opts.subscribers_per_restaurant) {
        (Some(target), Some(m)) => Some(
            seed_subscribers(
                &target.url,
                opts.restaurants,
                m,
                seed,
                target.batch_rows,
                progress,
            )
            .await?,
        ),
        _ => None,
    };
    let mut generator = CampaignGenerator::new(&opts, seed);
    let mut tally = Tally::default();
    let run = drive(
        producer_cfg,
        &opts.produce,
        opts.rate,
        "produce campaigns",
        &["active", "expired", "future", "malformed"],
        progress,
        |_, counters| {
            let now = opts.now.unwrap_or_else(wall_clock_secs);
            let c = generator.next_campaign(now);
            tally.add(&c, counters);
            Record {
                key: c.key,
                value: c.value,
            }
        },
    )
    .await?;
    let m = opts.subscribers_per_restaurant;
    Ok(CampaignsSummary {
        run,
        seed,
        restaurants: opts.restaurants,
        first: opts.first,
        key: opts.key.describe(),
        active: tally.active,
        expired: tally.expired,
        future: tally.future,
        malformed: tally.malformed.values().sum(),
        malformed_kinds: tally.malformed,
        expected_dead_letters: tally.dead_letters,
        subscribers_per_restaurant: m,
        expected_drafts: m.map(|m| tally.active * u64::from(m)),
        expected_scheduled_drafts: m.map(|m| tally.future * u64::from(m)),
        now: tally.now,
        fixed_now: opts.now.is_some(),
        seeded,
    })
}

fn join_counts(counts: &BTreeMap<&'static str, u64>) -> String {
    counts
        .iter()
        .map(|(k, n)| format!("{k} {n}"))
        .collect::<Vec<_>>()
        .join(", ")
}

impl fmt::Display for CampaignsSummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(s) = &self.seeded {
            writeln!(f, "Seeding: {s}")?;
        }
        let r = &self.run;
        writeln!(
            f,
            "Sent {} {} to topic {} ({} restaurants, {}){}",
            r.sent,
            if r.sent == 1 { "campaign" } else { "campaigns" },
            r.topic,
            self.restaurants,
            self.key,
            if r.interrupted { ", interrupted" } else { "" }
        )?;
        let kinds = join_counts(&self.malformed_kinds);
        writeln!(
            f,
            "  active {}, expired {}, future {}, malformed {}{}",
            self.active,
            self.expired,
            self.future,
            self.malformed,
            if kinds.is_empty() {
                String::new()
            } else {
                format!(" ({kinds})")
            }
        )?;
        match (self.expected_drafts, self.subscribers_per_restaurant) {
            (Some(d), Some(m)) => writeln!(
                f,
                "  expected drafts: {d} ({} active × {m} subscribers), then {} at the future \
                 campaigns' starts ({} future × {m})",
                self.active,
                self.expected_scheduled_drafts.unwrap_or(0),
                self.future
            )?,
            _ => writeln!(
                f,
                "  expected drafts: {} active × the subscribers of each restaurant, then {} \
                 future × the subscribers of each restaurant at the campaigns' starts",
                self.active, self.future
            )?,
        }
        writeln!(
            f,
            "  expected skips: expired {}, scheduled {} (each delivered at its start)",
            self.expired, self.future
        )?;
        let dead = join_counts(&self.expected_dead_letters);
        writeln!(
            f,
            "  expected dead letters: {}{}",
            self.malformed,
            if dead.is_empty() {
                String::new()
            } else {
                format!(" ({dead})")
            }
        )?;
        match self.now {
            Some(n) if self.fixed_now => writeln!(
                f,
                "  now fixed at {} ({})",
                format_event_time(n.first),
                n.first
            )?,
            Some(n) => writeln!(
                f,
                "  now {} .. {} (the clock)",
                format_event_time(n.first),
                format_event_time(n.last)
            )?,
            None => {}
        }
        writeln!(
            f,
            "  wall time {:.2} s, {:.0} campaigns/s, seed {} (to send new campaigns to the same restaurants: --seed {} --first {})",
            r.wall_time_secs,
            r.events_per_sec,
            self.seed,
            self.seed,
            self.first + r.sent
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: i64 = 1_764_255_600;

    fn opts() -> CampaignsOptions {
        CampaignsOptions {
            restaurants: 5,
            now: Some(NOW),
            seed: Some(3),
            ..CampaignsOptions::default()
        }
    }

    fn generate(opts: &CampaignsOptions, count: usize) -> Vec<GeneratedCampaign> {
        opts.validate().expect("valid options");
        let mut g = CampaignGenerator::new(opts, opts.seed.unwrap());
        (0..count).map(|_| g.next_campaign(NOW)).collect()
    }

    fn json(c: &GeneratedCampaign) -> serde_json::Value {
        serde_json::from_slice(&c.value).expect("a JSON value")
    }

    #[test]
    fn ids_depend_on_the_seed_alone() {
        assert_eq!(restaurant_id(3, 0), restaurant_id(3, 0));
        assert_ne!(restaurant_id(3, 0), restaurant_id(4, 0));
        assert_ne!(restaurant_id(3, 0), restaurant_id(3, 1));
        let mut all = std::collections::BTreeSet::new();
        for i in 0..100 {
            assert!(all.insert(restaurant_id(3, i)));
            for j in 0..100 {
                assert!(all.insert(client_id(3, i, j)));
            }
        }
        for id in &all {
            let u = Uuid::try_parse(id).expect("a UUID");
            assert_eq!(id.len(), 36);
            assert_eq!(u.get_version_num(), 4);
        }
    }

    #[test]
    fn the_same_seed_gives_the_same_campaigns() {
        let o = CampaignsOptions {
            expired_fraction: 0.2,
            future_fraction: 0.2,
            malformed_fraction: 0.2,
            ..opts()
        };
        let a: Vec<_> = generate(&o, 300).into_iter().map(|c| c.value).collect();
        let b: Vec<_> = generate(&o, 300).into_iter().map(|c| c.value).collect();
        assert_eq!(a, b);
        let c: Vec<_> = generate(
            &CampaignsOptions {
                seed: Some(4),
                ..o.clone()
            },
            300,
        )
        .into_iter()
        .map(|c| c.value)
        .collect();
        assert_ne!(a, c);
        // A run from `first` continues: campaign n is the same whichever run makes it.
        let tail: Vec<_> = generate(
            &CampaignsOptions {
                first: 100,
                ..o.clone()
            },
            200,
        )
        .into_iter()
        .map(|c| c.value)
        .collect();
        assert_eq!(tail[..], a[100..]);
    }

    #[test]
    fn valid_campaigns_have_specs_fields_and_their_kind() {
        let o = CampaignsOptions {
            expired_fraction: 0.3,
            future_fraction: 0.3,
            ..opts()
        };
        let all = generate(&o, 3000);
        let mut kinds = BTreeMap::new();
        for (n, c) in all.iter().enumerate() {
            let v = json(c);
            let obj = v.as_object().expect("an object");
            let names: Vec<&str> = obj.keys().map(String::as_str).collect();
            let mut want = FIELDS.to_vec();
            want.sort();
            assert_eq!(names, want, "exactly SPEC.md's fields");
            assert_eq!(c.restaurant as usize, n % 5, "round robin");
            assert_eq!(v["restaurant_id"], restaurant_id(3, c.restaurant));
            assert_eq!(c.key.as_deref(), Some(c.restaurant_id.as_str()));
            assert_eq!(v["adv_campaign_id"], c.campaign_id.as_str());
            Uuid::try_parse(&c.campaign_id).expect("a UUID");
            let (start, end) = (
                v["adv_campaign_datetime_start"].as_i64().unwrap(),
                v["adv_campaign_datetime_end"].as_i64().unwrap(),
            );
            assert!(v["datetime_created"].as_i64().unwrap() <= start);
            assert_eq!(end - start, 7200);
            match c.kind {
                CampaignKind::Active => {
                    assert!(start <= NOW - MARGIN_SECS && end >= NOW + 3600, "{v}")
                }
                CampaignKind::Expired => assert!(end <= NOW - MARGIN_SECS, "{v}"),
                CampaignKind::Future => assert!(start >= NOW + 3600, "{v}"),
                CampaignKind::Malformed(_) => unreachable!("none asked for"),
            }
            *kinds.entry(c.kind.expected_outcome()).or_insert(0) += 1;
        }
        for (kind, share) in [("deliver", 0.4), ("expired", 0.3), ("scheduled", 0.3)] {
            let got = kinds[kind] as f64 / 3000.0;
            assert!((got - share).abs() < 0.04, "{kind}: {got}");
        }
    }

    #[test]
    fn malformed_campaigns_come_in_every_form() {
        let o = CampaignsOptions {
            malformed_fraction: 0.5,
            key: KeyMode::Fixed("first_message".into()),
            ..opts()
        };
        let all = generate(&o, 2000);
        let mut seen = BTreeMap::new();
        for c in &all {
            assert_eq!(c.key.as_deref(), Some("first_message"));
            let CampaignKind::Malformed(m) = c.kind else {
                assert_eq!(c.kind, CampaignKind::Active);
                continue;
            };
            *seen.entry(m).or_insert(0) += 1;
            let text = std::str::from_utf8(&c.value);
            let parsed = serde_json::from_slice::<serde_json::Value>(&c.value);
            match m {
                Malformed::NotJson => assert!(text.is_ok() && parsed.is_err()),
                Malformed::NotUtf8 => assert!(text.is_err()),
                Malformed::NotAnObject => {
                    assert_eq!(parsed.unwrap().as_array().map(Vec::len), Some(8))
                }
                Malformed::MissingField => {
                    assert_eq!(parsed.unwrap().as_object().unwrap().len(), 7)
                }
                Malformed::WrongType => {
                    let v = parsed.unwrap();
                    assert_eq!(v["adv_campaign_datetime_start"], c.start.to_string());
                }
                Malformed::BadUuid => {
                    let v = parsed.unwrap();
                    let id = v["adv_campaign_id"].as_str().unwrap();
                    assert_eq!(id.len(), 32);
                    assert_eq!(v["restaurant_id"], c.restaurant_id.as_str());
                }
                Malformed::StartNotBeforeEnd => {
                    let v = parsed.unwrap();
                    assert!(
                        v["adv_campaign_datetime_start"].as_i64()
                            >= v["adv_campaign_datetime_end"].as_i64()
                    );
                }
            }
        }
        assert_eq!(seen.len(), Malformed::ALL.len(), "{seen:?}");
        let total: usize = seen.values().sum();
        assert!((900..1100).contains(&total), "{total} malformed of 2000");
        let unkeyed = generate(
            &CampaignsOptions {
                key: KeyMode::None,
                ..opts()
            },
            10,
        );
        assert!(unkeyed.iter().all(|c| c.key.is_none()));
        assert_eq!(KeyMode::parse("campaign"), Ok(KeyMode::Campaign));
        assert_eq!(
            KeyMode::parse("first_message"),
            Ok(KeyMode::Fixed("first_message".into()))
        );
    }

    #[test]
    fn options_are_checked() {
        let e = CampaignsOptions {
            restaurants: 0,
            rate: 0.0,
            expired_fraction: 0.6,
            malformed_fraction: 0.6,
            length: Duration::from_secs(60),
            subscribers_per_restaurant: None,
            seed_into: Some(SeedTarget {
                url: String::new(),
                batch_rows: 10,
            }),
            ..opts()
        }
        .validate()
        .unwrap_err()
        .to_string();
        for part in ["restaurants", "rate", "exceed 1", "length", "seeding needs"] {
            assert!(e.contains(part), "{part}: {e}");
        }
        assert!(opts().validate().is_ok());
        assert_eq!(
            describe_url("host=db.example port=6543 user=u password=secret dbname=app"),
            "db.example:6543/app"
        );
    }

    #[test]
    fn the_summary_reads_well_and_serialises() {
        let summary = CampaignsSummary {
            run: RunReport {
                topic: "campaigns".into(),
                sent: 10,
                wall_time_secs: 1.0,
                events_per_sec: 10.0,
                interrupted: false,
            },
            seed: 7,
            restaurants: 2,
            first: 0,
            key: KeyMode::Restaurant.describe(),
            active: 6,
            expired: 1,
            future: 1,
            malformed: 2,
            malformed_kinds: BTreeMap::from([("bad_uuid", 1), ("not_json", 1)]),
            expected_dead_letters: BTreeMap::from([("invalid_uuid", 1), ("malformed_json", 1)]),
            subscribers_per_restaurant: Some(4),
            expected_drafts: Some(24),
            expected_scheduled_drafts: Some(4),
            now: Some(NowRange {
                first: NOW,
                last: NOW,
            }),
            fixed_now: true,
            seeded: None,
        };
        let text = summary.to_string();
        assert!(text
            .contains("Sent 10 campaigns to topic campaigns (2 restaurants, keyed by restaurant)"));
        assert!(text.contains("malformed 2 (bad_uuid 1, not_json 1)"));
        assert!(text.contains(
            "expected drafts: 24 (6 active × 4 subscribers), then 4 at the future campaigns' \
             starts (1 future × 4)"
        ));
        assert!(
            text.contains("expected skips: expired 1, scheduled 1 (each delivered at its start)")
        );
        assert!(text.contains("expected dead letters: 2 (invalid_uuid 1, malformed_json 1)"));
        assert!(text.contains("2025-11-27T15:00:00Z"));
        let v = serde_json::to_value(&summary).unwrap();
        assert_eq!(v["sent"], 10);
        assert_eq!(v["expected_drafts"], 24);
        assert_eq!(v["expected_scheduled_drafts"], 4);
        assert_eq!(v["expected_dead_letters"]["invalid_uuid"], 1);
    }
}
