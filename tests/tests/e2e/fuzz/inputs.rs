//! Generated inputs: campaign and sale payloads (arbitrary bytes, JSON of any shape, objects of
//! the right shape with arbitrary fields, mutations of valid messages, invalid UTF-8, NUL
//! characters, deeply nested JSON, values at and past the size limit), and Kafka keys and
//! headers.

use proptest::collection::vec;
use proptest::prelude::*;
use proptest::sample::Index;
use serde_json::{Map, Value};

/// The campaign pipeline's "now" in these properties.
pub const NOW: i64 = 1_700_000_000;

/// Restaurants with subscribers in the end-to-end property (and SPEC.md's, whose example the
/// mutations start from).
pub const RESTAURANTS: [&str; 3] = [
    "123e4567-e89b-12d3-a456-426614174000",
    "00000000-0000-4000-8000-00000000000a",
    "00000000-0000-4000-8000-00000000000b",
];

pub const CAMPAIGN_FIELDS: [&str; 8] = [
    "restaurant_id",
    "adv_campaign_id",
    "adv_campaign_content",
    "adv_campaign_owner",
    "adv_campaign_owner_contact",
    "adv_campaign_datetime_start",
    "adv_campaign_datetime_end",
    "datetime_created",
];

/// Text with what breaks naive handling: quotes, backslashes, control characters, NUL, line
/// separators, characters outside the BMP; sometimes past 64 KiB.
pub fn text() -> BoxedStrategy<String> {
    prop_oneof![
        6 => "[a-z ]{0,12}",
        4 => ".{0,12}",
        3 => "[\"\\\\\u{0}\u{1}\u{1f}\u{7f}\u{2028}\u{fffd}😀é a]{0,10}",
        1 => Just(String::new()),
        1 => (65_530usize..65_545).prop_map(|n| "x".repeat(n)),
    ]
    .boxed()
}

/// A hyphenated UUID, lower case as the subscribers table has them.
fn uuid() -> impl Strategy<Value = String> {
    any::<u128>().prop_map(|u| uuid::Uuid::from_u128(u).hyphenated().to_string())
}

/// An id field: one of the restaurants with subscribers, any UUID, or one the rules refuse or
/// the join does not find (upper case, braces, no hyphens, not a UUID).
fn id() -> BoxedStrategy<String> {
    prop_oneof![
        4 => proptest::sample::select(&RESTAURANTS[..]).prop_map(str::to_string),
        4 => uuid(),
        1 => uuid().prop_map(|u| u.to_uppercase()),
        1 => uuid().prop_map(|u| format!("{{{u}}}")),
        1 => uuid().prop_map(|u| u.replace('-', "")),
        1 => text(),
    ]
    .boxed()
}

/// Unix seconds: around now (so that campaigns are active, not started or expired), or at the
/// edges of the type.
fn seconds() -> BoxedStrategy<i64> {
    prop_oneof![
        6 => (-100_000i64..100_000).prop_map(|d| NOW + d),
        1 => any::<i64>(),
        1 => proptest::sample::select(vec![0, -1, i64::MIN, i64::MAX, i64::from(i32::MAX) + 1]),
    ]
    .boxed()
}

/// A JSON value of any kind, a few levels deep.
pub fn json_value() -> BoxedStrategy<Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>().prop_filter_map("finite", |f| serde_json::Number::from_f64(f)
            .map(Value::Number)),
        text().prop_map(Value::String),
    ];
    leaf.prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            vec(inner.clone(), 0..4).prop_map(Value::Array),
            vec((field_name(), inner), 0..4).prop_map(|kv| Value::Object(kv.into_iter().collect())),
        ]
    })
    .boxed()
}

fn field_name() -> BoxedStrategy<String> {
    let mut names: Vec<String> = CAMPAIGN_FIELDS.iter().map(|s| s.to_string()).collect();
    names.extend(["store", "item", "price", "ts"].map(String::from));
    prop_oneof![
        3 => proptest::sample::select(names),
        1 => ".{0,6}",
    ]
    .boxed()
}

/// A campaign-shaped object: each field valid, absent, null or of any other value; sometimes
/// with extra fields.
pub fn campaign_object() -> BoxedStrategy<Value> {
    fn field(valid: BoxedStrategy<Value>) -> BoxedStrategy<Option<Value>> {
        prop_oneof![
            40 => valid.prop_map(Some),
            1 => Just(None),
            1 => Just(Some(Value::Null)),
            1 => json_value().prop_map(Some),
        ]
        .boxed()
    }
    let ids = || id().prop_map(Value::String).boxed();
    let texts = || text().prop_map(Value::String).boxed();
    let times = || seconds().prop_map(Value::from).boxed();
    let fields = (
        field(ids()),
        field(ids()),
        field(texts()),
        field(texts()),
        field(texts()),
        (field(times()), field(times()), field(times())),
        vec((field_name(), json_value()), 0..2),
    );
    fields
        .prop_map(|(r, a, c, o, oc, (s, e, d), extra)| {
            let mut m = Map::new();
            for (name, v) in extra {
                m.insert(name, v);
            }
            for (name, v) in CAMPAIGN_FIELDS.iter().zip([r, a, c, o, oc, s, e, d]) {
                match v {
                    Some(v) => m.insert(name.to_string(), v),
                    None => m.remove(*name),
                };
            }
            Value::Object(m)
        })
        .boxed()
}

/// An edit of a payload's bytes.
#[derive(Debug, Clone)]
pub enum Edit {
    Flip(Index, u8),
    Insert(Index, Vec<u8>),
    Delete(Index, usize),
    Duplicate(Index, usize),
    Truncate(Index),
}

fn edit() -> impl Strategy<Value = Edit> {
    let bytes = prop_oneof![
        vec(any::<u8>(), 1..4),
        proptest::sample::select(vec![
            b"\\u0000".to_vec(),
            b"\"".to_vec(),
            b"{".to_vec(),
            b"}".to_vec(),
            b",".to_vec(),
            b"99999999999999999999999".to_vec(),
            b"-".to_vec(),
            b"null".to_vec(),
            b"\\".to_vec(),
            vec![0xC3, 0x28],
            vec![0xFF],
            vec![0],
        ]),
    ];
    prop_oneof![
        3 => (any::<Index>(), 1u8..=255).prop_map(|(i, x)| Edit::Flip(i, x)),
        3 => (any::<Index>(), bytes).prop_map(|(i, b)| Edit::Insert(i, b)),
        2 => (any::<Index>(), 1usize..8).prop_map(|(i, n)| Edit::Delete(i, n)),
        1 => (any::<Index>(), 1usize..16).prop_map(|(i, n)| Edit::Duplicate(i, n)),
        1 => any::<Index>().prop_map(Edit::Truncate),
    ]
}

/// Applies `edits` to `b`, in order.
pub fn mutate(mut b: Vec<u8>, edits: &[Edit]) -> Vec<u8> {
    for e in edits {
        let at = |i: &Index, len: usize| if len == 0 { 0 } else { i.index(len + 1) };
        match e {
            Edit::Flip(i, x) if !b.is_empty() => {
                let p = i.index(b.len());
                b[p] ^= x;
            }
            Edit::Flip(..) => {}
            Edit::Insert(i, bytes) => {
                let p = at(i, b.len());
                b.splice(p..p, bytes.iter().copied());
            }
            Edit::Delete(i, n) => {
                let p = at(i, b.len());
                let end = (p + n).min(b.len());
                b.drain(p..end);
            }
            Edit::Duplicate(i, n) => {
                let p = at(i, b.len());
                let end = (p + n).min(b.len());
                let piece = b[p..end].to_vec();
                b.splice(p..p, piece);
            }
            Edit::Truncate(i) => {
                let p = at(i, b.len());
                b.truncate(p);
            }
        }
    }
    b
}

/// JSON nested `depth` deep: arrays, objects, or a campaign field holding it; sometimes never
/// closed.
pub fn deep_json() -> BoxedStrategy<Vec<u8>> {
    (1usize..20_000, 0u8..4, any::<bool>())
        .prop_map(|(depth, kind, closed)| {
            let (open, close) = match kind {
                0 | 1 => ("[", "]"),
                _ => ("{\"a\":", "}"),
            };
            let mut s = String::new();
            if kind == 1 {
                s.push_str("{\"restaurant_id\":");
            }
            s.push_str(&open.repeat(depth));
            s.push('1');
            if closed {
                s.push_str(&close.repeat(depth));
                if kind == 1 {
                    s.push('}');
                }
            }
            s.into_bytes()
        })
        .boxed()
}

/// A valid payload made invalid UTF-8: a byte that never occurs in UTF-8, a character cut
/// short, an overlong encoding or a lone surrogate put somewhere in it.
fn broken_utf8(base: BoxedStrategy<Vec<u8>>) -> BoxedStrategy<Vec<u8>> {
    let bad = proptest::sample::select(vec![
        vec![0xFF],
        vec![0xC3],
        vec![0xC0, 0xAF],
        vec![0xED, 0xA0, 0x80],
        vec![0xF4, 0x90, 0x80, 0x80],
    ]);
    (base, bad, any::<Index>())
        .prop_map(|(mut b, bad, i)| {
            let p = i.index(b.len() + 1);
            b.splice(p..p, bad);
            b
        })
        .boxed()
}

/// The campaign SPEC.md gives as its example: the start of the mutations.
pub const SPEC_CAMPAIGN: &str = e2e_tests::SPEC_CAMPAIGN;

fn campaign_bytes() -> BoxedStrategy<Vec<u8>> {
    campaign_object()
        .prop_map(|v| serde_json::to_vec(&v).expect("JSON"))
        .boxed()
}

/// A campaign whose value is exactly `size` bytes (its content padded), active for
/// restaurant `r`.
pub fn campaign_of_size(size: usize, r: &str, id: &str) -> Vec<u8> {
    let mut v = serde_json::json!({
        "restaurant_id": r,
        "adv_campaign_id": id,
        "adv_campaign_content": "",
        "adv_campaign_owner": "o",
        "adv_campaign_owner_contact": "c",
        "adv_campaign_datetime_start": NOW - 10,
        "adv_campaign_datetime_end": NOW + 10,
        "datetime_created": NOW - 100,
    });
    let bare = serde_json::to_vec(&v).expect("JSON").len();
    v["adv_campaign_content"] = "x".repeat(size.saturating_sub(bare)).into();
    serde_json::to_vec(&v).expect("JSON")
}

/// A campaign active now for a restaurant with subscribers (or without), its text fields any
/// text: what reaches both sinks.
fn active_campaign() -> BoxedStrategy<Vec<u8>> {
    (
        proptest::sample::select(&RESTAURANTS[..]),
        prop_oneof![9 => uuid(), 1 => Just("123e4567-e89b-12d3-a456-426614174003".to_string())],
        (text(), text(), text()),
        (1i64..100_000, 1i64..100_000, any::<i64>()),
    )
        .prop_map(
            |(r, id, (content, owner, contact), (before, after, created))| {
                serde_json::to_vec(&serde_json::json!({
                    "restaurant_id": r,
                    "adv_campaign_id": id,
                    "adv_campaign_content": content,
                    "adv_campaign_owner": owner,
                    "adv_campaign_owner_contact": contact,
                    "adv_campaign_datetime_start": NOW - before,
                    "adv_campaign_datetime_end": NOW + after,
                    "datetime_created": created,
                }))
                .expect("JSON")
            },
        )
        .boxed()
}

/// Any campaign payload: `limit` is the runner's `max_message_bytes` (values around it are
/// generated too).
pub fn campaign_payload(limit: usize) -> BoxedStrategy<Vec<u8>> {
    let huge = (
        proptest::sample::select(vec![limit - 1, limit, limit + 1, limit / 2]),
        proptest::sample::select(&RESTAURANTS[..]),
        uuid(),
    )
        .prop_map(|(n, r, id)| campaign_of_size(n, r, &id));
    prop_oneof![
        2 => vec(any::<u8>(), 0..64),
        1 => proptest::sample::select(vec![
            Vec::new(),
            b"{}".to_vec(),
            b"null".to_vec(),
            b" ".to_vec(),
            b"\0".to_vec(),
            b"[]".to_vec(),
            b"\"a campaign\"".to_vec(),
        ]),
        2 => json_value().prop_map(|v| serde_json::to_vec(&v).expect("JSON")),
        6 => campaign_bytes(),
        6 => active_campaign(),
        4 => (
            prop_oneof![Just(SPEC_CAMPAIGN.as_bytes().to_vec()), campaign_bytes()],
            vec(edit(), 1..4)
        )
            .prop_map(|(b, edits)| mutate(b, &edits)),
        1 => deep_json(),
        1 => broken_utf8(campaign_bytes()),
        1 => huge,
    ]
    .boxed()
}

/// A field of a sale as raw JSON text, or absent (None).
fn sale_field(valid: BoxedStrategy<String>) -> BoxedStrategy<Option<String>> {
    prop_oneof![
        40 => valid.prop_map(Some),
        1 => Just(None),
        1 => Just(Some("null".to_string())),
        1 => json_value().prop_map(|v| Some(v.to_string())),
    ]
    .boxed()
}

/// A store: one of a few (so that sales add up in the same windows), any text, empty.
fn store() -> BoxedStrategy<String> {
    prop_oneof![
        6 => proptest::sample::select(vec!["s1", "s2", "store-3"]).prop_map(str::to_string),
        2 => text(),
        1 => Just(String::new()),
    ]
    .boxed()
}

/// A price as JSON text: amounts with up to 4 decimals, exponents, negative numbers, numbers
/// too large for 64 bits of minor units, and the largest that fit.
fn price() -> BoxedStrategy<String> {
    prop_oneof![
        8 => (0u64..100_000, 0u32..1000, prop_oneof![3 => 0usize..3, 1 => 3usize..5])
            .prop_map(|(u, f, d)| match d {
            0 => u.to_string(),
            _ => format!("{u}.{:0width$}", f % 10u32.pow(d as u32), width = d),
        }),
        1 => proptest::sample::select(vec![
            "0", "-0", "0.0", "-1", "-0.01", "1e2", "1.5e1", "1E-2", "1e-3", "0.105", "00.1",
            "1e400", "92233720368547758.07", "92233720368547758.08", "50000000000000000",
            "46116860184273879.04", "18446744073709551616",
        ])
        .prop_map(str::to_string),
        1 => (any::<u64>(), 0u32..4).prop_map(|(u, d)| format!("{u}e-{d}")),
    ]
    .boxed()
}

/// A sale's event time: seconds after the batch's base time (rendered by [`SaleValue::render`]),
/// or a literal (out of the accepted range, not an integer, the range's first second).
#[derive(Debug, Clone)]
pub enum Ts {
    After(i64),
    Literal(String),
}

fn ts() -> BoxedStrategy<Option<Ts>> {
    prop_oneof![
        12 => (-200i64..400).prop_map(|d| Some(Ts::After(d))),
        1 => Just(None),
        1 => proptest::sample::select(vec![
            "null", "946684799", "946684800", "4102444800", "1.7e9", "\"1764255600\"", "-1",
            "1764255600.0", "99999999999999999999",
        ])
        .prop_map(|s| Some(Ts::Literal(s.to_string()))),
    ]
    .boxed()
}

/// A sale value, rendered against a base time.
#[derive(Debug, Clone)]
pub enum SaleValue {
    /// A tombstone (no value).
    None,
    Bytes(Vec<u8>),
    Sale {
        store: Option<String>,
        item: Option<String>,
        price: Option<String>,
        ts: Option<Ts>,
        extra: Vec<(String, Value)>,
        /// Edits applied after rendering.
        edits: Vec<Edit>,
    },
}

impl SaleValue {
    pub fn render(&self, base: i64) -> Option<Vec<u8>> {
        match self {
            SaleValue::None => None,
            SaleValue::Bytes(b) => Some(b.clone()),
            SaleValue::Sale {
                store,
                item,
                price,
                ts,
                extra,
                edits,
            } => {
                let mut fields: Vec<(String, String)> = extra
                    .iter()
                    .map(|(k, v)| (k.clone(), v.to_string()))
                    .collect();
                let ts = ts.as_ref().map(|t| match t {
                    Ts::After(d) => (base + d).to_string(),
                    Ts::Literal(s) => s.clone(),
                });
                for (name, v) in [
                    ("store", store),
                    ("item", item),
                    ("price", price),
                    ("ts", &ts),
                ] {
                    if let Some(v) = v {
                        fields.push((name.to_string(), v.clone()));
                    }
                }
                let body: Vec<String> = fields
                    .iter()
                    .map(|(k, v)| format!("{}:{v}", Value::from(k.as_str())))
                    .collect();
                let b = format!("{{{}}}", body.join(",")).into_bytes();
                Some(mutate(b, edits))
            }
        }
    }
}

/// Any sale value (`limit`: the runner's `max_message_bytes`).
pub fn sale_value(limit: usize) -> BoxedStrategy<SaleValue> {
    let sale = (
        sale_field(store().prop_map(|s| Value::from(s).to_string()).boxed()),
        sale_field(text().prop_map(|s| Value::from(s).to_string()).boxed()),
        sale_field(price()),
        ts(),
        vec((field_name(), json_value()), 0..2),
        prop_oneof![6 => Just(Vec::new()), 1 => vec(edit(), 1..3)],
    )
        .prop_map(|(store, item, price, ts, extra, edits)| SaleValue::Sale {
            store,
            item,
            price,
            ts,
            extra,
            edits,
        });
    let huge = proptest::sample::select(vec![limit - 1, limit, limit + 1]).prop_map(|n| {
        let bare = r#"{"store":"s1","item":"","price":1,"ts":1764255600}"#.len();
        SaleValue::Bytes(
            format!(
                r#"{{"store":"s1","item":"{}","price":1,"ts":1764255600}}"#,
                "x".repeat(n - bare)
            )
            .into_bytes(),
        )
    });
    prop_oneof![
        12 => sale,
        2 => vec(any::<u8>(), 0..48).prop_map(SaleValue::Bytes),
        1 => Just(SaleValue::Bytes(Vec::new())),
        2 => json_value().prop_map(|v| SaleValue::Bytes(v.to_string().into_bytes())),
        1 => deep_json().prop_map(SaleValue::Bytes),
        1 => broken_utf8(Just(br#"{"store":"s1","item":"x","price":1,"ts":1764255600}"#.to_vec()).boxed())
            .prop_map(SaleValue::Bytes),
        1 => huge,
    ]
    .boxed()
}

/// A Kafka record key: none, empty, any bytes, sometimes long.
pub fn key() -> BoxedStrategy<Option<Vec<u8>>> {
    prop_oneof![
        3 => Just(None),
        1 => Just(Some(Vec::new())),
        4 => vec(any::<u8>(), 1..24).prop_map(Some),
        1 => (1usize..70_000).prop_map(|n| Some(vec![b'k'; n])),
    ]
    .boxed()
}

/// Kafka record headers: names any text without NUL (librdkafka hands a name over as a C
/// string, so a NUL would cut it; names that are not UTF-8 are `header_names.rs`'s), values
/// any bytes, empty or none, sometimes past 64 KiB.
pub fn headers() -> BoxedStrategy<Vec<(String, Option<Vec<u8>>)>> {
    let name = prop_oneof![
        3 => "[a-z-]{1,12}",
        1 => "[^\u{0}]{0,8}",
        1 => Just("dlq-reason".to_string()),
    ];
    let value = prop_oneof![
        1 => Just(None),
        6 => vec(any::<u8>(), 0..16).prop_map(Some),
        1 => (65_530usize..70_000).prop_map(|n| Some(vec![b'v'; n])),
    ];
    prop_oneof![
        3 => Just(Vec::new()),
        4 => vec((name, value), 1..6),
    ]
    .boxed()
}
