//! The campaign rules, tested as shipped: the compiled component runs under wasmtime through
//! the runner's own host bindings and sandbox. Covers every rejection code, the time boundaries,
//! the delivery window and the exact output of SPEC.md's example.

use runner::pipelines::campaigns::contract::{
    Activity, Campaign, CampaignInstance as RulesInstance, LoadedRules, RejectionCode, RulesEngine,
    Window,
};
use runner::sandbox::SandboxLimits;
use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::Duration;

const SPEC_CAMPAIGN: &str = r#"{"restaurant_id": "123e4567-e89b-12d3-a456-426614174000","adv_campaign_id": "123e4567-e89b-12d3-a456-426614174003","adv_campaign_content": "first campaign","adv_campaign_owner": "Ivanov Ivan Ivanovich","adv_campaign_owner_contact": "iiivanov@restaurant.ru","adv_campaign_datetime_start": 1659203516,"adv_campaign_datetime_end": 2659207116,"datetime_created": 1659131516}"#;
const SPEC_OUTPUT: &str = r#"{"restaurant_id":"123e4567-e89b-12d3-a456-426614174000","adv_campaign_id":"123e4567-e89b-12d3-a456-426614174003","adv_campaign_content":"first campaign","adv_campaign_owner":"Ivanov Ivan Ivanovich","adv_campaign_owner_contact":"iiivanov@restaurant.ru","adv_campaign_datetime_start":1659203516,"adv_campaign_datetime_end":2659207116,"client_id":"023e4567-e89b-12d3-a456-426614174000","datetime_created":1659131516,"trigger_datetime_created":1659304828}"#;
const SPEC_NOW: i64 = 1_659_304_828;
const START: i64 = 1_659_203_516;
const END: i64 = 2_659_207_116;

fn component_path() -> PathBuf {
    std::env::var_os("CAMPAIGN_RULES_WASM")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../build/wasm/campaign-rules.wasm")
        })
}

/// Compiled once for the whole test binary.
fn rules() -> &'static LoadedRules {
    static RULES: OnceLock<LoadedRules> = OnceLock::new();
    RULES.get_or_init(|| {
        let engine = RulesEngine::new(SandboxLimits {
            call_timeout: Duration::from_secs(5),
            call_timeout_per_1000: Duration::from_millis(100),
            memory_limit_bytes: 64 << 20,
            compile_cache_dir: None,
            interruptible: true,
        })
        .expect("engine");
        let path = component_path();
        assert!(
            path.exists(),
            "{} is missing: run `make transforms` first",
            path.display()
        );
        engine
            .load_file(&path)
            .expect("the campaign component loads")
    })
}

fn instance() -> RulesInstance {
    rules().instantiate().expect("instantiate")
}

fn with_field(name: &str, value: serde_json::Value) -> Vec<u8> {
    let mut v: serde_json::Value = serde_json::from_str(SPEC_CAMPAIGN).unwrap();
    v[name] = value;
    serde_json::to_vec(&v).unwrap()
}

fn without_field(name: &str) -> Vec<u8> {
    let mut v: serde_json::Value = serde_json::from_str(SPEC_CAMPAIGN).unwrap();
    v.as_object_mut().unwrap().remove(name);
    serde_json::to_vec(&v).unwrap()
}

fn rejection(payload: &[u8]) -> (RejectionCode, Option<String>, String) {
    match instance().validate(payload, SPEC_NOW).expect("no trap") {
        Ok(v) => panic!("expected a rejection, got {v:?}"),
        Err(r) => (r.code, r.field, r.detail),
    }
}

fn activity_at(start: i64, end: i64, now: i64) -> Activity {
    let p = with_field("adv_campaign_datetime_start", start.into());
    let mut v: serde_json::Value = serde_json::from_slice(&p).unwrap();
    v["adv_campaign_datetime_end"] = end.into();
    let p = serde_json::to_vec(&v).unwrap();
    instance()
        .validate(&p, now)
        .expect("no trap")
        .expect("valid")
        .activity
}

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

#[test]
fn reports_its_version() {
    let v = rules().identity();
    assert!(v.version.starts_with("campaign-rules "), "{v}");
    assert_eq!(v.sha256.len(), 64);
}

#[test]
fn spec_example_validates_with_typed_fields() {
    let v = instance()
        .validate(SPEC_CAMPAIGN.as_bytes(), SPEC_NOW)
        .unwrap()
        .unwrap();
    assert_eq!(v.activity, Activity::Active);
    let c = v.campaign;
    assert_eq!(c.restaurant_id, "123e4567-e89b-12d3-a456-426614174000");
    assert_eq!(c.adv_campaign_id, "123e4567-e89b-12d3-a456-426614174003");
    assert_eq!(c.adv_campaign_content, "first campaign");
    assert_eq!(c.adv_campaign_owner, "Ivanov Ivan Ivanovich");
    assert_eq!(c.adv_campaign_owner_contact, "iiivanov@restaurant.ru");
    assert_eq!(
        (
            c.adv_campaign_datetime_start,
            c.adv_campaign_datetime_end,
            c.datetime_created
        ),
        (START, END, 1_659_131_516)
    );
}

#[test]
fn spec_example_shapes_exactly_the_spec_output() {
    let mut i = instance();
    let c = i
        .validate(SPEC_CAMPAIGN.as_bytes(), SPEC_NOW)
        .unwrap()
        .unwrap()
        .campaign;
    let d = i
        .shape(
            &c,
            &["023e4567-e89b-12d3-a456-426614174000".to_string()],
            SPEC_NOW,
        )
        .unwrap();
    assert_eq!(d.len(), 1);
    let draft = d.get(0).unwrap();
    assert_eq!(draft.client_id, "023e4567-e89b-12d3-a456-426614174000");
    assert_eq!(std::str::from_utf8(draft.payload).unwrap(), SPEC_OUTPUT);
    assert_eq!(d.trigger_datetime_created, SPEC_NOW);
    assert_eq!(d.campaign, c);
    let keys: Vec<String> =
        serde_json::from_slice::<serde_json::Map<String, serde_json::Value>>(draft.payload)
            .unwrap()
            .keys()
            .cloned()
            .collect();
    let mut want: Vec<&str> = FIELDS.to_vec();
    want.extend(["client_id", "trigger_datetime_created"]);
    let (mut keys, mut want) = (keys, want.iter().map(|s| s.to_string()).collect::<Vec<_>>());
    keys.sort();
    want.sort();
    assert_eq!(keys, want, "exactly the SPEC fields, no feedback");
}

#[test]
fn shape_makes_one_draft_per_client_in_order() {
    let mut i = instance();
    let c = i
        .validate(SPEC_CAMPAIGN.as_bytes(), SPEC_NOW)
        .unwrap()
        .unwrap()
        .campaign;
    let clients: Vec<String> = (0..1000).map(|n| format!("client-{n}")).collect();
    let d = i.shape(&c, &clients, SPEC_NOW + 7).unwrap();
    assert_eq!(d.len(), 1000);
    for (draft, client) in d.iter().zip(&clients) {
        assert_eq!(draft.client_id, client);
        let v: serde_json::Value = serde_json::from_slice(draft.payload).unwrap();
        assert_eq!(v["client_id"], client.as_str());
        assert_eq!(v["trigger_datetime_created"], SPEC_NOW + 7);
    }
}

#[test]
fn packed_clients_of_any_length_and_text_come_back_paired() {
    let mut i = instance();
    let c = i
        .validate(SPEC_CAMPAIGN.as_bytes(), SPEC_NOW)
        .unwrap()
        .unwrap()
        .campaign;
    let long = "x".repeat(1000);
    let clients = [
        "",
        "ü",
        "c\"1\\",
        long.as_str(),
        "🍲",
        "023e4567-e89b-12d3-a456-426614174000",
    ];
    let d = i.shape(&c, &clients, SPEC_NOW).unwrap();
    assert_eq!(d.len(), clients.len());
    let got: Vec<&str> = d.iter().map(|d| d.client_id).collect();
    assert_eq!(got, clients, "the host's own ids, in its order");
    for draft in d.iter() {
        let v: serde_json::Value = serde_json::from_slice(draft.payload).unwrap();
        assert_eq!(v["client_id"], draft.client_id);
    }
    let none = i.shape::<&str>(&c, &[], SPEC_NOW).unwrap();
    assert!(none.is_empty());
    assert_eq!(none.campaign, c);
}

#[test]
fn shape_escapes_text_and_keeps_unicode() {
    let mut i = instance();
    let p = with_field(
        "adv_campaign_content",
        "70% off \"борщ\" \\ until 14:00\n🍲".into(),
    );
    let c = i.validate(&p, SPEC_NOW).unwrap().unwrap().campaign;
    let d = i.shape(&c, &["c\"1".to_string()], SPEC_NOW).unwrap();
    let v: serde_json::Value = serde_json::from_slice(d.get(0).unwrap().payload).unwrap();
    assert_eq!(
        v["adv_campaign_content"],
        "70% off \"борщ\" \\ until 14:00\n🍲"
    );
    assert_eq!(v["client_id"], "c\"1");
}

#[test]
fn not_utf8() {
    let mut p = SPEC_CAMPAIGN.as_bytes().to_vec();
    p[30] = 0xff;
    assert_eq!(rejection(&p).0, RejectionCode::NotUtf8);
}

#[test]
fn malformed_json() {
    assert_eq!(
        rejection(&SPEC_CAMPAIGN.as_bytes()[..40]).0,
        RejectionCode::MalformedJson
    );
    assert_eq!(rejection(b"").0, RejectionCode::MalformedJson);
}

#[test]
fn not_an_object() {
    for p in [&b"[1,2]"[..], b"\"text\"", b"42", b"null"] {
        assert_eq!(
            rejection(p).0,
            RejectionCode::NotAnObject,
            "{}",
            String::from_utf8_lossy(p)
        );
    }
}

#[test]
fn missing_field_names_the_field() {
    for f in FIELDS {
        let (code, field, detail) = rejection(&without_field(f));
        assert_eq!(code, RejectionCode::MissingField, "{f}");
        assert_eq!(field.as_deref(), Some(f));
        assert!(detail.contains(f), "{detail}");
        // null counts as missing
        assert_eq!(
            rejection(&with_field(f, serde_json::Value::Null)).0,
            RejectionCode::MissingField
        );
    }
}

#[test]
fn wrong_type_names_the_field() {
    for f in FIELDS {
        let bad: serde_json::Value = if f.contains("datetime") {
            "1659203516".into()
        } else {
            12345.into()
        };
        let (code, field, _) = rejection(&with_field(f, bad));
        assert_eq!(code, RejectionCode::WrongType, "{f}");
        assert_eq!(field.as_deref(), Some(f));
    }
    // a fractional timestamp is not unix seconds
    assert_eq!(
        rejection(&with_field("datetime_created", 1.5.into())).0,
        RejectionCode::WrongType
    );
    assert_eq!(
        rejection(&with_field("adv_campaign_owner", serde_json::json!(["x"]))).0,
        RejectionCode::WrongType
    );
}

#[test]
fn ids_must_be_hyphenated_uuids() {
    for f in ["restaurant_id", "adv_campaign_id"] {
        for bad in [
            "abc",
            "",
            "123e4567e89b12d3a456426614174000",
            "123e4567-e89b-12d3-a456-42661417400g",
        ] {
            let (code, field, _) = rejection(&with_field(f, bad.into()));
            assert_eq!(code, RejectionCode::InvalidUuid, "{f}={bad}");
            assert_eq!(field.as_deref(), Some(f));
        }
    }
}

#[test]
fn start_must_be_before_end() {
    let equal = with_field("adv_campaign_datetime_end", START.into());
    assert_eq!(rejection(&equal).0, RejectionCode::InvalidInterval);
    let reversed = with_field("adv_campaign_datetime_end", (START - 1).into());
    assert_eq!(rejection(&reversed).0, RejectionCode::InvalidInterval);
}

#[test]
fn active_only_strictly_between_start_and_end() {
    let (s, e) = (1000, 2000);
    assert_eq!(activity_at(s, e, s - 1), Activity::NotStarted);
    assert_eq!(
        activity_at(s, e, s),
        Activity::NotStarted,
        "start itself is not yet active"
    );
    assert_eq!(activity_at(s, e, s + 1), Activity::Active);
    assert_eq!(activity_at(s, e, e - 1), Activity::Active);
    assert_eq!(
        activity_at(s, e, e),
        Activity::Expired,
        "end itself is no longer active"
    );
    assert_eq!(activity_at(s, e, e + 1), Activity::Expired);
    assert_eq!(
        activity_at(s, s + 1, s),
        Activity::NotStarted,
        "one-second campaign, no integer inside"
    );
}

fn verdict_at(start: i64, end: i64, now: i64) -> (Activity, Window) {
    let p = with_field("adv_campaign_datetime_start", start.into());
    let mut v: serde_json::Value = serde_json::from_slice(&p).unwrap();
    v["adv_campaign_datetime_end"] = end.into();
    let p = serde_json::to_vec(&v).unwrap();
    let v = instance()
        .validate(&p, now)
        .expect("no trap")
        .expect("valid");
    (v.activity, v.window)
}

#[test]
fn the_spec_example_opens_a_second_after_its_start_and_closes_at_its_end() {
    let v = instance()
        .validate(SPEC_CAMPAIGN.as_bytes(), SPEC_NOW)
        .unwrap()
        .unwrap();
    assert_eq!(
        v.window,
        Window {
            opens: START + 1,
            closes: END
        }
    );
}

#[test]
fn the_window_agrees_with_the_activity() {
    for (s, e) in [(START, END), (1000, 2000), (1000, 1002), (-10, 10)] {
        let (_, w) = verdict_at(s, e, SPEC_NOW);
        assert_eq!((w.opens, w.closes), (s + 1, e));
        for (now, want) in [
            (w.opens - 1, Activity::NotStarted),
            (w.opens, Activity::Active),
            (w.closes - 1, Activity::Active),
            (w.closes, Activity::Expired),
        ] {
            let (activity, window) = verdict_at(s, e, now);
            assert_eq!(activity, want, "start {s}, end {e}, now {now}");
            assert_eq!(window, w, "the window does not depend on now");
        }
    }
    // A one-second campaign is never active: its window is empty.
    let (_, w) = verdict_at(1000, 1001, 0);
    assert_eq!((w.opens, w.closes), (1001, 1001));
    assert_eq!(verdict_at(1000, 1001, w.opens).0, Activity::Expired);
}

#[test]
fn unknown_fields_are_ignored() {
    let p = with_field("promo_color", "red".into());
    let v = instance().validate(&p, SPEC_NOW).unwrap().unwrap();
    assert_eq!(v.activity, Activity::Active);
}

#[test]
fn one_instance_serves_many_calls() {
    let mut i = instance();
    for n in 0..2000 {
        let v = i
            .validate(SPEC_CAMPAIGN.as_bytes(), SPEC_NOW + n)
            .unwrap()
            .unwrap();
        assert_eq!(v.activity, Activity::Active);
    }
    let _: &Campaign = &i
        .validate(SPEC_CAMPAIGN.as_bytes(), SPEC_NOW)
        .unwrap()
        .unwrap()
        .campaign;
}
