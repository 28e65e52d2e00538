//! The compact provenance every draft carries: one header, `provenance`, instead of one header
//! per fact (README, "The output topic"). Every draft of a campaign message carries the same
//! value, so it says everything in one place, in the fewest bytes that stay readable:
//!
//! ```text
//! provenance: <source topic>/<partition>/<offset> <subscriber snapshot> <rules sha256> <rules version>
//! provenance: campaigns/0/42 17 c6a80e1a…d407 campaign-rules 4.0.0
//! ```
//!
//! Fields are separated by one space; a topic name has no space (Kafka allows only
//! `[a-zA-Z0-9._-]`), and the rules version comes last because it may have spaces.

use crate::headers::{self, HeaderList};

/// The header's name.
pub const PROVENANCE: &str = "provenance";

/// What a draft's `provenance` header says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Provenance {
    pub source_topic: String,
    pub source_partition: i32,
    pub source_offset: i64,
    /// The version of the subscriber snapshot the campaign was joined against.
    pub snapshot: u64,
    pub rules_sha256: String,
    pub rules_version: String,
}

impl Provenance {
    /// The header's value.
    pub fn encode(&self) -> String {
        format!(
            "{}/{}/{} {} {} {}",
            self.source_topic,
            self.source_partition,
            self.source_offset,
            self.snapshot,
            self.rules_sha256,
            self.rules_version
        )
    }

    /// Reads a header's value; None when it is not in this form.
    pub fn parse(value: &str) -> Option<Provenance> {
        let mut fields = value.splitn(4, ' ');
        let position = fields.next()?;
        let snapshot = fields.next()?.parse().ok()?;
        let rules_sha256 = fields.next()?.to_string();
        let rules_version = fields.next()?.to_string();
        let mut parts = position.rsplitn(3, '/');
        let source_offset = parts.next()?.parse().ok()?;
        let source_partition = parts.next()?.parse().ok()?;
        let source_topic = parts.next().filter(|t| !t.is_empty())?.to_string();
        Some(Provenance {
            source_topic,
            source_partition,
            source_offset,
            snapshot,
            rules_sha256,
            rules_version,
        })
    }
}

/// A draft's headers from the provenance the delivery core gives a message (the separate
/// `source-*` and `rules-*` headers, see [`crate::delivery::default_provenance`]) and the
/// snapshot: those become one `provenance` header, first; any other header (a replay's
/// `replay-of`) follows as it is.
pub fn pack(given: HeaderList, snapshot: u64) -> HeaderList {
    let mut p = Provenance {
        source_topic: String::new(),
        source_partition: -1,
        source_offset: -1,
        snapshot,
        rules_sha256: String::new(),
        rules_version: String::new(),
    };
    let mut rest = Vec::new();
    for (name, value) in given {
        let text = || String::from_utf8_lossy(&value).into_owned();
        match name.as_str() {
            headers::SOURCE_TOPIC => p.source_topic = text(),
            headers::SOURCE_PARTITION => p.source_partition = text().parse().unwrap_or(-1),
            headers::SOURCE_OFFSET => p.source_offset = text().parse().unwrap_or(-1),
            headers::RULES_SHA256 => p.rules_sha256 = text(),
            headers::RULES_VERSION => p.rules_version = text(),
            _ => rest.push((name, value)),
        }
    }
    let mut out = Vec::with_capacity(rest.len() + 1);
    out.push((PROVENANCE.to_string(), p.encode().into_bytes()));
    out.extend(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn given() -> HeaderList {
        [
            (headers::SOURCE_TOPIC, "campaigns.eu-1"),
            (headers::SOURCE_PARTITION, "3"),
            (headers::SOURCE_OFFSET, "1234567"),
            (headers::RULES_VERSION, "campaign-rules 4.0.0 (build 7)"),
            (headers::RULES_SHA256, "ab12"),
            ("replay-of", "campaigns-dead-letter/0/9"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.as_bytes().to_vec()))
        .collect()
    }

    #[test]
    fn packs_the_provenance_into_one_header_and_reads_it_back() {
        let packed = pack(given(), 17);
        assert_eq!(packed.len(), 2, "{packed:?}");
        assert_eq!(packed[0].0, PROVENANCE);
        let value = std::str::from_utf8(&packed[0].1).unwrap();
        assert_eq!(
            value,
            "campaigns.eu-1/3/1234567 17 ab12 campaign-rules 4.0.0 (build 7)"
        );
        assert_eq!(
            Provenance::parse(value),
            Some(Provenance {
                source_topic: "campaigns.eu-1".into(),
                source_partition: 3,
                source_offset: 1234567,
                snapshot: 17,
                rules_sha256: "ab12".into(),
                rules_version: "campaign-rules 4.0.0 (build 7)".into(),
            })
        );
        assert_eq!(
            packed[1],
            (
                "replay-of".to_string(),
                b"campaigns-dead-letter/0/9".to_vec()
            )
        );
    }

    #[test]
    fn values_in_another_form_are_not_read() {
        for bad in [
            "",
            "campaigns/0/1",
            "campaigns/0/x 1 ab v",
            "/0/1 1 ab v",
            "campaigns/0/1 x ab v",
            "0/1 1 ab v",
        ] {
            assert_eq!(Provenance::parse(bad), None, "{bad:?}");
        }
    }
}
