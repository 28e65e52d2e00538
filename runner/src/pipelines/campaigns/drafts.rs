//! The subscribers going into `shape` and the drafts coming out. The clients cross the WIT
//! boundary packed (one buffer plus end offsets); the drafts come back as a template (the
//! parts every draft shares, once, plus each client's fills: `delivery::template`), are checked
//! against the contract once and rendered natively. After that the pipeline reads
//! `(client_id, payload)` pairs without copying, and the outbox stores the template.

use super::contract::{Campaign, TemplateDrafts};
use crate::delivery::template::{BadTemplate, PackedKeys, TemplateRecords};
use std::sync::Arc;

/// Client ids packed as `shape` takes them (`client-ids` and `client-ends` in the WIT). [`Drafts`]
/// keeps them: the component does not send the ids back.
pub type ClientIds = PackedKeys;

/// Every draft of one campaign, plus what the feedback table needs: each feedback row is
/// `campaign` + one draft's `client_id` + `trigger_datetime_created`. The drafts are keyed by
/// client id; the outbox stores their template.
#[derive(Debug, Clone, PartialEq)]
pub struct Drafts {
    pub campaign: Campaign,
    pub trigger_datetime_created: i64,
    records: Arc<TemplateRecords>,
}

/// One draft, borrowed from [`Drafts`]: the subscriber and the exact JSON value for the output
/// topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Draft<'a> {
    pub client_id: &'a str,
    pub payload: &'a [u8],
}

impl Drafts {
    /// Pairs a `shape` result with the clients it was asked for, after checking the contract
    /// (as many fills as clients times slots, every offset in order and within its buffer),
    /// and renders the drafts: `limit` bounds the bytes they take (a small template repeated
    /// for many clients must not become an unbounded allocation in the host).
    pub fn new(
        clients: ClientIds,
        template: TemplateDrafts,
        limit: usize,
    ) -> Result<Drafts, BadTemplate> {
        let TemplateDrafts {
            campaign,
            trigger_datetime_created,
            shared,
            shared_ends,
            fills,
            fill_ends,
        } = template;
        let records = TemplateRecords::new(clients, shared, shared_ends, fills, fill_ends, limit)?;
        Ok(Drafts {
            campaign,
            trigger_datetime_created,
            records: Arc::new(records),
        })
    }

    pub fn len(&self) -> usize {
        self.records.len()
    }

    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    /// Draft `i`: for client `i` of the call.
    pub fn get(&self, i: usize) -> Option<Draft<'_>> {
        self.records.get(i).map(|r| Draft {
            client_id: r.key,
            payload: r.payload,
        })
    }

    /// The drafts in the order of the clients.
    pub fn iter(&self) -> impl ExactSizeIterator<Item = Draft<'_>> + '_ {
        (0..self.len()).map(|i| self.get(i).expect("index below len"))
    }

    /// The clients the drafts are for.
    pub fn clients(&self) -> &ClientIds {
        self.records.keys()
    }

    /// The drafts as records keyed by client id, shared with the outbox.
    pub fn records(&self) -> &Arc<TemplateRecords> {
        &self.records
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn campaign() -> Campaign {
        Campaign {
            restaurant_id: "r".into(),
            adv_campaign_id: "a".into(),
            adv_campaign_content: "c".into(),
            adv_campaign_owner: "o".into(),
            adv_campaign_owner_contact: "e".into(),
            adv_campaign_datetime_start: 1,
            adv_campaign_datetime_end: 3,
            datetime_created: 0,
        }
    }

    #[test]
    fn drafts_are_rendered_and_paired_with_their_clients() {
        let ids: ClientIds = ["alice", "bob"].into_iter().collect();
        // Two slots: {"a":<fill 0>,"b":<fill 1>}
        let t = TemplateDrafts {
            campaign: campaign(),
            trigger_datetime_created: 2,
            shared: br#"{"a":,"b":}"#.to_vec(),
            shared_ends: vec![5, 10, 11],
            fills: b"1xx222y".to_vec(),
            fill_ends: vec![1, 3, 6, 7],
        };
        let d = Drafts::new(ids, t, 1 << 20).unwrap();
        assert_eq!(d.len(), 2);
        let pairs: Vec<(&str, &[u8])> = d.iter().map(|d| (d.client_id, d.payload)).collect();
        assert_eq!(
            pairs,
            [
                ("alice", &br#"{"a":1,"b":xx}"#[..]),
                ("bob", &br#"{"a":222,"b":y}"#[..])
            ]
        );
        assert_eq!(d.campaign, campaign());
        assert_eq!(d.trigger_datetime_created, 2);
        assert_eq!(d.clients().iter().collect::<Vec<_>>(), ["alice", "bob"]);
    }
}
