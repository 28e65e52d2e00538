//! The rules as the runner runs them: the built component (NAME.wasm in the crate's directory,
//! written by `runner rules build .`) under wasmtime, the runner's engine, through the WIT
//! world. Add a test here for every rule you change.

use wasmtime::component::{bindgen, Component, HasSelf, Linker};
use wasmtime::{Config, Engine, Store};

bindgen!({
    path: "wit",
    world: "sales-rules",
});

use fooddelivery::sales_rules::host_log::{self, Level};
use fooddelivery::sales_rules::types::{BatchResult, RejectionCode};

const SALE: &str = r#"{"store": "store-1", "item": "coffee", "price": 2.87, "ts": 1756809000}"#;
const PRICE_AS_TEXT: &str =
    r#"{"store": "store-1", "item": "coffee", "price": "2.87", "ts": 1756809000}"#;

/// What the component may call: a log line (a panic message arrives this way).
struct Host;

impl fooddelivery::sales_rules::types::Host for Host {}

impl host_log::Host for Host {
    fn log(&mut self, level: Level, message: String) {
        eprintln!("rules logged ({level:?}): {message}");
    }
}

fn rules() -> (Store<Host>, SalesRules) {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/", env!("CARGO_PKG_NAME"), ".wasm");
    let bytes = std::fs::read(path)
        .unwrap_or_else(|e| panic!("cannot read {path} ({e}): run `runner rules build .` first"));
    let mut config = Config::new();
    config.wasm_component_model(true);
    let engine = Engine::new(&config).expect("engine");
    let component = Component::new(&engine, bytes).expect("a component");
    let mut linker = Linker::new(&engine);
    SalesRules::add_to_linker::<Host, HasSelf<Host>>(&mut linker, |h| h).expect("link");
    let mut store = Store::new(&engine, Host);
    let rules = SalesRules::instantiate(&mut store, &component, &linker).expect("instantiate");
    (store, rules)
}

/// One `validate` call over `messages` packed as the WIT says, cents as the minor unit.
fn validate(messages: &[&str]) -> BatchResult {
    let mut payloads = Vec::new();
    let mut ends = Vec::new();
    for m in messages {
        payloads.extend_from_slice(m.as_bytes());
        ends.push(payloads.len() as u32);
    }
    let (mut store, rules) = rules();
    rules
        .fooddelivery_sales_rules_rules()
        .call_validate(&mut store, &payloads, &ends, 2)
        .expect("no trap")
}

#[test]
fn reports_its_version() {
    let (mut store, rules) = rules();
    let version = rules
        .fooddelivery_sales_rules_rules()
        .call_version(&mut store)
        .expect("no trap");
    assert!(version.starts_with(env!("CARGO_PKG_NAME")), "{version}");
}

#[test]
fn a_sale_comes_back_typed_with_its_exact_amount() {
    let result = validate(&[SALE]);
    assert!(result.rejections.is_empty());
    let sale = &result.sales[0];
    assert_eq!(
        (sale.index, sale.store.as_str(), sale.amount_minor, sale.event_time),
        (0, "store-1", 287, 1_756_809_000)
    );
}

#[test]
fn a_price_given_as_text_is_rejected_with_its_field() {
    let result = validate(&[SALE, PRICE_AS_TEXT]);
    assert_eq!(result.sales.len(), 1);
    let rejected = &result.rejections[0];
    assert_eq!(rejected.index, 1);
    assert!(matches!(rejected.rejection.code, RejectionCode::WrongType));
    assert_eq!(rejected.rejection.field.as_deref(), Some("price"));
}
