//! `runner produce sales`: sales for the store-revenue pipeline (SPEC.md, "Pipeline 2"), as the
//! reference generator sent them (one per second per store, keyed by store) and with what a
//! demo or a test needs on top: event-time disorder (jitter), sales sent late on purpose,
//! malformed values of every kind the rules refuse, simulated event time running faster than
//! the clock, unkeyed sends, and a seed that makes a run reproducible.
//!
//! A value: `{"store":"store-17","item":"coffee","price":3.50,"ts":1764255600}`, the price with
//! exactly two decimals (prices are whole cents throughout, never floating point), `ts` the
//! event time in unix seconds.
//!
//! Event `n` goes to store `n mod stores` (round robin) at the nominal event time
//! `start + n / (stores × rate)`; its `ts` is that minus a uniform random 0..jitter. Each sale
//! is then one of three kinds, drawn with the given fractions:
//!
//! - **on time**: a valid sale the pipeline must count;
//! - **late**: a valid sale whose `ts` is `late_by` behind its nominal time. It is made late
//!   only when it is sure to be: when its store has already sent an on-time sale at least
//!   `window + allowed_lateness` newer than the end of its window, so that its partition's
//!   watermark has passed it (keyed sends keep a store on one partition, in order). When not
//!   (a store's first sale; a `late_by` barely above `window + allowed_lateness`) it is sent
//!   on time, so the share of late sales can fall a little short of the fraction asked;
//! - **malformed**: broken in one way chosen at random ([`Malformed`]).
//!
//! With a jitter no greater than the allowed lateness, every on-time sale is counted by the
//! pipeline: the summary's expected totals (`record_totals`) are then exactly what the
//! pipeline's windows must hold.

use super::{drive, format_event_time, Counters, Limit, ProduceError, ProduceOptions, Progress};
use super::{Record, RunReport};
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use rdkafka::config::ClientConfig;
use serde::{Serialize, Serializer};
use std::collections::BTreeMap;
use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// An item and its price in cents.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Item {
    pub name: String,
    pub price_cents: i64,
}

/// The built-in catalogue: a coffee shop's, in cents.
pub const CATALOGUE: &[(&str, i64)] = &[
    ("coffee", 350),
    ("tea", 280),
    ("croissant", 220),
    ("bagel", 310),
    ("muffin", 295),
    ("cookie", 175),
    ("sandwich", 690),
    ("salad", 840),
    ("soup", 525),
    ("juice", 415),
    ("water", 120),
    ("pizza-slice", 460),
];

/// The built-in catalogue as items.
pub fn catalogue() -> Vec<Item> {
    CATALOGUE
        .iter()
        .map(|(name, price)| Item {
            name: name.to_string(),
            price_cents: *price,
        })
        .collect()
}

/// A price in currency units with at most two decimals (`3.5`, `3.50`, `12`), as cents,
/// exactly.
pub fn parse_price(s: &str) -> Result<i64, String> {
    let s = s.trim();
    let bad = || format!("{s:?} is not a price (digits, at most two decimals, e.g. 3.50)");
    let (units, decimals) = s.split_once('.').unwrap_or((s, ""));
    let digits = |d: &str| d.bytes().all(|b| b.is_ascii_digit());
    if units.is_empty() || !digits(units) || !digits(decimals) || decimals.len() > 2 {
        return Err(bad());
    }
    if s.ends_with('.') {
        return Err(bad());
    }
    let units: i64 = units.parse().map_err(|_| bad())?;
    let cents: i64 = format!("{decimals:0<2}").parse().map_err(|_| bad())?;
    units
        .checked_mul(100)
        .and_then(|u| u.checked_add(cents))
        .ok_or_else(bad)
}

/// An item given on the command line: `NAME=PRICE`, or the `NAME` of a built-in item.
pub fn parse_item(s: &str) -> Result<Item, String> {
    let s = s.trim();
    match s.split_once('=') {
        Some((name, price)) => {
            let name = name.trim();
            if name.is_empty() {
                return Err(format!("{s:?}: the item has no name"));
            }
            Ok(Item {
                name: name.to_string(),
                price_cents: parse_price(price)?,
            })
        }
        None => CATALOGUE
            .iter()
            .find(|(name, _)| *name == s)
            .map(|(name, price)| Item {
                name: name.to_string(),
                price_cents: *price,
            })
            .ok_or_else(|| {
                let known: Vec<&str> = CATALOGUE.iter().map(|(n, _)| *n).collect();
                format!(
                    "{s:?} is not a built-in item ({}); give its price as NAME=PRICE",
                    known.join(", ")
                )
            }),
    }
}

/// Cents as a JSON number with exactly two decimals (`-3.50`, `0.05`).
pub fn format_price(cents: i64) -> String {
    let sign = if cents < 0 { "-" } else { "" };
    let abs = cents.unsigned_abs();
    format!("{sign}{}.{:02}", abs / 100, abs % 100)
}

/// The ways a malformed sale is broken, each refused by the rules with its own code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Malformed {
    /// The value cut short: not JSON.
    NotJson,
    /// A price below zero.
    NegativePrice,
    /// The price as a JSON string (`"3.50"`).
    PriceAsString,
    /// No `ts` field.
    MissingTs,
    /// A price with three decimals (`3.505`).
    TooPrecise,
}

impl Malformed {
    pub const ALL: [Malformed; 5] = [
        Malformed::NotJson,
        Malformed::NegativePrice,
        Malformed::PriceAsString,
        Malformed::MissingTs,
        Malformed::TooPrecise,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Malformed::NotJson => "not_json",
            Malformed::NegativePrice => "negative_price",
            Malformed::PriceAsString => "price_as_string",
            Malformed::MissingTs => "missing_ts",
            Malformed::TooPrecise => "too_precise",
        }
    }

    /// The rejection code the sales rules give it (`wit/sales/sales-rules.wit`), as it
    /// appears in the dead letter's `dlq-reason`.
    pub fn expected_rejection(self) -> &'static str {
        match self {
            Malformed::NotJson => "malformed_json",
            Malformed::NegativePrice => "negative_price",
            Malformed::PriceAsString => "wrong_type",
            Malformed::MissingTs => "missing_field",
            Malformed::TooPrecise => "too_precise",
        }
    }
}

/// What a sale is meant to be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SaleKind {
    /// Valid, within the allowed lateness: counted in its window.
    OnTime,
    /// Valid, but behind its partition's watermark: dead-lettered as late.
    Late,
    /// Refused by the rules.
    Malformed(Malformed),
}

/// One generated sale: what was sent, and what it is meant to be.
#[derive(Debug, Clone)]
pub struct Sale {
    /// Sequence number in the run, from 0.
    pub n: u64,
    /// The store id (`store-3`).
    pub store: String,
    pub item: String,
    /// The price drawn, in cents (before any breaking of a malformed sale).
    pub price_cents: i64,
    /// The nominal event time, unix milliseconds.
    pub nominal_ms: i64,
    /// The `ts` of the value (absent from a `MissingTs` value).
    pub ts: i64,
    pub kind: SaleKind,
    pub key: Option<String>,
    pub value: Vec<u8>,
}

/// The sales generator's options.
#[derive(Debug, Clone)]
pub struct SalesOptions {
    pub produce: ProduceOptions,
    /// Stores `store-1` … `store-N`.
    pub stores: u32,
    /// Sales per second of event time, per store.
    pub rate: f64,
    /// Event time advances this many times faster than wall-clock time: a paced run sends
    /// `stores × rate × speedup` sales per wall-clock second.
    pub speedup: f64,
    /// Event time of the first sale, unix seconds; `None`: the wall clock at the start.
    pub simulated_start: Option<i64>,
    /// The items sold, one drawn uniformly per sale.
    pub items: Vec<Item>,
    /// Prices drawn uniformly in this range of cents (inclusive) instead of the items' own.
    pub price_range: Option<(i64, i64)>,
    /// `ts` = nominal event time − uniform random 0..jitter.
    pub jitter: Duration,
    /// The fraction of sales sent late.
    pub late_fraction: f64,
    /// How far behind its nominal time a late sale's `ts` is.
    pub late_by: Duration,
    /// The pipeline's window and allowed lateness (what makes a sale late, and the windows
    /// of the expected totals).
    pub window: Duration,
    pub allowed_lateness: Duration,
    /// The fraction of sales broken on purpose.
    pub malformed_fraction: f64,
    /// Key each sale by its store (else no key: the producer spreads them over partitions).
    pub keyed: bool,
    /// The random generator's seed; `None`: a random one (reported in the summary).
    pub seed: Option<u64>,
    /// Keep the expected totals per (store, window) and the list of late sales in the
    /// summary (memory grows with the run: for tests and small runs).
    pub record_totals: bool,
}

impl Default for SalesOptions {
    fn default() -> SalesOptions {
        SalesOptions {
            produce: ProduceOptions::new("sales", Limit::Duration(Duration::from_secs(60))),
            stores: 10,
            rate: 1.0,
            speedup: 1.0,
            simulated_start: None,
            items: catalogue(),
            price_range: None,
            jitter: Duration::from_secs(5),
            late_fraction: 0.0,
            late_by: Duration::from_secs(120),
            window: Duration::from_secs(30),
            allowed_lateness: Duration::from_secs(30),
            malformed_fraction: 0.0,
            keyed: true,
            seed: None,
            record_totals: false,
        }
    }
}

impl SalesOptions {
    /// Every problem of the options, in one error.
    pub fn validate(&self) -> Result<(), ProduceError> {
        let mut problems = Vec::new();
        self.produce.validate(&mut problems);
        if self.stores == 0 {
            problems.push("stores must be at least 1".into());
        }
        for (name, v) in [("rate", self.rate), ("speedup", self.speedup)] {
            if !(v.is_finite() && v > 0.0) {
                problems.push(format!("{name} must be a number above 0, not {v}"));
            }
        }
        for (name, v) in [
            ("late_fraction", self.late_fraction),
            ("malformed_fraction", self.malformed_fraction),
        ] {
            if !(0.0..=1.0).contains(&v) {
                problems.push(format!("{name} must be between 0 and 1, not {v}"));
            }
        }
        if self.late_fraction + self.malformed_fraction > 1.0 {
            problems.push("late_fraction + malformed_fraction must not exceed 1".into());
        }
        if self.items.is_empty() && self.price_range.is_none() {
            problems.push("no items to sell".into());
        }
        if self.items.iter().any(|i| i.price_cents < 0) {
            problems.push("item prices must not be negative".into());
        }
        if let Some((lo, hi)) = self.price_range {
            if lo < 0 || hi < lo {
                problems.push(format!(
                    "the price range {}..{} must be non-negative and in order",
                    format_price(lo),
                    format_price(hi)
                ));
            }
        }
        if self.window.as_secs() == 0 || self.window.subsec_nanos() != 0 {
            problems.push("the window must be a whole number of seconds, at least 1".into());
        }
        if self.late_fraction > 0.0 && self.late_by <= self.window + self.allowed_lateness {
            problems.push(format!(
                "late_by ({:?}) must exceed window + allowed lateness ({:?}) for a sale to be late",
                self.late_by,
                self.window + self.allowed_lateness
            ));
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(ProduceError::Invalid(problems.join("; ")))
        }
    }

    /// Sales per wall-clock second when paced.
    pub fn per_second(&self) -> f64 {
        f64::from(self.stores) * self.rate * self.speedup
    }
}

/// Makes the sales of a run, deterministically from its seed and start.
#[derive(Debug)]
pub struct SalesGenerator {
    rng: StdRng,
    store_ids: Vec<String>,
    start_ms: i64,
    /// Event-time milliseconds between consecutive sales.
    ms_per_sale: f64,
    items: Vec<Item>,
    price_range: Option<(i64, i64)>,
    jitter_ms: i64,
    late_by_ms: i64,
    late_fraction: f64,
    malformed_fraction: f64,
    window_secs: i64,
    lateness_secs: i64,
    keyed: bool,
    /// The greatest `ts` of each store's on-time sales so far.
    newest: Vec<Option<i64>>,
    n: u64,
}

fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

impl SalesGenerator {
    /// A generator for `opts` (checked) from `seed`, its first nominal event time `start_ms`
    /// (unix milliseconds).
    pub fn new(opts: &SalesOptions, seed: u64, start_ms: i64) -> SalesGenerator {
        SalesGenerator {
            rng: StdRng::seed_from_u64(seed),
            store_ids: (1..=opts.stores).map(|i| format!("store-{i}")).collect(),
            start_ms,
            ms_per_sale: 1000.0 / (f64::from(opts.stores) * opts.rate),
            items: opts.items.clone(),
            price_range: opts.price_range,
            jitter_ms: millis(opts.jitter),
            late_by_ms: millis(opts.late_by),
            late_fraction: opts.late_fraction,
            malformed_fraction: opts.malformed_fraction,
            window_secs: opts.window.as_secs().max(1) as i64,
            lateness_secs: opts.allowed_lateness.as_secs() as i64,
            keyed: opts.keyed,
            newest: vec![None; opts.stores as usize],
            n: 0,
        }
    }

    /// Whether a sale of `store` with event time `ts` is behind its partition's watermark for
    /// sure: the store's own newest on-time sale has already put the watermark past its
    /// window.
    fn surely_late(&self, store: usize, ts: i64) -> bool {
        let window_end = (ts.div_euclid(self.window_secs) + 1) * self.window_secs;
        self.newest[store].is_some_and(|newest| window_end <= newest - self.lateness_secs)
    }

    pub fn next_sale(&mut self) -> Sale {
        let n = self.n;
        self.n += 1;
        let store = (n % self.store_ids.len() as u64) as usize;
        let nominal_ms = self.start_ms + (n as f64 * self.ms_per_sale) as i64;
        let (item, mut price_cents) = if self.items.is_empty() {
            (String::from("item"), 0)
        } else {
            let item = &self.items[self.rng.random_range(0..self.items.len())];
            (item.name.clone(), item.price_cents)
        };
        if let Some((lo, hi)) = self.price_range {
            price_cents = self.rng.random_range(lo..=hi);
        }
        let jitter = if self.jitter_ms > 0 {
            self.rng.random_range(0..=self.jitter_ms)
        } else {
            0
        };
        let on_time_ts = (nominal_ms - jitter).div_euclid(1000);
        let late_ts = (nominal_ms - self.late_by_ms).div_euclid(1000);
        let draw: f64 = self.rng.random();
        let kind = if draw < self.malformed_fraction {
            SaleKind::Malformed(Malformed::ALL[self.rng.random_range(0..Malformed::ALL.len())])
        } else if draw < self.malformed_fraction + self.late_fraction
            && self.surely_late(store, late_ts)
        {
            SaleKind::Late
        } else {
            SaleKind::OnTime
        };
        let ts = if kind == SaleKind::Late {
            late_ts
        } else {
            on_time_ts
        };
        if kind == SaleKind::OnTime {
            let newest = &mut self.newest[store];
            *newest = Some(newest.map_or(ts, |m| m.max(ts)));
        }
        let store_id = self.store_ids[store].clone();
        let value = self.render(&store_id, &item, price_cents, ts, kind);
        Sale {
            n,
            key: self.keyed.then(|| store_id.clone()),
            store: store_id,
            item,
            price_cents,
            nominal_ms,
            ts,
            kind,
            value,
        }
    }

    fn render(&mut self, store: &str, item: &str, cents: i64, ts: i64, kind: SaleKind) -> Vec<u8> {
        let quote = |s: &str| serde_json::to_string(s).unwrap_or_else(|_| "\"\"".into());
        let (store, item) = (quote(store), quote(item));
        let price = format_price(cents);
        let value = match kind {
            SaleKind::OnTime | SaleKind::Late => {
                format!(r#"{{"store":{store},"item":{item},"price":{price},"ts":{ts}}}"#)
            }
            SaleKind::Malformed(m) => match m {
                Malformed::NotJson => {
                    let whole =
                        format!(r#"{{"store":{store},"item":{item},"price":{price},"ts":{ts}}}"#);
                    // Any proper prefix of an object is not JSON: the closing brace is missing.
                    let cut = self.rng.random_range(1..whole.len());
                    let mut cut = cut;
                    while !whole.is_char_boundary(cut) {
                        cut -= 1;
                    }
                    whole[..cut].to_string()
                }
                Malformed::NegativePrice => {
                    let price = format_price(-cents.max(1));
                    format!(r#"{{"store":{store},"item":{item},"price":{price},"ts":{ts}}}"#)
                }
                Malformed::PriceAsString => {
                    format!(r#"{{"store":{store},"item":{item},"price":"{price}","ts":{ts}}}"#)
                }
                Malformed::MissingTs => {
                    format!(r#"{{"store":{store},"item":{item},"price":{price}}}"#)
                }
                Malformed::TooPrecise => {
                    let third = self.rng.random_range(1..=9);
                    format!(r#"{{"store":{store},"item":{item},"price":{price}{third},"ts":{ts}}}"#)
                }
            },
        };
        value.into_bytes()
    }
}

/// A late sale, as sent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LateSale {
    pub store: String,
    pub item: String,
    pub price_cents: i64,
    pub ts: i64,
}

/// What the pipeline must make of a run's sales: the sum of the on-time sales per (store,
/// window start), in cents, and the sales sent late.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ExpectedTotals {
    pub window_secs: i64,
    #[serde(serialize_with = "windows_as_list")]
    pub windows: BTreeMap<(String, i64), i64>,
    pub late: Vec<LateSale>,
}

fn windows_as_list<S: Serializer>(
    windows: &BTreeMap<(String, i64), i64>,
    s: S,
) -> Result<S::Ok, S::Error> {
    #[derive(Serialize)]
    struct Window<'a> {
        store: &'a str,
        window_start: i64,
        total_cents: i64,
    }
    s.collect_seq(windows.iter().map(|((store, start), total)| Window {
        store,
        window_start: *start,
        total_cents: *total,
    }))
}

/// The smallest and greatest `ts` sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct EventTimeRange {
    pub min: i64,
    pub max: i64,
}

/// What a sales run sent.
#[derive(Debug, Clone, Serialize)]
pub struct SalesSummary {
    #[serde(flatten)]
    pub run: RunReport,
    /// The seed: the same seed, options and start give the same sales.
    pub seed: u64,
    pub stores: u32,
    pub keyed: bool,
    /// Valid sales within the allowed lateness.
    pub on_time: u64,
    /// Valid sales sent late.
    pub late: u64,
    /// Malformed sales, in all and per way of breaking.
    pub malformed: u64,
    pub malformed_kinds: BTreeMap<&'static str, u64>,
    /// The range of the `ts` sent (of every value that has one).
    pub event_time: Option<EventTimeRange>,
    /// With `record_totals`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub totals: Option<ExpectedTotals>,
}

/// Indexes of the progress line's categories.
const LATE: usize = 0;
const MALFORMED: usize = 1;

/// Tallies the sales of a run into its summary.
#[derive(Debug, Default)]
struct Tally {
    on_time: u64,
    late: u64,
    malformed: BTreeMap<&'static str, u64>,
    event_time: Option<EventTimeRange>,
    totals: Option<ExpectedTotals>,
}

impl Tally {
    fn add(&mut self, sale: &Sale, counters: &Counters) {
        match sale.kind {
            SaleKind::OnTime => {
                self.on_time += 1;
                if let Some(t) = &mut self.totals {
                    let start = sale.ts.div_euclid(t.window_secs) * t.window_secs;
                    *t.windows.entry((sale.store.clone(), start)).or_default() += sale.price_cents;
                }
            }
            SaleKind::Late => {
                self.late += 1;
                counters.add(LATE);
                if let Some(t) = &mut self.totals {
                    t.late.push(LateSale {
                        store: sale.store.clone(),
                        item: sale.item.clone(),
                        price_cents: sale.price_cents,
                        ts: sale.ts,
                    });
                }
            }
            SaleKind::Malformed(m) => {
                *self.malformed.entry(m.name()).or_default() += 1;
                counters.add(MALFORMED);
            }
        }
        let has_ts = !matches!(
            sale.kind,
            SaleKind::Malformed(Malformed::MissingTs | Malformed::NotJson)
        );
        if has_ts {
            self.event_time = Some(match self.event_time {
                None => EventTimeRange {
                    min: sale.ts,
                    max: sale.ts,
                },
                Some(r) => EventTimeRange {
                    min: r.min.min(sale.ts),
                    max: r.max.max(sale.ts),
                },
            });
        }
    }
}

/// Sends sales to `opts.produce.topic` with a producer made from `producer_cfg` (see
/// [`super::client_config`] for the runner's), paced or as fast as possible, until the limit
/// or a stop; returns once every sale is acknowledged. Fails with a clear error if the
/// brokers are unreachable or a sale cannot be delivered within the delivery timeout.
pub async fn sales(
    producer_cfg: ClientConfig,
    opts: SalesOptions,
    progress: Progress,
) -> anyhow::Result<SalesSummary> {
    opts.validate()?;
    if opts.jitter > opts.allowed_lateness {
        tracing::warn!(
            jitter = ?opts.jitter,
            allowed_lateness = ?opts.allowed_lateness,
            "The jitter exceeds the allowed lateness: some sales not sent late may be late, and the expected totals count them."
        );
    }
    let seed = opts.seed.unwrap_or_else(|| rand::rng().random());
    let mut generator: Option<SalesGenerator> = None;
    let mut tally = Tally {
        totals: opts.record_totals.then(|| ExpectedTotals {
            window_secs: opts.window.as_secs() as i64,
            ..ExpectedTotals::default()
        }),
        ..Tally::default()
    };
    let run = drive(
        producer_cfg,
        &opts.produce,
        opts.per_second(),
        "produce sales",
        &["late", "malformed"],
        progress,
        |_, counters| {
            // Event time starts when the first sale is made, after the brokers answered.
            let generator = generator.get_or_insert_with(|| {
                let start_ms = match opts.simulated_start {
                    Some(s) => s.saturating_mul(1000),
                    None => SystemTime::now()
                        .duration_since(UNIX_EPOCH)
                        .map(|d| d.as_millis() as i64)
                        .unwrap_or(0),
                };
                SalesGenerator::new(&opts, seed, start_ms)
            });
            let sale = generator.next_sale();
            tally.add(&sale, counters);
            Record {
                key: sale.key,
                value: sale.value,
            }
        },
    )
    .await?;
    Ok(SalesSummary {
        run,
        seed,
        stores: opts.stores,
        keyed: opts.keyed,
        on_time: tally.on_time,
        late: tally.late,
        malformed: tally.malformed.values().sum(),
        malformed_kinds: tally.malformed,
        event_time: tally.event_time,
        totals: tally.totals,
    })
}

impl fmt::Display for SalesSummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let r = &self.run;
        writeln!(
            f,
            "Sent {} {} to topic {} ({} stores, {}){}",
            r.sent,
            if r.sent == 1 { "sale" } else { "sales" },
            r.topic,
            self.stores,
            if self.keyed {
                "keyed by store"
            } else {
                "unkeyed"
            },
            if r.interrupted { ", interrupted" } else { "" }
        )?;
        let kinds = self
            .malformed_kinds
            .iter()
            .map(|(k, n)| format!("{k} {n}"))
            .collect::<Vec<_>>()
            .join(", ");
        writeln!(
            f,
            "  on time {}, late {}, malformed {}{}",
            self.on_time,
            self.late,
            self.malformed,
            if kinds.is_empty() {
                String::new()
            } else {
                format!(" ({kinds})")
            }
        )?;
        match self.event_time {
            Some(t) => writeln!(
                f,
                "  event time {} .. {} (ts {} .. {})",
                format_event_time(t.min),
                format_event_time(t.max),
                t.min,
                t.max
            )?,
            None => writeln!(f, "  event time: none sent")?,
        }
        writeln!(
            f,
            "  wall time {:.2} s, {:.0} sales/s, seed {}",
            r.wall_time_secs, r.events_per_sec, self.seed
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts() -> SalesOptions {
        SalesOptions {
            simulated_start: Some(1_756_809_000),
            seed: Some(7),
            ..SalesOptions::default()
        }
    }

    fn generate(opts: &SalesOptions, count: usize) -> Vec<Sale> {
        opts.validate().expect("valid options");
        let mut g = SalesGenerator::new(opts, 7, opts.simulated_start.unwrap() * 1000);
        (0..count).map(|_| g.next_sale()).collect()
    }

    fn json(s: &Sale) -> serde_json::Value {
        serde_json::from_slice(&s.value).expect("a JSON value")
    }

    /// The price as written in the value, in cents, when it has at most two decimals.
    fn written_cents(s: &Sale) -> Option<i64> {
        let text = String::from_utf8(s.value.clone()).unwrap();
        let start = text.find("\"price\":")? + "\"price\":".len();
        let end = start + text[start..].find([',', '}'])?;
        parse_price(&text[start..end]).ok()
    }

    #[test]
    fn the_same_seed_gives_the_same_sales() {
        let o = SalesOptions {
            jitter: Duration::from_secs(5),
            late_fraction: 0.2,
            malformed_fraction: 0.2,
            ..opts()
        };
        let a: Vec<_> = generate(&o, 500).into_iter().map(|s| s.value).collect();
        let b: Vec<_> = generate(&o, 500).into_iter().map(|s| s.value).collect();
        assert_eq!(a, b);
        let mut other = SalesGenerator::new(&o, 8, o.simulated_start.unwrap() * 1000);
        let c: Vec<_> = (0..500).map(|_| other.next_sale().value).collect();
        assert_ne!(a, c, "another seed gives other sales");
    }

    #[test]
    fn sales_go_round_robin_one_per_second_per_store() {
        let o = SalesOptions {
            stores: 3,
            jitter: Duration::ZERO,
            ..opts()
        };
        let sales = generate(&o, 9);
        let stores: Vec<_> = sales.iter().map(|s| s.store.as_str()).collect();
        assert_eq!(
            stores,
            ["store-1", "store-2", "store-3"].repeat(3),
            "round robin"
        );
        for s in &sales {
            assert_eq!(s.key.as_deref(), Some(s.store.as_str()), "keyed by store");
            let v = json(s);
            assert_eq!(v["store"], s.store.as_str());
            assert_eq!(v["ts"], s.ts);
        }
        // Each store's sales are one second of event time apart.
        assert_eq!(sales[3].ts - sales[0].ts, 1);
        assert_eq!(sales[0].ts, 1_756_809_000);
        let unkeyed = generate(
            &SalesOptions {
                keyed: false,
                ..o.clone()
            },
            3,
        );
        assert!(unkeyed.iter().all(|s| s.key.is_none()));
    }

    #[test]
    fn prices_are_exact_with_two_decimals() {
        let sales = generate(&opts(), 300);
        for s in &sales {
            let text = String::from_utf8(s.value.clone()).unwrap();
            let price = format_price(s.price_cents);
            assert!(
                text.contains(&format!("\"price\":{price},")),
                "{text} has the price {price}"
            );
            assert_eq!(written_cents(s), Some(s.price_cents));
            assert!(CATALOGUE.contains(&(s.item.as_str(), s.price_cents)));
        }
        assert_eq!(format_price(350), "3.50");
        assert_eq!(format_price(5), "0.05");
        assert_eq!(format_price(-1205), "-12.05");
        assert_eq!(parse_price("3.5"), Ok(350));
        assert_eq!(parse_price("12"), Ok(1200));
        assert_eq!(parse_price("0.07"), Ok(7));
        for bad in ["3.505", "-1", "1.", ".5", "x", "", "1e3"] {
            assert!(parse_price(bad).is_err(), "{bad:?}");
        }

        let ranged = generate(
            &SalesOptions {
                price_range: Some((100, 199)),
                ..opts()
            },
            300,
        );
        assert!(ranged.iter().all(
            |s| (100..=199).contains(&s.price_cents) && written_cents(s) == Some(s.price_cents)
        ));
        assert_eq!(
            parse_item("latte=4.1"),
            Ok(Item {
                name: "latte".into(),
                price_cents: 410
            })
        );
        assert_eq!(parse_item("coffee").map(|i| i.price_cents), Ok(350));
        assert!(parse_item("caviar").is_err());
    }

    #[test]
    fn jitter_stays_within_its_bounds() {
        let o = SalesOptions {
            jitter: Duration::from_millis(5500),
            ..opts()
        };
        let sales = generate(&o, 2000);
        let mut behind = std::collections::BTreeSet::new();
        for s in &sales {
            let newest = s.nominal_ms.div_euclid(1000);
            let oldest = (s.nominal_ms - 5500).div_euclid(1000);
            assert!((oldest..=newest).contains(&s.ts), "{s:?}");
            behind.insert(newest - s.ts);
        }
        assert_eq!(behind.len(), 7, "0..=6 s behind all occur: {behind:?}");
        let none = generate(
            &SalesOptions {
                jitter: Duration::ZERO,
                ..opts()
            },
            100,
        );
        assert!(none.iter().all(|s| s.ts == s.nominal_ms.div_euclid(1000)));
    }

    #[test]
    fn late_sales_are_surely_late_and_about_the_fraction() {
        let o = SalesOptions {
            late_fraction: 0.25,
            ..opts()
        };
        let sales = generate(&o, 10_000);
        let late: Vec<_> = sales.iter().filter(|s| s.kind == SaleKind::Late).collect();
        let share = late.len() as f64 / sales.len() as f64;
        assert!((0.22..0.27).contains(&share), "late share {share}");
        let mut newest: BTreeMap<&str, i64> = BTreeMap::new();
        for s in &sales {
            match s.kind {
                SaleKind::Late => {
                    assert_eq!(s.ts, (s.nominal_ms - 120_000).div_euclid(1000));
                    let window_end = (s.ts.div_euclid(30) + 1) * 30;
                    let watermark = newest[s.store.as_str()] - 30;
                    assert!(window_end <= watermark, "{s:?} is late");
                    let v = json(s);
                    assert_eq!(v["ts"], s.ts);
                }
                SaleKind::OnTime => {
                    let m = newest.entry(s.store.as_str()).or_insert(s.ts);
                    *m = (*m).max(s.ts);
                }
                SaleKind::Malformed(_) => unreachable!("no malformed sales asked for"),
            }
        }
        // A store's first sale is never late: its partition has no watermark yet.
        assert!(sales[..10].iter().all(|s| s.kind == SaleKind::OnTime));
        assert!(generate(&opts(), 1000)
            .iter()
            .all(|s| s.kind == SaleKind::OnTime));
    }

    #[test]
    fn malformed_sales_come_in_every_form() {
        let o = SalesOptions {
            malformed_fraction: 0.5,
            ..opts()
        };
        let sales = generate(&o, 2000);
        let mut seen = BTreeMap::new();
        for s in &sales {
            let SaleKind::Malformed(m) = s.kind else {
                let v = json(s);
                assert!(v["price"].is_number() && v["ts"].is_i64());
                continue;
            };
            *seen.entry(m).or_insert(0) += 1;
            let parsed = serde_json::from_slice::<serde_json::Value>(&s.value);
            match m {
                Malformed::NotJson => assert!(parsed.is_err(), "{:?}", s.value),
                Malformed::NegativePrice => {
                    let v = parsed.unwrap();
                    assert!(v["price"].as_f64().unwrap() < 0.0);
                    assert_eq!(written_cents(s), None);
                }
                Malformed::PriceAsString => {
                    let v = parsed.unwrap();
                    assert_eq!(v["price"], format_price(s.price_cents).as_str());
                }
                Malformed::MissingTs => {
                    let v = parsed.unwrap();
                    assert!(v.get("ts").is_none() && v["price"].is_number());
                }
                Malformed::TooPrecise => {
                    let v = parsed.unwrap();
                    let text = String::from_utf8(s.value.clone()).unwrap();
                    let price = format!("\"price\":{}", format_price(s.price_cents));
                    let at = text.find(&price).unwrap() + price.len();
                    let third = text.as_bytes()[at];
                    assert!((b'1'..=b'9').contains(&third), "{text}");
                    assert!(v["price"].is_f64());
                }
            }
            assert_eq!(s.key.as_deref(), Some(s.store.as_str()));
        }
        assert_eq!(seen.len(), Malformed::ALL.len(), "{seen:?}");
        let total: usize = seen.values().sum();
        assert!((900..1100).contains(&total), "{total} malformed of 2000");
    }

    #[test]
    fn options_are_checked() {
        let e = SalesOptions {
            stores: 0,
            rate: 0.0,
            late_fraction: 0.7,
            malformed_fraction: 0.7,
            late_by: Duration::from_secs(60),
            ..opts()
        }
        .validate()
        .unwrap_err()
        .to_string();
        for part in ["stores", "rate", "exceed 1", "late_by"] {
            assert!(e.contains(part), "{part}: {e}");
        }
        assert!(opts().validate().is_ok());
        assert_eq!(opts().per_second(), 10.0);
    }

    #[test]
    fn the_summary_reads_well_and_serialises() {
        let mut totals = ExpectedTotals {
            window_secs: 30,
            ..ExpectedTotals::default()
        };
        totals
            .windows
            .insert(("store-1".into(), 1_756_809_000), 1234);
        let summary = SalesSummary {
            run: RunReport {
                topic: "sales".into(),
                sent: 10,
                wall_time_secs: 1.0,
                events_per_sec: 10.0,
                interrupted: false,
            },
            seed: 7,
            stores: 2,
            keyed: true,
            on_time: 8,
            late: 1,
            malformed: 1,
            malformed_kinds: BTreeMap::from([("not_json", 1)]),
            event_time: Some(EventTimeRange {
                min: 1_756_809_000,
                max: 1_756_809_004,
            }),
            totals: Some(totals),
        };
        let text = summary.to_string();
        assert!(text.contains("Sent 10 sales to topic sales (2 stores, keyed by store)"));
        assert!(text.contains("malformed 1 (not_json 1)"));
        assert!(text.contains("2025-09-02T10:30:00Z"));
        let v = serde_json::to_value(&summary).unwrap();
        assert_eq!(v["sent"], 10);
        assert_eq!(v["totals"]["windows"][0]["total_cents"], 1234);
        assert_eq!(v["malformed_kinds"]["not_json"], 1);
    }
}
