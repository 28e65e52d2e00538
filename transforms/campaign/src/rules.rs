//! The campaign rules themselves, free of any WIT glue: validation of a raw payload, the
//! "active now" decision and the shaping of notification drafts. Kept plain Rust so the same
//! code runs as the WASM component (through `lib.rs`) and natively (for the overhead benchmark).

use serde_json::{Map, Value};

/// A campaign that passed validation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Campaign {
    pub restaurant_id: String,
    pub adv_campaign_id: String,
    pub adv_campaign_content: String,
    pub adv_campaign_owner: String,
    pub adv_campaign_owner_contact: String,
    pub adv_campaign_datetime_start: i64,
    pub adv_campaign_datetime_end: i64,
    pub datetime_created: i64,
}

/// Machine-readable reason for refusing a payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Code {
    NotUtf8,
    MalformedJson,
    NotAnObject,
    MissingField,
    WrongType,
    InvalidUuid,
    InvalidInterval,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    pub code: Code,
    pub field: Option<String>,
    pub detail: String,
}

impl Rejection {
    fn new(code: Code, field: Option<&str>, detail: String) -> Self {
        Rejection {
            code,
            field: field.map(str::to_owned),
            detail,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activity {
    Active,
    NotStarted,
    Expired,
}

/// The "active now" rule: a campaign produces drafts only while start < now < end.
pub fn activity(c: &Campaign, now: i64) -> Activity {
    if now <= c.adv_campaign_datetime_start {
        Activity::NotStarted
    } else if now >= c.adv_campaign_datetime_end {
        Activity::Expired
    } else {
        Activity::Active
    }
}

/// When a campaign may be delivered, in unix seconds: `opens` is the first instant at which
/// [`activity`] says active, `closes` the first at or after `opens` at which it says expired.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    pub opens: i64,
    pub closes: i64,
}

/// The window of the "active now" rule: active is start < now < end in whole seconds, so it
/// opens one second after the start and closes at the end (never before it opens).
pub fn window(c: &Campaign) -> Window {
    let opens = c.adv_campaign_datetime_start.saturating_add(1);
    Window {
        opens,
        closes: c.adv_campaign_datetime_end.max(opens),
    }
}

/// Validates one raw payload: UTF-8, a JSON object, every field present with its type, ids
/// that are hyphenated UUIDs, start strictly before end. Unknown extra fields are ignored.
pub fn validate(payload: &[u8]) -> Result<Campaign, Rejection> {
    let text = std::str::from_utf8(payload).map_err(|e| {
        Rejection::new(
            Code::NotUtf8,
            None,
            format!("payload is not valid UTF-8: {e}"),
        )
    })?;
    let value: Value = serde_json::from_str(text).map_err(|e| {
        Rejection::new(
            Code::MalformedJson,
            None,
            format!("payload is not valid JSON: {e}"),
        )
    })?;
    let Value::Object(obj) = value else {
        return Err(Rejection::new(
            Code::NotAnObject,
            None,
            format!("payload is JSON but not an object (it is {})", kind(&value)),
        ));
    };
    let campaign = Campaign {
        restaurant_id: uuid_field(&obj, "restaurant_id")?,
        adv_campaign_id: uuid_field(&obj, "adv_campaign_id")?,
        adv_campaign_content: string_field(&obj, "adv_campaign_content")?,
        adv_campaign_owner: string_field(&obj, "adv_campaign_owner")?,
        adv_campaign_owner_contact: string_field(&obj, "adv_campaign_owner_contact")?,
        adv_campaign_datetime_start: seconds_field(&obj, "adv_campaign_datetime_start")?,
        adv_campaign_datetime_end: seconds_field(&obj, "adv_campaign_datetime_end")?,
        datetime_created: seconds_field(&obj, "datetime_created")?,
    };
    if campaign.adv_campaign_datetime_start >= campaign.adv_campaign_datetime_end {
        return Err(Rejection::new(
            Code::InvalidInterval,
            Some("adv_campaign_datetime_start"),
            format!(
                "campaign must start before it ends: start {} >= end {}",
                campaign.adv_campaign_datetime_start, campaign.adv_campaign_datetime_end
            ),
        ));
    }
    Ok(campaign)
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn present<'a>(obj: &'a Map<String, Value>, name: &str) -> Result<&'a Value, Rejection> {
    match obj.get(name) {
        None | Some(Value::Null) => Err(Rejection::new(
            Code::MissingField,
            Some(name),
            format!("required field `{name}` is missing"),
        )),
        Some(v) => Ok(v),
    }
}

fn string_field(obj: &Map<String, Value>, name: &str) -> Result<String, Rejection> {
    match present(obj, name)? {
        Value::String(s) => Ok(s.clone()),
        other => Err(Rejection::new(
            Code::WrongType,
            Some(name),
            format!("field `{name}` must be a string, found {}", kind(other)),
        )),
    }
}

fn uuid_field(obj: &Map<String, Value>, name: &str) -> Result<String, Rejection> {
    let s = string_field(obj, name)?;
    // The hyphenated form only (8-4-4-4-12): ids are join keys and must match the table's text.
    if s.len() == 36 && uuid::Uuid::try_parse(&s).is_ok() {
        Ok(s)
    } else {
        Err(Rejection::new(
            Code::InvalidUuid,
            Some(name),
            format!("field `{name}` must be a hyphenated UUID, found {s:?}"),
        ))
    }
}

fn seconds_field(obj: &Map<String, Value>, name: &str) -> Result<i64, Rejection> {
    let v = present(obj, name)?;
    v.as_i64().ok_or_else(|| {
        Rejection::new(
            Code::WrongType,
            Some(name),
            format!("field `{name}` must be an integer of unix seconds, found {v}"),
        )
    })
}

/// The drafts of one campaign as a template, as they cross the WIT boundary (3.x `drafts`):
/// the parts every draft shares, rendered once, and each client's fills for the slots between
/// them. With k slots (`shared_ends.len() - 1`), draft i is
/// `part 0 ++ fill(i, 0) ++ part 1 ++ … ++ fill(i, k - 1) ++ part k`. Both buffers are packed
/// (one buffer plus end offsets), fills client by client. Draft i is for client i, in the order
/// the clients came.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Shaped {
    pub shared: Vec<u8>,
    pub shared_ends: Vec<u32>,
    pub fills: Vec<u8>,
    pub fill_ends: Vec<u32>,
}

impl Shaped {
    /// The number of slots (k): fills per draft.
    pub fn slots(&self) -> usize {
        self.shared_ends.len().saturating_sub(1)
    }

    /// The number of drafts, when there is at least one slot (otherwise every draft is the
    /// same and their number is the caller's).
    pub fn len(&self) -> usize {
        self.fill_ends.len().checked_div(self.slots()).unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Every draft's payload, in order, rendered from the template (what a host does).
    pub fn iter(&self) -> impl ExactSizeIterator<Item = Vec<u8>> + '_ {
        let parts: Vec<&[u8]> = unpack(&self.shared, &self.shared_ends).collect();
        let fills: Vec<&[u8]> = unpack(&self.fills, &self.fill_ends).collect();
        let k = self.slots();
        (0..self.len()).map(move |i| {
            let mut draft = parts[0].to_vec();
            for j in 0..k {
                draft.extend_from_slice(fills[i * k + j]);
                draft.extend_from_slice(parts[j + 1]);
            }
            draft
        })
    }
}

/// Splits items packed as one buffer plus end offsets (as [`Shaped`] holds drafts and as the
/// host passes client ids) back into slices, in order.
///
/// # Panics
/// When an end offset is before the previous one or past the buffer, or the last one is not
/// the buffer's length: the packing is the caller's promise.
pub fn unpack<'a>(bytes: &'a [u8], ends: &'a [u32]) -> impl ExactSizeIterator<Item = &'a [u8]> {
    ranges(bytes.len(), ends).map(move |r| &bytes[r])
}

/// [`unpack`] for text: client ids as the host passes them to `shape`. The buffer is checked
/// to be UTF-8 once, as a whole; then each id only has to start and end on a character.
///
/// # Panics
/// As [`unpack`], and when the buffer is not valid UTF-8 or an offset splits a character.
pub fn unpack_str<'a>(bytes: &'a [u8], ends: &'a [u32]) -> impl ExactSizeIterator<Item = &'a str> {
    let text = std::str::from_utf8(bytes).expect("packed client ids must be valid UTF-8");
    ranges(text.len(), ends).map(move |r| {
        text.get(r)
            .expect("packed client ids must be valid UTF-8 (an end offset splits a character)")
    })
}

/// The byte range of each packed item, checked to be in order and within `len`.
fn ranges(len: usize, ends: &[u32]) -> impl ExactSizeIterator<Item = std::ops::Range<usize>> + '_ {
    let last = ends.last().map_or(0, |&e| e as usize);
    assert_eq!(
        last, len,
        "packed items: the last end offset must be the buffer's length"
    );
    let mut start = 0;
    ends.iter().map(move |&end| {
        let end = end as usize;
        assert!(
            start <= end,
            "packed items: end offsets must not go backwards"
        );
        let item = start..end;
        start = end;
        item
    })
}

/// Shapes the output JSON of SPEC.md, exactly its fields in its order, once per client, as a
/// template with one slot, the `client_id` value: the part before it and the part after it are
/// the same for every client, so they are rendered once, and each client adds only its id.
///
/// The clients come packed, as the host passes them (`client_ids`, `client_ends`). When no id
/// needs a JSON escape (hyphenated UUIDs never do), the string's quotes go into the shared
/// parts and the fills *are* the packed ids, handed back without a per-client step: the whole
/// buffer is checked once, a word at a time. Otherwise each id is written as a JSON string.
///
/// # Panics
/// When the packing breaks the contract (see [`unpack_str`]), or the parts exceed 4 GiB (their
/// end offsets are `u32`, as in the WIT).
pub fn shape(c: &Campaign, client_ids: Vec<u8>, client_ends: Vec<u32>, now: i64) -> Shaped {
    check_packed_str(&client_ids, &client_ends);
    let verbatim = !needs_escape(&client_ids);
    let mut shared = Vec::with_capacity(320 + c.adv_campaign_content.len());
    shared.extend_from_slice(b"{\"restaurant_id\":");
    push_json_str(&mut shared, &c.restaurant_id);
    shared.extend_from_slice(b",\"adv_campaign_id\":");
    push_json_str(&mut shared, &c.adv_campaign_id);
    shared.extend_from_slice(b",\"adv_campaign_content\":");
    push_json_str(&mut shared, &c.adv_campaign_content);
    shared.extend_from_slice(b",\"adv_campaign_owner\":");
    push_json_str(&mut shared, &c.adv_campaign_owner);
    shared.extend_from_slice(b",\"adv_campaign_owner_contact\":");
    push_json_str(&mut shared, &c.adv_campaign_owner_contact);
    shared.extend_from_slice(
        format!(
            ",\"adv_campaign_datetime_start\":{},\"adv_campaign_datetime_end\":{},\"client_id\":",
            c.adv_campaign_datetime_start, c.adv_campaign_datetime_end
        )
        .as_bytes(),
    );
    let quote: &[u8] = if verbatim { b"\"" } else { b"" };
    shared.extend_from_slice(quote);
    let head_end = offset(shared.len());
    shared.extend_from_slice(quote);
    shared.extend_from_slice(
        format!(
            ",\"datetime_created\":{},\"trigger_datetime_created\":{}}}",
            c.datetime_created, now
        )
        .as_bytes(),
    );
    let shared_ends = vec![head_end, offset(shared.len())];
    let (fills, fill_ends) = if verbatim {
        (client_ids, client_ends)
    } else {
        let mut fills = Vec::with_capacity(client_ids.len() + 2 * client_ends.len());
        let mut fill_ends = Vec::with_capacity(client_ends.len());
        for client in unpack_str(&client_ids, &client_ends) {
            push_json_str(&mut fills, client);
            fill_ends.push(offset(fills.len()));
        }
        (fills, fill_ends)
    };
    Shaped {
        shared,
        shared_ends,
        fills,
        fill_ends,
    }
}

/// Checks packed text the way [`unpack_str`] does, without splitting it: valid UTF-8, end
/// offsets in order, on character boundaries, the last one at the buffer's end.
///
/// # Panics
/// As [`unpack_str`].
fn check_packed_str(bytes: &[u8], ends: &[u32]) {
    let text = std::str::from_utf8(bytes).expect("packed client ids must be valid UTF-8");
    for r in ranges(text.len(), ends) {
        assert!(
            text.is_char_boundary(r.end),
            "packed client ids must be valid UTF-8 (an end offset splits a character)"
        );
    }
}

fn offset(len: usize) -> u32 {
    u32::try_from(len).expect("shaped drafts exceed 4 GiB")
}

/// Appends `s` as a JSON string, byte for byte as serde_json writes it. Text that needs no
/// escaping (ids, most content) is checked a word at a time and copied in one piece; anything
/// else goes through serde_json. (serde_json's own loop looks every byte up in a table: with
/// the per-draft allocations gone it was the largest cost of `shape`, natively and in WASM.)
fn push_json_str(buf: &mut Vec<u8>, s: &str) {
    if needs_escape(s.as_bytes()) {
        // Writing into a Vec cannot fail.
        serde_json::to_writer(&mut *buf, s).expect("writing JSON to a Vec never fails");
    } else {
        buf.reserve(s.len() + 2);
        buf.push(b'"');
        buf.extend_from_slice(s.as_bytes());
        buf.push(b'"');
    }
}

/// Whether JSON needs any byte of `s` escaped: a control character (below 0x20), `"` or `\`.
/// Eight bytes at a time, with plain integer arithmetic (no SIMD: the same in WASM). Exact,
/// not a heuristic: each word test is non-zero exactly when some byte of the word matches.
fn needs_escape(s: &[u8]) -> bool {
    const ONES: u64 = u64::from_ne_bytes([0x01; 8]);
    const HIGHS: u64 = u64::from_ne_bytes([0x80; 8]);
    // Non-zero exactly when some byte of `v` is below `n` (n <= 0x80).
    let has_below = |v: u64, n: u8| v.wrapping_sub(ONES * n as u64) & !v & HIGHS;
    let has_byte = |v: u64, b: u8| has_below(v ^ (ONES * b as u64), 1);
    let mut words = s.chunks_exact(8);
    for w in &mut words {
        let v = u64::from_ne_bytes(w.try_into().expect("chunks of 8"));
        if has_below(v, 0x20) | has_byte(v, b'"') | has_byte(v, b'\\') != 0 {
            return true;
        }
    }
    words
        .remainder()
        .iter()
        .any(|&b| b < 0x20 || b == b'"' || b == b'\\')
}

#[cfg(test)]
mod tests {
    //! Native checks of the pure logic; the faithful tests run the built component under
    //! wasmtime (transforms/campaign/tests/component.rs).
    use super::*;

    #[test]
    fn shaped_json_round_trips_with_escapes() {
        let c = Campaign {
            restaurant_id: "r".into(),
            adv_campaign_id: "a".into(),
            adv_campaign_content: "quote \" and \\ and \n newline".into(),
            adv_campaign_owner: "o".into(),
            adv_campaign_owner_contact: "e".into(),
            adv_campaign_datetime_start: 1,
            adv_campaign_datetime_end: 3,
            datetime_created: 0,
        };
        let out = shape_all(&c, &["x\"y", "plain"], 2);
        assert_eq!(out.len(), 2);
        let drafts: Vec<Value> = out
            .iter()
            .map(|p| serde_json::from_slice(&p).unwrap())
            .collect();
        let v = &drafts[0];
        assert_eq!(v["adv_campaign_content"], "quote \" and \\ and \n newline");
        assert_eq!(v["client_id"], "x\"y");
        assert_eq!(v["trigger_datetime_created"], 2);
        assert_eq!(drafts[1]["client_id"], "plain");
    }

    #[test]
    fn only_the_client_id_is_per_client() {
        let out = shape_all(&campaign(), &["x\"y", "plain"], 2);
        assert_eq!(out.slots(), 1);
        assert_eq!(out.fills, br#""x\"y""plain""#);
        assert_eq!(out.fill_ends, [6, 13]);
        let parts: Vec<&[u8]> = unpack(&out.shared, &out.shared_ends).collect();
        assert!(parts[0].ends_with(br#","client_id":"#));
        assert_eq!(
            parts[1],
            br#","datetime_created":0,"trigger_datetime_created":2}"#
        );
    }

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

    /// `shape` for ids packed the way the host packs them.
    fn shape_all(c: &Campaign, ids: &[&str], now: i64) -> Shaped {
        let mut ends = Vec::new();
        let mut bytes = Vec::new();
        for id in ids {
            bytes.extend_from_slice(id.as_bytes());
            ends.push(bytes.len() as u32);
        }
        shape(c, bytes, ends, now)
    }

    #[test]
    fn the_window_agrees_with_the_activity() {
        let at = |start: i64, end: i64| Campaign {
            adv_campaign_datetime_start: start,
            adv_campaign_datetime_end: end,
            ..campaign()
        };
        for (start, end) in [
            (1000, 2000),
            (1000, 1002),
            (-5, 5),
            (i64::MIN, i64::MAX),
            (i64::MAX - 2, i64::MAX),
        ] {
            let c = at(start, end);
            let w = window(&c);
            assert_eq!(
                w,
                Window {
                    opens: start + 1,
                    closes: end
                }
            );
            assert_eq!(activity(&c, w.opens - 1), Activity::NotStarted, "{w:?}");
            assert_eq!(activity(&c, w.opens), Activity::Active, "{w:?}");
            assert_eq!(activity(&c, w.closes - 1), Activity::Active, "{w:?}");
            assert_eq!(activity(&c, w.closes), Activity::Expired, "{w:?}");
        }
        // A one-second campaign has no whole second inside: an empty window.
        let c = at(1000, 1001);
        let w = window(&c);
        assert_eq!(
            w,
            Window {
                opens: 1001,
                closes: 1001
            }
        );
        assert_eq!(activity(&c, w.opens), Activity::Expired);
    }

    #[test]
    fn plain_ids_are_handed_back_as_the_fills() {
        let ids = ["023e4567-e89b-12d3-a456-426614174000", "", "борщ"];
        let out = shape_all(&campaign(), &ids, 2);
        assert_eq!(out.fills, ids.concat().as_bytes());
        assert_eq!(out.fill_ends, [36, 36, 44]);
        let parts: Vec<&[u8]> = unpack(&out.shared, &out.shared_ends).collect();
        assert!(parts[0].ends_with(br#","client_id":""#));
        assert_eq!(
            parts[1],
            br#"","datetime_created":0,"trigger_datetime_created":2}"#
        );
        let drafts: Vec<Value> = out
            .iter()
            .map(|p| serde_json::from_slice(&p).unwrap())
            .collect();
        for (draft, id) in drafts.iter().zip(ids) {
            assert_eq!(draft["client_id"], id);
        }
    }

    #[test]
    fn both_ways_render_the_same_drafts() {
        // The same plain ids, alone (handed back as they are) and next to one that needs
        // escaping (every id written as a JSON string): byte for byte the same drafts.
        let plain = ["a1", "", "b2-\u{e9}"];
        let verbatim: Vec<Vec<u8>> = shape_all(&campaign(), &plain, 2).iter().collect();
        let mut mixed = plain.to_vec();
        mixed.push("tab\t");
        let escaped: Vec<Vec<u8>> = shape_all(&campaign(), &mixed, 2).iter().collect();
        assert_eq!(verbatim, escaped[..plain.len()]);
        let spec: Value = serde_json::from_slice(&escaped[3]).unwrap();
        assert_eq!(spec["client_id"], "tab\t");
    }

    #[test]
    #[should_panic(expected = "splits a character")]
    fn shape_refuses_an_offset_inside_a_character() {
        let _ = shape(&campaign(), "é".as_bytes().to_vec(), vec![1, 2], 2);
    }

    #[test]
    #[should_panic(expected = "backwards")]
    fn shape_refuses_offsets_out_of_order() {
        let _ = shape(&campaign(), b"abc".to_vec(), vec![2, 1, 3], 2);
    }

    #[test]
    fn unpack_splits_at_the_end_offsets() {
        let items: Vec<&str> = unpack_str(b"abcdef", &[1, 1, 4, 6]).collect();
        assert_eq!(items, ["a", "", "bcd", "ef"]);
        assert_eq!(unpack(b"", &[]).len(), 0);
    }

    #[test]
    #[should_panic(expected = "last end offset")]
    fn unpack_refuses_a_short_last_offset() {
        let _ = unpack(b"abc", &[2]);
    }

    #[test]
    #[should_panic(expected = "backwards")]
    fn unpack_refuses_offsets_out_of_order() {
        let _ = unpack(b"abc", &[2, 1, 3]).count();
    }

    #[test]
    #[should_panic(expected = "UTF-8")]
    fn unpack_str_refuses_invalid_utf8() {
        let _ = unpack_str(&[0xff], &[1]).count();
    }

    #[test]
    fn json_strings_are_exactly_serde_jsons() {
        let serde = |s: &str| serde_json::to_vec(s).unwrap();
        let mine = |s: &str| {
            let mut b = Vec::new();
            push_json_str(&mut b, s);
            b
        };
        // Every byte value alone and at every position of a word (ASCII; and non-ASCII text).
        for c in (0u32..0x80).chain([0xe9, 0x451, 0x1f372]) {
            let c = char::from_u32(c).unwrap();
            for pos in 0..17 {
                let mut s = "a".repeat(pos);
                s.push(c);
                s.push_str("bcdefgh");
                assert_eq!(mine(&s), serde(&s), "{s:?}");
            }
        }
        for s in [
            "",
            "023e4567-e89b-12d3-a456-426614174000",
            "70% off \"борщ\" \\ 🍲\n\t\u{7f}",
        ] {
            assert_eq!(mine(s), serde(s), "{s:?}");
        }
    }
}
