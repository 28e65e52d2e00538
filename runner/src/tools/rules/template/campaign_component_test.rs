//! The rules as the runner runs them: the built component (NAME.wasm in the crate's directory,
//! written by `runner rules build .`) under wasmtime, the runner's engine, through the WIT
//! world. Add a test here for every rule you change.

use wasmtime::component::{bindgen, Component, HasSelf, Linker};
use wasmtime::{Config, Engine, Store};

bindgen!({
    path: "wit",
    world: "campaign-rules",
});

use fooddelivery::campaign_rules::host_log::{self, Level};
use fooddelivery::campaign_rules::types::{Activity, Drafts, RejectionCode};

/// SPEC.md's example campaign, active from 2022 to 2054.
const SPEC_CAMPAIGN: &str = r#"{"restaurant_id": "123e4567-e89b-12d3-a456-426614174000","adv_campaign_id": "123e4567-e89b-12d3-a456-426614174003","adv_campaign_content": "first campaign","adv_campaign_owner": "Ivanov Ivan Ivanovich","adv_campaign_owner_contact": "iiivanov@restaurant.ru","adv_campaign_datetime_start": 1659203516,"adv_campaign_datetime_end": 2659207116,"datetime_created": 1659131516}"#;
const NOW: i64 = 1_659_304_828;
const CLIENT: &str = "023e4567-e89b-12d3-a456-426614174000";

/// What the component may call: a log line (a panic message arrives this way).
struct Host;

impl fooddelivery::campaign_rules::types::Host for Host {}

impl host_log::Host for Host {
    fn log(&mut self, level: Level, message: String) {
        eprintln!("rules logged ({level:?}): {message}");
    }
}

fn rules() -> (Store<Host>, CampaignRules) {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/", env!("CARGO_PKG_NAME"), ".wasm");
    let bytes = std::fs::read(path)
        .unwrap_or_else(|e| panic!("cannot read {path} ({e}): run `runner rules build .` first"));
    let mut config = Config::new();
    config.wasm_component_model(true);
    let engine = Engine::new(&config).expect("engine");
    let component = Component::new(&engine, bytes).expect("a component");
    let mut linker = Linker::new(&engine);
    CampaignRules::add_to_linker::<Host, HasSelf<Host>>(&mut linker, |h| h).expect("link");
    let mut store = Store::new(&engine, Host);
    let rules = CampaignRules::instantiate(&mut store, &component, &linker).expect("instantiate");
    (store, rules)
}

/// Draft `i` of a `shape` result: the shared parts with client i's fills between them.
fn draft(d: &Drafts, i: usize) -> serde_json::Value {
    let slice = |buf: &[u8], ends: &[u32], n: usize| {
        let start = if n == 0 { 0 } else { ends[n - 1] as usize };
        buf[start..ends[n] as usize].to_vec()
    };
    let k = d.shared_ends.len() - 1;
    let mut out = Vec::new();
    for j in 0..k {
        out.extend(slice(&d.shared, &d.shared_ends, j));
        out.extend(slice(&d.fills, &d.fill_ends, i * k + j));
    }
    out.extend(slice(&d.shared, &d.shared_ends, k));
    serde_json::from_slice(&out).expect("a draft is JSON")
}

#[test]
fn reports_its_version() {
    let (mut store, rules) = rules();
    let version = rules
        .fooddelivery_campaign_rules_rules()
        .call_version(&mut store)
        .expect("no trap");
    assert!(version.starts_with(env!("CARGO_PKG_NAME")), "{version}");
}

#[test]
fn the_spec_example_shapes_one_draft_per_subscriber() {
    let (mut store, rules) = rules();
    let r = rules.fooddelivery_campaign_rules_rules();
    let verdict = r
        .call_validate(&mut store, SPEC_CAMPAIGN.as_bytes(), NOW)
        .expect("no trap")
        .expect("the SPEC example is valid");
    assert!(matches!(verdict.activity, Activity::Active));
    let ends = [CLIENT.len() as u32];
    let drafts = r
        .call_shape(&mut store, &verdict.campaign, CLIENT.as_bytes(), &ends, NOW)
        .expect("no trap");
    let draft = draft(&drafts, 0);
    assert_eq!(draft["client_id"], CLIENT);
    assert_eq!(draft["adv_campaign_content"], "first campaign");
    assert_eq!(draft["trigger_datetime_created"], NOW);
}

/// The runner delivers a campaign published before its start once its window opens, and
/// refuses rules whose window disagrees with what `validate` says.
#[test]
fn the_window_agrees_with_the_activity() {
    let (mut store, rules) = rules();
    let r = rules.fooddelivery_campaign_rules_rules();
    let mut activity = |now: i64| {
        r.call_validate(&mut store, SPEC_CAMPAIGN.as_bytes(), now)
            .expect("no trap")
            .expect("the SPEC example is valid")
    };
    let window = activity(NOW).window;
    assert!(window.opens <= NOW && NOW < window.closes);
    assert!(matches!(
        activity(window.opens - 1).activity,
        Activity::NotStarted
    ));
    assert!(matches!(activity(window.opens).activity, Activity::Active));
    assert!(matches!(
        activity(window.closes - 1).activity,
        Activity::Active
    ));
    assert!(matches!(
        activity(window.closes).activity,
        Activity::Expired
    ));
}

#[test]
fn a_missing_field_is_rejected_with_its_name() {
    let payload = SPEC_CAMPAIGN.replace(
        r#""adv_campaign_id": "123e4567-e89b-12d3-a456-426614174003","#,
        "",
    );
    let (mut store, rules) = rules();
    let rejection = rules
        .fooddelivery_campaign_rules_rules()
        .call_validate(&mut store, payload.as_bytes(), NOW)
        .expect("no trap")
        .expect_err("rejected");
    assert!(matches!(rejection.code, RejectionCode::MissingField));
    assert_eq!(rejection.field.as_deref(), Some("adv_campaign_id"));
}
