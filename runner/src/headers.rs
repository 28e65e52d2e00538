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

/// Encodes headers as: count (u16), then per header key length (u16), key, value length (u32),
/// value.
pub fn encode(headers: &[(String, Vec<u8>)]) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(&(headers.len() as u16).to_be_bytes());
    for (k, v) in headers {
        out.extend_from_slice(&(k.len() as u16).to_be_bytes());
        out.extend_from_slice(k.as_bytes());
        out.extend_from_slice(&(v.len() as u32).to_be_bytes());
        out.extend_from_slice(v);
    }
    out
}

/// Decodes what [`encode`] wrote; None when it is damaged.
pub fn decode(mut b: &[u8]) -> Option<HeaderList> {
    fn take<'a>(b: &mut &'a [u8], n: usize) -> Option<&'a [u8]> {
        if b.len() < n {
            return None;
        }
        let (h, t) = b.split_at(n);
        *b = t;
        Some(h)
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_round_trip() {
        let h = vec![
            ("a".to_string(), b"1".to_vec()),
            ("dlq-detail".to_string(), vec![0, 255, 10]),
            ("e".into(), vec![]),
        ];
        assert_eq!(decode(&encode(&h)), Some(h));
        assert_eq!(decode(&[0, 1, 0]), None, "truncated input is refused");
    }
}
