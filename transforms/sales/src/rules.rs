//! The sales rules themselves, free of any WIT glue: what a valid sale is (docs/SPEC.md,
//! "Pipeline 2") and what it is worth, exactly, in minor currency units. Kept plain Rust so the
//! same code runs as the WASM component (through `lib.rs`) and natively (tests, benchmarks).
//!
//! A sale is a JSON object with `store` (a non-empty string), `item` (a string), `price` (a
//! number, not negative, with at most `minor_digits` decimal digits) and `ts` (an integer of
//! unix seconds within 2000-01-01..2100-01-01); other fields are allowed and ignored. A price is
//! read from its literal text, digit by digit, never through a float: `0.10` is exactly 10
//! cents, `1.5e1` exactly 1500.
//!
//! The per-event cost is what the pipeline's throughput is made of: a valid sale is parsed
//! once, its fields borrowed from the payload, and costs one allocation, its store id.

use serde::Deserialize;
use serde_json::value::RawValue;
use std::borrow::Cow;

/// The earliest event time accepted: 2000-01-01T00:00:00Z.
pub const EVENT_TIME_MIN: i64 = 946_684_800;
/// The first event time refused past the range: 2100-01-01T00:00:00Z.
pub const EVENT_TIME_END: i64 = 4_102_444_800;

/// A sale that passed validation (WIT `sale`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sale {
    /// Which message of the batch (0-based).
    pub index: u32,
    pub store: String,
    /// The price in minor currency units: exact, never negative.
    pub amount_minor: i64,
    /// Unix seconds.
    pub event_time: i64,
}

/// One message that passed validation, its store id borrowed from the payload unless it had
/// to be unescaped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ValidSale<'a> {
    pub store: Cow<'a, str>,
    pub amount_minor: i64,
    pub event_time: i64,
}

/// Machine-readable reason for refusing a message (WIT `rejection-code`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Code {
    NotUtf8,
    MalformedJson,
    NotAnObject,
    MissingField,
    WrongType,
    EmptyStore,
    NegativePrice,
    TooPrecise,
    OutOfRange,
}

/// Why a message was refused (WIT `rejection`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    pub code: Code,
    /// The field at fault, when one is.
    pub field: Option<&'static str>,
    /// A human-readable sentence.
    pub detail: String,
}

impl Rejection {
    fn new(code: Code, field: Option<&'static str>, detail: String) -> Self {
        Rejection {
            code,
            field,
            detail,
        }
    }
}

/// A refused message of a batch (WIT `rejected`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejected {
    /// Which message of the batch (0-based).
    pub index: u32,
    pub rejection: Rejection,
}

/// What a batch came to (WIT `batch-result`): every message in exactly one of the two lists,
/// each list in batch order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BatchResult {
    pub sales: Vec<Sale>,
    pub rejections: Vec<Rejected>,
}

/// Validates a batch of packed messages: `payloads` is every message concatenated and
/// `ends[i]` is where message i ends in it. Every message lands in exactly one of the result's
/// lists, in batch order.
///
/// # Panics
/// When the packing breaks the contract (an end offset before the previous one or past the
/// buffer, the last one not the buffer's length): the host guarantees it.
pub fn validate_batch(payloads: &[u8], ends: &[u32], minor_digits: u8) -> BatchResult {
    let mut result = BatchResult {
        sales: Vec::with_capacity(ends.len()),
        rejections: Vec::new(),
    };
    let last = ends.last().map_or(0, |&e| e as usize);
    assert_eq!(
        last,
        payloads.len(),
        "packed payloads: the last end offset must be the buffer's length"
    );
    let mut start = 0;
    for (i, &end) in ends.iter().enumerate() {
        let end = end as usize;
        assert!(
            start <= end,
            "packed payloads: end offsets must not go backwards"
        );
        // `ends` is a WIT list<u32> in a 32-bit guest: its length fits a u32.
        let index = i as u32;
        match validate(&payloads[start..end], minor_digits) {
            Ok(sale) => result.sales.push(Sale {
                index,
                store: sale.store.into_owned(),
                amount_minor: sale.amount_minor,
                event_time: sale.event_time,
            }),
            Err(rejection) => result.rejections.push(Rejected { index, rejection }),
        }
        start = end;
    }
    result
}

/// The fields the rules read, each as its raw JSON text (absent or `null`: `None`). Unknown
/// fields are skipped.
#[derive(Deserialize)]
struct Fields<'a> {
    #[serde(borrow)]
    store: Option<&'a RawValue>,
    #[serde(borrow)]
    item: Option<&'a RawValue>,
    #[serde(borrow)]
    price: Option<&'a RawValue>,
    #[serde(borrow)]
    ts: Option<&'a RawValue>,
}

/// Validates one message: UTF-8, a JSON object, then `store`, `item`, `price` and `ts` in that
/// order (the first fault found is the one reported). `minor_digits` is the number of decimal
/// digits of the currency's minor unit (2 for cents).
pub fn validate(payload: &[u8], minor_digits: u8) -> Result<ValidSale<'_>, Rejection> {
    let text = std::str::from_utf8(payload).map_err(|e| {
        Rejection::new(
            Code::NotUtf8,
            None,
            format!("payload is not valid UTF-8: {e}"),
        )
    })?;
    let first = text
        .trim_start_matches([' ', '\t', '\n', '\r'])
        .bytes()
        .next();
    if first != Some(b'{') {
        return Err(not_an_object(text));
    }
    let fields: Fields = serde_json::from_str(text).map_err(|e| {
        Rejection::new(
            Code::MalformedJson,
            None,
            format!("payload is not valid JSON for a sale: {e}"),
        )
    })?;

    let store = string_field(fields.store, "store")?;
    if store.is_empty() {
        return Err(Rejection::new(
            Code::EmptyStore,
            Some("store"),
            "field `store` must not be empty".into(),
        ));
    }
    string_field(fields.item, "item")?;
    let amount_minor = price_field(fields.price, minor_digits)?;
    let event_time = ts_field(fields.ts)?;
    Ok(ValidSale {
        store,
        amount_minor,
        event_time,
    })
}

/// The rejection of a payload that does not start with `{`: JSON of another kind, or not JSON.
fn not_an_object(text: &str) -> Rejection {
    match serde_json::from_str::<serde::de::IgnoredAny>(text) {
        Ok(_) => Rejection::new(
            Code::NotAnObject,
            None,
            format!(
                "payload is JSON but not an object (it is {})",
                kind(text.trim_start_matches([' ', '\t', '\n', '\r']))
            ),
        ),
        Err(e) => Rejection::new(
            Code::MalformedJson,
            None,
            format!("payload is not valid JSON: {e}"),
        ),
    }
}

/// What kind of JSON value `raw` (valid JSON) is, for messages.
fn kind(raw: &str) -> &'static str {
    match raw.as_bytes().first() {
        Some(b'"') => "a string",
        Some(b'{') => "an object",
        Some(b'[') => "an array",
        Some(b't' | b'f') => "a boolean",
        Some(b'n') => "null",
        _ => "a number",
    }
}

/// `raw` for a message, cut short (with an ellipsis) when long.
fn shown(raw: &str) -> Cow<'_, str> {
    const MAX: usize = 40;
    if raw.len() <= MAX {
        return Cow::Borrowed(raw);
    }
    let mut end = MAX;
    while !raw.is_char_boundary(end) {
        end -= 1;
    }
    Cow::Owned(format!("{}…", &raw[..end]))
}

fn missing(name: &'static str) -> Rejection {
    Rejection::new(
        Code::MissingField,
        Some(name),
        format!("required field `{name}` is missing"),
    )
}

fn wrong_type(name: &'static str, want: &str, raw: &RawValue) -> Rejection {
    let raw = raw.get();
    Rejection::new(
        Code::WrongType,
        Some(name),
        format!(
            "field `{name}` must be {want}, found {} ({})",
            kind(raw),
            shown(raw)
        ),
    )
}

/// A string field's value: borrowed from the payload unless it holds an escape.
fn string_field<'a>(
    raw: Option<&'a RawValue>,
    name: &'static str,
) -> Result<Cow<'a, str>, Rejection> {
    let raw = raw.ok_or_else(|| missing(name))?;
    let text = raw.get();
    if !text.starts_with('"') {
        return Err(wrong_type(name, "a string", raw));
    }
    let inner = &text[1..text.len() - 1];
    if !inner.contains('\\') {
        // Valid JSON without an escape: the characters between the quotes are the value.
        return Ok(Cow::Borrowed(inner));
    }
    serde_json::from_str::<String>(text)
        .map(Cow::Owned)
        .map_err(|e| {
            Rejection::new(
                Code::MalformedJson,
                Some(name),
                format!("field `{name}` is not a valid JSON string: {e}"),
            )
        })
}

fn price_field(raw: Option<&RawValue>, minor_digits: u8) -> Result<i64, Rejection> {
    const NAME: &str = "price";
    let raw = raw.ok_or_else(|| missing(NAME))?;
    let text = raw.get();
    if !text.starts_with(|c: char| c == '-' || c.is_ascii_digit()) {
        return Err(wrong_type(NAME, "a number", raw));
    }
    amount_minor(text, minor_digits).map_err(|e| {
        let (code, detail) = match e {
            PriceError::Negative => (
                Code::NegativePrice,
                format!("field `price` must not be negative, found {}", shown(text)),
            ),
            PriceError::TooPrecise => (
                Code::TooPrecise,
                format!(
                    "field `price` has more than {minor_digits} decimal digits, found {}",
                    shown(text)
                ),
            ),
            PriceError::OutOfRange => (
                Code::OutOfRange,
                format!(
                    "field `price` is too large to count exactly, found {}",
                    shown(text)
                ),
            ),
        };
        Rejection::new(code, Some(NAME), detail)
    })
}

fn ts_field(raw: Option<&RawValue>) -> Result<i64, Rejection> {
    const NAME: &str = "ts";
    let raw = raw.ok_or_else(|| missing(NAME))?;
    let text = raw.get();
    let integer = text.starts_with(|c: char| c == '-' || c.is_ascii_digit())
        && !text.contains(['.', 'e', 'E']);
    if !integer {
        return Err(wrong_type(NAME, "an integer of unix seconds", raw));
    }
    match text.parse::<i64>() {
        Ok(ts) if (EVENT_TIME_MIN..EVENT_TIME_END).contains(&ts) => Ok(ts),
        _ => Err(Rejection::new(
            Code::OutOfRange,
            Some(NAME),
            format!(
                "field `ts` must be unix seconds within 2000-01-01..2100-01-01 \
                 ([{EVENT_TIME_MIN}, {EVENT_TIME_END})), found {}",
                shown(text)
            ),
        )),
    }
}

/// Why a price literal has no exact amount.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PriceError {
    Negative,
    TooPrecise,
    OutOfRange,
}

/// The exact value of a JSON number literal in units of `10^-minor_digits`, from its text:
/// `-? int (. frac)? ([eE] [+-]? exp)?`, as JSON has it (the caller's parser checked the
/// grammar). The value is `digits × 10^-scale` with `digits` the significant digits of
/// `int frac` and `scale` the count of decimal places left once trailing zeros are dropped;
/// it has an exact amount when `scale <= minor_digits` and `digits × 10^(minor_digits - scale)`
/// fits an i64. Zero, written any way (`-0`, `0.000`, `0e99`), is 0.
pub fn amount_minor(literal: &str, minor_digits: u8) -> Result<i64, PriceError> {
    let b = literal.as_bytes();
    let (negative, b) = match b.split_first() {
        Some((b'-', rest)) => (true, rest),
        _ => (false, b),
    };
    let int_len = b.iter().take_while(|c| c.is_ascii_digit()).count();
    let (int, rest) = b.split_at(int_len);
    let (frac, rest) = match rest.split_first() {
        Some((b'.', rest)) => {
            let n = rest.iter().take_while(|c| c.is_ascii_digit()).count();
            rest.split_at(n)
        }
        _ => (&[][..], rest),
    };
    // The exponent, bounded far beyond any that matters (an i64 has 19 digits).
    const EXP_BOUND: i64 = 1 << 40;
    let exp = match rest.split_first() {
        Some((b'e' | b'E', rest)) => {
            let (sign, digits) = match rest.split_first() {
                Some((b'-', d)) => (-1, d),
                Some((b'+', d)) => (1, d),
                _ => (1, rest),
            };
            let magnitude = digits
                .iter()
                .fold(0i64, |e, d| (e * 10 + i64::from(d - b'0')).min(EXP_BOUND));
            sign * magnitude
        }
        _ => 0,
    };

    let digit = |i: usize| {
        if i < int.len() {
            int[i]
        } else {
            frac[i - int.len()]
        }
    };
    let len = int.len() + frac.len();
    let Some(first) = (0..len).find(|&i| digit(i) != b'0') else {
        return Ok(0);
    };
    if negative {
        return Err(PriceError::Negative);
    }
    let last = (first..len)
        .rev()
        .find(|&i| digit(i) != b'0')
        .expect("a non-zero digit exists");
    let trailing_zeros = (len - 1 - last) as i64;
    let scale = frac.len() as i64 - exp - trailing_zeros;
    if scale > i64::from(minor_digits) {
        return Err(PriceError::TooPrecise);
    }
    let shift = i64::from(minor_digits) - scale;
    // i64::MAX has 19 digits: more significant digits plus shift than that cannot fit.
    if (last - first + 1) as i64 + shift > 19 {
        return Err(PriceError::OutOfRange);
    }
    let mut amount: i64 = 0;
    for i in first..=last {
        amount = amount
            .checked_mul(10)
            .and_then(|a| a.checked_add(i64::from(digit(i) - b'0')))
            .ok_or(PriceError::OutOfRange)?;
    }
    amount
        .checked_mul(10i64.pow(shift as u32))
        .ok_or(PriceError::OutOfRange)
}

#[cfg(test)]
mod tests {
    //! Native checks of the rules; the faithful tests run the built component under wasmtime
    //! (transforms/sales/tests/component.rs).
    use super::*;

    const SALE: &str = r#"{"store":"store-1","item":"coffee","price":2.87,"ts":1756809000}"#;

    fn sale(price: &str) -> String {
        format!(r#"{{"store":"store-1","item":"coffee","price":{price},"ts":1756809000}}"#)
    }

    fn cents(price: &str) -> Result<i64, Code> {
        validate(sale(price).as_bytes(), 2)
            .map(|s| s.amount_minor)
            .map_err(|r| r.code)
    }

    fn rejected(payload: &str) -> (Code, Option<&'static str>) {
        let r = validate(payload.as_bytes(), 2).expect_err(payload);
        (r.code, r.field)
    }

    #[test]
    fn a_sale_is_typed_exactly() {
        let s = validate(SALE.as_bytes(), 2).unwrap();
        assert_eq!(
            s,
            ValidSale {
                store: Cow::Borrowed("store-1"),
                amount_minor: 287,
                event_time: 1_756_809_000,
            }
        );
        assert!(matches!(s.store, Cow::Borrowed(_)), "the store is borrowed");
    }

    #[test]
    fn amounts_are_exact() {
        for (price, want) in [
            ("0.1", 10),
            ("0.10", 10),
            ("0.20", 20),
            ("12", 1200),
            ("1.5e1", 1500),
            ("1.5E+1", 1500),
            ("150e-1", 1500),
            ("0", 0),
            ("0.00", 0),
            ("-0", 0),
            ("-0.0e5", 0),
            ("0e999999999999999999999", 0),
            ("1e-2", 1),
            ("0.01", 1),
            ("2.87", 287),
            ("100", 10000),
            ("1.000000", 100),
            ("0.0100e1", 10),
            ("12345678901234.56", 1_234_567_890_123_456),
            ("92233720368547758.07", i64::MAX),
            ("9223372036854775807e-2", i64::MAX),
            ("0.00000000000000000000000000000000001e35", 100),
        ] {
            assert_eq!(cents(price), Ok(want), "{price}");
        }
        // 0.10 + 0.20 is 30 cents, not 30.000000000000004.
        assert_eq!(cents("0.10").unwrap() + cents("0.20").unwrap(), 30);
    }

    #[test]
    fn amounts_in_other_minor_units() {
        assert_eq!(amount_minor("12", 0), Ok(12));
        assert_eq!(amount_minor("12.5", 0), Err(PriceError::TooPrecise));
        assert_eq!(amount_minor("1.5e1", 0), Ok(15));
        assert_eq!(amount_minor("0.001", 3), Ok(1));
        assert_eq!(amount_minor("1.234567", 6), Ok(1_234_567));
        assert_eq!(amount_minor("1", 18), Ok(1_000_000_000_000_000_000));
        assert_eq!(amount_minor("10", 18), Err(PriceError::OutOfRange));
        assert_eq!(amount_minor("1", 40), Err(PriceError::OutOfRange));
        assert_eq!(amount_minor("0", 40), Ok(0));
    }

    #[test]
    fn prices_that_have_no_exact_amount() {
        for (price, want) in [
            ("-1", Code::NegativePrice),
            ("-0.01", Code::NegativePrice),
            ("-0.001", Code::NegativePrice),
            ("-1e400", Code::NegativePrice),
            ("0.001", Code::TooPrecise),
            ("0.0010", Code::TooPrecise),
            ("1.234", Code::TooPrecise),
            ("1e-3", Code::TooPrecise),
            ("1e-99999999999999999999999", Code::TooPrecise),
            ("92233720368547758.08", Code::OutOfRange),
            ("92233720368547759", Code::OutOfRange),
            ("9223372036854775808e-2", Code::OutOfRange),
            ("1e17", Code::OutOfRange),
            ("1e400", Code::OutOfRange),
            ("1e99999999999999999999999", Code::OutOfRange),
            ("123456789012345678901234567890", Code::OutOfRange),
        ] {
            assert_eq!(cents(price), Err(want), "{price}");
        }
        assert_eq!(cents("9e16"), Ok(9_000_000_000_000_000_000));
    }

    #[test]
    fn wrong_types_and_missing_fields_name_the_field() {
        for (field, bad) in [
            ("store", "12"),
            ("store", "true"),
            ("store", "[\"s\"]"),
            ("item", "7"),
            ("item", "{}"),
            ("price", "\"2.87\""),
            ("price", "false"),
            ("price", "[1]"),
            ("ts", "\"1756809000\""),
            ("ts", "1756809000.5"),
            ("ts", "1.5"),
            ("ts", "1.0"),
            ("ts", "1.7568e9"),
            ("ts", "{}"),
        ] {
            let mut v: serde_json::Map<String, serde_json::Value> =
                serde_json::from_str(SALE).unwrap();
            v.insert(field.into(), serde_json::from_str(bad).unwrap());
            let payload = serde_json::to_string(&v).unwrap();
            assert_eq!(
                rejected(&payload),
                (Code::WrongType, Some(field)),
                "{payload}"
            );
            v.remove(field);
            let payload = serde_json::to_string(&v).unwrap();
            assert_eq!(rejected(&payload), (Code::MissingField, Some(field)));
            v.insert(field.into(), serde_json::Value::Null);
            let payload = serde_json::to_string(&v).unwrap();
            assert_eq!(rejected(&payload), (Code::MissingField, Some(field)));
        }
    }

    #[test]
    fn the_first_fault_in_field_order_is_reported() {
        assert_eq!(rejected("{}"), (Code::MissingField, Some("store")));
        assert_eq!(
            rejected(r#"{"ts":"x","price":-1,"item":1,"store":""}"#),
            (Code::EmptyStore, Some("store"))
        );
        assert_eq!(
            rejected(r#"{"ts":"x","price":-1,"item":1,"store":"s"}"#),
            (Code::WrongType, Some("item"))
        );
        assert_eq!(
            rejected(r#"{"ts":"x","price":-1,"item":"i","store":"s"}"#),
            (Code::NegativePrice, Some("price"))
        );
    }

    #[test]
    fn store_rules() {
        let r = validate(
            br#"{"store":"","item":"coffee","price":1,"ts":1756809000}"#,
            2,
        )
        .unwrap_err();
        assert_eq!((r.code, r.field), (Code::EmptyStore, Some("store")));
        let s = validate(
            r#"{"store":"caf\u00e9 \"1\"","item":"","price":1,"ts":1756809000}"#.as_bytes(),
            2,
        )
        .unwrap();
        assert_eq!(s.store, "café \"1\"");
        let s = validate(
            r#"{"store":"магазин 🍲","item":"x","price":1,"ts":1756809000}"#.as_bytes(),
            2,
        )
        .unwrap();
        assert_eq!(s.store, "магазин 🍲");
        // JSON's grammar lets a lone surrogate through; no text can hold it.
        let r = validate(
            br#"{"store":"s\ud800","item":"x","price":1,"ts":1756809000}"#,
            2,
        )
        .unwrap_err();
        assert_eq!((r.code, r.field), (Code::MalformedJson, Some("store")));
    }

    #[test]
    fn event_time_bounds() {
        let at = |ts: &str| {
            let p = format!(r#"{{"store":"s","item":"i","price":1,"ts":{ts}}}"#);
            validate(p.as_bytes(), 2)
                .map(|s| s.event_time)
                .map_err(|r| (r.code, r.field))
        };
        assert_eq!(at("946684800"), Ok(EVENT_TIME_MIN));
        assert_eq!(at("4102444799"), Ok(EVENT_TIME_END - 1));
        for bad in ["946684799", "4102444800", "0", "-1", "99999999999999999999"] {
            assert_eq!(at(bad), Err((Code::OutOfRange, Some("ts"))), "{bad}");
        }
    }

    #[test]
    fn payloads_that_are_not_sales() {
        assert_eq!(rejected("\u{0}").0, Code::MalformedJson);
        assert_eq!(
            validate(&[b'{', 0xff, b'}'], 2).unwrap_err().code,
            Code::NotUtf8
        );
        for p in [
            "",
            "{",
            "{\"store\":",
            &SALE[..SALE.len() - 1],
            "nul",
            "{} x",
            "x",
        ] {
            assert_eq!(rejected(p), (Code::MalformedJson, None), "{p:?}");
        }
        for p in [
            "[1,2]",
            "\"text\"",
            "42",
            "null",
            " true ",
            "[{\"store\":\"s\"}]",
        ] {
            let r = validate(p.as_bytes(), 2).unwrap_err();
            assert_eq!((r.code, r.field), (Code::NotAnObject, None), "{p:?}");
        }
        // A field given twice is ambiguous: which price is it?
        let twice = r#"{"store":"s","item":"i","price":1,"price":2,"ts":1756809000}"#;
        let r = validate(twice.as_bytes(), 2).unwrap_err();
        assert_eq!(r.code, Code::MalformedJson);
        assert!(r.detail.contains("duplicate field `price`"), "{}", r.detail);
    }

    #[test]
    fn unknown_fields_and_whitespace_are_fine() {
        let p = r#" {
            "extra": {"nested": [1, 2, {"price": -1}]}, "store" : "s",
            "item": "i", "price": 0.5, "ts": 1756809000, "currency": "EUR" } "#;
        let s = validate(p.as_bytes(), 2).unwrap();
        assert_eq!((s.store.as_ref(), s.amount_minor), ("s", 50));
    }

    #[test]
    fn details_are_sentences_with_the_value() {
        let r = validate(sale("\"2.87\"").as_bytes(), 2).unwrap_err();
        assert_eq!(
            r.detail,
            "field `price` must be a number, found a string (\"2.87\")"
        );
        let r = validate(sale("0.001").as_bytes(), 2).unwrap_err();
        assert_eq!(
            r.detail,
            "field `price` has more than 2 decimal digits, found 0.001"
        );
        let long = format!("\"{}\"", "é".repeat(100));
        let r = validate(sale(&long).as_bytes(), 2).unwrap_err();
        assert!(r.detail.ends_with("…)"), "{}", r.detail);
    }

    fn packed(payloads: &[&str]) -> (Vec<u8>, Vec<u32>) {
        let mut bytes = Vec::new();
        let mut ends = Vec::new();
        for p in payloads {
            bytes.extend_from_slice(p.as_bytes());
            ends.push(bytes.len() as u32);
        }
        (bytes, ends)
    }

    #[test]
    fn every_message_of_a_batch_lands_once_in_order() {
        let (bytes, ends) = packed(&[SALE, "", &sale("0.10"), "[]", &sale("-1"), &sale("0.20")]);
        let r = validate_batch(&bytes, &ends, 2);
        let sales: Vec<(u32, i64)> = r.sales.iter().map(|s| (s.index, s.amount_minor)).collect();
        assert_eq!(sales, [(0, 287), (2, 10), (5, 20)]);
        let rejections: Vec<(u32, Code)> = r
            .rejections
            .iter()
            .map(|r| (r.index, r.rejection.code))
            .collect();
        assert_eq!(
            rejections,
            [
                (1, Code::MalformedJson),
                (3, Code::NotAnObject),
                (4, Code::NegativePrice)
            ]
        );
        assert_eq!(validate_batch(b"", &[], 2), BatchResult::default());
    }

    #[test]
    #[should_panic(expected = "last end offset")]
    fn a_batch_with_a_short_last_offset_is_refused() {
        let _ = validate_batch(b"abc", &[2], 2);
    }

    #[test]
    #[should_panic(expected = "backwards")]
    fn a_batch_with_offsets_out_of_order_is_refused() {
        let _ = validate_batch(b"abc", &[2, 1, 3], 2);
    }
}
