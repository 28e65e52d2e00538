//! The rules components as the runner loads and calls them (the checked configuration's
//! sandbox limits, `RulesEngine::load_file`, the evaluator the delivery loop calls through),
//! fed generated inputs: no trap, no timeout, no result that breaks the contract; every input
//! comes back valid or as a typed rejection, and the same as the rules decide natively.

use super::inputs::{self, NOW};
use super::{env_number, property, Bytes, Tally};
use e2e_tests::{rules_wasm, sales_wasm};
use proptest::collection::vec;
use proptest::prelude::*;
use runner::config::{Config, Sources};
use runner::pipelines::campaigns::contract::{
    self as campaign, Activity, Campaign, CampaignEvaluator,
};
use runner::pipelines::store_revenue::contract::{self as sales, PackedPayloads, SalesEvaluator};
use runner::sandbox::CallError;
use std::cell::RefCell;

/// Inputs per rules property.
fn cases() -> usize {
    env_number("FUZZ_RULES_CASES", 300)
}

/// The runner's checked configuration with both pipelines' rules at the built components. The
/// call deadlines are generous (2 s): a machine busy with other work must not fail a property,
/// while a call that hangs still does.
fn runner_config() -> Config {
    let overlay = format!(
        "[pipelines.campaigns.rules]\npath = \"{}\"\ncall_timeout = \"2s\"\n\
         [pipelines.store_revenue]\nenabled = true\n\
         [pipelines.store_revenue.rules]\npath = \"{}\"\ncall_timeout = \"2s\"\n",
        rules_wasm().display(),
        sales_wasm().display()
    );
    Config::load(&Sources {
        file: None,
        overlay: Some(&overlay),
        env: false,
    })
    .expect("a valid configuration")
}

/// The campaign rules as the pipeline loads them, and its `max_message_bytes`.
fn campaign_evaluator() -> (CampaignEvaluator, usize) {
    let cfg = runner_config().campaigns.expect("the campaign pipeline");
    let engine = campaign::RulesEngine::new(cfg.rules.limits.clone()).expect("engine");
    let loaded = engine
        .load_file(&cfg.rules.path)
        .expect("the campaign rules load");
    (
        CampaignEvaluator::new(campaign::RulesHandle::new(loaded)),
        cfg.max_message_bytes,
    )
}

fn sales_evaluator() -> (SalesEvaluator, usize, u8) {
    let cfg = runner_config()
        .store_revenue
        .expect("the store-revenue pipeline");
    let engine = sales::RulesEngine::new(cfg.rules.limits.clone()).expect("engine");
    let loaded = engine
        .load_file(&cfg.rules.path)
        .expect("the sales rules load");
    (
        SalesEvaluator::new(sales::RulesHandle::new(loaded)),
        cfg.max_message_bytes,
        cfg.minor_digits,
    )
}

fn native_activity(a: campaign_rules::rules::Activity) -> Activity {
    match a {
        campaign_rules::rules::Activity::Active => Activity::Active,
        campaign_rules::rules::Activity::NotStarted => Activity::NotStarted,
        campaign_rules::rules::Activity::Expired => Activity::Expired,
    }
}

fn activity_class(a: Activity) -> &'static str {
    match a {
        Activity::Active => "valid: active",
        Activity::NotStarted => "valid: not_started",
        Activity::Expired => "valid: expired",
    }
}

/// Calls `f`, and once more if the call ran past its deadline: a deadline is wall-clock time,
/// and a busy machine can hold a thread past it. A guest that spins misses it twice.
fn retrying<T>(
    tally: &mut Tally,
    mut f: impl FnMut() -> Result<T, CallError>,
) -> Result<T, CallError> {
    match f() {
        Err(CallError::Timeout(_)) => {
            tally.add("deadline missed once, met on the retry", 1);
            f()
        }
        r => r,
    }
}

/// A native rejection code as the WIT names it.
pub fn campaign_code(c: campaign_rules::rules::Code) -> &'static str {
    use campaign_rules::rules::Code::*;
    match c {
        NotUtf8 => "not_utf8",
        MalformedJson => "malformed_json",
        NotAnObject => "not_an_object",
        MissingField => "missing_field",
        WrongType => "wrong_type",
        InvalidUuid => "invalid_uuid",
        InvalidInterval => "invalid_interval",
    }
}

pub fn sales_code(c: sales_rules::rules::Code) -> &'static str {
    use sales_rules::rules::Code::*;
    match c {
        NotUtf8 => "not_utf8",
        MalformedJson => "malformed_json",
        NotAnObject => "not_an_object",
        MissingField => "missing_field",
        WrongType => "wrong_type",
        EmptyStore => "empty_store",
        NegativePrice => "negative_price",
        TooPrecise => "too_precise",
        OutOfRange => "out_of_range",
    }
}

#[test]
fn campaign_validate_never_traps_and_types_every_input() {
    let (evaluator, limit) = campaign_evaluator();
    let evaluator = RefCell::new(evaluator);
    property(
        "campaign rules: validate",
        cases(),
        2000,
        inputs::campaign_payload(limit).prop_map(Bytes),
        |Bytes(payload), tally: &mut Tally| {
            let got = retrying(tally, || evaluator.borrow_mut().validate(&payload, NOW));
            let native = campaign_rules::rules::validate(&payload);
            match (got, native) {
                (Err(e), _) => {
                    return Err(TestCaseError::fail(format!(
                        "the call failed ({}): {e}",
                        e.code()
                    )))
                }
                (Ok(Ok(v)), Ok(c)) => {
                    let want = Campaign {
                        restaurant_id: c.restaurant_id.clone(),
                        adv_campaign_id: c.adv_campaign_id.clone(),
                        adv_campaign_content: c.adv_campaign_content.clone(),
                        adv_campaign_owner: c.adv_campaign_owner.clone(),
                        adv_campaign_owner_contact: c.adv_campaign_owner_contact.clone(),
                        adv_campaign_datetime_start: c.adv_campaign_datetime_start,
                        adv_campaign_datetime_end: c.adv_campaign_datetime_end,
                        datetime_created: c.datetime_created,
                    };
                    prop_assert_eq!(&v.campaign, &want);
                    let activity = native_activity(campaign_rules::rules::activity(&c, NOW));
                    prop_assert_eq!(v.activity, activity);
                    tally.input(activity_class(v.activity));
                }
                (Ok(Err(r)), Err(n)) => {
                    prop_assert_eq!(r.code.as_str(), campaign_code(n.code));
                    prop_assert_eq!(r.field.as_deref(), n.field.as_deref());
                    prop_assert!(!r.detail.is_empty(), "a rejection says why");
                    if let Some(f) = &r.field {
                        prop_assert!(inputs::CAMPAIGN_FIELDS.contains(&f.as_str()), "{f}");
                    }
                    prop_assert_eq!(
                        r.code.as_str() == "not_utf8",
                        std::str::from_utf8(&payload).is_err()
                    );
                    tally.input(format!("rejected: {}", r.code.as_str()));
                }
                (got, native) => {
                    return Err(TestCaseError::fail(format!(
                        "the component says {got:?}, the rules natively {native:?}"
                    )))
                }
            }
            Ok(())
        },
    );
}

/// A valid campaign: any text in its text fields, any times with start before end.
fn valid_campaign() -> impl Strategy<Value = Campaign> {
    let id = || any::<u128>().prop_map(|u| uuid::Uuid::from_u128(u).hyphenated().to_string());
    (
        id(),
        id(),
        inputs::text(),
        inputs::text(),
        inputs::text(),
        any::<i64>(),
        1i64..=i64::MAX,
        any::<i64>(),
    )
        .prop_map(
            |(r, a, content, owner, contact, start, len, created)| Campaign {
                restaurant_id: r,
                adv_campaign_id: a,
                adv_campaign_content: content,
                adv_campaign_owner: owner,
                adv_campaign_owner_contact: contact,
                adv_campaign_datetime_start: start,
                adv_campaign_datetime_end: start.saturating_add(len).max(start + 1),
                datetime_created: created,
            },
        )
        .prop_filter("start before end", |c| {
            c.adv_campaign_datetime_start < c.adv_campaign_datetime_end
        })
}

/// Subscribers: UUIDs, or any text (ids that need a JSON escape take the rules' other path);
/// now and then a few thousand.
fn clients() -> impl Strategy<Value = Vec<String>> {
    let one = prop_oneof![
        4 => any::<u128>().prop_map(|u| uuid::Uuid::from_u128(u).hyphenated().to_string()),
        1 => ".{0,12}",
        1 => "[\"\\\\\u{0}\u{1f}é😀a]{0,6}",
    ];
    prop_oneof![
        12 => vec(one, 0..24),
        1 => (1000usize..5000).prop_map(|n| (0..n)
            .map(|i| uuid::Uuid::from_u128(i as u128).hyphenated().to_string())
            .collect()),
    ]
}

#[test]
fn campaign_shape_never_traps_and_makes_one_exact_draft_per_client() {
    let (evaluator, _) = campaign_evaluator();
    let limit = runner_config()
        .campaigns
        .expect("the campaign pipeline")
        .rules
        .limits
        .memory_limit_bytes;
    let evaluator = RefCell::new(evaluator);
    property(
        "campaign rules: shape",
        cases(),
        2000,
        (valid_campaign(), clients(), any::<i64>()),
        |(c, clients, now), tally: &mut Tally| {
            let drafts = match retrying(tally, || evaluator.borrow_mut().shape(&c, &clients, now)) {
                Ok(d) => d,
                // Drafts that would take more than a rules instance's memory limit are refused
                // (and dead-lettered as rules_bad_output): only past that limit.
                Err(e @ CallError::BadOutput(_)) if e.to_string().contains("memory limit") => {
                    let text = c.adv_campaign_content.len()
                        + c.adv_campaign_owner.len()
                        + c.adv_campaign_owner_contact.len();
                    prop_assert!(
                        clients.len() * text >= limit / 2,
                        "refused under the limit: {e}"
                    );
                    tally.input("refused: the drafts pass the memory limit");
                    return Ok(());
                }
                Err(e) => {
                    return Err(TestCaseError::fail(format!(
                        "the call failed ({}): {e}",
                        e.code()
                    )))
                }
            };
            prop_assert_eq!(drafts.len(), clients.len());
            prop_assert_eq!(&drafts.campaign, &c);
            prop_assert_eq!(drafts.trigger_datetime_created, now);
            for (d, client) in drafts.iter().zip(&clients) {
                prop_assert_eq!(d.client_id, client.as_str());
                let got: serde_json::Value = serde_json::from_slice(d.payload)
                    .map_err(|e| TestCaseError::fail(format!("a draft is not JSON: {e}")))?;
                let want = serde_json::json!({
                    "restaurant_id": c.restaurant_id,
                    "adv_campaign_id": c.adv_campaign_id,
                    "adv_campaign_content": c.adv_campaign_content,
                    "adv_campaign_owner": c.adv_campaign_owner,
                    "adv_campaign_owner_contact": c.adv_campaign_owner_contact,
                    "adv_campaign_datetime_start": c.adv_campaign_datetime_start,
                    "adv_campaign_datetime_end": c.adv_campaign_datetime_end,
                    "client_id": client,
                    "datetime_created": c.datetime_created,
                    "trigger_datetime_created": now,
                });
                prop_assert_eq!(got, want);
            }
            tally.input(if clients.is_empty() {
                "no clients"
            } else if clients.len() >= 1000 {
                "1,000 clients or more"
            } else {
                "1 to 23 clients"
            });
            tally.add("drafts checked", clients.len() as u64);
            Ok(())
        },
    );
}

#[test]
fn sales_validate_never_traps_and_types_every_message_of_a_batch() {
    let (evaluator, limit, minor_digits) = sales_evaluator();
    let evaluator = RefCell::new(evaluator);
    const BASE: i64 = 1_764_255_600;
    let batch = vec(inputs::sale_value(limit), 1..16).prop_map(|values| {
        values
            .iter()
            .filter_map(|v| v.render(BASE).map(Bytes))
            .collect::<Vec<_>>()
    });
    property(
        "sales rules: validate (batches)",
        cases(),
        2000,
        batch,
        |payloads, tally: &mut Tally| {
            let mut packed = PackedPayloads::new();
            let payloads: Vec<Vec<u8>> = payloads.into_iter().map(|Bytes(b)| b).collect();
            for p in &payloads {
                packed.push(p);
            }
            let result = retrying(tally, || {
                evaluator
                    .borrow_mut()
                    .validate(packed.bytes(), packed.ends(), minor_digits)
            })
            .map_err(|e| TestCaseError::fail(format!("the call failed ({}): {e}", e.code())))?;
            let (mut sales, mut rejections) = (
                result.sales.iter().peekable(),
                result.rejections.iter().peekable(),
            );
            for (i, p) in payloads.iter().enumerate() {
                let native = sales_rules::rules::validate(p, minor_digits);
                match native {
                    Ok(want) => {
                        let got = sales.next();
                        prop_assert!(
                            got.is_some_and(|s| s.index as usize == i),
                            "message {i} is not a sale in {result:?}"
                        );
                        let got = got.expect("checked");
                        prop_assert_eq!(&got.store, &want.store);
                        prop_assert_eq!(got.amount_minor, want.amount_minor);
                        prop_assert_eq!(got.event_time, want.event_time);
                        tally.input("valid");
                    }
                    Err(want) => {
                        let got = rejections.next();
                        prop_assert!(
                            got.is_some_and(|r| r.index as usize == i),
                            "message {i} is not a rejection in {result:?}"
                        );
                        let got = &got.expect("checked").rejection;
                        prop_assert_eq!(got.code.as_str(), sales_code(want.code));
                        prop_assert_eq!(got.field.as_deref(), want.field);
                        prop_assert!(!got.detail.is_empty(), "a rejection says why");
                        tally.input(format!("rejected: {}", got.code.as_str()));
                    }
                }
            }
            tally.add("batches", 1);
            Ok(())
        },
    );
}
