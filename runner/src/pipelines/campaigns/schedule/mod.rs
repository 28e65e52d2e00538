//! Every subscriber gets every campaign while it is active (docs/SPEC.md, "The rules"): a
//! campaign published before its start is delivered at its start, and a subscriber added while
//! a campaign runs gets it too.
//!
//! - `registry.rs`: the campaigns that are not over yet, in PostgreSQL
//!   (`campaign_runner_registry`), written in the delivery unit's transaction of each
//!   publication, with the window the rules gave (`verdict.window`: the host schedules by it and
//!   hard-codes no rule);
//! - `scheduler.rs`: in each runner, for the input partitions it owns, a loop that turns a
//!   window opening, or a subscriber added to a started campaign's restaurant, into a *trigger
//!   record* on the campaign's own input partition;
//! - here: the trigger records' form, and why a campaign's drafts were made (`Cause`).
//!
//! A trigger goes through the same evaluation (the rules decide again, at its `now`, whether
//! the campaign is active) and the same exactly-once delivery as a publication. What
//! each campaign has reached (`campaign_runner_delivered`, see `feedback.rs`) makes a trigger
//! produced twice (a crash
//! between producing it and marking it, two runners during a rebalance) harmless: only drafts
//! that are new are published, and nobody gets a campaign twice.

pub mod registry;
pub mod scheduler;

pub use registry::{Entry, RegistryOp};

use rdkafka::message::{Message, OwnedMessage};

/// Header of a trigger record: its cause (`scheduled_start` or `new_subscriber`).
pub const TRIGGER: &str = "campaign-trigger";
/// Header of a `new_subscriber` trigger: the clients to deliver to, a JSON array of strings.
pub const TRIGGER_CLIENTS: &str = "trigger-clients";
/// Header of a trigger record: the publication it stands for, `topic/partition/offset`.
pub const TRIGGER_OF: &str = "trigger-of";

/// Why a campaign's drafts were made.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Cause {
    /// The campaign was published while active.
    Published,
    /// Its window opened (it was published before its start).
    ScheduledStart,
    /// A subscriber was added to its restaurant while it was active.
    NewSubscriber,
}

impl Cause {
    pub const ALL: [Cause; 3] = [
        Cause::Published,
        Cause::ScheduledStart,
        Cause::NewSubscriber,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Cause::Published => "published",
            Cause::ScheduledStart => "scheduled_start",
            Cause::NewSubscriber => "new_subscriber",
        }
    }
}

/// What a trigger record asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Trigger {
    /// Deliver to every subscriber of the restaurant.
    ScheduledStart {
        /// The publication it stands for (partition, offset), when the header says it.
        of: Option<(i32, i64)>,
    },
    /// Deliver to these clients, those of them still subscribed.
    NewSubscriber { clients: Vec<String> },
}

impl Trigger {
    pub fn cause(&self) -> Cause {
        match self {
            Trigger::ScheduledStart { .. } => Cause::ScheduledStart,
            Trigger::NewSubscriber { .. } => Cause::NewSubscriber,
        }
    }

    /// The trigger a message carries: None for a publication, Err (a sentence) for trigger
    /// headers that cannot be read.
    pub fn of(msg: &OwnedMessage) -> Result<Option<Trigger>, String> {
        let Some(cause) = crate::headers::find(msg, TRIGGER) else {
            return Ok(None);
        };
        match cause.as_slice() {
            b"scheduled_start" => {
                let of = crate::headers::find(msg, TRIGGER_OF).and_then(|v| parse_of(&v));
                Ok(Some(Trigger::ScheduledStart { of }))
            }
            b"new_subscriber" => {
                let raw = crate::headers::find(msg, TRIGGER_CLIENTS).ok_or_else(|| {
                    format!("a new_subscriber trigger has no {TRIGGER_CLIENTS} header")
                })?;
                let clients: Vec<String> = serde_json::from_slice(&raw).map_err(|e| {
                    format!("{TRIGGER_CLIENTS} is not a JSON array of strings: {e}")
                })?;
                Ok(Some(Trigger::NewSubscriber { clients }))
            }
            other => Err(format!(
                "{TRIGGER} is {:?}; expected scheduled_start or new_subscriber",
                String::from_utf8_lossy(other)
            )),
        }
    }
}

/// `topic/partition/offset` → (partition, offset).
fn parse_of(v: &[u8]) -> Option<(i32, i64)> {
    let s = std::str::from_utf8(v).ok()?;
    let mut parts = s.rsplitn(3, '/');
    let offset = parts.next()?.parse().ok()?;
    let partition = parts.next()?.parse().ok()?;
    parts.next()?;
    Some((partition, offset))
}

/// The registry entry of a valid publication, read from `msg` with the rules' window.
pub fn entry(
    msg: &OwnedMessage,
    adv_campaign_id: &str,
    restaurant_id: &str,
    opens: i64,
    closes: i64,
    started: bool,
) -> Entry {
    Entry {
        adv_campaign_id: adv_campaign_id.to_string(),
        restaurant_id: restaurant_id.to_string(),
        topic: msg.topic().to_string(),
        partition: msg.partition(),
        source_offset: msg.offset(),
        key: msg.key().map(<[u8]>::to_vec),
        payload: msg.payload().unwrap_or_default().to_vec(),
        opens,
        closes,
        started,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rdkafka::message::{Header, OwnedHeaders, Timestamp};

    fn msg(headers: &[(&str, &str)]) -> OwnedMessage {
        let h = headers.iter().fold(OwnedHeaders::new(), |h, (k, v)| {
            h.insert(Header {
                key: k,
                value: Some(v.as_bytes()),
            })
        });
        OwnedMessage::new(
            Some(b"{}".to_vec()),
            None,
            "campaigns".into(),
            Timestamp::NotAvailable,
            0,
            7,
            Some(h),
        )
    }

    #[test]
    fn triggers_are_read_from_their_headers() {
        assert_eq!(Trigger::of(&msg(&[])), Ok(None));
        assert_eq!(
            Trigger::of(&msg(&[
                (TRIGGER, "scheduled_start"),
                (TRIGGER_OF, "campaigns/3/42")
            ])),
            Ok(Some(Trigger::ScheduledStart { of: Some((3, 42)) }))
        );
        assert_eq!(
            Trigger::of(&msg(&[
                (TRIGGER, "new_subscriber"),
                (TRIGGER_CLIENTS, r#"["a","b"]"#)
            ])),
            Ok(Some(Trigger::NewSubscriber {
                clients: vec!["a".into(), "b".into()]
            }))
        );
        assert!(Trigger::of(&msg(&[(TRIGGER, "new_subscriber")])).is_err());
        assert!(Trigger::of(&msg(&[
            (TRIGGER, "new_subscriber"),
            (TRIGGER_CLIENTS, "a,b")
        ]))
        .is_err());
        assert!(Trigger::of(&msg(&[(TRIGGER, "later")])).is_err());
    }
}
