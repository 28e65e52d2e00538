//! The sales rules, tested as shipped: the compiled component runs under wasmtime through the
//! runner's own host bindings and sandbox. Covers exact amounts, every rejection code with its
//! field, batches (order, indexes, size) and the versions of the component and its v2 build.

use runner::pipelines::store_revenue::contract::{
    BatchResult, LoadedRules, PackedPayloads, RejectionCode, RulesEngine, RulesHandle, Sale,
    SalesEvaluator, SalesInstance,
};
use runner::sandbox::SandboxLimits;
use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::Duration;

const TS: i64 = 1_756_809_000;

fn wasm_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../build/wasm")
}

fn component_path() -> PathBuf {
    std::env::var_os("SALES_RULES_WASM")
        .map(PathBuf::from)
        .unwrap_or_else(|| wasm_dir().join("sales-rules.wasm"))
}

fn fixture(name: &str) -> PathBuf {
    std::env::var_os("RULES_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| wasm_dir().join("fixtures"))
        .join(name)
}

fn engine() -> RulesEngine {
    RulesEngine::new(SandboxLimits {
        call_timeout: Duration::from_secs(5),
        call_timeout_per_1000: Duration::from_millis(100),
        memory_limit_bytes: 64 << 20,
        compile_cache_dir: None,
        interruptible: true,
    })
    .expect("engine")
}

fn load(path: PathBuf) -> LoadedRules {
    assert!(
        path.exists(),
        "{} is missing: run `make transforms` first",
        path.display()
    );
    engine()
        .load_file(&path)
        .unwrap_or_else(|e| panic!("{} loads: {e}", path.display()))
}

/// Compiled once for the whole test binary.
fn rules() -> &'static LoadedRules {
    static RULES: OnceLock<LoadedRules> = OnceLock::new();
    RULES.get_or_init(|| load(component_path()))
}

fn instance() -> SalesInstance {
    rules().instantiate().expect("instantiate")
}

fn sale(price: &str) -> String {
    format!(r#"{{"store": "store-1", "item": "coffee", "price": {price}, "ts": {TS}}}"#)
}

fn validate_all<P: AsRef<[u8]>>(payloads: &[P], minor_digits: u8) -> BatchResult {
    let mut packed = PackedPayloads::new();
    for p in payloads {
        packed.push(p.as_ref());
    }
    instance()
        .validate(packed.bytes(), packed.ends(), minor_digits)
        .expect("no trap")
}

/// The amount of one payload, or its rejection's code and field.
fn outcome(payload: &[u8]) -> Result<i64, (RejectionCode, Option<String>)> {
    let mut r = validate_all(&[payload], 2);
    match (r.sales.pop(), r.rejections.pop()) {
        (Some(s), None) => Ok(s.amount_minor),
        (None, Some(r)) => Err((r.rejection.code, r.rejection.field)),
        other => panic!("one message, one outcome: {other:?}"),
    }
}

fn rejection(payload: &str) -> (RejectionCode, Option<String>) {
    outcome(payload.as_bytes()).expect_err(payload)
}

#[test]
fn reports_its_version() {
    let v = rules().identity();
    assert!(v.version.starts_with("sales-rules "), "{v}");
    assert!(!v.version.contains("+v2"), "{v}");
    assert_eq!(v.sha256.len(), 64);
    assert_eq!(instance().version().unwrap(), v.version);
}

#[test]
fn the_v2_build_says_so_and_keeps_the_rules() {
    let v2 = load(fixture("sales-rules-v2.wasm"));
    let version = &v2.identity().version;
    assert!(version.starts_with("sales-rules "), "{version}");
    assert!(version.ends_with("+v2"), "{version}");
    assert_ne!(v2.identity().sha256, rules().identity().sha256);

    let batch = [sale("2.87"), sale("-1"), "[]".into(), sale("1.5e1")];
    let mut packed = PackedPayloads::new();
    for p in &batch {
        packed.push(p.as_bytes());
    }
    let mut i = v2.instantiate().unwrap();
    assert_eq!(
        i.validate(packed.bytes(), packed.ends(), 2).unwrap(),
        validate_all(&batch, 2)
    );
}

#[test]
fn amounts_are_exact() {
    for (price, want) in [
        ("0.1", 10),
        ("0.10", 10),
        ("0.20", 20),
        ("12", 1200),
        ("1.5e1", 1500),
        ("15E-1", 150),
        ("0", 0),
        ("0.00", 0),
        ("1e-2", 1),
        ("2.87", 287),
        ("92233720368547758.07", i64::MAX),
        ("9e16", 9_000_000_000_000_000_000),
    ] {
        assert_eq!(outcome(sale(price).as_bytes()), Ok(want), "{price}");
    }
    let r = validate_all(&[sale("0.10"), sale("0.20")], 2);
    let total: i64 = r.sales.iter().map(|s| s.amount_minor).sum();
    assert_eq!(total, 30, "0.10 + 0.20 is exactly 30 cents");
}

#[test]
fn a_sale_comes_back_typed() {
    let r = validate_all(
        &[r#"{"ts": 1756809001, "price": 0.5, "item": "tea", "store": "caf\u00e9-7", "x": [1]}"#],
        2,
    );
    assert!(r.rejections.is_empty(), "{r:?}");
    assert_eq!(
        r.sales,
        [Sale {
            index: 0,
            store: "café-7".into(),
            amount_minor: 50,
            event_time: 1_756_809_001,
        }]
    );
}

#[test]
fn prices_near_the_limit_are_out_of_range() {
    for price in [
        "92233720368547758.08",
        "92233720368547759",
        "1e17",
        "1e400",
        "123456789012345678901234567890",
    ] {
        assert_eq!(
            rejection(&sale(price)),
            (RejectionCode::OutOfRange, Some("price".into())),
            "{price}"
        );
    }
}

#[test]
fn other_minor_units() {
    let r = validate_all(&[sale("12"), sale("12.5"), sale("0.001")], 0);
    let amounts: Vec<(u32, i64)> = r.sales.iter().map(|s| (s.index, s.amount_minor)).collect();
    assert_eq!(amounts, [(0, 12)]);
    let r = validate_all(&[sale("0.001"), sale("1.5")], 3);
    let amounts: Vec<i64> = r.sales.iter().map(|s| s.amount_minor).collect();
    assert_eq!(amounts, [1, 1500]);
}

#[test]
fn not_utf8() {
    let mut p = sale("1").into_bytes();
    p[5] = 0xff;
    assert_eq!(outcome(&p), Err((RejectionCode::NotUtf8, None)));
}

#[test]
fn malformed_json() {
    let full = sale("1");
    for p in ["", "{", &full[..full.len() - 1], "{} trailing", "nope"] {
        assert_eq!(rejection(p), (RejectionCode::MalformedJson, None), "{p:?}");
    }
}

#[test]
fn not_an_object() {
    for p in ["[1,2]", "\"text\"", "42", "null", "true"] {
        assert_eq!(rejection(p), (RejectionCode::NotAnObject, None), "{p:?}");
    }
}

fn with(field: &str, value: Option<&str>) -> String {
    let mut v: serde_json::Map<String, serde_json::Value> =
        serde_json::from_str(&sale("2.87")).unwrap();
    match value {
        Some(json) => v.insert(field.into(), serde_json::from_str(json).unwrap()),
        None => v.remove(field),
    };
    serde_json::to_string(&v).unwrap()
}

#[test]
fn missing_field_names_the_field() {
    for f in ["store", "item", "price", "ts"] {
        for payload in [with(f, None), with(f, Some("null"))] {
            let mut r = validate_all(&[&payload], 2);
            let r = r.rejections.pop().expect(&payload).rejection;
            assert_eq!(r.code, RejectionCode::MissingField, "{payload}");
            assert_eq!(r.code.as_str(), "missing_field");
            assert_eq!(r.field.as_deref(), Some(f));
            assert!(r.detail.contains(f), "{}", r.detail);
        }
    }
}

#[test]
fn wrong_type_names_the_field() {
    for (f, bad) in [
        ("store", "7"),
        ("item", "[\"coffee\"]"),
        ("price", "\"2.87\""),
        ("price", "{}"),
        ("ts", "\"1756809000\""),
        ("ts", "1.5"),
        ("ts", "1756809000.0"),
    ] {
        assert_eq!(
            rejection(&with(f, Some(bad))),
            (RejectionCode::WrongType, Some(f.into())),
            "{f}={bad}"
        );
    }
}

#[test]
fn store_price_and_time_rules() {
    let cases = [
        (
            with("store", Some("\"\"")),
            RejectionCode::EmptyStore,
            "store",
        ),
        (sale("-0.01"), RejectionCode::NegativePrice, "price"),
        (sale("-5"), RejectionCode::NegativePrice, "price"),
        (sale("0.001"), RejectionCode::TooPrecise, "price"),
        (sale("2.875"), RejectionCode::TooPrecise, "price"),
        (sale("1e-3"), RejectionCode::TooPrecise, "price"),
        (
            with("ts", Some("946684799")),
            RejectionCode::OutOfRange,
            "ts",
        ),
        (
            with("ts", Some("4102444800")),
            RejectionCode::OutOfRange,
            "ts",
        ),
        (with("ts", Some("-1")), RejectionCode::OutOfRange, "ts"),
        (sale("1e17"), RejectionCode::OutOfRange, "price"),
    ];
    for (payload, code, field) in cases {
        assert_eq!(rejection(&payload), (code, Some(field.into())), "{payload}");
    }
    assert_eq!(
        outcome(with("ts", Some("946684800")).as_bytes()).map(|_| ()),
        Ok(())
    );
    assert_eq!(
        outcome(with("ts", Some("4102444799")).as_bytes()).map(|_| ()),
        Ok(())
    );
    assert_eq!(outcome(sale("-0").as_bytes()), Ok(0), "minus zero is zero");
}

#[test]
fn codes_are_snake_case() {
    let codes = [
        (RejectionCode::NotUtf8, "not_utf8"),
        (RejectionCode::MalformedJson, "malformed_json"),
        (RejectionCode::NotAnObject, "not_an_object"),
        (RejectionCode::MissingField, "missing_field"),
        (RejectionCode::WrongType, "wrong_type"),
        (RejectionCode::EmptyStore, "empty_store"),
        (RejectionCode::NegativePrice, "negative_price"),
        (RejectionCode::TooPrecise, "too_precise"),
        (RejectionCode::OutOfRange, "out_of_range"),
    ];
    for (code, s) in codes {
        assert_eq!(code.as_str(), s);
    }
}

#[test]
fn a_mixed_batch_keeps_its_indexes() {
    let batch: Vec<Vec<u8>> = vec![
        sale("1").into(),
        b"".to_vec(),
        sale("0.10").into(),
        vec![0xff, 0xfe],
        with("store", Some("\"\"")).into(),
        sale("0.20").into(),
        b"[]".to_vec(),
        with("ts", None).into(),
        sale("3").into(),
    ];
    let r = validate_all(&batch, 2);
    let sales: Vec<(u32, i64)> = r.sales.iter().map(|s| (s.index, s.amount_minor)).collect();
    assert_eq!(sales, [(0, 100), (2, 10), (5, 20), (8, 300)]);
    let rejections: Vec<(u32, &str, Option<&str>)> = r
        .rejections
        .iter()
        .map(|r| {
            (
                r.index,
                r.rejection.code.as_str(),
                r.rejection.field.as_deref(),
            )
        })
        .collect();
    assert_eq!(
        rejections,
        [
            (1, "malformed_json", None),
            (3, "not_utf8", None),
            (4, "empty_store", Some("store")),
            (6, "not_an_object", None),
            (7, "missing_field", Some("ts")),
        ]
    );
    let none = validate_all::<&[u8]>(&[], 2);
    assert!(none.sales.is_empty() && none.rejections.is_empty());
}

#[test]
fn a_batch_of_ten_thousand() {
    let n = 10_000;
    let payloads: Vec<String> = (0..n)
        .map(|i| {
            if i % 7 == 3 {
                sale("\"bad\"")
            } else {
                format!(
                    r#"{{"store":"store-{}","item":"item-{i}","price":{}.{:02},"ts":{}}}"#,
                    i % 50,
                    i / 100,
                    i % 100,
                    TS + i as i64
                )
            }
        })
        .collect();
    let r = validate_all(&payloads, 2);
    assert_eq!(r.sales.len() + r.rejections.len(), n);
    assert_eq!(r.rejections.len(), (0..n).filter(|i| i % 7 == 3).count());
    for s in &r.sales {
        let i = s.index as i64;
        assert_ne!(i % 7, 3);
        assert_eq!(s.amount_minor, i, "price {}.{:02}", i / 100, i % 100);
        assert_eq!(s.event_time, TS + i);
        assert_eq!(s.store, format!("store-{}", i % 50));
    }
    assert!(r
        .rejections
        .iter()
        .all(|r| r.index % 7 == 3 && r.rejection.code == RejectionCode::WrongType));
}

#[test]
fn one_instance_serves_many_batches() {
    let mut i = instance();
    let mut packed = PackedPayloads::new();
    for round in 0..200 {
        packed.clear();
        for k in 0..50 {
            packed.push(sale(&format!("{round}.{k:02}")).as_bytes());
        }
        let r = i.validate(packed.bytes(), packed.ends(), 2).unwrap();
        assert_eq!(r.sales.len(), 50);
        assert_eq!(r.sales[49].amount_minor, round * 100 + 49);
    }
}

#[test]
fn the_evaluator_calls_the_current_rules() {
    let handle = RulesHandle::new(load(component_path()));
    let mut evaluator = SalesEvaluator::new(handle);
    let mut packed = PackedPayloads::new();
    packed.push(sale("4.20").as_bytes());
    packed.push(b"{}");
    let r = evaluator
        .validate(packed.bytes(), packed.ends(), 2)
        .unwrap();
    assert_eq!(r.sales[0].amount_minor, 420);
    assert_eq!(r.rejections[0].index, 1);
}
