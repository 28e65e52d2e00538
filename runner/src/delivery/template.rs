//! Records that share most of their bytes, kept as a template: the parts every record shares,
//! once, plus each record's fills for the slots between them, and each record's key. A rules
//! component hands its output over this way (only what differs per record crosses the sandbox
//! boundary), the host checks it once and renders the records natively, and the outbox stores
//! the template ([`TemplateRecords::encode`], about a tenth of the rendered bytes) rather than
//! every record in full.

/// Text items packed as one buffer plus where each item ends (how keys cross the WIT boundary:
/// `client-ids` and `client-ends` in the campaign contract).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PackedKeys {
    text: String,
    ends: Vec<u32>,
}

impl PackedKeys {
    pub fn new() -> Self {
        PackedKeys::default()
    }

    /// Room for `keys` keys of `bytes` bytes in all.
    pub fn with_capacity(keys: usize, bytes: usize) -> Self {
        PackedKeys {
            text: String::with_capacity(bytes),
            ends: Vec::with_capacity(keys),
        }
    }

    /// Packs `keys`, in order, into buffers sized for them.
    pub fn packed<S: AsRef<str>>(keys: &[S]) -> Self {
        let bytes = keys.iter().map(|c| c.as_ref().len()).sum();
        let mut packed = PackedKeys::with_capacity(keys.len(), bytes);
        for key in keys {
            packed.push(key.as_ref());
        }
        packed
    }

    /// Appends one key.
    ///
    /// # Panics
    /// Past 4 GiB of keys in all: offsets are `u32` in the WIT (and a guest's memory is smaller).
    pub fn push(&mut self, key: &str) {
        self.text.push_str(key);
        let end = u32::try_from(self.text.len()).expect("keys exceed 4 GiB");
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
        // Every key was pushed whole, so its bounds are in order and on char boundaries.
        Some(&self.text[start(&self.ends, i)..end])
    }

    pub fn iter(&self) -> impl ExactSizeIterator<Item = &str> + '_ {
        (0..self.len()).map(|i| self.get(i).expect("index below len"))
    }

    /// The keys concatenated.
    pub fn bytes(&self) -> &[u8] {
        self.text.as_bytes()
    }

    /// Where each key ends in [`PackedKeys::bytes`].
    pub fn ends(&self) -> &[u32] {
        &self.ends
    }
}

impl<S: AsRef<str>> FromIterator<S> for PackedKeys {
    fn from_iter<I: IntoIterator<Item = S>>(iter: I) -> Self {
        let mut keys = PackedKeys::new();
        for key in iter {
            keys.push(key.as_ref());
        }
        keys
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

/// How a template breaks its contract (one record per key, in order, offsets within their
/// buffers), or would render past the host's limit. Whoever made it is at fault (for a rules
/// component: `rules_bad_output`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BadTemplate {
    #[error("the template has no shared parts (a template has at least one)")]
    NoParts,
    #[error("the template has {got} fills for {records} records with {slots} slots each")]
    Count {
        records: usize,
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
    #[error("the records would take {bytes} bytes, past the memory limit of {limit} bytes")]
    TooLarge { bytes: u64, limit: usize },
    #[error(
        "{buffer}: {count} items, past the {} a stored template counts",
        u32::MAX
    )]
    TooMany { buffer: &'static str, count: usize },
}

/// Checks that a list of `count` items can be stored: [`TemplateRecords::encode`] writes
/// every count, length and offset as a `u32`.
fn check_count(buffer: &'static str, count: usize) -> Result<(), BadTemplate> {
    if u32::try_from(count).is_err() {
        return Err(BadTemplate::TooMany { buffer, count });
    }
    Ok(())
}

/// Checks that `ends` packs `len` bytes: in order, the last one at the end (none for 0 bytes).
fn check_packed(buffer: &'static str, len: usize, ends: &[u32]) -> Result<(), BadTemplate> {
    let mut previous = 0;
    for (index, &end) in ends.iter().enumerate() {
        if end < previous {
            return Err(BadTemplate::OutOfOrder {
                buffer,
                index,
                end,
                previous,
            });
        }
        previous = end;
    }
    if previous as usize != len {
        return Err(BadTemplate::Length {
            buffer,
            end: previous as usize,
            len,
        });
    }
    Ok(())
}

/// The parts every record shares and each record's fills, checked: record i is
/// `part 0 ++ fill(i, 0) ++ part 1 ++ … ++ fill(i, k - 1) ++ part k`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    shared: Vec<u8>,
    shared_ends: Vec<u32>,
    fills: Vec<u8>,
    fill_ends: Vec<u32>,
}

impl Template {
    /// Checks the template against `records` records and `limit` bytes of rendered records.
    pub fn checked(
        shared: Vec<u8>,
        shared_ends: Vec<u32>,
        fills: Vec<u8>,
        fill_ends: Vec<u32>,
        records: usize,
        limit: usize,
    ) -> Result<Template, BadTemplate> {
        if shared_ends.is_empty() {
            return Err(BadTemplate::NoParts);
        }
        check_count("keys", records)?;
        check_count("shared", shared_ends.len())?;
        check_count("fills", fill_ends.len())?;
        check_packed("shared", shared.len(), &shared_ends)?;
        check_packed("fills", fills.len(), &fill_ends)?;
        let slots = shared_ends.len() - 1;
        if fill_ends.len() != records * slots {
            return Err(BadTemplate::Count {
                records,
                slots,
                got: fill_ends.len(),
            });
        }
        let bytes = (records as u64)
            .saturating_mul(shared.len() as u64)
            .saturating_add(fills.len() as u64);
        if bytes > limit as u64 {
            return Err(BadTemplate::TooLarge { bytes, limit });
        }
        Ok(Template {
            shared,
            shared_ends,
            fills,
            fill_ends,
        })
    }

    /// The records (as many as checked), packed, and where each one ends.
    fn render(&self, records: usize) -> (Vec<u8>, Vec<usize>) {
        let slots = self.shared_ends.len() - 1;
        let part =
            |j: usize| &self.shared[start(&self.shared_ends, j)..self.shared_ends[j] as usize];
        let fill = |f: usize| &self.fills[start(&self.fill_ends, f)..self.fill_ends[f] as usize];
        let mut payloads = Vec::with_capacity(records * self.shared.len() + self.fills.len());
        let mut payload_ends = Vec::with_capacity(records);
        for i in 0..records {
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

/// Records rendered from a template, each with its key: record i is keyed by key i.
#[derive(Debug, Clone, PartialEq)]
pub struct TemplateRecords {
    keys: PackedKeys,
    template: Template,
    payloads: Vec<u8>,
    payload_ends: Vec<usize>,
}

/// Why stored records ([`TemplateRecords::encode`]) cannot be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BadEncoding {
    #[error("stored drafts: unknown format {0}")]
    Format(u8),
    #[error("stored drafts: truncated")]
    Truncated,
    #[error("stored drafts: {0}")]
    Template(#[from] BadTemplate),
}

/// A record read back from its stored form: the key and the payload.
pub type StoredRecord = (Vec<u8>, Vec<u8>);

/// The format byte [`TemplateRecords::encode`] starts with: keys, shared parts, fills.
const ENCODING_FORMAT: u8 = 1;
/// The same without the fills: the template has one slot and its fills are the keys
/// themselves (what the campaign rules return when no client id needs a JSON escape).
const ENCODING_FILLS_ARE_KEYS: u8 = 2;

/// Appends a packed buffer: item count, byte length, the items' ends, the bytes (u32s
/// little-endian). Every one fits: the ends are `u32`s, the byte length is the last end, and
/// the count was checked when the template was made ([`check_count`]).
fn put_packed(out: &mut Vec<u8>, bytes: &[u8], ends: &[u32]) {
    let u32_of = |n: usize| u32::try_from(n).expect("a count or length checked to fit a u32");
    out.extend_from_slice(&u32_of(ends.len()).to_le_bytes());
    out.extend_from_slice(&u32_of(bytes.len()).to_le_bytes());
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

/// One record, borrowed from [`TemplateRecords`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Record<'a> {
    pub key: &'a str,
    pub payload: &'a [u8],
}

impl TemplateRecords {
    /// Checks `template` against `keys` (as many fills as keys times slots, every offset in
    /// order and within its buffer) and renders the records: `limit` bounds the bytes they take
    /// (a small template repeated for many keys must not become an unbounded allocation).
    pub fn new(
        keys: PackedKeys,
        shared: Vec<u8>,
        shared_ends: Vec<u32>,
        fills: Vec<u8>,
        fill_ends: Vec<u32>,
        limit: usize,
    ) -> Result<TemplateRecords, BadTemplate> {
        let template = Template::checked(shared, shared_ends, fills, fill_ends, keys.len(), limit)?;
        let (payloads, payload_ends) = template.render(keys.len());
        Ok(TemplateRecords {
            keys,
            template,
            payloads,
            payload_ends,
        })
    }

    /// The records as the outbox stores them: the keys and the template (a format byte, then
    /// three packed buffers: keys, shared parts, fills). About a tenth of the rendered records'
    /// bytes when there are many.
    pub fn encode(&self) -> Vec<u8> {
        let t = &self.template;
        let fills_are_keys = t.shared_ends.len() == 2
            && t.fill_ends == self.keys.ends()
            && t.fills == self.keys.bytes();
        let fills = if fills_are_keys {
            0
        } else {
            t.fills.len() + 4 * t.fill_ends.len()
        };
        let mut out = Vec::with_capacity(
            13 + self.keys.bytes().len()
                + t.shared.len()
                + fills
                + 4 * (self.keys.len() + t.shared_ends.len()),
        );
        if fills_are_keys {
            out.push(ENCODING_FILLS_ARE_KEYS);
        } else {
            out.push(ENCODING_FORMAT);
        }
        put_packed(&mut out, self.keys.bytes(), self.keys.ends());
        put_packed(&mut out, &t.shared, &t.shared_ends);
        if !fills_are_keys {
            put_packed(&mut out, &t.fills, &t.fill_ends);
        }
        out
    }

    /// Renders what [`TemplateRecords::encode`] stored: `(key, payload)` pairs, in order.
    pub fn decode(mut b: &[u8]) -> Result<Vec<StoredRecord>, BadEncoding> {
        let format = match b.split_first() {
            Some((&f @ (ENCODING_FORMAT | ENCODING_FILLS_ARE_KEYS), rest)) => {
                b = rest;
                f
            }
            Some((&f, _)) => return Err(BadEncoding::Format(f)),
            None => return Err(BadEncoding::Truncated),
        };
        let (keys, key_ends) = take_packed(&mut b)?;
        check_packed("keys", keys.len(), &key_ends)?;
        let (shared, shared_ends) = take_packed(&mut b)?;
        let (fills, fill_ends) = if format == ENCODING_FILLS_ARE_KEYS {
            (keys.clone(), key_ends.clone())
        } else {
            take_packed(&mut b)?
        };
        if !b.is_empty() {
            return Err(BadEncoding::Truncated);
        }
        let n = key_ends.len();
        let template = Template::checked(shared, shared_ends, fills, fill_ends, n, usize::MAX)?;
        let (payloads, payload_ends) = template.render(n);
        let mut from = 0;
        Ok((0..n)
            .map(|i| {
                let payload = payloads[from..payload_ends[i]].to_vec();
                from = payload_ends[i];
                (
                    keys[start(&key_ends, i)..key_ends[i] as usize].to_vec(),
                    payload,
                )
            })
            .collect())
    }

    pub fn len(&self) -> usize {
        self.payload_ends.len()
    }

    pub fn is_empty(&self) -> bool {
        self.payload_ends.is_empty()
    }

    /// Record `i`: for key `i`.
    pub fn get(&self, i: usize) -> Option<Record<'_>> {
        let end = *self.payload_ends.get(i)?;
        let start = if i == 0 { 0 } else { self.payload_ends[i - 1] };
        Some(Record {
            key: self.keys.get(i)?,
            // Rendered in `new`: the offsets are in order and within the buffer.
            payload: &self.payloads[start..end],
        })
    }

    /// The records in the order of the keys.
    pub fn iter(&self) -> impl ExactSizeIterator<Item = Record<'_>> + '_ {
        (0..self.len()).map(|i| self.get(i).expect("index below len"))
    }

    pub fn keys(&self) -> &PackedKeys {
        &self.keys
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMIT: usize = 1 << 20;

    fn records(
        keys: PackedKeys,
        shared: &[u8],
        shared_ends: &[u32],
        fills: &[u8],
        fill_ends: &[u32],
    ) -> Result<TemplateRecords, BadTemplate> {
        TemplateRecords::new(
            keys,
            shared.to_vec(),
            shared_ends.to_vec(),
            fills.to_vec(),
            fill_ends.to_vec(),
            LIMIT,
        )
    }

    fn pairs(d: &TemplateRecords) -> Vec<(&str, &[u8])> {
        d.iter().map(|d| (d.key, d.payload)).collect()
    }

    fn stored(d: &TemplateRecords) -> Vec<StoredRecord> {
        d.iter()
            .map(|d| (d.key.as_bytes().to_vec(), d.payload.to_vec()))
            .collect()
    }

    #[test]
    fn keys_pack_and_unpack() {
        let ids: PackedKeys = ["alice", "", "bob", "ё"].into_iter().collect();
        assert_eq!(ids.len(), 4);
        assert_eq!(ids.bytes(), "alicebobё".as_bytes());
        assert_eq!(ids.ends(), &[5, 5, 8, 10]);
        assert_eq!(ids.iter().collect::<Vec<_>>(), ["alice", "", "bob", "ё"]);
        assert_eq!(ids.get(4), None);
    }

    #[test]
    fn records_are_rendered_and_paired_with_their_keys() {
        let ids: PackedKeys = ["alice", "bob"].into_iter().collect();
        // Two slots: {"a":<fill 0>,"b":<fill 1>}
        let d = records(
            ids,
            br#"{"a":,"b":}"#,
            &[5, 10, 11],
            b"1xx222y",
            &[1, 3, 6, 7],
        )
        .unwrap();
        assert_eq!(d.len(), 2);
        assert_eq!(
            pairs(&d),
            [
                ("alice", &br#"{"a":1,"b":xx}"#[..]),
                ("bob", &br#"{"a":222,"b":y}"#[..])
            ]
        );
    }

    #[test]
    fn templates_without_slots_or_shared_parts_render_too() {
        let ids = || ["alice", "bob"].into_iter().collect::<PackedKeys>();
        // No slot: every record is the one shared part.
        let d = records(ids(), b"{}", &[2], b"", &[]).unwrap();
        assert_eq!(pairs(&d), [("alice", &b"{}"[..]), ("bob", &b"{}"[..])]);
        // Empty shared parts: every record is its own fill.
        let d = records(ids(), b"", &[0, 0], b"{1}{22}", &[3, 7]).unwrap();
        assert_eq!(pairs(&d), [("alice", &b"{1}"[..]), ("bob", &b"{22}"[..])]);
        // No keys: no records.
        let d = records(PackedKeys::new(), b"{}", &[1, 2], b"", &[]).unwrap();
        assert!(d.is_empty());
    }

    #[test]
    fn a_template_that_breaks_the_contract_is_refused() {
        let ids = || ["alice", "bob"].into_iter().collect::<PackedKeys>();
        let new = |s: &[u8], se: &[u32], f: &[u8], fe: &[u32]| records(ids(), s, se, f, fe);
        assert_eq!(new(b"", &[], b"", &[]), Err(BadTemplate::NoParts));
        assert_eq!(
            new(b"{}", &[1, 2], b"1", &[1]),
            Err(BadTemplate::Count {
                records: 2,
                slots: 1,
                got: 1
            })
        );
        assert_eq!(
            new(b"{}", &[1, 2], b"12", &[2, 1]),
            Err(BadTemplate::OutOfOrder {
                buffer: "fills",
                index: 1,
                end: 1,
                previous: 2
            })
        );
        assert_eq!(
            new(b"{}", &[2, 1], b"12", &[1, 2]),
            Err(BadTemplate::OutOfOrder {
                buffer: "shared",
                index: 1,
                end: 1,
                previous: 2
            })
        );
        assert_eq!(
            new(b"{}", &[1, 3], b"12", &[1, 2]),
            Err(BadTemplate::Length {
                buffer: "shared",
                end: 3,
                len: 2
            })
        );
        assert_eq!(
            new(b"{}", &[1, 2], b"123", &[1, 2]),
            Err(BadTemplate::Length {
                buffer: "fills",
                end: 2,
                len: 3
            })
        );
    }

    #[test]
    fn stored_records_decode_to_the_same_records() {
        let ids: PackedKeys = ["alice", "bob", "ё"].into_iter().collect();
        let d = records(
            ids,
            br#"{"a":,"b":}"#,
            &[5, 10, 11],
            b"1xx222yzz",
            &[1, 3, 6, 7, 8, 9],
        )
        .unwrap();
        let back = TemplateRecords::decode(&d.encode()).unwrap();
        assert_eq!(back, stored(&d));
        assert_eq!(back[2].1, br#"{"a":z,"b":z}"#);
    }

    #[test]
    fn fills_that_are_the_keys_are_stored_once() {
        let ids: PackedKeys = ["alice", "", "bob"].into_iter().collect();
        let d = records(
            ids.clone(),
            br#"{"id":""}"#,
            &[7, 9],
            b"alicebob",
            &[5, 5, 8],
        )
        .unwrap();
        let e = d.encode();
        assert_eq!(e[0], ENCODING_FILLS_ARE_KEYS);
        // Format byte, the keys (4 + 4 + 3 x 4 + 8), the shared parts (4 + 4 + 2 x 4 + 9).
        assert_eq!(e.len(), 1 + 28 + 25);
        let back = TemplateRecords::decode(&e).unwrap();
        assert_eq!(back, stored(&d));
        assert_eq!(back[2].1, br#"{"id":"bob"}"#);
        // Fills that differ from the keys by one byte are stored as they are.
        let d = records(ids, br#"{"id":""}"#, &[7, 9], b"alicebox", &[5, 5, 8]).unwrap();
        let e = d.encode();
        assert_eq!(e[0], ENCODING_FORMAT);
        assert_eq!(
            TemplateRecords::decode(&e).unwrap()[2].1,
            br#"{"id":"box"}"#
        );
    }

    #[test]
    fn damaged_stored_records_are_refused() {
        let ids: PackedKeys = ["alice", "bob"].into_iter().collect();
        let e = records(ids, br#"{"a":}"#, &[5, 6], b"12", &[1, 2])
            .unwrap()
            .encode();
        assert_eq!(TemplateRecords::decode(&[]), Err(BadEncoding::Truncated));
        let mut other = e.clone();
        other[0] = 9;
        assert_eq!(TemplateRecords::decode(&other), Err(BadEncoding::Format(9)));
        for cut in [1, 10, e.len() - 1] {
            assert_eq!(
                TemplateRecords::decode(&e[..cut]),
                Err(BadEncoding::Truncated),
                "{cut}"
            );
        }
        let mut longer = e.clone();
        longer.push(0);
        assert_eq!(
            TemplateRecords::decode(&longer),
            Err(BadEncoding::Truncated)
        );
        // The fills' first end (after the format byte, the keys' 4 + 4 + 2 x 4 + 8 bytes, the
        // shared parts' 4 + 4 + 2 x 4 + 6 bytes, and the fills' count and length) past its
        // buffer.
        let at = 1 + 24 + 22 + 8;
        let mut bad = e.clone();
        bad[at..at + 4].copy_from_slice(&7u32.to_le_bytes());
        assert!(matches!(
            TemplateRecords::decode(&bad),
            Err(BadEncoding::Template(BadTemplate::OutOfOrder { .. }))
        ));
    }

    #[test]
    fn a_template_that_would_render_past_the_limit_is_refused() {
        let ids: PackedKeys = (0..1000).map(|i| i.to_string()).collect();
        let shared = vec![b' '; 2048];
        assert_eq!(
            records(ids, &shared, &[1024, 2048], b"", &[0; 1000]),
            Err(BadTemplate::TooLarge {
                bytes: 2048 * 1000,
                limit: LIMIT
            })
        );
    }

    #[test]
    fn records_past_64_kib_round_trip() {
        // A draft of 100 KiB (its shared part), a key of 70,000 bytes, in both formats.
        let content = "x".repeat(100 * 1024);
        let shared = format!(r#"{{"content":"{content}","client_id":""}}"#);
        let slot = shared.len() as u32 - 2;
        let long_key = "k".repeat(70_000);
        let keys = || -> PackedKeys { ["a", long_key.as_str(), "b"].into_iter().collect() };
        let big = |fills: &[u8], fill_ends: &[u32]| {
            TemplateRecords::new(
                keys(),
                shared.as_bytes().to_vec(),
                vec![slot, shared.len() as u32],
                fills.to_vec(),
                fill_ends.to_vec(),
                1 << 30,
            )
            .unwrap()
        };
        let same = big(keys().bytes(), keys().ends());
        let e = same.encode();
        assert_eq!(e[0], ENCODING_FILLS_ARE_KEYS);
        let back = TemplateRecords::decode(&e).unwrap();
        assert_eq!(back, stored(&same));
        assert_eq!(back[1].0.len(), 70_000);
        assert_eq!(
            back[1].1,
            format!(r#"{{"content":"{content}","client_id":"{long_key}"}}"#).as_bytes()
        );
        let long_fill = "f".repeat(80_000);
        let fills = format!("1{long_fill}3");
        let other = big(fills.as_bytes(), &[1, 80_001, 80_002]);
        let e = other.encode();
        assert_eq!(e[0], ENCODING_FORMAT);
        let back = TemplateRecords::decode(&e).unwrap();
        assert_eq!(back, stored(&other));
        assert_eq!(back[1].1.len(), shared.len() + 80_000);
    }

    #[test]
    fn more_records_than_a_u16_counts_round_trip() {
        for n in [65_535usize, 65_536, 70_000] {
            let ids: PackedKeys = (0..n).map(|i| format!("c{i}")).collect();
            let d = records(
                ids.clone(),
                br#"{"id":""}"#,
                &[7, 9],
                ids.bytes(),
                ids.ends(),
            )
            .unwrap();
            let back = TemplateRecords::decode(&d.encode()).unwrap();
            assert_eq!(back.len(), n);
            assert_eq!(back, stored(&d));
            let fills: Vec<u8> = ids.bytes().iter().map(|b| b.to_ascii_uppercase()).collect();
            let d = records(ids, br#"{"id":""}"#, &[7, 9], &fills, d.keys().ends()).unwrap();
            assert_eq!(
                TemplateRecords::decode(&d.encode()).unwrap(),
                stored(&d),
                "{n}"
            );
        }
    }

    #[test]
    fn a_count_past_what_a_stored_template_holds_is_refused() {
        assert_eq!(check_count("keys", u32::MAX as usize), Ok(()));
        assert_eq!(
            check_count("fills", u32::MAX as usize + 1),
            Err(BadTemplate::TooMany {
                buffer: "fills",
                count: u32::MAX as usize + 1
            })
        );
    }

    use proptest::prelude::*;

    /// Keys, the template's shared parts, each record's fills, and whether the fills are the
    /// keys (the one-slot case stored without its fills).
    type Case = (Vec<String>, Vec<Vec<u8>>, Vec<Vec<u8>>, bool);

    fn template_case() -> impl Strategy<Value = Case> {
        let keys = proptest::collection::vec(".{0,6}", 0..6);
        let parts = proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..8), 1..4);
        (keys, parts, any::<bool>()).prop_flat_map(|(keys, parts, fills_are_keys)| {
            let n = keys.len() * (parts.len() - 1);
            let fills = proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..6), n);
            (Just(keys), Just(parts), fills, Just(fills_are_keys))
        })
    }

    fn packed(items: &[Vec<u8>]) -> (Vec<u8>, Vec<u32>) {
        let mut bytes = Vec::new();
        let ends = items
            .iter()
            .map(|i| {
                bytes.extend_from_slice(i);
                bytes.len() as u32
            })
            .collect();
        (bytes, ends)
    }

    proptest! {
        #[test]
        fn any_records_round_trip_through_their_stored_form(
            (keys, parts, fills, fills_are_keys) in template_case()
        ) {
            let ids: PackedKeys = keys.iter().collect();
            let (shared, shared_ends) = packed(&parts);
            let (fills, fill_ends) = if fills_are_keys && parts.len() == 2 {
                (ids.bytes().to_vec(), ids.ends().to_vec())
            } else {
                packed(&fills)
            };
            let d = TemplateRecords::new(ids, shared, shared_ends, fills, fill_ends, LIMIT).unwrap();
            prop_assert_eq!(TemplateRecords::decode(&d.encode()).unwrap(), stored(&d));
        }

        #[test]
        fn any_bytes_decode_or_are_refused_without_panicking(
            format in 0u8..4,
            b in proptest::collection::vec(any::<u8>(), 0..80),
        ) {
            let mut row = vec![format];
            row.extend_from_slice(&b);
            let _ = TemplateRecords::decode(&row);
        }
    }
}
