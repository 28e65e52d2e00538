//! The subscribers going into `shape` and the drafts coming out, kept packed the way they cross
//! the WIT boundary (2.x): one buffer plus end offsets each way, so a campaign costs two copies
//! instead of an allocation per subscriber. A result is checked against the contract once, when
//! it arrives; after that the pipeline reads `(client_id, payload)` pairs without copying.

use super::bindings::{Campaign, PackedDrafts};

/// Client ids packed as `shape` takes them (`client-ids` and `client-ends` in the WIT): the ids
/// concatenated, and where each one ends. [`Drafts`] keeps them: the component does not send
/// the ids back.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClientIds {
    text: String,
    ends: Vec<u32>,
}

impl ClientIds {
    pub fn new() -> Self {
        ClientIds::default()
    }

    /// Room for `ids` ids of `bytes` bytes in all.
    pub fn with_capacity(ids: usize, bytes: usize) -> Self {
        ClientIds {
            text: String::with_capacity(bytes),
            ends: Vec::with_capacity(ids),
        }
    }

    /// Appends one id.
    ///
    /// # Panics
    /// Past 4 GiB of ids in all: offsets are `u32` in the WIT (and a guest's memory is smaller).
    pub fn push(&mut self, id: &str) {
        self.text.push_str(id);
        let end = u32::try_from(self.text.len()).expect("client ids exceed 4 GiB");
        self.ends.push(end);
    }

    pub fn clear(&mut self) {
        self.text.clear();
        self.ends.clear();
    }

    pub fn len(&self) -> usize {
        self.ends.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ends.is_empty()
    }

    pub fn get(&self, i: usize) -> Option<&str> {
        let end = *self.ends.get(i)? as usize;
        // Every id was pushed whole, so its bounds are in order and on char boundaries.
        Some(&self.text[start(&self.ends, i)..end])
    }

    pub fn iter(&self) -> impl ExactSizeIterator<Item = &str> + '_ {
        (0..self.len()).map(|i| self.get(i).expect("index below len"))
    }

    /// The ids concatenated (`client-ids`).
    pub fn bytes(&self) -> &[u8] {
        self.text.as_bytes()
    }

    /// Where each id ends in [`ClientIds::bytes`] (`client-ends`).
    pub fn ends(&self) -> &[u32] {
        &self.ends
    }
}

impl<S: AsRef<str>> FromIterator<S> for ClientIds {
    fn from_iter<I: IntoIterator<Item = S>>(iter: I) -> Self {
        let mut ids = ClientIds::new();
        for id in iter {
            ids.push(id.as_ref());
        }
        ids
    }
}

/// Where item `i` starts, given every item's end.
fn start(ends: &[u32], i: usize) -> usize {
    if i == 0 {
        0
    } else {
        ends[i - 1] as usize
    }
}

/// How a `shape` result breaks the contract (one draft per client, in order, offsets within
/// the buffer). The rules are at fault: the campaign is dead-lettered as `rules_bad_output`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BadDrafts {
    #[error("shape returned {got} drafts for {expected} clients")]
    Count { expected: usize, got: usize },
    #[error(
        "draft {index} ends at byte {end}, before the end of the draft before it ({previous})"
    )]
    OutOfOrder {
        index: usize,
        end: u32,
        previous: u32,
    },
    #[error("the last draft ends at byte {end}, but the payload buffer holds {len} bytes")]
    Length { end: usize, len: usize },
}

/// Every draft of one campaign, plus what the feedback table needs: each feedback row is
/// `campaign` + one draft's `client_id` + `trigger_datetime_created`.
#[derive(Debug, Clone, PartialEq)]
pub struct Drafts {
    pub campaign: Campaign,
    pub trigger_datetime_created: i64,
    clients: ClientIds,
    payloads: Vec<u8>,
    payload_ends: Vec<u32>,
}

/// One draft, borrowed from [`Drafts`]: the subscriber and the exact JSON value for the output
/// topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Draft<'a> {
    pub client_id: &'a str,
    pub payload: &'a [u8],
}

impl Drafts {
    /// Pairs a `shape` result with the clients it was asked for, after checking the contract:
    /// one draft per client, end offsets in order, the last one at the end of the buffer.
    pub(crate) fn new(clients: ClientIds, packed: PackedDrafts) -> Result<Drafts, BadDrafts> {
        let PackedDrafts {
            campaign,
            trigger_datetime_created,
            payloads,
            payload_ends,
        } = packed;
        if payload_ends.len() != clients.len() {
            return Err(BadDrafts::Count {
                expected: clients.len(),
                got: payload_ends.len(),
            });
        }
        let mut previous = 0;
        for (index, &end) in payload_ends.iter().enumerate() {
            if end < previous {
                return Err(BadDrafts::OutOfOrder {
                    index,
                    end,
                    previous,
                });
            }
            previous = end;
        }
        if previous as usize != payloads.len() {
            return Err(BadDrafts::Length {
                end: previous as usize,
                len: payloads.len(),
            });
        }
        Ok(Drafts {
            campaign,
            trigger_datetime_created,
            clients,
            payloads,
            payload_ends,
        })
    }

    pub fn len(&self) -> usize {
        self.payload_ends.len()
    }

    pub fn is_empty(&self) -> bool {
        self.payload_ends.is_empty()
    }

    /// Draft `i`: for client `i` of the call.
    pub fn get(&self, i: usize) -> Option<Draft<'_>> {
        let end = *self.payload_ends.get(i)? as usize;
        Some(Draft {
            client_id: self.clients.get(i)?,
            // Checked in `new`: the offsets are in order and within the buffer.
            payload: &self.payloads[start(&self.payload_ends, i)..end],
        })
    }

    /// The drafts in the order of the clients.
    pub fn iter(&self) -> impl ExactSizeIterator<Item = Draft<'_>> + '_ {
        (0..self.len()).map(|i| self.get(i).expect("index below len"))
    }

    /// The clients the drafts are for.
    pub fn clients(&self) -> &ClientIds {
        &self.clients
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

    fn packed(payloads: &[u8], ends: &[u32]) -> PackedDrafts {
        PackedDrafts {
            campaign: campaign(),
            trigger_datetime_created: 2,
            payloads: payloads.to_vec(),
            payload_ends: ends.to_vec(),
        }
    }

    #[test]
    fn client_ids_pack_and_unpack() {
        let ids: ClientIds = ["alice", "", "bob", "ё"].into_iter().collect();
        assert_eq!(ids.len(), 4);
        assert_eq!(ids.bytes(), "alicebobё".as_bytes());
        assert_eq!(ids.ends(), &[5, 5, 8, 10]);
        assert_eq!(ids.iter().collect::<Vec<_>>(), ["alice", "", "bob", "ё"]);
        assert_eq!(ids.get(4), None);
    }

    #[test]
    fn drafts_pair_each_payload_with_its_client() {
        let ids: ClientIds = ["alice", "bob"].into_iter().collect();
        let d = Drafts::new(ids, packed(b"{1}{22}", &[3, 7])).unwrap();
        assert_eq!(d.len(), 2);
        let pairs: Vec<(&str, &[u8])> = d.iter().map(|d| (d.client_id, d.payload)).collect();
        assert_eq!(pairs, [("alice", &b"{1}"[..]), ("bob", &b"{22}"[..])]);
        assert_eq!(d.campaign, campaign());
        assert_eq!(d.trigger_datetime_created, 2);
    }

    #[test]
    fn a_result_that_breaks_the_contract_is_refused() {
        let ids = || ["alice", "bob"].into_iter().collect::<ClientIds>();
        assert_eq!(
            Drafts::new(ids(), packed(b"{1}", &[3])),
            Err(BadDrafts::Count {
                expected: 2,
                got: 1
            })
        );
        assert_eq!(
            Drafts::new(ids(), packed(b"{1}{2}", &[4, 3])),
            Err(BadDrafts::OutOfOrder {
                index: 1,
                end: 3,
                previous: 4
            })
        );
        assert_eq!(
            Drafts::new(ids(), packed(b"{1}{2}", &[3, 9])),
            Err(BadDrafts::Length { end: 9, len: 6 })
        );
        assert_eq!(
            Drafts::new(ids(), packed(b"{1}{2}", &[3, 5])),
            Err(BadDrafts::Length { end: 5, len: 6 })
        );
    }
}
