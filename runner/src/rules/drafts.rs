//! The subscribers going into `shape` and the drafts coming out. The clients cross the WIT
//! boundary packed (one buffer plus end offsets); the drafts come back as a template (3.x: the
//! parts every draft shares, once, plus each client's fills), are checked against the contract
//! once, and are rendered here, natively, into one packed buffer. After that the pipeline reads
//! `(client_id, payload)` pairs without copying.

use super::bindings::{Campaign, TemplateDrafts};

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

    /// Packs `ids`, in order, into buffers sized for them.
    pub fn packed<S: AsRef<str>>(ids: &[S]) -> Self {
        let bytes = ids.iter().map(|c| c.as_ref().len()).sum();
        let mut packed = ClientIds::with_capacity(ids.len(), bytes);
        for id in ids {
            packed.push(id.as_ref());
        }
        packed
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
/// their buffers), or would render past the host's limit. The rules are at fault: the campaign
/// is dead-lettered as `rules_bad_output`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BadDrafts {
    #[error("shape returned no shared parts (a template has at least one)")]
    NoParts,
    #[error("shape returned {got} fills for {clients} clients with {slots} slots each")]
    Count {
        clients: usize,
        slots: usize,
        got: usize,
    },
    #[error(
        "{buffer}: item {index} ends at byte {end}, before the end of the item before it ({previous})"
    )]
    OutOfOrder {
        buffer: &'static str,
        index: usize,
        end: u32,
        previous: u32,
    },
    #[error("{buffer}: the last item ends at byte {end}, but the buffer holds {len} bytes")]
    Length {
        buffer: &'static str,
        end: usize,
        len: usize,
    },
    #[error("the drafts would take {bytes} bytes, past the memory limit of {limit} bytes")]
    TooLarge { bytes: u64, limit: usize },
}

/// Checks that `ends` packs `len` bytes: in order, the last one at the end (none for 0 bytes).
fn check_packed(buffer: &'static str, len: usize, ends: &[u32]) -> Result<(), BadDrafts> {
    let mut previous = 0;
    for (index, &end) in ends.iter().enumerate() {
        if end < previous {
            return Err(BadDrafts::OutOfOrder {
                buffer,
                index,
                end,
                previous,
            });
        }
        previous = end;
    }
    if previous as usize != len {
        return Err(BadDrafts::Length {
            buffer,
            end: previous as usize,
            len,
        });
    }
    Ok(())
}

/// The parts every draft shares and each client's fills, checked: draft i is
/// `part 0 ++ fill(i, 0) ++ part 1 ++ … ++ fill(i, k - 1) ++ part k`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Template {
    shared: Vec<u8>,
    shared_ends: Vec<u32>,
    fills: Vec<u8>,
    fill_ends: Vec<u32>,
}

impl Template {
    /// Checks the template against `clients` clients and `limit` bytes of rendered drafts.
    fn checked(
        shared: Vec<u8>,
        shared_ends: Vec<u32>,
        fills: Vec<u8>,
        fill_ends: Vec<u32>,
        clients: usize,
        limit: usize,
    ) -> Result<Template, BadDrafts> {
        if shared_ends.is_empty() {
            return Err(BadDrafts::NoParts);
        }
        check_packed("shared", shared.len(), &shared_ends)?;
        check_packed("fills", fills.len(), &fill_ends)?;
        let slots = shared_ends.len() - 1;
        if fill_ends.len() != clients * slots {
            return Err(BadDrafts::Count {
                clients,
                slots,
                got: fill_ends.len(),
            });
        }
        let bytes = (clients as u64)
            .saturating_mul(shared.len() as u64)
            .saturating_add(fills.len() as u64);
        if bytes > limit as u64 {
            return Err(BadDrafts::TooLarge { bytes, limit });
        }
        Ok(Template {
            shared,
            shared_ends,
            fills,
            fill_ends,
        })
    }

    /// The drafts of `clients` clients (as checked), packed, and where each one ends.
    fn render(&self, clients: usize) -> (Vec<u8>, Vec<usize>) {
        let slots = self.shared_ends.len() - 1;
        let part =
            |j: usize| &self.shared[start(&self.shared_ends, j)..self.shared_ends[j] as usize];
        let fill = |f: usize| &self.fills[start(&self.fill_ends, f)..self.fill_ends[f] as usize];
        let mut payloads = Vec::with_capacity(clients * self.shared.len() + self.fills.len());
        let mut payload_ends = Vec::with_capacity(clients);
        for i in 0..clients {
            payloads.extend_from_slice(part(0));
            for j in 0..slots {
                payloads.extend_from_slice(fill(i * slots + j));
                payloads.extend_from_slice(part(j + 1));
            }
            payload_ends.push(payloads.len());
        }
        (payloads, payload_ends)
    }
}

/// Every draft of one campaign, plus what the feedback table needs: each feedback row is
/// `campaign` + one draft's `client_id` + `trigger_datetime_created`. Keeps the template the
/// drafts were rendered from: it is what the outbox stores ([`Drafts::encode`]).
#[derive(Debug, Clone, PartialEq)]
pub struct Drafts {
    pub campaign: Campaign,
    pub trigger_datetime_created: i64,
    clients: ClientIds,
    template: Template,
    payloads: Vec<u8>,
    payload_ends: Vec<usize>,
}

/// Why stored drafts ([`Drafts::encode`]) cannot be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BadEncoding {
    #[error("stored drafts: unknown format {0}")]
    Format(u8),
    #[error("stored drafts: truncated")]
    Truncated,
    #[error("stored drafts: {0}")]
    Template(#[from] BadDrafts),
}

/// A draft read back from its stored form: the client id and the payload.
pub type StoredDraft = (Vec<u8>, Vec<u8>);

/// The format byte [`Drafts::encode`] starts with: client ids, shared parts, fills.
const ENCODING_FORMAT: u8 = 1;
/// The same without the fills: the template has one slot and its fills are the client ids
/// themselves (what the rules return when no id needs a JSON escape).
const ENCODING_FILLS_ARE_IDS: u8 = 2;

/// Appends a packed buffer: item count, byte length, the items' ends, the bytes (u32s
/// little-endian).
fn put_packed(out: &mut Vec<u8>, bytes: &[u8], ends: &[u32]) {
    out.extend_from_slice(&(ends.len() as u32).to_le_bytes());
    out.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
    for e in ends {
        out.extend_from_slice(&e.to_le_bytes());
    }
    out.extend_from_slice(bytes);
}

/// Takes a buffer [`put_packed`] wrote off the front of `b`.
fn take_packed(b: &mut &[u8]) -> Result<(Vec<u8>, Vec<u32>), BadEncoding> {
    fn take<'a>(b: &mut &'a [u8], n: usize) -> Result<&'a [u8], BadEncoding> {
        if b.len() < n {
            return Err(BadEncoding::Truncated);
        }
        let (h, t) = b.split_at(n);
        *b = t;
        Ok(h)
    }
    let u32_at = |c: &[u8]| u32::from_le_bytes(c.try_into().expect("4 bytes"));
    let count = u32_at(take(b, 4)?) as usize;
    let len = u32_at(take(b, 4)?) as usize;
    let ends = take(b, count.checked_mul(4).ok_or(BadEncoding::Truncated)?)?
        .chunks_exact(4)
        .map(u32_at)
        .collect();
    Ok((take(b, len)?.to_vec(), ends))
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
    ) -> Result<Drafts, BadDrafts> {
        let TemplateDrafts {
            campaign,
            trigger_datetime_created,
            shared,
            shared_ends,
            fills,
            fill_ends,
        } = template;
        let template =
            Template::checked(shared, shared_ends, fills, fill_ends, clients.len(), limit)?;
        let (payloads, payload_ends) = template.render(clients.len());
        Ok(Drafts {
            campaign,
            trigger_datetime_created,
            clients,
            template,
            payloads,
            payload_ends,
        })
    }

    /// The drafts as the outbox stores them: the clients and the template (a format byte, then
    /// three packed buffers: client ids, shared parts, fills). About a tenth of the rendered
    /// drafts' bytes when a campaign has many subscribers.
    pub fn encode(&self) -> Vec<u8> {
        let t = &self.template;
        let fills_are_ids = t.shared_ends.len() == 2
            && t.fill_ends == self.clients.ends()
            && t.fills == self.clients.bytes();
        let fills = if fills_are_ids {
            0
        } else {
            t.fills.len() + 4 * t.fill_ends.len()
        };
        let mut out = Vec::with_capacity(
            13 + self.clients.bytes().len()
                + t.shared.len()
                + fills
                + 4 * (self.clients.len() + t.shared_ends.len()),
        );
        if fills_are_ids {
            out.push(ENCODING_FILLS_ARE_IDS);
        } else {
            out.push(ENCODING_FORMAT);
        }
        put_packed(&mut out, self.clients.bytes(), self.clients.ends());
        put_packed(&mut out, &t.shared, &t.shared_ends);
        if !fills_are_ids {
            put_packed(&mut out, &t.fills, &t.fill_ends);
        }
        out
    }

    /// Renders what [`Drafts::encode`] stored: `(client id, draft)` pairs, in order.
    pub fn decode(mut b: &[u8]) -> Result<Vec<StoredDraft>, BadEncoding> {
        let format = match b.split_first() {
            Some((&f @ (ENCODING_FORMAT | ENCODING_FILLS_ARE_IDS), rest)) => {
                b = rest;
                f
            }
            Some((&f, _)) => return Err(BadEncoding::Format(f)),
            None => return Err(BadEncoding::Truncated),
        };
        let (ids, id_ends) = take_packed(&mut b)?;
        check_packed("client ids", ids.len(), &id_ends)?;
        let (shared, shared_ends) = take_packed(&mut b)?;
        let (fills, fill_ends) = if format == ENCODING_FILLS_ARE_IDS {
            (ids.clone(), id_ends.clone())
        } else {
            take_packed(&mut b)?
        };
        if !b.is_empty() {
            return Err(BadEncoding::Truncated);
        }
        let n = id_ends.len();
        let template = Template::checked(shared, shared_ends, fills, fill_ends, n, usize::MAX)?;
        let (payloads, payload_ends) = template.render(n);
        let mut from = 0;
        Ok((0..n)
            .map(|i| {
                let draft = payloads[from..payload_ends[i]].to_vec();
                from = payload_ends[i];
                (ids[start(&id_ends, i)..id_ends[i] as usize].to_vec(), draft)
            })
            .collect())
    }

    pub fn len(&self) -> usize {
        self.payload_ends.len()
    }

    pub fn is_empty(&self) -> bool {
        self.payload_ends.is_empty()
    }

    /// Draft `i`: for client `i` of the call.
    pub fn get(&self, i: usize) -> Option<Draft<'_>> {
        let end = *self.payload_ends.get(i)?;
        let start = if i == 0 { 0 } else { self.payload_ends[i - 1] };
        Some(Draft {
            client_id: self.clients.get(i)?,
            // Rendered in `new`: the offsets are in order and within the buffer.
            payload: &self.payloads[start..end],
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

    fn template(
        shared: &[u8],
        shared_ends: &[u32],
        fills: &[u8],
        fill_ends: &[u32],
    ) -> TemplateDrafts {
        TemplateDrafts {
            campaign: campaign(),
            trigger_datetime_created: 2,
            shared: shared.to_vec(),
            shared_ends: shared_ends.to_vec(),
            fills: fills.to_vec(),
            fill_ends: fill_ends.to_vec(),
        }
    }

    const LIMIT: usize = 1 << 20;

    #[test]
    fn client_ids_pack_and_unpack() {
        let ids: ClientIds = ["alice", "", "bob", "ё"].into_iter().collect();
        assert_eq!(ids.len(), 4);
        assert_eq!(ids.bytes(), "alicebobё".as_bytes());
        assert_eq!(ids.ends(), &[5, 5, 8, 10]);
        assert_eq!(ids.iter().collect::<Vec<_>>(), ["alice", "", "bob", "ё"]);
        assert_eq!(ids.get(4), None);
    }

    fn pairs(d: &Drafts) -> Vec<(&str, &[u8])> {
        d.iter().map(|d| (d.client_id, d.payload)).collect()
    }

    #[test]
    fn drafts_are_rendered_and_paired_with_their_clients() {
        let ids: ClientIds = ["alice", "bob"].into_iter().collect();
        // Two slots: {"a":<fill 0>,"b":<fill 1>}
        let t = template(br#"{"a":,"b":}"#, &[5, 10, 11], b"1xx222y", &[1, 3, 6, 7]);
        let d = Drafts::new(ids, t, LIMIT).unwrap();
        assert_eq!(d.len(), 2);
        assert_eq!(
            pairs(&d),
            [
                ("alice", &br#"{"a":1,"b":xx}"#[..]),
                ("bob", &br#"{"a":222,"b":y}"#[..])
            ]
        );
        assert_eq!(d.campaign, campaign());
        assert_eq!(d.trigger_datetime_created, 2);
    }

    #[test]
    fn templates_without_slots_or_shared_parts_render_too() {
        let ids = || ["alice", "bob"].into_iter().collect::<ClientIds>();
        // No slot: every draft is the one shared part.
        let d = Drafts::new(ids(), template(b"{}", &[2], b"", &[]), LIMIT).unwrap();
        assert_eq!(pairs(&d), [("alice", &b"{}"[..]), ("bob", &b"{}"[..])]);
        // Empty shared parts: every draft is its own fill (how 2.x drafts map onto 3.x).
        let d = Drafts::new(ids(), template(b"", &[0, 0], b"{1}{22}", &[3, 7]), LIMIT).unwrap();
        assert_eq!(pairs(&d), [("alice", &b"{1}"[..]), ("bob", &b"{22}"[..])]);
        // No clients: no drafts.
        let d = Drafts::new(ClientIds::new(), template(b"{}", &[1, 2], b"", &[]), LIMIT).unwrap();
        assert!(d.is_empty());
    }

    #[test]
    fn a_result_that_breaks_the_contract_is_refused() {
        let ids = || ["alice", "bob"].into_iter().collect::<ClientIds>();
        let new = |t| Drafts::new(ids(), t, LIMIT);
        assert_eq!(new(template(b"", &[], b"", &[])), Err(BadDrafts::NoParts));
        assert_eq!(
            new(template(b"{}", &[1, 2], b"1", &[1])),
            Err(BadDrafts::Count {
                clients: 2,
                slots: 1,
                got: 1
            })
        );
        assert_eq!(
            new(template(b"{}", &[1, 2], b"12", &[2, 1])),
            Err(BadDrafts::OutOfOrder {
                buffer: "fills",
                index: 1,
                end: 1,
                previous: 2
            })
        );
        assert_eq!(
            new(template(b"{}", &[2, 1], b"12", &[1, 2])),
            Err(BadDrafts::OutOfOrder {
                buffer: "shared",
                index: 1,
                end: 1,
                previous: 2
            })
        );
        assert_eq!(
            new(template(b"{}", &[1, 3], b"12", &[1, 2])),
            Err(BadDrafts::Length {
                buffer: "shared",
                end: 3,
                len: 2
            })
        );
        assert_eq!(
            new(template(b"{}", &[1, 2], b"123", &[1, 2])),
            Err(BadDrafts::Length {
                buffer: "fills",
                end: 2,
                len: 3
            })
        );
    }

    #[test]
    fn stored_drafts_decode_to_the_same_drafts() {
        let ids: ClientIds = ["alice", "bob", "ё"].into_iter().collect();
        let t = template(
            br#"{"a":,"b":}"#,
            &[5, 10, 11],
            b"1xx222yzz",
            &[1, 3, 6, 7, 8, 9],
        );
        let d = Drafts::new(ids, t, LIMIT).unwrap();
        let stored = Drafts::decode(&d.encode()).unwrap();
        let want: Vec<(Vec<u8>, Vec<u8>)> = d
            .iter()
            .map(|d| (d.client_id.as_bytes().to_vec(), d.payload.to_vec()))
            .collect();
        assert_eq!(stored, want);
        assert_eq!(stored[2].1, br#"{"a":z,"b":z}"#);
    }

    #[test]
    fn fills_that_are_the_client_ids_are_stored_once() {
        let ids: ClientIds = ["alice", "", "bob"].into_iter().collect();
        let t = template(br#"{"id":""}"#, &[7, 9], b"alicebob", &[5, 5, 8]);
        let d = Drafts::new(ids.clone(), t, LIMIT).unwrap();
        let e = d.encode();
        assert_eq!(e[0], ENCODING_FILLS_ARE_IDS);
        // Format byte, the ids (4 + 4 + 3 x 4 + 8), the shared parts (4 + 4 + 2 x 4 + 9).
        assert_eq!(e.len(), 1 + 28 + 25);
        let stored = Drafts::decode(&e).unwrap();
        let want: Vec<(Vec<u8>, Vec<u8>)> = d
            .iter()
            .map(|d| (d.client_id.as_bytes().to_vec(), d.payload.to_vec()))
            .collect();
        assert_eq!(stored, want);
        assert_eq!(stored[2].1, br#"{"id":"bob"}"#);
        // Fills that differ from the ids by one byte are stored as they are.
        let t = template(br#"{"id":""}"#, &[7, 9], b"alicebox", &[5, 5, 8]);
        let d = Drafts::new(ids, t, LIMIT).unwrap();
        let e = d.encode();
        assert_eq!(e[0], ENCODING_FORMAT);
        assert_eq!(Drafts::decode(&e).unwrap()[2].1, br#"{"id":"box"}"#);
    }

    #[test]
    fn damaged_stored_drafts_are_refused() {
        let ids: ClientIds = ["alice", "bob"].into_iter().collect();
        let t = template(br#"{"a":}"#, &[5, 6], b"12", &[1, 2]);
        let e = Drafts::new(ids, t, LIMIT).unwrap().encode();
        assert_eq!(Drafts::decode(&[]), Err(BadEncoding::Truncated));
        let mut other = e.clone();
        other[0] = 9;
        assert_eq!(Drafts::decode(&other), Err(BadEncoding::Format(9)));
        for cut in [1, 10, e.len() - 1] {
            assert_eq!(
                Drafts::decode(&e[..cut]),
                Err(BadEncoding::Truncated),
                "{cut}"
            );
        }
        let mut longer = e.clone();
        longer.push(0);
        assert_eq!(Drafts::decode(&longer), Err(BadEncoding::Truncated));
        // The fills' first end (after the format byte, the ids' 4 + 4 + 2 x 4 + 8 bytes, the
        // shared parts' 4 + 4 + 2 x 4 + 6 bytes, and the fills' count and length) past its
        // buffer.
        let at = 1 + 24 + 22 + 8;
        let mut bad = e.clone();
        bad[at..at + 4].copy_from_slice(&7u32.to_le_bytes());
        assert!(matches!(
            Drafts::decode(&bad),
            Err(BadEncoding::Template(BadDrafts::OutOfOrder { .. }))
        ));
    }

    #[test]
    fn a_template_that_would_render_past_the_limit_is_refused() {
        let ids: ClientIds = (0..1000).map(|i| i.to_string()).collect();
        let shared = vec![b' '; 2048];
        let t = template(&shared, &[1024, 2048], b"", &[0; 1000]);
        assert_eq!(
            Drafts::new(ids, t, LIMIT),
            Err(BadDrafts::TooLarge {
                bytes: 2048 * 1000,
                limit: LIMIT
            })
        );
    }
}
