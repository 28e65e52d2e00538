//! The campaign rules component: the WIT glue around [`rules`]. Built for
//! `wasm32-unknown-unknown` and turned into a component by `transforms/componentize`, so it
//! imports nothing but `host-log` (no WASI: no clock, files, network, environment or random).

pub mod rules;

// The same rules built against the previous contract (3.0.0, no window): a fixture the runner
// must refuse. Built alone: `--no-default-features --features contract-3`.
#[cfg(all(target_arch = "wasm32", feature = "contract-3"))]
#[path = "../../fixtures/contract-3/glue.rs"]
mod contract_3;

// wit-bindgen's generated export glue is `unsafe` by nature (raw ABI pointers).
#[cfg(all(target_arch = "wasm32", feature = "component"))]
#[allow(unsafe_code)]
mod component {
    use super::rules;

    wit_bindgen::generate!({
        path: "../../wit/campaign",
        world: "campaign-rules",
    });

    use exports::fooddelivery::campaign_rules::rules::Guest;
    use fooddelivery::campaign_rules::host_log::{log, Level};
    use fooddelivery::campaign_rules::types::{
        Activity, Campaign, Drafts, Rejection, RejectionCode, Verdict, Window,
    };

    /// The version this component reports; the runner logs it and stamps it on every output.
    #[cfg(not(feature = "v2"))]
    const VERSION: &str = concat!("campaign-rules ", env!("CARGO_PKG_VERSION"));
    #[cfg(feature = "v2")]
    const VERSION: &str = concat!("campaign-rules ", env!("CARGO_PKG_VERSION"), "+v2");

    struct Component;
    export!(Component);

    /// A panic aborts the guest (a trap for the host); send its message to the host's log first.
    fn install_panic_hook() {
        static ONCE: std::sync::Once = std::sync::Once::new();
        ONCE.call_once(|| {
            std::panic::set_hook(Box::new(|info| {
                log(Level::Error, &format!("rules panicked: {info}"))
            }));
        });
    }

    impl From<rules::Campaign> for Campaign {
        fn from(c: rules::Campaign) -> Self {
            Campaign {
                restaurant_id: c.restaurant_id,
                adv_campaign_id: c.adv_campaign_id,
                adv_campaign_content: c.adv_campaign_content,
                adv_campaign_owner: c.adv_campaign_owner,
                adv_campaign_owner_contact: c.adv_campaign_owner_contact,
                adv_campaign_datetime_start: c.adv_campaign_datetime_start,
                adv_campaign_datetime_end: c.adv_campaign_datetime_end,
                datetime_created: c.datetime_created,
            }
        }
    }

    impl From<Campaign> for rules::Campaign {
        fn from(c: Campaign) -> Self {
            rules::Campaign {
                restaurant_id: c.restaurant_id,
                adv_campaign_id: c.adv_campaign_id,
                adv_campaign_content: c.adv_campaign_content,
                adv_campaign_owner: c.adv_campaign_owner,
                adv_campaign_owner_contact: c.adv_campaign_owner_contact,
                adv_campaign_datetime_start: c.adv_campaign_datetime_start,
                adv_campaign_datetime_end: c.adv_campaign_datetime_end,
                datetime_created: c.datetime_created,
            }
        }
    }

    fn code(c: rules::Code) -> RejectionCode {
        match c {
            rules::Code::NotUtf8 => RejectionCode::NotUtf8,
            rules::Code::MalformedJson => RejectionCode::MalformedJson,
            rules::Code::NotAnObject => RejectionCode::NotAnObject,
            rules::Code::MissingField => RejectionCode::MissingField,
            rules::Code::WrongType => RejectionCode::WrongType,
            rules::Code::InvalidUuid => RejectionCode::InvalidUuid,
            rules::Code::InvalidInterval => RejectionCode::InvalidInterval,
        }
    }

    impl Guest for Component {
        fn version() -> String {
            VERSION.to_string()
        }

        fn validate(payload: Vec<u8>, now: i64) -> Result<Verdict, Rejection> {
            install_panic_hook();
            match rules::validate(&payload) {
                Ok(c) => {
                    let activity = match rules::activity(&c, now) {
                        rules::Activity::Active => Activity::Active,
                        rules::Activity::NotStarted => Activity::NotStarted,
                        rules::Activity::Expired => Activity::Expired,
                    };
                    let window = rules::window(&c);
                    Ok(Verdict {
                        campaign: c.into(),
                        activity,
                        window: Window {
                            opens: window.opens,
                            closes: window.closes,
                        },
                    })
                }
                Err(r) => Err(Rejection {
                    code: code(r.code),
                    field: r.field,
                    detail: r.detail,
                }),
            }
        }

        fn shape(
            campaign: Campaign,
            client_ids: Vec<u8>,
            client_ends: Vec<u32>,
            now: i64,
        ) -> Drafts {
            install_panic_hook();
            #[allow(unused_mut)]
            let mut c: rules::Campaign = campaign.into();
            #[cfg(feature = "v2")]
            {
                c.adv_campaign_content = format!("[v2] {}", c.adv_campaign_content);
            }
            // Packing that breaks the contract panics: a trap, whose message reaches the log.
            let shaped = rules::shape(&c, client_ids, client_ends, now);
            Drafts {
                campaign: c.into(),
                trigger_datetime_created: now,
                shared: shaped.shared,
                shared_ends: shaped.shared_ends,
                fills: shaped.fills,
                fill_ends: shaped.fill_ends,
            }
        }
    }
}
