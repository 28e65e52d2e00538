//! Kafka record headers: the names the runner writes, building them for the producer, and the
//! compact form in which the outbox stores them.
//!
//! Every output record and dead letter carries where it came from (source topic, partition,
//! offset) and which rules made it (version, sha256); a pipeline adds its own (the campaign
//! pipeline: the subscriber snapshot and the campaign id); dead letters add the reason.

use rdkafka::message::{Header, OwnedHeaders};

pub const RULES_VERSION: &str = "rules-version";
pub const RULES_SHA256: &str = "rules-sha256";
pub const SOURCE_TOPIC: &str = "source-topic";
pub const SOURCE_PARTITION: &str = "source-partition";
pub const SOURCE_OFFSET: &str = "source-offset";
pub const DLQ_REASON: &str = "dlq-reason";
pub const DLQ_DETAIL: &str = "dlq-detail";
pub const DLQ_FIELD: &str = "dlq-field";

/// Headers as (name, value) pairs, in order.
pub type HeaderList = Vec<(String, Vec<u8>)>;

/// Builds producer headers from (name, value) pairs.
pub fn owned<'v>(pairs: impl IntoIterator<Item = (&'v str, &'v [u8])>) -> OwnedHeaders {
    pairs
        .into_iter()
        .fold(OwnedHeaders::new(), |h, (key, value)| {
            h.insert(Header {
                key,
                value: Some(value),
            })
        })
}

/// The first bytes of an outbox headers value in the current format: the count and every
/// length as an unsigned LEB128 varint (as Kafka's own record format has them), so that no
/// count or length is ever cut, whatever the number of headers or the size of a key or value.
///
/// Rows can also hold the fixed-width format ([`decode`] reads both): a count (u16), then per
/// header the key's length (u16), the key, the value's length (u32), the value, big-endian.
/// Read that way, these bytes say "65,535 headers, the first one's key is the single byte
/// 0xFF", which is not UTF-8: no row in the fixed-width format starts so, so the marker tells
/// the two formats apart, and a reader that knows only the fixed-width format refuses a row
/// in this one as damaged instead of misreading it. The last byte is the format's number.
const VARINT_FORMAT: [u8; 6] = [0xFF, 0xFF, 0x00, 0x01, 0xFF, 0x02];

/// Encodes headers for the outbox: [`VARINT_FORMAT`], the count, then per header the key's
/// length, the key, the value's length, the value (counts and lengths as varints).
pub fn encode(headers: &[(String, Vec<u8>)]) -> Vec<u8> {
    let bytes: usize = headers.iter().map(|(k, v)| k.len() + v.len() + 4).sum();
    let mut out = Vec::with_capacity(VARINT_FORMAT.len() + 10 + bytes);
    out.extend_from_slice(&VARINT_FORMAT);
    put_varint(&mut out, headers.len());
    for (k, v) in headers {
        put_varint(&mut out, k.len());
        out.extend_from_slice(k.as_bytes());
        put_varint(&mut out, v.len());
        out.extend_from_slice(v);
    }
    out
}

/// Decodes what [`encode`] wrote, or a row in the fixed-width format; None when it is damaged.
pub fn decode(b: &[u8]) -> Option<HeaderList> {
    match b.strip_prefix(&VARINT_FORMAT) {
        Some(rest) => decode_varint(rest),
        None => decode_fixed(b),
    }
}

/// Takes `n` bytes off the front of `b`.
fn take<'a>(b: &mut &'a [u8], n: usize) -> Option<&'a [u8]> {
    if b.len() < n {
        return None;
    }
    let (h, t) = b.split_at(n);
    *b = t;
    Some(h)
}

/// Appends `n` as an unsigned LEB128 varint: 7 bits a byte, least significant first, the high
/// bit set on every byte but the last.
fn put_varint(out: &mut Vec<u8>, n: usize) {
    let mut n = n as u64;
    while n >= 0x80 {
        out.push((n as u8 & 0x7F) | 0x80);
        n >>= 7;
    }
    out.push(n as u8);
}

/// Takes a varint [`put_varint`] wrote off the front of `b`; None when it is cut short, is not
/// in its shortest form (so a list of headers has one encoding only) or does not fit a `usize`.
fn take_varint(b: &mut &[u8]) -> Option<usize> {
    let mut n: u64 = 0;
    for i in 0..10 {
        let (&byte, rest) = b.split_first()?;
        *b = rest;
        let bits = u64::from(byte & 0x7F);
        // The tenth byte carries the 64th bit only.
        if i == 9 && bits > 1 {
            return None;
        }
        n |= bits << (7 * i);
        if byte & 0x80 == 0 {
            if byte == 0 && i > 0 {
                return None;
            }
            return usize::try_from(n).ok();
        }
    }
    None
}

/// The current format, after its marker. Every byte must be used.
fn decode_varint(mut b: &[u8]) -> Option<HeaderList> {
    let count = take_varint(&mut b)?;
    // Each header takes two bytes at least: a damaged count cannot reserve more than that.
    let mut out = Vec::with_capacity(count.min(b.len() / 2));
    for _ in 0..count {
        let kl = take_varint(&mut b)?;
        let k = String::from_utf8(take(&mut b, kl)?.to_vec()).ok()?;
        let vl = take_varint(&mut b)?;
        out.push((k, take(&mut b, vl)?.to_vec()));
    }
    b.is_empty().then_some(out)
}

/// The fixed-width format (see [`VARINT_FORMAT`]), as rows written before the varint format
/// hold it.
fn decode_fixed(mut b: &[u8]) -> Option<HeaderList> {
    let count = u16::from_be_bytes(take(&mut b, 2)?.try_into().ok()?);
    let mut out = Vec::with_capacity(count as usize);
    for _ in 0..count {
        let kl = u16::from_be_bytes(take(&mut b, 2)?.try_into().ok()?) as usize;
        let k = String::from_utf8(take(&mut b, kl)?.to_vec()).ok()?;
        let vl = u32::from_be_bytes(take(&mut b, 4)?.try_into().ok()?) as usize;
        out.push((k, take(&mut b, vl)?.to_vec()));
    }
    Some(out)
}

/// The header a dead letter carries when some of its message's headers could not be read: how
/// many.
pub const UNREADABLE_HEADERS: &str = "dlq-unreadable-headers";

/// The value of an input message's first header named `name` (a header whose name cannot be
/// read is passed over, see [`of_message`]).
pub fn find(m: &rdkafka::message::OwnedMessage, name: &str) -> Option<Vec<u8>> {
    use rdkafka::message::{Headers, Message};
    let hs = m.headers()?;
    (0..hs.count()).find_map(|i| {
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            hs.try_get(i)
                .filter(|h| h.key == name)
                .map(|h| h.value.unwrap_or_default().to_vec())
        }))
        .ok()
        .flatten()
    })
}

/// An input message's headers, in order. A header whose name is not UTF-8 (a client on the C
/// library can send one) cannot be read through the Kafka client the runner is built on (it
/// panics on such a name): it is left out, and [`UNREADABLE_HEADERS`] says how many were; the
/// message itself, its key and value, is kept whole.
pub fn of_message(m: &rdkafka::message::OwnedMessage) -> HeaderList {
    use rdkafka::message::{Headers, Message};
    let Some(hs) = m.headers() else {
        return Vec::new();
    };
    let mut out = Vec::with_capacity(hs.count());
    let mut unreadable = 0;
    for i in 0..hs.count() {
        let read = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            hs.try_get(i)
                .map(|h| (h.key.to_string(), h.value.unwrap_or_default().to_vec()))
        }));
        match read {
            Ok(Some(h)) => out.push(h),
            Ok(None) => {}
            Err(_) => unreadable += 1,
        }
    }
    if unreadable > 0 {
        out.push((
            UNREADABLE_HEADERS.to_string(),
            unreadable.to_string().into_bytes(),
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Headers in the fixed-width format, as rows written before the varint format hold them.
    fn fixed(headers: &[(&str, &[u8])]) -> Vec<u8> {
        let mut out = (headers.len() as u16).to_be_bytes().to_vec();
        for (k, v) in headers {
            out.extend_from_slice(&(k.len() as u16).to_be_bytes());
            out.extend_from_slice(k.as_bytes());
            out.extend_from_slice(&(v.len() as u32).to_be_bytes());
            out.extend_from_slice(v);
        }
        out
    }

    fn list(pairs: &[(&str, &[u8])]) -> HeaderList {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_vec()))
            .collect()
    }

    #[test]
    fn headers_round_trip() {
        let h = vec![
            ("a".to_string(), b"1".to_vec()),
            ("dlq-detail".to_string(), vec![0, 255, 10]),
            ("e".into(), vec![]),
        ];
        assert_eq!(decode(&encode(&h)), Some(h));
        assert_eq!(decode(&[]), None);
        assert_eq!(decode(&[0, 1, 0]), None, "truncated input is refused");
        assert_eq!(decode(&encode(&[])), Some(vec![]));
    }

    #[test]
    fn the_encoding_is_the_marker_then_varints() {
        let h = list(&[("ab", b"xyz"), ("", &[0u8; 200][..])]);
        let mut want = VARINT_FORMAT.to_vec();
        want.extend_from_slice(&[2, 2, b'a', b'b', 3, b'x', b'y', b'z', 0, 0xC8, 0x01]);
        want.extend_from_slice(&[0; 200]);
        assert_eq!(encode(&h), want);
    }

    #[test]
    fn rows_in_the_fixed_width_format_still_decode() {
        let h = list(&[("dlq-reason", b"malformed_json"), ("source-offset", b"1")]);
        assert_eq!(
            decode(&fixed(&[
                ("dlq-reason", b"malformed_json"),
                ("source-offset", b"1")
            ])),
            Some(h)
        );
        assert_eq!(decode(&fixed(&[])), Some(vec![]));
        // The largest key and value that format holds whole.
        let (k, v) = ("k".repeat(65_535), vec![7u8; 70_000]);
        assert_eq!(
            decode(&fixed(&[(&k, &v)])),
            Some(vec![(k.clone(), v.clone())])
        );
    }

    #[test]
    fn a_reader_of_the_fixed_width_format_refuses_the_varint_format() {
        for h in [
            vec![],
            list(&[("a", b"1")]),
            list(&[(&"k".repeat(70_000), &[1u8; 10][..])]),
        ] {
            assert_eq!(decode_fixed(&encode(&h)), None);
        }
    }

    #[test]
    fn keys_values_and_counts_past_the_fixed_width_limits_round_trip() {
        for len in [65_535, 65_536, 65_537, 70_000, 200_000] {
            let key = "k".repeat(len);
            let value: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
            let h = vec![
                ("before".to_string(), b"1".to_vec()),
                (key.clone(), b"v".to_vec()),
                ("value".to_string(), value.clone()),
                (key, value),
                ("after".to_string(), vec![]),
            ];
            assert_eq!(decode(&encode(&h)).as_ref(), Some(&h), "{len}");
        }
        for count in [65_535, 65_536, 65_537, 70_000] {
            let h: HeaderList = (0..count)
                .map(|i| (format!("h{i}"), i.to_string().into_bytes()))
                .collect();
            let back = decode(&encode(&h)).expect("decodes");
            assert_eq!(back.len(), count);
            assert_eq!(back, h, "{count}");
        }
    }

    #[test]
    fn varints_hold_any_length() {
        for n in [
            0,
            1,
            127,
            128,
            16_383,
            16_384,
            65_535,
            65_536,
            u32::MAX as usize,
            u32::MAX as usize + 1,
            usize::MAX,
        ] {
            let mut out = Vec::new();
            put_varint(&mut out, n);
            let mut b = &out[..];
            assert_eq!(take_varint(&mut b), Some(n), "{n}");
            assert!(b.is_empty());
        }
        // Cut short, longer than ten bytes, or past 64 bits.
        assert_eq!(take_varint(&mut &[0x80][..]), None);
        assert_eq!(take_varint(&mut &[0xFF; 11][..]), None);
        let mut past = vec![0xFF; 9];
        past.push(0x02);
        assert_eq!(take_varint(&mut &past[..]), None);
        assert_eq!(
            take_varint(&mut &[0x80, 0x00][..]),
            None,
            "not the shortest form"
        );
    }

    #[test]
    fn damaged_rows_are_refused() {
        let h = list(&[("a", b"12"), ("bc", &[9u8; 300][..])]);
        let e = encode(&h);
        for cut in VARINT_FORMAT.len()..e.len() {
            assert_eq!(decode(&e[..cut]), None, "cut at {cut}");
        }
        let mut longer = e.clone();
        longer.push(0);
        assert_eq!(decode(&longer), None, "a byte past the last header");
        // A count of 2^63 headers reserves nothing before it is found short.
        let mut huge = VARINT_FORMAT.to_vec();
        huge.extend_from_slice(&[0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0x7F]);
        assert_eq!(decode(&huge), None);
        // A key that is not UTF-8.
        let mut bad = VARINT_FORMAT.to_vec();
        bad.extend_from_slice(&[1, 1, 0xC3, 0]);
        assert_eq!(decode(&bad), None);
    }

    fn header_list() -> impl Strategy<Value = HeaderList> {
        let key = prop_oneof![
            4 => ".{0,12}",
            1 => (65_530usize..65_545).prop_map(|n| "k".repeat(n)),
        ];
        let value = prop_oneof![
            4 => proptest::collection::vec(any::<u8>(), 0..24),
            1 => (65_530usize..65_545, any::<u8>()).prop_map(|(n, b)| vec![b; n]),
        ];
        proptest::collection::vec((key, value), 0..12)
    }

    proptest! {
        #[test]
        fn any_headers_round_trip(h in header_list()) {
            prop_assert_eq!(decode(&encode(&h)), Some(h));
        }

        #[test]
        fn any_bytes_decode_or_are_refused_without_panicking(
            b in proptest::collection::vec(any::<u8>(), 0..64),
            marked in any::<bool>(),
        ) {
            let mut row = if marked { VARINT_FORMAT.to_vec() } else { Vec::new() };
            row.extend_from_slice(&b);
            if let Some(h) = decode(&row) {
                // What decodes in the varint format is exactly what encoding it gives back.
                if marked {
                    prop_assert_eq!(encode(&h), row);
                }
            }
        }
    }
}
