//! The rules run natively the way the runner runs the component: the same packing of the
//! clients before the call and the same checking and rendering of the drafts after it, so a
//! native and a WASM figure differ only in where the rules themselves run.

use runner::pipelines::campaigns::contract::{Campaign, TemplateDrafts};
use runner::pipelines::campaigns::drafts::{ClientIds, Drafts};

/// `shape` natively: `native` is `campaign` as the rules crate types it.
pub fn shape<S: AsRef<str>>(
    campaign: &Campaign,
    native: &campaign_rules::rules::Campaign,
    clients: &[S],
    now: i64,
) -> Drafts {
    let ids = ClientIds::packed(clients);
    // The guest gets its own copy of the ids (lowered into its memory): so does the native call.
    let shaped =
        campaign_rules::rules::shape(native, ids.bytes().to_vec(), ids.ends().to_vec(), now);
    let template = TemplateDrafts {
        campaign: campaign.clone(),
        trigger_datetime_created: now,
        shared: shaped.shared,
        shared_ends: shaped.shared_ends,
        fills: shaped.fills,
        fill_ends: shaped.fill_ends,
    };
    Drafts::new(ids, template, usize::MAX).expect("the native rules keep the contract")
}
