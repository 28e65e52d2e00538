//! The campaign pipeline's side of its WIT contract (`wit/campaign/campaign-rules.wit`): the host
//! bindings, generated once here and re-exported narrowly, and how the sandbox hosts the
//! `campaign-rules` world (its imports, its smoke test) and calls it (`validate`, `shape`).

mod generated {
    wasmtime::component::bindgen!({
        path: "../wit/campaign",
        world: "campaign-rules",
        additional_derives: [PartialEq],
    });
}

use super::drafts::{ClientIds, Drafts};
use crate::sandbox::{CallError, Contract, Evaluator, GuestLog, RulesInstance, StoreData};
use generated::fooddelivery::campaign_rules::host_log::{Host as HostLog, Level as LogLevel};
use generated::fooddelivery::campaign_rules::types::Host as HostTypes;
pub use generated::fooddelivery::campaign_rules::types::{
    Activity, Campaign, Drafts as TemplateDrafts, Rejection, RejectionCode, Verdict, Window,
};
use generated::{CampaignRules, CampaignRulesPre};
use wasmtime::component::{HasSelf, InstancePre, Linker};
use wasmtime::Store;

/// The WIT package and version this runner was built against.
pub const WIT_PACKAGE: &str = "fooddelivery:campaign-rules";
pub const WIT_VERSION: &str = "4.0.0";

/// The `campaign-rules` world, as the sandbox hosts it.
#[derive(Debug, Clone, Copy)]
pub struct CampaignContract;

/// The engine, loaded component, instance, handle and reloader of the campaign rules.
pub type RulesEngine = crate::sandbox::RulesEngine<CampaignContract>;
pub type LoadedRules = crate::sandbox::LoadedRules<CampaignContract>;
pub type CampaignInstance = RulesInstance<CampaignContract>;
pub type RulesHandle = crate::sandbox::RulesHandle<CampaignContract>;
pub type Reloader = crate::sandbox::Reloader<CampaignContract>;
pub type CampaignEvaluator = Evaluator<CampaignContract>;

impl RejectionCode {
    /// The snake_case code carried in dead-letter headers.
    pub fn as_str(&self) -> &'static str {
        match self {
            RejectionCode::NotUtf8 => "not_utf8",
            RejectionCode::MalformedJson => "malformed_json",
            RejectionCode::NotAnObject => "not_an_object",
            RejectionCode::MissingField => "missing_field",
            RejectionCode::WrongType => "wrong_type",
            RejectionCode::InvalidUuid => "invalid_uuid",
            RejectionCode::InvalidInterval => "invalid_interval",
        }
    }
}

impl Activity {
    /// The WIT's name of the case.
    pub fn as_str(&self) -> &'static str {
        match self {
            Activity::Active => "active",
            Activity::NotStarted => "not-started",
            Activity::Expired => "expired",
        }
    }
}

impl HostTypes for StoreData {}

impl HostLog for StoreData {
    fn log(&mut self, level: LogLevel, message: String) {
        let level = match level {
            LogLevel::Error => GuestLog::Error,
            LogLevel::Warn => GuestLog::Warn,
            LogLevel::Info => GuestLog::Info,
            LogLevel::Debug => GuestLog::Debug,
        };
        StoreData::log(self, level, message)
    }
}

impl Contract for CampaignContract {
    const PACKAGE: &'static str = WIT_PACKAGE;
    const VERSION: &'static str = WIT_VERSION;
    const WORLD: &'static str = "campaign-rules";
    const IMPORTS: &'static [&'static str] = &["host-log", "types"];
    const EXPORT: &'static str = "rules";
    type Pre = CampaignRulesPre<StoreData>;
    type Bindings = CampaignRules;

    fn add_to_linker(linker: &mut Linker<StoreData>) -> wasmtime::Result<()> {
        CampaignRules::add_to_linker::<StoreData, HasSelf<StoreData>>(linker, |s| s)
    }

    fn pre(pre: InstancePre<StoreData>) -> wasmtime::Result<Self::Pre> {
        CampaignRulesPre::new(pre)
    }

    fn instantiate(
        pre: &Self::Pre,
        store: &mut Store<StoreData>,
    ) -> wasmtime::Result<Self::Bindings> {
        pre.instantiate(store)
    }

    fn version(b: &Self::Bindings, store: &mut Store<StoreData>) -> wasmtime::Result<String> {
        b.fooddelivery_campaign_rules_rules().call_version(store)
    }

    /// The SPEC example must validate as active, with a window that agrees with its activity,
    /// and shape one exact draft.
    fn smoke(instance: &mut CampaignInstance) -> Result<(), String> {
        let now = SMOKE_NOW;
        let verdict = match instance.validate(SMOKE_EXAMPLE.as_bytes(), now) {
            Ok(Ok(v)) => v,
            Ok(Err(r)) => return Err(format!("the SPEC example was rejected: {}", r.detail)),
            Err(e) => return Err(format!("validate failed on the SPEC example: {e}")),
        };
        if verdict.activity != Activity::Active {
            return Err(format!(
                "the SPEC example is not active at {now}: {:?}",
                verdict.activity
            ));
        }
        check_window(instance, &verdict.window)?;
        let client = "023e4567-e89b-12d3-a456-426614174000";
        let drafts = instance
            .shape(&verdict.campaign, &[client], now)
            .map_err(|e| format!("shape failed on the SPEC example: {e}"))?;
        let draft = drafts
            .get(0)
            .expect("one draft per client, checked by shape");
        let json: serde_json::Value = serde_json::from_slice(draft.payload)
            .map_err(|e| format!("the shaped draft is not JSON: {e}"))?;
        if json.get("client_id").and_then(|v| v.as_str()) != Some(client) {
            return Err("the shaped draft lacks the subscriber's client_id".into());
        }
        Ok(())
    }
}

/// SPEC.md's example campaign, and an instant at which it is active.
const SMOKE_EXAMPLE: &str = r#"{"restaurant_id": "123e4567-e89b-12d3-a456-426614174000","adv_campaign_id": "123e4567-e89b-12d3-a456-426614174003","adv_campaign_content": "first campaign","adv_campaign_owner": "Ivanov Ivan Ivanovich","adv_campaign_owner_contact": "iiivanov@restaurant.ru","adv_campaign_datetime_start": 1659203516,"adv_campaign_datetime_end": 2659207116,"datetime_created": 1659131516}"#;
const SMOKE_NOW: i64 = 1_659_304_828;

/// The host schedules deliveries by the window and decides each one by the activity: the two
/// must agree. On the SPEC example (active at [`SMOKE_NOW`]): the window contains that instant,
/// `validate` says not-started at `opens - 1`, active at `opens` and expired at `closes`.
fn check_window(instance: &mut CampaignInstance, window: &Window) -> Result<(), String> {
    let (opens, closes) = (window.opens, window.closes);
    let disagree = |what: String| {
        Err(format!(
            "the rules' window (opens {opens}, closes {closes}) disagrees with their activity \
             on the SPEC example: {what}"
        ))
    };
    if !(opens <= SMOKE_NOW && SMOKE_NOW < closes) {
        return disagree(format!("it is active at {SMOKE_NOW}, outside the window"));
    }
    for (now, want) in [
        (opens.saturating_sub(1), Activity::NotStarted),
        (opens, Activity::Active),
        (closes, Activity::Expired),
    ] {
        let verdict = match instance.validate(SMOKE_EXAMPLE.as_bytes(), now) {
            Ok(Ok(v)) => v,
            Ok(Err(r)) => {
                return Err(format!(
                    "the SPEC example was rejected at {now}: {}",
                    r.detail
                ))
            }
            Err(e) => return Err(format!("validate failed on the SPEC example at {now}: {e}")),
        };
        if verdict.activity != want {
            return disagree(format!(
                "at {now} validate says {}, not {}",
                verdict.activity.as_str(),
                want.as_str()
            ));
        }
        if verdict.window != *window {
            return disagree(format!(
                "at {now} validate gives another window (opens {}, closes {})",
                verdict.window.opens, verdict.window.closes
            ));
        }
    }
    Ok(())
}

impl RulesInstance<CampaignContract> {
    pub fn version(&mut self) -> Result<String, CallError> {
        self.call(self.limits().call_timeout, CampaignContract::version)
    }

    /// Validates one raw campaign and decides whether it is active at `now`.
    pub fn validate(
        &mut self,
        payload: &[u8],
        now: i64,
    ) -> Result<Result<Verdict, Rejection>, CallError> {
        self.call(self.limits().call_timeout, |b, store| {
            b.fooddelivery_campaign_rules_rules()
                .call_validate(store, payload, now)
        })
    }

    /// The deadline of a shape call grows with its fan-out.
    pub fn shape_timeout(&self, subscribers: usize) -> std::time::Duration {
        self.timeout_for(subscribers)
    }

    /// Shapes one draft per client. The clients are packed into one buffer for the call (see
    /// [`RulesInstance::shape_packed`]).
    pub fn shape<S: AsRef<str>>(
        &mut self,
        campaign: &Campaign,
        clients: &[S],
        now: i64,
    ) -> Result<Drafts, CallError> {
        self.shape_packed(campaign, ClientIds::packed(clients), now)
    }

    /// Shapes one draft per client of `clients`, already packed. The result keeps `clients`
    /// and is checked against the contract (one draft per client, in order) and rendered,
    /// bounded by the instance's memory limit: a result that breaks the contract or the limit
    /// is a [`CallError::BadOutput`].
    pub fn shape_packed(
        &mut self,
        campaign: &Campaign,
        clients: ClientIds,
        now: i64,
    ) -> Result<Drafts, CallError> {
        let timeout = self.shape_timeout(clients.len());
        let template = self.call(timeout, |b, store| {
            b.fooddelivery_campaign_rules_rules().call_shape(
                store,
                campaign,
                clients.bytes(),
                clients.ends(),
                now,
            )
        })?;
        let limit = self.limits().memory_limit_bytes;
        Drafts::new(clients, template, limit).map_err(|e| CallError::BadOutput(e.to_string()))
    }
}

impl Evaluator<CampaignContract> {
    pub fn validate(
        &mut self,
        payload: &[u8],
        now: i64,
    ) -> Result<Result<Verdict, Rejection>, CallError> {
        self.with_instance(|i| i.validate(payload, now))
    }

    pub fn shape<S: AsRef<str>>(
        &mut self,
        campaign: &Campaign,
        clients: &[S],
        now: i64,
    ) -> Result<Drafts, CallError> {
        self.with_instance(|i| i.shape(campaign, clients, now))
    }
}
