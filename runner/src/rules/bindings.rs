//! The host side of the WIT contract in `wit/`: generated once here, re-exported narrowly.

mod generated {
    wasmtime::component::bindgen!({
        path: "../wit",
        world: "campaign-rules",
        additional_derives: [PartialEq],
    });
}

pub use generated::fooddelivery::campaign_rules::host_log::{Host as HostLog, Level as LogLevel};
pub use generated::fooddelivery::campaign_rules::types::{
    Activity, Campaign, Drafts as TemplateDrafts, Host as HostTypes, Rejection, RejectionCode,
    Verdict,
};
pub use generated::{CampaignRules, CampaignRulesPre};

/// The WIT package and version this runner was built against.
pub const WIT_PACKAGE: &str = "fooddelivery:campaign-rules";
pub const WIT_VERSION: &str = "3.0.0";

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
